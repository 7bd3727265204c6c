//! Ports the tests own. A port always comes from a socket the test holds (or from the ready
//! line of the process that bound it): never "bind port 0, close, hand the number on", which
//! races with every other test binding ports at the same time.
//!
//! [`ReservedPort`] is a TCP socket on 127.0.0.1 that is bound but not listening: the kernel
//! refuses connects to it (RST, like an aggregator that is down) and gives the port to no one
//! else. An [`Aggregator`](super::Aggregator) started on it listens on that very socket, and
//! stops listening on it again when stopped, so a restart needs no rebind either.

use std::net::SocketAddr;

use socket2::{Domain, Socket, Type};

/// A bound, not listening TCP socket on 127.0.0.1: an address where nothing listens yet.
pub struct ReservedPort {
    socket: Socket,
    addr: SocketAddr,
}

impl ReservedPort {
    /// A fresh port. It is bound explicitly (not as port 0), so that when a listener on it stops
    /// listening (`shutdown(SHUT_RD)` on Linux) the socket keeps the port: the kernel releases
    /// an automatically chosen port at that moment, an explicitly bound one it keeps.
    pub fn new() -> ReservedPort {
        // The kernel picks the number for a first socket; a second one binds that number
        // explicitly while the first still holds it (both have SO_REUSEADDR and neither
        // listens, which Linux allows), and the first goes.
        let probe = reusable_socket();
        probe
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .expect("bind a port");
        let addr = probe
            .local_addr()
            .expect("local addr")
            .as_socket()
            .expect("inet");
        let port = ReservedPort::hold(addr);
        drop(probe);
        port
    }

    /// Bind `addr` again while the process that listened on it is down (a killed receiver or
    /// ackgate that will be restarted on the same port), so that no other socket takes it in
    /// the meantime. The process can bind it again while this is held, since it is not
    /// listening: tokio's listeners set SO_REUSEADDR, as this does. Panics if the port is
    /// taken already.
    pub fn hold(addr: SocketAddr) -> ReservedPort {
        let socket = reusable_socket();
        socket
            .bind(&addr.into())
            .unwrap_or_else(|e| panic!("cannot reserve {addr} again: {e}"));
        ReservedPort { socket, addr }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound socket, for a listener that takes the port over.
    pub fn into_socket(self) -> Socket {
        self.socket
    }
}

impl Default for ReservedPort {
    fn default() -> Self {
        ReservedPort::new()
    }
}

fn reusable_socket() -> Socket {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    socket.set_reuse_address(true).expect("SO_REUSEADDR");
    socket
}
