//! fluentd in_forward's JSON variant (PROTOCOL.md §2.1, §13.13): a connection whose first byte
//! is `{` or `[` carries JSON values back to back instead of msgpack, and is answered in JSON.
//!
//! [`JsonDecoder::decode`] follows the msgpack decoder's contract: `Ok(None)` until one whole
//! value is buffered, then one [`Decoded`] per value, errors meaning "close this connection".
//! Finding the end of a value is a resumable scan over brackets and strings (so an 8 MiB value
//! arriving in small reads is not re-parsed from byte 0 each time); only a complete value goes
//! through serde_json. Requests become ordinary [`Frame`]s: Message `[tag, time, record,
//! option?]` and Forward `[tag, [[time, record], ...], option?]`, with each event encoded to
//! msgpack (JSON carries no bytes to keep, so invariant 6's "as the sender wrote them" means
//! "as the sender meant them" here). PackedForward needs a binary payload: rejected.
//!
//! The `chunk` option is kept as msgpack str bytes in [`Frame::chunk`], like a msgpack request's,
//! but the sender expects a JSON ack: [`chunk_json_value`] gets the string back and
//! [`encode_json_ack`] writes `{"ack":"<chunk>"}` exactly as fluentd 1.18 does
//! (captures/fluentd-1.18-in_forward-json.reply.bin). Invariant 4: anything else is an error.

use bytes::{Bytes, BytesMut};
use serde_json::Value;

use super::frame::{Decoded, Frame, Limits, Mode, Signal};
use super::msgpack::{read_header, Header};
use super::packed::{put_map_header, put_str};
use super::value::json_to_msgpack;

/// Why a JSON request was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonFrameError {
    #[error("invalid JSON: {0}")]
    Syntax(String),
    #[error("JSON request larger than max_frame_bytes ({limit} bytes)")]
    TooLarge { limit: usize },
    #[error("JSON nesting deeper than {limit}")]
    TooDeep { limit: usize },
    #[error("JSON value is not a request array (first byte 0x{first:02x})")]
    NotArray { first: u8 },
    #[error("request array has {count} elements, expected 2 to 4")]
    BadArity { count: usize },
    #[error("tag is not a string")]
    BadTag,
    #[error("PackedForward (string entries) cannot be carried in JSON")]
    PackedForward,
    #[error("second element is neither an entries array nor a time")]
    UnknownMode,
    #[error("{mode:?} request with {count} elements")]
    ModeArity { mode: Mode, count: usize },
    #[error("Message-mode time is not a number")]
    BadTime,
    #[error("Message-mode record is not an object")]
    BadMessageRecord,
    #[error("entry {index} is not [number, object]")]
    BadEntry { index: usize },
    #[error("option is not an object or null")]
    BadOption,
    #[error("option {key:?} has the wrong type")]
    BadOptionValue { key: &'static str },
    #[error("fluent_signal {0}: metrics and traces need a msgpack bin payload; JSON requests carry logs only")]
    UnsupportedSignal(i64),
    #[error("request is empty: no entries")]
    Empty,
}

/// True if a connection whose first byte is `first` speaks JSON (fluentd's own test).
pub fn is_json_start(first: u8) -> bool {
    first == b'{' || first == b'['
}

/// Finds and converts JSON requests in one connection's byte stream.
#[derive(Debug, Clone)]
pub struct JsonDecoder {
    limits: Limits,
    scan: Scan,
}

/// Where the bracket scan of the value at the front of the buffer stands.
#[derive(Debug, Clone, Default)]
struct Scan {
    /// Bytes of the buffer already scanned.
    pos: usize,
    /// Open arrays and objects.
    depth: usize,
    in_string: bool,
    /// The previous byte in a string was an unescaped backslash.
    escaped: bool,
}

/// JSON's insignificant whitespace (RFC 8259 §2).
fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

impl JsonDecoder {
    pub fn new(limits: Limits) -> Self {
        JsonDecoder {
            limits,
            scan: Scan::default(),
        }
    }

