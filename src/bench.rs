//! `ackgate bench`: end-to-end load against the real ackgate binary, with every figure set
//! against a baseline measured in the same invocation.
//!
//! Parts: [`load`] (the senders), [`aggregator`] (an embedded acking receiver that reads each
//! event's send stamp), [`proxy`] (a delay proxy for upstream round trips, since `tc netem` is
//! not available), [`child`] (ackgate as a child process on a generated config, its RSS and CPU
//! from /proc), [`disk`] (the durable-write ceiling of the spool's directory) and [`report`].
//!
//! Scenarios:
//! - relay (default): ceiling, then the *direct path* (senders straight to the aggregator),
//!   then ackgate at each `--rtt`, then optionally at half of its measured maximum
//!   (`--half-load`) for the ack-latency target; with `--baseline-bin OTHER`, the runs
//!   through ackgate alternate with runs through OTHER (`--rounds` pairs), for a before/after
//!   in one invocation;
//! - backlog (`--backlog-gib X` or `--records N`): aggregator down, fill the spool, measure RSS
//!   while it holds the backlog, restart ackgate and time its start-up, then drain;
//! - fsyncs (`--count-fsyncs`): count ackgate's fsync calls with strace, with and without
//!   upstream acks flowing at the same load, to see whether deletes cost commits of their own;
//! - crashes (`--crash-cycles N`, after the relay runs): kill -9 ackgate at a random instant
//!   under load, restart it on its spool and count the events delivered twice ([`crash`]).
//!
//! Every phase is bounded in time (`--duration`, `--drain-timeout`, `--fill-timeout`) and the
//! only addresses used are on 127.0.0.1.

pub mod aggregator;
pub mod child;
pub mod crash;
pub mod disk;
pub mod histogram;
mod judge;
pub mod load;
pub mod proxy;
pub mod report;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use aggregator::{Aggregator, AggregatorOptions};
use child::{AckgateChild, ChildSpec, Sampler};
use load::LoadSpec;
pub use report::{
    BacklogReport, BenchReport, Check, FsyncPhase, FsyncReport, Measured, RunFigures,
};

/// How often ackgate's RSS is sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// Deadline for ackgate's ready line (start-up of a big spool included).
pub(crate) const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Deadline for ackgate's clean exit after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(20);
/// Idle time after the load in the fsync scenario (deletes only).
const FSYNC_IDLE: Duration = Duration::from_secs(3);
/// Rate of the fsync scenario when `--rate` is not given.
const FSYNC_DEFAULT_RATE: f64 = 20_000.0;
/// Time the backlog is held with no traffic while RSS is sampled.
const HOLD: Duration = Duration::from_secs(3);

