//! ackgate's admin listener (`[admin]`, or the older `[metrics]`) over plain HTTP/1.1, and the
//! Prometheus text it serves. Two ways to read a metric, named for what they do:
//! [`metric_exact`] takes the value of one sample key exactly as rendered (name plus labels,
//! `ackgate_events_out_total{node="agg"}`), [`metric_sum`] adds a metric up over all its label
//! sets (`ackgate_events_in_total`, whatever its labels). `/metrics` has no change notification:
//! the waits here poll it, briefly and bounded. Also the process figures the fault tests report
//! (resident memory, open descriptors).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::launcher::{parse_addr_after, Ackgate};

/// The admin/metrics address from the `metrics listening listen=IP:PORT` line this incarnation
/// of `gate` printed (the config says port 0).
pub fn metrics_addr(gate: &Ackgate) -> SocketAddr {
    let line = gate.wait_for_log_since(
        gate.start_mark(),
        &["metrics listening", "listen="],
        Duration::from_secs(20),
    );
    parse_addr_after(&line, "listen=")
        .unwrap_or_else(|| panic!("cannot parse the metrics address in {line:?}"))
}

/// One HTTP/1.1 request; the status code and the body, or why there is none.
pub fn try_http(addr: SocketAddr, method: &str, path: &str) -> Result<(u16, String), String> {
    try_http_with(addr, method, path, None)
}

/// One HTTP/1.1 request; the status code and the body. Panics if there is no answer.
pub fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    http_with(addr, method, path, None)
}

/// [`http`] with an optional bearer token.
pub fn http_with(addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    try_http_with(addr, method, path, token).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// [`try_http`] with an optional bearer token.
pub fn try_http_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> Result<(u16, String), String> {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: test\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("write the request: {e}"))?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| format!("read the response: {e}"))?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status line in {response:?}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// The value of the sample `key` (name plus labels exactly as rendered, e.g.
/// `ackgate_events_out_total{node="agg"}`) in Prometheus text.
pub fn metric_exact(text: &str, key: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == key).then(|| value.parse().ok()).flatten()
    })
}

/// The sum of metric `name` over all its label sets in Prometheus text; `None` if it has no
/// sample.
pub fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        let value = rest.rsplit(' ').next()?.parse::<f64>().ok()?;
        found = Some(found.unwrap_or(0.0) + value);
    }
    found
}

/// [`metric_sum`] of `name`, scraped now; `None` if absent or if `/metrics` does not answer.
pub fn scrape_sum(addr: SocketAddr, name: &str) -> Option<f64> {
    let (_, text) = try_http(addr, "GET", "/metrics").ok()?;
    metric_sum(&text, name)
}

/// Scrape `name` (summed over its labels; -1 when absent or unanswered) every 100 ms until
/// `done` holds or `timeout` passes; its last value.
pub fn poll_metric_sum(
    addr: SocketAddr,
    name: &str,
    timeout: Duration,
    done: impl Fn(f64) -> bool,
) -> f64 {
    let deadline = Instant::now() + timeout;
    loop {
        let value = scrape_sum(addr, name).unwrap_or(-1.0);
        if done(value) || Instant::now() >= deadline {
            return value;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Scrape `/metrics` every 50 ms until `cond` holds for the sample `key` ([`metric_exact`]);
/// returns the last scrape. Panics on timeout.
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
        if cond(metric_exact(&text, key)) {
            return text;
        }
        if Instant::now() >= deadline {
            panic!(
                "{key} never satisfied the condition within {timeout:?} (last {:?}); metrics:\n{text}",
                metric_exact(&text, key)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A `kB` field of /proc/PID/status (`VmRSS`, `VmHWM`), in KiB.
fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Resident memory of a process in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    proc_status_kib(pid, "VmRSS")
}

/// Peak resident memory of a process (VmHWM), KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    proc_status_kib(pid, "VmHWM")
}

/// Open file descriptors of a process.
pub fn open_fds(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}
