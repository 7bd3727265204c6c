//! The UDP heartbeat responder: every datagram is answered with one `\0`, from the address
//! and port the datagram was delivered to (PROTOCOL.md §8.1). A legacy sender ignores a reply
//! from anywhere else and detaches the node.
//!
//! On a socket bound to one address that is automatic. On one bound to 0.0.0.0 or [::] the
//! kernel would pick the reply's source by route, so the reply carries the delivered-to
//! address in IP_PKTINFO / IPV6_PKTINFO. That is also what makes a heartbeat redirected by
//! iptables/nftables come back with the aggregator's address: conntrack translates a reply only
//! when it leaves from the address the datagram was redirected to (README, "Transparent mode").

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;

use nix::sys::socket::{
    recvmsg, sendmsg, setsockopt, sockopt, ControlMessage, ControlMessageOwned, MsgFlags,
    SockaddrStorage,
};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::middlebox::own_sources;
use crate::spool::Spool;

/// Where a datagram was delivered: the source its reply must have.
#[derive(Debug, Clone, Copy)]
enum DeliveredTo {
    /// The socket is bound to one address: a plain `send_to` leaves from it.
    Socket,
    V4(libc::in_pktinfo),
    V6(libc::in6_pktinfo),
}

/// Answer every datagram with one `\0` from the address it was delivered to — but only while
/// ackgate can take data: with the spool full (or its disk full) heartbeats go unanswered, so
/// senders with a standby fail over instead of piling onto this box (§13.7). A heartbeat of
/// ackgate's own, redirected back in, is never answered (it would keep a dead node alive). After
/// shutdown, none at all.
pub async fn run_udp_heartbeat(socket: UdpSocket, spool: Spool, shutdown: CancellationToken) {
    let with_pktinfo = match enable_pktinfo(&socket) {
        Ok(enabled) => enabled,
        Err(e) => {
            warn!(error = %e, "cannot enable IP_PKTINFO on the UDP heartbeat socket; replies leave from the routed address");
            false
        }
    };
    let mut silent = false;
    let mut told_loop = false;
    let mut buf = [0u8; 128];
    loop {
        let received = tokio::select! {
            r = receive(&socket, &mut buf, with_pktinfo) => r,
            _ = shutdown.cancelled() => return,
        };
        let (from, delivered_to) = match received {
            Ok(pair) => pair,
            Err(e) => {
                // ICMP port unreachable from an earlier reply shows up here on Linux; harmless.
                debug!(error = %e, "heartbeat receive error");
                continue;
            }
        };
        if own_sources().is_own_udp(from) {
            if !told_loop {
                told_loop = true;
                error!(%from, "UDP heartbeat from ackgate's own upstream heartbeat socket came back into its ingress: loop; not answered. Exclude ackgate's traffic from the REDIRECT rule (upstream.socket_mark or an owner match)");
            }
            continue;
        }
        if spool_full(&spool, &mut silent) {
            continue;
        }
        if let Err(e) = reply(&socket, from, delivered_to).await {
            debug!(%from, error = %e, "heartbeat reply failed");
        }
    }
}

/// Whether the spool is full now; logs each change.
fn spool_full(spool: &Spool, silent: &mut bool) -> bool {
    let stats = spool.stats();
    if stats.full != *silent {
        *silent = stats.full;
        if stats.full {
            warn!(
                bytes = stats.bytes,
                max_bytes = stats.max_bytes,
                disk_full = stats.disk_full,
                "spool full: UDP heartbeats go unanswered so senders fail over"
            );
        } else {
            info!("spool has room again: answering UDP heartbeats");
        }
    }
    stats.full
}

/// Ask for each datagram's delivered-to address when the socket is bound to a wildcard.
fn enable_pktinfo(socket: &UdpSocket) -> io::Result<bool> {
    let local = socket.local_addr()?;
    if !local.ip().is_unspecified() {
        return Ok(false);
    }
    match local.ip() {
        IpAddr::V4(_) => setsockopt(socket, sockopt::Ipv4PacketInfo, &true)?,
        IpAddr::V6(_) => setsockopt(socket, sockopt::Ipv6RecvPacketInfo, &true)?,
    }
    Ok(true)
}

