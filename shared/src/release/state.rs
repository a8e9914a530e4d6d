//! The release state machine, as pure functions: how a Buildkite build state moves a candidate or
//! a deployment, the never-backwards rule, what finishing a deployment does to its environment,
//! the rollback target, and when a deployment counts as stuck. No I/O here; [`super::service`]
//! and [`super::tracker`] apply these decisions to the store.

use chrono::{DateTime, Utc};

use super::model::{CandidateState, Deployment, DeploymentStatus, EnvironmentState};
use crate::buildkite::BuildState;

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

/// Whether a candidate in `current` may move to `next`: only forwards, never out of a finished
/// state (so a late `running` after `passed`, or a repeated delivery, changes nothing).
pub fn candidate_advances(current: CandidateState, next: CandidateState) -> bool {
    !current.is_terminal() && next.rank() > current.rank()
}

/// Whether a deployment in `current` may move to `next` (same rule as candidates).
pub fn deployment_advances(current: DeploymentStatus, next: DeploymentStatus) -> bool {
    !current.is_terminal() && next.rank() > current.rank()
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

/// The environment after `deployment` reached a final status: the lock is released (if it was
/// this deployment's) and a success is remembered.
pub fn environment_after_finish(
    env: &EnvironmentState,
    deployment: &Deployment,
) -> EnvironmentState {
    let mut env = env.clone();
    if env.active_deployment.as_deref() == Some(deployment.id.as_str()) {
        env.active_deployment = None;
    }
    if deployment.status == DeploymentStatus::Success {
        remember_success(&mut env.successes, &deployment.candidate_version);
    }
    env
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
    fn never_backwards_whatever_the_order() {
        // Every pair of build states, applied in both orders, ends in the same candidate state
        // as applying only the further one: a late or repeated delivery changes nothing.
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
        let mut d = dep(
            "d1",
            "1.1.0-rc1",
            DeploymentStatus::Success,
            Some("1.0.0-rc2"),
        );
        let after = environment_after_finish(&env(Some("d1"), &["1.0.0-rc2"]), &d);
        assert_eq!(after.active_deployment, None);
        assert_eq!(after.successes, vec!["1.0.0-rc2", "1.1.0-rc1"]);
        // Another deployment's lock is left alone; failures are not remembered.
        d.status = DeploymentStatus::Failure;
        let after = environment_after_finish(&env(Some("d9"), &["1.0.0-rc2"]), &d);
        assert_eq!(after.active_deployment.as_deref(), Some("d9"));
        assert_eq!(after.successes, vec!["1.0.0-rc2"]);
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
}
