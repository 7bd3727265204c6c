//! `ackgate status`: one screen on a running relay, from `/api/status`.
//!
//! Exit code for scripts and monitors: 0 healthy, 1 up but something needs attention (a node
//! down, dead letters, the spool over 80 % or its disk full, the last reload refused), 2 not
//! reachable (and then how to enable the admin listener). A config file that does not validate
//! (an edit not reloaded yet) still names the listener through its `[admin]` section.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use crate::admin::client::AdminClient;
use crate::admin::status::{NodeStatus, Status};

/// Exit code: healthy.
pub const HEALTHY: u8 = 0;
/// Exit code: the relay answers, something needs attention.
pub const ATTENTION: u8 = 1;
/// Exit code: the relay cannot be reached.
pub const UNREACHABLE: u8 = 2;

pub async fn run(path: &Path, json: bool) -> ExitCode {
    let status = match AdminClient::for_file(path) {
        (Ok(client), invalid) => {
            if let Some(invalid) = invalid {
                // Not fatal: the relay runs the config it has, and its status says whether a
                // reload of this file was refused.
                eprintln!("warning: {invalid}");
            }
            client.status().await
        }
        // No admin listener to be found in a file that does not validate: as before, the
        // file's error (exit 1, like `ackgate check`).
        (Err(_), Some(invalid)) => {
            eprintln!("error: {invalid}");
            return ExitCode::FAILURE;
        }
        (Err(e), None) => Err(e),
    };
    let status = match status {
        Ok(status) => status,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(UNREACHABLE);
        }
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&status).unwrap_or_default()
        );
    } else {
        print!("{}", render(&status));
    }
    ExitCode::from(if status.healthy { HEALTHY } else { ATTENTION })
}

/// The screen, as text.
pub fn render(status: &Status) -> String {
    let mut out = String::new();
    let verdict = if status.healthy {
        "healthy"
    } else {
        "NEEDS ATTENTION"
    };
    let _ = writeln!(
        out,
        "ackgate {} on {}, up {}: {verdict}",
        status.version,
        status.ingress.listen,
        duration(status.uptime_seconds)
    );
    for line in &status.attention {
        let _ = writeln!(out, "  ! {line}");
    }
    out.push('\n');
    render_spool(status, &mut out);
    render_ingress(status, &mut out);
    render_reload(status, &mut out);
    out.push('\n');
    render_nodes(&status.nodes, &mut out);
    out
}

fn render_spool(status: &Status, out: &mut String) {
    let spool = &status.spool;
    let oldest = spool
        .oldest_record_age_seconds
        .map(|s| format!("oldest {} ago", duration(s)))
        .unwrap_or_else(|| "nothing queued".into());
    let _ = writeln!(
        out,
        "spool    {} records, {} of {} ({:.1} %), {oldest}",
        count(spool.records),
        bytes(spool.bytes),
        bytes(spool.max_bytes),
        spool.used_ratio * 100.0
    );
    let commit = match (
        spool.last_commit_age_seconds,
        spool.last_commit_duration_seconds,
    ) {
        (Some(age), Some(took)) => format!(
            "last commit {} ago ({:.1} ms)",
            duration(age),
            took * 1000.0
        ),
        _ => "no commit since start".into(),
    };
    let disk = match (spool.available, spool.disk_full) {
        (false, _) => "UNAVAILABLE",
        (true, true) => "disk FULL",
        (true, false) => "disk ok",
    };
    let _ = writeln!(
        out,
        "         {commit}, {} dead letter(s) ({}), {disk}",
        count(spool.dead_letters),
        bytes(spool.dead_letter_bytes)
    );
    let q = &status.queue;
    let _ = writeln!(
        out,
        "queue    {} in flight, {} waiting for a retry, {} read ahead",
        q.in_flight, q.waiting_retry, q.buffered
    );
}

