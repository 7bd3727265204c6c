//! `ackgate top` in a real terminal: the real binary inside tmux (keys by `send-keys`, the
//! screen by `capture-pane`), polling a real relay (real sockets on 127.0.0.1, a real redb
//! spool) that forwards to a real acking aggregator and to a node whose connects are refused.
//!
//! tmux is an apt package `.ci/run` installs; without it the tmux tests print why they skip
//! and pass, except under `CI`, where a missing tmux is a failure.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::{
    ackgate_command, connect, entry_int, send_acked_on, send_signal, skip, start_with_admin,
    unique_record, wait_child, Ackgate, Aggregator, ReservedPort, TS,
};
use tempfile::TempDir;

/// How long the screen may take to show what a test waits for.
const SCREEN_TIMEOUT: Duration = Duration::from_secs(15);
/// Events sent (shown as "1,234").
const EVENTS: usize = 1234;

// ------------------------------------------------------------------------------------------------
// tmux

/// A private tmux server (its own socket in a temp dir) running one pane, killed on drop
/// whatever the test did.
struct Tmux {
    /// Holds the socket and tmux.conf; removed after the server is killed.
    _dir: TempDir,
    socket: PathBuf,
}

/// What tmux says about the pane.
#[derive(Debug, PartialEq, Eq)]
struct Pane {
    dead: bool,
    /// The exit status of a dead pane's process.
    status: Option<i32>,
    /// The program switched to the alternate screen (ratatui does; leaving it is part of the
    /// terminal's restore).
    alternate: bool,
}

