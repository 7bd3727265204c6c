//! A count of permits that a reload can resize while permits are held: the ingress and admin
//! connection caps, and the ingress budget of bytes in unfinished requests.
//!
//! A tokio [`Semaphore`] only grows (`add_permits`) or forgets permits that are free
//! (`forget_permits`). Shrinking below what is held would then either wait (a reload that
//! blocks on senders) or close connections (invariant 10: a reload drops none). So a shrink
//! forgets what is free and records the rest as a debt; permits given back pay the debt before
//! they return to the semaphore. Until then more may be held than the new total, never more
//! than the old one, and nobody new gets a permit.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

/// Permits in a resizable total.
#[derive(Debug)]
pub struct Resizable {
    semaphore: Semaphore,
    /// The total in force.
    total: AtomicUsize,
    /// Permits held beyond `total` after a shrink: given-back permits pay it first.
    debt: AtomicUsize,
    /// Resizes run one at a time (a reload is the only caller; this keeps `total` and the
    /// semaphore in step if that ever changes).
    resizing: Mutex<()>,
}

/// One permit of a [`Resizable`], given back when dropped.
#[derive(Debug)]
pub struct Permit {
    limit: Arc<Resizable>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limit.give_back(1);
    }
}

impl Resizable {
    pub fn new(total: usize) -> Arc<Resizable> {
        let total = total.min(Semaphore::MAX_PERMITS);
        Arc::new(Resizable {
            semaphore: Semaphore::new(total),
            total: AtomicUsize::new(total),
            debt: AtomicUsize::new(0),
            resizing: Mutex::new(()),
        })
    }

    /// The total in force.
    pub fn total(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }

    /// Permits free now.
    pub fn available_permits(&self) -> usize {
        self.semaphore.available_permits()
    }

    /// Wait (FIFO) for one permit, held until the [`Permit`] is dropped.
    pub async fn acquire(self: &Arc<Self>) -> Permit {
        if let Ok(permit) = self.semaphore.acquire().await {
            permit.forget();
        }
        Permit {
            limit: self.clone(),
        }
    }

    /// A permit if one is free now.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        let permit = self.semaphore.try_acquire().ok()?;
        permit.forget();
        Some(Permit {
            limit: self.clone(),
        })
    }

    /// Wait (FIFO) for `n` permits and keep them until [`Resizable::give_back`]. Cancel-safe:
    /// nothing is taken unless it returns true. False only for a count the semaphore cannot
    /// hold.
    pub async fn take(&self, n: usize) -> bool {
        let Ok(count) = u32::try_from(n) else {
            return false;
        };
        match self.semaphore.acquire_many(count).await {
            Ok(permit) => {
                permit.forget();
                true
            }
            Err(_) => false,
        }
    }

    /// Return `n` permits taken earlier: they pay a shrink's debt first.
    pub fn give_back(&self, n: usize) {
        let paid = self.pay_debt(n);
        if n > paid {
            self.semaphore.add_permits(n - paid);
        }
    }

    /// Change the total. Growing frees permits at once; shrinking takes the free ones and
    /// the rest as they are given back. Never waits.
    pub fn resize(&self, total: usize) {
        let total = total.min(Semaphore::MAX_PERMITS);
        let _one_at_a_time = self.resizing.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.total.swap(total, Ordering::AcqRel);
        if total > old {
            let grow = total - old;
            let paid = self.pay_debt(grow);
            if grow > paid {
                self.semaphore.add_permits(grow - paid);
            }
        } else if old > total {
            let shrink = old - total;
            let forgotten = self.semaphore.forget_permits(shrink);
            self.debt.fetch_add(shrink - forgotten, Ordering::AcqRel);
        }
    }

    /// Take up to `n` off the debt; returns how much was taken.
    fn pay_debt(&self, n: usize) -> usize {
        let before = self
            .debt
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| Some(d - d.min(n)))
            .unwrap_or(0);
        before.min(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_shrink_below_what_is_held_waits_for_the_permits_to_come_back() {
        let limit = Resizable::new(3);
        let held: Vec<Permit> = vec![
            limit.acquire().await,
            limit.acquire().await,
            limit.acquire().await,
        ];
        limit.resize(1);
        assert_eq!(limit.total(), 1);
        let mut held = held.into_iter();
        drop(held.next());
        drop(held.next());
        assert_eq!(limit.available_permits(), 0, "two given back paid the debt");
        let waiting = tokio::time::timeout(Duration::from_millis(20), limit.acquire()).await;
        assert!(
            waiting.is_err(),
            "one is still held: the new total is reached"
        );
        drop(held.next());
        assert_eq!(limit.available_permits(), 1);
    }

    #[tokio::test]
    async fn a_grow_pays_the_debt_before_freeing_permits() {
        let limit = Resizable::new(2);
        let a = limit.acquire().await;
        let b = limit.acquire().await;
        limit.resize(0);
        limit.resize(3);
        assert_eq!(limit.available_permits(), 1, "3 − the 2 still held");
        drop((a, b));
        assert_eq!(limit.available_permits(), 3);
    }

    #[tokio::test]
    async fn bulk_takes_follow_the_same_accounting() {
        let limit = Resizable::new(100);
        assert!(limit.take(80).await);
        limit.resize(50);
        assert_eq!(limit.available_permits(), 0);
        limit.give_back(60);
        assert_eq!(limit.available_permits(), 30, "30 of debt paid, 30 free");
        limit.give_back(20);
        assert_eq!(limit.available_permits(), 50);
    }
}
