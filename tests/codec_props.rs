//! Property tests for the Forward codec (`ackgate::forward`).
//!
//! The test msgpack encoder builds valid requests of every carrier mode (PROTOCOL.md §3):
//! Message with every time kind, Forward, PackedForward in every str/bin width,
//! CompressedPackedForward as multi-member gzip or zstd, options absent / nil / maps with a str or
//! bin `chunk`, unknown keys and `fluent_signal: 0`, v1.5 `[[time, {meta}], record]` entries, and
//! records of random nested values whose strings hold arbitrary (non-UTF-8) bytes. Container and
//! string headers are not always the smallest form (fluent-bit writes `dd 00 00 00 02`).
//!
//! Properties:
//! 1. several requests back to back, split anywhere, decode to exactly the generated frames, with
//!    byte-identical entries (DESIGN.md invariant 6);
//! 2. mutated or truncated streams never panic, decode the same however they are split, and every
//!    frame that comes out is internally consistent; a truncated stream yields exactly the
//!    requests wholly before the cut (invariant 4: nothing that was not sent);
//! 3. the skipper's extent of a random value equals the encoder's length.
//!
//! The encoder ([`V`]) and the piecewise decoding ([`feed_at`]) are in `tests/support`.

mod support;

use std::io::Write;

use ackgate::forward::entries::{count_entries, Compression};
use ackgate::forward::msgpack::{value_len, Progress, Skipper};
use ackgate::forward::{Decoded, Frame, Mode, Signal};
use bytes::Bytes;
use proptest::prelude::*;
use proptest::sample::Index;

use support::*;

// ------------------------------------------------------------------------------------------------
// Strategies for values.

fn arb_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => prop::collection::vec(any::<u8>(), 0..12),
        2 => prop::collection::vec(any::<u8>(), 0..max),
        // Long enough for str8/str16 headers.
        1 => prop::collection::vec(any::<u8>(), 200..400),
    ]
}

fn arb_leaf() -> impl Strategy<Value = V> {
    prop_oneof![
        Just(V::Nil),
        any::<bool>().prop_map(V::Bool),
        (any::<u64>(), any::<u8>()).prop_map(|(n, w)| V::UInt(n, w)),
        (0u64..300, any::<u8>()).prop_map(|(n, w)| V::UInt(n, w)),
        (any::<i64>(), any::<u8>()).prop_map(|(n, w)| V::NInt(n, w)),
        any::<u32>().prop_map(V::F32),
        any::<u64>().prop_map(V::F64),
        (arb_bytes(64), any::<u8>()).prop_map(|(b, w)| V::Str(b, w)),
        (arb_bytes(64), any::<u8>()).prop_map(|(b, w)| V::Bin(b, w)),
        (
            any::<i8>(),
            prop::collection::vec(any::<u8>(), 0..20),
            any::<u8>()
        )
            .prop_map(|(k, d, w)| V::Ext(k, d, w)),
    ]
}

fn arb_value() -> impl Strategy<Value = V> {
    arb_leaf().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            (prop::collection::vec(inner.clone(), 0..6), any::<u8>())
                .prop_map(|(items, w)| V::Array(items, w)),
            (
                prop::collection::vec((inner.clone(), inner), 0..5),
                any::<u8>()
            )
                .prop_map(|(pairs, w)| V::Map(pairs, w)),
        ]
    })
}

/// A record: a map with str keys (arbitrary bytes, not necessarily UTF-8) and random values.
fn arb_record() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::collection::vec(((arb_bytes(20), any::<u8>()), arb_value()), 0..5),
        any::<u8>(),
    )
        .prop_map(|(pairs, w)| {
            let pairs = pairs
                .into_iter()
                .map(|((k, kw), v)| (V::Str(k, kw), v))
                .collect();
            encode(&V::Map(pairs, w))
        })
}

/// An integer time in any width, or an EventTime (fixext8 / ext8), or a float.
fn arb_plain_time() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        (any::<u32>(), any::<u8>()).prop_map(|(n, w)| encode(&V::UInt(n as u64, w))),
        (any::<u64>(), any::<u8>()).prop_map(|(n, w)| encode(&V::UInt(n, w))),
        (any::<i64>(), any::<u8>()).prop_map(|(n, w)| encode(&V::NInt(n, w))),
        any::<[u8; 8]>().prop_map(|b| [&[0xd7, 0x00][..], &b].concat()),
        any::<[u8; 8]>().prop_map(|b| [&[0xc7, 0x08, 0x00][..], &b].concat()),
        any::<u32>().prop_map(|b| encode(&V::F32(b))),
        any::<u64>().prop_map(|b| encode(&V::F64(b))),
    ]
}

