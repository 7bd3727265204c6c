//! The on-disk layout of a spooled record and of its retry state. Pure: bytes in, bytes out.
//!
//! A version byte first, then fixed-width little-endian integers (never `usize`), so a spool
//! written by one build opens in the next. The chunk id is part of the record and written once
//! (invariant 3); attempts and the last error live in a separate small value so that counting
//! a retry never rewrites a multi-MiB record.

use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;

use crate::forward::frame::Signal;

/// Layout version of log records.
pub const RECORD_VERSION: u8 = 1;
/// Layout version of metrics and traces records: version 1 with a signal byte after the
/// version. Logs are still written as version 1, so a spool holding only logs stays readable
/// by builds that predate signals.
pub const SIGNAL_RECORD_VERSION: u8 = 2;
/// Layout version of records that carry the original destination of their sender's
/// connection (transparent mode): version 2's signal byte, then the destination (family byte 4
/// or 6, the address, the port little-endian), then version 1's fields. Records without one
/// are still written as version 1 or 2.
pub const DESTINATION_RECORD_VERSION: u8 = 3;
/// Layout version of retry-state values.
pub const RETRY_VERSION: u8 = 1;
/// version + chunk id + received_ms + events + tag length (version 1; version 2 adds a byte).
pub const HEADER_LEN: usize = 1 + 16 + 8 + 4 + 4;

/// Header bytes of a record of this signal and destination.
pub fn header_len(signal: Signal, destination: Option<SocketAddr>) -> usize {
    match (signal, destination) {
        (Signal::Logs, None) => HEADER_LEN,
        (_, None) => HEADER_LEN + 1,
        (_, Some(destination)) => HEADER_LEN + 1 + destination_len(destination),
    }
}

/// Bytes of an encoded destination: family, address, port.
fn destination_len(destination: SocketAddr) -> usize {
    match destination {
        SocketAddr::V4(_) => 1 + 4 + 2,
        SocketAddr::V6(_) => 1 + 16 + 2,
    }
}

/// The destination at the start of `bytes`, and its length.
fn decode_destination(bytes: &[u8]) -> Option<(SocketAddr, usize)> {
    let (ip, at): (IpAddr, usize) = match bytes.first()? {
        4 => (<[u8; 4]>::try_from(bytes.get(1..5)?).ok()?.into(), 5),
        6 => (<[u8; 16]>::try_from(bytes.get(1..17)?).ok()?.into(), 17),
        _ => return None,
    };
    let port = u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?);
    Some((SocketAddr::new(ip, port), at + 2))
}

/// Why stored bytes could not be read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record value is {0} bytes, shorter than its header")]
    Short(usize),
    #[error("record layout version {0} is not known to this build")]
    Version(u8),
    #[error("record tag length {tag_len} exceeds the value ({len} bytes)")]
    TagLength { tag_len: u32, len: usize },
    #[error("record signal {0} is not known to this build")]
    Signal(u8),
    #[error("record destination is damaged")]
    Destination,
}

/// One spooled batch, as read back from disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    /// Sequence key in the records table.
    pub key: u64,
    /// ackgate's chunk id for this record, fixed at write time (invariant 3).
    pub chunk_id: [u8; 16],
    /// When the first request of this record was received, ms since the Unix epoch.
    pub received_ms: u64,
    /// Number of `[time, record]` entries (metrics/traces: contexts in the payload).
    pub events: u32,
    /// Logs, or a metrics/traces payload relayed as it came.
    pub signal: Signal,
    /// Transparent mode: where the sender's connection was going (`SO_ORIGINAL_DST`).
    pub destination: Option<SocketAddr>,
    pub tag: Bytes,
    /// Concatenated raw entries (or the metrics/traces payload), exactly as senders wrote them
    /// (invariant 6).
    pub entries: Entries,
    /// Upstream attempts that failed so far.
    pub attempts: u32,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
}

impl StoredRecord {
    /// Bytes this record takes in the spool budget.
    pub fn stored_len(&self) -> u64 {
        record_len(self.signal, self.destination, &self.tag, self.entries.len()) as u64
    }
}

/// A record's entries: one run of bytes (read back from the file), or, for a record just
/// committed and sent from memory, the runs of the requests it merged, in order. Either way
/// the bytes exactly as the senders wrote them (invariant 6).
#[derive(Debug, Clone)]
pub struct Entries {
    parts: Vec<Bytes>,
    len: usize,
}

