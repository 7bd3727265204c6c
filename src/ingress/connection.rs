//! One sender connection: handshake, requests in, acks out in order after their commits.
//!
//! Each complete request is handed to the spool (after waiting for room in its byte budget:
//! invariant 5, the socket is not read meanwhile) and its ack, when the sender asked for one,
//! is written only once the spool reports the group commit (invariant 1), in request order, as
//! one write. Invalid input closes this connection only, is logged with the peer and the
//! reason, and nothing of the bad request reaches the spool (invariant 4); requests before it
//! are still committed and acked. A connection is never closed while a request that asked for
//! an ack is not yet stored: old v0.12 senders take EOF as success (PROTOCOL.md §9.2, §13.5).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::handshake;
use super::partial::PartialBytes;
use super::recent::ChunkKey;
use super::IngressContext;
use crate::clock::sleep_until_opt;
use crate::forward::ack::encode_ack;
use crate::forward::frame::Signal;
use crate::forward::json::{chunk_json_value, encode_json_ack, is_json_start, JsonDecoder};
use crate::forward::{Decoded, FrameDecoder};
use crate::metrics::metrics;
use crate::spool::{Spool, SpoolError};

/// Deadline for writing one ack to a sender.
const ACK_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection caught mid-request by shutdown may take to finish that request.
const SHUTDOWN_READ_GRACE: Duration = Duration::from_secs(2);
/// Bytes of a rejected request kept as a dead letter for inspection.
const REJECTED_KEEP_BYTES: usize = 64 * 1024;
/// Bytes read from a socket per read call.
const READ_CHUNK: usize = 64 * 1024;

/// The connection's wire format, fixed by its first byte.
enum Decoder {
    Unknown,
    Msgpack(FrameDecoder),
    Json(JsonDecoder),
}

impl Decoder {
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Decoded>, DecodeError> {
        match self {
            Decoder::Unknown => Ok(None),
            Decoder::Msgpack(d) => d.decode(buf).map_err(DecodeError::Msgpack),
            Decoder::Json(d) => d.decode(buf).map_err(DecodeError::Json),
        }
    }

    fn take_rejected(&mut self) -> Option<Bytes> {
        match self {
            Decoder::Msgpack(d) => d.take_rejected(),
            _ => None,
        }
    }

    fn is_json(&self) -> bool {
        matches!(self, Decoder::Json(_))
    }

    /// Bytes the request being read needs at least, when its header declares it.
    fn wanted(&self) -> usize {
        match self {
            Decoder::Msgpack(d) => d.wanted(),
            _ => 0,
        }
    }
}

/// A rejected request, in either wire format.
#[derive(Debug, thiserror::Error)]
enum DecodeError {
    #[error("{0}")]
    Msgpack(crate::forward::FrameError),
    #[error("{0}")]
    Json(crate::forward::json::JsonFrameError),
}

