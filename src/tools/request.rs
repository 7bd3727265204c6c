//! The bytes of one outgoing request, pure: a modern PackedForward / Forward / Message request
//! with its `size` and `chunk` options (PROTOCOL.md §3, §4), and the pieces of the fluentd
//! v0.10 request (§3.2, §9.1). `send.rs` writes them; the tests pin them and decode them back
//! with ackgate's own frame decoder.

use super::input::Batch;
use super::send::SendMode;
use crate::forward::packed::{chunk_id_base64, put_array_header, put_raw, put_uint};

/// Encode one modern request. With `chunk`, the option carries it; Packed and Forward also
/// carry `size`, as fluentd v1 does (PROTOCOL.md §3.2, §4).
pub(super) fn encode_request(
    mode: SendMode,
    tag: &str,
    batch: &Batch,
    chunk: Option<&str>,
    out: &mut Vec<u8>,
) {
    out.reserve(batch.entries.len() + tag.len() + 64);
    match mode {
        SendMode::Packed | SendMode::Forward => {
            out.push(0x93);
            put_raw(out, tag.as_bytes());
            if mode == SendMode::Packed {
                // Entries stay under MAX_BATCH_BYTES + MAX_RECORD_BYTES (input.rs): the cast is exact.
                out.push(0xdb);
                out.extend_from_slice(&(batch.entries.len() as u32).to_be_bytes());
            } else {
                put_array_header(out, batch.events as usize);
            }
            out.extend_from_slice(&batch.entries);
            out.push(if chunk.is_some() { 0x82 } else { 0x81 });
            if let Some(id) = chunk {
                put_raw(out, b"chunk");
                put_raw(out, id.as_bytes());
            }
            put_raw(out, b"size");
            put_uint(out, batch.events as u64);
        }
        SendMode::Message => {
            // The batch holds one entry: 0x92, time, record. Its array header is replaced.
            out.push(if chunk.is_some() { 0x94 } else { 0x93 });
            put_raw(out, tag.as_bytes());
            out.extend_from_slice(batch.entries.get(1..).unwrap_or_default());
            if let Some(id) = chunk {
                out.push(0x81);
                put_raw(out, b"chunk");
                put_raw(out, id.as_bytes());
            }
        }
    }
}

/// fluentd v0.10's `send_data` writes, in order: `0x92`, the tag (raw markers), `0xDB` with the
/// u32 length, the entries (PROTOCOL.md §3.2, §9.1). Returns the second and third.
pub(super) fn legacy_parts(tag: &str, entries: &[u8]) -> (Vec<u8>, [u8; 5]) {
    let mut raw_tag = Vec::with_capacity(tag.len() + 5);
    put_raw(&mut raw_tag, tag.as_bytes());
    let len = (entries.len() as u32).to_be_bytes();
    (raw_tag, [0xdb, len[0], len[1], len[2], len[3]])
}

/// A fresh chunk id: Base64 of 16 random bytes (24 chars, like @fluent-org/logger's).
pub(super) fn new_chunk_id() -> String {
    chunk_id_base64(uuid::Uuid::new_v4().as_bytes())
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::forward::packed::encode_packed_forward;
    use crate::forward::{Decoded, Frame, FrameDecoder, Limits, Mode};
    use crate::tools::input::tests::{one_batch, INT};
    use crate::tools::input::Encoding;
    use crate::tools::TimeFormat;
    use bytes::BytesMut;
    use serde_json::{json, Value};

    pub(in crate::tools) fn decode_one(bytes: &[u8]) -> Frame {
        let mut buf = BytesMut::from(bytes);
        let mut decoder = FrameDecoder::new(Limits::default());
        let Ok(Some(Decoded::Frame(frame))) = decoder.decode(&mut buf) else {
            panic!("not one frame: {bytes:02x?}");
        };
        assert!(buf.is_empty());
        frame
    }

    /// `records` as one request with tag `t` and integer times.
    pub(in crate::tools) fn request(
        mode: SendMode,
        records: &[Value],
        chunk: Option<&str>,
    ) -> Vec<u8> {
        let mut out = Vec::new();
        encode_request(mode, "t", &one_batch(records, INT), chunk, &mut out);
        out
    }

    /// PROTOCOL.md §3.2: the v0.10 request for `{"msg":"hi"}` at 1441588984, byte for byte.
    #[test]
    fn legacy_request_bytes_are_pinned() {
        let legacy = Encoding {
            time_format: TimeFormat::Int,
            legacy: true,
        };
        let batch = one_batch(&[json!({"msg": "hi"})], legacy);
        let (raw_tag, len) = legacy_parts("app.log", &batch.entries);
        let request = [&[0x92][..], &raw_tag, &len, &batch.entries].concat();
        let expected = [
            0x92, 0xa7, b'a', b'p', b'p', b'.', b'l', b'o', b'g', 0xdb, 0, 0, 0, 0x0e, 0x92, 0xce,
            0x55, 0xec, 0xe6, 0xf8, 0x81, 0xa3, b'm', b's', b'g', 0xa2, b'h', b'i',
        ];
        assert_eq!(request, expected);
        let frame = decode_one(&request);
        assert_eq!(frame.mode, Mode::PackedForward);
        assert_eq!(frame.chunk, None);
    }

    #[test]
    fn packed_with_ack_matches_the_upstream_encoder() {
        let batch = one_batch(&[json!({"a": 1}), json!({"b": 2})], INT);
        let mut ours = Vec::new();
        encode_request(SendMode::Packed, "t", &batch, Some("id"), &mut ours);
        let mut upstream = Vec::new();
        let logs = crate::forward::Signal::Logs;
        encode_packed_forward(b"t", &batch.entries, "id", 2, logs, None, &mut upstream);
        assert_eq!(ours, upstream);
    }

    #[test]
    fn every_mode_parses_back() {
        // 20 events: Forward needs an array16 header past 15.
        let records: Vec<Value> = (0..20).map(|i| json!({"i": i, "s": "two"})).collect();
        for mode in [SendMode::Packed, SendMode::Forward, SendMode::Message] {
            let batch = if mode == SendMode::Message {
                one_batch(&records[..1], INT)
            } else {
                one_batch(&records, INT)
            };
            for chunk in [None, Some("Y2h1bmsgaWQgMTIzNDU2Nw==")] {
                let mut request = Vec::new();
                encode_request(mode, "app.log", &batch, chunk, &mut request);
                let frame = decode_one(&request);
                let expected_mode = match mode {
                    SendMode::Packed => Mode::PackedForward,
                    SendMode::Forward => Mode::Forward,
                    SendMode::Message => Mode::Message,
                };
                assert_eq!(frame.mode, expected_mode);
                assert_eq!(&frame.tag[..], b"app.log");
                assert_eq!(frame.events, batch.events);
                assert_eq!(&frame.entries[..], &batch.entries[..], "{mode:?}");
                let mut expected_chunk = None;
                if let Some(id) = chunk {
                    let mut raw = Vec::new();
                    put_raw(&mut raw, id.as_bytes());
                    expected_chunk = Some(raw);
                }
                assert_eq!(frame.chunk.as_deref(), expected_chunk.as_deref());
            }
        }
    }
}
