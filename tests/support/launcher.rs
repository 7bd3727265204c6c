//! The one ackgate launcher: the real binary cargo built, run as `ackgate run` on a TOML config
//! written by [`AckgateBuilder`] into a temp dir (ingress on 127.0.0.1:0, a spool in the temp
//! dir, the harness's short upstream timing unless the test asks for the product's), ready when
//! it prints `ackgate ready listen=IP:PORT` (the address senders use), its stderr collected for
//! the waits on log lines. Also the one-shot commands that read the same config (`ackgate spool`,
//! `check`), and config fragments.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::process::{
    ackgate_at, ackgate_command, collect_lines, send_signal, wait_child, LineOrEnd, LogLines,
};

/// How long ackgate may take to print its ready line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long ackgate's stderr may stay open after it exited (see [`Ackgate::join_stderr`]).
const STDERR_END: Duration = Duration::from_secs(10);

/// Builds the TOML config of an [`Ackgate`].
pub struct AckgateBuilder {
    nodes: Vec<(String, String)>,
    overrides: Vec<(String, String)>,
    /// Write the harness's short upstream timing (retry_initial, retry_max, connect_timeout,
    /// shutdown_grace) before the overrides; off with [`AckgateBuilder::product_upstream_timing`].
    harness_timing: bool,
    envs: Vec<(String, String)>,
    netns: Option<String>,
    binary: Option<PathBuf>,
}

impl AckgateBuilder {
    /// Run the executable at `path` instead of the one cargo built (a copy a test can replace
    /// while ackgate runs, as an operator upgrading it does).
    pub fn binary(mut self, path: &Path) -> Self {
        self.binary = Some(path.to_path_buf());
        self
    }

    /// Run ackgate inside this network namespace (`ip netns exec`, which keeps the pid).
    pub fn netns(mut self, name: &str) -> Self {
        self.netns = Some(name.to_string());
        self
    }

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

    /// The admin/metrics listener on 127.0.0.1:0 (its address: [`metrics_addr`](super::metrics_addr)).
    pub fn metrics(self) -> Self {
        self.section("metrics", "listen = \"127.0.0.1:0\"")
    }

    /// Set an environment variable for the `ackgate run` process, on every (re)start.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.envs.push((key.to_string(), value.to_string()));
        self
    }

    /// [`AckgateBuilder::env`] for each pair (an LD_PRELOAD shim's [`EioShim::env`](super::EioShim::env)).
    pub fn envs(mut self, vars: &[(String, String)]) -> Self {
        self.envs.extend(vars.iter().cloned());
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
            start_mark: 0,
            exits_before: 0,
            generation: 0,
            envs: self.envs.clone(),
            netns: self.netns.clone(),
            binary: self
                .binary
                .clone()
                .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_ackgate"))),
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
    /// Log lines before the current incarnation's first.
    start_mark: usize,
    /// Streams of the log that had ended when the current incarnation started.
    exits_before: u64,
    generation: u32,
    /// Extra environment of the child, from [`AckgateBuilder::env`].
    envs: Vec<(String, String)>,
    /// The network namespace it runs in, from [`AckgateBuilder::netns`].
    netns: Option<String>,
    /// The executable every (re)start runs, from [`AckgateBuilder::binary`].
    binary: PathBuf,
}

impl Ackgate {
    pub fn builder() -> AckgateBuilder {
        AckgateBuilder {
            nodes: Vec::new(),
            overrides: Vec::new(),
            harness_timing: true,
            envs: Vec::new(),
            netns: None,
            binary: None,
        }
    }

    /// Start with one upstream node and default settings.
    pub fn start(node: SocketAddr) -> Ackgate {
        Ackgate::builder().node("agg", node).start()
    }