/// Flags of `ackgate bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Sender connections.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub connections: u32,
    /// Senders behave like fluentd v0.10: one connection per request, no ack.
    #[arg(long)]
    pub legacy: bool,
    /// Requests in flight per connection (ack mode).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub window: u32,
    /// Bytes of each `[time, record]` event.
    #[arg(long, default_value_t = 150, value_parser = clap::value_parser!(u64).range(load::MIN_EVENT_BYTES as u64..=60_000))]
    pub event_bytes: u64,
    /// Events per PackedForward request.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub batch: u32,
    /// Length of each load run (it also stops at --events).
    #[arg(long, default_value = "10s", value_parser = crate::tools::parse_duration)]
    pub duration: Duration,
    /// Events per run, all connections together (the run also stops at --duration).
    #[arg(long)]
    pub events: Option<u64>,
    /// Cap on events per second, all connections together.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Upstream round trips to run ackgate at, through the delay proxy: "0ms,10ms,50ms".
    /// Without it ackgate talks to the aggregator directly.
    #[arg(long, value_delimiter = ',', value_parser = crate::tools::parse_duration)]
    pub rtt: Vec<Duration>,
    /// After the runs, run ackgate again at half the rate it reached (ack-latency target).
    #[arg(long)]
    pub half_load: bool,
    /// Under --rate, let every connection send at the same instants (bursts) instead of
    /// spreading them evenly over the interval.
    #[arg(long)]
    pub aligned: bool,
    /// Skip the direct path.
    #[arg(long)]
    pub no_direct: bool,
    /// Skip the disk ceiling.
    #[arg(long)]
    pub no_ceiling: bool,
    /// Length of each of the two ceiling loops.
    #[arg(long, default_value = "2s", value_parser = crate::tools::parse_duration)]
    pub ceiling_time: Duration,
    /// ackgate's upstream.window (chunks in flight per upstream connection).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub upstream_window: u32,
    /// ackgate's spool.max_bytes, e.g. "1GiB" (backlog mode sizes it from the fill).
    #[arg(long, default_value = "1GiB", value_parser = crate::config::ByteSize::parse)]
    pub spool_max_bytes: u64,
    /// Directory for spools and the ceiling file (default: the system temp dir).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// The ackgate binary to run (default: this executable).
    #[arg(long)]
    pub ackgate_bin: Option<PathBuf>,
    /// Another ackgate binary (e.g. the build before a change) to run the same load through,
    /// alternating with --ackgate-bin: the report gives each one's means and their ratios.
    #[arg(long, conflicts_with_all = ["rtt", "backlog_gib", "records", "count_fsyncs"])]
    pub baseline_bin: Option<PathBuf>,
    /// With --baseline-bin: how many pairs of runs (baseline, then ackgate) to alternate.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=50), requires = "baseline_bin")]
    pub rounds: u32,
    /// Also print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Backlog scenario: fill the spool with this many GiB while the aggregator is down.
    #[arg(long, conflicts_with = "records")]
    pub backlog_gib: Option<f64>,
    /// Backlog scenario: queue this many records (requests with distinct tags, so none are
    /// merged; use a small --batch) while the aggregator is down.
    #[arg(long)]
    pub records: Option<u64>,
    /// Bound on the backlog fill.
    #[arg(long, default_value = "10m", value_parser = crate::tools::parse_duration)]
    pub fill_timeout: Duration,
    /// Bound on waiting for the aggregator to receive everything accepted.
    #[arg(long, default_value = "120s", value_parser = crate::tools::parse_duration)]
    pub drain_timeout: Duration,
    /// Count ackgate's fsyncs (strace) with and without upstream acks flowing.
    #[arg(long, conflicts_with_all = ["backlog_gib", "records"])]
    pub count_fsyncs: bool,
    /// Keep the spools and configs (printed at the end).
    #[arg(long)]
    pub keep: bool,
    /// After the relay runs: this many kill -9 cycles under load (random instant, restart on
    /// the spool), counting events delivered twice.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=100), conflicts_with_all = ["backlog_gib", "records", "count_fsyncs"])]
    pub crash_cycles: u32,
}

/// Why a bench could not run to the end.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("cannot prepare {path}: {reason}")]
    Setup { path: PathBuf, reason: String },
    #[error("cannot start {exe}: {reason}")]
    Spawn { exe: PathBuf, reason: String },
    #[error("ackgate did not become ready: {reason}\n--- its last stderr lines ---\n{stderr}")]
    NotReady { reason: String, stderr: String },
    #[error("cannot listen on 127.0.0.1: {0}")]
    Listen(std::io::Error),
    #[error("disk ceiling: {0}")]
    Ceiling(std::io::Error),
    #[error("{0} is needed for this scenario and cannot be run")]
    MissingTool(&'static str),
    #[error("cannot read the strace log {path}: {reason}")]
    StraceLog { path: PathBuf, reason: String },
}

/// Run the scenario the flags select and return its report.
pub async fn bench(args: BenchArgs) -> Result<BenchReport, BenchError> {
    let exe = match &args.ackgate_bin {
        Some(exe) => exe.clone(),
        None => std::env::current_exe().map_err(|e| BenchError::Spawn {
            exe: PathBuf::from("ackgate"),
            reason: format!("cannot find the current executable: {e}"),
        })?,
    };
    let base = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let work = base.join(format!("ackgate-bench-{}-{nanos:x}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| BenchError::Setup {
        path: work.clone(),
        reason: e.to_string(),
    })?;
    let ctx = Ctx {
        args,
        exe,
        work: work.clone(),
    };
    let mut report = BenchReport::new(&ctx.args, &work);
    let result = if ctx.args.backlog_gib.is_some() || ctx.args.records.is_some() {
        ctx.backlog(&mut report).await
    } else if ctx.args.count_fsyncs {
        ctx.fsyncs(&mut report).await
    } else {
        ctx.relay(&mut report).await
    };
    if ctx.args.keep {
        report.kept = Some(work.display().to_string());
    } else {
        let _ = std::fs::remove_dir_all(&work);
    }
    result?;
    report.judge();
    Ok(report)
}

