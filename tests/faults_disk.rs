//! Scenario 4 of FAULTS.md: the spool's disk fills up (DESIGN.md invariants 1, 5, 7).
//!
//! The spool lives on an 8 MiB tmpfs and `spool.max_bytes` is far above it, so the disk fills
//! before the budget does. With the aggregator down, acking and legacy senders push until the
//! commit fails with ENOSPC. ackgate must then hold those requests unacked, stop reading its
//! sockets (backpressure), say so in one clear log line, stay up, and keep the spool intact;
//! once an aggregator comes up and acks, the deletes free space, ackgate logs that ingress
//! resumes, the senders go on, and everything acked or committed arrives: with acking senders
//! only (4a), and with a legacy sender flooding one connection per request besides (4c). The
//! last test kills ackgate while the disk is full and restarts it on the same full disk (4b).
//!
//! Needs root (mount); elsewhere it skips with the reason on stderr, and under `CI` it fails
//! with it.

mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;

const DISK: &str = "8m";
const FULL_LINE: &str = "spool disk is full";
const ROOM_LINE: &str = "spool disk has room again";

/// Fields drop in order: ackgate goes before its disk is unmounted.
struct Setup {
    gate: Ackgate,
    metrics: SocketAddr,
    /// The aggregator's port, reserved until an aggregator listens on it.
    node: Option<ReservedPort>,
    ledger: Arc<Ledger>,
    /// The senders, and through them the target, ids and ledger they share.
    senders: Senders,
    disk: Tmpfs,
}

/// ackgate with its spool on a small tmpfs, the aggregator's port closed, acking senders
/// pushing (and with `legacy_flood`, a v0.10 sender opening one connection per request).
fn fill_the_disk(legacy_flood: bool) -> Option<Setup> {
    let disk = match Tmpfs::mount(DISK) {
        Ok(d) => d,
        Err(reason) => {
            skip("faults_disk", &reason);
            return None;
        }
    };
    let spool_path = disk.path.join("spool.redb");
    let node = ReservedPort::new();
    let gate = Ackgate::builder()
        .node("agg", node.addr())
        .section(
            "spool",
            &format!(
                "path = {:?}\nmax_bytes = \"1GiB\"",
                spool_path.to_string_lossy()
            ),
        )
        .section(
            "upstream",
            "retry_initial = \"100ms\"\nretry_max = \"300ms\"",
        )
        .metrics()
        .start();
    let metrics = metrics_addr(&gate);
    let mut senders = Senders::to(gate.addr());
    let mut load = Load::new("disk.ack");
    load.pad = 2000;
    load.pace = Duration::ZERO;
    // A request held by a full disk for this long is reported as never acked.
    load.give_up_after = Duration::from_secs(30);
    senders.ack(2, &load);
    if legacy_flood {
        let mut legacy = Load::new("disk.legacy");
        legacy.pad = 2000;
        legacy.pace = Duration::from_millis(2);
        senders.legacy(1, &legacy);
    }
    gate.wait_for_log(FULL_LINE, Duration::from_secs(60));
    Some(Setup {
        disk,
        gate,
        metrics,
        node: Some(node),
        ledger: senders.ledger(),
        senders,
    })
}

#[test]
fn full_disk_pauses_ingress_and_resumes_once_upstream_drains() {
    full_disk_then_drain(
        false,
        "4a disk full (8 MiB tmpfs), acking senders, then upstream drains",
        "full_disk_pauses",
    );
}

#[test]
fn full_disk_with_a_legacy_flood_resumes_once_upstream_drains() {
    full_disk_then_drain(
        true,
        "4c disk full (8 MiB tmpfs), acking senders + legacy flood (1 connection per request)",
        "full_disk_with_a_legacy_flood",
    );
}

/// How ackgate behaved while the disk was full.
struct WhileFull {
    acked_at_full: usize,
    /// Acks per second before the disk filled.
    rate_before: f64,
    /// Acks in the second after it filled.
    acked_in_the_next_second: usize,
    ready: String,
    spool_file_bytes: u64,
    open_at_full: f64,
}

/// The full-disk warning, and backpressure: (almost) nothing more is acked while the disk is
/// full, an observation window since there is no event for "nothing happens". The writer
/// retries the held group every 500 ms and a retry may fit in pages redb freed, so a trickle
/// is allowed (checked by the caller, after the row is saved).
fn observe_while_full(setup: &mut Setup, started: Instant) -> WhileFull {
    let gate = &mut setup.gate;
    let line = gate.wait_for_log(FULL_LINE, Duration::from_secs(1));
    assert!(
        line.contains("ERROR") || line.contains("WARN"),
        "not a warning: {line}"
    );
    assert!(line.contains("spool.redb"), "path not named: {line}");
    assert!(gate.is_running(), "ackgate died on a full disk");
    let acked_at_full = setup.ledger.acked_count();
    let rate_before = acked_at_full as f64 / started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(1));
    let acked_later = setup.ledger.acked_count();
    let ready = try_http(setup.metrics, "GET", "/ready")
        .map(|(_, body)| body)
        .unwrap_or_default();
    let spool_file_bytes = std::fs::metadata(setup.disk.path.join("spool.redb"))
        .map(|m| m.len())
        .unwrap_or(0);
    let open_at_full = scrape_sum(setup.metrics, "ackgate_connections_open").unwrap_or(-1.0);
    assert!(gate.is_running(), "ackgate died on a full disk");
    WhileFull {
        acked_at_full,
        rate_before,
        acked_in_the_next_second: acked_later - acked_at_full,
        ready,
        spool_file_bytes,
        open_at_full,
    }
}

