//! The release state machine, as pure functions: how a Buildkite build state moves a candidate or
//! a deployment, how observations of one build are ordered (Buildkite's latest word wins, as for
//! commit statuses), what a deployment's change does to its environment, the rollback target,
//! and when a deployment counts as stuck. No I/O here; [`super::service`] and
//! [`super::tracker`] apply these decisions to the store.
//!
//! # Following a build
//!
//! Each observation of a candidate's or deployment's own build carries Buildkite's evidence of
//! when it was true, a [`StatusVersion`] (build number, `finished_at` or `started_at`, the
//! state's rank), ordered by [`status::compare`]; the record keeps the version of the last one
//! applied ([`BuildRef::observed`](super::model::BuildRef::observed)). Only a
//! [`Ordering::Newer`] observation is applied, and then the record takes the state it maps to,
//! in either direction: a finished build whose job is retried is running again (with a later
//! `started_at`) and then finishes again (with a later `finished_at`), so a `failed` candidate
//! goes back to `building` and on to `built`, and a `failure` deployment to `in_progress` and
//! `success`. A late or repeated delivery (`Older`, `Same`) changes nothing, and neither does
//! a `running` that cannot prove it is newer (`Ambiguous`: a late delivery, or a re-run that
//! kept its `started_at`); the re-run's end, with its newer `finished_at`, proves itself.
//!
//! Two exceptions: an `error` deployment stays `error` (it is kitebridge's own verdict, which
//! freed the environment, not Buildkite's word), and a finished record without a recorded
//! version (written before versions were kept) keeps the old rule, never out of a finished
//! state, as nothing tells a re-run of its build from a late delivery.

use chrono::{DateTime, Utc};

use super::model::{Candidate, CandidateState, Deployment, DeploymentStatus, EnvironmentState};
use crate::buildkite::BuildState;
use crate::buildkite::model::Build;
use crate::status::{self, Ordering, StatusVersion};

/// How many successful candidate versions an environment remembers (for rollback and
/// promotion). Bounded so the environment record stays small.
pub const SUCCESS_HISTORY: usize = 50;

/// What a release build's state means for its candidate; `None` for a state that says nothing
/// (an unknown state).
///
/// A blocked build (a block step is waiting) is still building: its artifacts are not final
/// until it passes. `not_run` (every step skipped by conditions) built nothing: failed.
pub fn candidate_state_for(state: &BuildState, blocked: bool) -> Option<CandidateState> {
    use BuildState::*;
    Some(match state {
        _ if blocked => CandidateState::Building,
        Creating | Scheduled | Waiting | Running | Failing | Blocked | Canceling => {
            CandidateState::Building
        }
        Passed => CandidateState::Built,
        Failed | WaitingFailed | NotRun => CandidateState::Failed,
        Canceled | Skipped => CandidateState::Canceled,
        Unknown(_) => return None,
    })
}

/// What a deploy build's state means for its deployment; `None` for an unknown state.
pub fn deployment_status_for(state: &BuildState, blocked: bool) -> Option<DeploymentStatus> {
    use BuildState::*;
    Some(match state {
        _ if blocked => DeploymentStatus::InProgress,
        Creating | Scheduled | Waiting => DeploymentStatus::Pending,
        Running | Failing | Blocked | Canceling => DeploymentStatus::InProgress,
        Passed => DeploymentStatus::Success,
        Failed | WaitingFailed | NotRun => DeploymentStatus::Failure,
        Canceled | Skipped => DeploymentStatus::Canceled,
        Unknown(_) => return None,
    })
}

/// Whether a candidate in `current` may move to `next` on word that carries no evidence of
/// order (a create-build answer): only forwards, never out of a finished state.
pub fn candidate_advances(current: CandidateState, next: CandidateState) -> bool {
    !current.is_terminal() && next.rank() > current.rank()
}

/// Whether a deployment in `current` may move to `next` on word without evidence of order (a
/// create-build answer, a `PATCH`): same rule as candidates.
pub fn deployment_advances(current: DeploymentStatus, next: DeploymentStatus) -> bool {
    !current.is_terminal() && next.rank() > current.rank()
}

/// The state a candidate in `current` takes from an observation of its own build that maps to
/// `next`, with version `observed`, given the version of the last observation applied
/// (`recorded`); `None` when the observation is not applied (module docs, "Following a build").
pub fn candidate_follows(
    current: CandidateState,
    recorded: Option<StatusVersion>,
    next: CandidateState,
    observed: StatusVersion,
) -> Option<CandidateState> {
    match recorded {
        Some(recorded) => (status::compare(observed, recorded) == Ordering::Newer).then_some(next),
        // Nothing to compare with: the first observation, or a record from before versions
        // were kept. Forwards only (the same state too, to record the version).
        None => (!current.is_terminal() && next.rank() >= current.rank()).then_some(next),
    }
}

