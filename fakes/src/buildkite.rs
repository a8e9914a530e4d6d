//! A simulated Buildkite REST API v2 (the parts kitebridge uses) and Buildkite webhook
//! deliveries.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, NaiveDate, Utc};
use serde_json::{Map, Value, json};

use crate::common::{
    Harness, Server, base64, harness_controls, iso_millis, lock, query_pairs, read_body, segments,
};
use crate::jobs::{self, Job, JobState, RetryRefused};
use crate::webhook::{WebhookAuth, WebhookDelivery, WebhookEvent};

/// The token [`FakeBuildkiteOptions::default`] accepts, with scopes `read_builds`,
/// `write_builds` and `read_pipelines`.
pub const DEFAULT_BUILDKITE_TOKEN: &str = "bkua_fake_token_0123456789";

/// The organization [`FakeBuildkiteOptions::default`] knows.
pub const DEFAULT_ORGANIZATION: &str = "acme-inc";

/// Largest `per_page` Buildkite accepts.
pub const MAX_PER_PAGE: usize = 100;

/// `per_page` when the client sends none.
pub const DEFAULT_PER_PAGE: usize = 30;

/// An API access token the fake accepts, with its scopes and the user it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiToken {
    /// The secret sent as `Authorization: Bearer <token>`.
    pub token: String,
    /// Scopes such as `read_builds`, `write_builds`, `read_pipelines`.
    pub scopes: Vec<String>,
    /// UUID of the token's user (the `creator` of builds it creates).
    pub user_id: String,
    /// Name of the token's user.
    pub user_name: String,
    /// Email of the token's user.
    pub user_email: String,
}

impl ApiToken {
    /// A token with these scopes, belonging to a made-up user.
    pub fn new(token: impl Into<String>, scopes: &[&str]) -> Self {
        Self {
            token: token.into(),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            user_id: "018f2b7e-1c3d-4a5b-8e9f-0a1b2c3d4e5f".to_owned(),
            user_name: "Kite Bridge".to_owned(),
            user_email: "kitebridge@acme-inc.example".to_owned(),
        }
    }

    fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }
}

/// How a [`FakeBuildkite`] behaves.
#[derive(Debug, Clone)]
pub struct FakeBuildkiteOptions {
    /// Organization slugs that exist (more are added by [`FakeBuildkite::add_pipeline`]).
    pub organizations: Vec<String>,
    /// Tokens accepted; any other `Authorization` gets 401.
    pub tokens: Vec<ApiToken>,
    /// Requests allowed per organization per window (Buildkite: 200 per minute by default).
    pub rate_limit: u32,
    /// Requests allowed per token per window, if the per-user limit is on (Buildkite: 50 per
    /// minute since 2026). Off by default.
    pub user_rate_limit: Option<u32>,
    /// Length of the rate-limit window (Buildkite: 60 s). Shorten it in tests.
    pub rate_limit_window: Duration,
    /// Refuse listings whose page starts at or past this many builds with Buildkite's 400
    /// "Listing builds this deep is not supported" (Buildkite does not document the depth).
    /// Off by default.
    pub max_list_depth: Option<usize>,
    /// Base of `web_url` values (default `https://buildkite.com`, so URLs have realistic
    /// lengths; nothing is served there by the fake).
    pub web_url_base: String,
    /// Latency added before every answer (can be changed later with `set_latency`).
    pub latency: Duration,
    /// How long a [`Fault::Hang`](crate::Fault::Hang) lasts (default 600 s).
    pub hang_for: Duration,
    /// How far Buildkite's clock is from this machine's (negative: behind). Every time the
    /// fake makes up (build and job timestamps, the `Date` header) is read from that clock, so
    /// a client whose own clock runs fast can be tested. Zero by default.
    pub clock_offset: chrono::Duration,
}

/// A wrong `Link` header the fake can send on listings (a misconfigured proxy, or a hostile
/// server), set with [`FakeBuildkite::set_link_fault`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkFault {
    /// Page links point at this base URL (e.g. `http://127.0.0.1:1234`) instead of the fake's.
    OtherHost(String),
    /// `rel="last"` names this page number (and `next` stays right).
    LastPage(u64),
}

impl Default for FakeBuildkiteOptions {
    fn default() -> Self {
        Self {
            organizations: vec![DEFAULT_ORGANIZATION.to_owned()],
            tokens: vec![ApiToken::new(
                DEFAULT_BUILDKITE_TOKEN,
                &["read_builds", "write_builds", "read_pipelines"],
            )],
            rate_limit: 200,
            user_rate_limit: None,
            rate_limit_window: Duration::from_secs(60),
            max_list_depth: None,
            web_url_base: "https://buildkite.com".to_owned(),
            latency: Duration::ZERO,
            hang_for: Duration::from_secs(600),
            clock_offset: chrono::Duration::zero(),
        }
    }
}

/// A Buildkite build state (REST `state`; `finished` is only a filter shorthand, not a state).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BuildState {
    /// `creating`
    Creating,
    /// `scheduled`
    Scheduled,
    /// `running`
    Running,
    /// `passed`
    Passed,
    /// `failing`
    Failing,
    /// `failed`
    Failed,
    /// `blocked`. The REST API does not return it for blocked builds (they keep their last
    /// state with `blocked: true`); it is here for clients that must tolerate it.
    Blocked,
    /// `canceling`
    Canceling,
    /// `canceled`
    Canceled,
    /// `skipped`
    Skipped,
    /// `not_run`
    NotRun,
    /// `waiting` (listed in the REST data model)
    Waiting,
    /// `waiting_failed` (listed in the REST data model)
    WaitingFailed,
}

impl BuildState {
    /// Every state.
    pub const ALL: [BuildState; 13] = [
        Self::Creating,
        Self::Scheduled,
        Self::Running,
        Self::Passed,
        Self::Failing,
        Self::Failed,
        Self::Blocked,
        Self::Canceling,
        Self::Canceled,
        Self::Skipped,
        Self::NotRun,
        Self::Waiting,
        Self::WaitingFailed,
    ];

    /// The API's name for the state.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Creating => "creating",
            Self::Scheduled => "scheduled",
            Self::Running => "running",
            Self::Passed => "passed",
            Self::Failing => "failing",
            Self::Failed => "failed",
            Self::Blocked => "blocked",
            Self::Canceling => "canceling",
            Self::Canceled => "canceled",
            Self::Skipped => "skipped",
            Self::NotRun => "not_run",
            Self::Waiting => "waiting",
            Self::WaitingFailed => "waiting_failed",
        }
    }

    /// Parse the API's name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Whether the build has ended (it has a `finished_at`).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Passed | Self::Failed | Self::Canceled | Self::Skipped | Self::NotRun
        )
    }
}

/// A pipeline known to the fake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pipeline {
    /// Organization slug.
    pub org: String,
    /// Pipeline slug.
    pub slug: String,
    /// Display name.
    pub name: String,
    /// Repository clone URL, e.g. `ssh://git@bitbucket.example:7999/proj/repo.git`.
    pub repository: String,
    /// UUID.
    pub id: String,
    /// Default branch.
    pub default_branch: String,
    /// When the pipeline was created.
    pub created_at: DateTime<Utc>,
}

impl Pipeline {
    /// A pipeline with a random UUID and default branch `main`.
    pub fn new(
        org: impl Into<String>,
        slug: impl Into<String>,
        name: impl Into<String>,
        repository: impl Into<String>,
    ) -> Self {
        Self {
            org: org.into(),
            slug: slug.into(),
            name: name.into(),
            repository: repository.into(),
            id: uuid::Uuid::new_v4().to_string(),
            default_branch: "main".to_owned(),
            created_at: Utc::now(),
        }
    }

    /// The same pipeline with this UUID.
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }
}

