//! Support for `tests/interop.rs`: the real client libraries (npm, PyPI, Go) as child
//! processes, a recording TCP proxy between them and ackgate, and decoders for what the proxy
//! recorded (PROTOCOL.md §6.3, §7; DESIGN.md invariants 1 and 6).
//!
//! - [`RecordingProxy`] sits on 127.0.0.1:0 and copies bytes both ways to ackgate, keeping what
//!   each side wrote and, after every read, how far each direction had got. The client's bytes
//!   are the reference for "byte-exact" (invariant 6); ackgate's replies show which acks the
//!   client was sent and how many chunks were in flight at once.
//! - [`decode_client_stream`] / [`decode_server_stream`] split those bytes with ackgate's own
//!   codec: PING, requests (mode, chunk, raw entries); HELO, PONG, acks.
//! - [`Tool`] finds each runtime and library, or says why it cannot: a developer machine
//!   without them skips with the reason printed; under `CI` (which installs them: `.ci/run`)
//!   a missing tool is a failure.
//! - [`run_client`] runs a client with a deadline and parses the JSON summary it prints.
//!
//! Every wait has a deadline and is woken by an event, never by a sleep.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ackgate::forward::ack::decode_ack;
use ackgate::forward::handshake::{parse_helo, parse_ping, parse_pong, Helo, Ping, Pong};
use ackgate::forward::msgpack::{read_header, value_len, Header};
use ackgate::forward::{Decoded, FrameDecoder, Limits, Mode};
use bytes::BytesMut;

use super::msgpack::{raw_string, DEPTH};
use super::process::Proc;
use super::requests::split_entries;
use super::skip::skip;
use super::{lock, wait_for_condition};

// ------------------------------------------------------------------------------------------------
// Tools

/// `tests/interop`, where the scripts and `node_modules` live.
pub fn interop_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("interop")
}

/// A client runtime with its library, ready to run.
#[derive(Debug, Clone)]
pub enum Tool {
    /// `node` and `tests/interop/node_modules/@fluent-org/logger`.
    Node { version: String, logger: String },
    /// `python3` that can import `fluent.sender`.
    Python { version: String, logger: String },
    /// The Go program, built offline against Debian's package.
    Go { version: String, binary: PathBuf },
}

/// `Some(tool)`, or `None` after printing why the test is skipped; under `CI` a missing tool
/// panics instead (CI installs every one of them).
pub fn tool_or_skip(test: &str, found: Result<Tool, String>) -> Option<Tool> {
    match found {
        Ok(tool) => {
            eprintln!("[{test}] using {tool:?}");
            Some(tool)
        }
        Err(reason) => {
            skip(
                test,
                &format!("{reason}; run .ci/run's install section to test it"),
            );
            None
        }
    }
}

/// Run a probe command with a deadline; its trimmed stdout, or why it failed.
fn probe(program: &str, args: &[&str], cwd: Option<&Path>) -> Result<String, String> {
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    if let Some(dir) = cwd {
        command.current_dir(dir);
    }
    let mut proc = Proc::try_spawn(program, command)
        .map_err(|e| format!("`{program}` cannot be started: {e}"))?;
    let stdout = proc.take_stdout();
    let status = proc.wait(Duration::from_secs(60));
    let out = stdout.finish();
    if !status.success() {
        return Err(format!(
            "`{program} {}` failed ({status}): {}",
            args.join(" "),
            proc.stderr_text()
        ));
    }
    Ok(out.trim().to_string())
}

