//! Issue 21's fault harness (DESIGN.md invariant 10): ackgate's own lifecycle under load, and
//! what it costs the senders. The real `ackgate run` at the timing a user gets (default config
//! but for addresses and paths) forwards to the test aggregator (acking like fluentd's
//! in_forward, counting every event id and its copies) while nine senders write to it:
//!
//! - 4 legacy senders, what fluentd v0.10 writes: a 10-event PackedForward chunk with str32
//!   entries and no option, one connection per chunk (connect, the four writes, close), never
//!   reading, 250 chunks/s each. A chunk counts as *sent* once connect, writes and close
//!   returned; a refused connect or a failed write keeps the chunk and sends it again 100 ms
//!   later (v0.10 keeps its buffer).
//! - 3 persistent no-ack senders (docker's fluentd log driver, fluent-logger-golang without
//!   `RequestAck`): one long-lived connection each, 10 Message-mode events per write, 300
//!   writes/s each, never reading. Events of a write that returned are sent; a write that fails
//!   is a *reset seen*: reconnect and write the same request again.
//! - 2 acking senders (PackedForward with a `chunk` option): wait up to 5 s for the ack; on a
//!   timeout or a close, reconnect and send the same chunk again. An attempt without its ack is
//!   an *ack missing*; a chunk not acked within 60 s is *never acked*.
//!
//! Together they offer 22,000 events/s. Each event carries a unique id (sender, seq): senders
//! 1–4 are the legacy ones, 5–7 the persistent ones, 8–9 the acking ones. Once the
//! load flows, after a random 0.5–2.5 s, one fault hits ackgate (see `support/lifecycle.rs`):
//! a kill -9 of the worker, SIGTERM then a start, a reload with a valid or a broken file, an
//! upgrade (SIGUSR2) with the same or a replaced executable. The load goes on for 2 s after
//! ackgate serves again; then the senders stop, the harness waits until ackgate holds nothing
//! (no connection open, spool empty), and counts per sender kind what was sent, lost and
//! duplicated, the resets persistent senders saw, the acks that did not come.
//!
//! The targets (issue 21): reload (good and broken file), upgrade (same and replaced
//! executable) and kill -9 of the worker lose 0 events of both kinds of no-ack sender; reload
//! and upgrade reset no persistent connection and miss no ack, and keep ackgate's pid; SIGTERM
//! then start loses 0 events of one-connection-per-chunk senders (what persistent senders lose
//! there is measured and reported, not asserted). In every scenario no acked event is lost
//! (invariant 7). The control run, with no fault, must count exactly: 0 lost, 0 duplicates,
//! 0 resets, every ack; it checks the harness itself.
//!
//! Modes: by default each scenario runs once (in `cargo test --release`);
//! `ACKGATE_LIFECYCLE_RUNS=20` runs each 20 times. `ACKGATE_LIFECYCLE_MEASURE=1` prints every
//! figure and the targets missed without failing (how the "before" of FAULTS.md scenario 10
//! was measured: this harness on 6211cdb, the tree before the lifecycle work):
//!
//! ```sh
//! ACKGATE_LIFECYCLE_MEASURE=1 ACKGATE_LIFECYCLE_RUNS=20 \
//!   cargo test --release --test faults_lifecycle -- --test-threads 1
//! ```
//!
//! One `LIFECYCLE-RUN` line per run, one `LIFECYCLE-SUMMARY` line per scenario, also saved
//! under `target/tmp/faults/lifecycle-<short|long>/`.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use support::*;

const EVENTS_PER_REQUEST: usize = 10;
const PAD: usize = 40;
const LEGACY_SENDERS: usize = 4;
const LEGACY_PER_SECOND: f64 = 250.0;
const PERSISTENT_SENDERS: usize = 3;
const PERSISTENT_PER_SECOND: f64 = 300.0;
const ACKING_SENDERS: usize = 2;
const ACKING_PER_SECOND: f64 = 150.0;
/// Events the aggregator must have seen before the fault's delay starts: the load flows.
const FLOWING: usize = 2_000;
/// The fault comes at a random moment in this range after the load flows.
const FAULT_DELAY: (Duration, Duration) = (Duration::from_millis(500), Duration::from_millis(2500));
/// How long the load goes on once ackgate serves again.
const LOAD_AFTER: Duration = Duration::from_secs(2);
/// Bound for ackgate to deliver everything and hold nothing once the senders stopped.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// After the drain, how long events may still take to be counted (the aggregator counts
/// before it acks, so this only covers a race with the last scrape).
const ARRIVAL_GRACE: Duration = Duration::from_secs(2);

