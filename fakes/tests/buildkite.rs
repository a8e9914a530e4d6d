//! The simulated Buildkite enforces the REST API's rules, checked with a plain reqwest client.

use std::time::Duration;

use chrono::{TimeZone, Utc};
use kitebridge_fakes::*;
use serde_json::{Value, json};

const ORG: &str = "acme-inc";
const SHA: &str = "4e1f0c9b7a2d3e5f6a8b9c0d1e2f3a4b5c6d7e8f";

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

async fn fake() -> FakeBuildkite {
    let bk = FakeBuildkite::start(FakeBuildkiteOptions {
        tokens: vec![
            ApiToken::new(DEFAULT_BUILDKITE_TOKEN, &["read_builds", "write_builds"]),
            ApiToken::new("read-only", &["read_builds"]),
            ApiToken::new("no-scopes", &[]),
        ],
        ..FakeBuildkiteOptions::default()
    })
    .await;
    bk.add_pipeline(Pipeline::new(
        ORG,
        "web-app",
        "Web App",
        "ssh://git@bitbucket.example:7999/web/web-app.git",
    ));
    bk
}

async fn get(bk: &FakeBuildkite, path_and_query: &str, token: &str) -> reqwest::Response {
    client()
        .get(format!("{}{path_and_query}", bk.url()))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

fn t(h: u32, m: u32) -> chrono::DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 3, 11, h, m, 0).unwrap()
}

