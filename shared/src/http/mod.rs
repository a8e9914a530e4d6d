//! The HTTP edge: one axum [`Router`] for every route (`kitebridge serve` runs it under tokio,
//! the Lambda functions under `lambda_http`; no route is written twice), the one error answer
//! ([`ApiError`]), the one authentication ([`Authorized`]) and the layers every request passes
//! (request id, trace, timeout, concurrency and body limits).
//!
//! Each route module takes only its own state ([`HealthState`], [`WebhookState`],
//! [`ReleasesState`], [`RulesState`]), built once here from what start-up made ([`AppState`]).
//! The modules below this one are leaves: nothing in the domain imports `http`.

mod auth;
pub mod dashboard;
mod error;
pub mod health;
mod json;
pub mod releases;
pub mod rules;
pub mod webhook;

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, FailedToBufferBody};
use axum::extract::{DefaultBodyLimit, FromRequest, Request};
use axum::http::{HeaderName, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tower::ServiceBuilder;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::{DefaultOnFailure, DefaultOnResponse, TraceLayer};

pub use auth::{Auth, Authorized};
pub use error::ApiError;
pub use health::HealthState;
pub use releases::ReleasesState;
pub use rules::RulesState;
pub use webhook::WebhookState;

use crate::bitbucket::BitbucketClient;
use crate::buildkite::client::BuildkiteClient;
use crate::config::Config;
use crate::observe::BuildObserver;
use crate::poll::Poller;
use crate::release::ReleaseService;
use crate::report::Reporter;
use crate::rules::Rule;
use crate::rules::catalog::RuleCatalog;
use crate::store::Store;

/// Largest body of an API request (releases, rules): axum's own default, kept.
pub const API_MAX_BODY: usize = 2 << 20;

/// The request id header, set on every request that comes without one and on every answer.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What start-up builds once ([`crate::bootstrap::app_state`]): the parts [`router`] makes the
/// routes' states from, and the poller for the process that runs the poll loop. Parts whose
/// settings are absent are `None`; [`Config::require`] has already refused a role that needs
/// them, and the router decides once what a missing part means for its routes.
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
    pub buildkite: Option<BuildkiteClient>,
    /// The configured trigger rules, loaded and validated once at start-up; the firer fires
    /// these and the rules API shows these.
    pub rules: Arc<Vec<Rule>>,
}

/// The router with every route kitebridge serves, and the layers every request passes.
pub fn router(app: AppState) -> Router {
    let auth = Auth::from_config(&app.config);
    let health = HealthState {
        store: app.store.clone(),
        poller: app.poller.clone(),
        polling_interval: app.config.monitor.polling_interval,
        pacer: app.webhook_reporter.as_ref().map(|r| r.pacer().clone()),
        max_undelivered_age: app.config.delivery.max_undelivered_age,
    };
    let releases = ReleasesState {
        service: ReleaseService::new(
            Arc::new(app.store.clone()),
            app.buildkite.clone(),
            app.config.deployment_timeout,
        )
        .with_bitbucket(app.bitbucket.clone()),
        store: app.store.clone(),
        auth: auth.clone(),
    };
    let dashboard = dashboard::DashboardState {
        service: releases.service.clone(),
        store: app.store.clone(),
        health: health.clone(),
        sessions: dashboard::session::Sessions::new(
            app.config.dashboard.token.clone(),
            app.config.dashboard.session_lifetime,
        ),
    };
    let rules = RulesState {
        catalog: RuleCatalog::new(app.rules.clone(), app.store.clone()),
        auth,
    };
    // Without Bitbucket (a role that reports no statuses) the webhook route answers 503.
    let webhook = match (&app.bitbucket, &app.webhook_reporter) {
        (Some(bitbucket), Some(reporter)) => webhook::routes(WebhookState {
            tokens: Arc::new(app.config.buildkite.webhook_tokens.clone()),
            max_skew: app.config.buildkite.webhook_max_skew,
            delivery: crate::webhook::Delivery {
                bitbucket: bitbucket.clone(),
                reporter: reporter.clone(),
                observers: app.observers.clone(),
                organizations: app.config.buildkite.organizations.clone(),
            },
            max_body: app.config.buildkite.webhook_max_body,
        }),
        _ => webhook::unconfigured_routes(),
    };
    let api = Router::new()
        .merge(releases::routes(releases))
        .merge(rules::routes(rules));
    let router = Router::new()
        .merge(health::routes(health))
        .merge(webhook)
        .merge(with_body_limit(api, API_MAX_BODY))
        .merge(dashboard::routes(dashboard))
        .fallback(not_found);
    with_edge_layers(router, &app.config)
}

/// The layers around every route, outermost first: a request id (kept from the caller's
/// `x-request-id` or made up, and sent back), a trace span per request carrying it, a
/// timeout, and a limit on the requests handled at once.
fn with_edge_layers(router: Router, config: &Config) -> Router {
    let server = &config.server;
    let layers = ServiceBuilder::new()
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .layer(
            TraceLayer::new_for_http()
                // Method, path and request id only: headers (credentials) and query strings
                // stay out of the logs.
                .make_span_with(|req: &Request| {
                    let id = req
                        .headers()
                        .get(REQUEST_ID)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-");
                    tracing::info_span!(
                        "request",
                        method = %req.method(),
                        path = req.uri().path(),
                        request_id = id,
                    )
                })
                // One line per answer at debug; failures are logged where they happen, with
                // what went wrong, so the layer does not log them again as errors.
                .on_request(())
                .on_response(DefaultOnResponse::new().level(tracing::Level::DEBUG))
                .on_failure(DefaultOnFailure::new().level(tracing::Level::DEBUG)),
        )
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(axum::middleware::map_response(json_layer_answers))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            server.request_timeout,
        ))
        .layer(GlobalConcurrencyLimitLayer::new(server.max_requests));
    router.layer(layers)
}

