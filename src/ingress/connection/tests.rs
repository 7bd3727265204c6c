//! The connection state machine over in-memory pipes (`tokio::io::duplex`, tiny buffers force
//! partial reads and writes) against a real spool on a temp file: ack order, backpressure, a
//! bad request after good ones, and the idle deadline on tokio's paused clock.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;

use super::{kept_still_in_socket, serve};
use crate::config::Config;
use crate::forward::ack::encode_ack;
use crate::ingress::io::Streamed;
use crate::ingress::IngressContext;
use crate::spool::testing::{keys_after_flush, stop, WAIT};
use crate::spool::{Spool, SpoolWriter};

const PEER: ([u8; 4], u16) = ([127, 0, 0, 1], 40000);

struct Harness {
    _dir: tempfile::TempDir,
    spool: Spool,
    writer: SpoolWriter,
    shutdown: CancellationToken,
}

/// A spool of `max_bytes` and ingress settings from `ingress_keys` (TOML lines).
fn harness(max_bytes: u64, ingress_keys: &str) -> (Harness, Arc<IngressContext>) {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[ingress]\nlisten = \"127.0.0.1:0\"\n{ingress_keys}\n\
         [spool]\npath = {:?}\nmax_bytes = {max_bytes}\n\
         [[upstream.nodes]]\naddress = \"127.0.0.1:9\"\n",
        dir.path().join("spool.redb").display().to_string()
    );
    let config = Config::parse(&text, Path::new("test.toml")).unwrap();
    let (spool, writer) = Spool::open(&config.spool).unwrap();
    let ctx = Arc::new(IngressContext::new(config.ingress, spool.clone()).unwrap());
    let harness = Harness {
        _dir: dir,
        spool,
        writer,
        shutdown: CancellationToken::new(),
    };
    (harness, ctx)
}

impl Harness {
    /// Serve one connection over a pipe of `capacity` bytes; returns the sender's end.
    fn connect(
        &self,
        ctx: &Arc<IngressContext>,
        capacity: usize,
    ) -> (DuplexStream, JoinHandle<()>) {
        let (client, server) = tokio::io::duplex(capacity);
        let ctx = ctx.clone();
        let shutdown = self.shutdown.clone();
        let task = tokio::spawn(async move {
            let peer = SocketAddr::from(PEER);
            serve(Streamed(server), peer, None, ctx, shutdown, None).await;
        });
        (client, task)
    }

    async fn keys_after_flush(&self) -> Vec<u64> {
        keys_after_flush(&self.spool).await
    }

    async fn stop(self) {
        self.shutdown.cancel();
        stop(self.writer).await;
    }
}

/// PackedForward `[tag, bin(entries), {"chunk": id}]` with `events` entries of `pad` bytes.
fn request(tag: &str, events: u8, pad: usize, chunk: Option<&str>) -> Vec<u8> {
    let mut entries = Vec::new();
    for i in 0..events {
        entries.extend_from_slice(&[0x92, 0x01, 0x81, 0xa1, b'p', 0xc5]);
        entries.extend_from_slice(&(pad as u16).to_be_bytes());
        entries.extend(std::iter::repeat_n(i, pad));
    }
    let mut out = vec![0x92 + u8::from(chunk.is_some())];
    out.push(0xa0 | tag.len() as u8);
    out.extend_from_slice(tag.as_bytes());
    out.push(0xc6);
    out.extend_from_slice(&(entries.len() as u32).to_be_bytes());
    out.extend_from_slice(&entries);
    if let Some(id) = chunk {
        out.extend_from_slice(&[0x81, 0xa5]);
        out.extend_from_slice(b"chunk");
        out.extend_from_slice(&msgpack_str(id));
    }
    out
}

fn msgpack_str(s: &str) -> Vec<u8> {
    let mut v = vec![0xa0 | s.len() as u8];
    v.extend_from_slice(s.as_bytes());
    v
}

fn ack(id: &str) -> Vec<u8> {
    let mut out = Vec::new();
    encode_ack(&msgpack_str(id), &mut out);
    out
}

