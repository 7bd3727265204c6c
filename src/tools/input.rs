//! `send`'s input: JSON lines or a stream of msgpack maps, read on a thread of its own and cut
//! into batches of `[time, record]` entries, each timed when it is read.
//!
//! A msgpack record is found with the streaming skipper ([`Skipper`], what
//! [`crate::forward::msgpack::value_len`] wraps, resumed across reads so a large record is not
//! re-walked from its first byte on every read) and copied into its entry byte for byte: the
//! bytes the user wrote are the bytes the receiver gets (the spirit of invariant 6). With
//! `--legacy` they are passed through too, so a user replaying v0.10 records keeps their markers.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tokio::sync::mpsc;

use super::send::TimeFormat;
use super::ToolError;
use crate::forward::msgpack::{read_header, Header, Progress, Skipper};
use crate::forward::value::{json_to_msgpack, MAX_DEPTH};

/// Read buffer of the input: whole records of a fast pipe are batched from it.
const INPUT_BUFFER: usize = 1 << 16;
/// A batch is cut once its entries reach this size, whatever `--batch` says: half of the
/// default `max_frame_bytes` of ackgate's ingress (16 MiB), leaving room for one more record.
pub(super) const MAX_BATCH_BYTES: usize = 8 << 20;
/// Largest record accepted from the input (msgpack, or JSON once encoded): ackgate's default
/// frame limit. With [`MAX_BATCH_BYTES`] it keeps a request's length well inside a u32.
pub(super) const MAX_RECORD_BYTES: usize = 16 << 20;

/// How `send`'s input is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InputFormat {
    /// One JSON object per line; blank lines are skipped.
    Json,
    /// Concatenated msgpack maps, one record each, sent byte for byte.
    Msgpack,
}

/// Events read from the input and encoded, ready to become one request.
#[derive(Debug, Default)]
pub(super) struct Batch {
    /// Concatenated `[time, record]` msgpack arrays.
    pub entries: Vec<u8>,
    /// Number of entries.
    pub events: u32,
}

impl Batch {
    /// Whether the batch must go now: `limit` events, or [`MAX_BATCH_BYTES`].
    fn full(&self, limit: u32) -> bool {
        self.events >= limit || self.entries.len() >= MAX_BATCH_BYTES
    }
}

/// How records and times are written.
#[derive(Debug, Clone, Copy)]
pub(super) struct Encoding {
    pub time_format: TimeFormat,
    /// JSON records use only pre-2013 msgpack markers (str16/str32 raw, no str8, no bin).
    pub legacy: bool,
}

/// What to read and how to cut it.
#[derive(Debug, Clone)]
pub(super) struct InputSpec {
    /// A file, or `-` for stdin.
    pub path: PathBuf,
    pub format: InputFormat,
    pub encoding: Encoding,
    /// Events per batch at most.
    pub batch: u32,
}

/// Batches as the input thread produces them; an error ends the stream.
pub(super) type Batches = mpsc::Receiver<Result<Batch, ToolError>>;

/// The running input: its batches, and whether it is large enough to deserve a progress line.
pub(super) struct Input {
    pub batches: Batches,
    /// stdin (size unknown), or a file larger than `large_file` bytes.
    pub large: bool,
}

/// Open the input and read it on its own thread: stdin cannot be read without blocking, and a
/// detached thread stuck on a terminal does not keep the process (or the runtime) alive.
pub(super) fn spawn_input(spec: InputSpec, large_file: u64) -> Result<Input, ToolError> {
    let input_error = |source| ToolError::Input {
        path: spec.path.clone(),
        error: source,
    };
    let (file, large) = if spec.path == Path::new("-") {
        (None, true)
    } else {
        let file = std::fs::File::open(&spec.path).map_err(input_error)?;
        let len = file.metadata().map_err(input_error)?.len();
        (Some(file), len > large_file)
    };
    let (tx, rx) = mpsc::channel(2);
    std::thread::Builder::new()
        .name("ackgate-send-input".into())
        .spawn(move || {
            // stdin may be a person typing or a slow pipe: send what has arrived rather than
            // hold it until `batch` events are there. A file is cut into exact batches.
            let (input, interactive): (Box<dyn Read>, bool) = match file {
                Some(file) => (Box::new(file), false),
                None => (Box::new(std::io::stdin()), true),
            };
            let emit = |b: Batch| tx.blocking_send(Ok(b)).is_ok();
            let read = match spec.format {
                InputFormat::Json => {
                    let input = BufReader::with_capacity(INPUT_BUFFER, input);
                    read_json(input, &spec, interactive, emit)
                }
                InputFormat::Msgpack => read_msgpack(input, &spec, interactive, emit),
            };
            if let Err(e) = read {
                let _ = tx.blocking_send(Err(e));
            }
        })
        .map_err(ToolError::InputThread)?;
    Ok(Input { batches: rx, large })
}

