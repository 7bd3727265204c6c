//! msgpack for the tests, written here rather than taken from ackgate where it builds input:
//! the `mp_*` writers senders use (smallest header, or old msgpack's "raw"), a value encoder
//! [`V`] whose header widths can be chosen (fluent-bit writes `dd 00 00 00 02` where `92`
//! would do), and readers that split what came back into values, array elements and map
//! entries (those walk values with ackgate's `value_len`, the skipper the properties test).

use ackgate::forward::msgpack::{read_header, value_len, Header};

/// Nesting limit used when the tests walk msgpack themselves.
pub const DEPTH: usize = 64;

// ------------------------------------------------------------------------------------------------
// Writers with the smallest header

/// fixstr (< 32 bytes), str8, str16 or str32.
pub fn mp_str(out: &mut Vec<u8>, s: &[u8]) {
    put_str_header(out, s.len(), 0);
    out.extend_from_slice(s);
}

/// Old-msgpack "raw": fixraw (< 32 bytes), raw16, raw32; never str8 (fluentd v0.10 tags).
pub fn mp_raw(out: &mut Vec<u8>, s: &[u8]) {
    let n = s.len();
    if n < 32 {
        out.push(0xa0 | n as u8);
    } else if n < 65536 {
        out.push(0xda);
        put_len(out, 2, n);
    } else {
        out.push(0xdb);
        put_len(out, 4, n);
    }
    out.extend_from_slice(s);
}

/// bin8, bin16 or bin32.
pub fn mp_bin(out: &mut Vec<u8>, b: &[u8]) {
    put_bin_header(out, b.len(), 0);
    out.extend_from_slice(b);
}

/// str32 header + bytes (how every fluentd writes PackedForward entries).
pub fn mp_str32(out: &mut Vec<u8>, b: &[u8]) {
    out.push(0xdb);
    put_len(out, 4, b.len());
    out.extend_from_slice(b);
}

/// Smallest unsigned integer encoding.
pub fn mp_uint(out: &mut Vec<u8>, n: u64) {
    ackgate::forward::packed::put_uint(out, n);
}

pub fn mp_map_header(out: &mut Vec<u8>, n: usize) {
    put_map_header(out, n, 0);
}

pub fn mp_array_header(out: &mut Vec<u8>, n: usize) {
    put_array_header(out, n, 0);
}

// ------------------------------------------------------------------------------------------------
// A value encoder with chosen header widths. `w` fields pick a header width; a width too small
// for the value is raised to the smallest valid one, so every value is valid msgpack.

#[derive(Debug, Clone)]
pub enum V {
    Nil,
    Bool(bool),
    UInt(u64, u8),
    NInt(i64, u8),
    F32(u32),
    F64(u64),
    Str(Vec<u8>, u8),
    Bin(Vec<u8>, u8),
    Array(Vec<V>, u8),
    Map(Vec<(V, V)>, u8),
    Ext(i8, Vec<u8>, u8),
}

pub fn put_len(out: &mut Vec<u8>, width: usize, len: usize) {
    match width {
        1 => out.push(len as u8),
        2 => out.extend_from_slice(&(len as u16).to_be_bytes()),
        4 => out.extend_from_slice(&(len as u32).to_be_bytes()),
        _ => unreachable!(),
    }
}

/// Index of the smallest class (in `limits`, ascending) that holds `len`.
pub fn min_class(len: usize, limits: &[usize]) -> usize {
    limits.iter().position(|&max| len <= max).expect("fits")
}

