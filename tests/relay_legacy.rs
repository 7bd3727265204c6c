//! The core promise for fluentd v0.10 senders (DESIGN.md invariants 6 and 7, PROTOCOL.md §9.1):
//! one connection per chunk, `92 <tag> db <len> <entries>` written in four separate writes, no
//! option, no read, close right after the last write. Every event must reach the aggregator
//! byte for byte, exactly once, inside ackgate's own PackedForward with a 24-char chunk id.

mod support;

use std::time::Duration;

use base64::Engine as _;
use support::*;

const CHUNKS: usize = 200;
const EVENTS_PER_CHUNK: usize = 5;

#[test]
fn v010_chunks_on_fresh_connections_arrive_byte_identical() {
    let agg = Aggregator::start();
    let gate = Ackgate::start(agg.addr());

    let mut expected = Vec::new();
    for chunk in 0..CHUNKS {
        let mut entries = Vec::new();
        for _ in 0..EVENTS_PER_CHUNK {
            // Mixed tags, as one v0.10 process flushes one buffer chunk per tag.
            let entry = entry_int(TS + chunk as u32, &unique_record("legacy"));
            entries.extend_from_slice(&entry);
            expected.push(entry);
        }
        let tag = format!("legacy.app{}", chunk % 3);
        let mut stream = connect(gate.addr());
        write_parts(&mut stream, &legacy_request_parts(&tag, &entries));
        // v0.10 closes right after writing, never reading.
        drop(stream);
    }

    agg.wait_for_all(&expected, Duration::from_secs(20));
    let got = agg.events();
    assert_same_events(&expected, &got, "v0.10 relay");

    let requests = agg.requests();
    for r in &requests {
        let id = r
            .chunk
            .as_deref()
            .unwrap_or_else(|| panic!("upstream request without a chunk id: {r:?}"));
        assert_eq!(id.len(), 24, "chunk id {id:?} is not 24 base64 chars");
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(id)
            .unwrap_or_else(|e| panic!("chunk id {id:?} is not base64: {e}"));
        assert_eq!(decoded.len(), 16, "chunk id {id:?} does not carry 16 bytes");
        assert_eq!(
            r.array_marker(),
            0x93,
            "upstream request is not a 3-element array"
        );
        assert_eq!(r.entries_marker(), 0xdb, "upstream entries are not str32");
        assert_eq!(
            r.size(),
            Some(r.events as i64),
            "size option does not count the request's events"
        );
        let tag = String::from_utf8_lossy(&r.tag);
        assert!(tag.starts_with("legacy.app"), "unexpected tag {tag:?}");
    }
    // Healthy aggregator: every chunk id is sent once.
    let counts = agg.chunk_id_counts();
    assert!(
        counts.values().all(|&n| n == 1),
        "a chunk id was sent more than once to a healthy aggregator: {counts:?}"
    );
    assert!(
        agg.errors().is_empty(),
        "aggregator errors: {:?}",
        agg.errors()
    );
    assert!(
        gate.log_lines_with(&["WARN"]).is_empty(),
        "clean legacy traffic produced warnings: {:?}",
        gate.log_lines_with(&["WARN"])
    );
}
