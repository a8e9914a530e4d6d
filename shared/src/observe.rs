//! What else a build's progress moves: release candidates and deployments (releases) and
//! trigger rules (rules). The webhook receiver and the poller hand every build they see to every
//! [`BuildObserver`], so a missed webhook is made up by the next poll.

use std::sync::Arc;

use async_trait::async_trait;

use crate::buildkite::model::{Build, Pipeline};
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    /// The store failed: the caller must not acknowledge the build as handled (the webhook
    /// answers 5xx, the poller keeps its cursor).
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// Something else failed that a later attempt may fix (Buildkite unreachable, ...).
    #[error("{0}")]
    Transient(String),
}

/// An observer of builds. Called for every delivery and every poll sighting of a build, in any
/// order and any number of times, possibly concurrently: it must be idempotent, must never move
/// its own state backwards, and should answer from the store (without calls to Buildkite) for
/// builds it has already handled, so an idle poll cycle costs no extra requests.
#[async_trait]
pub trait BuildObserver: Send + Sync {
    /// `organization` is the Buildkite organization slug; `pipeline` is the webhook's top-level
    /// pipeline (REST builds carry theirs in `build.pipeline`).
    async fn observe(
        &self,
        organization: &str,
        build: &Build,
        pipeline: Option<&Pipeline>,
    ) -> Result<(), ObserveError>;

    /// Periodic work that is not tied to one build (retries, timeouts), run once per poll cycle.
    async fn tick(&self) -> Result<(), ObserveError> {
        Ok(())
    }
}

/// Runs every observer's [`BuildObserver::tick`]; all run, and the first error is returned.
pub async fn tick_all(observers: &[Arc<dyn BuildObserver>]) -> Result<(), ObserveError> {
    let mut first = None;
    for o in observers {
        if let Err(e) = o.tick().await {
            tracing::warn!(error = %e, "periodic observer work failed");
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

/// Hands `build` to every observer; all run, and the first error is returned.
pub async fn observe_all(
    observers: &[Arc<dyn BuildObserver>],
    organization: &str,
    build: &Build,
    pipeline: Option<&Pipeline>,
) -> Result<(), ObserveError> {
    let mut first = None;
    for o in observers {
        if let Err(e) = o.observe(organization, build, pipeline).await {
            tracing::warn!(organization, build = build.number, error = %e, "build observer failed");
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}
