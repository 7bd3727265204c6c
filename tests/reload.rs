//! Reload in place (invariant 10), through the real binary: SIGHUP, `ackgate reload` and
//! `POST /api/reload` re-read the config file and put what changed in force without closing a
//! sender connection or losing a record.
//!
//! - Under load (a persistent connection that never reads, an acking sender, a fluentd v0.10
//!   sender opening a connection per request), a reload adds a node and removes one that holds
//!   chunks in flight: no event is lost, both persistent connections stay open (ackgate counts
//!   them open, and no connection beyond the per-request ones) and acks keep coming, the removed node's chunks arrive through the other nodes with their chunk ids,
//!   and the node that stays keeps its one upstream connection (SIGHUP).
//! - A file that does not validate changes nothing (not even its valid keys): `ackgate reload`
//!   exits 1 naming the key, the relay keeps relaying, `ackgate status` says so; the fixed
//!   file then applies (`ackgate reload`).
//! - A restart-only key (ingress.listen) is refused with the reason (409 from
//!   `POST /api/reload`), its valid neighbour (spool.max_bytes) not applied; applied alone
//!   after; `ackgate_reloads_total` counts both.
//! - Certificate rotation: the cert and key files rewritten in place and reloaded, a new TLS
//!   connection gets the new certificate while the open one keeps working.
//! - `log.level`: a debug line appears after a reload to debug and is gone after one back.

mod support;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use ackgate::forward::msgpack::value_len;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use support::*;

const WAIT: Duration = Duration::from_secs(20);

/// Rewrite the config file through its TOML table.
fn rewrite(gate: &Ackgate, edit: impl FnOnce(&mut toml::Table)) {
    let text = std::fs::read_to_string(gate.config_path()).expect("read config");
    let mut root: toml::Table = toml::from_str(&text).expect("config is TOML");
    edit(&mut root);
    std::fs::write(gate.config_path(), toml::to_string(&root).expect("render"))
        .expect("write config");
}

fn table<'a>(root: &'a mut toml::Table, name: &str) -> &'a mut toml::Table {
    root.entry(name.to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .unwrap_or_else(|| panic!("[{name}] is not a table"))
}

/// `[[upstream.nodes]]` as these (name, address) pairs.
fn set_nodes(root: &mut toml::Table, nodes: &[(&str, SocketAddr)]) {
    let list = nodes
        .iter()
        .map(|(name, address)| {
            let mut node = toml::Table::new();
            node.insert("name".into(), (*name).into());
            node.insert("address".into(), address.to_string().into());
            toml::Value::Table(node)
        })
        .collect();
    table(root, "upstream").insert("nodes".into(), toml::Value::Array(list));
}

/// What the sender threads did, shared with the test.
#[derive(Default)]
struct Traffic {
    /// Events the no-ack senders wrote (every write returned).
    written: HashSet<u64>,
    /// Connections the per-request sender opened.
    connections: u64,
    /// Events the acking sender got an ack for, and how many acks.
    acked: HashSet<u64>,
    acks: u64,
    /// The first failure of either sender (a write error, a missing or wrong ack).
    failure: Option<String>,
    /// Senders that stopped sending.
    stopped: usize,
}

