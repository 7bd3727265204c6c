//! The relay of one `ackgate` process: spool, ingress, upstream and the admin listener
//! started together ([`Relay::start`]) and stopped in order ([`Relay::stop`]), and [`run`],
//! which waits for a signal or for a core task's death (invariant 9) in between: SIGHUP
//! reloads the config in place ([`crate::lifecycle::reload`]), SIGTERM/SIGINT stop.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::admin::rates::Rates;
use crate::admin::settings::AdminSettings;
use crate::admin::AdminState;
use crate::config::Config;
use crate::ingress::{self, IngressContext, IngressSettings};
use crate::lifecycle::diff::Bound;
use crate::lifecycle::reload::{Reloader, Targets, Trigger};
use crate::spool::{Spool, SpoolWriter};
use crate::{supervise, upstream};

/// SIGTERM/SIGINT/SIGHUP handlers, installed before anything is announced, so a signal that
/// arrives right after the ready line is a graceful stop or a reload and not the default
/// (fatal) action.
struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
    hup: Option<tokio::signal::unix::Signal>,
}

/// What a signal asks for.
enum Asked {
    Stop,
    Reload,
}

impl Signals {
    /// `reload`: also catch SIGHUP (the relay); tools keep its default action.
    fn install(reload: bool) -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate()).ok();
        let int = signal(SignalKind::interrupt()).ok();
        let hup = reload.then(|| signal(SignalKind::hangup()).ok()).flatten();
        if term.is_none() || int.is_none() {
            warn!("cannot install signal handlers; stop with SIGKILL");
        }
        if reload && hup.is_none() {
            warn!("cannot install the SIGHUP handler; reload with `ackgate reload` or POST /api/reload");
        }
        Signals { term, int, hup }
    }

    /// The next stop or reload signal.
    async fn next(&mut self) -> Asked {
        tokio::select! {
            // The reload logs its own line (trigger="signal").
            _ = recv(&mut self.hup) => Asked::Reload,
            _ = recv(&mut self.term) => {
                info!(signal = "SIGTERM", "shutting down");
                Asked::Stop
            }
            _ = recv(&mut self.int) => {
                info!(signal = "SIGINT", "shutting down");
                Asked::Stop
            }
        }
    }

    /// The next stop signal (SIGHUP is not listened to: tools that only stop).
    async fn wait(&mut self) {
        tokio::select! {
            _ = recv(&mut self.term) => info!(signal = "SIGTERM", "shutting down"),
            _ = recv(&mut self.int) => info!(signal = "SIGINT", "shutting down"),
        }
    }
}

async fn recv(signal: &mut Option<tokio::signal::unix::Signal>) {
    match signal {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending::<()>().await,
    }
}

pub async fn wait_for_signal() {
    Signals::install(false).wait().await
}

/// Start spool, ingress and upstream; on SIGHUP re-read `path` and put it in force in place;
/// on SIGTERM/SIGINT stop accepting, let connections finish their pending commits and acks,
/// give in-flight chunks `shutdown_grace` to be acked, then commit what the spool still holds
/// and exit. If a core component dies first, exit with an error at once (invariant 9): a
/// supervisor restarts ackgate, and the spool keeps everything.
pub async fn run(config: Config, path: PathBuf) -> anyhow::Result<()> {
    let mut signals = Signals::install(true);
    let (watchdog, mut deaths) = supervise::watchdog();
    let relay = Relay::start(config, path, &watchdog).await?;
    let died = relay.writer.died();
    tokio::pin!(died);
    loop {
        tokio::select! {
            asked = signals.next() => match asked {
                Asked::Stop => break,
                // The outcome is logged, counted and shown in /api/status by the reloader.
                Asked::Reload => {
                    let _ = relay.reloader.reload(Trigger::Signal).await;
                }
            },
            reason = &mut died => return Err(core_died(reason)),
            reason = deaths.next() => return Err(core_died(reason)),
        }
    }
    relay.stop().await
}

