//! Scenario 5 of FAULTS.md: an upstream that misbehaves, one case each (DESIGN.md invariants
//! 2, 3; PROTOCOL.md §6.3, §13.2, §13.5, §13.12).
//!
//! The test aggregator (`support::Aggregator`) answers badly on purpose: never acks, acks a wrong
//! id, sends garbage, sends a JSON ack, acks after ackgate's ack timeout, closes right after
//! reading, resets the connection, reads at 1 KiB/s, or drops requests above a size limit
//! without an answer (fluentd's `chunk_size_limit`). For each, ackgate must make the problem
//! visible (a warning naming the node and the reason; metrics), keep every record and resend
//! it under the same chunk id, and deliver everything once the aggregator behaves (or, for the
//! slow reader, by itself). A record that can never be accepted is split while it holds
//! several events and then moved to the dead letters with the reason: never retried silently
//! forever.

mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;

const NODE: &str = "fault-agg";

struct Case {
    started: Instant,
    seen: Arc<Seen>,
    agg: Aggregator,
    gate: Ackgate,
    metrics: SocketAddr,
    target: Arc<Target>,
    ids: Arc<Ids>,
    ledger: Arc<Ledger>,
}

fn start(behaviour: Behaviour, upstream: &str) -> Case {
    let started = Instant::now();
    let agg = Aggregator::start_with(behaviour);
    let seen = agg.seen();
    let gate = Ackgate::builder()
        .node(NODE, agg.addr())
        .section("upstream", upstream)
        .metrics()
        .start();
    let metrics = metrics_addr(&gate);
    let target = Target::new(gate.addr());
    Case {
        started,
        seen,
        agg,
        gate,
        metrics,
        target,
        ids: Arc::new(Ids::default()),
        ledger: Arc::new(Ledger::default()),
    }
}

impl Case {
    /// `requests` acked requests of `events` events of `pad` bytes each, one after another.
    /// Its own ledger: other senders of the case (a trickle) do not mix in.
    fn send(&self, tag: &str, requests: u64, events: usize, pad: usize) -> HashSet<u64> {
        let ledger = Arc::new(Ledger::default());
        let mut senders = Senders::sharing(&self.target, &self.ids, &ledger);
        let mut load = Load::new(tag);
        load.max_requests = Some(requests);
        load.events_per_request = events;
        load.pad = pad;
        load.pace = Duration::ZERO;
        senders.ack(1, &load);
        senders.join();
        let acked = ledger.snapshot().acked;
        assert_eq!(
            acked.len(),
            requests as usize * events,
            "ackgate acks after its commit"
        );
        acked
    }

    fn spool_records(&self) -> f64 {
        scrape_sum(self.metrics, "ackgate_spool_records").unwrap_or(-1.0)
    }

    /// Wait (bounded, polling the metric: no event exists for it) until the spool is empty.
    fn wait_drained(&self, timeout: Duration) -> bool {
        poll_metric_sum(self.metrics, "ackgate_spool_records", timeout, |v| v == 0.0) == 0.0
    }

    /// Chunk ids the aggregator received more than once.
    fn resent_ids(&self) -> usize {
        self.agg
            .chunk_id_counts()
            .values()
            .filter(|&&n| n > 1)
            .count()
    }
}

/// Misbehave until ackgate has shown the problem and resent every chunk under its id, then
/// behave, and require delivery of everything with an empty spool.
fn misbehave_then_recover(
    scenario: &str,
    test: &str,
    bad: Behaviour,
    good: Behaviour,
    visible: &[&str],
) {
    let case = start(
        bad,
        "ack_timeout = \"1s\"\nretry_initial = \"100ms\"\nretry_max = \"400ms\"",
    );
    let acked = case.send("up.case", 5, 5, 60);
    let line = case
        .gate
        .wait_for_log_since(0, visible, Duration::from_secs(20));
    assert!(line.contains(" WARN "), "not a warning: {line}");
    assert!(
        line.contains(&format!("node={NODE}")),
        "node not named: {line}"
    );
    // While it misbehaves, every event is resent, always under its first chunk id.
    let resent = case
        .seen
        .wait(Duration::from_secs(20), |s| s.each_at_least(&acked, 2));
    let during = case.seen.snapshot();
    let spooled_during = case.spool_records();
    let recovered_at = Instant::now();
    case.agg.set_behaviour(good);
    let drained = case.wait_drained(Duration::from_secs(30));
    let drain_secs = recovered_at.elapsed().as_secs_f64();
    let s = case.seen.snapshot();
    let lost = s.missing(&acked);
    let timeouts = scrape_sum(case.metrics, "ackgate_ack_timeouts_total").unwrap_or(0.0);
    let retries = scrape_sum(case.metrics, "ackgate_retries_total").unwrap_or(0.0);
    let dead = scrape_sum(case.metrics, "ackgate_dead_letters_total").unwrap_or(0.0);
    let same_id = acked
        .iter()
        .all(|id| s.chunks_of_event.get(id).is_some_and(|c| c.len() == 1));
    let excerpt: String = line
        .split_once(" WARN ")
        .map(|(_, rest)| rest)
        .unwrap_or(&line)
        .chars()
        .take(220)
        .collect();
    Row {
        seconds: case.started.elapsed().as_secs_f64(),
        command: rerun_command("faults_upstream", test),
        notes: format!(
            "visible: `{excerpt}`; {} spooled records kept meanwhile, {} chunk ids resent (same ids: {same_id}); \
             metrics: {retries} retries, {timeouts} ack timeouts, {dead} dead letters; drained {drain_secs:.1} s after it behaved; \
             {} connections",
            spooled_during,
            case.resent_ids(),
            case.agg.connections()
        ),
        ..Row::acked_only(scenario, acked.len(), &acked, &s)
    }
    .save();
    assert!(
        resent,
        "not every chunk was resent while the aggregator misbehaved: {during:?}"
    );
    assert!(
        spooled_during >= 1.0,
        "records not kept in the spool meanwhile"
    );
    assert!(
        drained,
        "spool not drained after the aggregator behaved: {} records",
        case.spool_records()
    );
    assert!(lost.is_empty(), "lost {}", first(&lost, 10));
    assert!(same_id, "an event arrived under two chunk ids");
    assert!(s.chunk_conflicts.is_empty(), "{:?}", s.chunk_conflicts);
    assert_eq!(
        dead, 0.0,
        "nothing may be dead-lettered while nothing is acked at all"
    );
    assert_eq!(s.foreign, 0);
}