/// Times allowed inside entries: the plain kinds plus v1.5 `[EventTime|int, {metadata}]`.
fn arb_entry_time() -> impl Strategy<Value = Vec<u8>> {
    let event_time = prop_oneof![
        any::<[u8; 8]>().prop_map(|b| [&[0xd7, 0x00][..], &b].concat()),
        any::<[u8; 8]>().prop_map(|b| [&[0xc7, 0x08, 0x00][..], &b].concat()),
        (any::<u32>(), any::<u8>()).prop_map(|(n, w)| encode(&V::UInt(n as u64, w))),
    ];
    prop_oneof![
        4 => arb_plain_time(),
        1 => (event_time, arb_record(), any::<u8>()).prop_map(|(t, meta, w)| {
            let mut out = Vec::new();
            put_array_header(&mut out, 2, w);
            out.extend_from_slice(&t);
            out.extend_from_slice(&meta);
            out
        }),
    ]
}

/// One `[time, record]` entry, its array header sometimes array16/array32.
fn arb_entry() -> impl Strategy<Value = Vec<u8>> {
    (arb_entry_time(), arb_record(), any::<u8>()).prop_map(|(t, r, w)| {
        let mut out = Vec::new();
        put_array_header(&mut out, 2, w);
        out.extend_from_slice(&t);
        out.extend_from_slice(&r);
        out
    })
}

fn arb_entries() -> impl Strategy<Value = Vec<Vec<u8>>> {
    prop::collection::vec(arb_entry(), 1..6)
}

// ------------------------------------------------------------------------------------------------
// Strategies for requests.

#[derive(Debug, Clone)]
enum Carrier {
    Message,
    Forward,
    Packed,
    Gzip { members: usize },
    Zstd { frames: usize },
}

#[derive(Debug, Clone, Copy)]
enum OptionForm {
    Absent,
    Nil,
    Map,
}

/// One generated request: its bytes and what the decoder must return for it.
#[derive(Debug, Clone)]
struct Req {
    bytes: Vec<u8>,
    expected: Decoded,
}

/// Split `data` into `parts` non-empty pieces (fewer if it is short).
fn split_even(data: &[u8], parts: usize) -> Vec<&[u8]> {
    let parts = parts.clamp(1, data.len().max(1));
    let size = data.len().div_ceil(parts).max(1);
    data.chunks(size).collect()
}

fn gzip_members(data: &[u8], members: usize, level: u32) -> Vec<u8> {
    let mut out = Vec::new();
    for piece in split_even(data, members) {
        let mut encoder =
            flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level % 10));
        encoder.write_all(piece).unwrap();
        out.extend(encoder.finish().unwrap());
    }
    out
}

fn zstd_frames(data: &[u8], frames: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for piece in split_even(data, frames) {
        out.extend(zstd::encode_all(piece, 1).unwrap());
    }
    out
}

fn arb_carrier() -> impl Strategy<Value = Carrier> {
    prop_oneof![
        2 => Just(Carrier::Message),
        2 => Just(Carrier::Forward),
        3 => Just(Carrier::Packed),
        2 => (1usize..4).prop_map(|members| Carrier::Gzip { members }),
        1 => (1usize..3).prop_map(|frames| Carrier::Zstd { frames }),
    ]
}

fn arb_option_form() -> impl Strategy<Value = OptionForm> {
    prop_oneof![
        1 => Just(OptionForm::Absent),
        1 => Just(OptionForm::Nil),
        2 => Just(OptionForm::Map),
    ]
}

/// Raw bytes of a `chunk` value: a str (fluentd, fluent-bit) or a bin.
fn arb_chunk() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        (prop::collection::vec(any::<u8>(), 0..40), any::<u8>())
            .prop_map(|(b, w)| encode(&V::Str(b, w))),
        (prop::collection::vec(any::<u8>(), 0..40), any::<u8>())
            .prop_map(|(b, w)| encode(&V::Bin(b, w))),
    ]
}

