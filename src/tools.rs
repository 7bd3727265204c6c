//! `ackgate send` and `ackgate receive`: the Forward client and the acking receiver people need
//! around a relay, built on [`crate::forward`] and nothing else of ackgate.
//!
//! - [`send`] replaces `fluent-cat`: JSON lines in, PackedForward / Forward / Message requests
//!   out, optionally with a `chunk` option whose acks are matched by id while up to `--window`
//!   requests are in flight on one connection (PROTOCOL.md §6.3, the Node logger's pipelining).
//!   `--legacy` writes the fluentd v0.10 bytes of PROTOCOL.md §3.2 / §9.1 instead: one TCP
//!   connection per request, `0x92`, raw-marker tag, `0xDB` str32 entries, integer times, no
//!   option, the four writes of `send_data`, then close without reading.
//! - [`receive`] is a real aggregator for tests and trials: every frame is written as JSON lines
//!   and flushed, and only then acked, in one write (PROTOCOL.md §13.1, §13.2); UDP heartbeats on
//!   the same IP:port get a `\0` back (§8.1); a bad frame closes its connection with a warning
//!   naming the peer and the reason, never a resynchronisation (invariant 4's rule for ingress).
//!
//! Every network wait has a deadline: connect, each write, each ack, the receiver's idle read.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BytesMut};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, Mutex, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::forward::ack::{decode_ack, encode_ack, AckError};
use crate::forward::entries::entry_len;
use crate::forward::packed::{chunk_id_base64, put_raw, put_uint};
use crate::forward::value::{bytes_to_json, entry_to_json, json_to_msgpack, ValueError};
use crate::forward::{Decoded, Frame, FrameDecoder, FrameError, Limits};

/// Largest ack response `send` buffers; a chunk id is 24–25 bytes, so this is generous.
const MAX_ACK_BYTES: usize = 4096;
/// Deadline for the receiver's ack writes and heartbeat replies.
const RECEIVE_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Read buffer of the input: whole lines of a fast pipe are batched from it.
const INPUT_BUFFER: usize = 1 << 16;
/// Heartbeat datagrams are one byte; fluentd reads at most 128 (PROTOCOL.md §8.1).
const HEARTBEAT_READ: usize = 128;

/// Why a tool stopped, or why `receive` closed one connection.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("cannot read {}: {source}", path.display())]
    Input {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("input line {line}: {reason}")]
    BadLine { line: u64, reason: String },
    #[error("cannot start the input reader: {0}")]
    InputThread(std::io::Error),
    #[error("cannot write the output: {0}")]
    Output(std::io::Error),
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("no connection to {addr} within {timeout:?}")]
    ConnectTimeout { addr: String, timeout: Duration },
    #[error("network I/O with {addr}: {source}")]
    Network {
        addr: String,
        source: std::io::Error,
    },
    #[error("write to {addr} not finished within {timeout:?}")]
    WriteTimeout { addr: String, timeout: Duration },
    #[error("no ack for chunk {chunk} within {timeout:?}")]
    AckTimeout { chunk: String, timeout: Duration },
    #[error("ack {got:?} matches no request in flight")]
    AckMismatch { got: String },
    #[error("bad response from {addr}: {source}")]
    BadAck { addr: String, source: AckError },
    #[error("{addr} closed the connection with {pending} request(s) unacked")]
    ConnectionClosed { addr: String, pending: usize },
    #[error("bad request: {0}")]
    BadFrame(#[from] FrameError),
    #[error("entry cannot be shown as JSON: {0}")]
    BadEntry(#[from] ValueError),
    #[error("no bytes for {timeout:?}")]
    Idle { timeout: Duration },
    #[error("connection closed inside a request ({buffered} bytes buffered)")]
    Truncated { buffered: usize },
}

/// Parse a duration written with its unit: `500ms`, `30s`, `2m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 500ms, 30s, 2m or 1h"))?;
    let secs = |mult: u64| {
        n.checked_mul(mult)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("{s:?} is too long"))
    };
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        "" => Err(format!("{s:?} needs a unit: ms, s, m or h")),
        _ => Err(format!(
            "{s:?} has an unknown unit {unit:?} (ms, s, m or h)"
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// send

/// How `send` carries events (PROTOCOL.md §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SendMode {
    /// `[tag, str32 entries, {size[, chunk]}]`, like fluentd's out_forward.
    Packed,
    /// `[tag, [[time, record], ...], {size[, chunk]}]`, like fluent-bit's out_forward.
    Forward,
    /// `[tag, time, record[, {chunk}]]`: one request per event, like the loggers.
    Message,
}

/// How event times are written (PROTOCOL.md §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TimeFormat {
    /// EventTime: fixext8 `d7 00`, u32 seconds, u32 nanoseconds.
    Event,
    /// Integer seconds as uint32 (`ce`), what v0.12 receivers need.
    Int,
}

/// Flags of `ackgate send`.
#[derive(Debug, Clone, clap::Args)]
pub struct SendArgs {
    /// JSON lines to send, one object (one record) per line; `-` reads stdin.
    #[arg(long, default_value = "-")]
    pub input: PathBuf,
    /// Host of the Forward receiver.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// TCP port of the Forward receiver.
    #[arg(long, default_value_t = 24224)]
    pub port: u16,
    /// Tag of every event.
    #[arg(long)]
    pub tag: String,
    /// Events per request (Message mode always sends one).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch: u32,
    /// Carrier mode.
    #[arg(long, value_enum, default_value_t = SendMode::Packed)]
    pub mode: SendMode,
    /// Event time encoding.
    #[arg(long, value_enum, default_value_t = TimeFormat::Event)]
    pub time_format: TimeFormat,
    /// Ask for an ack of every request (a random `chunk` id) and fail if one is missing.
    #[arg(long)]
    pub ack: bool,
    /// How long each request may wait for its ack.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub ack_timeout: Duration,
    /// Requests awaiting an ack at once on the connection (acks are matched by id).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub window: u32,
    /// Write exactly what fluentd v0.10 writes: a connection per request, no option, no ack.
    #[arg(long, conflicts_with_all = ["ack", "mode", "time_format", "window"])]
    pub legacy: bool,
    /// Deadline for each TCP connect.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Deadline for each request's write (a receiver applying backpressure stalls it).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub write_timeout: Duration,
}

