//! A candidate's changelog: the commits since the previous release's candidate of the same
//! project, and the pull requests they came from, read from Bitbucket once and kept.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::bitbucket::commits::{CommitInfo, PullRequestRef};

/// Most commits a changelog lists; a longer range is cut (and says so).
pub const MAX_COMMITS: usize = 500;

/// What a candidate brings, as stored and answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Changelog {
    pub project: String,
    pub release_version: String,
    pub candidate_version: String,
    /// The candidate's commit (the range's newer end, included).
    pub commit: String,
    /// The previous release's candidate the range starts after; `None` for a project's first
    /// release (then the commit's whole history, up to [`MAX_COMMITS`]).
    pub since_candidate_version: Option<String>,
    pub since_commit: Option<String>,
    /// `OWNER/slug` the commits were read from.
    pub repository: String,
    /// Newest first.
    pub commits: Vec<ChangelogCommit>,
    /// Every commit of the range is listed (false: cut at [`MAX_COMMITS`]).
    pub complete: bool,
    pub fetched_at: DateTime<Utc>,
}

/// One commit, and the pull requests it is part of (`None`: not known yet; Bitbucket Cloud
/// indexes them on first request, and they are asked for again on the next read).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangelogCommit {
    #[serde(flatten)]
    pub commit: CommitInfo,
    pub pull_requests: Option<Vec<PullRequestRef>>,
}

impl Changelog {
    /// Whether anything is still to be read from Bitbucket.
    pub fn is_settled(&self) -> bool {
        self.commits.iter().all(|c| c.pull_requests.is_some())
    }
}
