//! What a new config changes against the one in force, by key, and which of those changes
//! only a restart can make. Pure: two validated [`Config`]s in, keys out; nothing is read or
//! changed here, so a refused reload has touched nothing (invariant 10).
//!
//! Keys that need a restart, and why (the README's "Reload" section says the same):
//! - `ingress.listen`, `ingress.udp_heartbeat`, `admin.listen` (and adding or removing
//!   `[admin]`): sockets bound at start, which senders and monitors are connected to;
//! - `spool.path`: the file that holds the queued records, opened at start;
//! - `spool.cache_bytes`: redb sizes its page cache when it opens the file;
//! - `log.format`: one format per log stream, for whatever parses it;
//! - `upstream.route`: which pipelines exist and which records each one takes are fixed at
//!   start (each dispatcher has its own cursor over the spool);
//! - `upstream.nodes` going from empty to non-empty or back under route "original": that
//!   decides at start which pipeline dead-letters damaged records (exactly one may).
//!
//! A listen address is unchanged when the new file names the address the socket is bound to
//! ([`Bound`]): a relay started on port 0 may be reloaded from a file that names its port.

use std::net::SocketAddr;

use crate::config::{Config, RouteMode};

/// The addresses the relay's listeners are bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    pub ingress: SocketAddr,
    pub admin: Option<SocketAddr>,
}

/// Whether `new` names the same listener as `old`, or the address `bound` to.
fn same_listener(
    old: Option<SocketAddr>,
    new: Option<SocketAddr>,
    bound: Option<SocketAddr>,
) -> bool {
    old == new || (new.is_some() && new == bound)
}

/// A change that needs a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restart {
    pub key: String,
    pub reason: &'static str,
}

/// The first change of `new` against `old` that only a restart can make, if any.
pub fn restart_required(old: &Config, new: &Config, bound: &Bound) -> Option<Restart> {
    let restart = |key: &str, reason: &'static str| {
        Some(Restart {
            key: key.to_string(),
            reason,
        })
    };
    if !same_listener(
        Some(old.ingress.listen),
        Some(new.ingress.listen),
        Some(bound.ingress),
    ) {
        return restart(
            "ingress.listen",
            "the listening socket is bound at start, and senders are connected to it",
        );
    }
    if old.ingress.udp_heartbeat != new.ingress.udp_heartbeat {
        return restart(
            "ingress.udp_heartbeat",
            "the UDP heartbeat socket is bound (or not) at start",
        );
    }
    if old.spool.path != new.spool.path {
        return restart(
            "spool.path",
            "the spool file holds the queued records and is opened at start",
        );
    }
    if old.spool.cache_bytes != new.spool.cache_bytes {
        return restart(
            "spool.cache_bytes",
            "redb sizes its page cache when it opens the spool file",
        );
    }
    if !same_listener(
        old.admin().map(|a| a.listen),
        new.admin().map(|a| a.listen),
        bound.admin,
    ) {
        return restart(
            "admin.listen",
            "the admin listener is bound (or not) at start",
        );
    }
    if old.log.format != new.log.format {
        return restart("log.format", "the log format is fixed for the process's life: whatever parses the log reads one format");
    }
    if old.upstream.route != new.upstream.route {
        return restart(
            "upstream.route",
            "which pipelines exist and which records each one takes are fixed at start",
        );
    }
    if new.upstream.route == RouteMode::Original
        && old.upstream.nodes.is_empty() != new.upstream.nodes.is_empty()
    {
        return restart("upstream.nodes", "with route = \"original\", whether [[upstream.nodes]] is empty decides at start which pipeline dead-letters damaged records");
    }
    None
}

