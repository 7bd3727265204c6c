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

/// A fresh set of requests (new unique records each call) covering every mode.
fn cases(label: &str) -> Vec<Case> {
    let tag = |name: &str| {
        let mut t = Vec::new();
        mp_str(&mut t, format!("modes.{label}.{name}").as_bytes());
        t
    };
    let rec = || unique_record(label);
    let mut cases = Vec::new();

    // Message, 3 elements, uint32 time.
    {
        let r = rec();
        let mut b = vec![0x93];
        b.extend(tag("msg3int"));
        b.push(0xce);
        b.extend_from_slice(&TS.to_be_bytes());
        b.extend_from_slice(&r);
        cases.push(Case {
            name: "message 3 elements, uint32 time",
            bytes: b,
            expected: vec![entry_int(TS, &r)],
            chunk: None,
        });
    }
    // Message, 3 elements, int64 time (any int width is an int).
    {
        let r = rec();
        let mut time = vec![0xd3];
        time.extend_from_slice(&(TS as i64).to_be_bytes());
        let mut b = vec![0x93];
        b.extend(tag("msg3int64"));
        b.extend_from_slice(&time);
        b.extend_from_slice(&r);
        let mut e = vec![0x92];
        e.extend_from_slice(&time);
        e.extend_from_slice(&r);
        cases.push(Case {
            name: "message 3 elements, int64 time",
            bytes: b,
            expected: vec![e],
            chunk: None,
        });
    }
    // Message, 4 elements, EventTime fixext8, with chunk.
    {
        let r = rec();
        let chunk = chunk_value(&format!("{label}-msg-fixext"));
        let mut b = vec![0x94];
        b.extend(tag("msg4fixext8"));
        b.extend(event_time(TS, 123_456_789));
        b.extend_from_slice(&r);
        b.extend(option_map(Some(&chunk), &[]));
        cases.push(Case {
            name: "message 4 elements, EventTime fixext8, chunk",
            bytes: b,
            expected: vec![entry_eventtime(TS, 123_456_789, &r)],
            chunk: Some(chunk),
        });
    }
    // Message, 4 elements, EventTime ext8, empty option map (fluent-logger-golang).
    {
        let r = rec();
        let mut b = vec![0x94];
        b.extend(tag("msg4ext8"));
        b.extend(event_time_ext8(TS, 42));
        b.extend_from_slice(&r);
        b.push(0x80);
        let mut e = vec![0x92];
        e.extend(event_time_ext8(TS, 42));
        e.extend_from_slice(&r);
        cases.push(Case {
            name: "message 4 elements, EventTime ext8, empty option",
            bytes: b,
            expected: vec![e],
            chunk: None,
        });
    }
    // Message, float64 time (non-conforming loggers), nil option (old Docker).
    {
        let r = rec();
        let mut time = vec![0xcb];
        time.extend_from_slice(&(TS as f64 + 0.25).to_be_bytes());
        let mut b = vec![0x94];
        b.extend(tag("msg4float"));
        b.extend_from_slice(&time);
        b.extend_from_slice(&r);
        b.push(0xc0);
        let mut e = vec![0x92];
        e.extend_from_slice(&time);
        e.extend_from_slice(&r);
        cases.push(Case {
            name: "message 4 elements, float64 time, nil option",
            bytes: b,
            expected: vec![e],
            chunk: None,
        });
    }
    // Forward, fixarray of entries, no option.
    {
        let es: Vec<Vec<u8>> = (0..3).map(|i| entry_eventtime(TS, i, &rec())).collect();
        let mut b = vec![0x92];
        b.extend(tag("fwd"));
        mp_array_header(&mut b, es.len());
        b.extend(es.concat());
        cases.push(Case {
            name: "forward, no option",
            bytes: b,
            expected: es,
            chunk: None,
        });
    }
    // Forward, array16 header (a sender that never uses the smallest form), option + chunk.
    {
        let es: Vec<Vec<u8>> = (0..2).map(|_| entry_int(TS, &rec())).collect();
        let chunk = chunk_value(&format!("{label}-fwd"));
        let mut b = vec![0x93];
        b.extend(tag("fwd16"));
        b.extend_from_slice(&[0xdc, 0x00, 0x02]);
        b.extend(es.concat());
        b.extend(option_map(
            Some(&chunk),
            &[("size", uint_value(2)), ("fluent_signal", uint_value(0))],
        ));
        cases.push(Case {
            name: "forward array16, option with size, fluent_signal, chunk",
            bytes: b,
            expected: es,
            chunk: Some(chunk),
        });
    }
    // PackedForward, str32 entries (every fluentd), with chunk (v0.12 ack layout).
    {
        let es: Vec<Vec<u8>> = (0..4).map(|_| entry_int(TS, &rec())).collect();
        let chunk = chunk_value(&v012_chunk_id(label.len() as u64 + 7));
        let mut b = vec![0x93];
        b.extend(tag("packedstr32"));
        mp_str32(&mut b, &es.concat());
        b.extend(option_map(Some(&chunk), &[]));
        cases.push(Case {
            name: "packed forward str32, v0.12 chunk",
            bytes: b,
            expected: es,
            chunk: Some(chunk),
        });
    }
    // PackedForward, bin entries (the spec's SHOULD).
    {
        let es: Vec<Vec<u8>> = (0..3).map(|i| entry_eventtime(TS, i, &rec())).collect();
        let mut b = vec![0x93];
        b.extend(tag("packedbin"));
        mp_bin(&mut b, &es.concat());
        b.extend(option_map(None, &[("size", uint_value(3))]));
        cases.push(Case {
            name: "packed forward bin8",
            bytes: b,
            expected: es,
            chunk: None,
        });
    }
    // CompressedPackedForward, multi-member gzip in str32 (fluentd 1.x), compressed: gzip.
    {
        let es: Vec<Vec<u8>> = (0..4).map(|i| entry_eventtime(TS, i, &rec())).collect();
        let payload: Vec<u8> = es.iter().flat_map(|e| gzip_member(e)).collect();
        let chunk = chunk_value(&format!("{label}-gzip"));
        let mut b = vec![0x93];
        b.extend(tag("gzipstr32"));
        mp_str32(&mut b, &payload);
        b.extend(option_map(
            Some(&chunk),
            &[("size", uint_value(4)), ("compressed", str_value("gzip"))],
        ));
        cases.push(Case {
            name: "compressed packed forward, 4 gzip members in str32, chunk",
            bytes: b,
            expected: es,
            chunk: Some(chunk),
        });
    }
    // CompressedPackedForward, one gzip member as bin (fluent-bit).
    {
        let es: Vec<Vec<u8>> = (0..2).map(|i| entry_eventtime(TS, i, &rec())).collect();
        let payload = gzip_member(&es.concat());
        let mut b = vec![0x93];
        b.extend(tag("gzipbin"));
        mp_bin(&mut b, &payload);
        b.extend(option_map(
            None,
            &[("size", uint_value(2)), ("compressed", str_value("gzip"))],
        ));
        cases.push(Case {
            name: "compressed packed forward, gzip bin",
            bytes: b,
            expected: es,
            chunk: None,
        });
    }
    // CompressedPackedForward, zstd (fluentd 1.19+).
    {
        let es: Vec<Vec<u8>> = (0..3).map(|_| entry_int(TS, &rec())).collect();
        let payload = zstd::encode_all(&es.concat()[..], 3).expect("zstd");
        let mut b = vec![0x93];
        b.extend(tag("zstd"));
        mp_bin(&mut b, &payload);
        b.extend(option_map(
            None,
            &[("size", uint_value(3)), ("compressed", str_value("zstd"))],
        ));
        cases.push(Case {
            name: "compressed packed forward, zstd",
            bytes: b,
            expected: es,
            chunk: None,
        });
    }
    // v1.5 entries [[EventTime, {}], record] in Forward mode (fluent-bit >= 5.0.5), with the
    // 32-bit map headers fluent-bit writes.
    {
        let es: Vec<Vec<u8>> = (0..2)
            .map(|i| {
                let mut e = vec![0x92, 0x92];
                e.extend(event_time(TS, i));
                e.extend_from_slice(&[0xdf, 0, 0, 0, 0]);
                e.extend(rec());
                e
            })
            .collect();
        let mut b = vec![0x92];
        b.extend(tag("v15"));
        mp_array_header(&mut b, 2);
        b.extend(es.concat());
        cases.push(Case {
            name: "v1.5 [[EventTime, {}], record] entries",
            bytes: b,
            expected: es,
            chunk: None,
        });
    }
    // Non-UTF-8 bytes inside str values, bin inside a record, str8 and raw16 values.
    {
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
        let mut b = vec![0x92];
        b.extend(tag("nonutf8"));
        mp_str32(&mut b, &e);
        cases.push(Case {
            name: "non-UTF-8 str values, bin and raw16 in a record",
            bytes: b,
            expected: vec![e],
            chunk: None,
        });
    }
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
