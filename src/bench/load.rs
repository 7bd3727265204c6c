//! The senders: N connections writing PackedForward requests of `batch` events of exactly
//! `event_bytes` each, either fluentd v0.10's way (`legacy`: a connection per request, four
//! writes, close, nothing read) or with a `chunk` id per request and up to `window` requests
//! in flight per connection, acks matched by id (PROTOCOL.md §6.3, the Node logger's way).
//!
//! Every event carries two u64 fields the aggregator reads back without decoding the record:
//! `ts`, the send time in ns on this process's monotonic clock ([`now_ns`]), for end-to-end
//! latency, and `id` (connection << 40 | sequence), to count duplicates and losses.
//! Every loop stops at the run's deadline or event budget, whichever comes first.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;
use tokio::sync::{watch, Semaphore};
use tokio::time::{timeout, Instant};

use super::histogram::Histogram;
use crate::forward::ack::decode_ack;
use crate::forward::packed::{encode_packed_forward, put_raw};

/// Deadline for a connect and for each request's write.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Bits of an event id that hold the sequence within its connection.
pub const ID_SEQ_BITS: u32 = 40;
/// Errors kept per run (the rest are only counted).
const MAX_ERRORS: usize = 8;

/// Nanoseconds on a monotonic clock shared by the senders and the aggregator of this process.
pub fn now_ns() -> u64 {
    static BASE: OnceLock<std::time::Instant> = OnceLock::new();
    BASE.get_or_init(std::time::Instant::now)
        .elapsed()
        .as_nanos() as u64
}

/// Where the stamps sit in an event: `[time, {"ts": u64, "id": u64, "msg": pad}]`.
#[derive(Debug, Clone, Copy)]
pub struct EventLayout {
    pub size: usize,
    /// 10 for EventTime (`d7 00` + 8), 5 for a legacy uint32 time (`ce` + 4).
    time_len: usize,
}

/// Smallest event the layout can express.
pub const MIN_EVENT_BYTES: usize = 48;

impl EventLayout {
    pub fn new(size: usize, legacy: bool) -> EventLayout {
        EventLayout {
            size,
            time_len: if legacy { 5 } else { 10 },
        }
    }

    fn ts_at(time_len: usize) -> usize {
        6 + time_len
    }

    fn id_at(time_len: usize) -> usize {
        18 + time_len
    }

    /// One event, stamps zero. The pad is a fixstr or a str16 (legacy "raw" markers only).
    pub fn template(&self) -> Vec<u8> {
        let t = self.time_len;
        let mut e = vec![0x92];
        if t == 10 {
            e.extend_from_slice(&[0xd7, 0x00, 0, 0, 0, 0, 0, 0, 0, 0]);
        } else {
            e.extend_from_slice(&[0xce, 0, 0, 0, 0]);
        }
        e.push(0x83);
        e.extend_from_slice(&[0xa2, b't', b's', 0xcf]);
        e.extend_from_slice(&[0; 8]);
        e.extend_from_slice(&[0xa2, b'i', b'd', 0xcf]);
        e.extend_from_slice(&[0; 8]);
        e.extend_from_slice(&[0xa3, b'm', b's', b'g']);
        let rest = self.size.saturating_sub(e.len());
        let pad = if rest >= 1 && rest - 1 < 32 {
            e.push(0xa0 | (rest - 1) as u8);
            rest - 1
        } else {
            let pad = rest.saturating_sub(3).min(u16::MAX as usize);
            e.push(0xda);
            e.extend_from_slice(&(pad as u16).to_be_bytes());
            pad
        };
        e.extend((0..pad).map(|i| b'a' + (i % 26) as u8));
        e
    }

    /// Write the event time, `ts` and `id` into one event.
    fn stamp(&self, event: &mut [u8], wall: Duration, ts: u64, id: u64) {
        let sec = (wall.as_secs() as u32).to_be_bytes();
        if self.time_len == 10 {
            event[3..7].copy_from_slice(&sec);
            event[7..11].copy_from_slice(&wall.subsec_nanos().to_be_bytes());
        } else {
            event[2..6].copy_from_slice(&sec);
        }
        let ts_at = Self::ts_at(self.time_len);
        let id_at = Self::id_at(self.time_len);
        event[ts_at..ts_at + 8].copy_from_slice(&ts.to_be_bytes());
        event[id_at..id_at + 8].copy_from_slice(&id.to_be_bytes());
    }
}

