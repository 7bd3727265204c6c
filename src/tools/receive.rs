//! `ackgate receive`: an acking Forward aggregator for tests and demos. Every frame is written
//! as JSON lines and flushed, and only then acked, in one write (PROTOCOL.md §13.1, §13.2); UDP
//! heartbeats on the same IP:port get a `\0` back (§8.1); a bad frame closes its connection
//! with a warning naming the peer and the reason, never a resynchronisation (invariant 4's rule
//! for ingress).
//!
//! With `--tls-cert/--tls-key` it speaks TLS ([`crate::tls::server_config`], optionally
//! requiring client certificates), and with `--shared-key` it runs the server side of the
//! handshake first ([`crate::ingress::handshake::accept`], PROTOCOL.md §7), so it can stand in
//! for a secured fluentd aggregator. Both share one deadline per connection,
//! `--handshake-timeout`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Mutex, Semaphore};
use tokio::time::{timeout, timeout_at, Instant};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::{parse_duration, write_all_by, ToolError};
use crate::forward::ack::encode_ack;
use crate::forward::entries::entry_len;
use crate::forward::handshake::ServerAuth;
use crate::forward::value::{bytes_to_json, entry_to_json};
use crate::forward::{Decoded, Frame, FrameDecoder, FrameError, Limits, Signal};
use crate::ingress::handshake::accept;
use crate::tls::{server_config, ServerTlsSettings};

/// Deadline for the receiver's ack writes and heartbeat replies.
const RECEIVE_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Heartbeat datagrams are one byte; fluentd reads at most 128 (PROTOCOL.md §8.1).
const HEARTBEAT_READ: usize = 128;

/// Flags of `ackgate receive`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReceiveArgs {
    /// TCP and UDP (heartbeat) address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:24224")]
    pub listen: SocketAddr,
    /// Where to write one JSON line per event; `-` is stdout.
    #[arg(long, default_value = "-")]
    pub output: PathBuf,
    /// Never ack (to watch a sender's ack timeout).
    #[arg(long)]
    pub no_ack: bool,
    /// Wait this long before each ack (to simulate a slow aggregator).
    #[arg(long, default_value = "0ms", value_parser = parse_duration)]
    pub ack_delay: Duration,
    /// Close a connection that sends nothing for this long.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// Connections served at once; more wait in the kernel's accept queue.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// Require the shared-key handshake (fluentd `<security>`, PROTOCOL.md §7) on every
    /// connection; senders without it are refused.
    #[arg(long, value_name = "KEY", env = "ACKGATE_SHARED_KEY", hide_env_values = true,
        value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub shared_key: Option<String>,
    /// Our name in the PONG. Senders refuse a server with their own name, so the default is
    /// not the machine's hostname (`send`'s default): both run on one machine out of the box.
    #[arg(
        long,
        value_name = "NAME",
        default_value = "ackgate-receive",
        requires = "shared_key"
    )]
    pub self_hostname: String,
    /// Accept this user (repeatable); with any, every sender must log in as one of them.
    #[arg(long = "user", value_name = "USER:PASSWORD", requires = "shared_key",
        value_parser = parse_user)]
    pub users: Vec<(String, String)>,
    /// PEM certificate chain: serve TLS (with --tls-key).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA: require client certificates signed by it.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Deadline for a connection's TLS and shared-key handshakes together.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,
}

/// `USER:PASSWORD`, split at the first colon; the user name may not be empty.
fn parse_user(s: &str) -> Result<(String, String), String> {
    match s.split_once(':') {
        Some((user, password)) if !user.is_empty() => Ok((user.to_owned(), password.to_owned())),
        _ => Err("expected USER:PASSWORD with a non-empty user".to_owned()),
    }
}

/// What every connection shares.
struct ConnContext {
    ack: bool,
    ack_delay: Duration,
    idle_timeout: Duration,
    handshake_timeout: Duration,
    tls: Option<TlsAcceptor>,
    auth: Option<ServerAuth>,
}

impl ConnContext {
    /// Read the TLS files (errors name them) and set up the handshake.
    fn new(args: &ReceiveArgs) -> Result<ConnContext, ToolError> {
        let tls = match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => {
                Some(TlsAcceptor::from(server_config(&ServerTlsSettings {
                    cert: cert.clone(),
                    key: key.clone(),
                    client_ca: args.tls_client_ca.clone(),
                })?))
            }
            _ => None,
        };
        let auth = args.shared_key.as_ref().map(|key| ServerAuth {
            self_hostname: args.self_hostname.clone(),
            shared_key: key.clone(),
            users: args.users.clone(),
            user_auth: !args.users.is_empty(),
        });
        Ok(ConnContext {
            ack: !args.no_ack,
            ack_delay: args.ack_delay,
            idle_timeout: args.idle_timeout,
            handshake_timeout: args.handshake_timeout,
            tls,
            auth,
        })
    }
}

