//! What the supervisor holds for its worker: the listening sockets and every sender
//! connection, each under its name. A connection is let go when its socket hangs up (the
//! worker finished it with shutdown(2), or the peer reset it): held connections sit in an epoll
//! set with no events asked for, where only `EPOLLHUP`/`EPOLLERR` are reported, so the
//! supervisor is not woken by the data that flows on them.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::lifecycle::names::{self, ConnId};
use crate::lifecycle::socket;

/// A listening socket (or the UDP heartbeat socket, or the admin listener).
pub struct Listener {
    pub name: String,
    pub fd: OwnedFd,
    /// Handed over by systemd's socket unit: systemd keeps it open across a stop, so a stop
    /// leaves it alone (connections wait in its queue for the next start).
    pub activated: bool,
}

struct Held {
    name: String,
    fd: OwnedFd,
}

/// The epoll set of held connections, pollable by tokio.
struct HangUps(Epoll);

impl AsRawFd for HangUps {
    fn as_raw_fd(&self) -> RawFd {
        self.0 .0.as_raw_fd()
    }
}

pub struct Holdings {
    pub listeners: Vec<Listener>,
    connections: HashMap<ConnId, Held>,
    /// Each connection's key in the epoll set (its id's low 64 bits, random like the id).
    keys: HashMap<u64, ConnId>,
    hangups: AsyncFd<HangUps>,
}

impl Holdings {
    pub fn new() -> io::Result<Holdings> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        Ok(Holdings {
            listeners: Vec::new(),
            connections: HashMap::new(),
            keys: HashMap::new(),
            hangups: socket::reactor(HangUps(epoll), Interest::READABLE)?,
        })
    }

    /// Keep a listener; a second copy of one already held (same socket) is dropped.
    pub fn hold_listener(&mut self, listener: Listener) {
        let inode = socket_inode(listener.fd.as_fd());
        if inode.is_some()
            && self
                .listeners
                .iter()
                .any(|l| socket_inode(l.fd.as_fd()) == inode)
        {
            return;
        }
        self.listeners.push(listener);
    }

    /// Let a listener go by name (the worker replaced it).
    pub fn release_listener(&mut self, name: &str) -> bool {
        let before = self.listeners.len();
        self.listeners.retain(|l| l.name != name);
        self.listeners.len() != before
    }

    /// Keep a connection under `name` (or rename it, when it is held already: then its old
    /// name is returned).
    pub fn hold(&mut self, id: ConnId, name: String, fd: OwnedFd) -> io::Result<Option<String>> {
        if let Some(held) = self.connections.get_mut(&id) {
            return Ok(Some(std::mem::replace(&mut held.name, name)));
        }
        let key = id.0 as u64;
        self.hangups
            .get_ref()
            .0
            .add(&fd, EpollEvent::new(EpollFlags::empty(), key))?;
        self.keys.insert(key, id);
        self.connections.insert(id, Held { name, fd });
        Ok(None)
    }

    /// Let a connection go (closing this copy of it).
    pub fn release(&mut self, id: ConnId) -> bool {
        match self.connections.remove(&id) {
            Some(held) => {
                let _ = self.hangups.get_ref().0.delete(&held.fd);
                self.keys.remove(&(id.0 as u64));
                true
            }
            None => false,
        }
    }

    pub fn connection(&self, id: ConnId) -> Option<(&str, BorrowedFd<'_>)> {
        self.connections
            .get(&id)
            .map(|held| (held.name.as_str(), held.fd.as_fd()))
    }

    pub fn connection_ids(&self) -> Vec<ConnId> {
        self.connections.keys().copied().collect()
    }

    pub fn connection_count(&self) -> usize {
        self.connections.len()
    }

    /// Every connection and its name (for the supervisor's own re-execution).
    pub fn connections(&self) -> impl Iterator<Item = (&str, BorrowedFd<'_>)> {
        self.connections
            .values()
            .map(|held| (held.name.as_str(), held.fd.as_fd()))
    }

    /// Resolves when some held connection has hung up.
    pub async fn hung_up(&self) {
        if let Ok(mut guard) = self.hangups.readable().await {
            // Leave the readiness set: `release_hung_up` clears it once the set is empty.
            guard.retain_ready();
        }
    }

    /// Let go of every connection that hung up; returns how many.
    pub fn release_hung_up(&mut self) -> usize {
        let mut released = 0;
        loop {
            let mut events = [EpollEvent::empty(); 64];
            let ready = self
                .hangups
                .try_io(Interest::READABLE, |set| {
                    // An error clears the readiness like "nothing more" (it cannot spin).
                    match set.0.wait(&mut events, nix::sys::epoll::EpollTimeout::ZERO) {
                        Ok(0) | Err(_) => Err(io::ErrorKind::WouldBlock.into()),
                        Ok(n) => Ok(n),
                    }
                })
                .unwrap_or(0);
            if ready == 0 {
                return released;
            }
            for event in &events[..ready] {
                if let Some(id) = self.keys.get(&event.data()).copied() {
                    released += usize::from(self.release(id));
                }
            }
        }
    }
}

/// A socket's inode number: the same socket received twice has the same one.
pub fn socket_inode(fd: BorrowedFd<'_>) -> Option<u64> {
    nix::sys::stat::fstat(fd).ok().map(|st| st.st_ino)
}

/// The name a descriptor inherited from systemd gets here: its own name if it is one of
/// ackgate's, else one picked by its kind (a socket unit's names are the operator's).
pub fn classify(fd: BorrowedFd<'_>, name: &str) -> Option<String> {
    if name == names::LISTEN_TCP
        || name == names::LISTEN_UDP
        || name == names::ADMIN
        || names::conn_id(name).is_some()
    {
        return Some(name.to_string());
    }
    use nix::sys::socket::{getsockopt, sockopt};
    let kind = getsockopt(&fd, sockopt::SockType).ok()?;
    match kind {
        nix::sys::socket::SockType::Stream => {
            if getsockopt(&fd, sockopt::AcceptConn).unwrap_or(false) {
                Some(names::LISTEN_TCP.to_string())
            } else {
                // A connection stored without a name (systemd before 227 has no FDNAME).
                Some(names::ConnState::new(ConnId::random()).name())
            }
        }
        nix::sys::socket::SockType::Datagram => Some(names::LISTEN_UDP.to_string()),
        _ => None,
    }
}
