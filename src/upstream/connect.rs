//! Opening a connection to a node: TCP with a deadline, TLS when configured, then the client
//! side of the shared-key handshake when the node has a key (PROTOCOL.md §7). The result can be
//! aborted with SO_LINGER 0 whatever its layers, so a timed-out connection never delivers its
//! queued bytes late (DESIGN.md, dispatcher).

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{lookup_host, TcpSocket, TcpStream};
use tokio::time::{timeout_at, Instant};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::forward::handshake::{check_pong, encode_ping, message_len, parse_helo, parse_pong};
use crate::middlebox::{own_sources, set_mark, OwnSource};

/// Shared-key handshake settings of one node.
#[derive(Clone)]
pub struct ClientAuth {
    pub self_hostname: String,
    pub shared_key: String,
    pub username: String,
    pub password: String,
}

/// TLS settings of one node, built once.
#[derive(Clone)]
pub struct ClientTls {
    pub connector: TlsConnector,
    pub server_name: rustls::pki_types::ServerName<'static>,
}

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect failed: {0}")]
    Tcp(io::Error),
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
    #[error("shared-key handshake failed: {0}")]
    Handshake(String),
    #[error("cannot set SO_MARK {0} (upstream.socket_mark; needs CAP_NET_ADMIN): {1}")]
    Mark(u32, io::Error),
}

/// A node connection, plain or TLS, registered as one of ackgate's own sources while open
/// (so ingress refuses it as a loop if a REDIRECT rule sends it back in).
pub struct UpstreamStream {
    transport: Transport,
    _source: OwnSource,
}

enum Transport {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// A connection to a node that can be given up at once.
pub trait Link: AsyncRead + AsyncWrite + Unpin + Send {
    /// Close now with a reset: the peer's kernel and ours drop whatever was not delivered yet,
    /// so nothing sent on this connection can arrive after this returns.
    fn abort(self);
}

impl UpstreamStream {
    fn tcp(&self) -> &TcpStream {
        match &self.transport {
            Transport::Plain(s) => s,
            Transport::Tls(s) => s.get_ref().0,
        }
    }
}

impl Link for UpstreamStream {
    fn abort(self) {
        // SO_LINGER {on, 0}: close() sends RST and discards the send queue.
        if let Err(e) = self.tcp().set_zero_linger() {
            tracing::warn!(error = %e, "cannot set SO_LINGER 0 on an upstream connection; it is closed anyway");
        }
        drop(self);
    }
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Transport::Plain(s) => s.is_write_vectored(),
            Transport::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().transport).poll_read(cx, buf)
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().transport).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().transport).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.transport.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().transport).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().transport).poll_shutdown(cx)
    }
}

/// Connect to `address` within `deadline`: TCP (with `mark` as its SO_MARK), TLS, handshake.
pub async fn open(
    address: &str,
    mark: Option<u32>,
    tls: Option<&ClientTls>,
    auth: Option<&ClientAuth>,
    deadline: Duration,
) -> Result<UpstreamStream, ConnectError> {
    let until = Instant::now() + deadline;
    let (tcp, source) = timeout_at(until, connect_tcp(address, mark))
        .await
        .map_err(|_| ConnectError::Timeout(deadline))??;
    let _ = tcp.set_nodelay(true);
    let transport = match tls {
        None => Transport::Plain(tcp),
        Some(tls) => {
            let stream = timeout_at(until, tls.connector.connect(tls.server_name.clone(), tcp))
                .await
                .map_err(|_| ConnectError::Timeout(deadline))?
                .map_err(ConnectError::Tls)?;
            Transport::Tls(Box::new(stream))
        }
    };
    let mut stream = UpstreamStream {
        transport,
        _source: source,
    };
    if let Some(auth) = auth {
        handshake(&mut stream, auth, until)
            .await
            .map_err(|e| match e {
                HandshakeIo::Timeout => ConnectError::Timeout(deadline),
                HandshakeIo::Failed(reason) => ConnectError::Handshake(reason),
            })?;
    }
    Ok(stream)
}

