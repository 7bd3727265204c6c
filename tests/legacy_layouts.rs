//! Hand-written byte layouts of legacy and quirky senders, as regression tests for the decoder.
//!
//! Each test spells out the bytes a real sender puts on the wire (PROTOCOL.md §2.2, §3.2, §4,
//! §5; captures/README.md "Facts observed") and checks every decoded field: v0.10 raw strings and
//! str32 entries, integer times of every width, v0.12 `chunk` ids ending in "\n", Docker 18's nil
//! option, fluent-logger-golang's 4-element Message with `{}`, float and ext8 times, fluent-bit's
//! 32-bit headers on tiny containers, several requests and nil no-ops in one buffer, and a
//! request that arrives one byte per read. Entries must come out exactly as sent (DESIGN.md
//! invariant 6).

mod support;

use ackgate::forward::ack::encode_ack;
use ackgate::forward::entries::count_entries;
use ackgate::forward::{Decoded, Frame, FrameDecoder, FrameError, Limits, Mode};
use bytes::BytesMut;

use support::{feed, mp_raw, mp_str32};

// ------------------------------------------------------------------------------------------------
// Helpers.

/// Decode a whole buffer; every value must decode and nothing may be left over. The same bytes
/// fed one per read must decode identically.
fn decode_all(bytes: &[u8]) -> Vec<Decoded> {
    let whole = run(bytes, bytes.len().max(1)).expect("decodes");
    let bytewise = run(bytes, 1).expect("decodes byte by byte");
    assert_eq!(whole, bytewise, "whole vs one byte per read");
    whole
}

/// Decode `bytes` fed `piece` bytes per read; everything must be taken off the buffer.
fn run(bytes: &[u8], piece: usize) -> Result<Vec<Decoded>, FrameError> {
    let outcome = feed(bytes, || piece);
    if let Some(e) = outcome.error {
        return Err(e);
    }
    assert_eq!(
        outcome.consumed,
        bytes.len(),
        "left over: {:02x?}",
        &bytes[outcome.consumed..]
    );
    Ok(outcome.decoded)
}

fn only_frame(bytes: &[u8]) -> Frame {
    let mut all = decode_all(bytes);
    assert_eq!(all.len(), 1, "{all:?}");
    match all.remove(0) {
        Decoded::Frame(f) => f,
        Decoded::Nil => panic!("nil"),
    }
}

fn frame(d: &Decoded) -> &Frame {
    match d {
        Decoded::Frame(f) => f,
        Decoded::Nil => panic!("nil where a frame was expected"),
    }
}

/// Old msgpack "raw" header (fixraw / raw16 / raw32; there was no str8) + bytes.
fn raw(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    mp_raw(&mut out, bytes);
    out
}

/// str32 header + bytes: how every fluentd version frames PackedForward entries.
fn str32(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    mp_str32(&mut out, bytes);
    out
}

/// `[tag, str32(entries)]` with a 0x92 header, as v0.10 / v0.12 without ack write it.
fn v010_request(tag: &[u8], entries: &[u8]) -> Vec<u8> {
    [&[0x92][..], &raw(tag), &str32(entries)].concat()
}

fn assert_frame(f: &Frame, mode: Mode, tag: &[u8], entries: &[u8], events: u32) {
    assert_eq!(f.mode, mode);
    assert_eq!(&f.tag[..], tag);
    assert_eq!(&f.entries[..], entries, "entries byte for byte");
    assert_eq!(f.events, events);
    assert_eq!(count_entries(&f.entries, 64), Ok(events));
}

/// `{"msg":"hi"}` at 2015-09-07 (`ce 55 ec e6 f8`): PROTOCOL.md §3.2's example entry.
const ENTRY_HI: [u8; 14] = [
    0x92, 0xce, 0x55, 0xec, 0xe6, 0xf8, 0x81, 0xa3, b'm', b's', b'g', 0xa2, b'h', b'i',
];

/// The 25-byte chunk id of a v0.12 sender: Base64 of 16 bytes plus "\n" (fixstr b9).
const V012_CHUNK: &[u8] = b"\xb9ZhKAyItCQhNAiWuQNNH2ZQ==\n";

// ------------------------------------------------------------------------------------------------
// fluentd v0.10 (and v0.12 without require_ack_response).

