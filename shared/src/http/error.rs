//! [`ApiError`]: every error answer of every route, written once. Handlers return
//! `Result<_, ApiError>`; the domain errors convert into it with `?`, and [`IntoResponse`] turns
//! it into `{"error": <kind>, "message": <text>[, "field": <input>]}` with the right status.
//!
//! Internal details (store and HTTP errors) are logged here and never put in an answer; no
//! answer quotes a token or a request body.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::buildkite::model::PayloadError;
use crate::buildkite::webhook::VerifyError;
use crate::release::ReleaseError;
use crate::rules::RuleError;
use crate::rules::catalog::CatalogError;

/// Why a request was not answered with success.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No route has this path.
    #[error("no such route")]
    NoRoute,
    /// The route exists, but not for this method; `allow` is the method it takes.
    #[error("{message}")]
    MethodNotAllowed {
        allow: &'static str,
        message: &'static str,
    },
    /// The API's bearer token is missing or wrong.
    #[error("send `Authorization: Bearer <token>` with the API token (KITEBRIDGE_API_TOKEN)")]
    Unauthorized,
    /// A webhook's credential (token or signature) does not check out.
    #[error(transparent)]
    Webhook(VerifyError),
    /// The body is larger than the route accepts.
    #[error("the body is larger than the {limit} bytes accepted")]
    TooLarge { limit: usize },
    /// The body could not be read (the client went away mid-way).
    #[error("the body could not be read")]
    Unreadable,
    /// The request took longer than `KITEBRIDGE_SERVER_REQUEST_TIMEOUT`.
    #[error("the request took too long to answer; retry")]
    Timeout,
    /// One input is wrong: a JSON field, a query parameter or a header, named in `field`.
    #[error("{message}")]
    Invalid {
        status: StatusCode,
        error: &'static str,
        field: Option<String>,
        message: String,
    },
    /// A webhook body that is not a delivery kitebridge can read.
    #[error(transparent)]
    Payload(#[from] PayloadError),
    /// Something kitebridge depends on failed; the caller should retry. `message` is for the
    /// caller; `detail` (the internal error) only goes to the log.
    #[error("{message}")]
    Unavailable {
        error: &'static str,
        message: &'static str,
        detail: String,
    },
    /// A request with this `Idempotency-Key` is still being processed.
    #[error("a request with this Idempotency-Key is still being processed; retry shortly")]
    IdempotencyInFlight,
    #[error(transparent)]
    Release(#[from] ReleaseError),
    #[error(transparent)]
    Rules(#[from] CatalogError),
}

/// A store failure outside a domain operation (idempotency keys, the operator view) answers as
/// the releases API answers one: 503, or 409 for lost contention; the detail only to the log.
impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError::Release(e.into())
    }
}

/// The JSON body of every error answer.
#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
    /// A rule that does not validate: its name and what kind of error it has.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    rule: Option<RuleAnswer<'a>>,
}

#[derive(Serialize)]
struct RuleAnswer<'a> {
    rule: &'a str,
    kind: crate::rules::RuleErrorKind,
}

impl ApiError {
    /// A 400 about one input: `{"error": "invalid_request", "field": field, "message":
    /// "<field>: <problem>"}`, the shape of the releases API's own field errors.
    pub fn invalid(field: impl Into<String>, problem: impl std::fmt::Display) -> ApiError {
        let field = field.into();
        ApiError::Invalid {
            status: StatusCode::BAD_REQUEST,
            error: "invalid_request",
            message: format!("{field}: {problem}"),
            field: Some(field),
        }
    }

