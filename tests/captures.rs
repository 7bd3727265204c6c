//! Regression tests over the real wire captures in `../shared/captures/` (README.md there lists
//! every file, its events, chunk ids and ack bytes).
//!
//! Every request written by fluentd v0.10 / v0.12 / v1.18, fluent-bit 5.1.1 and the hand-built
//! clients must decode to the tag, mode, event count and chunk bytes the README gives, with the
//! entries sliced byte-for-byte from the input (DESIGN.md invariant 6), whether the file arrives
//! whole, one byte at a time or in random pieces (PROTOCOL.md §2.1: a request can be split
//! anywhere). The acks ackgate would write must equal, byte for byte, what the real receivers
//! wrote (PROTOCOL.md §13.1, §13.2).
//!
//! The directory is `$ACKGATE_CAPTURES` if set, else `<crate>/../shared/captures`.

mod support;

use std::collections::BTreeSet;
use std::io::Read;

use ackgate::forward::ack::decode_ack;
use ackgate::forward::entries::{count_entries, entry_len};
use ackgate::forward::msgpack::{read_header, value_len, Header};
use ackgate::forward::{Decoded, Frame, FrameError, Mode};

use support::*;

/// Flip to `true` once the JSON variant of the protocol (PROTOCOL.md §2.1, §13.13) is decoded.
const JSON_REQUESTS_ACCEPTED: bool = false;

// ------------------------------------------------------------------------------------------------
// Feeding bytes to the decoder.

/// Decode `data` whole, byte by byte and in random pieces; all must agree. Returns the result.
fn decode_every_way(data: &[u8]) -> Outcome {
    let reference = whole(data);
    assert_eq!(feed(data, || 1), reference, "one byte at a time");
    for seed in 1..=8u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let max = 1 + (seed as usize * 7) % 40;
        let got = feed(data, || 1 + (rng.next() as usize) % max);
        assert_eq!(got, reference, "random pieces (seed {seed}, max {max})");
    }
    reference
}

fn frames(outcome: &Outcome) -> Vec<&Frame> {
    outcome
        .decoded
        .iter()
        .map(|d| match d {
            Decoded::Frame(f) => f,
            Decoded::Nil => panic!("unexpected nil"),
        })
        .collect()
}

// ------------------------------------------------------------------------------------------------
// An independent reading of request headers, to locate the entries in the input.

/// (header length, content length) of a str or bin at `buf[0]`.
fn str_or_bin_header(buf: &[u8]) -> (usize, usize) {
    let be = |n: usize| buf[1..=n].iter().fold(0usize, |a, &b| a << 8 | b as usize);
    match buf[0] {
        m @ 0xa0..=0xbf => (1, (m & 0x1f) as usize),
        0xd9 | 0xc4 => (2, be(1)),
        0xda | 0xc5 => (3, be(2)),
        0xdb | 0xc6 => (5, be(4)),
        m => panic!("not a str/bin: 0x{m:02x}"),
    }
}

/// (header length, element count) of an array at `buf[0]`.
fn array_header(buf: &[u8]) -> (usize, usize) {
    let be = |n: usize| buf[1..=n].iter().fold(0usize, |a, &b| a << 8 | b as usize);
    match buf[0] {
        m @ 0x90..=0x9f => (1, (m & 0x0f) as usize),
        0xdc => (3, be(2)),
        0xdd => (5, be(4)),
        m => panic!("not an array: 0x{m:02x}"),
    }
}

