//! Changelog sources: commit listings and the pull requests containing a commit, on Data Center
//! and Cloud, over a commit graph the test gives each repository.

use std::collections::{HashMap, HashSet};

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::deploy::invalid_commit;
use super::extra::{RepoId, bad_param};
use super::insights::cloud_page;
use super::{Inner, cloud_error, dc_error, is_full_sha, lock};

/// A commit in a repository's graph (see [`FakeBitbucket::add_commits`](super::FakeBitbucket::add_commits)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeCommit {
    /// Full 40-hex SHA.
    pub id: String,
    /// Parent SHAs (two or more: a merge commit).
    pub parents: Vec<String>,
    /// Commit message.
    pub message: String,
    /// Author (and committer) name.
    pub author_name: String,
    /// Author (and committer) e-mail.
    pub author_email: String,
    /// Author (and committer) time.
    pub timestamp: DateTime<Utc>,
    /// Files the commit touches (repository-relative, `/`-separated).
    pub paths: Vec<String>,
}

impl FakeCommit {
    /// A commit by "Jane Doe <jane@example.com>" at `timestamp`, touching nothing.
    pub fn new(id: &str, parents: &[&str], message: &str, timestamp: DateTime<Utc>) -> Self {
        Self {
            id: id.to_owned(),
            parents: parents.iter().map(|p| (*p).to_owned()).collect(),
            message: message.to_owned(),
            author_name: "Jane Doe".to_owned(),
            author_email: "jane@example.com".to_owned(),
            timestamp,
            paths: Vec::new(),
        }
    }

    /// The same commit touching `paths`.
    pub fn touching(mut self, paths: &[&str]) -> Self {
        self.paths = paths.iter().map(|p| (*p).to_owned()).collect();
        self
    }
}

/// A pull request's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullRequestState {
    /// `OPEN`.
    Open,
    /// `MERGED`.
    Merged,
    /// `DECLINED`.
    Declined,
}

impl PullRequestState {
    fn as_str(self) -> &'static str {
        match self {
            Self::Open => "OPEN",
            Self::Merged => "MERGED",
            Self::Declined => "DECLINED",
        }
    }
}

/// A pull request (see [`FakeBitbucket::add_pull_request`](super::FakeBitbucket::add_pull_request)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakePullRequest {
    /// Pull request id.
    pub id: u64,
    /// Title.
    pub title: String,
    /// State.
    pub state: PullRequestState,
    /// Source branch name (without `refs/heads/`).
    pub from_branch: String,
    /// Target branch name (without `refs/heads/`).
    pub to_branch: String,
    /// The pull request's commits, oldest first; the last is the source branch's tip.
    pub commits: Vec<String>,
}

/// The ids reachable from `starts` (inclusive) over the parent graph.
fn reachable(graph: &HashMap<&str, &FakeCommit>, starts: &[String]) -> HashSet<String> {
    let mut seen = HashSet::new();
    let mut todo: Vec<String> = starts.to_vec();
    while let Some(id) = todo.pop() {
        if !seen.insert(id.clone()) {
            continue;
        }
        if let Some(c) = graph.get(id.as_str()) {
            todo.extend(c.parents.iter().map(|p| p.to_ascii_lowercase()));
        }
    }
    seen
}

/// `git log includes ^excludes [-- path]`, newest first (by timestamp, later-added first on ties).
fn log(
    commits: &[FakeCommit],
    includes: &[String],
    excludes: &[String],
    path: Option<&str>,
) -> Vec<FakeCommit> {
    let graph: HashMap<&str, &FakeCommit> = commits.iter().map(|c| (c.id.as_str(), c)).collect();
    let inc = reachable(&graph, includes);
    let exc = reachable(&graph, excludes);
    let path = path.map(|p| p.trim_matches('/')).filter(|p| !p.is_empty());
    let mut out: Vec<(usize, &FakeCommit)> = commits
        .iter()
        .enumerate()
        .filter(|(_, c)| inc.contains(&c.id) && !exc.contains(&c.id))
        .filter(|(_, c)| {
            path.is_none_or(|p| {
                c.paths.iter().any(|f| {
                    let f = f.trim_start_matches('/');
                    f == p || f.strip_prefix(p).is_some_and(|rest| rest.starts_with('/'))
                })
            })
        })
        .collect();
    out.sort_by(|a, b| b.1.timestamp.cmp(&a.1.timestamp).then(b.0.cmp(&a.0)));
    out.into_iter().map(|(_, c)| c.clone()).collect()
}