/// A build held by the fake. Build one with [`Build::new`] and the `with_*` methods and give it
/// to [`FakeBuildkite::add_build`], which fills in what is left empty.
#[derive(Debug, Clone, PartialEq)]
pub struct Build {
    /// UUID (empty: the fake makes one).
    pub id: String,
    /// Organization slug.
    pub org: String,
    /// Pipeline slug.
    pub pipeline: String,
    /// Build number within the pipeline (0: the fake takes the pipeline's next number).
    pub number: u64,
    /// State.
    pub state: BuildState,
    /// Whether a block step holds the build (REST keeps `state` as it was, e.g. `passed`).
    pub blocked: bool,
    /// `blocked_state` of the block step (`passed`, `failed`, `running`), if blocked.
    pub blocked_state: Option<String>,
    /// Commit message.
    pub message: String,
    /// Commit SHA (or ref, for API-created builds).
    pub commit: String,
    /// Branch.
    pub branch: String,
    /// Tag, if a tag build.
    pub tag: Option<String>,
    /// `webhook`, `api`, `ui`, `trigger_job` or `schedule`.
    pub source: String,
    /// Environment given at creation.
    pub env: Map<String, Value>,
    /// Build meta-data (string to string).
    pub meta_data: Map<String, Value>,
    /// `author` object (`{username, name, email}`), if any.
    pub author: Option<Value>,
    /// `creator` object, if any.
    pub creator: Option<Value>,
    /// `pull_request` object, if any.
    pub pull_request: Option<Value>,
    /// `cancel_reason`, if any.
    pub cancel_reason: Option<String>,
    /// Creation time (`None`: now).
    pub created_at: Option<DateTime<Utc>>,
    /// When it was scheduled (`None`: derived from `created_at`).
    pub scheduled_at: Option<DateTime<Utc>>,
    /// When it started running (`None`: derived from the state, see [`FakeBuildkite::add_build`]).
    pub started_at: Option<DateTime<Utc>>,
    /// When it finished (`None`: derived from the state).
    pub finished_at: Option<DateTime<Utc>>,
    /// Its jobs (none by default: the state is then whatever the test sets). With jobs, the
    /// build's state follows them when one is retried or changed (see [`crate::Job`]).
    pub jobs: Vec<Job>,
}

impl Build {
    /// A `scheduled` build of `org/pipeline` for `commit` on `branch`, source `webhook`.
    pub fn new(
        org: impl Into<String>,
        pipeline: impl Into<String>,
        commit: impl Into<String>,
        branch: impl Into<String>,
    ) -> Self {
        Self {
            id: String::new(),
            org: org.into(),
            pipeline: pipeline.into(),
            number: 0,
            state: BuildState::Scheduled,
            blocked: false,
            blocked_state: None,
            message: "Build".to_owned(),
            commit: commit.into(),
            branch: branch.into(),
            tag: None,
            source: "webhook".to_owned(),
            env: Map::new(),
            meta_data: Map::new(),
            author: None,
            creator: None,
            pull_request: None,
            cancel_reason: None,
            created_at: None,
            scheduled_at: None,
            started_at: None,
            finished_at: None,
            jobs: Vec::new(),
        }
    }

    /// With one more job.
    pub fn with_job(mut self, job: Job) -> Self {
        self.jobs.push(job);
        self
    }

    /// With this state.
    pub fn with_state(mut self, state: BuildState) -> Self {
        self.state = state;
        self
    }

    /// With this creation time.
    pub fn with_created_at(mut self, t: DateTime<Utc>) -> Self {
        self.created_at = Some(t);
        self
    }

    /// With this finish time.
    pub fn with_finished_at(mut self, t: DateTime<Utc>) -> Self {
        self.finished_at = Some(t);
        self
    }

    /// With this commit message.
    pub fn with_message(mut self, message: impl Into<String>) -> Self {
        self.message = message.into();
        self
    }

    /// With this build number.
    pub fn with_number(mut self, number: u64) -> Self {
        self.number = number;
        self
    }

    /// Blocked by a block step (state stays as given, `blocked_state` `passed`).
    pub fn with_blocked(mut self, blocked: bool) -> Self {
        self.blocked = blocked;
        if blocked && self.blocked_state.is_none() {
            self.blocked_state = Some("passed".to_owned());
        }
        self
    }

    /// With one meta-data entry.
    pub fn with_meta_data(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.meta_data
            .insert(key.into(), Value::String(value.into()));
        self
    }

    /// The creation time (after [`FakeBuildkite::add_build`] it is always set).
    pub fn created(&self) -> DateTime<Utc> {
        self.created_at.unwrap_or(DateTime::<Utc>::MIN_UTC)
    }

    /// Fill in timestamps the state implies, relative to `created_at` (or to `now` when the
    /// state changes later).
    fn settle_times(&mut self, now: DateTime<Utc>) {
        use BuildState::*;
        let created = *self.created_at.get_or_insert(now);
        if self.scheduled_at.is_none() && !matches!(self.state, Creating) {
            self.scheduled_at = Some(created);
        }
        let base = if now > created { now } else { created };
        match self.state {
            Running | Failing | Canceling | Blocked => {
                self.started_at.get_or_insert(base);
                self.finished_at = None;
            }
            Passed | Failed => {
                let started = *self.started_at.get_or_insert(created);
                if self.finished_at.is_none() {
                    let fin = if now > started {
                        now
                    } else {
                        started + chrono::Duration::seconds(60)
                    };
                    self.finished_at = Some(fin);
                }
            }
            Canceled | Skipped | NotRun => {
                if self.finished_at.is_none() {
                    self.finished_at = Some(base);
                }
            }
            Creating | Scheduled | Waiting | WaitingFailed => {
                self.started_at = None;
                self.finished_at = None;
            }
        }
    }
}

/// Per-organization/per-user fixed windows.
#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    count: u32,
}

struct PipelineEntry {
    pipeline: Pipeline,
    json: Value,
    next_number: u64,
}

#[derive(Default)]
struct Store {
    orgs: HashSet<String>,
    pipelines: HashMap<(String, String), PipelineEntry>,
    /// Every build ever added; the index is the build's handle.
    builds: Vec<Build>,
    /// Handles sorted by (created_at, handle) ascending; listings walk it backwards.
    order: Vec<usize>,
    by_number: HashMap<(String, String, u64), usize>,
    created_via_api: Vec<usize>,
    org_windows: HashMap<String, Window>,
    user_windows: HashMap<String, Window>,
    /// Annotations per build (org, pipeline, number), oldest first.
    annotations: HashMap<(String, String, u64), Vec<Value>>,
}

struct Inner {
    opts: FakeBuildkiteOptions,
    base: String,
    store: Mutex<Store>,
    link_fault: Mutex<Option<LinkFault>>,
}

impl Inner {
    /// Buildkite's clock.
    fn now(&self) -> DateTime<Utc> {
        Utc::now() + self.opts.clock_offset
    }
}

/// A simulated Buildkite REST API on 127.0.0.1, serving until dropped.
///
/// This is a simulation for tests, not Buildkite: it enforces the documented rules listed in the
/// crate docs and nothing else.
pub struct FakeBuildkite {
    server: Server,
    inner: Arc<Inner>,
}

harness_controls!(FakeBuildkite);

impl FakeBuildkite {
    /// Start on 127.0.0.1 with a free port. Panics if no loopback port can be bound.
    pub async fn start(opts: FakeBuildkiteOptions) -> Self {
        match Self::try_start(opts).await {
            Ok(f) => f,
            Err(e) => panic!("FakeBuildkite: cannot listen on 127.0.0.1: {e}"),
        }
    }

