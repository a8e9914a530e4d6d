//! Set-up shared by the webhook tests (`webhook_e2e`, `webhook_lambda`): a fake Buildkite and a
//! fake Bitbucket on loopback, kitebridge's real `AppState` and router built from configuration
//! pointing at them, and helpers to send deliveries through the router.

#![allow(dead_code)] // each test binary uses a different part

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use kitebridge::config::Config;
use kitebridge::http::AppState;
use kitebridge::store::{Item, Kv, Order, SqliteKv, Store, StoreError, Write};
use kitebridge_fakes::{
    BuildState, DEFAULT_BITBUCKET_TOKEN, DEFAULT_BUILDKITE_TOKEN, FakeBitbucket,
    FakeBitbucketOptions, FakeBuildkite, FakeBuildkiteOptions, Pipeline, WebhookAuth,
    WebhookDelivery, WebhookEvent,
};
use serde_json::Value;
use tower::ServiceExt;

pub const ORG: &str = "acme-inc";
pub const PIPELINE: &str = "web";
/// The status key kitebridge gives builds of [`PIPELINE`].
pub const KEY: &str = "acme-inc/web";
/// Two webhook tokens configured at once, as during a rotation.
pub const OLD_TOKEN: &str = "whk-old-token-5b1e9c";
pub const NEW_TOKEN: &str = "whk-new-token-d04a77";

pub struct Env {
    pub bk: FakeBuildkite,
    pub bb: FakeBitbucket,
    pub state: AppState,
}

impl Env {
    /// Fakes plus kitebridge on an in-memory SQLite store.
    pub async fn start() -> Env {
        Env::with(store_sqlite(), &[]).await
    }

    /// Fakes plus kitebridge on `store`, with extra (or overriding) configuration variables.
    pub async fn with(store: Store, extra: &[(&str, &str)]) -> Env {
        let bk = FakeBuildkite::start(FakeBuildkiteOptions::default()).await;
        bk.add_pipeline(Pipeline::new(
            ORG,
            PIPELINE,
            "Web",
            "ssh://git@127.0.0.1:7999/proj/web.git",
        ));
        let bb = FakeBitbucket::start(FakeBitbucketOptions::default()).await;
        bb.add_repository("PROJ", "web");
        let tokens = format!("{OLD_TOKEN},{NEW_TOKEN}");
        let mut vars: Vec<(String, String)> = [
            ("BITBUCKET_URL", bb.url()),
            ("BITBUCKET_TOKEN", DEFAULT_BITBUCKET_TOKEN.to_owned()),
            ("BUILDKITE_API_URL", bk.url()),
            ("BUILDKITE_API_TOKEN", DEFAULT_BUILDKITE_TOKEN.to_owned()),
            ("BUILDKITE_ORGANIZATION", ORG.to_owned()),
            ("BUILDKITE_WEBHOOK_TOKEN", tokens),
            ("KITEBRIDGE_HTTP_TIMEOUT", "5".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for (k, v) in extra {
            vars.retain(|(name, _)| name != k);
            vars.push(((*k).to_owned(), (*v).to_owned()));
        }
        let config = Config::from_lookup(|name| {
            vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
        })
        .expect("test configuration is valid");
        let state = kitebridge::bootstrap::app_state(config, store).expect("app state");
        Env { bk, bb, state }
    }

    pub fn router(&self) -> Router {
        kitebridge::http::router(self.state.clone())
    }

    /// A new build of [`PIPELINE`] on a fresh commit.
    pub fn new_build(&self, state: BuildState) -> kitebridge_fakes::Build {
        self.bk.add_build(
            kitebridge_fakes::Build::new(ORG, PIPELINE, random_sha(), "main").with_state(state),
        )
    }

    /// The delivery Buildkite would send now about `build` (as the fake holds it now).
    pub fn delivery(
        &self,
        build: &kitebridge_fakes::Build,
        event: WebhookEvent,
        auth: &WebhookAuth,
    ) -> WebhookDelivery {
        self.bk
            .webhook(ORG, PIPELINE, build.number, event, auth)
            .expect("the build exists")
    }

    /// Moves `build` to `state` and returns the delivery for `event` about it.
    pub fn transition(
        &self,
        build: &kitebridge_fakes::Build,
        state: BuildState,
        event: WebhookEvent,
    ) -> WebhookDelivery {
        self.bk
            .set_build_state(ORG, PIPELINE, build.number, state)
            .expect("the build exists");
        self.delivery(build, event, &signed())
    }
}

pub fn store_sqlite() -> Store {
    Store::new(SqliteKv::in_memory().expect("in-memory SQLite"))
}

/// Signature mode with the new token, signed now.
pub fn signed() -> WebhookAuth {
    WebhookAuth::Signature {
        token: NEW_TOKEN.to_owned(),
        timestamp: None,
    }
}

pub fn random_sha() -> String {
    (0..40)
        .map(|_| char::from_digit(fastrand::u32(0..16), 16).unwrap_or('0'))
        .collect()
}

/// A POST to the webhook path with these headers and body.
pub fn request(headers: &[(String, String)], body: impl Into<Body>) -> Request<Body> {
    request_with(Method::POST, headers, body)
}

pub fn request_with(
    method: Method,
    headers: &[(String, String)],
    body: impl Into<Body>,
) -> Request<Body> {
    let mut b = Request::builder().method(method).uri("/webhooks/buildkite");
    for (k, v) in headers {
        b = b.header(k.as_str(), v.as_str());
    }
    b.body(body.into()).expect("a valid request")
}

/// Sends `req` through `router` and returns the status and the body as JSON (`Null` if the body
/// is empty; panics if it is something else than JSON, since every answer must be JSON).
pub async fn call(router: &Router, req: Request<Body>) -> (StatusCode, Value) {
    let resp = router.clone().oneshot(req).await.expect("infallible");
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .expect("answer body");
    if bytes.is_empty() {
        return (status, Value::Null);
    }
    let json = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "answer {status} is not JSON ({e}): {}",
            String::from_utf8_lossy(&bytes)
        )
    });
    (status, json)
}

pub async fn send(router: &Router, d: &WebhookDelivery) -> (StatusCode, Value) {
    call(router, request(&d.headers, d.body.clone())).await
}

/// A store whose every operation fails while `down` is set (a store outage).
pub struct FlakyKv {
    pub inner: SqliteKv,
    pub down: Arc<AtomicBool>,
}

impl FlakyKv {
    fn check(&self) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            Err(StoreError::Unavailable("injected outage".into()))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl Kv for FlakyKv {
    async fn get(&self, pk: &str, sk: &str) -> Result<Option<Item>, StoreError> {
        self.check()?;
        self.inner.get(pk, sk).await
    }

    async fn write(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        self.check()?;
        self.inner.write(writes).await
    }

    async fn query(
        &self,
        pk: &str,
        sk_prefix: &str,
        after: Option<&str>,
        limit: usize,
        order: Order,
    ) -> Result<Vec<Item>, StoreError> {
        self.check()?;
        self.inner.query(pk, sk_prefix, after, limit, order).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.check()?;
        self.inner.ping().await
    }
}
