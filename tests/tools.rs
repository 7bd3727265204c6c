//! The try-it flow from the README, with the real binary in all three roles:
//! `ackgate receive` (an acking aggregator writing JSON lines), `ackgate run` relaying to it,
//! and `ackgate send` feeding JSON lines from stdin, with acks and in the fluentd v0.10 layout.

mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

const WAIT: Duration = Duration::from_secs(20);

/// Run `ackgate send <args>` with `lines` on stdin; returns (exit code, stderr).
fn send(port: u16, args: &[&str], lines: &[Value]) -> (Option<i32>, String) {
    let mut command = ackgate_command(["send", "--host", "127.0.0.1", "--port"]);
    command
        .arg(port.to_string())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null());
    let mut proc = Proc::spawn("send", command);
    {
        let mut stdin = proc.child.stdin.take().expect("stdin piped");
        for line in lines {
            writeln!(stdin, "{line}").expect("write stdin");
        }
        // Dropping stdin is the end of input.
    }
    let status = proc.wait(WAIT);
    (status.code(), proc.log.dump())
}

/// JSON lines of `path`; waits (polling, with a deadline: a file has no event to wait on)
/// until at least `n` complete lines are there.
fn wait_for_lines(path: &Path, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let complete: Vec<&str> = text
            .split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .collect();
        if complete.len() >= n {
            return complete
                .iter()
                .map(|l| {
                    serde_json::from_str(l.trim_end())
                        .unwrap_or_else(|e| panic!("output line is not JSON ({e}): {l}"))
                })
                .collect();
        }
        assert!(
            Instant::now() < deadline,
            "{} has {} of {n} lines after {WAIT:?}:\n{text}",
            path.display(),
            complete.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn send_through_ackgate_to_receive() {
    let dir = tempfile::tempdir().expect("temp dir");
    let output = dir.path().join("received.jsonl");
    let mut receive = Proc::spawn("receive", {
        let mut c = ackgate_command(["receive", "--listen", "127.0.0.1:0", "--output"]);
        c.arg(&output).stdin(Stdio::null()).stdout(Stdio::null());
        c
    });
    let line = receive.wait_for_log("ackgate receive listening on", WAIT);
    let receive_addr: SocketAddr = line
        .rsplit(' ')
        .next()
        .and_then(|a| a.trim().parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));

    let gate = Ackgate::start(receive_addr);
    let port = gate.addr().port();

    // With acks (PackedForward, EventTime): acked by ackgate after its commit.
    let records = vec![
        json!({"seq": 1, "msg": "hello"}),
        json!({"seq": 2, "msg": "wörld", "nested": {"a": [1, 2, 3]}}),
        json!({"seq": 3, "msg": "", "flag": true, "none": null}),
    ];
    let (code, stderr) = send(port, &["--tag", "try.it", "--ack"], &records);
    assert_eq!(code, Some(0), "send --ack failed:\n{stderr}");
    assert!(
        stderr.contains("sent 3 event(s)") && stderr.contains("acked"),
        "send did not report its acks:\n{stderr}"
    );
    let lines = wait_for_lines(&output, 3);
    assert_eq!(lines.len(), 3, "unexpected extra lines: {lines:?}");
    for (line, record) in lines.iter().zip(&records) {
        assert_eq!(line["tag"], "try.it", "{line}");
        assert_eq!(&line["record"], record, "{line}");
        let time = line["time"].as_f64().unwrap_or(0.0);
        assert!(time > 1.6e9, "implausible time in {line}");
    }

    // fluentd v0.10 bytes: one connection per request, no option, no ack.
    let legacy = vec![
        json!({"seq": 10, "msg": "legacy one"}),
        json!({"seq": 11, "msg": "legacy two"}),
    ];
    let (code, stderr) = send(port, &["--tag", "try.legacy", "--legacy"], &legacy);
    assert_eq!(code, Some(0), "send --legacy failed:\n{stderr}");
    let lines = wait_for_lines(&output, 5);
    let got: Vec<&Value> = lines[3..].iter().collect();
    assert_eq!(got.len(), 2, "{lines:?}");
    for (line, record) in got.iter().zip(&legacy) {
        assert_eq!(line["tag"], "try.legacy", "{line}");
        assert_eq!(&line["record"], record, "{line}");
        assert!(
            line["time"].is_u64(),
            "legacy time must be an integer: {line}"
        );
    }

    // Message mode with integer times, acked one by one.
    let message = vec![json!({"seq": 20}), json!({"seq": 21}), json!({"seq": 22})];
    let (code, stderr) = send(
        port,
        &[
            "--tag",
            "try.msg",
            "--ack",
            "--mode",
            "message",
            "--time-format",
            "int",
        ],
        &message,
    );
    assert_eq!(code, Some(0), "send --mode message failed:\n{stderr}");
    let lines = wait_for_lines(&output, 8);
    let mut got: Vec<Value> = lines[5..].iter().map(|l| l["record"].clone()).collect();
    got.sort_by_key(|r| r["seq"].as_u64());
    assert_eq!(got, message);
    assert!(lines[5..].iter().all(|l| l["tag"] == "try.msg"));

    drop(gate);
    let status = receive.terminate(WAIT);
    assert!(status.success(), "receive exited with {status}");
}

#[test]
fn send_with_ack_fails_when_nothing_acks() {
    // Against a receiver started with --no-ack, `send --ack` must not report success.
    let mut receive = Proc::spawn("receive-noack", {
        let mut c = ackgate_command([
            "receive",
            "--listen",
            "127.0.0.1:0",
            "--no-ack",
            "--output",
            "-",
        ]);
        c.stdin(Stdio::null()).stdout(Stdio::null());
        c
    });
    let line = receive.wait_for_log("ackgate receive listening on", WAIT);
    let addr: SocketAddr = line
        .rsplit(' ')
        .next()
        .and_then(|a| a.trim().parse().ok())
        .expect("address");
    let (code, stderr) = send(
        addr.port(),
        &["--tag", "noack", "--ack", "--ack-timeout", "500ms"],
        &[json!({"a": 1})],
    );
    assert_eq!(
        code,
        Some(1),
        "send --ack succeeded without an ack:\n{stderr}"
    );
    assert!(
        stderr.contains("ack"),
        "error does not mention the ack:\n{stderr}"
    );
    let _ = receive.terminate(WAIT);
}
