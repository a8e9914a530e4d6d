//! The rules API, beside the releases API and behind the same authentication:
//!
//! - `PUT /rules/{name}`: body is a rule document (`{"rule", "value"}`); validated first (422
//!   with the rule's name and the error when it does not validate); 201 when created, 200 when
//!   replaced.
//! - `GET /rules`: every rule in force, configured (`"origin": "config"`) and stored
//!   (`"origin": "store"`).
//! - `GET /rules/{name}`, `DELETE /rules/{name}` (204). Configured rules cannot be replaced or
//!   deleted here (409): change the configuration instead.
//!
//! The operations are [`RuleCatalog`]'s.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRef, Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use serde_json::Value;

use super::{ApiError, Auth, Authorized};
use crate::rules::catalog::{RuleCatalog, RuleView};

/// What the rules API's handlers share.
#[derive(Clone)]
pub struct RulesState {
    pub catalog: RuleCatalog,
    pub auth: Auth,
}

impl FromRef<RulesState> for Auth {
    fn from_ref(state: &RulesState) -> Auth {
        state.auth.clone()
    }
}

/// The routes, with their state.
pub fn routes<S: Clone + Send + Sync + 'static>(state: RulesState) -> Router<S> {
    Router::new()
        .route("/rules", get(list))
        .route(
            "/rules/{name}",
            get(get_one).put(put_one).delete(delete_one),
        )
        .with_state(state)
}

#[derive(Serialize)]
struct Rules {
    rules: Vec<RuleView>,
}

async fn list(_: Authorized, State(state): State<RulesState>) -> Result<Json<Rules>, ApiError> {
    let rules = state.catalog.list().await?;
    Ok(Json(Rules { rules }))
}

async fn get_one(
    _: Authorized,
    State(state): State<RulesState>,
    Path(name): Path<String>,
) -> Result<Json<RuleView>, ApiError> {
    Ok(Json(state.catalog.get(&name).await?))
}

async fn put_one(
    _: Authorized,
    State(state): State<RulesState>,
    Path(name): Path<String>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<(StatusCode, Json<RuleView>), ApiError> {
    RuleCatalog::check_name(&name)?;
    let Json(document) = body.map_err(|e| ApiError::Invalid {
        status: StatusCode::BAD_REQUEST,
        error: "invalid_json",
        field: None,
        message: format!("the body must be a JSON rule document: {}", e.body_text()),
    })?;
    let (view, created) = state.catalog.put(&name, document).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(view)))
}

async fn delete_one(
    _: Authorized,
    State(state): State<RulesState>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.catalog.delete(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}
