//! The typed traits, implemented once for every backend by [`Store`].

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::StoreError;
use super::kv::{Cond, Item, Kv, Order, Write};
use crate::bitbucket::request::StatusRequest;
use crate::release::model::{BuildLink, Candidate, Deployment, EnvironmentState, Project, Release};
use crate::status::{Ordering, StatusVersion, compare};

type Result<T> = std::result::Result<T, StoreError>;

/// A record with the revision it was read at (for compare-and-set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned<T> {
    pub rev: u64,
    pub value: T,
}

/// One page of a listing; `next` is the token for the following page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<String>,
}

/// How many times a read-decide-write loop retries after losing a compare-and-set before it
/// reports the conflict. Each loss means another writer made progress, so this bounds only
/// pathological contention.
pub(super) const CAS_ATTEMPTS: usize = 16;

const DAY: i64 = 86_400;
const STATUS_TTL: i64 = 90 * DAY;
const FIRING_TTL: i64 = 90 * DAY;
const IDEMPOTENCY_TTL: i64 = DAY;
const BUILD_LINK_TTL: i64 = 180 * DAY;

// ---------------------------------------------------------------------------------------------
// Traits

#[async_trait]
pub trait CursorStore: Send + Sync {
    /// The organization's poll cursor, if a cycle ever saved one.
    async fn cursor(&self, org: &str) -> Result<Option<Versioned<DateTime<Utc>>>>;

    /// Moves the cursor from `expected` (as read by [`CursorStore::cursor`]; `None` when unset)
    /// to `to`. `Ok(false)` when someone else moved it since, or when `to` is not later than
    /// the current value: the cursor never moves backwards.
    async fn advance_cursor(
        &self,
        org: &str,
        expected: Option<&Versioned<DateTime<Utc>>>,
        to: DateTime<Utc>,
    ) -> Result<bool>;
}

/// A commit status as kitebridge wants it on Bitbucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusRecord {
    pub commit: String,
    /// The status key (stable per pipeline).
    pub key: String,
    /// Orders the statuses of one (commit, key): see [`crate::status`], "Ordering".
    pub version: StatusVersion,
    /// The Bitbucket state, for logs and inspection.
    pub state: String,
    /// Everything needed to post it again later (target API, path, body).
    pub payload: StatusRequest,
    /// The build it reports, so Buildkite can be asked about it again (absent in records
    /// written before it was kept).
    #[serde(default)]
    pub source: Option<BuildSource>,
}

/// Where a status's build is in Buildkite.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildSource {
    pub organization: String,
    pub pipeline: String,
    pub number: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Begin {
    /// Post it now. It is also in the outbox, leased for a while, so it is delivered even if the
    /// caller dies before [`StatusLedger::delivered`].
    Post,
    /// This version (or a newer one) was already delivered: nothing to post.
    AlreadyReported,
    /// A newer version is wanted already; whoever recorded it delivers it.
    Superseded,
    /// The same version is being posted right now by someone else (its lease has not run out).
    InFlight,
    /// Older than `recorded` by its evidence, but it may be a real re-run of the build
    /// ([`Ordering::Ambiguous`]): nothing was written; ask Buildkite.
    Ambiguous { recorded: StatusVersion },
}

/// Whether a status taken in hand earlier is still the one to post.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    Wanted,
    AlreadyReported,
    Superseded,
    /// Nothing is recorded for the (commit, key) any more (expired).
    Gone,
}

/// A status waiting in the outbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingStatus {
    pub status: StatusRecord,
    pub attempts: u32,
    pub next_attempt_at: DateTime<Utc>,
    #[serde(default)]
    pub last_error: Option<String>,
    /// When this (commit, key) first waited undelivered since it was last delivered; kept when
    /// a newer version replaces an undelivered one, so the age is how long Bitbucket has been
    /// behind. Absent in records written before it was kept.
    #[serde(default)]
    pub queued_at: Option<DateTime<Utc>>,
}

/// The outbox at a glance (for `/healthz` and the operator view).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct OutboxStats {
    /// Statuses waiting to be delivered (in flight included).
    pub depth: u64,
    /// When the status that has waited longest was first queued.
    pub oldest_queued_at: Option<DateTime<Utc>>,
    /// Entries that could not be decoded (logged; they do not stop the rest).
    pub corrupt: u64,
}

/// What was last delivered for one (commit, key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportedStatus {
    pub version: StatusVersion,
    pub state: String,
    pub at: DateTime<Utc>,
}

/// The memory of what was reported to Bitbucket, and the outbox of what still must be.
///
/// The protocol, for one status `s`: [`begin_report`](StatusLedger::begin_report) (write-ahead;
/// may say there is nothing to do) → post → [`delivered`](StatusLedger::delivered), or on failure
/// [`defer`](StatusLedger::defer). After `delivered`, if a newer version was recorded meanwhile,
/// it is returned and must be posted too, because this post may have landed after it.
#[async_trait]
pub trait StatusLedger: Send + Sync {
    async fn begin_report(&self, status: &StatusRecord, lease: Duration) -> Result<Begin>;

    async fn delivered(
        &self,
        commit: &str,
        key: &str,
        version: StatusVersion,
    ) -> Result<Option<StatusRecord>>;

