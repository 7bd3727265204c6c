//! The queue of records waiting for an upstream ack, shared by every node connection.
//!
//! Memory holds only what is in flight: records are read from the spool in key order through a
//! cursor, a small batch at a time; a record whose attempt failed goes back as a (due time,
//! key) pair and is read again from the spool when due. At start-up the cursor is 0, so every
//! record left in the spool is sent again with its original chunk id (invariant 3). A record is
//! handed to one connection at a time, and deleted only when that connection sees its ack
//! (invariant 2).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;

use rand::Rng;
use tokio::sync::{watch, Mutex, Notify};
use tokio::time::Instant;

use crate::forward::msgpack::value_len;
use crate::forward::Signal;
use crate::spool::{Spool, SpoolError, StoredRecord};

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

/// A record handed to a node connection.
#[derive(Debug, Clone)]
pub struct Taken {
    pub record: StoredRecord,
}

struct State {
    /// Next key to read from the spool.
    cursor: u64,
    /// Records read ahead from the spool, in key order.
    buffered: VecDeque<StoredRecord>,
    /// Failed records waiting for their retry time: (due, key, failed attempts so far).
    retries: BinaryHeap<Reverse<(Instant, u64, u32)>>,
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

/// The shared queue.
pub struct Dispatcher {
    spool: Spool,
    state: Mutex<State>,
    /// Wakes idle connections when a retry is queued.
    requeued: Notify,
    pub backoff: Backoff,
    policy: PoisonPolicy,
    /// Acks received from any node since start.
    acks: AtomicU64,
}

impl Dispatcher {
    pub fn new(spool: Spool, backoff: Backoff, policy: PoisonPolicy) -> Self {
        Dispatcher {
            spool,
            state: Mutex::new(State {
                // Keys start at 1; the committed watch says 0 while the spool is empty.
                cursor: 1,
                buffered: VecDeque::new(),
                retries: BinaryHeap::new(),
                first_failure: HashMap::new(),
            }),
            requeued: Notify::new(),
            backoff,
            policy,
            acks: AtomicU64::new(0),
        }
    }

    /// An upstream ack deleted the record.
    pub fn acked(&self, sent: &Sent) {
        self.acks.fetch_add(1, Ordering::AcqRel);
        self.spool.delete(sent.key, sent.stored_len);
    }

