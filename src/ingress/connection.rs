//! One sender connection: handshake, requests in, acks out in order after their commits.
//!
//! Each complete request is handed to the spool (after waiting for room in its byte budget:
//! invariant 5, the socket is not read meanwhile) and its ack, when the sender asked for one,
//! is written only once the spool reports the group commit (invariant 1), in request order;
//! every request a commit settled is acked in one write ([`super::acks`]). Invalid input closes
//! this connection only, is logged with the peer and the reason, and nothing of the bad request
//! reaches the spool (invariant 4); requests before it are still committed and acked. A
//! connection is never closed while a request that asked for an ack is not yet stored: old
//! v0.12 senders take EOF as success (PROTOCOL.md §9.2, §13.5).
//!
//! The connection is a small state machine: [`Connection::run`] decodes what is buffered
//! ([`Connection::decode_buffered`]), decides whether to read ([`Connection::plan_read`]),
//! waits for the next [`Event`] and applies it, until [`Connection::finished`].
//!
//! Bytes leave the socket only once stored (invariant 10): over [`Socket`] in peek mode, what
//! is read stays in the kernel's receive queue and is released ([`ConnIo::release`]) only up
//! to the end of the last request whose commit settled, so a worker that dies leaves every
//! uncommitted byte for the next one. A stop reads on until the connection is quiet at a
//! request boundary (or `shutdown_grace` ends) and closes it; a handover for an upgrade
//! *parks* it instead: nothing more is read, every ack owed is written, and the socket goes
//! back to the supervisor with its state ([`Parked`]).
//!
//! A reload reaches an open connection between requests ([`Connection::follow_reload`]): with
//! nothing buffered it takes the new request limits, pending-request bound and idle timeout
//! (the idle clock restarts then, so a shorter timeout never closes a connection at once).
//! Its TLS session and handshake stay those it was accepted with.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::watch;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::acks::{AckQueue, Commit, Pending, Settled};
use super::decoder::{DecodeError, Decoder, PickError};
use super::handshake;
use super::io::ConnIo;
use super::partial::PartialBytes;
use super::recent::ChunkKey;
use super::{IngressContext, IngressSettings};
use crate::clock::sleep_until_opt;
use crate::forward::frame::Signal;
use crate::forward::{Decoded, Frame};
use crate::lifecycle::names::{ConnState, Handshake};
use crate::lifecycle::notify;
use crate::metrics::metrics;
use crate::spool::{Kept, Spool, Unstage};

/// Deadline for writing acks to a sender.
const ACK_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// On a stop, a connection quiet this long at a request boundary is closed: a sender that
/// writes in bursts is closed between them, not in the middle of one.
const STOP_QUIET: Duration = Duration::from_millis(100);
/// Once `shutdown_grace` is over, a connection that is not at a request boundary with nothing
/// unread gets this much longer to reach one; then it closes wherever it is.
const LAST_BOUNDARY_WAIT: Duration = Duration::from_secs(1);
/// In that last wait, how soon after its last read a connection at a boundary closes.
const LAST_QUIET: Duration = Duration::from_millis(1);
/// Bytes of a rejected request kept as a dead letter for inspection.
const REJECTED_KEEP_BYTES: usize = 64 * 1024;
/// Bytes read from a socket per read call.
const READ_CHUNK: usize = 64 * 1024;
/// After a request larger than [`READ_CHUNK`], the next one's first read takes only this much:
/// enough for its header, whose declared length then sizes the buffer once. Reading a whole
/// chunk first would have to copy it into the right-sized buffer.
const PEEK_BYTES: usize = 512;
/// Bytes read past a request's declared payload: its options map (chunk id, size).
const TRAILER_SLACK: usize = 256;
/// An unfinished request's unreleased bytes are kept in the spool (and released) once they
/// reach half the socket's receive buffer, at least this much: a request larger than the
/// buffer could never complete while all of it waits unread in the kernel.
const KEEP_AT_LEAST: usize = 32 << 10;
/// ...or once its sender pauses this long with some of it unreleased (the receive window may
/// be closed by per-segment overhead before half the buffer is used).
const KEEP_AFTER_PAUSE: Duration = Duration::from_millis(20);

/// A decoded request waiting for room in the spool budget.
struct Staged {
    key: Option<ChunkKey>,
    frame: Frame,
    cost: u64,
    /// When the request was complete on the socket.
    arrived: Instant,
    /// Where it starts in the connection's byte stream.
    start: u64,
    /// Its prefix was kept in the spool under this connection id.
    unstage: Option<Unstage>,
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
    /// Handed back to the supervisor for the next worker (an upgrade).
    Parked,
    /// Invalid input: reason already logged.
    Rejected,
    /// The spool could not commit a request; the sender gets no ack and will resend.
    CommitFailed,
    /// The socket failed.
    Io,
}

