//! Injected faults, added latency and the request log, on both fakes.

use std::time::{Duration, Instant};

use kitebridge_fakes::*;
use serde_json::json;

const SHA: &str = "4e1f0c9b7a2d3e5f6a8b9c0d1e2f3a4b5c6d7e8f";

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

async fn list(bk: &FakeBuildkite) -> Result<reqwest::Response, reqwest::Error> {
    client()
        .get(format!("{}/v2/organizations/acme-inc/builds", bk.url()))
        .bearer_auth(DEFAULT_BUILDKITE_TOKEN)
        .timeout(Duration::from_secs(5))
        .send()
        .await
}

#[tokio::test]
async fn status_faults_for_the_next_n_requests() {
    let bk = FakeBuildkite::start(FakeBuildkiteOptions::default()).await;
    bk.inject_fault(Fault::Status(502), 2);
    bk.inject_fault(Fault::Status(500), 1);
    let r = list(&bk).await.unwrap();
    assert_eq!(r.status(), 502);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert_eq!(list(&bk).await.unwrap().status(), 502);
    assert_eq!(list(&bk).await.unwrap().status(), 500);
    assert_eq!(list(&bk).await.unwrap().status(), 200);

    bk.inject_fault(Fault::Status(503), 100);
    assert_eq!(list(&bk).await.unwrap().status(), 503);
    bk.clear_faults();
    assert_eq!(list(&bk).await.unwrap().status(), 200);

    let log = bk.requests();
    assert_eq!(log.len(), 6);
    let statuses: Vec<Option<u16>> = log.iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        [
            Some(502),
            Some(502),
            Some(500),
            Some(200),
            Some(503),
            Some(200)
        ]
    );
    assert_eq!(log[0].method, "GET");
    assert_eq!(bk.request_count("/v2/organizations/acme-inc/builds"), 6);
    assert_eq!(
        bk.request_counts()
            .get("/v2/organizations/acme-inc/builds")
            .copied(),
        Some(6)
    );
}

#[tokio::test]
async fn faults_for_a_while() {
    let bk = FakeBuildkite::start(FakeBuildkiteOptions::default()).await;
    bk.inject_fault_for(Fault::Status(503), Duration::from_millis(300));
    assert_eq!(list(&bk).await.unwrap().status(), 503);
    assert_eq!(list(&bk).await.unwrap().status(), 503);
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(list(&bk).await.unwrap().status(), 200);
}

