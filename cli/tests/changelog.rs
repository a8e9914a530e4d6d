//! Changelogs through the real `kitebridge serve` and the fake Bitbucket (Data Center and
//! Cloud): a cut lists exactly the commits since the previous release, with the pull requests
//! they came from, paged as each server pages (Data Center's non-contiguous `nextPageStart`,
//! Cloud's `next` links), read from Bitbucket once and then kept.

mod support;

use std::collections::HashMap;
use std::process::{Child, Command};

use chrono::{Duration as Days, TimeZone, Utc};
use kitebridge_fakes::*;
use serde_json::{Value, json};

const TOKEN: &str = "changelog-api-token";

fn sha(n: u64) -> String {
    format!("{:040x}", 0xc0de_0000 + n)
}

/// `c1` (oldest) to `c8`, one line; pull request #7 (merged) brought c3 and c4, #9 (open) c7.
fn history() -> (Vec<FakeCommit>, Vec<FakePullRequest>) {
    let t0 = Utc.with_ymd_and_hms(2026, 11, 1, 9, 0, 0).unwrap();
    let commits = (1..=8)
        .map(|n| {
            let parents: Vec<String> = if n == 1 { vec![] } else { vec![sha(n - 1)] };
            let parents: Vec<&str> = parents.iter().map(String::as_str).collect();
            FakeCommit::new(
                &sha(n),
                &parents,
                &format!("Change {n}\n\nwhy it was made"),
                t0 + Days::hours(n as i64),
            )
        })
        .collect();
    let pr = |id, title: &str, state, commits: &[u64]| FakePullRequest {
        id,
        title: title.into(),
        state,
        from_branch: format!("feature/{id}"),
        to_branch: "main".into(),
        commits: commits.iter().map(|n| sha(*n)).collect(),
    };
    (
        commits,
        vec![
            pr(
                7,
                "Payments: retry declined cards",
                PullRequestState::Merged,
                &[3, 4],
            ),
            pr(9, "Checkout copy", PullRequestState::Open, &[7]),
        ],
    )
}