async fn receive(
    socket: &UdpSocket,
    buf: &mut [u8],
    with_pktinfo: bool,
) -> io::Result<(SocketAddr, DeliveredTo)> {
    if !with_pktinfo {
        let (_, from) = socket.recv_from(buf).await?;
        return Ok((from, DeliveredTo::Socket));
    }
    socket
        .async_io(Interest::READABLE, || receive_with_pktinfo(socket, buf))
        .await
}

fn receive_with_pktinfo(
    socket: &UdpSocket,
    buf: &mut [u8],
) -> io::Result<(SocketAddr, DeliveredTo)> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut control = nix::cmsg_space!(libc::in6_pktinfo);
    let message = recvmsg::<SockaddrStorage>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut control),
        MsgFlags::MSG_DONTWAIT,
    )?;
    let from = message
        .address
        .as_ref()
        .and_then(socket_addr)
        .ok_or_else(|| io::Error::other("datagram without a source address"))?;
    let mut delivered_to = DeliveredTo::Socket;
    for control in message.cmsgs()? {
        match control {
            ControlMessageOwned::Ipv4PacketInfo(info) => delivered_to = DeliveredTo::V4(info),
            ControlMessageOwned::Ipv6PacketInfo(info) => delivered_to = DeliveredTo::V6(info),
            _ => {}
        }
    }
    Ok((from, delivered_to))
}

fn socket_addr(address: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = address.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    address
        .as_sockaddr_in6()
        .map(|v6| SocketAddr::V6((*v6).into()))
}

async fn reply(socket: &UdpSocket, to: SocketAddr, delivered_to: DeliveredTo) -> io::Result<()> {
    let pktinfo = match delivered_to {
        DeliveredTo::Socket => {
            socket.send_to(b"\0", to).await?;
            return Ok(());
        }
        // The reply's source is the datagram's destination; the route picks the interface.
        DeliveredTo::V4(info) => DeliveredTo::V4(libc::in_pktinfo {
            ipi_ifindex: 0,
            ipi_spec_dst: info.ipi_addr,
            ipi_addr: libc::in_addr { s_addr: 0 },
        }),
        // An IPv6 source must keep its interface (a link-local address needs it).
        DeliveredTo::V6(info) => DeliveredTo::V6(info),
    };
    let destination = SockaddrStorage::from(to);
    socket
        .async_io(Interest::WRITABLE, || {
            let iov = [IoSlice::new(b"\0")];
            let control = match &pktinfo {
                DeliveredTo::V4(info) => [ControlMessage::Ipv4PacketInfo(info)],
                DeliveredTo::V6(info) => [ControlMessage::Ipv6PacketInfo(info)],
                DeliveredTo::Socket => return Ok(0),
            };
            Ok(sendmsg(
                socket.as_raw_fd(),
                &iov,
                &control,
                MsgFlags::MSG_DONTWAIT,
                Some(&destination),
            )?)
        })
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wildcard-bound responder answers from the address the datagram was sent to: here
    /// 127.0.0.2, which routing alone would not pick for a reply to 127.0.0.1.
    #[tokio::test]
    async fn a_wildcard_socket_replies_from_the_address_the_datagram_was_sent_to() {
        let responder = UdpSocket::bind("0.0.0.0:0").await.unwrap();
        assert!(enable_pktinfo(&responder).unwrap());
        let port = responder.local_addr().unwrap().port();
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sender
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        // A connected socket only takes datagrams from the address it sent to, like fluentd's.
        sender.connect(("127.0.0.2", port)).unwrap();
        sender.send(b"\0").unwrap();
        let mut buf = [0u8; 16];
        let (from, delivered_to) = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            receive(&responder, &mut buf, true),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(from, sender.local_addr().unwrap());
        reply(&responder, from, delivered_to).await.unwrap();
        let mut reply_buf = [0u8; 16];
        let n = sender.recv(&mut reply_buf).unwrap();
        assert_eq!(&reply_buf[..n], b"\0");
    }
}
