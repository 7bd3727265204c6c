//! Support for the fault tests (`tests/faults_*.rs`, results in FAULTS.md): load that accounts
//! for every event it hands to the real `ackgate` binary, and aggregators that count what
//! arrives.
//!
//! Every event is `[uint32 time, {"id": u64, "pad": str}]` with an id unique in its test, so
//! the harness can tell which events arrived, how often, and under which upstream chunk id.
//!
//! - [`Ledger`]: what the senders handed over. Ack-requesting senders (PackedForward with a
//!   `chunk` option, like fluentd v0.12+ with `require_ack_response`) mark events *acked* once
//!   ackgate's ack arrives, and resend an unacked request with the same chunk id, like fluentd.
//!   Legacy senders write fluentd v0.10's layout on one connection per request and close; for
//!   them the promise starts at ackgate's commit, measured separately (metrics or the spool).
//! - [`Seen`]: what arrived upstream (unique ids, duplicates, chunk ids), fed by the shared
//!   test [`Aggregator`], by [`FaultAgg`] (an aggregator that misbehaves on request) or by an
//!   `ackgate receive` child ([`ReceiveProc`], optionally inside a network namespace).
//! - [`Row`]: one line of FAULTS.md, printed and saved under `target/tmp/faults/`.
//!
//! Waits are bounded and woken by events (a condition variable signalled when a request is
//! recorded, a log line); the only polling is where no event exists (a file, a child's exit).

#![allow(dead_code)]

use std::cell::Cell;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ackgate::forward::ack::encode_ack;
use ackgate::forward::entries::entry_len;
use ackgate::forward::msgpack::value_len;
use ackgate::forward::{Decoded, FrameDecoder, Limits};
use bytes::BytesMut;

use crate::common::{
    ack_request, collect_lines, expected_ack, hex, legacy_request_parts, mp_str, raw_string,
    Ackgate, Aggregator, LogLines, UpRequest, DEPTH, TS,
};
use crate::common::{lock, wait_for_condition};

// ------------------------------------------------------------------------------------------------
// Short and long mode

/// `ACKGATE_SOAK=1` selects the long mode (high cycle counts); the default is the short mode
/// that `.ci/run` runs.
pub fn soak() -> bool {
    std::env::var("ACKGATE_SOAK").is_ok_and(|v| v == "1")
}

/// `short` cycles by default, `long` with `ACKGATE_SOAK=1`.
pub fn cycles(short: u32, long: u32) -> u32 {
    if soak() {
        long
    } else {
        short
    }
}

/// The command that reproduces a test, for FAULTS.md.
pub fn command(test_file: &str, test_name: &str) -> String {
    let soak = if soak() { "ACKGATE_SOAK=1 " } else { "" };
    format!("{soak}cargo test --release --test {test_file} -- {test_name}")
}

// ------------------------------------------------------------------------------------------------
// Events

/// Offset of the id's 8 bytes in an event built by [`event`].
const ID_OFFSET: usize = 11;
/// The bytes an event starts with after its time: fixmap(2), fixstr "id", uint64 marker.
const ID_PREFIX: [u8; 5] = [0x82, 0xa2, b'i', b'd', 0xcf];

/// `[uint32 TS, {"id": id, "pad": "x" * pad}]`, the layout fluentd v0.10/v0.12 write.
pub fn event(id: u64, pad: usize) -> Vec<u8> {
    let mut out = vec![0x92, 0xce];
    out.extend_from_slice(&TS.to_be_bytes());
    out.extend_from_slice(&ID_PREFIX);
    out.extend_from_slice(&id.to_be_bytes());
    mp_str(&mut out, b"pad");
    mp_str(&mut out, "x".repeat(pad).as_bytes());
    out
}

/// The id of an event built by [`event`]; `None` for anything else (or altered bytes).
pub fn event_id(entry: &[u8]) -> Option<u64> {
    if entry.len() < ID_OFFSET + 8 || entry[0] != 0x92 || entry[1] != 0xce {
        return None;
    }
    if entry[6..ID_OFFSET] != ID_PREFIX {
        return None;
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&entry[ID_OFFSET..ID_OFFSET + 8]);
    Some(u64::from_be_bytes(id))
}

/// Ids of concatenated entries; entries that are not harness events count in the second value.
pub fn ids_of_entries(entries: &[u8]) -> (Vec<u64>, u64) {
    let mut ids = Vec::new();
    let mut foreign = 0;
    let mut pos = 0;
    let mut index = 0u32;
    while pos < entries.len() {
        let Ok(len) = entry_len(&entries[pos..], index, DEPTH) else {
            foreign += 1;
            break;
        };
        match event_id(&entries[pos..pos + len]) {
            Some(id) => ids.push(id),
            None => foreign += 1,
        }
        pos += len;
        index += 1;
    }
    (ids, foreign)
}

/// Event ids unique within a test.
#[derive(Default)]
pub struct Ids(AtomicU64);

impl Ids {
    pub fn take(&self, n: usize) -> Vec<u64> {
        let first = self.0.fetch_add(n as u64, Ordering::Relaxed) + 1;
        (first..first + n as u64).collect()
    }
}

