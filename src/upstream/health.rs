//! Which nodes may take work: health from heartbeats and failures, and the weighted choice.
//!
//! Health follows fluentd's out_forward (PROTOCOL.md §8.3, §10): a phi accrual failure
//! detector over heartbeat arrivals (every heartbeat reply and every ack adds a sample), a hard
//! timeout, and recovery only through heartbeats once `recover_wait` worth of samples arrived.
//! A connect failure, an ack timeout or a broken connection marks a node unavailable at once,
//! like fluentd's `node.disable!`. With `heartbeat_type = "none"` a node is judged by its own
//! connections only: unavailable after a failure, available again when a connect succeeds.
//!
//! Weights: every available primary gets records in proportion to its weight (each may run at
//! most one window ahead of its share, so a slow node holds back only its own share); standby
//! nodes take records only while no primary is available.
//!
//! Nodes live in slots: a node's index is fixed for its life and never reused, so a reload
//! that adds, removes or reorders `[[upstream.nodes]]` cannot make a node task, a heartbeat
//! reply or the admin API speak for another node. A removed node's slot is retired (never
//! eligible again); weights, standby and the health settings change in place.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// fluentd's phi accrual detector (out_forward/failure_detector.rb), in seconds.
#[derive(Debug, Clone)]
pub struct PhiDetector {
    interval: f64,
    last: Option<Instant>,
    /// Inter-arrival gaps in seconds, newest last, at most [`PhiDetector::MAX_SAMPLES`].
    gaps: VecDeque<f64>,
}

impl PhiDetector {
    pub const MAX_SAMPLES: usize = 1000;

    pub fn new(interval: Duration) -> Self {
        PhiDetector {
            interval: interval.as_secs_f64().max(0.001),
            last: None,
            gaps: VecDeque::new(),
        }
    }

    /// A heartbeat (or ack) arrived now.
    pub fn add(&mut self, now: Instant) {
        if let Some(last) = self.last {
            let gap = now.saturating_duration_since(last).as_secs_f64();
            if self.gaps.len() == Self::MAX_SAMPLES {
                self.gaps.pop_front();
            }
            self.gaps.push_back(gap);
        }
        self.last = Some(now);
    }

    /// A reload changed `heartbeat_interval`: the samples stay, the shift follows.
    pub fn set_interval(&mut self, interval: Duration) {
        self.interval = interval.as_secs_f64().max(0.001);
    }

    pub fn sample_size(&self) -> usize {
        self.gaps.len()
    }

    pub fn clear(&mut self) {
        self.gaps.clear();
        self.last = None;
    }

    /// phi at `now`: (1/ln 10) · t / mean, with fluentd's shifts by the interval.
    pub fn phi(&self, now: Instant) -> f64 {
        let Some(last) = self.last else { return 0.0 };
        if self.gaps.is_empty() {
            return 0.0;
        }
        // Weighted average, newest samples weigh most (weights 1..n), as fluentd does.
        let n = self.gaps.len() as f64;
        let weighted: f64 = self
            .gaps
            .iter()
            .enumerate()
            .map(|(i, gap)| gap * (i as f64 + 1.0))
            .sum();
        let mean = weighted / (n * (n + 1.0) / 2.0) - self.interval + 1.0;
        let t = now.saturating_duration_since(last).as_secs_f64() - self.interval + 1.0;
        if mean <= 0.0 {
            return f64::INFINITY;
        }
        (1.0 / std::f64::consts::LN_10) * t / mean
    }

    pub fn since_last(&self, now: Instant) -> Option<Duration> {
        self.last.map(|last| now.saturating_duration_since(last))
    }
}

/// Health settings shared by every node.
#[derive(Debug, Clone, Copy)]
pub struct HealthSettings {
    pub heartbeat: HeartbeatKind,
    pub interval: Duration,
    pub phi_threshold: f64,
    pub phi_failure_detector: bool,
    pub hard_timeout: Duration,
    pub recover_wait: Duration,
}

/// How node health is probed (`upstream.heartbeat_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeartbeatKind {
    /// Open a connection (with the handshake when configured) and close it.
    Transport,
    /// Send `\0` over UDP to the node's port and expect `\0` back from it.
    Udp,
    /// No probes: a node's own connections decide.
    None,
}

#[derive(Debug)]
struct NodeState {
    available: bool,
    detector: PhiDetector,
    /// Records handed to this node (for the weighted share).
    taken: u64,
    /// Connections currently open to this node.
    connected: bool,
    /// When `available` last changed (ms since the epoch; start-up counts as a change).
    since_ms: u64,
    /// Why the node was last marked unavailable (kept after it recovers, as "last error").
    last_error: Option<String>,
    /// When the last ack from this node arrived (ms since the epoch).
    last_ack_ms: Option<u64>,
}

