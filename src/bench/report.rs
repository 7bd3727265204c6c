//! What `ackgate bench` prints: the figures of each run, each next to its same-invocation
//! baseline (direct path, disk ceiling, the 0 ms run), and the targets judged.

use std::fmt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::Serialize;

use super::aggregator::Aggregator;
use super::child::{quantile_ms, AckStages, ProcStats};
use super::disk::DiskCeiling;
use super::histogram::LatencySummary;
use super::load::{LoadResult, LoadSpec};
use super::BenchArgs;

/// The machine the figures come from.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub mem_total_mib: u64,
    pub kernel: String,
    /// Directory of the spools and the ceiling file, and its filesystem.
    pub dir: String,
    pub filesystem: String,
}

impl Machine {
    fn probe(dir: &Path) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let field = |text: &str, key: &str| -> String {
            text.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
                .unwrap_or_default()
        };
        let mem_kib: u64 = field(&meminfo, "MemTotal")
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        Machine {
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model: field(&cpuinfo, "model name"),
            mem_total_mib: mem_kib / 1024,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
            dir: dir.display().to_string(),
            filesystem: filesystem_of(dir),
        }
    }
}

/// "ext4 on /dev/vda (mounted at /)": the longest mount point that holds `dir`.
fn filesystem_of(dir: &Path) -> String {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && dir.starts_with(f[1])).then(|| (f[1].len(), f[2], f[0], f[1]))
        })
        .max_by_key(|m| m.0)
        .map(|(_, fs, dev, at)| format!("{fs} on {dev} (mounted at {at})"))
        .unwrap_or_else(|| "unknown".into())
}

/// The load settings, echoed.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub connections: u32,
    pub legacy: bool,
    pub window: u32,
    pub event_bytes: u64,
    pub batch: u32,
    pub duration_s: f64,
    pub events: Option<u64>,
    pub rate: Option<f64>,
    pub upstream_window: u32,
    pub spool_max_bytes: u64,
}

/// One load run (direct or through ackgate).
#[derive(Debug, Clone, Serialize)]
pub struct RunFigures {
    pub label: String,
    pub rtt_ms: Option<f64>,
    pub rate_cap: Option<f64>,
    pub requests: u64,
    /// Acked (ack mode) or written (legacy) events.
    pub events: u64,
    pub seconds: f64,
    pub events_per_s: f64,
    /// Event payload MB/s (10^6 bytes) accepted.
    pub mb_per_s: f64,
    /// Events the aggregator received while the senders ran, per second of the run.
    pub delivered_events_per_s: f64,
    pub delivered_total: u64,
    pub duplicates: u64,
    /// Accepted events that never reached the aggregator (0 unless the drain timed out).
    pub missing: u64,
    /// Time after the load until the aggregator had every accepted event.
    pub drain_seconds: Option<f64>,
    pub ack_latency: Option<LatencySummary>,
    pub delivery_latency: LatencySummary,
    pub ackgate: Option<ProcStats>,
    /// Spool commits during the load (ackgate's /metrics).
    pub spool_commits: Option<u64>,
    /// Where an ack's time went inside ackgate during the load.
    pub stages: Option<StageQuantiles>,
    pub bench_cpu_percent: f64,
    pub unacked: u64,
    pub errors: Vec<String>,
    pub error_count: u64,
    pub ackgate_warnings: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ackgate_tail: Option<String>,
}

/// p50 and p99 (ms, upper bounds of √2-wide buckets) of ackgate's own ack stages over a run.
#[derive(Debug, Clone, Serialize)]
pub struct StageQuantiles {
    /// Handed to the spool writer → its commit starts.
    pub queue: (Option<f64>, Option<f64>),
    /// One group commit, fsync included.
    pub commit: (Option<f64>, Option<f64>),
    /// Handed to the spool → commit answered, as the connection sees it.
    pub wait: (Option<f64>, Option<f64>),
    /// Complete on the socket → ack written.
    pub ack: (Option<f64>, Option<f64>),
}

