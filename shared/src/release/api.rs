//! The releases API's HTTP face: routes, bearer authentication, `Idempotency-Key`, JSON in and
//! out, and errors as `{"error", "message"}` with the right status. The operations themselves
//! are [`super::service::ReleaseService`]'s.
//!
//! The route table [`ROUTES`] is the one the router is built from, so `openapi.yaml` can be
//! checked against it (`tests/openapi_routes.rs`).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::model::{Candidate, Release};
use super::service::{
    CutRequest, DeployRequest, FreezeRequest, ProjectSpec, ReleaseError, ReleaseService,
    RollbackRequest, StatusRequest,
};
use crate::config::ApiAuth;
use crate::http::AppState;
use crate::store::{IdempotencyBegin, IdempotencyStore, StoredResponse};

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

macro_rules! routes {
    ($($method:ident $path:literal => $handler:ident),* $(,)?) => {
        /// Every `(method, path)` this module serves; [`routes`] is built from this list.
        pub const ROUTES: &[(&str, &str)] = &[$((stringify!($method), $path)),*];

        /// The releases API's routes, for `http::router`.
        pub fn routes() -> Router<AppState> {
            Router::new()$(.route($path, axum::routing::$method($handler)))*
        }
    };
}

routes! {
    put "/projects/{project}" => put_project,
    get "/projects/{project}" => get_project,
    post "/projects/{project}/releases" => cut,
    get "/projects/{project}/releases" => list_releases,
    get "/projects/{project}/releases/{version}" => get_release,
    get "/projects/{project}/environments/{environment}" => get_environment,
    post "/projects/{project}/environments/{environment}/deployments" => deploy,
    patch "/projects/{project}/environments/{environment}/deployments" => set_status,
    get "/projects/{project}/environments/{environment}/deployments" => list_deployments,
    get "/projects/{project}/environments/{environment}/deployments/{id}" => get_deployment,
    post "/projects/{project}/environments/{environment}/rollback" => rollback,
    put "/projects/{project}/environments/{environment}/freeze" => freeze,
    delete "/projects/{project}/environments/{environment}/freeze" => unfreeze,
}

// ---------------------------------------------------------------------------------------------
// Authentication

/// Proof that the caller may use the API: a matching bearer token, or `KITEBRIDGE_API_AUTH=iam`
/// (API Gateway checked the caller before the request got here).
pub struct Authorized;

impl FromRequestParts<AppState> for Authorized {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        authorize(state, &parts.headers).map(|()| Authorized)
    }
}

