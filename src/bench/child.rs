//! The real ackgate, run as a child process on a generated config, and what /proc says about
//! it and its worker: resident memory (VmRSS, VmHWM) sampled during a run, CPU time (utime +
//! stime) over it, both summed over the supervisor and the worker.
//!
//! Readiness is the `ackgate ready listen=IP:PORT` line on its stderr, never a sleep. Its
//! stderr is read to the end (a full pipe would stall it) and the last lines are kept for the
//! error message if it dies. Optionally it runs under `strace -f -ttt --seccomp-bpf` limited
//! to fsync/fdatasync, so only those calls stop it, to count commits from outside.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::oneshot;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;

use super::BenchError;

/// Lines of the child's stderr kept for error messages.
const TAIL_LINES: usize = 30;

/// How to start the child.
#[derive(Debug, Clone)]
pub struct ChildSpec {
    pub exe: PathBuf,
    pub config: PathBuf,
    /// Run under strace, writing its log here.
    pub strace_log: Option<PathBuf>,
    pub ready_timeout: Duration,
}

/// A running ackgate.
pub struct AckgateChild {
    process: tokio::process::Child,
    /// The ackgate process (not strace's).
    pub pid: u32,
    pub listen: SocketAddr,
    /// The metrics listener, when ackgate logged one before its ready line.
    pub metrics: Option<SocketAddr>,
    /// Spawn to ready line.
    pub ready_after: Duration,
    tail: Arc<Mutex<VecDeque<String>>>,
    warnings: Arc<AtomicU64>,
}

/// Start ackgate and wait for its ready line.
pub async fn spawn(spec: &ChildSpec) -> Result<AckgateChild, BenchError> {
    let mut command = match &spec.strace_log {
        Some(log) => {
            let mut c = Command::new("strace");
            c.args([
                "-f",
                "-ttt",
                "--seccomp-bpf",
                "-e",
                "trace=fsync,fdatasync",
                "-o",
            ])
            .arg(log)
            .arg("--")
            .arg(&spec.exe);
            c
        }
        None => Command::new(&spec.exe),
    };
    command
        .arg("run")
        .arg("--config")
        .arg(&spec.config)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let started = Instant::now();
    let mut process = command.spawn().map_err(|e| BenchError::Spawn {
        exe: spec.exe.clone(),
        reason: e.to_string(),
    })?;
    let stderr = process.stderr.take().ok_or_else(|| BenchError::Spawn {
        exe: spec.exe.clone(),
        reason: "no stderr pipe".into(),
    })?;
    let tail = Arc::new(Mutex::new(VecDeque::new()));
    let warnings = Arc::new(AtomicU64::new(0));
    let (ready_tx, ready_rx) = oneshot::channel();
    tokio::spawn(read_stderr(
        BufReader::new(stderr),
        tail.clone(),
        warnings.clone(),
        ready_tx,
    ));
    let (listen, metrics) = match timeout(spec.ready_timeout, ready_rx).await {
        Ok(Ok(addrs)) => addrs,
        Ok(Err(_)) => {
            let _ = timeout(Duration::from_secs(2), process.wait()).await;
            return Err(BenchError::NotReady {
                reason: "ackgate exited before its ready line".into(),
                stderr: tail_text(&tail),
            });
        }
        Err(_) => {
            let _ = process.start_kill();
            return Err(BenchError::NotReady {
                reason: format!("no ready line within {:?}", spec.ready_timeout),
                stderr: tail_text(&tail),
            });
        }
    };
    let ready_after = started.elapsed();
    let outer = process.id().unwrap_or(0);
    let pid = if spec.strace_log.is_some() {
        traced_child(outer).await.unwrap_or(outer)
    } else {
        outer
    };
    Ok(AckgateChild {
        process,
        pid,
        listen,
        metrics,
        ready_after,
        tail,
        warnings,
    })
}

