//! The request ackgate sends upstream: `[tag, entries, {"chunk": id, "size": n}]`.
//!
//! PackedForward with the entries as **str32**, exactly like fluentd's own out_forward, because
//! aggregators running old msgpack-ruby (fluentd v0.12.0–0.12.31) cannot read bin (PROTOCOL.md
//! §2.2, §13.12). The tag is packed with the old "raw" markers (fixstr, str16, str32; never
//! str8) for the same reason. The chunk id is the record's 16-byte id in Base64: fixed when the
//! record was spooled, identical on every retry (invariant 3), so an aggregator can deduplicate.
//!
//! Metrics and traces (v1.5 `fluent_signal` 1 and 2) go out as the spec and fluent-bit have
//! them: the payload as **bin**, the option `fluent_signal`, and no `size` (the payload holds
//! contexts, not events). Only v1.5 receivers read those; logs never carry the key, so the
//! bytes old aggregators see do not change.

use base64::Engine as _;

use super::entries::Compression;
use super::frame::Signal;

/// Base64 (standard alphabet, padded: 24 chars) of a 16-byte chunk id.
pub fn chunk_id_base64(id: &[u8; 16]) -> String {
    base64::engine::general_purpose::STANDARD.encode(id)
}

/// Append a msgpack str header for `len` bytes using only pre-2013 "raw" markers.
pub fn put_raw_header(out: &mut Vec<u8>, len: usize) {
    if len < 32 {
        out.push(0xa0 | len as u8);
    } else if len <= u16::MAX as usize {
        out.push(0xda);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0xdb);
        out.extend_from_slice(&(len as u32).to_be_bytes());
    }
}

/// Append a msgpack str (old "raw" markers only).
pub fn put_raw(out: &mut Vec<u8>, bytes: &[u8]) {
    put_raw_header(out, bytes.len());
    out.extend_from_slice(bytes);
}

/// Append a msgpack str with the smallest modern marker (str8 included: every v1 peer reads it;
/// fluentd's own PING and PONG use str8 for the 128-char digests). For legacy peers use
/// [`put_raw`].
pub fn put_str(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = bytes.len();
    if len < 32 {
        out.push(0xa0 | len as u8);
    } else if len <= u8::MAX as usize {
        out.extend_from_slice(&[0xd9, len as u8]);
    } else if len <= u16::MAX as usize {
        out.push(0xda);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0xdb);
        out.extend_from_slice(&(len as u32).to_be_bytes());
    }
    out.extend_from_slice(bytes);
}

