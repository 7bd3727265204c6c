//! The spool's byte budget: what turns a full spool into TCP backpressure (invariant 5).
//!
//! A connection reserves a request's bytes before it hands the request over, and does not read
//! its socket while it waits for them; an upstream ack (delete) or a dead letter gives them
//! back. Two more bounds ride on the same budget: bytes handed to the writer but not yet
//! committed (they sit in memory meanwhile), and a "blocked" flag set while the disk is full,
//! when nothing fits whatever the counters say. No I/O here. Both bounds follow a reload
//! ([`Budget::set_bounds`]): a larger one wakes the waiting connections at once, a smaller one
//! stops reservations until deletes bring the bytes under it (nothing already stored moves).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::Notify;

/// Bytes reserved, bytes waiting for their commit, and who waits for room.
pub(super) struct Budget {
    /// Bytes of stored records plus reservations not yet committed.
    used: AtomicU64,
    /// `spool.max_bytes`.
    max: AtomicU64,
    /// Woken whenever room may have appeared (a release, a settled group, the disk unblocked).
    freed: Notify,
    /// Set while the disk is full.
    blocked: AtomicBool,
    /// Bytes handed to the writer and not yet committed.
    uncommitted: AtomicU64,
    /// Bound on `uncommitted`: with the writer behind, ingress stops reading, so memory stays
    /// flat however many connections pipeline requests.
    max_uncommitted: AtomicU64,
    /// Requests waiting in [`Budget::reserve`] for room.
    waiting: AtomicU64,
}

impl Budget {
    pub(super) fn new(used: u64, max: u64, max_uncommitted: u64) -> Budget {
        Budget {
            used: AtomicU64::new(used),
            max: AtomicU64::new(max),
            freed: Notify::new(),
            blocked: AtomicBool::new(false),
            uncommitted: AtomicU64::new(0),
            max_uncommitted: AtomicU64::new(max_uncommitted),
            waiting: AtomicU64::new(0),
        }
    }

    pub(super) fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    pub(super) fn max(&self) -> u64 {
        self.max.load(Ordering::Acquire)
    }

    /// New bounds (a reload); whoever waits for room looks again.
    pub(super) fn set_bounds(&self, max: u64, max_uncommitted: u64) {
        self.max.store(max, Ordering::Release);
        self.max_uncommitted
            .store(max_uncommitted, Ordering::Release);
        self.freed.notify_waiters();
    }

    pub(super) fn uncommitted(&self) -> u64 {
        self.uncommitted.load(Ordering::Acquire)
    }

    pub(super) fn set_blocked(&self, blocked: bool) {
        self.blocked.store(blocked, Ordering::Release);
        if !blocked {
            self.freed.notify_waiters();
        }
    }

    pub(super) fn is_blocked(&self) -> bool {
        self.blocked.load(Ordering::Acquire)
    }

    /// No room for more requests now: some wait for room, the bytes reached max_bytes, or the
    /// disk is full. What /ready and the UDP heartbeat call full.
    pub(super) fn is_full(&self) -> bool {
        self.is_blocked() || self.waiting.load(Ordering::Acquire) > 0 || self.used() >= self.max()
    }

    /// Take `bytes` if they fit now.
    pub(super) fn try_reserve(&self, bytes: u64) -> bool {
        if self.is_blocked() {
            return false;
        }
        let pending = self.uncommitted();
        if pending > 0 && pending + bytes > self.max_uncommitted.load(Ordering::Acquire) {
            return false;
        }
        let max = self.max();
        let mut used = self.used();
        loop {
            // A request larger than the whole budget is let through when the spool is empty,
            // so a misconfiguration cannot wedge a connection forever.
            if used + bytes > max && used > 0 {
                return false;
            }
            match self.used.compare_exchange_weak(
                used,
                used + bytes,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    self.uncommitted.fetch_add(bytes, Ordering::AcqRel);
                    return true;
                }
                Err(now) => used = now,
            }
        }
    }

    /// Wait until `bytes` fit, then take them. Counted as waiting meanwhile: a waiting request
    /// is what "full" means (the byte count alone may sit just under the bound).
    pub(super) async fn reserve(&self, bytes: u64) {
        if self.try_reserve(bytes) {
            return;
        }
        self.waiting.fetch_add(1, Ordering::AcqRel);
        struct Done<'a>(&'a AtomicU64);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let _done = Done(&self.waiting);
        loop {
            let freed = self.freed.notified();
            if self.try_reserve(bytes) {
                return;
            }
            freed.await;
        }
    }

    /// Wait while the budget is full.
    pub(super) async fn wait_for_room(&self) {
        loop {
            let freed = self.freed.notified();
            if !self.is_full() {
                return;
            }
            freed.await;
        }
    }

    /// Requests of `bytes` left the writer's queue (committed or failed).
    pub(super) fn settled(&self, bytes: u64) {
        saturating_sub(&self.uncommitted, bytes);
        self.freed.notify_waiters();
    }

    /// Give back bytes (a delete, a dead letter, a failed request's reservation).
    pub(super) fn release(&self, bytes: u64) {
        saturating_sub(&self.used, bytes);
        self.freed.notify_waiters();
    }

    /// A failed request: its reservation is given back and it left the writer's queue.
    pub(super) fn refund(&self, bytes: u64) {
        self.release(bytes);
        self.settled(bytes);
    }

    /// A group was committed: the file holds `stored` bytes for requests that had reserved
    /// `reserved` (reservations are estimates; the budget follows the file).
    pub(super) fn committed(&self, reserved: u64, stored: u64) {
        if stored > reserved {
            self.used.fetch_add(stored - reserved, Ordering::AcqRel);
        } else if reserved > stored {
            saturating_sub(&self.used, reserved - stored);
        }
        self.settled(reserved);
    }

    /// Maintenance stored `added` bytes and removed `removed` bytes that were never released
    /// (a split replaces a record by its parts).
    pub(super) fn add(&self, added: u64, removed: u64) {
        if added > removed {
            self.used.fetch_add(added - removed, Ordering::AcqRel);
        } else if removed > added {
            self.release(removed - added);
        }
    }

    /// After a reopen: the file holds `stored` bytes, of which `released` were already given
    /// back (their deletes are still to be committed); every reservation not yet committed
    /// still counts.
    pub(super) fn reset(&self, stored: u64, released: u64) {
        let used = stored.saturating_sub(released) + self.uncommitted();
        self.used.store(used, Ordering::Release);
        self.freed.notify_waiters();
    }
}

