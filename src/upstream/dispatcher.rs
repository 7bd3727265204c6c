//! The queue of records waiting for an upstream ack, shared by every node connection.
//!
//! Memory holds only what is in flight: records are read from the spool in key order through a
//! cursor, a small batch at a time; a record whose attempt failed goes back as a (due time,
//! key) pair and is read again from the spool when due. At start-up the cursor is 1, so every
//! record left in the spool is sent again with its original chunk id (invariant 3). A record is
//! handed to one connection at a time, and deleted only when that connection sees its ack
//! (invariant 2).
//!
//! **Invariant 8, as this file keeps it.** Every key in the spool is, at every moment, in
//! exactly one of: in flight (handed out by [`Dispatcher::take`], not yet acked or given back),
//! buffered (read ahead, not yet handed out), in the retry heap, at or ahead of the cursor, or
//! on its way out (its delete, dead letter or split handed to the spool writer, which keeps
//! such work across failed commits). Every step that moves a record does so only after the
//! last thing that can fail: a retry is popped only once its read succeeded, the cursor moves
//! only past keys it read, a poisoned record that cannot be read back or split goes back to
//! the retry heap, and a record that does not decode becomes a dead letter with the reason
//! instead of stopping the queue. [`Dispatcher::audit`] checks it against the spool's keys.
//!
//! `take` is cancel-safe: it changes nothing before its last await, so a node may drop it to
//! serve an ack and call it again.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex as SyncMutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;

use rand::Rng;
use tokio::sync::{watch, Mutex, Notify};
use tokio::time::Instant;

use crate::forward::msgpack::value_len;
use crate::forward::{Signal, MAX_DEPTH};
use crate::spool::{DamagedRecord, ReadBatch, Spool, SpoolError, StoredRecord};

/// Records read from the spool per cursor step.
const READ_AHEAD_RECORDS: usize = 32;
/// Entry bytes read from the spool per cursor step (at least one record is always read).
const READ_AHEAD_BYTES: usize = 4 << 20;

/// Exponential backoff with "equal jitter": half the delay is fixed, half is random, so
/// retries of many records and nodes spread out instead of arriving together.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    /// Delay before attempt number `failures + 1` (`failures` ≥ 1).
    pub fn delay(&self, failures: u32) -> Duration {
        let exp = failures.saturating_sub(1).min(30);
        let full = self
            .initial
            .checked_mul(1u32 << exp)
            .unwrap_or(self.max)
            .min(self.max);
        let half = full / 2;
        let jitter = rand::rng().random_range(0.0..=1.0);
        half + half.mul_f64(jitter)
    }
}

/// Which records a dispatcher hands out (`upstream.route`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Every record (`route = "configured"`).
    All,
    /// Records whose sender was redirected here on its way to this address.
    To(SocketAddr),
    /// Records without an original destination (direct connections, older spools).
    Undirected,
}

impl Route {
    pub fn takes(&self, destination: Option<SocketAddr>) -> bool {
        match self {
            Route::All => true,
            Route::To(to) => destination == Some(*to),
            Route::Undirected => destination.is_none(),
        }
    }
}

/// A record handed to a node connection.
#[derive(Debug, Clone)]
pub struct Taken {
    pub record: StoredRecord,
}

/// The queue proper: guarded by an async lock because reading the spool is awaited.
struct State {
    /// Next key to read from the spool.
    cursor: u64,
    /// Records read ahead from the spool, in key order.
    buffered: VecDeque<StoredRecord>,
    /// Failed records waiting for their retry time: (due, key, failed attempts so far).
    retries: BinaryHeap<Reverse<(Instant, u64, u32)>>,
}

/// Bookkeeping touched on every ack: a plain lock, never held across an await.
#[derive(Default)]
struct Tracking {
    /// Keys handed out and not yet acked or given back.
    in_flight: HashSet<u64>,
    /// For each failed record: the ack count when it first failed. If other chunks were acked
    /// since, the pipeline works and this record is the problem (poison), not the network.
    first_failure: HashMap<u64, u64>,
}

/// What to do with records that fail again and again.
#[derive(Debug, Clone, Copy)]
pub struct PoisonPolicy {
    /// After this many failed attempts, while other chunks are acked, a record is split in two
    /// (or, holding one event, moved to the dead letters).
    pub split_after_attempts: u32,
    /// Records older than this go to the dead letters.
    pub max_age: Option<Duration>,
}

/// Where every queued key is, for [`Dispatcher::audit`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Audit {
    pub in_flight: Vec<u64>,
    pub buffered: Vec<u64>,
    pub retrying: Vec<u64>,
    pub cursor: u64,
}

