//! The mapping from a Buildkite build to a commit status: which state, key, name, description,
//! ref and version a build is reported with. Pure and table-tested; the Bitbucket request for each
//! API is built from the result by [`crate::bitbucket::request`].
//!
//! # States
//!
//! | Buildkite | logical state | legacy | repository (DC) | cloud |
//! |---|---|---|---|---|
//! | creating, scheduled, running, waiting | InProgress | INPROGRESS | INPROGRESS | INPROGRESS |
//! | failing, failed, waiting_failed | Failed | FAILED | FAILED | FAILED |
//! | passed (blocked false) | Successful | SUCCESSFUL | SUCCESSFUL | SUCCESSFUL |
//! | passed/any with blocked true, or state blocked | Blocked | FAILED | FAILED | STOPPED |
//! | canceling, canceled | Canceled | FAILED | CANCELLED if the server has `cancelledStatus`, else FAILED | STOPPED |
//! | skipped, not_run | Skipped | FAILED | CANCELLED if supported, else FAILED | STOPPED |
//! | anything else | not posted | | | |
//!
//! So no build that has ended is ever left INPROGRESS, and a blocked build is never a success.
//!
//! # Ordering
//!
//! Buildkite's latest word wins. A status's [`StatusVersion`] is `(build number, epoch, rank)`,
//! compared in that order:
//!
//! - a rebuild (a higher number) replaces any status of an older build;
//! - within one build, the *epoch* is the build's own evidence of which run this is: its
//!   `finished_at` once it has ended, else its `started_at` (0 before it starts). A build that a
//!   retried job ran again has a newer `finished_at` (and, when Buildkite moves it, a newer
//!   `started_at`), so its new state replaces the old one in either direction (red to green or
//!   green to red);
//! - within one run, the state's rank: creating 1, scheduled and waiting 2, running 3, failing 4,
//!   blocked 5, canceling 6, ended (passed, failed, waiting_failed, canceled, skipped, not_run) 7.
//!
//! So a late or repeated delivery of an earlier state never replaces a later one. One case
//! cannot be told from the payload alone: a build that is running again with the `started_at`
//! of its first run, after it had ended (a late `build.running`, or a real retry?). [`compare`]
//! calls that [`Ordering::Ambiguous`], and the reporter asks Buildkite's REST API for the build
//! once and reports what it says (see [`crate::report`]).
//!
//! # Fields
//!
//! - key: `{organization}/{pipeline slug}`, the same for every build of the pipeline so that a
//!   rebuild replaces the earlier status (cut to each API's limit when posted); also the `parent`
//!   that Data Center's "Required builds" merge checks match.
//! - name: `{pipeline name} #{build number}`; url: the build's web page.
//! - description: the state in plain words ("Passed in 3m 12s", "Blocked: waiting for someone to
//!   unblock", ...) then the first line of the commit message, never the whole message.
//! - ref: `refs/tags/{tag}` for a tag build, else `refs/heads/{branch}` when the branch is a valid
//!   branch name (not `HEAD`, not a fork's `owner:branch`).
//! - duration: `finished_at - started_at`, only once the build has ended.
//!
//! A build that cannot be reported is a [`Skip`] with the reason, never a panic: a commit that
//! is not a full SHA (`HEAD`, short SHAs), an unknown state, missing pipeline information.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::buildkite::model::{Build, BuildState, Pipeline};

/// What a build means for a commit, before choosing an API's word for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LogicalState {
    InProgress,
    Successful,
    Failed,
    Blocked,
    Canceled,
    Skipped,
}

impl LogicalState {
    /// `false` while the build may still change its outcome.
    pub fn is_final(self) -> bool {
        self != LogicalState::InProgress
    }
}

/// Orders the observations of one (commit, key): see the module docs. Compared field by field
/// in declaration order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct StatusVersion {
    /// The build number.
    pub build: u64,
    /// Which run of the build: `finished_at` (ms since the epoch) once it ended, else
    /// `started_at`, else 0; or a value the reporter chose after asking Buildkite.
    pub epoch_ms: i64,
    /// The state's rank within a run.
    pub rank: u8,
}