fn gunzip_all(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(payload)
        .read_to_end(&mut out)
        .expect("valid gzip");
    out
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Check that `frame` is the request occupying `request` (its exact wire bytes), as the README
/// describes it in `want`.
fn check_frame(want: &CapturedRequest, frame: &Frame, request: &[u8], file: &[u8]) {
    let name = want.file;
    assert_eq!(frame.wire_len, request.len(), "{name}: wire_len");
    assert_eq!(frame.tag, want.tag.as_bytes(), "{name}: tag");
    assert_eq!(frame.mode, want.mode, "{name}: mode");
    assert_eq!(frame.events, want.events, "{name}: events");
    assert_eq!(frame.chunk.as_deref(), want.chunk, "{name}: chunk bytes");
    assert_eq!(
        count_entries(&frame.entries, DEPTH),
        Ok(frame.events),
        "{name}: entries walk"
    );

    let (array_len, arity) = array_header(request);
    let (tag_hdr, tag_len) = str_or_bin_header(&request[array_len..]);
    assert_eq!(
        &request[array_len + tag_hdr..array_len + tag_hdr + tag_len],
        want.tag.as_bytes()
    );
    let second = array_len + tag_hdr + tag_len;
    // Where the option (if any) starts, to check that nothing but one option value follows.
    let option_start = match want.mode {
        Mode::PackedForward | Mode::CompressedPackedForward(_) => {
            let (hdr, len) = str_or_bin_header(&request[second..]);
            let payload = &request[second + hdr..second + hdr + len];
            if want.mode == Mode::PackedForward {
                assert_eq!(&frame.entries[..], payload, "{name}: entries slice");
                let at = find(file, &frame.entries).expect("entries are a slice of the file");
                assert!(at > 0, "{name}: entries located in the file");
            } else {
                assert_eq!(
                    &frame.entries[..],
                    &gunzip_all(payload)[..],
                    "{name}: inflated entries"
                );
            }
            second + hdr + len
        }
        Mode::Forward => {
            let (hdr, count) = array_header(&request[second..]);
            assert_eq!(count as u32, want.events, "{name}: forward array count");
            let start = second + hdr;
            let end = start + frame.entries.len();
            assert_eq!(
                &frame.entries[..],
                &request[start..end],
                "{name}: entries are the bytes after the array header"
            );
            end
        }
        Mode::Message => {
            assert_eq!(frame.entries[0], 0x92, "{name}: our entry header");
            let end = second + frame.entries.len() - 1;
            assert_eq!(
                &frame.entries[1..],
                &request[second..end],
                "{name}: sender's time and record bytes"
            );
            end
        }
    };
    let option = &request[option_start..];
    let expected_options = arity - if want.mode == Mode::Message { 3 } else { 2 };
    match expected_options {
        0 => assert!(option.is_empty(), "{name}: trailing bytes"),
        1 => assert_eq!(
            value_len(option, DEPTH),
            Ok(Some(option.len())),
            "{name}: one option value"
        ),
        n => panic!("{name}: arity leaves {n} options"),
    }
    if let Some(chunk) = want.chunk {
        assert!(option.ends_with(chunk) || find(option, chunk).is_some());
    }

    // Entry shapes and order: seq 1, 2, ... as the test client sent them.
    let mut rest = &frame.entries[..];
    let mut seq = 1u8;
    while !rest.is_empty() {
        let len = entry_len(rest, u32::from(seq) - 1, DEPTH).expect("entry");
        let entry = &rest[..len];
        let prefix: &[u8] = match want.shape {
            EntryShape::Int => &[0x92, 0xce],
            EntryShape::Event => &[0x92, 0xd7, 0x00],
            EntryShape::MetaEvent => &[0x92, 0x92, 0xd7, 0x00],
            EntryShape::Array32Event => &[0xdd, 0, 0, 0, 2, 0xd7, 0x00],
        };
        assert!(
            entry.starts_with(prefix),
            "{name}: entry {seq} {entry:02x?}"
        );
        if want.shape == EntryShape::MetaEvent {
            assert_eq!(
                &entry[12..17],
                &[0xdf, 0, 0, 0, 0],
                "{name}: empty map32 metadata"
            );
        }
        assert!(
            find(entry, &[0xa3, b's', b'e', b'q', seq]).is_some(),
            "{name}: entry {seq} carries seq {seq}"
        );
        rest = &rest[len..];
        seq += 1;
    }
    assert_eq!(u32::from(seq) - 1, want.events);
}

/// Decode one request file (after its PING, if any) every way, and check it.
fn check_request_file(want: &CapturedRequest) -> Frame {
    let file = read_capture(want.file);
    let start = if want.ping {
        let ping = value_len(&file, DEPTH).unwrap().expect("complete PING");
        assert_ping_rejected(&file[..ping], want.file);
        ping
    } else {
        0
    };
    let data = &file[start..];
    let outcome = decode_every_way(data);
    assert_eq!(outcome.error, None, "{}", want.file);
    assert_eq!(
        outcome.consumed,
        data.len(),
        "{}: bytes left over",
        want.file
    );
    let got = frames(&outcome);
    assert_eq!(got.len(), 1, "{}: one request per file", want.file);
    check_frame(want, got[0], data, &file);
    got[0].clone()
}

/// A handshake PING `["PING", host, salt, digest, user, password]` must never pass as a data
/// frame: a legacy sender's data parsed as a PING fails, and so must the reverse (§7.2).
fn assert_ping_rejected(ping: &[u8], name: &str) {
    assert_eq!(ping[0], 0x96, "{name}: PING is a 6-element array");
    assert_eq!(&ping[1..6], b"\xa4PING");
    let outcome = decode_every_way(ping);
    assert!(
        outcome.decoded.is_empty(),
        "{name}: PING yielded {outcome:?}"
    );
    assert_eq!(
        outcome.error,
        Some(FrameError::BadArity { count: 6 }),
        "{name}: PING"
    );
}

/// fluentd v0.12 does one `recv(1024)` and a strict `MessagePack.unpack` (PROTOCOL.md §6.3,
/// §13.2): the ack bytes must be exactly one map, with nothing after it.
fn assert_v012_strict(ack: &[u8]) {
    assert!(ack.len() <= 1024, "fits one recv(1024)");
    assert_eq!(
        value_len(ack, DEPTH),
        Ok(Some(ack.len())),
        "exactly one value"
    );
    assert!(
        matches!(read_header(ack), Some(Header::Map { count: 1, .. })),
        "a one-pair map: {ack:02x?}"
    );
    let (_, used) = decode_ack(ack, 1024).unwrap().expect("complete ack");
    assert_eq!(used, ack.len());
}

/// The content of a str/bin chunk value (what `decode_ack` returns).
fn chunk_content(chunk: &[u8]) -> &[u8] {
    let (hdr, len) = str_or_bin_header(chunk);
    &chunk[hdr..hdr + len]
}

// ------------------------------------------------------------------------------------------------

#[test]
fn every_capture_file_is_covered() {
    let dir = captures_dir();
    let mut known: BTreeSet<&str> = CAPTURED_REQUESTS.iter().map(|e| e.file).collect();
    known.extend(ACK_REPLIES.iter().map(|(reply, _)| *reply));
    known.extend(SECURE_ACK_REPLIES.iter().map(|(reply, _)| *reply));
    known.extend(SECURE_NO_ACK_REPLIES);
    known.extend(PING_ONLY);
    known.extend([HELO_FILE, PONG_FILE, JSON_REQUEST, JSON_REPLY, "README.md"]);
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("captures dir {}: {e} (set ACKGATE_CAPTURES)", dir.display()))
    {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".udp.bin") || name.ends_with(".udp.reply.bin") {
            continue;
        }
        assert!(
            known.contains(name.as_str()),
            "{name} is a capture this file does not test yet: add it"
        );
        seen += 1;
    }
    assert_eq!(
        seen,
        known.len(),
        "files listed here are missing from {}",
        dir.display()
    );
}

