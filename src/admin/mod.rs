//! The admin listener: what an operator (and Prometheus, and a load balancer) asks a running
//! relay, over HTTP/1 on hyper and axum, on its own address (`[admin] listen`).
//!
//! - `/metrics` (Prometheus text), `/health` (200 while the spool is open), `/ready` (200 while
//!   ingress accepts and the spool has room), `POST /retry` (records waiting for a retry are
//!   sent now): as documented since the first release;
//! - `/api/status`, `/api/records`, `/api/records/{key}`, `/api/dead-letters` (list, export,
//!   requeue, purge): JSON for `ackgate status`, `ackgate top` and `ackgate spool` on a
//!   running relay ([`routes`], [`status`]);
//! - `POST /api/upgrade`: ask the supervisor to upgrade to the executable at the path
//!   ackgate was started from (`ackgate upgrade`).
//! - `POST /api/reload`: re-read the config file, as SIGHUP does (`ackgate reload`).
//!
//! Limits, like the Forward port's: a connection cap taken before accept, a deadline on the
//! request head and on every answer (`admin.request_timeout`), accept errors backed off.
//! With `admin.token` set, every request but /health and /ready must carry it as a bearer
//! token; config validation requires one on a non-loopback address. Token, deadline and cap
//! are read from [`settings`] at each request, so a reload changes them.

pub mod client;
pub mod rates;
pub mod routes;
pub mod settings;
pub mod status;

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tracing::{debug, warn};

use crate::lifecycle::reload::Reloader;
use crate::spool::Spool;
use crate::upstream::dispatcher::Dispatcher;
use crate::upstream::health::Balancer;
use crate::upstream::Pipeline;
use rates::Rates;
use settings::AdminSettings;

/// What the handlers read and act on.
pub struct AdminState {
    pub spool: Spool,
    pub dispatcher: Arc<Dispatcher>,
    pub balancer: Arc<Balancer>,
    /// Route "original": the pipelines per original destination.
    pub router: Option<Arc<crate::upstream::router::Router>>,
    pub rates: Rates,
    /// False once shutdown began (`/ready` answers 503).
    pub accepting: Arc<AtomicBool>,
    pub started: Instant,
    pub ingress_listen: String,
    /// The worker's own lifecycle (and the supervisor's notices).
    pub lifecycle: Arc<crate::lifecycle::state::WorkerState>,
    /// The configured nodes, as a reload leaves them.
    pub configured: Arc<Pipeline>,
    /// Token, deadline and connection cap in force.
    pub settings: Arc<AdminSettings>,
    /// `POST /api/reload`, and the last reload's outcome for `/api/status`.
    pub reloader: Arc<Reloader>,
}

/// Longest an idle keep-alive connection is kept.
const IDLE_CONNECTION: Duration = Duration::from_secs(60);

/// Serve until shutdown; samples the event rates meanwhile.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, shutdown: CancellationToken) {
    let sampler = {
        let state = state.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let names = || {
                state
                    .configured
                    .nodes()
                    .into_iter()
                    .map(|n| n.name)
                    .collect()
            };
            state.rates.run(shutdown, names).await
        })
    };
    let settings = state.settings.clone();
    let router = routes::router(state);
    let permits = settings.connections.clone();
    let mut backoff = Duration::from_millis(10);
    loop {
        // The permit before accept: with none free, clients wait in the kernel's backlog.
        let permit = tokio::select! {
            permit = permits.acquire() => permit,
            _ = shutdown.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => {
                    backoff = Duration::from_millis(10);
                    pair
                }
                Err(e) => {
                    warn!(error = %e, retry_in = ?backoff, "admin accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let router = router.clone();
        let shutdown = shutdown.clone();
        let timeout = settings.current().request_timeout.0;
        tokio::spawn(async move {
            let _permit = permit;
            serve_connection(stream, peer, router, timeout, shutdown).await;
        });
    }
    let _ = sampler.await;
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    router: axum::Router,
    timeout: Duration,
    shutdown: CancellationToken,
) {
    let service =
        hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
            request
                .extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
            router.clone().oneshot(request)
        });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        result = tokio::time::timeout(IDLE_CONNECTION, connection) => {
            if let Ok(Err(e)) = result {
                debug!(%peer, error = %e, "admin connection ended with an error");
            }
        }
        _ = shutdown.cancelled() => {}
    }
}
