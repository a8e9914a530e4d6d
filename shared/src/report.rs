//! The one path every commit status takes, from a webhook or a poll: de-duplication, the
//! never-regress rule, the outbox, paced posting. This is the only code that posts statuses or
//! records what was reported.
//!
//! For each status: [`StatusLedger::begin_report`] records it write-ahead (so a crash loses
//! nothing) and says whether to post; the post waits for its turn from the destination's
//! [`Pacer`] (rate limits, outages, priority), then goes to the [`StatusSink`]; success is
//! recorded with [`StatusLedger::delivered`] (which hands back a newer status if one arrived
//! meanwhile, to be posted after ours); failure leaves it in the outbox, and
//! [`Reporter::drain`] delivers it later, newest builds first.
//!
//! When an observation may be a re-run that its payload cannot prove
//! ([`crate::status::Ordering::Ambiguous`]), the reporter asks Buildkite for the build once
//! ([`Recheck`]) and reports what Buildkite says.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use futures::stream::{self, StreamExt};

use url::Url;

use crate::bitbucket::pacer::{Feedback, Pacer, Priority};
use crate::bitbucket::request::{ApiKind, StatusRequest, build_request};
use crate::buildkite::model::{Build, Pipeline};
use crate::net::SendError;
use crate::status::{self, Skip, StatusVersion};
use crate::store::{
    Begin, BuildSource, PendingStatus, Ring, Standing, StatusLedger, StatusRecord, StoreError,
};

/// A build as the ledger records it: mapped ([`status::map`]) and turned into the request for
/// the Bitbucket API in use, kept as the payload so the outbox can send it again later.
pub fn status_record(
    build: &Build,
    pipeline: Option<&Pipeline>,
    organization: Option<&str>,
    api: &ApiKind,
    bitbucket_url: &Url,
) -> Result<StatusRecord, Skip> {
    let status = status::map(build, pipeline, organization)?;
    let request = build_request(api, bitbucket_url, &status)?;
    Ok(StatusRecord {
        state: request.state.as_str().to_string(),
        payload: request,
        source: Some(BuildSource {
            organization: status.organization.clone(),
            pipeline: status.pipeline.clone(),
            number: status.build_number,
        }),
        commit: status.commit,
        key: status.key,
        version: status.version,
    })
}

/// Where statuses go: Bitbucket, in production. One attempt per call: retries and waits are
/// the reporter's, through the pacer.
#[async_trait]
pub trait StatusSink: Send + Sync {
    async fn post(&self, request: &StatusRequest) -> Result<(), SendError>;
}

/// Asks Buildkite for a build's current state, mapped as the reporter's statuses are.
#[async_trait]
pub trait Recheck: Send + Sync {
    /// `Ok(None)`: Buildkite says the build cannot be reported (or no longer exists).
    async fn recheck(&self, source: &BuildSource) -> Result<Option<StatusRecord>, String>;
}

/// What became of one status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Posted (and, if a newer one arrived meanwhile, that one too).
    Posted,
    /// Already on Bitbucket: nothing sent.
    AlreadyReported,
    /// A newer status for the same commit and key is being delivered instead.
    Superseded,
    /// Someone else is posting this very status right now.
    InFlight,
    /// Not delivered now; kept in the outbox for a later attempt.
    Deferred { error: String },
    /// Possibly a re-run, and Buildkite could not be asked: the recorded status stands.
    Unconfirmed { error: String },
    /// Bitbucket refused it for longer than the give-up time, or its record is gone: it left
    /// the outbox.
    Abandoned { error: String },
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Tally {
    pub posted: u64,
    pub already_reported: u64,
    pub superseded: u64,
    pub in_flight: u64,
    pub deferred: u64,
    pub unconfirmed: u64,
    pub abandoned: u64,
}

impl Tally {
    pub fn add(&mut self, o: &Outcome) {
        match o {
            Outcome::Posted => self.posted += 1,
            Outcome::AlreadyReported => self.already_reported += 1,
            Outcome::Superseded => self.superseded += 1,
            Outcome::InFlight => self.in_flight += 1,
            Outcome::Deferred { .. } => self.deferred += 1,
            Outcome::Unconfirmed { .. } => self.unconfirmed += 1,
            Outcome::Abandoned { .. } => self.abandoned += 1,
        }
    }

    pub fn merge(&mut self, t: &Tally) {
        self.posted += t.posted;
        self.already_reported += t.already_reported;
        self.superseded += t.superseded;
        self.in_flight += t.in_flight;
        self.deferred += t.deferred;
        self.unconfirmed += t.unconfirmed;
        self.abandoned += t.abandoned;
    }
}