#[tokio::test]
async fn injected_429s_say_when_to_retry() {
    let bk = FakeBuildkite::start(FakeBuildkiteOptions::default()).await;
    bk.inject_fault(
        Fault::RateLimited {
            retry_after_secs: 7,
        },
        1,
    );
    let r = list(&bk).await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["ratelimit-reset"], "7");
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["reset"], 7);

    let bb = FakeBitbucket::start(FakeBitbucketOptions::default()).await;
    bb.inject_fault(
        Fault::RateLimited {
            retry_after_secs: 3,
        },
        1,
    );
    let r = client()
        .post(format!("{}/rest/build-status/1.0/commits/{SHA}", bb.url()))
        .bearer_auth(DEFAULT_BITBUCKET_TOKEN)
        .json(&json!({"state": "SUCCESSFUL", "key": "k", "url": "https://x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "3");
    // The faulted request was not stored.
    assert!(bb.posts().is_empty());
}

#[tokio::test]
async fn hangs_outlast_client_timeouts() {
    let bk = FakeBuildkite::start(FakeBuildkiteOptions::default()).await;
    bk.inject_fault(Fault::Hang, 1);
    let began = Instant::now();
    let err = client()
        .get(format!("{}/v2/organizations/acme-inc/builds", bk.url()))
        .bearer_auth(DEFAULT_BUILDKITE_TOKEN)
        .timeout(Duration::from_millis(300))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    assert!(began.elapsed() >= Duration::from_millis(300));
    assert_eq!(list(&bk).await.unwrap().status(), 200, "only one hang");
    assert_eq!(bk.requests()[0].status, None);
    bk.shutdown().await;
}

#[tokio::test]
async fn dropped_connections_give_no_answer() {
    let bb = FakeBitbucket::start(FakeBitbucketOptions::default()).await;
    bb.inject_fault(Fault::DropConnection, 1);
    let err = client()
        .get(format!("{}/rest/api/latest/build/capabilities", bb.url()))
        .bearer_auth(DEFAULT_BITBUCKET_TOKEN)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .unwrap_err();
    assert!(!err.is_timeout(), "{err:?}");
    assert!(err.status().is_none());
    let r = client()
        .get(format!("{}/rest/api/latest/build/capabilities", bb.url()))
        .bearer_auth(DEFAULT_BITBUCKET_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn latency_is_added_to_every_answer() {
    let bb = FakeBitbucket::start(FakeBitbucketOptions {
        latency: Duration::from_millis(50),
        ..FakeBitbucketOptions::default()
    })
    .await;
    let url = format!("{}/rest/api/latest/build/capabilities", bb.url());
    for _ in 0..3 {
        let began = Instant::now();
        let r = client()
            .get(&url)
            .bearer_auth(DEFAULT_BITBUCKET_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(began.elapsed() >= Duration::from_millis(50));
    }
    bb.set_latency(Duration::ZERO);
    let began = Instant::now();
    client().get(&url).send().await.unwrap();
    assert!(began.elapsed() < Duration::from_millis(50));
    assert_eq!(bb.request_count("/rest/api/latest/build/capabilities"), 4);
    bb.clear_requests();
    assert!(bb.requests().is_empty());
}

/// Odd input gets the API's error answer (a panic would drop the connection instead).
#[tokio::test]
async fn bad_input_gets_error_answers_not_panics() {
    let bk = FakeBuildkite::start(FakeBuildkiteOptions::default()).await;
    bk.add_pipeline(Pipeline::new("acme-inc", "web", "Web", "git@x:y/web.git"));
    let base = format!("{}/v2/organizations/acme-inc", bk.url());
    for q in [
        "page=18446744073709551615",
        "page=99999999999999999999999",
        "per_page=%FF",
        "created_from=%FF%FE",
        "state[]=",
        "meta_data[=x",
        "branch=%00",
    ] {
        let r = client()
            .get(format!("{base}/builds?{q}"))
            .bearer_auth(DEFAULT_BUILDKITE_TOKEN)
            .send()
            .await
            .unwrap();
        assert!(r.status().as_u16() < 500, "{q}: {}", r.status());
    }
    for path in [
        "/pipelines/web/builds/-1",
        "/pipelines/web/builds/99999999999999999999999",
        "/pipelines/web/builds/%FF",
    ] {
        let r = client()
            .get(format!("{base}{path}"))
            .bearer_auth(DEFAULT_BUILDKITE_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{path}");
    }
    for body in [
        "",
        "[]",
        "null",
        "\u{0}",
        "{\"commit\": 1, \"branch\": [\"x\"]}",
        "{\"commit\":\"a\",\"branch\":\"b\",\"env\":[]}",
    ] {
        let r = client()
            .post(format!("{base}/pipelines/web/builds"))
            .bearer_auth(DEFAULT_BUILDKITE_TOKEN)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert!(
            r.status() == 400 || r.status() == 422,
            "{body:?}: {}",
            r.status()
        );
    }

    for flavour in [
        BitbucketFlavour::DataCenter {
            version: "8.19.0".into(),
            cancelled_status: true,
        },
        BitbucketFlavour::Cloud,
    ] {
        let bb = FakeBitbucket::start(FakeBitbucketOptions::with_flavour(flavour)).await;
        bb.add_repository("p", "r");
        let paths = [
            format!("/rest/build-status/1.0/commits/{SHA}"),
            format!("/rest/api/latest/projects/P/repos/r/commits/{SHA}/builds"),
            format!("/2.0/repositories/p/r/commit/{SHA}/statuses/build"),
        ];
        for path in &paths {
            for body in [
                "",
                "[]",
                "{\"state\": 1, \"key\": {}, \"url\": null}",
                "{\"testResults\": 5}",
            ] {
                let r = client()
                    .post(format!("{}{path}", bb.url()))
                    .bearer_auth(DEFAULT_BITBUCKET_TOKEN)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                assert!(
                    matches!(r.status().as_u16(), 400 | 404),
                    "{path} {body:?}: {}",
                    r.status()
                );
            }
        }
        let r = client()
            .get(format!(
                "{}/rest/build-status/1.0/commits/{SHA}?start=18446744073709551615&limit=5",
                bb.url()
            ))
            .bearer_auth(DEFAULT_BITBUCKET_TOKEN)
            .send()
            .await
            .unwrap();
        assert!(r.status().as_u16() < 500);
        let r = client()
            .get(format!(
                "{}/2.0/repositories/p/r/commit/{SHA}/statuses?page=18446744073709551615",
                bb.url()
            ))
            .bearer_auth(DEFAULT_BITBUCKET_TOKEN)
            .send()
            .await
            .unwrap();
        assert!(r.status().as_u16() < 500);
        // Garbage credentials.
        let r = client()
            .get(format!("{}/rest/api/latest/build/capabilities", bb.url()))
            .header("authorization", "Basic %%%not-base64")
            .send()
            .await
            .unwrap();
        assert!(matches!(r.status().as_u16(), 401 | 404));
    }
}
