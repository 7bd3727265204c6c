//! What `ackgate check` can tell about transparent mode on this host: whether the process has
//! the capability `upstream.socket_mark` needs, whether a nat `REDIRECT` rule sends traffic to
//! the listen port, and whether such a rule in OUTPUT lets ackgate's own traffic through.
//! Findings are advice, printed to stderr: a gateway's rules are not visible from here.

use std::process::Command;

use crate::config::{Config, Transparent};

/// Every finding for `config` on this host, one line each; empty when nothing is missing.
pub fn findings(config: &Config) -> Vec<String> {
    let mark = config.upstream.socket_mark;
    let transparent = config.ingress.transparent == Transparent::Redirect;
    let mut found = Vec::new();
    if let (Some(mark), Some(false)) = (mark, super::has_net_admin()) {
        found.push(format!(
            "upstream.socket_mark = {mark} needs CAP_NET_ADMIN, which this process does not have: \
             `ackgate run` will refuse to start (systemd: AmbientCapabilities=CAP_NET_ADMIN)"
        ));
    }
    if !transparent {
        return found;
    }
    let port = config.ingress.listen.port();
    if port == 0 {
        found.push(
            "ingress.listen has port 0: the kernel picks a new port at every start, which no REDIRECT rule can name"
                .to_string(),
        );
        return found;
    }
    match nat_rules() {
        Ok(rules) => found.extend(judge_rules(&rules, port, mark)),
        Err(why) => found.push(format!(
            "cannot read this host's nat rules to check the REDIRECT rule ({why}); run `ackgate check` as root to have them checked"
        )),
    }
    found
}

