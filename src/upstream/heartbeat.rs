//! Node health probes: every `upstream.heartbeat_interval`, a UDP datagram or a TCP connect
//! to each node (fluentd's out_forward heartbeat, PROTOCOL.md §8); replies feed the balancer's
//! failure detectors, which detach silent nodes and bring them back. Replies are credited to
//! the node's balancer slot ([`NodeSettings::index`]), never to a position in this list: a
//! reload restarts this task with the new node list while slots stay where they are.

use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::health::Balancer;
use super::node::{connect, NodeSettings};
use crate::middlebox::{own_sources, set_mark};

/// Probe every node each `interval` as `upstream.heartbeat_type` says, feed the replies to the
/// balancer's failure detectors, and let them detach silent nodes (PROTOCOL.md §8).
pub async fn run_heartbeats(
    nodes: Vec<NodeSettings>,
    socket_mark: Option<u32>,
    balancer: Arc<Balancer>,
    shutdown: CancellationToken,
) {
    use super::health::HeartbeatKind;
    let settings = balancer.settings();
    if settings.heartbeat == HeartbeatKind::None || nodes.is_empty() {
        return;
    }
    let udp = if settings.heartbeat == HeartbeatKind::Udp {
        match heartbeat_socket(socket_mark).await {
            Ok(socket) => Some(Arc::new(socket)),
            Err(e) => {
                warn!(error = %e, "cannot open the UDP heartbeat socket; nodes are judged by their connections only");
                None
            }
        }
    } else {
        None
    };
    // Resolved once, like fluentd without expire_dns_cache: replies must come from exactly here.
    let mut targets = Vec::with_capacity(nodes.len());
    for node in &nodes {
        let resolved = tokio::net::lookup_host(&node.address)
            .await
            .ok()
            .and_then(|mut addrs| addrs.next());
        targets.push(resolved);
    }
    if let Some(socket) = udp.clone() {
        let balancer = balancer.clone();
        let targets = targets.clone();
        let slots: Vec<usize> = nodes.iter().map(|n| n.index).collect();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            loop {
                let received = tokio::select! {
                    r = socket.recv_from(&mut buf) => r,
                    _ = shutdown.cancelled() => return,
                };
                if let Ok((_, from)) = received {
                    match targets.iter().position(|t| *t == Some(from)) {
                        Some(position) => balancer.heartbeat(slots[position]),
                        None => debug!(%from, "heartbeat reply from an unknown address"),
                    }
                }
            }
        });
    }
    let mut ticker = tokio::time::interval(settings.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        for (position, node) in nodes.iter().enumerate() {
            let index = node.index;
            match (&udp, targets[position]) {
                (Some(socket), Some(target)) => {
                    let _ = socket.send_to(b"\0", target).await;
                }
                (Some(_), None) => {}
                (None, _) => {
                    let balancer = balancer.clone();
                    let node = node.clone();
                    let deadline = settings.interval.min(node.connect_timeout);
                    tokio::spawn(async move {
                        let probe = NodeSettings {
                            connect_timeout: deadline,
                            ..node
                        };
                        if let Ok(mut stream) = connect(&probe).await {
                            let _ = timeout(deadline, stream.shutdown()).await;
                            balancer.heartbeat(index);
                        }
                    });
                }
            }
            balancer.check(index);
        }
    }
}

/// The UDP socket heartbeats leave from, with `upstream.socket_mark`, its port registered as
/// one of ackgate's own (ingress does not answer it if a REDIRECT rule sends it back in).
async fn heartbeat_socket(mark: Option<u32>) -> std::io::Result<tokio::net::UdpSocket> {
    let socket = tokio::net::UdpSocket::bind("0.0.0.0:0").await?;
    if let Some(mark) = mark {
        set_mark(&socket, mark).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "cannot set SO_MARK {mark} (upstream.socket_mark; needs CAP_NET_ADMIN): {e}"
                ),
            )
        })?;
    }
    own_sources().register_udp_port(socket.local_addr()?.port());
    Ok(socket)
}