/// The status a deployment in `current` takes from an observation of its own build (as
/// [`candidate_follows`]); an `error` deployment takes none.
pub fn deployment_follows(
    current: DeploymentStatus,
    recorded: Option<StatusVersion>,
    next: DeploymentStatus,
    observed: StatusVersion,
) -> Option<DeploymentStatus> {
    if current == DeploymentStatus::Error {
        return None;
    }
    match recorded {
        Some(recorded) => (status::compare(observed, recorded) == Ordering::Newer).then_some(next),
        None => (!current.is_terminal() && next.rank() >= current.rank()).then_some(next),
    }
}

/// The version of an observation of `build`; `None` for a state kitebridge does not know.
fn version_of(build: &Build) -> Option<StatusVersion> {
    status::rank(build).map(|rank| StatusVersion::of(build, rank))
}

/// Applies an observation of the candidate's own build to it (the caller made sure the build is
/// its own and set `c.build`): its state, `build_state`, `error_message` and the version.
/// `updated_at` is the caller's.
pub fn observe_candidate(c: &mut Candidate, build: &Build) {
    let recorded = c.build.as_ref().and_then(|b| b.observed);
    if let (Some(next), Some(observed)) = (
        candidate_state_for(&build.state, build.blocked),
        version_of(build),
    ) && let Some(state) = candidate_follows(c.state, recorded, next, observed)
    {
        if state == CandidateState::Failed {
            c.error_message = Some(format!(
                "build #{} finished as {}",
                build.number, build.state
            ));
        } else if c.state.is_terminal() {
            // A re-run: the reason the earlier run failed is no longer the build's word.
            c.error_message = None;
        }
        c.state = state;
        c.build_state = Some(build.state.as_str().to_string());
        if let Some(b) = &mut c.build {
            b.observed = Some(observed);
        }
        return;
    }
    if recorded.is_none() {
        // No version to go by: the state shown beside the candidate only moves forwards.
        let seen = c
            .build_state
            .as_deref()
            .map(|s| build_state_rank(&BuildState::parse(s)));
        if seen.is_none_or(|s| build_state_rank(&build.state) > s) {
            c.build_state = Some(build.state.as_str().to_string());
        }
    }
}

/// Applies an observation of the deployment's own build to it (the caller made sure the build
/// is its own and set `d.build`): its status, `finished_at`, `error_message`, `updated_at`
/// (when the status changes, for the stuck rule) and the version. The environment is the
/// caller's ([`environment_after_change`]).
pub fn observe_deployment(d: &mut Deployment, build: &Build, now: DateTime<Utc>) {
    let recorded = d.build.as_ref().and_then(|b| b.observed);
    let (Some(next), Some(observed)) = (
        deployment_status_for(&build.state, build.blocked),
        version_of(build),
    ) else {
        return;
    };
    let Some(status) = deployment_follows(d.status, recorded, next, observed) else {
        return;
    };
    let rerun = d.status.is_terminal();
    if status != d.status {
        d.updated_at = now;
    }
    d.finished_at = status
        .is_terminal()
        .then(|| build.finished_at.unwrap_or(now));
    if status == DeploymentStatus::Failure {
        d.error_message = Some(format!(
            "deploy build #{} finished as {}",
            build.number, build.state
        ));
    } else if rerun {
        d.error_message = None;
    }
    d.status = status;
    if let Some(b) = &mut d.build {
        b.observed = Some(observed);
    }
}

/// Progress order of Buildkite states, for the `build_state` shown beside a candidate: it is
/// replaced only by a state at least as far along, so it too never goes backwards.
pub fn build_state_rank(state: &BuildState) -> u8 {
    use BuildState::*;
    match state {
        Creating | Scheduled | Waiting => 0,
        Running | Blocked => 1,
        Failing | Canceling => 2,
        Passed | Failed | WaitingFailed | Canceled | Skipped | NotRun => 3,
        Unknown(_) => 0,
    }
}

/// A status change asked for by `PATCH` (environments without a deploy pipeline).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchDecision {
    /// Already in that status: nothing to write, answer as is.
    Unchanged,
    /// Move to the new status.
    Apply,
    /// Refused: the deployment finished, or the status would go backwards.
    Refused,
}

pub fn patch_decision(current: DeploymentStatus, next: DeploymentStatus) -> PatchDecision {
    if current == next {
        PatchDecision::Unchanged
    } else if deployment_advances(current, next) {
        PatchDecision::Apply
    } else {
        PatchDecision::Refused
    }
}

/// Whether a deployment moving from `before` to `after` changes its environment, which is then
/// written in the same atomic write: finishing releases the lock and may remember a success,
/// and a success whose build re-ran (to running, or straight to failed) is withdrawn.
pub fn changes_environment(before: DeploymentStatus, after: DeploymentStatus) -> bool {
    before != after && (after.is_terminal() || before == DeploymentStatus::Success)
}