#[tokio::test]
async fn auth_and_scopes_are_enforced() {
    let bk = fake().await;
    let url = format!("{}/v2/organizations/{ORG}/builds", bk.url());

    let r = client().get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.json::<Value>().await.unwrap()["message"].is_string());

    let r = client()
        .get(&url)
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // Basic auth is not supported.
    let r = client()
        .get(&url)
        .basic_auth(DEFAULT_BUILDKITE_TOKEN, Some(""))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    let r = get(&bk, &format!("/v2/organizations/{ORG}/builds"), "no-scopes").await;
    assert_eq!(r.status(), 403);
    assert!(
        r.json::<Value>().await.unwrap()["message"]
            .as_str()
            .unwrap()
            .contains("read_builds")
    );

    let r = client()
        .post(format!(
            "{}/v2/organizations/{ORG}/pipelines/web-app/builds",
            bk.url()
        ))
        .bearer_auth("read-only")
        .json(&json!({"commit": SHA, "branch": "main"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    let r = get(&bk, &format!("/v2/organizations/{ORG}/builds"), "read-only").await;
    assert_eq!(r.status(), 200);

    let r = get(
        &bk,
        "/v2/organizations/nope/builds",
        DEFAULT_BUILDKITE_TOKEN,
    )
    .await;
    assert_eq!(r.status(), 404);
    let r = get(
        &bk,
        &format!("/v2/organizations/{ORG}/pipelines/nope/builds"),
        DEFAULT_BUILDKITE_TOKEN,
    )
    .await;
    assert_eq!(r.status(), 404);
}

fn parse_links(h: Option<&reqwest::header::HeaderValue>) -> Vec<(String, String)> {
    let Some(h) = h else { return Vec::new() };
    h.to_str()
        .unwrap()
        .split(", ")
        .map(|part| {
            let (url, rel) = part.split_once("; rel=").unwrap();
            (
                rel.trim_matches('"').to_owned(),
                url.trim_start_matches('<').trim_end_matches('>').to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn pagination_follows_link_next_over_three_pages() {
    let bk = fake().await;
    let builds: Vec<Build> = (0..70)
        .map(|i| {
            Build::new(ORG, "web-app", SHA, "main")
                .with_state(BuildState::Passed)
                .with_created_at(t(8, 0) + chrono::Duration::minutes(i))
        })
        .collect();
    bk.add_builds(builds);

    let mut next = Some(format!(
        "{}/v2/organizations/{ORG}/builds?branch=main&exclude_jobs=true",
        bk.url()
    ));
    let mut numbers = Vec::new();
    let mut pages = 0;
    while let Some(url) = next.take() {
        let r = client()
            .get(&url)
            .bearer_auth(DEFAULT_BUILDKITE_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let links = parse_links(r.headers().get("link"));
        pages += 1;
        if pages == 1 {
            let rels: Vec<&str> = links.iter().map(|(r, _)| r.as_str()).collect();
            assert_eq!(rels, ["next", "last"]);
            assert!(links[0].1.starts_with(&bk.url()), "absolute URL");
            assert!(links[0].1.contains("page=2"));
            assert!(links[0].1.contains("branch=main"), "query kept");
            assert!(links[1].1.contains("page=3"));
        }
        if pages == 3 {
            let rels: Vec<&str> = links.iter().map(|(r, _)| r.as_str()).collect();
            assert_eq!(rels, ["first", "prev"]);
        }
        next = links.into_iter().find(|(r, _)| r == "next").map(|(_, u)| u);
        let body: Vec<Value> = r.json().await.unwrap();
        assert!(body.len() <= DEFAULT_PER_PAGE);
        for b in &body {
            assert!(b.get("jobs").is_none(), "exclude_jobs");
            assert_eq!(b["pipeline"]["slug"], "web-app");
            numbers.push(b["number"].as_u64().unwrap());
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(numbers.len(), 70);
    // Newest created first.
    let expected: Vec<u64> = (1..=70).rev().collect();
    assert_eq!(numbers, expected);
}

#[tokio::test]
async fn per_page_above_100_is_refused() {
    let bk = fake().await;
    let path = format!("/v2/organizations/{ORG}/builds");
    let r = get(
        &bk,
        &format!("{path}?per_page=101"),
        DEFAULT_BUILDKITE_TOKEN,
    )
    .await;
    assert_eq!(r.status(), 400);
    assert!(r.json::<Value>().await.unwrap()["message"].is_string());
    for bad in ["0", "-1", "ten"] {
        let r = get(
            &bk,
            &format!("{path}?per_page={bad}"),
            DEFAULT_BUILDKITE_TOKEN,
        )
        .await;
        assert_eq!(r.status(), 400, "per_page={bad}");
    }
    let r = get(
        &bk,
        &format!("{path}?per_page=100"),
        DEFAULT_BUILDKITE_TOKEN,
    )
    .await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn filters_select_builds_like_buildkite() {
    let bk = fake().await;
    let other = "1b2c3d4e5f60718293a4b5c6d7e8f9012a3b4c5d";
    bk.add_build(
        Build::new(ORG, "web-app", SHA, "main")
            .with_state(BuildState::Passed)
            .with_created_at(t(9, 0))
            .with_finished_at(t(9, 30)),
    ); // 1
    bk.add_build(
        Build::new(ORG, "web-app", other, "feature/dev-login")
            .with_state(BuildState::Failed)
            .with_created_at(t(10, 0))
            .with_finished_at(t(10, 5)),
    ); // 2
    bk.add_build(
        Build::new(ORG, "web-app", SHA, "main")
            .with_state(BuildState::Running)
            .with_created_at(t(11, 0)),
    ); // 3
    bk.add_build(
        Build::new(ORG, "web-app", SHA, "release/1.0")
            .with_state(BuildState::Passed)
            .with_blocked(true)
            .with_created_at(t(12, 0))
            .with_finished_at(t(12, 10)),
    ); // 4
    let numbers = |q: &'static str| {
        let bk = &bk;
        async move {
            let r = get(
                bk,
                &format!("/v2/organizations/{ORG}/builds?{q}"),
                DEFAULT_BUILDKITE_TOKEN,
            )
            .await;
            assert_eq!(r.status(), 200, "{q}");
            let body: Vec<Value> = r.json().await.unwrap();
            body.iter()
                .map(|b| b["number"].as_u64().unwrap())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(numbers("").await, [4, 3, 2, 1]);
    assert_eq!(
        numbers("created_from=2025-03-11T10:00:00Z").await,
        [4, 3, 2]
    );
    // created_to is exclusive.
    assert_eq!(numbers("created_to=2025-03-11T10:00:00Z").await, [1]);
    assert_eq!(
        numbers("created_from=2025-03-11T11:00:00%2B01:00").await,
        [4, 3, 2]
    );
    assert_eq!(numbers("finished_from=2025-03-11T10:05:00Z").await, [4, 2]);
    assert_eq!(numbers("state=running").await, [3]);
    assert_eq!(numbers("state[]=running&state[]=failed").await, [3, 2]);
    assert_eq!(numbers("state=finished").await, [4, 2, 1]);
    assert_eq!(numbers("state=blocked").await, [4]);
    assert_eq!(numbers("branch=main").await, [3, 1]);
    assert_eq!(numbers("branch=*dev*").await, [2]);
    assert_eq!(numbers("branch[]=main&branch[]=release/*").await, [4, 3, 1]);
    assert_eq!(
        numbers(concat!(
            "commit=",
            "1b2c3d4e5f60718293a4b5c6d7e8f9012a3b4c5d"
        ))
        .await,
        [2]
    );
    // Short SHAs match nothing.
    assert_eq!(numbers("commit=1b2c3d4").await, Vec::<u64>::new());

    // Unparseable times (including an unencoded '+' that arrives as a space) are refused.
    for q in [
        "created_from=yesterday",
        "created_from=2025-03-11T11:00:00+01:00",
        "finished_from=11/03/2025",
    ] {
        let r = get(
            &bk,
            &format!("/v2/organizations/{ORG}/builds?{q}"),
            DEFAULT_BUILDKITE_TOKEN,
        )
        .await;
        assert_eq!(r.status(), 422, "{q}");
    }
    let r = get(
        &bk,
        &format!("/v2/organizations/{ORG}/builds?state=finshed"),
        DEFAULT_BUILDKITE_TOKEN,
    )
    .await;
    assert_eq!(r.status(), 422);

    // Pipeline-scoped listing and exclusions.
    let r = get(
        &bk,
        &format!("/v2/organizations/{ORG}/pipelines/web-app/builds?exclude_pipeline=true"),
        DEFAULT_BUILDKITE_TOKEN,
    )
    .await;
    let body: Vec<Value> = r.json().await.unwrap();
    assert_eq!(body.len(), 4);
    assert!(body[0].get("pipeline").is_none());
    assert_eq!(body[0]["jobs"], json!([]));
    // A blocked build keeps its state with blocked: true.
    assert_eq!(body[0]["state"], "passed");
    assert_eq!(body[0]["blocked"], true);
}

#[tokio::test]
async fn build_json_looks_like_buildkite() {
    let bk = fake().await;
    let b = bk.add_build(
        Build::new(ORG, "web-app", SHA, "main")
            .with_state(BuildState::Passed)
            .with_message("Merge pull request #412")
            .with_meta_data("buildkite:git:commit", "commit 4e1f…"),
    );
    let r = get(
        &bk,
        &format!(
            "/v2/organizations/{ORG}/pipelines/web-app/builds/{}",
            b.number
        ),
        DEFAULT_BUILDKITE_TOKEN,
    )
    .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    for key in [
        "id",
        "graphql_id",
        "url",
        "web_url",
        "number",
        "state",
        "blocked",
        "message",
        "commit",
        "branch",
        "env",
        "source",
        "creator",
        "created_at",
        "scheduled_at",
        "started_at",
        "finished_at",
        "meta_data",
        "pull_request",
        "pipeline",
        "jobs",
    ] {
        assert!(v.get(key).is_some(), "missing {key}");
    }
    assert_eq!(v["state"], "passed");
    assert!(v["finished_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        v["web_url"],
        format!("https://buildkite.com/{ORG}/web-app/builds/{}", b.number)
    );
    assert_eq!(
        v["pipeline"]["repository"],
        "ssh://git@bitbucket.example:7999/web/web-app.git"
    );
    let r = get(
        &bk,
        &format!("/v2/organizations/{ORG}/pipelines/web-app/builds/999"),
        DEFAULT_BUILDKITE_TOKEN,
    )
    .await;
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn rate_limit_answers_429_with_headers() {
    let bk = FakeBuildkite::start(FakeBuildkiteOptions {
        rate_limit: 3,
        rate_limit_window: Duration::from_secs(1),
        ..FakeBuildkiteOptions::default()
    })
    .await;
    let path = format!("/v2/organizations/{ORG}/builds");
    for remaining in [2, 1, 0] {
        let r = get(&bk, &path, DEFAULT_BUILDKITE_TOKEN).await;
        assert_eq!(r.status(), 200);
        let h = r.headers();
        assert_eq!(h["ratelimit-scope"], "rest");
        assert_eq!(h["ratelimit-limit"], "3");
        assert_eq!(h["ratelimit-remaining"], remaining.to_string().as_str());
        assert_eq!(h["ratelimit-reset"], "1");
    }
    let r = get(&bk, &path, DEFAULT_BUILDKITE_TOKEN).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["ratelimit-remaining"], "0");
    assert!(r.headers().contains_key("ratelimit-warning"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["scope"], "rest");
    assert_eq!(body["limit"], 3);
    assert_eq!(body["current"], 4);
    assert_eq!(body["reset"], 1);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("You have exceeded your API rate limit.")
    );

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = get(&bk, &path, DEFAULT_BUILDKITE_TOKEN).await;
    assert_eq!(r.status(), 200, "a new window");
}

#[tokio::test]
async fn per_user_rate_limit_is_optional() {
    let bk = FakeBuildkite::start(FakeBuildkiteOptions {
        user_rate_limit: Some(1),
        rate_limit_window: Duration::from_secs(30),
        ..FakeBuildkiteOptions::default()
    })
    .await;
    let path = format!("/v2/organizations/{ORG}/builds");
    let r = get(&bk, &path, DEFAULT_BUILDKITE_TOKEN).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["ratelimit-user-scope"], "rest_user");
    assert_eq!(r.headers()["ratelimit-user-remaining"], "0");
    let r = get(&bk, &path, DEFAULT_BUILDKITE_TOKEN).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.json::<Value>().await.unwrap()["scope"], "rest_user");
}

#[tokio::test]
async fn create_build_201_422_404() {
    let bk = fake().await;
    let url = format!(
        "{}/v2/organizations/{ORG}/pipelines/web-app/builds",
        bk.url()
    );
    let post = |body: Value| {
        let url = url.clone();
        async move {
            client()
                .post(url)
                .bearer_auth(DEFAULT_BUILDKITE_TOKEN)
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    let r = post(json!({
        "commit": SHA,
        "branch": "main",
        "message": "Release v1.2.0",
        "env": {"RELEASE": "v1.2.0"},
        "meta_data": {"release-id": "42"},
        "author": {"name": "Dana", "email": "dana@acme-inc.example"},
    }))
    .await;
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["state"], "scheduled");
    assert_eq!(v["source"], "api");
    assert_eq!(v["number"], 1);
    assert_eq!(v["env"]["RELEASE"], "v1.2.0");
    assert_eq!(v["meta_data"]["release-id"], "42");
    assert_eq!(v["pipeline"]["slug"], "web-app");
    assert!(v["id"].as_str().unwrap().len() == 36);
    assert!(v["url"].as_str().unwrap().starts_with(&bk.url()));
    assert!(
        v["web_url"]
            .as_str()
            .unwrap()
            .ends_with("/web-app/builds/1")
    );
    assert!(v["created_at"].is_string());
    assert!(v["started_at"].is_null());

    let r = post(json!({"commit": "HEAD", "branch": "main"})).await;
    assert_eq!(r.json::<Value>().await.unwrap()["number"], 2);

    let r = post(json!({"branch": "main"})).await;
    assert_eq!(r.status(), 422);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["message"], "Validation Failed");
    assert_eq!(v["errors"][0]["field"], "commit");

    let r = post(json!({"commit": SHA, "branch": ""})).await;
    assert_eq!(r.status(), 422);
    let r = post(json!({"commit": SHA, "branch": "main", "meta_data": {"n": 1}})).await;
    assert_eq!(r.status(), 422, "meta_data values are strings");

    let r = client()
        .post(&url)
        .bearer_auth(DEFAULT_BUILDKITE_TOKEN)
        .body("commit=abc&branch=main")
        .header("content-type", "application/x-www-form-urlencoded")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "form encoding is not accepted");

    let r = client()
        .post(format!(
            "{}/v2/organizations/{ORG}/pipelines/nope/builds",
            bk.url()
        ))
        .bearer_auth(DEFAULT_BUILDKITE_TOKEN)
        .json(&json!({"commit": SHA, "branch": "main"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    let created = bk.created_builds();
    assert_eq!(created.len(), 2);
    assert_eq!(created[0].env["RELEASE"], "v1.2.0");
    assert_eq!(created[0].meta_data["release-id"], "42");
    assert_eq!(created[0].message, "Release v1.2.0");

    let r = get(
        &bk,
        &format!("/v2/organizations/{ORG}/pipelines/web-app/builds/1"),
        DEFAULT_BUILDKITE_TOKEN,
    )
    .await;
    assert_eq!(r.json::<Value>().await.unwrap()["env"]["RELEASE"], "v1.2.0");
}

#[tokio::test]
async fn state_changes_set_timestamps() {
    let bk = fake().await;
    let b = bk.add_build(Build::new(ORG, "web-app", SHA, "main"));
    assert!(b.started_at.is_none() && b.finished_at.is_none());
    let b = bk
        .set_build_state(ORG, "web-app", b.number, BuildState::Running)
        .unwrap();
    assert!(b.started_at.is_some() && b.finished_at.is_none());
    let b = bk
        .set_build_state(ORG, "web-app", b.number, BuildState::Passed)
        .unwrap();
    assert!(b.finished_at.unwrap() >= b.started_at.unwrap());
    let b = bk
        .set_build_blocked(ORG, "web-app", b.number, true)
        .unwrap();
    assert!(b.blocked);
    assert_eq!(b.state, BuildState::Passed);
    assert!(
        bk.set_build_state(ORG, "web-app", 999, BuildState::Passed)
            .is_none()
    );
}

#[tokio::test]
async fn webhooks_are_shaped_and_signed_like_buildkite() {
    use std::sync::{Arc, Mutex};
    let bk = fake().await;
    let b = bk.add_build(
        Build::new(ORG, "web-app", SHA, "main")
            .with_state(BuildState::Passed)
            .with_blocked(true),
    );

    // A tiny receiver that keeps what it got.
    type Got = Arc<Mutex<Vec<(axum::http::HeaderMap, String)>>>;
    let got: Got = Arc::default();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post({
            let got = got.clone();
            move |headers: axum::http::HeaderMap, body: String| {
                let got = got.clone();
                async move {
                    got.lock().unwrap().push((headers, body));
                    "ok"
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let hook = format!("http://{addr}/hook");

    let token = "29b1ff5779c76bd48ba6705eb99ff970";
    let d = bk
        .webhook(
            ORG,
            "web-app",
            b.number,
            WebhookEvent::BuildFinished,
            &WebhookAuth::Signature {
                token: token.into(),
                timestamp: None,
            },
        )
        .unwrap();
    assert_eq!(
        deliver_webhook(&hook, &d).await.unwrap(),
        (200, "ok".to_owned())
    );
    let d2 = bk
        .webhook(
            ORG,
            "web-app",
            b.number,
            WebhookEvent::BuildRunning,
            &WebhookAuth::Token(token.into()),
        )
        .unwrap();
    deliver_webhook(&hook, &d2).await.unwrap();

    let got = got.lock().unwrap().clone();
    let (h, body) = &got[0];
    assert_eq!(h["x-buildkite-event"], "build.finished");
    assert!(h.get("x-buildkite-token").is_none());
    let sig = h["x-buildkite-signature"].to_str().unwrap();
    let (ts, mac) = sig.split_once(',').unwrap();
    let ts: i64 = ts.strip_prefix("timestamp=").unwrap().parse().unwrap();
    assert_eq!(
        mac.strip_prefix("signature=").unwrap(),
        sign_webhook(token, ts, body)
    );
    let v: Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["event"], "build.finished");
    assert!(v["build"].get("jobs").is_none());
    assert!(v["build"].get("pipeline").is_none());
    assert_eq!(v["build"]["blocked"], true);
    assert_eq!(v["build"]["state"], "passed");
    assert_eq!(v["pipeline"]["slug"], "web-app");
    assert_eq!(v["sender"]["name"], "Webhook Owner");

    let (h, _) = &got[1];
    assert_eq!(h["x-buildkite-event"], "build.running");
    assert_eq!(h["x-buildkite-token"], token);
    assert!(h.get("x-buildkite-signature").is_none());

    let ping = bk.ping_webhook(ORG, &hook, &WebhookAuth::Token(token.into()));
    assert_eq!(ping.json()["event"], "ping");
    assert_eq!(ping.header("X-Buildkite-Event"), Some("ping"));
}

#[tokio::test]
async fn ten_thousand_builds_page_quickly() {
    let bk = fake().await;
    let start = t(0, 0);
    bk.add_builds((0..10_000).map(|i| {
        Build::new(ORG, "web-app", SHA, if i % 2 == 0 { "main" } else { "dev" })
            .with_state(BuildState::Passed)
            .with_created_at(start + chrono::Duration::seconds(i))
    }));
    let began = std::time::Instant::now();
    let r = get(
        &bk,
        &format!("/v2/organizations/{ORG}/builds?per_page=100&page=50&branch=main"),
        DEFAULT_BUILDKITE_TOKEN,
    )
    .await;
    assert_eq!(r.status(), 200);
    let links = parse_links(r.headers().get("link"));
    // The last page has no `next` (and no `last`), only `first` and `prev`.
    assert!(!links.iter().any(|(r, _)| r == "next" || r == "last"));
    assert!(
        links
            .iter()
            .any(|(r, u)| r == "prev" && u.contains("page=49"))
    );
    let body: Vec<Value> = r.json().await.unwrap();
    assert_eq!(body.len(), 100);
    assert!(
        began.elapsed() < Duration::from_secs(2),
        "{:?}",
        began.elapsed()
    );
}

#[tokio::test]
async fn listing_too_deep_is_refused_when_configured() {
    let bk = FakeBuildkite::start(FakeBuildkiteOptions {
        max_list_depth: Some(200),
        ..FakeBuildkiteOptions::default()
    })
    .await;
    let r = get(
        &bk,
        &format!("/v2/organizations/{ORG}/builds?per_page=100&page=3"),
        DEFAULT_BUILDKITE_TOKEN,
    )
    .await;
    assert_eq!(r.status(), 400);
    assert!(
        r.json::<Value>().await.unwrap()["message"]
            .as_str()
            .unwrap()
            .starts_with("Listing builds this deep")
    );
}

async fn put(bk: &FakeBuildkite, path: &str, token: &str) -> reqwest::Response {
    client()
        .put(format!("{}{path}", bk.url()))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn retrying_a_job_runs_the_same_build_again() {
    let bk = fake().await;
    let b = bk.add_build(
        Build::new(ORG, "web-app", SHA, "main")
            .with_state(BuildState::Failed)
            .with_job(Job::new("build", JobState::Passed))
            .with_job(Job::new("test", JobState::Failed)),
    );
    let failed_at = b.finished_at.unwrap();
    let (lint, test) = (b.jobs[0].id.clone(), b.jobs[1].id.clone());
    let base = format!(
        "/v2/organizations/{ORG}/pipelines/web-app/builds/{}",
        b.number
    );

    // Scope, then Buildkite's rules: a passed job cannot be retried.
    let r = put(&bk, &format!("{base}/jobs/{test}/retry"), "read-only").await;
    assert_eq!(r.status(), 403);
    let r = put(
        &bk,
        &format!("{base}/jobs/{lint}/retry"),
        DEFAULT_BUILDKITE_TOKEN,
    )
    .await;
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap()["message"],
        "Only failed, timed out or canceled jobs can be retried"
    );

    tokio::time::sleep(Duration::from_millis(20)).await;
    let r = put(
        &bk,
        &format!("{base}/jobs/{test}/retry"),
        DEFAULT_BUILDKITE_TOKEN,
    )
    .await;
    assert_eq!(r.status(), 200);
    let new: Value = r.json().await.unwrap();
    assert_ne!(new["id"], test.as_str());
    assert_eq!(new["retries_count"], 1);
    assert_eq!(new["retry_source"]["job_id"], test.as_str());
    assert_eq!(new["retry_type"], "manual");
    assert_eq!(new["state"], "scheduled");

    // The old id is retried once only.
    let r = put(
        &bk,
        &format!("{base}/jobs/{test}/retry"),
        DEFAULT_BUILDKITE_TOKEN,
    )
    .await;
    assert_eq!(r.status(), 400);

    // The same build (id and number) is running again, without a finish.
    let v: Value = get(&bk, &base, DEFAULT_BUILDKITE_TOKEN)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["id"], b.id.as_str());
    assert_eq!(v["state"], "running");
    assert!(v["finished_at"].is_null(), "{v}");
    assert_eq!(
        v["jobs"].as_array().unwrap().len(),
        2,
        "retried jobs hidden"
    );
    let v: Value = get(
        &bk,
        &format!("{base}?include_retried_jobs=true"),
        DEFAULT_BUILDKITE_TOKEN,
    )
    .await
    .json()
    .await
    .unwrap();
    let jobs = v["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 3);
    let old = jobs.iter().find(|j| j["id"] == test.as_str()).unwrap();
    assert_eq!(old["retried"], true);
    assert_eq!(old["retried_in_job_id"], new["id"]);

    // The new job passes: the build passed, finished later than its first finish.
    let new_id = new["id"].as_str().unwrap();
    bk.set_job_state(ORG, "web-app", b.number, new_id, JobState::Running)
        .unwrap();
    let passed = bk
        .set_job_state(ORG, "web-app", b.number, new_id, JobState::Passed)
        .unwrap();
    assert_eq!(passed.state, BuildState::Passed);
    assert!(passed.finished_at.unwrap() > failed_at);
    assert!(passed.started_at.unwrap() > failed_at);

    // retry_failed_jobs: 202 with a count; canceled builds refuse with 422.
    let r = put(
        &bk,
        &format!("{base}/retry_failed_jobs"),
        DEFAULT_BUILDKITE_TOKEN,
    )
    .await;
    assert_eq!(r.status(), 202);
    assert_eq!(r.json::<Value>().await.unwrap()["retried_jobs_count"], 0);
    let c = bk.add_build(
        Build::new(ORG, "web-app", SHA, "main")
            .with_state(BuildState::Canceled)
            .with_job(Job::new("test", JobState::Canceled)),
    );
    let r = put(
        &bk,
        &format!(
            "/v2/organizations/{ORG}/pipelines/web-app/builds/{}/jobs/{}/retry",
            c.number, c.jobs[0].id
        ),
        DEFAULT_BUILDKITE_TOKEN,
    )
    .await;
    assert_eq!(r.status(), 422);
}

#[tokio::test]
async fn a_clock_offset_shows_in_timestamps_and_the_date_header() {
    let bk = FakeBuildkite::start(FakeBuildkiteOptions {
        clock_offset: chrono::Duration::minutes(-10),
        ..FakeBuildkiteOptions::default()
    })
    .await;
    bk.add_pipeline(Pipeline::new(
        ORG,
        "web",
        "Web",
        "ssh://git@x:7999/p/web.git",
    ));
    let b = bk.add_build(Build::new(ORG, "web", SHA, "main").with_state(BuildState::Passed));
    let behind = Utc::now() - b.finished_at.unwrap();
    assert!(behind > chrono::Duration::minutes(9), "{behind}");
    let r = get(
        &bk,
        &format!("/v2/organizations/{ORG}/builds"),
        DEFAULT_BUILDKITE_TOKEN,
    )
    .await;
    let date = r.headers()["date"].to_str().unwrap().to_owned();
    let date = chrono::DateTime::parse_from_rfc2822(&date).unwrap();
    let behind = Utc::now() - date.with_timezone(&Utc);
    assert!(behind > chrono::Duration::minutes(9), "{behind}");
}

#[tokio::test]
async fn link_faults_point_elsewhere_or_name_a_huge_last_page() {
    let bk = fake().await;
    for n in 1..=3 {
        bk.add_build(Build::new(ORG, "web-app", format!("{n:040x}"), "main"));
    }
    let path = format!("/v2/organizations/{ORG}/builds?per_page=1");
    bk.set_link_fault(Some(LinkFault::OtherHost("http://127.0.0.2:9".into())));
    let r = get(&bk, &path, DEFAULT_BUILDKITE_TOKEN).await;
    let links = parse_links(r.headers().get("link"));
    assert!(
        links
            .iter()
            .all(|(_, u)| u.starts_with("http://127.0.0.2:9/")),
        "{links:?}"
    );
    bk.set_link_fault(Some(LinkFault::LastPage(u64::MAX)));
    let r = get(&bk, &path, DEFAULT_BUILDKITE_TOKEN).await;
    let links = parse_links(r.headers().get("link"));
    let last = links.iter().find(|(rel, _)| rel == "last").unwrap();
    assert!(last.1.ends_with(&format!("page={}", u64::MAX)), "{links:?}");
    let next = links.iter().find(|(rel, _)| rel == "next").unwrap();
    assert!(next.1.ends_with("page=2"), "{links:?}");
    bk.set_link_fault(None);
}
