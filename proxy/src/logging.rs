//! The sidecar's own logs (not the access log): text or JSON lines on stderr, behind a filter
//! that the admin port can change at runtime (`/logging`), so an operator can turn on `debug`
//! for one module of a running sidecar and back off again without a restart.

use std::sync::Mutex;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

/// The filter used when `AGENTMESH_LOG` is not set.
pub const DEFAULT_FILTER: &str = "info,pingora=warn";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Handle on the installed log filter.
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
    current: Mutex<String>,
}

impl LogControl {
    /// Installs the global subscriber. An invalid `filter` falls back to the default, said so.
    pub fn init(format: LogFormat, filter: Option<&str>) -> LogControl {
        let wanted = filter.unwrap_or(DEFAULT_FILTER);
        let (env, applied, bad) = match EnvFilter::try_new(wanted) {
            Ok(f) => (f, wanted.to_string(), None),
            Err(e) => (
                EnvFilter::new(DEFAULT_FILTER),
                DEFAULT_FILTER.to_string(),
                Some(e),
            ),
        };
        let (layer, handle) = reload::Layer::new(env);
        let registry = tracing_subscriber::registry().with(layer);
        let out = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
        match format {
            LogFormat::Text => registry.with(out).init(),
            LogFormat::Json => registry.with(out.json()).init(),
        }
        if let Some(e) = bad {
            tracing::warn!(filter = wanted, error = %e, "invalid AGENTMESH_LOG; using the default");
        }
        LogControl {
            handle,
            current: Mutex::new(applied),
        }
    }

    pub fn current(&self) -> String {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the filter, e.g. `info,agentmesh_proxy::proxy=debug`.
    pub fn set(&self, directive: &str) -> Result<(), String> {
        let f = EnvFilter::try_new(directive)
            .map_err(|e| format!("invalid filter `{directive}`: {e}"))?;
        self.handle.reload(f).map_err(|e| e.to_string())?;
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = directive.to_string();
        tracing::info!(filter = directive, "log filter changed");
        Ok(())
    }
}
