//! Interop with the real client libraries (PROTOCOL.md §6.3, §7; DESIGN.md invariants 1, 6).
//!
//! Each test runs one client library as a child process against a real `ackgate` that relays
//! to a real acking aggregator, and asserts that every event the client wrote reached the
//! aggregator byte for byte (as a multiset of raw `[time, record]` entries) and that the client
//! saw its acks:
//!
//! - `@fluent-org/logger` (npm), ack mode: 2000 events in hundreds of pipelined chunks, acks
//!   matched by id; with the shared-key handshake; over TLS.
//! - `fluent-logger` (PyPI), the synchronous `FluentSender`: plain and `nanosecond_precision`
//!   (EventTime). It has no ack option, so `emit()` returning True and ackgate writing nothing
//!   back is what it can check.
//! - fluent-logger-golang (Debian's package) with `RequestAck`: one blocking ack per message.
//!
//! A recording proxy between client and ackgate keeps the client's bytes, the reference for
//! "byte-exact", and ackgate's replies (HELO, PONG, acks). Over TLS those bytes are encrypted:
//! there the client reports what it sent and the aggregator's events are compared by content.
//! A runtime or library that is missing skips its test with the reason, except under `CI`.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::Command;
use std::time::{Duration, Instant};

use ackgate::forward::value::entry_to_json;
use ackgate::forward::Mode;
use support::*;

/// How long a client run may take (it prints and exits well before).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(180);
/// How long the aggregator may take to receive everything once the client is done.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(60);

/// What a proxied run recorded, decoded.
struct Recorded {
    conns: Vec<(ConnRecord, ClientStream, ServerStream)>,
}

impl Recorded {
    fn collect(proxy: &RecordingProxy) -> Recorded {
        let conns = proxy
            .wait_clients_done(Duration::from_secs(30))
            .into_iter()
            .map(|conn| {
                let client = decode_client_stream(&conn.up);
                let server = decode_server_stream(&conn.down);
                (conn, client, server)
            })
            .collect();
        Recorded { conns }
    }

    fn requests(&self) -> impl Iterator<Item = &ClientRequest> {
        self.conns.iter().flat_map(|(_, c, _)| c.requests.iter())
    }

    fn entries(&self) -> Vec<Vec<u8>> {
        self.requests().flat_map(|r| r.entries.clone()).collect()
    }

    fn acks(&self) -> impl Iterator<Item = &String> {
        self.conns
            .iter()
            .flat_map(|(_, _, s)| s.acks.iter().map(|(id, _)| id))
    }

    /// Every request carried a distinct chunk id, and each connection was sent exactly one ack
    /// per chunk id it wrote (ackgate acks in request order per connection). Returns the number
    /// of chunks.
    fn assert_every_chunk_acked_once(&self, what: &str) -> usize {
        let mut ids = HashSet::new();
        for (i, (_, client, server)) in self.conns.iter().enumerate() {
            let written: Vec<&str> = client
                .requests
                .iter()
                .map(|r| {
                    r.chunk
                        .as_deref()
                        .unwrap_or_else(|| panic!("{what}: a request without a chunk option"))
                })
                .collect();
            for id in &written {
                assert!(ids.insert(id.to_string()), "{what}: chunk id {id:?} reused");
            }
            let acked: Vec<&str> = server.acks.iter().map(|(id, _)| id.as_str()).collect();
            assert_eq!(
                acked, written,
                "{what}: connection {i}: acks are not the chunk ids in request order"
            );
        }
        ids.len()
    }

    fn max_in_flight(&self) -> usize {
        self.conns
            .iter()
            .map(|(conn, client, server)| max_in_flight(conn, client, server))
            .max()
            .unwrap_or(0)
    }
}

/// The `seq` of every entry; asserts each of 0..count appears exactly once.
fn assert_seqs_once(entries: &[Vec<u8>], count: u64, what: &str) {
    let mut seen: BTreeMap<u64, usize> = BTreeMap::new();
    for entry in entries {
        let json = entry_to_json(entry)
            .unwrap_or_else(|e| panic!("{what}: entry {} does not decode: {e}", hex(entry)));
        let seq = json["record"]["seq"]
            .as_u64()
            .unwrap_or_else(|| panic!("{what}: entry without seq: {json}"));
        *seen.entry(seq).or_insert(0) += 1;
    }
    let wrong: Vec<(u64, usize)> = (0..count)
        .map(|s| (s, seen.get(&s).copied().unwrap_or(0)))
        .filter(|&(_, n)| n != 1)
        .take(5)
        .collect();
    assert!(
        wrong.is_empty() && seen.len() as u64 == count,
        "{what}: {} distinct seqs for {count} events; first wrong (seq, times): {wrong:?}",
        seen.len()
    );
}