/// Bind the TCP listener and the UDP heartbeat socket to the same IP:port. With port 0, the
/// UDP port the kernel gave TCP may be taken; then both are tried again.
pub async fn bind(addr: SocketAddr) -> Result<(TcpListener, UdpSocket), ToolError> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ToolError::Bind {
                addr,
                error: source,
            })?;
        let local = listener.local_addr().map_err(|source| ToolError::Bind {
            addr,
            error: source,
        })?;
        match UdpSocket::bind(local).await {
            Ok(udp) => return Ok((listener, udp)),
            Err(e)
                if addr.port() == 0
                    && attempts < 16
                    && e.kind() == std::io::ErrorKind::AddrInUse => {}
            Err(source) => {
                return Err(ToolError::Bind {
                    addr: local,
                    error: source,
                })
            }
        }
    }
}

/// Check the flags (TLS files, output), bind `args.listen`, announce it on stderr as
/// `ackgate receive listening on IP:PORT`, and serve until `shutdown` fires.
pub async fn receive(args: ReceiveArgs, shutdown: CancellationToken) -> Result<(), ToolError> {
    let ctx = ConnContext::new(&args)?;
    let output = open_output(&args.output).await?;
    let (listener, udp) = bind(args.listen).await?;
    let local = listener.local_addr().map_err(|source| ToolError::Bind {
        addr: args.listen,
        error: source,
    })?;
    tracing::info!(%local, tls = ctx.tls.is_some(), shared_key = ctx.auth.is_some(),
        "receive listening");
    eprintln!("ackgate receive listening on {local}");
    run(listener, udp, ctx, output, args.max_connections, shutdown).await
}

/// Serve already bound sockets (tests bind port 0 and keep the address). On `shutdown`:
/// stop accepting, let connections finish the frame they are on, flush the output.
pub async fn serve(
    listener: TcpListener,
    udp: UdpSocket,
    args: ReceiveArgs,
    shutdown: CancellationToken,
) -> Result<(), ToolError> {
    let ctx = ConnContext::new(&args)?;
    let output = open_output(&args.output).await?;
    run(listener, udp, ctx, output, args.max_connections, shutdown).await
}

/// The output every connection writes to, one whole frame at a time.
type Output = Arc<Mutex<Box<dyn AsyncWrite + Send + Unpin>>>;

async fn open_output(path: &Path) -> Result<Output, ToolError> {
    let writer: Box<dyn AsyncWrite + Send + Unpin> = if path == Path::new("-") {
        Box::new(tokio::io::stdout())
    } else {
        Box::new(
            tokio::fs::File::create(path)
                .await
                .map_err(ToolError::Output)?,
        )
    };
    Ok(Arc::new(Mutex::new(writer)))
}

