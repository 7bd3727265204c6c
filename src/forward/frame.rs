//! One Forward request, found in a byte stream and normalised.
//!
//! [`FrameDecoder::decode`] returns `Ok(None)` until a whole msgpack value is buffered (the
//! mini-redis pattern), then slices it off and parses it: tag, options, and the raw bytes of the
//! `[time, record]` entries, whatever the carrier mode (PROTOCOL.md §3). A `nil` value is a
//! health-check no-op (§2.1). Errors mean "close this connection"; the decoder never tries to
//! resynchronise mid-stream (invariant 4).

use bytes::{BufMut, Bytes, BytesMut};

use super::entries::{count_entries, inflate, Compression, EntryError, InflateError};
use super::msgpack::{read_header, value_len, Header, Progress, SkipError, Skipper};

/// Bounds on what one peer can make ackgate buffer or inflate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest request accepted, as bytes on the wire.
    pub max_frame_bytes: usize,
    /// Largest inflated CompressedPackedForward payload.
    pub max_decompressed_bytes: usize,
    /// Deepest msgpack nesting accepted inside a request.
    pub max_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: 16 << 20,
            max_decompressed_bytes: 256 << 20,
            max_depth: super::MAX_DEPTH,
        }
    }
}

/// The carrier mode a request used (PROTOCOL.md §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Message,
    Forward,
    PackedForward,
    CompressedPackedForward(Compression),
}

/// What a request carries: the v1.5 `fluent_signal` option (PROTOCOL.md §3.1, §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Signal {
    /// `[time, record]` entries (the default when the option is absent).
    #[default]
    Logs,
    /// One or more cmetrics contexts, each a msgpack value, as a str/bin payload.
    Metrics,
    /// One or more ctraces contexts, each a msgpack value, as a str/bin payload.
    Traces,
}

impl Signal {
    /// The option's wire value.
    pub fn code(self) -> u8 {
        match self {
            Signal::Logs => 0,
            Signal::Metrics => 1,
            Signal::Traces => 2,
        }
    }

    pub fn from_code(code: i64) -> Option<Signal> {
        match code {
            0 => Some(Signal::Logs),
            1 => Some(Signal::Metrics),
            2 => Some(Signal::Traces),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Signal::Logs => "logs",
            Signal::Metrics => "metrics",
            Signal::Traces => "traces",
        }
    }
}

/// A decoded request, with its events as raw entry bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub mode: Mode,
    /// The tag's bytes (content of the str or bin, without the msgpack header).
    pub tag: Bytes,
    /// Logs, metrics or traces.
    pub signal: Signal,
    /// For logs: concatenated `[time, record]` msgpack arrays exactly as the sender wrote them
    /// (inflated when the request was compressed; for Message mode, the sender's time and
    /// record bytes behind a `0x92` array header). For metrics and traces: the payload's
    /// msgpack values (cmetrics/ctraces contexts) exactly as sent, inflated if compressed.
    pub entries: Bytes,
    /// Number of entries (for metrics and traces: of contexts in the payload).
    pub events: u32,
    /// The `chunk` option value as raw msgpack bytes (header included), to echo in the ack.
    pub chunk: Option<Bytes>,
    /// Bytes the request took on the wire.
    pub wire_len: usize,
}

/// What one msgpack value on a Forward connection turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// A request carrying events.
    Frame(Frame),
    /// msgpack `nil`: a keep-alive no-op, nothing to store or answer.
    Nil,
}