    /// Start on 127.0.0.1 with a free port.
    pub async fn try_start(opts: FakeBuildkiteOptions) -> std::io::Result<Self> {
        let limit = opts.rate_limit;
        let mut store = Store::default();
        store.orgs.extend(opts.organizations.iter().cloned());
        let harness = Harness::new(
            opts.hang_for,
            opts.latency,
            Box::new(move |secs| {
                rate_limited_response("rest", limit, limit + 1, secs, HeaderMap::new())
            }),
        );
        let mut slot = None;
        let server = Server::start(
            |base| {
                let inner = Arc::new(Inner {
                    opts,
                    base,
                    store: Mutex::new(store),
                    link_fault: Mutex::new(None),
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

    /// Make an organization exist.
    pub fn add_organization(&self, slug: &str) {
        lock(&self.inner.store).orgs.insert(slug.to_owned());
    }

    /// Add (or replace) a pipeline; its organization is created if needed.
    pub fn add_pipeline(&self, pipeline: Pipeline) {
        let json = pipeline_json(&self.inner.base, &self.inner.opts.web_url_base, &pipeline);
        let mut store = lock(&self.inner.store);
        store.orgs.insert(pipeline.org.clone());
        let key = (pipeline.org.clone(), pipeline.slug.clone());
        let next_number = store.pipelines.get(&key).map_or(1, |e| e.next_number);
        store.pipelines.insert(
            key,
            PipelineEntry {
                pipeline,
                json,
                next_number,
            },
        );
    }

    /// The pipeline `org/slug`, if added.
    pub fn pipeline(&self, org: &str, slug: &str) -> Option<Pipeline> {
        lock(&self.inner.store)
            .pipelines
            .get(&(org.to_owned(), slug.to_owned()))
            .map(|e| e.pipeline.clone())
    }

    /// Add a build and return it as stored.
    ///
    /// Empty `id` gets a UUID, `number` 0 the pipeline's next number, `created_at` `None` now.
    /// Timestamps the state implies and that are `None` are derived from `created_at`:
    /// `scheduled_at` = created; running states get `started_at`; `passed`/`failed` get
    /// `started_at` = created and `finished_at` = started + 60 s; `canceled`/`skipped`/`not_run`
    /// get `finished_at` only.
    ///
    /// Panics if the pipeline was not added (a mistake in the test, not in the client).
    pub fn add_build(&self, build: Build) -> Build {
        let mut store = lock(&self.inner.store);
        insert_build(&mut store, build, self.inner.now())
    }

    /// Add many builds at once (cheaper than one by one for thousands).
    pub fn add_builds(&self, builds: impl IntoIterator<Item = Build>) -> Vec<Build> {
        let now = self.inner.now();
        let mut store = lock(&self.inner.store);
        builds
            .into_iter()
            .map(|b| insert_build(&mut store, b, now))
            .collect()
    }

    /// The build `org/pipeline#number`, if it exists.
    pub fn build(&self, org: &str, pipeline: &str, number: u64) -> Option<Build> {
        let store = lock(&self.inner.store);
        let handle = *store
            .by_number
            .get(&(org.to_owned(), pipeline.to_owned(), number))?;
        store.builds.get(handle).cloned()
    }

    /// Every build, newest created first.
    pub fn builds(&self) -> Vec<Build> {
        let store = lock(&self.inner.store);
        store
            .order
            .iter()
            .rev()
            .filter_map(|&h| store.builds.get(h).cloned())
            .collect()
    }

    /// Builds created through `POST .../builds`, oldest first, with their `env` and `meta_data`.
    pub fn created_builds(&self) -> Vec<Build> {
        let store = lock(&self.inner.store);
        store
            .created_via_api
            .iter()
            .filter_map(|&h| store.builds.get(h).cloned())
            .collect()
    }

    /// Move a build to `state`, setting `started_at`/`finished_at` as Buildkite would (start on
    /// the first running state, finish on a terminal one, both cleared when rescheduled).
    /// Returns the updated build, or `None` if it does not exist.
    pub fn set_build_state(
        &self,
        org: &str,
        pipeline: &str,
        number: u64,
        state: BuildState,
    ) -> Option<Build> {
        self.update_build(org, pipeline, number, |b| {
            b.state = state;
            if !state.is_terminal() {
                b.finished_at = None;
            }
            if matches!(state, BuildState::Scheduled | BuildState::Creating) {
                b.started_at = None;
            }
        })
    }

    /// Set or clear the `blocked` flag (with `blocked_state` `passed` when set).
    pub fn set_build_blocked(
        &self,
        org: &str,
        pipeline: &str,
        number: u64,
        blocked: bool,
    ) -> Option<Build> {
        self.update_build(org, pipeline, number, |b| {
            b.blocked = blocked;
            b.blocked_state = blocked.then(|| "passed".to_owned());
        })
    }

    /// Change a build in any way, then settle its timestamps for its (new) state. Changing
    /// `created_at` re-sorts it; `org`, `pipeline` and `number` must not be changed.
    pub fn update_build(
        &self,
        org: &str,
        pipeline: &str,
        number: u64,
        change: impl FnOnce(&mut Build),
    ) -> Option<Build> {
        let mut store = lock(&self.inner.store);
        let handle = *store
            .by_number
            .get(&(org.to_owned(), pipeline.to_owned(), number))?;
        let before = store.builds.get(handle)?.created();
        let build = store.builds.get_mut(handle)?;
        change(build);
        build.settle_times(self.inner.now());
        let after = build.created();
        let updated = build.clone();
        if before != after {
            store.order.retain(|&h| h != handle);
            let pos = sorted_position(&store, after, handle);
            store.order.insert(pos, handle);
        }
        Some(updated)
    }

    /// Buildkite's clock (this machine's plus [`FakeBuildkiteOptions::clock_offset`]).
    pub fn now(&self) -> DateTime<Utc> {
        self.inner.now()
    }

    /// Make listings send a wrong `Link` header (`None`: right ones again).
    pub fn set_link_fault(&self, fault: Option<LinkFault>) {
        *lock(&self.inner.link_fault) = fault;
    }

    /// Retry job `job_id` of build `org/pipeline#number`, as a user pressing "Retry" does (the
    /// REST route `PUT .../builds/{number}/jobs/{id}/retry` does the same): the new job, or why
    /// Buildkite refuses. The build goes back to `running`; see [`crate::Job`].
    pub fn retry_job(
        &self,
        org: &str,
        pipeline: &str,
        number: u64,
        job_id: &str,
    ) -> Result<Job, RetryRefused> {
        self.inner.retry_job(org, pipeline, number, job_id)
    }

    /// Move job `job_id` of build `org/pipeline#number` to `state` (with its times) and the
    /// build to the state its jobs now make. `None` if there is no such build or job.
    pub fn set_job_state(
        &self,
        org: &str,
        pipeline: &str,
        number: u64,
        job_id: &str,
        state: JobState,
    ) -> Option<Build> {
        let now = self.inner.now();
        let mut store = lock(&self.inner.store);
        let handle = *store
            .by_number
            .get(&(org.to_owned(), pipeline.to_owned(), number))?;
        let build = store.builds.get_mut(handle)?;
        let job = build.jobs.iter_mut().find(|j| j.id == job_id)?;
        job.state = state;
        job.settle_times(now);
        if let Some(next) = jobs::build_state_from(&build.jobs) {
            // A build that has started is not `scheduled` again while a retried job waits.
            build.state = if build.started_at.is_some() {
                running_again(Some(next))
            } else {
                next
            };
        }
        build.settle_times(now);
        Some(build.clone())
    }

    /// A webhook delivery for `event` about build `org/pipeline#number`, as Buildkite would send
    /// it (body: `event`, `build` without jobs, `pipeline`, `sender`). `None` if there is no
    /// such build. For [`WebhookEvent::Ping`] use [`FakeBuildkite::ping_webhook`].
    pub fn webhook(
        &self,
        org: &str,
        pipeline: &str,
        number: u64,
        event: WebhookEvent,
        auth: &WebhookAuth,
    ) -> Option<WebhookDelivery> {
        let store = lock(&self.inner.store);
        let handle = *store
            .by_number
            .get(&(org.to_owned(), pipeline.to_owned(), number))?;
        let build = store.builds.get(handle)?;
        let entry = store
            .pipelines
            .get(&(build.org.clone(), build.pipeline.clone()))?;
        let body = json!({
            "event": event.as_str(),
            "build": self.inner.build_json(build, entry, JobsShown::None, false),
            "pipeline": entry.json.clone(),
            "sender": sender_json(),
        });
        Some(WebhookDelivery::new(event, body.to_string(), auth))
    }

    /// A `ping` webhook delivery for organization `org`.
    pub fn ping_webhook(
        &self,
        org: &str,
        webhook_url: &str,
        auth: &WebhookAuth,
    ) -> WebhookDelivery {
        let body = json!({
            "event": "ping",
            "service": {
                "id": uuid::Uuid::new_v4().to_string(),
                "provider": "webhook",
                "settings": {"url": webhook_url},
            },
            "organization": {
                "id": uuid::Uuid::new_v4().to_string(),
                "url": format!("{}/v2/organizations/{org}", self.inner.base),
                "web_url": format!("{}/{org}", self.inner.opts.web_url_base),
                "name": org,
                "slug": org,
                "created_at": iso_millis(self.inner.now()),
            },
            "sender": sender_json(),
        });
        WebhookDelivery::new(WebhookEvent::Ping, body.to_string(), auth)
    }
}

fn sender_json() -> Value {
    json!({"id": "01902d6a-7b8c-4d9e-a0f1-b2c3d4e5f607", "name": "Webhook Owner"})
}

fn sorted_position(store: &Store, created: DateTime<Utc>, handle: usize) -> usize {
    store.order.partition_point(|&h| {
        let c = store
            .builds
            .get(h)
            .map_or(DateTime::<Utc>::MIN_UTC, Build::created);
        (c, h) < (created, handle)
    })
}

/// Store a build; `None` if its pipeline does not exist.
fn try_insert_build(store: &mut Store, mut build: Build, now: DateTime<Utc>) -> Option<Build> {
    let key = (build.org.clone(), build.pipeline.clone());
    let entry = store.pipelines.get_mut(&key)?;
    if build.number == 0 {
        build.number = entry.next_number;
    }
    entry.next_number = entry.next_number.max(build.number.saturating_add(1));
    if build.id.is_empty() {
        build.id = uuid::Uuid::new_v4().to_string();
    }
    build.settle_times(now);
    let handle = store.builds.len();
    let created = build.created();
    store.by_number.insert(
        (build.org.clone(), build.pipeline.clone(), build.number),
        handle,
    );
    store.builds.push(build.clone());
    let pos = sorted_position(store, created, handle);
    store.order.insert(pos, handle);
    Some(build)
}

/// Store a build added through the control API; a missing pipeline is a mistake in the test.
fn insert_build(store: &mut Store, build: Build, now: DateTime<Utc>) -> Build {
    let (org, pipeline) = (build.org.clone(), build.pipeline.clone());
    match try_insert_build(store, build, now) {
        Some(b) => b,
        None => panic!(
            "FakeBuildkite::add_build: pipeline {org}/{pipeline} was not added (add_pipeline first)"
        ),
    }
}

/// The state of a build that started already and whose jobs say `state`: `running` while a
/// job waits for an agent (it does not go back to `scheduled`).
fn running_again(state: Option<BuildState>) -> BuildState {
    match state {
        None | Some(BuildState::Scheduled) => BuildState::Running,
        Some(s) => s,
    }
}

fn graphql_id(kind: &str, id: &str) -> String {
    base64(format!("{kind}---{id}").as_bytes())
}

fn user_json(id: &str, name: &str, email: &str) -> Value {
    json!({
        "id": id,
        "graphql_id": graphql_id("User", id),
        "name": name,
        "email": email,
        "avatar_url": "https://www.gravatar.com/avatar/0f1e2d3c4b5a69788796a5b4c3d2e1f0",
        "created_at": "2023-02-14T08:15:30.000Z",
    })
}

fn pipeline_json(base: &str, web: &str, p: &Pipeline) -> Value {
    let api = format!("{base}/v2/organizations/{}/pipelines/{}", p.org, p.slug);
    let provider = json!({
        "id": "bitbucket_server",
        "settings": {
            "trigger_mode": "code",
            "build_pull_requests": true,
            "build_tags": false,
            "publish_commit_status": false,
            "repository": p.repository,
        },
        "webhook_url": "",
    });
    let steps = json!([{
        "type": "script",
        "name": ":pipeline:",
        "command": "buildkite-agent pipeline upload",
        "artifact_paths": null,
        "branch_configuration": null,
        "env": {},
        "timeout_in_minutes": null,
        "agent_query_rules": [],
        "concurrency": null,
        "parallelism": null,
    }]);
    let created_by = user_json(
        "018f2b7e-1c3d-4a5b-8e9f-0a1b2c3d4e5f",
        "Dana Developer",
        "dana@acme-inc.example",
    );
    let mut v = json!({
        "id": p.id,
        "graphql_id": graphql_id("Pipeline", &p.id),
        "url": api,
        "web_url": format!("{web}/{}/{}", p.org, p.slug),
        "name": p.name,
        "description": null,
        "slug": p.slug,
        "repository": p.repository,
        "cluster_id": null,
        "branch_configuration": null,
        "default_branch": p.default_branch,
        "skip_queued_branch_builds": false,
        "skip_queued_branch_builds_filter": null,
        "cancel_running_branch_builds": false,
        "cancel_running_branch_builds_filter": null,
        "allow_rebuilds": true,
        "builds_url": format!("{api}/builds"),
        "badge_url": format!("https://badge.buildkite.com/{}.svg", p.id.replace('-', "")),
        "created_at": iso_millis(p.created_at),
        "archived_at": null,
        "env": null,
        "visibility": "private",
        "tags": null,
        "configuration": "steps:\n  - command: \"buildkite-agent pipeline upload\"\n    label: \":pipeline:\"\n",
    });
    if let Some(obj) = v.as_object_mut() {
        obj.insert("provider".to_owned(), provider);
        obj.insert("steps".to_owned(), steps);
        obj.insert("created_by".to_owned(), created_by);
        for counter in [
            "scheduled_builds_count",
            "running_builds_count",
            "scheduled_jobs_count",
            "running_jobs_count",
            "waiting_jobs_count",
        ] {
            obj.insert(counter.to_owned(), json!(0));
        }
    }
    v
}

/// Which jobs a build answer carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobsShown {
    /// No `jobs` field (webhooks, `exclude_jobs=true`).
    None,
    /// The jobs that were not retried (the default).
    Current,
    /// Every job (`include_retried_jobs=true`).
    WithRetried,
}

impl JobsShown {
    fn from_flags(exclude_jobs: bool, include_retried: bool) -> Self {
        match (exclude_jobs, include_retried) {
            (true, _) => Self::None,
            (false, false) => Self::Current,
            (false, true) => Self::WithRetried,
        }
    }
}

fn opt_time(t: Option<DateTime<Utc>>) -> Value {
    t.map_or(Value::Null, |t| Value::String(iso_millis(t)))
}

impl Inner {
    fn build_json(
        &self,
        b: &Build,
        entry: &PipelineEntry,
        jobs: JobsShown,
        with_pipeline: bool,
    ) -> Value {
        let api = format!(
            "{}/v2/organizations/{}/pipelines/{}/builds/{}",
            self.base, b.org, b.pipeline, b.number
        );
        let mut v = json!({
            "id": b.id,
            "graphql_id": graphql_id("Build", &b.id),
            "url": api,
            "web_url": format!("{}/{}/{}/builds/{}", self.opts.web_url_base, b.org, b.pipeline, b.number),
            "number": b.number,
            "state": b.state.as_str(),
            "cancel_reason": b.cancel_reason,
            "blocked": b.blocked,
            "blocked_state": b.blocked_state,
            "message": b.message,
            "commit": b.commit,
            "branch": b.branch,
            "tag": b.tag,
            "env": b.env,
            "source": b.source,
            "author": b.author,
            "creator": b.creator,
            "created_at": opt_time(b.created_at),
            "scheduled_at": opt_time(b.scheduled_at),
            "started_at": opt_time(b.started_at),
            "finished_at": opt_time(b.finished_at),
            "meta_data": b.meta_data,
            "pull_request": b.pull_request,
            "rebuilt_from": null,
        });
        if let Some(obj) = v.as_object_mut() {
            let web_url = format!(
                "{}/{}/{}/builds/{}",
                self.opts.web_url_base, b.org, b.pipeline, b.number
            );
            let shown = |j: &&Job| jobs == JobsShown::WithRetried || !j.retried;
            if jobs != JobsShown::None {
                let list: Vec<Value> = b
                    .jobs
                    .iter()
                    .filter(shown)
                    .map(|j| j.json(&web_url))
                    .collect();
                obj.insert("jobs".to_owned(), Value::Array(list));
            }
            if with_pipeline {
                obj.insert("pipeline".to_owned(), entry.json.clone());
            }
        }
        v
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP

fn message(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "message": msg.into() }))).into_response()
}

fn not_found() -> Response {
    message(StatusCode::NOT_FOUND, "Not Found")
}

fn with_headers(mut resp: Response, headers: HeaderMap) -> Response {
    resp.headers_mut().extend(headers);
    resp
}

fn rate_limited_response(
    scope: &str,
    limit: u32,
    current: u32,
    reset: u64,
    headers: HeaderMap,
) -> Response {
    let mut resp = (
        StatusCode::TOO_MANY_REQUESTS,
        axum::Json(json!({
            "message": format!("You have exceeded your API rate limit. Please wait {reset} seconds before making more requests."),
            "scope": scope,
            "limit": limit,
            "current": current,
            "reset": reset,
        })),
    )
        .into_response();
    let h = resp.headers_mut();
    if headers.is_empty() {
        // An injected 429: still tell the client when to come back.
        h.insert("ratelimit-scope", HeaderValue::from_static("rest"));
        h.insert("ratelimit-remaining", HeaderValue::from(0));
        h.insert("ratelimit-limit", HeaderValue::from(limit));
        h.insert("ratelimit-reset", HeaderValue::from(reset));
        h.insert(
            "ratelimit-warning",
            HeaderValue::from_static("You have exceeded your API rate limit."),
        );
    } else {
        h.extend(headers);
    }
    resp
}

/// What a request that passed the checks may do next.
struct Granted {
    token: ApiToken,
    headers: HeaderMap,
}

impl Inner {
    /// Authentication, organization, rate limits and scope, in Buildkite's order.
    fn authorize(
        &self,
        headers: &HeaderMap,
        org: Option<&str>,
        scope: Option<&str>,
    ) -> Result<Granted, Response> {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, rest) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            });
        let Some(token) = presented.and_then(|p| self.opts.tokens.iter().find(|t| t.token == p))
        else {
            return Err(message(
                StatusCode::UNAUTHORIZED,
                "Authentication required. Please supply a valid API Access Token: https://buildkite.com/docs/apis/rest-api#authentication",
            ));
        };
        let mut store = lock(&self.store);
        if let Some(org) = org
            && !store.orgs.contains(org)
        {
            return Err(message(StatusCode::NOT_FOUND, "No organization found"));
        }
        let now = Instant::now();
        let window = self.opts.rate_limit_window;
        let mut out = HeaderMap::new();
        let mut over: Option<(&str, u32, u32, u64)> = None;
        if let Some(org) = org {
            let w = tick(&mut store.org_windows, org, now, window);
            let reset = reset_secs(w, now, window);
            let remaining = self.opts.rate_limit.saturating_sub(w.count);
            put(
                &mut out,
                "ratelimit-scope",
                HeaderValue::from_static("rest"),
            );
            put(&mut out, "ratelimit-remaining", remaining.into());
            put(&mut out, "ratelimit-limit", self.opts.rate_limit.into());
            put(&mut out, "ratelimit-reset", reset.into());
            if w.count > self.opts.rate_limit {
                put(
                    &mut out,
                    "ratelimit-warning",
                    HeaderValue::from_static("You have exceeded your API rate limit."),
                );
                over = Some(("rest", self.opts.rate_limit, w.count, reset));
            }
        }
        if let Some(limit) = self.opts.user_rate_limit {
            let w = tick(&mut store.user_windows, &token.token, now, window);
            let reset = reset_secs(w, now, window);
            put(
                &mut out,
                "ratelimit-user-scope",
                HeaderValue::from_static("rest_user"),
            );
            put(
                &mut out,
                "ratelimit-user-remaining",
                limit.saturating_sub(w.count).into(),
            );
            put(&mut out, "ratelimit-user-limit", limit.into());
            put(&mut out, "ratelimit-user-reset", reset.into());
            if w.count > limit {
                put(
                    &mut out,
                    "ratelimit-user-warning",
                    HeaderValue::from_static("You have exceeded your API rate limit."),
                );
                over = over.or(Some(("rest_user", limit, w.count, reset)));
            }
        }
        drop(store);
        if let Some((scope, limit, current, reset)) = over {
            return Err(rate_limited_response(scope, limit, current, reset, out));
        }
        if let Some(scope) = scope
            && !token.has_scope(scope)
        {
            return Err(with_headers(
                message(
                    StatusCode::FORBIDDEN,
                    format!("Your access token does not have the {scope} scope"),
                ),
                out,
            ));
        }
        Ok(Granted {
            token: token.clone(),
            headers: out,
        })
    }
}