/// How a new observation of a (commit, key) stands to the recorded one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ordering {
    Newer,
    Same,
    Older,
    /// Older by its evidence, yet it may be a real re-run: ask Buildkite.
    Ambiguous,
}

impl StatusVersion {
    pub fn of(build: &Build, rank: u8) -> StatusVersion {
        let epoch = build.finished_at.or(build.started_at);
        StatusVersion {
            build: build.number,
            epoch_ms: epoch.map_or(0, |t| t.timestamp_millis()),
            rank,
        }
    }

    /// The build had ended (or was blocked, which Buildkite counts as finished) when observed.
    pub fn ended(self) -> bool {
        matches!(self.rank, 5 | 7)
    }

    /// The same state, placed just after `recorded`: what Buildkite confirmed is the build's
    /// state now, after `recorded` was observed.
    pub fn confirmed_after(self, recorded: StatusVersion) -> StatusVersion {
        StatusVersion {
            epoch_ms: self.epoch_ms.max(recorded.epoch_ms.saturating_add(1)),
            ..self
        }
    }

    /// The version records written before versions had an epoch stored:
    /// `build number << 8 | rank`.
    pub fn from_legacy(v: u64) -> StatusVersion {
        StatusVersion {
            build: v >> 8,
            epoch_ms: 0,
            rank: (v & 0xff) as u8,
        }
    }
}

impl<'de> Deserialize<'de> for StatusVersion {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Fields {
            build: u64,
            epoch_ms: i64,
            rank: u8,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Stored {
            Fields(Fields),
            Legacy(u64),
        }
        Ok(match Stored::deserialize(d)? {
            Stored::Fields(f) => StatusVersion {
                build: f.build,
                epoch_ms: f.epoch_ms,
                rank: f.rank,
            },
            Stored::Legacy(v) => StatusVersion::from_legacy(v),
        })
    }
}

impl fmt::Display for StatusVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}@{}/{}", self.build, self.epoch_ms, self.rank)
    }
}

/// How `new` stands to `recorded` (module docs, "Ordering").
pub fn compare(new: StatusVersion, recorded: StatusVersion) -> Ordering {
    match new.cmp(&recorded) {
        std::cmp::Ordering::Greater => Ordering::Newer,
        std::cmp::Ordering::Equal => Ordering::Same,
        std::cmp::Ordering::Less if new.build != recorded.build => Ordering::Older,
        // Still running, by evidence older than what is recorded: a late delivery, or the build
        // ran again without moving its timestamps. Buildkite can tell which.
        // (One that has not started yet is no re-run: a re-run has a `started_at`.)
        std::cmp::Ordering::Less
            if !new.ended()
                && new.epoch_ms > 0
                && (recorded.ended() || new.rank > recorded.rank) =>
        {
            Ordering::Ambiguous
        }
        std::cmp::Ordering::Less => Ordering::Older,
    }
}

/// A commit status, independent of the Bitbucket API it will be posted to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitStatus {
    /// Full 40-character SHA-1, lower case.
    pub commit: String,
    /// `{organization}/{pipeline slug}`, uncut; each API fits it to its own limit.
    pub key: String,
    pub logical: LogicalState,
    /// Orders the statuses of one (commit, key); see the module docs.
    pub version: StatusVersion,
    pub name: String,
    /// Uncut; each API fits it to its own limit.
    pub description: String,
    /// The build's web page.
    pub url: String,
    /// Fully qualified: `refs/heads/main`, `refs/tags/v1.2.0`.
    pub ref_name: Option<String>,
    pub build_number: u64,
    /// Only for builds that have ended.
    pub duration_ms: Option<u64>,
    /// What "Required builds" merge checks match: the key.
    pub parent: String,
    /// The pipeline's clone URL. May hold credentials: never log it unredacted
    /// (see [`crate::bitbucket::repo::redact`]).
    pub repository: Option<String>,
    /// The organization slug (for logs and metrics).
    pub organization: String,
    /// The pipeline slug (for logs and metrics).
    pub pipeline: String,
}

