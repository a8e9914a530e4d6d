//! The releases API end to end: the real router (through `tower::ServiceExt::oneshot`, the same
//! service `kitebridge serve` and the Lambda run) with the real Buildkite client against the
//! fake Buildkite, and build progress flowing back as the webhook receiver hands it on: the
//! fake's webhook body, parsed, given to the registered build observers.

use std::collections::BTreeSet;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use kitebridge::buildkite::Event;
use kitebridge::config::Config;
use kitebridge::http::AppState;
use kitebridge::observe::observe_all;
use kitebridge::store::{SqliteKv, Store};
use kitebridge_fakes::{
    BuildState, DEFAULT_BUILDKITE_TOKEN, DEFAULT_ORGANIZATION as ORG, FakeBuildkite,
    FakeBuildkiteOptions, Fault, Pipeline, WebhookAuth, WebhookEvent,
};
use serde_json::{Value, json};
use tower::ServiceExt;

const API_TOKEN: &str = "releases-api-token-0123";
const SHA: &str = "4e1f0c9b7a2d3e5f6a8b9c0d1e2f3a4b5c6d7e8f";
const SHA2: &str = "9f8e7d6c5b4a39281706f5e4d3c2b1a098765432";

struct Harness {
    bk: FakeBuildkite,
    state: AppState,
    app: Router,
}

struct Answer {
    status: StatusCode,
    body: Value,
    replayed: bool,
}

impl Harness {
    async fn start(store: Store) -> Harness {
        Self::start_with(store, |_| {}).await
    }

    async fn start_with(store: Store, tweak: impl FnOnce(&mut Config)) -> Harness {
        let bk = FakeBuildkite::start(FakeBuildkiteOptions::default()).await;
        for slug in ["web-release", "web-deploy"] {
            bk.add_pipeline(Pipeline::new(
                ORG,
                slug,
                slug,
                "ssh://git@bitbucket.example:7999/proj/web.git",
            ));
        }
        let vars = [
            ("BUILDKITE_API_URL", bk.url()),
            ("BUILDKITE_API_TOKEN", DEFAULT_BUILDKITE_TOKEN.to_string()),
            ("KITEBRIDGE_API_TOKEN", API_TOKEN.to_string()),
            ("KITEBRIDGE_HTTP_TIMEOUT", "3".to_string()),
        ];
        let mut config =
            Config::from_lookup(|n| vars.iter().find(|(k, _)| *k == n).map(|(_, v)| v.clone()))
                .expect("config");
        tweak(&mut config);
        let state = kitebridge::bootstrap::app_state(config, store).expect("app state");
        let app = kitebridge::http::router(state.clone());
        Harness { bk, state, app }
    }

