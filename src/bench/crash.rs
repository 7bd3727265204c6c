//! Duplicates after a crash: ackgate is SIGKILLed at a random instant while it delivers under
//! steady load, restarted on its spool, and the events the aggregator received twice are
//! counted against the bound a user may expect: the chunks that were in flight, plus what was
//! delivered in the last [`DELETE_WINDOW`] (acked upstream, its delete not yet durable).
//! Every acked event must still arrive (invariant 7).

use std::fmt;
use std::time::Duration;

use rand::Rng;
use serde::Serialize;
use tokio::time::Instant;

use super::aggregator::{Aggregator, Delivered};
use super::report::Check;
use super::{child, load, BenchError, Ctx, READY_TIMEOUT};

/// How long an acked record's delete may stay not durable: a group commit under load, the
/// lazy flush when idle (`spool::LAZY_FLUSH`).
pub const DELETE_WINDOW: Duration = Duration::from_millis(100);
/// Deliveries after the restart must stop for this long before duplicates are counted.
const QUIET: Duration = Duration::from_secs(1);

/// One kill, restart and drain.
#[derive(Debug, Clone, Serialize)]
pub struct CrashCycle {
    /// Seconds into the load when ackgate was killed.
    pub killed_after_s: f64,
    /// Events the senders saw acked before the kill.
    pub acked: u64,
    /// Events the aggregator had received at the kill, and at what rate.
    pub delivered_at_kill: u64,
    pub delivery_rate: f64,
    /// Mean events per upstream chunk before the kill.
    pub events_per_chunk: f64,
    /// Distinct events received in the end, and how many arrived more than once.
    pub unique: u64,
    pub duplicates: u64,
    /// upstream.window chunks of `events_per_chunk` + `DELETE_WINDOW` of `delivery_rate`.
    pub bound: f64,
    /// Acked events that never arrived (must be 0), when the drain completed.
    pub lost: u64,
    pub drained: bool,
}

/// Every cycle of the scenario.
#[derive(Debug, Clone, Serialize)]
pub struct CrashReport {
    pub upstream_window: u32,
    pub cycles: Vec<CrashCycle>,
}

impl Ctx {
    /// `cycles` kill -9 cycles, each on a fresh spool and a fresh aggregator.
    pub(super) async fn crashes(&self, cycles: u32) -> Result<CrashReport, BenchError> {
        let mut report = CrashReport {
            upstream_window: self.args.upstream_window,
            cycles: Vec::new(),
        };
        for i in 0..cycles {
            super::progress(&format!(
                "crash {}/{cycles}: kill -9 under load, restart, count duplicates",
                i + 1
            ));
            report.cycles.push(self.crash_cycle(i).await?);
        }
        Ok(report)
    }

    async fn crash_cycle(&self, index: u32) -> Result<CrashCycle, BenchError> {
        let aggregator = Aggregator::start(
            std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            self.aggregator_options(),
        )
        .await
        .map_err(BenchError::Listen)?;
        let name = format!("crash-{index}");
        let mut spec = self.prepare(
            &name,
            &aggregator.addr.to_string(),
            self.args.spool_max_bytes,
        )?;
        spec.ready_timeout = READY_TIMEOUT;
        let first = child::spawn(&spec).await?;
        let load_spec = self.spec();
        let duration = load_spec.duration.as_secs_f64();
        let kill_after = rand::rng().random_range(duration * 0.3..duration * 0.7);
        let listen = first.listen;
        let started = Instant::now();
        let load = tokio::spawn(async move { load::run(listen, &load_spec).await });
        tokio::time::sleep(Duration::from_secs_f64(kill_after)).await;
        let delivered = &aggregator.delivered;
        let at_kill = delivered.events();
        let chunks_at_kill = delivered.frames.load(std::sync::atomic::Ordering::Acquire);
        let killed_after = started.elapsed().as_secs_f64();
        first.kill().await;
        let acked = load.await.map(|l| l.events).unwrap_or(0);
        let restarted = child::spawn(&spec).await?;
        let drained = settle(delivered, acked, self.args.drain_timeout).await;
        restarted.stop(Duration::from_secs(20)).await;
        let events_per_chunk = at_kill as f64 / chunks_at_kill.max(1) as f64;
        let delivery_rate = at_kill as f64 / killed_after.max(1e-9);
        let duplicates = delivered
            .duplicates
            .load(std::sync::atomic::Ordering::Acquire);
        let unique = delivered.events().saturating_sub(duplicates);
        aggregator.stop().await;
        Ok(CrashCycle {
            killed_after_s: killed_after,
            acked,
            delivered_at_kill: at_kill,
            delivery_rate,
            events_per_chunk,
            unique,
            duplicates,
            bound: f64::from(self.args.upstream_window) * events_per_chunk
                + DELETE_WINDOW.as_secs_f64() * delivery_rate,
            lost: acked.saturating_sub(unique),
            drained,
        })
    }
}

/// Wait until at least `acked` distinct events arrived and deliveries stopped for [`QUIET`].
async fn settle(delivered: &Delivered, acked: u64, limit: Duration) -> bool {
    let start = Instant::now();
    let mut last = delivered.events();
    let mut last_change = Instant::now();
    while start.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = delivered.events();
        if now != last {
            last = now;
            last_change = Instant::now();
        }
        let duplicates = delivered
            .duplicates
            .load(std::sync::atomic::Ordering::Acquire);
        if now.saturating_sub(duplicates) >= acked && last_change.elapsed() >= QUIET {
            return true;
        }
    }
    false
}

impl CrashReport {
    /// The duplicates target, and no acked event lost.
    pub fn check(&self) -> Check {
        let worst = self
            .cycles
            .iter()
            .map(|c| c.duplicates as f64 / c.bound.max(1.0))
            .fold(0.0, f64::max);
        let lost: u64 = self.cycles.iter().map(|c| c.lost).sum();
        let drained = self.cycles.iter().all(|c| c.drained);
        let each: Vec<String> = self
            .cycles
            .iter()
            .map(|c| format!("{} ≤ {:.0}", c.duplicates, c.bound))
            .collect();
        Check {
            target: format!(
                "duplicates after kill -9 under load ≤ chunks in flight + {} ms of deliveries, none lost",
                DELETE_WINDOW.as_millis()
            ),
            measured: format!(
                "{} cycle(s): {}; worst {:.2} × bound; {lost} acked events lost{}",
                self.cycles.len(),
                each.join(", "),
                worst,
                if drained { "" } else { "; a drain did not complete" }
            ),
            met: worst <= 1.0 && lost == 0 && drained,
        }
    }
}

impl fmt::Display for CrashReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f)?;
        writeln!(
            f,
            "crash (kill -9 at a random instant under load, restart on the spool; upstream.window {}):",
            self.upstream_window
        )?;
        for (i, c) in self.cycles.iter().enumerate() {
            writeln!(
                f,
                "  {}: killed at {:.2} s; {} acked; {} delivered at the kill ({:.0} ev/s, {:.0} events/chunk); \
                 {} distinct delivered, {} duplicates (bound {:.0} = {} chunks + {} ms), {} lost{}",
                i + 1,
                c.killed_after_s,
                c.acked,
                c.delivered_at_kill,
                c.delivery_rate,
                c.events_per_chunk,
                c.unique,
                c.duplicates,
                c.bound,
                self.upstream_window,
                DELETE_WINDOW.as_millis(),
                c.lost,
                if c.drained { "" } else { "; drain incomplete" }
            )?;
        }
        Ok(())
    }
}