/// The API's authentication, shared by every API route (releases and rules): with
/// `KITEBRIDGE_API_AUTH=iam` API Gateway has already checked the caller; otherwise
/// `Authorization: Bearer <KITEBRIDGE_API_TOKEN>`, compared in constant time.
// The error is the answer to send; boxing it buys nothing.
#[allow(clippy::result_large_err)]
pub fn authorize(state: &AppState, headers: &axum::http::HeaderMap) -> Result<(), Response> {
    if state.config.api_auth == ApiAuth::Iam {
        return Ok(());
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    let ok = match (&state.config.api_token, presented) {
        (Some(expected), Some(token)) => token_matches(token, expected.expose()),
        _ => false,
    };
    if ok {
        return Ok(());
    }
    let mut resp = crate::http::error_response(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "send `Authorization: Bearer <token>` with the API token (KITEBRIDGE_API_TOKEN)",
    );
    resp.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    Err(resp)
}

/// Constant-time comparison. Both sides are hashed first so neither the content nor the length
/// of the expected token shows in the timing.
fn token_matches(presented: &str, expected: &str) -> bool {
    let a = Sha256::digest(presented.as_bytes());
    let b = Sha256::digest(expected.as_bytes());
    bool::from(a.ct_eq(&b))
}

// ---------------------------------------------------------------------------------------------
// Answers

/// An answer as status and JSON body (what idempotency stores and replays).
type Answer = (StatusCode, Value);

fn answer(status: StatusCode, body: impl Serialize) -> Result<Answer, ReleaseError> {
    // Serialising plain records (strings, numbers, maps) cannot fail; an empty object is a
    // harmless fallback all the same.
    Ok((
        status,
        serde_json::to_value(body).unwrap_or_else(|_| json!({})),
    ))
}

fn error_answer(e: &ReleaseError) -> Answer {
    let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if status.is_server_error() {
        tracing::error!(error = %e, "releases API request failed");
    } else if status == StatusCode::UNPROCESSABLE_ENTITY || status == StatusCode::BAD_GATEWAY {
        tracing::warn!(error = %e, "releases API: Buildkite did not create the build");
    }
    let mut body = json!({"error": e.kind(), "message": e.message()});
    if let ReleaseError::Invalid { field, .. } = e {
        body["field"] = Value::String(field.clone());
    }
    (status, body)
}

fn respond(a: Answer) -> Response {
    (a.0, axum::Json(a.1)).into_response()
}

async fn run(f: impl Future<Output = Result<Answer, ReleaseError>>) -> Response {
    respond(f.await.unwrap_or_else(|e| error_answer(&e)))
}

fn service(state: &AppState) -> ReleaseService {
    ReleaseService::new(
        Arc::new(state.store.clone()),
        state.buildkite.clone(),
        state.config.deployment_timeout,
    )
}

// ---------------------------------------------------------------------------------------------
// Idempotency-Key

/// Runs `f` once per `Idempotency-Key`: a repeated key with the same request replays the first
/// successful answer (with `Idempotent-Replayed: true`) without running anything. Only 2xx
/// answers are kept; after an error the key is given up, so a retry runs again.
async fn idempotent(
    state: &AppState,
    headers: &HeaderMap,
    uri: &Uri,
    body: &[u8],
    f: impl Future<Output = Result<Answer, ReleaseError>>,
) -> Response {
    let Some(raw) = headers.get(IDEMPOTENCY_KEY) else {
        return run(f).await;
    };
    let key = match raw.to_str() {
        Ok(k)
            if !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| (0x21..0x7f).contains(&b)) =>
        {
            k
        }
        _ => {
            return crate::http::field_error_response(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Idempotency-Key",
                "Idempotency-Key: must be 1 to 255 visible ASCII characters",
            );
        }
    };
    let mut h = Sha256::new();
    h.update(b"POST\n");
    h.update(uri.path().as_bytes());
    h.update(b"\n");
    h.update(body);
    let fingerprint = hex::encode(h.finalize());
    let store = &state.store;
    let rev = match store
        .idempotency_begin(IDEMPOTENCY_SCOPE, key, &fingerprint, IDEMPOTENCY_LEASE)
        .await
    {
        Ok(IdempotencyBegin::New { rev }) => rev,
        Ok(IdempotencyBegin::Replay(stored)) => {
            let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
            let mut resp = respond((status, stored.body));
            resp.headers_mut()
                .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
            return resp;
        }
        Ok(IdempotencyBegin::InFlight) => {
            return crate::http::error_response(
                StatusCode::CONFLICT,
                "idempotency_in_flight",
                "a request with this Idempotency-Key is still being processed; retry shortly",
            );
        }
        Ok(IdempotencyBegin::Mismatch) => {
            return crate::http::field_error_response(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "Idempotency-Key",
                "this Idempotency-Key was used with a different request",
            );
        }
        Err(e) => return respond(error_answer(&ReleaseError::from(e))),
    };
    let (status, body) = f.await.unwrap_or_else(|e| error_answer(&e));
    if status.is_success() {
        let stored = StoredResponse {
            status: status.as_u16(),
            body: body.clone(),
        };
        if let Err(e) = store
            .idempotency_finish(IDEMPOTENCY_SCOPE, key, rev, &stored)
            .await
        {
            // The work is done; the answer goes out. A retry with this key waits for the lease
            // to lapse and then runs again, which the caller can see by the new ids.
            tracing::error!(error = %e, "could not record the answer for an Idempotency-Key");
        }
    } else if let Err(e) = store.idempotency_abandon(IDEMPOTENCY_SCOPE, key, rev).await {
        tracing::warn!(error = %e, "could not give up an Idempotency-Key; it lapses with its lease");
    }
    respond((status, body))
}

// ---------------------------------------------------------------------------------------------
// Input

/// Parses a JSON body; a problem is a 400 naming the field.
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ReleaseError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = inner.to_string();
        let field = if path == "." || path.is_empty() {
            // "missing field `commit`", "unknown field `x`, expected ...": the field is quoted.
            message
                .split('`')
                .nth(1)
                .map(str::to_string)
                .unwrap_or_else(|| "body".into())
        } else {
            path
        };
        if inner.is_syntax() || inner.is_eof() {
            ReleaseError::invalid("body", format!("not valid JSON: {message}"))
        } else {
            ReleaseError::invalid(field, message)
        }
    })?;
    de.end()
        .map_err(|e| ReleaseError::invalid("body", format!("not valid JSON: {e}")))?;
    Ok(value)
}

