//! One poll-and-report cycle: for each organization, cursor → Buildkite pages → statuses →
//! report → cursor; then the outbox; then the heartbeat.
//!
//! Two listings per organization, disjoint by construction so no build is fetched twice:
//!
//! - *created*: `created_from = cursor`, `created_to = cycle start`: builds created in the window,
//!   in whatever state they are now. Bounded above, so its pages cannot shift while they are
//!   read, and are fetched in parallel.
//! - *finished*: `finished_from = cursor`, `created_to = cursor`: older builds that finished in
//!   the window.
//!
//! The cursor then moves, by compare-and-set, to the cycle's start less an overlap (clock skew,
//! late indexing): every build created or finished before that point has been reported, or is
//! in the outbox for retry. If anything fails before that is true (Buildkite, the store), the
//! cursor stays and the next cycle covers the same window again; the ledger makes the repeat
//! free of duplicate posts. Two cycles running at once are harmless: both report (de-duplicated
//! by the ledger), and only one moves the cursor.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use std::sync::atomic::{AtomicU64, Ordering};

use std::collections::VecDeque;

use futures::stream::{self, FuturesUnordered, StreamExt};
use serde::Serialize;

use crate::bitbucket::BitbucketClient;
use crate::buildkite::client::{BuildFilter, BuildkiteClient, BuildkiteError};
use crate::buildkite::model::Build;
use crate::config::{Config, DmsConfig, join_url};
use crate::observe::{BuildObserver, ObserveError, observe_all, tick_all};
use crate::report::{Reporter, Tally, status_record};
use crate::store::{CursorStore, StatusRecord, StoreError};

/// How far before the cycle's start the cursor is put, for clock skew between Buildkite and us
/// and for builds that show up in listings late.
pub const OVERLAP: Duration = Duration::from_secs(120);

/// Outbox entries delivered per cycle at most.
const DRAIN_LIMIT: usize = 5_000;

#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error("organization {org}: {source}")]
    Buildkite { org: String, source: BuildkiteError },
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("Bitbucket: {0}")]
    Bitbucket(String),
    #[error("{0}")]
    Observer(ObserveError),
}

/// The cycle's summary, logged as one structured line.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Summary {
    pub organizations: usize,
    pub pages: u32,
    pub builds_seen: u64,
    pub skipped: u64,
    #[serde(flatten)]
    pub reported: Tally,
    pub retried: Tally,
    pub failed_organizations: Vec<String>,
    pub cursors_moved: u64,
    pub duration_ms: u64,
}

impl Summary {
    pub fn succeeded(&self) -> bool {
        self.failed_organizations.is_empty()
    }
}

/// What a cycle needs. Built once (at cold start on Lambda, at start-up in `serve`).
#[derive(Clone)]
pub struct Poller {
    pub organizations: Vec<String>,
    pub initial_search_time: Duration,
    pub buildkite: BuildkiteClient,
    pub bitbucket: BitbucketClient,
    pub cursors: Arc<dyn CursorStore>,
    pub reporter: Reporter,
    pub dms: Option<(reqwest::Client, DmsConfig)>,
    pub observers: Vec<Arc<dyn BuildObserver>>,
    /// When this process last finished a cycle that succeeded end to end (for `/healthz`).
    pub last_success: Arc<std::sync::Mutex<Option<DateTime<Utc>>>>,
    /// When this poller was made (for `/healthz` before the first success).
    pub started_at: DateTime<Utc>,
}

impl Poller {
    pub fn from_config(
        config: &Config,
        http: reqwest::Client,
        cursors: Arc<dyn CursorStore>,
        reporter: Reporter,
        bitbucket: BitbucketClient,
    ) -> Option<Poller> {
        let token = config.buildkite.token.clone()?;
        Some(Poller {
            organizations: config.buildkite.organizations.clone(),
            initial_search_time: config.monitor.initial_search_time,
            buildkite: BuildkiteClient::new(http.clone(), config.buildkite.api_url.clone(), token),
            bitbucket,
            cursors,
            reporter,
            dms: config.dms.clone().map(|d| (http, d)),
            observers: Vec::new(),
            last_success: Arc::default(),
            started_at: Utc::now(),
        })
    }

    pub fn with_observers(mut self, observers: Vec<Arc<dyn BuildObserver>>) -> Self {
        self.observers = observers;
        self
    }

