//! Route "original" (`upstream.route`): a pipeline per original destination, created the
//! first time a redirected connection names it, or at start-up for destinations that records
//! left in the spool carry. Each pipeline is a dispatcher with its own cursor that takes only
//! that destination's records, a balancer over one node at that address with `[upstream]`'s
//! settings, and the node's tasks: a blackholed aggregator holds back only its own records.
//!
//! Must not: create more than `upstream.max_destinations` pipelines, or a second owner of
//! damaged values (the configured pipeline owns them; with no `[[upstream.nodes]]`, the first
//! pipeline created here does).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use tracing::{info, warn};

use super::dispatcher::{Dispatcher, Route};
use super::health::Balancer;
use super::{start_pipeline, PipelineContext};
use crate::config::NodeConfig;

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

/// One original destination's pipeline.
#[derive(Clone)]
pub struct Pipeline {
    pub dispatcher: Arc<Dispatcher>,
    pub balancer: Arc<Balancer>,
}

pub struct Router {
    ctx: PipelineContext,
    pipelines: Mutex<HashMap<SocketAddr, Pipeline>>,
}

impl Router {
    pub(super) fn new(ctx: PipelineContext) -> Router {
        Router {
            ctx,
            pipelines: Mutex::new(HashMap::new()),
        }
    }

    fn pipelines(&self) -> MutexGuard<'_, HashMap<SocketAddr, Pipeline>> {
        self.pipelines.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Make sure `destination` has a pipeline (starting one if needed).
    pub fn ensure(&self, destination: SocketAddr) -> Result<(), RouteError> {
        let mut pipelines = self.pipelines();
        if pipelines.contains_key(&destination) {
            return Ok(());
        }
        let max = self.ctx.config.max_destinations as usize;
        if pipelines.len() >= max {
            return Err(RouteError::TooMany(max));
        }
        let setup = |reason: String| RouteError::Setup {
            destination,
            reason,
        };
        let node = NodeConfig::at(&destination.to_string()).map_err(setup)?;
        // With no [[upstream.nodes]], the configured pipeline has no node to read the spool,
        // so the first destination's pipeline dead-letters damaged values in its place.
        let owns_damaged = self.ctx.config.nodes.is_empty() && pipelines.is_empty();
        let (dispatcher, balancer) = start_pipeline(
            &self.ctx,
            std::slice::from_ref(&node),
            Route::To(destination),
            owns_damaged,
        )
        .map_err(|e| setup(e.to_string()))?;
        info!(%destination, pipelines = pipelines.len() + 1, "route original: new upstream node for an original destination");
        pipelines.insert(
            destination,
            Pipeline {
                dispatcher,
                balancer,
            },
        );
        Ok(())
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
        if undirected > 0 && self.ctx.config.nodes.is_empty() {
            warn!(records = undirected, "records in the spool have no original destination (direct connections, or written before route = \"original\") and [[upstream.nodes]] is empty: they stay queued until a node is configured");
        }
    }

    /// Every pipeline, by destination.
    pub fn all(&self) -> Vec<(SocketAddr, Pipeline)> {
        let mut all: Vec<_> = self
            .pipelines()
            .iter()
            .map(|(d, p)| (*d, p.clone()))
            .collect();
        all.sort_by_key(|(d, _)| *d);
        all
    }
}
