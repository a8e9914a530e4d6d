//! A simulated Bitbucket (Server, Data Center or Cloud): the three build-status APIs here; Data
//! Center deployments, Code Insights, required builds, Cloud commit reports and the changelog
//! sources (commit listings, pull requests for a commit) in the `bitbucket_*.rs` modules beside
//! this file, routed from [`dispatch`] through the same credentials, rate limit and error bodies.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

use crate::common::{
    Harness, Server, base64_decode, harness_controls, lock, query_pairs, read_body, segments,
};

#[path = "bitbucket_commits.rs"]
mod commits;
#[path = "bitbucket_deploy.rs"]
mod deploy;
#[path = "bitbucket_extra.rs"]
mod extra;
#[path = "bitbucket_insights.rs"]
mod insights;
#[path = "bitbucket_required.rs"]
mod required;

pub use commits::{FakeCommit, FakePullRequest, PullRequestState};
pub use deploy::PostedDeployment;
pub use insights::StoredReport;

/// Username of the Basic credential [`FakeBitbucketOptions::default`] accepts.
pub const DEFAULT_BITBUCKET_USER: &str = "kitebridge";
/// Password of the Basic credential [`FakeBitbucketOptions::default`] accepts.
pub const DEFAULT_BITBUCKET_PASSWORD: &str = "kitebridge-password";
/// Token [`FakeBitbucketOptions::default`] accepts as `Authorization: Bearer` (an HTTP access
/// token on Server/DC, an access token on Cloud).
pub const DEFAULT_BITBUCKET_TOKEN: &str = "BBDC-fake-http-access-token";

/// Which Bitbucket product the fake plays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BitbucketFlavour {
    /// Bitbucket Server (e.g. `6.10.0`): only the legacy commit-scoped endpoint
    /// `/rest/build-status/1.0/commits/{commitId}`; no capabilities endpoint (404).
    Server {
        /// Reported by `/rest/api/1.0/application-properties`.
        version: String,
    },
    /// Bitbucket Data Center: the legacy endpoint, and from 7.4 on the repository-scoped
    /// `/rest/api/latest/projects/{projectKey}/repos/{slug}/commits/{commitId}/builds` and
    /// `GET /rest/api/latest/build/capabilities` (older versions: 404 for both).
    DataCenter {
        /// E.g. `8.19.0`.
        version: String,
        /// Whether state `CANCELLED` is accepted and `cancelledStatus` advertised.
        cancelled_status: bool,
    },
    /// Bitbucket Cloud: `/2.0/repositories/{workspace}/{repo_slug}/commit/{commit}/statuses/build`
    /// (the fake's URL is the API root, like `https://api.bitbucket.org`).
    Cloud,
}

impl BitbucketFlavour {
    fn version(&self) -> Option<(u32, u32)> {
        let v = match self {
            Self::Server { version } | Self::DataCenter { version, .. } => version,
            Self::Cloud => return None,
        };
        let mut it = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        Some((it.next().unwrap_or(0), it.next().unwrap_or(0)))
    }

    /// Whether the repository-scoped builds API and the capabilities endpoint exist.
    fn rich(&self) -> bool {
        matches!(self, Self::DataCenter { .. }) && self.version() >= Some((7, 4))
    }

    fn cancelled(&self) -> bool {
        self.rich()
            && matches!(
                self,
                Self::DataCenter {
                    cancelled_status: true,
                    ..
                }
            )
    }
}

/// A credential the fake accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// HTTP Basic with username and password (Cloud: username and app password / API token).
    Basic {
        /// Username.
        username: String,
        /// Password.
        password: String,
    },
    /// A personal access token: usable as the Basic password of its user, or as Bearer.
    PersonalToken {
        /// The user owning the token.
        username: String,
        /// The token.
        token: String,
    },
    /// A project/repository HTTP access token (Server/DC) or access token (Cloud): Bearer only;
    /// sent as a Basic password it is refused, as Bitbucket does.
    AccessToken(String),
}

/// How the fake counts a field's length against Bitbucket Server/DC's limits (255, url 450).
///
/// Bitbucket Server/DC is Java: its bean validation counts `String.length()`, i.e. UTF-16 code
/// units, so a character outside the Basic Multilingual Plane (most emoji) counts twice. That is
/// the default here, and a client that cuts text to 255 Unicode scalar values can still be
/// refused. (Not confirmed against a running Bitbucket; `Chars` is the lenient alternative.)
/// Cloud's 40-character `key` limit is always counted in Unicode scalar values (Python).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LengthUnit {
    /// UTF-16 code units (Java `String.length()`), the default.
    Utf16,
    /// Unicode scalar values (Rust `chars().count()`).
    Chars,
}

impl LengthUnit {
    fn len(self, s: &str) -> usize {
        match self {
            Self::Utf16 => s.encode_utf16().count(),
            Self::Chars => s.chars().count(),
        }
    }
}

/// Data Center's optional rate limit: a token bucket per user.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenBucket {
    /// Requests a user may make in a burst (Bitbucket default 60).
    pub size: u32,
    /// Tokens added per second (Bitbucket default 5).
    pub refill_per_sec: f64,
}

