//! The releases API's HTTP face: routes, `Idempotency-Key`, JSON in and out. The operations
//! themselves are [`ReleaseService`]'s; authentication is [`Authorized`], errors [`ApiError`].
//!
//! The route table [`ROUTES`] is the one the router is built from, so `openapi.yaml` can be
//! checked against it (`tests/openapi_routes.rs`).

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use axum::Router;
use axum::extract::{FromRef, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::json::{parse, parse_or_default};
use super::{ApiError, Auth, Authorized, RawBody};
use crate::release::model::{Candidate, Deployment, EnvironmentState, Release};
use crate::release::{
    CutRequest, DeployRequest, FreezeRequest, ProjectSpec, ReleaseService, RollbackRequest,
    StatusRequest,
};
use crate::store::{
    IdempotencyBegin, IdempotencyStore, OutboxStats, Ring, StatusLedger, Store, StoredResponse,
};

/// Page size when `per_page` is absent, and its maximum (as Aviator's API).
pub const DEFAULT_PER_PAGE: usize = 10;
pub const MAX_PER_PAGE: usize = 100;

/// The `Idempotency-Key` header.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Set on an answer replayed for a repeated `Idempotency-Key`.
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";
/// How long a request holds its key before another attempt may take over (longer than the
/// Lambda's timeout, so a live request is never run twice).
const IDEMPOTENCY_LEASE: Duration = Duration::from_secs(60);
const IDEMPOTENCY_SCOPE: &str = "releases-api";

/// What the releases API's handlers share: the service (built once at start-up), the store
/// for `Idempotency-Key`, and how callers are authenticated.
#[derive(Clone)]
pub struct ReleasesState {
    pub service: ReleaseService,
    pub store: Store,
    pub auth: Auth,
}

impl FromRef<ReleasesState> for Auth {
    fn from_ref(state: &ReleasesState) -> Auth {
        state.auth.clone()
    }
}

macro_rules! routes {
    ($($method:ident $path:literal => $handler:ident),* $(,)?) => {
        /// Every `(method, path)` this module serves; [`routes`] is built from this list.
        pub const ROUTES: &[(&str, &str)] = &[$((stringify!($method), $path)),*];

        /// The releases API's routes, with their state.
        pub fn routes<S: Clone + Send + Sync + 'static>(state: ReleasesState) -> Router<S> {
            Router::new()$(.route($path, axum::routing::$method($handler)))*
                .with_state(state)
        }
    };
}

routes! {
    get "/operator" => operator,
    get "/projects" => list_projects,
    put "/projects/{project}" => put_project,
    get "/projects/{project}" => get_project,
    delete "/projects/{project}" => delete_project,
    get "/projects/{project}/overview" => overview,
    post "/projects/{project}/releases" => cut,
    get "/projects/{project}/releases" => list_releases,
    get "/projects/{project}/releases/{version}" => get_release,
    get "/projects/{project}/releases/{version}/changelog" => changelog,
    get "/projects/{project}/environments/{environment}" => get_environment,
    get "/projects/{project}/environments/{environment}/changelog" => environment_changelog,
    post "/projects/{project}/environments/{environment}/deployments" => deploy,
    patch "/projects/{project}/environments/{environment}/deployments" => set_status,
    get "/projects/{project}/environments/{environment}/deployments" => list_deployments,
    get "/projects/{project}/environments/{environment}/deployments/{id}" => get_deployment,
    post "/projects/{project}/environments/{environment}/rollback" => rollback,
    put "/projects/{project}/environments/{environment}/freeze" => freeze,
    delete "/projects/{project}/environments/{environment}/freeze" => unfreeze,
}

/// The HTTP method names [`ROUTES`] uses, upper case.
pub fn method_of(name: &str) -> Option<Method> {
    Method::from_bytes(name.to_ascii_uppercase().as_bytes()).ok()
}

// ---------------------------------------------------------------------------------------------
// Answers

/// A JSON answer with its status.
struct Json<T>(StatusCode, T);

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        (self.0, axum::Json(self.1)).into_response()
    }
}

fn created_or_ok(created: bool) -> StatusCode {
    if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    }
}

type Answer<T> = Result<Json<T>, ApiError>;

// ---------------------------------------------------------------------------------------------
// Idempotency-Key

