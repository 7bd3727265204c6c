//! ackgate's TOML configuration: typed, defaulted, and strict.
//!
//! Unknown keys are errors (`deny_unknown_fields`), durations are strings with a unit ("30s",
//! "500ms"), sizes are integers or strings with a unit ("1GiB", "16MiB"). Every error names the
//! key and the problem, so `ackgate check` can point an operator at the line to fix.
//! config/ackgate.toml documents every key; the doc comments here say the same things.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

mod validate;
mod values;

pub use values::{split_host_port, ByteSize, Cidr, DestinationRule, HumanDuration, Secret};

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: key `{key}`: {problem}")]
    Invalid {
        path: PathBuf,
        key: String,
        problem: String,
    },
}

/// The whole file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub ingress: IngressConfig,
    pub spool: SpoolConfig,
    pub upstream: UpstreamConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// The admin listener: metrics, health, the JSON API; off unless `[admin] listen` is set.
    #[serde(default)]
    pub admin: Option<AdminConfig>,
    /// The old name of `[admin]` (only `listen`): still read, with a warning.
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
}

/// `[metrics]`: the old name of `[admin]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    pub listen: SocketAddr,
}

/// `[admin]`: `/metrics`, `/health`, `/ready`, `POST /retry` and the JSON API (`/api/…`) over
/// HTTP on their own address, for `ackgate status`, `ackgate top` and `ackgate spool` on a
/// running relay.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// Bearer token every request but /health and /ready must carry. Required when `listen`
    /// is not a loopback address.
    #[serde(default)]
    pub token: Option<Secret>,
    /// Connections served at once; more wait in the accept queue.
    #[serde(default = "default_admin_connections")]
    pub max_connections: u32,
    /// Deadline for reading a request's head and for answering it.
    #[serde(default = "default_admin_request_timeout")]
    pub request_timeout: HumanDuration,
}

impl AdminConfig {
    fn from_listen(listen: SocketAddr) -> AdminConfig {
        AdminConfig {
            listen,
            token: None,
            max_connections: default_admin_connections(),
            request_timeout: default_admin_request_timeout(),
        }
    }
}

fn default_admin_connections() -> u32 {
    64
}
fn default_admin_request_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}

/// `[ingress]`: the side facing senders.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IngressConfig {
    /// TCP address for Forward traffic; UDP heartbeats are answered on the same address.
    pub listen: SocketAddr,
    /// Largest request accepted, as bytes on the wire. Legacy senders send up to 8 MiB chunks.
    #[serde(default = "default_max_frame_bytes")]
    pub max_frame_bytes: ByteSize,
    /// Largest inflated size of a compressed request (fluentd's own limit is 256 MiB).
    #[serde(default = "default_max_decompressed_bytes")]
    pub max_decompressed_bytes: ByteSize,
    /// Connections served at once; further connections wait in the kernel's accept queue.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// A connection that sends nothing for this long (and has no ack pending) is closed.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: HumanDuration,
    /// Requests read ahead on one connection while earlier ones wait for their commit.
    #[serde(default = "default_max_pending_frames")]
    pub max_pending_frames: u32,
    /// Bytes of unfinished requests held in memory by all connections together, beyond
    /// 16 KiB per connection: a connection that needs more waits (its socket is not read), so
    /// memory stays bounded however many peers start large requests. At least max_frame_bytes.
    #[serde(default = "default_max_partial_bytes")]
    pub max_partial_bytes: ByteSize,
    /// Answer UDP heartbeats (`\0`) on the listen address. fluentd v0.10/v0.12 senders detach a
    /// node for good when these go unanswered (PROTOCOL.md §8.1).
    #[serde(default = "default_true")]
    pub udp_heartbeat: bool,
    /// Source networks allowed to connect (CIDRs such as "10.0.0.0/8" or "127.0.0.1/32").
    /// Empty (the default): every source. Rejected connections are logged with the peer.
    #[serde(default)]
    pub allow: Vec<Cidr>,
    /// Deadline for the TLS and shared-key handshakes of a new connection.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout: HumanDuration,
    /// Chunk ids remembered per sender address: a sender that resends a chunk whose ack it
    /// lost is acked again without the chunk being spooled twice. 0 turns this off.
    #[serde(default = "default_recent_chunks")]
    pub recent_chunks_per_peer: u32,
    /// Shared-key handshake required from senders (fluentd's `<security>`).
    #[serde(default)]
    pub security: Option<IngressSecurity>,
    /// TLS on the listen port (fluentd's `<transport tls>`).
    #[serde(default)]
    pub tls: Option<IngressTls>,
    /// "redirect": connections that iptables/nftables `REDIRECT` sent here are accepted, and
    /// each one's original destination is read (`SO_ORIGINAL_DST`) for the allow-list, the
    /// logs, the metrics and `upstream.route = "original"`. "off" (the default): it is not
    /// read.
    #[serde(default)]
    pub transparent: Transparent,
    /// Original destinations a redirected connection may have ("10.0.0.0/8",
    /// "10.1.2.3:24224", "[2001:db8::/32]:24224"). Empty (the default): any. The rest are
    /// refused and logged with the peer and the destination. Needs `transparent = "redirect"`.
    #[serde(default)]
    pub allow_destinations: Vec<DestinationRule>,
}

