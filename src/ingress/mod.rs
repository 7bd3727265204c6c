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
pub mod partial;
pub mod recent;
pub mod settings;
mod udp;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument};

use crate::config::IngressConfig;
use crate::limit::Resizable;
use crate::metrics::metrics;
use crate::middlebox::canonical_addr;
use crate::spool::Spool;
use crate::tls::TlsError;
use admission::Admitted;
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
}

impl IngressContext {
    /// Build the shared state; fails only on unreadable TLS files.
    pub fn new(config: IngressConfig, spool: Spool) -> Result<Self, TlsError> {
        Ok(IngressContext::with_settings(
            IngressSettings::build(config, true)?,
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
}

/// Accept connections until `shutdown`, then wait for every connection to finish its pending
/// commits and acks (they are tracked by `tracker`).
pub async fn run_tcp(
    listener: TcpListener,
    ctx: Arc<IngressContext>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let permits = ctx.connections.clone();
    let mut backoff = Duration::from_millis(10);
    loop {
        // The permit is taken before accept: with none free, connections wait in the backlog.
        let permit = tokio::select! {
            permit = permits.acquire() => permit,
            _ = shutdown.cancelled() => return,
        };
        tokio::select! {
            _ = ctx.spool.wait_for_room() => {}
            _ = shutdown.cancelled() => return,
        }
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.cancelled() => return,
        };
        let (stream, peer) = match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(10);
                // An IPv4 sender on a dual-stack listener is logged and remembered as IPv4.
                (stream, canonical_addr(peer))
            }
            Err(e) => {
                // EMFILE and friends: wait a little instead of spinning.
                warn!(error = %e, retry_in = ?backoff, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let Some(admitted) = admission::admit(&ctx, &stream, peer) else {
            let _ = stream.set_zero_linger();
            continue;
        };
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        let span = match admitted.destination {
            Some(destination) => tracing::info_span!("conn", %peer, %destination),
            None => tracing::info_span!("conn", %peer),
        };
        tracker.spawn(
            async move {
                let _permit = permit;
                handle(stream, peer, admitted, ctx, shutdown).await;
            }
            .instrument(span),
        );
    }
}

/// Count the connection, do TLS if configured, and serve it.
async fn handle(
    stream: TcpStream,
    peer: SocketAddr,
    admitted: Admitted,
    ctx: Arc<IngressContext>,
    shutdown: CancellationToken,
) {
    let counted = admitted.destination.zip(admitted.destination_events);
    let _ = stream.set_nodelay(true);
    let m = metrics();
    m.connections_total.inc();
    m.connections_open.inc();
    let _open = OnDrop(|| metrics().connections_open.dec());
    // The TLS acceptor in force when the connection came: its session lives with it.
    let settings = ctx.settings();
    match &settings.tls {
        None => connection::serve(stream, peer, counted, ctx.clone(), shutdown).await,
        Some(acceptor) => {
            match timeout(settings.config.handshake_timeout.0, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => connection::serve(tls, peer, counted, ctx.clone(), shutdown).await,
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
    }
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