/// Like [`parse`], but an empty body means `{}`.
fn parse_or_default<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, ReleaseError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        Ok(T::default())
    } else {
        parse(body)
    }
}

struct Paging {
    cursor: Option<String>,
    per_page: usize,
}

fn paging(q: &HashMap<String, String>) -> Result<Paging, ReleaseError> {
    let per_page = match q.get("per_page") {
        None => DEFAULT_PER_PAGE,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=MAX_PER_PAGE).contains(&n) => n,
            _ => {
                return Err(ReleaseError::invalid(
                    "per_page",
                    format!("must be a whole number from 1 to {MAX_PER_PAGE}"),
                ));
            }
        },
    };
    // Cursors are opaque to callers: hex, so they need no escaping in a query string.
    let cursor = match q.get("cursor").filter(|c| !c.is_empty()) {
        None => None,
        Some(c) => Some(
            hex::decode(c)
                .ok()
                .filter(|b| b.len() <= 300)
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| ReleaseError::invalid("cursor", "not a cursor of this listing"))?,
        ),
    };
    Ok(Paging { cursor, per_page })
}

fn listing<T>(page: crate::store::Page<T>) -> Listing<T> {
    Listing {
        items: page.items,
        next_cursor: page.next.map(hex::encode),
    }
}

#[derive(Serialize)]
struct Listing<T> {
    items: Vec<T>,
    next_cursor: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Handlers

async fn put_project(
    _: Authorized,
    State(state): State<AppState>,
    Path(project): Path<String>,
    body: Bytes,
) -> Response {
    run(async {
        let spec: ProjectSpec = parse(&body)?;
        let (p, created) = service(&state).put_project(&project, spec).await?;
        answer(
            if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            },
            p,
        )
    })
    .await
}

async fn get_project(
    _: Authorized,
    State(state): State<AppState>,
    Path(project): Path<String>,
) -> Response {
    run(async { answer(StatusCode::OK, service(&state).project(&project).await?) }).await
}

#[derive(Serialize)]
struct CutAnswer {
    release: Release,
    candidate: Candidate,
}

async fn cut(
    _: Authorized,
    State(state): State<AppState>,
    Path(project): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    idempotent(&state, &headers, &uri, &body, async {
        let req: CutRequest = parse(&body)?;
        let c = service(&state).cut(&project, req).await?;
        answer(
            StatusCode::CREATED,
            CutAnswer {
                release: c.release,
                candidate: c.candidate,
            },
        )
    })
    .await
}

async fn list_releases(
    _: Authorized,
    State(state): State<AppState>,
    Path(project): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    run(async {
        let p = paging(&q)?;
        let page = service(&state)
            .list_releases(&project, p.cursor.as_deref(), p.per_page)
            .await?;
        answer(StatusCode::OK, listing(page))
    })
    .await
}

#[derive(Serialize)]
struct ReleaseAnswer {
    #[serde(flatten)]
    release: Release,
    candidates: Vec<Candidate>,
}

async fn get_release(
    _: Authorized,
    State(state): State<AppState>,
    Path((project, version)): Path<(String, String)>,
) -> Response {
    run(async {
        let (release, candidates) = service(&state).release(&project, &version).await?;
        answer(
            StatusCode::OK,
            ReleaseAnswer {
                release,
                candidates,
            },
        )
    })
    .await
}

async fn get_environment(
    _: Authorized,
    State(state): State<AppState>,
    Path((project, environment)): Path<(String, String)>,
) -> Response {
    run(async {
        let (cfg, st, active) = service(&state).environment(&project, &environment).await?;
        answer(
            StatusCode::OK,
            json!({
                "name": cfg.name,
                "deploy_pipeline": cfg.deploy_pipeline,
                "requires": cfg.requires,
                "env": cfg.env,
                "frozen": st.frozen,
                "freeze_reason": st.freeze_reason,
                "active_deployment": active,
                "last_successful_candidate_version": st.successes.last(),
                "successes": st.successes,
            }),
        )
    })
    .await
}

