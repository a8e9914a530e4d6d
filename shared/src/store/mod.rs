//! What kitebridge remembers, behind narrow traits named by what callers need:
//!
//! | trait | used by | what |
//! |---|---|---|
//! | [`CursorStore`] | poller | the poll cursor per organization; compare-and-set, never backwards |
//! | [`StatusLedger`] | poller, webhook | the last status reported per (commit, key), and the statuses still to deliver (the outbox) |
//! | [`FiringStore`] | webhook, poller | one record per (rule, source build), so a rule fires once |
//! | [`IdempotencyStore`] | releases API | first answer per `Idempotency-Key` |
//! | [`ReleaseStore`] | releases API, webhook, poller | release projects, releases, candidates, deployments, environment state, build links |
//! | [`RuleStore`], [`PendingFiringStore`] | releases API, webhook, poller | trigger rules by name; firings decided but not yet delivered |
//!
//! All of them are implemented once, in [`Store`], on top of a tiny key-value interface
//! ([`Kv`]) that each backend provides: single-item reads, prefix queries in key order, and
//! all-or-nothing batches of conditional writes. Keeping the backends that small is what makes
//! them behave the same: the decisions live above them, and one contract suite
//! (`tests/store_contract.rs`) runs every trait against both.
//!
//! # Key design (one table, `PK`/`SK` strings)
//!
//! | item | PK | SK | TTL |
//! |---|---|---|---|
//! | poll cursor | `CURSOR` | `{org}` | none |
//! | reported/desired status | `STATUS#{commit}` | `{key}` | 90 days after last change |
//! | outbox entry (status to deliver) | `OUTBOX` | `{commit}#{key}` | none |
//! | trigger firing | `FIRING#{rule}` | `{source build id}` | 90 days |
//! | trigger rule | `RULE` | `{name}` | none |
//! | pending trigger firing | `RULEFIRING` | `{rule}#{source build id}` | none (removed once fired) |
//! | idempotency record | `IDEMPOTENCY#{scope}` | `{key}` | 24 hours |
//! | release project | `PROJECT#{project}` | `PROJECT` | none |
//! | release | `PROJECT#{project}` | `RELEASE#{version}` | none |
//! | release listing index | `PROJECT#{project}` | `RELEASES#{cut id (ULID: time-ordered)}` | none |
//! | candidate | `PROJECT#{project}` | `CANDIDATE#{version}#{rc number, 6 digits}` | none |
//! | environment state | `PROJECT#{project}` | `ENV#{environment}` | none |
//! | deployment | `PROJECT#{project}` | `DEPLOYMENT#{environment}#{deployment id (ULID)}` | none |
//! | build link | `BUILD#{buildkite build id}` | `LINK` | 180 days |
//!
//! Every item carries `rev` (a number, bumped on each write) and `doc` (the record as JSON);
//! compare-and-set is a conditional write on `rev` (or on the item's absence). Items that expire
//! carry `expires_at` (epoch seconds; the table's TTL attribute); reads ignore expired items, because
//! DynamoDB deletes them lazily.
//!
//! # Files
//!
//! One file per trait (`cursor.rs`, `ledger.rs`, `firings.rs`, `idempotency.rs`, `releases.rs`,
//! `rules.rs`), each with its records and its implementation on [`Store`]; `keys.rs` spells the
//! key layout above and the TTLs, `encoding.rs` turns records into items and back, and `cas.rs`
//! holds the one compare-and-set retry loop ([`cas_retry`]) every read-decide-write uses.

use std::sync::Arc;

use serde::de::DeserializeOwned;

mod cas;
mod cursor;
mod dynamo;
mod encoding;
mod firings;
mod idempotency;
mod insights;
mod keys;
mod kv;
mod ledger;
mod releases;
mod rules;
mod sqlite;

pub use cas::{CAS_ATTEMPTS, Cas, cas_retry, retry_on_conflict};
pub use cursor::CursorStore;
pub use dynamo::DynamoKv;
pub use encoding::{Page, Versioned};
pub use firings::{Firing, FiringClaim, FiringStore};
pub use idempotency::{IdempotencyBegin, IdempotencyStore, StoredResponse};
pub use insights::{InsightLedger, PendingInsight, ReportedInsight};
pub use kv::{Cond, Item, Kv, MAX_BATCH, Order, Write};
pub use ledger::{
    Begin, BuildSource, OutboxStats, PendingStatus, ReportedStatus, Ring, Standing, StatusLedger,
    StatusRecord,
};
pub use releases::{ActiveDeployment, ReleaseStore};
pub use rules::{PendingFiring, PendingFiringStore, RuleStore, StoredRule};
pub use sqlite::SqliteKv;

type Result<T> = std::result::Result<T, StoreError>;

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

    /// The record at (`pk`, `sk`) with the revision it was read at.
    async fn get_doc<T: DeserializeOwned>(
        &self,
        pk: &str,
        sk: &str,
    ) -> Result<Option<Versioned<T>>> {
        match self.kv.get(pk, sk).await? {
            None => Ok(None),
            Some(item) => encoding::decode(&item).map(Some),
        }
    }

    /// One page of `pk`'s records under `prefix`, after the sort key `after`, in `order`, with
    /// their revisions; `next` is the last sort key when the page is full (there may be more).
    async fn query_page<T: DeserializeOwned>(
        &self,
        pk: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
        order: kv::Order,
    ) -> Result<Page<Versioned<T>>> {
        let items = self.kv.query(pk, prefix, after, limit, order).await?;
        let next = (items.len() == limit)
            .then(|| items.last().map(|i| i.sk.clone()))
            .flatten();
        let items = items
            .iter()
            .map(encoding::decode)
            .collect::<Result<Vec<_>>>()?;
        Ok(Page { items, next })
    }
}

/// A store failure, as callers must treat it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The store could not be reached or refused the request for now: retry later, and do not
    /// move any cursor past the work that needed it.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A compare-and-set lost: someone else wrote first.
    #[error("conflict: the record changed since it was read")]
    Conflict,
    /// A record could not be decoded (written by an incompatible version?).
    #[error("corrupt record {pk}/{sk}: {message}")]
    Corrupt {
        pk: String,
        sk: String,
        message: String,
    },
    /// The store's configuration is wrong (missing table, unwritable file).
    #[error("store misconfigured: {0}")]
    Config(String),
}