impl StageQuantiles {
    pub fn between(before: &AckStages, after: &AckStages) -> StageQuantiles {
        let pair =
            |b: &[(f64, u64)], a: &[(f64, u64)]| (quantile_ms(b, a, 0.5), quantile_ms(b, a, 0.99));
        StageQuantiles {
            queue: pair(&before.queue, &after.queue),
            commit: pair(&before.commit, &after.commit),
            wait: pair(&before.wait, &after.wait),
            ack: pair(&before.ack, &after.ack),
        }
    }
}

impl fmt::Display for StageQuantiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let q = |(p50, p99): (Option<f64>, Option<f64>)| {
            format!("p50 ≤ {} ms, p99 ≤ {} ms", opt_ms(p50), opt_ms(p99))
        };
        write!(
            f,
            "inside ackgate: commit queue {}, commit {}, handed over to answered {}, request to ack {}",
            q(self.queue),
            q(self.commit),
            q(self.wait),
            q(self.ack)
        )
    }
}

/// What a run measured, gathered by the caller.
pub struct Measured<'a> {
    pub load: &'a LoadResult,
    /// Aggregator count when the senders finished.
    pub delivered_at_end: u64,
    pub drain: Option<Duration>,
    /// Bench-process CPU ticks over the load.
    pub own_ticks: u64,
}

impl RunFigures {
    /// ackgate's CPU (user + system) per event accepted, in ns; and its user-space part.
    pub fn cpu_ns_per_event(&self) -> Option<(f64, f64)> {
        let a = self.ackgate.as_ref()?;
        let events = self.events.max(1) as f64;
        Some((a.cpu_seconds * 1e9 / events, a.user_seconds * 1e9 / events))
    }

    pub fn new(
        label: &str,
        rtt: Option<Duration>,
        spec: &LoadSpec,
        m: Measured<'_>,
        aggregator: &Aggregator,
    ) -> RunFigures {
        let load = m.load;
        let seconds = load.elapsed.as_secs_f64().max(1e-9);
        let delivered = aggregator.delivered.events();
        let duplicates = aggregator.delivered.duplicates.load(Ordering::Acquire);
        let ticks = super::child::clock_ticks_per_s();
        RunFigures {
            label: label.to_string(),
            rtt_ms: rtt.map(|r| r.as_secs_f64() * 1e3),
            rate_cap: spec.rate,
            requests: load.requests,
            events: load.events,
            seconds,
            events_per_s: load.events as f64 / seconds,
            mb_per_s: (load.events * spec.event_bytes as u64) as f64 / 1e6 / seconds,
            delivered_events_per_s: m.delivered_at_end as f64 / seconds,
            delivered_total: delivered,
            duplicates,
            missing: load
                .events
                .saturating_sub(delivered.saturating_sub(duplicates)),
            drain_seconds: m.drain.map(|d| d.as_secs_f64()),
            ack_latency: (!spec.legacy).then(|| load.ack_latency.summary()),
            delivery_latency: aggregator.delivered.latency().summary(),
            ackgate: None,
            spool_commits: None,
            stages: None,
            bench_cpu_percent: m.own_ticks as f64 / ticks / seconds * 100.0,
            unacked: load.unacked,
            errors: load.errors.clone(),
            error_count: load.error_count,
            ackgate_warnings: 0,
            ackgate_tail: None,
        }
    }
}

/// The backlog scenario.
#[derive(Debug, Clone, Serialize)]
pub struct BacklogReport {
    pub target_events: u64,
    pub records: Option<u64>,
    pub fill_events: u64,
    pub fill_requests: u64,
    pub fill_seconds: f64,
    pub fill_events_per_s: f64,
    pub fill_errors: Vec<String>,
    pub fill_rss: ProcStats,
    pub spool_file_mib: f64,
    pub hold_rss: ProcStats,
    pub shutdown_seconds: f64,
    pub startup_seconds: f64,
    pub startup_rss: ProcStats,
    pub drained: u64,
    pub drain_complete: bool,
    pub drain_seconds: f64,
    pub drain_events_per_s: f64,
    pub drain_mb_per_s: f64,
    pub drain_rss: ProcStats,
    pub duplicates: u64,
    pub ackgate_warnings: u64,
}