/// Time kind of a raw `[time, record]` entry: `"eventtime"` (fixext8 type 0) or `"int"`.
fn time_kind(entry: &[u8]) -> &'static str {
    match entry.get(1..3) {
        Some([0xd7, 0x00]) => "eventtime",
        Some([m, _]) if *m <= 0x7f || (0xcc..=0xd3).contains(m) => "int",
        _ => "other",
    }
}

/// Wait until the aggregator holds as many events as the client wrote, then compare them
/// byte for byte with the client's entries; no decoding errors upstream.
fn assert_delivered_byte_exact(agg: &Aggregator, sent: &[Vec<u8>], what: &str) -> Duration {
    let started = Instant::now();
    let got = agg.wait_for_events(sent.len(), DELIVERY_TIMEOUT);
    let waited = started.elapsed();
    assert_same_events(sent, &got, what);
    assert!(
        agg.errors().is_empty(),
        "{what}: aggregator saw {:?}",
        agg.errors()
    );
    waited
}

/// `node tests/interop/node_logger.js` sending `count` events to 127.0.0.1:`port`.
fn node_command(tool: &Tool, port: u16, count: u64, extra: &[&str]) -> Command {
    let Tool::Node { .. } = tool else {
        panic!("not node: {tool:?}")
    };
    let mut command = Command::new("node");
    command
        .arg(interop_dir().join("node_logger.js"))
        .args(["--host", "127.0.0.1"])
        .args(["--port", &port.to_string()])
        .args(["--count", &count.to_string()])
        .args(extra)
        .current_dir(interop_dir());
    command
}

// ------------------------------------------------------------------------------------------------
// @fluent-org/logger

#[test]
fn node_ack_mode_pipelines_many_chunks() {
    const EVENTS: u64 = 2000;
    let Some(node) = tool_or_skip("node_ack_mode_pipelines_many_chunks", node_tool()) else {
        return;
    };
    let agg = Aggregator::start();
    let gate = Ackgate::start(agg.addr());
    let proxy = RecordingProxy::start(gate.addr());

    // 4 events per event-loop turn: one PackedForward chunk each, ~500 chunks, none awaited
    // before the next is written.
    let command = node_command(
        &node,
        proxy.addr().port(),
        EVENTS,
        &["--tag", "interop.node.ack", "--batch", "4", "--event-time"],
    );
    let run = run_client("node", command, CLIENT_TIMEOUT);
    run.assert_success("node ack mode");
    assert_eq!(
        run.count("acked"),
        EVENTS,
        "every emit promise resolved by its ack"
    );
    assert_eq!(run.count("failed"), 0);

    let rec = Recorded::collect(&proxy);
    assert!(
        rec.requests().all(|r| r.mode == Mode::PackedForward),
        "the client's default mode is PackedForward"
    );
    let chunks = rec.assert_every_chunk_acked_once("node ack mode");
    let in_flight = rec.max_in_flight();
    let sent = rec.entries();
    assert_eq!(sent.len() as u64, EVENTS);
    assert!(sent.iter().all(|e| time_kind(e) == "eventtime"));
    assert_seqs_once(&sent, EVENTS, "node ack mode");
    assert!(
        chunks >= 100,
        "expected hundreds of chunks from 4-event batches, got {chunks}"
    );
    assert!(
        in_flight >= 2,
        "the client pipelines: more than one chunk should be unacked at once (max {in_flight})"
    );
    let waited = assert_delivered_byte_exact(&agg, &sent, "node ack mode");
    eprintln!(
        "[node ack] {EVENTS} events in {chunks} chunks over {} connection(s), max {in_flight} \
         chunks in flight, client {:?}, upstream complete {:?} after the client",
        rec.conns.len(),
        run.elapsed,
        waited
    );
}

