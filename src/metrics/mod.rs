//! Prometheus metrics: their names, their help texts, and the text they render to.
//!
//! One process-wide set ([`metrics()`]), updated where things happen (ingress, spool writer,
//! node connections). Spool gauges (records, bytes, oldest age, dead letters) are set from the
//! spool at scrape time by whoever serves them ([`crate::admin`]), so they are never stale.
//! Nothing here reads the spool or the dispatcher, and nothing here owns a socket.

use std::collections::BTreeSet;
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, OnceLock};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Label set with one label, e.g. `node="agg-1"` or `reason="malformed_msgpack"`.
mod destinations;

pub use destinations::{DestinationCounts, DestinationMetrics, MAX_DESTINATION_LABELS};

type Labels = Vec<(&'static str, String)>;

/// Every metric ackgate exports.
pub struct Metrics {
    registry: Registry,
    pub events_in: Counter,
    pub bytes_in: Counter,
    pub requests_in: Counter,
    pub acks_sent: Counter,
    pub retransmits: Counter,
    /// Bytes of unfinished requests kept in the spool to leave their socket (invariant 10).
    pub kept_bytes: Counter,
    /// Sender connections this worker was handed by an earlier one (a crash, an upgrade).
    pub connections_adopted: Counter,
    pub connections_open: Gauge,
    pub connections_total: Counter,
    pub rejected: Family<Labels, Counter>,
    /// Transparent mode: per original destination.
    pub destinations: DestinationMetrics,
    pub events_out: Family<Labels, Counter>,
    pub bytes_out: Family<Labels, Counter>,
    pub chunks_acked: Family<Labels, Counter>,
    pub retries: Family<Labels, Counter>,
    pub ack_timeouts: Family<Labels, Counter>,
    pub in_flight: Family<Labels, Gauge>,
    pub node_available: Family<Labels, Gauge>,
    pub dead_letters: Counter,
    pub splits: Counter,
    pub spool_reopens: Counter,
    /// Reloads by `result`: `ok`, `invalid` (the file, or something it names, is not
    /// usable), `restart_required` (a key that only a restart changes).
    pub reloads: Family<Labels, Counter>,
    pub commit_seconds: Histogram,
    /// Per request: handed to the spool writer → its group commit starts.
    pub commit_queue_seconds: Histogram,
    /// Per request, as its connection sees it: handed to the spool → its commit answered.
    pub commit_wait_seconds: Histogram,
    /// Per acked request: complete on the socket → its ack written.
    pub ack_seconds: Histogram,
    pub commit_requests: Histogram,
    spool_records: Gauge,
    spool_bytes: Gauge,
    spool_max_bytes: Gauge,
    spool_oldest_age_seconds: Gauge<f64, AtomicU64>,
    spool_dead_letter_bytes: Gauge,
    spool_commits: Counter,
    /// Every `reason` label `rejected` has been counted with, for the admin API.
    rejected_reasons: Mutex<BTreeSet<String>>,
}

/// Factor √2 from 100 µs to ~4.6 min: fine enough to say where an ack's time goes.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, std::f64::consts::SQRT_2, 42))
}

