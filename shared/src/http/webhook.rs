//! The Buildkite webhook receiver: `POST /webhooks/buildkite`, one handler for the Lambda
//! function (`functions/webhook`, through `lambda_http`) and `kitebridge serve`.
//!
//! A delivery walks: size limit (a layer, `with_body_limit` in [`super`]) -> [`verify`] over the raw
//! bytes -> [`Event::parse`] -> for `build.*`, [`Delivery::build_event`] (the status, then the
//! observers). This module turns their outcomes into answers:
//!
//! | answer | when |
//! |---|---|
//! | 200 | `ping`; a build whose status was posted, was already on Bitbucket, was superseded by a newer one, or is not for this Bitbucket (`"status": "skipped"` with the reason) |
//! | 202 | a build whose status Bitbucket did not take now: it is in the outbox and delivered later; any event other than `ping` and `build.*` (`{"ignored": ...}`) |
//! | 400 | the body is not JSON, or a `build.*` body lacks a field it needs (named in `field`) |
//! | 401 | no credential, a wrong token, a bad or malformed signature, a timestamp outside the window |
//! | 405 | any method but POST |
//! | 413 | a body larger than `KITEBRIDGE_WEBHOOK_MAX_BODY` (1 MiB by default) |
//! | 503 | the store or an observer failed, or Bitbucket's API could not be determined, or Bitbucket is not configured: retry |
//!
//! Every error answer is `{"error": ..., "message": ...}`; none quotes a token or the body.
//! Each delivery is logged on one line (event, build, outcome), without headers or body.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Json, Router};
use serde::Serialize;
use serde_json::Value;

use super::{ApiError, RawBody};
use crate::buildkite::model::{Event, WebhookPayload};
use crate::buildkite::webhook::{Credential, Verified, VerifyError, verify};
use crate::config::Secret;
use crate::report::Outcome;
use crate::webhook::{Delivery, StatusStep};

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

/// What the receiver needs: the tokens to verify with, and the delivery of build events.
#[derive(Clone)]
pub struct WebhookState {
    pub tokens: Arc<Vec<Secret>>,
    /// Largest accepted distance between a signed delivery's timestamp and now.
    pub max_skew: Duration,
    pub delivery: Delivery,
    /// `KITEBRIDGE_WEBHOOK_MAX_BODY`.
    pub max_body: usize,
}

/// The webhook route, with its state.
pub fn routes<S: Clone + Send + Sync + 'static>(state: WebhookState) -> Router<S> {
    let max_body = state.max_body;
    let route = Router::new().route(PATH, post(receive).fallback(method_not_allowed));
    super::with_body_limit(route, max_body).with_state(state)
}

