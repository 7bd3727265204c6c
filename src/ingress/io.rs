//! How a connection's bytes come in and its acks go out: the one place that touches the
//! sender's socket (invariant 10).
//!
//! - [`Socket`] in peek mode (plain TCP, on kernels with TCP `SO_PEEK_OFF`, Linux 6.10+):
//!   bytes are read with `MSG_PEEK` from the socket's peek offset, so they stay in the
//!   kernel's receive queue; [`ConnIo::release`] drops them (`MSG_TRUNC`, no copy) once they
//!   are committed or staged durably. A worker that dies leaves every uncommitted byte in a
//!   socket its supervisor still holds; the next worker sets the offset back to 0 and reads
//!   them again. Without the peek offset, [`Socket`] reads plainly.
//! - [`Streamed`] (TLS, tests' pipes): plain reads, which take the bytes out of the kernel at
//!   once; `release` has nothing to do.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// A connection's transport.
pub(crate) trait ConnIo {
    /// Append at most `room` bytes to `buf` (at least one when it returns `Ok(n > 0)`); 0 means
    /// the peer closed.
    async fn fill(&mut self, buf: &mut BytesMut, room: usize) -> io::Result<usize>;

    /// The next `n` bytes of the stream (the oldest filled and not yet released) are stored:
    /// the kernel may drop them.
    fn release(&mut self, n: usize) -> io::Result<()>;

    /// Whether filled bytes stay in the kernel until released (crash-safe reading).
    fn keeps_unreleased(&self) -> bool;

    /// The socket, when it is one the supervisor may hold (plain TCP).
    fn descriptor(&self) -> Option<BorrowedFd<'_>>;

    /// Reset the connection now, if this transport can (false if it cannot).
    fn abort(&mut self) -> bool {
        false
    }

    /// Bytes the kernel holds for this connection, read (peeked) or not (0 if unknown).
    fn queued(&self) -> usize {
        0
    }

    /// Bytes of the stream the kernel has let go of since the connection began (released by
    /// this worker or an earlier one): where the socket's oldest unreleased byte stands.
    fn consumed(&self) -> io::Result<u64> {
        Err(io::ErrorKind::Unsupported.into())
    }

    async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()>;

    /// No more bytes either way (FIN).
    async fn shutdown(&mut self) -> io::Result<()>;
}

/// Plain reads and writes over any stream.
pub(crate) struct Streamed<S>(pub S);

impl<S: AsyncRead + AsyncWrite + Unpin> ConnIo for Streamed<S> {
    async fn fill(&mut self, buf: &mut BytesMut, room: usize) -> io::Result<usize> {
        self.0.read_buf(&mut buf.limit(room)).await
    }

    fn release(&mut self, _n: usize) -> io::Result<()> {
        Ok(())
    }

    fn keeps_unreleased(&self) -> bool {
        false
    }

    fn descriptor(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        AsyncWriteExt::write_all(&mut self.0, bytes).await
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        AsyncWriteExt::shutdown(&mut self.0).await
    }
}

/// The most one release hands the kernel at once.
const RELEASE_SINK_BYTES: usize = 1 << 20;

thread_local! {
    /// Where released bytes "go": MSG_TRUNC on TCP discards without copying, so this buffer
    /// is never written and its zeroed pages are never touched (no memory is spent on it). One
    /// per thread, allocated once: a fresh buffer per release cost an mmap and a munmap.
    static RELEASE_SINK: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0u8; RELEASE_SINK_BYTES].into_boxed_slice());
}

/// A plain TCP socket: peek-then-release reading when `peek`, plain reads otherwise.
pub(crate) struct Socket {
    stream: TcpStream,
    peek: bool,
}

impl Socket {
    /// With `peek`, read `stream` from the start of what the kernel holds: its peek offset
    /// goes to 0 (a connection a dead worker was reading has its offset where that worker
    /// left it).
    pub fn new(stream: TcpStream, peek: bool) -> io::Result<Socket> {
        if peek {
            set_peek_offset(&stream, 0)?;
        }
        Ok(Socket { stream, peek })
    }

    /// The socket back, for a handover (dropping it closes only this copy).
    pub fn into_inner(self) -> TcpStream {
        self.stream
    }
}

