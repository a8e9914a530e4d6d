//! The status ledger: what was reported to Bitbucket per (commit, key), and the outbox of what
//! still must be.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::cas::{CAS_ATTEMPTS, Cas, cas_retry, retry_on_conflict};
use super::encoding::{decode, over, put};
use super::keys::{OUTBOX_PK, STATUS_TTL, outbox_sk, status_pk};
use super::kv::{Cond, Order, Write};
use super::{Result, Store, StoreError};
use crate::bitbucket::request::StatusRequest;
use crate::status::{Ordering, StatusVersion, compare};

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

    /// Keeps `entry` (a JSON object; `at` is added) in `ring` for the operator view, under a
    /// time-ordered key that expires after [`Ring::keep_for`]: reading the newest
    /// [`Ring::size`] needs no bookkeeping write, and nothing accumulates past the expiry.
    async fn note_recent(&self, ring: Ring, entry: serde_json::Value) -> Result<()>;

    /// `ring`'s entries, newest first.
    async fn recent(&self, ring: Ring) -> Result<Vec<serde_json::Value>>;
}

/// The bounded records of recent activity the operator view shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ring {
    /// Poll cycles' summaries.
    PollCycles,
    /// Statuses posted to Bitbucket.
    Posted,
    /// Statuses Bitbucket refused.
    Refused,
}

impl Ring {
    pub fn size(self) -> usize {
        match self {
            Ring::PollCycles => 20,
            Ring::Posted | Ring::Refused => 50,
        }
    }

    /// How long an entry is kept: long enough to be among the newest [`Ring::size`] at the
    /// rate entries come (one a poll cycle; posts and refusals are sampled by the reporter).
    pub fn keep_for(self) -> std::time::Duration {
        let hours = match self {
            Ring::PollCycles | Ring::Refused => 24,
            Ring::Posted => 1,
        };
        std::time::Duration::from_secs(hours * 3600)
    }

    fn pk(self) -> &'static str {
        match self {
            Ring::PollCycles => "RECENT#POLL",
            Ring::Posted => "RECENT#POSTED",
            Ring::Refused => "RECENT#REFUSED",
        }
    }
}

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

#[async_trait]
impl StatusLedger for Store {
    async fn note_recent(&self, ring: Ring, mut entry: serde_json::Value) -> Result<()> {
        static KEYS: std::sync::Mutex<ulid::Generator> =
            std::sync::Mutex::new(ulid::Generator::new());
        let now = Utc::now();
        if let Some(map) = entry.as_object_mut() {
            map.insert("at".into(), serde_json::json!(now));
        }
        // Monotonic within the process, so two entries of one millisecond keep their order.
        let key = KEYS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .generate()
            .unwrap_or_else(|_| ulid::Ulid::new());
        self.kv
            .write(vec![put(
                ring.pk().into(),
                key.to_string(),
                1,
                &entry,
                Some(ring.keep_for().as_secs() as i64),
                Cond::Always,
            )?])
            .await
    }

    async fn recent(&self, ring: Ring) -> Result<Vec<serde_json::Value>> {
        Ok(self
            .query_page(ring.pk(), "", None, ring.size(), Order::Descending)
            .await?
            .values()
            .items)
    }

    async fn begin_report(&self, status: &StatusRecord, lease: Duration) -> Result<Begin> {
        let pk = &status_pk(&status.commit);
        cas_retry(CAS_ATTEMPTS, || async move {
            let current = self.get_doc::<StatusDoc>(pk, &status.key).await?;
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
                        return Ok(Cas::Done(Begin::AlreadyReported));
                    }
                    // Wanted already, undelivered, and its poster is still at it.
                    Ordering::Same if doc.leased_until.is_some_and(|until| until > now) => {
                        return Ok(Cas::Done(Begin::InFlight));
                    }
                    // Wanted already but the lease ran out (its poster died or gave up): take over.
                    Ordering::Same => {}
                    Ordering::Older if delivered(status.version) => {
                        return Ok(Cas::Done(Begin::AlreadyReported));
                    }
                    Ordering::Older => return Ok(Cas::Done(Begin::Superseded)),
                    Ordering::Ambiguous => {
                        return Ok(Cas::Done(Begin::Ambiguous { recorded: top }));
                    }
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
                    OUTBOX_PK.into(),
                    outbox_sk(&status.commit, &status.key),
                    1,
                    &pending,
                    None,
                    Cond::Always,
                )?,
            ];
            retry_on_conflict(self.kv.write(writes).await, Begin::Post)
        })
        .await
    }

    async fn delivered(
        &self,
        commit: &str,
        key: &str,
        version: StatusVersion,
    ) -> Result<Option<StatusRecord>> {
        let pk = &status_pk(commit);
        cas_retry(CAS_ATTEMPTS, || async move {
            let Some(current) = self.get_doc::<StatusDoc>(pk, key).await? else {
                // Nothing recorded (expired?): nothing to clear and nothing newer to post.
                return Ok(Cas::Done(None));
            };
            let mut doc = current.value.clone();
            let newer = (doc.desired.version > version).then(|| doc.desired.clone());
            let already = doc.reported.as_ref().is_some_and(|r| r.version >= version);
            if already {
                return Ok(Cas::Done(newer));
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
                    OUTBOX_PK.into(),
                    outbox_sk(commit, key),
                    1,
                    &pending,
                    None,
                    Cond::Always,
                )?);
            } else if newer.is_none() {
                writes.push(Write::Delete {
                    pk: OUTBOX_PK.into(),
                    sk: outbox_sk(commit, key),
                    cond: Cond::Always,
                });
            }
            retry_on_conflict(self.kv.write(writes).await, newer)
        })
        .await
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
        let sk = &outbox_sk(commit, key);
        let pk = &status_pk(commit);
        cas_retry(CAS_ATTEMPTS, || async move {
            let entry = self.get_doc::<PendingStatus>(OUTBOX_PK, sk).await?;
            let mut writes = Vec::new();
            match entry {
                Some(current) if current.value.status.version == version => {
                    let mut pending = current.value;
                    pending.attempts += 1;
                    pending.next_attempt_at = next_attempt_at;
                    pending.last_error = Some(error.chars().take(500).collect());
                    writes.push(put(
                        OUTBOX_PK.into(),
                        sk.clone(),
                        current.rev + 1,
                        &pending,
                        None,
                        Cond::Rev(current.rev),
                    )?);
                }
                // Superseded (the newer entry has its own schedule), or delivered meanwhile by
                // a newer post: nothing to retry, unless this post may still land (below).
                _ if !ambiguous => return Ok(Cas::Done(())),
                _ => {}
            }
            if ambiguous {
                // Whatever is delivered for this (commit, key) before this post can have landed
                // is posted once more after that (see `delivered`); a newer status delivered
                // already goes back in the outbox now, due then.
                let Some(doc) = self.get_doc::<StatusDoc>(pk, key).await? else {
                    return Ok(Cas::Done(()));
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
                        OUTBOX_PK.into(),
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
            retry_on_conflict(self.kv.write(writes).await, ())
        })
.await
    }

    async fn abandon(&self, commit: &str, key: &str, version: StatusVersion) -> Result<()> {
        let sk = outbox_sk(commit, key);
        let Some(current) = self.get_doc::<PendingStatus>(OUTBOX_PK, &sk).await? else {
            return Ok(());
        };
        if current.value.status.version != version {
            return Ok(());
        }
        match self
            .kv
            .write(vec![Write::Delete {
                pk: OUTBOX_PK.into(),
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
            .query(OUTBOX_PK, "", after.as_deref(), PAGE, Order::Ascending)
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