fn put(h: &mut HeaderMap, name: &'static str, v: HeaderValue) {
    h.insert(HeaderName::from_static(name), v);
}

fn tick<'a>(
    map: &'a mut HashMap<String, Window>,
    key: &str,
    now: Instant,
    window: Duration,
) -> &'a Window {
    let w = map.entry(key.to_owned()).or_insert(Window {
        start: now,
        count: 0,
    });
    if now.duration_since(w.start) >= window {
        *w = Window {
            start: now,
            count: 0,
        };
    }
    w.count = w.count.saturating_add(1);
    w
}

fn reset_secs(w: &Window, now: Instant, window: Duration) -> u64 {
    let left = window.saturating_sub(now.duration_since(w.start));
    let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
    secs.max(1)
}

/// Every answer carries Buildkite's `Date` (from its clock, which may differ from this
/// machine's: [`FakeBuildkiteOptions::clock_offset`]).
async fn dispatch(State(inner): State<Arc<Inner>>, req: Request) -> Response {
    let date = inner.now().format("%a, %d %b %Y %H:%M:%S GMT").to_string();
    let mut resp = route(&inner, req).await;
    if let Ok(v) = HeaderValue::from_str(&date) {
        resp.headers_mut().insert(header::DATE, v);
    }
    resp
}