    /// Delivery of `version` failed; try again at `next_attempt_at`. `ambiguous`: the post may
    /// still land (it timed out, or the connection dropped after it was sent) until
    /// `next_attempt_at`: whatever newer status is delivered before then (or was already) is
    /// posted once more at that time, since this one may land on top of it.
    async fn defer(
        &self,
        commit: &str,
        key: &str,
        version: StatusVersion,
        next_attempt_at: DateTime<Utc>,
        error: &str,
        ambiguous: bool,
    ) -> Result<()>;

    /// Gives up on delivering `version` (it can never be delivered): its outbox entry goes.
    async fn abandon(&self, commit: &str, key: &str, version: StatusVersion) -> Result<()>;

    /// Whether `version` is still the status to post for (commit, key).
    async fn standing(&self, commit: &str, key: &str, version: StatusVersion) -> Result<Standing>;

    /// Outbox entries due at `now`, newest builds first, at most `limit`. An entry that cannot
    /// be decoded is logged and left out; it does not stop the rest.
    async fn due(&self, now: DateTime<Utc>, limit: usize) -> Result<Vec<PendingStatus>>;

    async fn outbox_stats(&self) -> Result<OutboxStats>;

    async fn reported(&self, commit: &str, key: &str) -> Result<Option<ReportedStatus>>;
}

/// The record that a trigger rule fired (or is firing) for a source build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Firing {
    /// Someone is triggering now; the claim lapses at `until` if they die.
    Claimed { until: DateTime<Utc> },
    /// Done: the build it created.
    Fired {
        target: serde_json::Value,
        at: DateTime<Utc>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FiringClaim {
    /// The caller may trigger; pass `rev` to [`FiringStore::record_fired`] or
    /// [`FiringStore::release_firing`].
    Won { rev: u64 },
    /// Already fired, or claimed by someone else whose claim has not lapsed.
    Taken(Firing),
}

#[async_trait]
pub trait FiringStore: Send + Sync {
    async fn claim_firing(
        &self,
        rule: &str,
        source_build: &str,
        lease: Duration,
    ) -> Result<FiringClaim>;
    async fn record_fired(
        &self,
        rule: &str,
        source_build: &str,
        rev: u64,
        target: serde_json::Value,
    ) -> Result<()>;
    /// Gives a claim up (the trigger failed before creating anything), so a retry may fire.
    async fn release_firing(&self, rule: &str, source_build: &str, rev: u64) -> Result<()>;
    async fn firing(&self, rule: &str, source_build: &str) -> Result<Option<Firing>>;
}

/// A stored API answer, replayed for a repeated `Idempotency-Key`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredResponse {
    pub status: u16,
    pub body: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdempotencyBegin {
    /// First use of the key: go ahead, then [`IdempotencyStore::idempotency_finish`].
    New { rev: u64 },
    /// The same key is being processed right now.
    InFlight,
    /// Answered before: replay this.
    Replay(StoredResponse),
    /// The key was used with a different request.
    Mismatch,
}

#[async_trait]
pub trait IdempotencyStore: Send + Sync {
    /// `fingerprint` identifies the request (method, path, body hash).
    async fn idempotency_begin(
        &self,
        scope: &str,
        key: &str,
        fingerprint: &str,
        lease: Duration,
    ) -> Result<IdempotencyBegin>;
    async fn idempotency_finish(
        &self,
        scope: &str,
        key: &str,
        rev: u64,
        response: &StoredResponse,
    ) -> Result<()>;
    /// Forgets a key whose request failed before doing anything, so a retry runs again.
    async fn idempotency_abandon(&self, scope: &str, key: &str, rev: u64) -> Result<()>;
}

#[async_trait]
pub trait ReleaseStore: Send + Sync {
    async fn project(&self, name: &str) -> Result<Option<Versioned<Project>>>;
    /// Creates (`expected` None) or updates (`expected` = the rev read) a project; returns the
    /// new rev. [`StoreError::Conflict`] if it changed meanwhile (or exists, when creating).
    async fn put_project(&self, project: &Project, expected: Option<u64>) -> Result<u64>;

    /// Creates a release and its first candidate at once. [`StoreError::Conflict`] if the
    /// version exists in the project.
    async fn create_release(&self, release: &Release, first: &Candidate) -> Result<()>;
    async fn release(&self, project: &str, version: &str) -> Result<Option<Release>>;
    /// Newest first.
    async fn list_releases(
        &self,
        project: &str,
        page: Option<&str>,
        limit: usize,
    ) -> Result<Page<Release>>;

    /// Adds a candidate; [`StoreError::Conflict`] if that number exists.
    async fn add_candidate(&self, candidate: &Candidate) -> Result<()>;
    async fn candidate(
        &self,
        project: &str,
        version: &str,
        number: u32,
    ) -> Result<Option<Versioned<Candidate>>>;
    /// Oldest first.
    async fn candidates(&self, project: &str, version: &str) -> Result<Vec<Versioned<Candidate>>>;
    async fn update_candidate(&self, candidate: &Candidate, rev: u64) -> Result<u64>;

    async fn environment(
        &self,
        project: &str,
        environment: &str,
    ) -> Result<Option<Versioned<EnvironmentState>>>;
    async fn put_environment(&self, state: &EnvironmentState, expected: Option<u64>)
    -> Result<u64>;

    /// Creates a deployment and updates its environment's state in one atomic write.
    async fn create_deployment(
        &self,
        deployment: &Deployment,
        env: &EnvironmentState,
        env_rev: Option<u64>,
    ) -> Result<()>;
    /// Updates a deployment, and optionally its environment's state, in one atomic write.
    async fn update_deployment(
        &self,
        deployment: &Deployment,
        rev: u64,
        env: Option<(&EnvironmentState, Option<u64>)>,
    ) -> Result<u64>;
    async fn deployment(
        &self,
        project: &str,
        environment: &str,
        id: &str,
    ) -> Result<Option<Versioned<Deployment>>>;
    /// Newest first.
    async fn list_deployments(
        &self,
        project: &str,
        environment: &str,
        page: Option<&str>,
        limit: usize,
    ) -> Result<Page<Versioned<Deployment>>>;

    async fn link_build(&self, build_id: &str, link: &BuildLink) -> Result<()>;
    async fn build_link(&self, build_id: &str) -> Result<Option<BuildLink>>;

    /// Every environment with an unfinished deployment, across projects, in key order (for the
    /// stuck-deployment sweep, which cannot otherwise find them without scanning the table).
    /// The store keeps this index itself, in the same atomic write as each environment state
    /// ([`ReleaseStore::put_environment`], [`ReleaseStore::create_deployment`],
    /// [`ReleaseStore::update_deployment`]), so it always agrees with
    /// [`EnvironmentState::active_deployment`].
    async fn active_deployments(
        &self,
        page: Option<&str>,
        limit: usize,
    ) -> Result<Page<ActiveDeployment>>;
}

/// An entry of the active-deployment index: environment `environment` of `project` has the
/// unfinished deployment `id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveDeployment {
    pub project: String,
    pub environment: String,
    pub id: String,
}