/// The spool's numbers at scrape time.
#[derive(Debug, Clone, Copy, Default)]
pub struct SpoolGauges {
    pub records: u64,
    pub bytes: u64,
    pub max_bytes: u64,
    pub dead_letter_bytes: u64,
    pub commits: u64,
    pub oldest_age_seconds: f64,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("ackgate");
        let m = Metrics {
            events_in: Counter::default(),
            bytes_in: Counter::default(),
            requests_in: Counter::default(),
            acks_sent: Counter::default(),
            retransmits: Counter::default(),
            kept_bytes: Counter::default(),
            connections_adopted: Counter::default(),
            connections_open: Gauge::default(),
            connections_total: Counter::default(),
            rejected: Family::default(),
            destinations: DestinationMetrics::default(),
            events_out: Family::default(),
            bytes_out: Family::default(),
            chunks_acked: Family::default(),
            retries: Family::default(),
            ack_timeouts: Family::default(),
            in_flight: Family::default(),
            node_available: Family::default(),
            dead_letters: Counter::default(),
            splits: Counter::default(),
            spool_reopens: Counter::default(),
            reloads: Family::default(),
            commit_seconds: latency_histogram(),
            commit_queue_seconds: latency_histogram(),
            commit_wait_seconds: latency_histogram(),
            ack_seconds: latency_histogram(),
            commit_requests: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            spool_records: Gauge::default(),
            spool_bytes: Gauge::default(),
            spool_max_bytes: Gauge::default(),
            spool_oldest_age_seconds: Gauge::default(),
            spool_dead_letter_bytes: Gauge::default(),
            spool_commits: Counter::default(),
            rejected_reasons: Mutex::new(BTreeSet::new()),
            registry: Registry::default(),
        };
        m.register_ingress(&mut registry);
        m.register_upstream(&mut registry);
        m.register_spool(&mut registry);
        Metrics { registry, ..m }
    }

    fn register_ingress(&self, r: &mut Registry) {
        r.register(
            "events_in",
            "Events received from senders and committed to the spool",
            self.events_in.clone(),
        );
        r.register(
            "bytes_in",
            "Entry bytes received from senders and committed",
            self.bytes_in.clone(),
        );
        r.register(
            "requests_in",
            "Forward requests received from senders and committed",
            self.requests_in.clone(),
        );
        r.register(
            "acks_sent",
            "Acks written to senders after the commit",
            self.acks_sent.clone(),
        );
        r.register(
            "retransmits",
            "Sender retransmits of committed chunks, acked again without spooling",
            self.retransmits.clone(),
        );
        r.register(
            "kept_bytes",
            "Bytes of unfinished requests too large to wait unread in their socket, kept in the spool",
            self.kept_bytes.clone(),
        );
        r.register(
            "connections_adopted",
            "Sender connections this worker took over from an earlier one (a crash, an upgrade)",
            self.connections_adopted.clone(),
        );
        r.register(
            "connections_open",
            "Sender connections open now",
            self.connections_open.clone(),
        );
        r.register(
            "connections",
            "Sender connections accepted",
            self.connections_total.clone(),
        );
        r.register(
            "rejected_connections",
            "Sender connections closed for invalid input, by reason",
            self.rejected.clone(),
        );
        self.destinations.register(r);
    }

    fn register_upstream(&self, r: &mut Registry) {
        r.register(
            "events_out",
            "Events acked by an upstream node",
            self.events_out.clone(),
        );
        r.register(
            "bytes_out",
            "Request bytes written to an upstream node",
            self.bytes_out.clone(),
        );
        r.register(
            "chunks_acked",
            "Chunks acked by an upstream node",
            self.chunks_acked.clone(),
        );
        r.register(
            "retries",
            "Chunks requeued after a failed attempt, by node",
            self.retries.clone(),
        );
        r.register(
            "ack_timeouts",
            "Connections aborted because a chunk was not acked in ack_timeout",
            self.ack_timeouts.clone(),
        );
        r.register(
            "in_flight_chunks",
            "Chunks written to a node and not yet acked",
            self.in_flight.clone(),
        );
        r.register(
            "node_available",
            "1 while a node may take records, 0 while it is considered down",
            self.node_available.clone(),
        );
    }

    fn register_spool(&self, r: &mut Registry) {
        r.register(
            "dead_letters",
            "Records moved to the dead letters (undeliverable or too old)",
            self.dead_letters.clone(),
        );
        r.register(
            "splits",
            "Records split in two after repeated failures",
            self.splits.clone(),
        );
        r.register(
            "commit_duration_seconds",
            "Duration of one spool group commit, fsync included",
            self.commit_seconds.clone(),
        );
        r.register(
            "commit_queue_seconds",
            "Time a request waits for its group commit to start (the commit in progress, the writer's wake-up)",
            self.commit_queue_seconds.clone(),
        );
        r.register(
            "commit_wait_seconds",
            "Time from a request handed to the spool to its commit answered, as its connection sees it (queue, commit, the connection's wake-up)",
            self.commit_wait_seconds.clone(),
        );
        r.register(
            "ack_seconds",
            "Time from a request complete on the socket to its ack written (budget, commit queue, commit, ack write)",
            self.ack_seconds.clone(),
        );
        r.register(
            "commit_group_requests",
            "Requests written per group commit",
            self.commit_requests.clone(),
        );
        r.register(
            "spool_records",
            "Records waiting in the spool",
            self.spool_records.clone(),
        );
        r.register(
            "spool_bytes",
            "Bytes of records waiting in the spool",
            self.spool_bytes.clone(),
        );
        r.register(
            "spool_max_bytes",
            "spool.max_bytes: ingress stops reading at this size",
            self.spool_max_bytes.clone(),
        );
        r.register(
            "spool_oldest_age_seconds",
            "Age of the oldest record in the spool",
            self.spool_oldest_age_seconds.clone(),
        );
        r.register(
            "spool_dead_letter_bytes",
            "Bytes of dead letters kept in the spool",
            self.spool_dead_letter_bytes.clone(),
        );
        r.register("spool_commits", "Spool commits", self.spool_commits.clone());
        r.register("spool_reopens", "Times the spool database was closed and opened again after an I/O error or a failed commit", self.spool_reopens.clone());
        r.register(
            "reloads",
            "Config reloads (SIGHUP, ackgate reload, POST /api/reload) by result: ok, invalid, restart_required",
            self.reloads.clone(),
        );
    }

    /// Set the spool gauges (before a scrape).
    pub fn set_spool(&self, spool: SpoolGauges) {
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.spool_records.set(gauge(spool.records));
        self.spool_bytes.set(gauge(spool.bytes));
        self.spool_max_bytes.set(gauge(spool.max_bytes));
        self.spool_dead_letter_bytes
            .set(gauge(spool.dead_letter_bytes));
        let counted = self.spool_commits.get();
        if spool.commits > counted {
            self.spool_commits.inc_by(spool.commits - counted);
        }
        self.spool_oldest_age_seconds.set(spool.oldest_age_seconds);
    }

    /// Count a refused connection or request by its reason.
    pub fn reject(&self, reason: &str) {
        self.rejected.get_or_create(&label("reason", reason)).inc();
        let mut reasons = self
            .rejected_reasons
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if !reasons.contains(reason) {
            reasons.insert(reason.to_string());
        }
    }

    /// Every rejection reason seen so far, with its count.
    pub fn rejections(&self) -> Vec<(String, u64)> {
        let reasons = self
            .rejected_reasons
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        reasons
            .iter()
            .map(|r| {
                (
                    r.clone(),
                    self.rejected.get_or_create(&label("reason", r)).get(),
                )
            })
            .collect()
    }

    /// A counter of a per-node family, for the admin API.
    pub fn node_count(family: &Family<Labels, Counter>, node: &str) -> u64 {
        family.get_or_create(&label("node", node)).get()
    }

    /// Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// One label.
pub fn label(name: &'static str, value: &str) -> Labels {
    vec![(name, value.to_string())]
}

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}
