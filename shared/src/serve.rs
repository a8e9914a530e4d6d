//! The self-hosted process: the HTTP server ([`serve`]) and, beside it, the poll loop
//! ([`poll_loop`], every `MONITOR_POLLING_INTERVAL`), which also drains the outbox and keeps the
//! embedded store tidy.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::config::ServerConfig;
use crate::poll::Poller;
use crate::store::Store;

/// Serves `router` on `listener` until `shutdown` resolves, within `limits`:
///
/// - a connection has `header_timeout` to send each request's headers, and the same to send the
///   next one on a kept-alive connection, then it is closed (so a client that sends half a
///   request, or idles, does not hold a connection);
/// - at most `max_connections` are open at once; more wait in the listen queue;
/// - on `shutdown` no new connection is accepted, idle ones are closed, requests in flight are
///   answered, and whatever is still open after `shutdown_timeout` is dropped.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: &ServerConfig,
    shutdown: impl Future<Output = ()>,
) {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(p) => p,
                // The semaphore is never closed; stop serving rather than spin if it were.
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    // Answers are small and written whole: send them at once rather than
                    // wait for the client's ACK of the previous segment (Nagle).
                    if let Err(e) = stream.set_nodelay(true) {
                        tracing::debug!(error = %e, "TCP_NODELAY not set");
                    }
                    stream
                }
                Err(e) => {
                    // Out of file descriptors and the like: wait a moment instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let connection = http.serve_connection(
            TokioIo::new(stream),
            TowerToHyperService::new(router.clone()),
        );
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    let open = limits.max_connections - permits.available_permits();
    tracing::info!(
        connections = open,
        "shutting down: answering requests in flight"
    );
    if tokio::time::timeout(limits.shutdown_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        let left = limits.max_connections - permits.available_permits();
        tracing::warn!(
            connections = left,
            deadline_s = limits.shutdown_timeout.as_secs(),
            "shutdown deadline passed: the remaining connections are dropped"
        );
    }
}

/// Runs poll cycles every `interval` until `stop` turns true; a cycle in progress is finished
/// first.
pub async fn poll_loop(
    poller: Poller,
    store: Store,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    // Expired records (old statuses, idempotency keys, firings) are ignored by reads; the
    // embedded store reclaims their space about hourly.
    let mut last_purge: Option<std::time::Instant> = None;
    loop {
        if last_purge.is_none_or(|t| t.elapsed() >= Duration::from_secs(3600)) {
            match store.kv().purge_expired().await {
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