fn render_ingress(status: &Status, out: &mut String) {
    let i = &status.ingress;
    let rejected: u64 = i.rejected.iter().map(|r| r.count).sum();
    let reasons: Vec<String> = i
        .rejected
        .iter()
        .map(|r| format!("{} {}", r.reason, r.count))
        .collect();
    let _ = writeln!(
        out,
        "ingress  {} ev/s (10 s {}, 60 s {}), {} connection(s) open, {} requests, {} rejected{}",
        rate(i.events_per_second.last_1s),
        rate(i.events_per_second.last_10s),
        rate(i.events_per_second.last_60s),
        i.connections_open,
        count(i.requests_accepted),
        count(rejected),
        if reasons.is_empty() {
            String::new()
        } else {
            format!(" ({})", reasons.join(", "))
        }
    );
    for d in &i.destinations {
        let _ = writeln!(
            out,
            "         redirected to {}: {} connection(s), {} events in, {} delivered, {} queued ({} records)",
            d.destination,
            count(d.connections),
            count(d.events_accepted),
            count(d.events_delivered),
            bytes(d.queued_bytes),
            count(d.queued_records)
        );
    }
}

/// The last reload: when, how it was asked for, and what it changed or why it was refused.
fn render_reload(status: &Status, out: &mut String) {
    let Some(reload) = &status.reload else {
        return;
    };
    let ago = duration(status.now_ms.saturating_sub(reload.at_ms) as f64 / 1000.0);
    let outcome = match (&reload.error, reload.changed.is_empty()) {
        (Some(error), _) => format!("REFUSED, the config before it runs: {error}"),
        (None, true) => "ok, nothing changed".into(),
        (None, false) => format!("ok, changed {}", reload.changed.join(", ")),
    };
    let _ = writeln!(
        out,
        "reload   last {ago} ago ({}): {outcome}",
        reload.trigger
    );
}

fn render_nodes(nodes: &[NodeStatus], out: &mut String) {
    let _ = writeln!(
        out,
        "{:<16} {:<22} {:<9} {:>8} {:>9} {:>12} {:>10} {:>8} {:>9}  last error",
        "node",
        "address",
        "state",
        "since",
        "in flight",
        "acked ev",
        "ev/s 10s",
        "retries",
        "last ack"
    );
    for n in nodes {
        let state = match (n.available, n.standby) {
            (true, false) => "up",
            (true, true) => "standby",
            (false, _) => "DOWN",
        };
        let _ = writeln!(
            out,
            "{:<16} {:<22} {:<9} {:>8} {:>9} {:>12} {:>10} {:>8} {:>9}  {}",
            n.name,
            n.address,
            state,
            duration(n.since_seconds),
            n.in_flight,
            count(n.acked_events),
            rate(n.events_per_second.last_10s),
            count(n.retries),
            n.last_ack_age_seconds
                .map(|s| format!("{} ago", duration(s)))
                .unwrap_or_else(|| "never".into()),
            n.last_error.as_deref().unwrap_or("-")
        );
    }
}

/// 12s, 5m 3s, 2h 13m, 3d 4h.
pub fn duration(seconds: f64) -> String {
    let s = seconds.max(0.0);
    if s < 10.0 {
        return format!("{s:.1}s");
    }
    let s = s as u64;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m {}s", s / 60, s % 60),
        7200..=172_799 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86400, s % 86400 / 3600),
    }
}

/// 1,234,567.
pub fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

pub fn rate(per_second: f64) -> String {
    if per_second >= 10.0 {
        count(per_second.round() as u64)
    } else {
        format!("{per_second:.1}")
    }
}

/// 12.3 MiB.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_at_a_glance() {
        assert_eq!(count(0), "0");
        assert_eq!(count(1234567), "1,234,567");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(12 << 20), "12.0 MiB");
        assert_eq!(duration(3.25), "3.2s");
        assert_eq!(duration(90.0), "90s");
        assert_eq!(duration(7980.0), "2h 13m");
        assert_eq!(rate(1234.4), "1,234");
        assert_eq!(rate(0.5), "0.5");
    }
}
