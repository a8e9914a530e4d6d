//! The releases service: cut, deploy, roll back, freeze and status updates, applied to the store
//! and to Buildkite. Decisions come from [`super::state`] and [`super::version`]; this module
//! only reads, decides through them and writes, retrying lost compare-and-sets.
//!
//! # Nothing half-done
//!
//! A record is written *before* its Buildkite build is requested, so a version or an
//! environment's lock is reserved even when two requests race. The record starts in a state
//! that claims nothing (`pending`); only once Buildkite answered 201 and the build is linked
//! does a candidate become `building` (a deployment is moved by its build's own states).
//! When Buildkite certainly created nothing (it refused with a 4xx, or the connection was
//! refused), the record is finished at once as a failure with the reason (`failed` candidate,
//! `error` deployment, which also releases the environment), and the error is returned (422 /
//! 502). A retry then cuts the next candidate (or deploys again); nothing stays `building` or
//! locked.
//!
//! # One cut or deployment, one build
//!
//! A request Buildkite may have acted on although kitebridge never saw the answer (a timeout, a
//! connection lost mid-request, a 5xx) follows the trigger rules' discipline
//! ([`crate::rules::fire`]): the record written before the request is the write-ahead mark, and
//! the build is looked up by its meta-data ([`META_CANDIDATE`], [`META_DEPLOYMENT`]) among the
//! builds of its pipeline created since the record. It is looked up at once; if it is not (yet)
//! there, the record stays `pending` (kitebridge does not know whether the build exists, and a
//! pending deployment keeps its environment), the answer is a 502 saying so, and the next call
//! that would cut the same version at the same commit and branch, or deploy the same candidate
//! to the same environment, whatever its Idempotency-Key, resumes that record: it looks for the
//! build first and creates it only if it is not there. The requests for one record's build are
//! serialised by a store lease ([`BUILD_CLAIM_LEASE`]), so concurrent calls cannot both create
//! it; an attempt is cut off at [`BUILD_ATTEMPT_BUDGET`], well inside the lease. After a failure
//! that leaves the build unknown the lease is kept until it lapses (a retry meanwhile is told to
//! wait, 409 `build_in_progress`), so a request Buildkite applies late lands before anyone looks.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};

use super::model::{
    BuildLink, BuildRef, Candidate, CandidateState, Deployment, DeploymentStatus, Environment,
    EnvironmentState, PipelineRef, Project, Release, VersionScheme,
};
use super::state::{
    self, NoRollback, PatchDecision, candidate_advances, changes_environment,
    environment_after_change,
};
use super::version::{self, Bump};
use crate::buildkite::Build;
use crate::buildkite::client::{BuildkiteClient, BuildkiteError};
use crate::net::SendError;
use crate::rules::fire::{create_or_find, find_build, may_have_acted};
use crate::store::{IdempotencyBegin, IdempotencyStore, Page, ReleaseStore, StoreError, Versioned};

/// Read-decide-write attempts before giving up with [`ReleaseError::Contention`]. Each lost
/// attempt means another request made progress (e.g. took the version being cut).
const ATTEMPTS: usize = 32;

/// Buildkite meta-data keys that tie a build back to what kitebridge created it for.
pub const META_CANDIDATE: &str = "kitebridge:candidate";
pub const META_DEPLOYMENT: &str = "kitebridge:deployment";

/// Store scope of the leases that serialise the requests for one record's build, keyed by the
/// value of its meta-data.
const BUILD_CLAIM_SCOPE: &str = "release-build";
/// How long a build request holds its record's lease.
pub const BUILD_CLAIM_LEASE: Duration = Duration::from_secs(60);
/// Longest one attempt at a build runs (below API Gateway's 30 s, so the caller gets the answer);
/// the 35 s left of the lease are the margin for a request Buildkite applies late.
pub const BUILD_ATTEMPT_BUDGET: Duration = build_attempt_budget(BUILD_CLAIM_LEASE);

/// 5/12 of `lease` (25 s of 60 s).
const fn build_attempt_budget(lease: Duration) -> Duration {
    Duration::from_millis((lease.as_millis() as u64).saturating_mul(5) / 12)
}
/// What a 502 says when the build may exist.
const BUILD_UNKNOWN: &str = "whether Buildkite created the build is not known; the record stays \
    pending, and a retry of this request looks for the build before creating one";

/// The store capabilities the service needs: the releases, and leases for build requests.
pub trait ReleaseBackend: ReleaseStore + IdempotencyStore {}
impl<T: ReleaseStore + IdempotencyStore> ReleaseBackend for T {}

/// How one build request ended.
enum BuildOutcome {
    /// The build exists: created now, or found, created by an earlier request.
    Started(Box<Build>),
    /// Buildkite certainly created nothing: the record may be finished as a failure.
    NotCreated(ReleaseError),
    /// The build may exist, or appear later: the record stays pending.
    Unknown(ReleaseError),
    /// Another call is requesting this build right now: the record is its to finish.
    Busy(ReleaseError),
}

/// Whether a record still without a build was left so by an attempt that ended without
/// knowing whether the build exists (it noted why), or by one that is over by now (the process
/// died): then a new call for the same thing resumes it. A record younger than the lease with
/// no note is still being requested, and a racing call for the same thing is a call of its own.
fn left_unknown(error_message: Option<&str>, created_at: DateTime<Utc>, lease: Duration) -> bool {
    error_message.is_some()
        || chrono::Duration::from_std(lease).is_ok_and(|lease| created_at + lease < Utc::now())
}

/// Whether a cut at `commit` and `branch` is a retry of the cut that left `c` without a build.
fn resumes_candidate(c: &Candidate, commit: &str, branch: &str, lease: Duration) -> bool {
    c.state == CandidateState::Pending
        && c.build.is_none()
        && c.commit == commit
        && c.branch == branch
        && left_unknown(c.error_message.as_deref(), c.created_at, lease)
}

/// Why a releases request failed, as the API reports it.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    /// 400: a field of the request is wrong.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
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
    /// 409 after [`ATTEMPTS`] lost compare-and-sets.
    #[error("too many concurrent changes to the same records; retry")]
    Contention,
    /// 503 (unavailable) or 500.
    #[error("store: {0}")]
    Store(StoreError),
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
            ReleaseError::NotFound { .. } => 404,
            ReleaseError::Conflict { .. } | ReleaseError::Contention => 409,
            ReleaseError::BuildkiteRefused(_) => 422,
            ReleaseError::BuildkiteUnavailable(_) => 502,
            ReleaseError::Store(StoreError::Unavailable(_)) => 503,
            ReleaseError::Store(_) => 500,
        }
    }

    /// The `error` field of the JSON answer.
    pub fn kind(&self) -> &'static str {
        match self {
            ReleaseError::Invalid { .. } => "invalid_request",
            ReleaseError::NotFound { kind, .. } | ReleaseError::Conflict { kind, .. } => kind,
            ReleaseError::BuildkiteRefused(_) => "buildkite_refused",
            ReleaseError::BuildkiteUnavailable(_) => "buildkite_unavailable",
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

    fn not_found(kind: &'static str, message: impl Into<String>) -> Self {
        ReleaseError::NotFound {
            kind,
            message: message.into(),
        }
    }

    fn conflict(kind: &'static str, message: impl Into<String>) -> Self {
        ReleaseError::Conflict {
            kind,
            message: message.into(),
        }
    }
}

