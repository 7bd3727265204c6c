//! Event accounting: what was handed to ackgate against what arrived upstream.
//!
//! - Harness events ([`event`]) are `[uint32 time, {"id": u64, "pad": str}]` with an id unique
//!   in their test ([`Ids`]), so that the accounting can tell which events arrived, how often
//!   and under which upstream chunk id.
//! - [`Ledger`]: what the senders of [`Senders`](super::Senders) handed over. Ack-requesting
//!   senders mark events *acked* once ackgate's ack arrives; legacy senders (fluentd v0.10) only
//!   know that their writes returned, so for them the promise starts at ackgate's commit,
//!   measured separately (metrics or the spool).
//! - [`Seen`]: what arrived upstream (unique ids, duplicates, chunk ids), fed by the test
//!   [`Aggregator`](super::Aggregator) or by an `ackgate receive` child
//!   ([`ReceiveProc`](super::ReceiveProc)).
//! - For tests that compare raw entry bytes instead of ids: [`assert_same_events`] (a multiset,
//!   exactly once) and [`assert_same_event_set`] (at least once).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use ackgate::forward::entries::entry_len;

use super::msgpack::{hex, mp_str, DEPTH};
use super::requests::TS;
use super::{lock, wait_for_condition};

// ------------------------------------------------------------------------------------------------
// Harness events

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

/// Event ids unique within a test: taken from one counter ([`Ids::take`]), or per sender
/// thread as (sender, seq) ([`Ids::sender`], [`SenderIds`]), both from the same `Ids`
/// without overlap.
#[derive(Default)]
pub struct Ids {
    next: AtomicU64,
    senders: AtomicU64,
}

/// An id made by [`SenderIds`] is `sender << SENDER_SHIFT | seq`: 2^40 events per sender, and
/// ids taken from the plain counter stay below 2^40 (sender 0).
pub const SENDER_SHIFT: u32 = 40;

impl Ids {
    pub fn take(&self, n: usize) -> Vec<u64> {
        let first = self.next.fetch_add(n as u64, Ordering::Relaxed) + 1;
        (first..first + n as u64).collect()
    }

    /// The ids of one more sender thread (numbered from 1).
    pub fn sender(&self) -> SenderIds {
        SenderIds {
            sender: self.senders.fetch_add(1, Ordering::Relaxed) + 1,
            seq: 0,
        }
    }
}

/// The ids of one sender thread, `(sender, seq)` with seq counting from 1, so that what arrives
/// says which sender wrote it and where in its stream.
#[derive(Debug)]
pub struct SenderIds {
    pub sender: u64,
    seq: u64,
}

impl SenderIds {
    pub fn take(&mut self, n: usize) -> Vec<u64> {
        let first = self.seq + 1;
        self.seq += n as u64;
        (first..=self.seq)
            .map(|seq| (self.sender << SENDER_SHIFT) | seq)
            .collect()
    }
}

/// The sender number of an id made by [`SenderIds`] (0 for [`Ids::take`]'s).
pub fn sender_of(id: u64) -> u64 {
    id >> SENDER_SHIFT
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
    /// For each written legacy event, the [`Target`](super::Target) generation (ackgate
    /// incarnation) it was written to.
    pub legacy_gen: HashMap<u64, u64>,
    /// Legacy chunks sent again after a refused connect or a failed write (with
    /// [`Load::retry_failed`](super::Load), as fluentd v0.10 keeps its buffer).
    pub legacy_retries: u64,
    /// Events of persistent no-ack senders (one long-lived connection, never reading) whose
    /// write returned.
    pub persistent_written: HashSet<u64>,
    /// Events of persistent senders given up on (never written within `give_up_after`).
    pub persistent_failed: HashSet<u64>,
    /// Writes that failed on a persistent sender's established connection: the resets it saw
    /// (each followed by a reconnect and the same request again), by error kind.
    pub persistent_resets: std::collections::BTreeMap<String, u64>,
    /// Connects of persistent senders that failed (ackgate not listening).
    pub persistent_connect_failures: u64,
    /// Attempts of acking senders that ended without the ack (closed, reset, timed out, failed
    /// to connect), by reason; each is followed by the same chunk again.
    pub ack_attempts_failed: std::collections::BTreeMap<String, u64>,
}

