//! Firing: every finished build is matched against the rules, and each matching rule triggers
//! exactly one build of its target pipeline per source build, whatever the number of deliveries,
//! poll sightings or concurrent invocations.
//!
//! # How a firing can be neither lost nor doubled
//!
//! 1. A match is first written as a [`PendingFiring`] (one per rule and source build, written only
//!    if absent), holding the whole create-build request. From then on the firing survives any
//!    failure: Buildkite down, the store briefly down after this point, the process killed.
//! 2. [`FiringStore::claim_firing`] serialises attempts: one caller at a time holds a lease on
//!    (rule, source build); a caller that finds it [`Firing::Fired`] stops, and one that finds it
//!    claimed leaves it to the holder (its lease lapses if the holder dies).
//! 3. Before the request, the pending record is marked *attempted* (write-ahead). A firing that
//!    was ever attempted is, on every later attempt, first looked up in Buildkite: a build of the
//!    target pipeline created since the first attempt and carrying this firing's meta-data
//!    ([`super::META_RULE`], [`super::META_SOURCE_BUILD_ID`]). If one exists (the request went
//!    through but its answer, or the process, was lost), it is recorded instead of creating a
//!    second one.
//!    The same lookup follows at once a failure after which Buildkite may have acted (a timeout,
//!    a connection lost mid-request, a 5xx): a lost answer is found, not repeated.
//! 4. On success the target build is recorded ([`FiringStore::record_fired`], conditional on the
//!    claim being the one this caller won) and the pending record removed. On failure the pending
//!    record is kept with a backoff and the claim released.
//!
//! # Why a slow attempt cannot fire twice
//!
//! The claim's lease must outlast the attempt, or a second caller takes over while the first
//! one's request is still coming. The client's own bound is not enough: with its default policy
//! a create alone may take 4 × `KITEBRIDGE_HTTP_TIMEOUT` (up to 300 s each) plus 3 rate-limit
//! waits of up to 120 s, and a spent rate limit or a long listing adds more. So every attempt
//! runs under a budget, [`ATTEMPT_BUDGET`] (3/5 of the lease), and is cut off when it is spent:
//! the attempt ends at least 2/5 of the lease (120 s) before the claim lapses. A cut-off attempt
//! keeps its claim until it lapses, so a request of it that Buildkite applies late has that
//! margin to land before the next attempt looks for it.
//!
//! `find_build` and `create_or_find` carry this discipline for the releases API too.
//!
//! Failed attempts are retried by [`RuleFirer::retry_pending`] (call it from the poll cycle), by
//! a redelivery or new sighting of the source build, and opportunistically at most once a minute
//! from [`BuildObserver::observe`]. So a Buildkite failure never fails the webhook or the poll
//! cycle (the firing is safe in the store); only a store failure before step 1 does, as
//! [`ObserveError::Store`], so that the build is seen again.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::{Decision, META_RULE, META_SOURCE_BUILD_ID, Rule, RuleError, SourceBuild};
use crate::buildkite::client::{BuildFilter, BuildkiteClient, BuildkiteError, CreateBuild};
use crate::buildkite::model::Build;
use crate::config::Config;
use crate::net::SendError;
use crate::observe::{BuildObserver, ObserveError};
use crate::store::{
    Firing, FiringClaim, FiringStore, PendingFiring, PendingFiringStore, RuleStore, Store,
    StoreError,
};

/// How long a claim holds before another caller may take over.
pub const CLAIM_LEASE: Duration = Duration::from_secs(300);
/// Longest an attempt runs under [`CLAIM_LEASE`] (see the module docs).
pub const ATTEMPT_BUDGET: Duration = attempt_budget(CLAIM_LEASE);
/// How far before the first attempt the duplicate lookup starts (clock differences).
const LOOKUP_MARGIN: chrono::Duration = chrono::Duration::minutes(10);

/// 3/5 of `lease`: the rest is the margin for a request applied late, and for clocks.
const fn attempt_budget(lease: Duration) -> Duration {
    Duration::from_millis((lease.as_millis() as u64).saturating_mul(3) / 5)
}
/// Most pending firings one [`RuleFirer::retry_pending`] call works through.
const RETRY_BATCH: usize = 50;
/// Least time between two opportunistic sweeps from `observe`.
const SWEEP_EVERY_SECS: i64 = 60;

/// The store capabilities firing needs.
pub trait RulesBackend: RuleStore + PendingFiringStore + FiringStore {}
impl<T: RuleStore + PendingFiringStore + FiringStore> RulesBackend for T {}

