//! systemd, the real way (invariant 10), with the real systemd tools that run without systemd
//! as PID 1, and the real binary:
//!
//! - `systemd-analyze verify` passes on `packaging/ackgate.socket` and `ackgate.service`;
//! - `systemd-socket-activate` hands `ackgate run` its listener (`LISTEN_FDS`): ackgate serves
//!   it and binds no listener of its own;
//! - the notification protocol, read on a `NOTIFY_SOCKET` the test owns: READY once the worker
//!   serves, RELOADING … READY around a reload and an upgrade, STOPPING on a stop; with
//!   `$FDSTORE` set (systemd 254+ with `FileDescriptorStoreMax=`), the listener and every
//!   sender connection are left in the fd store, each with its descriptor.
//!
//! Without the systemd tools these tests print why they skip; under `CI` (`.ci/run` installs
//! them) a missing tool is a failure.

mod support;

use std::io::IoSliceMut;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use support::*;

const WAIT: Duration = Duration::from_secs(30);

/// The path of `program`, or `None` after saying why the test skips ([`skip`]: a failure
/// under CI, which installs systemd).
fn program_or_skip(test: &str, program: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    });
    if found.is_none() {
        skip(test, &format!("{program} not found (apt install systemd)"));
    }
    found
}

#[test]
fn both_units_pass_systemd_analyze_verify() {
    let Some(analyze) = program_or_skip("verify", "systemd-analyze") else {
        return;
    };
    // The units name /usr/local/bin/ackgate, which verify requires to exist: point them at
    // the binary cargo built, in a directory of their own.
    let dir = tempfile::tempdir().expect("temp dir");
    let packaging = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging");
    for unit in ["ackgate.socket", "ackgate.service"] {
        let text = std::fs::read_to_string(packaging.join(unit)).expect("read unit");
        let text = text.replace("/usr/local/bin/ackgate", env!("CARGO_BIN_EXE_ackgate"));
        std::fs::write(dir.path().join(unit), text).expect("write unit");
    }
    let out = Command::new(analyze)
        .arg("verify")
        .arg(dir.path().join("ackgate.socket"))
        .arg(dir.path().join("ackgate.service"))
        .output()
        .expect("run systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{stderr}"
    );
    assert!(
        stderr.trim().is_empty(),
        "systemd-analyze verify warns:\n{stderr}"
    );
}

/// A minimal config: ingress on `listen`, one node, a spool in `dir`.
fn config(dir: &Path, listen: SocketAddr, node: SocketAddr) -> PathBuf {
    let path = dir.join("ackgate.toml");
    let text = format!(
        "[ingress]\nlisten = \"{listen}\"\n[spool]\npath = {:?}\n[upstream]\n\
         [[upstream.nodes]]\naddress = \"{node}\"\n[log]\nlevel = \"info\"\n",
        dir.join("spool.redb").display().to_string()
    );
    std::fs::write(&path, text).expect("write config");
    path
}

#[test]
fn a_socket_activated_listener_is_served_and_not_bound_again() {
    let Some(activate) = program_or_skip("socket activation", "systemd-socket-activate") else {
        return;
    };
    let agg = Aggregator::start();
    let dir = tempfile::tempdir().expect("temp dir");
    // The port: held by a bound (not listening) socket until systemd-socket-activate listens
    // on it too (both reuse the address), so nobody else takes it meanwhile.
    let reserved = ReservedPort::new();
    let listen = reserved.addr();
    let config = config(dir.path(), listen, agg.addr());
    let mut command = Command::new(activate);
    command
        .arg("-l")
        .arg(listen.to_string())
        .arg(env!("CARGO_BIN_EXE_ackgate"))
        .args(["run", "--config"])
        .arg(&config);
    let mut gate = Proc::spawn("activated", command);
    gate.wait_for_log("Listening on", WAIT);
    drop(reserved);
    // The first connection starts ackgate (socket activation), which acks it.
    let ids = Ids::default();
    let batch = ids.take(5);
    let entries: Vec<u8> = batch.iter().flat_map(|id| event(*id, 10)).collect();
    send_acked(listen, "systemd.activated", &entries, 1, WAIT);
    gate.wait_for_log("ackgate ready", WAIT);
    let seen = agg.seen();
    let wanted = batch.into_iter().collect();
    assert!(seen.wait(WAIT, |s| s.has_all(&wanted)), "events arrived");
    let log = gate.log.dump();
    assert!(
        !log.contains("ingress bound"),
        "ackgate bound a listener of its own instead of serving the activated one:\n{log}"
    );
    assert!(gate.terminate(WAIT).success(), "{}", gate.log.dump());
}

