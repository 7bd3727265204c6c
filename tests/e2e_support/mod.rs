//! Support for the end-to-end tests that need more than `common` offers (`common` is owned
//! elsewhere and used as is): an aggregator that keeps every request's raw bytes and decides
//! per request whether to ack it, the HTTP side of `[metrics]`, `ackgate spool` runs, TLS
//! certificates, and the client half of the shared-key handshake.
//!
//! Include it next to `common`:
//! ```ignore
//! mod common;
//! #[path = "e2e_support/mod.rs"]
//! mod e2e_support;
//! ```
//! Every wait has a deadline and is woken by an event (a request read, a log line); the one
//! exception is `/metrics`, which has no change notification and is scraped in a short bounded
//! poll. On timeout a wait panics with what it saw.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use ackgate::forward::ack::encode_ack;
use ackgate::forward::msgpack::{read_header, value_len, Header};
use ackgate::forward::Mode;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use crate::common::{
    ackgate_command, hex, lock, mp_str, raw_string, wait_for_condition, Ackgate, AckgateBuilder,
    UpstreamReader, DEPTH,
};

// ------------------------------------------------------------------------------------------------
// msgpack reading

/// The elements of the complete msgpack array `raw` (each as its own bytes).
pub fn array_elements(raw: &[u8]) -> Vec<&[u8]> {
    let Some(Header::Array { offset, count }) = read_header(raw) else {
        panic!("not a msgpack array: {}", hex(&raw[..raw.len().min(16)]));
    };
    let mut pos = offset;
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let len = value_len(&raw[pos..], DEPTH)
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("array element {i} incomplete: {}", hex(raw)));
        out.push(&raw[pos..pos + len]);
        pos += len;
    }
    out
}

/// `(key content, raw value)` pairs of the complete msgpack map `raw`.
pub fn map_entries(raw: &[u8]) -> Vec<(Vec<u8>, &[u8])> {
    let Some(Header::Map { offset, count }) = read_header(raw) else {
        panic!("not a msgpack map: {}", hex(raw));
    };
    let mut pos = offset;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let klen = value_len(&raw[pos..], DEPTH)
            .ok()
            .flatten()
            .expect("map key");
        let key = byte_content(&raw[pos..pos + klen])
            .unwrap_or_else(|| panic!("map key is not str/bin: {}", hex(raw)))
            .to_vec();
        pos += klen;
        let vlen = value_len(&raw[pos..], DEPTH)
            .ok()
            .flatten()
            .expect("map value");
        out.push((key, &raw[pos..pos + vlen]));
        pos += vlen;
    }
    out
}

/// Content of a complete msgpack str or bin value.
pub fn byte_content(value: &[u8]) -> Option<&[u8]> {
    match read_header(value)? {
        Header::Str { offset, len } | Header::Bin { offset, len } => {
            value.get(offset..offset + len)
        }
        _ => None,
    }
}

/// The whole msgpack values at the front of `buf`, and how many bytes they took.
pub fn complete_values(buf: &[u8]) -> (Vec<Vec<u8>>, usize) {
    let mut pos = 0;
    let mut out = Vec::new();
    while let Ok(Some(n)) = value_len(&buf[pos..], DEPTH) {
        out.push(buf[pos..pos + n].to_vec());
        pos += n;
    }
    (out, pos)
}

/// Read from `stream` until `count` whole msgpack values arrived. Returns them, or what was
/// read before EOF / an error / the deadline as `Err`.
pub fn read_msgpack_values(
    stream: &mut impl Read,
    count: usize,
    deadline: Instant,
) -> Result<Vec<Vec<u8>>, Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let (values, _) = complete_values(&buf);
        if values.len() >= count {
            return Ok(values);
        }
        if Instant::now() >= deadline {
            return Err(buf);
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Err(buf),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return Err(buf),
        }
    }
}

// ------------------------------------------------------------------------------------------------
// An aggregator that keeps raw requests and acks by policy

/// One request the [`RawAggregator`] read.
#[derive(Debug, Clone)]
pub struct RawRequest {
    /// Accepted connection it came on (1-based, across restarts).
    pub conn: u64,
    /// The request exactly as it arrived.
    pub raw: Vec<u8>,
    pub mode: Mode,
    pub tag: Vec<u8>,
    /// Concatenated `[time, record]` entries, inflated if the request was compressed.
    pub entries: Vec<u8>,
    pub events: u32,
    /// Content of the `chunk` option.
    pub chunk: Option<String>,
    /// Whether it was answered with an ack.
    pub acked: bool,
}

