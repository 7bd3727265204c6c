//! The support library of the integration tests: every `tests/*.rs` includes it with
//! `mod support;` (cargo builds each test file as its own crate, so each compiles this whole
//! tree, and what one file does not use is dead code there) and uses `support::*`.
//!
//! No mocks: the binary under test is the one cargo built, aggregators decode with ackgate's own
//! codec and answer like fluentd's in_forward (or misbehave on purpose), senders are plain
//! sockets writing the bytes real clients write. Every wait has a deadline and is woken by an
//! event (a log line, a request read, a condition variable); the few polls are where no event
//! exists (`/metrics`, a kernel table, a child's exit). On timeout a wait panics with what it saw.
//!
//! By role:
//! - [`launcher`]: the ackgate launcher (config builder, ready line, log capture) and
//!   `ackgate spool` runs; [`process`]: child processes and their stderr; [`ports`]: ports the
//!   tests own (never "bind, close, pass the number on").
//! - [`aggregator`]: the one test aggregator, whose [`Behaviour`] is configurable (ack, never
//!   ack, wrong ack, late ack, garbage, close, reset, slow, drop over a size), its connections
//!   in [`aggregator_conn`]; [`receiver`]: `ackgate receive` as an aggregator process that can
//!   be killed.
//! - [`msgpack`], [`requests`]: bytes senders write; [`wire`]: a sender's socket;
//!   [`decode`]: ackgate's decoder fed in pieces; [`captures`]: the wire captures and what
//!   each holds.
//! - [`ledger`]: what was handed over against what arrived; [`load`]: sender threads for the
//!   fault tests; [`report`]: FAULTS.md rows; [`spool`]: a spool file read with ackgate's code.
//! - [`lifecycle`]: ackgate's own lifecycle as the fault (kill -9 of the worker, stop and
//!   start, reload, upgrade) on pinned addresses, and the wait until it holds nothing.
//! - [`metrics`]: the admin listener and Prometheus text; [`pki`]: TLS certificates.
//! - [`handshake_oracle`]: an independent client side of the shared-key handshake.
//! - Fault injection: [`netns`] (network namespace), [`tmpfs`] (a disk that fills), [`eio`]
//!   (an LD_PRELOAD shim failing disk calls with EIO).
//! - [`interop`]: the real client libraries, a recording proxy and decoders for what it saw.
//! - [`skip`]: a test that cannot run here says why, and fails instead under `CI`.

#![allow(dead_code, unused_imports)]

mod aggregator;
mod aggregator_conn;
mod captures;
mod decode;
mod eio;
mod handshake_oracle;
mod interop;
mod launcher;
mod ledger;
mod lifecycle;
mod load;
mod metrics;
mod msgpack;
mod netns;
mod pki;
mod ports;
mod process;
mod receiver;
mod report;
mod requests;
mod skip;
mod spool;
mod tmpfs;
mod wire;

pub use aggregator::*;
pub use captures::*;
pub use decode::*;
pub use eio::*;
pub use handshake_oracle::*;
pub use interop::*;
pub use launcher::*;
pub use ledger::*;
pub use lifecycle::*;
pub use load::*;
pub use metrics::*;
pub use msgpack::*;
pub use netns::*;
pub use pki::*;
pub use ports::*;
pub use process::*;
pub use receiver::*;
pub use report::*;
pub use requests::*;
pub use skip::*;
pub use spool::*;
pub use tmpfs::*;
pub use wire::*;

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Lock, ignoring poisoning (a panicking test thread must not hide the real failure).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Wait until `done` holds over the value behind `mutex`, checking again each time `changed`
/// is signalled, for at most `timeout`. Returns the guard and whether `done` held (false: the
/// deadline passed). Every event-driven wait of the test support goes through here.
pub fn wait_for_condition<'a, T>(
    mutex: &'a Mutex<T>,
    changed: &Condvar,
    timeout: Duration,
    mut done: impl FnMut(&T) -> bool,
) -> (MutexGuard<'a, T>, bool) {
    let deadline = Instant::now() + timeout;
    let mut guard = lock(mutex);
    loop {
        if done(&guard) {
            return (guard, true);
        }
        let now = Instant::now();
        if now >= deadline {
            return (guard, false);
        }
        guard = changed
            .wait_timeout(guard, deadline - now)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
}