/// How a [`FakeBitbucket`] behaves.
#[derive(Debug, Clone)]
pub struct FakeBitbucketOptions {
    /// Which product and version to play.
    pub flavour: BitbucketFlavour,
    /// Credentials accepted; anything else (or nothing) gets 401.
    pub credentials: Vec<Credential>,
    /// Rate limit per user, if on (off by default, as in Data Center).
    pub rate_limit: Option<TokenBucket>,
    /// How Server/DC field lengths are counted (default [`LengthUnit::Utf16`]).
    pub length_unit: LengthUnit,
    /// Latency added before every answer (can be changed later with `set_latency`).
    pub latency: Duration,
    /// How long a [`Fault::Hang`](crate::Fault::Hang) lasts (default 600 s).
    pub hang_for: Duration,
    /// Who is a repository admin (may DELETE deployments, and reports or annotations they did
    /// not create): usernames, or access tokens as given in `credentials`. `None` (the
    /// default): every accepted credential is.
    pub admins: Option<Vec<String>>,
    /// Data Center 7.16+: start with deployments switched off, as with the property
    /// `plugin.deployment.capability.disabled` (404 for the deployment endpoints, no
    /// `deployment` in `/rest/capabilities`). Default false; see
    /// [`FakeBitbucket::set_deployments_enabled`].
    pub deployments_disabled: bool,
    /// Data Center paged listings (commits, pull requests for a commit, insight reports):
    /// the hard cap `limit` is clamped to (default 100, as `page.max.commits`).
    pub max_page_limit: usize,
    /// Annotations a report may hold (Code Insights and Cloud; default 1000).
    pub max_annotations_per_report: usize,
    /// Cloud `GET .../commit/{commit}/pullrequests`: how many times each commit is answered 202
    /// (still indexing) before its pull requests are served (default 1).
    pub cloud_pr_index_polls: u32,
}

impl Default for FakeBitbucketOptions {
    fn default() -> Self {
        Self {
            flavour: BitbucketFlavour::DataCenter {
                version: "8.19.0".to_owned(),
                cancelled_status: true,
            },
            credentials: vec![
                Credential::Basic {
                    username: DEFAULT_BITBUCKET_USER.to_owned(),
                    password: DEFAULT_BITBUCKET_PASSWORD.to_owned(),
                },
                Credential::AccessToken(DEFAULT_BITBUCKET_TOKEN.to_owned()),
            ],
            rate_limit: None,
            length_unit: LengthUnit::Utf16,
            latency: Duration::ZERO,
            hang_for: Duration::from_secs(600),
            admins: None,
            deployments_disabled: false,
            max_page_limit: 100,
            max_annotations_per_report: 1000,
            cloud_pr_index_polls: 1,
        }
    }
}

impl FakeBitbucketOptions {
    /// The defaults with another flavour.
    pub fn with_flavour(flavour: BitbucketFlavour) -> Self {
        Self {
            flavour,
            ..Self::default()
        }
    }
}

/// Where a status lives.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StatusScope {
    /// Legacy `/rest/build-status/1.0/commits/{commitId}`: shared by every repository with the
    /// commit.
    Commit,
    /// Data Center repository-scoped API. The project key is kept upper case.
    Repository {
        /// Project key, upper case.
        project_key: String,
        /// Repository slug.
        slug: String,
    },
    /// Bitbucket Cloud.
    Cloud {
        /// Workspace slug, lower case.
        workspace: String,
        /// Repository slug, lower case.
        repo_slug: String,
    },
}

/// One accepted status post.
#[derive(Debug, Clone, PartialEq)]
pub struct PostedStatus {
    /// Where it was posted.
    pub scope: StatusScope,
    /// Commit SHA, lower case.
    pub commit: String,
    /// Status key.
    pub key: String,
    /// State as posted (`INPROGRESS`, `SUCCESSFUL`, `FAILED`, `CANCELLED`, `UNKNOWN`, `STOPPED`).
    pub state: String,
    /// Link to the build.
    pub url: String,
    /// `name`, if given.
    pub name: Option<String>,
    /// `description`, if given.
    pub description: Option<String>,
    /// The whole JSON body as posted.
    pub body: Value,
    /// When the fake accepted it.
    pub posted_at: DateTime<Utc>,
}

type StatusId = (StatusScope, String, String);

#[derive(Default)]
struct Store {
    /// (project key upper case, slug) for DC; (workspace, slug) lower case for Cloud.
    repos: HashSet<(String, String)>,
    /// Every accepted post, in order.
    posts: Vec<PostedStatus>,
    /// Per (scope, commit, key): indices into `posts`, oldest first; the last is current.
    by_id: HashMap<StatusId, Vec<usize>>,
    buckets: HashMap<String, (f64, Instant)>,
}

struct Inner {
    opts: FakeBitbucketOptions,
    base: String,
    store: Mutex<Store>,
    /// Deployments, insights, reports, commit graphs and paging state.
    extra: Mutex<extra::ExtraStore>,
}

/// A simulated Bitbucket on 127.0.0.1, serving until dropped.
///
/// This is a simulation for tests, not Bitbucket: it enforces the documented rules listed in the
/// crate docs and nothing else.
pub struct FakeBitbucket {
    server: Server,
    inner: Arc<Inner>,
}

harness_controls!(FakeBitbucket);

impl FakeBitbucket {
    /// Start on 127.0.0.1 with a free port. Panics if no loopback port can be bound.
    pub async fn start(opts: FakeBitbucketOptions) -> Self {
        match Self::try_start(opts).await {
            Ok(f) => f,
            Err(e) => panic!("FakeBitbucket: cannot listen on 127.0.0.1: {e}"),
        }
    }

    /// Start on 127.0.0.1 with a free port.
    pub async fn try_start(opts: FakeBitbucketOptions) -> std::io::Result<Self> {
        let cloud = opts.flavour == BitbucketFlavour::Cloud;
        let harness = Harness::new(
            opts.hang_for,
            opts.latency,
            Box::new(move |secs| rate_limited(cloud, secs)),
        );
        let mut slot = None;
        let server = Server::start(
            |base| {
                let extra = Mutex::new(extra::ExtraStore {
                    deployments_disabled: opts.deployments_disabled,
                    ..extra::ExtraStore::default()
                });
                let inner = Arc::new(Inner {
                    opts,
                    base,
                    store: Mutex::new(Store::default()),
                    extra,
                });
                slot = Some(inner.clone());
                Router::new().fallback(dispatch).with_state(inner)
            },
            harness,
        )
        .await?;
        let inner = slot.ok_or_else(|| std::io::Error::other("router was not built"))?;
        Ok(Self { server, inner })
    }

    /// Register a repository: `project_key` + `slug` on Server/DC (the project key is
    /// case-insensitive), `workspace` + `repo_slug` on Cloud. Repository-scoped and Cloud posts
    /// to repositories not registered get 404.
    pub fn add_repository(&self, project_or_workspace: &str, slug: &str) {
        let key = self.inner.repo_key(project_or_workspace, slug);
        lock(&self.inner.store).repos.insert(key);
    }

