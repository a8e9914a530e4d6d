//! Code Insights reports: what was last reported per (commit, report key), so the many sightings
//! of one finished build report it once, and the reports whose PUT failed and wait for a retry.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::encoding::{decode, over, put};
use super::kv::{Cond, Order, Write};
use super::{Result, Store};

const INSIGHT_PK_PREFIX: &str = "INSIGHT#";
const PENDING_PK: &str = "INSIGHTS_PENDING";
/// Kept 90 days: a commit's report is not replaced by a build that old.
const INSIGHT_TTL: i64 = 90 * 24 * 3600;

/// The report last put for a (commit, key): by which build, in which state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportedInsight {
    pub build_number: u64,
    pub state: String,
    pub at: DateTime<Utc>,
}

/// A report whose PUT failed in a way a later attempt may fix (Bitbucket down, 5xx, 429).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingInsight {
    pub organization: String,
    pub pipeline: String,
    pub build_number: u64,
    pub commit: String,
    pub key: String,
    pub attempts: u32,
    pub since: DateTime<Utc>,
}

#[async_trait]
pub trait InsightLedger: Send + Sync {
    async fn reported_insight(&self, commit: &str, key: &str) -> Result<Option<ReportedInsight>>;
    /// Records a report put (and clears its pending retry, if any).
    async fn record_insight(&self, commit: &str, key: &str, r: &ReportedInsight) -> Result<()>;
    async fn add_pending_insight(&self, p: &PendingInsight) -> Result<()>;
    async fn pending_insights(&self, limit: usize) -> Result<Vec<PendingInsight>>;
    async fn drop_pending_insight(&self, commit: &str, key: &str) -> Result<()>;
}

fn pending_sk(commit: &str, key: &str) -> String {
    format!("{commit}#{key}")
}

#[async_trait]
impl InsightLedger for Store {
    async fn reported_insight(&self, commit: &str, key: &str) -> Result<Option<ReportedInsight>> {
        Ok(self
            .get_doc(&format!("{INSIGHT_PK_PREFIX}{commit}"), key)
            .await?
            .map(|v| v.value))
    }

    async fn record_insight(&self, commit: &str, key: &str, r: &ReportedInsight) -> Result<()> {
        let ttl = Some(Utc::now().timestamp() + INSIGHT_TTL);
        let (rev, _) = over(None);
        self.kv
            .write(vec![
                put(
                    format!("{INSIGHT_PK_PREFIX}{commit}"),
                    key.to_string(),
                    rev,
                    r,
                    ttl,
                    Cond::Always,
                )?,
                Write::Delete {
                    pk: PENDING_PK.into(),
                    sk: pending_sk(commit, key),
                    cond: Cond::Always,
                },
            ])
            .await
    }

    async fn add_pending_insight(&self, p: &PendingInsight) -> Result<()> {
        let (rev, _) = over(None);
        self.kv
            .write(vec![put(
                PENDING_PK.into(),
                pending_sk(&p.commit, &p.key),
                rev,
                p,
                None,
                Cond::Always,
            )?])
            .await
    }

    async fn pending_insights(&self, limit: usize) -> Result<Vec<PendingInsight>> {
        let items = self
            .kv
            .query(PENDING_PK, "", None, limit, Order::Ascending)
            .await?;
        items
            .iter()
            .map(|i| decode::<PendingInsight>(i).map(|v| v.value))
            .collect()
    }

    async fn drop_pending_insight(&self, commit: &str, key: &str) -> Result<()> {
        self.kv
            .write(vec![Write::Delete {
                pk: PENDING_PK.into(),
                sk: pending_sk(commit, key),
                cond: Cond::Always,
            }])
            .await
    }
}
