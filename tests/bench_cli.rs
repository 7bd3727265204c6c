//! `ackgate bench --baseline-bin`: a before/after in one invocation. The real binary benches
//! itself against itself (as baseline and as candidate) on a tiny load, and the report must
//! hold both series of runs, alternated, with every event delivered once, and the line that
//! sets their means side by side.

mod support;

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

use support::{ackgate_command, Proc};

/// Bound on the whole bench (4 runs of at most 2 s each, their start-ups and drains). Each run
/// is long enough (about half a second here) for ackgate's CPU time, counted in 10 ms ticks,
/// not to be 0.
const WAIT: Duration = Duration::from_secs(120);

#[test]
fn a_baseline_binary_alternates_with_ackgate_and_both_are_summed_up() {
    let exe = env!("CARGO_BIN_EXE_ackgate");
    let mut command = ackgate_command([
        "bench",
        "--baseline-bin",
        exe,
        "--rounds",
        "2",
        "--connections",
        "1",
        "--window",
        "4",
        "--batch",
        "1000",
        "--events",
        "2000000",
        "--duration",
        "2s",
        "--no-direct",
        "--no-ceiling",
        "--json",
    ]);
    command.stdout(Stdio::piped());
    let mut bench = Proc::spawn("bench", command);
    let stdout = bench.take_stdout();
    let status = bench.wait(WAIT);
    let text = stdout.finish();
    assert!(
        status.success(),
        "bench failed: {}\n{text}",
        bench.stderr_text()
    );
    assert!(
        text.contains(&format!(
            "against the baseline {exe} (2 alternated rounds, means):"
        )),
        "no comparison line in:\n{text}"
    );
    let json: Value = serde_json::from_str(&text[text.find("\n{").map_or(0, |i| i + 1)..])
        .unwrap_or_else(|e| panic!("the JSON report does not parse: {e}\n{text}"));
    for (series, label) in [("baseline_runs", "baseline"), ("runs", "ackgate")] {
        let runs = json[series]
            .as_array()
            .unwrap_or_else(|| panic!("no {series} in {json}"));
        assert_eq!(runs.len(), 2, "{series}: {runs:?}");
        for (i, run) in runs.iter().enumerate() {
            assert_eq!(run["label"], format!("{label} #{}", i + 1));
            assert!(run["events"].as_u64() > Some(0), "{run}");
            assert_eq!(run["missing"], 0, "{run}");
            assert_eq!(run["duplicates"], 0, "{run}");
            assert!(run["ackgate"]["cpu_seconds"].as_f64() > Some(0.0), "{run}");
        }
    }
    assert_eq!(json["baseline_bin"], exe);
}
