//! Trigger rules end to end: finished builds of a simulated Buildkite (`FakeBuildkite`) go
//! through the rule observer (`RuleFirer`) with a real store (SQLite, and the DynamoDB emulator),
//! and the target builds are counted in the fake. Exactly one target build per (rule, source
//! build), whatever the deliveries, races and failures.

use std::sync::Arc;
use std::time::Duration;

use kitebridge::buildkite::client::BuildkiteClient;
use kitebridge::buildkite::model::WebhookPayload;
use kitebridge::config::Secret;
use kitebridge::observe::BuildObserver;
use kitebridge::rules::fire::{FireOutcome, RuleFirer};
use kitebridge::rules::{self, Rule, RuleErrorKind};
use kitebridge::store::{
    Firing, FiringStore, PendingFiringStore, RuleStore, SqliteKv, Store, StoredRule,
};
use kitebridge_fakes::{
    Build, BuildState, DEFAULT_BUILDKITE_TOKEN, FakeBuildkite, FakeBuildkiteOptions, Fault,
    Pipeline, WebhookAuth, WebhookEvent,
};
use serde_json::json;

const ORG: &str = "acme-inc";
const SHA: &str = "4e1f0c9b7a2d3e5f6a8b9c0d1e2f3a4b5c6d7e8f";

struct World {
    bk: FakeBuildkite,
    store: Store,
    firer: Arc<RuleFirer>,
}

fn deploy_rule() -> Rule {
    Rule::from_json(
        "deploy-web",
        json!({"rule": "pipeline.trigger_build.pipeline", "value": {
            "source_pipeline": "acme-inc/web",
            "target_pipeline": "web-deploy",
            "conditions": [
                "source.build.branch == 'main' && source.build.state == 'passed'",
                "target.trigger.commit == source.build.commit",
            ],
            "build": {
                "message": "Deploy ${BUILDKITE_COMMIT:0:7} (web #${BUILDKITE_BUILD_NUMBER})",
                "env": {"SOURCE_PIPELINE": "$BUILDKITE_PIPELINE_SLUG", "REGION": "${REGION:-eu}"},
                "meta_data": {"requested-by": "kitebridge"}
            }
        }}),
    )
    .unwrap()
}

async fn world(store: Store, rules: Vec<Rule>) -> World {
    let bk = FakeBuildkite::start(FakeBuildkiteOptions::default()).await;
    for slug in ["web", "web-deploy", "api"] {
        bk.add_pipeline(Pipeline::new(
            ORG,
            slug,
            slug,
            format!("ssh://git@bitbucket.example:7999/acme/{slug}.git"),
        ));
    }
    let firer = Arc::new(firer(&bk, &store, rules));
    World { bk, store, firer }
}

fn firer(bk: &FakeBuildkite, store: &Store, rules: Vec<Rule>) -> RuleFirer {
    let http = kitebridge::net::client(Duration::from_secs(5)).unwrap();
    let client = BuildkiteClient::new(
        http,
        url::Url::parse(&bk.url()).unwrap(),
        Secret::new(DEFAULT_BUILDKITE_TOKEN),
    );
    RuleFirer::new(
        Arc::new(store.clone()),
        Some(client),
        Arc::new(rules),
        Some(ORG.to_owned()),
    )
}

fn sqlite() -> Store {
    Store::new(SqliteKv::in_memory().unwrap())
}

impl World {
    /// A finished source build, as its `build.finished` webhook carries it.
    fn finished(&self, pipeline: &str, branch: &str, state: BuildState) -> WebhookPayload {
        let b = self.bk.add_build(
            Build::new(ORG, pipeline, SHA, branch)
                .with_state(state)
                .with_message("Fix the login redirect"),
        );
        let delivery = self
            .bk
            .webhook(
                ORG,
                pipeline,
                b.number,
                WebhookEvent::BuildFinished,
                &WebhookAuth::Token("t".into()),
            )
            .unwrap();
        WebhookPayload::parse(delivery.body.as_bytes()).unwrap()
    }

    async fn observe(&self, p: &WebhookPayload) {
        self.firer
            .observe(ORG, &p.build, Some(&p.pipeline))
            .await
            .unwrap();
    }

    fn targets(&self) -> Vec<Build> {
        self.bk
            .builds()
            .into_iter()
            .filter(|b| b.pipeline == "web-deploy")
            .collect()
    }
}