async fn route(inner: &Arc<Inner>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let segs = segments(parts.uri.path());
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let query = query_pairs(parts.uri.query());
    let method = parts.method.clone();
    let h = &parts.headers;
    match segs.as_slice() {
        [] if method == Method::GET => (
            StatusCode::OK,
            axum::Json(json!({"message": "🛠", "timestamp": inner.now().timestamp()})),
        )
            .into_response(),
        ["v2", "access-token"] if method == Method::GET => match inner.authorize(h, None, None) {
            Err(r) => r,
            Ok(g) => with_headers(
                axum::Json(
                    json!({"uuid": uuid::Uuid::new_v4().to_string(), "scopes": g.token.scopes}),
                )
                .into_response(),
                g.headers,
            ),
        },
        ["v2", "organizations", org, "builds"] if method == Method::GET => {
            match inner.authorize(h, Some(org), Some("read_builds")) {
                Err(r) => r,
                Ok(g) => with_headers(
                    inner.list_builds(org, None, &query, parts.uri.path()),
                    g.headers,
                ),
            }
        }
        ["v2", "organizations", org, "pipelines", slug] if method == Method::GET => {
            match inner.authorize(h, Some(org), Some("read_pipelines")) {
                Err(r) => r,
                Ok(g) => {
                    let store = lock(&inner.store);
                    let resp = match store
                        .pipelines
                        .get(&((*org).to_owned(), (*slug).to_owned()))
                    {
                        Some(e) => axum::Json(e.json.clone()).into_response(),
                        None => message(StatusCode::NOT_FOUND, "No pipeline found"),
                    };
                    with_headers(resp, g.headers)
                }
            }
        }
        ["v2", "organizations", org, "pipelines", slug, "builds"] if method == Method::GET => {
            match inner.authorize(h, Some(org), Some("read_builds")) {
                Err(r) => r,
                Ok(g) => with_headers(
                    inner.list_builds(org, Some(slug), &query, parts.uri.path()),
                    g.headers,
                ),
            }
        }
        ["v2", "organizations", org, "pipelines", slug, "builds"] if method == Method::POST => {
            match inner.authorize(h, Some(org), Some("write_builds")) {
                Err(r) => r,
                Ok(g) => {
                    let resp = match read_body(body, 1 << 20).await {
                        Err(()) => message(StatusCode::PAYLOAD_TOO_LARGE, "Request body too large"),
                        Ok(bytes) => inner.create_build(org, slug, &bytes, &g.token),
                    };
                    with_headers(resp, g.headers)
                }
            }
        }
        [
            "v2",
            "organizations",
            org,
            "pipelines",
            slug,
            "builds",
            number,
        ] if method == Method::GET => match inner.authorize(h, Some(org), Some("read_builds")) {
            Err(r) => r,
            Ok(g) => with_headers(inner.get_build(org, slug, number, &query), g.headers),
        },
        [
            "v2",
            "organizations",
            org,
            "pipelines",
            slug,
            "builds",
            number,
            "jobs",
            job,
            "retry",
        ] if method == Method::PUT => match inner.authorize(h, Some(org), Some("write_builds")) {
            Err(r) => r,
            Ok(g) => with_headers(inner.retry_job_answer(org, slug, number, job), g.headers),
        },
        [
            "v2",
            "organizations",
            org,
            "pipelines",
            slug,
            "builds",
            number,
            "annotations",
        ] if method == Method::GET => match inner.authorize(h, Some(org), Some("read_builds")) {
            Err(r) => r,
            Ok(g) => with_headers(inner.list_annotations(org, slug, number, &query), g.headers),
        },
        [
            "v2",
            "organizations",
            org,
            "pipelines",
            slug,
            "builds",
            number,
            "retry_failed_jobs",
        ] if method == Method::PUT => match inner.authorize(h, Some(org), Some("write_builds")) {
            Err(r) => r,
            Ok(g) => with_headers(inner.retry_failed_jobs(org, slug, number), g.headers),
        },
        _ => not_found(),
    }
}

