//! The side facing aggregators: the shared queue ([`dispatcher`]), node health and weighted
//! choice ([`health`]), one task per node ([`node`], over [`connect`]), and the health probes
//! ([`heartbeat`]). [`plan`] builds what a pipeline is to be from the config (the only step
//! that can fail), [`pipeline`] runs it and puts a reload's plan in force. `start` builds
//! them from the config; the returned tracker finishes once every node has drained its
//! window (or given up at `shutdown_grace`) after shutdown.
//!
//! Owns the aggregator sockets. Must not: delete a record before its ack (invariant 2), change
//! a chunk id (3), or let a record leave every queue (8); it writes to the spool only through
//! its delete / dead-letter / split calls.

pub mod connect;
pub mod dispatcher;
pub mod health;
pub mod heartbeat;
pub mod node;
pub mod pipeline;
pub mod plan;
pub mod router;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{RouteMode, UpstreamConfig};
use crate::spool::Spool;
use crate::supervise::Watchdog;
use dispatcher::{Dispatcher, Route};
use health::Balancer;
pub(crate) use pipeline::PipelineContext;
pub use pipeline::{NodeChanges, NodeView, Pipeline};
pub use plan::NodeBuildError;

/// What [`start`] started.
pub struct Upstream {
    /// The configured nodes' pipeline: every record, or (route "original") those without an
    /// original destination.
    pub configured: Arc<Pipeline>,
    pub dispatcher: Arc<Dispatcher>,
    pub balancer: Arc<Balancer>,
    /// Route "original": the pipelines per original destination.
    pub router: Option<Arc<router::Router>>,
    /// Finishes once every node has drained its window after shutdown.
    pub tracker: TaskTracker,
}

/// A reload of `[upstream]`, built (node certificates read) and ready to be put in force.
pub struct UpstreamPlan {
    configured: plan::Plan,
    config: UpstreamConfig,
    max_age: Option<Duration>,
}

/// Start one task per configured node (and the heartbeat task), fed by one dispatcher; with
/// route "original", also the router that starts a pipeline per original destination.
pub fn start(
    config: &UpstreamConfig,
    max_age: Option<Duration>,
    spool: Spool,
    shutdown: CancellationToken,
    watchdog: &Watchdog,
) -> Result<Upstream, NodeBuildError> {
    let ctx = PipelineContext {
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
    let plan = plan::plan(config, max_age, &config.nodes, plan::configured_key)?;
    let configured = Pipeline::start(&ctx, plan, route, owns_damaged);
    let router = original.then(|| Arc::new(router::Router::new(ctx.clone(), config, max_age)));
    // Nodes started later (a reload, a router) are tracked too: `wait` ends once those are
    // done as well.
    ctx.tracker.close();
    Ok(Upstream {
        dispatcher: configured.dispatcher.clone(),
        balancer: configured.balancer.clone(),
        configured,
        router,
        tracker: ctx.tracker,
    })
}

/// Build every configured node's settings (their TLS files read) without starting anything:
/// a new worker checks them before it takes over from the running one.
pub fn check(config: &UpstreamConfig) -> Result<(), NodeBuildError> {
    plan::plan(config, None, &config.nodes, plan::configured_key).map(|_| ())
}

impl Upstream {
    /// Build what `config` asks of the configured nodes (their TLS files read now). Changes
    /// nothing: a failure leaves every node as it runs.
    pub fn prepare(
        &self,
        config: &UpstreamConfig,
        max_age: Option<Duration>,
    ) -> Result<UpstreamPlan, NodeBuildError> {
        Ok(UpstreamPlan {
            configured: plan::plan(config, max_age, &config.nodes, plan::configured_key)?,
            config: config.clone(),
            max_age,
        })
    }

    /// Put a prepared plan in force: the configured nodes, and every original destination's
    /// node (route "original"), which follow `[upstream]` too.
    pub fn apply(&self, plan: UpstreamPlan) -> NodeChanges {
        let changes = self.configured.apply(plan.configured);
        if let Some(router) = &self.router {
            router.apply(&plan.config, plan.max_age);
        }
        changes
    }
}
