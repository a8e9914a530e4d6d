//! The releases service's decisions, as pure functions of what was read: whether a candidate
//! may deploy to an environment now (or why not), what a deployment or a cut writes, and the
//! Buildkite build a cut or a deployment asks for. The service reads, calls these, and writes;
//! they are table-tested below.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::error::ReleaseError;
use super::model::{
    BuildRef, Candidate, CandidateState, Deployment, DeploymentStatus, Environment,
    EnvironmentState, PipelineRef, Project,
};
use super::state::{self, candidate_advances};
use crate::buildkite::Build;
use crate::buildkite::client::CreateBuild;

/// Buildkite meta-data keys that tie a build back to what kitebridge created it for.
pub const META_CANDIDATE: &str = "kitebridge:candidate";
pub const META_DEPLOYMENT: &str = "kitebridge:deployment";

/// Whether a record still without a build was left so by an attempt that ended without
/// knowing whether the build exists (it noted why), or by one that is over by now (the process
/// died): then a new call for the same thing resumes it. A record younger than the lease with
/// no note is still being requested, and a racing call for the same thing is a call of its own.
pub fn left_unknown(
    error_message: Option<&str>,
    created_at: DateTime<Utc>,
    lease: Duration,
    now: DateTime<Utc>,
) -> bool {
    error_message.is_some()
        || chrono::Duration::from_std(lease).is_ok_and(|lease| created_at + lease < now)
}

/// Whether a cut at `commit` and `branch` is a retry of the cut that left `c` without a build.
pub fn resumes_candidate(
    c: &Candidate,
    commit: &str,
    branch: &str,
    lease: Duration,
    now: DateTime<Utc>,
) -> bool {
    c.state == CandidateState::Pending
        && c.build.is_none()
        && c.commit == commit
        && c.branch == branch
        && left_unknown(c.error_message.as_deref(), c.created_at, lease, now)
}

// ---------------------------------------------------------------------------------------------
// May this candidate deploy here now?

/// Why a candidate may not deploy to an environment now (a 409 each).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Only a built candidate deploys.
    NotBuilt {
        candidate: String,
        state: CandidateState,
    },
    /// Promotion order: it must have been deployed successfully to `required` first.
    PromotionRequired {
        candidate: String,
        required: String,
        environment: String,
    },
    /// One deployment at a time: `id` holds the environment.
    DeploymentRunning {
        id: String,
        candidate: String,
        environment: String,
        status: DeploymentStatus,
    },
    /// The environment is frozen and the request did not force it.
    Frozen {
        environment: String,
        reason: Option<String>,
    },
}

impl From<Refusal> for ReleaseError {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::NotBuilt { candidate, state } => ReleaseError::conflict(
                "candidate_not_built",
                format!(
                    "release candidate `{candidate}` is {}; only a built candidate can be deployed",
                    state.as_str()
                ),
            ),
            Refusal::PromotionRequired {
                candidate,
                required,
                environment,
            } => ReleaseError::conflict(
                "promotion_required",
                format!(
                    "`{candidate}` must be deployed successfully to `{required}` before `{environment}`"
                ),
            ),
            Refusal::DeploymentRunning {
                id,
                candidate,
                environment,
                status,
            } => ReleaseError::conflict(
                "deployment_in_progress",
                format!(
                    "deployment {id} of `{candidate}` to `{environment}` is {}; one deployment at a time",
                    status.as_str()
                ),
            ),
            Refusal::Frozen {
                environment,
                reason,
            } => {
                let reason = reason.map(|r| format!(" ({r})")).unwrap_or_default();
                ReleaseError::conflict(
                    "environment_frozen",
                    format!(
                        "environment `{environment}` is frozen{reason}; pass \"force\": true to deploy anyway"
                    ),
                )
            }
        }
    }
}