/// One phase of the fsync scenario.
#[derive(Debug, Clone, Serialize)]
pub struct FsyncPhase {
    pub requests: u64,
    pub events: u64,
    /// Chunks the aggregator acked during the phase (each one a delete in the spool).
    pub upstream_acks: u64,
    pub fsyncs_during_load: u64,
    pub fsyncs_idle_after: u64,
    pub fsyncs_total: u64,
    /// Spool commits (ackgate's /metrics) during the load and the idle time after it.
    pub commits_during_load: Option<u64>,
    pub commits_idle_after: Option<u64>,
    pub errors: Vec<String>,
}

/// The fsync scenario: same load with and without upstream acks (deletes).
#[derive(Debug, Clone, Serialize)]
pub struct FsyncReport {
    pub rate: f64,
    pub seconds: f64,
    pub idle_seconds: f64,
    pub acks_flowing: FsyncPhase,
    pub aggregator_down: FsyncPhase,
}

/// One target, judged.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub target: String,
    pub measured: String,
    pub met: bool,
}

/// Everything one invocation measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub machine: Machine,
    pub settings: Settings,
    /// Ceiling measured before the runs.
    pub ceiling: Option<DiskCeiling>,
    /// Ceiling measured again after the runs (relay scenario).
    pub ceiling_after: Option<DiskCeiling>,
    pub direct: Option<RunFigures>,
    pub runs: Vec<RunFigures>,
    /// With `--baseline-bin`: the runs through that binary, alternated with `runs`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub baseline_runs: Vec<RunFigures>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline_bin: Option<String>,
    pub half_load: Option<RunFigures>,
    pub backlog: Option<BacklogReport>,
    pub fsyncs: Option<FsyncReport>,
    pub crash: Option<super::crash::CrashReport>,
    pub checks: Vec<Check>,
    pub kept: Option<String>,
}

impl BenchReport {
    pub(super) fn new(args: &BenchArgs, dir: &Path) -> BenchReport {
        BenchReport {
            machine: Machine::probe(dir),
            settings: Settings {
                connections: args.connections,
                legacy: args.legacy,
                window: args.window,
                event_bytes: args.event_bytes,
                batch: args.batch,
                duration_s: args.duration.as_secs_f64(),
                events: args.events,
                rate: args.rate,
                upstream_window: args.upstream_window,
                spool_max_bytes: args.spool_max_bytes,
            },
            ceiling: None,
            ceiling_after: None,
            direct: None,
            runs: Vec::new(),
            baseline_runs: Vec::new(),
            baseline_bin: None,
            half_load: None,
            backlog: None,
            fsyncs: None,
            crash: None,
            checks: Vec::new(),
            kept: None,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }

    /// The stricter reading of the two ceilings: the higher bandwidth and commit rate, the
    /// lower fsync p99 (MB/s, commits/s, fsync p99 ms).
    pub fn strict_ceiling(&self) -> Option<(f64, f64, f64)> {
        let readings: Vec<&DiskCeiling> = self
            .ceiling
            .iter()
            .chain(self.ceiling_after.iter())
            .collect();
        if readings.is_empty() {
            return None;
        }
        Some((
            readings.iter().map(|c| c.mb_per_s).fold(0.0, f64::max),
            readings.iter().map(|c| c.commits_per_s).fold(0.0, f64::max),
            readings
                .iter()
                .map(|c| c.fsync.p99_ms)
                .fold(f64::INFINITY, f64::min),
        ))
    }

    /// Ceiling in events/s: (bandwidth-bound, commit-bound), from the stricter reading.
    pub fn ceiling_events(&self) -> Option<(f64, f64)> {
        let (mb_per_s, commits_per_s, _) = self.strict_ceiling()?;
        let bytes = self.settings.event_bytes as f64;
        Some((
            mb_per_s * 1e6 / bytes,
            commits_per_s * f64::from(self.settings.batch),
        ))
    }
}

/// Means over runs of one binary: throughput, ackgate's CPU per event and its peak RSS.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Means {
    events_per_s: f64,
    ns_per_event: f64,
    rss_mib: f64,
}

