//! What a parsed config must satisfy beyond its types, one function per section. Every error
//! names the key and the problem, so `ackgate check` points at the line to fix.

use std::path::Path;

use super::{split_host_port, Config, ConfigError};

/// Builds the error for a key.
type Invalid<'a> = &'a dyn Fn(&str, &str) -> ConfigError;

impl Config {
    pub(super) fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &str, problem: &str| ConfigError::Invalid {
            path: path.to_path_buf(),
            key: key.to_string(),
            problem: problem.to_string(),
        };
        self.validate_nodes(&invalid)?;
        self.validate_upstream(&invalid)?;
        self.validate_ingress(&invalid)?;
        self.validate_spool(&invalid)?;
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(invalid("log.level", &e.to_string()));
        }
        self.validate_admin(&invalid)
    }

    /// `[[upstream.nodes]]`: addresses, handshake and TLS settings that go together, weights.
    fn validate_nodes(&self, invalid: Invalid) -> Result<(), ConfigError> {
        let original = self.upstream.route == super::RouteMode::Original;
        if self.upstream.nodes.is_empty() && !original {
            return Err(invalid(
                "upstream.nodes",
                "at least one [[upstream.nodes]] entry is required (unless upstream.route = \"original\")",
            ));
        }
        if original && self.ingress.transparent != super::Transparent::Redirect {
            return Err(invalid(
                "upstream.route",
                "\"original\" needs ingress.transparent = \"redirect\" (only redirected connections have an original destination)",
            ));
        }
        if original && self.upstream.max_destinations == 0 {
            return Err(invalid("upstream.max_destinations", "must be at least 1"));
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
        if !self.upstream.nodes.is_empty() && self.upstream.nodes.iter().all(|n| n.weight == 0) {
            return Err(invalid(
                "upstream.nodes[].weight",
                "at least one node needs a weight above 0",
            ));
        }
        Ok(())
    }

    /// `[upstream]`: timings and detector settings.
    fn validate_upstream(&self, invalid: Invalid) -> Result<(), ConfigError> {
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
        if self.upstream.socket_mark == Some(0) {
            return Err(invalid(
                "upstream.socket_mark",
                "0 is every unmarked packet's mark: use a non-zero mark, or leave the key out",
            ));
        }
        Ok(())
    }

    /// `[ingress]`: handshake, TLS files, limits.
    fn validate_ingress(&self, invalid: Invalid) -> Result<(), ConfigError> {
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
        if !self.ingress.allow_destinations.is_empty()
            && self.ingress.transparent != super::Transparent::Redirect
        {
            return Err(invalid(
                "ingress.allow_destinations",
                "needs ingress.transparent = \"redirect\" (only redirected connections have an original destination)",
            ));
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
        Ok(())
    }

    /// `[spool]`: room for one request, commit size, path.
    fn validate_spool(&self, invalid: Invalid) -> Result<(), ConfigError> {
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
        Ok(())
    }

    /// `[admin]`: limits, and a token wherever the listener is reachable from outside.
    fn validate_admin(&self, invalid: Invalid) -> Result<(), ConfigError> {
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
}
