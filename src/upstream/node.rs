//! One aggregator: connect, send a window of chunks, match acks by chunk id, abort on trouble.
//!
//! The connection is opened only when there is something to send. Up to `window` chunks are in
//! flight; acks are matched by id in any order, and each ack deletes its record (invariant 2).
//! When the oldest chunk has waited `ack_timeout`, or the peer closes, resets, or answers
//! anything but a known ack, the connection is *aborted* (SO_LINGER 0, so the kernel discards
//! what is still queued instead of delivering it late beside the retry: DESIGN.md) and every
//! in-flight record goes back to the queue with backoff, to be resent with the same chunk id
//! (invariant 3).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::connect::{open, ClientAuth, ClientTls, UpstreamStream};
use super::dispatcher::{Backoff, Dispatcher, Sent};
use super::health::Balancer;
use crate::clock::sleep_until_opt;
use crate::forward::ack::{decode_ack, AckError};
use crate::forward::entries::{deflate_gzip, strip_empty_metadata, Compression};
use crate::forward::frame::Signal;
use crate::forward::packed::{chunk_id_base64, encode_packed_forward};
use crate::metrics::label;
use crate::spool::StoredRecord;

/// Largest ack response accepted from an aggregator.
const MAX_ACK_BYTES: usize = 4096;

/// Settings of one node connection.
#[derive(Clone)]
pub struct NodeSettings {
    /// Position of this node in the [`Balancer`].
    pub index: usize,
    pub name: String,
    pub address: String,
    pub ack_timeout: Duration,
    pub connect_timeout: Duration,
    pub window: usize,
    /// Entry bytes in flight per connection (one chunk always fits).
    pub window_bytes: usize,
    pub reconnect: Backoff,
    pub shutdown_grace: Duration,
    /// Compress chunk entries (gzip) for this node.
    pub compress: Option<Compression>,
    /// Rewrite empty v1.5 metadata for this node (the opt-in exception to invariant 6).
    pub strip_empty_metadata: bool,
    /// TLS, when the node has `tls = true`.
    pub tls: Option<ClientTls>,
    /// Shared-key handshake, when the node has a key.
    pub auth: Option<ClientAuth>,
}

/// Why a node connection failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("connect to {address} failed: {reason}")]
    Connect { address: String, reason: String },
    #[error("no ack within ack_timeout {timeout:?} for {chunks} chunk(s)")]
    AckTimeout { timeout: Duration, chunks: usize },
    #[error("write timed out after {0:?}")]
    WriteTimeout(Duration),
    #[error("connection closed by the aggregator with {0} chunk(s) unacked")]
    Closed(usize),
    #[error("socket error: {0}")]
    Io(String),
    #[error("unexpected response: {0}")]
    BadResponse(AckError),
    #[error("ack for unknown chunk id {0:?}")]
    UnknownAck(String),
    #[error("response bytes without a chunk in flight")]
    Unsolicited,
    #[error("spool: {0}")]
    Spool(String),
}

/// A chunk written and not yet acked: its identity only, the bytes stay in the spool.
struct InFlight {
    record: Sent,
    chunk_id: String,
    sent_at: Instant,
}

