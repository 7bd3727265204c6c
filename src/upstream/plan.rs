//! What a pipeline is to be, built from `[upstream]` and a node list before anything runs or
//! changes: every node's settings with its TLS files read now, the retry and poison policy,
//! the health settings. Building is the only step of a start or a reload that can fail (a
//! certificate that cannot be read), so a reload that fails here has changed nothing
//! (invariant 10: a reload is all or nothing, and drops nothing).
//!
//! A node's identity across reloads is its [`LinkKey`]: name, address, and everything that
//! shapes its connection (TLS, handshake credentials). A node whose key is unchanged keeps its
//! task, its slot and its open connection, and takes the rest of its new settings in place; a
//! changed key is a different node (the old one drains and goes, the new one connects).

use std::path::PathBuf;
use std::time::Duration;

use super::connect::{client_tls, ClientAuth};
use super::dispatcher::{Backoff, PoisonPolicy};
use super::health::{HealthSettings, HeartbeatKind};
use super::node::NodeSettings;
use crate::config::{split_host_port, Compress, HeartbeatType, NodeConfig, Secret, UpstreamConfig};
use crate::forward::entries::Compression;
use crate::tls::{ClientTlsSettings, TlsError};

/// A node's TLS could not be set up; `key` names it in the config.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {source}")]
pub struct NodeBuildError {
    /// `upstream.nodes[i] (name)`, or the original destination of route "original".
    pub key: String,
    #[source]
    pub source: TlsError,
}

/// What makes a node the same node across a reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkKey {
    name: String,
    address: String,
    tls: bool,
    tls_ca: Option<PathBuf>,
    tls_verify: bool,
    tls_client_cert: Option<PathBuf>,
    tls_client_key: Option<PathBuf>,
    tls_server_name: Option<String>,
    self_hostname: Option<String>,
    shared_key: Option<Secret>,
    username: Option<String>,
    password: Option<Secret>,
}

impl LinkKey {
    fn of(config: &UpstreamConfig, node: &NodeConfig) -> LinkKey {
        let security = config.security.as_ref();
        LinkKey {
            name: node.display_name().to_string(),
            address: node.address.clone(),
            tls: node.tls,
            tls_ca: node.tls_ca.clone(),
            tls_verify: node.tls_verify,
            tls_client_cert: node.tls_client_cert.clone(),
            tls_client_key: node.tls_client_key.clone(),
            tls_server_name: node.tls_server_name.clone(),
            self_hostname: security.map(|s| s.self_hostname.clone()),
            shared_key: node
                .shared_key
                .clone()
                .or_else(|| security.and_then(|s| s.shared_key.clone())),
            username: node.username.clone(),
            password: node.password.clone(),
        }
    }
}

/// One node as it is to run.
pub struct PlannedNode {
    pub link: LinkKey,
    pub weight: u32,
    pub standby: bool,
    /// Its settings; `index` is set when the node gets its balancer slot.
    pub settings: NodeSettings,
}

/// A whole pipeline as it is to run.
pub struct Plan {
    pub backoff: Backoff,
    pub policy: PoisonPolicy,
    pub health: HealthSettings,
    /// The window: how far a node may run ahead of its weighted share.
    pub slack: u64,
    pub socket_mark: Option<u32>,
    pub nodes: Vec<PlannedNode>,
}

/// Build the plan of a pipeline over `nodes`; `keys` names each node in errors.
pub fn plan(
    config: &UpstreamConfig,
    max_age: Option<Duration>,
    nodes: &[NodeConfig],
    keys: impl Fn(usize, &NodeConfig) -> String,
) -> Result<Plan, NodeBuildError> {
    let backoff = Backoff {
        initial: config.retry_initial.0,
        max: config.retry_max.0,
    };
    let mut planned = Vec::with_capacity(nodes.len());
    for (i, node) in nodes.iter().enumerate() {
        let settings = node_settings(config, node, backoff).map_err(|source| NodeBuildError {
            key: keys(i, node),
            source,
        })?;
        planned.push(PlannedNode {
            link: LinkKey::of(config, node),
            weight: node.weight,
            standby: node.standby,
            settings,
        });
    }
    Ok(Plan {
        backoff,
        policy: PoisonPolicy {
            split_after_attempts: config.split_after_attempts,
            max_age,
        },
        health: health_settings(config),
        slack: u64::from(config.window),
        socket_mark: config.socket_mark,
        nodes: planned,
    })
}

/// How `[[upstream.nodes]]` entries are named in errors.
pub fn configured_key(index: usize, node: &NodeConfig) -> String {
    format!("upstream.nodes[{index}] ({})", node.display_name())
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
    node: &NodeConfig,
    backoff: Backoff,
) -> Result<NodeSettings, TlsError> {
    Ok(NodeSettings {
        index: 0,
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
