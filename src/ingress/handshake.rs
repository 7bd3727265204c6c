//! The server side of the shared-key handshake on one connection (PROTOCOL.md §7).
//!
//! HELO goes out first, right after accept; the first value the client sends must be a PING;
//! the PONG carries the verdict. A failed PING gets fluentd's failure PONG and the connection
//! is closed. A legacy sender does not know the handshake: its first data request is read as a
//! PING and rejected, and the log says so plainly. Every step has the handshake deadline.
//! The PING leaves the socket only once accepted (invariant 10).

use bytes::BytesMut;
use tokio::time::{timeout_at, Instant};
use tokio_util::sync::CancellationToken;

use super::io::ConnIo;
use crate::forward::handshake::{answer_ping, encode_helo, message_len, Helo, ServerAuth};
use crate::forward::json::is_json_start;
use crate::lifecycle::names::Handshake;

/// Bytes read per turn while waiting for the PING.
const FILL_BYTES: usize = 16 << 10;

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
    /// A handover began while the PING was awaited: the connection goes to the next worker,
    /// which checks the PING against the same HELO. Not a failure.
    #[error("handed over to the next worker during the handshake")]
    Parked,
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

/// Run the handshake: write a HELO (or, with `resume`, go on from one an earlier worker
/// wrote: its nonce and salt), read the PING, answer the PONG. Bytes the client sent after its
/// PING stay in `buf`. `mark` hears of each step before it is visible to the client (the
/// supervisor keeps it in the connection's name, so that a worker that dies mid-handshake
/// leaves a state the next one can go on from). Returns the PING's length: released from the
/// socket once accepted.
pub(crate) async fn accept<I: ConnIo>(
    io: &mut I,
    buf: &mut BytesMut,
    auth: &ServerAuth,
    deadline: Instant,
    resume: Option<(Vec<u8>, Vec<u8>)>,
    mark: &mut impl FnMut(Option<std::os::fd::BorrowedFd<'_>>, Handshake),
    park: &CancellationToken,
) -> Result<u64, HandshakeFailure> {
    let helo = match resume {
        Some((nonce, salt)) => Helo {
            nonce,
            auth: salt,
            keepalive: true,
        },
        None => {
            let helo = Helo::random(auth.user_auth, true);
            mark(
                io.descriptor(),
                Handshake::Helo {
                    nonce: helo.nonce.clone(),
                    auth: helo.auth.clone(),
                },
            );
            timeout_at(deadline, io.write_all(&encode_helo(&helo)))
                .await
                .map_err(|_| HandshakeFailure::Timeout)??;
            helo
        }
    };
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
                let _ = timeout_at(deadline, io.write_all(&pong)).await;
                return Err(HandshakeFailure::NotPing(e.to_string()));
            }
        }
        // Parked only when nothing read is lost by it: in peek mode the PING stays in the
        // socket; otherwise only before any of it was read.
        let may_park = io.keeps_unreleased() || buf.is_empty();
        let n = tokio::select! {
            filled = timeout_at(deadline, io.fill(buf, FILL_BYTES)) => {
                filled.map_err(|_| HandshakeFailure::Timeout)??
            }
            _ = park.cancelled(), if may_park => return Err(HandshakeFailure::Parked),
        };
        if n == 0 {
            return Err(HandshakeFailure::Closed);
        }
    };
    let message = buf.split_to(len);
    let (pong, verdict) = answer_ping(auth, &helo, &message);
    if verdict.is_ok() {
        mark(io.descriptor(), Handshake::Done);
        io.release(len)?;
    }
    timeout_at(deadline, io.write_all(&pong))
        .await
        .map_err(|_| HandshakeFailure::Timeout)??;
    match verdict {
        Ok(_) => Ok(len as u64),
        Err(crate::forward::handshake::PingRejection::InvalidPing(e)) => {
            Err(HandshakeFailure::NotPing(e.to_string()))
        }
        Err(rejection) => Err(HandshakeFailure::Rejected(rejection.to_string())),
    }
}
