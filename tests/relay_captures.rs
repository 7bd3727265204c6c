//! What real senders wrote (shared/captures, see its README.md) goes through the real binary:
//! every `*.sender.bin` (fluentd v0.10 / v0.12 / v1.18, fluent-bit 5.1.1) and every hand-built
//! `client-*.request.bin` is written to ackgate on its own connection. The aggregator must
//! receive the very entries `FrameDecoder` finds in the file (DESIGN.md invariant 6), and a
//! request carrying `chunk` must be answered with exactly `81 a3 "ack"` + the raw chunk value;
//! where real fluentd 1.18 or fluent-bit replies were captured for that request, ackgate's
//! ack must equal each of them byte for byte (PROTOCOL.md §13.1, §13.2).
//!
//! Two exceptions: the JSON request (fluentd's JSON variant, PROTOCOL.md §2.1, §13.13) is
//! either accepted and answered exactly like fluentd 1.18 (`{"ack":"j1"}`), with its event
//! relayed as msgpack, or rejected (closed, logged with the peer and a reason, nothing spooled);
//! [`JSON_REQUESTS_ACCEPTED`] pins which. The `-secure` senders start with a handshake PING,
//! which is a later issue, so only the bytes after that PING are sent.
//!
//! The directory is `$ACKGATE_CAPTURES` if set, else `<crate>/../shared/captures`.

mod support;

use std::io::Write;
use std::time::Duration;

use ackgate::forward::msgpack::value_len;
use ackgate::forward::{Decoded, FrameDecoder, Limits};
use bytes::BytesMut;
use support::*;

/// Real receiver replies captured for a request file (the captures catalogue: [`ACK_REPLIES`]
/// and [`SECURE_ACK_REPLIES`]). For the `-secure` pairs the reply starts with HELO and PONG;
/// the ack is its last value.
fn real_replies(request: &str) -> Vec<&'static str> {
    let plain = ACK_REPLIES.iter().filter(|(_, req)| *req == request);
    let secure = SECURE_ACK_REPLIES.iter().filter(|(_, req)| *req == request);
    plain.chain(secure).map(|(reply, _)| *reply).collect()
}

/// The four hand-built chunk requests, whose real replies must match exactly.
const CLIENT_CHUNK_REQUESTS: usize = 4;

/// Whether ingress speaks fluentd's JSON variant (src/forward/json.rs) or refuses it. Flip to
/// `false` if JSON support is withdrawn: the test then demands the rejection instead.
const JSON_REQUESTS_ACCEPTED: bool = true;

/// `["t",1700000000,{"a":1},{"chunk":"j1"}]` relayed as msgpack: `[1700000000, {"a": 1}]`.
const JSON_EVENT: &[u8] = &[0x92, 0xce, 0x65, 0x53, 0xf1, 0x00, 0x81, 0xa1, b'a', 0x01];

/// Read exactly `n` bytes (however they are split across recvs) within `timeout`.
fn read_exactly(stream: &mut std::net::TcpStream, n: usize, timeout: Duration) -> Vec<u8> {
    stream.set_read_timeout(Some(timeout)).expect("timeout");
    let mut out = vec![0u8; n];
    std::io::Read::read_exact(stream, &mut out)
        .unwrap_or_else(|e| panic!("no {n}-byte answer within {timeout:?}: {e}"));
    out
}

/// Events and chunk values ackgate's own decoder finds in `bytes`.
fn decode_file(name: &str, bytes: &[u8]) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let mut decoder = FrameDecoder::new(Limits::default());
    let mut buf = BytesMut::from(bytes);
    let mut events = Vec::new();
    let mut chunks = Vec::new();
    while let Some(decoded) = decoder
        .decode(&mut buf)
        .unwrap_or_else(|e| panic!("{name}: FrameDecoder rejects the capture: {e}"))
    {
        if let Decoded::Frame(frame) = decoded {
            events.extend(split_entries(&frame.entries));
            if let Some(chunk) = frame.chunk {
                chunks.push(chunk.to_vec());
            }
        }
    }
    assert!(
        buf.is_empty(),
        "{name}: trailing bytes after the last request"
    );
    (events, chunks)
}

/// Every `*.sender.bin` and `client-*.request.bin` in the captures, sorted.
fn request_files() -> Vec<String> {
    let dir = captures_dir();
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("captures dir {}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            n.ends_with(".sender.bin") || (n.starts_with("client-") && n.ends_with(".request.bin"))
        })
        .collect();
    files.sort();
    assert!(
        files.len() >= 20,
        "expected the README's 20+ request files in {}, found {files:?}",
        dir.display()
    );
    files
}

