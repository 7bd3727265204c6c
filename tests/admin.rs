//! The admin listener and the commands that use it, against the real binary: `ackgate status`
//! (screen, `--json`, exit codes 0/1/2) while records are queued and a node is down and after
//! it recovers; the bearer token on a non-loopback listener; `ackgate check` without secrets;
//! read-only spool commands that leave a stopped spool's directory exactly as it was.

mod support;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use support::*;

const WAIT: Duration = Duration::from_secs(20);

/// `ackgate COMMAND ARGS… --config CONFIG`.
fn run(args: &[&str], config: &Path) -> Output {
    config_cmd(args[0], config, &args[1..])
}

/// [`start_with_admin`], with a short ack timeout so that a silent node is down quickly.
fn gate_with_admin(builder: AckgateBuilder) -> (Ackgate, std::net::SocketAddr) {
    start_with_admin(builder.section("upstream", "ack_timeout = \"1s\""))
}

/// `ackgate status --json` until `cond` holds (there is no event for "the relay's state
/// changed": a bounded poll, 100 ms apart).
fn status_until(
    config: &Path,
    what: &str,
    cond: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let output = run(&["status", "--json"], config);
        let status: serde_json::Value =
            serde_json::from_slice(&output.stdout).unwrap_or(serde_json::Value::Null);
        if cond(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: never seen in {WAIT:?}; last status {status}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn node<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["nodes"]
        .as_array()
        .and_then(|nodes| nodes.iter().find(|n| n["name"] == name))
        .unwrap_or_else(|| panic!("no node {name} in {status}"))
}

/// A few acked PackedForward requests straight to ackgate.
fn send(gate: &Ackgate, tag: &str, requests: u64) {
    for i in 0..requests {
        let entries = entry_int(1_700_000_000, &unique_record(tag));
        send_acked(gate.addr(), tag, &entries, 1000 + i, WAIT);
    }
}

#[test]
fn status_shows_queued_records_and_a_down_node_then_its_recovery() {
    let agg = Aggregator::start_with(Behaviour::NeverAck);
    let (mut gate, _) = gate_with_admin(Ackgate::builder().node("agg-1", agg.addr()));
    let config = gate.config_path().to_path_buf();
    send(&gate, "status.down", 3);

    // The node reads and never acks: after ack_timeout it is down, the records stay queued.
    let down = status_until(&config, "agg-1 down", |s| {
        node(s, "agg-1")["available"] == false
    });
    assert_eq!(down["healthy"], false);
    assert!(
        down["spool"]["records"].as_u64().unwrap_or(0) >= 1,
        "{down}"
    );
    assert!(
        down["spool"]["oldest_record_age_seconds"]
            .as_f64()
            .is_some(),
        "{down}"
    );
    let agg_1 = node(&down, "agg-1");
    assert!(
        agg_1["down_reason"]
            .as_str()
            .unwrap_or("")
            .contains("ack_timeout"),
        "why it is down: {agg_1}"
    );
    assert_eq!(agg_1["address"], agg.addr().to_string());
    assert!(
        down["ingress"]["events_accepted"].as_u64() == Some(3),
        "{down}"
    );
    let attention = down["attention"].to_string();
    assert!(attention.contains("agg-1"), "{attention}");

    // Without heartbeats a node that accepts connections is up again at each connect, until
    // its next ack timeout: wait (bounded) for a screen taken while it is down.
    let deadline = Instant::now() + WAIT;
    let (code, text) = loop {
        let screen = run(&["status"], &config);
        let text = String::from_utf8_lossy(&screen.stdout).into_owned();
        if text.contains("DOWN") || Instant::now() > deadline {
            break (screen.status.code(), text);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(code, Some(1), "exit 1 while a node is down:\n{text}");
    for needle in [
        "NEEDS ATTENTION",
        "agg-1",
        "DOWN",
        "ack_timeout",
        "records",
        "oldest",
    ] {
        assert!(
            text.contains(needle),
            "{needle:?} not on the screen:\n{text}"
        );
    }

    // It starts acking: everything drains and the relay is healthy again.
    agg.set_behaviour(Behaviour::Ack);
    let healthy = status_until(&config, "healthy and empty", |s| {
        s["healthy"] == true && s["spool"]["records"] == 0
    });
    let agg_1 = node(&healthy, "agg-1");
    assert_eq!(agg_1["available"], true);
    assert!(agg_1["acked_events"].as_u64().unwrap_or(0) >= 3, "{agg_1}");
    assert!(agg_1["last_ack_ms"].as_u64().is_some(), "{agg_1}");
    assert!(
        agg_1["last_error"].as_str().is_some(),
        "the last failure stays visible: {agg_1}"
    );
    let screen = run(&["status"], &config);
    assert_eq!(screen.status.code(), Some(0), "exit 0 once healthy");
    assert!(String::from_utf8_lossy(&screen.stdout).contains("healthy"));
    gate.terminate_cleanly();
}

#[test]
fn status_of_a_relay_that_cannot_be_reached_exits_2_and_says_how_to_enable_the_listener() {
    let dir = tempfile::tempdir().expect("temp dir");
    let base = "[ingress]\nlisten = \"127.0.0.1:24224\"\n[spool]\npath = \"/nonexistent/s.redb\"\n[[upstream.nodes]]\naddress = \"127.0.0.1:24225\"\n";
    let without = dir.path().join("without.toml");
    std::fs::write(&without, base).expect("write");
    let output = run(&["status"], &without);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("[admin]") && stderr.contains("listen"),
        "{stderr}"
    );

    // Nothing listens on a reserved port: connect is refused at once.
    let down = ReservedPort::new();
    let nobody = dir.path().join("nobody.toml");
    std::fs::write(
        &nobody,
        format!("{base}[admin]\nlisten = \"{}\"\n", down.addr()),
    )
    .expect("write");
    let output = run(&["status", "--json"], &nobody);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&down.addr().to_string()) && stderr.contains("running"),
        "{stderr}"
    );
}

