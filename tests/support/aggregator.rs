//! The one test aggregator: a real Forward receiver on 127.0.0.1 that decodes what ackgate sends
//! with ackgate's own `FrameDecoder`, records every request (its raw bytes, tag, entries, chunk
//! id), counts harness events in a [`Seen`], and answers as its [`Behaviour`] says: like
//! fluentd's in_forward (`{"ack": <chunk>}`), or not at all, or with a wrong id, garbage, a JSON
//! ack, late, by closing or resetting the connection, by reading slowly, or by dropping requests
//! over a size (fluentd's `chunk_size_limit`). The behaviour can be switched while it runs.
//!
//! It runs on its own tokio runtime, so that sync and async tests can use it, and listens on a
//! [`ReservedPort`]: it can be started on a port ackgate was configured with while nothing
//! listened there, and be stopped (every connection reset, connects refused) and restarted on
//! the same socket without giving the port up. Several aggregators can wake one test through a
//! shared [`RequestSignal`].
//!
//! Every wait has a deadline and is woken by a request; on timeout it panics with a summary.

use std::collections::{HashMap, HashSet};
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use ackgate::forward::frame::read_int;
use ackgate::forward::msgpack::{read_header, value_len, Header};
use ackgate::forward::{Decoded, Frame, FrameDecoder, Limits, Mode};
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::aggregator_conn::accept_loop;
use super::ledger::{ids_of_entries, Seen};
use super::msgpack::{array_elements, map_entries, mp_str, raw_string, DEPTH};
use super::ports::ReservedPort;
use super::requests::{ack_for_value, random_chunk_id, split_entries};
use super::{lock, wait_for_condition};

/// How the aggregator answers each request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// `{"ack": <chunk>}` for every request with a chunk, like fluentd's in_forward.
    Ack,
    /// Reads and records, never answers: the seed failure (a receiver that hangs).
    NeverAck,
    /// Answers every request with an ack for another chunk id.
    WrongId,
    /// Answers with bytes that are not msgpack.
    Garbage,
    /// Answers `{"ack":"<chunk>"}` as JSON text (Vector's bug, PROTOCOL.md §6.3).
    JsonAck,
    /// Acks each request this long after reading it (without holding up the ones behind it).
    AckAfter(Duration),
    /// Reads one request, closes (FIN) without answering.
    CloseAfterRead,
    /// Reads one request, resets the connection (RST).
    ResetAfterRead,
    /// Reads at most this many bytes per second, acks normally.
    SlowRead(usize),
    /// Drops requests larger than this many bytes on the wire without an answer (fluentd's
    /// chunk_size_limit; they are recorded, not kept), acks the others.
    DropAbove(usize),
}

impl Behaviour {
    /// Whether a request that arrives under this behaviour is answered with its own ack.
    fn acks(self, kept: bool) -> bool {
        match self {
            Behaviour::Ack | Behaviour::AckAfter(_) | Behaviour::SlowRead(_) => true,
            Behaviour::DropAbove(_) => kept,
            _ => false,
        }
    }
}

/// One request the aggregator read.
#[derive(Debug, Clone)]
pub struct Request {
    /// Which accepted connection it came on (1-based, across restarts).
    pub conn: u64,
    /// The request exactly as it arrived.
    pub raw: Vec<u8>,
    pub mode: Mode,
    pub tag: Vec<u8>,
    /// Concatenated raw `[time, record]` entries, inflated if the request was compressed.
    pub entries: Vec<u8>,
    pub events: u32,
    /// The chunk option's content, if present.
    pub chunk: Option<String>,
    /// The chunk option as raw msgpack bytes (header included).
    pub chunk_raw: Option<Vec<u8>>,
    /// The behaviour in force when it arrived.
    pub behaviour: Behaviour,
    /// Counted as received (false: dropped by [`Behaviour::DropAbove`]).
    pub kept: bool,
    /// Whether the aggregator answered it with its ack.
    pub acked: bool,
    /// Whether this chunk id had already been acked by this aggregator when it arrived.
    pub resent_after_ack: bool,
    /// When it was read.
    pub at: Instant,
}

impl Request {
    /// The entries split into individual raw entries.
    pub fn split_events(&self) -> Vec<Vec<u8>> {
        split_entries(&self.entries)
    }

