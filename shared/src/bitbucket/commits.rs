//! Changelog sources: the commits between two commits of a repository, and the pull requests a
//! commit came from, read from Bitbucket Data Center (`/commits?since=&until=`, paged by
//! `nextPageStart`) or Cloud (`/commits/{until}?exclude={since}`, paged by following `next`).
//!
//! Paging follows each server's own word: Data Center's `nextPageStart` (never `start + limit`:
//! pages need not be contiguous), Cloud's `next` link verbatim, and only to the configured host.

use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use url::Url;

use super::client::BitbucketClient;
use super::request::ApiKind;
use super::request::segment;
use crate::config::join_url;
use crate::net::{self, Idempotence, SendError};

/// A repository on the configured Bitbucket: Data Center project key (or Cloud workspace) and
/// slug, as a project names it (`PROJ/web`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepositoryRef {
    pub owner: String,
    pub slug: String,
}

impl RepositoryRef {
    /// `OWNER/slug`; `None` unless exactly two non-empty parts of letters, digits, `-`, `_`,
    /// `.` and (for a personal project) a leading `~`.
    pub fn parse(s: &str) -> Option<RepositoryRef> {
        let (owner, slug) = s.split_once('/')?;
        let part = |p: &str, tilde: bool| {
            let p = if tilde {
                p.strip_prefix('~').unwrap_or(p)
            } else {
                p
            };
            !p.is_empty()
                && p.len() <= 128
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        };
        (part(owner, true) && part(slug, false)).then(|| RepositoryRef {
            owner: owner.to_string(),
            slug: slug.to_string(),
        })
    }
}

/// One commit of a changelog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitInfo {
    pub id: String,
    /// The first line of its message.
    pub summary: String,
    pub author: String,
    pub authored_at: Option<DateTime<Utc>>,
}

/// A pull request a commit is part of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullRequestRef {
    pub id: u64,
    pub title: String,
    /// `OPEN`, `MERGED`, `DECLINED` (Cloud also `SUPERSEDED`).
    pub state: String,
    pub url: Option<String>,
}

/// Commits `until` has and `since` has not, newest first, at most `max` of them; the flag says
/// whether that was all of them.
pub type CommitRange = (Vec<CommitInfo>, bool);

/// Largest page asked for.
const PAGE: usize = 100;

impl BitbucketClient {
    async fn get_json(&self, url: &str) -> Result<(u16, Value), SendError> {
        let resp = net::send(
            || self.authed_get(url),
            self.policy(),
            Idempotence::Idempotent,
        )
        .await?;
        let status = resp.status().as_u16();
        let text = resp
            .text()
            .await
            .map_err(|e| SendError::Other(format!("reading {url}: {e}")))?;
        if text.trim().is_empty() {
            return Ok((status, Value::Null));
        }
        let value = serde_json::from_str(&text)
            .map_err(|e| SendError::Other(format!("{url} answered something not JSON: {e}")))?;
        Ok((status, value))
    }

    /// The commits `until` has and `since` has not (all of `until`'s history when `since` is
    /// `None`), newest first, touching `path` when given, at most `max`.
    pub async fn commits_between(
        &self,
        repo: &RepositoryRef,
        since: Option<&str>,
        until: &str,
        path: Option<&str>,
        max: usize,
    ) -> Result<CommitRange, SendError> {
        let cloud = self.api().await? == ApiKind::Cloud;
        let mut url = if cloud {
            self.repo_url(repo, true, &format!("/commits/{}", segment(until)))?
        } else {
            self.repo_url(repo, false, "/commits")?
        };
        {
            let mut q = url.query_pairs_mut();
            match (cloud, since) {
                (true, Some(s)) => {
                    q.append_pair("exclude", s);
                }
                (false, s) => {
                    q.append_pair("until", until);
                    if let Some(s) = s {
                        q.append_pair("since", s);
                    }
                }
                (true, None) => {}
            }
            if let Some(p) = path {
                q.append_pair("path", p);
            }
        }
        let mut out = Vec::new();
        let complete = self
            .each_value(cloud, url, PAGE.min(max.max(1)), |v| {
                if out.len() == max {
                    return false;
                }
                out.push(if cloud { cloud_commit(v) } else { dc_commit(v) });
                true
            })
            .await?;
        Ok((out, complete))
    }