#[derive(Clone)]
pub struct Reporter {
    ledger: Arc<dyn StatusLedger>,
    sink: Arc<dyn StatusSink>,
    pacer: Arc<Pacer>,
    recheck: Option<Arc<dyn Recheck>>,
    concurrency: usize,
    /// How long a status being posted stays leased before the outbox may retry it.
    lease: Duration,
    priority: Priority,
    /// Longest wait for a turn before the status is left to the outbox.
    max_wait: Duration,
    give_up_after: Duration,
    /// How long an unanswered post may still take to land on Bitbucket: a retry of it, or the
    /// re-post of a newer state it may land on, waits that long.
    settle: Duration,
    /// When this process last kept a posted and a refused status for the operator view (ms
    /// since the epoch), shared by the live and backlog reporters.
    last_noted: Arc<[std::sync::atomic::AtomicI64; 2]>,
}

/// The operator view keeps a sample of the statuses posted and refused, at most one of each per
/// this interval per process: a backlog posts (or a wrong token refuses) hundreds a second, and
/// each kept entry is a store write (on DynamoDB, to one partition).
const NOTE_EVERY_MS: i64 = 250;

/// When a refused status (400, 401, 404...) is tried again: hourly, so it is delivered once a
/// person fixed the cause, without hammering.
const REFUSED_RETRY: Duration = Duration::from_secs(3600);
/// Posts of one status answered 429 before it is left to the outbox.
const RATE_LIMITED_TRIES: u32 = 6;
/// Posts of one status that found Bitbucket unavailable before it is left to the outbox.
const UNAVAILABLE_TRIES: u32 = 2;

impl Reporter {
    /// Keeps `entry` in `ring` for the operator view. A failure is logged; it is never the
    /// report's (or the poll cycle's).
    pub async fn note_recent(&self, ring: Ring, entry: serde_json::Value) {
        if let Err(e) = self.ledger.note_recent(ring, entry).await {
            tracing::warn!(error = %e, ?ring, "could not keep a recent-activity entry");
        }
    }

    /// Keeps what `entry` makes in `ring` (posted or refused) unless this process kept one
    /// there less than [`NOTE_EVERY_MS`] ago.
    async fn note_sampled(&self, ring: Ring, entry: impl FnOnce() -> serde_json::Value) {
        use std::sync::atomic::Ordering::Relaxed;
        let last = &self.last_noted[usize::from(ring == Ring::Refused)];
        let now = Utc::now().timestamp_millis();
        let seen = last.load(Relaxed);
        if now - seen >= NOTE_EVERY_MS && last.compare_exchange(seen, now, Relaxed, Relaxed).is_ok()
        {
            self.note_recent(ring, entry()).await;
        }
    }

    /// A reporter for the backlog (poll cycles, the outbox).
    pub fn new(
        ledger: Arc<dyn StatusLedger>,
        sink: Arc<dyn StatusSink>,
        pacer: Arc<Pacer>,
        concurrency: usize,
    ) -> Reporter {
        Reporter {
            ledger,
            sink,
            pacer,
            recheck: None,
            concurrency: concurrency.max(1),
            lease: Duration::from_secs(120),
            priority: Priority::Backlog,
            max_wait: Duration::from_secs(60),
            give_up_after: Duration::from_secs(72 * 3600),
            settle: Duration::from_secs(10),
            last_noted: Arc::default(),
        }
    }

    /// The same reporter for live statuses (webhooks): ahead of the backlog, and quick to
    /// leave a status to the outbox rather than keep Buildkite waiting for an answer.
    pub fn live(&self) -> Reporter {
        Reporter {
            priority: Priority::Live,
            max_wait: Duration::from_secs(2),
            ..self.clone()
        }
    }

    pub fn with_recheck(mut self, recheck: Arc<dyn Recheck>) -> Reporter {
        self.recheck = Some(recheck);
        self
    }

    pub fn with_give_up_after(mut self, after: Duration) -> Reporter {
        self.give_up_after = after;
        self
    }

    /// How long a post that got no answer may still land (the HTTP timeout is a fair bound: a
    /// server that held a request that long before acting is rare).
    pub fn with_unanswered_settle(mut self, settle: Duration) -> Reporter {
        self.settle = settle;
        self
    }

    /// Most posts in flight at once.
    pub fn concurrency(&self) -> usize {
        self.concurrency
    }

    pub fn pacer(&self) -> &Arc<Pacer> {
        &self.pacer
    }

