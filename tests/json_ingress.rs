//! fluentd's JSON variant of in_forward (PROTOCOL.md §2.1, §13.13): a connection whose first
//! byte is `[` speaks JSON for its whole life and is answered in JSON.
//!
//! The hand-built JSON request of the captures gets exactly the bytes fluentd 1.18 answered
//! (`{"ack":"j1"}`, captures/fluentd-1.18-in_forward-json.reply.bin) and nothing more; its event
//! reaches the aggregator as msgpack. Forward mode with several events works, with acks in
//! request order. JSON cannot be authenticated, so a secured port refuses it, whether it comes
//! instead of the PING or after a valid handshake, and nothing of it is spooled.

mod support;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use support::*;

const WAIT: Duration = Duration::from_secs(15);

fn capture(name: &str) -> Vec<u8> {
    let path = captures_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (set ACKGATE_CAPTURES to the captures directory)",
            path.display()
        )
    })
}

/// Read exactly `n` bytes, with a deadline.
fn read_exactly(stream: &mut TcpStream, n: usize) -> Vec<u8> {
    let deadline = Instant::now() + WAIT;
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while got.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "only {:?} within {WAIT:?}",
            String::from_utf8_lossy(&got)
        );
        stream.set_read_timeout(Some(left)).expect("timeout");
        match stream.read(&mut buf[..n - got.len()]) {
            Ok(0) => panic!("closed after {:?}", String::from_utf8_lossy(&got)),
            Ok(k) => got.extend_from_slice(&buf[..k]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("read failed after {:?}: {e}", String::from_utf8_lossy(&got)),
        }
    }
    got
}

/// `{key: int}` as msgpack (fixmap of fixstr → positive fixint).
fn map_of_ints(pairs: &[(&str, u8)]) -> Vec<u8> {
    let mut out = Vec::new();
    mp_map_header(&mut out, pairs.len());
    for (k, v) in pairs {
        mp_str(&mut out, k.as_bytes());
        out.push(*v);
    }
    out
}

#[test]
fn json_client_gets_fluentds_exact_json_ack_and_the_event_arrives_as_msgpack() {
    let request = capture("client-json.request.bin");
    let reply = capture("fluentd-1.18-in_forward-json.reply.bin");
    assert_eq!(reply, b"{\"ack\":\"j1\"}", "capture changed?");
    let agg = Aggregator::start();
    let gate = Ackgate::start(agg.addr());

    let mut stream = connect(gate.addr());
    stream.write_all(&request).expect("write JSON request");
    assert_eq!(
        String::from_utf8_lossy(&read_exactly(&mut stream, reply.len())),
        String::from_utf8_lossy(&reply),
        "the JSON ack must be fluentd's bytes"
    );
    // Nothing after the ack: half-close, and the rest of the stream is empty.
    stream.shutdown(Shutdown::Write).expect("half-close");
    let rest = expect_closed(&mut stream, WAIT);
    assert!(rest.is_empty(), "bytes after the JSON ack: {}", hex(&rest));

    // ["t",1700000000,{"a":1}] as msgpack: [uint32 time, {"a": 1}].
    let expected = entry_int(1_700_000_000, &map_of_ints(&[("a", 1)]));
    let got = agg.wait_for_events(1, WAIT);
    assert_same_events(&[expected], &got, "JSON event upstream");
    let requests = agg.requests();
    assert_eq!(requests[0].tag, b"t", "tag");
    assert!(
        agg.errors().is_empty(),
        "aggregator saw bad bytes: {:?}",
        agg.errors()
    );
}

#[test]
fn json_forward_mode_with_several_events_is_acked_in_order() {
    let agg = Aggregator::start();
    let gate = Ackgate::start(agg.addr());
    let requests = concat!(
        r#"["json.fwd",[[1700000001,{"k":1}],[1700000002,{"k":2,"n":3}],[1700000003,{"z":9}]],{"chunk":"f1"}]"#,
        "\n",
        r#"["json.fwd",[[1700000004,{"k":4}]],{"chunk":"f2"}]"#
    );
    let mut stream = connect(gate.addr());
    stream.write_all(requests.as_bytes()).expect("write");
    let acks = br#"{"ack":"f1"}{"ack":"f2"}"#;
    assert_eq!(
        String::from_utf8_lossy(&read_exactly(&mut stream, acks.len())),
        String::from_utf8_lossy(acks),
        "one JSON ack per request, in request order"
    );
    let expected = vec![
        entry_int(1_700_000_001, &map_of_ints(&[("k", 1)])),
        entry_int(1_700_000_002, &map_of_ints(&[("k", 2), ("n", 3)])),
        entry_int(1_700_000_003, &map_of_ints(&[("z", 9)])),
        entry_int(1_700_000_004, &map_of_ints(&[("k", 4)])),
    ];
    agg.wait_for_all(&expected, WAIT);
    assert_same_events(&expected, &agg.events(), "JSON Forward-mode events");
}

fn secured_gate(agg: &Aggregator) -> Ackgate {
    Ackgate::builder()
        .node("agg", agg.addr())
        .section(
            "ingress",
            "[security]\nself_hostname = \"ackgate-json\"\nshared_key = \"k3y\"\n",
        )
        .start()
}

#[test]
fn json_on_a_secured_port_is_refused_and_not_spooled() {
    let agg = Aggregator::start();
    let gate = secured_gate(&agg);
    let json = capture("client-json.request.bin");

    // A JSON client that ignores the HELO.
    let mut stream = connect(gate.addr());
    let local = stream.local_addr().expect("local addr");
    stream.write_all(&json).expect("write");
    let answer = expect_closed(&mut stream, WAIT);
    assert!(
        !answer.windows(5).any(|w| w == b"\"ack\""),
        "JSON client acked on a secured port: {:?}",
        String::from_utf8_lossy(&answer)
    );
    gate.wait_for_log_since(0, &["closing connection", &format!("peer={local}")], WAIT);

    // A client that handshakes, then switches to JSON.
    let mut stream = connect(gate.addr());
    let local = stream.local_addr().expect("local addr");
    client_handshake(&mut stream, "json.sender", "k3y", WAIT);
    stream.write_all(&json).expect("write");
    let answer = expect_closed(&mut stream, WAIT);
    assert!(
        answer.is_empty(),
        "answer to JSON after the handshake: {}",
        hex(&answer)
    );
    let line = gate.wait_for_log_since(0, &["JSON", &format!("peer={local}")], WAIT);
    assert!(line.contains("WARN"), "not a warning: {line}");

    // Nothing of either reached the spool: a later good request is all that arrives.
    let mut stream = connect(gate.addr());
    client_handshake(&mut stream, "good.sender", "k3y", WAIT);
    let entries = entry_int(TS, &unique_record("json-secured-good"));
    let chunk = v012_chunk_id(1);
    stream
        .write_all(&ack_request("json.good", &entries, &chunk))
        .expect("write");
    assert_eq!(read_values(&mut stream, 1, WAIT)[0], expected_ack(&chunk));
    agg.wait_for_all(std::slice::from_ref(&entries), WAIT);
    assert_same_events(&[entries], &agg.events(), "only the msgpack request");
}
