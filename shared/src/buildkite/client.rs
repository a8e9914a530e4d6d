//! Buildkite REST API v2 client: list builds (every `Link: rel="next"` page), create builds.
//!
//! Politeness: `RateLimit-Remaining`/`RateLimit-Reset` (organization and user scopes) are read on
//! every answer; when a limit is spent, the next request waits for the window to turn instead of
//! collecting a 429. A 429 that happens anyway is retried after `RateLimit-Reset`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Timelike, Utc};
use futures::stream::{self, StreamExt, TryStreamExt};
use reqwest::header::HeaderMap;
use reqwest::{Client, Response};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::sync::Mutex;
use url::Url;

use crate::config::{Secret, join_url};
use crate::net::{self, Idempotence, RetryPolicy, SendError};

/// Buildkite's page size limit.
pub const MAX_PER_PAGE: u32 = 100;
/// Most pages one listing follows (200,000 builds): a `Link` that names more is refused rather
/// than followed (or turned into that many URLs up front).
pub const MAX_PAGES: u32 = 2_000;

/// The body of `POST .../builds`: the build kitebridge asks for (a trigger rule's target, a
/// release candidate's build, a deployment's). Kept as it is in the store while a firing waits
/// (see [`crate::store::PendingFiring`]), so its serialized form is the JSON Buildkite receives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateBuild {
    pub commit: String,
    pub branch: String,
    pub message: String,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Ties the build back to what created it (looked up after a lost answer).
    #[serde(default)]
    pub meta_data: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildkiteError {
    #[error("Buildkite API: {0}")]
    Send(#[from] SendError),
    #[error("Buildkite API: unexpected answer: {0}")]
    Decode(String),
}

impl BuildkiteError {
    pub fn status(&self) -> Option<u16> {
        match self {
            BuildkiteError::Send(SendError::Status { status, .. }) => Some(*status),
            _ => None,
        }
    }
}

/// Which builds to list. Times are sent as RFC 3339 in UTC.
#[derive(Debug, Clone, Default)]
pub struct BuildFilter {
    pub created_from: Option<DateTime<Utc>>,
    pub created_to: Option<DateTime<Utc>>,
    pub finished_from: Option<DateTime<Utc>>,
}

impl BuildFilter {
    /// Times go out in whole seconds (the documented form): lower bounds rounded down and the
    /// exclusive upper bound rounded up, so truncation can only widen the window.
    fn query(&self) -> Vec<(&'static str, String)> {
        let t = |d: &DateTime<Utc>| d.to_rfc3339_opts(SecondsFormat::Secs, true);
        let ceil = |d: &DateTime<Utc>| {
            let whole = d.with_nanosecond(0).unwrap_or(*d);
            if whole < *d {
                whole + chrono::Duration::seconds(1)
            } else {
                whole
            }
        };
        let mut q = Vec::new();
        if let Some(d) = &self.created_from {
            q.push(("created_from", t(d)));
        }
        if let Some(d) = &self.created_to {
            q.push(("created_to", t(&ceil(d))));
        }
        if let Some(d) = &self.finished_from {
            q.push(("finished_from", t(d)));
        }
        q
    }

    /// A listing whose result set cannot grow while it is paged (bounded by `created_to`, and
    /// not by `finished_from`, which admits builds that finish meanwhile), so its pages may be
    /// fetched in parallel without skipping anything.
    fn is_stable(&self) -> bool {
        self.created_to.is_some() && self.finished_from.is_none()
    }
}

/// Builds of one listing, in the order Buildkite gave them (newest created first), and how many
/// pages it took.
#[derive(Debug)]
pub struct Listing<T> {
    pub builds: Vec<T>,
    pub pages: u32,
}

#[derive(Clone)]
pub struct BuildkiteClient {
    http: Client,
    base: Url,
    token: Secret,
    policy: RetryPolicy,
    gate: Arc<Mutex<Option<Instant>>>,
    page_concurrency: usize,
}

impl std::fmt::Debug for BuildkiteClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuildkiteClient")
            .field("base", &self.base.as_str())
            .finish()
    }
}

impl BuildkiteClient {
    pub fn new(http: Client, base: Url, token: Secret) -> BuildkiteClient {
        BuildkiteClient {
            http,
            base,
            token,
            policy: RetryPolicy {
                // Buildkite's own client waits up to 120 s for a rate-limit window.
                max_server_wait: Duration::from_secs(120),
                ..RetryPolicy::default()
            },
            gate: Arc::new(Mutex::new(None)),
            page_concurrency: 4,
        }
    }