/// Every key whose value differs, as dotted TOML paths (`upstream.ack_timeout`,
/// `ingress.allow`); arrays count as one value. `[[upstream.nodes]]` is left out: nodes are
/// compared by name when they are applied; so are listen addresses, which a reload that got
/// this far did not change ([`restart_required`]). Secrets are compared too, though never
/// printed.
pub fn changed_keys(old: &Config, new: &Config) -> Vec<String> {
    let mut keys = Vec::new();
    let (Ok(a), Ok(b)) = (toml::Value::try_from(old), toml::Value::try_from(new)) else {
        return keys;
    };
    walk("", &a, &b, &mut keys);
    keys.retain(|k| {
        ![
            "upstream.nodes",
            "ingress.listen",
            "admin.listen",
            "metrics.listen",
        ]
        .contains(&k.as_str())
    });
    for (key, changed) in secret_changes(old, new) {
        if changed && !keys.iter().any(|k| k == key) {
            keys.push(key.to_string());
        }
    }
    keys.sort();
    keys
}

/// Recurse into tables present on both sides; anything else that differs is one key.
fn walk(prefix: &str, a: &toml::Value, b: &toml::Value, keys: &mut Vec<String>) {
    let join = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        }
    };
    match (a, b) {
        (toml::Value::Table(a), toml::Value::Table(b)) => {
            let mut names: Vec<&String> = a.keys().chain(b.keys()).collect();
            names.sort();
            names.dedup();
            for name in names {
                match (a.get(name), b.get(name)) {
                    (Some(x), Some(y)) => walk(&join(name), x, y, keys),
                    _ => keys.push(join(name)),
                }
            }
        }
        _ if a != b => keys.push(prefix.to_string()),
        _ => {}
    }
}