fn now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// Turn JSON lines into batches. Blank lines are skipped; `emit` returning false stops the
/// reading. With `flush_when_drained`, a batch also ends when every byte read so far is used,
/// so the next read could block.
pub(super) fn read_json<R: Read>(
    mut input: BufReader<R>,
    spec: &InputSpec,
    flush_when_drained: bool,
    mut emit: impl FnMut(Batch) -> bool,
) -> Result<(), ToolError> {
    let mut line = Vec::new();
    let mut number = 0u64;
    let mut current = Batch::default();
    loop {
        line.clear();
        let read = input
            .read_until(b'\n', &mut line)
            .map_err(|source| ToolError::Input {
                path: spec.path.clone(),
                error: source,
            })?;
        if read == 0 {
            break;
        }
        number += 1;
        let text = line.trim_ascii();
        if !text.is_empty() {
            let record = parse_record(text, number)?;
            let before = current.entries.len();
            put_time(now(), spec.encoding.time_format, &mut current.entries);
            json_to_msgpack(&record, spec.encoding.legacy, &mut current.entries);
            let size = current.entries.len() - before;
            if size > MAX_RECORD_BYTES {
                return Err(ToolError::BadLine {
                    line: number,
                    reason: format!(
                        "record of {size} bytes, over the {MAX_RECORD_BYTES}-byte limit"
                    ),
                });
            }
            current.events += 1;
        }
        let drained = flush_when_drained && current.events > 0 && input.buffer().is_empty();
        if (current.full(spec.batch) || drained) && !emit(std::mem::take(&mut current)) {
            return Ok(());
        }
    }
    if current.events > 0 {
        emit(current);
    }
    Ok(())
}

/// One input line as a record: a JSON object.
fn parse_record(text: &[u8], number: u64) -> Result<Value, ToolError> {
    let record: Value = serde_json::from_slice(text).map_err(|e| ToolError::BadLine {
        line: number,
        reason: e.to_string(),
    })?;
    if !record.is_object() {
        return Err(ToolError::BadLine {
            line: number,
            reason: "not a JSON object".into(),
        });
    }
    Ok(record)
}

/// Turn concatenated msgpack maps into batches, each record's bytes unchanged. A value that is
/// not a map, malformed msgpack, a record over [`MAX_RECORD_BYTES`] or an input ending inside a
/// record is an error naming the record's number and byte offset. `flush_when_drained` as in
/// [`read_json`]: a partial batch goes out before a read that could block.
pub(super) fn read_msgpack<R: Read>(
    mut input: R,
    spec: &InputSpec,
    flush_when_drained: bool,
    mut emit: impl FnMut(Batch) -> bool,
) -> Result<(), ToolError> {
    let mut buf: Vec<u8> = Vec::with_capacity(INPUT_BUFFER);
    // buf[start..] is not yet consumed; `offset` is its position in the input.
    let mut start = 0usize;
    let mut offset = 0u64;
    let mut number = 0u64;
    let mut skipper = Skipper::new(MAX_DEPTH, MAX_RECORD_BYTES);
    let mut current = Batch::default();
    let mut eof = false;
    loop {
        loop {
            let rest = &buf[start..];
            if rest.is_empty() {
                break;
            }
            let bad = |reason: String| ToolError::BadRecord {
                record: number + 1,
                offset,
                reason,
            };
            let len = match skipper.advance(rest) {
                Ok(Progress::Complete(len)) => len,
                Ok(Progress::Incomplete { .. }) => break,
                Err(e) => return Err(bad(e.to_string())),
            };
            skipper.reset();
            let record = &rest[..len];
            if !matches!(read_header(record), Some(Header::Map { .. })) {
                let marker = record.first().copied().unwrap_or_default();
                return Err(bad(format!(
                    "not a msgpack map (first byte 0x{marker:02x}); each record must be one map"
                )));
            }
            put_time(now(), spec.encoding.time_format, &mut current.entries);
            current.entries.extend_from_slice(record);
            current.events += 1;
            number += 1;
            start += len;
            offset += len as u64;
            if current.full(spec.batch) && !emit(std::mem::take(&mut current)) {
                return Ok(());
            }
        }
        if eof {
            if start < buf.len() {
                return Err(ToolError::BadRecord {
                    record: number + 1,
                    offset,
                    reason: format!("the input ends inside it ({} bytes)", buf.len() - start),
                });
            }
            break;
        }
        if flush_when_drained && current.events > 0 && !emit(std::mem::take(&mut current)) {
            return Ok(());
        }
        // Keep only the unfinished record; the skipper resumes on the same bytes.
        buf.drain(..start);
        start = 0;
        let used = buf.len();
        buf.resize(used + INPUT_BUFFER, 0);
        let n = loop {
            match input.read(&mut buf[used..]) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(ToolError::Input {
                        path: spec.path.clone(),
                        error: source,
                    })
                }
            }
        };
        buf.truncate(used + n);
        eof = n == 0;
    }
    if current.events > 0 {
        emit(current);
    }
    Ok(())
}

