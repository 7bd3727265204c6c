//! The side facing senders: the accept loop (connection limit, TLS; who may connect is
//! [`admission`]'s call) and the UDP heartbeat responder ([`udp`]). Each connection is served by [`connection`] (its wire format picked by
//! [`decoder`], its acks settled by [`acks`]); the shared-key handshake
//! is in [`handshake`]; [`partial`] is the memory budget of unfinished requests; [`recent`]
//! remembers committed chunk ids to absorb sender retransmits; [`settings`] is what a reload
//! replaces ([`IngressContext::apply`]), read by the accept loop and every connection.
//!
//! Owns the sender sockets. Must not: touch redb (requests go to [`crate::spool::Spool`]), or
//! ack anything the spool has not reported committed (invariant 1).

mod acks;
mod admission;
pub mod connection;
mod decoder;
pub mod handshake;
pub(crate) mod io;
pub mod partial;
pub mod recent;
pub mod settings;
mod udp;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use std::os::fd::AsFd;

use socket2::SockRef;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, watch};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::config::IngressConfig;
use crate::lifecycle::link::{Feed, Handed};
use crate::lifecycle::names::ConnState;
use crate::lifecycle::notify;
use crate::limit::{Permit, Resizable};
use crate::metrics::metrics;
use crate::middlebox::canonical_addr;
use crate::spool::Spool;
use crate::tls::TlsError;
use admission::Admitted;
use connection::Ending;
use io::{Socket, Streamed};
use recent::RecentChunks;
pub use settings::IngressSettings;
pub use udp::run_udp_heartbeat;

/// What the accept loop and every connection share.
pub struct IngressContext {
    /// The settings in force: the one value a reload replaces ([`IngressContext::apply`]);
    /// the accept loop and connections take snapshots of it.
    settings: watch::Sender<Arc<IngressSettings>>,
    pub spool: Spool,
    /// Recently committed chunk ids per sender.
    pub recent: RecentChunks,
    /// Bytes of unfinished requests all connections may still hold ([`partial`]).
    pub partial: Arc<Resizable>,
    /// `ingress.max_connections`: a permit is taken before each accept.
    pub connections: Arc<Resizable>,
    /// Route "original": every redirected connection's destination gets its node here.
    pub router: Option<Arc<crate::upstream::router::Router>>,
    /// Cancelled when a handover begins: connections park instead of being read.
    pub park: CancellationToken,
    /// Plain TCP connections are read with `MSG_PEEK` and released once stored
    /// ([`io::Socket`]): the kernel has TCP `SO_PEEK_OFF`.
    pub peek: bool,
    /// Connections with a request prefix kept in the spool by an earlier worker, not yet
    /// handed to this one.
    pub staged: std::sync::Mutex<std::collections::HashSet<u128>>,
}

impl IngressContext {
    /// Build the shared state; fails only on unreadable TLS files.
    pub fn new(config: IngressConfig, spool: Spool) -> Result<Self, TlsError> {
        Ok(IngressContext::with_settings(
            IngressSettings::build(config, true, Duration::from_secs(5))?,
            spool,
        ))
    }

    /// The shared state around settings already built.
    pub fn with_settings(settings: IngressSettings, spool: Spool) -> Self {
        let recent = RecentChunks::new(settings.config.recent_chunks_per_peer as usize);
        let partial = Resizable::new(settings.partial_budget());
        let connections = Resizable::new(settings.config.max_connections as usize);
        IngressContext {
            settings: watch::Sender::new(Arc::new(settings)),
            spool,
            recent,
            partial,
            connections,
            router: None,
            park: CancellationToken::new(),
            peek: false,
            staged: Default::default(),
        }
    }

    /// The settings in force now.
    pub fn settings(&self) -> Arc<IngressSettings> {
        self.settings.borrow().clone()
    }

    /// The settings in force, and every later replacement.
    pub fn subscribe(&self) -> watch::Receiver<Arc<IngressSettings>> {
        self.settings.subscribe()
    }

    /// Put `settings` in force (a reload): limits are resized (never closing a connection:
    /// a smaller limit is reached as connections end or give bytes back), new connections
    /// get the new TLS acceptor and handshake, open ones pick up the rest between requests.
    pub fn apply(&self, settings: IngressSettings) {
        self.connections
            .resize(settings.config.max_connections as usize);
        self.partial.resize(settings.partial_budget());
        self.recent
            .set_per_peer(settings.config.recent_chunks_per_peer as usize);
        self.settings.send_replace(Arc::new(settings));
    }