/// Node.js and `@fluent-org/logger` from `tests/interop/node_modules`.
pub fn node_tool() -> Result<Tool, String> {
    let version = probe("node", &["--version"], None)?;
    let package = interop_dir().join("node_modules/@fluent-org/logger/package.json");
    let text = std::fs::read_to_string(&package)
        .map_err(|e| format!("{} is missing ({e})", package.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", package.display()))?;
    let logger = json["version"].as_str().unwrap_or("?").to_string();
    Ok(Tool::Node { version, logger })
}

/// `python3` with fluent-logger installed.
pub fn python_tool() -> Result<Tool, String> {
    let version = probe("python3", &["--version"], None)?;
    let logger = probe(
        "python3",
        &[
            "-c",
            "import importlib.metadata as m, fluent.sender; print(m.version('fluent-logger'))",
        ],
        None,
    )?;
    Ok(Tool::Python { version, logger })
}

/// Where Debian's golang-github-fluent-fluent-logger-golang-dev puts its source (GOPATH mode).
pub const DEBIAN_GOPATH: &str = "/usr/share/gocode";

/// The Go client, built once per test binary into the cargo target dir, with no network:
/// GOPATH mode over Debian's packaged source (its source has no go.mod, so a module `replace`
/// cannot point at it), GOPROXY=off, and a build cache under the target dir.
pub fn go_tool() -> Result<Tool, String> {
    static BUILT: OnceLock<Result<Tool, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let version = probe("go", &["version"], None)?;
            let library =
                Path::new(DEBIAN_GOPATH).join("src/github.com/fluent/fluent-logger-golang");
            if !library.join("fluent/fluent.go").is_file() {
                return Err(format!(
                    "{} is missing (Debian package golang-github-fluent-fluent-logger-golang-dev)",
                    library.display()
                ));
            }
            let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("interop-go");
            std::fs::create_dir_all(&out_dir).map_err(|e| format!("{}: {e}", out_dir.display()))?;
            let binary = out_dir.join("go_logger");
            let mut command = Command::new("go");
            command
                .args(["build", "-o"])
                .arg(&binary)
                .arg("./go_logger")
                .current_dir(interop_dir())
                .env("GO111MODULE", "off")
                .env("GOPATH", DEBIAN_GOPATH)
                .env("GOPROXY", "off")
                .env("GOFLAGS", "")
                .env("GOCACHE", out_dir.join("cache"))
                .stdin(Stdio::null())
                .stdout(Stdio::null());
            let started = Instant::now();
            let mut proc = Proc::try_spawn("go build", command)
                .map_err(|e| format!("`go build` cannot be started: {e}"))?;
            let status = proc.wait(Duration::from_secs(300));
            if !status.success() {
                return Err(format!(
                    "`go build` failed ({status}): {}",
                    proc.stderr_text()
                ));
            }
            eprintln!("[go build] {} in {:?}", binary.display(), started.elapsed());
            Ok(Tool::Go { version, binary })
        })
        .clone()
}

// ------------------------------------------------------------------------------------------------
// Running a client