impl ConnIo for Socket {
    async fn fill(&mut self, buf: &mut BytesMut, room: usize) -> io::Result<usize> {
        if self.peek {
            PeekReader(&self.stream)
                .read_buf(&mut buf.limit(room))
                .await
        } else {
            self.stream.read_buf(&mut buf.limit(room)).await
        }
    }

    fn release(&mut self, n: usize) -> io::Result<()> {
        if !self.peek {
            return Ok(());
        }
        let mut left = n;
        while left > 0 {
            let dropped = RELEASE_SINK.with_borrow_mut(|sink| {
                let chunk = left.min(sink.len());
                rustix::net::recv(
                    &self.stream,
                    &mut sink[..chunk],
                    rustix::net::RecvFlags::TRUNC | rustix::net::RecvFlags::DONTWAIT,
                )
                .map(|(_, dropped)| dropped)
            })?;
            if dropped == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "released bytes were not in the socket",
                ));
            }
            left = left.saturating_sub(dropped);
        }
        Ok(())
    }

    fn keeps_unreleased(&self) -> bool {
        self.peek
    }

    fn descriptor(&self) -> Option<BorrowedFd<'_>> {
        Some(self.stream.as_fd())
    }

    fn abort(&mut self) -> bool {
        reset(&self.stream).is_ok()
    }

    fn queued(&self) -> usize {
        rustix::io::ioctl_fionread(&self.stream)
            .map_or(0, |n| usize::try_from(n).unwrap_or(usize::MAX))
    }

    fn consumed(&self) -> io::Result<u64> {
        consumed_bytes(&self.stream)
    }

    async fn write_all(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            self.stream.writable().await?;
            match self.stream.try_write(bytes) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        // On the socket, not this descriptor: the supervisor's copy sees the hang-up and lets
        // it go (a close would leave the connection open in its hands).
        socket2::SockRef::from(&self.stream).shutdown(std::net::Shutdown::Both)
    }
}

/// Reads that peek: with `SO_PEEK_OFF` set, each one starts where the last one ended.
struct PeekReader<'a>(&'a TcpStream);

impl AsyncRead for PeekReader<'_> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        self.0.poll_peek(cx, buf).map_ok(|_| ())
    }
}

/// `SO_PEEK_OFF`: where the next `MSG_PEEK` read starts (and that it advances).
fn set_peek_offset(stream: &impl AsRawFd, offset: i32) -> io::Result<()> {
    // SAFETY: a plain setsockopt with a pointer to an i32 that outlives the call, on a
    // descriptor the caller owns; nix and rustix have no wrapper for SO_PEEK_OFF.
    let result = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEEK_OFF,
            std::ptr::from_ref(&offset).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reset `stream` now: connect(AF_UNSPEC) disconnects the socket itself (tcp_disconnect: a RST,
/// queues dropped), whoever else holds a descriptor of it, so the supervisor's copy sees the
/// hang-up and lets go. A close would wait for the last copy, and a shutdown sends a FIN first.
pub(crate) fn reset(stream: &TcpStream) -> io::Result<()> {
    rustix::net::connect_unspec(stream).map_err(io::Error::from)
}

/// TCP states (include/net/tcp_states.h; libc has no names for them) in which the peer's FIN
/// came: TIME_WAIT, CLOSE_WAIT, LAST_ACK, CLOSING.
const TCP_STATES_AFTER_PEER_FIN: [u8; 4] = [6, 8, 9, 11];

/// How many times [`consumed_bytes`] reads again while bytes keep arriving under it.
const CONSUMED_ATTEMPTS: usize = 100;

/// Bytes of `stream` the kernel has let go of: received (`tcpi_bytes_received`, Linux 4.1+)
/// minus still queued (`FIONREAD`). Only a release moves it, so it is exact, provided nothing
/// arrives between the two readings: they are taken again until a reading of the queue falls
/// between two equal readings of the counter. A FIN counts in the received bytes (its sequence
/// number) but not in the queue: one less once it came.
fn consumed_bytes(stream: &TcpStream) -> io::Result<u64> {
    for _ in 0..CONSUMED_ATTEMPTS {
        let before = tcp_info(stream)?;
        let queued = rustix::io::ioctl_fionread(stream)?;
        let after = tcp_info(stream)?;
        if (before.tcpi_bytes_received, before.tcpi_state)
            == (after.tcpi_bytes_received, after.tcpi_state)
        {
            let fin_received = TCP_STATES_AFTER_PEER_FIN.contains(&after.tcpi_state);
            return after
                .tcpi_bytes_received
                .checked_sub(queued + u64::from(fin_received))
                .ok_or_else(|| io::Error::other("the kernel queues more than it received"));
        }
    }
    Err(io::Error::other(
        "bytes kept arriving while the socket's position was read",
    ))
}

/// `TCP_INFO`, which must reach `tcpi_bytes_received` (Linux 4.1 and later).
fn tcp_info(stream: &TcpStream) -> io::Result<libc::tcp_info> {
    // SAFETY: tcp_info is plain data (integers), for which all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, which outlives the call, on a
    // descriptor `stream` keeps open; nix and rustix have no wrapper for TCP_INFO.
    let result = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            std::ptr::from_mut(&mut info).cast(),
            &mut len,
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    let needed = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_received) + 8;
    if (len as usize) < needed {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this kernel's TCP_INFO has no tcpi_bytes_received (Linux 4.1+)",
        ));
    }
    Ok(info)
}