/// `ingress.transparent`.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Transparent {
    #[default]
    Off,
    Redirect,
}

/// `[ingress.security]`: fluentd's in_forward `<security>` section.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IngressSecurity {
    /// Our name in the PONG; senders refuse a server with their own self_hostname.
    pub self_hostname: String,
    /// The key every sender must prove it knows.
    pub shared_key: Secret,
    /// Also require a username and password from `users`.
    #[serde(default)]
    pub user_auth: bool,
    #[serde(default)]
    pub users: Vec<UserConfig>,
}

/// `[[ingress.security.users]]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub username: String,
    pub password: Secret,
}

/// `[ingress.tls]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IngressTls {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key of `cert`.
    pub key: PathBuf,
    /// PEM CA: when set, every sender must present a client certificate signed by it.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

/// `[spool]`: the redb file where every accepted batch waits for its upstream ack.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    /// Path of the redb database file (created if missing; its directory too).
    pub path: PathBuf,
    /// Bytes of queued records at which ingress stops reading (TCP backpressure).
    #[serde(default = "default_max_bytes")]
    pub max_bytes: ByteSize,
    /// Most request bytes written in one group commit (one fsync).
    #[serde(default = "default_group_commit_bytes")]
    pub group_commit_bytes: ByteSize,
    /// redb page cache size.
    #[serde(default = "default_cache_bytes")]
    pub cache_bytes: ByteSize,
    /// Bound on dead letters (undeliverable records, rejected requests); past it the oldest
    /// are evicted with an error log.
    #[serde(default = "default_dead_letter_max_bytes")]
    pub dead_letter_max_bytes: ByteSize,
    /// Records older than this are moved to the dead letters instead of being retried
    /// forever. Unset (the default): retried until acked.
    #[serde(default)]
    pub max_age: Option<HumanDuration>,
}

