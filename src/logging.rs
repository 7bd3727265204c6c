//! The process's tracing subscriber: text or JSON lines on stderr, filtered by `[log] level`
//! (or `RUST_LOG`, which wins). The filter sits behind a reload handle so that a config
//! reload can change `log.level` in place; the format is fixed for the process's life (a
//! reload that changes `log.format` is refused: log shippers parse one format per stream).

use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, EnvFilter, Registry};

use crate::config::LogFormat;

/// The installed filter's handle.
struct Filter {
    handle: reload::Handle<EnvFilter, Registry>,
    /// `RUST_LOG` chose the filter at start: it keeps winning over the config.
    from_env: bool,
}

static FILTER: OnceLock<Filter> = OnceLock::new();

/// What became of a new `log.level`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LevelApplied {
    /// In force from the next event on.
    Applied,
    /// `RUST_LOG` was set at start and still decides.
    OverriddenByEnv,
    /// No subscriber of this module is installed (a library user, a unit test).
    NoSubscriber,
}

/// Install the subscriber for the whole process; the first call wins.
pub fn init(level: &str, format: LogFormat) {
    let (filter, from_env) = match EnvFilter::try_from_default_env() {
        Ok(filter) => (filter, true),
        Err(_) => (
            EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info")),
            false,
        ),
    };
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match format {
        LogFormat::Text => registry
            .with(fmt::layer().with_ansi(false).with_writer(std::io::stderr))
            .try_init(),
        LogFormat::Json => registry
            .with(fmt::layer().json().with_writer(std::io::stderr))
            .try_init(),
    };
    if installed.is_ok() {
        let _ = FILTER.set(Filter { handle, from_env });
    }
}

/// The filter for `level`, built before anything changes (a reload is all or nothing).
pub fn filter(level: &str) -> Result<EnvFilter, String> {
    EnvFilter::try_new(level).map_err(|e| e.to_string())
}

/// Put a filter built by [`filter`] in force.
pub fn apply(filter: EnvFilter) -> LevelApplied {
    let Some(installed) = FILTER.get() else {
        return LevelApplied::NoSubscriber;
    };
    if installed.from_env {
        return LevelApplied::OverriddenByEnv;
    }
    match installed.handle.reload(filter) {
        Ok(()) => LevelApplied::Applied,
        Err(_) => LevelApplied::NoSubscriber,
    }
}