/// Everything `ackgate run` started, for the orderly stop.
struct Relay {
    spool: Spool,
    writer: SpoolWriter,
    /// Cancelled first: stop accepting, nodes drain their windows.
    shutdown: CancellationToken,
    /// Cancelled last: the admin listener stays up so a drain can be watched.
    admin_stop: CancellationToken,
    accepting: Arc<std::sync::atomic::AtomicBool>,
    accept: tokio::task::JoinHandle<()>,
    heartbeat: Option<tokio::task::JoinHandle<()>>,
    connections: TaskTracker,
    nodes: TaskTracker,
    admin: Option<tokio::task::JoinHandle<()>>,
    /// The settings in force, and SIGHUP's reload.
    reloader: Arc<Reloader>,
}

impl Relay {
    async fn start(
        config: Config,
        path: PathBuf,
        watchdog: &supervise::Watchdog,
    ) -> anyhow::Result<Relay> {
        let spool_config = config.spool.clone();
        let (spool, writer) = tokio::task::spawn_blocking(move || Spool::open(&spool_config))
            .await
            .context("spool open task failed")??;
        let stats = spool.stats();
        info!(path = %config.spool.path.display(), records = stats.records, bytes = stats.bytes,
            max_bytes = stats.max_bytes, "spool opened");
        if let (Some(mark), Some(false)) = (
            config.upstream.socket_mark,
            crate::middlebox::has_net_admin(),
        ) {
            anyhow::bail!("upstream.socket_mark = {mark} needs CAP_NET_ADMIN, which this process does not have (systemd: AmbientCapabilities=CAP_NET_ADMIN)");
        }
        let shutdown = CancellationToken::new();
        let (listener, udp) = ingress::bind(&config.ingress)
            .await
            .with_context(|| format!("cannot listen on {}", config.ingress.listen))?;
        let local = listener.local_addr()?;
        let admin_listener = bind_admin(&config).await?;
        let bound = Bound {
            ingress: local,
            admin: match &admin_listener {
                Some(listener) => Some(listener.local_addr()?),
                None => None,
            },
        };
        let upstream = upstream::start(
            &config.upstream,
            config.spool.max_age.map(|d| d.0),
            spool.clone(),
            shutdown.clone(),
            watchdog,
        )
        .context("cannot set up upstream TLS")?;
        if let Some(router) = &upstream.router {
            router.discover();
        }
        let settings =
            IngressSettings::build(config.ingress.clone(), !config.upstream.nodes.is_empty())
                .context("cannot set up ingress TLS")?;
        let mut ingress_ctx = IngressContext::with_settings(settings, spool.clone());
        ingress_ctx.router = upstream.router.clone();
        let ctx = Arc::new(ingress_ctx);
        let connections = TaskTracker::new();
        let accept = spawn_core(
            watchdog,
            "the accept loop",
            &shutdown,
            ingress::run_tcp(listener, ctx.clone(), shutdown.clone(), connections.clone()),
        );
        let heartbeat = udp.map(|socket| {
            spawn_core(
                watchdog,
                "the UDP heartbeat responder",
                &shutdown,
                ingress::run_udp_heartbeat(socket, spool.clone(), shutdown.clone()),
            )
        });
        let upstream = Arc::new(upstream);
        let admin_settings = config.admin().map(AdminSettings::new);
        let nodes = config.upstream.nodes.len();
        let reloader = Reloader::new(
            path,
            config,
            bound,
            Targets {
                ingress: ctx,
                spool: spool.clone(),
                upstream: upstream.clone(),
                admin: admin_settings.clone(),
            },
        );
        let mut relay = Relay {
            spool,
            writer,
            shutdown,
            admin_stop: CancellationToken::new(),
            accepting: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            accept,
            heartbeat,
            connections,
            nodes: upstream.tracker.clone(),
            admin: None,
            reloader,
        };
        if let (Some(listener), Some(settings)) = (admin_listener, admin_settings) {
            relay.admin = Some(relay.start_admin(listener, settings, &upstream, local));
        }
        info!(listen = %local, nodes, "ackgate ready");
        Ok(relay)
    }

