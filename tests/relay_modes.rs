//! Every carrier mode and encoding a sender may use (PROTOCOL.md §3, §5, §13.8) reaches the
//! aggregator with each event's bytes untouched (DESIGN.md invariant 6): Message mode with 3
//! and 4 elements and every time form, Forward, PackedForward as str32 and bin, gzip
//! (multi-member, str and bin) and zstd CompressedPackedForward, v1.5 `[[EventTime, {}],
//! record]`, non-UTF-8 bytes in str values; and whatever the framing on the socket: nil no-ops
//! between requests, many requests in one write, one request dribbled one byte per write.
//!
//! For Message mode the upstream entry is `0x92` followed by the sender's own time and record
//! bytes; for compressed requests it is the inflated entries.

mod support;

use std::io::Write;
use std::time::Duration;

use support::*;

/// One request and what must come out of it.
struct Case {
    name: &'static str,
    bytes: Vec<u8>,
    /// Raw entries the aggregator must receive.
    expected: Vec<Vec<u8>>,
    /// Raw msgpack chunk value, when the request asks for an ack.
    chunk: Option<Vec<u8>>,
}

fn gzip_member(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).expect("gzip");
    encoder.finish().expect("gzip finish")
}

fn chunk_value(id: &str) -> Vec<u8> {
    let mut v = Vec::new();
    mp_str(&mut v, id.as_bytes());
    v
}

/// `{"chunk": <raw value>}` plus extra already-encoded pairs.
fn option_map(chunk: Option<&[u8]>, extra: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    mp_map_header(&mut out, extra.len() + chunk.is_some() as usize);
    for (k, v) in extra {
        mp_str(&mut out, k.as_bytes());
        out.extend_from_slice(v);
    }
    if let Some(c) = chunk {
        mp_str(&mut out, b"chunk");
        out.extend_from_slice(c);
    }
    out
}

fn str_value(s: &str) -> Vec<u8> {
    let mut v = Vec::new();
    mp_str(&mut v, s.as_bytes());
    v
}

fn uint_value(n: u64) -> Vec<u8> {
    let mut v = Vec::new();
    mp_uint(&mut v, n);
    v
}

/// The tag of case `name`.
fn tag(label: &str, name: &str) -> Vec<u8> {
    let mut t = Vec::new();
    mp_str(&mut t, format!("modes.{label}.{name}").as_bytes());
    t
}

/// Message mode, `[tag, time, record]` or with an option `[tag, time, record, option]`: the
/// aggregator must get `0x92` followed by the sender's own time and record bytes.
fn message_case(
    name: &'static str,
    tag: Vec<u8>,
    time: &[u8],
    record: &[u8],
    option: Option<Vec<u8>>,
    chunk: Option<Vec<u8>>,
) -> Case {
    let mut bytes = vec![if option.is_some() { 0x94 } else { 0x93 }];
    bytes.extend(tag);
    bytes.extend_from_slice(time);
    bytes.extend_from_slice(record);
    bytes.extend(option.unwrap_or_default());
    let entry = [&[0x92][..], time, record].concat();
    Case {
        name,
        bytes,
        expected: vec![entry],
        chunk,
    }
}

/// `[tag, <carrier header> <payload>, option?]`: Forward and (Compressed)PackedForward.
fn case(
    name: &'static str,
    tag: Vec<u8>,
    carrier: impl FnOnce(&mut Vec<u8>),
    option: Option<Vec<u8>>,
    expected: Vec<Vec<u8>>,
    chunk: Option<Vec<u8>>,
) -> Case {
    let mut bytes = vec![if option.is_some() { 0x93 } else { 0x92 }];
    bytes.extend(tag);
    carrier(&mut bytes);
    bytes.extend(option.unwrap_or_default());
    Case {
        name,
        bytes,
        expected,
        chunk,
    }
}

/// Message mode with every time form and option form.
fn message_cases(label: &str) -> Vec<Case> {
    let rec = || unique_record(label);
    let mut uint32 = vec![0xce];
    uint32.extend_from_slice(&TS.to_be_bytes());
    let mut int64 = vec![0xd3];
    int64.extend_from_slice(&(TS as i64).to_be_bytes());
    let mut float = vec![0xcb];
    float.extend_from_slice(&(TS as f64 + 0.25).to_be_bytes());
    let chunk = chunk_value(&format!("{label}-msg-fixext"));
    vec![
        message_case(
            "message 3 elements, uint32 time",
            tag(label, "msg3int"),
            &uint32,
            &rec(),
            None,
            None,
        ),
        // Any int width is an int.
        message_case(
            "message 3 elements, int64 time",
            tag(label, "msg3int64"),
            &int64,
            &rec(),
            None,
            None,
        ),
        message_case(
            "message 4 elements, EventTime fixext8, chunk",
            tag(label, "msg4fixext8"),
            &event_time(TS, 123_456_789),
            &rec(),
            Some(option_map(Some(&chunk), &[])),
            Some(chunk.clone()),
        ),
        // An empty option map (fluent-logger-golang).
        message_case(
            "message 4 elements, EventTime ext8, empty option",
            tag(label, "msg4ext8"),
            &event_time_ext8(TS, 42),
            &rec(),
            Some(vec![0x80]),
            None,
        ),
        // A float64 time (non-conforming loggers), a nil option (old Docker).
        message_case(
            "message 4 elements, float64 time, nil option",
            tag(label, "msg4float"),
            &float,
            &rec(),
            Some(vec![0xc0]),
            None,
        ),
    ]
}

