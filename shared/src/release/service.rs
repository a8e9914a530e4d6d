//! The releases service: cut, deploy, roll back, freeze and status updates, applied to the store
//! and to Buildkite. It orchestrates: it reads, decides through the pure functions of
//! [`super::decide`], [`super::state`] and [`super::version`], and writes, retrying lost
//! compare-and-sets with [`crate::store::cas_retry`]. Requests and their validation are in
//! [`super::request`], errors in [`super::error`], the build requests in [`super::build`], the
//! compare-and-set updates of one record in [`super::update`] and the sweep in [`super::sweep`].
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

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;

use super::build::{BuildOutcome, request_build};
use super::changelog::{
    CandidateAt, Changelog, ChangelogCommit, CommitRange, EnvironmentChangelog, MAX_COMMITS,
    PathFilter,
};
use super::decide::{self, BuildRequest, Intent, Lock, Timing};
use super::model::{
    BuildLink, Candidate, CandidateState, Deployment, DeploymentStatus, Environment,
    EnvironmentState, Project, Release,
};
use super::request::{
    optional_text, parse_candidate_field, parse_status, validate_branch, validate_commit,
    validate_spec,
};
use super::state::{self, NoRollback, PatchDecision};
use super::sweep::expire_if_stuck;
use super::update::{ATTEMPTS, empty_env, update_candidate_with, update_deployment_with};
use super::version;
use crate::bitbucket::BitbucketClient;
use crate::bitbucket::commits::RepositoryRef;
use crate::buildkite::client::BuildkiteClient;
use crate::store::{
    Cas, IdempotencyStore, Page, ReleaseStore, Versioned, cas_retry, retry_on_conflict,
};

pub use super::build::{BUILD_ATTEMPT_BUDGET, BUILD_CLAIM_LEASE};
pub use super::decide::{META_CANDIDATE, META_DEPLOYMENT};
pub use super::error::ReleaseError;
pub use super::request::{
    CutRequest, DeployRequest, FreezeRequest, ProjectSpec, RollbackRequest, StatusRequest,
    validate_name,
};
pub use super::sweep::sweep_stuck;

type Result<T> = std::result::Result<T, ReleaseError>;

