//! msgpack ⇄ JSON for the tools (`send`, `receive`, `spool show`). Not on the relay path.
//!
//! The relay never decodes a record (invariant 6); only the tools turn events into something a
//! person can read and back. Two rules make that faithful:
//!
//! - Bytes that are not text stay bytes. A msgpack bin, or a str holding invalid UTF-8 (old
//!   msgpack "raw" from fluentd v0.10/v0.12, PROTOCOL.md §13.8), becomes
//!   `{"$bin_base64": "..."}`; never a lossy string. An ext other than an entry's EventTime becomes
//!   `{"$ext": type, "base64": "..."}`, and a NaN or infinite float `{"$float": "NaN"}`.
//!   [`json_to_msgpack`] maps these three shapes back, so `receive` output can be fed to `send`.
//! - `legacy` encoding writes only the markers msgpack had before 2013 (fixstr / str16 / str32,
//!   never str8 or bin), which is what fluentd v0.10 and msgpack-ruby < 0.6 produced and what
//!   fluentd v0.12.0–0.12.31 can read (PROTOCOL.md §2.2).
//!
//! Decoding takes bytes a peer wrote: every length is checked against what is there, nesting is
//! capped at [`MAX_DEPTH`], nothing is preallocated from a declared count, and no input panics.

use base64::Engine as _;
use serde_json::{Map, Number, Value};

use super::packed::{put_array_header, put_map_header, put_raw_header, put_uint};

/// Deepest nesting of arrays and maps [`msgpack_to_json`] accepts (the frame decoder's default).
pub const MAX_DEPTH: usize = 64;

/// JSON key of the object that stands for bytes which are not UTF-8 text.
pub const BIN_KEY: &str = "$bin_base64";
/// JSON key of the object that stands for a msgpack ext value (with `"base64"` for its data).
pub const EXT_KEY: &str = "$ext";
/// JSON key of the object that stands for a float JSON cannot write (NaN, ±infinity).
pub const FLOAT_KEY: &str = "$float";

/// Why bytes could not be shown as JSON.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// A header or payload runs past the end of the input.
    #[error("msgpack value cut short at offset {offset}")]
    Truncated { offset: usize },
    /// 0xC1 is reserved by the msgpack spec.
    #[error("reserved msgpack marker 0xc1 at offset {offset}")]
    Reserved { offset: usize },
    /// More than [`MAX_DEPTH`] arrays or maps are open at once.
    #[error("msgpack nesting deeper than {limit} at offset {offset}")]
    TooDeep { offset: usize, limit: usize },
    /// An entry is not a 2-element array.
    #[error("entry is not a [time, record] array")]
    NotEntry,
    /// An entry's time is not an integer, float, EventTime or v1.5 `[time, {metadata}]`.
    #[error("entry time is not an integer, float, EventTime or [time, metadata]")]
    BadTime,
    /// An entry's record is not a map.
    #[error("entry record is not a map")]
    BadRecord,
    /// Bytes are left after the one entry that was expected.
    #[error("{extra} bytes after the entry")]
    Trailing { extra: usize },
}

// ---------------------------------------------------------------------------------------------
// JSON -> msgpack

/// Append `v` as msgpack. Strings become str; with `legacy`, only pre-2013 markers are used
/// (fixstr, str16 0xDA, str32 0xDB; never str8 0xD9 nor bin 0xC4–0xC6). Integers take their
/// smallest form, other numbers float64. The `$bin_base64` / `$ext` / `$float` objects of
/// [`msgpack_to_json`] are turned back into bytes (a legacy encoding writes bin as a raw str and
/// leaves `$ext` objects as maps, since old msgpack had neither).
pub fn json_to_msgpack(v: &Value, legacy: bool, out: &mut Vec<u8>) {
    match v {
        Value::Null => out.push(0xc0),
        Value::Bool(false) => out.push(0xc2),
        Value::Bool(true) => out.push(0xc3),
        Value::Number(n) => put_number(n, out),
        Value::String(s) => put_str(s.as_bytes(), legacy, out),
        Value::Array(items) => {
            put_array_header(out, items.len());
            for item in items {
                json_to_msgpack(item, legacy, out);
            }
        }
        Value::Object(map) => {
            if let Some(special) = special_object(map, legacy) {
                match special {
                    Special::Bin(bytes) if legacy => put_str(&bytes, true, out),
                    Special::Bin(bytes) => put_bin(&bytes, out),
                    Special::Ext(kind, data) => put_ext(kind, &data, out),
                    Special::Float(f) => put_f64(f, out),
                }
                return;
            }
            put_map_header(out, map.len());
            for (key, value) in map {
                put_str(key.as_bytes(), legacy, out);
                json_to_msgpack(value, legacy, out);
            }
        }
    }
}

