//! `ackgate run`: the supervisor (invariant 10). It holds what must outlive the process that
//! reads sender sockets, and nothing else runs in it: no config, no Forward parsing, no spool.
//!
//! - It holds the listening sockets and every plain-TCP sender connection ([`held`]). It
//!   accepts connections itself, as many as the worker gave credit for, holds each one and
//!   hands it to the worker: a connection is never only in the worker's hands, so a worker
//!   that dies (kill -9, a panic, the OOM killer) at any instant leaves every byte it had not
//!   committed in a socket the supervisor still holds.
//! - It starts the worker (`ackgate worker`) as systemd starts a service ([`worker`]):
//!   `LISTEN_FDS`/`LISTEN_FDNAMES` in, `NOTIFY_SOCKET` out (READY, RELOADING, STOPPING,
//!   FDSTORE), and restarts it when it dies, with backoff if it keeps dying.
//! - SIGHUP goes to the worker (reload in place). SIGUSR2, or the worker asking, upgrades
//!   ([`upgrade`]): a new worker from the executable now at the path ackgate was started from
//!   prepares, the old one parks its connections and exits, the new one takes the spool and
//!   the connections, and the supervisor re-executes itself from that path (same pid).
//! - SIGTERM/SIGINT stops ([`drain`]): new handshakes are dropped, everything the kernel had
//!   accepted still reaches the worker, then the listeners close and the worker drains.
//! - Under systemd it is the main process: it gets the socket unit's listeners, and says
//!   READY/RELOADING/STOPPING to systemd for the service as a whole. As a container's PID 1 it
//!   reaps every orphan.
//!
//! It is single-threaded (a current-thread runtime that never uses the blocking pool): the
//! worker is started with fork and exec, and its `LISTEN_PID` is set between the two.

mod drain;
mod held;
mod inherit;
mod upgrade;
mod worker;

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::task::Poll;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

use super::names::{self, ConnId, ConnState};
use super::protocol::{Control, Notification};
use super::socket;
use held::{Holdings, Listener};
use upgrade::{Step, Upgrade};
use worker::{Start, Worker};

/// The supervisor's pid, for the worker to check that it is still its parent.
pub const SUPERVISOR_PID: &str = "ACKGATE_SUPERVISOR_PID";
/// The executable to upgrade from: the path `ackgate run` was started from.
const EXE_VARIABLE: &str = "ACKGATE_EXE";
/// The supervisor's own variables, never passed to a worker.
const OWN_VARIABLES: [&str; 3] = [
    EXE_VARIABLE,
    inherit::FDS_VARIABLE,
    inherit::WORKER_VARIABLE,
];

/// How long a stop waits at most for half-open handshakes before it closes the listeners.
const DRAIN_AT_MOST: Duration = Duration::from_secs(5);
/// How often a stop looks at the accept queue and half-open handshakes.
const DRAIN_CHECK: Duration = Duration::from_millis(20);
/// A worker alive this long after it was ready is not "dying again" when it dies.
const STABLE_AFTER: Duration = Duration::from_secs(60);
/// Longest wait before a worker that keeps dying is started again.
const RESTART_AT_MOST: Duration = Duration::from_secs(30);
/// Accept failures (EMFILE) pause accepting for this long.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// Run the supervisor; `args` are `ackgate run`'s own (`--config FILE`), passed to every
/// worker. Must be called before any thread exists.
pub fn run(args: Vec<OsString>) -> ExitCode {
    super::signals::block();
    raise_file_limit();
    let systemd = std::env::var_os("NOTIFY_SOCKET");
    let exe = std::env::var_os(EXE_VARIABLE)
        .map(PathBuf::from)
        .or_else(started_from);
    let inherited = match inherit::take() {
        Ok(inherited) => inherited,
        Err(e) => {
            error!(error = %e, "cannot read the descriptors this process was started with");
            return ExitCode::FAILURE;
        }
    };
    // Only this process speaks to systemd; a worker gets the supervisor's socket instead.
    std::env::remove_var("NOTIFY_SOCKET");
    let Some(exe) = exe else {
        error!("cannot tell which executable this is (/proc/self/exe): upgrades would not know what to start");
        return ExitCode::FAILURE;
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            error!(error = %e, "cannot start the supervisor's runtime");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match Supervisor::new(exe, args, inherited, systemd) {
            Ok(supervisor) => supervisor.serve().await,
            Err(e) => {
                error!(error = %e, "cannot start the supervisor");
                ExitCode::FAILURE
            }
        }
    })
}

