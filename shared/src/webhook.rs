//! The Buildkite webhook receiver: `POST /webhooks/buildkite`, one handler for the Lambda
//! function (`functions/webhook`, through `lambda_http`) and `kitebridge serve`.
//!
//! A delivery walks: size limit -> [`verify`] over the raw bytes -> [`Event::parse`] ->
//! for `build.*`, [`status_record`] -> [`Reporter::report`] (the one status path, shared with
//! the poller: de-duplication, never-regress, outbox) -> [`observe_all`] (releases, trigger
//! rules). This module only wires those pieces and turns their outcomes into answers:
//!
//! | answer | when |
//! |---|---|
//! | 200 | `ping`; a build whose status was posted, was already on Bitbucket, was superseded by a newer one, or is not for this Bitbucket (`"status": "skipped"` with the reason) |
//! | 202 | a build whose status Bitbucket did not take now: it is in the outbox and delivered later; any event other than `ping` and `build.*` (`{"ignored": ...}`) |
//! | 400 | the body is not JSON, or a `build.*` body lacks a field it needs (named in `field`) |
//! | 401 | no credential, a wrong token, a bad or malformed signature, a timestamp outside the window |
//! | 405 | any method but POST |
//! | 413 | a body larger than `KITEBRIDGE_WEBHOOK_MAX_BODY` (1 MiB by default) |
//! | 503 | the store or an observer failed, or Bitbucket's API could not be determined: retry |
//!
//! Every error answer is `{"error": ..., "message": ...}`; none quotes a token or the body.
//! Each delivery is logged on one line (event, build, outcome), without headers or body.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures::StreamExt;
use serde_json::{Value, json};

use crate::buildkite::model::{Event, PayloadError, WebhookPayload};
use crate::buildkite::webhook::{Credential, Verified, VerifyError, verify};
use crate::http::{AppState, error_response};
use crate::observe::observe_all;
use crate::report::{Outcome, status_record};

/// Where Buildkite delivers.
pub const PATH: &str = "/webhooks/buildkite";

/// The current Unix time in seconds, for the signature's timestamp window. The system clock
/// unless a request carries another one as an extension: tests replay recorded deliveries at
/// the time they were signed (`router.layer(axum::Extension(WebhookClock::fixed(t)))`).
#[derive(Clone)]
pub struct WebhookClock(Arc<dyn Fn() -> i64 + Send + Sync>);

impl WebhookClock {
    /// A clock stopped at `unix_seconds`.
    pub fn fixed(unix_seconds: i64) -> WebhookClock {
        WebhookClock(Arc::new(move || unix_seconds))
    }

    fn now(&self) -> i64 {
        (self.0)()
    }
}

/// The webhook route, merged into [`crate::http::router`].
pub fn routes() -> Router<AppState> {
    Router::new().route(PATH, post(receive).fallback(method_not_allowed))
}

async fn method_not_allowed() -> Response {
    let mut resp = error_response(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "Buildkite webhooks are delivered with POST",
    );
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("POST"));
    resp
}

/// What to log about a delivery, filled in as it goes.
#[derive(Default)]
struct Trace {
    event: Option<String>,
    build_id: Option<String>,
    build_number: Option<u64>,
    pipeline: Option<String>,
    credential: Option<&'static str>,
    token_index: Option<usize>,
    /// Short machine word: `posted`, `deferred`, `unauthorized`, ...
    outcome: &'static str,
    /// Why, when it is not plain success (never a secret or the body).
    detail: Option<String>,
}

async fn receive(State(state): State<AppState>, req: Request) -> Response {
    let mut trace = Trace::default();
    let response = handle(&state, req, &mut trace).await;
    log(&trace, response.status());
    response
}

fn log(t: &Trace, status: StatusCode) {
    let code = status.as_u16();
    macro_rules! line {
        ($level:ident) => {
            tracing::$level!(
                http_status = code,
                event = t.event.as_deref().unwrap_or("-"),
                build = t.build_id.as_deref().unwrap_or("-"),
                build_number = t.build_number,
                pipeline = t.pipeline.as_deref().unwrap_or("-"),
                credential = t.credential.unwrap_or("-"),
                token_index = t.token_index,
                outcome = t.outcome,
                detail = t.detail.as_deref().unwrap_or(""),
                "webhook delivery"
            )
        };
    }
    if status.is_server_error() {
        line!(error);
    } else if status == StatusCode::UNAUTHORIZED || t.outcome == "deferred" {
        line!(warn);
    } else {
        line!(info);
    }
}

