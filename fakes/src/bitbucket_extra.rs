//! Routing, state and paging shared by the fake Bitbucket's deployments, Code Insights, Cloud
//! reports and changelog endpoints (the build-status endpoints live in `bitbucket.rs`).

use std::collections::{HashMap, HashSet};

use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::commits::{FakeCommit, FakePullRequest};
use super::deploy::PostedDeployment;
use super::insights::{StoredAnnotation, StoredReport};
use super::{BitbucketFlavour, Inner, cloud_error, dc_error, dc_errors, lock};

/// The endpoints added on top of the build-status APIs.
pub(super) enum ExtraRoute<'a> {
    /// `GET /rest/capabilities` (Data Center).
    Capabilities,
    /// `GET /rest/api/{v}/deployment/capabilities` (Data Center 7.16+).
    DeploymentCapabilities,
    /// `/rest/api/{v}/projects/{p}/repos/{r}/commits/{c}/deployments` (Data Center 7.16+).
    Deployments {
        project: &'a str,
        slug: &'a str,
        commit: &'a str,
    },
    /// `/rest/insights/{v}/projects/{p}/repos/{r}/commits/{c}/reports[/{key}[/annotations[/{externalId}]]]`
    /// and `.../commits/{c}/annotations`.
    Insights {
        project: &'a str,
        slug: &'a str,
        commit: &'a str,
        key: Option<&'a str>,
        /// `None`: the report(s); `Some(None)`: annotations; `Some(Some(id))`: one annotation.
        annotations: Option<Option<&'a str>>,
    },
    /// `/rest/required-builds/{v}/projects/{p}/repos/{r}/condition[/{id}]` and `.../conditions`
    /// (Data Center 7.14+).
    RequiredBuilds {
        project: &'a str,
        slug: &'a str,
        id: Option<&'a str>,
        list: bool,
    },
    /// `GET /rest/api/{v}/projects/{p}/repos/{r}/commits`.
    Commits { project: &'a str, slug: &'a str },
    /// `GET /rest/api/{v}/projects/{p}/repos/{r}/commits/{c}/pull-requests`.
    CommitPullRequests {
        project: &'a str,
        slug: &'a str,
        commit: &'a str,
    },
    /// `/2.0/repositories/{ws}/{slug}/commit/{c}/reports[/{id}[/annotations[/{annotationId}]]]`.
    CloudReports {
        ws: &'a str,
        slug: &'a str,
        commit: &'a str,
        id: Option<&'a str>,
        /// As for `Insights`.
        annotations: Option<Option<&'a str>>,
    },
    /// `GET /2.0/repositories/{ws}/{slug}/commits[/{revision}]`.
    CloudCommits {
        ws: &'a str,
        slug: &'a str,
        revision: Option<&'a str>,
    },
    /// `GET /2.0/repositories/{ws}/{slug}/commit/{c}/pullrequests`.
    CloudCommitPullRequests {
        ws: &'a str,
        slug: &'a str,
        commit: &'a str,
    },
    /// `GET /rest/api/{v}/projects/{p}/repos/{r}/commits/{c}/changes`: the files a commit
    /// touched.
    CommitChanges {
        project: &'a str,
        slug: &'a str,
        commit: &'a str,
    },
    /// `GET /2.0/repositories/{ws}/{slug}/diffstat/{spec}`: the files a commit touched.
    CloudDiffstat {
        ws: &'a str,
        slug: &'a str,
        spec: &'a str,
    },
}