impl Entries {
    pub fn new(parts: Vec<Bytes>) -> Entries {
        let len = parts.iter().map(Bytes::len).sum();
        Entries { parts, len }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The runs, in order (write them as they are, vectored).
    pub fn parts(&self) -> &[Bytes] {
        &self.parts
    }

    /// All of it in one run: free for a record read from the file, a copy for a merged one.
    pub fn to_bytes(&self) -> Bytes {
        match self.parts.as_slice() {
            [] => Bytes::new(),
            [one] => one.clone(),
            several => Bytes::from(several.concat()),
        }
    }
}

impl From<Bytes> for Entries {
    fn from(bytes: Bytes) -> Entries {
        Entries::new(vec![bytes])
    }
}

impl PartialEq for Entries {
    fn eq(&self, other: &Entries) -> bool {
        self.len == other.len && self.to_bytes() == other.to_bytes()
    }
}

impl Eq for Entries {}

/// Bytes of a record value.
pub fn record_len(
    signal: Signal,
    destination: Option<SocketAddr>,
    tag: &[u8],
    entries_len: usize,
) -> usize {
    header_len(signal, destination) + tag.len() + entries_len
}

/// What a record value holds besides its entries.
#[derive(Debug, Clone, Copy)]
pub struct RecordHead<'a> {
    pub chunk_id: &'a [u8; 16],
    pub received_ms: u64,
    pub events: u32,
    pub signal: Signal,
    pub destination: Option<SocketAddr>,
    pub tag: &'a [u8],
}

impl RecordHead<'_> {
    /// Bytes of the value with `entries_len` bytes of entries.
    pub fn value_len(&self, entries_len: usize) -> usize {
        record_len(self.signal, self.destination, self.tag, entries_len)
    }
}

impl StoredRecord {
    /// The head this record is stored with.
    pub fn head(&self) -> RecordHead<'_> {
        RecordHead {
            chunk_id: &self.chunk_id,
            received_ms: self.received_ms,
            events: self.events,
            signal: self.signal,
            destination: self.destination,
            tag: &self.tag,
        }
    }
}

/// Encode a record value.
pub fn encode_record(head: &RecordHead, entries: &[&[u8]]) -> Vec<u8> {
    let entries_len: usize = entries.iter().map(|e| e.len()).sum();
    let mut out = vec![0; head.value_len(entries_len)];
    write_record(&mut out, head, entries);
    out
}

/// Write a record value into `out`, which must be exactly [`RecordHead::value_len`] bytes: the
/// spool writes records straight into redb's page this way, without building them first.
pub fn write_record(out: &mut [u8], head: &RecordHead, entries: &[&[u8]]) {
    let mut at = 0;
    let mut put = |bytes: &[u8]| {
        if let Some(dest) = out.get_mut(at..at + bytes.len()) {
            dest.copy_from_slice(bytes);
        }
        at += bytes.len();
    };
    match (head.signal, head.destination) {
        (Signal::Logs, None) => put(&[RECORD_VERSION]),
        (signal, None) => put(&[SIGNAL_RECORD_VERSION, signal.code()]),
        (signal, Some(destination)) => {
            put(&[DESTINATION_RECORD_VERSION, signal.code()]);
            match destination.ip() {
                IpAddr::V4(ip) => {
                    put(&[4]);
                    put(&ip.octets());
                }
                IpAddr::V6(ip) => {
                    put(&[6]);
                    put(&ip.octets());
                }
            }
            put(&destination.port().to_le_bytes());
        }
    }
    put(head.chunk_id);
    put(&head.received_ms.to_le_bytes());
    put(&head.events.to_le_bytes());
    put(&(head.tag.len() as u32).to_le_bytes());
    put(head.tag);
    for part in entries {
        put(part);
    }
}

/// Decode a record value (attempts and last error are filled in from the retry state).
pub fn decode_record(key: u64, whole: &[u8]) -> Result<StoredRecord, RecordError> {
    decode_shared(key, Bytes::copy_from_slice(whole))
}