    /// Take one JSON value off the front of `buf`: a request becomes a [`Decoded::Frame`],
    /// `null` a [`Decoded::Nil`] (the msgpack nil's keep-alive, which fluentd also ignores).
    /// `Ok(None)` while the value is incomplete or only whitespace is buffered.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Decoded>, JsonFrameError> {
        if self.scan.pos == 0 {
            let ws = buf.iter().take_while(|&&b| is_ws(b)).count();
            let _ = buf.split_to(ws);
        }
        let Some(&first) = buf.first() else {
            return Ok(None);
        };
        let end = match first {
            b'[' => match self.scan_array(buf)? {
                Some(end) => end,
                None => return Ok(None),
            },
            b'n' => {
                if buf.len() < 4 && b"null".starts_with(buf) {
                    return Ok(None);
                }
                if !buf.starts_with(b"null") {
                    return Err(JsonFrameError::NotArray { first });
                }
                let _ = buf.split_to(4);
                return Ok(Some(Decoded::Nil));
            }
            _ => return Err(JsonFrameError::NotArray { first }),
        };
        self.scan = Scan::default();
        let bytes = buf.split_to(end);
        let mut values = serde_json::Deserializer::from_slice(&bytes).into_iter::<Value>();
        let value = match values.next() {
            Some(Ok(value)) => value,
            Some(Err(e)) => return Err(JsonFrameError::Syntax(e.to_string())),
            None => return Err(JsonFrameError::Syntax("no value".into())),
        };
        // The scan and serde_json must agree on where the value ends.
        if values.byte_offset() != bytes.len() {
            return Err(JsonFrameError::Syntax(format!(
                "value ends at byte {} of {}",
                values.byte_offset(),
                bytes.len()
            )));
        }
        parse_request(&value, bytes.len(), &self.limits).map(|f| Some(Decoded::Frame(f)))
    }

    /// Continue the bracket scan; `Some(end)` once the array that opens `buf` is closed.
    fn scan_array(&mut self, buf: &[u8]) -> Result<Option<usize>, JsonFrameError> {
        let max_depth = self.limits.max_depth;
        let s = &mut self.scan;
        while s.pos < buf.len() {
            let b = buf[s.pos];
            s.pos += 1;
            if s.in_string {
                if s.escaped {
                    s.escaped = false;
                } else if b == b'\\' {
                    s.escaped = true;
                } else if b == b'"' {
                    s.in_string = false;
                }
                continue;
            }
            match b {
                b'"' => s.in_string = true,
                b'[' | b'{' => {
                    s.depth += 1;
                    if s.depth > max_depth {
                        return Err(JsonFrameError::TooDeep { limit: max_depth });
                    }
                }
                b']' | b'}' => {
                    // A stray closer at depth 0 cannot happen (the value opens with '['), and a
                    // mismatched one is serde_json's to report once the depth reaches 0.
                    s.depth = s.depth.saturating_sub(1);
                    if s.depth == 0 {
                        let end = s.pos;
                        if end > self.limits.max_frame_bytes {
                            return Err(JsonFrameError::TooLarge {
                                limit: self.limits.max_frame_bytes,
                            });
                        }
                        return Ok(Some(end));
                    }
                }
                _ => {}
            }
        }
        if s.pos > self.limits.max_frame_bytes {
            return Err(JsonFrameError::TooLarge {
                limit: self.limits.max_frame_bytes,
            });
        }
        Ok(None)
    }
}

/// Convert one JSON request array to a [`Frame`]; `wire_len` is its size as JSON text.
pub fn parse_request(
    value: &Value,
    wire_len: usize,
    limits: &Limits,
) -> Result<Frame, JsonFrameError> {
    let Value::Array(items) = value else {
        return Err(JsonFrameError::NotArray { first: b'{' });
    };
    let count = items.len();
    if !(2..=4).contains(&count) {
        return Err(JsonFrameError::BadArity { count });
    }
    let Value::String(tag) = &items[0] else {
        return Err(JsonFrameError::BadTag);
    };
    let mut entries = Vec::new();
    let (mode, events, option) = match &items[1] {
        Value::Array(list) => {
            if count > 3 {
                return Err(JsonFrameError::ModeArity {
                    mode: Mode::Forward,
                    count,
                });
            }
            for (index, entry) in list.iter().enumerate() {
                match entry {
                    Value::Array(pair) if pair.len() == 2 => {
                        put_entry(&pair[0], &pair[1], &mut entries)
                            .ok_or(JsonFrameError::BadEntry { index })?;
                    }
                    _ => return Err(JsonFrameError::BadEntry { index }),
                }
            }
            let events = u32::try_from(list.len()).map_err(|_| JsonFrameError::TooLarge {
                limit: limits.max_frame_bytes,
            })?;
            (Mode::Forward, events, items.get(2))
        }
        Value::Number(_) => {
            if count < 3 {
                return Err(JsonFrameError::ModeArity {
                    mode: Mode::Message,
                    count,
                });
            }
            if !items[2].is_object() {
                return Err(JsonFrameError::BadMessageRecord);
            }
            put_entry(&items[1], &items[2], &mut entries).ok_or(JsonFrameError::BadTime)?;
            (Mode::Message, 1, items.get(3))
        }
        Value::String(_) => return Err(JsonFrameError::PackedForward),
        _ => return Err(JsonFrameError::UnknownMode),
    };
    let chunk = parse_option(option)?;
    if events == 0 {
        return Err(JsonFrameError::Empty);
    }
    // Numbers can grow (a 3-byte "1.5" is a 9-byte float64): bound what is kept.
    if entries.len() > limits.max_decompressed_bytes {
        return Err(JsonFrameError::TooLarge {
            limit: limits.max_decompressed_bytes,
        });
    }
    Ok(Frame {
        mode,
        tag: Bytes::copy_from_slice(tag.as_bytes()),
        signal: Signal::Logs,
        entries: Bytes::from(entries),
        events,
        chunk,
        wire_len,
    })
}

