//! Why a releases request failed, with the HTTP status and `error` kind the API answers with,
//! and how a Buildkite failure becomes one.

use serde_json::Value;

use crate::buildkite::client::BuildkiteError;
use crate::net::SendError;
use crate::store::StoreError;

/// Why a releases request failed, as the API reports it.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    /// 400: a field of the request is wrong.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// 422: each field has its form, but together, or against the project they are for, they
    /// do not hold (a `requires` naming no environment, a version of the other scheme). The
    /// spec can state forms, not these, so they answer 422 rather than 400.
    #[error("{field}: {message}")]
    Unprocessable { field: String, message: String },
    /// 404: what the request names does not exist.
    #[error("{message}")]
    NotFound { kind: &'static str, message: String },
    /// 409: the request conflicts with the current state.
    #[error("{message}")]
    Conflict { kind: &'static str, message: String },
    /// 422: Buildkite refused to create the build (its message).
    #[error("Buildkite refused to create the build: {0}")]
    BuildkiteRefused(String),
    /// 502: Buildkite could not be reached, or answered with a server error.
    #[error("Buildkite is unavailable: {0}")]
    BuildkiteUnavailable(String),
    /// 422: Bitbucket refused the listing for what it names (no such repository, a commit it
    /// does not have): the project's configuration, not an outage.
    #[error("Bitbucket refused the listing: {0}")]
    BitbucketRefused(String),
    /// 502: Bitbucket could not be reached, failed, or refused kitebridge's credentials.
    #[error("Bitbucket is unavailable: {0}")]
    BitbucketUnavailable(String),
    /// 409 after too many lost compare-and-sets ([`super::service`]'s attempts).
    #[error("too many concurrent changes to the same records; retry")]
    Contention,
    /// 503 (unavailable) or 500.
    #[error("store: {0}")]
    Store(StoreError),
}

impl ReleaseError {
    /// A failed Bitbucket read: a 400 or 404 is Bitbucket saying what was named does not exist
    /// (422); anything else (unreachable, 5xx, 401/403 for kitebridge's credentials, 429) is it
    /// being unavailable to kitebridge (502).
    pub fn from_bitbucket(e: SendError) -> ReleaseError {
        match &e {
            SendError::Status {
                status: 400 | 404, ..
            } => ReleaseError::BitbucketRefused(e.to_string()),
            _ => ReleaseError::BitbucketUnavailable(e.to_string()),
        }
    }
}

impl From<StoreError> for ReleaseError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict => ReleaseError::Contention,
            other => ReleaseError::Store(other),
        }
    }
}

impl ReleaseError {
    pub fn status(&self) -> u16 {
        match self {
            ReleaseError::Invalid { .. } => 400,
            ReleaseError::Unprocessable { .. } => 422,
            ReleaseError::NotFound { .. } => 404,
            ReleaseError::Conflict { .. } | ReleaseError::Contention => 409,
            ReleaseError::BuildkiteRefused(_) | ReleaseError::BitbucketRefused(_) => 422,
            ReleaseError::BuildkiteUnavailable(_) | ReleaseError::BitbucketUnavailable(_) => 502,
            ReleaseError::Store(StoreError::Unavailable(_)) => 503,
            ReleaseError::Store(_) => 500,
        }
    }

