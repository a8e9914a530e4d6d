//! The simulated Bitbucket's deployments (DC), Code Insights (DC), commit reports (Cloud) and
//! changelog sources (commits, pull requests for a commit), checked over HTTP with reqwest.

use chrono::{DateTime, TimeZone, Utc};
use kitebridge_fakes::*;
use reqwest::Method;
use serde_json::{Value, json};

const SHA: &str = "4e1f0c9b7a2d3e5f6a8b9c0d1e2f3a4b5c6d7e8f";
const ALICE: (&str, &str) = ("alice", "alice-password");

/// A change to a request body.
type Edit = Box<dyn Fn(&mut Value)>;

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

fn dc_version(version: &str) -> FakeBitbucketOptions {
    let mut o = FakeBitbucketOptions::with_flavour(BitbucketFlavour::DataCenter {
        version: version.into(),
        cancelled_status: true,
    });
    o.credentials.push(Credential::Basic {
        username: ALICE.0.into(),
        password: ALICE.1.into(),
    });
    o.admins = Some(vec![DEFAULT_BITBUCKET_USER.into()]);
    o
}

fn cloud() -> FakeBitbucketOptions {
    let mut o = dc_version("0");
    o.flavour = BitbucketFlavour::Cloud;
    o
}

/// A request as `kitebridge` (Basic, admin) or as `alice` (Basic, not admin).
async fn send(
    bb: &FakeBitbucket,
    method: Method,
    path: &str,
    body: Option<Value>,
    as_alice: bool,
) -> reqwest::Response {
    let (u, p) = if as_alice {
        ALICE
    } else {
        (DEFAULT_BITBUCKET_USER, DEFAULT_BITBUCKET_PASSWORD)
    };
    let mut rb = client()
        .request(method, format!("{}{path}", bb.url()))
        .basic_auth(u, Some(p));
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    rb.send().await.unwrap()
}

async fn get(bb: &FakeBitbucket, path: &str) -> reqwest::Response {
    send(bb, Method::GET, path, None, false).await
}

async fn json_of(r: reqwest::Response) -> Value {
    r.json().await.unwrap()
}

/// Status and the `context`s of a DC error answer (asserting its shape).
async fn dc_err(r: reqwest::Response) -> (u16, Vec<String>) {
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap();
    let errors = v["errors"].as_array().expect("DC error body");
    let ctx = errors
        .iter()
        .map(|e| {
            assert!(e["message"].is_string(), "{e}");
            assert!(e.get("exceptionName").is_some(), "{e}");
            e["context"].as_str().unwrap_or("").to_owned()
        })
        .collect();
    (status, ctx)
}

/// Status and message of a Cloud error answer (asserting its shape).
async fn cloud_err(r: reqwest::Response) -> (u16, String) {
    let status = r.status().as_u16();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "error", "{v}");
    (status, v["error"]["message"].as_str().unwrap().to_owned())
}

// ---------------------------------------------------------------------------------------------
// Deployments

fn deployments(commit: &str) -> String {
    format!("/rest/api/latest/projects/PROJ/repos/web/commits/{commit}/deployments")
}

fn deployment(state: &str, seq: i64) -> Value {
    json!({
        "deploymentSequenceNumber": seq,
        "key": "web-deploy",
        "displayName": "Web deploy",
        "description": "web is deploying to production",
        "url": "https://buildkite.com/acme/web-deploy/builds/7",
        "state": state,
        "environment": {"key": "prod", "displayName": "Production", "type": "PRODUCTION", "url": "https://web.example.com"},
    })
}