/// Run one node until shutdown: wait for work, connect, send, reconnect with backoff.
pub async fn run_node(
    settings: NodeSettings,
    dispatcher: Arc<Dispatcher>,
    balancer: Arc<Balancer>,
    shutdown: CancellationToken,
) {
    let index = settings.index;
    let mut committed = dispatcher.spool().subscribe();
    let mut failures: u32 = 0;
    // Set by connect failures, so "reachable again" is said once, after the node was not.
    let mut unreachable = false;
    loop {
        // Wait until this node may be used and there is something to send.
        loop {
            let changed = balancer.changed.notified();
            if balancer.should_connect(index) {
                break;
            }
            tokio::select! {
                _ = changed => {}
                _ = shutdown.cancelled() => return,
            }
        }
        tokio::select! {
            _ = dispatcher.wait_for_work(&mut committed) => {}
            _ = balancer.changed.notified() => continue,
            _ = shutdown.cancelled() => return,
        }
        let stream = match connect(&settings).await {
            Ok(stream) => stream,
            Err(e) => {
                balancer.failed(index, &e.to_string());
                unreachable = true;
                failures = failures.saturating_add(1);
                let delay = settings.reconnect.delay(failures);
                if failures == 1 || failures.is_power_of_two() {
                    warn!(node = %settings.name, error = %e, failures, retry_in = ?delay, "upstream node unreachable; records stay spooled");
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => continue,
                    _ = shutdown.cancelled() => return,
                }
            }
        };
        if unreachable {
            info!(node = %settings.name, after_failures = failures, "upstream node reachable again");
            unreachable = false;
        }
        balancer.connected(index);
        let mut session = Session {
            settings: &settings,
            dispatcher: &dispatcher,
            balancer: &balancer,
            stream,
            in_flight: VecDeque::new(),
            acked: 0,
        };
        let result = session.run(&shutdown, &mut committed).await;
        let acked = session.acked;
        balancer.disconnected(index);
        match result {
            Ok(()) => {
                failures = 0;
                session.close_gracefully().await;
            }
            Err(e) => {
                let chunks = session.in_flight.len();
                match &e {
                    NodeError::AckTimeout { timeout, .. } => {
                        crate::metrics::metrics()
                            .ack_timeouts
                            .get_or_create(&label("node", &settings.name))
                            .inc();
                        warn!(
                        node = %settings.name, ack_timeout = ?timeout, chunks,
                        "no ack from upstream node within ack_timeout; aborting the connection and resending with the same chunk ids"
                        );
                    }
                    _ => warn!(node = %settings.name, error = %e, chunks,
                        "upstream connection failed; aborting it and resending in-flight chunks with the same ids"),
                }
                // A spool problem is ours, not the node's: do not mark it down for it.
                if !matches!(e, NodeError::Spool(_)) {
                    balancer.failed(index, &e.to_string());
                }
                session.abort_and_requeue(&e.to_string()).await;
                if acked == 0 {
                    failures = failures.saturating_add(1);
                } else {
                    failures = 1;
                }
                let delay = settings.reconnect.delay(failures);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
        }
        if shutdown.is_cancelled() {
            return;
        }
    }
}

async fn connect(settings: &NodeSettings) -> Result<UpstreamStream, NodeError> {
    open(
        &settings.address,
        settings.tls.as_ref(),
        settings.auth.as_ref(),
        settings.connect_timeout,
    )
    .await
    .map_err(|e| NodeError::Connect {
        address: settings.address.clone(),
        reason: e.to_string(),
    })
}

struct Session<'a> {
    settings: &'a NodeSettings,
    dispatcher: &'a Dispatcher,
    balancer: &'a Balancer,
    stream: UpstreamStream,
    in_flight: VecDeque<InFlight>,
    acked: u64,
}