    /// Ids of the harness events it carried (see [`ids_of_entries`]).
    pub fn ids(&self) -> Vec<u64> {
        ids_of_entries(&self.entries).0
    }

    /// The option map's pairs (empty when there is none).
    pub fn options(&self) -> Vec<(String, Vec<u8>)> {
        let elements = array_elements(&self.raw);
        match elements.get(2) {
            Some(map) if matches!(read_header(map), Some(Header::Map { .. })) => map_entries(map)
                .into_iter()
                .map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), v.to_vec()))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The raw msgpack value of option `key`.
    pub fn option(&self, key: &str) -> Option<Vec<u8>> {
        self.options()
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    /// The `size` option, if present.
    pub fn size(&self) -> Option<i64> {
        read_int(&self.option("size")?)
    }

    /// Request array marker (0x93 for ackgate's PackedForward).
    pub fn array_marker(&self) -> u8 {
        self.raw[0]
    }

    /// Marker of the second element (0xdb: str32 entries).
    pub fn entries_marker(&self) -> u8 {
        array_elements(&self.raw).get(1).map_or(0, |e| e[0])
    }
}

/// Woken whenever any of the aggregators sharing it reads a request, so that a test can wait
/// on a condition over several of them.
#[derive(Default)]
pub struct RequestSignal {
    generation: Mutex<u64>,
    changed: Condvar,
}

impl RequestSignal {
    pub fn new() -> Arc<RequestSignal> {
        Arc::new(RequestSignal::default())
    }

    fn notify(&self) {
        *lock(&self.generation) += 1;
        self.changed.notify_all();
    }

    /// Wait until `cond` holds (checked after every request any aggregator reads); panics
    /// with `describe()` on timeout.
    pub fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        cond: impl Fn() -> bool,
        describe: impl Fn() -> String,
    ) {
        let deadline = Instant::now() + timeout;
        let mut generation = lock(&self.generation);
        loop {
            let seen = *generation;
            drop(generation);
            if cond() {
                return;
            }
            generation = lock(&self.generation);
            if *generation != seen {
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what}; {}",
                    describe()
                );
            }
            generation = self
                .changed
                .wait_timeout(generation, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

#[derive(Default)]
pub(super) struct State {
    requests: Vec<Request>,
    acked_ids: HashMap<String, u32>,
    errors: Vec<String>,
}

pub(super) struct Shared {
    pub(super) state: Mutex<State>,
    changed: Condvar,
    pub(super) connections: AtomicU64,
    behaviour: Mutex<Behaviour>,
    seen: Arc<Seen>,
    signal: Option<Arc<RequestSignal>>,
}

impl Shared {
    pub(super) fn notify(&self) {
        self.changed.notify_all();
        if let Some(signal) = &self.signal {
            signal.notify();
        }
    }

    pub(super) fn behaviour(&self) -> Behaviour {
        *lock(&self.behaviour)
    }

    /// Record one request under the behaviour in force; returns it.
    pub(super) fn record(&self, conn: u64, raw: Vec<u8>, frame: Frame) -> Request {
        let behaviour = self.behaviour();
        let chunk_raw = frame.chunk.as_ref().map(|c| c.to_vec());
        let chunk = chunk_raw.as_deref().and_then(raw_string);
        let kept = !matches!(behaviour, Behaviour::DropAbove(limit) if raw.len() > limit);
        let acked = chunk.is_some() && behaviour.acks(kept);
        let request = {
            let mut state = lock(&self.state);
            let resent_after_ack = chunk
                .as_ref()
                .is_some_and(|c| state.acked_ids.contains_key(c));
            if let (true, Some(c)) = (acked, &chunk) {
                *state.acked_ids.entry(c.clone()).or_insert(0) += 1;
            }
            let request = Request {
                conn,
                raw,
                mode: frame.mode,
                tag: frame.tag.to_vec(),
                entries: frame.entries.to_vec(),
                events: frame.events,
                chunk,
                chunk_raw,
                behaviour,
                kept,
                acked,
                resent_after_ack,
                at: Instant::now(),
            };
            state.requests.push(request.clone());
            request
        };
        // Counted after it is recorded: whoever the count wakes finds the request (and its
        // ack) in the aggregator's state too.
        if kept {
            let (ids, foreign) = ids_of_entries(&request.entries);
            self.seen
                .add_request(request.chunk.as_deref(), &ids, foreign);
        }
        self.notify();
        request
    }

    pub(super) fn record_error(&self, error: String) {
        eprintln!("[aggregator] {error}");
        lock(&self.state).errors.push(error);
        self.notify();
    }
}

/// Builds an [`Aggregator`]: its behaviour, its port, a signal to share.
pub struct AggregatorBuilder {
    behaviour: Behaviour,
    port: Option<ReservedPort>,
    signal: Option<Arc<RequestSignal>>,
}

impl AggregatorBuilder {
    pub fn behaviour(mut self, behaviour: Behaviour) -> Self {
        self.behaviour = behaviour;
        self
    }

    /// Listen on this reserved port (default: a fresh one).
    pub fn on(mut self, port: ReservedPort) -> Self {
        self.port = Some(port);
        self
    }

    /// Wake `signal` on every request.
    pub fn signalling(mut self, signal: &Arc<RequestSignal>) -> Self {
        self.signal = Some(signal.clone());
        self
    }

    pub fn start(self) -> Aggregator {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("aggregator runtime");
        let port = self.port.unwrap_or_default();
        let addr = port.addr();
        let mut agg = Aggregator {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                changed: Condvar::new(),
                connections: AtomicU64::new(0),
                behaviour: Mutex::new(self.behaviour),
                seen: Seen::new(),
                signal: self.signal,
            }),
            runtime: Some(runtime),
            socket: port.into_socket(),
            addr,
            running: None,
        };
        agg.listen();
        agg
    }
}

