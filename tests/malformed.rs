//! Invalid input (DESIGN.md invariant 4): the connection that sent it is closed, the reason is
//! logged with its peer address, nothing of it reaches the spool or the aggregator, and every
//! other connection goes on undisturbed.

mod support;

use std::io::Write;
use std::sync::mpsc;
use std::time::Duration;

use support::*;

const GOOD_REQUESTS: u64 = 60;

/// A well-behaved v0.12 ack sender on one connection; returns its events once all are acked.
fn good_sender(
    addr: std::net::SocketAddr,
    started: mpsc::Sender<()>,
    go_on: mpsc::Receiver<()>,
) -> Vec<Vec<u8>> {
    let mut stream = connect(addr);
    let mut events = Vec::new();
    for i in 0..GOOD_REQUESTS {
        let entries = unique_entries("good", 2);
        let tag = "malformed.good";
        send_acked_on(
            &mut stream,
            tag,
            &entries.concat(),
            i,
            Duration::from_secs(10),
        );
        events.extend(entries);
        if i == GOOD_REQUESTS / 2 {
            // Halfway: let the bad connections do their damage, then finish.
            let _ = started.send(());
            go_on
                .recv_timeout(Duration::from_secs(30))
                .expect("main thread never let the good sender finish");
        }
    }
    events
}

#[test]
fn bad_connections_are_closed_and_logged_while_good_ones_go_on() {
    let agg = Aggregator::start();
    let gate = Ackgate::start(agg.addr());

    let (started_tx, started_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel();
    let addr = gate.addr();
    let good = std::thread::spawn(move || good_sender(addr, started_tx, go_rx));
    started_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("good sender did not get going");

    // A frame whose second entry's record is a str, not a map; the first entry is fine, so a
    // relay that spooled "what it could" would leak it.
    let mut bad_entries = entry_int(TS, &unique_record("bad-entry"));
    bad_entries.extend_from_slice(&[0x92, 0xce, 0, 0, 0, 1, 0xa3, b'x', b'y', b'z']);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        // 0xc1 is reserved: never valid msgpack.
        ("garbage", vec![0xc1, 0xc1, 0x00, 0x01]),
        // A map where a request array must be.
        ("not an array", {
            let mut b = vec![0x82];
            mp_str(&mut b, b"tag");
            mp_str(&mut b, b"malformed.notarray");
            mp_str(&mut b, b"record");
            b.extend(unique_record("not-array"));
            b
        }),
        (
            "bad entry",
            ack_request("malformed.badentry", &bad_entries, &v012_chunk_id(999)),
        ),
    ];

    for (name, bytes) in &cases {
        let mut stream = connect(gate.addr());
        let local = stream.local_addr().expect("local addr");
        stream.write_all(bytes).expect("write bad bytes");
        let answer = expect_closed(&mut stream, Duration::from_secs(10));
        assert!(
            answer.is_empty(),
            "{name}: the bad connection got an answer (an ack?): {}",
            hex(&answer)
        );
        let line = gate.wait_for_log_since(
            0,
            &[
                "closing connection: invalid request; nothing of it was spooled",
                &format!("peer={local}"),
            ],
            Duration::from_secs(10),
        );
        assert!(line.contains("WARN"), "{name}: not a warning: {line}");
        let reason = line
            .split("reason=")
            .nth(1)
            .unwrap_or_else(|| panic!("{name}: no reason in {line}"));
        assert!(reason.trim().len() > 3, "{name}: empty reason in {line}");
    }

    go_tx.send(()).expect("good sender gone");
    let expected = good.join().expect("good sender panicked");
    // Records are sent in key order: once the good sender's last request (committed after
    // every rejection) arrived, anything spooled from the bad connections would have too.
    agg.wait_for_all(&expected, Duration::from_secs(20));
    assert_same_events(&expected, &agg.events(), "good sender");
    let tags: std::collections::BTreeSet<String> = agg
        .requests()
        .iter()
        .map(|r| String::from_utf8_lossy(&r.tag).into_owned())
        .collect();
    assert_eq!(
        tags.into_iter().collect::<Vec<_>>(),
        vec!["malformed.good".to_string()],
        "something from a rejected connection reached the aggregator"
    );
}

#[test]
fn requests_before_the_bad_one_on_the_same_connection_are_kept() {
    // ingress.rs: "requests before it on the same connection are still committed and acked".
    let agg = Aggregator::start();
    let gate = Ackgate::start(agg.addr());
    let good = entry_int(TS, &unique_record("before-bad"));
    let chunk = v012_chunk_id(4242);
    let mut bytes = ack_request("malformed.before", &good, &chunk);
    bytes.extend_from_slice(&[0xc1]);
    let mut stream = connect(gate.addr());
    stream.write_all(&bytes).expect("write");
    let answer = expect_closed(&mut stream, Duration::from_secs(10));
    assert_eq!(
        hex(&answer),
        hex(&expected_ack(&chunk)),
        "the good request before the garbage must be acked, and nothing else sent"
    );
    agg.wait_for_all(std::slice::from_ref(&good), Duration::from_secs(10));
    assert_same_events(&[good], &agg.events(), "request before the garbage");
}
