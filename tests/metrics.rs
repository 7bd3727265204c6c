//! Observability and operations: `[metrics]` (`/metrics`, `/health`, `/ready`, `POST /retry`)
//! and `ackgate spool`.
//!
//! After a run the counters match what was sent (events, requests, acks, bytes, per-node
//! counters), the spool gauges return to empty once everything is acked, and the commit
//! histogram has observations. `/ready` turns 503 "spool full" when the spool budget is used up
//! with the aggregator down. `ackgate spool` on a spool a running ackgate holds goes through its
//! admin API and prints what it prints on the stopped spool; without an admin listener it says
//! how to enable one.

mod support;

use std::time::Duration;

use support::*;

const WAIT: Duration = Duration::from_secs(15);

/// `n` acked requests of `events` events each, on their own connections; returns the entries.
fn send_requests(gate: &Ackgate, tag: &str, n: u64, events: u64) -> Vec<Vec<u8>> {
    send_acked_requests(gate.addr(), tag, n, events, 0, WAIT)
}

fn get(text: &str, key: &str) -> f64 {
    metric_exact(text, key).unwrap_or_else(|| panic!("no sample {key} in /metrics:\n{text}"))
}

#[test]
fn counters_gauges_and_histogram_after_a_run() {
    let agg = Aggregator::start();
    let gate = Ackgate::builder().node("agg", agg.addr()).metrics().start();
    let addr = metrics_addr(&gate);
    let events = send_requests(&gate, "metrics.run", 5, 4);
    agg.wait_for_all(&events, WAIT);

    // Acks and deletes are processed just after the aggregator saw the requests.
    wait_metric(addr, "ackgate_events_out_total{node=\"agg\"}", WAIT, |v| {
        v == Some(20.0)
    });
    let text = wait_metric(addr, "ackgate_spool_records", WAIT, |v| v == Some(0.0));
    let entry_bytes: usize = events.iter().map(|e| e.len()).sum();
    assert_eq!(get(&text, "ackgate_events_in_total"), 20.0, "events in");
    assert_eq!(get(&text, "ackgate_requests_in_total"), 5.0, "requests in");
    assert_eq!(get(&text, "ackgate_acks_sent_total"), 5.0, "acks sent");
    assert_eq!(
        get(&text, "ackgate_bytes_in_total"),
        entry_bytes as f64,
        "entry bytes in"
    );
    assert_eq!(
        get(&text, "ackgate_connections_total"),
        5.0,
        "sender connections"
    );
    assert_eq!(get(&text, "ackgate_connections_open"), 0.0, "all closed");
    assert_eq!(get(&text, "ackgate_spool_bytes"), 0.0, "spool empty");
    assert_eq!(
        get(&text, "ackgate_spool_max_bytes"),
        (1u64 << 30) as f64,
        "default max_bytes"
    );
    assert_eq!(
        get(&text, "ackgate_spool_oldest_age_seconds"),
        0.0,
        "no oldest record"
    );
    let commits = get(&text, "ackgate_commit_duration_seconds_count");
    assert!(
        commits >= 5.0,
        "one commit per sequential acked request at least: {commits}"
    );
    assert!(
        get(&text, "ackgate_commit_duration_seconds_sum") > 0.0,
        "fsyncs take time"
    );
    assert_eq!(
        get(&text, "ackgate_commit_group_requests_sum"),
        5.0,
        "requests per group, summed over groups = requests"
    );
    assert!(
        get(&text, "ackgate_spool_commits_total") >= 5.0,
        "spool commits"
    );
    let chunks = get(&text, "ackgate_chunks_acked_total{node=\"agg\"}");
    assert!((1.0..=5.0).contains(&chunks), "chunks acked: {chunks}");
    assert_eq!(
        chunks as usize,
        agg.requests().len(),
        "one acked chunk per request the aggregator saw"
    );
    assert!(get(&text, "ackgate_bytes_out_total{node=\"agg\"}") > entry_bytes as f64);
    assert_eq!(get(&text, "ackgate_in_flight_chunks{node=\"agg\"}"), 0.0);
    assert_eq!(get(&text, "ackgate_node_available{node=\"agg\"}"), 1.0);
}

#[test]
fn health_ready_and_retry_endpoints_answer() {
    let agg = Aggregator::start();
    let gate = Ackgate::builder().node("agg", agg.addr()).metrics().start();
    let addr = metrics_addr(&gate);
    assert_eq!(http(addr, "GET", "/health"), (200, "ok\n".into()));
    assert_eq!(http(addr, "GET", "/ready"), (200, "ready\n".into()));
    let (status, body) = http(addr, "POST", "/retry");
    assert_eq!(status, 200, "POST /retry: {body}");
    assert!(body.contains("retry"), "POST /retry body: {body:?}");
    assert_eq!(http(addr, "GET", "/nowhere").0, 404);
}

