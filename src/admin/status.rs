//! `GET /api/status`: the whole state of a running relay in one JSON document, read by
//! `ackgate status` and `ackgate top`. Field names are stable (README, "A running relay");
//! times are milliseconds since the Unix epoch (`*_ms`, against `now_ms`, the relay's clock)
//! or ages in seconds (`*_seconds`).

use serde::{Deserialize, Serialize};

use super::rates::Rate;
use super::AdminState;
use crate::clock::now_ms;
use crate::metrics::{metrics, Metrics};
use crate::upstream::NodeView;

/// Share of `spool.max_bytes` above which the spool needs attention.
pub const SPOOL_ATTENTION_RATIO: f64 = 0.8;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    /// The relay's clock when it answered: ages here are against it.
    pub now_ms: u64,
    pub uptime_seconds: f64,
    /// Nothing needs attention (`attention` is empty).
    pub healthy: bool,
    /// What an operator should look at, one sentence each.
    pub attention: Vec<String>,
    pub spool: SpoolStatus,
    pub queue: QueueStatus,
    pub ingress: IngressStatus,
    pub nodes: Vec<NodeStatus>,
    /// Which processes serve, and what the supervisor last said (invariant 10).
    #[serde(default)]
    pub lifecycle: LifecycleStatus,
    /// The last reload since start (SIGHUP, `ackgate reload`, `POST /api/reload`), if any.
    #[serde(default)]
    pub reload: Option<ReloadStatus>,
}

/// `lifecycle` in `/api/status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LifecycleStatus {
    /// `ackgate run`'s pid: the service's main pid, the same across reloads and upgrades.
    pub supervisor_pid: Option<u32>,
    /// The process reading the sockets now (a new one after a crash or an upgrade).
    pub worker_pid: u32,
    pub worker_started_ms: u64,
    /// Plain TCP is read with `MSG_PEEK` and released once stored (TCP `SO_PEEK_OFF`, Linux
    /// 6.10+): a worker that dies loses nothing it had read. False on older kernels.
    pub crash_safe_reading: bool,
    /// The supervisor's last message (an upgrade that failed, and why), with when it came.
    pub last_notice: Option<crate::lifecycle::state::Notice>,
}

/// How the last reload went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadStatus {
    pub at_ms: u64,
    /// "signal", "api".
    pub trigger: String,
    /// The new config is in force. When false the one before it still runs.
    pub ok: bool,
    /// What changed (keys, and nodes by name); empty if nothing did.
    pub changed: Vec<String>,
    /// Why it was refused: the key and the problem.
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpoolStatus {
    pub path: String,
    pub records: u64,
    pub bytes: u64,
    pub max_bytes: u64,
    /// `bytes / max_bytes`.
    pub used_ratio: f64,
    pub oldest_record_ms: Option<u64>,
    pub oldest_record_age_seconds: Option<f64>,
    pub dead_letters: u64,
    pub dead_letter_bytes: u64,
    pub disk_full: bool,
    /// The database is open (false while it cannot be reopened after I/O errors).
    pub available: bool,
    pub last_commit_ms: Option<u64>,
    pub last_commit_age_seconds: Option<f64>,
    pub last_commit_duration_seconds: Option<f64>,
    pub commits: u64,
    pub reopens: u64,
}