    async fn call_with(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut req = Request::builder().method(method).uri(path);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let body = match body {
            Some(v) => {
                req = req.header("content-type", "application/json");
                Body::from(v.to_string())
            }
            None => Body::empty(),
        };
        let resp = self
            .app
            .clone()
            .oneshot(req.body(body).expect("request"))
            .await
            .expect("router is infallible");
        let status = resp.status();
        let replayed = resp.headers().contains_key("idempotent-replayed");
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .expect("body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&bytes)))
        };
        Answer {
            status,
            body,
            replayed,
        }
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Answer {
        let auth = format!("Bearer {API_TOKEN}");
        self.call_with(method, path, body, &[("authorization", &auth)])
            .await
    }

    /// Moves a build in the fake and delivers the matching webhook to the observers, as the
    /// webhook receiver does with a verified delivery.
    async fn progress(&self, pipeline: &str, number: u64, state: BuildState) {
        self.bk
            .set_build_state(ORG, pipeline, number, state)
            .expect("build exists");
        self.redeliver(pipeline, number, event_for(state)).await;
    }

    /// Delivers the build as it is now (again), as a late or repeated webhook would.
    async fn redeliver(&self, pipeline: &str, number: u64, event: WebhookEvent) {
        let delivery = self
            .bk
            .webhook(
                ORG,
                pipeline,
                number,
                event,
                &WebhookAuth::Token("t".into()),
            )
            .expect("build exists");
        let Ok(Event::Build(payload)) = Event::parse(delivery.body.as_bytes()) else {
            panic!("the fake's webhook is not a build event");
        };
        let org = payload.organization_slug().expect("organization in URLs");
        observe_all(
            &self.state.observers,
            &org,
            &payload.build,
            Some(&payload.pipeline),
        )
        .await
        .expect("observers succeed");
    }

    /// Sets up the usual project: a build pipeline, `staging` and `production` (which requires
    /// staging) with a deploy pipeline, and `manual` with none.
    async fn project(&self) {
        let a = self
            .call(
                "PUT",
                "/projects/web",
                Some(json!({
                    "build_pipeline": {"organization": ORG, "pipeline": "web-release"},
                    "version_scheme": "semver",
                    "env": {"REGION": "eu-west-1"},
                    "environments": [
                        {"name": "staging", "deploy_pipeline": {"organization": ORG, "pipeline": "web-deploy"},
                         "env": {"TARGET": "staging"}},
                        {"name": "production", "deploy_pipeline": {"organization": ORG, "pipeline": "web-deploy"},
                         "requires": "staging", "env": {"TARGET": "production"}},
                        {"name": "manual"}
                    ]
                })),
            )
            .await;
        assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    }

    /// Cuts `version` and drives its build to `passed`; returns the candidate version.
    async fn built(&self, version: &str, commit: &str) -> String {
        let a = self
            .call(
                "POST",
                "/projects/web/releases",
                Some(json!({"commit": commit, "branch": "main", "version": version})),
            )
            .await;
        assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
        let number = a.body["candidate"]["build"]["number"].as_u64().unwrap();
        self.progress("web-release", number, BuildState::Passed)
            .await;
        a.body["candidate"]["version"].as_str().unwrap().to_string()
    }

    async fn deploy(&self, env: &str, candidate: &str) -> Answer {
        self.call(
            "POST",
            &format!("/projects/web/environments/{env}/deployments"),
            Some(json!({"release_candidate_version": candidate})),
        )
        .await
    }

    /// Deploys and drives the deploy build to `end`; returns the deployment.
    async fn deployed(&self, env: &str, candidate: &str, end: BuildState) -> Value {
        let a = self.deploy(env, candidate).await;
        assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
        let number = a.body["build"]["number"].as_u64().unwrap();
        self.progress("web-deploy", number, BuildState::Running)
            .await;
        self.progress("web-deploy", number, end).await;
        let id = a.body["id"].as_str().unwrap();
        self.call(
            "GET",
            &format!("/projects/web/environments/{env}/deployments/{id}"),
            None,
        )
        .await
        .body
    }

    fn created_builds(&self) -> usize {
        self.bk.created_builds().len()
    }

    /// Retries a job of the finished build, as Buildkite does: the same build (id and number)
    /// runs again, with a `started_at` after its `finished_at` and no `finished_at`; delivers
    /// its second `build.running`. Returns the build as it was before (for late deliveries).
    async fn retry_job(&self, pipeline: &str, number: u64) -> kitebridge_fakes::Build {
        let before = self.bk.build(ORG, pipeline, number).expect("build exists");
        let ended = before.finished_at.expect("a finished build");
        self.bk.update_build(ORG, pipeline, number, |b| {
            b.state = BuildState::Running;
            b.started_at = Some(ended + chrono::Duration::seconds(1));
            b.finished_at = None;
        });
        self.redeliver(pipeline, number, WebhookEvent::BuildRunning)
            .await;
        before
    }

    /// Ends the re-run started by [`Harness::retry_job`] in `end`, with a `finished_at` after
    /// its `started_at`; delivers its second `build.finished`.
    async fn finish_again(&self, pipeline: &str, number: u64, end: BuildState) {
        self.bk.update_build(ORG, pipeline, number, |b| {
            let started = b.started_at.expect("running again");
            b.state = end;
            b.finished_at = Some(started + chrono::Duration::seconds(1));
        });
        self.redeliver(pipeline, number, event_for(end)).await;
    }

    /// Delivers the build as it was (`then`), as a late webhook: the fake's build is put back
    /// to that state for the delivery, then restored.
    async fn deliver_late(&self, then: &kitebridge_fakes::Build, event: WebhookEvent) {
        let (pipeline, number) = (then.pipeline.as_str(), then.number);
        let now = self.bk.build(ORG, pipeline, number).expect("build exists");
        let put = |from: &kitebridge_fakes::Build| {
            let (state, blocked, started, finished) =
                (from.state, from.blocked, from.started_at, from.finished_at);
            move |b: &mut kitebridge_fakes::Build| {
                b.state = state;
                b.blocked = blocked;
                b.started_at = started;
                b.finished_at = finished;
            }
        };
        self.bk.update_build(ORG, pipeline, number, put(then));
        self.redeliver(pipeline, number, event).await;
        self.bk.update_build(ORG, pipeline, number, put(&now));
    }

    async fn candidate(&self, version: &str, number: usize) -> Value {
        let rel = self
            .call("GET", &format!("/projects/web/releases/{version}"), None)
            .await;
        assert_eq!(rel.status, StatusCode::OK, "{}", rel.body);
        rel.body["candidates"][number - 1].clone()
    }

    async fn deployment(&self, env: &str, id: &str) -> Value {
        let a = self
            .call(
                "GET",
                &format!("/projects/web/environments/{env}/deployments/{id}"),
                None,
            )
            .await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        a.body
    }

    async fn environment(&self, env: &str) -> Value {
        self.call("GET", &format!("/projects/web/environments/{env}"), None)
            .await
            .body
    }
}

fn event_for(state: BuildState) -> WebhookEvent {
    match state {
        BuildState::Scheduled => WebhookEvent::BuildScheduled,
        BuildState::Running => WebhookEvent::BuildRunning,
        BuildState::Failing => WebhookEvent::BuildFailing,
        _ => WebhookEvent::BuildFinished,
    }
}

fn sqlite() -> Store {
    Store::new(SqliteKv::in_memory().expect("in-memory sqlite"))
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------

/// Cut, build, promote through staging to production, with every variable and meta-data the
/// pipelines receive; the tracker moves everything forward only.
async fn full_release_flow(store: Store) {
    let h = Harness::start(store).await;
    h.project().await;
    let project = h.call("GET", "/projects/web", None).await;
    assert_eq!(project.status, StatusCode::OK);
    assert_eq!(project.body["environments"].as_array().unwrap().len(), 3);

    // Cut: release 1.4.0, candidate 1.4.0-rc1, building on the release pipeline.
    let cut = h
        .call(
            "POST",
            "/projects/web/releases",
            Some(json!({"commit": SHA, "branch": "main", "version": "1.4.0"})),
        )
        .await;
    assert_eq!(cut.status, StatusCode::CREATED, "{}", cut.body);
    let c = &cut.body["candidate"];
    assert_eq!(s(&c["version"]), "1.4.0-rc1");
    assert_eq!(s(&c["state"]), "building");
    let builds = h.bk.created_builds();
    assert_eq!(builds.len(), 1);
    let b = &builds[0];
    assert_eq!(
        (b.pipeline.as_str(), b.commit.as_str(), b.branch.as_str()),
        ("web-release", SHA, "main")
    );
    assert_eq!(b.env["AVIATOR_RELEASE_CUT_ID"], c["cut_id"]);
    assert_eq!(b.env["AVIATOR_RELEASE_CANDIDATE_VERSION"], "1.4.0-rc1");
    assert_eq!(b.env["AVIATOR_RELEASE_CUT_COMMIT_HASH"], SHA);
    assert_eq!(b.env["REGION"], "eu-west-1");
    assert_eq!(b.meta_data["kitebridge:candidate"], "web/1.4.0-rc1");
    assert_eq!(c["build"]["id"], json!(b.id));

    // Not built yet: cannot deploy.
    let early = h.deploy("staging", "1.4.0-rc1").await;
    assert_eq!(
        (early.status, s(&early.body["error"])),
        (StatusCode::CONFLICT, "candidate_not_built")
    );

    // Webhooks: running, passed, then a late running and a repeated finished change nothing.
    h.progress("web-release", b.number, BuildState::Running)
        .await;
    h.progress("web-release", b.number, BuildState::Passed)
        .await;
    h.bk.set_build_state(ORG, "web-release", b.number, BuildState::Running);
    h.redeliver("web-release", b.number, WebhookEvent::BuildRunning)
        .await;
    h.redeliver("web-release", b.number, WebhookEvent::BuildRunning)
        .await;
    let rel = h.call("GET", "/projects/web/releases/1.4.0", None).await;
    assert_eq!(rel.status, StatusCode::OK);
    assert_eq!(s(&rel.body["commit"]), SHA);
    let cands = rel.body["candidates"].as_array().unwrap();
    assert_eq!(cands.len(), 1);
    assert_eq!(s(&cands[0]["state"]), "built");
    assert_eq!(s(&cands[0]["build_state"]), "passed");

    // Promotion order: production needs a success in staging first.
    let prod = h.deploy("production", "1.4.0-rc1").await;
    assert_eq!(
        (prod.status, s(&prod.body["error"])),
        (StatusCode::CONFLICT, "promotion_required")
    );

    // Staging: the deploy pipeline gets the deployment's variables; one at a time.
    let d = h.deploy("staging", "1.4.0-rc1").await;
    assert_eq!(d.status, StatusCode::CREATED, "{}", d.body);
    assert_eq!(s(&d.body["status"]), "pending");
    let deploy_build = h.bk.created_builds().pop().unwrap();
    assert_eq!(deploy_build.pipeline, "web-deploy");
    assert_eq!(deploy_build.env["AVIATOR_DEPLOYMENT_ID"], d.body["id"]);
    assert_eq!(
        deploy_build.env["AVIATOR_RELEASE_CANDIDATE_VERSION"],
        "1.4.0-rc1"
    );
    assert_eq!(deploy_build.env["AVIATOR_RELEASE_CUT_COMMIT_HASH"], SHA);
    assert_eq!(deploy_build.env["TARGET"], "staging");
    assert_eq!(deploy_build.commit, SHA);
    let id = s(&d.body["id"]).to_string();
    assert_eq!(
        deploy_build.meta_data["kitebridge:deployment"],
        json!(format!("web/staging/{id}"))
    );
    let second = h.deploy("staging", "1.4.0-rc1").await;
    assert_eq!(
        (second.status, s(&second.body["error"])),
        (StatusCode::CONFLICT, "deployment_in_progress")
    );
    let env = h
        .call("GET", "/projects/web/environments/staging", None)
        .await;
    assert_eq!(env.body["active_deployment"]["id"], json!(id));

    h.progress("web-deploy", deploy_build.number, BuildState::Running)
        .await;
    let running = h
        .call(
            "GET",
            &format!("/projects/web/environments/staging/deployments/{id}"),
            None,
        )
        .await;
    assert_eq!(s(&running.body["status"]), "in_progress");
    h.progress("web-deploy", deploy_build.number, BuildState::Passed)
        .await;
    // A late `running` does not undo the success.
    h.bk.set_build_state(ORG, "web-deploy", deploy_build.number, BuildState::Running);
    h.redeliver(
        "web-deploy",
        deploy_build.number,
        WebhookEvent::BuildRunning,
    )
    .await;
    let done = h
        .call(
            "GET",
            &format!("/projects/web/environments/staging/deployments/{id}"),
            None,
        )
        .await;
    assert_eq!(s(&done.body["status"]), "success");
    assert!(done.body["finished_at"].is_string());
    let env = h
        .call("GET", "/projects/web/environments/staging", None)
        .await;
    assert_eq!(env.body["active_deployment"], Value::Null);
    assert_eq!(
        s(&env.body["last_successful_candidate_version"]),
        "1.4.0-rc1"
    );

    // Now production may have it.
    let prod = h
        .deployed("production", "1.4.0-rc1", BuildState::Passed)
        .await;
    assert_eq!(s(&prod["status"]), "success");
    let list = h
        .call(
            "GET",
            "/projects/web/environments/production/deployments",
            None,
        )
        .await;
    assert_eq!(list.body["items"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn full_release_flow_on_sqlite() {
    full_release_flow(sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_release_flow_on_dynamodb() {
    full_release_flow(Store::new(kitebridge_tests::dynamodb().await)).await;
}

#[tokio::test]
async fn versions_candidates_and_listing() {
    let h = Harness::start(sqlite()).await;
    h.project().await;
    let cut = |body: Value| {
        let h = &h;
        async move { h.call("POST", "/projects/web/releases", Some(body)).await }
    };
    // No version: the next by the scheme.
    let a = cut(json!({"commit": SHA, "branch": "main"})).await;
    assert_eq!(s(&a.body["release"]["version"]), "0.1.0");
    let a = cut(json!({"commit": SHA, "branch": "main", "version": "1.9.0"})).await;
    assert_eq!(a.status, StatusCode::CREATED);
    let a = cut(json!({"commit": SHA, "branch": "main"})).await;
    assert_eq!(s(&a.body["release"]["version"]), "1.10.0");
    let a = cut(json!({"commit": SHA, "branch": "main", "bump": "major"})).await;
    assert_eq!(s(&a.body["release"]["version"]), "2.0.0");
    // The same version again: the next candidate, on its own commit, with its own cut id.
    let again = cut(json!({"commit": SHA2, "branch": "hotfix/1.9", "version": "1.9.0"})).await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert_eq!(s(&again.body["candidate"]["version"]), "1.9.0-rc2");
    assert_eq!(s(&again.body["candidate"]["commit"]), SHA2);
    let last = h.bk.created_builds().pop().unwrap();
    assert_eq!(
        (last.commit.as_str(), last.branch.as_str()),
        (SHA2, "hotfix/1.9")
    );
    assert_eq!(last.env["AVIATOR_RELEASE_CANDIDATE_VERSION"], "1.9.0-rc2");
    assert_ne!(last.env["AVIATOR_RELEASE_CUT_ID"], json!(""));
    let rel = h.call("GET", "/projects/web/releases/1.9.0", None).await;
    let versions: Vec<&str> = rel.body["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| s(&c["version"]))
        .collect();
    assert_eq!(versions, ["1.9.0-rc1", "1.9.0-rc2"]);

    // Newest first, paginated.
    let p1 = h
        .call("GET", "/projects/web/releases?per_page=3", None)
        .await;
    assert_eq!(p1.status, StatusCode::OK);
    let names: Vec<&str> = p1.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| s(&r["version"]))
        .collect();
    assert_eq!(names, ["2.0.0", "1.10.0", "1.9.0"]);
    let cursor = s(&p1.body["next_cursor"]).to_string();
    let p2 = h
        .call(
            "GET",
            &format!("/projects/web/releases?per_page=3&cursor={cursor}"),
            None,
        )
        .await;
    let names: Vec<&str> = p2.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| s(&r["version"]))
        .collect();
    assert_eq!(names, ["0.1.0"]);
    assert_eq!(p2.body["next_cursor"], Value::Null);
    // A cursor is the id of the page's last item; any id is a place to continue from.
    assert_eq!(cursor, s(&p1.body["items"][2]["cut_id"]));
    let any = h
        .call(
            "GET",
            "/projects/web/releases?cursor=00000000000000000000000000",
            None,
        )
        .await;
    assert_eq!(any.status, StatusCode::OK);
    assert_eq!(any.body["items"], json!([]));

    // Calver, and a project without a build pipeline: built at once, nothing sent to Buildkite.
    let before = h.created_builds();
    let p = h
        .call(
            "PUT",
            "/projects/cal",
            Some(json!({"version_scheme": "calver", "environments": [{"name": "prod"}]})),
        )
        .await;
    assert_eq!(p.status, StatusCode::CREATED);
    let today = chrono::Utc::now().format("%Y.%m.%d").to_string();
    let a = h
        .call(
            "POST",
            "/projects/cal/releases",
            Some(json!({"commit": SHA, "branch": "main"})),
        )
        .await;
    assert_eq!(s(&a.body["release"]["version"]), today);
    assert_eq!(s(&a.body["candidate"]["state"]), "built");
    let a = h
        .call(
            "POST",
            "/projects/cal/releases",
            Some(json!({"commit": SHA, "branch": "main"})),
        )
        .await;
    assert_eq!(s(&a.body["release"]["version"]), format!("{today}.1"));
    let bad = h
        .call(
            "POST",
            "/projects/cal/releases",
            Some(json!({"commit": SHA, "branch": "main", "version": "1.0.0"})),
        )
        .await;
    // A semver version is a version (the spec's form), just not of this project's scheme: 422.
    assert_eq!(
        (bad.status, s(&bad.body["field"])),
        (StatusCode::UNPROCESSABLE_ENTITY, "version")
    );
    let bad = h
        .call(
            "POST",
            "/projects/cal/releases",
            Some(json!({"commit": SHA, "branch": "main", "version": "v1"})),
        )
        .await;
    assert_eq!(
        (bad.status, s(&bad.body["field"])),
        (StatusCode::BAD_REQUEST, "version")
    );
    assert_eq!(h.created_builds(), before);
    // Updating a project keeps its creation time.
    let upd = h
        .call(
            "PUT",
            "/projects/cal",
            Some(json!({"version_scheme": "calver"})),
        )
        .await;
    assert_eq!(upd.status, StatusCode::OK);
    assert_eq!(upd.body["created_at"], p.body["created_at"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_cuts_get_unique_candidates_and_versions() {
    let h = std::sync::Arc::new(Harness::start(sqlite()).await);
    h.project().await;
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let h = h.clone();
        tasks.push(tokio::spawn(async move {
            h.call(
                "POST",
                "/projects/web/releases",
                Some(json!({"commit": SHA, "branch": "main", "version": "3.0.0"})),
            )
            .await
        }));
    }
    let mut numbers = BTreeSet::new();
    for t in tasks {
        let a = t.await.unwrap();
        assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
        numbers.insert(a.body["candidate"]["number"].as_u64().unwrap());
    }
    assert_eq!(numbers, (1..=12).collect::<BTreeSet<_>>());
    assert_eq!(h.created_builds(), 12);

    // Cuts without a version: each gets its own version.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let h = h.clone();
        tasks.push(tokio::spawn(async move {
            h.call(
                "POST",
                "/projects/web/releases",
                Some(json!({"commit": SHA, "branch": "main"})),
            )
            .await
        }));
    }
    let mut versions = BTreeSet::new();
    for t in tasks {
        let a = t.await.unwrap();
        assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
        assert_eq!(
            s(&a.body["candidate"]["version"])
                .rsplit_once("-rc")
                .unwrap()
                .1,
            "1"
        );
        versions.insert(s(&a.body["release"]["version"]).to_string());
    }
    assert_eq!(versions.len(), 8);
    assert!(
        versions.contains("3.1.0") && versions.contains("3.8.0"),
        "{versions:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_deployments_one_wins_the_rest_conflict() {
    let h = std::sync::Arc::new(Harness::start(sqlite()).await);
    h.project().await;
    let c = h.built("1.0.0", SHA).await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let h = h.clone();
        let c = c.clone();
        tasks.push(tokio::spawn(async move { h.deploy("staging", &c).await }));
    }
    let mut codes = Vec::new();
    for t in tasks {
        let a = t.await.unwrap();
        if a.status == StatusCode::CONFLICT {
            assert_eq!(s(&a.body["error"]), "deployment_in_progress");
        }
        codes.push(a.status);
    }
    assert_eq!(
        codes.iter().filter(|c| **c == StatusCode::CREATED).count(),
        1,
        "{codes:?}"
    );
    assert_eq!(
        codes.iter().filter(|c| **c == StatusCode::CONFLICT).count(),
        7
    );
    // One deploy build only.
    let deploys =
        h.bk.created_builds()
            .iter()
            .filter(|b| b.pipeline == "web-deploy")
            .count();
    assert_eq!(deploys, 1);
}

#[tokio::test]
async fn authentication() {
    let h = Harness::start(sqlite()).await;
    h.project().await;
    for headers in [
        vec![],
        vec![("authorization", "Bearer wrong")],
        vec![("authorization", "Bearer releases-api-token-012")],
        vec![("authorization", "Basic cmVsZWFzZXM6YXBp")],
        vec![("authorization", API_TOKEN)],
    ] {
        for (method, path) in [("GET", "/projects/web"), ("POST", "/projects/web/releases")] {
            let a = h
                .call_with(
                    method,
                    path,
                    Some(json!({"commit": SHA, "branch": "main"})),
                    &headers,
                )
                .await;
            assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{headers:?}");
            assert_eq!(s(&a.body["error"]), "unauthorized");
            assert!(!a.body.to_string().contains(API_TOKEN));
        }
    }
    assert_eq!(h.created_builds(), 0);
    let ok = h
        .call_with(
            "GET",
            "/projects/web",
            None,
            &[("authorization", &format!("bearer {API_TOKEN}"))],
        )
        .await;
    assert_eq!(ok.status, StatusCode::OK);

    // KITEBRIDGE_API_AUTH=iam: API Gateway authenticated the caller; no bearer check here.
    let iam = Harness::start_with(sqlite(), |c| {
        c.api_auth = kitebridge::config::ApiAuth::Iam;
        c.api_token = None;
    })
    .await;
    let a = iam
        .call_with(
            "PUT",
            "/projects/web",
            Some(json!({})),
            &[("authorization", "AWS4-HMAC-SHA256 Credential=...")],
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
}

#[tokio::test]
async fn bad_requests_name_the_field_and_missing_things_are_404() {
    let h = Harness::start(sqlite()).await;
    h.project().await;
    let c = h.built("1.0.0", SHA).await;
    let cases: Vec<(&str, &str, Option<Value>, StatusCode, &str)> = vec![
        (
            "POST",
            "/projects/web/releases",
            Some(json!({"branch": "main"})),
            StatusCode::BAD_REQUEST,
            "commit",
        ),
        (
            "POST",
            "/projects/web/releases",
            Some(json!({"commit": "abc123", "branch": "main"})),
            StatusCode::BAD_REQUEST,
            "commit",
        ),
        (
            "POST",
            "/projects/web/releases",
            Some(json!({"commit": SHA, "branch": ""})),
            StatusCode::BAD_REQUEST,
            "branch",
        ),
        (
            "POST",
            "/projects/web/releases",
            Some(json!({"commit": SHA, "branch": "main", "version": "1.0"})),
            StatusCode::BAD_REQUEST,
            "version",
        ),
        (
            "POST",
            "/projects/web/releases",
            Some(json!({"commit": SHA, "branch": "main", "version": "1.0.0-rc1"})),
            StatusCode::BAD_REQUEST,
            "version",
        ),
        (
            "POST",
            "/projects/web/releases",
            Some(json!({"commit": SHA, "branch": "main", "extra": 1})),
            StatusCode::BAD_REQUEST,
            "extra",
        ),
        (
            "POST",
            "/projects/web/environments/staging/deployments",
            Some(json!({"release_candidate_version": "1.0.0"})),
            StatusCode::BAD_REQUEST,
            "release_candidate_version",
        ),
        (
            "PATCH",
            "/projects/web/environments/manual/deployments",
            Some(json!({"release_candidate_version": c, "status": "done"})),
            StatusCode::BAD_REQUEST,
            "status",
        ),
        (
            "PUT",
            "/projects/web/environments/staging/freeze",
            Some(json!({"frozen": "yes"})),
            StatusCode::BAD_REQUEST,
            "frozen",
        ),
        (
            "PUT",
            "/projects/bad%20name",
            Some(json!({})),
            StatusCode::BAD_REQUEST,
            "project",
        ),
        (
            "PUT",
            "/projects/x",
            Some(json!({"environments": [{"name": "a", "requires": "b"}]})),
            StatusCode::UNPROCESSABLE_ENTITY,
            "environments[0].requires",
        ),
        (
            "PUT",
            "/projects/x",
            Some(json!({"build_pipeline": ["acme", "web"]})),
            StatusCode::BAD_REQUEST,
            "build_pipeline",
        ),
        (
            "PUT",
            "/projects/x",
            Some(json!({"env": {"AVIATOR_RELEASE_CUT_ID": "x"}})),
            StatusCode::BAD_REQUEST,
            "env.AVIATOR_RELEASE_CUT_ID",
        ),
        (
            "PUT",
            "/projects/x",
            Some(json!({"version_scheme": "romver"})),
            StatusCode::BAD_REQUEST,
            "version_scheme",
        ),
        (
            "GET",
            "/projects/web/releases?per_page=500",
            None,
            StatusCode::BAD_REQUEST,
            "per_page",
        ),
        (
            "GET",
            "/projects/web/releases?cursor=50524f4a454354",
            None,
            StatusCode::BAD_REQUEST,
            "cursor",
        ),
    ];
    for (method, path, body, status, field) in cases {
        let a = h.call(method, path, body.clone()).await;
        assert_eq!(a.status, status, "{method} {path} {body:?}: {}", a.body);
        assert_eq!(s(&a.body["field"]), field, "{method} {path}: {}", a.body);
        assert_eq!(s(&a.body["error"]), "invalid_request");
        assert!(a.body["message"].is_string());
    }
    // Not JSON at all.
    let mut req = Request::builder()
        .method("POST")
        .uri("/projects/web/releases");
    req = req.header("authorization", format!("Bearer {API_TOKEN}"));
    let resp = h
        .app
        .clone()
        .oneshot(req.body(Body::from("{nope")).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);

    let missing: Vec<(&str, &str, Option<Value>, &str)> = vec![
        ("GET", "/projects/nope", None, "project_not_found"),
        (
            "POST",
            "/projects/nope/releases",
            Some(json!({"commit": SHA, "branch": "main"})),
            "project_not_found",
        ),
        (
            "GET",
            "/projects/web/releases/9.9.9",
            None,
            "release_not_found",
        ),
        (
            "POST",
            "/projects/web/environments/qa/deployments",
            Some(json!({"release_candidate_version": c})),
            "environment_not_found",
        ),
        (
            "POST",
            "/projects/web/environments/staging/deployments",
            Some(json!({"release_candidate_version": "1.0.0-rc7"})),
            "candidate_not_found",
        ),
        (
            "GET",
            "/projects/web/environments/staging/deployments/01J000000000000000000000",
            None,
            "deployment_not_found",
        ),
        (
            "PUT",
            "/projects/web/environments/qa/freeze",
            Some(json!({"frozen": true})),
            "environment_not_found",
        ),
    ];
    for (method, path, body, kind) in missing {
        let a = h.call(method, path, body).await;
        assert_eq!(
            (a.status, s(&a.body["error"])),
            (StatusCode::NOT_FOUND, kind),
            "{method} {path}"
        );
    }
    let a = h.call("GET", "/nowhere", None).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    let a = h.call("PATCH", "/projects/web", None).await;
    assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED);
}

/// Buildkite refuses (422, its message passed on) or is unreachable (502): nothing is left
/// claiming to be building, a refusal holds no environment, and a retry with the same
/// Idempotency-Key runs again; a failure after which the build may exist leaves its record
/// pending and creates no second build.
#[tokio::test]
async fn buildkite_refusals_and_outages_leave_nothing_half_done() {
    let h = Harness::start(sqlite()).await;
    h.project().await;

    // Injected 422 Validation Failed.
    h.bk.inject_fault(Fault::Status(422), 1);
    let key = [
        ("authorization", format!("Bearer {API_TOKEN}")),
        ("idempotency-key", "cut-1".to_string()),
    ];
    let key: Vec<(&str, &str)> = key.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let body = json!({"commit": SHA, "branch": "main", "version": "5.0.0"});
    let a = h
        .call_with("POST", "/projects/web/releases", Some(body.clone()), &key)
        .await;
    assert_eq!(
        (a.status, s(&a.body["error"])),
        (StatusCode::UNPROCESSABLE_ENTITY, "buildkite_refused")
    );
    assert!(s(&a.body["message"]).contains("422"), "{}", a.body);
    let rel = h.call("GET", "/projects/web/releases/5.0.0", None).await;
    let rc1 = &rel.body["candidates"][0];
    assert_eq!(s(&rc1["state"]), "failed");
    assert!(s(&rc1["error_message"]).contains("Buildkite refused"));
    // The same key again: runs again (the failure was not kept), making rc2.
    let a = h
        .call_with("POST", "/projects/web/releases", Some(body.clone()), &key)
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    assert!(!a.replayed);
    assert_eq!(s(&a.body["candidate"]["version"]), "5.0.0-rc2");
    assert_eq!(s(&a.body["candidate"]["state"]), "building");

    // A pipeline Buildkite does not know: its 404 message is passed on as a refusal.
    h.call(
        "PUT",
        "/projects/ghost",
        Some(json!({"build_pipeline": {"organization": ORG, "pipeline": "ghost"}})),
    )
    .await;
    let a = h
        .call(
            "POST",
            "/projects/ghost/releases",
            Some(json!({"commit": SHA, "branch": "main"})),
        )
        .await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        s(&a.body["message"]).contains("No pipeline found"),
        "{}",
        a.body
    );

    // 5xx from Buildkite: 502. Buildkite may have created the build all the same, and it is
    // not (yet) to be found: the candidate stays pending, and a retry right away (any key) is
    // told to wait rather than creating a second build.
    let before = h.created_builds();
    h.bk.inject_fault(Fault::Status(503), 1);
    let cut6 = json!({"commit": SHA, "branch": "main", "version": "6.0.0"});
    let a = h
        .call("POST", "/projects/web/releases", Some(cut6.clone()))
        .await;
    assert_eq!(
        (a.status, s(&a.body["error"])),
        (StatusCode::BAD_GATEWAY, "buildkite_unavailable")
    );
    assert!(s(&a.body["message"]).contains("not known"), "{}", a.body);
    let rel = h.call("GET", "/projects/web/releases/6.0.0", None).await;
    assert_eq!(s(&rel.body["candidates"][0]["state"]), "pending");
    let a = h.call("POST", "/projects/web/releases", Some(cut6)).await;
    assert_eq!(
        (a.status, s(&a.body["error"])),
        (StatusCode::CONFLICT, "build_in_progress"),
        "{}",
        a.body
    );
    let rel = h.call("GET", "/projects/web/releases/6.0.0", None).await;
    assert_eq!(rel.body["candidates"].as_array().map(Vec::len), Some(1));
    assert_eq!(h.created_builds(), before);

    // A deployment Buildkite refuses ends as `error` and frees the environment.
    let c = h.built("7.0.0", SHA).await;
    h.bk.inject_fault(Fault::Status(422), 1);
    let a = h.deploy("staging", &c).await;
    assert_eq!(a.status, StatusCode::UNPROCESSABLE_ENTITY);
    let list = h
        .call(
            "GET",
            "/projects/web/environments/staging/deployments",
            None,
        )
        .await;
    let d = &list.body["items"][0];
    assert_eq!(s(&d["status"]), "error");
    assert!(d["error_message"].is_string());
    let env = h
        .call("GET", "/projects/web/environments/staging", None)
        .await;
    assert_eq!(env.body["active_deployment"], Value::Null);
    // Buildkite is back: the deployment goes through.
    let a = h.deploy("staging", &c).await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);

    // A deployment whose request was dropped unanswered may have its build: it stays pending
    // and keeps the environment, and asking again waits rather than creating a second build.
    let h2 = Harness::start(sqlite()).await;
    h2.project().await;
    let c = h2.built("7.0.0", SHA).await;
    let before = h2.created_builds();
    h2.bk.inject_fault(Fault::DropConnection, 1);
    let a = h2.deploy("staging", &c).await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY, "{}", a.body);
    let list = h2
        .call(
            "GET",
            "/projects/web/environments/staging/deployments",
            None,
        )
        .await;
    let d = &list.body["items"][0];
    assert_eq!(s(&d["status"]), "pending");
    let env = h2
        .call("GET", "/projects/web/environments/staging", None)
        .await;
    assert_eq!(env.body["active_deployment"]["id"], d["id"], "{}", env.body);
    let a = h2.deploy("staging", &c).await;
    assert_eq!(
        (a.status, s(&a.body["error"])),
        (StatusCode::CONFLICT, "build_in_progress"),
        "{}",
        a.body
    );
    assert_eq!(h2.created_builds(), before);

    // Buildkite not reachable at all (nothing listening).
    let down = Harness::start_with(sqlite(), |c| {
        c.buildkite.api_url = url::Url::parse("http://127.0.0.1:9").unwrap();
    })
    .await;
    down.project().await;
    let a = down
        .call(
            "POST",
            "/projects/web/releases",
            Some(json!({"commit": SHA, "branch": "main"})),
        )
        .await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY, "{}", a.body);
    let rel = down.call("GET", "/projects/web/releases/0.1.0", None).await;
    assert_eq!(s(&rel.body["candidates"][0]["state"]), "failed");
}

/// Buildkite creates the build but its answer is lost (the connection drops after it acted):
/// the same request finds the build by its meta-data instead of failing or creating another,
/// and the candidate and the deployment are linked to it, so its progress moves them.
#[tokio::test]
async fn a_lost_answer_leaves_one_build_linked_per_cut_and_deployment() {
    let h = Harness::start(sqlite()).await;
    h.project().await;
    h.bk.inject_fault(Fault::LoseAnswer, 1);
    let a = h
        .call(
            "POST",
            "/projects/web/releases",
            Some(json!({"commit": SHA, "branch": "main", "version": "8.0.0"})),
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    let created = h.bk.created_builds();
    assert_eq!(created.len(), 1, "{created:?}");
    let candidate = &a.body["candidate"];
    assert_eq!(s(&candidate["version"]), "8.0.0-rc1");
    assert_eq!(s(&candidate["state"]), "building");
    assert_eq!(s(&candidate["build"]["id"]), created[0].id);
    h.progress("web-release", created[0].number, BuildState::Passed)
        .await;
    let rel = h.call("GET", "/projects/web/releases/8.0.0", None).await;
    assert_eq!(
        s(&rel.body["candidates"][0]["state"]),
        "built",
        "{}",
        rel.body
    );

    h.bk.inject_fault(Fault::LoseAnswer, 1);
    let a = h.deploy("staging", "8.0.0-rc1").await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    let created = h.bk.created_builds();
    assert_eq!(created.len(), 2, "{created:?}");
    let deploy_build = &created[1];
    assert_eq!(deploy_build.pipeline, "web-deploy");
    assert_eq!(s(&a.body["build"]["id"]), deploy_build.id);
    h.progress("web-deploy", deploy_build.number, BuildState::Passed)
        .await;
    let id = s(&a.body["id"]);
    let d = h
        .call(
            "GET",
            &format!("/projects/web/environments/staging/deployments/{id}"),
            None,
        )
        .await;
    assert_eq!(s(&d.body["status"]), "success", "{}", d.body);
    assert_eq!(h.created_builds(), 2);
}

/// Buildkite holds the create past the attempt's budget and applies it later: the request
/// answers 502 with the record left pending; a retry meanwhile is told to wait; once the lease
/// lapsed, the retry (a new call, as with a new Idempotency-Key) looks first, finds the build
/// that landed late and links it. One build per cut and per deployment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_applied_late_is_found_by_the_retry() {
    use kitebridge::release::model::{CandidateState, DeploymentStatus};
    use kitebridge::release::service::{CutRequest, DeployRequest, ReleaseService};
    let h = Harness::start(sqlite()).await;
    h.project().await;
    // The lease's 5/12 budget (2.5 s) ends before the HTTP timeout (3 s) and the late apply (4 s).
    let lease = Duration::from_secs(6);
    let service = ReleaseService::new(
        std::sync::Arc::new(h.state.store.clone()),
        h.state.buildkite.clone(),
        Duration::from_secs(3600),
    )
    .with_build_lease(lease);
    let late = Fault::ApplyLate {
        delay: Duration::from_secs(4),
    };

    let cut = || -> CutRequest {
        serde_json::from_value(json!({"commit": SHA, "branch": "main", "version": "9.0.0"}))
            .unwrap()
    };
    h.bk.inject_fault(late.clone(), 1);
    let started = tokio::time::Instant::now();
    let e = service.cut("web", cut()).await.unwrap_err();
    assert_eq!(e.status(), 502, "{e}");
    assert!(e.to_string().contains("not known"), "{e}");
    let e = service.cut("web", cut()).await.unwrap_err();
    assert_eq!(e.kind(), "build_in_progress", "{e}");
    tokio::time::sleep_until(started + lease + Duration::from_millis(300)).await;
    let created = h.bk.created_builds();
    assert_eq!(created.len(), 1, "it landed late: {created:?}");
    let done = service.cut("web", cut()).await.unwrap();
    assert_eq!(done.candidate.version, "9.0.0-rc1");
    assert_eq!(done.candidate.state, CandidateState::Building);
    assert_eq!(
        done.candidate.build.map(|b| b.id),
        Some(created[0].id.clone())
    );
    assert_eq!(done.candidate.error_message, None);
    assert_eq!(h.created_builds(), 1);
    h.progress("web-release", created[0].number, BuildState::Passed)
        .await;

    let deploy = || DeployRequest {
        release_candidate_version: "9.0.0-rc1".into(),
        force: false,
    };
    h.bk.inject_fault(late, 1);
    let started = tokio::time::Instant::now();
    let e = service
        .deploy("web", "staging", deploy())
        .await
        .unwrap_err();
    assert_eq!(e.status(), 502, "{e}");
    let e = service
        .deploy("web", "staging", deploy())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), "build_in_progress", "{e}");
    tokio::time::sleep_until(started + lease + Duration::from_millis(300)).await;
    let created = h.bk.created_builds();
    assert_eq!(created.len(), 2, "{created:?}");
    let d = service.deploy("web", "staging", deploy()).await.unwrap();
    assert_eq!(d.build.map(|b| b.id), Some(created[1].id.clone()));
    assert_eq!(d.status, DeploymentStatus::Pending);
    let all = service
        .list_deployments("web", "staging", None, 10)
        .await
        .unwrap();
    assert_eq!(all.items.len(), 1, "the same deployment, resumed");
    assert_eq!(h.created_builds(), 2);
}

#[tokio::test]
async fn idempotency_keys_replay_the_first_answer() {
    let h = Harness::start(sqlite()).await;
    h.project().await;
    let auth = format!("Bearer {API_TOKEN}");
    let headers = [("authorization", auth.as_str()), ("idempotency-key", "k-1")];
    let body = json!({"commit": SHA, "branch": "main"});
    let first = h
        .call_with(
            "POST",
            "/projects/web/releases",
            Some(body.clone()),
            &headers,
        )
        .await;
    assert_eq!(first.status, StatusCode::CREATED);
    let again = h
        .call_with(
            "POST",
            "/projects/web/releases",
            Some(body.clone()),
            &headers,
        )
        .await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert!(again.replayed);
    assert_eq!(again.body, first.body);
    assert_eq!(h.created_builds(), 1);
    let list = h.call("GET", "/projects/web/releases", None).await;
    assert_eq!(list.body["items"].as_array().unwrap().len(), 1);
    // The same key with another request.
    let other = h
        .call_with(
            "POST",
            "/projects/web/releases",
            Some(json!({"commit": SHA2, "branch": "main"})),
            &headers,
        )
        .await;
    assert_eq!(
        (other.status, s(&other.body["error"])),
        (StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused")
    );
    // Deployments too: one deploy build for two requests.
    let number = first.body["candidate"]["build"]["number"].as_u64().unwrap();
    h.progress("web-release", number, BuildState::Passed).await;
    let c = s(&first.body["candidate"]["version"]).to_string();
    let headers = [("authorization", auth.as_str()), ("idempotency-key", "d-1")];
    let dbody = json!({"release_candidate_version": c});
    let d1 = h
        .call_with(
            "POST",
            "/projects/web/environments/staging/deployments",
            Some(dbody.clone()),
            &headers,
        )
        .await;
    let d2 = h
        .call_with(
            "POST",
            "/projects/web/environments/staging/deployments",
            Some(dbody),
            &headers,
        )
        .await;
    assert_eq!(
        (d1.status, d2.status),
        (StatusCode::CREATED, StatusCode::CREATED)
    );
    assert_eq!(d1.body["id"], d2.body["id"]);
    assert_eq!(h.created_builds(), 2);
    let bad = h
        .call_with(
            "POST",
            "/projects/web/releases",
            Some(body),
            &[("authorization", auth.as_str()), ("idempotency-key", "")],
        )
        .await;
    assert_eq!(
        (bad.status, s(&bad.body["field"])),
        (StatusCode::BAD_REQUEST, "Idempotency-Key")
    );
}

#[tokio::test]
async fn rollback_after_success_and_after_failure() {
    let h = Harness::start(sqlite()).await;
    h.project().await;
    let rollback = |force: bool| {
        let h = &h;
        async move {
            h.call(
                "POST",
                "/projects/web/environments/staging/rollback",
                Some(json!({"force": force})),
            )
            .await
        }
    };
    // Nothing deployed: nothing to roll back.
    let a = rollback(false).await;
    assert_eq!(
        (a.status, s(&a.body["error"])),
        (StatusCode::CONFLICT, "nothing_to_roll_back")
    );

    let v1 = h.built("1.0.0", SHA).await;
    let v2 = h.built("1.1.0", SHA2).await;
    assert_eq!(
        s(&h.deployed("staging", &v1, BuildState::Passed).await["status"]),
        "success"
    );
    // Only one deployment ever succeeded: nothing ran before it.
    let a = rollback(false).await;
    assert_eq!(a.status, StatusCode::CONFLICT);
    let d2 = h.deployed("staging", &v2, BuildState::Passed).await;
    assert_eq!(s(&d2["from_candidate_version"]), v1);

    // After a success: back to what ran before it.
    let r = rollback(false).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(
        (
            s(&r.body["candidate_version"]),
            r.body["rollback"].as_bool()
        ),
        (v1.as_str(), Some(true))
    );
    let build = h.bk.created_builds().pop().unwrap();
    assert_eq!(build.env["AVIATOR_RELEASE_CANDIDATE_VERSION"], json!(v1));
    assert_eq!(build.commit, SHA);
    // While it runs, another rollback waits.
    let busy = rollback(false).await;
    assert_eq!(
        (busy.status, s(&busy.body["error"])),
        (StatusCode::CONFLICT, "deployment_in_progress")
    );
    h.progress("web-deploy", build.number, BuildState::Passed)
        .await;

    // Deploy v2 again, it fails: the rollback goes to the last good one (v1).
    let failed = h.deployed("staging", &v2, BuildState::Failed).await;
    assert_eq!(s(&failed["status"]), "failure");
    assert!(s(&failed["error_message"]).contains("failed"));
    let r = rollback(false).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(s(&r.body["candidate_version"]), v1);
}

#[tokio::test]
async fn frozen_environments_refuse_unless_forced() {
    let h = Harness::start(sqlite()).await;
    h.project().await;
    let v1 = h.built("1.0.0", SHA).await;
    let v2 = h.built("1.1.0", SHA2).await;
    h.deployed("staging", &v1, BuildState::Passed).await;
    h.deployed("staging", &v2, BuildState::Passed).await;
    let f = h
        .call(
            "PUT",
            "/projects/web/environments/staging/freeze",
            Some(json!({"frozen": true, "reason": "quarter end"})),
        )
        .await;
    assert_eq!(
        (f.status, f.body["frozen"].as_bool()),
        (StatusCode::OK, Some(true))
    );
    let builds = h.created_builds();
    let a = h.deploy("staging", &v1).await;
    assert_eq!(
        (a.status, s(&a.body["error"])),
        (StatusCode::CONFLICT, "environment_frozen")
    );
    assert!(s(&a.body["message"]).contains("quarter end"));
    let a = h
        .call(
            "POST",
            "/projects/web/environments/staging/rollback",
            Some(json!({})),
        )
        .await;
    assert_eq!(
        (a.status, s(&a.body["error"])),
        (StatusCode::CONFLICT, "environment_frozen")
    );
    let a = h
        .call("POST", "/projects/web/environments/staging/rollback", None)
        .await;
    assert_eq!(a.status, StatusCode::CONFLICT);
    assert_eq!(h.created_builds(), builds);
    // Forced: goes through, and says so.
    let a = h
        .call(
            "POST",
            "/projects/web/environments/staging/rollback",
            Some(json!({"force": true})),
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    assert_eq!(a.body["forced"].as_bool(), Some(true));
    h.progress(
        "web-deploy",
        a.body["build"]["number"].as_u64().unwrap(),
        BuildState::Passed,
    )
    .await;
    // Other environments are not frozen; unfreezing opens this one again.
    let u = h
        .call("DELETE", "/projects/web/environments/staging/freeze", None)
        .await;
    assert_eq!(u.body["frozen"].as_bool(), Some(false));
    let a = h.deploy("staging", &v2).await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    assert_eq!(a.body["forced"].as_bool(), Some(false));
}

#[tokio::test]
async fn status_by_patch_for_environments_without_a_pipeline() {
    let h = Harness::start(sqlite()).await;
    h.project().await;
    let v1 = h.built("1.0.0", SHA).await;
    let patch = |status: &str| {
        let h = &h;
        let body = json!({"release_candidate_version": v1, "status": status});
        async move {
            h.call(
                "PATCH",
                "/projects/web/environments/manual/deployments",
                Some(body),
            )
            .await
        }
    };
    let builds = h.created_builds();
    // Upsert: the first update creates the deployment (no workflow is triggered).
    let a = patch("in_progress").await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    assert_eq!(s(&a.body["status"]), "in_progress");
    let id = s(&a.body["id"]).to_string();
    let a = patch("in_progress").await;
    assert_eq!((a.status, s(&a.body["id"])), (StatusCode::OK, id.as_str()));
    let a = patch("pending").await;
    assert_eq!(
        (a.status, s(&a.body["error"])),
        (StatusCode::CONFLICT, "status_not_allowed")
    );
    let a = patch("success").await;
    assert_eq!(
        (a.status, s(&a.body["status"])),
        (StatusCode::OK, "success")
    );
    // Repeating the final status is harmless; changing a finished one is refused.
    let a = patch("success").await;
    assert_eq!((a.status, s(&a.body["id"])), (StatusCode::OK, id.as_str()));
    assert_eq!(h.created_builds(), builds);
    let env = h
        .call("GET", "/projects/web/environments/manual", None)
        .await;
    assert_eq!(s(&env.body["last_successful_candidate_version"]), v1);
    // An environment with a deploy pipeline takes its status from builds.
    let a = h
        .call(
            "PATCH",
            "/projects/web/environments/staging/deployments",
            Some(json!({"release_candidate_version": v1, "status": "success"})),
        )
        .await;
    assert_eq!(
        (a.status, s(&a.body["error"])),
        (StatusCode::CONFLICT, "environment_has_pipeline")
    );
    // Deploying by POST to such an environment leaves it pending until a PATCH says more.
    let d = h.deploy("manual", &v1).await;
    assert_eq!(
        (d.status, s(&d.body["status"])),
        (StatusCode::CREATED, "pending")
    );
    let a = patch("failure").await;
    assert_eq!(
        (s(&a.body["id"]), s(&a.body["status"])),
        (s(&d.body["id"]), "failure")
    );
}

#[tokio::test]
async fn stuck_deployments_become_error() {
    let h = Harness::start_with(sqlite(), |c| {
        c.deployment_timeout = Duration::from_millis(300);
    })
    .await;
    h.project().await;
    let v1 = h.built("1.0.0", SHA).await;
    let staged = h.deploy("staging", &v1).await;
    let manual = h.deploy("manual", &v1).await;
    assert_eq!(
        (staged.status, manual.status),
        (StatusCode::CREATED, StatusCode::CREATED)
    );

    // Nothing is stuck yet.
    let swept = kitebridge::release::sweep_stuck(&h.state.store, Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(swept, 0);
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Reading applies the rule.
    let id = s(&manual.body["id"]);
    let a = h
        .call(
            "GET",
            &format!("/projects/web/environments/manual/deployments/{id}"),
            None,
        )
        .await;
    assert_eq!(s(&a.body["status"]), "error");
    assert!(s(&a.body["error_message"]).contains("did not change"));
    // The sweep finds the other one (the manual one is done already).
    let swept = kitebridge::release::sweep_stuck(&h.state.store, Duration::from_millis(300))
        .await
        .unwrap();
    assert_eq!(swept, 1);
    let again = kitebridge::release::sweep_stuck(&h.state.store, Duration::from_millis(300))
        .await
        .unwrap();
    assert_eq!(again, 0);
    let env = h
        .call("GET", "/projects/web/environments/staging", None)
        .await;
    assert_eq!(env.body["active_deployment"], Value::Null);
    // A late success of the expired deploy build does not revive it.
    let number = staged.body["build"]["number"].as_u64().unwrap();
    h.progress("web-deploy", number, BuildState::Passed).await;
    let id = s(&staged.body["id"]);
    let a = h
        .call(
            "GET",
            &format!("/projects/web/environments/staging/deployments/{id}"),
            None,
        )
        .await;
    assert_eq!(s(&a.body["status"]), "error");
    // And the environment is free again.
    let d = h.deploy("staging", &v1).await;
    assert_eq!(d.status, StatusCode::CREATED, "{}", d.body);
}

#[tokio::test]
async fn builds_kitebridge_did_not_create_are_ignored() {
    let h = Harness::start(sqlite()).await;
    h.project().await;
    let other = h.bk.add_build(
        kitebridge_fakes::Build::new(ORG, "web-release", SHA, "main")
            .with_state(BuildState::Passed),
    );
    h.redeliver("web-release", other.number, WebhookEvent::BuildFinished)
        .await;
    let a = h
        .call(
            "POST",
            "/projects/web/releases",
            Some(json!({"commit": SHA, "branch": "main", "version": "1.0.0"})),
        )
        .await;
    let number = a.body["candidate"]["build"]["number"].as_u64().unwrap();
    // A failing build is still building; failed is final, and a canceled delivery after it
    // changes nothing.
    h.progress("web-release", number, BuildState::Failing).await;
    let rel = h.call("GET", "/projects/web/releases/1.0.0", None).await;
    assert_eq!(s(&rel.body["candidates"][0]["state"]), "building");
    assert_eq!(s(&rel.body["candidates"][0]["build_state"]), "failing");
    h.progress("web-release", number, BuildState::Failed).await;
    h.progress("web-release", number, BuildState::Canceled)
        .await;
    let rel = h.call("GET", "/projects/web/releases/1.0.0", None).await;
    assert_eq!(s(&rel.body["candidates"][0]["state"]), "failed");
    assert_eq!(s(&rel.body["candidates"][0]["build_state"]), "failed");
}

// ---------------------------------------------------------------------------------------------
// Retried builds: Buildkite's latest word wins (docs/releases.md, "Tracking")

/// What only tracking keeps never shows in an answer.
fn assert_no_tracking_fields(record: &Value) {
    assert!(
        record["build"].get("observed").is_none(),
        "the observed version leaked into an answer: {record}"
    );
}

/// A release build fails, its flaky job is retried and passes: the candidate follows it back
/// to `building` and on to `built`, and can be deployed. Late deliveries of the first run, and
/// a repeat of the re-run's, change nothing.
async fn a_retried_release_build(store: Store) {
    let h = Harness::start(store).await;
    h.project().await;
    let cut = h
        .call(
            "POST",
            "/projects/web/releases",
            Some(json!({"commit": SHA, "branch": "main", "version": "2.0.0"})),
        )
        .await;
    assert_eq!(cut.status, StatusCode::CREATED, "{}", cut.body);
    assert_no_tracking_fields(&cut.body["candidate"]);
    let number = cut.body["candidate"]["build"]["number"].as_u64().unwrap();
    let id = s(&cut.body["candidate"]["build"]["id"]).to_string();

    h.progress("web-release", number, BuildState::Running).await;
    let first_running = h.bk.build(ORG, "web-release", number).unwrap();
    h.progress("web-release", number, BuildState::Failed).await;
    let c = h.candidate("2.0.0", 1).await;
    assert_eq!(s(&c["state"]), "failed");
    assert_eq!(
        s(&c["error_message"]),
        format!("build #{number} finished as failed")
    );
    let refused = h.deploy("staging", "2.0.0-rc1").await;
    assert_eq!(
        (refused.status, s(&refused.body["error"])),
        (StatusCode::CONFLICT, "candidate_not_built")
    );

    // The failed job is retried: the same build runs again.
    let first_run = h.retry_job("web-release", number).await;
    let c = h.candidate("2.0.0", 1).await;
    assert_eq!(
        (s(&c["state"]), s(&c["build_state"]), &c["error_message"]),
        ("building", "running", &Value::Null),
        "{c}"
    );
    assert_eq!(s(&c["build"]["id"]), id, "the same build");
    // The first run's `failed`, delivered late while the re-run runs: nothing.
    h.deliver_late(&first_run, WebhookEvent::BuildFinished)
        .await;
    assert_eq!(s(&h.candidate("2.0.0", 1).await["state"]), "building");

    h.finish_again("web-release", number, BuildState::Passed)
        .await;
    let built = h.candidate("2.0.0", 1).await;
    assert_eq!(
        (
            s(&built["state"]),
            s(&built["build_state"]),
            &built["error_message"]
        ),
        ("built", "passed", &Value::Null),
        "{built}"
    );
    assert_no_tracking_fields(&built);

    // Late and repeated deliveries: the first run's `failed` and `running`, the re-run's
    // `running` and `finished` again.
    h.deliver_late(&first_run, WebhookEvent::BuildFinished)
        .await;
    h.deliver_late(&first_running, WebhookEvent::BuildRunning)
        .await;
    h.redeliver("web-release", number, WebhookEvent::BuildFinished)
        .await;
    let mut rerun_running = h.bk.build(ORG, "web-release", number).unwrap();
    rerun_running.state = BuildState::Running;
    rerun_running.finished_at = None;
    h.deliver_late(&rerun_running, WebhookEvent::BuildRunning)
        .await;
    let after = h.candidate("2.0.0", 1).await;
    assert_eq!(after, built, "late deliveries changed the candidate");

    // Built: it deploys.
    let d = h.deployed("staging", "2.0.0-rc1", BuildState::Passed).await;
    assert_eq!(s(&d["status"]), "success", "{d}");
    assert_no_tracking_fields(&d);
    assert_eq!(h.created_builds(), 2, "a retry creates no build");
}

#[tokio::test]
async fn a_retried_release_build_on_sqlite() {
    a_retried_release_build(sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retried_release_build_on_dynamodb() {
    a_retried_release_build(Store::new(kitebridge_tests::dynamodb().await)).await;
}

/// A deploy build fails, is retried and passes: the deployment follows it to `success`, the
/// environment remembers it (promotion and rollback go by it), and the first run's `failed`,
/// delivered late, changes nothing.
async fn a_retried_deploy_build(store: Store) {
    let h = Harness::start(store).await;
    h.project().await;
    let v1 = h.built("3.0.0", SHA).await;
    let v2 = h.built("3.1.0", SHA2).await;
    h.deployed("staging", &v1, BuildState::Passed).await;
    let failed = h.deployed("staging", &v2, BuildState::Failed).await;
    assert_eq!(s(&failed["status"]), "failure");
    assert_eq!(s(&failed["from_candidate_version"]), v1);
    let id = s(&failed["id"]).to_string();
    let number = failed["build"]["number"].as_u64().unwrap();
    assert_eq!(
        s(&h.environment("staging").await["last_successful_candidate_version"]),
        v1
    );

    let first_run = h.retry_job("web-deploy", number).await;
    let d = h.deployment("staging", &id).await;
    assert_eq!(
        (s(&d["status"]), &d["finished_at"], &d["error_message"]),
        ("in_progress", &Value::Null, &Value::Null),
        "{d}"
    );
    // The re-run is Buildkite's, not a deployment kitebridge started: it takes no lock.
    assert_eq!(
        h.environment("staging").await["active_deployment"],
        Value::Null
    );

    h.finish_again("web-deploy", number, BuildState::Passed)
        .await;
    let d = h.deployment("staging", &id).await;
    assert_eq!(s(&d["status"]), "success", "{d}");
    assert!(d["finished_at"].is_string());
    assert_no_tracking_fields(&d);
    h.deliver_late(&first_run, WebhookEvent::BuildFinished)
        .await;
    assert_eq!(
        h.deployment("staging", &id).await,
        d,
        "a late delivery changed it"
    );

    let env = h.environment("staging").await;
    assert_eq!(s(&env["last_successful_candidate_version"]), v2, "{env}");
    assert_eq!(env["successes"], json!([v1, v2]));
    // Promotion counts it, and a rollback after it goes back to what ran before it.
    let prod = h.deploy("production", &v2).await;
    assert_eq!(prod.status, StatusCode::CREATED, "{}", prod.body);
    let r = h
        .call(
            "POST",
            "/projects/web/environments/staging/rollback",
            Some(json!({})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(s(&r.body["candidate_version"]), v1);
}

#[tokio::test]
async fn a_retried_deploy_build_on_sqlite() {
    a_retried_deploy_build(sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retried_deploy_build_on_dynamodb() {
    a_retried_deploy_build(Store::new(kitebridge_tests::dynamodb().await)).await;
}

/// A passed deploy build whose job is retried (`permit_on_passed`) and fails: its success is
/// withdrawn as soon as it runs again, so promotion and rollback no longer count it.
#[tokio::test]
async fn a_passed_deploy_build_retried_to_red_withdraws_its_success() {
    let h = Harness::start(sqlite()).await;
    h.project().await;
    let v1 = h.built("4.0.0", SHA).await;
    let v2 = h.built("4.1.0", SHA2).await;
    h.deployed("staging", &v1, BuildState::Passed).await;
    let ok = h.deployed("staging", &v2, BuildState::Passed).await;
    let id = s(&ok["id"]).to_string();
    let number = ok["build"]["number"].as_u64().unwrap();
    assert_eq!(h.environment("staging").await["successes"], json!([v1, v2]));

    h.retry_job("web-deploy", number).await;
    assert_eq!(
        s(&h.deployment("staging", &id).await["status"]),
        "in_progress"
    );
    assert_eq!(h.environment("staging").await["successes"], json!([v1]));
    let prod = h.deploy("production", &v2).await;
    assert_eq!(
        (prod.status, s(&prod.body["error"])),
        (StatusCode::CONFLICT, "promotion_required")
    );

    h.finish_again("web-deploy", number, BuildState::Failed)
        .await;
    let d = h.deployment("staging", &id).await;
    assert_eq!(s(&d["status"]), "failure", "{d}");
    assert!(s(&d["error_message"]).contains("finished as failed"));
    let env = h.environment("staging").await;
    assert_eq!(s(&env["last_successful_candidate_version"]), v1);
    // After a failure, a rollback goes to the last candidate that succeeded here.
    let r = h
        .call(
            "POST",
            "/projects/web/environments/staging/rollback",
            Some(json!({})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(s(&r.body["candidate_version"]), v1);
}

/// A failed deployment whose build is retried while a newer deployment holds the environment:
/// it follows its build without taking the lock, which stays with the newer one.
#[tokio::test]
async fn a_re_run_leaves_the_environment_to_the_deployment_holding_it() {
    let h = Harness::start(sqlite()).await;
    h.project().await;
    let v1 = h.built("5.0.0", SHA).await;
    let v2 = h.built("5.1.0", SHA2).await;
    let old = h.deployed("staging", &v1, BuildState::Failed).await;
    let old_id = s(&old["id"]).to_string();
    let old_number = old["build"]["number"].as_u64().unwrap();
    let new = h.deploy("staging", &v2).await;
    assert_eq!(new.status, StatusCode::CREATED, "{}", new.body);
    let new_id = s(&new.body["id"]).to_string();
    let new_number = new.body["build"]["number"].as_u64().unwrap();
    h.progress("web-deploy", new_number, BuildState::Running)
        .await;

    h.retry_job("web-deploy", old_number).await;
    assert_eq!(
        s(&h.deployment("staging", &old_id).await["status"]),
        "in_progress"
    );
    h.finish_again("web-deploy", old_number, BuildState::Passed)
        .await;
    assert_eq!(
        s(&h.deployment("staging", &old_id).await["status"]),
        "success"
    );
    let env = h.environment("staging").await;
    assert_eq!(s(&env["active_deployment"]["id"]), new_id, "{env}");
    assert_eq!(env["successes"], json!([v1]));
    let busy = h.deploy("staging", &v1).await;
    assert_eq!(
        (busy.status, s(&busy.body["error"])),
        (StatusCode::CONFLICT, "deployment_in_progress")
    );

    h.progress("web-deploy", new_number, BuildState::Passed)
        .await;
    let env = h.environment("staging").await;
    assert_eq!(env["active_deployment"], Value::Null);
    assert_eq!(env["successes"], json!([v1, v2]));
}

/// A blocked release build that is unblocked still ends `built` (its `running` after the block
/// proves nothing; its end does); a rebuild (a new build, which kitebridge did not create)
/// says nothing about the candidate.
#[tokio::test]
async fn blocked_builds_and_rebuilds_keep_working() {
    let h = Harness::start(sqlite()).await;
    h.project().await;
    let cut = h
        .call(
            "POST",
            "/projects/web/releases",
            Some(json!({"commit": SHA, "branch": "main", "version": "6.0.0"})),
        )
        .await;
    let number = cut.body["candidate"]["build"]["number"].as_u64().unwrap();
    h.progress("web-release", number, BuildState::Running).await;
    h.bk.set_build_state(ORG, "web-release", number, BuildState::Passed);
    h.bk.set_build_blocked(ORG, "web-release", number, true);
    h.redeliver("web-release", number, WebhookEvent::BuildFinished)
        .await;
    assert_eq!(s(&h.candidate("6.0.0", 1).await["state"]), "building");
    // Unblocked: running again (with the first `started_at`), then passed.
    h.bk.set_build_blocked(ORG, "web-release", number, false);
    h.progress("web-release", number, BuildState::Running).await;
    assert_eq!(s(&h.candidate("6.0.0", 1).await["state"]), "building");
    h.bk.update_build(ORG, "web-release", number, |b| {
        b.state = BuildState::Passed;
        b.finished_at = b.started_at.map(|t| t + chrono::Duration::minutes(5));
    });
    h.redeliver("web-release", number, WebhookEvent::BuildFinished)
        .await;
    let built = h.candidate("6.0.0", 1).await;
    assert_eq!(s(&built["state"]), "built", "{built}");

    // A rebuild that fails: a new build, not the candidate's.
    let rebuild = h.bk.add_build(
        kitebridge_fakes::Build::new(ORG, "web-release", SHA, "main")
            .with_state(BuildState::Failed),
    );
    h.redeliver("web-release", rebuild.number, WebhookEvent::BuildFinished)
        .await;
    assert_eq!(h.candidate("6.0.0", 1).await, built);
}

/// `GET /projects`, the overview (which answers what a deploy would), and `DELETE /projects`.
async fn projects_overview_and_delete(store: Store) {
    let h = Harness::start(store).await;
    h.project().await;
    for name in ["api", "zeta"] {
        let a = h
            .call("PUT", &format!("/projects/{name}"), Some(json!({})))
            .await;
        assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    }
    // Paged by name; the cursor is the last name of the page.
    let p1 = h.call("GET", "/projects?per_page=2", None).await;
    assert_eq!(p1.status, StatusCode::OK, "{}", p1.body);
    let names = |b: &Value| -> Vec<String> {
        b["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| s(&p["name"]).to_string())
            .collect()
    };
    assert_eq!(names(&p1.body), ["api", "web"]);
    assert_eq!(s(&p1.body["next_cursor"]), "web");
    assert!(p1.body["items"][1]["created_at"].is_string());
    let p2 = h.call("GET", "/projects?per_page=2&cursor=web", None).await;
    assert_eq!(names(&p2.body), ["zeta"]);
    assert_eq!(p2.body["next_cursor"], Value::Null);
    let bad = h.call("GET", "/projects?cursor=a%20b", None).await;
    assert_eq!(
        (bad.status, s(&bad.body["field"])),
        (StatusCode::BAD_REQUEST, "cursor")
    );

    // The overview: v1 succeeded in staging; production waits for staging to succeed with v2.
    let v1 = h.built("1.0.0", SHA).await;
    let v2 = h.built("1.1.0", SHA2).await;
    h.deployed("staging", &v1, BuildState::Passed).await;
    let o = h.call("GET", "/projects/web/overview", None).await;
    assert_eq!(o.status, StatusCode::OK, "{}", o.body);
    let envs = o.body["environments"].as_array().unwrap();
    let staging = &envs[0];
    assert_eq!(s(&staging["name"]), "staging");
    assert_eq!(s(&staging["current"]["candidate_version"]), v1);
    assert_eq!(staging["previous"], Value::Null);
    assert_eq!(staging["deploying"], Value::Null);
    assert_eq!(staging["candidates"][0]["version"], json!(v2));
    assert_eq!(staging["candidates"][0]["deployable"], json!(true));
    assert_eq!(staging["candidates"].as_array().unwrap().len(), 1);
    let production = &envs[1];
    assert_eq!(s(&production["requires"]), "staging");
    let waiting = &production["candidates"];
    assert_eq!(waiting[0]["version"], json!(v2));
    assert_eq!(s(&waiting[0]["waiting_for"]), "staging");
    assert_eq!(s(&waiting[0]["refusal"]["error"]), "promotion_required");
    assert_eq!(waiting[1]["version"], json!(v1));
    assert_eq!(waiting[1]["deployable"], json!(true));
    // The overview says what a deploy answers.
    let refused = h.deploy("production", &v2).await;
    assert_eq!(
        (refused.status, s(&refused.body["error"])),
        (StatusCode::CONFLICT, "promotion_required")
    );
    assert_eq!(refused.body["message"], waiting[0]["refusal"]["message"]);

    // While v2 deploys to staging: the overview shows it, and the project cannot be deleted.
    let running = h.deploy("staging", &v2).await;
    assert_eq!(running.status, StatusCode::CREATED, "{}", running.body);
    let o = h.call("GET", "/projects/web/overview", None).await;
    let staging = &o.body["environments"][0];
    assert_eq!(s(&staging["deploying"]["id"]), s(&running.body["id"]));
    assert_eq!(
        s(&staging["candidates"][0]["refusal"]["error"]),
        "deployment_in_progress"
    );
    let busy = h.call("DELETE", "/projects/web", None).await;
    assert_eq!(
        (busy.status, s(&busy.body["error"])),
        (StatusCode::CONFLICT, "deployment_in_progress")
    );
    let number = h.bk.created_builds().pop().unwrap().number;
    h.progress("web-deploy", number, BuildState::Passed).await;
    let o = h.call("GET", "/projects/web/overview", None).await;
    let staging = &o.body["environments"][0];
    assert_eq!(s(&staging["current"]["candidate_version"]), v2);
    assert_eq!(s(&staging["previous"]["candidate_version"]), v1);

    // Deleted with every record: gone from the listing, and created again it starts empty.
    let gone = h.call("DELETE", "/projects/web", None).await;
    assert_eq!(gone.status, StatusCode::NO_CONTENT, "{}", gone.body);
    assert_eq!(
        h.call("GET", "/projects/web", None).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        h.call("DELETE", "/projects/web", None).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        names(&h.call("GET", "/projects", None).await.body),
        ["api", "zeta"]
    );
    h.project().await;
    let releases = h.call("GET", "/projects/web/releases", None).await;
    assert_eq!(releases.body["items"], json!([]));
    let deployments = h
        .call(
            "GET",
            "/projects/web/environments/staging/deployments",
            None,
        )
        .await;
    assert_eq!(deployments.body["items"], json!([]));
    let env = h
        .call("GET", "/projects/web/environments/staging", None)
        .await;
    assert_eq!(env.body["successes"], json!([]));
}

#[tokio::test]
async fn projects_overview_and_delete_on_sqlite() {
    projects_overview_and_delete(sqlite()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn projects_overview_and_delete_on_dynamodb() {
    projects_overview_and_delete(Store::new(kitebridge_tests::dynamodb().await)).await;
}
