//! Per-node compatibility rewrites (DESIGN.md invariant 6 and its one opt-in exception).
//!
//! fluent-bit ≥ 5.0.5 sends v1.5 entries `[[EventTime, {}], record]`, which fluentd ≤ 1.19
//! cannot read (captures/README.md, "Time"). A node with `strip_empty_metadata = true` gets
//! `[EventTime, record]` (exactly `0x92` + the sender's EventTime bytes + its record bytes); a
//! node without it gets the capture's entries byte for byte. A node with `compress = "gzip"`
//! gets CompressedPackedForward (`compressed: "gzip"`) whose inflated entries are the original.

mod support;

use std::io::{Read, Write};
use std::time::Duration;

use ackgate::forward::entries::Compression;
use ackgate::forward::Mode;

use support::*;

const WAIT: Duration = Duration::from_secs(15);
const FLUENT_BIT: &str = "fluent-bit-5.1.1-out_forward-ack.sender.bin";

/// The fluent-bit capture, taken apart by walking its bytes (not by ackgate's rewrite).
struct Capture {
    /// The request as fluent-bit wrote it.
    bytes: Vec<u8>,
    /// Its entries, `[[EventTime, {}], record]` each.
    original: Vec<Vec<u8>>,
    /// The same entries as `[EventTime, record]`.
    stripped: Vec<Vec<u8>>,
    /// The ack fluent-bit expects: `{"ack": <its chunk value>}`.
    ack: Vec<u8>,
}

fn fluent_bit_capture() -> Capture {
    let bytes = read_capture(FLUENT_BIT);
    let request = array_elements(&bytes);
    assert_eq!(request.len(), 3, "[tag, entries, option]");
    let mut original = Vec::new();
    let mut stripped = Vec::new();
    for entry in array_elements(request[1]) {
        let parts = array_elements(entry);
        let time_meta = array_elements(parts[0]);
        assert_eq!(time_meta.len(), 2, "[EventTime, metadata]");
        assert_eq!(time_meta[0].len(), 10, "fixext8 EventTime");
        assert_eq!(time_meta[0][..2], [0xd7, 0x00]);
        assert_eq!(time_meta[1], [0xdf, 0, 0, 0, 0], "empty map32 metadata");
        let mut plain = vec![0x92];
        plain.extend_from_slice(time_meta[0]);
        plain.extend_from_slice(parts[1]);
        original.push(entry.to_vec());
        stripped.push(plain);
    }
    assert_eq!(original.len(), 4, "the capture holds 4 events");
    let chunk = map_entries(request[2])
        .into_iter()
        .find(|(k, _)| k == b"chunk")
        .map(|(_, v)| v.to_vec())
        .expect("chunk option");
    let mut ack = vec![0x81, 0xa3, b'a', b'c', b'k'];
    ack.extend_from_slice(&chunk);
    Capture {
        bytes,
        original,
        stripped,
        ack,
    }
}

fn gate_for(agg: std::net::SocketAddr, node_extra: &str) -> Ackgate {
    Ackgate::builder()
        .section("upstream", &node_toml("agg", agg, node_extra))
        .start()
}

fn send_capture(gate: &Ackgate, bytes: &[u8], ack: &[u8]) {
    let mut stream = connect(gate.addr());
    stream.write_all(bytes).expect("write capture");
    assert_eq!(
        hex(&read_one_ack(&mut stream, WAIT)),
        hex(ack),
        "fluent-bit's ack: its own chunk value echoed"
    );
}

#[test]
fn empty_metadata_is_stripped_only_for_the_node_that_asks() {
    let Capture {
        bytes,
        original,
        stripped,
        ack,
    } = fluent_bit_capture();

    let agg_strip = Aggregator::start();
    let gate_strip = gate_for(agg_strip.addr(), "strip_empty_metadata = true");
    let agg_plain = Aggregator::start();
    let gate_plain = gate_for(agg_plain.addr(), "");
    send_capture(&gate_strip, &bytes, &ack);
    send_capture(&gate_plain, &bytes, &ack);

    let got = agg_strip.wait_for_events(4, WAIT);
    assert_same_events(&stripped, &got, "strip_empty_metadata = true");
    for e in &got {
        assert_eq!(e[0], 0x92, "[time, record]");
        assert_eq!(
            e[1..3],
            [0xd7, 0x00],
            "the sender's EventTime right after the header"
        );
    }
    let got = agg_plain.wait_for_events(4, WAIT);
    assert_same_events(&original, &got, "no rewrite by default");
    let concatenated: Vec<u8> = original.concat();
    assert_eq!(
        hex(&agg_plain.requests()[0].entries),
        hex(&concatenated),
        "default node: the capture's entries byte for byte, in order"
    );
}

#[test]
fn gzip_node_gets_compressed_packed_forward_that_inflates_to_the_original() {
    let agg = Aggregator::start();
    let gate = gate_for(agg.addr(), "compress = \"gzip\"");
    let entries: Vec<Vec<u8>> = (0..20)
        .map(|i| entry_eventtime(TS + i, i, &unique_record("gzip")))
        .collect();
    send_acked(gate.addr(), "compat.gzip", &entries.concat(), 1, WAIT);

    let requests = agg.wait_until("one acked request", WAIT, |r| r.iter().any(|r| r.acked));
    let request = requests.iter().find(|r| r.acked).expect("acked request");
    assert_eq!(
        request.mode,
        Mode::CompressedPackedForward(Compression::Gzip)
    );
    let elements = array_elements(&request.raw);
    assert_eq!(elements.len(), 3, "[tag, payload, option]");
    assert_eq!(byte_content(elements[0]), Some(&b"compat.gzip"[..]));
    let payload = byte_content(elements[1]).expect("payload is str/bin");
    assert_eq!(payload[..2], [0x1f, 0x8b], "gzip magic");
    assert_eq!(
        request.option("compressed").as_deref(),
        Some(&b"\xa4gzip"[..]),
        "option compressed: \"gzip\""
    );
    assert_eq!(
        request.option("size").as_deref(),
        Some(&[20u8][..]),
        "size: 20"
    );
    let mut inflated = Vec::new();
    flate2::read::MultiGzDecoder::new(payload)
        .read_to_end(&mut inflated)
        .expect("valid gzip");
    assert_eq!(
        hex(&inflated),
        hex(&entries.concat()),
        "inflated entries = the sender's entries"
    );
}