struct Serve {
    child: Child,
    base: String,
    _dir: tempdir::Dir,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

mod tempdir {
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new() -> Dir {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let d = std::env::temp_dir()
                .join(format!("kitebridge-changelog-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&d).unwrap();
            Dir(d)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn serve(bk: &FakeBuildkite, bb: &FakeBitbucket, extra: &[(&str, &str)]) -> Serve {
    let dir = tempdir::Dir::new();
    let mut vars: HashMap<String, String> = [
        ("BUILDKITE_API_URL", bk.url()),
        ("BUILDKITE_API_TOKEN", DEFAULT_BUILDKITE_TOKEN.into()),
        ("BUILDKITE_ORGANIZATION", DEFAULT_ORGANIZATION.into()),
        ("BUILDKITE_WEBHOOK_TOKEN", "whk".into()),
        ("BITBUCKET_URL", bb.url()),
        ("BITBUCKET_TOKEN", DEFAULT_BITBUCKET_TOKEN.into()),
        ("KITEBRIDGE_API_TOKEN", TOKEN.into()),
        ("KITEBRIDGE_DB", dir.0.join("kb.db").display().to_string()),
        ("MONITOR_POLLING_INTERVAL", "3600".into()),
    ]
    .map(|(k, v)| (k.to_string(), v))
    .into();
    for (k, v) in extra {
        vars.insert(k.to_string(), v.to_string());
    }
    let (child, base) = support::spawn_serve(
        Command::new(env!("CARGO_BIN_EXE_kitebridge"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env_clear()
            .envs(&vars),
    );
    Serve {
        child,
        base,
        _dir: dir,
    }
}

async fn call(s: &Serve, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let client = reqwest::Client::new();
    let mut req = client
        .request(method.parse().unwrap(), format!("{}{path}", s.base))
        .bearer_auth(TOKEN);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let code = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        code,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn ids(changelog: &Value) -> Vec<String> {
    changelog["commits"]
        .as_array()
        .unwrap_or_else(|| panic!("no commits in {changelog}"))
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_string())
        .collect()
}

fn shas(ns: &[u64]) -> Vec<String> {
    ns.iter().map(|n| sha(*n)).collect()
}

/// The requests kitebridge made to list commits or their pull requests.
fn listing_requests(bb: &FakeBitbucket) -> usize {
    bb.requests()
        .iter()
        .filter(|r| r.path.contains("/commits") || r.path.contains("/commit/"))
        .count()
}

async fn a_release_lists_the_commits_since_the_previous_one(
    bb: FakeBitbucket,
    owner: &str,
    extra: &[(&str, &str)],
    cloud: bool,
) {
    let bk = FakeBuildkite::start(FakeBuildkiteOptions::default()).await;
    bb.add_repository(owner, "web");
    let (commits, prs) = history();
    bb.add_commits(owner, "web", commits);
    for pr in prs {
        bb.add_pull_request(owner, "web", pr);
    }
    let s = serve(&bk, &bb, extra);
    let (code, body) = call(
        &s,
        "PUT",
        "/projects/web",
        Some(json!({"repository": format!("{owner}/web"), "environments": [{"name": "staging"}]})),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    assert_eq!(body["repository"], format!("{owner}/web"));

    let cut = |commit: u64, version: Option<&str>| {
        let mut b = json!({"commit": sha(commit), "branch": "main"});
        if let Some(v) = version {
            b["version"] = json!(v);
        }
        b
    };
    let (code, body) = call(
        &s,
        "POST",
        "/projects/web/releases",
        Some(cut(2, Some("1.0.0"))),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    let (code, body) = call(
        &s,
        "POST",
        "/projects/web/releases",
        Some(cut(5, Some("1.1.0"))),
    )
    .await;
    assert_eq!(code, 201, "{body}");

    // The first release: the commit's whole history.
    let (code, first) = call(&s, "GET", "/projects/web/releases/1.0.0/changelog", None).await;
    assert_eq!(code, 200, "{first}");
    assert_eq!(ids(&first), shas(&[2, 1]));
    assert_eq!(first["since_candidate_version"], Value::Null);
    assert_eq!(first["complete"], true);

    // The second: exactly the commits since the first release's candidate, newest first,
    // with the pull request that brought c3 and c4.
    let (code, mut second) = call(&s, "GET", "/projects/web/releases/1.1.0/changelog", None).await;
    assert_eq!(code, 200, "{second}");
    assert_eq!(ids(&second), shas(&[5, 4, 3]));
    let indexing = second["commits"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["pull_requests"].is_null());
    // Bitbucket Cloud answers 202 while it indexes a commit's pull requests: they are `null`
    // until a later read asks again (Data Center knows them at once).
    assert_eq!(indexing, cloud, "{second}");
    if indexing {
        let (code, body) = call(&s, "GET", "/projects/web/releases/1.1.0/changelog", None).await;
        assert_eq!(code, 200, "{body}");
        second = body;
    }
    assert_eq!(second["since_candidate_version"], "1.0.0-rc1");
    assert_eq!(second["since_commit"], sha(2));
    assert_eq!(second["commits"][0]["summary"], "Change 5");
    assert_eq!(second["commits"][0]["pull_requests"], json!([]));
    for i in [1, 2] {
        let prs = &second["commits"][i]["pull_requests"];
        assert_eq!(prs[0]["id"], 7, "{second}");
        assert_eq!(prs[0]["title"], "Payments: retry declined cards");
        assert_eq!(prs[0]["state"], "MERGED");
    }

    // Read again: kept, nothing asked of Bitbucket.
    let before = listing_requests(&bb);
    let (code, again) = call(&s, "GET", "/projects/web/releases/1.1.0/changelog", None).await;
    assert_eq!(code, 200);
    assert_eq!(again, second);
    assert_eq!(
        listing_requests(&bb),
        before,
        "a kept changelog was read again"
    );

    // A second candidate of 1.1.0, further on: counted from the previous release too.
    let (code, body) = call(
        &s,
        "POST",
        "/projects/web/releases",
        Some(cut(8, Some("1.1.0"))),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    assert_eq!(body["candidate"]["version"], "1.1.0-rc2");
    let path = "/projects/web/releases/1.1.0/changelog?candidate=1.1.0-rc2";
    let (code, mut rc2) = call(&s, "GET", path, None).await;
    assert_eq!(code, 200, "{rc2}");
    if cloud {
        // c6 to c8 are new to the changelogs: Cloud indexes their pull requests first.
        assert!(rc2["commits"][1]["pull_requests"].is_null(), "{rc2}");
        rc2 = call(&s, "GET", path, None).await.1;
    }
    assert_eq!(ids(&rc2), shas(&[8, 7, 6, 5, 4, 3]));
    assert_eq!(rc2["commits"][1]["pull_requests"][0]["id"], 9);
    let (code, _) = call(
        &s,
        "GET",
        "/projects/web/releases/1.1.0/changelog?candidate=1.1.0-rc9",
        None,
    )
    .await;
    assert_eq!(code, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_center_changelogs_follow_next_page_start() {
    // Two commits a page: the listings take several pages, whose starts are not contiguous.
    let bb = FakeBitbucket::start(FakeBitbucketOptions {
        max_page_limit: 2,
        ..FakeBitbucketOptions::default()
    })
    .await;
    a_release_lists_the_commits_since_the_previous_one(bb, "PROJ", &[], false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_changelogs_follow_next_links_and_wait_for_indexing() {
    // Two commits a page: the listings take several pages, each reached by its `next` link.
    let bb = FakeBitbucket::start(FakeBitbucketOptions {
        max_page_limit: 2,
        ..FakeBitbucketOptions::with_flavour(BitbucketFlavour::Cloud)
    })
    .await;
    a_release_lists_the_commits_since_the_previous_one(
        bb,
        "acme",
        &[("BITBUCKET_API", "cloud")],
        true,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_without_a_repository_is_told_how_to_name_one() {
    let bk = FakeBuildkite::start(FakeBuildkiteOptions::default()).await;
    let bb = FakeBitbucket::start(FakeBitbucketOptions::default()).await;
    let s = serve(&bk, &bb, &[]);
    let (code, _) = call(&s, "PUT", "/projects/web", Some(json!({}))).await;
    assert_eq!(code, 201);
    let (code, body) = call(
        &s,
        "POST",
        "/projects/web/releases",
        Some(json!({"commit": sha(1), "branch": "main"})),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    let version = body["release"]["version"].as_str().unwrap().to_string();
    let (code, body) = call(
        &s,
        "GET",
        &format!("/projects/web/releases/{version}/changelog"),
        None,
    )
    .await;
    assert_eq!(code, 409, "{body}");
    assert_eq!(body["error"], "repository_not_configured");
    let (code, body) = call(
        &s,
        "PUT",
        "/projects/web",
        Some(json!({"repository": "not a repository"})),
    )
    .await;
    assert_eq!(code, 400, "{body}");
    assert_eq!(body["field"], "repository");
}

/// A monorepo's project names its paths as `.gitignore` lines: its changelogs list only the
/// commits that touched a file they match, read from each commit's changes once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_monorepo_project_lists_only_the_commits_under_its_paths() {
    let bb = FakeBitbucket::start(FakeBitbucketOptions::default()).await;
    monorepo(bb, "PROJ", &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_monorepo_project_on_cloud_reads_each_commits_diffstat() {
    let bb = FakeBitbucket::start(FakeBitbucketOptions {
        cloud_pr_index_polls: 0,
        ..FakeBitbucketOptions::with_flavour(BitbucketFlavour::Cloud)
    })
    .await;
    monorepo(bb, "PROJ", &[("BITBUCKET_API", "cloud")]).await;
}

async fn monorepo(bb: FakeBitbucket, owner: &str, extra: &[(&str, &str)]) {
    let bk = FakeBuildkite::start(FakeBuildkiteOptions::default()).await;
    bb.add_repository(owner, "mono");
    let t0 = Utc.with_ymd_and_hms(2026, 11, 1, 9, 0, 0).unwrap();
    let touched: [&[&str]; 7] = [
        &["README.md"],
        &["services/api/src/main.rs"],
        &["services/web/src/app.ts"],
        &["shared/events.proto", "services/web/src/app.ts"],
        &["services/api/README.md"],
        &["docs/api.md", "services/api/Cargo.toml"],
        &["services/web/package.json"],
    ];
    let commits = touched
        .iter()
        .enumerate()
        .map(|(i, paths)| {
            let n = i as u64 + 1;
            let parent = sha(n - 1);
            let parents: Vec<&str> = if n == 1 {
                vec![]
            } else {
                vec![parent.as_str()]
            };
            FakeCommit::new(
                &sha(n),
                &parents,
                &format!("Change {n}"),
                t0 + Days::hours(n as i64),
            )
            .touching(paths)
        })
        .collect();
    bb.add_commits(owner, "mono", commits);
    let s = serve(&bk, &bb, extra);
    let spec = json!({
        "repository": format!("{owner}/mono"),
        "paths": ["services/api/", "!services/api/README.md", "*.proto"],
        "environments": [{"name": "staging"}]
    });
    let (code, body) = call(&s, "PUT", "/projects/api", Some(spec)).await;
    assert_eq!(code, 201, "{body}");
    assert_eq!(body["paths"][2], "*.proto");
    for (commit, version) in [(1, "1.0.0"), (7, "1.1.0")] {
        let (code, body) = call(
            &s,
            "POST",
            "/projects/api/releases",
            Some(json!({"commit": sha(commit), "branch": "main", "version": version})),
        )
        .await;
        assert_eq!(code, 201, "{body}");
    }
    let (code, log) = call(&s, "GET", "/projects/api/releases/1.1.0/changelog", None).await;
    assert_eq!(code, 200, "{log}");
    // c2 (api source), c4 (a .proto), c6 (api's Cargo.toml); not c3, c7 (web) nor c5 (the
    // README taken back out with `!`).
    assert_eq!(ids(&log), shas(&[6, 4, 2]));
    assert_eq!(
        log["commits"][0]["paths"],
        json!(["docs/api.md", "services/api/Cargo.toml"])
    );
    assert_eq!(log["paths"][0], "services/api/");

    // Invalid patterns and lines are refused when the project is written.
    let (code, body) = call(
        &s,
        "PUT",
        "/projects/api",
        Some(json!({"repository": "PROJ/mono", "paths": ["a\nb"]})),
    )
    .await;
    assert_eq!(code, 400, "{body}");
    assert_eq!(body["field"], "paths[0]");
}

/// An environment's changelog: what runs there, and what waits to be promoted to it (the
/// candidate running in the environment it requires, or the newest built one), with the
/// commits that would bring.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_environment_shows_what_is_waiting_to_be_promoted() {
    let bk = FakeBuildkite::start(FakeBuildkiteOptions::default()).await;
    let bb = FakeBitbucket::start(FakeBitbucketOptions::default()).await;
    bb.add_repository("PROJ", "web");
    let (commits, prs) = history();
    bb.add_commits("PROJ", "web", commits);
    for pr in prs {
        bb.add_pull_request("PROJ", "web", pr);
    }
    let s = serve(&bk, &bb, &[]);
    let spec = json!({
        "repository": "PROJ/web",
        "environments": [{"name": "staging"}, {"name": "production", "requires": "staging"}]
    });
    assert_eq!(call(&s, "PUT", "/projects/web", Some(spec)).await.0, 201);
    let cut = |commit: u64, version: &str| json!({"commit": sha(commit), "branch": "main", "version": version});
    let succeeded = |env: &str, candidate: &str| {
        (
            format!("/projects/web/environments/{env}/deployments"),
            json!({"release_candidate_version": candidate, "status": "success"}),
        )
    };
    assert_eq!(
        call(&s, "POST", "/projects/web/releases", Some(cut(2, "1.0.0")))
            .await
            .0,
        201
    );
    for env in ["staging", "production"] {
        let (path, body) = succeeded(env, "1.0.0-rc1");
        let (code, answer) = call(&s, "PATCH", &path, Some(body)).await;
        assert!(code == 200 || code == 201, "{answer}");
    }
    assert_eq!(
        call(&s, "POST", "/projects/web/releases", Some(cut(5, "1.1.0")))
            .await
            .0,
        201
    );
    let (path, body) = succeeded("staging", "1.1.0-rc1");
    assert!(call(&s, "PATCH", &path, Some(body)).await.0 < 300);

    let (code, prod) = call(
        &s,
        "GET",
        "/projects/web/environments/production/changelog",
        None,
    )
    .await;
    assert_eq!(code, 200, "{prod}");
    assert_eq!(prod["deployed"]["candidate_version"], "1.0.0-rc1");
    assert_eq!(prod["waiting"]["candidate_version"], "1.1.0-rc1");
    assert_eq!(prod["waiting_in"], "staging");
    assert_eq!(ids(&prod), shas(&[5, 4, 3]));
    assert_eq!(prod["commits"][1]["pull_requests"][0]["id"], 7);

    // Staging runs the newest built candidate: nothing waits.
    let (code, staging) = call(
        &s,
        "GET",
        "/projects/web/environments/staging/changelog",
        None,
    )
    .await;
    assert_eq!(code, 200, "{staging}");
    assert_eq!(staging["deployed"]["candidate_version"], "1.1.0-rc1");
    assert_eq!(staging["waiting"], Value::Null);
    assert_eq!(staging["commits"], json!([]));

    // A newer cut waits for staging.
    assert_eq!(
        call(&s, "POST", "/projects/web/releases", Some(cut(8, "1.2.0")))
            .await
            .0,
        201
    );
    let (code, staging) = call(
        &s,
        "GET",
        "/projects/web/environments/staging/changelog",
        None,
    )
    .await;
    assert_eq!(code, 200, "{staging}");
    assert_eq!(staging["waiting"]["candidate_version"], "1.2.0-rc1");
    assert_eq!(staging["waiting_in"], Value::Null);
    assert_eq!(ids(&staging), shas(&[8, 7, 6]));
}

/// Bitbucket saying a repository or a commit does not exist is the project's configuration
/// (422 `bitbucket_refused`); Bitbucket down is an outage (502 `bitbucket_unavailable`), and
/// nothing is kept, so the next read tries again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_bitbucket_refuses_and_bitbucket_down_answer_differently() {
    let bk = FakeBuildkite::start(FakeBuildkiteOptions::default()).await;
    let bb = FakeBitbucket::start(FakeBitbucketOptions::default()).await;
    bb.add_repository("PROJ", "web");
    let (commits, _) = history();
    bb.add_commits("PROJ", "web", commits);
    let s = serve(&bk, &bb, &[("KITEBRIDGE_HTTP_TIMEOUT", "2")]);
    let spec = json!({"repository": "PROJ/web"});
    assert_eq!(call(&s, "PUT", "/projects/web", Some(spec)).await.0, 201);
    for (commit, version) in [(2, "1.0.0"), (3, "1.1.0")] {
        let (code, _) = call(
            &s,
            "POST",
            "/projects/web/releases",
            Some(json!({"commit": sha(commit), "branch": "main", "version": version})),
        )
        .await;
        assert_eq!(code, 201);
    }
    bb.inject_fault(Fault::Status(503), 1000);
    let (code, body) = call(&s, "GET", "/projects/web/releases/1.1.0/changelog", None).await;
    assert_eq!(code, 502, "{body}");
    assert_eq!(body["error"], "bitbucket_unavailable");
    bb.clear_faults();
    let (code, body) = call(&s, "GET", "/projects/web/releases/1.1.0/changelog", None).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["since_candidate_version"], "1.0.0-rc1");

    // A commit the repository does not have.
    let unknown = format!("{:040x}", 0xdead_u64);
    let (code, _) = call(
        &s,
        "POST",
        "/projects/web/releases",
        Some(json!({"commit": unknown, "branch": "main", "version": "2.0.0"})),
    )
    .await;
    assert_eq!(code, 201);
    let (code, body) = call(&s, "GET", "/projects/web/releases/2.0.0/changelog", None).await;
    assert_eq!(code, 422, "{body}");
    assert_eq!(body["error"], "bitbucket_refused");
}