#[test]
fn v010_fixstr_tag_and_tiny_str32_entries() {
    // PROTOCOL.md §3.2, byte for byte.
    let req = [
        0x92, 0xa7, b'a', b'p', b'p', b'.', b'l', b'o', b'g', 0xdb, 0x00, 0x00, 0x00, 0x0e, 0x92,
        0xce, 0x55, 0xec, 0xe6, 0xf8, 0x81, 0xa3, b'm', b's', b'g', 0xa2, b'h', b'i',
    ];
    let f = only_frame(&req);
    assert_frame(&f, Mode::PackedForward, b"app.log", &ENTRY_HI, 1);
    assert_eq!(f.chunk, None);
    assert_eq!(f.wire_len, req.len());
}

#[test]
fn v010_smallest_entry() {
    // [0, {}]: fixint time, empty map, in a 3-byte str32 body.
    let req = [0x92, 0xa1, b't', 0xdb, 0, 0, 0, 3, 0x92, 0x00, 0x80];
    let f = only_frame(&req);
    assert_frame(&f, Mode::PackedForward, b"t", &[0x92, 0x00, 0x80], 1);
}

#[test]
fn v010_raw16_tag() {
    // Old msgpack has no str8: a 40-byte tag is raw16 `da 00 28`.
    let tag = b"kubernetes.var.log.containers.app-1234.x";
    assert_eq!(tag.len(), 40);
    let req = v010_request(tag, &ENTRY_HI);
    assert_eq!(&req[1..4], &[0xda, 0x00, 0x28]);
    let f = only_frame(&req);
    assert_frame(&f, Mode::PackedForward, tag, &ENTRY_HI, 1);

    // A raw16 header on a short tag is not the smallest form but is valid msgpack.
    let mut req = vec![0x92, 0xda, 0x00, 0x03, b'a', b'.', b'b'];
    req.extend_from_slice(&str32(&ENTRY_HI));
    assert_frame(&only_frame(&req), Mode::PackedForward, b"a.b", &ENTRY_HI, 1);
}

#[test]
fn v010_str32_entries_of_64_kib_and_more() {
    // Records holding raw16 values just under 64 KiB and a raw32 one just over it.
    let mut entries = Vec::new();
    for (i, len) in [60_000usize, 65_535, 70_000].into_iter().enumerate() {
        entries.extend_from_slice(&[0x92, 0xce, 0x55, 0xec, 0xe6, 0xf8 + i as u8, 0x81]);
        entries.extend_from_slice(&raw(b"log"));
        let body: Vec<u8> = (0..len).map(|j| b'a' + (j % 26) as u8).collect();
        entries.extend_from_slice(&raw(&body));
    }
    assert!(entries.len() > 3 * 60_000);
    let req = v010_request(b"big.log", &entries);
    let f = only_frame(&req);
    assert_frame(&f, Mode::PackedForward, b"big.log", &entries, 3);
    assert_eq!(f.wire_len, req.len());

    // 1000 small events: a typical flush.
    let many = ENTRY_HI.repeat(1000);
    let f = only_frame(&v010_request(b"app.log", &many));
    assert_frame(&f, Mode::PackedForward, b"app.log", &many, 1000);
}

#[test]
fn integer_times_of_every_width() {
    // Every msgpack int encoding is a valid integer time (PROTOCOL.md §5.2).
    let times: [&[u8]; 10] = [
        &[0x05],                                     // positive fixint
        &[0xff],                                     // negative fixint (-1)
        &[0xcc, 0xff],                               // uint8
        &[0xcd, 0x01, 0x00],                         // uint16
        &[0xce, 0x6b, 0x07, 0xd1, 0x6d],             // uint32 (the usual one)
        &[0xcf, 0, 0, 0, 0, 0x6b, 0x07, 0xd1, 0x6d], // uint64
        &[0xd0, 0x80],                               // int8
        &[0xd1, 0x80, 0x00],                         // int16
        &[0xd2, 0x6b, 0x07, 0xd1, 0x6d],             // int32
        &[0xd3, 0, 0, 0, 0, 0x6b, 0x07, 0xd1, 0x6d], // int64
    ];
    let mut entries = Vec::new();
    for t in times {
        entries.push(0x92);
        entries.extend_from_slice(t);
        entries.extend_from_slice(&[0x81, 0xa1, b'a', 0x01]);
    }
    let f = only_frame(&v010_request(b"t", &entries));
    assert_frame(&f, Mode::PackedForward, b"t", &entries, 10);

    // And each one alone as a Message-mode time.
    for t in times {
        let mut req = vec![0x93, 0xa1, b't'];
        req.extend_from_slice(t);
        req.push(0x80);
        let f = only_frame(&req);
        let expected = [&[0x92][..], t, &[0x80]].concat();
        assert_frame(&f, Mode::Message, b"t", &expected, 1);
    }
}

