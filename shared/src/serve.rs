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
    // Expired records (old statuses, idempotency keys, firings) are ignored by reads; the
    // embedded store reclaims their space about hourly.
    let mut last_purge: Option<std::time::Instant> = None;
    loop {
        if last_purge.is_none_or(|t| t.elapsed() >= Duration::from_secs(3600)) {
            match state.store.kv().purge_expired().await {
                Ok(n) if n > 0 => tracing::info!(purged = n, "expired records removed"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "purging expired records failed"),
            }
            last_purge = Some(std::time::Instant::now());
        }
        // Supervised: each cycle runs as its own task, so a panic in one is logged and the
        // next cycle runs (the loop, and `/healthz`'s view of it, carry on).
        let cycle = tokio::spawn({
            let poller = poller.clone();
            async move { poller.cycle().await }
        });
        match cycle.await {
            Ok(Ok(_)) => {}
            // The summary line and the error were logged by the cycle; the next one retries.
            Ok(Err(e)) => tracing::debug!(error = %e, "poll cycle failed"),
            Err(e) if e.is_panic() => {
                tracing::error!("poll cycle panicked; the next cycle runs as scheduled")
            }
            Err(e) => tracing::error!(error = %e, "poll cycle was cancelled"),
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