pub(crate) struct Ctx {
    args: BenchArgs,
    exe: PathBuf,
    work: PathBuf,
}

/// The config ackgate runs on: everything default but what a bench must set.
fn config_text(spool: &Path, node: &str, max_bytes: u64, window: u32) -> String {
    format!(
        "[ingress]\nlisten = \"127.0.0.1:0\"\nudp_heartbeat = false\n\n\
         [spool]\npath = {spool:?}\nmax_bytes = {max_bytes}\n\n\
         [upstream]\nwindow = {window}\nheartbeat_type = \"none\"\n\
         retry_initial = \"100ms\"\nretry_max = \"1s\"\n\n\
         [[upstream.nodes]]\naddress = \"{node}\"\n\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [log]\nlevel = \"info\"\n",
        spool = spool.display().to_string(),
    )
}

fn wall_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

pub(crate) fn progress(message: &str) {
    eprintln!("bench: {message}");
}

/// A free port on 127.0.0.1 for an aggregator that starts later.
fn reserve_port() -> Result<SocketAddr, BenchError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(BenchError::Listen)?;
    listener.local_addr().map_err(BenchError::Listen)
}

/// Bench process CPU seconds so far (the senders and aggregator share the machine).
fn own_cpu_ticks() -> u64 {
    child::read_proc(std::process::id())
        .map(|s| s.cpu_ticks)
        .unwrap_or(0)
}

impl Ctx {
    pub(crate) fn spec(&self) -> LoadSpec {
        LoadSpec {
            connections: self.args.connections,
            legacy: self.args.legacy,
            window: self.args.window,
            event_bytes: self.args.event_bytes as usize,
            batch: self.args.batch,
            duration: self.args.duration,
            events: self.args.events,
            rate: self.args.rate,
            unique_tags: false,
            ack_timeout: Duration::from_secs(60),
            aligned: self.args.aligned,
        }
    }

    pub(crate) fn aggregator_options(&self) -> AggregatorOptions {
        AggregatorOptions {
            ack: true,
            event_bytes: self.args.event_bytes as usize,
        }
    }

    /// Write a config for a run in its own directory.
    pub(crate) fn prepare(
        &self,
        name: &str,
        node: &str,
        max_bytes: u64,
    ) -> Result<ChildSpec, BenchError> {
        let dir = self.work.join(name);
        let setup = |e: std::io::Error| BenchError::Setup {
            path: dir.clone(),
            reason: e.to_string(),
        };
        std::fs::create_dir_all(&dir).map_err(setup)?;
        let config = dir.join("ackgate.toml");
        let text = config_text(
            &dir.join("spool.redb"),
            node,
            max_bytes,
            self.args.upstream_window,
        );
        std::fs::write(&config, text).map_err(setup)?;
        Ok(ChildSpec {
            exe: self.exe.clone(),
            config,
            strace_log: None,
            ready_timeout: READY_TIMEOUT,
        })
    }

    async fn relay(&self, report: &mut BenchReport) -> Result<(), BenchError> {
        if !self.args.no_ceiling {
            report.ceiling = Some(self.ceiling().await?);
        }
        if !self.args.no_direct {
            progress("direct path: senders straight to the aggregator");
            report.direct = Some(self.direct_run().await?);
        }
        if let Some(baseline) = &self.args.baseline_bin {
            self.alternate(baseline, report).await?;
        }
        let rtts: Vec<Option<Duration>> = if self.args.rtt.is_empty() {
            vec![None]
        } else {
            self.args.rtt.iter().copied().map(Some).collect()
        };
        for (i, rtt) in rtts.iter().enumerate() {
            if self.args.baseline_bin.is_some() {
                break; // the alternated rounds were the runs through ackgate
            }
            let name = format!("run-{i}");
            let label = match rtt {
                Some(rtt) => format!("ackgate rtt={}ms", rtt.as_millis()),
                None => "ackgate".to_string(),
            };
            progress(&format!("{label}: load through ackgate"));
            let run = self
                .ackgate_run(&name, &label, *rtt, self.args.rate)
                .await?;
            report.runs.push(run);
        }
        if self.args.half_load {
            if let Some(first) = report.runs.first() {
                let rate = first.events_per_s / 2.0;
                let label = format!("ackgate half load ({rate:.0} ev/s)");
                progress(&label);
                let run = self
                    .ackgate_run("half-load", &label, rtts[0], Some(rate))
                    .await?;
                report.half_load = Some(run);
            }
        }
        if self.args.crash_cycles > 0 {
            report.crash = Some(self.crashes(self.args.crash_cycles).await?);
        }
        if !self.args.no_ceiling {
            // The disk drifts within a minute here: measure again, judge against the stricter.
            report.ceiling_after = Some(self.ceiling().await?);
        }
        Ok(())
    }