#[test]
fn never_acks() {
    misbehave_then_recover(
        "5a upstream never acks",
        "never_acks",
        Behaviour::NeverAck,
        Behaviour::Ack,
        &[
            "no ack from upstream node within ack_timeout",
            "ack_timeout=1s",
        ],
    );
}

#[test]
fn acks_a_wrong_id() {
    misbehave_then_recover(
        "5b upstream acks a wrong id",
        "acks_a_wrong_id",
        Behaviour::WrongId,
        Behaviour::Ack,
        &["upstream connection failed", "ack for unknown chunk id"],
    );
}

#[test]
fn sends_garbage() {
    misbehave_then_recover(
        "5c upstream sends garbage",
        "sends_garbage",
        Behaviour::Garbage,
        Behaviour::Ack,
        &["upstream connection failed", "unexpected response"],
    );
}

#[test]
fn sends_a_json_ack() {
    misbehave_then_recover(
        "5d upstream sends a JSON ack",
        "sends_a_json_ack",
        Behaviour::JsonAck,
        Behaviour::Ack,
        &["upstream connection failed", "not a msgpack map"],
    );
}

#[test]
fn acks_after_the_timeout() {
    misbehave_then_recover(
        "5e upstream acks after the ack timeout",
        "acks_after_the_timeout",
        Behaviour::AckAfter(Duration::from_millis(1500)),
        Behaviour::AckAfter(Duration::from_millis(100)),
        &[
            "no ack from upstream node within ack_timeout",
            "ack_timeout=1s",
        ],
    );
}

#[test]
fn closes_right_after_reading() {
    misbehave_then_recover(
        "5f upstream closes right after reading",
        "closes_right_after_reading",
        Behaviour::CloseAfterRead,
        Behaviour::Ack,
        &[
            "upstream connection failed",
            "connection closed by the aggregator",
        ],
    );
}

#[test]
fn resets_the_connection() {
    misbehave_then_recover(
        "5g upstream resets the connection",
        "resets_the_connection",
        Behaviour::ResetAfterRead,
        Behaviour::Ack,
        &["upstream connection failed", "reset"],
    );
}

#[test]
fn reads_at_one_kib_per_second() {
    // No recovery step: the aggregator stays slow, ackgate must get everything through.
    let case = start(
        Behaviour::SlowRead(1024),
        "ack_timeout = \"2s\"\nretry_initial = \"100ms\"\nretry_max = \"400ms\"",
    );
    let acked = case.send("up.slow", 6, 5, 100);
    let bytes: usize = 6 * 5 * event(0, 100).len();
    let drained = case.wait_drained(Duration::from_secs(60));
    let s = case.seen.snapshot();
    let lost = s.missing(&acked);
    let timeouts = scrape_sum(case.metrics, "ackgate_ack_timeouts_total").unwrap_or(0.0);
    let warned = case
        .gate
        .log_lines_with(&[
            "no ack from upstream node within ack_timeout",
            "node=fault-agg",
        ])
        .len();
    Row {
        seconds: case.started.elapsed().as_secs_f64(),
        command: rerun_command("faults_upstream", "reads_at_one_kib_per_second"),
        notes: format!(
            "{bytes} B of events in 6 records, window 8, ack_timeout 2s: {timeouts} ack timeouts ({warned} WARN lines), \
             {} connections, {} chunk ids resent; delivered by itself",
            case.agg.connections(),
            case.resent_ids()
        ),
        ..Row::acked_only("5h upstream reads at 1 KiB/s", acked.len(), &acked, &s)
    }
    .save();
    assert!(
        drained,
        "the slow aggregator never got everything: {} records left",
        case.spool_records()
    );
    assert!(lost.is_empty(), "lost {}", first(&lost, 10));
    assert!(s.chunk_conflicts.is_empty(), "{:?}", s.chunk_conflicts);
}