/// The pid strace started (its only child), read from /proc.
async fn traced_child(strace: u32) -> Option<u32> {
    let path = format!("/proc/{strace}/task/{strace}/children");
    for _ in 0..100 {
        if let Ok(text) = std::fs::read_to_string(&path) {
            if let Some(pid) = text.split_whitespace().next().and_then(|p| p.parse().ok()) {
                return Some(pid);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

async fn read_stderr(
    stderr: BufReader<tokio::process::ChildStderr>,
    tail: Arc<Mutex<VecDeque<String>>>,
    warnings: Arc<AtomicU64>,
    ready: oneshot::Sender<(SocketAddr, Option<SocketAddr>)>,
) {
    let mut ready = Some(ready);
    let mut metrics = None;
    let mut lines = stderr.lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if ready.is_some() && line.contains("metrics listening") {
            metrics = parse_listen(&line);
        }
        if ready.is_some() && line.contains("ackgate ready") {
            if let Some(addr) = parse_listen(&line) {
                if let Some(tx) = ready.take() {
                    let _ = tx.send((addr, metrics));
                }
            }
        }
        if line.contains(" WARN ") || line.contains(" ERROR ") {
            warnings.fetch_add(1, Ordering::AcqRel);
        }
        let mut tail = tail.lock().unwrap_or_else(|p| p.into_inner());
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }
}

/// `listen=127.0.0.1:40123` out of the ready line.
fn parse_listen(line: &str) -> Option<SocketAddr> {
    line.split_whitespace()
        .find_map(|field| field.strip_prefix("listen="))
        .and_then(|addr| addr.parse().ok())
}

fn tail_text(tail: &Mutex<VecDeque<String>>) -> String {
    let tail = tail.lock().unwrap_or_else(|p| p.into_inner());
    tail.iter().cloned().collect::<Vec<_>>().join("\n")
}

impl AckgateChild {
    /// WARN and ERROR lines ackgate wrote so far.
    pub fn warnings(&self) -> u64 {
        self.warnings.load(Ordering::Acquire)
    }

    /// The last lines ackgate wrote.
    pub fn tail(&self) -> String {
        tail_text(&self.tail)
    }

    /// SIGKILL, as a crash would, and reap it.
    pub async fn kill(mut self) {
        signal(self.pid, rustix::process::Signal::KILL);
        let _ = self.process.start_kill();
        let _ = timeout(Duration::from_secs(5), self.process.wait()).await;
    }

    /// SIGTERM, then wait up to `grace` for a clean exit (and for strace to write its log);
    /// SIGKILL after that. Returns how long the stop took.
    pub async fn stop(mut self, grace: Duration) -> Duration {
        let started = Instant::now();
        signal(self.pid, rustix::process::Signal::TERM);
        if timeout(grace, self.process.wait()).await.is_err() {
            signal(self.pid, rustix::process::Signal::KILL);
            let _ = self.process.start_kill();
            let _ = timeout(Duration::from_secs(5), self.process.wait()).await;
        }
        started.elapsed()
    }
}

fn signal(pid: u32, sig: rustix::process::Signal) {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw);
    if let Some(pid) = pid {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

/// `ackgate_spool_commits` from ackgate's /metrics, if it serves one.
pub async fn spool_commits(metrics: Option<SocketAddr>) -> Option<u64> {
    parse_commits(&scrape(metrics).await?)
}

/// Where an ack's time goes, as ackgate's histograms tell: (upper bound in seconds,
/// cumulative count) per bucket of the commit queue, the commit, and the whole ack.
#[derive(Debug, Clone, Default)]
pub struct AckStages {
    pub queue: Vec<(f64, u64)>,
    pub commit: Vec<(f64, u64)>,
    pub wait: Vec<(f64, u64)>,
    pub ack: Vec<(f64, u64)>,
}

/// [`AckStages`] from ackgate's /metrics, if it serves them.
pub async fn ack_stages(metrics: Option<SocketAddr>) -> Option<AckStages> {
    let text = scrape(metrics).await?;
    Some(AckStages {
        queue: histogram(&text, "ackgate_commit_queue_seconds"),
        commit: histogram(&text, "ackgate_commit_duration_seconds"),
        wait: histogram(&text, "ackgate_commit_wait_seconds"),
        ack: histogram(&text, "ackgate_ack_seconds"),
    })
}

/// The buckets of histogram `name` in /metrics text.
fn histogram(text: &str, name: &str) -> Vec<(f64, u64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    text.lines()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
        .filter_map(|rest| {
            let (le, count) = rest.split_once("\"}")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.trim().parse::<f64>().ok()? as u64))
        })
        .collect()
}

/// The quantile `q` of what was observed between two readings of a histogram, as the upper
/// bound of the bucket it falls in, in ms.
pub fn quantile_ms(before: &[(f64, u64)], after: &[(f64, u64)], q: f64) -> Option<f64> {
    let counts: Vec<(f64, u64)> = after
        .iter()
        .zip(before)
        .map(|(&(le, a), &(_, b))| (le, a.saturating_sub(b)))
        .collect();
    let total = counts.last()?.1;
    if total == 0 {
        return None;
    }
    let wanted = (q * total as f64).ceil() as u64;
    counts
        .iter()
        .find(|(_, cumulative)| *cumulative >= wanted)
        .map(|(le, _)| le * 1e3)
}

/// ackgate's /metrics text.
async fn scrape(metrics: Option<SocketAddr>) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = metrics?;
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .ok()?;
        let mut body = Vec::new();
        stream.take(4 << 20).read_to_end(&mut body).await.ok()?;
        Some(String::from_utf8_lossy(&body).into_owned())
    };
    timeout(Duration::from_secs(5), fetch).await.ok()?
}

