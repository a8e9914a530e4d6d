//! Code Insights: every finished build becomes a report on its commit, keyed per pipeline, on
//! Bitbucket Data Center (5.15 and later) and Cloud: PASS or FAIL, a link to the build, its
//! duration, failed steps and retried jobs as data, and the failed steps named in the details.
//! Pull requests whose tip is the commit show it beside the build status.
//!
//! - [`report_for`] builds the report (pure): every field cut to its API's limit.
//! - On with `KITEBRIDGE_CODE_INSIGHTS=on` (off by default for now: the server-version probe is
//!   not yet paced with the statuses).
//! - [`InsightsReporter`] is a [`BuildObserver`]: it puts each finished build's report once
//!   (the store keeps what was put per commit and key, and never lets an older build replace a
//!   newer one's), keeps a report whose PUT failed for a retry on the next poll cycle, and
//!   switches itself off, with one log line, on a Data Center too old to have Code Insights.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use async_trait::async_trait;
use chrono::Utc;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use std::time::Duration;

use crate::bitbucket::pacer::{Feedback, Pacer, Priority};
use crate::bitbucket::repo;
use crate::bitbucket::request::segment;
use crate::bitbucket::{ApiKind, BitbucketClient};
use crate::buildkite::client::BuildkiteClient;
use crate::buildkite::model::{Build, BuildState, Pipeline};
use crate::net::SendError;
use crate::observe::{BuildObserver, ObserveError};
use crate::report::feedback_for;
use crate::store::{InsightLedger, PendingInsight, ReportedInsight};

/// Data Center's limits (Cloud's are wider, except the number of data items).
const KEY_MAX: usize = 50;
const TITLE_MAX: usize = 450;
const DETAILS_MAX: usize = 2000;
const DC_DATA_MAX: usize = 6;
const CLOUD_DATA_MAX: usize = 10;
/// Failed steps named in the details, at most.
const NAMED_STEPS: usize = 20;
/// Pending reports retried per poll cycle, and attempts before one is given up.
const RETRY_BATCH: usize = 50;
const MAX_ATTEMPTS: u32 = 48;
/// How long a failed version probe is not repeated.
const PROBE_BACKOFF: Duration = Duration::from_secs(10);

/// Which report API a Bitbucket has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    DataCenter,
    Cloud,
}

/// What a report says about a finished build.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub key: String,
    pub body: Value,
}

/// The report key of a pipeline: `kitebridge.<slug>`, cut to 50 characters with a hash of the
/// whole when longer, so two long slugs never share a key.
pub fn report_key(pipeline_slug: &str) -> String {
    let key = format!("kitebridge.{pipeline_slug}");
    if key.len() <= KEY_MAX {
        return key;
    }
    let hash = hex::encode(&Sha256::digest(key.as_bytes())[..4]);
    format!("{}-{hash}", &key[..KEY_MAX - 9])
}