async fn read_exact_bytes(client: &mut (impl AsyncRead + Unpin), n: usize) -> Vec<u8> {
    let mut got = vec![0u8; n];
    timeout(WAIT, client.read_exact(&mut got))
        .await
        .expect("no bytes from the connection in time")
        .unwrap();
    got
}

async fn expect_closed(client: &mut (impl AsyncRead + Unpin)) {
    let mut rest = Vec::new();
    timeout(WAIT, client.read_to_end(&mut rest))
        .await
        .expect("connection not closed in time")
        .unwrap();
    assert!(
        rest.is_empty(),
        "unexpected bytes before the close: {rest:?}"
    );
}

#[tokio::test]
async fn acks_come_back_in_request_order_over_a_tiny_pipe() {
    let (h, ctx) = harness(1 << 30, "");
    let (client, task) = h.connect(&ctx, 7);
    let (mut rd, mut wr) = tokio::io::split(client);
    let ids: Vec<String> = (0..30).map(|i| format!("c{i:02}")).collect();
    let mut wire = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        wire.extend(request(&format!("t{}", i % 3), 3, 40, Some(id)));
    }
    // Written while the acks are read: the pipe holds 7 bytes each way.
    let writer = tokio::spawn(async move {
        wr.write_all(&wire).await.unwrap();
        wr
    });
    let expected: Vec<u8> = ids.iter().flat_map(|id| ack(id)).collect();
    assert_eq!(
        read_exact_bytes(&mut rd, expected.len()).await,
        expected,
        "every ack, in request order"
    );
    let mut wr = writer.await.unwrap();
    wr.shutdown().await.unwrap();
    expect_closed(&mut rd).await;
    task.await.unwrap();
    assert!(!h.keys_after_flush().await.is_empty());
    h.stop().await;
}

