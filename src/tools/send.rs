//! `ackgate send`: records in (see `input.rs`), Forward requests out on connections opened by
//! [`crate::upstream::connect::open`] (TCP, optional TLS, optional shared-key handshake), so the
//! tool meets a secured aggregator exactly as the relay does (PROTOCOL.md §7, §10).
//!
//! - plain: every request on one connection, nothing read;
//! - `--ack`: a random `chunk` per request, up to `--window` in flight, acks matched by id in
//!   any order, each judged against `--ack-timeout` from its own write (PROTOCOL.md §6.3);
//! - `--legacy`: what fluentd v0.10 writes (PROTOCOL.md §3.2, §9.1): one connection per
//!   request, `0x92`, raw-marker tag, `0xDB` str32 entries, integer times, no option, the four
//!   writes of `send_data`, then close without reading. TLS and `--shared-key` are allowed with
//!   it: v0.10 had neither, but a secured v1 receiver can only be reached through them, and the
//!   handshake runs on every connection, as fluentd does (§7.3).

use std::collections::{HashMap, VecDeque};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::input::{spawn_input, Batches, Encoding, InputFormat, InputSpec};
use super::progress::ProgressLine;
use super::request::{encode_request, legacy_parts, new_chunk_id};
use super::{parse_duration, shutdown_by, write_all_by, ToolError};
use crate::forward::ack::{decode_ack, AckError};
use crate::forward::handshake::{message_len, parse_helo};
use crate::tls::ClientTlsSettings;
use crate::upstream::connect::{client_tls, open, ClientAuth, ClientTls, UpstreamStream};

/// Largest ack response `send` buffers; a chunk id is 24–25 bytes, so this is generous.
const MAX_ACK_BYTES: usize = 4096;
/// Files larger than this get a progress line (on a terminal); stdin always does.
const PROGRESS_MIN_FILE_BYTES: u64 = 1 << 20;
/// `--self-hostname` when the machine's name cannot be read.
const FALLBACK_HOSTNAME: &str = "ackgate-send";

/// How `send` carries events (PROTOCOL.md §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SendMode {
    /// `[tag, str32 entries, {size[, chunk]}]`, like fluentd's out_forward.
    Packed,
    /// `[tag, [[time, record], ...], {size[, chunk]}]`, like fluent-bit's out_forward.
    Forward,
    /// `[tag, time, record[, {chunk}]]`: one request per event, like the loggers.
    Message,
}

/// How event times are written (PROTOCOL.md §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TimeFormat {
    /// EventTime: fixext8 `d7 00`, u32 seconds, u32 nanoseconds.
    Event,
    /// Integer seconds as uint32 (`ce`), what v0.12 receivers need.
    Int,
}

/// Flags of `ackgate send`.
#[derive(Debug, Clone, clap::Args)]
pub struct SendArgs {
    /// Records to send (see --format); `-` reads stdin.
    #[arg(long, default_value = "-")]
    pub input: PathBuf,
    /// Input format: `json` (one object per line) or `msgpack` (concatenated maps, one record
    /// each, sent byte for byte).
    #[arg(long, value_enum, default_value_t = InputFormat::Json)]
    pub format: InputFormat,
    /// Host of the Forward receiver (also the TLS name unless --tls-server-name is given).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// TCP port of the Forward receiver.
    #[arg(long, default_value_t = 24224)]
    pub port: u16,
    /// Tag of every event.
    #[arg(long)]
    pub tag: String,
    /// Events per request at most (Message mode always sends one); a request's entries are
    /// also cut at 8 MiB.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch: u32,
    /// Carrier mode.
    #[arg(long, value_enum, default_value_t = SendMode::Packed)]
    pub mode: SendMode,
    /// Event time encoding.
    #[arg(long, value_enum, default_value_t = TimeFormat::Event)]
    pub time_format: TimeFormat,
    /// Ask for an ack of every request (a random `chunk` id) and fail if one is missing.
    #[arg(long)]
    pub ack: bool,
    /// How long each request may wait for its ack.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub ack_timeout: Duration,
    /// Requests awaiting an ack at once on the connection (acks are matched by id).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub window: u32,
    /// Write exactly what fluentd v0.10 writes: a connection per request, no option, no ack.
    /// Combines with --tls and --shared-key (a handshake on every connection).
    #[arg(long, conflicts_with_all = ["ack", "mode", "time_format", "window"])]
    pub legacy: bool,
    /// Deadline for opening each connection: TCP connect, TLS and shared-key handshake.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Deadline for each request's write (a receiver applying backpressure stalls it).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub write_timeout: Duration,