async fn a_matching_build_triggers_once(w: World) {
    let p = w.finished("web", "main", BuildState::Passed);
    for _ in 0..5 {
        w.observe(&p).await;
    }
    let created = w.bk.created_builds();
    assert_eq!(created.len(), 1, "exactly one target build");
    let t = &created[0];
    assert_eq!(t.pipeline, "web-deploy");
    assert_eq!(t.commit, SHA);
    assert_eq!(t.branch, "main");
    assert_eq!(
        t.message,
        format!("Deploy 4e1f0c9 (web #{})", p.build.number)
    );
    assert_eq!(t.env["SOURCE_PIPELINE"], "web");
    assert_eq!(t.env["REGION"], "eu");
    assert_eq!(t.meta_data["requested-by"], "kitebridge");
    assert_eq!(t.meta_data[rules::META_RULE], "deploy-web");
    assert_eq!(
        t.meta_data[rules::META_SOURCE_BUILD_ID],
        p.build.id.as_str()
    );
    assert_eq!(
        t.meta_data[rules::META_SOURCE_BUILD],
        format!("acme-inc/web#{}", p.build.number).as_str()
    );
    match w.store.firing("deploy-web", &p.build.id).await.unwrap() {
        Some(Firing::Fired { target, .. }) => {
            assert_eq!(target["pipeline"], "web-deploy");
            assert_eq!(target["number"], json!(t.number));
        }
        other => panic!("not recorded: {other:?}"),
    }
    assert_eq!(
        w.store.pending("deploy-web", &p.build.id).await.unwrap(),
        None
    );
    // Handled builds are answered from the store: no more Buildkite requests.
    let before = w.bk.requests().len();
    w.observe(&p).await;
    assert_eq!(w.bk.requests().len(), before);
}