#[tokio::test]
async fn a_connection_waiting_for_spool_room_does_not_read_its_socket() {
    // Room for one 1 KiB request, not two.
    let (h, ctx) = harness(1600, "max_frame_bytes = 1500");
    let (client, task) = h.connect(&ctx, 64);
    let (mut rd, mut wr) = tokio::io::split(client);
    wr.write_all(&request("t", 1, 1000, Some("first")))
        .await
        .unwrap();
    assert_eq!(
        read_exact_bytes(&mut rd, ack("first").len()).await,
        ack("first")
    );
    let first_key = h.keys_after_flush().await[0];
    let first_len = Spool::cost(crate::forward::Signal::Logs, None, b"t", &[0u8; 1008]);

    wr.write_all(&request("t", 1, 1000, Some("second")))
        .await
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while !h.spool.stats().full {
        assert!(
            Instant::now() < deadline,
            "the second request never waited for room"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The connection waits for room: it must not read the third request off the pipe, so a
    // write larger than the pipe cannot complete.
    let third = request("t", 1, 1000, Some("third"));
    let mut writing = tokio::spawn(async move {
        wr.write_all(&third).await.unwrap();
        wr
    });
    let early = timeout(Duration::from_millis(300), &mut writing).await;
    assert!(
        early.is_err(),
        "the socket was read while the spool had no room"
    );

    // An upstream ack frees the first request's bytes: the second is stored and acked, and
    // the third is read.
    h.spool.delete(first_key, first_len);
    let mut wr = timeout(WAIT, writing)
        .await
        .expect("the third request was never read")
        .unwrap();
    assert_eq!(
        read_exact_bytes(&mut rd, ack("second").len()).await,
        ack("second")
    );
    // The third waits for room in turn, until the second is acked upstream.
    let second_key = h.keys_after_flush().await[0];
    assert_ne!(second_key, first_key);
    h.spool.delete(second_key, first_len);
    assert_eq!(
        read_exact_bytes(&mut rd, ack("third").len()).await,
        ack("third")
    );
    wr.shutdown().await.unwrap();
    expect_closed(&mut rd).await;
    task.await.unwrap();
    h.stop().await;
}

#[tokio::test]
async fn a_bad_request_closes_the_connection_after_the_acks_of_the_good_ones() {
    let (h, ctx) = harness(1 << 30, "");
    let (client, task) = h.connect(&ctx, 16);
    let mut wire = Vec::new();
    for id in ["g1", "g2", "g3"] {
        wire.extend(request("t", 2, 10, Some(id)));
    }
    wire.extend_from_slice(&[0x93, 0xa1, b't', 0xc1, 0x00]);
    let (mut rd, mut wr) = tokio::io::split(client);
    let writer = tokio::spawn(async move {
        // The connection may close before it has read everything.
        let _ = wr.write_all(&wire).await;
        wr
    });
    let acks = [ack("g1"), ack("g2"), ack("g3")].concat();
    assert_eq!(read_exact_bytes(&mut rd, acks.len()).await, acks);
    expect_closed(&mut rd).await;
    task.await.unwrap();
    drop(writer.await.unwrap());
    let keys = h.keys_after_flush().await;
    assert!(
        (1..=3).contains(&keys.len()),
        "the good requests are stored: {keys:?}"
    );
    let spool = h.spool.clone();
    let dead = tokio::task::spawn_blocking(move || spool.dead_letter_count())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(dead, 1, "the rejected bytes are kept as a dead letter");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_idle_connection_closes_at_idle_timeout() {
    let (h, ctx) = harness(1 << 30, "idle_timeout = \"10s\"");
    let started = Instant::now();
    let (mut client, task) = h.connect(&ctx, 64);
    expect_closed(&mut client).await;
    task.await.unwrap();
    assert_eq!(started.elapsed(), Duration::from_secs(10));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_request_trickling_in_is_cut_at_idle_timeout_from_its_first_byte() {
    let (h, ctx) = harness(1 << 30, "idle_timeout = \"10s\"");
    let (client, task) = h.connect(&ctx, 64);
    let (mut rd, mut wr) = tokio::io::split(client);
    let wire = request("t", 1, 200, Some("slow"));
    let started = Instant::now();
    let trickle = tokio::spawn(async move {
        // One byte every 2 s: each read would re-arm a per-read deadline forever.
        for byte in wire {
            if wr.write_all(&[byte]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    });
    expect_closed(&mut rd).await;
    let closed_after = started.elapsed();
    task.await.unwrap();
    trickle.abort();
    assert!(
        closed_after >= Duration::from_secs(10) && closed_after < Duration::from_secs(12),
        "closed after {closed_after:?}"
    );
    assert!(
        h.keys_after_flush().await.is_empty(),
        "nothing of it was spooled"
    );
    h.stop().await;
}

#[tokio::test]
async fn shutdown_lets_the_request_being_read_finish_and_acks_it() {
    let (h, ctx) = harness(1 << 30, "");
    // A pipe smaller than the head: once it is written, the connection has read part of it.
    let (client, task) = h.connect(&ctx, 16);
    let (mut rd, mut wr) = tokio::io::split(client);
    let wire = request("t", 2, 100, Some("late"));
    let (head, tail) = wire.split_at(50);
    wr.write_all(head).await.unwrap();
    h.shutdown.cancel();
    wr.write_all(tail).await.unwrap();
    assert_eq!(
        read_exact_bytes(&mut rd, ack("late").len()).await,
        ack("late")
    );
    expect_closed(&mut rd).await;
    task.await.unwrap();
    assert_eq!(h.keys_after_flush().await.len(), 1);
    h.stop().await;
}

#[test]
fn bytes_kept_but_not_released_are_skipped_and_a_socket_past_a_prefix_is_an_error() {
    // The worker died after the part was committed, before its release: skip the rest.
    assert_eq!(kept_still_in_socket(false, 1_000, 600), Ok(400));
    // It died after the release: nothing to skip.
    assert_eq!(kept_still_in_socket(false, 1_000, 1_000), Ok(0));
    // A mark of a request stored whole, and requests released after it: nothing to skip.
    assert_eq!(kept_still_in_socket(true, 1_000, 5_000), Ok(0));
    assert_eq!(kept_still_in_socket(true, 1_000, 900), Ok(100));
    // Bytes after a kept prefix left the socket unkept: that cannot be joined.
    assert!(kept_still_in_socket(false, 1_000, 1_001).is_err());
}