async fn run(
    listener: TcpListener,
    udp: UdpSocket,
    ctx: ConnContext,
    output: Output,
    max_connections: u32,
    shutdown: CancellationToken,
) -> Result<(), ToolError> {
    let ctx = Arc::new(ctx);
    let tracker = TaskTracker::new();
    tracker.spawn(answer_heartbeats(udp, shutdown.clone()));
    let permits = Arc::new(Semaphore::new(max_connections as usize));
    let mut backoff = Duration::from_millis(10);
    loop {
        // The permit is taken before accept: with none free, connections wait in the backlog.
        let permit = tokio::select! {
            () = shutdown.cancelled() => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, ?backoff, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        backoff = Duration::from_millis(10);
        let output = output.clone();
        let shutdown = shutdown.clone();
        let ctx = ctx.clone();
        let span = tracing::info_span!("receive_conn", %peer);
        tracker.spawn(
            async move {
                match serve_connection(stream, peer, &ctx, &output, &shutdown).await {
                    Ok(()) => tracing::debug!("connection closed"),
                    Err(reason) => tracing::warn!(%peer, %reason, "closing connection"),
                }
                drop(permit);
            }
            .instrument(span),
        );
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
    let flushed = output.lock().await.flush().await;
    flushed.map_err(ToolError::Output)
}

/// Reply `\0` to every datagram from the socket it came to (PROTOCOL.md §8.1, §13.7).
async fn answer_heartbeats(udp: UdpSocket, shutdown: CancellationToken) {
    let mut buf = [0u8; HEARTBEAT_READ];
    loop {
        let from = tokio::select! {
            () = shutdown.cancelled() => return,
            received = udp.recv_from(&mut buf) => match received {
                Ok((_, from)) => from,
                // ICMP errors from earlier replies surface here; they concern no one now.
                Err(e) => {
                    tracing::debug!(error = %e, "heartbeat receive failed");
                    continue;
                }
            },
        };
        match timeout(RECEIVE_WRITE_TIMEOUT, udp.send_to(&[0], from)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::debug!(%from, error = %e, "heartbeat reply failed"),
            Err(_) => tracing::debug!(%from, "heartbeat reply timed out"),
        }
    }
}

/// TLS if configured, then [`serve_stream`]. Shutdown during the TLS handshake just closes.
async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    ctx: &ConnContext,
    output: &Output,
    shutdown: &CancellationToken,
) -> Result<(), ToolError> {
    let _ = tcp.set_nodelay(true);
    let deadline = Instant::now() + ctx.handshake_timeout;
    let peer = peer.to_string();
    let Some(acceptor) = &ctx.tls else {
        return serve_stream(tcp, &peer, deadline, ctx, output, shutdown).await;
    };
    let tls = tokio::select! {
        () = shutdown.cancelled() => return Ok(()),
        accepted = timeout_at(deadline, acceptor.accept(tcp)) => match accepted {
            Err(_) => return Err(ToolError::TlsTimeout { timeout: ctx.handshake_timeout }),
            Ok(Err(e)) => return Err(ToolError::TlsAccept(e)),
            Ok(Ok(tls)) => tls,
        },
    };
    serve_stream(tls, &peer, deadline, ctx, output, shutdown).await
}

/// The shared-key handshake if configured (by `deadline`), then frames until EOF: write each
/// as JSON lines, flush, then ack it if it asked.
async fn serve_stream<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    peer: &str,
    deadline: Instant,
    ctx: &ConnContext,
    output: &Output,
    shutdown: &CancellationToken,
) -> Result<(), ToolError> {
    let mut stream = stream;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    if let Some(auth) = &ctx.auth {
        let mut io = crate::ingress::io::Streamed(&mut stream);
        let mut no_marks = |_: Option<std::os::fd::BorrowedFd<'_>>, _| {};
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            done = accept(&mut io, &mut buf, auth, deadline, None, &mut no_marks, shutdown) => {
                done?;
            }
        }
        tracing::debug!("shared-key handshake done");
    }
    let (mut reader, mut writer) = tokio::io::split(stream);
    let mut decoder = FrameDecoder::new(Limits::default());
    let max_depth = decoder.limits().max_depth;
    let mut ack = Vec::new();
    loop {
        while let Some(decoded) = decoder.decode(&mut buf)? {
            let Decoded::Frame(frame) = decoded else {
                continue;
            };
            let lines = frame_to_lines(&frame, max_depth)?;
            {
                let mut out = output.lock().await;
                out.write_all(lines.as_bytes())
                    .await
                    .map_err(ToolError::Output)?;
                out.flush().await.map_err(ToolError::Output)?;
            }
            if let (true, Some(chunk)) = (ctx.ack, &frame.chunk) {
                if !ctx.ack_delay.is_zero() {
                    tokio::time::sleep(ctx.ack_delay).await;
                }
                ack.clear();
                encode_ack(chunk, &mut ack);
                write_all_by(&mut writer, &ack, RECEIVE_WRITE_TIMEOUT, peer).await?;
            }
        }
        buf.reserve(16 * 1024);
        let read = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            read = timeout(ctx.idle_timeout, reader.read_buf(&mut buf)) => read,
        };
        match read {
            Err(_) => {
                return Err(ToolError::Idle {
                    timeout: ctx.idle_timeout,
                })
            }
            Ok(Err(source)) => {
                return Err(ToolError::Network {
                    addr: peer.to_owned(),
                    error: source,
                })
            }
            Ok(Ok(0)) if buf.is_empty() => return Ok(()),
            Ok(Ok(0)) => {
                return Err(ToolError::Truncated {
                    buffered: buf.len(),
                })
            }
            Ok(Ok(_)) => {}
        }
    }
}

