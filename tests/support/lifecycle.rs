//! ackgate's own lifecycle as the fault (issue 21, DESIGN.md invariant 10): the `ackgate run`
//! process P at the timing a user gets, and the faults of `tests/faults_lifecycle.rs` applied
//! to it: a kill -9 of the process that reads the sockets, a stop then a start, a reload with a
//! good or a broken file, an upgrade with the same or a replaced executable. Each returns what
//! happened ([`FaultOutcome`]); [`LifecycleRelay::drain`] then waits until ackgate holds nothing.
//!
//! - Addresses: the ingress and admin ports are [`ReservedPort`]s held for the whole run and
//!   written into the config, so every incarnation listens where the senders connect, and
//!   while none listens a connect is refused (an explicitly bound port is never handed to an
//!   outgoing connection, so a sender cannot end up connected to itself meanwhile).
//! - The worker, the process that reads the sockets: P's child when P has one
//!   (`/proc/P/task/P/children`: the supervisor's worker, lifecycle-plan), else P itself (today
//!   there is a single process).
//! - Readiness is an event: an `ackgate ready listen=` line after the fault's log mark; an exit
//!   is one too: P's stderr ends. Today SIGHUP and SIGUSR2 terminate P (their default action):
//!   that is reported as an unexpected exit, and P is started again on the same config and spool
//!   so that the run can finish and count the loss. A worker that outlives P (it would hold the
//!   sockets, the spool and P's stderr) is SIGKILLed and reported before P starts again.

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use super::launcher::{Ackgate, READY_TIMEOUT};
use super::metrics::{metric_sum, try_http};
use super::ports::ReservedPort;
use super::process::{send_signal, LineOrEnd};

/// The `ackgate ready` line every serving process prints (a new worker too).
const READY: &[&str] = &["ackgate ready", "listen="];
/// How long a reload may take to say it happened (a log line with "reload") before the run
/// goes on; it also bounds the wait for a process that dies of the SIGHUP.
pub const RELOAD_SETTLE: Duration = Duration::from_secs(3);
/// How long a SIGTERM may take to stop ackgate (its default `shutdown_grace` is 5 s, the
/// ingress drain at least 5 s more).
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// The value the good reload writes (default: 30 s) and the broken one (not a duration).
const RELOADED_ACK_TIMEOUT: &str = "20s";
const BROKEN_ACK_TIMEOUT: &str = "soon";

/// One lifecycle fault, applied to P once per run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// None: the control run.
    None,
    /// SIGKILL to the worker (P's child), or to P with no child, then P started again.
    KillWorker,
    /// SIGTERM to P, wait for its exit, start it again on the same config and spool.
    StopStart,
    /// Rewrite the config with a valid change (`upstream.ack_timeout`), SIGHUP.
    Reload,
    /// Rewrite the config with an invalid value, SIGHUP, restore the file.
    ReloadBroken,
    /// SIGUSR2 with the executable unchanged.
    Upgrade,
    /// SIGUSR2 after a new copy of the executable was renamed over the path P runs from.
    UpgradeReplaced,
}

impl Fault {
    /// A short name for reports.
    pub fn label(self) -> &'static str {
        match self {
            Fault::None => "no fault",
            Fault::KillWorker => "kill -9 of the worker",
            Fault::StopStart => "SIGTERM, then start",
            Fault::Reload => "reload (SIGHUP, valid change)",
            Fault::ReloadBroken => "reload (SIGHUP, broken file)",
            Fault::Upgrade => "upgrade (SIGUSR2, same executable)",
            Fault::UpgradeReplaced => "upgrade (SIGUSR2, replaced executable)",
        }
    }
}

/// What a fault did to ackgate.
#[derive(Debug, Clone)]
pub struct FaultOutcome {
    /// What happened, for the report.
    pub what: String,
    /// P exited (or a worker was not replaced) where it was meant to go on.
    pub unexpected_exit: bool,
    /// Times the harness started P again.
    pub restarts: u32,
    /// From the fault until ackgate served again (its ready line), or the reload settled.
    pub gap: Duration,
}

/// `ackgate run` on pinned ingress and admin addresses, default settings otherwise, forwarding
/// to one node.
pub struct LifecycleRelay {
    gate: Ackgate,
    ingress: SocketAddr,
    admin: SocketAddr,
    /// Held for the whole run (see the module doc).
    _ports: [ReservedPort; 2],
    /// Where the copy of the executable lives, when P runs from one.
    _bin_dir: Option<tempfile::TempDir>,
    /// P's worker when the current fault began, if P had one.
    worker: Option<u32>,
}

