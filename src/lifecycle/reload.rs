//! Reload in place: SIGHUP, `ackgate reload` and `POST /api/reload` re-read the config file
//! the relay was started with and put what changed in force without dropping a sender
//! connection or a record (invariant 10).
//!
//! [`Reloader`] is the one owner of the settings in force: it holds the config that runs, and
//! it alone hands each component its new settings, through the one place each component keeps
//! them (ingress: [`IngressContext::apply`]; spool bounds: [`Spool::set_limits`]; nodes,
//! retry and health settings: [`Upstream::apply`]; `[admin]`: [`AdminSettings::apply`];
//! `log.level`: [`crate::logging`]). No component keeps a copy of a reloadable value of its
//! own.
//!
//! A reload is all or nothing, in three steps:
//! 1. read and validate the file ([`Config::load`]): an invalid file changes nothing;
//! 2. refuse a change only a restart can make ([`diff::restart_required`]), naming the key;
//! 3. build everything that can fail (TLS files are read again even when their paths did not
//!    change: that is how certificates are rotated; node settings; the log filter);
//!
//! and only then put it all in force, which cannot fail. One reload runs at a time. The
//! service manager hears RELOADING at the start and READY at the end, whatever the outcome:
//! after a refused reload the config before it still runs.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tracing::{info, warn};

use super::{diff, notify};
use crate::admin::settings::AdminSettings;
use crate::admin::status::ReloadStatus;
use crate::config::{Config, ConfigError};
use crate::ingress::{IngressContext, IngressSettings};
use crate::spool::{Spool, SpoolLimits};
use crate::upstream::{NodeChanges, Upstream, UpstreamPlan};

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// SIGHUP.
    Signal,
    /// `POST /api/reload` (`ackgate reload`).
    Api,
}

impl Trigger {
    fn name(self) -> &'static str {
        match self {
            Trigger::Signal => "signal",
            Trigger::Api => "api",
        }
    }
}

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file cannot be read, parsed or validated.
    #[error("{0}; nothing was changed")]
    Invalid(ConfigError),
    /// A key that only a restart can change.
    #[error("{path}: key `{key}` needs a restart: {reason}; nothing was changed")]
    RestartRequired {
        path: PathBuf,
        key: String,
        reason: &'static str,
    },
    /// Something the file names cannot be built (a certificate, a capability).
    #[error("{path}: key `{key}`: {problem}; nothing was changed")]
    Build {
        path: PathBuf,
        key: String,
        problem: String,
    },
}

impl ReloadError {
    /// The key at fault, when one is.
    pub fn key(&self) -> Option<String> {
        match self {
            ReloadError::Invalid(ConfigError::Invalid { key, .. }) => Some(key.clone()),
            ReloadError::Invalid(_) => None,
            ReloadError::RestartRequired { key, .. } | ReloadError::Build { key, .. } => {
                Some(key.clone())
            }
        }
    }

    pub fn needs_restart(&self) -> bool {
        matches!(self, ReloadError::RestartRequired { .. })
    }

    /// The `result` label of `ackgate_reloads_total`.
    fn result(&self) -> &'static str {
        if self.needs_restart() {
            "restart_required"
        } else {
            "invalid"
        }
    }
}

/// What a reload changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Keys, and `upstream.nodes` changes by node name; empty if nothing changed.
    pub changed: Vec<String>,
}

/// The components a reload reaches.
pub struct Targets {
    pub ingress: Arc<IngressContext>,
    pub spool: Spool,
    pub upstream: Arc<Upstream>,
    /// `[admin]`, when the relay has an admin listener.
    pub admin: Option<Arc<AdminSettings>>,
}

/// A reload built whole, ready to be put in force.
struct Prepared {
    config: Config,
    ingress: IngressSettings,
    upstream: UpstreamPlan,
    /// A new `log.level`'s filter, when it changed.
    log: Option<tracing_subscriber::EnvFilter>,
    changed: Vec<String>,
}

/// The owner of the settings in force.
pub struct Reloader {
    path: PathBuf,
    /// Where the listeners are bound (a file naming those ports changes no listener).
    bound: diff::Bound,
    current: Mutex<Arc<Config>>,
    targets: Targets,
    /// One reload at a time.
    running: tokio::sync::Mutex<()>,
    last: Mutex<Option<ReloadStatus>>,
}

impl Reloader {
    /// `config` was read from `path` and is in force in `targets`, its listeners bound to
    /// `bound`.
    pub fn new(
        path: PathBuf,
        config: Config,
        bound: diff::Bound,
        targets: Targets,
    ) -> Arc<Reloader> {
        Arc::new(Reloader {
            path,
            bound,
            current: Mutex::new(Arc::new(config)),
            targets,
            running: tokio::sync::Mutex::new(()),
            last: Mutex::new(None),
        })
    }

