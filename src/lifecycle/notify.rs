//! The worker's side of the service manager's notification protocol (`sd_notify(3)`): READY,
//! RELOADING, STOPPING and STATUS, sent to `NOTIFY_SOCKET`, whether that is systemd's or
//! `ackgate run`'s supervisor's. Without `NOTIFY_SOCKET` every call does nothing: a relay run
//! by hand is managed by nobody.
//!
//! A failed notification is logged and otherwise ignored: the manager's view is behind, but
//! the relay itself is fine.

use sd_notify::NotifyState;
use tracing::debug;

fn send(states: &[NotifyState<'_>]) {
    if let Err(error) = sd_notify::notify(states) {
        debug!(%error, "cannot notify the service manager");
    }
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

/// A one-line status for `systemctl status`.
pub fn status(text: &str) {
    send(&[NotifyState::Status(text)]);
}
