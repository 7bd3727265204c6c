//! TLS on both sides of ackgate (fluentd's `<transport tls>`, PROTOCOL.md §10–§11), with
//! certificates made by rcgen for this run.
//!
//! Ingress (`[ingress.tls]`): a tokio-rustls client that trusts the test CA gets its ack over
//! TLS and the events reach the aggregator. With `client_ca`, a client without a certificate
//! is refused (and the refusal logged with its peer address), and one whose certificate the CA
//! signed is served.
//!
//! Upstream (node `tls = true`): ackgate B delivers to ackgate A (TLS and a shared key) when it
//! trusts A's CA, or when `tls_verify = false` whatever signed A's certificate; with the wrong
//! CA and verification on, B logs the TLS failure and keeps its records (invariant 2).

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use support::*;

const WAIT: Duration = Duration::from_secs(15);

fn client_config(ca: &Path, client: Option<(&Path, &Path)>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("read CA") {
        roots.add(cert.expect("CA PEM")).expect("add CA");
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(cert)
                    .expect("read client cert")
                    .collect::<Result<Vec<_>, _>>()
                    .expect("client cert PEM"),
                PrivateKeyDer::from_pem_file(key).expect("client key"),
            )
            .expect("client auth config"),
    };
    Arc::new(config)
}

/// Open a TLS connection to `addr` (verifying the name `localhost`), write `request`, and read
/// until one whole msgpack value arrived. `Err` says what happened instead. Also returns the
/// client's own address (the peer in ackgate's log).
fn tls_request(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    request: &[u8],
) -> (SocketAddr, Result<Vec<u8>, String>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime");
    rt.block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        let local = tcp.local_addr().expect("local addr");
        let exchange = async {
            let connector = tokio_rustls::TlsConnector::from(config);
            let name = ServerName::try_from("localhost").expect("server name");
            let mut tls = connector
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS handshake: {e}"))?;
            tls.write_all(request)
                .await
                .map_err(|e| format!("write: {e}"))?;
            tls.flush().await.map_err(|e| format!("flush: {e}"))?;
            let mut buf = Vec::new();
            loop {
                let (values, _) = complete_values(&buf);
                if let Some(value) = values.into_iter().next() {
                    return Ok(value);
                }
                let mut chunk = [0u8; 1024];
                match tls.read(&mut chunk).await {
                    Ok(0) => return Err(format!("closed after {} bytes", buf.len())),
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    Err(e) => return Err(format!("read: {e}")),
                }
            }
        };
        let result = tokio::time::timeout(WAIT, exchange)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {WAIT:?}")));
        (local, result)
    })
}

fn tls_gate(agg: &Aggregator, certs: &Pki, client_ca: bool) -> Ackgate {
    let mut tls = format!(
        "[tls]\ncert = {}\nkey = {}\n",
        toml_path(&certs.server_cert),
        toml_path(&certs.server_key)
    );
    if client_ca {
        tls.push_str(&format!("client_ca = {}\n", toml_path(&certs.ca)));
    }
    Ackgate::builder()
        .node("agg", agg.addr())
        .section("ingress", &tls)
        .start()
}

fn request(tag: &str, id: u64) -> (Vec<u8>, Vec<u8>, String) {
    let entries = entry_eventtime(TS, 7, &unique_record(tag));
    let chunk = v012_chunk_id(id);
    (ack_request(tag, &entries, &chunk), entries, chunk)
}

#[test]
fn ingress_tls_acks_over_tls_and_events_flow() {
    let certs = Pki::generate("ackgate test CA");
    let agg = Aggregator::start();
    let gate = tls_gate(&agg, &certs, false);
    let (bytes, entries, chunk) = request("tls.ingress", 1);
    let ack = tls_request(gate.addr(), client_config(&certs.ca, None), &bytes)
        .1
        .unwrap_or_else(|e| panic!("TLS request failed: {e}"));
    assert_eq!(hex(&ack), hex(&expected_ack(&chunk)), "ack over TLS");
    agg.wait_for_all(std::slice::from_ref(&entries), WAIT);
    assert_same_events(&[entries], &agg.events(), "events sent over TLS");
}

