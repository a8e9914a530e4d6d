//! The self-hosted process's background work: the poll loop (every `MONITOR_POLLING_INTERVAL`),
//! which also drains the outbox and keeps the embedded store tidy.

use std::time::Duration;

use tokio::sync::watch;

use crate::http::AppState;

/// Runs poll cycles until `stop` turns true; a cycle in progress is finished first.
pub async fn poll_loop(state: AppState, mut stop: watch::Receiver<bool>) {
    let Some(poller) = state.poller.clone() else {
        tracing::warn!("poll loop not started: Buildkite or Bitbucket is not configured");
        return;
    };
    let interval = state.config.monitor.polling_interval;
    loop {
        if let Err(e) = poller.cycle().await {
            // The summary line and the error were logged by the cycle; the next one retries.
            tracing::debug!(error = %e, "poll cycle failed");
        }
        tokio::select! {
            _ = tokio::time::sleep(interval.max(Duration::from_secs(1))) => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
    }
}
