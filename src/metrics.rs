//! Prometheus metrics, and the small HTTP listener that serves them with /health and /ready.
//!
//! One process-wide set of metrics ([`metrics()`]), updated where things happen (ingress,
//! spool writer, node connections). Spool gauges (records, bytes, oldest age, dead letters)
//! are read from the spool at scrape time, so they are never stale. The listener is on its own
//! address (`[metrics] listen`), apart from the Forward port.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::spool::Spool;
use crate::upstream::dispatcher::Dispatcher;

/// Label set with one label, e.g. `node="agg-1"` or `reason="malformed_msgpack"`.
type Labels = Vec<(&'static str, String)>;

/// Every metric ackgate exports.
pub struct Metrics {
    registry: Registry,
    pub events_in: Counter,
    pub bytes_in: Counter,
    pub requests_in: Counter,
    pub acks_sent: Counter,
    pub retransmits: Counter,
    pub connections_open: Gauge,
    pub connections_total: Counter,
    pub rejected: Family<Labels, Counter>,
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
    pub commit_seconds: Histogram,
    pub commit_requests: Histogram,
    spool_records: Gauge,
    spool_bytes: Gauge,
    spool_max_bytes: Gauge,
    spool_oldest_age_seconds: Gauge<f64, AtomicU64>,
    spool_dead_letter_bytes: Gauge,
    spool_commits: Counter,
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
            connections_open: Gauge::default(),
            connections_total: Counter::default(),
            rejected: Family::default(),
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
            commit_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            commit_requests: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            spool_records: Gauge::default(),
            spool_bytes: Gauge::default(),
            spool_max_bytes: Gauge::default(),
            spool_oldest_age_seconds: Gauge::default(),
            spool_dead_letter_bytes: Gauge::default(),
            spool_commits: Counter::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "events_in",
            "Events received from senders and committed to the spool",
            m.events_in.clone(),
        );
        r.register(
            "bytes_in",
            "Entry bytes received from senders and committed",
            m.bytes_in.clone(),
        );
        r.register(
            "requests_in",
            "Forward requests received from senders and committed",
            m.requests_in.clone(),
        );
        r.register(
            "acks_sent",
            "Acks written to senders after the commit",
            m.acks_sent.clone(),
        );
        r.register(
            "retransmits",
            "Sender retransmits of committed chunks, acked again without spooling",
            m.retransmits.clone(),
        );
        r.register(
            "connections_open",
            "Sender connections open now",
            m.connections_open.clone(),
        );
        r.register(
            "connections",
            "Sender connections accepted",
            m.connections_total.clone(),
        );
        r.register(
            "rejected_connections",
            "Sender connections closed for invalid input, by reason",
            m.rejected.clone(),
        );
        r.register(
            "events_out",
            "Events acked by an upstream node",
            m.events_out.clone(),
        );
        r.register(
            "bytes_out",
            "Request bytes written to an upstream node",
            m.bytes_out.clone(),
        );
        r.register(
            "chunks_acked",
            "Chunks acked by an upstream node",
            m.chunks_acked.clone(),
        );
        r.register(
            "retries",
            "Chunks requeued after a failed attempt, by node",
            m.retries.clone(),
        );
        r.register(
            "ack_timeouts",
            "Connections aborted because a chunk was not acked in ack_timeout",
            m.ack_timeouts.clone(),
        );
        r.register(
            "in_flight_chunks",
            "Chunks written to a node and not yet acked",
            m.in_flight.clone(),
        );
        r.register(
            "node_available",
            "1 while a node may take records, 0 while it is considered down",
            m.node_available.clone(),
        );
        r.register(
            "dead_letters",
            "Records moved to the dead letters (undeliverable or too old)",
            m.dead_letters.clone(),
        );
        r.register(
            "splits",
            "Records split in two after repeated failures",
            m.splits.clone(),
        );
        r.register(
            "commit_duration_seconds",
            "Duration of one spool group commit, fsync included",
            m.commit_seconds.clone(),
        );
        r.register(
            "commit_group_requests",
            "Requests written per group commit",
            m.commit_requests.clone(),
        );
        r.register(
            "spool_records",
            "Records waiting in the spool",
            m.spool_records.clone(),
        );
        r.register(
            "spool_bytes",
            "Bytes of records waiting in the spool",
            m.spool_bytes.clone(),
        );
        r.register(
            "spool_max_bytes",
            "spool.max_bytes: ingress stops reading at this size",
            m.spool_max_bytes.clone(),
        );
        r.register(
            "spool_oldest_age_seconds",
            "Age of the oldest record in the spool",
            m.spool_oldest_age_seconds.clone(),
        );
        r.register(
            "spool_dead_letter_bytes",
            "Bytes of dead letters kept in the spool",
            m.spool_dead_letter_bytes.clone(),
        );
        r.register("spool_commits", "Spool commits", m.spool_commits.clone());
        r.register(
            "spool_reopens",
            "Times the spool database was closed and opened again after an I/O error or a failed commit",
            m.spool_reopens.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Prometheus text format, with spool gauges read now.
    pub fn render(&self, spool: Option<&Spool>) -> String {
        if let Some(spool) = spool {
            let stats = spool.stats();
            self.spool_records.set(stats.records as i64);
            self.spool_bytes.set(stats.bytes as i64);
            self.spool_max_bytes.set(stats.max_bytes as i64);
            self.spool_dead_letter_bytes
                .set(stats.dead_letter_bytes as i64);
            let counted = self.spool_commits.get();
            if stats.commits > counted {
                self.spool_commits.inc_by(stats.commits - counted);
            }
            let age = spool
                .oldest_received_ms()
                .map(|ms| crate::clock::now_ms().saturating_sub(ms) as f64 / 1000.0)
                .unwrap_or(0.0);
            self.spool_oldest_age_seconds.set(age);
        }
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

/// Deadline for reading an HTTP request head and writing the response.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// Serve `/metrics`, `/health` (the process answers) and `/ready` (ingress accepts and the
/// spool has room: 503 otherwise, so a load balancer can steer senders away) until shutdown.
pub async fn serve(
    listener: TcpListener,
    spool: Spool,
    dispatcher: Arc<Dispatcher>,
    accepting: Arc<AtomicBool>,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.cancelled() => return,
        };
        let Ok((stream, _)) = accepted else { continue };
        let spool = spool.clone();
        let dispatcher = dispatcher.clone();
        let accepting = accepting.load(Ordering::Acquire);
        tokio::spawn(async move {
            let _ =
                tokio::time::timeout(HTTP_TIMEOUT, answer(stream, &spool, &dispatcher, accepting))
                    .await;
        });
    }
}

async fn answer(
    mut stream: TcpStream,
    spool: &Spool,
    dispatcher: &Dispatcher,
    ingress_ready: bool,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("");
    let path = parts.next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => {
            // Reading the oldest record is a spool read, which may wait for a reopen: not on
            // a runtime worker.
            let spool = spool.clone();
            let text = tokio::task::spawn_blocking(move || metrics().render(Some(&spool)))
                .await
                .unwrap_or_default();
            ("200 OK", "text/plain; version=0.0.4; charset=utf-8", text)
        }
        ("GET", "/health") => match spool.stats().available {
            true => ("200 OK", "text/plain", "ok\n".to_string()),
            false => (
                "503 Service Unavailable",
                "text/plain",
                "spool unavailable: it cannot be opened again after an I/O error\n".to_string(),
            ),
        },
        ("GET", "/ready") => {
            let stats = spool.stats();
            if !stats.available {
                (
                    "503 Service Unavailable",
                    "text/plain",
                    "spool unavailable\n".into(),
                )
            } else if !ingress_ready {
                (
                    "503 Service Unavailable",
                    "text/plain",
                    "not accepting\n".into(),
                )
            } else if stats.disk_full {
                (
                    "503 Service Unavailable",
                    "text/plain",
                    "spool disk full\n".into(),
                )
            } else if stats.full {
                (
                    "503 Service Unavailable",
                    "text/plain",
                    "spool full\n".into(),
                )
            } else {
                ("200 OK", "text/plain", "ready\n".into())
            }
        }
        ("POST", "/retry") => {
            let count = dispatcher.retry_now().await;
            (
                "200 OK",
                "text/plain",
                format!("{count} record(s) waiting for a retry are sent now\n"),
            )
        }
        ("GET", _) | ("POST", _) => ("404 Not Found", "text/plain", "not found\n".into()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET or POST only\n".into(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