/// `[upstream]`: the aggregators ackgate forwards to.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// A chunk not acked this long after it was written aborts its connection; its records are
    /// sent again with the same chunk ids.
    #[serde(default = "default_ack_timeout")]
    pub ack_timeout: HumanDuration,
    /// Deadline for the TCP connect to a node.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: HumanDuration,
    /// Chunks in flight (written, not yet acked) per connection.
    #[serde(default = "default_window")]
    pub window: u32,
    /// Entry bytes in flight per connection (at least one chunk is always allowed). With
    /// `window`, this is what keeps throughput up on a long round trip: bytes per RTT.
    #[serde(default = "default_window_bytes")]
    pub window_bytes: ByteSize,
    /// First retry delay after a failure; doubles per attempt, with jitter.
    #[serde(default = "default_retry_initial")]
    pub retry_initial: HumanDuration,
    /// Longest retry delay.
    #[serde(default = "default_retry_max")]
    pub retry_max: HumanDuration,
    /// A record that has failed this many times while other chunks were acked is split in
    /// two (or, holding one event, moved to the dead letters): aggregators drop some chunks
    /// silently (fluentd's chunk_size_limit) and would otherwise be retried forever.
    #[serde(default = "default_split_after_attempts")]
    pub split_after_attempts: u32,
    /// How long shutdown waits for in-flight chunks to be acked before closing.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace: HumanDuration,
    /// How node health is probed: "transport" (connect, handshake if configured, close),
    /// "tcp" (alias of transport), "udp" (`\0` datagram to the node's port), or "none" (a
    /// node's own connections decide). Same names and meaning as fluentd's out_forward.
    #[serde(default = "default_heartbeat_type")]
    pub heartbeat_type: HeartbeatType,
    /// Time between heartbeats to each node.
    #[serde(default = "default_heartbeat_interval")]
    pub heartbeat_interval: HumanDuration,
    /// phi accrual threshold above which a node is detached (fluentd default 16).
    #[serde(default = "default_phi_threshold")]
    pub phi_threshold: f64,
    /// Use the phi accrual detector (else only hard_timeout detaches a node).
    #[serde(default = "default_true")]
    pub phi_failure_detector: bool,
    /// A node without a heartbeat reply for this long is detached.
    #[serde(default = "default_hard_timeout")]
    pub hard_timeout: HumanDuration,
    /// A detached node is used again after this long of steady heartbeats.
    #[serde(default = "default_recover_wait")]
    pub recover_wait: HumanDuration,
    /// Handshake defaults for every node.
    #[serde(default)]
    pub security: Option<UpstreamSecurity>,
    /// `SO_MARK` set on every socket towards a node (connections and UDP heartbeats), so a
    /// transparent-mode `REDIRECT` rule that skips this mark does not send ackgate's own
    /// traffic back into it. Needs CAP_NET_ADMIN. Unset (the default): no mark.
    #[serde(default)]
    pub socket_mark: Option<u32>,
    /// "configured" (the default): every record goes to `[[upstream.nodes]]`. "original": a
    /// record from a redirected connection goes to the aggregator its sender addressed (a node
    /// per original destination, created on first use with this section's settings); records
    /// without one go to `[[upstream.nodes]]`, which may then be empty. Needs
    /// `ingress.transparent = "redirect"`.
    #[serde(default)]
    pub route: RouteMode,
    /// Route "original": the most original destinations with a node of their own; connections
    /// to further ones are refused, logged.
    #[serde(default = "default_max_destinations")]
    pub max_destinations: u32,
    /// Aggregators; at least one, unless `route = "original"`.
    #[serde(default)]
    pub nodes: Vec<NodeConfig>,
}

impl NodeConfig {
    /// A node at `address` with every other key at its default (route "original").
    pub fn at(address: &str) -> Result<NodeConfig, String> {
        let mut table = toml::Table::new();
        table.insert("address".into(), address.into());
        NodeConfig::deserialize(toml::Value::Table(table)).map_err(|e| e.to_string())
    }
}

/// `upstream.route`.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum RouteMode {
    #[default]
    Configured,
    Original,
}

/// `upstream.heartbeat_type`.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum HeartbeatType {
    Transport,
    Tcp,
    Udp,
    None,
}

/// `[[upstream.nodes]]`: one aggregator.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// host:port of a Forward receiver that acks (`require_ack_response`-style).
    pub address: String,
    /// Name in logs and metrics; defaults to the address.
    #[serde(default)]
    pub name: Option<String>,
    /// Share of records among available primaries (fluentd default 60; 0 = never used).
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// A standby node takes records only while no primary node is available.
    #[serde(default)]
    pub standby: bool,
    /// "text" (none) or "gzip": compress the entries of each chunk sent to this node.
    #[serde(default)]
    pub compress: Compress,
    /// Rewrite `[[time, {}], record]` entries to `[time, record]` for this node: fluentd up to
    /// 1.19 cannot read fluent-bit ≥ 5's empty v1.5 metadata. The only case where ackgate
    /// changes event bytes; off by default.
    #[serde(default)]
    pub strip_empty_metadata: bool,
    /// Shared key for this node's handshake; defaults to `upstream.security.shared_key`.
    #[serde(default)]
    pub shared_key: Option<Secret>,
    /// User for aggregators with `user_auth` (sent only when the HELO asks for it).
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<Secret>,
    /// Connect with TLS (fluentd's `transport tls`).
    #[serde(default)]
    pub tls: bool,
    /// PEM CA to trust for this node; without it the system's roots.
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// Verify the node's certificate and name (default true). false: encrypted but not
    /// authenticated, for lab setups only.
    #[serde(default = "default_true")]
    pub tls_verify: bool,
    /// Client certificate and key (PEM) for aggregators that require one.
    #[serde(default)]
    pub tls_client_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_client_key: Option<PathBuf>,
    /// Name to verify (and send as SNI) instead of the address's host.
    #[serde(default)]
    pub tls_server_name: Option<String>,
}

