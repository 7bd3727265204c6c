//! `ackgate send` and `ackgate receive`: the Forward client and the acking receiver people need
//! around a relay, built on [`crate::forward`] for the bytes, [`crate::upstream::connect`] for
//! the client's connection (TLS, shared-key handshake) and [`crate::ingress::handshake`] plus
//! [`crate::tls`] for the receiver's.
//!
//! - [`send`] (in `send.rs`) replaces `fluent-cat`: JSON lines or msgpack maps in (`input.rs`),
//!   PackedForward / Forward / Message requests out, optionally with a `chunk` option whose acks
//!   are matched by id while up to `--window` requests are in flight (PROTOCOL.md §6.3);
//!   `--legacy` writes the fluentd v0.10 bytes of PROTOCOL.md §3.2 / §9.1 (the bytes, pure, in
//!   `request.rs`). A progress line (`progress.rs`) shows on a terminal.
//! - [`receive`] (in `receive.rs`) is a real aggregator for tests and demos: every frame is
//!   written as JSON lines and flushed, and only then acked (PROTOCOL.md §13.1, §13.2); UDP
//!   heartbeats are answered (§8.1); optionally TLS and the server side of the handshake (§7).
//!
//! Every network wait has a deadline: connect (with TLS and handshake), each write, each ack,
//! the receiver's handshake and idle read.

mod input;
mod progress;
mod receive;
mod request;
mod send;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::time::timeout;

use crate::forward::ack::AckError;
use crate::forward::value::ValueError;
use crate::forward::FrameError;
use crate::ingress::handshake::HandshakeFailure;
use crate::tls::TlsError;
use crate::upstream::connect::ConnectError;

pub use input::InputFormat;
pub use receive::{bind, receive, serve, ReceiveArgs};
pub use send::{send, SendArgs, SendMode, SendReport, TimeFormat};

/// Why a tool stopped, or why `receive` closed one connection. Every message includes its
/// cause, so no field is a `source` (named `error` instead).
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("cannot read {}: {error}", path.display())]
    Input {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("input line {line}: {reason}")]
    BadLine { line: u64, reason: String },
    #[error("input record {record} (byte offset {offset}): {reason}")]
    BadRecord {
        record: u64,
        offset: u64,
        reason: String,
    },
    #[error("cannot start the input reader: {0}")]
    InputThread(std::io::Error),
    #[error("cannot write the output: {0}")]
    Output(std::io::Error),
    #[error("TLS setup: {0}")]
    Tls(TlsError),
    #[error("cannot bind {addr}: {error}")]
    Bind {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("cannot connect to {addr}: {error}")]
    Connect { addr: String, error: ConnectError },
    #[error("network I/O with {addr}: {error}")]
    Network { addr: String, error: std::io::Error },
    #[error("write to {addr} not finished within {timeout:?}")]
    WriteTimeout { addr: String, timeout: Duration },
    #[error("no ack for chunk {chunk} within {timeout:?}")]
    AckTimeout { chunk: String, timeout: Duration },
    #[error("ack {got:?} matches no request in flight")]
    AckMismatch { got: String },
    #[error("bad response from {addr}: {error}")]
    BadAck { addr: String, error: AckError },
    #[error("{addr} closed the connection with {pending} request(s) unacked")]
    ConnectionClosed { addr: String, pending: usize },
    #[error("TLS handshake failed: {0}")]
    TlsAccept(std::io::Error),
    #[error("TLS handshake not completed within {timeout:?}")]
    TlsTimeout { timeout: Duration },
    #[error("{0}")]
    Handshake(HandshakeFailure),
    #[error("{addr} requires the shared-key handshake (it sent HELO): add --shared-key")]
    HandshakeRequired { addr: String },
    #[error("bad request: {0}")]
    BadFrame(FrameError),
    #[error("entry cannot be shown as JSON: {0}")]
    BadEntry(ValueError),
    #[error("no bytes for {timeout:?}")]
    Idle { timeout: Duration },
    #[error("connection closed inside a request ({buffered} bytes buffered)")]
    Truncated { buffered: usize },
}

// `From` by hand, not `#[from]`: that would make the inner error a `source` too, and anyhow's
// `{:#}` in main would print it twice (the message already shows it, for the receive log).
impl From<TlsError> for ToolError {
    fn from(e: TlsError) -> Self {
        ToolError::Tls(e)
    }
}

impl From<HandshakeFailure> for ToolError {
    fn from(e: HandshakeFailure) -> Self {
        ToolError::Handshake(e)
    }
}

impl From<FrameError> for ToolError {
    fn from(e: FrameError) -> Self {
        ToolError::BadFrame(e)
    }
}

impl From<ValueError> for ToolError {
    fn from(e: ValueError) -> Self {
        ToolError::BadEntry(e)
    }
}

/// Parse a duration written with its unit: `500ms`, `30s`, `2m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 500ms, 30s, 2m or 1h"))?;
    let secs = |mult: u64| {
        n.checked_mul(mult)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("{s:?} is too long"))
    };
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        "" => Err(format!("{s:?} needs a unit: ms, s, m or h")),
        _ => Err(format!(
            "{s:?} has an unknown unit {unit:?} (ms, s, m or h)"
        )),
    }
}

/// Write all of `bytes` within `limit`.
async fn write_all_by<W: AsyncWrite + Unpin>(
    writer: &mut W,
    bytes: &[u8],
    limit: Duration,
    addr: &str,
) -> Result<(), ToolError> {
    match timeout(limit, writer.write_all(bytes)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(source)) => Err(ToolError::Network {
            addr: addr.to_owned(),
            error: source,
        }),
        Err(_) => Err(ToolError::WriteTimeout {
            addr: addr.to_owned(),
            timeout: limit,
        }),
    }
}

/// Close the write side (TLS: close_notify first) within `limit`.
async fn shutdown_by<W: AsyncWrite + Unpin>(
    writer: &mut W,
    limit: Duration,
    addr: &str,
) -> Result<(), ToolError> {
    match timeout(limit, writer.shutdown()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(source)) => Err(ToolError::Network {
            addr: addr.to_owned(),
            error: source,
        }),
        Err(_) => Err(ToolError::WriteTimeout {
            addr: addr.to_owned(),
            timeout: limit,
        }),
    }
}
