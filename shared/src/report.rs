//! The one path every commit status takes, from a webhook or a poll: de-duplication, the
//! never-regress rule, the outbox, bounded parallel posting. This is the only code that posts
//! statuses or records what was reported.
//!
//! For each status: [`StatusLedger::begin_report`] records it write-ahead (so a crash loses
//! nothing) and says whether to post; the post goes to the [`StatusSink`]; success is recorded
//! with [`StatusLedger::delivered`] (which hands back a newer status if one arrived meanwhile,
//! to be posted after ours); failure leaves it in the outbox with a retry time, and
//! [`Reporter::drain`] delivers it later.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use futures::stream::{self, StreamExt};

use url::Url;

use crate::bitbucket::request::{ApiKind, build_request};
use crate::buildkite::model::{Build, Pipeline};
use crate::net::SendError;
use crate::status::{self, Skip};
use crate::store::{Begin, PendingStatus, StatusLedger, StatusRecord, StoreError};

/// A build as the ledger records it: mapped ([`status::map`]) and turned into the request for
/// the Bitbucket API in use, kept as the payload so the outbox can send it again later.
pub fn status_record(
    build: &Build,
    pipeline: Option<&Pipeline>,
    organization: Option<&str>,
    api: &ApiKind,
    bitbucket_url: &Url,
) -> Result<StatusRecord, Skip> {
    let status = status::map(build, pipeline, organization)?;
    let request = build_request(api, bitbucket_url, &status)?;
    Ok(StatusRecord {
        state: request.state.as_str().to_string(),
        // A StatusRequest is plain data (strings and JSON); encoding it cannot fail.
        payload: serde_json::to_value(&request).unwrap_or(serde_json::Value::Null),
        commit: status.commit,
        key: status.key,
        version: status.version,
    })
}

/// Where statuses go: Bitbucket, in production.
#[async_trait]
pub trait StatusSink: Send + Sync {
    /// Posts one status; `payload` is [`StatusRecord::payload`].
    async fn post(&self, payload: &serde_json::Value) -> Result<(), SendError>;
}

/// What became of one status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Posted (and, if a newer one arrived meanwhile, that one too).
    Posted,
    /// Already on Bitbucket: nothing sent.
    AlreadyReported,
    /// A newer status for the same commit and key is being delivered instead.
    Superseded,
    /// Someone else is posting this very status right now.
    InFlight,
    /// Not delivered now; kept in the outbox for a later attempt.
    Deferred { error: String },
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Tally {
    pub posted: u64,
    pub already_reported: u64,
    pub superseded: u64,
    pub in_flight: u64,
    pub deferred: u64,
}

impl Tally {
    pub fn add(&mut self, o: &Outcome) {
        match o {
            Outcome::Posted => self.posted += 1,
            Outcome::AlreadyReported => self.already_reported += 1,
            Outcome::Superseded => self.superseded += 1,
            Outcome::InFlight => self.in_flight += 1,
            Outcome::Deferred { .. } => self.deferred += 1,
        }
    }
}

#[derive(Clone)]
pub struct Reporter {
    ledger: Arc<dyn StatusLedger>,
    sink: Arc<dyn StatusSink>,
    concurrency: usize,
    /// How long a status being posted stays leased before the outbox may retry it.
    lease: Duration,
}

/// Retry schedule of the outbox: 30 s doubling to 15 minutes for transient failures; a refusal
/// that only a person can fix (bad credentials, unknown repository, invalid field) is retried
/// hourly so it is delivered once fixed, without hammering.
fn retry_delay(attempts: u32, error: &SendError) -> Duration {
    if let Some(wait) = error.retry_after() {
        return wait.max(Duration::from_secs(1));
    }
    if !error.is_transient() {
        return Duration::from_secs(3600);
    }
    let secs = 30u64.saturating_mul(1 << attempts.min(10));
    Duration::from_secs(secs.min(15 * 60))
}

impl Reporter {
    pub fn new(
        ledger: Arc<dyn StatusLedger>,
        sink: Arc<dyn StatusSink>,
        concurrency: usize,
    ) -> Reporter {
        Reporter {
            ledger,
            sink,
            concurrency: concurrency.max(1),
            lease: Duration::from_secs(60),
        }
    }

    /// Most posts in flight at once.
    pub fn concurrency(&self) -> usize {
        self.concurrency
    }

    /// Reports one status. Errors are store failures only (the status may not be recorded):
    /// callers must not move a cursor past it.
    pub async fn report(&self, status: StatusRecord) -> Result<Outcome, StoreError> {
        match self.ledger.begin_report(&status, self.lease).await? {
            Begin::AlreadyReported => Ok(Outcome::AlreadyReported),
            Begin::Superseded => Ok(Outcome::Superseded),
            Begin::InFlight => Ok(Outcome::InFlight),
            Begin::Post => self.deliver(status, 0).await,
        }
    }

    /// Delivers outbox entries that are due (failed earlier, or whose poster died), at most
    /// `limit` this time.
    pub async fn drain(&self, limit: usize) -> Result<Tally, StoreError> {
        let due = self.ledger.due(Utc::now(), limit).await?;
        let results: Vec<Result<Outcome, StoreError>> = stream::iter(due)
            .map(|p: PendingStatus| self.deliver(p.status, p.attempts + 1))
            .buffer_unordered(self.concurrency)
            .collect()
            .await;
        let mut tally = Tally::default();
        for r in results {
            tally.add(&r?);
        }
        Ok(tally)
    }

    async fn deliver(
        &self,
        mut status: StatusRecord,
        attempts: u32,
    ) -> Result<Outcome, StoreError> {
        loop {
            match self.sink.post(&status.payload).await {
                Ok(()) => {
                    tracing::debug!(commit = %status.commit, key = %status.key, state = %status.state, "status posted");
                    match self
                        .ledger
                        .delivered(&status.commit, &status.key, status.version)
                        .await?
                    {
                        // Ours may have landed after the newer one: post the newer one again.
                        Some(newer) => status = newer,
                        None => return Ok(Outcome::Posted),
                    }
                }
                Err(error) => {
                    let delay = retry_delay(attempts, &error);
                    let level_error = !error.is_transient();
                    if level_error {
                        tracing::error!(commit = %status.commit, key = %status.key, error = %error,
                            retry_in_s = delay.as_secs(), "Bitbucket refused the status; keeping it for retry");
                    } else {
                        tracing::warn!(commit = %status.commit, key = %status.key, error = %error,
                            retry_in_s = delay.as_secs(), "status not delivered; keeping it for retry");
                    }
                    let next = Utc::now() + delay;
                    self.ledger
                        .defer(
                            &status.commit,
                            &status.key,
                            status.version,
                            next,
                            &error.to_string(),
                        )
                        .await?;
                    return Ok(Outcome::Deferred {
                        error: error.to_string(),
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_schedule() {
        let transient = SendError::Timeout;
        assert_eq!(retry_delay(0, &transient), Duration::from_secs(30));
        assert_eq!(retry_delay(1, &transient), Duration::from_secs(60));
        assert_eq!(retry_delay(30, &transient), Duration::from_secs(900));
        let refused = SendError::Status {
            status: 400,
            message: "bad".into(),
            retry_after: None,
        };
        assert_eq!(retry_delay(0, &refused), Duration::from_secs(3600));
        let limited = SendError::Status {
            status: 429,
            message: String::new(),
            retry_after: Some(Duration::from_secs(5)),
        };
        assert_eq!(retry_delay(3, &limited), Duration::from_secs(5));
    }
}