/// Runs `f` once per `Idempotency-Key`: a repeated key with the same request replays the first
/// successful answer (with `Idempotent-Replayed: true`) without running anything. Only 2xx
/// answers are kept; after an error the key is given up, so a retry runs again.
async fn idempotent<T: Serialize>(
    state: &ReleasesState,
    headers: &HeaderMap,
    uri: &Uri,
    body: &[u8],
    f: impl Future<Output = Answer<T>>,
) -> Result<Response, ApiError> {
    let Some(raw) = headers.get(IDEMPOTENCY_KEY) else {
        return f.await.map(IntoResponse::into_response);
    };
    let key = match raw.to_str() {
        Ok(k)
            if !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| (0x21..0x7f).contains(&b)) =>
        {
            k
        }
        _ => {
            return Err(ApiError::invalid(
                "Idempotency-Key",
                "must be 1 to 255 visible ASCII characters",
            ));
        }
    };
    let mut h = Sha256::new();
    h.update(b"POST\n");
    h.update(uri.path().as_bytes());
    h.update(b"\n");
    h.update(body);
    let fingerprint = hex::encode(h.finalize());
    let store = &state.store;
    let begun = store
        .idempotency_begin(IDEMPOTENCY_SCOPE, key, &fingerprint, IDEMPOTENCY_LEASE)
        .await?;
    let rev = match begun {
        IdempotencyBegin::New { rev } => rev,
        IdempotencyBegin::Replay(stored) => {
            let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
            let mut resp = Json(status, stored.body).into_response();
            resp.headers_mut()
                .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
            return Ok(resp);
        }
        IdempotencyBegin::InFlight => return Err(ApiError::IdempotencyInFlight),
        IdempotencyBegin::Mismatch => {
            return Err(ApiError::Invalid {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                error: "idempotency_key_reused",
                field: Some("Idempotency-Key".into()),
                message: "this Idempotency-Key was used with a different request".into(),
            });
        }
    };
    match f.await {
        Ok(Json(status, answer)) => {
            // Kept as the JSON value that goes out, so a replay is the same answer.
            let body = serde_json::to_value(&answer).unwrap_or(Value::Null);
            let stored = StoredResponse {
                status: status.as_u16(),
                body: body.clone(),
            };
            if let Err(e) = store
                .idempotency_finish(IDEMPOTENCY_SCOPE, key, rev, &stored)
                .await
            {
                // The work is done; the answer goes out. A retry with this key waits for the
                // lease to lapse and then runs again, which the caller can see by the new ids.
                tracing::error!(error = %e, "could not record the answer for an Idempotency-Key");
            }
            Ok(Json(status, body).into_response())
        }
        Err(e) => {
            if let Err(e) = store.idempotency_abandon(IDEMPOTENCY_SCOPE, key, rev).await {
                tracing::warn!(error = %e, "could not give up an Idempotency-Key; it lapses with its lease");
            }
            Err(e)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Input

struct Paging {
    cursor: Option<String>,
    per_page: usize,
}

fn paging(q: &HashMap<String, String>) -> Result<Paging, ApiError> {
    let per_page = match q.get("per_page") {
        None => DEFAULT_PER_PAGE,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=MAX_PER_PAGE).contains(&n) => n,
            _ => {
                return Err(ApiError::invalid(
                    "per_page",
                    format!("must be a whole number from 1 to {MAX_PER_PAGE}"),
                ));
            }
        },
    };
    // Each listing checks its own cursor's form (the service); empty means the first page.
    let cursor = q.get("cursor").filter(|c| !c.is_empty()).cloned();
    Ok(Paging { cursor, per_page })
}

#[derive(Serialize)]
struct Listing<T> {
    items: Vec<T>,
    next_cursor: Option<String>,
}