impl LifecycleRelay {
    /// Start ackgate towards `node`; with `copy_binary`, from a copy of the built executable
    /// in a temp dir (which [`Fault::UpgradeReplaced`] replaces).
    pub fn start(node: SocketAddr, copy_binary: bool) -> LifecycleRelay {
        let ports = [ReservedPort::new(), ReservedPort::new()];
        let (ingress, admin) = (ports[0].addr(), ports[1].addr());
        let mut builder = Ackgate::builder()
            .node("agg", node)
            .product_upstream_timing()
            .section("ingress", &format!("listen = \"{ingress}\""))
            .section("admin", &format!("listen = \"{admin}\""));
        let bin_dir = copy_binary.then(|| tempfile::tempdir().expect("temp dir for the binary"));
        if let Some(dir) = &bin_dir {
            let path = dir.path().join("ackgate");
            std::fs::copy(built_binary(), &path).expect("copy the ackgate binary");
            builder = builder.binary(&path);
        }
        let gate = builder.start();
        assert_eq!(gate.addr(), ingress, "ackgate listens where it was told");
        LifecycleRelay {
            gate,
            ingress,
            admin,
            _ports: ports,
            _bin_dir: bin_dir,
            worker: None,
        }
    }

    /// Where senders connect (the same across every fault).
    pub fn addr(&self) -> SocketAddr {
        self.ingress
    }

    /// The admin listener (`/metrics`).
    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    pub fn gate(&self) -> &Ackgate {
        &self.gate
    }

    /// Apply `fault` and return once ackgate serves again.
    pub fn inject(&mut self, fault: Fault) -> FaultOutcome {
        if fault == Fault::UpgradeReplaced {
            self.replace_binary();
        }
        self.worker = worker_child(self.gate.pid());
        let started = Instant::now();
        let mut outcome = match fault {
            Fault::None => FaultOutcome {
                what: "no fault".into(),
                unexpected_exit: false,
                restarts: 0,
                gap: Duration::ZERO,
            },
            Fault::KillWorker => self.kill_worker(),
            Fault::StopStart => self.stop_start(),
            Fault::Reload => self.reload(RELOADED_ACK_TIMEOUT, false),
            Fault::ReloadBroken => self.reload(BROKEN_ACK_TIMEOUT, true),
            Fault::Upgrade => self.upgrade("SIGUSR2"),
            Fault::UpgradeReplaced => self.upgrade("SIGUSR2 (executable replaced)"),
        };
        outcome.gap = started.elapsed();
        outcome
    }

    fn kill_worker(&mut self) -> FaultOutcome {
        let p = self.gate.pid();
        let Some(worker) = worker_child(p) else {
            self.gate.kill9();
            self.gate.restart();
            return FaultOutcome {
                what: format!(
                    "no worker process: ackgate run (pid {p}) itself SIGKILLed, started again"
                ),
                unexpected_exit: false,
                restarts: 1,
                gap: Duration::ZERO,
            };
        };
        let (mark, exits) = (self.gate.log_mark(), self.gate.exit_mark());
        send_signal(worker, libc::SIGKILL);
        match self
            .gate
            .wait_line_or_exit(mark, exits, READY, READY_TIMEOUT)
        {
            LineOrEnd::Line(_) => self.alive_or_restart(
                p,
                format!("worker {worker} SIGKILLed; ackgate run started a new one"),
            ),
            LineOrEnd::Ended => {
                let status = self.gate.reap(Duration::from_secs(10));
                self.restart(format!(
                    "worker {worker} SIGKILLed; ackgate run (pid {p}) exited too ({})",
                    describe(status)
                ))
            }
            LineOrEnd::Timeout => self.restart(format!(
                "worker {worker} SIGKILLed; no new worker ready within {READY_TIMEOUT:?}"
            )),
        }
    }

    /// SIGTERM, wait for the exit (bounded), start again. A stop that does not end within
    /// [`STOP_TIMEOUT`] is a finding: P is SIGKILLed and started again.
    fn stop_start(&mut self) -> FaultOutcome {
        let p = self.gate.pid();
        let stopping = Instant::now();
        self.gate.signal(libc::SIGTERM);
        if !self.gate.wait_exit(STOP_TIMEOUT) {
            return self.restart(format!(
                "SIGTERM: ackgate run (pid {p}) still running {STOP_TIMEOUT:?} later"
            ));
        }
        let stopped_in = stopping.elapsed();
        let orphan = self.kill_orphaned_worker();
        let status = self.gate.reap(Duration::from_secs(10));
        self.gate.restart();
        FaultOutcome {
            what: format!(
                "SIGTERM: exited ({}) after {:.1} s{orphan}; started again",
                describe(status),
                stopped_in.as_secs_f64()
            ),
            unexpected_exit: false,
            restarts: 1,
            gap: Duration::ZERO,
        }
    }