    /// Every accepted post, oldest first.
    pub fn posts(&self) -> Vec<PostedStatus> {
        lock(&self.inner.store).posts.clone()
    }

    /// The current status of every (scope, commit, key), oldest post first.
    pub fn current_statuses(&self) -> Vec<PostedStatus> {
        let store = lock(&self.inner.store);
        let mut idx: Vec<usize> = store
            .by_id
            .values()
            .filter_map(|v| v.last().copied())
            .collect();
        idx.sort_unstable();
        idx.into_iter()
            .filter_map(|i| store.posts.get(i).cloned())
            .collect()
    }

    /// The current status for `key` on `commit` (in any scope; the most recently posted one if
    /// several scopes have it). Deleted statuses are not current.
    pub fn status(&self, commit: &str, key: &str) -> Option<PostedStatus> {
        let commit = commit.to_ascii_lowercase();
        self.current_statuses()
            .into_iter()
            .rfind(|p| p.commit == commit && p.key == key)
    }

    /// Every post for `key` on `commit`, in any scope, oldest first.
    pub fn history(&self, commit: &str, key: &str) -> Vec<PostedStatus> {
        let commit = commit.to_ascii_lowercase();
        lock(&self.inner.store)
            .posts
            .iter()
            .filter(|p| p.commit == commit && p.key == key)
            .cloned()
            .collect()
    }

    /// The current statuses on `commit` (every scope and key), oldest post first.
    pub fn statuses_for_commit(&self, commit: &str) -> Vec<PostedStatus> {
        let commit = commit.to_ascii_lowercase();
        self.current_statuses()
            .into_iter()
            .filter(|p| p.commit == commit)
            .collect()
    }

    /// Forget every status.
    pub fn clear_statuses(&self) {
        let mut store = lock(&self.inner.store);
        store.posts.clear();
        store.by_id.clear();
    }

    /// Every accepted deployment POST (Data Center 7.16+), oldest first.
    pub fn deployments(&self) -> Vec<PostedDeployment> {
        lock(&self.inner.extra).deployments.clone()
    }

    /// The latest POST of every deployment identity (repository, commit, `key`,
    /// `environment.key`, `deploymentSequenceNumber`) not deleted since, oldest first.
    pub fn current_deployments(&self) -> Vec<PostedDeployment> {
        let store = lock(&self.inner.extra);
        let mut idx: Vec<usize> = store.current_deployments.values().copied().collect();
        idx.sort_unstable();
        idx.into_iter()
            .filter_map(|i| store.deployments.get(i).cloned())
            .collect()
    }

    /// Switch Data Center deployments on or off (off: as an instance with
    /// `plugin.deployment.capability.disabled`; the endpoints answer 404).
    pub fn set_deployments_enabled(&self, enabled: bool) {
        lock(&self.inner.extra).deployments_disabled = !enabled;
    }
}

// ---------------------------------------------------------------------------------------------
// Error answers

/// Server/DC error body: `{"errors":[{"context":..., "message":..., "exceptionName":...}]}`.
fn dc_errors(status: StatusCode, errors: &[(Option<&str>, String)], exception: &str) -> Response {
    let errors: Vec<Value> = errors
        .iter()
        .map(|(ctx, msg)| json!({"context": ctx, "message": msg, "exceptionName": exception}))
        .collect();
    (status, axum::Json(json!({ "errors": errors }))).into_response()
}

fn dc_error(status: StatusCode, msg: impl Into<String>, exception: &str) -> Response {
    dc_errors(status, &[(None, msg.into())], exception)
}

/// Cloud error body: `{"type":"error","error":{"message":...,"fields":{...}}}`.
fn cloud_error(status: StatusCode, msg: impl Into<String>, fields: Option<Value>) -> Response {
    let mut err = json!({ "message": msg.into() });
    if let (Some(obj), Some(f)) = (err.as_object_mut(), fields) {
        obj.insert("fields".to_owned(), f);
    }
    (status, axum::Json(json!({"type": "error", "error": err}))).into_response()
}

fn rate_limited(cloud: bool, retry_after: u64) -> Response {
    let mut resp = if cloud {
        cloud_error(
            StatusCode::TOO_MANY_REQUESTS,
            "Rate limit for this resource has been exceeded",
            None,
        )
    } else {
        dc_error(
            StatusCode::TOO_MANY_REQUESTS,
            "You have been rate limited: too many requests. Try again later.",
            "com.atlassian.bitbucket.ratelimit.RateLimitedException",
        )
    };
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after.max(1)));
    resp
}

