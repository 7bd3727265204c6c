//! `ackgate worker`: the process that reads sender sockets, started by `ackgate run`'s
//! supervisor (never by hand). What it must do before anything else: die with its
//! supervisor (`PR_SET_PDEATHSIG`: a worker without one would hold the spool with nobody to
//! hand its connections to), and take what it was started with (`LISTEN_FDS`,
//! `NOTIFY_SOCKET`) out of the environment while it is still single-threaded.

use std::io;

use super::sockets::Inherited;
use super::supervisor::SUPERVISOR_PID;

/// Why a process cannot be a worker.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(
        "`ackgate worker` is started by `ackgate run`, which holds its sockets: run that instead"
    )]
    NotSupervised,
    #[error("its supervisor is gone already")]
    Orphaned,
    #[error("cannot read the descriptors it was started with: {0}")]
    Descriptors(io::Error),
}

/// Everything a worker does before its runtime starts. Must run before any thread exists.
pub fn prepare_process() -> Result<Inherited, WorkerError> {
    super::signals::block();
    let supervisor = std::env::var(SUPERVISOR_PID)
        .ok()
        .and_then(|pid| pid.parse::<i32>().ok())
        .ok_or(WorkerError::NotSupervised)?;
    std::env::remove_var(SUPERVISOR_PID);
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL));
    // The supervisor may have died before the line above: then the signal never comes.
    if rustix::process::getppid().map(|p| p.as_raw_nonzero().get()) != Some(supervisor) {
        return Err(WorkerError::Orphaned);
    }
    super::supervisor::raise_file_limit();
    super::notify::init();
    let mut inherited = Inherited::take().map_err(WorkerError::Descriptors)?;
    if inherited.supervisor.is_none() {
        return Err(WorkerError::NotSupervised);
    }
    inherited.supervisor_pid = u32::try_from(supervisor).ok();
    // `ps` and `pstree` show the worker as such (it was started from /proc/self/exe).
    let _ = rustix::thread::set_name(c"ackgate-worker");
    Ok(inherited)
}
