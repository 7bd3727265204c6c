//! The side facing aggregators: the shared queue ([`dispatcher`]), node health and weighted
//! choice ([`health`]), one task per node ([`node`], over [`connect`]), and the health probes
//! ([`heartbeat`]). `start` builds them from the config; the returned tracker finishes once
//! every node has drained its window (or given up at `shutdown_grace`) after shutdown.
//!
//! Owns the aggregator sockets. Must not: delete a record before its ack (invariant 2), change
//! a chunk id (3), or let a record leave every queue (8); it writes to the spool only through
//! its delete / dead-letter / split calls.

pub mod connect;
pub mod dispatcher;
pub mod health;
pub mod heartbeat;
pub mod node;
pub mod router;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{
    split_host_port, Compress, HeartbeatType, NodeConfig, RouteMode, UpstreamConfig,
};
use crate::forward::entries::Compression;
use crate::spool::Spool;
use crate::supervise::Watchdog;
use crate::tls::ClientTlsSettings;
use connect::{client_tls, ClientAuth};
use dispatcher::{Backoff, Dispatcher, PoisonPolicy, Route};
use health::{Balancer, HealthSettings, HeartbeatKind};
use node::NodeSettings;

/// What [`start`] started.
pub struct Upstream {
    /// The configured nodes' pipeline: every record, or (route "original") those without an
    /// original destination.
    pub dispatcher: Arc<Dispatcher>,
    pub balancer: Arc<Balancer>,
    /// Route "original": the pipelines per original destination.
    pub router: Option<Arc<router::Router>>,
    /// Finishes once every node has drained its window after shutdown.
    pub tracker: TaskTracker,
}

/// Everything a pipeline (a dispatcher, its balancer, its node tasks and heartbeats) is built
/// from.
#[derive(Clone)]
pub(crate) struct PipelineContext {
    pub config: UpstreamConfig,
    pub max_age: Option<std::time::Duration>,
    pub spool: Spool,
    pub shutdown: CancellationToken,
    pub watchdog: Watchdog,
    pub tracker: TaskTracker,
}

/// Start one task per configured node (and the heartbeat task), fed by one dispatcher; with
/// route "original", also the router that starts a pipeline per original destination.
pub fn start(
    config: &UpstreamConfig,
    max_age: Option<std::time::Duration>,
    spool: Spool,
    shutdown: CancellationToken,
    watchdog: &Watchdog,
) -> Result<Upstream, crate::tls::TlsError> {
    let ctx = PipelineContext {
        config: config.clone(),
        max_age,
        spool,
        shutdown,
        watchdog: watchdog.clone(),
        tracker: TaskTracker::new(),
    };
    let original = config.route == RouteMode::Original;
    let route = if original {
        Route::Undirected
    } else {
        Route::All
    };
    // Damaged values are dead-lettered by a dispatcher that nodes take from: the router's
    // first pipeline when there are no configured nodes.
    let owns_damaged = !original || !config.nodes.is_empty();
    let (dispatcher, balancer) = start_pipeline(&ctx, &config.nodes, route, owns_damaged)?;
    let router = original.then(|| Arc::new(router::Router::new(ctx.clone())));
    // Nodes a router starts later are tracked too: `wait` ends once those are done as well.
    ctx.tracker.close();
    Ok(Upstream {
        dispatcher,
        balancer,
        router,
        tracker: ctx.tracker,
    })
}