    /// Whether an earlier worker kept part of `conn`'s unfinished request (asked once per
    /// connection).
    pub fn take_staged(&self, conn: u128) -> bool {
        self.staged
            .lock()
            .map(|mut staged| staged.remove(&conn))
            .unwrap_or(false)
    }

    /// Every connection an earlier worker left has been handed over: what is kept for any
    /// other one belongs to a connection that is gone.
    fn forget_orphans(&self) {
        let orphans: Vec<u128> = match self.staged.lock() {
            Ok(mut staged) => staged.drain().collect(),
            Err(_) => return,
        };
        for conn in orphans {
            warn!(conn = %crate::lifecycle::names::ConnId(conn), "a connection with an unfinished request did not survive (its sender reset it): the kept part of that request is dropped");
            self.spool.unstage(conn);
        }
    }
}

/// New connections asked of the supervisor at a time: it accepts only as many as this
/// worker gave credit for, so that the rest wait in the kernel's accept queue, as they did
/// when the worker accepted them itself.
const CREDIT: usize = 16;

/// Serve the connections the supervisor hands over (it accepted them, or an earlier worker
/// served them) until `closed` (a handover: what is still queued stays with the supervisor)
/// or the supervisor says it is drained (a stop: everything it accepted has been served).
/// Credit for new ones is given only while a connection slot (`max_connections`) is free and
/// the spool has room, and not once `shutdown` began.
pub async fn run_handed(
    mut feed: mpsc::UnboundedReceiver<Feed>,
    ctx: Arc<IngressContext>,
    shutdown: CancellationToken,
    closed: CancellationToken,
    tracker: TaskTracker,
) {
    let permits = ctx.connections.clone();
    let mut reserved: Vec<Permit> = Vec::new();
    let mut granted: u64 = 0;
    // Connections an earlier worker left come first, with no credit asked for them.
    let mut adopting = true;
    loop {
        let want_more = !adopting && reserved.len() < CREDIT && !shutdown.is_cancelled();
        tokio::select! {
            biased;
            _ = closed.cancelled() => return,
            next = feed.recv() => match next {
                Some(Feed::Conn(handed)) => {
                    if adopting {
                        metrics().connections_adopted.inc();
                    }
                    let permit = if adopting { None } else { reserved.pop() }
                        .or_else(|| permits.try_acquire());
                    serve_handed(handed, permit, &ctx, &shutdown, &tracker);
                }
                // A stop, and every connection the supervisor accepted is served: this is the
                // feed's end as the relay asked for it, not a death.
                Some(Feed::Drained) => {
                    closed.cancel();
                    return;
                }
                Some(Feed::Adopted(count)) => {
                    adopting = false;
                    ctx.forget_orphans();
                    if count > 0 {
                        info!(connections = count, "serving the connections an earlier worker left");
                    }
                }
                None => return,
            },
            permit = reserve_slot(&permits, &ctx.spool), if want_more => {
                reserved.push(permit);
                granted += 1;
                while reserved.len() < CREDIT {
                    let Some(permit) = permits.try_acquire() else { break };
                    reserved.push(permit);
                    granted += 1;
                }
                notify::accept(granted);
            }
            _ = shutdown.cancelled(), if want_more => {}
        }
    }
}

/// A connection slot, once the spool has room (cancel-safe: nothing is held unless it returns).
async fn reserve_slot(permits: &Arc<Resizable>, spool: &Spool) -> Permit {
    spool.wait_for_room().await;
    permits.acquire().await
}

/// Admit one handed connection and serve it on its own task.
fn serve_handed(
    handed: Handed,
    permit: Option<Permit>,
    ctx: &Arc<IngressContext>,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) {
    let Handed { fd, state } = handed;
    let stream = std::net::TcpStream::from(fd);
    let peer = match stream.peer_addr() {
        // An IPv4 sender on a dual-stack listener is logged and remembered as IPv4.
        Ok(peer) => canonical_addr(peer),
        Err(e) => {
            // Reset before it was served: nothing can be read from it any more.
            debug!(error = %e, "a handed connection is gone already");
            let _ = SockRef::from(&stream).shutdown(std::net::Shutdown::Both);
            return;
        }
    };
    let stream = match stream
        .set_nonblocking(true)
        .and_then(|()| TcpStream::from_std(stream))
    {
        Ok(stream) => stream,
        Err(e) => {
            warn!(%peer, error = %e, "cannot serve a handed connection");
            return;
        }
    };
    let Some(admitted) = admission::admit(ctx, &stream, peer) else {
        refuse(&stream);
        return;
    };
    // Asked now, in hand-over order: the orphans are forgotten once every adopted connection
    // has been seen here.
    let has_kept = ctx.take_staged(state.id.0);
    let ctx = ctx.clone();
    let shutdown = shutdown.clone();
    let span = match admitted.destination {
        Some(destination) => tracing::info_span!("conn", %peer, %destination),
        None => tracing::info_span!("conn", %peer),
    };
    tracker.spawn(
        async move {
            let _permit = permit;
            handle(stream, peer, admitted, ctx, shutdown, state, has_kept).await;
        }
        .instrument(span),
    );
}