impl Means {
    /// `None` without runs, or when a run has no CPU or memory sample of ackgate.
    fn of(runs: &[RunFigures]) -> Option<Means> {
        let n = runs.len() as f64;
        let mut sum = Means {
            events_per_s: 0.0,
            ns_per_event: 0.0,
            rss_mib: 0.0,
        };
        for run in runs {
            sum.events_per_s += run.events_per_s;
            sum.ns_per_event += run.cpu_ns_per_event()?.0;
            sum.rss_mib += run.ackgate?.rss_max_mib;
        }
        (!runs.is_empty()).then(|| Means {
            events_per_s: sum.events_per_s / n,
            ns_per_event: sum.ns_per_event / n,
            rss_mib: sum.rss_mib / n,
        })
    }
}

fn opt_ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.1}"))
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write_load(f)?;
        self.write_ceiling(f)?;
        self.write_runs(f)?;
        self.write_comparison(f)?;
        self.write_backlog(f)?;
        self.write_fsyncs(f)?;
        if let Some(crash) = &self.crash {
            write!(f, "{crash}")?;
        }
        self.write_targets(f)?;
        Ok(())
    }
}

impl BenchReport {
    /// The machine and the load.
    fn write_load(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = &self.machine;
        let s = &self.settings;
        writeln!(
            f,
            "machine: {} cpus ({}), {} MiB RAM, Linux {}",
            m.cpus, m.cpu_model, m.mem_total_mib, m.kernel
        )?;
        writeln!(f, "spool dir: {} ({})", m.dir, m.filesystem)?;
        writeln!(
            f,
            "load: {} {} connection(s), window {}, {} events of {} B per request, {:.0} s{}{}; ackgate upstream.window {}",
            s.connections,
            if s.legacy { "legacy (v0.10, no ack)" } else { "ack-mode" },
            s.window,
            s.batch,
            s.event_bytes,
            s.duration_s,
            s.events.map(|e| format!(" or {e} events")).unwrap_or_default(),
            s.rate.map(|r| format!(", capped at {r:.0} ev/s")).unwrap_or_default(),
            s.upstream_window,
        )?;
        Ok(())
    }

    /// The disk ceiling measured in the same invocation.
    fn write_ceiling(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.settings;
        let readings = [("before", &self.ceiling), ("after", &self.ceiling_after)];
        if self.ceiling.is_some() {
            writeln!(f)?;
            writeln!(f, "disk ceiling (same directory, same invocation):")?;
        }
        for (when, c) in readings {
            let Some(c) = c else { continue };
            writeln!(
                f,
                "  {when:<6} 4 KiB write+fdatasync: {:.0} commits/s, fsync p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms; 1 MiB write+fdatasync: {:.0} MB/s",
                c.commits_per_s, c.fsync.p50_ms, c.fsync.p99_ms, c.fsync.p999_ms, c.mb_per_s
            )?;
        }
        if let (Some((bw, commits)), Some((mb, cps, p99))) =
            (self.ceiling_events(), self.strict_ceiling())
        {
            writeln!(
                f,
                "  stricter reading: {mb:.0} MB/s, {cps:.0} commits/s, fsync p99 {p99:.2} ms; as {} B events: {bw:.0} ev/s by bandwidth, {commits:.0} ev/s by commits/s × batch",
                s.event_bytes
            )?;
        }
        Ok(())
    }

