//! The shared-key handshake (PROTOCOL.md §7), both sides of ackgate.
//!
//! Ingress (`[ingress.security]`): a sender written from the spec reads fluentd's HELO layout,
//! proves the key with a PING whose digest Python's hashlib computed (not ackgate's code), and
//! gets fluentd's PONG (its digest checked with Python too) and then its ack; the events reach
//! the aggregator. A wrong key gets fluentd's failure PONG and a closed connection; a legacy
//! sender that knows no handshake is closed with a log line saying so; user auth accepts the
//! right password and refuses a wrong one. Nothing of a refused connection is spooled.
//!
//! Upstream (`[upstream.security]`): ackgate B handshakes with ackgate A's secured ingress;
//! a wrong key or a self_hostname equal to A's is logged clearly and the records stay in B's
//! spool (DESIGN.md invariant 2).

mod support;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use support::*;

const HOSTNAME: &str = "ackgate-test";
const KEY: &str = "k3y";
const WAIT: Duration = Duration::from_secs(15);

fn secured_gate(agg: &Aggregator, extra: &str) -> Ackgate {
    Ackgate::builder()
        .node("agg", agg.addr())
        .section(
            "ingress",
            &format!("[security]\nself_hostname = \"{HOSTNAME}\"\nshared_key = \"{KEY}\"\n{extra}"),
        )
        .start()
}

/// Python's SHA-512, or `None` after printing why the test is skipped.
fn py_sha512(parts: &[&[u8]]) -> Option<String> {
    let digest = python_sha512_hex(&parts.concat());
    if digest.is_none() {
        skip(
            "handshake",
            "python3 is not installed; the digests must be checked independently",
        );
    }
    digest
}

/// Connect and read the HELO, asserting fluentd's layout.
fn connect_and_read_helo(gate: &Ackgate, user_auth: bool) -> (TcpStream, HeloSeen) {
    let mut stream = connect(gate.addr());
    let helo = read_values(&mut stream, 1, WAIT).remove(0);
    let seen = parse_helo(&helo);
    assert_eq!(
        seen.keys,
        ["nonce", "auth", "keepalive"],
        "HELO options in fluentd's order: {}",
        hex(&helo)
    );
    assert_eq!(seen.nonce_marker, 0xc4, "nonce is bin like fluentd's");
    assert_eq!(seen.nonce.len(), 16, "nonce is 16 random bytes");
    assert_eq!(seen.auth_marker, 0xc4, "auth salt is bin like fluentd's");
    if user_auth {
        assert_eq!(seen.auth.len(), 16, "user auth needs a 16-byte salt");
    }
    assert_eq!(seen.keepalive, Some(true), "keepalive: true");
    (stream, seen)
}

/// A PING made with `key`, its digest computed by Python.
fn python_ping(
    seen: &HeloSeen,
    salt: &[u8],
    key: &str,
    user: Option<(&str, &str)>,
) -> Option<Vec<u8>> {
    let digest = py_sha512(&[salt, b"sender.example", &seen.nonce, key.as_bytes()])?;
    let (username, pass_digest) = match user {
        Some((name, password)) => (
            name,
            py_sha512(&[&seen.auth, name.as_bytes(), password.as_bytes()])?,
        ),
        // fluentd sends sha512_hex(auth + "" + "") when it does not use user auth.
        None => ("", py_sha512(&[&seen.auth, b"", b""])?),
    };
    Some(encode_ping(
        "sender.example",
        salt,
        &digest,
        username,
        &pass_digest,
    ))
}

/// The expected successful PONG, its digest computed by Python.
fn python_pong(seen: &HeloSeen, salt: &[u8]) -> Option<Vec<u8>> {
    let digest = py_sha512(&[salt, HOSTNAME.as_bytes(), &seen.nonce, KEY.as_bytes()])?;
    let mut pong = vec![0x95];
    mp_str(&mut pong, b"PONG");
    pong.push(0xc3);
    mp_str(&mut pong, b"");
    mp_str(&mut pong, HOSTNAME.as_bytes());
    mp_str(&mut pong, digest.as_bytes());
    Some(pong)
}

