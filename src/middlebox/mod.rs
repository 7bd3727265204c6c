//! What ackgate needs to sit in a path as a middlebox (README, "Transparent mode"): the
//! original destination of a connection that iptables/nftables `REDIRECT` sent here, the
//! `SO_MARK` that keeps its own upstream sockets out of such a rule, and the registry of its own
//! upstream source addresses by which ingress recognises a loop (an upstream connection or
//! heartbeat of ours that came back in).
//!
//! Owns no socket: it reads and sets options on sockets others own. Must not: accept or refuse
//! anything itself (ingress decides, with what this reports). [`check`] is `ackgate check`'s
//! advice on this host's capability and nat rules.

pub mod check;

use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::{Mutex, OnceLock};

use socket2::SockRef;

/// Where a redirected connection was going, or `None` when it came to ackgate directly: no
/// conntrack NAT entry (`ENOENT`, also when conntrack is not loaded) or an original
/// destination that is the listener's own address. Canonical ([`canonical_addr`]: no IPv6
/// flow info or scope, v4-mapped as IPv4), as the spool stores it, so that a destination read
/// here and one read back from a record are equal.
pub fn original_destination<'a>(
    socket: impl Into<SockRef<'a>>,
    local: SocketAddr,
) -> io::Result<Option<SocketAddr>> {
    let socket = socket.into();
    // An IPv4 connection on a dual-stack listener has a v4-mapped local address and an IPv4
    // conntrack entry.
    let original = match local.ip().to_canonical() {
        IpAddr::V4(_) => socket.original_dst_v4(),
        IpAddr::V6(_) => socket.original_dst_v6(),
    };
    let original = match original {
        Ok(address) => address.as_socket(),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => None,
        Err(e) => return Err(e),
    };
    Ok(original
        .map(canonical_addr)
        .filter(|address| !same_endpoint(*address, local)))
}

fn same_endpoint(a: SocketAddr, b: SocketAddr) -> bool {
    canonical_addr(a) == canonical_addr(b)
}

/// Set `SO_MARK` (`upstream.socket_mark`) on a socket ackgate opens towards an aggregator, so
/// a `REDIRECT` rule that excludes the mark lets it through. Needs CAP_NET_ADMIN: `EPERM`
/// without it.
pub fn set_mark<'a>(socket: impl Into<SockRef<'a>>, mark: u32) -> io::Result<()> {
    socket.into().set_mark(mark)
}

/// Whether `error` from [`set_mark`] means the capability is missing.
pub fn is_permission_error(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES))
}

/// Local ports of ackgate's own upstream sockets (TCP connections and UDP heartbeat sockets):
/// a connection or datagram that arrives at ingress from one of them, on an address of this
/// host, is ours, redirected back in. Ports are registered when bound, before the connect, so
/// the redirected SYN cannot be accepted before its port is known.
#[derive(Default)]
pub struct OwnSources {
    tcp_ports: Mutex<HashSet<u16>>,
    udp_ports: Mutex<HashSet<u16>>,
}

/// The process-wide registry.
pub fn own_sources() -> &'static OwnSources {
    static OWN: OnceLock<OwnSources> = OnceLock::new();
    OWN.get_or_init(OwnSources::default)
}

/// Keeps an upstream connection's local port in [`OwnSources`] until dropped.
#[derive(Debug)]
pub struct OwnSource {
    port: u16,
}

impl Drop for OwnSource {
    fn drop(&mut self) {
        lock(&own_sources().tcp_ports).remove(&self.port);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The sets stay consistent whatever panicked while holding them.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl OwnSources {
    /// Remember the local port of an upstream TCP socket (bound, not yet connected) while the
    /// guard lives.
    pub fn register_tcp_port(&'static self, port: u16) -> OwnSource {
        lock(&self.tcp_ports).insert(port);
        OwnSource { port }
    }

    /// Remember the local port of an upstream UDP heartbeat socket (for the process's life).
    pub fn register_udp_port(&self, port: u16) {
        lock(&self.udp_ports).insert(port);
    }

    /// Whether a connection from `peer` is one of ours.
    pub fn is_own_tcp(&self, peer: SocketAddr) -> bool {
        lock(&self.tcp_ports).contains(&peer.port()) && is_local(peer.ip())
    }

    /// Whether a datagram from `peer` came from one of our heartbeat sockets.
    pub fn is_own_udp(&self, peer: SocketAddr) -> bool {
        lock(&self.udp_ports).contains(&peer.port()) && is_local(peer.ip())
    }
}

/// Whether `ip` is an address of this host (only a local address can be bound).
fn is_local(ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    ip.is_loopback() || UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// `address` with a v4-mapped IPv6 address as the IPv4 address it maps, and no IPv6 flow info
/// or scope id (`SocketAddr::new` sets them to 0).
pub fn canonical_addr(address: SocketAddr) -> SocketAddr {
    SocketAddr::new(address.ip().to_canonical(), address.port())
}

/// Whether this process may set `SO_MARK` (CAP_NET_ADMIN in its effective set), from
/// /proc/self/status; `None` if that cannot be read.
pub fn has_net_admin() -> Option<bool> {
    const CAP_NET_ADMIN: u32 = 12;
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))?
        .trim();
    let bits = u64::from_str_radix(effective, 16).ok()?;
    Some(bits & (1 << CAP_NET_ADMIN) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_not_redirected_has_no_original_destination() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let local = listener.local_addr().unwrap();
        let _client = std::net::TcpStream::connect(local).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        // Without a NAT entry the kernel says ENOENT (or, with conntrack tracking the
        // connection but not translating it, the listener's own address): both mean direct.
        assert_eq!(original_destination(&accepted, local).unwrap(), None);
    }

    #[test]
    fn an_own_connection_is_recognised_while_registered_and_in_either_ip_form() {
        let guard = own_sources().register_tcp_port(40001);
        assert!(own_sources().is_own_tcp("127.0.0.1:40001".parse().unwrap()));
        assert!(own_sources().is_own_tcp("[::ffff:127.0.0.1]:40001".parse().unwrap()));
        assert!(!own_sources().is_own_tcp("127.0.0.1:40002".parse().unwrap()));
        // 192.0.2.0/24 (TEST-NET-1) is never an address of this host: another host's sender
        // may use the same source port.
        assert!(!own_sources().is_own_tcp("192.0.2.7:40001".parse().unwrap()));
        drop(guard);
        assert!(!own_sources().is_own_tcp("127.0.0.1:40001".parse().unwrap()));
    }

    #[test]
    fn a_heartbeat_is_ours_only_from_our_port_on_a_local_address() {
        let own = OwnSources::default();
        own.register_udp_port(40004);
        assert!(own.is_own_udp("127.0.0.1:40004".parse().unwrap()));
        assert!(!own.is_own_udp("127.0.0.1:40005".parse().unwrap()));
        // 192.0.2.0/24 (TEST-NET-1) is never an address of this host.
        assert!(!own.is_own_udp("192.0.2.7:40004".parse().unwrap()));
    }

    #[test]
    fn the_capability_check_reads_this_process() {
        assert!(has_net_admin().is_some());
    }
}