impl RawRequest {
    /// The option map's pairs (empty when there is none).
    pub fn options(&self) -> Vec<(String, Vec<u8>)> {
        let elements = array_elements(&self.raw);
        match elements.get(2) {
            Some(map) if matches!(read_header(map), Some(Header::Map { .. })) => map_entries(map)
                .into_iter()
                .map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), v.to_vec()))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The raw msgpack value of option `key`.
    pub fn option(&self, key: &str) -> Option<Vec<u8>> {
        self.options()
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }
}

/// Decides whether a request gets its ack.
pub type AckPolicy = Arc<dyn Fn(&RawRequest) -> bool + Send + Sync>;

/// Woken whenever any of the aggregators sharing it reads a request, so a test can wait on a
/// condition over several of them.
#[derive(Default)]
pub struct Signal {
    generation: Mutex<u64>,
    changed: Condvar,
}

impl Signal {
    pub fn new() -> Arc<Signal> {
        Arc::new(Signal::default())
    }

    fn notify(&self) {
        *lock(&self.generation) += 1;
        self.changed.notify_all();
    }

    /// Wait until `cond` holds (checked after every request any aggregator reads); panics
    /// with `describe()` on timeout.
    pub fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        cond: impl Fn() -> bool,
        describe: impl Fn() -> String,
    ) {
        let deadline = Instant::now() + timeout;
        let mut generation = lock(&self.generation);
        loop {
            let seen = *generation;
            drop(generation);
            if cond() {
                return;
            }
            generation = lock(&self.generation);
            if *generation != seen {
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what}; {}",
                    describe()
                );
            }
            generation = self
                .changed
                .wait_timeout(generation, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

struct RawShared {
    requests: Mutex<Vec<RawRequest>>,
    connections: Mutex<u64>,
    changed: Condvar,
    policy: Mutex<AckPolicy>,
    signal: Option<Arc<Signal>>,
}

/// A Forward aggregator on 127.0.0.1 that records every request's raw bytes and acks the ones
/// its policy accepts; the others are read and silently left unanswered (like fluentd's
/// `chunk_size_limit`). Runs on its own tokio runtime; can stop and listen again on its port.
pub struct RawAggregator {
    shared: Arc<RawShared>,
    runtime: Option<tokio::runtime::Runtime>,
    addr: SocketAddr,
    stop: Option<(CancellationToken, tokio_util::task::TaskTracker)>,
}

impl RawAggregator {
    /// Ack every request that carries a chunk.
    pub fn start() -> RawAggregator {
        RawAggregator::start_with(Arc::new(|_| true))
    }

    pub fn start_with(policy: AckPolicy) -> RawAggregator {
        RawAggregator::start_full(policy, None)
    }

    /// Ack everything, and wake `signal` on every request.
    pub fn start_signalling(signal: &Arc<Signal>) -> RawAggregator {
        RawAggregator::start_full(Arc::new(|_| true), Some(signal.clone()))
    }

    fn start_full(policy: AckPolicy, signal: Option<Arc<Signal>>) -> RawAggregator {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("raw aggregator runtime");
        let shared = Arc::new(RawShared {
            requests: Mutex::new(Vec::new()),
            connections: Mutex::new(0),
            changed: Condvar::new(),
            policy: Mutex::new(policy),
            signal,
        });
        let mut agg = RawAggregator {
            shared,
            runtime: Some(runtime),
            addr: "127.0.0.1:0".parse().expect("addr"),
            stop: None,
        };
        agg.listen(0);
        agg
    }

    fn listen(&mut self, port: u16) {
        let rt = self.runtime.as_ref().expect("runtime");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("raw aggregator cannot bind {addr}: {e}"));
        self.addr = listener.local_addr().expect("local addr");
        let stop = CancellationToken::new();
        let tracker = tokio_util::task::TaskTracker::new();
        let shared = self.shared.clone();
        let (s, t) = (stop.clone(), tracker.clone());
        tracker.spawn_on(
            async move {
                loop {
                    let accepted = tokio::select! {
                        a = listener.accept() => a,
                        _ = s.cancelled() => return,
                    };
                    let Ok((stream, _)) = accepted else { continue };
                    let conn = {
                        let mut n = lock(&shared.connections);
                        *n += 1;
                        *n
                    };
                    shared.changed.notify_all();
                    t.spawn(serve_raw(stream, conn, shared.clone(), s.clone()));
                }
            },
            rt.handle(),
        );
        self.stop = Some((stop, tracker));
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn set_policy(&self, policy: AckPolicy) {
        *lock(&self.shared.policy) = policy;
    }

    /// Close the listener and reset every connection; wait until they are gone.
    pub fn stop(&mut self) {
        if let Some((stop, tracker)) = self.stop.take() {
            stop.cancel();
            tracker.close();
            let rt = self.runtime.as_ref().expect("runtime");
            rt.block_on(tracker.wait());
        }
    }

    /// Listen again on the same port, keeping what was recorded.
    pub fn restart(&mut self) {
        self.stop();
        let port = self.addr.port();
        self.listen(port);
    }

    pub fn requests(&self) -> Vec<RawRequest> {
        lock(&self.shared.requests).clone()
    }

    /// Every event received (acked or not, duplicates included), as raw entries.
    pub fn events(&self) -> Vec<Vec<u8>> {
        self.requests()
            .iter()
            .flat_map(|r| crate::common::split_entries(&r.entries))
            .collect()
    }

    /// Events received, duplicates included.
    pub fn event_count(&self) -> usize {
        lock(&self.shared.requests)
            .iter()
            .map(|r| r.events as usize)
            .sum()
    }

    pub fn connections(&self) -> u64 {
        *lock(&self.shared.connections)
    }

    /// Wait until `cond` holds over the requests so far; panics with a summary on timeout.
    pub fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        cond: impl Fn(&[RawRequest]) -> bool,
    ) -> Vec<RawRequest> {
        let (requests, held) =
            wait_for_condition(&self.shared.requests, &self.shared.changed, timeout, |r| {
                cond(r)
            });
        if !held {
            let acked = requests.iter().filter(|r| r.acked).count();
            let sizes: Vec<usize> = requests.iter().map(|r| r.raw.len()).collect();
            panic!(
                "raw aggregator: timed out after {timeout:?} waiting for {what}; {} requests ({acked} acked), sizes {sizes:?}",
                requests.len()
            );
        }
        requests.clone()
    }
}

