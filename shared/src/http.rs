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

/// `GET /healthz`: 200 when the store answers, 503 when it does not; with the time of this
/// process's last successful poll cycle (null before the first, or where no poller runs).
async fn healthz(State(state): State<AppState>) -> Response {
    let last_poll = state
        .poller
        .as_ref()
        .and_then(|p| p.last_success())
        .map(|t| t.to_rfc3339());
    match state.store.ping().await {
        Ok(()) => (
            StatusCode::OK,
            Json(json!({"status": "ok", "store": "ok", "last_successful_poll": last_poll})),
        )
            .into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "health check: store unreachable");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"status": "unavailable", "store": "unreachable", "last_successful_poll": last_poll})),
            )
                .into_response()
        }
    }
}

async fn not_found() -> Response {
    error_response(StatusCode::NOT_FOUND, "not_found", "no such route")
}