/// Whether this kernel peeks TCP at an offset (Linux 6.10 and later): without it, a worker
/// that dies loses what it had read and not yet committed.
pub fn tcp_peek_offset_supported() -> bool {
    let Ok(socket) = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
    else {
        return false;
    };
    set_peek_offset(&socket, 0).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sender and the accepted end on 127.0.0.1, or `None` (printed) on a kernel without
    /// TCP `SO_PEEK_OFF`.
    async fn connected_pair() -> Option<(TcpStream, TcpStream)> {
        if !tcp_peek_offset_supported() {
            eprintln!("skipped: this kernel has no TCP SO_PEEK_OFF");
            return None;
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sender = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        Some((sender, accepted))
    }

    #[tokio::test]
    async fn consumed_counts_released_bytes_only_and_not_the_fin() {
        let Some((mut sender, accepted)) = connected_pair().await else {
            return;
        };
        let mut io = Socket::new(accepted, true).unwrap();
        assert_eq!(io.consumed().unwrap(), 0);
        sender.write_all(b"hello world").await.unwrap();
        let mut buf = BytesMut::new();
        while buf.len() < 11 {
            io.fill(&mut buf, 64).await.unwrap();
        }
        assert_eq!(io.consumed().unwrap(), 0, "peeked is not let go of");
        io.release(6).unwrap();
        assert_eq!(io.consumed().unwrap(), 6);
        // The sender closes: its FIN has a sequence number, but it is no byte of the stream.
        sender.shutdown().await.unwrap();
        drop(sender);
        assert_eq!(io.fill(&mut buf, 64).await.unwrap(), 0, "the FIN came");
        assert_eq!(io.consumed().unwrap(), 6);
        io.release(5).unwrap();
        assert_eq!(io.consumed().unwrap(), 11);
    }

    #[tokio::test]
    async fn peeked_bytes_stay_until_released_and_a_new_reader_starts_over() {
        let Some((mut sender, accepted)) = connected_pair().await else {
            return;
        };
        let kept = accepted.into_std().unwrap();
        let copy = kept.try_clone().unwrap();
        let mut io = Socket::new(TcpStream::from_std(copy).unwrap(), true).unwrap();
        sender.write_all(b"hello world").await.unwrap();
        let mut buf = BytesMut::new();
        while buf.len() < 11 {
            io.fill(&mut buf, 64).await.unwrap();
        }
        assert_eq!(&buf[..], b"hello world");
        io.release(6).unwrap();
        // The reader dies; a new one on the kept descriptor reads only what was not released.
        drop(io);
        let mut again = Socket::new(TcpStream::from_std(kept).unwrap(), true).unwrap();
        let mut buf = BytesMut::new();
        while buf.len() < 5 {
            again.fill(&mut buf, 64).await.unwrap();
        }
        assert_eq!(&buf[..], b"world");
        sender.write_all(b"!").await.unwrap();
        let mut more = BytesMut::new();
        again.fill(&mut more, 64).await.unwrap();
        assert_eq!(&more[..], b"!", "the peek offset moved past what was read");
    }
}