#[test]
fn a_non_loopback_admin_listener_needs_a_token_and_refuses_requests_without_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let base = "[ingress]\nlisten = \"127.0.0.1:0\"\n[spool]\npath = \"/nonexistent/s.redb\"\n[[upstream.nodes]]\naddress = \"127.0.0.1:24225\"\n";
    let open = dir.path().join("open.toml");
    std::fs::write(&open, format!("{base}[admin]\nlisten = \"0.0.0.0:0\"\n")).expect("write");
    let output = run(&["check"], &open);
    assert!(
        !output.status.success(),
        "a non-loopback admin without a token was accepted"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("admin.token"),
        "the error names the key: {stderr}"
    );

    let agg = Aggregator::start();
    let gate = Ackgate::builder()
        .node("agg", agg.addr())
        .section(
            "admin",
            "listen = \"0.0.0.0:0\"\ntoken = \"s3cret-token-123\"",
        )
        .start();
    let bound = metrics_addr(&gate);
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], bound.port()));
    let (status, _) = http(admin, "GET", "/api/status");
    assert_eq!(status, 401, "no token");
    let (status, _) = http_with(admin, "GET", "/metrics", Some("wrong"));
    assert_eq!(status, 401, "wrong token");
    let (status, body) = http_with(admin, "GET", "/api/status", Some("s3cret-token-123"));
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"nodes\""), "{body}");
    // Probes need no token: a load balancer asks them.
    assert_eq!(http(admin, "GET", "/health").0, 200);
    assert_eq!(http(admin, "GET", "/ready").0, 200);
    let refused = gate.wait_for_log("admin request refused", WAIT);
    assert!(
        refused.contains("peer=127.0.0.1"),
        "the log names the peer: {refused}"
    );
    assert!(
        refused.contains("no token") || refused.contains("wrong token"),
        "{refused}"
    );
    assert!(
        !refused.contains("s3cret"),
        "the token must not be logged: {refused}"
    );
}

#[test]
fn check_prints_no_secret() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("secrets.toml");
    let secrets = [
        "ingress-key-7f3a",
        "user-password-9c1e",
        "upstream-key-2b8d",
        "node-key-5e6f",
        "node-password-4a0c",
        "admin-token-8d2b",
    ];
    std::fs::write(
        &config,
        format!(
            "[ingress]\nlisten = \"127.0.0.1:0\"\n[ingress.security]\nself_hostname = \"gate\"\nshared_key = \"{}\"\nuser_auth = true\n[[ingress.security.users]]\nusername = \"u\"\npassword = \"{}\"\n\
             [spool]\npath = \"/nonexistent/s.redb\"\n[upstream.security]\nself_hostname = \"gate\"\nshared_key = \"{}\"\n\
             [[upstream.nodes]]\naddress = \"127.0.0.1:24225\"\nshared_key = \"{}\"\nusername = \"n\"\npassword = \"{}\"\n\
             [admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{}\"\n",
            secrets[0], secrets[1], secrets[2], secrets[3], secrets[4], secrets[5]
        ),
    )
    .expect("write config");
    let output = run(&["check"], &config);
    assert!(output.status.success(), "the config is valid");
    let printed = String::from_utf8_lossy(&output.stdout);
    for secret in secrets {
        assert!(
            !printed.contains(secret),
            "check printed {secret}:\n{printed}"
        );
    }
    assert_eq!(
        printed.matches("<redacted>").count(),
        secrets.len(),
        "{printed}"
    );
    assert!(
        printed.contains("username = \"u\""),
        "the rest is printed: {printed}"
    );
}

