//! `POST /webhooks/buildkite` end to end: kitebridge's real router and `AppState` (built by
//! `bootstrap::app_state` from configuration), a real store (SQLite in memory; the DynamoDB
//! emulator in one test), a fake Buildkite producing real-looking deliveries and a fake
//! Bitbucket receiving the statuses. Requests go through `tower::ServiceExt::oneshot` or, in
//! `served_over_tcp`, through `axum::serve` on 127.0.0.1.

#[path = "webhook_support.rs"]
mod webhook_support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::Extension;
use axum::body::Body;
use axum::http::{Method, StatusCode, header};
use chrono::Utc;
use kitebridge::buildkite::model::{Build, Pipeline};
use kitebridge::http::webhook::WebhookClock;
use kitebridge::observe::{BuildObserver, ObserveError};
use kitebridge::store::{SqliteKv, StatusLedger, Store};
use kitebridge_fakes::{
    BuildState, Fault, WebhookAuth, WebhookDelivery, WebhookEvent, sign_webhook,
};
use serde::Deserialize;
use serde_json::{Value, json};
use webhook_support::*;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Headers of a delivery of `body` signed with `token` at `timestamp`.
fn signed_headers(event: &str, token: &str, timestamp: i64, body: &str) -> Vec<(String, String)> {
    let signature = format!(
        "timestamp={timestamp},signature={}",
        sign_webhook(token, timestamp, body)
    );
    headers(&[
        ("Content-Type", "application/json"),
        ("X-Buildkite-Event", event),
        ("X-Buildkite-Signature", &signature),
    ])
}

fn now() -> i64 {
    Utc::now().timestamp()
}

// ---- vectors --------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
struct SignatureVector {
    name: String,
    token: String,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    body_file: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    expected: String,
}

impl SignatureVector {
    fn body(&self) -> String {
        match (&self.body, &self.body_file) {
            (Some(b), _) => b.clone(),
            (None, Some(f)) => std::fs::read_to_string(fixtures().join(f)).expect("body file"),
            (None, None) => panic!("{}: no body", self.name),
        }
    }

