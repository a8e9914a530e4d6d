//! The simulated Bitbucket enforces each build-status API's rules, checked with a plain reqwest
//! client.

use std::time::Duration;

use kitebridge_fakes::*;
use serde_json::{Value, json};

const SHA: &str = "4e1f0c9b7a2d3e5f6a8b9c0d1e2f3a4b5c6d7e8f";

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

fn dc(cancelled_status: bool) -> FakeBitbucketOptions {
    FakeBitbucketOptions::with_flavour(BitbucketFlavour::DataCenter {
        version: "8.19.0".into(),
        cancelled_status,
    })
}

async fn post(bb: &FakeBitbucket, path: &str, body: Value) -> reqwest::Response {
    client()
        .post(format!("{}{path}", bb.url()))
        .basic_auth(DEFAULT_BITBUCKET_USER, Some(DEFAULT_BITBUCKET_PASSWORD))
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn get(bb: &FakeBitbucket, path: &str) -> reqwest::Response {
    client()
        .get(format!("{}{path}", bb.url()))
        .bearer_auth(DEFAULT_BITBUCKET_TOKEN)
        .send()
        .await
        .unwrap()
}

/// The `context`s of a Server/DC error answer.
async fn error_contexts(r: reqwest::Response) -> Vec<String> {
    let v: Value = r.json().await.unwrap();
    v["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert!(e["message"].is_string());
            e["context"].as_str().unwrap_or("").to_owned()
        })
        .collect()
}

fn legacy(commit: &str) -> String {
    format!("/rest/build-status/1.0/commits/{commit}")
}