    /// Connect with TLS (fluentd `<transport tls>`); the server is verified against the
    /// system's roots unless --tls-ca or --tls-insecure is given.
    #[arg(long)]
    pub tls: bool,
    /// PEM CA certificates to verify the server with, instead of the system's roots.
    #[arg(long, value_name = "FILE", requires = "tls")]
    pub tls_ca: Option<PathBuf>,
    /// Accept any server certificate: encrypted, but the peer is not authenticated.
    #[arg(long, requires = "tls", conflicts_with = "tls_ca")]
    pub tls_insecure: bool,
    /// Name to verify the server certificate against (and send as SNI) instead of --host.
    #[arg(long, value_name = "NAME", requires = "tls")]
    pub tls_server_name: Option<String>,
    /// PEM certificate chain to present to a server that requires client certificates.
    #[arg(long, value_name = "FILE", requires_all = ["tls", "tls_client_key"])]
    pub tls_client_cert: Option<PathBuf>,
    /// PEM private key of --tls-client-cert.
    #[arg(long, value_name = "FILE", requires_all = ["tls", "tls_client_cert"])]
    pub tls_client_key: Option<PathBuf>,

    /// Run the shared-key handshake (fluentd `<security>`, PROTOCOL.md §7) on every connection.
    #[arg(long, value_name = "KEY", env = "ACKGATE_SHARED_KEY", hide_env_values = true,
        value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub shared_key: Option<String>,
    /// Our name in the handshake; it must differ from the server's. Default: this machine's
    /// hostname, or "ackgate-send".
    #[arg(long, value_name = "NAME", requires = "shared_key",
        value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub self_hostname: Option<String>,
    /// User name, for a server with user authentication.
    #[arg(long, requires = "shared_key")]
    pub username: Option<String>,
    /// Password of --username. Not required to come with it: a password in the environment
    /// must not break sends that need none.
    #[arg(long, env = "ACKGATE_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
}

/// What `send` did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SendReport {
    /// Events written.
    pub events: u64,
    /// Requests written.
    pub requests: u64,
    /// Requests acknowledged (equal to `requests` after a successful `--ack` run, else 0).
    pub acked: u64,
    /// Events in the acknowledged requests.
    pub acked_events: u64,
}

impl std::fmt::Display for SendReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sent {} event(s) in {} request(s), {} acked",
            self.events, self.requests, self.acked
        )
    }
}

/// Where and how to connect, built once from the flags (TLS files are read here, so a bad one
/// fails before any input is read).
struct Target {
    /// `host:port`, as connected to and named in errors.
    addr: String,
    tls: Option<ClientTls>,
    auth: Option<ClientAuth>,
    connect_timeout: Duration,
    write_timeout: Duration,
}

impl Target {
    fn new(args: &SendArgs) -> Result<Target, ToolError> {
        // An IPv6 literal needs brackets before the port; the TLS name goes without them.
        let addr = if args.host.contains(':') && !args.host.starts_with('[') {
            format!("[{}]:{}", args.host, args.port)
        } else {
            format!("{}:{}", args.host, args.port)
        };
        let tls = if args.tls {
            let settings = ClientTlsSettings {
                ca: args.tls_ca.clone(),
                verify: !args.tls_insecure,
                client_cert: args
                    .tls_client_cert
                    .clone()
                    .zip(args.tls_client_key.clone()),
                server_name: args.tls_server_name.clone(),
            };
            let host = args.host.trim_start_matches('[').trim_end_matches(']');
            Some(client_tls(&settings, host)?)
        } else {
            None
        };
        let auth = args.shared_key.as_ref().map(|key| ClientAuth {
            self_hostname: args.self_hostname.clone().unwrap_or_else(machine_hostname),
            shared_key: key.clone(),
            username: args.username.clone().unwrap_or_default(),
            password: args.password.clone().unwrap_or_default(),
        });
        Ok(Target {
            addr,
            tls,
            auth,
            connect_timeout: args.connect_timeout,
            write_timeout: args.write_timeout,
        })
    }