/// The nat table as iptables-save (IPv4 and IPv6) and nft print it; an error only when no
/// tool could print anything.
fn nat_rules() -> Result<String, String> {
    let mut text = String::new();
    let mut errors = Vec::new();
    for command in [
        &["iptables-save", "-t", "nat"][..],
        &["ip6tables-save", "-t", "nat"],
        &["nft", "list", "ruleset"],
    ] {
        match Command::new(command[0]).args(&command[1..]).output() {
            Ok(out) if out.status.success() => {
                text.push_str(&String::from_utf8_lossy(&out.stdout));
                text.push('\n');
            }
            Ok(out) => errors.push(format!(
                "{}: {}",
                command[0],
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => errors.push(format!("{}: {e}", command[0])),
        }
    }
    if text.trim().is_empty() && !errors.is_empty() {
        return Err(errors.join("; "));
    }
    Ok(text)
}

/// Judge the rules that redirect to `port` (iptables-save or nft text).
fn judge_rules(rules: &str, port: u16, mark: Option<u32>) -> Vec<String> {
    let iptables_target = format!("--to-ports {port}");
    let nft_target = format!("redirect to :{port}");
    let redirects: Vec<&str> = rules
        .lines()
        .map(str::trim)
        .filter(|line| {
            let iptables = line.contains("REDIRECT")
                && line
                    .split(&iptables_target)
                    .nth(1)
                    .is_some_and(|after| !after.starts_with(|c: char| c.is_ascii_digit()));
            iptables || line.ends_with(&nft_target) || line.contains(&format!("{nft_target} "))
        })
        .collect();
    if redirects.is_empty() {
        return vec![format!(
            "ingress.transparent = \"redirect\" but no nat REDIRECT rule on this host sends traffic to port {port}: \
             fine if a gateway redirects; on a sender's host add the rule from README \"Transparent mode\""
        )];
    }
    let mut found = Vec::new();
    for rule in redirects {
        // Only locally generated traffic (OUTPUT) can be ackgate's own; a gateway's
        // PREROUTING rule never sees it. nft prints chains as blocks, so its lines all count.
        let output_chain = rule.starts_with("-A OUTPUT") || !rule.starts_with("-A ");
        if !output_chain {
            continue;
        }
        let excludes_owner = rule.contains("owner");
        let excludes_mark = rule.contains("mark");
        match (mark, excludes_mark, excludes_owner) {
            (_, _, true) => {}
            (_, false, false) => found.push(format!(
                "the REDIRECT rule `{rule}` does not exclude ackgate's own traffic: its upstream connections to an address \
                 this rule matches come back into it and are refused as a loop. Set upstream.socket_mark and add \
                 `-m mark ! --mark <mark>` (nft: `meta mark != <mark>`), or `-m owner ! --uid-owner <ackgate's user>`"
            )),
            (None, true, false) => found.push(format!(
                "the REDIRECT rule `{rule}` excludes a mark, but upstream.socket_mark is not set: ackgate's own \
                 connections carry no mark and come back into it"
            )),
            (Some(mark), true, false) => {
                let hex = format!("0x{mark:x}");
                let padded = format!("0x{mark:08x}");
                let names_mark = rule.split(|c: char| c.is_whitespace() || c == '/').any(|word| {
                    word == hex || word == padded || word == mark.to_string()
                });
                if !names_mark {
                    found.push(format!(
                        "the REDIRECT rule `{rule}` does not name upstream.socket_mark = {mark} ({hex})"
                    ));
                }
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAME_HOST: &str = "\
*nat
:OUTPUT ACCEPT [0:0]
-A OUTPUT -d 10.0.0.5/32 -p tcp -m tcp --dport 24224 -m mark ! --mark 0x2a -j REDIRECT --to-ports 24224
-A OUTPUT -d 10.0.0.5/32 -p udp -m udp --dport 24224 -m mark ! --mark 0x2a -j REDIRECT --to-ports 24224
COMMIT
";

    #[test]
    fn a_rule_that_excludes_our_mark_is_fine() {
        assert!(judge_rules(SAME_HOST, 24224, Some(42)).is_empty());
    }

    #[test]
    fn a_missing_rule_is_reported_with_the_port() {
        let found = judge_rules(SAME_HOST, 24230, Some(42));
        assert_eq!(found.len(), 1);
        assert!(found[0].contains("port 24230"), "{found:?}");
        // 242240 is not 24224.
        let found = judge_rules(
            &SAME_HOST.replace("--to-ports 24224", "--to-ports 242240"),
            24224,
            Some(42),
        );
        assert!(found[0].contains("no nat REDIRECT rule"), "{found:?}");
    }

    #[test]
    fn an_output_rule_without_exclusion_or_with_another_mark_is_reported() {
        let bare = SAME_HOST.replace("-m mark ! --mark 0x2a ", "");
        let found = judge_rules(&bare, 24224, Some(42));
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found[0].contains("loop"), "{found:?}");
        let found = judge_rules(SAME_HOST, 24224, Some(7));
        assert!(
            found[0].contains("does not name upstream.socket_mark = 7"),
            "{found:?}"
        );
        let found = judge_rules(SAME_HOST, 24224, None);
        assert!(found[0].contains("socket_mark is not set"), "{found:?}");
        let owner = SAME_HOST.replace("-m mark ! --mark 0x2a", "-m owner ! --uid-owner 998");
        assert!(judge_rules(&owner, 24224, None).is_empty());
    }

    #[test]
    fn a_gateway_rule_never_loops_and_nft_rules_are_read() {
        let gateway =
            "-A PREROUTING -i eth1 -p tcp -m tcp --dport 24224 -j REDIRECT --to-ports 24224\n";
        assert!(judge_rules(gateway, 24224, None).is_empty());
        let nft = "table ip nat {\n chain output {\n  ip daddr 10.0.0.5 tcp dport 24224 meta mark != 0x0000002a redirect to :24224\n }\n}\n";
        assert!(judge_rules(nft, 24224, Some(42)).is_empty());
        let found = judge_rules(nft, 24224, Some(43));
        assert!(found[0].contains("(0x2b)"), "{found:?}");
    }
}
