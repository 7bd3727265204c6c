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
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::connect::{open, ClientAuth, ClientTls, Link, UpstreamStream};
use super::dispatcher::{Backoff, Dispatcher, Sent, Taken};
use super::health::Balancer;
use crate::clock::sleep_until_opt;
use crate::forward::ack::{decode_ack, AckError};
use crate::forward::entries::{deflate_gzip, strip_empty_metadata, Compression};
use crate::forward::frame::Signal;
use crate::forward::packed::{chunk_id_base64, encode_packed_head, encode_packed_options};
use crate::metrics::label;
use crate::spool::{SpoolError, StoredRecord};

/// Largest ack response accepted from an aggregator.
const MAX_ACK_BYTES: usize = 4096;
/// How long a connection waits before taking again after a spool read failed (the record
/// stayed in the queue; the spool is reopening meanwhile).
const SPOOL_RETRY: Duration = Duration::from_millis(500);

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
    /// `upstream.socket_mark`, set on the node's connections and heartbeats.
    pub socket_mark: Option<u32>,
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
}

/// A chunk written and not yet acked: its identity only, the bytes stay in the spool.
struct InFlight {
    record: Sent,
    chunk_id: String,
    sent_at: Instant,
}

/// What a reload can tell a running node. New settings are taken between chunks (the
/// connection is kept: timing and window changes cause no duplicate); new TLS and handshake
/// settings are used from the next connect. Retirement (a node removed from the config) drains
/// like a shutdown: no new chunk, up to `shutdown_grace` for the acks of those in flight, then
/// the connection is aborted and the rest go back to the queue at once, for the other nodes.
pub struct NodeControl {
    pub settings: watch::Receiver<Arc<NodeSettings>>,
    /// Cancelled when a reload removes the node (its stop token is cancelled with it).
    pub retired: CancellationToken,
}

impl NodeControl {
    /// Settings no reload will change (unit tests, tools).
    pub fn fixed(settings: NodeSettings) -> NodeControl {
        NodeControl {
            settings: watch::channel(Arc::new(settings)).1,
            retired: CancellationToken::new(),
        }
    }
}

/// Run one node until shutdown (or retirement): wait for work, connect, send, reconnect with
/// backoff.
pub async fn run_node(
    control: NodeControl,
    dispatcher: Arc<Dispatcher>,
    balancer: Arc<Balancer>,
    shutdown: CancellationToken,
) {
    let live = control.settings.clone();
    let connector = move || {
        // The settings in force at each connect: a reload's certificates and credentials.
        let target = live.borrow().clone();
        async move { connect(&target).await }
    };
    run_node_with(control, dispatcher, balancer, shutdown, connector).await
}

/// [`run_node`] over any link: unit tests hand it in-memory pipes.
async fn run_node_with<L, F>(
    control: NodeControl,
    dispatcher: Arc<Dispatcher>,
    balancer: Arc<Balancer>,
    shutdown: CancellationToken,
    connect: impl Fn() -> F,
) where
    L: Link,
    F: Future<Output = Result<L, NodeError>>,
{
    let NodeControl {
        settings: mut live,
        retired,
    } = control;
    let index = live.borrow().index;
    let mut committed = dispatcher.spool().subscribe();
    let mut failures: u32 = 0;
    // Set by connect failures, so "reachable again" is said once, after the node was not.
    let mut unreachable = false;
    loop {
        let settings = live.borrow_and_update().clone();
        if !wait_until_needed(&settings, &dispatcher, &balancer, &shutdown, &mut committed).await {
            return;
        }
        let stream = match connect().await {
            Ok(stream) => stream,
            Err(e) => {
                balancer.failed(index, &e.to_string());
                unreachable = true;
                failures = failures.saturating_add(1);
                let delay = settings.reconnect.delay(failures);
                if failures == 1 || failures.is_power_of_two() {
                    warn!(node = %settings.name, error = %e, failures, retry_in = ?delay, "upstream node unreachable; records stay spooled");
                }
                if !pause(delay, &shutdown).await {
                    return;
                }
                continue;
            }
        };
        if unreachable {
            info!(node = %settings.name, after_failures = failures, "upstream node reachable again");
            unreachable = false;
        }
        balancer.connected(index);
        let mut session = Session {
            settings,
            live: &mut live,
            dispatcher: &dispatcher,
            balancer: &balancer,
            stream,
            in_flight: VecDeque::new(),
            acked: 0,
        };
        let result = session.run(&shutdown, &committed).await;
        balancer.disconnected(index);
        match result {
            Ok(()) => {
                failures = 0;
                session.close_gracefully().await;
            }
            Err(e) => {
                failures = if session.acked == 0 {
                    failures.saturating_add(1)
                } else {
                    1
                };
                let settings = session.settings.clone();
                // Abort before anything else: the RST must be on the wire before the chunks
                // can go out again, or a network that heals during the backoff delivers the
                // abandoned connection's queued chunks beside their retries (DESIGN.md).
                let in_flight = session.abort();
                if retired.is_cancelled() {
                    give_back_all(&settings, &dispatcher, &balancer, in_flight, &e).await;
                    return;
                }
                report_failure(&settings, &e, in_flight.len());
                balancer.failed(index, &e.to_string());
                requeue_all(&settings, &dispatcher, &balancer, in_flight, &e.to_string()).await;
                if !pause(settings.reconnect.delay(failures), &shutdown).await {
                    return;
                }
            }
        }
        if shutdown.is_cancelled() {
            return;
        }
    }
}

