//! Release tracking: the [`BuildObserver`] that moves candidates and deployments from the states
//! of the Buildkite builds kitebridge created for them. The webhook receiver and the poller hand
//! it every build they see; builds without a link (`ReleaseStore::build_link`) are not ours and
//! cost one store read. It never calls Buildkite. Observations are ordered by Buildkite's
//! evidence ([`state`], "Following a build"): a late or repeated delivery changes nothing, and
//! a retried build that runs and finishes again is followed to its new end.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::Utc;

use super::model::{BuildLink, BuildRef};
use super::state;
use super::update::{update_candidate_with, update_deployment_with};
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
        let swept = super::sweep::sweep_stuck(self.store.as_ref(), self.deployment_timeout).await?;
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
                        state::observe_candidate(&mut n, build);
                        if c.state.is_terminal() && n.state != c.state {
                            tracing::info!(
                                project,
                                release_version,
                                number,
                                build = build.number,
                                from = c.state.as_str(),
                                to = n.state.as_str(),
                                "the candidate's build ran again; following it"
                            );
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
                update_deployment_with(self.store.as_ref(), &project, &environment, &id, |d| {
                    if d.build.as_ref().is_some_and(|b| b.id != build.id) {
                        return None;
                    }
                    let mut n = d.clone();
                    if n.build.is_none() {
                        n.build = Some(build_ref(organization, build, pipeline));
                    }
                    state::observe_deployment(&mut n, build, Utc::now());
                    if d.status.is_terminal() && n.status != d.status {
                        tracing::info!(
                            project,
                            environment,
                            deployment = id,
                            build = build.number,
                            from = d.status.as_str(),
                            to = n.status.as_str(),
                            "the deployment's build ran again; following it"
                        );
                    }
                    (n != *d).then_some(n)
                })
                .await?;
            }
        }
        Ok(())
    }
}
