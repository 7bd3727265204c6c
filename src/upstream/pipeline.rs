//! One running pipeline: a dispatcher, the balancer over its nodes, a task per node and the
//! heartbeat task; and the one place where a [`Plan`] is put in force, at start and at every
//! reload ([`Pipeline::apply`]).
//!
//! What a reload does to the nodes, by [`LinkKey`]:
//! - **kept** (same key): the task, its balancer slot and its open connection stay; the new
//!   settings reach it between chunks, its weight and standby flag change in place;
//! - **added**: a new slot and a new task;
//! - **removed** (or its key changed): its slot is retired (it takes no record from now on),
//!   its task drains like a shutdown (the chunks in flight have `shutdown_grace` to be acked)
//!   then aborts the connection and gives what is still unacked back to the queue at once,
//!   for the other nodes. Its watchdog guard is disarmed first: a removed node's end is not a
//!   core task's death (invariant 9).
//!
//! Invariant 8 holds across it: a removed node's records are in flight until acked or given
//! back, never dropped.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::dispatcher::{Dispatcher, Route};
use super::health::Balancer;
use super::heartbeat;
use super::node::{self, NodeControl, NodeSettings};
use super::plan::{LinkKey, Plan, PlannedNode};
use crate::spool::Spool;
use crate::supervise::Watchdog;

/// What every pipeline of a relay is started with.
#[derive(Clone)]
pub(crate) struct PipelineContext {
    pub spool: Spool,
    pub shutdown: CancellationToken,
    pub watchdog: Watchdog,
    pub tracker: TaskTracker,
}

/// A running node, as the pipeline controls it.
struct Running {
    link: LinkKey,
    slot: usize,
    weight: u32,
    standby: bool,
    settings: watch::Sender<Arc<NodeSettings>>,
    /// Cancels the node task (a child of the relay's shutdown).
    stop: CancellationToken,
    retired: CancellationToken,
}

/// A node as the admin API lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    /// Its balancer slot.
    pub slot: usize,
    pub name: String,
    pub address: String,
}

/// What a reload did to a pipeline's nodes, by name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NodeChanges {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Kept nodes whose weight, standby flag or payload settings changed: "name (key, …)".
    pub changed: Vec<String>,
}

impl NodeChanges {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

pub struct Pipeline {
    pub dispatcher: Arc<Dispatcher>,
    pub balancer: Arc<Balancer>,
    ctx: PipelineContext,
    /// The nodes in force, in config order.
    nodes: Mutex<Vec<Running>>,
    /// Stops the heartbeat task of the node list before this one.
    heartbeat: Mutex<Option<CancellationToken>>,
}

impl Pipeline {
    /// Start a pipeline for `route` with the nodes of `plan`.
    pub(crate) fn start(
        ctx: &PipelineContext,
        plan: Plan,
        route: Route,
        owns_damaged: bool,
    ) -> Arc<Pipeline> {
        let dispatcher = Arc::new(Dispatcher::routed(
            ctx.spool.clone(),
            plan.backoff,
            plan.policy,
            route,
            owns_damaged,
        ));
        let balancer = Arc::new(Balancer::new(Vec::new(), plan.health, plan.slack));
        let pipeline = Arc::new(Pipeline {
            dispatcher,
            balancer,
            ctx: ctx.clone(),
            nodes: Mutex::new(Vec::new()),
            heartbeat: Mutex::new(None),
        });
        pipeline.apply(plan);
        pipeline
    }

    fn running(&self) -> MutexGuard<'_, Vec<Running>> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The nodes in force, in config order.
    pub fn nodes(&self) -> Vec<NodeView> {
        self.running()
            .iter()
            .map(|r| {
                let settings = r.settings.borrow();
                NodeView {
                    slot: r.slot,
                    name: settings.name.clone(),
                    address: settings.address.clone(),
                }
            })
            .collect()
    }