#[tokio::test]
async fn legacy_endpoint_enforces_fields_states_and_limits() {
    let bb = FakeBitbucket::start(FakeBitbucketOptions::with_flavour(
        BitbucketFlavour::Server {
            version: "6.10.0".into(),
        },
    ))
    .await;
    let ok = json!({"state": "SUCCESSFUL", "key": "BK-web", "url": "https://buildkite.com/acme/web/builds/1", "name": "web #1", "description": "Passed"});
    let r = post(&bb, &legacy(SHA), ok.clone()).await;
    assert_eq!(r.status(), 204);
    assert_eq!(r.text().await.unwrap(), "");
    // `/latest/` works too.
    let r = post(
        &bb,
        &format!("/rest/build-status/latest/commits/{SHA}"),
        ok.clone(),
    )
    .await;
    assert_eq!(r.status(), 204);

    for missing in ["state", "key", "url"] {
        let mut body = ok.clone();
        body.as_object_mut().unwrap().remove(missing);
        let r = post(&bb, &legacy(SHA), body).await;
        assert_eq!(r.status(), 400, "without {missing}");
        assert_eq!(error_contexts(r).await, [missing]);
    }
    for bad in ["CANCELLED", "UNKNOWN", "successful", "PASSED"] {
        let r = post(
            &bb,
            &legacy(SHA),
            json!({"state": bad, "key": "k", "url": "u"}),
        )
        .await;
        assert_eq!(r.status(), 400, "state {bad}");
        assert_eq!(error_contexts(r).await, ["state"]);
    }
    // Limits: 255 for every field, 450 for url.
    for (field, max) in [
        ("key", 255),
        ("name", 255),
        ("description", 255),
        ("url", 450),
    ] {
        let mut body = ok.clone();
        body[field] = json!("x".repeat(max));
        assert_eq!(
            post(&bb, &legacy(SHA), body.clone()).await.status(),
            204,
            "{field} at {max}"
        );
        body[field] = json!("x".repeat(max + 1));
        let r = post(&bb, &legacy(SHA), body).await;
        assert_eq!(r.status(), 400, "{field} over {max}");
        assert_eq!(error_contexts(r).await, [field]);
    }
    // 255 accented characters fit; 254 + one emoji (two UTF-16 units) do not.
    let mut body = ok.clone();
    body["description"] = json!("é".repeat(255));
    assert_eq!(post(&bb, &legacy(SHA), body.clone()).await.status(), 204);
    body["description"] = json!(format!("{}🚀", "a".repeat(254)));
    assert_eq!(post(&bb, &legacy(SHA), body).await.status(), 400);

    // Commit must be a full 40-hex SHA.
    for bad in [
        "4e1f0c9",
        "4e1f0c9b7a2d3e5f6a8b9c0d1e2f3a4b5c6d7e8g",
        "main",
    ] {
        let r = post(&bb, &legacy(bad), ok.clone()).await;
        assert_eq!(r.status(), 400, "commit {bad}");
        let v: Value = r.json().await.unwrap();
        assert!(v["errors"][0]["message"].as_str().unwrap().contains(bad));
    }
    // Not JSON content.
    let r = client()
        .post(format!("{}{}", bb.url(), legacy(SHA)))
        .basic_auth(DEFAULT_BITBUCKET_USER, Some(DEFAULT_BITBUCKET_PASSWORD))
        .header("content-type", "text/plain")
        .body(ok.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    // Not a JSON body.
    let r = client()
        .post(format!("{}{}", bb.url(), legacy(SHA)))
        .basic_auth(DEFAULT_BITBUCKET_USER, Some(DEFAULT_BITBUCKET_PASSWORD))
        .header("content-type", "application/json")
        .body("{state: SUCCESSFUL")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    // The Server flavour has no repository-scoped API and no capabilities.
    let r = get(&bb, "/rest/api/latest/build/capabilities").await;
    assert_eq!(r.status(), 404);
    let r = post(
        &bb,
        &format!("/rest/api/latest/projects/P/repos/r/commits/{SHA}/builds"),
        ok,
    )
    .await;
    assert_eq!(r.status(), 404);
    let r = get(&bb, "/rest/api/1.0/application-properties").await;
    assert_eq!(r.json::<Value>().await.unwrap()["version"], "6.10.0");
}

#[tokio::test]
async fn same_key_replaces_and_history_is_kept() {
    let bb = FakeBitbucket::start(FakeBitbucketOptions::default()).await;
    let other = "1b2c3d4e5f60718293a4b5c6d7e8f9012a3b4c5d";
    for (commit, key, state) in [
        (SHA, "BK-1", "INPROGRESS"),
        (SHA, "BK-1", "SUCCESSFUL"),
        (SHA, "BK-2", "FAILED"),
        (other, "BK-1", "INPROGRESS"),
    ] {
        let r = post(
            &bb,
            &legacy(commit),
            json!({"state": state, "key": key, "url": "https://x"}),
        )
        .await;
        assert_eq!(r.status(), 204);
    }
    // Upper-case hex is the same commit.
    let r = post(
        &bb,
        &legacy(&SHA.to_uppercase()),
        json!({"state": "FAILED", "key": "BK-1", "url": "https://x"}),
    )
    .await;
    assert_eq!(r.status(), 204);

    assert_eq!(bb.status(SHA, "BK-1").unwrap().state, "FAILED");
    let states: Vec<String> = bb
        .history(SHA, "BK-1")
        .into_iter()
        .map(|p| p.state)
        .collect();
    assert_eq!(states, ["INPROGRESS", "SUCCESSFUL", "FAILED"]);
    assert_eq!(bb.statuses_for_commit(SHA).len(), 2);
    assert_eq!(bb.current_statuses().len(), 3);
    assert_eq!(bb.posts().len(), 5);

    // GET lists the current statuses, paged.
    let r = get(&bb, &format!("{}?limit=1", legacy(SHA))).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["isLastPage"], false);
    assert_eq!(v["nextPageStart"], 1);
    assert_eq!(v["values"].as_array().unwrap().len(), 1);
    let r = get(&bb, &format!("{}?start=1&limit=1", legacy(SHA))).await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["isLastPage"], true);
    assert!(v.get("nextPageStart").is_none());
}