    async fn connect(&self) -> Result<UpstreamStream, ToolError> {
        open(
            &self.addr,
            None,
            self.tls.as_ref(),
            self.auth.as_ref(),
            self.connect_timeout,
        )
        .await
        .map_err(|source| ToolError::Connect {
            addr: self.addr.clone(),
            error: source,
        })
    }

    async fn write(
        &self,
        stream: &mut (impl tokio::io::AsyncWrite + Unpin),
        bytes: &[u8],
    ) -> Result<(), ToolError> {
        write_all_by(stream, bytes, self.write_timeout, &self.addr).await
    }

    async fn close(
        &self,
        stream: &mut (impl tokio::io::AsyncWrite + Unpin),
    ) -> Result<(), ToolError> {
        shutdown_by(stream, self.write_timeout, &self.addr).await
    }
}

/// This machine's hostname (what fluentd's `self_hostname` defaults to), or "ackgate-send".
fn machine_hostname() -> String {
    match rustix::system::uname().nodename().to_str() {
        Ok(name) if !name.is_empty() => name.to_owned(),
        _ => FALLBACK_HOSTNAME.to_owned(),
    }
}

/// Send the input's records; see the module doc. Prints nothing but the progress line (only on
/// a terminal): the caller may show the report.
pub async fn send(args: SendArgs) -> Result<SendReport, ToolError> {
    let target = Target::new(&args)?;
    let (mode, time_format) = if args.legacy {
        (SendMode::Packed, TimeFormat::Int)
    } else {
        (args.mode, args.time_format)
    };
    let spec = InputSpec {
        path: args.input.clone(),
        format: args.format,
        encoding: Encoding {
            time_format,
            legacy: args.legacy,
        },
        batch: if mode == SendMode::Message {
            1
        } else {
            args.batch
        },
    };
    let mut input = spawn_input(spec, PROGRESS_MIN_FILE_BYTES)?;
    let mut progress = ProgressLine::stderr(input.large && std::io::stderr().is_terminal());
    let sent = if args.legacy {
        send_legacy(&target, &args.tag, &mut input.batches, &mut progress).await
    } else if args.ack {
        let acked = Acked {
            mode,
            tag: &args.tag,
            window: args.window as usize,
            ack_timeout: args.ack_timeout,
        };
        send_acked(&target, acked, &mut input.batches, &mut progress).await
    } else {
        send_plain(&target, mode, &args.tag, &mut input.batches, &mut progress).await
    };
    progress.finish();
    sent
}

type Progress = ProgressLine<std::io::Stderr>;

/// One connection per request, four writes, close; nothing is read (at-most-once, like v0.10).
async fn send_legacy(
    target: &Target,
    tag: &str,
    batches: &mut Batches,
    progress: &mut Progress,
) -> Result<SendReport, ToolError> {
    let mut report = SendReport::default();
    while let Some(batch) = batches.recv().await {
        let batch = batch?;
        let mut stream = target.connect().await?;
        let (raw_tag, len) = legacy_parts(tag, &batch.entries);
        for piece in [&[0x92][..], &raw_tag, &len, &batch.entries] {
            target.write(&mut stream, piece).await?;
        }
        target.close(&mut stream).await?;
        report.requests += 1;
        report.events += batch.events as u64;
        progress.update(&report);
    }
    Ok(report)
}

/// All requests on one connection, no option but `size`, nothing read.
async fn send_plain(
    target: &Target,
    mode: SendMode,
    tag: &str,
    batches: &mut Batches,
    progress: &mut Progress,
) -> Result<SendReport, ToolError> {
    let mut stream = target.connect().await?;
    let mut report = SendReport::default();
    let mut request = Vec::new();
    while let Some(batch) = batches.recv().await {
        let batch = batch?;
        request.clear();
        encode_request(mode, tag, &batch, None, &mut request);
        target.write(&mut stream, &request).await?;
        report.requests += 1;
        report.events += batch.events as u64;
        progress.update(&report);
    }
    target.close(&mut stream).await?;
    Ok(report)
}

/// What the ack reader saw.
enum AckEvent {
    /// An ack with this value content, read at this instant.
    Ack { id: Vec<u8>, at: Instant },
    /// A HELO where an ack was expected: the server wants the handshake we did not start.
    Helo,
    /// Bytes that are not an ack.
    Bad(AckError),
    /// The read failed.
    Failed(std::io::Error),
}

