//! `send` against `receive` in one process, over real sockets on 127.0.0.1:0: every mode, acks,
//! legacy, msgpack input, TLS (certificates from rcgen) and the shared-key handshake.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;

use super::receive::tests::ReceiveCli;
use super::request::tests::request;
use super::send::tests::send_args;
use super::*;
use crate::upstream::connect::ConnectError;

const TEST_DEADLINE: Duration = Duration::from_secs(20);

struct Receiver {
    addr: SocketAddr,
    output: tempfile::NamedTempFile,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), ToolError>>,
}

impl Receiver {
    async fn start(extra: &[&str]) -> Receiver {
        let output = tempfile::NamedTempFile::new().unwrap();
        let path = output.path().to_str().unwrap().to_owned();
        let mut argv = vec!["receive", "--listen", "127.0.0.1:0", "--output", &path];
        argv.extend_from_slice(extra);
        let args = ReceiveCli::try_parse_from(argv).unwrap().args;
        let (listener, udp) = bind(args.listen).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(listener, udp, args, shutdown.clone()));
        Receiver {
            addr,
            output,
            shutdown,
            task,
        }
    }

    fn lines(&self) -> Vec<Value> {
        read_lines(self.output.path())
    }

    /// Wait (bounded) until `n` lines are written: unacked sends have no other signal.
    async fn wait_lines(&self, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + TEST_DEADLINE;
        loop {
            let lines = self.lines();
            if lines.len() >= n {
                return lines;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {n} lines arrived",
                lines.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(self) -> Vec<Value> {
        self.shutdown.cancel();
        timeout(TEST_DEADLINE, self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        read_lines(self.output.path())
    }
}

fn read_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn input_file(records: usize) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    for i in 0..records {
        writeln!(file, "{}", json!({"seq": i, "msg": "hello ✓"})).unwrap();
    }
    file.flush().unwrap();
    file
}

fn target_args(receiver: &Receiver, input: &tempfile::NamedTempFile, extra: &[&str]) -> SendArgs {
    let port = receiver.addr.port().to_string();
    let path = input.path().to_str().unwrap().to_owned();
    let mut argv = vec!["--port", &port, "--input", &path];
    argv.extend_from_slice(extra);
    send_args(&argv)
}

async fn send_ok(args: SendArgs) -> SendReport {
    timeout(TEST_DEADLINE, send(args)).await.unwrap().unwrap()
}

async fn send_err(args: SendArgs) -> ToolError {
    timeout(TEST_DEADLINE, send(args))
        .await
        .unwrap()
        .unwrap_err()
}

fn check_events(lines: &[Value], count: usize, int_time: bool) {
    assert_eq!(lines.len(), count);
    let mut seqs: Vec<u64> = lines
        .iter()
        .map(|l| l["record"]["seq"].as_u64().unwrap())
        .collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (0..count as u64).collect::<Vec<_>>());
    for line in lines {
        assert_eq!(line["tag"], "app.log");
        assert_eq!(line["record"]["msg"], "hello ✓");
        assert_eq!(line["time"].is_u64(), int_time, "{line}");
        assert!(line["time"].as_f64().unwrap() > 1.6e9);
    }
}

#[tokio::test]
async fn send_with_acks_end_to_end() {
    let receiver = Receiver::start(&[]).await;
    let input = input_file(5);
    for (mode, requests) in [("packed", 3), ("forward", 3), ("message", 5)] {
        let args = target_args(
            &receiver,
            &input,
            &["--ack", "--batch", "2", "--window", "2", "--mode", mode],
        );
        let report = send_ok(args).await;
        assert_eq!(
            report,
            SendReport {
                events: 5,
                requests,
                acked: requests,
                acked_events: 5,
            },
            "{mode}"
        );
    }
    // Every ack came after its lines were flushed, so the file is complete now.
    let lines = receiver.lines();
    assert_eq!(lines.len(), 15);
    for chunk in lines.chunks(5) {
        check_events(chunk, 5, false);
    }
    receiver.stop().await;
}

#[tokio::test]
async fn legacy_send_end_to_end() {
    let receiver = Receiver::start(&[]).await;
    let input = input_file(3);
    let args = target_args(&receiver, &input, &["--legacy", "--batch", "2"]);
    let report = send_ok(args).await;
    assert_eq!(
        report,
        SendReport {
            events: 3,
            requests: 2,
            ..SendReport::default()
        }
    );
    receiver.wait_lines(3).await;
    check_events(&receiver.stop().await, 3, true);
}

#[tokio::test]
async fn missing_acks_fail_the_send() {
    let receiver = Receiver::start(&["--no-ack"]).await;
    let input = input_file(2);
    let args = target_args(&receiver, &input, &["--ack", "--ack-timeout", "200ms"]);
    let err = send_err(args).await;
    assert!(matches!(err, ToolError::AckTimeout { .. }), "{err}");
    // The events were still received and written.
    assert_eq!(receiver.stop().await.len(), 2);
}

#[tokio::test]
async fn delayed_acks_arrive() {
    let receiver = Receiver::start(&["--ack-delay", "100ms"]).await;
    let input = input_file(4);
    let args = target_args(&receiver, &input, &["--ack", "--batch", "1"]);
    assert_eq!(send_ok(args).await.acked, 4);
    receiver.stop().await;
}

/// msgpack input: str8 and bin records (which JSON input never produces that way) arrive as
/// written, in every mode.
#[tokio::test]
async fn msgpack_input_is_sent_byte_for_byte() {
    let receiver = Receiver::start(&[]).await;
    let mut file = tempfile::NamedTempFile::new().unwrap();
    let str8 = "s".repeat(40);
    let mut bytes = vec![0x82, 0xa3, b's', b'e', b'q', 0x00, 0xa1, b's', 0xd9, 40];
    bytes.extend_from_slice(str8.as_bytes());
    bytes.extend_from_slice(&[
        0x82, 0xa3, b's', b'e', b'q', 0x01, 0xa1, b'b', 0xc4, 2, 0xff, 0,
    ]);
    file.write_all(&bytes).unwrap();
    file.flush().unwrap();
    for mode in ["packed", "forward", "message"] {
        let args = target_args(
            &receiver,
            &file,
            &["--format", "msgpack", "--ack", "--mode", mode],
        );
        assert_eq!(send_ok(args).await.acked_events, 2, "{mode}");
    }
    let lines = receiver.stop().await;
    assert_eq!(lines.len(), 6);
    for pair in lines.chunks(2) {
        assert_eq!(pair[0]["record"], json!({"seq": 0, "s": str8}));
        assert_eq!(
            pair[1]["record"],
            json!({"seq": 1, "b": {"$bin_base64": "/wA="}})
        );
    }
}

#[tokio::test]
async fn udp_heartbeats_are_answered_from_the_same_port() {
    let receiver = Receiver::start(&[]).await;
    let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for payload in [&[0u8][..], &[]] {
        client.send_to(payload, receiver.addr).await.unwrap();
        let mut buf = [0xffu8; 8];
        let (n, from) = timeout(TEST_DEADLINE, client.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..n], &[0]);
        assert_eq!(from, receiver.addr);
    }
    receiver.stop().await;
}