#[test]
fn drops_chunks_above_a_size_limit_without_an_ack() {
    const LIMIT: usize = 4096;
    let case = start(
        Behaviour::DropAbove(LIMIT),
        "ack_timeout = \"1s\"\nretry_initial = \"100ms\"\nretry_max = \"400ms\"\nsplit_after_attempts = 4",
    );
    // Small chunks keep being acked meanwhile: that is how ackgate tells a poison record from
    // an outage.
    let mut trickle = Senders::sharing(&case.target, &case.ids, &case.ledger);
    let mut small = Load::new("up.small");
    small.events_per_request = 1;
    small.pace = Duration::from_millis(100);
    trickle.ack(1, &small);
    // 40 events of ~320 B in one request (~13 KiB upstream): fits once split to ≤ 4 KiB.
    let big = case.send("up.big", 1, 40, 300);
    // One event of ~6 KiB: can never be accepted.
    let huge = case.send("up.huge", 1, 1, 6000);
    let huge_id = *huge.iter().next().expect("one id");
    let dead_line = case
        .gate
        .log()
        .wait_for_from(0, Duration::from_secs(60), |l| {
            l.contains("moving record to dead letters")
        });
    let big_arrived = case.seen.wait(Duration::from_secs(60), |s| s.has_all(&big));
    trickle.stop();
    let drained = case.wait_drained(Duration::from_secs(30));
    let trickled = case.ledger.snapshot();
    let splits = case.gate.log_lines_with(&["splitting it in two"]).len();
    let dead_metric = scrape_sum(case.metrics, "ackgate_dead_letters_total").unwrap_or(0.0);
    let dropped = case.agg.requests().iter().filter(|r| !r.kept).count();
    let left = case.spool_records();
    let mut gate = case.gate;
    let status = gate.terminate(Duration::from_secs(20));
    let snap = snapshot_spool(gate.spool_path());
    let dead_ids: Vec<u64> = snap
        .as_ref()
        .map(|snap| {
            snap.dead_letters
                .iter()
                .filter(|d| d.kind == ackgate::spool::DeadKind::Record)
                .filter_map(|d| ackgate::spool::record::decode_record(0, &d.payload).ok())
                .flat_map(|r| ids_of_entries(&r.entries.to_bytes()).0)
                .collect()
        })
        .unwrap_or_default();
    let s = case.seen.snapshot();
    let deliverable: HashSet<u64> = trickled.acked.union(&big).copied().collect();
    let lost: Vec<u64> = s
        .missing(&deliverable)
        .into_iter()
        .chain(
            s.missing(&huge)
                .into_iter()
                .filter(|id| !dead_ids.contains(id)),
        )
        .collect();
    let reason = dead_line.clone().unwrap_or_default();
    Row {
        scenario: "5i upstream drops chunks above 4 KiB silently (chunk_size_limit)".into(),
        sent: trickled.ack_sent.len() + big.len() + huge.len(),
        acked: trickled.acked.len() + big.len() + huge.len(),
        received: s.unique(),
        duplicates: s.duplicates(),
        lost: lost.len(),
        cycles: 1,
        seconds: case.started.elapsed().as_secs_f64(),
        command: rerun_command("faults_upstream", "drops_chunks_above"),
        notes: format!(
            "{dropped} requests dropped by the aggregator; {splits} splits (40-event record arrived whole: {big_arrived}); \
             dead letters: {dead_metric} (the 6 KiB single event, kept in the spool: {}); reason logged: {}",
            dead_ids.contains(&huge_id),
            reason.contains("chunk_size_limit")
        ),
        ..Row::default()
    }
    .save();
    assert!(
        dead_line.is_some(),
        "the oversize single event was never dead-lettered"
    );
    assert!(
        reason.contains("ERROR") && reason.contains("chunk_size_limit"),
        "{reason}"
    );
    assert!(splits >= 1, "the 40-event record was never split");
    assert!(big_arrived, "the split record did not arrive whole");
    assert!(drained, "records left in the spool: {left}");
    assert!(
        lost.is_empty(),
        "lost {} (neither delivered nor dead-lettered): {}",
        lost.len(),
        first(&lost, 10)
    );
    assert_eq!(
        dead_ids,
        vec![huge_id],
        "dead letters hold exactly the event that cannot be accepted"
    );
    assert!(status.success(), "ackgate exited with {status}");
    assert!(s.chunk_conflicts.is_empty(), "{:?}", s.chunk_conflicts);
}
