//! The web dashboard through a real browser: the real `kitebridge serve` against the fake
//! Buildkite and Bitbucket, and Debian's Chromium driven through chromedriver (fantoccini).
//! A release is cut, built, deployed to staging and production, frozen, rolled back by force
//! and unfrozen by clicking through the pages, with a screenshot of each step in
//! `target/screenshots/`. Forged sessions and forms without their CSRF token are refused.
//!
//! The peers are required: a machine without `/usr/bin/chromedriver` fails these tests (run
//! `scripts/test`, which installs Debian's `chromium` and `chromium-driver`).

#[path = "support/browser.rs"]
mod harness;
mod support;

use std::collections::HashMap;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use harness::Browser;
use kitebridge_fakes::*;
use serde_json::{Value, json};

const ORG: &str = DEFAULT_ORGANIZATION;
const WEBHOOK_TOKEN: &str = "whk-browser";
const API_TOKEN: &str = "api-browser-token";
const RELEASE_PIPELINE: &str = "web-release";
const DEPLOY_PIPELINE: &str = "web-deploy";

/// Commits on `main` (made up; 40 hex digits as Bitbucket wants).
const C1: &str = "4e1f0c9b7a2d3e5f6a8b9c0d1e2f3a4b5c6d7e8f";
const C2: &str = "9f8e7d6c5b4a39281706f5e4d3c2b1a098765432";
const C3: &str = "c0ffee00d15ea5e0ba5eba11deadbeef0b5e55ed";

// ---------------------------------------------------------------------------------------------
// The world: fakes, serve, the project

/// A directory for the store, removed when dropped.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("kitebridge-browser-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct World {
    bk: FakeBuildkite,
    _bb: FakeBitbucket,
    serve: Child,
    base: String,
    http: reqwest::Client,
    dir: TempDir,
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = self.serve.kill();
        let _ = self.serve.wait();
    }
}