/// `ACKGATE_LIFECYCLE_RUNS`: runs per scenario (default 1).
fn runs() -> u32 {
    std::env::var("ACKGATE_LIFECYCLE_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(1)
}

/// `ACKGATE_LIFECYCLE_MEASURE=1`: report the targets missed instead of failing on them.
fn measure() -> bool {
    std::env::var("ACKGATE_LIFECYCLE_MEASURE").is_ok_and(|v| v == "1")
}

/// The nine senders, sharing one ledger and id space.
fn start_load(relay: &LifecycleRelay) -> Senders {
    let mut senders = Senders::to(relay.addr());
    let base = |tag: &str, per_second: f64| {
        let mut load = Load::new(tag);
        load.events_per_request = EVENTS_PER_REQUEST;
        load.pad = PAD;
        load.per_second = Some(per_second);
        load.max_requests = Some(100_000);
        load.max_time = Some(Duration::from_secs(300));
        load.retry_wait = Duration::from_millis(100);
        load.give_up_after = Duration::from_secs(60);
        load
    };
    let mut legacy = base("life.legacy", LEGACY_PER_SECOND);
    legacy.retry_failed = true;
    senders.legacy(LEGACY_SENDERS, &legacy);
    senders.persistent(
        PERSISTENT_SENDERS,
        &base("life.persistent", PERSISTENT_PER_SECOND),
    );
    let mut acking = base("life.ack", ACKING_PER_SECOND);
    acking.ack_wait = Duration::from_secs(5);
    senders.ack(ACKING_SENDERS, &acking);
    senders
}

/// What one sender kind handed over and what became of it.
#[derive(Debug, Default, Clone, Copy)]
struct Kind {
    /// Events sent (legacy, persistent) or acked (acking senders).
    sent: usize,
    /// Of those, never arrived.
    lost: usize,
    /// Extra copies that arrived.
    duplicates: u64,
}

impl Kind {
    fn of(ids: &HashSet<u64>, seen: &SeenState) -> Kind {
        let mut kind = Kind {
            sent: ids.len(),
            ..Kind::default()
        };
        for id in ids {
            match seen.counts.get(id) {
                None => kind.lost += 1,
                Some(&n) => kind.duplicates += u64::from(n - 1),
            }
        }
        kind
    }

    fn add(&mut self, other: Kind) {
        self.sent += other.sent;
        self.lost += other.lost;
        self.duplicates += other.duplicates;
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sent {} lost {} dup {}",
            self.sent, self.lost, self.duplicates
        )
    }
}

/// One run's figures.
#[derive(Debug)]
struct Run {
    outcome: FaultOutcome,
    /// From the load flowing to the fault.
    delay: Duration,
    legacy: Kind,
    persistent: Kind,
    acking: Kind,
    legacy_retries: u64,
    resets: BTreeMap<String, u64>,
    persistent_connect_failures: u64,
    acks_received: usize,
    acks_missing: BTreeMap<String, u64>,
    never_acked: usize,
    /// Entries upstream that were not harness events (altered bytes).
    foreign: u64,
    chunk_conflicts: Vec<String>,
    /// The lost events as `sender:first-last` seq ranges: a loss at the fault is a few
    /// contiguous runs of whole requests, a harness bug would look otherwise.
    lost_ranges: String,
    drain: Result<Duration, String>,
    /// Events sent per second over the load's duration.
    rate: f64,
    seconds: f64,
}

impl Run {
    fn resets(&self) -> u64 {
        self.resets.values().sum()
    }

    fn acks_missing(&self) -> u64 {
        self.acks_missing.values().sum()
    }