/// Where the supervisor is in the service's life.
enum Phase {
    /// The first worker is not ready yet.
    Starting,
    Running,
    /// The worker died; a new one starts at this instant.
    Restarting(Instant),
    Upgrading(Upgrade),
    Stopping(Stop),
}

struct Stop {
    signal: &'static str,
    /// Listeners of ours (not a socket unit's) are still open, dropping new handshakes.
    draining: bool,
    clean_checks: u32,
    until: Instant,
    next_check: Instant,
}

/// One thing that woke the supervisor.
enum Event {
    Notification,
    Children,
    Stop(&'static str),
    Reload,
    Upgrade,
    Accepted(io::Result<tokio::net::TcpStream>),
    HungUp,
    Flush,
    Tick,
}

struct Supervisor {
    exe: PathBuf,
    args: Vec<OsString>,
    held: Holdings,
    /// Async accept on the TCP listeners (copies of those in `held`).
    acceptors: Vec<tokio::net::TcpListener>,
    accept_paused_until: Option<Instant>,
    notify: AsyncFd<OwnedFd>,
    notify_address: String,
    systemd: Option<SystemdNotifier>,
    worker: Option<Worker>,
    phase: Phase,
    /// Deaths of workers that did not live [`STABLE_AFTER`] in a row.
    quick_deaths: u32,
    ready_once: bool,
    /// Told to the next worker started (an upgrade that failed after the handover).
    pending_notice: Option<String>,
    /// Keep what is held in systemd's fd store too.
    fd_store: bool,
}

impl Supervisor {
    fn new(
        exe: PathBuf,
        args: Vec<OsString>,
        inherited: inherit::Inherited,
        systemd: Option<OsString>,
    ) -> io::Result<Supervisor> {
        let (notify_fd, notify_address) = match inherited.notify {
            Some(fd) => {
                let address = socket::bound_abstract_name(fd.as_fd())?;
                (fd, address)
            }
            None => socket::notify_socket()?,
        };
        let mut supervisor = Supervisor {
            exe,
            args,
            held: Holdings::new()?,
            acceptors: Vec::new(),
            accept_paused_until: None,
            notify: socket::reactor(notify_fd, Interest::READABLE)?,
            notify_address,
            systemd: systemd.and_then(|address| SystemdNotifier::new(&address)),
            worker: None,
            phase: Phase::Starting,
            quick_deaths: 0,
            ready_once: false,
            pending_notice: None,
            fd_store: std::env::var("FDSTORE")
                .ok()
                .and_then(|max| max.parse::<u32>().ok())
                .is_some_and(|max| max > 0),
        };
        for listener in inherited.listeners {
            // A listener kept by systemd may carry the filter of a stop that came before.
            drain::accept_handshakes(listener.fd.as_fd());
            supervisor.hold_listener(listener)?;
        }
        let adopted = inherited.connections.len();
        for (name, fd) in inherited.connections {
            if let Some(id) = names::conn_id(&name) {
                supervisor.held.hold(id, name, fd)?;
            }
        }
        match (inherited.worker, inherited.control) {
            (Some((pid, granted, sent)), Some(control)) => {
                // Re-executed for an upgrade: the new worker serves already.
                supervisor.worker =
                    Some(Worker::adopt(Pid::from_raw(pid), control, granted, sent)?);
                supervisor.phase = Phase::Running;
                supervisor.ready_once = true;
            }
            _ => {
                if adopted > 0 {
                    info!(
                        connections = adopted,
                        "kept sender connections from before this start"
                    );
                }
            }
        }
        Ok(supervisor)
    }

    fn hold_listener(&mut self, listener: Listener) -> io::Result<()> {
        if listener.name == names::LISTEN_TCP {
            let copy = std::net::TcpListener::from(listener.fd.try_clone()?);
            copy.set_nonblocking(true)?;
            self.acceptors
                .push(tokio::net::TcpListener::from_std(copy)?);
        }
        self.held.hold_listener(listener);
        Ok(())
    }