/// What a client run left behind.
#[derive(Debug)]
pub struct ClientRun {
    pub status: ExitStatus,
    /// The last stdout line, parsed (`Null` if it was not JSON).
    pub summary: serde_json::Value,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl ClientRun {
    /// Panic unless the client exited 0; the message has its summary and stderr.
    pub fn assert_success(&self, what: &str) {
        assert!(
            self.status.success(),
            "{what} exited with {}; summary {}; stderr:\n{}",
            self.status,
            self.summary,
            self.stderr
        );
    }

    /// A number from the summary.
    pub fn count(&self, key: &str) -> u64 {
        self.summary[key]
            .as_u64()
            .unwrap_or_else(|| panic!("client summary has no number {key:?}: {}", self.summary))
    }
}

/// Run `command` (stdin closed, stdout and stderr collected) and wait at most `timeout`
/// (SIGKILL and panic past it).
pub fn run_client(name: &str, mut command: Command, timeout: Duration) -> ClientRun {
    command.stdin(Stdio::null()).stdout(Stdio::piped());
    let started = Instant::now();
    let mut proc =
        Proc::try_spawn(name, command).unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
    let stdout = proc.take_stdout();
    let status = proc.wait(timeout);
    let elapsed = started.elapsed();
    let stdout = stdout.finish();
    let summary = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or(serde_json::Value::Null);
    eprintln!("[{name}] exit {status} after {elapsed:?}: {summary}");
    ClientRun {
        status,
        summary,
        stdout,
        stderr: proc.stderr_text(),
        elapsed,
    }
}

// ------------------------------------------------------------------------------------------------
// The recording proxy

/// What one proxied connection carried.
#[derive(Debug, Clone, Default)]
pub struct ConnRecord {
    /// Client → ackgate bytes.
    pub up: Vec<u8>,
    /// Ackgate → client bytes.
    pub down: Vec<u8>,
    /// `(up.len(), down.len())` after every read, in the order the reads were recorded.
    pub marks: Vec<(usize, usize)>,
    /// The client's side ended (EOF or error) and was passed on.
    pub up_done: bool,
    pub down_done: bool,
}

#[derive(Default)]
struct ProxyState {
    conns: Vec<ConnRecord>,
    /// Clones of every socket, shut down when the proxy is dropped so no pump outlives it.
    sockets: Vec<TcpStream>,
}

struct ProxyShared {
    target: SocketAddr,
    stop: AtomicBool,
    state: Mutex<ProxyState>,
    changed: Condvar,
}

/// A TCP proxy on 127.0.0.1:0 that forwards to `target` and records both directions.
pub struct RecordingProxy {
    addr: SocketAddr,
    shared: Arc<ProxyShared>,
    accept_thread: Option<JoinHandle<()>>,
}

#[derive(Clone, Copy)]
enum Direction {
    Up,
    Down,
}

impl RecordingProxy {
    pub fn start(target: SocketAddr) -> RecordingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy bind");
        let addr = listener.local_addr().expect("proxy addr");
        let shared = Arc::new(ProxyShared {
            target,
            stop: AtomicBool::new(false),
            state: Mutex::new(ProxyState::default()),
            changed: Condvar::new(),
        });
        let accept_shared = shared.clone();
        let accept_thread = std::thread::spawn(move || accept_loop(listener, accept_shared));
        RecordingProxy {
            addr,
            shared,
            accept_thread: Some(accept_thread),
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Wait until at least one connection was accepted and every accepted connection's client
    /// side has ended (so everything the client wrote is recorded); returns the records.
    pub fn wait_clients_done(&self, timeout: Duration) -> Vec<ConnRecord> {
        let (state, held) =
            wait_for_condition(&self.shared.state, &self.shared.changed, timeout, |s| {
                !s.conns.is_empty() && s.conns.iter().all(|c| c.up_done)
            });
        if !held {
            let open = state.conns.iter().filter(|c| !c.up_done).count();
            panic!(
                "proxy: {} connections, {open} still open from the client side after {timeout:?}",
                state.conns.len()
            );
        }
        state.conns.clone()
    }

    pub fn connections(&self) -> Vec<ConnRecord> {
        lock(&self.shared.state).conns.clone()
    }
}

impl Drop for RecordingProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        for socket in &lock(&self.shared.state).sockets {
            let _ = socket.shutdown(Shutdown::Both);
        }
        if let Some(thread) = self.accept_thread.take() {
            let _ = thread.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<ProxyShared>) {
    for client in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else { continue };
        let upstream = match TcpStream::connect_timeout(&shared.target, Duration::from_secs(5)) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("[proxy] cannot reach {}: {e}", shared.target);
                continue;
            }
        };
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        let (Ok(client2), Ok(upstream2), Ok(c3), Ok(u3)) = (
            client.try_clone(),
            upstream.try_clone(),
            client.try_clone(),
            upstream.try_clone(),
        ) else {
            continue;
        };
        let index = {
            let mut state = lock(&shared.state);
            state.conns.push(ConnRecord::default());
            state.sockets.push(c3);
            state.sockets.push(u3);
            state.conns.len() - 1
        };
        shared.changed.notify_all();
        let up_shared = shared.clone();
        std::thread::spawn(move || pump(client, upstream, index, Direction::Up, up_shared));
        let down_shared = shared.clone();
        std::thread::spawn(move || pump(upstream2, client2, index, Direction::Down, down_shared));
    }
}

/// Copy `from` → `to`, recording each read before passing it on, so a reply is never
/// recorded before the request that caused it.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    index: usize,
    dir: Direction,
    shared: Arc<ProxyShared>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        {
            let mut state = lock(&shared.state);
            let conn = &mut state.conns[index];
            match dir {
                Direction::Up => conn.up.extend_from_slice(&buf[..n]),
                Direction::Down => conn.down.extend_from_slice(&buf[..n]),
            }
            let mark = (conn.up.len(), conn.down.len());
            conn.marks.push(mark);
        }
        shared.changed.notify_all();
        if to.write_all(&buf[..n]).is_err() {
            let _ = from.shutdown(Shutdown::Read);
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    {
        let mut state = lock(&shared.state);
        let conn = &mut state.conns[index];
        match dir {
            Direction::Up => conn.up_done = true,
            Direction::Down => conn.down_done = true,
        }
    }
    shared.changed.notify_all();
}

// ------------------------------------------------------------------------------------------------
// Decoding what was recorded

/// One request a client wrote.
#[derive(Debug, Clone)]
pub struct ClientRequest {
    pub mode: Mode,
    pub tag: String,
    /// Raw `[time, record]` entries as ackgate's codec slices them.
    pub entries: Vec<Vec<u8>>,
    /// The chunk option's content, if any.
    pub chunk: Option<String>,
    /// Offset in the connection's client bytes where the request ends.
    pub end: usize,
}

