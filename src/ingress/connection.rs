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
//! A reload reaches an open connection between requests ([`Connection::follow_reload`]): with
//! nothing buffered it takes the new request limits, pending-request bound and idle timeout
//! (the idle clock restarts then, so a shorter timeout never closes a connection at once).
//! Its TLS session and handshake stay those it was accepted with.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::watch;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::acks::{AckQueue, Commit, Pending, Settled};
use super::decoder::{DecodeError, Decoder, PickError};
use super::handshake;
use super::partial::PartialBytes;
use super::recent::ChunkKey;
use super::{IngressContext, IngressSettings};
use crate::clock::sleep_until_opt;
use crate::forward::frame::Signal;
use crate::forward::{Decoded, Frame};
use crate::metrics::metrics;
use crate::spool::Spool;

/// Deadline for writing acks to a sender.
const ACK_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection caught mid-request by shutdown may take to finish that request.
const SHUTDOWN_READ_GRACE: Duration = Duration::from_secs(2);
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

/// A decoded request waiting for room in the spool budget.
struct Staged {
    key: Option<ChunkKey>,
    frame: Frame,
    cost: u64,
    /// When the request was complete on the socket.
    arrived: Instant,
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
    /// Shutdown began: finish the request being read, within a grace period.
    ShutdownBegun,
    /// The grace period passed.
    GraceOver,
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

/// Serve one connection (plain or TLS): optional shared-key handshake, then requests until the
/// peer closes, idles out, sends something invalid, or shutdown.
pub(super) async fn serve<S>(
    stream: S,
    peer: SocketAddr,
    destination: Option<(SocketAddr, Counter)>,
    ctx: Arc<IngressContext>,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let live = ctx.subscribe();
    // A clone, not the borrow: a watch borrow held across the handshake would block a reload.
    let settings = live.borrow().clone();
    if let Some(auth) = &settings.security {
        let deadline = Instant::now() + settings.config.handshake_timeout.0;
        if let Err(e) = handshake::accept(&mut reader, &mut writer, &mut buf, auth, deadline).await
        {
            warn!(%peer, reason = %e, "closing connection: shared-key handshake failed");
            metrics().reject(e.kind());
            let _ = writer.shutdown().await;
            return;
        }
        debug!(%peer, "shared-key handshake accepted");
    }
    let mut connection = Connection::new(reader, writer, buf, peer, ctx, live, shutdown);
    // As it was accepted, even if a reload came during the handshake.
    connection.secured = settings.security.is_some();
    if let Some((destination, events)) = destination {
        connection.destination = Some(destination);
        connection.destination_events = Some(events);
    }
    connection.run().await;
}

/// One connection's state between two events.
struct Connection<S> {
    reader: ReadHalf<S>,
    writer: WriteHalf<S>,
    /// Bytes read and not yet decoded: at most one unfinished request once decoded.
    buf: BytesMut,
    peer: SocketAddr,
    ctx: Arc<IngressContext>,
    /// The settings this connection reads now, and where a reload's arrive.
    settings: Arc<IngressSettings>,
    live: watch::Receiver<Arc<IngressSettings>>,
    /// The shared-key handshake was required when it was accepted (JSON is refused then).
    secured: bool,
    shutdown: CancellationToken,
    decoder: Decoder,
    acks: AckQueue,
    staged: Option<Staged>,
    partial: PartialBytes,
    max_pending: usize,
    idle: Duration,
    idle_deadline: Instant,
    /// Set once shutdown began: the request being read must be complete by then.
    shutdown_deadline: Option<Instant>,
    /// Nothing more will be read.
    eof: bool,
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

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    fn new(
        reader: ReadHalf<S>,
        writer: WriteHalf<S>,
        buf: BytesMut,
        peer: SocketAddr,
        ctx: Arc<IngressContext>,
        mut live: watch::Receiver<Arc<IngressSettings>>,
        shutdown: CancellationToken,
    ) -> Self {
        let settings = live.borrow_and_update().clone();
        let idle = settings.config.idle_timeout.0;
        Connection {
            reader,
            writer,
            buf,
            peer,
            partial: PartialBytes::new(ctx.partial.clone(), settings.limits.max_frame_bytes),
            max_pending: settings.config.max_pending_frames as usize,
            secured: settings.security.is_some(),
            settings,
            live,
            ctx,
            shutdown,
            decoder: Decoder::Unknown,
            acks: AckQueue::default(),
            staged: None,
            idle,
            idle_deadline: Instant::now() + idle,
            shutdown_deadline: None,
            eof: false,
            end: None,
            requests: 0,
            large_requests: false,
            told_budget: false,
            destination: None,
            destination_events: None,
        }
    }

    async fn run(mut self) {
        loop {
            self.follow_reload();
            let buffered_before = self.buf.len();
            self.decode_buffered();
            if self.buf.len() < buffered_before {
                // Requests were taken off the buffer: what is left is one unfinished request.
                self.partial.shrink_to(self.buf.len());
            }
            let plan = self.plan_read();
            if self.finished() {
                break;
            }
            let event = self.next_event(plan).await;
            self.apply(event).await;
        }
        self.close().await;
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
        while self.end.is_none() && self.staged.is_none() && self.acks.len() < self.max_pending {
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
            match self.decoder.decode(&mut self.buf) {
                Ok(None) => return,
                Ok(Some(Decoded::Nil)) => continue,
                Ok(Some(Decoded::Frame(frame))) => self.accept(frame),
                Err(e) => self.reject(e),
            }
        }
    }

