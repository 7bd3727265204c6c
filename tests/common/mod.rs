//! Shared support for the end-to-end tests: the real `ackgate` binary, a real Forward
//! aggregator, and raw senders that write the bytes legacy clients write. No mocks: the binary
//! is the one cargo built, the aggregator decodes with ackgate's own codec and acks like
//! fluentd's in_forward, and the senders are plain sockets.
//!
//! Every wait here has a deadline and is woken by an event (a log line, a request read by the
//! aggregator), never by a sleep; on timeout it panics with what it saw so far.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ackgate::forward::ack::encode_ack;
use ackgate::forward::entries::entry_len;
use ackgate::forward::frame::read_int;
use ackgate::forward::msgpack::{read_header, value_len, Header};
use ackgate::forward::{Decoded, Frame, FrameDecoder, Limits};
use bytes::BytesMut;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// Nesting limit used when the tests walk msgpack themselves.
pub const DEPTH: usize = 64;
/// How long ackgate may take to print its ready line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

// ------------------------------------------------------------------------------------------------
// Log collection

/// Lines a child wrote to stderr, with a condition variable signalled on every new line.
#[derive(Default)]
pub struct LogLines {
    lines: Mutex<Vec<String>>,
    added: Condvar,
}

impl LogLines {
    fn push(&self, line: String) {
        lock(&self.lines).push(line);
        self.added.notify_all();
    }

    /// Every line so far.
    pub fn all(&self) -> Vec<String> {
        lock(&self.lines).clone()
    }

    /// Number of lines so far (a mark for [`LogLines::wait_for_from`]).
    pub fn len(&self) -> usize {
        lock(&self.lines).len()
    }

    /// Wait for a line at index ≥ `from` that satisfies `matches`; `None` on timeout.
    pub fn wait_for_from(
        &self,
        from: usize,
        timeout: Duration,
        matches: impl Fn(&str) -> bool,
    ) -> Option<String> {
        let mut checked = from;
        let mut found = None;
        let _ = wait_for_condition(&self.lines, &self.added, timeout, |lines| {
            found = lines[checked.min(lines.len())..]
                .iter()
                .find(|l| matches(l))
                .cloned();
            checked = lines.len();
            found.is_some()
        });
        found
    }

    /// The whole log, for panic messages.
    pub fn dump(&self) -> String {
        lock(&self.lines).join("\n")
    }
}

/// Lock, ignoring poisoning (a panicking test thread must not hide the real failure).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Wait until `done` holds over the value behind `mutex`, checking again each time `changed`
/// is signalled, for at most `timeout`. Returns the guard and whether `done` held (false: the
/// deadline passed). Every event-driven wait of the test support goes through here.
pub fn wait_for_condition<'a, T>(
    mutex: &'a Mutex<T>,
    changed: &Condvar,
    timeout: Duration,
    mut done: impl FnMut(&T) -> bool,
) -> (MutexGuard<'a, T>, bool) {
    let deadline = Instant::now() + timeout;
    let mut guard = lock(mutex);
    loop {
        if done(&guard) {
            return (guard, true);
        }
        let now = Instant::now();
        if now >= deadline {
            return (guard, false);
        }
        guard = changed
            .wait_timeout(guard, deadline - now)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
}

/// Read `stream` line by line into `log`, echoing each line to the test's stderr.
pub fn collect_lines(
    prefix: String,
    stream: impl Read + Send + 'static,
    log: Arc<LogLines>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut raw = Vec::new();
        loop {
            raw.clear();
            match reader.read_until(b'\n', &mut raw) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&raw).trim_end().to_string();
                    eprintln!("[{prefix}] {line}");
                    log.push(line);
                }
            }
        }
    })
}

// ------------------------------------------------------------------------------------------------
// The ackgate process

/// Builds the TOML config of an [`Ackgate`].
pub struct AckgateBuilder {
    nodes: Vec<(String, String)>,
    overrides: Vec<(String, String)>,
    /// Write the harness's short upstream timing (retry_initial, retry_max, connect_timeout,
    /// shutdown_grace) before the overrides; off with [`AckgateBuilder::product_upstream_timing`].
    harness_timing: bool,
    envs: Vec<(String, String)>,
}

impl AckgateBuilder {
    /// Add an upstream node.
    pub fn node(mut self, name: &str, address: SocketAddr) -> Self {
        self.nodes.push((name.to_string(), address.to_string()));
        self
    }

    /// Leave ackgate's own defaults for the upstream timing (retry_initial, retry_max,
    /// connect_timeout, shutdown_grace) instead of the harness's short ones, for tests whose
    /// point is the timing a user gets out of the box.
    pub fn product_upstream_timing(mut self) -> Self {
        self.harness_timing = false;
        self
    }

    /// Merge TOML keys into a section, e.g. `section("upstream", r#"ack_timeout = "1s""#)`.
    /// Later keys win over the defaults the harness writes.
    pub fn section(mut self, name: &str, toml_keys: &str) -> Self {
        self.overrides
            .push((name.to_string(), toml_keys.to_string()));
        self
    }