/// Where the queued records are (DESIGN.md invariant 8).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueStatus {
    /// Written to a node, not yet acked.
    pub in_flight: u64,
    /// Failed once at least, waiting for their retry time.
    pub waiting_retry: u64,
    /// Read ahead from the spool, not yet handed to a node.
    pub buffered: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IngressStatus {
    pub listen: String,
    pub connections_open: i64,
    pub connections_total: u64,
    pub requests_accepted: u64,
    pub events_accepted: u64,
    pub bytes_accepted: u64,
    pub acks_sent: u64,
    /// Refused connections and requests by reason (`malformed_msgpack`, `not_allowed`, …).
    pub rejected: Vec<Rejected>,
    pub events_per_second: Rate,
    /// Events committed in each of the last seconds, oldest first (at most 60).
    pub events_history: Vec<u64>,
    /// Transparent mode: redirected connections and their committed events by original
    /// destination (empty otherwise).
    #[serde(default)]
    pub destinations: Vec<DestinationStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestinationStatus {
    pub destination: String,
    pub connections: u64,
    /// Events committed from connections redirected to it.
    pub events_accepted: u64,
    /// Events of its records acked upstream.
    #[serde(default)]
    pub events_delivered: u64,
    /// Records (and their stored bytes) waiting for an upstream ack.
    #[serde(default)]
    pub queued_records: u64,
    #[serde(default)]
    pub queued_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejected {
    pub reason: String,
    pub count: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub name: String,
    pub address: String,
    pub weight: u32,
    pub standby: bool,
    pub available: bool,
    /// Since when it is available (or not).
    pub since_ms: u64,
    pub since_seconds: f64,
    /// Why it was marked down, while it is.
    pub down_reason: Option<String>,
    /// The last failure, even after it recovered.
    pub last_error: Option<String>,
    pub connected: bool,
    pub in_flight: i64,
    pub acked_chunks: u64,
    pub acked_events: u64,
    pub retries: u64,
    pub ack_timeouts: u64,
    pub events_per_second: Rate,
    pub events_history: Vec<u64>,
    pub last_ack_ms: Option<u64>,
    pub last_ack_age_seconds: Option<f64>,
}

fn age_seconds(now: u64, then_ms: u64) -> f64 {
    now.saturating_sub(then_ms) as f64 / 1000.0
}

impl Status {
    /// Read everything now. Blocking (it reads the spool): call from a blocking context.
    pub fn read(state: &AdminState, queue: QueueStatus) -> Status {
        let now = now_ms();
        let spool = spool_status(state, now);
        metrics()
            .destinations
            .set_queued(&state.spool.queued_by_destination());
        let ingress = ingress_status(state);
        let mut nodes: Vec<NodeStatus> = state
            .configured
            .nodes()
            .into_iter()
            .map(|view| node_status(state, view, now))
            .collect();
        for (destination, pipeline) in state.router.iter().flat_map(|r| r.all()) {
            for view in pipeline.nodes() {
                nodes.push(routed_node_status(
                    &pipeline.balancer,
                    view.slot,
                    destination,
                    now,
                ));
            }
        }
        let mut status = Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            now_ms: now,
            uptime_seconds: state.started.elapsed().as_secs_f64(),
            healthy: true,
            attention: Vec::new(),
            spool,
            queue,
            ingress,
            nodes,
            lifecycle: LifecycleStatus {
                supervisor_pid: state.lifecycle.supervisor_pid,
                worker_pid: state.lifecycle.worker_pid,
                worker_started_ms: state.lifecycle.started_ms,
                crash_safe_reading: state.lifecycle.crash_safe_reading,
                last_notice: state.lifecycle.last_notice(),
            },
            reload: state.reloader.last(),
        };
        status.attention = status.needs_attention();
        status.healthy = status.attention.is_empty();
        status
    }

    fn needs_attention(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.spool.available {
            out.push(
                "the spool cannot be opened after I/O errors: nothing is stored or sent".into(),
            );
        }
        if self.spool.disk_full {
            out.push(
                "the spool's disk is full: ingress is paused until upstream acks free space".into(),
            );
        }
        if self.spool.used_ratio > SPOOL_ATTENTION_RATIO {
            out.push(format!(
                "the spool is {:.0} % full (spool.max_bytes): at 100 % senders are slowed down",
                self.spool.used_ratio * 100.0
            ));
        }
        if self.spool.dead_letters > 0 {
            out.push(format!(
                "{} dead letter(s): see `ackgate spool dead-letters list`",
                self.spool.dead_letters
            ));
        }
        if let Some(reload) = self.reload.as_ref().filter(|r| !r.ok) {
            out.push(format!(
                "the last reload was refused ({}): the config before it still runs",
                reload.error.as_deref().unwrap_or("no reason recorded")
            ));
        }
        for node in self.nodes.iter().filter(|n| !n.available && n.weight > 0) {
            out.push(format!(
                "node {} ({}) is down since {:.0} s: {}",
                node.name,
                node.address,
                node.since_seconds,
                node.down_reason.as_deref().unwrap_or("no reason recorded")
            ));
        }
        out
    }
}

fn spool_status(state: &AdminState, now: u64) -> SpoolStatus {
    let stats = state.spool.stats();
    let oldest = state.spool.oldest_received_ms();
    let dead_letters = state.spool.dead_letter_count().unwrap_or(0);
    SpoolStatus {
        path: state.spool.path().display().to_string(),
        records: stats.records,
        bytes: stats.bytes,
        max_bytes: stats.max_bytes,
        used_ratio: stats.bytes as f64 / stats.max_bytes.max(1) as f64,
        oldest_record_ms: oldest,
        oldest_record_age_seconds: oldest.map(|ms| age_seconds(now, ms)),
        dead_letters,
        dead_letter_bytes: stats.dead_letter_bytes,
        disk_full: stats.disk_full,
        available: stats.available,
        last_commit_ms: (stats.last_commit_ms > 0).then_some(stats.last_commit_ms),
        last_commit_age_seconds: (stats.last_commit_ms > 0)
            .then(|| age_seconds(now, stats.last_commit_ms)),
        last_commit_duration_seconds: (stats.last_commit_ms > 0)
            .then(|| stats.last_commit_micros as f64 / 1e6),
        commits: stats.commits,
        reopens: metrics().spool_reopens.get(),
    }
}

fn ingress_status(state: &AdminState) -> IngressStatus {
    let m = metrics();
    let (rate, history) = state.rates.events_in();
    IngressStatus {
        listen: state.ingress_listen.clone(),
        connections_open: m.connections_open.get(),
        connections_total: m.connections_total.get(),
        requests_accepted: m.requests_in.get(),
        events_accepted: m.events_in.get(),
        bytes_accepted: m.bytes_in.get(),
        acks_sent: m.acks_sent.get(),
        rejected: m
            .rejections()
            .into_iter()
            .map(|(reason, count)| Rejected { reason, count })
            .collect(),
        events_per_second: rate,
        events_history: history,
        destinations: m
            .destinations
            .counts()
            .into_iter()
            .map(|c| DestinationStatus {
                destination: c.destination,
                connections: c.connections,
                events_accepted: c.events_in,
                events_delivered: c.events_out,
                queued_records: c.queued_records,
                queued_bytes: c.queued_bytes,
            })
            .collect(),
    }
}

fn node_status(state: &AdminState, view: NodeView, now: u64) -> NodeStatus {
    let (rate, history) = state.rates.events_out(&view.name);
    NodeStatus {
        events_per_second: rate,
        events_history: history,
        ..health_status(&state.balancer, view.slot, view.address, now)
    }
}

/// Route "original": an original destination's node (its rates are not sampled).
fn routed_node_status(
    balancer: &crate::upstream::health::Balancer,
    slot: usize,
    destination: std::net::SocketAddr,
    now: u64,
) -> NodeStatus {
    health_status(balancer, slot, destination.to_string(), now)
}

fn health_status(
    balancer: &crate::upstream::health::Balancer,
    index: usize,
    address: String,
    now: u64,
) -> NodeStatus {
    let m = metrics();
    let health = balancer.node(index);
    let snapshot = health.snapshot();
    let name = health.name.clone();
    NodeStatus {
        address,
        weight: health.weight(),
        standby: health.standby(),
        available: snapshot.available,
        since_ms: snapshot.since_ms,
        since_seconds: age_seconds(now, snapshot.since_ms),
        down_reason: (!snapshot.available)
            .then(|| snapshot.last_error.clone())
            .flatten(),
        last_error: snapshot.last_error,
        connected: snapshot.connected,
        in_flight: m
            .in_flight
            .get_or_create(&crate::metrics::label("node", &name))
            .get(),
        acked_chunks: Metrics::node_count(&m.chunks_acked, &name),
        acked_events: Metrics::node_count(&m.events_out, &name),
        retries: Metrics::node_count(&m.retries, &name),
        ack_timeouts: Metrics::node_count(&m.ack_timeouts, &name),
        events_per_second: Rate::default(),
        events_history: Vec::new(),
        last_ack_ms: snapshot.last_ack_ms,
        last_ack_age_seconds: snapshot.last_ack_ms.map(|ms| age_seconds(now, ms)),
        name,
    }
}
