//! Bitbucket HTTP client: posts prepared status requests, with Basic or Bearer auth, retries,
//! and `BITBUCKET_API=auto` resolved once per process by probing the server.

use std::sync::Arc;

use async_trait::async_trait;
use reqwest::{Client, RequestBuilder, StatusCode};
use tokio::sync::OnceCell;
use url::Url;

use super::repo::bitbucket_host;
use super::request::{ApiKind, StatusRequest, parse_capabilities};
use crate::config::{BitbucketApi, BitbucketAuth, BitbucketConfig, join_url};
use crate::net::{self, Idempotence, RetryPolicy, SendError};
use crate::report::StatusSink;

#[derive(Clone)]
pub struct BitbucketClient {
    http: Client,
    base: Url,
    auth: BitbucketAuth,
    policy: RetryPolicy,
    configured: BitbucketApi,
    resolved: Arc<OnceCell<ApiKind>>,
    version: Arc<OnceCell<Option<(u32, u32)>>>,
}

impl std::fmt::Debug for BitbucketClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BitbucketClient")
            .field("base", &self.base.as_str())
            .field("api", &self.configured)
            .finish()
    }
}

impl BitbucketClient {
    /// `None` when Bitbucket is not configured (URL or credentials missing).
    pub fn new(http: Client, config: &BitbucketConfig) -> Option<BitbucketClient> {
        Some(BitbucketClient {
            http,
            base: config.url.clone()?,
            auth: config.auth.clone()?,
            policy: RetryPolicy::default(),
            configured: config.api,
            resolved: Arc::new(OnceCell::new()),
            version: Arc::new(OnceCell::new()),
        })
    }

    /// The same client (sharing the resolved API) with another retry policy: the webhook path
    /// retries briefly and leaves the rest to the outbox.
    pub fn with_policy(&self, policy: RetryPolicy) -> BitbucketClient {
        BitbucketClient {
            policy,
            ..self.clone()
        }
    }

    pub fn base(&self) -> &Url {
        &self.base
    }

    /// A GET of `url` with the credentials.
    pub(super) fn authed_get(&self, url: &str) -> RequestBuilder {
        self.authed(self.http.get(url))
    }

    pub(super) fn policy(&self) -> &RetryPolicy {
        &self.policy
    }

    fn authed(&self, req: RequestBuilder) -> RequestBuilder {
        match &self.auth {
            BitbucketAuth::Basic { username, password } => {
                req.basic_auth(username, Some(password.expose()))
            }
            BitbucketAuth::Bearer(token) => req.bearer_auth(token.expose()),
        }
    }

    /// The API in use; for `auto`, probes the server the first time.
    pub async fn api(&self) -> Result<ApiKind, SendError> {
        self.resolved
            .get_or_try_init(|| self.detect())
            .await
            .cloned()
    }

    async fn detect(&self) -> Result<ApiKind, SendError> {
        let api = match self.configured {
            BitbucketApi::Legacy => ApiKind::Legacy,
            BitbucketApi::Cloud => ApiKind::Cloud,
            BitbucketApi::Repository => match self.capabilities().await {
                Ok(Some(caps)) => ApiKind::Repository {
                    cancelled: caps.cancelled_status,
                },
                // The user said the repository API exists; without the probe, use only the
                // states every version accepts.
                _ => ApiKind::Repository { cancelled: false },
            },
            BitbucketApi::Auto => {
                let host = bitbucket_host(&self.base).unwrap_or_default();
                if host == "bitbucket.org" {
                    ApiKind::Cloud
                } else {
                    match self.capabilities().await? {
                        Some(caps) => caps.api(),
                        None => ApiKind::Legacy,
                    }
                }
            }
        };
        tracing::info!(api = api.name(), "Bitbucket build-status API selected");
        Ok(api)
    }

    /// `GET /rest/api/latest/build/capabilities`: `None` when the server has no such resource
    /// (older than Data Center 7.4).
    async fn capabilities(&self) -> Result<Option<super::request::Capabilities>, SendError> {
        let url = join_url(&self.base, "/rest/api/latest/build/capabilities");
        match net::send(
            || self.authed(self.http.get(&url)),
            &self.policy,
            Idempotence::Idempotent,
        )
        .await
        {
            Ok(resp) => {
                let json: serde_json::Value = resp
                    .json()
                    .await
                    .map_err(|e| SendError::Other(format!("capabilities: {e}")))?;
                Ok(Some(parse_capabilities(&json)))
            }
            Err(SendError::Status { status, .. }) if status == StatusCode::NOT_FOUND.as_u16() => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// The server's version from `/rest/api/1.0/application-properties` (major, minor), asked
    /// once; `None` when it does not say (Cloud, or something else answering).
    pub async fn server_version(&self) -> Result<Option<(u32, u32)>, SendError> {
        self.version
            .get_or_try_init(|| async {
                let url = join_url(&self.base, "/rest/api/1.0/application-properties");
                let resp = match net::send(
                    || self.authed(self.http.get(&url)),
                    &self.policy,
                    Idempotence::Idempotent,
                )
                .await
                {
                    Ok(r) => r,
                    Err(SendError::Status { status: 404, .. }) => return Ok(None),
                    Err(e) => return Err(e),
                };
                let v: serde_json::Value = resp
                    .json()
                    .await
                    .map_err(|e| SendError::Other(format!("application-properties: {e}")))?;
                let mut parts = v["version"].as_str().unwrap_or_default().split('.');
                let major = parts.next().and_then(|p| p.parse().ok());
                let minor = parts.next().and_then(|p| p.parse().ok());
                Ok(major.zip(minor))
            })
            .await
            .cloned()
    }

    /// `PUT` of a JSON body to `path` (relative to the base URL), once.
    pub async fn put_json(&self, path: &str, body: &serde_json::Value) -> Result<(), SendError> {
        let url = join_url(&self.base, path);
        let once = RetryPolicy {
            attempts: 1,
            ..self.policy
        };
        net::send(
            || self.authed(self.http.put(&url)).json(body),
            &once,
            Idempotence::Idempotent,
        )
        .await
        .map(|_| ())
    }

    /// Posts one prepared status request, once: retries and waits belong to the reporter and
    /// its pacer, which see every answer.
    pub async fn post_request(&self, req: &StatusRequest) -> Result<(), SendError> {
        let url = join_url(&self.base, &req.path);
        let once = RetryPolicy {
            attempts: 1,
            ..self.policy
        };
        net::send(
            || self.authed(self.http.post(&url)).json(&req.body),
            &once,
            Idempotence::Idempotent,
        )
        .await
        .map(|_| ())
    }
}

#[async_trait]
impl StatusSink for BitbucketClient {
    async fn post(&self, request: &StatusRequest) -> Result<(), SendError> {
        self.post_request(request).await
    }
}
