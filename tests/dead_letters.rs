//! Records that cannot be delivered are never retried silently forever, and never dropped
//! silently: they are split, or kept as dead letters that `ackgate spool dead-letters` lists,
//! exports and requeues (DESIGN.md dispatcher, invariants 2, 3, 4; PROTOCOL.md §13.12).
//!
//! (a) Poison: an aggregator that silently drops requests over N bytes (fluentd's
//!     `chunk_size_limit`) while acking the rest. A large record is split in two until every
//!     piece fits and all its events arrive; a single event over N goes to the dead letters,
//!     is listed with its reason, exported as JSON, and after `requeue --all` and a restart is
//!     delivered under its original chunk id.
//! (b) `spool.max_age`: records older than that when they are taken are dead-lettered, not
//!     delivered.
//! (c) A rejected (malformed) request's bytes are kept as a `rejected` dead letter with the
//!     sender's address.

mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use base64::Engine as _;

use support::*;

const WAIT: Duration = Duration::from_secs(20);
/// The poison aggregator acks requests up to this many bytes on the wire.
const LIMIT: usize = 2048;

/// Lines of `ackgate spool dead-letters list` after its header.
fn dead_letter_lines(config: &Path) -> Vec<String> {
    spool_ok(config, &["dead-letters", "list"])
        .lines()
        .skip(1)
        .map(str::to_string)
        .collect()
}

fn export(config: &Path) -> Vec<serde_json::Value> {
    spool_ok(config, &["dead-letters", "export"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("export line {l:?}: {e}")))
        .collect()
}

/// The events of the acked requests tagged `tag`.
fn acked_events(reqs: &[Request], tag: &[u8]) -> Vec<Vec<u8>> {
    reqs.iter()
        .filter(|r| r.acked && r.tag == tag)
        .flat_map(|r| split_entries(&r.entries))
        .collect()
}

/// A steady stream of small acked requests until `stop`; returns their events.
fn small_sender(addr: SocketAddr, stop: Arc<AtomicBool>) -> JoinHandle<Vec<Vec<u8>>> {
    std::thread::spawn(move || {
        let mut sent = Vec::new();
        let mut i = 0;
        while !stop.load(Ordering::Acquire) {
            let event = entry_int(TS, &unique_record("small"));
            send_acked(addr, "poison.small", &event, i, WAIT);
            sent.push(event);
            i += 1;
            // Pacing, not synchronisation: a few dozen small chunks a second.
            std::thread::sleep(Duration::from_millis(20));
        }
        sent
    })
}

/// The big record arrived split in pieces under the limit; the huge event was tried at least
/// twice, never acked, always under one chunk id, which is returned.
fn assert_split_and_retried(agg: &Aggregator, big: &[Vec<u8>]) -> String {
    let requests = agg.requests();
    let big_pieces: Vec<&Request> = requests
        .iter()
        .filter(|r| r.acked && r.tag == b"poison.big")
        .collect();
    assert!(big_pieces.iter().all(|r| r.raw.len() <= LIMIT));
    assert_same_event_set(
        big,
        &acked_events(&requests, b"poison.big"),
        "the split record's events",
    );
    let huge_attempts: Vec<&Request> = requests
        .iter()
        .filter(|r| r.tag == b"poison.huge")
        .collect();
    assert!(huge_attempts.len() >= 2, "the huge event was tried twice");
    assert!(huge_attempts.iter().all(|r| !r.acked));
    let original_id = huge_attempts[0].chunk.clone().expect("chunk id");
    assert!(
        huge_attempts
            .iter()
            .all(|r| r.chunk.as_ref() == Some(&original_id)),
        "every attempt carries the record's one chunk id"
    );
    original_id
}