    /// Start a worker from this process's own executable (the version the supervisor runs),
    /// and hand it every held connection.
    fn start_worker(&mut self, after_failure: bool) -> io::Result<()> {
        let exe = PathBuf::from("/proc/self/exe");
        let worker = Worker::spawn(Start {
            exe: &exe,
            args: &self.args,
            standby: false,
            listeners: &self.held.listeners,
            notify_socket: &self.notify_address,
        })?;
        info!(
            worker = worker.pid.as_raw(),
            restart = after_failure,
            "worker started"
        );
        self.worker = Some(worker);
        self.hand_over_held();
        if let Some(text) = self.pending_notice.take() {
            self.notice(text);
        }
        Ok(())
    }

    /// Queue every held connection, then how many, for the current worker.
    fn hand_over_held(&mut self) {
        let ids = self.held.connection_ids();
        if let Some(worker) = self.worker.as_mut() {
            for id in &ids {
                worker.send_connection(*id, false);
            }
            worker.send(Control::Adopted(ids.len() as u64));
        }
        self.flush();
    }

    async fn serve(mut self) -> ExitCode {
        // Before the first worker starts: a SIGCHLD that came earlier would be lost.
        let mut signals = match Signals::install() {
            Ok(signals) => signals,
            Err(e) => {
                error!(error = %e, "cannot install the supervisor's signal handlers");
                return ExitCode::FAILURE;
            }
        };
        super::signals::unblock();
        if self.worker.is_none() {
            if let Err(e) = self.start_worker(false) {
                error!(error = %e, "cannot start the worker");
                return ExitCode::FAILURE;
            }
        } else {
            // Re-executed for an upgrade: the new worker serves already.
            info!(exe = %self.exe.display(), "upgrade complete: the supervisor runs the new executable too");
            self.tell_systemd("READY=1\nSTATUS=upgraded\n");
        }
        loop {
            let event = self.next_event(&mut signals).await;
            if let Some(code) = self.handle(event) {
                return code;
            }
        }
    }

    async fn next_event(&self, signals: &mut Signals) -> Event {
        let accepting = self.accepting();
        let flushing = self.worker.as_ref().is_some_and(Worker::has_outbox);
        let deadline = self.deadline();
        tokio::select! {
            _ = readable(&self.notify) => Event::Notification,
            _ = signals.child.recv() => Event::Children,
            _ = signals.term.recv() => Event::Stop("SIGTERM"),
            _ = signals.int.recv() => Event::Stop("SIGINT"),
            _ = signals.hup.recv() => Event::Reload,
            _ = signals.usr2.recv() => Event::Upgrade,
            accepted = accept_any(&self.acceptors), if accepting => Event::Accepted(accepted),
            _ = self.held.hung_up() => Event::HungUp,
            _ = writable(self.worker.as_ref()), if flushing => Event::Flush,
            _ = sleep_until(deadline), if deadline.is_some() => Event::Tick,
        }
    }

    /// Handle one event; `Some(code)` ends the supervisor.
    fn handle(&mut self, event: Event) -> Option<ExitCode> {
        match event {
            Event::Notification => self.read_notifications(),
            Event::Children => return self.reap(),
            Event::Stop(signal) => return self.begin_stop(signal),
            Event::Reload => self.forward_reload(),
            Event::Upgrade => self.begin_upgrade("SIGUSR2"),
            Event::Accepted(accepted) => self.accepted(accepted),
            Event::HungUp => {
                self.held.release_hung_up();
            }
            Event::Flush => self.flush(),
            Event::Tick => return self.tick(),
        }
        None
    }

    /// Whether to accept now: the worker gave credit, or a stop drains the queue.
    fn accepting(&self) -> bool {
        if self.acceptors.is_empty()
            || self
                .accept_paused_until
                .is_some_and(|until| Instant::now() < until)
        {
            return false;
        }
        match &self.phase {
            Phase::Running => self.worker.as_ref().is_some_and(|w| w.credit() > 0),
            Phase::Stopping(stop) => stop.draining && self.worker.is_some(),
            _ => false,
        }
    }

