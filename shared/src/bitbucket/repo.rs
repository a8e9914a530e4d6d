//! Where a pipeline's repository lives, from its clone URL: host + project key + repository slug
//! on Bitbucket Server / Data Center, workspace + repository slug on Bitbucket Cloud; and whether
//! it is on the configured Bitbucket at all.
//!
//! | Clone URL | Parsed |
//! |---|---|
//! | `ssh://git@host:7999/proj/repo.git` | Server: `host`, `PROJ`, `repo` |
//! | `https://host/scm/proj/repo.git` | Server: `host`, `PROJ`, `repo` |
//! | `https://host/context/scm/proj/repo.git` | Server: `host`, `PROJ`, `repo` |
//! | `https://host/scm/~jdoe/repo.git` | Server: `host`, `~JDOE`, `repo` |
//! | `git@host:proj/repo.git` | Server: `host`, `PROJ`, `repo` |
//! | `git@bitbucket.org:ws/repo.git` | Cloud: `ws`, `repo` |
//! | `https://user@bitbucket.org/ws/repo` | Cloud: `ws`, `repo` |
//!
//! Clone links show project keys in lower case, the API reports them upper case; upper case is
//! the canonical form. Hosts are compared by name only: an SSH clone URL's port (7999) says
//! nothing about the HTTP port.

use percent_encoding::percent_decode_str;
use url::Url;

/// The host of Bitbucket Cloud's clone URLs.
pub const CLOUD_HOST: &str = "bitbucket.org";

/// A repository on Bitbucket Server / Data Center.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerRepo {
    /// Lower case, without port.
    pub host: String,
    /// Upper case; personal projects are `~USER`.
    pub project_key: String,
    pub slug: String,
}

/// A repository on Bitbucket Cloud.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudRepo {
    pub workspace: String,
    pub slug: String,
}

/// Why a clone URL does not name a Bitbucket repository.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RepoError {
    #[error("not a clone URL (expected scheme://host/path or user@host:path)")]
    NotAUrl,
    #[error("the path does not name a project and a repository")]
    NoRepository,
    #[error("the host {0:?} is not Bitbucket Cloud (bitbucket.org)")]
    NotCloud(String),
}

/// A clone URL taken apart: host (lower case) and decoded, non-empty path segments.
struct CloneUrl {
    host: String,
    segments: Vec<String>,
}

fn split_clone_url(url: &str) -> Result<CloneUrl, RepoError> {
    let url = url.trim();
    if url.contains("://") {
        let parsed = Url::parse(url).map_err(|_| RepoError::NotAUrl)?;
        let host = parsed
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or(RepoError::NotAUrl)?;
        let segments = parsed
            .path_segments()
            .map(|s| s.filter(|s| !s.is_empty()).map(decode).collect())
            .unwrap_or_default();
        return Ok(CloneUrl {
            host: host.trim_matches(['[', ']']).to_ascii_lowercase(),
            segments,
        });
    }
    // scp-like `[user@]host:path`: no slash before the first colon.
    let (authority, path) = url.split_once(':').ok_or(RepoError::NotAUrl)?;
    if authority.contains('/') || path.starts_with("//") {
        return Err(RepoError::NotAUrl);
    }
    let host = authority.rsplit('@').next().unwrap_or(authority);
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(RepoError::NotAUrl);
    }
    Ok(CloneUrl {
        host: host.to_ascii_lowercase(),
        segments: path
            .split('/')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
    })
}

fn decode(segment: &str) -> String {
    percent_decode_str(segment).decode_utf8_lossy().into_owned()
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && !s.contains(['/', '\\'])
        && !s.contains(char::is_control)
}

fn strip_git(slug: &str) -> &str {
    slug.strip_suffix(".git").unwrap_or(slug)
}

/// The host of a clone URL (lower case, without port), if it has one.
pub fn clone_host(url: &str) -> Option<String> {
    split_clone_url(url).ok().map(|c| c.host)
}

/// Parses a Bitbucket Server / Data Center clone URL (or a repository's browse URL).
pub fn parse_server(url: &str) -> Result<ServerRepo, RepoError> {
    server_repo(split_clone_url(url)?)
}

