//! ackgate's TOML configuration: typed, defaulted, and strict.
//!
//! Unknown keys are errors (`deny_unknown_fields`), durations are strings with a unit ("30s",
//! "500ms"), sizes are integers or strings with a unit ("1GiB", "16MiB"). Every error names the
//! key and the problem, so `ackgate check` can point an operator at the line to fix.
//! config/ackgate.toml documents every key; the doc comments here say the same things.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

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

/// A password, key or token: read from the file as text, never printed (`ackgate check` and
/// debug output show `"<redacted>"`).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("<redacted>")
    }
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

/// A network in CIDR notation; a bare address means just that host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub network: std::net::IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (address, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let network: std::net::IpAddr = address
            .trim()
            .parse()
            .map_err(|_| format!("{text:?} is not an IP address or CIDR"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{text:?}: prefix must be 0..={max}"))?,
            None => max,
        };
        Ok(Cidr { network, prefix })
    }

    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - self.prefix as u32).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - self.prefix as u32).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Cidr::parse(&text).map_err(de::Error::custom)
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
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
    /// Aggregators; at least one.
    pub nodes: Vec<NodeConfig>,
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
fn default_window() -> u32 {
    32
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

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &str, problem: &str| ConfigError::Invalid {
            path: path.to_path_buf(),
            key: key.to_string(),
            problem: problem.to_string(),
        };
        if self.upstream.nodes.is_empty() {
            return Err(invalid(
                "upstream.nodes",
                "at least one [[upstream.nodes]] entry is required",
            ));
        }
        for (i, node) in self.upstream.nodes.iter().enumerate() {
            if split_host_port(&node.address).is_none() {
                return Err(invalid(
                    &format!("upstream.nodes[{i}].address"),
                    &format!("{:?} is not host:port", node.address),
                ));
            }
        }
        for (i, node) in self.upstream.nodes.iter().enumerate() {
            let has_key = node.shared_key.is_some()
                || self
                    .upstream
                    .security
                    .as_ref()
                    .is_some_and(|s| s.shared_key.is_some());
            if has_key && self.upstream.security.is_none() {
                return Err(invalid(
                    &format!("upstream.nodes[{i}].shared_key"),
                    "needs [upstream.security] self_hostname for the handshake",
                ));
            }
            if node.tls_client_cert.is_some() != node.tls_client_key.is_some() {
                return Err(invalid(
                    &format!("upstream.nodes[{i}].tls_client_cert"),
                    "tls_client_cert and tls_client_key go together",
                ));
            }
            if (node.username.is_some() || node.password.is_some()) && !has_key {
                return Err(invalid(
                    &format!("upstream.nodes[{i}].username"),
                    "user auth is part of the shared-key handshake: set a shared_key",
                ));
            }
        }
        if self.upstream.nodes.iter().all(|n| n.weight == 0) {
            return Err(invalid(
                "upstream.nodes[].weight",
                "at least one node needs a weight above 0",
            ));
        }
        if self.upstream.phi_threshold.is_nan() || self.upstream.phi_threshold <= 0.0 {
            return Err(invalid("upstream.phi_threshold", "must be greater than 0"));
        }
        if self.upstream.heartbeat_interval.0.is_zero() {
            return Err(invalid(
                "upstream.heartbeat_interval",
                "must be greater than 0",
            ));
        }
        if self.upstream.split_after_attempts == 0 {
            return Err(invalid(
                "upstream.split_after_attempts",
                "must be at least 1",
            ));
        }
        if self.upstream.window == 0 {
            return Err(invalid("upstream.window", "must be at least 1"));
        }
        if self.upstream.ack_timeout.0.is_zero() {
            return Err(invalid("upstream.ack_timeout", "must be greater than 0"));
        }
        if self.upstream.retry_initial.0 > self.upstream.retry_max.0 {
            return Err(invalid(
                "upstream.retry_initial",
                "must not be greater than upstream.retry_max",
            ));
        }
        if let Some(security) = &self.ingress.security {
            if security.shared_key.expose().is_empty() {
                return Err(invalid("ingress.security.shared_key", "must not be empty"));
            }
            if security.user_auth && security.users.is_empty() {
                return Err(invalid(
                    "ingress.security.users",
                    "user_auth = true needs at least one [[ingress.security.users]]",
                ));
            }
        }
        if let Some(tls) = &self.ingress.tls {
            for (key, path) in [
                ("ingress.tls.cert", &tls.cert),
                ("ingress.tls.key", &tls.key),
            ] {
                if !path.exists() {
                    return Err(invalid(key, &format!("{} does not exist", path.display())));
                }
            }
        }
        if self.ingress.max_connections == 0 {
            return Err(invalid("ingress.max_connections", "must be at least 1"));
        }
        if self.ingress.max_pending_frames == 0 {
            return Err(invalid("ingress.max_pending_frames", "must be at least 1"));
        }
        if self.ingress.max_frame_bytes.0 < 64 || self.ingress.max_frame_bytes.0 > u32::MAX as u64 {
            return Err(invalid(
                "ingress.max_frame_bytes",
                "must be between 64 bytes and 4GiB",
            ));
        }
        if self.ingress.max_partial_bytes.0 < self.ingress.max_frame_bytes.0
            || self.ingress.max_partial_bytes.0 > (u32::MAX >> 1) as u64
        {
            return Err(invalid(
                "ingress.max_partial_bytes",
                "must be at least ingress.max_frame_bytes (or one request could never be read) and at most 2GiB",
            ));
        }
        if self.spool.max_bytes.0 < self.ingress.max_frame_bytes.0 {
            return Err(invalid(
                "spool.max_bytes",
                "must be at least ingress.max_frame_bytes, or one request could never fit",
            ));
        }
        if self.spool.group_commit_bytes.0 == 0 {
            return Err(invalid(
                "spool.group_commit_bytes",
                "must be greater than 0",
            ));
        }
        if self.spool.path.as_os_str().is_empty() {
            return Err(invalid("spool.path", "must not be empty"));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(invalid("log.level", &e.to_string()));
        }
        self.validate_admin(&invalid)
    }

    fn validate_admin(
        &self,
        invalid: &dyn Fn(&str, &str) -> ConfigError,
    ) -> Result<(), ConfigError> {
        if self.admin.is_some() && self.metrics.is_some() {
            return Err(invalid(
                "metrics",
                "[metrics] is the old name of [admin]: keep only [admin]",
            ));
        }
        let Some(admin) = self.admin() else {
            return Ok(());
        };
        if admin.max_connections == 0 {
            return Err(invalid("admin.max_connections", "must be at least 1"));
        }
        if admin.request_timeout.0.is_zero() {
            return Err(invalid("admin.request_timeout", "must be greater than 0"));
        }
        match &admin.token {
            Some(token) if token.expose().trim().is_empty() => {
                Err(invalid("admin.token", "must not be empty"))
            }
            None if !admin.listen.ip().is_loopback() => Err(invalid(
                "admin.token",
                &format!(
                    "required when admin.listen ({}) is not a loopback address: anyone who can reach it could requeue or purge dead letters",
                    admin.listen
                ),
            )),
            _ => Ok(()),
        }
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

/// Split "host:port" (or "[v6]:port"); `None` if there is no valid port.
pub fn split_host_port(address: &str) -> Option<(&str, u16)> {
    let (host, port) = address.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || port == 0 {
        return None;
    }
    Some((host, port))
}

/// A duration written with its unit: "250ms", "30s", "5m", "1h".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub fn parse(text: &str) -> Result<Duration, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .ok_or_else(|| format!("{text:?} has no unit (use ms, s, m or h)"))?;
        let (number, unit) = text.split_at(split);
        let value: f64 = number
            .parse()
            .map_err(|_| format!("{text:?} does not start with a number"))?;
        let seconds = match unit.trim() {
            "ms" => value / 1000.0,
            "s" => value,
            "m" => value * 60.0,
            "h" => value * 3600.0,
            other => {
                return Err(format!(
                    "unknown unit {other:?} in {text:?} (use ms, s, m or h)"
                ))
            }
        };
        if !seconds.is_finite() || !(0.0..=10.0 * 365.0 * 86400.0).contains(&seconds) {
            return Err(format!("{text:?} is out of range"));
        }
        Ok(Duration::from_secs_f64(seconds))
    }
}