/// The webhook route of a process without Bitbucket (a role that does not report statuses):
/// every delivery is answered 503, so Buildkite keeps it for a receiver that can act on it.
pub fn unconfigured_routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new().route(
        PATH,
        post(|| async {
            ApiError::Unavailable {
                error: "unavailable",
                message: "Bitbucket is not configured (BITBUCKET_URL and credentials)",
                detail: "not configured".into(),
            }
        })
        .fallback(method_not_allowed),
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed {
        allow: "POST",
        message: "Buildkite webhooks are delivered with POST",
    }
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

/// A successful answer.
#[derive(Serialize)]
#[serde(untagged)]
enum Answer {
    Ping {
        event: &'static str,
        status: &'static str,
    },
    Ignored {
        ignored: String,
        message: &'static str,
    },
    Build(BuildAnswer),
}

/// The answer to a `build.*` event.
#[derive(Serialize)]
struct BuildAnswer {
    event: String,
    build: String,
    number: u64,
    pipeline: String,
    status: &'static str,
    /// The Bitbucket state of the status.
    #[serde(skip_serializing_if = "Option::is_none")]
    state: Option<String>,
    /// Why the status was skipped.
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'static str>,
}

async fn receive(
    State(state): State<WebhookState>,
    clock: Option<Extension<WebhookClock>>,
    headers: HeaderMap,
    body: Result<RawBody, ApiError>,
) -> Response {
    let mut trace = Trace::default();
    let clock = clock.map(|Extension(c)| c);
    let response = match handle(&state, clock, &headers, body, &mut trace).await {
        Ok((code, answer)) => (code, Json(answer)).into_response(),
        Err(e) => e.into_response(),
    };
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

async fn handle(
    state: &WebhookState,
    clock: Option<WebhookClock>,
    headers: &HeaderMap,
    body: Result<RawBody, ApiError>,
    trace: &mut Trace,
) -> Result<(StatusCode, Answer), ApiError> {
    // 1. Size: the body limit layer has cut the body off at the limit.
    let body = body.inspect_err(|e| {
        trace.outcome = match e {
            ApiError::TooLarge { .. } => "too_large",
            _ => "unreadable",
        };
    })?;
    let body = body.0;

    // 2. Verify the raw bytes before looking inside them.
    let now = clock.map_or_else(|| chrono::Utc::now().timestamp(), |c| c.now());
    let verified = credentials(headers)
        .and_then(|(signature, token)| {
            verify(
                signature,
                token,
                &body,
                state.tokens.as_slice(),
                now,
                state.max_skew,
            )
        })
        .map_err(|e| {
            trace.outcome = "unauthorized";
            trace.detail = Some(e.to_string());
            ApiError::Webhook(e)
        })?;
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
    let event = Event::parse(&body).map_err(|e| {
        trace.event = event_name(&body);
        trace.outcome = "invalid";
        trace.detail = Some(e.to_string());
        ApiError::from(e)
    })?;
    match event {
        Event::Ping => {
            trace.event = Some("ping".into());
            trace.outcome = "pong";
            Ok((
                StatusCode::OK,
                Answer::Ping {
                    event: "ping",
                    status: "ok",
                },
            ))
        }
        Event::Other(name) => {
            trace.outcome = "ignored";
            trace.event = Some(name.clone());
            Ok((
                StatusCode::ACCEPTED,
                Answer::Ignored {
                    ignored: name,
                    message: "kitebridge acts on ping and build.* events only",
                },
            ))
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

/// The `X-Buildkite-Signature` and `X-Buildkite-Token` values. A value that is not visible
/// ASCII is refused here (it cannot be a token Buildkite sent).
fn credentials(headers: &HeaderMap) -> Result<(Option<&str>, Option<&str>), VerifyError> {
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

async fn build_event(
    state: &WebhookState,
    payload: &WebhookPayload,
    trace: &mut Trace,
) -> Result<(StatusCode, Answer), ApiError> {
    let done = state.delivery.build_event(payload).await;
    let build = &payload.build;
    let mut answer = BuildAnswer {
        event: payload.event.clone(),
        build: build.id.clone(),
        number: build.number,
        pipeline: payload.pipeline.slug.clone(),
        status: "",
        state: None,
        reason: None,
        message: None,
    };
    // The answer says in words what failed; the internal text (store and HTTP errors) goes to
    // the log line only.
    fn retry(
        trace: &mut Trace,
        outcome: &'static str,
        error: &'static str,
        message: &'static str,
        detail: String,
    ) -> ApiError {
        trace.outcome = outcome;
        trace.detail = Some(detail.clone());
        ApiError::Unavailable {
            error,
            message,
            detail,
        }
    }
    let code = match done.status {
        StatusStep::StoreFailed(e) => {
            return Err(retry(
                trace,
                "store_failed",
                "unavailable",
                "the status could not be recorded: the store is unavailable; retry the delivery",
                e,
            ));
        }
        StatusStep::ApiUnknown(e) => {
            return Err(retry(
                trace,
                "bitbucket_unknown",
                "bitbucket_unavailable",
                "Bitbucket could not be asked which build-status API it has (set BITBUCKET_API \
                 to skip the question); retry the delivery (the next poll cycle reports this \
                 build in any case)",
                e,
            ));
        }
        StatusStep::Skipped(reason) => {
            answer.status = "skipped";
            trace.detail = Some(reason.clone());
            answer.reason = Some(reason);
            StatusCode::OK
        }
        StatusStep::Reported { outcome, state } => {
            answer.state = Some(state);
            let (code, word) = match outcome {
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
                    answer.message = Some(
                        "Bitbucket did not take the status now; it is kept and delivered by a \
                         later retry or poll cycle",
                    );
                    (StatusCode::ACCEPTED, "deferred")
                }
            };
            answer.status = word;
            code
        }
    };
    trace.outcome = answer.status;
    if let Err(e) = done.observed {
        return Err(retry(
            trace,
            "observer_failed",
            "unavailable",
            "the build could not be handed to release tracking or trigger rules; retry the \
             delivery",
            e,
        ));
    }
    Ok((code, Answer::Build(answer)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &[u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_bytes(v).unwrap());
        }
        h
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