/// What one firing attempt came to.
#[derive(Debug, Clone, PartialEq)]
pub enum FireOutcome {
    /// The target build was created now (or found, created by an earlier attempt).
    Fired(Value),
    /// It had already fired.
    AlreadyFired,
    /// Someone else holds the claim right now.
    InFlight,
    /// The attempt failed; the firing stays pending and is retried later.
    Deferred(String),
}

/// Counts of one [`RuleFirer::retry_pending`] sweep.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetrySummary {
    pub fired: usize,
    pub already_fired: usize,
    pub in_flight: usize,
    pub deferred: usize,
}

/// The trigger-rule [`BuildObserver`].
pub struct RuleFirer {
    store: Arc<dyn RulesBackend>,
    /// `None` without `BUILDKITE_API_TOKEN`: firings then wait, pending, until one is set.
    buildkite: Option<BuildkiteClient>,
    /// Rules from configuration (already validated); the store's are read on each build.
    config_rules: Arc<Vec<Rule>>,
    default_org: Option<String>,
    last_sweep: AtomicI64,
    lease: Duration,
}

impl RuleFirer {
    pub fn new(
        store: Arc<dyn RulesBackend>,
        buildkite: Option<BuildkiteClient>,
        config_rules: Arc<Vec<Rule>>,
        default_org: Option<String>,
    ) -> Self {
        Self {
            store,
            buildkite,
            config_rules,
            default_org,
            last_sweep: AtomicI64::new(0),
            lease: CLAIM_LEASE,
        }
    }

    /// The same firer with claims of `lease` (and attempts cut off at 3/5 of it) instead of
    /// [`CLAIM_LEASE`]; tests use short ones.
    pub fn with_claim_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// The firer of a deployment: `rules`, the configured rules as start-up read and validated
    /// them once ([`super::config_rules`]; the rules API shows the same list), the store's, and
    /// a Buildkite client. Configured rules without `BUILDKITE_API_TOKEN` refuse to start.
    pub fn from_config(
        config: &Config,
        http: reqwest::Client,
        store: Store,
        rules: Arc<Vec<Rule>>,
    ) -> Result<Self, crate::Error> {
        let client = config
            .buildkite
            .token
            .clone()
            .map(|token| BuildkiteClient::new(http, config.buildkite.api_url.clone(), token));
        if client.is_none() && !rules.is_empty() {
            return Err(crate::Error::Startup(
                "BUILDKITE_API_TOKEN: required to fire the trigger rules of KITEBRIDGE_RULES / KITEBRIDGE_RULES_FILE"
                    .into(),
            ));
        }
        Ok(RuleFirer::new(
            Arc::new(store),
            client,
            rules,
            super::default_organization(config),
        ))
    }

    /// Every rule in force: configuration's, then the store's (a stored rule that no longer
    /// validates, or that shadows a configured name, is left out with a warning).
    pub async fn rules(&self) -> Result<Vec<Rule>, StoreError> {
        let mut rules: Vec<Rule> = self.config_rules.as_ref().clone();
        for stored in self.store.rules().await? {
            if rules.iter().any(|r| r.name == stored.name) {
                tracing::warn!(rule = %stored.name, "stored rule ignored: a configured rule has the same name");
                continue;
            }
            match Rule::from_json(&stored.name, stored.document) {
                Ok(r) => rules.push(r),
                Err(e) => {
                    tracing::warn!(rule = %e.rule, kind = %e.kind, error = %e.message, "stored rule refused")
                }
            }
        }
        Ok(rules)
    }