#[test]
fn raw16_strings_inside_records() {
    // {"msg": raw16 "hello", raw16 "k": raw16 (40 bytes)}: old msgpack's only string forms.
    let mut entry = vec![0x92, 0xce, 0x55, 0xec, 0xe6, 0xf8, 0x82];
    entry.extend_from_slice(&[0xa3, b'm', b's', b'g', 0xda, 0x00, 0x05]);
    entry.extend_from_slice(b"hello");
    entry.extend_from_slice(&[0xda, 0x00, 0x01, b'k', 0xda, 0x00, 0x28]);
    entry.extend_from_slice(&[b'x'; 40]);
    let f = only_frame(&v010_request(b"app", &entry));
    assert_frame(&f, Mode::PackedForward, b"app", &entry, 1);
}

#[test]
fn non_utf8_bytes_inside_raw_strings() {
    // Old senders' str may hold any bytes (PROTOCOL.md §13.8), including bytes that look like
    // msgpack markers (0xc1 is reserved as a marker, fine as content).
    let mut entry = vec![0x92, 0xce, 0x55, 0xec, 0xe6, 0xf8, 0x82];
    entry.extend_from_slice(&[0xa4, 0xff, 0xfe, 0x00, 0xc3]); // key: fixraw, invalid UTF-8
    entry.extend_from_slice(&[0xda, 0x00, 0x04, 0xc1, 0xc0, 0xdb, 0xff]); // raw16 value
    entry.extend_from_slice(&[0xa1, 0x80]); // key: a lone continuation byte
    entry.extend_from_slice(&[0xa2, 0xed, 0xa0]); // value: a cut surrogate
    let tag = [b'a', 0xff, b'b'];
    let f = only_frame(&v010_request(&tag, &entry));
    assert_frame(&f, Mode::PackedForward, &tag, &entry, 1);
}

// ------------------------------------------------------------------------------------------------
// fluentd v0.12 and v1.

#[test]
fn v012_with_chunk_and_its_ack() {
    // 93 <tag> db <len> <entries> 81 a5 "chunk" b9 <24 base64 + "\n"> (PROTOCOL.md §3.2).
    let mut req = vec![0x93];
    req.extend_from_slice(&raw(b"test.v012"));
    req.extend_from_slice(&str32(&ENTRY_HI));
    req.extend_from_slice(&[0x81, 0xa5, b'c', b'h', b'u', b'n', b'k']);
    req.extend_from_slice(V012_CHUNK);
    let f = only_frame(&req);
    assert_frame(&f, Mode::PackedForward, b"test.v012", &ENTRY_HI, 1);
    assert_eq!(f.chunk.as_deref(), Some(V012_CHUNK));
    assert_eq!(V012_CHUNK.len(), 26);
    assert_eq!(V012_CHUNK.last(), Some(&b'\n'));

    let mut ack = Vec::new();
    encode_ack(f.chunk.as_deref().unwrap(), &mut ack);
    let mut expected = vec![0x81, 0xa3, b'a', b'c', b'k'];
    expected.extend_from_slice(V012_CHUNK);
    assert_eq!(ack, expected);
}