/// A fresh 16-byte chunk id as Base64 (what @fluent-org/logger and fluent-bit send).
pub fn random_chunk_id() -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(uuid::Uuid::new_v4().as_bytes())
}

// ------------------------------------------------------------------------------------------------
// What the senders handed over

/// Events per sender state.
#[derive(Default, Clone, Debug)]
pub struct LedgerState {
    /// Events of every ack-requesting request started.
    pub ack_sent: HashSet<u64>,
    /// Events whose request ackgate acked.
    pub acked: HashSet<u64>,
    /// Ack requests that needed more than one attempt (resent with the same chunk id).
    pub resends: u64,
    /// Events of requests the sender gave up on (never acked).
    pub gave_up: HashSet<u64>,
    /// Legacy events whose writes all returned (what a v0.10 sender counts as delivered).
    pub legacy_written: HashSet<u64>,
    /// Legacy events whose connect or write failed (the sender knows; not handed over).
    pub legacy_failed: HashSet<u64>,
    /// For each written legacy event, the [`Target`] generation (ackgate incarnation) it
    /// was written to.
    pub legacy_gen: HashMap<u64, u64>,
}

/// What the senders handed over, shared by every sender thread.
#[derive(Default)]
pub struct Ledger {
    state: Mutex<LedgerState>,
    changed: Condvar,
}

impl Ledger {
    pub fn snapshot(&self) -> LedgerState {
        lock(&self.state).clone()
    }

    pub fn acked_count(&self) -> usize {
        lock(&self.state).acked.len()
    }

    fn with(&self, f: impl FnOnce(&mut LedgerState)) {
        f(&mut lock(&self.state));
        self.changed.notify_all();
    }

    /// Wait until at least `n` events are acked, at most `timeout`; false on timeout.
    pub fn wait_acked(&self, n: usize, timeout: Duration) -> bool {
        wait_for_condition(&self.state, &self.changed, timeout, |s| s.acked.len() >= n).1
    }
}

/// Where senders connect: ackgate's address changes on every restart (it listens on port 0).
pub struct Target {
    state: Mutex<(SocketAddr, u64)>,
    changed: Condvar,
}

impl Target {
    pub fn new(addr: SocketAddr) -> Arc<Target> {
        Arc::new(Target {
            state: Mutex::new((addr, 0)),
            changed: Condvar::new(),
        })
    }

    pub fn get(&self) -> (SocketAddr, u64) {
        *lock(&self.state)
    }

    pub fn set(&self, addr: SocketAddr) {
        let mut s = lock(&self.state);
        s.0 = addr;
        s.1 += 1;
        self.changed.notify_all();
    }

    /// Wait until the address changes from generation `gen`, at most `timeout`.
    pub fn wait_change(&self, gen: u64, timeout: Duration) {
        let _ = wait_for_condition(&self.state, &self.changed, timeout, |s| s.1 != gen);
    }
}

/// How one group of sender threads behaves.
#[derive(Clone, Debug)]
pub struct Load {
    pub tag: String,
    pub events_per_request: usize,
    /// Bytes of padding per event.
    pub pad: usize,
    /// Pause between requests of one sender (a load rate, not a synchronisation).
    pub pace: Duration,
    /// How long a sender waits for ackgate's ack before it resends.
    pub ack_wait: Duration,
    /// A request not acked after this long is given up (and reported).
    pub give_up_after: Duration,
    /// One connection per request (fluentd v0.12) instead of a kept-alive one (v1 keepalive).
    pub conn_per_request: bool,
    /// Stop after this many requests per thread.
    pub max_requests: Option<u64>,
}

impl Load {
    pub fn new(tag: &str) -> Load {
        Load {
            tag: tag.to_string(),
            events_per_request: 5,
            pad: 40,
            pace: Duration::from_millis(5),
            ack_wait: Duration::from_secs(10),
            give_up_after: Duration::from_secs(120),
            conn_per_request: false,
            max_requests: None,
        }
    }
}

/// Running sender threads; [`Senders::stop`] lets each finish (and resend until acked) the
/// request it is on, then joins them.
pub struct Senders {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Senders {
    pub fn new() -> Senders {
        Senders {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
        }
    }

    /// `count` threads that ask for acks.
    pub fn ack(
        &mut self,
        count: usize,
        load: &Load,
        target: &Arc<Target>,
        ids: &Arc<Ids>,
        ledger: &Arc<Ledger>,
    ) {
        for n in 0..count {
            let (load, target, ids, ledger, stop) = (
                load.clone(),
                target.clone(),
                ids.clone(),
                ledger.clone(),
                self.stop.clone(),
            );
            let tag = format!("{}.{n}", load.tag);
            self.threads.push(std::thread::spawn(move || {
                ack_sender(&tag, &load, &target, &ids, &ledger, &stop)
            }));
        }
    }

    /// `count` threads that write fluentd v0.10's layout and close, never reading.
    pub fn legacy(
        &mut self,
        count: usize,
        load: &Load,
        target: &Arc<Target>,
        ids: &Arc<Ids>,
        ledger: &Arc<Ledger>,
    ) {
        for n in 0..count {
            let (load, target, ids, ledger, stop) = (
                load.clone(),
                target.clone(),
                ids.clone(),
                ledger.clone(),
                self.stop.clone(),
            );
            let tag = format!("{}.{n}", load.tag);
            self.threads.push(std::thread::spawn(move || {
                legacy_sender(&tag, &load, &target, &ids, &ledger, &stop)
            }));
        }
    }