#[tokio::test]
async fn deployments_enforce_the_request_rules() {
    let bb = FakeBitbucket::start(dc_version("8.19.0")).await;
    bb.add_repository("PROJ", "web");
    let url = deployments(SHA);

    // Capabilities: anonymous index, then the capability URL answers {}.
    let caps = json_of(
        client()
            .get(format!("{}/rest/capabilities", bb.url()))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let dep = caps["capabilities"]["deployment"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        dep,
        format!("{}/rest/api/latest/deployment/capabilities", bb.url())
    );
    let r = get(&bb, dep.strip_prefix(&bb.url()).unwrap()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(json_of(r).await, json!({}));

    // Accepted: 200 with lastUpdated, toCommit, repository.
    let r = send(
        &bb,
        Method::POST,
        &url,
        Some(deployment("IN_PROGRESS", 7)),
        false,
    )
    .await;
    assert_eq!(r.status(), 200);
    let v = json_of(r).await;
    assert!(v["lastUpdated"].as_i64().unwrap() > 1_600_000_000_000);
    assert_eq!(v["toCommit"]["id"], SHA);
    assert_eq!(v["repository"]["slug"], "web");
    assert_eq!(v["repository"]["project"]["key"], "PROJ");
    assert_eq!(v["environment"]["type"], "PRODUCTION");
    // 1.0 works too.
    let r = send(
        &bb,
        Method::POST,
        &url.replace("/latest/", "/1.0/"),
        Some(deployment("IN_PROGRESS", 7)),
        false,
    )
    .await;
    assert_eq!(r.status(), 200);

    // Every one of the seven fields is required.
    for field in [
        "deploymentSequenceNumber",
        "key",
        "displayName",
        "description",
        "url",
        "state",
        "environment",
    ] {
        let mut b = deployment("SUCCESSFUL", 7);
        b.as_object_mut().unwrap().remove(field);
        let (s, ctx) = dc_err(send(&bb, Method::POST, &url, Some(b), false).await).await;
        assert_eq!((s, ctx), (400, vec![field.to_owned()]), "without {field}");
    }
    for field in ["key", "displayName"] {
        let mut b = deployment("SUCCESSFUL", 7);
        b["environment"].as_object_mut().unwrap().remove(field);
        let (s, ctx) = dc_err(send(&bb, Method::POST, &url, Some(b), false).await).await;
        assert_eq!((s, ctx), (400, vec![format!("environment.{field}")]));
    }
    // Lengths: 255 for text, 1024 for URLs.
    for (field, max) in [
        ("key", 255),
        ("displayName", 255),
        ("description", 255),
        ("url", 1024),
    ] {
        let mut b = deployment("SUCCESSFUL", 7);
        b[field] = json!("x".repeat(max));
        assert_eq!(
            send(&bb, Method::POST, &url, Some(b.clone()), false)
                .await
                .status(),
            200
        );
        b[field] = json!("x".repeat(max + 1));
        let (s, ctx) = dc_err(send(&bb, Method::POST, &url, Some(b), false).await).await;
        assert_eq!(
            (s, ctx),
            (400, vec![field.to_owned()]),
            "{field} over {max}"
        );
    }
    let mut b = deployment("SUCCESSFUL", 7);
    b["environment"]["url"] = json!("x".repeat(1025));
    assert_eq!(
        dc_err(send(&bb, Method::POST, &url, Some(b), false).await)
            .await
            .1,
        ["environment.url"]
    );
    // Enums.
    for bad in ["INPROGRESS", "successful", "DONE"] {
        let (s, ctx) =
            dc_err(send(&bb, Method::POST, &url, Some(deployment(bad, 7)), false).await).await;
        assert_eq!((s, ctx), (400, vec!["state".to_owned()]), "{bad}");
    }
    for state in ["PENDING", "CANCELLED", "FAILED", "ROLLED_BACK", "UNKNOWN"] {
        assert_eq!(
            send(&bb, Method::POST, &url, Some(deployment(state, 1)), false)
                .await
                .status(),
            200
        );
    }
    for bad in ["production", "PROD", "QA"] {
        let mut b = deployment("SUCCESSFUL", 7);
        b["environment"]["type"] = json!(bad);
        assert_eq!(
            dc_err(send(&bb, Method::POST, &url, Some(b), false).await)
                .await
                .1,
            ["environment.type"]
        );
    }
    let mut b = deployment("SUCCESSFUL", 7);
    b["environment"].as_object_mut().unwrap().remove("type");
    assert_eq!(
        send(&bb, Method::POST, &url, Some(b), false).await.status(),
        200
    );
    // Commit must be 40 hex; repository must exist; credentials needed; JSON needed.
    assert_eq!(
        dc_err(
            send(
                &bb,
                Method::POST,
                &deployments("4e1f0c9"),
                Some(deployment("SUCCESSFUL", 7)),
                false
            )
            .await
        )
        .await
        .0,
        400
    );
    let other =
        "/rest/api/latest/projects/PROJ/repos/nope/commits/".to_owned() + SHA + "/deployments";
    assert_eq!(
        dc_err(
            send(
                &bb,
                Method::POST,
                &other,
                Some(deployment("SUCCESSFUL", 7)),
                false
            )
            .await
        )
        .await
        .0,
        404
    );
    let r = client()
        .post(format!("{}{url}", bb.url()))
        .json(&deployment("SUCCESSFUL", 7))
        .send()
        .await
        .unwrap();
    assert_eq!(dc_err(r).await.0, 401);
    let r = client()
        .post(format!("{}{url}", bb.url()))
        .basic_auth(DEFAULT_BITBUCKET_USER, Some(DEFAULT_BITBUCKET_PASSWORD))
        .header("content-type", "text/plain")
        .body(deployment("SUCCESSFUL", 7).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
}

#[tokio::test]
async fn deployments_upsert_on_their_identity_and_delete_needs_an_admin() {
    let bb = FakeBitbucket::start(dc_version("7.16.0")).await;
    bb.add_repository("PROJ", "web");
    let url = deployments(SHA);
    for (state, seq) in [("IN_PROGRESS", 7), ("SUCCESSFUL", 7), ("IN_PROGRESS", 8)] {
        assert_eq!(
            send(&bb, Method::POST, &url, Some(deployment(state, seq)), true)
                .await
                .status(),
            200
        );
    }
    assert_eq!(bb.deployments().len(), 3);
    let current = bb.current_deployments();
    assert_eq!(current.len(), 2);
    assert_eq!(
        (current[0].sequence_number, current[0].state.as_str()),
        (7, "SUCCESSFUL")
    );
    assert_eq!(
        (current[1].sequence_number, current[1].state.as_str()),
        (8, "IN_PROGRESS")
    );
    let d = &current[0];
    assert_eq!(
        (d.project_key.as_str(), d.slug.as_str(), d.commit.as_str()),
        ("PROJ", "web", SHA)
    );
    assert_eq!(d.environment_key, "prod");
    assert_eq!(d.environment_type.as_deref(), Some("PRODUCTION"));
    assert_eq!(d.posted_by, "alice");

    // GET by the three query params.
    let q = "?key=web-deploy&environmentKey=prod&deploymentSequenceNumber=7";
    let r = get(&bb, &format!("{url}{q}")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(json_of(r).await["state"], "SUCCESSFUL");
    for partial in [
        "?key=web-deploy&environmentKey=prod",
        "?environmentKey=prod&deploymentSequenceNumber=7",
        "?key=web-deploy&deploymentSequenceNumber=7",
        "",
    ] {
        assert_eq!(
            dc_err(get(&bb, &format!("{url}{partial}")).await).await.0,
            404,
            "{partial}"
        );
    }
    assert_eq!(
        dc_err(
            get(
                &bb,
                &format!("{url}?key=web-deploy&environmentKey=prod&deploymentSequenceNumber=9")
            )
            .await
        )
        .await
        .0,
        404
    );
    // DELETE: alice is not an admin (401), kitebridge is.
    assert_eq!(
        dc_err(send(&bb, Method::DELETE, &format!("{url}{q}"), None, true).await)
            .await
            .0,
        401
    );
    assert_eq!(
        dc_err(send(&bb, Method::DELETE, &url, None, false).await)
            .await
            .0,
        404
    );
    assert_eq!(
        send(&bb, Method::DELETE, &format!("{url}{q}"), None, false)
            .await
            .status(),
        204
    );
    assert_eq!(dc_err(get(&bb, &format!("{url}{q}")).await).await.0, 404);
    assert_eq!(bb.current_deployments().len(), 1);
    assert_eq!(bb.deployments().len(), 3);

    // Switched off: 404 everywhere, and not listed.
    bb.set_deployments_enabled(false);
    assert_eq!(
        dc_err(
            send(
                &bb,
                Method::POST,
                &url,
                Some(deployment("FAILED", 9)),
                false
            )
            .await
        )
        .await
        .0,
        404
    );
    assert_eq!(
        dc_err(get(&bb, "/rest/api/latest/deployment/capabilities").await)
            .await
            .0,
        404
    );
    let caps = json_of(get(&bb, "/rest/capabilities").await).await;
    assert!(caps["capabilities"].get("deployment").is_none(), "{caps}");
    assert!(caps["capabilities"].get("buildStatus").is_some(), "{caps}");
    bb.set_deployments_enabled(true);
    assert_eq!(
        send(
            &bb,
            Method::POST,
            &url,
            Some(deployment("FAILED", 9)),
            false
        )
        .await
        .status(),
        200
    );

    let mut off = dc_version("8.0.0");
    off.deployments_disabled = true;
    let bb = FakeBitbucket::start(off).await;
    bb.add_repository("PROJ", "web");
    assert_eq!(
        send(
            &bb,
            Method::POST,
            &url,
            Some(deployment("FAILED", 9)),
            false
        )
        .await
        .status(),
        404
    );
}

#[tokio::test]
async fn no_deployments_before_7_16_on_server_or_on_cloud() {
    let url = deployments(SHA);
    for opts in [
        dc_version("7.15.2"),
        FakeBitbucketOptions::with_flavour(BitbucketFlavour::Server {
            version: "8.0.0".into(),
        }),
        cloud(),
    ] {
        let flavour = opts.flavour.clone();
        let bb = FakeBitbucket::start(opts).await;
        bb.add_repository("PROJ", "web");
        let r = send(
            &bb,
            Method::POST,
            &url,
            Some(deployment("SUCCESSFUL", 1)),
            false,
        )
        .await;
        assert_eq!(r.status(), 404, "{flavour:?}");
        assert_eq!(
            get(&bb, "/rest/api/latest/deployment/capabilities")
                .await
                .status(),
            404
        );
        let r = get(&bb, "/rest/capabilities").await;
        if r.status() == 200 {
            assert!(json_of(r).await["capabilities"].get("deployment").is_none());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// DC Code Insights

fn report_url(key: &str) -> String {
    format!("/rest/insights/latest/projects/PROJ/repos/web/commits/{SHA}/reports/{key}")
}

fn report() -> Value {
    json!({
        "title": "Buildkite",
        "details": "Pipeline web passed",
        "reporter": "kitebridge",
        "result": "PASS",
        "link": "https://buildkite.com/acme/web/builds/1",
        "data": [
            {"title": "Build", "type": "LINK", "value": {"linktext": "#1", "href": "https://buildkite.com/acme/web/builds/1"}},
            {"title": "Duration", "type": "DURATION", "value": 62000},
            {"title": "Coverage", "type": "PERCENTAGE", "value": 81.5},
            {"title": "Flaky", "type": "BOOLEAN", "value": false},
            {"title": "Started", "type": "DATE", "value": 1_700_000_000_000_i64},
            {"title": "Note", "value": "auto"},
        ],
    })
}

fn annotation(i: usize) -> Value {
    json!({"message": format!("problem {i}"), "severity": "HIGH", "path": "src/app.rs", "line": i, "externalId": format!("a{i}"), "type": "BUG", "link": "https://example.com/x"})
}

#[tokio::test]
async fn code_insights_reports_enforce_their_rules() {
    let bb = FakeBitbucket::start(dc_version("8.19.0")).await;
    bb.add_repository("PROJ", "web");
    let key = "com.buildkite.kitebridge";
    let r = send(&bb, Method::PUT, &report_url(key), Some(report()), false).await;
    assert_eq!(r.status(), 200);
    let v = json_of(r).await;
    assert_eq!(v["key"], key);
    assert_eq!(v["result"], "PASS");
    // 1.0 base too.
    let url10 = report_url(key).replace("/latest/", "/1.0/");
    assert_eq!(get(&bb, &url10).await.status(), 200);

    let bad: Vec<(&str, Edit)> = vec![
        (
            "title",
            Box::new(|b| {
                b.as_object_mut().unwrap().remove("title");
            }),
        ),
        ("title", Box::new(|b| b["title"] = json!("x".repeat(451)))),
        (
            "details",
            Box::new(|b| b["details"] = json!("x".repeat(2001))),
        ),
        (
            "reporter",
            Box::new(|b| b["reporter"] = json!("x".repeat(451))),
        ),
        ("result", Box::new(|b| b["result"] = json!("PASSED"))),
        ("result", Box::new(|b| b["result"] = json!("PENDING"))),
        (
            "link",
            Box::new(|b| b["link"] = json!("ftp://example.com/x")),
        ),
        ("logoUrl", Box::new(|b| b["logoUrl"] = json!("not a url"))),
        (
            "data",
            Box::new(|b| {
                b["data"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"title": "7th", "type": "NUMBER", "value": 7}))
            }),
        ),
        (
            "data[0].value",
            Box::new(|b| {
                b["data"][0]["value"] = json!({"text": "#1", "href": "https://x.example"})
            }),
        ),
        (
            "data[0].value",
            Box::new(|b| b["data"][0]["value"]["href"] = json!("javascript:alert(1)")),
        ),
        (
            "data[1].value",
            Box::new(|b| b["data"][1]["value"] = json!("62s")),
        ),
        (
            "data[2].value",
            Box::new(|b| b["data"][2]["value"] = json!(101)),
        ),
        (
            "data[3].value",
            Box::new(|b| b["data"][3]["value"] = json!("no")),
        ),
        (
            "data[4].value",
            Box::new(|b| b["data"][4]["value"] = json!("2024-01-01")),
        ),
        (
            "data[5].value",
            Box::new(|b| b["data"][5]["value"] = json!([1, 2])),
        ),
        (
            "data[5].type",
            Box::new(|b| b["data"][5]["type"] = json!("STRING")),
        ),
    ];
    for (ctx, f) in bad {
        let mut b = report();
        f(&mut b);
        let (s, got) = dc_err(
            send(
                &bb,
                Method::PUT,
                &report_url("other"),
                Some(b.clone()),
                false,
            )
            .await,
        )
        .await;
        assert_eq!((s, got), (400, vec![ctx.to_owned()]), "{b}");
    }
    // Key: at most 50 characters.
    assert_eq!(
        send(
            &bb,
            Method::PUT,
            &report_url(&"k".repeat(50)),
            Some(report()),
            false
        )
        .await
        .status(),
        200
    );
    let (s, ctx) = dc_err(
        send(
            &bb,
            Method::PUT,
            &report_url(&"k".repeat(51)),
            Some(report()),
            false,
        )
        .await,
    )
    .await;
    assert_eq!((s, ctx), (400, vec!["key".to_owned()]));
    // Commit: 40 hex.
    let short = report_url(key).replace(SHA, "4e1f0c9");
    assert_eq!(
        dc_err(send(&bb, Method::PUT, &short, Some(report()), false).await)
            .await
            .0,
        400
    );
    // Only the creator may replace it: 401 for alice; the creator may.
    assert_eq!(
        dc_err(send(&bb, Method::PUT, &report_url(key), Some(report()), true).await)
            .await
            .0,
        401
    );
    let mut b = report();
    b["result"] = json!("FAIL");
    assert_eq!(
        send(&bb, Method::PUT, &report_url(key), Some(b), false)
            .await
            .status(),
        200
    );
    let stored = bb.reports();
    let r = stored.iter().find(|r| r.key == key).unwrap();
    assert_eq!(r.puts, 2);
    assert_eq!(r.creator, DEFAULT_BITBUCKET_USER);
    assert_eq!(r.report["result"], "FAIL");
    assert_eq!(
        r.scope,
        StatusScope::Repository {
            project_key: "PROJ".into(),
            slug: "web".into()
        }
    );

    // Listing is paged.
    let list = json_of(
        get(
            &bb,
            &format!("/rest/insights/latest/projects/PROJ/repos/web/commits/{SHA}/reports?limit=1"),
        )
        .await,
    )
    .await;
    assert_eq!(list["size"], 1);
    assert_eq!(list["isLastPage"], false);
    let next = list["nextPageStart"].as_u64().unwrap();
    let list = json_of(get(&bb, &format!("/rest/insights/latest/projects/PROJ/repos/web/commits/{SHA}/reports?limit=5&start={next}")).await).await;
    assert_eq!(list["values"].as_array().unwrap().len(), 1);
    assert_eq!(list["isLastPage"], true);

    // DELETE: alice is neither creator nor admin.
    assert_eq!(
        dc_err(send(&bb, Method::DELETE, &report_url(key), None, true).await)
            .await
            .0,
        401
    );
    assert_eq!(
        send(&bb, Method::DELETE, &report_url(key), None, false)
            .await
            .status(),
        204
    );
    assert_eq!(dc_err(get(&bb, &report_url(key)).await).await.0, 404);
    // Alice's own report: she may replace and delete it.
    assert_eq!(
        send(
            &bb,
            Method::PUT,
            &report_url("alice.report"),
            Some(report()),
            true
        )
        .await
        .status(),
        200
    );
    assert_eq!(
        send(
            &bb,
            Method::PUT,
            &report_url("alice.report"),
            Some(report()),
            true
        )
        .await
        .status(),
        200
    );
    assert_eq!(
        send(&bb, Method::DELETE, &report_url("alice.report"), None, true)
            .await
            .status(),
        204
    );
}

#[tokio::test]
async fn code_insights_annotations_limits_duplicates_and_cascade() {
    let mut opts = dc_version("5.15.0");
    opts.max_annotations_per_report = 1000;
    let bb = FakeBitbucket::start(opts).await;
    bb.add_repository("PROJ", "web");
    let key = "com.buildkite.kitebridge";
    let ann = format!("{}/annotations", report_url(key));
    // No report yet: 404.
    assert_eq!(
        dc_err(
            send(
                &bb,
                Method::POST,
                &ann,
                Some(json!({"annotations": [annotation(1)]})),
                false
            )
            .await
        )
        .await
        .0,
        404
    );
    assert_eq!(
        send(&bb, Method::PUT, &report_url(key), Some(report()), false)
            .await
            .status(),
        200
    );
    let r = send(
        &bb,
        Method::POST,
        &ann,
        Some(json!({"annotations": [annotation(1), annotation(2)]})),
        false,
    )
    .await;
    assert_eq!(r.status(), 204);
    assert_eq!(r.text().await.unwrap(), "");
    // Rules.
    let bad: Vec<(&str, Value)> = vec![
        ("annotations[0].message", json!({"severity": "LOW"})),
        (
            "annotations[0].message",
            json!({"severity": "LOW", "message": "x".repeat(2001)}),
        ),
        ("annotations[0].severity", json!({"message": "m"})),
        (
            "annotations[0].severity",
            json!({"message": "m", "severity": "CRITICAL"}),
        ),
        (
            "annotations[0].line",
            json!({"message": "m", "severity": "LOW", "line": -1}),
        ),
        (
            "annotations[0].type",
            json!({"message": "m", "severity": "LOW", "type": "SMELL"}),
        ),
        (
            "annotations[0].link",
            json!({"message": "m", "severity": "LOW", "link": "file:///etc/passwd"}),
        ),
        (
            "annotations[0].externalId",
            json!({"message": "m", "severity": "LOW", "externalId": "e".repeat(450)}),
        ),
    ];
    for (ctx, a) in bad {
        let (s, got) = dc_err(
            send(
                &bb,
                Method::POST,
                &ann,
                Some(json!({"annotations": [a]})),
                false,
            )
            .await,
        )
        .await;
        assert_eq!((s, got), (400, vec![ctx.to_owned()]));
    }
    assert_eq!(
        dc_err(
            send(
                &bb,
                Method::POST,
                &ann,
                Some(json!({"annotations": []})),
                false
            )
            .await
        )
        .await
        .0,
        400
    );
    // Only the creator may add.
    assert_eq!(
        dc_err(
            send(
                &bb,
                Method::POST,
                &ann,
                Some(json!({"annotations": [annotation(3)]})),
                true
            )
            .await
        )
        .await
        .0,
        401
    );
    // No de-duplication: posting the same again stores it twice.
    assert_eq!(
        send(
            &bb,
            Method::POST,
            &ann,
            Some(json!({"annotations": [annotation(1)]})),
            false
        )
        .await
        .status(),
        204
    );
    assert_eq!(bb.annotations(SHA, key).len(), 3);
    let got = json_of(get(&bb, &ann).await).await;
    assert_eq!(got["annotations"].as_array().unwrap().len(), 3);
    assert_eq!(got["totalCount"], 3);
    // 1000 per report: a batch that would pass it is refused whole.
    let batch: Vec<Value> = (0..997).map(annotation).collect();
    assert_eq!(
        send(
            &bb,
            Method::POST,
            &ann,
            Some(json!({"annotations": batch})),
            false
        )
        .await
        .status(),
        204
    );
    assert_eq!(bb.annotations(SHA, key).len(), 1000);
    let (s, _) = dc_err(
        send(
            &bb,
            Method::POST,
            &ann,
            Some(json!({"annotations": [annotation(1)]})),
            false,
        )
        .await,
    )
    .await;
    assert_eq!(s, 400);
    assert_eq!(bb.annotations(SHA, key).len(), 1000);
    // DELETE by externalId, then everything.
    assert_eq!(
        send(
            &bb,
            Method::DELETE,
            &format!("{ann}?externalId=a1&externalId=a2"),
            None,
            false
        )
        .await
        .status(),
        204
    );
    assert_eq!(bb.annotations(SHA, key).len(), 995);
    let batch: Vec<Value> = (0..6).map(annotation).collect();
    assert_eq!(
        dc_err(
            send(
                &bb,
                Method::POST,
                &ann,
                Some(json!({"annotations": batch})),
                false
            )
            .await
        )
        .await
        .0,
        400
    );
    assert_eq!(bb.annotations(SHA, key).len(), 995);
    // Deleting the report deletes its annotations.
    assert_eq!(
        send(&bb, Method::DELETE, &report_url(key), None, false)
            .await
            .status(),
        204
    );
    assert!(bb.annotations(SHA, key).is_empty());
    assert!(bb.reports().is_empty());
    assert_eq!(
        send(&bb, Method::PUT, &report_url(key), Some(report()), false)
            .await
            .status(),
        200
    );
    assert_eq!(
        json_of(get(&bb, &ann).await).await["annotations"],
        json!([])
    );
    assert_eq!(bb.reports()[0].puts, 2);

    // Before 5.15: no Code Insights.
    let old = FakeBitbucket::start(dc_version("5.14.9")).await;
    old.add_repository("PROJ", "web");
    assert_eq!(
        send(&old, Method::PUT, &report_url(key), Some(report()), false)
            .await
            .status(),
        404
    );
}

// ---------------------------------------------------------------------------------------------
// Cloud reports

fn cloud_report_url(id: &str) -> String {
    format!("/2.0/repositories/acme/web/commit/{SHA}/reports/{id}")
}

fn cloud_report() -> Value {
    json!({
        "title": "Buildkite",
        "details": "Pipeline web passed",
        "report_type": "TEST",
        "result": "PASSED",
        "reporter": "kitebridge",
        "link": "https://buildkite.com/acme/web/builds/1",
        "data": [{"title": "Build", "type": "LINK", "value": {"text": "#1", "href": "https://buildkite.com/acme/web/builds/1"}}],
    })
}

#[tokio::test]
async fn cloud_reports_enforce_their_rules() {
    let bb = FakeBitbucket::start(cloud()).await;
    bb.add_repository("acme", "web");
    let id = "kitebridge-web";
    let r = send(
        &bb,
        Method::PUT,
        &cloud_report_url(id),
        Some(cloud_report()),
        false,
    )
    .await;
    assert_eq!(r.status(), 200);
    let v = json_of(r).await;
    assert!(v["uuid"].as_str().unwrap().starts_with('{'));
    assert!(v["created_on"].is_string() && v["updated_on"].is_string());
    assert_eq!(get(&bb, &cloud_report_url(id)).await.status(), 200);
    let mut pending = cloud_report();
    pending["result"] = json!("PENDING");
    assert_eq!(
        send(
            &bb,
            Method::PUT,
            &cloud_report_url(id),
            Some(pending),
            false
        )
        .await
        .status(),
        200
    );

    let bad: Vec<Edit> = vec![
        Box::new(|b| b["result"] = json!("PASS")),
        Box::new(|b| b["result"] = json!("FAIL")),
        Box::new(|b| b["report_type"] = json!("LINT")),
        Box::new(|b| {
            b["data"] = json!(
                (0..11)
                    .map(|i| json!({"title": "n", "type": "NUMBER", "value": i}))
                    .collect::<Vec<_>>()
            )
        }),
        Box::new(|b| {
            b["data"][0]["value"] = json!({"linktext": "#1", "href": "https://buildkite.com/"})
        }),
        Box::new(|b| b["link"] = json!("http://localhost:8080/build/1")),
        Box::new(|b| b["link"] = json!("http://127.0.0.1/build/1")),
        Box::new(|b| b["logo_url"] = json!("nope")),
        Box::new(|b| {
            b.as_object_mut().unwrap().remove("title");
        }),
    ];
    for f in bad {
        let mut b = cloud_report();
        f(&mut b);
        let (s, _) = cloud_err(
            send(
                &bb,
                Method::PUT,
                &cloud_report_url("x"),
                Some(b.clone()),
                false,
            )
            .await,
        )
        .await;
        assert_eq!(s, 400, "{b}");
    }
    let mut ten = cloud_report();
    ten["data"] = json!(
        (0..10)
            .map(|i| json!({"title": "n", "type": "NUMBER", "value": i}))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        send(&bb, Method::PUT, &cloud_report_url("ten"), Some(ten), false)
            .await
            .status(),
        200
    );
    // Listing.
    let list = json_of(
        get(
            &bb,
            &format!("/2.0/repositories/acme/web/commit/{SHA}/reports"),
        )
        .await,
    )
    .await;
    assert_eq!(list["values"].as_array().unwrap().len(), 2);
    let stored = bb.reports();
    assert_eq!(
        stored[0].scope,
        StatusScope::Cloud {
            workspace: "acme".into(),
            repo_slug: "web".into()
        }
    );
    assert_eq!(stored[0].puts, 2);
    assert_eq!(stored[0].report["data"][0]["value"]["text"], "#1");
}

#[tokio::test]
async fn cloud_annotations_enforce_batches_and_totals() {
    let bb = FakeBitbucket::start(cloud()).await;
    bb.add_repository("acme", "web");
    let id = "kitebridge-web";
    let ann = format!("{}/annotations", cloud_report_url(id));
    let a = |i: usize| json!({"external_id": format!("a{i}"), "annotation_type": "BUG", "summary": format!("problem {i}"), "severity": "CRITICAL", "path": "src/app.rs", "line": i + 1, "result": "FAILED"});
    assert_eq!(
        cloud_err(send(&bb, Method::POST, &ann, Some(json!([a(0)])), false).await)
            .await
            .0,
        404
    );
    assert_eq!(
        send(
            &bb,
            Method::PUT,
            &cloud_report_url(id),
            Some(cloud_report()),
            false
        )
        .await
        .status(),
        200
    );
    let r = send(&bb, Method::POST, &ann, Some(json!([a(0), a(1)])), false).await;
    assert_eq!(r.status(), 200);
    assert_eq!(json_of(r).await.as_array().unwrap().len(), 2);
    // An array of 1..=100.
    assert_eq!(
        cloud_err(
            send(
                &bb,
                Method::POST,
                &ann,
                Some(json!({"annotations": [a(2)]})),
                false
            )
            .await
        )
        .await
        .0,
        400
    );
    assert_eq!(
        cloud_err(send(&bb, Method::POST, &ann, Some(json!([])), false).await)
            .await
            .0,
        400
    );
    let big: Vec<Value> = (0..101).map(a).collect();
    assert_eq!(
        cloud_err(send(&bb, Method::POST, &ann, Some(json!(big)), false).await)
            .await
            .0,
        400
    );
    // Field rules.
    let bad: Vec<Value> = vec![
        json!({"annotation_type": "BUG"}),
        json!({"summary": "s".repeat(451)}),
        json!({"summary": "s", "severity": "BLOCKER"}),
        json!({"summary": "s", "line": 0}),
        json!({"summary": "s", "annotation_type": "LINT"}),
        json!({"summary": "s", "link": "https://localhost/x"}),
        json!({"summary": "s", "result": "PASS"}),
    ];
    for b in bad {
        let (s, msg) =
            cloud_err(send(&bb, Method::POST, &ann, Some(json!([b.clone()])), false).await).await;
        assert_eq!(s, 400, "{b}");
        assert!(msg.contains("bad-request"), "{msg}");
    }
    assert_eq!(bb.annotations(SHA, id).len(), 2);
    // Up to 1000 per report, whole batch refused above it; same external_id updates.
    for chunk in 0..9 {
        let batch: Vec<Value> = (0..100).map(|i| a(100 + chunk * 100 + i)).collect();
        assert_eq!(
            send(&bb, Method::POST, &ann, Some(json!(batch)), false)
                .await
                .status(),
            200
        );
    }
    assert_eq!(bb.annotations(SHA, id).len(), 902);
    let batch: Vec<Value> = (0..99).map(|i| a(2000 + i)).collect();
    assert_eq!(
        cloud_err(send(&bb, Method::POST, &ann, Some(json!(batch)), false).await)
            .await
            .0,
        400
    );
    assert_eq!(bb.annotations(SHA, id).len(), 902);
    let batch: Vec<Value> = (0..98).map(|i| a(2000 + i)).collect();
    assert_eq!(
        send(&bb, Method::POST, &ann, Some(json!(batch)), false)
            .await
            .status(),
        200
    );
    let mut again = a(0);
    again["summary"] = json!("updated");
    assert_eq!(
        send(&bb, Method::POST, &ann, Some(json!([again])), false)
            .await
            .status(),
        200
    );
    assert_eq!(bb.annotations(SHA, id).len(), 1000);
    assert_eq!(bb.annotations(SHA, id)[0]["summary"], "updated");
    // Paginated GET.
    let page = json_of(get(&bb, &format!("{ann}?pagelen=50")).await).await;
    assert_eq!(page["values"].as_array().unwrap().len(), 50);
    assert_eq!(page["size"], 1000);
    assert!(page["next"].as_str().unwrap().starts_with(&bb.url()));
    // Delete cascades.
    assert_eq!(
        send(&bb, Method::DELETE, &cloud_report_url(id), None, false)
            .await
            .status(),
        204
    );
    assert!(bb.annotations(SHA, id).is_empty());
    assert_eq!(
        cloud_err(get(&bb, &cloud_report_url(id)).await).await.0,
        404
    );
    assert_eq!(
        cloud_err(send(&bb, Method::DELETE, &cloud_report_url(id), None, false).await)
            .await
            .0,
        404
    );
}

// ---------------------------------------------------------------------------------------------
// Changelog sources

fn sha(n: u8) -> String {
    format!("{:02x}", n).repeat(20)
}

fn at(minute: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 12, minute, 0).unwrap()
}

/// A ← B ← C ← M ← E on main; A ← D (feature) merged in M.
/// B touches src/app/main.rs, C src/lib.rs, D docs/readme.md, E src/app/x.rs.
fn graph() -> Vec<FakeCommit> {
    let (a, b, c, d, m, e) = (sha(1), sha(2), sha(3), sha(4), sha(5), sha(6));
    vec![
        FakeCommit::new(&a, &[], "initial", at(0)).touching(&["README.md"]),
        FakeCommit::new(&b, &[&a], "app", at(1)).touching(&["src/app/main.rs"]),
        FakeCommit::new(&d, &[&a], "docs", at(2)).touching(&["docs/readme.md"]),
        FakeCommit::new(&c, &[&b], "lib", at(3)).touching(&["src/lib.rs", "src/application.rs"]),
        FakeCommit::new(&m, &[&c, &d], "Merge feature", at(4)),
        FakeCommit::new(&e, &[&m], "x", at(5)).touching(&["src/app/x.rs"]),
    ]
}

async fn dc_ids(bb: &FakeBitbucket, query: &str) -> Vec<String> {
    let v = json_of(
        get(
            bb,
            &format!("/rest/api/latest/projects/PROJ/repos/web/commits?{query}"),
        )
        .await,
    )
    .await;
    v["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn dc_commits_follow_git_log_since_until_path_and_merges() {
    let bb = FakeBitbucket::start(dc_version("8.19.0")).await;
    bb.add_commits("PROJ", "web", graph());
    let s = |n: u8| sha(n);
    assert_eq!(dc_ids(&bb, "").await, [s(6), s(5), s(3), s(4), s(2), s(1)]);
    assert_eq!(
        dc_ids(&bb, &format!("since={}&until={}", s(1), s(6))).await,
        [s(6), s(5), s(3), s(4), s(2)]
    );
    // since is exclusive with all its ancestors; until inclusive.
    assert_eq!(
        dc_ids(&bb, &format!("since={}&until={}", s(3), s(5))).await,
        [s(5), s(4)]
    );
    assert_eq!(
        dc_ids(&bb, &format!("since={}&until={}", s(4), s(3))).await,
        [s(3), s(2)]
    );
    assert_eq!(
        dc_ids(&bb, &format!("until={}", s(3))).await,
        [s(3), s(2), s(1)]
    );
    // merges.
    assert_eq!(
        dc_ids(&bb, &format!("since={}&merges=exclude", s(1))).await,
        [s(6), s(3), s(4), s(2)]
    );
    assert_eq!(dc_ids(&bb, "merges=only").await, [s(5)]);
    assert_eq!(
        dc_err(
            get(
                &bb,
                "/rest/api/latest/projects/PROJ/repos/web/commits?merges=none"
            )
            .await
        )
        .await,
        (400, vec!["merges".to_owned()])
    );
    // path: a directory prefix (not a string prefix) or an exact file.
    assert_eq!(dc_ids(&bb, "path=src/app").await, [s(6), s(2)]);
    assert_eq!(dc_ids(&bb, "path=src/app/").await, [s(6), s(2)]);
    assert_eq!(dc_ids(&bb, "path=src/lib.rs").await, [s(3)]);
    assert_eq!(
        dc_ids(&bb, &format!("path=src&since={}", s(2))).await,
        [s(6), s(3)]
    );
    // Unknown commits: 400 unless ignoreMissing.
    let unknown = sha(9);
    let r = get(
        &bb,
        &format!(
            "/rest/api/latest/projects/PROJ/repos/web/commits?since={unknown}&until={}",
            s(6)
        ),
    )
    .await;
    assert_eq!(dc_err(r).await.0, 400);
    let r = get(
        &bb,
        &format!("/rest/api/latest/projects/PROJ/repos/web/commits?until={unknown}"),
    )
    .await;
    assert_eq!(dc_err(r).await.0, 400);
    assert_eq!(
        dc_ids(
            &bb,
            &format!("since={unknown}&until={}&ignoreMissing=true", s(3))
        )
        .await,
        [s(3), s(2), s(1)]
    );
    assert!(
        dc_ids(&bb, &format!("until={unknown}&ignoreMissing=true"))
            .await
            .is_empty()
    );
    // Commit objects.
    let v = json_of(
        get(
            &bb,
            &format!(
                "/rest/api/1.0/projects/proj/repos/web/commits?until={}&limit=1",
                s(5)
            ),
        )
        .await,
    )
    .await;
    let c = &v["values"][0];
    assert_eq!(c["displayId"], &s(5)[..11]);
    assert_eq!(c["parents"].as_array().unwrap().len(), 2);
    assert_eq!(c["authorTimestamp"], at(4).timestamp_millis());
    assert_eq!(c["author"]["emailAddress"], "jane@example.com");
    // Unknown repository.
    assert_eq!(
        dc_err(get(&bb, "/rest/api/latest/projects/PROJ/repos/nope/commits").await)
            .await
            .0,
        404
    );
}

#[tokio::test]
async fn dc_paging_breaks_a_start_plus_limit_client() {
    let mut opts = dc_version("8.19.0");
    opts.max_page_limit = 4;
    let bb = FakeBitbucket::start(opts).await;
    let commits: Vec<FakeCommit> = (1..=11u8)
        .map(|i| {
            let parent = sha(i - 1);
            let parents: Vec<&str> = if i == 1 {
                vec![]
            } else {
                vec![parent.as_str()]
            };
            FakeCommit::new(&sha(i), &parents, &format!("c{i}"), at(u32::from(i)))
        })
        .collect();
    bb.add_commits("PROJ", "web", commits);
    let base = "/rest/api/latest/projects/PROJ/repos/web/commits";
    // The cap applies, and the page says so.
    let first = json_of(get(&bb, &format!("{base}?limit=1000")).await).await;
    assert_eq!(first["limit"], 4);
    assert_eq!(first["size"], 4);
    assert_eq!(first["start"], 0);
    assert_eq!(first["isLastPage"], false);
    let next = first["nextPageStart"].as_u64().unwrap();
    assert_ne!(next, 4, "nextPageStart must not be start+limit");
    // A client computing start+limit is refused.
    let (s, ctx) = dc_err(get(&bb, &format!("{base}?limit=4&start=4")).await).await;
    assert_eq!((s, ctx), (400, vec!["start".to_owned()]));
    // Following nextPageStart visits every commit once.
    let mut seen = Vec::new();
    let mut start = 0;
    loop {
        let page = json_of(get(&bb, &format!("{base}?limit=4&start={start}")).await).await;
        seen.extend(
            page["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["id"].as_str().unwrap().to_owned()),
        );
        if page["isLastPage"].as_bool().unwrap() {
            assert!(page.get("nextPageStart").is_none() || page["nextPageStart"].is_null());
            break;
        }
        start = page["nextPageStart"].as_u64().unwrap();
    }
    let want: Vec<String> = (1..=11u8).rev().map(sha).collect();
    assert_eq!(seen, want);
    // A start issued for another listing is refused too.
    let (s, _) = dc_err(get(&bb, &format!("{base}?limit=4&start={next}&path=src")).await).await;
    assert_eq!(s, 400);
}

#[tokio::test]
async fn dc_pull_requests_for_a_commit() {
    let bb = FakeBitbucket::start(dc_version("8.19.0")).await;
    bb.add_commits("PROJ", "web", graph());
    for (id, state, commits) in [
        (1, PullRequestState::Merged, vec![sha(4)]),
        (2, PullRequestState::Open, vec![sha(4), sha(6)]),
        (3, PullRequestState::Declined, vec![sha(2)]),
    ] {
        bb.add_pull_request(
            "PROJ",
            "web",
            FakePullRequest {
                id,
                title: format!("PR {id}"),
                state,
                from_branch: format!("feature/{id}"),
                to_branch: "main".into(),
                commits,
            },
        );
    }
    let url = |c: &str, q: &str| {
        format!("/rest/api/latest/projects/PROJ/repos/web/commits/{c}/pull-requests{q}")
    };
    let v = json_of(get(&bb, &url(&sha(4), "")).await).await;
    let ids: Vec<u64> = v["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, [1, 2]);
    assert_eq!(v["values"][0]["state"], "MERGED");
    assert_eq!(v["values"][1]["fromRef"]["id"], "refs/heads/feature/2");
    assert_eq!(v["values"][1]["fromRef"]["latestCommit"], sha(6));
    assert_eq!(v["values"][1]["toRef"]["displayId"], "main");
    assert_eq!(v["isLastPage"], true);
    // Paged.
    let p1 = json_of(get(&bb, &url(&sha(4), "?limit=1")).await).await;
    assert_eq!(p1["values"].as_array().unwrap().len(), 1);
    let next = p1["nextPageStart"].as_u64().unwrap();
    let p2 = json_of(get(&bb, &url(&sha(4), &format!("?limit=1&start={next}"))).await).await;
    assert_eq!(p2["values"][0]["id"], 2);
    assert_eq!(
        dc_err(get(&bb, &url(&sha(4), "?limit=1&start=1")).await)
            .await
            .0,
        400
    );
    // None, unknown, short.
    assert_eq!(
        json_of(get(&bb, &url(&sha(1), "")).await).await["values"],
        json!([])
    );
    assert_eq!(dc_err(get(&bb, &url(&sha(9), "")).await).await.0, 404);
    assert_eq!(dc_err(get(&bb, &url("05050505", "")).await).await.0, 400);
}

#[tokio::test]
async fn cloud_commits_use_iterator_paging() {
    let bb = FakeBitbucket::start(cloud()).await;
    bb.add_commits("acme", "web", graph());
    let s = |n: u8| sha(n);
    let ids = |v: &Value| -> Vec<String> {
        v["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["hash"].as_str().unwrap().to_owned())
            .collect()
    };
    let base = "/2.0/repositories/acme/web/commits";
    let v = json_of(get(&bb, &format!("{base}/{}?exclude={}", s(6), s(1))).await).await;
    assert_eq!(ids(&v), [s(6), s(5), s(3), s(4), s(2)]);
    for absent in ["page", "size", "previous", "next"] {
        assert!(v.get(absent).is_none(), "{absent} in {v}");
    }
    assert_eq!(v["values"][0]["parents"][0]["hash"], s(5));
    assert_eq!(
        v["values"][0]["author"]["raw"],
        "Jane Doe <jane@example.com>"
    );
    // include/exclude repeatable; path.
    let v = json_of(
        get(
            &bb,
            &format!(
                "{base}?include={}&include={}&exclude={}&exclude={}",
                s(3),
                s(4),
                s(2),
                s(1)
            ),
        )
        .await,
    )
    .await;
    assert_eq!(ids(&v), [s(3), s(4)]);
    let v = json_of(get(&bb, &format!("{base}/{}?path=src/app", s(6))).await).await;
    assert_eq!(ids(&v), [s(6), s(2)]);
    // pagelen above 100: 400; page numbers are not tokens.
    assert_eq!(
        cloud_err(get(&bb, &format!("{base}/{}?pagelen=101", s(6))).await)
            .await
            .0,
        400
    );
    assert_eq!(
        cloud_err(get(&bb, &format!("{base}/{}?pagelen=2&page=2", s(6))).await)
            .await
            .0,
        400
    );
    // Follow `next` verbatim.
    let mut url = format!("{}{base}/{}?pagelen=2", bb.url(), s(6));
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let v: Value = client()
            .get(&url)
            .basic_auth(DEFAULT_BITBUCKET_USER, Some(DEFAULT_BITBUCKET_PASSWORD))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        pages += 1;
        assert_eq!(v["pagelen"], 2);
        assert!(v.get("page").is_none() && v.get("size").is_none() && v.get("previous").is_none());
        seen.extend(ids(&v));
        match v.get("next").and_then(Value::as_str) {
            Some(n) => {
                assert!(!n.contains("page=2"), "{n}");
                url = n.to_owned();
            }
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, [s(6), s(5), s(3), s(4), s(2), s(1)]);
    // Unknown revision: 404.
    assert_eq!(
        cloud_err(get(&bb, &format!("{base}/{}", sha(9))).await)
            .await
            .0,
        404
    );
}

#[tokio::test]
async fn cloud_pull_requests_for_a_commit_answer_202_until_indexed() {
    let mut opts = cloud();
    opts.cloud_pr_index_polls = 2;
    let bb = FakeBitbucket::start(opts).await;
    bb.add_commits("acme", "web", graph());
    bb.add_pull_request(
        "acme",
        "web",
        FakePullRequest {
            id: 12,
            title: "Feature".into(),
            state: PullRequestState::Merged,
            from_branch: "feature".into(),
            to_branch: "main".into(),
            commits: vec![sha(4)],
        },
    );
    let url = format!("/2.0/repositories/acme/web/commit/{}/pullrequests", sha(4));
    assert_eq!(get(&bb, &url).await.status(), 202);
    assert_eq!(get(&bb, &url).await.status(), 202);
    let r = get(&bb, &url).await;
    assert_eq!(r.status(), 200);
    let v = json_of(r).await;
    assert_eq!(v["values"][0]["id"], 12);
    assert_eq!(v["values"][0]["state"], "MERGED");
    assert_eq!(v["values"][0]["source"]["branch"]["name"], "feature");
    assert_eq!(v["page"], 1);
    // Indexed once, stays indexed; other commits index separately.
    assert_eq!(get(&bb, &url).await.status(), 200);
    let other = format!("/2.0/repositories/acme/web/commit/{}/pullrequests", sha(6));
    assert_eq!(get(&bb, &other).await.status(), 202);
    assert_eq!(
        cloud_err(
            get(
                &bb,
                &format!("/2.0/repositories/acme/web/commit/{}/pullrequests", sha(9))
            )
            .await
        )
        .await
        .0,
        404
    );
    // The branch name resolves as a revision too.
    let v = json_of(get(&bb, "/2.0/repositories/acme/web/commits/feature").await).await;
    assert_eq!(v["values"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn extra_endpoints_need_credentials_and_count_against_the_rate_limit() {
    let mut opts = dc_version("8.19.0");
    opts.rate_limit = Some(TokenBucket {
        size: 3,
        refill_per_sec: 0.001,
    });
    let bb = FakeBitbucket::start(opts).await;
    bb.add_commits("PROJ", "web", graph());
    let base = "/rest/api/latest/projects/PROJ/repos/web/commits";
    let r = client()
        .get(format!("{}{base}", bb.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(dc_err(r).await.0, 401);
    assert_eq!(get(&bb, base).await.status(), 200);
    assert_eq!(get(&bb, &report_url("k")).await.status(), 404);
    assert_eq!(
        get(
            &bb,
            &format!(
                "{}?key=k&environmentKey=e&deploymentSequenceNumber=1",
                deployments(SHA)
            )
        )
        .await
        .status(),
        404
    );
    let r = get(&bb, base).await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().get("retry-after").is_some());

    let mut opts = cloud();
    opts.rate_limit = Some(TokenBucket {
        size: 1,
        refill_per_sec: 0.001,
    });
    let bb = FakeBitbucket::start(opts).await;
    bb.add_commits("acme", "web", graph());
    let r = client()
        .get(format!("{}/2.0/repositories/acme/web/commits", bb.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(cloud_err(r).await.0, 401);
    assert_eq!(
        get(&bb, "/2.0/repositories/acme/web/commits")
            .await
            .status(),
        200
    );
    assert_eq!(get(&bb, &cloud_report_url("x")).await.status(), 429);
}

#[tokio::test]
async fn single_annotations_and_the_commit_annotation_search() {
    let bb = FakeBitbucket::start(dc_version("8.19.0")).await;
    bb.add_repository("PROJ", "web");
    for key in ["r1", "r2"] {
        assert_eq!(
            send(&bb, Method::PUT, &report_url(key), Some(report()), false)
                .await
                .status(),
            200
        );
    }
    let ann = |key: &str| format!("{}/annotations", report_url(key));
    assert_eq!(
        send(
            &bb,
            Method::POST,
            &ann("r1"),
            Some(json!({"annotations": [annotation(1), annotation(2)]})),
            false
        )
        .await
        .status(),
        204
    );
    let mut low = annotation(3);
    low["severity"] = json!("LOW");
    assert_eq!(
        send(
            &bb,
            Method::POST,
            &ann("r2"),
            Some(json!({"annotations": [low]})),
            false
        )
        .await
        .status(),
        204
    );
    // PUT one by externalId replaces it (create or replace), 204; creator only.
    let mut changed = annotation(1);
    changed["message"] = json!("changed");
    assert_eq!(
        send(
            &bb,
            Method::PUT,
            &format!("{}/a1", ann("r1")),
            Some(changed.clone()),
            true
        )
        .await
        .status(),
        401
    );
    let r = send(
        &bb,
        Method::PUT,
        &format!("{}/a1", ann("r1")),
        Some(changed),
        false,
    )
    .await;
    assert_eq!(r.status(), 204);
    let list = bb.annotations(SHA, "r1");
    assert_eq!(list.len(), 2);
    assert!(
        list.iter()
            .any(|a| a["message"] == "changed" && a["externalId"] == "a1")
    );
    let (s, ctx) = dc_err(
        send(
            &bb,
            Method::PUT,
            &format!("{}/a9", ann("r1")),
            Some(json!({"message": "m"})),
            false,
        )
        .await,
    )
    .await;
    assert_eq!((s, ctx), (400, vec!["annotations[0].severity".to_owned()]));
    // Commit-wide search with filters.
    let base = format!("/rest/insights/latest/projects/PROJ/repos/web/commits/{SHA}/annotations");
    let all = json_of(get(&bb, &base).await).await;
    assert_eq!(all["annotations"].as_array().unwrap().len(), 3);
    let high = json_of(get(&bb, &format!("{base}?severity=HIGH")).await).await;
    assert_eq!(high["annotations"].as_array().unwrap().len(), 2);
    let r2 = json_of(get(&bb, &format!("{base}?key=r2&key=nope")).await).await;
    assert_eq!(r2["annotations"][0]["externalId"], "a3");
    // DELETE one.
    assert_eq!(
        send(
            &bb,
            Method::DELETE,
            &format!("{}/a2", ann("r1")),
            None,
            false
        )
        .await
        .status(),
        204
    );
    assert_eq!(bb.annotations(SHA, "r1").len(), 1);

    // Cloud: GET / PUT / DELETE one annotation by uuid or external id.
    let bb = FakeBitbucket::start(cloud()).await;
    bb.add_repository("acme", "web");
    assert_eq!(
        send(
            &bb,
            Method::PUT,
            &cloud_report_url("r"),
            Some(cloud_report()),
            false
        )
        .await
        .status(),
        200
    );
    let ann = format!("{}/annotations", cloud_report_url("r"));
    let r = send(
        &bb,
        Method::POST,
        &ann,
        Some(json!([{"external_id": "e1", "summary": "one", "line": 3}])),
        false,
    )
    .await;
    let uuid = json_of(r).await[0]["uuid"].as_str().unwrap().to_owned();
    let one = json_of(get(&bb, &format!("{ann}/{uuid}")).await).await;
    assert_eq!(one["summary"], "one");
    assert_eq!(get(&bb, &format!("{ann}/e1")).await.status(), 200);
    let r = send(
        &bb,
        Method::PUT,
        &format!("{ann}/e1"),
        Some(json!({"summary": "two"})),
        false,
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(json_of(r).await["uuid"], uuid.as_str());
    assert_eq!(
        cloud_err(
            send(
                &bb,
                Method::PUT,
                &format!("{ann}/e1"),
                Some(json!({"summary": "s", "line": 0})),
                false
            )
            .await
        )
        .await
        .0,
        400
    );
    let r = send(
        &bb,
        Method::PUT,
        &format!("{ann}/e2"),
        Some(json!({"summary": "new"})),
        false,
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(bb.annotations(SHA, "r").len(), 2);
    assert_eq!(
        send(&bb, Method::DELETE, &format!("{ann}/{uuid}"), None, false)
            .await
            .status(),
        204
    );
    assert_eq!(cloud_err(get(&bb, &format!("{ann}/e1")).await).await.0, 404);
    assert_eq!(bb.annotations(SHA, "r").len(), 1);
}

#[tokio::test]
async fn bitbucket_server_has_commits_and_code_insights_but_no_deployments() {
    let mut opts = dc_version("0");
    opts.flavour = BitbucketFlavour::Server {
        version: "6.10.0".into(),
    };
    let bb = FakeBitbucket::start(opts).await;
    bb.add_commits("PROJ", "web", graph());
    assert_eq!(
        dc_ids(&bb, &format!("since={}", sha(3))).await,
        [sha(6), sha(5), sha(4)]
    );
    assert_eq!(
        send(&bb, Method::PUT, &report_url("k"), Some(report()), false)
            .await
            .status(),
        200
    );
    assert_eq!(
        send(
            &bb,
            Method::POST,
            &deployments(SHA),
            Some(deployment("SUCCESSFUL", 1)),
            false
        )
        .await
        .status(),
        404
    );
    assert_eq!(get(&bb, "/rest/capabilities").await.status(), 404);
}

#[tokio::test]
async fn required_builds_conditions() {
    let bb = FakeBitbucket::start(dc_version("8.19.0")).await;
    bb.add_repository("PROJ", "web");
    let base = "/rest/required-builds/latest/projects/PROJ/repos/web";
    let ok = json!({
        "buildParentKeys": ["BK-web"],
        "refMatcher": {"id": "refs/heads/main", "type": {"id": "BRANCH"}},
        "exemptRefMatcher": {"id": "release/*", "type": {"id": "PATTERN"}},
    });
    // Repository admin only.
    assert_eq!(
        dc_err(
            send(
                &bb,
                Method::POST,
                &format!("{base}/condition"),
                Some(ok.clone()),
                true
            )
            .await
        )
        .await
        .0,
        401
    );
    let r = send(
        &bb,
        Method::POST,
        &format!("{base}/condition"),
        Some(ok.clone()),
        false,
    )
    .await;
    assert_eq!(r.status(), 200);
    let id = json_of(r).await["id"].as_u64().unwrap();
    let bad: Vec<(&str, Edit)> = vec![
        (
            "buildParentKeys",
            Box::new(|b| b["buildParentKeys"] = json!([])),
        ),
        (
            "buildParentKeys",
            Box::new(|b| {
                b["buildParentKeys"] = json!((0..101).map(|i| format!("k{i}")).collect::<Vec<_>>())
            }),
        ),
        (
            "refMatcher",
            Box::new(|b| {
                b.as_object_mut().unwrap().remove("refMatcher");
            }),
        ),
        (
            "refMatcher.type.id",
            Box::new(|b| b["refMatcher"]["type"]["id"] = json!("TAG")),
        ),
        (
            "exemptRefMatcher.type.id",
            Box::new(|b| b["exemptRefMatcher"]["type"] = json!({})),
        ),
    ];
    for (ctx, f) in bad {
        let mut b = ok.clone();
        f(&mut b);
        let (s, got) = dc_err(
            send(
                &bb,
                Method::POST,
                &format!("{base}/condition"),
                Some(b),
                false,
            )
            .await,
        )
        .await;
        assert_eq!((s, got), (400, vec![ctx.to_owned()]));
    }
    let mut changed = ok.clone();
    changed["buildParentKeys"] = json!(["BK-web", "BK-lint"]);
    assert_eq!(
        send(
            &bb,
            Method::PUT,
            &format!("{base}/condition/{id}"),
            Some(changed),
            false
        )
        .await
        .status(),
        200
    );
    assert_eq!(
        send(
            &bb,
            Method::PUT,
            &format!("{base}/condition/999999"),
            Some(ok.clone()),
            false
        )
        .await
        .status(),
        404
    );
    // Anyone with read access lists them (paged).
    let list =
        json_of(send(&bb, Method::GET, &format!("{base}/conditions"), None, true).await).await;
    assert_eq!(
        list["values"][0]["buildParentKeys"],
        json!(["BK-web", "BK-lint"])
    );
    assert_eq!(list["isLastPage"], true);
    assert_eq!(bb.required_build_conditions("proj", "web").len(), 1);
    assert_eq!(
        dc_err(
            send(
                &bb,
                Method::DELETE,
                &format!("{base}/condition/{id}"),
                None,
                true
            )
            .await
        )
        .await
        .0,
        401
    );
    assert_eq!(
        send(
            &bb,
            Method::DELETE,
            &format!("{base}/condition/{id}"),
            None,
            false
        )
        .await
        .status(),
        204
    );
    assert!(bb.required_build_conditions("PROJ", "web").is_empty());
}

#[tokio::test]
async fn revisions_may_be_branches_and_cloud_accepts_a_form_post() {
    let bb = FakeBitbucket::start(dc_version("8.19.0")).await;
    bb.add_commits("PROJ", "web", graph());
    bb.add_pull_request(
        "PROJ",
        "web",
        FakePullRequest {
            id: 1,
            title: "Docs".into(),
            state: PullRequestState::Open,
            from_branch: "feature/docs".into(),
            to_branch: "main".into(),
            commits: vec![sha(4)],
        },
    );
    assert_eq!(
        dc_ids(&bb, "until=refs/heads/feature/docs").await,
        [sha(4), sha(1)]
    );
    assert_eq!(
        dc_ids(&bb, &format!("until={}&since={}", &sha(3)[..12], sha(2))).await,
        [sha(3)]
    );

    let bb = FakeBitbucket::start(cloud()).await;
    bb.add_commits("acme", "web", graph());
    let r = client()
        .post(format!("{}/2.0/repositories/acme/web/commits", bb.url()))
        .basic_auth(DEFAULT_BITBUCKET_USER, Some(DEFAULT_BITBUCKET_PASSWORD))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!(
            "include={}&exclude={}&exclude={}",
            sha(5),
            sha(3),
            sha(1)
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v = json_of(r).await;
    let ids: Vec<&str> = v["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["hash"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [sha(5), sha(4)]);
}