/// `(ts, id)` of an event written by [`EventLayout`], or `None` for anything else.
pub fn read_stamps(entry: &[u8]) -> Option<(u64, u64)> {
    let time_len = match entry.get(1)? {
        0xd7 => 10,
        0xce => 5,
        _ => return None,
    };
    let ts_at = EventLayout::ts_at(time_len);
    let id_at = EventLayout::id_at(time_len);
    if entry.first() != Some(&0x92)
        || entry.get(ts_at - 1) != Some(&0xcf)
        || entry.get(id_at - 1) != Some(&0xcf)
    {
        return None;
    }
    let ts = u64::from_be_bytes(entry.get(ts_at..ts_at + 8)?.try_into().ok()?);
    let id = u64::from_be_bytes(entry.get(id_at..id_at + 8)?.try_into().ok()?);
    Some((ts, id))
}

/// What the senders do.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub connections: u32,
    pub legacy: bool,
    pub window: u32,
    pub event_bytes: usize,
    pub batch: u32,
    pub duration: Duration,
    /// Total events to send (all connections), if bounded by count too.
    pub events: Option<u64>,
    /// Total events per second (all connections), if capped.
    pub rate: Option<f64>,
    /// A different tag per request (so ackgate cannot merge requests into one record).
    pub unique_tags: bool,
    /// How long a request may wait for its ack.
    pub ack_timeout: Duration,
    /// Under a rate cap, every connection sends at the same instants (bursts) instead of
    /// being spread over the interval.
    pub aligned: bool,
}

/// What the senders saw.
#[derive(Debug, Clone, Default)]
pub struct LoadResult {
    pub requests: u64,
    /// Events acked (ack mode) or written (legacy).
    pub events: u64,
    /// First send to last ack (ack mode) or last write (legacy).
    pub elapsed: Duration,
    pub ack_latency: Histogram,
    /// Requests written whose ack never came.
    pub unacked: u64,
    pub errors: Vec<String>,
    pub error_count: u64,
}

/// Run the senders against `target` until the deadline or the event budget.
pub async fn run(target: SocketAddr, spec: &LoadSpec) -> LoadResult {
    let start = Instant::now();
    let shared = Arc::new(Shared {
        remaining: AtomicU64::new(spec.events.unwrap_or(u64::MAX)),
        deadline: start + spec.duration,
        start,
    });
    let mut tasks = Vec::new();
    for conn in 0..spec.connections {
        let spec = spec.clone();
        let shared = shared.clone();
        tasks.push(tokio::spawn(async move {
            if spec.legacy {
                legacy_connection(conn, target, &spec, &shared).await
            } else {
                ack_connection(conn, target, &spec, &shared).await
            }
        }));
    }
    let mut total = LoadResult::default();
    let mut last = start;
    for task in tasks {
        let one = match task.await {
            Ok(one) => one,
            Err(e) => {
                total.errors.push(format!("sender task failed: {e}"));
                total.error_count += 1;
                continue;
            }
        };
        total.requests += one.requests;
        total.events += one.events;
        total.unacked += one.unacked;
        total.ack_latency.merge(&one.ack_latency);
        total.error_count += one.error_count;
        for e in one.errors {
            if total.errors.len() < MAX_ERRORS {
                total.errors.push(e);
            }
        }
        last = last.max(one.last);
    }
    total.elapsed = last.saturating_duration_since(start);
    total
}

struct Shared {
    remaining: AtomicU64,
    deadline: Instant,
    start: Instant,
}

impl Shared {
    /// Take up to `batch` events of the budget; 0 when it is spent.
    fn take(&self, batch: u32) -> u32 {
        let mut taken = 0;
        let _ = self
            .remaining
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                taken = left.min(batch as u64) as u32;
                Some(left - taken as u64)
            });
        taken
    }
}

/// One connection's result.
struct ConnResult {
    requests: u64,
    events: u64,
    unacked: u64,
    ack_latency: Histogram,
    errors: Vec<String>,
    error_count: u64,
    last: Instant,
}

impl ConnResult {
    fn new(start: Instant) -> Self {
        ConnResult {
            requests: 0,
            events: 0,
            unacked: 0,
            ack_latency: Histogram::default(),
            errors: Vec::new(),
            error_count: 0,
            last: start,
        }
    }

    fn error(&mut self, e: String) {
        self.error_count += 1;
        if self.errors.len() < MAX_ERRORS {
            self.errors.push(e);
        }
    }
}

/// Builds one connection's requests from a template batch, stamping each event as it goes.
struct Requests {
    conn: u32,
    layout: EventLayout,
    entries: Vec<u8>,
    event_seq: u64,
}

impl Requests {
    fn new(conn: u32, spec: &LoadSpec) -> Self {
        let layout = EventLayout::new(spec.event_bytes, spec.legacy);
        let one = layout.template();
        Requests {
            conn,
            layout,
            entries: one.repeat(spec.batch as usize),
            event_seq: 0,
        }
    }