/// Why a build (or, from [`crate::bitbucket::request`], a status for one API) is not posted.
/// Messages are safe to log: repository URLs in them have their credentials removed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum Skip {
    #[error("commit {commit:?} is not a full 40-character SHA-1")]
    NotAFullSha { commit: String },
    #[error("build state {state:?} is not one kitebridge knows how to report")]
    UnknownState { state: String },
    #[error("the build's pipeline slug is unknown (no pipeline, and none in the build's URLs)")]
    MissingPipeline,
    #[error(
        "the build's organization slug is unknown (not given, and none in the build's or pipeline's URLs)"
    )]
    MissingOrganization,
    #[error("the build has no web URL to link to")]
    MissingUrl,
    #[error("the pipeline has no repository URL, which the {api} API needs")]
    MissingRepository { api: String },
    #[error("repository {url:?} cannot be used with the {api} API: {problem}")]
    UnusableRepository {
        url: String,
        api: String,
        problem: String,
    },
    #[error("repository {url:?} is not on the configured Bitbucket ({bitbucket})")]
    NotOnBitbucket { url: String, bitbucket: String },
    #[error("the build URL is {length} characters long; the {api} API accepts at most {max}")]
    UrlTooLong {
        length: usize,
        max: usize,
        api: String,
    },
}

/// The rank of a build's state within one build number (see the module docs); `None` for a
/// state kitebridge does not know.
pub fn rank(build: &Build) -> Option<u8> {
    if build.blocked || build.state == BuildState::Blocked {
        // An unknown state stays unknown even when blocked: it is not reported at all.
        return match build.state {
            BuildState::Unknown(_) => None,
            _ => Some(5),
        };
    }
    Some(match build.state {
        BuildState::Creating => 1,
        BuildState::Scheduled | BuildState::Waiting => 2,
        BuildState::Running => 3,
        BuildState::Failing => 4,
        BuildState::Blocked => 5,
        BuildState::Canceling => 6,
        BuildState::Passed
        | BuildState::Failed
        | BuildState::WaitingFailed
        | BuildState::Canceled
        | BuildState::Skipped
        | BuildState::NotRun => 7,
        BuildState::Unknown(_) => return None,
    })
}

/// The logical state of a build (the table in the module docs); `None` for an unknown state.
pub fn logical_state(build: &Build) -> Option<LogicalState> {
    if let BuildState::Unknown(_) = build.state {
        return None;
    }
    if build.blocked || build.state == BuildState::Blocked {
        return Some(LogicalState::Blocked);
    }
    Some(match build.state {
        BuildState::Creating
        | BuildState::Scheduled
        | BuildState::Running
        | BuildState::Waiting => LogicalState::InProgress,
        BuildState::Failing | BuildState::Failed | BuildState::WaitingFailed => {
            LogicalState::Failed
        }
        BuildState::Passed => LogicalState::Successful,
        BuildState::Canceling | BuildState::Canceled => LogicalState::Canceled,
        BuildState::Skipped | BuildState::NotRun => LogicalState::Skipped,
        // Handled above; listed so that a new variant is a compile error here.
        BuildState::Blocked => LogicalState::Blocked,
        BuildState::Unknown(_) => return None,
    })
}

/// Maps a build to the commit status to report.
///
/// `pipeline` is the webhook's top-level pipeline; without it the build's nested one (REST) is
/// used. `organization` is the configured slug, if known; otherwise it is read from the build's
/// and pipeline's URLs.
pub fn map(
    build: &Build,
    pipeline: Option<&Pipeline>,
    organization: Option<&str>,
) -> Result<CommitStatus, Skip> {
    let commit = full_sha(&build.commit).ok_or_else(|| Skip::NotAFullSha {
        commit: build.commit.chars().take(64).collect(),
    })?;
    let unknown = || Skip::UnknownState {
        state: build.state.as_str().to_owned(),
    };
    let logical = logical_state(build).ok_or_else(unknown)?;
    let rank = rank(build).ok_or_else(unknown)?;
    let version = StatusVersion::of(build, rank);

    let pipeline = pipeline.or(build.pipeline.as_ref());
    let slug = build.pipeline_slug(pipeline).ok_or(Skip::MissingPipeline)?;
    let organization = organization
        .map(str::trim)
        .filter(|o| !o.is_empty())
        .map(str::to_owned)
        .or_else(|| build.organization_slug(pipeline))
        .ok_or(Skip::MissingOrganization)?;
    let url = build
        .web_url
        .as_deref()
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .ok_or(Skip::MissingUrl)?
        .to_owned();

    let key = format!("{organization}/{slug}");
    let pipeline_name = pipeline
        .and_then(|p| p.name.as_deref())
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .unwrap_or(&slug);
    // Blocked (5) and terminal (7) builds have ended; canceling (6) has not, yet.
    let duration_ms = if matches!(rank, 5 | 7) {
        duration_ms(build)
    } else {
        None
    };

    Ok(CommitStatus {
        commit,
        name: format!("{pipeline_name} #{}", build.number),
        description: description(build, logical, duration_ms),
        url,
        ref_name: ref_name(build),
        build_number: build.number,
        duration_ms,
        parent: key.clone(),
        key,
        logical,
        version,
        repository: pipeline
            .and_then(|p| p.repository.as_deref())
            .map(str::trim)
            .filter(|r| !r.is_empty())
            .map(str::to_owned),
        organization,
        pipeline: slug,
    })
}