/// Senders until stopped: on one connection each, one writes fluentd v0.10 requests and never
/// reads, one sends v0.12 requests and waits for every ack; and a fluentd v0.10 sender that
/// opens a connection per request.
struct Load {
    traffic: Arc<(Mutex<Traffic>, Condvar)>,
    /// Stop sending (the sockets stay open).
    stop: Arc<AtomicBool>,
    /// Close the sockets: the test is done with them.
    close: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr) -> Load {
        let traffic = Arc::new((Mutex::new(Traffic::default()), Condvar::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let close = Arc::new(AtomicBool::new(false));
        let ids = Arc::new(Ids::default());
        let mut threads = Vec::new();
        for kind in [Kind::Silent, Kind::Acking, Kind::PerRequest] {
            let (traffic, stop, close, ids) =
                (traffic.clone(), stop.clone(), close.clone(), ids.clone());
            let mut stream = (kind != Kind::PerRequest).then(|| connect(addr));
            threads.push(std::thread::spawn(move || {
                let result = match (kind, stream.as_mut()) {
                    (Kind::Silent, Some(s)) => silent_sender(s, &ids, &traffic, &stop),
                    (Kind::Acking, Some(s)) => acking_sender(s, &ids, &traffic, &stop),
                    _ => per_request_sender(addr, &ids, &traffic, &stop),
                };
                let (state, changed) = &*traffic;
                let mut t = lock(state);
                if let Err(e) = result {
                    t.failure.get_or_insert(e);
                }
                t.stopped += 1;
                drop(t);
                changed.notify_all();
                // The socket stays open until the test is done: ackgate must not see it close.
                while !close.load(Ordering::Acquire) {
                    std::thread::park();
                }
                if let Some(stream) = stream {
                    if let Err(e) = still_open(&stream) {
                        lock(state).failure.get_or_insert(format!("{kind:?}: {e}"));
                    }
                }
            }));
        }
        Load {
            traffic,
            stop,
            close,
            threads,
        }
    }

    /// Wait until at least `n` more acks than `since` arrived (or a sender failed).
    fn wait_acks(&self, since: u64, n: u64) {
        let (state, changed) = &*self.traffic;
        let (guard, held) = wait_for_condition(state, changed, WAIT, |t| {
            t.acks >= since + n || t.failure.is_some()
        });
        assert!(held, "no {n} acks after #{since} within {WAIT:?}");
        assert_eq!(guard.failure, None, "a sender failed");
    }

    fn acks(&self) -> u64 {
        lock(&self.traffic.0).acks
    }

    /// Connections the per-request sender opened.
    fn connections(&self) -> u64 {
        lock(&self.traffic.0).connections
    }

    /// Stop sending (the sockets stay open until `close`); every event handed over.
    fn pause(&self) -> HashSet<u64> {
        self.stop.store(true, Ordering::Release);
        let (state, changed) = &*self.traffic;
        let (t, held) = wait_for_condition(state, changed, WAIT, |t| t.stopped == 3);
        assert!(
            held,
            "the senders did not finish their request within {WAIT:?}"
        );
        assert_eq!(t.failure, None, "a sender failed");
        t.written.union(&t.acked).copied().collect()
    }

    /// Close the sockets; each persistent one must still have been open (no FIN or RST from
    /// ackgate waiting in it).
    fn close(self) {
        self.stop.store(true, Ordering::Release);
        self.close.store(true, Ordering::Release);
        for thread in self.threads {
            thread.thread().unpark();
            thread.join().expect("sender thread");
        }
        assert_eq!(lock(&self.traffic.0).failure, None, "a sender failed");
    }
}

const EVENTS_PER_REQUEST: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// One connection, fluentd v0.10 requests, never reads.
    Silent,
    /// One connection, v0.12 requests with a chunk id, every ack awaited.
    Acking,
    /// fluentd v0.10: a connection per request, written and closed.
    PerRequest,
}

fn per_request_sender(
    addr: SocketAddr,
    ids: &Ids,
    traffic: &(Mutex<Traffic>, Condvar),
    stop: &AtomicBool,
) -> Result<(), String> {
    let write = |entries: &[u8]| {
        let mut stream = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
        lock(&traffic.0).connections += 1;
        for part in legacy_request_parts("reload.v010", entries) {
            stream
                .write_all(&part)
                .map_err(|e| format!("the per-request sender's write failed: {e}"))?;
        }
        Ok(())
    };
    no_ack_sender(ids, traffic, stop, Duration::from_millis(5), write)
}