    /// When the delivery was signed (the time to replay it at), if signed.
    fn signed_at(&self) -> Option<i64> {
        let header = self
            .headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("X-Buildkite-Signature"))?
            .1;
        header.split(',').find_map(|part| {
            let (k, v) = part.split_once('=')?;
            (k.trim() == "timestamp").then(|| v.trim().parse().ok())?
        })
    }

    fn headers(&self) -> Vec<(String, String)> {
        self.headers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

fn signature_vectors() -> Vec<SignatureVector> {
    let text = std::fs::read_to_string(fixtures().join("webhook_signature.json")).expect("vectors");
    serde_json::from_str(&text).expect("a list of vectors")
}

/// What a vector's body must get once verified.
fn expected_after_verification(body: &str) -> (StatusCode, Option<&'static str>) {
    let v: Value = serde_json::from_str(body).expect("vector bodies are JSON");
    match v["event"].as_str() {
        Some("ping") => (StatusCode::OK, None),
        // The compact vector body has no commit: 400 naming the field.
        Some(_) if v["build"]["commit"].is_null() => {
            (StatusCode::BAD_REQUEST, Some("build.commit"))
        }
        // The example pipelines live on GitHub: verified, parsed, mapped, skipped.
        Some(_) => (StatusCode::OK, None),
        None => panic!("vector body without event"),
    }
}

#[tokio::test]
async fn every_signature_vector_through_http() {
    let vectors = signature_vectors();
    let tokens: Vec<String> = vectors.iter().map(|v| v.token.clone()).collect();
    let tokens = tokens.join(",");
    let env = Env::with(store_sqlite(), &[("BUILDKITE_WEBHOOK_TOKEN", &tokens)]).await;
    assert!(vectors.len() >= 7);
    for v in &vectors {
        let body = v.body();
        // Replayed at the time it was signed (a token delivery has no time: any will do).
        let at = v.signed_at().unwrap_or_else(now);
        let router = env.router().layer(Extension(WebhookClock::fixed(at)));
        let (status, answer) = call(&router, request(&v.headers(), body.clone())).await;
        match v.expected.as_str() {
            "valid" => {
                let (want, field) = expected_after_verification(&body);
                assert_eq!(status, want, "{}: {answer}", v.name);
                if let Some(field) = field {
                    assert_eq!(answer["field"], field, "{}", v.name);
                }
            }
            "invalid" => {
                assert_eq!(status, StatusCode::UNAUTHORIZED, "{}: {answer}", v.name);
                assert_eq!(answer["error"], "unauthorized", "{}", v.name);
                let message = answer["message"].as_str().expect("message");
                assert!(!message.contains(&v.token), "{}: {message}", v.name);
                assert!(!message.contains(&body), "{}: {message}", v.name);
            }
            other => panic!("{}: unknown expectation {other}", v.name),
        }
        // A signed vector delivered today is a replay.
        if v.expected == "valid" && v.signed_at().is_some() {
            let (status, answer) = call(&env.router(), request(&v.headers(), body)).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{}", v.name);
            assert!(
                answer["message"].as_str().unwrap_or("").contains("old"),
                "{}: {answer}",
                v.name
            );
        }
    }
    assert!(env.bb.posts().is_empty(), "no vector is for this Bitbucket");
}

fn example_payloads() -> Vec<(String, String)> {
    let mut files: Vec<(String, String)> = std::fs::read_dir(fixtures().join("webhooks"))
        .expect("fixtures/webhooks")
        .map(|e| {
            let path = e.expect("entry").path();
            let name = path
                .file_name()
                .expect("name")
                .to_string_lossy()
                .into_owned();
            (name, std::fs::read_to_string(&path).expect("payload"))
        })
        .collect();
    files.sort();
    assert_eq!(files.len(), 5);
    files
}

#[tokio::test]
async fn every_example_payload_through_http() {
    let env = Env::start().await;
    let router = env.router();
    let expected_state = |file: &str| match file {
        "build.scheduled.json" | "build.running.json" => "INPROGRESS",
        "build.finished.passed.json" => "SUCCESSFUL",
        // Blocked is never a success; Data Center with cancelledStatus shows it as FAILED.
        "build.finished.failed.json" | "build.finished.blocked.json" => "FAILED",
        other => panic!("{other} has no expectation here"),
    };
    for (file, text) in example_payloads() {
        let event = serde_json::from_str::<Value>(&text).expect("json")["event"]
            .as_str()
            .expect("event")
            .to_owned();

        // As written (pipeline on GitHub), in both authentication modes: verified, then skipped.
        for hs in [
            signed_headers(&event, OLD_TOKEN, now(), &text),
            headers(&[
                ("X-Buildkite-Event", &event),
                ("X-Buildkite-Token", OLD_TOKEN),
            ]),
        ] {
            let (status, answer) = call(&router, request(&hs, text.clone())).await;
            assert_eq!(status, StatusCode::OK, "{file}: {answer}");
            assert_eq!(answer["status"], "skipped", "{file}");
            assert!(
                answer["reason"]
                    .as_str()
                    .unwrap()
                    .contains("not on the configured Bitbucket"),
                "{file}: {answer}"
            );
        }

        // The same payload for a repository on our Bitbucket, on a fresh commit: posted.
        let mut v: Value = serde_json::from_str(&text).expect("json");
        let commit = random_sha();
        v["build"]["commit"] = json!(commit);
        v["pipeline"]["repository"] = json!("ssh://git@127.0.0.1:7999/proj/web.git");
        let body = v.to_string();
        let (status, answer) = call(
            &router,
            request(&signed_headers(&event, NEW_TOKEN, now(), &body), body),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{file}: {answer}");
        assert_eq!(answer["status"], "posted", "{file}");
        let posted = env
            .bb
            .status(&commit, "acme-inc/web-app")
            .unwrap_or_else(|| panic!("{file}: nothing on Bitbucket"));
        assert_eq!(posted.state, expected_state(&file), "{file}");
        assert_eq!(answer["state"], expected_state(&file), "{file}");
    }
}

// ---- event families -------------------------------------------------------------------------

#[tokio::test]
async fn every_event_family() {
    let env = Env::start().await;
    let router = env.router();

    // ping, in both modes.
    for auth in [signed(), WebhookAuth::Token(OLD_TOKEN.into())] {
        let d = env
            .bk
            .ping_webhook(ORG, "https://kitebridge.example/webhooks/buildkite", &auth);
        let (status, answer) = send(&router, &d).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(answer["event"], "ping");
    }

    // Every build.* event, with the state Buildkite has at that point.
    let cases = [
        (
            BuildState::Scheduled,
            WebhookEvent::BuildScheduled,
            "INPROGRESS",
        ),
        (
            BuildState::Running,
            WebhookEvent::BuildRunning,
            "INPROGRESS",
        ),
        (
            BuildState::Failing,
            WebhookEvent::BuildFailing,
            // Failing means a job failed: the commit is already red.
            "FAILED",
        ),
        (
            BuildState::Passed,
            WebhookEvent::BuildFinished,
            "SUCCESSFUL",
        ),
        (BuildState::Failed, WebhookEvent::BuildFinished, "FAILED"),
        (
            BuildState::Canceled,
            WebhookEvent::BuildFinished,
            "CANCELLED",
        ),
        (BuildState::Skipped, WebhookEvent::BuildSkipped, "CANCELLED"),
    ];
    for (state, event, want) in cases {
        let build = env.new_build(state);
        let d = env.delivery(&build, event, &signed());
        let (status, answer) = send(&router, &d).await;
        assert_eq!(status, StatusCode::OK, "{event:?} {state:?}: {answer}");
        assert_eq!(answer["status"], "posted", "{event:?}");
        assert_eq!(answer["event"], event.as_str());
        assert_eq!(answer["number"], build.number);
        let on_bb = env.bb.status(&build.commit, KEY).expect("posted");
        assert_eq!(on_bb.state, want, "{event:?} {state:?}");
    }
    // A blocked build arrives as build.finished with blocked: true.
    let build = env.bk.add_build(
        kitebridge_fakes::Build::new(ORG, PIPELINE, random_sha(), "main")
            .with_state(BuildState::Passed)
            .with_blocked(true),
    );
    let (status, answer) = send(
        &router,
        &env.delivery(&build, WebhookEvent::BuildFinished, &signed()),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_ne!(
        env.bb.status(&build.commit, KEY).expect("posted").state,
        "SUCCESSFUL"
    );

    // Everything else: acknowledged and ignored, nothing posted.
    let posts_before = env.bb.posts().len();
    let build = env.new_build(BuildState::Running);
    let build_json = env
        .delivery(&build, WebhookEvent::BuildRunning, &signed())
        .json();
    let others = [
        "job.scheduled",
        "job.started",
        "job.finished",
        "job.activated",
        "job.promised_exit_status",
        "agent.connected",
        "agent.lost",
        "agent.disconnected",
        "agent.stopping",
        "agent.stopped",
        "agent.blocked",
        "cluster_token.registration_blocked",
        "something.new",
    ];
    for name in others {
        let body = if name.starts_with("job.") {
            json!({"event": name, "job": {"id": "j1", "type": "script", "state": "running"},
                   "build": build_json["build"], "pipeline": build_json["pipeline"],
                   "sender": build_json["sender"]})
        } else {
            json!({"event": name, "agent": {"id": "a1", "name": "agent-1"},
                   "blocked_ip": "203.0.113.9", "sender": build_json["sender"]})
        }
        .to_string();
        let (status, answer) = call(
            &router,
            request(&signed_headers(name, NEW_TOKEN, now(), &body), body),
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{name}: {answer}");
        assert_eq!(answer["ignored"], name);
    }
    assert_eq!(
        env.bb.posts().len(),
        posts_before,
        "ignored events post nothing"
    );
}

// ---- refusals -------------------------------------------------------------------------------

#[tokio::test]
async fn forged_tampered_and_replayed_deliveries_are_refused() {
    let env = Env::start().await;
    let router = env.router();
    let build = env.new_build(BuildState::Passed);
    let body = env
        .delivery(&build, WebhookEvent::BuildFinished, &signed())
        .body;
    let t = now();
    let sig = |token: &str, ts: i64, body: &str| {
        format!("timestamp={ts},signature={}", sign_webhook(token, ts, body))
    };
    let tampered = body.replace("\"passed\"", "\"failed\"");
    assert_ne!(tampered, body);
    /// (case, headers, body, what the message says)
    type Case<'a> = (&'a str, Vec<(String, String)>, String, &'a str);
    let cases: Vec<Case> = vec![
        (
            "no credentials",
            headers(&[]),
            body.clone(),
            "no X-Buildkite-Signature",
        ),
        (
            "wrong token",
            headers(&[("X-Buildkite-Token", "guess")]),
            body.clone(),
            "does not match",
        ),
        (
            "signed with another key",
            headers(&[("X-Buildkite-Signature", &sig("forger", t, &body))]),
            body.clone(),
            "signature check failed",
        ),
        (
            "tampered body",
            headers(&[("X-Buildkite-Signature", &sig(NEW_TOKEN, t, &body))]),
            tampered,
            "signature check failed",
        ),
        (
            "replayed (6 minutes old)",
            headers(&[("X-Buildkite-Signature", &sig(NEW_TOKEN, t - 360, &body))]),
            body.clone(),
            "old",
        ),
        (
            "from the future",
            headers(&[("X-Buildkite-Signature", &sig(NEW_TOKEN, t + 360, &body))]),
            body.clone(),
            "future",
        ),
        (
            "malformed signature header",
            headers(&[("X-Buildkite-Signature", "sha256=abc")]),
            body.clone(),
            "format is incorrect",
        ),
        (
            "signature header wins over a valid token",
            headers(&[
                ("X-Buildkite-Signature", &sig("forger", t, &body)),
                ("X-Buildkite-Token", NEW_TOKEN),
            ]),
            body.clone(),
            "signature check failed",
        ),
    ];
    for (name, hs, body, says) in cases {
        let (status, answer) = call(&router, request(&hs, body.clone())).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{name}: {answer}");
        assert_eq!(answer["error"], "unauthorized", "{name}");
        let message = answer["message"].as_str().expect("message");
        assert!(message.contains(says), "{name}: {message}");
        for secret in [OLD_TOKEN, NEW_TOKEN, "guess", "forger"] {
            assert!(!message.contains(secret), "{name}: {message}");
        }
        assert!(
            !message.contains(&build.commit),
            "{name}: the body leaked: {message}"
        );
    }
    // A token header that is not ASCII.
    let req = axum::http::Request::builder()
        .method(Method::POST)
        .uri("/webhooks/buildkite")
        .header(
            "X-Buildkite-Token",
            axum::http::HeaderValue::from_bytes(b"t\xffk").unwrap(),
        )
        .body(Body::from(body.clone()))
        .unwrap();
    let (status, _) = call(&router, req).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(
        env.bb.posts().is_empty(),
        "nothing refused reached Bitbucket"
    );
}

#[tokio::test]
async fn token_rotation_accepts_both_tokens_in_both_modes() {
    let env = Env::start().await;
    let router = env.router();
    for token in [OLD_TOKEN, NEW_TOKEN] {
        for auth in [
            WebhookAuth::Token(token.into()),
            WebhookAuth::Signature {
                token: token.into(),
                timestamp: None,
            },
        ] {
            let build = env.new_build(BuildState::Running);
            let (status, answer) = send(
                &router,
                &env.delivery(&build, WebhookEvent::BuildRunning, &auth),
            )
            .await;
            assert_eq!(status, StatusCode::OK, "{auth:?}: {answer}");
            assert!(env.bb.status(&build.commit, KEY).is_some());
        }
    }
    // After the rotation only the new token is configured: the old one is refused.
    let env2 = Env::with(store_sqlite(), &[("BUILDKITE_WEBHOOK_TOKEN", NEW_TOKEN)]).await;
    let build = env2.new_build(BuildState::Running);
    let old = env2.delivery(
        &build,
        WebhookEvent::BuildRunning,
        &WebhookAuth::Token(OLD_TOKEN.into()),
    );
    assert_eq!(send(&env2.router(), &old).await.0, StatusCode::UNAUTHORIZED);
    let new = env2.delivery(
        &build,
        WebhookEvent::BuildRunning,
        &WebhookAuth::Token(NEW_TOKEN.into()),
    );
    assert_eq!(send(&env2.router(), &new).await.0, StatusCode::OK);
}

#[tokio::test]
async fn oversized_bodies_get_413_json() {
    // A small limit, to test the edge exactly.
    let env = Env::with(store_sqlite(), &[("KITEBRIDGE_WEBHOOK_MAX_BODY", "4096")]).await;
    let router = env.router();
    let build = env.new_build(BuildState::Passed);
    let mut v = env
        .delivery(&build, WebhookEvent::BuildFinished, &signed())
        .json();
    let base = v.to_string().len();
    // Pad the build's meta-data so the body is exactly the limit, then one byte more.
    v["build"]["meta_data"]["pad"] = json!("");
    let overhead = v.to_string().len() - base;
    let fill = 4096 - base - overhead;
    v["build"]["meta_data"]["pad"] = json!("x".repeat(fill));
    let at_limit = v.to_string();
    assert_eq!(at_limit.len(), 4096);
    let (status, answer) = call(
        &router,
        request(
            &signed_headers("build.finished", NEW_TOKEN, now(), &at_limit),
            at_limit.clone(),
        ),
    )
    .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "a body of exactly the limit is accepted: {answer}"
    );

    v["build"]["meta_data"]["pad"] = json!("x".repeat(fill + 1));
    let over = v.to_string();
    let hs = signed_headers("build.finished", NEW_TOKEN, now(), &over);
    let (status, answer) = call(&router, request(&hs, over.clone())).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
    assert_eq!(answer["error"], "payload_too_large");
    assert!(answer["message"].as_str().unwrap().contains("4096"));

    // Without Content-Length (streamed): refused while reading.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = over
        .as_bytes()
        .chunks(1000)
        .map(|c| Ok(c.to_vec()))
        .collect();
    let streamed = Body::from_stream(futures::stream::iter(chunks));
    let (status, answer) = call(&router, request(&hs, streamed)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");

    // A lying Content-Length larger than the limit is refused before reading anything.
    let mut hs_big = hs.clone();
    hs_big.push(("Content-Length".into(), "999999999".into()));
    let (status, _) = call(&router, request(&hs_big, Body::empty())).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

    // The default limit is 1 MiB.
    let env = Env::start().await;
    let big = "x".repeat((1 << 20) + 1);
    let (status, answer) = call(
        &env.router(),
        request(&headers(&[("X-Buildkite-Token", NEW_TOKEN)]), big),
    )
    .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
}

#[tokio::test]
async fn malformed_bodies_get_400_naming_the_field() {
    let env = Env::start().await;
    let router = env.router();
    let build = env.new_build(BuildState::Passed);
    let good = env
        .delivery(&build, WebhookEvent::BuildFinished, &signed())
        .json();
    let without = |path: &[&str]| {
        let mut v = good.clone();
        let (last, parents) = path.split_last().unwrap();
        let mut cur = &mut v;
        for p in parents {
            cur = &mut cur[*p];
        }
        cur.as_object_mut().unwrap().remove(*last);
        v.to_string()
    };
    let mut bad_number = good.clone();
    bad_number["build"]["number"] = json!("seven");
    let mut bad_time = good.clone();
    bad_time["build"]["finished_at"] = json!("soon");
    let cases: Vec<(&str, String, Option<&str>)> = vec![
        (
            "truncated JSON",
            "{\"event\": \"build.finished\"".into(),
            None,
        ),
        ("not JSON", "event=build.finished".into(), None),
        ("empty body", String::new(), None),
        ("array", "[1,2]".into(), None),
        ("no event", without(&["event"]), Some("event")),
        (
            "event not a string",
            json!({"event": 5}).to_string(),
            Some("event"),
        ),
        ("no build", without(&["build"]), Some("build")),
        (
            "no commit",
            without(&["build", "commit"]),
            Some("build.commit"),
        ),
        ("no build id", without(&["build", "id"]), Some("build.id")),
        (
            "no state",
            without(&["build", "state"]),
            Some("build.state"),
        ),
        ("no pipeline", without(&["pipeline"]), Some("pipeline")),
        (
            "no pipeline slug",
            without(&["pipeline", "slug"]),
            Some("pipeline.slug"),
        ),
        (
            "number not a number",
            bad_number.to_string(),
            Some("build.number"),
        ),
        (
            "bad timestamp",
            bad_time.to_string(),
            Some("build.finished_at"),
        ),
    ];
    for (name, body, field) in cases {
        let (status, answer) = call(
            &router,
            request(
                &signed_headers("build.finished", NEW_TOKEN, now(), &body),
                body,
            ),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{name}: {answer}");
        assert_eq!(answer["error"], "invalid_payload", "{name}");
        assert!(answer["message"].is_string(), "{name}");
        if let Some(field) = field {
            assert_eq!(answer["field"], field, "{name}: {answer}");
            assert!(
                answer["message"].as_str().unwrap().contains(field),
                "{name}"
            );
        }
    }
    assert!(env.bb.posts().is_empty());
}

#[tokio::test]
async fn other_methods_get_405_json() {
    let env = Env::start().await;
    let router = env.router();
    let hs = headers(&[("X-Buildkite-Token", NEW_TOKEN)]);
    for method in [
        Method::GET,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
        Method::OPTIONS,
    ] {
        let resp =
            tower::ServiceExt::oneshot(router.clone(), request_with(method.clone(), &hs, "{}"))
                .await
                .unwrap();
        assert_eq!(
            resp.headers().get(header::ALLOW).unwrap(),
            "POST",
            "{method}"
        );
        let (status, answer) = call(&router, request_with(method.clone(), &hs, "{}")).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{method}");
        assert_eq!(answer["error"], "method_not_allowed", "{method}");
    }
    let (status, _) = call(&router, request_with(Method::HEAD, &hs, "")).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
}

// ---- Bitbucket and store outages ------------------------------------------------------------

#[tokio::test]
async fn bitbucket_down_keeps_the_status_in_the_outbox_then_drain_delivers_it() {
    let env = Env::start().await;
    let router = env.router();
    // The Bitbucket API is resolved by a first delivery while Bitbucket is up.
    let first = env.new_build(BuildState::Running);
    assert_eq!(
        send(
            &router,
            &env.delivery(&first, WebhookEvent::BuildRunning, &signed())
        )
        .await
        .0,
        StatusCode::OK
    );

    // Down (502 from its load balancer): 202, kept in the outbox with a retry time.
    env.bb
        .inject_fault_for(Fault::Status(502), Duration::from_secs(3600));
    let build = env.new_build(BuildState::Passed);
    let (status, answer) = send(
        &router,
        &env.delivery(&build, WebhookEvent::BuildFinished, &signed()),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(answer["status"], "deferred");
    assert!(env.bb.status(&build.commit, KEY).is_none());
    let later = Utc::now() + chrono::Duration::minutes(20);
    let pending = env.state.store.due(later, 100).await.unwrap();
    let entry = pending
        .iter()
        .find(|p| p.status.commit == build.commit)
        .expect("the status is in the outbox");
    assert_eq!(entry.status.state, "SUCCESSFUL");
    // Not hammered: one post and one probe, then the destination backs off (for every
    // status, not this one alone).
    let posts = env
        .bb
        .requests()
        .into_iter()
        .filter(|r| r.path.contains(&build.commit))
        .count();
    assert!(
        posts <= 2,
        "{posts} posts of one status to a Bitbucket that is down"
    );
    let reporter = env.state.webhook_reporter.clone().expect("reporter");
    assert!(reporter.pacer().snapshot().down_for_s.is_some());
    assert!(entry.last_error.as_deref().unwrap_or("").contains("502"));
    env.bb.clear_faults();
    // Back: once the backoff allows a probe, the drain delivers it.
    if let Some(s) = reporter.pacer().snapshot().down_for_s {
        tokio::time::sleep(Duration::from_secs_f64(s + 0.05)).await;
    }
    let tally = reporter.drain(Utc::now(), 100).await.unwrap();
    assert_eq!(tally.posted, 1, "{tally:?}");
    assert_eq!(
        env.bb.status(&build.commit, KEY).expect("delivered").state,
        "SUCCESSFUL"
    );

    // Rate limited for longer than a webhook waits: 202; once the wait is over, the drain
    // delivers it.
    env.bb.inject_fault(
        Fault::RateLimited {
            retry_after_secs: 3,
        },
        1,
    );
    let build2 = env.new_build(BuildState::Failed);
    let (status, answer) = send(
        &router,
        &env.delivery(&build2, WebhookEvent::BuildFinished, &signed()),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert!(env.bb.status(&build2.commit, KEY).is_none());
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let tally = reporter.drain(Utc::now(), 100).await.unwrap();
    assert_eq!(tally.posted, 1, "{tally:?}");
    assert_eq!(
        env.bb.status(&build2.commit, KEY).expect("delivered").state,
        "FAILED"
    );
    assert!(
        env.state
            .store
            .due(Utc::now(), 100)
            .await
            .unwrap()
            .iter()
            .all(|p| p.status.commit != build2.commit)
    );

    // A repeat of the delivered one now posts nothing.
    let posts = env.bb.posts().len();
    let (status, answer) = send(
        &router,
        &env.delivery(&build2, WebhookEvent::BuildFinished, &signed()),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer["status"], "already_reported");
    assert_eq!(env.bb.posts().len(), posts);
}

#[tokio::test]
async fn bitbucket_api_unknown_answers_503_and_a_retry_succeeds() {
    // BITBUCKET_API=auto probes the server on first use; while it cannot be probed nothing can
    // be recorded, so the answer asks for a retry (and the poller reports the build anyway).
    let env = Env::start().await;
    let router = env.router();
    env.bb
        .inject_fault_for(Fault::Status(503), Duration::from_secs(3600));
    let build = env.new_build(BuildState::Passed);
    let d = env.delivery(&build, WebhookEvent::BuildFinished, &signed());
    let (status, answer) = send(&router, &d).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    assert_eq!(answer["error"], "bitbucket_unavailable");
    env.bb.clear_faults();
    let (status, answer) = send(&router, &d).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(
        env.bb.status(&build.commit, KEY).expect("posted").state,
        "SUCCESSFUL"
    );

    // With the API configured explicitly there is no probe: Bitbucket down is a 202.
    let env = Env::with(store_sqlite(), &[("BITBUCKET_API", "legacy")]).await;
    env.bb
        .inject_fault_for(Fault::Status(503), Duration::from_secs(3600));
    let build = env.new_build(BuildState::Passed);
    let (status, _) = send(
        &env.router(),
        &env.delivery(&build, WebhookEvent::BuildFinished, &signed()),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
}

#[tokio::test]
async fn store_outage_answers_503_and_the_retry_is_recorded() {
    let down = Arc::new(AtomicBool::new(false));
    let kv = FlakyKv {
        inner: SqliteKv::in_memory().unwrap(),
        down: down.clone(),
    };
    let env = Env::with(Store::new(kv), &[]).await;
    let router = env.router();
    let build = env.new_build(BuildState::Passed);
    let d = env.delivery(&build, WebhookEvent::BuildFinished, &signed());
    down.store(true, Ordering::SeqCst);
    let (status, answer) = send(&router, &d).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    assert_eq!(answer["error"], "unavailable");
    // In words, without the store's own text.
    let message = answer["message"].as_str().unwrap();
    assert!(message.contains("store is unavailable"), "{answer}");
    assert!(!message.contains("injected outage"), "{answer}");
    assert!(env.bb.posts().is_empty(), "nothing posted without a record");
    down.store(false, Ordering::SeqCst);
    let (status, answer) = send(&router, &d).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(
        env.bb.status(&build.commit, KEY).unwrap().state,
        "SUCCESSFUL"
    );
}

// ---- ordering -------------------------------------------------------------------------------

#[tokio::test]
async fn out_of_order_and_duplicate_deliveries_never_go_backwards() {
    let env = Env::start().await;
    out_of_order_and_duplicates(&env).await;
}

#[tokio::test]
async fn on_dynamodb_too() {
    let store = Store::new(kitebridge_tests::dynamodb().await);
    let env = Env::with(store, &[]).await;
    out_of_order_and_duplicates(&env).await;
    // And an outage of Bitbucket is recorded in DynamoDB's outbox.
    env.bb
        .inject_fault_for(Fault::Status(500), Duration::from_secs(3600));
    let build = env.new_build(BuildState::Failed);
    let (status, _) = send(
        &env.router(),
        &env.delivery(&build, WebhookEvent::BuildFinished, &signed()),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let later = Utc::now() + chrono::Duration::hours(2);
    assert!(
        env.state
            .store
            .due(later, 100)
            .await
            .unwrap()
            .iter()
            .any(|p| p.status.commit == build.commit)
    );
}

async fn out_of_order_and_duplicates(env: &Env) {
    let router = env.router();
    let build = env.new_build(BuildState::Running);
    let running = env.delivery(&build, WebhookEvent::BuildRunning, &signed());
    let finished = env.transition(&build, BuildState::Passed, WebhookEvent::BuildFinished);

    // Finished arrives first, then the late running.
    let (status, answer) = send(&router, &finished).await;
    assert_eq!(
        (status, answer["status"].as_str()),
        (StatusCode::OK, Some("posted"))
    );
    let (status, answer) = send(&router, &running).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert!(
        matches!(
            answer["status"].as_str(),
            Some("already_reported" | "superseded")
        ),
        "{answer}"
    );
    assert_eq!(
        env.bb.status(&build.commit, KEY).unwrap().state,
        "SUCCESSFUL"
    );
    assert_eq!(
        env.bb.history(&build.commit, KEY).len(),
        1,
        "the late running is never posted"
    );

    // The same delivery twice: one post.
    let other = env.new_build(BuildState::Failed);
    let d = env.delivery(&other, WebhookEvent::BuildFinished, &signed());
    assert_eq!(send(&router, &d).await.1["status"], "posted");
    assert_eq!(send(&router, &d).await.1["status"], "already_reported");
    assert_eq!(env.bb.history(&other.commit, KEY).len(), 1);

    // A rebuild (higher number) of the same commit replaces the old build's status.
    let rebuild = env.bk.add_build(
        kitebridge_fakes::Build::new(ORG, PIPELINE, other.commit.clone(), "main")
            .with_state(BuildState::Passed),
    );
    assert!(rebuild.number > other.number);
    assert_eq!(
        send(
            &router,
            &env.delivery(&rebuild, WebhookEvent::BuildFinished, &signed())
        )
        .await
        .0,
        StatusCode::OK
    );
    assert_eq!(
        env.bb.status(&other.commit, KEY).unwrap().state,
        "SUCCESSFUL"
    );
    // ... and the old build's late delivery does not bring FAILED back.
    assert_eq!(send(&router, &d).await.0, StatusCode::OK);
    assert_eq!(
        env.bb.status(&other.commit, KEY).unwrap().state,
        "SUCCESSFUL"
    );
}

/// A job retried in a finished build: the same build (same number) runs again and ends the
/// other way. Its status follows Buildkite's latest word in both directions, and a late
/// delivery of the first run's end never brings it back.
#[tokio::test]
async fn a_retried_build_follows_buildkite_both_ways() {
    let env = Env::start().await;
    let router = env.router();
    let build = env.new_build(BuildState::Running);
    let failed = env.transition(&build, BuildState::Failed, WebhookEvent::BuildFinished);
    assert_eq!(send(&router, &failed).await.1["status"], "posted");
    assert_eq!(env.bb.status(&build.commit, KEY).unwrap().state, "FAILED");

    // The flaky job is retried: the build runs again, with its first `started_at` (so the
    // payload cannot prove it is newer than the end): kitebridge asks Buildkite.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let asked = env.bk.request_count(&format!(
        "/v2/organizations/{ORG}/pipelines/{PIPELINE}/builds/{}",
        build.number
    ));
    let running = env.transition(&build, BuildState::Running, WebhookEvent::BuildRunning);
    let (code, answer) = send(&router, &running).await;
    assert_eq!(
        (code, answer["status"].as_str()),
        (StatusCode::OK, Some("posted")),
        "{answer}"
    );
    assert_eq!(
        env.bb.status(&build.commit, KEY).unwrap().state,
        "INPROGRESS"
    );
    let path = format!(
        "/v2/organizations/{ORG}/pipelines/{PIPELINE}/builds/{}",
        build.number
    );
    assert_eq!(
        env.bk.request_count(&path),
        asked + 1,
        "asked Buildkite once"
    );
    // The same delivery again costs nothing more.
    assert_eq!(
        send(&router, &running).await.1["status"],
        "already_reported"
    );
    assert_eq!(env.bk.request_count(&path), asked + 1);

    tokio::time::sleep(Duration::from_millis(5)).await;
    let passed = env.transition(&build, BuildState::Passed, WebhookEvent::BuildFinished);
    assert_eq!(send(&router, &passed).await.1["status"], "posted");
    assert_eq!(
        env.bb.status(&build.commit, KEY).unwrap().state,
        "SUCCESSFUL"
    );

    // A late delivery of the first run's end changes nothing.
    let (code, answer) = send(&router, &failed).await;
    assert_eq!(code, StatusCode::OK, "{answer}");
    assert_eq!(answer["status"], "already_reported");
    assert_eq!(
        env.bb.status(&build.commit, KEY).unwrap().state,
        "SUCCESSFUL"
    );

    // The other way round: re-run to red, reported as soon as it ends.
    // (its `build.running` is not delivered: only the end is)
    tokio::time::sleep(Duration::from_millis(5)).await;
    env.bk
        .set_build_state(ORG, PIPELINE, build.number, BuildState::Running)
        .expect("the build exists");
    let red = env.transition(&build, BuildState::Failed, WebhookEvent::BuildFinished);
    assert_eq!(send(&router, &red).await.1["status"], "posted");
    assert_eq!(env.bb.status(&build.commit, KEY).unwrap().state, "FAILED");
    let states: Vec<String> = env
        .bb
        .history(&build.commit, KEY)
        .into_iter()
        .map(|s| s.state)
        .collect();
    assert_eq!(states, ["FAILED", "INPROGRESS", "SUCCESSFUL", "FAILED"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_deliveries_of_one_build_end_in_the_final_state() {
    let env = Env::start().await;
    let router = env.router();
    for round in 0..40 {
        let build = env.new_build(BuildState::Running);
        let running = env.delivery(&build, WebhookEvent::BuildRunning, &signed());
        let finished = env.transition(&build, BuildState::Failed, WebhookEvent::BuildFinished);
        let (r1, r2) = (router.clone(), router.clone());
        // Alternate who starts first; both run at once on different threads.
        let (a, b) = if round % 2 == 0 {
            tokio::join!(
                tokio::spawn(async move { send(&r1, &running).await }),
                tokio::spawn(async move { send(&r2, &finished).await })
            )
        } else {
            let (b, a) = tokio::join!(
                tokio::spawn(async move { send(&r2, &finished).await }),
                tokio::spawn(async move { send(&r1, &running).await })
            );
            (a, b)
        };
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.0, StatusCode::OK, "round {round}: {}", a.1);
        assert_eq!(b.0, StatusCode::OK, "round {round}: {}", b.1);
        assert_eq!(
            env.bb.status(&build.commit, KEY).expect("posted").state,
            "FAILED",
            "round {round}: the final state must win (running: {}, finished: {})",
            a.1,
            b.1
        );
    }
}

// ---- observers ------------------------------------------------------------------------------

#[derive(Default)]
struct Recorder {
    seen: Mutex<Vec<(String, u64, Option<String>)>>,
    fail: AtomicBool,
}

#[async_trait]
impl BuildObserver for Recorder {
    async fn observe(
        &self,
        organization: &str,
        build: &Build,
        pipeline: Option<&Pipeline>,
    ) -> Result<(), ObserveError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(ObserveError::Transient(
                "releases: Buildkite unreachable".into(),
            ));
        }
        self.seen.lock().unwrap().push((
            organization.to_owned(),
            build.number,
            pipeline.map(|p| p.slug.clone()),
        ));
        Ok(())
    }
}

#[tokio::test]
async fn every_build_goes_to_the_observers_and_their_failure_is_503() {
    let mut env = Env::start().await;
    let recorder = Arc::new(Recorder::default());
    env.state.observers.push(recorder.clone());
    let router = env.router();

    let build = env.new_build(BuildState::Passed);
    let d = env.delivery(&build, WebhookEvent::BuildFinished, &signed());
    assert_eq!(send(&router, &d).await.0, StatusCode::OK);
    assert_eq!(
        recorder.seen.lock().unwrap().as_slice(),
        &[(ORG.to_owned(), build.number, Some(PIPELINE.to_owned()))]
    );
    // Ping and other events are not builds.
    let ping = env.bk.ping_webhook(ORG, "https://x.example/", &signed());
    assert_eq!(send(&router, &ping).await.0, StatusCode::OK);
    assert_eq!(recorder.seen.lock().unwrap().len(), 1);

    recorder.fail.store(true, Ordering::SeqCst);
    let build2 = env.new_build(BuildState::Passed);
    let d2 = env.delivery(&build2, WebhookEvent::BuildFinished, &signed());
    let (status, answer) = send(&router, &d2).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    assert_eq!(answer["error"], "unavailable");
    // The status went out regardless; the retried delivery completes the observers' part.
    assert_eq!(
        env.bb.status(&build2.commit, KEY).unwrap().state,
        "SUCCESSFUL"
    );
    recorder.fail.store(false, Ordering::SeqCst);
    let (status, answer) = send(&router, &d2).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer["status"], "already_reported");
    assert_eq!(recorder.seen.lock().unwrap().len(), 2);
}

// ---- over TCP -------------------------------------------------------------------------------

#[tokio::test]
async fn served_over_tcp() {
    let env = Env::start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = env.router();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let url = format!("http://{addr}/webhooks/buildkite");

    let build = env.new_build(BuildState::Passed);
    let d = env.delivery(
        &build,
        WebhookEvent::BuildFinished,
        &WebhookAuth::Token(OLD_TOKEN.into()),
    );
    let (status, body) = kitebridge_fakes::deliver_webhook(&url, &d).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        env.bb.status(&build.commit, KEY).unwrap().state,
        "SUCCESSFUL"
    );

    let big = WebhookDelivery::new(WebhookEvent::BuildFinished, "x".repeat(2 << 20), &signed());
    let (status, body) = kitebridge_fakes::deliver_webhook(&url, &big).await.unwrap();
    assert_eq!(status, 413, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["error"],
        "payload_too_large"
    );

    let forged = WebhookDelivery::new(
        WebhookEvent::BuildFinished,
        d.body.clone(),
        &WebhookAuth::None,
    );
    let (status, _) = kitebridge_fakes::deliver_webhook(&url, &forged)
        .await
        .unwrap();
    assert_eq!(status, 401);
}

// ---- no input panics or gets a 5xx ----------------------------------------------------------

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn runtime() -> &'static tokio::runtime::Runtime {
        static RT: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
        RT.get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap()
        })
    }

    fn env() -> &'static Env {
        static ENV: std::sync::OnceLock<Env> = std::sync::OnceLock::new();
        ENV.get_or_init(|| runtime().block_on(Env::start()))
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| json!(f)),
            ".{0,20}".prop_map(Value::String),
            Just(json!("4e1f0c9b7a2d3e5f6a8b9c0d1e2f3a4b5c6d7e8f")),
            Just(json!("ssh://git@127.0.0.1:7999/proj/web.git")),
            Just(json!("https://buildkite.com/acme-inc/web/builds/1")),
            Just(json!("2025-03-11T10:02:03.412Z")),
        ];
        leaf.prop_recursive(3, 24, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(".{0,8}", inner, 0..5)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// Build-shaped bodies: a real delivery with fields replaced by arbitrary JSON.
    fn build_body() -> impl Strategy<Value = String> {
        let fields = prop::sample::select(vec![
            "event",
            "build",
            "pipeline",
            "build.id",
            "build.number",
            "build.state",
            "build.commit",
            "build.blocked",
            "build.web_url",
            "build.url",
            "build.created_at",
            "build.finished_at",
            "build.meta_data",
            "build.author",
            "build.pull_request",
            "pipeline.slug",
            "pipeline.repository",
            "pipeline.url",
            "pipeline.name",
        ]);
        let event = prop::sample::select(vec![
            "build.finished",
            "build.running",
            "build.scheduled",
            "build.failing",
            "build.skipped",
            "build.",
            "ping",
            "job.finished",
            "agent.lost",
            "",
        ]);
        (event, prop::collection::vec((fields, json_value()), 0..4)).prop_map(|(event, edits)| {
            let mut v = json!({
                "event": event,
                "build": {"id": "b", "number": 7, "state": "passed", "commit": "4e1f0c9b7a2d3e5f6a8b9c0d1e2f3a4b5c6d7e8f",
                          "web_url": "https://buildkite.com/acme-inc/web/builds/7",
                          "url": "https://api.buildkite.com/v2/organizations/acme-inc/pipelines/web/builds/7"},
                "pipeline": {"slug": "web", "repository": "ssh://git@127.0.0.1:7999/proj/web.git"},
            });
            for (path, value) in edits {
                let mut cur = &mut v;
                let parts: Vec<&str> = path.split('.').collect();
                for p in &parts[..parts.len() - 1] {
                    if !cur.is_object() {
                        break;
                    }
                    cur = &mut cur[*p];
                }
                if let Some(obj) = cur.as_object_mut() {
                    obj.insert(parts[parts.len() - 1].to_owned(), value);
                }
            }
            v.to_string()
        })
    }

    fn header_pair() -> impl Strategy<Value = (String, String)> {
        let name = prop_oneof![
            Just("X-Buildkite-Signature".to_owned()),
            Just("X-Buildkite-Token".to_owned()),
            Just("X-Buildkite-Event".to_owned()),
            Just("Content-Type".to_owned()),
            Just("Content-Length".to_owned()),
            Just("Transfer-Encoding".to_owned()),
            "[a-zA-Z-]{1,12}",
        ];
        let value = prop_oneof![
            "[ -~]{0,80}",
            "timestamp=[0-9]{0,12},signature=[0-9a-f]{0,64}",
            Just(OLD_TOKEN.to_owned()),
        ];
        (name, value)
    }

    #[derive(Debug, Clone)]
    enum Auth {
        Headers,
        Signed,
        Token,
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, .. ProptestConfig::default() })]

        #[test]
        fn no_input_panics_or_gets_a_5xx(
            body in prop_oneof![
                prop::collection::vec(any::<u8>(), 0..300).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
                json_value().prop_map(|v| v.to_string()),
                build_body(),
            ],
            extra in prop::collection::vec(header_pair(), 0..4),
            auth in prop_oneof![Just(Auth::Headers), Just(Auth::Signed), Just(Auth::Token)],
        ) {
            let env = env();
            let mut hs: Vec<(String, String)> = extra
                .into_iter()
                // Lengths are checked elsewhere; a wrong one only makes hyper's client refuse.
                .filter(|(k, _)| !k.eq_ignore_ascii_case("content-length") && !k.eq_ignore_ascii_case("transfer-encoding"))
                .filter(|(k, v)| axum::http::HeaderName::from_bytes(k.as_bytes()).is_ok()
                    && axum::http::HeaderValue::from_str(v).is_ok())
                .collect();
            match auth {
                Auth::Headers => {}
                Auth::Signed => hs.extend(signed_headers("build.finished", NEW_TOKEN, now(), &body)),
                Auth::Token => hs.push(("X-Buildkite-Token".into(), NEW_TOKEN.into())),
            }
            let (status, answer) = runtime().block_on(call(&env.router(), request(&hs, body)));
            prop_assert!(!status.is_server_error(), "{status}: {answer}");
            if !status.is_success() {
                prop_assert!(answer["error"].is_string() && answer["message"].is_string(), "{status}: {answer}");
            }
        }
    }
}
