//! The names of the descriptors that outlive a worker (invariant 10), as `FDNAME=` in a
//! `FDSTORE=1` notification and in `LISTEN_FDNAMES`: what each one is, and for a sender
//! connection, the state a worker needs to go on serving it.
//!
//! systemd allows any printable ASCII but `:` in a name (`LISTEN_FDNAMES` is `:`-separated),
//! at most 255 bytes. A connection's state fits: its id, how far the shared-key handshake got
//! (the HELO's nonce and salt are needed to check the PING that answers it), and whether it
//! speaks JSON. Everything here is pure, and a name that does not parse is reported, never a
//! panic: names come from the environment and from other processes.

use std::fmt;

/// The TCP listener for Forward traffic.
pub const LISTEN_TCP: &str = "listen-tcp";
/// The UDP socket that answers heartbeats.
pub const LISTEN_UDP: &str = "listen-udp";
/// The admin listener.
pub const ADMIN: &str = "admin";
/// The worker's end of its supervisor's control channel.
pub const SUPERVISOR: &str = "supervisor";
/// The supervisor's own notification socket (kept across its re-execution).
pub const NOTIFY: &str = "ackgate-notify";
/// The supervisor's end of its worker's control channel (kept across its re-execution).
pub const CONTROL: &str = "ackgate-control";

const CONN_PREFIX: &str = "conn-";
/// systemd refuses longer names.
const MAX_NAME: usize = 255;

/// A sender connection's identity: random, so that ids never repeat across workers and
/// restarts (a partial request staged in the spool is found again by it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u128);

impl ConnId {
    pub fn random() -> ConnId {
        ConnId(rand::random())
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// How far a connection's shared-key handshake got.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Handshake {
    /// No handshake on this port, or none started.
    #[default]
    None,
    /// HELO written with this nonce and user-auth salt; the PING is awaited.
    Helo { nonce: Vec<u8>, auth: Vec<u8> },
    /// The PING was accepted: requests follow.
    Done,
}

/// What a worker knows of a connection that another worker served before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnState {
    pub id: ConnId,
    pub handshake: Handshake,
    /// The connection's first byte made it a JSON connection (PROTOCOL.md §2.1).
    pub json: bool,
}

impl ConnState {
    pub fn new(id: ConnId) -> ConnState {
        ConnState {
            id,
            handshake: Handshake::None,
            json: false,
        }
    }

    /// The name that carries this state: `conn-<id>[.auth|.helo-<nonce>-<salt>][.json]`.
    pub fn name(&self) -> String {
        let mut name = format!("{CONN_PREFIX}{}", self.id);
        match &self.handshake {
            Handshake::None => {}
            Handshake::Done => name.push_str(".auth"),
            Handshake::Helo { nonce, auth } => {
                name.push_str(".helo-");
                name.push_str(&hex::encode(nonce));
                name.push('-');
                name.push_str(&hex::encode(auth));
            }
        }
        if self.json {
            name.push_str(".json");
        }
        name
    }

    /// Read a connection's name back; `None` if it is not a connection's name or is damaged.
    pub fn parse(name: &str) -> Option<ConnState> {
        let rest = name.strip_prefix(CONN_PREFIX)?;
        let mut parts = rest.split('.');
        let id = parse_id(parts.next()?)?;
        let mut state = ConnState::new(id);
        for part in parts {
            match part {
                "auth" => state.handshake = Handshake::Done,
                "json" => state.json = true,
                helo => {
                    let (nonce, auth) = helo.strip_prefix("helo-")?.split_once('-')?;
                    state.handshake = Handshake::Helo {
                        nonce: hex::decode(nonce).ok()?,
                        auth: hex::decode(auth).ok()?,
                    };
                }
            }
        }
        Some(state)
    }
}

fn parse_id(text: &str) -> Option<ConnId> {
    if text.len() != 32 {
        return None;
    }
    u128::from_str_radix(text, 16).ok().map(ConnId)
}

/// The id of a connection's name, whatever its state (the supervisor keys connections by it).
pub fn conn_id(name: &str) -> Option<ConnId> {
    let rest = name.strip_prefix(CONN_PREFIX)?;
    parse_id(rest.split('.').next()?)
}

/// Whether systemd (and so the supervisor) accepts `name` as an `FDNAME`.
pub fn is_valid(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_survives_its_name() {
        let id = ConnId(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        let states = [
            ConnState::new(id),
            ConnState {
                id,
                handshake: Handshake::Done,
                json: false,
            },
            ConnState {
                id,
                handshake: Handshake::Helo {
                    nonce: vec![0xab; 16],
                    auth: vec![],
                },
                json: false,
            },
            ConnState {
                id,
                handshake: Handshake::Helo {
                    nonce: vec![1; 16],
                    auth: vec![2; 16],
                },
                json: true,
            },
        ];
        for state in states {
            let name = state.name();
            assert!(is_valid(&name), "{name}");
            assert_eq!(ConnState::parse(&name), Some(state.clone()), "{name}");
            assert_eq!(conn_id(&name), Some(id));
        }
        assert_eq!(
            ConnState::new(id).name(),
            "conn-0123456789abcdef0011223344556677"
        );
    }

    #[test]
    fn other_and_damaged_names_are_not_connections() {
        for name in [
            LISTEN_TCP,
            "conn-",
            "conn-12",
            "conn-0123456789abcdef0011223344556677.helo-zz-",
            "conn-0123456789abcdef0011223344556677.helo-ab",
            "conn-0123456789abcdef00112233445566778",
            "ackgate.socket",
        ] {
            assert_eq!(ConnState::parse(name), None, "{name}");
        }
        assert!(!is_valid("a:b"));
        assert!(!is_valid(""));
        assert!(!is_valid(&"x".repeat(256)));
    }
}