/// The stopped spool holds exactly one dead letter: the huge event, with its reason, under
/// its original chunk id, listed and exported.
fn assert_the_huge_event_is_the_dead_letter(config: &Path, original_id: &str) {
    let lines = dead_letter_lines(config);
    assert_eq!(lines.len(), 1, "one dead letter: {lines:#?}");
    assert!(lines[0].contains("record"), "kind: {}", lines[0]);
    assert!(
        lines[0].contains("not acked after 2 attempts"),
        "the reason is listed: {}",
        lines[0]
    );
    let exported = export(config);
    assert_eq!(exported.len(), 1);
    let letter = &exported[0];
    assert_eq!(letter["kind"], "record", "{letter}");
    assert_eq!(letter["tag"], "poison.huge", "{letter}");
    assert_eq!(letter["chunk"], original_id, "{letter}");
    let events = letter["events"].as_array().expect("events");
    assert_eq!(events.len(), 1, "{letter}");
    assert_eq!(events[0]["time"], TS, "{letter}");
    assert_eq!(
        events[0]["record"]["msg"],
        "z".repeat(3000 - 14),
        "{letter}"
    );
}

#[test]
fn poison_records_are_split_until_they_fit_and_single_events_dead_lettered() {
    let agg = Aggregator::start_with(Behaviour::DropAbove(LIMIT));
    let mut gate = Ackgate::builder()
        .section(
            "upstream",
            &format!(
                "split_after_attempts = 2\nack_timeout = \"500ms\"\nretry_initial = \"50ms\"\nretry_max = \"200ms\"\n{}",
                node_toml("agg", agg.addr(), "")
            ),
        )
        .start();
    let addr = gate.addr();

    // A steady stream of small requests: the pipeline keeps working while the big ones fail,
    // which is what tells ackgate that the big ones are the problem.
    let stop = Arc::new(AtomicBool::new(false));
    let small_sender = small_sender(addr, stop.clone());

    // 64 events of 120 bytes: 7.7 KB on the wire, 16 of them (1.9 KB) fit under the limit.
    let big: Vec<Vec<u8>> = (0..64)
        .map(|i| entry_of_len(120, b'a' + (i % 26) as u8))
        .collect();
    send_acked(addr, "poison.big", &big.concat(), 1_000, WAIT);
    // One event that alone is over the limit.
    let huge = entry_of_len(3000, b'z');
    send_acked(addr, "poison.huge", &huge, 2_000, WAIT);

    let dead = gate.wait_for_log("moving record to dead letters", WAIT);
    assert!(dead.contains("events=1"), "the single huge event: {dead}");
    agg.wait_until("every big event acked", WAIT, |reqs| {
        let acked = acked_events(reqs, b"poison.big");
        big.iter().all(|e| acked.contains(e))
    });
    stop.store(true, Ordering::Release);
    let small = small_sender.join().expect("small sender");
    agg.wait_until("every small event acked", WAIT, |reqs| {
        let acked = acked_events(reqs, b"poison.small");
        small.iter().all(|e| acked.contains(e))
    });

    let splits = gate.log_lines_with(&["splitting it in two"]);
    assert!(
        splits.len() >= 3,
        "64 events need a split to 2×32 and two more to 4×16: {splits:#?}"
    );
    let original_id = assert_split_and_retried(&agg, &big);

    gate.terminate_cleanly();
    let config = gate.config_path().to_path_buf();
    assert_the_huge_event_is_the_dead_letter(&config, &original_id);
    let requeued = spool_ok(&config, &["dead-letters", "requeue", "--all"]);
    assert!(requeued.contains("requeued as record"), "{requeued}");
    assert!(
        dead_letter_lines(&config).is_empty(),
        "requeued letters leave the list"
    );

    // An aggregator that takes it now; the restarted ackgate sends it with its original id.
    agg.set_behaviour(Behaviour::Ack);
    gate.restart();
    let delivered = agg.wait_until("the requeued event acked", WAIT, |reqs| {
        reqs.iter().any(|r| r.acked && r.tag == b"poison.huge")
    });
    let request = delivered
        .iter()
        .find(|r| r.acked && r.tag == b"poison.huge")
        .expect("delivered");
    assert_eq!(
        request.chunk.as_deref(),
        Some(original_id.as_str()),
        "a requeued record keeps its original chunk id (invariant 3)"
    );
    assert_eq!(split_entries(&request.entries), vec![huge]);
}

