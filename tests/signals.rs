//! Forward protocol v1.5 `fluent_signal` (PROTOCOL.md §3.1, §4, §12): metrics (1) and traces
//! (2) pass through ackgate unchanged, through the real binary, a real redb spool and a real
//! aggregator socket.
//!
//! fluent-bit sends them as `[tag, bin(payload), {"fluent_signal": n, ...}]`, the payload being
//! one or more cmetrics / ctraces contexts (msgpack maps), gzip-compressed when asked. ackgate
//! stores the (inflated) payload with its signal, acks after the commit, and sends it upstream
//! as `[tag, bin(payload), {"chunk": id, "fluent_signal": n}]`: the payload byte for byte, no
//! `size` (it counts events, and these are contexts), never merged with another request
//! (fluent-bit decodes one context stream per request), and the signal survives a SIGKILL.

mod support;

use std::io::Write;
use std::time::Duration;

use ackgate::forward::entries::deflate_gzip;
use ackgate::forward::value::json_to_msgpack;
use base64::Engine as _;
use serde_json::json;

use support::*;

const WAIT: Duration = Duration::from_secs(20);

/// A cmetrics-shaped context (the layout of fluent-bit's cmt_encode_msgpack; the values are
/// ours). ackgate never decodes it: any msgpack map would do, this one is realistic.
fn cmetrics_context(name: &str, value: f64) -> Vec<u8> {
    let context = json!({
        "meta": {"cmetrics": {}, "external": {}, "processing": {"static_labels": []}},
        "metrics": [{
            "meta": {
                "ver": 2, "type": 0,
                "opts": {"ns": "fluentbit", "ss": "input", "name": name, "desc": "Bytes in."},
                "labels": ["name"], "aggregation_type": 2
            },
            "values": [{"ts": 1_700_000_000_123_456_789u64, "value": value, "labels": [0], "hash": 77}]
        }]
    });
    let mut out = Vec::new();
    json_to_msgpack(&context, false, &mut out);
    out
}

/// A ctraces-shaped context: one resource span.
fn ctraces_context(span: &str) -> Vec<u8> {
    let context = json!({
        "resourceSpans": [{
            "resource": {"attributes": {"service.name": "checkout"}},
            "scopeSpans": [{"spans": [{"name": span, "kind": 2, "startTimeUnixNano": 1u64, "endTimeUnixNano": 2u64}]}]
        }]
    });
    let mut out = Vec::new();
    json_to_msgpack(&context, false, &mut out);
    out
}

/// fluent-bit's out_forward layout for a signal: `[tag, bin(payload), {options}]`.
fn signal_request(tag: &str, payload: &[u8], signal: u64, chunk: &str, gzip: bool) -> Vec<u8> {
    let mut out = vec![0x93];
    mp_str(&mut out, tag.as_bytes());
    let sent = if gzip {
        deflate_gzip(payload)
    } else {
        payload.to_vec()
    };
    mp_bin(&mut out, &sent);
    mp_map_header(&mut out, if gzip { 3 } else { 2 });
    mp_str(&mut out, b"chunk");
    mp_str(&mut out, chunk.as_bytes());
    mp_str(&mut out, b"fluent_signal");
    mp_uint(&mut out, signal);
    if gzip {
        mp_str(&mut out, b"compressed");
        mp_str(&mut out, b"gzip");
    }
    out
}

/// The ack for a chunk packed with `mp_str` (fluent-bit echoes the value's bytes).
fn ack_for(chunk: &str) -> Vec<u8> {
    let mut value = Vec::new();
    mp_str(&mut value, chunk.as_bytes());
    let mut out = Vec::new();
    ackgate::forward::ack::encode_ack(&value, &mut out);
    out
}

fn gate_for(agg: &Aggregator, node_extra: &str) -> Ackgate {
    Ackgate::builder()
        .section("upstream", &node_toml("agg", agg.addr(), node_extra))
        .start()
}

/// Send one signal request on a new connection and check its ack (after ackgate's commit).
fn send_acked(gate: &Ackgate, tag: &str, payload: &[u8], signal: u64, chunk_seq: u64) {
    let chunk = v012_chunk_id(chunk_seq);
    let mut stream = connect(gate.addr());
    stream
        .write_all(&signal_request(tag, payload, signal, &chunk, false))
        .expect("write");
    assert_eq!(hex(&read_one_ack(&mut stream, WAIT)), hex(&ack_for(&chunk)));
}

/// The first request the aggregator acked (waits for it).
fn first_acked(agg: &Aggregator, what: &str) -> Request {
    let got = agg.wait_until(what, WAIT, |r| r.iter().any(|r| r.acked));
    got.into_iter().find(|r| r.acked).expect("acked")
}

fn signal_of(request: &Request) -> Option<Vec<u8>> {
    request.option("fluent_signal")
}