async fn eight_concurrent_observations_trigger_once(w: World) {
    let p = Arc::new(w.finished("web", "main", BuildState::Passed));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let firer = w.firer.clone();
            let p = p.clone();
            tokio::spawn(async move { firer.observe(ORG, &p.build, Some(&p.pipeline)).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    // Anyone who found it in flight left it to the holder; a sweep settles nothing new.
    w.firer
        .retry_pending_due(chrono::Utc::now() + chrono::Duration::hours(2))
        .await
        .unwrap();
    assert_eq!(w.bk.created_builds().len(), 1);
    assert_eq!(w.targets().len(), 1);
}

async fn non_matching_builds_trigger_nothing(w: World) {
    let cases = [
        w.finished("web", "feature/x", BuildState::Passed), // condition false
        w.finished("web", "main", BuildState::Failed),      // condition false
        w.finished("api", "main", BuildState::Passed),      // not the source pipeline
    ];
    for p in &cases {
        w.observe(p).await;
    }
    // Not finished: running, or blocked (it finishes again when unblocked).
    let running = w.finished("web", "main", BuildState::Running);
    w.observe(&running).await;
    let mut blocked = w.finished("web", "main", BuildState::Passed);
    blocked.build.blocked = true;
    w.observe(&blocked).await;
    assert_eq!(w.bk.created_builds().len(), 0);
    for p in cases.iter().chain([&running, &blocked]) {
        assert_eq!(
            w.store.firing("deploy-web", &p.build.id).await.unwrap(),
            None
        );
        assert_eq!(
            w.store.pending("deploy-web", &p.build.id).await.unwrap(),
            None
        );
    }
}

async fn a_buildkite_failure_then_recovery_fires_once(w: World) {
    let p = w.finished("web", "main", BuildState::Passed);
    w.bk.inject_fault(Fault::Status(502), 1);
    // The failure does not fail the observation: the firing waits in the store.
    let outcome = w
        .firer
        .handle(ORG, &p.build, Some(&p.pipeline))
        .await
        .unwrap();
    assert!(
        matches!(outcome.as_slice(), [(_, FireOutcome::Deferred(_))]),
        "{outcome:?}"
    );
    assert_eq!(w.bk.created_builds().len(), 0);
    let pending = w
        .store
        .pending("deploy-web", &p.build.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(pending.attempts, 1);
    assert!(pending.attempted_at.is_some());
    assert!(pending.last_error.as_deref().unwrap_or("").contains("502"));
    // Not due yet: nothing happens.
    let s = w.firer.retry_pending().await.unwrap();
    assert_eq!(s.fired, 0);
    // Buildkite is back; the retry (from the poll cycle) fires it once.
    let s = w
        .firer
        .retry_pending_due(chrono::Utc::now() + chrono::Duration::minutes(5))
        .await
        .unwrap();
    assert_eq!(s.fired, 1);
    w.observe(&p).await;
    w.firer
        .retry_pending_due(chrono::Utc::now() + chrono::Duration::hours(2))
        .await
        .unwrap();
    assert_eq!(w.bk.created_builds().len(), 1);
    assert_eq!(
        w.store.pending("deploy-web", &p.build.id).await.unwrap(),
        None
    );
}

/// The request went through but its answer was lost: the retry finds the build instead of
/// creating a second one.
async fn a_lost_answer_is_found_not_repeated(w: World) {
    let p = w.finished("web", "main", BuildState::Passed);
    w.bk.inject_fault(Fault::Status(502), 1);
    w.observe(&p).await;
    assert_eq!(w.bk.created_builds().len(), 0);
    // As if Buildkite had created it despite the error.
    let ghost = w.bk.add_build(
        Build::new(ORG, "web-deploy", SHA, "main")
            .with_state(BuildState::Scheduled)
            .with_meta_data(rules::META_RULE, "deploy-web")
            .with_meta_data(rules::META_SOURCE_BUILD_ID, p.build.id.clone()),
    );
    w.observe(&p).await;
    assert_eq!(w.bk.created_builds().len(), 0, "no second build");
    assert_eq!(w.targets().len(), 1);
    match w.store.firing("deploy-web", &p.build.id).await.unwrap() {
        Some(Firing::Fired { target, .. }) => assert_eq!(target["number"], json!(ghost.number)),
        other => panic!("{other:?}"),
    }
}

/// The create answers 201 but the answer is lost: the same attempt finds the build.
async fn a_lost_answer_is_found_at_once(w: World) {
    let p = w.finished("web", "main", BuildState::Passed);
    w.bk.inject_fault(Fault::LoseAnswer, 1);
    let outcome = w
        .firer
        .handle(ORG, &p.build, Some(&p.pipeline))
        .await
        .unwrap();
    let created = w.bk.created_builds();
    assert_eq!(created.len(), 1, "{created:?}");
    assert!(
        matches!(outcome.as_slice(), [(_, FireOutcome::Fired(t))] if t["number"] == json!(created[0].number)),
        "{outcome:?}"
    );
    w.observe(&p).await;
    assert_eq!(w.bk.created_builds().len(), 1);
}

/// A create that waits out a rate limit (5.5 s) for longer than its claim's lease (4 s) would,
/// if it ran on, let a second caller take the lapsed claim and fire again. The attempt is cut
/// off at its budget (2.4 s) instead, keeps its claim until it lapses, and never sends again.
async fn a_slow_attempt_cannot_fire_twice(w: World) {
    let lease = Duration::from_secs(4);
    let firer = firer(&w.bk, &w.store, vec![deploy_rule()]).with_claim_lease(lease);
    let p = w.finished("web", "main", BuildState::Passed);
    w.bk.inject_fault(
        Fault::RateLimited {
            retry_after_secs: 5,
        },
        1,
    );
    let started = tokio::time::Instant::now();
    let outcome = firer
        .handle(ORG, &p.build, Some(&p.pipeline))
        .await
        .unwrap();
    assert!(
        matches!(outcome.as_slice(), [(_, FireOutcome::Deferred(m))] if m.contains("cut off")),
        "{outcome:?}"
    );
    assert!(started.elapsed() < lease, "{:?}", started.elapsed());
    let later = || chrono::Utc::now() + chrono::Duration::hours(2);
    // The claim outlives the cut-off attempt: no one else tries yet.
    let s = firer.retry_pending_due(later()).await.unwrap();
    assert_eq!((s.in_flight, s.fired), (1, 0), "{s:?}");
    // Once it lapses, the next attempt looks first (nothing was created), then creates.
    tokio::time::sleep_until(started + lease + Duration::from_millis(300)).await;
    let s = firer.retry_pending_due(later()).await.unwrap();
    assert_eq!(s.fired, 1, "{s:?}");
    // Past the moment the cut-off attempt would have sent its create again.
    tokio::time::sleep_until(started + Duration::from_secs(7)).await;
    let created = w.bk.created_builds();
    assert_eq!(created.len(), 1, "{created:?}");
    match w.store.firing("deploy-web", &p.build.id).await.unwrap() {
        Some(Firing::Fired { target, .. }) => {
            assert_eq!(target["number"], json!(created[0].number))
        }
        other => panic!("{other:?}"),
    }
}

async fn stored_rules_fire_too(w: World) {
    let doc = json!({"rule": "pipeline.trigger_build.pipeline", "value": {
        "source_pipeline": "api", "target_pipeline": "web-deploy",
        "conditions": ["source.build.env('DEPLOY') == null"]}});
    w.store
        .put_rule(&StoredRule {
            name: "api-to-deploy".into(),
            document: doc,
            updated_at: chrono::Utc::now(),
        })
        .await
        .unwrap();
    // A stored rule that no longer validates is refused, and the others go on.
    w.store
        .put_rule(&StoredRule {
            name: "broken".into(),
            document: json!({"rule": "pipeline.trigger_build.pipeline", "value": {
                "source_pipeline": "api", "target_pipeline": "web-deploy",
                "conditions": ["nope == 1"]}}),
            updated_at: chrono::Utc::now(),
        })
        .await
        .unwrap();
    let p = w.finished("api", "main", BuildState::Passed);
    w.observe(&p).await;
    w.observe(&p).await;
    let created = w.bk.created_builds();
    assert_eq!(created.len(), 1);
    assert_eq!(created[0].meta_data[rules::META_RULE], "api-to-deploy");
    let names: Vec<String> = w
        .firer
        .rules()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(names, vec!["deploy-web", "api-to-deploy"]);
}

macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::world(super::sqlite(), vec![super::deploy_rule()]).await).await;
                }
            )*
        }
        mod dynamodb {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let store = kitebridge::store::Store::new(kitebridge_tests::dynamodb().await);
                    super::$name(super::world(store, vec![super::deploy_rule()]).await).await;
                }
            )*
        }
    };
}

