//! The global budget of bytes held in unfinished requests.
//!
//! Every connection may hold [`FREE_BYTES`] of a request it is still reading; beyond that it
//! takes bytes from one budget shared by all connections (`ingress.max_partial_bytes`) before
//! it reads more, and gives them back once the request is complete. A connection that finds
//! the budget empty simply stops reading (backpressure), like a full spool. So memory stays
//! bounded by `max_connections × FREE_BYTES + max_partial_bytes`, however many peers declare
//! large requests, instead of `max_connections × max_frame_bytes`.
//!
//! Connections idle between requests hold nothing. A request whose size is declared up front
//! (the str/bin entries of PackedForward and of fluentd v0.10's layout, the large ones) takes
//! what it still needs in one FIFO acquisition, so such readers never hold part of the budget
//! while they wait for the rest.
//!
//! A reload may resize the budget ([`Resizable`]): a shrink takes effect as connections give
//! bytes back, and no connection is closed for it.

use std::sync::Arc;

use crate::limit::Resizable;

/// Bytes of an unfinished request a connection holds without the budget.
pub const FREE_BYTES: usize = 16 << 10;

/// One connection's share of the budget.
pub struct PartialBytes {
    budget: Arc<Resizable>,
    /// Permits taken and not yet given back.
    held: usize,
    /// Largest request: more is never needed (the decoder rejects it first).
    max_frame: usize,
}

impl PartialBytes {
    pub fn new(budget: Arc<Resizable>, max_frame: usize) -> PartialBytes {
        PartialBytes {
            budget,
            held: 0,
            max_frame,
        }
    }

    /// Bytes this connection may hold now.
    pub fn allowance(&self) -> usize {
        FREE_BYTES + self.held
    }

    /// Permits still to take before reading: enough for `wanted` bytes (the decoder's hint,
    /// 0 if none) or one more `read_chunk` after the `buffered` ones. Nothing at a request
    /// boundary: an idle connection holds no budget.
    pub fn missing(&self, buffered: usize, wanted: usize, read_chunk: usize) -> usize {
        if buffered == 0 {
            return 0;
        }
        // Always room for one more byte, so a read never gets an empty buffer (which would
        // look like EOF).
        let target = (buffered + read_chunk)
            .max(wanted)
            .min(self.max_frame + FREE_BYTES)
            .max(buffered + 1);
        target.saturating_sub(self.allowance())
    }

    /// Take `bytes` permits, waiting (FIFO) until they are free. Cancel-safe: nothing is held
    /// unless it returns.
    pub async fn take(&mut self, bytes: usize) {
        if self.budget.take(bytes).await {
            self.held += bytes;
        }
    }

    /// A reload changed `ingress.max_frame_bytes`: read the next request against it.
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.max_frame = max_frame;
    }

    /// Keep only what `buffered` bytes of an unfinished request need.
    pub fn shrink_to(&mut self, buffered: usize) {
        let keep = buffered.saturating_sub(FREE_BYTES).min(self.held);
        let surplus = self.held - keep;
        if surplus > 0 {
            self.budget.give_back(surplus);
            self.held = keep;
        }
    }
}

impl Drop for PartialBytes {
    fn drop(&mut self) {
        self.shrink_to(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const CHUNK: usize = 64 << 10;

    #[test]
    fn idle_connections_hold_nothing_and_small_requests_need_no_budget() {
        let budget = Resizable::new(1 << 20);
        let share = PartialBytes::new(budget, 16 << 20);
        assert_eq!(share.missing(0, 0, CHUNK), 0);
        assert_eq!(share.allowance(), FREE_BYTES);
        // 100 bytes of a request: one more read chunk needs the budget beyond FREE_BYTES.
        assert_eq!(share.missing(100, 0, CHUNK), 100 + CHUNK - FREE_BYTES);
    }

    #[test]
    fn a_declared_length_is_taken_at_once_and_capped_at_the_frame_limit() {
        let budget = Resizable::new(64 << 20);
        let share = PartialBytes::new(budget, 1 << 20);
        assert_eq!(share.missing(10, 900_000, CHUNK), 900_000 - FREE_BYTES);
        assert_eq!(
            share.missing(10, 50 << 20, CHUNK),
            1 << 20,
            "never past the frame limit"
        );
    }

    #[tokio::test]
    async fn bytes_go_back_when_the_request_completes_or_the_connection_ends() {
        let budget = Resizable::new(1 << 20);
        let mut share = PartialBytes::new(budget.clone(), 16 << 20);
        share.take(300_000).await;
        assert_eq!(budget.available_permits(), (1 << 20) - 300_000);
        share.shrink_to(FREE_BYTES + 1000);
        assert_eq!(budget.available_permits(), (1 << 20) - 1000);
        drop(share);
        assert_eq!(budget.available_permits(), 1 << 20);
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_budget_makes_the_reader_wait_until_another_gives_back() {
        let budget = Resizable::new(100_000);
        let mut first = PartialBytes::new(budget.clone(), 16 << 20);
        first.take(100_000).await;
        let mut second = PartialBytes::new(budget.clone(), 16 << 20);
        let waited = tokio::time::timeout(Duration::from_secs(60), second.take(50_000)).await;
        assert!(waited.is_err(), "no budget left: the second reader waits");
        assert_eq!(
            second.allowance(),
            FREE_BYTES,
            "a cancelled wait holds nothing"
        );
        first.shrink_to(0);
        tokio::time::timeout(Duration::from_secs(1), second.take(50_000))
            .await
            .unwrap();
        assert_eq!(second.allowance(), FREE_BYTES + 50_000);
    }
}