fn parse_commits(text: &str) -> Option<u64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.contains("spool_commits"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
}

/// One reading of /proc/PID.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcSample {
    pub rss_kib: u64,
    pub hwm_kib: u64,
    /// The anonymous part of `rss_kib` (RssAnon): the process's own memory, without the pages
    /// of files (its executable) it may share with others.
    pub anon_kib: u64,
    /// utime + stime in clock ticks.
    pub cpu_ticks: u64,
    /// utime alone (user space), in clock ticks.
    pub user_ticks: u64,
}

/// Read VmRSS, VmHWM, RssAnon and utime + stime of `pid`.
pub fn read_proc(pid: u32) -> Option<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at field 3, "state".
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(ProcSample {
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
        anon_kib: kib("RssAnon:"),
        cpu_ticks: utime + stime,
        user_ticks: utime,
    })
}

/// [`read_proc`] of `pid` and its children, summed: `ackgate run` is a supervisor, and the
/// relay's work (and most of its memory) is in its worker. A parent's memory counts only its
/// anonymous pages: the rest is the executable, whose pages its worker maps too and has in its
/// own RSS (summing both RSS would count them twice).
pub fn read_proc_tree(pid: u32) -> Option<ProcSample> {
    let mut total = read_proc(pid)?;
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    let mut first = true;
    for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
        if let Some(s) = read_proc(child) {
            if first {
                total.rss_kib = total.anon_kib;
                total.hwm_kib = total.anon_kib;
                first = false;
            }
            total.rss_kib += s.rss_kib;
            total.hwm_kib += s.hwm_kib;
            total.anon_kib += s.anon_kib;
            total.cpu_ticks += s.cpu_ticks;
            total.user_ticks += s.user_ticks;
        }
    }
    Some(total)
}

pub fn clock_ticks_per_s() -> f64 {
    let ticks = rustix::param::clock_ticks_per_second();
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// Memory and CPU of a process over a stretch of time.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ProcStats {
    pub rss_max_mib: f64,
    pub rss_mean_mib: f64,
    /// Peak RSS since the process started (VmHWM) at the end of the stretch.
    pub hwm_mib: f64,
    /// CPU time over wall time, in % of one core.
    pub cpu_percent: f64,
    /// User + system CPU time of the process over the stretch.
    pub cpu_seconds: f64,
    /// The user-space part of `cpu_seconds` (the rest is the kernel working for it: socket
    /// copies, page cache writes, fsync).
    pub user_seconds: f64,
    pub samples: u64,
}

/// Samples a process and its children every `every` until finished.
pub struct Sampler {
    pid: u32,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<(u64, u64, u64)>,
    start: Instant,
    start_ticks: u64,
    start_user_ticks: u64,
}