/// Whether `c` may deploy to `env` by what the candidate is: built, and (when `env` requires
/// another environment first) deployed successfully there; `required` is that environment's
/// state, `None` when nothing was ever written for it.
pub fn deployable(
    c: &Candidate,
    env: &Environment,
    required: Option<&EnvironmentState>,
) -> Result<(), Refusal> {
    if c.state != CandidateState::Built {
        return Err(Refusal::NotBuilt {
            candidate: c.version.clone(),
            state: c.state,
        });
    }
    if let Some(name) = &env.requires
        && !required.is_some_and(|st| st.successes.contains(&c.version))
    {
        return Err(Refusal::PromotionRequired {
            candidate: c.version.clone(),
            required: name.clone(),
            environment: env.name.clone(),
        });
    }
    Ok(())
}

/// A deployment asked for: of `candidate` to `environment`.
#[derive(Debug, Clone, Copy)]
pub struct Intent<'a> {
    pub project: &'a Project,
    pub environment: &'a Environment,
    pub candidate: &'a Candidate,
    pub rollback: bool,
    pub force: bool,
}

/// The clock and the limits a lock decision is taken under.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub now: DateTime<Utc>,
    /// After this long without a status change a deployment is stuck.
    pub deployment_timeout: Duration,
    /// How long a build request holds its record (see [`left_unknown`]).
    pub build_lease: Duration,
}

/// What to do with the environment's lock for a deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lock {
    /// Take it with a new deployment. `stale`: it names a finished or missing deployment (the
    /// lock moves atomically with its deployment, so this is worth a warning), taken over.
    Take { stale: bool },
    /// It is held by a deployment stuck past the timeout: expire that one, then decide again.
    ExpireStuck(String),
    /// It is held by this same deployment, asked again after its build request went
    /// unanswered: resume it rather than refuse (or, once it is expired, start another).
    Resume(Box<Deployment>),
}

/// Whether the deployment `intent` may take the environment's lock now, given the
/// environment's state `st` and the deployment its lock names (`active`, as read; `None` when it
/// names none or a missing one).
pub fn lock(
    intent: &Intent<'_>,
    st: &EnvironmentState,
    active: Option<&Deployment>,
    t: &Timing,
) -> Result<Lock, Refusal> {
    let env = intent.environment;
    let mut stale = false;
    if let Some(id) = &st.active_deployment {
        match active {
            Some(d) if state::is_stuck(d, t.now, t.deployment_timeout) => {
                return Ok(Lock::ExpireStuck(id.clone()));
            }
            Some(d)
                if env.deploy_pipeline.is_some()
                    && d.status == DeploymentStatus::Pending
                    && d.build.is_none()
                    && d.candidate_version == intent.candidate.version
                    && d.rollback == intent.rollback
                    && left_unknown(
                        d.error_message.as_deref(),
                        d.created_at,
                        t.build_lease,
                        t.now,
                    ) =>
            {
                return Ok(Lock::Resume(Box::new(d.clone())));
            }
            Some(d) if !d.status.is_terminal() => {
                return Err(Refusal::DeploymentRunning {
                    id: d.id.clone(),
                    candidate: d.candidate_version.clone(),
                    environment: env.name.clone(),
                    status: d.status,
                });
            }
            _ => stale = true,
        }
    }
    if st.frozen && !intent.force {
        return Err(Refusal::Frozen {
            environment: env.name.clone(),
            reason: st.freeze_reason.clone(),
        });
    }
    Ok(Lock::Take { stale })
}

/// The deployment that takes the lock of an environment in state `st`, and that state with the
/// lock taken (written together).
pub fn new_deployment(
    intent: &Intent<'_>,
    st: &EnvironmentState,
    id: String,
    now: DateTime<Utc>,
) -> (Deployment, EnvironmentState) {
    let c = intent.candidate;
    let d = Deployment {
        id,
        project: intent.project.name.clone(),
        environment: intent.environment.name.clone(),
        release_version: c.release_version.clone(),
        candidate_version: c.version.clone(),
        commit: c.commit.clone(),
        status: DeploymentStatus::Pending,
        build: None,
        from_candidate_version: st.successes.last().cloned(),
        rollback: intent.rollback,
        forced: intent.force && st.frozen,
        created_at: now,
        updated_at: now,
        finished_at: None,
        error_message: None,
    };
    let mut locked = st.clone();
    locked.active_deployment = Some(d.id.clone());
    (d, locked)
}