both_backends!(
    a_matching_build_triggers_once,
    eight_concurrent_observations_trigger_once,
    non_matching_builds_trigger_nothing,
    a_buildkite_failure_then_recovery_fires_once,
    a_lost_answer_is_found_not_repeated,
    a_lost_answer_is_found_at_once,
    a_slow_attempt_cannot_fire_twice,
    stored_rules_fire_too,
);

#[test]
fn invalid_rules_are_refused_at_load_with_their_name() {
    let rules = json!({
        "good": {"rule": "pipeline.trigger_build.pipeline", "value": {"source_pipeline": "web", "target_pipeline": "d"}},
        "typo-variable": {"rule": "pipeline.trigger_build.pipeline", "value": {"source_pipeline": "web", "target_pipeline": "d",
            "conditions": ["source.build.brnch == 'main'"]}},
        "lookbehind": {"rule": "pipeline.trigger_build.pipeline", "value": {"source_pipeline": "web", "target_pipeline": "d",
            "conditions": ["source.build.branch =~ /(?<=v)1/"]}},
        "bad-template": {"rule": "pipeline.trigger_build.pipeline", "value": {"source_pipeline": "web", "target_pipeline": "d",
            "build": {"commit": "${SHA:?}"}}},
    });
    let errors = rules::parse_rules(&rules.to_string()).unwrap_err();
    let got: Vec<(String, RuleErrorKind)> =
        errors.iter().map(|e| (e.rule.clone(), e.kind)).collect();
    assert_eq!(
        got,
        vec![
            ("bad-template".into(), RuleErrorKind::Interpolation),
            ("lookbehind".into(), RuleErrorKind::Parse),
            ("typo-variable".into(), RuleErrorKind::Validation),
        ]
    );
    assert!(errors[2].to_string().contains("typo-variable"));
    assert!(errors[2].message.contains("source.build.brnch"));

    // Configuration with a broken rule does not start.
    let file = std::env::temp_dir().join(format!("kitebridge-rules-{}.json", std::process::id()));
    std::fs::write(&file, rules.to_string()).unwrap();
    let config = kitebridge::config::Config::from_lookup(|name| match name {
        "KITEBRIDGE_RULES_FILE" => Some(file.display().to_string()),
        _ => None,
    })
    .unwrap();
    let e = rules::config_rules(&config).unwrap_err().to_string();
    assert!(
        e.contains("KITEBRIDGE_RULES_FILE") && e.contains("lookbehind"),
        "{e}"
    );
    assert!(kitebridge::bootstrap::app_state(config, sqlite()).is_err());

    // Valid configured rules with no Buildkite token to fire them do not start either.
    let good = json!({"good": rules["good"].clone()});
    std::fs::write(&file, good.to_string()).unwrap();
    let config = kitebridge::config::Config::from_lookup(|name| match name {
        "KITEBRIDGE_RULES_FILE" => Some(file.display().to_string()),
        _ => None,
    })
    .unwrap();
    assert_eq!(rules::config_rules(&config).unwrap().len(), 1);
    let e = kitebridge::bootstrap::app_state(config, sqlite())
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("BUILDKITE_API_TOKEN"), "{e}");
    let _ = std::fs::remove_file(file);
}