    pub fn ledger(&self) -> &Arc<dyn StatusLedger> {
        &self.ledger
    }

    /// Reports one status. Errors are store failures only (the status may not be recorded):
    /// callers must not move a cursor past it.
    pub async fn report(&self, status: StatusRecord) -> Result<Outcome, StoreError> {
        match self.ledger.begin_report(&status, self.lease).await? {
            Begin::AlreadyReported => Ok(Outcome::AlreadyReported),
            Begin::Superseded => Ok(Outcome::Superseded),
            Begin::InFlight => Ok(Outcome::InFlight),
            Begin::Post => self.deliver(status, 0, None).await,
            Begin::Ambiguous { recorded } => self.confirm(status, recorded).await,
        }
    }

    /// A build running again by its payload's evidence as old as what is recorded: ask
    /// Buildkite, and report its answer instead.
    async fn confirm(
        &self,
        status: StatusRecord,
        recorded: StatusVersion,
    ) -> Result<Outcome, StoreError> {
        let (Some(recheck), Some(source)) = (&self.recheck, &status.source) else {
            return Ok(Outcome::AlreadyReported);
        };
        let fresh = match recheck.recheck(source).await {
            Ok(Some(fresh)) if fresh.commit == status.commit && fresh.key == status.key => fresh,
            Ok(_) => return Ok(Outcome::AlreadyReported),
            Err(error) => {
                tracing::warn!(commit = %status.commit, key = %status.key, error = %error,
                    "cannot ask Buildkite whether the build runs again; the recorded status stands");
                return Ok(Outcome::Unconfirmed { error });
            }
        };
        tracing::debug!(commit = %fresh.commit, key = %fresh.key, recorded = %recorded,
            buildkite = %fresh.version, "asked Buildkite about a possible re-run");
        let mut fresh = fresh;
        if status::compare(fresh.version, recorded) == status::Ordering::Ambiguous {
            // Buildkite says it is running now, after what was recorded. Unless the record
            // already says just that (an in-progress state of the same rank), it is news.
            if !recorded.ended() && recorded.rank == fresh.version.rank {
                return Ok(Outcome::AlreadyReported);
            }
            fresh.version = fresh.version.confirmed_after(recorded);
        }
        match self.ledger.begin_report(&fresh, self.lease).await? {
            Begin::Post => self.deliver(fresh, 0, None).await,
            Begin::AlreadyReported | Begin::Ambiguous { .. } => Ok(Outcome::AlreadyReported),
            Begin::Superseded => Ok(Outcome::Superseded),
            Begin::InFlight => Ok(Outcome::InFlight),
        }
    }

    /// Delivers outbox entries that were due at `now` (failed earlier, or whose poster died),
    /// newest builds first, at most `limit` this time. A poll cycle passes its own start, so
    /// what failed during the cycle is not tried again in it.
    pub async fn drain(
        &self,
        now: chrono::DateTime<Utc>,
        limit: usize,
    ) -> Result<Tally, StoreError> {
        let due = self.ledger.due(now, limit).await?;
        let results: Vec<Result<Outcome, StoreError>> = stream::iter(due)
            .map(|p: PendingStatus| self.redeliver(p))
            .buffer_unordered(self.concurrency)
            .collect()
            .await;
        let mut tally = Tally::default();
        for r in results {
            tally.add(&r?);
        }
        Ok(tally)
    }

    async fn redeliver(&self, p: PendingStatus) -> Result<Outcome, StoreError> {
        let s = &p.status;
        match self.ledger.standing(&s.commit, &s.key, s.version).await? {
            Standing::Wanted => self.deliver(p.status, p.attempts, p.queued_at).await,
            Standing::AlreadyReported | Standing::Superseded => {
                self.ledger.abandon(&s.commit, &s.key, s.version).await?;
                Ok(Outcome::AlreadyReported)
            }
            Standing::Gone => {
                let error = "its status record is gone (expired)".to_string();
                self.give_up(s, &error).await?;
                Ok(Outcome::Abandoned { error })
            }
        }
    }

    async fn give_up(&self, s: &StatusRecord, error: &str) -> Result<(), StoreError> {
        tracing::error!(target: "kitebridge::outbox", commit = %s.commit, key = %s.key,
            state = %s.state, error, metric = "StatusAbandoned",
            "giving up on a status Bitbucket never took");
        crate::telemetry::emit_count(
            "StatusAbandoned",
            serde_json::json!({"commit": s.commit, "key": s.key, "state": s.state, "error": error}),
        );
        self.ledger.abandon(&s.commit, &s.key, s.version).await
    }

