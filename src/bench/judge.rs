//! The targets an invocation of `ackgate bench` is judged against, each from figures of the
//! same invocation (a baseline measured minutes apart on this machine would mean nothing).

use super::child::ProcStats;
use super::report::{BenchReport, Check};

/// RSS bound of the targets.
pub const RSS_TARGET_MIB: f64 = 32.0;
/// Start-up bound of the targets (1 M queued records).
const STARTUP_TARGET_S: f64 = 2.0;
/// CPU of the ackgate process (user + system) per acked event at max load.
const CPU_NS_TARGET: f64 = 120.0;
/// Throughput at max load against the disk's durable-write ceiling.
const CEILING_RATIO_TARGET: f64 = 0.9;

impl BenchReport {
    /// Judge the targets that this invocation measured.
    pub(super) fn judge(&mut self) {
        let mut checks = Vec::new();
        self.check_throughput(&mut checks);
        self.check_cpu(&mut checks);
        self.check_rtt(&mut checks);
        self.check_ack_latency(&mut checks);
        self.check_steady_rss(&mut checks);
        self.check_backlog(&mut checks);
        self.check_fsyncs(&mut checks);
        checks.extend(self.crash.as_ref().map(|c| c.check()));
        self.checks = checks;
    }

    /// Throughput against the durable-write ceiling.
    fn check_throughput(&self, checks: &mut Vec<Check>) {
        if let (Some(run), Some((bandwidth, commits))) = (self.runs.first(), self.ceiling_events())
        {
            let direct = self
                .direct
                .as_ref()
                .map(|d| {
                    format!(
                        "; direct path {:.0} ev/s, ackgate/direct {:.2}",
                        d.events_per_s,
                        run.events_per_s / d.events_per_s.max(1e-9)
                    )
                })
                .unwrap_or_default();
            checks.push(Check {
                target: format!("throughput ≥ {CEILING_RATIO_TARGET:.2} × durable-write ceiling (MB/s ÷ event bytes)"),
                measured: format!(
                    "{:.0} ev/s = {:.3} × {:.0} ev/s (commits/s × batch: {:.0} ev/s, ×{:.2}){direct}",
                    run.events_per_s,
                    run.events_per_s / bandwidth,
                    bandwidth,
                    commits,
                    run.events_per_s / commits.max(1e-9),
                ),
                met: run.events_per_s >= CEILING_RATIO_TARGET * bandwidth,
            });
        }
    }

    /// ackgate's CPU per acked event at max load.
    fn check_cpu(&self, checks: &mut Vec<Check>) {
        let Some(run) = self.runs.first() else {
            return;
        };
        if let Some((ns, user_ns)) = run.cpu_ns_per_event() {
            checks.push(Check {
                target: format!("CPU ≤ {CPU_NS_TARGET:.0} ns per acked event at max load (user + sys of ackgate ÷ events acked)"),
                measured: format!(
                    "{ns:.0} ns/event ({user_ns:.0} user + {:.0} sys) at {:.0} ev/s",
                    ns - user_ns,
                    run.events_per_s
                ),
                met: ns <= CPU_NS_TARGET,
            });
        }
    }

    /// The longest RTT against 0 ms.
    fn check_rtt(&self, checks: &mut Vec<Check>) {
        let zero = self.runs.iter().find(|r| r.rtt_ms == Some(0.0));
        let longest = self
            .runs
            .iter()
            .filter(|r| r.rtt_ms.is_some_and(|t| t > 0.0))
            .max_by(|a, b| {
                a.rtt_ms
                    .partial_cmp(&b.rtt_ms)
                    .unwrap_or(std::cmp::Ordering::Equal)
            });
        if let (Some(zero), Some(far)) = (zero, longest) {
            let ratio = far.delivered_events_per_s / zero.delivered_events_per_s.max(1e-9);
            checks.push(Check {
                target: format!(
                    "delivered ev/s at {:.0} ms RTT ≥ 0.80 × at 0 ms",
                    far.rtt_ms.unwrap_or(0.0)
                ),
                measured: format!(
                    "{:.0} vs {:.0} ev/s = {ratio:.3}",
                    far.delivered_events_per_s, zero.delivered_events_per_s
                ),
                met: ratio >= 0.8,
            });
        }
    }

