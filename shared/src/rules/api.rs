//! The rules API, beside the releases API and behind the same bearer token:
//!
//! - `PUT /rules/{name}`: body is a rule document (`{"rule", "value"}`); validated first (422
//!   with the rule's name and the error when it does not validate); 201 when created, 200 when
//!   replaced.
//! - `GET /rules`: every rule in force, configured (`"origin": "config"`) and stored
//!   (`"origin": "store"`).
//! - `GET /rules/{name}`, `DELETE /rules/{name}` (204). Configured rules cannot be replaced or
//!   deleted here (409): change the configuration instead.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::Utc;
use serde_json::{Value, json};

use super::{Rule, config_rules, validate_name};
use crate::http::{AppState, error_response};
use crate::store::{RuleStore, StoreError, StoredRule};

/// The routes, to merge into [`crate::http::router`].
pub fn routes() -> Router<AppState> {
    Router::new().route("/rules", get(list)).route(
        "/rules/{name}",
        get(get_one).put(put_one).delete(delete_one),
    )
}

/// The API's authentication, the same as the releases API's (bearer token, or IAM on AWS).
// The error is the answer to send; boxing it buys nothing.
#[allow(clippy::result_large_err)]
pub fn require_bearer(state: &AppState, headers: &HeaderMap) -> Result<(), Response> {
    crate::release::api::authorize(state, headers)
}

fn store_failed(e: &StoreError) -> Response {
    tracing::warn!(error = %e, "rules API: store failed");
    error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "store_unavailable",
        "the store is unavailable; try again",
    )
}

fn configured(state: &AppState) -> Vec<Rule> {
    // Validated at start-up; a file changed since then is read again and, if broken, the
    // configured rules are shown as none rather than failing the API.
    config_rules(&state.config).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "configured rules cannot be read");
        Vec::new()
    })
}

fn view(name: &str, origin: &str, document: &Value) -> Value {
    let mut v = json!({"name": name, "origin": origin});
    if let (Some(obj), Some(doc)) = (v.as_object_mut(), document.as_object()) {
        for (k, x) in doc {
            obj.insert(k.clone(), x.clone());
        }
    }
    v
}

fn document_json(rule: &Rule) -> Value {
    serde_json::to_value(&rule.document).unwrap_or(Value::Null)
}

async fn list(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(r) = require_bearer(&state, &headers) {
        return r;
    }
    let mut rules: Vec<Value> = configured(&state)
        .iter()
        .map(|r| view(&r.name, "config", &document_json(r)))
        .collect();
    match state.store.rules().await {
        Ok(stored) => rules.extend(stored.iter().map(|s| view(&s.name, "store", &s.document))),
        Err(e) => return store_failed(&e),
    }
    Json(json!({ "rules": rules })).into_response()
}

async fn get_one(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = require_bearer(&state, &headers) {
        return r;
    }
    if let Some(r) = configured(&state).iter().find(|r| r.name == name) {
        return Json(view(&r.name, "config", &document_json(r))).into_response();
    }
    match state.store.rule(&name).await {
        Ok(Some(s)) => Json(view(&s.name, "store", &s.document)).into_response(),
        Ok(None) => error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no rule named {name:?}"),
        ),
        Err(e) => store_failed(&e),
    }
}

async fn put_one(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Json<Value>, JsonRejection>,
) -> Response {
    if let Err(r) = require_bearer(&state, &headers) {
        return r;
    }
    if let Err(m) = validate_name(&name) {
        return error_response(StatusCode::BAD_REQUEST, "invalid_name", m);
    }
    let Json(document) = match body {
        Ok(b) => b,
        Err(e) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                format!("the body must be a JSON rule document: {}", e.body_text()),
            );
        }
    };
    if configured(&state).iter().any(|r| r.name == name) {
        return error_response(
            StatusCode::CONFLICT,
            "configured_rule",
            format!("rule {name:?} is defined in the configuration; change it there"),
        );
    }
    let rule = match Rule::from_json(&name, document) {
        Ok(r) => r,
        Err(e) => {
            return (
                StatusCode::UNPROCESSABLE_ENTITY,
                Json(json!({
                    "error": "invalid_rule",
                    "message": e.to_string(),
                    "rule": e.rule,
                    "kind": e.kind,
                })),
            )
                .into_response();
        }
    };
    let document = document_json(&rule);
    let stored = StoredRule {
        name: name.clone(),
        document: document.clone(),
        updated_at: Utc::now(),
    };
    match state.store.put_rule(&stored).await {
        Ok(created) => {
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            (status, Json(view(&name, "store", &document))).into_response()
        }
        Err(e) => store_failed(&e),
    }
}

async fn delete_one(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = require_bearer(&state, &headers) {
        return r;
    }
    if configured(&state).iter().any(|r| r.name == name) {
        return error_response(
            StatusCode::CONFLICT,
            "configured_rule",
            format!("rule {name:?} is defined in the configuration; remove it there"),
        );
    }
    match state.store.delete_rule(&name).await {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no rule named {name:?}"),
        ),
        Err(e) => store_failed(&e),
    }
}