impl Tmux {
    /// Whether tmux is installed; if not, says the test skips (or panics under `CI`).
    fn available(test: &str) -> bool {
        let found = Command::new("tmux")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            skip(test, "tmux is not installed (apt-get install tmux)");
        }
        found
    }

    /// A 160×40 pane running `program args…` directly (no shell of the user's). Panes stay
    /// after their process exits (`remain-on-exit`), so its status and last screen can be read.
    fn start(program: &Path, args: &[&str]) -> Tmux {
        let dir = tempfile::tempdir().expect("tmux temp dir");
        let socket = dir.path().join("tmux.sock");
        let conf = dir.path().join("tmux.conf");
        // In the config, so it holds before the pane's process can exit; no status bar, so the
        // pane is the whole 40 lines.
        std::fs::write(&conf, "set -g remain-on-exit on\nset -g status off\n")
            .expect("write tmux.conf");
        let tmux = Tmux { _dir: dir, socket };
        let mut command = tmux.command();
        command
            .arg("-f")
            .arg(&conf)
            .args(["new-session", "-d", "-s", "top", "-x", "160", "-y", "40"])
            .arg(program)
            .args(args);
        let output = command.output().expect("run tmux new-session");
        assert!(output.status.success(), "tmux new-session: {output:?}");
        tmux
    }

    fn command(&self) -> Command {
        let mut command = Command::new("tmux");
        command
            .arg("-S")
            .arg(&self.socket)
            .env_remove("TMUX")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null());
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        let output = self.command().args(args).output().expect("run tmux");
        assert!(output.status.success(), "tmux {args:?}: {output:?}");
        output
    }

    /// The visible screen, as text.
    fn capture(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "top"]).stdout).into_owned()
    }

    fn pane(&self) -> Pane {
        let out = self.run(&[
            "display-message",
            "-p",
            "-t",
            "top",
            "#{pane_dead} #{pane_dead_status} #{alternate_on}",
        ]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let fields: Vec<&str> = text.split_whitespace().collect();
        match fields.as_slice() {
            [dead, status, alternate] => Pane {
                dead: *dead == "1",
                status: status.parse().ok(),
                alternate: *alternate == "1",
            },
            [dead, alternate] => Pane {
                dead: *dead == "1",
                status: None,
                alternate: *alternate == "1",
            },
            _ => panic!("unexpected display-message output {text:?}"),
        }
    }

    /// SIGCHLD to the tmux server. Debian's tmux uses libutempter, which swaps in its own
    /// SIGCHLD handler while it removes a dead pane's utmp record; a child that exits then is
    /// never reaped, and the pane stays dead without a status (tmux/tmux#311; without this,
    /// 3 of 18 runs here ended so). A second SIGCHLD makes tmux reap it.
    fn nudge(&self) {
        let out = self.run(&["display-message", "-p", "#{pid}"]);
        let pid: libc::pid_t = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("the tmux server's pid");
        // SAFETY: kill(2) with SIGCHLD (ignored by default, never fatal) on the tmux server
        // this test started.
        unsafe { libc::kill(pid, libc::SIGCHLD) };
    }

    /// The pid of the pane's process's only child (`ackgate top` under the shell).
    fn child_pid(&self) -> u32 {
        let out = self.run(&["display-message", "-p", "-t", "top", "#{pane_pid}"]);
        let shell = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let children = std::fs::read_to_string(format!("/proc/{shell}/task/{shell}/children"))
            .expect("read the shell's children");
        children
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("one child of the pane's shell, got {children:?}: {e}"))
    }

    fn send_keys(&self, keys: &str) {
        self.run(&["send-keys", "-t", "top", keys]);
    }

    /// Poll the screen every 100 ms until `done` holds (at most `timeout`): a terminal gives no
    /// event to wait on, so a bounded poll is the only way. Panics with the last screen.
    fn wait_for_screen(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let screen = self.capture();
            if done(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "the screen did not show {what} within {timeout:?}; last screen:\n{screen}\npane: {:?}",
                self.pane()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Poll (as above) until the pane's process has exited and been reaped (tmux marks a pane
    /// dead when its pty closes, and knows the status a moment later); its state and last
    /// screen, history included: tmux may scroll a line off when it writes "Pane is dead".
    fn wait_for_exit(&self, timeout: Duration) -> (Pane, String) {
        let deadline = Instant::now() + timeout;
        loop {
            let pane = self.pane();
            if pane.dead && pane.status.is_some() {
                let out = self.run(&["capture-pane", "-p", "-S", "-", "-t", "top"]);
                return (pane, String::from_utf8_lossy(&out.stdout).into_owned());
            }
            if pane.dead {
                self.nudge();
            }
            assert!(
                Instant::now() < deadline,
                "the pane's process did not exit within {timeout:?}: {pane:?}; screen:\n{}",
                self.capture()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.command().arg("kill-server").output();
    }
}

// ------------------------------------------------------------------------------------------------
// The relay and `ackgate top`

/// A relay with an admin listener (its config names the port it got, so that `ackgate top
/// --config` finds it), forwarding to `live` and to `refused`, where nothing listens (a
/// [`ReservedPort`]: connects fail at once). `live` has weight 1 against 60, so it may run
/// only `window` (32) records ahead of `refused`: the records past those make `refused`
/// connect (and fail, and show DOWN) however fast `live` acks. (A node connects only when
/// there is work it may take.)
fn relay(live: SocketAddr, refused: SocketAddr) -> (Ackgate, SocketAddr) {
    let nodes = format!(
        r#"nodes = [
            {{ name = "live", address = "{live}", weight = 1 }},
            {{ name = "refused", address = "{refused}", weight = 60 }},
        ]"#
    );
    start_with_admin(
        Ackgate::builder()
            .section("upstream", &nodes)
            .section("upstream", "window = 32"),
    )
}

/// `EVENTS` events in 42 acked requests, one after the other (more records than `live` may
/// take alone, see [`relay`]), then wait until the aggregator has them all.
fn send_events(gate: &Ackgate, agg: &Aggregator) {
    let mut stream = connect(gate.addr());
    let records: Vec<usize> = (0..EVENTS).collect();
    for (n, chunk) in records.chunks(30).enumerate() {
        let entries: Vec<u8> = chunk
            .iter()
            .flat_map(|_| entry_int(TS, &unique_record("top")))
            .collect();
        send_acked_on(
            &mut stream,
            "top.test",
            &entries,
            n as u64,
            Duration::from_secs(10),
        );
    }
    agg.wait_for_events(EVENTS, Duration::from_secs(20));
}

/// `ackgate top` in a shell that then reports its exit status and whether the tty was left
/// in raw mode (`stty` prints `-icanon` then), so both survive on the dead pane's screen.
fn start_top(config: &Path) -> Tmux {
    let script = r#""$0" top --config "$1"; s=$?; echo "top exited $s"; if stty -a | grep -q -- -icanon; then echo "tty left raw"; else echo "tty cooked"; fi; exit $s"#;
    let config = config.to_str().expect("utf-8 temp path");
    Tmux::start(
        Path::new("/bin/sh"),
        &["-c", script, env!("CARGO_BIN_EXE_ackgate"), config],
    )
}

/// The screen line of a node's row.
fn row<'a>(screen: &'a str, name: &str, address: &str) -> Option<&'a str> {
    screen
        .lines()
        .find(|l| l.starts_with(&format!("{name} ")) && l.contains(address))
}