impl Drop for RawAggregator {
    fn drop(&mut self) {
        if let Some((stop, _)) = self.stop.take() {
            stop.cancel();
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

async fn serve_raw(
    mut stream: tokio::net::TcpStream,
    conn: u64,
    shared: Arc<RawShared>,
    stop: CancellationToken,
) {
    let mut reader = UpstreamReader::default();
    loop {
        let requests = match reader.next_requests(&mut stream, &stop).await {
            Ok(Some(requests)) => requests,
            Ok(None) => return,
            Err(e) => panic!("raw aggregator conn {conn}: {e}"),
        };
        for (raw, frame) in requests {
            let chunk_raw = frame.chunk.as_ref().map(|c| c.to_vec());
            let mut request = RawRequest {
                conn,
                raw,
                mode: frame.mode,
                tag: frame.tag.to_vec(),
                entries: frame.entries.to_vec(),
                events: frame.events,
                chunk: chunk_raw.as_deref().and_then(raw_string),
                acked: false,
            };
            let policy = lock(&shared.policy).clone();
            request.acked = chunk_raw.is_some() && policy(&request);
            lock(&shared.requests).push(request.clone());
            shared.changed.notify_all();
            if let Some(signal) = &shared.signal {
                signal.notify();
            }
            if let (true, Some(chunk)) = (request.acked, chunk_raw) {
                let mut ack = Vec::new();
                encode_ack(&chunk, &mut ack);
                if stream.write_all(&ack).await.is_err() {
                    return;
                }
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// [metrics] over HTTP

/// The metrics address from the `metrics listening listen=IP:PORT` log line (needed when the
/// config says port 0).
pub fn metrics_addr(gate: &Ackgate) -> SocketAddr {
    let line = gate.wait_for_log("metrics listening", Duration::from_secs(10));
    let start = line.find("listen=").expect("listen= in the metrics line") + "listen=".len();
    let rest = &line[start..];
    let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
    rest[..end]
        .parse()
        .unwrap_or_else(|e| panic!("cannot parse metrics address in {line:?}: {e}"))
}

/// One HTTP/1.1 request; returns the status code and the body.
pub fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to metrics {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .expect("write http request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .unwrap_or_else(|e| panic!("{method} {path}: read response: {e}"));
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{method} {path}: no status line in {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The value of the sample `key` (name plus labels exactly as rendered, e.g.
/// `ackgate_events_out_total{node="agg"}`) in Prometheus text.
pub fn metric(text: &str, key: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == key).then(|| value.parse().ok()).flatten()
    })
}

/// Scrape `/metrics` until `cond` holds for the value of `key`; returns the last scrape.
pub fn wait_metric(
    addr: SocketAddr,
    key: &str,
    timeout: Duration,
    cond: impl Fn(Option<f64>) -> bool,
) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let (status, text) = http(addr, "GET", "/metrics");
        assert_eq!(status, 200, "/metrics status");
        if cond(metric(&text, key)) {
            return text;
        }
        if Instant::now() >= deadline {
            panic!(
                "{key} never satisfied the condition within {timeout:?} (last {:?}); metrics:\n{text}",
                metric(&text, key)
            );
        }
        // Metrics have no change notification: poll, briefly.
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ------------------------------------------------------------------------------------------------
// Logs

/// Wait until ackgate has logged `n` lines containing every one of `needles`.
pub fn wait_for_log_count(gate: &Ackgate, needles: &[&str], n: usize, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        // Mark first: a line logged after the count below wakes the wait.
        let mark = gate.log_mark();
        if gate.log_lines_with(needles).len() >= n {
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "fewer than {n} log lines with {needles:?} within {timeout:?}; log:\n{}",
            gate.log().dump()
        );
        gate.log()
            .wait_for_from(mark, left, |l| needles.iter().all(|x| l.contains(x)));
    }
}

// ------------------------------------------------------------------------------------------------
// Stopping

/// SIGTERM, and require the graceful exit (status 0) that commits what the spool still holds.
pub fn terminate_cleanly(gate: &mut Ackgate) {
    let status = gate.terminate(Duration::from_secs(20));
    assert!(
        status.success(),
        "ackgate did not shut down gracefully on SIGTERM ({status}); a signal that arrives \
         before ackgate installs its handlers (it does so only after printing its ready line) \
         kills it outright, and uncommitted dead letters and deletes are lost"
    );
}

// ------------------------------------------------------------------------------------------------
// `ackgate spool`

/// `ackgate COMMAND --config CONFIG ARGS…`, echoed to the test's stderr.
pub fn config_cmd(command: &str, config: &Path, args: &[&str]) -> Output {
    let output = ackgate_command([command, "--config"])
        .arg(config)
        .args(args)
        .output()
        .expect("run ackgate");
    eprintln!(
        "[{command} {args:?}] {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// `ackgate spool --config CONFIG ARGS…`, echoed to the test's stderr.
pub fn spool_cmd(config: &Path, args: &[&str]) -> Output {
    config_cmd("spool", config, args)
}

/// ackgate with an admin listener on 127.0.0.1:0, and its config rewritten to name the port
/// it got, so that commands run with `--config` find it. Returns the admin address.
pub fn start_with_admin(builder: AckgateBuilder) -> (Ackgate, SocketAddr) {
    let gate = builder.section("admin", "listen = \"127.0.0.1:0\"").start();
    let admin = metrics_addr(&gate);
    edit_config(
        &gate,
        "listen = \"127.0.0.1:0\"\n\n[ingress]",
        &format!("listen = \"{admin}\"\n\n[ingress]"),
    );
    (gate, admin)
}

/// stdout of a successful `ackgate spool` run.
pub fn spool_ok(config: &Path, args: &[&str]) -> String {
    let output = spool_cmd(config, args);
    assert!(
        output.status.success(),
        "ackgate spool {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8 stdout")
}

/// A number from `ackgate spool stats` output (`records           3`).
pub fn stats_value(stats: &str, name: &str) -> u64 {
    stats
        .lines()
        .find_map(|l| {
            let mut parts = l.split_whitespace();
            (parts.next() == Some(name)).then(|| parts.next()?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no {name} in spool stats:\n{stats}"))
}

// ------------------------------------------------------------------------------------------------
// Config fragments

/// One `[[nodes]]` table for `section("upstream", …)` (which replaces the node list).
pub fn node_toml(name: &str, address: SocketAddr, extra: &str) -> String {
    format!("[[nodes]]\nname = \"{name}\"\naddress = \"{address}\"\n{extra}\n")
}

/// Replace `from` by `to` in a running ackgate's config file (ackgate read it at start; the
/// next start and `ackgate spool` read the new text). Used to pin a port chosen with `:0`.
pub fn edit_config(gate: &Ackgate, from: &str, to: &str) {
    let text = std::fs::read_to_string(gate.config_path()).expect("read config");
    assert!(text.contains(from), "{from:?} not in the config:\n{text}");
    std::fs::write(gate.config_path(), text.replace(from, to)).expect("write config");
}

/// A TOML string literal for a path.
pub fn toml_path(path: &Path) -> String {
    toml::Value::String(path.to_string_lossy().into_owned()).to_string()
}

// ------------------------------------------------------------------------------------------------
// Events of exact sizes

/// One `[uint32 time, {"msg": "xxx…"}]` entry of exactly `len` bytes (len ≥ 48).
pub fn entry_of_len(len: usize, fill: u8) -> Vec<u8> {
    // 0x92, ce + 4, 0x81, a3 "msg", then a str header of 2 (str8) or 3 (str16) bytes.
    let fixed = 1 + 5 + 1 + 4;
    assert!(len >= fixed + 2 + 32, "entry_of_len({len}) too small");
    let body = len - fixed;
    let (header, n) = if body - 2 < 256 {
        (2, body - 2)
    } else {
        (3, body - 3)
    };
    let mut out = vec![0x92, 0xce];
    out.extend_from_slice(&crate::common::TS.to_be_bytes());
    out.push(0x81);
    mp_str(&mut out, b"msg");
    let before = out.len();
    mp_str(&mut out, &vec![fill; n]);
    assert_eq!(out.len() - before, header + n);
    assert_eq!(out.len(), len, "entry_of_len arithmetic");
    out
}

// ------------------------------------------------------------------------------------------------
// TLS material

/// A CA, a server certificate for `localhost` / 127.0.0.1 and a client certificate, all signed
/// by that CA, as PEM files in a temp dir.
pub struct Certs {
    pub dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Certs {
    pub fn generate(ca_name: &str) -> Certs {
        use rcgen::{
            BasicConstraints, CertificateParams, DistinguishedName, DnType,
            ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
        };
        let dir = tempfile::tempdir().expect("cert dir");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, ca_name);
        ca_params.distinguished_name = dn;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_key = KeyPair::generate().expect("ca key");
        let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose, cn: &str| {
            let mut params = CertificateParams::new(names).expect("leaf params");
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, cn);
            params.distinguished_name = dn;
            params.extended_key_usages = vec![usage];
            let key = KeyPair::generate().expect("leaf key");
            let cert = params.signed_by(&key, &issuer).expect("sign leaf");
            (cert.pem(), key.serialize_pem())
        };
        let (server_pem, server_key_pem) = leaf(
            vec!["localhost".into(), "127.0.0.1".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
            "ackgate test server",
        );
        let (client_pem, client_key_pem) = leaf(
            vec!["sender.example".into()],
            ExtendedKeyUsagePurpose::ClientAuth,
            "ackgate test client",
        );
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("write pem");
            path
        };
        Certs {
            ca: write("ca.pem", &ca_cert.pem()),
            server_cert: write("server.pem", &server_pem),
            server_key: write("server.key", &server_key_pem),
            client_cert: write("client.pem", &client_pem),
            client_key: write("client.key", &client_key_pem),
            dir,
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Shared-key handshake, client side, written from PROTOCOL.md §7 (not from ackgate's code)

/// The fields of a HELO, and the msgpack markers they came with.
#[derive(Debug, Clone)]
pub struct HeloSeen {
    pub nonce: Vec<u8>,
    pub nonce_marker: u8,
    pub auth: Vec<u8>,
    pub auth_marker: u8,
    pub keepalive: Option<bool>,
    /// Option keys in the order sent.
    pub keys: Vec<String>,
}

/// Parse `["HELO", {options}]`, panicking with the bytes if it is anything else.
pub fn parse_helo(bytes: &[u8]) -> HeloSeen {
    let elements = array_elements(bytes);
    assert_eq!(
        elements.len(),
        2,
        "HELO is a 2-element array: {}",
        hex(bytes)
    );
    assert_eq!(
        byte_content(elements[0]),
        Some(&b"HELO"[..]),
        "first element: {}",
        hex(bytes)
    );
    let mut seen = HeloSeen {
        nonce: Vec::new(),
        nonce_marker: 0,
        auth: Vec::new(),
        auth_marker: 0,
        keepalive: None,
        keys: Vec::new(),
    };
    for (key, value) in map_entries(elements[1]) {
        let key = String::from_utf8_lossy(&key).into_owned();
        match key.as_str() {
            "nonce" => {
                seen.nonce = byte_content(value).expect("nonce str/bin").to_vec();
                seen.nonce_marker = value[0];
            }
            "auth" => {
                seen.auth = byte_content(value).expect("auth str/bin").to_vec();
                seen.auth_marker = value[0];
            }
            "keepalive" => {
                seen.keepalive = match value {
                    [0xc3] => Some(true),
                    [0xc2] => Some(false),
                    other => panic!("keepalive is not a bool: {}", hex(other)),
                }
            }
            _ => {}
        }
        seen.keys.push(key);
    }
    seen
}

/// `["PING", hostname, salt, digest, username, password_digest]`.
pub fn encode_ping(
    hostname: &str,
    salt: &[u8],
    digest: &str,
    username: &str,
    password_digest: &str,
) -> Vec<u8> {
    let mut out = vec![0x96];
    mp_str(&mut out, b"PING");
    mp_str(&mut out, hostname.as_bytes());
    mp_str(&mut out, salt);
    mp_str(&mut out, digest.as_bytes());
    mp_str(&mut out, username.as_bytes());
    mp_str(&mut out, password_digest.as_bytes());
    out
}

/// Lowercase hex SHA-512 of the concatenation of `parts` (sha2, for tests that do not need an
/// independent implementation).
pub fn sha512_hex(parts: &[&[u8]]) -> String {
    use sha2::Digest;
    let mut hasher = sha2::Sha512::new();
    for part in parts {
        hasher.update(part);
    }
    hex::encode(hasher.finalize())
}

/// SHA-512 of `data` computed by Python's hashlib, as the brief for the handshake test asks
/// (an implementation independent of the crate's). `None` when python3 cannot be run.
pub fn python_sha512_hex(data: &[u8]) -> Option<String> {
    let output = std::process::Command::new("python3")
        .arg("-c")
        .arg("import hashlib,sys; print(hashlib.sha512(bytes.fromhex(sys.argv[1])).hexdigest())")
        .arg(hex::encode(data))
        .output();
    match output {
        Ok(out) if out.status.success() => Some(
            String::from_utf8(out.stdout)
                .expect("utf-8")
                .trim()
                .to_string(),
        ),
        Ok(out) => panic!("python3 failed: {}", String::from_utf8_lossy(&out.stderr)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("cannot run python3: {e}"),
    }
}

/// Complete a shared-key handshake as a fluentd sender would (sha2 digests): read the HELO,
/// send a PING, read the PONG. Returns the PONG's raw bytes.
pub fn client_handshake(
    stream: &mut TcpStream,
    hostname: &str,
    shared_key: &str,
    timeout: Duration,
) -> Vec<u8> {
    stream
        .set_read_timeout(Some(timeout))
        .expect("read timeout");
    let deadline = Instant::now() + timeout;
    let helo = read_msgpack_values(stream, 1, deadline)
        .unwrap_or_else(|got| panic!("no HELO: {}", hex(&got)))
        .remove(0);
    let helo = parse_helo(&helo);
    let salt = b"0123456789abcdef0123456789abcdef";
    let digest = sha512_hex(&[
        salt,
        hostname.as_bytes(),
        &helo.nonce,
        shared_key.as_bytes(),
    ]);
    let pass = sha512_hex(&[&helo.auth, b"", b""]);
    stream
        .write_all(&encode_ping(hostname, salt, &digest, "", &pass))
        .expect("write PING");
    let pong = read_msgpack_values(stream, 1, deadline)
        .unwrap_or_else(|got| panic!("no PONG: {}", hex(&got)))
        .remove(0);
    let fields = array_elements(&pong);
    assert_eq!(
        fields.get(1).copied(),
        Some(&[0xc3][..]),
        "PONG refused: {}",
        hex(&pong)
    );
    pong
}

// ------------------------------------------------------------------------------------------------
// A port where nothing listens

/// A TCP port on 127.0.0.1 that is bound (so no other socket of this or a concurrent test gets
/// it) but not listening, so connects to it are refused: an aggregator that is down. Safer than
/// `free_port`, whose port another test may take before it is used. [`PortHold::release`] frees
/// it for a listener that is about to bind it.
pub struct PortHold {
    socket: Option<socket2::Socket>,
    addr: SocketAddr,
}

impl PortHold {
    pub fn new() -> PortHold {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        socket
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .expect("bind");
        let addr = socket
            .local_addr()
            .expect("local addr")
            .as_socket()
            .expect("inet");
        PortHold {
            socket: Some(socket),
            addr,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Unbind, so a listener can take the port now.
    pub fn release(&mut self) -> u16 {
        self.socket.take();
        self.addr.port()
    }
}
