//! `GET /healthz`: whether kitebridge does its job, and why not when it does not.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::bitbucket::pacer::{Pacer, PacerSnapshot};
use crate::poll::Poller;
use crate::store::{StatusLedger, Store};

/// What the health check looks at.
#[derive(Clone)]
pub struct HealthState {
    pub store: Store,
    /// The poll loop, in a process that runs one (`kitebridge serve`); the webhook and releases
    /// functions have none.
    pub poller: Option<Poller>,
    pub polling_interval: Duration,
    /// The one pacer of Bitbucket posts, where statuses are reported.
    pub pacer: Option<Arc<Pacer>>,
    /// `KITEBRIDGE_HEALTH_MAX_UNDELIVERED`.
    pub max_undelivered_age: Duration,
}

/// The route, with its state.
pub fn routes<S: Clone + Send + Sync + 'static>(state: HealthState) -> Router<S> {
    Router::new()
        .route("/healthz", get(healthz))
        .with_state(state)
}

#[derive(Serialize)]
pub(crate) struct Health {
    status: &'static str,
    problems: Vec<String>,
    store: &'static str,
    last_successful_poll: Option<String>,
    outbox: Option<OutboxHealth>,
    pacer: Option<PacerSnapshot>,
}

#[derive(Serialize)]
struct OutboxHealth {
    depth: u64,
    oldest_undelivered_age_s: Option<i64>,
    corrupt: u64,
}

/// 200 when kitebridge does its job, 503 with the reasons when it does not: the store is
/// unreachable; the poll loop has had no successful cycle for 3 intervals; a status has waited
/// undelivered longer than `KITEBRIDGE_HEALTH_MAX_UNDELIVERED`. Either way the answer shows the
/// outbox (depth, the oldest undelivered status's age), the last successful poll and the pacer.
async fn healthz(State(state): State<HealthState>) -> (StatusCode, Json<Health>) {
    let (healthy, body) = assess(&state).await;
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body))
}

/// Whether kitebridge does its job, and the answer `/healthz` gives (the dashboard's operator
/// page shows the same).
pub(crate) async fn assess(state: &HealthState) -> (bool, Health) {
    let now = Utc::now();
    let mut problems: Vec<String> = Vec::new();
    let poll: Option<(Option<DateTime<Utc>>, bool)> = state.poller.as_ref().map(|p| {
        let last = p.last_success();
        let limit =
            chrono::Duration::from_std(state.polling_interval * 3).unwrap_or(chrono::Duration::MAX);
        let since = last.unwrap_or(p.started_at);
        (last, now - since > limit)
    });
    if let Some((last, true)) = poll {
        problems.push(match last {
            Some(_) => "no successful poll cycle for 3 polling intervals".to_string(),
            None => "no poll cycle has succeeded since start-up (3 polling intervals)".to_string(),
        });
    }
    let store_ok = match state.store.ping().await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "health check: store unreachable");
            problems.push("the store cannot be reached".to_string());
            false
        }
    };
    let outbox = if store_ok {
        match state.store.outbox_stats().await {
            Ok(stats) => Some(stats),
            Err(e) => {
                tracing::warn!(error = %e, "health check: outbox unreadable");
                problems.push("the outbox cannot be read".to_string());
                None
            }
        }
    } else {
        None
    };
    let oldest_age = outbox
        .as_ref()
        .and_then(|o| o.oldest_queued_at)
        .map(|t| (now - t).num_seconds().max(0));
    let max_age = state.max_undelivered_age.as_secs() as i64;
    if let Some(age) = oldest_age.filter(|a| *a > max_age) {
        problems.push(format!(
            "a status has waited {age} s undelivered (more than {max_age} s): Bitbucket is \
             refusing or not answering"
        ));
    }
    let healthy = problems.is_empty();
    let body = Health {
        status: if healthy { "ok" } else { "unavailable" },
        problems,
        store: if store_ok { "ok" } else { "unreachable" },
        last_successful_poll: poll.and_then(|(last, _)| last).map(|t| t.to_rfc3339()),
        outbox: outbox.map(|o| OutboxHealth {
            depth: o.depth,
            oldest_undelivered_age_s: oldest_age,
            corrupt: o.corrupt,
        }),
        pacer: state.pacer.as_ref().map(|p| p.snapshot()),
    };
    (healthy, body)
}
