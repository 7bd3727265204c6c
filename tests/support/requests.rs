//! What senders write, byte for byte: records and `[time, record]` entries in the time forms
//! fluentd and fluent-bit use, Forward requests in the layouts of fluentd v0.10 and v0.12 (with
//! `require_ack_response`), their chunk ids and the acks a receiver answers them with.

use std::sync::atomic::{AtomicU64, Ordering};

use ackgate::forward::ack::encode_ack;
use ackgate::forward::entries::entry_len;

use super::msgpack::{mp_map_header, mp_raw, mp_str, mp_str32, mp_uint, DEPTH};

/// A fixed, plausible timestamp for test events (2023-11-14).
pub const TS: u32 = 1_700_000_000;

/// `{"seq": seq, "msg": msg}` as fluentd would pack it.
pub fn record(seq: u64, msg: &str) -> Vec<u8> {
    let mut out = Vec::new();
    mp_map_header(&mut out, 2);
    mp_str(&mut out, b"seq");
    mp_uint(&mut out, seq);
    mp_str(&mut out, b"msg");
    mp_str(&mut out, msg.as_bytes());
    out
}

/// A record no other test or process produces: `{"seq": <process-unique>, "msg": "<label> <n>"}`.
pub fn unique_record(label: &str) -> Vec<u8> {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let seq = NEXT.fetch_add(1, Ordering::Relaxed);
    record(seq, &format!("{label} {seq}"))
}

/// `n` fresh events `[TS, unique_record(label)]`.
pub fn unique_entries(label: &str, n: u64) -> Vec<Vec<u8>> {
    (0..n)
        .map(|_| entry_int(TS, &unique_record(label)))
        .collect()
}

/// `[uint32 seconds, record]`: what v0.10/v0.12 write.
pub fn entry_int(ts: u32, record: &[u8]) -> Vec<u8> {
    let mut out = vec![0x92, 0xce];
    out.extend_from_slice(&ts.to_be_bytes());
    out.extend_from_slice(record);
    out
}

/// `[EventTime(fixext8), record]`: what fluentd v1 and fluent-bit write.
pub fn entry_eventtime(sec: u32, nsec: u32, record: &[u8]) -> Vec<u8> {
    let mut out = vec![0x92];
    out.extend_from_slice(&event_time(sec, nsec));
    out.extend_from_slice(record);
    out
}

/// EventTime as fixext8: `d7 00 <sec u32 BE> <nsec u32 BE>`.
pub fn event_time(sec: u32, nsec: u32) -> Vec<u8> {
    let mut out = vec![0xd7, 0x00];
    out.extend_from_slice(&sec.to_be_bytes());
    out.extend_from_slice(&nsec.to_be_bytes());
    out
}

/// EventTime as ext8: `c7 08 00 <sec> <nsec>`.
pub fn event_time_ext8(sec: u32, nsec: u32) -> Vec<u8> {
    let mut out = vec![0xc7, 0x08, 0x00];
    out.extend_from_slice(&sec.to_be_bytes());
    out.extend_from_slice(&nsec.to_be_bytes());
    out
}

/// One `[uint32 time, {"msg": "xxx…"}]` entry of exactly `len` bytes (len ≥ 48).
pub fn entry_of_len(len: usize, fill: u8) -> Vec<u8> {
    // 0x92, ce + 4, 0x81, a3 "msg", then a str header of 2 (str8) or 3 (str16) bytes.
    let fixed = 1 + 5 + 1 + 4;
    assert!(len >= fixed + 2 + 32, "entry_of_len({len}) too small");
    let body = len - fixed;
    let (header, n) = if body - 2 < 256 {
        (2, body - 2)
    } else {
        (3, body - 3)
    };
    let mut out = vec![0x92, 0xce];
    out.extend_from_slice(&TS.to_be_bytes());
    out.push(0x81);
    mp_str(&mut out, b"msg");
    let before = out.len();
    mp_str(&mut out, &vec![fill; n]);
    assert_eq!(out.len() - before, header + n);
    assert_eq!(out.len(), len, "entry_of_len arithmetic");
    out
}

/// Split concatenated `[time, record]` entries into individual raw entries.
pub fn split_entries(entries: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut pos = 0;
    let mut index = 0u32;
    while pos < entries.len() {
        let len = entry_len(&entries[pos..], index, DEPTH)
            .unwrap_or_else(|e| panic!("upstream entries do not split at {pos}: {e}"));
        out.push(entries[pos..pos + len].to_vec());
        pos += len;
        index += 1;
    }
    out
}

/// fluentd v0.10 layout: `92 <tag> db <u32 len> <entries>`, no option.
pub fn legacy_request(tag: &str, entries: &[u8]) -> Vec<u8> {
    legacy_request_parts(tag, entries).concat()
}

/// The same bytes in the four writes fluentd v0.10 makes: header, tag, str32 length, body.
pub fn legacy_request_parts(tag: &str, entries: &[u8]) -> Vec<Vec<u8>> {
    let mut tag_bytes = Vec::new();
    mp_raw(&mut tag_bytes, tag.as_bytes());
    let mut len = vec![0xdb];
    len.extend_from_slice(&(entries.len() as u32).to_be_bytes());
    vec![vec![0x92], tag_bytes, len, entries.to_vec()]
}

/// What fluent-logger-golang (docker's fluentd log driver) writes without `RequestAck`: each
/// event as a Message-mode request `[tag, time, record, nil]` (its msgp tuple `Message` with a
/// nil `Option`), the pending ones back to back in one write. `entries` are `[time, record]`
/// entries; their time and record bytes are copied as they are.
pub fn message_requests<'a>(tag: &str, entries: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for entry in entries {
        assert_eq!(entry.first(), Some(&0x92), "an entry is a 2-array");
        out.push(0x94);
        mp_str(&mut out, tag.as_bytes());
        out.extend_from_slice(&entry[1..]);
        out.push(0xc0);
    }
    out
}

/// fluentd v0.12 with `require_ack_response`: `93 <tag> db <len> <entries> {"chunk": str}`.
pub fn ack_request(tag: &str, entries: &[u8], chunk: &str) -> Vec<u8> {
    let mut out = vec![0x93];
    mp_raw(&mut out, tag.as_bytes());
    mp_str32(&mut out, entries);
    out.push(0x81);
    mp_raw(&mut out, b"chunk");
    mp_raw(&mut out, chunk.as_bytes());
    out
}

/// The ack fluentd would send for a str chunk id: `81 a3 "ack" <str chunk>`.
pub fn expected_ack(chunk: &str) -> Vec<u8> {
    let mut value = Vec::new();
    mp_raw(&mut value, chunk.as_bytes());
    ack_for_value(&value)
}

/// The ack for a chunk option given as its raw msgpack value: `81 a3 "ack" <value>`.
pub fn ack_for_value(chunk_value: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_ack(chunk_value, &mut out);
    out
}

/// A v0.12-style chunk id: Base64 of 16 bytes plus "\n" (25 bytes).
pub fn v012_chunk_id(n: u64) -> String {
    use base64::Engine as _;
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&n.to_be_bytes());
    id[8..].copy_from_slice(&std::process::id().to_be_bytes().repeat(2));
    format!("{}\n", base64::engine::general_purpose::STANDARD.encode(id))
}

/// A fresh 16-byte chunk id as Base64 (what @fluent-org/logger and fluent-bit send).
pub fn random_chunk_id() -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(uuid::Uuid::new_v4().as_bytes())
}
