//! A network namespace joined to the host by a veth pair (root only, deleted on drop), for the
//! seed scenario's aggregator behind an iptables rule; and what the host's TCP table says about
//! the bytes still unacknowledged towards an address.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

use super::process::{is_root, run_command};

/// Why the network-namespace scenario cannot run here, if it cannot.
pub fn netns_unavailable() -> Option<String> {
    if !is_root() {
        return Some("needs root (ip netns, iptables)".into());
    }
    for tool in ["ip", "iptables"] {
        let ok = Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return Some(format!("`{tool}` is not installed (.ci/run installs it)"));
        }
    }
    None
}

/// Namespaces created by this process so far: tests of one binary run in parallel threads,
/// so each namespace needs its own name, interfaces and /30.
static NETNS_CREATED: AtomicU64 = AtomicU64::new(0);

/// A network namespace joined to the host by a veth pair with a /30 of 10.231.0.0/16. Drop
/// deletes both (also when a test panics).
pub struct Netns {
    pub name: String,
    host_if: String,
    pub host_addr: Ipv4Addr,
    pub ns_addr: Ipv4Addr,
}

impl Netns {
    pub fn create() -> Result<Netns, String> {
        let pid = std::process::id();
        // 32 namespaces per process before names or blocks repeat (earlier ones are gone by
        // then: a test drops its namespace before it creates the next one).
        let n = (NETNS_CREATED.fetch_add(1, Ordering::Relaxed) % 32) as u32;
        // At most 7 + 1 + 2 hex digits: "agh" + tag stays within IFNAMSIZ (15).
        let tag = format!("{:x}x{n:x}", pid & 0xfff_ffff);
        let block = ((pid.wrapping_mul(32) + n) % 16384) * 4;
        let third = (block / 256) as u8;
        let fourth = (block % 256) as u8;
        let ns = Netns {
            name: format!("agf-{tag}"),
            host_if: format!("agh{tag}"),
            host_addr: Ipv4Addr::new(10, 231, third, fourth + 1),
            ns_addr: Ipv4Addr::new(10, 231, third, fourth + 2),
        };
        let peer = format!("agn{tag}");
        let host_cidr = format!("{}/30", ns.host_addr);
        let ns_cidr = format!("{}/30", ns.ns_addr);
        // Leftovers of an earlier run with the same pid would make the adds fail.
        let _ = run_command(&["ip", "netns", "del", &ns.name]);
        let _ = run_command(&["ip", "link", "del", &ns.host_if]);
        run_command(&["ip", "netns", "add", &ns.name])?;
        // From here on, Drop cleans up whatever was created.
        let veth = [
            "ip",
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
        ];
        run_command(&veth)?;
        run_command(&["ip", "link", "set", &peer, "netns", &ns.name])?;
        run_command(&["ip", "addr", "add", &host_cidr, "dev", &ns.host_if])?;
        run_command(&["ip", "link", "set", &ns.host_if, "up"])?;
        ns.exec(&["ip", "addr", "add", &ns_cidr, "dev", &peer])?;
        ns.exec(&["ip", "link", "set", &peer, "up"])?;
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Give the veth pair IPv6 addresses too (a /64 of fd00:231::/32 made of the IPv4 /30),
    /// usable at once (no duplicate address detection); (host side, namespace side).
    pub fn add_ipv6(&self) -> Result<(Ipv6Addr, Ipv6Addr), String> {
        let [_, _, third, fourth] = self.host_addr.octets();
        let prefix = format!("fd00:231:{third:x}:{fourth:x}");
        let host: Ipv6Addr = format!("{prefix}::1").parse().map_err(|e| format!("{e}"))?;
        let ns: Ipv6Addr = format!("{prefix}::2").parse().map_err(|e| format!("{e}"))?;
        let host_cidr = format!("{host}/64");
        let ns_cidr = format!("{ns}/64");
        run_command(&[
            "ip",
            "-6",
            "addr",
            "add",
            &host_cidr,
            "dev",
            &self.host_if,
            "nodad",
        ])?;
        let peer = self.host_if.replacen("agh", "agn", 1);
        self.exec(&["ip", "-6", "addr", "add", &ns_cidr, "dev", &peer, "nodad"])?;
        Ok((host, ns))
    }

    /// Run a command inside the namespace.
    pub fn exec(&self, cmd: &[&str]) -> Result<(), String> {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(cmd);
        run_command(&full)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting one end of a veth pair deletes both; the namespace takes its rules along.
        let _ = run_command(&["ip", "link", "del", &self.host_if]);
        let _ = run_command(&["ip", "netns", "del", &self.name]);
    }
}

/// TCP sockets of this (the host's) network namespace connected to `peer`, and the bytes they
/// hold that `peer` has not acknowledged (`tx_queue` of /proc/net/tcp: sent or queued, not
/// acked; a queued FIN counts one). Orphans count too: a socket its process closed gracefully
/// stays here, retransmitting, until its data is acked or it gives up. `None` if the table
/// cannot be read.
pub fn unacked_towards(peer: std::net::SocketAddrV4) -> Option<(usize, u64)> {
    // The kernel prints an address as u32 words in memory order, the port as a number. An
    // IPv6 socket may reach the peer as ::ffff:a.b.c.d.
    let v4 = format!("{:08X}", u32::from_ne_bytes(peer.ip().octets()));
    let mapped = format!(
        "0000000000000000{:08X}{v4}",
        u32::from_ne_bytes([0, 0, 0xff, 0xff])
    );
    let port = format!("{:04X}", peer.port());
    let mut sockets = 0;
    let mut unacked = 0;
    for (file, addr) in [("/proc/net/tcp", v4), ("/proc/net/tcp6", mapped)] {
        let Ok(table) = std::fs::read_to_string(file) else {
            if file == "/proc/net/tcp" {
                return None;
            }
            continue;
        };
        let want = format!("{addr}:{port}");
        for line in table.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 5 || cols[2] != want {
                continue;
            }
            let tx = cols[4].split(':').next().unwrap_or("0");
            sockets += 1;
            unacked += u64::from_str_radix(tx, 16).unwrap_or(0);
        }
    }
    Some((sockets, unacked))
}