/// Every file of a directory: name → (length, modification time, bytes).
fn snapshot_dir(dir: &Path) -> BTreeMap<String, (u64, std::time::SystemTime, Vec<u8>)> {
    std::fs::read_dir(dir)
        .expect("read spool dir")
        .map(|entry| {
            let entry = entry.expect("dir entry");
            let meta = entry.metadata().expect("metadata");
            let bytes = std::fs::read(entry.path()).expect("read file");
            (
                entry.file_name().to_string_lossy().into_owned(),
                (meta.len(), meta.modified().expect("mtime"), bytes),
            )
        })
        .collect()
}

#[test]
fn read_only_commands_leave_a_stopped_spool_unchanged_and_a_missing_one_untouched() {
    let down = ReservedPort::new();
    let mut gate = Ackgate::builder().node("down", down.addr()).start();
    send(&gate, "readonly", 2);
    // A rejected request, so that there is a dead letter to list and export.
    let mut bad = connect(gate.addr());
    bad.write_all(&[0x93, 0xc1, 0xc1, 0xc1])
        .expect("write garbage");
    expect_closed(&mut bad, WAIT);
    gate.terminate_cleanly();
    let config = gate.config_path().to_path_buf();
    let spool_dir = gate.spool_path().parent().expect("spool dir").to_path_buf();
    let before = snapshot_dir(&spool_dir);
    for args in [
        &["stats"][..],
        &["list"][..],
        &["show", "1"][..],
        &["dead-letters", "list"][..],
        &["dead-letters", "export"][..],
    ] {
        let out = spool_ok(&config, args);
        assert!(!out.is_empty(), "{args:?} printed nothing");
    }
    let export = spool_ok(&config, &["dead-letters", "export"]);
    assert!(export.contains("\"kind\":\"rejected\""), "{export}");
    let after = snapshot_dir(&spool_dir);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "files created or removed"
    );
    for (name, (len, mtime, bytes)) in &before {
        let (len2, mtime2, bytes2) = &after[name];
        assert!(
            len == len2 && mtime == mtime2 && bytes == bytes2,
            "{name} changed"
        );
    }

    // A spool that does not exist: a clear error, and nothing created.
    let missing = gate.dir().join("missing");
    let other = gate.dir().join("missing.toml");
    let text = std::fs::read_to_string(&config).expect("read config");
    let path = toml_path(&missing.join("spool.redb"));
    let spool_line = text
        .lines()
        .find(|l| l.starts_with("path = "))
        .expect("spool path line")
        .to_string();
    std::fs::write(&other, text.replace(&spool_line, &format!("path = {path}"))).expect("write");
    let output = spool_cmd(&other, &["stats"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no spool at"), "{stderr}");
    assert!(
        !missing.exists(),
        "a read-only command created {}",
        missing.display()
    );
}

#[test]
fn dead_letters_are_listed_requeued_and_purged_on_a_running_relay() {
    let agg = Aggregator::start_with(Behaviour::NeverAck);
    let (mut gate, admin) = gate_with_admin(
        Ackgate::builder()
            .node("agg", agg.addr())
            .section("spool", "max_age = \"1s\""),
    );
    let config = gate.config_path().to_path_buf();
    send(&gate, "dead.expired", 2);
    // The node never acks: both records outlive max_age and become dead letters.
    status_until(&config, "two dead letters", |s| {
        s["spool"]["dead_letters"] == 2
    });
    let list = spool_ok(&config, &["dead-letters", "list"]);
    assert_eq!(
        list.lines().filter(|l| l.contains("max_age")).count(),
        2,
        "{list}"
    );
    let export = spool_ok(&config, &["dead-letters", "export"]);
    assert!(export.contains("dead.expired"), "{export}");

    // Purging needs a confirmation, on the API as on the command line.
    let (status, body) = http(admin, "POST", "/api/dead-letters/purge");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("confirm=yes"), "{body}");
    assert!(!spool_cmd(&config, &["dead-letters", "purge"])
        .status
        .success());

    // Requeued with their chunk ids, they are delivered once the node acks.
    agg.set_behaviour(Behaviour::Ack);
    let requeued = spool_ok(&config, &["dead-letters", "requeue", "--all"]);
    assert_eq!(
        requeued
            .lines()
            .filter(|l| l.contains("requeued as record"))
            .count(),
        2,
        "{requeued}"
    );
    status_until(&config, "requeued records delivered", |s| {
        s["spool"]["records"] == 0 && s["spool"]["dead_letters"] == 0
    });
    assert!(agg.event_count() >= 2, "the requeued events arrived");

    // A rejected request is a dead letter that can only be purged.
    let mut bad = connect(gate.addr());
    bad.write_all(&[0x93, 0xc1, 0xc1, 0xc1])
        .expect("write garbage");
    expect_closed(&mut bad, WAIT);
    status_until(&config, "one rejected request kept", |s| {
        s["spool"]["dead_letters"] == 1
    });
    let purged = spool_ok(&config, &["dead-letters", "purge", "--yes"]);
    assert!(purged.contains("purged 1 dead letter(s)"), "{purged}");
    gate.terminate_cleanly();
}