/// The environment after a deployment moved from `before` to `after`: finishing releases the
/// lock (if it was this deployment's; a re-run never takes it again), becoming a success is
/// remembered, and leaving success (Buildkite re-ran the build) withdraws that success, so
/// promotion and rollback go by Buildkite's latest word.
pub fn environment_after_change(
    env: &EnvironmentState,
    before: &Deployment,
    after: &Deployment,
) -> EnvironmentState {
    let mut env = env.clone();
    if after.status.is_terminal() && env.active_deployment.as_deref() == Some(after.id.as_str()) {
        env.active_deployment = None;
    }
    let was = before.status == DeploymentStatus::Success;
    let is = after.status == DeploymentStatus::Success;
    if was && !is {
        forget_success(&mut env.successes, &after.candidate_version);
    } else if is && !was {
        remember_success(&mut env.successes, &after.candidate_version);
    }
    env
}

/// Withdraws the latest success of `version` (its deployment turned out otherwise).
pub fn forget_success(successes: &mut Vec<String>, version: &str) {
    if let Some(i) = successes.iter().rposition(|v| v == version) {
        successes.remove(i);
        // Its neighbours may now repeat each other; a repeat says nothing more.
        successes.dedup();
    }
}

/// Appends a success (a repeat of the latest is not recorded twice), keeping the newest
/// [`SUCCESS_HISTORY`].
pub fn remember_success(successes: &mut Vec<String>, version: &str) {
    if successes.last().map(String::as_str) != Some(version) {
        successes.push(version.to_string());
    }
    if successes.len() > SUCCESS_HISTORY {
        let excess = successes.len() - SUCCESS_HISTORY;
        successes.drain(..excess);
    }
}

/// Why there is nothing to roll back to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoRollback {
    NoDeployment,
    NothingBefore,
    NoSuccess,
}

impl std::fmt::Display for NoRollback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NoRollback::NoDeployment => "nothing to roll back: the environment has no deployment",
            NoRollback::NothingBefore => {
                "nothing to roll back to: no candidate ran here before the latest deployment"
            }
            NoRollback::NoSuccess => {
                "nothing to roll back to: no deployment here has ever succeeded"
            }
        })
    }
}

/// The candidate a rollback deploys, from the latest deployment (finished) and the
/// environment: after a success, the candidate that ran before it; after a failure (or
/// cancellation, or error), the last candidate that succeeded here.
pub fn rollback_target(
    latest: Option<&Deployment>,
    env: &EnvironmentState,
) -> Result<String, NoRollback> {
    let latest = latest.ok_or(NoRollback::NoDeployment)?;
    if latest.status == DeploymentStatus::Success {
        latest
            .from_candidate_version
            .clone()
            .filter(|v| *v != latest.candidate_version)
            .ok_or(NoRollback::NothingBefore)
    } else {
        env.successes.last().cloned().ok_or(NoRollback::NoSuccess)
    }
}

/// A deployment not finished whose status has not changed for longer than `timeout`.
pub fn is_stuck(deployment: &Deployment, now: DateTime<Utc>, timeout: std::time::Duration) -> bool {
    if deployment.status.is_terminal() {
        return false;
    }
    let Ok(timeout) = chrono::Duration::from_std(timeout) else {
        return false; // an absurdly long timeout: never stuck
    };
    now.signed_duration_since(deployment.updated_at) > timeout
}