async fn handle(state: &AppState, req: Request, trace: &mut Trace) -> Response {
    let clock = req.extensions().get::<WebhookClock>().cloned();
    let (parts, body) = req.into_parts();
    let limit = state.config.buildkite.webhook_max_body;

    // 1. Size, before reading more than the limit.
    let body = match read_limited(&parts.headers, body, limit).await {
        Ok(b) => b,
        Err(BodyError::TooLarge) => {
            trace.outcome = "too_large";
            return error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the body is larger than the {limit} bytes accepted"),
            );
        }
        Err(BodyError::Unreadable) => {
            trace.outcome = "unreadable";
            return error_response(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "the body could not be read",
            );
        }
    };

    // 2. Verify the raw bytes before looking inside them.
    let now = clock.map_or_else(|| chrono::Utc::now().timestamp(), |c| c.now());
    let verified = match credentials(&parts.headers).and_then(|(signature, token)| {
        verify(
            signature,
            token,
            &body,
            &state.config.buildkite.webhook_tokens,
            now,
            state.config.buildkite.webhook_max_skew,
        )
    }) {
        Ok(v) => v,
        Err(e) => {
            trace.outcome = "unauthorized";
            trace.detail = Some(e.to_string());
            return if e.is_unauthorized() {
                error_response(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string())
            } else {
                // Only `NoTokens`: start-up refuses that configuration, so this is unreachable
                // in a deployed function; say whose fault it is all the same.
                error_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "misconfigured",
                    "kitebridge has no webhook token configured (BUILDKITE_WEBHOOK_TOKEN)",
                )
            };
        }
    };
    let Verified {
        credential,
        token_index,
    } = verified;
    trace.credential = Some(match credential {
        Credential::Signature { .. } => "signature",
        Credential::Token => "token",
    });
    trace.token_index = Some(token_index);

    // 3. Parse.
    let event = match Event::parse(&body) {
        Ok(e) => e,
        Err(e) => {
            trace.event = event_name(&body);
            trace.outcome = "invalid";
            trace.detail = Some(e.to_string());
            return invalid_payload(&e);
        }
    };
    match event {
        Event::Ping => {
            trace.event = Some("ping".into());
            trace.outcome = "pong";
            (
                StatusCode::OK,
                axum::Json(json!({"event": "ping", "status": "ok"})),
            )
                .into_response()
        }
        Event::Other(name) => {
            trace.outcome = "ignored";
            let answer = json!({
                "ignored": name,
                "message": "kitebridge acts on ping and build.* events only",
            });
            trace.event = Some(name);
            (StatusCode::ACCEPTED, axum::Json(answer)).into_response()
        }
        Event::Build(payload) => {
            trace.event = Some(payload.event.clone());
            trace.build_id = Some(payload.build.id.clone());
            trace.build_number = Some(payload.build.number);
            trace.pipeline = Some(payload.pipeline.slug.clone());
            build_event(state, &payload, trace).await
        }
    }
}

enum BodyError {
    TooLarge,
    Unreadable,
}

/// Reads the whole body, refusing more than `limit` bytes (by `Content-Length` at once, else
/// while reading, so a chunked body cannot grow past it either).
async fn read_limited(headers: &HeaderMap, body: Body, limit: usize) -> Result<Vec<u8>, BodyError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(BodyError::TooLarge);
    }
    let capacity = declared.map_or(8 * 1024, |n| n as usize).min(limit);
    let mut out = Vec::with_capacity(capacity);
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| BodyError::Unreadable)?;
        if out.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge);
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

type Credentials<'a> = (Option<&'a str>, Option<&'a str>);

/// The `X-Buildkite-Signature` and `X-Buildkite-Token` values. A value that is not visible
/// ASCII is refused here (it cannot be a token Buildkite sent).
fn credentials(headers: &HeaderMap) -> Result<Credentials<'_>, VerifyError> {
    let text = |name: &str| -> Result<Option<&str>, VerifyError> {
        match headers.get(name) {
            None => Ok(None),
            Some(v) => v.to_str().map(Some).map_err(|_| match name {
                "x-buildkite-signature" => {
                    VerifyError::MalformedSignature("the header is not plain ASCII")
                }
                _ => VerifyError::BadToken,
            }),
        }
    };
    Ok((text("x-buildkite-signature")?, text("x-buildkite-token")?))
}

/// The body's `event`, for the log line of a body that did not parse.
fn event_name(body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let name = value.get("event")?.as_str()?;
    Some(name.chars().take(64).collect())
}