impl Inner {
    /// `GET .../builds/{n}/annotations`: newest first, `per_page` (1-100, default 30) with
    /// `page` and a `Link` header, as Buildkite pages.
    fn list_annotations(
        &self,
        org: &str,
        slug: &str,
        number: &str,
        query: &[(String, String)],
    ) -> Response {
        let Ok(n) = number.parse::<u64>() else {
            return message(StatusCode::NOT_FOUND, "No build found");
        };
        let store = lock(&self.store);
        if !store
            .by_number
            .contains_key(&(org.to_owned(), slug.to_owned(), n))
        {
            return message(StatusCode::NOT_FOUND, "No build found");
        }
        let q = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let per_page = match q("per_page").map(str::parse::<usize>) {
            None => 30,
            Some(Ok(p)) if (1..=100).contains(&p) => p,
            Some(_) => {
                return message(
                    StatusCode::BAD_REQUEST,
                    "per_page must be between 1 and 100",
                );
            }
        };
        let page = q("page")
            .and_then(|p| p.parse::<usize>().ok())
            .unwrap_or(1)
            .max(1);
        let mut all: Vec<Value> = store
            .annotations
            .get(&(org.to_owned(), slug.to_owned(), n))
            .cloned()
            .unwrap_or_default();
        all.reverse();
        let items: Vec<Value> = all
            .iter()
            .skip((page - 1) * per_page)
            .take(per_page)
            .cloned()
            .collect();
        let mut resp = axum::Json(Value::Array(items)).into_response();
        if page * per_page < all.len() {
            let link = format!(
                "<{}/v2/organizations/{org}/pipelines/{slug}/builds/{n}/annotations?page={}&per_page={per_page}>; rel=\"next\"",
                self.base,
                page + 1
            );
            if let Ok(v) = HeaderValue::from_str(&link) {
                resp.headers_mut().insert(header::LINK, v);
            }
        }
        resp
    }
}

impl FakeBuildkite {
    /// Adds an annotation to a build (as `buildkite-agent annotate` would): `style` is
    /// `success`, `info`, `warning` or `error`; `body_html` is what Buildkite renders.
    pub fn add_annotation(
        &self,
        org: &str,
        pipeline: &str,
        number: u64,
        style: &str,
        context: &str,
        body_html: &str,
    ) {
        let mut store = lock(&self.inner.store);
        let list = store
            .annotations
            .entry((org.to_owned(), pipeline.to_owned(), number))
            .or_default();
        let now = Utc::now().to_rfc3339();
        list.push(json!({
            "id": uuid::Uuid::new_v4().to_string(),
            "context": context,
            "style": style,
            "body_html": body_html,
            "created_at": now,
            "updated_at": now,
        }));
    }
}

/// A parsed builds listing query.
struct ListQuery {
    page: usize,
    per_page: usize,
    created_from: Option<DateTime<Utc>>,
    created_to: Option<DateTime<Utc>>,
    finished_from: Option<DateTime<Utc>>,
    states: Vec<BuildState>,
    want_blocked: bool,
    branches: Vec<String>,
    commits: Vec<String>,
    creator: Option<String>,
    meta: Vec<(String, String)>,
    exclude_jobs: bool,
    include_retried_jobs: bool,
    exclude_pipeline: bool,
}

/// Parse an ISO 8601 / RFC 3339 time as Buildkite's filters take it: a full date-time with an
/// offset or `Z`, or a bare date (midnight UTC).
fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    if let Ok(t) = DateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f%z") {
        return Some(t.with_timezone(&Utc));
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
}

fn parse_bool(s: &str) -> bool {
    matches!(s, "true" | "1" | "yes")
}

impl ListQuery {
    fn jobs_shown(&self) -> JobsShown {
        JobsShown::from_flags(self.exclude_jobs, self.include_retried_jobs)
    }