#[test]
fn ready_turns_503_when_the_spool_is_full() {
    // Nothing listens on the node's port: records stay.
    let down = ReservedPort::new();
    let gate = Ackgate::builder()
        .node("down", down.addr())
        .section("ingress", "max_frame_bytes = \"1KiB\"")
        .section("spool", "max_bytes = \"1KiB\"")
        .metrics()
        .start();
    let addr = metrics_addr(&gate);
    assert_eq!(http(addr, "GET", "/ready"), (200, "ready\n".into()));
    // Each request costs 33 (record header) + 4 (tag) + 475 (entries) = 512 bytes: two fill
    // the 1 KiB budget exactly.
    for i in 0..2 {
        let entries = entry_of_len(475, b'a' + i as u8);
        send_acked(gate.addr(), "full", &entries, i, WAIT);
        if i == 0 {
            assert_eq!(http(addr, "GET", "/ready").0, 200, "half full is ready");
        }
    }
    let (_, text) = http(addr, "GET", "/metrics");
    assert_eq!(get(&text, "ackgate_spool_bytes"), 1024.0, "budget used up");
    assert_eq!(get(&text, "ackgate_spool_records"), 2.0);
    assert_eq!(
        http(addr, "GET", "/ready"),
        (503, "spool full\n".into()),
        "a full spool is not ready"
    );
    assert_eq!(
        http(addr, "GET", "/health").0,
        200,
        "but the process is healthy"
    );
}

/// The age column (the 6th) moves with the clock between two runs: everything else must be
/// identical.
fn without_ages(list: &str) -> String {
    list.lines()
        .map(|l| {
            let mut cols: Vec<&str> = l.split_whitespace().collect();
            if cols.len() > 5 {
                cols.remove(5);
            }
            cols.join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn spool_commands_on_a_running_spool_go_through_its_admin_api_and_print_what_a_stopped_one_prints()
{
    let down = ReservedPort::new();
    // The commands find the running process through the config, which names its port.
    let (mut gate, admin) = start_with_admin(Ackgate::builder().node("down", down.addr()));
    let events = send_requests(&gate, "spool.cli", 3, 2);
    let config = gate.config_path().to_path_buf();

    let running_stats = spool_ok(&config, &["stats"]);
    let running_list = spool_ok(&config, &["list"]);
    let running_shows: Vec<String> = (1..=3)
        .map(|key| spool_ok(&config, &["show", &key.to_string()]))
        .collect();
    let running_dead = spool_ok(&config, &["dead-letters", "list"]);
    let retry = spool_ok(&config, &["retry"]);
    assert!(
        retry.contains("spool in use by a running ackgate"),
        "`spool retry` must go through the running process: {retry}"
    );
    let (status, _) = http(admin, "POST", "/retry");
    assert_eq!(status, 200);

    gate.terminate_cleanly();
    let stats = spool_ok(&config, &["stats"]);
    assert_eq!(
        stats_value(&stats, "records"),
        3,
        "three acked requests, undelivered"
    );
    assert!(stats_value(&stats, "bytes") > 0);
    for name in [
        "records",
        "bytes",
        "max_bytes",
        "dead_letters",
        "dead_letter_bytes",
    ] {
        assert_eq!(
            stats_value(&running_stats, name),
            stats_value(&stats, name),
            "{name}: running\n{running_stats}\nstopped\n{stats}"
        );
    }
    let list = spool_ok(&config, &["list"]);
    assert_eq!(
        without_ages(&running_list),
        without_ages(&list),
        "list differs"
    );
    assert_eq!(spool_ok(&config, &["dead-letters", "list"]), running_dead);
    let keys: Vec<u64> = list
        .lines()
        .skip(1)
        .filter(|l| l.contains("spool.cli"))
        .map(|l| {
            l.split_whitespace()
                .next()
                .and_then(|k| k.parse().ok())
                .unwrap_or_else(|| panic!("no key in list line {l:?}"))
        })
        .collect();
    assert_eq!(keys, vec![1, 2, 3], "three records listed:\n{list}");
    for (key, running) in keys.iter().zip(&running_shows) {
        let shown = spool_ok(&config, &["show", &key.to_string()]);
        assert_eq!(
            &shown, running,
            "show {key} differs between running and stopped"
        );
        let lines: Vec<serde_json::Value> = shown
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
            .collect();
        assert_eq!(lines.len(), 2, "two events per record:\n{shown}");
        for event in lines {
            assert_eq!(event["tag"], "spool.cli", "{event}");
            assert_eq!(event["time"], TS, "{event}");
            let msg = event["record"]["msg"].as_str().expect("record.msg");
            assert!(msg.starts_with("spool.cli "), "{event}");
        }
    }
    assert_eq!(events.len(), 6);
}

#[test]
fn spool_commands_on_a_running_spool_without_an_admin_listener_say_how_to_enable_it() {
    let down = ReservedPort::new();
    let mut gate = Ackgate::builder().node("down", down.addr()).start();
    send_requests(&gate, "spool.cli", 1, 1);
    let output = spool_cmd(gate.config_path(), &["list"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "list on a running spool without [admin] succeeded"
    );
    assert!(
        stderr.contains("[admin]"),
        "must say how to enable the admin listener: {stderr}"
    );
    gate.terminate_cleanly();
}