    /// One line per run, then its counts.
    fn write_runs(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let runs: Vec<&RunFigures> = self
            .direct
            .iter()
            .chain(self.runs.iter())
            .chain(self.baseline_runs.iter())
            .chain(self.half_load.iter())
            .collect();
        if !runs.is_empty() {
            writeln!(f)?;
            writeln!(
                f,
                "{:<34} {:>10} {:>7} {:>10} {:>8} {:>8} {:>8} {:>8} {:>8} {:>7} {:>6} {:>6} {:>7}",
                "run",
                "ev/s",
                "MB/s",
                "deliv ev/s",
                "ack p50",
                "ack p99",
                "ack p999",
                "e2e p50",
                "e2e p99",
                "RSS MiB",
                "CPU %",
                "ns/ev",
                "vs base"
            )?;
            let direct = self.direct.as_ref().map(|d| d.events_per_s);
            let zero = self
                .runs
                .iter()
                .find(|r| r.rtt_ms == Some(0.0))
                .map(|r| r.delivered_events_per_s);
            for r in runs {
                let ack = r.ack_latency.as_ref();
                let base = match (r.label.as_str(), r.rtt_ms) {
                    ("direct", _) => "1.00".to_string(),
                    (_, Some(t)) if t > 0.0 => zero
                        .map(|z| format!("{:.2}r", r.delivered_events_per_s / z.max(1e-9)))
                        .unwrap_or("-".into()),
                    _ => direct
                        .map(|d| format!("{:.2}d", r.events_per_s / d.max(1e-9)))
                        .unwrap_or("-".into()),
                };
                writeln!(
                    f,
                    "{:<34} {:>10.0} {:>7.1} {:>10.0} {:>8} {:>8} {:>8} {:>8.1} {:>8.1} {:>7} {:>6} {:>6} {:>7}",
                    r.label,
                    r.events_per_s,
                    r.mb_per_s,
                    r.delivered_events_per_s,
                    opt_ms(ack.map(|a| a.p50_ms)),
                    opt_ms(ack.map(|a| a.p99_ms)),
                    opt_ms(ack.map(|a| a.p999_ms)),
                    r.delivery_latency.p50_ms,
                    r.delivery_latency.p99_ms,
                    r.ackgate.map_or("-".into(), |a| format!("{:.1}", a.rss_max_mib)),
                    r.ackgate.map_or("-".into(), |a| format!("{:.0}", a.cpu_percent)),
                    r.cpu_ns_per_event().map_or("-".into(), |(ns, _)| format!("{ns:.0}")),
                    base,
                )?;
            }
            writeln!(f, "  (latencies in ms; RSS = max VmRSS of ackgate during the load (worker + supervisor's own pages); CPU % of one core, ackgate only;")?;
            writeln!(
                f,
                "   ns/ev = ackgate's user + sys CPU time ÷ events acked;"
            )?;
            writeln!(f, "   vs base: d = ackgate/direct path events/s, r = delivered ev/s / the 0 ms run's)")?;
            for r in self
                .direct
                .iter()
                .chain(self.runs.iter())
                .chain(self.baseline_runs.iter())
                .chain(self.half_load.iter())
            {
                let drain = r
                    .drain_seconds
                    .map_or("not complete".into(), |d| format!("{d:.2} s"));
                writeln!(
                    f,
                    "  {}: {} events in {} requests, {:.2} s{}; delivered {} (dup {}, missing {}), drain after load {drain}; bench CPU {:.0}%{}{}",
                    r.label,
                    r.events,
                    r.requests,
                    r.seconds,
                    r.spool_commits.map_or(String::new(), |c| format!(
                        "; {c} spool commits ({:.0}/s, {:.1} requests per commit{})",
                        c as f64 / r.seconds,
                        r.requests as f64 / c.max(1) as f64,
                        r.stages.as_ref().map_or(String::new(), |s| format!("; {s}")),
                    )),
                    r.delivered_total,
                    r.duplicates,
                    r.missing,
                    r.bench_cpu_percent,
                    if r.error_count > 0 { format!("; {} sender error(s): {}", r.error_count, r.errors.join(" | ")) } else { String::new() },
                    if r.ackgate_warnings > 0 { format!("; {} ackgate WARN/ERROR lines", r.ackgate_warnings) } else { String::new() },
                )?;
            }
        }
        Ok(())
    }