/// What the connection waits for; one of them wakes it per turn.
enum Event {
    /// The oldest request's commit is known.
    Committed(Commit),
    /// The staged request got its bytes of the spool budget.
    Room,
    /// Bytes of the global partial-request budget were taken.
    PartialGranted,
    /// A read finished; `at_boundary`: it started between requests.
    Read {
        result: std::io::Result<usize>,
        at_boundary: bool,
    },
    /// Nothing arrived (or a request did not complete) within idle_timeout.
    Idle,
    /// Shutdown began: read on until quiet at a request boundary, within `shutdown_grace`.
    ShutdownBegun,
    /// The grace period passed.
    GraceOver,
    /// Quiet at a request boundary for [`STOP_QUIET`] while stopping.
    QuietOver,
    /// A handover began: park once nothing is owed.
    ParkBegun,
    /// Keeping the unfinished request's prefix in the spool is done.
    Kept(Result<(), crate::spool::SpoolError>),
    /// The sender paused mid-request: keep what arrived.
    Paused,
}

/// A prefix of the unfinished request on its way to the spool.
struct Keeping {
    commit: tokio::sync::oneshot::Receiver<Result<(), crate::spool::SpoolError>>,
    len: u64,
}

/// A connection given back for the next worker: its transport and its state.
pub(super) struct Parked<I> {
    pub io: I,
    pub state: ConnState,
}

/// How a connection's service ended, for the one who holds its socket.
pub(super) enum Ending<I> {
    /// Given back for the next worker.
    Parked(Parked<I>),
    /// Reset: ackgate ended it while the sender may still write (a stop, an idle timeout). A
    /// FIN would let the sender's next write succeed and vanish in the reset that answers it;
    /// a reset makes that write fail, and a no-ack sender (fluent-logger, docker's driver)
    /// resends it on a new connection.
    Reset,
    Closed,
}

/// Whether and how much to read this turn.
#[derive(Debug, Clone, Copy)]
struct ReadPlan {
    allowed: bool,
    /// Partial-request budget to take before reading.
    missing: usize,
    /// Bytes this connection may still buffer.
    room: usize,
}

/// Serve one connection: the shared-key handshake (or its rest, for a connection an earlier
/// worker started), then requests until the peer closes, idles out, sends something invalid,
/// or ackgate stops. `held`: the connection's state, when the supervisor holds it (it may then
/// be parked and given back: the return value), and whether an earlier worker kept part of
/// its unfinished request in the spool.
pub(super) async fn serve<I: ConnIo>(
    mut io: I,
    peer: SocketAddr,
    destination: Option<(SocketAddr, Counter)>,
    ctx: Arc<IngressContext>,
    shutdown: CancellationToken,
    held: Option<(ConnState, bool)>,
) -> Ending<I> {
    let (held, has_kept) = match held {
        Some((state, kept)) => (Some(state), kept),
        None => (None, false),
    };
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut released = 0;
    let mut held = held;
    let live = ctx.subscribe();
    // A clone, not the borrow: a watch borrow held across the handshake would block a reload.
    let settings = live.borrow().clone();
    if let Some(auth) = &settings.security {
        let deadline = Instant::now() + settings.config.handshake_timeout.0;
        let resume = match held.as_ref().map(|s| &s.handshake) {
            Some(Handshake::Done) => None,
            Some(Handshake::Helo { nonce, auth }) => Some(Some((nonce.clone(), auth.clone()))),
            Some(Handshake::None) | None => Some(None),
        };
        if let Some(resume) = resume {
            let mut mark = |fd: Option<std::os::fd::BorrowedFd<'_>>, step: Handshake| {
                if let Some(state) = held.as_mut() {
                    state.handshake = step;
                    if let Some(fd) = fd {
                        notify::store(&state.name(), fd);
                    }
                }
            };
            let park = ctx.park.clone();
            let outcome =
                handshake::accept(&mut io, &mut buf, auth, deadline, resume, &mut mark, &park)
                    .await;
            match outcome {
                Ok(ping_len) => released = ping_len,
                Err(handshake::HandshakeFailure::Parked) if held.is_some() => {
                    if let Some(state) = held {
                        debug!(%peer, "connection parked during the handshake");
                        return Ending::Parked(Parked { io, state });
                    }
                }
                Err(e) => {
                    warn!(%peer, reason = %e, "closing connection: shared-key handshake failed");
                    metrics().reject(e.kind());
                    let _ = io.shutdown().await;
                    return Ending::Closed;
                }
            }
            debug!(%peer, "shared-key handshake accepted");
        }
    }
    let kept = match &held {
        Some(state) if has_kept => {
            let spool = ctx.spool.clone();
            let id = state.id.0;
            let resumed = match tokio::task::spawn_blocking(move || spool.staged(id)).await {
                Ok(Ok(kept)) => resume_kept(&mut io, kept, peer),
                Ok(Err(e)) => Err(format!("cannot read it: {e}")),
                Err(e) => Err(format!("cannot read it: {e}")),
            };
            match resumed {
                Ok(prefix) => {
                    if !prefix.is_empty() {
                        info!(%peer, bytes = prefix.len(), "going on with a request an earlier worker kept in part");
                    }
                    buf.extend_from_slice(&prefix);
                    released += prefix.len() as u64;
                    prefix.len() as u64
                }
                Err(reason) => {
                    warn!(%peer, %reason, "cannot go on with the kept part of an unfinished request: closing the connection");
                    ctx.spool.unstage(id);
                    let _ = io.shutdown().await;
                    return Ending::Closed;
                }
            }
        }
        _ => 0,
    };
    let mut connection = Connection::new(io, buf, released, kept, peer, ctx, live, shutdown, held);
    connection.kept_in_spool = has_kept;
    // As it was accepted, even if a reload came during the handshake.
    connection.secured = settings.security.is_some();
    if let Some((destination, events)) = destination {
        connection.destination = Some(destination);
        connection.destination_events = Some(events);
    }
    connection.run().await
}

