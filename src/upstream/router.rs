//! Route "original" (`upstream.route`): a pipeline per original destination, created the
//! first time a redirected connection names it, or at start-up for destinations that records
//! left in the spool carry. Each pipeline is a dispatcher with its own cursor that takes only
//! that destination's records, a balancer over one node at that address with `[upstream]`'s
//! settings, and the node's tasks: a blackholed aggregator holds back only its own records.
//! A reload reaches every destination's node ([`Router::apply`]), as it reaches the
//! configured ones.
//!
//! Must not: create more than `upstream.max_destinations` pipelines, or a second owner of
//! damaged values (the configured pipeline owns them; with no `[[upstream.nodes]]`, the first
//! pipeline created here does).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tracing::{info, warn};

use super::dispatcher::Route;
use super::pipeline::{Pipeline, PipelineContext};
use super::plan::{plan, Plan};
use crate::config::{NodeConfig, UpstreamConfig};

/// Why a connection's destination gets no pipeline.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("upstream.max_destinations ({0}) original destinations have a node already")]
    TooMany(usize),
    #[error("cannot set up a node for {destination}: {reason}")]
    Setup {
        destination: SocketAddr,
        reason: String,
    },
}

/// `[upstream]` as in force, for the nodes of new and existing destinations.
struct Settings {
    config: UpstreamConfig,
    max_age: Option<Duration>,
}

pub struct Router {
    ctx: PipelineContext,
    /// Locked with `pipelines` held: a destination started during a reload gets either the
    /// settings before it (and then the reload's) or the reload's.
    settings: Mutex<Settings>,
    pipelines: Mutex<HashMap<SocketAddr, Arc<Pipeline>>>,
}

impl Router {
    pub(super) fn new(
        ctx: PipelineContext,
        config: &UpstreamConfig,
        max_age: Option<Duration>,
    ) -> Router {
        Router {
            ctx,
            settings: Mutex::new(Settings {
                config: config.clone(),
                max_age,
            }),
            pipelines: Mutex::new(HashMap::new()),
        }
    }

    fn pipelines(&self) -> MutexGuard<'_, HashMap<SocketAddr, Arc<Pipeline>>> {
        self.pipelines.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn settings(&self) -> MutexGuard<'_, Settings> {
        self.settings.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The plan of `destination`'s one node, with `[upstream]`'s settings.
    fn plan_for(settings: &Settings, destination: SocketAddr) -> Result<Plan, RouteError> {
        let setup = |reason: String| RouteError::Setup {
            destination,
            reason,
        };
        let node = NodeConfig::at(&destination.to_string()).map_err(setup)?;
        plan(
            &settings.config,
            settings.max_age,
            std::slice::from_ref(&node),
            |_, _| format!("original destination {destination}"),
        )
        .map_err(|e| setup(e.to_string()))
    }

    /// Make sure `destination` has a pipeline (starting one if needed).
    pub fn ensure(&self, destination: SocketAddr) -> Result<(), RouteError> {
        let mut pipelines = self.pipelines();
        if pipelines.contains_key(&destination) {
            return Ok(());
        }
        let settings = self.settings();
        let max = settings.config.max_destinations as usize;
        if pipelines.len() >= max {
            return Err(RouteError::TooMany(max));
        }
        let plan = Router::plan_for(&settings, destination)?;
        // With no [[upstream.nodes]], the configured pipeline has no node to read the spool,
        // so the first destination's pipeline dead-letters damaged values in its place.
        let owns_damaged = settings.config.nodes.is_empty() && pipelines.is_empty();
        let pipeline = Pipeline::start(&self.ctx, plan, Route::To(destination), owns_damaged);
        info!(%destination, pipelines = pipelines.len() + 1, "route original: new upstream node for an original destination");
        pipelines.insert(destination, pipeline);
        Ok(())
    }

    /// A reload: every destination's node takes `[upstream]`'s new settings (its connection
    /// kept), and new destinations get them. `max_destinations` bounds new destinations
    /// only; none that has a node loses it.
    pub fn apply(&self, config: &UpstreamConfig, max_age: Option<Duration>) {
        let pipelines = self.pipelines();
        let mut settings = self.settings();
        *settings = Settings {
            config: config.clone(),
            max_age,
        };
        for (destination, pipeline) in pipelines.iter() {
            // A node at an address, without TLS: its plan builds nothing that can fail.
            match Router::plan_for(&settings, *destination) {
                Ok(plan) => {
                    pipeline.apply(plan);
                }
                Err(e) => {
                    warn!(%destination, error = %e, "route original: the reload's settings do not apply to this destination's node; it keeps its settings")
                }
            }
        }
    }

    /// Start the pipelines of destinations that records in the spool carry (after a restart).
    pub fn discover(&self) {
        let queued = self.ctx.spool.queued_by_destination();
        for (destination, _) in &queued {
            if let Err(e) = self.ensure(*destination) {
                warn!(%destination, error = %e, "records in the spool for an original destination that gets no node: they stay queued");
            }
        }
        let directed: u64 = queued.iter().map(|(_, q)| q.records).sum();
        let undirected = self.ctx.spool.stats().records.saturating_sub(directed);
        if undirected > 0 && self.settings().config.nodes.is_empty() {
            warn!(records = undirected, "records in the spool have no original destination (direct connections, or written before route = \"original\") and [[upstream.nodes]] is empty: they stay queued until a node is configured");
        }
    }

    /// Every pipeline, by destination.
    pub fn all(&self) -> Vec<(SocketAddr, Arc<Pipeline>)> {
        let mut all: Vec<_> = self
            .pipelines()
            .iter()
            .map(|(d, p)| (*d, p.clone()))
            .collect();
        all.sort_by_key(|(d, _)| *d);
        all
    }
}
