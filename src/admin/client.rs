//! The command line's side of the admin API: one HTTP/1 request per call (hyper), with the
//! token from the config and a deadline, for `ackgate status`, `top` and `spool`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::header;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpStream;

use crate::config::{AdminConfig, Config, ConfigError, MetricsConfig};

/// Deadline for one request, connect included.
const REQUEST_DEADLINE: Duration = Duration::from_secs(10);

/// Why the admin API could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{config} has no [admin] section: add `[admin]` with `listen = \"127.0.0.1:24231\"` and restart ackgate")]
    NotConfigured { config: String },
    #[error("cannot find ackgate's admin listener in {config}: {reason}")]
    NoAdminSection { config: String, reason: String },
    #[error("cannot reach ackgate's admin listener at {address}: {reason} (is ackgate running with this config?)")]
    Unreachable { address: SocketAddr, reason: String },
    #[error("the admin listener at {address} refused the request: {status} {body}")]
    Refused {
        address: SocketAddr,
        status: u16,
        body: String,
    },
    #[error("the admin listener at {address} answered {path} with something unexpected: {reason}")]
    BadReply {
        address: SocketAddr,
        path: String,
        reason: String,
    },
}

/// A reply: status code and body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The `error` field of a JSON error body, or the body itself.
    pub fn error_message(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or_else(|| self.text().trim().to_string())
    }
}

/// Talks to one running ackgate.
#[derive(Debug, Clone)]
pub struct AdminClient {
    address: SocketAddr,
    token: Option<String>,
}

impl AdminClient {
    /// The admin listener named by `config` (an unspecified address means this host).
    pub fn from_config(
        config: &Config,
        path: &std::path::Path,
    ) -> Result<AdminClient, ClientError> {
        let admin = config.admin().ok_or_else(|| ClientError::NotConfigured {
            config: path.display().to_string(),
        })?;
        Ok(AdminClient::of(admin))
    }

    /// The admin listener of the relay run with the config at `path`: from the whole file, or,
    /// when it does not validate (an edit not yet reloaded), from its `[admin]` section alone,
    /// with the file's error beside it. `ackgate reload` and `ackgate status` still reach the
    /// relay then, and its answer says which key it refused.
    pub fn for_file(
        path: &std::path::Path,
    ) -> (Result<AdminClient, ClientError>, Option<ConfigError>) {
        match Config::load(path) {
            Ok(config) => (AdminClient::from_config(&config, path), None),
            Err(invalid) => (AdminClient::from_admin_section(path), Some(invalid)),
        }
    }

    /// The admin listener named by the `[admin]` (or `[metrics]`) section of a file that may
    /// not validate as a whole.
    pub fn from_admin_section(path: &std::path::Path) -> Result<AdminClient, ClientError> {
        let fail = |reason: String| ClientError::NoAdminSection {
            config: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
        let table: toml::Table = toml::from_str(&text).map_err(|e| fail(e.to_string()))?;
        let admin = match (table.get("admin"), table.get("metrics")) {
            (Some(admin), _) => AdminConfig::deserialize(admin.clone())
                .map_err(|e| fail(format!("[admin]: {e}")))?,
            (None, Some(metrics)) => {
                let metrics = MetricsConfig::deserialize(metrics.clone())
                    .map_err(|e| fail(format!("[metrics]: {e}")))?;
                let mut table = toml::Table::new();
                table.insert("listen".into(), metrics.listen.to_string().into());
                AdminConfig::deserialize(toml::Value::Table(table))
                    .map_err(|e| fail(e.to_string()))?
            }
            (None, None) => return Err(fail("no [admin] section".into())),
        };
        Ok(AdminClient::of(admin))
    }

    fn of(admin: AdminConfig) -> AdminClient {
        let mut address = admin.listen;
        if address.ip().is_unspecified() {
            address.set_ip(match address.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            });
        }
        AdminClient {
            address,
            token: admin.token.map(|t| t.expose().to_string()),
        }
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    pub async fn get(&self, path: &str) -> Result<Reply, ClientError> {
        self.request(hyper::Method::GET, path).await
    }

    pub async fn post(&self, path: &str) -> Result<Reply, ClientError> {
        self.request(hyper::Method::POST, path).await
    }

    /// `GET /api/status`, decoded.
    pub async fn status(&self) -> Result<crate::admin::status::Status, ClientError> {
        let reply = self.get_ok("/api/status").await?;
        serde_json::from_slice(&reply.body).map_err(|e| ClientError::BadReply {
            address: self.address,
            path: "/api/status".into(),
            reason: e.to_string(),
        })
    }

    /// Like [`AdminClient::get`], but anything but a 2xx is an error.
    pub async fn get_ok(&self, path: &str) -> Result<Reply, ClientError> {
        self.ok(self.get(path).await?)
    }

    pub async fn post_ok(&self, path: &str) -> Result<Reply, ClientError> {
        self.ok(self.post(path).await?)
    }

    fn ok(&self, reply: Reply) -> Result<Reply, ClientError> {
        if (200..300).contains(&reply.status) {
            return Ok(reply);
        }
        Err(ClientError::Refused {
            address: self.address,
            status: reply.status,
            body: reply.error_message(),
        })
    }

    async fn request(&self, method: hyper::Method, path: &str) -> Result<Reply, ClientError> {
        let unreachable = |reason: String| ClientError::Unreachable {
            address: self.address,
            reason,
        };
        let exchange = async {
            let stream = TcpStream::connect(self.address)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(|e| unreachable(e.to_string()))?;
            tokio::spawn(connection);
            let mut request = hyper::Request::builder()
                .method(method)
                .uri(path)
                .header(header::HOST, self.address.to_string());
            if let Some(token) = &self.token {
                request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
            }
            let request = request
                .body(Empty::<Bytes>::new())
                .map_err(|e| unreachable(e.to_string()))?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| unreachable(e.to_string()))?;
            let status = response.status().as_u16();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| unreachable(e.to_string()))?
                .to_bytes();
            Ok(Reply { status, body })
        };
        tokio::time::timeout(REQUEST_DEADLINE, exchange)
            .await
            .map_err(|_| unreachable(format!("no answer within {REQUEST_DEADLINE:?}")))?
    }
}
