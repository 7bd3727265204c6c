//! The side facing aggregators: the shared queue ([`dispatcher`]) and one task per node
//! ([`node`]). `start` builds both from the config; the returned tracker finishes once every
//! node has drained its window (or given up at `shutdown_grace`) after shutdown.

pub mod dispatcher;
pub mod node;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::UpstreamConfig;
use crate::spool::Spool;
use dispatcher::{Backoff, Dispatcher};
use node::NodeSettings;

/// Start one task per configured node, all fed by one dispatcher over `spool`.
pub fn start(
    config: &UpstreamConfig,
    spool: Spool,
    shutdown: CancellationToken,
) -> (Arc<Dispatcher>, TaskTracker) {
    let backoff = Backoff {
        initial: config.retry_initial.0,
        max: config.retry_max.0,
    };
    let dispatcher = Arc::new(Dispatcher::new(spool, backoff));
    let tracker = TaskTracker::new();
    for node in &config.nodes {
        let settings = NodeSettings {
            name: node.display_name().to_string(),
            address: node.address.clone(),
            ack_timeout: config.ack_timeout.0,
            connect_timeout: config.connect_timeout.0,
            window: config.window as usize,
            reconnect: backoff,
            shutdown_grace: config.shutdown_grace.0,
        };
        tracker.spawn(node::run_node(
            settings,
            dispatcher.clone(),
            shutdown.clone(),
        ));
    }
    tracker.close();
    (dispatcher, tracker)
}