    pub fn with_retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Lists every build of `org` matching `filter`, following `Link: rel="next"` to the end
    /// (`per_page=100`, `exclude_jobs=true`). A stable listing (see [`BuildFilter`]) fetches its
    /// remaining pages in parallel once the first page names the last one.
    pub async fn list_builds<T: DeserializeOwned + Send>(
        &self,
        org: &str,
        filter: &BuildFilter,
    ) -> Result<Listing<T>, BuildkiteError> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<T>>(4);
        let collect = async move {
            let mut builds = Vec::new();
            while let Some(page) = rx.recv().await {
                builds.extend(page);
            }
            builds
        };
        let (pages, builds) = tokio::join!(self.send_pages(org, filter, tx), collect);
        Ok(Listing {
            builds,
            pages: pages?.pages,
        })
    }

    /// Like [`BuildkiteClient::list_builds`], but hands each page to `pages` as it arrives (in
    /// order), so a caller can work on the first pages while later ones load and never holds
    /// every build at once. Returns how many pages were read and Buildkite's clock at the first
    /// answer. If the receiver is dropped, the listing stops early without error.
    pub async fn send_pages<T: DeserializeOwned + Send>(
        &self,
        org: &str,
        filter: &BuildFilter,
        pages: tokio::sync::mpsc::Sender<Vec<T>>,
    ) -> Result<PagesRead, BuildkiteError> {
        let mut first = Url::parse(&join_url(
            &self.base,
            &format!("/v2/organizations/{}/builds", enc(org)),
        ))
        .map_err(|e| BuildkiteError::Decode(format!("bad URL: {e}")))?;
        {
            let mut q = first.query_pairs_mut();
            for (k, v) in filter.query() {
                q.append_pair(k, &v);
            }
            q.append_pair("per_page", &MAX_PER_PAGE.to_string());
            q.append_pair("exclude_jobs", "true");
        }
        let (builds, links, server_date) = self.page::<T>(first.as_str()).await?;
        let mut count = 1;
        let read = |pages| PagesRead { pages, server_date };
        if pages.send(builds).await.is_err() {
            return Ok(read(count));
        }

        if filter.is_stable()
            && let Some(last) = links
                .last
                .as_deref()
                .and_then(|l| page_urls(l, links.next.as_deref()))
        {
            let mut rest = stream::iter(last)
                .map(|url| async move { self.page::<T>(&url).await.map(|(b, _, _)| b) })
                .buffered(self.page_concurrency);
            while let Some(page) = rest.try_next().await? {
                count += 1;
                if pages.send(page).await.is_err() {
                    break;
                }
            }
            return Ok(read(count));
        }

        let mut next = links.next;
        while let Some(url) = next {
            if count >= MAX_PAGES {
                return Err(BuildkiteError::Decode(format!(
                    "the listing has more than {MAX_PAGES} pages; not followed further"
                )));
            }
            let (more, links, _) = self.page::<T>(&url).await?;
            count += 1;
            if pages.send(more).await.is_err() {
                break;
            }
            next = links.next;
        }
        Ok(read(count))
    }

    /// One build, as Buildkite has it now; `None` when there is no such build.
    pub async fn get_build<T: DeserializeOwned>(
        &self,
        org: &str,
        pipeline: &str,
        number: u64,
    ) -> Result<Option<T>, BuildkiteError> {
        let url = join_url(
            &self.base,
            &format!(
                "/v2/organizations/{}/pipelines/{}/builds/{number}",
                enc(org),
                enc(pipeline)
            ),
        );
        self.wait_for_gate().await;
        let resp = net::send(
            || self.http.get(&url).bearer_auth(self.token.expose()),
            &self.policy,
            Idempotence::Idempotent,
        )
        .await;
        let resp = match resp {
            Err(SendError::Status { status: 404, .. }) => return Ok(None),
            other => self.note_limits(other)?,
        };
        resp.json::<T>()
            .await
            .map(Some)
            .map_err(|e| BuildkiteError::Decode(format!("build: {e}")))
    }

    /// A build's annotations (`buildkite-agent annotate`), newest first, following `Link:
    /// rel="next"` for at most `max_pages` pages of 100.
    pub async fn annotations(
        &self,
        org: &str,
        pipeline: &str,
        number: u64,
        max_pages: usize,
    ) -> Result<Vec<serde_json::Value>, BuildkiteError> {
        let mut next = Some(join_url(
            &self.base,
            &format!(
                "/v2/organizations/{}/pipelines/{}/builds/{number}/annotations?per_page={MAX_PER_PAGE}",
                enc(org),
                enc(pipeline)
            ),
        ));
        let mut out = Vec::new();
        let mut pages = 0;
        while let Some(url) = next.take() {
            let (items, links, _) = self.page::<serde_json::Value>(&url).await?;
            out.extend(items);
            pages += 1;
            if pages < max_pages {
                next = links.next;
            }
        }
        Ok(out)
    }

    /// Creates a build: `POST /v2/organizations/{org}/pipelines/{pipeline}/builds`. Not retried
    /// once Buildkite may have acted on it (a retry could create a second build).
    pub async fn create_build<T: DeserializeOwned>(
        &self,
        org: &str,
        pipeline: &str,
        body: &CreateBuild,
    ) -> Result<T, BuildkiteError> {
        let url = join_url(
            &self.base,
            &format!(
                "/v2/organizations/{}/pipelines/{}/builds",
                enc(org),
                enc(pipeline)
            ),
        );
        self.wait_for_gate().await;
        let resp = net::send(
            || {
                self.http
                    .post(&url)
                    .bearer_auth(self.token.expose())
                    .json(body)
            },
            &self.policy,
            Idempotence::NotIdempotent,
        )
        .await;
        let resp = self.note_limits(resp)?;
        resp.json::<T>()
            .await
            .map_err(|e| BuildkiteError::Decode(e.to_string()))
    }

    async fn page<T: DeserializeOwned>(
        &self,
        url: &str,
    ) -> Result<(Vec<T>, Links, Option<DateTime<Utc>>), BuildkiteError> {
        // The token goes only to the configured API: a `Link` elsewhere is not followed.
        let target =
            Url::parse(url).map_err(|e| BuildkiteError::Decode(format!("bad page URL: {e}")))?;
        if target.origin() != self.base.origin() {
            return Err(BuildkiteError::Decode(format!(
                "a Link header points at {}, not at the configured Buildkite API; not followed",
                target.host_str().unwrap_or("another host")
            )));
        }
        self.wait_for_gate().await;
        let resp = net::send(
            || self.http.get(url).bearer_auth(self.token.expose()),
            &self.policy,
            Idempotence::Idempotent,
        )
        .await;
        let resp = self.note_limits(resp)?;
        let links = Links::parse(resp.headers());
        let server_date = resp
            .headers()
            .get(reqwest::header::DATE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| DateTime::parse_from_rfc2822(v).ok())
            .map(|d| d.with_timezone(&Utc));
        let builds = resp
            .json::<Vec<T>>()
            .await
            .map_err(|e| BuildkiteError::Decode(format!("build list: {e}")))?;
        Ok((builds, links, server_date))
    }

    async fn wait_for_gate(&self) {
        // A poisoned lock only means a panic elsewhere; the instant inside is still valid.
        let until = *self.gate.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(until) = until {
            let now = Instant::now();
            if until > now {
                tracing::info!(
                    wait_ms = (until - now).as_millis() as u64,
                    "Buildkite rate limit spent; waiting"
                );
                tokio::time::sleep_until(until.into()).await;
            }
        }
    }

    fn note_limits(&self, resp: Result<Response, SendError>) -> Result<Response, BuildkiteError> {
        let resp = resp?;
        if let Some(wait) = spent_limit_wait(resp.headers()) {
            let until = Instant::now() + wait;
            let mut gate = self.gate.lock().unwrap_or_else(|p| p.into_inner());
            *gate = Some(gate.map_or(until, |g| g.max(until)));
        }
        Ok(resp)
    }
}

