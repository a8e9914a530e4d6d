//! One axum [`Router`] for every HTTP route: `kitebridge serve` runs it under tokio, and the
//! Lambda functions run it under `lambda_http`. No route is written twice.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::bitbucket::BitbucketClient;
use crate::config::Config;
use crate::observe::BuildObserver;
use crate::poll::Poller;
use crate::report::Reporter;
use crate::store::Store;

/// What the handlers and the poller share; built once by [`crate::bootstrap::app_state`].
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub store: Store,
    pub http: reqwest::Client,
    pub bitbucket: Option<BitbucketClient>,
    pub poller: Option<Poller>,
    /// The reporter webhooks use: short retries, then the outbox.
    pub webhook_reporter: Option<Reporter>,
    /// Release tracking and trigger rules: every build seen goes to each.
    pub observers: Vec<Arc<dyn BuildObserver>>,
    /// Creates the release and deploy builds of the releases API (`None` without a token).
    pub buildkite: Option<crate::buildkite::client::BuildkiteClient>,
}

/// The router with every route kitebridge serves.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .merge(crate::webhook::routes())
        .merge(crate::release::api::routes())
        .merge(crate::rules::api::routes())
        .fallback(not_found)
        .with_state(state)
}

/// A JSON error answer: `{"error": <kind>, "message": <text>}`.
pub fn error_response(status: StatusCode, error: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"error": error, "message": message.into()})),
    )
        .into_response()
}

/// [`error_response`] about one input, named in `field` (a JSON field or a header).
pub fn field_error_response(
    status: StatusCode,
    error: &str,
    field: &str,
    message: impl Into<String>,
) -> Response {
    (
        status,
        Json(json!({"error": error, "message": message.into(), "field": field})),
    )
        .into_response()
}

/// `GET /healthz`: 200 when kitebridge does its job, 503 with the reasons when it does not:
/// the store is unreachable; the poll loop has had no successful cycle for 3 intervals; a status
/// has waited undelivered longer than `KITEBRIDGE_HEALTH_MAX_UNDELIVERED`. Either way the answer
/// shows the outbox (depth, the oldest undelivered status's age), the last successful poll and
/// the pacer.
async fn healthz(State(state): State<AppState>) -> Response {
    use crate::store::StatusLedger;
    let now = chrono::Utc::now();
    let mut problems: Vec<String> = Vec::new();
    let poll = state.poller.as_ref().map(|p| {
        let last = p.last_success();
        let interval = state.config.monitor.polling_interval;
        let limit = chrono::Duration::from_std(interval * 3).unwrap_or(chrono::Duration::MAX);
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
    let max_age = state.config.delivery.max_undelivered_age.as_secs() as i64;
    if let Some(age) = oldest_age.filter(|a| *a > max_age) {
        problems.push(format!(
            "a status has waited {age} s undelivered (more than {max_age} s): Bitbucket is \
             refusing or not answering"
        ));
    }
    let pacer = state
        .webhook_reporter
        .as_ref()
        .map(|r| r.pacer().snapshot());
    let healthy = problems.is_empty();
    let body = json!({
        "status": if healthy { "ok" } else { "unavailable" },
        "problems": problems,
        "store": if store_ok { "ok" } else { "unreachable" },
        "last_successful_poll": poll.and_then(|(last, _)| last).map(|t| t.to_rfc3339()),
        "outbox": outbox.as_ref().map(|o| json!({
            "depth": o.depth,
            "oldest_undelivered_age_s": oldest_age,
            "corrupt": o.corrupt,
        })),
        "pacer": pacer,
    });
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

async fn not_found() -> Response {
    error_response(StatusCode::NOT_FOUND, "not_found", "no such route")
}
