//! The server side of the shared-key handshake on one connection (PROTOCOL.md §7).
//!
//! HELO goes out first, right after accept; the first value the client sends must be a PING;
//! the PONG carries the verdict. A failed PING gets fluentd's failure PONG and the connection
//! is closed. A legacy sender does not know the handshake: its first data request is read as a
//! PING and rejected, and the log says so plainly. Every step has the handshake deadline.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{timeout_at, Instant};

use crate::forward::handshake::{answer_ping, encode_helo, message_len, Helo, ServerAuth};
use crate::forward::json::is_json_start;

/// Why a handshake did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeFailure {
    #[error("handshake not completed within handshake_timeout")]
    Timeout,
    #[error("peer closed during the handshake")]
    Closed,
    #[error("socket error during the handshake: {0}")]
    Io(#[from] std::io::Error),
    #[error("first message is not a valid PING ({0}): a sender without shared_key (e.g. fluentd v0.10) on a port that requires the handshake?")]
    NotPing(String),
    #[error("PING rejected: {0}")]
    Rejected(String),
    #[error("JSON request on a port that requires the shared-key handshake (JSON cannot be authenticated; fluentd refuses it too)")]
    Json,
}

impl HandshakeFailure {
    /// A short stable label for metrics (`rejected_connections{reason=...}`).
    pub fn kind(&self) -> &'static str {
        match self {
            HandshakeFailure::Json => "json",
            _ => "handshake",
        }
    }
}

/// Run the handshake; bytes the client sent after its PING stay in `buf`.
pub async fn accept<R, W>(
    reader: &mut R,
    writer: &mut W,
    buf: &mut BytesMut,
    auth: &ServerAuth,
    deadline: Instant,
) -> Result<(), HandshakeFailure>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let helo = Helo::random(auth.user_auth, true);
    timeout_at(deadline, writer.write_all(&encode_helo(&helo)))
        .await
        .map_err(|_| HandshakeFailure::Timeout)??;
    let len = loop {
        // fluentd's rule: a first byte `{` or `[` makes the connection JSON, which has no
        // handshake. Name that instead of calling it a bad PING.
        if buf.first().is_some_and(|b| is_json_start(*b)) {
            return Err(HandshakeFailure::Json);
        }
        match message_len(buf) {
            Ok(Some(len)) => break len,
            Ok(None) => {}
            Err(e) => {
                // Not even one well-formed value of handshake size: still answer like fluentd.
                let (pong, _) = answer_ping(auth, &helo, &buf[..]);
                let _ = timeout_at(deadline, writer.write_all(&pong)).await;
                return Err(HandshakeFailure::NotPing(e.to_string()));
            }
        }
        let n = timeout_at(deadline, reader.read_buf(buf))
            .await
            .map_err(|_| HandshakeFailure::Timeout)??;
        if n == 0 {
            return Err(HandshakeFailure::Closed);
        }
    };
    let message = buf.split_to(len);
    let (pong, verdict) = answer_ping(auth, &helo, &message);
    timeout_at(deadline, writer.write_all(&pong))
        .await
        .map_err(|_| HandshakeFailure::Timeout)??;
    match verdict {
        Ok(_) => Ok(()),
        Err(crate::forward::handshake::PingRejection::InvalidPing(e)) => {
            Err(HandshakeFailure::NotPing(e.to_string()))
        }
        Err(rejection) => Err(HandshakeFailure::Rejected(rejection.to_string())),
    }
}