/// Keys ackgate must ignore: random names (not the ones it reads) with random values.
fn arb_unknown_options() -> impl Strategy<Value = Vec<(Vec<u8>, Vec<u8>)>> {
    prop::collection::vec(((arb_bytes(16), any::<u8>()), arb_value()), 0..3).prop_map(|pairs| {
        pairs
            .into_iter()
            .filter(|((k, _), _)| !matches!(&k[..], b"chunk" | b"compressed" | b"fluent_signal"))
            .map(|((k, w), v)| (encode(&V::Str(k, w)), encode(&v)))
            .collect()
    })
}

#[derive(Debug, Clone)]
struct Shape {
    carrier: Carrier,
    tag: Vec<u8>,
    tag_is_bin: bool,
    tag_w: u8,
    /// Message: time and record. Others: entries.
    message: (Vec<u8>, Vec<u8>),
    entries: Vec<Vec<u8>>,
    payload_header: (bool, u8),
    gzip_level: u32,
    option_form: OptionForm,
    option_w: u8,
    chunk: Option<Vec<u8>>,
    size: Option<u64>,
    signal: bool,
    /// Whether to state `compressed` (else the payload is sniffed) and whether to add "text".
    name_compression: bool,
    unknown: Vec<(Vec<u8>, Vec<u8>)>,
    shuffle: Vec<Index>,
}

fn arb_shape() -> impl Strategy<Value = Shape> {
    (
        (
            arb_carrier(),
            arb_bytes(40),
            any::<bool>(),
            any::<u8>(),
            (arb_plain_time(), arb_record()),
            arb_entries(),
            (any::<bool>(), any::<u8>()),
            0u32..10,
        ),
        (
            arb_option_form(),
            any::<u8>(),
            prop::option::of(arb_chunk()),
            prop::option::of(any::<u64>()),
            any::<bool>(),
            any::<bool>(),
            arb_unknown_options(),
            prop::collection::vec(any::<Index>(), 8),
        ),
    )
        .prop_map(
            |(
                (carrier, tag, tag_is_bin, tag_w, message, entries, payload_header, gzip_level),
                (option_form, option_w, chunk, size, signal, name_compression, unknown, shuffle),
            )| Shape {
                carrier,
                tag,
                tag_is_bin,
                tag_w,
                message,
                entries,
                payload_header,
                gzip_level,
                option_form,
                option_w,
                chunk,
                size,
                signal,
                name_compression,
                unknown,
                shuffle,
            },
        )
}

fn build(shape: Shape) -> Req {
    let mut body = Vec::new();
    // Tag.
    let tag_value = if shape.tag_is_bin {
        V::Bin(shape.tag.clone(), shape.tag_w)
    } else {
        V::Str(shape.tag.clone(), shape.tag_w)
    };
    enc(&tag_value, &mut body);
    let (mode, entries, events, base_arity) = put_carrier(&shape, &mut body);
    let (arity, chunk) = match shape.option_form {
        OptionForm::Absent => (base_arity, None),
        OptionForm::Nil => {
            body.push(0xc0);
            (base_arity + 1, None)
        }
        OptionForm::Map => (base_arity + 1, put_option_map(&shape, mode, &mut body)),
    };

    let mut bytes = Vec::new();
    put_array_header(&mut bytes, arity, shape.option_w.rotate_left(3));
    bytes.extend_from_slice(&body);
    let frame = Frame {
        mode,
        tag: Bytes::from(shape.tag),
        signal: Signal::Logs,
        entries: Bytes::from(entries),
        events: events as u32,
        chunk,
        wire_len: bytes.len(),
    };
    Req {
        bytes,
        expected: Decoded::Frame(frame),
    }
}

