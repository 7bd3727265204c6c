//! `[admin]` as in force: the bearer token, the per-request deadline and the connection cap.
//! A reload replaces them here, the one place the listener and its handlers read them from
//! (for each request, and for each accept); the listen address needs a restart. A smaller
//! connection cap closes no open admin connection.

use std::sync::Arc;

use tokio::sync::watch;

use crate::config::AdminConfig;
use crate::limit::Resizable;

/// The admin settings in force.
pub struct AdminSettings {
    config: watch::Sender<Arc<AdminConfig>>,
    /// `admin.max_connections`, taken before each accept.
    pub connections: Arc<Resizable>,
}

impl AdminSettings {
    pub fn new(config: AdminConfig) -> Arc<AdminSettings> {
        let connections = Resizable::new(config.max_connections as usize);
        Arc::new(AdminSettings {
            config: watch::Sender::new(Arc::new(config)),
            connections,
        })
    }

    /// The settings in force now.
    pub fn current(&self) -> Arc<AdminConfig> {
        self.config.borrow().clone()
    }

    /// Put a reload's `[admin]` in force: the next request checks the new token and gets the
    /// new deadline; open connections stay (a smaller cap is reached as they end).
    pub fn apply(&self, config: AdminConfig) {
        self.connections.resize(config.max_connections as usize);
        self.config.send_replace(Arc::new(config));
    }
}
