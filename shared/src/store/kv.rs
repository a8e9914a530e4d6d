//! The backend interface: the least a database must do for [`super::Store`].

use async_trait::async_trait;

use super::StoreError;

/// One stored item. `doc` is the record as JSON; `rev` counts its writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub pk: String,
    pub sk: String,
    pub rev: u64,
    pub doc: String,
    /// Epoch seconds after which the item is gone (DynamoDB TTL semantics).
    pub expires_at: Option<i64>,
}

/// The condition a write needs to hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cond {
    /// Unconditional.
    Always,
    /// The item must not exist (an expired item counts as absent).
    Absent,
    /// The item must exist with this `rev`.
    Rev(u64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    Put { item: Item, cond: Cond },
    Delete { pk: String, sk: String, cond: Cond },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    Ascending,
    Descending,
}

/// What each backend implements. All of `write`'s writes happen, or none do: if any condition
/// fails the result is [`StoreError::Conflict`] and nothing changed. A batch holds at most
/// [`MAX_BATCH`] writes, on distinct items.
#[async_trait]
pub trait Kv: Send + Sync + 'static {
    async fn get(&self, pk: &str, sk: &str) -> Result<Option<Item>, StoreError>;

    async fn write(&self, writes: Vec<Write>) -> Result<(), StoreError>;

    /// Items of partition `pk` whose sort key starts with `sk_prefix`, in sort-key order,
    /// starting strictly after `after` (in that order), at most `limit` of them. Expired items
    /// are left out.
    async fn query(
        &self,
        pk: &str,
        sk_prefix: &str,
        after: Option<&str>,
        limit: usize,
        order: Order,
    ) -> Result<Vec<Item>, StoreError>;

    /// A cheap round trip that proves the store answers (for health checks).
    async fn ping(&self) -> Result<(), StoreError>;

    /// Deletes expired items, returning how many. Reads already ignore them; this only reclaims
    /// space. Nothing to do where the database expires items itself (DynamoDB's TTL).
    async fn purge_expired(&self) -> Result<usize, StoreError> {
        Ok(0)
    }
}

/// Most writes in one batch (DynamoDB's TransactWriteItems limit).
pub const MAX_BATCH: usize = 100;

pub(crate) fn now_epoch() -> i64 {
    chrono::Utc::now().timestamp()
}

pub(crate) fn is_live(item: &Item, now: i64) -> bool {
    item.expires_at.is_none_or(|t| t > now)
}
