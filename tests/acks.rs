//! Acks to senders (PROTOCOL.md §6, §13.1, §13.2; DESIGN.md invariants 1, 3, 7).
//!
//! - The ack is `{"ack": <the chunk value, bytes unchanged>}` and arrives as exactly one msgpack
//!   map in one recv, which is what fluentd v0.12's `recv(1024)` + strict unpack needs.
//! - Pipelined requests on one connection are acked in request order.
//! - "Ack only after the commit", proven by durability: whatever was acked survives SIGKILL and
//!   is delivered after a restart on the same spool, under the chunk ids the aggregator saw
//!   before the kill (invariant 3: the id is fixed when the record is written).

mod support;

use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use support::*;

const ACK_WAIT: Duration = Duration::from_secs(10);

#[test]
fn ack_is_one_exact_msgpack_map_per_recv() {
    let agg = Aggregator::start();
    let gate = Ackgate::start(agg.addr());
    let mut expected = Vec::new();

    // fluentd v0.12 / v1: 25-byte fixstr, Base64 + "\n".
    for i in 0..5 {
        let chunk = v012_chunk_id(1000 + i);
        assert_eq!(chunk.len(), 25);
        let entry = entry_int(TS, &unique_record("ack-v012"));
        expected.push(entry.clone());
        let mut stream = connect(gate.addr());
        stream
            .write_all(&ack_request("acks.v012", &entry, &chunk))
            .expect("write");
        let ack = read_one_ack(&mut stream, ACK_WAIT);
        assert_eq!(hex(&ack), hex(&expected_ack(&chunk)), "v0.12 ack bytes");
        assert_eq!(&ack[..6], &[0x81, 0xa3, b'a', b'c', b'k', 0xb9]);
    }

    // fluent-bit: 24-byte fixstr without "\n"; and a bin chunk, which fluentd echoes as bin.
    {
        let entry = entry_eventtime(TS, 7, &unique_record("ack-fb"));
        expected.push(entry.clone());
        let mut req = vec![0x93];
        mp_str(&mut req, b"acks.fb");
        mp_array_header(&mut req, 1);
        req.extend_from_slice(&entry);
        req.extend_from_slice(&[0xdf, 0, 0, 0, 1]);
        mp_str(&mut req, b"chunk");
        mp_str(&mut req, b"TZTow28OC3ayZyVmI0O7bg==");
        let mut stream = connect(gate.addr());
        stream.write_all(&req).expect("write");
        let ack = read_one_ack(&mut stream, ACK_WAIT);
        assert_eq!(hex(&ack), hex(&expected_ack("TZTow28OC3ayZyVmI0O7bg==")));
    }
    {
        let entry = entry_int(TS, &unique_record("ack-bin"));
        expected.push(entry.clone());
        let mut req = vec![0x93];
        mp_str(&mut req, b"acks.bin");
        mp_bin(&mut req, &entry);
        req.push(0x81);
        mp_str(&mut req, b"chunk");
        let mut chunk = Vec::new();
        mp_bin(&mut chunk, b"QUNLR0FURS1QUk9CRS0wMQ==");
        req.extend_from_slice(&chunk);
        let mut stream = connect(gate.addr());
        stream.write_all(&req).expect("write");
        let ack = read_one_ack(&mut stream, ACK_WAIT);
        let mut want = vec![0x81, 0xa3, b'a', b'c', b'k'];
        want.extend_from_slice(&chunk);
        assert_eq!(hex(&ack), hex(&want), "a bin chunk must be echoed as bin");
    }

    agg.wait_for_all(&expected, Duration::from_secs(10));
    assert_same_events(&expected, &agg.events(), "acked requests");
}