/// The upstream request's payload element, checked to be a bin (0xc4–0xc6), and its content.
fn bin_payload(request: &Request) -> Vec<u8> {
    let elements = array_elements(&request.raw);
    assert_eq!(elements.len(), 3, "[tag, payload, option]");
    assert!(
        (0xc4..=0xc6).contains(&elements[1][0]),
        "metrics/traces payload goes out as bin, got marker 0x{:02x}",
        elements[1][0]
    );
    byte_content(elements[1]).expect("bin").to_vec()
}

#[test]
fn metrics_and_traces_pass_through_unchanged_and_apart_from_logs() {
    let agg = Aggregator::start();
    let gate = gate_for(&agg, "");

    // Two contexts in one metrics request, a second metrics request with the same tag, a
    // gzip-compressed traces request, and logs with the same tag: pipelined on one connection,
    // so they reach the spool in one group commit (where same-tag logs would be merged).
    let metrics_a = [
        cmetrics_context("bytes_total", 1234.0),
        cmetrics_context("records_total", 7.0),
    ]
    .concat();
    let metrics_b = cmetrics_context("bytes_total", 2048.5);
    let traces = [ctraces_context("GET /cart"), ctraces_context("POST /pay")].concat();
    let log_entries: Vec<Vec<u8>> = (0..3)
        .map(|i| entry_int(TS + i, &unique_record("signals.logs")))
        .collect();
    let chunks: Vec<String> = (1..=4).map(v012_chunk_id).collect();
    let requests = [
        signal_request("fb.metrics", &metrics_a, 1, &chunks[0], false),
        signal_request("fb.metrics", &metrics_b, 1, &chunks[1], false),
        signal_request("fb.traces", &traces, 2, &chunks[2], true),
        ack_request("fb.metrics", &log_entries.concat(), &chunks[3]),
    ];
    let mut stream = connect(gate.addr());
    stream
        .write_all(&requests.concat())
        .expect("write requests");
    let acks = read_values(&mut stream, 4, WAIT);
    let expected: Vec<Vec<u8>> = chunks.iter().map(|c| ack_for(c)).collect();
    assert_eq!(
        acks.iter().map(|a| hex(a)).collect::<Vec<_>>(),
        expected.iter().map(|a| hex(a)).collect::<Vec<_>>(),
        "every request acked, in order, with the sender's chunk value"
    );

    let got = agg.wait_until("4 acked requests", WAIT, |r| {
        r.iter().filter(|r| r.acked).count() >= 4
    });
    let with_signal = |code: u8| -> Vec<&Request> {
        got.iter()
            .filter(|r| signal_of(r).as_deref() == Some(&[code][..]))
            .collect()
    };

    let metrics = with_signal(1);
    assert_eq!(
        metrics.len(),
        2,
        "two metrics requests upstream, never merged: {got:?}"
    );
    let mut payloads: Vec<Vec<u8>> = metrics.iter().map(|r| bin_payload(r)).collect();
    payloads.sort_by_key(|p| p.len());
    assert_eq!(
        hex(&payloads[0]),
        hex(&metrics_b),
        "one-context payload byte for byte"
    );
    assert_eq!(
        hex(&payloads[1]),
        hex(&metrics_a),
        "two-context payload byte for byte"
    );
    for r in &metrics {
        assert_eq!(r.tag, b"fb.metrics");
        assert_eq!(r.option("size"), None, "no size option on a signal: {r:?}");
        assert_eq!(
            r.chunk.as_ref().map(|c| c.len()),
            Some(24),
            "ackgate's own chunk id"
        );
    }

    let traces_up = with_signal(2);
    assert_eq!(traces_up.len(), 1, "one traces request: {got:?}");
    assert_eq!(traces_up[0].tag, b"fb.traces");
    assert_eq!(
        hex(&bin_payload(traces_up[0])),
        hex(&traces),
        "traces inflated once at ingress, sent as they were before compression"
    );

    let logs: Vec<&Request> = got.iter().filter(|r| signal_of(r).is_none()).collect();
    assert_eq!(logs.len(), 1, "the logs went on their own: {got:?}");
    assert_eq!(logs[0].tag, b"fb.metrics");
    assert_eq!(
        array_elements(&logs[0].raw)[1][0],
        0xdb,
        "logs keep the str32 legacy layout"
    );
    assert_same_events(&log_entries, &split_entries(&logs[0].entries), "logs");
}

