//! `ackgate receive` as an aggregator in its own process: one that can be SIGKILLed, optionally
//! inside a network namespace. Its JSON output lines are counted in a [`Seen`].

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::launcher::parse_addr_after;
use super::ledger::Seen;
use super::ports::ReservedPort;
use super::process::{ackgate_in_netns, collect_lines, LogLines};

/// `ackgate receive --listen ADDR --output -`: acks after writing each request's events as JSON
/// lines to its stdout, which a thread here reads into a [`Seen`] (so an acked event has always
/// been counted: the receiver flushes before it acks).
pub struct ReceiveProc {
    child: Option<Child>,
    listen: SocketAddr,
    netns: Option<String>,
    extra: Vec<String>,
    seen: Arc<Seen>,
    pub log: Arc<LogLines>,
    readers: Vec<JoinHandle<()>>,
    pub generation: u32,
}

impl ReceiveProc {
    /// Start on `listen`; with port 0 the receiver picks the port and prints it, and
    /// [`ReceiveProc::addr`] says which.
    pub fn start(
        listen: SocketAddr,
        netns: Option<&str>,
        extra: &[&str],
        seen: Arc<Seen>,
    ) -> ReceiveProc {
        let mut p = ReceiveProc {
            child: None,
            listen,
            netns: netns.map(str::to_string),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            seen,
            log: Arc::new(LogLines::default()),
            readers: Vec::new(),
            generation: 0,
        };
        p.spawn(0);
        p
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.listen
    }

    fn command(&self) -> Command {
        let mut cmd = ackgate_in_netns(self.netns.as_deref());
        cmd.arg("receive")
            .arg("--listen")
            .arg(self.listen.to_string())
            .arg("--output")
            .arg("-")
            .args(&self.extra)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// Spawn and wait for its `listening on` line at index ≥ `mark` of the log.
    fn spawn(&mut self, mark: usize) {
        self.generation += 1;
        let mut child = self.command().spawn().expect("spawn ackgate receive");
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        let seen = self.seen.clone();
        self.readers
            .push(std::thread::spawn(move || count_output(stdout, &seen)));
        let prefix = format!("receive#{}", self.generation);
        self.readers
            .push(collect_lines(prefix, stderr, self.log.clone()));
        let listening = self
            .log
            .wait_for_from(mark, Duration::from_secs(20), |l| {
                l.contains("ackgate receive listening on ")
            })
            .and_then(|line| parse_addr_after(&line, "listening on "));
        match listening {
            Some(addr) if self.listen.port() == 0 || addr == self.listen => self.listen = addr,
            other => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "ackgate receive did not listen on {} ({other:?}); log:\n{}",
                    self.listen,
                    self.log.dump()
                );
            }
        }
        self.child = Some(child);
    }

    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(|c| c.id())
            .expect("receiver running")
    }

    /// SIGKILL and reap; its stdout is read to the end (everything it acked is counted).
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for t in self.readers.drain(..) {
            let _ = t.join();
        }
    }

    /// SIGKILL, stay down for `down` (the port held meanwhile, so that it is still free for the
    /// new receiver: connects to it are refused, as they would be to any dead aggregator), then
    /// start again on the same address. Inside a namespace the port is the namespace's alone
    /// and is not held.
    pub fn kill_and_restart_after(&mut self, down: Duration) {
        self.kill9();
        let held = self
            .netns
            .is_none()
            .then(|| ReservedPort::hold(self.listen));
        std::thread::sleep(down);
        let mark = self.log.len();
        self.spawn(mark);
        drop(held);
    }
}

impl ReceiveProc {
    /// Start again on the same address after [`ReceiveProc::kill9`].
    pub fn restart(&mut self) {
        let mark = self.log.len();
        self.spawn(mark);
    }
}

impl Drop for ReceiveProc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Whether a line is an [`super::ledger::event`] as built: its time, and a record of exactly
/// `id` and a `pad` of only "x". An event altered on the way (a byte changed, cut, merged with
/// another) is counted as a bad line, so its id is missing, never seen.
fn is_intact_event(line: &serde_json::Value) -> bool {
    let record = &line["record"];
    line["time"].as_u64() == Some(u64::from(super::requests::TS))
        && record.as_object().is_some_and(|fields| fields.len() == 2)
        && record["id"].is_u64()
        && record["pad"]
            .as_str()
            .is_some_and(|pad| pad.bytes().all(|b| b == b'x'))
}

/// Count the receiver's JSON lines (one event per request: its output has no chunk ids).
fn count_output(stdout: impl std::io::Read, seen: &Seen) {
    let mut reader = BufReader::new(stdout);
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let id = serde_json::from_str::<serde_json::Value>(line.trim_end())
            .ok()
            .filter(is_intact_event)
            .and_then(|v| v["record"]["id"].as_u64());
        match id {
            Some(id) if line.ends_with('\n') => seen.add_request(None, &[id], 0),
            _ => seen.add_bad_line(),
        }
    }
}