/// The answers layers make on their own (a timeout) become [`ApiError`]'s JSON answers; every
/// answer a handler makes is JSON already.
async fn json_layer_answers(resp: Response) -> Response {
    let from_a_layer = resp.status() == StatusCode::SERVICE_UNAVAILABLE
        && !resp.headers().contains_key(header::CONTENT_TYPE);
    if from_a_layer {
        ApiError::Timeout.into_response()
    } else {
        resp
    }
}

/// The limit a route's body is held to, for the 413 answer's message.
#[derive(Clone, Copy)]
struct BodyLimit(usize);

/// `router` with bodies limited to `limit` bytes: refused with 413 up front by their
/// `Content-Length`, else cut off while they are read ([`RawBody`] answers 413 then).
fn with_body_limit<S: Clone + Send + Sync + 'static>(router: Router<S>, limit: usize) -> Router<S> {
    router.layer(
        ServiceBuilder::new()
            .layer(axum::middleware::map_response(
                move |resp: Response<tower_http::limit::ResponseBody<Body>>| async move {
                    // `RequestBodyLimit`'s own refusal is plain text.
                    let plain = resp.status() == StatusCode::PAYLOAD_TOO_LARGE
                        && resp
                            .headers()
                            .get(header::CONTENT_TYPE)
                            .is_none_or(|v| v.as_bytes() != b"application/json");
                    if plain {
                        ApiError::TooLarge { limit }.into_response()
                    } else {
                        resp.map(Body::new)
                    }
                },
            ))
            .layer(RequestBodyLimitLayer::new(limit))
            .layer(axum::Extension(BodyLimit(limit)))
            // The limit above replaces axum's default one (2 MiB), which would otherwise cap a
            // larger KITEBRIDGE_WEBHOOK_MAX_BODY.
            .layer(DefaultBodyLimit::disable()),
    )
}

/// A request body read whole, within the route's limit: a larger one is a 413, one that cannot
/// be read (the client went away) a 400.
pub struct RawBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let limit = req
            .extensions()
            .get::<BodyLimit>()
            .map_or(API_MAX_BODY, |l| l.0);
        match Bytes::from_request(req, state).await {
            Ok(bytes) => Ok(RawBody(bytes)),
            Err(BytesRejection::FailedToBufferBody(FailedToBufferBody::LengthLimitError(_))) => {
                Err(ApiError::TooLarge { limit })
            }
            Err(_) => Err(ApiError::Unreadable),
        }
    }
}

async fn not_found() -> ApiError {
    ApiError::NoRoute
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::routing::{get, post};
    use serde_json::Value;
    use tower::ServiceExt;

    use super::*;

    async fn json(resp: Response) -> Value {
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_takes_too_long_is_a_json_503_with_a_request_id() {
        let config = Config::from_lookup(|_| None).unwrap();
        let slow = Router::new().route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                "late"
            }),
        );
        let resp = with_edge_layers(slow, &config)
            .oneshot(Request::get("/slow").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(resp.headers().contains_key(REQUEST_ID));
        assert_eq!(json(resp).await["error"], "timeout");
    }

    #[tokio::test]
    async fn bodies_over_the_limit_are_a_json_413_declared_or_streamed() {
        let app = with_body_limit(
            Router::new().route(
                "/b",
                post(|RawBody(b): RawBody| async move { b.len().to_string() }),
            ),
            4,
        );
        let call = |body: Body, length: Option<&str>| {
            let mut req = Request::post("/b");
            if let Some(n) = length {
                req = req.header(header::CONTENT_LENGTH, n);
            }
            app.clone().oneshot(req.body(body).unwrap())
        };
        let declared = call(Body::from("abcde"), Some("5")).await.unwrap();
        assert_eq!(declared.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let v = json(declared).await;
        assert_eq!(v["error"], "payload_too_large");
        assert_eq!(v["message"], "the body is larger than the 4 bytes accepted");

        let chunks: Vec<Result<&'static [u8], std::io::Error>> = vec![Ok(b"ab"), Ok(b"cde")];
        let streamed = call(Body::from_stream(futures::stream::iter(chunks)), None)
            .await
            .unwrap();
        assert_eq!(streamed.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(json(streamed).await["error"], "payload_too_large");

        let broken: Vec<Result<&'static [u8], std::io::Error>> =
            vec![Ok(b"ab"), Err(std::io::Error::other("connection reset"))];
        let unreadable = call(Body::from_stream(futures::stream::iter(broken)), None)
            .await
            .unwrap();
        assert_eq!(unreadable.status(), StatusCode::BAD_REQUEST);
        assert_eq!(json(unreadable).await["error"], "bad_request");

        let fits = call(Body::from("abcd"), Some("4")).await.unwrap();
        assert_eq!(fits.status(), StatusCode::OK);
    }
}