    /// A complete request: acked in its turn without spooling (a retransmit of a stored chunk,
    /// or an empty batch), or staged for the spool and handed over if its bytes fit now.
    fn accept(&mut self, frame: Frame) {
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
            self.acks.push(Pending::stored_already(frame.chunk));
            return;
        }
        let cost = Spool::cost(frame.signal, self.destination, &frame.tag, &frame.entries);
        let staged = Staged {
            key,
            frame,
            cost,
            arrived: Instant::now(),
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
        let mut bytes = self
            .decoder
            .take_rejected()
            .unwrap_or_else(|| self.buf.split().freeze());
        bytes.truncate(REJECTED_KEEP_BYTES);
        self.ctx
            .spool
            .reject(self.peer.to_string(), e.to_string(), bytes);
        self.end = Some(Close::Rejected);
    }

    /// Read only with room for more pending requests, none waiting for spool room, and the
    /// bytes of an unfinished request within this connection's share of the partial budget.
    fn plan_read(&mut self) -> ReadPlan {
        let allowed = self.end.is_none()
            && !self.eof
            && self.staged.is_none()
            && self.acks.len() < self.max_pending
            && (self.shutdown_deadline.is_none() || !self.buf.is_empty());
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
        let reading_over = self.end.is_some()
            || self.eof
            || (self.shutdown_deadline.is_some() && self.buf.is_empty());
        reading_over && self.acks.is_empty() && self.staged.is_none()
    }

    async fn next_event(&mut self, plan: ReadPlan) -> Event {
        // A request must arrive whole within idle_timeout of its first byte: re-arming the
        // deadline on every read would let a slowloris sender hold a connection slot forever.
        let at_boundary = self.buf.is_empty();
        let idle_armed = self.acks.is_empty()
            && self.staged.is_none()
            && self.shutdown_deadline.is_none()
            && self.end.is_none();
        let staged_cost = self.staged.as_ref().map(|s| s.cost);
        let spool = &self.ctx.spool;
        let buf = &mut self.buf;
        let reader = &mut self.reader;
        tokio::select! {
            biased;
            commit = self.acks.front_commit(), if !self.acks.is_empty() => Event::Committed(commit),
            _ = reserve(spool, staged_cost), if staged_cost.is_some() => Event::Room,
            _ = self.partial.take(plan.missing), if plan.allowed && plan.missing > 0 => {
                Event::PartialGranted
            }
            // At most `room` bytes: what this connection may hold of an unfinished request.
            result = async { reader.read_buf(&mut buf.limit(plan.room)).await },
                if plan.allowed && plan.missing == 0 => Event::Read { result, at_boundary },
            _ = tokio::time::sleep_until(self.idle_deadline), if idle_armed => Event::Idle,
            _ = self.shutdown.cancelled(), if self.shutdown_deadline.is_none() => {
                Event::ShutdownBegun
            }
            _ = sleep_until_opt(self.shutdown_deadline),
                if self.shutdown_deadline.is_some() && self.end.is_none() => Event::GraceOver,
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
                self.shutdown_deadline = Some(Instant::now() + SHUTDOWN_READ_GRACE);
            }
            Event::GraceOver => self.on_grace_over(),
        }
    }

    /// Count what was stored, remember its chunk ids, write the acks it is owed in one write;
    /// after a failed commit, stop answering: the sender resends what was not acked.
    async fn answer(&mut self, settled: Settled) {
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
            match write_acks(&mut self.writer, &settled.acks).await {
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
                if !self.buf.is_empty() {
                    warn!(peer = %self.peer, discarded_bytes = self.buf.len(),
                        "peer closed in the middle of a request; the partial request is not spooled");
                } else if self.requests == 0 {
                    debug!(peer = %self.peer, "connection closed without data (TCP heartbeat)");
                }
                self.end.get_or_insert(Close::Eof);
            }
            Ok(_) => {
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

    fn on_grace_over(&mut self) {
        if !self.buf.is_empty() || self.staged.is_some() {
            warn!(peer = %self.peer, partial_bytes = self.buf.len(), waiting_for_spool_room = self.staged.is_some(),
                "shutting down with a request not yet stored; it is not spooled and not acked");
        }
        self.staged = None;
        self.end.get_or_insert(Close::Shutdown);
        self.eof = true;
        self.buf.clear();
    }

    async fn close(mut self) {
        let reason = self
            .end
            .take()
            .unwrap_or(if self.shutdown_deadline.is_some() {
                Close::Shutdown
            } else {
                Close::Eof
            });
        debug!(peer = %self.peer, requests = self.requests, ?reason, "connection closed");
        let _ = timeout(ACK_WRITE_TIMEOUT, self.writer.shutdown()).await;
    }
}

/// Hand a staged request (its budget already taken) to the spool writer.
fn submit(spool: &Spool, destination: Option<SocketAddr>, staged: Staged, acks: &mut AckQueue) {
    let Staged {
        key,
        frame,
        cost,
        arrived,
    } = staged;
    let bytes = frame.entries.len() as u64;
    let signal: Signal = frame.signal;
    let commit = spool.append(
        signal,
        destination,
        frame.tag,
        frame.entries,
        frame.events,
        cost,
    );
    acks.push(Pending::new(
        commit,
        frame.chunk,
        frame.events,
        bytes,
        key,
        arrived,
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
async fn write_acks<W: AsyncWrite + Unpin>(writer: &mut W, acks: &[u8]) -> std::io::Result<()> {
    match timeout(ACK_WRITE_TIMEOUT, writer.write_all(acks)).await {
        Ok(result) => result,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "ack write timed out",
        )),
    }
}

#[cfg(test)]
mod tests;