/// What `send` did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SendReport {
    /// Events written.
    pub events: u64,
    /// Requests written.
    pub requests: u64,
    /// Requests acknowledged (equal to `requests` after a successful `--ack` run, else 0).
    pub acked: u64,
}

impl std::fmt::Display for SendReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sent {} event(s) in {} request(s), {} acked",
            self.events, self.requests, self.acked
        )
    }
}

/// Events read from the input and encoded, ready to become one request.
#[derive(Debug, Default)]
struct Batch {
    /// Concatenated `[time, record]` msgpack arrays.
    entries: Vec<u8>,
    /// Number of entries.
    events: u32,
}

/// How records and times are written.
#[derive(Debug, Clone, Copy)]
struct Encoding {
    time_format: TimeFormat,
    legacy: bool,
}

/// Send the input's records; see the module doc. Prints nothing: the caller may show the report.
pub async fn send(args: SendArgs) -> Result<SendReport, ToolError> {
    let (mode, encoding) = if args.legacy {
        let encoding = Encoding {
            time_format: TimeFormat::Int,
            legacy: true,
        };
        (SendMode::Packed, encoding)
    } else {
        let encoding = Encoding {
            time_format: args.time_format,
            legacy: false,
        };
        (args.mode, encoding)
    };
    let batch = if mode == SendMode::Message {
        1
    } else {
        args.batch
    };
    let mut batches = spawn_input(&args.input, encoding, batch)?;
    if args.legacy {
        send_legacy(&args, &mut batches).await
    } else if args.ack {
        send_acked(&args, mode, &mut batches).await
    } else {
        send_plain(&args, mode, &mut batches).await
    }
}

type Batches = mpsc::Receiver<Result<Batch, ToolError>>;

/// Read and encode the input on its own thread: stdin cannot be read without blocking, and a
/// detached thread stuck on a terminal does not keep the process (or the runtime) alive.
fn spawn_input(path: &Path, encoding: Encoding, batch: u32) -> Result<Batches, ToolError> {
    let file = if path == Path::new("-") {
        None
    } else {
        let file = std::fs::File::open(path).map_err(|source| ToolError::Input {
            path: path.to_owned(),
            source,
        })?;
        Some(file)
    };
    let (tx, rx) = mpsc::channel(2);
    let path = path.to_owned();
    std::thread::Builder::new()
        .name("ackgate-send-input".into())
        .spawn(move || {
            // stdin may be a person typing or a slow pipe: send what has arrived rather than
            // hold it until `batch` events are there. A file is cut into exact batches.
            let (input, interactive): (Box<dyn Read>, bool) = match file {
                Some(file) => (Box::new(file), false),
                None => (Box::new(std::io::stdin()), true),
            };
            let input = BufReader::with_capacity(INPUT_BUFFER, input);
            let emit = |b: Batch| tx.blocking_send(Ok(b)).is_ok();
            if let Err(e) = read_input(input, &path, encoding, batch, interactive, emit) {
                let _ = tx.blocking_send(Err(e));
            }
        })
        .map_err(ToolError::InputThread)?;
    Ok(rx)
}

