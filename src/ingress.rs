//! The side facing senders: TCP listener, one task per connection, UDP heartbeat responder.
//!
//! A connection may pipeline many requests. Each complete request is handed to the spool (after
//! waiting for room in its byte budget: invariant 5, the socket is not read meanwhile) and its
//! ack, when the sender asked for one, is written only once the spool reports the group commit
//! (invariant 1), in request order, as one write. Invalid input closes that connection only,
//! is logged with the peer and the reason, and nothing of the bad request reaches the spool
//! (invariant 4); requests before it on the same connection are still committed and acked.
//! A connection is never closed while it has a request that asked for an ack and is not yet
//! stored: old v0.12 senders take EOF as success (PROTOCOL.md §9.2, §13.5).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{oneshot, Semaphore};
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::config::IngressConfig;
use crate::forward::ack::encode_ack;
use crate::forward::{Decoded, FrameDecoder, Limits};
use crate::metrics::{label, metrics};
use crate::spool::{Spool, SpoolError};

/// Deadline for writing one ack to a sender.
const ACK_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection caught mid-request by shutdown may take to finish that request.
const SHUTDOWN_READ_GRACE: Duration = Duration::from_secs(2);
/// Bytes of a rejected request kept as a dead letter for inspection.
const REJECTED_KEEP_BYTES: usize = 64 * 1024;
/// Bytes read from a socket per read call.
const READ_CHUNK: usize = 64 * 1024;

/// What the accept loop and every connection share.
pub struct IngressContext {
    pub config: IngressConfig,
    pub spool: Spool,
    pub limits: Limits,
}

impl IngressContext {
    pub fn new(config: IngressConfig, spool: Spool) -> Self {
        let limits = Limits {
            max_frame_bytes: config.max_frame_bytes.0 as usize,
            max_decompressed_bytes: config.max_decompressed_bytes.0 as usize,
            ..Limits::default()
        };
        IngressContext {
            config,
            spool,
            limits,
        }
    }
}