    /// Runs one cycle. `Ok` only when every organization was polled and reported and the
    /// outbox could be read; the summary is logged either way.
    pub async fn cycle(&self) -> Result<Summary, PollError> {
        let started = Instant::now();
        let cycle_start = Utc::now();
        let mut summary = Summary {
            organizations: self.organizations.len(),
            ..Summary::default()
        };
        let mut first_error = None;
        for org in &self.organizations {
            match self.poll_org(org, &mut summary).await {
                Ok(()) => {}
                Err(e) => {
                    tracing::error!(organization = %org, error = %e, "poll failed; the cursor stays");
                    summary.failed_organizations.push(org.clone());
                    first_error.get_or_insert(e);
                }
            }
        }
        match self.reporter.drain(cycle_start, DRAIN_LIMIT).await {
            Ok(t) => summary.retried = t,
            Err(e) => {
                first_error.get_or_insert(PollError::Store(e));
            }
        }
        // Statuses Bitbucket refused or could not be sent: safe in the outbox, but the cycle
        // did not do its job, and whoever watches it must hear so.
        let undelivered = summary.reported.deferred + summary.retried.deferred;
        if undelivered > 0 {
            first_error.get_or_insert(PollError::Bitbucket(format!(
                "{undelivered} statuses were not delivered (Bitbucket refused them or could not be \
                 reached); they are kept and retried"
            )));
        }
        // Stuck deployments, trigger rules waiting for a retry.
        if let Err(e) = tick_all(&self.observers).await {
            first_error.get_or_insert(PollError::Observer(e));
        }
        summary.duration_ms = started.elapsed().as_millis() as u64;
        let ok = first_error.is_none();
        tracing::info!(
            target: "kitebridge::poll",
            ok,
            summary = %serde_json::to_string(&summary).unwrap_or_default(),
            "poll cycle"
        );
        // For the operator view (the poller may be another process, so in the store).
        self.reporter
            .note_recent(
                crate::store::Ring::PollCycles,
                serde_json::json!({
                    "ok": ok,
                    "error": first_error.as_ref().map(ToString::to_string),
                    "summary": &summary,
                }),
            )
            .await;
        if let Some(e) = first_error {
            return Err(e);
        }
        *self.last_success.lock().unwrap_or_else(|p| p.into_inner()) = Some(Utc::now());
        self.heartbeat().await;
        Ok(summary)
    }

    async fn poll_org(&self, org: &str, summary: &mut Summary) -> Result<(), PollError> {
        let start = Utc::now();
        let cursor = self.cursors.cursor(org).await?;
        let from = cursor.as_ref().map(|c| c.value).unwrap_or_else(|| {
            start
                - chrono::Duration::from_std(self.initial_search_time)
                    .unwrap_or(chrono::Duration::days(7))
        });
        let created = BuildFilter {
            created_from: Some(from),
            created_to: Some(start),
            finished_from: None,
        };
        let finished = BuildFilter {
            created_from: None,
            created_to: Some(from),
            finished_from: Some(from),
        };
        // Pages stream from Buildkite into the reporter: the first statuses are posted while
        // later pages load, and memory holds a few pages and the posts in flight, never the
        // whole window.
        let (tx, rx) = tokio::sync::mpsc::channel::<Vec<Build>>(2);
        let listing = async {
            let (a, b) = tokio::join!(
                self.buildkite
                    .send_pages::<Build>(org, &created, tx.clone()),
                self.buildkite.send_pages::<Build>(org, &finished, tx),
            );
            let (a, b) = (a?, b?);
            Ok::<_, BuildkiteError>((a.pages + b.pages, a.server_date.or(b.server_date)))
        };
        let seen = AtomicU64::new(0);
        let skipped = AtomicU64::new(0);
        // An explicit loop rather than stream combinators: closures over borrowed state would
        // not be `Send` for every lifetime, which the spawned poll loop of `serve` needs.
        let reporting = async {
            let mut rx = rx;
            let limit = self.reporter.concurrency();
            let mut queue: VecDeque<StatusRecord> = VecDeque::new();
            let mut in_flight = FuturesUnordered::new();
            let mut tally = Tally::default();
            let mut done = false;
            loop {
                while in_flight.len() < limit {
                    match queue.pop_front() {
                        Some(record) => in_flight.push(self.reporter.report(record)),
                        None => break,
                    }
                }
                if done && queue.is_empty() && in_flight.is_empty() {
                    break;
                }
                tokio::select! {
                    Some(outcome) = in_flight.next(), if !in_flight.is_empty() => tally.add(&outcome?),
                    page = rx.recv(), if !done && queue.len() < limit => match page {
                        Some(page) => queue.extend(self.prepare_page(org, page, &seen, &skipped).await?),
                        None => done = true,
                    },
                    else => break,
                }
            }
            Ok::<Tally, PollError>(tally)
        };
        let (listed, reported) = tokio::join!(listing, reporting);
        summary.builds_seen += seen.load(Ordering::Relaxed);
        summary.skipped += skipped.load(Ordering::Relaxed);
        let (pages, server_date) = listed.map_err(|source| PollError::Buildkite {
            org: org.to_string(),
            source,
        })?;
        summary.pages += pages;
        let tally = reported?;
        summary.reported.merge(&tally);

        // Buildkite's clock, not ours: a local clock running fast must not move the cursor
        // past builds Buildkite has not listed yet.
        let now = server_date.map_or(start, |d| d.min(start));
        let to = now - chrono::Duration::from_std(OVERLAP).unwrap_or(chrono::Duration::minutes(2));
        if self
            .cursors
            .advance_cursor(org, cursor.as_ref(), to)
            .await?
        {
            summary.cursors_moved += 1;
        }
        Ok(())
    }

