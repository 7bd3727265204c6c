//! Upstream failures (DESIGN.md invariants 2, 3, 7; PROTOCOL.md §13.5, §13.12).
//!
//! (a) The seed failure, in-process: an aggregator that accepts the connection and reads the
//!     data but never acks. ackgate must notice within `ack_timeout`, say so naming the node
//!     and the timeout, resend the same chunk ids, and deliver everything once the aggregator
//!     acks again; an id that was acked is never sent again.
//! (b) The aggregator is down when ackgate starts: senders are still acked (the data is
//!     spooled), and everything is delivered once the aggregator comes up on that port.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use support::*;

/// Send `n` acked v0.12 requests (on their own connections) and return their events.
fn send_acked_v012(gate: &Ackgate, tag: &str, n: u64) -> Vec<Vec<u8>> {
    send_acked_requests(gate.addr(), tag, n, 3, 10_000, Duration::from_secs(10))
}

/// Whether some chunk id came at least twice.
fn some_chunk_id_resent(requests: &[Request]) -> bool {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for c in requests.iter().filter_map(|r| r.chunk.as_deref()) {
        *counts.entry(c).or_insert(0) += 1;
    }
    counts.values().any(|&n| n >= 2)
}

#[test]
fn aggregator_that_reads_but_never_acks_gets_the_same_chunk_ids_again() {
    let agg = Aggregator::start_with(Behaviour::NeverAck);
    let gate = Ackgate::builder()
        .node("silent-agg", agg.addr())
        .section(
            "upstream",
            r#"
            ack_timeout = "1s"
            retry_initial = "100ms"
            retry_max = "500ms"
            "#,
        )
        .start();

    let expected = send_acked_v012(&gate, "faults.seed", 5);

    // ackgate notices the silence and names the node and the timeout.
    let line = gate.wait_for_log(
        "no ack from upstream node within ack_timeout",
        Duration::from_secs(10),
    );
    assert!(line.contains("WARN"), "not a warning: {line}");
    assert!(line.contains("node=silent-agg"), "node not named: {line}");
    assert!(line.contains("ack_timeout=1s"), "timeout not named: {line}");

    // The same chunk id comes again (a retry, not a new chunk).
    agg.wait_until(
        "a chunk id sent at least twice",
        Duration::from_secs(15),
        some_chunk_id_resent,
    );
    // Every resend carries exactly the events its id carried the first time.
    let mut first: HashMap<String, Vec<u8>> = HashMap::new();
    for r in agg.requests() {
        let id = r.chunk.clone().expect("chunk id");
        let entries = first.entry(id.clone()).or_insert_with(|| r.entries.clone());
        assert_eq!(
            *entries, r.entries,
            "chunk id {id} was resent with other events"
        );
    }
    let ids_while_silent: std::collections::HashSet<String> =
        agg.chunk_ids_seen().into_iter().collect();

    // The aggregator recovers: everything is delivered.
    agg.set_behaviour(Behaviour::Ack);
    agg.wait_until("every chunk id acked", Duration::from_secs(20), |reqs| {
        let acked: std::collections::HashSet<&str> = reqs
            .iter()
            .filter(|r| r.acked)
            .filter_map(|r| r.chunk.as_deref())
            .collect();
        ids_while_silent
            .iter()
            .all(|id| acked.contains(id.as_str()))
    });
    agg.wait_for_all(&expected, Duration::from_secs(20));
    assert_same_event_set(&expected, &agg.events(), "after the aggregator recovered");
    let acked = agg.acked_ids();
    for id in &ids_while_silent {
        assert!(acked.contains_key(id), "chunk {id} was never acked");
    }
    // No new ids appeared for the same events: retries reuse the original ids (invariant 3).
    let all_ids: std::collections::HashSet<String> = agg.chunk_ids_seen().into_iter().collect();
    assert_eq!(
        all_ids, ids_while_silent,
        "ids after recovery differ from the ids resent during the outage"
    );

    // Once acked, an id is deleted from the spool and never sent again. Nothing signals
    // "nothing happened", so watch for longer than ack_timeout + retry_max.
    let quiet_from = agg.requests().len();
    std::thread::sleep(Duration::from_secs(3));
    let late: Vec<Request> = agg.requests().into_iter().skip(quiet_from).collect();
    assert!(
        late.is_empty(),
        "{} request(s) after every id was acked: {:?}",
        late.len(),
        late.iter().map(|r| &r.chunk).collect::<Vec<_>>()
    );
    let resent: Vec<Request> = agg
        .requests()
        .into_iter()
        .filter(|r| r.resent_after_ack)
        .collect();
    assert!(
        resent.is_empty(),
        "chunk ids sent again after the aggregator acked them: {:?}",
        resent.iter().map(|r| &r.chunk).collect::<Vec<_>>()
    );
}