/// A stable key for a listing: its path and its query minus the paging parameters.
fn page_key(path: &str, query: &[(String, String)], paging: &[&str]) -> String {
    let mut q: Vec<String> = query
        .iter()
        .filter(|(k, _)| !paging.contains(&k.as_str()))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    q.sort();
    format!("{path}?{}", q.join("&"))
}

impl Inner {
    fn repo_commits(&self, repo: &RepoId) -> Vec<FakeCommit> {
        lock(&self.extra)
            .commits
            .get(repo)
            .cloned()
            .unwrap_or_default()
    }

    fn repo_prs(&self, repo: &RepoId) -> Vec<FakePullRequest> {
        lock(&self.extra)
            .pull_requests
            .get(repo)
            .cloned()
            .unwrap_or_default()
    }

    fn dc_commit_json(c: &FakeCommit) -> Value {
        let ms = c.timestamp.timestamp_millis();
        let person = json!({"name": c.author_name, "emailAddress": c.author_email});
        json!({
            "id": c.id,
            "displayId": &c.id[..11.min(c.id.len())],
            "message": c.message,
            "author": person,
            "authorTimestamp": ms,
            "committer": person,
            "committerTimestamp": ms,
            "parents": c.parents.iter().map(|p| json!({"id": p, "displayId": &p[..11.min(p.len())]})).collect::<Vec<_>>(),
        })
    }

    /// `RestCommit` for `commit` in the repository: from the graph when known, else `id`,
    /// `displayId` and empty `parents`.
    pub(super) fn dc_commit_json_by_id(&self, project: &str, slug: &str, commit: &str) -> Value {
        let repo = self.repo_key(project, slug);
        match self.repo_commits(&repo).iter().find(|c| c.id == commit) {
            Some(c) => Self::dc_commit_json(c),
            None => {
                json!({"id": commit, "displayId": &commit[..11.min(commit.len())], "parents": []})
            }
        }
    }

    fn no_such_commit(&self, commit: &str, slug: &str) -> Response {
        dc_error(
            StatusCode::BAD_REQUEST,
            format!("Commit '{commit}' does not exist in repository '{slug}'."),
            "com.atlassian.bitbucket.commit.NoSuchCommitException",
        )
    }