/// A JSON object that stands for a msgpack value JSON has no form for.
enum Special {
    Bin(Vec<u8>),
    Ext(i8, Vec<u8>),
    Float(f64),
}

fn special_object(map: &Map<String, Value>, legacy: bool) -> Option<Special> {
    let b64 = base64::engine::general_purpose::STANDARD;
    match map.len() {
        1 => {
            if let Some(Value::String(s)) = map.get(BIN_KEY) {
                return b64.decode(s).ok().map(Special::Bin);
            }
            let f = match map.get(FLOAT_KEY)?.as_str()? {
                "NaN" => f64::NAN,
                "inf" => f64::INFINITY,
                "-inf" => f64::NEG_INFINITY,
                _ => return None,
            };
            Some(Special::Float(f))
        }
        2 if !legacy => {
            let kind = i8::try_from(map.get(EXT_KEY)?.as_i64()?).ok()?;
            let data = b64.decode(map.get("base64")?.as_str()?).ok()?;
            Some(Special::Ext(kind, data))
        }
        _ => None,
    }
}

fn put_number(n: &Number, out: &mut Vec<u8>) {
    if let Some(u) = n.as_u64() {
        put_uint(out, u);
    } else if let Some(i) = n.as_i64() {
        put_int(out, i);
    } else {
        put_f64(n.as_f64().unwrap_or(f64::NAN), out);
    }
}

/// Append a signed integer in its smallest form (negative fixint down to -32, then d0..d3).
fn put_int(out: &mut Vec<u8>, i: i64) {
    if i >= 0 {
        put_uint(out, i as u64);
    } else if i >= -32 {
        out.push(i as i8 as u8);
    } else if i >= i8::MIN as i64 {
        out.extend_from_slice(&[0xd0, i as i8 as u8]);
    } else if i >= i16::MIN as i64 {
        out.push(0xd1);
        out.extend_from_slice(&(i as i16).to_be_bytes());
    } else if i >= i32::MIN as i64 {
        out.push(0xd2);
        out.extend_from_slice(&(i as i32).to_be_bytes());
    } else {
        out.push(0xd3);
        out.extend_from_slice(&i.to_be_bytes());
    }
}

fn put_f64(f: f64, out: &mut Vec<u8>) {
    out.push(0xcb);
    out.extend_from_slice(&f.to_be_bytes());
}

fn put_str(bytes: &[u8], legacy: bool, out: &mut Vec<u8>) {
    let len = bytes.len();
    if legacy || len < 32 || len > u8::MAX as usize {
        put_raw_header(out, len);
    } else {
        out.extend_from_slice(&[0xd9, len as u8]);
    }
    out.extend_from_slice(bytes);
}

fn put_bin(bytes: &[u8], out: &mut Vec<u8>) {
    let len = bytes.len();
    if len <= u8::MAX as usize {
        out.extend_from_slice(&[0xc4, len as u8]);
    } else if len <= u16::MAX as usize {
        out.push(0xc5);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0xc6);
        out.extend_from_slice(&(len as u32).to_be_bytes());
    }
    out.extend_from_slice(bytes);
}

fn put_ext(kind: i8, data: &[u8], out: &mut Vec<u8>) {
    let fixed = match data.len() {
        1 => Some(0xd4),
        2 => Some(0xd5),
        4 => Some(0xd6),
        8 => Some(0xd7),
        16 => Some(0xd8),
        _ => None,
    };
    if let Some(marker) = fixed {
        out.push(marker);
    } else if data.len() <= u8::MAX as usize {
        out.extend_from_slice(&[0xc7, data.len() as u8]);
    } else if data.len() <= u16::MAX as usize {
        out.push(0xc8);
        out.extend_from_slice(&(data.len() as u16).to_be_bytes());
    } else {
        out.push(0xc9);
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    }
    out.push(kind as u8);
    out.extend_from_slice(data);
}