async fn deploy(
    _: Authorized,
    State(state): State<AppState>,
    Path((project, environment)): Path<(String, String)>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    idempotent(&state, &headers, &uri, &body, async {
        let req: DeployRequest = parse(&body)?;
        let d = service(&state).deploy(&project, &environment, req).await?;
        answer(StatusCode::CREATED, d)
    })
    .await
}

async fn set_status(
    _: Authorized,
    State(state): State<AppState>,
    Path((project, environment)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    run(async {
        let req: StatusRequest = parse(&body)?;
        let u = service(&state)
            .set_status(&project, &environment, req)
            .await?;
        answer(
            if u.created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            },
            u.deployment,
        )
    })
    .await
}

async fn list_deployments(
    _: Authorized,
    State(state): State<AppState>,
    Path((project, environment)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    run(async {
        let p = paging(&q)?;
        let page = service(&state)
            .list_deployments(&project, &environment, p.cursor.as_deref(), p.per_page)
            .await?;
        answer(StatusCode::OK, listing(page))
    })
    .await
}

async fn get_deployment(
    _: Authorized,
    State(state): State<AppState>,
    Path((project, environment, id)): Path<(String, String, String)>,
) -> Response {
    run(async {
        answer(
            StatusCode::OK,
            service(&state)
                .deployment(&project, &environment, &id)
                .await?,
        )
    })
    .await
}

async fn rollback(
    _: Authorized,
    State(state): State<AppState>,
    Path((project, environment)): Path<(String, String)>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    idempotent(&state, &headers, &uri, &body, async {
        let req: RollbackRequest = parse_or_default(&body)?;
        let d = service(&state)
            .rollback(&project, &environment, req)
            .await?;
        answer(StatusCode::CREATED, d)
    })
    .await
}

async fn freeze(
    _: Authorized,
    State(state): State<AppState>,
    Path((project, environment)): Path<(String, String)>,
    body: Bytes,
) -> Response {
    run(async {
        let req: FreezeRequest = parse(&body)?;
        let st = service(&state).freeze(&project, &environment, req).await?;
        answer(StatusCode::OK, st)
    })
    .await
}

async fn unfreeze(
    _: Authorized,
    State(state): State<AppState>,
    Path((project, environment)): Path<(String, String)>,
) -> Response {
    run(async {
        let req = FreezeRequest {
            frozen: false,
            reason: None,
        };
        let st = service(&state).freeze(&project, &environment, req).await?;
        answer(StatusCode::OK, st)
    })
    .await
}

/// The HTTP method names [`ROUTES`] uses, upper case.
pub fn method_of(name: &str) -> Option<Method> {
    Method::from_bytes(name.to_ascii_uppercase().as_bytes()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(token_matches("s3cret", "s3cret"));
        assert!(!token_matches("s3cre", "s3cret"));
        assert!(!token_matches("s3cret ", "s3cret"));
        assert!(!token_matches("", "s3cret"));
    }

    #[test]
    fn json_errors_name_the_field() {
        let field = |body: &str| match parse::<CutRequest>(body.as_bytes()) {
            Err(ReleaseError::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(field(r#"{"branch":"main"}"#), "commit");
        assert_eq!(field(r#"{"commit":1,"branch":"main"}"#), "commit");
        assert_eq!(
            field(r#"{"commit":"a","branch":"main","colour":1}"#),
            "colour"
        );
        assert_eq!(
            field(r#"{"commit":"a","branch":"main","bump":"huge"}"#),
            "bump"
        );
        assert_eq!(field(r#"{"commit":"a","#), "body");
        assert_eq!(field(r#"{"commit":"a","branch":"m"} x"#), "body");
        assert!(parse_or_default::<RollbackRequest>(b"  ").is_ok());
    }

    #[test]
    fn paging_is_bounded() {
        let q = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<HashMap<_, _>>()
        };
        assert_eq!(paging(&q(&[])).unwrap().per_page, DEFAULT_PER_PAGE);
        assert_eq!(paging(&q(&[("per_page", "100")])).unwrap().per_page, 100);
        for bad in ["0", "101", "x", "-1"] {
            assert!(paging(&q(&[("per_page", bad)])).is_err(), "{bad}");
        }
    }

    #[test]
    fn route_table_uses_known_methods() {
        for (m, p) in ROUTES {
            assert!(method_of(m).is_some(), "{m}");
            assert!(p.starts_with("/projects/"), "{p}");
        }
    }
}
