//! The lifecycle signals (SIGTERM, SIGINT, SIGHUP, SIGUSR2, SIGCHLD) are blocked from the
//! first instruction of `ackgate run` and `ackgate worker` until their handlers exist, and
//! across the supervisor's re-execution (`execve` keeps the mask): a stop or a reload that
//! comes in between waits, pending, instead of killing the process with the default action.

use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow, Signal};

fn set() -> SigSet {
    let mut set = SigSet::empty();
    for signal in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGUSR2,
        Signal::SIGCHLD,
    ] {
        set.add(signal);
    }
    set
}

/// Hold the lifecycle signals pending (threads started afterwards inherit the mask).
pub fn block() {
    let _ = pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set()), None);
}

/// Deliver them again, once their handlers are installed; pending ones arrive now.
pub fn unblock() {
    let _ = pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&set()), None);
}