/// What an earlier worker kept of this connection's unfinished request (or the mark of where
/// its last one kept in part ends), with the socket moved past what of it is still there.
fn resume_kept<I: ConnIo>(io: &mut I, kept: Kept, peer: SocketAddr) -> Result<Vec<u8>, String> {
    let Some(stream_end) = kept.stream_end else {
        return Ok(kept.prefix);
    };
    let consumed = io
        .consumed()
        .map_err(|e| format!("cannot read the socket's position: {e}"))?;
    let skip = kept_still_in_socket(kept.prefix.is_empty(), stream_end, consumed)?;
    if skip > 0 {
        // Committed in the spool, never released: the earlier worker died in between.
        io.release(usize::try_from(skip).map_err(|e| e.to_string())?)
            .map_err(|e| format!("cannot release {skip} bytes kept already: {e}"))?;
        info!(%peer, bytes = skip, "bytes an earlier worker kept were still in the socket: released, not read again");
    }
    Ok(kept.prefix)
}

/// How many bytes at the head of the socket were kept already (the worker that kept them
/// died before it released them): the socket stands at `consumed`, what was kept ends at
/// `stream_end`. Past it is fine only for a mark (the request was stored whole, and the
/// socket went on): past a kept prefix, bytes after it would have left the socket unkept.
fn kept_still_in_socket(only_a_mark: bool, stream_end: u64, consumed: u64) -> Result<u64, String> {
    match stream_end.checked_sub(consumed) {
        Some(skip) => Ok(skip),
        None if only_a_mark => Ok(0),
        None => Err(format!(
            "the socket is at byte {consumed} of the stream, past the kept part's end at {stream_end}"
        )),
    }
}

/// One connection's state between two events.
struct Connection<I> {
    io: I,
    /// Bytes read and not yet decoded: at most one unfinished request once decoded.
    buf: BytesMut,
    /// Bytes of the stream read so far, and released to the kernel (see [`ConnIo::release`]).
    filled: u64,
    released: u64,
    peer: SocketAddr,
    ctx: Arc<IngressContext>,
    /// The settings this connection reads now, and where a reload's arrive.
    settings: Arc<IngressSettings>,
    live: watch::Receiver<Arc<IngressSettings>>,
    /// The shared-key handshake was required when it was accepted (JSON is refused then).
    secured: bool,
    shutdown: CancellationToken,
    /// The supervisor's name for this connection, when it holds it.
    held: Option<ConnState>,
    decoder: Decoder,
    acks: AckQueue,
    staged: Option<Staged>,
    partial: PartialBytes,
    max_pending: usize,
    idle: Duration,
    idle_deadline: Instant,
    /// Set once shutdown began: by then the connection is closed, at a boundary or not.
    shutdown_deadline: Option<Instant>,
    /// Stopping: when the connection last read bytes (it closes once quiet at a boundary).
    last_read: Instant,
    /// `shutdown_grace` is over: close at the first boundary with nothing unread.
    grace_over: bool,
    /// A handover began: read nothing more, and park once nothing is owed.
    parking: bool,
    /// Bytes of the unfinished request kept in the spool and released from the socket.
    kept: u64,
    /// What the kernel had let go of of this stream before `released` began counting: a
    /// position `p` of this connection (`filled`, `released`) is `stream_base + p` in the
    /// socket's. Read from the socket when a part is first kept (its parts say where they
    /// end).
    stream_base: Option<u64>,
    /// The spool may hold kept parts of this connection's request, or the mark of where the
    /// last one kept in part ends: removed when it closes.
    kept_in_spool: bool,
    keeping: Option<Keeping>,
    /// Nothing more will be read.
    eof: bool,
    /// The sender closed its side (it will write no more).
    peer_closed: bool,
    end: Option<Close>,
    requests: u64,
    /// The last request was larger than [`READ_CHUNK`]: peek at the next one's header first.
    large_requests: bool,
    /// The "partial budget in use" warning was logged for this connection.
    told_budget: bool,
    /// Transparent mode: where the sender was connecting, kept with its records.
    destination: Option<SocketAddr>,
    /// Transparent mode: the original destination's `destination_events_in`.
    destination_events: Option<Counter>,
}