/// Refuse a connection: a reset, on the socket itself (the supervisor holds a copy, which
/// lets go once the socket hangs up).
fn refuse(stream: &TcpStream) {
    // Not a shutdown with SO_LINGER 0: that sends a FIN, and the RST only once the supervisor
    // lets go of its copy (a sender could see its connection half closed, not refused).
    let _ = io::reset(stream);
}

/// Count the connection, do TLS if configured, and serve it.
async fn handle(
    stream: TcpStream,
    peer: SocketAddr,
    admitted: Admitted,
    ctx: Arc<IngressContext>,
    shutdown: CancellationToken,
    state: ConnState,
    has_kept: bool,
) {
    let counted = admitted.destination.zip(admitted.destination_events);
    let _ = stream.set_nodelay(true);
    let m = metrics();
    m.connections_total.inc();
    m.connections_open.inc();
    let _open = OnDrop(|| metrics().connections_open.dec());
    // The TLS acceptor in force when the connection came: its session lives with it.
    let settings = ctx.settings();
    let Some(acceptor) = &settings.tls else {
        match Socket::new(stream, ctx.peek) {
            Ok(io) => {
                let held = Some((state, has_kept));
                match connection::serve(io, peer, counted, ctx.clone(), shutdown, held).await {
                    Ending::Parked(parked) => hand_back(parked),
                    Ending::Reset | Ending::Closed => {}
                }
            }
            Err(e) => {
                warn!(%peer, error = %e, "cannot read a connection (SO_PEEK_OFF); closing it")
            }
        }
        return;
    };
    // A TLS session lives in this process and cannot be handed on: the supervisor lets go of
    // the connection before the handshake reads anything.
    notify::unstore(&state.name());
    match timeout(settings.config.handshake_timeout.0, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => {
            connection::serve(Streamed(tls), peer, counted, ctx.clone(), shutdown, None).await;
        }
        Ok(Err(e)) => {
            warn!(%peer, reason = %e, "closing connection: TLS handshake failed");
            m.reject("tls");
        }
        Err(_) => {
            warn!(%peer, reason = "TLS handshake not completed within handshake_timeout",
                "closing connection");
            m.reject("tls");
        }
    }
}

/// A parked connection goes back to the supervisor with its state; closing this copy does not
/// close the connection.
fn hand_back(parked: connection::Parked<Socket>) {
    let stream = parked.io.into_inner();
    notify::store(&parked.state.name(), stream.as_fd());
}

/// Whether this kernel peeks TCP at an offset (checked once): plain connections are then read
/// crash-safely ([`io::Socket`]).
pub fn peek_supported() -> bool {
    static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SUPPORTED.get_or_init(io::tcp_peek_offset_supported)
}

/// Runs a closure when dropped (the open-connections gauge stays right on every exit path).
struct OnDrop<F: FnMut() -> i64>(F);

impl<F: FnMut() -> i64> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

/// Bind the TCP listener and, when enabled, the UDP heartbeat socket on the same address.
/// With port 0 the kernel picks the TCP port; the same UDP port may be taken, so the pair is
/// tried a few times.
pub async fn bind(config: &IngressConfig) -> std::io::Result<(TcpListener, Option<UdpSocket>)> {
    let attempts = if config.listen.port() == 0 { 16 } else { 1 };
    let mut last_error = None;
    for _ in 0..attempts {
        let listener = TcpListener::bind(config.listen).await?;
        let local = listener.local_addr()?;
        if !config.udp_heartbeat {
            info!(listen = %local, udp_heartbeat = false, "ingress bound");
            return Ok((listener, None));
        }
        match UdpSocket::bind(local).await {
            Ok(udp) => {
                info!(listen = %local, udp_heartbeat = true, "ingress bound");
                return Ok((listener, Some(udp)));
            }
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.unwrap_or_else(|| std::io::Error::other("cannot bind the UDP heartbeat port")))
}