    async fn deliver(
        &self,
        mut status: StatusRecord,
        attempts: u32,
        queued_at: Option<chrono::DateTime<Utc>>,
    ) -> Result<Outcome, StoreError> {
        let (mut limited, mut unavailable) = (0u32, 0u32);
        // Set when ours landed after a newer state was delivered: that newer state goes again,
        // whatever the ledger says of it (it was delivered, but ours is now on top of it).
        let mut reposting = false;
        loop {
            if let Err(held) = self.pacer.acquire(self.priority, self.max_wait).await {
                let error = held.to_string();
                // Due at once: the destination's pacer, not this status, says when.
                let next = Utc::now();
                self.ledger
                    .defer(
                        &status.commit,
                        &status.key,
                        status.version,
                        next,
                        &error,
                        false,
                    )
                    .await?;
                return Ok(Outcome::Deferred { error });
            }
            // Whatever arrived since this one was begun or while it waited for its turn
            // (coalescing: a superseded state is never posted). A poll cycle reports many
            // builds at once, so a newer build of the same commit may be recorded between this
            // one's `begin_report` and its turn, however short the wait; one store read.
            if !reposting {
                match self
                    .ledger
                    .standing(&status.commit, &status.key, status.version)
                    .await?
                {
                    Standing::Wanted | Standing::Gone => {}
                    Standing::AlreadyReported => return Ok(Outcome::AlreadyReported),
                    Standing::Superseded => return Ok(Outcome::Superseded),
                }
            }
            let error = match self.sink.post(&status.payload).await {
                Ok(()) => {
                    self.pacer.feedback(Feedback::Accepted);
                    tracing::debug!(commit = %status.commit, key = %status.key, state = %status.state, "status posted");
                    match self
                        .ledger
                        .delivered(&status.commit, &status.key, status.version)
                        .await?
                    {
                        // Ours may have landed after the newer one: post the newer one again.
                        Some(newer) => {
                            status = newer;
                            reposting = true;
                            continue;
                        }
                        None => {
                            self.note_sampled(Ring::Posted, || {
                                serde_json::json!({
                                    "commit": status.commit,
                                    "key": status.key,
                                    "state": status.state,
                                })
                            })
                            .await;
                            return Ok(Outcome::Posted);
                        }
                    }
                }
                Err(error) => error,
            };
            let feedback = feedback_for(&error);
            self.pacer.feedback(feedback);
            match feedback {
                Feedback::RateLimited(_) if limited + 1 < RATE_LIMITED_TRIES => {
                    limited += 1;
                    continue;
                }
                // Not after a post that may still land: what goes next must wait for it
                // (below), and a newer status delivered meanwhile must be posted again after it.
                Feedback::Unavailable
                    if unavailable + 1 < UNAVAILABLE_TRIES && !error.is_ambiguous() =>
                {
                    unavailable += 1;
                    continue;
                }
                _ => {}
            }
            let refused = feedback == Feedback::Refused;
            let since = queued_at.unwrap_or_else(Utc::now);
            let overdue = (Utc::now() - since)
                .to_std()
                .is_ok_and(|age| age >= self.give_up_after);
            if refused && overdue {
                let error = format!("refused for longer than the give-up time: {error}");
                self.give_up(&status, &error).await?;
                return Ok(Outcome::Abandoned { error });
            }
            let next = if refused {
                Utc::now() + REFUSED_RETRY
            } else if error.is_ambiguous() {
                // It may still land: what goes next (its retry, or the newest state again)
                // must come after it.
                Utc::now() + self.settle
            } else {
                // The destination's backoff decides when: due at the next drain.
                Utc::now()
            };
            if refused {
                tracing::error!(commit = %status.commit, key = %status.key, error = %error, attempts,
                    "Bitbucket refused the status; keeping it for retry");
                self.note_sampled(Ring::Refused, || {
                    serde_json::json!({
                        "commit": status.commit,
                        "key": status.key,
                        "state": status.state,
                        "error": error.to_string(),
                    })
                })
                .await;
            } else {
                tracing::warn!(commit = %status.commit, key = %status.key, error = %error, attempts,
                    "status not delivered; keeping it for retry");
            }
            self.ledger
                .defer(
                    &status.commit,
                    &status.key,
                    status.version,
                    next,
                    &error.to_string(),
                    error.is_ambiguous(),
                )
                .await?;
            return Ok(Outcome::Deferred {
                error: error.to_string(),
            });
        }
    }
}

/// [`Recheck`] against Buildkite's REST API, mapped for the Bitbucket in use.
pub struct BuildkiteRecheck {
    pub buildkite: crate::buildkite::client::BuildkiteClient,
    pub bitbucket: crate::bitbucket::BitbucketClient,
}

