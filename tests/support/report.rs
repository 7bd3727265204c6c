//! Results of the fault tests (`tests/faults_*.rs`): the short mode `.ci/run` runs and the long
//! one (`ACKGATE_SOAK=1`), random fault timing, and one [`Row`] of FAULTS.md per scenario,
//! printed and saved under `target/tmp/faults/<short|soak>/`.

use std::path::Path;
use std::time::Duration;

use super::ledger::{LedgerState, SeenState};

/// `ACKGATE_SOAK=1` selects the long mode (high cycle counts); the default is the short mode
/// that `.ci/run` runs.
pub fn soak() -> bool {
    std::env::var("ACKGATE_SOAK").is_ok_and(|v| v == "1")
}

/// `short` cycles by default, `long` with `ACKGATE_SOAK=1`.
pub fn cycles(short: u32, long: u32) -> u32 {
    if soak() {
        long
    } else {
        short
    }
}

/// The command that reproduces a test, for FAULTS.md.
pub fn rerun_command(test_file: &str, test_name: &str) -> String {
    let soak = if soak() { "ACKGATE_SOAK=1 " } else { "" };
    format!("{soak}cargo test --release --test {test_file} -- {test_name}")
}

/// A random duration in `[lo, hi)`.
pub fn random_between(lo: Duration, hi: Duration) -> Duration {
    use rand::Rng;
    let span = hi.saturating_sub(lo).as_millis().max(1) as u64;
    lo + Duration::from_millis(rand::rng().random_range(0..span))
}

/// One row of FAULTS.md.
#[derive(Debug, Default)]
pub struct Row {
    pub scenario: String,
    /// Events handed over: ack requests started plus legacy events fully written.
    pub sent: usize,
    /// Events acked by ackgate.
    pub acked: usize,
    /// Legacy events known committed (metrics or spool).
    pub committed: usize,
    /// Distinct events received upstream.
    pub received: usize,
    pub duplicates: u64,
    /// Acked or committed events that never arrived.
    pub lost: usize,
    pub cycles: u32,
    pub seconds: f64,
    pub command: String,
    pub notes: String,
}

impl Row {
    /// A one-cycle row for events of acking senders only: `acked` were acked and must arrive,
    /// `seen` is what arrived; received, lost and duplicates are counted from them.
    pub fn acked_only(
        scenario: impl Into<String>,
        sent: usize,
        acked: &std::collections::HashSet<u64>,
        seen: &SeenState,
    ) -> Row {
        let lost = seen.missing(acked).len();
        Row {
            scenario: scenario.into(),
            sent,
            acked: acked.len(),
            received: acked.len() - lost,
            duplicates: seen.duplicates(),
            lost,
            cycles: 1,
            ..Row::default()
        }
    }

    /// Sent and acked counts of a ledger: ack requests started plus legacy events written, and
    /// the acked ones.
    pub fn from_ledger(scenario: impl Into<String>, sent: &LedgerState) -> Row {
        Row {
            scenario: scenario.into(),
            sent: sent.ack_sent.len() + sent.legacy_written.len(),
            acked: sent.acked.len(),
            cycles: 1,
            ..Row::default()
        }
    }

    /// The same row with received and duplicates counted from what arrived.
    pub fn arrived(self, seen: &SeenState) -> Row {
        Row {
            received: seen.unique(),
            duplicates: seen.duplicates(),
            ..self
        }
    }

    /// Print the row and save it under `target/tmp/faults/<short|soak>/`.
    pub fn save(&self) {
        let line = format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.1} s | `{}` | {} |",
            self.scenario,
            self.sent,
            self.acked,
            self.committed,
            self.received,
            self.duplicates,
            self.lost,
            self.cycles,
            self.seconds,
            self.command,
            self.notes
        );
        eprintln!("FAULTS-ROW {line}");
        save_result(
            if soak() { "soak" } else { "short" },
            &self.scenario,
            &format!("{line}\n"),
        );
    }
}

/// Write `text` to `target/tmp/faults/<mode>/<scenario>.md` (the scenario's name with every
/// character but ASCII letters and digits as `_`), where FAULTS.md's figures are collected.
pub fn save_result(mode: &str, scenario: &str, text: &str) {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("faults")
        .join(mode);
    let _ = std::fs::create_dir_all(&dir);
    let name: String = scenario
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let _ = std::fs::write(dir.join(format!("{name}.md")), text);
}