    /// `--rounds` pairs of runs at the same load: the baseline binary, then ackgate's, so that
    /// the machine's drift falls on both alike.
    async fn alternate(&self, baseline: &Path, report: &mut BenchReport) -> Result<(), BenchError> {
        for round in 1..=self.args.rounds {
            let label = format!("baseline #{round}");
            progress(&format!("{label}: load through {}", baseline.display()));
            let run = self
                .run_through(
                    baseline,
                    &format!("baseline-{round}"),
                    &label,
                    None,
                    self.args.rate,
                )
                .await?;
            report.baseline_runs.push(run);
            let label = format!("ackgate #{round}");
            progress(&format!("{label}: load through {}", self.exe.display()));
            let run = self
                .ackgate_run(&format!("run-{round}"), &label, None, self.args.rate)
                .await?;
            report.runs.push(run);
        }
        report.baseline_bin = Some(baseline.display().to_string());
        Ok(())
    }

    async fn ceiling(&self) -> Result<disk::DiskCeiling, BenchError> {
        progress("disk ceiling: 4 KiB and 1 MiB write + fdatasync in the spool directory");
        let dir = self.work.clone();
        let each = self.args.ceiling_time;
        tokio::task::spawn_blocking(move || disk::measure(&dir, each))
            .await
            .map_err(|e| BenchError::Ceiling(std::io::Error::other(e.to_string())))?
            .map_err(BenchError::Ceiling)
    }

    async fn direct_run(&self) -> Result<RunFigures, BenchError> {
        let aggregator = Aggregator::start(
            std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            self.aggregator_options(),
        )
        .await
        .map_err(BenchError::Listen)?;
        let spec = self.spec();
        let own = own_cpu_ticks();
        let load = load::run(aggregator.addr, &spec).await;
        let own_ticks = own_cpu_ticks().saturating_sub(own);
        let delivered_at_end = aggregator.delivered.events();
        let drain = wait_delivered(&aggregator, load.events, self.args.drain_timeout).await;
        let measured = Measured {
            load: &load,
            delivered_at_end,
            drain,
            own_ticks,
        };
        let figures = RunFigures::new("direct", None, &spec, measured, &aggregator);
        aggregator.stop().await;
        Ok(figures)
    }

    /// One run through ackgate (`--ackgate-bin`).
    async fn ackgate_run(
        &self,
        name: &str,
        label: &str,
        rtt: Option<Duration>,
        rate: Option<f64>,
    ) -> Result<RunFigures, BenchError> {
        self.run_through(&self.exe, name, label, rtt, rate).await
    }

    /// One run through the ackgate binary `exe`: fresh spool, fresh aggregator, optional
    /// delay proxy.
    async fn run_through(
        &self,
        exe: &Path,
        name: &str,
        label: &str,
        rtt: Option<Duration>,
        rate: Option<f64>,
    ) -> Result<RunFigures, BenchError> {
        let aggregator = Aggregator::start(
            std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            self.aggregator_options(),
        )
        .await
        .map_err(BenchError::Listen)?;
        let proxy = match rtt {
            Some(rtt) => Some(
                proxy::DelayProxy::start(aggregator.addr, rtt / 2)
                    .await
                    .map_err(BenchError::Listen)?,
            ),
            None => None,
        };
        let node = proxy.as_ref().map_or(aggregator.addr, |p| p.addr);
        let mut spec = self.prepare(name, &node.to_string(), self.args.spool_max_bytes)?;
        spec.exe = exe.to_path_buf();
        let child = child::spawn(&spec).await?;
        let mut load_spec = self.spec();
        load_spec.rate = rate;
        let commits_before = child::spool_commits(child.metrics).await;
        let stages_before = child::ack_stages(child.metrics).await;
        let sampler = Sampler::start(child.pid, SAMPLE_EVERY);
        let own = own_cpu_ticks();
        let load = load::run(child.listen, &load_spec).await;
        let own_ticks = own_cpu_ticks().saturating_sub(own);
        let delivered_at_end = aggregator.delivered.events();
        let stats = sampler.finish().await;
        let commits_after = child::spool_commits(child.metrics).await;
        let stages_after = child::ack_stages(child.metrics).await;
        let drain = wait_delivered(&aggregator, load.events, self.args.drain_timeout).await;
        let measured = Measured {
            load: &load,
            delivered_at_end,
            drain,
            own_ticks,
        };
        let mut figures = RunFigures::new(label, rtt, &load_spec, measured, &aggregator);
        figures.ackgate = Some(stats);
        figures.spool_commits = commits_before
            .zip(commits_after)
            .map(|(before, after)| after.saturating_sub(before));
        if let (Some(before), Some(after)) = (&stages_before, &stages_after) {
            figures.stages = Some(report::StageQuantiles::between(before, after));
        }
        figures.ackgate_warnings = child.warnings();
        if load.error_count > 0 {
            figures.ackgate_tail = Some(child.tail());
        }
        child.stop(STOP_GRACE).await;
        if let Some(proxy) = proxy {
            proxy.stop().await;
        }
        aggregator.stop().await;
        Ok(figures)
    }