fn cut(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// The failed steps of a build (jobs that failed and were not retried), by label, and how many
/// jobs were retried.
fn steps(build: &Build) -> (Vec<String>, usize) {
    let jobs = build.extra.get("jobs").and_then(Value::as_array);
    let mut failed = Vec::new();
    let mut retried = 0;
    for j in jobs.into_iter().flatten() {
        if j["retried"].as_bool() == Some(true) {
            retried += 1;
            continue;
        }
        let state = j["state"].as_str().unwrap_or_default();
        let failed_job = matches!(state, "failed" | "timed_out" | "broken")
            || (state == "finished" && j["exit_status"].as_i64().is_some_and(|c| c != 0));
        if j["type"].as_str() == Some("script") && failed_job && j["soft_failed"] != true {
            let label = j["name"]
                .as_str()
                .or(j["label"].as_str())
                .or(j["step_key"].as_str())
                .unwrap_or("a step");
            failed.push(label.to_string());
        }
    }
    (failed, retried)
}

/// Buildkite's annotations in a line each, errors first, then warnings, then the rest: the
/// style, and the text of its HTML (tags dropped, white space folded) cut to 200 characters.
fn summarise(annotations: &[Value]) -> String {
    let rank = |a: &Value| match a["style"].as_str() {
        Some("error") => 0,
        Some("warning") => 1,
        Some("info") => 2,
        _ => 3,
    };
    let mut sorted: Vec<&Value> = annotations.iter().collect();
    sorted.sort_by_key(|a| rank(a));
    sorted
        .iter()
        .map(|a| {
            let text = strip_html(a["body_html"].as_str().unwrap_or_default());
            format!(
                "[{}] {}",
                a["style"].as_str().unwrap_or("default"),
                cut(&text, 200)
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The text of an HTML fragment: tags dropped, the common entities decoded, white space folded.
fn strip_html(html: &str) -> String {
    let mut text = String::with_capacity(html.len());
    let mut in_tag = false;
    for ch in html.chars() {
        match ch {
            '<' => {
                in_tag = true;
                text.push(' ');
            }
            '>' => in_tag = false,
            c if !in_tag => text.push(c),
            _ => {}
        }
    }
    let text = text
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&");
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The report of a finished build for `flavour`'s API; `None` for a build not finished.
pub fn report_for(
    build: &Build,
    pipeline: &Pipeline,
    annotations: &[Value],
    flavour: Flavour,
) -> Option<Report> {
    let (pass, word) = match build.state {
        BuildState::Passed => (true, "passed"),
        BuildState::Failed => (false, "failed"),
        BuildState::Canceled => (false, "was canceled"),
        _ => return None,
    };
    if build.blocked {
        return None;
    }
    let name = pipeline.name.as_deref().unwrap_or(&pipeline.slug);
    let (failed, retried) = steps(build);
    let mut details = format!("Buildkite build #{} of {name} {word}", build.number);
    if let Some(b) = &build.branch {
        details.push_str(&format!(" on {b}"));
    }
    details.push('.');
    if !failed.is_empty() {
        let shown: Vec<&str> = failed
            .iter()
            .take(NAMED_STEPS)
            .map(String::as_str)
            .collect();
        details.push_str(&format!(" Failed: {}", shown.join(", ")));
        if failed.len() > NAMED_STEPS {
            details.push_str(&format!(" and {} more", failed.len() - NAMED_STEPS));
        }
        details.push('.');
    }
    if retried > 0 {
        details.push_str(&format!(" {retried} job(s) retried."));
    }
    let notes = summarise(annotations);
    if !notes.is_empty() {
        details.push_str(" Annotations: ");
        details.push_str(&notes);
    }
    let link = build
        .web_url
        .as_deref()
        .filter(|u| u.starts_with("https://") || u.starts_with("http://"));
    let mut data = Vec::new();
    if let Some(url) = link {
        let value = match flavour {
            Flavour::DataCenter => json!({"linktext": format!("#{}", build.number), "href": url}),
            Flavour::Cloud => json!({"text": format!("#{}", build.number), "href": url}),
        };
        data.push(json!({"title": "Build", "type": "LINK", "value": value}));
    }
    if let (Some(start), Some(end)) = (build.started_at, build.finished_at) {
        let ms = (end - start).num_milliseconds().max(0);
        data.push(json!({"title": "Duration", "type": "DURATION", "value": ms}));
    }
    data.push(json!({"title": "Failed steps", "type": "NUMBER", "value": failed.len()}));
    data.push(json!({"title": "Retried jobs", "type": "NUMBER", "value": retried}));
    if let Some(b) = &build.branch {
        data.push(json!({"title": "Branch", "type": "TEXT", "value": cut(b, 200)}));
    }
    let title = cut(&format!("Buildkite: {name}"), TITLE_MAX);
    let details = cut(&details, DETAILS_MAX);
    let body = match flavour {
        Flavour::DataCenter => {
            data.truncate(DC_DATA_MAX);
            let mut b = json!({
                "title": title,
                "details": details,
                "result": if pass { "PASS" } else { "FAIL" },
                "reporter": "kitebridge",
                "data": data,
            });
            if let Some(url) = link {
                b["link"] = json!(url);
            }
            b
        }
        Flavour::Cloud => {
            data.truncate(CLOUD_DATA_MAX);
            let mut b = json!({
                "title": title,
                "details": details,
                "report_type": "TEST",
                "result": if pass { "PASSED" } else { "FAILED" },
                "reporter": "kitebridge",
                "data": data,
            });
            if let Some(url) = link {
                b["link"] = json!(url);
            }
            b
        }
    };
    Some(Report {
        key: report_key(&pipeline.slug),
        body,
    })
}

const UNKNOWN: u8 = 0;
const AVAILABLE: u8 = 1;
const UNAVAILABLE: u8 = 2;

/// Puts each finished build's report on its commit.
pub struct InsightsReporter {
    ledger: Arc<dyn InsightLedger>,
    bitbucket: BitbucketClient,
    /// Reads a build's jobs when a webhook's build has none.
    buildkite: Option<BuildkiteClient>,
    /// The statuses' pacer: a report takes a turn only when one is free at once, so reports
    /// fill Bitbucket's spare capacity and never slow a status down.
    pacer: Option<Arc<Pacer>>,
    availability: AtomicU8,
    probe_failed_at: std::sync::Mutex<Option<std::time::Instant>>,
}

impl InsightsReporter {
    pub fn new(
        ledger: Arc<dyn InsightLedger>,
        bitbucket: BitbucketClient,
        buildkite: Option<BuildkiteClient>,
    ) -> InsightsReporter {
        InsightsReporter {
            ledger,
            bitbucket,
            buildkite,
            pacer: None,
            availability: AtomicU8::new(UNKNOWN),
            probe_failed_at: std::sync::Mutex::new(None),
        }
    }

    /// Reports take their turns from `pacer` (the statuses'), after every status.
    pub fn with_pacer(mut self, pacer: Arc<Pacer>) -> Self {
        self.pacer = Some(pacer);
        self
    }

    /// Whether this Bitbucket has Code Insights: Cloud does; Server and Data Center from 5.15
    /// (asked once). Off, it says so once.
    async fn available(&self) -> Result<Option<Flavour>, SendError> {
        let api = self.bitbucket.api().await?;
        if api == ApiKind::Cloud {
            return Ok(Some(Flavour::Cloud));
        }
        match self.availability.load(Ordering::Relaxed) {
            AVAILABLE => return Ok(Some(Flavour::DataCenter)),
            UNAVAILABLE => return Ok(None),
            _ => {}
        }
        // A failed probe is not repeated for every build of a backlog: once in 10 s at most.
        {
            let last = self
                .probe_failed_at
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < PROBE_BACKOFF) {
                return Err(SendError::Other(
                    "Bitbucket's version could not be read a moment ago".into(),
                ));
            }
        }
        let version = match self.bitbucket.server_version().await {
            Ok(v) => v,
            Err(e) => {
                *self
                    .probe_failed_at
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(std::time::Instant::now());
                return Err(e);
            }
        };
        let ok = version.is_some_and(|v| v >= (5, 15));
        let was = self
            .availability
            .swap(if ok { AVAILABLE } else { UNAVAILABLE }, Ordering::Relaxed);
        if !ok && was != UNAVAILABLE {
            tracing::warn!(
                version = version.map(|(a, b)| format!("{a}.{b}")).unwrap_or_default(),
                "this Bitbucket has no Code Insights (Data Center 5.15 or later has them): \
                 build reports are off; statuses are not affected"
            );
        }
        Ok(ok.then_some(Flavour::DataCenter))
    }

    /// The path of a report on the commit of a pipeline's repository, if the repository is on
    /// this Bitbucket.
    fn report_path(
        &self,
        flavour: Flavour,
        clone_url: &str,
        commit: &str,
        key: &str,
    ) -> Option<String> {
        match flavour {
            Flavour::DataCenter => {
                let r = repo::parse_server_on(clone_url, self.bitbucket.base())?.ok()?;
                Some(format!(
                    "/rest/insights/latest/projects/{}/repos/{}/commits/{commit}/reports/{}",
                    segment(&r.project_key),
                    segment(&r.slug),
                    segment(key)
                ))
            }
            Flavour::Cloud => {
                let r = repo::parse_cloud(clone_url).ok()?;
                Some(format!(
                    "/2.0/repositories/{}/{}/commit/{commit}/reports/{}",
                    segment(&r.workspace),
                    segment(&r.slug),
                    segment(key)
                ))
            }
        }
    }

    /// Puts the report of `build` unless it (or a newer build's) is there already. A failure a
    /// retry may fix is kept for the next poll cycle; a refusal is logged and given up.
    async fn report(
        &self,
        organization: &str,
        build: &Build,
        pipeline: &Pipeline,
        attempts: u32,
    ) -> Result<(), ObserveError> {
        let commit = build.commit.to_ascii_lowercase();
        if commit.len() != 40 || !commit.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(());
        }
        let Some(clone_url) = pipeline.repository.as_deref() else {
            return Ok(());
        };
        let key = report_key(&pipeline.slug);
        if let Some(done) = self.ledger.reported_insight(&commit, &key).await?
            && (done.build_number > build.number
                || (done.build_number == build.number && done.state == build.state.as_str()))
        {
            return Ok(());
        }
        let pending = || PendingInsight {
            organization: organization.to_string(),
            pipeline: pipeline.slug.clone(),
            build_number: build.number,
            commit: commit.clone(),
            key: key.clone(),
            attempts: attempts + 1,
            since: Utc::now(),
        };
        let flavour = match self.available().await {
            Ok(Some(f)) => f,
            Ok(None) => return Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, "could not ask Bitbucket whether it has Code Insights; retried next cycle");
                self.ledger.add_pending_insight(&pending()).await?;
                return Ok(());
            }
        };
        let Some(path) = self.report_path(flavour, clone_url, &commit, &key) else {
            return Ok(()); // not a repository on this Bitbucket
        };
        // A webhook's build has no jobs: read them, to name the failed steps.
        let fetched;
        let build = if build.extra.contains_key("jobs") {
            build
        } else {
            match &self.buildkite {
                Some(bk) => match bk
                    .get_build::<Build>(organization, &pipeline.slug, build.number)
                    .await
                {
                    Ok(Some(b)) if b.state == build.state => {
                        fetched = b;
                        &fetched
                    }
                    _ => build,
                },
                None => build,
            }
        };
        let annotations = match &self.buildkite {
            Some(bk) => bk
                .annotations(organization, &pipeline.slug, build.number, 2)
                .await
                .unwrap_or_else(|e| {
                    tracing::debug!(error = %e, "no annotations read for the Code Insights report");
                    Vec::new()
                }),
            None => Vec::new(),
        };
        let Some(report) = report_for(build, pipeline, &annotations, flavour) else {
            return Ok(());
        };
        if let Some(p) = &self.pacer
            && p.acquire(Priority::Backlog, Duration::ZERO).await.is_err()
        {
            // Statuses are waiting for Bitbucket (or it is backing off): later.
            self.ledger.add_pending_insight(&pending()).await?;
            return Ok(());
        }
        let put = self.bitbucket.put_json(&path, &report.body).await;
        if let Some(p) = &self.pacer {
            p.feedback(match &put {
                Ok(()) => Feedback::Accepted,
                Err(e) => feedback_for(e),
            });
        }
        match put {
            Ok(()) => {
                let r = ReportedInsight {
                    build_number: build.number,
                    state: build.state.as_str().to_string(),
                    at: Utc::now(),
                };
                self.ledger.record_insight(&commit, &key, &r).await?;
                tracing::debug!(commit = %commit, key = %key, "Code Insights report put");
            }
            Err(e) if e.is_transient() && attempts + 1 < MAX_ATTEMPTS => {
                tracing::warn!(commit = %commit, key = %key, error = %e, "Code Insights report not put; retried next cycle");
                self.ledger.add_pending_insight(&pending()).await?;
            }
            Err(e) => {
                tracing::error!(commit = %commit, key = %key, error = %e, "Bitbucket refused the Code Insights report; given up");
                self.ledger.drop_pending_insight(&commit, &key).await?;
            }
        }
        Ok(())
    }
}

#[async_trait]
impl BuildObserver for InsightsReporter {
    async fn observe(
        &self,
        organization: &str,
        build: &Build,
        pipeline: Option<&Pipeline>,
    ) -> Result<(), ObserveError> {
        if !matches!(
            build.state,
            BuildState::Passed | BuildState::Failed | BuildState::Canceled
        ) || build.blocked
        {
            return Ok(());
        }
        let Some(pipeline) = pipeline.or(build.pipeline.as_ref()) else {
            return Ok(());
        };
        self.report(organization, build, pipeline, 0).await
    }

    /// Retries the reports whose PUT failed, reading each build again from Buildkite.
    async fn tick(&self) -> Result<(), ObserveError> {
        let Some(bk) = &self.buildkite else {
            return Ok(());
        };
        for p in self.ledger.pending_insights(RETRY_BATCH).await? {
            match bk
                .get_build::<Build>(&p.organization, &p.pipeline, p.build_number)
                .await
            {
                Ok(Some(build)) => {
                    let Some(pipeline) = build.pipeline.clone() else {
                        self.ledger.drop_pending_insight(&p.commit, &p.key).await?;
                        continue;
                    };
                    self.report(&p.organization, &build, &pipeline, p.attempts)
                        .await?;
                }
                Ok(None) => self.ledger.drop_pending_insight(&p.commit, &p.key).await?,
                Err(e) => {
                    tracing::warn!(error = %e, "could not read a build to retry its Code Insights report");
                    break;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(state: &str, jobs: Value) -> Build {
        serde_json::from_value(json!({
            "id": "b", "number": 7, "state": state, "blocked": false, "commit": "a".repeat(40),
            "branch": "main", "web_url": "https://buildkite.com/acme/web/builds/7",
            "started_at": "2026-12-01T10:00:00Z", "finished_at": "2026-12-01T10:03:30Z",
            "jobs": jobs
        }))
        .unwrap()
    }

    fn pipeline(slug: &str) -> Pipeline {
        serde_json::from_value(json!({"slug": slug, "name": "Web"})).unwrap()
    }

    #[test]
    fn a_failed_build_names_its_failed_steps_and_fits_data_centers_limits() {
        let jobs = json!([
            {"type": "script", "name": ":rust: test", "state": "failed", "exit_status": 1},
            {"type": "script", "name": "lint", "state": "failed", "retried": true},
            {"type": "script", "name": "lint", "state": "passed", "exit_status": 0},
            {"type": "script", "name": "flaky", "state": "failed", "soft_failed": true},
            {"type": "waiter"}
        ]);
        let notes = [
            json!({"style": "info", "body_html": "<p>Coverage 81%</p>"}),
            json!({"style": "error", "body_html": "<h3>2 tests failed</h3>\n<ul><li><code>checkout::retries</code> &amp; more</li></ul>"}),
        ];
        let r = report_for(
            &build("failed", jobs),
            &pipeline("web"),
            &notes,
            Flavour::DataCenter,
        )
        .unwrap();
        assert_eq!(r.key, "kitebridge.web");
        assert_eq!(r.body["result"], "FAIL");
        assert_eq!(r.body["title"], "Buildkite: Web");
        let details = r.body["details"].as_str().unwrap();
        assert!(details.contains("Failed: :rust: test."), "{details}");
        assert!(details.contains("1 job(s) retried"), "{details}");
        assert!(
            details.ends_with(
                "Annotations: [error] 2 tests failed checkout::retries & more; [info] Coverage 81%"
            ),
            "{details}"
        );
        let data = r.body["data"].as_array().unwrap();
        assert!(data.len() <= DC_DATA_MAX);
        assert_eq!(data[0]["value"]["linktext"], "#7");
        assert_eq!(
            data[1],
            json!({"title": "Duration", "type": "DURATION", "value": 210_000})
        );
        assert_eq!(data[2]["value"], 1);
    }

    #[test]
    fn every_field_is_cut_to_its_limit() {
        let many: Vec<Value> = (0..500)
            .map(|i| json!({"type": "script", "name": format!("step {i} {}", "x".repeat(50)), "state": "failed"}))
            .collect();
        let long = "p".repeat(600);
        let r = report_for(
            &build("failed", json!(many)),
            &pipeline(&long),
            &[],
            Flavour::Cloud,
        )
        .unwrap();
        assert!(r.key.len() <= KEY_MAX, "{}", r.key);
        assert_ne!(
            report_key(&format!("{long}a")),
            r.key,
            "long slugs keep distinct keys"
        );
        assert!(r.body["title"].as_str().unwrap().chars().count() <= TITLE_MAX);
        assert!(r.body["details"].as_str().unwrap().chars().count() <= DETAILS_MAX);
        assert_eq!(r.body["result"], "FAILED");
        assert_eq!(r.body["data"][0]["value"]["text"], "#7");
    }

    #[test]
    fn only_finished_builds_have_reports() {
        assert!(
            report_for(
                &build("running", json!([])),
                &pipeline("web"),
                &[],
                Flavour::DataCenter
            )
            .is_none()
        );
        let passed = report_for(
            &build("passed", json!([])),
            &pipeline("web"),
            &[],
            Flavour::DataCenter,
        )
        .unwrap();
        assert_eq!(passed.body["result"], "PASS");
    }
}