impl Sampler {
    pub fn start(pid: u32, every: Duration) -> Sampler {
        let stop = CancellationToken::new();
        let first = read_proc_tree(pid).unwrap_or_default();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            let (mut max, mut sum, mut n) = (0u64, 0u64, 0u64);
            loop {
                if let Some(s) = read_proc_tree(pid) {
                    max = max.max(s.rss_kib);
                    sum += s.rss_kib;
                    n += 1;
                }
                tokio::select! {
                    () = tokio::time::sleep(every) => {}
                    () = token.cancelled() => return (max, sum, n),
                }
            }
        });
        Sampler {
            pid,
            stop,
            task,
            start: Instant::now(),
            start_ticks: first.cpu_ticks,
            start_user_ticks: first.user_ticks,
        }
    }

    pub async fn finish(self) -> ProcStats {
        let end = read_proc_tree(self.pid).unwrap_or_default();
        let wall = self.start.elapsed().as_secs_f64().max(1e-9);
        self.stop.cancel();
        let (max, sum, n) = self.task.await.unwrap_or((0, 0, 0));
        let max = max.max(end.rss_kib);
        let cpu_seconds =
            end.cpu_ticks.saturating_sub(self.start_ticks) as f64 / clock_ticks_per_s();
        ProcStats {
            rss_max_mib: max as f64 / 1024.0,
            rss_mean_mib: if n == 0 {
                0.0
            } else {
                sum as f64 / n as f64 / 1024.0
            },
            hwm_mib: end.hwm_kib as f64 / 1024.0,
            cpu_percent: cpu_seconds / wall * 100.0,
            cpu_seconds,
            user_seconds: end.user_ticks.saturating_sub(self.start_user_ticks) as f64
                / clock_ticks_per_s(),
            samples: n,
        }
    }
}

/// Count the fsync and fdatasync calls in an `strace -ttt` log that started at or after
/// `from` and before `to` (seconds since the Unix epoch).
pub fn count_syncs(log: &Path, from: f64, to: f64) -> std::io::Result<u64> {
    let text = std::fs::read_to_string(log)?;
    Ok(text
        .lines()
        .filter(|line| {
            let mut fields = line.split_whitespace();
            // "PID SECONDS.MICROS fdatasync(5 ..." (with -f, a pid first).
            let _pid = fields.next();
            let Some(at) = fields.next().and_then(|t| t.parse::<f64>().ok()) else {
                return false;
            };
            let call = fields.next().unwrap_or("");
            (call.starts_with("fdatasync(") || call.starts_with("fsync(")) && at >= from && at < to
        })
        .count() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_quantiles_come_from_the_buckets_filled_between_two_readings() {
        let before = [(0.001, 10), (0.002, 10), (0.004, 10), (f64::INFINITY, 10)];
        // 100 commits since: 50 under 1 ms, 45 under 2 ms, 5 under 4 ms.
        let after = [
            (0.001, 60),
            (0.002, 105),
            (0.004, 110),
            (f64::INFINITY, 110),
        ];
        assert_eq!(quantile_ms(&before, &after, 0.5), Some(1.0));
        assert_eq!(quantile_ms(&before, &after, 0.95), Some(2.0));
        assert_eq!(quantile_ms(&before, &after, 0.99), Some(4.0));
        assert_eq!(quantile_ms(&after, &after, 0.5), None, "no commit between");
    }

    #[test]
    fn ready_line_and_proc_are_read() {
        let line =
            "2026-01-01T00:00:00Z  INFO ackgate: ackgate ready listen=127.0.0.1:40123 nodes=1";
        assert_eq!(parse_listen(line), Some("127.0.0.1:40123".parse().unwrap()));
        let me = read_proc(std::process::id()).unwrap();
        assert!(me.rss_kib > 0 && me.hwm_kib >= me.rss_kib);
    }

    #[test]
    fn commits_are_read_from_metrics_text() {
        let text = "# HELP ackgate_spool_commits Spool commits.\n# TYPE ackgate_spool_commits counter\nackgate_spool_commits_total 42\n";
        assert_eq!(parse_commits(text), Some(42));
        assert_eq!(parse_commits("nothing 1\n"), None);
    }

    #[test]
    fn strace_lines_are_counted_by_time() {
        let dir = std::env::temp_dir().join(format!("ackgate-strace-{}", std::process::id()));
        let text = "11 100.5 fdatasync(3)             = 0\n\
                    12 101.0 fsync(4 <unfinished ...>\n\
                    12 101.2 <... fsync resumed>)   = 0\n\
                    11 103.0 fdatasync(3)             = 0\n";
        std::fs::write(&dir, text).unwrap();
        assert_eq!(count_syncs(&dir, 100.0, 102.0).unwrap(), 2);
        assert_eq!(count_syncs(&dir, 0.0, 1e12).unwrap(), 3);
        let _ = std::fs::remove_file(&dir);
    }
}