/// How ackgate came back once the aggregator was up.
struct Resumed {
    agg: Aggregator,
    /// The "room again" line.
    room: Option<String>,
    /// Acks went on well past the level at which the disk was full.
    resumed: bool,
    open_conns: f64,
    spool_records: f64,
    rss: u64,
    full_lines: usize,
    room_lines: usize,
}

/// The aggregator comes up on the node's port; the spool drains and ingress resumes.
fn bring_the_aggregator_up(setup: &mut Setup, node: ReservedPort, acked_at_full: usize) -> Resumed {
    let gate = &setup.gate;
    let resume_mark = gate.log_mark();
    let agg = Aggregator::start_on(node, Behaviour::Ack);
    let room = gate
        .log()
        .wait_for_from(resume_mark, Duration::from_secs(30), |l| {
            l.contains(ROOM_LINE)
        });
    let resumed = setup
        .ledger
        .wait_acked(acked_at_full + 200, Duration::from_secs(30));
    Resumed {
        agg,
        room,
        resumed,
        open_conns: scrape_sum(setup.metrics, "ackgate_connections_open").unwrap_or(-1.0),
        spool_records: scrape_sum(setup.metrics, "ackgate_spool_records").unwrap_or(-1.0),
        rss: rss_kib(gate.pid()).unwrap_or(0),
        full_lines: gate.log_lines_with(&[FULL_LINE]).len(),
        room_lines: gate.log_lines_with(&[ROOM_LINE]).len(),
    }
}

/// Legacy events ackgate committed: its events_in beyond the acked events. A legacy request
/// read just before the senders stopped may still be in a commit slice (held requests are
/// retried oldest first, a slice at a time): the count gets a bounded time to reach everything
/// written. /metrics has no change notification, hence the poll.
fn legacy_committed(metrics: SocketAddr, sent: &LedgerState) -> usize {
    let everything = (sent.acked.len() + sent.legacy_written.len()) as f64;
    let events_in = poll_metric_sum(
        metrics,
        "ackgate_events_in_total",
        Duration::from_secs(15),
        |v| v >= everything,
    ) as i64;
    (events_in - sent.acked.len() as i64).max(0) as usize
}

fn full_disk_then_drain(legacy_flood: bool, scenario: &str, test: &str) {
    let started = Instant::now();
    let Some(mut setup) = fill_the_disk(legacy_flood) else {
        return;
    };
    let full = observe_while_full(&mut setup, started);
    let node = setup.node.take().expect("the node's port");
    let up = bring_the_aggregator_up(&mut setup, node, full.acked_at_full);
    // Each sender finishes its current request (or gives up on it after 30 s).
    setup.senders.stop();
    let sent = setup.ledger.snapshot();
    let seen = up.agg.seen();
    // The promise: every acked event, and as many legacy events as ackgate committed.
    let all_arrived = seen.wait(Duration::from_secs(30), |s| s.has_all(&sent.acked));
    let legacy_committed = legacy_committed(setup.metrics, &sent);
    // Committed legacy events may still be on their way upstream: wait for them (bounded).
    let legacy_arrived =
        |s: &SeenState| sent.legacy_written.len() - s.missing(&sent.legacy_written).len();
    seen.wait(Duration::from_secs(30), |s| {
        legacy_arrived(s) >= legacy_committed
    });
    let s = seen.snapshot();
    let lost_acked = s.missing(&sent.acked);
    let lost_committed = legacy_committed.saturating_sub(legacy_arrived(&s));
    let never_committed = sent.legacy_written.len().saturating_sub(legacy_committed);
    let status = setup.gate.terminate(Duration::from_secs(20));
    let reopened = snapshot_spool(&setup.disk.path.join("spool.redb"));
    Row {
        committed: legacy_committed,
        received: s.unique(),
        duplicates: s.duplicates(),
        lost: lost_acked.len() + lost_committed,
        seconds: started.elapsed().as_secs_f64(),
        command: rerun_command("faults_disk", test),
        notes: format!(
            "disk full after {} acked events (spool file {} B), {} sender connections open, \
             acked in the next second: {} ({:.0}/s before); /ready while full: {:?}; {ROOM_LINE:?} logged: {}; {} full / {} room lines; \
             acks went on to {} (resumed: {}); then (at most 30 s after the aggregator came up): {} sender connections open, \
             {} spool records, RSS {} KiB; acked events never acked (given up after 30 s): {}; \
             legacy events written but never committed although ackgate stayed up: {never_committed}; exit {status}; \
             spool after exit: {}; legacy writes that failed under backpressure: {}",
            full.acked_at_full,
            full.spool_file_bytes,
            full.open_at_full,
            full.acked_in_the_next_second,
            full.rate_before,
            full.ready.trim(),
            up.room.is_some(),
            up.full_lines,
            up.room_lines,
            sent.acked.len(),
            up.resumed,
            up.open_conns,
            up.spool_records,
            up.rss,
            sent.gave_up.len(),
            opens(&reopened),
            sent.legacy_failed.len()
        ),
        ..Row::from_ledger(scenario, &sent)
    }
    .save();
    let rate_full = full.acked_in_the_next_second as f64;
    assert!(
        rate_full < full.rate_before / 10.0,
        "acks went on while the disk was full: {rate_full}/s, {:.0}/s before",
        full.rate_before
    );
    assert!(
        up.room.is_some(),
        "no {ROOM_LINE:?} line after upstream drained the spool"
    );
    assert!(
        all_arrived && lost_acked.is_empty(),
        "lost {} acked events: {}",
        lost_acked.len(),
        first(&lost_acked, 10)
    );
    assert_eq!(
        lost_committed, 0,
        "committed legacy events that never arrived"
    );
    assert!(status.success(), "ackgate exited with {status}");
    assert!(
        reopened.is_ok(),
        "the spool does not open after the run: {:?}",
        reopened.err()
    );
    // Flow resumes: what senders handed over while ackgate was up is eventually stored.
    assert!(
        up.resumed && sent.gave_up.is_empty(),
        "ingress never resumed after upstream drained the spool: {} events of acking senders never acked in 30 s",
        sent.gave_up.len()
    );
    assert_eq!(
        never_committed, 0,
        "legacy events written while ackgate was up and never committed"
    );
}