    fn accepted(&mut self, accepted: io::Result<tokio::net::TcpStream>) {
        let stream = match accepted {
            Ok(stream) => stream,
            Err(e) => {
                warn!(error = %e, pause = ?ACCEPT_PAUSE, "accept failed");
                self.accept_paused_until = Some(Instant::now() + ACCEPT_PAUSE);
                return;
            }
        };
        let fd: OwnedFd = match stream.into_std() {
            Ok(stream) => stream.into(),
            Err(e) => {
                warn!(error = %e, "cannot take an accepted connection out of the runtime");
                return;
            }
        };
        let id = ConnId::random();
        let name = ConnState::new(id).name();
        if let Some(systemd) = self.systemd_store() {
            systemd.store(&name, fd.as_fd());
        }
        if let Err(e) = self.held.hold(id, name, fd) {
            warn!(error = %e, "cannot watch an accepted connection; closing it");
            return;
        }
        if let Some(worker) = self.worker.as_mut() {
            worker.send_connection(id, true);
        }
        self.flush();
    }

    fn flush(&mut self) {
        if let Some(worker) = self.worker.as_mut() {
            if let Err(e) = worker.flush(&self.held) {
                // The worker is gone: its exit is handled when it is reaped; the connections
                // stay held for the next one.
                warn!(worker = worker.pid.as_raw(), error = %e, "cannot reach the worker");
            }
        }
        self.maybe_reexec();
    }

