//! A sender's side of a connection, on plain blocking sockets: connect, write the parts a legacy
//! sender writes, read acks the way fluentd v0.12 reads them (one `recv(1024)` holding exactly
//! one value), read a number of msgpack values, see the peer close; and the acked v0.12 request
//! most end-to-end tests send.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use ackgate::forward::msgpack::{read_header, value_len, Header};

use super::msgpack::{complete_values, hex, DEPTH};
use super::requests::{ack_request, expected_ack, unique_entries, v012_chunk_id};

pub fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    stream
        .set_write_timeout(Some(Duration::from_secs(20)))
        .expect("write timeout");
    stream
}

/// Write each part with its own `write_all` + `flush` (TCP_NODELAY on, so they leave as
/// separate segments), as legacy senders do.
pub fn write_parts(stream: &mut TcpStream, parts: &[Vec<u8>]) {
    let _ = stream.set_nodelay(true);
    for part in parts {
        stream.write_all(part).expect("write part");
        stream.flush().expect("flush");
    }
}

/// fluentd v0.12's ack read: one `recv(1024)`, which must hold exactly one msgpack value.
pub fn read_one_ack(stream: &mut TcpStream, timeout: Duration) -> Vec<u8> {
    stream
        .set_read_timeout(Some(timeout))
        .expect("read timeout");
    let mut buf = [0u8; 1024];
    let n = stream
        .read(&mut buf)
        .unwrap_or_else(|e| panic!("no ack within {timeout:?}: {e}"));
    assert!(n > 0, "connection closed instead of an ack");
    let got = &buf[..n];
    assert_eq!(
        value_len(got, DEPTH),
        Ok(Some(n)),
        "one recv must hold exactly one msgpack value (fluentd v0.12 unpacks it strictly): {}",
        hex(got)
    );
    assert!(
        matches!(read_header(got), Some(Header::Map { .. })),
        "ack is not a msgpack map: {}",
        hex(got)
    );
    got.to_vec()
}

/// The first `count` msgpack values from `stream` (split across recvs as they come), or what
/// was read before EOF, an error or the deadline, as `Err`.
pub fn read_msgpack_values(
    stream: &mut TcpStream,
    count: usize,
    deadline: Instant,
) -> Result<Vec<Vec<u8>>, Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let (mut values, _) = complete_values(&buf);
        if values.len() >= count {
            values.truncate(count);
            return Ok(values);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return Err(buf);
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Err(buf),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return Err(buf),
        }
    }
}

/// The first `count` msgpack values within `timeout`; panics with what arrived otherwise.
pub fn read_values(stream: &mut TcpStream, count: usize, timeout: Duration) -> Vec<Vec<u8>> {
    read_msgpack_values(stream, count, Instant::now() + timeout).unwrap_or_else(|got| {
        panic!(
            "only {} of {count} values within {timeout:?} (connection closed, failed or silent): {}",
            complete_values(&got).0.len(),
            hex(&got)
        )
    })
}

/// Wait until the peer closes the connection (read returns 0 or an error such as a reset).
/// Returns the bytes read before that. Panics if it stays open past `timeout`.
pub fn expect_closed(stream: &mut TcpStream, timeout: Duration) -> Vec<u8> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "connection still open after {timeout:?} (read so far: {})",
            hex(&got)
        );
        stream.set_read_timeout(Some(left)).expect("read timeout");
        match stream.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                continue
            }
            Err(_) => return got,
        }
    }
}

/// One fluentd v0.12 request with chunk id `v012_chunk_id(id)` on `stream`, and its ack read
/// as v0.12 reads it (one recv) and required to be exactly the ack for that id.
pub fn send_acked_on(stream: &mut TcpStream, tag: &str, entries: &[u8], id: u64, wait: Duration) {
    let chunk = v012_chunk_id(id);
    stream
        .write_all(&ack_request(tag, entries, &chunk))
        .expect("write");
    assert_eq!(
        hex(&read_one_ack(stream, wait)),
        hex(&expected_ack(&chunk)),
        "ack #{id} ({tag})"
    );
}

/// [`send_acked_on`] on a new connection to `addr`.
pub fn send_acked(addr: SocketAddr, tag: &str, entries: &[u8], id: u64, wait: Duration) {
    send_acked_on(&mut connect(addr), tag, entries, id, wait);
}

/// `n` acked v0.12 requests of `events` fresh events each ([`unique_entries`] labelled `tag`),
/// every one on its own connection, with chunk ids `first_id`, `first_id + 1`, …; returns the
/// events.
pub fn send_acked_requests(
    addr: SocketAddr,
    tag: &str,
    n: u64,
    events: u64,
    first_id: u64,
    wait: Duration,
) -> Vec<Vec<u8>> {
    let mut all = Vec::new();
    for i in 0..n {
        let entries = unique_entries(tag, events);
        send_acked(addr, tag, &entries.concat(), first_id + i, wait);
        all.extend(entries);
    }
    all
}

/// One UDP heartbeat from `socket` (its read timeout is the wait): `true` if `\0` came back
/// from `target` itself, as a legacy sender requires.
pub fn heartbeat_answered(socket: &std::net::UdpSocket, target: SocketAddr) -> bool {
    socket.send_to(b"\0", target).expect("send heartbeat");
    let mut buf = [0u8; 8];
    matches!(socket.recv_from(&mut buf), Ok((1, from)) if from == target && buf[0] == 0)
}