/// The JSON request: answered exactly like fluentd 1.18 (its event is then returned, as
/// relayed), or refused and logged, as [`JSON_REQUESTS_ACCEPTED`] pins.
fn send_json_request(gate: &Ackgate, bytes: &[u8]) -> Option<Vec<u8>> {
    let name = "client-json.request.bin";
    let mut stream = connect(gate.addr());
    let local = stream.local_addr().expect("local addr");
    stream.write_all(bytes).expect("write json");
    if JSON_REQUESTS_ACCEPTED {
        let real = read_capture("fluentd-1.18-in_forward-json.reply.bin");
        let answer = read_exactly(&mut stream, real.len(), Duration::from_secs(10));
        assert_eq!(
            String::from_utf8_lossy(&answer),
            String::from_utf8_lossy(&real),
            "{name}: the JSON ack differs from fluentd 1.18's"
        );
        return Some(JSON_EVENT.to_vec());
    }
    let answer = expect_closed(&mut stream, Duration::from_secs(10));
    assert!(answer.is_empty(), "JSON request got an answer: {answer:?}");
    let line = gate.wait_for_log_since(
        0,
        &[
            "closing connection: invalid request; nothing of it was spooled",
            &format!("peer={local}"),
            "reason=",
        ],
        Duration::from_secs(10),
    );
    assert!(
        line.contains("WARN"),
        "rejection not logged as a warning: {line}"
    );
    None
}

/// Write capture `name` (after its handshake PING, if any) on its own connection and check
/// each ack: `81 a3 "ack"` + the raw chunk value, and the real receiver's reply where one was
/// captured. Returns the events ackgate's decoder finds in it, and how many acks were
/// compared with a real reply.
fn send_capture(gate: &Ackgate, name: &str, bytes: &[u8]) -> (Vec<Vec<u8>>, usize) {
    let payload = if name.contains("-secure") {
        // Handshake support is a later issue: skip the leading PING.
        let ping = value_len(bytes, DEPTH)
            .expect("msgpack")
            .expect("a whole PING");
        &bytes[ping..]
    } else {
        bytes
    };
    let (events, chunks) = decode_file(name, payload);
    let mut stream = connect(gate.addr());
    stream.write_all(payload).expect("write capture");
    let mut compared = 0;
    for chunk in &chunks {
        let ack = read_one_ack(&mut stream, Duration::from_secs(10));
        let want = [&[0x81, 0xa3, b'a', b'c', b'k'][..], chunk].concat();
        assert_eq!(
            ack, want,
            "{name}: ack is not 81 a3 'ack' + the raw chunk value"
        );
        for reply in real_replies(name) {
            let real = whole_values(&read_capture(reply)).pop().expect("a reply");
            assert_eq!(
                hex(&ack),
                hex(&real),
                "{name}: ackgate's ack differs from the real reply in {reply}"
            );
            compared += 1;
        }
    }
    (events, compared)
}

#[test]
fn every_captured_sender_is_relayed_and_acked_like_fluentd() {
    let files = request_files();
    let agg = Aggregator::start();
    let gate = Ackgate::start(agg.addr());
    let mut expected = Vec::new();
    let mut compared_with_real_reply = 0;
    let mut json_seen = false;
    for name in &files {
        let bytes = read_capture(name);
        if name == "client-json.request.bin" {
            json_seen = true;
            expected.extend(send_json_request(&gate, &bytes));
            continue;
        }
        let (events, compared) = send_capture(&gate, name, &bytes);
        expected.extend(events);
        compared_with_real_reply += compared;
    }
    assert!(
        json_seen,
        "client-json.request.bin is missing from the captures"
    );
    assert!(
        compared_with_real_reply >= CLIENT_CHUNK_REQUESTS,
        "only {compared_with_real_reply} acks were compared with real replies"
    );

    agg.wait_for_all(&expected, Duration::from_secs(20));
    assert_same_events(&expected, &agg.events(), "captured senders");
    let tags: Vec<String> = agg
        .requests()
        .iter()
        .map(|r| String::from_utf8_lossy(&r.tag).into_owned())
        .collect();
    assert_eq!(
        tags.iter().any(|t| t == "t"),
        JSON_REQUESTS_ACCEPTED,
        "the JSON request's event {} the aggregator",
        if JSON_REQUESTS_ACCEPTED {
            "did not reach"
        } else {
            "was rejected but reached"
        }
    );
    assert!(
        agg.errors().is_empty(),
        "aggregator errors: {:?}",
        agg.errors()
    );
}