/// The second (and for Message, third) element; returns the mode, the entries the decoder must
/// hand out, their count, and the arity without an option.
fn put_carrier(shape: &Shape, body: &mut Vec<u8>) -> (Mode, Vec<u8>, usize, usize) {
    let joined: Vec<u8> = shape.entries.concat();
    match &shape.carrier {
        Carrier::Message => {
            let (time, record) = &shape.message;
            body.extend_from_slice(time);
            body.extend_from_slice(record);
            let entry = [&[0x92][..], time, record].concat();
            (Mode::Message, entry, 1, 3)
        }
        Carrier::Forward => {
            put_array_header(body, shape.entries.len(), shape.payload_header.1);
            body.extend_from_slice(&joined);
            (Mode::Forward, joined, shape.entries.len(), 2)
        }
        Carrier::Packed | Carrier::Gzip { .. } | Carrier::Zstd { .. } => {
            let (payload, mode) = match shape.carrier {
                Carrier::Packed => (joined.clone(), Mode::PackedForward),
                Carrier::Gzip { members } => (
                    gzip_members(&joined, members, shape.gzip_level),
                    Mode::CompressedPackedForward(Compression::Gzip),
                ),
                Carrier::Zstd { frames } => (
                    zstd_frames(&joined, frames),
                    Mode::CompressedPackedForward(Compression::Zstd),
                ),
                _ => unreachable!(),
            };
            let (as_bin, w) = shape.payload_header;
            if as_bin {
                put_bin_header(body, payload.len(), w);
            } else {
                put_str_header(body, payload.len(), w);
            }
            body.extend_from_slice(&payload);
            (mode, joined, shape.entries.len(), 2)
        }
    }
}

/// The option map, its keys in a shuffled order; returns the chunk value it carries.
fn put_option_map(shape: &Shape, mode: Mode, body: &mut Vec<u8>) -> Option<Bytes> {
    let key = |k: &[u8]| encode(&V::Str(k.to_vec(), 0));
    let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = shape.unknown.clone();
    if let Some(c) = &shape.chunk {
        pairs.push((key(b"chunk"), c.clone()));
    }
    if let Some(n) = shape.size {
        pairs.push((key(b"size"), encode(&V::UInt(n, 0))));
    }
    if shape.signal {
        pairs.push((key(b"fluent_signal"), vec![0x00]));
    }
    if shape.name_compression {
        let name: &[u8] = match mode {
            Mode::CompressedPackedForward(c) => c.name().as_bytes(),
            Mode::PackedForward => b"text",
            _ => b"",
        };
        if !name.is_empty() {
            pairs.push((key(b"compressed"), key(name)));
        }
    }
    // Key order is the sender's business.
    for (i, idx) in shape.shuffle.iter().enumerate() {
        let n = pairs.len();
        if n > 1 {
            pairs.swap(i % n, idx.index(n));
        }
    }
    put_map_header(body, pairs.len(), shape.option_w);
    for (k, v) in pairs {
        body.extend_from_slice(&k);
        body.extend_from_slice(&v);
    }
    shape.chunk.clone().map(Bytes::from)
}

fn arb_request() -> impl Strategy<Value = Req> {
    prop_oneof![
        1 => Just(Req {
            bytes: vec![0xc0],
            expected: Decoded::Nil,
        }),
        8 => arb_shape().prop_map(build),
    ]
}

fn arb_stream() -> impl Strategy<Value = Vec<Req>> {
    prop::collection::vec(arb_request(), 1..5)
}

// ------------------------------------------------------------------------------------------------
// Driving the decoder.

fn cut_points(indices: &[Index], len: usize) -> Vec<usize> {
    indices.iter().map(|i| i.index(len + 1)).collect()
}

/// Every frame the decoder hands out must describe itself correctly.
fn assert_consistent(outcome: &Outcome, input_len: usize) {
    let mut wire = 0;
    for d in &outcome.decoded {
        match d {
            Decoded::Nil => wire += 1,
            Decoded::Frame(f) => {
                // An empty batch is a valid frame (acked, nothing stored): no entry bytes.
                assert_eq!(f.events == 0, f.entries.is_empty(), "{f:?}");
                assert_eq!(count_entries(&f.entries, DEPTH), Ok(f.events), "{f:?}");
                if f.mode == Mode::Message {
                    assert_eq!(f.events, 1);
                    assert_eq!(f.entries[0], 0x92);
                }
                if let Some(chunk) = &f.chunk {
                    assert_eq!(value_len(chunk, DEPTH), Ok(Some(chunk.len())));
                }
                wire += f.wire_len;
            }
        }
    }
    // A rejected request is taken off the buffer too (the connection closes after it).
    if outcome.error.is_none() {
        assert_eq!(wire, outcome.consumed);
    } else {
        assert!(wire <= outcome.consumed);
    }
    assert!(outcome.consumed <= input_len);
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(Index, u8),
    Insert(Index, u8),
    Delete(Index),
    Set(Index, u8),
}