#[test]
fn pipelined_requests_are_acked_in_request_order() {
    let agg = Aggregator::start();
    let gate = Ackgate::start(agg.addr());
    let mut stream = connect(gate.addr());
    let mut expected_events = Vec::new();
    let mut expected_acks = Vec::new();

    // Three rounds: everything in one write, then one write per request, then a mix of
    // requests with and without chunk (only the former are answered).
    let mut n = 0u64;
    let mut next = |with_chunk: bool, events: &mut Vec<Vec<u8>>, acks: &mut Vec<Vec<u8>>| {
        n += 1;
        let entries: Vec<u8> = (0..3)
            .map(|_| {
                let e = entry_int(TS, &unique_record("pipelined"));
                events.push(e.clone());
                e
            })
            .collect::<Vec<_>>()
            .concat();
        // Tags differ so requests land in different records and commit groups.
        let tag = format!("acks.pipe{}", n % 4);
        if with_chunk {
            let chunk = v012_chunk_id(50_000 + n);
            acks.push(expected_ack(&chunk));
            ack_request(&tag, &entries, &chunk)
        } else {
            legacy_request(&tag, &entries)
        }
    };

    let batch: Vec<u8> = (0..20)
        .flat_map(|_| next(true, &mut expected_events, &mut expected_acks))
        .collect();
    stream.write_all(&batch).expect("write batch");
    for _ in 0..20 {
        let req = next(true, &mut expected_events, &mut expected_acks);
        stream.write_all(&req).expect("write one");
    }
    for i in 0..20 {
        let req = next(i % 3 != 0, &mut expected_events, &mut expected_acks);
        stream.write_all(&req).expect("write mixed");
    }

    let acks = read_values(&mut stream, expected_acks.len(), Duration::from_secs(20));
    for (i, (got, want)) in acks.iter().zip(&expected_acks).enumerate() {
        assert_eq!(
            hex(got),
            hex(want),
            "ack #{i} is not the ack of request #{i}"
        );
    }
    agg.wait_for_all(&expected_events, Duration::from_secs(10));
    assert_same_events(&expected_events, &agg.events(), "pipelined requests");
}

/// Send `n` v0.12 ack requests, each on its own connection, and return their events.
fn send_acked_v012(gate: &Ackgate, label: &str, n: u64) -> Vec<Vec<u8>> {
    let tag = format!("acks.{label}");
    send_acked_requests(gate.addr(), &tag, n, 2, 90_000, ACK_WAIT)
}

#[test]
fn acked_requests_survive_sigkill_under_their_original_chunk_ids() {
    const N: u64 = 20;
    let agg = Aggregator::start_with(Behaviour::NeverAck);
    // A window larger than N and a long ack timeout: every record is sent exactly once before
    // the kill, so the ids seen before it are all the ids there are.
    let mut gate = Ackgate::builder()
        .node("agg", agg.addr())
        .section("upstream", "window = 64\nack_timeout = \"60s\"")
        .start();

    let expected = send_acked_v012(&gate, "durable", N);
    agg.wait_for_all(&expected, Duration::from_secs(10));
    let before = agg.requests();
    let ids_before: BTreeSet<String> = before.iter().filter_map(|r| r.chunk.clone()).collect();
    assert_eq!(
        before.len(),
        ids_before.len(),
        "a chunk id was sent twice before any timeout"
    );

    gate.kill9();
    let killed_at = Instant::now();
    agg.set_behaviour(Behaviour::Ack);
    gate.restart();

    agg.wait_until(
        "every event again after the restart",
        Duration::from_secs(20),
        |reqs| {
            let after: usize = reqs
                .iter()
                .filter(|r| r.at > killed_at)
                .map(|r| r.events as usize)
                .sum();
            after >= expected.len()
        },
    );
    let after: Vec<Request> = agg
        .requests()
        .into_iter()
        .filter(|r| r.at > killed_at)
        .collect();
    let events_after: Vec<Vec<u8>> = after.iter().flat_map(|r| r.split_events()).collect();
    assert_same_events(
        &expected,
        &events_after,
        "delivered after SIGKILL + restart",
    );
    let ids_after: BTreeSet<String> = after.iter().filter_map(|r| r.chunk.clone()).collect();
    assert_eq!(
        ids_before, ids_after,
        "chunk ids changed across the restart (invariant 3)"
    );
    // Each id still names the same events.
    let by_id = |reqs: &[Request]| -> HashMap<String, Vec<u8>> {
        reqs.iter()
            .filter_map(|r| r.chunk.clone().map(|c| (c, r.entries.clone())))
            .collect()
    };
    assert_eq!(
        by_id(&before),
        by_id(&after),
        "an id carries other events after the restart"
    );
}

