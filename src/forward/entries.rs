//! The `[time, record]` walk over concatenated entries, and capped inflation of compressed ones.
//!
//! Entries are validated by skipping, never decoded (invariant 6): each must be a 2-element
//! array whose time is an integer, a float, an EventTime (ext type 0, 8 bytes, fixext8 or ext8)
//! or the v1.5 `[time, {metadata}]` pair, and whose record is a map (PROTOCOL.md §3, §5, §13.8).
//! What passes here is what every fluentd and fluent-bit receiver can at least parse; a frame
//! with one bad entry is rejected whole (invariant 4), since a relay cannot un-ack later.

use std::io::Read;

use super::msgpack::{read_header, value_len, Header, SkipError};

/// Why a run of entries is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("entry {index}: {source}")]
    Msgpack { index: u32, source: SkipError },
    #[error("entry {index} is cut short")]
    Truncated { index: u32 },
    #[error("entry {index} is not a [time, record] array")]
    NotPair { index: u32 },
    #[error(
        "entry {index} has a time that is not an integer, float, EventTime or [time, metadata]"
    )]
    BadTime { index: u32 },
    #[error("entry {index} has a record that is not a map")]
    BadRecord { index: u32 },
    #[error("more than {limit} entries")]
    TooMany { limit: u32 },
}

/// Why a compressed payload could not be inflated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InflateError {
    #[error("compressed payload inflates past the limit of {limit} bytes")]
    TooLarge { limit: usize },
    #[error("corrupt {codec} payload: {reason}")]
    Corrupt { codec: &'static str, reason: String },
}

/// Compression of a CompressedPackedForward payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    Zstd,
}

impl Compression {
    /// The `compressed` option value that names this codec.
    pub fn name(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }

    /// Recognise a payload by its magic bytes, as fluent-bit does (PROTOCOL.md §3). A valid
    /// uncompressed payload starts with an array marker, so this never misreads one.
    pub fn sniff(payload: &[u8]) -> Option<Compression> {
        if payload.starts_with(&[0x1f, 0x8b]) {
            Some(Compression::Gzip)
        } else if payload.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Some(Compression::Zstd)
        } else {
            None
        }
    }
}

/// Walk `buf` as concatenated entries; returns how many there are.
pub fn count_entries(buf: &[u8], max_depth: usize) -> Result<u32, EntryError> {
    let mut pos = 0usize;
    let mut index: u32 = 0;
    while pos < buf.len() {
        let len = entry_len(&buf[pos..], index, max_depth)?;
        pos += len;
        index = index
            .checked_add(1)
            .ok_or(EntryError::TooMany { limit: u32::MAX })?;
    }
    Ok(index)
}

/// Check one entry at the start of `buf`; returns its length in bytes.
pub fn entry_len(buf: &[u8], index: u32, max_depth: usize) -> Result<usize, EntryError> {
    if let Some(len) = plain_entry_len(buf, max_depth) {
        return Ok(len);
    }
    checked_entry_len(buf, index, max_depth)
}

/// The shape nearly every sender writes, `[int|float|EventTime, {record}]`, checked in one walk
/// of the record. `None` for any other shape and for anything invalid: then
/// [`checked_entry_len`] decides, and names what is wrong.
fn plain_entry_len(buf: &[u8], max_depth: usize) -> Option<usize> {
    if buf.first() != Some(&0x92) || max_depth < 2 {
        return None;
    }
    let time_len = plain_time_len(buf.get(1..)?)?;
    let record = buf.get(1 + time_len..)?;
    if !matches!(record.first(), Some(0x80..=0x8f | 0xde | 0xdf)) {
        return None;
    }
    // The record is one level inside the entry's array.
    let record_len = value_len(record, max_depth - 1).ok()??;
    Some(1 + time_len + record_len)
}

/// Bytes of a time that is an integer, a float or an EventTime (fixext8 or ext8 of type 0).
fn plain_time_len(time: &[u8]) -> Option<usize> {
    let len = match *time.first()? {
        0x00..=0x7f | 0xe0..=0xff => 1,
        0xcc | 0xd0 => 2,
        0xcd | 0xd1 => 3,
        0xca | 0xce | 0xd2 => 5,
        0xcb | 0xcf | 0xd3 => 9,
        0xd7 if time.get(1) == Some(&0) => 10,
        0xc7 if time.get(1..3) == Some(&[8, 0]) => 11,
        _ => return None,
    };
    (time.len() >= len).then_some(len)
}