    fn line(&self, fault: Fault, run: u32, runs: u32) -> String {
        format!(
            "LIFECYCLE-RUN | {} | run {run}/{runs} | fault {:.1} s into the load: {} (serving again after {:.2} s) \
             | legacy {} (retries {}) | persistent {} resets {} {:?} (connects refused {}) \
             | acking acked {} lost {} dup {}, acks received {}, acks missing {} {:?}, never acked {} \
             | lost (sender:seqs) {} | {:.0} events/s | drain {} | {:.1} s",
            fault.label(),
            self.delay.as_secs_f64(),
            self.outcome.what,
            self.outcome.gap.as_secs_f64(),
            self.legacy,
            self.legacy_retries,
            self.persistent,
            self.resets(),
            self.resets,
            self.persistent_connect_failures,
            self.acking.sent,
            self.acking.lost,
            self.acking.duplicates,
            self.acks_received,
            self.acks_missing(),
            self.acks_missing,
            self.never_acked,
            self.lost_ranges,
            self.rate,
            match &self.drain {
                Ok(d) => format!("{:.1} s", d.as_secs_f64()),
                Err(e) => e.clone(),
            },
            self.seconds,
        )
    }
}

/// One run of `fault`: ackgate, aggregator and load, the fault at a random moment, the count.
fn run_once(fault: Fault) -> Run {
    let started = Instant::now();
    let agg = Aggregator::start();
    let seen = agg.seen();
    let mut relay = LifecycleRelay::start(agg.addr(), fault == Fault::UpgradeReplaced);
    let mut senders = start_load(&relay);
    let ledger = senders.ledger();
    let load_started = Instant::now();
    assert!(
        seen.wait(Duration::from_secs(30), |s| s.unique() >= FLOWING),
        "the load does not flow: {} events arrived within 30 s; ackgate log:\n{}",
        seen.with(|s| s.unique()),
        relay.gate().log().dump()
    );
    let delay = random_between(FAULT_DELAY.0, FAULT_DELAY.1);
    // The moment of the fault is random by design: this sleep is the point, not a wait.
    std::thread::sleep(delay);
    let delay = load_started.elapsed();
    let outcome = relay.inject(fault);
    std::thread::sleep(LOAD_AFTER);
    senders.stop();
    let load_time = load_started.elapsed();
    let drain = relay.drain(DRAIN_TIMEOUT);
    let sent = ledger.snapshot();
    let handed: HashSet<u64> = sent
        .legacy_written
        .iter()
        .chain(&sent.persistent_written)
        .chain(&sent.acked)
        .copied()
        .collect();
    // Returns at once when everything arrived; waits out the grace only when something is lost.
    seen.wait(ARRIVAL_GRACE, |s| s.has_all(&handed));
    let s = seen.snapshot();
    let total_sent = sent.legacy_written.len() + sent.persistent_written.len() + sent.acked.len();
    Run {
        delay,
        legacy: Kind::of(&sent.legacy_written, &s),
        persistent: Kind::of(&sent.persistent_written, &s),
        acking: Kind::of(&sent.acked, &s),
        legacy_retries: sent.legacy_retries,
        resets: sent.persistent_resets.clone(),
        persistent_connect_failures: sent.persistent_connect_failures,
        acks_received: sent.acked.len() / EVENTS_PER_REQUEST,
        acks_missing: sent.ack_attempts_failed.clone(),
        never_acked: sent.gave_up.len() / EVENTS_PER_REQUEST,
        foreign: s.foreign,
        chunk_conflicts: s.chunk_conflicts.clone(),
        lost_ranges: lost_ranges(&s.missing(&handed)),
        drain,
        rate: total_sent as f64 / load_time.as_secs_f64(),
        seconds: started.elapsed().as_secs_f64(),
        outcome,
    }
}

/// Sorted ids as `sender:first-last` runs of consecutive seqs (at most 12, then a count).
fn lost_ranges(lost: &[u64]) -> String {
    let mut ranges: Vec<(u64, u64, u64)> = Vec::new();
    for &id in lost {
        let (sender, seq) = (sender_of(id), id & ((1 << SENDER_SHIFT) - 1));
        match ranges.last_mut() {
            Some((s, _, last)) if *s == sender && *last + 1 == seq => *last = seq,
            _ => ranges.push((sender, seq, seq)),
        }
    }
    if ranges.is_empty() {
        return "none".into();
    }
    let mut text: Vec<String> = ranges
        .iter()
        .take(12)
        .map(|(sender, a, b)| format!("{sender}:{a}-{b}"))
        .collect();
    if ranges.len() > 12 {
        text.push(format!("and {} more runs", ranges.len() - 12));
    }
    text.join(" ")
}