    /// Join threads that stop by themselves (`max_requests`); bounded by `give_up_after`.
    pub fn join(mut self) {
        for t in self.threads.drain(..) {
            t.join().expect("sender thread panicked");
        }
    }

    /// Ask every thread to stop after its current request and join them. Bounded: a thread
    /// gives up a request after its `give_up_after`.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        for t in self.threads.drain(..) {
            t.join().expect("sender thread panicked");
        }
    }
}

impl Drop for Senders {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

fn connect_to(addr: SocketAddr, io_timeout: Duration) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_nodelay(true)?;
    s.set_write_timeout(Some(io_timeout))?;
    s.set_read_timeout(Some(io_timeout))?;
    Ok(s)
}

/// Write `request`, read one complete msgpack value, and require it to be `want`.
fn exchange(s: &mut TcpStream, request: &[u8], want: &[u8], wait: Duration) -> Result<(), String> {
    s.write_all(request).map_err(|e| format!("write: {e}"))?;
    let deadline = Instant::now() + wait;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        if let Ok(Some(n)) = value_len(&got, DEPTH) {
            return if got[..n] == *want && n == got.len() {
                Ok(())
            } else {
                Err(format!("wrong ack {} (want {})", hex(&got), hex(want)))
            };
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err("no ack in time".into());
        }
        s.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
        match s.read(&mut buf) {
            Ok(0) => return Err("closed before the ack".into()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

/// One acked request of `ids` on a new connection; how long it took from connect to ack.
pub fn timed_request(
    addr: SocketAddr,
    tag: &str,
    ids: &[u64],
    wait: Duration,
) -> Result<Duration, String> {
    let started = Instant::now();
    let entries: Vec<u8> = ids.iter().flat_map(|&id| event(id, 40)).collect();
    let chunk = random_chunk_id();
    let mut s = connect_to(addr, wait).map_err(|e| format!("connect: {e}"))?;
    exchange(
        &mut s,
        &ack_request(tag, &entries, &chunk),
        &expected_ack(&chunk),
        wait,
    )?;
    Ok(started.elapsed())
}

fn ack_sender(
    tag: &str,
    load: &Load,
    target: &Target,
    ids: &Ids,
    ledger: &Ledger,
    stop: &AtomicBool,
) {
    let mut conn: Option<TcpStream> = None;
    let mut sent = 0u64;
    while !stop.load(Ordering::Acquire) && load.max_requests.is_none_or(|m| sent < m) {
        let batch = ids.take(load.events_per_request);
        let entries: Vec<u8> = batch.iter().flat_map(|&id| event(id, load.pad)).collect();
        let chunk = random_chunk_id();
        let request = ack_request(tag, &entries, &chunk);
        let want = expected_ack(&chunk);
        ledger.with(|l| l.ack_sent.extend(batch.iter().copied()));
        let started = Instant::now();
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let (addr, gen) = target.get();
            if conn.is_none() {
                conn = connect_to(addr, load.ack_wait).ok();
            }
            let result = match conn.as_mut() {
                Some(s) => exchange(s, &request, &want, load.ack_wait),
                None => Err("connect failed".into()),
            };
            match result {
                Ok(()) => {
                    ledger.with(|l| {
                        l.acked.extend(batch.iter().copied());
                        if attempts > 1 {
                            l.resends += 1;
                        }
                    });
                    if load.conn_per_request {
                        conn = None;
                    }
                    break;
                }
                Err(_) => {
                    // Like fluentd: drop the connection, resend the same chunk later.
                    conn = None;
                    if started.elapsed() > load.give_up_after {
                        ledger.with(|l| l.gave_up.extend(batch.iter().copied()));
                        break;
                    }
                    target.wait_change(gen, Duration::from_millis(200));
                }
            }
        }
        sent += 1;
        if !load.pace.is_zero() {
            std::thread::sleep(load.pace);
        }
    }
}

fn legacy_sender(
    tag: &str,
    load: &Load,
    target: &Target,
    ids: &Ids,
    ledger: &Ledger,
    stop: &AtomicBool,
) {
    let mut sent = 0u64;
    while !stop.load(Ordering::Acquire) && load.max_requests.is_none_or(|m| sent < m) {
        let batch = ids.take(load.events_per_request);
        let entries: Vec<u8> = batch.iter().flat_map(|&id| event(id, load.pad)).collect();
        let parts = legacy_request_parts(tag, &entries);
        let (addr, gen) = target.get();
        let written = connect_to(addr, Duration::from_secs(5)).and_then(|mut s| {
            for part in &parts {
                s.write_all(part)?;
            }
            Ok(())
        });
        match written {
            Ok(()) => ledger.with(|l| {
                l.legacy_written.extend(batch.iter().copied());
                l.legacy_gen.extend(batch.iter().map(|&id| (id, gen)));
            }),
            Err(_) => {
                ledger.with(|l| l.legacy_failed.extend(batch.iter().copied()));
                target.wait_change(gen, Duration::from_millis(200));
            }
        }
        sent += 1;
        if !load.pace.is_zero() {
            std::thread::sleep(load.pace);
        }
    }
}

// ------------------------------------------------------------------------------------------------
// What arrived upstream

/// Counts of what an aggregator received.
#[derive(Default, Clone, Debug)]
pub struct SeenState {
    /// Times each event id arrived.
    pub counts: HashMap<u64, u32>,
    /// Events received, duplicates included.
    pub events: u64,
    /// Requests received.
    pub requests: u64,
    /// Chunk ids each event arrived under.
    pub chunks_of_event: HashMap<u64, BTreeSet<String>>,
    /// Events of each chunk id, as first received.
    pub events_of_chunk: HashMap<String, Vec<u64>>,
    /// A chunk id that arrived again with other events (breaks invariant 3).
    pub chunk_conflicts: Vec<String>,
    /// Entries that are not harness events (altered bytes would land here).
    pub foreign: u64,
    /// Output lines that did not parse (a receiver killed mid-line).
    pub bad_lines: u64,
}

impl SeenState {
    pub fn unique(&self) -> usize {
        self.counts.len()
    }

    pub fn duplicates(&self) -> u64 {
        self.events - self.counts.len() as u64
    }

    /// Members of `ids` that never arrived, sorted.
    pub fn missing(&self, ids: &HashSet<u64>) -> Vec<u64> {
        let mut m: Vec<u64> = ids
            .iter()
            .filter(|id| !self.counts.contains_key(id))
            .copied()
            .collect();
        m.sort_unstable();
        m
    }

    pub fn has_all(&self, ids: &HashSet<u64>) -> bool {
        ids.iter().all(|id| self.counts.contains_key(id))
    }

    /// How many of `ids` arrived more than once.
    pub fn duplicated_of(&self, ids: &HashSet<u64>) -> usize {
        ids.iter()
            .filter(|id| self.counts.get(id).is_some_and(|&n| n > 1))
            .count()
    }
}

/// What arrived, with a condition variable signalled on every change.
#[derive(Default)]
pub struct Seen {
    state: Mutex<SeenState>,
    changed: Condvar,
    /// Requests of the shared [`Aggregator`] already counted.
    agg_scanned: AtomicUsize,
}

impl Seen {
    pub fn new() -> Arc<Seen> {
        Arc::new(Seen::default())
    }

    /// One request: its chunk id (if any) and its events.
    pub fn add_request(&self, chunk: Option<&str>, ids: &[u64], foreign: u64) {
        {
            let mut s = lock(&self.state);
            s.requests += 1;
            s.events += ids.len() as u64;
            s.foreign += foreign;
            for &id in ids {
                *s.counts.entry(id).or_insert(0) += 1;
            }
            if let Some(chunk) = chunk {
                for &id in ids {
                    s.chunks_of_event
                        .entry(id)
                        .or_default()
                        .insert(chunk.to_string());
                }
                match s.events_of_chunk.get(chunk) {
                    Some(first) if first.as_slice() != ids => {
                        let msg = format!(
                            "chunk {chunk:?} carried {} events first, {} now",
                            first.len(),
                            ids.len()
                        );
                        s.chunk_conflicts.push(msg);
                    }
                    Some(_) => {}
                    None => {
                        s.events_of_chunk.insert(chunk.to_string(), ids.to_vec());
                    }
                }
            }
        }
        self.changed.notify_all();
    }

    fn add_bad_line(&self) {
        lock(&self.state).bad_lines += 1;
        self.changed.notify_all();
    }

    pub fn snapshot(&self) -> SeenState {
        lock(&self.state).clone()
    }

    pub fn with<R>(&self, f: impl FnOnce(&SeenState) -> R) -> R {
        f(&lock(&self.state))
    }

    /// Wait until `cond` holds, at most `timeout`; false on timeout.
    pub fn wait(&self, timeout: Duration, cond: impl Fn(&SeenState) -> bool) -> bool {
        wait_for_condition(&self.state, &self.changed, timeout, cond).1
    }

    fn add_agg_requests(&self, reqs: &[UpRequest]) {
        let from = self.agg_scanned.load(Ordering::Acquire);
        for r in reqs.iter().skip(from) {
            let (ids, foreign) = ids_of_entries(&r.entries);
            self.add_request(r.chunk.as_deref(), &ids, foreign);
        }
        self.agg_scanned.fetch_max(reqs.len(), Ordering::AcqRel);
    }

    /// Count what the shared [`Aggregator`] received since the last call.
    pub fn pump(&self, agg: &Aggregator) {
        self.add_agg_requests(&agg.requests());
    }

    /// Wait (woken by the aggregator) until `cond` holds over what `agg` received; false on
    /// timeout.
    pub fn wait_agg(
        &self,
        agg: &Aggregator,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&SeenState) -> bool,
    ) -> bool {
        let met = Cell::new(false);
        // The shared aggregator panics on timeout; catch that to report our own figures.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            agg.wait_until(what, timeout, |reqs| {
                self.add_agg_requests(reqs);
                let ok = cond(&lock(&self.state));
                met.set(ok);
                ok
            })
        }));
        result.is_ok() && met.get()
    }
}