    /// `base` + the repository's path (`/rest/api/latest/projects/{p}/repos/{r}` on Data
    /// Center, `/2.0/repositories/{ws}/{r}` on Cloud) + `rest`.
    fn repo_url(&self, repo: &RepositoryRef, cloud: bool, rest: &str) -> Result<Url, SendError> {
        let path = if cloud {
            format!(
                "/2.0/repositories/{}/{}{rest}",
                segment(&repo.owner),
                segment(&repo.slug)
            )
        } else {
            format!(
                "/rest/api/latest/projects/{}/repos/{}{rest}",
                segment(&repo.owner),
                segment(&repo.slug)
            )
        };
        Url::parse(&join_url(self.base(), &path)).map_err(|e| SendError::Other(e.to_string()))
    }

    /// Hands every value of a paged listing to `visit` until it returns false; `true` when the
    /// listing was read to its end. Data Center pages by `start=nextPageStart` (never
    /// `start + limit`), Cloud by following `next` verbatim, only to the configured host.
    async fn each_value(
        &self,
        cloud: bool,
        first: Url,
        per_page: usize,
        mut visit: impl FnMut(&Value) -> bool,
    ) -> Result<bool, SendError> {
        let mut url = first.clone();
        url.query_pairs_mut().append_pair(
            if cloud { "pagelen" } else { "limit" },
            &per_page.to_string(),
        );
        let mut next = Some(url.to_string());
        while let Some(url) = next.take() {
            let (_, page) = self.get_json(&url).await?;
            for v in page["values"].as_array().into_iter().flatten() {
                if !visit(v) {
                    return Ok(false);
                }
            }
            next = if cloud {
                page["next"]
                    .as_str()
                    .map(|n| self.same_origin(n))
                    .transpose()?
            } else {
                match page["nextPageStart"].as_u64() {
                    Some(start) if page["isLastPage"].as_bool() == Some(false) => {
                        let mut u = first.clone();
                        u.query_pairs_mut()
                            .append_pair("limit", &per_page.to_string())
                            .append_pair("start", &start.to_string());
                        Some(u.to_string())
                    }
                    _ => None,
                }
            };
        }
        Ok(true)
    }

    /// A `next` link, if it points at the configured Bitbucket (never follow one elsewhere:
    /// the credentials would go with it).
    fn same_origin(&self, link: &str) -> Result<String, SendError> {
        let url = Url::parse(link)
            .map_err(|e| SendError::Other(format!("a next link that is not a URL: {e}")))?;
        if url.origin() != self.base().origin() {
            return Err(SendError::Other(format!(
                "Bitbucket's next link points at another host ({}); not followed",
                url.host_str().unwrap_or("?")
            )));
        }
        Ok(url.to_string())
    }

    /// The pull requests `commit` is part of; `None` while Bitbucket Cloud is still indexing the
    /// commit's pull requests (202): ask again later.
    pub async fn pull_requests_of(
        &self,
        repo: &RepositoryRef,
        commit: &str,
    ) -> Result<Option<Vec<PullRequestRef>>, SendError> {
        let cloud = self.api().await? == ApiKind::Cloud;
        let url = if cloud {
            self.repo_url(
                repo,
                true,
                &format!("/commit/{}/pullrequests?pagelen=50", segment(commit)),
            )?
        } else {
            self.repo_url(
                repo,
                false,
                &format!("/commits/{}/pull-requests?limit=50", segment(commit)),
            )?
        };
        let (status, page) = self.get_json(url.as_str()).await?;
        if status == 202 {
            return Ok(None);
        }
        let prs = page["values"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| PullRequestRef {
                id: v["id"].as_u64().unwrap_or_default(),
                title: text(&v["title"]),
                state: text(&v["state"]),
                url: if cloud {
                    v["links"]["html"]["href"].as_str().map(str::to_owned)
                } else {
                    v["links"]["self"][0]["href"].as_str().map(str::to_owned)
                },
            })
            .collect();
        Ok(Some(prs))
    }

