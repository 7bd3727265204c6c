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

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{split_host_port, Compress, HeartbeatType, UpstreamConfig};
use crate::forward::entries::Compression;
use crate::spool::Spool;
use crate::supervise::Watchdog;
use crate::tls::ClientTlsSettings;
use connect::{client_tls, ClientAuth};
use dispatcher::{Backoff, Dispatcher, PoisonPolicy};
use health::{Balancer, HealthSettings, HeartbeatKind};
use node::NodeSettings;

/// Start one task per configured node (and the heartbeat task), fed by one dispatcher.
pub fn start(
    config: &UpstreamConfig,
    max_age: Option<std::time::Duration>,
    spool: Spool,
    shutdown: CancellationToken,
    watchdog: &Watchdog,
) -> Result<(Arc<Dispatcher>, Arc<Balancer>, TaskTracker), crate::tls::TlsError> {
    let backoff = Backoff {
        initial: config.retry_initial.0,
        max: config.retry_max.0,
    };
    let policy = PoisonPolicy {
        split_after_attempts: config.split_after_attempts,
        max_age,
    };
    let dispatcher = Arc::new(Dispatcher::new(spool, backoff, policy));
    let health = HealthSettings {
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
    };
    let balancer = Arc::new(Balancer::new(
        config
            .nodes
            .iter()
            .map(|n| (n.display_name().to_string(), n.weight, n.standby))
            .collect(),
        health,
        config.window as u64,
    ));
    let tracker = TaskTracker::new();
    let mut all = Vec::new();
    for (index, node) in config.nodes.iter().enumerate() {
        let settings = NodeSettings {
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
            auth: config.security.as_ref().and_then(|security| {
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
            }),
            socket_mark: config.socket_mark,
        };
        all.push(settings.clone());
        let guard = watchdog.guard(format!("upstream node {}", settings.name));
        let node = node::run_node(
            settings,
            dispatcher.clone(),
            balancer.clone(),
            shutdown.clone(),
        );
        let stopping = shutdown.clone();
        tracker.spawn(async move {
            node.await;
            if stopping.is_cancelled() {
                guard.disarm();
            }
        });
    }
    tracker.spawn(heartbeat::run_heartbeats(
        all,
        config.socket_mark,
        balancer.clone(),
        shutdown.clone(),
    ));
    tracker.close();
    Ok((dispatcher, balancer, tracker))
}