/// [`decode_record`] of a value already in memory: tag and entries are slices of it, no copy.
pub fn decode_shared(key: u64, whole: Bytes) -> Result<StoredRecord, RecordError> {
    let (signal, destination, skip) = match whole.first() {
        None => return Err(RecordError::Short(0)),
        Some(&RECORD_VERSION) => (Signal::Logs, None, 0),
        Some(&SIGNAL_RECORD_VERSION) => {
            let signal = signal_at(&whole)?;
            if signal == Signal::Logs {
                return Err(RecordError::Signal(0));
            }
            // From here on the layout is version 1's, one byte further on.
            (signal, None, 1)
        }
        Some(&DESTINATION_RECORD_VERSION) => {
            let signal = signal_at(&whole)?;
            let (destination, len) = whole
                .get(2..)
                .and_then(decode_destination)
                .ok_or(RecordError::Destination)?;
            (signal, Some(destination), 1 + len)
        }
        Some(&other) => return Err(RecordError::Version(other)),
    };
    let value = whole.slice(skip..);
    if value.len() < HEADER_LEN {
        return Err(RecordError::Short(whole.len()));
    }
    let mut chunk_id = [0u8; 16];
    chunk_id.copy_from_slice(&value[1..17]);
    let u64_at = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&value[at..at + 8]);
        u64::from_le_bytes(b)
    };
    let u32_at = |at: usize| {
        let mut b = [0u8; 4];
        b.copy_from_slice(&value[at..at + 4]);
        u32::from_le_bytes(b)
    };
    let received_ms = u64_at(17);
    let events = u32_at(25);
    let tag_len = u32_at(29);
    let tag_end = HEADER_LEN
        .checked_add(tag_len as usize)
        .filter(|end| *end <= value.len())
        .ok_or(RecordError::TagLength {
            tag_len,
            len: value.len(),
        })?;
    Ok(StoredRecord {
        key,
        chunk_id,
        received_ms,
        events,
        signal,
        destination,
        tag: value.slice(HEADER_LEN..tag_end),
        entries: Entries::from(value.slice(tag_end..)),
        attempts: 0,
        last_error: None,
    })
}

/// The original destination of a stored value, read from its header alone; `None` for
/// versions 1 and 2 and for damaged values.
pub fn destination_of(whole: &[u8]) -> Option<SocketAddr> {
    if whole.first() != Some(&DESTINATION_RECORD_VERSION) {
        return None;
    }
    decode_destination(whole.get(2..)?).map(|(destination, _)| destination)
}

/// The signal byte of a version 2 or 3 value.
fn signal_at(whole: &[u8]) -> Result<Signal, RecordError> {
    let code = *whole.get(1).ok_or(RecordError::Short(whole.len()))?;
    Signal::from_code(code as i64).ok_or(RecordError::Signal(code))
}

/// Retry state: attempts, time of the last attempt, last error text (truncated to 1 KiB).
pub fn encode_retry(attempts: u32, last_attempt_ms: u64, error: &str) -> Vec<u8> {
    let error = truncate_utf8(error, 1024);
    let mut out = Vec::with_capacity(15 + error.len());
    out.push(RETRY_VERSION);
    out.extend_from_slice(&attempts.to_le_bytes());
    out.extend_from_slice(&last_attempt_ms.to_le_bytes());
    out.extend_from_slice(&(error.len() as u16).to_le_bytes());
    out.extend_from_slice(error.as_bytes());
    out
}

