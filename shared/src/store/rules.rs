//! Trigger rules kept in the store (`PUT /rules/{name}`), and the firings still to deliver.
//!
//! A rule is stored as its document (the JSON a user sent), so a newer kitebridge validates it
//! again when it loads it. A pending firing is written before kitebridge asks Buildkite for the
//! target build and removed once the build is recorded with [`super::FiringStore::record_fired`]:
//! it carries the whole request, so a firing whose attempt failed (Buildkite down, the process
//! killed) is retried later from the store alone, and never lost.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::buildkite::client::CreateBuild;

use super::cas::{CAS_ATTEMPTS, Cas, cas_retry, retry_on_conflict};
use super::encoding::{decode, over, put};
use super::keys::{PENDING_FIRING_PK as PENDING_PK, RULE_PK, pending_firing_sk as pending_sk};
use super::kv::{Cond, Order, Write};
use super::{Result, Store, StoreError};

/// Most rules or pending firings read in one listing (a partition page).
const PAGE: usize = 1000;

/// A stored rule: its name and its document as given (`{"rule": ..., "value": ...}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredRule {
    pub name: String,
    pub document: serde_json::Value,
    pub updated_at: DateTime<Utc>,
}

/// Rule documents by name.
#[async_trait]
pub trait RuleStore: Send + Sync {
    /// Creates or replaces a rule; `true` when it did not exist.
    async fn put_rule(&self, rule: &StoredRule) -> Result<bool>;
    async fn rule(&self, name: &str) -> Result<Option<StoredRule>>;
    /// Every stored rule, by name.
    async fn rules(&self) -> Result<Vec<StoredRule>>;
    /// `true` when there was a rule to delete.
    async fn delete_rule(&self, name: &str) -> Result<bool>;
}

/// A firing decided but not yet recorded as fired: everything needed to create the target build.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingFiring {
    pub rule: String,
    /// Buildkite id of the source build.
    pub source_build: String,
    /// `org/pipeline#number` of the source build, for people.
    pub source: String,
    pub target_organization: String,
    pub target_pipeline: String,
    /// The build to create. Stored as the JSON Buildkite receives (records written when this
    /// was kept as an untyped JSON value have the same shape and read back the same).
    pub request: CreateBuild,
    pub created_at: DateTime<Utc>,
    /// Set before the first request that may have reached Buildkite: from then on, a retry first
    /// looks for a build created since then carrying this firing's meta-data.
    pub attempted_at: Option<DateTime<Utc>>,
    pub attempts: u32,
    pub next_attempt_at: DateTime<Utc>,
    pub last_error: Option<String>,
}

/// Firings still to deliver, one per (rule, source build).
#[async_trait]
pub trait PendingFiringStore: Send + Sync {
    /// Adds a pending firing unless one exists for the same (rule, source build); `true` if added.
    async fn add_pending(&self, firing: &PendingFiring) -> Result<bool>;
    async fn pending(&self, rule: &str, source_build: &str) -> Result<Option<PendingFiring>>;
    /// Notes that a request is about to go out (keeps the first time). `None` if gone.
    async fn mark_attempted(
        &self,
        rule: &str,
        source_build: &str,
        at: DateTime<Utc>,
    ) -> Result<Option<PendingFiring>>;
    /// Records a failed attempt: one more attempt, the error, and when to try next.
    async fn defer_pending(
        &self,
        rule: &str,
        source_build: &str,
        error: &str,
        next_attempt_at: DateTime<Utc>,
    ) -> Result<()>;
    async fn remove_pending(&self, rule: &str, source_build: &str) -> Result<()>;
    /// Pending firings due at `now`, oldest due first, at most `limit`.
    async fn due_pending(&self, now: DateTime<Utc>, limit: usize) -> Result<Vec<PendingFiring>>;
}

#[async_trait]
impl RuleStore for Store {
    async fn put_rule(&self, rule: &StoredRule) -> Result<bool> {
        cas_retry(CAS_ATTEMPTS, || async move {
            let current = self.kv().get(RULE_PK, &rule.name).await?;
            let existed = current.is_some();
            let (rev, cond) = over(current.map(|c| c.rev));
            let write = put(RULE_PK.into(), rule.name.clone(), rev, rule, None, cond)?;
            retry_on_conflict(self.kv().write(vec![write]).await, !existed)
        })
        .await
    }

    async fn rule(&self, name: &str) -> Result<Option<StoredRule>> {
        match self.kv().get(RULE_PK, name).await? {
            None => Ok(None),
            Some(item) => Ok(Some(decode::<StoredRule>(&item)?.value)),
        }
    }

    async fn rules(&self) -> Result<Vec<StoredRule>> {
        whole_partition(self, RULE_PK).await
    }

    async fn delete_rule(&self, name: &str) -> Result<bool> {
        cas_retry(CAS_ATTEMPTS, || async move {
            let Some(current) = self.kv().get(RULE_PK, name).await? else {
                return Ok(Cas::Done(false));
            };
            let delete = Write::Delete {
                pk: RULE_PK.into(),
                sk: name.into(),
                cond: Cond::Rev(current.rev),
            };
            retry_on_conflict(self.kv().write(vec![delete]).await, true)
        })
        .await
    }
}