#[test]
fn sender_and_client_requests_decode_as_the_readme_says() {
    for want in CAPTURED_REQUESTS {
        check_request_file(want);
    }
}

#[test]
fn requests_back_to_back_on_one_connection() {
    // All plain request files concatenated, with nil no-ops between some: each must still come
    // out as the same frame, whatever the piece boundaries.
    let mut stream = Vec::new();
    let mut singles = Vec::new();
    for (i, want) in CAPTURED_REQUESTS.iter().filter(|e| !e.ping).enumerate() {
        let file = read_capture(want.file);
        singles.push(whole(&file).decoded.remove(0));
        stream.extend_from_slice(&file);
        if i % 3 == 0 {
            stream.push(0xc0);
            singles.push(Decoded::Nil);
        }
    }
    let outcome = decode_every_way(&stream);
    assert_eq!(outcome.error, None);
    assert_eq!(outcome.consumed, stream.len());
    assert_eq!(outcome.decoded, singles);
}

#[test]
fn a_request_cut_short_is_pending_not_an_error() {
    for want in CAPTURED_REQUESTS.iter().filter(|e| !e.ping) {
        let file = read_capture(want.file);
        for cut in 0..file.len() {
            let outcome = whole(&file[..cut]);
            assert_eq!(outcome.error, None, "{} cut at {cut}", want.file);
            assert!(outcome.decoded.is_empty(), "{} cut at {cut}", want.file);
            assert_eq!(outcome.consumed, 0);
        }
    }
}