/// A retired node's connection ended with chunks unacked: they go back at once, with their
/// attempts unchanged, for the other nodes (the removal is not the records' failure).
async fn give_back_all(
    settings: &NodeSettings,
    dispatcher: &Dispatcher,
    balancer: &Balancer,
    in_flight: VecDeque<InFlight>,
    error: &NodeError,
) {
    warn!(node = %settings.name, chunks = in_flight.len(), reason = %error,
        "removed upstream node: aborted its connection; its unacked chunks go to the other nodes now, with the same chunk ids");
    crate::metrics::metrics()
        .in_flight
        .get_or_create(&label("node", &settings.name))
        .set(0);
    for done in in_flight {
        balancer.record_returned(settings.index);
        dispatcher.give_back(&done.record).await;
    }
}

/// Resolves when a reload sent new settings; never, once nobody can send any.
async fn settings_changed(live: &mut watch::Receiver<Arc<NodeSettings>>) {
    if live.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Wait until this node may be used and there is something to send. False on shutdown.
async fn wait_until_needed(
    settings: &NodeSettings,
    dispatcher: &Dispatcher,
    balancer: &Balancer,
    shutdown: &CancellationToken,
    committed: &mut watch::Receiver<u64>,
) -> bool {
    loop {
        loop {
            let changed = balancer.changed.notified();
            if balancer.should_connect(settings.index) {
                break;
            }
            tokio::select! {
                _ = changed => {}
                _ = shutdown.cancelled() => return false,
            }
        }
        tokio::select! {
            _ = dispatcher.wait_for_work(committed) => return true,
            _ = balancer.changed.notified() => {}
            _ = shutdown.cancelled() => return false,
        }
    }
}

/// Sleep for `delay` unless shutdown comes first (then false).
async fn pause(delay: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => true,
        _ = shutdown.cancelled() => false,
    }
}

fn report_failure(settings: &NodeSettings, error: &NodeError, chunks: usize) {
    match error {
        NodeError::AckTimeout { timeout, .. } => {
            crate::metrics::metrics()
                .ack_timeouts
                .get_or_create(&label("node", &settings.name))
                .inc();
            warn!(
                node = %settings.name, ack_timeout = ?timeout, chunks,
                "no ack from upstream node within ack_timeout; aborted the connection, resending with the same chunk ids"
            );
        }
        _ => warn!(node = %settings.name, error = %error, chunks,
            "upstream connection failed; aborted it, resending in-flight chunks with the same ids"),
    }
}

/// Every chunk of an aborted connection goes back to the queue, with backoff.
async fn requeue_all(
    settings: &NodeSettings,
    dispatcher: &Dispatcher,
    balancer: &Balancer,
    in_flight: VecDeque<InFlight>,
    reason: &str,
) {
    let m = crate::metrics::metrics();
    let node = label("node", &settings.name);
    m.retries
        .get_or_create(&node)
        .inc_by(in_flight.len() as u64);
    m.in_flight.get_or_create(&node).set(0);
    for done in in_flight {
        balancer.record_returned(settings.index);
        let attempts = done.record.attempts.saturating_add(1);
        dispatcher
            .requeue(&done.record, attempts, reason, &settings.name)
            .await;
    }
}

