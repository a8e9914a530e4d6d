//! One record per (rule, source build), so a trigger rule fires once.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::cas::{CAS_ATTEMPTS, Cas, cas_retry, retry_on_conflict};
use super::encoding::{over, put};
use super::keys::{FIRING_TTL, firing_pk};
use super::kv::{Cond, Write};
use super::{Result, Store};

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

#[async_trait]
impl FiringStore for Store {
    async fn claim_firing(
        &self,
        rule: &str,
        source_build: &str,
        lease: Duration,
    ) -> Result<FiringClaim> {
        let pk = &firing_pk(rule);
        cas_retry(CAS_ATTEMPTS, || async move {
            let current = self.get_doc::<Firing>(pk, source_build).await?;
            if let Some(c) = &current {
                match &c.value {
                    Firing::Fired { .. } => {
                        return Ok(Cas::Done(FiringClaim::Taken(c.value.clone())));
                    }
                    Firing::Claimed { until } if *until > Utc::now() => {
                        return Ok(Cas::Done(FiringClaim::Taken(c.value.clone())));
                    }
                    Firing::Claimed { .. } => {} // lapsed: its owner died; take over
                }
            }
            let (rev, cond) = over(current.map(|c| c.rev));
            let claim = Firing::Claimed {
                until: Utc::now() + lease,
            };
            retry_on_conflict(
                self.kv
                    .write(vec![put(
                        pk.clone(),
                        source_build.into(),
                        rev,
                        &claim,
                        Some(FIRING_TTL),
                        cond,
                    )?])
                    .await,
                FiringClaim::Won { rev },
            )
        })
        .await
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