#[test]
fn records_past_max_age_become_dead_letters_instead_of_being_delivered() {
    let down = ReservedPort::new();
    let mut gate = Ackgate::builder()
        .node("late", down.addr())
        .section("spool", "max_age = \"1s\"")
        .start();
    let old: Vec<Vec<u8>> = (0..3)
        .map(|_| entry_int(TS, &unique_record("old")))
        .collect();
    for (i, e) in old.iter().enumerate() {
        send_acked(gate.addr(), "age.old", e, i as u64, WAIT);
    }
    // The behaviour under test is an age: let it pass (nothing to await but the clock).
    std::thread::sleep(Duration::from_millis(1300));

    let agg = Aggregator::start_on(down, Behaviour::Ack);
    gate.wait_for_log_count(&["moving record to dead letters", "spool.max_age"], 3, WAIT);
    // A fresh record goes through; records are taken in key order, so once it arrived the old
    // ones were dealt with, and none of them may have been delivered.
    let fresh = entry_int(TS, &unique_record("fresh"));
    send_acked(gate.addr(), "age.fresh", &fresh, 10, WAIT);
    agg.wait_for_all(std::slice::from_ref(&fresh), WAIT);
    assert_same_events(
        &[fresh],
        &agg.events(),
        "only the fresh record is delivered",
    );

    gate.terminate_cleanly();
    let lines = dead_letter_lines(gate.config_path());
    assert_eq!(lines.len(), 3, "three expired records: {lines:#?}");
    assert!(
        lines
            .iter()
            .all(|l| l.contains("record") && l.contains("older than spool.max_age")),
        "{lines:#?}"
    );
    let exported: Vec<Vec<u8>> = export(gate.config_path())
        .iter()
        .map(|l| {
            let msg = l["events"][0]["record"]["msg"]
                .as_str()
                .expect("msg")
                .to_string();
            assert!(msg.starts_with("old "), "{l}");
            msg.into_bytes()
        })
        .collect();
    assert_eq!(exported.len(), 3);
}

#[test]
fn rejected_request_bytes_are_kept_with_the_sender_address() {
    let agg = Aggregator::start();
    let mut gate = Ackgate::builder().node("agg", agg.addr()).metrics().start();
    // Valid msgpack, invalid request: the second entry's record is a string, not a map.
    let mut entries = entry_int(TS, &unique_record("rejected"));
    entries.extend_from_slice(&[0x92, 0xce, 0, 0, 0, 1, 0xa3, b'x', b'y', b'z']);
    let request = ack_request("rejected.bad", &entries, &v012_chunk_id(1));
    let mut stream = connect(gate.addr());
    let local = stream.local_addr().expect("local addr");
    stream.write_all(&request).expect("write");
    let answer = expect_closed(&mut stream, WAIT);
    assert!(
        answer.is_empty(),
        "a rejected request got an answer: {}",
        hex(&answer)
    );
    gate.wait_for_log_since(0, &["invalid request", &format!("peer={local}")], WAIT);
    // Dead letters ride in the next commit (at most spool::LAZY_FLUSH later): wait for it.
    wait_metric(
        metrics_addr(&gate),
        "ackgate_spool_dead_letter_bytes",
        WAIT,
        |v| v.is_some_and(|b| b > 0.0),
    );

    gate.terminate_cleanly();
    let lines = dead_letter_lines(gate.config_path());
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert!(lines[0].contains("rejected"), "kind: {}", lines[0]);
    assert!(
        lines[0].contains(&local.to_string()),
        "origin = the sender: {}",
        lines[0]
    );
    let exported = export(gate.config_path());
    assert_eq!(exported[0]["kind"], "rejected");
    assert_eq!(exported[0]["origin"], local.to_string());
    assert!(
        !exported[0]["reason"].as_str().unwrap_or("").is_empty(),
        "a reason is kept: {}",
        exported[0]
    );
    let payload = base64::engine::general_purpose::STANDARD
        .decode(exported[0]["payload_base64"].as_str().expect("payload"))
        .expect("base64");
    assert_eq!(
        hex(&payload),
        hex(&request),
        "the rejected bytes, exactly as sent"
    );
    assert_eq!(agg.event_count(), 0, "nothing of it delivered");
}