    /// Set an environment variable for the `ackgate run` process, on every (re)start.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.envs.push((key.to_string(), value.to_string()));
        self
    }

    /// Write the config into a new temp dir and start the binary.
    pub fn start(self) -> Ackgate {
        let dir = tempfile::tempdir().expect("create temp dir");
        let config_path = dir.path().join("ackgate.toml");
        let spool_path = dir.path().join("spool").join("spool.redb");
        let text = self.render(&spool_path);
        std::fs::write(&config_path, &text).expect("write config");
        let mut gate = Ackgate {
            dir,
            config_path,
            spool_path,
            child: None,
            stderr_thread: None,
            addr: "127.0.0.1:0".parse().expect("addr"),
            log: Arc::new(LogLines::default()),
            generation: 0,
            envs: self.envs.clone(),
        };
        gate.spawn();
        gate
    }

    fn render(&self, spool_path: &Path) -> String {
        let mut root = toml::Table::new();
        let mut ingress = toml::Table::new();
        ingress.insert("listen".into(), "127.0.0.1:0".into());
        let mut spool = toml::Table::new();
        spool.insert(
            "path".into(),
            spool_path.to_string_lossy().into_owned().into(),
        );
        // Test-friendly upstream timing; tests that care override it, or leave the product's
        // defaults with `product_upstream_timing`.
        let mut upstream = toml::Table::new();
        if self.harness_timing {
            upstream.insert("retry_initial".into(), "100ms".into());
            upstream.insert("retry_max".into(), "1s".into());
            upstream.insert("connect_timeout".into(), "2s".into());
            upstream.insert("shutdown_grace".into(), "3s".into());
        }
        let nodes: Vec<toml::Value> = self
            .nodes
            .iter()
            .map(|(name, address)| {
                let mut node = toml::Table::new();
                node.insert("address".into(), address.clone().into());
                node.insert("name".into(), name.clone().into());
                toml::Value::Table(node)
            })
            .collect();
        upstream.insert("nodes".into(), toml::Value::Array(nodes));
        let mut log = toml::Table::new();
        log.insert("level".into(), "info".into());
        log.insert("format".into(), "text".into());
        root.insert("ingress".into(), ingress.into());
        root.insert("spool".into(), spool.into());
        root.insert("upstream".into(), upstream.into());
        root.insert("log".into(), log.into());
        for (section, keys) in &self.overrides {
            let parsed: toml::Table = toml::from_str(keys)
                .unwrap_or_else(|e| panic!("bad test override for [{section}]: {e}\n{keys}"));
            let table = root
                .entry(section.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .unwrap_or_else(|| panic!("[{section}] is not a table"));
            for (k, v) in parsed {
                table.insert(k, v);
            }
        }
        toml::to_string(&root).expect("render config")
    }
}

/// A running `ackgate run` child process with its stderr collected.
pub struct Ackgate {
    dir: TempDir,
    config_path: PathBuf,
    spool_path: PathBuf,
    child: Option<Child>,
    stderr_thread: Option<JoinHandle<()>>,
    addr: SocketAddr,
    log: Arc<LogLines>,
    generation: u32,
    /// Extra environment of the child, from [`AckgateBuilder::env`].
    envs: Vec<(String, String)>,
}

impl Ackgate {
    pub fn builder() -> AckgateBuilder {
        AckgateBuilder {
            nodes: Vec::new(),
            overrides: Vec::new(),
            harness_timing: true,
            envs: Vec::new(),
        }
    }

    /// Start with one upstream node and default settings.
    pub fn start(node: SocketAddr) -> Ackgate {
        Ackgate::builder().node("agg", node).start()
    }

    fn spawn(&mut self) {
        self.generation += 1;
        let mark = self.log.len();
        let mut child = Command::new(env!("CARGO_BIN_EXE_ackgate"))
            .arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .env_remove("RUST_LOG")
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ackgate");
        let stderr = child.stderr.take().expect("stderr piped");
        self.stderr_thread = Some(collect_lines(
            format!("ackgate#{}", self.generation),
            stderr,
            self.log.clone(),
        ));
        self.child = Some(child);
        let line = self
            .log
            .wait_for_from(mark, READY_TIMEOUT, |l| {
                l.contains("ackgate ready") && l.contains("listen=")
            })
            .unwrap_or_else(|| {
                panic!(
                    "ackgate printed no ready line within {READY_TIMEOUT:?}; config:\n{}\nlog:\n{}",
                    std::fs::read_to_string(&self.config_path).unwrap_or_default(),
                    self.log.dump()
                )
            });
        self.addr = parse_listen(&line)
            .unwrap_or_else(|| panic!("cannot parse listen=ADDR from ready line {line:?}"));
    }

    /// The address senders connect to (TCP and UDP heartbeat).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(|c| c.id())
            .expect("ackgate not running")
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn spool_path(&self) -> &Path {
        &self.spool_path
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log(&self) -> &LogLines {
        &self.log
    }

    /// Mark the log: [`Ackgate::wait_for_log_since`] looks only at lines after it.
    pub fn log_mark(&self) -> usize {
        self.log.len()
    }

    /// Wait for a log line containing `needle`; panics with the whole log on timeout.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        self.wait_for_line(0, timeout, &[needle])
    }

    /// Wait for a log line, after `mark`, containing every one of `needles`.
    pub fn wait_for_log_since(&self, mark: usize, needles: &[&str], timeout: Duration) -> String {
        self.wait_for_line(mark, timeout, needles)
    }