    fn read_notifications(&mut self) {
        loop {
            let packet = self.notify.try_io(Interest::READABLE, |fd| {
                // Any error ends this round as "nothing more" (so the readiness is cleared
                // and the loop does not spin on it); it is logged.
                socket::receive(fd.as_fd()).map_err(|e| {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        warn!(error = %e, "cannot read a notification");
                    }
                    io::Error::from(io::ErrorKind::WouldBlock)
                })
            });
            match packet {
                Ok(packet) => self.on_notification(packet),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    warn!(error = %e, "cannot read a notification");
                    return;
                }
            }
        }
    }

    fn on_notification(&mut self, packet: socket::Packet) {
        let from_worker = self
            .worker
            .as_ref()
            .is_some_and(|w| Some(w.pid.as_raw()) == packet.pid);
        let from_standby = match &self.phase {
            Phase::Upgrading(upgrade) => upgrade.is_standby(packet.pid),
            _ => false,
        };
        if !from_worker && !from_standby {
            tracing::debug!(pid = ?packet.pid, "ignoring a notification from a process that is not a worker");
            return;
        }
        let note = Notification::parse(&packet.bytes);
        if note.fdstore {
            self.store(&note, packet.fds);
        } else if note.fdstore_remove {
            self.unstore(&note);
        }
        if from_standby {
            if let Phase::Upgrading(upgrade) = &mut self.phase {
                if let Some(status) = &note.status {
                    upgrade.status = Some(status.clone());
                }
                if note.prepared && upgrade.step == Step::Preparing {
                    upgrade.prepared();
                    if let Some(worker) = self.worker.as_mut() {
                        worker.freeze_credit();
                        worker.send(Control::Handover);
                    }
                    self.flush();
                }
            }
            return;
        }
        if let Some(granted) = note.accept {
            if let Some(worker) = self.worker.as_mut() {
                worker.granted = worker.granted.max(granted);
            }
        }
        if note.reloading {
            let now = note
                .monotonic_usec
                .map(|usec| format!("MONOTONIC_USEC={usec}\n"))
                .unwrap_or_default();
            self.tell_systemd(&format!("RELOADING=1\n{now}"));
        }
        if let Some(status) = &note.status {
            self.tell_systemd(&format!("STATUS={status}\n"));
        }
        if note.ready {
            self.worker_ready();
        }
        if note.upgrade {
            self.begin_upgrade("the admin API");
        }
    }

    /// `FDSTORE=1`: a listener the worker bound, or a connection's new state.
    fn store(&mut self, note: &Notification, fds: Vec<OwnedFd>) {
        let name = note.fdname.clone().unwrap_or_else(|| "stored".to_string());
        for fd in fds {
            if let Some(systemd) = self.systemd_store() {
                systemd.store(&name, fd.as_fd());
            }
            let result = match names::conn_id(&name) {
                Some(id) => self.held.hold(id, name.clone(), fd).map(|renamed| {
                    if let (Some(old), Some(systemd)) = (renamed, self.systemd_store()) {
                        systemd.unstore(&old);
                    }
                }),
                None => match held::classify(fd.as_fd(), &name) {
                    Some(kind) => self.hold_listener(Listener {
                        name: kind,
                        fd,
                        activated: false,
                    }),
                    None => Ok(()),
                },
            };
            if let Err(e) = result {
                warn!(%name, error = %e, "cannot keep a stored descriptor");
            }
        }
    }

    /// `FDSTOREREMOVE=1`: a connection the worker cannot hand on (TLS), or a replaced
    /// listener.
    fn unstore(&mut self, note: &Notification) {
        let Some(name) = &note.fdname else { return };
        if let Some(systemd) = self.systemd_store() {
            systemd.unstore(name);
        }
        match names::conn_id(name) {
            Some(id) => {
                self.held.release(id);
            }
            None => {
                if self.held.release_listener(name) && name == names::LISTEN_TCP {
                    self.acceptors.clear();
                }
            }
        }
    }

    fn worker_ready(&mut self) {
        let Some(worker) = self.worker.as_mut() else {
            return;
        };
        let first = !worker.ready;
        worker.ready = true;
        match &mut self.phase {
            Phase::Starting => {
                self.phase = Phase::Running;
                self.ready_once = true;
                self.tell_systemd("READY=1\n");
            }
            Phase::Upgrading(upgrade) if upgrade.step == Step::Activating => {
                upgrade.step = Step::Reexecuting;
                self.maybe_reexec();
            }
            Phase::Running if first => {
                info!(worker = worker.pid.as_raw(), "worker ready again");
                self.tell_systemd("READY=1\n");
            }
            _ => self.tell_systemd("READY=1\n"),
        }
    }

    fn forward_reload(&mut self) {
        match (&self.phase, &self.worker) {
            (Phase::Running, Some(worker)) => {
                info!(worker = worker.pid.as_raw(), "SIGHUP: the worker reloads its configuration");
                let _ = kill(worker.pid, Signal::SIGHUP);
            }
            _ => warn!("SIGHUP ignored: no worker is serving (starting, restarting, upgrading or stopping)"),
        }
    }

    fn begin_upgrade(&mut self, by: &str) {
        let refusal = match (&self.phase, &self.worker) {
            (Phase::Running, Some(worker)) if worker.ready => None,
            (Phase::Upgrading(_), _) => Some("an upgrade is already under way"),
            (Phase::Stopping(_), _) => Some("ackgate is stopping"),
            _ => Some("no worker is serving yet"),
        };
        if let Some(reason) = refusal {
            warn!(%by, reason, "upgrade refused");
            self.notice(format!("upgrade refused: {reason}"));
            return;
        }
        info!(%by, exe = %self.exe.display(), "upgrade: starting the executable at the path ackgate was started from");
        self.tell_systemd("RELOADING=1\nSTATUS=upgrading\n");
        match Upgrade::start(
            &self.exe,
            &self.args,
            &self.held.listeners,
            &self.notify_address,
        ) {
            Ok(upgrade) => self.phase = Phase::Upgrading(upgrade),
            Err(e) => self.upgrade_failed(format!("cannot start {}: {e}", self.exe.display())),
        }
    }

    /// An upgrade that failed before the old worker let go: it goes on serving.
    fn upgrade_failed(&mut self, reason: String) {
        error!(%reason, "upgrade failed; the running version keeps serving");
        self.notice(format!("upgrade failed: {reason}"));
        self.tell_systemd("READY=1\nSTATUS=upgrade failed\n");
        self.phase = Phase::Running;
    }

    fn notice(&mut self, text: String) {
        if let Some(worker) = self.worker.as_mut() {
            worker.send(Control::Notice(text));
        }
        self.flush();
    }

    /// The new worker serves and every connection reached it: become the new executable too.
    fn maybe_reexec(&mut self) {
        let Phase::Upgrading(upgrade) = &self.phase else {
            return;
        };
        let Some(worker) = self.worker.as_ref() else {
            return;
        };
        if upgrade.step != Step::Reexecuting || worker.has_unsent() {
            return;
        }
        let mut fds: Vec<(String, std::os::fd::BorrowedFd<'_>, bool)> = self
            .held
            .listeners
            .iter()
            .map(|l| (l.name.clone(), l.fd.as_fd(), l.activated))
            .collect();
        fds.extend(
            self.held
                .connections()
                .map(|(name, fd)| (name.to_string(), fd, false)),
        );
        fds.push((
            names::NOTIFY.to_string(),
            self.notify.get_ref().as_fd(),
            false,
        ));
        fds.push((
            names::CONTROL.to_string(),
            worker.control_fd().as_fd(),
            false,
        ));
        let mut env = vec![(EXE_VARIABLE, self.exe.clone().into_os_string())];
        if let Some(systemd) = &self.systemd {
            env.push(("NOTIFY_SOCKET", systemd.variable.clone()));
        }
        let error = inherit::reexec(inherit::Reexec {
            exe: &self.exe,
            args: &self.args,
            fds,
            worker: (worker.pid.as_raw(), worker.granted, worker.sent_new),
            env,
        });
        error!(exe = %self.exe.display(), %error, "the new worker serves, but the supervisor cannot re-execute itself: it keeps running the previous executable");
        self.tell_systemd("READY=1\nSTATUS=upgraded (supervisor not re-executed)\n");
        self.phase = Phase::Running;
    }

    fn begin_stop(&mut self, signal: &'static str) -> Option<ExitCode> {
        if let Phase::Stopping(stop) = &self.phase {
            info!(
                signal,
                first = stop.signal,
                "stop already under way; the worker is told again"
            );
            if let Some(worker) = &self.worker {
                let _ = kill(worker.pid, Signal::SIGTERM);
            }
            return None;
        }
        if let Phase::Upgrading(upgrade) = &mut self.phase {
            upgrade.abort();
        }
        // First of all: no new handshake completes on our own listeners (a socket unit's keep
        // their queue across the stop).
        let mut draining = false;
        for listener in &self.held.listeners {
            if listener.name == names::LISTEN_TCP && !listener.activated {
                if let Err(e) = drain::drop_new_handshakes(listener.fd.as_fd()) {
                    warn!(error = %e, "cannot filter new handshakes on a listener; it closes once its queue is empty");
                }
                draining = true;
            }
        }
        info!(
            signal,
            "stopping: new connections are refused, the accepted ones are read and committed"
        );
        self.tell_systemd("STOPPING=1\n");
        let Some(worker) = self.worker.as_mut() else {
            return Some(ExitCode::SUCCESS);
        };
        worker.freeze_credit();
        let _ = kill(worker.pid, Signal::SIGTERM);
        let now = Instant::now();
        self.phase = Phase::Stopping(Stop {
            signal,
            draining,
            clean_checks: 0,
            until: now + DRAIN_AT_MOST,
            next_check: now,
        });
        if !draining {
            self.drained();
        }
        None
    }

    /// The accept queue is empty and no handshake is half-open: close our listeners.
    fn drained(&mut self) {
        self.acceptors.clear();
        self.held
            .listeners
            .retain(|l| l.name != names::LISTEN_TCP || l.activated);
        if let Phase::Stopping(stop) = &mut self.phase {
            stop.draining = false;
        }
        if let Some(worker) = self.worker.as_mut() {
            worker.send(Control::Drained);
        }
        self.flush();
    }

    fn deadline(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Restarting(at) => Some(*at),
            Phase::Upgrading(upgrade) => Some(upgrade.deadline),
            Phase::Stopping(stop) if stop.draining => Some(stop.next_check),
            _ => None,
        }
        .into_iter()
        .chain(self.accept_paused_until)
        .min()
    }

    fn tick(&mut self) -> Option<ExitCode> {
        let now = Instant::now();
        if self.accept_paused_until.is_some_and(|until| until <= now) {
            self.accept_paused_until = None;
        }
        match &mut self.phase {
            Phase::Restarting(at) if *at <= now => {
                self.phase = Phase::Running;
                if let Err(e) = self.start_worker(true) {
                    error!(error = %e, "cannot start a worker; trying again");
                    self.phase = Phase::Restarting(now + RESTART_AT_MOST);
                }
            }
            Phase::Upgrading(upgrade) if upgrade.deadline <= now => {
                let step = upgrade.step;
                let reason = upgrade.timed_out();
                match step {
                    Step::Preparing => self.upgrade_failed(reason),
                    Step::HandingOver => {
                        // The old worker does not let go: kill it. Its connections are
                        // held here and its uncommitted bytes were never consumed.
                        if let Some(worker) = &self.worker {
                            warn!(
                                worker = worker.pid.as_raw(),
                                "the old worker did not hand over in time: killing it"
                            );
                            let _ = kill(worker.pid, Signal::SIGKILL);
                        }
                    }
                    Step::Activating | Step::Reexecuting => {
                        if let Some(worker) = &self.worker {
                            let _ = kill(worker.pid, Signal::SIGKILL);
                        }
                    }
                }
            }
            Phase::Stopping(stop) if stop.draining && stop.next_check <= now => {
                let ports = drain::ports(
                    &self
                        .held
                        .listeners
                        .iter()
                        .filter(|l| l.name == names::LISTEN_TCP && !l.activated)
                        .map(|l| l.fd.as_fd())
                        .collect::<Vec<_>>(),
                );
                if drain::handshakes_pending(&ports) {
                    stop.clean_checks = 0;
                } else {
                    stop.clean_checks += 1;
                }
                stop.next_check = now + DRAIN_CHECK;
                if stop.clean_checks >= 3 || now >= stop.until {
                    self.drained();
                }
            }
            _ => {}
        }
        None
    }

    /// Reap every child that ended (workers, and orphans when this is a container's PID 1).
    fn reap(&mut self) -> Option<ExitCode> {
        loop {
            let status = match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return None,
                Ok(status) => status,
            };
            let (pid, code, how) = match status {
                WaitStatus::Exited(pid, code) => (pid, code, format!("exit status {code}")),
                WaitStatus::Signaled(pid, signal, _) => {
                    (pid, 128 + signal as i32, format!("killed by {signal}"))
                }
                _ => continue,
            };
            if let Some(code) = self.ended(pid, code, how) {
                return Some(code);
            }
        }
    }

    fn ended(&mut self, pid: Pid, code: i32, how: String) -> Option<ExitCode> {
        if let Phase::Upgrading(upgrade) = &mut self.phase {
            if upgrade.is_standby(Some(pid.as_raw())) {
                let step = upgrade.step;
                let reason = upgrade.standby_ended(&how);
                if step == Step::Preparing {
                    self.upgrade_failed(reason);
                } else {
                    // The old worker was asked to hand over already: once it is gone, the
                    // previous version starts again (a restart, with everything held).
                    error!(%reason, "upgrade failed during the handover; the previous version starts again once the old worker has stopped");
                    self.pending_notice = Some(format!("upgrade failed: {reason}"));
                    self.phase = Phase::Running;
                }
                return None;
            }
        }
        if self.worker.as_ref().map(|w| w.pid) != Some(pid) {
            return None;
        }
        let worker = self.worker.take()?;
        let exit = ExitCode::from(u8::try_from(code).unwrap_or(1));
        let step = match &self.phase {
            Phase::Starting => {
                error!(worker = pid.as_raw(), %how, "the worker did not start; see its error above");
                return Some(exit);
            }
            Phase::Stopping(_) => {
                info!(worker = pid.as_raw(), %how, "stopped");
                return Some(exit);
            }
            Phase::Upgrading(upgrade) => Some(upgrade.step),
            Phase::Running | Phase::Restarting(_) => None,
        };
        match (step, &mut self.phase) {
            (Some(Step::HandingOver), Phase::Upgrading(upgrade)) => {
                info!(worker = pid.as_raw(), %how, "the old worker handed over; the new one takes the spool and the connections");
                self.worker = upgrade.activate();
                self.hand_over_held();
            }
            (Some(_), Phase::Upgrading(upgrade)) => {
                let reason = upgrade.worker_ended(&how);
                error!(%reason, "upgrade failed; the previous version starts again");
                self.pending_notice = Some(format!("upgrade failed: {reason}"));
                self.schedule_restart(&worker, &how);
            }
            _ => self.schedule_restart(&worker, &how),
        }
        None
    }

    fn schedule_restart(&mut self, worker: &Worker, how: &str) {
        if worker.ready && worker.started.elapsed() >= STABLE_AFTER {
            self.quick_deaths = 0;
        }
        let delay = match self.quick_deaths {
            0 => Duration::ZERO,
            n => Duration::from_secs(1 << (n - 1).min(5)).min(RESTART_AT_MOST),
        };
        self.quick_deaths = self.quick_deaths.saturating_add(1);
        error!(worker = worker.pid.as_raw(), %how, restart_in = ?delay, held_connections = self.held.connection_count(),
            "worker exited; restarting it (every held connection goes to the new one)");
        self.phase = Phase::Restarting(Instant::now() + delay);
    }

    /// systemd's fd store, when the service has one (`FileDescriptorStoreMax=`, told by
    /// `$FDSTORE`, systemd 254+): what is held here is kept there too, so that it outlives
    /// this process as well (a crash of the supervisor itself, `systemctl restart`).
    fn systemd_store(&self) -> Option<&SystemdNotifier> {
        self.systemd.as_ref().filter(|_| self.fd_store)
    }

    fn tell_systemd(&self, text: &str) {
        if let Some(systemd) = &self.systemd {
            systemd.send(text);
        }
    }
}