type Result<T> = std::result::Result<T, ReleaseError>;

// ---------------------------------------------------------------------------------------------
// Requests

/// `PUT /projects/{project}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectSpec {
    #[serde(default)]
    pub build_pipeline: Option<PipelineRef>,
    #[serde(default)]
    pub environments: Vec<Environment>,
    #[serde(default)]
    pub version_scheme: VersionScheme,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// `POST /projects/{project}/releases`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CutRequest {
    pub commit: String,
    pub branch: String,
    #[serde(default)]
    pub version: Option<String>,
    /// Which part of a semver version the next version bumps when `version` is absent.
    #[serde(default)]
    pub bump: Bump,
}

/// `POST /projects/{project}/environments/{env}/deployments`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployRequest {
    pub release_candidate_version: String,
    #[serde(default)]
    pub force: bool,
}

/// `PATCH /projects/{project}/environments/{env}/deployments`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusRequest {
    pub release_candidate_version: String,
    pub status: String,
    #[serde(default)]
    pub error_message: Option<String>,
    #[serde(default)]
    pub force: bool,
}

/// `POST /projects/{project}/environments/{env}/rollback`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    #[serde(default)]
    pub force: bool,
}

/// `PUT /projects/{project}/environments/{env}/freeze`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FreezeRequest {
    pub frozen: bool,
    #[serde(default)]
    pub reason: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Validation

const MAX_NAME: usize = 64;
const MAX_ENVIRONMENTS: usize = 50;
const MAX_VARIABLES: usize = 100;
const MAX_VALUE: usize = 4096;
const MAX_TEXT: usize = 1000;

/// Project and environment names: letters, digits, `-` and `_` (as Aviator allows), so they are
/// safe in store keys, URLs and meta-data.
pub fn validate_name(field: &str, name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > MAX_NAME
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(ReleaseError::invalid(
            field,
            format!("must be 1 to {MAX_NAME} letters, digits, `-` or `_`"),
        ));
    }
    Ok(())
}

fn validate_commit(commit: &str) -> Result<String> {
    let ok = matches!(commit.len(), 40 | 64) && commit.bytes().all(|b| b.is_ascii_hexdigit());
    if !ok {
        return Err(ReleaseError::invalid(
            "commit",
            "must be a full commit SHA (40 hexadecimal digits, or 64 for SHA-256 repositories)",
        ));
    }
    Ok(commit.to_ascii_lowercase())
}

fn validate_branch(branch: &str) -> Result<()> {
    if branch.is_empty()
        || branch.len() > 255
        || branch.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(ReleaseError::invalid(
            "branch",
            "must be a branch name: 1 to 255 characters without spaces",
        ));
    }
    Ok(())
}