/// TCP to the first of `address`'s resolved addresses that accepts, as `TcpStream::connect`
/// does, with SO_MARK set before the SYN. The socket is bound first so its port is registered
/// as ackgate's own before a REDIRECT rule could bring the SYN back to ingress.
async fn connect_tcp(
    address: &str,
    mark: Option<u32>,
) -> Result<(TcpStream, OwnSource), ConnectError> {
    let mut last_error = None;
    for target in lookup_host(address).await.map_err(ConnectError::Tcp)? {
        let (socket, any) = match target {
            SocketAddr::V4(_) => (TcpSocket::new_v4(), Ipv4Addr::UNSPECIFIED.into()),
            SocketAddr::V6(_) => (TcpSocket::new_v6(), Ipv6Addr::UNSPECIFIED.into()),
        };
        let socket = socket.map_err(ConnectError::Tcp)?;
        if let Some(mark) = mark {
            set_mark(&socket, mark).map_err(|e| ConnectError::Mark(mark, e))?;
        }
        socket
            .bind(SocketAddr::new(any, 0))
            .map_err(ConnectError::Tcp)?;
        let port = socket.local_addr().map_err(ConnectError::Tcp)?.port();
        let source = own_sources().register_tcp_port(port);
        match socket.connect(target).await {
            Ok(stream) => return Ok((stream, source)),
            Err(e) => last_error = Some(e),
        }
    }
    Err(ConnectError::Tcp(last_error.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("{address} resolved to no address"),
        )
    })))
}

enum HandshakeIo {
    Timeout,
    Failed(String),
}

/// Read one handshake message (HELO or PONG) with the deadline.
async fn read_message(
    stream: &mut UpstreamStream,
    buf: &mut BytesMut,
    until: Instant,
) -> Result<BytesMut, HandshakeIo> {
    loop {
        match message_len(buf) {
            Ok(Some(len)) => return Ok(buf.split_to(len)),
            Ok(None) => {}
            Err(e) => return Err(HandshakeIo::Failed(e.to_string())),
        }
        let n = timeout_at(until, stream.read_buf(buf))
            .await
            .map_err(|_| HandshakeIo::Timeout)?
            .map_err(|e| HandshakeIo::Failed(e.to_string()))?;
        if n == 0 {
            return Err(HandshakeIo::Failed(
                "node closed the connection during the handshake (no <security> there?)".into(),
            ));
        }
    }
}

async fn handshake(
    stream: &mut UpstreamStream,
    auth: &ClientAuth,
    until: Instant,
) -> Result<(), HandshakeIo> {
    let mut buf = BytesMut::with_capacity(512);
    let helo = read_message(stream, &mut buf, until).await?;
    let helo = parse_helo(&helo).map_err(|e| HandshakeIo::Failed(format!("HELO: {e}")))?;
    // fluentd's out_forward uses 32 hex chars of randomness per node as its salt.
    let salt = hex::encode(rand::random::<[u8; 16]>());
    let ping = encode_ping(
        auth.self_hostname.as_bytes(),
        salt.as_bytes(),
        auth.shared_key.as_bytes(),
        &helo,
        auth.username.as_bytes(),
        auth.password.as_bytes(),
    );
    timeout_at(until, stream.write_all(&ping))
        .await
        .map_err(|_| HandshakeIo::Timeout)?
        .map_err(|e| HandshakeIo::Failed(e.to_string()))?;
    let pong = read_message(stream, &mut buf, until).await?;
    let pong = parse_pong(&pong).map_err(|e| HandshakeIo::Failed(format!("PONG: {e}")))?;
    check_pong(
        &pong,
        auth.self_hostname.as_bytes(),
        salt.as_bytes(),
        &helo.nonce,
        auth.shared_key.as_bytes(),
    )
    .map_err(|e| HandshakeIo::Failed(e.to_string()))?;
    if !buf.is_empty() {
        return Err(HandshakeIo::Failed(
            "bytes after PONG before any request".into(),
        ));
    }
    Ok(())
}

/// Build the TLS connector for a node.
pub fn client_tls(
    settings: &crate::tls::ClientTlsSettings,
    host: &str,
) -> Result<ClientTls, crate::tls::TlsError> {
    let config = crate::tls::client_config(settings)?;
    Ok(ClientTls {
        connector: TlsConnector::from(Arc::clone(&config)),
        server_name: crate::tls::server_name(settings, host)?,
    })
}