impl Store {
    /// Read-modify-write of a pending firing under compare-and-set; `None` if it is gone.
    async fn update_pending(
        &self,
        rule: &str,
        source_build: &str,
        change: impl Fn(&mut PendingFiring) + Send + Sync,
    ) -> Result<Option<PendingFiring>> {
        let sk = &pending_sk(rule, source_build);
        let change = &change;
        cas_retry(CAS_ATTEMPTS, || async move {
            let Some(item) = self.kv().get(PENDING_PK, sk).await? else {
                return Ok(Cas::Done(None));
            };
            let mut current = decode::<PendingFiring>(&item)?;
            change(&mut current.value);
            let (rev, cond) = over(Some(current.rev));
            let write = put(
                PENDING_PK.into(),
                sk.clone(),
                rev,
                &current.value,
                None,
                cond,
            )?;
            retry_on_conflict(self.kv().write(vec![write]).await, Some(current.value))
        })
        .await
    }
}

#[async_trait]
impl PendingFiringStore for Store {
    async fn add_pending(&self, firing: &PendingFiring) -> Result<bool> {
        let sk = pending_sk(&firing.rule, &firing.source_build);
        let (rev, cond) = over(None);
        let write = put(PENDING_PK.into(), sk, rev, firing, None, cond)?;
        match self.kv().write(vec![write]).await {
            Ok(()) => Ok(true),
            Err(StoreError::Conflict) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn pending(&self, rule: &str, source_build: &str) -> Result<Option<PendingFiring>> {
        match self
            .kv()
            .get(PENDING_PK, &pending_sk(rule, source_build))
            .await?
        {
            None => Ok(None),
            Some(item) => Ok(Some(decode::<PendingFiring>(&item)?.value)),
        }
    }

    async fn mark_attempted(
        &self,
        rule: &str,
        source_build: &str,
        at: DateTime<Utc>,
    ) -> Result<Option<PendingFiring>> {
        self.update_pending(rule, source_build, |p| {
            p.attempted_at.get_or_insert(at);
        })
        .await
    }

    async fn defer_pending(
        &self,
        rule: &str,
        source_build: &str,
        error: &str,
        next_attempt_at: DateTime<Utc>,
    ) -> Result<()> {
        self.update_pending(rule, source_build, |p| {
            p.attempts = p.attempts.saturating_add(1);
            p.last_error = Some(error.to_owned());
            p.next_attempt_at = next_attempt_at;
        })
        .await
        .map(|_| ())
    }

    async fn remove_pending(&self, rule: &str, source_build: &str) -> Result<()> {
        self.kv()
            .write(vec![Write::Delete {
                pk: PENDING_PK.into(),
                sk: pending_sk(rule, source_build),
                cond: Cond::Always,
            }])
            .await
    }

    async fn due_pending(&self, now: DateTime<Utc>, limit: usize) -> Result<Vec<PendingFiring>> {
        // The partition holds only firings not yet delivered: a handful unless Buildkite has been
        // down for long, so reading it whole is cheap.
        let mut due: Vec<PendingFiring> = whole_partition(self, PENDING_PK).await?;
        due.retain(|p| p.next_attempt_at <= now);
        due.sort_by_key(|p| p.next_attempt_at);
        due.truncate(limit);
        Ok(due)
    }
}

/// Every record of a small partition, decoded, in key order, a page at a time.
async fn whole_partition<T: serde::de::DeserializeOwned>(
    store: &Store,
    pk: &str,
) -> Result<Vec<T>> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let items = store
            .kv()
            .query(pk, "", after.as_deref(), PAGE, Order::Ascending)
            .await?;
        for item in &items {
            out.push(decode::<T>(item)?.value);
        }
        if items.len() < PAGE {
            return Ok(out);
        }
        after = items.last().map(|i| i.sk.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Item;

    #[test]
    fn a_pending_firing_written_with_an_untyped_request_reads_back() {
        // As written when `request` was kept as a JSON value (a serialized TriggerBuild).
        let doc = r#"{"rule":"deploy","source_build":"b1","source":"acme/web#1",
            "target_organization":"acme","target_pipeline":"deploy",
            "request":{"commit":"abc","branch":"main","message":"Deploy",
                "env":{"X":"1"},"meta_data":{"kitebridge:rule":"deploy"}},
            "created_at":"2026-03-01T12:00:00Z","attempted_at":null,"attempts":0,
            "next_attempt_at":"2026-03-01T12:00:00Z","last_error":null}"#;
        let item = Item {
            pk: PENDING_PK.into(),
            sk: pending_sk("deploy", "b1"),
            rev: 1,
            doc: doc.into(),
            expires_at: None,
        };
        let firing = decode::<PendingFiring>(&item).unwrap().value;
        assert_eq!(firing.request.commit, "abc");
        assert_eq!(firing.request.env.get("X").map(String::as_str), Some("1"));
        assert_eq!(
            firing
                .request
                .meta_data
                .get("kitebridge:rule")
                .map(String::as_str),
            Some("deploy")
        );
        // And it is written back in the same shape.
        let again: serde_json::Value = serde_json::to_value(&firing).unwrap();
        let before: serde_json::Value = serde_json::from_str(doc).unwrap();
        assert_eq!(again, before);
    }
}