    /// Ack p99 at half load against the fsync p99.
    fn check_ack_latency(&self, checks: &mut Vec<Check>) {
        if let (Some(half), Some((_, _, fsync_p99))) = (&self.half_load, self.strict_ceiling()) {
            if let Some(ack) = &half.ack_latency {
                let limit = 2.0 * fsync_p99 + 1.0;
                checks.push(Check {
                    target: "ack p99 at half load ≤ 2 × fsync p99 + 1 ms".into(),
                    measured: format!(
                        "{:.2} ms vs limit {limit:.2} ms (fsync p99 {fsync_p99:.2} ms) = {:.2} × limit",
                        ack.p99_ms,
                        ack.p99_ms / limit
                    ),
                    met: ack.p99_ms <= limit,
                });
            }
        }
    }

    /// RSS at steady load.
    fn check_steady_rss(&self, checks: &mut Vec<Check>) {
        let steady: Vec<(&str, &ProcStats)> = self
            .runs
            .iter()
            .chain(self.half_load.iter())
            .filter_map(|r| r.ackgate.as_ref().map(|a| (r.label.as_str(), a)))
            .collect();
        if steady.is_empty() {
            return;
        }
        let peak = |s: &ProcStats| s.hwm_mib.max(s.rss_max_mib);
        let each: Vec<String> = steady
            .iter()
            .map(|(label, s)| format!("{label} {:.1}", peak(s)))
            .collect();
        let worst = steady.iter().map(|(_, s)| peak(s)).fold(0.0, f64::max);
        checks.push(Check {
            target: format!("RSS ≤ {RSS_TARGET_MIB} MiB at steady load (VmHWM) in every run"),
            measured: format!("MiB: {}", each.join(", ")),
            met: worst <= RSS_TARGET_MIB,
        });
    }

    /// RSS with a backlog, and start-up time.
    fn check_backlog(&self, checks: &mut Vec<Check>) {
        if let Some(b) = &self.backlog {
            let max = [
                b.hold_rss.rss_max_mib,
                b.drain_rss.rss_max_mib,
                b.fill_rss.rss_max_mib,
            ]
            .into_iter()
            .fold(0.0, f64::max);
            checks.push(Check {
                target: format!(
                    "RSS ≤ {RSS_TARGET_MIB} MiB with a backlog ({:.0} MiB spool file)",
                    b.spool_file_mib
                ),
                measured: format!(
                    "fill {:.1}, hold {:.1}, drain {:.1} MiB (max VmRSS)",
                    b.fill_rss.rss_max_mib, b.hold_rss.rss_max_mib, b.drain_rss.rss_max_mib
                ),
                met: max <= RSS_TARGET_MIB,
            });
            if let Some(records) = b.records {
                checks.push(Check {
                    target: format!(
                        "start-up with {records} queued records < {STARTUP_TARGET_S} s"
                    ),
                    measured: format!("{:.3} s to the ready line", b.startup_seconds),
                    met: b.startup_seconds < STARTUP_TARGET_S && b.fill_requests >= records,
                });
            }
        }
    }

    /// Deletes cost no commit of their own.
    fn check_fsyncs(&self, checks: &mut Vec<Check>) {
        if let Some(f) = &self.fsyncs {
            let a = &f.acks_flowing;
            let d = &f.aggregator_down;
            let extra = a.fsyncs_during_load as f64 - d.fsyncs_during_load as f64;
            let per_ack = extra / (a.upstream_acks.max(1) as f64);
            let commits = match (a.commits_during_load, d.commits_during_load) {
                (Some(a_c), Some(d_c)) => format!(
                    "; commits during load {a_c} vs {d_c} ({:+.2} per ack), {} idle after",
                    (a_c as f64 - d_c as f64) / a.upstream_acks.max(1) as f64,
                    a.commits_idle_after.unwrap_or(0)
                ),
                _ => String::new(),
            };
            checks.push(Check {
                target: "deletes after acks cost no commit of their own".into(),
                measured: format!(
                    "fsyncs during load: {} with acks flowing ({} upstream acks) vs {} without: {:+.0} = {per_ack:+.2} per ack; {} in {:.0} s idle after{commits}",
                    a.fsyncs_during_load, a.upstream_acks, d.fsyncs_during_load, extra, a.fsyncs_idle_after, f.idle_seconds
                ),
                met: per_ack < 0.1,
            });
        }
    }
}