/// The test's `NOTIFY_SOCKET`: a datagram socket at a path, read with the descriptors that
/// come with each message.
struct Manager {
    socket: UnixDatagram,
    _dir: tempfile::TempDir,
    path: PathBuf,
    /// Notifications read and not yet matched by a wait, oldest first.
    backlog: std::cell::RefCell<Vec<Note>>,
}

/// One notification.
struct Note {
    text: String,
    fds: Vec<OwnedFd>,
}

impl Manager {
    fn new() -> Manager {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).expect("bind NOTIFY_SOCKET");
        Manager {
            socket,
            _dir: dir,
            path,
            backlog: Default::default(),
        }
    }

    /// The next notification, within `timeout`.
    fn next(&self, timeout: Duration) -> Option<Note> {
        self.socket.set_read_timeout(Some(timeout)).ok()?;
        let mut buf = vec![0u8; 4096];
        let mut cmsg = nix::cmsg_space!([RawFd; 16]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            self.socket.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .ok()?;
        let len = msg.bytes;
        let mut fds = Vec::new();
        for c in msg.cmsgs().ok()? {
            if let ControlMessageOwned::ScmRights(received) = c {
                // SAFETY: the kernel just installed these descriptors for this test process.
                fds.extend(
                    received
                        .into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        Some(Note {
            text: String::from_utf8_lossy(&buf[..len]).into_owned(),
            fds,
        })
    }

    /// The oldest notification, read now or earlier, that satisfies `wanted` (taken out; the
    /// others stay for later waits).
    fn wait_for(&self, what: &str, wanted: impl Fn(&Note) -> bool) -> Note {
        let deadline = Instant::now() + WAIT;
        loop {
            let mut backlog = self.backlog.borrow_mut();
            if let Some(at) = backlog.iter().position(&wanted) {
                return backlog.remove(at);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no {what} notification within {WAIT:?}; got: {:?}",
                backlog.iter().map(|n| &n.text).collect::<Vec<_>>()
            );
            if let Some(note) = self.next(left) {
                backlog.push(note);
            }
        }
    }
}

#[test]
fn the_service_manager_hears_ready_reloading_stopping_and_keeps_every_socket() {
    let manager = Manager::new();
    let agg = Aggregator::start();
    let mut gate = Ackgate::builder()
        .node("agg", agg.addr())
        .env("NOTIFY_SOCKET", &manager.path.to_string_lossy())
        .env("FDSTORE", "64")
        .start();
    manager.wait_for("READY=1", |n| n.text.contains("READY=1"));
    let listener = manager.wait_for("FDSTORE of the listener", |n| {
        n.text.contains("FDSTORE=1") && n.text.contains("FDNAME=listen-tcp")
    });
    assert_eq!(
        listener.fds.len(),
        1,
        "the listener's descriptor came with it"
    );
    // A sender connection: left in the fd store the moment it is accepted, under its name.
    let sender = TcpStream::connect(gate.addr()).expect("connect");
    let conn = manager.wait_for("FDSTORE of a connection", |n| {
        n.text.contains("FDSTORE=1") && n.text.contains("FDNAME=conn-")
    });
    let stored = socket2::SockRef::from(&conn.fds[0])
        .peer_addr()
        .expect("the stored descriptor is a connected socket")
        .as_socket();
    assert_eq!(
        stored,
        sender.local_addr().ok(),
        "it is the sender's connection"
    );
    // A reload: RELOADING=1, then READY=1.
    send_signal(gate.pid(), libc::SIGHUP);
    manager.wait_for("RELOADING=1 (reload)", |n| n.text.contains("RELOADING=1"));
    manager.wait_for("READY=1 (reload)", |n| n.text.contains("READY=1"));
    // An upgrade: the same, from the same main pid.
    send_signal(gate.pid(), libc::SIGUSR2);
    manager.wait_for("RELOADING=1 (upgrade)", |n| n.text.contains("RELOADING=1"));
    manager.wait_for("READY=1 (upgrade)", |n| n.text.contains("READY=1"));
    // A stop.
    drop(sender);
    send_signal(gate.pid(), libc::SIGTERM);
    manager.wait_for("STOPPING=1", |n| n.text.contains("STOPPING=1"));
    let status = gate.reap(WAIT).expect("ackgate exits after SIGTERM");
    assert!(status.success(), "{}", gate.log().dump());
}