    /// Serve the admin listener (`[admin]`, or the old `[metrics]`).
    fn start_admin(
        &self,
        listener: tokio::net::TcpListener,
        settings: Arc<AdminSettings>,
        upstream: &upstream::Upstream,
        ingress_listen: std::net::SocketAddr,
    ) -> tokio::task::JoinHandle<()> {
        let state = Arc::new(AdminState {
            spool: self.spool.clone(),
            dispatcher: upstream.dispatcher.clone(),
            balancer: upstream.balancer.clone(),
            router: upstream.router.clone(),
            rates: Rates::new(),
            accepting: self.accepting.clone(),
            started: std::time::Instant::now(),
            ingress_listen: ingress_listen.to_string(),
            configured: upstream.configured.clone(),
            settings,
            reloader: self.reloader.clone(),
        });
        let stop = self.admin_stop.clone();
        tokio::spawn(async move { crate::admin::serve(listener, state, stop).await })
    }

    async fn stop(self) -> anyhow::Result<()> {
        let config = self.reloader.config();
        self.accepting
            .store(false, std::sync::atomic::Ordering::Release);
        self.shutdown.cancel();
        let _ = self.accept.await;
        if let Some(heartbeat) = self.heartbeat {
            let _ = heartbeat.await;
        }
        self.connections.close();
        // Connections finish their pending commits and acks. If the spool cannot commit (disk
        // full), stop waiting after shutdown_grace: those requests were never acked, and their
        // senders resend them.
        let grace = config
            .upstream
            .shutdown_grace
            .0
            .max(std::time::Duration::from_secs(5));
        if tokio::time::timeout(grace, self.connections.wait())
            .await
            .is_ok()
        {
            info!("ingress drained: every stored request was acked");
        } else {
            warn!(waited = ?grace, "connections still wait for spool commits; stopping the spool without acking them");
        }
        self.nodes.wait().await;
        let writer = self.writer;
        tokio::task::spawn_blocking(move || writer.shutdown())
            .await
            .context("spool writer did not stop cleanly")?;
        let _ =
            tokio::time::timeout(std::time::Duration::from_secs(2), self.connections.wait()).await;
        self.admin_stop.cancel();
        if let Some(task) = self.admin {
            let _ = task.await;
        }
        let stats = self.spool.stats();
        info!(
            records = stats.records,
            bytes = stats.bytes,
            "stopped; records left in the spool are sent after the next start"
        );
        Ok(())
    }
}

/// Bind the admin listener, when `[admin]` (or the old `[metrics]`) is set.
async fn bind_admin(config: &Config) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    let Some(admin) = config.admin() else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(admin.listen)
        .await
        .with_context(|| format!("cannot listen on admin.listen {}", admin.listen))?;
    info!(listen = %listener.local_addr()?, "admin and metrics listening");
    if config.metrics.is_some() {
        warn!("[metrics] is the old name of [admin]: rename the section");
    }
    Ok(Some(listener))
}

/// Spawn a task that must run until shutdown; if it ends earlier, `deaths` hears of it.
fn spawn_core(
    watchdog: &supervise::Watchdog,
    what: &str,
    shutdown: &CancellationToken,
    task: impl std::future::Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let guard = watchdog.guard(what);
    let stopping = shutdown.clone();
    tokio::spawn(async move {
        task.await;
        if stopping.is_cancelled() {
            guard.disarm();
        }
    })
}

fn core_died(reason: String) -> anyhow::Error {
    tracing::error!(%reason, "a core component died: exiting so that a supervisor restarts ackgate; every spooled record is kept");
    anyhow::anyhow!("{reason}: exiting, every spooled record is kept")
}