pub fn enc(v: &V, out: &mut Vec<u8>) {
    match v {
        V::Nil => out.push(0xc0),
        V::Bool(b) => out.push(if *b { 0xc3 } else { 0xc2 }),
        V::UInt(n, w) => enc_uint(*n, *w, out),
        V::NInt(n, w) => enc_nint(*n, *w, out),
        V::F32(bits) => {
            out.push(0xca);
            out.extend_from_slice(&bits.to_be_bytes());
        }
        V::F64(bits) => {
            out.push(0xcb);
            out.extend_from_slice(&bits.to_be_bytes());
        }
        V::Str(b, w) => {
            put_str_header(out, b.len(), *w);
            out.extend_from_slice(b);
        }
        V::Bin(b, w) => {
            put_bin_header(out, b.len(), *w);
            out.extend_from_slice(b);
        }
        V::Array(items, w) => {
            put_array_header(out, items.len(), *w);
            for item in items {
                enc(item, out);
            }
        }
        V::Map(pairs, w) => {
            put_map_header(out, pairs.len(), *w);
            for (k, v) in pairs {
                enc(k, out);
                enc(v, out);
            }
        }
        V::Ext(kind, data, w) => enc_ext(*kind, data, *w, out),
    }
}

fn enc_uint(n: u64, w: u8, out: &mut Vec<u8>) {
    let min = min_class(n as usize, &[127, 0xff, 0xffff, 0xffff_ffff, usize::MAX]);
    match min.max(w as usize % 5) {
        0 => out.push(n as u8),
        1 => out.extend_from_slice(&[0xcc, n as u8]),
        2 => {
            out.push(0xcd);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        3 => {
            out.push(0xce);
            out.extend_from_slice(&(n as u32).to_be_bytes());
        }
        _ => {
            out.push(0xcf);
            out.extend_from_slice(&n.to_be_bytes());
        }
    }
}

fn enc_nint(n: i64, w: u8, out: &mut Vec<u8>) {
    let n = if n >= 0 { -1 - n } else { n };
    let min = if n >= -32 {
        0
    } else if n >= i8::MIN as i64 {
        1
    } else if n >= i16::MIN as i64 {
        2
    } else if n >= i32::MIN as i64 {
        3
    } else {
        4
    };
    match min.max(w as usize % 5) {
        0 => out.push(n as i8 as u8),
        1 => out.extend_from_slice(&[0xd0, n as i8 as u8]),
        2 => {
            out.push(0xd1);
            out.extend_from_slice(&(n as i16).to_be_bytes());
        }
        3 => {
            out.push(0xd2);
            out.extend_from_slice(&(n as i32).to_be_bytes());
        }
        _ => {
            out.push(0xd3);
            out.extend_from_slice(&n.to_be_bytes());
        }
    }
}

fn enc_ext(kind: i8, data: &[u8], w: u8, out: &mut Vec<u8>) {
    let fixed = match data.len() {
        1 => Some(0xd4),
        2 => Some(0xd5),
        4 => Some(0xd6),
        8 => Some(0xd7),
        16 => Some(0xd8),
        _ => None,
    };
    match (
        fixed,
        min_class(data.len(), &[0xff, 0xffff, usize::MAX]).max(w as usize % 4),
    ) {
        (Some(marker), 0) => out.push(marker),
        (_, 0 | 1) => {
            out.push(0xc7);
            put_len(out, 1, data.len());
        }
        (_, 2) => {
            out.push(0xc8);
            put_len(out, 2, data.len());
        }
        _ => {
            out.push(0xc9);
            put_len(out, 4, data.len());
        }
    }
    out.push(kind as u8);
    out.extend_from_slice(data);
}

pub fn encode(v: &V) -> Vec<u8> {
    let mut out = Vec::new();
    enc(v, &mut out);
    out
}

/// str header: fixstr / str8 / str16 / str32 (the smallest that fits, or wider).
pub fn put_str_header(out: &mut Vec<u8>, len: usize, w: u8) {
    match min_class(len, &[31, 0xff, 0xffff, usize::MAX]).max(w as usize % 4) {
        0 => out.push(0xa0 | len as u8),
        1 => {
            out.push(0xd9);
            put_len(out, 1, len);
        }
        2 => {
            out.push(0xda);
            put_len(out, 2, len);
        }
        _ => {
            out.push(0xdb);
            put_len(out, 4, len);
        }
    }
}

/// bin header: bin8 / bin16 / bin32.
pub fn put_bin_header(out: &mut Vec<u8>, len: usize, w: u8) {
    let class = min_class(len, &[0xff, 0xffff, usize::MAX]).max(w as usize % 3);
    out.push(0xc4 + class as u8);
    put_len(out, [1, 2, 4][class], len);
}

/// array header: fixarray / array16 / array32.
pub fn put_array_header(out: &mut Vec<u8>, len: usize, w: u8) {
    put_container_header(out, len, w, 0x90, 0xdc);
}

/// map header: fixmap / map16 / map32.
pub fn put_map_header(out: &mut Vec<u8>, len: usize, w: u8) {
    put_container_header(out, len, w, 0x80, 0xde);
}

/// `fix | len`, or the 16-bit marker and the 32-bit one after it.
fn put_container_header(out: &mut Vec<u8>, len: usize, w: u8, fix: u8, marker16: u8) {
    match min_class(len, &[15, 0xffff, usize::MAX]).max(w as usize % 3) {
        0 => out.push(fix | len as u8),
        1 => {
            out.push(marker16);
            put_len(out, 2, len);
        }
        _ => {
            out.push(marker16 + 1);
            put_len(out, 4, len);
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Readers

/// The elements of the complete msgpack array `raw` (each as its own bytes).
pub fn array_elements(raw: &[u8]) -> Vec<&[u8]> {
    let Some(Header::Array { offset, count }) = read_header(raw) else {
        panic!("not a msgpack array: {}", hex(&raw[..raw.len().min(16)]));
    };
    let mut pos = offset;
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let len = value_len(&raw[pos..], DEPTH)
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("array element {i} incomplete: {}", hex(raw)));
        out.push(&raw[pos..pos + len]);
        pos += len;
    }
    out
}

/// `(key content, raw value)` pairs of the complete msgpack map `raw`.
pub fn map_entries(raw: &[u8]) -> Vec<(Vec<u8>, &[u8])> {
    let Some(Header::Map { offset, count }) = read_header(raw) else {
        panic!("not a msgpack map: {}", hex(raw));
    };
    let mut pos = offset;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let klen = value_len(&raw[pos..], DEPTH)
            .ok()
            .flatten()
            .expect("map key");
        let key = byte_content(&raw[pos..pos + klen])
            .unwrap_or_else(|| panic!("map key is not str/bin: {}", hex(raw)))
            .to_vec();
        pos += klen;
        let vlen = value_len(&raw[pos..], DEPTH)
            .ok()
            .flatten()
            .expect("map value");
        out.push((key, &raw[pos..pos + vlen]));
        pos += vlen;
    }
    out
}

/// Content of a complete msgpack str or bin value.
pub fn byte_content(value: &[u8]) -> Option<&[u8]> {
    match read_header(value)? {
        Header::Str { offset, len } | Header::Bin { offset, len } => {
            value.get(offset..offset + len)
        }
        _ => None,
    }
}

/// Content of a msgpack str/bin value as a (lossy) string.
pub fn raw_string(value: &[u8]) -> Option<String> {
    byte_content(value).map(|b| String::from_utf8_lossy(b).into_owned())
}

/// The whole msgpack values at the front of `buf`, and how many bytes they took.
pub fn complete_values(buf: &[u8]) -> (Vec<Vec<u8>>, usize) {
    let mut pos = 0;
    let mut out = Vec::new();
    while let Ok(Some(n)) = value_len(&buf[pos..], DEPTH) {
        out.push(buf[pos..pos + n].to_vec());
        pos += n;
    }
    (out, pos)
}

/// Every value of `buf`, which must be nothing but whole msgpack values.
pub fn whole_values(buf: &[u8]) -> Vec<Vec<u8>> {
    let (values, used) = complete_values(buf);
    assert_eq!(
        used,
        buf.len(),
        "not whole msgpack values: {}",
        hex(&buf[used..buf.len().min(used + 16)])
    );
    values
}

pub fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}