#[test]
fn aggregator_down_at_start_gets_everything_once_it_is_up() {
    let node = ReservedPort::new();
    let gate = Ackgate::builder()
        .node("late-agg", node.addr())
        .section(
            "upstream",
            "retry_initial = \"100ms\"\nretry_max = \"500ms\"",
        )
        .start();

    // Acked although no aggregator exists: acks mean "spooled", not "delivered".
    let started = Instant::now();
    let expected = send_acked_v012(&gate, "faults.down", 10);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "acks were held back by the missing aggregator"
    );
    let line = gate.wait_for_log("upstream node unreachable", Duration::from_secs(10));
    assert!(line.contains("node=late-agg"), "node not named: {line}");

    let agg = Aggregator::start_on(node, Behaviour::Ack);
    agg.wait_for_all(&expected, Duration::from_secs(20));
    assert_same_events(
        &expected,
        &agg.events(),
        "delivered after the aggregator came up",
    );
    gate.wait_for_log("upstream node reachable again", Duration::from_secs(5));
}

#[test]
fn aggregator_that_closes_after_reading_gets_the_chunk_again() {
    // A receiver that drops the connection without an answer (fluentd when emit raises):
    // the chunk is not lost and is resent with the same id.
    let agg = Aggregator::start_with(Behaviour::CloseAfterRead);
    let gate = Ackgate::builder()
        .node("closing-agg", agg.addr())
        .section(
            "upstream",
            "retry_initial = \"100ms\"\nretry_max = \"300ms\"",
        )
        .start();
    let expected = send_acked_v012(&gate, "faults.close", 3);
    agg.wait_until(
        "a resend after a close",
        Duration::from_secs(10),
        some_chunk_id_resent,
    );
    agg.set_behaviour(Behaviour::Ack);
    agg.wait_for_all(&expected, Duration::from_secs(20));
    assert_same_event_set(&expected, &agg.events(), "after closes");
    gate.wait_for_log_since(
        0,
        &["upstream connection failed", "node=closing-agg"],
        Duration::from_secs(5),
    );
}

#[test]
fn aggregator_restart_mid_stream_loses_nothing() {
    // The aggregator goes away (every connection reset, the port closed) between two bursts
    // and comes back on the same port: what was spooled meanwhile is delivered, and so is
    // anything that was in flight when it went away.
    let mut agg = Aggregator::start();
    let gate = Ackgate::builder()
        .node("bouncing-agg", agg.addr())
        .section(
            "upstream",
            "retry_initial = \"50ms\"\nretry_max = \"300ms\"",
        )
        .start();
    let first = send_acked_v012(&gate, "faults.bounce1", 10);
    agg.wait_for_all(&first, Duration::from_secs(10));
    agg.stop();
    let second = send_acked_v012(&gate, "faults.bounce2", 10);
    gate.wait_for_log_since(0, &["node=bouncing-agg", "WARN"], Duration::from_secs(10));
    agg.restart();
    let all: Vec<Vec<u8>> = first.iter().chain(&second).cloned().collect();
    agg.wait_for_all(&all, Duration::from_secs(20));
    assert_same_event_set(&all, &agg.events(), "across an aggregator restart");
    assert!(
        agg.connections() >= 2,
        "no new connection after the restart"
    );
}
