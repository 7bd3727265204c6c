//! The relay of one worker process: spool, ingress, upstream and the admin listener started
//! together ([`Relay::start`]), and [`run`], which serves until a stop, a handover or a core
//! task's death (invariant 9). SIGHUP reloads the config in place
//! ([`crate::lifecycle::reload`]); SIGTERM/SIGINT (or the supervisor gone) stop
//! ([`Relay::stop`]); the supervisor's request for an upgrade hands over ([`Relay::handover`],
//! invariant 10).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::admin::rates::Rates;
use crate::admin::settings::AdminSettings;
use crate::admin::AdminState;
use crate::config::Config;
use crate::ingress::{self, IngressContext, IngressSettings};
use crate::lifecycle::diff::Bound;
use crate::lifecycle::link::{self, Feed, Request};
use crate::lifecycle::reload::{Reloader, Targets, Trigger};
use crate::lifecycle::state::WorkerState;
use crate::lifecycle::{notify, sockets};
use crate::spool::{Spool, SpoolError, SpoolWriter};
use crate::{supervise, upstream};

/// SIGTERM/SIGINT/SIGHUP handlers, installed before anything is announced (the signals are
/// blocked until then: [`crate::lifecycle::signals`]), so a signal that arrives right after
/// the ready line is a graceful stop or a reload and not the default (fatal) action.
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
}

async fn recv(signal: &mut Option<tokio::signal::unix::Signal>) {
    match signal {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending::<()>().await,
    }
}

/// Wait for SIGTERM or SIGINT (the Forward tools' stop).
pub async fn wait_for_signal() {
    let mut signals = Signals::install(false);
    while let Asked::Reload = signals.next().await {}
}

/// How a worker's run ends.
enum Ending {
    Stop,
    Handover,
}

/// The worker: start spool, ingress and upstream (for an upgrade, first prepare and wait to be
/// activated), say READY, and serve until a stop (SIGTERM/SIGINT, or the supervisor gone) or a
/// handover; SIGHUP re-reads `path` and puts it in force in place. A stop reads every
/// connection the supervisor still hands over until it is quiet at a request boundary (or
/// `shutdown_grace` ends), gives in-flight chunks `shutdown_grace`, and commits what the spool
/// holds; a handover parks every connection with nothing owed and leaves them to the next
/// worker. If a core component dies, exit with an error at once (invariant 9): the supervisor
/// starts a new worker, and nothing was released that was not stored.
pub async fn run(
    config: Config,
    path: PathBuf,
    sockets: sockets::Inherited,
    link: link::Link,
    standby: bool,
) -> anyhow::Result<()> {
    let mut signals = Signals::install(true);
    crate::lifecycle::signals::unblock();
    let link::Link {
        connections,
        mut requests,
    } = link;
    if standby {
        prepare(&config)?;
        notify::prepared();
        wait_for_activation(&mut requests, &mut signals).await?;
    }
    let (watchdog, mut deaths) = supervise::watchdog();
    let relay = Relay::start(config, path, &watchdog, sockets, connections).await?;
    notify::ready("relaying");
    let died = relay.writer.died();
    tokio::pin!(died);
    let ending = loop {
        tokio::select! {
            asked = signals.next() => match asked {
                Asked::Stop => break Ending::Stop,
                // The outcome is logged, counted and shown in /api/status by the reloader.
                Asked::Reload => {
                    let _ = relay.reloader.reload(Trigger::Signal).await;
                }
            },
            request = requests.recv() => match request {
                Some(Request::Handover) => break Ending::Handover,
                Some(Request::Notice(text)) => {
                    warn!(notice = %text, "from the supervisor");
                    relay.lifecycle.record_notice(text);
                }
                Some(Request::Gone) | None => {
                    warn!("the supervisor is gone: stopping");
                    break Ending::Stop;
                }
                Some(other) => debug!(request = ?other, "request ignored while serving"),
            },
            reason = &mut died => return Err(core_died(reason)),
            reason = deaths.next() => return Err(core_died(reason)),
        }
    };
    match ending {
        Ending::Stop => relay.stop().await,
        Ending::Handover => relay.handover().await,
    }
}

/// Check, before anything is taken over, what a new worker can check without the spool: the
/// config loaded already; the TLS settings must load too.
fn prepare(config: &Config) -> anyhow::Result<()> {
    IngressSettings::build(
        config.ingress.clone(),
        !config.upstream.nodes.is_empty(),
        config.upstream.shutdown_grace.0,
    )
    .context("ingress TLS")?;
    upstream::check(&config.upstream).context("upstream TLS")?;
    info!("prepared to take over: waiting for the running worker to hand over");
    Ok(())
}

async fn wait_for_activation(
    requests: &mut tokio::sync::mpsc::UnboundedReceiver<Request>,
    signals: &mut Signals,
) -> anyhow::Result<()> {
    loop {
        tokio::select! {
            request = requests.recv() => match request {
                Some(Request::Activate) => return Ok(()),
                Some(Request::Gone) | None => anyhow::bail!("the supervisor went away before the handover"),
                Some(_) => {}
            },
            asked = signals.next() => {
                if let Asked::Stop = asked {
                    anyhow::bail!("stopped before the handover");
                }
            }
        }
    }
}