/// Turn JSON lines into batches of `batch` entries, timed when read. Blank lines are skipped;
/// `emit` returning false stops the reading. With `flush_when_drained`, a batch also ends when
/// every byte read so far is used, so the next read could block.
fn read_input<R: Read>(
    mut input: BufReader<R>,
    path: &Path,
    encoding: Encoding,
    batch: u32,
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
                path: path.to_owned(),
                source,
            })?;
        if read == 0 {
            break;
        }
        number += 1;
        let text = line.trim_ascii();
        if !text.is_empty() {
            let record = parse_record(text, number)?;
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            put_entry(&record, now, encoding, &mut current.entries);
            current.events += 1;
        }
        let full = current.events >= batch;
        let drained = flush_when_drained && current.events > 0 && input.buffer().is_empty();
        if (full || drained) && !emit(std::mem::take(&mut current)) {
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

/// Append one `[time, record]` entry.
fn put_entry(record: &Value, since_epoch: Duration, encoding: Encoding, out: &mut Vec<u8>) {
    out.push(0x92);
    // u32 seconds on the wire either way (PROTOCOL.md §5.1); saturate past 2106.
    let sec = u32::try_from(since_epoch.as_secs()).unwrap_or(u32::MAX);
    match encoding.time_format {
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
    json_to_msgpack(record, encoding.legacy, out);
}

/// Encode one modern request. With `chunk`, the option carries it; Packed and Forward also
/// carry `size`, as fluentd v1 does (PROTOCOL.md §3.2, §4).
fn encode_request(
    mode: SendMode,
    tag: &str,
    batch: &Batch,
    chunk: Option<&str>,
    out: &mut Vec<u8>,
) {
    out.reserve(batch.entries.len() + tag.len() + 64);
    match mode {
        SendMode::Packed | SendMode::Forward => {
            out.push(0x93);
            put_raw(out, tag.as_bytes());
            if mode == SendMode::Packed {
                out.push(0xdb);
                out.extend_from_slice(&(batch.entries.len() as u32).to_be_bytes());
            } else {
                put_array_header(out, batch.events);
            }
            out.extend_from_slice(&batch.entries);
            out.push(if chunk.is_some() { 0x82 } else { 0x81 });
            if let Some(id) = chunk {
                put_raw(out, b"chunk");
                put_raw(out, id.as_bytes());
            }
            put_raw(out, b"size");
            put_uint(out, batch.events as u64);
        }
        SendMode::Message => {
            // The batch holds one entry: 0x92, time, record. Its array header is replaced.
            out.push(if chunk.is_some() { 0x94 } else { 0x93 });
            put_raw(out, tag.as_bytes());
            out.extend_from_slice(batch.entries.get(1..).unwrap_or_default());
            if let Some(id) = chunk {
                out.push(0x81);
                put_raw(out, b"chunk");
                put_raw(out, id.as_bytes());
            }
        }
    }
}

fn put_array_header(out: &mut Vec<u8>, count: u32) {
    if count < 16 {
        out.push(0x90 | count as u8);
    } else if count <= u16::MAX as u32 {
        out.push(0xdc);
        out.extend_from_slice(&(count as u16).to_be_bytes());
    } else {
        out.push(0xdd);
        out.extend_from_slice(&count.to_be_bytes());
    }
}

/// fluentd v0.10's `send_data` writes, in order: `0x92`, the tag (raw markers), `0xDB` with the
/// u32 length, the entries (PROTOCOL.md §3.2, §9.1). Returns the second and third.
fn legacy_parts(tag: &str, entries: &[u8]) -> (Vec<u8>, [u8; 5]) {
    let mut raw_tag = Vec::with_capacity(tag.len() + 5);
    put_raw(&mut raw_tag, tag.as_bytes());
    let len = (entries.len() as u32).to_be_bytes();
    (raw_tag, [0xdb, len[0], len[1], len[2], len[3]])
}

/// A fresh chunk id: Base64 of 16 random bytes (24 chars, like @fluent-org/logger's).
fn new_chunk_id() -> String {
    chunk_id_base64(uuid::Uuid::new_v4().as_bytes())
}

fn target(args: &SendArgs) -> String {
    format!("{}:{}", args.host, args.port)
}

async fn connect(args: &SendArgs) -> Result<TcpStream, ToolError> {
    let addr = target(args);
    let stream = match timeout(
        args.connect_timeout,
        TcpStream::connect((args.host.as_str(), args.port)),
    )
    .await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(source)) => return Err(ToolError::Connect { addr, source }),
        Err(_) => {
            return Err(ToolError::ConnectTimeout {
                addr,
                timeout: args.connect_timeout,
            })
        }
    };
    // Small requests and pipelined acks should not wait for Nagle.
    stream
        .set_nodelay(true)
        .map_err(|source| ToolError::Network { addr, source })?;
    Ok(stream)
}

async fn write_all_by<W: AsyncWrite + Unpin>(
    writer: &mut W,
    bytes: &[u8],
    limit: Duration,
    addr: &str,
) -> Result<(), ToolError> {
    match timeout(limit, writer.write_all(bytes)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(source)) => Err(ToolError::Network {
            addr: addr.to_owned(),
            source,
        }),
        Err(_) => Err(ToolError::WriteTimeout {
            addr: addr.to_owned(),
            timeout: limit,
        }),
    }
}

async fn shutdown_by<W: AsyncWrite + Unpin>(
    writer: &mut W,
    limit: Duration,
    addr: &str,
) -> Result<(), ToolError> {
    match timeout(limit, writer.shutdown()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(source)) => Err(ToolError::Network {
            addr: addr.to_owned(),
            source,
        }),
        Err(_) => Err(ToolError::WriteTimeout {
            addr: addr.to_owned(),
            timeout: limit,
        }),
    }
}

/// One connection per request, four writes, close; nothing is read (at-most-once, like v0.10).
async fn send_legacy(args: &SendArgs, batches: &mut Batches) -> Result<SendReport, ToolError> {
    let addr = target(args);
    let mut report = SendReport::default();
    while let Some(batch) = batches.recv().await {
        let batch = batch?;
        let mut stream = connect(args).await?;
        let (raw_tag, len) = legacy_parts(&args.tag, &batch.entries);
        for piece in [&[0x92][..], &raw_tag, &len, &batch.entries] {
            write_all_by(&mut stream, piece, args.write_timeout, &addr).await?;
        }
        shutdown_by(&mut stream, args.write_timeout, &addr).await?;
        report.requests += 1;
        report.events += batch.events as u64;
    }
    Ok(report)
}

/// All requests on one connection, no option but `size`, nothing read.
async fn send_plain(
    args: &SendArgs,
    mode: SendMode,
    batches: &mut Batches,
) -> Result<SendReport, ToolError> {
    let addr = target(args);
    let mut stream = connect(args).await?;
    let mut report = SendReport::default();
    let mut request = Vec::new();
    while let Some(batch) = batches.recv().await {
        let batch = batch?;
        request.clear();
        encode_request(mode, &args.tag, &batch, None, &mut request);
        write_all_by(&mut stream, &request, args.write_timeout, &addr).await?;
        report.requests += 1;
        report.events += batch.events as u64;
    }
    shutdown_by(&mut stream, args.write_timeout, &addr).await?;
    Ok(report)
}

/// What the ack reader saw.
enum AckEvent {
    /// An ack with this value content, read at this instant.
    Ack { id: Vec<u8>, at: Instant },
    /// Bytes that are not an ack.
    Bad(AckError),
    /// The read failed.
    Failed(std::io::Error),
}

