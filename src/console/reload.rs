//! `ackgate reload`: ask a running relay to re-read its config file (`POST /api/reload`, as
//! SIGHUP does) and say what changed, or which key was refused and why.
//!
//! Exit code for scripts (and systemd's `ExecReload`): 0 applied, 1 refused (the relay keeps
//! the config it runs), 2 the relay cannot be reached.

use std::path::Path;
use std::process::ExitCode;

use crate::admin::client::AdminClient;

/// Exit code: the new config is in force.
pub const APPLIED: u8 = 0;
/// Exit code: refused; the running config is unchanged.
pub const REFUSED: u8 = 1;
/// Exit code: the relay cannot be reached.
pub const UNREACHABLE: u8 = 2;

pub async fn run(path: &Path) -> ExitCode {
    // A file that does not validate still names the admin listener: the relay is asked, so
    // that its log, its status and this command all say the same thing.
    let (client, invalid) = AdminClient::for_file(path);
    let client = match (client, invalid) {
        (Ok(client), _) => client,
        (Err(e), Some(invalid)) => {
            eprintln!("error: {invalid}");
            eprintln!("the relay was not asked: {e}");
            return ExitCode::from(REFUSED);
        }
        (Err(e), None) => {
            eprintln!("error: {e}");
            return ExitCode::from(UNREACHABLE);
        }
    };
    let reply = match client.post("/api/reload").await {
        Ok(reply) => reply,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(UNREACHABLE);
        }
    };
    let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap_or_default();
    let file = body["config"].as_str().unwrap_or("the config");
    if reply.status != 200 {
        eprintln!("error: reload refused: {}", reply.error_message());
        return ExitCode::from(REFUSED);
    }
    let changed: Vec<&str> = body["changed"]
        .as_array()
        .map(|keys| keys.iter().filter_map(|k| k.as_str()).collect())
        .unwrap_or_default();
    if changed.is_empty() {
        println!("reloaded {file}: nothing changed (certificates were read again)");
    } else {
        println!("reloaded {file}; changed:");
        for key in changed {
            println!("  {key}");
        }
    }
    ExitCode::from(APPLIED)
}