/// Decode retry state into (attempts, last_attempt_ms, error); `None` if unreadable.
pub fn decode_retry(value: &[u8]) -> Option<(u32, u64, String)> {
    if value.len() < 15 || value[0] != RETRY_VERSION {
        return None;
    }
    let attempts = u32::from_le_bytes(value[1..5].try_into().ok()?);
    let at = u64::from_le_bytes(value[5..13].try_into().ok()?);
    let len = u16::from_le_bytes(value[13..15].try_into().ok()?) as usize;
    let text = value.get(15..15 + len)?;
    Some((attempts, at, String::from_utf8_lossy(text).into_owned()))
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `encode_record` of the fields in the order the old signature took them.
    fn encode(
        chunk_id: &[u8; 16],
        received_ms: u64,
        events: u32,
        signal: Signal,
        tag: &[u8],
        entries: &[&[u8]],
    ) -> Vec<u8> {
        let head = RecordHead {
            chunk_id,
            received_ms,
            events,
            signal,
            destination: None,
            tag,
        };
        encode_record(&head, entries)
    }

    #[test]
    fn record_round_trips_byte_exact() {
        let id = [7u8; 16];
        let value = encode(
            &id,
            1_700_000_000_123,
            3,
            Signal::Logs,
            b"app.log",
            &[&b"\x92\x01\x80"[..], &b"\xff"[..]],
        );
        assert_eq!(value.len(), HEADER_LEN + 7 + 4);
        let record = decode_record(42, &value).unwrap();
        assert_eq!(record.key, 42);
        assert_eq!(record.chunk_id, id);
        assert_eq!(record.received_ms, 1_700_000_000_123);
        assert_eq!(record.events, 3);
        assert_eq!(&record.tag[..], b"app.log");
        assert_eq!(&record.entries.to_bytes()[..], b"\x92\x01\x80\xff");
        assert_eq!(record.stored_len(), value.len() as u64);
        // Pinned layout: version, id, LE integers.
        assert_eq!(value[0], 1);
        assert_eq!(&value[25..29], &3u32.to_le_bytes());
    }

    #[test]
    fn damaged_values_are_errors() {
        assert_eq!(decode_record(1, &[1, 2, 3]), Err(RecordError::Short(3)));
        let mut value = encode(&[0; 16], 0, 1, Signal::Logs, b"t", &[&b"x"[..]]);
        value[0] = 9;
        assert_eq!(decode_record(1, &value), Err(RecordError::Version(9)));
        let mut value = encode(&[0; 16], 0, 1, Signal::Logs, b"t", &[&b"x"[..]]);
        value[29] = 200;
        assert!(matches!(
            decode_record(1, &value),
            Err(RecordError::TagLength { .. })
        ));
    }

    #[test]
    fn signal_records_carry_their_signal_and_logs_keep_version_1() {
        let payload: &[u8] = b"\x81\xa4meta\xc0";
        let value = encode(&[3; 16], 9, 1, Signal::Metrics, b"m", &[payload]);
        // Pinned layout: version 2, the signal code, then version 1's fields.
        assert_eq!(&value[..2], &[2, 1]);
        assert_eq!(
            value.len(),
            header_len(Signal::Metrics, None) + 1 + payload.len()
        );
        let record = decode_record(5, &value).unwrap();
        assert_eq!(record.signal, Signal::Metrics);
        assert_eq!(record.chunk_id, [3; 16]);
        assert_eq!(record.received_ms, 9);
        assert_eq!(&record.tag[..], b"m");
        assert_eq!(&record.entries.to_bytes()[..], payload);
        assert_eq!(record.stored_len(), value.len() as u64);

        let traces = encode(&[0; 16], 0, 1, Signal::Traces, b"t", &[payload]);
        assert_eq!(decode_record(1, &traces).unwrap().signal, Signal::Traces);
        let logs = encode(&[0; 16], 0, 1, Signal::Logs, b"t", &[&b"x"[..]]);
        assert_eq!(logs[0], RECORD_VERSION);
        assert_eq!(decode_record(1, &logs).unwrap().signal, Signal::Logs);

        let mut bad = value.clone();
        bad[1] = 0; // logs never use version 2
        assert_eq!(decode_record(1, &bad), Err(RecordError::Signal(0)));
        bad[1] = 7;
        assert_eq!(decode_record(1, &bad), Err(RecordError::Signal(7)));
        assert!(matches!(
            decode_record(1, &value[..20]),
            Err(RecordError::Short(20))
        ));
        assert_eq!(decode_record(1, &[2]), Err(RecordError::Short(1)));
    }

    #[test]
    fn destination_records_carry_it_and_the_rest_of_the_layout_is_unchanged() {
        for destination in ["10.0.0.5:24224", "[2001:db8::7]:24225"] {
            let destination: SocketAddr = destination.parse().unwrap();
            for signal in [Signal::Logs, Signal::Metrics] {
                let head = RecordHead {
                    chunk_id: &[4; 16],
                    received_ms: 77,
                    events: 2,
                    signal,
                    destination: Some(destination),
                    tag: b"app",
                };
                let value = encode_record(&head, &[b"\x92\x01\x80", b"\x92\x02\x80"]);
                assert_eq!(value[0], DESTINATION_RECORD_VERSION);
                assert_eq!(value.len(), head.value_len(6));
                let record = decode_record(9, &value).unwrap();
                assert_eq!(record.destination, Some(destination));
                assert_eq!(record.signal, signal);
                assert_eq!((record.received_ms, record.events), (77, 2));
                assert_eq!(&record.tag[..], b"app");
                assert_eq!(&record.entries.to_bytes()[..], b"\x92\x01\x80\x92\x02\x80");
                assert_eq!(record.stored_len(), value.len() as u64);
                // Every byte cut off the destination is an error, never a panic.
                for cut in 2..(2 + destination_len(destination)) {
                    assert!(decode_record(1, &value[..cut]).is_err());
                }
            }
        }
        // A damaged family byte.
        let head = RecordHead {
            chunk_id: &[0; 16],
            received_ms: 0,
            events: 1,
            signal: Signal::Logs,
            destination: Some("10.0.0.5:24224".parse().unwrap()),
            tag: b"t",
        };
        let mut value = encode_record(&head, &[b"x"]);
        value[2] = 5;
        assert_eq!(decode_record(1, &value), Err(RecordError::Destination));
    }

    #[test]
    fn retry_state_round_trips_and_truncates() {
        let v = encode_retry(3, 99, "ack timeout");
        assert_eq!(decode_retry(&v), Some((3, 99, "ack timeout".to_string())));
        let long = "é".repeat(2000);
        let v = encode_retry(1, 0, &long);
        let (_, _, text) = decode_retry(&v).unwrap();
        assert!(text.len() <= 1024 && text.chars().all(|c| c == 'é'));
        assert_eq!(decode_retry(&[1, 2]), None);
    }
}