/// A dispatcher for `route`, a balancer over `nodes`, and their tasks.
pub(crate) fn start_pipeline(
    ctx: &PipelineContext,
    nodes: &[NodeConfig],
    route: Route,
    owns_damaged: bool,
) -> Result<(Arc<Dispatcher>, Arc<Balancer>), crate::tls::TlsError> {
    let config = &ctx.config;
    let backoff = Backoff {
        initial: config.retry_initial.0,
        max: config.retry_max.0,
    };
    let policy = PoisonPolicy {
        split_after_attempts: config.split_after_attempts,
        max_age: ctx.max_age,
    };
    let dispatcher = Arc::new(Dispatcher::routed(
        ctx.spool.clone(),
        backoff,
        policy,
        route,
        owns_damaged,
    ));
    let balancer = Arc::new(Balancer::new(
        nodes
            .iter()
            .map(|n| (n.display_name().to_string(), n.weight, n.standby))
            .collect(),
        health_settings(config),
        config.window as u64,
    ));
    let mut all = Vec::new();
    for (index, node) in nodes.iter().enumerate() {
        let settings = node_settings(config, index, node, backoff)?;
        all.push(settings.clone());
        let guard = ctx
            .watchdog
            .guard(format!("upstream node {}", settings.name));
        let node = node::run_node(
            settings,
            dispatcher.clone(),
            balancer.clone(),
            ctx.shutdown.clone(),
        );
        let stopping = ctx.shutdown.clone();
        ctx.tracker.spawn(async move {
            node.await;
            if stopping.is_cancelled() {
                guard.disarm();
            }
        });
    }
    if !all.is_empty() {
        ctx.tracker.spawn(heartbeat::run_heartbeats(
            all,
            config.socket_mark,
            balancer.clone(),
            ctx.shutdown.clone(),
        ));
    }
    Ok((dispatcher, balancer))
}

/// Load every node's TLS settings without starting anything (a new worker checks them
/// before it takes over from the running one).
pub fn check_tls(config: &UpstreamConfig) -> Result<(), crate::tls::TlsError> {
    let backoff = Backoff {
        initial: config.retry_initial.0,
        max: config.retry_max.0,
    };
    for (index, node) in config.nodes.iter().enumerate() {
        node_settings(config, index, node, backoff)?;
    }
    Ok(())
}

fn health_settings(config: &UpstreamConfig) -> HealthSettings {
    HealthSettings {
        heartbeat: match config.heartbeat_type {
            HeartbeatType::Transport | HeartbeatType::Tcp => HeartbeatKind::Transport,
            HeartbeatType::Udp => HeartbeatKind::Udp,
            HeartbeatType::None => HeartbeatKind::None,
        },
        interval: config.heartbeat_interval.0,
        phi_threshold: config.phi_threshold,
        phi_failure_detector: config.phi_failure_detector,
        hard_timeout: config.hard_timeout.0,
        recover_wait: config.recover_wait.0,
    }
}

/// One node's settings: `[upstream]`'s, with the node's own address, TLS and credentials.
fn node_settings(
    config: &UpstreamConfig,
    index: usize,
    node: &NodeConfig,
    backoff: Backoff,
) -> Result<NodeSettings, crate::tls::TlsError> {
    Ok(NodeSettings {
        index,
        name: node.display_name().to_string(),
        address: node.address.clone(),
        ack_timeout: config.ack_timeout.0,
        connect_timeout: config.connect_timeout.0,
        window: config.window as usize,
        window_bytes: usize::try_from(config.window_bytes.0).unwrap_or(usize::MAX),
        reconnect: backoff,
        shutdown_grace: config.shutdown_grace.0,
        compress: match node.compress {
            Compress::Text => None,
            Compress::Gzip => Some(Compression::Gzip),
        },
        strip_empty_metadata: node.strip_empty_metadata,
        tls: if node.tls {
            let host = split_host_port(&node.address)
                .map(|(host, _)| host)
                .unwrap_or(&node.address);
            Some(client_tls(
                &ClientTlsSettings {
                    ca: node.tls_ca.clone(),
                    verify: node.tls_verify,
                    client_cert: node
                        .tls_client_cert
                        .clone()
                        .zip(node.tls_client_key.clone()),
                    server_name: node.tls_server_name.clone(),
                },
                host,
            )?)
        } else {
            None
        },
        auth: client_auth(config, node),
        socket_mark: config.socket_mark,
    })
}

fn client_auth(config: &UpstreamConfig, node: &NodeConfig) -> Option<ClientAuth> {
    let security = config.security.as_ref()?;
    let key = node
        .shared_key
        .as_ref()
        .or(security.shared_key.as_ref())?
        .expose()
        .to_string();
    Some(ClientAuth {
        self_hostname: security.self_hostname.clone(),
        shared_key: key,
        username: node.username.clone().unwrap_or_default(),
        password: node
            .password
            .as_ref()
            .map(|p| p.expose().to_string())
            .unwrap_or_default(),
    })
}