/// `{"tag": ..., "time": ..., "record": {...}[, "metadata": {...}]}` per event, each line ended
/// by `\n`. Keys are written in this order whatever serde_json's map ordering is.
///
/// Metrics and traces (v1.5 `fluent_signal` 1/2) are not decoded: one line per request,
/// `{"tag": ..., "signal": "metrics", "contexts": n, "payload_base64": ...}`.
fn frame_to_lines(frame: &Frame, max_depth: usize) -> Result<String, ToolError> {
    let tag = bytes_to_json(&frame.tag);
    if frame.signal != Signal::Logs {
        return Ok(format!(
            "{{\"tag\":{tag},\"signal\":\"{}\",\"contexts\":{},\"payload_base64\":\"{}\"}}\n",
            frame.signal.name(),
            frame.events,
            base64::engine::general_purpose::STANDARD.encode(&frame.entries),
        ));
    }
    let mut lines = String::new();
    let mut pos = 0;
    let mut index = 0u32;
    while pos < frame.entries.len() {
        let len = entry_len(&frame.entries[pos..], index, max_depth).map_err(FrameError::from)?;
        let entry = entry_to_json(&frame.entries[pos..pos + len])?;
        lines.push_str(&format!(
            "{{\"tag\":{},\"time\":{},\"record\":{}",
            tag, entry["time"], entry["record"]
        ));
        if let Some(metadata) = entry.get("metadata") {
            lines.push_str(&format!(",\"metadata\":{metadata}"));
        }
        lines.push_str("}\n");
        pos += len;
        index += 1;
    }
    Ok(lines)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::tools::input::put_time;
    use crate::tools::request::tests::decode_one;
    use crate::tools::TimeFormat;
    use clap::Parser;

    #[derive(Parser)]
    pub(in crate::tools) struct ReceiveCli {
        #[command(flatten)]
        pub args: ReceiveArgs,
    }

    #[test]
    fn flags_defaults_and_companions() {
        let r = ReceiveCli::try_parse_from(["receive", "--ack-delay", "500ms"])
            .unwrap()
            .args;
        assert_eq!(r.listen, "127.0.0.1:24224".parse().unwrap());
        assert_eq!(r.ack_delay, Duration::from_millis(500));
        assert_eq!(r.handshake_timeout, Duration::from_secs(10));
        assert!(!r.no_ack);
        assert!(r.shared_key.is_none() && r.tls_cert.is_none());
        let parse = |argv: &[&str]| {
            ReceiveCli::try_parse_from([&["receive"][..], argv].concat()).map(|c| c.args)
        };
        assert!(parse(&["--self-hostname", "agg"]).is_err());
        assert!(parse(&["--user", "u:p"]).is_err());
        assert!(parse(&["--tls-cert", "c.pem"]).is_err());
        assert!(parse(&["--tls-key", "c.key"]).is_err());
        assert!(parse(&["--tls-client-ca", "ca.pem"]).is_err());
        assert!(parse(&["--shared-key", "k", "--user", "nocolon"]).is_err());
        assert!(parse(&["--shared-key", "k", "--user", ":p"]).is_err());
        let r = parse(&[
            "--shared-key",
            "k",
            "--user",
            "a:b:c",
            "--user",
            "d:",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "c.key",
        ])
        .unwrap();
        assert_eq!(r.self_hostname, "ackgate-receive");
        assert_eq!(
            r.users,
            [("a".into(), "b:c".into()), ("d".into(), String::new())]
        );
    }

    #[test]
    fn frames_become_json_lines_in_key_order() {
        let mut entries = Vec::new();
        put_time(Duration::from_secs(5), TimeFormat::Int, &mut entries);
        entries.extend_from_slice(&[0x81, 0xa1, b'k', 0xa1, b'v']);
        // v1.5 entry: [[EventTime 10.5, {"m": 1}], {"r": 2}].
        entries.extend_from_slice(&[0x92, 0x92, 0xd7, 0x00, 0, 0, 0, 10, 0x1d, 0xcd, 0x65, 0x00]);
        entries.extend_from_slice(&[0x81, 0xa1, b'm', 0x01, 0x81, 0xa1, b'r', 0x02]);
        let mut request = vec![0x92, 0xa1, b't', 0xdb];
        request.extend_from_slice(&(entries.len() as u32).to_be_bytes());
        request.extend_from_slice(&entries);
        let lines = frame_to_lines(&decode_one(&request), 64).unwrap();
        assert_eq!(
            lines,
            "{\"tag\":\"t\",\"time\":5,\"record\":{\"k\":\"v\"}}\n\
             {\"tag\":\"t\",\"time\":10.5,\"record\":{\"r\":2},\"metadata\":{\"m\":1}}\n"
        );
    }

    #[test]
    fn metrics_requests_become_one_line_with_the_payload() {
        // ["m", bin(two contexts), {"fluent_signal": 1}]
        let payload = [0x81, 0xa1, b'a', 0x01, 0x80];
        let mut request = vec![0x93, 0xa1, b'm', 0xc4, payload.len() as u8];
        request.extend_from_slice(&payload);
        request.extend_from_slice(&[0x81, 0xad]);
        request.extend_from_slice(b"fluent_signal");
        request.push(0x01);
        let lines = frame_to_lines(&decode_one(&request), 64).unwrap();
        assert_eq!(
            lines,
            "{\"tag\":\"m\",\"signal\":\"metrics\",\"contexts\":2,\"payload_base64\":\"gaFhAYA=\"}\n"
        );
    }
}