/// What a scenario demands of every run, beyond what always holds.
#[derive(Debug, Clone, Copy, Default)]
struct Targets {
    /// 0 lost from legacy and from persistent senders.
    no_ack_lossless: bool,
    /// 0 lost from legacy senders.
    legacy_lossless: bool,
    /// 0 resets seen by persistent senders, 0 acks missing, and ackgate's pid kept.
    seamless: bool,
    /// The control: 0 duplicates as well, and nothing happened to ackgate.
    exact: bool,
}

impl Targets {
    /// What `run` misses of these targets and of what always holds: no acked event lost
    /// (invariant 7), every chunk acked in the end, no altered event, the drain.
    fn missed(&self, run: &Run) -> Vec<String> {
        let mut missed = Vec::new();
        let mut check = |ok: bool, what: String| {
            if !ok {
                missed.push(what);
            }
        };
        check(
            run.acking.lost == 0,
            format!("{} acked events lost", run.acking.lost),
        );
        check(
            run.never_acked == 0,
            format!("{} chunks never acked", run.never_acked),
        );
        check(run.foreign == 0, format!("{} altered events", run.foreign));
        check(
            run.chunk_conflicts.is_empty(),
            format!("chunk ids reused: {:?}", run.chunk_conflicts),
        );
        check(
            run.drain.is_ok(),
            format!("drain: {:?}", run.drain.as_ref().err()),
        );
        if self.no_ack_lossless || self.exact {
            check(
                run.legacy.lost == 0 && run.persistent.lost == 0,
                format!(
                    "no-ack events lost: legacy {}, persistent {}",
                    run.legacy.lost, run.persistent.lost
                ),
            );
        }
        if self.legacy_lossless {
            check(
                run.legacy.lost == 0,
                format!("legacy events lost: {}", run.legacy.lost),
            );
        }
        if self.seamless || self.exact {
            check(
                run.resets() == 0,
                format!("persistent senders saw {} resets", run.resets()),
            );
            check(
                run.acks_missing() == 0,
                format!("{} acks missing", run.acks_missing()),
            );
            check(
                !run.outcome.unexpected_exit,
                format!("ackgate did not go on: {}", run.outcome.what),
            );
        }
        if self.exact {
            let dups = run.legacy.duplicates + run.persistent.duplicates + run.acking.duplicates;
            check(dups == 0, format!("{dups} duplicates without a fault"));
            check(
                run.legacy_retries == 0 && run.persistent_connect_failures == 0,
                format!(
                    "connects failed without a fault: legacy {}, persistent {}",
                    run.legacy_retries, run.persistent_connect_failures
                ),
            );
        }
        missed
    }
}

/// Run `fault` [`runs`] times, print each run and the summary, then require `targets` (or,
/// with [`measure`], print what they missed).
fn scenario(fault: Fault, targets: Targets) {
    let n = runs();
    let mut all = Vec::new();
    let mut missed = Vec::new();
    for run in 1..=n {
        let result = run_once(fault);
        eprintln!("{}", result.line(fault, run, n));
        missed.extend(
            targets
                .missed(&result)
                .into_iter()
                .map(|m| format!("run {run}: {m}")),
        );
        all.push(result);
    }
    let summary = summary(fault, &all);
    eprintln!("{summary}");
    let lines: Vec<String> = all
        .iter()
        .enumerate()
        .map(|(i, r)| r.line(fault, i as u32 + 1, n))
        .chain([summary])
        .collect();
    save_result(
        if n > 1 {
            "lifecycle-long"
        } else {
            "lifecycle-short"
        },
        fault.label(),
        &(lines.join("\n") + "\n"),
    );
    if measure() {
        eprintln!(
            "LIFECYCLE-TARGETS | {} | {}",
            fault.label(),
            if missed.is_empty() {
                "all met".to_string()
            } else {
                format!("MISSED: {}", missed.join("; "))
            }
        );
        return;
    }
    assert!(
        missed.is_empty(),
        "{}: targets missed:\n{}",
        fault.label(),
        missed.join("\n")
    );
}