fn saturating_sub(counter: &AtomicU64, bytes: u64) {
    let _ = counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
        Some(v.saturating_sub(bytes))
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn reservations_stop_at_max_bytes_but_one_oversized_request_fits_an_empty_spool() {
        let budget = Budget::new(0, 100, 1000);
        assert!(
            budget.try_reserve(150),
            "an empty spool takes anything once"
        );
        assert!(!budget.try_reserve(1));
        budget.committed(150, 150);
        budget.release(150);
        assert!(budget.try_reserve(60));
        assert!(budget.try_reserve(40));
        assert!(!budget.try_reserve(1));
        assert!(budget.is_full());
    }

    #[test]
    fn uncommitted_bytes_are_bounded_apart_from_max_bytes() {
        let budget = Budget::new(0, 1 << 30, 100);
        assert!(budget.try_reserve(80));
        assert!(!budget.try_reserve(30), "the writer is 80 bytes behind");
        budget.committed(80, 90);
        assert_eq!(budget.used(), 90, "the budget follows what was stored");
        assert!(budget.try_reserve(30));
    }

    #[test]
    fn a_blocked_budget_takes_nothing_until_unblocked() {
        let budget = Budget::new(0, 1000, 1000);
        budget.set_blocked(true);
        assert!(!budget.try_reserve(1));
        assert!(budget.is_full());
        budget.set_blocked(false);
        assert!(budget.try_reserve(1));
    }

    #[test]
    fn reset_counts_the_file_minus_released_bytes_plus_reservations() {
        let budget = Budget::new(0, 1000, 1000);
        assert!(budget.try_reserve(10));
        budget.reset(500, 200);
        assert_eq!(budget.used(), 310);
    }

    /// A budget of 100 bytes, all committed, and a task waiting (already counted as waiting)
    /// to reserve 50 more.
    async fn full_budget_with_a_waiting_request() -> (Arc<Budget>, tokio::task::JoinHandle<()>) {
        let budget = Arc::new(Budget::new(0, 100, 1000));
        assert!(budget.try_reserve(100));
        budget.committed(100, 100);
        let waiter = tokio::spawn({
            let budget = budget.clone();
            async move { budget.reserve(50).await }
        });
        tokio::time::timeout(Duration::from_secs(5), async {
            while budget.waiting.load(Ordering::Acquire) == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .unwrap();
        (budget, waiter)
    }

    #[tokio::test]
    async fn a_larger_max_bytes_wakes_a_waiting_request_and_a_smaller_one_stops_reservations() {
        let (budget, waiter) = full_budget_with_a_waiting_request().await;
        budget.set_bounds(200, 1000);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(budget.used(), 150);
        budget.committed(50, 50);
        budget.set_bounds(120, 1000);
        assert!(budget.is_full(), "150 stored over the new 120");
        assert!(!budget.try_reserve(1));
        budget.release(40);
        assert!(budget.try_reserve(10), "back under the bound");
    }

    #[tokio::test]
    async fn a_waiting_request_is_woken_by_a_release_and_counts_as_full_meanwhile() {
        let (budget, waiter) = full_budget_with_a_waiting_request().await;
        assert!(budget.is_full());
        budget.release(60);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(budget.waiting.load(Ordering::Acquire), 0);
        assert_eq!(budget.used(), 90);
    }
}
