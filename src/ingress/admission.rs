//! Whether an accepted connection may be served: its source in `ingress.allow`, not one of
//! ackgate's own upstream connections come back in (a loop), and, in transparent mode, its
//! original destination in `ingress.allow_destinations`. Every refusal is logged with the
//! peer and the reason and counted in `rejected_connections`. Decided on the settings in
//! force at the moment of the accept (a reload changes the lists for the next connection).

use std::net::SocketAddr;

use prometheus_client::metrics::counter::Counter;
use tokio::net::TcpStream;
use tracing::{error, warn};

use super::IngressContext;
use crate::config::Transparent;
use crate::metrics::metrics;
use crate::middlebox::{original_destination, own_sources};

/// A connection that may be served.
pub(super) struct Admitted {
    /// Where the sender meant to connect, when iptables/nftables redirected it here.
    pub destination: Option<SocketAddr>,
    /// Its destination's `destination_events_in` counter, when it has a destination.
    pub destination_events: Option<Counter>,
}

/// Decide on a connection just accepted; `None` means refused (already logged).
pub(super) fn admit(
    ctx: &IngressContext,
    stream: &TcpStream,
    peer: SocketAddr,
) -> Option<Admitted> {
    let settings = ctx.settings();
    if !settings.allowed(&peer) {
        warn!(%peer, reason = "source address not in ingress.allow", "connection refused");
        metrics().reject("not_allowed");
        return None;
    }
    if own_sources().is_own_tcp(peer) {
        error!(%peer, reason = "ackgate's own upstream connection came back into its ingress",
            "connection refused: loop. Exclude ackgate's traffic from the REDIRECT rule \
             (upstream.socket_mark with `-m mark ! --mark`, or `-m owner ! --uid-owner`) or \
             point upstream.nodes at the aggregator, not at ackgate");
        metrics().reject("loop");
        return None;
    }
    let destination = match settings.config.transparent {
        Transparent::Off => None,
        Transparent::Redirect => match stream
            .local_addr()
            .and_then(|local| original_destination(stream, local))
        {
            Ok(destination) => destination,
            Err(e) => {
                // Served as a direct connection: refusing it would lose a sender for a kernel
                // that cannot say where it was going.
                warn!(%peer, error = %e, "cannot read the original destination (SO_ORIGINAL_DST); serving the connection as a direct one");
                None
            }
        },
    };
    if let Some(destination) = destination {
        let rules = &settings.config.allow_destinations;
        if !rules.is_empty() && !rules.iter().any(|rule| rule.contains(destination)) {
            warn!(%peer, %destination, reason = "original destination not in ingress.allow_destinations",
                "connection refused");
            metrics().reject("destination_not_allowed");
            return None;
        }
    }
    if let Some(router) = &ctx.router {
        match destination {
            Some(destination) => {
                if let Err(e) = router.ensure(destination) {
                    warn!(%peer, %destination, reason = %e, "connection refused");
                    metrics().reject("no_route");
                    return None;
                }
            }
            None if !settings.default_nodes => {
                warn!(%peer, reason = "not redirected (no original destination) and no [[upstream.nodes]] to send it to",
                    "connection refused");
                metrics().reject("no_route");
                return None;
            }
            None => {}
        }
    }
    let destination_events =
        destination.map(|destination| metrics().destinations.connection(destination));
    Some(Admitted {
        destination,
        destination_events,
    })
}
