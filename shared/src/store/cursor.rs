//! The poll cursor per organization: compare-and-set, never backwards.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::encoding::{Versioned, over, put};
use super::keys::CURSOR_PK;
use super::{Result, Store, StoreError};

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

#[derive(Serialize, Deserialize)]
struct CursorDoc {
    at: DateTime<Utc>,
}

#[async_trait]
impl CursorStore for Store {
    async fn cursor(&self, org: &str) -> Result<Option<Versioned<DateTime<Utc>>>> {
        Ok(self
            .get_doc::<CursorDoc>(CURSOR_PK, org)
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
                CURSOR_PK.into(),
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
