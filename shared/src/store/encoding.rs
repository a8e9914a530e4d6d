//! How records become items and back: JSON documents with a revision, written under a condition.

use chrono::Utc;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::kv::{Cond, Item, Write};
use super::{Result, StoreError};

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

impl<T> Page<Versioned<T>> {
    /// The same page without the revisions.
    pub(super) fn values(self) -> Page<T> {
        Page {
            items: self.items.into_iter().map(|v| v.value).collect(),
            next: self.next,
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