/// Aborts the task when dropped, so an early return does not leave it reading.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Read acks as they come and stamp them, so a late ack is judged by when it arrived, not by
/// when the sending loop got round to it. The channel closes on EOF.
async fn read_acks(mut reader: OwnedReadHalf, tx: mpsc::Sender<AckEvent>) {
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        loop {
            match decode_ack(&buf, MAX_ACK_BYTES) {
                Ok(Some((id, used))) => {
                    let event = AckEvent::Ack {
                        id: id.to_vec(),
                        at: Instant::now(),
                    };
                    buf.advance(used);
                    if tx.send(event).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.send(AckEvent::Bad(e)).await;
                    return;
                }
            }
        }
        match reader.read_buf(&mut buf).await {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) => {
                let _ = tx.send(AckEvent::Failed(e)).await;
                return;
            }
        }
    }
}

/// Pipelined requests with a `chunk` each; acks are matched by id, in any order.
async fn send_acked(
    args: &SendArgs,
    mode: SendMode,
    batches: &mut Batches,
) -> Result<SendReport, ToolError> {
    let addr = target(args);
    let (reader, mut writer) = connect(args).await?.into_split();
    let window = args.window as usize;
    let (ack_tx, mut acks) = mpsc::channel(window + 1);
    let _reader = AbortOnDrop(tokio::spawn(read_acks(reader, ack_tx)));
    // Chunk id → when its request was written; `order` is oldest first (acked ids linger
    // until they reach the front).
    let mut in_flight: HashMap<Vec<u8>, Instant> = HashMap::new();
    let mut order: VecDeque<Vec<u8>> = VecDeque::new();
    let mut input_done = false;
    let mut report = SendReport::default();
    let mut request = Vec::new();
    let lossy = |id: &[u8]| String::from_utf8_lossy(id).into_owned();
    loop {
        while order.front().is_some_and(|id| !in_flight.contains_key(id)) {
            order.pop_front();
        }
        if input_done && in_flight.is_empty() {
            break;
        }
        let deadline = order
            .front()
            .and_then(|id| in_flight.get(id))
            .map(|sent| *sent + args.ack_timeout);
        let can_send = !input_done && in_flight.len() < window;
        tokio::select! {
            biased;
            event = acks.recv() => match event {
                Some(AckEvent::Ack { id, at }) => {
                    let Some(sent) = in_flight.remove(&id) else {
                        return Err(ToolError::AckMismatch { got: lossy(&id) });
                    };
                    if at.saturating_duration_since(sent) > args.ack_timeout {
                        return Err(ToolError::AckTimeout {
                            chunk: lossy(&id),
                            timeout: args.ack_timeout,
                        });
                    }
                    report.acked += 1;
                }
                Some(AckEvent::Bad(source)) => return Err(ToolError::BadAck { addr, source }),
                Some(AckEvent::Failed(source)) => return Err(ToolError::Network { addr, source }),
                None => {
                    return Err(ToolError::ConnectionClosed {
                        addr,
                        pending: in_flight.len(),
                    })
                }
            },
            () = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)),
                if deadline.is_some() =>
            {
                return Err(ToolError::AckTimeout {
                    chunk: order.front().map(|id| lossy(id)).unwrap_or_default(),
                    timeout: args.ack_timeout,
                });
            }
            next = batches.recv(), if can_send => match next {
                None => input_done = true,
                Some(batch) => {
                    let batch = batch?;
                    let id = new_chunk_id();
                    request.clear();
                    encode_request(mode, &args.tag, &batch, Some(&id), &mut request);
                    write_all_by(&mut writer, &request, args.write_timeout, &addr).await?;
                    in_flight.insert(id.clone().into_bytes(), Instant::now());
                    order.push_back(id.into_bytes());
                    report.requests += 1;
                    report.events += batch.events as u64;
                }
            },
        }
    }
    shutdown_by(&mut writer, args.write_timeout, &addr).await?;
    Ok(report)
}

// ---------------------------------------------------------------------------------------------
// receive

/// Flags of `ackgate receive`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReceiveArgs {
    /// TCP and UDP (heartbeat) address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:24224")]
    pub listen: SocketAddr,
    /// Where to write one JSON line per event; `-` is stdout.
    #[arg(long, default_value = "-")]
    pub output: PathBuf,
    /// Never ack (to watch a sender's ack timeout).
    #[arg(long)]
    pub no_ack: bool,
    /// Wait this long before each ack (to simulate a slow aggregator).
    #[arg(long, default_value = "0ms", value_parser = parse_duration)]
    pub ack_delay: Duration,
    /// Close a connection that sends nothing for this long.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// Connections served at once; more wait in the kernel's accept queue.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
}

/// Bind the TCP listener and the UDP heartbeat socket to the same IP:port. With port 0, the
/// UDP port the kernel gave TCP may be taken; then both are tried again.
pub async fn bind(addr: SocketAddr) -> Result<(TcpListener, UdpSocket), ToolError> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ToolError::Bind { addr, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| ToolError::Bind { addr, source })?;
        match UdpSocket::bind(local).await {
            Ok(udp) => return Ok((listener, udp)),
            Err(e)
                if addr.port() == 0
                    && attempts < 16
                    && e.kind() == std::io::ErrorKind::AddrInUse => {}
            Err(source) => {
                return Err(ToolError::Bind {
                    addr: local,
                    source,
                })
            }
        }
    }
}

