//! `ackgate upgrade`: ask a running relay's supervisor to upgrade to the executable now at
//! the path ackgate was started from (the same as SIGUSR2 to its main pid), and wait for the
//! outcome: a new worker serving (its pid, its version), or the reason the running version
//! kept serving. Exit 0 upgraded, 1 failed or refused, 2 unreachable.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::admin::client::AdminClient;
use crate::clock::now_ms;
use crate::config::Config;

/// Exit code: the relay cannot be reached.
const UNREACHABLE: u8 = 2;
/// How often the outcome is looked for.
const POLL: Duration = Duration::from_millis(200);

pub async fn run(config: &Config, path: &Path, wait: Duration) -> ExitCode {
    let client = match AdminClient::from_config(config, path) {
        Ok(client) => client,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(UNREACHABLE);
        }
    };
    let before = match client.status().await {
        Ok(status) => status,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(UNREACHABLE);
        }
    };
    let asked_ms = now_ms();
    if let Err(e) = client.post_ok("/api/upgrade").await {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let old = before.lifecycle.worker_pid;
    eprintln!(
        "upgrade asked of supervisor {} (worker {old}, version {}); waiting up to {wait:?}",
        before
            .lifecycle
            .supervisor_pid
            .map_or_else(|| "?".to_string(), |p| p.to_string()),
        before.version
    );
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        tokio::time::sleep(POLL).await;
        // Unreachable for a moment is expected: the new worker takes the admin listener over.
        let Ok(now) = client.status().await else {
            continue;
        };
        let notice = now
            .lifecycle
            .last_notice
            .filter(|n| n.at_ms + 1000 >= asked_ms && n.text.starts_with("upgrade"));
        if let Some(notice) = notice {
            eprintln!("error: {}", notice.text);
            return ExitCode::FAILURE;
        }
        if now.lifecycle.worker_pid != old {
            println!(
                "upgraded: worker {old} → {} (version {}), supervisor {} kept its pid",
                now.lifecycle.worker_pid,
                now.version,
                now.lifecycle
                    .supervisor_pid
                    .map_or_else(|| "?".to_string(), |p| p.to_string()),
            );
            return ExitCode::SUCCESS;
        }
    }
    eprintln!("error: the upgrade did not finish within {wait:?} (see the relay's log)");
    ExitCode::FAILURE
}
