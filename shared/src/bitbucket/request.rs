//! The request that posts a [`CommitStatus`] to each Bitbucket build-status API: path, JSON body
//! and state, with every field fitted to the API's limits. Also the reading of Data Center's
//! build capabilities, which decides between the APIs when `BITBUCKET_API=auto`.
//!
//! | API | path | state words | limits |
//! |---|---|---|---|
//! | legacy | `/rest/build-status/1.0/commits/{sha}` | INPROGRESS, SUCCESSFUL, FAILED | every field 255, url 450 |
//! | repository (DC) | `/rest/api/latest/projects/{KEY}/repos/{slug}/commits/{sha}/builds` | + CANCELLED with `cancelledStatus` | key, name, description, parent 255; url 450 |
//! | cloud | `/2.0/repositories/{workspace}/{slug}/commit/{sha}/statuses/build` | INPROGRESS, SUCCESSFUL, FAILED, STOPPED | key 40; name, description 255 |
//!
//! Lengths are counted in UTF-16 code units, as Java (Server, Data Center) counts them, which is
//! never less than Python's (Cloud) count of code points. Text is cut on a character boundary,
//! not inside a combining sequence, and ends with `…`. A key that is too long keeps a prefix and
//! gets a short hash of the whole key, so distinct pipelines never share a key. A URL cannot be
//! cut: its query and fragment are dropped if that is enough, else the status is skipped. A ref
//! that is too long is left out, never cut (a cut ref would name another branch).

use std::borrow::Cow;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use url::Url;

use super::repo;
use crate::status::{CommitStatus, LogicalState, Skip};

/// The build-status API a status is posted to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApiKind {
    /// Server and Data Center, commit-scoped (deprecated since 7.14, still served).
    Legacy,
    /// Data Center >= 7.4, repository-scoped; `cancelled` when the server has `cancelledStatus`.
    Repository { cancelled: bool },
    /// Bitbucket Cloud.
    Cloud,
}

impl ApiKind {
    pub fn name(&self) -> &'static str {
        match self {
            ApiKind::Legacy => "legacy",
            ApiKind::Repository { .. } => "repository",
            ApiKind::Cloud => "cloud",
        }
    }

    /// The longest key the API accepts.
    pub fn key_limit(&self) -> usize {
        match self {
            ApiKind::Legacy | ApiKind::Repository { .. } => 255,
            ApiKind::Cloud => 40,
        }
    }

    /// The longest URL the API accepts, if it documents one.
    pub fn url_limit(&self) -> Option<usize> {
        match self {
            ApiKind::Legacy | ApiKind::Repository { .. } => Some(450),
            ApiKind::Cloud => None,
        }
    }
}

/// A state word of one of the APIs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum BitbucketState {
    Inprogress,
    Successful,
    Failed,
    /// Data Center with `cancelledStatus` only.
    Cancelled,
    /// Cloud only.
    Stopped,
}

impl BitbucketState {
    pub fn as_str(self) -> &'static str {
        match self {
            BitbucketState::Inprogress => "INPROGRESS",
            BitbucketState::Successful => "SUCCESSFUL",
            BitbucketState::Failed => "FAILED",
            BitbucketState::Cancelled => "CANCELLED",
            BitbucketState::Stopped => "STOPPED",
        }
    }
}

/// The API's word for a logical state (the table in [`crate::status`]).
pub fn state_for(api: &ApiKind, logical: LogicalState) -> BitbucketState {
    use BitbucketState::*;
    match (logical, api) {
        (LogicalState::InProgress, _) => Inprogress,
        (LogicalState::Successful, _) => Successful,
        (LogicalState::Failed, _) => Failed,
        (LogicalState::Blocked, ApiKind::Cloud) => Stopped,
        (LogicalState::Blocked, _) => Failed,
        (LogicalState::Canceled | LogicalState::Skipped, ApiKind::Cloud) => Stopped,
        (
            LogicalState::Canceled | LogicalState::Skipped,
            ApiKind::Repository { cancelled: true },
        ) => Cancelled,
        (LogicalState::Canceled | LogicalState::Skipped, _) => Failed,
    }
}

