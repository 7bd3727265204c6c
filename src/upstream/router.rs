//! Route "original" (`upstream.route`): a pipeline per original destination, created the
//! first time a redirected connection names it, or at start-up for destinations that records
//! left in the spool carry. Each pipeline is a dispatcher with its own cursor that takes only
//! that destination's records, a balancer over one node at that address with `[upstream]`'s
//! settings, and the node's tasks: a blackholed aggregator holds back only its own records.
//!
//! Must not: create more than `upstream.max_destinations` pipelines, or a second owner of
//! damaged values (the configured pipeline owns them).

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
        let (dispatcher, balancer) = start_pipeline(
            &self.ctx,
            std::slice::from_ref(&node),
            Route::To(destination),
            false,
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

    /// Start the pipelines of destinations that records in the spool carry (after a restart),
    /// reading the spool in the background.
    pub fn discover(self: &Arc<Self>) {
        let router = self.clone();
        let spool = self.ctx.spool.clone();
        self.ctx.tracker.spawn(async move {
            let found = tokio::task::spawn_blocking(move || spool.destinations()).await;
            match found {
                Ok(Ok(destinations)) => {
                    for destination in destinations {
                        if let Err(e) = router.ensure(destination) {
                            warn!(%destination, error = %e, "records in the spool for an original destination that gets no node");
                        }
                    }
                }
                Ok(Err(e)) => {
                    warn!(error = %e, "cannot read the spool's original destinations; they get their nodes when senders connect")
                }
                Err(e) => warn!(error = %e, "spool scan task failed"),
            }
        });
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
