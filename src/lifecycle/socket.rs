//! The Unix sockets of the lifecycle protocols, over nix's `sendmsg`/`recvmsg` with
//! `SCM_RIGHTS`: the notification socket (`NOTIFY_SOCKET`, a datagram socket, as systemd's),
//! the supervisor's control channel to its worker (a `SOCK_SEQPACKET` pair: ordered, reliable,
//! one message per datagram), and sending to either. No protocol here, only bytes and
//! descriptors; imports nothing of the relay.

use std::ffi::OsStr;
use std::io;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

use nix::sys::socket::{
    bind, recvmsg, sendmsg, setsockopt, socket, socketpair, sockopt, AddressFamily, ControlMessage,
    ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
};

/// Largest message either side sends (a notification with a name, a control message).
const MAX_MESSAGE: usize = 4096;
/// Most descriptors one message carries.
const MAX_FDS: usize = 16;

/// One message received, with the descriptors that came with it and the sender's pid (when
/// the socket asked for credentials).
#[derive(Debug)]
pub struct Packet {
    pub bytes: Vec<u8>,
    pub fds: Vec<OwnedFd>,
    pub pid: Option<i32>,
}

/// A connected `SOCK_SEQPACKET` pair, non-blocking and close-on-exec: the control channel.
pub fn control_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
    )?)
}

/// A datagram socket bound to a fresh abstract address, receiving senders' credentials: the
/// supervisor's `NOTIFY_SOCKET`. Returns it and the variable's value (`@…`).
pub fn notify_socket() -> io::Result<(OwnedFd, String)> {
    let fd = socket(
        AddressFamily::Unix,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    setsockopt(&fd, sockopt::PassCred, &true)?;
    let name = format!(
        "ackgate/notify/{}/{:016x}",
        std::process::id(),
        rand::random::<u64>()
    );
    bind(fd.as_raw_fd(), &UnixAddr::new_abstract(name.as_bytes())?)?;
    Ok((fd, format!("@{name}")))
}

/// The `NOTIFY_SOCKET` value of a socket bound by [`notify_socket`] (kept across the
/// supervisor's re-execution).
pub fn bound_abstract_name(socket: BorrowedFd<'_>) -> io::Result<String> {
    let address: UnixAddr = nix::sys::socket::getsockname(socket.as_raw_fd())?;
    match address.as_abstract() {
        Some(name) => Ok(format!("@{}", String::from_utf8_lossy(name))),
        None => Err(io::Error::other(
            "the notification socket has no abstract name",
        )),
    }
}

/// The address `NOTIFY_SOCKET` names: a path, or an abstract name after `@`.
pub fn notify_address(value: &OsStr) -> io::Result<UnixAddr> {
    let bytes = value.as_bytes();
    Ok(match bytes.strip_prefix(b"@") {
        Some(name) => UnixAddr::new_abstract(name)?,
        None => UnixAddr::new(bytes)?,
    })
}

/// An unbound datagram socket to send notifications from (blocking: a sender waits while the
/// receiver's queue is full rather than lose a notification).
pub fn datagram_sender() -> io::Result<OwnedFd> {
    Ok(socket(
        AddressFamily::Unix,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

/// Send one message with `fds` attached, to `to` (a datagram socket) or on a connected one.
pub fn send(
    socket: BorrowedFd<'_>,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
    to: Option<&UnixAddr>,
) -> io::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
    let iov = [IoSlice::new(bytes)];
    let sent = sendmsg(socket.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, to)?;
    if sent != bytes.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "message sent in part",
        ));
    }
    Ok(())
}

/// Receive one message (`WouldBlock` when none is waiting on a non-blocking socket).
/// Descriptors arrive close-on-exec.
pub fn receive(socket: BorrowedFd<'_>) -> io::Result<Packet> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS], nix::sys::socket::UnixCredentials);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let len = msg.bytes;
    let mut fds = Vec::new();
    let mut pid = None;
    for cmsg in msg.cmsgs()? {
        match cmsg {
            ControlMessageOwned::ScmRights(received) => {
                // SAFETY: the kernel has just installed these descriptors in this process for
                // this message; nothing else refers to them, so each gets exactly one owner.
                fds.extend(
                    received
                        .into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
            ControlMessageOwned::ScmCredentials(credentials) => pid = Some(credentials.pid()),
            _ => {}
        }
    }
    buf.truncate(len);
    Ok(Packet {
        bytes: buf,
        fds,
        pid,
    })
}

/// Register a descriptor this process owns with the runtime's reactor.
pub fn reactor<T: AsRawFd>(
    inner: T,
    interest: tokio::io::Interest,
) -> io::Result<tokio::io::unix::AsyncFd<T>> {
    // SAFETY: every caller hands over a descriptor it owns (an `OwnedFd`, or a type that owns
    // one), and the `AsyncFd` that takes it owns it from then on: it is neither closed nor
    // replaced while registered.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(inner, interest) }
        .map_err(|e| e.into_parts().1)
}

/// Whether an error means "try again later" on a non-blocking socket (the queue is full, or
/// too many descriptors are in flight for this user).
pub fn is_busy(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EAGAIN) | Some(libc::ETOOMANYREFS) | Some(libc::ENOBUFS)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn messages_carry_their_descriptors_and_the_senders_pid() {
        let (notify, address) = notify_socket().unwrap();
        let to = notify_address(OsStr::new(&address)).unwrap();
        let sender = datagram_sender().unwrap();
        let (a, b) = control_pair().unwrap();
        send(
            sender.as_fd(),
            b"FDSTORE=1\nFDNAME=x\n",
            &[a.as_fd()],
            Some(&to),
        )
        .unwrap();
        let packet = receive(notify.as_fd()).unwrap();
        assert_eq!(packet.bytes, b"FDSTORE=1\nFDNAME=x\n");
        assert_eq!(packet.pid, Some(std::process::id() as i32));
        assert_eq!(packet.fds.len(), 1);
        // The descriptor received is the same socket: a message sent on it reaches `b`.
        send(packet.fds[0].as_fd(), b"CONN x", &[], None).unwrap();
        assert_eq!(receive(b.as_fd()).unwrap().bytes, b"CONN x");
        let empty = receive(notify.as_fd()).unwrap_err();
        assert!(is_busy(&empty), "{empty}");
    }
}