/// [`entry_len`] for every shape, with the reason when the entry is not acceptable.
fn checked_entry_len(buf: &[u8], index: u32, max_depth: usize) -> Result<usize, EntryError> {
    let len = value_len(buf, max_depth)
        .map_err(|source| EntryError::Msgpack { index, source })?
        .ok_or(EntryError::Truncated { index })?;
    let entry = &buf[..len];
    let Some(Header::Array { offset, count: 2 }) = read_header(entry) else {
        return Err(EntryError::NotPair { index });
    };
    let time = &entry[offset..];
    let time_len = value_len(time, max_depth)
        .ok()
        .flatten()
        .ok_or(EntryError::BadTime { index })?;
    if !is_time(&time[..time_len], max_depth) {
        return Err(EntryError::BadTime { index });
    }
    let record = &time[time_len..];
    match read_header(record) {
        Some(Header::Map { .. }) => Ok(len),
        _ => Err(EntryError::BadRecord { index }),
    }
}

/// Integer, float, EventTime, or the v1.5 `[EventTime|int, {metadata}]` form.
fn is_time(time: &[u8], max_depth: usize) -> bool {
    match read_header(time) {
        Some(Header::Int) | Some(Header::Float) => true,
        Some(Header::Ext {
            kind: 0, len: 8, ..
        }) => true,
        Some(Header::Array { offset, count: 2 }) => {
            let inner = &time[offset..];
            let Ok(Some(first)) = value_len(inner, max_depth) else {
                return false;
            };
            let plain = matches!(
                read_header(inner),
                Some(Header::Int)
                    | Some(Header::Ext {
                        kind: 0,
                        len: 8,
                        ..
                    })
            );
            plain && matches!(read_header(&inner[first..]), Some(Header::Map { .. }))
        }
        _ => false,
    }
}

/// The compatibility rewrite for aggregators that cannot read v1.5 metadata (fluentd ≤ 1.19
/// raises on `[[time, {}], record]`, sends no ack and resets: captures/README.md): every entry
/// whose metadata map is **empty** becomes `[time, record]`, with the time and record bytes
/// unchanged. Entries with non-empty metadata are left alone. `None` if nothing changed.
/// This is the one opt-in exception to invariant 6.
pub fn strip_empty_metadata(
    entries: &[u8],
    max_depth: usize,
) -> Result<Option<Vec<u8>>, EntryError> {
    let mut out: Option<Vec<u8>> = None;
    let mut pos = 0usize;
    let mut index = 0u32;
    while pos < entries.len() {
        let len = entry_len(&entries[pos..], index, max_depth)?;
        let entry = &entries[pos..pos + len];
        let rewritten = empty_metadata_parts(entry, max_depth);
        match (rewritten, out.as_mut()) {
            (Some((time, record)), Some(buf)) => {
                buf.push(0x92);
                buf.extend_from_slice(time);
                buf.extend_from_slice(record);
            }
            (Some((time, record)), None) => {
                let mut buf = Vec::with_capacity(entries.len());
                buf.extend_from_slice(&entries[..pos]);
                buf.push(0x92);
                buf.extend_from_slice(time);
                buf.extend_from_slice(record);
                out = Some(buf);
            }
            (None, Some(buf)) => buf.extend_from_slice(entry),
            (None, None) => {}
        }
        pos += len;
        index += 1;
    }
    Ok(out)
}

/// For `[[time, {}], record]`: the time and record bytes.
fn empty_metadata_parts(entry: &[u8], max_depth: usize) -> Option<(&[u8], &[u8])> {
    let Some(Header::Array { offset, count: 2 }) = read_header(entry) else {
        return None;
    };
    let pair = &entry[offset..];
    let Some(Header::Array {
        offset: inner,
        count: 2,
    }) = read_header(pair)
    else {
        return None;
    };
    let pair_len = value_len(pair, max_depth).ok()??;
    let time_len = value_len(&pair[inner..], max_depth).ok()??;
    let time = &pair[inner..inner + time_len];
    let meta = &pair[inner + time_len..pair_len];
    match read_header(meta) {
        Some(Header::Map { count: 0, .. }) => Some((time, &pair[pair_len..])),
        _ => None,
    }
}