/// The value in a row under a right-aligned column title (titles and numbers end at the
/// same column).
fn cell<'a>(screen: &str, row: &'a str, title: &str) -> Option<&'a str> {
    let header = screen.lines().find(|l| l.starts_with("node "))?;
    let end = header.find(title)? + title.len();
    row.get(..end)?.split_whitespace().last()
}

/// Both node rows, the refused one DOWN, the live one up with every event acked.
fn shows_both_nodes(screen: &str, live: SocketAddr, refused: SocketAddr) -> bool {
    let live = row(screen, "live", &live.to_string());
    let refused = row(screen, "refused", &refused.to_string());
    live.is_some_and(|l| l.contains(" up ") && cell(screen, l, "acked ev") == Some("1,234"))
        && refused.is_some_and(|l| l.contains(" DOWN "))
}

/// `q` ended top with status 0, off the alternate screen, the tty cooked, nothing on stderr.
fn assert_quit_cleanly(tmux: &Tmux, timeout: Duration) {
    let (pane, screen) = tmux.wait_for_exit(timeout);
    assert_eq!(pane.status, Some(0), "exit status; screen:\n{screen}");
    assert!(!pane.alternate, "still on the alternate screen:\n{screen}");
    assert!(screen.contains("top exited 0"), "{screen}");
    assert!(screen.contains("tty cooked"), "raw mode left on:\n{screen}");
    assert!(
        !screen.contains("acked ev"),
        "the table is still shown:\n{screen}"
    );
    assert!(!screen.to_lowercase().contains("error"), "{screen}");
}

// ------------------------------------------------------------------------------------------------
// Tests

/// A relay, `top` on it in tmux, and its screen showing the node rows; `None` (after saying
/// why) when tmux is not available.
struct Running {
    agg: Aggregator,
    /// Where the refused node is (held, so that it stays refused).
    refused: ReservedPort,
    gate: Ackgate,
    admin: std::net::SocketAddr,
    tmux: Tmux,
}

fn running_top(test: &str) -> Option<Running> {
    if !Tmux::available(test) {
        return None;
    }
    let agg = Aggregator::start();
    let refused = ReservedPort::new();
    let (gate, admin) = relay(agg.addr(), refused.addr());
    let tmux = start_top(gate.config_path());
    tmux.wait_for_screen("the node rows", SCREEN_TIMEOUT, |s| {
        row(s, "live", &agg.addr().to_string()).is_some()
    });
    Some(Running {
        agg,
        refused,
        gate,
        admin,
        tmux,
    })
}

#[test]
fn top_shows_every_node_and_quits_on_q() {
    if !Tmux::available("top_shows_every_node_and_quits_on_q") {
        return;
    }
    let agg = Aggregator::start();
    let refused = ReservedPort::new();
    let (gate, admin) = relay(agg.addr(), refused.addr());
    send_events(&gate, &agg);
    let tmux = start_top(gate.config_path());
    let screen = tmux.wait_for_screen(
        "both nodes, DOWN and up, 1,234 acked",
        SCREEN_TIMEOUT,
        |s| shows_both_nodes(s, agg.addr(), refused.addr()),
    );
    eprintln!("the screen of `ackgate top`:\n{screen}");
    assert!(screen.contains("NEEDS ATTENTION"), "{screen}");
    assert!(
        screen.contains(&format!("q quit  polling {admin} every second")),
        "{screen}"
    );
    assert!(tmux.pane().alternate, "top draws on the alternate screen");
    tmux.send_keys("q");
    assert_quit_cleanly(&tmux, Duration::from_secs(5));
}