#[test]
fn v1_option_with_size_compressed_text_and_chunk() {
    // fluentd v1: {"size": n, "compressed": "text", "chunk": id}; EventTime entries.
    let entry = [
        0x92, 0xd7, 0x00, 0x6b, 0x07, 0xd1, 0x8c, 0x35, 0x10, 0x71, 0x2a, 0x81, 0xa1, b'a', 0x01,
    ];
    let mut req = vec![0x93];
    req.extend_from_slice(&raw(b"test.v1"));
    req.extend_from_slice(&str32(&entry));
    req.extend_from_slice(&[0x83, 0xa4, b's', b'i', b'z', b'e', 0x01]);
    req.extend_from_slice(&[0xaa]);
    req.extend_from_slice(b"compressed");
    req.extend_from_slice(&[0xa4, b't', b'e', b'x', b't', 0xa5]);
    req.extend_from_slice(b"chunk");
    req.extend_from_slice(V012_CHUNK);
    let f = only_frame(&req);
    assert_frame(&f, Mode::PackedForward, b"test.v1", &entry, 1);
    assert_eq!(f.chunk.as_deref(), Some(V012_CHUNK));
}

// ------------------------------------------------------------------------------------------------
// Loggers and Docker.

#[test]
fn docker_18_nil_option() {
    // Docker 18.x: `[tag, time, record, nil]` (PROTOCOL.md §4).
    let record = [
        0x82, 0xa3, b'l', b'o', b'g', 0xa2, b'h', b'i', 0xa6, b's', b'o', b'u', b'r', b'c', b'e',
        0xa6, b's', b't', b'd', b'o', b'u', b't',
    ];
    let mut req = vec![
        0x94, 0xa6, b'd', b'o', b'c', b'k', b'e', b'r', 0xce, 0x5b, 0x00, 0x00, 0x01,
    ];
    req.extend_from_slice(&record);
    req.push(0xc0);
    let f = only_frame(&req);
    let expected = [&[0x92, 0xce, 0x5b, 0x00, 0x00, 0x01][..], &record].concat();
    assert_frame(&f, Mode::Message, b"docker", &expected, 1);
    assert_eq!(f.chunk, None);

    // A nil option on PackedForward is `msg[2] || {}` in fluentd.
    let mut req = vec![0x93, 0xa1, b't'];
    req.extend_from_slice(&str32(&ENTRY_HI));
    req.push(0xc0);
    let f = only_frame(&req);
    assert_frame(&f, Mode::PackedForward, b"t", &ENTRY_HI, 1);
    assert_eq!(f.chunk, None);
}

#[test]
fn fluent_logger_golang_message_with_empty_option() {
    // fluent-logger-golang always sends 4 elements; the option may be `{}` (PROTOCOL.md §4).
    let time = [0xd7, 0x00, 0x65, 0x53, 0xf1, 0x00, 0x00, 0x00, 0x00, 0x2a];
    let record = [0x81, 0xa3, b'm', b's', b'g', 0xa2, b'g', b'o'];
    let mut req = vec![0x94, 0xa6, b'g', b'o', b'.', b'a', b'p', b'p'];
    req.extend_from_slice(&time);
    req.extend_from_slice(&record);
    req.push(0x80);
    let f = only_frame(&req);
    let expected = [&[0x92][..], &time, &record].concat();
    assert_frame(&f, Mode::Message, b"go.app", &expected, 1);
    assert_eq!(f.chunk, None);

    // With RequestAck: {"chunk": base64(16 bytes)} without the "\n".
    let chunk = b"\xb8AAECAwQFBgcICQoLDA0ODw==";
    let mut req = vec![0x94, 0xa6, b'g', b'o', b'.', b'a', b'p', b'p'];
    req.extend_from_slice(&time);
    req.extend_from_slice(&record);
    req.extend_from_slice(&[0x81, 0xa5, b'c', b'h', b'u', b'n', b'k']);
    req.extend_from_slice(chunk);
    let f = only_frame(&req);
    assert_frame(&f, Mode::Message, b"go.app", &expected, 1);
    assert_eq!(f.chunk.as_deref(), Some(&chunk[..]));
}