    /// Stamp the first `n` events and return their bytes.
    fn stamp(&mut self, n: u32) -> &[u8] {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let ts = now_ns();
        let size = self.layout.size;
        for i in 0..n as usize {
            let id = (u64::from(self.conn) << ID_SEQ_BITS) | (self.event_seq + i as u64);
            let event = &mut self.entries[i * size..(i + 1) * size];
            self.layout.stamp(event, wall, ts, id);
        }
        self.event_seq += u64::from(n);
        &self.entries[..n as usize * size]
    }
}

fn tag_for(spec: &LoadSpec, conn: u32, seq: u64) -> String {
    if spec.unique_tags {
        format!("bench.{conn}.{seq}")
    } else {
        "bench.load".to_string()
    }
}

/// When request `seq` of connection `conn` may start under the rate cap. Connections are
/// spread over the interval (unless `spec.aligned`), so requests arrive evenly, not in bursts.
fn pace(spec: &LoadSpec, conn: u32, start: Instant, seq: u64) -> Option<Instant> {
    let rate = spec.rate?;
    let connections = f64::from(spec.connections.max(1));
    let interval = f64::from(spec.batch) / (rate / connections).max(1e-9);
    let phase = if spec.aligned {
        0.0
    } else {
        f64::from(conn) / connections
    };
    Some(start + Duration::from_secs_f64(interval * (seq as f64 + phase)))
}

async fn connect(target: SocketAddr) -> Result<TcpStream, String> {
    match timeout(IO_TIMEOUT, TcpStream::connect(target)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(e)) => Err(format!("connect {target}: {e}")),
        Err(_) => Err(format!("connect {target}: timed out")),
    }
}

async fn write_by(stream: &mut (impl AsyncWriteExt + Unpin), bytes: &[u8]) -> Result<(), String> {
    match timeout(IO_TIMEOUT, stream.write_all(bytes)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("write: {e}")),
        Err(_) => Err(format!("write: no progress for {IO_TIMEOUT:?}")),
    }
}