/// Aborts the task when dropped, so an early return does not leave it reading.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Read acks as they come and stamp them, so a late ack is judged by when it arrived, not by
/// when the sending loop got round to it. The channel closes on EOF.
async fn read_acks<R: AsyncRead + Unpin>(mut reader: R, tx: mpsc::Sender<AckEvent>) {
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        loop {
            match decode_ack(&buf, MAX_ACK_BYTES) {
                Ok(Some((id, used))) => {
                    let event = AckEvent::Ack {
                        id: id.to_vec(),
                        at: Instant::now(),
                    };
                    buf.advance(used);
                    if tx.send(event).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    // Not an ack; perhaps a HELO, whole or still arriving (bounded by the
                    // handshake message limit).
                    let event = match message_len(&buf) {
                        Ok(Some(len)) if parse_helo(&buf[..len]).is_ok() => AckEvent::Helo,
                        Ok(None) => break,
                        _ => AckEvent::Bad(e),
                    };
                    let _ = tx.send(event).await;
                    return;
                }
            }
        }
        match reader.read_buf(&mut buf).await {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) => {
                let _ = tx.send(AckEvent::Failed(e)).await;
                return;
            }
        }
    }
}

/// Settings of an acked send.
struct Acked<'a> {
    mode: SendMode,
    tag: &'a str,
    window: usize,
    ack_timeout: Duration,
}

/// A request awaiting its ack.
struct InFlight {
    /// When its write finished.
    sent: Instant,
    events: u32,
}