#[test]
fn float_times() {
    // Non-conforming loggers send float seconds (PROTOCOL.md §5.3); the bytes are kept as sent.
    let f64_time = [0xcb, 0x41, 0xd9, 0x54, 0xfc, 0x40, 0x00, 0x00, 0x00];
    let f32_time = [0xca, 0x4e, 0xca, 0xa7, 0xe2];
    for time in [&f64_time[..], &f32_time[..]] {
        let mut req = vec![0x93, 0xa1, b'f'];
        req.extend_from_slice(time);
        req.extend_from_slice(&[0x81, 0xa1, b'a', 0x01]);
        let f = only_frame(&req);
        let expected = [&[0x92][..], time, &[0x81, 0xa1, b'a', 0x01]].concat();
        assert_frame(&f, Mode::Message, b"f", &expected, 1);

        let entry = [&[0x92][..], time, &[0x80]].concat();
        let f = only_frame(&v010_request(b"f", &entry));
        assert_frame(&f, Mode::PackedForward, b"f", &entry, 1);
    }
}

#[test]
fn ext8_event_time() {
    // EventTime as ext8 `c7 08 00` instead of fixext8 `d7 00` (PROTOCOL.md §5.1).
    let time = [
        0xc7, 0x08, 0x00, 0x65, 0x53, 0xf1, 0x00, 0x07, 0x5b, 0xcd, 0x15,
    ];
    let mut req = vec![0x93, 0xa1, b'e'];
    req.extend_from_slice(&time);
    req.push(0x80);
    let f = only_frame(&req);
    assert_frame(
        &f,
        Mode::Message,
        b"e",
        &[&[0x92][..], &time, &[0x80]].concat(),
        1,
    );

    let entry = [&[0x92][..], &time, &[0x80]].concat();
    let mut req = vec![0x92, 0xa1, b'e', 0x91];
    req.extend_from_slice(&entry);
    let f = only_frame(&req);
    assert_frame(&f, Mode::Forward, b"e", &entry, 1);

    // An ext of another type or size is not a time.
    let bad = [0x93, 0xa1, b'e', 0xd7, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0x80];
    assert!(run(&bad, bad.len()).is_err());
    let bad = [0x93, 0xa1, b'e', 0xd6, 0x00, 0, 0, 0, 0, 0x80];
    assert!(run(&bad, bad.len()).is_err());
}

// ------------------------------------------------------------------------------------------------
// fluent-bit.

#[test]
fn fluent_bit_32_bit_headers_on_small_containers() {
    // Entries `dd 00 00 00 02`, metadata `df 00 00 00 00`, option map `df 00 00 00 02`
    // (captures/README.md "Framing and types").
    let time = [0xd7, 0x00, 0x6b, 0x07, 0xd1, 0x9f, 0x16, 0x83, 0x50, 0xac];
    let record = [0x81, 0xa3, b's', b'e', b'q', 0x01];
    let compat = [&[0xdd, 0, 0, 0, 2][..], &time, &record].concat();
    let meta = [&[0x92, 0x92][..], &time, &[0xdf, 0, 0, 0, 0], &record].concat();
    let entries = [compat.clone(), meta.clone()].concat();
    let mut req = vec![0x93, 0xa2, b'f', b'b', 0x92];
    req.extend_from_slice(&entries);
    req.extend_from_slice(&[0xdf, 0, 0, 0, 2, 0xa4, b's', b'i', b'z', b'e', 0x02, 0xad]);
    req.extend_from_slice(b"fluent_signal");
    req.push(0x00);
    let f = only_frame(&req);
    assert_frame(&f, Mode::Forward, b"fb", &entries, 2);
    assert_eq!(f.chunk, None);

    // The same with the request array and the entries array themselves in 32-bit form.
    let mut req = vec![0xdd, 0, 0, 0, 2, 0xa2, b'f', b'b', 0xdd, 0, 0, 0, 2];
    req.extend_from_slice(&entries);
    let f = only_frame(&req);
    assert_frame(&f, Mode::Forward, b"fb", &entries, 2);

    // array16 / map16 forms too.
    let mut req = vec![0xdc, 0, 3, 0xa2, b'f', b'b', 0xdc, 0, 1];
    req.extend_from_slice(&compat);
    req.extend_from_slice(&[0xde, 0, 0]);
    let f = only_frame(&req);
    assert_frame(&f, Mode::Forward, b"fb", &compat, 1);
}