    /// Set `upstream.ack_timeout` to `value` in the config file, SIGHUP, and give the reload
    /// [`RELOAD_SETTLE`] to show in the log; a `broken` file is restored afterwards (before any
    /// restart, which must read a valid one).
    fn reload(&mut self, value: &str, broken: bool) -> FaultOutcome {
        let path = self.gate.config_path().to_path_buf();
        let original = std::fs::read_to_string(&path).expect("read config");
        std::fs::write(&path, with_ack_timeout(&original, value)).expect("write config");
        let p = self.gate.pid();
        let (mark, exits) = (self.gate.log_mark(), self.gate.exit_mark());
        self.gate.signal(libc::SIGHUP);
        let result = self
            .gate
            .log()
            .wait_for_line_or_end(mark, exits, RELOAD_SETTLE, |l| {
                l.to_ascii_lowercase().contains("reload")
            });
        if broken {
            std::fs::write(&path, &original).expect("restore config");
        }
        let change = format!("ack_timeout = {value:?}");
        match result {
            LineOrEnd::Ended => {
                let status = self.gate.reap(Duration::from_secs(10));
                self.restart(format!(
                    "SIGHUP ({change}): ackgate run (pid {p}) exited ({}), no reload",
                    describe(status)
                ))
            }
            LineOrEnd::Line(line) => self.alive_or_restart(p, format!("SIGHUP ({change}): {line}")),
            LineOrEnd::Timeout => self.alive_or_restart(
                p,
                format!("SIGHUP ({change}): no line about a reload within {RELOAD_SETTLE:?}"),
            ),
        }
    }

    /// Put a new copy of the executable where P was started from, as an operator does with
    /// `cp` and `mv`: write it beside (`path.new`), rename it over the path. Its ~97 MB (a
    /// release build with debug info) are written just before the signal, and ext4 writes them
    /// out with the next journal commits, which the spool's fsyncs wait for: today's ackgate
    /// loses several times more here than with the same executable for that reason alone (a
    /// copy made and synced before the load, only renamed here, lost as much as the same
    /// executable in 10 runs each). The fault's clock starts after this.
    fn replace_binary(&self) {
        let path = self.gate.binary().to_path_buf();
        let new = path.with_extension("new");
        std::fs::copy(built_binary(), &new).expect("copy the new executable");
        std::fs::rename(&new, &path).expect("rename the new executable over the old");
    }

    /// SIGUSR2; wait for a new ready line or P's exit.
    fn upgrade(&mut self, what: &str) -> FaultOutcome {
        let p = self.gate.pid();
        let (mark, exits) = (self.gate.log_mark(), self.gate.exit_mark());
        self.gate.signal(libc::SIGUSR2);
        match self
            .gate
            .wait_line_or_exit(mark, exits, READY, READY_TIMEOUT)
        {
            LineOrEnd::Line(_) => self.alive_or_restart(p, format!("{what}: new worker ready")),
            LineOrEnd::Ended => {
                let status = self.gate.reap(Duration::from_secs(10));
                self.restart(format!(
                    "{what}: ackgate run (pid {p}) exited ({}), no upgrade",
                    describe(status)
                ))
            }
            LineOrEnd::Timeout => {
                self.restart(format!("{what}: no ready line within {READY_TIMEOUT:?}"))
            }
        }
    }

    /// After a fault P should survive: if it runs still under pid `p`, say so; else start it.
    fn alive_or_restart(&mut self, p: u32, what: String) -> FaultOutcome {
        if self.gate.is_running() && self.gate.pid() == p {
            return FaultOutcome {
                what: format!("{what}; pid {p} kept"),
                unexpected_exit: false,
                restarts: 0,
                gap: Duration::ZERO,
            };
        }
        self.restart(format!("{what}; then exited"))
    }