/// Everything a worker started, for the orderly stop or the handover.
struct Relay {
    spool: Spool,
    writer: SpoolWriter,
    ingress: Arc<IngressContext>,
    /// Stop: connections read on until quiet at a boundary, no more credit for new ones.
    ingress_stop: CancellationToken,
    /// No more connections will come (the supervisor closed its listeners, or a handover).
    closed: CancellationToken,
    /// Nodes drain their windows and stop.
    upstream_stop: CancellationToken,
    /// Cancelled last: the admin listener stays up so a drain can be watched.
    admin_stop: CancellationToken,
    accepting: Arc<std::sync::atomic::AtomicBool>,
    accept: Option<tokio::task::JoinHandle<()>>,
    heartbeat: Option<tokio::task::JoinHandle<()>>,
    connections: TaskTracker,
    nodes: TaskTracker,
    admin: Option<tokio::task::JoinHandle<()>>,
    /// The settings in force, and SIGHUP's reload.
    reloader: Arc<Reloader>,
    /// This worker's lifecycle, as the admin API shows it.
    lifecycle: Arc<WorkerState>,
}

/// How long a stop waits for the supervisor to say its accept queue is empty.
const DRAIN_WAIT: Duration = Duration::from_secs(10);
/// How long a new worker waits for the spool that the previous one still holds.
const SPOOL_IN_USE_WAIT: Duration = Duration::from_secs(30);
/// How long a handover waits for connections to park (each one waits for its commits and
/// writes its acks, with a deadline of its own).
const PARK_WAIT: Duration = Duration::from_secs(30);