#[tokio::test]
async fn a_bad_frame_closes_only_its_connection() {
    let receiver = Receiver::start(&[]).await;
    let mut bad = TcpStream::connect(receiver.addr).await.unwrap();
    let mut good = TcpStream::connect(receiver.addr).await.unwrap();
    bad.write_all(&[0x92, 0xa1, b't', 0xc1]).await.unwrap();
    let mut buf = [0u8; 16];
    let n = timeout(TEST_DEADLINE, bad.read(&mut buf)).await.unwrap();
    assert!(matches!(n, Ok(0) | Err(_)), "connection stays open: {n:?}");
    // The other connection is still served and acked.
    let forward = request(SendMode::Forward, &[json!({"seq": 0})], Some("abc"));
    good.write_all(&forward).await.unwrap();
    let mut ack = [0u8; 9];
    timeout(TEST_DEADLINE, good.read_exact(&mut ack))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ack, [0x81, 0xa3, b'a', b'c', b'k', 0xa3, b'a', b'b', b'c']);
    drop(good);
    assert_eq!(receiver.stop().await.len(), 1);
}

// ---- TLS and shared key ---------------------------------------------------------------------

/// A CA, a server certificate for 127.0.0.1 and `relay.test`, and a client certificate.
pub(super) struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    pub(super) fn new() -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let dir = tempfile::tempdir().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        let issuer = Issuer::from_params(&ca_params, &ca_key);
        for (stem, names) in [
            (
                "server",
                vec!["127.0.0.1".to_owned(), "relay.test".to_owned()],
            ),
            ("client", vec!["sender.test".to_owned()]),
        ] {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(names)
                .unwrap()
                .signed_by(&key, &issuer)
                .unwrap();
            std::fs::write(dir.path().join(format!("{stem}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.path().join(format!("{stem}.key")), key.serialize_pem()).unwrap();
        }
        Pki { dir }
    }

    pub(super) fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    pub(super) fn arg(&self, file: &str) -> String {
        self.path(file).to_str().unwrap().to_owned()
    }
}

#[tokio::test]
async fn tls_with_client_certificates_shared_key_and_user() {
    let pki = Pki::new();
    let (cert, key, ca) = (
        pki.arg("server.pem"),
        pki.arg("server.key"),
        pki.arg("ca.pem"),
    );
    let receiver = Receiver::start(&[
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--tls-client-ca",
        &ca,
        "--shared-key",
        "s3cret",
        "--user",
        "alice:pw",
    ])
    .await;
    let input = input_file(3);
    let (client_cert, client_key) = (pki.arg("client.pem"), pki.arg("client.key"));
    let secured = [
        "--tls",
        "--tls-ca",
        &ca,
        "--tls-client-cert",
        &client_cert,
        "--tls-client-key",
        &client_key,
        "--shared-key",
        "s3cret",
        "--username",
        "alice",
        "--password",
        "pw",
    ];
    let mut acked = secured.to_vec();
    acked.extend(["--ack", "--batch", "2"]);
    let report = send_ok(target_args(&receiver, &input, &acked)).await;
    assert_eq!((report.events, report.acked), (3, 2));
    // The v0.10 layout through the same security, one handshake per connection.
    let mut legacy = secured.to_vec();
    legacy.extend(["--legacy", "--batch", "2"]);
    let report = send_ok(target_args(&receiver, &input, &legacy)).await;
    assert_eq!((report.events, report.requests), (3, 2));
    receiver.wait_lines(6).await;

    // Each missing piece is refused, and the error names the layer.
    let mut wrong_password = secured.to_vec();
    if let Some(password) = wrong_password.last_mut() {
        *password = "nope";
    }
    let err = send_err(target_args(&receiver, &input, &wrong_password)).await;
    assert!(
        matches!(&err, ToolError::Connect { error: ConnectError::Handshake(r), .. } if r.contains("username/password mismatch")),
        "{err}"
    );
    let without_cert = [
        "--tls",
        "--tls-ca",
        &ca,
        "--shared-key",
        "s3cret",
        "--username",
        "alice",
    ];
    let err = send_err(target_args(&receiver, &input, &without_cert)).await;
    assert!(matches!(&err, ToolError::Connect { .. }), "{err}");
    // Plain TCP to a TLS port: only a sender waiting for acks can tell (a TLS alert comes
    // back, or the connection closes).
    let err = send_err(target_args(&receiver, &input, &["--ack"])).await;
    assert!(
        matches!(
            &err,
            ToolError::BadAck { .. }
                | ToolError::ConnectionClosed { .. }
                | ToolError::Network { .. }
        ),
        "{err}"
    );

    let lines = receiver.stop().await;
    assert_eq!(lines.len(), 6, "only the secured sends arrived: {lines:?}");
    check_events(&lines[..3], 3, false);
    check_events(&lines[3..], 3, true);
}

#[tokio::test]
async fn shared_key_mismatch_and_insecure_tls() {
    let pki = Pki::new();
    let (cert, key) = (pki.arg("server.pem"), pki.arg("server.key"));
    let receiver = Receiver::start(&[
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--shared-key",
        "right",
    ])
    .await;
    let input = input_file(2);
    // --tls-insecure: no CA, a name the certificate does not cover; still encrypted.
    let insecure = [
        "--tls",
        "--tls-insecure",
        "--tls-server-name",
        "elsewhere.test",
        "--ack",
        "--shared-key",
    ];
    let mut ok = insecure.to_vec();
    ok.push("right");
    assert_eq!(
        send_ok(target_args(&receiver, &input, &ok))
            .await
            .acked_events,
        2
    );
    let mut wrong = insecure.to_vec();
    wrong.push("wrong");
    let err = send_err(target_args(&receiver, &input, &wrong)).await;
    let text = err.to_string();
    assert!(text.contains("shared_key mismatch"), "{text}");
    // Verification on, the wrong name: the TLS layer refuses.
    let ca = pki.arg("ca.pem");
    let args = [
        "--tls",
        "--tls-ca",
        &ca,
        "--tls-server-name",
        "elsewhere.test",
        "--shared-key",
        "right",
    ];
    let err = send_err(target_args(&receiver, &input, &args)).await;
    assert!(
        matches!(
            &err,
            ToolError::Connect {
                error: ConnectError::Tls(_),
                ..
            }
        ),
        "{err}"
    );
    // A receiver with our own name: the client refuses it (PROTOCOL.md §7.3).
    let same = [
        "--tls",
        "--tls-insecure",
        "--shared-key",
        "right",
        "--self-hostname",
        "ackgate-receive",
    ];
    let err = send_err(target_args(&receiver, &input, &same)).await;
    assert!(err.to_string().contains("same hostname"), "{err}");
    assert_eq!(receiver.stop().await.len(), 2);
}