    /// With `--baseline-bin`: each binary's means over its rounds, and ackgate's as a ratio.
    fn write_comparison(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (Some(bin), Some(base), Some(new)) = (
            &self.baseline_bin,
            Means::of(&self.baseline_runs),
            Means::of(&self.runs),
        ) else {
            return Ok(());
        };
        writeln!(f)?;
        writeln!(
            f,
            "against the baseline {bin} ({} alternated rounds, means):",
            self.runs.len()
        )?;
        writeln!(
            f,
            "  ev/s {:.0} → {:.0} (× {:.2}); CPU ns/ev {:.0} → {:.0} (× {:.2}); RSS MiB {:.1} → {:.1}",
            base.events_per_s,
            new.events_per_s,
            new.events_per_s / base.events_per_s.max(1e-9),
            base.ns_per_event,
            new.ns_per_event,
            new.ns_per_event / base.ns_per_event.max(1e-9),
            base.rss_mib,
            new.rss_mib,
        )
    }

    /// The backlog fill, hold, restart and drain.
    fn write_backlog(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(b) = &self.backlog {
            writeln!(f)?;
            writeln!(f, "backlog (aggregator down during the fill):")?;
            writeln!(
                f,
                "  fill: {} events in {} requests, {:.1} s ({:.0} ev/s); spool file {:.0} MiB; RSS max {:.1} MiB",
                b.fill_events, b.fill_requests, b.fill_seconds, b.fill_events_per_s, b.spool_file_mib, b.fill_rss.rss_max_mib
            )?;
            writeln!(
                f,
                "  hold (no traffic): RSS max {:.1} MiB, mean {:.1} MiB",
                b.hold_rss.rss_max_mib, b.hold_rss.rss_mean_mib
            )?;
            writeln!(
                f,
                "  stop: {:.2} s; start-up to ready line: {:.3} s; RSS after start {:.1} MiB",
                b.shutdown_seconds, b.startup_seconds, b.startup_rss.rss_max_mib
            )?;
            writeln!(
                f,
                "  drain: {} events in {:.1} s ({:.0} ev/s, {:.1} MB/s){}; RSS max {:.1} MiB, mean {:.1}; CPU {:.0}%; dup {}",
                b.drained,
                b.drain_seconds,
                b.drain_events_per_s,
                b.drain_mb_per_s,
                if b.drain_complete { "" } else { " NOT COMPLETE" },
                b.drain_rss.rss_max_mib,
                b.drain_rss.rss_mean_mib,
                b.drain_rss.cpu_percent,
                b.duplicates
            )?;
            if !b.fill_errors.is_empty() {
                writeln!(f, "  fill errors: {}", b.fill_errors.join(" | "))?;
            }
        }
        Ok(())
    }

    /// fsyncs counted with strace.
    fn write_fsyncs(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(x) = &self.fsyncs {
            writeln!(f)?;
            writeln!(
                f,
                "fsync count (strace --seccomp-bpf), {:.0} ev/s for {:.0} s, then {:.0} s idle:",
                x.rate, x.seconds, x.idle_seconds
            )?;
            for (name, p) in [
                ("acks flowing", &x.acks_flowing),
                ("aggregator down", &x.aggregator_down),
            ] {
                let commits = |c: Option<u64>| c.map_or("-".to_string(), |c| c.to_string());
                writeln!(
                    f,
                    "  {name:<16} requests {:>6}  upstream acks {:>6}  commits: load {:>6}, idle {:>4}  fsyncs: load {:>6}, idle {:>4}, whole process {:>6}{}",
                    p.requests, p.upstream_acks, commits(p.commits_during_load), commits(p.commits_idle_after),
                    p.fsyncs_during_load, p.fsyncs_idle_after, p.fsyncs_total,
                    if p.errors.is_empty() { String::new() } else { format!("  errors: {}", p.errors.join(" | ")) }
                )?;
            }
        }
        Ok(())
    }

    /// Each target, met or missed.
    fn write_targets(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.checks.is_empty() {
            writeln!(f)?;
            writeln!(f, "targets:")?;
            for c in &self.checks {
                writeln!(
                    f,
                    "  [{}] {}: {}",
                    if c.met { "met " } else { "MISS" },
                    c.target,
                    c.measured
                )?;
            }
        }
        if let Some(kept) = &self.kept {
            writeln!(f, "kept: {kept}")?;
        }
        Ok(())
    }
}