    async fn backlog(&self, report: &mut BenchReport) -> Result<(), BenchError> {
        let event_bytes = self.args.event_bytes;
        let mut spec = self.spec();
        spec.duration = self.args.fill_timeout;
        spec.rate = None;
        let target_events = match (self.args.records, self.args.backlog_gib) {
            (Some(records), _) => {
                spec.unique_tags = true;
                records.saturating_mul(u64::from(self.args.batch))
            }
            (None, Some(gib)) => ((gib.max(0.0) * (1u64 << 30) as f64) as u64) / event_bytes,
            (None, None) => 0,
        };
        spec.events = Some(target_events);
        let fill_bytes = target_events * event_bytes;
        // Room for the fill plus record headers and tags, so backpressure never stops it.
        let max_bytes = fill_bytes + fill_bytes / 4 + (256 << 20);
        let node = reserve_port()?;
        let child_spec = self.prepare("backlog", &node.to_string(), max_bytes)?;
        progress(&format!(
            "backlog: filling the spool with {target_events} events ({:.2} GiB of events), aggregator down",
            fill_bytes as f64 / (1u64 << 30) as f64
        ));
        let child = child::spawn(&child_spec).await?;
        let sampler = Sampler::start(child.pid, SAMPLE_EVERY);
        let fill = load::run(child.listen, &spec).await;
        let fill_stats = sampler.finish().await;
        progress("backlog: holding it with no traffic");
        let sampler = Sampler::start(child.pid, SAMPLE_EVERY);
        tokio::time::sleep(HOLD).await;
        let hold_stats = sampler.finish().await;
        let warnings = child.warnings();
        let shutdown = child.stop(STOP_GRACE).await;
        let spool_file = self.work.join("backlog").join("spool.redb");
        let spool_bytes = std::fs::metadata(&spool_file).map(|m| m.len()).unwrap_or(0);

        progress("backlog: restarting ackgate on the full spool");
        let child = child::spawn(&child_spec).await?;
        let startup = child.ready_after;
        let sampler = Sampler::start(child.pid, SAMPLE_EVERY);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let startup_stats = sampler.finish().await;

        progress("backlog: aggregator up, draining");
        let aggregator = Aggregator::start(node, self.aggregator_options())
            .await
            .map_err(BenchError::Listen)?;
        let sampler = Sampler::start(child.pid, SAMPLE_EVERY);
        let drain_start = Instant::now();
        let drain = wait_delivered(&aggregator, fill.events, self.args.drain_timeout).await;
        let drain_stats = sampler.finish().await;
        let delivered = aggregator.delivered.events();
        let drain_seconds = drain.unwrap_or_else(|| drain_start.elapsed()).as_secs_f64();
        report.backlog = Some(BacklogReport {
            target_events,
            records: self.args.records,
            fill_events: fill.events,
            fill_requests: fill.requests,
            fill_seconds: fill.elapsed.as_secs_f64(),
            fill_events_per_s: fill.events as f64 / fill.elapsed.as_secs_f64().max(1e-9),
            fill_errors: fill.errors.clone(),
            fill_rss: fill_stats,
            spool_file_mib: spool_bytes as f64 / (1 << 20) as f64,
            hold_rss: hold_stats,
            shutdown_seconds: shutdown.as_secs_f64(),
            startup_seconds: startup.as_secs_f64(),
            startup_rss: startup_stats,
            drained: delivered,
            drain_complete: drain.is_some(),
            drain_seconds,
            drain_events_per_s: delivered as f64 / drain_seconds.max(1e-9),
            drain_mb_per_s: (delivered * event_bytes) as f64 / 1e6 / drain_seconds.max(1e-9),
            drain_rss: drain_stats,
            duplicates: aggregator.delivered.duplicates.load(Ordering::Acquire),
            ackgate_warnings: warnings + child.warnings(),
        });
        child.stop(STOP_GRACE).await;
        aggregator.stop().await;
        Ok(())
    }