fn validate_pipeline(field: &str, p: &PipelineRef) -> Result<()> {
    let slug = |s: &str| {
        !s.is_empty()
            && s.len() <= 100
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if !slug(&p.organization) {
        return Err(ReleaseError::invalid(
            format!("{field}.organization"),
            "must be a Buildkite organization slug",
        ));
    }
    if !slug(&p.pipeline) {
        return Err(ReleaseError::invalid(
            format!("{field}.pipeline"),
            "must be a Buildkite pipeline slug",
        ));
    }
    Ok(())
}

fn validate_variables(field: &str, vars: &BTreeMap<String, String>) -> Result<()> {
    if vars.len() > MAX_VARIABLES {
        return Err(ReleaseError::invalid(
            field,
            format!("at most {MAX_VARIABLES} variables"),
        ));
    }
    for (name, value) in vars {
        let f = format!("{field}.{name}");
        let mut chars = name.chars();
        let ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
            && name.len() <= 128;
        if !ok {
            return Err(ReleaseError::invalid(
                f,
                "variable names are letters, digits and `_`, not starting with a digit",
            ));
        }
        let upper = name.to_ascii_uppercase();
        if upper.starts_with("AVIATOR_") || upper.starts_with("BUILDKITE") {
            return Err(ReleaseError::invalid(
                f,
                "AVIATOR_* and BUILDKITE* variables are set by kitebridge and Buildkite",
            ));
        }
        if value.len() > MAX_VALUE {
            return Err(ReleaseError::invalid(
                f,
                format!("at most {MAX_VALUE} bytes"),
            ));
        }
    }
    Ok(())
}

fn validate_spec(spec: &ProjectSpec) -> Result<()> {
    if let Some(p) = &spec.build_pipeline {
        validate_pipeline("build_pipeline", p)?;
    }
    validate_variables("env", &spec.env)?;
    if spec.environments.len() > MAX_ENVIRONMENTS {
        return Err(ReleaseError::invalid(
            "environments",
            format!("at most {MAX_ENVIRONMENTS} environments"),
        ));
    }
    let names: Vec<&str> = spec.environments.iter().map(|e| e.name.as_str()).collect();
    for (i, e) in spec.environments.iter().enumerate() {
        let field = format!("environments[{i}]");
        validate_name(&format!("{field}.name"), &e.name)?;
        if names[..i].contains(&e.name.as_str()) {
            return Err(ReleaseError::invalid(
                format!("{field}.name"),
                format!("environment `{}` is listed twice", e.name),
            ));
        }
        if let Some(p) = &e.deploy_pipeline {
            validate_pipeline(&format!("{field}.deploy_pipeline"), p)?;
        }
        validate_variables(&format!("{field}.env"), &e.env)?;
        if let Some(req) = &e.requires
            && (req == &e.name || !names.contains(&req.as_str()))
        {
            return Err(ReleaseError::invalid(
                format!("{field}.requires"),
                format!("must name another environment of the project, not `{req}`"),
            ));
        }
    }
    // Promotion order must not loop (a -> b -> a would block both forever).
    for e in &spec.environments {
        let mut seen = vec![e.name.as_str()];
        let mut at = e;
        while let Some(next) = at.requires.as_deref() {
            if seen.contains(&next) {
                return Err(ReleaseError::invalid(
                    "environments",
                    format!("promotion order loops: {} -> {next}", seen.join(" -> ")),
                ));
            }
            seen.push(next);
            match spec.environments.iter().find(|x| x.name == next) {
                Some(x) => at = x,
                None => break,
            }
        }
    }
    Ok(())
}

fn parse_candidate_field(field: &str, v: &str) -> Result<(String, u32)> {
    version::parse_candidate(v)
        .map(|(r, n)| (r.to_string(), n))
        .ok_or_else(|| {
            ReleaseError::invalid(
                field,
                format!("`{v}` is not a candidate version (`<version>-rcN`)"),
            )
        })
}

fn optional_text(field: &str, v: Option<String>) -> Result<Option<String>> {
    match v {
        Some(s) if s.len() > MAX_TEXT => Err(ReleaseError::invalid(
            field,
            format!("at most {MAX_TEXT} bytes"),
        )),
        other => Ok(other.filter(|s| !s.trim().is_empty())),
    }
}

// ---------------------------------------------------------------------------------------------
// Store helpers shared with the tracker

/// Applies `change` to a candidate with compare-and-set, retrying lost races. `change` returns
/// `None` when there is nothing to do. `Ok(None)` when the candidate does not exist.
pub(crate) async fn update_candidate_with(
    store: &dyn ReleaseStore,
    project: &str,
    version: &str,
    number: u32,
    change: impl Fn(&Candidate) -> Option<Candidate>,
) -> std::result::Result<Option<Candidate>, StoreError> {
    for _ in 0..ATTEMPTS {
        let Some(cur) = store.candidate(project, version, number).await? else {
            return Ok(None);
        };
        let Some(next) = change(&cur.value) else {
            return Ok(Some(cur.value));
        };
        match store.update_candidate(&next, cur.rev).await {
            Ok(_) => return Ok(Some(next)),
            Err(StoreError::Conflict) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::Conflict)
}

/// Applies `change` to a deployment with compare-and-set; when that changes its environment
/// (it reaches a final status: the lock is released, a success remembered; or a success's build
/// re-ran: the success is withdrawn), the environment is written in the same atomic write.
pub(crate) async fn update_deployment_with(
    store: &dyn ReleaseStore,
    project: &str,
    environment: &str,
    id: &str,
    change: impl Fn(&Deployment) -> Option<Deployment>,
) -> std::result::Result<Option<Deployment>, StoreError> {
    for _ in 0..ATTEMPTS {
        let Some(cur) = store.deployment(project, environment, id).await? else {
            return Ok(None);
        };
        let Some(next) = change(&cur.value) else {
            return Ok(Some(cur.value));
        };
        let result = if changes_environment(cur.value.status, next.status) {
            let env = store.environment(project, environment).await?;
            let current = env
                .as_ref()
                .map(|e| e.value.clone())
                .unwrap_or_else(|| empty_env(project, environment));
            let after = environment_after_change(&current, &cur.value, &next);
            store
                .update_deployment(&next, cur.rev, Some((&after, env.map(|e| e.rev))))
                .await
        } else {
            store.update_deployment(&next, cur.rev, None).await
        };
        match result {
            Ok(_) => return Ok(Some(next)),
            Err(StoreError::Conflict) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(StoreError::Conflict)
}

fn empty_env(project: &str, environment: &str) -> EnvironmentState {
    EnvironmentState {
        project: project.into(),
        environment: environment.into(),
        frozen: false,
        freeze_reason: None,
        active_deployment: None,
        successes: Vec::new(),
    }
}

/// Marks `id` as `error` if it is (still) stuck.
async fn expire_if_stuck(
    store: &dyn ReleaseStore,
    project: &str,
    environment: &str,
    id: &str,
    timeout: Duration,
) -> std::result::Result<Option<Deployment>, StoreError> {
    update_deployment_with(store, project, environment, id, |d| {
        let now = Utc::now();
        state::is_stuck(d, now, timeout).then(|| state::expire(d, now, timeout))
    })
    .await
}

/// Turns every deployment whose status has not changed for longer than `timeout` into `error`
/// (releasing its environment). Returns how many it changed. Walks the store's index of active
/// deployments, so its cost follows the number of unfinished deployments, not the history.
pub async fn sweep_stuck(
    store: &dyn ReleaseStore,
    timeout: Duration,
) -> std::result::Result<usize, StoreError> {
    let mut changed = 0;
    let mut page: Option<String> = None;
    loop {
        let Page { items, next } = store.active_deployments(page.as_deref(), 100).await?;
        for a in items {
            let before = store.deployment(&a.project, &a.environment, &a.id).await?;
            let was_stuck = before
                .as_ref()
                .is_some_and(|d| state::is_stuck(&d.value, Utc::now(), timeout));
            if !was_stuck {
                continue;
            }
            let after = expire_if_stuck(store, &a.project, &a.environment, &a.id, timeout).await?;
            if after.is_some_and(|d| d.status == DeploymentStatus::Error) {
                tracing::warn!(
                    project = a.project,
                    environment = a.environment,
                    deployment = a.id,
                    "deployment stuck past the timeout; marked error"
                );
                changed += 1;
            }
        }
        match next {
            Some(n) => page = Some(n),
            None => return Ok(changed),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The service

/// A cut's result.
#[derive(Debug, Clone)]
pub struct Cut {
    pub release: Release,
    pub candidate: Candidate,
}

/// How a deployment status update ended.
#[derive(Debug, Clone)]
pub struct StatusUpdate {
    pub deployment: Deployment,
    /// A deployment was created for it (no deployment of that candidate was under way).
    pub created: bool,
}

/// The releases API's operations over a store and (optionally) Buildkite.
#[derive(Clone)]
pub struct ReleaseService {
    store: Arc<dyn ReleaseBackend>,
    buildkite: Option<BuildkiteClient>,
    deployment_timeout: Duration,
    build_lease: Duration,
}

impl ReleaseService {
    pub fn new(
        store: Arc<dyn ReleaseBackend>,
        buildkite: Option<BuildkiteClient>,
        deployment_timeout: Duration,
    ) -> Self {
        ReleaseService {
            store,
            buildkite,
            deployment_timeout,
            build_lease: BUILD_CLAIM_LEASE,
        }
    }

    /// The same service with build-request leases of `lease` (attempts cut off at 5/12 of it)
    /// instead of [`BUILD_CLAIM_LEASE`]; tests use short ones.
    pub fn with_build_lease(mut self, lease: Duration) -> Self {
        self.build_lease = lease;
        self
    }

    // --- projects ----------------------------------------------------------------------------

    /// Creates or replaces a project's configuration; `true` when it was created.
    pub async fn put_project(&self, name: &str, spec: ProjectSpec) -> Result<(Project, bool)> {
        validate_name("project", name)?;
        validate_spec(&spec)?;
        for _ in 0..ATTEMPTS {
            let current = self.store.project(name).await?;
            let now = Utc::now();
            let project = Project {
                name: name.to_string(),
                build_pipeline: spec.build_pipeline.clone(),
                environments: spec.environments.clone(),
                version_scheme: spec.version_scheme,
                env: spec.env.clone(),
                created_at: current.as_ref().map_or(now, |c| c.value.created_at),
                updated_at: now,
            };
            match self
                .store
                .put_project(&project, current.as_ref().map(|c| c.rev))
                .await
            {
                Ok(_) => return Ok((project, current.is_none())),
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ReleaseError::Contention)
    }

    pub async fn project(&self, name: &str) -> Result<Project> {
        validate_name("project", name)?;
        self.store
            .project(name)
            .await?
            .map(|p| p.value)
            .ok_or_else(|| {
                ReleaseError::not_found("project_not_found", format!("no project `{name}`"))
            })
    }

    fn environment_of<'a>(project: &'a Project, name: &str) -> Result<&'a Environment> {
        validate_name("environment", name)?;
        project
            .environments
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| {
                ReleaseError::not_found(
                    "environment_not_found",
                    format!("project `{}` has no environment `{name}`", project.name),
                )
            })
    }

    // --- cuts --------------------------------------------------------------------------------

    /// Cuts a release (or, for an existing version, its next candidate) and starts its build.
    pub async fn cut(&self, project: &str, req: CutRequest) -> Result<Cut> {
        let project = self.project(project).await?;
        let commit = validate_commit(&req.commit)?;
        validate_branch(&req.branch)?;
        if let Some(v) = &req.version {
            version::validate(project.version_scheme, v)
                .map_err(|m| ReleaseError::invalid("version", m))?;
        }
        if project.build_pipeline.is_some() {
            self.buildkite()?;
        }
        let initial = if project.build_pipeline.is_some() {
            CandidateState::Pending
        } else {
            // "Not configured": the cut counts as built at once.
            CandidateState::Built
        };
        let (Cut { release, candidate }, resumed) =
            self.reserve(&project, &req, &commit, initial).await?;
        let Some(pipeline) = &project.build_pipeline else {
            return Ok(Cut {
                release,
                candidate: candidate.answered(),
            });
        };

        let mut env: BTreeMap<String, String> = project.env.clone();
        env.insert("AVIATOR_RELEASE_CUT_ID".into(), candidate.cut_id.clone());
        env.insert(
            "AVIATOR_RELEASE_CANDIDATE_VERSION".into(),
            candidate.version.clone(),
        );
        env.insert(
            "AVIATOR_RELEASE_CUT_COMMIT_HASH".into(),
            candidate.commit.clone(),
        );
        let meta = format!("{}/{}", project.name, candidate.version);
        let body = json!({
            "commit": candidate.commit,
            "branch": candidate.branch,
            "message": format!("Release {} ({})", candidate.version, project.name),
            "env": env,
            "meta_data": {
                META_CANDIDATE: meta,
                "release-version": candidate.version,
            },
        });
        let (p, v, n) = (
            project.name.clone(),
            candidate.release_version.clone(),
            candidate.number,
        );
        let outcome = self
            .request_build(
                pipeline,
                &body,
                (META_CANDIDATE, &meta),
                candidate.created_at,
                resumed,
            )
            .await?;
        match outcome {
            BuildOutcome::Started(build) => {
                let link = BuildLink::Candidate {
                    project: p.clone(),
                    release_version: v.clone(),
                    number: n,
                };
                // If this write fails the candidate stays `pending` (true: kitebridge does not
                // know its build), and the error says the store is unavailable.
                self.store.link_build(&build.id, &link).await?;
                let build_ref = build_ref(pipeline, &build);
                let started = update_candidate_with(self.store.as_ref(), &p, &v, n, |c| {
                    started_candidate(c, &build_ref, &build)
                })
                .await?;
                Ok(Cut {
                    release,
                    candidate: started.unwrap_or(candidate).answered(),
                })
            }
            BuildOutcome::Unknown(e) => {
                let reason = e.to_string();
                let noted = update_candidate_with(self.store.as_ref(), &p, &v, n, |c| {
                    (c.state == CandidateState::Pending && c.build.is_none()).then(|| {
                        let mut u = c.clone();
                        u.error_message = Some(reason.clone());
                        u.updated_at = Utc::now();
                        u
                    })
                })
                .await;
                tracing::warn!(project = p, candidate = candidate.version, error = %e,
                    noted = noted.is_ok(), "the candidate's build may exist; it stays pending");
                Err(e)
            }
            BuildOutcome::Busy(e) => Err(e),
            BuildOutcome::NotCreated(e) => {
                let reason = e.to_string();
                let marked = update_candidate_with(self.store.as_ref(), &p, &v, n, |c| {
                    (c.state == CandidateState::Pending).then(|| {
                        let mut f = c.clone();
                        f.state = CandidateState::Failed;
                        f.error_message = Some(reason.clone());
                        f.updated_at = Utc::now();
                        f
                    })
                })
                .await;
                if let Err(store_error) = marked {
                    tracing::error!(project = p, candidate = candidate.version, error = %store_error,
                        "could not mark the candidate failed after its build was refused; it stays pending");
                }
                Err(e)
            }
        }
    }

    /// Writes the release and its first candidate, or the next candidate of an existing
    /// version, retrying when a concurrent cut took the version or the number. `true` with a
    /// candidate left without a build by an earlier cut of the same commit and branch (and the
    /// same version, when one is given), which this cut resumes instead.
    async fn reserve(
        &self,
        project: &Project,
        req: &CutRequest,
        commit: &str,
        initial: CandidateState,
    ) -> Result<(Cut, bool)> {
        let resumable = initial == CandidateState::Pending;
        let mut taken: Vec<String> = Vec::new();
        let mut recent: Option<Vec<String>> = None;
        for _ in 0..ATTEMPTS {
            let now = Utc::now();
            let version = match &req.version {
                Some(v) => v.clone(),
                None => {
                    if recent.is_none() {
                        let page = self.store.list_releases(&project.name, None, 100).await?;
                        // A cut without a version whose build may exist is retried as a cut
                        // of the newest release; it must not become the next version.
                        let newest = page.items.iter().max_by_key(|r| r.created_at);
                        if resumable && let Some(newest) = newest {
                            let latest = self
                                .store
                                .candidates(&project.name, &newest.version)
                                .await?
                                .into_iter()
                                .max_by_key(|c| c.value.number);
                            if let Some(c) = latest
                                && resumes_candidate(
                                    &c.value,
                                    commit,
                                    &req.branch,
                                    self.build_lease,
                                )
                            {
                                let cut = Cut {
                                    release: newest.clone(),
                                    candidate: c.value,
                                };
                                return Ok((cut, true));
                            }
                        }
                        recent = Some(page.items.into_iter().map(|r| r.version).collect());
                    }
                    let mut seen = recent.clone().unwrap_or_default();
                    seen.extend(taken.iter().cloned());
                    version::next_version(project.version_scheme, &seen, now.date_naive(), req.bump)
                }
            };
            let candidate = |number: u32, cut_id: String| Candidate {
                project: project.name.clone(),
                release_version: version.clone(),
                number,
                version: version::candidate_version(&version, number),
                cut_id,
                commit: commit.to_string(),
                branch: req.branch.clone(),
                state: initial,
                build: None,
                build_state: None,
                error_message: None,
                created_at: now,
                updated_at: now,
            };
            if let Some(existing) = self.store.release(&project.name, &version).await? {
                if req.version.is_none() {
                    taken.push(version);
                    continue;
                }
                let latest = self
                    .store
                    .candidates(&project.name, &version)
                    .await?
                    .into_iter()
                    .max_by_key(|c| c.value.number)
                    .map(|c| c.value);
                if resumable
                    && let Some(c) = &latest
                    && resumes_candidate(c, commit, &req.branch, self.build_lease)
                {
                    let cut = Cut {
                        release: existing,
                        candidate: c.clone(),
                    };
                    return Ok((cut, true));
                }
                let number = latest.map_or(0, |c| c.number) + 1;
                let c = candidate(number, ulid::Ulid::new().to_string());
                match self.store.add_candidate(&c).await {
                    Ok(()) => {
                        let cut = Cut {
                            release: existing,
                            candidate: c,
                        };
                        return Ok((cut, false));
                    }
                    Err(StoreError::Conflict) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            let cut_id = ulid::Ulid::new().to_string();
            let release = Release {
                project: project.name.clone(),
                version: version.clone(),
                cut_id: cut_id.clone(),
                commit: commit.to_string(),
                branch: req.branch.clone(),
                created_at: now,
            };
            let c = candidate(1, cut_id);
            match self.store.create_release(&release, &c).await {
                Ok(()) => {
                    let cut = Cut {
                        release,
                        candidate: c,
                    };
                    return Ok((cut, false));
                }
                Err(StoreError::Conflict) => {
                    if req.version.is_none() {
                        taken.push(version);
                    }
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(ReleaseError::Contention)
    }

    // --- reading -----------------------------------------------------------------------------

    pub async fn list_releases(
        &self,
        project: &str,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<Page<Release>> {
        self.project(project).await?;
        if let Some(c) = cursor
            && !c.starts_with("RELEASES#")
        {
            return Err(ReleaseError::invalid(
                "cursor",
                "not a cursor of this listing",
            ));
        }
        Ok(self.store.list_releases(project, cursor, limit).await?)
    }

    /// A release and its candidates (oldest first).
    pub async fn release(&self, project: &str, version: &str) -> Result<(Release, Vec<Candidate>)> {
        self.project(project).await?;
        let release = self.store.release(project, version).await?.ok_or_else(|| {
            ReleaseError::not_found(
                "release_not_found",
                format!("project `{project}` has no release `{version}`"),
            )
        })?;
        let candidates = self
            .store
            .candidates(project, version)
            .await?
            .into_iter()
            .map(|c| c.value.answered())
            .collect();
        Ok((release, candidates))
    }

    async fn candidate(
        &self,
        project: &str,
        field: &str,
        candidate_version: &str,
    ) -> Result<Candidate> {
        let (version, number) = parse_candidate_field(field, candidate_version)?;
        self.store
            .candidate(project, &version, number)
            .await?
            .map(|c| c.value)
            .ok_or_else(|| {
                ReleaseError::not_found(
                    "candidate_not_found",
                    format!("project `{project}` has no release candidate `{candidate_version}`"),
                )
            })
    }

    /// A deployment, with the stuck rule applied.
    pub async fn deployment(
        &self,
        project: &str,
        environment: &str,
        id: &str,
    ) -> Result<Deployment> {
        let p = self.project(project).await?;
        Self::environment_of(&p, environment)?;
        let d = self
            .store
            .deployment(project, environment, id)
            .await?
            .ok_or_else(|| {
                ReleaseError::not_found(
                    "deployment_not_found",
                    format!("environment `{environment}` has no deployment `{id}`"),
                )
            })?;
        Ok(self.fresh(d).await?.answered())
    }

    /// The deployment as it should be read: a stuck one becomes `error` first.
    async fn fresh(&self, d: Versioned<Deployment>) -> Result<Deployment> {
        if !state::is_stuck(&d.value, Utc::now(), self.deployment_timeout) {
            return Ok(d.value);
        }
        let v = &d.value;
        Ok(expire_if_stuck(
            self.store.as_ref(),
            &v.project,
            &v.environment,
            &v.id,
            self.deployment_timeout,
        )
        .await?
        .unwrap_or(d.value))
    }

    pub async fn list_deployments(
        &self,
        project: &str,
        environment: &str,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<Page<Deployment>> {
        let p = self.project(project).await?;
        Self::environment_of(&p, environment)?;
        if let Some(c) = cursor
            && !c.starts_with(&format!("DEPLOYMENT#{environment}#"))
        {
            return Err(ReleaseError::invalid(
                "cursor",
                "not a cursor of this listing",
            ));
        }
        let page = self
            .store
            .list_deployments(project, environment, cursor, limit)
            .await?;
        let mut items = Vec::with_capacity(page.items.len());
        for d in page.items {
            items.push(self.fresh(d).await?.answered());
        }
        Ok(Page {
            items,
            next: page.next,
        })
    }

    /// An environment's configuration and state (the active deployment read fresh).
    pub async fn environment(
        &self,
        project: &str,
        environment: &str,
    ) -> Result<(Environment, EnvironmentState, Option<Deployment>)> {
        let p = self.project(project).await?;
        let cfg = Self::environment_of(&p, environment)?.clone();
        let mut st = self
            .store
            .environment(project, environment)
            .await?
            .map(|e| e.value)
            .unwrap_or_else(|| empty_env(project, environment));
        let active = match &st.active_deployment {
            Some(id) => match self.store.deployment(project, environment, id).await? {
                Some(d) => Some(self.fresh(d).await?),
                None => None,
            },
            None => None,
        };
        if active.as_ref().is_some_and(|d| d.status.is_terminal()) {
            // It was just expired: read the released state again.
            if let Some(e) = self.store.environment(project, environment).await? {
                st = e.value;
            }
        }
        let active = active
            .filter(|d| !d.status.is_terminal())
            .map(Deployment::answered);
        Ok((cfg, st, active))
    }

    // --- deployments -------------------------------------------------------------------------

    /// Deploys a built candidate to an environment.
    pub async fn deploy(
        &self,
        project: &str,
        environment: &str,
        req: DeployRequest,
    ) -> Result<Deployment> {
        let p = self.project(project).await?;
        let env = Self::environment_of(&p, environment)?.clone();
        let candidate = self
            .candidate(
                project,
                "release_candidate_version",
                &req.release_candidate_version,
            )
            .await?;
        self.check_deployable(&p, &env, &candidate).await?;
        self.start_deployment(&p, &env, &candidate, false, req.force)
            .await
    }

    async fn check_deployable(&self, p: &Project, env: &Environment, c: &Candidate) -> Result<()> {
        if c.state != CandidateState::Built {
            return Err(ReleaseError::conflict(
                "candidate_not_built",
                format!(
                    "release candidate `{}` is {}; only a built candidate can be deployed",
                    c.version,
                    c.state.as_str()
                ),
            ));
        }
        if let Some(required) = &env.requires {
            let ok = self
                .store
                .environment(&p.name, required)
                .await?
                .is_some_and(|e| e.value.successes.contains(&c.version));
            if !ok {
                return Err(ReleaseError::conflict(
                    "promotion_required",
                    format!(
                        "`{}` must be deployed successfully to `{required}` before `{}`",
                        c.version, env.name
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Takes the environment's lock with a new deployment, then starts its deploy build (if the
    /// environment has a deploy pipeline).
    async fn start_deployment(
        &self,
        p: &Project,
        env: &Environment,
        c: &Candidate,
        rollback: bool,
        force: bool,
    ) -> Result<Deployment> {
        if env.deploy_pipeline.is_some() {
            self.buildkite()?;
        }
        let mut created = None;
        for _ in 0..ATTEMPTS {
            let current = self.store.environment(&p.name, &env.name).await?;
            let st = current
                .as_ref()
                .map(|e| e.value.clone())
                .unwrap_or_else(|| empty_env(&p.name, &env.name));
            if let Some(active) = &st.active_deployment {
                match self.store.deployment(&p.name, &env.name, active).await? {
                    Some(d) if state::is_stuck(&d.value, Utc::now(), self.deployment_timeout) => {
                        expire_if_stuck(
                            self.store.as_ref(),
                            &p.name,
                            &env.name,
                            active,
                            self.deployment_timeout,
                        )
                        .await?;
                        continue;
                    }
                    // The same deployment asked again after its build request went unanswered:
                    // resume it rather than refuse (or, once it is expired, start another).
                    Some(d)
                        if env.deploy_pipeline.is_some()
                            && d.value.status == DeploymentStatus::Pending
                            && d.value.build.is_none()
                            && d.value.candidate_version == c.version
                            && d.value.rollback == rollback
                            && left_unknown(
                                d.value.error_message.as_deref(),
                                d.value.created_at,
                                self.build_lease,
                            ) =>
                    {
                        created = Some((d.value, true));
                        break;
                    }
                    Some(d) if !d.value.status.is_terminal() => {
                        return Err(ReleaseError::conflict(
                            "deployment_in_progress",
                            format!(
                                "deployment {} of `{}` to `{}` is {}; one deployment at a time",
                                d.value.id,
                                d.value.candidate_version,
                                env.name,
                                d.value.status.as_str()
                            ),
                        ));
                    }
                    // A lock naming a finished or missing deployment cannot be written by this
                    // module (the lock moves atomically with the deployment); take it over.
                    _ => tracing::warn!(
                        project = p.name,
                        environment = env.name,
                        active,
                        "environment lock names a finished or missing deployment; taking it over"
                    ),
                }
            }
            if st.frozen && !force {
                let reason = st
                    .freeze_reason
                    .as_deref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default();
                return Err(ReleaseError::conflict(
                    "environment_frozen",
                    format!(
                        "environment `{}` is frozen{reason}; pass \"force\": true to deploy anyway",
                        env.name
                    ),
                ));
            }
            let now = Utc::now();
            let d = Deployment {
                id: ulid::Ulid::new().to_string(),
                project: p.name.clone(),
                environment: env.name.clone(),
                release_version: c.release_version.clone(),
                candidate_version: c.version.clone(),
                commit: c.commit.clone(),
                status: DeploymentStatus::Pending,
                build: None,
                from_candidate_version: st.successes.last().cloned(),
                rollback,
                forced: force && st.frozen,
                created_at: now,
                updated_at: now,
                finished_at: None,
                error_message: None,
            };
            let mut locked = st.clone();
            locked.active_deployment = Some(d.id.clone());
            match self
                .store
                .create_deployment(&d, &locked, current.map(|e| e.rev))
                .await
            {
                Ok(()) => {
                    created = Some((d, false));
                    break;
                }
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        let (d, resumed) = created.ok_or(ReleaseError::Contention)?;
        let Some(pipeline) = &env.deploy_pipeline else {
            return Ok(d.answered());
        };

        let mut vars = env.env.clone();
        vars.insert("AVIATOR_DEPLOYMENT_ID".into(), d.id.clone());
        vars.insert(
            "AVIATOR_RELEASE_CANDIDATE_VERSION".into(),
            c.version.clone(),
        );
        vars.insert("AVIATOR_RELEASE_CUT_COMMIT_HASH".into(), c.commit.clone());
        let meta = format!("{}/{}/{}", p.name, env.name, d.id);
        let body = json!({
            "commit": c.commit,
            "branch": c.branch,
            "message": format!(
                "{} {} to {} ({})",
                if rollback { "Roll back to" } else { "Deploy" },
                c.version, env.name, p.name
            ),
            "env": vars,
            "meta_data": {
                META_DEPLOYMENT: meta,
                "release-version": c.version,
            },
        });
        let outcome = self
            .request_build(
                pipeline,
                &body,
                (META_DEPLOYMENT, &meta),
                d.created_at,
                resumed,
            )
            .await?;
        match outcome {
            BuildOutcome::Started(build) => {
                let link = BuildLink::Deployment {
                    project: p.name.clone(),
                    environment: env.name.clone(),
                    id: d.id.clone(),
                };
                self.store.link_build(&build.id, &link).await?;
                let build_ref = build_ref(pipeline, &build);
                let started =
                    update_deployment_with(self.store.as_ref(), &p.name, &env.name, &d.id, |cur| {
                        started_deployment(cur, &build_ref, &build)
                    })
                    .await?;
                Ok(started.unwrap_or(d).answered())
            }
            BuildOutcome::Unknown(e) => {
                let reason = e.to_string();
                let noted =
                    update_deployment_with(self.store.as_ref(), &p.name, &env.name, &d.id, |cur| {
                        (cur.status == DeploymentStatus::Pending && cur.build.is_none()).then(
                            || {
                                let mut u = cur.clone();
                                u.error_message = Some(reason.clone());
                                u.updated_at = Utc::now();
                                u
                            },
                        )
                    })
                    .await;
                tracing::warn!(project = p.name, environment = env.name, deployment = d.id,
                    error = %e, noted = noted.is_ok(), "the deployment's build may exist; it stays pending");
                Err(e)
            }
            BuildOutcome::Busy(e) => Err(e),
            BuildOutcome::NotCreated(e) => {
                let reason = e.to_string();
                let released =
                    update_deployment_with(self.store.as_ref(), &p.name, &env.name, &d.id, |cur| {
                        (!cur.status.is_terminal()).then(|| {
                            let now = Utc::now();
                            let mut f = cur.clone();
                            f.status = DeploymentStatus::Error;
                            f.error_message = Some(reason.clone());
                            f.updated_at = now;
                            f.finished_at = Some(now);
                            f
                        })
                    })
                    .await;
                if let Err(store_error) = released {
                    tracing::error!(project = p.name, environment = env.name, deployment = d.id,
                        error = %store_error,
                        "could not mark the deployment error after its build was refused; the stuck-deployment sweep will");
                }
                Err(e)
            }
        }
    }

    /// Redeploys the previous good candidate (see [`state::rollback_target`]).
    pub async fn rollback(
        &self,
        project: &str,
        environment: &str,
        req: RollbackRequest,
    ) -> Result<Deployment> {
        let p = self.project(project).await?;
        let env = Self::environment_of(&p, environment)?.clone();
        let latest = self
            .store
            .list_deployments(project, environment, None, 1)
            .await?
            .items
            .into_iter()
            .next();
        let latest = match latest {
            Some(d) => Some(self.fresh(d).await?),
            None => None,
        };
        if let Some(d) = latest.as_ref().filter(|d| !d.status.is_terminal()) {
            return Err(ReleaseError::conflict(
                "deployment_in_progress",
                format!(
                    "deployment {} of `{}` is {}; wait for it to finish (or for it to time out) before rolling back",
                    d.id,
                    d.candidate_version,
                    d.status.as_str()
                ),
            ));
        }
        let st = self
            .store
            .environment(project, environment)
            .await?
            .map(|e| e.value)
            .unwrap_or_else(|| empty_env(project, environment));
        let target = state::rollback_target(latest.as_ref(), &st).map_err(|e: NoRollback| {
            ReleaseError::conflict("nothing_to_roll_back", e.to_string())
        })?;
        let candidate = self
            .candidate(project, "release_candidate_version", &target)
            .await?;
        self.start_deployment(&p, &env, &candidate, true, req.force)
            .await
    }

    /// Sets a deployment's status by API, for environments without a deploy pipeline.
    /// Aviator's semantics: the deployment of that candidate under way is updated, and one is
    /// created (the environment's rules apply) when none is.
    pub async fn set_status(
        &self,
        project: &str,
        environment: &str,
        req: StatusRequest,
    ) -> Result<StatusUpdate> {
        let p = self.project(project).await?;
        let env = Self::environment_of(&p, environment)?.clone();
        let status = DeploymentStatus::parse(&req.status).ok_or_else(|| {
            ReleaseError::invalid(
                "status",
                format!(
                    "`{}` is not a status: pending, in_progress, success, failure, canceled or error",
                    req.status
                ),
            )
        })?;
        let message = optional_text("error_message", req.error_message.clone())?;
        if env.deploy_pipeline.is_some() {
            return Err(ReleaseError::conflict(
                "environment_has_pipeline",
                format!(
                    "environment `{}` has a deploy pipeline; its builds report the status",
                    env.name
                ),
            ));
        }
        let candidate = self
            .candidate(
                project,
                "release_candidate_version",
                &req.release_candidate_version,
            )
            .await?;

        // The deployment this update is about: the active one, or the latest (for a repeated
        // update of a finished deployment), if it is of this candidate.
        let st = self.store.environment(project, environment).await?;
        let mut target = match st.as_ref().and_then(|e| e.value.active_deployment.clone()) {
            Some(id) => self.store.deployment(project, environment, &id).await?,
            None => None,
        };
        if target.is_none() {
            target = self
                .store
                .list_deployments(project, environment, None, 1)
                .await?
                .items
                .into_iter()
                .next()
                .filter(|d| d.value.status == status);
        }
        let (current, created) =
            match target.filter(|d| d.value.candidate_version == candidate.version) {
                Some(d) => (self.fresh(d).await?, false),
                None => {
                    self.check_deployable(&p, &env, &candidate).await?;
                    (
                        self.start_deployment(&p, &env, &candidate, false, req.force)
                            .await?,
                        true,
                    )
                }
            };
        match state::patch_decision(current.status, status) {
            PatchDecision::Unchanged => Ok(StatusUpdate {
                deployment: current.answered(),
                created,
            }),
            PatchDecision::Refused => Err(ReleaseError::conflict(
                "status_not_allowed",
                format!(
                    "deployment {} is {}; a status never goes back and a finished deployment stays finished",
                    current.id,
                    current.status.as_str()
                ),
            )),
            PatchDecision::Apply => {
                let updated = update_deployment_with(
                    self.store.as_ref(),
                    project,
                    environment,
                    &current.id,
                    |d| {
                        (state::patch_decision(d.status, status) == PatchDecision::Apply).then(
                            || {
                                let now = Utc::now();
                                let mut n = d.clone();
                                n.status = status;
                                n.updated_at = now;
                                if status.is_terminal() {
                                    n.finished_at = Some(now);
                                }
                                if message.is_some() {
                                    n.error_message = message.clone();
                                }
                                n
                            },
                        )
                    },
                )
                .await?
                .unwrap_or(current);
                if updated.status != status {
                    return Err(ReleaseError::conflict(
                        "status_not_allowed",
                        format!(
                            "deployment {} became {} meanwhile",
                            updated.id,
                            updated.status.as_str()
                        ),
                    ));
                }
                Ok(StatusUpdate {
                    deployment: updated.answered(),
                    created,
                })
            }
        }
    }

    /// Freezes or unfreezes an environment.
    pub async fn freeze(
        &self,
        project: &str,
        environment: &str,
        req: FreezeRequest,
    ) -> Result<EnvironmentState> {
        let p = self.project(project).await?;
        Self::environment_of(&p, environment)?;
        let reason = optional_text("reason", req.reason)?;
        for _ in 0..ATTEMPTS {
            let current = self.store.environment(project, environment).await?;
            let mut st = current
                .as_ref()
                .map(|e| e.value.clone())
                .unwrap_or_else(|| empty_env(project, environment));
            st.frozen = req.frozen;
            st.freeze_reason = if req.frozen { reason.clone() } else { None };
            match self
                .store
                .put_environment(&st, current.map(|e| e.rev))
                .await
            {
                Ok(_) => return Ok(st),
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ReleaseError::Contention)
    }

    // --- Buildkite ---------------------------------------------------------------------------

    fn buildkite(&self) -> Result<&BuildkiteClient> {
        self.buildkite.as_ref().ok_or_else(|| {
            ReleaseError::BuildkiteUnavailable(
                "no Buildkite API token is configured (BUILDKITE_API_TOKEN)".into(),
            )
        })
    }

    /// Gets the build of one record (see the module docs): under the record's lease, looks for
    /// it first when an earlier request may have made it (`resumed`), else creates it, looking
    /// for it after a failure Buildkite may have acted on. `since` is when the record was
    /// written, before any request for it. Fails only when the lease cannot be taken.
    async fn request_build(
        &self,
        pipeline: &PipelineRef,
        body: &Value,
        meta: (&'static str, &str),
        since: DateTime<Utc>,
        resumed: bool,
    ) -> Result<BuildOutcome> {
        let buildkite = self.buildkite()?;
        let key = meta.1;
        let rev = match self
            .store
            .idempotency_begin(BUILD_CLAIM_SCOPE, key, key, self.build_lease)
            .await?
        {
            IdempotencyBegin::New { rev } => rev,
            // The lease is only ever abandoned, never finished, so anything else is a holder.
            _ => {
                return Ok(BuildOutcome::Busy(ReleaseError::conflict(
                    "build_in_progress",
                    format!(
                        "the build for {key} is being requested, or its request went \
                         unanswered moments ago; retry in {} s",
                        self.build_lease.as_secs()
                    ),
                )));
            }
        };
        let (org, name) = (pipeline.organization.as_str(), pipeline.pipeline.as_str());
        let meta_data = [meta];
        // Errors come with whether the build may exist despite them.
        let attempt = async {
            if resumed {
                match find_build(buildkite, org, name, since, &meta_data).await {
                    Ok(Some(build)) => return Ok(build),
                    Ok(None) => {}
                    Err(e) => return Err((e, true)),
                }
            }
            create_or_find(buildkite, org, name, body, since, &meta_data)
                .await
                .map_err(|e| {
                    let maybe = may_have_acted(&e);
                    (e, maybe)
                })
        };
        let budget = build_attempt_budget(self.build_lease);
        let outcome = match tokio::time::timeout(budget, attempt).await {
            Err(_) => BuildOutcome::Unknown(ReleaseError::BuildkiteUnavailable(format!(
                "no answer within {budget:?}; {BUILD_UNKNOWN}"
            ))),
            Ok(Ok(build)) => BuildOutcome::Started(Box::new(build)),
            Ok(Err((e, true))) => BuildOutcome::Unknown(ReleaseError::BuildkiteUnavailable(
                format!("{e}; {BUILD_UNKNOWN}"),
            )),
            Ok(Err((e, false))) => BuildOutcome::NotCreated(classify_buildkite(e)),
        };
        if matches!(outcome, BuildOutcome::Unknown(_)) {
            // A request of it may still land: the lease is kept until it lapses, so the next
            // attempt looks only after that margin.
            return Ok(outcome);
        }
        // The build is known (or certainly absent), and the record says so or is about to: a
        // call that resumes the record in between finds the same build.
        if let Err(e) = self
            .store
            .idempotency_abandon(BUILD_CLAIM_SCOPE, key, rev)
            .await
        {
            tracing::warn!(key, error = %e, "could not give up a build request's lease; it lapses");
        }
        Ok(outcome)
    }
}

/// A 4xx from Buildkite (other than 408/429) is a refusal whose message is passed on; anything
/// else means Buildkite could not be reached or failed.
fn classify_buildkite(e: BuildkiteError) -> ReleaseError {
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

fn build_ref(pipeline: &PipelineRef, build: &Build) -> BuildRef {
    BuildRef {
        organization: pipeline.organization.clone(),
        pipeline: pipeline.pipeline.clone(),
        id: build.id.clone(),
        number: build.number,
        web_url: build.web_url.clone(),
        observed: None,
    }
}

/// The candidate once its build exists: it has the build, and is at least `building` (the
/// tracker may have moved it further already). The create answer is an observation of the
/// build like any other, ordered by its version ([`state::observe_candidate`]).
pub(crate) fn started_candidate(
    c: &Candidate,
    build_ref: &BuildRef,
    build: &Build,
) -> Option<Candidate> {
    let mut n = c.clone();
    if n.build.is_none() {
        n.build = Some(build_ref.clone());
        // A note that the build was not known is obsolete once it is.
        n.error_message = None;
    }
    state::observe_candidate(&mut n, build);
    if candidate_advances(n.state, CandidateState::Building) {
        n.state = CandidateState::Building;
    }
    if n.build_state.is_none() {
        n.build_state = Some(build.state.as_str().to_string());
    }
    (n != *c).then(|| {
        n.updated_at = Utc::now();
        n
    })
}

fn started_deployment(d: &Deployment, build_ref: &BuildRef, build: &Build) -> Option<Deployment> {
    let mut n = d.clone();
    if n.build.is_none() {
        n.build = Some(build_ref.clone());
        n.error_message = None;
    }
    let now = Utc::now();
    state::observe_deployment(&mut n, build, now);
    (n != *d).then(|| {
        n.updated_at = now;
        n
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(envs: Vec<(&str, Option<&str>)>) -> ProjectSpec {
        ProjectSpec {
            build_pipeline: None,
            environments: envs
                .into_iter()
                .map(|(n, r)| Environment {
                    name: n.into(),
                    deploy_pipeline: None,
                    requires: r.map(str::to_string),
                    env: BTreeMap::new(),
                })
                .collect(),
            version_scheme: VersionScheme::Semver,
            env: BTreeMap::new(),
        }
    }

    fn field(r: Result<()>) -> String {
        match r {
            Err(ReleaseError::Invalid { field, .. }) => field,
            other => panic!("expected a 400, got {other:?}"),
        }
    }

    #[test]
    fn project_specs_are_checked_field_by_field() {
        assert!(validate_spec(&spec(vec![("staging", None), ("prod", Some("staging"))])).is_ok());
        assert_eq!(
            field(validate_spec(&spec(vec![("prod", Some("prod"))]))),
            "environments[0].requires"
        );
        assert_eq!(
            field(validate_spec(&spec(vec![("prod", Some("qa"))]))),
            "environments[0].requires"
        );
        assert_eq!(
            field(validate_spec(&spec(vec![
                ("a", Some("b")),
                ("b", Some("a"))
            ]))),
            "environments"
        );
        assert_eq!(
            field(validate_spec(&spec(vec![("a", None), ("a", None)]))),
            "environments[1].name"
        );
        assert_eq!(
            field(validate_spec(&spec(vec![("bad name", None)]))),
            "environments[0].name"
        );
        let mut s = spec(vec![]);
        s.env.insert("AVIATOR_DEPLOYMENT_ID".into(), "x".into());
        assert_eq!(field(validate_spec(&s)), "env.AVIATOR_DEPLOYMENT_ID");
        let mut s = spec(vec![]);
        s.env.insert("1X".into(), "x".into());
        assert_eq!(field(validate_spec(&s)), "env.1X");
        let mut s = spec(vec![]);
        s.build_pipeline = Some(PipelineRef {
            organization: "acme".into(),
            pipeline: "web release".into(),
        });
        assert_eq!(field(validate_spec(&s)), "build_pipeline.pipeline");
    }

    #[test]
    fn commits_and_branches() {
        assert_eq!(validate_commit(&"AB".repeat(20)).unwrap(), "ab".repeat(20));
        assert!(validate_commit(&"a".repeat(64)).is_ok());
        for bad in ["HEAD", "abc123", &"g".repeat(40), &"a".repeat(41)] {
            assert!(validate_commit(bad).is_err(), "{bad}");
        }
        assert!(validate_branch("release/1.4").is_ok());
        for bad in ["", "a b", "a\nb", &"b".repeat(256)] {
            assert!(validate_branch(bad).is_err(), "{bad:?}");
        }
    }

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