    fn parse(pairs: &[(String, String)]) -> Result<Self, Response> {
        let mut q = ListQuery {
            page: 1,
            per_page: DEFAULT_PER_PAGE,
            created_from: None,
            created_to: None,
            finished_from: None,
            states: Vec::new(),
            want_blocked: false,
            branches: Vec::new(),
            commits: Vec::new(),
            creator: None,
            meta: Vec::new(),
            exclude_jobs: false,
            include_retried_jobs: false,
            exclude_pipeline: false,
        };
        for (k, v) in pairs {
            match k.as_str() {
                "page" => {
                    q.page = match v.parse::<usize>() {
                        Ok(n) if n >= 1 => n,
                        _ => {
                            return Err(message(
                                StatusCode::BAD_REQUEST,
                                format!("page must be a positive integer, got {v:?}"),
                            ));
                        }
                    }
                }
                "per_page" => {
                    q.per_page = match v.parse::<usize>() {
                        Ok(n) if (1..=MAX_PER_PAGE).contains(&n) => n,
                        _ => {
                            return Err(message(
                                StatusCode::BAD_REQUEST,
                                format!(
                                    "per_page must be an integer between 1 and {MAX_PER_PAGE}, got {v:?}"
                                ),
                            ));
                        }
                    }
                }
                "created_from" | "created_to" | "finished_from" => {
                    let Some(t) = parse_time(v) else {
                        return Err(message(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            format!("{k} must be an ISO 8601 date and time, got {v:?}"),
                        ));
                    };
                    match k.as_str() {
                        "created_from" => q.created_from = Some(t),
                        "created_to" => q.created_to = Some(t),
                        _ => q.finished_from = Some(t),
                    }
                }
                "state" | "state[]" => {
                    for s in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                        if s == "finished" {
                            q.states.extend([
                                BuildState::Passed,
                                BuildState::Failed,
                                BuildState::Canceled,
                            ]);
                            q.want_blocked = true;
                        } else if let Some(st) = BuildState::parse(s) {
                            if st == BuildState::Blocked {
                                q.want_blocked = true;
                            }
                            q.states.push(st);
                        } else {
                            return Err(message(
                                StatusCode::UNPROCESSABLE_ENTITY,
                                format!("{s:?} is not a valid build state"),
                            ));
                        }
                    }
                }
                "branch" | "branch[]" => q.branches.push(v.clone()),
                "commit" | "commit[]" => q.commits.push(v.clone()),
                "creator" => q.creator = Some(v.clone()),
                "exclude_jobs" => q.exclude_jobs = parse_bool(v),
                "include_retried_jobs" => q.include_retried_jobs = parse_bool(v),
                "exclude_pipeline" => q.exclude_pipeline = parse_bool(v),
                other => {
                    if let Some(key) = other
                        .strip_prefix("meta_data[")
                        .and_then(|r| r.strip_suffix(']'))
                    {
                        q.meta.push((key.to_owned(), v.clone()));
                    }
                    // Anything else (include_retried_jobs, include_paused, api_key ...) is
                    // accepted and has no effect here.
                }
            }
        }
        Ok(q)
    }

    fn matches(&self, b: &Build) -> bool {
        let created = b.created();
        if self.created_from.is_some_and(|t| created < t) {
            return false;
        }
        if self.created_to.is_some_and(|t| created >= t) {
            return false;
        }
        if let Some(t) = self.finished_from
            && b.finished_at.is_none_or(|f| f < t)
        {
            return false;
        }
        let state_ok = self.states.is_empty()
            || self.states.contains(&b.state)
            || (self.want_blocked && b.blocked);
        if !state_ok {
            return false;
        }
        if !self.branches.is_empty() && !self.branches.iter().any(|p| glob(p, &b.branch)) {
            return false;
        }
        if !self.commits.is_empty() && !self.commits.contains(&b.commit) {
            return false;
        }
        if let Some(c) = &self.creator
            && b.creator
                .as_ref()
                .and_then(|v| v.get("id"))
                .and_then(Value::as_str)
                != Some(c.as_str())
        {
            return false;
        }
        self.meta
            .iter()
            .all(|(k, v)| b.meta_data.get(k).and_then(Value::as_str) == Some(v.as_str()))
    }
}