    /// Evaluates every rule whose source is this build's pipeline; fires the matches.
    pub async fn handle(
        &self,
        organization: &str,
        build: &Build,
        pipeline: Option<&crate::buildkite::model::Pipeline>,
    ) -> Result<Vec<(String, FireOutcome)>, ObserveError> {
        let mut outcomes = Vec::new();
        if !super::is_finished(build) {
            return Ok(outcomes);
        }
        let source = SourceBuild::new(organization, build, pipeline);
        let Some(slug) = source.pipeline_slug() else {
            return Ok(outcomes);
        };
        let default_org = self.default_org.as_deref();
        for rule in self.rules().await? {
            if !rule.is_source(organization, &slug, default_org) {
                continue;
            }
            let (target_org, target_pipeline, request) = match rule.evaluate(&source, default_org) {
                Ok(Decision::Trigger {
                    organization,
                    pipeline,
                    build,
                }) => (organization, pipeline, build),
                Ok(Decision::Skip(why)) => {
                    tracing::debug!(rule = %rule.name, build = %source.describe(), reason = %why, "rule not triggered");
                    continue;
                }
                Err(RuleError {
                    rule,
                    kind,
                    message,
                }) => {
                    // The rule itself is at fault (a `${X?}` unset, a runtime error): retrying
                    // cannot help, so say it loudly and go on with the other rules.
                    tracing::warn!(%rule, %kind, error = %message, build = %source.describe(), "rule failed to evaluate");
                    continue;
                }
            };
            if let Some(Firing::Fired { .. }) = self.store.firing(&rule.name, &build.id).await? {
                outcomes.push((rule.name.clone(), FireOutcome::AlreadyFired));
                continue;
            }
            let now = Utc::now();
            let pending = PendingFiring {
                rule: rule.name.clone(),
                source_build: build.id.clone(),
                source: source.describe(),
                target_organization: target_org,
                target_pipeline,
                request,
                created_at: now,
                attempted_at: None,
                attempts: 0,
                next_attempt_at: now,
                last_error: None,
            };
            self.store.add_pending(&pending).await?;
            // An earlier pending record (same rule and build) holds the same request unless the
            // rule changed since; the first decision stands.
            let pending = self
                .store
                .pending(&rule.name, &build.id)
                .await?
                .unwrap_or(pending);
            let outcome = self.fire(&pending).await?;
            outcomes.push((rule.name.clone(), outcome));
        }
        Ok(outcomes)
    }

    /// One attempt at a pending firing (see the module docs).
    pub async fn fire(&self, pending: &PendingFiring) -> Result<FireOutcome, StoreError> {
        let (rule, build_id) = (pending.rule.as_str(), pending.source_build.as_str());
        let rev = match self.store.claim_firing(rule, build_id, self.lease).await? {
            FiringClaim::Taken(Firing::Fired { .. }) => {
                self.store.remove_pending(rule, build_id).await?;
                return Ok(FireOutcome::AlreadyFired);
            }
            FiringClaim::Taken(Firing::Claimed { .. }) => return Ok(FireOutcome::InFlight),
            FiringClaim::Won { rev } => rev,
        };
        let budget = attempt_budget(self.lease);
        let Ok(attempted) = tokio::time::timeout(budget, self.attempt(pending)).await else {
            // Its request may be out: the claim is kept until it lapses (see the module docs).
            let message = format!("the attempt took longer than {budget:?} and was cut off");
            let next = Utc::now() + backoff(pending.attempts);
            self.store
                .defer_pending(rule, build_id, &message, next)
                .await?;
            tracing::warn!(rule, source = %pending.source, retry_at = %next, "{message}; will retry");
            return Ok(FireOutcome::Deferred(message));
        };
        match attempted {
            Ok(target) => {
                // Only while the claim is still the one won above: if it lapsed and another
                // caller took it, that caller looks before it creates, and records this build.
                match self
                    .store
                    .record_fired(rule, build_id, rev, target.clone())
                    .await
                {
                    Ok(()) => {}
                    Err(StoreError::Conflict) => {
                        tracing::warn!(rule, source = %pending.source, target = %target,
                            "rule fired, but its claim had passed to another attempt, which records it");
                        return Ok(match self.store.firing(rule, build_id).await? {
                            Some(Firing::Fired { .. }) => FireOutcome::AlreadyFired,
                            _ => FireOutcome::InFlight,
                        });
                    }
                    Err(e) => return Err(e),
                }
                self.store.remove_pending(rule, build_id).await?;
                tracing::info!(rule, source = %pending.source, target = %target, "rule fired");
                Ok(FireOutcome::Fired(target))
            }
            Err(AttemptError::Store(e)) => {
                // Leave the claim to lapse: the request may have gone out, and the write-ahead
                // mark makes the next attempt look before it creates.
                Err(e)
            }
            Err(AttemptError::Buildkite(message)) => {
                let next = Utc::now() + backoff(pending.attempts);
                self.store
                    .defer_pending(rule, build_id, &message, next)
                    .await?;
                self.store.release_firing(rule, build_id, rev).await?;
                tracing::warn!(rule, source = %pending.source, error = %message, retry_at = %next, "rule firing failed; will retry");
                Ok(FireOutcome::Deferred(message))
            }
        }
    }