/// fluentd's failure PONG: `["PONG", false, reason, "", ""]`.
fn failure_pong(reason: &str) -> Vec<u8> {
    let mut pong = vec![0x95];
    mp_str(&mut pong, b"PONG");
    pong.push(0xc2);
    mp_str(&mut pong, reason.as_bytes());
    mp_str(&mut pong, b"");
    mp_str(&mut pong, b"");
    pong
}

/// Send one acked request over a handshaken connection (sha2 digests) and return its events.
fn send_secured(gate: &Ackgate, tag: &str, n: u64) -> Vec<Vec<u8>> {
    let mut stream = connect(gate.addr());
    client_handshake(&mut stream, "good.sender", KEY, WAIT);
    let entries: Vec<Vec<u8>> = (0..n).map(|_| entry_int(TS, &unique_record(tag))).collect();
    let chunk = v012_chunk_id(n);
    stream
        .write_all(&ack_request(tag, &entries.concat(), &chunk))
        .expect("write request");
    let ack = read_values(&mut stream, 1, WAIT).remove(0);
    assert_eq!(
        hex(&ack),
        hex(&expected_ack(&chunk)),
        "ack after the handshake"
    );
    entries
}

/// After a refused connection: a good request sent afterwards arrives, and it is the only thing
/// that does (records go upstream in key order, so anything spooled from the refused
/// connection would have arrived first).
fn assert_only_good_traffic_arrives(gate: &Ackgate, agg: &Aggregator) {
    let good = send_secured(gate, "handshake.good", 2);
    agg.wait_for_all(&good, WAIT);
    assert_same_events(&good, &agg.events(), "only the good sender's events");
}

#[test]
fn sender_with_the_shared_key_gets_pong_then_ack_and_events_flow() {
    let agg = Aggregator::start();
    let gate = secured_gate(&agg, "");
    let (mut stream, seen) = connect_and_read_helo(&gate, false);
    let salt = b"50cffeb2cbd5988be86489e3d4232a05";
    let Some(ping) = python_ping(&seen, salt, KEY, None) else {
        return;
    };
    let Some(expected_pong) = python_pong(&seen, salt) else {
        return;
    };
    let entries: Vec<Vec<u8>> = (0..3)
        .map(|_| entry_eventtime(TS, 5, &unique_record("secured")))
        .collect();
    let chunk = v012_chunk_id(1);
    // PING and the request in one write, as a pipelining sender may do.
    let mut bytes = ping;
    bytes.extend(ack_request("handshake.ok", &entries.concat(), &chunk));
    stream.write_all(&bytes).expect("write PING + request");
    let answers = read_values(&mut stream, 2, WAIT);
    assert_eq!(
        hex(&answers[0]),
        hex(&expected_pong),
        "PONG must be [\"PONG\", true, \"\", \"{HOSTNAME}\", sha512_hex(salt + hostname + nonce + key)]"
    );
    assert_eq!(
        hex(&answers[1]),
        hex(&expected_ack(&chunk)),
        "ack after the PONG"
    );
    agg.wait_for_all(&entries, WAIT);
    assert_same_events(&entries, &agg.events(), "events behind the handshake");
}

#[test]
fn wrong_shared_key_gets_failure_pong_and_close() {
    let agg = Aggregator::start();
    let gate = secured_gate(&agg, "");
    let (mut stream, seen) = connect_and_read_helo(&gate, false);
    let local = stream.local_addr().expect("local addr");
    let Some(ping) = python_ping(
        &seen,
        b"0123456789abcdef0123456789abcdef",
        "not-the-key",
        None,
    ) else {
        return;
    };
    let entries = entry_int(TS, &unique_record("wrong-key"));
    let mut bytes = ping;
    bytes.extend(ack_request(
        "handshake.wrongkey",
        &entries,
        &v012_chunk_id(2),
    ));
    stream.write_all(&bytes).expect("write");
    let answer = expect_closed(&mut stream, WAIT);
    assert!(
        answer.starts_with(&failure_pong("shared_key mismatch")),
        "expected fluentd's failure PONG and nothing else, got {}",
        hex(&answer)
    );
    let line = gate.wait_for_log_since(
        0,
        &["shared-key handshake failed", &format!("peer={local}")],
        WAIT,
    );
    assert!(
        line.contains("shared_key mismatch"),
        "reason not logged: {line}"
    );
    assert_only_good_traffic_arrives(&gate, &agg);
}