// ------------------------------------------------------------------------------------------------
// Results

/// One row of FAULTS.md.
#[derive(Debug, Default)]
pub struct Row {
    pub scenario: String,
    /// Events handed over: ack requests started plus legacy events fully written.
    pub sent: usize,
    /// Events acked by ackgate.
    pub acked: usize,
    /// Legacy events known committed (metrics or spool).
    pub committed: usize,
    /// Distinct events received upstream.
    pub received: usize,
    pub duplicates: u64,
    /// Acked or committed events that never arrived.
    pub lost: usize,
    pub cycles: u32,
    pub seconds: f64,
    pub command: String,
    pub notes: String,
}

impl Row {
    /// Print the row and save it under `target/tmp/faults/<short|soak>/`.
    pub fn save(&self) {
        let line = format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.1} s | `{}` | {} |",
            self.scenario,
            self.sent,
            self.acked,
            self.committed,
            self.received,
            self.duplicates,
            self.lost,
            self.cycles,
            self.seconds,
            self.command,
            self.notes
        );
        eprintln!("FAULTS-ROW {line}");
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("faults")
            .join(if soak() { "soak" } else { "short" });
        let _ = std::fs::create_dir_all(&dir);
        let name: String = self
            .scenario
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let _ = std::fs::write(dir.join(format!("{name}.md")), format!("{line}\n"));
    }
}