#[test]
fn client_ca_refuses_a_client_without_certificate_and_serves_a_signed_one() {
    let certs = Pki::generate("ackgate test CA");
    let agg = Aggregator::start();
    let gate = tls_gate(&agg, &certs, true);

    let mark = gate.log_mark();
    let (bytes, _, _) = request("tls.nocert", 2);
    let (local, refused) = tls_request(gate.addr(), client_config(&certs.ca, None), &bytes);
    assert!(
        refused.is_err(),
        "a client without a certificate was answered: {refused:?}"
    );
    let line = gate.wait_for_log_since(
        mark,
        &["TLS handshake failed", &format!("peer={local}")],
        WAIT,
    );
    assert!(line.contains("WARN"), "not a warning: {line}");

    let (bytes, entries, chunk) = request("tls.withcert", 3);
    let ack = tls_request(
        gate.addr(),
        client_config(&certs.ca, Some((&certs.client_cert, &certs.client_key))),
        &bytes,
    )
    .1
    .unwrap_or_else(|e| panic!("client with a CA-signed certificate refused: {e}"));
    assert_eq!(hex(&ack), hex(&expected_ack(&chunk)));
    agg.wait_for_all(std::slice::from_ref(&entries), WAIT);
    assert_same_events(
        &[entries],
        &agg.events(),
        "only the certified client's event",
    );
}

// ------------------------------------------------------------------------------------------------
// Upstream: ackgate B → ackgate A (TLS + shared key)

fn relay_a(agg: &Aggregator, certs: &Pki) -> Ackgate {
    Ackgate::builder()
        .node("agg", agg.addr())
        .section(
            "ingress",
            &format!(
                "[tls]\ncert = {}\nkey = {}\n[security]\nself_hostname = \"ackgate-a\"\nshared_key = \"k3y\"\n",
                toml_path(&certs.server_cert),
                toml_path(&certs.server_key)
            ),
        )
        .start()
}

fn relay_b(a: SocketAddr, node_tls: &str) -> Ackgate {
    Ackgate::builder()
        .section(
            "upstream",
            &format!(
                "[security]\nself_hostname = \"ackgate-b\"\n{}",
                node_toml(
                    "relay-a",
                    a,
                    &format!("shared_key = \"k3y\"\ntls = true\n{node_tls}")
                )
            ),
        )
        .start()
}

fn send_plain(gate: &Ackgate, tag: &str, n: u64) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let entries = entry_int(TS, &unique_record(tag));
            send_acked(gate.addr(), tag, &entries, 1000 + i, WAIT);
            entries
        })
        .collect()
}

#[test]
fn relay_delivers_over_tls_to_a_node_it_trusts() {
    let certs = Pki::generate("ackgate test CA");
    let agg = Aggregator::start();
    let a = relay_a(&agg, &certs);
    let b = relay_b(a.addr(), &format!("tls_ca = {}\n", toml_path(&certs.ca)));
    let events = send_plain(&b, "tls.chain", 4);
    agg.wait_for_all(&events, WAIT);
    assert_same_event_set(&events, &agg.events(), "B → TLS → A → aggregator");
    assert!(
        b.log_lines_with(&["unreachable"]).is_empty(),
        "B had trouble"
    );
}

#[test]
fn relay_without_verification_accepts_an_unknown_ca() {
    let certs = Pki::generate("a CA nobody trusts");
    let agg = Aggregator::start();
    let a = relay_a(&agg, &certs);
    let b = relay_b(a.addr(), "tls_verify = false\n");
    let events = send_plain(&b, "tls.noverify", 2);
    agg.wait_for_all(&events, WAIT);
    assert_same_event_set(&events, &agg.events(), "tls_verify = false");
}

#[test]
fn relay_with_the_wrong_ca_logs_the_tls_error_and_keeps_its_records() {
    let certs = Pki::generate("ackgate test CA");
    let other = Pki::generate("some other CA");
    let agg = Aggregator::start();
    let a = relay_a(&agg, &certs);
    let b = relay_b(
        a.addr(),
        &format!("tls_verify = true\ntls_ca = {}\n", toml_path(&other.ca)),
    );
    let started = Instant::now();
    send_plain(&b, "tls.wrongca", 1);
    let line = b.wait_for_log("upstream node unreachable", WAIT);
    assert!(
        line.contains("TLS handshake failed"),
        "B must say the TLS handshake failed: {line}"
    );
    eprintln!("TLS failure logged after {:?}", started.elapsed());
    assert_eq!(
        agg.event_count(),
        0,
        "nothing may pass an unverified TLS node"
    );
    assert_records_left(b, 1, "the record stays in B's spool");
}