// ---------------------------------------------------------------------------------------------
// The builds a cut and a deployment ask for

/// A build kitebridge asks Buildkite for: where, what, and the meta-data pair that finds it
/// again when the answer to the request was lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildRequest {
    pub pipeline: PipelineRef,
    pub body: CreateBuild,
    pub meta_key: &'static str,
    pub meta_value: String,
}

/// The build of a release candidate, on the project's build pipeline.
pub fn cut_build(project: &Project, pipeline: &PipelineRef, c: &Candidate) -> BuildRequest {
    let mut env = project.env.clone();
    env.insert("AVIATOR_RELEASE_CUT_ID".into(), c.cut_id.clone());
    env.insert(
        "AVIATOR_RELEASE_CANDIDATE_VERSION".into(),
        c.version.clone(),
    );
    env.insert("AVIATOR_RELEASE_CUT_COMMIT_HASH".into(), c.commit.clone());
    let meta_value = format!("{}/{}", project.name, c.version);
    BuildRequest {
        pipeline: pipeline.clone(),
        body: CreateBuild {
            commit: c.commit.clone(),
            branch: c.branch.clone(),
            message: format!("Release {} ({})", c.version, project.name),
            env,
            meta_data: [
                (META_CANDIDATE.to_string(), meta_value.clone()),
                ("release-version".to_string(), c.version.clone()),
            ]
            .into(),
        },
        meta_key: META_CANDIDATE,
        meta_value,
    }
}

/// The build of deployment `d` (of candidate `c`), on the environment's deploy pipeline.
pub fn deploy_build(
    project: &Project,
    env: &Environment,
    pipeline: &PipelineRef,
    c: &Candidate,
    d: &Deployment,
) -> BuildRequest {
    let mut vars = env.env.clone();
    vars.insert("AVIATOR_DEPLOYMENT_ID".into(), d.id.clone());
    vars.insert(
        "AVIATOR_RELEASE_CANDIDATE_VERSION".into(),
        c.version.clone(),
    );
    vars.insert("AVIATOR_RELEASE_CUT_COMMIT_HASH".into(), c.commit.clone());
    let meta_value = format!("{}/{}/{}", project.name, env.name, d.id);
    let verb = if d.rollback { "Roll back to" } else { "Deploy" };
    BuildRequest {
        pipeline: pipeline.clone(),
        body: CreateBuild {
            commit: c.commit.clone(),
            branch: c.branch.clone(),
            message: format!("{verb} {} to {} ({})", c.version, env.name, project.name),
            env: vars,
            meta_data: [
                (META_DEPLOYMENT.to_string(), meta_value.clone()),
                ("release-version".to_string(), c.version.clone()),
            ]
            .into(),
        },
        meta_key: META_DEPLOYMENT,
        meta_value,
    }
}

// ---------------------------------------------------------------------------------------------
// What a build request's outcome does to its record