    /// Whether `record` is past `max_age` (then it was moved to the dead letters).
    fn expire(&self, record: &StoredRecord) -> bool {
        let Some(max_age) = self.policy.max_age else {
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
        tracing::error!(record = record.key, events = record.events, %reason, "moving record to dead letters");
        crate::metrics::metrics().dead_letters.inc();
        self.spool
            .dead_letter(record.key, record.stored_len(), reason, String::new());
        true
    }

    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    /// Take the next record to send, if one is ready now: due retries first, then new ones.
    pub async fn take(&self) -> Result<Option<Taken>, SpoolError> {
        let mut state = self.state.lock().await;
        let now = Instant::now();
        while let Some(Reverse((due, key, attempts))) = state.retries.peek().copied() {
            if due > now {
                break;
            }
            state.retries.pop();
            let spool = self.spool.clone();
            let record = tokio::task::spawn_blocking(move || spool.read(key))
                .await
                .map_err(|e| SpoolError::Read(e.to_string()))??;
            match record {
                Some(mut record) => {
                    // The failure count on disk is written lazily; memory is ahead of it.
                    record.attempts = record.attempts.max(attempts);
                    if self.expire(&record) {
                        state.first_failure.remove(&key);
                        continue;
                    }
                    return Ok(Some(Taken { record }));
                }
                // Deleted meanwhile (acked by a late ack on another path): nothing to resend.
                None => continue,
            }
        }
        if state.buffered.is_empty() {
            let committed = *self.spool.subscribe().borrow();
            if committed >= state.cursor {
                let spool = self.spool.clone();
                let from = state.cursor;
                let batch = tokio::task::spawn_blocking(move || {
                    spool.read_from(from, READ_AHEAD_RECORDS, READ_AHEAD_BYTES)
                })
                .await
                .map_err(|e| SpoolError::Read(e.to_string()))??;
                if let Some(last) = batch.last() {
                    state.cursor = last.key + 1;
                } else {
                    state.cursor = state.cursor.max(committed + 1);
                }
                state.buffered.extend(batch);
            }
        }
        while let Some(record) = state.buffered.pop_front() {
            if !self.expire(&record) {
                return Ok(Some(Taken { record }));
            }
        }
        Ok(None)
    }

    /// Give a record back after a failed attempt; it is due again after a backoff delay.
    /// A record that keeps failing while other chunks are acked is split in two, or, holding
    /// a single event, moved to the dead letters: never retried silently forever.
    pub async fn requeue(&self, record: &Sent, attempts: u32, error: &str, node: &str) {
        let acks = self.acks.load(Ordering::Acquire);
        let mut state = self.state.lock().await;
        let first = *state.first_failure.entry(record.key).or_insert(acks);
        let poisoned = attempts >= self.policy.split_after_attempts && acks > first;
        if poisoned {
            state.first_failure.remove(&record.key);
            drop(state);
            if record.events > 1 {
                // Nodes keep no bytes of what they sent: read the record back to split it.
                let spool = self.spool.clone();
                let key = record.key;
                let stored = tokio::task::spawn_blocking(move || spool.read(key))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|read| read.map_err(|e| e.to_string()));
                let parts = match stored {
                    Ok(Some(stored)) => split_in_two(&stored.entries, stored.events, stored.signal),
                    // Acked meanwhile by a late ack: nothing left to do.
                    Ok(None) => return,
                    Err(e) => {
                        tracing::warn!(record = key, error = %e, "cannot read a poisoned record back to split it; retrying it as it is");
                        None
                    }
                };
                if let Some(parts) = parts {
                    tracing::warn!(record = record.key, events = record.events, attempts, node, %error,
                        "record not acked after repeated attempts while other chunks were: splitting it in two");
                    crate::metrics::metrics().splits.inc();
                    let _ = self.spool.split(record.key, parts).await;
                    self.requeued.notify_waiters();
                    return;
                }
            }
            let reason = format!(
                "not acked after {attempts} attempts while other chunks were acked (the aggregator drops it: chunk_size_limit? invalid event?); last error: {error}"
            );
            tracing::error!(record = record.key, events = record.events, node, %reason, "moving record to dead letters");
            crate::metrics::metrics().dead_letters.inc();
            self.spool
                .dead_letter(record.key, record.stored_len, reason, node.to_string());
            return;
        }
        let due = Instant::now() + self.backoff.delay(attempts);
        self.spool
            .note_failure(record.key, attempts, error.to_string());
        state.retries.push(Reverse((due, record.key, attempts)));
        drop(state);
        self.requeued.notify_waiters();
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

    /// Give a record back untouched (taken but never sent, e.g. during shutdown).
    pub async fn put_back(&self, record: StoredRecord) {
        let mut state = self.state.lock().await;
        state
            .retries
            .push(Reverse((Instant::now(), record.key, record.attempts)));
        self.requeued.notify_waiters();
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
                _ = async {
                    match next_due {
                        Some(due) => tokio::time::sleep_until(due).await,
                        None => std::future::pending().await,
                    }
                } => {}
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
}

impl Sent {
    pub fn of(record: &StoredRecord) -> Sent {
        Sent {
            key: record.key,
            events: record.events,
            attempts: record.attempts,
            stored_len: record.stored_len(),
            entries_len: record.entries.len(),
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
            Signal::Logs => crate::forward::entries::entry_len(rest, index, 64).ok()?,
            Signal::Metrics | Signal::Traces => value_len(rest, 64).ok().flatten()?,
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
}