impl Session<'_> {
    /// Send and match acks until the connection fails (`Err`), the peer closes an idle
    /// connection, or shutdown has drained the window (`Ok`).
    async fn run(
        &mut self,
        shutdown: &CancellationToken,
        committed: &mut tokio::sync::watch::Receiver<u64>,
    ) -> Result<(), NodeError> {
        let mut responses = BytesMut::with_capacity(1024);
        let mut out = Vec::new();
        let mut draining_until: Option<Instant> = None;
        loop {
            // Fill the window, within this node's weighted share.
            let index = self.settings.index;
            while draining_until.is_none() && self.window_open() && self.balancer.may_take(index) {
                let taken = self
                    .dispatcher
                    .take()
                    .await
                    .map_err(|e| NodeError::Spool(e.to_string()))?;
                let Some(taken) = taken else { break };
                self.balancer.record_taken(index);
                self.send(taken.record, &mut out).await?;
            }
            if draining_until.is_some() && self.in_flight.is_empty() {
                return Ok(());
            }
            let ack_deadline = self
                .in_flight
                .front()
                .map(|f| f.sent_at + self.settings.ack_timeout);
            let window_open = draining_until.is_none() && self.window_open();
            // Wait for new work only when this node may take it: a node ahead of its weighted
            // share waits for the balancer instead (else it would spin on buffered records).
            let may_take = window_open && self.balancer.may_take(index);
            tokio::select! {
                read = self.stream.read_buf(&mut responses) => {
                    match read {
                        Ok(0) => {
                            if self.in_flight.is_empty() {
                                debug!(node = %self.settings.name, "idle upstream connection closed by peer");
                                return Ok(());
                            }
                            return Err(NodeError::Closed(self.in_flight.len()));
                        }
                        Ok(_) => self.match_acks(&mut responses)?,
                        Err(e) => return Err(NodeError::Io(e.to_string())),
                    }
                }
                _ = sleep_until_opt(ack_deadline) => {
                    return Err(NodeError::AckTimeout {
                        timeout: self.settings.ack_timeout,
                        chunks: self.in_flight.len(),
                    });
                }
                _ = self.dispatcher.wait_for_work(committed), if may_take => {}
                _ = self.balancer.changed.notified(), if window_open => {}
                _ = shutdown.cancelled(), if draining_until.is_none() => {
                    draining_until = Some(Instant::now() + self.settings.shutdown_grace);
                }
                _ = sleep_until_opt(draining_until) => {
                    return Err(NodeError::Io(format!(
                        "shutdown_grace {:?} elapsed with {} chunk(s) unacked",
                        self.settings.shutdown_grace,
                        self.in_flight.len()
                    )));
                }
            }
        }
    }

    /// Room for one more chunk: under `window` chunks and `window_bytes` entry bytes.
    fn window_open(&self) -> bool {
        let bytes: usize = self.in_flight.iter().map(|f| f.record.entries_len).sum();
        self.in_flight.len() < self.settings.window
            && (self.in_flight.is_empty() || bytes < self.settings.window_bytes)
    }

    async fn send(&mut self, record: StoredRecord, out: &mut Vec<u8>) -> Result<(), NodeError> {
        let chunk_id = chunk_id_base64(&record.chunk_id);
        out.clear();
        let stripped = if self.settings.strip_empty_metadata && record.signal == Signal::Logs {
            // Entries were validated at ingress; if the walk fails they go out unchanged.
            strip_empty_metadata(&record.entries, 64).ok().flatten()
        } else {
            None
        };
        let entries: &[u8] = stripped.as_deref().unwrap_or(&record.entries);
        let compressed = self
            .settings
            .compress
            .map(|codec| (codec, deflate_gzip(entries)));
        let (payload, codec) = match &compressed {
            Some((codec, bytes)) => (&bytes[..], Some(*codec)),
            None => (entries, None),
        };
        encode_packed_forward(
            &record.tag,
            payload,
            &chunk_id,
            record.events,
            record.signal,
            codec,
            out,
        );
        // Counted as in flight before the write: if the write fails, it is requeued.
        self.in_flight.push_back(InFlight {
            record: Sent::of(&record),
            chunk_id,
            sent_at: Instant::now(),
        });
        let m = crate::metrics::metrics();
        m.in_flight
            .get_or_create(&label("node", &self.settings.name))
            .set(self.in_flight.len() as i64);
        match timeout(self.settings.ack_timeout, self.stream.write_all(out)).await {
            Ok(Ok(())) => {
                m.bytes_out
                    .get_or_create(&label("node", &self.settings.name))
                    .inc_by(out.len() as u64);
                Ok(())
            }
            Ok(Err(e)) => Err(NodeError::Io(e.to_string())),
            Err(_) => Err(NodeError::WriteTimeout(self.settings.ack_timeout)),
        }
    }

    fn match_acks(&mut self, responses: &mut BytesMut) -> Result<(), NodeError> {
        loop {
            let decoded = decode_ack(responses, MAX_ACK_BYTES).map_err(NodeError::BadResponse)?;
            let Some((value, used)) = decoded else {
                if responses.len() > MAX_ACK_BYTES {
                    return Err(NodeError::BadResponse(AckError::NoAck));
                }
                return Ok(());
            };
            if self.in_flight.is_empty() {
                return Err(NodeError::Unsolicited);
            }
            let position = self
                .in_flight
                .iter()
                .position(|f| f.chunk_id.as_bytes() == value);
            let Some(position) = position else {
                return Err(NodeError::UnknownAck(
                    String::from_utf8_lossy(value).into_owned(),
                ));
            };
            let _ = responses.split_to(used);
            if let Some(done) = self.in_flight.remove(position) {
                self.dispatcher.acked(&done.record);
                let m = crate::metrics::metrics();
                let node = label("node", &self.settings.name);
                m.chunks_acked.get_or_create(&node).inc();
                m.events_out
                    .get_or_create(&node)
                    .inc_by(done.record.events as u64);
                m.in_flight
                    .get_or_create(&node)
                    .set(self.in_flight.len() as i64);
                self.balancer.ack_received(self.settings.index);
                self.acked += 1;
            }
        }
    }

    /// RST instead of FIN: queued bytes must not reach the aggregator after we gave up.
    async fn abort_and_requeue(&mut self, reason: &str) {
        self.stream.set_abort_on_close();
        let m = crate::metrics::metrics();
        let node = label("node", &self.settings.name);
        m.retries
            .get_or_create(&node)
            .inc_by(self.in_flight.len() as u64);
        m.in_flight.get_or_create(&node).set(0);
        for done in self.in_flight.drain(..) {
            self.balancer.record_returned(self.settings.index);
            let attempts = done.record.attempts.saturating_add(1);
            self.dispatcher
                .requeue(&done.record, attempts, reason, &self.settings.name)
                .await;
        }
    }

    async fn close_gracefully(&mut self) {
        let _ = timeout(Duration::from_secs(1), self.stream.shutdown()).await;
    }
}

