//! The worker's listening sockets: the ones its supervisor holds (inherited through
//! `LISTEN_FDS`), or, on a first start, bound here and left with the supervisor
//! (`FDSTORE=1`), so that every later worker (after a crash, a reload-free restart, an upgrade)
//! finds them open, their queues intact. The TCP listener is the supervisor's to accept on:
//! the worker only learns its address and closes its own copy (a copy kept here would keep
//! the listener open after a stop closed it).

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};

use anyhow::Context;
use tokio::net::{TcpListener, UdpSocket};
use tracing::{info, warn};

use super::names;
use super::notify;
use crate::config::{Config, IngressConfig};

/// What a worker was handed at start (`LISTEN_FDS`), by name.
#[derive(Default)]
pub struct Inherited {
    /// The supervisor's pid (the service's main pid).
    pub supervisor_pid: Option<u32>,
    pub supervisor: Option<OwnedFd>,
    pub tcp: Vec<OwnedFd>,
    pub udp: Option<OwnedFd>,
    pub admin: Option<OwnedFd>,
}

impl Inherited {
    /// Read `LISTEN_FDS`/`LISTEN_FDNAMES` (for this pid only) and unset them. Must run before
    /// any thread exists (it changes the environment).
    pub fn take() -> std::io::Result<Inherited> {
        let mut inherited = Inherited::default();
        let fds = sd_notify::listen_fds_with_names();
        for variable in ["LISTEN_FDS", "LISTEN_FDNAMES", "LISTEN_PID"] {
            std::env::remove_var(variable);
        }
        for (fd, name) in fds? {
            // SAFETY: LISTEN_FDS hands these descriptors to this process (LISTEN_PID is ours,
            // checked by sd-notify) for it alone to own; each is wrapped exactly once.
            let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            match name.as_str() {
                names::SUPERVISOR => inherited.supervisor = Some(fd),
                names::LISTEN_TCP => inherited.tcp.push(fd),
                names::LISTEN_UDP => inherited.udp = Some(fd),
                names::ADMIN => inherited.admin = Some(fd),
                other => warn!(
                    name = other,
                    "ignoring an inherited descriptor of unknown name"
                ),
            }
        }
        Ok(inherited)
    }
}

/// The ingress sockets a worker serves with.
pub struct Ingress {
    /// Where senders connect (the first TCP listener's address).
    pub local: SocketAddr,
    /// The UDP heartbeat socket, when `ingress.udp_heartbeat` is on.
    pub udp: Option<UdpSocket>,
}

/// The inherited listeners, or new ones bound on `ingress.listen` and stored with the
/// supervisor.
pub async fn ingress(
    config: &IngressConfig,
    tcp: Vec<OwnedFd>,
    udp: Option<OwnedFd>,
) -> anyhow::Result<Ingress> {
    let (local, udp) = match tcp.first() {
        Some(listener) => {
            let local = socket2::SockRef::from(listener)
                .local_addr()?
                .as_socket()
                .context("the inherited TCP listener has no IP address")?;
            if local != config.listen && config.listen.port() != 0 {
                warn!(%local, configured = %config.listen, "listening where the held socket listens; ingress.listen takes effect after a stop and a start");
            }
            (local, udp.map(std::net::UdpSocket::from))
        }
        None => {
            let (listener, udp) = crate::ingress::bind(config)
                .await
                .with_context(|| format!("cannot listen on {}", config.listen))?;
            notify::store(names::LISTEN_TCP, listener.as_fd());
            let local = listener.local_addr()?;
            let udp = match udp {
                Some(socket) => {
                    notify::store(names::LISTEN_UDP, socket.as_fd());
                    Some(socket.into_std()?)
                }
                None => None,
            };
            (local, udp)
        }
    };
    drop(tcp);
    let udp = match (config.udp_heartbeat, udp) {
        (false, _) => None,
        (true, Some(socket)) => {
            socket.set_nonblocking(true)?;
            Some(UdpSocket::from_std(socket)?)
        }
        (true, None) => {
            // A socket unit with a ListenStream= and no ListenDatagram=: heartbeats on the
            // same port, bound here and kept by the supervisor from now on.
            let socket = UdpSocket::bind(local)
                .await
                .with_context(|| format!("cannot bind the UDP heartbeat socket on {local}"))?;
            notify::store(names::LISTEN_UDP, socket.as_fd());
            Some(socket)
        }
    };
    Ok(Ingress { local, udp })
}

/// The admin listener: the inherited one if it listens where `[admin] listen` says, else a
/// new one (stored with the supervisor in place of the old).
pub async fn admin(
    config: &Config,
    inherited: Option<OwnedFd>,
) -> anyhow::Result<Option<TcpListener>> {
    let Some(admin) = config.admin() else {
        if inherited.is_some() {
            notify::unstore(names::ADMIN);
        }
        return Ok(None);
    };
    if let Some(fd) = inherited {
        let listener = std::net::TcpListener::from(fd);
        let same = listener
            .local_addr()
            .is_ok_and(|local| local == admin.listen || admin.listen.port() == 0);
        if same {
            listener.set_nonblocking(true)?;
            return Ok(Some(TcpListener::from_std(listener)?));
        }
        info!(listen = %admin.listen, "admin.listen changed: binding the new address");
        notify::unstore(names::ADMIN);
    }
    let listener = TcpListener::bind(admin.listen)
        .await
        .with_context(|| format!("cannot listen on admin.listen {}", admin.listen))?;
    notify::store(names::ADMIN, listener.as_fd());
    Ok(Some(listener))
}