impl<T> From<crate::store::Page<T>> for Listing<T> {
    fn from(page: crate::store::Page<T>) -> Self {
        Listing {
            items: page.items,
            next_cursor: page.next,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Handlers

async fn put_project(
    _: Authorized,
    State(state): State<ReleasesState>,
    Path(project): Path<String>,
    RawBody(body): RawBody,
) -> Answer<impl Serialize> {
    let spec: ProjectSpec = parse(&body)?;
    let (p, created) = state.service.put_project(&project, spec).await?;
    Ok(Json(created_or_ok(created), p))
}

async fn list_projects(
    _: Authorized,
    State(state): State<ReleasesState>,
    Query(q): Query<HashMap<String, String>>,
) -> Answer<Listing<crate::release::model::Project>> {
    let p = paging(&q)?;
    let page = state
        .service
        .list_projects(p.cursor.as_deref(), p.per_page)
        .await?;
    Ok(Json(StatusCode::OK, page.into()))
}

async fn delete_project(
    _: Authorized,
    State(state): State<ReleasesState>,
    Path(project): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.service.delete_project(&project).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn overview(
    _: Authorized,
    State(state): State<ReleasesState>,
    Path(project): Path<String>,
) -> Answer<crate::release::service::Overview> {
    Ok(Json(
        StatusCode::OK,
        state.service.overview(&project).await?,
    ))
}

/// kitebridge's own state at a glance: the last poll cycles, the outbox, recent statuses.
#[derive(Serialize)]
struct OperatorAnswer {
    poll_cycles: Vec<Value>,
    outbox: OutboxAnswer,
    recent_posted: Vec<Value>,
    recent_refused: Vec<Value>,
}

#[derive(Serialize)]
struct OutboxAnswer {
    #[serde(flatten)]
    stats: OutboxStats,
    /// How long the status that has waited longest has waited.
    oldest_age_seconds: Option<i64>,
}

async fn operator(_: Authorized, State(state): State<ReleasesState>) -> Answer<OperatorAnswer> {
    let store = &state.store;
    let stats = store.outbox_stats().await?;
    let oldest_age_seconds = stats
        .oldest_queued_at
        .map(|t| (chrono::Utc::now() - t).num_seconds().max(0));
    Ok(Json(
        StatusCode::OK,
        OperatorAnswer {
            poll_cycles: store.recent(Ring::PollCycles).await?,
            outbox: OutboxAnswer {
                stats,
                oldest_age_seconds,
            },
            recent_posted: store.recent(Ring::Posted).await?,
            recent_refused: store.recent(Ring::Refused).await?,
        },
    ))
}

async fn get_project(
    _: Authorized,
    State(state): State<ReleasesState>,
    Path(project): Path<String>,
) -> Answer<impl Serialize> {
    Ok(Json(StatusCode::OK, state.service.project(&project).await?))
}

#[derive(Serialize)]
struct CutAnswer {
    release: Release,
    candidate: Candidate,
}

async fn cut(
    _: Authorized,
    State(state): State<ReleasesState>,
    Path(project): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    idempotent(&state, &headers, &uri, &body, async {
        let req: CutRequest = parse(&body)?;
        let c = state.service.cut(&project, req).await?;
        Ok(Json(
            StatusCode::CREATED,
            CutAnswer {
                release: c.release,
                candidate: c.candidate,
            },
        ))
    })
    .await
}

async fn list_releases(
    _: Authorized,
    State(state): State<ReleasesState>,
    Path(project): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Answer<Listing<Release>> {
    let p = paging(&q)?;
    let page = state
        .service
        .list_releases(&project, p.cursor.as_deref(), p.per_page)
        .await?;
    Ok(Json(StatusCode::OK, page.into()))
}

#[derive(Serialize)]
struct ReleaseAnswer {
    #[serde(flatten)]
    release: Release,
    candidates: Vec<Candidate>,
}

async fn get_release(
    _: Authorized,
    State(state): State<ReleasesState>,
    Path((project, version)): Path<(String, String)>,
) -> Answer<ReleaseAnswer> {
    let (release, candidates) = state.service.release(&project, &version).await?;
    Ok(Json(
        StatusCode::OK,
        ReleaseAnswer {
            release,
            candidates,
        },
    ))
}

async fn changelog(
    _: Authorized,
    State(state): State<ReleasesState>,
    Path((project, version)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Answer<crate::release::changelog::Changelog> {
    let candidate = q.get("candidate").filter(|c| !c.is_empty());
    if let Some(c) = candidate {
        crate::release::request::parse_candidate_field("candidate", c)?;
    }
    let c = state
        .service
        .changelog(&project, &version, candidate.map(String::as_str))
        .await?;
    Ok(Json(StatusCode::OK, c))
}

async fn environment_changelog(
    _: Authorized,
    State(state): State<ReleasesState>,
    Path((project, environment)): Path<(String, String)>,
) -> Answer<crate::release::changelog::EnvironmentChangelog> {
    let c = state
        .service
        .environment_changelog(&project, &environment)
        .await?;
    Ok(Json(StatusCode::OK, c))
}

/// An environment: its configuration, its state and the deployment under way.
#[derive(Serialize)]
struct EnvironmentAnswer<'a> {
    name: String,
    deploy_pipeline: Option<crate::release::model::PipelineRef>,
    requires: Option<String>,
    env: std::collections::BTreeMap<String, String>,
    frozen: bool,
    freeze_reason: Option<String>,
    active_deployment: Option<Deployment>,
    last_successful_candidate_version: Option<&'a String>,
    successes: &'a [String],
}

async fn get_environment(
    _: Authorized,
    State(state): State<ReleasesState>,
    Path((project, environment)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let (cfg, st, active): (_, EnvironmentState, _) =
        state.service.environment(&project, &environment).await?;
    let answer = EnvironmentAnswer {
        name: cfg.name,
        deploy_pipeline: cfg.deploy_pipeline,
        requires: cfg.requires,
        env: cfg.env,
        frozen: st.frozen,
        freeze_reason: st.freeze_reason.clone(),
        active_deployment: active,
        last_successful_candidate_version: st.successes.last(),
        successes: &st.successes,
    };
    Ok(Json(StatusCode::OK, answer).into_response())
}

async fn deploy(
    _: Authorized,
    State(state): State<ReleasesState>,
    Path((project, environment)): Path<(String, String)>,
    uri: Uri,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    idempotent(&state, &headers, &uri, &body, async {
        let req: DeployRequest = parse(&body)?;
        let d = state.service.deploy(&project, &environment, req).await?;
        Ok(Json(StatusCode::CREATED, d))
    })
    .await
}

async fn set_status(
    _: Authorized,
    State(state): State<ReleasesState>,
    Path((project, environment)): Path<(String, String)>,
    RawBody(body): RawBody,
) -> Answer<Deployment> {
    let req: StatusRequest = parse(&body)?;
    let u = state
        .service
        .set_status(&project, &environment, req)
        .await?;
    Ok(Json(created_or_ok(u.created), u.deployment))
}

async fn list_deployments(
    _: Authorized,
    State(state): State<ReleasesState>,
    Path((project, environment)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Answer<Listing<Deployment>> {
    let p = paging(&q)?;
    let page = state
        .service
        .list_deployments(&project, &environment, p.cursor.as_deref(), p.per_page)
        .await?;
    Ok(Json(StatusCode::OK, page.into()))
}

async fn get_deployment(
    _: Authorized,
    State(state): State<ReleasesState>,
    Path((project, environment, id)): Path<(String, String, String)>,
) -> Answer<Deployment> {
    let d = state
        .service
        .deployment(&project, &environment, &id)
        .await?;
    Ok(Json(StatusCode::OK, d))
}

async fn rollback(
    _: Authorized,
    State(state): State<ReleasesState>,
    Path((project, environment)): Path<(String, String)>,
    uri: Uri,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    idempotent(&state, &headers, &uri, &body, async {
        let req: RollbackRequest = parse_or_default(&body)?;
        let d = state.service.rollback(&project, &environment, req).await?;
        Ok(Json(StatusCode::CREATED, d))
    })
    .await
}

async fn freeze(
    _: Authorized,
    State(state): State<ReleasesState>,
    Path((project, environment)): Path<(String, String)>,
    RawBody(body): RawBody,
) -> Answer<EnvironmentState> {
    let req: FreezeRequest = parse(&body)?;
    let st = state.service.freeze(&project, &environment, req).await?;
    Ok(Json(StatusCode::OK, st))
}

async fn unfreeze(
    _: Authorized,
    State(state): State<ReleasesState>,
    Path((project, environment)): Path<(String, String)>,
) -> Answer<EnvironmentState> {
    let req = FreezeRequest {
        frozen: false,
        reason: None,
    };
    let st = state.service.freeze(&project, &environment, req).await?;
    Ok(Json(StatusCode::OK, st))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paging_is_bounded() {
        let q = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>()
        };
        assert_eq!(paging(&q(&[])).ok().unwrap().per_page, DEFAULT_PER_PAGE);
        assert_eq!(
            paging(&q(&[("per_page", "100")])).ok().unwrap().per_page,
            100
        );
        for bad in ["0", "101", "x", "-1"] {
            assert!(paging(&q(&[("per_page", bad)])).is_err(), "{bad}");
        }
    }

    #[test]
    fn route_table_uses_known_methods() {
        for (m, p) in ROUTES {
            assert!(method_of(m).is_some(), "{m}");
            assert!(p.starts_with("/projects") || *p == "/operator", "{p}");
        }
    }
}