pub(super) async fn connect(settings: &NodeSettings) -> Result<UpstreamStream, NodeError> {
    open(
        &settings.address,
        settings.socket_mark,
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

/// The next record for this connection, waiting for one if the queue is empty.
async fn next_record(
    dispatcher: &Dispatcher,
    mut committed: watch::Receiver<u64>,
) -> Result<Taken, SpoolError> {
    loop {
        if let Some(taken) = dispatcher.take().await? {
            return Ok(taken);
        }
        dispatcher.wait_for_work(&mut committed).await;
    }
}

async fn poll_opt<F: Future + Unpin>(future: &mut Option<F>) -> F::Output {
    match future {
        Some(future) => future.await,
        None => std::future::pending().await,
    }
}

/// Write every byte of `parts`, in order, with as few system calls as the stream allows.
async fn write_all_vectored<W: tokio::io::AsyncWrite + Unpin>(
    stream: &mut W,
    parts: &[&[u8]],
) -> std::io::Result<()> {
    let mut slices: Vec<std::io::IoSlice<'_>> =
        parts.iter().map(|p| std::io::IoSlice::new(p)).collect();
    let mut rest: &mut [std::io::IoSlice<'_>] = &mut slices;
    while !rest.is_empty() {
        let n = stream.write_vectored(rest).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        std::io::IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}

/// A take in progress, kept across loop turns so that acks are read while it waits.
type Taking<'a> = Pin<Box<dyn Future<Output = Result<Taken, SpoolError>> + Send + 'a>>;

struct Session<'a, L> {
    /// The settings in force, refreshed between loop turns.
    settings: Arc<NodeSettings>,
    live: &'a mut watch::Receiver<Arc<NodeSettings>>,
    dispatcher: &'a Dispatcher,
    balancer: &'a Balancer,
    stream: L,
    in_flight: VecDeque<InFlight>,
    acked: u64,
}

impl<'a, L: Link> Session<'a, L> {
    /// Send and match acks until the connection fails (`Err`), the peer closes an idle
    /// connection, or shutdown has drained the window (`Ok`). Taking the next record runs
    /// beside reading acks: a slow spool read (a reopen after an I/O error) never keeps acks
    /// unread until their timeout, and a failed one only pauses taking.
    async fn run(
        &mut self,
        shutdown: &CancellationToken,
        committed: &watch::Receiver<u64>,
    ) -> Result<(), NodeError> {
        let dispatcher: &'a Dispatcher = self.dispatcher;
        let index = self.settings.index;
        let mut responses = BytesMut::with_capacity(1024);
        let mut out = Vec::new();
        let mut draining_until: Option<Instant> = None;
        let mut taking: Option<Taking<'a>> = None;
        let mut spool_retry_at: Option<Instant> = None;
        loop {
            if self.live.has_changed().unwrap_or(false) {
                self.settings = self.live.borrow_and_update().clone();
            }
            let window_open = draining_until.is_none() && self.window_open();
            let may_take = window_open && spool_retry_at.is_none() && self.balancer.may_take(index);
            if draining_until.is_some() && self.in_flight.is_empty() {
                return Ok(());
            }
            if !may_take {
                // Ahead of its weighted share now (or a standby whose primary came back):
                // a take waiting for work must not hand this node the next record.
                taking = None;
            } else if taking.is_none() {
                taking = Some(Box::pin(next_record(dispatcher, committed.clone())));
            }
            let ack_deadline = self
                .in_flight
                .front()
                .map(|f| f.sent_at + self.settings.ack_timeout);
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
                taken = poll_opt(&mut taking), if taking.is_some() => {
                    taking = None;
                    match taken {
                        // The balancer may have changed its mind while the take ran.
                        Ok(taken) if !self.balancer.may_take(index) => {
                            self.dispatcher.put_back(taken.record).await;
                        }
                        Ok(taken) => {
                            self.balancer.record_taken(index);
                            self.send(taken.record, &mut out).await?;
                        }
                        Err(e) => {
                            warn!(node = %self.settings.name, error = %e, retry_in = ?SPOOL_RETRY,
                                "cannot read the next record from the spool; nothing was taken, trying again");
                            spool_retry_at = Some(Instant::now() + SPOOL_RETRY);
                        }
                    }
                }
                _ = sleep_until_opt(spool_retry_at), if spool_retry_at.is_some() => {
                    spool_retry_at = None;
                }
                // Shares and availability changed: take again, or stop taking.
                _ = self.balancer.changed.notified(), if window_open => {}
                // A reload: the window, the ack timeout, the payload settings.
                _ = settings_changed(self.live) => {}
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
        let (payload, codec) = self.payload(&record);
        let payload_len: usize = payload.iter().map(Bytes::len).sum();
        // Head and options are built here; the entries go out from the record's own bytes.
        encode_packed_head(&record.tag, payload_len, record.signal, out);
        let head_len = out.len();
        encode_packed_options(&chunk_id, record.events, record.signal, codec, out);
        let (head, options) = out.split_at(head_len);
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
        let mut parts = Vec::with_capacity(payload.len() + 2);
        parts.push(head);
        parts.extend(payload.iter().map(|p| &p[..]));
        parts.push(options);
        let written = write_all_vectored(&mut self.stream, &parts);
        match timeout(self.settings.ack_timeout, written).await {
            Ok(Ok(())) => {
                m.bytes_out
                    .get_or_create(&label("node", &self.settings.name))
                    .inc_by((out.len() + payload_len) as u64);
                Ok(())
            }
            Ok(Err(e)) => Err(NodeError::Io(e.to_string())),
            Err(_) => Err(NodeError::WriteTimeout(self.settings.ack_timeout)),
        }
    }

    /// The entries as they go out: the record's own runs as they are, or one rewritten run when
    /// this node strips empty metadata or compresses.
    fn payload(&self, record: &StoredRecord) -> (Vec<Bytes>, Option<Compression>) {
        let strip = self.settings.strip_empty_metadata && record.signal == Signal::Logs;
        if !strip && self.settings.compress.is_none() {
            return (record.entries.parts().to_vec(), None);
        }
        let whole = record.entries.to_bytes();
        // Entries were validated at ingress; if the walk fails they go out unchanged.
        let stripped = strip
            .then(|| {
                strip_empty_metadata(&whole, crate::forward::MAX_DEPTH)
                    .ok()
                    .flatten()
            })
            .flatten();
        let entries = stripped.map(Bytes::from).unwrap_or(whole);
        match self.settings.compress {
            Some(codec) => (vec![Bytes::from(deflate_gzip(&entries))], Some(codec)),
            None => (vec![entries], None),
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
                if let Some(destination) = done.record.destination {
                    m.destinations
                        .delivered(destination, done.record.events as u64);
                }
                m.in_flight
                    .get_or_create(&node)
                    .set(self.in_flight.len() as i64);
                self.balancer.ack_received(self.settings.index);
                self.acked += 1;
            }
        }
    }

    /// Reset the connection now (RST, SO_LINGER 0: the kernel discards what it has not
    /// sent) and hand back what was in flight.
    fn abort(self) -> VecDeque<InFlight> {
        self.stream.abort();
        self.in_flight
    }

    async fn close_gracefully(&mut self) {
        let _ = timeout(Duration::from_secs(1), self.stream.shutdown()).await;
    }
}

#[cfg(test)]
mod tests {
    //! The node's ack matching, ack timeout and abort on tokio's paused clock, over in-memory
    //! pipes (`tokio::io::duplex`), against a real dispatcher and spool.

    use super::*;
    use crate::forward::{Decoded, Frame, FrameDecoder, Limits};
    use crate::spool::testing::{append, config, entry, keys_after_flush, stop, WAIT};
    use crate::spool::{Spool, SpoolWriter};
    use crate::upstream::dispatcher::PoisonPolicy;
    use crate::upstream::health::{HealthSettings, HeartbeatKind};
    use bytes::Bytes;
    use tokio::io::DuplexStream;
    use tokio::sync::{mpsc, Mutex};

    impl Link for DuplexStream {
        fn abort(self) {
            drop(self);
        }
    }

    const ACK_TIMEOUT: Duration = Duration::from_secs(2);
    const RECONNECT: Backoff = Backoff {
        initial: Duration::from_secs(1),
        max: Duration::from_secs(60),
    };

    struct Harness {
        _dir: tempfile::TempDir,
        spool: Spool,
        writer: SpoolWriter,
        dispatcher: Arc<Dispatcher>,
        links: mpsc::UnboundedSender<DuplexStream>,
        shutdown: CancellationToken,
        retired: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    fn settings() -> NodeSettings {
        NodeSettings {
            index: 0,
            name: "agg".into(),
            address: "in-memory".into(),
            ack_timeout: ACK_TIMEOUT,
            connect_timeout: Duration::from_secs(5),
            window: 8,
            window_bytes: 8 << 20,
            reconnect: RECONNECT,
            shutdown_grace: Duration::from_secs(5),
            compress: None,
            strip_empty_metadata: false,
            tls: None,
            auth: None,
            socket_mark: None,
        }
    }

    /// `records` spooled (on the real clock), then the clock paused and the node started with
    /// a connector that hands out the pipes the test pushes.
    async fn start(records: u8) -> Harness {
        start_with(records, settings()).await
    }

    /// [`start`] with these node settings.
    async fn start_with(records: u8, settings: NodeSettings) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let (spool, writer) = Spool::open(&config(&dir)).unwrap();
        for i in 0..records {
            append(&spool, &format!("t{i}"), &entry(i), 1)
                .await
                .unwrap();
        }
        tokio::time::pause();
        let policy = PoisonPolicy {
            split_after_attempts: 100,
            max_age: None,
        };
        let dispatcher = Arc::new(Dispatcher::new(spool.clone(), RECONNECT, policy));
        let health = HealthSettings {
            heartbeat: HeartbeatKind::None,
            interval: Duration::from_secs(1),
            phi_threshold: 16.0,
            phi_failure_detector: false,
            hard_timeout: Duration::from_secs(60),
            recover_wait: Duration::from_secs(10),
        };
        let balancer = Arc::new(Balancer::new(vec![("agg".into(), 1, false)], health, 8));
        let (links, rx) = mpsc::unbounded_channel::<DuplexStream>();
        let rx = Arc::new(Mutex::new(rx));
        let connector = move || {
            let rx = rx.clone();
            async move { rx.lock().await.recv().await.ok_or(NodeError::Closed(0)) }
        };
        let shutdown = CancellationToken::new();
        let control = NodeControl::fixed(settings);
        let retired = control.retired.clone();
        let task = tokio::spawn(run_node_with(
            control,
            dispatcher.clone(),
            balancer,
            shutdown.clone(),
            connector,
        ));
        Harness {
            _dir: dir,
            spool,
            writer,
            dispatcher,
            links,
            shutdown,
            retired,
            task,
        }
    }

    impl Harness {
        /// A new connection as the aggregator sees it; a tiny pipe forces partial reads.
        fn connect(&self) -> Aggregator {
            let (node_side, aggregator_side) = tokio::io::duplex(64);
            self.links.send(node_side).unwrap();
            Aggregator {
                pipe: aggregator_side,
                buf: BytesMut::new(),
                decoder: FrameDecoder::new(Limits::default()),
            }
        }

        async fn keys_after_flush(&self) -> Vec<u64> {
            keys_after_flush(&self.spool).await
        }

        async fn stop(self) {
            self.shutdown.cancel();
            let _ = self.task.await;
            stop(self.writer).await;
        }
    }

    struct Aggregator {
        pipe: DuplexStream,
        buf: BytesMut,
        decoder: FrameDecoder,
    }

    impl Aggregator {
        async fn request(&mut self) -> Frame {
            loop {
                if let Some(Decoded::Frame(frame)) = self.decoder.decode(&mut self.buf).unwrap() {
                    return frame;
                }
                let n = tokio::time::timeout(WAIT, self.pipe.read_buf(&mut self.buf))
                    .await
                    .expect("no request")
                    .unwrap();
                assert!(n > 0, "closed before a whole request");
            }
        }

        async fn ack(&mut self, frame: &Frame) {
            let mut out = Vec::new();
            crate::forward::ack::encode_ack(frame.chunk.as_ref().unwrap(), &mut out);
            self.pipe.write_all(&out).await.unwrap();
        }

        /// Wait for the node to close the pipe; returns when it did.
        async fn closed(&mut self) -> Instant {
            let mut rest = [0u8; 64];
            loop {
                match tokio::time::timeout(WAIT * 10, self.pipe.read(&mut rest)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return Instant::now(),
                    Ok(Ok(_)) => {}
                    Err(_) => panic!("the node never closed the connection"),
                }
            }
        }
    }

    #[tokio::test]
    async fn an_ack_timeout_resets_the_connection_at_once_then_resends_the_same_chunk() {
        let harness = start(1).await;
        let mut first = harness.connect();
        let request = first.request().await;
        let sent = Instant::now();
        let closed = first.closed().await;
        // Closed when the ack timed out (the timer wheel rounds up to the millisecond), not
        // after the reconnect backoff, which is at least RECONNECT.initial / 2 (DESIGN.md).
        let waited = closed - sent;
        assert!(
            waited >= ACK_TIMEOUT && waited <= ACK_TIMEOUT + Duration::from_millis(5),
            "closed {waited:?} after the request"
        );
        let mut second = harness.connect();
        let resent = second.request().await;
        let reconnected = Instant::now();
        assert!(
            reconnected - closed >= RECONNECT.initial / 2,
            "reconnected {:?} after the abort, inside the backoff",
            reconnected - closed
        );
        assert_eq!(
            resent.chunk, request.chunk,
            "the same chunk id (invariant 3)"
        );
        assert_eq!(resent.entries, request.entries);
        second.ack(&resent).await;
        let start = Instant::now();
        while !harness.keys_after_flush().await.is_empty() {
            assert!(start.elapsed() < WAIT, "the acked record was never deleted");
            tokio::task::yield_now().await;
        }
        harness.stop().await;
    }

    #[tokio::test]
    async fn acks_in_any_order_delete_their_records_and_keep_the_connection() {
        let harness = start(3).await;
        let mut aggregator = harness.connect();
        let mut requests = Vec::new();
        for _ in 0..3 {
            requests.push(aggregator.request().await);
        }
        for request in requests.iter().rev() {
            aggregator.ack(request).await;
        }
        let start = Instant::now();
        while !harness.keys_after_flush().await.is_empty() {
            assert!(start.elapsed() < WAIT, "acked records were never deleted");
            tokio::task::yield_now().await;
        }
        // Well past the ack timeout, nothing is resent and the connection stays open.
        tokio::time::sleep(ACK_TIMEOUT * 3).await;
        let mut probe = [0u8; 1];
        let idle =
            tokio::time::timeout(Duration::from_millis(1), aggregator.pipe.read(&mut probe)).await;
        assert!(idle.is_err(), "the node wrote or closed: {idle:?}");
        assert!(harness.dispatcher.audit().await.in_flight.is_empty());
        harness.stop().await;
    }

    #[tokio::test]
    async fn an_ack_for_an_unknown_chunk_aborts_at_once_and_requeues() {
        let harness = start(1).await;
        let mut aggregator = harness.connect();
        let request = aggregator.request().await;
        let sent = Instant::now();
        let mut wrong = request.clone();
        wrong.chunk = Some(Bytes::from_static(b"\xa4nope"));
        aggregator.ack(&wrong).await;
        let waited = aggregator.closed().await - sent;
        assert!(
            waited < Duration::from_millis(5),
            "aborted {waited:?} after the bad ack"
        );
        let mut again = harness.connect();
        assert_eq!(again.request().await.chunk, request.chunk);
        again.ack(&request).await;
        harness.stop().await;
    }

    #[tokio::test]
    async fn a_retired_node_drains_then_gives_its_unacked_chunks_back_at_once() {
        // An ack timeout longer than the grace: what ends the drain is the removal's grace.
        let settings = NodeSettings {
            ack_timeout: Duration::from_secs(60),
            ..settings()
        };
        let grace = settings.shutdown_grace;
        let harness = start_with(2, settings).await;
        let mut aggregator = harness.connect();
        let first = aggregator.request().await;
        let second = aggregator.request().await;
        // One ack arrives; the node is removed with the other chunk in flight (no wait on
        // the spool here: the paused clock would jump to the ack deadline meanwhile).
        aggregator.ack(&first).await;
        // Removed by a reload: retired, then stopped (as the pipeline does).
        let retired_at = Instant::now();
        harness.retired.cancel();
        harness.shutdown.cancel();
        let closed = aggregator.closed().await;
        let waited = closed - retired_at;
        assert!(
            waited >= grace && waited <= grace + Duration::from_millis(5),
            "the unacked chunk had shutdown_grace to be acked: closed after {waited:?}"
        );
        tokio::time::timeout(WAIT, &mut { harness.task })
            .await
            .unwrap()
            .unwrap();
        // Back at once (no backoff) and not counted as a failed attempt: the next node that
        // takes finds it due now, with the same key (hence the same chunk id).
        let taken = harness
            .dispatcher
            .take()
            .await
            .unwrap()
            .expect("due at once");
        assert_eq!(
            taken.record.attempts, 0,
            "the removal is not the record's failure"
        );
        let keys = keys_after_flush(&harness.spool).await;
        assert_eq!(keys, vec![taken.record.key]);
        let chunk_id = chunk_id_base64(&taken.record.chunk_id);
        assert!(
            second
                .chunk
                .as_ref()
                .unwrap()
                .ends_with(chunk_id.as_bytes()),
            "the same chunk id as the chunk in flight"
        );
        stop(harness.writer).await;
    }
}