// ------------------------------------------------------------------------------------------------
// Metrics

/// The metrics address from the `metrics listening listen=IP:PORT` line after `mark`.
pub fn metrics_addr(gate: &Ackgate, mark: usize) -> SocketAddr {
    let line = gate.wait_for_log_since(
        mark,
        &["metrics listening", "listen="],
        Duration::from_secs(20),
    );
    let start = line.find("listen=").expect("listen=") + "listen=".len();
    let rest = &line[start..];
    let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
    rest[..end]
        .parse()
        .unwrap_or_else(|e| panic!("bad metrics address in {line:?}: {e}"))
}

/// `GET path` on the metrics listener; the body, or `None` if it does not answer.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let body = out.split_once("\r\n\r\n")?.1;
    Some(body.to_string())
}

/// Sum of a metric over its label sets (`ackgate_events_in_total`, ...).
pub fn metric(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        let value = rest.rsplit(' ').next()?.parse::<f64>().ok()?;
        found = Some(found.unwrap_or(0.0) + value);
    }
    found
}

/// A metric scraped now.
pub fn scrape(addr: SocketAddr, name: &str) -> Option<f64> {
    metric(&http_get(addr, "/metrics")?, name)
}

/// Resident memory of a process in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Open file descriptors of a process.
pub fn open_fds(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

// ------------------------------------------------------------------------------------------------
// The spool, read from a copy (the original stays exactly as the crash left it)

/// What a spool file held.
#[derive(Debug, Default)]
pub struct SpoolSnapshot {
    pub records: usize,
    /// Harness event → chunk id of the record holding it.
    pub chunk_of_event: HashMap<u64, String>,
    pub foreign: u64,
    pub dead_letters: Vec<ackgate::spool::DeadLetter>,
    /// Size of the file in bytes.
    pub file_bytes: u64,
}

/// Copy the spool file (left by a crash) and read every record and dead letter from the copy
/// with ackgate's own spool code. An error means the spool does not open cleanly.
pub fn snapshot_spool(path: &Path) -> Result<SpoolSnapshot, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let copy = dir.path().join("copy.redb");
    let file_bytes =
        std::fs::copy(path, &copy).map_err(|e| format!("copy {}: {e}", path.display()))?;
    let mut table = toml::Table::new();
    table.insert("path".into(), copy.to_string_lossy().into_owned().into());
    let config: ackgate::config::SpoolConfig = toml::Value::Table(table)
        .try_into()
        .map_err(|e| format!("spool config: {e}"))?;
    let (spool, writer) = ackgate::spool::Spool::open(&config).map_err(|e| format!("open: {e}"))?;
    let read = (|| {
        let batch = spool
            .read_from(1, usize::MAX, usize::MAX)
            .map_err(|e| format!("read records: {e}"))?;
        if let Some(damaged) = batch.damaged.first() {
            return Err(format!(
                "record {} does not decode: {}",
                damaged.key, damaged.error
            ));
        }
        let records = batch.records;
        let dead = spool
            .dead_letters(1, usize::MAX)
            .map_err(|e| format!("read dead letters: {e}"))?;
        let mut snap = SpoolSnapshot {
            records: records.len(),
            dead_letters: dead,
            file_bytes,
            ..SpoolSnapshot::default()
        };
        for r in &records {
            let chunk = ackgate::forward::packed::chunk_id_base64(&r.chunk_id);
            let (ids, foreign) = ids_of_entries(&r.entries.to_bytes());
            snap.foreign += foreign;
            for id in ids {
                snap.chunk_of_event.insert(id, chunk.clone());
            }
        }
        Ok(snap)
    })();
    drop(spool);
    writer.shutdown();
    read
}

// ------------------------------------------------------------------------------------------------
// `ackgate receive` as a child process (SIGKILL-able, optionally in a network namespace)