/// Run `f` on a thread that joined network namespace `name`: the sockets it opens live there
/// (a sender on another host, for the test's purposes).
pub fn in_netns<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{name}");
    std::thread::spawn(move || {
        let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("setns {path}: {e}"));
        f()
    })
    .join()
    .expect("thread in the namespace panicked")
}

/// Three network namespaces in a line, none joined to the host: a sender host, a router (the
/// gateway the sender routes through), an aggregator host. Addresses are fixed, as each
/// namespace has its own stack; names carry the pid and a counter. Drop deletes them.
pub struct Gateway {
    pub sender: String,
    pub router: String,
    pub aggregator: String,
    pub sender_addr: Ipv4Addr,
    pub aggregator_addr: Ipv4Addr,
    /// The router's interface on the sender's side (where PREROUTING rules match).
    pub router_sender_if: &'static str,
}

impl Gateway {
    pub fn create() -> Result<Gateway, String> {
        let n = NETNS_CREATED.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{:x}x{n:x}", std::process::id());
        let gateway = Gateway {
            sender: format!("ags-{tag}"),
            router: format!("agr-{tag}"),
            aggregator: format!("aga-{tag}"),
            sender_addr: Ipv4Addr::new(10, 232, 0, 1),
            aggregator_addr: Ipv4Addr::new(10, 232, 0, 6),
            router_sender_if: "rs0",
        };
        for ns in gateway.namespaces() {
            let _ = run_command(&["ip", "netns", "del", ns]);
            run_command(&["ip", "netns", "add", ns])?;
        }
        // From here on, Drop cleans up.
        let (s, r, a) = (&gateway.sender, &gateway.router, &gateway.aggregator);
        run_command(&[
            "ip", "link", "add", "sr0", "netns", s, "type", "veth", "peer", "name", "rs0", "netns",
            r,
        ])?;
        run_command(&[
            "ip", "link", "add", "ra0", "netns", r, "type", "veth", "peer", "name", "ar0", "netns",
            a,
        ])?;
        let exec = |ns: &str, cmd: &[&str]| {
            let mut full = vec!["ip", "netns", "exec", ns];
            full.extend_from_slice(cmd);
            run_command(&full)
        };
        exec(s, &["ip", "addr", "add", "10.232.0.1/30", "dev", "sr0"])?;
        exec(r, &["ip", "addr", "add", "10.232.0.2/30", "dev", "rs0"])?;
        exec(r, &["ip", "addr", "add", "10.232.0.5/30", "dev", "ra0"])?;
        exec(a, &["ip", "addr", "add", "10.232.0.6/30", "dev", "ar0"])?;
        for (ns, dev) in [(s, "sr0"), (r, "rs0"), (r, "ra0"), (a, "ar0")] {
            exec(ns, &["ip", "link", "set", dev, "up"])?;
        }
        for ns in [s, r, a] {
            exec(ns, &["ip", "link", "set", "lo", "up"])?;
        }
        exec(s, &["ip", "route", "add", "default", "via", "10.232.0.2"])?;
        exec(a, &["ip", "route", "add", "default", "via", "10.232.0.5"])?;
        exec(r, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        Ok(gateway)
    }

    fn namespaces(&self) -> [&str; 3] {
        [&self.sender, &self.router, &self.aggregator]
    }

    /// Run a command inside namespace `ns` (one of this gateway's).
    pub fn exec(&self, ns: &str, cmd: &[&str]) -> Result<(), String> {
        let mut full = vec!["ip", "netns", "exec", ns];
        full.extend_from_slice(cmd);
        run_command(&full)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of each veth pair, and so the pair.
        for ns in self.namespaces() {
            let _ = run_command(&["ip", "netns", "del", ns]);
        }
    }
}

/// Namespaces in a star, none joined to the host: a router in the middle (`core`), each leaf
/// on its own link 10.233.I.0/24 (the router .1, the leaf .2, its default route via the router).
/// Names carry the pid and a counter. Drop deletes them all.
pub struct Star {
    pub core: String,
    pub leaves: Vec<String>,
}

impl Star {
    pub fn create(leaves: usize) -> Result<Star, String> {
        let n = NETNS_CREATED.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{:x}x{n:x}", std::process::id());
        let star = Star {
            core: format!("agc-{tag}"),
            leaves: (0..leaves).map(|i| format!("agl{i}-{tag}")).collect(),
        };
        for ns in std::iter::once(&star.core).chain(&star.leaves) {
            let _ = run_command(&["ip", "netns", "del", ns]);
            run_command(&["ip", "netns", "add", ns])?;
        }
        // From here on, Drop cleans up.
        let exec = |ns: &str, cmd: &[&str]| {
            let mut full = vec!["ip", "netns", "exec", ns];
            full.extend_from_slice(cmd);
            run_command(&full)
        };
        for (i, leaf) in star.leaves.iter().enumerate() {
            let core_if = format!("l{i}");
            run_command(&[
                "ip", "link", "add", &core_if, "netns", &star.core, "type", "veth", "peer", "name",
                "c0", "netns", leaf,
            ])?;
            let core_cidr = format!("10.233.{i}.1/24");
            let leaf_cidr = format!("10.233.{i}.2/24");
            let gateway = format!("10.233.{i}.1");
            exec(
                &star.core,
                &["ip", "addr", "add", &core_cidr, "dev", &core_if],
            )?;
            exec(&star.core, &["ip", "link", "set", &core_if, "up"])?;
            exec(leaf, &["ip", "addr", "add", &leaf_cidr, "dev", "c0"])?;
            exec(leaf, &["ip", "link", "set", "c0", "up"])?;
            exec(leaf, &["ip", "link", "set", "lo", "up"])?;
            exec(leaf, &["ip", "route", "add", "default", "via", &gateway])?;
        }
        exec(&star.core, &["ip", "link", "set", "lo", "up"])?;
        exec(&star.core, &["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        Ok(star)
    }

    /// Leaf `i`'s address.
    pub fn addr(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 233, i as u8, 2)
    }

    /// Run a command inside leaf `i`.
    pub fn exec(&self, i: usize, cmd: &[&str]) -> Result<(), String> {
        let mut full = vec!["ip", "netns", "exec", &self.leaves[i]];
        full.extend_from_slice(cmd);
        run_command(&full)
    }
}

impl Drop for Star {
    fn drop(&mut self) {
        for ns in std::iter::once(&self.core).chain(&self.leaves) {
            let _ = run_command(&["ip", "netns", "del", ns]);
        }
    }
}