    /// The `error` field of the JSON answer.
    pub fn kind(&self) -> &'static str {
        match self {
            ReleaseError::Invalid { .. } | ReleaseError::Unprocessable { .. } => "invalid_request",
            ReleaseError::NotFound { kind, .. } | ReleaseError::Conflict { kind, .. } => kind,
            ReleaseError::BuildkiteRefused(_) => "buildkite_refused",
            ReleaseError::BuildkiteUnavailable(_) => "buildkite_unavailable",
            ReleaseError::BitbucketUnavailable(_) => "bitbucket_unavailable",
            ReleaseError::BitbucketRefused(_) => "bitbucket_refused",
            ReleaseError::Contention => "contention",
            ReleaseError::Store(StoreError::Unavailable(_)) => "store_unavailable",
            ReleaseError::Store(_) => "internal",
        }
    }

    /// The `message` field: internal store details stay in the logs.
    pub fn message(&self) -> String {
        match self {
            ReleaseError::Store(StoreError::Unavailable(_)) => {
                "the store is unavailable; retry later".into()
            }
            ReleaseError::Store(_) => "internal error".into(),
            other => other.to_string(),
        }
    }

    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ReleaseError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }

    pub fn unprocessable(field: impl Into<String>, message: impl Into<String>) -> Self {
        ReleaseError::Unprocessable {
            field: field.into(),
            message: message.into(),
        }
    }

    pub(crate) fn not_found(kind: &'static str, message: impl Into<String>) -> Self {
        ReleaseError::NotFound {
            kind,
            message: message.into(),
        }
    }

    pub(crate) fn conflict(kind: &'static str, message: impl Into<String>) -> Self {
        ReleaseError::Conflict {
            kind,
            message: message.into(),
        }
    }
}

/// A 4xx from Buildkite (other than 408/429) is a refusal whose message is passed on; anything
/// else means Buildkite could not be reached or failed.
pub(super) fn classify_buildkite(e: BuildkiteError) -> ReleaseError {
    match &e {
        BuildkiteError::Send(SendError::Status {
            status, message, ..
        }) if (400..500).contains(status) && *status != 408 && *status != 429 => {
            ReleaseError::BuildkiteRefused(format!("HTTP {status}: {}", buildkite_message(message)))
        }
        _ => ReleaseError::BuildkiteUnavailable(e.to_string()),
    }
}

/// Buildkite's `{"message": ..., "errors": [{"field", "message"}]}` as one line.
fn buildkite_message(body: &str) -> String {
    let Ok(v) = serde_json::from_str::<Value>(body) else {
        return body.to_string();
    };
    let message = v
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("no message")
        .to_string();
    let details: Vec<String> = v
        .get("errors")
        .and_then(Value::as_array)
        .map(|errs| {
            errs.iter()
                .filter_map(|e| match e {
                    Value::String(s) => Some(s.clone()),
                    other => other
                        .get("message")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                })
                .collect()
        })
        .unwrap_or_default();
    if details.is_empty() {
        message
    } else {
        format!("{message} ({})", details.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buildkite_errors_are_classified_and_their_message_passed_on() {
        let status = |status: u16, message: &str| {
            BuildkiteError::Send(SendError::Status {
                status,
                message: message.into(),
                retry_after: None,
            })
        };
        let e = classify_buildkite(status(
            422,
            r#"{"message":"Validation Failed","errors":[{"field":"branch","code":"missing","message":"branch can't be blank"}]}"#,
        ));
        assert_eq!(e.status(), 422);
        assert_eq!(
            e.to_string(),
            "Buildkite refused to create the build: HTTP 422: Validation Failed (branch can't be blank)"
        );
        assert_eq!(
            classify_buildkite(status(404, r#"{"message":"No pipeline found"}"#)).status(),
            422
        );
        assert_eq!(classify_buildkite(status(500, "oops")).status(), 502);
        assert_eq!(classify_buildkite(status(429, "{}")).status(), 502);
        assert_eq!(
            classify_buildkite(BuildkiteError::Send(SendError::Timeout)).status(),
            502
        );
        assert_eq!(
            buildkite_message("<html>bad gateway</html>"),
            "<html>bad gateway</html>"
        );
    }

    #[test]
    fn store_errors_map_to_statuses_without_details() {
        let e = ReleaseError::from(StoreError::Unavailable("dynamodb: secret detail".into()));
        assert_eq!(e.status(), 503);
        assert!(!e.message().contains("secret"));
        let e = ReleaseError::from(StoreError::Conflict);
        assert_eq!((e.status(), e.kind()), (409, "contention"));
        let e = ReleaseError::from(StoreError::Config("x".into()));
        assert_eq!((e.status(), e.message().as_str()), (500, "internal error"));
    }
}