impl Audit {
    /// Keys of `spool_keys` that are in none of the places (invariant 8): must be empty.
    pub fn stranded(&self, spool_keys: &[u64]) -> Vec<u64> {
        let placed: HashSet<u64> = self
            .in_flight
            .iter()
            .chain(&self.buffered)
            .chain(&self.retrying)
            .copied()
            .collect();
        spool_keys
            .iter()
            .copied()
            .filter(|k| *k < self.cursor && !placed.contains(k))
            .collect()
    }
}

/// The shared queue.
pub struct Dispatcher {
    spool: Spool,
    route: Route,
    /// Dead-letters the values that do not decode. Exactly one dispatcher of a spool does:
    /// each would otherwise release their bytes from the budget again.
    owns_damaged: bool,
    state: Mutex<State>,
    tracking: SyncMutex<Tracking>,
    /// Wakes idle connections when a retry is queued.
    requeued: Notify,
    /// Backoff and poison policy in force: a reload replaces them ([`Dispatcher::tune`]).
    tuning: SyncMutex<(Backoff, PoisonPolicy)>,
    /// Acks received from any node since start.
    acks: AtomicU64,
}

impl Dispatcher {
    /// The one dispatcher of a spool: every record.
    pub fn new(spool: Spool, backoff: Backoff, policy: PoisonPolicy) -> Self {
        Dispatcher::routed(spool, backoff, policy, Route::All, true)
    }

    /// One of several dispatchers of a spool, each with its own cursor, handing out the
    /// records `route` takes and skipping the others (they are another dispatcher's).
    pub fn routed(
        spool: Spool,
        backoff: Backoff,
        policy: PoisonPolicy,
        route: Route,
        owns_damaged: bool,
    ) -> Self {
        Dispatcher {
            spool,
            route,
            owns_damaged,
            state: Mutex::new(State {
                // Keys start at 1; the committed watch says 0 while the spool is empty.
                cursor: 1,
                buffered: VecDeque::new(),
                retries: BinaryHeap::new(),
            }),
            tracking: SyncMutex::new(Tracking::default()),
            requeued: Notify::new(),
            tuning: SyncMutex::new((backoff, policy)),
            acks: AtomicU64::new(0),
        }
    }