/// Inflate `payload` (gzip members back to back, or zstd frames) up to `limit` bytes.
pub fn inflate(codec: Compression, payload: &[u8], limit: usize) -> Result<Vec<u8>, InflateError> {
    let mut out = Vec::with_capacity(payload.len().saturating_mul(4).min(limit));
    let cap = limit as u64 + 1;
    let result = match codec {
        Compression::Gzip => flate2::read::MultiGzDecoder::new(payload)
            .take(cap)
            .read_to_end(&mut out),
        Compression::Zstd => match zstd::stream::read::Decoder::with_buffer(payload) {
            Ok(decoder) => decoder.take(cap).read_to_end(&mut out),
            Err(e) => Err(e),
        },
    };
    if let Err(e) = result {
        return Err(InflateError::Corrupt {
            codec: codec.name(),
            reason: e.to_string(),
        });
    }
    if out.len() > limit {
        return Err(InflateError::TooLarge { limit });
    }
    Ok(out)
}

/// Compress `entries` as one gzip member (for upstream nodes configured with gzip).
pub fn deflate_gzip(entries: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    // Writing into a Vec cannot fail.
    let _ = encoder.write_all(entries);
    encoder.finish().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fast path for plain entries and the full check agree on `buf`.
    fn assert_entry_checks_agree(buf: &[u8]) {
        for depth in [0, 1, 2, 3, 64] {
            let fast = plain_entry_len(buf, depth);
            let checked = checked_entry_len(buf, 0, depth);
            if let Some(len) = fast {
                assert_eq!(Ok(len), checked, "depth {depth}, bytes {buf:02x?}");
            }
        }
    }

    #[test]
    fn plain_entries_take_the_fast_path_and_agree_with_the_full_check() {
        let int = [0x92, 0x01, 0x81, 0xa1, b'k', 0xa1, b'v'];
        let event_time = [0x92, 0xd7, 0x00, 0, 0, 0, 1, 0, 0, 0, 2, 0x80];
        let ext8 = [0x92, 0xc7, 0x08, 0x00, 0, 0, 0, 1, 0, 0, 0, 2, 0x80];
        let float = [0x92, 0xcb, 0, 0, 0, 0, 0, 0, 0, 0, 0x80];
        for entry in [&int[..], &event_time, &ext8, &float] {
            assert_eq!(plain_entry_len(entry, 64), Some(entry.len()));
            assert_entry_checks_agree(entry);
        }
        // v1.5 metadata, a string time, a truncated record: the full check decides.
        let metadata = [0x92, 0x92, 0x01, 0x80, 0x80];
        assert_eq!(plain_entry_len(&metadata, 64), None);
        assert_eq!(entry_len(&metadata, 0, 64), Ok(metadata.len()));
        assert_eq!(plain_entry_len(&[0x92, 0xa1, b't', 0x80], 64), None);
        assert_eq!(plain_entry_len(&int[..5], 64), None);
        assert_eq!(
            entry_len(&int[..5], 3, 64),
            Err(EntryError::Truncated { index: 3 })
        );
        // Nesting: the entry's array is a level, as in the full check.
        let nested = [0x92, 0x01, 0x81, 0xa1, b'k', 0x91, 0x90];
        for depth in 0..5 {
            assert_eq!(
                entry_len(&nested, 0, depth).is_ok(),
                depth >= 3,
                "depth limit {depth}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn the_fast_path_never_accepts_what_the_full_check_refuses(
            tail in proptest::collection::vec(proptest::sample::select(vec![0x90u8, 0x91, 0x80, 0x81, 0x01, 0xa1, 0xc0, 0xc1, 0xd7, 0x00, 0xcc, 0xde, 0x92]), 0..40)
        ) {
            let mut buf = vec![0x92];
            buf.extend_from_slice(&tail);
            assert_entry_checks_agree(&buf);
        }
    }

    const INT_ENTRY: &[u8] = &[0x92, 0xce, 0x6b, 0x07, 0xd1, 0x6d, 0x81, 0xa1, b'a', 0x01];

    #[test]
    fn every_time_kind_is_accepted() {
        let event_time_fixext = [0x92, 0xd7, 0x00, 1, 2, 3, 4, 5, 6, 7, 8, 0x80];
        let event_time_ext8 = [0x92, 0xc7, 0x08, 0x00, 1, 2, 3, 4, 5, 6, 7, 8, 0x80];
        let float = [0x92, 0xcb, 0x41, 0xd9, 0, 0, 0, 0, 0, 0, 0x80];
        let v15 = [0x92, 0x92, 0xd7, 0x00, 1, 2, 3, 4, 5, 6, 7, 8, 0x80, 0x80];
        for entry in [
            INT_ENTRY,
            &event_time_fixext[..],
            &event_time_ext8[..],
            &float[..],
            &v15[..],
        ] {
            assert_eq!(count_entries(entry, 32), Ok(1), "{entry:02x?}");
        }
        let mut two = INT_ENTRY.to_vec();
        two.extend_from_slice(&float);
        assert_eq!(count_entries(&two, 32), Ok(2));
    }

    #[test]
    fn malformed_entries_are_named() {
        assert_eq!(
            count_entries(&[0x91, 0x01], 32),
            Err(EntryError::NotPair { index: 0 })
        );
        assert_eq!(
            count_entries(&[0x92, 0xa1, b'x', 0x80], 32),
            Err(EntryError::BadTime { index: 0 })
        );
        assert_eq!(
            count_entries(&[0x92, 0x01, 0x01], 32),
            Err(EntryError::BadRecord { index: 0 })
        );
        assert_eq!(
            count_entries(&INT_ENTRY[..5], 32),
            Err(EntryError::Truncated { index: 0 })
        );
        // ext type 0 with 4 bytes is not an EventTime.
        assert_eq!(
            count_entries(&[0x92, 0xd6, 0x00, 1, 2, 3, 4, 0x80], 32),
            Err(EntryError::BadTime { index: 0 })
        );
    }

    #[test]
    fn strip_empty_metadata_rewrites_only_empty_maps() {
        // fluent-bit 5 layout: [[EventTime, df 00 00 00 00], {"a": 1}]
        let v15 = [
            0x92, 0x92, 0xd7, 0x00, 1, 2, 3, 4, 5, 6, 7, 8, 0xdf, 0, 0, 0, 0, 0x81, 0xa1, b'a',
            0x01,
        ];
        let plain = [
            0x92, 0xd7, 0x00, 1, 2, 3, 4, 5, 6, 7, 8, 0x81, 0xa1, b'a', 0x01,
        ];
        let with_meta = [
            0x92, 0x92, 0x01, 0x81, 0xa1, b'k', 0x02, 0x81, 0xa1, b'a', 0x01,
        ];
        let mut input = INT_ENTRY.to_vec();
        input.extend_from_slice(&v15);
        input.extend_from_slice(&with_meta);
        let out = strip_empty_metadata(&input, 32).unwrap().unwrap();
        let mut expected = INT_ENTRY.to_vec();
        expected.extend_from_slice(&plain);
        expected.extend_from_slice(&with_meta);
        assert_eq!(out, expected);
        assert_eq!(strip_empty_metadata(INT_ENTRY, 32), Ok(None));
        assert_eq!(count_entries(&out, 32), Ok(3));
    }

    #[test]
    fn multi_member_gzip_inflates_whole() {
        let mut payload = deflate_gzip(INT_ENTRY);
        payload.extend(deflate_gzip(INT_ENTRY));
        let out = inflate(Compression::Gzip, &payload, 1024).unwrap();
        assert_eq!(out, [INT_ENTRY, INT_ENTRY].concat());
        assert_eq!(
            inflate(Compression::Gzip, &payload, 10),
            Err(InflateError::TooLarge { limit: 10 })
        );
        assert!(inflate(Compression::Gzip, &payload[..payload.len() - 3], 1024).is_err());
    }

    #[test]
    fn zstd_inflates_and_is_capped() {
        let payload = zstd::encode_all(INT_ENTRY, 1).unwrap();
        assert_eq!(Compression::sniff(&payload), Some(Compression::Zstd));
        assert_eq!(
            inflate(Compression::Zstd, &payload, 1024).unwrap(),
            INT_ENTRY
        );
        assert!(matches!(
            inflate(Compression::Zstd, &payload, 4),
            Err(InflateError::TooLarge { .. })
        ));
    }
}