/// Append the `[time,` part of an entry: the array header and the time.
pub(super) fn put_time(since_epoch: Duration, format: TimeFormat, out: &mut Vec<u8>) {
    out.push(0x92);
    // u32 seconds on the wire either way (PROTOCOL.md §5.1); saturate past 2106.
    let sec = u32::try_from(since_epoch.as_secs()).unwrap_or(u32::MAX);
    match format {
        TimeFormat::Event => {
            out.extend_from_slice(&[0xd7, 0x00]);
            out.extend_from_slice(&sec.to_be_bytes());
            out.extend_from_slice(&since_epoch.subsec_nanos().to_be_bytes());
        }
        TimeFormat::Int => {
            out.push(0xce);
            out.extend_from_slice(&sec.to_be_bytes());
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::VecDeque;

    pub(in crate::tools) const INT: Encoding = Encoding {
        time_format: TimeFormat::Int,
        legacy: false,
    };

    /// Records as one batch, all at 1441588984 (the v0.10 capture's time).
    pub(in crate::tools) fn one_batch(records: &[Value], encoding: Encoding) -> Batch {
        let mut batch = Batch::default();
        for r in records {
            put_time(
                Duration::from_secs(1441588984),
                encoding.time_format,
                &mut batch.entries,
            );
            json_to_msgpack(r, encoding.legacy, &mut batch.entries);
            batch.events += 1;
        }
        batch
    }

    fn spec(format: InputFormat, batch: u32) -> InputSpec {
        InputSpec {
            path: PathBuf::from("-"),
            format,
            encoding: INT,
            batch,
        }
    }

    /// A reader returning the given pieces one per read, like a terminal or a slow pipe.
    struct Pieces(VecDeque<Vec<u8>>);

    impl Read for Pieces {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let Some(mut piece) = self.0.pop_front() else {
                return Ok(0);
            };
            let n = piece.len().min(buf.len());
            buf[..n].copy_from_slice(&piece[..n]);
            if n < piece.len() {
                self.0.push_front(piece.split_off(n));
            }
            Ok(n)
        }
    }

    fn pieces(parts: &[&[u8]]) -> Pieces {
        Pieces(parts.iter().map(|p| p.to_vec()).collect())
    }

    fn read_json_batches(input: &[u8], batch: u32, drained: bool) -> Result<Vec<u32>, ToolError> {
        let mut batches = Vec::new();
        let spec = spec(InputFormat::Json, batch);
        read_json(BufReader::new(input), &spec, drained, |b| {
            batches.push(b.events);
            true
        })
        .map(|()| batches)
    }

    fn read_msgpack_batches(
        input: impl Read,
        batch: u32,
        drained: bool,
    ) -> Result<Vec<Batch>, ToolError> {
        let mut batches = Vec::new();
        let spec = spec(InputFormat::Msgpack, batch);
        read_msgpack(input, &spec, drained, |b| {
            batches.push(b);
            true
        })
        .map(|()| batches)
    }

    #[test]
    fn input_lines_are_batched_and_errors_name_the_line() {
        let input = b"{\"a\":1}\n\n  {\"a\":2}\r\n{\"a\":3}\n{\"a\":4}";
        assert_eq!(read_json_batches(input, 3, false).unwrap(), [3, 1]);
        let err = read_json_batches(b"{}\n\n[1]\n", 3, false);
        assert!(
            matches!(err, Err(ToolError::BadLine { line: 3, .. })),
            "{err:?}"
        );
        let err = read_json_batches(b"{}\n{\"a\":\n", 3, false);
        assert!(
            matches!(err, Err(ToolError::BadLine { line: 2, .. })),
            "{err:?}"
        );
    }

    /// A terminal returns one line per read: each is sent at once, not held for a full batch.
    #[test]
    fn interactive_input_is_not_held_back() {
        let typing = pieces(&[b"{}\n", b"{}\n{}\n", b"\n", b"{}\n"]);
        let mut batches = Vec::new();
        let spec = spec(InputFormat::Json, 1000);
        read_json(BufReader::new(typing), &spec, true, |b| {
            batches.push(b.events);
            true
        })
        .unwrap();
        assert_eq!(batches, [1, 2, 1]);
    }

    #[test]
    fn big_records_cut_batches_by_bytes() {
        let record = json!({ "m": "x".repeat(MAX_BATCH_BYTES / 3) }).to_string();
        let input = format!("{record}\n").repeat(4);
        assert_eq!(
            read_json_batches(input.as_bytes(), 1000, false).unwrap(),
            [3, 1]
        );
    }

    /// Records pass byte for byte, whatever their markers: str8, bin, a v0.10 str32 raw.
    #[test]
    fn msgpack_records_pass_unchanged() {
        let records: [&[u8]; 4] = [
            &[0x81, 0xa1, b'a', 0x01],
            &[0x81, 0xa1, b'b', 0xd9, 0x02, b'h', b'i'],
            &[0x81, 0xa1, b'c', 0xc4, 0x02, 0xff, 0x00],
            &[0x80],
        ];
        let mut legacy = vec![0x81, 0xa1, b'd', 0xdb, 0, 0, 0, 3];
        legacy.extend_from_slice(b"raw");
        let input: Vec<u8> = records
            .iter()
            .copied()
            .chain([&legacy[..]])
            .flatten()
            .copied()
            .collect();
        let batches = read_msgpack_batches(&input[..], 2, false).unwrap();
        assert_eq!(
            batches.iter().map(|b| b.events).collect::<Vec<_>>(),
            [2, 2, 1]
        );
        let entries: Vec<u8> = batches.iter().flat_map(|b| b.entries.clone()).collect();
        let mut expected = Vec::new();
        for record in records.iter().copied().chain([&legacy[..]]) {
            expected.push(0x92);
            expected.push(0xce);
            expected.extend_from_slice(&entries[expected.len()..expected.len() + 4]);
            expected.extend_from_slice(record);
        }
        assert_eq!(entries, expected);
    }

    /// A record split across reads (one byte at a time) is found whole; on a pipe every record
    /// that is complete goes out before the next read.
    #[test]
    fn msgpack_records_split_across_reads() {
        let record = [
            0x82, 0xa1, b'a', 0xcd, 0x01, 0x00, 0xa1, b'b', 0xa2, b'h', b'i',
        ];
        let bytes: Vec<&[u8]> = record
            .iter()
            .chain(&record)
            .map(std::slice::from_ref)
            .collect();
        let batches = read_msgpack_batches(pieces(&bytes), 10, false).unwrap();
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].events, 2);
        let typing = pieces(&[&record, &record[..3], &record[3..]]);
        let batches = read_msgpack_batches(typing, 10, true).unwrap();
        assert_eq!(batches.iter().map(|b| b.events).collect::<Vec<_>>(), [1, 1]);
    }

    #[test]
    fn msgpack_errors_name_the_record_and_offset() {
        let err = |input: &[u8]| read_msgpack_batches(input, 10, false).unwrap_err();
        let e = err(&[0x80, 0x81, 0xa1, b'a', 0x01, 0x92, 0x01, 0x02]);
        assert!(
            matches!(&e, ToolError::BadRecord { record: 3, offset: 5, reason } if reason.contains("not a msgpack map")),
            "{e}"
        );
        let e = err(&[0x80, 0x81, 0xa1]);
        assert!(
            matches!(&e, ToolError::BadRecord { record: 2, offset: 1, reason } if reason.contains("ends inside")),
            "{e}"
        );
        let e = err(&[0x81, 0xc1, 0x00]);
        assert!(
            matches!(
                &e,
                ToolError::BadRecord {
                    record: 1,
                    offset: 0,
                    ..
                }
            ),
            "{e}"
        );
        // A declared length past the record limit fails at once, not after reading 4 GiB.
        let e = err(&[0x81, 0xa1, b'a', 0xdb, 0xff, 0xff, 0xff, 0xff]);
        assert!(
            matches!(&e, ToolError::BadRecord { record: 1, reason, .. } if reason.contains("longer than")),
            "{e}"
        );
        assert_eq!(read_msgpack_batches(&[][..], 10, false).unwrap().len(), 0);
    }

    #[test]
    fn event_time_is_fixext8() {
        let mut out = Vec::new();
        put_time(
            Duration::new(0x55ece6f8, 500_000_000),
            TimeFormat::Event,
            &mut out,
        );
        assert_eq!(
            out,
            [0x92, 0xd7, 0x00, 0x55, 0xec, 0xe6, 0xf8, 0x1d, 0xcd, 0x65, 0x00]
        );
    }

    #[test]
    fn legacy_records_use_raw_strings() {
        let legacy = Encoding {
            time_format: TimeFormat::Int,
            legacy: true,
        };
        let batch = one_batch(&[json!({"m": "x".repeat(40)})], legacy);
        // 92 ce <u32> 81 a1 'm' da 00 28 ...: str16 where msgpack ≥0.6 would write str8.
        assert_eq!(&batch.entries[6..12], &[0x81, 0xa1, b'm', 0xda, 0x00, 0x28]);
    }
}
