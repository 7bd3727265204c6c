//! Child processes of the tests: stderr collected line by line ([`LogLines`], woken on every
//! new line), `ackgate <args>` commands, one-shot programs that may not be installed ([`Proc`]),
//! signals and bounded waits for an exit, and running a system command (`ip`, `mount`).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{lock, wait_for_condition};

/// Lines a child wrote to stderr, with a condition variable signalled on every new line and
/// when a stream ends (the child, and whatever inherited its stderr, exited).
#[derive(Default)]
pub struct LogLines {
    state: Mutex<LogState>,
    added: Condvar,
}

#[derive(Default)]
struct LogState {
    lines: Vec<String>,
    /// Streams read to their end so far (one per process incarnation writing here).
    ended: u64,
}

/// What [`LogLines::wait_for_line_or_end`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineOrEnd {
    /// A matching line.
    Line(String),
    /// No matching line, and the stream ended: the writer exited.
    Ended,
    /// Neither before the deadline.
    Timeout,
}

impl LogLines {
    fn push(&self, line: String) {
        lock(&self.state).lines.push(line);
        self.added.notify_all();
    }

    fn end(&self) {
        lock(&self.state).ended += 1;
        self.added.notify_all();
    }

    /// Every line so far.
    pub fn all(&self) -> Vec<String> {
        lock(&self.state).lines.clone()
    }

    /// Number of lines so far (a mark for [`LogLines::wait_for_from`]).
    pub fn len(&self) -> usize {
        lock(&self.state).lines.len()
    }

    /// How many streams writing here have ended so far (a mark for
    /// [`LogLines::wait_for_line_or_end`]).
    pub fn ended(&self) -> u64 {
        lock(&self.state).ended
    }

    /// Wait for a line at index ≥ `from` that satisfies `matches`; `None` on timeout.
    pub fn wait_for_from(
        &self,
        from: usize,
        timeout: Duration,
        matches: impl Fn(&str) -> bool,
    ) -> Option<String> {
        match self.wait_for(from, None, timeout, matches) {
            LineOrEnd::Line(line) => Some(line),
            _ => None,
        }
    }

    /// Wait for a line at index ≥ `from` that satisfies `matches`, or for one more stream to
    /// end than the `ended` mark counted: an exit is an event too, so a test can wait for
    /// "ready again, or dead" without polling the process.
    pub fn wait_for_line_or_end(
        &self,
        from: usize,
        ended: u64,
        timeout: Duration,
        matches: impl Fn(&str) -> bool,
    ) -> LineOrEnd {
        self.wait_for(from, Some(ended), timeout, matches)
    }

    fn wait_for(
        &self,
        from: usize,
        ended: Option<u64>,
        timeout: Duration,
        matches: impl Fn(&str) -> bool,
    ) -> LineOrEnd {
        let mut checked = from;
        let mut found = LineOrEnd::Timeout;
        let _ = wait_for_condition(&self.state, &self.added, timeout, |state| {
            let lines = &state.lines;
            if let Some(line) = lines[checked.min(lines.len())..]
                .iter()
                .find(|l| matches(l))
            {
                found = LineOrEnd::Line(line.clone());
            } else if ended.is_some_and(|mark| state.ended > mark) {
                found = LineOrEnd::Ended;
            }
            checked = lines.len();
            found != LineOrEnd::Timeout
        });
        found
    }

    /// The whole log, for panic messages.
    pub fn dump(&self) -> String {
        lock(&self.state).lines.join("\n")
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
                Ok(0) | Err(_) => {
                    log.end();
                    return;
                }
                Ok(_) => {
                    let line = String::from_utf8_lossy(&raw).trim_end().to_string();
                    eprintln!("[{prefix}] {line}");
                    log.push(line);
                }
            }
        }
    })
}

/// A child process of the test with its stderr collected line by line (the `receive` and
/// `send` tools, the interop clients, one-shot commands).
pub struct Proc {
    pub child: Child,
    pub log: Arc<LogLines>,
    stderr_thread: Option<JoinHandle<()>>,
}

impl Proc {
    /// Spawn `command` with stderr piped; stdin and stdout are as given in `command`.
    pub fn spawn(name: &str, command: Command) -> Proc {
        Proc::try_spawn(name, command).unwrap_or_else(|e| panic!("spawn {name}: {e}"))
    }

    /// Like [`Proc::spawn`], but a program that is not installed is an error (a reason to
    /// skip), not a panic.
    pub fn try_spawn(name: &str, mut command: Command) -> std::io::Result<Proc> {
        let program = command.get_program().to_os_string();
        which(&program).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{} not found on PATH", program.to_string_lossy()),
            )
        })?;
        let mut child = command
            .env_remove("RUST_LOG")
            .stderr(Stdio::piped())
            .spawn()?;
        let log = Arc::new(LogLines::default());
        let stderr = child.stderr.take().expect("stderr piped");
        let stderr_thread = Some(collect_lines(name.to_string(), stderr, log.clone()));
        Ok(Proc {
            child,
            log,
            stderr_thread,
        })
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

    /// Read the child's stdout to the end on its own thread (it ends when the child exits).
    pub fn take_stdout(&mut self) -> StdoutReader {
        let stdout = self.child.stdout.take();
        StdoutReader {
            thread: stdout.map(|mut out| {
                std::thread::spawn(move || {
                    let mut text = String::new();
                    let _ = out.read_to_string(&mut text);
                    text
                })
            }),
        }
    }

    /// Everything the child wrote to stderr so far.
    pub fn stderr_text(&self) -> String {
        self.log.dump()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child's stdout, read to the end on its own thread (ends when the child exits).
pub struct StdoutReader {
    thread: Option<JoinHandle<String>>,
}

impl StdoutReader {
    pub fn finish(self) -> String {
        self.thread.and_then(|t| t.join().ok()).unwrap_or_default()
    }
}

/// A program's path: as given if it has a slash, else the first match on PATH.
fn which(program: &std::ffi::OsStr) -> Option<PathBuf> {
    let path = Path::new(program);
    if path.components().count() > 1 {
        return path.is_file().then(|| path.to_path_buf());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

/// The ackgate binary as a command, run inside network namespace `netns` when given
/// (`ip netns exec`, which execs it: the child's pid is ackgate's).
pub fn ackgate_in_netns(netns: Option<&str>) -> Command {
    ackgate_at(Path::new(env!("CARGO_BIN_EXE_ackgate")), netns)
}

/// [`ackgate_in_netns`] for the executable at `bin` (a copy of the binary cargo built, which a
/// test may replace while it runs: an upgrade).
pub fn ackgate_at(bin: &Path, netns: Option<&str>) -> Command {
    match netns {
        Some(ns) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", ns]).arg(bin);
            command
        }
        None => Command::new(bin),
    }
}

/// `ackgate` with these arguments; hermetic: no log filter or secret from the developer's
/// shell.
pub fn ackgate_command<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut command = Command::new(env!("CARGO_BIN_EXE_ackgate"));
    command
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("ACKGATE_SHARED_KEY")
        .env_remove("ACKGATE_PASSWORD");
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

/// Run a system command (`ip`, `iptables`, `mount`) to completion; its stderr on failure.
pub fn run_command(cmd: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Whether this process runs as root (namespaces, iptables, mounts).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