#[async_trait]
impl Recheck for BuildkiteRecheck {
    async fn recheck(&self, source: &BuildSource) -> Result<Option<StatusRecord>, String> {
        let build: Option<Build> = self
            .buildkite
            .get_build(&source.organization, &source.pipeline, source.number)
            .await
            .map_err(|e| e.to_string())?;
        let Some(build) = build else {
            return Ok(None);
        };
        let api = self.bitbucket.api().await.map_err(|e| e.to_string())?;
        Ok(status_record(
            &build,
            None,
            Some(&source.organization),
            &api,
            self.bitbucket.base(),
        )
        .ok())
    }
}

/// What a failed post tells the pacer.
pub fn feedback_for(error: &SendError) -> Feedback {
    match error {
        SendError::Status {
            status: 429,
            retry_after,
            ..
        } => Feedback::RateLimited(*retry_after),
        e if e.is_transient() => Feedback::Unavailable,
        _ => Feedback::Refused,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bitbucket::request::{BitbucketState, StatusBody};
    use crate::store::{SqliteKv, Store};

    /// Bitbucket taking every post, and remembering it.
    #[derive(Default)]
    struct Taken(std::sync::Mutex<Vec<StatusRequest>>);

    #[async_trait]
    impl StatusSink for Taken {
        async fn post(&self, request: &StatusRequest) -> Result<(), SendError> {
            self.0.lock().unwrap().push(request.clone());
            Ok(())
        }
    }

    fn record(build: u64, state: BitbucketState) -> StatusRecord {
        let commit = "0123456789abcdef0123456789abcdef01234567".to_string();
        StatusRecord {
            commit: commit.clone(),
            key: "acme/web".into(),
            version: StatusVersion {
                build,
                epoch_ms: 1_700_000_000_000 + build as i64,
                rank: 7,
            },
            state: state.as_str().into(),
            payload: StatusRequest {
                method: "POST".into(),
                path: format!("/rest/build-status/1.0/commits/{commit}"),
                body: StatusBody::new(
                    "acme/web".into(),
                    state,
                    format!("https://buildkite.com/acme/web/builds/{build}"),
                    format!("Web #{build}"),
                    String::new(),
                ),
                state,
            },
            source: None,
        }
    }

    /// A poll cycle reports many builds at once, two builds of one commit among them: the
    /// older one's record may be begun before the newer one's, and its turn may come at once
    /// (an unpaced pacer). It must still not be posted once the newer one is recorded.
    #[tokio::test]
    async fn a_backlog_status_superseded_after_it_began_is_not_posted() {
        let store = Store::new(SqliteKv::in_memory().unwrap());
        let sink = Arc::new(Taken::default());
        let reporter = Reporter::new(
            Arc::new(store.clone()),
            sink.clone(),
            Arc::new(Pacer::new(None)),
            64,
        );
        let (older, newer) = (
            record(7, BitbucketState::Failed),
            record(8, BitbucketState::Successful),
        );
        let lease = Duration::from_secs(120);
        assert_eq!(
            store.begin_report(&older, lease).await.unwrap(),
            Begin::Post
        );
        assert_eq!(
            store.begin_report(&newer, lease).await.unwrap(),
            Begin::Post
        );
        // The older one's poster carries on, with no wait for its turn.
        let outcome = reporter.deliver(older, 0, None).await.unwrap();
        assert_eq!(outcome, Outcome::Superseded);
        assert!(sink.0.lock().unwrap().is_empty());
        assert_eq!(
            reporter.deliver(newer, 0, None).await.unwrap(),
            Outcome::Posted
        );
        assert_eq!(sink.0.lock().unwrap().len(), 1);
    }

    #[test]
    fn what_a_failure_tells_the_pacer() {
        assert_eq!(feedback_for(&SendError::Timeout), Feedback::Unavailable);
        let refused = SendError::Status {
            status: 400,
            message: "bad".into(),
            retry_after: None,
        };
        assert_eq!(feedback_for(&refused), Feedback::Refused);
        let limited = SendError::Status {
            status: 429,
            message: String::new(),
            retry_after: Some(Duration::from_secs(5)),
        };
        assert_eq!(
            feedback_for(&limited),
            Feedback::RateLimited(Some(Duration::from_secs(5)))
        );
        let down = SendError::Status {
            status: 503,
            message: String::new(),
            retry_after: None,
        };
        assert_eq!(feedback_for(&down), Feedback::Unavailable);
    }
}