    fn wait_for_line(&self, mark: usize, timeout: Duration, needles: &[&str]) -> String {
        self.log
            .wait_for_from(mark, timeout, |l| needles.iter().all(|n| l.contains(n)))
            .unwrap_or_else(|| {
                panic!(
                    "no ackgate log line containing {needles:?} within {timeout:?}; log:\n{}",
                    self.log.dump()
                )
            })
    }

    /// Lines containing every one of `needles`.
    pub fn log_lines_with(&self, needles: &[&str]) -> Vec<String> {
        self.log
            .all()
            .into_iter()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .collect()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.join_stderr();
    }

    /// SIGTERM, then wait up to `timeout` for the exit (SIGKILL and panic if it hangs).
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("ackgate not running");
        send_signal(child.id(), libc::SIGTERM);
        let status = wait_child(&mut child, timeout);
        self.join_stderr();
        status.unwrap_or_else(|| {
            panic!(
                "ackgate did not exit within {timeout:?} of SIGTERM; log:\n{}",
                self.log.dump()
            )
        })
    }

    /// Start again on the same config and spool (the port is new: listen is 127.0.0.1:0).
    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.kill9();
        }
        self.spawn();
    }

    fn join_stderr(&mut self) {
        if let Some(thread) = self.stderr_thread.take() {
            // The pipe closes when the child exits; the thread then ends.
            let _ = thread.join();
        }
    }
}

impl Drop for Ackgate {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn parse_listen(line: &str) -> Option<SocketAddr> {
    let start = line.find("listen=")? + "listen=".len();
    let rest = &line[start..];
    let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// A child process of the test with its stderr collected line by line (for the `receive`
/// and `send` tools and one-shot commands).
pub struct Proc {
    pub child: Child,
    pub log: Arc<LogLines>,
    stderr_thread: Option<JoinHandle<()>>,
}

impl Proc {
    /// Spawn `ackgate <args>` with stderr piped; stdin and stdout are as given in `command`.
    pub fn spawn(name: &str, mut command: Command) -> Proc {
        let mut child = command
            .env_remove("RUST_LOG")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let log = Arc::new(LogLines::default());
        let stderr = child.stderr.take().expect("stderr piped");
        let stderr_thread = Some(collect_lines(name.to_string(), stderr, log.clone()));
        Proc {
            child,
            log,
            stderr_thread,
        }
    }

    /// Wait for a stderr line containing `needle`; panics with the log on timeout.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        self.log
            .wait_for_from(0, timeout, |l| l.contains(needle))
            .unwrap_or_else(|| {
                panic!(
                    "no line containing {needle:?} within {timeout:?}; stderr:\n{}",
                    self.log.dump()
                )
            })
    }

    /// Wait for the exit (SIGKILL and panic past `timeout`); stderr is complete afterwards.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let status = wait_child(&mut self.child, timeout);
        if let Some(thread) = self.stderr_thread.take() {
            let _ = thread.join();
        }
        status.unwrap_or_else(|| {
            panic!(
                "process did not exit within {timeout:?}; stderr:\n{}",
                self.log.dump()
            )
        })
    }

