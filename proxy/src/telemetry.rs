//! Logging: one init function, plain or JSON lines on stderr, an `access` target for
//! per-request logs, and a filter that the admin server can change at run time.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, EnvFilter, Registry};

use crate::config::{env, LogFormat};

/// Changes the log filter of a running proxy.
#[derive(Clone)]
pub struct LogHandle {
    handle: Option<reload::Handle<EnvFilter, Registry>>,
}

impl std::fmt::Debug for LogHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogHandle").finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{var}={value:?} is not a valid tracing filter: {reason}")]
    Filter {
        var: &'static str,
        value: String,
        reason: String,
    },
    #[error("log filter cannot be changed: {0}")]
    Reload(String),
    #[error("logging was not initialised by this process")]
    NotInstalled,
}

impl LogHandle {
    /// A handle for tests and embedders that did not install the subscriber.
    pub fn disabled() -> Self {
        Self { handle: None }
    }

    pub fn set_filter(&self, filter: &str) -> Result<(), LogError> {
        let new = EnvFilter::try_new(filter).map_err(|e| LogError::Filter {
            var: "log filter",
            value: filter.to_string(),
            reason: e.to_string(),
        })?;
        let h = self.handle.as_ref().ok_or(LogError::NotInstalled)?;
        h.reload(new).map_err(|e| LogError::Reload(e.to_string()))
    }

    pub fn current(&self) -> Option<String> {
        self.handle
            .as_ref()
            .and_then(|h| h.with_current(|f| f.to_string()).ok())
    }
}

/// Installs the global subscriber.
pub fn init(filter: &str, format: LogFormat) -> Result<LogHandle, LogError> {
    let filter = EnvFilter::try_new(filter).map_err(|e| LogError::Filter {
        var: env::LOG,
        value: filter.to_string(),
        reason: e.to_string(),
    })?;
    let (filter, handle) = reload::Layer::new(filter);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let plain = (format == LogFormat::Plain)
        .then(|| fmt::layer().with_ansi(ansi).with_writer(std::io::stderr));
    let json =
        (format == LogFormat::Json).then(|| fmt::layer().json().with_writer(std::io::stderr));
    tracing_subscriber::registry()
        .with(filter)
        .with(plain)
        .with(json)
        .try_init()
        .map_err(|e| LogError::Reload(e.to_string()))?;
    Ok(LogHandle {
        handle: Some(handle),
    })
}