/// The signals the supervisor handles; installed before the first worker starts.
struct Signals {
    child: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr2: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> io::Result<Signals> {
        Ok(Signals {
            child: signal(SignalKind::child())?,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
            usr2: signal(SignalKind::user_defined2())?,
        })
    }
}

/// systemd's `NOTIFY_SOCKET`, when the supervisor runs under it.
struct SystemdNotifier {
    socket: OwnedFd,
    address: nix::sys::socket::UnixAddr,
    /// `NOTIFY_SOCKET` as systemd set it (passed on to the re-executed supervisor).
    variable: OsString,
}

impl SystemdNotifier {
    fn new(variable: &std::ffi::OsStr) -> Option<SystemdNotifier> {
        let address = socket::notify_address(variable).ok()?;
        let socket = socket::datagram_sender().ok()?;
        Some(SystemdNotifier {
            socket,
            address,
            variable: variable.to_os_string(),
        })
    }

    fn send(&self, text: &str) {
        self.send_with(text, &[]);
    }

    fn send_with(&self, text: &str, fds: &[std::os::fd::BorrowedFd<'_>]) {
        let to = Some(&self.address);
        if let Err(e) = socket::send(self.socket.as_fd(), text.as_bytes(), fds, to) {
            tracing::debug!(error = %e, "cannot notify systemd");
        }
    }

    fn store(&self, name: &str, fd: std::os::fd::BorrowedFd<'_>) {
        self.send_with(&format!("FDSTORE=1\nFDNAME={name}\n"), &[fd]);
    }

    fn unstore(&self, name: &str) {
        self.send(&format!("FDSTOREREMOVE=1\nFDNAME={name}\n"));
    }
}

async fn readable(fd: &AsyncFd<OwnedFd>) {
    if let Ok(mut guard) = fd.readable().await {
        guard.retain_ready();
    }
}

async fn writable(worker: Option<&Worker>) {
    match worker {
        Some(worker) => worker.writable().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// The next connection on any of the listeners.
async fn accept_any(listeners: &[tokio::net::TcpListener]) -> io::Result<tokio::net::TcpStream> {
    std::future::poll_fn(|cx| {
        for listener in listeners {
            if let Poll::Ready(accepted) = listener.poll_accept(cx) {
                return Poll::Ready(accepted.map(|(stream, _)| stream));
            }
        }
        Poll::Pending
    })
    .await
}

/// The path this executable was started from (what an upgrade starts again): `argv[0]`,
/// made absolute against the working directory or found on `PATH`, not resolved through a
/// symlink (an upgrade that repoints `/usr/bin/ackgate` must be followed); else
/// `/proc/self/exe`.
fn started_from() -> Option<PathBuf> {
    let arg0 = PathBuf::from(std::env::args_os().next()?);
    let found = if arg0.is_absolute() {
        Some(arg0)
    } else if arg0.components().count() > 1 {
        std::env::current_dir().ok().map(|dir| dir.join(&arg0))
    } else {
        std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join(&arg0))
                .find(|candidate| candidate.is_file())
        })
    };
    found
        .filter(|path| path.is_file())
        .or_else(|| std::env::current_exe().ok())
}

/// Hold as many descriptors as the hard limit allows: every sender connection is open here
/// and in the worker.
pub fn raise_file_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        let _ = setrlimit(Resource::Nofile, limit);
    }
}