#[test]
fn fluent_bit_bin_chunk_is_echoed_as_bin() {
    let mut req = vec![0x93, 0xa2, b'f', b'b', 0xc4, ENTRY_HI.len() as u8];
    req.extend_from_slice(&ENTRY_HI);
    req.extend_from_slice(&[
        0x81, 0xa5, b'c', b'h', b'u', b'n', b'k', 0xc4, 0x02, 0x00, 0xff,
    ]);
    let f = only_frame(&req);
    assert_frame(&f, Mode::PackedForward, b"fb", &ENTRY_HI, 1);
    assert_eq!(f.chunk.as_deref(), Some(&[0xc4, 0x02, 0x00, 0xff][..]));
}

// ------------------------------------------------------------------------------------------------
// Streams.

#[test]
fn several_requests_in_one_buffer() {
    let v010 = v010_request(b"a", &ENTRY_HI);
    let mut v012 = vec![0x93];
    v012.extend_from_slice(&raw(b"b"));
    v012.extend_from_slice(&str32(&ENTRY_HI.repeat(2)));
    v012.extend_from_slice(&[0x81, 0xa5, b'c', b'h', b'u', b'n', b'k']);
    v012.extend_from_slice(V012_CHUNK);
    let message = [0x93, 0xa1, b'c', 0x01, 0x80];
    let buf = [v010.clone(), v012.clone(), message.to_vec()].concat();
    let all = decode_all(&buf);
    assert_eq!(all.len(), 3);
    assert_frame(frame(&all[0]), Mode::PackedForward, b"a", &ENTRY_HI, 1);
    assert_eq!(frame(&all[0]).wire_len, v010.len());
    assert_frame(
        frame(&all[1]),
        Mode::PackedForward,
        b"b",
        &ENTRY_HI.repeat(2),
        2,
    );
    assert_eq!(frame(&all[1]).chunk.as_deref(), Some(V012_CHUNK));
    assert_eq!(frame(&all[1]).wire_len, v012.len());
    assert_frame(frame(&all[2]), Mode::Message, b"c", &[0x92, 0x01, 0x80], 1);
    assert_eq!(frame(&all[2]).wire_len, message.len());
}

#[test]
fn one_request_in_one_byte_writes() {
    // Legacy senders write header, tag, length and body separately; here every byte is its own
    // read, and nothing may come out before the last byte.
    let mut req = vec![0x93];
    req.extend_from_slice(&raw(b"test.v012"));
    req.extend_from_slice(&str32(&ENTRY_HI.repeat(3)));
    req.extend_from_slice(&[0x81, 0xa5, b'c', b'h', b'u', b'n', b'k']);
    req.extend_from_slice(V012_CHUNK);
    let mut decoder = FrameDecoder::new(Limits::default());
    let mut buf = BytesMut::new();
    for (i, &b) in req.iter().enumerate() {
        buf.extend_from_slice(&[b]);
        let got = decoder.decode(&mut buf).expect("no error");
        if i + 1 < req.len() {
            assert_eq!(got, None, "frame before the last byte (at {i})");
            assert_eq!(buf.len(), i + 1, "nothing consumed early");
        } else {
            let Some(Decoded::Frame(f)) = got else {
                panic!("no frame at the last byte: {got:?}");
            };
            assert_frame(
                &f,
                Mode::PackedForward,
                b"test.v012",
                &ENTRY_HI.repeat(3),
                3,
            );
            assert_eq!(f.chunk.as_deref(), Some(V012_CHUNK));
            assert_eq!(f.wire_len, req.len());
        }
    }
    assert!(buf.is_empty());
    assert_eq!(decoder.decode(&mut buf), Ok(None));
}

#[test]
fn nil_noops_between_requests() {
    // msgpack nil is a health-check no-op (PROTOCOL.md §2.1): reported, never a frame.
    let req = v010_request(b"a", &ENTRY_HI);
    let buf = [&[0xc0][..], &req, &[0xc0, 0xc0], &req, &[0xc0]].concat();
    let all = decode_all(&buf);
    assert_eq!(all.len(), 6);
    for i in [0, 2, 3, 5] {
        assert_eq!(all[i], Decoded::Nil, "at {i}");
    }
    for i in [1, 4] {
        assert_frame(frame(&all[i]), Mode::PackedForward, b"a", &ENTRY_HI, 1);
    }
    // Nothing but nils: no frames, nothing left over.
    assert_eq!(decode_all(&[0xc0; 5]), vec![Decoded::Nil; 5]);
}