#[test]
fn a_spooled_signal_survives_sigkill_and_shows_in_spool_inspection() {
    let agg = Aggregator::start_with(Behaviour::NeverAck);
    let mut gate = Ackgate::builder()
        .section("upstream", &node_toml("agg", agg.addr(), ""))
        .section("upstream", "ack_timeout = \"30s\"")
        .start();
    let context = cmetrics_context("uptime", 42.0);
    send_acked(&gate, "fb.kill", &context, 1, 9);
    let first = agg.wait_until("the metrics request, unacked", WAIT, |r| !r.is_empty());
    let first_id = first[0].chunk.clone().expect("chunk id");

    gate.kill9();
    let list = spool_ok(gate.config_path(), &["list"]);
    let line = list
        .lines()
        .find(|l| l.contains("fb.kill"))
        .unwrap_or_else(|| panic!("record listed:\n{list}"));
    assert!(line.contains("metrics"), "signal column: {line}");
    let key = line.split_whitespace().next().expect("key");
    let shown = spool_ok(gate.config_path(), &["show", key]);
    let shown: serde_json::Value = serde_json::from_str(shown.trim()).expect("one JSON line");
    assert_eq!(shown["signal"], "metrics", "{shown}");
    assert_eq!(shown["tag"], "fb.kill", "{shown}");
    assert_eq!(
        shown["context_base64"],
        base64::engine::general_purpose::STANDARD.encode(&context),
        "the stored context byte for byte"
    );

    agg.set_behaviour(Behaviour::Ack);
    gate.restart();
    let resent = first_acked(&agg, "the metrics request, acked");
    assert_eq!(signal_of(&resent).as_deref(), Some(&[1u8][..]));
    assert_eq!(hex(&bin_payload(&resent)), hex(&context));
    assert_eq!(
        resent.chunk.as_ref(),
        Some(&first_id),
        "same chunk id after the restart (invariant 3)"
    );
}

#[test]
fn a_signal_ackgate_cannot_relay_closes_only_that_connection() {
    let agg = Aggregator::start();
    let gate = gate_for(&agg, "");
    let context = cmetrics_context("x", 1.0);
    let cases: [(&str, Vec<u8>, &str); 3] = [
        (
            "signal 3",
            signal_request("bad.signal", &context, 3, &v012_chunk_id(1), false),
            "fluent_signal 3 is not 0 (logs), 1 (metrics) or 2 (traces)",
        ),
        (
            "cut payload",
            signal_request(
                "bad.signal",
                &context[..context.len() - 3],
                1,
                &v012_chunk_id(2),
                false,
            ),
            "metrics payload is not a sequence of whole msgpack values",
        ),
        (
            "metrics as Forward-mode entries",
            {
                let entries = entry_int(TS, &unique_record("bad"));
                let mut out = vec![0x93];
                mp_str(&mut out, b"bad.signal");
                out.push(0x91);
                out.extend_from_slice(&entries);
                mp_map_header(&mut out, 1);
                mp_str(&mut out, b"fluent_signal");
                mp_uint(&mut out, 1);
                out
            },
            "fluent_signal 1 (metrics) needs a str/bin payload, not Forward mode",
        ),
    ];
    for (what, bytes, reason) in cases {
        let mark = gate.log_mark();
        let mut stream = connect(gate.addr());
        stream.write_all(&bytes).expect("write");
        let answered = expect_closed(&mut stream, WAIT);
        assert!(
            answered.is_empty(),
            "{what}: no ack, got {}",
            hex(&answered)
        );
        let line = gate.wait_for_log_since(mark, &["closing connection", reason], WAIT);
        assert!(
            line.contains("127.0.0.1:"),
            "{what}: peer address logged: {line}"
        );
    }
    // A good request on a new connection still goes through; nothing of the bad ones did.
    send_acked(&gate, "good.signal", &context, 1, 4);
    first_acked(&agg, "the good request");
    let got = agg.requests();
    assert!(
        got.iter().all(|r| r.tag == b"good.signal"),
        "only the good request reached the aggregator: {got:?}"
    );
}

#[test]
fn node_rewrites_never_touch_a_signal_payload_and_gzip_inflates_to_it() {
    let agg = Aggregator::start();
    let gate = gate_for(&agg, "strip_empty_metadata = true\ncompress = \"gzip\"");
    // A payload that contains the very bytes strip_empty_metadata rewrites in log entries
    // (`[[EventTime, {}], record]`): as a trace context it must stay as it is.
    let time_meta = [
        &[0x92, 0x92][..],
        &event_time(TS, 5),
        &[0x80],
        &[0x81, 0xa1, b'k', 0x01],
    ]
    .concat();
    let payload = [ctraces_context("GET /"), time_meta].concat();
    send_acked(&gate, "fb.rewrite", &payload, 2, 11);
    let request = first_acked(&agg, "the traces request");
    assert_eq!(signal_of(&request).as_deref(), Some(&[2u8][..]));
    assert_eq!(
        request.option("compressed").as_deref(),
        Some(&b"\xa4gzip"[..]),
        "the node's compression applies to signals too"
    );
    let sent = bin_payload(&request);
    assert_eq!(sent[..2], [0x1f, 0x8b], "gzip magic");
    let mut inflated = Vec::new();
    std::io::Read::read_to_end(
        &mut flate2::read::MultiGzDecoder::new(&sent[..]),
        &mut inflated,
    )
    .expect("valid gzip");
    assert_eq!(
        hex(&inflated),
        hex(&payload),
        "inflates to the payload byte for byte"
    );
}