fn silent_sender(
    stream: &mut TcpStream,
    ids: &Ids,
    traffic: &(Mutex<Traffic>, Condvar),
    stop: &AtomicBool,
) -> Result<(), String> {
    let write = |entries: &[u8]| {
        stream
            .write_all(&legacy_request("reload.silent", entries))
            .map_err(|e| format!("the persistent sender's write failed: {e}"))
    };
    no_ack_sender(ids, traffic, stop, Duration::from_millis(2), write)
}

/// Write requests with `write` until `stop`, `pause` apart (a load rate, not a
/// synchronisation); an event counts as written once its request's write returned.
fn no_ack_sender(
    ids: &Ids,
    traffic: &(Mutex<Traffic>, Condvar),
    stop: &AtomicBool,
    pause: Duration,
    mut write: impl FnMut(&[u8]) -> Result<(), String>,
) -> Result<(), String> {
    while !stop.load(Ordering::Acquire) {
        let batch = ids.take(EVENTS_PER_REQUEST);
        let entries: Vec<u8> = batch.iter().flat_map(|&id| event(id, 40)).collect();
        write(&entries)?;
        lock(&traffic.0).written.extend(batch);
        traffic.1.notify_all();
        std::thread::sleep(pause);
    }
    Ok(())
}

fn acking_sender(
    stream: &mut TcpStream,
    ids: &Ids,
    traffic: &(Mutex<Traffic>, Condvar),
    stop: &AtomicBool,
) -> Result<(), String> {
    let mut n = 0u64;
    while !stop.load(Ordering::Acquire) {
        n += 1;
        let batch = ids.take(EVENTS_PER_REQUEST);
        let entries: Vec<u8> = batch.iter().flat_map(|&id| event(id, 40)).collect();
        let chunk = v012_chunk_id(n);
        stream
            .write_all(&ack_request("reload.acked", &entries, &chunk))
            .map_err(|e| format!("the acking sender's write #{n} failed: {e}"))?;
        let ack = read_value(stream, WAIT).map_err(|e| format!("ack #{n}: {e}"))?;
        if ack != expected_ack(&chunk) {
            return Err(format!("ack #{n} is {} instead of its own", hex(&ack)));
        }
        let mut t = lock(&traffic.0);
        t.acked.extend(batch);
        t.acks += 1;
        drop(t);
        traffic.1.notify_all();
    }
    Ok(())
}

/// Nothing from ackgate waits in `stream`: no FIN (a read of 0), no RST (an error), no bytes.
fn still_open(stream: &TcpStream) -> Result<(), String> {
    stream.set_nonblocking(true).map_err(|e| e.to_string())?;
    match (&*stream).read(&mut [0u8; 1]) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
        Ok(0) => Err("ackgate closed the connection".into()),
        Ok(_) => Err("unexpected bytes from ackgate".into()),
        Err(e) => Err(format!("the connection failed: {e}")),
    }
}

/// One whole msgpack value from `stream`.
fn read_value(stream: &mut TcpStream, wait: Duration) -> Result<Vec<u8>, String> {
    stream
        .set_read_timeout(Some(wait))
        .map_err(|e| e.to_string())?;
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        if let Ok(Some(n)) = value_len(&got, 64) {
            got.truncate(n);
            return Ok(got);
        }
        match stream.read(&mut buf) {
            Ok(0) => return Err("closed by ackgate".into()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return Err(e.to_string()),
        }
    }
}