#[test]
fn node_shared_key_handshake() {
    const EVENTS: u64 = 300;
    let Some(node) = tool_or_skip("node_shared_key_handshake", node_tool()) else {
        return;
    };
    let agg = Aggregator::start();
    let gate = Ackgate::builder()
        .node("agg", agg.addr())
        .section(
            "ingress",
            r#"security = { self_hostname = "ackgate-interop", shared_key = "interop-secret" }"#,
        )
        .start();
    let proxy = RecordingProxy::start(gate.addr());

    let command = node_command(
        &node,
        proxy.addr().port(),
        EVENTS,
        &[
            "--tag",
            "interop.node.key",
            "--batch",
            "3",
            "--shared-key",
            "interop-secret",
            "--client-hostname",
            "node-interop",
        ],
    );
    let run = run_client("node", command, CLIENT_TIMEOUT);
    run.assert_success("node shared key");
    assert_eq!(run.count("acked"), EVENTS);

    let rec = Recorded::collect(&proxy);
    for (i, (_, client, server)) in rec.conns.iter().enumerate() {
        let helo = server
            .helo
            .as_ref()
            .unwrap_or_else(|| panic!("connection {i}: ackgate sent no HELO"));
        assert!(!helo.nonce.is_empty());
        let ping = client
            .ping
            .as_ref()
            .unwrap_or_else(|| panic!("connection {i}: the client sent no PING"));
        assert_eq!(ping.hostname, b"node-interop");
        let pong = server
            .pong
            .as_ref()
            .unwrap_or_else(|| panic!("connection {i}: ackgate sent no PONG"));
        assert!(
            pong.auth_result,
            "PONG refused: {:?}",
            String::from_utf8_lossy(&pong.reason)
        );
        assert_eq!(pong.server_hostname, b"ackgate-interop");
    }
    let chunks = rec.assert_every_chunk_acked_once("node shared key");
    let sent = rec.entries();
    assert_eq!(sent.len() as u64, EVENTS);
    assert_seqs_once(&sent, EVENTS, "node shared key");
    let waited = assert_delivered_byte_exact(&agg, &sent, "node shared key");
    eprintln!(
        "[node shared key] {EVENTS} events in {chunks} chunks, client {:?}, upstream +{waited:?}",
        run.elapsed
    );
}

#[test]
fn node_tls() {
    const EVENTS: u64 = 300;
    let Some(node) = tool_or_skip("node_tls", node_tool()) else {
        return;
    };
    let pki = Pki::generate("ackgate interop test CA");
    let agg = Aggregator::start();
    let gate = Ackgate::builder()
        .node("agg", agg.addr())
        .section(
            "ingress",
            &format!(
                "tls = {{ cert = {:?}, key = {:?} }}",
                pki.server_cert.to_string_lossy(),
                pki.server_key.to_string_lossy()
            ),
        )
        .start();
    let report = pki.dir().join("sent.jsonl");

    // No proxy: the bytes are encrypted. The client reports what it emitted instead.
    let (ca, report_arg) = (&pki.ca, report.to_string_lossy().into_owned());
    let command = node_command(
        &node,
        gate.addr().port(),
        EVENTS,
        &[
            "--tag",
            "interop.node.tls",
            "--batch",
            "3",
            "--tls-servername",
            "localhost",
            "--tls-ca",
            &ca.to_string_lossy(),
            "--report",
            &report_arg,
        ],
    );
    let run = run_client("node", command, CLIENT_TIMEOUT);
    run.assert_success("node TLS");
    assert_eq!(run.count("acked"), EVENTS, "every chunk acked over TLS");

    let expected: HashMap<u64, serde_json::Value> = std::fs::read_to_string(&report)
        .expect("node report")
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).expect("report line");
            (v["record"]["seq"].as_u64().expect("seq"), v)
        })
        .collect();
    assert_eq!(expected.len() as u64, EVENTS);

    let started = Instant::now();
    let got = agg.wait_for_events(EVENTS as usize, DELIVERY_TIMEOUT);
    let waited = started.elapsed();
    assert_eq!(got.len() as u64, EVENTS, "no duplicates upstream");
    assert_seqs_once(&got, EVENTS, "node TLS");
    for entry in &got {
        let json = entry_to_json(entry).expect("entry decodes");
        let seq = json["record"]["seq"].as_u64().expect("seq");
        assert_eq!(
            json, expected[&seq],
            "event seq {seq}: aggregator's event differs from what the client emitted"
        );
        assert_eq!(time_kind(entry), "int");
    }
    assert!(agg.errors().is_empty(), "aggregator saw {:?}", agg.errors());
    eprintln!(
        "[node tls] {EVENTS} events, client {:?}, upstream +{waited:?}",
        run.elapsed
    );
}

// ------------------------------------------------------------------------------------------------
// fluent-logger (PyPI)