/// When a limit (organization or user) has no requests left, how long until it resets.
fn spent_limit_wait(headers: &HeaderMap) -> Option<Duration> {
    let num = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    [
        ("ratelimit-remaining", "ratelimit-reset"),
        ("ratelimit-user-remaining", "ratelimit-user-reset"),
    ]
    .iter()
    .filter_map(|(remaining, reset)| match (num(remaining), num(reset)) {
        (Some(0), Some(reset)) => Some(Duration::from_secs(reset) + Duration::from_millis(250)),
        _ => None,
    })
    .max()
}

fn enc(segment: &str) -> String {
    url::form_urlencoded::byte_serialize(segment.as_bytes()).collect()
}

/// What [`BuildkiteClient::send_pages`] read.
#[derive(Debug, Clone, Copy)]
pub struct PagesRead {
    pub pages: u32,
    /// Buildkite's `Date` at the first page, if it sent one.
    pub server_date: Option<DateTime<Utc>>,
}

#[derive(Debug, Default, PartialEq)]
struct Links {
    next: Option<String>,
    last: Option<String>,
}

impl Links {
    /// Parses RFC 8288 `Link` headers: `<url>; rel="next", <url>; rel="last"`.
    fn parse(headers: &HeaderMap) -> Links {
        let mut links = Links::default();
        for value in headers
            .get_all("link")
            .iter()
            .filter_map(|v| v.to_str().ok())
        {
            for part in value.split(',') {
                let mut pieces = part.split(';');
                let Some(target) = pieces.next().map(str::trim) else {
                    continue;
                };
                let Some(url) = target.strip_prefix('<').and_then(|t| t.strip_suffix('>')) else {
                    continue;
                };
                for param in pieces {
                    let param = param.trim();
                    let Some(rel) = param.strip_prefix("rel=") else {
                        continue;
                    };
                    for r in rel.trim_matches('"').split_whitespace() {
                        match r {
                            "next" => links.next = Some(url.to_string()),
                            "last" => links.last = Some(url.to_string()),
                            _ => {}
                        }
                    }
                }
            }
        }
        links
    }
}

