//! The first answer per `Idempotency-Key`, and the leases the releases service takes on it.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::cas::{CAS_ATTEMPTS, Cas, cas_retry, retry_on_conflict};
use super::encoding::{over, put};
use super::keys::{IDEMPOTENCY_TTL, idempotency_pk};
use super::kv::{Cond, Write};
use super::{Result, Store, StoreError};

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

#[derive(Serialize, Deserialize)]
struct IdempotencyDoc {
    fingerprint: String,
    #[serde(default)]
    response: Option<StoredResponse>,
    until: DateTime<Utc>,
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
        let pk = &idempotency_pk(scope);
        cas_retry(CAS_ATTEMPTS, || async move {
            let current = self.get_doc::<IdempotencyDoc>(pk, key).await?;
            if let Some(c) = &current {
                if c.value.fingerprint != fingerprint {
                    return Ok(Cas::Done(IdempotencyBegin::Mismatch));
                }
                if let Some(r) = &c.value.response {
                    return Ok(Cas::Done(IdempotencyBegin::Replay(r.clone())));
                }
                if c.value.until > Utc::now() {
                    return Ok(Cas::Done(IdempotencyBegin::InFlight));
                }
            }
            let (rev, cond) = over(current.map(|c| c.rev));
            let doc = IdempotencyDoc {
                fingerprint: fingerprint.into(),
                response: None,
                until: Utc::now() + lease,
            };
            retry_on_conflict(
                self.kv
                    .write(vec![put(
                        pk.clone(),
                        key.into(),
                        rev,
                        &doc,
                        Some(IDEMPOTENCY_TTL),
                        cond,
                    )?])
                    .await,
                IdempotencyBegin::New { rev },
            )
        })
        .await
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