    async fn attempt(&self, pending: &PendingFiring) -> Result<Value, AttemptError> {
        let (rule, build_id) = (pending.rule.as_str(), pending.source_build.as_str());
        // The caller's copy may be stale: read the attempt mark from the store.
        let current = self
            .store
            .pending(rule, build_id)
            .await
            .map_err(AttemptError::Store)?;
        let attempted_at = current
            .as_ref()
            .unwrap_or(pending)
            .attempted_at
            .or(pending.attempted_at);
        if let Some(since) = attempted_at
            && let Some(found) = self.find_created(pending, since).await?
        {
            return Ok(found);
        }
        let marked = self
            .store
            .mark_attempted(rule, build_id, Utc::now())
            .await
            .map_err(AttemptError::Store)?;
        let since = marked.and_then(|p| p.attempted_at).unwrap_or_else(Utc::now);
        let Some(buildkite) = &self.buildkite else {
            return Err(AttemptError::Buildkite(
                "BUILDKITE_API_TOKEN is not set: cannot create builds".into(),
            ));
        };
        let created = create_or_find(
            buildkite,
            &pending.target_organization,
            &pending.target_pipeline,
            &pending.request,
            since,
            &Self::meta_data(pending),
        )
        .await
        .map_err(|e| AttemptError::Buildkite(e.to_string()))?;
        Ok(target_summary(pending, &created))
    }

    /// The meta-data that names a firing's build.
    fn meta_data(pending: &PendingFiring) -> [(&'static str, &str); 2] {
        [
            (META_RULE, pending.rule.as_str()),
            (META_SOURCE_BUILD_ID, pending.source_build.as_str()),
        ]
    }

    /// A build an earlier attempt created (see [`find_build`]).
    async fn find_created(
        &self,
        pending: &PendingFiring,
        since: DateTime<Utc>,
    ) -> Result<Option<Value>, AttemptError> {
        let Some(buildkite) = &self.buildkite else {
            return Err(AttemptError::Buildkite(
                "BUILDKITE_API_TOKEN is not set: cannot look for builds".into(),
            ));
        };
        let found = find_build(
            buildkite,
            &pending.target_organization,
            &pending.target_pipeline,
            since,
            &Self::meta_data(pending),
        )
        .await
        .map_err(|e| AttemptError::Buildkite(format!("looking for an earlier attempt: {e}")))?;
        Ok(found.map(|b| target_summary(pending, &b)))
    }

    /// Retries every pending firing that is due (at most a batch per call). Call it from the
    /// poll cycle; errors are per firing and logged, except a store failure listing them.
    pub async fn retry_pending(&self) -> Result<RetrySummary, StoreError> {
        self.retry_pending_due(Utc::now()).await
    }

    /// [`RuleFirer::retry_pending`] as if it were `now` (tests skip the backoff with it).
    pub async fn retry_pending_due(&self, now: DateTime<Utc>) -> Result<RetrySummary, StoreError> {
        let mut summary = RetrySummary::default();
        for p in self.store.due_pending(now, RETRY_BATCH).await? {
            match self.fire(&p).await {
                Ok(FireOutcome::Fired(_)) => summary.fired += 1,
                Ok(FireOutcome::AlreadyFired) => summary.already_fired += 1,
                Ok(FireOutcome::InFlight) => summary.in_flight += 1,
                Ok(FireOutcome::Deferred(_)) => summary.deferred += 1,
                Err(e) => {
                    summary.deferred += 1;
                    tracing::warn!(rule = %p.rule, source = %p.source, error = %e, "pending firing: store failed");
                }
            }
        }
        Ok(summary)
    }

    async fn maybe_sweep(&self) {
        let now = Utc::now().timestamp();
        let last = self.last_sweep.load(Ordering::Relaxed);
        if now - last < SWEEP_EVERY_SECS
            || self
                .last_sweep
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        if let Err(e) = self.retry_pending().await {
            tracing::warn!(error = %e, "pending firings: cannot list");
        }
    }
}

/// A build of `org`/`pipeline` created since (shortly before) `since` and carrying every
/// `meta_data` pair: the build an earlier request made, whose answer was lost.
pub(crate) async fn find_build(
    buildkite: &BuildkiteClient,
    org: &str,
    pipeline: &str,
    since: DateTime<Utc>,
    meta_data: &[(&str, &str)],
) -> Result<Option<Build>, BuildkiteError> {
    let filter = BuildFilter {
        created_from: Some(since - LOOKUP_MARGIN),
        ..BuildFilter::default()
    };
    let listing = buildkite.list_builds::<Build>(org, &filter).await?;
    Ok(listing.builds.into_iter().find(|b| {
        meta_data
            .iter()
            .all(|(k, v)| b.meta_data.get(*k).map(String::as_str) == Some(*v))
            && b.pipeline_slug(None).as_deref() == Some(pipeline)
    }))
}

/// Creates the build; when the request failed in a way that Buildkite may have acted on
/// anyway ([`may_have_acted`]), looks for it ([`find_build`]) before reporting the failure. The
/// caller has written its attempt down at `since` first, and holds a claim that serialises
/// attempts.
pub(crate) async fn create_or_find(
    buildkite: &BuildkiteClient,
    org: &str,
    pipeline: &str,
    body: &CreateBuild,
    since: DateTime<Utc>,
    meta_data: &[(&str, &str)],
) -> Result<Build, BuildkiteError> {
    let error = match buildkite.create_build::<Build>(org, pipeline, body).await {
        Ok(build) => return Ok(build),
        Err(e) if !may_have_acted(&e) => return Err(e),
        Err(e) => e,
    };
    match find_build(buildkite, org, pipeline, since, meta_data).await {
        Ok(Some(build)) => {
            tracing::info!(org, pipeline, build = build.number, error = %error,
                "the create-build answer was lost; found the build it created");
            Ok(build)
        }
        Ok(None) => Err(error),
        Err(lookup) => {
            tracing::warn!(org, pipeline, error = %lookup, "cannot look for a build whose answer was lost");
            Err(error)
        }
    }
}

/// Whether a failed create-build request may still have created the build: not when Buildkite
/// answered with a refusal (4xx, a 429 included) or the connection was refused.
pub(crate) fn may_have_acted(e: &BuildkiteError) -> bool {
    match e {
        BuildkiteError::Send(SendError::Status { status, .. }) => *status == 408 || *status >= 500,
        BuildkiteError::Send(SendError::Refused(_)) => false,
        BuildkiteError::Send(SendError::Connect(_) | SendError::Timeout | SendError::Other(_)) => {
            true
        }
        // A 2xx whose body did not decode: it was created.
        BuildkiteError::Decode(_) => true,
    }
}

enum AttemptError {
    Store(StoreError),
    Buildkite(String),
}

/// What is recorded about the target build.
fn target_summary(pending: &PendingFiring, b: &Build) -> Value {
    json!({
        "organization": pending.target_organization,
        "pipeline": pending.target_pipeline,
        "id": b.id,
        "number": b.number,
        "web_url": b.web_url,
    })
}

/// 30 s, doubling per failed attempt, at most an hour.
fn backoff(attempts: u32) -> chrono::Duration {
    let secs = 30i64.saturating_mul(1i64 << attempts.min(7)).min(3600);
    chrono::Duration::seconds(secs)
}

#[async_trait]
impl BuildObserver for RuleFirer {
    /// Retries firings whose trigger failed earlier (Buildkite refused or was unreachable).
    async fn tick(&self) -> Result<(), ObserveError> {
        self.retry_pending().await?;
        Ok(())
    }