/// A request ready to send (or to keep in the outbox and send later).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusRequest {
    /// Always `POST`.
    pub method: String,
    /// Relative to the Bitbucket base URL (which may have a context path), starting with `/`.
    pub path: String,
    pub body: StatusBody,
    pub state: BitbucketState,
}

/// The JSON body of a status post, fitted to its API's limits. The optional fields are those
/// only some APIs take (see [`build_request`]); an absent one is left out of the JSON. The
/// outbox keeps the body as it is posted, so records written when it was an untyped JSON
/// object read back the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusBody {
    pub key: String,
    pub state: BitbucketState,
    pub url: String,
    pub name: String,
    pub description: String,
    /// Data Center's repository API: the build number, as text.
    #[serde(
        rename = "buildNumber",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub build_number: Option<String>,
    /// Data Center's repository API: the key of the build this one belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Data Center's repository API: the full ref built (`refs/heads/main`).
    #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
    pub git_ref: Option<String>,
    /// Data Center's repository API: milliseconds, once the build is final.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<u64>,
    /// Cloud: the branch or tag name, matched against a pull request's source branch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refname: Option<String>,
}

impl StatusBody {
    /// A body with the fields every API takes, and none of the others.
    pub fn new(
        key: String,
        state: BitbucketState,
        url: String,
        name: String,
        description: String,
    ) -> Self {
        StatusBody {
            key,
            state,
            url,
            name,
            description,
            build_number: None,
            parent: None,
            git_ref: None,
            duration: None,
            refname: None,
        }
    }
}

const NAME_LIMIT: usize = 255;
const DESCRIPTION_LIMIT: usize = 255;
const REF_LIMIT: usize = 255;

/// Builds the request that posts `status` with `api` to the Bitbucket at `bitbucket_url`.
///
/// Skips (with the reason) a status whose repository is not on that Bitbucket, or which the API
/// cannot address: the repository and Cloud APIs need the pipeline's clone URL; the legacy API
/// does not, but when the URL is known and on another host, nothing is posted either.
pub fn build_request(
    api: &ApiKind,
    bitbucket_url: &Url,
    status: &CommitStatus,
) -> Result<StatusRequest, Skip> {
    let commit = crate::status::full_sha(&status.commit).ok_or_else(|| Skip::NotAFullSha {
        commit: status.commit.chars().take(64).collect(),
    })?;
    let path = path_for(api, bitbucket_url, status, &commit)?;

    let state = state_for(api, status.logical);
    let url = match api.url_limit() {
        Some(max) => fit_url(&status.url, max).ok_or_else(|| Skip::UrlTooLong {
            length: utf16_len(&status.url),
            max,
            api: api.name().to_owned(),
        })?,
        None => Cow::Borrowed(status.url.as_str()),
    };
    let mut body = StatusBody::new(
        fit_key(&status.key, api.key_limit()).into_owned(),
        state,
        url.into_owned(),
        fit_text(&status.name, NAME_LIMIT).into_owned(),
        fit_text(&status.description, DESCRIPTION_LIMIT).into_owned(),
    );
    match api {
        ApiKind::Legacy => {}
        ApiKind::Repository { .. } => {
            body.build_number = Some(status.build_number.to_string());
            body.parent = Some(fit_key(&status.parent, api.key_limit()).into_owned());
            body.git_ref = status
                .ref_name
                .as_deref()
                .filter(|r| utf16_len(r) <= REF_LIMIT)
                .map(str::to_owned);
            body.duration = status.duration_ms.filter(|_| status.logical.is_final());
        }
        ApiKind::Cloud => {
            // Cloud matches `refname` against the pull request's source branch name.
            let short = status.ref_name.as_deref().map(|r| {
                r.strip_prefix("refs/heads/")
                    .or_else(|| r.strip_prefix("refs/tags/"))
                    .unwrap_or(r)
            });
            body.refname = short
                .filter(|r| utf16_len(r) <= REF_LIMIT)
                .map(str::to_owned);
        }
    }
    Ok(StatusRequest {
        method: "POST".to_owned(),
        path,
        body,
        state,
    })
}

