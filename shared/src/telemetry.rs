//! Structured logging with `tracing`. Secrets are kept out by construction: they are
//! [`crate::config::Secret`]s, whose `Debug` is redacted, and no code logs request headers.

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, MonitorConfig};

/// Installs the global subscriber. Safe to call more than once (later calls do nothing), so tests
/// and binaries can both call it.
pub fn init(monitor: &MonitorConfig) {
    let filter = EnvFilter::try_new(&monitor.log_filter).unwrap_or_else(|_| EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match monitor.log_format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Text => builder.with_ansi(false).try_init(),
    };
}