/// Secrets serialize as "<redacted>": compare them apart.
fn secret_changes(old: &Config, new: &Config) -> [(&'static str, bool); 4] {
    let ingress_key = |c: &Config| c.ingress.security.as_ref().map(|s| s.shared_key.clone());
    let passwords = |c: &Config| {
        c.ingress.security.as_ref().map(|s| {
            s.users
                .iter()
                .map(|u| u.password.clone())
                .collect::<Vec<_>>()
        })
    };
    let upstream_key = |c: &Config| {
        c.upstream
            .security
            .as_ref()
            .and_then(|s| s.shared_key.clone())
    };
    let token = |c: &Config| c.admin().and_then(|a| a.token);
    [
        (
            "ingress.security.shared_key",
            ingress_key(old) != ingress_key(new),
        ),
        ("ingress.security.users", passwords(old) != passwords(new)),
        (
            "upstream.security.shared_key",
            upstream_key(old) != upstream_key(new),
        ),
        ("admin.token", token(old) != token(new)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const BASE: &str = r#"
[ingress]
listen = "127.0.0.1:24224"
[spool]
path = "data/spool.redb"
[upstream]
ack_timeout = "30s"
[[upstream.nodes]]
name = "a"
address = "127.0.0.1:24225"
[admin]
listen = "127.0.0.1:24231"
token = "one"
"#;

    fn parse(text: &str) -> Config {
        Config::parse(text, Path::new("test.toml")).unwrap()
    }

    const BOUND: Bound = Bound {
        ingress: SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 24224),
        admin: Some(SocketAddr::new(
            std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            24231,
        )),
    };

    fn restart_required(old: &Config, new: &Config) -> Option<Restart> {
        super::restart_required(old, new, &BOUND)
    }

    fn edited(from: &str, to: &str) -> Config {
        assert!(BASE.contains(from), "{from}");
        parse(&BASE.replacen(from, to, 1))
    }

    #[test]
    fn restart_only_keys_are_refused_by_name() {
        let old = parse(BASE);
        for (from, to, key) in [
            (
                "listen = \"127.0.0.1:24224\"",
                "listen = \"127.0.0.1:24299\"",
                "ingress.listen",
            ),
            (
                "[spool]\n",
                "[spool]\ncache_bytes = \"32MiB\"\n",
                "spool.cache_bytes",
            ),
            (
                "path = \"data/spool.redb\"",
                "path = \"other.redb\"",
                "spool.path",
            ),
            (
                "listen = \"127.0.0.1:24231\"",
                "listen = \"127.0.0.1:24232\"",
                "admin.listen",
            ),
            (
                "[ingress]\n",
                "[ingress]\nudp_heartbeat = false\n",
                "ingress.udp_heartbeat",
            ),
            (
                "[upstream]\n",
                "[log]\nformat = \"json\"\n[upstream]\n",
                "log.format",
            ),
        ] {
            let restart = restart_required(&old, &edited(from, to));
            assert_eq!(
                restart.map(|r| r.key).as_deref(),
                Some(key),
                "{from} → {to}"
            );
        }
        let without_admin = parse(&BASE.replace(
            "[admin]\nlisten = \"127.0.0.1:24231\"\ntoken = \"one\"\n",
            "",
        ));
        assert_eq!(
            restart_required(&old, &without_admin)
                .map(|r| r.key)
                .as_deref(),
            Some("admin.listen"),
            "removing [admin] unbinds a listener"
        );
    }

    #[test]
    fn a_file_naming_the_port_a_listener_got_changes_no_listener() {
        let on_port_0 = parse(
            &BASE
                .replace("127.0.0.1:24224", "127.0.0.1:0")
                .replace("127.0.0.1:24231", "127.0.0.1:0"),
        );
        assert_eq!(
            restart_required(&on_port_0, &parse(BASE)),
            None,
            "the bound ports"
        );
        assert!(changed_keys(&on_port_0, &parse(BASE)).is_empty());
        let other = parse(&BASE.replace("127.0.0.1:24224", "127.0.0.1:24299"));
        assert_eq!(
            restart_required(&on_port_0, &other)
                .map(|r| r.key)
                .as_deref(),
            Some("ingress.listen")
        );
    }

    #[test]
    fn live_keys_need_no_restart_and_are_named() {
        let old = parse(BASE);
        let new = edited("ack_timeout = \"30s\"", "ack_timeout = \"5s\"\nwindow = 8");
        assert_eq!(restart_required(&old, &new), None);
        assert_eq!(
            changed_keys(&old, &new),
            vec!["upstream.ack_timeout", "upstream.window"]
        );
        let new = edited("token = \"one\"", "token = \"two\"");
        assert_eq!(restart_required(&old, &new), None);
        assert_eq!(
            changed_keys(&old, &new),
            vec!["admin.token"],
            "a secret's change is seen though never printed"
        );
        let new = edited(
            "[ingress]\n",
            "[ingress]\nallow = [\"10.0.0.0/8\"]\nmax_connections = 7\n",
        );
        assert_eq!(
            changed_keys(&old, &new),
            vec!["ingress.allow", "ingress.max_connections"]
        );
        assert!(changed_keys(&old, &parse(BASE)).is_empty());
    }

    #[test]
    fn nodes_are_left_to_the_node_diff() {
        let old = parse(BASE);
        let new = edited("name = \"a\"", "name = \"b\"");
        assert_eq!(restart_required(&old, &new), None);
        assert!(
            changed_keys(&old, &new).is_empty(),
            "{:?}",
            changed_keys(&old, &new)
        );
    }

    #[test]
    fn emptying_the_nodes_of_route_original_needs_a_restart() {
        let original = BASE
            .replace("[spool]", "transparent = \"redirect\"\n[spool]")
            .replace("[upstream]\n", "[upstream]\nroute = \"original\"\n");
        let old = parse(&original);
        let empty = parse(&original.replace(
            "[[upstream.nodes]]\nname = \"a\"\naddress = \"127.0.0.1:24225\"\n",
            "",
        ));
        assert_eq!(
            restart_required(&old, &empty).map(|r| r.key).as_deref(),
            Some("upstream.nodes")
        );
        assert_eq!(
            restart_required(&parse(BASE), &old)
                .map(|r| r.key)
                .as_deref(),
            Some("upstream.route")
        );
    }
}