pub fn build_ref(pipeline: &PipelineRef, build: &Build) -> BuildRef {
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
pub fn started_candidate(c: &Candidate, build_ref: &BuildRef, build: &Build) -> Option<Candidate> {
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

/// The deployment once its build exists (see [`started_candidate`]).
pub fn started_deployment(
    d: &Deployment,
    build_ref: &BuildRef,
    build: &Build,
) -> Option<Deployment> {
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

/// A candidate still waiting for a build nobody knows exists, with why: it stays `pending`.
pub fn unknown_candidate(c: &Candidate, reason: &str, now: DateTime<Utc>) -> Option<Candidate> {
    (c.state == CandidateState::Pending && c.build.is_none()).then(|| {
        let mut u = c.clone();
        u.error_message = Some(reason.to_string());
        u.updated_at = now;
        u
    })
}

/// A pending candidate whose build Buildkite certainly did not create: `failed`, with why.
pub fn failed_candidate(c: &Candidate, reason: &str, now: DateTime<Utc>) -> Option<Candidate> {
    (c.state == CandidateState::Pending).then(|| {
        let mut f = c.clone();
        f.state = CandidateState::Failed;
        f.error_message = Some(reason.to_string());
        f.updated_at = now;
        f
    })
}

/// A deployment still waiting for a build nobody knows exists, with why: it stays `pending`
/// (and keeps its environment).
pub fn unknown_deployment(d: &Deployment, reason: &str, now: DateTime<Utc>) -> Option<Deployment> {
    (d.status == DeploymentStatus::Pending && d.build.is_none()).then(|| {
        let mut u = d.clone();
        u.error_message = Some(reason.to_string());
        u.updated_at = now;
        u
    })
}

/// An unfinished deployment whose build Buildkite certainly did not create: `error`, with why
/// (which releases its environment).
pub fn failed_deployment(d: &Deployment, reason: &str, now: DateTime<Utc>) -> Option<Deployment> {
    (!d.status.is_terminal()).then(|| {
        let mut f = d.clone();
        f.status = DeploymentStatus::Error;
        f.error_message = Some(reason.to_string());
        f.updated_at = now;
        f.finished_at = Some(now);
        f
    })
}

/// A deployment with the status set by API (when [`state::patch_decision`] allows it), and the
/// message when one was given.
pub fn status_set(
    d: &Deployment,
    status: DeploymentStatus,
    message: Option<&str>,
    now: DateTime<Utc>,
) -> Option<Deployment> {
    (state::patch_decision(d.status, status) == state::PatchDecision::Apply).then(|| {
        let mut n = d.clone();
        n.status = status;
        n.updated_at = now;
        if status.is_terminal() {
            n.finished_at = Some(now);
        }
        if let Some(m) = message {
            n.error_message = Some(m.to_string());
        }
        n
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use chrono::TimeZone;

    use super::*;

    /// Name, candidate state, required environment, its state, and the expected refusal kind.
    type DeployableCase<'a> = (
        &'a str,
        CandidateState,
        Option<&'a str>,
        Option<&'a EnvironmentState>,
        Result<(), &'a str>,
    );
    /// Name, environment state, its active deployment, deploy pipeline?, force, expected lock.
    type LockCase = (
        &'static str,
        EnvironmentState,
        Option<Deployment>,
        bool,
        bool,
        Result<Lock, &'static str>,
    );

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap()
    }

    fn pipeline(name: &str) -> PipelineRef {
        PipelineRef {
            organization: "acme".into(),
            pipeline: name.into(),
        }
    }

    fn project() -> Project {
        Project {
            name: "web".into(),
            build_pipeline: Some(pipeline("web-release")),
            environments: Vec::new(),
            version_scheme: Default::default(),
            env: BTreeMap::from([("REGION".to_string(), "eu".to_string())]),
            repository: None,
            paths: Vec::new(),
            created_at: t0(),
            updated_at: t0(),
        }
    }

    fn env(requires: Option<&str>, with_pipeline: bool) -> Environment {
        Environment {
            name: "prod".into(),
            deploy_pipeline: with_pipeline.then(|| pipeline("web-deploy")),
            requires: requires.map(str::to_string),
            env: BTreeMap::from([("TIER".to_string(), "1".to_string())]),
        }
    }

    fn candidate(state: CandidateState) -> Candidate {
        Candidate {
            project: "web".into(),
            release_version: "1.4.0".into(),
            number: 2,
            version: "1.4.0-rc2".into(),
            cut_id: "01CUT".into(),
            commit: "a".repeat(40),
            branch: "main".into(),
            state,
            build: None,
            build_state: None,
            error_message: None,
            created_at: t0(),
            updated_at: t0(),
        }
    }

    fn state_with(successes: &[&str], frozen: bool, active: Option<&str>) -> EnvironmentState {
        EnvironmentState {
            project: "web".into(),
            environment: "prod".into(),
            frozen,
            freeze_reason: frozen.then(|| "release week".to_string()),
            active_deployment: active.map(str::to_string),
            successes: successes.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn deployment(status: DeploymentStatus, candidate: &str, age_min: i64) -> Deployment {
        let at = t0() - chrono::Duration::minutes(age_min);
        Deployment {
            id: "01DEP".into(),
            project: "web".into(),
            environment: "prod".into(),
            release_version: "1.4.0".into(),
            candidate_version: candidate.into(),
            commit: "a".repeat(40),
            status,
            build: None,
            from_candidate_version: None,
            rollback: false,
            forced: false,
            created_at: at,
            updated_at: at,
            finished_at: None,
            error_message: None,
        }
    }

    fn kind(r: Refusal) -> &'static str {
        match ReleaseError::from(r) {
            ReleaseError::Conflict { kind, .. } => kind,
            other => panic!("a refusal is a 409 conflict, got {other:?}"),
        }
    }

    #[test]
    fn a_candidate_deploys_when_built_and_promoted() {
        let staging_ok = state_with(&["1.4.0-rc2"], false, None);
        let staging_other = state_with(&["1.3.0-rc1"], false, None);
        let cases: Vec<DeployableCase> = vec![
            (
                "built, no promotion order",
                CandidateState::Built,
                None,
                None,
                Ok(()),
            ),
            (
                "built, promoted",
                CandidateState::Built,
                Some("staging"),
                Some(&staging_ok),
                Ok(()),
            ),
            (
                "built, not promoted",
                CandidateState::Built,
                Some("staging"),
                Some(&staging_other),
                Err("promotion_required"),
            ),
            (
                "built, required env never used",
                CandidateState::Built,
                Some("staging"),
                None,
                Err("promotion_required"),
            ),
            (
                "still building",
                CandidateState::Building,
                None,
                None,
                Err("candidate_not_built"),
            ),
            (
                "pending, promoted",
                CandidateState::Pending,
                Some("staging"),
                Some(&staging_ok),
                Err("candidate_not_built"),
            ),
            (
                "failed",
                CandidateState::Failed,
                None,
                None,
                Err("candidate_not_built"),
            ),
        ];
        for (name, state, requires, required, want) in cases {
            let got = deployable(&candidate(state), &env(requires, false), required).map_err(kind);
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn the_environment_lock_is_taken_resumed_expired_or_refused() {
        use DeploymentStatus::*;
        let timing = Timing {
            now: t0(),
            deployment_timeout: Duration::from_secs(30 * 60),
            build_lease: Duration::from_secs(60),
        };
        let noted = |mut d: Deployment| {
            d.error_message = Some("no answer".into());
            d
        };
        let take = Ok(Lock::Take { stale: false });
        let cases: Vec<LockCase> = vec![
            (
                "free",
                state_with(&[], false, None),
                None,
                true,
                false,
                take.clone(),
            ),
            (
                "frozen",
                state_with(&[], true, None),
                None,
                true,
                false,
                Err("environment_frozen"),
            ),
            (
                "frozen, forced",
                state_with(&[], true, None),
                None,
                true,
                true,
                take.clone(),
            ),
            (
                "running elsewhere",
                state_with(&[], false, Some("01DEP")),
                Some(deployment(InProgress, "1.3.0-rc1", 1)),
                true,
                false,
                Err("deployment_in_progress"),
            ),
            (
                "running wins over frozen",
                state_with(&[], true, Some("01DEP")),
                Some(deployment(Pending, "1.3.0-rc1", 1)),
                true,
                true,
                Err("deployment_in_progress"),
            ),
            (
                "stuck",
                state_with(&[], false, Some("01DEP")),
                Some(deployment(InProgress, "1.3.0-rc1", 31)),
                true,
                false,
                Ok(Lock::ExpireStuck("01DEP".into())),
            ),
            (
                "same deployment, build unknown",
                state_with(&[], false, Some("01DEP")),
                Some(noted(deployment(Pending, "1.4.0-rc2", 1))),
                true,
                false,
                Ok(Lock::Resume(Box::new(noted(deployment(
                    Pending,
                    "1.4.0-rc2",
                    1,
                ))))),
            ),
            (
                "same deployment, lease lapsed",
                state_with(&[], false, Some("01DEP")),
                Some(deployment(Pending, "1.4.0-rc2", 2)),
                true,
                false,
                Ok(Lock::Resume(Box::new(deployment(Pending, "1.4.0-rc2", 2)))),
            ),
            (
                "same deployment, still being requested",
                state_with(&[], false, Some("01DEP")),
                Some(deployment(Pending, "1.4.0-rc2", 0)),
                true,
                false,
                Err("deployment_in_progress"),
            ),
            (
                "same deployment without a pipeline is not resumed",
                state_with(&[], false, Some("01DEP")),
                Some(noted(deployment(Pending, "1.4.0-rc2", 1))),
                false,
                false,
                Err("deployment_in_progress"),
            ),
            (
                "lock names a finished deployment",
                state_with(&[], false, Some("01DEP")),
                Some(deployment(Success, "1.3.0-rc1", 5)),
                true,
                false,
                Ok(Lock::Take { stale: true }),
            ),
            (
                "lock names a missing deployment",
                state_with(&[], false, Some("01DEP")),
                None,
                true,
                false,
                Ok(Lock::Take { stale: true }),
            ),
            (
                "stale lock, frozen",
                state_with(&[], true, Some("01DEP")),
                None,
                true,
                false,
                Err("environment_frozen"),
            ),
        ];
        let (p, c) = (project(), candidate(CandidateState::Built));
        for (name, st, active, with_pipeline, force, want) in cases {
            let e = env(None, with_pipeline);
            let intent = Intent {
                project: &p,
                environment: &e,
                candidate: &c,
                rollback: false,
                force,
            };
            let got = lock(&intent, &st, active.as_ref(), &timing).map_err(kind);
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn a_new_deployment_holds_the_lock_and_remembers_what_was_live() {
        let (p, e, c) = (project(), env(None, true), candidate(CandidateState::Built));
        for (frozen, force, forced) in [
            (false, false, false),
            (true, true, true),
            (false, true, false),
        ] {
            let intent = Intent {
                project: &p,
                environment: &e,
                candidate: &c,
                rollback: true,
                force,
            };
            let st = state_with(&["1.2.0-rc1", "1.3.0-rc1"], frozen, None);
            let (d, locked) = new_deployment(&intent, &st, "01NEW".into(), t0());
            assert_eq!(locked.active_deployment.as_deref(), Some("01NEW"));
            assert_eq!(d.from_candidate_version.as_deref(), Some("1.3.0-rc1"));
            assert_eq!(
                (d.status, d.rollback, d.forced),
                (DeploymentStatus::Pending, true, forced)
            );
            assert_eq!(
                (d.candidate_version.as_str(), d.created_at),
                ("1.4.0-rc2", t0())
            );
        }
    }

    #[test]
    fn the_builds_a_cut_and_a_deployment_ask_for() {
        let (p, e, c) = (
            project(),
            env(None, true),
            candidate(CandidateState::Pending),
        );
        let cut = cut_build(&p, &pipeline("web-release"), &c);
        assert_eq!(cut.pipeline, pipeline("web-release"));
        assert_eq!(
            (cut.meta_key, cut.meta_value.as_str()),
            (META_CANDIDATE, "web/1.4.0-rc2")
        );
        let want = serde_json::json!({
            "commit": "a".repeat(40),
            "branch": "main",
            "message": "Release 1.4.0-rc2 (web)",
            "env": {
                "REGION": "eu",
                "AVIATOR_RELEASE_CUT_ID": "01CUT",
                "AVIATOR_RELEASE_CANDIDATE_VERSION": "1.4.0-rc2",
                "AVIATOR_RELEASE_CUT_COMMIT_HASH": "a".repeat(40),
            },
            "meta_data": {"kitebridge:candidate": "web/1.4.0-rc2", "release-version": "1.4.0-rc2"},
        });
        assert_eq!(serde_json::to_value(&cut.body).unwrap(), want);

        for (rollback, message) in [
            (false, "Deploy 1.4.0-rc2 to prod (web)"),
            (true, "Roll back to 1.4.0-rc2 to prod (web)"),
        ] {
            let mut d = deployment(DeploymentStatus::Pending, "1.4.0-rc2", 0);
            d.rollback = rollback;
            let deploy = deploy_build(&p, &e, &pipeline("web-deploy"), &c, &d);
            assert_eq!(deploy.pipeline, pipeline("web-deploy"));
            assert_eq!(
                (deploy.meta_key, deploy.meta_value.as_str()),
                (META_DEPLOYMENT, "web/prod/01DEP")
            );
            let want = serde_json::json!({
                "commit": "a".repeat(40),
                "branch": "main",
                "message": message,
                "env": {
                    "TIER": "1",
                    "AVIATOR_DEPLOYMENT_ID": "01DEP",
                    "AVIATOR_RELEASE_CANDIDATE_VERSION": "1.4.0-rc2",
                    "AVIATOR_RELEASE_CUT_COMMIT_HASH": "a".repeat(40),
                },
                "meta_data": {"kitebridge:deployment": "web/prod/01DEP", "release-version": "1.4.0-rc2"},
            });
            assert_eq!(serde_json::to_value(&deploy.body).unwrap(), want);
        }
    }

    #[test]
    fn a_record_without_a_build_is_resumed_once_its_attempt_is_over() {
        let lease = Duration::from_secs(60);
        let cases = [
            ("noted", Some("timeout"), 0, true),
            ("fresh, no note", None, 30, false),
            ("older than the lease", None, 61, true),
        ];
        for (name, note, age_secs, want) in cases {
            let created = t0() - chrono::Duration::seconds(age_secs);
            assert_eq!(left_unknown(note, created, lease, t0()), want, "{name}");
        }
        let mut c = candidate(CandidateState::Pending);
        c.error_message = Some("timeout".into());
        assert!(resumes_candidate(&c, &"a".repeat(40), "main", lease, t0()));
        assert!(!resumes_candidate(&c, &"b".repeat(40), "main", lease, t0()));
        assert!(!resumes_candidate(&c, &"a".repeat(40), "dev", lease, t0()));
        c.state = CandidateState::Failed;
        assert!(!resumes_candidate(&c, &"a".repeat(40), "main", lease, t0()));
    }

    #[test]
    fn build_outcomes_move_records_only_from_where_they_apply() {
        let c = candidate(CandidateState::Pending);
        assert_eq!(
            unknown_candidate(&c, "x", t0())
                .unwrap()
                .error_message
                .as_deref(),
            Some("x")
        );
        assert_eq!(
            failed_candidate(&c, "no", t0()).unwrap().state,
            CandidateState::Failed
        );
        let built = candidate(CandidateState::Built);
        assert!(unknown_candidate(&built, "x", t0()).is_none());
        assert!(failed_candidate(&built, "x", t0()).is_none());

        let d = deployment(DeploymentStatus::Pending, "1.4.0-rc2", 0);
        let failed = failed_deployment(&d, "refused", t0()).unwrap();
        assert_eq!(
            (failed.status, failed.finished_at),
            (DeploymentStatus::Error, Some(t0()))
        );
        assert!(unknown_deployment(&d, "x", t0()).is_some());
        let done = deployment(DeploymentStatus::Success, "1.4.0-rc2", 0);
        assert!(failed_deployment(&done, "x", t0()).is_none());
        assert!(unknown_deployment(&done, "x", t0()).is_none());

        let set = status_set(&d, DeploymentStatus::Success, Some("ok"), t0()).unwrap();
        assert_eq!(
            (set.status, set.finished_at, set.error_message.as_deref()),
            (DeploymentStatus::Success, Some(t0()), Some("ok"))
        );
        assert!(status_set(&done, DeploymentStatus::InProgress, None, t0()).is_none());
    }
}