    /// The file a reload reads.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The config in force.
    pub fn config(&self) -> Arc<Config> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The last reload's outcome, if there was one.
    pub fn last(&self) -> Option<ReloadStatus> {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Re-read the file and put it in force, or change nothing and say why.
    pub async fn reload(&self, trigger: Trigger) -> Result<Applied, ReloadError> {
        let _one_at_a_time = self.running.lock().await;
        notify::reloading();
        let old = self.config();
        let outcome = self
            .prepare(&old)
            .map(|prepared| self.apply(prepared, trigger));
        self.record(trigger, &outcome);
        outcome
    }

    /// Steps 1–3: everything that can fail, nothing changed.
    fn prepare(&self, old: &Config) -> Result<Prepared, ReloadError> {
        let config = Config::load(&self.path).map_err(ReloadError::Invalid)?;
        if let Some(restart) = diff::restart_required(old, &config, &self.bound) {
            return Err(ReloadError::RestartRequired {
                path: self.path.clone(),
                key: restart.key,
                reason: restart.reason,
            });
        }
        let build = |key: &str, problem: String| ReloadError::Build {
            path: self.path.clone(),
            key: key.to_string(),
            problem,
        };
        let ingress = IngressSettings::build(
            config.ingress.clone(),
            !config.upstream.nodes.is_empty(),
            config.upstream.shutdown_grace.0,
        )
        .map_err(|e| build("ingress.tls", e.to_string()))?;
        if let (Some(mark), Some(false)) = (
            config.upstream.socket_mark,
            crate::middlebox::has_net_admin(),
        ) {
            return Err(build(
                "upstream.socket_mark",
                format!("{mark} needs CAP_NET_ADMIN, which this process does not have"),
            ));
        }
        let upstream = self
            .targets
            .upstream
            .prepare(&config.upstream, config.spool.max_age.map(|d| d.0))
            .map_err(|e| build(&e.key, e.source.to_string()))?;
        let log = match old.log.level != config.log.level {
            true => {
                Some(crate::logging::filter(&config.log.level).map_err(|e| build("log.level", e))?)
            }
            false => None,
        };
        let changed = diff::changed_keys(old, &config);
        Ok(Prepared {
            config,
            ingress,
            upstream,
            log,
            changed,
        })
    }

    /// Put a prepared reload in force: cannot fail.
    fn apply(&self, prepared: Prepared, trigger: Trigger) -> Applied {
        let Prepared {
            config,
            ingress,
            upstream,
            log,
            mut changed,
        } = prepared;
        let targets = &self.targets;
        targets.ingress.apply(ingress);
        targets.spool.set_limits(SpoolLimits::of(&config.spool));
        let nodes = targets.upstream.apply(upstream);
        if let (Some(admin), Some(new)) = (&targets.admin, config.admin()) {
            admin.apply(new);
        }
        changed.extend(describe(&nodes));
        let tls = config.ingress.tls.is_some() || config.upstream.nodes.iter().any(|n| n.tls);
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
        // Logged before a new log.level takes over: the line is judged by the level that was
        // in force when the reload was asked for.
        info!(trigger = trigger.name(), changed = ?changed, certificates_reread = tls, "config reloaded");
        if let Some(filter) = log {
            if crate::logging::apply(filter) == crate::logging::LevelApplied::OverriddenByEnv {
                warn!("log.level changed, but RUST_LOG was set at start and still decides");
            }
        }
        Applied { changed }
    }

    /// The outcome, for `/api/status`, the metric, the log and the service manager.
    fn record(&self, trigger: Trigger, outcome: &Result<Applied, ReloadError>) {
        let m = crate::metrics::metrics();
        let (status, summary) = match outcome {
            Ok(applied) => {
                m.reloads
                    .get_or_create(&crate::metrics::label("result", "ok"))
                    .inc();
                let summary = format!("reloaded: {} change(s)", applied.changed.len());
                (
                    self.status(trigger, true, applied.changed.clone(), None),
                    summary,
                )
            }
            Err(e) => {
                m.reloads
                    .get_or_create(&crate::metrics::label("result", e.result()))
                    .inc();
                warn!(trigger = trigger.name(), key = e.key().unwrap_or_default(), error = %e,
                    "config reload refused; the running config is unchanged");
                let summary = format!("reload refused: {}", e.key().unwrap_or_default());
                (
                    self.status(trigger, false, Vec::new(), Some(e.to_string())),
                    summary,
                )
            }
        };
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(status);
        notify::ready(&summary);
    }

    fn status(
        &self,
        trigger: Trigger,
        ok: bool,
        changed: Vec<String>,
        error: Option<String>,
    ) -> ReloadStatus {
        ReloadStatus {
            at_ms: crate::clock::now_ms(),
            trigger: trigger.name().to_string(),
            ok,
            changed,
            error,
        }
    }
}

/// Node changes as entries of the changed list: `upstream.nodes: added agg-3`.
fn describe(nodes: &NodeChanges) -> Vec<String> {
    let entries = [
        ("added", &nodes.added),
        ("removed", &nodes.removed),
        ("changed", &nodes.changed),
    ];
    entries
        .iter()
        .flat_map(|(what, names)| {
            names
                .iter()
                .map(move |name| format!("upstream.nodes: {what} {name}"))
        })
        .collect()
}

#[cfg(test)]
mod tests;