    /// The answer's status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::NoRoute => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Webhook(e) if e.is_unauthorized() => StatusCode::UNAUTHORIZED,
            ApiError::Webhook(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unreadable | ApiError::Payload(_) => StatusCode::BAD_REQUEST,
            ApiError::Timeout | ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Invalid { status, .. } => *status,
            ApiError::IdempotencyInFlight => StatusCode::CONFLICT,
            ApiError::Release(e) => {
                StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
            }
            ApiError::Rules(e) => match e {
                CatalogError::InvalidName(_) => StatusCode::BAD_REQUEST,
                CatalogError::NotFound(_) => StatusCode::NOT_FOUND,
                CatalogError::Configured { .. } => StatusCode::CONFLICT,
                CatalogError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
                CatalogError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
            },
        }
    }

    /// The answer's `error`: a short machine word.
    pub fn kind(&self) -> &'static str {
        match self {
            ApiError::NoRoute => "not_found",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::Unauthorized => "unauthorized",
            ApiError::Webhook(e) if e.is_unauthorized() => "unauthorized",
            ApiError::Webhook(_) => "misconfigured",
            ApiError::TooLarge { .. } => "payload_too_large",
            ApiError::Unreadable => "bad_request",
            ApiError::Timeout => "timeout",
            ApiError::Invalid { error, .. } | ApiError::Unavailable { error, .. } => error,
            ApiError::Payload(_) => "invalid_payload",
            ApiError::IdempotencyInFlight => "idempotency_in_flight",
            ApiError::Release(e) => e.kind(),
            ApiError::Rules(e) => match e {
                CatalogError::InvalidName(_) => "invalid_name",
                CatalogError::NotFound(_) => "not_found",
                CatalogError::Configured { .. } => "configured_rule",
                CatalogError::Invalid(_) => "invalid_rule",
                CatalogError::Store(_) => "store_unavailable",
            },
        }
    }

    /// The answer's `message`: what the caller can act on, without internal details.
    pub fn message(&self) -> String {
        match self {
            // Only `NoTokens`: start-up refuses that configuration, so this is unreachable in a
            // deployed function; say whose fault it is all the same.
            ApiError::Webhook(e) if !e.is_unauthorized() => {
                "kitebridge has no webhook token configured (BUILDKITE_WEBHOOK_TOKEN)".into()
            }
            ApiError::Release(e) => e.message(),
            ApiError::Rules(CatalogError::Store(_)) => "the store is unavailable; try again".into(),
            other => other.to_string(),
        }
    }

    /// The input the answer is about, when it is about one.
    pub fn field(&self) -> Option<&str> {
        match self {
            ApiError::Invalid { field, .. } => field.as_deref(),
            ApiError::Release(
                ReleaseError::Invalid { field, .. } | ReleaseError::Unprocessable { field, .. },
            ) => Some(field),
            ApiError::Payload(PayloadError::Missing(field))
            | ApiError::Payload(PayloadError::Invalid { field, .. }) => Some(field),
            _ => None,
        }
    }

    fn rule(&self) -> Option<&RuleError> {
        match self {
            ApiError::Rules(CatalogError::Invalid(e)) => Some(e),
            _ => None,
        }
    }

    /// Logs what the caller is not told: failures of kitebridge or what it depends on.
    fn log(&self) {
        match self {
            ApiError::Release(e) => {
                let status = self.status();
                if status.is_server_error() {
                    tracing::error!(error = %e, "releases API request failed");
                } else if matches!(e, ReleaseError::BuildkiteRefused(_))
                    || status == StatusCode::BAD_GATEWAY
                {
                    tracing::warn!(error = %e, "releases API: Buildkite did not create the build");
                }
            }
            ApiError::Rules(CatalogError::Store(e)) => {
                tracing::warn!(error = %e, "rules API: store failed");
            }
            ApiError::Timeout => tracing::warn!("request timed out"),
            _ => {}
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.log();
        let status = self.status();
        let body = ErrorBody {
            error: self.kind(),
            message: self.message(),
            field: self.field(),
            rule: self.rule().map(|e| RuleAnswer {
                rule: &e.rule,
                kind: e.kind,
            }),
        };
        let mut resp = (status, Json(body)).into_response();
        match &self {
            ApiError::Unauthorized => {
                resp.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::MethodNotAllowed { allow, .. } => {
                resp.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            _ => {}
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    async fn body(e: ApiError) -> (StatusCode, Value) {
        let resp = e.into_response();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn webhook_payload_errors_name_the_field() {
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
            let message = e.to_string();
            let (status, v) = body(ApiError::from(e)).await;
            assert_eq!(status, StatusCode::BAD_REQUEST);
            assert_eq!(v["error"], "invalid_payload");
            assert_eq!(v["message"], message);
            assert_eq!(v["field"].as_str(), field);
        }
    }

    #[tokio::test]
    async fn internal_details_stay_in_the_log() {
        let (status, v) = body(ApiError::Release(ReleaseError::Store(
            crate::store::StoreError::Unavailable("dynamodb: secret endpoint".into()),
        )))
        .await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(v["error"], "store_unavailable");
        assert!(!v.to_string().contains("secret endpoint"), "{v}");
        let (status, v) = body(ApiError::Unavailable {
            error: "unavailable",
            message: "retry",
            detail: "connection refused to 10.0.0.1".into(),
        })
        .await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(!v.to_string().contains("10.0.0.1"), "{v}");
    }

    #[tokio::test]
    async fn unauthorized_asks_for_a_bearer_token() {
        let resp = ApiError::Unauthorized.into_response();
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(resp.headers()[header::WWW_AUTHENTICATE], "Bearer");
    }
}