/// The figures of a scenario over its runs.
fn summary(fault: Fault, runs: &[Run]) -> String {
    let mut legacy = Kind::default();
    let mut persistent = Kind::default();
    let mut acking = Kind::default();
    for r in runs {
        legacy.add(r.legacy);
        persistent.add(r.persistent);
        acking.add(r.acking);
    }
    let sum = |f: &dyn Fn(&Run) -> u64| runs.iter().map(f).sum::<u64>();
    let max = |f: &dyn Fn(&Run) -> usize| runs.iter().map(f).max().unwrap_or(0);
    let with = |f: &dyn Fn(&Run) -> bool| runs.iter().filter(|r| f(r)).count();
    let rates: Vec<f64> = runs.iter().map(|r| r.rate).collect();
    format!(
        "LIFECYCLE-SUMMARY | {} | {} runs | legacy {} (most in a run {}, runs with loss {}) \
         | persistent {} (most in a run {}, runs with loss {}), resets {} (runs with resets {}) \
         | acking acked {} lost {} dup {}, acks missing {}, never acked {} \
         | ackgate exited where it should not in {} runs, restarted by the harness {} times \
         | {:.0}–{:.0} events/s",
        fault.label(),
        runs.len(),
        legacy,
        max(&|r| r.legacy.lost),
        with(&|r| r.legacy.lost > 0),
        persistent,
        max(&|r| r.persistent.lost),
        with(&|r| r.persistent.lost > 0),
        sum(&|r| r.resets()),
        with(&|r| r.resets() > 0),
        acking.sent,
        acking.lost,
        acking.duplicates,
        sum(&|r| r.acks_missing()),
        sum(&|r| r.never_acked as u64),
        with(&|r| r.outcome.unexpected_exit),
        sum(&|r| u64::from(r.outcome.restarts)),
        rates.iter().copied().fold(f64::INFINITY, f64::min),
        rates.iter().copied().fold(0.0, f64::max),
    )
}

/// The control: without a fault the harness counts exactly what it sent, nothing lost, nothing
/// twice, no reset, every ack on the first attempt. A harness that loses or duplicates events
/// itself fails here.
#[test]
fn without_a_fault_every_event_arrives_once() {
    scenario(
        Fault::None,
        Targets {
            exact: true,
            ..Targets::default()
        },
    );
}

#[test]
fn kill9_of_the_worker_loses_nothing_from_no_ack_senders() {
    scenario(
        Fault::KillWorker,
        Targets {
            no_ack_lossless: true,
            ..Targets::default()
        },
    );
}

#[test]
fn sigterm_then_start_loses_nothing_from_one_connection_per_chunk_senders() {
    scenario(
        Fault::StopStart,
        Targets {
            legacy_lossless: true,
            ..Targets::default()
        },
    );
}

#[test]
fn reload_loses_nothing_and_resets_no_connection() {
    scenario(
        Fault::Reload,
        Targets {
            no_ack_lossless: true,
            seamless: true,
            ..Targets::default()
        },
    );
}

#[test]
fn reload_with_a_broken_file_loses_nothing_and_resets_no_connection() {
    scenario(
        Fault::ReloadBroken,
        Targets {
            no_ack_lossless: true,
            seamless: true,
            ..Targets::default()
        },
    );
}

#[test]
fn upgrade_with_the_same_executable_loses_nothing_and_resets_no_connection() {
    scenario(
        Fault::Upgrade,
        Targets {
            no_ack_lossless: true,
            seamless: true,
            ..Targets::default()
        },
    );
}

#[test]
fn upgrade_with_a_replaced_executable_loses_nothing_and_resets_no_connection() {
    scenario(
        Fault::UpgradeReplaced,
        Targets {
            no_ack_lossless: true,
            seamless: true,
            ..Targets::default()
        },
    );
}