    fn tracking(&self) -> MutexGuard<'_, Tracking> {
        self.tracking.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn tuning(&self) -> (Backoff, PoisonPolicy) {
        *self.tuning.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Put a reload's retry settings, `split_after_attempts` and `spool.max_age` in force:
    /// for the next failure and the next record taken. Retries already waiting keep their
    /// due time.
    pub fn tune(&self, backoff: Backoff, policy: PoisonPolicy) {
        *self.tuning.lock().unwrap_or_else(|p| p.into_inner()) = (backoff, policy);
    }

    /// The backoff in force.
    pub fn backoff(&self) -> Backoff {
        self.tuning().0
    }

    /// The record left the queue for good (acked, split, dead-lettered, expired).
    fn forget(&self, key: u64) {
        let mut tracking = self.tracking();
        tracking.in_flight.remove(&key);
        tracking.first_failure.remove(&key);
    }

    /// An upstream ack deleted the record.
    pub fn acked(&self, sent: &Sent) {
        self.acks.fetch_add(1, Ordering::AcqRel);
        self.forget(sent.key);
        self.spool.delete(sent.key, sent.stored_len);
    }

    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    /// Whether `record` is past `max_age` (then it was moved to the dead letters).
    fn expire(&self, record: &StoredRecord) -> bool {
        let Some(max_age) = self.tuning().1.max_age else {
            return false;
        };
        let age = Duration::from_millis(crate::clock::now_ms().saturating_sub(record.received_ms));
        if age <= max_age {
            return false;
        }
        let reason = format!(
            "older than spool.max_age {max_age:?} after {} failed attempt(s); last error: {}",
            record.attempts,
            record.last_error.as_deref().unwrap_or("none")
        );
        self.move_to_dead_letters(record.key, record.events, record.stored_len(), reason, "");
        true
    }

    /// A record that does not decode is kept as a dead letter with the reason; the queue goes
    /// on with the next one.
    fn dead_letter_damaged(&self, damaged: DamagedRecord) {
        let reason = format!("the stored record does not decode: {}", damaged.error);
        self.move_to_dead_letters(damaged.key, 0, damaged.stored_len, reason, "");
    }

    fn move_to_dead_letters(
        &self,
        key: u64,
        events: u32,
        stored_len: u64,
        reason: String,
        node: &str,
    ) {
        tracing::error!(record = key, events, node, %reason, "moving record to dead letters");
        crate::metrics::metrics().dead_letters.inc();
        self.forget(key);
        self.spool
            .dead_letter(key, stored_len, reason, node.to_string());
    }

    fn hand_out(&self, record: StoredRecord) -> Option<Taken> {
        self.tracking().in_flight.insert(record.key);
        Some(Taken { record })
    }

    async fn read_one(
        &self,
        key: u64,
    ) -> Result<Option<Result<StoredRecord, DamagedRecord>>, SpoolError> {
        let spool = self.spool.clone();
        tokio::task::spawn_blocking(move || spool.read(key))
            .await
            .map_err(|e| SpoolError::Task(e.to_string()))?
    }

    async fn read_batch(&self, from: u64) -> Result<ReadBatch, SpoolError> {
        let spool = self.spool.clone();
        tokio::task::spawn_blocking(move || {
            spool.read_from(from, READ_AHEAD_RECORDS, READ_AHEAD_BYTES)
        })
        .await
        .map_err(|e| SpoolError::Task(e.to_string()))?
    }

    /// Take the next record to send, if one is ready now: due retries first, then new ones.
    /// On a spool error nothing moved: every record is where it was.
    pub async fn take(&self) -> Result<Option<Taken>, SpoolError> {
        let mut state = self.state.lock().await;
        if let Some(taken) = self.take_due_retry(&mut state).await? {
            return Ok(Some(taken));
        }
        if state.buffered.is_empty() {
            self.read_ahead(&mut state).await?;
        }
        while let Some(record) = state.buffered.pop_front() {
            if !self.expire(&record) {
                return Ok(self.hand_out(record));
            }
        }
        Ok(None)
    }

    async fn take_due_retry(&self, state: &mut State) -> Result<Option<Taken>, SpoolError> {
        let now = Instant::now();
        while let Some(Reverse((due, key, attempts))) = state.retries.peek().copied() {
            if due > now {
                break;
            }
            // Popped only once read: a failed read leaves it at the top of the heap.
            let found = self.read_one(key).await?;
            state.retries.pop();
            match found {
                // Deleted meanwhile (split, or acked by a late ack): nothing to resend.
                None => self.forget(key),
                Some(Err(damaged)) => self.dead_letter_damaged(damaged),
                Some(Ok(mut record)) => {
                    // The failure count on disk is written lazily; memory is ahead of it.
                    record.attempts = record.attempts.max(attempts);
                    if !self.expire(&record) {
                        return Ok(self.hand_out(record));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Read the next batch at the cursor, from the records just committed if they start there,
    /// else from redb; the cursor moves only past what was read.
    async fn read_ahead(&self, state: &mut State) -> Result<(), SpoolError> {
        let committed = *self.spool.subscribe().borrow();
        if committed < state.cursor {
            return Ok(());
        }
        let fresh = self
            .spool
            .take_fresh(state.cursor, READ_AHEAD_RECORDS, READ_AHEAD_BYTES);
        if let Some(last) = fresh.last() {
            state.cursor = last.key + 1;
            let route = self.route;
            state
                .buffered
                .extend(fresh.into_iter().filter(|r| route.takes(r.destination)));
            return Ok(());
        }
        let batch = self.read_batch(state.cursor).await?;
        state.cursor = match batch.last_key() {
            Some(last) => last + 1,
            // Everything up to `committed` was deleted meanwhile.
            None => state.cursor.max(committed + 1),
        };
        if self.owns_damaged {
            for damaged in batch.damaged {
                self.dead_letter_damaged(damaged);
            }
        }
        let route = self.route;
        state.buffered.extend(
            batch
                .records
                .into_iter()
                .filter(|r| route.takes(r.destination)),
        );
        Ok(())
    }

    /// Give a record back after a failed attempt; it is due again after a backoff delay.
    /// A record that keeps failing while other chunks are acked is split in two, or, holding
    /// a single event, moved to the dead letters: never retried silently forever. If it can be
    /// neither read back nor split now, it is retried as it is.
    pub async fn requeue(&self, record: &Sent, attempts: u32, error: &str, node: &str) {
        let acks = self.acks.load(Ordering::Acquire);
        let first = *self
            .tracking()
            .first_failure
            .entry(record.key)
            .or_insert(acks);
        let (backoff, policy) = self.tuning();
        let poisoned = attempts >= policy.split_after_attempts && acks > first;
        if poisoned && self.settle_poisoned(record, attempts, error, node).await {
            return;
        }
        let due = Instant::now() + backoff.delay(attempts);
        self.spool
            .note_failure(record.key, attempts, error.to_string());
        let mut state = self.state.lock().await;
        state.retries.push(Reverse((due, record.key, attempts)));
        self.tracking().in_flight.remove(&record.key);
        drop(state);
        self.requeued.notify_waiters();
    }

    /// Split a poisoned record or dead-letter it. Returns whether it left the queue.
    async fn settle_poisoned(&self, record: &Sent, attempts: u32, error: &str, node: &str) -> bool {
        if record.events > 1 {
            // Nodes keep no bytes of what they sent: read the record back to split it.
            let stored = match self.read_one(record.key).await {
                Ok(Some(Ok(stored))) => stored,
                Ok(Some(Err(damaged))) => {
                    self.dead_letter_damaged(damaged);
                    return true;
                }
                // Gone meanwhile (a late ack): nothing left to do.
                Ok(None) => {
                    self.forget(record.key);
                    return true;
                }
                Err(e) => {
                    tracing::warn!(record = record.key, error = %e, "cannot read a poisoned record back to split it; retrying it as it is");
                    return false;
                }
            };
            if let Some(parts) =
                split_in_two(&stored.entries.to_bytes(), stored.events, stored.signal)
            {
                return self.split(record, parts, attempts, error, node).await;
            }
        }
        let reason = format!(
            "not acked after {attempts} attempts while other chunks were acked (the aggregator drops it: chunk_size_limit? invalid event?); last error: {error}"
        );
        self.move_to_dead_letters(record.key, record.events, record.stored_len, reason, node);
        true
    }

    async fn split(
        &self,
        record: &Sent,
        parts: Vec<(u32, Bytes)>,
        attempts: u32,
        error: &str,
        node: &str,
    ) -> bool {
        tracing::warn!(record = record.key, events = record.events, attempts, node, %error,
            "record not acked after repeated attempts while other chunks were: splitting it in two");
        match self.spool.split(record.key, parts).await {
            // The parts have new keys, ahead of the cursor.
            Ok(Ok(_)) => {
                crate::metrics::metrics().splits.inc();
                self.forget(record.key);
                self.requeued.notify_waiters();
                true
            }
            Ok(Err(e)) => {
                tracing::warn!(record = record.key, error = %e, "cannot split a poisoned record; retrying it as it is");
                false
            }
            Err(_) => {
                tracing::warn!(
                    record = record.key,
                    "spool writer gone while splitting a poisoned record; retrying it as it is"
                );
                false
            }
        }
    }

    /// Make every record waiting for a retry due now (`ackgate spool retry`). Returns how many.
    pub async fn retry_now(&self) -> usize {
        let mut state = self.state.lock().await;
        let now = Instant::now();
        let waiting: Vec<_> = state.retries.drain().collect();
        let count = waiting.len();
        state.retries = waiting
            .into_iter()
            .map(|Reverse((_, key, attempts))| Reverse((now, key, attempts)))
            .collect();
        drop(state);
        self.requeued.notify_waiters();
        count
    }

    /// Give back a record that was sent but is not a failure: its node was removed by a
    /// reload and gave up waiting for the ack. Due at once, attempts unchanged, no backoff:
    /// another node sends it now (with the same chunk id).
    pub async fn give_back(&self, record: &Sent) {
        let mut state = self.state.lock().await;
        state
            .retries
            .push(Reverse((Instant::now(), record.key, record.attempts)));
        self.tracking().in_flight.remove(&record.key);
        drop(state);
        self.requeued.notify_waiters();
    }

    /// Give a record back untouched (taken but never sent, e.g. during shutdown).
    pub async fn put_back(&self, record: StoredRecord) {
        let mut state = self.state.lock().await;
        state
            .retries
            .push(Reverse((Instant::now(), record.key, record.attempts)));
        self.tracking().in_flight.remove(&record.key);
        self.requeued.notify_waiters();
    }

    /// Where every key is now (invariant 8): compare with [`Spool::keys`] once the spool is
    /// flushed, with [`Audit::stranded`].
    pub async fn audit(&self) -> Audit {
        let state = self.state.lock().await;
        let mut in_flight: Vec<u64> = self.tracking().in_flight.iter().copied().collect();
        in_flight.sort_unstable();
        Audit {
            in_flight,
            buffered: state.buffered.iter().map(|r| r.key).collect(),
            retrying: state
                .retries
                .iter()
                .map(|Reverse((_, key, _))| *key)
                .collect(),
            cursor: state.cursor,
        }
    }

    /// Wait until [`Dispatcher::take`] may have something: a new commit, a requeue, or a
    /// retry falling due.
    pub async fn wait_for_work(&self, committed: &mut watch::Receiver<u64>) {
        loop {
            let requeued = self.requeued.notified();
            let next_due = {
                let state = self.state.lock().await;
                if !state.buffered.is_empty() || *committed.borrow_and_update() >= state.cursor {
                    return;
                }
                match state.retries.peek() {
                    Some(Reverse((due, _, _))) if *due <= Instant::now() => return,
                    Some(Reverse((due, _, _))) => Some(*due),
                    None => None,
                }
            };
            tokio::select! {
                changed = committed.changed() => {
                    if changed.is_err() {
                        // The spool is gone: nothing will ever arrive.
                        std::future::pending::<()>().await;
                    }
                }
                _ = requeued => {}
                _ = crate::clock::sleep_until_opt(next_due) => {}
            }
        }
    }
}

/// What the dispatcher keeps of a record once its bytes are on the wire. A retry or a split
/// reads the record back from the spool, so a node holds no copy of the bytes it has in flight
/// and memory does not grow with the window (bandwidth × RTT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    pub key: u64,
    pub events: u32,
    pub attempts: u32,
    /// Bytes the record takes in the spool budget, released by its delete.
    pub stored_len: u64,
    /// Entry bytes sent, for the window's byte bound.
    pub entries_len: usize,
    /// Where its sender was going (transparent mode), for the per-destination counts.
    pub destination: Option<SocketAddr>,
}

impl Sent {
    pub fn of(record: &StoredRecord) -> Sent {
        Sent {
            key: record.key,
            events: record.events,
            attempts: record.attempts,
            stored_len: record.stored_len(),
            entries_len: record.entries.len(),
            destination: record.destination,
        }
    }
}

/// Cut concatenated entries (or a metrics/traces payload's contexts) into two runs of about
/// half the events each.
fn split_in_two(entries: &Bytes, events: u32, signal: Signal) -> Option<Vec<(u32, Bytes)>> {
    let half = events / 2;
    let mut pos = 0usize;
    for index in 0..half {
        let rest = &entries[pos..];
        pos += match signal {
            Signal::Logs => crate::forward::entries::entry_len(rest, index, MAX_DEPTH).ok()?,
            Signal::Metrics | Signal::Traces => value_len(rest, MAX_DEPTH).ok().flatten()?,
        };
    }
    if pos == 0 || pos >= entries.len() {
        return None;
    }
    Some(vec![
        (half, entries.slice(..pos)),
        (events - half, entries.slice(pos..)),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::fault::Faults;
    use crate::spool::testing::{append, append_to, config, entry, overwrite_record, stop, WAIT};
    use crate::spool::SpoolWriter;
    use tokio::time::timeout;

    const QUICK: Backoff = Backoff {
        initial: Duration::from_millis(1),
        max: Duration::from_millis(2),
    };

    fn dispatcher(spool: &Spool, split_after_attempts: u32) -> Dispatcher {
        let policy = PoisonPolicy {
            split_after_attempts,
            max_age: None,
        };
        Dispatcher::new(spool.clone(), QUICK, policy)
    }

    /// Spool `n` records of `events` entries each (tags differ, so none are merged).
    async fn spool_records(spool: &Spool, n: u8, events: u32) -> Vec<u64> {
        let mut keys = Vec::new();
        for i in 0..n {
            let entries = entry(i).repeat(events as usize);
            keys.push(
                append(spool, &format!("t{i}"), &entries, events)
                    .await
                    .unwrap(),
            );
        }
        keys
    }

    /// Invariant 8, checked: with the spool flushed, every key it holds has a place.
    async fn assert_every_record_placed(dispatcher: &Dispatcher) {
        timeout(WAIT, dispatcher.spool().flush())
            .await
            .unwrap()
            .unwrap();
        let spool = dispatcher.spool().clone();
        let keys = tokio::task::spawn_blocking(move || spool.keys())
            .await
            .unwrap()
            .unwrap();
        let audit = dispatcher.audit().await;
        assert_eq!(
            audit.stranded(&keys),
            Vec::<u64>::new(),
            "stranded records: {audit:?}"
        );
    }

    async fn take_some(dispatcher: &Dispatcher) -> StoredRecord {
        let taken = timeout(WAIT, dispatcher.take()).await.unwrap().unwrap();
        taken.expect("a record is due").record
    }

    /// Take until a due record comes (retries fall due after QUICK's few ms), waiting on the
    /// dispatcher's own event between tries (a commit, a requeue, a retry falling due), as a
    /// node does.
    async fn take_eventually(dispatcher: &Dispatcher) -> StoredRecord {
        timeout(WAIT, take_until_empty(dispatcher))
            .await
            .unwrap()
            .expect("a record is left to take")
    }

    /// The next due record, or `None` once the spool holds none: a record the dispatcher
    /// dead-letters inside `take` (a single event that failed again) leaves the spool by a lazy
    /// commit, flushed here before looking.
    async fn take_until_empty(dispatcher: &Dispatcher) -> Option<StoredRecord> {
        let mut committed = dispatcher.spool().subscribe();
        loop {
            if let Some(taken) = dispatcher.take().await.unwrap() {
                return Some(taken.record);
            }
            dispatcher.spool().flush().await.unwrap();
            if dispatcher.spool().keys().unwrap().is_empty() {
                return None;
            }
            dispatcher.wait_for_work(&mut committed).await;
        }
    }

    async fn drain(dispatcher: &Dispatcher) -> Vec<StoredRecord> {
        let mut all = Vec::new();
        while let Some(taken) = timeout(WAIT, dispatcher.take()).await.unwrap().unwrap() {
            dispatcher.acked(&Sent::of(&taken.record));
            all.push(taken.record);
        }
        all
    }

    async fn reopen_cold(
        dir: &tempfile::TempDir,
        writer: SpoolWriter,
        faults: &std::sync::Arc<Faults>,
    ) -> (Spool, SpoolWriter) {
        stop(writer).await;
        Spool::open_faulty(&config(dir), faults.clone()).unwrap()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_read_ahead_that_fails_leaves_the_cursor_where_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let faults = Faults::new();
        let (spool, writer) = Spool::open_faulty(&config(&dir), faults.clone()).unwrap();
        spool_records(&spool, 6, 20_000).await;
        drop(spool);
        // A cold cache, so that reads reach the failing file.
        let (spool, writer) = reopen_cold(&dir, writer, &faults).await;
        let d = dispatcher(&spool, 10);
        faults.fail_reads(libc::EIO);
        // The spool retries its reopen for a few seconds, then the read reports failure.
        let failed = timeout(WAIT, d.take()).await.unwrap();
        assert!(
            failed.is_err(),
            "a read on a failing disk must fail: {failed:?}"
        );
        assert!(faults.failures() > 0);
        let audit = d.audit().await;
        assert_eq!((audit.cursor, audit.buffered.len()), (1, 0), "{audit:?}");
        faults.fail_reads(0);
        assert_every_record_placed(&d).await;
        assert_eq!(drain(&d).await.len(), 6, "every record still goes out");
        stop(writer).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_retry_whose_read_fails_stays_in_the_heap() {
        let dir = tempfile::tempdir().unwrap();
        let faults = Faults::new();
        let (spool, writer) = Spool::open_faulty(&config(&dir), faults.clone()).unwrap();
        spool_records(&spool, 3, 20_000).await;
        drop(spool);
        let (spool, writer) = reopen_cold(&dir, writer, &faults).await;
        let d = dispatcher(&spool, 10);
        let mut taken = Vec::new();
        for _ in 0..3 {
            taken.push(take_some(&d).await);
        }
        for record in &taken {
            d.requeue(&Sent::of(record), 1, "connection reset", "agg")
                .await;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        // With the retries due (each record is larger than the cache, so the first is no
        // longer in it).
        let audit_before = d.audit().await;
        assert_eq!(audit_before.retrying.len(), 3);
        faults.fail_reads(libc::EIO);
        let result = timeout(WAIT, d.take()).await.unwrap();
        faults.fail_reads(0);
        // Whether the read failed (the heap is untouched) or waited out the fault, nothing is
        // lost from the queue.
        if result.is_err() {
            assert_eq!(
                d.audit().await.retrying.len(),
                3,
                "a failed read popped a retry"
            );
        }
        assert_every_record_placed(&d).await;
        let mut left = 3 - usize::from(matches!(result, Ok(Some(_))));
        if let Ok(Some(t)) = result {
            d.acked(&Sent::of(&t.record));
        }
        while left > 0 {
            let record = take_eventually(&d).await;
            d.acked(&Sent::of(&record));
            left -= 1;
        }
        assert_every_record_placed(&d).await;
        stop(writer).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_poisoned_record_whose_split_fails_is_retried_then_split() {
        let dir = tempfile::tempdir().unwrap();
        let faults = Faults::new();
        let (spool, writer) = Spool::open_faulty(&config(&dir), faults.clone()).unwrap();
        spool_records(&spool, 2, 4).await;
        let d = dispatcher(&spool, 1);
        let poison = take_some(&d).await;
        let good = take_some(&d).await;
        d.requeue(&Sent::of(&poison), 1, "not acked", "agg").await;
        d.acked(&Sent::of(&good));
        let again = take_eventually(&d).await;
        assert_eq!(again.key, poison.key);
        // Now it counts as poison (others were acked since it first failed): its split is
        // committed while the disk fails, so the split fails, and it must stay queued.
        faults.fail_writes(libc::EIO);
        d.requeue(&Sent::of(&again), 2, "not acked", "agg").await;
        faults.fail_writes(0);
        assert_every_record_placed(&d).await;
        let audit = d.audit().await;
        assert!(
            audit.retrying.contains(&poison.key) || audit.cursor <= poison.key || {
                // Or the split went through after all (the failure hit another write).
                let spool = spool.clone();
                let keys = tokio::task::spawn_blocking(move || spool.keys())
                    .await
                    .unwrap()
                    .unwrap();
                !keys.contains(&poison.key)
            },
            "{audit:?}"
        );
        // Fails again with the disk healthy: split in two, the parts carry all 4 events.
        let mut events = 0;
        let mut guard = 0;
        while events < 4 {
            guard += 1;
            assert!(guard < 100, "never split");
            let record = take_eventually(&d).await;
            if record.key == poison.key {
                d.requeue(&Sent::of(&record), 3, "not acked", "agg").await;
            } else {
                events += record.events;
                d.acked(&Sent::of(&record));
            }
        }
        assert_eq!(events, 4);
        assert!(d.tracking().first_failure.is_empty(), "first_failure leaks");
        assert_every_record_placed(&d).await;
        stop(writer).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_damaged_record_is_dead_lettered_and_the_others_flow() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(&dir);
        let (spool, writer) = Spool::open(&config).unwrap();
        let keys = spool_records(&spool, 5, 3).await;
        drop(spool);
        stop(writer).await;
        overwrite_record(&config.path, keys[2], &[1, 2, 3]);
        let (spool, writer) = Spool::open(&config).unwrap();
        let d = dispatcher(&spool, 10);
        let delivered: Vec<u64> = drain(&d).await.iter().map(|r| r.key).collect();
        assert_eq!(delivered, vec![keys[0], keys[1], keys[3], keys[4]]);
        timeout(WAIT, spool.flush()).await.unwrap().unwrap();
        let dead = spool.dead_letters(0, 10).unwrap();
        assert_eq!(dead.len(), 1);
        assert!(
            dead[0].reason.contains("does not decode"),
            "{}",
            dead[0].reason
        );
        assert_eq!(dead[0].payload, vec![1, 2, 3]);
        assert!(spool.keys().unwrap().is_empty());
        stop(writer).await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn an_ack_forgets_the_first_failure() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, writer) = Spool::open(&config(&dir)).unwrap();
        spool_records(&spool, 1, 2).await;
        let d = dispatcher(&spool, 5);
        let record = take_some(&d).await;
        d.requeue(&Sent::of(&record), 1, "reset", "agg").await;
        let again = take_eventually(&d).await;
        d.acked(&Sent::of(&again));
        assert!(d.tracking().first_failure.is_empty());
        assert!(d.tracking().in_flight.is_empty());
        stop(writer).await;
    }

    /// Random takes, requeues, acks and put-backs: after each step every record has a place.
    #[tokio::test(flavor = "multi_thread")]
    async fn every_record_has_a_place_whatever_the_order_of_events() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, writer) = Spool::open(&config(&dir)).unwrap();
        spool_records(&spool, 20, 2).await;
        let d = dispatcher(&spool, 3);
        let mut rng = rand::rng();
        let mut held: Vec<StoredRecord> = Vec::new();
        for step in 0..300 {
            match rng.random_range(0..4) {
                0 | 1 => {
                    if let Some(t) = timeout(WAIT, d.take()).await.unwrap().unwrap() {
                        held.push(t.record);
                    }
                }
                2 if !held.is_empty() => {
                    let r = held.swap_remove(rng.random_range(0..held.len()));
                    d.requeue(&Sent::of(&r), r.attempts + 1, "random", "agg")
                        .await;
                }
                3 if !held.is_empty() => {
                    let r = held.swap_remove(rng.random_range(0..held.len()));
                    if rng.random_bool(0.8) {
                        d.acked(&Sent::of(&r));
                    } else {
                        d.put_back(r).await;
                    }
                }
                _ => {}
            }
            if step % 10 == 0 {
                assert_every_record_placed(&d).await;
            }
        }
        for r in held {
            d.acked(&Sent::of(&r));
        }
        while let Some(r) = timeout(WAIT, take_until_empty(&d)).await.unwrap() {
            d.acked(&Sent::of(&r));
        }
        assert_every_record_placed(&d).await;
        stop(writer).await;
    }

    #[test]
    fn split_in_two_cuts_on_entry_boundaries() {
        let entry = [0x92u8, 0x01, 0x81, 0xa1, b'a', 0x02];
        let entries = Bytes::from(entry.repeat(5));
        let parts = split_in_two(&entries, 5, Signal::Logs).unwrap();
        assert_eq!(parts[0].0, 2);
        assert_eq!(parts[0].1.len(), 12);
        assert_eq!(parts[1].0, 3);
        assert_eq!(parts[1].1.len(), 18);
        let one = Bytes::from(entry.to_vec());
        assert!(split_in_two(&one, 1, Signal::Logs).is_none());
    }

    #[test]
    fn metrics_payloads_split_between_contexts() {
        // Three contexts (maps), not [time, record] pairs.
        let contexts = Bytes::from_static(&[0x81, 0xa1, b'a', 0x01, 0x80, 0x81, 0xa1, b'b', 0x02]);
        let parts = split_in_two(&contexts, 3, Signal::Metrics).unwrap();
        assert_eq!(
            (parts[0].0, &parts[0].1[..]),
            (1, &[0x81, 0xa1, b'a', 0x01][..])
        );
        assert_eq!(parts[1].0, 2);
        assert_eq!(&parts[1].1[..], &[0x80, 0x81, 0xa1, b'b', 0x02][..]);
        assert!(split_in_two(&contexts, 3, Signal::Logs).is_none());
    }

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        let backoff = Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
        };
        for _ in 0..100 {
            let first = backoff.delay(1);
            assert!(first >= Duration::from_millis(500) && first <= Duration::from_secs(1));
            let fourth = backoff.delay(4);
            assert!(fourth >= Duration::from_secs(4) && fourth <= Duration::from_secs(8));
            let late = backoff.delay(40);
            assert!(late >= Duration::from_secs(30) && late <= Duration::from_secs(60));
        }
    }

    fn routed(spool: &Spool, route: Route, owns_damaged: bool) -> Dispatcher {
        let policy = PoisonPolicy {
            split_after_attempts: 4,
            max_age: None,
        };
        Dispatcher::routed(spool.clone(), QUICK, policy, route, owns_damaged)
    }

    /// Take until nothing more comes within a few cursor steps; the keys taken.
    async fn take_all(dispatcher: &Dispatcher) -> Vec<u64> {
        let mut keys = Vec::new();
        let mut empty_takes = 0;
        while empty_takes < 8 {
            match timeout(WAIT, dispatcher.take()).await.unwrap().unwrap() {
                Some(taken) => keys.push(taken.record.key),
                None => empty_takes += 1,
            }
        }
        keys
    }

    #[tokio::test]
    async fn routed_dispatchers_take_only_their_records_and_a_stalled_one_holds_back_none() {
        let dir = tempfile::tempdir().unwrap();
        let (spool, writer) = Spool::open(&config(&dir)).unwrap();
        let a: SocketAddr = "10.0.0.1:24224".parse().unwrap();
        let b: SocketAddr = "[2001:db8::2]:24224".parse().unwrap();
        // More of A's records than one read-ahead batch, then B's and undirected ones among
        // them: B must not wait for A, whose dispatcher never takes anything.
        let mut want_a = Vec::new();
        let mut want_b = Vec::new();
        let mut want_none = Vec::new();
        for i in 0..(READ_AHEAD_RECORDS as u8 * 2 + 5) {
            let tag = format!("t{i}");
            let (destination, list) = match i % 10 {
                3 => (Some(b), &mut want_b),
                7 => (None, &mut want_none),
                _ => (Some(a), &mut want_a),
            };
            list.push(
                append_to(&spool, destination, &tag, &entry(i), 1)
                    .await
                    .unwrap(),
            );
        }
        let to_b = routed(&spool, Route::To(b), false);
        let undirected = routed(&spool, Route::Undirected, true);
        assert_eq!(take_all(&to_b).await, want_b);
        assert_eq!(take_all(&undirected).await, want_none);
        let to_a = routed(&spool, Route::To(a), false);
        let taken_a = take_all(&to_a).await;
        assert_eq!(taken_a, want_a);
        // Every key is placed with the dispatcher of its route.
        for (dispatcher, keys) in [
            (&to_a, &want_a),
            (&to_b, &want_b),
            (&undirected, &want_none),
        ] {
            let audit = dispatcher.audit().await;
            assert_eq!(audit.stranded(keys), Vec::<u64>::new(), "{audit:?}");
        }
        // The records kept their destination through the spool.
        let stored = tokio::task::spawn_blocking({
            let spool = spool.clone();
            let key = want_b[0];
            move || spool.read(key)
        })
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .unwrap();
        assert_eq!(stored.destination, Some(b));
        stop(writer).await;
    }
}
