//! One worker process as the supervisor sees it: started with `LISTEN_FDS`/`LISTEN_FDNAMES`
//! (its end of the control channel first, then the listeners) and `NOTIFY_SOCKET`, as systemd
//! starts a service; its messages waiting to be sent; and the credit it gave for new
//! connections.

use std::collections::VecDeque;
use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use command_fds::{CommandFdExt, FdMapping};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use super::held::{Holdings, Listener};
use crate::lifecycle::names;
use crate::lifecycle::protocol::Control;
use crate::lifecycle::socket;

/// The first descriptor a started process receives (`SD_LISTEN_FDS_START`).
const FIRST_FD: i32 = 3;

/// A message for the worker; a connection is looked up when it is sent, under the name it
/// has then.
enum Out {
    Conn(names::ConnId),
    Message(Control),
}

pub struct Worker {
    pub pid: Pid,
    control: AsyncFd<OwnedFd>,
    outbox: VecDeque<Out>,
    /// READY=1 received (for a standby worker: after it was activated).
    pub ready: bool,
    /// `X_ACKGATE_ACCEPT`: new connections the worker is ready for, in all.
    pub granted: u64,
    /// New connections sent to it, in all.
    pub sent_new: u64,
    pub started: Instant,
    /// Its end of the control channel is gone (it exited): nothing more is sent until it is
    /// reaped and replaced.
    gone: bool,
}

/// How to start a worker.
pub struct Start<'a> {
    pub exe: &'a Path,
    pub args: &'a [OsString],
    /// Started for an upgrade: prepare, then wait for [`Control::Activate`].
    pub standby: bool,
    pub listeners: &'a [Listener],
    pub notify_socket: &'a str,
}

impl Worker {
    pub fn spawn(start: Start<'_>) -> io::Result<Worker> {
        let (ours, theirs) = socket::control_pair()?;
        let mut mappings = vec![FdMapping {
            parent_fd: theirs,
            child_fd: FIRST_FD,
        }];
        let mut fd_names = vec![names::SUPERVISOR.to_string()];
        for (offset, listener) in start.listeners.iter().enumerate() {
            mappings.push(FdMapping {
                parent_fd: listener.fd.try_clone()?,
                child_fd: FIRST_FD + 1 + offset as i32,
            });
            fd_names.push(listener.name.clone());
        }
        let environment = Environment::new(&[
            ("LISTEN_FDS", &mappings.len().to_string()),
            ("LISTEN_FDNAMES", &fd_names.join(":")),
            ("NOTIFY_SOCKET", start.notify_socket),
            (super::SUPERVISOR_PID, &std::process::id().to_string()),
        ])?;
        let mut command = Command::new(start.exe);
        command
            .arg0("ackgate")
            .arg("worker")
            .args(start.args)
            .stdin(Stdio::null());
        if start.standby {
            command.arg("--standby");
        }
        command
            .fd_mappings(mappings)
            .map_err(|e| io::Error::other(e.to_string()))?;
        // SAFETY: the closure runs in the child between fork and exec, and only calls
        // `Environment::apply` (see there).
        unsafe {
            command.pre_exec(move || environment.apply());
        }
        let child = command.spawn()?;
        let pid = Pid::from_raw(child.id() as i32);
        // The child is reaped by the supervisor's SIGCHLD loop, not through this handle.
        drop(child);
        Ok(Worker {
            pid,
            control: socket::reactor(ours, Interest::WRITABLE)?,
            outbox: VecDeque::new(),
            ready: false,
            granted: 0,
            sent_new: 0,
            started: Instant::now(),
            gone: false,
        })
    }

    /// The worker the supervisor had before it re-executed itself.
    pub fn adopt(pid: Pid, control: OwnedFd, granted: u64, sent_new: u64) -> io::Result<Worker> {
        Ok(Worker {
            pid,
            control: socket::reactor(control, Interest::WRITABLE)?,
            outbox: VecDeque::new(),
            ready: true,
            granted,
            sent_new,
            started: Instant::now(),
            gone: false,
        })
    }

    pub fn control_fd(&self) -> &OwnedFd {
        self.control.get_ref()
    }

    /// New connections the worker is ready for now.
    pub fn credit(&self) -> u64 {
        if self.ready {
            self.granted.saturating_sub(self.sent_new)
        } else {
            0
        }
    }

    /// Take back the credit: the worker gets no more new connections (stop, upgrade).
    pub fn freeze_credit(&mut self) {
        self.granted = self.sent_new;
    }

    pub fn send_connection(&mut self, id: names::ConnId, new: bool) {
        if new {
            self.sent_new += 1;
        }
        self.outbox.push_back(Out::Conn(id));
    }