impl World {
    /// The fakes, `kitebridge serve` on a free loopback port, and the project `web` (built on
    /// `web-release`; staging, then production after staging, deployed with `web-deploy`).
    async fn start() -> World {
        let bk = FakeBuildkite::start(FakeBuildkiteOptions::default()).await;
        let bb = FakeBitbucket::start(FakeBitbucketOptions::default()).await;
        bb.add_repository("PROJ", "web");
        let t0 = chrono::Utc::now() - chrono::Duration::hours(3);
        let hour = chrono::Duration::hours(1);
        bb.add_commits(
            "PROJ",
            "web",
            vec![
                FakeCommit::new(C1, &[], "Add the checkout page", t0),
                FakeCommit::new(C2, &[C1], "Retry declined cards", t0 + hour),
                FakeCommit::new(C3, &[C2], "Show the retry to the customer", t0 + hour * 2),
            ],
        );
        let repo = format!("ssh://git@{}:7999/proj/web.git", bb.addr().ip());
        for (slug, name) in [
            ("web", "Web"),
            (RELEASE_PIPELINE, "Web release"),
            (DEPLOY_PIPELINE, "Web deploy"),
        ] {
            bk.add_pipeline(Pipeline::new(ORG, slug, name, repo.clone()));
        }
        let dir = TempDir::new();
        let vars = [
            ("BUILDKITE_API_URL", bk.url()),
            ("BUILDKITE_API_TOKEN", DEFAULT_BUILDKITE_TOKEN.into()),
            ("BUILDKITE_ORGANIZATION", ORG.into()),
            ("BUILDKITE_WEBHOOK_TOKEN", WEBHOOK_TOKEN.into()),
            ("BITBUCKET_URL", bb.url()),
            ("BITBUCKET_TOKEN", DEFAULT_BITBUCKET_TOKEN.into()),
            ("KITEBRIDGE_API_TOKEN", API_TOKEN.into()),
            ("KITEBRIDGE_DB", dir.0.join("kb.db").display().to_string()),
            ("MONITOR_POLLING_INTERVAL", "1".into()),
            ("KITEBRIDGE_HTTP_TIMEOUT", "2".into()),
        ];
        let (serve, base) = support::spawn_serve(
            Command::new(env!("CARGO_BIN_EXE_kitebridge"))
                .args(["serve", "--listen", "127.0.0.1:0"])
                .env_clear()
                .envs(vars)
                .stderr(std::fs::File::create(dir.0.join("serve.log")).unwrap()),
        );
        let http = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let w = World {
            bk,
            _bb: bb,
            serve,
            base,
            http,
            dir,
        };
        let project = json!({
            "build_pipeline": {"organization": ORG, "pipeline": RELEASE_PIPELINE},
            "version_scheme": "semver",
            "repository": "PROJ/web",
            "environments": [
                {"name": "staging",
                 "deploy_pipeline": {"organization": ORG, "pipeline": DEPLOY_PIPELINE},
                 "env": {"TARGET": "staging"}},
                {"name": "production",
                 "deploy_pipeline": {"organization": ORG, "pipeline": DEPLOY_PIPELINE},
                 "requires": "staging", "env": {"TARGET": "production"}}
            ]
        });
        let (code, body) = w.api("PUT", "/projects/web", Some(project)).await;
        assert!(
            code == 201 || code == 200,
            "PUT /projects/web: {code} {body}"
        );
        w
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// What serve logged so far (for failure messages).
    fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("serve.log")).unwrap_or_default()
    }

    /// One call to the JSON API with the bearer token.
    async fn api(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self
            .http
            .request(method.parse().unwrap(), self.url(path))
            .bearer_auth(API_TOKEN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.unwrap();
        let code = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            code,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// The releases the JSON API lists for `web`.
    async fn releases(&self) -> Vec<Value> {
        let (code, body) = self.api("GET", "/projects/web/releases", None).await;
        assert_eq!(code, 200, "{body}");
        body["items"].as_array().cloned().unwrap_or_default()
    }

    /// Builds kitebridge created on `pipeline`, oldest first.
    fn created(&self, pipeline: &str) -> Vec<Build> {
        self.bk
            .created_builds()
            .into_iter()
            .filter(|b| b.pipeline == pipeline)
            .collect()
    }

    /// Waits until kitebridge has created more than `before` builds on `pipeline`; the newest.
    async fn new_build(&self, pipeline: &str, before: usize) -> Build {
        let deadline = Instant::now() + harness::WAIT;
        loop {
            let builds = self.created(pipeline);
            if builds.len() > before {
                return builds.last().cloned().unwrap();
            }
            assert!(
                Instant::now() < deadline,
                "kitebridge created no new build on {pipeline} (still {before})\n--- serve ---\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Moves build #`number` of `pipeline` to `state` on the fake Buildkite and delivers the
    /// signed webhook it would send.
    async fn progress(&self, pipeline: &str, number: u64, state: BuildState) {
        self.bk
            .set_build_state(ORG, pipeline, number, state)
            .unwrap_or_else(|| panic!("no build #{number} on {pipeline}"));
        let event = match state {
            BuildState::Scheduled => WebhookEvent::BuildScheduled,
            BuildState::Running => WebhookEvent::BuildRunning,
            BuildState::Failing => WebhookEvent::BuildFailing,
            _ => WebhookEvent::BuildFinished,
        };
        let auth = WebhookAuth::Signature {
            token: WEBHOOK_TOKEN.into(),
            timestamp: None,
        };
        let delivery = self
            .bk
            .webhook(ORG, pipeline, number, event, &auth)
            .unwrap();
        let url = self.url(kitebridge::http::webhook::PATH);
        let (code, body) = deliver_webhook(&url, &delivery).await.unwrap();
        assert_eq!(code, 200, "webhook {}: {body}", event.as_str());
    }
}

fn env_of(b: &Build, key: &str) -> String {
    b.env
        .get(key)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("build #{} has no {key}: {:?}", b.number, b.env))
        .to_string()
}

// ---------------------------------------------------------------------------------------------
// Browser steps

/// Marks the current document, clicks `css`, and waits until another document has loaded (a
/// form's POST and its 303 are over).
async fn click_and_load(b: &Browser, css: &str) {
    let el = b.find(css).await;
    b.js("window.__kbOld = true;", vec![]).await;
    el.click()
        .await
        .unwrap_or_else(|e| panic!("clicking {css}: {e}"));
    b.wait_js(
        &format!("a new page has loaded after clicking {css}"),
        "return window.__kbOld === undefined && document.readyState === 'complete';",
        vec![],
    )
    .await;
}

/// Clicks `css` (no page load expected).
async fn click(b: &Browser, css: &str) {
    b.find(css)
        .await
        .click()
        .await
        .unwrap_or_else(|e| panic!("clicking {css}: {e}"));
}

/// Types `value` into the field `css` (cleared first).
async fn fill(b: &Browser, css: &str, value: &str) {
    let el = b.find(css).await;
    el.clear().await.unwrap();
    el.send_keys(value).await.unwrap();
}

fn project_path() -> &'static str {
    "/ui/projects/web"
}

fn env_section(env: &str) -> String {
    format!("section.environment[data-environment=\"{env}\"]")
}

fn waiting(env: &str, candidate: &str) -> String {
    format!(
        "{} li.waiting[data-candidate=\"{candidate}\"]",
        env_section(env)
    )
}

fn release_row(candidate: &str) -> String {
    format!("table#releases tr[data-candidate=\"{candidate}\"]")
}

/// Waits (without reloading) until the candidate's row shows `build` for its build and
/// `state` for itself.
async fn row_shows(b: &Browser, candidate: &str, build: &str, state: &str) {
    let row = release_row(candidate);
    b.wait_js(
        &format!("{candidate}'s row shows build {build}, candidate {state}"),
        "const r = document.querySelector(arguments[0]);
         if (!r) return null;
         const bs = r.querySelector('td.build-state'), cs = r.querySelector('td.candidate-state');
         return bs && cs && bs.textContent.trim() === arguments[1]
             && cs.textContent.trim() === arguments[2];",
        vec![json!(row), json!(build), json!(state)],
    )
    .await;
}

/// Waits until the environment's deploy button for `candidate` is enabled (live refresh).
async fn deploy_enabled(b: &Browser, env: &str, candidate: &str) -> String {
    let css = format!(
        "{} form.deploy button:not([disabled]), {} form.deploy [type=submit]:not([disabled])",
        waiting(env, candidate),
        waiting(env, candidate)
    );
    b.wait_for(&css).await;
    css
}

/// Waits until the environment refuses to deploy `candidate`, for `kind`; the reason shown.
async fn deploy_refused(b: &Browser, env: &str, candidate: &str, kind: &str) -> String {
    let li = waiting(env, candidate);
    let v = b
        .wait_js(
            &format!("{env} refuses {candidate} with {kind}"),
            "const li = document.querySelector(arguments[0]);
             if (!li) return null;
             const button = li.querySelector('button[disabled]');
             const refusal = li.querySelector('.refusal');
             if (!button || !refusal || refusal.dataset.error !== arguments[1]) return null;
             if (li.querySelector('form.deploy button:not([disabled])')) return null;
             return refusal.textContent.trim() || '(empty reason)';",
            vec![json!(li), json!(kind)],
        )
        .await;
    let reason = v.as_str().unwrap().to_string();
    assert_ne!(reason, "(empty reason)", "{li}'s .refusal gives no reason");
    reason
}

/// Cuts a release from `commit` with the form, then checks the flash names the candidate and
/// its row is there, building. Returns the candidate and its build's number.
async fn cut(w: &World, b: &Browser, commit: &str) -> (String, u64) {
    let before = w.created(RELEASE_PIPELINE).len();
    // The form may sit in a closed <details> (the page keeps it folded once something was
    // cut): open it as a person would.
    let folded = b
        .js(
            "const d = document.querySelector('form#cut').closest('details');
             return !!d && !d.open;",
            vec![],
        )
        .await;
    if folded == json!(true) {
        click(b, "details:has(form#cut) > summary").await;
    }
    fill(b, "form#cut input[name=commit]", commit).await;
    fill(b, "form#cut input[name=branch]", "main").await;
    click_and_load(b, "form#cut [type=submit], form#cut button").await;
    let build = w.new_build(RELEASE_PIPELINE, before).await;
    let candidate = env_of(&build, "AVIATOR_RELEASE_CANDIDATE_VERSION");
    b.wait_path(project_path()).await;
    let flash = b.wait_text("#flash.notice", &candidate).await;
    assert!(!flash.is_empty());
    b.wait_for(&release_row(&candidate)).await;
    (candidate, build.number)
}

/// Plays the release build of `candidate` (#`number`): running, then passed, each seen by the
/// page without a reload.
async fn build_passes(w: &World, b: &Browser, candidate: &str, number: u64) {
    w.progress(RELEASE_PIPELINE, number, BuildState::Running)
        .await;
    row_shows(b, candidate, "running", "building").await;
    w.progress(RELEASE_PIPELINE, number, BuildState::Passed)
        .await;
    row_shows(b, candidate, "passed", "built").await;
}

/// Clicks `button` (a deploy form's), checks kitebridge created the deploy build for
/// `candidate` to `env`, plays it to passed, and waits until `env` runs `candidate`.
async fn deploy(w: &World, b: &Browser, button: &str, env: &str, candidate: &str) {
    let before = w.created(DEPLOY_PIPELINE).len();
    click_and_load(b, button).await;
    let build = w.new_build(DEPLOY_PIPELINE, before).await;
    assert_eq!(env_of(&build, "TARGET"), env);
    assert_eq!(
        env_of(&build, "AVIATOR_RELEASE_CANDIDATE_VERSION"),
        candidate
    );
    b.wait_path(project_path()).await;
    w.progress(DEPLOY_PIPELINE, build.number, BuildState::Running)
        .await;
    w.progress(DEPLOY_PIPELINE, build.number, BuildState::Passed)
        .await;
    b.wait_text(&format!("{} .current", env_section(env)), candidate)
        .await;
    b.wait_js(
        &format!("{env} has no deployment running"),
        "return document.querySelector(arguments[0]) === null;",
        vec![json!(format!("{} .deploying", env_section(env)))],
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// The tests

/// The harness alone (chromedriver, a Chromium session, a screenshot) against a page serve
/// has whatever the dashboard does: when this fails, the browser is the problem, not the UI.
#[tokio::test]
async fn the_browser_harness_drives_chromium() {
    let w = World::start().await;
    let b = Browser::start("harness").await;
    b.goto(&w.url("/healthz")).await;
    let text = b.text().await;
    assert!(text.contains("\"status\""), "{text}");
    let shot = b.screenshot("01-healthz").await;
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "{} is no PNG", shot.display());
    b.close().await;
}

#[tokio::test]
async fn a_release_ships_to_staging_and_production_through_the_dashboard() {
    let started = Instant::now();
    let w = World::start().await;
    let b = Browser::start("dashboard").await;

    // Signed out, every page sends to the sign-in page. A wrong token is refused.
    b.goto(&w.url("/ui/")).await;
    b.wait_path("/ui/sign-in").await;
    b.find("form#sign-in input[name=csrf]").await;
    let token = b.find("form#sign-in input#token").await;
    assert_eq!(
        token.attr("type").await.unwrap().as_deref(),
        Some("password")
    );
    assert_eq!(token.attr("name").await.unwrap().as_deref(), Some("token"));
    fill(&b, "input#token", "not-the-token").await;
    click_and_load(&b, "form#sign-in button").await;
    b.wait_for("#flash.error").await;
    b.screenshot("01-sign-in-refused").await;
    fill(&b, "input#token", API_TOKEN).await;
    b.screenshot("01-sign-in").await;
    click_and_load(&b, "form#sign-in button").await;
    b.wait_path("/ui/").await;

    // The projects.
    b.find("header nav a[href=\"/ui/\"]").await;
    b.find("header nav a[href=\"/ui/operator\"]").await;
    b.find("form#sign-out button").await;
    let link = b.find("a[data-project=\"web\"]").await;
    let href = link.attr("href").await.unwrap().unwrap_or_default();
    assert!(href.ends_with("/ui/projects/web"), "{href}");
    b.screenshot("02-projects").await;
    click_and_load(&b, "a[data-project=\"web\"]").await;
    b.wait_path(project_path()).await;
    b.find("form#cut input[name=csrf]").await;
    b.find("form#cut input[name=version]").await;
    b.find(&env_section("staging")).await;
    b.find(&env_section("production")).await;
    for env in ["staging", "production"] {
        b.wait_text(
            &format!("{} .current", env_section(env)),
            "Nothing deployed",
        )
        .await;
    }
    b.screenshot("03-project").await;

    // Cut a release: its row appears, its build scheduled.
    let (rc1, number) = cut(&w, &b, C1).await;
    b.wait_text(
        &format!("{} td.build-state", release_row(&rc1)),
        "scheduled",
    )
    .await;
    let state = b
        .find(&format!("{} td.candidate-state", release_row(&rc1)))
        .await
        .text()
        .await
        .unwrap();
    assert!(
        state == "building" || state == "pending",
        "{rc1} is {state:?} right after the cut"
    );
    let build_link = b
        .find(&format!("{} a.build-link", release_row(&rc1)))
        .await
        .attr("href")
        .await
        .unwrap()
        .unwrap_or_default();
    let build = w.bk.build(ORG, RELEASE_PIPELINE, number).unwrap();
    assert!(
        build_link.contains(&format!("/{RELEASE_PIPELINE}/builds/{number}")),
        "the build link is {build_link:?}, the build {build:?}"
    );
    b.screenshot("04-cut").await;

    // The CI builds it: the page follows by itself (no reload).
    b.js("window.__kbNoReload = true;", vec![]).await;
    build_passes(&w, &b, &rc1, number).await;
    assert_eq!(
        b.js("return window.__kbNoReload === true;", vec![]).await,
        json!(true),
        "the page was reloaded: the live region should have followed the build by itself"
    );
    b.screenshot("05-built").await;

    // Production wants it in staging first; staging takes it.
    let reason = deploy_refused(&b, "production", &rc1, "promotion_required").await;
    println!("production refuses {rc1}: {reason}");
    let button = deploy_enabled(&b, "staging", &rc1).await;
    deploy(&w, &b, &button, "staging", &rc1).await;
    b.screenshot("06-staging").await;

    // Now production takes it.
    let button = deploy_enabled(&b, "production", &rc1).await;
    deploy(&w, &b, &button, "production", &rc1).await;
    b.screenshot("07-production").await;

    // A second candidate to staging (so there is something to roll back), and a third one
    // built but not deployed (so the freeze has a deploy button to disable).
    let (rc2, number) = cut(&w, &b, C2).await;
    build_passes(&w, &b, &rc2, number).await;
    let button = deploy_enabled(&b, "staging", &rc2).await;
    deploy(&w, &b, &button, "staging", &rc2).await;
    let (rc3, number) = cut(&w, &b, C3).await;
    build_passes(&w, &b, &rc3, number).await;
    deploy_enabled(&b, "staging", &rc3).await;
    // The grid as a person finds it (loaded afresh: the cut's message is gone).
    b.goto(&w.url(project_path())).await;
    deploy_enabled(&b, "staging", &rc3).await;
    assert!(!b.exists("#flash").await);
    b.screenshot_full("08-grid").await;
    let overflow = b.on_a_phone("08-grid-phone").await;
    assert!(
        overflow <= 0,
        "on a phone the project page is {overflow} px wider than the screen"
    );

    // What rc3 brings: the one commit since rc2's release, read from Bitbucket.
    click_and_load(
        &b,
        &format!("#releases tr[data-candidate=\"{rc3}\"] a.changelog-link"),
    )
    .await;
    b.wait_for(&format!("#changelog li[data-commit=\"{C3}\"]"))
        .await;
    let listed = b.find_all("#changelog li").await.len();
    assert_eq!(listed, 1, "rc3 brings C3 alone: {}", b.text().await);
    assert!(
        b.text().await.contains("Show the retry"),
        "{}",
        b.text().await
    );
    b.screenshot("08-changelog").await;
    b.goto(&w.url(project_path())).await;

    // Freeze staging from its page.
    let link = format!("{} a.environment-link", env_section("staging"));
    click_and_load(&b, &link).await;
    let env_path = "/ui/projects/web/environments/staging";
    b.wait_path(env_path).await;
    let rows = b.find_all("table#deployments tr[data-deployment]").await;
    assert_eq!(rows.len(), 2, "staging's history: {}", b.text().await);
    // Staging runs rc2; rc3, built, waits to be promoted with the one commit it brings.
    b.find(&format!("#waiting li[data-commit=\"{C3}\"]")).await;
    assert_eq!(
        b.find_all("#waiting li").await.len(),
        1,
        "{}",
        b.text().await
    );
    assert!(
        b.text()
            .await
            .contains(&format!("{rc3} and would bring 1 commit over {rc2}"))
    );
    b.find("form#freeze input[name=csrf]").await;
    fill(
        &b,
        "form#freeze input[name=reason]",
        "Incident 42: payments are down",
    )
    .await;
    click_and_load(&b, "form#freeze button").await;
    b.wait_path(env_path).await;
    b.wait_for("form#unfreeze").await;
    assert!(!b.exists("form#freeze").await, "form#freeze is still shown");
    let text = b.text().await;
    assert!(
        text.contains("Incident 42"),
        "the reason is not shown: {text}"
    );

    b.find(".frozen-badge").await;
    b.screenshot("09-frozen").await;

    // The project page shows it: the badge, and staging's deploy buttons refused.
    click_and_load(&b, "header nav a[href=\"/ui/\"]").await;
    click_and_load(&b, "a[data-project=\"web\"]").await;
    b.wait_path(project_path()).await;
    b.find(&format!("{} .frozen-badge", env_section("staging")))
        .await;
    let reason = deploy_refused(&b, "staging", &rc3, "environment_frozen").await;
    println!("frozen staging refuses {rc3}: {reason}");
    assert!(
        reason.contains("staging is frozen") && !reason.contains("\"force\""),
        "the page words the refusal for a person, not an API caller: {reason}"
    );
    assert!(
        !b.exists(&format!("{} .frozen-badge", env_section("production")))
            .await
    );
    deploy_enabled(&b, "production", &rc2).await;
    b.screenshot("10-frozen-grid").await;
    click_and_load(&b, &link).await;
    b.wait_path(env_path).await;

    // Frozen: the normal rollback is refused; the forced one asks first. (The contract names
    // form#rollback for a rollback that would start; refused, the page shows the disabled
    // button in #rollback, no form.)
    b.wait_for("#rollback button[disabled]").await;
    assert!(
        !b.exists("form#rollback button:not([disabled])").await,
        "a frozen environment offers a normal rollback"
    );
    b.find("#rollback .refusal[data-error=\"environment_frozen\"]")
        .await;
    click_and_load(&b, "a#rollback-force").await;
    b.find("form#confirm-rollback input[name=csrf]").await;
    b.screenshot("11-confirm-rollback").await;
    let before = w.created(DEPLOY_PIPELINE).len();
    click_and_load(
        &b,
        "form#confirm-rollback [type=submit], form#confirm-rollback button",
    )
    .await;
    b.wait_path(env_path).await;
    b.wait_for("#flash.notice").await;
    let rollback = w.new_build(DEPLOY_PIPELINE, before).await;
    assert_eq!(env_of(&rollback, "TARGET"), "staging");
    assert_eq!(env_of(&rollback, "AVIATOR_RELEASE_CANDIDATE_VERSION"), rc1);
    let id = env_of(&rollback, "AVIATOR_DEPLOYMENT_ID");
    w.progress(DEPLOY_PIPELINE, rollback.number, BuildState::Running)
        .await;
    w.progress(DEPLOY_PIPELINE, rollback.number, BuildState::Passed)
        .await;
    // The environment page's history: the rollback, of rc1, succeeded. (Whether this page
    // refreshes itself is not in the contract: reload until it shows.)
    let row = format!("table#deployments tr[data-deployment=\"{id}\"]");
    let deadline = Instant::now() + harness::WAIT;
    loop {
        let done = b
            .js(
                "const r = document.querySelector(arguments[0]);
                 return !!r && r.querySelector('td.status')?.textContent.trim() === 'success'
                     && !!r.querySelector('.candidate')?.textContent.includes(arguments[1]);",
                vec![json!(row), json!(rc1)],
            )
            .await;
        if done == json!(true) {
            break;
        }
        if Instant::now() >= deadline {
            let html = b
                .js(
                    "const r = document.querySelector(arguments[0]); return r ? r.outerHTML : null;",
                    vec![json!(row)],
                )
                .await;
            panic!(
                "staging's history never showed the rollback {id} of {rc1} as success (wanted \
                 {row} with td.status \"success\" and td.candidate holding {rc1}); the row: \
                 {html}\n--- page ---\n{}",
                b.text().await
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        b.client.refresh().await.unwrap();
    }
    let history = b.find("table#deployments").await.text().await.unwrap();
    assert!(
        history.to_lowercase().contains("rollback"),
        "staging's history does not say which deployment is a rollback:\n{history}"
    );
    b.screenshot("12-rolled-back").await;

    // Unfreeze.
    click_and_load(&b, "form#unfreeze button").await;
    b.wait_path(env_path).await;
    b.wait_for("form#freeze").await;
    assert!(!b.exists("form#unfreeze").await);

    // The project page agrees: staging runs rc1 again, no badge, rc3 may go.
    b.goto(&w.url(project_path())).await;
    b.wait_text(&format!("{} .current", env_section("staging")), &rc1)
        .await;
    assert!(
        !b.exists(&format!("{} .frozen-badge", env_section("staging")))
            .await
    );
    deploy_enabled(&b, "staging", &rc3).await;
    b.screenshot("13-unfrozen").await;

    // The operator page.
    click_and_load(&b, "header nav a[href=\"/ui/operator\"]").await;
    b.wait_path("/ui/operator").await;
    let h1 = b.find("h1").await.text().await.unwrap();
    assert!(h1.contains("Operator"), "{h1}");
    b.find("#outbox").await;
    b.find("#poll-cycles").await;
    b.screenshot("14-operator").await;

    // Sign out: the pages send to the sign-in page again.
    click_and_load(&b, "form#sign-out button").await;
    b.goto(&w.url("/ui/")).await;
    b.wait_path("/ui/sign-in").await;
    b.screenshot("15-signed-out").await;
    b.close().await;
    println!(
        "the dashboard story took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------------------------
// Sessions and CSRF, over plain HTTP

/// A tiny cookie jar and HTML reader for the forms, over reqwest (no redirects followed).
struct Agent<'a> {
    w: &'a World,
    cookies: HashMap<String, String>,
}

struct Answer {
    code: u16,
    location: String,
    set_cookies: Vec<String>,
    body: String,
}

impl<'a> Agent<'a> {
    fn new(w: &'a World) -> Agent<'a> {
        Agent {
            w,
            cookies: HashMap::new(),
        }
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    async fn send(&mut self, req: reqwest::RequestBuilder) -> Answer {
        let req = if self.cookies.is_empty() {
            req
        } else {
            req.header("cookie", self.cookie_header())
        };
        let r = req.send().await.unwrap();
        let code = r.status().as_u16();
        let location = r
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let set_cookies: Vec<String> = r
            .headers()
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok().map(String::from))
            .collect();
        for c in &set_cookies {
            let pair = c.split(';').next().unwrap_or_default();
            if let Some((k, v)) = pair.split_once('=') {
                let (k, v) = (k.trim().to_string(), v.trim().to_string());
                let expired = c.to_ascii_lowercase().contains("max-age=0");
                if v.is_empty() || expired {
                    self.cookies.remove(&k);
                } else {
                    self.cookies.insert(k, v);
                }
            }
        }
        let body = r.text().await.unwrap_or_default();
        Answer {
            code,
            location,
            set_cookies,
            body,
        }
    }

    async fn get(&mut self, path: &str) -> Answer {
        let req = self.w.http.get(self.w.url(path));
        self.send(req).await
    }

    async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Answer {
        let body = form
            .iter()
            .map(|(k, v)| format!("{}={}", urlencode(k), urlencode(v)))
            .collect::<Vec<_>>()
            .join("&");
        let req = self
            .w
            .http
            .post(self.w.url(path))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body);
        self.send(req).await
    }

    /// Signs in with the form; the `Set-Cookie` header of `kb_session`.
    async fn sign_in(&mut self) -> String {
        let page = self.get("/ui/sign-in").await;
        assert_eq!(page.code, 200, "{}", page.body);
        let form = form_of(&page.body, "sign-in");
        let csrf = form.csrf.clone().expect("the sign-in form has no csrf");
        let action = form.action.unwrap_or_else(|| "/ui/sign-in".into());
        let a = self
            .post(&action, &[("token", API_TOKEN), ("csrf", &csrf)])
            .await;
        assert_eq!(a.code, 303, "signing in: {} {}", a.code, a.body);
        assert_eq!(a.location, "/ui/", "signing in sends to {:?}", a.location);
        let cookie = a
            .set_cookies
            .iter()
            .find(|c| c.starts_with("kb_session="))
            .cloned()
            .unwrap_or_else(|| panic!("no kb_session cookie set: {:?}", a.set_cookies));
        assert!(self.cookies.contains_key("kb_session"));
        cookie
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// What the test needs of a form in a page: its action and its csrf token.
struct Form {
    action: Option<String>,
    csrf: Option<String>,
}

/// The attribute `name` of the tag `tag` (`<form ...>`), HTML entities for `&` undone.
fn attr(tag: &str, name: &str) -> Option<String> {
    for quote in ['"', '\''] {
        let key = format!("{name}={quote}");
        let mut from = 0;
        while let Some(i) = tag[from..].find(&key) {
            let at = from + i;
            let before = tag[..at].chars().last();
            from = at + key.len();
            if before.is_some_and(|c| c.is_whitespace()) {
                let rest = &tag[from..];
                let end = rest.find(quote)?;
                return Some(rest[..end].replace("&amp;", "&"));
            }
        }
    }
    None
}

/// The form with `id` in `html`.
fn form_of(html: &str, id: &str) -> Form {
    let start = html
        .find(&format!("id=\"{id}\""))
        .and_then(|i| html[..i].rfind("<form"))
        .unwrap_or_else(|| panic!("no form#{id} in:\n{html}"));
    let end = html[start..]
        .find("</form>")
        .map_or(html.len(), |i| start + i);
    let form = &html[start..end];
    let open = &form[..form.find('>').unwrap_or(form.len())];
    let csrf = form
        .match_indices("<input")
        .map(|(i, _)| &form[i..i + form[i..].find('>').unwrap_or(form.len() - i)])
        .find(|input| attr(input, "name").as_deref() == Some("csrf"))
        .and_then(|input| attr(input, "value"));
    Form {
        action: attr(open, "action"),
        csrf,
    }
}

/// `value` with the character at `at` replaced by another of its kind (a digit by a digit,
/// a letter by a letter), so only the check of the signature can tell.
fn tamper(value: &str, at: usize) -> String {
    let mut chars: Vec<char> = value.chars().collect();
    let c = chars[at];
    chars[at] = match c {
        '0'..='8' => (c as u8 + 1) as char,
        '9' => '0',
        'x' => 'Q',
        _ => 'x',
    };
    chars.into_iter().collect()
}

/// Whether a `Location` is the sign-in page (the page may add `?next=` to come back).
fn signs_in(location: &str) -> bool {
    location == "/ui/sign-in" || location.starts_with("/ui/sign-in?")
}

/// What the test calls the parts of a session cookie it changes (by position).
const PART_NAMES: [&str; 5] = [
    "part 1 changed",
    "part 2 changed",
    "part 3 changed",
    "part 4 changed",
    "a later part changed",
];

#[tokio::test]
async fn forged_sessions_and_forms_without_csrf_are_refused() {
    let w = World::start().await;

    // Signing in sets the session cookie, HttpOnly and SameSite=Strict, and not Secure (this
    // is plain http on 127.0.0.1: a Secure cookie would never come back).
    let mut alice = Agent::new(&w);
    let set_cookie = alice.sign_in().await;
    let flags: Vec<String> = set_cookie
        .split(';')
        .skip(1)
        .map(|f| f.trim().to_ascii_lowercase())
        .collect();
    assert!(flags.iter().any(|f| f == "httponly"), "{set_cookie}");
    assert!(flags.iter().any(|f| f == "samesite=strict"), "{set_cookie}");
    assert!(!flags.iter().any(|f| f == "secure"), "{set_cookie}");
    let session = alice.cookies["kb_session"].clone();

    let page = alice.get("/ui/projects/web").await;
    assert_eq!(page.code, 200, "{}", page.body);
    let form = form_of(&page.body, "cut");
    let cut_path = form.action.unwrap_or_else(|| "/ui/projects/web".into());
    let alice_csrf = form.csrf.expect("form#cut has no csrf");

    // Forged sessions: a changed signature (just after the last '.', or the last characters
    // when there is no '.'), a changed payload (the first character), a truncated cookie,
    // and a made-up one.
    // Each '.'-separated part of the value has its first character changed in turn (the
    // last part is the signature when there is one), and the last part is also dropped.
    let mut forged = vec![
        ("truncated", session[..session.len() - 1].to_string()),
        ("made up", "admin".to_string()),
    ];
    let mut at = 0;
    for (i, part) in session.split('.').enumerate() {
        if !part.is_empty() {
            forged.push((
                PART_NAMES[i.min(PART_NAMES.len() - 1)],
                tamper(&session, at),
            ));
        }
        at += part.len() + 1;
    }
    if let Some(i) = session.rfind('.') {
        forged.push(("without its last part", session[..i].to_string()));
    }
    for (what, value) in &forged {
        assert_ne!(value, &session);
        let mut mallory = Agent::new(&w);
        mallory.cookies.insert("kb_session".into(), value.clone());
        let a = mallory.get("/ui/projects/web").await;
        assert!(
            a.code == 303 && signs_in(&a.location),
            "a kb_session cookie {what} ({value}) got {} {:?}: {}",
            a.code,
            a.location,
            a.body
        );
        assert!(!a.body.contains("form id=\"cut\""), "{}", a.body);
        let a = mallory
            .post(
                &cut_path,
                &[("commit", C1), ("branch", "main"), ("csrf", &alice_csrf)],
            )
            .await;
        assert!(
            a.code == 403 || (a.code == 303 && signs_in(&a.location)),
            "a cut POSTed with a kb_session cookie {what} answered {} {:?}: {}",
            a.code,
            a.location,
            a.body
        );
    }
    assert!(w.releases().await.is_empty(), "{:?}", w.releases().await);

    // A signed-in cut without csrf, or with another session's, is refused and cuts nothing.
    let a = alice
        .post(&cut_path, &[("commit", C1), ("branch", "main")])
        .await;
    assert_eq!(a.code, 403, "a cut without csrf: {} {}", a.location, a.body);
    let mut bob = Agent::new(&w);
    bob.sign_in().await;
    assert_ne!(bob.cookies["kb_session"], session);
    let bob_page = bob.get("/ui/projects/web").await;
    let bob_csrf = form_of(&bob_page.body, "cut").csrf.unwrap();
    assert_ne!(bob_csrf, alice_csrf, "two sessions share a csrf token");
    let a = alice
        .post(
            &cut_path,
            &[("commit", C1), ("branch", "main"), ("csrf", &bob_csrf)],
        )
        .await;
    assert_eq!(
        a.code, 403,
        "a cut with another session's csrf: {} {}",
        a.location, a.body
    );
    let a = alice
        .post(
            &cut_path,
            &[("commit", C1), ("branch", "main"), ("csrf", "")],
        )
        .await;
    assert_eq!(a.code, 403, "a cut with an empty csrf: {}", a.body);
    assert!(w.releases().await.is_empty(), "{:?}", w.releases().await);
    assert!(w.created(RELEASE_PIPELINE).is_empty());

    // The control: the same POST with the session's own csrf cuts.
    let a = alice
        .post(
            &cut_path,
            &[("commit", C1), ("branch", "main"), ("csrf", &alice_csrf)],
        )
        .await;
    assert_eq!(a.code, 303, "a proper cut: {}", a.body);
    assert_eq!(w.releases().await.len(), 1);
}
