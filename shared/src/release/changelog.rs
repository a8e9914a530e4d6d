//! Changelogs: the commits a candidate brings since the previous release, and the commits
//! waiting to be promoted to an environment, with the pull requests they came from, read from
//! Bitbucket once per range and kept ([`CommitRange`]). A project that names paths
//! (`.gitignore` lines) lists only the commits touching them.

use chrono::{DateTime, Utc};
use ignore::gitignore::{Gitignore, GitignoreBuilder};
use serde::{Deserialize, Serialize};

use crate::bitbucket::commits::{CommitInfo, PullRequestRef};

/// Most commits a range lists; a longer range is cut (and says so).
pub const MAX_COMMITS: usize = 500;
/// Most path patterns a project names, and the longest.
pub const MAX_PATHS: usize = 100;
pub const MAX_PATH_LEN: usize = 1024;

/// The commits `until` has and `since` has not, as read from Bitbucket and kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitRange {
    pub repository: String,
    pub since: Option<String>,
    pub until: String,
    /// Newest first.
    pub commits: Vec<ChangelogCommit>,
    /// Every commit of the range is listed (false: cut at [`MAX_COMMITS`]).
    pub complete: bool,
    pub fetched_at: DateTime<Utc>,
}

impl CommitRange {
    /// Whether anything is still to be read from Bitbucket: pull requests not known yet, or
    /// (when `paths` matter) the files of a commit.
    pub fn is_settled(&self, paths: bool) -> bool {
        self.commits
            .iter()
            .all(|c| c.pull_requests.is_some() && (!paths || c.paths.is_some()))
    }
}

/// One commit, the pull requests it is part of (`None`: not known yet; Bitbucket Cloud indexes
/// them on first request, and they are asked for again on the next read), and the files it
/// touched (read only for a project that names paths).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangelogCommit {
    #[serde(flatten)]
    pub commit: CommitInfo,
    pub pull_requests: Option<Vec<PullRequestRef>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paths: Option<Vec<String>>,
}

/// What a candidate brings, as answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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
    pub repository: String,
    /// The project's paths the commits were filtered by (empty: every commit).
    pub paths: Vec<String>,
    /// Newest first.
    pub commits: Vec<ChangelogCommit>,
    pub complete: bool,
    pub fetched_at: DateTime<Utc>,
}

/// A candidate and its commit, as an environment's changelog names them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CandidateAt {
    pub candidate_version: String,
    pub commit: String,
}

/// An environment: what runs there, and what is waiting to be promoted to it (the candidate
/// running in the environment it requires, or else the newest built candidate), with the
/// commits that would bring.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EnvironmentChangelog {
    pub project: String,
    pub environment: String,
    pub deployed: Option<CandidateAt>,
    pub waiting: Option<CandidateAt>,
    /// Where the waiting candidate runs (the environment this one requires), if anywhere.
    pub waiting_in: Option<String>,
    pub repository: String,
    pub paths: Vec<String>,
    /// Commits the waiting candidate has and the deployed one has not, newest first.
    pub commits: Vec<ChangelogCommit>,
    pub complete: bool,
}

/// A project's paths as a matcher: a commit counts when a file it touched matches one of the
/// lines as `.gitignore` would ignore it (`!` lines take files back out).
pub struct PathFilter(Option<Gitignore>);

impl PathFilter {
    /// The filter for `lines`; the error names the first line that is not a pattern.
    pub fn new(lines: &[String]) -> Result<PathFilter, String> {
        if lines.is_empty() {
            return Ok(PathFilter(None));
        }
        let mut b = GitignoreBuilder::new("");
        for l in lines {
            b.add_line(None, l)
                .map_err(|e| format!("`{l}` is not a .gitignore pattern: {e}"))?;
        }
        b.build()
            .map(|g| PathFilter(Some(g)))
            .map_err(|e| e.to_string())
    }

    /// Whether a commit of a range counts (one whose files are not known yet does, when the
    /// project names paths, only once they are: it is not selected before).
    pub fn selects_commit(&self, c: &ChangelogCommit) -> bool {
        self.selects(c.paths.as_deref())
    }

    /// Whether a commit that touched `paths` counts.
    pub fn selects(&self, paths: Option<&[String]>) -> bool {
        let Some(g) = &self.0 else {
            return true;
        };
        paths.unwrap_or_default().iter().any(|p| {
            let p = p.trim_start_matches('/');
            !p.is_empty() && g.matched_path_or_any_parents(p, false).is_ignore()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(lines: &[&str]) -> PathFilter {
        PathFilter::new(&lines.iter().map(|l| l.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn touches(f: &PathFilter, paths: &[&str]) -> bool {
        f.selects(Some(
            &paths.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        ))
    }

    #[test]
    fn paths_match_as_gitignore_lines_do() {
        let f = filter(&[
            "services/api/",
            "*.proto",
            "!services/api/README.md",
            "/Makefile",
        ]);
        assert!(touches(&f, &["services/api/src/main.rs"]));
        assert!(touches(&f, &["docs/x.txt", "shared/events.proto"]));
        assert!(touches(&f, &["Makefile"]));
        assert!(!touches(&f, &["tools/Makefile"]), "anchored to the root");
        assert!(
            !touches(&f, &["services/api/README.md"]),
            "taken back out with !"
        );
        assert!(!touches(&f, &["services/web/src/main.rs", "README.md"]));
        assert!(!touches(&f, &[]));
        assert!(!f.selects(None));
        assert!(filter(&[]).selects(None), "no paths: every commit");
    }
}