#[tokio::test]
async fn credentials_are_checked() {
    let bb = FakeBitbucket::start(FakeBitbucketOptions {
        credentials: vec![
            Credential::Basic {
                username: "alice".into(),
                password: "pw".into(),
            },
            Credential::PersonalToken {
                username: "bob".into(),
                token: "bob-pat".into(),
            },
            Credential::AccessToken("repo-token".into()),
        ],
        ..dc(true)
    })
    .await;
    let body = json!({"state": "SUCCESSFUL", "key": "k", "url": "https://x"});
    let url = format!("{}{}", bb.url(), legacy(SHA));
    let send = |rb: reqwest::RequestBuilder| {
        let body = body.clone();
        async move { rb.json(&body).send().await.unwrap().status().as_u16() }
    };
    assert_eq!(send(client().post(&url)).await, 401);
    assert_eq!(
        send(client().post(&url).basic_auth("alice", Some("nope"))).await,
        401
    );
    assert_eq!(
        send(client().post(&url).basic_auth("alice", Some("pw"))).await,
        204
    );
    assert_eq!(
        send(client().post(&url).basic_auth("bob", Some("bob-pat"))).await,
        204
    );
    assert_eq!(send(client().post(&url).bearer_auth("bob-pat")).await, 204);
    assert_eq!(
        send(client().post(&url).bearer_auth("repo-token")).await,
        204
    );
    // HTTP access tokens must be Bearer, never Basic.
    assert_eq!(
        send(
            client()
                .post(&url)
                .basic_auth("x-token-auth", Some("repo-token"))
        )
        .await,
        401
    );
    assert_eq!(send(client().post(&url).bearer_auth("pw")).await, 401);

    let r = client().post(&url).json(&body).send().await.unwrap();
    assert!(r.headers().contains_key("www-authenticate"));
    let v: Value = r.json().await.unwrap();
    assert!(v["errors"][0]["message"].is_string());
}

fn repo_path(project: &str, slug: &str, commit: &str) -> String {
    format!("/rest/api/latest/projects/{project}/repos/{slug}/commits/{commit}/builds")
}

#[tokio::test]
async fn capabilities_follow_the_flavour() {
    let bb = FakeBitbucket::start(dc(true)).await;
    let r = get(&bb, "/rest/api/latest/build/capabilities").await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"buildStatus": ["richBuildStatus", "cancelledStatus"]})
    );
    let r = get(&bb, "/rest/api/1.0/build/capabilities").await;
    assert_eq!(r.status(), 200);

    let bb = FakeBitbucket::start(dc(false)).await;
    let r = get(&bb, "/rest/api/latest/build/capabilities").await;
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"buildStatus": ["richBuildStatus"]})
    );

    let old = FakeBitbucket::start(FakeBitbucketOptions::with_flavour(
        BitbucketFlavour::DataCenter {
            version: "7.2.0".into(),
            cancelled_status: false,
        },
    ))
    .await;
    let r = get(&old, "/rest/api/latest/build/capabilities").await;
    assert_eq!(r.status(), 404);
    old.add_repository("PROJ", "web");
    let r = post(
        &old,
        &repo_path("PROJ", "web", SHA),
        json!({"state": "SUCCESSFUL", "key": "k", "url": "https://x"}),
    )
    .await;
    assert_eq!(r.status(), 404, "no repository-scoped API before 7.4");
}