/// `PUT/GET/DELETE /rules/{name}` and `GET /rules` through the one router, behind the bearer
/// token; a rule that does not validate is refused with its name and the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_api() {
    let configured = json!([{"name": "from-config", "rule": "pipeline.trigger_build.pipeline",
        "value": {"source_pipeline": "web", "target_pipeline": "d"}}]);
    let config = kitebridge::config::Config::from_lookup(|name| match name {
        "KITEBRIDGE_API_TOKEN" => Some("s3cret-token".into()),
        "KITEBRIDGE_RULES" => Some(configured.to_string()),
        "BUILDKITE_API_TOKEN" => Some("bk".into()),
        _ => None,
    })
    .unwrap();
    let state = kitebridge::bootstrap::app_state(config, sqlite()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        axum::serve(listener, kitebridge::http::router(state))
            .await
            .unwrap()
    });
    let http = reqwest::Client::new();
    let doc = json!({"rule": "pipeline.trigger_build.pipeline",
        "value": {"source_pipeline": "acme-inc/web", "target_pipeline": "web-deploy",
                  "conditions": ["source.build.branch == 'main'"]}});
    let url = |p: &str| format!("{base}{p}");

    // No token, wrong token.
    let r = http.get(url("/rules")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "unauthorized");
    let r = http
        .get(url("/rules"))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    let put = |name: &str, body: serde_json::Value| {
        http.put(url(&format!("/rules/{name}")))
            .bearer_auth("s3cret-token")
            .json(&body)
            .send()
    };
    let r = put("deploy", doc.clone()).await.unwrap();
    assert_eq!(r.status(), 201);
    let r = put("deploy", doc.clone()).await.unwrap();
    assert_eq!(r.status(), 200);
    let mut bad = doc.clone();
    bad["value"]["conditions"] = json!(["source.build.branch =~ /(?<=x)y/"]);
    let r = put("broken", bad).await.unwrap();
    assert_eq!(r.status(), 422);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "invalid_rule");
    assert_eq!(body["rule"], "broken");
    assert_eq!(body["kind"], "parse");
    let r = put("from-config", doc.clone()).await.unwrap();
    assert_eq!(r.status(), 409);
    let r = put("bad name!", doc.clone()).await.unwrap();
    assert_eq!(r.status(), 400);
    let r = http
        .put(url("/rules/x"))
        .bearer_auth("s3cret-token")
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);

    let r = http
        .get(url("/rules"))
        .bearer_auth("s3cret-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    let names: Vec<(&str, &str)> = body["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["name"].as_str().unwrap(), r["origin"].as_str().unwrap()))
        .collect();
    assert_eq!(names, vec![("from-config", "config"), ("deploy", "store")]);
    let r = http
        .get(url("/rules/deploy"))
        .bearer_auth("s3cret-token")
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["value"], doc["value"]);

    let del = |name: &str| {
        http.delete(url(&format!("/rules/{name}")))
            .bearer_auth("s3cret-token")
            .send()
    };
    assert_eq!(del("deploy").await.unwrap().status(), 204);
    assert_eq!(del("deploy").await.unwrap().status(), 404);
    assert_eq!(del("from-config").await.unwrap().status(), 409);
    let r = http
        .get(url("/rules/deploy"))
        .bearer_auth("s3cret-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

/// With `KITEBRIDGE_API_AUTH=iam` (the releases Lambda behind API Gateway's IAM authorization)
/// the rules API, like the releases API, leaves authentication to API Gateway: a signed request
/// arrives with no bearer token and is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_api_behind_iam_authorization() {
    let config = kitebridge::config::Config::from_lookup(|name| match name {
        "KITEBRIDGE_API_AUTH" => Some("iam".into()),
        "BUILDKITE_API_TOKEN" => Some("bk".into()),
        _ => None,
    })
    .unwrap();
    config
        .require(kitebridge::config::Role::Releases)
        .expect("no API token needed with iam");
    let state = kitebridge::bootstrap::app_state(config, sqlite()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        axum::serve(listener, kitebridge::http::router(state))
            .await
            .unwrap()
    });
    let http = reqwest::Client::new();
    let doc = json!({"rule": "pipeline.trigger_build.pipeline",
        "value": {"source_pipeline": "acme-inc/web", "target_pipeline": "web-deploy"}});
    let r = http
        .put(format!("{base}/rules/deploy"))
        .json(&doc)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = http.get(format!("{base}/rules")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(body.to_string().contains("\"deploy\""), "{body}");
}