fn arb_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<Index>(), 1u8..=255).prop_map(|(i, x)| Mutation::Flip(i, x)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<Index>().prop_map(Mutation::Delete),
        // Markers that change a value's extent the most.
        (
            any::<Index>(),
            prop::sample::select(vec![0xc0, 0xc1, 0xdb, 0xdd, 0xdf, 0xc9, 0x9f, 0x8f, 0xd7])
        )
            .prop_map(|(i, b)| Mutation::Set(i, b)),
    ]
}

fn mutate(data: &mut Vec<u8>, m: &Mutation) {
    match m {
        Mutation::Flip(i, x) if !data.is_empty() => {
            let at = i.index(data.len());
            data[at] ^= x;
        }
        Mutation::Set(i, b) if !data.is_empty() => {
            let at = i.index(data.len());
            data[at] = *b;
        }
        Mutation::Insert(i, b) => {
            let at = i.index(data.len() + 1);
            data.insert(at, *b);
        }
        Mutation::Delete(i) if !data.is_empty() => {
            let at = i.index(data.len());
            data.remove(at);
        }
        _ => {}
    }
}

fn concat(reqs: &[Req]) -> Vec<u8> {
    reqs.iter().flat_map(|r| r.bytes.iter().copied()).collect()
}

/// 256 cases per property unless `PROPTEST_CASES` says otherwise (a long hunt: 10000).
/// XorShift, because ChaCha's byte generation dominates the run time of a debug build.
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    ProptestConfig {
        rng_algorithm: proptest::test_runner::RngAlgorithm::XorShift,
        ..ProptestConfig::with_cases(cases)
    }
}