/// The URLs of pages `next..=last`, made from the `last` link by changing its `page` parameter.
fn page_urls(last: &str, next: Option<&str>) -> Option<Vec<String>> {
    let page_of = |u: &Url| {
        u.query_pairs()
            .find(|(k, _)| k == "page")
            .and_then(|(_, v)| v.parse::<u32>().ok())
    };
    let last_url = Url::parse(last).ok()?;
    let last_page = page_of(&last_url)?;
    let next_page = match next {
        Some(n) => page_of(&Url::parse(n).ok()?)?,
        None => return Some(Vec::new()),
    };
    if last_page.saturating_sub(next_page) >= MAX_PAGES {
        // Not built up front; followed one by one, up to the bound.
        return None;
    }
    let urls = (next_page..=last_page)
        .map(|p| {
            let mut u = last_url.clone();
            let pairs: Vec<(String, String)> = u
                .query_pairs()
                .map(|(k, v)| {
                    if k == "page" {
                        (k.into_owned(), p.to_string())
                    } else {
                        (k.into_owned(), v.into_owned())
                    }
                })
                .collect();
            u.query_pairs_mut().clear().extend_pairs(pairs);
            u.to_string()
        })
        .collect();
    Some(urls)
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn parses_link_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            "link",
            HeaderValue::from_static(
                "<https://api.buildkite.com/v2/organizations/acme/builds?page=2&per_page=100>; rel=\"next\", \
                 <https://api.buildkite.com/v2/organizations/acme/builds?page=6&per_page=100>; rel=\"last\"",
            ),
        );
        let l = Links::parse(&h);
        assert_eq!(
            l.next.as_deref(),
            Some("https://api.buildkite.com/v2/organizations/acme/builds?page=2&per_page=100")
        );
        assert!(l.last.unwrap().contains("page=6"));
        assert_eq!(Links::parse(&HeaderMap::new()), Links::default());
    }

    #[test]
    fn page_urls_cover_next_to_last() {
        let urls = page_urls(
            "https://x/v2/organizations/acme/builds?created_from=a&page=4&per_page=100",
            Some("https://x/v2/organizations/acme/builds?created_from=a&page=2&per_page=100"),
        )
        .unwrap();
        assert_eq!(urls.len(), 3);
        assert!(urls[0].contains("page=2") && urls[2].contains("page=4"));
        assert!(
            urls.iter()
                .all(|u| u.contains("created_from=a") && u.contains("per_page=100"))
        );
    }

    #[test]
    fn spent_limits_ask_for_a_wait() {
        let mut h = HeaderMap::new();
        h.insert("ratelimit-remaining", HeaderValue::from_static("0"));
        h.insert("ratelimit-reset", HeaderValue::from_static("3"));
        assert_eq!(spent_limit_wait(&h), Some(Duration::from_millis(3250)));
        h.insert("ratelimit-remaining", HeaderValue::from_static("5"));
        assert_eq!(spent_limit_wait(&h), None);
    }

    #[test]
    fn filter_stability() {
        let now = Utc::now();
        let created = BuildFilter {
            created_from: Some(now),
            created_to: Some(now),
            finished_from: None,
        };
        assert!(created.is_stable());
        let finished = BuildFilter {
            created_from: None,
            created_to: Some(now),
            finished_from: Some(now),
        };
        assert!(!finished.is_stable());
    }
}