#[test]
fn handshake_messages_are_never_frames() {
    for name in PING_ONLY {
        let file = read_capture(name);
        assert_eq!(whole_values(&file).len(), 1, "{name}: one PING");
        assert_ping_rejected(&file, name);
    }
    // A PING in front of a request stops the connection there: no frame slips through.
    for want in CAPTURED_REQUESTS.iter().filter(|e| e.ping) {
        let outcome = decode_every_way(&read_capture(want.file));
        assert!(outcome.decoded.is_empty(), "{}", want.file);
        assert_eq!(outcome.error, Some(FrameError::BadArity { count: 6 }));
    }
    // HELO `["HELO", {...}]` has a str first and a map second; PONG has 5 elements.
    let helo = read_capture(HELO_FILE);
    let outcome = decode_every_way(&helo);
    assert!(outcome.decoded.is_empty());
    assert!(
        matches!(
            outcome.error,
            Some(FrameError::UnknownMode { marker: 0x83 })
        ),
        "{outcome:?}"
    );
    let pong = read_capture(PONG_FILE);
    let outcome = decode_every_way(&pong);
    assert!(outcome.decoded.is_empty());
    assert_eq!(outcome.error, Some(FrameError::BadArity { count: 5 }));
    // The README says these two files are the first 65 and next 155 bytes of the secure reply.
    let reply = read_capture("fluentd-1.18-in_forward-secure.reply.bin");
    assert_eq!(&reply[..65], &helo[..]);
    assert_eq!(&reply[65..220], &pong[..]);
}

#[test]
fn acks_equal_the_real_receivers_bytes() {
    for (reply_name, request_name) in ACK_REPLIES {
        let reply = read_capture(reply_name);
        let frame = check_request_file(captured_request(request_name));
        let chunk = frame.chunk.as_deref().expect("request has a chunk");
        let ack = ack_for_value(chunk);
        assert_eq!(ack, reply, "{reply_name} vs ack of {request_name}");
        assert_v012_strict(&reply);
        let (value, _) = decode_ack(&reply, 1024).unwrap().unwrap();
        assert_eq!(value, chunk_content(chunk), "{reply_name}");
    }
}

#[test]
fn acks_after_a_handshake_equal_the_real_receivers_bytes() {
    for (reply_name, sender_name) in SECURE_ACK_REPLIES {
        let reply = read_capture(reply_name);
        let values = whole_values(&reply);
        assert_eq!(values.len(), 3, "{reply_name}: HELO, PONG, ack");
        assert!(values[0].starts_with(b"\x92\xa4HELO"), "{reply_name}");
        assert!(values[1].starts_with(b"\x95\xa4PONG\xc3"), "{reply_name}");
        let frame = check_request_file(captured_request(sender_name));
        let ack = ack_for_value(frame.chunk.as_deref().expect("chunk"));
        assert_eq!(&ack[..], values[2], "{reply_name} vs ack of {sender_name}");
        assert_v012_strict(&ack);
    }
    for reply_name in SECURE_NO_ACK_REPLIES {
        let values_owned = read_capture(reply_name);
        let values = whole_values(&values_owned);
        assert_eq!(values.len(), 2, "{reply_name}: HELO, PONG and no ack");
        assert!(values[0].starts_with(b"\x92\xa4HELO"));
        assert!(values[1].starts_with(b"\x95\xa4PONG\xc3"));
    }
}

