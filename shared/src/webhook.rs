//! What a Buildkite `build.*` delivery does, once it has been verified and parsed (the HTTP side,
//! `POST /webhooks/buildkite`, is `http::webhook`): [`status_record`] -> [`Reporter::report`] (the
//! one status path, shared with the poller: de-duplication, never-regress, outbox) ->
//! [`observe_all`] (releases, trigger rules). This module only wires those pieces and says what
//! became of each, as values the HTTP side turns into answers.

use std::sync::Arc;

use crate::bitbucket::BitbucketClient;
use crate::buildkite::model::WebhookPayload;
use crate::observe::{BuildObserver, observe_all};
use crate::report::{Outcome, Reporter, status_record};

/// Everything a delivery needs: Bitbucket, the reporter webhooks use (short retries, then the
/// outbox) and the build observers.
#[derive(Clone)]
pub struct Delivery {
    pub bitbucket: BitbucketClient,
    pub reporter: Reporter,
    pub observers: Vec<Arc<dyn BuildObserver>>,
    /// The configured organizations: a single one is the fallback for a build whose URLs do not
    /// name theirs.
    pub organizations: Vec<String>,
}

/// What became of the commit status of a build event.
#[derive(Debug)]
pub enum StatusStep {
    /// Handed to the reporter; `state` is the Bitbucket state of the status.
    Reported { outcome: Outcome, state: String },
    /// Not for this Bitbucket (the reason).
    Skipped(String),
    /// Bitbucket's API could not be determined (the probe failed): nothing was recorded.
    ApiUnknown(String),
    /// The store failed: the status may not be recorded.
    StoreFailed(String),
}

/// What a build event did: its status, and whether every observer took the build.
#[derive(Debug)]
pub struct BuildDelivery {
    pub status: StatusStep,
    /// The first observer error, as text (for the log only).
    pub observed: Result<(), String>,
}

impl Delivery {
    /// Reports the build's status and hands the build to the observers.
    pub async fn build_event(&self, payload: &WebhookPayload) -> BuildDelivery {
        let build = &payload.build;
        let pipeline = Some(&payload.pipeline);
        // The build's own URLs name its organization; a single configured one is the fallback.
        let org = payload
            .organization_slug()
            .or_else(|| match self.organizations.as_slice() {
                [only] => Some(only.clone()),
                _ => None,
            });

        let status = match self.bitbucket.api().await {
            Err(e) => StatusStep::ApiUnknown(e.to_string()),
            Ok(api) => {
                match status_record(build, pipeline, org.as_deref(), &api, self.bitbucket.base()) {
                    Err(skip) => StatusStep::Skipped(skip.to_string()),
                    Ok(record) => {
                        let state = record.state.clone();
                        match self.reporter.report(record).await {
                            Ok(outcome) => StatusStep::Reported { outcome, state },
                            Err(e) => StatusStep::StoreFailed(e.to_string()),
                        }
                    }
                }
            }
        };

        // Observers run whatever became of the status: they do not depend on Bitbucket, and
        // each is idempotent, so a retried delivery does no harm.
        let observed = match org.as_deref() {
            Some(org) => observe_all(&self.observers, org, build, pipeline)
                .await
                .map_err(|e| e.to_string()),
            None if self.observers.is_empty() => Ok(()),
            None => {
                // Observers are keyed by organization; without one the poller hands them the
                // build.
                tracing::warn!(build = %build.id, "build event without an organization: observers skipped");
                Ok(())
            }
        };
        BuildDelivery { status, observed }
    }
}