    /// P is gone or useless where it should not be: start it again (a finding). A worker
    /// that outlived P (holding the sockets, the spool and P's stderr) is killed first.
    fn restart(&mut self, mut what: String) -> FaultOutcome {
        if self.gate.is_running() {
            self.worker = self.worker.or_else(|| worker_child(self.gate.pid()));
            self.gate.signal(libc::SIGKILL);
        }
        what.push_str(&self.kill_orphaned_worker());
        if let Some(status) = self.gate.reap(Duration::from_secs(10)) {
            what.push_str(&format!(" ({status})"));
        }
        self.gate.restart();
        FaultOutcome {
            what: format!("{what}; started again by the harness"),
            unexpected_exit: true,
            restarts: 1,
            gap: Duration::ZERO,
        }
    }

    /// Once P is gone (or SIGKILLed): SIGKILL its worker if that outlives it by a second (it
    /// would hold the sockets, the spool and P's stderr), and say so (empty when there was
    /// none). The second is for a worker that dies with its parent (PDEATHSIG) to do so.
    fn kill_orphaned_worker(&mut self) -> String {
        let Some(worker) = self
            .worker
            .take()
            .filter(|&w| !wait_gone(w, Duration::from_secs(1)))
        else {
            return String::new();
        };
        // SAFETY: kill(2) on the pid of a process this test's child started.
        unsafe { libc::kill(worker as libc::pid_t, libc::SIGKILL) };
        let gone = wait_gone(worker, Duration::from_secs(10));
        format!(
            "; its worker {worker} outlived it: SIGKILLed{}",
            if gone {
                ""
            } else {
                ", and still there 10 s later"
            }
        )
    }

    /// Wait (bounded by `timeout`) until ackgate holds nothing of what it was sent: no sender
    /// connection open, no record in the spool, and the committed event count unchanged
    /// between two scrapes (so nothing was still being read). `/metrics` has no change
    /// notification: it is polled every 100 ms. Returns how long it took, or the last figures.
    pub fn drain(&self, timeout: Duration) -> Result<Duration, String> {
        let started = Instant::now();
        let mut previous: Option<f64> = None;
        let mut last = String::from("no answer from /metrics");
        loop {
            if let Ok((200, text)) = try_http(self.admin, "GET", "/metrics") {
                let value = |name| metric_sum(&text, name).unwrap_or(-1.0);
                let (open, records, events_in) = (
                    value("ackgate_connections_open"),
                    value("ackgate_spool_records"),
                    value("ackgate_events_in_total"),
                );
                if open == 0.0 && records == 0.0 && previous == Some(events_in) {
                    return Ok(started.elapsed());
                }
                previous = (open == 0.0 && records == 0.0).then_some(events_in);
                last = format!(
                    "connections open {open}, spool records {records}, events in {events_in}"
                );
            }
            if started.elapsed() >= timeout {
                return Err(format!("not drained within {timeout:?}: {last}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for LifecycleRelay {
    /// P first (a supervisor would start a new worker), then its worker if that outlives it.
    fn drop(&mut self) {
        if self.gate.is_running() {
            self.worker = worker_child(self.gate.pid());
            self.gate.signal(libc::SIGKILL);
        }
        self.kill_orphaned_worker();
        self.gate.kill9();
    }
}

/// The executable cargo built.
fn built_binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ackgate"))
}

/// The process that reads the sockets under P, if P has a child (the supervisor's worker):
/// the child whose command line says `worker`, else the first one.
pub fn worker_child(p: u32) -> Option<u32> {
    let children = std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")).ok()?;
    let pids: Vec<u32> = children
        .split_whitespace()
        .filter_map(|pid| pid.parse().ok())
        .collect();
    let is_worker = |pid: &&u32| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|cmd| cmd.split(|&b| b == 0).any(|arg| arg == b"worker"))
    };
    pids.iter().find(is_worker).or(pids.first()).copied()
}

/// Whether process `pid` exists and is not a zombie (`/proc/PID/stat`'s state).
fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// Wait until process `pid`, not a child of the test (its parent died), is gone; false after
/// `timeout`. Nothing signals the exit of another's child: `/proc` is polled every 20 ms.
fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while process_alive(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// `text` (a config) with `upstream.ack_timeout = value`, other keys as they were. The value
/// is written as a string, valid TOML either way: whether it is a duration is ackgate's call.
fn with_ack_timeout(text: &str, value: &str) -> String {
    let mut root: toml::Table = toml::from_str(text).expect("the config parses");
    root.entry("upstream")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .expect("[upstream] is a table")
        .insert("ack_timeout".into(), value.into());
    toml::to_string(&root).expect("render config")
}

/// An exit status for a report, or why there is none.
fn describe(status: Option<ExitStatus>) -> String {
    status.map_or_else(|| "no exit status".into(), |s| s.to_string())
}