/// How a spool read after the run went, for the notes.
fn opens(spool: &Result<SpoolSnapshot, String>) -> String {
    match spool {
        Ok(snap) => format!("opens, {} records, {} B", snap.records, snap.file_bytes),
        Err(e) => format!("DOES NOT OPEN: {e}"),
    }
}

#[test]
fn sigkill_while_the_disk_is_full_then_restart_on_the_same_disk() {
    let started = Instant::now();
    let Some(mut setup) = fill_the_disk(true) else {
        return;
    };
    let acked_before_kill = setup.ledger.acked_count();
    setup.gate.kill9();
    let at_kill = snapshot_spool(&setup.disk.path.join("spool.redb"));
    // Restart on the same, still full, disk, with the aggregator up.
    let node = setup.node.take().expect("the node's port");
    let agg = Aggregator::start_on(node, Behaviour::Ack);
    let mark = setup.gate.log_mark();
    setup.gate.restart();
    setup.senders.target().set(setup.gate.addr());
    let opened = setup
        .gate
        .wait_for_log_since(mark, &["spool opened"], Duration::from_secs(10));
    // The senders resend what the kill left unacked to the new incarnation, then stop.
    setup.senders.stop();
    let sent_before = setup.ledger.snapshot();
    let seen = agg.seen();
    // After the restart, new senders are served again.
    let mut load = Load::new("disk.after");
    load.max_requests = Some(20);
    // Bounded: a relay that never serves again fails here within a minute, not after
    // 20 × give_up_after.
    load.give_up_after = Duration::from_secs(20);
    setup.senders.ack(1, &load);
    setup
        .ledger
        .wait_acked(sent_before.acked.len() + 100, Duration::from_secs(60));
    setup.senders.stop();
    let sent = setup.ledger.snapshot();
    let mut must: HashSet<u64> = sent.acked.clone();
    if let Ok(snap) = &at_kill {
        must.extend(snap.chunk_of_event.keys().copied());
    }
    let all_arrived = seen.wait(Duration::from_secs(60), |s| s.has_all(&must));
    let s = seen.snapshot();
    let lost = s.missing(&must);
    Row {
        committed: at_kill.as_ref().map(|s| s.chunk_of_event.len()).unwrap_or(0),
        received: must.len() - lost.len(),
        duplicates: s.duplicates(),
        lost: lost.len(),
        seconds: started.elapsed().as_secs_f64(),
        command: rerun_command("faults_disk", "sigkill_while_the_disk_is_full"),
        notes: format!(
            "acked before the kill {acked_before_kill}; spool copy at the kill: {}; restart: {opened:?}; 20 more requests acked after the restart: {}",
            opens(&at_kill),
            sent.acked.len() - sent_before.acked.len() == 100
        ),
        ..Row::from_ledger("4b SIGKILL while the disk is full, restart on it", &sent)
    }
    .save();
    assert!(
        at_kill.is_ok(),
        "the spool left by the kill does not open: {:?}",
        at_kill.err()
    );
    assert!(
        all_arrived && lost.is_empty(),
        "lost {}: {}",
        lost.len(),
        first(&lost, 10)
    );
    assert_eq!(
        sent.acked.len() - sent_before.acked.len(),
        100,
        "senders not served after the restart"
    );
}