/// The deployment a stuck one becomes: `error`, with the reason.
pub fn expire(
    deployment: &Deployment,
    now: DateTime<Utc>,
    timeout: std::time::Duration,
) -> Deployment {
    let mut d = deployment.clone();
    d.error_message = Some(format!(
        "status `{}` did not change for {} minutes; marked error",
        deployment.status.as_str(),
        timeout.as_secs() / 60
    ));
    d.status = DeploymentStatus::Error;
    d.updated_at = now;
    d.finished_at = Some(now);
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn all_build_states() -> Vec<BuildState> {
        let mut v = BuildState::KNOWN.to_vec();
        v.push(BuildState::Unknown("brand_new".into()));
        v
    }

    #[test]
    fn candidate_mapping_table() {
        use BuildState as B;
        use CandidateState as C;
        let table: &[(B, bool, Option<C>)] = &[
            (B::Creating, false, Some(C::Building)),
            (B::Scheduled, false, Some(C::Building)),
            (B::Waiting, false, Some(C::Building)),
            (B::Running, false, Some(C::Building)),
            (B::Failing, false, Some(C::Building)),
            (B::Canceling, false, Some(C::Building)),
            (B::Blocked, false, Some(C::Building)),
            (B::Passed, false, Some(C::Built)),
            (B::Passed, true, Some(C::Building)),
            (B::Failed, false, Some(C::Failed)),
            (B::WaitingFailed, false, Some(C::Failed)),
            (B::NotRun, false, Some(C::Failed)),
            (B::Canceled, false, Some(C::Canceled)),
            (B::Skipped, false, Some(C::Canceled)),
            (B::Unknown("x".into()), false, None),
        ];
        for (state, blocked, want) in table {
            assert_eq!(
                candidate_state_for(state, *blocked),
                *want,
                "{state} {blocked}"
            );
        }
    }

    #[test]
    fn deployment_mapping_table() {
        use BuildState as B;
        use DeploymentStatus as D;
        let table: &[(B, bool, Option<D>)] = &[
            (B::Creating, false, Some(D::Pending)),
            (B::Scheduled, false, Some(D::Pending)),
            (B::Waiting, false, Some(D::Pending)),
            (B::Running, false, Some(D::InProgress)),
            (B::Failing, false, Some(D::InProgress)),
            (B::Canceling, false, Some(D::InProgress)),
            (B::Passed, true, Some(D::InProgress)),
            (B::Passed, false, Some(D::Success)),
            (B::Failed, false, Some(D::Failure)),
            (B::NotRun, false, Some(D::Failure)),
            (B::Canceled, false, Some(D::Canceled)),
            (B::Skipped, false, Some(D::Canceled)),
            (B::Unknown("x".into()), false, None),
        ];
        for (state, blocked, want) in table {
            assert_eq!(
                deployment_status_for(state, *blocked),
                *want,
                "{state} {blocked}"
            );
        }
    }

    #[test]
    fn without_evidence_never_backwards_whatever_the_order() {
        // Word without evidence of order (a create answer, a `PATCH`): every pair of build
        // states, applied in both orders, ends in the same candidate state as applying only the
        // further one, so a late or repeated answer changes nothing.
        let states = all_build_states();
        for a in &states {
            for b in &states {
                let apply = |mut c: CandidateState, s: &BuildState| {
                    if let Some(n) = candidate_state_for(s, false)
                        && candidate_advances(c, n)
                    {
                        c = n;
                    }
                    c
                };
                let ab = apply(apply(CandidateState::Pending, a), b);
                let ab_again = apply(apply(ab, a), b);
                assert_eq!(ab, ab_again, "{a} then {b} is not idempotent");
                let first = apply(CandidateState::Pending, a);
                if first.is_terminal() {
                    assert_eq!(ab, first, "{a} then {b} moved a finished candidate");
                }
                assert!(ab.rank() >= first.rank());
            }
        }
        assert!(!candidate_advances(
            CandidateState::Built,
            CandidateState::Building
        ));
        assert!(!candidate_advances(
            CandidateState::Failed,
            CandidateState::Built
        ));
        assert!(candidate_advances(
            CandidateState::Pending,
            CandidateState::Built
        ));
        assert!(!deployment_advances(
            DeploymentStatus::Success,
            DeploymentStatus::InProgress
        ));
        assert!(!deployment_advances(
            DeploymentStatus::Error,
            DeploymentStatus::Success
        ));
        assert!(deployment_advances(
            DeploymentStatus::Pending,
            DeploymentStatus::Failure
        ));
        assert!(!deployment_advances(
            DeploymentStatus::InProgress,
            DeploymentStatus::Pending
        ));
    }

    #[test]
    fn patch_decisions() {
        use DeploymentStatus::*;
        use PatchDecision::*;
        let table = [
            (Pending, Pending, Unchanged),
            (Pending, InProgress, Apply),
            (Pending, Success, Apply),
            (InProgress, Failure, Apply),
            (InProgress, Pending, Refused),
            (Success, Success, Unchanged),
            (Success, Failure, Refused),
            (Error, Success, Refused),
            (Canceled, InProgress, Refused),
        ];
        for (cur, next, want) in table {
            assert_eq!(patch_decision(cur, next), want, "{cur:?} -> {next:?}");
        }
    }

    fn dep(id: &str, cand: &str, status: DeploymentStatus, from: Option<&str>) -> Deployment {
        let now = Utc::now();
        Deployment {
            id: id.into(),
            project: "web".into(),
            environment: "prod".into(),
            release_version: cand.split("-rc").next().unwrap_or_default().into(),
            candidate_version: cand.into(),
            commit: "a".repeat(40),
            status,
            build: None,
            from_candidate_version: from.map(str::to_string),
            rollback: false,
            forced: false,
            created_at: now,
            updated_at: now,
            finished_at: None,
            error_message: None,
        }
    }

    fn env(active: Option<&str>, successes: &[&str]) -> EnvironmentState {
        EnvironmentState {
            project: "web".into(),
            environment: "prod".into(),
            frozen: false,
            freeze_reason: None,
            active_deployment: active.map(str::to_string),
            successes: successes.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn finishing_releases_the_lock_and_remembers_success() {
        use DeploymentStatus::*;
        let running = dep("d1", "1.1.0-rc1", InProgress, Some("1.0.0-rc2"));
        let mut d = running.clone();
        d.status = Success;
        let after = environment_after_change(&env(Some("d1"), &["1.0.0-rc2"]), &running, &d);
        assert_eq!(after.active_deployment, None);
        assert_eq!(after.successes, vec!["1.0.0-rc2", "1.1.0-rc1"]);
        // Another deployment's lock is left alone; failures are not remembered.
        d.status = Failure;
        let after = environment_after_change(&env(Some("d9"), &["1.0.0-rc2"]), &running, &d);
        assert_eq!(after.active_deployment.as_deref(), Some("d9"));
        assert_eq!(after.successes, vec!["1.0.0-rc2"]);
    }

    #[test]
    fn a_re_run_changes_the_success_history_but_never_takes_the_lock() {
        use DeploymentStatus::*;
        // The deployment (of NEW) and what succeeded before it (OLD).
        const OLD: &str = "1.0.0-rc2";
        const NEW: &str = "1.1.0-rc1";
        let at = |status| dep("d1", NEW, status, Some(OLD));
        type Row<'a> = (
            DeploymentStatus,
            DeploymentStatus,
            Option<&'a str>,
            &'a [&'a str],
            Option<&'a str>,
            &'a [&'a str],
        );
        // (before, after, lock before, successes before, lock after, successes after)
        #[rustfmt::skip]
        let table: &[Row] = &[
            // Failed, retried: running again takes no lock, neither another's nor a free one ...
            (Failure, InProgress, Some("d9"), &[OLD], Some("d9"), &[OLD]),
            (Failure, InProgress, None, &[OLD], None, &[OLD]),
            // ... and passing remembers the success, leaving the lock alone.
            (InProgress, Success, Some("d9"), &[OLD], Some("d9"), &[OLD, NEW]),
            // Straight from failure to success (its `running` was not proven newer).
            (Failure, Success, None, &[OLD], None, &[OLD, NEW]),
            // A passed build retried: running again, or failed, withdraws its success.
            (Success, InProgress, None, &[OLD, NEW], None, &[OLD]),
            (Success, Failure, Some("d9"), &[OLD, NEW], Some("d9"), &[OLD]),
            (Success, Canceled, None, &[NEW, OLD, NEW], None, &[NEW, OLD]),
            // A re-run that failed again: nothing.
            (Failure, Failure, None, &[OLD], None, &[OLD]),
        ];
        for (before, after, lock, successes, want_lock, want_successes) in table {
            let got = environment_after_change(&env(*lock, successes), &at(*before), &at(*after));
            assert_eq!(
                (
                    got.active_deployment.as_deref(),
                    got.successes.iter().map(String::as_str).collect::<Vec<_>>()
                ),
                (*want_lock, want_successes.to_vec()),
                "{before:?} -> {after:?}"
            );
            // Whenever the environment changes, the caller is told to write it.
            if got != env(*lock, successes) {
                assert!(
                    changes_environment(*before, *after),
                    "{before:?} -> {after:?}"
                );
            }
        }
        assert!(changes_environment(Pending, Error));
        assert!(changes_environment(InProgress, Failure));
        assert!(changes_environment(Success, InProgress));
        assert!(!changes_environment(Failure, InProgress));
        assert!(!changes_environment(Pending, InProgress));
        assert!(!changes_environment(Success, Success));
    }

    #[test]
    fn forgetting_a_success_takes_its_latest_entry() {
        let list = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let mut s = list(&["a", "b", "a"]);
        forget_success(&mut s, "a");
        assert_eq!(s, list(&["a", "b"]));
        let mut s = list(&["a", "b", "a"]);
        forget_success(&mut s, "b");
        assert_eq!(s, list(&["a"]), "no repeat left behind");
        forget_success(&mut s, "z");
        assert_eq!(s, list(&["a"]));
    }

    #[test]
    fn success_history_is_bounded_and_not_repeated() {
        let mut s = Vec::new();
        for i in 0..(SUCCESS_HISTORY + 10) {
            remember_success(&mut s, &format!("1.{i}.0-rc1"));
            remember_success(&mut s, &format!("1.{i}.0-rc1"));
        }
        assert_eq!(s.len(), SUCCESS_HISTORY);
        assert_eq!(
            s.last().unwrap(),
            &format!("1.{}.0-rc1", SUCCESS_HISTORY + 9)
        );
    }

    #[test]
    fn rollback_targets() {
        use DeploymentStatus::*;
        let e = env(None, &["1.0.0-rc1", "1.1.0-rc1"]);
        // After a success: what ran before it.
        let ok = dep("d2", "1.1.0-rc1", Success, Some("1.0.0-rc1"));
        assert_eq!(rollback_target(Some(&ok), &e), Ok("1.0.0-rc1".into()));
        // After a failure: the last good one.
        let bad = dep("d3", "1.2.0-rc1", Failure, Some("1.1.0-rc1"));
        assert_eq!(rollback_target(Some(&bad), &e), Ok("1.1.0-rc1".into()));
        let err = dep("d3", "1.2.0-rc1", Error, None);
        assert_eq!(rollback_target(Some(&err), &e), Ok("1.1.0-rc1".into()));
        // Nothing to go to.
        assert_eq!(rollback_target(None, &e), Err(NoRollback::NoDeployment));
        let first = dep("d1", "1.0.0-rc1", Success, None);
        assert_eq!(
            rollback_target(Some(&first), &e),
            Err(NoRollback::NothingBefore)
        );
        let redeploy = dep("d4", "1.0.0-rc1", Success, Some("1.0.0-rc1"));
        assert_eq!(
            rollback_target(Some(&redeploy), &e),
            Err(NoRollback::NothingBefore)
        );
        assert_eq!(
            rollback_target(Some(&bad), &env(None, &[])),
            Err(NoRollback::NoSuccess)
        );
    }

    #[test]
    fn stuck_after_the_timeout_only_while_unfinished() {
        let now = Utc::now();
        let timeout = Duration::from_secs(3600);
        let mut d = dep("d1", "1.0.0-rc1", DeploymentStatus::InProgress, None);
        d.updated_at = now - chrono::Duration::minutes(59);
        assert!(!is_stuck(&d, now, timeout));
        d.updated_at = now - chrono::Duration::minutes(61);
        assert!(is_stuck(&d, now, timeout));
        let e = expire(&d, now, timeout);
        assert_eq!(e.status, DeploymentStatus::Error);
        assert_eq!(e.finished_at, Some(now));
        assert!(e.error_message.unwrap().contains("60 minutes"));
        d.status = DeploymentStatus::Success;
        assert!(!is_stuck(&d, now, timeout));
        assert!(!is_stuck(&d, now, Duration::MAX));
    }

    // --- following a build: ordering by Buildkite's evidence ------------------------------

    fn v(build: u64, epoch_ms: i64, rank: u8) -> StatusVersion {
        StatusVersion {
            build,
            epoch_ms,
            rank,
        }
    }

    #[test]
    fn candidates_follow_the_latest_word() {
        use CandidateState::*;
        let done = v(7, 2_000, 7); // the first run ended at 2 s
        // (current, recorded, next, observed, want)
        type Row = (
            CandidateState,
            Option<StatusVersion>,
            CandidateState,
            StatusVersion,
            Option<CandidateState>,
        );
        // (current, recorded, next, observed, want)
        #[rustfmt::skip]
        let table: &[Row] = &[
            // A job retried: running again with a later `started_at` is a re-run ...
            (Failed, Some(done), Building, v(7, 3_000, 3), Some(Building)),
            (Canceled, Some(done), Building, v(7, 3_000, 3), Some(Building)),
            (Built, Some(done), Building, v(7, 3_000, 3), Some(Building)),
            // ... and its end, with a later `finished_at`, is followed whatever it is.
            (Building, Some(v(7, 3_000, 3)), Built, v(7, 4_000, 7), Some(Built)),
            (Building, Some(v(7, 3_000, 3)), Failed, v(7, 4_000, 7), Some(Failed)),
            // A `running` that cannot prove it is newer (the first run's `started_at`: a late
            // delivery, or a re-run that kept it) changes nothing; the re-run's end proves
            // itself, straight from the finished state.
            (Failed, Some(done), Building, v(7, 1_000, 3), None),
            (Failed, Some(done), Built, v(7, 4_000, 7), Some(Built)),
            // Late or repeated deliveries: nothing.
            (Built, Some(v(7, 4_000, 7)), Failed, done, None),
            (Built, Some(done), Built, done, None),
            (Failed, Some(done), Canceled, done, None),
            (Building, Some(v(7, 1_000, 3)), Building, v(7, 0, 2), None),
            // Within one run, forwards.
            (Building, Some(v(7, 1_000, 3)), Building, v(7, 1_000, 4), Some(Building)),
            (Building, Some(v(7, 1_000, 3)), Failed, done, Some(Failed)),
            // A blocked build is building; unblocked, it runs again (unproven: nothing, it is
            // building anyway) and its end is followed.
            (Building, Some(v(7, 2_000, 5)), Building, v(7, 1_000, 3), None),
            (Building, Some(v(7, 2_000, 5)), Built, v(7, 5_000, 7), Some(Built)),
            (Building, Some(v(7, 2_000, 5)), Built, v(7, 2_000, 7), Some(Built)),
            // Nothing recorded yet: forwards only (the same state too, to record its version).
            (Pending, None, Building, v(7, 0, 2), Some(Building)),
            (Building, None, Building, v(7, 1_000, 3), Some(Building)),
            (Building, None, Built, done, Some(Built)),
            // A finished record from before versions were kept: never out of it.
            (Built, None, Building, v(7, 3_000, 3), None),
            (Failed, None, Built, v(7, 4_000, 7), None),
        ];
        for (current, recorded, next, observed, want) in table {
            assert_eq!(
                candidate_follows(*current, *recorded, *next, *observed),
                *want,
                "{current:?} (recorded {recorded:?}) seeing {next:?} at {observed}"
            );
        }
    }

    #[test]
    fn deployments_follow_the_latest_word_except_out_of_error() {
        use DeploymentStatus::*;
        let done = v(3, 2_000, 7);
        type Row = (
            DeploymentStatus,
            Option<StatusVersion>,
            DeploymentStatus,
            StatusVersion,
            Option<DeploymentStatus>,
        );
        #[rustfmt::skip]
        let table: &[Row] = &[
            (Failure, Some(done), InProgress, v(3, 3_000, 3), Some(InProgress)),
            (InProgress, Some(v(3, 3_000, 3)), Success, v(3, 4_000, 7), Some(Success)),
            (Failure, Some(done), Success, v(3, 4_000, 7), Some(Success)),
            // A passed deploy retried (`permit_on_passed`) that fails: followed too.
            (Success, Some(done), InProgress, v(3, 3_000, 3), Some(InProgress)),
            (Success, Some(done), Failure, v(3, 4_000, 7), Some(Failure)),
            (Failure, Some(done), InProgress, v(3, 1_000, 3), None),
            (Success, Some(v(3, 4_000, 7)), Failure, done, None),
            (Success, Some(done), Success, done, None),
            (InProgress, Some(v(3, 1_000, 3)), Pending, v(3, 0, 2), None),
            (Pending, None, Pending, v(3, 0, 2), Some(Pending)),
            (Pending, None, InProgress, v(3, 1_000, 3), Some(InProgress)),
            (InProgress, None, Pending, v(3, 0, 2), None),
            (Failure, None, Success, v(3, 4_000, 7), None),
            // `error` is kitebridge's verdict (stuck past the timeout): no build revives it.
            (Error, Some(v(3, 1_000, 3)), Success, v(3, 4_000, 7), None),
            (Error, None, Success, v(3, 4_000, 7), None),
        ];
        for (current, recorded, next, observed, want) in table {
            assert_eq!(
                deployment_follows(*current, *recorded, *next, *observed),
                *want,
                "{current:?} (recorded {recorded:?}) seeing {next:?} at {observed}"
            );
        }
    }

    /// Every ordering of `items`.
    fn permutations<T: Clone>(items: &[T]) -> Vec<Vec<T>> {
        if items.len() <= 1 {
            return vec![items.to_vec()];
        }
        let mut all = Vec::new();
        for i in 0..items.len() {
            let mut rest = items.to_vec();
            let first = rest.remove(i);
            for mut p in permutations(&rest) {
                p.insert(0, first.clone());
                all.push(p);
            }
        }
        all
    }

    #[test]
    fn a_retried_build_ends_in_its_last_state_whatever_the_order() {
        // One build: scheduled, running, finished; a job retried: running again (with a later
        // `started_at`, or keeping the first one), finished again. Delivered in every order,
        // and all of it again, the record ends where the build ended.
        let b = |s: &str| BuildState::parse(s);
        for (first_end, second_end, rerun_start) in [
            ("failed", "passed", 3_000),
            ("passed", "failed", 3_000),
            ("failed", "passed", 1_000),
            ("canceled", "passed", 3_000),
        ] {
            let observations = [
                (b("scheduled"), v(9, 0, 2)),
                (b("running"), v(9, 1_000, 3)),
                (b(first_end), v(9, 2_000, 7)),
                (b("running"), v(9, rerun_start, 3)),
                (b(second_end), v(9, 4_000, 7)),
            ];
            let want_candidate = candidate_state_for(&b(second_end), false);
            let want_deployment = deployment_status_for(&b(second_end), false);
            for order in permutations(&observations) {
                let mut c = (CandidateState::Pending, None);
                let mut d = (DeploymentStatus::Pending, None);
                for (state, version) in order.iter().chain(order.iter()) {
                    if let Some(next) = candidate_follows(
                        c.0,
                        c.1,
                        candidate_state_for(state, false).unwrap(),
                        *version,
                    ) {
                        c = (next, Some(*version));
                    }
                    if let Some(next) = deployment_follows(
                        d.0,
                        d.1,
                        deployment_status_for(state, false).unwrap(),
                        *version,
                    ) {
                        d = (next, Some(*version));
                    }
                }
                assert_eq!(Some(c.0), want_candidate, "{order:?}");
                assert_eq!(Some(d.0), want_deployment, "{order:?}");
                assert_eq!(c.1, Some(v(9, 4_000, 7)));
            }
        }
    }

    fn at(ms: i64) -> String {
        DateTime::<Utc>::from_timestamp_millis(ms)
            .unwrap()
            .to_rfc3339()
    }

    fn build(state: &str, started_ms: Option<i64>, finished_ms: Option<i64>) -> Build {
        serde_json::from_value(serde_json::json!({
            "id": "0190-build",
            "number": 12,
            "state": state,
            "commit": "a".repeat(40),
            "started_at": started_ms.map(at),
            "finished_at": finished_ms.map(at),
        }))
        .unwrap()
    }

    fn build_ref() -> super::super::model::BuildRef {
        super::super::model::BuildRef {
            organization: "acme".into(),
            pipeline: "web-release".into(),
            id: "0190-build".into(),
            number: 12,
            web_url: None,
            observed: None,
        }
    }

    #[test]
    fn a_failed_candidate_whose_build_is_retried_is_built() {
        let now = Utc::now();
        let mut c = Candidate {
            project: "web".into(),
            release_version: "1.0.0".into(),
            number: 1,
            version: "1.0.0-rc1".into(),
            cut_id: "01J".into(),
            commit: "a".repeat(40),
            branch: "main".into(),
            state: CandidateState::Building,
            build: Some(build_ref()),
            build_state: Some("scheduled".into()),
            error_message: None,
            created_at: now,
            updated_at: now,
        };
        observe_candidate(&mut c, &build("running", Some(1_000), None));
        observe_candidate(&mut c, &build("failed", Some(1_000), Some(2_000)));
        assert_eq!(c.state, CandidateState::Failed);
        assert_eq!(
            c.error_message.as_deref(),
            Some("build #12 finished as failed")
        );
        // Retried: running again, the reason is gone; then passed.
        observe_candidate(&mut c, &build("running", Some(3_000), None));
        assert_eq!(
            (
                c.state,
                c.build_state.as_deref(),
                c.error_message.as_deref()
            ),
            (CandidateState::Building, Some("running"), None)
        );
        observe_candidate(&mut c, &build("passed", Some(3_000), Some(4_000)));
        let built = c.clone();
        assert_eq!(built.state, CandidateState::Built);
        assert_eq!(
            built.build.as_ref().unwrap().observed,
            Some(v(12, 4_000, 7))
        );
        // The first run's `failed`, delivered late, and a repeat: nothing.
        observe_candidate(&mut c, &build("failed", Some(1_000), Some(2_000)));
        observe_candidate(&mut c, &build("passed", Some(3_000), Some(4_000)));
        assert_eq!(c, built);
        // Answers leave the version out.
        assert_eq!(c.answered().build.unwrap().observed, None);
    }

    #[test]
    fn a_failed_deployment_whose_build_is_retried_succeeds() {
        use DeploymentStatus::*;
        let mut d = dep("d1", "1.1.0-rc1", InProgress, None);
        d.build = Some(build_ref());
        let t0 = d.updated_at;
        let t = |s: i64| t0 + chrono::Duration::seconds(s);
        observe_deployment(&mut d, &build("failed", Some(1_000), Some(2_000)), t(1));
        assert_eq!((d.status, d.updated_at), (Failure, t(1)));
        assert_eq!(
            d.finished_at,
            Some(DateTime::from_timestamp_millis(2_000).unwrap())
        );
        assert!(
            d.error_message
                .as_deref()
                .unwrap()
                .contains("finished as failed")
        );
        // Running again: unfinished, the reason gone.
        observe_deployment(&mut d, &build("running", Some(3_000), None), t(2));
        assert_eq!(
            (
                d.status,
                d.finished_at,
                d.error_message.as_deref(),
                d.updated_at
            ),
            (InProgress, None, None, t(2))
        );
        // A late `running` of the first run, then the re-run passes.
        observe_deployment(&mut d, &build("running", Some(1_000), None), t(3));
        assert_eq!(d.updated_at, t(2));
        observe_deployment(&mut d, &build("passed", Some(3_000), Some(4_000)), t(4));
        assert_eq!((d.status, d.updated_at), (Success, t(4)));
        assert_eq!(
            d.finished_at,
            Some(DateTime::from_timestamp_millis(4_000).unwrap())
        );
        // The first run's `failed`, late: nothing.
        let done = d.clone();
        observe_deployment(&mut d, &build("failed", Some(1_000), Some(2_000)), t(5));
        assert_eq!(d, done);
        // An expired deployment stays expired.
        let mut e = done.clone();
        e.status = Error;
        let expired = e.clone();
        observe_deployment(&mut e, &build("passed", Some(5_000), Some(6_000)), t(6));
        assert_eq!(e, expired);
    }
}