fn is_full_sha(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

// ---------------------------------------------------------------------------------------------
// Dispatch

enum Route<'a> {
    Legacy {
        commit: &'a str,
    },
    Repo {
        project: &'a str,
        slug: &'a str,
        commit: &'a str,
    },
    Capabilities,
    AppProperties,
    CloudPost {
        ws: &'a str,
        repo: &'a str,
        commit: &'a str,
    },
    CloudOne {
        ws: &'a str,
        repo: &'a str,
        commit: &'a str,
        key: &'a str,
    },
    CloudList {
        ws: &'a str,
        repo: &'a str,
        commit: &'a str,
    },
    /// Deployments, Code Insights, Cloud reports, changelog sources (`bitbucket_extra.rs`).
    Extra(extra::ExtraRoute<'a>),
}

fn route<'a>(flavour: &BitbucketFlavour, segs: &'a [&'a str]) -> Option<Route<'a>> {
    let server_like = !matches!(flavour, BitbucketFlavour::Cloud);
    let api_version = |v: &str| v == "1.0" || v == "latest";
    match segs {
        ["rest", "build-status", v, "commits", commit] if server_like && api_version(v) => {
            Some(Route::Legacy { commit })
        }
        [
            "rest",
            "api",
            v,
            "projects",
            project,
            "repos",
            slug,
            "commits",
            commit,
            "builds",
        ] if flavour.rich() && api_version(v) => Some(Route::Repo {
            project,
            slug,
            commit,
        }),
        ["rest", "api", v, "build", "capabilities"] if flavour.rich() && api_version(v) => {
            Some(Route::Capabilities)
        }
        ["rest", "api", v, "application-properties"] if server_like && api_version(v) => {
            Some(Route::AppProperties)
        }
        [
            "2.0",
            "repositories",
            ws,
            repo,
            "commit",
            commit,
            "statuses",
            "build",
        ] if !server_like => Some(Route::CloudPost { ws, repo, commit }),
        [
            "2.0",
            "repositories",
            ws,
            repo,
            "commit",
            commit,
            "statuses",
            "build",
            key,
        ] if !server_like => Some(Route::CloudOne {
            ws,
            repo,
            commit,
            key,
        }),
        [
            "2.0",
            "repositories",
            ws,
            repo,
            "commit",
            commit,
            "statuses",
        ] if !server_like => Some(Route::CloudList { ws, repo, commit }),
        _ => extra::route(flavour, segs).map(Route::Extra),
    }
}

async fn dispatch(State(inner): State<Arc<Inner>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let cloud = inner.opts.flavour == BitbucketFlavour::Cloud;
    let owned = segments(parts.uri.path());
    let segs: Vec<&str> = owned.iter().map(String::as_str).collect();
    let Some(route) = route(&inner.opts.flavour, &segs) else {
        return if cloud {
            cloud_error(StatusCode::NOT_FOUND, "Resource not found", None)
        } else {
            dc_error(
                StatusCode::NOT_FOUND,
                format!("No resource found for {}", parts.uri.path()),
                "",
            )
        };
    };
    if let Route::AppProperties = route {
        // Readable without credentials, as on Bitbucket.
        return inner.app_properties();
    }
    if let Route::Extra(extra::ExtraRoute::Capabilities) = route {
        // Readable without credentials too.
        return inner.capabilities_index();
    }
    let user = match inner.authenticate(&parts.headers) {
        Ok(u) => u,
        Err(r) => return r,
    };
    if let Err(r) = inner.take_token(&user) {
        return r;
    }
    let method = parts.method.clone();
    let query = query_pairs(parts.uri.query());
    let body = if method == Method::POST || method == Method::PUT {
        if !cloud && !is_json(&parts.headers) {
            return dc_error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "Unsupported media type: send Content-Type: application/json",
                "",
            );
        }
        match read_body(body, 1 << 20).await {
            Ok(b) => b,
            Err(()) => {
                return if cloud {
                    cloud_error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "Request body too large",
                        None,
                    )
                } else {
                    dc_error(StatusCode::PAYLOAD_TOO_LARGE, "Request body too large", "")
                };
            }
        }
    } else {
        bytes::Bytes::new()
    };
    let not_allowed = || {
        if cloud {
            cloud_error(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed", None)
        } else {
            dc_error(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed", "")
        }
    };
    match route {
        Route::AppProperties => inner.app_properties(),
        Route::Capabilities if method == Method::GET => {
            let mut caps = vec!["richBuildStatus"];
            if inner.opts.flavour.cancelled() {
                caps.push("cancelledStatus");
            }
            axum::Json(json!({ "buildStatus": caps })).into_response()
        }
        Route::Legacy { commit } if method == Method::POST => inner.legacy_post(commit, &body),
        Route::Legacy { commit } if method == Method::GET => inner.legacy_get(commit, &query),
        Route::Repo {
            project,
            slug,
            commit,
        } => {
            if let Err(r) = inner.check_repo(project, slug) {
                return r;
            }
            let scope = StatusScope::Repository {
                project_key: project.to_uppercase(),
                slug: slug.to_owned(),
            };
            let key = query
                .iter()
                .find(|(k, _)| k == "key")
                .map(|(_, v)| v.as_str());
            match method {
                Method::POST => inner.repo_post(scope, commit, &body),
                Method::GET => inner.repo_get(scope, commit, key, false),
                Method::DELETE => inner.repo_get(scope, commit, key, true),
                _ => not_allowed(),
            }
        }
        Route::CloudPost { ws, repo, commit } if method == Method::POST => {
            inner.cloud_post(ws, repo, commit, None, &body)
        }
        Route::CloudOne {
            ws,
            repo,
            commit,
            key,
        } if method == Method::GET || method == Method::PUT => {
            if method == Method::GET {
                inner.cloud_get(ws, repo, commit, key)
            } else {
                inner.cloud_post(ws, repo, commit, Some(key), &body)
            }
        }
        Route::CloudList { ws, repo, commit } if method == Method::GET => {
            inner.cloud_list(ws, repo, commit, &query)
        }
        Route::Extra(r) => inner.extra(r, &method, &query, &body, &user, parts.uri.path()),
        _ => not_allowed(),
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
        })
}

impl Inner {
    fn cloud(&self) -> bool {
        self.opts.flavour == BitbucketFlavour::Cloud
    }

    fn repo_key(&self, owner: &str, slug: &str) -> (String, String) {
        if self.cloud() {
            (owner.to_lowercase(), slug.to_lowercase())
        } else {
            (owner.to_uppercase(), slug.to_owned())
        }
    }

    fn app_properties(&self) -> Response {
        let version = match &self.opts.flavour {
            BitbucketFlavour::Server { version } | BitbucketFlavour::DataCenter { version, .. } => {
                version.clone()
            }
            BitbucketFlavour::Cloud => String::new(),
        };
        let (major, minor) = self.opts.flavour.version().unwrap_or((0, 0));
        axum::Json(json!({
            "version": version,
            "buildNumber": format!("{}", major * 1_000_000 + minor * 1000),
            "buildDate": "1700000000000",
            "displayName": "Bitbucket",
        }))
        .into_response()
    }

    /// Who is calling, or the 401 answer.
    fn authenticate(&self, headers: &HeaderMap) -> Result<String, Response> {
        let header = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
        let rest = rest.trim();
        let found = if scheme.eq_ignore_ascii_case("basic") {
            base64_decode(rest)
                .and_then(|b| String::from_utf8(b).ok())
                .and_then(|pair| {
                    let (user, pass) = pair.split_once(':')?;
                    self.opts.credentials.iter().find_map(|c| match c {
                        Credential::Basic { username, password }
                        | Credential::PersonalToken {
                            username,
                            token: password,
                        } if username == user && password == pass => Some(username.clone()),
                        _ => None,
                    })
                })
        } else if scheme.eq_ignore_ascii_case("bearer") {
            self.opts.credentials.iter().find_map(|c| match c {
                Credential::PersonalToken { username, token } if token == rest => {
                    Some(username.clone())
                }
                Credential::AccessToken(token) if token == rest => Some(format!("token:{token}")),
                _ => None,
            })
        } else {
            None
        };
        found.ok_or_else(|| {
            let mut resp = if self.cloud() {
                cloud_error(StatusCode::UNAUTHORIZED, "Unauthorized", None)
            } else if header.is_empty() {
                dc_error(
                    StatusCode::UNAUTHORIZED,
                    "You are not permitted to access this resource",
                    "com.atlassian.bitbucket.AuthorisationException",
                )
            } else {
                dc_error(
                    StatusCode::UNAUTHORIZED,
                    "Authentication failed. Please check your credentials and try again.",
                    "com.atlassian.bitbucket.auth.IncorrectPasswordAuthenticationException",
                )
            };
            let realm = if self.cloud() {
                "Basic realm=\"Bitbucket.org HTTP\""
            } else {
                "Basic realm=\"Atlassian Bitbucket\""
            };
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(realm));
            resp
        })
    }

    /// Take one token from `user`'s bucket, or the 429 answer.
    fn take_token(&self, user: &str) -> Result<(), Response> {
        let Some(bucket) = self.opts.rate_limit else {
            return Ok(());
        };
        let now = Instant::now();
        let size = f64::from(bucket.size);
        let mut store = lock(&self.store);
        let (tokens, last) = store.buckets.entry(user.to_owned()).or_insert((size, now));
        let refilled =
            (*tokens + now.duration_since(*last).as_secs_f64() * bucket.refill_per_sec).min(size);
        *last = now;
        if refilled >= 1.0 {
            *tokens = refilled - 1.0;
            Ok(())
        } else {
            *tokens = refilled;
            let wait = if bucket.refill_per_sec > 0.0 {
                ((1.0 - refilled) / bucket.refill_per_sec).ceil() as u64
            } else {
                3600
            };
            Err(rate_limited(self.cloud(), wait.max(1)))
        }
    }

    fn check_repo(&self, project: &str, slug: &str) -> Result<(), Response> {
        let key = self.repo_key(project, slug);
        let store = lock(&self.store);
        if store.repos.contains(&key) {
            return Ok(());
        }
        if self.cloud() {
            return Err(cloud_error(
                StatusCode::NOT_FOUND,
                format!("Repository {project}/{slug} not found"),
                None,
            ));
        }
        if store.repos.iter().any(|(p, _)| *p == key.0) {
            Err(dc_error(
                StatusCode::NOT_FOUND,
                format!("Repository {project}/{slug} does not exist."),
                "com.atlassian.bitbucket.repository.NoSuchRepositoryException",
            ))
        } else {
            Err(dc_error(
                StatusCode::NOT_FOUND,
                format!("Project {project} does not exist."),
                "com.atlassian.bitbucket.project.NoSuchProjectException",
            ))
        }
    }

    fn record(&self, scope: StatusScope, commit: &str, obj: &Map<String, Value>) -> PostedStatus {
        let text = |k: &str| obj.get(k).and_then(Value::as_str).map(str::to_owned);
        let posted = PostedStatus {
            scope,
            commit: commit.to_ascii_lowercase(),
            key: text("key").unwrap_or_default(),
            state: text("state").unwrap_or_default(),
            url: text("url").unwrap_or_default(),
            name: text("name"),
            description: text("description"),
            body: Value::Object(obj.clone()),
            posted_at: Utc::now(),
        };
        let mut store = lock(&self.store);
        let index = store.posts.len();
        store.posts.push(posted.clone());
        store
            .by_id
            .entry((
                posted.scope.clone(),
                posted.commit.clone(),
                posted.key.clone(),
            ))
            .or_default()
            .push(index);
        posted
    }

    fn current(
        &self,
        scope: &StatusScope,
        commit: &str,
        key: &str,
    ) -> Option<(PostedStatus, PostedStatus)> {
        let store = lock(&self.store);
        let ids = store
            .by_id
            .get(&(scope.clone(), commit.to_ascii_lowercase(), key.to_owned()))?;
        let first = store.posts.get(*ids.first()?)?.clone();
        let last = store.posts.get(*ids.last()?)?.clone();
        Some((first, last))
    }

    // --- legacy -----------------------------------------------------------------------------

    fn legacy_post(&self, commit: &str, body: &[u8]) -> Response {
        if !is_full_sha(commit) {
            return dc_error(
                StatusCode::BAD_REQUEST,
                format!(
                    "'{commit}' is not a valid commit ID: a full 40-character SHA-1 is required"
                ),
                "com.atlassian.bitbucket.commit.InvalidCommitIdException",
            );
        }
        let obj = match parse_dc_body(body) {
            Ok(o) => o,
            Err(r) => return r,
        };
        let mut errors = Vec::new();
        let unit = self.opts.length_unit;
        check_state(&obj, &["INPROGRESS", "SUCCESSFUL", "FAILED"], &mut errors);
        check_text(&obj, "key", true, 255, unit, &mut errors);
        check_text(&obj, "url", true, 450, unit, &mut errors);
        check_text(&obj, "name", false, 255, unit, &mut errors);
        check_text(&obj, "description", false, 255, unit, &mut errors);
        if !errors.is_empty() {
            return validation_failed(&errors);
        }
        self.record(StatusScope::Commit, commit, &obj);
        StatusCode::NO_CONTENT.into_response()
    }

    fn legacy_get(&self, commit: &str, query: &[(String, String)]) -> Response {
        if !is_full_sha(commit) {
            return dc_error(
                StatusCode::BAD_REQUEST,
                format!(
                    "'{commit}' is not a valid commit ID: a full 40-character SHA-1 is required"
                ),
                "com.atlassian.bitbucket.commit.InvalidCommitIdException",
            );
        }
        let num = |name: &str, default: usize| -> Result<usize, Response> {
            match query.iter().find(|(k, _)| k == name) {
                None => Ok(default),
                Some((_, v)) => v.parse().map_err(|_| {
                    dc_error(
                        StatusCode::BAD_REQUEST,
                        format!("{name} must be a non-negative integer"),
                        "",
                    )
                }),
            }
        };
        let (start, limit) = match (num("start", 0), num("limit", 25)) {
            (Ok(s), Ok(l)) => (s, l.clamp(1, 1000)),
            (Err(r), _) | (_, Err(r)) => return r,
        };
        let mut current: Vec<PostedStatus> = {
            let store = lock(&self.store);
            let commit = commit.to_ascii_lowercase();
            store
                .by_id
                .iter()
                .filter(|((scope, c, _), _)| *scope == StatusScope::Commit && *c == commit)
                .filter_map(|(_, ids)| store.posts.get(*ids.last()?).cloned())
                .collect()
        };
        // Newest first, and only the 100 most recent, as documented.
        current.sort_by_key(|p| std::cmp::Reverse(p.posted_at));
        current.truncate(100);
        let total = current.len();
        let values: Vec<Value> = current
            .iter()
            .skip(start)
            .take(limit)
            .map(|p| {
                json!({
                    "state": p.state,
                    "key": p.key,
                    "name": p.name,
                    "url": p.url,
                    "description": p.description,
                    "dateAdded": p.posted_at.timestamp_millis(),
                })
            })
            .collect();
        let is_last = start.saturating_add(values.len()) >= total;
        let mut page = json!({
            "size": values.len(),
            "limit": limit,
            "isLastPage": is_last,
            "start": start,
            "values": values,
        });
        if !is_last && let Some(obj) = page.as_object_mut() {
            obj.insert(
                "nextPageStart".to_owned(),
                json!(start.saturating_add(limit)),
            );
        }
        axum::Json(page).into_response()
    }

    // --- repository-scoped ------------------------------------------------------------------

    fn repo_post(&self, scope: StatusScope, commit: &str, body: &[u8]) -> Response {
        if !is_full_sha(commit) {
            return dc_error(
                StatusCode::BAD_REQUEST,
                format!(
                    "'{commit}' is not a valid commit ID: a full 40-character SHA-1 is required"
                ),
                "com.atlassian.bitbucket.commit.InvalidCommitIdException",
            );
        }
        let obj = match parse_dc_body(body) {
            Ok(o) => o,
            Err(r) => return r,
        };
        let unit = self.opts.length_unit;
        let mut errors = Vec::new();
        let mut states = vec!["SUCCESSFUL", "FAILED", "INPROGRESS", "UNKNOWN"];
        if self.opts.flavour.cancelled() {
            states.push("CANCELLED");
        }
        check_state(&obj, &states, &mut errors);
        check_text(&obj, "key", true, 255, unit, &mut errors);
        check_text(&obj, "url", true, 450, unit, &mut errors);
        check_text(&obj, "name", false, 255, unit, &mut errors);
        check_text(&obj, "description", false, 255, unit, &mut errors);
        check_text(&obj, "parent", false, 255, unit, &mut errors);
        check_text(&obj, "ref", false, 255, unit, &mut errors);
        if let Some(Value::String(r)) = obj.get("ref")
            && (!r.starts_with("refs/") || r.len() <= "refs/".len())
        {
            errors.push((
                "ref".to_owned(),
                format!(
                    "'{r}' is not a valid ref: it must be fully qualified, e.g. refs/heads/main"
                ),
            ));
        }
        match obj.get("buildNumber") {
            None | Some(Value::Null) | Some(Value::Number(_)) => {}
            Some(Value::String(_)) => {
                check_text(&obj, "buildNumber", false, 255, unit, &mut errors)
            }
            Some(_) => errors.push((
                "buildNumber".to_owned(),
                "buildNumber must be a string".to_owned(),
            )),
        }
        for field in ["duration", "lastUpdated", "dateAdded"] {
            match obj.get(field) {
                None | Some(Value::Null) => {}
                Some(v) if v.as_u64().is_some() => {}
                Some(_) => errors.push((
                    field.to_owned(),
                    format!("{field} must be a non-negative integer (milliseconds)"),
                )),
            }
        }
        match obj.get("testResults") {
            None | Some(Value::Null) => {}
            Some(Value::Object(t)) => {
                for (k, v) in t {
                    if !matches!(k.as_str(), "successful" | "failed" | "skipped")
                        || v.as_u64().is_none()
                    {
                        errors.push((
                            "testResults".to_owned(),
                            format!("testResults.{k} is not a valid test count (successful, failed, skipped: non-negative integers)"),
                        ));
                    }
                }
            }
            Some(_) => errors.push((
                "testResults".to_owned(),
                "testResults must be an object {successful, failed, skipped}".to_owned(),
            )),
        }
        if !errors.is_empty() {
            return validation_failed(&errors);
        }
        self.record(scope, commit, &obj);
        StatusCode::NO_CONTENT.into_response()
    }

    fn repo_get(
        &self,
        scope: StatusScope,
        commit: &str,
        key: Option<&str>,
        delete: bool,
    ) -> Response {
        if !is_full_sha(commit) {
            return dc_error(
                StatusCode::BAD_REQUEST,
                format!(
                    "'{commit}' is not a valid commit ID: a full 40-character SHA-1 is required"
                ),
                "com.atlassian.bitbucket.commit.InvalidCommitIdException",
            );
        }
        let Some(key) = key.filter(|k| !k.is_empty()) else {
            return dc_errors(
                StatusCode::BAD_REQUEST,
                &[(Some("key"), "A build status key is required".to_owned())],
                "com.atlassian.bitbucket.validation.ArgumentValidationException",
            );
        };
        let Some((first, last)) = self.current(&scope, commit, key) else {
            return dc_error(
                StatusCode::NOT_FOUND,
                format!("No build status with key '{key}' exists for commit {commit}"),
                "com.atlassian.bitbucket.build.NoSuchBuildStatusException",
            );
        };
        if delete {
            let mut store = lock(&self.store);
            store
                .by_id
                .remove(&(scope, commit.to_ascii_lowercase(), key.to_owned()));
            return StatusCode::NO_CONTENT.into_response();
        }
        let mut v = last.body.clone();
        if let Some(obj) = v.as_object_mut() {
            obj.insert(
                "createdDate".to_owned(),
                json!(first.posted_at.timestamp_millis()),
            );
            obj.insert(
                "updatedDate".to_owned(),
                json!(last.posted_at.timestamp_millis()),
            );
        }
        axum::Json(v).into_response()
    }

    // --- Cloud ------------------------------------------------------------------------------

    fn cloud_json(&self, ws: &str, repo: &str, first: &PostedStatus, p: &PostedStatus) -> Value {
        let repo_api = format!("{}/2.0/repositories/{ws}/{repo}", self.base);
        let text = |k: &str| p.body.get(k).cloned().unwrap_or(Value::Null);
        json!({
            "type": "build",
            "key": p.key,
            "state": p.state,
            "name": text("name"),
            "description": text("description"),
            "url": p.url,
            "refname": text("refname"),
            "uuid": format!("{{{}}}", uuid_from(&first.commit, &p.key)),
            "created_on": first.posted_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, false),
            "updated_on": p.posted_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, false),
            "commit": {"type": "commit", "hash": p.commit},
            "links": {
                "self": {"href": format!("{repo_api}/commit/{}/statuses/build/{}", p.commit, p.key)},
                "commit": {"href": format!("{repo_api}/commit/{}", p.commit)},
            },
        })
    }

    fn cloud_post(
        &self,
        ws: &str,
        repo: &str,
        commit: &str,
        path_key: Option<&str>,
        body: &[u8],
    ) -> Response {
        if let Err(r) = self.check_repo(ws, repo) {
            return r;
        }
        if !is_full_sha(commit) {
            return cloud_error(
                StatusCode::NOT_FOUND,
                format!("Commit not found: {commit}"),
                None,
            );
        }
        let scope = StatusScope::Cloud {
            workspace: ws.to_lowercase(),
            repo_slug: repo.to_lowercase(),
        };
        let mut obj = match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(o)) => o,
            Ok(_) => return cloud_error(StatusCode::BAD_REQUEST, "Expected a JSON object", None),
            Err(e) => {
                return cloud_error(StatusCode::BAD_REQUEST, format!("Invalid JSON: {e}"), None);
            }
        };
        if let Some(key) = path_key {
            // PUT .../statuses/build/{key}: the status must exist and the key cannot change.
            let Some((_, last)) = self.current(&scope, commit, key) else {
                return cloud_error(
                    StatusCode::NOT_FOUND,
                    format!("No build status for key {key}"),
                    None,
                );
            };
            if let Some(k) = obj.get("key").and_then(Value::as_str)
                && k != key
            {
                return cloud_error(
                    StatusCode::BAD_REQUEST,
                    "key: the key of a build status cannot be changed",
                    Some(json!({"key": ["The key of a build status cannot be changed."]})),
                );
            }
            // Fields not sent keep their values.
            if let Some(prev) = last.body.as_object() {
                for (k, v) in prev {
                    obj.entry(k.clone()).or_insert_with(|| v.clone());
                }
            }
            obj.insert("key".to_owned(), Value::String(key.to_owned()));
        }
        let mut fields = Map::new();
        let mut add = |field: &str, msg: String| {
            fields.insert(field.to_owned(), json!([msg]));
        };
        for field in ["key", "state", "url"] {
            match obj.get(field) {
                None | Some(Value::Null) => add(field, "This field is required.".to_owned()),
                Some(Value::String(s)) if s.trim().is_empty() => {
                    add(field, "This field may not be blank.".to_owned())
                }
                Some(Value::String(_)) => {}
                Some(_) => add(field, "Not a valid string.".to_owned()),
            }
        }
        for field in ["name", "description", "refname"] {
            if let Some(v) = obj.get(field)
                && !(v.is_string() || v.is_null())
            {
                add(field, "Not a valid string.".to_owned());
            }
        }
        if let Some(Value::String(k)) = obj.get("key") {
            let n = k.chars().count();
            if n > 40 {
                add(
                    "key",
                    format!("Ensure this value has at most 40 characters (it has {n})."),
                );
            }
        }
        if let Some(Value::String(s)) = obj.get("state")
            && !["INPROGRESS", "SUCCESSFUL", "FAILED", "STOPPED"].contains(&s.as_str())
        {
            add(
                "state",
                format!(
                    "\"{s}\" is not a valid choice: INPROGRESS, SUCCESSFUL, FAILED or STOPPED."
                ),
            );
        }
        if !fields.is_empty() {
            let summary = fields
                .iter()
                .map(|(k, v)| format!("{k}: {}", v.get(0).and_then(Value::as_str).unwrap_or("")))
                .collect::<Vec<_>>()
                .join("; ");
            return cloud_error(
                StatusCode::BAD_REQUEST,
                summary,
                Some(Value::Object(fields)),
            );
        }
        let posted = self.record(scope.clone(), commit, &obj);
        let first = self
            .current(&scope, commit, &posted.key)
            .map_or_else(|| posted.clone(), |(f, _)| f);
        let status = if path_key.is_some() {
            StatusCode::OK
        } else {
            StatusCode::CREATED
        };
        (
            status,
            axum::Json(self.cloud_json(ws, repo, &first, &posted)),
        )
            .into_response()
    }

    fn cloud_get(&self, ws: &str, repo: &str, commit: &str, key: &str) -> Response {
        if let Err(r) = self.check_repo(ws, repo) {
            return r;
        }
        let scope = StatusScope::Cloud {
            workspace: ws.to_lowercase(),
            repo_slug: repo.to_lowercase(),
        };
        match self.current(&scope, commit, key) {
            Some((first, last)) => {
                axum::Json(self.cloud_json(ws, repo, &first, &last)).into_response()
            }
            None => cloud_error(
                StatusCode::NOT_FOUND,
                format!("No build status for key {key}"),
                None,
            ),
        }
    }

    fn cloud_list(
        &self,
        ws: &str,
        repo: &str,
        commit: &str,
        query: &[(String, String)],
    ) -> Response {
        if let Err(r) = self.check_repo(ws, repo) {
            return r;
        }
        let scope = StatusScope::Cloud {
            workspace: ws.to_lowercase(),
            repo_slug: repo.to_lowercase(),
        };
        let commit_lc = commit.to_ascii_lowercase();
        let mut entries: Vec<(PostedStatus, PostedStatus)> = {
            let store = lock(&self.store);
            store
                .by_id
                .iter()
                .filter(|((s, c, _), _)| *s == scope && *c == commit_lc)
                .filter_map(|(_, ids)| {
                    Some((
                        store.posts.get(*ids.first()?)?.clone(),
                        store.posts.get(*ids.last()?)?.clone(),
                    ))
                })
                .collect()
        };
        entries.sort_by_key(|e| std::cmp::Reverse(e.1.posted_at));
        let get = |name: &str, default: usize| {
            query
                .iter()
                .find(|(k, _)| k == name)
                .and_then(|(_, v)| v.parse::<usize>().ok())
                .unwrap_or(default)
        };
        let pagelen = get("pagelen", 10).clamp(1, 100);
        let page = get("page", 1).max(1);
        let values: Vec<Value> = entries
            .iter()
            .skip((page - 1).saturating_mul(pagelen))
            .take(pagelen)
            .map(|(f, l)| self.cloud_json(ws, repo, f, l))
            .collect();
        let mut body =
            json!({"pagelen": pagelen, "size": entries.len(), "page": page, "values": values});
        if page.saturating_mul(pagelen) < entries.len()
            && let Some(obj) = body.as_object_mut()
        {
            obj.insert(
                "next".to_owned(),
                json!(format!(
                    "{}/2.0/repositories/{ws}/{repo}/commit/{commit}/statuses?pagelen={pagelen}&page={}",
                    self.base,
                    page.saturating_add(1)
                )),
            );
        }
        axum::Json(body).into_response()
    }
}