    /// The files `commit` touched (for a project that names paths): Data Center's
    /// `/commits/{id}/changes`, Cloud's `/diffstat/{id}`, every page. A file renamed counts
    /// under both names.
    pub async fn changed_paths(
        &self,
        repo: &RepositoryRef,
        commit: &str,
    ) -> Result<Vec<String>, SendError> {
        let cloud = self.api().await? == ApiKind::Cloud;
        let (url, sides, per_page): (_, [&[&str]; 2], _) = if cloud {
            let url = self.repo_url(repo, true, &format!("/diffstat/{}", segment(commit)))?;
            (url, [&["new", "path"], &["old", "path"]], 500)
        } else {
            let url = self.repo_url(
                repo,
                false,
                &format!("/commits/{}/changes", segment(commit)),
            )?;
            (url, [&["path", "toString"], &["srcPath", "toString"]], 1000)
        };
        let mut out: Vec<String> = Vec::new();
        self.each_value(cloud, url, per_page, |v| {
            for side in sides {
                if let Some(p) = v[side[0]][side[1]].as_str()
                    && !out.iter().any(|o| o == p)
                {
                    out.push(p.to_string());
                }
            }
            true
        })
        .await?;
        Ok(out)
    }
}

fn text(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

fn summary(message: &str) -> String {
    message
        .lines()
        .next()
        .unwrap_or_default()
        .chars()
        .take(200)
        .collect()
}

fn dc_commit(v: &Value) -> CommitInfo {
    let author = &v["author"];
    CommitInfo {
        id: text(&v["id"]),
        summary: summary(v["message"].as_str().unwrap_or_default()),
        author: author["displayName"]
            .as_str()
            .or(author["name"].as_str())
            .unwrap_or_default()
            .to_string(),
        authored_at: v["authorTimestamp"]
            .as_i64()
            .and_then(|ms| Utc.timestamp_millis_opt(ms).single()),
    }
}

fn cloud_commit(v: &Value) -> CommitInfo {
    let author = &v["author"];
    let raw = author["raw"].as_str().unwrap_or_default();
    // `Name <email>`: the name.
    let from_raw = raw.split('<').next().unwrap_or(raw).trim();
    CommitInfo {
        id: text(&v["hash"]),
        summary: summary(v["message"].as_str().unwrap_or_default()),
        author: author["user"]["display_name"]
            .as_str()
            .unwrap_or(from_raw)
            .to_string(),
        authored_at: v["date"]
            .as_str()
            .and_then(|d| DateTime::parse_from_rfc3339(d).ok())
            .map(|d| d.with_timezone(&Utc)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_names_are_owner_and_slug() {
        let r = RepositoryRef::parse("PROJ/web").unwrap();
        assert_eq!((r.owner.as_str(), r.slug.as_str()), ("PROJ", "web"));
        assert!(RepositoryRef::parse("~jdoe/dotfiles").is_some());
        for bad in [
            "",
            "PROJ",
            "PROJ/",
            "/web",
            "a/b/c",
            "PROJ/we b",
            "PR~OJ/web",
        ] {
            assert!(RepositoryRef::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn commits_read_from_either_shape() {
        let dc = serde_json::json!({"id": "a".repeat(40), "message": "Fix it\n\nlong",
            "author": {"name": "jdoe", "displayName": "Jane Doe"}, "authorTimestamp": 1_700_000_000_000_i64});
        let c = dc_commit(&dc);
        assert_eq!(
            (c.summary.as_str(), c.author.as_str()),
            ("Fix it", "Jane Doe")
        );
        assert_eq!(c.authored_at.unwrap().timestamp(), 1_700_000_000);
        let cloud = serde_json::json!({"hash": "b".repeat(40), "message": "Add\n",
            "author": {"raw": "Jo Bloggs <jo@example.com>"}, "date": "2026-01-02T03:04:05+00:00"});
        let c = cloud_commit(&cloud);
        assert_eq!(
            (c.summary.as_str(), c.author.as_str()),
            ("Add", "Jo Bloggs")
        );
    }
}
