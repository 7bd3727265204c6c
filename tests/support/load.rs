//! Load for the fault tests: sender threads that behave like real senders and account for every
//! event in a [`Ledger`]. Each thread numbers its events (sender, seq) ([`SenderIds`]).
//!
//! - Ack-requesting senders (PackedForward with a `chunk` option, like fluentd v0.12+ with
//!   `require_ack_response`) mark events acked once ackgate's ack arrives and resend an unacked
//!   request with the same chunk id on a new connection, like fluentd.
//! - Legacy senders write fluentd v0.10's layout on one connection per request (four writes,
//!   SO_LINGER {on, send_timeout}), close, and never read. With [`Load::retry_failed`] a
//!   refused connect or failed write keeps the chunk and sends it again, as v0.10 keeps its
//!   buffer.
//! - Persistent no-ack senders (docker's fluentd log driver, fluent-logger without
//!   `require_ack`) keep one connection, write requests back to back, never read; a failed
//!   write is a reset they saw: reconnect and write the same request again, as
//!   fluent-logger-golang does.
//!
//! Senders follow ackgate across restarts through a [`Target`], and run at a steady rate when
//! [`Load::per_second`] is set.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ackgate::forward::msgpack::value_len;

use super::ledger::{event, Ids, Ledger, SenderIds};
use super::msgpack::{hex, DEPTH};
use super::requests::{
    ack_request, expected_ack, legacy_request_parts, message_requests, random_chunk_id,
};
use super::{lock, wait_for_condition};

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
    /// Requests per second of each sender, held steady by a schedule (one slot every
    /// 1/rate; a sender that fell behind catches up at most [`MAX_LAG`] of slots, back to
    /// back); replaces `pace` when set.
    pub per_second: Option<f64>,
    /// How long a sender waits for ackgate's ack before it resends.
    pub ack_wait: Duration,
    /// A request not acked after this long is given up (and reported).
    pub give_up_after: Duration,
    /// One connection per request (fluentd v0.12) instead of a kept-alive one (v1 keepalive).
    pub conn_per_request: bool,
    /// Stop after this many requests per thread.
    pub max_requests: Option<u64>,
    /// Stop starting requests after this long, even if never told to.
    pub max_time: Option<Duration>,
    /// Legacy senders: keep a chunk whose connect or writes failed and send it again after
    /// `retry_wait` (fluentd v0.10 keeps it in its buffer), until `give_up_after`; without it,
    /// the chunk counts as failed and the sender goes on with the next one.
    pub retry_failed: bool,
    /// How long a sender waits before it tries again after a failed connect or attempt.
    pub retry_wait: Duration,
}

/// How far behind its schedule a sender at [`Load::per_second`] may fall: past that, missed
/// slots are dropped instead of being sent in one burst.
pub const MAX_LAG: Duration = Duration::from_millis(500);

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
            max_time: None,
            per_second: None,
            retry_failed: false,
            retry_wait: Duration::from_millis(200),
        }
    }
}

/// What a sender thread needs, one for each.
struct Sender {
    tag: String,
    load: Load,
    target: Arc<Target>,
    ids: SenderIds,
    ledger: Arc<Ledger>,
    stop: Arc<AtomicBool>,
    started: Instant,
    /// When the next request is due, with [`Load::per_second`].
    next_slot: Instant,
}

impl Sender {
    fn running(&self, sent: u64) -> bool {
        !self.stop.load(Ordering::Acquire)
            && self.load.max_requests.is_none_or(|m| sent < m)
            && self
                .load
                .max_time
                .is_none_or(|t| self.started.elapsed() < t)
    }

    /// The next request's ids and entries.
    fn batch(&mut self) -> (Vec<u64>, Vec<u8>) {
        let batch = self.ids.take(self.load.events_per_request);
        let entries = batch
            .iter()
            .flat_map(|&id| event(id, self.load.pad))
            .collect();
        (batch, entries)
    }

    /// Wait for the next request's turn: the next slot of the schedule, or `pace`.
    fn pace(&mut self) {
        let Some(rate) = self.load.per_second else {
            if !self.load.pace.is_zero() {
                std::thread::sleep(self.load.pace);
            }
            return;
        };
        self.next_slot += Duration::from_secs_f64(1.0 / rate);
        let now = Instant::now();
        if self.next_slot > now {
            std::thread::sleep(self.next_slot - now);
        } else if now - self.next_slot > MAX_LAG {
            self.next_slot = now - MAX_LAG;
        }
    }