/// [`is_on_bitbucket`], then [`parse_server`] when it is, taking the URL apart once: `None`
/// when the repository is not on the Bitbucket at `bitbucket_url`.
pub fn parse_server_on(
    clone_url: &str,
    bitbucket_url: &Url,
) -> Option<Result<ServerRepo, RepoError>> {
    let parts = split_clone_url(clone_url).ok()?;
    let bitbucket = bitbucket_host(bitbucket_url)?;
    (canonical_host(&parts.host) == bitbucket).then(|| server_repo(parts))
}

fn server_repo(CloneUrl { host, segments }: CloneUrl) -> Result<ServerRepo, RepoError> {
    let s: Vec<&str> = segments.iter().map(String::as_str).collect();
    let n = s.len();
    let (project, slug) = if n >= 3 && s[n - 3] == "scm" {
        // HTTP clone URL, with or without a context path before `/scm/`.
        (s[n - 2].to_owned(), s[n - 1])
    } else if let Some(i) = s
        .windows(3)
        .position(|w| w[0] == "projects" && w[2] == "repos")
    {
        // Browse URL: /projects/KEY/repos/slug[/browse...]
        (
            s[i + 1].to_owned(),
            *s.get(i + 3).ok_or(RepoError::NoRepository)?,
        )
    } else if let Some(i) = s
        .windows(3)
        .position(|w| w[0] == "users" && w[2] == "repos")
    {
        // Personal browse URL: /users/jdoe/repos/slug
        (
            format!("~{}", s[i + 1]),
            *s.get(i + 3).ok_or(RepoError::NoRepository)?,
        )
    } else if n >= 2 {
        // SSH clone URL: the last two segments.
        (s[n - 2].to_owned(), s[n - 1])
    } else {
        return Err(RepoError::NoRepository);
    };
    let slug = strip_git(slug);
    if !valid_segment(&project) || project == "~" || !valid_segment(slug) {
        return Err(RepoError::NoRepository);
    }
    Ok(ServerRepo {
        host,
        project_key: project.to_uppercase(),
        slug: slug.to_owned(),
    })
}

/// Parses a Bitbucket Cloud clone URL (`git@bitbucket.org:ws/repo.git`,
/// `https://[user@]bitbucket.org/ws/repo[.git]`).
pub fn parse_cloud(url: &str) -> Result<CloudRepo, RepoError> {
    let CloneUrl { host, segments } = split_clone_url(url)?;
    if canonical_host(&host) != CLOUD_HOST {
        return Err(RepoError::NotCloud(host));
    }
    let [workspace, slug, ..] = segments.as_slice() else {
        return Err(RepoError::NoRepository);
    };
    let slug = strip_git(slug);
    if !valid_segment(workspace) || !valid_segment(slug) {
        return Err(RepoError::NoRepository);
    }
    Ok(CloudRepo {
        workspace: workspace.clone(),
        slug: slug.to_owned(),
    })
}

/// One name per Bitbucket: Cloud's API and alternative SSH hosts are `bitbucket.org`.
fn canonical_host(host: &str) -> &str {
    match host {
        "api.bitbucket.org" | "www.bitbucket.org" | "altssh.bitbucket.org" => CLOUD_HOST,
        other => other.trim_end_matches('.'),
    }
}

/// The host clone URLs of the Bitbucket at `bitbucket_url` have (`bitbucket.org` for
/// `https://api.bitbucket.org`).
pub fn bitbucket_host(bitbucket_url: &Url) -> Option<String> {
    let host = bitbucket_url
        .host_str()?
        .trim_matches(['[', ']'])
        .to_ascii_lowercase();
    Some(canonical_host(&host).to_owned())
}

/// Whether the repository with this clone URL lives on the Bitbucket at `bitbucket_url`,
/// comparing host names (ports are ignored: SSH listens on its own port).
pub fn is_on_bitbucket(clone_url: &str, bitbucket_url: &Url) -> bool {
    match (clone_host(clone_url), bitbucket_host(bitbucket_url)) {
        (Some(repo), Some(bitbucket)) => canonical_host(&repo) == bitbucket,
        _ => false,
    }
}

