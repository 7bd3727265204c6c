//! Tests that cannot run on this machine: no root, no `ip`/`iptables`, no tmpfs mount, no C
//! compiler, a client library or tmux or python3 missing. Outside CI such a test prints why
//! and passes; under `CI` (the CI runner sets it; `.ci/run` installs every one of those tools
//! and runs as root) it fails with the same reason, so that a skip never passes there as if
//! the scenario had been checked (issue 21: `faults_seed` passed under CI without root).
//! Every skip of the test suite goes through [`runnable`] or [`skip`].

/// Whether `test` can run, given why it cannot (`None`: it can). A reason is printed as
/// `SKIPPED <test>: <reason>`, or fails the test under `CI`.
pub fn runnable(test: &str, unavailable: Option<String>) -> bool {
    match unavailable {
        None => true,
        Some(reason) => {
            skip(test, &reason);
            false
        }
    }
}

/// `test` cannot run because of `reason`: say so and let the caller return, or, under `CI`,
/// fail with the reason.
pub fn skip(test: &str, reason: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "{test} cannot run: {reason} (CI is set, and .ci/run installs what the tests need and \
         runs as root: a skip under CI is a failure)"
    );
    eprintln!("SKIPPED {test}: {reason}");
}
