//! The command line: `ackgate check` validates a config and prints the effective one; a bad
//! config is refused with exit status 1 and a message naming the key; SIGTERM stops a running
//! relay cleanly (exit 0) after every request it stored was acked to its sender, and nothing
//! acked is lost (DESIGN.md invariants 1, 7).

mod support;

use std::io::{Read, Write};
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use support::*;

const RUN: Duration = Duration::from_secs(20);

fn example_config() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/ackgate.toml")
}

fn check(config: &Path) -> std::process::Output {
    let output = ackgate_command(["check", "--config"])
        .arg(config)
        .output()
        .expect("run ackgate check");
    eprintln!(
        "check {}: {:?}\nstdout:\n{}\nstderr:\n{}",
        config.display(),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

#[test]
fn check_accepts_the_example_config_and_prints_the_effective_one() {
    let output = check(&example_config());
    assert_eq!(
        output.status.code(),
        Some(0),
        "check failed on the example config"
    );
    let text = String::from_utf8(output.stdout).expect("utf-8 stdout");
    let effective: toml::Table = toml::from_str(&text)
        .unwrap_or_else(|e| panic!("effective config is not TOML: {e}\n{text}"));
    let get = |section: &str, key: &str| -> toml::Value {
        effective
            .get(section)
            .and_then(|s| s.get(key))
            .cloned()
            .unwrap_or_else(|| panic!("effective config lacks {section}.{key}:\n{text}"))
    };
    assert_eq!(get("ingress", "listen").as_str(), Some("127.0.0.1:24224"));
    assert_eq!(get("upstream", "ack_timeout").as_str(), Some("30s"));
    assert_eq!(get("spool", "max_bytes").as_str(), Some("1GiB"));
    assert_eq!(get("log", "level").as_str(), Some("info"));
    let nodes = get("upstream", "nodes");
    assert_eq!(
        nodes.as_array().map(|n| n.len()),
        Some(1),
        "nodes: {nodes:?}"
    );
    // The effective config is itself a valid config.
    let dir = tempfile::tempdir().expect("temp dir");
    let again = dir.path().join("effective.toml");
    std::fs::write(&again, &text).expect("write");
    assert_eq!(check(&again).status.code(), Some(0));
}

#[test]
fn check_and_run_refuse_bad_configs_naming_the_key() {
    let example = std::fs::read_to_string(example_config()).expect("example config");
    // (what is wrong, config text, words stderr must contain)
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "unknown key",
            example.replace("[spool]", "[spool]\nmax_byts = 5"),
            vec!["max_byts"],
        ),
        (
            "bad duration",
            example.replace("ack_timeout = \"30s\"", "ack_timeout = \"30 parsecs\""),
            vec!["ack_timeout"],
        ),
        (
            "duration without unit",
            example.replace("idle_timeout = \"300s\"", "idle_timeout = \"300\""),
            vec!["idle_timeout"],
        ),
        (
            "empty node list",
            {
                // The table header, not a mention of it in a comment.
                let start = example.find("\n[[upstream.nodes]]").expect("nodes table") + 1;
                let end = example[start..].find("[log]").expect("[log]") + start;
                format!("{}nodes = []\n{}", &example[..start], &example[end..])
            },
            vec!["upstream.nodes"],
        ),
        (
            "no node table at all",
            {
                // The table header, not a mention of it in a comment.
                let start = example.find("\n[[upstream.nodes]]").expect("nodes table") + 1;
                let end = example[start..].find("[log]").expect("[log]") + start;
                format!("{}{}", &example[..start], &example[end..])
            },
            vec!["nodes"],
        ),
    ];
    let dir = tempfile::tempdir().expect("temp dir");
    for (what, text, words) in &cases {
        assert_ne!(text, &example, "{what}: the test did not change the config");
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).expect("write config");
        let output = check(&path);
        assert_eq!(output.status.code(), Some(1), "{what}: check must exit 1");
        let stderr = String::from_utf8_lossy(&output.stderr);
        for word in words {
            assert!(
                stderr.contains(word),
                "{what}: stderr does not name {word:?}: {stderr}"
            );
        }
        // `run` refuses it the same way, before binding anything.
        let run = ackgate_command(["run", "--config"])
            .arg(&path)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run ackgate run");
        assert_eq!(run.status.code(), Some(1), "{what}: run must exit 1");
        let stderr = String::from_utf8_lossy(&run.stderr);
        for word in words {
            assert!(
                stderr.contains(word),
                "{what}: run's stderr does not name {word:?}: {stderr}"
            );
        }
    }
}

/// A v0.12-style sender on one connection: write a request, wait for its ack, repeat, until the
/// connection ends. Reports each ack on `acked`; returns the events of the acked requests.
fn ack_sender(addr: std::net::SocketAddr, acked: mpsc::Sender<usize>) -> Vec<Vec<u8>> {
    let mut stream = connect(addr);
    let mut events = Vec::new();
    for i in 0.. {
        let entries: Vec<Vec<u8>> = (0..3)
            .map(|_| entry_int(TS, &unique_record("sigterm")))
            .collect();
        let chunk = v012_chunk_id(i as u64);
        if stream
            .write_all(&ack_request("cli.sigterm", &entries.concat(), &chunk))
            .is_err()
        {
            break;
        }
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut buf = [0u8; 1024];
        match stream.read(&mut buf) {
            Ok(n) if n > 0 => {
                assert_eq!(
                    hex(&buf[..n]),
                    hex(&expected_ack(&chunk)),
                    "ack #{i}: not exactly one ack for this request"
                );
                events.extend(entries);
                let _ = acked.send(i);
            }
            // Closed by the shutdown: this request was not taken.
            _ => break,
        }
    }
    events
}

#[test]
fn sigterm_mid_stream_exits_0_after_acking_what_was_stored() {
    let agg = Aggregator::start();
    let mut gate = Ackgate::builder()
        .node("agg", agg.addr())
        .section("upstream", "shutdown_grace = \"3s\"")
        .start();
    let (acked_tx, acked_rx) = mpsc::channel();
    let addr = gate.addr();
    let sender = std::thread::spawn(move || ack_sender(addr, acked_tx));
    // Mid-stream: the sender is busy writing and waiting for acks.
    for _ in 0..30 {
        acked_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("sender stalled before SIGTERM");
    }
    let status = gate.terminate(RUN);
    assert_eq!(status.code(), Some(0), "ackgate exited with {status}");
    let acked_events = sender.join().expect("sender panicked");
    assert!(acked_events.len() >= 90, "too few acked events");
    gate.wait_for_log("ingress drained", Duration::from_secs(1));
    let stopped = gate.wait_for_log("stopped;", Duration::from_secs(1));
    let left: u64 = stopped
        .split("records=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no records=N in {stopped}"));
    if left > 0 {
        // Not delivered within shutdown_grace: it must still be in the spool.
        gate.restart();
    }
    agg.wait_for_all(&acked_events, RUN);
    // Everything acked was delivered, and nothing was stored without being acked: ingress
    // finished every request it had read before closing.
    assert_same_event_set(&acked_events, &agg.events(), "after SIGTERM");
}