#[test]
fn sighup_adds_and_removes_nodes_under_load_without_a_lost_event_or_a_closed_connection() {
    let signal = RequestSignal::new();
    let keep = Aggregator::builder().signalling(&signal).start();
    // Reads and records, never acks: whatever it is sent is in flight when it is removed.
    let old = Aggregator::builder()
        .behaviour(Behaviour::NeverAck)
        .signalling(&signal)
        .start();
    let new = Aggregator::builder().signalling(&signal).start();
    let (gate, admin) = start_with_admin(
        Ackgate::builder()
            .node("keep", keep.addr())
            .node("old", old.addr()),
    );
    let load = Load::start(gate.addr());
    old.wait_until("chunks in flight to the node to be removed", WAIT, |r| {
        r.len() >= 3
    });
    load.wait_acks(0, 20);

    rewrite(&gate, |root| {
        set_nodes(root, &[("keep", keep.addr()), ("new", new.addr())])
    });
    let mark = gate.log_mark();
    let acks_before = load.acks();
    send_signal(gate.pid(), libc::SIGHUP);
    let line = gate.wait_for_log_since(mark, &["config reloaded"], WAIT);
    assert!(
        line.contains("upstream.nodes: added new") && line.contains("upstream.nodes: removed old"),
        "{line}"
    );
    // The removed node had shutdown_grace for its acks (it never acks): then its chunks went
    // back to the queue at once, for keep and new.
    gate.wait_for_log_since(mark, &["removed upstream node", "node=old"], WAIT);
    new.wait_until("records at the added node", WAIT, |r| r.len() >= 3);
    load.wait_acks(acks_before, 50);

    let handed_over = load.pause();
    let arrived = || {
        let (a, b) = (keep.seen().snapshot(), new.seen().snapshot());
        a.counts
            .keys()
            .chain(b.counts.keys())
            .copied()
            .collect::<HashSet<u64>>()
    };
    signal.wait_until(
        "every event at keep or new",
        WAIT,
        || handed_over.is_subset(&arrived()),
        || {
            let arrived = arrived();
            let missing: Vec<_> = handed_over.difference(&arrived).take(10).collect();
            format!(
                "{} of {} missing, e.g. {missing:?}",
                handed_over.len() - handed_over.intersection(&arrived).count(),
                handed_over.len()
            )
        },
    );
    // What the removed node had in flight arrived through the others, same chunk ids.
    let delivered: HashSet<String> = keep
        .acked_ids()
        .into_keys()
        .chain(new.acked_ids().into_keys())
        .collect();
    let stranded: Vec<String> = old
        .chunk_ids_seen()
        .into_iter()
        .filter(|id| !delivered.contains(id))
        .collect();
    assert!(!old.chunk_ids_seen().is_empty());
    assert!(
        stranded.is_empty(),
        "chunks sent to the removed node never acked elsewhere: {stranded:?}"
    );
    // The persistent senders' connections are the ones they opened, still open in ackgate
    // (the per-request sender's are all done: their events arrived).
    let metrics = wait_metric(admin, "ackgate_connections_open", WAIT, |v| v == Some(2.0));
    assert_eq!(
        metric_exact(&metrics, "ackgate_connections_total"),
        Some(2.0 + load.connections() as f64),
        "ackgate saw a connection no sender opened: a persistent one reconnected"
    );
    assert_eq!(
        keep.connections(),
        1,
        "the node that stayed kept its upstream connection"
    );
    assert_eq!(
        metric_exact(&metrics, "ackgate_reloads_total{result=\"ok\"}"),
        Some(1.0)
    );
    load.close();
}

