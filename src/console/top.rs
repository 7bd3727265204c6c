//! `ackgate top`: a live terminal view of a running relay (ratatui).

use std::path::Path;

use crate::admin::client::{AdminClient, ClientError};
use crate::config::Config;

/// Run until `q`.
pub async fn run(config: &Config, path: &Path) -> Result<(), ClientError> {
    let client = AdminClient::from_config(config, path)?;
    client.get_ok("/api/status").await?;
    Ok(())
}