/// Bind `args.listen`, announce it, and serve until `shutdown` fires.
pub async fn receive(args: ReceiveArgs, shutdown: CancellationToken) -> Result<(), ToolError> {
    let (listener, udp) = bind(args.listen).await?;
    let local = listener.local_addr().map_err(|source| ToolError::Bind {
        addr: args.listen,
        source,
    })?;
    tracing::info!(%local, "receive listening");
    eprintln!("ackgate receive listening on {local}");
    serve(listener, udp, args, shutdown).await
}

/// The output every connection writes to, one whole frame at a time.
type Output = Arc<Mutex<Box<dyn AsyncWrite + Send + Unpin>>>;

/// What each connection needs to know.
#[derive(Debug, Clone, Copy)]
struct ConnSettings {
    ack: bool,
    ack_delay: Duration,
    idle_timeout: Duration,
}

/// Serve already bound sockets (tests bind port 0 and keep the address). On `shutdown`:
/// stop accepting, let connections finish the frame they are on, flush the output.
pub async fn serve(
    listener: TcpListener,
    udp: UdpSocket,
    args: ReceiveArgs,
    shutdown: CancellationToken,
) -> Result<(), ToolError> {
    let writer: Box<dyn AsyncWrite + Send + Unpin> = if args.output == Path::new("-") {
        Box::new(tokio::io::stdout())
    } else {
        Box::new(
            tokio::fs::File::create(&args.output)
                .await
                .map_err(ToolError::Output)?,
        )
    };
    let output: Output = Arc::new(Mutex::new(writer));
    let settings = ConnSettings {
        ack: !args.no_ack,
        ack_delay: args.ack_delay,
        idle_timeout: args.idle_timeout,
    };
    let tracker = TaskTracker::new();
    tracker.spawn(answer_heartbeats(udp, shutdown.clone()));
    let permits = Arc::new(Semaphore::new(args.max_connections as usize));
    let mut backoff = Duration::from_millis(10);
    loop {
        // The permit is taken before accept: with none free, connections wait in the backlog.
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, ?backoff, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        backoff = Duration::from_millis(10);
        let output = output.clone();
        let shutdown = shutdown.clone();
        let span = tracing::info_span!("receive_conn", %peer);
        tracker.spawn(
            async move {
                match serve_connection(stream, settings, &output, &shutdown).await {
                    Ok(()) => tracing::debug!("connection closed"),
                    Err(reason) => tracing::warn!(%peer, %reason, "closing connection"),
                }
                drop(permit);
            }
            .instrument(span),
        );
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
    let flushed = output.lock().await.flush().await;
    flushed.map_err(ToolError::Output)
}

/// Reply `\0` to every datagram from the socket it came to (PROTOCOL.md §8.1, §13.7).
async fn answer_heartbeats(udp: UdpSocket, shutdown: CancellationToken) {
    let mut buf = [0u8; HEARTBEAT_READ];
    loop {
        let from = tokio::select! {
            () = shutdown.cancelled() => return,
            received = udp.recv_from(&mut buf) => match received {
                Ok((_, from)) => from,
                // ICMP errors from earlier replies surface here; they concern no one now.
                Err(e) => {
                    tracing::debug!(error = %e, "heartbeat receive failed");
                    continue;
                }
            },
        };
        match timeout(RECEIVE_WRITE_TIMEOUT, udp.send_to(&[0], from)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::debug!(%from, error = %e, "heartbeat reply failed"),
            Err(_) => tracing::debug!(%from, "heartbeat reply timed out"),
        }
    }
}

/// Read frames until EOF: write each as JSON lines, flush, then ack it if it asked.
async fn serve_connection(
    mut stream: TcpStream,
    settings: ConnSettings,
    output: &Output,
    shutdown: &CancellationToken,
) -> Result<(), ToolError> {
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let mut decoder = FrameDecoder::new(Limits::default());
    let max_depth = decoder.limits().max_depth;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut ack = Vec::new();
    loop {
        while let Some(decoded) = decoder.decode(&mut buf)? {
            let Decoded::Frame(frame) = decoded else {
                continue;
            };
            let lines = frame_to_lines(&frame, max_depth)?;
            {
                let mut out = output.lock().await;
                out.write_all(lines.as_bytes())
                    .await
                    .map_err(ToolError::Output)?;
                out.flush().await.map_err(ToolError::Output)?;
            }
            if let (true, Some(chunk)) = (settings.ack, &frame.chunk) {
                if !settings.ack_delay.is_zero() {
                    tokio::time::sleep(settings.ack_delay).await;
                }
                ack.clear();
                encode_ack(chunk, &mut ack);
                write_all_by(&mut stream, &ack, RECEIVE_WRITE_TIMEOUT, &peer).await?;
            }
        }
        buf.reserve(16 * 1024);
        let read = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            read = timeout(settings.idle_timeout, stream.read_buf(&mut buf)) => read,
        };
        match read {
            Err(_) => {
                return Err(ToolError::Idle {
                    timeout: settings.idle_timeout,
                })
            }
            Ok(Err(source)) => return Err(ToolError::Network { addr: peer, source }),
            Ok(Ok(0)) if buf.is_empty() => return Ok(()),
            Ok(Ok(0)) => {
                return Err(ToolError::Truncated {
                    buffered: buf.len(),
                })
            }
            Ok(Ok(_)) => {}
        }
    }
}