#[test]
fn ackgate_reload_with_a_file_that_does_not_validate_changes_nothing() {
    let signal = RequestSignal::new();
    let first = Aggregator::builder().signalling(&signal).start();
    let second = Aggregator::builder().signalling(&signal).start();
    let (gate, _admin) = start_with_admin(Ackgate::builder().node("first", first.addr()));
    let config = gate.config_path().to_path_buf();
    // A valid change (a second node) beside an invalid one.
    rewrite(&gate, |root| {
        set_nodes(root, &[("first", first.addr()), ("second", second.addr())]);
        table(root, "upstream").insert("window".into(), 0.into());
    });
    let mark = gate.log_mark();
    let refused = config_cmd("reload", &config, &[]);
    assert_eq!(refused.status.code(), Some(1), "refused: exit 1");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("upstream.window") && stderr.contains("nothing was changed"),
        "{stderr}"
    );
    gate.wait_for_log_since(mark, &["config reload refused", "upstream.window"], WAIT);
    // Still the old config, still relaying: events go to the first node only.
    let events = send_acked_requests(gate.addr(), "reload.broken", 4, 5, 1, WAIT);
    first.wait_for_all(&events, WAIT);
    assert_eq!(
        second.connections(),
        0,
        "the refused file's node was started"
    );
    let status = config_cmd("status", &config, &[]);
    assert_eq!(
        status.status.code(),
        Some(1),
        "a refused reload needs attention"
    );
    let screen = String::from_utf8_lossy(&status.stdout);
    assert!(
        screen.contains("REFUSED") && screen.contains("upstream.window"),
        "{screen}"
    );

    rewrite(&gate, |root| {
        table(root, "upstream").insert("window".into(), 8.into());
    });
    let applied = config_cmd("reload", &config, &[]);
    assert_eq!(applied.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&applied.stdout);
    assert!(
        stdout.contains("upstream.nodes: added second") && stdout.contains("upstream.window"),
        "{stdout}"
    );
    let events = send_acked_requests(gate.addr(), "reload.fixed", 40, 5, 100, WAIT);
    signal.wait_until(
        "every event at first or second",
        WAIT,
        || {
            let mut all = first.events();
            all.extend(second.events());
            events.iter().all(|e| all.contains(e))
        },
        || {
            format!(
                "first {} second {}",
                first.event_count(),
                second.event_count()
            )
        },
    );
    assert!(second.event_count() > 0, "the added node takes its share");
    assert_eq!(config_cmd("status", &config, &[]).status.code(), Some(0));
}

#[test]
fn a_restart_only_key_is_refused_with_the_reason_and_changes_nothing() {
    let agg = Aggregator::start();
    let (gate, admin) = start_with_admin(Ackgate::builder().node("agg", agg.addr()));
    let max_bytes = |admin| -> u64 {
        let (_, body) = http(admin, "GET", "/api/status");
        let status: serde_json::Value = serde_json::from_str(&body).expect("status JSON");
        status["spool"]["max_bytes"].as_u64().expect("max_bytes")
    };
    let before = max_bytes(admin);
    rewrite(&gate, |root| {
        table(root, "ingress").insert("listen".into(), "127.0.0.1:1".into());
        table(root, "spool").insert("max_bytes".into(), "512MiB".into());
    });
    let (code, body) = http(admin, "POST", "/api/reload");
    assert_eq!(code, 409, "{body}");
    assert!(
        body.contains("ingress.listen")
            && body.contains("needs a restart")
            && body.contains("bound at start"),
        "{body}"
    );
    assert_eq!(
        max_bytes(admin),
        before,
        "the valid key beside it was applied"
    );

    rewrite(&gate, |root| {
        let listen = gate.addr().to_string();
        table(root, "ingress").insert("listen".into(), listen.into());
    });
    let (code, body) = http(admin, "POST", "/api/reload");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("spool.max_bytes"), "{body}");
    assert_eq!(max_bytes(admin), 512 << 20);
    let metrics = http(admin, "GET", "/metrics").1;
    assert_eq!(
        metric_exact(
            &metrics,
            "ackgate_reloads_total{result=\"restart_required\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric_exact(&metrics, "ackgate_reloads_total{result=\"ok\"}"),
        Some(1.0)
    );
    let events = send_acked_requests(gate.addr(), "reload.restart", 3, 2, 1, WAIT);
    agg.wait_for_all(&events, WAIT);
}

