//! The stuck-deployment sweep: a deployment whose status has not changed for longer than the
//! deployment timeout becomes `error`, which releases its environment. Run by the poll cycle
//! ([`sweep_stuck`]) and on reading a deployment.

use std::time::Duration;

use chrono::Utc;

use super::model::{Deployment, DeploymentStatus};
use super::state;
use super::update::update_deployment_with;
use crate::store::{Page, ReleaseStore, StoreError};

/// Marks `id` as `error` if it is (still) stuck.
pub(super) async fn expire_if_stuck(
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