/// Forward mode with the smallest and a wider array header, and v1.5 entries.
fn forward_cases(label: &str) -> Vec<Case> {
    let rec = || unique_record(label);
    let fwd: Vec<Vec<u8>> = (0..3).map(|i| entry_eventtime(TS, i, &rec())).collect();
    let fwd16: Vec<Vec<u8>> = (0..2).map(|_| entry_int(TS, &rec())).collect();
    let chunk = chunk_value(&format!("{label}-fwd"));
    // v1.5 entries [[EventTime, {}], record] (fluent-bit >= 5.0.5), with the 32-bit map
    // headers fluent-bit writes.
    let v15: Vec<Vec<u8>> = (0..2)
        .map(|i| {
            let mut e = vec![0x92, 0x92];
            e.extend(event_time(TS, i));
            e.extend_from_slice(&[0xdf, 0, 0, 0, 0]);
            e.extend(rec());
            e
        })
        .collect();
    let array = |entries: &[Vec<u8>]| {
        let entries = entries.to_vec();
        move |b: &mut Vec<u8>| {
            mp_array_header(b, entries.len());
            b.extend(entries.concat());
        }
    };
    vec![
        case(
            "forward, no option",
            tag(label, "fwd"),
            array(&fwd),
            None,
            fwd.clone(),
            None,
        ),
        // An array16 header (a sender that never uses the smallest form).
        case(
            "forward array16, option with size, fluent_signal, chunk",
            tag(label, "fwd16"),
            |b| {
                b.extend_from_slice(&[0xdc, 0x00, 0x02]);
                b.extend(fwd16.concat());
            },
            Some(option_map(
                Some(&chunk),
                &[("size", uint_value(2)), ("fluent_signal", uint_value(0))],
            )),
            fwd16.clone(),
            Some(chunk.clone()),
        ),
        case(
            "v1.5 [[EventTime, {}], record] entries",
            tag(label, "v15"),
            array(&v15),
            None,
            v15.clone(),
            None,
        ),
    ]
}

/// PackedForward as str32 and bin, gzip and zstd CompressedPackedForward.
fn packed_cases(label: &str) -> Vec<Case> {
    let rec = || unique_record(label);
    let str32: Vec<Vec<u8>> = (0..4).map(|_| entry_int(TS, &rec())).collect();
    let str32_chunk = chunk_value(&v012_chunk_id(label.len() as u64 + 7));
    let bin: Vec<Vec<u8>> = (0..3).map(|i| entry_eventtime(TS, i, &rec())).collect();
    let gzip_str: Vec<Vec<u8>> = (0..4).map(|i| entry_eventtime(TS, i, &rec())).collect();
    let gzip_str_chunk = chunk_value(&format!("{label}-gzip"));
    let gzip_bin: Vec<Vec<u8>> = (0..2).map(|i| entry_eventtime(TS, i, &rec())).collect();
    let zstd_entries: Vec<Vec<u8>> = (0..3).map(|_| entry_int(TS, &rec())).collect();
    let compressed = |n: u64, codec: &str| {
        Some(option_map(
            None,
            &[("size", uint_value(n)), ("compressed", str_value(codec))],
        ))
    };
    vec![
        // Every fluentd, with the v0.12 ack layout.
        case(
            "packed forward str32, v0.12 chunk",
            tag(label, "packedstr32"),
            |b| mp_str32(b, &str32.concat()),
            Some(option_map(Some(&str32_chunk), &[])),
            str32.clone(),
            Some(str32_chunk.clone()),
        ),
        // The spec's SHOULD.
        case(
            "packed forward bin8",
            tag(label, "packedbin"),
            |b| mp_bin(b, &bin.concat()),
            Some(option_map(None, &[("size", uint_value(3))])),
            bin.clone(),
            None,
        ),
        // Multi-member gzip in str32 (fluentd 1.x), compressed: gzip.
        case(
            "compressed packed forward, 4 gzip members in str32, chunk",
            tag(label, "gzipstr32"),
            |b| {
                mp_str32(
                    b,
                    &gzip_str
                        .iter()
                        .flat_map(|e| gzip_member(e))
                        .collect::<Vec<u8>>(),
                )
            },
            Some(option_map(
                Some(&gzip_str_chunk),
                &[("size", uint_value(4)), ("compressed", str_value("gzip"))],
            )),
            gzip_str.clone(),
            Some(gzip_str_chunk.clone()),
        ),
        // One gzip member as bin (fluent-bit).
        case(
            "compressed packed forward, gzip bin",
            tag(label, "gzipbin"),
            |b| mp_bin(b, &gzip_member(&gzip_bin.concat())),
            compressed(2, "gzip"),
            gzip_bin.clone(),
            None,
        ),
        // zstd (fluentd 1.19+).
        case(
            "compressed packed forward, zstd",
            tag(label, "zstd"),
            |b| {
                mp_bin(
                    b,
                    &zstd::encode_all(&zstd_entries.concat()[..], 3).expect("zstd"),
                )
            },
            compressed(3, "zstd"),
            zstd_entries.clone(),
            None,
        ),
    ]
}