// ---------------------------------------------------------------------------------------------
// msgpack -> JSON

/// Decode the one complete msgpack value at the start of `buf`; returns it and its length.
pub fn msgpack_to_json(buf: &[u8]) -> Result<(Value, usize), ValueError> {
    let mut reader = Reader { buf, pos: 0 };
    let value = reader.value(0)?;
    Ok((value, reader.pos))
}

/// One raw `[time, record]` entry (exactly one, nothing after it) as
/// `{"time": <seconds>, "record": {...}}`, plus `"metadata": {...}` for the v1.5
/// `[[time, {metadata}], record]` form. Integer time stays an integer; EventTime (fixext8 or
/// ext8, u32 seconds and nanoseconds, PROTOCOL.md §5.1) becomes float seconds, which is exact
/// to about a microsecond for current dates.
pub fn entry_to_json(entry: &[u8]) -> Result<Value, ValueError> {
    let mut reader = Reader { buf: entry, pos: 0 };
    if reader.array_len()? != Some(2) {
        return Err(ValueError::NotEntry);
    }
    let mut out = Map::new();
    let metadata = match reader.array_len()? {
        Some(2) => {
            let time = reader.time()?;
            out.insert("time".into(), time);
            if !reader.next_is_map() {
                return Err(ValueError::BadTime);
            }
            Some(reader.value(2)?)
        }
        Some(_) => return Err(ValueError::BadTime),
        None => {
            let time = reader.time()?;
            out.insert("time".into(), time);
            None
        }
    };
    if !reader.next_is_map() {
        return Err(ValueError::BadRecord);
    }
    out.insert("record".into(), reader.value(1)?);
    if let Some(metadata) = metadata {
        out.insert("metadata".into(), metadata);
    }
    let extra = entry.len() - reader.pos;
    if extra != 0 {
        return Err(ValueError::Trailing { extra });
    }
    Ok(Value::Object(out))
}

/// Bytes as a JSON string when they are UTF-8, else as `{"$bin_base64": ...}`.
pub fn bytes_to_json(bytes: &[u8]) -> Value {
    match std::str::from_utf8(bytes) {
        Ok(s) => Value::String(s.to_owned()),
        Err(_) => bin_json(bytes),
    }
}

fn bin_json(bytes: &[u8]) -> Value {
    let mut map = Map::new();
    map.insert(
        BIN_KEY.into(),
        Value::String(base64::engine::general_purpose::STANDARD.encode(bytes)),
    );
    Value::Object(map)
}

fn float_json(f: f64) -> Value {
    match Number::from_f64(f) {
        Some(n) => Value::Number(n),
        None => {
            let name = if f.is_nan() {
                "NaN"
            } else if f > 0.0 {
                "inf"
            } else {
                "-inf"
            };
            let mut map = Map::new();
            map.insert(FLOAT_KEY.into(), Value::String(name.into()));
            Value::Object(map)
        }
    }
}