#[test]
fn q_quits_at_once_while_the_relay_does_not_answer() {
    let Some(Running {
        agg: _agg,
        refused: _refused,
        gate,
        admin,
        tmux,
    }) = running_top("q_quits_at_once_while_the_relay_does_not_answer")
    else {
        return;
    };
    // Stopped, the relay's kernel still accepts connections: each poll hangs until the
    // client's 10 s deadline, which `q` must not wait for. The worker serves the admin API.
    let worker = gate.worker_pid();
    send_signal(worker, libc::SIGSTOP);
    let resume = Resume(worker);
    tmux.wait_for_screen("a stale status", SCREEN_TIMEOUT, |s| {
        s.contains(&format!("no fresh status from {admin}"))
    });
    tmux.send_keys("q");
    assert_quit_cleanly(&tmux, Duration::from_secs(3));
    drop(resume);
}

/// SIGCONT on drop, so a failed assertion leaves no stopped process behind.
struct Resume(u32);

impl Drop for Resume {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the relay's pid, not reaped yet (the `Ackgate` outlives this);
        // no assertion, as this may run while a test panics.
        unsafe { libc::kill(self.0 as libc::pid_t, libc::SIGCONT) };
    }
}

#[test]
fn a_relay_that_goes_away_is_an_error_line_not_an_exit() {
    let Some(Running {
        agg,
        refused: _refused,
        mut gate,
        admin,
        tmux,
    }) = running_top("a_relay_that_goes_away_is_an_error_line_not_an_exit")
    else {
        return;
    };
    gate.kill9();
    // The admin port stays reserved, so that every poll is refused as it is when nothing
    // else binds it.
    let _held = ReservedPort::hold(admin);
    let screen = tmux.wait_for_screen("the failed poll", SCREEN_TIMEOUT, |s| {
        s.contains("poll failed: cannot reach ackgate's admin listener")
    });
    assert!(
        row(&screen, "live", &agg.addr().to_string()).is_some(),
        "the last status stays on screen:\n{screen}"
    );
    assert!(!tmux.pane().dead, "top exited on a failed poll");
    tmux.send_keys("Escape");
    assert_quit_cleanly(&tmux, Duration::from_secs(5));
}

#[test]
fn sigterm_restores_the_terminal_too() {
    let Some(Running {
        agg: _agg,
        refused: _refused,
        gate: _gate,
        admin: _admin,
        tmux,
    }) = running_top("sigterm_restores_the_terminal_too")
    else {
        return;
    };
    send_signal(tmux.child_pid(), libc::SIGTERM);
    assert_quit_cleanly(&tmux, Duration::from_secs(5));
}

#[test]
fn top_on_a_relay_that_is_down_exits_non_zero() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("top.toml");
    let spool = dir.path().join("spool.redb");
    // The admin address: nothing listens there (connects fail at once).
    let refused = ReservedPort::new();
    let text = format!(
        "[ingress]\nlisten = \"127.0.0.1:0\"\n[spool]\npath = {:?}\n[[upstream.nodes]]\naddress = \"127.0.0.1:24224\"\n[admin]\nlisten = \"{}\"\n",
        spool.to_str().expect("utf-8 temp path"),
        refused.addr()
    );
    std::fs::write(&config, text).expect("write config");
    let (code, stderr) = run_top(&config);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "cannot reach ackgate's admin listener at {}",
            refused.addr()
        )),
        "{stderr}"
    );
}

#[test]
fn top_without_a_terminal_says_so() {
    let agg = Aggregator::start();
    let refused = ReservedPort::new();
    let (gate, _admin) = relay(agg.addr(), refused.addr());
    let (code, stderr) = run_top(gate.config_path());
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("needs a terminal"), "{stderr}");
}

/// `ackgate top` with no terminal: its exit code and stderr.
fn run_top(config: &Path) -> (Option<i32>, String) {
    let mut child = ackgate_command(["top", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ackgate top");
    let status = wait_child(&mut child, Duration::from_secs(20)).expect("ackgate top exits");
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        std::io::Read::read_to_string(&mut pipe, &mut stderr).expect("read stderr");
    }
    (status.code(), stderr)
}