/// `ackgate receive --listen ADDR --output -`: acks after writing each request's events as JSON
/// lines to its stdout, which a thread here reads into a [`Seen`] (so an acked event has always
/// been counted: the receiver flushes before it acks).
pub struct ReceiveProc {
    child: Option<Child>,
    listen: SocketAddr,
    netns: Option<String>,
    extra: Vec<String>,
    seen: Arc<Seen>,
    pub log: Arc<LogLines>,
    readers: Vec<JoinHandle<()>>,
    pub generation: u32,
}

impl ReceiveProc {
    pub fn start(
        listen: SocketAddr,
        netns: Option<&str>,
        extra: &[&str],
        seen: Arc<Seen>,
    ) -> ReceiveProc {
        let mut p = ReceiveProc {
            child: None,
            listen,
            netns: netns.map(str::to_string),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            seen,
            log: Arc::new(LogLines::default()),
            readers: Vec::new(),
            generation: 0,
        };
        p.spawn(0);
        p
    }

    /// Spawn and wait for its `listening on` line at index ≥ `mark` of the log.
    fn spawn(&mut self, mark: usize) {
        self.generation += 1;
        let bin = env!("CARGO_BIN_EXE_ackgate");
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, bin]);
                c
            }
            None => Command::new(bin),
        };
        cmd.arg("receive")
            .arg("--listen")
            .arg(self.listen.to_string())
            .arg("--output")
            .arg("-")
            .args(&self.extra)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn ackgate receive");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let seen = self.seen.clone();
        self.readers.push(std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            loop {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                let id = serde_json::from_str::<serde_json::Value>(line.trim_end())
                    .ok()
                    .and_then(|v| v["record"]["id"].as_u64());
                match id {
                    // The receiver has no chunk ids in its output: one event per request here.
                    Some(id) if line.ends_with('\n') => seen.add_request(None, &[id], 0),
                    _ => seen.add_bad_line(),
                }
            }
        }));
        let prefix = format!("receive#{}", self.generation);
        self.readers
            .push(collect_lines(prefix, stderr, self.log.clone()));
        let listening = format!("listening on {}", self.listen);
        if self
            .log
            .wait_for_from(mark, Duration::from_secs(20), |l| l.contains(&listening))
            .is_none()
        {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "ackgate receive did not listen on {}; log:\n{}",
                self.listen,
                self.log.dump()
            );
        }
        self.child = Some(child);
    }

    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(|c| c.id())
            .expect("receiver running")
    }

    /// SIGKILL and reap; its stdout is read to the end (everything it acked is counted).
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for t in self.readers.drain(..) {
            let _ = t.join();
        }
    }

    /// Start again on the same address.
    pub fn restart(&mut self) {
        self.kill9();
        let mark = self.log.len();
        self.spawn(mark);
    }
}

impl Drop for ReceiveProc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ------------------------------------------------------------------------------------------------
// An aggregator that misbehaves on request

/// How [`FaultAgg`] answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// `{"ack": chunk}` per request, like fluentd's in_forward.
    Ack,
    /// Reads and keeps, never answers.
    NeverAck,
    /// Answers every request with an ack for another chunk id.
    WrongId,
    /// Answers with bytes that are not msgpack.
    Garbage,
    /// Answers `{"ack":"<chunk>"}` as JSON text (Vector's bug, PROTOCOL.md §6.3).
    JsonAck,
    /// Acks each request this long after reading it.
    AckAfter(Duration),
    /// Reads one request, closes (FIN) without answering.
    CloseAfterRead,
    /// Reads one request, resets the connection (RST).
    ResetAfterRead,
    /// Reads at most this many bytes per second, acks normally.
    SlowRead(usize),
    /// Drops requests larger than this many bytes without an answer (fluentd's
    /// chunk_size_limit), acks the others.
    DropAbove(usize),
}

/// A request as [`FaultAgg`] saw it.
#[derive(Debug, Clone)]
pub struct FaultRequest {
    pub conn: u64,
    pub chunk: Option<String>,
    pub ids: Vec<u64>,
    pub wire_len: usize,
    /// Kept (counted as received) or dropped (DropAbove).
    pub kept: bool,
    /// Behaviour in force when it arrived.
    pub behaviour: Behaviour,
}

struct FaultShared {
    behaviour: Mutex<Behaviour>,
    seen: Arc<Seen>,
    requests: Mutex<Vec<FaultRequest>>,
    connections: AtomicU64,
    stop: AtomicBool,
}

/// A real Forward aggregator on 127.0.0.1 (threads, blocking sockets) whose answers follow a
/// [`Behaviour`] that the test switches at run time. Kept requests feed a [`Seen`].
pub struct FaultAgg {
    addr: SocketAddr,
    shared: Arc<FaultShared>,
    accept: Option<JoinHandle<()>>,
}