/// Append `[time, record]` as msgpack; `None` unless time is a number and record an object.
/// Integer times stay integers (any width); other numbers become float64 (PROTOCOL.md §5.3).
fn put_entry(time: &Value, record: &Value, out: &mut Vec<u8>) -> Option<()> {
    let (Value::Number(_), Value::Object(map)) = (time, record) else {
        return None;
    };
    out.push(0x92);
    json_to_msgpack(time, false, out);
    // The record's own map header is written here so it stays a map even when it looks like
    // one of json_to_msgpack's `$bin_base64` / `$ext` / `$float` stand-ins.
    put_map_header(out, map.len());
    for (key, value) in map {
        put_str(out, key.as_bytes());
        json_to_msgpack(value, false, out);
    }
    Some(())
}

/// The `chunk` option as msgpack str bytes; other keys are ignored as in msgpack requests.
fn parse_option(option: Option<&Value>) -> Result<Option<Bytes>, JsonFrameError> {
    let map = match option {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(map)) => map,
        Some(_) => return Err(JsonFrameError::BadOption),
    };
    if let Some(signal) = map.get("fluent_signal") {
        match signal.as_i64() {
            Some(0) => {}
            Some(other) => return Err(JsonFrameError::UnsupportedSignal(other)),
            None => {
                return Err(JsonFrameError::BadOptionValue {
                    key: "fluent_signal",
                })
            }
        }
    }
    match map.get("chunk") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(chunk)) => {
            let mut out = Vec::with_capacity(chunk.len() + 5);
            put_str(&mut out, chunk.as_bytes());
            Ok(Some(Bytes::from(out)))
        }
        Some(_) => Err(JsonFrameError::BadOptionValue { key: "chunk" }),
    }
}

/// `{"ack":"<chunk>"}`: fluentd's JSON ack (`{'ack' => chunk}.to_json`), no newline.
pub fn encode_json_ack(chunk_str: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(chunk_str.len() + 12);
    out.extend_from_slice(b"{\"ack\":");
    // Serialising a &str into a Vec cannot fail; the fallback keeps the function total.
    if serde_json::to_writer(&mut out, chunk_str).is_err() {
        out.extend_from_slice(b"\"\"");
    }
    out.push(b'}');
    out
}