/// The clone URL with any password removed, and for HTTP(S) URLs the user name too (tokens are
/// often passed as the user name), so that it can be logged.
pub fn redact(url: &str) -> String {
    let trimmed = url.trim();
    if !trimmed.contains("://") {
        return trimmed.to_owned();
    }
    let Ok(mut parsed) = Url::parse(trimmed) else {
        // Not parseable: anything between `://` and the last `@` before the path may be secret.
        return redact_unparsed(trimmed);
    };
    let http = matches!(parsed.scheme(), "http" | "https");
    // Both only fail for URLs that cannot have credentials, which then have none to remove.
    let _ = parsed.set_password(None);
    if http {
        let _ = parsed.set_username("");
    }
    parsed.to_string()
}

fn redact_unparsed(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(host: &str, key: &str, slug: &str) -> Result<ServerRepo, RepoError> {
        Ok(ServerRepo {
            host: host.into(),
            project_key: key.into(),
            slug: slug.into(),
        })
    }

    #[test]
    fn server_urls() {
        let cases = [
            (
                "ssh://git@host:7999/proj/repo.git",
                server("host", "PROJ", "repo"),
            ),
            (
                "https://host/scm/proj/repo.git",
                server("host", "PROJ", "repo"),
            ),
            (
                "https://host/bitbucket/scm/proj/repo.git",
                server("host", "PROJ", "repo"),
            ),
            (
                "https://host/a/b/scm/proj/repo.git",
                server("host", "PROJ", "repo"),
            ),
            (
                "https://host/scm/~jdoe/repo.git",
                server("host", "~JDOE", "repo"),
            ),
            (
                "https://host/scm/%7Ejdoe/repo.git",
                server("host", "~JDOE", "repo"),
            ),
            (
                "https://jdoe@Host.Example.com:8443/scm/sbox/sandbox.git",
                server("host.example.com", "SBOX", "sandbox"),
            ),
            (
                "https://jdoe:s3cret@host/scm/proj/repo",
                server("host", "PROJ", "repo"),
            ),
            ("git@host:proj/repo.git", server("host", "PROJ", "repo")),
            ("git@host:/proj/repo.git", server("host", "PROJ", "repo")),
            ("host:proj/repo.git", server("host", "PROJ", "repo")),
            (
                "ssh://git@host:7999/~jdoe/repo.git",
                server("host", "~JDOE", "repo"),
            ),
            (
                "ssh://git@[::1]:7999/proj/repo.git",
                server("::1", "PROJ", "repo"),
            ),
            (
                "https://host/projects/PROJ/repos/repo/browse",
                server("host", "PROJ", "repo"),
            ),
            (
                "https://host/users/jdoe/repos/repo/browse",
                server("host", "~JDOE", "repo"),
            ),
            (
                "https://host/scm/proj/repo.git/",
                server("host", "PROJ", "repo"),
            ),
            (
                "  ssh://git@host:7999/proj/my.repo.git\n",
                server("host", "PROJ", "my.repo"),
            ),
            ("ssh://git@host:7999/repo.git", Err(RepoError::NoRepository)),
            ("https://host/", Err(RepoError::NoRepository)),
            ("https://host/scm/~/repo.git", Err(RepoError::NoRepository)),
            ("https://host/scm/proj/.git", Err(RepoError::NoRepository)),
            (
                "https://host/projects/PROJ/repos",
                Err(RepoError::NoRepository),
            ),
            ("/srv/git/repo.git", Err(RepoError::NotAUrl)),
            ("repo", Err(RepoError::NotAUrl)),
            ("", Err(RepoError::NotAUrl)),
            ("https://", Err(RepoError::NotAUrl)),
            ("file:///srv/git/proj/repo.git", Err(RepoError::NotAUrl)),
            ("./a:b/c", Err(RepoError::NotAUrl)),
        ];
        for (url, want) in cases {
            assert_eq!(parse_server(url), want, "{url:?}");
        }
    }

    #[test]
    fn cloud_urls() {
        let ok = |ws: &str, slug: &str| {
            Ok(CloudRepo {
                workspace: ws.into(),
                slug: slug.into(),
            })
        };
        let cases = [
            ("git@bitbucket.org:ws/repo.git", ok("ws", "repo")),
            ("https://bitbucket.org/ws/repo.git", ok("ws", "repo")),
            ("https://user@bitbucket.org/ws/repo", ok("ws", "repo")),
            (
                "https://x-token-auth:tok@bitbucket.org/ws/repo.git",
                ok("ws", "repo"),
            ),
            (
                "ssh://git@altssh.bitbucket.org:443/ws/repo.git",
                ok("ws", "repo"),
            ),
            ("https://BitBucket.org/ws/repo/src/main/", ok("ws", "repo")),
            ("git@bitbucket.org:ws", Err(RepoError::NoRepository)),
            (
                "git@github.com:acme/web.git",
                Err(RepoError::NotCloud("github.com".into())),
            ),
            (
                "https://bitbucket.example.com/scm/p/r.git",
                Err(RepoError::NotCloud("bitbucket.example.com".into())),
            ),
            ("nonsense", Err(RepoError::NotAUrl)),
        ];
        for (url, want) in cases {
            assert_eq!(parse_cloud(url), want, "{url:?}");
        }
    }

    #[test]
    fn on_bitbucket() {
        let cases = [
            (
                "ssh://git@bb.example.com:7999/p/r.git",
                "https://bb.example.com",
                true,
            ),
            (
                "ssh://git@BB.example.com:7999/p/r.git",
                "https://bb.example.com/bitbucket",
                true,
            ),
            (
                "https://bb.example.com/bitbucket/scm/p/r.git",
                "https://bb.example.com/bitbucket",
                true,
            ),
            (
                "https://bb.example.com:8443/scm/p/r.git",
                "https://bb.example.com",
                true,
            ),
            (
                "git@bb.example.com:p/r.git",
                "http://bb.example.com:7990",
                true,
            ),
            (
                "git@github.com:acme/web.git",
                "https://bb.example.com",
                false,
            ),
            (
                "https://github.com/acme/web.git",
                "https://bb.example.com",
                false,
            ),
            (
                "ssh://git@bb.example.com.evil.net/p/r.git",
                "https://bb.example.com",
                false,
            ),
            (
                "git@bitbucket.org:ws/r.git",
                "https://api.bitbucket.org",
                true,
            ),
            (
                "https://bitbucket.org/ws/r",
                "https://api.bitbucket.org/",
                true,
            ),
            (
                "ssh://git@altssh.bitbucket.org:443/ws/r.git",
                "https://api.bitbucket.org",
                true,
            ),
            (
                "git@bitbucket.org:ws/r.git",
                "https://bb.example.com",
                false,
            ),
            (
                "git@github.com:ws/r.git",
                "https://api.bitbucket.org",
                false,
            ),
            ("/local/path.git", "https://bb.example.com", false),
            ("", "https://bb.example.com", false),
        ];
        for (clone, configured, want) in cases {
            let configured = Url::parse(configured).unwrap();
            assert_eq!(
                is_on_bitbucket(clone, &configured),
                want,
                "{clone} on {configured}"
            );
            // The one-parse form says the same, then what `parse_server` says.
            assert_eq!(
                parse_server_on(clone, &configured),
                want.then(|| parse_server(clone)),
                "{clone} on {configured}"
            );
        }
    }

    #[test]
    fn redaction() {
        let cases = [
            (
                "https://user:s3cret@host/scm/p/r.git",
                "https://host/scm/p/r.git",
            ),
            (
                "https://ghp_token@github.com/a/b.git",
                "https://github.com/a/b.git",
            ),
            (
                "ssh://git:pw@host:7999/p/r.git",
                "ssh://git@host:7999/p/r.git",
            ),
            ("ssh://git@host:7999/p/r.git", "ssh://git@host:7999/p/r.git"),
            ("git@host:p/r.git", "git@host:p/r.git"),
            ("https://us er:pw@ho st/x", "https://***@ho st/x"),
        ];
        for (url, want) in cases {
            assert_eq!(redact(url), want, "{url}");
        }
    }
}