/// A client's side of one connection.
#[derive(Debug, Clone, Default)]
pub struct ClientStream {
    /// The shared-key PING, when the connection started with one.
    pub ping: Option<Ping>,
    pub requests: Vec<ClientRequest>,
}

/// Split a client's bytes: an optional PING first (shared-key handshake), then Forward requests
/// decoded by ackgate's [`FrameDecoder`]. Panics on anything else or on trailing bytes.
pub fn decode_client_stream(bytes: &[u8]) -> ClientStream {
    let mut stream = ClientStream::default();
    let mut offset = 0;
    if let Ok(Some(n)) = value_len(bytes, DEPTH) {
        if let Ok(ping) = parse_ping(&bytes[..n]) {
            stream.ping = Some(ping);
            offset = n;
        }
    }
    let limits = Limits {
        max_frame_bytes: 256 << 20,
        ..Limits::default()
    };
    let mut decoder = FrameDecoder::new(limits);
    let mut buf = BytesMut::from(&bytes[offset..]);
    loop {
        let before = buf.len();
        match decoder.decode(&mut buf) {
            Ok(Some(Decoded::Frame(frame))) => {
                offset += before - buf.len();
                stream.requests.push(ClientRequest {
                    mode: frame.mode,
                    tag: String::from_utf8_lossy(&frame.tag).into_owned(),
                    entries: split_entries(&frame.entries),
                    chunk: frame.chunk.as_deref().and_then(raw_string),
                    end: offset,
                });
            }
            Ok(Some(Decoded::Nil)) => offset += before - buf.len(),
            Ok(None) => break,
            Err(e) => panic!("client bytes at offset {offset} are not a Forward request: {e}"),
        }
    }
    assert!(
        buf.is_empty(),
        "client stream ends with {} bytes of an incomplete request",
        buf.len()
    );
    stream
}

/// Ackgate's side of one connection.
#[derive(Debug, Clone, Default)]
pub struct ServerStream {
    pub helo: Option<Helo>,
    pub pong: Option<Pong>,
    /// Ack ids (content of the `ack` value) with the offset where each ack ends.
    pub acks: Vec<(String, usize)>,
}

/// Split ackgate's replies: HELO and PONG arrays, then `{"ack": id}` maps. Panics on anything
/// else (a JSON ack, garbage) or on trailing bytes.
pub fn decode_server_stream(bytes: &[u8]) -> ServerStream {
    let mut stream = ServerStream::default();
    let mut pos = 0;
    while pos < bytes.len() {
        let rest = &bytes[pos..];
        let n = match value_len(rest, DEPTH) {
            Ok(Some(n)) => n,
            other => panic!("ackgate's reply at offset {pos} is not msgpack ({other:?})"),
        };
        let value = &rest[..n];
        match read_header(value) {
            Some(Header::Map { .. }) => {
                let (id, used) = decode_ack(value, n)
                    .unwrap_or_else(|e| panic!("reply at offset {pos} is not an ack: {e}"))
                    .unwrap_or_else(|| panic!("reply at offset {pos} is incomplete"));
                assert_eq!(used, n);
                stream
                    .acks
                    .push((String::from_utf8_lossy(id).into_owned(), pos + n));
            }
            Some(Header::Array { .. }) => {
                if let Ok(helo) = parse_helo(value) {
                    stream.helo = Some(helo);
                } else if let Ok(pong) = parse_pong(value) {
                    stream.pong = Some(pong);
                } else {
                    panic!("reply at offset {pos} is an array but neither HELO nor PONG");
                }
            }
            _ => panic!("reply at offset {pos} is neither a map nor a handshake array"),
        }
        pos += n;
    }
    stream
}

/// The most chunks one connection had written and not yet had acked, at any recorded moment.
/// A lower bound of what the client saw: requests are recorded after the client wrote them,
/// acks before the client read them.
pub fn max_in_flight(conn: &ConnRecord, client: &ClientStream, server: &ServerStream) -> usize {
    let request_ends: Vec<usize> = client
        .requests
        .iter()
        .filter(|r| r.chunk.is_some())
        .map(|r| r.end)
        .collect();
    let ack_ends: Vec<usize> = server.acks.iter().map(|(_, end)| *end).collect();
    conn.marks
        .iter()
        .map(|&(up, down)| {
            let sent = request_ends.partition_point(|&end| end <= up);
            let acked = ack_ends.partition_point(|&end| end <= down);
            sent.saturating_sub(acked)
        })
        .max()
        .unwrap_or(0)
}
