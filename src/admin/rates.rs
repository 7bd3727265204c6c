//! Events per second, in and out per node, over the last 1, 10 and 60 seconds.
//!
//! A sampler reads the cumulative counters once a second and keeps the last minute of them;
//! a rate is the difference over a window. Cheap for the hot path (it only bumps counters it
//! bumps anyway) and exact for the windows the API reports. Nodes are sampled by name, as the
//! node list is at each sample: a node a reload adds starts its series then, a removed one's
//! series goes.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::metrics::{metrics, Metrics};

/// Samples kept: one a second for a minute, plus the one a minute ago.
const SAMPLES: usize = 61;

/// Rates over the windows the API reports. Until a window has been sampled whole (just after
/// start), it covers the `sampled_seconds` there are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Rate {
    pub last_1s: f64,
    pub last_10s: f64,
    pub last_60s: f64,
    pub sampled_seconds: u64,
}

/// The last minute of one cumulative counter.
#[derive(Debug, Default)]
struct Series {
    totals: VecDeque<u64>,
}

impl Series {
    fn push(&mut self, total: u64) {
        if self.totals.len() == SAMPLES {
            self.totals.pop_front();
        }
        self.totals.push_back(total);
    }

    /// Per second over the last `seconds` (fewer if not sampled that long yet).
    fn per_second(&self, seconds: usize) -> f64 {
        let Some(&last) = self.totals.back() else {
            return 0.0;
        };
        let span = seconds.min(self.totals.len().saturating_sub(1));
        if span == 0 {
            return 0.0;
        }
        let first = self.totals[self.totals.len() - 1 - span];
        last.saturating_sub(first) as f64 / span as f64
    }

    fn rate(&self) -> Rate {
        Rate {
            last_1s: self.per_second(1),
            last_10s: self.per_second(10),
            last_60s: self.per_second(60),
            sampled_seconds: self.totals.len().saturating_sub(1) as u64,
        }
    }

    /// Events in each of the last seconds, oldest first.
    fn history(&self) -> Vec<u64> {
        self.totals
            .iter()
            .zip(self.totals.iter().skip(1))
            .map(|(a, b)| b.saturating_sub(*a))
            .collect()
    }
}

/// The series of ingress and of every node, by name.
#[derive(Default)]
pub struct Rates {
    series: Mutex<(Series, HashMap<String, Series>)>,
}

impl Rates {
    pub fn new() -> Rates {
        Rates::default()
    }

    fn sample(&self, m: &Metrics, nodes: &[String]) {
        let mut series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        series.0.push(m.events_in.get());
        series.1.retain(|name, _| nodes.contains(name));
        for node in nodes {
            series
                .1
                .entry(node.clone())
                .or_default()
                .push(Metrics::node_count(&m.events_out, node));
        }
    }

    /// Events per second into the spool.
    pub fn events_in(&self) -> (Rate, Vec<u64>) {
        let series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        (series.0.rate(), series.0.history())
    }

    /// Events per second acked by the node named `name`.
    pub fn events_out(&self, name: &str) -> (Rate, Vec<u64>) {
        let series = self.series.lock().unwrap_or_else(|p| p.into_inner());
        series
            .1
            .get(name)
            .map(|s| (s.rate(), s.history()))
            .unwrap_or_default()
    }

    /// Sample every second until shutdown, the nodes `nodes` names at each sample.
    pub async fn run(&self, shutdown: CancellationToken, nodes: impl Fn() -> Vec<String>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.sample(metrics(), &nodes()),
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_differences_over_their_window() {
        let mut s = Series::default();
        assert_eq!(s.rate(), Rate::default());
        for total in [0, 10, 30, 60] {
            s.push(total);
        }
        assert_eq!(s.per_second(1), 30.0);
        // Sampled for 3 s only: the 10 s window covers what there is.
        assert_eq!(s.per_second(10), 20.0);
        assert_eq!(s.history(), vec![10, 20, 30]);
        for n in 0..100 {
            s.push(60 + n * 5);
        }
        assert_eq!(s.totals.len(), SAMPLES);
        assert_eq!(s.per_second(60), 5.0);
        assert_eq!(s.history().len(), SAMPLES - 1);
    }
}
