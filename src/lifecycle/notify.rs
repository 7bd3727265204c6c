//! The worker's side of the service manager's notification protocol (`sd_notify(3)`), sent to
//! `NOTIFY_SOCKET`: `ackgate run`'s supervisor, or systemd when a worker runs under it
//! directly. READY, RELOADING, STOPPING and STATUS; `FDSTORE=1` to leave a descriptor (a
//! listener, a connection's state) with the manager and `FDSTOREREMOVE=1` to take it back;
//! and ackgate's own variables ([`super::protocol`]). The states are sd-notify's
//! ([`NotifyState`]); the socket is opened once ([`init`]) and kept, because a worker sends
//! one message per connection it is handed.
//!
//! Without `NOTIFY_SOCKET` every call does nothing: a relay run by hand is managed by nobody.
//! A notification that cannot be sent is logged at debug level: the manager's view is behind,
//! but the relay itself is fine.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::OnceLock;

use nix::sys::socket::UnixAddr;
use sd_notify::NotifyState;
use tracing::debug;

use super::protocol;
use super::socket;

struct Notifier {
    socket: OwnedFd,
    address: UnixAddr,
}

static NOTIFIER: OnceLock<Option<Notifier>> = OnceLock::new();

/// Read `NOTIFY_SOCKET` once and unset it, so that no child inherits it. Must run before any
/// thread exists (it changes the environment).
pub fn init() {
    let notifier = std::env::var_os("NOTIFY_SOCKET").and_then(|value| {
        let address = socket::notify_address(&value).ok()?;
        let socket = socket::datagram_sender().ok()?;
        Some(Notifier { socket, address })
    });
    std::env::remove_var("NOTIFY_SOCKET");
    let _ = NOTIFIER.set(notifier);
}

/// Whether a manager listens (`NOTIFY_SOCKET` was set).
pub fn managed() -> bool {
    NOTIFIER.get().is_some_and(Option::is_some)
}

fn send_with(states: &[NotifyState<'_>], fds: &[BorrowedFd<'_>]) {
    let Some(Some(notifier)) = NOTIFIER.get() else {
        return;
    };
    let text: String = states.iter().map(|state| format!("{state}\n")).collect();
    if let Err(error) = socket::send(
        notifier.socket.as_fd(),
        text.as_bytes(),
        fds,
        Some(&notifier.address),
    ) {
        debug!(%error, message = %text.trim_end(), "cannot notify the service manager");
    }
}

fn send(states: &[NotifyState<'_>]) {
    send_with(states, &[]);
}

/// Start-up (or a reload) is finished; `status` is a one-line summary for `systemctl status`.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A reload of the configuration began (systemd `Type=notify-reload` wants the monotonic
/// time with it); [`ready`] ends it.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// The relay is stopping: no new connections, draining the open ones.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// A one-line status for `systemctl status` (also how a worker that fails to start says why).
pub fn status(text: &str) {
    let line = text.replace('\n', " ");
    send(&[NotifyState::Status(&line)]);
}

/// Leave `fd` with the manager under `name` (a held connection: its new state).
pub fn store(name: &str, fd: BorrowedFd<'_>) {
    send_with(&[NotifyState::FdStore, NotifyState::FdName(name)], &[fd]);
}

/// Take back the descriptor stored under `name` (the manager closes its copy).
pub fn unstore(name: &str) {
    send(&[NotifyState::FdStoreRemove, NotifyState::FdName(name)]);
}

/// The worker is ready for `total` new connections since it started (see [`protocol`]).
pub fn accept(total: u64) {
    let line = format!("{}={total}", protocol::ACCEPT);
    send(&[NotifyState::Custom(&line)]);
}

/// A worker started for an upgrade is prepared to take over.
pub fn prepared() {
    let line = format!("{}=1", protocol::PREPARED);
    send(&[NotifyState::Custom(&line)]);
}

/// Ask the supervisor for an upgrade (the admin API's `POST /api/upgrade`).
pub fn request_upgrade() {
    let line = format!("{}=1", protocol::UPGRADE);
    send(&[NotifyState::Custom(&line)]);
}