    async fn observe(
        &self,
        organization: &str,
        build: &Build,
        pipeline: Option<&crate::buildkite::model::Pipeline>,
    ) -> Result<(), ObserveError> {
        let result = self.handle(organization, build, pipeline).await.map(|_| ());
        self.maybe_sweep().await;
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_end_well_before_their_claim_lapses() {
        assert_eq!(ATTEMPT_BUDGET, Duration::from_secs(180));
        assert_eq!(
            attempt_budget(Duration::from_secs(5)),
            Duration::from_secs(3)
        );
        // The margin covers a create that Buildkite applies late and clock differences, and
        // the budget admits a create after one full rate-limit wait (120 s).
        assert!(CLAIM_LEASE - ATTEMPT_BUDGET >= Duration::from_secs(120));
        assert!(ATTEMPT_BUDGET > Duration::from_secs(120) + Duration::from_secs(4 * 10));
    }

    #[test]
    fn only_refusals_certainly_created_nothing() {
        let status = |status| {
            BuildkiteError::Send(SendError::Status {
                status,
                message: String::new(),
                retry_after: None,
            })
        };
        for e in [status(400), status(404), status(422), status(429)] {
            assert!(!may_have_acted(&e), "{e}");
        }
        let refused = BuildkiteError::Send(SendError::Refused(
            "Connection refused (os error 111)".into(),
        ));
        assert!(!may_have_acted(&refused));
        for e in [
            status(500),
            status(502),
            status(408),
            BuildkiteError::Send(SendError::Timeout),
            BuildkiteError::Send(SendError::Connect(
                "connection closed before message completed".into(),
            )),
            BuildkiteError::Decode("expected value".into()),
        ] {
            assert!(may_have_acted(&e), "{e}");
        }
    }

    #[test]
    fn backoff_grows_and_caps() {
        assert_eq!(backoff(0).num_seconds(), 30);
        assert_eq!(backoff(1).num_seconds(), 60);
        assert_eq!(backoff(6).num_seconds(), 1920);
        assert_eq!(backoff(7).num_seconds(), 3600);
        assert_eq!(backoff(u32::MAX).num_seconds(), 3600);
    }
}