    /// Put `plan` in force. Cannot fail: everything that can was built into the plan.
    pub fn apply(&self, plan: Plan) -> NodeChanges {
        self.dispatcher.tune(plan.backoff, plan.policy);
        self.balancer.tune(plan.health, plan.slack);
        let mut running = self.running();
        let mut before = std::mem::take(&mut *running);
        let mut changes = NodeChanges::default();
        for planned in plan.nodes {
            let kept = before.iter().position(|r| r.link == planned.link);
            let node = match kept {
                Some(position) => self.keep(before.remove(position), planned, &mut changes),
                None => {
                    changes.added.push(planned.settings.name.clone());
                    self.spawn(planned)
                }
            };
            running.push(node);
        }
        for gone in before {
            changes.removed.push(gone.settings.borrow().name.clone());
            self.retire(gone);
        }
        self.restart_heartbeats(&running, plan.socket_mark);
        drop(running);
        self.balancer.reshare();
        changes
    }

    /// A node whose link is unchanged: the same slot, task and connection, new settings.
    fn keep(&self, mut node: Running, planned: PlannedNode, changes: &mut NodeChanges) -> Running {
        let PlannedNode {
            weight,
            standby,
            mut settings,
            ..
        } = planned;
        settings.index = node.slot;
        let what = what_changed(&node, weight, standby, &node.settings.borrow(), &settings);
        if !what.is_empty() {
            changes
                .changed
                .push(format!("{} ({})", settings.name, what.join(", ")));
        }
        self.balancer.update(node.slot, weight, standby);
        node.weight = weight;
        node.standby = standby;
        node.settings.send_replace(Arc::new(settings));
        node
    }

    /// Start a node task in a new slot.
    fn spawn(&self, planned: PlannedNode) -> Running {
        let PlannedNode {
            link,
            weight,
            standby,
            mut settings,
        } = planned;
        let slot = self.balancer.add(settings.name.clone(), weight, standby);
        settings.index = slot;
        let guard = self
            .ctx
            .watchdog
            .guard(format!("upstream node {}", settings.name));
        let (sender, receiver) = watch::channel(Arc::new(settings));
        let stop = self.ctx.shutdown.child_token();
        let retired = CancellationToken::new();
        let control = NodeControl {
            settings: receiver,
            retired: retired.clone(),
        };
        let task = node::run_node(
            control,
            self.dispatcher.clone(),
            self.balancer.clone(),
            stop.clone(),
        );
        let stopping = stop.clone();
        self.ctx.tracker.spawn(async move {
            task.await;
            // Told to stop (shutdown or removal): not a death the watchdog reports.
            if stopping.is_cancelled() {
                guard.disarm();
            }
        });
        Running {
            link,
            slot,
            weight,
            standby,
            settings: sender,
            stop,
            retired,
        }
    }

    /// A node removed by a reload: no record from now on, then drain and go.
    fn retire(&self, node: Running) {
        self.balancer.retire(node.slot);
        // Retired before stopped: the task sees why it stops.
        node.retired.cancel();
        node.stop.cancel();
    }

    /// Heartbeats go to the nodes in force: the task of the list before is stopped.
    fn restart_heartbeats(&self, running: &[Running], socket_mark: Option<u32>) {
        let mut heartbeat = self.heartbeat.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(previous) = heartbeat.take() {
            previous.cancel();
        }
        if running.is_empty() {
            return;
        }
        let nodes: Vec<NodeSettings> = running
            .iter()
            .map(|r| (**r.settings.borrow()).clone())
            .collect();
        let stop = self.ctx.shutdown.child_token();
        self.ctx.tracker.spawn(heartbeat::run_heartbeats(
            nodes,
            socket_mark,
            self.balancer.clone(),
            stop.clone(),
        ));
        *heartbeat = Some(stop);
    }
}

/// What of a kept node a reload changed, by key name (its link is the same).
fn what_changed(
    node: &Running,
    weight: u32,
    standby: bool,
    old: &NodeSettings,
    new: &NodeSettings,
) -> Vec<&'static str> {
    let mut what = Vec::new();
    if node.weight != weight {
        what.push("weight");
    }
    if node.standby != standby {
        what.push("standby");
    }
    if old.compress != new.compress {
        what.push("compress");
    }
    if old.strip_empty_metadata != new.strip_empty_metadata {
        what.push("strip_empty_metadata");
    }
    what
}