    pub(super) fn dc_commits(
        &self,
        project: &str,
        slug: &str,
        query: &[(String, String)],
        path: &str,
    ) -> Response {
        let param = |k: &str| {
            query
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.as_str())
                .filter(|v| !v.is_empty())
        };
        let ignore_missing = param("ignoreMissing").is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let merges = param("merges").unwrap_or("include").to_ascii_lowercase();
        if !matches!(merges.as_str(), "include" | "exclude" | "only") {
            return bad_param("merges", "merges must be one of exclude, include, only");
        }
        let repo = self.repo_key(project, slug);
        let commits = self.repo_commits(&repo);
        let known = |rev: &str| self.cloud_resolve(&repo, &commits, rev);
        let mut missing = false;
        let until = match param("until") {
            Some(u) => match known(u) {
                Some(id) => Some(id),
                None if ignore_missing => {
                    missing = true;
                    None
                }
                None => return self.no_such_commit(u, slug),
            },
            // No `until`: the default branch's tip, here the commit added last.
            None => commits.last().map(|c| c.id.clone()),
        };
        let since = match param("since") {
            Some(s) => match known(s) {
                Some(id) => Some(id),
                None if ignore_missing => None,
                None => return self.no_such_commit(s, slug),
            },
            None => None,
        };
        let list = if missing {
            Vec::new()
        } else {
            log(
                &commits,
                &until.into_iter().collect::<Vec<_>>(),
                &since.into_iter().collect::<Vec<_>>(),
                param("path"),
            )
        };
        let values: Vec<Value> = list
            .iter()
            .filter(|c| match merges.as_str() {
                "exclude" => c.parents.len() < 2,
                "only" => c.parents.len() >= 2,
                _ => true,
            })
            .map(Self::dc_commit_json)
            .collect();
        self.dc_page(values, query, &page_key(path, query, &["start", "limit"]))
    }

    fn dc_pr_json(&self, project: &str, slug: &str, pr: &FakePullRequest) -> Value {
        let repo = self.repo_json(project, slug);
        let (p, s) = self.repo_key(project, slug);
        json!({
            "id": pr.id,
            "version": 0,
            "title": pr.title,
            "state": pr.state.as_str(),
            "open": pr.state == PullRequestState::Open,
            "closed": pr.state != PullRequestState::Open,
            "fromRef": {
                "id": format!("refs/heads/{}", pr.from_branch),
                "displayId": pr.from_branch,
                "latestCommit": pr.commits.last(),
                "repository": repo,
            },
            "toRef": {
                "id": format!("refs/heads/{}", pr.to_branch),
                "displayId": pr.to_branch,
                "repository": repo,
            },
            "links": {"self": [{"href": format!("{}/projects/{p}/repos/{s}/pull-requests/{}", self.base, pr.id)}]},
        })
    }

    fn commit_known(&self, repo: &RepoId, commit: &str) -> bool {
        let store = lock(&self.extra);
        store
            .commits
            .get(repo)
            .is_some_and(|l| l.iter().any(|c| c.id == commit))
            || store
                .pull_requests
                .get(repo)
                .is_some_and(|l| l.iter().any(|p| p.commits.iter().any(|c| c == commit)))
    }

    /// `GET .../commits/{c}/changes`: the commit's files, as Data Center pages them.
    pub(super) fn dc_commit_changes(
        &self,
        project: &str,
        slug: &str,
        commit: &str,
        query: &[(String, String)],
        path: &str,
    ) -> Response {
        let repo = self.repo_key(project, slug);
        let commits = self.repo_commits(&repo);
        let Some(c) = commits.iter().find(|c| c.id.eq_ignore_ascii_case(commit)) else {
            return self.no_such_commit(commit, slug);
        };
        let values: Vec<Value> = c
            .paths
            .iter()
            .map(|p| {
                let components: Vec<&str> = p.split('/').collect();
                json!({
                    "type": "MODIFY",
                    "nodeType": "FILE",
                    "path": {
                        "components": components,
                        "name": components.last(),
                        "toString": p,
                    },
                })
            })
            .collect();
        self.dc_page(values, query, &page_key(path, query, &["start", "limit"]))
    }

    /// `GET /2.0/repositories/{ws}/{slug}/diffstat/{commit}`: the commit's files (one page).
    pub(super) fn cloud_diffstat(&self, ws: &str, slug: &str, spec: &str) -> Response {
        let repo = self.repo_key(ws, slug);
        let commits = self.repo_commits(&repo);
        let Some(c) = commits.iter().find(|c| c.id.eq_ignore_ascii_case(spec)) else {
            return cloud_error(
                StatusCode::NOT_FOUND,
                format!("Commit not found: {spec}"),
                None,
            );
        };
        let values: Vec<Value> = c
            .paths
            .iter()
            .map(|p| {
                json!({"type": "diffstat", "status": "modified",
                       "old": {"path": p, "type": "commit_file"},
                       "new": {"path": p, "type": "commit_file"}})
            })
            .collect();
        (
            StatusCode::OK,
            axum::Json(json!({"pagelen": 500, "values": values, "page": 1, "size": c.paths.len()})),
        )
            .into_response()
    }

    pub(super) fn dc_commit_prs(
        &self,
        project: &str,
        slug: &str,
        commit: &str,
        query: &[(String, String)],
        path: &str,
    ) -> Response {
        if !is_full_sha(commit) {
            return invalid_commit(commit);
        }
        let commit = commit.to_ascii_lowercase();
        let repo = self.repo_key(project, slug);
        if !self.commit_known(&repo, &commit) {
            return dc_error(
                StatusCode::NOT_FOUND,
                format!("Commit '{commit}' does not exist in repository '{slug}'."),
                "com.atlassian.bitbucket.commit.NoSuchCommitException",
            );
        }
        let values: Vec<Value> = self
            .repo_prs(&repo)
            .iter()
            .filter(|p| p.commits.contains(&commit))
            .map(|p| self.dc_pr_json(project, slug, p))
            .collect();
        self.dc_page(values, query, &page_key(path, query, &["start", "limit"]))
    }

    // --- Cloud ------------------------------------------------------------------------------

    fn cloud_commit_json(&self, ws: &str, slug: &str, c: &FakeCommit) -> Value {
        let (w, s) = self.repo_key(ws, slug);
        let api = format!("{}/2.0/repositories/{w}/{s}", self.base);
        json!({
            "type": "commit",
            "hash": c.id,
            "date": c.timestamp.to_rfc3339_opts(chrono::SecondsFormat::Secs, false),
            "message": c.message,
            "summary": {"raw": c.message, "markup": "markdown"},
            "author": {"type": "author", "raw": format!("{} <{}>", c.author_name, c.author_email)},
            "parents": c.parents.iter().map(|p| json!({
                "type": "commit",
                "hash": p,
                "links": {"self": {"href": format!("{api}/commit/{p}")}},
            })).collect::<Vec<_>>(),
            "repository": self.repo_json(ws, slug),
            "links": {"self": {"href": format!("{api}/commit/{}", c.id)}},
        })
    }

    /// A revision: a commit SHA (full or a unique prefix of 7+) or a pull request's source
    /// branch (`name` or `refs/heads/name`; its last commit).
    fn cloud_resolve(&self, repo: &RepoId, commits: &[FakeCommit], rev: &str) -> Option<String> {
        let r = rev.to_ascii_lowercase();
        let branch = rev.strip_prefix("refs/heads/").unwrap_or(rev);
        if r.len() >= 7 {
            let found: Vec<&FakeCommit> = commits.iter().filter(|c| c.id.starts_with(&r)).collect();
            if let [one] = found.as_slice() {
                return Some(one.id.clone());
            }
        }
        self.repo_prs(repo)
            .iter()
            .rev()
            .find(|p| p.from_branch == branch)
            .and_then(|p| p.commits.last().cloned())
    }

    pub(super) fn cloud_commits(
        &self,
        ws: &str,
        slug: &str,
        revision: Option<&str>,
        query: &[(String, String)],
        path: &str,
    ) -> Response {
        let many = |k: &str| -> Vec<&str> {
            query
                .iter()
                .filter(|(n, _)| n == k)
                .map(|(_, v)| v.as_str())
                .collect()
        };
        let one = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let pagelen = match one("pagelen").map(str::parse::<usize>) {
            None => 30,
            Some(Ok(n)) if (1..=100).contains(&n) => n,
            Some(_) => {
                return cloud_error(
                    StatusCode::BAD_REQUEST,
                    "Invalid pagelen: it must be between 1 and 100",
                    None,
                );
            }
        };
        // Cloud may answer fewer than asked (its own cap): clients follow `next`.
        let pagelen = pagelen.min(self.opts.max_page_limit.max(1));
        let repo = self.repo_key(ws, slug);
        let commits = self.repo_commits(&repo);
        let mut includes = Vec::new();
        let mut excludes = Vec::new();
        let mut revs: Vec<&str> = revision.into_iter().collect();
        revs.extend(many("include"));
        for r in &revs {
            match self.cloud_resolve(&repo, &commits, r) {
                Some(id) => includes.push(id),
                None => {
                    return cloud_error(
                        StatusCode::NOT_FOUND,
                        format!("Commit not found: {r}"),
                        None,
                    );
                }
            }
        }
        if revs.is_empty() {
            includes.extend(commits.last().map(|c| c.id.clone()));
        }
        for r in many("exclude") {
            match self.cloud_resolve(&repo, &commits, r) {
                Some(id) => excludes.push(id),
                None => {
                    return cloud_error(
                        StatusCode::NOT_FOUND,
                        format!("Commit not found: {r}"),
                        None,
                    );
                }
            }
        }
        let key = page_key(path, query, &["page"]);
        let offset = match one("page") {
            None => 0,
            Some(token) => match lock(&self.extra).cloud_tokens.get(token) {
                Some((k, o)) if *k == key => *o,
                _ => return cloud_error(StatusCode::BAD_REQUEST, "Invalid page", None),
            },
        };
        let list = log(&commits, &includes, &excludes, one("path"));
        let total = list.len();
        let values: Vec<Value> = list
            .iter()
            .skip(offset)
            .take(pagelen)
            .map(|c| self.cloud_commit_json(ws, slug, c))
            .collect();
        let mut body = json!({"pagelen": pagelen, "values": values});
        if offset + pagelen < total {
            let token = {
                use sha2::Digest;
                let mut store = lock(&self.extra);
                store.seq += 1;
                let d = sha2::Sha256::digest(format!("{key}#{offset}#{}", store.seq).as_bytes());
                let token = hex::encode(&d[..20]);
                store
                    .cloud_tokens
                    .insert(token.clone(), (key, offset + pagelen));
                token
            };
            let mut q = url::form_urlencoded::Serializer::new(String::new());
            for (k, v) in query.iter().filter(|(k, _)| k != "page") {
                q.append_pair(k, v);
            }
            q.append_pair("page", &token);
            body["next"] = json!(format!("{}{path}?{}", self.base, q.finish()));
        }
        axum::Json(body).into_response()
    }

    fn cloud_pr_json(&self, ws: &str, slug: &str, pr: &FakePullRequest) -> Value {
        let (w, s) = self.repo_key(ws, slug);
        json!({
            "type": "pullrequest",
            "id": pr.id,
            "title": pr.title,
            "state": pr.state.as_str(),
            "source": {
                "branch": {"name": pr.from_branch},
                "commit": {"type": "commit", "hash": pr.commits.last()},
                "repository": self.repo_json(ws, slug),
            },
            "destination": {
                "branch": {"name": pr.to_branch},
                "repository": self.repo_json(ws, slug),
            },
            "links": {
                "self": {"href": format!("{}/2.0/repositories/{w}/{s}/pullrequests/{}", self.base, pr.id)},
                "html": {"href": format!("{}/{w}/{s}/pull-requests/{}", self.base, pr.id)},
            },
        })
    }

    pub(super) fn cloud_commit_prs(
        &self,
        ws: &str,
        slug: &str,
        commit: &str,
        query: &[(String, String)],
        path: &str,
    ) -> Response {
        let repo = self.repo_key(ws, slug);
        let commit = commit.to_ascii_lowercase();
        if !self.commit_known(&repo, &commit) {
            return cloud_error(
                StatusCode::NOT_FOUND,
                format!("Commit not found: {commit}"),
                None,
            );
        }
        {
            let mut store = lock(&self.extra);
            let id = (repo.clone(), commit.clone());
            if !store.pr_indexed.contains(&id) {
                let polls = store.pr_index_polls.entry(id.clone()).or_insert(0);
                if *polls < self.opts.cloud_pr_index_polls {
                    *polls += 1;
                    return StatusCode::ACCEPTED.into_response();
                }
                store.pr_indexed.insert(id);
            }
        }
        let values: Vec<Value> = self
            .repo_prs(&repo)
            .iter()
            .filter(|p| p.commits.contains(&commit))
            .map(|p| self.cloud_pr_json(ws, slug, p))
            .collect();
        cloud_page(values, query, 30, &format!("{}{path}", self.base))
    }
}

