//! Ingress settings as they are in force: `[ingress]` with what is built from it (request
//! limits, the shared-key handshake, the TLS acceptor with its certificate files read).
//!
//! Built whole before it is used, so a reload that cannot read a certificate changes nothing
//! (all or nothing). [`super::IngressContext`] holds the one current value; the accept loop
//! and every connection read a snapshot from it, never a copy taken at start-up. What a
//! connection sees: the TLS acceptor and handshake settings of the moment it was accepted
//! (they are its session), and the request limits and idle timeout in force at each request
//! boundary (`connection.rs`), so that a persistent sender follows a reload without
//! reconnecting and is never closed by one (invariant 10).

use tokio_rustls::TlsAcceptor;

use crate::config::IngressConfig;
use crate::forward::handshake::ServerAuth;
use crate::forward::Limits;
use crate::tls::{server_config, ServerTlsSettings, TlsError};

/// One generation of ingress settings.
pub struct IngressSettings {
    pub config: IngressConfig,
    pub limits: Limits,
    /// Shared-key handshake settings, when `[ingress.security]` is set.
    pub security: Option<ServerAuth>,
    /// TLS, when `[ingress.tls]` is set: its files as they were read when this was built.
    pub tls: Option<TlsAcceptor>,
    /// `[[upstream.nodes]]` is not empty: records without an original destination have
    /// somewhere to go (route "original" refuses direct connections otherwise).
    pub default_nodes: bool,
    /// How long a stop reads on (`upstream.shutdown_grace`): a connection closes once quiet
    /// at a request boundary, or at this deadline.
    pub shutdown_grace: std::time::Duration,
}

impl IngressSettings {
    /// Build everything `config` names; fails only on TLS files that cannot be used.
    pub fn build(
        config: IngressConfig,
        default_nodes: bool,
        shutdown_grace: std::time::Duration,
    ) -> Result<IngressSettings, TlsError> {
        let limits = Limits {
            max_frame_bytes: usize::try_from(config.max_frame_bytes.0).unwrap_or(usize::MAX),
            max_decompressed_bytes: usize::try_from(config.max_decompressed_bytes.0)
                .unwrap_or(usize::MAX),
            ..Limits::default()
        };
        let security = config.security.as_ref().map(|s| ServerAuth {
            self_hostname: s.self_hostname.clone(),
            shared_key: s.shared_key.expose().to_string(),
            users: s
                .users
                .iter()
                .map(|u| (u.username.clone(), u.password.expose().to_string()))
                .collect(),
            user_auth: s.user_auth,
        });
        let tls = match &config.tls {
            Some(t) => Some(TlsAcceptor::from(server_config(&ServerTlsSettings {
                cert: t.cert.clone(),
                key: t.key.clone(),
                client_ca: t.client_ca.clone(),
            })?)),
            None => None,
        };
        Ok(IngressSettings {
            config,
            limits,
            security,
            tls,
            default_nodes,
            shutdown_grace,
        })
    }

    /// Whether a sender at `peer` may connect (`ingress.allow`; empty allows every source).
    pub fn allowed(&self, peer: &std::net::SocketAddr) -> bool {
        self.config.allow.is_empty() || self.config.allow.iter().any(|c| c.contains(peer.ip()))
    }

    /// Bytes of unfinished requests all connections may hold (`ingress.max_partial_bytes`).
    pub fn partial_budget(&self) -> usize {
        usize::try_from(self.config.max_partial_bytes.0).unwrap_or(usize::MAX >> 4)
    }
}