impl Relay {
    async fn start(
        config: Config,
        path: PathBuf,
        watchdog: &supervise::Watchdog,
        sockets: sockets::Inherited,
        connections_in: tokio::sync::mpsc::UnboundedReceiver<Feed>,
    ) -> anyhow::Result<Relay> {
        if let (Some(mark), Some(false)) = (
            config.upstream.socket_mark,
            crate::middlebox::has_net_admin(),
        ) {
            anyhow::bail!("upstream.socket_mark = {mark} needs CAP_NET_ADMIN, which this process does not have (systemd: AmbientCapabilities=CAP_NET_ADMIN)");
        }
        let supervisor_pid = sockets.supervisor_pid;
        let (spool, writer) = open_spool(&config).await?;
        let ingress_sockets = sockets::ingress(&config.ingress, sockets.tcp, sockets.udp).await?;
        let local = ingress_sockets.local;
        let admin_listener = sockets::admin(&config, sockets.admin).await?;
        let bound = Bound {
            ingress: local,
            admin: match &admin_listener {
                Some(listener) => Some(listener.local_addr()?),
                None => None,
            },
        };
        let ingress_stop = CancellationToken::new();
        let closed = CancellationToken::new();
        let upstream_stop = CancellationToken::new();
        let upstream = upstream::start(
            &config.upstream,
            config.spool.max_age.map(|d| d.0),
            spool.clone(),
            upstream_stop.clone(),
            watchdog,
        )
        .context("cannot set up upstream TLS")?;
        if let Some(router) = &upstream.router {
            router.discover();
        }
        let settings = IngressSettings::build(
            config.ingress.clone(),
            !config.upstream.nodes.is_empty(),
            config.upstream.shutdown_grace.0,
        )
        .context("cannot set up ingress TLS")?;
        let mut ingress_ctx = IngressContext::with_settings(settings, spool.clone());
        ingress_ctx.router = upstream.router.clone();
        ingress_ctx.peek = crate::ingress::peek_supported();
        let staged_spool = spool.clone();
        if let Ok(Ok(staged)) =
            tokio::task::spawn_blocking(move || staged_spool.staged_connections()).await
        {
            ingress_ctx.staged = std::sync::Mutex::new(staged.into_iter().collect());
        }
        let ctx = Arc::new(ingress_ctx);
        let connections = TaskTracker::new();
        let accept = spawn_core(
            watchdog,
            "the connection feed",
            &closed,
            ingress::run_handed(
                connections_in,
                ctx.clone(),
                ingress_stop.clone(),
                closed.clone(),
                connections.clone(),
            ),
        );
        let heartbeat = ingress_sockets.udp.map(|socket| {
            spawn_core(
                watchdog,
                "the UDP heartbeat responder",
                &closed,
                ingress::run_udp_heartbeat(socket, spool.clone(), closed.clone()),
            )
        });
        let upstream = Arc::new(upstream);
        let admin_settings = config.admin().map(AdminSettings::new);
        let nodes = config.upstream.nodes.len();
        if config.metrics.is_some() {
            warn!("[metrics] is the old name of [admin]: rename the section");
        }
        let reloader = Reloader::new(
            path,
            config,
            bound,
            Targets {
                ingress: ctx.clone(),
                spool: spool.clone(),
                upstream: upstream.clone(),
                admin: admin_settings.clone(),
            },
        );
        let peek = ctx.peek;
        let mut relay = Relay {
            spool,
            writer,
            ingress: ctx,
            ingress_stop,
            closed,
            upstream_stop,
            admin_stop: CancellationToken::new(),
            accepting: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            accept: Some(accept),
            heartbeat,
            connections,
            nodes: upstream.tracker.clone(),
            admin: None,
            reloader,
            lifecycle: Arc::new(WorkerState::new(supervisor_pid, peek)),
        };
        if let (Some(listener), Some(settings)) = (admin_listener, admin_settings) {
            info!(listen = %listener.local_addr()?, "admin and metrics listening");
            relay.admin = Some(relay.start_admin(listener, settings, &upstream, local));
        }
        if !peek {
            warn!("this kernel cannot peek TCP at an offset (SO_PEEK_OFF, Linux 6.10+): a crash of the worker loses what it had read and not yet committed; reloads, upgrades and stops lose nothing");
        }
        info!(listen = %local, nodes, crash_safe_reading = peek, "ackgate ready");
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
            lifecycle: self.lifecycle.clone(),
        });
        let stop = self.admin_stop.clone();
        tokio::spawn(async move { crate::admin::serve(listener, state, stop).await })
    }

    /// A stop: no more credit for new connections, every connection reads on until quiet at a
    /// request boundary; connections the supervisor still hands over (its accept queue) are
    /// served the same way until it says it is drained (or it is gone).
    async fn stop(mut self) -> anyhow::Result<()> {
        notify::stopping();
        let config = self.reloader.config();
        self.accepting
            .store(false, std::sync::atomic::Ordering::Release);
        self.ingress_stop.cancel();
        self.upstream_stop.cancel();
        if let Some(accept) = self.accept.as_mut() {
            if tokio::time::timeout(DRAIN_WAIT, accept).await.is_err() {
                warn!(waited = ?DRAIN_WAIT, "the supervisor did not say its accept queue was drained; stopping anyway");
            }
            self.accept = None;
        }
        self.close_ingress().await;
        self.connections.close();
        // Connections read until quiet, then finish their pending commits and acks. If the
        // spool cannot commit (disk full), stop waiting: those requests were never acked nor
        // released, and their senders resend them.
        let grace = config.upstream.shutdown_grace.0 + Duration::from_secs(5);
        if tokio::time::timeout(grace, self.connections.wait())
            .await
            .is_ok()
        {
            info!("ingress drained: every stored request was acked");
        } else {
            warn!(waited = ?grace, "connections still wait for spool commits; stopping the spool without acking them");
        }
        self.finish().await
    }

    /// A handover to a new worker (an upgrade): nothing new is taken, every held connection
    /// parks once nothing is owed on it and goes back to the supervisor with its state, TLS
    /// connections finish their request and close, nodes drain their windows, and the spool is
    /// closed for the new worker to open.
    async fn handover(mut self) -> anyhow::Result<()> {
        info!("handing over to the new worker");
        notify::status("handing over");
        let config = self.reloader.config();
        self.accepting
            .store(false, std::sync::atomic::Ordering::Release);
        self.close_ingress().await;
        self.ingress.park.cancel();
        self.upstream_stop.cancel();
        self.connections.close();
        let wait = PARK_WAIT.max(config.upstream.shutdown_grace.0);
        if tokio::time::timeout(wait, self.connections.wait())
            .await
            .is_err()
        {
            warn!(waited = ?wait, "some connections did not park in time: they go to the new worker as they are (nothing unstored was released)");
        }
        self.finish().await
    }

    /// No more connections or heartbeats are taken.
    async fn close_ingress(&mut self) {
        self.closed.cancel();
        if let Some(accept) = self.accept.take() {
            let _ = accept.await;
        }
        if let Some(heartbeat) = self.heartbeat.take() {
            let _ = heartbeat.await;
        }
    }

    /// What a stop and a handover end with: nodes drained, the spool committed and closed.
    async fn finish(self) -> anyhow::Result<()> {
        self.nodes.wait().await;
        let writer = self.writer;
        tokio::task::spawn_blocking(move || writer.shutdown())
            .await
            .context("spool writer did not stop cleanly")?;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.connections.wait()).await;
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

/// Open the spool; while another process still holds it (a worker that was killed or handed
/// over releases it as it exits), wait for it, bounded.
async fn open_spool(config: &Config) -> anyhow::Result<(Spool, SpoolWriter)> {
    let deadline = tokio::time::Instant::now() + SPOOL_IN_USE_WAIT;
    let mut told = false;
    loop {
        let spool_config = config.spool.clone();
        let opened = tokio::task::spawn_blocking(move || Spool::open(&spool_config))
            .await
            .context("spool open task failed")?;
        match opened {
            Ok((spool, writer)) => {
                let stats = spool.stats();
                info!(path = %config.spool.path.display(), records = stats.records, bytes = stats.bytes,
                    max_bytes = stats.max_bytes, "spool opened");
                return Ok((spool, writer));
            }
            Err(SpoolError::InUse { .. }) if tokio::time::Instant::now() < deadline => {
                if !told {
                    info!(path = %config.spool.path.display(), "the spool is still held by the previous worker; waiting for it");
                    told = true;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
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