/// Append a msgpack unsigned integer in its smallest form.
pub fn put_uint(out: &mut Vec<u8>, n: u64) {
    if n < 128 {
        out.push(n as u8);
    } else if n <= u8::MAX as u64 {
        out.extend_from_slice(&[0xcc, n as u8]);
    } else if n <= u16::MAX as u64 {
        out.push(0xcd);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else if n <= u32::MAX as u64 {
        out.push(0xce);
        out.extend_from_slice(&(n as u32).to_be_bytes());
    } else {
        out.push(0xcf);
        out.extend_from_slice(&n.to_be_bytes());
    }
}

/// Append a msgpack array header for `len` elements (fixarray, array16 or array32).
pub fn put_array_header(out: &mut Vec<u8>, len: usize) {
    put_container_header(out, len, 0x90, 0xdc);
}

/// Append a msgpack map header for `len` pairs (fixmap, map16 or map32).
pub fn put_map_header(out: &mut Vec<u8>, len: usize) {
    put_container_header(out, len, 0x80, 0xde);
}

/// Array (`fix` = 0x90, `wide` = 0xdc) or map (0x80, 0xde) header; `wide + 1` is the 32-bit form.
fn put_container_header(out: &mut Vec<u8>, len: usize, fix: u8, wide: u8) {
    if len < 16 {
        out.push(fix | len as u8);
    } else if len <= u16::MAX as usize {
        out.push(wide);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(wide + 1);
        out.extend_from_slice(&(len as u32).to_be_bytes());
    }
}

/// Encode one upstream PackedForward request. `entries` are the spooled bytes, written as they
/// are (already compressed when `compressed` is set).
pub fn encode_packed_forward(
    tag: &[u8],
    entries: &[u8],
    chunk_id: &str,
    events: u32,
    signal: Signal,
    compressed: Option<Compression>,
    out: &mut Vec<u8>,
) {
    out.reserve(tag.len() + entries.len() + chunk_id.len() + 64);
    encode_packed_head(tag, entries.len(), signal, out);
    out.extend_from_slice(entries);
    encode_packed_options(chunk_id, events, signal, compressed, out);
}

/// The bytes of [`encode_packed_forward`]'s request before its entries: a sender may write
/// head, entries and [`encode_packed_options`] as three slices, without copying the entries.
pub fn encode_packed_head(tag: &[u8], entries_len: usize, signal: Signal, out: &mut Vec<u8>) {
    out.push(0x93);
    put_raw(out, tag);
    // str32 for logs (legacy receivers cannot read bin); bin32 for metrics and traces.
    out.push(if signal == Signal::Logs { 0xdb } else { 0xc6 });
    out.extend_from_slice(&(entries_len as u32).to_be_bytes());
}

/// The bytes of [`encode_packed_forward`]'s request after its entries: the options map.
pub fn encode_packed_options(
    chunk_id: &str,
    events: u32,
    signal: Signal,
    compressed: Option<Compression>,
    out: &mut Vec<u8>,
) {
    out.push(0x82 + u8::from(compressed.is_some()));
    put_raw(out, b"chunk");
    put_raw(out, chunk_id.as_bytes());
    match signal {
        Signal::Logs => {
            put_raw(out, b"size");
            put_uint(out, events as u64);
        }
        Signal::Metrics | Signal::Traces => {
            put_raw(out, b"fluent_signal");
            put_uint(out, signal.code() as u64);
        }
    }
    if let Some(codec) = compressed {
        put_raw(out, b"compressed");
        put_raw(out, codec.name().as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forward::frame::{parse_request, Decoded, Limits, Mode};

    #[test]
    fn upstream_request_bytes_are_pinned() {
        let entry = [0x92, 0x01, 0x80];
        let id = chunk_id_base64(&[0u8; 16]);
        assert_eq!(id, "AAAAAAAAAAAAAAAAAAAAAA==");
        let mut out = Vec::new();
        encode_packed_forward(b"app", &entry, &id, 1, Signal::Logs, None, &mut out);
        let mut expected = vec![
            0x93, 0xa3, b'a', b'p', b'p', 0xdb, 0, 0, 0, 3, 0x92, 0x01, 0x80,
        ];
        expected.extend_from_slice(&[0x82, 0xa5]);
        expected.extend_from_slice(b"chunk");
        expected.push(0xb8);
        expected.extend_from_slice(id.as_bytes());
        expected.extend_from_slice(&[0xa4, b's', b'i', b'z', b'e', 0x01]);
        assert_eq!(out, expected);
    }

    #[test]
    fn our_own_request_parses_back_with_identical_entries() {
        let entries = [0x92, 0xce, 1, 2, 3, 4, 0x81, 0xa1, b'k', 0xa1, b'v'].repeat(3);
        let tag = vec![b'x'; 40];
        let mut out = Vec::new();
        encode_packed_forward(&tag, &entries, "id", 3, Signal::Logs, None, &mut out);
        let Ok(Decoded::Frame(frame)) = parse_request(out.into(), &Limits::default()) else {
            panic!("did not parse");
        };
        assert_eq!(frame.mode, Mode::PackedForward);
        assert_eq!(&frame.tag[..], &tag[..]);
        assert_eq!(&frame.entries[..], &entries[..]);
        assert_eq!(frame.events, 3);
        assert_eq!(frame.chunk.as_deref(), Some(&[0xa2, b'i', b'd'][..]));

        let gz = crate::forward::entries::deflate_gzip(&entries);
        let mut out = Vec::new();
        encode_packed_forward(
            &tag,
            &gz,
            "id",
            3,
            Signal::Logs,
            Some(Compression::Gzip),
            &mut out,
        );
        let Ok(Decoded::Frame(frame)) = parse_request(out.into(), &Limits::default()) else {
            panic!("did not parse");
        };
        assert_eq!(frame.mode, Mode::CompressedPackedForward(Compression::Gzip));
        assert_eq!(&frame.entries[..], &entries[..]);
    }

    #[test]
    fn metrics_go_out_as_bin_with_fluent_signal_and_parse_back() {
        // Two cmetrics-like contexts (any msgpack values): the payload is opaque.
        let payload = [
            0x81, 0xa4, b'm', b'e', b't', b'a', 0x80, 0x81, 0xa1, b'x', 0x01,
        ];
        let mut out = Vec::new();
        encode_packed_forward(b"m", &payload, "id", 2, Signal::Metrics, None, &mut out);
        let mut expected = vec![0x93, 0xa1, b'm', 0xc6, 0, 0, 0, payload.len() as u8];
        expected.extend_from_slice(&payload);
        expected.extend_from_slice(&[0x82, 0xa5]);
        expected.extend_from_slice(b"chunk");
        expected.extend_from_slice(&[0xa2, b'i', b'd', 0xad]);
        expected.extend_from_slice(b"fluent_signal");
        expected.push(0x01);
        assert_eq!(out, expected);
        let Ok(Decoded::Frame(frame)) = parse_request(out.into(), &Limits::default()) else {
            panic!("did not parse");
        };
        assert_eq!(frame.signal, Signal::Metrics);
        assert_eq!(&frame.entries[..], &payload[..]);
        assert_eq!(frame.events, 2);

        let gz = crate::forward::entries::deflate_gzip(&payload);
        let mut out = Vec::new();
        let gzip = Some(Compression::Gzip);
        encode_packed_forward(b"t", &gz, "id", 2, Signal::Traces, gzip, &mut out);
        let Ok(Decoded::Frame(frame)) = parse_request(out.into(), &Limits::default()) else {
            panic!("did not parse");
        };
        assert_eq!(frame.signal, Signal::Traces);
        assert_eq!(frame.mode, Mode::CompressedPackedForward(Compression::Gzip));
        assert_eq!(&frame.entries[..], &payload[..]);
    }
}