/// The largest unit that states the value exactly: `max_age = "168h"` prints as "168h", not
/// "604800s"; "90s" stays "90s"; "1500ms" stays "1500ms".
impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        match ms {
            0 => write!(f, "0s"),
            _ if ms % 3_600_000 == 0 => write!(f, "{}h", ms / 3_600_000),
            _ if ms % 60_000 == 0 => write!(f, "{}m", ms / 60_000),
            _ if ms % 1000 == 0 => write!(f, "{}s", ms / 1000),
            _ => write!(f, "{ms}ms"),
        }
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        HumanDuration::parse(&text)
            .map(HumanDuration)
            .map_err(de::Error::custom)
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// A byte count: an integer, or a string with a unit ("512KiB", "16MiB", "1GiB", "10GB").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(text: &str) -> Result<u64, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let value: f64 = number
            .parse()
            .map_err(|_| format!("{text:?} does not start with a number"))?;
        let multiplier: f64 = match unit.trim() {
            "" | "B" => 1.0,
            "KiB" => 1024.0,
            "MiB" => 1024.0 * 1024.0,
            "GiB" => 1024.0 * 1024.0 * 1024.0,
            "TiB" => 1024.0f64.powi(4),
            "KB" | "kB" => 1e3,
            "MB" => 1e6,
            "GB" => 1e9,
            "TB" => 1e12,
            other => {
                return Err(format!(
                    "unknown unit {other:?} in {text:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB)"
                ))
            }
        };
        let bytes = value * multiplier;
        if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
            return Err(format!("{text:?} is out of range"));
        }
        Ok(bytes as u64)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 3] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
        for (name, size) in UNITS {
            if self.0 >= size && self.0 % size == 0 {
                return write!(f, "{}{name}", self.0 / size);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a byte count such as 1048576 or \"1MiB\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map(ByteSize).map_err(E::custom)
            }
        }
        d.deserialize_any(SizeVisitor)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
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
        assert_eq!(config.upstream.window, 32);
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