/// A stable UUID-looking id for a Cloud status (the fake does not need real randomness here).
fn uuid_from(commit: &str, key: &str) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(format!("{commit}/{key}").as_bytes());
    let h = hex::encode(&d[..16]);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn parse_dc_body(body: &[u8]) -> Result<Map<String, Value>, Response> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(_) => Err(dc_error(
            StatusCode::BAD_REQUEST,
            "The request body must be a JSON object",
            "",
        )),
        Err(e) => Err(dc_error(
            StatusCode::BAD_REQUEST,
            format!("The request body is not valid JSON: {e}"),
            "",
        )),
    }
}

fn validation_failed(errors: &[(String, String)]) -> Response {
    let list: Vec<(Option<&str>, String)> = errors
        .iter()
        .map(|(ctx, msg)| (Some(ctx.as_str()), msg.clone()))
        .collect();
    dc_errors(
        StatusCode::BAD_REQUEST,
        &list,
        "com.atlassian.bitbucket.validation.ArgumentValidationException",
    )
}

fn check_state(obj: &Map<String, Value>, allowed: &[&str], errors: &mut Vec<(String, String)>) {
    match obj.get("state") {
        None | Some(Value::Null) => {
            errors.push(("state".to_owned(), "state is required".to_owned()))
        }
        Some(Value::String(s)) if allowed.contains(&s.as_str()) => {}
        Some(other) => errors.push((
            "state".to_owned(),
            format!(
                "{other} is not a valid state; expected one of {}",
                allowed.join(", ")
            ),
        )),
    }
}