/// `{"tag": ..., "time": ..., "record": {...}[, "metadata": {...}]}` per event, each line ended
/// by `\n`. Keys are written in this order whatever serde_json's map ordering is.
fn frame_to_lines(frame: &Frame, max_depth: usize) -> Result<String, ToolError> {
    let tag = bytes_to_json(&frame.tag);
    let mut lines = String::new();
    let mut pos = 0;
    let mut index = 0u32;
    while pos < frame.entries.len() {
        let len = entry_len(&frame.entries[pos..], index, max_depth).map_err(FrameError::from)?;
        let entry = entry_to_json(&frame.entries[pos..pos + len])?;
        lines.push_str(&format!(
            "{{\"tag\":{},\"time\":{},\"record\":{}",
            tag, entry["time"], entry["record"]
        ));
        if let Some(metadata) = entry.get("metadata") {
            lines.push_str(&format!(",\"metadata\":{metadata}"));
        }
        lines.push_str("}\n");
        pos += len;
        index += 1;
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forward::packed::encode_packed_forward;
    use crate::forward::Mode;
    use clap::Parser;
    use serde_json::json;
    use std::io::Write as _;

    #[derive(Parser)]
    struct SendCli {
        #[command(flatten)]
        args: SendArgs,
    }

    #[derive(Parser)]
    struct ReceiveCli {
        #[command(flatten)]
        args: ReceiveArgs,
    }

    fn send_args(extra: &[&str]) -> SendArgs {
        let mut argv = vec!["send", "--tag", "app.log"];
        argv.extend_from_slice(extra);
        SendCli::try_parse_from(argv).unwrap().args
    }

    const INT: Encoding = Encoding {
        time_format: TimeFormat::Int,
        legacy: false,
    };

    fn one_batch(records: &[Value], encoding: Encoding) -> Batch {
        let mut batch = Batch::default();
        for r in records {
            put_entry(
                r,
                Duration::from_secs(1441588984),
                encoding,
                &mut batch.entries,
            );
            batch.events += 1;
        }
        batch
    }

    fn decode_one(bytes: &[u8]) -> Frame {
        let mut buf = BytesMut::from(bytes);
        let mut decoder = FrameDecoder::new(Limits::default());
        let Ok(Some(Decoded::Frame(frame))) = decoder.decode(&mut buf) else {
            panic!("not one frame: {bytes:02x?}");
        };
        assert!(buf.is_empty());
        frame
    }

    #[test]
    fn durations_need_units() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0ms"), Ok(Duration::ZERO));
        for bad in ["30", "", "s", "1.5s", "-1s", "3d", "99999999999999999999h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn flags_defaults_and_conflicts() {
        let args = send_args(&[]);
        assert_eq!(args.port, 24224);
        assert_eq!(args.batch, 1000);
        assert_eq!(args.mode, SendMode::Packed);
        assert_eq!(args.time_format, TimeFormat::Event);
        assert_eq!(args.ack_timeout, Duration::from_secs(30));
        assert_eq!(args.window, 16);
        assert_eq!(args.connect_timeout, Duration::from_secs(5));
        assert!(SendCli::try_parse_from(["send", "--tag", "t", "--legacy", "--ack"]).is_err());
        assert!(
            SendCli::try_parse_from(["send", "--tag", "t", "--legacy", "--mode", "forward"])
                .is_err()
        );
        assert!(SendCli::try_parse_from(["send", "--tag", "t", "--legacy"]).is_ok());
        assert!(SendCli::try_parse_from(["send", "--tag", "t", "--batch", "0"]).is_err());
        assert!(
            SendCli::try_parse_from(["send"]).is_err(),
            "--tag is required"
        );
        let r = ReceiveCli::try_parse_from(["receive", "--ack-delay", "500ms"])
            .unwrap()
            .args;
        assert_eq!(r.listen, "127.0.0.1:24224".parse().unwrap());
        assert_eq!(r.ack_delay, Duration::from_millis(500));
        assert!(!r.no_ack);
    }

    /// PROTOCOL.md §3.2: the v0.10 request for `{"msg":"hi"}` at 1441588984, byte for byte.
    #[test]
    fn legacy_request_bytes_are_pinned() {
        let legacy = Encoding {
            time_format: TimeFormat::Int,
            legacy: true,
        };
        let batch = one_batch(&[json!({"msg": "hi"})], legacy);
        let (raw_tag, len) = legacy_parts("app.log", &batch.entries);
        let request = [&[0x92][..], &raw_tag, &len, &batch.entries].concat();
        let expected = [
            0x92, 0xa7, b'a', b'p', b'p', b'.', b'l', b'o', b'g', 0xdb, 0, 0, 0, 0x0e, 0x92, 0xce,
            0x55, 0xec, 0xe6, 0xf8, 0x81, 0xa3, b'm', b's', b'g', 0xa2, b'h', b'i',
        ];
        assert_eq!(request, expected);
        let frame = decode_one(&request);
        assert_eq!(frame.mode, Mode::PackedForward);
        assert_eq!(frame.chunk, None);
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

    #[test]
    fn event_time_is_fixext8() {
        let mut out = Vec::new();
        let t = Duration::new(0x55ece6f8, 500_000_000);
        let event = Encoding {
            time_format: TimeFormat::Event,
            legacy: false,
        };
        put_entry(&json!({}), t, event, &mut out);
        assert_eq!(
            out,
            [0x92, 0xd7, 0x00, 0x55, 0xec, 0xe6, 0xf8, 0x1d, 0xcd, 0x65, 0x00, 0x80]
        );
    }

    #[test]
    fn packed_with_ack_matches_the_upstream_encoder() {
        let batch = one_batch(&[json!({"a": 1}), json!({"b": 2})], INT);
        let mut ours = Vec::new();
        encode_request(SendMode::Packed, "t", &batch, Some("id"), &mut ours);
        let mut upstream = Vec::new();
        encode_packed_forward(b"t", &batch.entries, "id", 2, None, &mut upstream);
        assert_eq!(ours, upstream);
    }

    #[test]
    fn every_mode_parses_back() {
        // 20 events: Forward needs an array16 header past 15.
        let records: Vec<Value> = (0..20).map(|i| json!({"i": i, "s": "two"})).collect();
        for mode in [SendMode::Packed, SendMode::Forward, SendMode::Message] {
            let batch = if mode == SendMode::Message {
                one_batch(&records[..1], INT)
            } else {
                one_batch(&records, INT)
            };
            for chunk in [None, Some("Y2h1bmsgaWQgMTIzNDU2Nw==")] {
                let mut request = Vec::new();
                encode_request(mode, "app.log", &batch, chunk, &mut request);
                let frame = decode_one(&request);
                let expected_mode = match mode {
                    SendMode::Packed => Mode::PackedForward,
                    SendMode::Forward => Mode::Forward,
                    SendMode::Message => Mode::Message,
                };
                assert_eq!(frame.mode, expected_mode);
                assert_eq!(&frame.tag[..], b"app.log");
                assert_eq!(frame.events, batch.events);
                assert_eq!(&frame.entries[..], &batch.entries[..], "{mode:?}");
                let mut expected_chunk = None;
                if let Some(id) = chunk {
                    let mut raw = Vec::new();
                    put_raw(&mut raw, id.as_bytes());
                    expected_chunk = Some(raw);
                }
                assert_eq!(frame.chunk.as_deref(), expected_chunk.as_deref());
            }
        }
    }

    #[test]
    fn input_lines_are_batched_and_errors_name_the_line() {
        let read = |input: &[u8], batch: u32, drained: bool| {
            let mut batches = Vec::new();
            let input = BufReader::new(input);
            read_input(input, Path::new("-"), INT, batch, drained, |b| {
                batches.push(b.events);
                true
            })
            .map(|()| batches)
        };
        let input = b"{\"a\":1}\n\n  {\"a\":2}\r\n{\"a\":3}\n{\"a\":4}";
        assert_eq!(read(input, 3, false).unwrap(), [3, 1]);
        let err = read(b"{}\n\n[1]\n", 3, false);
        assert!(
            matches!(err, Err(ToolError::BadLine { line: 3, .. })),
            "{err:?}"
        );
        let err = read(b"{}\n{\"a\":\n", 3, false);
        assert!(
            matches!(err, Err(ToolError::BadLine { line: 2, .. })),
            "{err:?}"
        );
    }

    /// A terminal returns one line per read: each is sent at once, not held for a full batch.
    #[test]
    fn interactive_input_is_not_held_back() {
        struct Typing(VecDeque<&'static [u8]>);
        impl Read for Typing {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let Some(line) = self.0.pop_front() else {
                    return Ok(0);
                };
                buf[..line.len()].copy_from_slice(line);
                Ok(line.len())
            }
        }
        let typing = Typing(VecDeque::from([&b"{}\n"[..], b"{}\n{}\n", b"\n", b"{}\n"]));
        let mut batches = Vec::new();
        read_input(
            BufReader::new(typing),
            Path::new("-"),
            INT,
            1000,
            true,
            |b| {
                batches.push(b.events);
                true
            },
        )
        .unwrap();
        assert_eq!(batches, [1, 2, 1]);
    }

    #[test]
    fn frames_become_json_lines_in_key_order() {
        let mut entries = Vec::new();
        put_entry(
            &json!({"k": "v"}),
            Duration::from_secs(5),
            INT,
            &mut entries,
        );
        // v1.5 entry: [[EventTime 10.5, {"m": 1}], {"r": 2}].
        entries.extend_from_slice(&[0x92, 0x92, 0xd7, 0x00, 0, 0, 0, 10, 0x1d, 0xcd, 0x65, 0x00]);
        entries.extend_from_slice(&[0x81, 0xa1, b'm', 0x01, 0x81, 0xa1, b'r', 0x02]);
        let mut request = vec![0x92, 0xa1, b't', 0xdb];
        request.extend_from_slice(&(entries.len() as u32).to_be_bytes());
        request.extend_from_slice(&entries);
        let lines = frame_to_lines(&decode_one(&request), 64).unwrap();
        assert_eq!(
            lines,
            "{\"tag\":\"t\",\"time\":5,\"record\":{\"k\":\"v\"}}\n\
             {\"tag\":\"t\",\"time\":10.5,\"record\":{\"r\":2},\"metadata\":{\"m\":1}}\n"
        );
    }

    // ---- over real sockets ----------------------------------------------------------------

    const TEST_DEADLINE: Duration = Duration::from_secs(20);

    struct Receiver {
        addr: SocketAddr,
        output: tempfile::NamedTempFile,
        shutdown: CancellationToken,
        task: JoinHandle<Result<(), ToolError>>,
    }

    impl Receiver {
        async fn start(extra: &[&str]) -> Receiver {
            let output = tempfile::NamedTempFile::new().unwrap();
            let path = output.path().to_str().unwrap().to_owned();
            let mut argv = vec!["receive", "--listen", "127.0.0.1:0", "--output", &path];
            argv.extend_from_slice(extra);
            let args = ReceiveCli::try_parse_from(argv).unwrap().args;
            let (listener, udp) = bind(args.listen).await.unwrap();
            let addr = listener.local_addr().unwrap();
            let shutdown = CancellationToken::new();
            let task = tokio::spawn(serve(listener, udp, args, shutdown.clone()));
            Receiver {
                addr,
                output,
                shutdown,
                task,
            }
        }

        fn lines(&self) -> Vec<Value> {
            read_lines(self.output.path())
        }

        async fn stop(self) -> Vec<Value> {
            self.shutdown.cancel();
            timeout(TEST_DEADLINE, self.task)
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            read_lines(self.output.path())
        }
    }

    fn read_lines(path: &Path) -> Vec<Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn input_file(records: usize) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        for i in 0..records {
            writeln!(file, "{}", json!({"seq": i, "msg": "hello ✓"})).unwrap();
        }
        file.flush().unwrap();
        file
    }

    fn target_args(
        receiver: &Receiver,
        input: &tempfile::NamedTempFile,
        extra: &[&str],
    ) -> SendArgs {
        let port = receiver.addr.port().to_string();
        let path = input.path().to_str().unwrap().to_owned();
        let mut argv = vec!["--port", &port, "--input", &path];
        argv.extend_from_slice(extra);
        send_args(&argv)
    }

    fn check_events(lines: &[Value], count: usize, int_time: bool) {
        assert_eq!(lines.len(), count);
        let mut seqs: Vec<u64> = lines
            .iter()
            .map(|l| l["record"]["seq"].as_u64().unwrap())
            .collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (0..count as u64).collect::<Vec<_>>());
        for line in lines {
            assert_eq!(line["tag"], "app.log");
            assert_eq!(line["record"]["msg"], "hello ✓");
            assert_eq!(line["time"].is_u64(), int_time, "{line}");
            assert!(line["time"].as_f64().unwrap() > 1.6e9);
        }
    }

    #[tokio::test]
    async fn send_with_acks_end_to_end() {
        let receiver = Receiver::start(&[]).await;
        let input = input_file(5);
        for (mode, requests) in [("packed", 3), ("forward", 3), ("message", 5)] {
            let args = target_args(
                &receiver,
                &input,
                &["--ack", "--batch", "2", "--window", "2", "--mode", mode],
            );
            let report = timeout(TEST_DEADLINE, send(args)).await.unwrap().unwrap();
            assert_eq!(
                report,
                SendReport {
                    events: 5,
                    requests,
                    acked: requests
                },
                "{mode}"
            );
        }
        // Every ack came after its lines were flushed, so the file is complete now.
        let lines = receiver.lines();
        assert_eq!(lines.len(), 15);
        for chunk in lines.chunks(5) {
            check_events(chunk, 5, false);
        }
        receiver.stop().await;
    }

    #[tokio::test]
    async fn legacy_send_end_to_end() {
        let receiver = Receiver::start(&[]).await;
        let input = input_file(3);
        let args = target_args(&receiver, &input, &["--legacy", "--batch", "2"]);
        let report = timeout(TEST_DEADLINE, send(args)).await.unwrap().unwrap();
        assert_eq!(
            report,
            SendReport {
                events: 3,
                requests: 2,
                acked: 0
            }
        );
        // Nothing is acked: wait for the file to hold all events (bounded).
        let deadline = Instant::now() + TEST_DEADLINE;
        while receiver.lines().len() < 3 {
            assert!(Instant::now() < deadline, "events never arrived");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        check_events(&receiver.stop().await, 3, true);
    }

    #[tokio::test]
    async fn missing_acks_fail_the_send() {
        let receiver = Receiver::start(&["--no-ack"]).await;
        let input = input_file(2);
        let args = target_args(&receiver, &input, &["--ack", "--ack-timeout", "200ms"]);
        let err = timeout(TEST_DEADLINE, send(args))
            .await
            .unwrap()
            .unwrap_err();
        assert!(matches!(err, ToolError::AckTimeout { .. }), "{err}");
        // The events were still received and written.
        assert_eq!(receiver.stop().await.len(), 2);
    }

    #[tokio::test]
    async fn delayed_acks_arrive() {
        let receiver = Receiver::start(&["--ack-delay", "100ms"]).await;
        let input = input_file(4);
        let args = target_args(&receiver, &input, &["--ack", "--batch", "1"]);
        let report = timeout(TEST_DEADLINE, send(args)).await.unwrap().unwrap();
        assert_eq!(report.acked, 4);
        receiver.stop().await;
    }

    #[tokio::test]
    async fn udp_heartbeats_are_answered_from_the_same_port() {
        let receiver = Receiver::start(&[]).await;
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for payload in [&[0u8][..], &[]] {
            client.send_to(payload, receiver.addr).await.unwrap();
            let mut buf = [0xffu8; 8];
            let (n, from) = timeout(TEST_DEADLINE, client.recv_from(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(&buf[..n], &[0]);
            assert_eq!(from, receiver.addr);
        }
        receiver.stop().await;
    }

    #[tokio::test]
    async fn a_bad_frame_closes_only_its_connection() {
        let receiver = Receiver::start(&[]).await;
        let mut bad = TcpStream::connect(receiver.addr).await.unwrap();
        let mut good = TcpStream::connect(receiver.addr).await.unwrap();
        bad.write_all(&[0x92, 0xa1, b't', 0xc1]).await.unwrap();
        let mut buf = [0u8; 16];
        let n = timeout(TEST_DEADLINE, bad.read(&mut buf)).await.unwrap();
        assert!(matches!(n, Ok(0) | Err(_)), "connection stays open: {n:?}");
        // The other connection is still served and acked.
        let batch = one_batch(&[json!({"seq": 0})], INT);
        let mut request = Vec::new();
        encode_request(SendMode::Forward, "t", &batch, Some("abc"), &mut request);
        good.write_all(&request).await.unwrap();
        let mut ack = [0u8; 9];
        timeout(TEST_DEADLINE, good.read_exact(&mut ack))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ack, [0x81, 0xa3, b'a', b'c', b'k', 0xa3, b'a', b'b', b'c']);
        drop(good);
        assert_eq!(receiver.stop().await.len(), 1);
    }
}
