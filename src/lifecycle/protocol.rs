//! The two directions between `ackgate run`'s supervisor and its worker, as bytes; no I/O.
//!
//! - Worker → supervisor: `sd_notify(3)` datagrams on `NOTIFY_SOCKET`, the protocol systemd
//!   speaks (`READY=1`, `RELOADING=1`, `STOPPING=1`, `STATUS=`, `FDSTORE=1` with `FDNAME=`,
//!   `FDSTOREREMOVE=1`), plus three variables of ackgate's own that systemd ignores:
//!   `X_ACKGATE_ACCEPT=n` (the worker is ready for n new connections in all since it started:
//!   the supervisor accepts only that many, so that connections the worker has no room for
//!   wait in the kernel's accept queue, as they did when the worker accepted them itself),
//!   `X_ACKGATE_PREPARED=1` (a worker started for an upgrade is ready to take over) and
//!   `X_ACKGATE_UPGRADE=1` (the admin API asks for an upgrade).
//! - Supervisor → worker: one [`Control`] message per datagram on a `SOCK_SEQPACKET` pair,
//!   each sender connection with its descriptor attached.

use super::names;

/// A message from the supervisor to its worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// A sender connection (descriptor attached), new or served by an earlier worker; its
    /// name says which and what state it is in ([`names::ConnState`]).
    Conn(String),
    /// Every connection an earlier worker left has been sent (this many): staged partial
    /// requests of any other connection belong to connections that are gone.
    Adopted(u64),
    /// Upgrade: park every connection with nothing owed, hand its state back, and exit.
    Handover,
    /// A worker started for an upgrade may open the spool and serve: the old one is gone.
    Activate,
    /// Stop: the accept queue is empty and the listeners are closed; no more connections.
    Drained,
    /// Something the worker should show operators (an upgrade that failed, and why).
    Notice(String),
}

impl Control {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Control::Conn(name) => format!("CONN {name}"),
            Control::Adopted(count) => format!("ADOPTED {count}"),
            Control::Handover => "HANDOVER".to_string(),
            Control::Activate => "ACTIVATE".to_string(),
            Control::Drained => "DRAINED".to_string(),
            Control::Notice(text) => format!("NOTICE {}", one_line(text)),
        }
        .into_bytes()
    }

    pub fn decode(bytes: &[u8]) -> Option<Control> {
        let text = std::str::from_utf8(bytes).ok()?;
        let (verb, arg) = match text.split_once(' ') {
            Some((verb, arg)) => (verb, Some(arg)),
            None => (text, None),
        };
        Some(match (verb, arg) {
            ("CONN", Some(name)) if names::is_valid(name) => Control::Conn(name.to_string()),
            ("ADOPTED", Some(count)) => Control::Adopted(count.parse().ok()?),
            ("HANDOVER", None) => Control::Handover,
            ("ACTIVATE", None) => Control::Activate,
            ("DRAINED", None) => Control::Drained,
            ("NOTICE", Some(text)) => Control::Notice(text.to_string()),
            _ => return None,
        })
    }
}

fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

/// ackgate's own notification variables.
pub const ACCEPT: &str = "X_ACKGATE_ACCEPT";
pub const PREPARED: &str = "X_ACKGATE_PREPARED";
pub const UPGRADE: &str = "X_ACKGATE_UPGRADE";

/// One notification datagram, as the supervisor reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Notification {
    pub ready: bool,
    pub reloading: bool,
    pub stopping: bool,
    pub status: Option<String>,
    pub fdstore: bool,
    pub fdstore_remove: bool,
    pub fdname: Option<String>,
    pub errno: Option<i32>,
    pub monotonic_usec: Option<u64>,
    pub accept: Option<u64>,
    pub prepared: bool,
    pub upgrade: bool,
}

impl Notification {
    /// Parse `KEY=VALUE` lines; unknown keys are ignored, as systemd does.
    pub fn parse(bytes: &[u8]) -> Notification {
        let mut n = Notification::default();
        let text = String::from_utf8_lossy(bytes);
        for line in text.lines() {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            match key {
                "READY" => n.ready = value == "1",
                "RELOADING" => n.reloading = value == "1",
                "STOPPING" => n.stopping = value == "1",
                "STATUS" => n.status = Some(value.to_string()),
                "FDSTORE" => n.fdstore = value == "1",
                "FDSTOREREMOVE" => n.fdstore_remove = value == "1",
                "FDNAME" => n.fdname = Some(value.to_string()),
                "ERRNO" => n.errno = value.parse().ok(),
                "MONOTONIC_USEC" => n.monotonic_usec = value.parse().ok(),
                ACCEPT => n.accept = value.parse().ok(),
                PREPARED => n.prepared = value == "1",
                UPGRADE => n.upgrade = value == "1",
                _ => {}
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_messages_round_trip_and_garbage_is_refused() {
        for message in [
            Control::Conn("conn-0123456789abcdef0011223344556677.auth".into()),
            Control::Adopted(4096),
            Control::Handover,
            Control::Activate,
            Control::Drained,
            Control::Notice("upgrade failed: exit status 1".into()),
        ] {
            assert_eq!(Control::decode(&message.encode()), Some(message));
        }
        assert_eq!(
            Control::decode(&Control::Notice("a\nb".into()).encode()),
            Some(Control::Notice("a b".into()))
        );
        for garbage in [
            &b"CONN"[..],
            b"CONN a:b",
            b"ADOPTED x",
            b"HANDOVER now",
            b"\xff",
        ] {
            assert_eq!(Control::decode(garbage), None, "{garbage:?}");
        }
    }

    #[test]
    fn notifications_read_like_systemd_reads_them() {
        let n = Notification::parse(
            b"FDSTORE=1\nFDNAME=listen-tcp\nX_ACKGATE_ACCEPT=16\nBOGUS=1\nnot a line\n",
        );
        assert!(n.fdstore);
        assert_eq!(n.fdname.as_deref(), Some("listen-tcp"));
        assert_eq!(n.accept, Some(16));
        assert!(!n.ready);
        let n = Notification::parse(b"RELOADING=1\nMONOTONIC_USEC=123\n");
        assert!(n.reloading);
        assert_eq!(n.monotonic_usec, Some(123));
        let n = Notification::parse(b"READY=1\nSTATUS=relaying\n");
        assert!(n.ready);
        assert_eq!(n.status.as_deref(), Some("relaying"));
    }
}
