//! config/ackgate.toml documents every key, most of them commented out (`# key = value`).
//! With every such line uncommented (section headers included, certificate paths pointing at
//! files generated for the test), the file must still pass `ackgate check`, and the keys must
//! take effect: every documented key parses.

mod support;

use std::path::Path;

use support::*;

/// A commented-out line that is TOML on its own: a `[section]` / `[[array]]` header or a
/// `key = value` pair (trailing comments allowed). Prose comments are not.
fn commented_toml(line: &str) -> Option<&str> {
    let rest = line.strip_prefix('#')?.trim_start();
    let is_header = rest.starts_with('[') && rest.contains(']');
    let is_pair = rest.split_once('=').is_some_and(|(key, _)| {
        let key = key.trim();
        !key.is_empty()
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
    });
    if !(is_header || is_pair) {
        return None;
    }
    // Only lines that parse as TOML by themselves (a header may need a key to follow it).
    let probe = if is_header {
        format!("{rest}\nprobe = 1\n")
    } else {
        rest.to_string()
    };
    toml::from_str::<toml::Table>(&probe).ok().map(|_| rest)
}

/// The example with every commented-out TOML line uncommented, certificate paths pointing at
/// `certs` and the spool at `spool`; and the lines uncommented.
fn uncommented_example(certs: &Pki, spool: &Path) -> (String, Vec<String>) {
    let example_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/ackgate.toml");
    let example = std::fs::read_to_string(&example_path).expect("read config/ackgate.toml");
    let replacements = [
        ("\"certs/server.pem\"", toml_path(&certs.server_cert)),
        ("\"certs/server.key\"", toml_path(&certs.server_key)),
        ("\"certs/ca.pem\"", toml_path(&certs.ca)),
        ("\"certs/client.pem\"", toml_path(&certs.client_cert)),
        ("\"certs/client.key\"", toml_path(&certs.client_key)),
    ];
    let mut uncommented = Vec::new();
    let mut out = String::new();
    for line in example.lines() {
        let line = match commented_toml(line) {
            Some(toml_line) => {
                uncommented.push(toml_line.to_string());
                let mut text = toml_line.to_string();
                for (from, to) in &replacements {
                    text = text.replace(from, to);
                }
                text
            }
            None => line.to_string(),
        };
        out.push_str(&line);
        out.push('\n');
    }
    // Keep the spool inside the temp dir (check does not open it, but a relative path would
    // point into the repository).
    let out = out.replace(
        "path = \"data/spool.redb\"",
        &format!("path = {}", toml_path(spool)),
    );
    (out, uncommented)
}

#[test]
fn every_commented_key_of_the_example_config_parses() {
    let certs = Pki::generate("config example CA");
    let dir = tempfile::tempdir().expect("temp dir");
    let (out, uncommented) = uncommented_example(&certs, &dir.path().join("spool.redb"));
    eprintln!(
        "uncommented {} lines:\n{}",
        uncommented.len(),
        uncommented.join("\n")
    );
    for expected in [
        "[ingress.security]",
        "[[ingress.security.users]]",
        "[ingress.tls]",
        "[upstream.security]",
        "[[upstream.nodes]]",
        "token = ",
    ] {
        assert!(
            uncommented.iter().any(|l| l.starts_with(expected)),
            "{expected} was not found commented out in the example; the transform is off"
        );
    }
    assert!(
        uncommented.len() >= 25,
        "only {} lines uncommented",
        uncommented.len()
    );
    let path = dir.path().join("everything.toml");
    std::fs::write(&path, &out).expect("write transformed config");

    let output = ackgate_command(["check", "--config"])
        .arg(&path)
        .output()
        .expect("run ackgate check");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "ackgate check refused the example with every key uncommented: {stderr}\nconfig:\n{out}"
    );
    assert_uncommented_values_are_effective(&stdout, &certs);
}

/// The uncommented values are the effective ones (`ackgate check` prints those).
fn assert_uncommented_values_are_effective(stdout: &str, certs: &Pki) {
    let effective: toml::Table = toml::from_str(stdout).expect("effective config is TOML");
    let at = |path: &[&str]| -> toml::Value {
        let mut value = toml::Value::Table(effective.clone());
        for part in path {
            value = match (value, part.parse::<usize>()) {
                (toml::Value::Array(a), Ok(i)) => a.get(i).cloned(),
                (toml::Value::Table(t), _) => t.get(*part).cloned(),
                _ => None,
            }
            .unwrap_or_else(|| panic!("effective config lacks {path:?}:\n{stdout}"));
        }
        value
    };
    let s = |path: &[&str]| at(path).as_str().map(str::to_string);
    assert_eq!(
        s(&["ingress", "security", "self_hostname"]).as_deref(),
        Some("ackgate-1")
    );
    assert_eq!(
        s(&["ingress", "security", "users", "0", "username"]).as_deref(),
        Some("alice")
    );
    assert_eq!(
        s(&["ingress", "tls", "client_ca"]),
        Some(certs.ca.to_string_lossy().into_owned())
    );
    let max_age = s(&["spool", "max_age"]);
    assert!(
        matches!(max_age.as_deref(), Some("168h")),
        "spool.max_age: {max_age:?}"
    );
    assert_eq!(
        s(&["upstream", "security", "self_hostname"]).as_deref(),
        Some("ackgate-1")
    );
    assert_eq!(
        s(&["upstream", "nodes", "0", "name"]).as_deref(),
        Some("aggregator-1")
    );
    assert_eq!(at(&["upstream", "nodes", "0", "tls"]).as_bool(), Some(true));
    assert_eq!(
        s(&["upstream", "nodes", "0", "tls_server_name"]).as_deref(),
        Some("aggregator.example")
    );
    assert_eq!(
        at(&["upstream", "nodes", "1", "standby"]).as_bool(),
        Some(true)
    );
    assert_eq!(s(&["admin", "listen"]).as_deref(), Some("127.0.0.1:24231"));
    assert_eq!(
        s(&["admin", "token"]).as_deref(),
        Some("<redacted>"),
        "check never prints the token"
    );
}