// ---------------------------------------------------------------------------------------------
// The one implementation

/// Every store trait, over any [`Kv`] backend. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    kv: Arc<dyn Kv>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

impl Store {
    pub fn new(kv: impl Kv) -> Store {
        Store { kv: Arc::new(kv) }
    }

    pub fn from_arc(kv: Arc<dyn Kv>) -> Store {
        Store { kv }
    }

    pub fn kv(&self) -> &Arc<dyn Kv> {
        &self.kv
    }

    /// Proves the store answers (health checks).
    pub async fn ping(&self) -> Result<()> {
        self.kv.ping().await
    }

    async fn get_doc<T: DeserializeOwned>(
        &self,
        pk: &str,
        sk: &str,
    ) -> Result<Option<Versioned<T>>> {
        match self.kv.get(pk, sk).await? {
            None => Ok(None),
            Some(item) => decode(&item).map(Some),
        }
    }
}

pub(super) fn decode<T: DeserializeOwned>(item: &Item) -> Result<Versioned<T>> {
    let value = serde_json::from_str(&item.doc).map_err(|e| StoreError::Corrupt {
        pk: item.pk.clone(),
        sk: item.sk.clone(),
        message: e.to_string(),
    })?;
    Ok(Versioned {
        rev: item.rev,
        value,
    })
}

pub(super) fn put<T: Serialize>(
    pk: String,
    sk: String,
    rev: u64,
    doc: &T,
    ttl: Option<i64>,
    cond: Cond,
) -> Result<Write> {
    let doc = serde_json::to_string(doc).map_err(|e| StoreError::Corrupt {
        pk: pk.clone(),
        sk: sk.clone(),
        message: format!("cannot encode: {e}"),
    })?;
    Ok(Write::Put {
        item: Item {
            pk,
            sk,
            rev,
            doc,
            expires_at: ttl.map(|t| Utc::now().timestamp() + t),
        },
        cond,
    })
}

/// The condition for writing over what was read: its rev, or absence if nothing was read.
pub(super) fn over(read_rev: Option<u64>) -> (u64, Cond) {
    match read_rev {
        Some(rev) => (rev + 1, Cond::Rev(rev)),
        None => (1, Cond::Absent),
    }
}

// --- cursor ----------------------------------------------------------------------------------

#[derive(Serialize, Deserialize)]
struct CursorDoc {
    at: DateTime<Utc>,
}

#[async_trait]
impl CursorStore for Store {
    async fn cursor(&self, org: &str) -> Result<Option<Versioned<DateTime<Utc>>>> {
        Ok(self
            .get_doc::<CursorDoc>("CURSOR", org)
            .await?
            .map(|v| Versioned {
                rev: v.rev,
                value: v.value.at,
            }))
    }