/// `[upstream.security]`: handshake settings for every node (fluentd's out_forward
/// `<security>`); a node's own `shared_key` overrides the key.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSecurity {
    /// Our name in the PING; must differ from the aggregator's self_hostname.
    pub self_hostname: String,
    #[serde(default)]
    pub shared_key: Option<Secret>,
}

/// `upstream.nodes[].compress`.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Compress {
    #[default]
    Text,
    Gzip,
}

impl NodeConfig {
    pub fn display_name(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.address)
    }
}

/// `[log]`: what ackgate writes to stderr.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// tracing filter, e.g. "info" or "ackgate=debug". `RUST_LOG` overrides it.
    #[serde(default = "default_log_level")]
    pub level: String,
    /// "text" (readable) or "json" (one object per line).
    #[serde(default)]
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: default_log_level(),
            format: LogFormat::Text,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

fn default_true() -> bool {
    true
}
fn default_max_frame_bytes() -> ByteSize {
    ByteSize(16 << 20)
}
fn default_max_decompressed_bytes() -> ByteSize {
    ByteSize(256 << 20)
}
fn default_max_connections() -> u32 {
    4096
}
fn default_idle_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(300))
}
fn default_max_partial_bytes() -> ByteSize {
    ByteSize(256 << 20)
}
fn default_max_pending_frames() -> u32 {
    64
}
fn default_handshake_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
fn default_recent_chunks() -> u32 {
    1024
}
fn default_max_bytes() -> ByteSize {
    ByteSize(1 << 30)
}
fn default_group_commit_bytes() -> ByteSize {
    ByteSize(8 << 20)
}
fn default_cache_bytes() -> ByteSize {
    ByteSize(16 << 20)
}
fn default_dead_letter_max_bytes() -> ByteSize {
    ByteSize(256 << 20)
}
fn default_split_after_attempts() -> u32 {
    4
}
fn default_ack_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
fn default_connect_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}
fn default_max_destinations() -> u32 {
    64
}
fn default_window() -> u32 {
    64
}
fn default_window_bytes() -> ByteSize {
    ByteSize(32 << 20)
}
fn default_retry_initial() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}
fn default_retry_max() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}
fn default_shutdown_grace() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}
fn default_heartbeat_type() -> HeartbeatType {
    HeartbeatType::None
}
fn default_heartbeat_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}
fn default_phi_threshold() -> f64 {
    16.0
}
fn default_hard_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}
fn default_recover_wait() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
fn default_weight() -> u32 {
    60
}
fn default_log_level() -> String {
    "info".to_string()
}

impl Config {
    /// Read, parse and validate a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parse and validate config text; `path` is only used in messages and to resolve the
    /// spool path (relative paths are relative to the working directory, like fluentd's).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: describe_toml_error(&e),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    /// The admin listener's settings: `[admin]`, or the old `[metrics] listen`.
    pub fn admin(&self) -> Option<AdminConfig> {
        match (&self.admin, &self.metrics) {
            (Some(admin), _) => Some(admin.clone()),
            (None, Some(metrics)) => Some(AdminConfig::from_listen(metrics.listen)),
            (None, None) => None,
        }
    }