impl<I: ConnIo> Connection<I> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        io: I,
        buf: BytesMut,
        released: u64,
        kept: u64,
        peer: SocketAddr,
        ctx: Arc<IngressContext>,
        mut live: watch::Receiver<Arc<IngressSettings>>,
        shutdown: CancellationToken,
        held: Option<ConnState>,
    ) -> Self {
        let settings = live.borrow_and_update().clone();
        let idle = settings.config.idle_timeout.0;
        let decoder = if held.as_ref().is_some_and(|s| s.json) {
            Decoder::json(settings.limits)
        } else {
            Decoder::Unknown
        };
        Connection {
            io,
            filled: released + buf.len() as u64 - kept,
            released,
            buf,
            peer,
            partial: PartialBytes::new(ctx.partial.clone(), settings.limits.max_frame_bytes),
            max_pending: settings.config.max_pending_frames as usize,
            secured: settings.security.is_some(),
            settings,
            live,
            ctx,
            shutdown,
            held,
            decoder,
            acks: AckQueue::default(),
            staged: None,
            idle,
            idle_deadline: Instant::now() + idle,
            shutdown_deadline: None,
            grace_over: false,
            last_read: Instant::now(),
            parking: false,
            kept,
            stream_base: None,
            kept_in_spool: false,
            keeping: None,
            eof: false,
            peer_closed: false,
            end: None,
            requests: 0,
            large_requests: false,
            told_budget: false,
            destination: None,
            destination_events: None,
        }
    }

    async fn run(mut self) -> Ending<I> {
        loop {
            self.follow_reload();
            let buffered_before = self.buf.len();
            self.decode_buffered();
            if self.buf.len() < buffered_before {
                // Requests were taken off the buffer: what is left is one unfinished request.
                self.partial.shrink_to(self.buf.len());
            }
            self.release_stored();
            self.keep_unfinished(false);
            let plan = self.plan_read();
            if self.park_ready() {
                self.end = Some(Close::Parked);
                break;
            }
            if self.finished() {
                break;
            }
            let event = self.next_event(plan).await;
            self.apply(event).await;
        }
        self.close().await
    }

    /// Where the stream's bytes stop being stored: the start of the oldest request not yet
    /// committed (submitted or waiting for room), or everything decoded.
    fn stored_end(&self) -> u64 {
        self.acks
            .oldest_unsettled_start()
            .or(self.staged.as_ref().map(|s| s.start))
            .unwrap_or(self.filled - self.buf.len() as u64 + self.kept)
    }

    /// Keep the unfinished request's unreleased bytes in the spool once there are enough of
    /// them that the socket could stop taking more ([`KEEP_AT_LEAST`], half its buffer), or
    /// `now` (the sender paused). Only for connections the supervisor holds (their id finds the
    /// prefix again), read in peek mode, with nothing before the request unsettled.
    fn keep_unfinished(&mut self, now: bool) {
        let Some(state) = &self.held else { return };
        let unreleased = (self.buf.len() as u64).saturating_sub(self.kept);
        if !self.io.keeps_unreleased()
            || self.keeping.is_some()
            || self.parking
            || self.end.is_some()
            || !self.acks.is_empty()
            || self.staged.is_some()
            || unreleased == 0
        {
            return;
        }
        if !now {
            let buffer = self
                .io
                .descriptor()
                .and_then(|fd| socket2::SockRef::from(&fd).recv_buffer_size().ok())
                .unwrap_or(0);
            if unreleased < (buffer as u64 / 2).max(KEEP_AT_LEAST as u64) {
                return;
            }
        }
        let conn = state.id.0;
        let base = match self.stream_base() {
            Ok(base) => base,
            Err(e) => {
                warn!(peer = %self.peer, error = %e, "cannot tell where the socket stands to keep an unfinished request: closing the connection; the sender resends what it did not finish");
                self.end = Some(Close::Io);
                self.eof = true;
                return;
            }
        };
        // The part ends with what was read (`filled`), at this place in the socket's stream.
        let bytes = bytes::Bytes::copy_from_slice(&self.buf[self.kept as usize..]);
        let commit = self
            .ctx
            .spool
            .stage(conn, self.kept, base + self.filled, bytes);
        self.kept_in_spool = true;
        self.keeping = Some(Keeping {
            commit,
            len: unreleased,
        });
    }

    /// [`Connection::stream_base`], read from the socket the first time.
    fn stream_base(&mut self) -> std::io::Result<u64> {
        if let Some(base) = self.stream_base {
            return Ok(base);
        }
        let base = self
            .io
            .consumed()?
            .checked_sub(self.released)
            .ok_or_else(|| std::io::Error::other("the socket let go of less than was released"))?;
        self.stream_base = Some(base);
        Ok(base)
    }

    fn on_kept(&mut self, result: Result<(), crate::spool::SpoolError>) {
        let Some(keeping) = self.keeping.take() else {
            return;
        };
        match result {
            Ok(()) => {
                self.kept += keeping.len;
                metrics().kept_bytes.inc_by(keeping.len);
            }
            Err(error) => {
                warn!(peer = %self.peer, %error, "cannot keep an unfinished request in the spool: closing the connection; the sender resends what it did not finish");
                self.end = Some(Close::CommitFailed);
                self.eof = true;
            }
        }
    }

    /// Let the kernel drop what is stored. A failure closes the connection: what follows
    /// cannot be told apart from what was stored.
    fn release_stored(&mut self) {
        let end = self.stored_end();
        if end <= self.released {
            return;
        }
        match self.io.release((end - self.released) as usize) {
            Ok(()) => self.released = end,
            Err(e) => {
                warn!(peer = %self.peer, error = %e, "cannot release stored bytes from the socket; closing the connection");
                self.end.get_or_insert(Close::Io);
                self.eof = true;
            }
        }
    }

    /// Between requests (nothing buffered), take the settings a reload put in force.
    fn follow_reload(&mut self) {
        if !self.buf.is_empty() || !self.live.has_changed().unwrap_or(false) {
            return;
        }
        let settings = self.live.borrow_and_update().clone();
        self.decoder.renew(settings.limits);
        self.partial.set_max_frame(settings.limits.max_frame_bytes);
        self.max_pending = settings.config.max_pending_frames as usize;
        let idle = settings.config.idle_timeout.0;
        if idle != self.idle {
            self.idle = idle;
            self.idle_deadline = Instant::now() + idle;
        }
        self.settings = settings;
    }

    /// Decode what is buffered, as long as there is room for more pending requests.
    fn decode_buffered(&mut self) {
        // Parked in peek mode, what is not decoded yet stays in the kernel for the next worker.
        let parked = self.parking && self.io.keeps_unreleased();
        while !parked
            && self.end.is_none()
            && self.keeping.is_none()
            && self.staged.is_none()
            && self.acks.len() < self.max_pending
        {
            let was_json = self.decoder.is_json();
            if let Err(PickError::JsonOnSecuredPort) =
                self.decoder
                    .pick(&self.buf, self.settings.limits, self.secured)
            {
                warn!(peer = %self.peer, reason = "JSON request on a port that requires the shared-key handshake",
                    "closing connection: invalid request; nothing of it was spooled");
                metrics().reject("json");
                self.end = Some(Close::Rejected);
                return;
            }
            if self.decoder.is_json() && !was_json {
                self.mark(|state| state.json = true);
            }
            let start = self.filled - self.buf.len() as u64;
            match self.decoder.decode(&mut self.buf) {
                Ok(None) => return,
                Ok(Some(Decoded::Nil)) => continue,
                Ok(Some(Decoded::Frame(frame))) => self.accept(frame, start),
                Err(e) => self.reject(e),
            }
        }
    }

    /// Change the state the supervisor keeps under this connection's name.
    fn mark(&mut self, change: impl FnOnce(&mut ConnState)) {
        if let Some(state) = self.held.as_mut() {
            change(state);
            if let Some(fd) = self.io.descriptor() {
                notify::store(&state.name(), fd);
            }
        }
    }

    /// A complete request: acked in its turn without spooling (a retransmit of a stored chunk,
    /// or an empty batch), or staged for the spool and handed over if its bytes fit now.
    fn accept(&mut self, frame: Frame, start: u64) {
        self.requests += 1;
        self.large_requests = frame.wire_len > READ_CHUNK;
        self.idle_deadline = Instant::now() + self.idle;
        let recent = &self.ctx.recent;
        let key = frame
            .chunk
            .as_ref()
            .filter(|_| recent.enabled())
            .map(|chunk| ChunkKey::new(chunk, &frame.tag, &frame.entries));
        let retransmit = key.as_ref().is_some_and(|k| recent.seen(self.peer.ip(), k));
        if retransmit || frame.events == 0 {
            if retransmit {
                debug!(peer = %self.peer, events = frame.events, "retransmitted chunk acked again without spooling");
                metrics().retransmits.inc();
            }
            self.acks.push(Pending::stored_already(frame.chunk, start));
            return;
        }
        let cost = Spool::cost(frame.signal, self.destination, &frame.tag, &frame.entries);
        // Its prefix was kept in the spool: replaced, in the commit that stores it whole, by
        // the mark of where it ends (the decoder took it out of `buf`).
        let conn = self.held.as_ref().map(|state| state.id.0);
        let unstage = match conn {
            Some(conn) if self.kept > 0 => {
                let end = self.filled - self.buf.len() as u64;
                let base = self.stream_base().map_err(|e| {
                    warn!(peer = %self.peer, error = %e, "cannot tell where the socket stands: a crash before the next release would read the rest of this request again as a new one");
                });
                Some(Unstage {
                    conn,
                    stream_end: base.ok().map(|base| base + end),
                })
            }
            _ => None,
        };
        self.kept = 0;
        let staged = Staged {
            key,
            frame,
            cost,
            arrived: Instant::now(),
            start,
            unstage,
        };
        if self.ctx.spool.try_reserve(cost) {
            submit(&self.ctx.spool, self.destination, staged, &mut self.acks);
        } else {
            self.staged = Some(staged);
        }
    }

    fn reject(&mut self, e: DecodeError) {
        warn!(peer = %self.peer, reason = %e, request = self.requests + 1,
            "closing connection: invalid request; nothing of it was spooled");
        metrics().reject(e.kind());
        // A copy: the rejected bytes stay in `buf`, never counted as stored.
        let mut bytes = self.decoder.take_rejected().unwrap_or_else(|| {
            bytes::Bytes::copy_from_slice(&self.buf[..self.buf.len().min(REJECTED_KEEP_BYTES)])
        });
        bytes.truncate(REJECTED_KEEP_BYTES);
        self.ctx
            .spool
            .reject(self.peer.to_string(), e.to_string(), bytes);
        self.end = Some(Close::Rejected);
    }

    /// Read only with room for more pending requests, none waiting for spool room, and the
    /// bytes of an unfinished request within this connection's share of the partial budget.
    fn plan_read(&mut self) -> ReadPlan {
        // Parked in peek mode, nothing more is read; in read mode (no peek offset, or a socket
        // that is not handed over) reading goes on to a request boundary.
        let allowed = self.end.is_none()
            && !self.eof
            && !(self.parking && self.io.keeps_unreleased())
            // Not while a prefix is being kept: decoding waits for it, and an end of stream
            // read meanwhile would be taken for one in the middle of a request. The socket
            // takes the rest of the window meanwhile.
            && self.keeping.is_none()
            && self.staged.is_none()
            && self.acks.len() < self.max_pending;
        let buffered = self.buf.len();
        // The declared payload and the options map after it.
        let wanted = match self.decoder.wanted() {
            0 => 0,
            declared => declared + TRAILER_SLACK,
        };
        let missing = self.partial.missing(buffered, wanted, READ_CHUNK);
        if allowed && missing > self.ctx.partial.available_permits() && !self.told_budget {
            self.told_budget = true;
            warn!(peer = %self.peer, buffered, missing,
                "ingress.max_partial_bytes in use by other unfinished requests: not reading this connection until they complete");
        }
        // Read what the request being read still needs (its declared length, if known), so
        // that its buffer is allocated once at its size and the next request starts in a
        // buffer of its own: bytes of the next request read along would have to be copied.
        let this_turn = if buffered == 0 && self.large_requests {
            PEEK_BYTES
        } else if wanted > buffered {
            wanted - buffered
        } else {
            READ_CHUNK
        };
        let room = self
            .partial
            .allowance()
            .saturating_sub(buffered)
            .min(this_turn);
        if allowed && missing == 0 && self.buf.capacity() - buffered < room {
            if buffered <= PEEK_BYTES {
                // A peeked header: a buffer of the request's size, with only those bytes
                // copied (growing in place would copy the whole old allocation).
                let mut sized = BytesMut::with_capacity(buffered + room);
                sized.extend_from_slice(&self.buf);
                self.buf = sized;
            } else {
                self.buf.reserve(room);
            }
        }
        ReadPlan {
            allowed,
            missing,
            room,
        }
    }

    /// Nothing more will be read and every ack that is owed was written.
    fn finished(&self) -> bool {
        let reading_over = self.end.is_some() || self.eof;
        reading_over && self.acks.is_empty() && self.staged.is_none()
    }

    /// Parking, and nothing is owed: in peek mode at once (a request waiting for room and
    /// whatever is not decoded stay unreleased in the kernel), in read mode at a request
    /// boundary (what was read is all stored).
    fn park_ready(&self) -> bool {
        self.parking
            && self.end.is_none()
            && self.acks.is_empty()
            && (self.io.keeps_unreleased() || (self.buf.is_empty() && self.staged.is_none()))
    }

    /// An unfinished request with unreleased bytes whose sender paused: keep what arrived
    /// ([`KEEP_AFTER_PAUSE`]), in case the socket's window is what holds it back.
    fn pause_deadline(&self) -> Option<Instant> {
        let waiting = self.held.is_some()
            && self.io.keeps_unreleased()
            && self.keeping.is_none()
            && !self.parking
            && self.end.is_none()
            && self.acks.is_empty()
            && self.staged.is_none()
            && self.buf.len() as u64 > self.kept;
        waiting.then(|| self.last_read + KEEP_AFTER_PAUSE)
    }

    /// Stopping, at a request boundary with nothing owed: close once quiet for [`STOP_QUIET`]
    /// ([`LAST_QUIET`] once the grace is over).
    fn quiet_deadline(&self) -> Option<Instant> {
        let quiet = if self.grace_over {
            LAST_QUIET
        } else {
            STOP_QUIET
        };
        (self.shutdown_deadline.is_some() && self.at_boundary() && self.end.is_none())
            .then(|| self.last_read + quiet)
    }

    /// Every request read is stored and answered, and nothing of the next one was read.
    fn at_boundary(&self) -> bool {
        self.buf.is_empty() && self.acks.is_empty() && self.staged.is_none()
    }

    /// Whether the kernel holds bytes of this connection that were not read yet: a close now
    /// would lose them, though the sender's write of them succeeded.
    fn unread_in_kernel(&self) -> bool {
        let peeked = if self.io.keeps_unreleased() {
            self.filled - self.released
        } else {
            0
        };
        self.io.queued() as u64 > peeked
    }

    async fn next_event(&mut self, plan: ReadPlan) -> Event {
        // A request must arrive whole within idle_timeout of its first byte: re-arming the
        // deadline on every read would let a slowloris sender hold a connection slot forever.
        let at_boundary = self.buf.is_empty();
        let idle_armed = self.acks.is_empty()
            && self.staged.is_none()
            && self.shutdown_deadline.is_none()
            && !self.parking
            && self.end.is_none();
        let staged_cost = self.staged.as_ref().map(|s| s.cost);
        let quiet = self.quiet_deadline();
        let pause = self.pause_deadline();
        let is_keeping = self.keeping.is_some();
        let keeping = self.keeping.as_mut().map(|k| &mut k.commit);
        let park = &self.ctx.park;
        let spool = &self.ctx.spool;
        let buf = &mut self.buf;
        let io = &mut self.io;
        tokio::select! {
            biased;
            commit = self.acks.front_commit(), if !self.acks.is_empty() => Event::Committed(commit),
            _ = reserve(spool, staged_cost), if staged_cost.is_some() => Event::Room,
            _ = self.partial.take(plan.missing), if plan.allowed && plan.missing > 0 => {
                Event::PartialGranted
            }
            // At most `room` bytes: what this connection may hold of an unfinished request.
            result = io.fill(buf, plan.room),
                if plan.allowed && plan.missing == 0 => Event::Read { result, at_boundary },
            _ = tokio::time::sleep_until(self.idle_deadline), if idle_armed => Event::Idle,
            _ = self.shutdown.cancelled(), if self.shutdown_deadline.is_none() && !self.parking => {
                Event::ShutdownBegun
            }
            _ = sleep_until_opt(self.shutdown_deadline),
                if self.shutdown_deadline.is_some() && self.end.is_none() => Event::GraceOver,
            _ = sleep_until_opt(quiet), if quiet.is_some() => Event::QuietOver,
            _ = park.cancelled(), if !self.parking && self.end.is_none() => Event::ParkBegun,
            kept = async { keeping?.await.ok() }, if is_keeping => {
                Event::Kept(kept.unwrap_or(Err(crate::spool::SpoolError::Closed)))
            }
            _ = sleep_until_opt(pause), if pause.is_some() => Event::Paused,
        }
    }

    async fn apply(&mut self, event: Event) {
        match event {
            Event::Committed(commit) => {
                let settled = self.acks.settle(commit, self.decoder.is_json());
                self.answer(settled).await;
                self.idle_deadline = Instant::now() + self.idle;
            }
            Event::Room => {
                if let Some(staged) = self.staged.take() {
                    submit(&self.ctx.spool, self.destination, staged, &mut self.acks);
                }
            }
            Event::PartialGranted => {}
            Event::Read {
                result,
                at_boundary,
            } => self.on_read(result, at_boundary),
            Event::Idle => self.on_idle(),
            Event::ShutdownBegun => {
                self.shutdown_deadline = Some(Instant::now() + self.settings.shutdown_grace);
            }
            Event::GraceOver => self.on_grace_over(),
            Event::QuietOver => self.on_quiet(),
            Event::ParkBegun => self.on_park(),
            Event::Kept(result) => self.on_kept(result),
            Event::Paused => self.keep_unfinished(true),
        }
    }

    /// Count what was stored, remember its chunk ids, write the acks it is owed in one write;
    /// after a failed commit, stop answering: the sender resends what was not acked.
    async fn answer(&mut self, settled: Settled) {
        // Released before the acks are written: an acked request is never read again by a
        // worker that comes after a crash.
        self.release_stored();
        let m = metrics();
        let now = Instant::now();
        for done in &settled.stored {
            if done.events > 0 {
                m.commit_wait_seconds
                    .observe(now.duration_since(done.submitted).as_secs_f64());
                m.requests_in.inc();
                m.events_in.inc_by(u64::from(done.events));
                if let Some(counter) = &self.destination_events {
                    counter.inc_by(u64::from(done.events));
                }
                m.bytes_in.inc_by(done.bytes);
            }
        }
        // Remembered before the acks are written: a sender that got its ack may resend on a
        // new connection at once, and must find the chunk already known.
        for key in settled.stored.iter().filter_map(|done| done.key.clone()) {
            self.ctx.recent.remember(self.peer.ip(), key);
        }
        if !settled.acks.is_empty() {
            match write_acks(&mut self.io, &settled.acks).await {
                Ok(()) => {
                    m.acks_sent.inc_by(settled.ack_count);
                    for done in settled.stored.iter().filter(|d| d.chunk.is_some()) {
                        m.ack_seconds.observe(done.arrived.elapsed().as_secs_f64());
                    }
                }
                Err(e) => {
                    // Already stored: a resend will be a duplicate, not a loss.
                    debug!(peer = %self.peer, error = %e, acks = settled.ack_count, "acks not delivered; the requests are stored");
                    self.end = Some(Close::Io);
                    self.acks.clear();
                }
            }
        }
        if let Some(error) = settled.failed {
            warn!(peer = %self.peer, %error, "spool could not store a request: closing without ack so the sender resends");
            self.end = Some(Close::CommitFailed);
            // Later requests on this connection are not acked either: the sender resends them
            // with the one that failed.
            self.acks.clear();
            self.staged = None;
            self.eof = true;
        }
    }

    fn on_read(&mut self, result: std::io::Result<usize>, at_boundary: bool) {
        match result {
            Ok(0) => {
                self.eof = true;
                self.peer_closed = true;
                if !self.buf.is_empty() {
                    warn!(peer = %self.peer, discarded_bytes = self.buf.len(),
                        "peer closed in the middle of a request; the partial request is not spooled");
                } else if self.requests == 0 {
                    debug!(peer = %self.peer, "connection closed without data (TCP heartbeat)");
                }
                self.end.get_or_insert(Close::Eof);
            }
            Ok(n) => {
                self.filled += n as u64;
                self.last_read = Instant::now();
                if at_boundary {
                    self.idle_deadline = Instant::now() + self.idle;
                }
            }
            Err(e) => {
                debug!(peer = %self.peer, error = %e, "read failed");
                self.eof = true;
                self.end.get_or_insert(Close::Io);
            }
        }
    }

    fn on_idle(&mut self) {
        if self.buf.is_empty() {
            debug!(peer = %self.peer, "closing idle connection");
        } else {
            warn!(peer = %self.peer, partial_bytes = self.buf.len(), timeout = ?self.idle,
                "closing connection: request incomplete after idle_timeout; nothing of it was spooled");
        }
        self.end = Some(Close::Idle);
        self.eof = true;
    }

    /// Stopping, and quiet at a boundary: close, unless bytes arrived since the last read (a
    /// close now would lose them; they are read first, and the quiet starts over).
    fn on_quiet(&mut self) {
        if self.unread_in_kernel() {
            self.last_read = Instant::now();
            return;
        }
        debug!(peer = %self.peer, "stopping: closing a connection quiet at a request boundary");
        self.end = Some(Close::Shutdown);
        self.eof = true;
    }

    fn on_grace_over(&mut self) {
        if !self.grace_over && (!self.at_boundary() || self.unread_in_kernel()) {
            // A sender that never pauses: close it at the next boundary with nothing unread,
            // which comes between two of its writes, rather than after one it thinks done.
            self.grace_over = true;
            self.shutdown_deadline = Some(Instant::now() + LAST_BOUNDARY_WAIT);
            return;
        }
        if !self.buf.is_empty() || self.staged.is_some() {
            warn!(peer = %self.peer, partial_bytes = self.buf.len(), waiting_for_spool_room = self.staged.is_some(),
                "shutting down with a request not yet stored; it is not spooled and not acked");
        }
        // The unfinished request stays in `buf` (and, in peek mode, in the kernel): it is not
        // stored, so it is never released.
        self.staged = None;
        self.end.get_or_insert(Close::Shutdown);
        self.eof = true;
    }

    /// A handover began. A connection the supervisor holds parks; one it cannot hand on (TLS:
    /// its session lives in this process) finishes the request being read, is answered, and
    /// closes, as on a stop.
    fn on_park(&mut self) {
        if self.held.is_some() {
            self.parking = true;
        } else if self.shutdown_deadline.is_none() {
            self.shutdown_deadline = Some(Instant::now() + self.settings.shutdown_grace);
        }
    }

    async fn close(mut self) -> Ending<I> {
        let reason = self
            .end
            .take()
            .unwrap_or(if self.shutdown_deadline.is_some() {
                Close::Shutdown
            } else {
                Close::Eof
            });
        if self.kept_in_spool && !matches!(reason, Close::Parked) {
            if let Some(state) = &self.held {
                self.ctx.spool.unstage(state.id.0);
            }
        }
        if let (Close::Parked, Some(state)) = (&reason, self.held.take()) {
            debug!(peer = %self.peer, requests = self.requests, "connection parked for the next worker");
            return Ending::Parked(Parked { io: self.io, state });
        }
        let sender_may_write = matches!(reason, Close::Shutdown | Close::Idle) && !self.peer_closed;
        if sender_may_write && self.io.abort() {
            debug!(peer = %self.peer, requests = self.requests, ?reason, "connection reset (its sender may still write)");
            return Ending::Reset;
        }
        debug!(peer = %self.peer, requests = self.requests, ?reason, "connection closed");
        let _ = timeout(ACK_WRITE_TIMEOUT, self.io.shutdown()).await;
        Ending::Closed
    }
}

