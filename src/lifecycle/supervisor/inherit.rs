//! The descriptors a supervisor starts with: none (a first start), systemd's (`LISTEN_FDS`:
//! the socket unit's listeners and what the fd store kept), or its own from before it
//! re-executed itself for an upgrade (`ACKGATE_FDS`, with the worker it had). And the
//! re-execution itself: every held descriptor stays open across `execve`, named in the
//! environment.

use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::fcntl::{fcntl, FcntlArg, FdFlag};

use super::held::{classify, Listener};
use crate::lifecycle::names;

/// Descriptors kept across the supervisor's own re-execution: `fd:name[:activated],…`.
pub const FDS_VARIABLE: &str = "ACKGATE_FDS";
/// The worker the re-executed supervisor keeps: `pid:granted:sent`.
pub const WORKER_VARIABLE: &str = "ACKGATE_WORKER";

/// What a supervisor found at start.
#[derive(Default)]
pub struct Inherited {
    pub listeners: Vec<Listener>,
    pub connections: Vec<(String, OwnedFd)>,
    /// After a re-execution: the notification socket and the worker's control channel.
    pub notify: Option<OwnedFd>,
    pub control: Option<OwnedFd>,
    pub worker: Option<(i32, u64, u64)>,
}

impl Inherited {
    fn add(&mut self, name: String, fd: OwnedFd, activated: bool) {
        match name.as_str() {
            names::NOTIFY => self.notify = Some(fd),
            names::CONTROL => self.control = Some(fd),
            _ if names::conn_id(&name).is_some() => self.connections.push((name, fd)),
            _ => self.listeners.push(Listener {
                name,
                fd,
                activated,
            }),
        }
    }
}

/// Read (and unset) what this process was started with. Must run before any thread exists
/// (it changes the environment).
pub fn take() -> io::Result<Inherited> {
    let mut inherited = Inherited::default();
    if let Some(list) = std::env::var_os(FDS_VARIABLE) {
        for entry in list.to_string_lossy().split(',').filter(|e| !e.is_empty()) {
            let mut fields = entry.split(':');
            let (Some(fd), Some(name)) = (fields.next(), fields.next()) else {
                continue;
            };
            let activated = fields.next() == Some("activated");
            let Ok(fd) = fd.parse::<RawFd>() else {
                continue;
            };
            if let Some(fd) = own(fd) {
                inherited.add(name.to_string(), fd, activated);
            }
        }
        if let Some(worker) = std::env::var_os(WORKER_VARIABLE) {
            let worker = worker.to_string_lossy().into_owned();
            let fields: Vec<u64> = worker.split(':').filter_map(|f| f.parse().ok()).collect();
            if let [pid, granted, sent] = fields[..] {
                inherited.worker = i32::try_from(pid).ok().map(|pid| (pid, granted, sent));
            }
        }
    } else {
        for (fd, name) in sd_notify::listen_fds_with_names()? {
            let Some(fd) = own(fd) else { continue };
            let Some(classified) = classify(fd.as_fd(), &name) else {
                tracing::warn!(%name, "ignoring an inherited descriptor that is not a socket ackgate uses");
                continue;
            };
            // A name of ours came back from systemd's fd store; any other is a socket unit's.
            let activated = classified != name;
            inherited.add(classified, fd, activated);
        }
    }
    for variable in [
        FDS_VARIABLE,
        WORKER_VARIABLE,
        "LISTEN_FDS",
        "LISTEN_FDNAMES",
        "LISTEN_PID",
    ] {
        std::env::remove_var(variable);
    }
    Ok(inherited)
}

/// Take ownership of an inherited descriptor, if it is open.
fn own(fd: RawFd) -> Option<OwnedFd> {
    // F_GETFD fails on a descriptor that is not open: never wrap a number nobody owns.
    let flags = fcntl(
        // SAFETY: only borrowed for this one call, to ask whether it is open.
        unsafe { BorrowedFd::borrow_raw(fd) },
        FcntlArg::F_GETFD,
    )
    .ok()?;
    let _ = flags;
    // SAFETY: the descriptor is open and was handed to this process (systemd's LISTEN_FDS or
    // our own ACKGATE_FDS) for it alone to own; it is wrapped exactly once.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let _ = fcntl(&fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    Some(fd)
}

/// What a re-executed supervisor needs.
pub struct Reexec<'a> {
    pub exe: &'a Path,
    pub args: &'a [OsString],
    /// `(name, fd, activated)` of everything held.
    pub fds: Vec<(String, BorrowedFd<'a>, bool)>,
    pub worker: (i32, u64, u64),
    /// Variables to set in the new image (`NOTIFY_SOCKET`, which this process took out of its
    /// own environment; the path to upgrade from).
    pub env: Vec<(&'a str, OsString)>,
}

/// Replace this process by `exe`, keeping every held descriptor and, blocked, every pending
/// lifecycle signal (`execve` keeps the mask; std's `exec` would clear it, and a SIGTERM
/// before the new image's handlers exist would kill it). Returns only on failure, with every
/// descriptor close-on-exec again and the signals delivered again.
pub fn reexec(plan: Reexec<'_>) -> io::Error {
    let mut list = Vec::new();
    for (name, fd, activated) in &plan.fds {
        if fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty())).is_ok() {
            let suffix = if *activated { ":activated" } else { "" };
            list.push(format!("{}:{name}{suffix}", fd.as_raw_fd()));
        }
    }
    let (pid, granted, sent) = plan.worker;
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os().collect();
    let mut set = |key: &str, value: OsString| {
        env.retain(|(k, _)| k != key);
        env.push((key.into(), value));
    };
    set(FDS_VARIABLE, list.join(",").into());
    set(WORKER_VARIABLE, format!("{pid}:{granted}:{sent}").into());
    for (key, value) in &plan.env {
        set(key, value.clone());
    }
    let error = match exec_args(&plan, &env) {
        Ok((path, argv, envp)) => {
            crate::lifecycle::signals::block();
            let Err(errno) = nix::unistd::execve(&path, &argv, &envp);
            crate::lifecycle::signals::unblock();
            io::Error::from(errno)
        }
        Err(e) => e,
    };
    for (_, fd, _) in &plan.fds {
        let _ = fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    }
    error
}

type Exec = (CString, Vec<CString>, Vec<CString>);

fn exec_args(plan: &Reexec<'_>, env: &[(OsString, OsString)]) -> io::Result<Exec> {
    let c = |bytes: Vec<u8>| CString::new(bytes).map_err(|e| io::Error::other(e.to_string()));
    let path = c(plan.exe.as_os_str().as_bytes().to_vec())?;
    let mut argv = vec![path.clone(), c(b"run".to_vec())?];
    for arg in plan.args {
        argv.push(c(arg.as_bytes().to_vec())?);
    }
    let mut envp = Vec::with_capacity(env.len());
    for (key, value) in env {
        let mut pair = key.as_bytes().to_vec();
        pair.push(b'=');
        pair.extend_from_slice(value.as_bytes());
        envp.push(c(pair)?);
    }
    Ok((path, argv, envp))
}