impl super::FakeBitbucket {
    /// Give a repository commits (appended to its graph; the last one added is the default
    /// branch's tip). `project_or_workspace` + `slug` as for
    /// [`add_repository`](Self::add_repository), which this also does. Ids are kept lower case.
    ///
    /// Panics if an id is not a full 40-hex SHA.
    pub fn add_commits(&self, project_or_workspace: &str, slug: &str, commits: Vec<FakeCommit>) {
        self.add_repository(project_or_workspace, slug);
        let repo = self.inner.repo_key(project_or_workspace, slug);
        let mut store = lock(&self.inner.extra);
        let list = store.commits.entry(repo).or_default();
        for mut c in commits {
            assert!(
                is_full_sha(&c.id),
                "FakeCommit id {:?} is not a full SHA",
                c.id
            );
            c.id = c.id.to_ascii_lowercase();
            c.parents = c.parents.iter().map(|p| p.to_ascii_lowercase()).collect();
            list.retain(|x| x.id != c.id);
            list.push(c);
        }
    }

    /// Give a repository a pull request (replacing one with the same id); also registers the
    /// repository.
    pub fn add_pull_request(&self, project_or_workspace: &str, slug: &str, pr: FakePullRequest) {
        self.add_repository(project_or_workspace, slug);
        let repo = self.inner.repo_key(project_or_workspace, slug);
        let mut pr = pr;
        pr.commits = pr.commits.iter().map(|c| c.to_ascii_lowercase()).collect();
        let mut store = lock(&self.inner.extra);
        let list = store.pull_requests.entry(repo).or_default();
        list.retain(|p| p.id != pr.id);
        list.push(pr);
    }
}