/// Layout version of dead-letter values.
pub const DEAD_VERSION: u8 = 1;

/// What a dead letter holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadKind {
    /// A spooled record taken out of the queue (its full record value is kept).
    Record = 1,
    /// Bytes of an invalid request, kept for inspection (invariant 4); never sent anywhere.
    Rejected = 2,
}

/// A dead letter as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub id: u64,
    pub kind: DeadKind,
    pub dead_at_ms: u64,
    pub reason: String,
    /// The node (records) or the peer address (rejected input).
    pub origin: String,
    /// Record value ([`encode_record`]) or the rejected bytes.
    pub payload: Bytes,
}

/// Encode a dead letter.
pub fn encode_dead(
    kind: DeadKind,
    dead_at_ms: u64,
    reason: &str,
    origin: &str,
    payload: &[u8],
) -> Vec<u8> {
    let reason = truncate_utf8(reason, 4096);
    let origin = truncate_utf8(origin, 1024);
    let mut out = Vec::with_capacity(16 + reason.len() + origin.len() + payload.len());
    out.push(DEAD_VERSION);
    out.push(kind as u8);
    out.extend_from_slice(&dead_at_ms.to_le_bytes());
    out.extend_from_slice(&(reason.len() as u16).to_le_bytes());
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(&(origin.len() as u16).to_le_bytes());
    out.extend_from_slice(origin.as_bytes());
    out.extend_from_slice(payload);
    out
}

/// Decode a dead letter; `None` if the value is damaged.
pub fn decode_dead(id: u64, value: &[u8]) -> Option<DeadLetter> {
    if value.len() < 12 || value[0] != DEAD_VERSION {
        return None;
    }
    let kind = match value[1] {
        1 => DeadKind::Record,
        2 => DeadKind::Rejected,
        _ => return None,
    };
    let dead_at_ms = u64::from_le_bytes(value[2..10].try_into().ok()?);
    let reason_len = u16::from_le_bytes(value[10..12].try_into().ok()?) as usize;
    let reason_end = 12 + reason_len;
    let reason = String::from_utf8_lossy(value.get(12..reason_end)?).into_owned();
    let origin_len =
        u16::from_le_bytes(value.get(reason_end..reason_end + 2)?.try_into().ok()?) as usize;
    let origin_start = reason_end + 2;
    let origin =
        String::from_utf8_lossy(value.get(origin_start..origin_start + origin_len)?).into_owned();
    let payload = Bytes::copy_from_slice(value.get(origin_start + origin_len..)?);
    Some(DeadLetter {
        id,
        kind,
        dead_at_ms,
        reason,
        origin,
        payload,
    })
}

#[cfg(test)]
mod dead_tests {
    use super::*;

    #[test]
    fn dead_letter_round_trips() {
        let value = encode_dead(
            DeadKind::Rejected,
            5,
            "bad entry",
            "127.0.0.1:5000",
            b"\xc1\x00",
        );
        let dead = decode_dead(9, &value).unwrap();
        assert_eq!(dead.kind, DeadKind::Rejected);
        assert_eq!(dead.reason, "bad entry");
        assert_eq!(dead.origin, "127.0.0.1:5000");
        assert_eq!(&dead.payload[..], b"\xc1\x00");
        assert_eq!(decode_dead(9, &value[..11]), None);
    }
}
