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
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::dispatcher::{Backoff, Dispatcher};
use crate::forward::ack::{decode_ack, AckError};
use crate::forward::packed::{chunk_id_base64, encode_packed_forward};
use crate::spool::StoredRecord;

/// Largest ack response accepted from an aggregator.
const MAX_ACK_BYTES: usize = 4096;

/// Settings of one node connection.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    pub name: String,
    pub address: String,
    pub ack_timeout: Duration,
    pub connect_timeout: Duration,
    pub window: usize,
    pub reconnect: Backoff,
    pub shutdown_grace: Duration,
}

/// Why a node connection failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("connect to {address} failed: {reason}")]
    Connect { address: String, reason: String },
    #[error("connect to {address} timed out after {timeout:?}")]
    ConnectTimeout { address: String, timeout: Duration },
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

/// A chunk written and not yet acked.
struct InFlight {
    record: StoredRecord,
    chunk_id: String,
    sent_at: Instant,
}

/// Run one node until shutdown: wait for work, connect, send, reconnect with backoff.
pub async fn run_node(
    settings: NodeSettings,
    dispatcher: Arc<Dispatcher>,
    shutdown: CancellationToken,
) {
    let mut committed = dispatcher.spool().subscribe();
    let mut failures: u32 = 0;
    loop {
        tokio::select! {
            _ = dispatcher.wait_for_work(&mut committed) => {}
            _ = shutdown.cancelled() => return,
        }
        let stream = match connect(&settings).await {
            Ok(stream) => stream,
            Err(e) => {
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
        if failures > 0 {
            info!(node = %settings.name, after_failures = failures, "upstream node reachable again");
        }
        let mut session = Session {
            settings: &settings,
            dispatcher: &dispatcher,
            stream,
            in_flight: VecDeque::new(),
            acked: 0,
        };
        let result = session.run(&shutdown, &mut committed).await;
        let acked = session.acked;
        match result {
            Ok(()) => {
                failures = 0;
                session.close_gracefully().await;
            }
            Err(e) => {
                let chunks = session.in_flight.len();
                match &e {
                    NodeError::AckTimeout { timeout, .. } => warn!(
                        node = %settings.name, ack_timeout = ?timeout, chunks,
                        "no ack from upstream node within ack_timeout; aborting the connection and resending with the same chunk ids"
                    ),
                    _ => warn!(node = %settings.name, error = %e, chunks,
                        "upstream connection failed; aborting it and resending in-flight chunks with the same ids"),
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

async fn connect(settings: &NodeSettings) -> Result<TcpStream, NodeError> {
    match timeout(
        settings.connect_timeout,
        TcpStream::connect(&settings.address),
    )
    .await
    {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(e)) => Err(NodeError::Connect {
            address: settings.address.clone(),
            reason: e.to_string(),
        }),
        Err(_) => Err(NodeError::ConnectTimeout {
            address: settings.address.clone(),
            timeout: settings.connect_timeout,
        }),
    }
}

struct Session<'a> {
    settings: &'a NodeSettings,
    dispatcher: &'a Dispatcher,
    stream: TcpStream,
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
            // Fill the window.
            while draining_until.is_none() && self.in_flight.len() < self.settings.window {
                let taken = self
                    .dispatcher
                    .take()
                    .await
                    .map_err(|e| NodeError::Spool(e.to_string()))?;
                let Some(taken) = taken else { break };
                self.send(taken.record, &mut out).await?;
            }
            if draining_until.is_some() && self.in_flight.is_empty() {
                return Ok(());
            }
            let ack_deadline = self
                .in_flight
                .front()
                .map(|f| f.sent_at + self.settings.ack_timeout);
            let window_open =
                draining_until.is_none() && self.in_flight.len() < self.settings.window;
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
                _ = self.dispatcher.wait_for_work(committed), if window_open => {}
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

    async fn send(&mut self, record: StoredRecord, out: &mut Vec<u8>) -> Result<(), NodeError> {
        let chunk_id = chunk_id_base64(&record.chunk_id);
        out.clear();
        encode_packed_forward(
            &record.tag,
            &record.entries,
            &chunk_id,
            record.events,
            None,
            out,
        );
        // Counted as in flight before the write: if the write fails, it is requeued.
        self.in_flight.push_back(InFlight {
            record,
            chunk_id,
            sent_at: Instant::now(),
        });
        match timeout(self.settings.ack_timeout, self.stream.write_all(out)).await {
            Ok(Ok(())) => Ok(()),
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
                self.dispatcher
                    .spool()
                    .delete(done.record.key, done.record.stored_len());
                self.acked += 1;
            }
        }
    }

    /// RST instead of FIN: queued bytes must not reach the aggregator after we gave up.
    async fn abort_and_requeue(&mut self, reason: &str) {
        let _ = self.stream.set_zero_linger();
        for done in self.in_flight.drain(..) {
            let attempts = done.record.attempts.saturating_add(1);
            self.dispatcher
                .requeue(&done.record, attempts, reason)
                .await;
        }
    }

    async fn close_gracefully(&mut self) {
        let _ = timeout(Duration::from_secs(1), self.stream.shutdown()).await;
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