    fn spawn(&mut self) {
        self.generation += 1;
        self.start_mark = self.log.len();
        self.exits_before = self.log.ended();
        let mut child = ackgate_at(&self.binary, self.netns.as_deref())
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
            .wait_for_from(self.start_mark, READY_TIMEOUT, |l| {
                l.contains("ackgate ready") && l.contains("listen=")
            })
            .unwrap_or_else(|| {
                panic!(
                    "ackgate printed no ready line within {READY_TIMEOUT:?}; config:\n{}\nlog:\n{}",
                    std::fs::read_to_string(&self.config_path).unwrap_or_default(),
                    self.log.dump()
                )
            });
        self.addr = parse_addr_after(&line, "listen=")
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

    /// The worker: the process `ackgate run` (the supervisor, [`Ackgate::pid`]) started to
    /// read the sockets, which serves the admin API. It printed the ready line the start
    /// waited for, so it exists.
    pub fn worker_pid(&self) -> u32 {
        let supervisor = self.pid();
        super::lifecycle::worker_child(supervisor)
            .unwrap_or_else(|| panic!("ackgate run (pid {supervisor}) has no worker process"))
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

    /// The mark taken when the current incarnation was started.
    pub fn start_mark(&self) -> usize {
        self.start_mark
    }

    /// Wait for a log line containing `needle`; panics with the whole log on timeout.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        self.wait_for_log_since(0, &[needle], timeout)
    }

    /// Wait for a log line, after `mark`, containing every one of `needles`.
    pub fn wait_for_log_since(&self, mark: usize, needles: &[&str], timeout: Duration) -> String {
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

    /// Wait until ackgate has logged `n` lines containing every one of `needles`.
    pub fn wait_for_log_count(&self, needles: &[&str], n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            // Mark first: a line logged after the count below wakes the wait.
            let mark = self.log_mark();
            if self.log_lines_with(needles).len() >= n {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "fewer than {n} log lines with {needles:?} within {timeout:?}; log:\n{}",
                self.log.dump()
            );
            self.log
                .wait_for_from(mark, left, |l| needles.iter().all(|x| l.contains(x)));
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Send `signal` to the `ackgate run` process.
    pub fn signal(&self, signal: libc::c_int) {
        send_signal(self.pid(), signal);
    }

    /// The executable it runs.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// Streams of its stderr that have ended so far: a mark for [`Ackgate::wait_line_or_exit`].
    pub fn exit_mark(&self) -> u64 {
        self.log.ended()
    }

    /// Wait for a log line after `mark` containing every one of `needles`, or for the process
    /// to exit (its stderr, which nothing else holds, ends after `exit_mark`); at most
    /// `timeout`. An exited process is still to be reaped ([`Ackgate::reap`]).
    pub fn wait_line_or_exit(
        &self,
        mark: usize,
        exit_mark: u64,
        needles: &[&str],
        timeout: Duration,
    ) -> LineOrEnd {
        self.log
            .wait_for_line_or_end(mark, exit_mark, timeout, |l| {
                needles.iter().all(|n| l.contains(n))
            })
    }

    /// Wait up to `timeout` for the process to exit, without reaping it or closing its log
    /// (for a test that must act between the exit and the reap). A child's exit has no event
    /// of its own here: it is polled every 20 ms, as [`wait_child`] does.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.is_running() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// Reap a process that exited (or is exiting) by itself; its exit status, or `None` if it
    /// was not running or did not exit within `timeout` (then it is SIGKILLed).
    pub fn reap(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let status = wait_child(&mut child, timeout);
        self.join_stderr();
        status
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

    /// SIGTERM, and require the graceful exit (status 0) that commits what the spool still
    /// holds.
    pub fn terminate_cleanly(&mut self) {
        let status = self.terminate(Duration::from_secs(20));
        assert!(
            status.success(),
            "ackgate did not shut down gracefully on SIGTERM ({status}); a signal that arrives \
             before ackgate installs its handlers (it does so only after printing its ready line) \
             kills it outright, and uncommitted dead letters and deletes are lost"
        );
    }

    /// Start again on the same config and spool (the port is new unless the config was edited
    /// to pin it: listen is 127.0.0.1:0).
    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.kill9();
        }
        self.spawn();
    }

    /// Replace `from` by `to` in the config file (ackgate read it at start; the next start and
    /// `ackgate spool` read the new text). Used to pin a port chosen with `:0`.
    pub fn edit_config(&self, from: &str, to: &str) {
        let text = std::fs::read_to_string(&self.config_path).expect("read config");
        assert!(text.contains(from), "{from:?} not in the config:\n{text}");
        std::fs::write(&self.config_path, text.replace(from, to)).expect("write config");
    }

    /// Wait for the stderr reader to reach the end of the pipe, which closes when the child
    /// exits, unless a process it started outlives it holding the pipe: then, after 10 s,
    /// the reader is left to run (its lines still reach the log) and the test goes on.
    fn join_stderr(&mut self) {
        if let Some(thread) = self.stderr_thread.take() {
            let ended =
                self.log
                    .wait_for_line_or_end(usize::MAX, self.exits_before, STDERR_END, |_| false);
            if ended == LineOrEnd::Ended {
                let _ = thread.join();
            } else {
                eprintln!(
                    "ackgate#{}'s stderr is still open {STDERR_END:?} after its exit: a process \
                     it started holds it",
                    self.generation
                );
            }
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

/// The `IP:PORT` after `key` in a log line (up to the next white space).
pub fn parse_addr_after(line: &str, key: &str) -> Option<SocketAddr> {
    let start = line.find(key)? + key.len();
    let rest = &line[start..];
    let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// ackgate with an admin listener on 127.0.0.1:0, and its config rewritten to name the port
/// it got, so that commands run with `--config` find it. Returns the admin address.
pub fn start_with_admin(builder: AckgateBuilder) -> (Ackgate, SocketAddr) {
    let gate = builder.section("admin", "listen = \"127.0.0.1:0\"").start();
    let admin = super::metrics::metrics_addr(&gate);
    gate.edit_config(
        "listen = \"127.0.0.1:0\"\n\n[ingress]",
        &format!("listen = \"{admin}\"\n\n[ingress]"),
    );
    (gate, admin)
}

// ------------------------------------------------------------------------------------------------
// One-shot commands on the same config

/// `ackgate COMMAND --config CONFIG ARGS…`, echoed to the test's stderr.
pub fn config_cmd(command: &str, config: &Path, args: &[&str]) -> Output {
    let output = ackgate_command([command, "--config"])
        .arg(config)
        .args(args)
        .output()
        .expect("run ackgate");
    eprintln!(
        "[{command} {args:?}] {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// `ackgate spool --config CONFIG ARGS…`, echoed to the test's stderr.
pub fn spool_cmd(config: &Path, args: &[&str]) -> Output {
    config_cmd("spool", config, args)
}

/// stdout of a successful `ackgate spool` run.
pub fn spool_ok(config: &Path, args: &[&str]) -> String {
    let output = spool_cmd(config, args);
    assert!(
        output.status.success(),
        "ackgate spool {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8 stdout")
}

/// A number from `ackgate spool stats` output (`records           3`).
pub fn stats_value(stats: &str, name: &str) -> u64 {
    stats
        .lines()
        .find_map(|l| {
            let mut parts = l.split_whitespace();
            (parts.next() == Some(name)).then(|| parts.next()?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no {name} in spool stats:\n{stats}"))
}

/// Stop `gate` cleanly and require its spool to still hold `records` records (undelivered).
pub fn assert_records_left(mut gate: Ackgate, records: u64, why: &str) {
    gate.terminate_cleanly();
    let stats = spool_ok(gate.config_path(), &["stats"]);
    assert_eq!(stats_value(&stats, "records"), records, "{why}");
}

// ------------------------------------------------------------------------------------------------
// Config fragments

/// One `[[nodes]]` table for `section("upstream", …)` (which replaces the node list).
pub fn node_toml(name: &str, address: SocketAddr, extra: &str) -> String {
    format!("[[nodes]]\nname = \"{name}\"\naddress = \"{address}\"\n{extra}\n")
}

/// A TOML string literal for a path.
pub fn toml_path(path: &Path) -> String {
    toml::Value::String(path.to_string_lossy().into_owned()).to_string()
}