proptest! {
    #![proptest_config(config())]

    /// Property 1: generated requests come back exactly, however the stream is split.
    #[test]
    fn generated_requests_round_trip(
        reqs in arb_stream(),
        cuts in prop::collection::vec(any::<Index>(), 0..10),
    ) {
        let data = concat(&reqs);
        let expected: Vec<Decoded> = reqs.iter().map(|r| r.expected.clone()).collect();
        let whole = feed_at(&data, &[]);
        prop_assert_eq!(&whole.error, &None);
        prop_assert_eq!(&whole.decoded, &expected);
        prop_assert_eq!(whole.consumed, data.len());
        let split = feed_at(&data, &cut_points(&cuts, data.len()));
        prop_assert_eq!(&split, &whole);
        let bytewise: Vec<usize> = (0..data.len()).collect();
        prop_assert_eq!(&feed_at(&data, &bytewise), &whole);
    }

    /// Property 2a: corrupted streams never panic, split the same way every time, and whatever
    /// frames come out are self-consistent.
    #[test]
    fn mutated_streams_are_handled(
        reqs in arb_stream(),
        mutations in prop::collection::vec(arb_mutation(), 1..5),
        cuts in prop::collection::vec(any::<Index>(), 0..10),
    ) {
        let mut data = concat(&reqs);
        for m in &mutations {
            mutate(&mut data, m);
        }
        let whole = feed_at(&data, &[]);
        assert_consistent(&whole, data.len());
        let split = feed_at(&data, &cut_points(&cuts, data.len()));
        prop_assert_eq!(&split, &whole);
    }

    /// Property 2b: a stream cut short yields exactly the requests wholly before the cut, and no
    /// error: the rest is simply not there yet.
    #[test]
    fn truncated_streams_yield_only_complete_requests(
        reqs in arb_stream(),
        cut in any::<Index>(),
        pieces in prop::collection::vec(any::<Index>(), 0..6),
    ) {
        let data = concat(&reqs);
        let cut = cut.index(data.len() + 1);
        let mut end = 0;
        let mut expected = Vec::new();
        for r in &reqs {
            end += r.bytes.len();
            if end > cut {
                break;
            }
            expected.push(r.expected.clone());
        }
        let consumed: usize = reqs.iter().map(|r| r.bytes.len()).scan(0, |acc, n| {
            *acc += n;
            Some(*acc)
        }).take_while(|&e| e <= cut).last().unwrap_or(0);
        let got = feed_at(&data[..cut], &cut_points(&pieces, cut));
        prop_assert_eq!(&got.error, &None);
        prop_assert_eq!(&got.decoded, &expected);
        prop_assert_eq!(got.consumed, consumed);
        assert_consistent(&got, cut);
    }

    /// Property 4: a v1.5 metrics/traces request (`fluent_signal` 1 or 2) keeps its payload
    /// opaque: any run of whole msgpack values, as str or bin, plain, multi-member gzip or
    /// zstd, comes back as exactly those bytes, counted as contexts, however the stream is cut.
    #[test]
    fn signal_payloads_round_trip_opaque(
        values in prop::collection::vec(arb_value(), 1..5),
        signal in 1u8..=2,
        as_bin in any::<bool>(),
        width in any::<u8>(),
        codec in 0u8..3,
        pieces in 1usize..4,
        cuts in prop::collection::vec(any::<Index>(), 0..6),
    ) {
        let payload: Vec<u8> = values.iter().flat_map(encode).collect();
        let sent = match codec {
            0 => payload.clone(),
            1 => gzip_members(&payload, pieces, 6),
            _ => zstd_frames(&payload, pieces),
        };
        let mut bytes = Vec::new();
        put_array_header(&mut bytes, 3, width);
        enc(&V::Str(b"sig".to_vec(), width), &mut bytes);
        if as_bin {
            put_bin_header(&mut bytes, sent.len(), width);
        } else {
            put_str_header(&mut bytes, sent.len(), width);
        }
        bytes.extend_from_slice(&sent);
        bytes.push(0x81);
        enc(&V::Str(b"fluent_signal".to_vec(), width), &mut bytes);
        bytes.push(signal);
        let got = feed_at(&bytes, &cut_points(&cuts, bytes.len()));
        prop_assert_eq!(&got.error, &None);
        prop_assert_eq!(got.decoded.len(), 1);
        let Decoded::Frame(frame) = &got.decoded[0] else {
            return Err(TestCaseError::fail("nil"));
        };
        let expected_signal = if signal == 1 { Signal::Metrics } else { Signal::Traces };
        prop_assert_eq!(frame.signal, expected_signal);
        prop_assert_eq!(&frame.entries[..], &payload[..]);
        prop_assert_eq!(frame.events as usize, values.len());
        let expected_mode = match codec {
            0 => Mode::PackedForward,
            1 => Mode::CompressedPackedForward(Compression::Gzip),
            _ => Mode::CompressedPackedForward(Compression::Zstd),
        };
        prop_assert_eq!(frame.mode, expected_mode);
    }

    /// Property 3: the skipper finds exactly the end the encoder wrote, whole, resumed across
    /// arbitrary reads, and never claims a value is complete before its last byte.
    #[test]
    fn skipper_extent_matches_encoder(
        value in arb_value(),
        trailing in prop::collection::vec(any::<u8>(), 0..8),
        cuts in prop::collection::vec(any::<Index>(), 0..8),
    ) {
        let encoded = encode(&value);
        let len = encoded.len();
        let mut buf = encoded.clone();
        buf.extend_from_slice(&trailing);

        prop_assert_eq!(Skipper::new(DEPTH, 1 << 24).advance(&buf), Ok(Progress::Complete(len)));
        prop_assert_eq!(value_len(&buf, DEPTH), Ok(Some(len)));
        prop_assert_eq!(value_len(&encoded, DEPTH), Ok(Some(len)));

        let mut points = cut_points(&cuts, len);
        points.sort_unstable();
        let mut skipper = Skipper::new(DEPTH, 1 << 24);
        for &p in points.iter().filter(|&&p| p < len) {
            match skipper.advance(&buf[..p]) {
                Ok(Progress::Incomplete { needed_at_least }) => {
                    prop_assert!(needed_at_least > p, "needs {} at {}", needed_at_least, p);
                    prop_assert!(needed_at_least <= len, "needs {} of {}", needed_at_least, len);
                }
                other => prop_assert!(false, "prefix {} of {}: {:?}", p, len, other),
            }
            prop_assert_eq!(value_len(&encoded[..p], DEPTH), Ok(None));
        }
        prop_assert_eq!(skipper.advance(&buf), Ok(Progress::Complete(len)));
        // A skipper whose byte limit is the value's length accepts it; one byte less refuses.
        prop_assert_eq!(Skipper::new(DEPTH, len).advance(&buf), Ok(Progress::Complete(len)));
        prop_assert!(Skipper::new(DEPTH, len - 1).advance(&buf).is_err());
    }
}