    async fn fsyncs(&self, report: &mut BenchReport) -> Result<(), BenchError> {
        let strace_ok = tokio::process::Command::new("strace")
            .arg("-V")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .await
            .map(|s| s.success())
            .unwrap_or(false);
        if !strace_ok {
            return Err(BenchError::MissingTool("strace"));
        }
        let rate = self.args.rate.unwrap_or(FSYNC_DEFAULT_RATE);
        progress(&format!(
            "fsyncs: {rate:.0} ev/s with upstream acks flowing"
        ));
        let flowing = self.fsync_phase("fsync-acked", rate, true).await?;
        progress(&format!("fsyncs: {rate:.0} ev/s with the aggregator down"));
        let down = self.fsync_phase("fsync-down", rate, false).await?;
        report.fsyncs = Some(FsyncReport {
            rate,
            seconds: self.args.duration.as_secs_f64(),
            idle_seconds: FSYNC_IDLE.as_secs_f64(),
            acks_flowing: flowing,
            aggregator_down: down,
        });
        Ok(())
    }

    async fn fsync_phase(
        &self,
        name: &str,
        rate: f64,
        upstream: bool,
    ) -> Result<FsyncPhase, BenchError> {
        let aggregator = if upstream {
            Some(
                Aggregator::start(
                    std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
                    self.aggregator_options(),
                )
                .await
                .map_err(BenchError::Listen)?,
            )
        } else {
            None
        };
        let node = match &aggregator {
            Some(a) => a.addr,
            None => reserve_port()?,
        };
        let mut spec = self.prepare(name, &node.to_string(), self.args.spool_max_bytes)?;
        let log = self.work.join(name).join("strace.log");
        spec.strace_log = Some(log.clone());
        let child: AckgateChild = child::spawn(&spec).await?;
        let mut load_spec = self.spec();
        load_spec.rate = Some(rate);
        let c0 = child::spool_commits(child.metrics).await;
        let t0 = wall_secs();
        let load = load::run(child.listen, &load_spec).await;
        let t1 = wall_secs();
        let c1 = child::spool_commits(child.metrics).await;
        tokio::time::sleep(FSYNC_IDLE).await;
        let t2 = wall_secs();
        let c2 = child::spool_commits(child.metrics).await;
        let diff = |a: Option<u64>, b: Option<u64>| a.zip(b).map(|(a, b)| b.saturating_sub(a));
        let upstream_acks_load = aggregator
            .as_ref()
            .map_or(0, |a| a.delivered.frames.load(Ordering::Acquire));
        child.stop(STOP_GRACE).await;
        let count = |from, to| {
            child::count_syncs(&log, from, to).map_err(|e| BenchError::StraceLog {
                path: log.clone(),
                reason: e.to_string(),
            })
        };
        let phase = FsyncPhase {
            requests: load.requests,
            events: load.events,
            upstream_acks: upstream_acks_load,
            fsyncs_during_load: count(t0, t1)?,
            fsyncs_idle_after: count(t1, t2)?,
            fsyncs_total: count(0.0, f64::MAX)?,
            commits_during_load: diff(c0, c1),
            commits_idle_after: diff(c1, c2),
            errors: load.errors.clone(),
        };
        if let Some(aggregator) = aggregator {
            aggregator.stop().await;
        }
        Ok(phase)
    }
}

/// Wait until the aggregator holds `events` events; `None` if `limit` passed first.
async fn wait_delivered(aggregator: &Aggregator, events: u64, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if aggregator.delivered.events() >= events {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn generated_config_is_valid() {
        let text = config_text(Path::new("/tmp/x/spool.redb"), "127.0.0.1:9", 1 << 30, 8);
        let config = Config::parse(&text, Path::new("bench.toml")).unwrap();
        assert_eq!(config.upstream.window, 8);
        assert_eq!(config.spool.max_bytes.0, 1 << 30);
    }
}