/// Where the status goes, once the repository is known to be on this Bitbucket.
fn path_for(
    api: &ApiKind,
    bitbucket_url: &Url,
    status: &CommitStatus,
    commit: &str,
) -> Result<String, Skip> {
    let not_on_bitbucket = |clone_url: &str| Skip::NotOnBitbucket {
        url: repo::redact(clone_url),
        bitbucket: repo::bitbucket_host(bitbucket_url).unwrap_or_else(|| "no host".to_owned()),
    };
    let unusable = |clone_url: &str, problem: repo::RepoError| Skip::UnusableRepository {
        url: repo::redact(clone_url),
        api: api.name().to_owned(),
        problem: problem.to_string(),
    };
    let repository = status.repository.as_deref();
    let required = || {
        repository.ok_or_else(|| Skip::MissingRepository {
            api: api.name().to_owned(),
        })
    };
    match api {
        ApiKind::Legacy => {
            if let Some(clone_url) = repository
                && !repo::is_on_bitbucket(clone_url, bitbucket_url)
            {
                return Err(not_on_bitbucket(clone_url));
            }
            Ok(format!("/rest/build-status/1.0/commits/{commit}"))
        }
        ApiKind::Repository { .. } => {
            let clone_url = required()?;
            let r = repo::parse_server_on(clone_url, bitbucket_url)
                .ok_or_else(|| not_on_bitbucket(clone_url))?
                .map_err(|e| unusable(clone_url, e))?;
            Ok(format!(
                "/rest/api/latest/projects/{}/repos/{}/commits/{commit}/builds",
                segment(&r.project_key),
                segment(&r.slug),
            ))
        }
        ApiKind::Cloud => {
            let clone_url = required()?;
            // Cloud repositories live on bitbucket.org whatever API URL is configured (a test
            // double may serve the API elsewhere), so the clone URL alone decides.
            let r = repo::parse_cloud(clone_url).map_err(|e| match e {
                repo::RepoError::NotCloud(_) => Skip::NotOnBitbucket {
                    url: repo::redact(clone_url),
                    bitbucket: repo::CLOUD_HOST.to_owned(),
                },
                other => unusable(clone_url, other),
            })?;
            Ok(format!(
                "/2.0/repositories/{}/{}/commit/{commit}/statuses/build",
                segment(&r.workspace),
                segment(&r.slug),
            ))
        }
    }
}

/// Everything but RFC 3986's unreserved characters is percent-encoded in a path segment.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

pub(crate) fn segment(s: &str) -> String {
    utf8_percent_encode(s, SEGMENT).to_string()
}

/// Length as Java counts it (UTF-16 code units).
pub fn utf16_len(s: &str) -> usize {
    s.chars().map(char::len_utf16).sum()
}

const ELLIPSIS: char = '\u{2026}';

/// `s` cut to at most `max` UTF-16 units, ending with `…` when cut.
pub fn fit_text(s: &str, max: usize) -> Cow<'_, str> {
    if utf16_len(s) <= max {
        return Cow::Borrowed(s);
    }
    if max == 0 {
        return Cow::Borrowed("");
    }
    let kept = cut(s, max - ELLIPSIS.len_utf16()).trim_end();
    Cow::Owned(format!("{kept}{ELLIPSIS}"))
}

/// `key` if it fits in `max` UTF-16 units, else a prefix, `~` and 8 hex digits of the SHA-256
/// of the whole key (same key in, same key out; distinct keys stay distinct).
pub fn fit_key(key: &str, max: usize) -> Cow<'_, str> {
    const HASH_HEX: usize = 8;
    if utf16_len(key) <= max {
        return Cow::Borrowed(key);
    }
    let digest = Sha256::digest(key.as_bytes());
    let hash = hex::encode(&digest[..HASH_HEX / 2]);
    let prefix = cut(key, max.saturating_sub(HASH_HEX + 1));
    let fitted = format!("{prefix}~{hash}");
    if utf16_len(&fitted) <= max {
        Cow::Owned(fitted)
    } else {
        // Only for a limit shorter than the hash itself.
        Cow::Owned(hash.chars().take(max).collect())
    }
}

/// `url` if it fits, else without its query and fragment if that fits, else `None`.
pub fn fit_url(url: &str, max: usize) -> Option<Cow<'_, str>> {
    if utf16_len(url) <= max {
        return Some(Cow::Borrowed(url));
    }
    let end = url.find(['?', '#'])?;
    let bare = &url[..end];
    (utf16_len(bare) <= max).then_some(Cow::Borrowed(bare))
}

