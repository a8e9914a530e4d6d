//! Release tracking: the [`BuildObserver`] that moves candidates and deployments from the states
//! of the Buildkite builds kitebridge created for them. The webhook receiver and the poller hand
//! it every build they see; builds without a link (`ReleaseStore::build_link`) are not ours and
//! cost one store read. It never calls Buildkite, never moves anything backwards, and applying
//! the same build twice changes nothing.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::Utc;

use super::model::{BuildLink, BuildRef, CandidateState, DeploymentStatus};
use super::service::{update_candidate_with, update_deployment_with};
use super::state;
use crate::buildkite::model::{Build, Pipeline};
use crate::observe::{BuildObserver, ObserveError};
use crate::store::ReleaseStore;

pub struct ReleaseTracker {
    store: Arc<dyn ReleaseStore>,
    /// Deployment statuses stuck longer than this become `error` (swept once per poll cycle).
    deployment_timeout: std::time::Duration,
}

impl ReleaseTracker {
    pub fn new(store: Arc<dyn ReleaseStore>, deployment_timeout: std::time::Duration) -> Self {
        ReleaseTracker {
            store,
            deployment_timeout,
        }
    }
}

fn build_ref(organization: &str, build: &Build, pipeline: Option<&Pipeline>) -> BuildRef {
    BuildRef {
        organization: organization.to_string(),
        pipeline: build.pipeline_slug(pipeline).unwrap_or_default(),
        id: build.id.clone(),
        number: build.number,
        web_url: build.web_url.clone(),
        observed: None,
    }
}

#[async_trait]
impl BuildObserver for ReleaseTracker {
    async fn tick(&self) -> Result<(), ObserveError> {
        let swept =
            super::service::sweep_stuck(self.store.as_ref(), self.deployment_timeout).await?;
        if swept > 0 {
            tracing::warn!(swept, "stuck deployments marked as error");
        }
        Ok(())
    }

    async fn observe(
        &self,
        organization: &str,
        build: &Build,
        pipeline: Option<&Pipeline>,
    ) -> Result<(), ObserveError> {
        let Some(link) = self.store.build_link(&build.id).await? else {
            return Ok(());
        };
        match link {
            BuildLink::Candidate {
                project,
                release_version,
                number,
            } => {
                let next = state::candidate_state_for(&build.state, build.blocked);
                let rank = state::build_state_rank(&build.state);
                let changed = update_candidate_with(
                    self.store.as_ref(),
                    &project,
                    &release_version,
                    number,
                    |c| {
                        // A build other than the candidate's own (a rebuild, say) says nothing
                        // about it.
                        if c.build.as_ref().is_some_and(|b| b.id != build.id) {
                            return None;
                        }
                        let mut n = c.clone();
                        if n.build.is_none() {
                            n.build = Some(build_ref(organization, build, pipeline));
                        }
                        if let Some(next) = next
                            && state::candidate_advances(n.state, next)
                        {
                            n.state = next;
                            if next == CandidateState::Failed {
                                n.error_message = Some(format!(
                                    "build #{} finished as {}",
                                    build.number, build.state
                                ));
                            }
                        }
                        let seen = n.build_state.as_deref().map(|s| {
                            state::build_state_rank(&crate::buildkite::BuildState::parse(s))
                        });
                        if seen.is_none_or(|s| rank > s) {
                            n.build_state = Some(build.state.as_str().to_string());
                        }
                        (n != *c).then(|| {
                            n.updated_at = Utc::now();
                            n
                        })
                    },
                )
                .await?;
                if changed.is_none() {
                    tracing::warn!(
                        build = build.id,
                        project,
                        release_version,
                        number,
                        "build linked to a candidate that does not exist"
                    );
                }
            }
            BuildLink::Deployment {
                project,
                environment,
                id,
            } => {
                let Some(next) = state::deployment_status_for(&build.state, build.blocked) else {
                    return Ok(());
                };
                update_deployment_with(self.store.as_ref(), &project, &environment, &id, |d| {
                    if d.build.as_ref().is_some_and(|b| b.id != build.id) {
                        return None;
                    }
                    let mut n = d.clone();
                    if n.build.is_none() {
                        n.build = Some(build_ref(organization, build, pipeline));
                    }
                    if state::deployment_advances(n.status, next) {
                        let now = Utc::now();
                        n.status = next;
                        n.updated_at = now;
                        if next.is_terminal() {
                            n.finished_at = Some(build.finished_at.unwrap_or(now));
                        }
                        if next == DeploymentStatus::Failure {
                            n.error_message = Some(format!(
                                "deploy build #{} finished as {}",
                                build.number, build.state
                            ));
                        }
                    }
                    (n != *d).then_some(n)
                })
                .await?;
            }
        }
        Ok(())
    }
}