/// A TLS client trusting `cas`, on its own runtime so that a connection outlives each step.
struct TlsClient {
    rt: tokio::runtime::Runtime,
    config: Arc<rustls::ClientConfig>,
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

impl TlsClient {
    fn new(cas: &[&Path]) -> TlsClient {
        let mut roots = rustls::RootCertStore::empty();
        for ca in cas {
            for cert in CertificateDer::pem_file_iter(ca).expect("read CA") {
                roots.add(cert.expect("CA PEM")).expect("add CA");
            }
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("client runtime");
        TlsClient {
            rt,
            config: Arc::new(config),
        }
    }

    fn connect(&self, addr: SocketAddr) -> Tls {
        self.rt.block_on(async {
            let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let connector = tokio_rustls::TlsConnector::from(self.config.clone());
            let name = ServerName::try_from("localhost").expect("server name");
            tokio::time::timeout(WAIT, connector.connect(name, tcp))
                .await
                .expect("TLS handshake in time")
                .expect("TLS handshake")
        })
    }

    /// One acked request on `tls`; panics without its ack.
    fn send_acked(&self, tls: &mut Tls, entries: &[u8], n: u64) {
        let chunk = v012_chunk_id(n);
        self.rt.block_on(async {
            tls.write_all(&ack_request("reload.tls", entries, &chunk))
                .await
                .expect("write over TLS");
            let mut got = Vec::new();
            let mut buf = [0u8; 256];
            let ack = tokio::time::timeout(WAIT, async {
                loop {
                    if let Ok(Some(len)) = value_len(&got, 64) {
                        return got[..len].to_vec();
                    }
                    let read = tls.read(&mut buf).await.expect("read over TLS");
                    assert!(read > 0, "ackgate closed the TLS connection");
                    got.extend_from_slice(&buf[..read]);
                }
            })
            .await
            .expect("ack in time");
            assert_eq!(hex(&ack), hex(&expected_ack(&chunk)), "ack #{n}");
        });
    }
}

fn leaf(tls: &Tls) -> Vec<u8> {
    tls.get_ref().1.peer_certificates().expect("a certificate")[0].to_vec()
}

fn pem_leaf(path: &Path) -> Vec<u8> {
    CertificateDer::pem_file_iter(path)
        .expect("read cert")
        .next()
        .expect("one certificate")
        .expect("PEM")
        .to_vec()
}

#[test]
fn rewritten_certificate_files_are_read_again_and_open_tls_connections_keep_working() {
    let (one, two) = (
        Pki::generate("reload CA one"),
        Pki::generate("reload CA two"),
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let (cert, key) = (dir.path().join("server.pem"), dir.path().join("server.key"));
    std::fs::copy(&one.server_cert, &cert).expect("copy cert");
    std::fs::copy(&one.server_key, &key).expect("copy key");
    let agg = Aggregator::start();
    let (gate, _admin) = start_with_admin(Ackgate::builder().node("agg", agg.addr()).section(
        "ingress",
        &format!(
            "tls = {{ cert = {}, key = {} }}",
            toml_path(&cert),
            toml_path(&key)
        ),
    ));
    let client = TlsClient::new(&[&one.ca, &two.ca]);
    let mut before = client.connect(gate.addr());
    assert_eq!(leaf(&before), pem_leaf(&one.server_cert));
    let first = event(1, 10);
    client.send_acked(&mut before, &first, 1);

    // Rotated in place: the same paths, new files.
    std::fs::copy(&two.server_cert, &cert).expect("rotate cert");
    std::fs::copy(&two.server_key, &key).expect("rotate key");
    let reloaded = config_cmd("reload", gate.config_path(), &[]);
    assert_eq!(reloaded.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&reloaded.stdout).contains("nothing changed"),
        "no key changed; the files were read again"
    );
    let mut after = client.connect(gate.addr());
    assert_eq!(
        leaf(&after),
        pem_leaf(&two.server_cert),
        "a new connection gets the new certificate"
    );
    let (second, third) = (event(2, 10), event(3, 10));
    client.send_acked(&mut before, &second, 2);
    client.send_acked(&mut after, &third, 3);
    assert_eq!(
        leaf(&before),
        pem_leaf(&one.server_cert),
        "the open session is the one it had"
    );
    agg.wait_for_all(&[first, second, third], WAIT);
}

/// A connection that sends nothing: ackgate logs it at debug level when it ends.
fn tcp_heartbeat(gate: &Ackgate, admin: SocketAddr, total: f64) {
    drop(connect(gate.addr()));
    wait_metric(admin, "ackgate_connections_total", WAIT, |v| {
        v == Some(total)
    });
    // The debug line is written before the gauge drops: it is in the pipe once this holds.
    wait_metric(admin, "ackgate_connections_open", WAIT, |v| v == Some(0.0));
}

/// POST /api/reload; the log mark right after its line.
fn reload_via_api(gate: &Ackgate, admin: SocketAddr) -> usize {
    let mark = gate.log_mark();
    let (code, body) = http(admin, "POST", "/api/reload");
    assert_eq!(code, 200, "{body}");
    gate.wait_for_log_since(mark, &["config reloaded"], WAIT);
    gate.log_mark()
}

const DEBUG_LINE: &str = "connection closed without data";

#[test]
fn a_new_log_level_takes_effect_without_a_restart() {
    let agg = Aggregator::start();
    let (gate, admin) = start_with_admin(Ackgate::builder().node("agg", agg.addr()));
    let set_level = |level: &str| {
        rewrite(&gate, |root| {
            table(root, "log").insert("level".into(), level.into());
        })
    };
    tcp_heartbeat(&gate, admin, 1.0);
    // A later line in the same pipe: everything written before it was collected.
    reload_via_api(&gate, admin);
    assert!(
        gate.log_lines_with(&[DEBUG_LINE]).is_empty(),
        "debug line at level info"
    );

    set_level("info,ackgate=debug");
    let debug_from = reload_via_api(&gate, admin);
    tcp_heartbeat(&gate, admin, 2.0);
    gate.wait_for_log_since(debug_from, &[DEBUG_LINE], WAIT);

    set_level("info");
    let info_from = reload_via_api(&gate, admin);
    tcp_heartbeat(&gate, admin, 3.0);
    reload_via_api(&gate, admin);
    let after: Vec<String> = gate.log().all()[info_from..]
        .iter()
        .filter(|l| l.contains(DEBUG_LINE))
        .cloned()
        .collect();
    assert!(
        after.is_empty(),
        "debug lines after the level went back to info: {after:?}"
    );
    let events = send_acked_requests(gate.addr(), "reload.log", 2, 2, 1, WAIT);
    agg.wait_for_all(&events, WAIT);
}

#[test]
fn an_open_connection_reads_its_next_request_against_the_reloaded_limits() {
    let agg = Aggregator::start();
    let (gate, admin) = start_with_admin(Ackgate::builder().node("agg", agg.addr()));
    let mut stream = connect(gate.addr());
    let events: Vec<Vec<u8>> = (0..40).map(|id| event(id, 100)).collect();
    let large = events.concat();
    assert!(large.len() > 4096);
    send_acked_on(&mut stream, "reload.limits", &large, 1, WAIT);

    rewrite(&gate, |root| {
        table(root, "ingress").insert("max_frame_bytes".into(), "4KiB".into());
    });
    let (code, body) = http(admin, "POST", "/api/reload");
    assert_eq!(code, 200, "{body}");
    // The same connection, kept through the reload: a small request is still acked, and the
    // next large one is read against the new limit.
    let small = event(100, 10);
    send_acked_on(&mut stream, "reload.limits", &small, 2, WAIT);
    let mark = gate.log_mark();
    stream
        .write_all(&ack_request("reload.limits", &large, &v012_chunk_id(3)))
        .expect("write");
    expect_closed(&mut stream, WAIT);
    gate.wait_for_log_since(mark, &["closing connection: invalid request", "4096"], WAIT);
    let mut expected = events;
    expected.push(small);
    agg.wait_for_all(&expected, WAIT);
    assert_eq!(agg.event_count(), 41, "the refused request reached nobody");
}