/// The string inside a [`Frame::chunk`] that a JSON request produced, for [`encode_json_ack`].
/// `None` if the bytes are not a complete msgpack str holding UTF-8.
pub fn chunk_json_value(frame_chunk_msgpack: &[u8]) -> Option<String> {
    match read_header(frame_chunk_msgpack)? {
        Header::Str { offset, len } => {
            let content = frame_chunk_msgpack.get(offset..offset.checked_add(len)?)?;
            if offset + len != frame_chunk_msgpack.len() {
                return None;
            }
            String::from_utf8(content.to_vec()).ok()
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forward::entries::count_entries;
    use crate::forward::value::entry_to_json;
    use std::path::{Path, PathBuf};

    fn capture(name: &str) -> Vec<u8> {
        let dir = match std::env::var_os("ACKGATE_CAPTURES") {
            Some(dir) => PathBuf::from(dir),
            None => Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/captures")).into(),
        };
        let path = dir.join(name);
        std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (set ACKGATE_CAPTURES)", path.display()))
    }

    fn decode_all(bytes: &[u8]) -> Result<Vec<Decoded>, JsonFrameError> {
        let mut decoder = JsonDecoder::new(Limits::default());
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(decoded) = decoder.decode(&mut buf)? {
            out.push(decoded);
        }
        assert!(buf.is_empty(), "left over: {buf:?}");
        Ok(out)
    }

    fn frame(decoded: &Decoded) -> &Frame {
        match decoded {
            Decoded::Frame(f) => f,
            Decoded::Nil => panic!("nil"),
        }
    }

    #[test]
    fn client_json_capture_decodes_and_ack_matches_fluentd() {
        let request = capture("client-json.request.bin");
        assert!(is_json_start(request[0]));
        let out = decode_all(&request).unwrap();
        assert_eq!(out.len(), 1);
        let f = frame(&out[0]);
        assert_eq!(f.mode, Mode::Message);
        assert_eq!(&f.tag[..], b"t");
        assert_eq!(f.events, 1);
        assert_eq!(f.wire_len, request.len());
        assert_eq!(count_entries(&f.entries, 64), Ok(1));
        // [1700000000, {"a": 1}]: uint32 time, fixmap record.
        assert_eq!(
            &f.entries[..],
            &[0x92, 0xce, 0x65, 0x53, 0xf1, 0x00, 0x81, 0xa1, b'a', 0x01]
        );
        assert_eq!(f.chunk.as_deref(), Some(&[0xa2, b'j', b'1'][..]));
        let chunk = chunk_json_value(f.chunk.as_deref().unwrap()).unwrap();
        assert_eq!(chunk, "j1");
        let ack = encode_json_ack(&chunk);
        assert_eq!(ack, capture("fluentd-1.18-in_forward-json.reply.bin"));
        assert_eq!(ack, b"{\"ack\":\"j1\"}");
        assert_eq!(ack.len(), 12);
    }

    #[test]
    fn split_across_reads_at_every_byte() {
        let mut stream = capture("client-json.request.bin");
        stream.extend_from_slice(b"\n  [\"u\", [[1, {\"s\": \"]}\\\"[\"}], [2.5, {}]]]\r\n");
        let whole = decode_all(&stream).unwrap();
        assert_eq!(whole.len(), 2);
        for cut in 0..stream.len() {
            let mut decoder = JsonDecoder::new(Limits::default());
            let mut buf = BytesMut::from(&stream[..cut]);
            let mut out = Vec::new();
            while let Some(d) = decoder.decode(&mut buf).unwrap() {
                out.push(d);
            }
            buf.extend_from_slice(&stream[cut..]);
            while let Some(d) = decoder.decode(&mut buf).unwrap() {
                out.push(d);
            }
            assert_eq!(out, whole, "cut at {cut}");
        }
        let f = frame(&whole[1]);
        assert_eq!(f.mode, Mode::Forward);
        assert_eq!(f.events, 2);
        assert_eq!(f.chunk, None);
        assert_eq!(
            entry_to_json(&f.entries[..f.entries.len() - 11]).unwrap(),
            serde_json::json!({"time": 1, "record": {"s": "]}\"["}})
        );
        // 2.5 is a float64.
        assert_eq!(&f.entries[f.entries.len() - 11..][..2], &[0x92, 0xcb]);
    }

    #[test]
    fn garbage_and_non_arrays_are_errors() {
        assert!(matches!(
            decode_all(b"[\"t\", 1, {\"a\": 1}}"),
            Err(JsonFrameError::Syntax(_))
        ));
        assert!(matches!(
            decode_all(b"[1, 2,, 3]"),
            Err(JsonFrameError::Syntax(_))
        ));
        assert_eq!(
            decode_all(b"{\"tag\": \"t\"}"),
            Err(JsonFrameError::NotArray { first: b'{' })
        );
        assert_eq!(
            decode_all(b"42"),
            Err(JsonFrameError::NotArray { first: b'4' })
        );
        assert_eq!(
            decode_all(b"nul!"),
            Err(JsonFrameError::NotArray { first: b'n' })
        );
        assert_eq!(
            decode_all(b"\x93\xa1t"),
            Err(JsonFrameError::NotArray { first: 0x93 })
        );
        assert_eq!(
            decode_all(b"[\"t\"]"),
            Err(JsonFrameError::BadArity { count: 1 })
        );
        assert_eq!(decode_all(b"[1, 1, {}]"), Err(JsonFrameError::BadTag));
        assert_eq!(
            decode_all(b"[\"t\", \"packed\", {}]"),
            Err(JsonFrameError::PackedForward)
        );
        assert_eq!(
            decode_all(b"[\"t\", null, {}]"),
            Err(JsonFrameError::UnknownMode)
        );
        assert_eq!(
            decode_all(b"[\"t\", 1, [1]]"),
            Err(JsonFrameError::BadMessageRecord)
        );
        assert_eq!(
            decode_all(b"[\"t\", [[1, {}], [\"x\", {}]]]"),
            Err(JsonFrameError::BadEntry { index: 1 })
        );
        assert_eq!(
            decode_all(b"[\"t\", [[1]]]"),
            Err(JsonFrameError::BadEntry { index: 0 })
        );
        assert_eq!(decode_all(b"[\"t\", []]"), Err(JsonFrameError::Empty));
        assert_eq!(
            decode_all(b"[\"t\", 1, {}, 5]"),
            Err(JsonFrameError::BadOption)
        );
        assert_eq!(
            decode_all(b"[\"t\", 1, {}, {\"chunk\": 5}]"),
            Err(JsonFrameError::BadOptionValue { key: "chunk" })
        );
        assert_eq!(
            decode_all(b"[\"t\", [[1, {}]], {\"fluent_signal\": 2}]"),
            Err(JsonFrameError::UnsupportedSignal(2))
        );
        assert_eq!(
            decode_all(b"[\"t\", [[1, {}]], {}, {}]"),
            Err(JsonFrameError::ModeArity {
                mode: Mode::Forward,
                count: 4
            })
        );
    }

    #[test]
    fn null_is_a_noop_and_options_may_be_null() {
        let out = decode_all(b"null [\"t\", 1, {}, null] null").unwrap();
        assert_eq!(out.len(), 3);
        assert_eq!(out[0], Decoded::Nil);
        assert_eq!(frame(&out[1]).chunk, None);
        assert_eq!(out[2], Decoded::Nil);
        let mut decoder = JsonDecoder::new(Limits::default());
        let mut buf = BytesMut::from(&b"nu"[..]);
        assert_eq!(decoder.decode(&mut buf), Ok(None));
    }

    #[test]
    fn limits_bound_buffering_and_depth() {
        let limits = Limits {
            max_frame_bytes: 32,
            ..Limits::default()
        };
        let mut decoder = JsonDecoder::new(limits);
        let mut buf = BytesMut::from(&b"[\"t\", 1, {\"msg\": \"aaaaaaaaaaaaaaaaaaaaaaaaa"[..]);
        assert_eq!(
            decoder.decode(&mut buf),
            Err(JsonFrameError::TooLarge { limit: 32 })
        );
        let deep = format!("[\"t\", 1, {}]", "[".repeat(100) + &"]".repeat(100));
        assert_eq!(
            decode_all(deep.as_bytes()),
            Err(JsonFrameError::TooDeep { limit: 64 })
        );
    }

    #[test]
    fn records_stay_maps_and_keep_their_values() {
        let out =
            decode_all(br#"["t", -5, {"$bin_base64": "aGk=", "n": null, "f": 1.5, "big": 18446744073709551615}, {"chunk": "x\n\"y"}]"#)
                .unwrap();
        let f = frame(&out[0]);
        assert_eq!(f.entries[1], 0xfb, "negative fixint time");
        assert_eq!(f.entries[2], 0x84, "record is a 4-pair map");
        let json = entry_to_json(&f.entries).unwrap();
        assert_eq!(json["time"], serde_json::json!(-5));
        assert_eq!(json["record"]["f"], serde_json::json!(1.5));
        assert_eq!(json["record"]["big"], serde_json::json!(u64::MAX));
        assert_eq!(json["record"]["n"], serde_json::Value::Null);
        let chunk = chunk_json_value(f.chunk.as_deref().unwrap()).unwrap();
        assert_eq!(chunk, "x\n\"y");
        assert_eq!(encode_json_ack(&chunk), br#"{"ack":"x\n\"y"}"#);
    }

    #[test]
    fn chunk_json_value_needs_one_whole_str() {
        assert_eq!(chunk_json_value(&[0xa2, b'o', b'k']), Some("ok".into()));
        assert_eq!(chunk_json_value(&[0xc4, 0x01, b'x']), None);
        assert_eq!(chunk_json_value(&[0xa2, b'o']), None);
        assert_eq!(chunk_json_value(&[0xa1, b'o', b'k']), None);
        assert_eq!(chunk_json_value(&[0xa1, 0xff]), None);
        assert_eq!(chunk_json_value(&[]), None);
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let seed = br#"["t", [[1, {"a": "b\\\"c", "d": [1, {"e": null}]}]], {"chunk": "z"}]"#;
        for i in 0..seed.len() {
            for replacement in [b'[', b']', b'"', b'\\', b'{', b'}', 0xff, b' '] {
                let mut input = seed.to_vec();
                input[i] = replacement;
                let mut decoder = JsonDecoder::new(Limits::default());
                let mut buf = BytesMut::from(&input[..]);
                while let Ok(Some(_)) = decoder.decode(&mut buf) {}
            }
        }
    }
}