#[test]
fn legacy_sender_on_a_secured_port_is_closed_and_told_why_in_the_log() {
    let agg = Aggregator::start();
    let gate = secured_gate(&agg, "");
    // fluentd v0.10 never reads the HELO: it writes its chunk in four writes and closes.
    let mut stream = connect(gate.addr());
    let local = stream.local_addr().expect("local addr");
    let entries = entry_int(TS, &unique_record("legacy"));
    write_parts(
        &mut stream,
        &legacy_request_parts("handshake.legacy", &entries),
    );
    let answer = expect_closed(&mut stream, WAIT);
    assert!(
        !answer.windows(4).any(|w| w == b"\xa3ack"),
        "a legacy sender on a secured port got an ack: {}",
        hex(&answer)
    );
    let line = gate.wait_for_log_since(
        0,
        &["shared-key handshake failed", &format!("peer={local}")],
        WAIT,
    );
    assert!(
        line.contains("first message is not a valid PING"),
        "the log must say the handshake was skipped: {line}"
    );
    assert_only_good_traffic_arrives(&gate, &agg);
}

#[test]
fn json_sender_on_a_secured_port_is_closed_and_named_json_in_the_log() {
    let agg = Aggregator::start();
    let gate = Ackgate::builder()
        .node("agg", agg.addr())
        .section(
            "ingress",
            &format!("[security]\nself_hostname = \"{HOSTNAME}\"\nshared_key = \"{KEY}\"\n"),
        )
        .metrics()
        .start();
    let mut stream = connect(gate.addr());
    let local = stream.local_addr().expect("local addr");
    stream
        .write_all(br#"["handshake.json", 1700000000, {"msg": "json"}, {"chunk": "abc"}]"#)
        .expect("write");
    let answer = expect_closed(&mut stream, WAIT);
    assert!(
        !answer.windows(3).any(|w| w == b"ack"),
        "a JSON sender on a secured port got an ack: {}",
        hex(&answer)
    );
    let line = gate.wait_for_log_since(
        0,
        &["shared-key handshake failed", &format!("peer={local}")],
        WAIT,
    );
    assert!(
        line.contains("JSON request on a port that requires the shared-key handshake"),
        "the log must name JSON, not a bad PING: {line}"
    );
    let (_, text) = http(metrics_addr(&gate), "GET", "/metrics");
    assert_eq!(
        metric_exact(&text, "ackgate_rejected_connections_total{reason=\"json\"}"),
        Some(1.0),
        "counted as a JSON refusal"
    );
    assert_only_good_traffic_arrives(&gate, &agg);
}

#[test]
fn user_auth_accepts_the_right_password_and_refuses_a_wrong_one() {
    let agg = Aggregator::start();
    let gate = secured_gate(
        &agg,
        "user_auth = true\n[[security.users]]\nusername = \"alice\"\npassword = \"wonderland\"\n",
    );
    let salt = b"fedcba9876543210fedcba9876543210";

    let (mut stream, seen) = connect_and_read_helo(&gate, true);
    let Some(ping) = python_ping(&seen, salt, KEY, Some(("alice", "wonderland"))) else {
        return;
    };
    let Some(expected_pong) = python_pong(&seen, salt) else {
        return;
    };
    let entries = entry_int(TS, &unique_record("alice"));
    let chunk = v012_chunk_id(3);
    let mut bytes = ping;
    bytes.extend(ack_request("handshake.user", &entries, &chunk));
    stream.write_all(&bytes).expect("write");
    let answers = read_values(&mut stream, 2, WAIT);
    assert_eq!(hex(&answers[0]), hex(&expected_pong), "PONG for alice");
    assert_eq!(
        hex(&answers[1]),
        hex(&expected_ack(&chunk)),
        "ack for alice"
    );
    agg.wait_for_all(std::slice::from_ref(&entries), WAIT);

    let (mut stream, seen) = connect_and_read_helo(&gate, true);
    let local = stream.local_addr().expect("local addr");
    let Some(ping) = python_ping(&seen, salt, KEY, Some(("alice", "looking-glass"))) else {
        return;
    };
    stream.write_all(&ping).expect("write");
    let answer = expect_closed(&mut stream, WAIT);
    assert_eq!(
        hex(&answer),
        hex(&failure_pong("username/password mismatch")),
        "a wrong password gets fluentd's failure PONG, then the close"
    );
    gate.wait_for_log_since(
        0,
        &[
            "shared-key handshake failed",
            "username/password mismatch",
            &format!("peer={local}"),
        ],
        WAIT,
    );
}

// ------------------------------------------------------------------------------------------------
// Upstream: ackgate B → ackgate A (secured)

/// Ackgate A: secured ingress, forwarding to `agg`.
fn relay_a(agg: &Aggregator) -> Ackgate {
    Ackgate::builder()
        .node("agg", agg.addr())
        .section(
            "ingress",
            "[security]\nself_hostname = \"ackgate-a\"\nshared_key = \"k3y\"\n",
        )
        .start()
}

/// Ackgate B: plain ingress, one node (A) with the given handshake settings.
fn relay_b(a: SocketAddr, self_hostname: &str, key: &str) -> Ackgate {
    Ackgate::builder()
        .section(
            "upstream",
            &format!(
                "[security]\nself_hostname = \"{self_hostname}\"\n{}",
                node_toml("relay-a", a, &format!("shared_key = \"{key}\""))
            ),
        )
        .start()
}

/// One acked v0.12 request to a plain port.
fn send_plain(gate: &Ackgate, tag: &str) -> Vec<u8> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(100);
    let entries = entry_int(TS, &unique_record(tag));
    let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    send_acked(gate.addr(), tag, &entries, id, WAIT);
    entries
}