/// The commit as a lower-case full SHA-1, if it is one.
pub fn full_sha(commit: &str) -> Option<String> {
    let c = commit.trim();
    (c.len() == 40 && c.bytes().all(|b| b.is_ascii_hexdigit())).then(|| c.to_ascii_lowercase())
}

fn duration_ms(build: &Build) -> Option<u64> {
    let (start, end) = (build.started_at?, build.finished_at?);
    u64::try_from((end - start).num_milliseconds()).ok()
}

/// `refs/tags/{tag}` or `refs/heads/{branch}`, or nothing when the name is not a valid ref.
fn ref_name(build: &Build) -> Option<String> {
    let valid = |name: &&str| is_valid_ref_name(name) && *name != "HEAD";
    if let Some(tag) = build.tag.as_deref().map(str::trim).filter(valid) {
        return Some(format!(
            "refs/tags/{}",
            tag.trim_start_matches("refs/tags/")
        ));
    }
    let branch = build.branch.as_deref().map(str::trim).filter(valid)?;
    if branch.starts_with("refs/") {
        return Some(branch.to_owned());
    }
    Some(format!("refs/heads/{branch}"))
}

/// A cheap subset of `git check-ref-format`: enough to drop `HEAD`, fork branches
/// (`owner:branch`), blanks and names with spaces.
fn is_valid_ref_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('/')
        && !name.starts_with('-')
        && !name.ends_with('/')
        && !name.ends_with('.')
        && !name.ends_with(".lock")
        && !name.contains("..")
        && !name.contains("@{")
        && !name.contains("//")
        && name != "@"
        && !name.chars().any(|c| {
            c.is_control()
                || c.is_whitespace()
                || matches!(c, '~' | '^' | ':' | '?' | '*' | '[' | '\\')
        })
        && name.split('/').all(|part| !part.starts_with('.'))
}

/// Why the build is in this state, in plain words, then the commit message's first line.
fn description(build: &Build, logical: LogicalState, duration_ms: Option<u64>) -> String {
    let took = duration_ms.map(HumanDuration);
    let why = match (logical, &build.state) {
        (LogicalState::Blocked, _) => match build.blocked_state.as_deref() {
            Some("failed") => "Blocked after a failure: waiting for someone to unblock".to_owned(),
            _ => "Blocked: waiting for someone to unblock".to_owned(),
        },
        (_, BuildState::Creating) => "Creating".to_owned(),
        (_, BuildState::Scheduled) => "Scheduled".to_owned(),
        (_, BuildState::Waiting) => "Waiting".to_owned(),
        (_, BuildState::Running) => "Running".to_owned(),
        (_, BuildState::Failing) => "Failing (still running)".to_owned(),
        (_, BuildState::Passed) => match took {
            Some(t) => format!("Passed in {t}"),
            None => "Passed".to_owned(),
        },
        (_, BuildState::Failed | BuildState::WaitingFailed) => match took {
            Some(t) => format!("Failed after {t}"),
            None => "Failed".to_owned(),
        },
        (_, BuildState::Canceling) => "Canceling".to_owned(),
        (_, BuildState::Canceled) => "Canceled".to_owned(),
        (_, BuildState::Skipped) => "Skipped".to_owned(),
        (_, BuildState::NotRun) => "Skipped (not run)".to_owned(),
        (_, BuildState::Blocked | BuildState::Unknown(_)) => build.state.as_str().to_owned(),
    };
    match build.message.as_deref().and_then(first_line) {
        Some(line) => format!("{why} \u{2014} {line}"),
        None => why,
    }
}

