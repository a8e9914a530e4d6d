//! The APIs' authentication, one extractor for every API route (releases and rules): a handler
//! that takes [`Authorized`] runs only for a caller that may use the API.

use axum::extract::{FromRef, FromRequestParts};
use axum::http::header;
use axum::http::request::Parts;

use super::ApiError;
use crate::config::{ApiAuth, Config, Secret};

/// How API callers are checked, decided once from configuration.
#[derive(Clone)]
pub enum Auth {
    /// `KITEBRIDGE_API_AUTH=iam`: API Gateway checked the caller before the request got here.
    Iam,
    /// `Authorization: Bearer <KITEBRIDGE_API_TOKEN>`.
    Bearer(Secret),
    /// Token authentication without a token (a role that serves no API): every call is
    /// refused.
    Closed,
}

impl Auth {
    pub fn from_config(config: &Config) -> Auth {
        match (config.api_auth, &config.api_token) {
            (ApiAuth::Iam, _) => Auth::Iam,
            (ApiAuth::Token, Some(token)) => Auth::Bearer(token.clone()),
            (ApiAuth::Token, None) => Auth::Closed,
        }
    }

    /// Whether a request with these headers may use the API.
    pub fn allows(&self, headers: &axum::http::HeaderMap) -> bool {
        let expected = match self {
            Auth::Iam => return true,
            Auth::Bearer(token) => token,
            Auth::Closed => return false,
        };
        headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .is_some_and(|presented| expected.matches(presented))
    }
}

/// Proof that the caller may use the API; refused with 401 (`WWW-Authenticate: Bearer`).
pub struct Authorized;

impl<S> FromRequestParts<S> for Authorized
where
    Auth: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        if Auth::from_ref(state).allows(&parts.headers) {
            Ok(Authorized)
        } else {
            Err(ApiError::Unauthorized)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{HeaderMap, HeaderValue};

    fn with(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn bearer_tokens_compare_whole() {
        let auth = Auth::Bearer(Secret::new("s3cret"));
        assert!(auth.allows(&with("Bearer s3cret")));
        assert!(auth.allows(&with("bearer s3cret")));
        assert!(!auth.allows(&with("Bearer s3cre")));
        assert!(!auth.allows(&with("Bearer s3cret1")));
        assert!(!auth.allows(&with("Basic s3cret")));
        assert!(!auth.allows(&with("Bearer ")));
        assert!(!auth.allows(&HeaderMap::new()));
        assert!(!Auth::Closed.allows(&with("Bearer s3cret")));
        assert!(Auth::Iam.allows(&HeaderMap::new()));
    }
}
