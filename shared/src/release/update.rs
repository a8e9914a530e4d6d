//! Compare-and-set updates of one candidate or one deployment, shared by the service, the
//! build tracker and the stuck-deployment sweep. The change itself is a pure function of the
//! record read; these only read, apply it and write, again when another writer got there first.

use super::model::{Candidate, Deployment, EnvironmentState};
use super::state::{changes_environment, environment_after_change};
use crate::store::{Cas, ReleaseStore, StoreError, cas_retry, retry_on_conflict};

/// Read-decide-write attempts before giving up with a conflict (reported as
/// [`super::ReleaseError::Contention`]). Each lost attempt means another request made progress
/// (e.g. took the version being cut).
pub(super) const ATTEMPTS: usize = 32;

/// Applies `change` to a candidate with compare-and-set, retrying lost races. `change` returns
/// `None` when there is nothing to do. `Ok(None)` when the candidate does not exist.
pub(crate) async fn update_candidate_with(
    store: &dyn ReleaseStore,
    project: &str,
    version: &str,
    number: u32,
    change: impl Fn(&Candidate) -> Option<Candidate>,
) -> Result<Option<Candidate>, StoreError> {
    let change = &change;
    cas_retry(ATTEMPTS, || async move {
        let Some(cur) = store.candidate(project, version, number).await? else {
            return Ok(Cas::Done(None));
        };
        let Some(next) = change(&cur.value) else {
            return Ok(Cas::Done(Some(cur.value)));
        };
        let written = store.update_candidate(&next, cur.rev).await;
        retry_on_conflict(written, Some(next))
    })
    .await
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
) -> Result<Option<Deployment>, StoreError> {
    let change = &change;
    cas_retry(ATTEMPTS, || async move {
        let Some(cur) = store.deployment(project, environment, id).await? else {
            return Ok(Cas::Done(None));
        };
        let Some(next) = change(&cur.value) else {
            return Ok(Cas::Done(Some(cur.value)));
        };
        let written = if changes_environment(cur.value.status, next.status) {
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
        retry_on_conflict(written, Some(next))
    })
    .await
}

/// The state of an environment nothing was ever written for.
pub(super) fn empty_env(project: &str, environment: &str) -> EnvironmentState {
    EnvironmentState {
        project: project.into(),
        environment: environment.into(),
        frozen: false,
        freeze_reason: None,
        active_deployment: None,
        successes: Vec::new(),
    }
}