#[tokio::test]
async fn repository_scoped_api_rules() {
    let bb = FakeBitbucket::start(dc(true)).await;
    bb.add_repository("PROJ", "web-app");
    let full = json!({
        "key": "BK-web-app",
        "state": "INPROGRESS",
        "url": "https://buildkite.com/acme/web-app/builds/7",
        "buildNumber": "7",
        "name": "web-app #7",
        "description": "Running",
        "duration": 1200,
        "parent": "BK-web-app",
        "ref": "refs/heads/main",
        "testResults": {"successful": 3, "failed": 0, "skipped": 1},
    });
    let r = post(&bb, &repo_path("PROJ", "web-app", SHA), full.clone()).await;
    assert_eq!(r.status(), 204);
    // Project keys are case-insensitive; /rest/api/1.0 works too.
    let r = post(
        &bb,
        &format!("/rest/api/1.0/projects/proj/repos/web-app/commits/{SHA}/builds"),
        json!({"key": "BK-web-app", "state": "CANCELLED", "url": "https://x"}),
    )
    .await;
    assert_eq!(r.status(), 204);
    let r = post(
        &bb,
        &repo_path("PROJ", "web-app", SHA),
        json!({"key": "other", "state": "UNKNOWN", "url": "https://x"}),
    )
    .await;
    assert_eq!(r.status(), 204);

    let cur = bb.status(SHA, "BK-web-app").unwrap();
    assert_eq!(cur.state, "CANCELLED");
    assert_eq!(
        cur.scope,
        StatusScope::Repository {
            project_key: "PROJ".into(),
            slug: "web-app".into()
        }
    );
    assert_eq!(bb.history(SHA, "BK-web-app").len(), 2);

    // GET ?key= returns the one status; DELETE removes it.
    let r = get(
        &bb,
        &format!("{}?key=BK-web-app", repo_path("PROJ", "web-app", SHA)),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["state"], "CANCELLED");
    let r = get(
        &bb,
        &format!("{}?key=nope", repo_path("PROJ", "web-app", SHA)),
    )
    .await;
    assert_eq!(r.status(), 404);
    let r = client()
        .delete(format!(
            "{}{}?key=other",
            bb.url(),
            repo_path("PROJ", "web-app", SHA)
        ))
        .bearer_auth(DEFAULT_BITBUCKET_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert!(bb.status(SHA, "other").is_none());

    // Unknown repository or project: 404.
    let ok = json!({"key": "k", "state": "SUCCESSFUL", "url": "https://x"});
    let r = post(&bb, &repo_path("PROJ", "nope", SHA), ok.clone()).await;
    assert_eq!(r.status(), 404);
    let r = post(&bb, &repo_path("NOPE", "web-app", SHA), ok.clone()).await;
    assert_eq!(r.status(), 404);

    // Field rules.
    let cases: Vec<(Value, &str)> = vec![
        (json!({"state": "SUCCESSFUL", "url": "https://x"}), "key"),
        (json!({"key": "k", "url": "https://x"}), "state"),
        (json!({"key": "k", "state": "SUCCESSFUL"}), "url"),
        (
            json!({"key": "k", "state": "STOPPED", "url": "https://x"}),
            "state",
        ),
        (
            json!({"key": " ", "state": "SUCCESSFUL", "url": "https://x"}),
            "key",
        ),
        (
            json!({"key": "x".repeat(256), "state": "SUCCESSFUL", "url": "https://x"}),
            "key",
        ),
        (
            json!({"key": "k", "state": "SUCCESSFUL", "url": "x".repeat(451)}),
            "url",
        ),
        (
            json!({"key": "k", "state": "SUCCESSFUL", "url": "https://x", "ref": "main"}),
            "ref",
        ),
        (
            json!({"key": "k", "state": "SUCCESSFUL", "url": "https://x", "duration": "12s"}),
            "duration",
        ),
        (
            json!({"key": "k", "state": "SUCCESSFUL", "url": "https://x", "testResults": {"passed": 1}}),
            "testResults",
        ),
        (
            json!({"key": "k", "state": "SUCCESSFUL", "url": "https://x", "description": "d".repeat(256)}),
            "description",
        ),
    ];
    for (body, field) in cases {
        let r = post(&bb, &repo_path("PROJ", "web-app", SHA), body.clone()).await;
        assert_eq!(r.status(), 400, "{body}");
        assert_eq!(error_contexts(r).await, [field], "{body}");
    }
    let r = post(&bb, &repo_path("PROJ", "web-app", "abc123"), ok).await;
    assert_eq!(r.status(), 400);

    // Without cancelledStatus, CANCELLED is refused.
    let bb = FakeBitbucket::start(dc(false)).await;
    bb.add_repository("PROJ", "web-app");
    let r = post(
        &bb,
        &repo_path("PROJ", "web-app", SHA),
        json!({"key": "k", "state": "CANCELLED", "url": "https://x"}),
    )
    .await;
    assert_eq!(r.status(), 400);
}

fn cloud_path(commit: &str) -> String {
    format!("/2.0/repositories/acme/web-app/commit/{commit}/statuses/build")
}

#[tokio::test]
async fn cloud_api_rules() {
    let bb =
        FakeBitbucket::start(FakeBitbucketOptions::with_flavour(BitbucketFlavour::Cloud)).await;
    bb.add_repository("acme", "web-app");
    let r = post(
        &bb,
        &cloud_path(SHA),
        json!({"key": "BK-web", "state": "INPROGRESS", "url": "https://buildkite.com/x", "name": "web #1", "refname": "main"}),
    )
    .await;
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "build");
    assert_eq!(v["key"], "BK-web");
    assert_eq!(v["state"], "INPROGRESS");
    assert_eq!(v["refname"], "main");
    assert!(v["uuid"].as_str().unwrap().starts_with('{'));
    assert!(v["created_on"].is_string() && v["updated_on"].is_string());
    assert!(v["links"]["self"]["href"].is_string());

    let r = post(
        &bb,
        &cloud_path(SHA),
        json!({"key": "BK-web", "state": "STOPPED", "url": "https://buildkite.com/x"}),
    )
    .await;
    assert_eq!(r.status(), 201);
    assert_eq!(bb.status(SHA, "BK-web").unwrap().state, "STOPPED");
    assert_eq!(bb.history(SHA, "BK-web").len(), 2);
    let r = get(&bb, &format!("{}/BK-web", cloud_path(SHA))).await;
    assert_eq!(r.json::<Value>().await.unwrap()["state"], "STOPPED");
    let r = get(
        &bb,
        &format!("/2.0/repositories/acme/web-app/commit/{SHA}/statuses"),
    )
    .await;
    assert_eq!(r.json::<Value>().await.unwrap()["size"], 1);

    // Key at most 40 characters (Unicode characters, not bytes).
    let r = post(
        &bb,
        &cloud_path(SHA),
        json!({"key": "é".repeat(40), "state": "SUCCESSFUL", "url": "https://x"}),
    )
    .await;
    assert_eq!(r.status(), 201);
    let r = post(
        &bb,
        &cloud_path(SHA),
        json!({"key": "k".repeat(41), "state": "SUCCESSFUL", "url": "https://x"}),
    )
    .await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "error");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at most 40 characters")
    );
    assert!(v["error"]["fields"]["key"].is_array());

    for (body, field) in [
        (json!({"state": "SUCCESSFUL", "url": "https://x"}), "key"),
        (json!({"key": "k", "url": "https://x"}), "state"),
        (json!({"key": "k", "state": "SUCCESSFUL"}), "url"),
        (
            json!({"key": "k", "state": "CANCELLED", "url": "https://x"}),
            "state",
        ),
        (
            json!({"key": "k", "state": "UNKNOWN", "url": "https://x"}),
            "state",
        ),
    ] {
        let r = post(&bb, &cloud_path(SHA), body.clone()).await;
        assert_eq!(r.status(), 400, "{body}");
        let v: Value = r.json().await.unwrap();
        assert!(v["error"]["fields"][field].is_array(), "{body}: {v}");
    }

    // Unknown repository, short commit, legacy path, no credentials.
    let ok = json!({"key": "k", "state": "SUCCESSFUL", "url": "https://x"});
    let r = post(
        &bb,
        &format!("/2.0/repositories/acme/nope/commit/{SHA}/statuses/build"),
        ok.clone(),
    )
    .await;
    assert_eq!(r.status(), 404);
    assert_eq!(
        post(&bb, &cloud_path("4e1f0c9"), ok.clone()).await.status(),
        404
    );
    assert_eq!(post(&bb, &legacy(SHA), ok.clone()).await.status(), 404);
    let r = client()
        .post(format!("{}{}", bb.url(), cloud_path(SHA)))
        .json(&ok)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn token_bucket_rate_limit_answers_429_with_retry_after() {
    let bb = FakeBitbucket::start(FakeBitbucketOptions {
        rate_limit: Some(TokenBucket {
            size: 2,
            refill_per_sec: 5.0,
        }),
        ..dc(true)
    })
    .await;
    let body = json!({"state": "SUCCESSFUL", "key": "k", "url": "https://x"});
    assert_eq!(post(&bb, &legacy(SHA), body.clone()).await.status(), 204);
    assert_eq!(post(&bb, &legacy(SHA), body.clone()).await.status(), 204);
    let r = post(&bb, &legacy(SHA), body.clone()).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    assert!(r.json::<Value>().await.unwrap()["errors"][0]["message"].is_string());
    // Another user has their own bucket.
    let r = client()
        .post(format!("{}{}", bb.url(), legacy(SHA)))
        .bearer_auth(DEFAULT_BITBUCKET_TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(
        post(&bb, &legacy(SHA), body).await.status(),
        204,
        "refilled"
    );
}