    /// With [`Load::per_second`], start at a random point of the first slot, so that senders
    /// started together do not write in lockstep.
    fn spread(&mut self) {
        if let Some(rate) = self.load.per_second {
            use rand::Rng;
            let phase = Duration::from_secs_f64(rand::rng().random_range(0.0..1.0) / rate);
            self.next_slot += phase;
            std::thread::sleep(phase);
        }
    }

    /// Whether a request started at `started` has been tried for longer than allowed.
    fn given_up(&self, started: Instant) -> bool {
        started.elapsed() > self.load.give_up_after
    }
}

/// Running sender threads, with the target, id space and ledger they share; [`Senders::stop`]
/// lets each finish (and resend until acked) the request it is on, then joins them.
/// Dropping them tells them to stop, without waiting.
pub struct Senders {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    target: Arc<Target>,
    ids: Arc<Ids>,
    ledger: Arc<Ledger>,
}

impl Senders {
    /// Senders to ackgate at `addr`, with a fresh id space and ledger.
    pub fn to(addr: SocketAddr) -> Senders {
        let ids = Arc::new(Ids::default());
        Senders::sharing(&Target::new(addr), &ids, &Arc::new(Ledger::default()))
    }

    /// Senders that share a target, an id space and a ledger with others.
    pub fn sharing(target: &Arc<Target>, ids: &Arc<Ids>, ledger: &Arc<Ledger>) -> Senders {
        Senders {
            stop: Arc::new(AtomicBool::new(false)),
            threads: Vec::new(),
            target: target.clone(),
            ids: ids.clone(),
            ledger: ledger.clone(),
        }
    }

    pub fn target(&self) -> Arc<Target> {
        self.target.clone()
    }

    pub fn ids(&self) -> Arc<Ids> {
        self.ids.clone()
    }

    pub fn ledger(&self) -> Arc<Ledger> {
        self.ledger.clone()
    }

    /// `count` threads that ask for acks.
    pub fn ack(&mut self, count: usize, load: &Load) {
        self.spawn(count, load, ack_sender);
    }

    /// `count` threads that write fluentd v0.10's layout and close, never reading.
    pub fn legacy(&mut self, count: usize, load: &Load) {
        self.spawn(count, load, legacy_sender);
    }

    /// `count` threads that each keep one connection and write requests without asking for
    /// acks, never reading (docker's fluentd log driver).
    pub fn persistent(&mut self, count: usize, load: &Load) {
        self.spawn(count, load, persistent_sender);
    }

    fn spawn(&mut self, count: usize, load: &Load, run: fn(Sender)) {
        for n in 0..count {
            let now = Instant::now();
            let sender = Sender {
                tag: format!("{}.{n}", load.tag),
                load: load.clone(),
                target: self.target.clone(),
                ids: self.ids.sender(),
                ledger: self.ledger.clone(),
                stop: self.stop.clone(),
                started: now,
                next_slot: now,
            };
            self.threads.push(std::thread::spawn(move || {
                let mut sender = sender;
                sender.spread();
                run(sender)
            }));
        }
    }

    /// Join threads that stop by themselves (`max_requests`); bounded by `give_up_after`.
    pub fn join(&mut self) {
        for t in self.threads.drain(..) {
            t.join().expect("sender thread panicked");
        }
    }

    /// Ask every thread to stop after its current request and join them. Bounded: a thread
    /// gives up a request after its `give_up_after`. Threads started afterwards run again.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.join();
        self.stop = Arc::new(AtomicBool::new(false));
    }
}