    /// One page of builds: hands each to the observers, then maps it to the status to report.
    async fn prepare_page(
        &self,
        org: &str,
        page: Vec<Build>,
        seen: &AtomicU64,
        skipped: &AtomicU64,
    ) -> Result<Vec<StatusRecord>, PollError> {
        if page.is_empty() {
            return Ok(Vec::new());
        }
        seen.fetch_add(page.len() as u64, Ordering::Relaxed);
        if !self.observers.is_empty() {
            // The futures are made up front: a stream closure borrowing each build would not
            // be `Send` for every lifetime, which a spawned task (`kitebridge serve`) needs.
            let observing: Vec<_> = page
                .iter()
                .map(|b| observe_all(&self.observers, org, b, b.pipeline.as_ref()))
                .collect();
            let results: Vec<Result<(), ObserveError>> =
                stream::iter(observing).buffer_unordered(8).collect().await;
            if let Some(e) = results.into_iter().find_map(Result::err) {
                return Err(PollError::Observer(e));
            }
        }
        // Resolved on the first page that has builds (and then cached), so an idle cycle sends
        // nothing to Bitbucket.
        let api = self.bitbucket.api().await.map_err(|e| {
            PollError::Bitbucket(format!("cannot tell which build-status API to use: {e}"))
        })?;
        let mut records = Vec::with_capacity(page.len());
        for build in &page {
            match status_record(build, None, Some(org), &api, self.bitbucket.base()) {
                Ok(record) => records.push(record),
                Err(skip) => {
                    skipped.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(organization = %org, build = build.number, reason = %skip, "build not reported");
                }
            }
        }
        Ok(records)
    }

    /// Dead Man's Snitch: only after a cycle that succeeded end to end. A failed ping is logged,
    /// never fails the cycle.
    async fn heartbeat(&self) {
        let Some((http, dms)) = &self.dms else { return };
        let url = join_url(&dms.url, dms.snitch_id.expose());
        match http.get(&url).timeout(Duration::from_secs(5)).send().await {
            Ok(r) if r.status().is_success() => tracing::debug!("heartbeat sent"),
            // The URL holds the snitch token: log neither it nor the error's URL.
            Ok(r) => tracing::warn!(status = r.status().as_u16(), "heartbeat refused"),
            Err(e) => tracing::warn!(
                timeout = e.is_timeout(),
                connect = e.is_connect(),
                "heartbeat failed"
            ),
        }
    }
}

impl Poller {
    /// When this process last completed a successful cycle.
    pub fn last_success(&self) -> Option<DateTime<Utc>> {
        *self.last_success.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// On Lambda, prints the CloudWatch Embedded Metric Format line that the template's "no
/// successful poll" alarm counts (see `docs/aws.md`). Elsewhere it does nothing.
pub fn emit_success_metric(summary: &Summary) {
    crate::telemetry::emit_count(
        "PollSucceeded",
        serde_json::json!({
            "organizations": summary.organizations,
            "builds": summary.builds_seen,
            "posted": summary.reported.posted,
        }),
    );
}