/// The longest prefix of `s` within `max` UTF-16 units that does not split a character, a
/// combining sequence, an emoji ZWJ sequence or a flag.
fn cut(s: &str, max: usize) -> &str {
    let mut end = 0;
    let mut units = 0;
    for (i, c) in s.char_indices() {
        units += c.len_utf16();
        if units > max {
            break;
        }
        end = i + c.len_utf8();
    }
    // Back off while the first dropped character would have joined the last kept one.
    loop {
        let (kept, rest) = s.split_at(end);
        let Some(last) = kept.chars().next_back() else {
            break;
        };
        let joins = rest.chars().next().is_some_and(|next| {
            extends(next)
                || last == '\u{200D}'
                || (is_regional_indicator(next)
                    && kept
                        .chars()
                        .rev()
                        .take_while(|c| is_regional_indicator(*c))
                        .count()
                        % 2
                        == 1)
        });
        if !joins {
            break;
        }
        end -= last.len_utf8();
    }
    &s[..end]
}

/// Characters that attach to the one before them (a cheap subset of grapheme extenders).
fn extends(c: char) -> bool {
    matches!(c,
        '\u{0300}'..='\u{036F}'   // combining diacritical marks
        | '\u{1AB0}'..='\u{1AFF}'
        | '\u{1DC0}'..='\u{1DFF}'
        | '\u{200D}'              // zero-width joiner
        | '\u{20D0}'..='\u{20FF}'
        | '\u{FE00}'..='\u{FE0F}' // variation selectors
        | '\u{FE20}'..='\u{FE2F}'
        | '\u{1F3FB}'..='\u{1F3FF}' // skin tones
        | '\u{E0020}'..='\u{E007F}' // tag characters (subdivision flags)
        | '\u{E0100}'..='\u{E01EF}')
}

fn is_regional_indicator(c: char) -> bool {
    ('\u{1F1E6}'..='\u{1F1FF}').contains(&c)
}

/// What `GET /rest/api/latest/build/capabilities` says the server can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Capabilities {
    /// The repository-scoped builds API (Data Center >= 7.4).
    pub rich_build_status: bool,
    /// `CANCELLED` is accepted.
    pub cancelled_status: bool,
}

impl Capabilities {
    /// The best API this server offers.
    pub fn api(&self) -> ApiKind {
        if self.rich_build_status {
            ApiKind::Repository {
                cancelled: self.cancelled_status,
            }
        } else {
            ApiKind::Legacy
        }
    }
}