impl LedgerState {
    /// Every reset persistent senders saw.
    pub fn resets(&self) -> u64 {
        self.persistent_resets.values().sum()
    }

    /// Every attempt of an acking sender that got no ack.
    pub fn acks_missing(&self) -> u64 {
        self.ack_attempts_failed.values().sum()
    }
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

    pub(crate) fn with(&self, f: impl FnOnce(&mut LedgerState)) {
        f(&mut lock(&self.state));
        self.changed.notify_all();
    }

    /// Wait until at least `n` events are acked, at most `timeout`; false on timeout.
    pub fn wait_acked(&self, n: usize, timeout: Duration) -> bool {
        wait_for_condition(&self.state, &self.changed, timeout, |s| s.acked.len() >= n).1
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

    /// Whether every one of `ids` arrived at least `times` times.
    pub fn each_at_least(&self, ids: &HashSet<u64>, times: u32) -> bool {
        ids.iter()
            .all(|id| self.counts.get(id).copied().unwrap_or(0) >= times)
    }
}

/// What arrived, with a condition variable signalled on every change.
#[derive(Default)]
pub struct Seen {
    state: Mutex<SeenState>,
    changed: Condvar,
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
                add_chunk(&mut s, chunk, ids);
            }
        }
        self.changed.notify_all();
    }

    pub(crate) fn add_bad_line(&self) {
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
}

fn add_chunk(s: &mut SeenState, chunk: &str, ids: &[u64]) {
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

/// The first `n` of a sorted id list, for messages.
pub fn first<T: std::fmt::Debug>(v: &[T], n: usize) -> String {
    format!(
        "{:?}{}",
        &v[..v.len().min(n)],
        if v.len() > n { " …" } else { "" }
    )
}

// ------------------------------------------------------------------------------------------------
// Comparing raw events

/// Assert two collections of raw events are equal as multisets, with a readable diff.
pub fn assert_same_events(expected: &[Vec<u8>], got: &[Vec<u8>], context: &str) {
    // Sorting slices (memcmp) is cheap even in a debug build; the diff below only runs when
    // they differ.
    fn sorted(events: &[Vec<u8>]) -> Vec<&[u8]> {
        let mut v: Vec<&[u8]> = events.iter().map(|e| e.as_slice()).collect();
        v.sort_unstable();
        v
    }
    if sorted(expected) == sorted(got) {
        return;
    }
    let count = |events: &[Vec<u8>]| {
        let mut m: HashMap<Vec<u8>, i64> = HashMap::new();
        for e in events {
            *m.entry(e.clone()).or_insert(0) += 1;
        }
        m
    };
    let (want, have) = (count(expected), count(got));
    let surplus = |a: &HashMap<Vec<u8>, i64>, b: &HashMap<Vec<u8>, i64>| {
        let mut out: Vec<(String, i64)> = a
            .iter()
            .filter(|(e, n)| b.get(*e).copied().unwrap_or(0) < **n)
            .map(|(e, n)| (hex(e), n - b.get(e).copied().unwrap_or(0)))
            .collect();
        out.truncate(5);
        out
    };
    let (missing, extra) = (surplus(&want, &have), surplus(&have, &want));
    if !missing.is_empty() || !extra.is_empty() {
        panic!(
            "{context}: events differ: expected {} got {}; first missing (hex, count): {missing:?}; first extra/duplicated: {extra:?}",
            expected.len(),
            got.len()
        );
    }
}

/// Assert every expected event arrived (at least once) and nothing else did: at-least-once
/// delivery where a retry may legitimately duplicate.
pub fn assert_same_event_set(expected: &[Vec<u8>], got: &[Vec<u8>], context: &str) {
    let want: HashSet<&Vec<u8>> = expected.iter().collect();
    let have: HashSet<&Vec<u8>> = got.iter().collect();
    let missing: Vec<String> = want.difference(&have).take(5).map(|e| hex(e)).collect();
    let extra: Vec<String> = have.difference(&want).take(5).map(|e| hex(e)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{context}: {} expected distinct events, {} received distinct; missing {missing:?}; unexpected {extra:?}",
        want.len(),
        have.len()
    );
}