impl NodeState {
    fn set_available(&mut self, available: bool) {
        if self.available != available {
            self.available = available;
            self.since_ms = crate::clock::now_ms();
        }
    }
}

/// What the admin API shows of a node's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSnapshot {
    pub available: bool,
    pub since_ms: u64,
    pub last_error: Option<String>,
    pub last_ack_ms: Option<u64>,
    pub connected: bool,
}

/// Health and share of one node.
#[derive(Debug)]
pub struct NodeHealth {
    pub name: String,
    weight: AtomicU32,
    standby: AtomicBool,
    /// Removed by a reload: never eligible again.
    retired: AtomicBool,
    state: Mutex<NodeState>,
}

impl NodeHealth {
    fn new(name: String, weight: u32, standby: bool, settings: &HealthSettings) -> NodeHealth {
        let mut detector = PhiDetector::new(settings.interval);
        detector.add(Instant::now());
        NodeHealth {
            name,
            weight: AtomicU32::new(weight),
            standby: AtomicBool::new(standby),
            retired: AtomicBool::new(false),
            // Optimistic start, like fluentd: a node is available until proven not.
            state: Mutex::new(NodeState {
                available: weight > 0,
                detector,
                taken: 0,
                connected: false,
                since_ms: crate::clock::now_ms(),
                last_error: None,
                last_ack_ms: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, NodeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Acquire)
    }

    pub fn standby(&self) -> bool {
        self.standby.load(Ordering::Acquire)
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    pub fn is_available(&self) -> bool {
        self.lock().available
    }

    pub fn taken(&self) -> u64 {
        self.lock().taken
    }

    pub fn snapshot(&self) -> NodeSnapshot {
        let state = self.lock();
        NodeSnapshot {
            available: state.available,
            since_ms: state.since_ms,
            last_error: state.last_error.clone(),
            last_ack_ms: state.last_ack_ms,
            connected: state.connected,
        }
    }
}

/// Every node's health, and the weighted choice between them.
#[derive(Debug)]
pub struct Balancer {
    /// Slots, by node index; only ever appended to.
    nodes: RwLock<Vec<Arc<NodeHealth>>>,
    settings: Mutex<HealthSettings>,
    /// Records a node may run ahead of its weighted share.
    slack: AtomicU64,
    /// Woken when availability or shares change.
    pub changed: Notify,
}

impl Balancer {
    fn slots(&self) -> RwLockReadGuard<'_, Vec<Arc<NodeHealth>>> {
        self.nodes.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Mirror node availability into `ackgate_node_available`; a retired node's series goes
    /// (unless a live node has its name).
    fn publish(&self) {
        let m = crate::metrics::metrics();
        let nodes = self.slots();
        for node in nodes.iter() {
            let labels = crate::metrics::label("node", &node.name);
            if !node.is_retired() {
                m.node_available
                    .get_or_create(&labels)
                    .set(node.is_available() as i64);
            } else if !nodes.iter().any(|n| !n.is_retired() && n.name == node.name) {
                m.node_available.remove(&labels);
            }
        }
    }

    pub fn new(nodes: Vec<(String, u32, bool)>, settings: HealthSettings, slack: u64) -> Self {
        let nodes = nodes
            .into_iter()
            .map(|(name, weight, standby)| {
                Arc::new(NodeHealth::new(name, weight, standby, &settings))
            })
            .collect();
        let balancer = Balancer {
            nodes: RwLock::new(nodes),
            settings: Mutex::new(settings),
            slack: AtomicU64::new(slack.max(1)),
            changed: Notify::new(),
        };
        balancer.publish();
        balancer
    }

    pub fn settings(&self) -> HealthSettings {
        *self.settings.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn slack(&self) -> u64 {
        self.slack.load(Ordering::Acquire)
    }

    /// The node in slot `index`.
    pub fn node(&self, index: usize) -> Arc<NodeHealth> {
        self.slots()[index].clone()
    }

    /// Slots, retired ones included.
    pub fn len(&self) -> usize {
        self.slots().len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots().is_empty()
    }

    /// A node added by a reload: a new slot (its index), available until proven not.
    pub fn add(&self, name: String, weight: u32, standby: bool) -> usize {
        let settings = self.settings();
        let mut nodes = self.nodes.write().unwrap_or_else(|p| p.into_inner());
        nodes.push(Arc::new(NodeHealth::new(name, weight, standby, &settings)));
        nodes.len() - 1
    }

    /// A reload changed a node's weight or standby flag. A node that had weight 0 (never
    /// used, so never judged) starts available, as at start-up.
    pub fn update(&self, index: usize, weight: u32, standby: bool) {
        let node = self.node(index);
        let before = node.weight.swap(weight, Ordering::AcqRel);
        node.standby.store(standby, Ordering::Release);
        if before == 0 && weight > 0 {
            node.lock().set_available(true);
        }
    }

    /// A reload removed the node: it is never chosen again.
    pub fn retire(&self, index: usize) {
        self.node(index).retired.store(true, Ordering::Release);
    }

    /// A reload changed the health settings or the window (the slack of a share).
    pub fn tune(&self, settings: HealthSettings, slack: u64) {
        *self.settings.lock().unwrap_or_else(|p| p.into_inner()) = settings;
        self.slack.store(slack.max(1), Ordering::Release);
        let nodes: Vec<Arc<NodeHealth>> = self.slots().clone();
        for node in nodes {
            node.lock().detector.set_interval(settings.interval);
        }
    }

    /// After a reload changed the node set or the weights: shares start again from zero (a
    /// node whose share grew would otherwise take every record until it "caught up"), the
    /// metrics follow, and waiting nodes look again.
    pub fn reshare(&self) {
        let nodes: Vec<Arc<NodeHealth>> = self.slots().clone();
        for node in nodes {
            node.lock().taken = 0;
        }
        self.publish();
        self.changed.notify_waiters();
    }

    /// Nodes that may take records now: available primaries, else available standbys.
    fn eligible(&self) -> Vec<usize> {
        let nodes = self.slots();
        let available: Vec<usize> = (0..nodes.len())
            .filter(|&i| !nodes[i].is_retired() && nodes[i].weight() > 0 && nodes[i].is_available())
            .collect();
        let primaries: Vec<usize> = available
            .iter()
            .copied()
            .filter(|&i| !nodes[i].standby())
            .collect();
        if primaries.is_empty() {
            available
        } else {
            primaries
        }
    }

    /// Whether node `index` may take one more record without running ahead of its share.
    pub fn may_take(&self, index: usize) -> bool {
        let eligible = self.eligible();
        if !eligible.contains(&index) {
            return false;
        }
        // (taken + 1 − slack) / weight ≤ every eligible node's taken / weight, in integers:
        // in floating point, 6/60 > 5/60 + 1/60, and a lone node with window = 1 stopped
        // taking after its fifth record.
        let nodes = self.slots();
        let node = &nodes[index];
        let weight = u128::from(node.weight().max(1));
        let need = u128::from((node.taken() + 1).saturating_sub(self.slack()));
        eligible.iter().all(|&i| {
            let other = &nodes[i];
            need * u128::from(other.weight().max(1)) <= u128::from(other.taken()) * weight
        })
    }

    /// Whether node `index` should try to connect now (it is eligible, or it is unavailable
    /// with no heartbeats to bring it back, so its own connect is the probe).
    pub fn should_connect(&self, index: usize) -> bool {
        let node = self.node(index);
        if node.weight() == 0 || node.is_retired() {
            return false;
        }
        if node.is_available() {
            return self.eligible().contains(&index);
        }
        self.settings().heartbeat == HeartbeatKind::None && !self.standby_blocked(index)
    }

    fn standby_blocked(&self, index: usize) -> bool {
        let nodes = self.slots();
        nodes[index].standby()
            && nodes
                .iter()
                .any(|n| !n.is_retired() && !n.standby() && n.weight() > 0 && n.is_available())
    }

    /// A node that comes back starts at the current floor of the others' shares, so it does
    /// not take every record until it has "caught up" on the time it was away.
    fn rebase(&self, index: usize) {
        let nodes = self.slots();
        let floor = (0..nodes.len())
            .filter(|&i| {
                i != index
                    && !nodes[i].is_retired()
                    && nodes[i].weight() > 0
                    && nodes[i].is_available()
            })
            .map(|i| nodes[i].taken() as f64 / nodes[i].weight().max(1) as f64)
            .fold(f64::INFINITY, f64::min);
        if floor.is_finite() {
            let node = &nodes[index];
            let mut state = node.lock();
            state.taken = state
                .taken
                .max((floor * node.weight().max(1) as f64) as u64);
        }
    }

    pub fn record_taken(&self, index: usize) {
        self.node(index).lock().taken += 1;
        // Others may now be within their share again.
        self.changed.notify_waiters();
    }

    /// A record taken by `index` went back to the queue unsent or unacked.
    pub fn record_returned(&self, index: usize) {
        let node = self.node(index);
        let mut state = node.lock();
        state.taken = state.taken.saturating_sub(1);
        drop(state);
        self.publish();
        self.changed.notify_waiters();
    }

    /// An ack arrived: a heartbeat sample that cannot re-enable a node (fluentd `heartbeat(false)`).
    pub fn ack_received(&self, index: usize) {
        let node = self.node(index);
        let mut state = node.lock();
        state.detector.add(Instant::now());
        state.last_ack_ms = Some(crate::clock::now_ms());
    }

    /// Connect succeeded. Without heartbeats this is what brings a node back.
    pub fn connected(&self, index: usize) {
        let node = self.node(index);
        let mut state = node.lock();
        state.connected = true;
        if self.settings().heartbeat == HeartbeatKind::None && !state.available {
            state.set_available(true);
            drop(state);
            self.rebase(index);
            tracing::info!(node = %node.name, "upstream node available again");
            self.publish();
            self.changed.notify_waiters();
        }
    }

    pub fn disconnected(&self, index: usize) {
        self.node(index).lock().connected = false;
    }

    /// Connect failure, ack timeout, broken connection: unavailable until proven healthy.
    pub fn failed(&self, index: usize, reason: &str) {
        let node = self.node(index);
        let mut state = node.lock();
        let was = state.available;
        state.set_available(false);
        state.last_error = Some(reason.to_string());
        state.detector.clear();
        drop(state);
        if was {
            tracing::warn!(node = %node.name, %reason, "upstream node marked unavailable");
        }
        self.publish();
        self.changed.notify_waiters();
    }

    /// A heartbeat reply arrived (fluentd `heartbeat(true)`): may re-enable the node.
    pub fn heartbeat(&self, index: usize) {
        let now = Instant::now();
        let settings = self.settings();
        let needed = (settings.recover_wait.as_secs_f64()
            / settings.interval.as_secs_f64().max(0.001))
        .ceil() as usize;
        let node = self.node(index);
        let mut state = node.lock();
        state.detector.add(now);
        // fluentd: `sample_size > recover_wait / heartbeat_interval`.
        if !state.available && state.detector.sample_size() > needed {
            state.set_available(true);
            drop(state);
            self.rebase(index);
            tracing::info!(node = %node.name, "upstream node recovered (heartbeats)");
            self.publish();
            self.changed.notify_waiters();
        }
    }

    /// Periodic check: phi or hard timeout may mark a node unavailable.
    pub fn check(&self, index: usize) {
        let settings = self.settings();
        if settings.heartbeat == HeartbeatKind::None {
            return;
        }
        let now = Instant::now();
        let node = self.node(index);
        if node.is_retired() {
            return;
        }
        let mut state = node.lock();
        if !state.available {
            return;
        }
        let silent = state.detector.since_last(now).unwrap_or_default();
        let phi = state.detector.phi(now);
        let reason = if silent > settings.hard_timeout {
            Some(format!("no heartbeat for {silent:?} (hard_timeout)"))
        } else if settings.phi_failure_detector && phi > settings.phi_threshold {
            Some(format!(
                "phi {phi:.1} above phi_threshold {}",
                settings.phi_threshold
            ))
        } else {
            None
        };
        if let Some(reason) = reason {
            state.set_available(false);
            state.last_error = Some(reason.clone());
            state.detector.clear();
            drop(state);
            tracing::warn!(node = %node.name, %reason, "upstream node detached by its failure detector");
            self.publish();
            self.changed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(heartbeat: HeartbeatKind) -> HealthSettings {
        HealthSettings {
            heartbeat,
            interval: Duration::from_secs(1),
            phi_threshold: 16.0,
            phi_failure_detector: true,
            hard_timeout: Duration::from_secs(60),
            recover_wait: Duration::from_secs(10),
        }
    }

    #[test]
    fn a_lone_node_with_a_window_of_one_may_always_take() {
        let balancer = Balancer::new(
            vec![("a".into(), 60, false)],
            settings(HeartbeatKind::None),
            1,
        );
        for taken in 0..10_000 {
            assert!(balancer.may_take(0), "refused after {taken} records");
            balancer.record_taken(0);
        }
    }

    #[test]
    fn weighted_shares_hold_within_the_slack() {
        let balancer = Balancer::new(
            vec![("a".into(), 60, false), ("b".into(), 20, false)],
            settings(HeartbeatKind::None),
            1,
        );
        let mut taken = [0u64; 2];
        for _ in 0..8000 {
            let i = if balancer.may_take(0) { 0 } else { 1 };
            assert!(balancer.may_take(i), "neither node may take");
            balancer.record_taken(i);
            taken[i] += 1;
        }
        assert!(taken[0] >= 5990 && taken[0] <= 6010, "{taken:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn phi_detaches_after_about_37_seconds_of_silence() {
        let balancer = Balancer::new(
            vec![("a".into(), 60, false)],
            settings(HeartbeatKind::Udp),
            1,
        );
        for _ in 0..30 {
            tokio::time::advance(Duration::from_secs(1)).await;
            balancer.heartbeat(0);
            balancer.check(0);
        }
        assert!(balancer.node(0).is_available());
        let mut silent = 0;
        while balancer.node(0).is_available() {
            tokio::time::advance(Duration::from_secs(1)).await;
            balancer.check(0);
            silent += 1;
            assert!(silent < 60, "never detached");
        }
        // fluentd arithmetic: 16 · ln 10 ≈ 36.8 s with a steady 1 s mean (PROTOCOL.md §8.3).
        assert!((36..=38).contains(&silent), "detached after {silent}s");
        // Recovery needs more than recover_wait / interval = 10 samples (12 replies after
        // the detector was cleared), as in fluentd.
        for i in 0..12 {
            assert!(
                !balancer.node(0).is_available(),
                "recovered after {i} heartbeats"
            );
            tokio::time::advance(Duration::from_secs(1)).await;
            balancer.heartbeat(0);
        }
        assert!(balancer.node(0).is_available());
    }

    #[test]
    fn a_reload_adds_retires_and_reweights_nodes_in_their_slots() {
        let balancer = Balancer::new(
            vec![("a".into(), 60, false), ("b".into(), 60, false)],
            settings(HeartbeatKind::None),
            1,
        );
        let share = |balancer: &Balancer, rounds: usize| {
            let mut taken = vec![0usize; balancer.len()];
            for _ in 0..rounds {
                let i = (0..balancer.len())
                    .find(|&i| balancer.may_take(i))
                    .expect("some node may take");
                balancer.record_taken(i);
                taken[i] += 1;
            }
            taken
        };
        // b removed, c added: b's slot stays where it was (index 1) and takes nothing more;
        // c gets a new slot (2), never b's.
        balancer.retire(1);
        let c = balancer.add("c".into(), 20, false);
        assert_eq!(c, 2);
        balancer.reshare();
        assert_eq!(balancer.node(1).name, "b");
        assert!(!balancer.should_connect(1) && !balancer.may_take(1));
        let taken = share(&balancer, 8000);
        assert_eq!(taken[1], 0, "a retired node takes no record");
        let ratio = taken[0] as f64 / 8000.0;
        assert!((0.73..=0.77).contains(&ratio), "a:c = 60:20, a got {ratio}");
        // Reweighted in place: c now weighs as much as a.
        balancer.update(c, 60, false);
        balancer.reshare();
        let taken = share(&balancer, 8000);
        let ratio = taken[0] as f64 / 8000.0;
        assert!((0.47..=0.53).contains(&ratio), "a:c = 60:60, a got {ratio}");
        // A node made a standby takes nothing while a primary is up.
        balancer.update(c, 60, true);
        balancer.reshare();
        assert_eq!(share(&balancer, 100)[c], 0);
    }

    #[tokio::test(start_paused = true)]
    async fn weights_share_and_standby_takes_over() {
        let balancer = Balancer::new(
            vec![
                ("a".into(), 60, false),
                ("b".into(), 20, false),
                ("s".into(), 60, true),
            ],
            settings(HeartbeatKind::None),
            4,
        );
        assert!(!balancer.may_take(2), "standby while primaries are up");
        let mut taken = [0u32; 2];
        for round in 0..8000 {
            let i = round % 2;
            if balancer.may_take(i) {
                balancer.record_taken(i);
                taken[i] += 1;
            }
        }
        let ratio = taken[0] as f64 / (taken[0] + taken[1]) as f64;
        assert!((0.73..=0.77).contains(&ratio), "share of a = {ratio}");
        balancer.failed(0, "test");
        balancer.failed(1, "test");
        assert!(balancer.may_take(2), "standby once no primary is available");
        balancer.connected(0);
        assert!(balancer.node(0).is_available());
        assert!(
            !balancer.should_connect(2) && !balancer.may_take(2),
            "back to primaries"
        );
    }
}