#[test]
fn sigkill_right_after_the_last_ack_loses_nothing() {
    // No aggregator yet, so nothing leaves the spool before the kill, and the kill comes the
    // instant the last ack is read: anything acked before its commit would be lost here.
    // Everything the aggregator later receives can only come from the spool file.
    let node = ReservedPort::new();
    let mut gate = Ackgate::start(node.addr());

    let mut stream = connect(gate.addr());
    let mut expected = Vec::new();
    let mut acks = Vec::new();
    let mut bytes = Vec::new();
    for i in 0..50u64 {
        let entry = entry_int(TS, &unique_record("kill-now"));
        expected.push(entry.clone());
        let chunk = v012_chunk_id(70_000 + i);
        acks.push(expected_ack(&chunk));
        bytes.extend(ack_request(&format!("acks.kill{}", i % 5), &entry, &chunk));
    }
    stream.write_all(&bytes).expect("write");
    let got = read_values(&mut stream, acks.len(), Duration::from_secs(20));
    gate.kill9();
    assert_eq!(got, acks, "acks differ");

    let agg = Aggregator::start_on(node, Behaviour::Ack);
    gate.restart();
    agg.wait_for_events(expected.len(), Duration::from_secs(20));
    assert_same_events(&expected, &agg.events(), "acked before SIGKILL");
}

/// A v0.12 sender (request, wait for the ack, repeat) until `stop` or the connection ends;
/// reports each ack on `progress` and returns the events of the acked requests.
fn busy_sender(
    addr: std::net::SocketAddr,
    id: u64,
    stop: Arc<AtomicBool>,
    progress: mpsc::Sender<()>,
) -> Vec<Vec<u8>> {
    let mut stream = connect(addr);
    stream
        .set_read_timeout(Some(ACK_WAIT))
        .expect("read timeout");
    let mut acked = Vec::new();
    for i in 0.. {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let entries: Vec<Vec<u8>> = (0..3)
            .map(|_| entry_int(TS, &unique_record("crash")))
            .collect();
        let chunk = v012_chunk_id(id * 1_000_000 + i);
        let request = ack_request(&format!("acks.crash{id}"), &entries.concat(), &chunk);
        if stream.write_all(&request).is_err() {
            break;
        }
        let mut buf = [0u8; 1024];
        match stream.read(&mut buf) {
            Ok(n) if n > 0 => {
                assert_eq!(hex(&buf[..n]), hex(&expected_ack(&chunk)), "sender {id}");
                acked.extend(entries);
                let _ = progress.send(());
            }
            // Killed: this request is not acked, so the sender would resend it.
            _ => break,
        }
    }
    acked
}

#[test]
fn sigkill_under_load_loses_nothing_that_was_acked() {
    // Invariant 7 at a random instant: four senders and the dispatcher are all busy when the
    // process is killed. Whatever a sender got an ack for is delivered, before the kill or
    // from the spool after the restart (duplicates are allowed, loss is not).
    let agg = Aggregator::start();
    let mut gate = Ackgate::start(agg.addr());
    let stop = Arc::new(AtomicBool::new(false));
    let (progress_tx, progress_rx) = mpsc::channel();
    let senders: Vec<_> = (0..4)
        .map(|id| {
            let (addr, stop, progress) = (gate.addr(), stop.clone(), progress_tx.clone());
            std::thread::spawn(move || busy_sender(addr, id, stop, progress))
        })
        .collect();
    for _ in 0..200 {
        progress_rx
            .recv_timeout(ACK_WAIT)
            .expect("senders stalled before the kill");
    }
    gate.kill9();
    stop.store(true, Ordering::Relaxed);
    let acked: Vec<Vec<u8>> = senders
        .into_iter()
        .flat_map(|s| s.join().expect("sender panicked"))
        .collect();
    assert!(acked.len() >= 600, "only {} events acked", acked.len());
    gate.restart();
    agg.wait_for_all(&acked, Duration::from_secs(20));
}
