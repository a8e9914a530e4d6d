//! Getting one record's Buildkite build (see the module docs of [`super::service`], "One cut or
//! deployment, one build"): under the record's lease, look for a build an earlier request may
//! have made, else create it, looking for it after a failure Buildkite may have acted on.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::decide::BuildRequest;
use super::error::{ReleaseError, classify_buildkite};
use crate::buildkite::Build;
use crate::buildkite::client::BuildkiteClient;
use crate::rules::fire::{create_or_find, find_build, may_have_acted};
use crate::store::{IdempotencyBegin, IdempotencyStore};

/// Store scope of the leases that serialise the requests for one record's build, keyed by the
/// value of its meta-data.
const BUILD_CLAIM_SCOPE: &str = "release-build";
/// How long a build request holds its record's lease.
pub const BUILD_CLAIM_LEASE: Duration = Duration::from_secs(60);
/// Longest one attempt at a build runs (below API Gateway's 30 s, so the caller gets the answer);
/// the 35 s left of the lease are the margin for a request Buildkite applies late.
pub const BUILD_ATTEMPT_BUDGET: Duration = build_attempt_budget(BUILD_CLAIM_LEASE);

/// 5/12 of `lease` (25 s of 60 s).
const fn build_attempt_budget(lease: Duration) -> Duration {
    Duration::from_millis((lease.as_millis() as u64).saturating_mul(5) / 12)
}
/// What a 502 says when the build may exist.
const BUILD_UNKNOWN: &str = "whether Buildkite created the build is not known; the record stays \
    pending, and a retry of this request looks for the build before creating one";

/// How one build request ended.
pub(super) enum BuildOutcome {
    /// The build exists: created now, or found, created by an earlier request.
    Started(Box<Build>),
    /// Buildkite certainly created nothing: the record may be finished as a failure.
    NotCreated(ReleaseError),
    /// The build may exist, or appear later: the record stays pending.
    Unknown(ReleaseError),
    /// Another call is requesting this build right now: the record is its to finish.
    Busy(ReleaseError),
}

/// Gets the build `request` asks for: under the record's lease (`lease` long), looks for it
/// first when an earlier request may have made it (`resumed`), else creates it, looking for it
/// after a failure Buildkite may have acted on. `since` is when the record was written, before
/// any request for it. Fails only when the lease cannot be taken.
pub(super) async fn request_build(
    leases: &dyn IdempotencyStore,
    buildkite: &BuildkiteClient,
    lease: Duration,
    request: &BuildRequest,
    since: DateTime<Utc>,
    resumed: bool,
) -> Result<BuildOutcome, ReleaseError> {
    let key = request.meta_value.as_str();
    let rev = match leases
        .idempotency_begin(BUILD_CLAIM_SCOPE, key, key, lease)
        .await?
    {
        IdempotencyBegin::New { rev } => rev,
        // The lease is only ever abandoned, never finished, so anything else is a holder.
        _ => {
            return Ok(BuildOutcome::Busy(ReleaseError::conflict(
                "build_in_progress",
                format!(
                    "the build for {key} is being requested, or its request went \
                     unanswered moments ago; retry in {} s",
                    lease.as_secs()
                ),
            )));
        }
    };
    let (org, name) = (
        request.pipeline.organization.as_str(),
        request.pipeline.pipeline.as_str(),
    );
    let meta_data = [(request.meta_key, key)];
    // Errors come with whether the build may exist despite them.
    let attempt = async {
        if resumed {
            match find_build(buildkite, org, name, since, &meta_data).await {
                Ok(Some(build)) => return Ok(build),
                Ok(None) => {}
                Err(e) => return Err((e, true)),
            }
        }
        create_or_find(buildkite, org, name, &request.body, since, &meta_data)
            .await
            .map_err(|e| {
                let maybe = may_have_acted(&e);
                (e, maybe)
            })
    };
    let budget = build_attempt_budget(lease);
    let outcome = match tokio::time::timeout(budget, attempt).await {
        Err(_) => BuildOutcome::Unknown(ReleaseError::BuildkiteUnavailable(format!(
            "no answer within {budget:?}; {BUILD_UNKNOWN}"
        ))),
        Ok(Ok(build)) => BuildOutcome::Started(Box::new(build)),
        Ok(Err((e, true))) => BuildOutcome::Unknown(ReleaseError::BuildkiteUnavailable(format!(
            "{e}; {BUILD_UNKNOWN}"
        ))),
        Ok(Err((e, false))) => BuildOutcome::NotCreated(classify_buildkite(e)),
    };
    if matches!(outcome, BuildOutcome::Unknown(_)) {
        // A request of it may still land: the lease is kept until it lapses, so the next
        // attempt looks only after that margin.
        return Ok(outcome);
    }
    // The build is known (or certainly absent), and the record says so or is about to: a
    // call that resumes the record in between finds the same build.
    if let Err(e) = leases
        .idempotency_abandon(BUILD_CLAIM_SCOPE, key, rev)
        .await
    {
        tracing::warn!(key, error = %e, "could not give up a build request's lease; it lapses");
    }
    Ok(outcome)
}