/// The store capabilities the service needs: the releases, and leases for build requests.
pub trait ReleaseBackend: ReleaseStore + IdempotencyStore {}
impl<T: ReleaseStore + IdempotencyStore> ReleaseBackend for T {}

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
    /// Where changelogs are read from (`None`: no Bitbucket configured).
    bitbucket: Option<BitbucketClient>,
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
            bitbucket: None,
        }
    }

    /// The same service reading changelogs from `bitbucket`.
    pub fn with_bitbucket(mut self, bitbucket: Option<BitbucketClient>) -> Self {
        self.bitbucket = bitbucket;
        self
    }

    /// The same service with build-request leases of `lease` (attempts cut off at 5/12 of it)
    /// instead of [`BUILD_CLAIM_LEASE`]; tests use short ones.
    pub fn with_build_lease(mut self, lease: Duration) -> Self {
        self.build_lease = lease;
        self
    }

    fn releases(&self) -> &dyn ReleaseStore {
        self.store.as_ref()
    }

    // --- projects ----------------------------------------------------------------------------

    /// Creates or replaces a project's configuration; `true` when it was created.
    pub async fn put_project(&self, name: &str, spec: ProjectSpec) -> Result<(Project, bool)> {
        validate_name("project", name)?;
        validate_spec(&spec)?;
        let spec = &spec;
        cas_retry(ATTEMPTS, || async move {
            let current = self.store.project(name).await?;
            let now = Utc::now();
            let project = Project {
                name: name.to_string(),
                build_pipeline: spec.build_pipeline.clone(),
                environments: spec.environments.clone(),
                version_scheme: spec.version_scheme,
                env: spec.env.clone(),
                repository: spec.repository.clone(),
                paths: spec.paths.clone(),
                created_at: current.as_ref().map_or(now, |c| c.value.created_at),
                updated_at: now,
            };
            let written = self
                .store
                .put_project(&project, current.as_ref().map(|c| c.rev))
                .await;
            Ok(retry_on_conflict(written, (project, current.is_none()))?)
        })
        .await
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

    /// Projects by name, `per_page` at a time; the cursor is the last name of the previous page.
    pub async fn list_projects(&self, cursor: Option<&str>, limit: usize) -> Result<Page<Project>> {
        if let Some(c) = cursor {
            validate_name("cursor", c)?;
        }
        Ok(self.store.list_projects(cursor, limit).await?)
    }

    /// Deletes a project and every record of it (releases, candidates, deployments,
    /// environment states; nothing is kept). Refused (409 `deployment_in_progress`) while a
    /// deployment of it is unfinished in any environment.
    pub async fn delete_project(&self, name: &str) -> Result<()> {
        validate_name("project", name)?;
        cas_retry(ATTEMPTS, || async move {
            let Some(current) = self.store.project(name).await? else {
                return Err(ReleaseError::not_found(
                    "project_not_found",
                    format!("no project `{name}`"),
                ));
            };
            for env in &current.value.environments {
                let (_, _, active) = self.environment(name, &env.name).await?;
                if let Some(d) = active {
                    return Err(ReleaseError::conflict(
                        "deployment_in_progress",
                        format!(
                            "deployment {} of `{}` to `{}` is {}; a project is deleted only when no deployment runs",
                            d.id,
                            d.candidate_version,
                            env.name,
                            d.status.as_str()
                        ),
                    ));
                }
            }
            let deleted = self.store.delete_project(name, current.rev).await;
            Ok(retry_on_conflict(deleted, ())?)
        })
        .await
    }

    /// Each environment side by side: what runs there and ran before, what is deploying, and
    /// the newest built candidates not yet deployed there with what a deploy of each would
    /// answer now (by [`decide::deployable`] and [`decide::lock`], as a deploy decides).
    pub async fn overview(&self, name: &str) -> Result<Overview> {
        let project = self.project(name).await?;
        // The newest releases' built candidates, newest first.
        let releases = self
            .store
            .list_releases(name, None, OVERVIEW_RELEASES)
            .await?;
        let mut built = Vec::new();
        for r in &releases.items {
            let mut cs: Vec<Candidate> = self
                .store
                .candidates(name, &r.version)
                .await?
                .into_iter()
                .map(|c| c.value)
                .filter(|c| c.state == CandidateState::Built)
                .collect();
            cs.reverse();
            built.extend(cs);
        }
        let mut states = std::collections::HashMap::new();
        for env in &project.environments {
            let (_, st, active) = self.environment(name, &env.name).await?;
            states.insert(env.name.clone(), (st, active));
        }
        let timing = Timing {
            now: Utc::now(),
            deployment_timeout: self.deployment_timeout,
            build_lease: self.build_lease,
        };
        let mut environments = Vec::new();
        for env in &project.environments {
            let (st, active) = &states[&env.name];
            let recent = self
                .store
                .list_deployments(name, &env.name, None, OVERVIEW_DEPLOYMENTS)
                .await?;
            let mut succeeded = recent
                .items
                .into_iter()
                .map(|d| d.value)
                .filter(|d| d.status == DeploymentStatus::Success)
                .map(Deployment::answered);
            let current = succeeded.next();
            let previous = succeeded.next();
            let required = env
                .requires
                .as_ref()
                .and_then(|r| states.get(r))
                .map(|(st, _)| st);
            let candidates = built
                .iter()
                .filter(|c| !st.successes.contains(&c.version))
                .take(OVERVIEW_CANDIDATES)
                .map(|c| {
                    let intent = Intent {
                        project: &project,
                        environment: env,
                        candidate: c,
                        rollback: false,
                        force: false,
                    };
                    let refusal = decide::deployable(c, env, required)
                        .and_then(|()| decide::lock(&intent, st, active.as_ref(), &timing))
                        .err();
                    Waiting::new(c, refusal)
                })
                .collect();
            environments.push(EnvironmentOverview {
                name: env.name.clone(),
                requires: env.requires.clone(),
                frozen: st.frozen,
                freeze_reason: st.freeze_reason.clone(),
                deploying: active.clone(),
                current,
                previous,
                candidates,
                successes: st.successes.clone(),
            });
        }
        Ok(Overview {
            project: project.name,
            environments,
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
            version::validate(project.version_scheme, v).map_err(|m| {
                // A version of either scheme's form is well formed; whether it fits this
                // project's scheme (or is a real date) is a fact about the project: 422.
                if version::has_form(v) {
                    ReleaseError::unprocessable("version", m)
                } else {
                    ReleaseError::invalid("version", m)
                }
            })?;
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
        let request = decide::cut_build(&project, pipeline, &candidate);
        let outcome = self
            .request_build(&request, candidate.created_at, resumed)
            .await?;
        let candidate = self.finish_cut(&candidate, &request, outcome).await?;
        Ok(Cut { release, candidate })
    }

    /// Records what the build request of `candidate` came to: the build linked and the candidate
    /// `building`, or why it stays `pending`, or `failed`.
    async fn finish_cut(
        &self,
        candidate: &Candidate,
        request: &BuildRequest,
        outcome: BuildOutcome,
    ) -> Result<Candidate> {
        let (p, v, n) = (
            candidate.project.as_str(),
            candidate.release_version.as_str(),
            candidate.number,
        );
        match outcome {
            BuildOutcome::Started(build) => {
                let link = BuildLink::Candidate {
                    project: p.to_string(),
                    release_version: v.to_string(),
                    number: n,
                };
                // If this write fails the candidate stays `pending` (true: kitebridge does not
                // know its build), and the error says the store is unavailable.
                self.store.link_build(&build.id, &link).await?;
                let build_ref = decide::build_ref(&request.pipeline, &build);
                let started = update_candidate_with(self.releases(), p, v, n, |c| {
                    decide::started_candidate(c, &build_ref, &build)
                })
                .await?;
                Ok(started.unwrap_or_else(|| candidate.clone()).answered())
            }
            BuildOutcome::Unknown(e) => {
                let reason = e.to_string();
                let noted = update_candidate_with(self.releases(), p, v, n, |c| {
                    decide::unknown_candidate(c, &reason, Utc::now())
                })
                .await;
                tracing::warn!(project = p, candidate = candidate.version, error = %e,
                    noted = noted.is_ok(), "the candidate's build may exist; it stays pending");
                Err(e)
            }
            BuildOutcome::Busy(e) => Err(e),
            BuildOutcome::NotCreated(e) => {
                let reason = e.to_string();
                let marked = update_candidate_with(self.releases(), p, v, n, |c| {
                    decide::failed_candidate(c, &reason, Utc::now())
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

    /// A candidate left without a build by an earlier cut of the newest release, at the same
    /// commit and branch, which a cut without a version resumes: its build may exist, so it
    /// must not become the next version.
    async fn resumable_newest(
        &self,
        project: &Project,
        releases: &[Release],
        commit: &str,
        branch: &str,
    ) -> Result<Option<Cut>> {
        let Some(newest) = releases.iter().max_by_key(|r| r.created_at) else {
            return Ok(None);
        };
        let latest = self
            .store
            .candidates(&project.name, &newest.version)
            .await?
            .into_iter()
            .max_by_key(|c| c.value.number);
        Ok(latest
            .filter(|c| {
                decide::resumes_candidate(&c.value, commit, branch, self.build_lease, Utc::now())
            })
            .map(|c| Cut {
                release: newest.clone(),
                candidate: c.value,
            }))
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
        // Without a version, the next one follows the recent releases (read once) and the
        // versions this call found taken meanwhile.
        let recent: Vec<String> = if req.version.is_none() {
            let page = self.store.list_releases(&project.name, None, 100).await?;
            if resumable
                && let Some(cut) = self
                    .resumable_newest(project, &page.items, commit, &req.branch)
                    .await?
            {
                return Ok((cut, true));
            }
            page.items.into_iter().map(|r| r.version).collect()
        } else {
            Vec::new()
        };
        let taken = &tokio::sync::Mutex::new(Vec::<String>::new());
        let recent = &recent;
        cas_retry(ATTEMPTS, || async move {
            let now = Utc::now();
            let version = match &req.version {
                Some(v) => v.clone(),
                None => {
                    let mut seen = recent.clone();
                    seen.extend(taken.lock().await.iter().cloned());
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
                    taken.lock().await.push(version);
                    return Ok(Cas::Retry);
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
                    && decide::resumes_candidate(c, commit, &req.branch, self.build_lease, now)
                {
                    let cut = Cut {
                        release: existing,
                        candidate: c.clone(),
                    };
                    return Ok(Cas::Done((cut, true)));
                }
                let number = latest.map_or(0, |c| c.number) + 1;
                let c = candidate(number, ulid::Ulid::new().to_string());
                let written = self.store.add_candidate(&c).await;
                let cut = Cut {
                    release: existing,
                    candidate: c,
                };
                return Ok(retry_on_conflict(written, (cut, false))?);
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
            let written = self.store.create_release(&release, &c).await;
            let cut = Cut {
                release,
                candidate: c,
            };
            let attempt = retry_on_conflict(written, (cut, false))?;
            if matches!(attempt, Cas::Retry) && req.version.is_none() {
                taken.lock().await.push(version);
            }
            Ok(attempt)
        })
        .await
    }

    // --- reading -----------------------------------------------------------------------------

    pub async fn list_releases(
        &self,
        project: &str,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<Page<Release>> {
        self.project(project).await?;
        let after = cursor
            .map(|c| id_cursor(c).map(|id| format!("RELEASES#{id}")))
            .transpose()?;
        let page = self
            .store
            .list_releases(project, after.as_deref(), limit)
            .await?;
        Ok(next_as_id(page, "RELEASES#"))
    }

    /// A page of releases with their candidates (oldest first), as the dashboard lists them:
    /// one read of the releases and one of each release's candidates.
    pub async fn releases_with_candidates(
        &self,
        project: &str,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<Page<(Release, Vec<Candidate>)>> {
        let page = self.list_releases(project, cursor, limit).await?;
        let mut items = Vec::with_capacity(page.items.len());
        for r in page.items {
            let candidates = self
                .store
                .candidates(project, &r.version)
                .await?
                .into_iter()
                .map(|c| c.value.answered())
                .collect();
            items.push((r, candidates));
        }
        Ok(Page {
            items,
            next: page.next,
        })
    }

    /// What a candidate of release `version` brings (its newest candidate, or `candidate`):
    /// the commits since the previous release's newest candidate, newest first, with their pull
    /// requests, only those touching the project's `paths` when it names any.
    pub async fn changelog(
        &self,
        project: &str,
        version: &str,
        candidate: Option<&str>,
    ) -> Result<Changelog> {
        let p = self.project(project).await?;
        let (release, candidates) = self.release(project, version).await?;
        let c = match candidate {
            Some(v) => candidates.iter().find(|c| c.version == v).ok_or_else(|| {
                ReleaseError::not_found(
                    "candidate_not_found",
                    format!("release `{version}` has no candidate `{v}`"),
                )
            })?,
            None => candidates.last().ok_or_else(|| {
                ReleaseError::not_found(
                    "candidate_not_found",
                    format!("release `{version}` has no candidate"),
                )
            })?,
        };
        // The previous release: the one cut just before this one, and its newest candidate.
        let previous = self
            .store
            .list_releases(project, Some(&format!("RELEASES#{}", release.cut_id)), 1)
            .await?
            .items
            .into_iter()
            .next();
        let since = match previous {
            Some(prev) => self
                .store
                .candidates(project, &prev.version)
                .await?
                .into_iter()
                .last()
                .map(|c| (c.value.version, c.value.commit)),
            None => None,
        };
        let (since_candidate_version, since_commit) = since.unzip();
        let (range, filter) = self
            .commit_range(&p, since_commit.as_deref(), &c.commit)
            .await?;
        Ok(Changelog {
            project: project.to_string(),
            release_version: release.version.clone(),
            candidate_version: c.version.clone(),
            commit: c.commit.clone(),
            since_candidate_version,
            since_commit,
            repository: range.repository.clone(),
            paths: p.paths.clone(),
            commits: select(range.commits, &filter),
            complete: range.complete,
            fetched_at: range.fetched_at,
        })
    }

    /// What runs in `environment`, and what is waiting to be promoted to it: the candidate
    /// running in the environment it requires (or, without one, the newest built candidate),
    /// with the commits that candidate has and the deployed one has not.
    pub async fn environment_changelog(
        &self,
        project: &str,
        environment: &str,
    ) -> Result<EnvironmentChangelog> {
        let p = self.project(project).await?;
        let env = Self::environment_of(&p, environment)?.clone();
        let running = |st: Option<EnvironmentState>| st.and_then(|s| s.successes.last().cloned());
        let deployed = running(
            self.store
                .environment(project, environment)
                .await?
                .map(|e| e.value),
        );
        let deployed = match deployed {
            Some(v) => Some(self.candidate(project, "candidate", &v).await?),
            None => None,
        };
        let waiting = match &env.requires {
            Some(r) => match running(self.store.environment(project, r).await?.map(|e| e.value)) {
                Some(v) => Some(self.candidate(project, "candidate", &v).await?),
                None => None,
            },
            None => self.newest_built(project).await?,
        };
        let at = |c: &Candidate| CandidateAt {
            candidate_version: c.version.clone(),
            commit: c.commit.clone(),
        };
        let waiting = waiting.filter(|w| deployed.as_ref().is_none_or(|d| d.version != w.version));
        let mut answer = EnvironmentChangelog {
            project: project.to_string(),
            environment: env.name.clone(),
            deployed: deployed.as_ref().map(at),
            waiting: waiting.as_ref().map(at),
            waiting_in: waiting.as_ref().and(env.requires.clone()),
            repository: p.repository.clone().unwrap_or_default(),
            paths: p.paths.clone(),
            commits: Vec::new(),
            complete: true,
        };
        if let Some(w) = &waiting {
            let (range, filter) = self
                .commit_range(&p, deployed.as_ref().map(|d| d.commit.as_str()), &w.commit)
                .await?;
            answer.repository = range.repository.clone();
            answer.complete = range.complete;
            answer.commits = select(range.commits, &filter);
        } else {
            // Nothing waiting: still say where it would be read from (or that it cannot be).
            self.changelog_source(&p)?;
        }
        Ok(answer)
    }

    /// The newest built candidate of the project, if any (among its newest releases).
    async fn newest_built(&self, project: &str) -> Result<Option<Candidate>> {
        let releases = self
            .store
            .list_releases(project, None, OVERVIEW_RELEASES)
            .await?;
        for r in releases.items {
            let built = self
                .store
                .candidates(project, &r.version)
                .await?
                .into_iter()
                .rev()
                .map(|c| c.value)
                .find(|c| c.state == CandidateState::Built);
            if built.is_some() {
                return Ok(built);
            }
        }
        Ok(None)
    }

    /// Where a project's changelogs come from: its repository on the configured Bitbucket.
    fn changelog_source<'a>(
        &'a self,
        p: &'a Project,
    ) -> Result<(&'a BitbucketClient, RepositoryRef, &'a str)> {
        let Some(repository) = p.repository.as_deref() else {
            return Err(ReleaseError::conflict(
                "repository_not_configured",
                format!(
                    "project `{}` names no Bitbucket repository; PUT it with \
                     \"repository\": \"OWNER/slug\" to read changelogs",
                    p.name
                ),
            ));
        };
        let repo = RepositoryRef::parse(repository)
            .ok_or_else(|| ReleaseError::unprocessable("repository", "must be OWNER/slug"))?;
        let Some(bitbucket) = &self.bitbucket else {
            return Err(ReleaseError::conflict(
                "bitbucket_not_configured",
                "kitebridge has no Bitbucket configured (BITBUCKET_URL) to read changelogs from",
            ));
        };
        Ok((bitbucket, repo, repository))
    }

    /// The commits `until` has and `since` has not, from the store when kept and settled, else
    /// read from Bitbucket (what is missing only) and kept; with the project's path filter.
    async fn commit_range(
        &self,
        p: &Project,
        since: Option<&str>,
        until: &str,
    ) -> Result<(CommitRange, PathFilter)> {
        let filter =
            PathFilter::new(&p.paths).map_err(|m| ReleaseError::unprocessable("paths", m))?;
        let want_paths = !p.paths.is_empty();
        let kept = self.store.commit_range(&p.name, since, until).await?;
        if let Some(k) = &kept
            && k.value.is_settled(want_paths)
        {
            return Ok((k.value.clone(), filter));
        }
        let (bitbucket, repo, repository) = self.changelog_source(p)?;
        let unavailable = ReleaseError::from_bitbucket;
        let (mut range, expected) = match kept {
            Some(k) => (k.value, Some(k.rev)),
            None => {
                let (commits, complete) = bitbucket
                    .commits_between(&repo, since, until, None, MAX_COMMITS)
                    .await
                    .map_err(unavailable)?;
                let range = CommitRange {
                    repository: repository.to_string(),
                    since: since.map(str::to_owned),
                    until: until.to_string(),
                    commits: commits
                        .into_iter()
                        .map(|commit| ChangelogCommit {
                            commit,
                            pull_requests: None,
                            paths: None,
                        })
                        .collect(),
                    complete,
                    fetched_at: Utc::now(),
                };
                (range, None)
            }
        };
        for entry in range.commits.iter_mut() {
            if want_paths && entry.paths.is_none() {
                entry.paths = Some(
                    bitbucket
                        .changed_paths(&repo, &entry.commit.id)
                        .await
                        .map_err(unavailable)?,
                );
            }
            // Pull requests only for commits the filter keeps.
            if entry.pull_requests.is_none() && filter.selects_commit(entry) {
                entry.pull_requests = bitbucket
                    .pull_requests_of(&repo, &entry.commit.id)
                    .await
                    .map_err(unavailable)?;
            }
        }
        match self.store.put_commit_range(&p.name, &range, expected).await {
            // Another reader kept it first: the same range either way.
            Ok(_) | Err(crate::store::StoreError::Conflict) => {}
            Err(e) => return Err(e.into()),
        }
        Ok((range, filter))
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
            self.releases(),
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
        let prefix = format!("DEPLOYMENT#{environment}#");
        let after = cursor
            .map(|c| id_cursor(c).map(|id| format!("{prefix}{id}")))
            .transpose()?;
        let page = next_as_id(
            self.store
                .list_deployments(project, environment, after.as_deref(), limit)
                .await?,
            &prefix,
        );
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

    /// [`decide::deployable`] over the state of the environment `env` requires first.
    async fn check_deployable(&self, p: &Project, env: &Environment, c: &Candidate) -> Result<()> {
        let required = match &env.requires {
            Some(required) => self
                .store
                .environment(&p.name, required)
                .await?
                .map(|e| e.value),
            None => None,
        };
        Ok(decide::deployable(c, env, required.as_ref())?)
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
        let intent = Intent {
            project: p,
            environment: env,
            candidate: c,
            rollback,
            force,
        };
        let (d, resumed) = self.take_lock(&intent).await?;
        let Some(pipeline) = &env.deploy_pipeline else {
            return Ok(d.answered());
        };
        let request = decide::deploy_build(p, env, pipeline, c, &d);
        let outcome = self.request_build(&request, d.created_at, resumed).await?;
        self.finish_deployment(&d, &request, outcome).await
    }

    /// Writes the deployment `intent` asks for with the environment's lock, as
    /// [`decide::lock`] allows; `true` when it resumes a deployment left without a build.
    async fn take_lock(&self, intent: &Intent<'_>) -> Result<(Deployment, bool)> {
        let (project, environment) = (
            intent.project.name.as_str(),
            intent.environment.name.as_str(),
        );
        cas_retry(ATTEMPTS, || async move {
            let current = self.store.environment(project, environment).await?;
            let st = current
                .as_ref()
                .map(|e| e.value.clone())
                .unwrap_or_else(|| empty_env(project, environment));
            let active = match &st.active_deployment {
                Some(id) => self.store.deployment(project, environment, id).await?,
                None => None,
            };
            let timing = Timing {
                now: Utc::now(),
                deployment_timeout: self.deployment_timeout,
                build_lease: self.build_lease,
            };
            match decide::lock(intent, &st, active.as_ref().map(|d| &d.value), &timing)? {
                Lock::ExpireStuck(id) => {
                    expire_if_stuck(
                        self.releases(),
                        project,
                        environment,
                        &id,
                        self.deployment_timeout,
                    )
                    .await?;
                    Ok(Cas::Retry)
                }
                Lock::Resume(d) => Ok(Cas::Done((*d, true))),
                Lock::Take { stale } => {
                    if stale {
                        tracing::warn!(
                            project,
                            environment,
                            active = st.active_deployment,
                            "environment lock names a finished or missing deployment; taking it over"
                        );
                    }
                    let id = ulid::Ulid::new().to_string();
                    let (d, locked) = decide::new_deployment(intent, &st, id, timing.now);
                    let written = self
                        .store
                        .create_deployment(&d, &locked, current.map(|e| e.rev))
                        .await;
                    Ok(retry_on_conflict(written, (d, false))?)
                }
            }
        })
        .await
    }

    /// Records what the build request of deployment `d` came to: the build linked (its states
    /// move the deployment from then on), or why it stays `pending`, or `error`.
    async fn finish_deployment(
        &self,
        d: &Deployment,
        request: &BuildRequest,
        outcome: BuildOutcome,
    ) -> Result<Deployment> {
        let (p, env, id) = (d.project.as_str(), d.environment.as_str(), d.id.as_str());
        match outcome {
            BuildOutcome::Started(build) => {
                let link = BuildLink::Deployment {
                    project: p.to_string(),
                    environment: env.to_string(),
                    id: id.to_string(),
                };
                self.store.link_build(&build.id, &link).await?;
                let build_ref = decide::build_ref(&request.pipeline, &build);
                let started = update_deployment_with(self.releases(), p, env, id, |cur| {
                    decide::started_deployment(cur, &build_ref, &build)
                })
                .await?;
                Ok(started.unwrap_or_else(|| d.clone()).answered())
            }
            BuildOutcome::Unknown(e) => {
                let reason = e.to_string();
                let noted = update_deployment_with(self.releases(), p, env, id, |cur| {
                    decide::unknown_deployment(cur, &reason, Utc::now())
                })
                .await;
                tracing::warn!(project = p, environment = env, deployment = id,
                    error = %e, noted = noted.is_ok(), "the deployment's build may exist; it stays pending");
                Err(e)
            }
            BuildOutcome::Busy(e) => Err(e),
            BuildOutcome::NotCreated(e) => {
                let reason = e.to_string();
                let released = update_deployment_with(self.releases(), p, env, id, |cur| {
                    decide::failed_deployment(cur, &reason, Utc::now())
                })
                .await;
                if let Err(store_error) = released {
                    tracing::error!(project = p, environment = env, deployment = id,
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
        let status = parse_status(&req.status)?;
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

        let target = self.status_target(project, environment, status).await?;
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
                    self.releases(),
                    project,
                    environment,
                    &current.id,
                    |d| decide::status_set(d, status, message.as_deref(), Utc::now()),
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

    /// The deployment a status update is about: the active one, or the latest (for a repeated
    /// update of a finished deployment) when it already has that status.
    async fn status_target(
        &self,
        project: &str,
        environment: &str,
        status: DeploymentStatus,
    ) -> Result<Option<Versioned<Deployment>>> {
        let st = self.store.environment(project, environment).await?;
        if let Some(id) = st.and_then(|e| e.value.active_deployment)
            && let Some(d) = self.store.deployment(project, environment, &id).await?
        {
            return Ok(Some(d));
        }
        Ok(self
            .store
            .list_deployments(project, environment, None, 1)
            .await?
            .items
            .into_iter()
            .next()
            .filter(|d| d.value.status == status))
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
        let reason = &optional_text("reason", req.reason)?;
        let frozen = req.frozen;
        cas_retry(ATTEMPTS, || async move {
            let current = self.store.environment(project, environment).await?;
            let mut st = current
                .as_ref()
                .map(|e| e.value.clone())
                .unwrap_or_else(|| empty_env(project, environment));
            st.frozen = frozen;
            st.freeze_reason = if frozen { reason.clone() } else { None };
            let written = self
                .store
                .put_environment(&st, current.map(|e| e.rev))
                .await;
            Ok(retry_on_conflict(written, st)?)
        })
        .await
    }

    // --- Buildkite ---------------------------------------------------------------------------

    fn buildkite(&self) -> Result<&BuildkiteClient> {
        self.buildkite.as_ref().ok_or_else(|| {
            ReleaseError::BuildkiteUnavailable(
                "no Buildkite API token is configured (BUILDKITE_API_TOKEN)".into(),
            )
        })
    }

    /// [`request_build`] with this service's Buildkite client and lease.
    async fn request_build(
        &self,
        request: &BuildRequest,
        since: chrono::DateTime<Utc>,
        resumed: bool,
    ) -> Result<BuildOutcome> {
        let buildkite = self.buildkite()?;
        request_build(
            self.store.as_ref(),
            buildkite,
            self.build_lease,
            request,
            since,
            resumed,
        )
        .await
    }
}

/// A listing's `cursor`: the id (a ULID) of the previous page's last item, which the listing
/// continues after. Any ULID is a cursor (one that names no item starts after where it would be).
fn id_cursor(c: &str) -> Result<String> {
    ulid::Ulid::from_string(c)
        .map(|u| u.to_string())
        .map_err(|_| {
            ReleaseError::invalid(
                "cursor",
                "not a cursor of this listing (the `next_cursor` of its previous page)",
            )
        })
}

/// The store's page with its continuation as the last item's id (the sort key after `prefix`).
fn next_as_id<T>(page: Page<T>, prefix: &str) -> Page<T> {
    Page {
        next: page
            .next
            .map(|sk| sk.strip_prefix(prefix).map(str::to_owned).unwrap_or(sk)),
        items: page.items,
    }
}

/// How many of the newest releases the overview reads candidates from.
const OVERVIEW_RELEASES: usize = 10;
/// How many recent deployments of an environment the overview reads for its current and
/// previous successful ones.
const OVERVIEW_DEPLOYMENTS: usize = 50;
/// Most candidates the overview lists per environment.
const OVERVIEW_CANDIDATES: usize = 5;

/// A project's environments side by side ([`ReleaseService::overview`]).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Overview {
    pub project: String,
    pub environments: Vec<EnvironmentOverview>,
}

/// The commits of a range the project's paths keep.
fn select(commits: Vec<ChangelogCommit>, filter: &PathFilter) -> Vec<ChangelogCommit> {
    commits
        .into_iter()
        .filter(|c| filter.selects_commit(c))
        .collect()
}

/// One environment in an [`Overview`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct EnvironmentOverview {
    pub name: String,
    pub requires: Option<String>,
    pub frozen: bool,
    pub freeze_reason: Option<String>,
    /// The unfinished deployment, if any.
    pub deploying: Option<Deployment>,
    /// The newest deployment that succeeded here (what runs here), and the one before it.
    pub current: Option<Deployment>,
    pub previous: Option<Deployment>,
    /// The newest built candidates not yet deployed successfully here, newest first.
    pub candidates: Vec<Waiting>,
    /// Candidate versions deployed successfully here, oldest first (for the dashboard's grid;
    /// the API answers them at `GET .../environments/{environment}`).
    #[serde(skip)]
    pub successes: Vec<String>,
}

/// A built candidate not yet deployed to an environment, and what a deploy would answer now.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Waiting {
    pub version: String,
    pub release_version: String,
    pub commit: String,
    pub created_at: chrono::DateTime<Utc>,
    /// A deploy without `force` would start now.
    pub deployable: bool,
    /// Otherwise why not: the 409's `error` and `message` a deploy would answer.
    pub refusal: Option<RefusalView>,
    /// The environment it must succeed in first (promotion order), when that is why.
    pub waiting_for: Option<String>,
}

/// A [`decide::Refusal`] as the API words it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RefusalView {
    pub error: &'static str,
    pub message: String,
}

impl Waiting {
    fn new(c: &Candidate, refusal: Option<decide::Refusal>) -> Waiting {
        let waiting_for = match &refusal {
            Some(decide::Refusal::PromotionRequired { required, .. }) => Some(required.clone()),
            _ => None,
        };
        let refusal = refusal.map(|r| {
            let e = ReleaseError::from(r);
            RefusalView {
                error: e.kind(),
                message: e.message(),
            }
        });
        Waiting {
            version: c.version.clone(),
            release_version: c.release_version.clone(),
            commit: c.commit.clone(),
            created_at: c.created_at,
            deployable: refusal.is_none(),
            refusal,
            waiting_for,
        }
    }
}