    async fn advance_cursor(
        &self,
        org: &str,
        expected: Option<&Versioned<DateTime<Utc>>>,
        to: DateTime<Utc>,
    ) -> Result<bool> {
        if expected.is_some_and(|e| to <= e.value) {
            return Ok(false);
        }
        let (rev, cond) = over(expected.map(|e| e.rev));
        match self
            .kv
            .write(vec![put(
                "CURSOR".into(),
                org.into(),
                rev,
                &CursorDoc { at: to },
                None,
                cond,
            )?])
            .await
        {
            Ok(()) => Ok(true),
            Err(StoreError::Conflict) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

// --- status ledger ---------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StatusDoc {
    desired: StatusRecord,
    #[serde(default)]
    reported: Option<ReportedStatus>,
    /// Until when the desired version's poster owns it (concurrent reporters stand back).
    #[serde(default)]
    leased_until: Option<DateTime<Utc>>,
    /// Since when Bitbucket has been behind for this (commit, key) (see
    /// [`PendingStatus::queued_at`]); `None` once delivered.
    #[serde(default)]
    queued_at: Option<DateTime<Utc>>,
    /// A post for this (commit, key) got no answer and may still land until then: whatever is
    /// delivered before that is posted once more after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    unanswered_until: Option<DateTime<Utc>>,
}

fn status_pk(commit: &str) -> String {
    format!("STATUS#{commit}")
}

fn outbox_sk(commit: &str, key: &str) -> String {
    format!("{commit}#{key}")
}

const OUTBOX: &str = "OUTBOX";

#[async_trait]
impl StatusLedger for Store {
    async fn begin_report(&self, status: &StatusRecord, lease: Duration) -> Result<Begin> {
        let pk = status_pk(&status.commit);
        for _ in 0..CAS_ATTEMPTS {
            let current = self.get_doc::<StatusDoc>(&pk, &status.key).await?;
            let now = Utc::now();
            let mut queued_at = now;
            if let Some(c) = &current {
                let doc = &c.value;
                let reported = doc.reported.as_ref().map(|r| r.version);
                let top = reported.map_or(doc.desired.version, |r| r.max(doc.desired.version));
                let delivered = |v: StatusVersion| reported.is_some_and(|r| r >= v);
                match compare(status.version, top) {
                    Ordering::Newer => {}
                    Ordering::Same if delivered(status.version) => {
                        return Ok(Begin::AlreadyReported);
                    }
                    // Wanted already, undelivered, and its poster is still at it.
                    Ordering::Same if doc.leased_until.is_some_and(|until| until > now) => {
                        return Ok(Begin::InFlight);
                    }
                    // Wanted already but the lease ran out (its poster died or gave up): take over.
                    Ordering::Same => {}
                    Ordering::Older if delivered(status.version) => {
                        return Ok(Begin::AlreadyReported);
                    }
                    Ordering::Older => return Ok(Begin::Superseded),
                    Ordering::Ambiguous => return Ok(Begin::Ambiguous { recorded: top }),
                }
                // An undelivered earlier version keeps its place in the queue's age.
                if !delivered(doc.desired.version) {
                    queued_at = doc.queued_at.unwrap_or(now);
                }
            }
            let doc = StatusDoc {
                desired: status.clone(),
                reported: current.as_ref().and_then(|c| c.value.reported.clone()),
                leased_until: Some(now + lease),
                queued_at: Some(queued_at),
                unanswered_until: current
                    .as_ref()
                    .and_then(|c| c.value.unanswered_until)
                    .filter(|until| *until > now),
            };
            let pending = PendingStatus {
                status: status.clone(),
                attempts: 0,
                next_attempt_at: now + lease,
                last_error: None,
                queued_at: Some(queued_at),
            };
            let (rev, cond) = over(current.as_ref().map(|c| c.rev));
            let writes = vec![
                put(
                    pk.clone(),
                    status.key.clone(),
                    rev,
                    &doc,
                    Some(STATUS_TTL),
                    cond,
                )?,
                put(
                    OUTBOX.into(),
                    outbox_sk(&status.commit, &status.key),
                    1,
                    &pending,
                    None,
                    Cond::Always,
                )?,
            ];
            match self.kv.write(writes).await {
                Ok(()) => return Ok(Begin::Post),
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Conflict)
    }

    async fn delivered(
        &self,
        commit: &str,
        key: &str,
        version: StatusVersion,
    ) -> Result<Option<StatusRecord>> {
        let pk = status_pk(commit);
        for _ in 0..CAS_ATTEMPTS {
            let Some(current) = self.get_doc::<StatusDoc>(&pk, key).await? else {
                // Nothing recorded (expired?): nothing to clear and nothing newer to post.
                return Ok(None);
            };
            let mut doc = current.value.clone();
            let newer = (doc.desired.version > version).then(|| doc.desired.clone());
            let already = doc.reported.as_ref().is_some_and(|r| r.version >= version);
            if already {
                return Ok(newer);
            }
            let state = if doc.desired.version == version {
                doc.desired.state.clone()
            } else {
                // Only the desired version's state is kept; an older delivered version is
                // recorded by number so it is not posted again.
                format!("version {version}")
            };
            let now = Utc::now();
            doc.reported = Some(ReportedStatus {
                version,
                state,
                at: now,
            });
            // An earlier post that got no answer may still land on top of this one: post the
            // newest once more after it can have landed.
            let repost = match doc.unanswered_until.take() {
                Some(until) if newer.is_none() && until > now => Some(until),
                Some(until) if until > now => {
                    doc.unanswered_until = Some(until);
                    None
                }
                _ => None,
            };
            if newer.is_none() {
                doc.leased_until = None;
                doc.queued_at = None;
            }
            if let Some(until) = repost {
                doc.reported = None;
                doc.queued_at = Some(now);
                // The outbox posts it then; an observer meanwhile (a poll cycle, a webhook)
                // must not post it before the earlier post can have landed.
                doc.leased_until = Some(until);
                tracing::info!(commit, key, version = %version,
                    "an unanswered earlier post may land after this one: posting it again later");
            }
            let mut writes = vec![put(
                pk.clone(),
                key.to_string(),
                current.rev + 1,
                &doc,
                Some(STATUS_TTL),
                Cond::Rev(current.rev),
            )?];
            if let Some(until) = repost {
                let pending = PendingStatus {
                    status: doc.desired.clone(),
                    attempts: 0,
                    next_attempt_at: until,
                    last_error: Some(
                        "re-post: an earlier post got no answer and may land after this one".into(),
                    ),
                    queued_at: Some(now),
                };
                writes.push(put(
                    OUTBOX.into(),
                    outbox_sk(commit, key),
                    1,
                    &pending,
                    None,
                    Cond::Always,
                )?);
            } else if newer.is_none() {
                writes.push(Write::Delete {
                    pk: OUTBOX.into(),
                    sk: outbox_sk(commit, key),
                    cond: Cond::Always,
                });
            }
            match self.kv.write(writes).await {
                Ok(()) => return Ok(newer),
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Conflict)
    }

    async fn defer(
        &self,
        commit: &str,
        key: &str,
        version: StatusVersion,
        next_attempt_at: DateTime<Utc>,
        error: &str,
        ambiguous: bool,
    ) -> Result<()> {
        let sk = outbox_sk(commit, key);
        let pk = status_pk(commit);
        for _ in 0..CAS_ATTEMPTS {
            let entry = self.get_doc::<PendingStatus>(OUTBOX, &sk).await?;
            let mut writes = Vec::new();
            match entry {
                Some(current) if current.value.status.version == version => {
                    let mut pending = current.value;
                    pending.attempts += 1;
                    pending.next_attempt_at = next_attempt_at;
                    pending.last_error = Some(error.chars().take(500).collect());
                    writes.push(put(
                        OUTBOX.into(),
                        sk.clone(),
                        current.rev + 1,
                        &pending,
                        None,
                        Cond::Rev(current.rev),
                    )?);
                }
                // Superseded (the newer entry has its own schedule), or delivered meanwhile by
                // a newer post: nothing to retry, unless this post may still land (below).
                _ if !ambiguous => return Ok(()),
                _ => {}
            }
            if ambiguous {
                // Whatever is delivered for this (commit, key) before this post can have landed
                // is posted once more after that (see `delivered`); a newer status delivered
                // already goes back in the outbox now, due then.
                let Some(doc) = self.get_doc::<StatusDoc>(&pk, key).await? else {
                    return Ok(());
                };
                let mut value = doc.value.clone();
                let newer_delivered = value.desired.version > version
                    && value
                        .reported
                        .as_ref()
                        .is_some_and(|r| r.version >= value.desired.version);
                if newer_delivered {
                    tracing::info!(commit, key, version = %version, newest = %value.desired.version,
                        "an unanswered post may land after a newer status: posting the newest again");
                    let now = Utc::now();
                    value.reported = None;
                    value.queued_at = Some(now);
                    // Due in the outbox then; nobody posts it sooner (see `delivered`).
                    value.leased_until = Some(next_attempt_at);
                    writes.push(put(
                        OUTBOX.into(),
                        sk.clone(),
                        1,
                        &PendingStatus {
                            status: value.desired.clone(),
                            attempts: 0,
                            next_attempt_at,
                            last_error: Some(format!(
                                "re-post after an unanswered post of {version}"
                            )),
                            queued_at: Some(now),
                        },
                        None,
                        Cond::Always,
                    )?);
                } else {
                    value.unanswered_until = Some(
                        value
                            .unanswered_until
                            .map_or(next_attempt_at, |u| u.max(next_attempt_at)),
                    );
                }
                writes.push(put(
                    pk.clone(),
                    key.to_string(),
                    doc.rev + 1,
                    &value,
                    Some(STATUS_TTL),
                    Cond::Rev(doc.rev),
                )?);
            }
            match self.kv.write(writes).await {
                Ok(()) => return Ok(()),
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Conflict)
    }

    async fn abandon(&self, commit: &str, key: &str, version: StatusVersion) -> Result<()> {
        let sk = outbox_sk(commit, key);
        let Some(current) = self.get_doc::<PendingStatus>(OUTBOX, &sk).await? else {
            return Ok(());
        };
        if current.value.status.version != version {
            return Ok(());
        }
        match self
            .kv
            .write(vec![Write::Delete {
                pk: OUTBOX.into(),
                sk,
                cond: Cond::Rev(current.rev),
            }])
            .await
        {
            // Changed meanwhile (a newer version, a retry): that one stays.
            Ok(()) | Err(StoreError::Conflict) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn standing(&self, commit: &str, key: &str, version: StatusVersion) -> Result<Standing> {
        let Some(doc) = self.get_doc::<StatusDoc>(&status_pk(commit), key).await? else {
            return Ok(Standing::Gone);
        };
        let doc = doc.value;
        if doc.reported.as_ref().is_some_and(|r| r.version >= version) {
            return Ok(Standing::AlreadyReported);
        }
        if doc.desired.version > version {
            return Ok(Standing::Superseded);
        }
        Ok(Standing::Wanted)
    }

    async fn due(&self, now: DateTime<Utc>, limit: usize) -> Result<Vec<PendingStatus>> {
        let mut due = Vec::new();
        for_each_outbox_entry(self, |entry| {
            if let Ok(p) = entry
                && p.next_attempt_at <= now
            {
                due.push(p);
            }
        })
        .await?;
        // Newest builds first: an old backlog waits behind what people are looking at now.
        due.sort_by_key(|p| {
            (
                std::cmp::Reverse(p.status.version.epoch_ms),
                p.next_attempt_at,
            )
        });
        due.truncate(limit);
        Ok(due)
    }

    async fn outbox_stats(&self) -> Result<OutboxStats> {
        let mut stats = OutboxStats::default();
        for_each_outbox_entry(self, |entry| match entry {
            Ok(p) => {
                stats.depth += 1;
                let since = p.queued_at.unwrap_or(p.next_attempt_at);
                stats.oldest_queued_at =
                    Some(stats.oldest_queued_at.map_or(since, |o| o.min(since)));
            }
            Err(()) => stats.corrupt += 1,
        })
        .await?;
        Ok(stats)
    }

    async fn reported(&self, commit: &str, key: &str) -> Result<Option<ReportedStatus>> {
        Ok(self
            .get_doc::<StatusDoc>(&status_pk(commit), key)
            .await?
            .and_then(|d| d.value.reported))
    }
}

/// Every outbox entry in key order, decoded; one that cannot be decoded is logged and handed
/// over as `Err(())`.
async fn for_each_outbox_entry(
    store: &Store,
    mut each: impl FnMut(std::result::Result<PendingStatus, ()>) + Send,
) -> Result<()> {
    const PAGE: usize = 500;
    let mut after: Option<String> = None;
    loop {
        let page = store
            .kv
            .query(OUTBOX, "", after.as_deref(), PAGE, Order::Ascending)
            .await?;
        let last = page.last().map(|i| i.sk.clone());
        for item in &page {
            match decode::<PendingStatus>(item) {
                Ok(p) => each(Ok(p.value)),
                Err(e) => {
                    tracing::error!(error = %e, "outbox entry cannot be read; skipped");
                    each(Err(()));
                }
            }
        }
        match last {
            Some(sk) if page.len() == PAGE => after = Some(sk),
            _ => return Ok(()),
        }
    }
}

// --- trigger firings -------------------------------------------------------------------------

fn firing_pk(rule: &str) -> String {
    format!("FIRING#{rule}")
}

#[async_trait]
impl FiringStore for Store {
    async fn claim_firing(
        &self,
        rule: &str,
        source_build: &str,
        lease: Duration,
    ) -> Result<FiringClaim> {
        let pk = firing_pk(rule);
        for _ in 0..CAS_ATTEMPTS {
            let current = self.get_doc::<Firing>(&pk, source_build).await?;
            if let Some(c) = &current {
                match &c.value {
                    Firing::Fired { .. } => return Ok(FiringClaim::Taken(c.value.clone())),
                    Firing::Claimed { until } if *until > Utc::now() => {
                        return Ok(FiringClaim::Taken(c.value.clone()));
                    }
                    Firing::Claimed { .. } => {} // lapsed: its owner died; take over
                }
            }
            let (rev, cond) = over(current.map(|c| c.rev));
            let claim = Firing::Claimed {
                until: Utc::now() + lease,
            };
            match self
                .kv
                .write(vec![put(
                    pk.clone(),
                    source_build.into(),
                    rev,
                    &claim,
                    Some(FIRING_TTL),
                    cond,
                )?])
                .await
            {
                Ok(()) => return Ok(FiringClaim::Won { rev }),
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Conflict)
    }

    async fn record_fired(
        &self,
        rule: &str,
        source_build: &str,
        rev: u64,
        target: serde_json::Value,
    ) -> Result<()> {
        let fired = Firing::Fired {
            target,
            at: Utc::now(),
        };
        self.kv
            .write(vec![put(
                firing_pk(rule),
                source_build.into(),
                rev + 1,
                &fired,
                Some(FIRING_TTL),
                Cond::Rev(rev),
            )?])
            .await
    }

    async fn release_firing(&self, rule: &str, source_build: &str, rev: u64) -> Result<()> {
        self.kv
            .write(vec![Write::Delete {
                pk: firing_pk(rule),
                sk: source_build.into(),
                cond: Cond::Rev(rev),
            }])
            .await
    }

    async fn firing(&self, rule: &str, source_build: &str) -> Result<Option<Firing>> {
        Ok(self
            .get_doc(&firing_pk(rule), source_build)
            .await?
            .map(|v| v.value))
    }
}

// --- idempotency -----------------------------------------------------------------------------

#[derive(Serialize, Deserialize)]
struct IdempotencyDoc {
    fingerprint: String,
    #[serde(default)]
    response: Option<StoredResponse>,
    until: DateTime<Utc>,
}

fn idempotency_pk(scope: &str) -> String {
    format!("IDEMPOTENCY#{scope}")
}

#[async_trait]
impl IdempotencyStore for Store {
    async fn idempotency_begin(
        &self,
        scope: &str,
        key: &str,
        fingerprint: &str,
        lease: Duration,
    ) -> Result<IdempotencyBegin> {
        let pk = idempotency_pk(scope);
        for _ in 0..CAS_ATTEMPTS {
            let current = self.get_doc::<IdempotencyDoc>(&pk, key).await?;
            if let Some(c) = &current {
                if c.value.fingerprint != fingerprint {
                    return Ok(IdempotencyBegin::Mismatch);
                }
                if let Some(r) = &c.value.response {
                    return Ok(IdempotencyBegin::Replay(r.clone()));
                }
                if c.value.until > Utc::now() {
                    return Ok(IdempotencyBegin::InFlight);
                }
            }
            let (rev, cond) = over(current.map(|c| c.rev));
            let doc = IdempotencyDoc {
                fingerprint: fingerprint.into(),
                response: None,
                until: Utc::now() + lease,
            };
            match self
                .kv
                .write(vec![put(
                    pk.clone(),
                    key.into(),
                    rev,
                    &doc,
                    Some(IDEMPOTENCY_TTL),
                    cond,
                )?])
                .await
            {
                Ok(()) => return Ok(IdempotencyBegin::New { rev }),
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Conflict)
    }

    async fn idempotency_finish(
        &self,
        scope: &str,
        key: &str,
        rev: u64,
        response: &StoredResponse,
    ) -> Result<()> {
        let pk = idempotency_pk(scope);
        let Some(current) = self.get_doc::<IdempotencyDoc>(&pk, key).await? else {
            return Err(StoreError::Conflict);
        };
        if current.rev != rev {
            return Err(StoreError::Conflict);
        }
        let doc = IdempotencyDoc {
            response: Some(response.clone()),
            ..current.value
        };
        self.kv
            .write(vec![put(
                pk,
                key.into(),
                rev + 1,
                &doc,
                Some(IDEMPOTENCY_TTL),
                Cond::Rev(rev),
            )?])
            .await
    }

    async fn idempotency_abandon(&self, scope: &str, key: &str, rev: u64) -> Result<()> {
        self.kv
            .write(vec![Write::Delete {
                pk: idempotency_pk(scope),
                sk: key.into(),
                cond: Cond::Rev(rev),
            }])
            .await
    }
}

// --- releases --------------------------------------------------------------------------------

fn project_pk(project: &str) -> String {
    format!("PROJECT#{project}")
}

fn release_sk(version: &str) -> String {
    format!("RELEASE#{version}")
}

fn release_index_sk(cut_id: &str) -> String {
    format!("RELEASES#{cut_id}")
}

fn candidates_prefix(version: &str) -> String {
    format!("CANDIDATE#{version}#")
}

fn candidate_sk(version: &str, number: u32) -> String {
    format!("CANDIDATE#{version}#{number:06}")
}

fn env_sk(environment: &str) -> String {
    format!("ENV#{environment}")
}

fn deployments_prefix(environment: &str) -> String {
    format!("DEPLOYMENT#{environment}#")
}

fn deployment_sk(environment: &str, id: &str) -> String {
    format!("DEPLOYMENT#{environment}#{id}")
}

/// The active-deployment index: `ACTIVE_DEPLOYMENTS` / `{project}#{environment}`, present exactly
/// while the environment state names an active deployment. Written in the same batch as the
/// environment state, so the two never disagree.
const ACTIVE_PK: &str = "ACTIVE_DEPLOYMENTS";

fn active_index_write(state: &EnvironmentState) -> Result<Write> {
    let sk = format!("{}#{}", state.project, state.environment);
    match &state.active_deployment {
        Some(id) => put(
            ACTIVE_PK.into(),
            sk,
            1,
            &ActiveDeployment {
                project: state.project.clone(),
                environment: state.environment.clone(),
                id: id.clone(),
            },
            None,
            Cond::Always,
        ),
        None => Ok(Write::Delete {
            pk: ACTIVE_PK.into(),
            sk,
            cond: Cond::Always,
        }),
    }
}

fn page_of<T>(items: Vec<Versioned<T>>, sks: Vec<String>, limit: usize) -> Page<Versioned<T>> {
    let next = if items.len() == limit {
        sks.last().cloned()
    } else {
        None
    };
    Page { items, next }
}

#[async_trait]
impl ReleaseStore for Store {
    async fn project(&self, name: &str) -> Result<Option<Versioned<Project>>> {
        self.get_doc(&project_pk(name), "PROJECT").await
    }

    async fn put_project(&self, project: &Project, expected: Option<u64>) -> Result<u64> {
        let (rev, cond) = over(expected);
        self.kv
            .write(vec![put(
                project_pk(&project.name),
                "PROJECT".into(),
                rev,
                project,
                None,
                cond,
            )?])
            .await?;
        Ok(rev)
    }

    async fn create_release(&self, release: &Release, first: &Candidate) -> Result<()> {
        let pk = project_pk(&release.project);
        self.kv
            .write(vec![
                put(
                    pk.clone(),
                    release_sk(&release.version),
                    1,
                    release,
                    None,
                    Cond::Absent,
                )?,
                put(
                    pk.clone(),
                    release_index_sk(&release.cut_id),
                    1,
                    release,
                    None,
                    Cond::Absent,
                )?,
                put(
                    pk,
                    candidate_sk(&first.release_version, first.number),
                    1,
                    first,
                    None,
                    Cond::Absent,
                )?,
            ])
            .await
    }

    async fn release(&self, project: &str, version: &str) -> Result<Option<Release>> {
        Ok(self
            .get_doc(&project_pk(project), &release_sk(version))
            .await?
            .map(|v| v.value))
    }

    async fn list_releases(
        &self,
        project: &str,
        page: Option<&str>,
        limit: usize,
    ) -> Result<Page<Release>> {
        let items = self
            .kv
            .query(
                &project_pk(project),
                "RELEASES#",
                page,
                limit,
                Order::Descending,
            )
            .await?;
        let sks = items.iter().map(|i| i.sk.clone()).collect();
        let decoded = items
            .iter()
            .map(decode::<Release>)
            .collect::<Result<Vec<_>>>()?;
        let p = page_of(decoded, sks, limit);
        Ok(Page {
            items: p.items.into_iter().map(|v| v.value).collect(),
            next: p.next,
        })
    }

    async fn add_candidate(&self, candidate: &Candidate) -> Result<()> {
        self.kv
            .write(vec![put(
                project_pk(&candidate.project),
                candidate_sk(&candidate.release_version, candidate.number),
                1,
                candidate,
                None,
                Cond::Absent,
            )?])
            .await
    }

    async fn candidate(
        &self,
        project: &str,
        version: &str,
        number: u32,
    ) -> Result<Option<Versioned<Candidate>>> {
        self.get_doc(&project_pk(project), &candidate_sk(version, number))
            .await
    }

    async fn candidates(&self, project: &str, version: &str) -> Result<Vec<Versioned<Candidate>>> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let items = self
                .kv
                .query(
                    &project_pk(project),
                    &candidates_prefix(version),
                    after.as_deref(),
                    100,
                    Order::Ascending,
                )
                .await?;
            for item in &items {
                out.push(decode(item)?);
            }
            match items.last() {
                Some(last) if items.len() == 100 => after = Some(last.sk.clone()),
                _ => break,
            }
        }
        Ok(out)
    }

    async fn update_candidate(&self, candidate: &Candidate, rev: u64) -> Result<u64> {
        self.kv
            .write(vec![put(
                project_pk(&candidate.project),
                candidate_sk(&candidate.release_version, candidate.number),
                rev + 1,
                candidate,
                None,
                Cond::Rev(rev),
            )?])
            .await?;
        Ok(rev + 1)
    }

    async fn environment(
        &self,
        project: &str,
        environment: &str,
    ) -> Result<Option<Versioned<EnvironmentState>>> {
        self.get_doc(&project_pk(project), &env_sk(environment))
            .await
    }

    async fn put_environment(
        &self,
        state: &EnvironmentState,
        expected: Option<u64>,
    ) -> Result<u64> {
        let (rev, cond) = over(expected);
        self.kv
            .write(vec![
                put(
                    project_pk(&state.project),
                    env_sk(&state.environment),
                    rev,
                    state,
                    None,
                    cond,
                )?,
                active_index_write(state)?,
            ])
            .await?;
        Ok(rev)
    }

    async fn create_deployment(
        &self,
        deployment: &Deployment,
        env: &EnvironmentState,
        env_rev: Option<u64>,
    ) -> Result<()> {
        let pk = project_pk(&deployment.project);
        let (rev, cond) = over(env_rev);
        self.kv
            .write(vec![
                put(
                    pk.clone(),
                    deployment_sk(&deployment.environment, &deployment.id),
                    1,
                    deployment,
                    None,
                    Cond::Absent,
                )?,
                put(pk, env_sk(&env.environment), rev, env, None, cond)?,
                active_index_write(env)?,
            ])
            .await
    }

    async fn update_deployment(
        &self,
        deployment: &Deployment,
        rev: u64,
        env: Option<(&EnvironmentState, Option<u64>)>,
    ) -> Result<u64> {
        let pk = project_pk(&deployment.project);
        let mut writes = vec![put(
            pk.clone(),
            deployment_sk(&deployment.environment, &deployment.id),
            rev + 1,
            deployment,
            None,
            Cond::Rev(rev),
        )?];
        if let Some((state, env_rev)) = env {
            let (erev, cond) = over(env_rev);
            writes.push(put(
                pk,
                env_sk(&state.environment),
                erev,
                state,
                None,
                cond,
            )?);
            writes.push(active_index_write(state)?);
        }
        self.kv.write(writes).await?;
        Ok(rev + 1)
    }

    async fn deployment(
        &self,
        project: &str,
        environment: &str,
        id: &str,
    ) -> Result<Option<Versioned<Deployment>>> {
        self.get_doc(&project_pk(project), &deployment_sk(environment, id))
            .await
    }

    async fn list_deployments(
        &self,
        project: &str,
        environment: &str,
        page: Option<&str>,
        limit: usize,
    ) -> Result<Page<Versioned<Deployment>>> {
        let items = self
            .kv
            .query(
                &project_pk(project),
                &deployments_prefix(environment),
                page,
                limit,
                Order::Descending,
            )
            .await?;
        let sks = items.iter().map(|i| i.sk.clone()).collect();
        let decoded = items
            .iter()
            .map(decode::<Deployment>)
            .collect::<Result<Vec<_>>>()?;
        Ok(page_of(decoded, sks, limit))
    }

    async fn link_build(&self, build_id: &str, link: &BuildLink) -> Result<()> {
        self.kv
            .write(vec![put(
                format!("BUILD#{build_id}"),
                "LINK".into(),
                1,
                link,
                Some(BUILD_LINK_TTL),
                Cond::Always,
            )?])
            .await
    }

    async fn build_link(&self, build_id: &str) -> Result<Option<BuildLink>> {
        Ok(self
            .get_doc(&format!("BUILD#{build_id}"), "LINK")
            .await?
            .map(|v| v.value))
    }

    async fn active_deployments(
        &self,
        page: Option<&str>,
        limit: usize,
    ) -> Result<Page<ActiveDeployment>> {
        let items = self
            .kv
            .query(ACTIVE_PK, "", page, limit, Order::Ascending)
            .await?;
        let sks = items.iter().map(|i| i.sk.clone()).collect();
        let decoded = items
            .iter()
            .map(decode::<ActiveDeployment>)
            .collect::<Result<Vec<_>>>()?;
        let p = page_of(decoded, sks, limit);
        Ok(Page {
            items: p.items.into_iter().map(|v| v.value).collect(),
            next: p.next,
        })
    }
}