/// fluentd v0.10: connect, `0x92`, tag, `0xdb` + length, entries, close (PROTOCOL.md §9.1).
async fn legacy_connection(
    conn: u32,
    target: SocketAddr,
    spec: &LoadSpec,
    shared: &Shared,
) -> ConnResult {
    let mut result = ConnResult::new(shared.start);
    let mut requests = Requests::new(conn, spec);
    let mut seq = 0u64;
    while Instant::now() < shared.deadline {
        if let Some(due) = pace(spec, conn, shared.start, seq) {
            if due >= shared.deadline {
                break;
            }
            tokio::time::sleep_until(due).await;
        }
        let n = shared.take(spec.batch);
        if n == 0 {
            break;
        }
        let mut tag = Vec::new();
        put_raw(&mut tag, tag_for(spec, conn, seq).as_bytes());
        let entries = requests.stamp(n);
        let len = (entries.len() as u32).to_be_bytes();
        let header = [0xdb, len[0], len[1], len[2], len[3]];
        let sent = async {
            let mut stream = connect(target).await?;
            for piece in [&[0x92][..], &tag, &header, entries] {
                write_by(&mut stream, piece).await?;
            }
            match timeout(IO_TIMEOUT, stream.shutdown()).await {
                Ok(Ok(())) => Ok(()),
                _ => Err("close failed".to_string()),
            }
        }
        .await;
        match sent {
            Ok(()) => {
                result.requests += 1;
                result.events += u64::from(n);
                result.last = Instant::now();
            }
            Err(e) => {
                result.error(e);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        seq += 1;
    }
    result
}

/// Requests in flight on this connection: request sequence → (write start, events).
type InFlight = Arc<Mutex<HashMap<u64, (Instant, u32)>>>;

/// Pipelined requests with a `chunk` id each, at most `window` unacked.
async fn ack_connection(
    conn: u32,
    target: SocketAddr,
    spec: &LoadSpec,
    shared: &Shared,
) -> ConnResult {
    let mut result = ConnResult::new(shared.start);
    let stream = match connect(target).await {
        Ok(stream) => stream,
        Err(e) => {
            result.error(e);
            return result;
        }
    };
    let (reader, mut writer) = stream.into_split();
    let in_flight: InFlight = Arc::default();
    let window = Arc::new(Semaphore::new(spec.window as usize));
    let (done_tx, done_rx) = watch::channel(false);
    let acks = tokio::spawn(read_acks(
        reader,
        in_flight.clone(),
        window.clone(),
        done_rx,
        spec.ack_timeout,
    ));
    let mut requests = Requests::new(conn, spec);
    let mut request = Vec::new();
    let mut seq = 0u64;
    let mut written = 0u64;
    loop {
        if Instant::now() >= shared.deadline {
            break;
        }
        if let Some(due) = pace(spec, conn, shared.start, seq) {
            if due >= shared.deadline {
                break;
            }
            tokio::time::sleep_until(due).await;
        }
        let permit = tokio::select! {
            permit = window.clone().acquire_owned() => permit,
            () = tokio::time::sleep_until(shared.deadline) => break,
        };
        let Ok(permit) = permit else { break };
        permit.forget();
        let n = shared.take(spec.batch);
        if n == 0 {
            break;
        }
        let chunk = format!("{conn:08x}{seq:016x}");
        let tag = tag_for(spec, conn, seq);
        request.clear();
        encode_packed_forward(
            tag.as_bytes(),
            requests.stamp(n),
            &chunk,
            n,
            crate::forward::Signal::Logs,
            None,
            &mut request,
        );
        lock(&in_flight).insert(seq, (Instant::now(), n));
        if let Err(e) = write_by(&mut writer, &request).await {
            result.error(e);
            break;
        }
        written += 1;
        seq += 1;
    }
    let _ = done_tx.send(true);
    let tally = match acks.await {
        Ok(tally) => tally,
        Err(e) => AckTally {
            error: Some(format!("ack reader failed: {e}")),
            ..AckTally::new(shared.start)
        },
    };
    let _ = timeout(Duration::from_secs(5), writer.shutdown()).await;
    result.requests = written;
    result.events = tally.events;
    result.unacked = lock(&in_flight).len() as u64;
    result.ack_latency = tally.latency;
    result.last = tally.last;
    if let Some(e) = tally.error {
        result.error(e);
    }
    result
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct AckTally {
    events: u64,
    latency: Histogram,
    last: Instant,
    error: Option<String>,
}

impl AckTally {
    fn new(start: Instant) -> Self {
        AckTally {
            events: 0,
            latency: Histogram::default(),
            last: start,
            error: None,
        }
    }
}

/// Match acks by id until the writer is done and nothing is in flight, or the oldest request
/// has waited `ack_timeout`, or the connection fails.
async fn read_acks(
    mut reader: OwnedReadHalf,
    in_flight: InFlight,
    window: Arc<Semaphore>,
    mut done: watch::Receiver<bool>,
    ack_timeout: Duration,
) -> AckTally {
    let mut tally = AckTally::new(Instant::now());
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        loop {
            let (seq, used) = match decode_ack(&buf, 4096) {
                Ok(Some((id, used))) => (parse_seq(id), used),
                Ok(None) => break,
                Err(e) => {
                    tally.error = Some(format!("bad ack: {e}"));
                    return tally;
                }
            };
            buf.advance(used);
            let now = Instant::now();
            match seq.and_then(|seq| lock(&in_flight).remove(&seq)) {
                Some((sent, events)) => {
                    tally
                        .latency
                        .record(now.saturating_duration_since(sent).as_nanos() as u64);
                    tally.events += u64::from(events);
                    tally.last = now;
                    window.add_permits(1);
                }
                None => {
                    tally.error = Some("ack for no request in flight".into());
                    return tally;
                }
            }
        }
        let (empty, oldest) = {
            let map = lock(&in_flight);
            (map.is_empty(), map.values().map(|(t, _)| *t).min())
        };
        if *done.borrow() && empty {
            return tally;
        }
        let deadline = oldest.map(|t| t + ack_timeout);
        tokio::select! {
            read = reader.read_buf(&mut buf) => match read {
                Ok(0) => {
                    if !empty || !*done.borrow() {
                        tally.error = Some("connection closed with requests unacked".into());
                    }
                    return tally;
                }
                Ok(_) => {}
                Err(e) => {
                    tally.error = Some(format!("read: {e}"));
                    return tally;
                }
            },
            changed = done.changed(), if !*done.borrow() => {
                if changed.is_err() {
                    return tally;
                }
            }
            () = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                tally.error = Some(format!("no ack within {ack_timeout:?}"));
                return tally;
            }
        }
    }
}

/// The request sequence in a chunk id `{conn:08x}{seq:016x}`.
fn parse_seq(id: &[u8]) -> Option<u64> {
    let hex = std::str::from_utf8(id.get(8..24)?).ok()?;
    u64::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forward::entries::count_entries;

    #[test]
    fn events_have_the_exact_size_and_stamps_read_back() {
        for legacy in [false, true] {
            for size in [MIN_EVENT_BYTES, 60, 150, 1000] {
                let layout = EventLayout::new(size, legacy);
                let mut e = layout.template();
                assert_eq!(e.len(), size, "size {size} legacy {legacy}");
                layout.stamp(&mut e, Duration::new(1_700_000_000, 5), 42, 7 << 40 | 9);
                assert_eq!(read_stamps(&e), Some((42, 7 << 40 | 9)));
                assert_eq!(count_entries(&e.repeat(3), 8), Ok(3));
            }
        }
        assert_eq!(parse_seq(b"0000000100000000000000ff"), Some(255));
    }
}