/// Stop B and read its spool: the record is still there.
fn assert_still_spooled(b: Ackgate) {
    assert_records_left(b, 1, "the undelivered record must stay in B's spool");
}

#[test]
fn relay_handshakes_with_a_secured_relay_and_events_flow() {
    let agg = Aggregator::start();
    let a = relay_a(&agg);
    let b = relay_b(a.addr(), "ackgate-b", KEY);
    let events: Vec<Vec<u8>> = (0..5).map(|_| send_plain(&b, "chain.ok")).collect();
    agg.wait_for_all(&events, WAIT);
    assert_same_event_set(&events, &agg.events(), "B → A → aggregator");
    assert!(
        a.log_lines_with(&["shared-key handshake failed"])
            .is_empty(),
        "A refused B"
    );
}

#[test]
fn relay_with_a_wrong_key_logs_the_refusal_and_keeps_its_records() {
    let agg = Aggregator::start();
    let a = relay_a(&agg);
    let b = relay_b(a.addr(), "ackgate-b", "wrong-k3y");
    send_plain(&b, "chain.wrongkey");
    let line = b.wait_for_log("upstream node unreachable", WAIT);
    assert!(
        line.contains("shared-key handshake failed") && line.contains("shared_key mismatch"),
        "B must say the handshake failed and why: {line}"
    );
    a.wait_for_log("shared_key mismatch", WAIT);
    assert_eq!(agg.event_count(), 0, "nothing may pass a failed handshake");
    assert_still_spooled(b);
}

#[test]
fn relay_with_the_aggregators_own_hostname_is_a_clear_error() {
    let agg = Aggregator::start();
    let a = relay_a(&agg);
    let b = relay_b(a.addr(), "ackgate-a", KEY);
    let started = Instant::now();
    send_plain(&b, "chain.samehost");
    let line = b.wait_for_log("upstream node unreachable", WAIT);
    assert!(
        line.contains("same hostname"),
        "B must name the misconfiguration (same self_hostname as the node): {line}"
    );
    eprintln!("refused after {:?}", started.elapsed());
    assert_eq!(agg.event_count(), 0, "nothing may pass a refused PONG");
    assert_still_spooled(b);
}