/// `*` matches any run of characters (Buildkite's branch filter wildcards).
fn glob(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && p[pi] != '*' && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

impl Inner {
    fn list_builds(
        &self,
        org: &str,
        pipeline: Option<&str>,
        pairs: &[(String, String)],
        path: &str,
    ) -> Response {
        let q = match ListQuery::parse(pairs) {
            Ok(q) => q,
            Err(r) => return r,
        };
        let store = lock(&self.store);
        if let Some(slug) = pipeline
            && !store
                .pipelines
                .contains_key(&(org.to_owned(), slug.to_owned()))
        {
            return message(StatusCode::NOT_FOUND, "No pipeline found");
        }
        let skip = (q.page - 1).saturating_mul(q.per_page);
        if let Some(depth) = self.opts.max_list_depth
            && skip >= depth
        {
            return message(
                StatusCode::BAD_REQUEST,
                "Listing builds this deep is not supported. Please narrow your query using filters such as branch or created_from.",
            );
        }
        let mut total = 0usize;
        let mut page = Vec::with_capacity(q.per_page);
        for &h in store.order.iter().rev() {
            let Some(b) = store.builds.get(h) else {
                continue;
            };
            if b.org != org || pipeline.is_some_and(|p| p != b.pipeline) || !q.matches(b) {
                continue;
            }
            if total >= skip && page.len() < q.per_page {
                page.push(h);
            }
            total += 1;
        }
        let body: Vec<Value> = page
            .iter()
            .filter_map(|&h| {
                let b = store.builds.get(h)?;
                let e = store.pipelines.get(&(b.org.clone(), b.pipeline.clone()))?;
                Some(self.build_json(b, e, q.jobs_shown(), !q.exclude_pipeline))
            })
            .collect();
        drop(store);
        let last = total.div_ceil(q.per_page).max(1);
        let mut resp = axum::Json(Value::Array(body)).into_response();
        if let Some(link) = self.link_header(path, pairs, q.page, last)
            && let Ok(v) = HeaderValue::from_str(&link)
        {
            resp.headers_mut().insert(header::LINK, v);
        }
        resp
    }

    fn link_header(
        &self,
        path: &str,
        pairs: &[(String, String)],
        page: usize,
        last: usize,
    ) -> Option<String> {
        let kept: Vec<&(String, String)> = pairs.iter().filter(|(k, _)| k != "page").collect();
        let fault = lock(&self.link_fault).clone();
        let url_for = |n: u64| {
            let mut ser = url::form_urlencoded::Serializer::new(String::new());
            for (k, v) in &kept {
                ser.append_pair(k, v);
            }
            ser.append_pair("page", &n.to_string());
            let base = match &fault {
                Some(LinkFault::OtherHost(other)) => other.trim_end_matches('/'),
                _ => self.base.as_str(),
            };
            format!("{}{}?{}", base, path, ser.finish())
        };
        let (page, last) = (page as u64, last as u64);
        let mut rels = Vec::new();
        if page < last {
            let named_last = match fault {
                Some(LinkFault::LastPage(n)) => n,
                _ => last,
            };
            rels.push(format!("<{}>; rel=\"next\"", url_for(page + 1)));
            rels.push(format!("<{}>; rel=\"last\"", url_for(named_last)));
        }
        if page > 1 {
            rels.push(format!("<{}>; rel=\"first\"", url_for(1)));
            rels.push(format!("<{}>; rel=\"prev\"", url_for((page - 1).min(last))));
        }
        (!rels.is_empty()).then(|| rels.join(", "))
    }

    fn retry_job(
        &self,
        org: &str,
        pipeline: &str,
        number: u64,
        job_id: &str,
    ) -> Result<Job, RetryRefused> {
        let now = self.now();
        let mut store = lock(&self.store);
        let refused = |status, msg: &str| RetryRefused {
            status,
            message: msg.to_owned(),
        };
        let handle = *store
            .by_number
            .get(&(org.to_owned(), pipeline.to_owned(), number))
            .ok_or_else(|| refused(404, "No build found"))?;
        let build = store
            .builds
            .get_mut(handle)
            .ok_or_else(|| refused(404, "No build found"))?;
        let job = jobs::retry(&mut build.jobs, build.state, job_id)?;
        // The same build runs again: back to a non-terminal state, a new start, no finish.
        // (Its first finish may be one the fake made up ahead of now: start after it.)
        let start = build
            .finished_at
            .map_or(now, |f| now.max(f + chrono::Duration::milliseconds(1)));
        build.state = running_again(jobs::build_state_from(&build.jobs));
        build.started_at = Some(start);
        build.finished_at = None;
        build.settle_times(now);
        Ok(job)
    }

    /// `PUT .../builds/{number}/jobs/{id}/retry`: 200 and the new job.
    fn retry_job_answer(&self, org: &str, pipeline: &str, number: &str, job_id: &str) -> Response {
        let Ok(number) = number.parse::<u64>() else {
            return message(StatusCode::NOT_FOUND, "No build found");
        };
        match self.retry_job(org, pipeline, number, job_id) {
            Ok(job) => {
                let web = format!(
                    "{}/{org}/{pipeline}/builds/{number}",
                    self.opts.web_url_base
                );
                axum::Json(job.json(&web)).into_response()
            }
            Err(r) => message(
                StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_REQUEST),
                r.message,
            ),
        }
    }

    /// `PUT .../builds/{number}/retry_failed_jobs`: 202 and how many jobs were retried (every
    /// failed or timed-out job that was not retried yet).
    fn retry_failed_jobs(&self, org: &str, pipeline: &str, number: &str) -> Response {
        let Some(number) = number.parse::<u64>().ok() else {
            return message(StatusCode::NOT_FOUND, "No build found");
        };
        let failed: Vec<String> = {
            let store = lock(&self.store);
            let Some(build) = store
                .by_number
                .get(&(org.to_owned(), pipeline.to_owned(), number))
                .and_then(|&h| store.builds.get(h))
            else {
                return message(StatusCode::NOT_FOUND, "No build found");
            };
            build
                .jobs
                .iter()
                .filter(|j| !j.retried && matches!(j.state, JobState::Failed | JobState::TimedOut))
                .map(|j| j.id.clone())
                .collect()
        };
        let mut count = 0;
        for id in failed {
            match self.retry_job(org, pipeline, number, &id) {
                Ok(_) => count += 1,
                Err(r) if r.status == 422 => {
                    return message(StatusCode::UNPROCESSABLE_ENTITY, r.message);
                }
                Err(_) => {}
            }
        }
        (
            StatusCode::ACCEPTED,
            axum::Json(json!({ "retried_jobs_count": count })),
        )
            .into_response()
    }

    fn get_build(
        &self,
        org: &str,
        slug: &str,
        number: &str,
        pairs: &[(String, String)],
    ) -> Response {
        let store = lock(&self.store);
        let Some(entry) = store.pipelines.get(&(org.to_owned(), slug.to_owned())) else {
            return message(StatusCode::NOT_FOUND, "No pipeline found");
        };
        let Some(build) = number
            .parse::<u64>()
            .ok()
            .and_then(|n| store.by_number.get(&(org.to_owned(), slug.to_owned(), n)))
            .and_then(|&h| store.builds.get(h))
        else {
            return message(StatusCode::NOT_FOUND, "No build found");
        };
        let exclude = |name: &str| pairs.iter().any(|(k, v)| k == name && parse_bool(v));
        let v = self.build_json(
            build,
            entry,
            JobsShown::from_flags(exclude("exclude_jobs"), exclude("include_retried_jobs")),
            !exclude("exclude_pipeline"),
        );
        axum::Json(v).into_response()
    }

    fn create_build(&self, org: &str, slug: &str, body: &[u8], token: &ApiToken) -> Response {
        if !lock(&self.store)
            .pipelines
            .contains_key(&(org.to_owned(), slug.to_owned()))
        {
            return message(StatusCode::NOT_FOUND, "No pipeline found");
        }
        let parsed: Value = match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => {
                return message(
                    StatusCode::BAD_REQUEST,
                    format!("Problems parsing JSON: {e}"),
                );
            }
        };
        let Some(obj) = parsed.as_object() else {
            return message(StatusCode::BAD_REQUEST, "Body should be a JSON object");
        };
        let mut errors = Vec::new();
        let mut required = |field: &str| -> Option<String> {
            match obj.get(field) {
                Some(Value::String(s)) if !s.trim().is_empty() => Some(s.clone()),
                None | Some(Value::Null) => {
                    errors.push(json!({"field": field, "code": "missing_field", "message": format!("{field} can't be blank")}));
                    None
                }
                Some(Value::String(_)) => {
                    errors.push(json!({"field": field, "code": "missing", "message": format!("{field} can't be blank")}));
                    None
                }
                Some(_) => {
                    errors.push(json!({"field": field, "code": "invalid", "message": format!("{field} must be a string")}));
                    None
                }
            }
        };
        let commit = required("commit");
        let branch = required("branch");
        let mut check_object = |field: &str, strings_only: bool| -> Map<String, Value> {
            match obj.get(field) {
                None | Some(Value::Null) => Map::new(),
                Some(Value::Object(m)) => {
                    if strings_only && m.values().any(|v| !v.is_string()) {
                        errors.push(json!({"field": field, "code": "invalid", "message": format!("{field} values must be strings")}));
                    }
                    m.clone()
                }
                Some(_) => {
                    errors.push(json!({"field": field, "code": "invalid", "message": format!("{field} must be an object")}));
                    Map::new()
                }
            }
        };
        let env = check_object("env", false);
        let meta_data = check_object("meta_data", true);
        let author = match obj.get("author") {
            None | Some(Value::Null) => None,
            Some(Value::Object(a)) => Some(Value::Object(a.clone())),
            Some(_) => {
                errors.push(json!({"field": "author", "code": "invalid", "message": "author must be an object with name and email"}));
                None
            }
        };
        let msg = match obj.get("message") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => {
                errors.push(json!({"field": "message", "code": "invalid", "message": "message must be a string"}));
                None
            }
        };
        let (Some(commit), Some(branch), true) = (commit, branch, errors.is_empty()) else {
            return (
                StatusCode::UNPROCESSABLE_ENTITY,
                axum::Json(json!({"message": "Validation Failed", "errors": errors})),
            )
                .into_response();
        };
        let author = author.unwrap_or_else(
            || json!({"username": null, "name": token.user_name, "email": token.user_email}),
        );
        let pull_request = obj.get("pull_request_id").map(|id| {
            json!({
                "id": match id { Value::String(s) => s.clone(), other => other.to_string() },
                "base": obj.get("pull_request_base_branch").cloned().unwrap_or(Value::Null),
                "repository": obj.get("pull_request_repository").cloned().unwrap_or(Value::Null),
            })
        });
        let build = Build {
            source: "api".to_owned(),
            env,
            meta_data,
            author: Some(author),
            creator: Some(user_json(
                &token.user_id,
                &token.user_name,
                &token.user_email,
            )),
            pull_request,
            message: msg.unwrap_or_default(),
            ..Build::new(org, slug, commit, branch)
        };
        let mut store = lock(&self.store);
        let Some(stored) = try_insert_build(&mut store, build, self.now()) else {
            return message(StatusCode::NOT_FOUND, "No pipeline found");
        };
        if let Some(&h) =
            store
                .by_number
                .get(&(stored.org.clone(), stored.pipeline.clone(), stored.number))
        {
            store.created_via_api.push(h);
        }
        let Some(entry) = store.pipelines.get(&(org.to_owned(), slug.to_owned())) else {
            return not_found();
        };
        let v = self.build_json(&stored, entry, JobsShown::Current, true);
        (StatusCode::CREATED, axum::Json(v)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_matches_like_buildkite_branch_filters() {
        assert!(glob("main", "main"));
        assert!(!glob("main", "main2"));
        assert!(glob("*dev*", "feature/dev-1"));
        assert!(glob("release/*", "release/1.2"));
        assert!(!glob("release/*", "hotfix/1.2"));
        assert!(glob("*", ""));
    }

    #[test]
    fn times_parse_as_iso_8601() {
        assert!(parse_time("2025-01-08T23:22:05Z").is_some());
        assert!(parse_time("2025-01-08T23:22:05.123+02:00").is_some());
        assert!(parse_time("2025-01-08").is_some());
        // An unencoded '+' arrives as a space: not a valid time.
        assert!(parse_time("2025-01-08T23:22:05 00:00").is_none());
        assert!(parse_time("yesterday").is_none());
    }

    #[test]
    fn states_round_trip() {
        for s in BuildState::ALL {
            assert_eq!(BuildState::parse(s.as_str()), Some(s));
        }
        assert_eq!(BuildState::parse("finished"), None);
    }
}