impl DecodeError {
    fn kind(&self) -> &'static str {
        match self {
            DecodeError::Msgpack(e) => e.kind(),
            DecodeError::Json(_) => "bad_json",
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
    /// Identity for retransmit detection, remembered once committed.
    key: Option<ChunkKey>,
}

/// A decoded request waiting for room in the spool budget.
struct Staged {
    key: Option<ChunkKey>,
    signal: Signal,
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

/// Serve one connection (plain or TLS): optional shared-key handshake, then requests until the
/// peer closes, idles out, sends something invalid, or shutdown.
pub(super) async fn serve<S>(
    stream: S,
    peer: SocketAddr,
    ctx: Arc<IngressContext>,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let m = metrics();
    let (mut reader, mut writer) = tokio::io::split(stream);
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    if let Some(auth) = &ctx.security {
        let deadline = Instant::now() + ctx.config.handshake_timeout.0;
        if let Err(e) = handshake::accept(&mut reader, &mut writer, &mut buf, auth, deadline).await
        {
            warn!(%peer, reason = %e, "closing connection: shared-key handshake failed");
            m.reject(e.kind());
            let _ = writer.shutdown().await;
            return;
        }
        debug!(%peer, "shared-key handshake accepted");
    }
    let mut decoder = Decoder::Unknown;
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let mut staged: Option<Staged> = None;
    let max_pending = ctx.config.max_pending_frames as usize;
    let idle = ctx.config.idle_timeout.0;
    let mut idle_deadline = Instant::now() + idle;
    let mut shutdown_deadline: Option<Instant> = None;
    let mut eof = false;
    let mut requests = 0u64;
    let mut end: Option<Close> = None;
    let mut partial = PartialBytes::new(ctx.partial.clone(), ctx.limits.max_frame_bytes);
    let mut told_budget = false;

    loop {
        let buffered_before = buf.len();
        // Decode what is buffered, as long as there is room for more pending requests.
        while end.is_none() && staged.is_none() && pending.len() < max_pending {
            if matches!(decoder, Decoder::Unknown) && !buf.is_empty() {
                // fluentd's rule: the first byte of the connection picks msgpack or JSON
                // for its whole life (PROTOCOL.md §2.1). JSON cannot be authenticated.
                decoder = if is_json_start(buf[0]) {
                    if ctx.security.is_some() {
                        warn!(%peer, reason = "JSON request on a port that requires the shared-key handshake",
                            "closing connection: invalid request; nothing of it was spooled");
                        m.reject("json");
                        end = Some(Close::Rejected);
                        break;
                    }
                    Decoder::Json(JsonDecoder::new(ctx.limits))
                } else {
                    Decoder::Msgpack(FrameDecoder::new(ctx.limits))
                };
            }
            match decoder.decode(&mut buf) {
                Ok(None) => break,
                Ok(Some(Decoded::Nil)) => continue,
                Ok(Some(Decoded::Frame(frame))) => {
                    requests += 1;
                    idle_deadline = Instant::now() + idle;
                    let key = frame
                        .chunk
                        .as_ref()
                        .filter(|_| ctx.recent.enabled())
                        .map(|chunk| ChunkKey::new(chunk, &frame.tag, &frame.entries));
                    let retransmit = key.as_ref().is_some_and(|k| ctx.recent.seen(peer.ip(), k));
                    if retransmit || frame.events == 0 {
                        // A resend of a chunk already committed for this sender, or an empty
                        // batch: ack it (in order), store nothing.
                        if retransmit {
                            debug!(%peer, events = frame.events, "retransmitted chunk acked again without spooling");
                            m.retransmits.inc();
                        }
                        let (done, commit) = oneshot::channel();
                        let _ = done.send(Ok(0));
                        pending.push_back(Pending {
                            commit,
                            chunk: frame.chunk,
                            events: 0,
                            bytes: 0,
                            key: None,
                        });
                        continue;
                    }
                    let cost = Spool::cost(frame.signal, &frame.tag, &frame.entries);
                    staged = Some(Staged {
                        key,
                        signal: frame.signal,
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
                    m.reject(e.kind());
                    let mut bytes = decoder
                        .take_rejected()
                        .unwrap_or_else(|| buf.split().freeze());
                    bytes.truncate(REJECTED_KEEP_BYTES);
                    ctx.spool.reject(peer.to_string(), e.to_string(), bytes);
                    end = Some(Close::Rejected);
                }
            }
        }

        if buf.len() < buffered_before {
            // Requests were taken off the buffer: what is left is one unfinished request.
            partial.shrink_to(buf.len());
        }
        let reading_allowed = end.is_none()
            && !eof
            && staged.is_none()
            && pending.len() < max_pending
            && (shutdown_deadline.is_none() || !buf.is_empty());
        let missing = partial.missing(buf.len(), decoder.wanted(), READ_CHUNK);
        if reading_allowed && missing > ctx.partial.available_permits() && !told_budget {
            told_budget = true;
            warn!(%peer, buffered = buf.len(), missing,
                "ingress.max_partial_bytes in use by other unfinished requests: not reading this connection until they complete");
        }
        let room = partial.allowance().saturating_sub(buf.len());
        if reading_allowed && missing == 0 {
            let spare = room.min(READ_CHUNK.max(decoder.wanted().saturating_sub(buf.len())));
            if buf.capacity() - buf.len() < spare {
                buf.reserve(spare);
            }
        }
        if end.is_some() || eof || (shutdown_deadline.is_some() && buf.is_empty()) {
            // Nothing more will be read: finish the acks that are owed, then close.
            if pending.is_empty() && staged.is_none() {
                break;
            }
        }

        // A request must arrive whole within idle_timeout of its first byte: re-arming the
        // deadline on every read would let a slowloris sender hold a connection slot forever.
        let at_boundary = buf.is_empty();
        tokio::select! {
            biased;
            committed = wait_front(&mut pending), if !pending.is_empty() => {
                let done = pending.pop_front();
                match (committed, done) {
                    (Ok(_key), Some(done)) => {
                        if done.events > 0 {
                            m.requests_in.inc();
                            m.events_in.inc_by(done.events as u64);
                            m.bytes_in.inc_by(done.bytes);
                        }
                        if let Some(key) = done.key {
                            ctx.recent.remember(peer.ip(), key);
                        }
                        if let Some(chunk) = done.chunk {
                            let written = write_ack(&mut writer, &chunk, decoder.is_json()).await;
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
            _ = partial.take(missing), if reading_allowed && missing > 0 => {}
            // At most `room` bytes: what this connection may hold of an unfinished request.
            read = async { reader.read_buf(&mut (&mut buf).limit(room)).await }, if reading_allowed && missing == 0 => {
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
                        if at_boundary {
                            idle_deadline = Instant::now() + idle;
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
    let _ = timeout(ACK_WRITE_TIMEOUT, writer.shutdown()).await;
}

fn submit(spool: &Spool, staged: Staged, pending: &mut VecDeque<Pending>) {
    let bytes = staged.entries.len() as u64;
    let commit = spool.append(
        staged.signal,
        staged.tag,
        staged.entries,
        staged.events,
        staged.cost,
    );
    pending.push_back(Pending {
        commit,
        chunk: staged.chunk,
        events: staged.events,
        bytes,
        key: staged.key,
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

/// One ack, one write, with a deadline (PROTOCOL.md §13.2); JSON on a JSON connection.
async fn write_ack<W: AsyncWrite + Unpin>(
    writer: &mut W,
    chunk: &[u8],
    json: bool,
) -> std::io::Result<()> {
    let mut ack = Vec::with_capacity(8 + chunk.len());
    match json.then(|| chunk_json_value(chunk)).flatten() {
        Some(text) => ack = encode_json_ack(&text),
        None => encode_ack(chunk, &mut ack),
    }
    match timeout(ACK_WRITE_TIMEOUT, writer.write_all(&ack)).await {
        Ok(result) => result,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "ack write timed out",
        )),
    }
}