/// Hand a staged request (its budget already taken) to the spool writer.
fn submit(spool: &Spool, destination: Option<SocketAddr>, staged: Staged, acks: &mut AckQueue) {
    let Staged {
        key,
        frame,
        cost,
        arrived,
        start,
        unstage,
    } = staged;
    let bytes = frame.entries.len() as u64;
    let signal: Signal = frame.signal;
    let commit = spool.append_unstaging(
        signal,
        destination,
        frame.tag,
        frame.entries,
        frame.events,
        cost,
        unstage,
    );
    acks.push(Pending::new(
        commit,
        frame.chunk,
        frame.events,
        bytes,
        key,
        arrived,
        start,
    ));
}

/// Wait for `cost` bytes of the spool budget (cancel-safe: nothing is taken unless it returns).
async fn reserve(spool: &Spool, cost: Option<u64>) {
    match cost {
        Some(cost) => spool.reserve(cost).await,
        None => std::future::pending().await,
    }
}

/// Every ack a commit settled, in one write, with a deadline (PROTOCOL.md §13.2).
async fn write_acks<I: ConnIo>(io: &mut I, acks: &[u8]) -> std::io::Result<()> {
    match timeout(ACK_WRITE_TIMEOUT, io.write_all(acks)).await {
        Ok(result) => result,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "ack write timed out",
        )),
    }
}

#[cfg(test)]
mod tests;