/// Non-UTF-8 bytes inside str values, bin inside a record, str8 and raw16 values.
fn odd_record_case(label: &str) -> Case {
    let mut r = Vec::new();
    mp_map_header(&mut r, 4);
    mp_str(&mut r, b"raw");
    r.extend_from_slice(&[0xa4, 0xff, 0xfe, 0x80, 0xc3]);
    mp_str(&mut r, b"bin");
    mp_bin(&mut r, &[0, 1, 2, 0xff]);
    mp_str(&mut r, b"raw16");
    mp_raw(&mut r, &[0xe9; 40]);
    mp_str(&mut r, b"id");
    r.extend(unique_record(label));
    let e = entry_int(TS, &r);
    case(
        "non-UTF-8 str values, bin and raw16 in a record",
        tag(label, "nonutf8"),
        |b| mp_str32(b, &e),
        None,
        vec![e.clone()],
        None,
    )
}

/// A fresh set of requests (new unique records each call) covering every mode.
fn cases(label: &str) -> Vec<Case> {
    let mut cases = message_cases(label);
    cases.extend(forward_cases(label));
    cases.extend(packed_cases(label));
    cases.push(odd_record_case(label));
    cases
}

fn expected_ack_for(chunk: &[u8]) -> Vec<u8> {
    let mut out = vec![0x81, 0xa3, b'a', b'c', b'k'];
    out.extend_from_slice(chunk);
    out
}

#[test]
fn every_mode_and_framing_arrives_byte_identical() {
    let agg = Aggregator::start();
    let gate = Ackgate::start(agg.addr());
    let mut expected = Vec::new();

    // 1. One connection per request, written whole; acks read v0.12-style.
    for case in cases("each") {
        let mut stream = connect(gate.addr());
        stream.write_all(&case.bytes).expect("write");
        if let Some(chunk) = &case.chunk {
            let ack = read_one_ack(&mut stream, Duration::from_secs(10));
            assert_eq!(ack, expected_ack_for(chunk), "ack for {}", case.name);
        }
        expected.extend(case.expected);
    }

    // 2. All requests in one write on one connection, with nil no-ops before, between and
    //    after them; the acks come back in request order.
    {
        let cases = cases("batch");
        let mut bytes = vec![0xc0];
        for case in &cases {
            bytes.extend_from_slice(&case.bytes);
            bytes.extend_from_slice(&[0xc0, 0xc0]);
        }
        let mut stream = connect(gate.addr());
        stream.write_all(&bytes).expect("write batch");
        let want: Vec<Vec<u8>> = cases
            .iter()
            .filter_map(|c| c.chunk.as_deref().map(expected_ack_for))
            .collect();
        let acks = read_values(&mut stream, want.len(), Duration::from_secs(10));
        assert_eq!(acks, want, "pipelined acks out of order or wrong");
        for case in cases {
            expected.extend(case.expected);
        }
    }

    // 3. Every request dribbled one byte per write (TCP_NODELAY: separate segments).
    {
        let cases = cases("dribble");
        let mut stream = connect(gate.addr());
        stream.set_nodelay(true).expect("nodelay");
        for case in &cases {
            for byte in &case.bytes {
                stream
                    .write_all(std::slice::from_ref(byte))
                    .expect("write byte");
            }
            if let Some(chunk) = &case.chunk {
                let ack = read_one_ack(&mut stream, Duration::from_secs(10));
                assert_eq!(
                    ack,
                    expected_ack_for(chunk),
                    "ack for dribbled {}",
                    case.name
                );
            }
        }
        for case in cases {
            expected.extend(case.expected);
        }
    }

    agg.wait_for_all(&expected, Duration::from_secs(20));
    assert_same_events(&expected, &agg.events(), "all modes");
    for r in agg.requests() {
        assert_eq!(r.entries_marker(), 0xdb, "upstream entries are not str32");
        assert_eq!(r.size(), Some(r.events as i64), "size option is wrong");
        assert!(
            String::from_utf8_lossy(&r.tag).starts_with("modes."),
            "unexpected tag {:?}",
            r.tag
        );
    }
    assert!(
        agg.errors().is_empty(),
        "aggregator errors: {:?}",
        agg.errors()
    );
    let warnings = gate.log_lines_with(&["WARN"]);
    assert!(
        warnings.is_empty(),
        "valid input produced warnings: {warnings:?}"
    );
}