/// The first non-blank line, with control characters made spaces.
fn first_line(message: &str) -> Option<String> {
    let line = message.lines().map(str::trim).find(|l| !l.is_empty())?;
    Some(
        line.chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect(),
    )
}

/// `45s`, `3m 12s`, `1h 2m 3s`.
struct HumanDuration(u64);

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.0 / 1000;
        let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
        if h > 0 {
            write!(f, "{h}h {m}m {s}s")
        } else if m > 0 {
            write!(f, "{m}m {s}s")
        } else {
            write!(f, "{s}s")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SHA: &str = "4e1f0c9b7a2d3e5f6a8b9c0d1e2f3a4b5c6d7e8f";

    fn build(state: &str, blocked: bool) -> Build {
        serde_json::from_value(json!({
            "id": "b", "number": 1842, "state": state, "blocked": blocked,
            "commit": SHA, "branch": "main", "message": "Fix login\n\nLong body",
            "web_url": "https://buildkite.com/acme-inc/web-app/builds/1842",
            "url": "https://api.buildkite.com/v2/organizations/acme-inc/pipelines/web-app/builds/1842",
            "started_at": "2025-03-11T10:02:09.118Z",
            "finished_at": "2025-03-11T10:05:21.500Z",
            "pipeline": {"slug": "web-app", "name": "Web App", "repository": "ssh://git@bb.example.com:7999/web/app.git"}
        }))
        .unwrap()
    }

    use LogicalState::*;

    /// Every state, blocked or not: (state, blocked, logical, rank, description prefix).
    const TABLE: &[(&str, bool, LogicalState, u8, &str)] = &[
        ("creating", false, InProgress, 1, "Creating"),
        ("scheduled", false, InProgress, 2, "Scheduled"),
        ("waiting", false, InProgress, 2, "Waiting"),
        ("running", false, InProgress, 3, "Running"),
        ("failing", false, Failed, 4, "Failing (still running)"),
        (
            "blocked",
            false,
            Blocked,
            5,
            "Blocked: waiting for someone to unblock",
        ),
        ("canceling", false, Canceled, 6, "Canceling"),
        ("passed", false, Successful, 7, "Passed in 3m 12s"),
        ("failed", false, Failed, 7, "Failed after 3m 12s"),
        ("waiting_failed", false, Failed, 7, "Failed after 3m 12s"),
        ("canceled", false, Canceled, 7, "Canceled"),
        ("skipped", false, Skipped, 7, "Skipped"),
        ("not_run", false, Skipped, 7, "Skipped (not run)"),
        ("creating", true, Blocked, 5, "Blocked"),
        ("scheduled", true, Blocked, 5, "Blocked"),
        ("waiting", true, Blocked, 5, "Blocked"),
        ("running", true, Blocked, 5, "Blocked"),
        ("failing", true, Blocked, 5, "Blocked"),
        ("blocked", true, Blocked, 5, "Blocked"),
        ("canceling", true, Blocked, 5, "Blocked"),
        ("passed", true, Blocked, 5, "Blocked"),
        ("failed", true, Blocked, 5, "Blocked"),
        ("waiting_failed", true, Blocked, 5, "Blocked"),
        ("canceled", true, Blocked, 5, "Blocked"),
        ("skipped", true, Blocked, 5, "Blocked"),
        ("not_run", true, Blocked, 5, "Blocked"),
    ];

    #[test]
    fn every_state() {
        for &(state, blocked, logical, rank, description) in TABLE {
            let s = map(&build(state, blocked), None, None).unwrap();
            let case = format!("{state} blocked={blocked}");
            assert_eq!(s.logical, logical, "{case}");
            assert_eq!((s.version.build, s.version.rank), (1842, rank), "{case}");
            assert!(
                s.description.starts_with(description),
                "{case}: {}",
                s.description
            );
            assert!(
                s.description.ends_with(" \u{2014} Fix login"),
                "{case}: {}",
                s.description
            );
            // An ended build is never in progress, and blocked is never a success.
            if rank >= 5 {
                assert_ne!(s.logical, InProgress, "{case}");
            }
            let ended = rank == 5 || rank == 7;
            assert_eq!(s.duration_ms.is_some(), ended, "{case}");
            if blocked {
                assert_ne!(s.logical, Successful, "{case}");
            }
        }
        // The table covers every known state, blocked and not.
        for state in BuildState::KNOWN {
            for blocked in [false, true] {
                assert!(
                    TABLE
                        .iter()
                        .any(|r| r.0 == state.as_str() && r.1 == blocked),
                    "{state}"
                );
            }
        }
    }

    #[test]
    fn unknown_states_are_skipped_even_when_blocked() {
        for blocked in [false, true] {
            assert_eq!(
                map(&build("paused", blocked), None, None),
                Err(Skip::UnknownState {
                    state: "paused".into()
                })
            );
        }
    }

    #[test]
    fn fields() {
        let s = map(&build("passed", false), None, None).unwrap();
        assert_eq!(s.commit, SHA);
        assert_eq!(s.key, "acme-inc/web-app");
        assert_eq!(s.parent, "acme-inc/web-app");
        assert_eq!(s.name, "Web App #1842");
        assert_eq!(s.description, "Passed in 3m 12s \u{2014} Fix login");
        assert_eq!(s.url, "https://buildkite.com/acme-inc/web-app/builds/1842");
        assert_eq!(s.ref_name.as_deref(), Some("refs/heads/main"));
        assert_eq!(s.build_number, 1842);
        assert_eq!(
            s.repository.as_deref(),
            Some("ssh://git@bb.example.com:7999/web/app.git")
        );
        assert_eq!(
            (s.organization.as_str(), s.pipeline.as_str()),
            ("acme-inc", "web-app")
        );
    }

    #[test]
    fn versions_order_a_build_and_its_rebuilds() {
        let v = |state: &str, blocked: bool, number: u64| {
            let mut b = build(state, blocked);
            b.number = number;
            map(&b, None, None).unwrap().version
        };
        let order = [
            v("creating", false, 7),
            v("scheduled", false, 7),
            v("running", false, 7),
            v("failing", false, 7),
            v("passed", true, 7),
            v("canceling", false, 7),
            v("failed", false, 7),
            v("creating", false, 8),
        ];
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
        assert_eq!(v("scheduled", false, 7), v("waiting", false, 7));
        assert_eq!(v("passed", false, 7), v("canceled", false, 7));
    }

    fn at(s: &str) -> Option<chrono::DateTime<chrono::Utc>> {
        Some(s.parse().unwrap())
    }

    /// A build observed in `state` with these timestamps.
    fn seen(state: &str, started: Option<&str>, finished: Option<&str>) -> StatusVersion {
        let mut b = build(state, false);
        b.started_at = started.and_then(at);
        b.finished_at = finished.and_then(at);
        map(&b, None, None).unwrap().version
    }

    #[test]
    fn a_retried_build_is_newer_in_both_directions() {
        let (s1, f1) = (Some("2025-03-11T10:00:00Z"), Some("2025-03-11T10:05:00Z"));
        let (s2, f2) = (Some("2025-03-11T10:07:00Z"), Some("2025-03-11T10:09:00Z"));
        let first = [
            seen("scheduled", None, None),
            seen("running", s1, None),
            seen("failing", s1, None),
            seen("failed", s1, f1),
        ];
        assert!(first.windows(2).all(|w| w[0] < w[1]), "{first:?}");
        let failed = first[3];
        // Re-run by a retried job, with `started_at` moved: newer, proven by the payload.
        let rerun = seen("running", s2, None);
        assert_eq!(compare(rerun, failed), Ordering::Newer);
        let passed = seen("passed", s2, f2);
        assert_eq!(compare(passed, rerun), Ordering::Newer);
        // ... and the other way round: a passed build re-run to red.
        assert_eq!(
            compare(seen("failed", s2, f2), seen("passed", s1, f1)),
            Ordering::Newer
        );
        // Late deliveries of the first run never move it back (a late `running` is worth
        // asking Buildkite about; a late `scheduled` is not).
        for late in first {
            assert_ne!(compare(late, passed), Ordering::Newer, "{late}");
            assert_ne!(compare(late, passed), Ordering::Same, "{late}");
        }
        assert_eq!(compare(first[0], passed), Ordering::Older);
        assert_eq!(compare(first[3], passed), Ordering::Older);
        assert_eq!(compare(failed, failed), Ordering::Same);
        // Running again with the first run's `started_at`: only Buildkite can tell.
        assert_eq!(
            compare(seen("running", s1, None), failed),
            Ordering::Ambiguous
        );
        // What Buildkite confirmed is placed after the recorded state, and a repeat of the same
        // in-progress observation is then simply older.
        let confirmed = seen("running", s1, None).confirmed_after(failed);
        assert_eq!(compare(confirmed, failed), Ordering::Newer);
        assert_eq!(
            compare(seen("running", s1, None), confirmed),
            Ordering::Older
        );
        // ... but a state further along in that run is worth asking about again.
        assert_eq!(
            compare(seen("failing", s1, None), confirmed),
            Ordering::Ambiguous
        );
        assert_eq!(compare(seen("passed", s1, f2), confirmed), Ordering::Newer);
        // A rebuild (a new number) wins whatever the timestamps; an old build never does.
        let mut rebuild = seen("scheduled", None, None);
        rebuild.build += 1;
        assert_eq!(compare(rebuild, passed), Ordering::Newer);
        assert_eq!(compare(passed, rebuild), Ordering::Older);
    }

    #[test]
    fn legacy_versions_still_decode() {
        let v: StatusVersion = serde_json::from_value(json!((7u64 << 8) | 7)).unwrap();
        assert_eq!(
            v,
            StatusVersion {
                build: 7,
                epoch_ms: 0,
                rank: 7
            }
        );
        let now = seen(
            "passed",
            Some("2025-03-11T10:00:00Z"),
            Some("2025-03-11T10:05:00Z"),
        );
        let back: StatusVersion =
            serde_json::from_value(serde_json::to_value(now).unwrap()).unwrap();
        assert_eq!(back, now);
        // A record from before epochs were kept is replaced once by the same state.
        assert_eq!(compare(now, v), Ordering::Newer);
    }

    #[test]
    fn commits() {
        let cases: &[(&str, Option<&str>)] = &[
            (SHA, Some(SHA)),
            ("4E1F0C9B7A2D3E5F6A8B9C0D1E2F3A4B5C6D7E8F", Some(SHA)),
            ("HEAD", None),
            ("4e1f0c9", None),
            ("", None),
            ("4e1f0c9b7a2d3e5f6a8b9c0d1e2f3a4b5c6d7e8g", None),
            ("4e1f0c9b7a2d3e5f6a8b9c0d1e2f3a4b5c6d7e8f0", None),
            ("refs/heads/main", None),
        ];
        for (commit, want) in cases {
            let mut b = build("passed", false);
            b.commit = commit.to_string();
            match want {
                Some(sha) => assert_eq!(map(&b, None, None).unwrap().commit, *sha),
                None => assert_eq!(
                    map(&b, None, None),
                    Err(Skip::NotAFullSha {
                        commit: commit.to_string()
                    })
                ),
            }
        }
    }

    #[test]
    fn refs() {
        let cases: &[(Option<&str>, Option<&str>, Option<&str>)] = &[
            (Some("main"), None, Some("refs/heads/main")),
            (Some("feature/x-1"), None, Some("refs/heads/feature/x-1")),
            (Some("v1.2.0"), Some("v1.2.0"), Some("refs/tags/v1.2.0")),
            (Some("main"), Some(""), Some("refs/heads/main")),
            (Some("refs/heads/main"), None, Some("refs/heads/main")),
            (Some("HEAD"), None, None),
            (Some(""), None, None),
            (None, None, None),
            (Some("dana:fix-it"), None, None),
            (Some("has space"), None, None),
            (Some("a..b"), None, None),
            (Some("x.lock"), None, None),
            (Some("feat/ümlaut"), None, Some("refs/heads/feat/ümlaut")),
        ];
        for (branch, tag, want) in cases {
            let mut b = build("passed", false);
            b.branch = branch.map(str::to_owned);
            b.tag = tag.map(str::to_owned);
            assert_eq!(
                map(&b, None, None).unwrap().ref_name.as_deref(),
                *want,
                "{branch:?} {tag:?}"
            );
        }
    }

    #[test]
    fn pipeline_and_organization() {
        // The webhook's top-level pipeline wins over the nested one.
        let top: Pipeline =
            serde_json::from_value(json!({"slug": "other", "name": "Other"})).unwrap();
        let s = map(&build("passed", false), Some(&top), Some("given-org")).unwrap();
        assert_eq!(
            (s.key.as_str(), s.name.as_str()),
            ("given-org/other", "Other #1842")
        );
        assert_eq!(s.repository, None);

        // No pipeline at all: the slug comes from the build URL, the name falls back to it.
        let mut b = build("passed", false);
        b.pipeline = None;
        let s = map(&b, None, None).unwrap();
        assert_eq!(
            (s.key.as_str(), s.name.as_str()),
            ("acme-inc/web-app", "web-app #1842")
        );

        b.url = None;
        b.web_url = Some("https://example.com/x".into());
        assert_eq!(map(&b, None, Some("acme")), Err(Skip::MissingPipeline));
        let p: Pipeline = serde_json::from_value(json!({"slug": "p"})).unwrap();
        assert_eq!(map(&b, Some(&p), None), Err(Skip::MissingOrganization));
        assert!(map(&b, Some(&p), Some("acme")).is_ok());
        b.web_url = None;
        assert_eq!(map(&b, Some(&p), Some("acme")), Err(Skip::MissingUrl));
    }

    #[test]
    fn descriptions() {
        let mut b = build("running", false);
        b.message = Some("\n  \r\n\tFirst\tline\r\nsecond".into());
        assert_eq!(
            map(&b, None, None).unwrap().description,
            "Running \u{2014} First line"
        );
        b.message = None;
        assert_eq!(map(&b, None, None).unwrap().description, "Running");
        let mut b = build("passed", true);
        b.blocked_state = Some("failed".into());
        b.message = None;
        assert_eq!(
            map(&b, None, None).unwrap().description,
            "Blocked after a failure: waiting for someone to unblock"
        );
        let mut b = build("passed", false);
        b.finished_at = None;
        b.message = None;
        assert_eq!(map(&b, None, None).unwrap().description, "Passed");
        // A clock that went backwards gives no duration rather than a huge one.
        b.finished_at = Some(b.started_at.unwrap() - chrono::Duration::seconds(1));
        assert_eq!(map(&b, None, None).unwrap().duration_ms, None);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_builds_never_panic(
            state in "[a-z_]{0,16}",
            commit in "[0-9a-fA-F]{38,42}|HEAD|\\PC{0,10}",
            number in proptest::num::u64::ANY,
            blocked in proptest::bool::ANY,
            branch in proptest::option::of("\\PC{0,20}"),
            tag in proptest::option::of("\\PC{0,20}"),
            message in proptest::option::of("\\PC{0,50}"),
            started in proptest::option::of(0i64..4_000_000_000),
            finished in proptest::option::of(0i64..4_000_000_000),
        ) {
            let mut b = build("passed", blocked);
            b.state = BuildState::parse(&state);
            b.commit = commit;
            b.number = number;
            b.branch = branch;
            b.tag = tag;
            b.message = message;
            b.started_at = started.and_then(|t| chrono::DateTime::from_timestamp(t, 0));
            b.finished_at = finished.and_then(|t| chrono::DateTime::from_timestamp(t, 0));
            if let Ok(s) = map(&b, None, None) {
                proptest::prop_assert_eq!(s.commit.len(), 40);
                proptest::prop_assert!(!s.description.contains('\n'));
                proptest::prop_assert_eq!(s.version.build, number);
            }
        }
    }

    #[test]
    fn human_durations() {
        for (ms, want) in [
            (0, "0s"),
            (999, "0s"),
            (45_000, "45s"),
            (192_382, "3m 12s"),
            (3_723_000, "1h 2m 3s"),
        ] {
            assert_eq!(HumanDuration(ms).to_string(), want);
        }
    }
}