fn invalid_payload(e: &PayloadError) -> Response {
    let field = match e {
        PayloadError::NotJson(_) | PayloadError::NotAnObject => None,
        PayloadError::Missing(f) => Some(f.as_str()),
        PayloadError::Invalid { field, .. } => Some(field.as_str()),
    };
    let mut answer = json!({"error": "invalid_payload", "message": e.to_string()});
    if let (Some(obj), Some(field)) = (answer.as_object_mut(), field) {
        obj.insert("field".into(), Value::String(field.to_owned()));
    }
    (StatusCode::BAD_REQUEST, axum::Json(answer)).into_response()
}

/// What became of the commit status of a build event.
enum StatusStep {
    Reported {
        outcome: Outcome,
        state: String,
    },
    Skipped(String),
    /// Bitbucket's API could not be determined (the probe failed): nothing was recorded.
    ApiUnknown(String),
    /// The store failed: the status may not be recorded.
    StoreFailed(String),
    NotConfigured,
}

async fn build_event(state: &AppState, payload: &WebhookPayload, trace: &mut Trace) -> Response {
    let build = &payload.build;
    let pipeline = Some(&payload.pipeline);
    // The build's own URLs name its organization; a single configured one is the fallback.
    let org = payload.organization_slug().or_else(|| {
        match state.config.buildkite.organizations.as_slice() {
            [only] => Some(only.clone()),
            _ => None,
        }
    });

    let step = match (&state.bitbucket, &state.webhook_reporter) {
        (Some(bitbucket), Some(reporter)) => match bitbucket.api().await {
            Err(e) => StatusStep::ApiUnknown(e.to_string()),
            Ok(api) => match status_record(build, pipeline, org.as_deref(), &api, bitbucket.base())
            {
                Err(skip) => StatusStep::Skipped(skip.to_string()),
                Ok(record) => {
                    let bitbucket_state = record.state.clone();
                    match reporter.report(record).await {
                        Ok(outcome) => StatusStep::Reported {
                            outcome,
                            state: bitbucket_state,
                        },
                        Err(e) => StatusStep::StoreFailed(e.to_string()),
                    }
                }
            },
        },
        _ => StatusStep::NotConfigured,
    };

    // Observers run whatever became of the status: they do not depend on Bitbucket, and each
    // is idempotent, so a retried delivery does no harm.
    let observed = match org.as_deref() {
        Some(org) => observe_all(&state.observers, org, build, pipeline)
            .await
            .map_err(|e| e.to_string()),
        None if state.observers.is_empty() => Ok(()),
        None => {
            // Observers are keyed by organization; without one the poller hands them the build.
            tracing::warn!(build = %build.id, "build event without an organization: observers skipped");
            Ok(())
        }
    };

    let mut answer = json!({
        "event": payload.event,
        "build": build.id,
        "number": build.number,
        "pipeline": payload.pipeline.slug,
    });
    // The answer says in words what failed; the internal text (store and HTTP errors) goes to
    // the log line only.
    let retry = |trace: &mut Trace, error: &str, message: &str, detail: String| {
        trace.detail = Some(detail);
        error_response(StatusCode::SERVICE_UNAVAILABLE, error, message)
    };
    let (code, status_word) = match step {
        StatusStep::StoreFailed(e) => {
            trace.outcome = "store_failed";
            return retry(
                trace,
                "unavailable",
                "the status could not be recorded: the store is unavailable; retry the delivery",
                e.to_string(),
            );
        }
        StatusStep::ApiUnknown(e) => {
            trace.outcome = "bitbucket_unknown";
            return retry(
                trace,
                "bitbucket_unavailable",
                "Bitbucket could not be asked which build-status API it has (set BITBUCKET_API \
                 to skip the question); retry the delivery (the next poll cycle reports this \
                 build in any case)",
                e.to_string(),
            );
        }
        StatusStep::NotConfigured => {
            trace.outcome = "not_configured";
            return retry(
                trace,
                "unavailable",
                "Bitbucket is not configured (BITBUCKET_URL and credentials)",
                "not configured".into(),
            );
        }
        StatusStep::Skipped(reason) => {
            trace.outcome = "skipped";
            trace.detail = Some(reason.clone());
            set(&mut answer, "reason", Value::String(reason));
            (StatusCode::OK, "skipped")
        }
        StatusStep::Reported { outcome, state } => {
            set(&mut answer, "state", Value::String(state));
            match outcome {
                Outcome::Posted => (StatusCode::OK, "posted"),
                Outcome::AlreadyReported => (StatusCode::OK, "already_reported"),
                Outcome::Superseded => (StatusCode::OK, "superseded"),
                // Another delivery (or the poller) is posting this very status right now.
                Outcome::InFlight => (StatusCode::OK, "in_flight"),
                // Possibly a re-run, and Buildkite could not be asked: the recorded status
                // stands; the poll (or the build's next event) settles it.
                Outcome::Unconfirmed { error } => {
                    trace.detail = Some(error);
                    (StatusCode::OK, "unconfirmed")
                }
                Outcome::Abandoned { error } => {
                    trace.detail = Some(error);
                    (StatusCode::OK, "abandoned")
                }
                Outcome::Deferred { error } => {
                    trace.detail = Some(error);
                    set(
                        &mut answer,
                        "message",
                        Value::String(
                            "Bitbucket did not take the status now; it is kept and delivered \
                             by a later retry or poll cycle"
                                .into(),
                        ),
                    );
                    (StatusCode::ACCEPTED, "deferred")
                }
            }
        }
    };
    trace.outcome = status_word;
    if let Err(e) = observed {
        trace.outcome = "observer_failed";
        return retry(
            trace,
            "unavailable",
            "the build could not be handed to release tracking or trigger rules; retry the \
             delivery",
            e,
        );
    }
    set(&mut answer, "status", Value::String(status_word.into()));
    (code, axum::Json(answer)).into_response()
}