/// Reads `{"buildStatus": ["richBuildStatus", "cancelledStatus", ...]}` (older servers say
/// `application-buildStatus`). Anything unexpected reads as "no capabilities", i.e. legacy.
pub fn parse_capabilities(json: &Value) -> Capabilities {
    let mut names: Vec<String> = Vec::new();
    for field in ["buildStatus", "application-buildStatus"] {
        match json.get(field) {
            Some(Value::Array(items)) => names.extend(
                items
                    .iter()
                    .filter_map(Value::as_str)
                    .map(|s| s.trim().to_ascii_lowercase()),
            ),
            Some(Value::String(s)) => {
                names.extend(s.split(',').map(|s| s.trim().to_ascii_lowercase()))
            }
            _ => {}
        }
    }
    let has = |name: &str| names.iter().any(|n| n == name);
    Capabilities {
        rich_build_status: has("richbuildstatus"),
        cancelled_status: has("cancelledstatus"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The body as the JSON that is posted.
    fn json_body(req: &StatusRequest) -> Value {
        serde_json::to_value(&req.body).unwrap()
    }

    const SHA: &str = "4e1f0c9b7a2d3e5f6a8b9c0d1e2f3a4b5c6d7e8f";
    const DC: &str = "https://bb.example.com/bitbucket";
    const CLOUD: &str = "https://api.bitbucket.org";

    fn status(logical: LogicalState, repository: &str) -> CommitStatus {
        CommitStatus {
            commit: SHA.into(),
            key: "acme-inc/web-app".into(),
            logical,
            version: crate::status::StatusVersion::from_legacy(1842 << 8 | 7),
            name: "Web App #1842".into(),
            description: "Passed in 3m 12s \u{2014} Fix login".into(),
            url: "https://buildkite.com/acme-inc/web-app/builds/1842".into(),
            ref_name: Some("refs/heads/main".into()),
            build_number: 1842,
            duration_ms: Some(192_382),
            parent: "acme-inc/web-app".into(),
            repository: Some(repository.into()),
            organization: "acme-inc".into(),
            pipeline: "web-app".into(),
        }
    }

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    const DC_REPO: &str = "ssh://git@bb.example.com:7999/web/app.git";
    const CLOUD_REPO: &str = "git@bitbucket.org:acme/web-app.git";

    #[test]
    fn every_logical_state_on_every_api() {
        use LogicalState::*;
        let apis = [
            ApiKind::Legacy,
            ApiKind::Repository { cancelled: false },
            ApiKind::Repository { cancelled: true },
            ApiKind::Cloud,
        ];
        let table: &[(LogicalState, [&str; 4])] = &[
            (
                InProgress,
                ["INPROGRESS", "INPROGRESS", "INPROGRESS", "INPROGRESS"],
            ),
            (
                Successful,
                ["SUCCESSFUL", "SUCCESSFUL", "SUCCESSFUL", "SUCCESSFUL"],
            ),
            (Failed, ["FAILED", "FAILED", "FAILED", "FAILED"]),
            (Blocked, ["FAILED", "FAILED", "FAILED", "STOPPED"]),
            (Canceled, ["FAILED", "FAILED", "CANCELLED", "STOPPED"]),
            (Skipped, ["FAILED", "FAILED", "CANCELLED", "STOPPED"]),
        ];
        for (logical, words) in table {
            for (api, word) in apis.iter().zip(words) {
                let (base, repo) = match api {
                    ApiKind::Cloud => (CLOUD, CLOUD_REPO),
                    _ => (DC, DC_REPO),
                };
                let req = build_request(api, &url(base), &status(*logical, repo)).unwrap();
                assert_eq!(req.state.as_str(), *word, "{logical:?} on {api:?}");
                assert_eq!(
                    json_body(&req)["state"],
                    json!(word),
                    "{logical:?} on {api:?}"
                );
                assert_eq!(req.method, "POST");
            }
        }
    }

    #[test]
    fn legacy_request() {
        let req = build_request(
            &ApiKind::Legacy,
            &url(DC),
            &status(LogicalState::Successful, DC_REPO),
        )
        .unwrap();
        assert_eq!(req.path, format!("/rest/build-status/1.0/commits/{SHA}"));
        assert_eq!(
            json_body(&req),
            json!({
                "state": "SUCCESSFUL",
                "key": "acme-inc/web-app",
                "name": "Web App #1842",
                "url": "https://buildkite.com/acme-inc/web-app/builds/1842",
                "description": "Passed in 3m 12s \u{2014} Fix login",
            })
        );
        // Round-trips through the outbox.
        let stored = serde_json::to_value(&req).unwrap();
        assert_eq!(stored["state"], json!("SUCCESSFUL"));
        assert_eq!(
            serde_json::from_value::<StatusRequest>(stored).unwrap(),
            req
        );

        // A request stored when the body was an untyped JSON object reads back as the same
        // body, and is posted as the same JSON.
        let old = r#"{"method":"POST","path":"/rest/api/latest/projects/WEB/repos/app/commits/x/builds",
            "body":{"buildNumber":"7","description":"d","duration":5,"key":"k","name":"n",
                "parent":"p","ref":"refs/heads/main","state":"FAILED","url":"https://b/7"},
            "state":"FAILED"}"#;
        let read: StatusRequest = serde_json::from_str(old).unwrap();
        assert_eq!(read.body.git_ref.as_deref(), Some("refs/heads/main"));
        assert_eq!(read.body.state, BitbucketState::Failed);
        let old: Value = serde_json::from_str(old).unwrap();
        assert_eq!(serde_json::to_value(&read).unwrap(), old);

        // No repository: legacy does not need one.
        let mut s = status(LogicalState::Successful, DC_REPO);
        s.repository = None;
        assert!(build_request(&ApiKind::Legacy, &url(DC), &s).is_ok());
        // A repository elsewhere is not posted.
        let s = status(LogicalState::Successful, "git@github.com:acme/web.git");
        assert!(matches!(
            build_request(&ApiKind::Legacy, &url(DC), &s),
            Err(Skip::NotOnBitbucket { .. })
        ));
    }

    #[test]
    fn repository_request() {
        let api = ApiKind::Repository { cancelled: true };
        let req =
            build_request(&api, &url(DC), &status(LogicalState::Successful, DC_REPO)).unwrap();
        assert_eq!(
            req.path,
            format!("/rest/api/latest/projects/WEB/repos/app/commits/{SHA}/builds")
        );
        assert_eq!(
            json_body(&req),
            json!({
                "key": "acme-inc/web-app",
                "state": "SUCCESSFUL",
                "url": "https://buildkite.com/acme-inc/web-app/builds/1842",
                "name": "Web App #1842",
                "description": "Passed in 3m 12s \u{2014} Fix login",
                "buildNumber": "1842",
                "parent": "acme-inc/web-app",
                "ref": "refs/heads/main",
                "duration": 192_382,
            })
        );
        let mut running = status(
            LogicalState::InProgress,
            "https://bb.example.com/bitbucket/scm/~jdoe/my%20repo.git",
        );
        running.duration_ms = Some(5);
        running.ref_name = None;
        let req = build_request(&api, &url(DC), &running).unwrap();
        assert_eq!(
            req.path,
            format!("/rest/api/latest/projects/~JDOE/repos/my%20repo/commits/{SHA}/builds")
        );
        assert!(json_body(&req).get("duration").is_none() && json_body(&req).get("ref").is_none());

        let mut none = status(LogicalState::Successful, DC_REPO);
        none.repository = None;
        assert_eq!(
            build_request(&api, &url(DC), &none),
            Err(Skip::MissingRepository {
                api: "repository".into()
            })
        );
        assert!(matches!(
            build_request(&api, &url(DC), &status(LogicalState::Successful, "https://user:pw@github.com/a/b.git")),
            Err(Skip::NotOnBitbucket { url, bitbucket }) if url == "https://github.com/a/b.git" && bitbucket == "bb.example.com"
        ));
        assert!(matches!(
            build_request(
                &api,
                &url(DC),
                &status(
                    LogicalState::Successful,
                    "ssh://git@bb.example.com:7999/app.git"
                )
            ),
            Err(Skip::UnusableRepository { .. })
        ));
    }

    #[test]
    fn cloud_request() {
        let req = build_request(
            &ApiKind::Cloud,
            &url(CLOUD),
            &status(LogicalState::Canceled, CLOUD_REPO),
        )
        .unwrap();
        assert_eq!(
            req.path,
            format!("/2.0/repositories/acme/web-app/commit/{SHA}/statuses/build")
        );
        assert_eq!(
            json_body(&req),
            json!({
                "key": "acme-inc/web-app",
                "state": "STOPPED",
                "url": "https://buildkite.com/acme-inc/web-app/builds/1842",
                "name": "Web App #1842",
                "description": "Passed in 3m 12s \u{2014} Fix login",
                "refname": "main",
            })
        );
        // A test double serving the API elsewhere still posts bitbucket.org repositories.
        assert!(
            build_request(
                &ApiKind::Cloud,
                &url("http://127.0.0.1:9"),
                &status(LogicalState::Failed, CLOUD_REPO)
            )
            .is_ok()
        );
        assert!(matches!(
            build_request(
                &ApiKind::Cloud,
                &url(CLOUD),
                &status(LogicalState::Failed, DC_REPO)
            ),
            Err(Skip::NotOnBitbucket { .. })
        ));
        assert!(matches!(
            build_request(
                &ApiKind::Cloud,
                &url(CLOUD),
                &status(LogicalState::Failed, "git@bitbucket.org:only-ws")
            ),
            Err(Skip::UnusableRepository { .. })
        ));
    }

    #[test]
    fn long_keys_are_hashed_per_api() {
        let long = format!("acme-inc/{}", "very-long-pipeline-slug-".repeat(3));
        let mut s = status(LogicalState::Successful, CLOUD_REPO);
        s.key = long.clone();
        s.parent = long.clone();
        let req = build_request(&ApiKind::Cloud, &url(CLOUD), &s).unwrap();
        let body = json_body(&req);
        let key = body["key"].as_str().unwrap();
        assert_eq!(key.len(), 40);
        assert!(key.starts_with("acme-inc/very-long-pipeline-slu~"), "{key}");
        // Stable, and distinct from a pipeline sharing the prefix.
        assert_eq!(fit_key(&long, 40), key);
        assert_ne!(fit_key(&format!("{long}x"), 40), key);
        // Fits on the Server APIs uncut.
        let mut s = status(LogicalState::Successful, DC_REPO);
        s.key = long.clone();
        s.parent = long.clone();
        let req = build_request(&ApiKind::Repository { cancelled: false }, &url(DC), &s).unwrap();
        assert_eq!(json_body(&req)["key"], json!(long));
        assert_eq!(json_body(&req)["parent"], json!(long));
        let huge = "k".repeat(300);
        assert_eq!(utf16_len(&fit_key(&huge, 255)), 255);
        assert_eq!(fit_key(&huge, 5).len(), 5);
        assert_eq!(fit_key(&huge, 0), "");
    }

    #[test]
    fn a_long_multibyte_message_never_makes_a_field_too_long() {
        let pieces = ["é", "👍🏽", "e\u{0301}", "🇩🇪", "👩‍👩‍👧", "中", "a", " "];
        for shift in 0..pieces.len() {
            let message: String = pieces
                .iter()
                .cycle()
                .skip(shift)
                .take(1000)
                .copied()
                .collect();
            let mut s = status(LogicalState::Failed, DC_REPO);
            s.description = format!("Failed \u{2014} {message}");
            s.name = format!("{message} #1842");
            s.key = format!("acme/{message}");
            s.parent = s.key.clone();
            for (api, base) in [
                (ApiKind::Legacy, DC),
                (ApiKind::Repository { cancelled: true }, DC),
            ] {
                let req = build_request(&api, &url(base), &s).unwrap();
                for (field, value) in json_body(&req).as_object().unwrap() {
                    if let Some(text) = value.as_str() {
                        let max = if field == "url" { 450 } else { 255 };
                        assert!(
                            utf16_len(text) <= max,
                            "{field} on {api:?}: {}",
                            utf16_len(text)
                        );
                    }
                }
                let body = json_body(&req);
                let d = body["description"].as_str().unwrap();
                assert!(d.ends_with('…'), "{d}");
                let kept = d.trim_end_matches('…').trim_end();
                assert!(s.description.starts_with(kept));
                assert!(!kept.ends_with('\u{200D}'));
                // The cut never strands a combining mark, skin tone or half a flag.
                let rest = &s.description[kept.len()..];
                let next = rest.chars().next().unwrap();
                assert!(!extends(next), "cut before {next:?}");
            }
            s.repository = Some(CLOUD_REPO.into());
            let req = build_request(&ApiKind::Cloud, &url(CLOUD), &s).unwrap();
            assert!(utf16_len(json_body(&req)["key"].as_str().unwrap()) <= 40);
            assert!(utf16_len(json_body(&req)["name"].as_str().unwrap()) <= 255);
            assert!(utf16_len(json_body(&req)["description"].as_str().unwrap()) <= 255);
        }
    }

    #[test]
    fn text_cutting() {
        let cases: &[(&str, usize, &str)] = &[
            ("short", 255, "short"),
            ("abcdef", 6, "abcdef"),
            ("abcdef", 5, "abcd…"),
            ("abc def", 5, "abc…"),
            ("ééééé", 4, "ééé…"),
            ("ab👍cd", 4, "ab…"),
            ("ab👍🏽cd", 5, "ab…"),
            ("abe\u{0301}x", 4, "ab…"),
            ("a🇩🇪🇫🇷", 8, "a🇩🇪…"),
            ("a🇩🇪🇫🇷", 7, "a🇩🇪…"),
            ("a🇩🇪🇫🇷", 4, "a…"),
            ("x👩‍👩‍👧", 7, "x…"),
            ("abc", 1, "…"),
            ("abc", 0, ""),
        ];
        for (input, max, want) in cases {
            let got = fit_text(input, *max);
            assert_eq!(got, *want, "{input:?} in {max}");
            assert!(utf16_len(&got) <= *max);
        }
    }

    #[test]
    fn urls() {
        let base = "https://buildkite.com/acme/web/builds/1";
        let long_query = format!("{base}?{}", "q".repeat(500));
        let cases: &[(&str, usize, Option<&str>)] = &[
            (base, 450, Some(base)),
            (&long_query, 450, Some(base)),
            ("https://buildkite.com/a#frag", 20, None),
            ("https://b.com/a#frag", 15, Some("https://b.com/a")),
        ];
        for (input, max, want) in cases {
            assert_eq!(fit_url(input, *max).as_deref(), *want, "{input}");
        }
        let mut s = status(LogicalState::Failed, DC_REPO);
        s.url = format!("https://buildkite.com/{}", "p".repeat(450));
        assert_eq!(
            build_request(&ApiKind::Legacy, &url(DC), &s),
            Err(Skip::UrlTooLong {
                length: 472,
                max: 450,
                api: "legacy".into()
            })
        );
        // Cloud documents no URL limit.
        s.repository = Some(CLOUD_REPO.into());
        assert!(build_request(&ApiKind::Cloud, &url(CLOUD), &s).is_ok());
    }

    #[test]
    fn long_refs_are_left_out_not_cut() {
        let mut s = status(LogicalState::Failed, DC_REPO);
        s.ref_name = Some(format!("refs/heads/{}", "b".repeat(300)));
        let req = build_request(&ApiKind::Repository { cancelled: false }, &url(DC), &s).unwrap();
        assert!(json_body(&req).get("ref").is_none());
        s.ref_name = Some("refs/tags/v1.0".into());
        s.repository = Some(CLOUD_REPO.into());
        let req = build_request(&ApiKind::Cloud, &url(CLOUD), &s).unwrap();
        assert_eq!(json_body(&req)["refname"], json!("v1.0"));
    }

    #[test]
    fn bad_commit_is_skipped() {
        let mut s = status(LogicalState::Failed, DC_REPO);
        s.commit = "HEAD".into();
        assert_eq!(
            build_request(&ApiKind::Legacy, &url(DC), &s),
            Err(Skip::NotAFullSha {
                commit: "HEAD".into()
            })
        );
    }

    proptest::proptest! {
        #[test]
        fn fitting_never_exceeds_the_limit(s in "\\PC{0,300}", max in 0usize..300) {
            let text = fit_text(&s, max);
            proptest::prop_assert!(utf16_len(&text) <= max);
            let kept = text.strip_suffix('\u{2026}').unwrap_or(&text);
            proptest::prop_assert!(s.starts_with(kept));
            let key = fit_key(&s, max);
            proptest::prop_assert!(utf16_len(&key) <= max);
            proptest::prop_assert_eq!(fit_key(&s, max), key);
            if let Some(url) = fit_url(&s, max) {
                proptest::prop_assert!(utf16_len(&url) <= max && s.starts_with(&*url));
            }
        }
    }

    #[test]
    fn capabilities() {
        let cases = [
            (
                json!({"buildStatus": ["richBuildStatus", "cancelledStatus", "unknownStatus"]}),
                true,
                true,
            ),
            (json!({"buildStatus": ["richBuildStatus"]}), true, false),
            (
                json!({"application-buildStatus": ["richBuildStatus"]}),
                true,
                false,
            ),
            (
                json!({"buildStatus": "richBuildStatus, cancelledStatus"}),
                true,
                true,
            ),
            (json!({"buildStatus": []}), false, false),
            (json!({"buildStatus": [1, null]}), false, false),
            (json!({}), false, false),
            (json!(null), false, false),
            (json!(["richBuildStatus"]), false, false),
        ];
        for (input, rich, cancelled) in cases {
            let c = parse_capabilities(&input);
            assert_eq!(
                (c.rich_build_status, c.cancelled_status),
                (rich, cancelled),
                "{input}"
            );
        }
        assert_eq!(
            parse_capabilities(&json!({"buildStatus": ["richBuildStatus", "cancelledStatus"]}))
                .api(),
            ApiKind::Repository { cancelled: true }
        );
        assert_eq!(Capabilities::default().api(), ApiKind::Legacy);
    }
}