impl Drop for Senders {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// A failure as a short reason for the ledger's counts: the message without its errno.
fn reason(message: &str) -> String {
    match message.find(" (os error") {
        Some(end) => message[..end].to_string(),
        None => message.to_string(),
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

fn ack_sender(mut me: Sender) {
    let mut conn: Option<TcpStream> = None;
    let mut sent = 0u64;
    while me.running(sent) {
        let (batch, entries) = me.batch();
        let chunk = random_chunk_id();
        let request = ack_request(&me.tag, &entries, &chunk);
        let want = expected_ack(&chunk);
        me.ledger.with(|l| l.ack_sent.extend(batch.iter().copied()));
        let started = Instant::now();
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let (addr, gen) = me.target.get();
            if conn.is_none() {
                conn = connect_to(addr, me.load.ack_wait).ok();
            }
            let result = match conn.as_mut() {
                Some(s) => exchange(s, &request, &want, me.load.ack_wait),
                None => Err("connect failed".into()),
            };
            if let Err(e) = &result {
                let why = reason(e);
                me.ledger
                    .with(|l| *l.ack_attempts_failed.entry(why).or_default() += 1);
            }
            if result.is_ok() {
                me.ledger.with(|l| {
                    l.acked.extend(batch.iter().copied());
                    if attempts > 1 {
                        l.resends += 1;
                    }
                });
                if me.load.conn_per_request {
                    conn = None;
                }
                break;
            }
            // Like fluentd: drop the connection, resend the same chunk later.
            conn = None;
            if me.given_up(started) {
                me.ledger.with(|l| l.gave_up.extend(batch.iter().copied()));
                break;
            }
            me.target.wait_change(gen, me.load.retry_wait);
        }
        sent += 1;
        me.pace();
    }
}

/// fluentd v0.10's `send_data`: connect, SO_LINGER {on, send_timeout} (5 s here, 60 s in
/// v0.10), the four writes, close. Ok once all of it returned; the close's own result is not
/// seen (Linux's close of a TCP socket reports nothing, and the linger only waits for the
/// peer's kernel to acknowledge the bytes).
fn write_legacy(addr: SocketAddr, parts: &[Vec<u8>]) -> std::io::Result<()> {
    let mut s = connect_to(addr, Duration::from_secs(5))?;
    socket2::SockRef::from(&s).set_linger(Some(Duration::from_secs(5)))?;
    for part in parts {
        s.write_all(part)?;
    }
    drop(s);
    Ok(())
}

fn legacy_sender(mut me: Sender) {
    let mut sent = 0u64;
    while me.running(sent) {
        let (batch, entries) = me.batch();
        let parts = legacy_request_parts(&me.tag, &entries);
        let started = Instant::now();
        loop {
            let (addr, gen) = me.target.get();
            match write_legacy(addr, &parts) {
                Ok(()) => {
                    me.ledger.with(|l| {
                        l.legacy_written.extend(batch.iter().copied());
                        l.legacy_gen.extend(batch.iter().map(|&id| (id, gen)));
                    });
                    break;
                }
                Err(_) if me.load.retry_failed && !me.given_up(started) => {
                    me.ledger.with(|l| l.legacy_retries += 1);
                    me.target.wait_change(gen, me.load.retry_wait);
                }
                Err(_) => {
                    me.ledger
                        .with(|l| l.legacy_failed.extend(batch.iter().copied()));
                    me.target.wait_change(gen, me.load.retry_wait);
                    break;
                }
            }
        }
        sent += 1;
        me.pace();
    }
}

/// One long-lived connection, `events_per_request` Message-mode events per write (what
/// fluent-logger-golang flushes at once), never reading. A failed write (the connection was
/// reset or closed under it) is counted as a reset seen, and the same request goes out again
/// on a new connection; a refused connect is tried again after `retry_wait`. The connection is
/// closed gracefully when the sender stops.
fn persistent_sender(mut me: Sender) {
    let mut conn: Option<TcpStream> = None;
    let mut sent = 0u64;
    while me.running(sent) {
        let batch = me.ids.take(me.load.events_per_request);
        let events: Vec<Vec<u8>> = batch.iter().map(|&id| event(id, me.load.pad)).collect();
        let request = message_requests(&me.tag, events.iter().map(Vec::as_slice));
        let started = Instant::now();
        loop {
            let (addr, gen) = me.target.get();
            let stream = match conn.as_mut() {
                Some(stream) => stream,
                None => match connect_to(addr, Duration::from_secs(5)) {
                    Ok(stream) => conn.insert(stream),
                    Err(_) => {
                        me.ledger.with(|l| l.persistent_connect_failures += 1);
                        if me.given_up(started) {
                            me.ledger
                                .with(|l| l.persistent_failed.extend(batch.iter().copied()));
                            break;
                        }
                        me.target.wait_change(gen, me.load.retry_wait);
                        continue;
                    }
                },
            };
            match stream.write_all(&request) {
                Ok(()) => {
                    me.ledger
                        .with(|l| l.persistent_written.extend(batch.iter().copied()));
                    break;
                }
                Err(e) => {
                    let why = reason(&e.to_string());
                    me.ledger
                        .with(|l| *l.persistent_resets.entry(why).or_default() += 1);
                    conn = None;
                    if me.given_up(started) {
                        me.ledger
                            .with(|l| l.persistent_failed.extend(batch.iter().copied()));
                        break;
                    }
                }
            }
        }
        sent += 1;
        me.pace();
    }
}