#[test]
fn acks_the_capture_receiver_sent_to_each_sender() {
    // The capture receiver echoed each chunk unchanged; every sender accepted that (README).
    for want in CAPTURED_REQUESTS.iter().filter(|e| e.chunk.is_some()) {
        let frame = check_request_file(want);
        let chunk = frame.chunk.as_deref().unwrap();
        let ack = ack_for_value(chunk);
        assert_eq!(&ack[..5], b"\x81\xa3ack");
        assert_eq!(&ack[5..], chunk);
        assert_v012_strict(&ack);
    }
    // fluentd's ids are a 25-byte fixstr ending in "\n" and must keep it (PROTOCOL.md §13.1).
    let v012 = check_request_file(captured_request(
        "fluentd-0.12.43-out_forward-ack.sender.bin",
    ));
    let ack = ack_for_value(v012.chunk.as_deref().unwrap());
    assert_eq!(ack.len(), 31);
    assert_eq!(ack[5], 0xb9);
    assert_eq!(ack.last(), Some(&b'\n'));
}

#[test]
fn fluent_bit_metadata_entries_are_accepted() {
    // `[[EventTime, {}], record]` (v1.5; fluent-bit ≥5.0.5 default), inline and inside gzip.
    for want in CAPTURED_REQUESTS
        .iter()
        .filter(|e| e.shape == EntryShape::MetaEvent)
    {
        let frame = check_request_file(want);
        assert_eq!(frame.events, 4, "{}", want.file);
    }
    let gz = check_request_file(captured_request(
        "fluent-bit-5.1.1-out_forward-gzip.sender.bin",
    ));
    assert_eq!(gz.mode, GZIP_MODE);
    assert_eq!(gz.entries.len(), 168, "README: ISIZE 168");
}

#[test]
fn fluentd_gzip_is_four_members_in_a_str32() {
    let file = read_capture("fluentd-1.18-out_forward-gzip.sender.bin");
    let (hdr, len) = str_or_bin_header(&file[14..]);
    assert_eq!((file[14], hdr, len), (0xdb, 5, 195));
    let payload = &file[19..19 + len];
    let members = payload
        .windows(4)
        .filter(|w| w == &[0x1f, 0x8b, 8, 0])
        .count();
    assert_eq!(members, 4);
    // A single-member decoder would stop after the first event: the codec must not.
    let mut first = Vec::new();
    flate2::read::GzDecoder::new(payload)
        .read_to_end(&mut first)
        .unwrap();
    assert_eq!(count_entries(&first, DEPTH), Ok(1));
    let frame = check_request_file(captured_request("fluentd-1.18-out_forward-gzip.sender.bin"));
    assert_eq!(frame.events, 4);
}

#[test]
fn json_request_is_rejected_for_now() {
    let json = read_capture(JSON_REQUEST);
    assert_eq!(&json[..], br#"["t",1700000000,{"a":1},{"chunk":"j1"}]"#);
    let outcome = decode_every_way(&json);
    if JSON_REQUESTS_ACCEPTED {
        assert_eq!(outcome.error, None, "{outcome:?}");
        let got = frames(&outcome);
        assert_eq!(got.len(), 1);
        assert_eq!(&got[0].tag[..], b"t");
        assert_eq!(got[0].mode, Mode::Message);
        assert_eq!(got[0].events, 1);
    } else {
        // `[` is 0x5b, a msgpack positive fixint: not an array, so the connection is refused
        // before any frame is produced.
        assert!(outcome.decoded.is_empty(), "{outcome:?}");
        assert_eq!(outcome.error, Some(FrameError::NotArray { marker: b'[' }));
    }
    // fluentd answered in JSON; that is not a msgpack ack.
    let reply = read_capture(JSON_REPLY);
    assert_eq!(&reply[..], br#"{"ack":"j1"}"#);
    assert!(decode_ack(&reply, 1024).is_err());
}

#[test]
fn udp_heartbeats_are_one_zero_byte() {
    let mut count = 0;
    for entry in std::fs::read_dir(captures_dir()).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name.ends_with(".udp.bin") || name.ends_with(".udp.reply.bin") {
            assert_eq!(read_capture(&name), [0x00], "{name}");
            count += 1;
        }
    }
    assert_eq!(
        count, 4,
        "heartbeat captures: v0.10, v0.12, client, fluentd reply"
    );
}