/// Pipelined requests with a `chunk` each; acks are matched by id, in any order.
async fn send_acked(
    target: &Target,
    settings: Acked<'_>,
    batches: &mut Batches,
    progress: &mut Progress,
) -> Result<SendReport, ToolError> {
    let addr = target.addr.clone();
    let (reader, mut writer) = tokio::io::split(target.connect().await?);
    let (ack_tx, mut acks) = mpsc::channel(settings.window + 1);
    let _reader = AbortOnDrop(tokio::spawn(read_acks(reader, ack_tx)));
    // Chunk id → its request; `order` is oldest first (acked ids linger until they reach the
    // front).
    let mut in_flight: HashMap<Vec<u8>, InFlight> = HashMap::new();
    let mut order: VecDeque<Vec<u8>> = VecDeque::new();
    let mut input_done = false;
    let mut report = SendReport::default();
    let mut request = Vec::new();
    let lossy = |id: &[u8]| String::from_utf8_lossy(id).into_owned();
    let ack_timeout = settings.ack_timeout;
    loop {
        while order.front().is_some_and(|id| !in_flight.contains_key(id)) {
            order.pop_front();
        }
        if input_done && in_flight.is_empty() {
            break;
        }
        let deadline = order
            .front()
            .and_then(|id| in_flight.get(id))
            .map(|f| f.sent + ack_timeout);
        let can_send = !input_done && in_flight.len() < settings.window;
        tokio::select! {
            biased;
            event = acks.recv() => match event {
                Some(AckEvent::Ack { id, at }) => {
                    let Some(request) = in_flight.remove(&id) else {
                        return Err(ToolError::AckMismatch { got: lossy(&id) });
                    };
                    if at.saturating_duration_since(request.sent) > ack_timeout {
                        return Err(ToolError::AckTimeout {
                            chunk: lossy(&id),
                            timeout: ack_timeout,
                        });
                    }
                    report.acked += 1;
                    report.acked_events += request.events as u64;
                    progress.update(&report);
                }
                Some(AckEvent::Helo) => return Err(ToolError::HandshakeRequired { addr }),
                Some(AckEvent::Bad(source)) => return Err(ToolError::BadAck { addr, error: source }),
                Some(AckEvent::Failed(source)) => return Err(ToolError::Network { addr, error: source }),
                None => {
                    return Err(ToolError::ConnectionClosed {
                        addr,
                        pending: in_flight.len(),
                    })
                }
            },
            () = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)),
                if deadline.is_some() =>
            {
                return Err(ToolError::AckTimeout {
                    chunk: order.front().map(|id| lossy(id)).unwrap_or_default(),
                    timeout: ack_timeout,
                });
            }
            next = batches.recv(), if can_send => match next {
                None => input_done = true,
                Some(batch) => {
                    let batch = batch?;
                    let id = new_chunk_id();
                    request.clear();
                    encode_request(settings.mode, settings.tag, &batch, Some(&id), &mut request);
                    target.write(&mut writer, &request).await?;
                    let sent = InFlight { sent: Instant::now(), events: batch.events };
                    in_flight.insert(id.clone().into_bytes(), sent);
                    order.push_back(id.into_bytes());
                    report.requests += 1;
                    report.events += batch.events as u64;
                    progress.update(&report);
                }
            },
        }
    }
    target.close(&mut writer).await?;
    Ok(report)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct SendCli {
        #[command(flatten)]
        args: SendArgs,
    }

    pub(in crate::tools) fn try_send_args(extra: &[&str]) -> Result<SendArgs, clap::Error> {
        let mut argv = vec!["send", "--tag", "app.log"];
        argv.extend_from_slice(extra);
        SendCli::try_parse_from(argv).map(|cli| cli.args)
    }

    pub(in crate::tools) fn send_args(extra: &[&str]) -> SendArgs {
        try_send_args(extra).unwrap()
    }

    #[test]
    fn flags_defaults_and_conflicts() {
        let args = send_args(&[]);
        assert_eq!(args.port, 24224);
        assert_eq!(args.batch, 1000);
        assert_eq!(args.mode, SendMode::Packed);
        assert_eq!(args.format, InputFormat::Json);
        assert_eq!(args.time_format, TimeFormat::Event);
        assert_eq!(args.ack_timeout, Duration::from_secs(30));
        assert_eq!(args.window, 16);
        assert_eq!(args.connect_timeout, Duration::from_secs(5));
        assert!(!args.tls && args.shared_key.is_none());
        assert!(try_send_args(&["--legacy", "--ack"]).is_err());
        assert!(try_send_args(&["--legacy", "--mode", "forward"]).is_err());
        assert!(try_send_args(&["--legacy"]).is_ok());
        assert!(try_send_args(&["--batch", "0"]).is_err());
        assert!(
            SendCli::try_parse_from(["send"]).is_err(),
            "--tag is required"
        );
    }

    #[test]
    fn security_flags_need_their_companions() {
        let ok = |argv: &[&str]| assert!(try_send_args(argv).is_ok(), "{argv:?} refused");
        let refused = |argv: &[&str]| {
            let err = try_send_args(argv).err();
            assert!(err.is_some(), "{argv:?} accepted");
        };
        refused(&["--tls-ca", "ca.pem"]);
        refused(&["--tls-insecure"]);
        refused(&["--tls-server-name", "x"]);
        refused(&["--tls", "--tls-client-cert", "c.pem"]);
        refused(&["--tls", "--tls-client-key", "c.key"]);
        refused(&["--tls", "--tls-ca", "ca.pem", "--tls-insecure"]);
        refused(&["--self-hostname", "me"]);
        refused(&["--username", "u"]);
        refused(&["--shared-key", ""]);
        ok(&["--tls", "--tls-ca", "ca.pem", "--tls-server-name", "x"]);
        ok(&[
            "--tls",
            "--tls-client-cert",
            "c.pem",
            "--tls-client-key",
            "c.key",
        ]);
        ok(&[
            "--shared-key",
            "k",
            "--self-hostname",
            "me",
            "--username",
            "u",
            "--password",
            "p",
        ]);
        // The v0.10 layout inside a secured v1 connection is allowed (module doc).
        ok(&["--legacy", "--tls", "--tls-insecure", "--shared-key", "k"]);
        ok(&["--format", "msgpack", "--legacy"]);
        let args = send_args(&["--shared-key", "k", "--host", "::1", "--port", "9"]);
        let target = Target::new(&args).unwrap();
        assert_eq!(target.addr, "[::1]:9");
        let auth = target.auth.unwrap();
        assert!(!auth.self_hostname.is_empty());
        assert_eq!((auth.username.as_str(), auth.password.as_str()), ("", ""));
    }

    #[test]
    fn a_missing_tls_file_is_named_before_anything_is_sent() {
        let args = send_args(&["--tls", "--tls-ca", "/nonexistent/ca.pem"]);
        let err = Target::new(&args)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
    }
}