/// Probe every node each `interval` as `upstream.heartbeat_type` says, feed the replies to the
/// balancer's failure detectors, and let them detach silent nodes (PROTOCOL.md §8).
pub async fn run_heartbeats(
    nodes: Vec<NodeSettings>,
    balancer: Arc<Balancer>,
    shutdown: CancellationToken,
) {
    use super::health::HeartbeatKind;
    let settings = balancer.settings();
    if settings.heartbeat == HeartbeatKind::None || nodes.is_empty() {
        return;
    }
    let udp = if settings.heartbeat == HeartbeatKind::Udp {
        match tokio::net::UdpSocket::bind("0.0.0.0:0").await {
            Ok(socket) => Some(Arc::new(socket)),
            Err(e) => {
                warn!(error = %e, "cannot open the UDP heartbeat socket; nodes are judged by their connections only");
                None
            }
        }
    } else {
        None
    };
    // Resolved once, like fluentd without expire_dns_cache: replies must come from exactly here.
    let mut targets = Vec::with_capacity(nodes.len());
    for node in &nodes {
        let resolved = tokio::net::lookup_host(&node.address)
            .await
            .ok()
            .and_then(|mut addrs| addrs.next());
        targets.push(resolved);
    }
    if let Some(socket) = udp.clone() {
        let balancer = balancer.clone();
        let targets = targets.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            loop {
                let received = tokio::select! {
                    r = socket.recv_from(&mut buf) => r,
                    _ = shutdown.cancelled() => return,
                };
                if let Ok((_, from)) = received {
                    match targets.iter().position(|t| *t == Some(from)) {
                        Some(index) => balancer.heartbeat(index),
                        None => debug!(%from, "heartbeat reply from an unknown address"),
                    }
                }
            }
        });
    }
    let mut ticker = tokio::time::interval(settings.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        for (index, node) in nodes.iter().enumerate() {
            match (&udp, targets[index]) {
                (Some(socket), Some(target)) => {
                    let _ = socket.send_to(b"\0", target).await;
                }
                (Some(_), None) => {}
                (None, _) => {
                    let balancer = balancer.clone();
                    let node = node.clone();
                    let deadline = settings.interval.min(node.connect_timeout);
                    tokio::spawn(async move {
                        let probe = NodeSettings {
                            connect_timeout: deadline,
                            ..node
                        };
                        if let Ok(mut stream) = connect(&probe).await {
                            let _ = timeout(deadline, stream.shutdown()).await;
                            balancer.heartbeat(index);
                        }
                    });
                }
            }
            balancer.check(index);
        }
    }
}