fn set(answer: &mut Value, key: &str, value: Value) {
    if let Some(obj) = answer.as_object_mut() {
        obj.insert(key.to_owned(), value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_bytes(v).unwrap());
        }
        h
    }

    fn stream(chunks: &[&'static [u8]], fail: bool) -> Body {
        let mut items: Vec<Result<&'static [u8], std::io::Error>> =
            chunks.iter().map(|c| Ok(*c)).collect();
        if fail {
            items.push(Err(std::io::Error::other("connection reset")));
        }
        Body::from_stream(futures::stream::iter(items))
    }

    #[tokio::test]
    async fn body_limit() {
        let none = HeaderMap::new();
        let ok = read_limited(&none, Body::from("abcd"), 4).await;
        assert_eq!(ok.ok().as_deref(), Some(&b"abcd"[..]));
        assert!(matches!(
            read_limited(&none, Body::from("abcde"), 4).await,
            Err(BodyError::TooLarge)
        ));
        // Streamed without a length: counted while reading.
        assert!(matches!(
            read_limited(&none, stream(&[b"ab", b"cd", b"e"], false), 4).await,
            Err(BodyError::TooLarge)
        ));
        assert_eq!(
            read_limited(&none, stream(&[b"ab", b"cd"], false), 4)
                .await
                .ok()
                .as_deref(),
            Some(&b"abcd"[..])
        );
        // A declared length above the limit is refused before reading.
        let big = headers(&[("content-length", b"5")]);
        assert!(matches!(
            read_limited(&big, Body::empty(), 4).await,
            Err(BodyError::TooLarge)
        ));
        assert!(matches!(
            read_limited(&none, stream(&[b"ab"], true), 4).await,
            Err(BodyError::Unreadable)
        ));
    }

    #[test]
    fn credential_headers() {
        assert_eq!(credentials(&HeaderMap::new()), Ok((None, None)));
        let h = headers(&[
            ("x-buildkite-signature", b"timestamp=1,signature=ab"),
            ("x-buildkite-token", b"tok"),
        ]);
        assert_eq!(
            credentials(&h),
            Ok((Some("timestamp=1,signature=ab"), Some("tok")))
        );
        let h = headers(&[("x-buildkite-signature", b"timestamp=1,\xffsignature")]);
        assert!(matches!(
            credentials(&h),
            Err(VerifyError::MalformedSignature(_))
        ));
        let h = headers(&[("x-buildkite-token", b"t\xffk")]);
        assert_eq!(credentials(&h), Err(VerifyError::BadToken));
    }

    #[tokio::test]
    async fn invalid_payload_names_the_field() {
        let cases = [
            (
                PayloadError::Missing("build.commit".into()),
                Some("build.commit"),
            ),
            (
                PayloadError::Invalid {
                    field: "build.number".into(),
                    problem: "expected u64".into(),
                },
                Some("build.number"),
            ),
            (PayloadError::NotAnObject, None),
            (PayloadError::NotJson("EOF".into()), None),
        ];
        for (e, field) in cases {
            let resp = invalid_payload(&e);
            assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
            let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
                .await
                .unwrap();
            let v: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["error"], "invalid_payload");
            assert_eq!(v["message"], e.to_string());
            assert_eq!(v["field"].as_str(), field);
        }
    }

    #[test]
    fn event_name_for_logs_is_bounded() {
        assert_eq!(
            event_name(br#"{"event":"job.finished"}"#).as_deref(),
            Some("job.finished")
        );
        assert_eq!(event_name(b"not json"), None);
        let long = format!(r#"{{"event":"{}"}}"#, "x".repeat(500));
        assert_eq!(event_name(long.as_bytes()).map(|s| s.len()), Some(64));
    }
}