/// Accept connections until `shutdown`, then wait for every connection to finish its pending
/// commits and acks (they are tracked by `tracker`).
pub async fn run_tcp(
    listener: TcpListener,
    ctx: Arc<IngressContext>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let permits = Arc::new(Semaphore::new(ctx.config.max_connections as usize));
    let mut backoff = Duration::from_millis(10);
    loop {
        // The permit is taken before accept: with none free, connections wait in the backlog.
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            _ = shutdown.cancelled() => return,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.cancelled() => return,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => {
                backoff = Duration::from_millis(10);
                pair
            }
            Err(e) => {
                // EMFILE and friends: wait a little instead of spinning.
                warn!(error = %e, retry_in = ?backoff, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        let span = tracing::info_span!("conn", %peer);
        tracker.spawn(
            async move {
                let _permit = permit;
                serve_connection(stream, peer, ctx, shutdown).await;
            }
            .instrument(span),
        );
    }
}

/// Answer every datagram with one `\0` from the socket it arrived on, so the reply's source
/// is the address and port the sender targeted (PROTOCOL.md §8.1).
pub async fn run_udp_heartbeat(socket: UdpSocket, shutdown: CancellationToken) {
    let mut buf = [0u8; 128];
    loop {
        let received = tokio::select! {
            r = socket.recv_from(&mut buf) => r,
            _ = shutdown.cancelled() => return,
        };
        match received {
            Ok((_, from)) => {
                if let Err(e) = socket.send_to(b"\0", from).await {
                    debug!(%from, error = %e, "heartbeat reply failed");
                }
            }
            Err(e) => {
                // ICMP port unreachable from an earlier reply shows up here on Linux; harmless.
                debug!(error = %e, "heartbeat receive error");
            }
        }
    }
}

/// A request handed to the spool, waiting for its commit.
struct Pending {
    commit: oneshot::Receiver<Result<u64, SpoolError>>,
    /// Raw msgpack bytes of the sender's `chunk` option, if it asked for an ack.
    chunk: Option<Bytes>,
    events: u32,
    /// Entry bytes, for metrics.
    bytes: u64,
}

/// A decoded request waiting for room in the spool budget.
struct Staged {
    tag: Bytes,
    entries: Bytes,
    events: u32,
    chunk: Option<Bytes>,
    cost: u64,
}

/// Why a connection ended.
#[derive(Debug)]
enum Close {
    /// Peer closed between requests.
    Eof,
    /// Idle for longer than idle_timeout.
    Idle,
    /// ackgate is shutting down.
    Shutdown,
    /// Invalid input: reason already logged.
    Rejected,
    /// The spool could not commit a request; the sender gets no ack and will resend.
    CommitFailed,
    /// The socket failed.
    Io,
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    ctx: Arc<IngressContext>,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let m = metrics();
    m.connections_total.inc();
    m.connections_open.inc();
    let _open = scopeguard(|| {
        metrics().connections_open.dec();
    });
    let (mut reader, mut writer) = stream.into_split();
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut decoder = FrameDecoder::new(ctx.limits);
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let mut staged: Option<Staged> = None;
    let max_pending = ctx.config.max_pending_frames as usize;
    let idle = ctx.config.idle_timeout.0;
    let mut idle_deadline = Instant::now() + idle;
    let mut shutdown_deadline: Option<Instant> = None;
    let mut eof = false;
    let mut first_bytes = true;
    let mut requests = 0u64;
    let mut end: Option<Close> = None;

    loop {
        // Decode what is buffered, as long as there is room for more pending requests.
        while end.is_none() && staged.is_none() && pending.len() < max_pending {
            if first_bytes && !buf.is_empty() {
                first_bytes = false;
                if matches!(buf[0], b'{' | b'[') {
                    warn!(%peer, reason = "JSON request: this port speaks msgpack Forward only",
                        "closing connection: invalid request; nothing of it was spooled");
                    m.rejected.get_or_create(&label("reason", "json")).inc();
                    end = Some(Close::Rejected);
                    break;
                }
            }
            match decoder.decode(&mut buf) {
                Ok(None) => break,
                Ok(Some(Decoded::Nil)) => continue,
                Ok(Some(Decoded::Frame(frame))) => {
                    requests += 1;
                    let cost = Spool::cost(&frame.tag, &frame.entries);
                    staged = Some(Staged {
                        tag: frame.tag,
                        entries: frame.entries,
                        events: frame.events,
                        chunk: frame.chunk,
                        cost,
                    });
                    // Fast path: room in the budget now.
                    if ctx.spool.try_reserve(cost) {
                        if let Some(s) = staged.take() {
                            submit(&ctx.spool, s, &mut pending);
                        }
                    }
                }
                Err(e) => {
                    warn!(%peer, reason = %e, request = requests + 1,
                        "closing connection: invalid request; nothing of it was spooled");
                    m.rejected.get_or_create(&label("reason", e.kind())).inc();
                    let mut bytes = decoder
                        .take_rejected()
                        .unwrap_or_else(|| buf.split().freeze());
                    bytes.truncate(REJECTED_KEEP_BYTES);
                    ctx.spool.reject(peer.to_string(), e.to_string(), bytes);
                    end = Some(Close::Rejected);
                }
            }
        }

        let reading_allowed = end.is_none()
            && !eof
            && staged.is_none()
            && pending.len() < max_pending
            && (shutdown_deadline.is_none() || !buf.is_empty());
        if end.is_some() || eof || (shutdown_deadline.is_some() && buf.is_empty()) {
            // Nothing more will be read: finish the acks that are owed, then close.
            if pending.is_empty() && staged.is_none() {
                break;
            }
        }

        tokio::select! {
            biased;
            committed = wait_front(&mut pending), if !pending.is_empty() => {
                let done = pending.pop_front();
                match (committed, done) {
                    (Ok(_key), Some(done)) => {
                        m.requests_in.inc();
                        m.events_in.inc_by(done.events as u64);
                        m.bytes_in.inc_by(done.bytes);
                        if let Some(chunk) = done.chunk {
                            let written = write_ack(&mut writer, &chunk).await;
                            if written.is_ok() {
                                m.acks_sent.inc();
                            }
                            if let Err(e) = written {
                                // Already stored: a resend will be a duplicate, not a loss.
                                debug!(%peer, error = %e, events = done.events, "ack not delivered; the request is stored");
                                end = Some(Close::Io);
                                pending.clear();
                            }
                        }
                    }
                    (Err(e), _) => {
                        warn!(%peer, error = %e, "spool could not store a request: closing without ack so the sender resends");
                        end = Some(Close::CommitFailed);
                        // Later requests on this connection are not acked either: the sender
                        // resends them with the one that failed.
                        pending.clear();
                        staged = None;
                        eof = true;
                    }
                    (Ok(_), None) => {}
                }
                idle_deadline = Instant::now() + idle;
            }
            _ = wait_budget(&ctx.spool, &staged), if staged.is_some() => {
                if let Some(s) = staged.take() {
                    submit(&ctx.spool, s, &mut pending);
                }
            }
            read = reader.read_buf(&mut buf), if reading_allowed => {
                match read {
                    Ok(0) => {
                        eof = true;
                        if !buf.is_empty() {
                            warn!(%peer, discarded_bytes = buf.len(),
                                "peer closed in the middle of a request; the partial request is not spooled");
                        } else if requests == 0 {
                            debug!(%peer, "connection closed without data (TCP heartbeat)");
                        }
                        if end.is_none() {
                            end = Some(Close::Eof);
                        }
                    }
                    Ok(_) => {
                        idle_deadline = Instant::now() + idle;
                        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
                            buf.reserve(READ_CHUNK);
                        }
                    }
                    Err(e) => {
                        debug!(%peer, error = %e, "read failed");
                        eof = true;
                        end.get_or_insert(Close::Io);
                    }
                }
            }
            _ = tokio::time::sleep_until(idle_deadline), if pending.is_empty() && staged.is_none() && shutdown_deadline.is_none() && end.is_none() => {
                if buf.is_empty() {
                    debug!(%peer, "closing idle connection");
                } else {
                    warn!(%peer, partial_bytes = buf.len(), timeout = ?idle,
                        "closing connection: request incomplete after idle_timeout; nothing of it was spooled");
                }
                end = Some(Close::Idle);
                eof = true;
            }
            _ = shutdown.cancelled(), if shutdown_deadline.is_none() => {
                shutdown_deadline = Some(Instant::now() + SHUTDOWN_READ_GRACE);
            }
            _ = sleep_until_opt(shutdown_deadline), if shutdown_deadline.is_some() && end.is_none() => {
                if !buf.is_empty() || staged.is_some() {
                    warn!(%peer, partial_bytes = buf.len(), waiting_for_spool_room = staged.is_some(),
                        "shutting down with a request not yet stored; it is not spooled and not acked");
                }
                staged = None;
                end.get_or_insert(Close::Shutdown);
                eof = true;
                buf.clear();
            }
        }
    }
    let reason = end.unwrap_or(if shutdown_deadline.is_some() {
        Close::Shutdown
    } else {
        Close::Eof
    });
    debug!(%peer, requests, ?reason, "connection closed");
    let _ = writer.shutdown().await;
}

fn submit(spool: &Spool, staged: Staged, pending: &mut VecDeque<Pending>) {
    let bytes = staged.entries.len() as u64;
    let commit = spool.append(staged.tag, staged.entries, staged.events, staged.cost);
    pending.push_back(Pending {
        commit,
        chunk: staged.chunk,
        events: staged.events,
        bytes,
    });
}

async fn wait_front(pending: &mut VecDeque<Pending>) -> Result<u64, SpoolError> {
    match pending.front_mut() {
        Some(front) => match (&mut front.commit).await {
            Ok(result) => result,
            Err(_) => Err(SpoolError::Closed),
        },
        None => std::future::pending().await,
    }
}

async fn wait_budget(spool: &Spool, staged: &Option<Staged>) {
    match staged {
        Some(s) => spool.reserve(s.cost).await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Runs a closure when dropped (connection gauges stay right on every exit path).
struct OnDrop<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

fn scopeguard<F: FnMut()>(f: F) -> OnDrop<F> {
    OnDrop(f)
}

/// One ack, one write, with a deadline (PROTOCOL.md §13.2).
async fn write_ack(writer: &mut OwnedWriteHalf, chunk: &[u8]) -> std::io::Result<()> {
    let mut ack = Vec::with_capacity(8 + chunk.len());
    encode_ack(chunk, &mut ack);
    match timeout(ACK_WRITE_TIMEOUT, writer.write_all(&ack)).await {
        Ok(result) => result,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "ack write timed out",
        )),
    }
}

/// Bind the TCP listener and, when enabled, the UDP heartbeat socket on the same address.
pub async fn bind(config: &IngressConfig) -> std::io::Result<(TcpListener, Option<UdpSocket>)> {
    let listener = TcpListener::bind(config.listen).await?;
    let local = listener.local_addr()?;
    let udp = if config.udp_heartbeat {
        Some(UdpSocket::bind(local).await?)
    } else {
        None
    };
    info!(listen = %local, udp_heartbeat = config.udp_heartbeat, "ingress bound");
    Ok((listener, udp))
}