/// Why a request was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("malformed msgpack: {0}")]
    Msgpack(SkipError),
    #[error("request larger than max_frame_bytes ({limit} bytes)")]
    TooLarge { limit: usize },
    #[error("request is not an array (first byte 0x{marker:02x})")]
    NotArray { marker: u8 },
    #[error("request array has {count} elements, expected 2 to 4")]
    BadArity { count: usize },
    #[error("tag is not a string")]
    BadTag,
    #[error("second element is neither entries nor a time (marker 0x{marker:02x})")]
    UnknownMode { marker: u8 },
    #[error("{mode:?} request with {count} elements")]
    ModeArity { mode: Mode, count: usize },
    #[error("Message-mode record is not a map")]
    BadMessageRecord,
    #[error("option is not a map or nil")]
    BadOption,
    #[error("option {key:?} has the wrong type")]
    BadOptionValue { key: &'static str },
    #[error("unsupported compressed option {0:?}")]
    UnknownCompression(String),
    #[error("fluent_signal {0} is not 0 (logs), 1 (metrics) or 2 (traces)")]
    UnknownSignal(i64),
    #[error("fluent_signal {} ({}) needs a str/bin payload, not {mode:?} mode", .signal.code(), .signal.name())]
    SignalMode { signal: Signal, mode: Mode },
    #[error("{} payload is not a sequence of whole msgpack values: {reason}", .signal.name())]
    SignalPayload { signal: Signal, reason: String },
    #[error("forward entries array declares {declared} entries, found {found}")]
    CountMismatch { declared: usize, found: u32 },
    #[error("{0}")]
    Entry(#[from] EntryError),
    #[error("{0}")]
    Inflate(#[from] InflateError),
}

impl FrameError {
    /// A short stable label for metrics (`rejected_connections{reason=...}`).
    pub fn kind(&self) -> &'static str {
        match self {
            FrameError::Msgpack(_) => "malformed_msgpack",
            FrameError::TooLarge { .. } => "too_large",
            FrameError::Entry(_) | FrameError::CountMismatch { .. } => "bad_entry",
            FrameError::Inflate(_) | FrameError::UnknownCompression(_) => "bad_compression",
            FrameError::UnknownSignal(_) | FrameError::SignalMode { .. } => "bad_signal",
            FrameError::SignalPayload { .. } => "bad_entry",
            _ => "bad_request",
        }
    }
}

/// Finds request boundaries in a connection's byte stream.
#[derive(Debug, Clone)]
pub struct FrameDecoder {
    skipper: Skipper,
    limits: Limits,
    /// The whole request that the last error rejected, kept for inspection (invariant 4).
    rejected: Option<Bytes>,
    /// Bytes the request being read needs at least, as far as its declared lengths tell.
    wanted: usize,
}

impl FrameDecoder {
    pub fn new(limits: Limits) -> Self {
        FrameDecoder {
            skipper: Skipper::new(limits.max_depth, limits.max_frame_bytes),
            limits,
            rejected: None,
            wanted: 0,
        }
    }

    /// Bytes the request at the front of the buffer needs at least (0 when none is started or
    /// nothing tells yet): a declared str32/bin32 length tells how much is coming, so the
    /// caller may make room once. Never more than `max_frame_bytes` plus a header.
    pub fn wanted(&self) -> usize {
        self.wanted
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// After an error: the rejected request when it was complete; else `None` (the bytes are
    /// still at the front of the caller's buffer).
    pub fn take_rejected(&mut self) -> Option<Bytes> {
        self.rejected.take()
    }

    /// Take one request off the front of `buf`, or `Ok(None)` if it is not all there yet.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Decoded>, FrameError> {
        if buf.is_empty() {
            return Ok(None);
        }
        match self.skipper.advance(buf) {
            Ok(Progress::Incomplete { needed_at_least }) => {
                // The caller decides whether to make room (its memory budget), not the peer.
                self.wanted = needed_at_least;
                Ok(None)
            }
            Ok(Progress::Complete(end)) => {
                self.skipper.reset();
                self.wanted = 0;
                let bytes = buf.split_to(end).freeze();
                parse_request(bytes.clone(), &self.limits)
                    .map(Some)
                    .inspect_err(|_| self.rejected = Some(bytes))
            }
            Err(SkipError::TooLong { .. }) => Err(FrameError::TooLarge {
                limit: self.limits.max_frame_bytes,
            }),
            Err(other) => Err(FrameError::Msgpack(other)),
        }
    }
}

/// Options ackgate reads; every other key is tolerated and ignored (PROTOCOL.md §4).
#[derive(Debug, Default)]
struct Options {
    chunk: Option<Bytes>,
    compressed: Option<Bytes>,
    signal: Signal,
}

/// Parse one complete msgpack value as a Forward request.
pub fn parse_request(bytes: Bytes, limits: &Limits) -> Result<Decoded, FrameError> {
    let wire_len = bytes.len();
    let depth = limits.max_depth;
    let (offset, count) = match read_header(&bytes) {
        Some(Header::Nil) => return Ok(Decoded::Nil),
        Some(Header::Array { offset, count }) => (offset, count),
        _ => {
            return Err(FrameError::NotArray {
                marker: bytes.first().copied().unwrap_or(0),
            })
        }
    };
    if !(2..=4).contains(&count) {
        return Err(FrameError::BadArity { count });
    }
    let mut elements = Vec::with_capacity(count);
    let mut pos = offset;
    for _ in 0..count {
        let len = value_len(&bytes[pos..], depth)
            .map_err(FrameError::Msgpack)?
            .ok_or(FrameError::Msgpack(SkipError::TooLong {
                needed: 0,
                limit: wire_len,
            }))?;
        elements.push(pos..pos + len);
        pos += len;
    }
    let tag = match read_header(&bytes[elements[0].clone()]) {
        Some(Header::Str { offset, len }) | Some(Header::Bin { offset, len }) => {
            let start = elements[0].start + offset;
            bytes.slice(start..start + len)
        }
        _ => return Err(FrameError::BadTag),
    };
    let second = elements[1].clone();
    let marker = bytes[second.start];
    let (mode, entries, events, option_index) = match read_header(&bytes[second.clone()]) {
        Some(Header::Array {
            offset,
            count: declared,
        }) => forward_mode(&bytes, &second, offset, declared, count, depth)?,
        Some(Header::Str { offset, len }) | Some(Header::Bin { offset, len }) => {
            let payload = second.start + offset..second.start + offset + len;
            packed_mode(&bytes, payload, elements.get(2), count, limits)?
        }
        Some(Header::Int)
        | Some(Header::Float)
        | Some(Header::Ext {
            kind: 0, len: 8, ..
        }) => message_mode(&bytes, &elements, count)?,
        _ => return Err(FrameError::UnknownMode { marker }),
    };
    // An empty batch is valid: nothing to store, but acked when asked (as fluentd does).
    let options = parse_options(&bytes, elements.get(option_index), depth)?;
    // Metrics and traces are opaque payloads (fluent-bit's in_forward takes them only as
    // str/bin); an array or a Message would be read as log events by every receiver.
    if options.signal != Signal::Logs && matches!(mode, Mode::Forward | Mode::Message) {
        return Err(FrameError::SignalMode {
            signal: options.signal,
            mode,
        });
    }
    Ok(Decoded::Frame(Frame {
        mode,
        tag,
        signal: options.signal,
        entries,
        events,
        chunk: options.chunk,
        wire_len,
    }))
}

/// A request's mode, entries, event count and where its options are.
type ModeParts = (Mode, Bytes, u32, usize);

/// Forward mode: `[tag, [[time, record], ...], options?]`.
fn forward_mode(
    bytes: &Bytes,
    second: &std::ops::Range<usize>,
    offset: usize,
    declared: usize,
    count: usize,
    depth: usize,
) -> Result<ModeParts, FrameError> {
    if count > 3 {
        return Err(FrameError::ModeArity {
            mode: Mode::Forward,
            count,
        });
    }
    let entries = bytes.slice(second.start + offset..second.end);
    let found = count_entries(&entries, depth)?;
    if found as usize != declared {
        return Err(FrameError::CountMismatch { declared, found });
    }
    Ok((Mode::Forward, entries, found, 2))
}

/// (Compressed)PackedForward: `[tag, str|bin payload, options?]`; the payload holds entries,
/// or metrics/traces contexts when the options carry a `fluent_signal`.
fn packed_mode(
    bytes: &Bytes,
    payload: std::ops::Range<usize>,
    options_element: Option<&std::ops::Range<usize>>,
    count: usize,
    limits: &Limits,
) -> Result<ModeParts, FrameError> {
    let depth = limits.max_depth;
    if count > 3 {
        return Err(FrameError::ModeArity {
            mode: Mode::PackedForward,
            count,
        });
    }
    let payload = bytes.slice(payload);
    let options = parse_options(bytes, options_element, depth)?;
    // The magic bytes win over the option, as in fluent-bit: a valid uncompressed
    // payload starts with an array marker, so gzip/zstd magic is never ambiguous.
    let codec = match options.compressed.as_deref() {
        None | Some(b"text") => Compression::sniff(&payload),
        Some(b"gzip") => Some(Compression::Gzip),
        Some(b"zstd") => Some(Compression::Zstd),
        Some(other) => {
            return Err(FrameError::UnknownCompression(
                String::from_utf8_lossy(other).into_owned(),
            ))
        }
    };
    let (mode, entries) = match codec {
        None => (Mode::PackedForward, payload),
        Some(codec) => (
            Mode::CompressedPackedForward(codec),
            Bytes::from(inflate(codec, &payload, limits.max_decompressed_bytes)?),
        ),
    };
    let events = match options.signal {
        Signal::Logs => count_entries(&entries, depth)?,
        signal => count_values(&entries, depth)
            .map_err(|reason| FrameError::SignalPayload { signal, reason })?,
    };
    Ok((mode, entries, events, 2))
}

/// Message mode: `[tag, time, record, options?]`, one event.
fn message_mode(
    bytes: &Bytes,
    elements: &[std::ops::Range<usize>],
    count: usize,
) -> Result<ModeParts, FrameError> {
    if count < 3 {
        return Err(FrameError::ModeArity {
            mode: Mode::Message,
            count,
        });
    }
    let time = elements[1].clone();
    let record = elements[2].clone();
    if !matches!(
        read_header(&bytes[record.clone()]),
        Some(Header::Map { .. })
    ) {
        return Err(FrameError::BadMessageRecord);
    }
    // [time, record] from the sender's own bytes: only the array header is ours.
    let mut entry = BytesMut::with_capacity(1 + record.end - time.start);
    entry.put_u8(0x92);
    entry.put_slice(&bytes[time.start..record.end]);
    Ok((Mode::Message, entry.freeze(), 1, 3))
}

fn parse_options(
    bytes: &Bytes,
    element: Option<&std::ops::Range<usize>>,
    depth: usize,
) -> Result<Options, FrameError> {
    let mut options = Options::default();
    let Some(range) = element else {
        return Ok(options);
    };
    let map = &bytes[range.clone()];
    let (mut pos, pairs) = match read_header(map) {
        Some(Header::Nil) => return Ok(options),
        Some(Header::Map { offset, count }) => (offset, count),
        _ => return Err(FrameError::BadOption),
    };
    for _ in 0..pairs {
        let key_len = value_len(&map[pos..], depth)
            .map_err(FrameError::Msgpack)?
            .ok_or(FrameError::BadOption)?;
        let key = match read_header(&map[pos..]) {
            Some(Header::Str { offset, len }) | Some(Header::Bin { offset, len }) => {
                &map[pos + offset..pos + offset + len]
            }
            _ => b"",
        };
        let value_start = pos + key_len;
        let value_end = value_start
            + value_len(&map[value_start..], depth)
                .map_err(FrameError::Msgpack)?
                .ok_or(FrameError::BadOption)?;
        let value = &map[value_start..value_end];
        match key {
            b"chunk" => match read_header(value) {
                Some(Header::Str { .. }) | Some(Header::Bin { .. }) => {
                    options.chunk =
                        Some(bytes.slice(range.start + value_start..range.start + value_end));
                }
                _ => return Err(FrameError::BadOptionValue { key: "chunk" }),
            },
            b"compressed" => match read_header(value) {
                Some(Header::Str { offset, len }) | Some(Header::Bin { offset, len }) => {
                    let start = range.start + value_start + offset;
                    options.compressed = Some(bytes.slice(start..start + len));
                }
                Some(Header::Nil) => {}
                _ => return Err(FrameError::BadOptionValue { key: "compressed" }),
            },
            b"fluent_signal" => match read_int(value) {
                Some(code) => {
                    options.signal =
                        Signal::from_code(code).ok_or(FrameError::UnknownSignal(code))?
                }
                None => {
                    return Err(FrameError::BadOptionValue {
                        key: "fluent_signal",
                    })
                }
            },
            _ => {}
        }
        pos = value_end;
    }
    Ok(options)
}

/// Count the whole msgpack values in a metrics/traces payload (at least one, nothing left over).
fn count_values(payload: &[u8], depth: usize) -> Result<u32, String> {
    let mut pos = 0;
    let mut values = 0u32;
    while pos < payload.len() {
        match value_len(&payload[pos..], depth).map_err(|e| e.to_string())? {
            Some(len) => pos += len,
            None => return Err(format!("value {values} is cut off at byte {pos}")),
        }
        values = values.saturating_add(1);
    }
    Ok(values)
}

/// Decode a msgpack integer (any width) that fits in i64.
pub fn read_int(value: &[u8]) -> Option<i64> {
    let marker = *value.first()?;
    let tail = |n: usize| -> Option<&[u8]> { value.get(1..1 + n) };
    Some(match marker {
        0x00..=0x7f => marker as i64,
        0xe0..=0xff => (marker as i8) as i64,
        0xcc => tail(1)?[0] as i64,
        0xcd => u16::from_be_bytes(tail(2)?.try_into().ok()?) as i64,
        0xce => u32::from_be_bytes(tail(4)?.try_into().ok()?) as i64,
        0xcf => i64::try_from(u64::from_be_bytes(tail(8)?.try_into().ok()?)).ok()?,
        0xd0 => (tail(1)?[0] as i8) as i64,
        0xd1 => i16::from_be_bytes(tail(2)?.try_into().ok()?) as i64,
        0xd2 => i32::from_be_bytes(tail(4)?.try_into().ok()?) as i64,
        0xd3 => i64::from_be_bytes(tail(8)?.try_into().ok()?),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The real captures (`$ACKGATE_CAPTURES`, else `../shared/captures` beside the crate).
    fn captures_dir() -> std::path::PathBuf {
        std::env::var_os("ACKGATE_CAPTURES")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/captures")
            })
    }

    /// Every request a real sender wrote on a plain connection (the secured ones start with
    /// the handshake, the JSON one is another decoder's).
    fn plain_request_captures() -> Vec<(String, Vec<u8>)> {
        let dir = captures_dir();
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let request = name.ends_with(".sender.bin") || name.ends_with(".request.bin");
            if request && !name.contains("secure") && !name.contains("json") {
                found.push((name, std::fs::read(&path).unwrap()));
            }
        }
        assert!(found.len() >= 10, "captures missing in {}", dir.display());
        found
    }

    /// Decode `first`, then `first` + `second`, taking every complete request each time.
    fn decode_in_two(first: &[u8], second: &[u8]) -> Vec<Decoded> {
        let mut decoder = FrameDecoder::new(Limits::default());
        let mut buf = BytesMut::from(first);
        let mut out = Vec::new();
        for more in [&[][..], second] {
            buf.extend_from_slice(more);
            while let Some(decoded) = decoder.decode(&mut buf).unwrap() {
                out.push(decoded);
            }
        }
        assert!(buf.is_empty(), "trailing bytes: {buf:02x?}");
        out
    }

    #[test]
    fn every_split_point_of_every_real_capture_decodes_to_the_same_requests() {
        for (name, bytes) in plain_request_captures() {
            let whole = decode_all(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(!whole.is_empty(), "{name}: no request");
            for split in 0..=bytes.len() {
                let (first, second) = bytes.split_at(split);
                assert_eq!(
                    decode_in_two(first, second),
                    whole,
                    "{name} split after byte {split}"
                );
            }
        }
    }

    fn decode_all(bytes: &[u8]) -> Result<Vec<Decoded>, FrameError> {
        let mut decoder = FrameDecoder::new(Limits::default());
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(decoded) = decoder.decode(&mut buf)? {
            out.push(decoded);
        }
        assert!(buf.is_empty(), "trailing bytes: {buf:02x?}");
        Ok(out)
    }

    fn frame(decoded: &Decoded) -> &Frame {
        match decoded {
            Decoded::Frame(f) => f,
            Decoded::Nil => panic!("nil"),
        }
    }

    /// v0.10 layout (PROTOCOL.md §3.2): 0x92, tag, str32 entries, no option.
    #[test]
    fn legacy_packed_forward_str32() {
        let entry = [
            0x92, 0xce, 0x55, 0xec, 0xe6, 0xf8, 0x81, 0xa3, b'm', b's', b'g', 0xa2, b'h', b'i',
        ];
        let mut req = vec![0x92, 0xa7];
        req.extend_from_slice(b"app.log");
        req.extend_from_slice(&[0xdb, 0, 0, 0, entry.len() as u8]);
        req.extend_from_slice(&entry);
        let out = decode_all(&req).unwrap();
        let f = frame(&out[0]);
        assert_eq!(f.mode, Mode::PackedForward);
        assert_eq!(&f.tag[..], b"app.log");
        assert_eq!(&f.entries[..], &entry[..]);
        assert_eq!(f.events, 1);
        assert_eq!(f.chunk, None);
    }

    #[test]
    fn message_mode_keeps_sender_bytes_and_chunk() {
        // ["t", 1, {"a": 1}, {"chunk": "ab"}]
        let req = [
            0x94, 0xa1, b't', 0x01, 0x81, 0xa1, b'a', 0x01, 0x81, 0xa5, b'c', b'h', b'u', b'n',
            b'k', 0xa2, b'a', b'b',
        ];
        let out = decode_all(&req).unwrap();
        let f = frame(&out[0]);
        assert_eq!(f.mode, Mode::Message);
        assert_eq!(&f.entries[..], &[0x92, 0x01, 0x81, 0xa1, b'a', 0x01]);
        assert_eq!(f.chunk.as_deref(), Some(&[0xa2, b'a', b'b'][..]));
    }

    #[test]
    fn nil_is_a_noop_between_frames() {
        let req = [0xc0, 0x93, 0xa1, b't', 0x91, 0x92, 0x01, 0x80, 0xc0, 0xc0];
        let out = decode_all(&req).unwrap();
        assert_eq!(out.len(), 3, "the nil after the entries is the option");
        assert_eq!(out[0], Decoded::Nil);
        assert_eq!(frame(&out[1]).mode, Mode::Forward);
        assert_eq!(&frame(&out[1]).entries[..], &[0x92, 0x01, 0x80]);
    }

    #[test]
    fn rejections_name_the_problem() {
        assert_eq!(
            decode_all(&[0x01]),
            Err(FrameError::NotArray { marker: 0x01 })
        );
        assert_eq!(decode_all(&[0x92, 0x01, 0x90]), Err(FrameError::BadTag));
        assert_eq!(
            decode_all(&[0x93, 0xa1, b't', 0x91, 0x92, 0x01, 0x80, 0x01]),
            Err(FrameError::BadOption)
        );
        assert_eq!(
            decode_all(&[0x92, 0xa1, b't', 0x91, 0x91, 0x01]),
            Err(FrameError::Entry(EntryError::NotPair { index: 0 }))
        );
        assert_eq!(
            decode_all(&[0x92, 0xa1, b't', 0xc4, 0x01, 0x05]),
            Err(FrameError::Entry(EntryError::NotPair { index: 0 }))
        );
    }

    #[test]
    fn oversized_declared_length_is_rejected_before_buffering() {
        let mut decoder = FrameDecoder::new(Limits {
            max_frame_bytes: 1024,
            ..Limits::default()
        });
        let mut buf = BytesMut::from(&[0x92, 0xa1, b't', 0xdb, 0x00, 0x10, 0x00, 0x00][..]);
        assert_eq!(
            decoder.decode(&mut buf),
            Err(FrameError::TooLarge { limit: 1024 })
        );
    }

    /// `[tag, payload, {"fluent_signal": signal}]` with the payload as bin8 or str8.
    fn signal_request(signal: u8, payload: &[u8], marker: u8, extra: &[u8]) -> Vec<u8> {
        let mut req = vec![0x93, 0xa1, b'm', marker, payload.len() as u8];
        req.extend_from_slice(payload);
        req.push(0x81 + u8::from(!extra.is_empty()));
        req.push(0xad);
        req.extend_from_slice(b"fluent_signal");
        req.push(signal);
        req.extend_from_slice(extra);
        req
    }

    /// Two cmetrics-like contexts: maps, not `[time, record]` pairs.
    const CONTEXTS: [u8; 11] = [
        0x81, 0xa4, b'm', b'e', b't', b'a', 0x80, 0x81, 0xa1, b'x', 0x01,
    ];

    #[test]
    fn metrics_and_traces_payloads_are_kept_opaque() {
        for (code, signal) in [(1, Signal::Metrics), (2, Signal::Traces)] {
            for marker in [0xc4, 0xd9] {
                let out = decode_all(&signal_request(code, &CONTEXTS, marker, &[])).unwrap();
                let f = frame(&out[0]);
                assert_eq!(f.signal, signal);
                assert_eq!(f.mode, Mode::PackedForward);
                assert_eq!(&f.entries[..], &CONTEXTS[..]);
                assert_eq!(f.events, 2, "contexts in the payload");
            }
        }
        // Explicit 0 is logs.
        let req = [
            0x93, 0xa1, b't', 0x91, 0x92, 0x01, 0x80, 0x81, 0xad, b'f', b'l', b'u', b'e', b'n',
            b't', b'_', b's', b'i', b'g', b'n', b'a', b'l', 0x00,
        ];
        assert_eq!(frame(&decode_all(&req).unwrap()[0]).signal, Signal::Logs);
    }

    #[test]
    fn compressed_metrics_are_inflated_like_logs() {
        let gz = crate::forward::entries::deflate_gzip(&CONTEXTS);
        let mut extra = vec![0xaa];
        extra.extend_from_slice(b"compressed");
        extra.extend_from_slice(&[0xa4, b'g', b'z', b'i', b'p']);
        let out = decode_all(&signal_request(1, &gz, 0xc4, &extra)).unwrap();
        let f = frame(&out[0]);
        assert_eq!(f.mode, Mode::CompressedPackedForward(Compression::Gzip));
        assert_eq!(f.signal, Signal::Metrics);
        assert_eq!(&f.entries[..], &CONTEXTS[..]);
    }

    #[test]
    fn bad_signals_name_the_problem() {
        assert_eq!(
            decode_all(&signal_request(5, &CONTEXTS, 0xc4, &[])),
            Err(FrameError::UnknownSignal(5))
        );
        let cut = &CONTEXTS[..9];
        let err = decode_all(&signal_request(1, cut, 0xc4, &[])).unwrap_err();
        assert!(
            matches!(&err, FrameError::SignalPayload { signal: Signal::Metrics, reason } if reason.contains("cut off")),
            "{err}"
        );
        assert_eq!(err.kind(), "bad_entry");
        // Metrics as a Forward-mode array: every receiver would read them as log events.
        let mut forward = vec![0x93, 0xa1, b'm', 0x91, 0x92, 0x01, 0x80, 0x81, 0xad];
        forward.extend_from_slice(b"fluent_signal");
        forward.push(0x02);
        let err = decode_all(&forward).unwrap_err();
        assert_eq!(
            err,
            FrameError::SignalMode {
                signal: Signal::Traces,
                mode: Mode::Forward
            }
        );
        assert_eq!(
            err.to_string(),
            "fluent_signal 2 (traces) needs a str/bin payload, not Forward mode"
        );
    }

    #[test]
    fn read_int_every_width() {
        assert_eq!(read_int(&[0x05]), Some(5));
        assert_eq!(read_int(&[0xff]), Some(-1));
        assert_eq!(read_int(&[0xcd, 1, 0]), Some(256));
        assert_eq!(read_int(&[0xd0, 0xfe]), Some(-2));
        assert_eq!(read_int(&[0xa1, b'x']), None);
        assert_eq!(read_int(&[0xce, 1]), None);
    }
}