pub(super) fn route<'a>(flavour: &BitbucketFlavour, segs: &'a [&'a str]) -> Option<ExtraRoute<'a>> {
    let dc = matches!(flavour, BitbucketFlavour::DataCenter { .. });
    let cloud = matches!(flavour, BitbucketFlavour::Cloud);
    // Bitbucket Server had the commits API and (from 5.15) Code Insights too.
    let server_like = !cloud;
    let version = flavour.version();
    let deployments = dc && version >= Some((7, 16));
    let insights = server_like && version >= Some((5, 15));
    let v = |v: &str| v == "1.0" || v == "latest";
    use ExtraRoute as R;
    Some(match segs {
        ["rest", "capabilities"] if dc => R::Capabilities,
        ["rest", "api", ver, "deployment", "capabilities"] if deployments && v(ver) => {
            R::DeploymentCapabilities
        }
        [
            "rest",
            "api",
            ver,
            "projects",
            project,
            "repos",
            slug,
            "commits",
            commit,
            "deployments",
        ] if deployments && v(ver) => R::Deployments {
            project,
            slug,
            commit,
        },
        [
            "rest",
            "api",
            ver,
            "projects",
            project,
            "repos",
            slug,
            "commits",
        ] if server_like && v(ver) => R::Commits { project, slug },
        [
            "rest",
            "api",
            ver,
            "projects",
            project,
            "repos",
            slug,
            "commits",
            commit,
            "pull-requests",
        ] if server_like && v(ver) => R::CommitPullRequests {
            project,
            slug,
            commit,
        },
        [
            "rest",
            "api",
            ver,
            "projects",
            project,
            "repos",
            slug,
            "commits",
            commit,
            "changes",
        ] if server_like && v(ver) => R::CommitChanges {
            project,
            slug,
            commit,
        },
        ["2.0", "repositories", ws, slug, "diffstat", spec] if cloud => {
            R::CloudDiffstat { ws, slug, spec }
        }
        [
            "rest",
            "insights",
            ver,
            "projects",
            project,
            "repos",
            slug,
            "commits",
            commit,
            rest @ ..,
        ] if insights && v(ver) => {
            let (key, annotations) = match rest {
                ["reports"] => (None, None),
                ["reports", key] => (Some(*key), None),
                ["reports", key, "annotations"] => (Some(*key), Some(None)),
                ["reports", key, "annotations", ext] => (Some(*key), Some(Some(*ext))),
                ["annotations"] => (None, Some(None)),
                _ => return None,
            };
            R::Insights {
                project,
                slug,
                commit,
                key,
                annotations,
            }
        }
        ["2.0", "repositories", ws, slug, "commit", commit, rest @ ..] if cloud => {
            let (id, annotations) = match rest {
                ["reports"] => (None, None),
                ["reports", id] => (Some(*id), None),
                ["reports", id, "annotations"] => (Some(*id), Some(None)),
                ["reports", id, "annotations", ann] => (Some(*id), Some(Some(*ann))),
                ["pullrequests"] => return Some(R::CloudCommitPullRequests { ws, slug, commit }),
                _ => return None,
            };
            R::CloudReports {
                ws,
                slug,
                commit,
                id,
                annotations,
            }
        }
        [
            "rest",
            "required-builds",
            ver,
            "projects",
            project,
            "repos",
            slug,
            rest @ ..,
        ] if dc && version >= Some((7, 14)) && v(ver) => {
            let (id, list) = match rest {
                ["condition"] => (None, false),
                ["condition", id] => (Some(*id), false),
                ["conditions"] => (None, true),
                _ => return None,
            };
            R::RequiredBuilds {
                project,
                slug,
                id,
                list,
            }
        }
        ["2.0", "repositories", ws, slug, "commits"] if cloud => R::CloudCommits {
            ws,
            slug,
            revision: None,
        },
        ["2.0", "repositories", ws, slug, "commits", revision] if cloud => R::CloudCommits {
            ws,
            slug,
            revision: Some(revision),
        },
        _ => return None,
    })
}

/// A repository's identity in the extra stores: (project key upper case, slug) on Data Center,
/// (workspace, slug) lower case on Cloud, as `Inner::repo_key` makes it.
pub(super) type RepoId = (String, String);

/// State of the extra endpoints.
#[derive(Default)]
pub(super) struct ExtraStore {
    /// Whether deployments are switched off (`plugin.deployment.capability.disabled`).
    pub(super) deployments_disabled: bool,
    /// Every accepted deployment POST, in order.
    pub(super) deployments: Vec<PostedDeployment>,
    /// Identity tuple → index into `deployments` of the latest POST; DELETE removes it.
    pub(super) current_deployments: HashMap<(RepoId, String, String, String, i64), usize>,
    /// Current reports (both flavours), keyed by (repository, commit, key); `seq` orders them.
    pub(super) reports: HashMap<(RepoId, String, String), StoredReport>,
    /// PUTs per (repository, commit, key), never reset by DELETE.
    pub(super) report_puts: HashMap<(RepoId, String, String), usize>,
    /// Annotations per report.
    pub(super) annotations: HashMap<(RepoId, String, String), Vec<StoredAnnotation>>,
    /// Sequence number for reports and annotations.
    pub(super) seq: u64,
    /// Commit graphs per repository, in the order added.
    pub(super) commits: HashMap<RepoId, Vec<FakeCommit>>,
    /// Pull requests per repository.
    pub(super) pull_requests: HashMap<RepoId, Vec<FakePullRequest>>,
    /// Data Center `nextPageStart` values issued: (page key, start) → real offset.
    pub(super) issued_starts: HashMap<(String, usize), usize>,
    /// Cloud iterator tokens issued: token → (page key, real offset).
    pub(super) cloud_tokens: HashMap<String, (String, usize)>,
    /// Cloud "PRs for a commit" requests answered 202 so far, per (repository, commit).
    pub(super) pr_index_polls: HashMap<(RepoId, String), u32>,
    /// Required-builds conditions, per repository, in creation order.
    pub(super) required_builds: Vec<(RepoId, Value)>,
    /// Commits whose pull-request index is ready.
    pub(super) pr_indexed: HashSet<(RepoId, String)>,
}

/// Gap added to every Data Center `nextPageStart`, so that `start + limit` is never a valid start.
const START_GAP: usize = 7;

impl Inner {
    /// Is `user` (as `authenticate` names it) a repository admin?
    pub(super) fn is_admin(&self, user: &str) -> bool {
        match &self.opts.admins {
            None => true,
            Some(list) => list
                .iter()
                .any(|a| a == user || user.strip_prefix("token:") == Some(a.as_str())),
        }
    }

    /// The answer for one of the extra routes.
    pub(super) fn extra(
        &self,
        route: ExtraRoute<'_>,
        method: &Method,
        query: &[(String, String)],
        body: &[u8],
        user: &str,
        path: &str,
    ) -> Response {
        use ExtraRoute as R;
        let not_allowed = || {
            if self.cloud() {
                cloud_error(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed", None)
            } else {
                dc_error(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed", "")
            }
        };
        match route {
            R::Capabilities if *method == Method::GET => self.capabilities_index(),
            R::DeploymentCapabilities if *method == Method::GET => {
                if lock(&self.extra).deployments_disabled {
                    return self.extra_not_found(path);
                }
                axum::Json(json!({})).into_response()
            }
            R::Deployments {
                project,
                slug,
                commit,
            } => {
                if lock(&self.extra).deployments_disabled {
                    return self.extra_not_found(path);
                }
                if let Err(r) = self.check_repo(project, slug) {
                    return r;
                }
                match *method {
                    Method::POST => self.deployment_post(project, slug, commit, body, user),
                    Method::GET => self.deployment_get(project, slug, commit, query, None),
                    Method::DELETE => self.deployment_get(project, slug, commit, query, Some(user)),
                    _ => not_allowed(),
                }
            }
            R::Insights {
                project,
                slug,
                commit,
                key,
                annotations,
            } => {
                if let Err(r) = self.check_repo(project, slug) {
                    return r;
                }
                self.insights(
                    project,
                    slug,
                    commit,
                    key,
                    annotations,
                    method,
                    query,
                    body,
                    user,
                )
            }
            R::RequiredBuilds {
                project,
                slug,
                id,
                list,
            } => {
                if let Err(r) = self.check_repo(project, slug) {
                    return r;
                }
                self.required_builds(project, slug, id, list, method, query, body, user)
            }
            R::Commits { project, slug } if *method == Method::GET => {
                if let Err(r) = self.check_repo(project, slug) {
                    return r;
                }
                self.dc_commits(project, slug, query, path)
            }
            R::CommitPullRequests {
                project,
                slug,
                commit,
            } if *method == Method::GET => {
                if let Err(r) = self.check_repo(project, slug) {
                    return r;
                }
                self.dc_commit_prs(project, slug, commit, query, path)
            }
            R::CloudReports {
                ws,
                slug,
                commit,
                id,
                annotations,
            } => {
                if let Err(r) = self.check_repo(ws, slug) {
                    return r;
                }
                self.cloud_reports(ws, slug, commit, id, annotations, method, query, body, user)
            }
            R::CloudCommits { ws, slug, revision }
                if *method == Method::GET || *method == Method::POST =>
            {
                if let Err(r) = self.check_repo(ws, slug) {
                    return r;
                }
                // POST: the same query as a form body (for long include/exclude lists).
                let mut all = query.to_vec();
                if *method == Method::POST {
                    all.extend(
                        url::form_urlencoded::parse(body)
                            .map(|(k, v)| (k.into_owned(), v.into_owned())),
                    );
                }
                self.cloud_commits(ws, slug, revision, &all, path)
            }
            R::CommitChanges {
                project,
                slug,
                commit,
            } if *method == Method::GET => {
                if let Err(r) = self.check_repo(project, slug) {
                    return r;
                }
                self.dc_commit_changes(project, slug, commit, query, path)
            }
            R::CloudDiffstat { ws, slug, spec } if *method == Method::GET => {
                if let Err(r) = self.check_repo(ws, slug) {
                    return r;
                }
                self.cloud_diffstat(ws, slug, spec)
            }
            R::CloudCommitPullRequests { ws, slug, commit } if *method == Method::GET => {
                if let Err(r) = self.check_repo(ws, slug) {
                    return r;
                }
                self.cloud_commit_prs(ws, slug, commit, query, path)
            }
            _ => not_allowed(),
        }
    }

    /// `GET /rest/capabilities`: the map of capability URLs (shape of JBP's fixture).
    pub(super) fn capabilities_index(&self) -> Response {
        let mut caps = serde_json::Map::new();
        if self.opts.flavour.rich() {
            caps.insert(
                "buildStatus".to_owned(),
                json!(format!("{}/rest/api/latest/build/capabilities", self.base)),
            );
        }
        if self.opts.flavour.version() >= Some((7, 16)) && !lock(&self.extra).deployments_disabled {
            caps.insert(
                "deployment".to_owned(),
                json!(format!(
                    "{}/rest/api/latest/deployment/capabilities",
                    self.base
                )),
            );
        }
        axum::Json(json!({"application": "stash", "capabilities": caps})).into_response()
    }

    pub(super) fn extra_not_found(&self, path: &str) -> Response {
        if self.cloud() {
            cloud_error(StatusCode::NOT_FOUND, "Resource not found", None)
        } else {
            dc_error(
                StatusCode::NOT_FOUND,
                format!("No resource found for {path}"),
                "",
            )
        }
    }

    /// One Data Center page of `items`: honours `start` (0 or a `nextPageStart` this fake issued
    /// for the same `page_key`) and `limit` (default 25, clamped to `max_page_limit`), and issues
    /// a non-contiguous `nextPageStart`.
    pub(super) fn dc_page(
        &self,
        items: Vec<Value>,
        query: &[(String, String)],
        page_key: &str,
    ) -> Response {
        let param = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let start = match param("start").map(str::parse::<usize>) {
            None => 0,
            Some(Ok(s)) => s,
            Some(Err(_)) => return bad_param("start", "start must be a non-negative integer"),
        };
        let limit = match param("limit").map(str::parse::<usize>) {
            None | Some(Ok(0)) => 25,
            Some(Ok(l)) => l,
            Some(Err(_)) => return bad_param("limit", "limit must be a positive integer"),
        }
        .min(self.opts.max_page_limit.max(1));
        let offset = if start == 0 {
            0
        } else {
            match lock(&self.extra)
                .issued_starts
                .get(&(page_key.to_owned(), start))
            {
                Some(o) => *o,
                None => {
                    return bad_param(
                        "start",
                        &format!(
                            "start={start} is not a nextPageStart this server returned for this \
                             listing; page with nextPageStart, never with start+limit"
                        ),
                    );
                }
            }
        };
        let total = items.len();
        let values: Vec<Value> = items.into_iter().skip(offset).take(limit).collect();
        let size = values.len();
        let last = offset + size >= total;
        let mut body = json!({
            "size": size,
            "limit": limit,
            "start": start,
            "isLastPage": last,
            "values": values,
        });
        if !last {
            let next = start + size + START_GAP;
            lock(&self.extra)
                .issued_starts
                .insert((page_key.to_owned(), next), offset + size);
            body["nextPageStart"] = json!(next);
        }
        axum::Json(body).into_response()
    }

    /// A JSON repository object (Data Center `RestRepository`, Cloud `repository`).
    pub(super) fn repo_json(&self, owner: &str, slug: &str) -> Value {
        let (o, s) = self.repo_key(owner, slug);
        if self.cloud() {
            json!({
                "type": "repository",
                "full_name": format!("{o}/{s}"),
                "name": s,
                "links": {"html": {"href": format!("{}/{o}/{s}", self.base)}},
            })
        } else {
            json!({
                "slug": s,
                "id": stable_id(&format!("{o}/{s}")),
                "name": s,
                "scmId": "git",
                "state": "AVAILABLE",
                "forkable": true,
                "public": false,
                "project": {"key": o, "id": stable_id(&o), "name": o, "type": "NORMAL"},
                "links": {"self": [{"href": format!("{}/projects/{o}/repos/{s}/browse", self.base)}]},
            })
        }
    }
}

/// A small positive id derived from a name.
pub(super) fn stable_id(name: &str) -> u64 {
    use sha2::Digest;
    let d = sha2::Sha256::digest(name.as_bytes());
    u64::from(u32::from_be_bytes([d[0], d[1], d[2], d[3]]) >> 12) + 1
}

pub(super) fn bad_param(context: &str, msg: &str) -> Response {
    dc_errors(
        StatusCode::BAD_REQUEST,
        &[(Some(context), msg.to_owned())],
        "com.atlassian.bitbucket.validation.ArgumentValidationException",
    )
}

/// Is `s` an absolute http(s) URL?
pub(super) fn is_http_url(s: &str) -> bool {
    url::Url::parse(s)
        .map(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
        .unwrap_or(false)
}

/// Does the http(s) URL `s` point at this machine (refused by Bitbucket Cloud)?
pub(super) fn is_local_url(s: &str) -> bool {
    url::Url::parse(s)
        .ok()
        .and_then(|u| u.host_str().map(str::to_ascii_lowercase))
        .is_some_and(|h| {
            h == "localhost"
                || h.ends_with(".localhost")
                || h.starts_with("127.")
                || h == "[::1]"
                || h == "::1"
                || h == "0.0.0.0"
        })
}
