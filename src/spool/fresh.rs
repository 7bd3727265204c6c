//! Records just committed, kept in memory for a moment so that the dispatcher sends them from
//! the bytes the writer already built instead of reading them back from redb.
//!
//! Only committed records are published (after the commit, before the dispatcher hears of it),
//! so what is sent from here is byte for byte what is in the file (invariant 6), with the same
//! chunk id (invariant 3). Bounded in bytes, and kept only while the dispatcher takes from here:
//! when it is behind or idle (an aggregator down, a backlog draining), records are simply not
//! kept (nor the request buffers they point into) and are read from redb as before. The
//! dispatcher takes records only from the exact key its cursor is at, in key order, so a
//! record that was not kept (or a split part, or a record a reopen found on disk) is never
//! skipped: the first gap sends the cursor back to redb (invariant 8).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::record::StoredRecord;

/// Entry bytes of committed records kept for the dispatcher.
pub const FRESH_MAX_BYTES: usize = 4 << 20;
/// Records are kept only if the dispatcher took from here this recently.
pub const FRESH_IDLE: Duration = Duration::from_secs(1);

#[derive(Default)]
pub(super) struct Fresh {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// In key order.
    records: VecDeque<StoredRecord>,
    bytes: usize,
    /// When the dispatcher last asked for records.
    last_take: Option<Instant>,
}

impl Fresh {
    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keep the records of a commit (in key order) while they fit.
    pub(super) fn publish(&self, records: Vec<StoredRecord>) {
        let mut inner = self.inner();
        if inner.last_take.is_none_or(|at| at.elapsed() > FRESH_IDLE) {
            // Nobody takes from here now: keep no memory for them.
            inner.records.clear();
            inner.bytes = 0;
            return;
        }
        for record in records {
            let len = record.entries.len();
            if inner.bytes + len > FRESH_MAX_BYTES {
                // The dispatcher is behind: it reads the rest from redb.
                break;
            }
            if inner
                .records
                .back()
                .is_some_and(|last| last.key >= record.key)
            {
                // Keys only grow; anything else is not ours to guess about.
                continue;
            }
            inner.bytes += len;
            inner.records.push_back(record);
        }
    }

    /// Records from key `cursor` on, consecutive keys only, up to `max_records` and about
    /// `max_bytes` (at least one). Records behind the cursor are dropped: the cursor moved past
    /// them by reading redb.
    pub(super) fn take_from(
        &self,
        cursor: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Vec<StoredRecord> {
        let mut inner = self.inner();
        inner.last_take = Some(Instant::now());
        while inner.records.front().is_some_and(|r| r.key < cursor) {
            inner.pop_front();
        }
        let mut taken = Vec::new();
        let mut bytes = 0usize;
        let mut expected = cursor;
        while taken.len() < max_records && (taken.is_empty() || bytes < max_bytes) {
            if inner.records.front().is_none_or(|r| r.key != expected) {
                break;
            }
            let Some(record) = inner.pop_front() else {
                break;
            };
            bytes += record.entries.len();
            expected += 1;
            taken.push(record);
        }
        taken
    }

    /// Entry bytes held now.
    #[cfg(test)]
    pub(super) fn bytes(&self) -> usize {
        self.inner().bytes
    }
}

impl Inner {
    fn pop_front(&mut self) -> Option<StoredRecord> {
        let record = self.records.pop_front()?;
        self.bytes -= record.entries.len();
        Some(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forward::Signal;
    use bytes::Bytes;

    fn record(key: u64, len: usize) -> StoredRecord {
        StoredRecord {
            key,
            chunk_id: [key as u8; 16],
            received_ms: 0,
            events: 1,
            signal: Signal::Logs,
            destination: None,
            tag: Bytes::from_static(b"t"),
            entries: Bytes::from(vec![0x90; len]).into(),
            attempts: 0,
            last_error: None,
        }
    }

    fn keys(records: &[StoredRecord]) -> Vec<u64> {
        records.iter().map(|r| r.key).collect()
    }

    /// A cache whose dispatcher is taking.
    fn taking() -> Fresh {
        let fresh = Fresh::default();
        assert!(fresh.take_from(1, 1, 1).is_empty());
        fresh
    }

    #[test]
    fn nothing_is_kept_until_the_dispatcher_takes_or_after_it_stopped() {
        let fresh = Fresh::default();
        fresh.publish(vec![record(1, 10)]);
        assert_eq!(fresh.bytes(), 0, "no dispatcher has asked yet");
        assert!(fresh.take_from(1, 10, 1 << 20).is_empty());
        fresh.publish(vec![record(2, 10)]);
        assert_eq!(keys(&fresh.take_from(2, 10, 1 << 20)), [2]);
        fresh.publish(vec![record(3, 10)]);
        fresh.inner().last_take = Instant::now().checked_sub(FRESH_IDLE * 2);
        fresh.publish(vec![record(4, 10)]);
        assert_eq!(
            fresh.bytes(),
            0,
            "the dispatcher stopped taking: 3 dropped, 4 not kept"
        );
    }

    #[test]
    fn records_are_taken_from_the_cursor_in_key_order_and_a_gap_stops_the_take() {
        let fresh = taking();
        fresh.publish(vec![record(5, 10), record(6, 10), record(8, 10)]);
        assert!(
            fresh.take_from(4, 10, 1 << 20).is_empty(),
            "key 4 is not here"
        );
        assert_eq!(keys(&fresh.take_from(5, 10, 1 << 20)), [5, 6]);
        assert!(
            fresh.take_from(7, 10, 1 << 20).is_empty(),
            "7 was not kept: it must come from redb, 8 must wait for it"
        );
        assert_eq!(keys(&fresh.take_from(8, 10, 1 << 20)), [8]);
        assert_eq!(fresh.bytes(), 0);
    }

    #[test]
    fn records_behind_the_cursor_are_dropped_and_limits_hold() {
        let fresh = taking();
        fresh.publish((1..=6).map(|k| record(k, 100)).collect());
        assert_eq!(keys(&fresh.take_from(3, 2, 1 << 20)), [3, 4], "max records");
        assert_eq!(
            keys(&fresh.take_from(5, 10, 50)),
            [5],
            "at least one, then max bytes"
        );
        assert_eq!(fresh.bytes(), 100);
    }

    #[test]
    fn memory_is_bounded_when_nobody_takes() {
        let fresh = taking();
        let each = FRESH_MAX_BYTES / 4;
        fresh.publish((1..=10).map(|k| record(k, each)).collect());
        assert!(fresh.bytes() <= FRESH_MAX_BYTES);
        assert_eq!(keys(&fresh.take_from(1, 100, usize::MAX)), [1, 2, 3, 4]);
        // Later records fill it again; the cursor then reads 5.. from redb.
        fresh.publish(vec![record(11, 10)]);
        assert!(fresh.take_from(5, 100, usize::MAX).is_empty());
    }
}