    /// SIGTERM and wait.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        send_signal(self.child.id(), libc::SIGTERM);
        self.wait(timeout)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ackgate` with these arguments.
pub fn ackgate_command<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut command = Command::new(env!("CARGO_BIN_EXE_ackgate"));
    command.args(args).env_remove("RUST_LOG");
    command
}

pub fn send_signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) on a pid we spawned and have not reaped yet.
    let rc = unsafe { libc::kill(pid as libc::pid_t, signal) };
    assert_eq!(rc, 0, "kill({pid}, {signal}) failed");
}

/// Wait for a child with a deadline; SIGKILL it (and return `None`) if it does not exit.
pub fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        // std has no wait-with-timeout; a short poll with a hard deadline is the only option.
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A port that was free a moment ago (bind, read the port, close).
pub fn free_port() -> u16 {
    let listener = StdListener::bind("127.0.0.1:0").expect("bind probe");
    listener.local_addr().expect("probe addr").port()
}

// ------------------------------------------------------------------------------------------------
// The aggregator

/// How the aggregator answers requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckMode {
    /// `{"ack": <chunk>}` for every request with a chunk, like fluentd's in_forward.
    Ack,
    /// Read and record, never answer: the seed failure (a receiver that hangs).
    NeverAck,
    /// Read one request, record it, close the connection without an answer.
    CloseAfterRead,
}

/// One request the aggregator read.
#[derive(Debug, Clone)]
pub struct UpRequest {
    /// Which accepted connection it came on (1-based, across restarts).
    pub conn: u64,
    pub tag: Vec<u8>,
    /// Concatenated raw `[time, record]` entries.
    pub entries: Vec<u8>,
    pub events: u32,
    /// The chunk option as a string (its content), if present.
    pub chunk: Option<String>,
    /// The chunk option as raw msgpack bytes (header included).
    pub chunk_raw: Option<Vec<u8>>,
    /// The `size` option, if present.
    pub size: Option<i64>,
    /// Request array marker (0x93 for ackgate's PackedForward).
    pub array_marker: u8,
    /// Marker of the second element (0xdb: str32 entries).
    pub entries_marker: u8,
    /// Whether this chunk id had already been acked by this aggregator when it arrived.
    pub resent_after_ack: bool,
    /// Whether the aggregator answered this request with an ack.
    pub acked: bool,
    /// When it was read.
    pub at: Instant,
}

impl UpRequest {
    /// The entries split into individual raw entries.
    pub fn split_events(&self) -> Vec<Vec<u8>> {
        split_entries(&self.entries)
    }
}

#[derive(Default)]
struct AggState {
    requests: Vec<UpRequest>,
    acked_ids: HashMap<String, u32>,
    connections: u64,
    errors: Vec<String>,
}

struct AggShared {
    state: Mutex<AggState>,
    changed: Condvar,
    mode: Mutex<AckMode>,
}

impl AggShared {
    fn notify(&self) {
        self.changed.notify_all();
    }
}

/// A real Forward aggregator on 127.0.0.1, on its own tokio runtime so it can be used from
/// any test (sync or async) and stopped and restarted on the same port.
pub struct Aggregator {
    shared: Arc<AggShared>,
    runtime: Option<tokio::runtime::Runtime>,
    addr: SocketAddr,
    running: Option<Running>,
}

struct Running {
    stop: CancellationToken,
    listener_task: tokio::task::JoinHandle<()>,
    tracker: tokio_util::task::TaskTracker,
}

impl Aggregator {
    /// Listen on a free port in [`AckMode::Ack`].
    pub fn start() -> Aggregator {
        Aggregator::start_with(0, AckMode::Ack)
    }

    /// Listen on `port` (0 = any free one) in `mode`.
    pub fn start_with(port: u16, mode: AckMode) -> Aggregator {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("aggregator runtime");
        let shared = Arc::new(AggShared {
            state: Mutex::new(AggState::default()),
            changed: Condvar::new(),
            mode: Mutex::new(mode),
        });
        let mut agg = Aggregator {
            shared,
            runtime: Some(runtime),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            running: None,
        };
        agg.listen(port);
        agg
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.runtime.as_ref().expect("runtime")
    }

    fn listen(&mut self, port: u16) {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let listener = self
            .rt()
            .block_on(tokio::net::TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("aggregator cannot bind {addr}: {e}"));
        self.addr = listener.local_addr().expect("aggregator addr");
        let stop = CancellationToken::new();
        let tracker = tokio_util::task::TaskTracker::new();
        let shared = self.shared.clone();
        let listener_task =
            self.rt()
                .spawn(accept_loop(listener, shared, stop.clone(), tracker.clone()));
        self.running = Some(Running {
            stop,
            listener_task,
            tracker,
        });
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn set_mode(&self, mode: AckMode) {
        *lock(&self.shared.mode) = mode;
    }

    /// Abort the listener and every connection (RST), and wait until they are gone.
    pub fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop.cancel();
            let rt = self.runtime.as_ref().expect("runtime");
            rt.block_on(async {
                let _ = running.listener_task.await;
                running.tracker.close();
                running.tracker.wait().await;
            });
        }
    }

    /// Listen again on the same port, keeping what was recorded.
    pub fn restart(&mut self) {
        self.stop();
        let port = self.addr.port();
        self.listen(port);
    }

    pub fn requests(&self) -> Vec<UpRequest> {
        lock(&self.shared.state).requests.clone()
    }

    /// Every event received, as raw entry bytes, in arrival order (duplicates included).
    pub fn events(&self) -> Vec<Vec<u8>> {
        lock(&self.shared.state)
            .requests
            .iter()
            .flat_map(|r| r.split_events())
            .collect()
    }

    pub fn event_count(&self) -> usize {
        lock(&self.shared.state)
            .requests
            .iter()
            .map(|r| r.events as usize)
            .sum()
    }

    /// Chunk ids of every request, in arrival order (with repeats).
    pub fn chunk_ids_seen(&self) -> Vec<String> {
        lock(&self.shared.state)
            .requests
            .iter()
            .filter_map(|r| r.chunk.clone())
            .collect()
    }

    /// Times each chunk id was received.
    pub fn chunk_id_counts(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for id in self.chunk_ids_seen() {
            *counts.entry(id).or_insert(0) += 1;
        }
        counts
    }

    /// Chunk ids this aggregator acked.
    pub fn acked_ids(&self) -> HashMap<String, u32> {
        lock(&self.shared.state).acked_ids.clone()
    }

    pub fn connections(&self) -> u64 {
        lock(&self.shared.state).connections
    }

    /// Decoding errors seen on its connections (should stay empty: ackgate writes valid bytes).
    pub fn errors(&self) -> Vec<String> {
        lock(&self.shared.state).errors.clone()
    }

    /// Wait until `cond` holds over the requests received so far; panics on timeout.
    pub fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&[UpRequest]) -> bool,
    ) -> Vec<UpRequest> {
        let (state, held) =
            wait_for_condition(&self.shared.state, &self.shared.changed, timeout, |s| {
                cond(&s.requests)
            });
        if !held {
            let summary = summarize(&state.requests);
            panic!("aggregator: timed out after {timeout:?} waiting for {what}; {summary}");
        }
        state.requests.clone()
    }

    /// Wait until at least `n` events (duplicates counted) arrived; returns all events.
    pub fn wait_for_events(&self, n: usize, timeout: Duration) -> Vec<Vec<u8>> {
        self.wait_until(&format!("{n} events"), timeout, |reqs| {
            reqs.iter().map(|r| r.events as usize).sum::<usize>() >= n
        });
        self.events()
    }

    /// Wait until every event of `expected` arrived at least once; returns all events.
    pub fn wait_for_all(&self, expected: &[Vec<u8>], timeout: Duration) -> Vec<Vec<u8>> {
        let want: std::collections::HashSet<&[u8]> =
            expected.iter().map(|e| e.as_slice()).collect();
        let mut seen: std::collections::HashSet<Vec<u8>> = std::collections::HashSet::new();
        let mut scanned = 0usize;
        let (state, held) =
            wait_for_condition(&self.shared.state, &self.shared.changed, timeout, |s| {
                for r in &s.requests[scanned..] {
                    for e in r.split_events() {
                        if want.contains(e.as_slice()) {
                            seen.insert(e);
                        }
                    }
                }
                scanned = s.requests.len();
                seen.len() == want.len()
            });
        if !held {
            let summary = summarize(&state.requests);
            panic!(
                "aggregator: timed out after {timeout:?}: {} of {} expected events arrived; {summary}",
                seen.len(),
                want.len()
            );
        }
        drop(state);
        self.events()
    }
}

impl Drop for Aggregator {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            running.stop.cancel();
        }
        if let Some(rt) = self.runtime.take() {
            // Allowed from async contexts too, unlike dropping the runtime.
            rt.shutdown_background();
        }
    }
}

fn summarize(requests: &[UpRequest]) -> String {
    let events: usize = requests.iter().map(|r| r.events as usize).sum();
    let mut tags: HashMap<String, usize> = HashMap::new();
    for r in requests {
        *tags
            .entry(String::from_utf8_lossy(&r.tag).into_owned())
            .or_insert(0) += r.events as usize;
    }
    format!(
        "{} requests, {events} events so far, events per tag {tags:?}",
        requests.len()
    )
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    shared: Arc<AggShared>,
    stop: CancellationToken,
    tracker: tokio_util::task::TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.cancelled() => return,
        };
        let Ok((stream, _peer)) = accepted else {
            continue;
        };
        let conn = {
            let mut state = lock(&shared.state);
            state.connections += 1;
            state.connections
        };
        shared.notify();
        tracker.spawn(serve_upstream_conn(
            stream,
            conn,
            shared.clone(),
            stop.clone(),
        ));
    }
}

/// An aggregator's side of one connection from ackgate: the requests read so far.
pub struct UpstreamReader {
    decoder: FrameDecoder,
    buf: BytesMut,
}

impl Default for UpstreamReader {
    fn default() -> Self {
        UpstreamReader {
            decoder: FrameDecoder::new(Limits {
                max_frame_bytes: 256 << 20,
                ..Limits::default()
            }),
            buf: BytesMut::with_capacity(64 * 1024),
        }
    }
}

impl UpstreamReader {
    /// Read until at least one whole request is buffered and return every buffered request as
    /// (its raw bytes, the frame). `Ok(None)`: the connection ended, or `stop` fired (then the
    /// socket is reset). `Err`: ackgate sent something invalid.
    pub async fn next_requests(
        &mut self,
        stream: &mut tokio::net::TcpStream,
        stop: &CancellationToken,
    ) -> Result<Option<Vec<(Vec<u8>, Frame)>>, String> {
        loop {
            let mut out = Vec::new();
            // Keep each raw request too, to check ackgate's own option map and markers.
            while let Some(n) =
                value_len(&self.buf, DEPTH).map_err(|e| format!("bad msgpack: {e}"))?
            {
                let raw = self.buf[..n].to_vec();
                match self.decoder.decode(&mut self.buf) {
                    Ok(Some(Decoded::Frame(frame))) => out.push((raw, frame)),
                    Ok(Some(Decoded::Nil)) => {}
                    Ok(None) => return Err("decoder wanted more bytes".into()),
                    Err(e) => return Err(format!("invalid request: {e}")),
                }
            }
            if !out.is_empty() {
                return Ok(Some(out));
            }
            let read = tokio::select! {
                r = stream.read_buf(&mut self.buf) => r,
                _ = stop.cancelled() => {
                    let _ = stream.set_zero_linger();
                    return Ok(None);
                }
            };
            match read {
                Ok(0) | Err(_) => return Ok(None),
                Ok(_) => {}
            }
        }
    }
}

async fn serve_upstream_conn(
    mut stream: tokio::net::TcpStream,
    conn: u64,
    shared: Arc<AggShared>,
    stop: CancellationToken,
) {
    let mut reader = UpstreamReader::default();
    loop {
        let requests = match reader.next_requests(&mut stream, &stop).await {
            Ok(Some(requests)) => requests,
            Ok(None) => return,
            Err(e) => {
                record_error(&shared, format!("conn {conn}: {e}"));
                return;
            }
        };
        for (raw, frame) in requests {
            let chunk_raw = frame.chunk.as_ref().map(|c| c.to_vec());
            let chunk = chunk_raw.as_deref().and_then(raw_string);
            let (size, entries_marker) = option_size_and_entries_marker(&raw);
            let mode = *lock(&shared.mode);
            {
                let mut state = lock(&shared.state);
                let resent_after_ack = chunk
                    .as_ref()
                    .is_some_and(|c| state.acked_ids.contains_key(c));
                state.requests.push(UpRequest {
                    conn,
                    tag: frame.tag.to_vec(),
                    entries: frame.entries.to_vec(),
                    events: frame.events,
                    chunk: chunk.clone(),
                    chunk_raw: chunk_raw.clone(),
                    size,
                    array_marker: raw[0],
                    entries_marker,
                    resent_after_ack,
                    acked: mode == AckMode::Ack && chunk.is_some(),
                    at: Instant::now(),
                });
                if mode == AckMode::Ack {
                    if let Some(c) = &chunk {
                        *state.acked_ids.entry(c.clone()).or_insert(0) += 1;
                    }
                }
            }
            shared.notify();
            match mode {
                AckMode::Ack => {
                    if let Some(raw_chunk) = &chunk_raw {
                        let mut ack = Vec::new();
                        encode_ack(raw_chunk, &mut ack);
                        if stream.write_all(&ack).await.is_err() {
                            return;
                        }
                    }
                }
                AckMode::NeverAck => {}
                AckMode::CloseAfterRead => return,
            }
        }
    }
}

fn record_error(shared: &AggShared, error: String) {
    eprintln!("[aggregator] {error}");
    lock(&shared.state).errors.push(error);
    shared.notify();
}

/// Content of a msgpack str/bin value as a (lossy) string.
pub fn raw_string(value: &[u8]) -> Option<String> {
    match read_header(value)? {
        Header::Str { offset, len } | Header::Bin { offset, len } => {
            Some(String::from_utf8_lossy(value.get(offset..offset + len)?).into_owned())
        }
        _ => None,
    }
}

/// The `size` option and the marker of the second element of a raw request.
fn option_size_and_entries_marker(raw: &[u8]) -> (Option<i64>, u8) {
    let Some(Header::Array { offset, count }) = read_header(raw) else {
        return (None, 0);
    };
    let mut pos = offset;
    let mut elements = Vec::new();
    for _ in 0..count {
        let Ok(Some(len)) = value_len(&raw[pos..], DEPTH) else {
            return (None, 0);
        };
        elements.push(pos..pos + len);
        pos += len;
    }
    let marker = elements.get(1).map(|r| raw[r.start]).unwrap_or(0);
    let Some(option) = elements.get(2) else {
        return (None, marker);
    };
    let map = &raw[option.clone()];
    let Some(Header::Map { offset, count }) = read_header(map) else {
        return (None, marker);
    };
    let mut pos = offset;
    for _ in 0..count {
        let Ok(Some(klen)) = value_len(&map[pos..], DEPTH) else {
            break;
        };
        let key = raw_string(&map[pos..pos + klen]);
        let Ok(Some(vlen)) = value_len(&map[pos + klen..], DEPTH) else {
            break;
        };
        if key.as_deref() == Some("size") {
            return (read_int(&map[pos + klen..pos + klen + vlen]), marker);
        }
        pos += klen + vlen;
    }
    (None, marker)
}

/// Split concatenated `[time, record]` entries into individual raw entries.
pub fn split_entries(entries: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut pos = 0;
    let mut index = 0u32;
    while pos < entries.len() {
        let len = entry_len(&entries[pos..], index, DEPTH)
            .unwrap_or_else(|e| panic!("upstream entries do not split at {pos}: {e}"));
        out.push(entries[pos..pos + len].to_vec());
        pos += len;
        index += 1;
    }
    out
}

// ------------------------------------------------------------------------------------------------
// Comparing events

/// Assert two collections of raw events are equal as multisets, with a readable diff.
pub fn assert_same_events(expected: &[Vec<u8>], got: &[Vec<u8>], context: &str) {
    // Sorting slices (memcmp) is cheap even in a debug build; the diff below only runs when
    // they differ.
    fn sorted(events: &[Vec<u8>]) -> Vec<&[u8]> {
        let mut v: Vec<&[u8]> = events.iter().map(|e| e.as_slice()).collect();
        v.sort_unstable();
        v
    }
    if sorted(expected) == sorted(got) {
        return;
    }
    let count = |events: &[Vec<u8>]| {
        let mut m: HashMap<Vec<u8>, i64> = HashMap::new();
        for e in events {
            *m.entry(e.clone()).or_insert(0) += 1;
        }
        m
    };
    let want = count(expected);
    let have = count(got);
    let mut missing = Vec::new();
    let mut extra = Vec::new();
    for (e, n) in &want {
        let h = have.get(e).copied().unwrap_or(0);
        if h < *n {
            missing.push((hex(e), n - h));
        }
    }
    for (e, n) in &have {
        let w = want.get(e).copied().unwrap_or(0);
        if *n > w {
            extra.push((hex(e), n - w));
        }
    }
    if !missing.is_empty() || !extra.is_empty() {
        missing.truncate(5);
        extra.truncate(5);
        panic!(
            "{context}: events differ: expected {} got {}; first missing (hex, count): {missing:?}; first extra/duplicated: {extra:?}",
            expected.len(),
            got.len()
        );
    }
}

/// Assert every expected event arrived (at least once) and nothing else did: at-least-once
/// delivery where a retry may legitimately duplicate.
pub fn assert_same_event_set(expected: &[Vec<u8>], got: &[Vec<u8>], context: &str) {
    let want: std::collections::HashSet<&Vec<u8>> = expected.iter().collect();
    let have: std::collections::HashSet<&Vec<u8>> = got.iter().collect();
    let missing: Vec<String> = want.difference(&have).take(5).map(|e| hex(e)).collect();
    let extra: Vec<String> = have.difference(&want).take(5).map(|e| hex(e)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{context}: {} expected distinct events, {} received distinct; missing {missing:?}; unexpected {extra:?}",
        want.len(),
        have.len()
    );
}

pub fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

// ------------------------------------------------------------------------------------------------
// msgpack building blocks for senders

/// fixstr (< 32 bytes), str8, str16 or str32.
pub fn mp_str(out: &mut Vec<u8>, s: &[u8]) {
    let n = s.len();
    if n < 32 {
        out.push(0xa0 | n as u8);
    } else if n < 256 {
        out.extend_from_slice(&[0xd9, n as u8]);
    } else if n < 65536 {
        out.push(0xda);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0xdb);
        out.extend_from_slice(&(n as u32).to_be_bytes());
    }
    out.extend_from_slice(s);
}

/// Old-msgpack "raw": fixraw (< 32 bytes), raw16, raw32; never str8 (fluentd v0.10 tags).
pub fn mp_raw(out: &mut Vec<u8>, s: &[u8]) {
    let n = s.len();
    if n < 32 {
        out.push(0xa0 | n as u8);
    } else if n < 65536 {
        out.push(0xda);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0xdb);
        out.extend_from_slice(&(n as u32).to_be_bytes());
    }
    out.extend_from_slice(s);
}

/// bin8, bin16 or bin32.
pub fn mp_bin(out: &mut Vec<u8>, b: &[u8]) {
    let n = b.len();
    if n < 256 {
        out.extend_from_slice(&[0xc4, n as u8]);
    } else if n < 65536 {
        out.push(0xc5);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0xc6);
        out.extend_from_slice(&(n as u32).to_be_bytes());
    }
    out.extend_from_slice(b);
}

/// str32 header + bytes (how every fluentd writes PackedForward entries).
pub fn mp_str32(out: &mut Vec<u8>, b: &[u8]) {
    out.push(0xdb);
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

/// Smallest unsigned integer encoding.
pub fn mp_uint(out: &mut Vec<u8>, n: u64) {
    ackgate::forward::packed::put_uint(out, n);
}

pub fn mp_map_header(out: &mut Vec<u8>, n: usize) {
    if n < 16 {
        out.push(0x80 | n as u8);
    } else if n < 65536 {
        out.push(0xde);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0xdf);
        out.extend_from_slice(&(n as u32).to_be_bytes());
    }
}

pub fn mp_array_header(out: &mut Vec<u8>, n: usize) {
    if n < 16 {
        out.push(0x90 | n as u8);
    } else if n < 65536 {
        out.push(0xdc);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        out.push(0xdd);
        out.extend_from_slice(&(n as u32).to_be_bytes());
    }
}

/// `{"seq": seq, "msg": msg}` as fluentd would pack it.
pub fn record(seq: u64, msg: &str) -> Vec<u8> {
    let mut out = Vec::new();
    mp_map_header(&mut out, 2);
    mp_str(&mut out, b"seq");
    mp_uint(&mut out, seq);
    mp_str(&mut out, b"msg");
    mp_str(&mut out, msg.as_bytes());
    out
}

/// A record no other test or process produces: `{"seq": <process-unique>, "msg": "<label> <n>"}`.
pub fn unique_record(label: &str) -> Vec<u8> {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let seq = NEXT.fetch_add(1, Ordering::Relaxed);
    record(seq, &format!("{label} {seq}"))
}

/// `[uint32 seconds, record]`: what v0.10/v0.12 write.
pub fn entry_int(ts: u32, record: &[u8]) -> Vec<u8> {
    let mut out = vec![0x92, 0xce];
    out.extend_from_slice(&ts.to_be_bytes());
    out.extend_from_slice(record);
    out
}

/// `[EventTime(fixext8), record]`: what fluentd v1 and fluent-bit write.
pub fn entry_eventtime(sec: u32, nsec: u32, record: &[u8]) -> Vec<u8> {
    let mut out = vec![0x92];
    out.extend_from_slice(&event_time(sec, nsec));
    out.extend_from_slice(record);
    out
}

/// EventTime as fixext8: `d7 00 <sec u32 BE> <nsec u32 BE>`.
pub fn event_time(sec: u32, nsec: u32) -> Vec<u8> {
    let mut out = vec![0xd7, 0x00];
    out.extend_from_slice(&sec.to_be_bytes());
    out.extend_from_slice(&nsec.to_be_bytes());
    out
}

/// EventTime as ext8: `c7 08 00 <sec> <nsec>`.
pub fn event_time_ext8(sec: u32, nsec: u32) -> Vec<u8> {
    let mut out = vec![0xc7, 0x08, 0x00];
    out.extend_from_slice(&sec.to_be_bytes());
    out.extend_from_slice(&nsec.to_be_bytes());
    out
}

/// A fixed, plausible timestamp for test events (2023-11-14).
pub const TS: u32 = 1_700_000_000;

/// fluentd v0.10 layout: `92 <tag> db <u32 len> <entries>`, no option.
pub fn legacy_request(tag: &str, entries: &[u8]) -> Vec<u8> {
    legacy_request_parts(tag, entries).concat()
}

/// The same bytes in the four writes fluentd v0.10 makes: header, tag, str32 length, body.
pub fn legacy_request_parts(tag: &str, entries: &[u8]) -> Vec<Vec<u8>> {
    let mut tag_bytes = Vec::new();
    mp_raw(&mut tag_bytes, tag.as_bytes());
    let mut len = vec![0xdb];
    len.extend_from_slice(&(entries.len() as u32).to_be_bytes());
    vec![vec![0x92], tag_bytes, len, entries.to_vec()]
}

/// fluentd v0.12 with `require_ack_response`: `93 <tag> db <len> <entries> {"chunk": str}`.
pub fn ack_request(tag: &str, entries: &[u8], chunk: &str) -> Vec<u8> {
    let mut out = vec![0x93];
    mp_raw(&mut out, tag.as_bytes());
    mp_str32(&mut out, entries);
    out.push(0x81);
    mp_raw(&mut out, b"chunk");
    mp_raw(&mut out, chunk.as_bytes());
    out
}

/// The ack fluentd would send for a str chunk id: `81 a3 "ack" <str chunk>`.
pub fn expected_ack(chunk: &str) -> Vec<u8> {
    let mut value = Vec::new();
    mp_raw(&mut value, chunk.as_bytes());
    let mut out = Vec::new();
    encode_ack(&value, &mut out);
    out
}

/// A v0.12-style chunk id: Base64 of 16 bytes plus "\n" (25 bytes).
pub fn v012_chunk_id(n: u64) -> String {
    use base64::Engine as _;
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&n.to_be_bytes());
    id[8..].copy_from_slice(&std::process::id().to_be_bytes().repeat(2));
    format!("{}\n", base64::engine::general_purpose::STANDARD.encode(id))
}

// ------------------------------------------------------------------------------------------------
// Raw sockets

pub fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    stream
        .set_write_timeout(Some(Duration::from_secs(20)))
        .expect("write timeout");
    stream
}

/// Write each part with its own `write_all` + `flush` (TCP_NODELAY on, so they leave as
/// separate segments), as legacy senders do.
pub fn write_parts(stream: &mut TcpStream, parts: &[Vec<u8>]) {
    let _ = stream.set_nodelay(true);
    for part in parts {
        stream.write_all(part).expect("write part");
        stream.flush().expect("flush");
    }
}

/// fluentd v0.12's ack read: one `recv(1024)`, which must hold exactly one msgpack value.
pub fn read_one_ack(stream: &mut TcpStream, timeout: Duration) -> Vec<u8> {
    stream
        .set_read_timeout(Some(timeout))
        .expect("read timeout");
    let mut buf = [0u8; 1024];
    let n = stream
        .read(&mut buf)
        .unwrap_or_else(|e| panic!("no ack within {timeout:?}: {e}"));
    assert!(n > 0, "connection closed instead of an ack");
    let got = &buf[..n];
    assert_eq!(
        value_len(got, DEPTH),
        Ok(Some(n)),
        "one recv must hold exactly one msgpack value (fluentd v0.12 unpacks it strictly): {}",
        hex(got)
    );
    assert!(
        matches!(read_header(got), Some(Header::Map { .. })),
        "ack is not a msgpack map: {}",
        hex(got)
    );
    got.to_vec()
}

/// Read until `count` complete msgpack values arrived (split across recvs as they come).
pub fn read_values(stream: &mut TcpStream, count: usize, timeout: Duration) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::new();
    let mut values = Vec::new();
    let mut chunk = [0u8; 4096];
    while values.len() < count {
        while let Ok(Some(n)) = value_len(&buf, DEPTH) {
            values.push(buf.drain(..n).collect());
            if values.len() == count {
                return values;
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "only {} of {count} values within {timeout:?}",
            values.len()
        );
        stream.set_read_timeout(Some(left)).expect("read timeout");
        match stream.read(&mut chunk) {
            Ok(0) => panic!("connection closed after {} of {count} values", values.len()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => panic!("read failed after {} of {count} values: {e}", values.len()),
        }
    }
    values
}

/// Wait until the peer closes the connection (read returns 0 or an error such as a reset).
/// Returns the bytes read before that. Panics if it stays open past `timeout`.
pub fn expect_closed(stream: &mut TcpStream, timeout: Duration) -> Vec<u8> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "connection still open after {timeout:?} (read so far: {})",
            hex(&got)
        );
        stream.set_read_timeout(Some(left)).expect("read timeout");
        match stream.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                continue
            }
            Err(_) => return got,
        }
    }
}

/// The captures directory: `$ACKGATE_CAPTURES`, else `<crate>/../shared/captures`.
pub fn captures_dir() -> PathBuf {
    match std::env::var_os("ACKGATE_CAPTURES") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/captures"),
    }
}