    pub fn send(&mut self, message: Control) {
        self.outbox.push_back(Out::Message(message));
    }

    /// Messages wait and the worker can take them.
    pub fn has_outbox(&self) -> bool {
        !self.outbox.is_empty() && !self.gone
    }

    /// Messages wait (whether or not the worker can take them).
    pub fn has_unsent(&self) -> bool {
        !self.outbox.is_empty()
    }

    /// Resolves when the control channel can take more messages.
    pub async fn writable(&self) {
        if let Ok(mut guard) = self.control.writable().await {
            guard.retain_ready();
        }
    }

    /// Send what is queued until the channel is full. A connection let go meanwhile is
    /// skipped. Err: the worker's end is gone (it exited; its exit is handled apart).
    pub fn flush(&mut self, held: &Holdings) -> io::Result<()> {
        while let Some(next) = self.outbox.front() {
            let sent = match next {
                Out::Conn(id) => match held.connection(*id) {
                    Some((name, fd)) => {
                        let message = Control::Conn(name.to_string()).encode();
                        self.control.try_io(Interest::WRITABLE, |control| {
                            busy_as_would_block(socket::send(
                                control.as_fd(),
                                &message,
                                &[fd],
                                None,
                            ))
                        })
                    }
                    None => Ok(()),
                },
                Out::Message(message) => {
                    let bytes = message.encode();
                    self.control.try_io(Interest::WRITABLE, |control| {
                        busy_as_would_block(socket::send(control.as_fd(), &bytes, &[], None))
                    })
                }
            };
            match sent {
                Ok(()) => {
                    self.outbox.pop_front();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => {
                    self.gone = true;
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}

/// The variables a worker is started with, set in the child between fork and exec:
/// `LISTEN_PID` must be the child's own pid, which only the child knows, and `Command::env`
/// would replace the environment after the pre-exec hook (and std's `set_var` would wait
/// forever there for the lock `spawn` holds across the fork). So the child calls libc's
/// `setenv` itself, with strings made before the fork.
struct Environment {
    set: Vec<(CString, CString)>,
    unset: Vec<CString>,
    listen_pid: CString,
}

impl Environment {
    fn new(set: &[(&str, &str)]) -> io::Result<Environment> {
        let c = |text: &str| CString::new(text).map_err(|e| io::Error::other(e.to_string()));
        Ok(Environment {
            set: set
                .iter()
                .map(|(key, value)| Ok((c(key)?, c(value)?)))
                .collect::<io::Result<_>>()?,
            unset: super::OWN_VARIABLES
                .iter()
                .map(|key| c(key))
                .collect::<io::Result<_>>()?,
            listen_pid: c("LISTEN_PID")?,
        })
    }

    /// In the child: set and unset the variables.
    fn apply(&self) -> io::Result<()> {
        let mut pid = [0u8; 16];
        decimal(std::process::id(), &mut pid);
        // SAFETY: the supervisor is single-threaded (a current-thread runtime that never uses
        // the blocking pool), so in this forked copy no other thread can hold libc's
        // environment lock or an allocator lock; every pointer is to a NUL-terminated string
        // alive for the call (`pid` is zero-filled past its digits).
        unsafe {
            if libc::setenv(self.listen_pid.as_ptr(), pid.as_ptr().cast(), 1) != 0 {
                return Err(io::Error::last_os_error());
            }
            for (key, value) in &self.set {
                if libc::setenv(key.as_ptr(), value.as_ptr(), 1) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            for key in &self.unset {
                libc::unsetenv(key.as_ptr());
            }
        }
        Ok(())
    }
}

/// `value` in decimal digits at the start of `out` (without allocating: this runs between fork
/// and exec).
fn decimal(mut value: u32, out: &mut [u8; 16]) {
    let mut digits = [0u8; 10];
    let mut len = 0;
    loop {
        digits[len] = b'0' + (value % 10) as u8;
        len += 1;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    for (i, digit) in digits[..len].iter().rev().enumerate() {
        out[i] = *digit;
    }
}

/// Too many descriptors in flight waits like a full queue (tokio retries on writability).
fn busy_as_would_block(result: io::Result<()>) -> io::Result<()> {
    match result {
        Err(e) if socket::is_busy(&e) => Err(io::ErrorKind::WouldBlock.into()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pids_are_written_in_decimal_without_allocating() {
        for (value, text) in [
            (0, "0"),
            (7, "7"),
            (4_294_967_295, "4294967295"),
            (31337, "31337"),
        ] {
            let mut out = [0u8; 16];
            decimal(value, &mut out);
            let end = out.iter().position(|b| *b == 0).unwrap();
            assert_eq!(&out[..end], text.as_bytes());
        }
    }
}