fn check_text(
    obj: &Map<String, Value>,
    field: &str,
    required: bool,
    max: usize,
    unit: LengthUnit,
    errors: &mut Vec<(String, String)>,
) {
    match obj.get(field) {
        None | Some(Value::Null) => {
            if required {
                errors.push((field.to_owned(), format!("{field} is required")));
            }
        }
        Some(Value::String(s)) => {
            if required && s.trim().is_empty() {
                errors.push((field.to_owned(), format!("{field} must not be blank")));
            }
            let n = unit.len(s);
            if n > max {
                errors.push((
                    field.to_owned(),
                    format!("{field} must be {max} characters or fewer (it has {n})"),
                ));
            }
        }
        Some(_) => errors.push((field.to_owned(), format!("{field} must be a string"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_count_utf16_units_or_chars() {
        let emoji = "🚀";
        assert_eq!(LengthUnit::Utf16.len(emoji), 2);
        assert_eq!(LengthUnit::Chars.len(emoji), 1);
        assert_eq!(LengthUnit::Utf16.len("é"), 1);
    }

    #[test]
    fn versions_gate_the_rich_api() {
        let dc = |v: &str| BitbucketFlavour::DataCenter {
            version: v.to_owned(),
            cancelled_status: true,
        };
        assert!(dc("7.4.0").rich());
        assert!(dc("8.19.1").rich());
        assert!(!dc("7.3.2").rich());
        assert!(!dc("6.10").rich());
        assert!(
            !BitbucketFlavour::Server {
                version: "8.0".into()
            }
            .rich()
        );
        assert!(!BitbucketFlavour::Cloud.rich());
    }

    #[test]
    fn sha_check() {
        assert!(is_full_sha("4e1f0c9b7a2d3e5f6a8b9c0d1e2f3a4b5c6d7e8f"));
        assert!(!is_full_sha("4e1f0c9"));
        assert!(!is_full_sha("4e1f0c9b7a2d3e5f6a8b9c0d1e2f3a4b5c6d7e8g"));
    }
}