fn python_run(test: &str, nanosecond: bool) {
    const EVENTS: u64 = 500;
    let Some(_python) = tool_or_skip(test, python_tool()) else {
        return;
    };
    let agg = Aggregator::start();
    let gate = Ackgate::start(agg.addr());
    let proxy = RecordingProxy::start(gate.addr());

    let mut command = Command::new("python3");
    command
        .arg(interop_dir().join("python_logger.py"))
        .args(["--host", "127.0.0.1", "--tag", "interop.python"])
        .args(["--port", &proxy.addr().port().to_string()])
        .args(["--count", &EVENTS.to_string()])
        .current_dir(interop_dir());
    if nanosecond {
        command.arg("--nanosecond");
    }
    let run = run_client("python", command, CLIENT_TIMEOUT);
    run.assert_success(test);
    assert_eq!(run.count("ok"), EVENTS, "every emit() returned True");

    let rec = Recorded::collect(&proxy);
    assert!(
        rec.requests()
            .all(|r| r.mode == Mode::Message && r.chunk.is_none() && r.entries.len() == 1),
        "the sync sender writes one Message-mode request per emit, without a chunk"
    );
    assert_eq!(
        rec.acks().count(),
        0,
        "ackgate must not answer requests that asked for no ack"
    );
    assert!(
        rec.conns.iter().all(|(c, _, _)| c.down.is_empty()),
        "ackgate wrote bytes to a client that asked for nothing"
    );
    let sent = rec.entries();
    assert_eq!(sent.len() as u64, EVENTS);
    let kind = if nanosecond { "eventtime" } else { "int" };
    assert!(
        sent.iter().all(|e| time_kind(e) == kind),
        "{test}: every time should be {kind}"
    );
    assert_seqs_once(&sent, EVENTS, test);
    let waited = assert_delivered_byte_exact(&agg, &sent, test);
    eprintln!(
        "[{test}] {EVENTS} events, {kind} times, client {:?}, upstream +{waited:?}",
        run.elapsed
    );
}

#[test]
fn python_sync_sender_plain() {
    python_run("python_sync_sender_plain", false);
}

#[test]
fn python_sync_sender_nanosecond_precision() {
    python_run("python_sync_sender_nanosecond_precision", true);
}

// ------------------------------------------------------------------------------------------------
// fluent-logger-golang

fn go_run(test: &str, subsecond: bool) {
    const EVENTS: u64 = 300;
    let Some(Tool::Go { binary, .. }) = tool_or_skip(test, go_tool()) else {
        return;
    };
    let agg = Aggregator::start();
    let gate = Ackgate::start(agg.addr());
    let proxy = RecordingProxy::start(gate.addr());

    let mut command = Command::new(&binary);
    command
        .args(["-host", "127.0.0.1", "-tag", "interop.go"])
        .args(["-port", &proxy.addr().port().to_string()])
        .args(["-count", &EVENTS.to_string()]);
    if subsecond {
        command.arg("-subsecond");
    }
    let run = run_client("go", command, CLIENT_TIMEOUT);
    run.assert_success(test);
    assert_eq!(
        run.count("acked"),
        EVENTS,
        "every Post returned after its ack"
    );

    let rec = Recorded::collect(&proxy);
    assert_eq!(
        rec.requests().count() as u64,
        EVENTS,
        "one request per Post and no resends (MaxRetry 1: a wrong ack would be an error)"
    );
    assert!(rec
        .requests()
        .all(|r| r.mode == Mode::Message && r.entries.len() == 1));
    let chunks = rec.assert_every_chunk_acked_once(test);
    assert_eq!(chunks as u64, EVENTS);
    assert_eq!(rec.max_in_flight(), 1, "the Go client waits for each ack");
    let sent = rec.entries();
    let kind = if subsecond { "eventtime" } else { "int" };
    assert!(
        sent.iter().all(|e| time_kind(e) == kind),
        "{test}: times should be {kind}"
    );
    assert_seqs_once(&sent, EVENTS, test);
    let waited = assert_delivered_byte_exact(&agg, &sent, test);
    eprintln!(
        "[{test}] {EVENTS} events, one blocking ack each, client {:?}, upstream +{waited:?}",
        run.elapsed
    );
}

#[test]
fn go_request_ack() {
    go_run("go_request_ack", false);
}

#[test]
fn go_request_ack_subsecond_precision() {
    go_run("go_request_ack_subsecond_precision", true);
}