impl FaultAgg {
    pub fn start(behaviour: Behaviour, seen: Arc<Seen>) -> FaultAgg {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fault aggregator");
        let addr = listener.local_addr().expect("addr");
        let shared = Arc::new(FaultShared {
            behaviour: Mutex::new(behaviour),
            seen,
            requests: Mutex::new(Vec::new()),
            connections: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let accept = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if s.stop.load(Ordering::Acquire) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let conn = s.connections.fetch_add(1, Ordering::AcqRel) + 1;
                let s = s.clone();
                std::thread::spawn(move || serve_fault_conn(stream, conn, &s));
            }
        });
        FaultAgg {
            addr,
            shared,
            accept: Some(accept),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn set(&self, behaviour: Behaviour) {
        *lock(&self.shared.behaviour) = behaviour;
    }

    pub fn requests(&self) -> Vec<FaultRequest> {
        lock(&self.shared.requests).clone()
    }

    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Acquire)
    }
}

impl Drop for FaultAgg {
    fn drop(&mut self) {
        // Connection threads see the flag within their 500 ms read timeout. No clones of the
        // sockets are kept: a clone would keep a "closed" or "reset" connection open.
        self.shared.stop.store(true, Ordering::Release);
        // Wake the accept loop.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn serve_fault_conn(mut stream: TcpStream, conn: u64, shared: &FaultShared) {
    let limits = Limits {
        max_frame_bytes: 256 << 20,
        ..Limits::default()
    };
    let mut decoder = FrameDecoder::new(limits);
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        let behaviour = *lock(&shared.behaviour);
        let want = match behaviour {
            Behaviour::SlowRead(rate) => rate.clamp(1, chunk.len()),
            _ => chunk.len(),
        };
        let started = Instant::now();
        match stream.read(&mut chunk[..want]) {
            Ok(0) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(_) => return,
        }
        if let Behaviour::SlowRead(_) = behaviour {
            // The pace of a slow reader: one read of at most `rate` bytes per second.
            let rest = Duration::from_secs(1).saturating_sub(started.elapsed());
            std::thread::sleep(rest);
        }
        loop {
            let before = buf.len();
            let frame = match decoder.decode(&mut buf) {
                Ok(Some(Decoded::Frame(f))) => f,
                Ok(Some(Decoded::Nil)) => continue,
                Ok(None) => break,
                Err(e) => {
                    eprintln!("[fault-agg] conn {conn}: invalid request: {e}");
                    return;
                }
            };
            let wire_len = before - buf.len();
            let behaviour = *lock(&shared.behaviour);
            let chunk_raw = frame.chunk.as_ref().map(|c| c.to_vec());
            let chunk_str = chunk_raw.as_deref().and_then(raw_string);
            let (ids, foreign) = ids_of_entries(&frame.entries);
            let kept = !matches!(behaviour, Behaviour::DropAbove(limit) if wire_len > limit);
            if kept {
                shared.seen.add_request(chunk_str.as_deref(), &ids, foreign);
            }
            lock(&shared.requests).push(FaultRequest {
                conn,
                chunk: chunk_str.clone(),
                ids,
                wire_len,
                kept,
                behaviour,
            });
            let Some(raw) = chunk_raw else { continue };
            let mut answer = Vec::new();
            match behaviour {
                Behaviour::Ack | Behaviour::SlowRead(_) => encode_ack(&raw, &mut answer),
                Behaviour::DropAbove(_) if kept => encode_ack(&raw, &mut answer),
                Behaviour::DropAbove(_) | Behaviour::NeverAck => {}
                Behaviour::WrongId => {
                    let mut other = Vec::new();
                    mp_str(&mut other, random_chunk_id().as_bytes());
                    encode_ack(&other, &mut answer);
                }
                Behaviour::Garbage => answer.extend_from_slice(b"\xc1garbage\xff\x00\r\n"),
                Behaviour::JsonAck => {
                    let id = chunk_str.clone().unwrap_or_default();
                    answer.extend_from_slice(format!("{{\"ack\":\"{id}\"}}").as_bytes());
                }
                Behaviour::AckAfter(delay) => {
                    // Late, but not holding up the requests behind it.
                    encode_ack(&raw, &mut answer);
                    if let Ok(mut late) = stream.try_clone() {
                        std::thread::spawn(move || {
                            std::thread::sleep(delay);
                            let _ = late.write_all(&answer);
                        });
                    }
                    continue;
                }
                Behaviour::CloseAfterRead => {
                    let _ = stream.shutdown(Shutdown::Both);
                    return;
                }
                Behaviour::ResetAfterRead => {
                    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                    return;
                }
            }
            if !answer.is_empty() && stream.write_all(&answer).is_err() {
                return;
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Network namespace with a veth pair (root only), deleted on drop

/// Why the network-namespace scenario cannot run here, if it cannot.
pub fn netns_unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (ip netns, iptables)".into());
    }
    for tool in ["ip", "iptables"] {
        let ok = Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Some(format!("`{tool}` is not installed (.ci/run installs it)"));
        }
    }
    None
}

fn run(cmd: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Namespaces created by this process so far: tests of one binary run in parallel threads,
/// so each namespace needs its own name, interfaces and /30.
static NETNS_CREATED: AtomicU64 = AtomicU64::new(0);

/// A network namespace joined to the host by a veth pair with a /30 of 10.231.0.0/16. Drop
/// deletes both (also when a test panics).
pub struct Netns {
    pub name: String,
    host_if: String,
    pub host_addr: Ipv4Addr,
    pub ns_addr: Ipv4Addr,
}

impl Netns {
    pub fn create() -> Result<Netns, String> {
        let pid = std::process::id();
        // 32 namespaces per process before names or blocks repeat (earlier ones are gone by
        // then: a test drops its namespace before it creates the next one).
        let n = (NETNS_CREATED.fetch_add(1, Ordering::Relaxed) % 32) as u32;
        // At most 7 + 1 + 2 hex digits: "agh" + tag stays within IFNAMSIZ (15).
        let tag = format!("{:x}x{n:x}", pid & 0xfff_ffff);
        let block = ((pid.wrapping_mul(32) + n) % 16384) * 4;
        let third = (block / 256) as u8;
        let fourth = (block % 256) as u8;
        let ns = Netns {
            name: format!("agf-{tag}"),
            host_if: format!("agh{tag}"),
            host_addr: Ipv4Addr::new(10, 231, third, fourth + 1),
            ns_addr: Ipv4Addr::new(10, 231, third, fourth + 2),
        };
        let peer = format!("agn{tag}");
        let host_cidr = format!("{}/30", ns.host_addr);
        let ns_cidr = format!("{}/30", ns.ns_addr);
        // Leftovers of an earlier run with the same pid would make the adds fail.
        let _ = run(&["ip", "netns", "del", &ns.name]);
        let _ = run(&["ip", "link", "del", &ns.host_if]);
        run(&["ip", "netns", "add", &ns.name])?;
        // From here on, Drop cleans up whatever was created.
        run(&[
            "ip",
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
        ])?;
        run(&["ip", "link", "set", &peer, "netns", &ns.name])?;
        run(&["ip", "addr", "add", &host_cidr, "dev", &ns.host_if])?;
        run(&["ip", "link", "set", &ns.host_if, "up"])?;
        ns.exec(&["ip", "addr", "add", &ns_cidr, "dev", &peer])?;
        ns.exec(&["ip", "link", "set", &peer, "up"])?;
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Run a command inside the namespace.
    pub fn exec(&self, cmd: &[&str]) -> Result<(), String> {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(cmd);
        run(&full)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting one end of a veth pair deletes both; the namespace takes its rules along.
        let _ = run(&["ip", "link", "del", &self.host_if]);
        let _ = run(&["ip", "netns", "del", &self.name]);
    }
}

/// TCP sockets of this (the host's) network namespace connected to `peer`, and the bytes they
/// hold that `peer` has not acknowledged (`tx_queue` of /proc/net/tcp: sent or queued, not
/// acked; a queued FIN counts one). Orphans count too: a socket its process closed gracefully
/// stays here, retransmitting, until its data is acked or it gives up. `None` if the table
/// cannot be read.
pub fn unacked_towards(peer: std::net::SocketAddrV4) -> Option<(usize, u64)> {
    // The kernel prints an address as u32 words in memory order, the port as a number. An
    // IPv6 socket may reach the peer as ::ffff:a.b.c.d.
    let v4 = format!("{:08X}", u32::from_ne_bytes(peer.ip().octets()));
    let mapped = format!(
        "0000000000000000{:08X}{v4}",
        u32::from_ne_bytes([0, 0, 0xff, 0xff])
    );
    let port = format!("{:04X}", peer.port());
    let mut sockets = 0;
    let mut unacked = 0;
    for (file, addr) in [("/proc/net/tcp", v4), ("/proc/net/tcp6", mapped)] {
        let Ok(table) = std::fs::read_to_string(file) else {
            if file == "/proc/net/tcp" {
                return None;
            }
            continue;
        };
        let want = format!("{addr}:{port}");
        for line in table.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 5 || cols[2] != want {
                continue;
            }
            let tx = cols[4].split(':').next().unwrap_or("0");
            sockets += 1;
            unacked += u64::from_str_radix(tx, 16).unwrap_or(0);
        }
    }
    Some((sockets, unacked))
}

/// A tmpfs of `size` mounted on a new temp dir (root only); unmounted on drop.
pub struct Tmpfs {
    dir: Option<tempfile::TempDir>,
    pub path: PathBuf,
}

impl Tmpfs {
    pub fn mount(size: &str) -> Result<Tmpfs, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("needs root to mount a tmpfs".into());
        }
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let path = dir.path().to_path_buf();
        run(&[
            "mount",
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size}"),
            "tmpfs",
            &path.to_string_lossy(),
        ])?;
        Ok(Tmpfs {
            dir: Some(dir),
            path,
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let path = self.path.to_string_lossy().into_owned();
        if run(&["umount", &path]).is_err() {
            // Still busy (a child not yet reaped): detach it lazily rather than leak it.
            let _ = run(&["umount", "-l", &path]);
        }
        drop(self.dir.take());
    }
}

/// A random duration in `[lo, hi)`.
pub fn random_between(lo: Duration, hi: Duration) -> Duration {
    use rand::Rng;
    let span = hi.saturating_sub(lo).as_millis().max(1) as u64;
    lo + Duration::from_millis(rand::rng().random_range(0..span))
}

/// The first `n` of a sorted id list, for messages.
pub fn first<T: std::fmt::Debug>(v: &[T], n: usize) -> String {
    format!(
        "{:?}{}",
        &v[..v.len().min(n)],
        if v.len() > n { " …" } else { "" }
    )
}