/// A real Forward aggregator on 127.0.0.1; see the module documentation.
pub struct Aggregator {
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
    /// The bound socket; listening while running.
    socket: socket2::Socket,
    addr: SocketAddr,
    running: Option<(CancellationToken, TaskTracker)>,
}

impl Aggregator {
    pub fn builder() -> AggregatorBuilder {
        AggregatorBuilder {
            behaviour: Behaviour::Ack,
            port: None,
            signal: None,
        }
    }

    /// Listen on a fresh port and ack like fluentd.
    pub fn start() -> Aggregator {
        Aggregator::builder().start()
    }

    /// Listen on a fresh port with `behaviour`.
    pub fn start_with(behaviour: Behaviour) -> Aggregator {
        Aggregator::builder().behaviour(behaviour).start()
    }

    /// Listen on `port` (where ackgate was told a node is) with `behaviour`.
    pub fn start_on(port: ReservedPort, behaviour: Behaviour) -> Aggregator {
        Aggregator::builder().on(port).behaviour(behaviour).start()
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.runtime.as_ref().expect("runtime")
    }

    fn listen(&mut self) {
        self.socket
            .listen(1024)
            .unwrap_or_else(|e| panic!("aggregator cannot listen on {}: {e}", self.addr));
        let std_listener: std::net::TcpListener =
            self.socket.try_clone().expect("dup the listener").into();
        std_listener.set_nonblocking(true).expect("nonblocking");
        let listener = {
            let _entered = self.rt().enter();
            tokio::net::TcpListener::from_std(std_listener).expect("register the listener")
        };
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        let accept = accept_loop(listener, self.shared.clone(), stop.clone(), tracker.clone());
        tracker.spawn_on(accept, self.rt().handle());
        self.running = Some((stop, tracker));
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Answer from now on as `behaviour` says.
    pub fn set_behaviour(&self, behaviour: Behaviour) {
        *lock(&self.shared.behaviour) = behaviour;
    }

    /// Reset every connection and stop listening (connects are refused), keeping the port;
    /// waits until every connection is gone.
    pub fn stop(&mut self) {
        if let Some((stop, tracker)) = self.running.take() {
            stop.cancel();
            tracker.close();
            self.rt().block_on(tracker.wait());
            // The accept loop dropped its descriptor; this one keeps the socket bound. On a
            // listening socket, SHUT_RD stops the listening and keeps the explicit bind.
            self.socket
                .shutdown(Shutdown::Read)
                .expect("stop listening");
        }
    }

    /// Listen again on the same port, keeping what was recorded.
    pub fn restart(&mut self) {
        self.stop();
        self.listen();
    }

    /// The harness events received (see [`Seen`]); dropped requests are not counted.
    pub fn seen(&self) -> Arc<Seen> {
        self.shared.seen.clone()
    }

    pub fn requests(&self) -> Vec<Request> {
        lock(&self.shared.state).requests.clone()
    }

    /// Every event received, as raw entry bytes, in arrival order (duplicates included).
    pub fn events(&self) -> Vec<Vec<u8>> {
        lock(&self.shared.state)
            .requests
            .iter()
            .flat_map(|r| r.split_events())
            .collect()
    }

    /// Events received, duplicates included.
    pub fn event_count(&self) -> usize {
        lock(&self.shared.state)
            .requests
            .iter()
            .map(|r| r.events as usize)
            .sum()
    }

    /// Chunk ids of every request, in arrival order (with repeats).
    pub fn chunk_ids_seen(&self) -> Vec<String> {
        lock(&self.shared.state)
            .requests
            .iter()
            .filter_map(|r| r.chunk.clone())
            .collect()
    }

    /// Times each chunk id was received.
    pub fn chunk_id_counts(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for id in self.chunk_ids_seen() {
            *counts.entry(id).or_insert(0) += 1;
        }
        counts
    }

    /// Chunk ids this aggregator acked, with how often.
    pub fn acked_ids(&self) -> HashMap<String, u32> {
        lock(&self.shared.state).acked_ids.clone()
    }

    /// Connections accepted (across restarts).
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Acquire)
    }

    /// Decoding errors seen on its connections (should stay empty: ackgate writes valid bytes).
    pub fn errors(&self) -> Vec<String> {
        lock(&self.shared.state).errors.clone()
    }

    /// Wait until `cond` holds over the requests received so far; panics on timeout.
    pub fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&[Request]) -> bool,
    ) -> Vec<Request> {
        let (state, held) =
            wait_for_condition(&self.shared.state, &self.shared.changed, timeout, |s| {
                cond(&s.requests)
            });
        if !held {
            let summary = summarize(&state.requests);
            panic!("aggregator: timed out after {timeout:?} waiting for {what}; {summary}");
        }
        state.requests.clone()
    }

    /// Wait until at least `n` events (duplicates counted) arrived; returns all events.
    pub fn wait_for_events(&self, n: usize, timeout: Duration) -> Vec<Vec<u8>> {
        self.wait_until(&format!("{n} events"), timeout, |reqs| {
            reqs.iter().map(|r| r.events as usize).sum::<usize>() >= n
        });
        self.events()
    }

    /// Wait until every event of `expected` arrived at least once; returns all events.
    pub fn wait_for_all(&self, expected: &[Vec<u8>], timeout: Duration) -> Vec<Vec<u8>> {
        let want: HashSet<&[u8]> = expected.iter().map(|e| e.as_slice()).collect();
        let mut seen: HashSet<Vec<u8>> = HashSet::new();
        let mut scanned = 0usize;
        let (state, held) =
            wait_for_condition(&self.shared.state, &self.shared.changed, timeout, |s| {
                for r in &s.requests[scanned..] {
                    seen.extend(
                        r.split_events()
                            .into_iter()
                            .filter(|e| want.contains(e.as_slice())),
                    );
                }
                scanned = s.requests.len();
                seen.len() == want.len()
            });
        if !held {
            let summary = summarize(&state.requests);
            panic!(
                "aggregator: timed out after {timeout:?}: {} of {} expected events arrived; {summary}",
                seen.len(),
                want.len()
            );
        }
        drop(state);
        self.events()
    }
}

impl Drop for Aggregator {
    fn drop(&mut self) {
        if let Some((stop, _)) = self.running.take() {
            stop.cancel();
        }
        if let Some(rt) = self.runtime.take() {
            // Allowed from async contexts too, unlike dropping the runtime.
            rt.shutdown_background();
        }
    }
}

fn summarize(requests: &[Request]) -> String {
    let events: usize = requests.iter().map(|r| r.events as usize).sum();
    let acked = requests.iter().filter(|r| r.acked).count();
    let mut tags: HashMap<String, usize> = HashMap::new();
    for r in requests {
        *tags
            .entry(String::from_utf8_lossy(&r.tag).into_owned())
            .or_insert(0) += r.events as usize;
    }
    let sizes: Vec<usize> = requests.iter().take(20).map(|r| r.raw.len()).collect();
    format!(
        "{} requests ({acked} acked), {events} events so far, events per tag {tags:?}, sizes of the first {sizes:?}",
        requests.len()
    )
}