/// A bounds-checked cursor over bytes a peer wrote.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ValueError> {
        let truncated = ValueError::Truncated { offset: self.pos };
        let end = self.pos.checked_add(n).ok_or(truncated.clone())?;
        let bytes = self.buf.get(self.pos..end).ok_or(truncated)?;
        self.pos = end;
        Ok(bytes)
    }

    fn u8(&mut self) -> Result<u8, ValueError> {
        Ok(self.take(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ValueError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn be16(&mut self) -> Result<usize, ValueError> {
        Ok(u16::from_be_bytes(self.array()?) as usize)
    }

    fn be32(&mut self) -> Result<usize, ValueError> {
        Ok(u32::from_be_bytes(self.array()?) as usize)
    }

    fn peek(&self) -> Option<u8> {
        self.buf.get(self.pos).copied()
    }

    fn next_is_map(&self) -> bool {
        matches!(self.peek(), Some(0x80..=0x8f | 0xde | 0xdf))
    }

    /// If the next value is an array, consume its header and return its length.
    fn array_len(&mut self) -> Result<Option<usize>, ValueError> {
        let len = match self.peek() {
            Some(m @ 0x90..=0x9f) => {
                self.pos += 1;
                (m & 0x0f) as usize
            }
            Some(0xdc) => {
                self.pos += 1;
                self.be16()?
            }
            Some(0xdd) => {
                self.pos += 1;
                self.be32()?
            }
            Some(_) => return Ok(None),
            None => return Err(ValueError::Truncated { offset: self.pos }),
        };
        Ok(Some(len))
    }

    /// An entry's time: integer, float or EventTime, as JSON seconds.
    fn time(&mut self) -> Result<Value, ValueError> {
        let start = self.pos;
        match self.peek() {
            Some(0x00..=0x7f | 0xe0..=0xff | 0xcc..=0xd3 | 0xca | 0xcb) => self.value(1),
            Some(0xd7) => {
                self.pos += 1;
                self.event_time()
            }
            Some(0xc7) => {
                self.pos += 1;
                if self.u8()? != 8 {
                    return Err(ValueError::BadTime);
                }
                self.event_time()
            }
            Some(_) => Err(ValueError::BadTime),
            None => Err(ValueError::Truncated { offset: start }),
        }
    }

    /// The type byte and 8 data bytes of an EventTime (after its marker and length).
    fn event_time(&mut self) -> Result<Value, ValueError> {
        if self.u8()? != 0 {
            return Err(ValueError::BadTime);
        }
        let sec = u32::from_be_bytes(self.array()?);
        let nsec = u32::from_be_bytes(self.array()?);
        Ok(float_json(sec as f64 + nsec as f64 / 1e9))
    }

    /// Decode one value; `depth` is how many arrays or maps are open around it.
    fn value(&mut self, depth: usize) -> Result<Value, ValueError> {
        let offset = self.pos;
        let marker = self.u8()?;
        Ok(match marker {
            0x00..=0x7f => Value::from(marker),
            0xe0..=0xff => Value::from(marker as i8),
            0xc0 => Value::Null,
            0xc2 => Value::Bool(false),
            0xc3 => Value::Bool(true),
            0xc1 => return Err(ValueError::Reserved { offset }),
            0xcc => Value::from(self.u8()?),
            0xcd => Value::from(u16::from_be_bytes(self.array()?)),
            0xce => Value::from(u32::from_be_bytes(self.array()?)),
            0xcf => Value::from(u64::from_be_bytes(self.array()?)),
            0xd0 => Value::from(self.u8()? as i8),
            0xd1 => Value::from(i16::from_be_bytes(self.array()?)),
            0xd2 => Value::from(i32::from_be_bytes(self.array()?)),
            0xd3 => Value::from(i64::from_be_bytes(self.array()?)),
            0xca => float_json(f32::from_be_bytes(self.array()?) as f64),
            0xcb => float_json(f64::from_be_bytes(self.array()?)),
            0xa0..=0xbf => self.str((marker & 0x1f) as usize)?,
            0xd9 => {
                let len = self.u8()? as usize;
                self.str(len)?
            }
            0xda => {
                let len = self.be16()?;
                self.str(len)?
            }
            0xdb => {
                let len = self.be32()?;
                self.str(len)?
            }
            0xc4 => {
                let len = self.u8()? as usize;
                bin_json(self.take(len)?)
            }
            0xc5 => {
                let len = self.be16()?;
                bin_json(self.take(len)?)
            }
            0xc6 => {
                let len = self.be32()?;
                bin_json(self.take(len)?)
            }
            0xd4..=0xd8 => self.ext(1usize << (marker - 0xd4))?,
            0xc7 => {
                let len = self.u8()? as usize;
                self.ext(len)?
            }
            0xc8 => {
                let len = self.be16()?;
                self.ext(len)?
            }
            0xc9 => {
                let len = self.be32()?;
                self.ext(len)?
            }
            0x90..=0x9f => self.seq((marker & 0x0f) as usize, depth, offset)?,
            0xdc => {
                let count = self.be16()?;
                self.seq(count, depth, offset)?
            }
            0xdd => {
                let count = self.be32()?;
                self.seq(count, depth, offset)?
            }
            0x80..=0x8f => self.map((marker & 0x0f) as usize, depth, offset)?,
            0xde => {
                let count = self.be16()?;
                self.map(count, depth, offset)?
            }
            0xdf => {
                let count = self.be32()?;
                self.map(count, depth, offset)?
            }
        })
    }

    fn str(&mut self, len: usize) -> Result<Value, ValueError> {
        Ok(bytes_to_json(self.take(len)?))
    }

    /// Ext type byte and `len` data bytes.
    fn ext(&mut self, len: usize) -> Result<Value, ValueError> {
        let kind = self.u8()? as i8;
        let data = self.take(len)?;
        let mut map = Map::new();
        map.insert(EXT_KEY.into(), Value::from(kind));
        map.insert(
            "base64".into(),
            Value::String(base64::engine::general_purpose::STANDARD.encode(data)),
        );
        Ok(Value::Object(map))
    }

    fn enter(&self, depth: usize, offset: usize) -> Result<usize, ValueError> {
        if depth >= MAX_DEPTH {
            return Err(ValueError::TooDeep {
                offset,
                limit: MAX_DEPTH,
            });
        }
        Ok(depth + 1)
    }

    /// Every element takes at least one byte: never reserve more than the bytes left.
    fn capacity(&self, count: usize) -> usize {
        count.min(self.buf.len() - self.pos)
    }

    fn seq(&mut self, count: usize, depth: usize, offset: usize) -> Result<Value, ValueError> {
        let inner = self.enter(depth, offset)?;
        let mut items = Vec::with_capacity(self.capacity(count));
        for _ in 0..count {
            items.push(self.value(inner)?);
        }
        Ok(Value::Array(items))
    }

    fn map(&mut self, count: usize, depth: usize, offset: usize) -> Result<Value, ValueError> {
        let inner = self.enter(depth, offset)?;
        let mut map = Map::new();
        for _ in 0..count {
            let key = match self.value(inner)? {
                Value::String(s) => s,
                // Non-string keys (ints, bin, non-UTF-8 str) keep their JSON spelling as the key.
                other => other.to_string(),
            };
            let value = self.value(inner)?;
            map.insert(key, value);
        }
        Ok(Value::Object(map))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forward::msgpack::{read_header, value_len, Header};
    use serde_json::json;

    fn encode(v: &Value, legacy: bool) -> Vec<u8> {
        let mut out = Vec::new();
        json_to_msgpack(v, legacy, &mut out);
        out
    }

    /// Every marker of the value at `buf[0]` (not the payload bytes), depth first.
    fn markers(buf: &[u8], out: &mut Vec<u8>) -> usize {
        out.push(buf[0]);
        let len = value_len(buf, 64).unwrap().unwrap();
        let (mut pos, children) = match read_header(buf).unwrap() {
            Header::Array { offset, count } => (offset, count),
            Header::Map { offset, count } => (offset, 2 * count),
            _ => return len,
        };
        for _ in 0..children {
            pos += markers(&buf[pos..], out);
        }
        assert_eq!(pos, len);
        len
    }

    fn sample() -> Value {
        let long = |n: usize| "x".repeat(n);
        json!({
            "short": "hi",
            "s31": long(31), "s32": long(32), "s255": long(255), "s256": long(256),
            "s65536": long(65536),
            "ints": [0, 127, 128, 255, 256, 65535, 65536, 4294967295u64, 4294967296u64,
                     u64::MAX, -1, -32, -33, -128, -129, -32768, -32769, -2147483648i64,
                     -2147483649i64, i64::MIN],
            "floats": [0.5, -1.25, 1e300],
            "nested": {"a": [null, true, false, {"b": []}], "wide": (0..20).collect::<Vec<_>>()},
            "utf8": "héllo ✓",
        })
    }

    #[test]
    fn round_trips_both_encodings() {
        let v = sample();
        for legacy in [false, true] {
            let bytes = encode(&v, legacy);
            assert_eq!(
                value_len(&bytes, 64),
                Ok(Some(bytes.len())),
                "skipper agrees"
            );
            let (back, used) = msgpack_to_json(&bytes).unwrap();
            assert_eq!(used, bytes.len());
            assert_eq!(back, v);
        }
    }

    #[test]
    fn legacy_uses_only_raw_markers() {
        let mut v = sample();
        v["bin"] = json!({"$bin_base64": "/wD+"});
        let bytes = encode(&v, true);
        let mut seen = Vec::new();
        markers(&bytes, &mut seen);
        for m in [0xd9, 0xc4, 0xc5, 0xc6] {
            assert!(!seen.contains(&m), "legacy emitted marker 0x{m:02x}");
        }
        assert!(seen.contains(&0xda) && seen.contains(&0xdb));
        // The modern encoding does use str8 (and bin for bytes).
        let mut modern = Vec::new();
        markers(&encode(&v, false), &mut modern);
        assert!(modern.contains(&0xd9) && modern.contains(&0xc4));
    }

    #[test]
    fn integers_take_their_smallest_form() {
        let cases: &[(Value, &[u8])] = &[
            (json!(5), &[0x05]),
            (json!(200), &[0xcc, 200]),
            (json!(-1), &[0xff]),
            (json!(-32), &[0xe0]),
            (json!(-33), &[0xd0, 0xdf]),
            (json!(-200), &[0xd1, 0xff, 0x38]),
            (json!(70000), &[0xce, 0, 1, 0x11, 0x70]),
            (json!(1.5), &[0xcb, 0x3f, 0xf8, 0, 0, 0, 0, 0, 0]),
            (json!("ab"), &[0xa2, b'a', b'b']),
            (json!({"k": [true]}), &[0x81, 0xa1, b'k', 0x91, 0xc3]),
        ];
        for (v, expected) in cases {
            assert_eq!(&encode(v, false), expected, "{v}");
        }
    }

    #[test]
    fn non_utf8_and_bin_are_kept_as_bytes() {
        // str (old raw) holding Latin-1 "é", bin 00 ff, ext 5.
        let bytes = [
            0x83, 0xa1, b's', 0xa1, 0xe9, 0xa1, b'b', 0xc4, 0x02, 0x00, 0xff, 0xa1, b'e', 0xd4,
            0x05, 0x2a,
        ];
        let (v, used) = msgpack_to_json(&bytes).unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(
            v,
            json!({
                "s": {"$bin_base64": "6Q=="},
                "b": {"$bin_base64": "AP8="},
                "e": {"$ext": 5, "base64": "Kg=="},
            })
        );
        // Back to bytes: bin stays bin (modern), becomes raw str (legacy); ext comes back.
        assert_eq!(encode(&v["b"], false), [0xc4, 0x02, 0x00, 0xff]);
        assert_eq!(encode(&v["s"], true), [0xa1, 0xe9]);
        assert_eq!(encode(&v["e"], false), [0xd4, 0x05, 0x2a]);
    }

    #[test]
    fn odd_keys_and_floats() {
        // {1: "a", bin(00): "b"} and a NaN float32.
        let bytes = [0x82, 0x01, 0xa1, b'a', 0xc4, 0x01, 0x00, 0xa1, b'b'];
        let (v, _) = msgpack_to_json(&bytes).unwrap();
        assert_eq!(v, json!({"1": "a", "{\"$bin_base64\":\"AA==\"}": "b"}));
        let (nan, _) = msgpack_to_json(&[0xca, 0x7f, 0xc0, 0, 0]).unwrap();
        assert_eq!(nan, json!({"$float": "NaN"}));
        let back = encode(&nan, false);
        assert_eq!(back[0], 0xcb);
        assert!(f64::from_be_bytes(back[1..9].try_into().unwrap()).is_nan());
    }

    #[test]
    fn entries_show_their_time_kind() {
        // Integer time, fluentd v0.10 style.
        let int = [
            0x92, 0xce, 0x55, 0xec, 0xe6, 0xf8, 0x81, 0xa3, b'm', b's', b'g', 0xa2, b'h', b'i',
        ];
        assert_eq!(
            entry_to_json(&int).unwrap(),
            json!({"time": 1441588984u32, "record": {"msg": "hi"}})
        );
        // EventTime fixext8 and ext8: 1441588984 s + 500_000_000 ns.
        let mut fixext = vec![
            0x92, 0xd7, 0x00, 0x55, 0xec, 0xe6, 0xf8, 0x1d, 0xcd, 0x65, 0x00,
        ];
        fixext.push(0x80);
        let mut ext8 = vec![
            0x92, 0xc7, 0x08, 0x00, 0x55, 0xec, 0xe6, 0xf8, 0x1d, 0xcd, 0x65, 0x00,
        ];
        ext8.push(0x80);
        for entry in [&fixext, &ext8] {
            let v = entry_to_json(entry).unwrap();
            assert_eq!(v["time"].as_f64(), Some(1441588984.5));
            assert!(v["time"].is_f64());
            assert_eq!(v["record"], json!({}));
        }
        // v1.5: [[EventTime, {meta}], record].
        let mut v15 = vec![0x92, 0x92, 0xd7, 0x00, 0, 0, 0, 10, 0, 0, 0, 0];
        v15.extend_from_slice(&[0x81, 0xa1, b'm', 0x01, 0x81, 0xa1, b'r', 0x02]);
        assert_eq!(
            entry_to_json(&v15).unwrap(),
            json!({"time": 10.0, "record": {"r": 2}, "metadata": {"m": 1}})
        );
        // Float time (non-conforming clients, PROTOCOL.md §5.3).
        let float = [0x92, 0xcb, 0x41, 0xd9, 0, 0, 0, 0, 0, 0, 0x80];
        assert!(entry_to_json(&float).unwrap()["time"].is_f64());
    }

    #[test]
    fn bad_entries_are_errors() {
        assert_eq!(entry_to_json(&[0x91, 0x01]), Err(ValueError::NotEntry));
        assert_eq!(entry_to_json(&[0x01]), Err(ValueError::NotEntry));
        assert_eq!(
            entry_to_json(&[0x92, 0xa1, b'x', 0x80]),
            Err(ValueError::BadTime)
        );
        assert_eq!(
            entry_to_json(&[0x92, 0xd6, 0x00, 1, 2, 3, 4, 0x80]),
            Err(ValueError::BadTime)
        );
        assert_eq!(
            entry_to_json(&[0x92, 0x01, 0x01]),
            Err(ValueError::BadRecord)
        );
        assert_eq!(
            entry_to_json(&[0x92, 0x01, 0x80, 0x00]),
            Err(ValueError::Trailing { extra: 1 })
        );
    }

    #[test]
    fn truncated_or_hostile_input_is_an_error_not_a_panic() {
        let v = json!({"a": [1, -200, 70000, 1.5, null, true], "b": {"c": "x".repeat(40)}});
        let bytes = encode(&v, false);
        for cut in 0..bytes.len() {
            assert!(
                matches!(
                    msgpack_to_json(&bytes[..cut]),
                    Err(ValueError::Truncated { .. })
                ),
                "cut at {cut}"
            );
        }
        let entry = [
            0x92, 0xd7, 0x00, 0, 0, 0, 1, 0, 0, 0, 0, 0x81, 0xa1, b'k', 0x01,
        ];
        for cut in 0..entry.len() {
            assert!(entry_to_json(&entry[..cut]).is_err(), "cut at {cut}");
        }
        // Declared sizes far beyond the input: no huge allocation, just Truncated.
        for hostile in [
            &[0xdd, 0xff, 0xff, 0xff, 0xff][..],
            &[0xdf, 0xff, 0xff, 0xff, 0xff],
            &[0xdb, 0xff, 0xff, 0xff, 0xff],
            &[0xc9, 0xff, 0xff, 0xff, 0xff, 0x01],
        ] {
            assert!(matches!(
                msgpack_to_json(hostile),
                Err(ValueError::Truncated { .. })
            ));
        }
        assert_eq!(
            msgpack_to_json(&[0xc1]),
            Err(ValueError::Reserved { offset: 0 })
        );
        // 64 nested arrays are fine, 65 are not.
        let mut deep = vec![0x91; 64];
        deep.push(0x01);
        assert!(msgpack_to_json(&deep).is_ok());
        let mut deeper = vec![0x91; 65];
        deeper.push(0x01);
        assert_eq!(
            msgpack_to_json(&deeper),
            Err(ValueError::TooDeep {
                offset: 64,
                limit: 64
            })
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic fuzz: every 1- and 2-byte input, plus mutations of a sample.
        for a in 0..=255u8 {
            let _ = msgpack_to_json(&[a]);
            let _ = entry_to_json(&[0x92, a]);
            for b in 0..=255u8 {
                let _ = msgpack_to_json(&[a, b]);
                let _ = entry_to_json(&[0x92, a, b]);
            }
        }
        let base = encode(&json!({"a": [1, "b", {"c": 2.5}], "d": "eeee"}), false);
        for i in 0..base.len() {
            for x in [0x00, 0x7f, 0x80, 0xc1, 0xd9, 0xdb, 0xdd, 0xdf, 0xff] {
                let mut m = base.clone();
                m[i] = x;
                let _ = msgpack_to_json(&m);
            }
        }
    }
}
