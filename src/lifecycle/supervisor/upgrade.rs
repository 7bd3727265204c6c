//! An upgrade to the executable now at the path ackgate was started from, without a gap and
//! without running old code afterwards (cloudflare/tableflip's goals, nginx's binary
//! upgrade): the supervisor keeps the sockets throughout, so senders see nothing but a pause.
//!
//! 1. **Preparing**: the new executable starts as a *standby* worker: it reads and checks its
//!    config and sets up everything but the spool, then says `X_ACKGATE_PREPARED=1`. If it
//!    fails or takes too long, it is killed and the running worker never noticed: the old
//!    version goes on serving, and the reason is logged and shown by the admin API.
//! 2. **Handing over**: the old worker parks every connection with nothing owed (commits,
//!    acks), hands back each one's state (`FDSTORE=1` with its name), closes the spool (redb
//!    lets one process hold it) and exits.
//! 3. **Activating**: the standby is told to open the spool and is given every connection;
//!    it says `READY=1`. If it fails now, the previous version is started again from this
//!    process's own executable (`/proc/self/exe`, which still is the old one), as a restart.
//! 4. **Re-executing**: once every connection has reached the new worker, the supervisor
//!    re-executes itself from the same path, keeping every descriptor and its pid: no old
//!    code runs any more, and systemd's `MAINPID` (or a container's PID 1) stays ackgate's.

use std::ffi::OsString;
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};

use super::held::Listener;
use super::worker::{Start, Worker};
use crate::lifecycle::protocol::Control;

/// How long a new worker may take to prepare (read its config, set up TLS, …).
const PREPARE_AT_MOST: Duration = Duration::from_secs(60);
/// How long the old worker may take to park and hand over (its nodes drain their in-flight
/// chunks for up to `upstream.shutdown_grace`); past it, it is killed, which loses nothing
/// either: what it had not committed is still unread in the sockets held here.
const HANDOVER_AT_MOST: Duration = Duration::from_secs(120);
/// How long the new worker may take to open the spool and say READY.
const ACTIVATE_AT_MOST: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Preparing,
    HandingOver,
    Activating,
    Reexecuting,
}

pub struct Upgrade {
    pub step: Step,
    pub deadline: Instant,
    /// The new worker until it is activated (then it is the supervisor's worker).
    standby: Option<Worker>,
    /// The new worker's last `STATUS=`: its error, when it fails.
    pub status: Option<String>,
}

impl Upgrade {
    /// Start the executable at `exe` as a standby worker.
    pub fn start(
        exe: &Path,
        args: &[OsString],
        listeners: &[Listener],
        notify_socket: &str,
    ) -> io::Result<Upgrade> {
        let metadata = std::fs::metadata(exe)?;
        if !metadata.is_file() {
            return Err(io::Error::other("not a file"));
        }
        let standby = Worker::spawn(Start {
            exe,
            args,
            standby: true,
            listeners,
            notify_socket,
        })?;
        tracing::info!(
            worker = standby.pid.as_raw(),
            "upgrade: new worker started, preparing"
        );
        Ok(Upgrade {
            step: Step::Preparing,
            deadline: Instant::now() + PREPARE_AT_MOST,
            standby: Some(standby),
            status: None,
        })
    }

    /// Whether `pid` is the standby worker (before it took over).
    pub fn is_standby(&self, pid: Option<i32>) -> bool {
        self.standby
            .as_ref()
            .is_some_and(|w| Some(w.pid.as_raw()) == pid)
    }

    /// The standby is prepared: the old worker is asked to hand over.
    pub fn prepared(&mut self) {
        if self.step == Step::Preparing {
            tracing::info!("upgrade: the new worker is prepared; the old one parks its connections and hands over");
            self.step = Step::HandingOver;
            self.deadline = Instant::now() + HANDOVER_AT_MOST;
        }
    }

    /// The old worker is gone: the standby takes over (told first, then given every
    /// connection by the caller).
    pub fn activate(&mut self) -> Option<Worker> {
        self.step = Step::Activating;
        self.deadline = Instant::now() + ACTIVATE_AT_MOST;
        let mut worker = self.standby.take()?;
        worker.send(Control::Activate);
        Some(worker)
    }

    /// Stop the upgrade (ackgate is stopping): the standby is killed.
    pub fn abort(&mut self) {
        if let Some(standby) = self.standby.take() {
            let _ = kill(standby.pid, Signal::SIGKILL);
        }
    }

    /// The deadline passed: kill the standby if there is one; the reason, for the log.
    pub fn timed_out(&mut self) -> String {
        self.abort();
        match self.step {
            Step::Preparing => format!(
                "the new worker was not prepared within {PREPARE_AT_MOST:?}{}",
                self.said()
            ),
            Step::HandingOver => {
                format!("the old worker did not hand over within {HANDOVER_AT_MOST:?}")
            }
            Step::Activating | Step::Reexecuting => format!(
                "the new worker was not ready within {ACTIVATE_AT_MOST:?} of taking over{}",
                self.said()
            ),
        }
    }

    /// The standby ended before it took over.
    pub fn standby_ended(&mut self, how: &str) -> String {
        self.standby = None;
        format!(
            "the new worker ended ({how}) before it was prepared{}",
            self.said()
        )
    }

    /// The new worker ended after it took over, before it was ready.
    pub fn worker_ended(&self, how: &str) -> String {
        format!(
            "the new worker ended ({how}) after taking over{}",
            self.said()
        )
    }

    fn said(&self) -> String {
        match &self.status {
            Some(status) => format!(": {status}"),
            None => String::new(),
        }
    }
}