    /// The effective configuration, every default filled in, as TOML (`ackgate check`).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// toml's messages already name the key and show the line; keep them, on one line each.
fn describe_toml_error(e: &toml::de::Error) -> String {
    e.to_string().trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[ingress]
listen = "127.0.0.1:24224"
[spool]
path = "data/spool.redb"
max_bytes = "1GiB"
[upstream]
ack_timeout = "30s"
[[upstream.nodes]]
address = "127.0.0.1:24225"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    #[test]
    fn durations_print_in_the_unit_that_states_them_exactly() {
        for (text, shown) in [
            ("168h", "168h"),
            ("604800s", "168h"),
            ("90m", "90m"),
            ("90s", "90s"),
            ("1500ms", "1500ms"),
            ("0s", "0s"),
            ("0.5s", "500ms"),
        ] {
            let d = HumanDuration(HumanDuration::parse(text).unwrap());
            assert_eq!(d.to_string(), shown, "{text}");
            assert_eq!(HumanDuration::parse(shown), Ok(d.0), "{shown} reads back");
        }
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.spool.max_bytes, ByteSize(1 << 30));
        assert_eq!(config.upstream.ack_timeout.0, Duration::from_secs(30));
        assert_eq!(config.upstream.window, 64);
        assert_eq!(config.ingress.max_frame_bytes, ByteSize(16 << 20));
        // The effective config parses back to the same values.
        let again = parse(&config.to_toml()).unwrap();
        assert_eq!(again.spool.max_bytes, config.spool.max_bytes);
        assert_eq!(again.upstream.ack_timeout, config.upstream.ack_timeout);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = parse(&MINIMAL.replace("[spool]", "[spool]\nmax_byts = 5"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_byts"), "{err}");
    }

    #[test]
    fn bad_values_name_key_and_problem() {
        let err = parse(&MINIMAL.replace("\"30s\"", "\"30 parsecs\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("ack_timeout") && err.contains("unit"), "{err}");
        let err = parse(&MINIMAL.replace("\"1GiB\"", "\"1 GB of logs\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_bytes"), "{err}");
        let err = parse(&MINIMAL.replace("127.0.0.1:24225", "nohost"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("upstream.nodes[0].address"), "{err}");
        let err = parse(&MINIMAL.replace("\"1GiB\"", "1000"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("spool.max_bytes"), "{err}");
    }

    #[test]
    fn transparent_mode_keys_parse_and_name_their_problems() {
        let config = parse(&MINIMAL.replace(
            "[spool]",
            "transparent = \"redirect\"\nallow_destinations = [\"10.0.0.0/8:24224\", \"[2001:db8::/32]:24224\", \"192.0.2.7\"]\n[spool]",
        ))
        .unwrap();
        assert_eq!(config.ingress.transparent, Transparent::Redirect);
        let rules = &config.ingress.allow_destinations;
        assert!(rules[0].contains("10.1.2.3:24224".parse().unwrap()));
        assert!(!rules[0].contains("10.1.2.3:24225".parse().unwrap()));
        assert!(rules[1].contains("[2001:db8::5]:24224".parse().unwrap()));
        assert!(rules[2].contains("192.0.2.7:1".parse().unwrap()));
        // What `check` prints parses back to the same rules.
        let again = parse(&config.to_toml()).unwrap();
        assert_eq!(again.ingress.allow_destinations, *rules);

        let err =
            parse(&MINIMAL.replace("[spool]", "allow_destinations = [\"10.0.0.0/8\"]\n[spool]"))
                .unwrap_err()
                .to_string();
        assert!(
            err.contains("ingress.allow_destinations") && err.contains("redirect"),
            "{err}"
        );
        let err = parse(&MINIMAL.replace(
            "[spool]",
            "transparent = \"redirect\"\nallow_destinations = [\"10.0.0.0/8:http\"]\n[spool]",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("allow_destinations") && err.contains("port"),
            "{err}"
        );
        let err = parse(&MINIMAL.replace("[spool]", "transparent = \"tproxy\"\n[spool]"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("transparent"), "{err}");
        let err =
            parse(&MINIMAL.replace("[[upstream.nodes]]", "socket_mark = 0\n[[upstream.nodes]]"))
                .unwrap_err()
                .to_string();
        assert!(err.contains("upstream.socket_mark"), "{err}");
        let config = parse(&MINIMAL.replace(
            "[[upstream.nodes]]",
            "socket_mark = 0x2a\n[[upstream.nodes]]",
        ))
        .unwrap();
        assert_eq!(config.upstream.socket_mark, Some(42));
    }

    #[test]
    fn units() {
        assert_eq!(ByteSize::parse("16MiB"), Ok(16 << 20));
        assert_eq!(ByteSize::parse("10GB"), Ok(10_000_000_000));
        assert_eq!(ByteSize::parse("512"), Ok(512));
        assert_eq!(
            HumanDuration::parse("250ms"),
            Ok(Duration::from_millis(250))
        );
        assert_eq!(HumanDuration::parse("2m"), Ok(Duration::from_secs(120)));
        assert!(HumanDuration::parse("30").is_err());
        assert_eq!(ByteSize(1 << 30).to_string(), "1GiB");
        assert_eq!(
            HumanDuration(Duration::from_millis(1500)).to_string(),
            "1500ms"
        );
    }
}
