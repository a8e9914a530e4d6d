//! `kitebridge sandbox`: kitebridge at work with no accounts at all.
//!
//! Starts the SIMULATED Buildkite and Bitbucket servers the tests use (`kitebridge-fakes`, on
//! 127.0.0.1) and the very stack `kitebridge serve` runs (same router, same poll loop, the
//! embedded store in a temporary directory), configured to talk to the simulations. Then it plays
//! a short story through the real interfaces (signed webhooks over HTTP, the releases API over
//! HTTP with the bearer token), checks each step against what the simulations recorded, prints a
//! summary and the addresses to poke at by hand, and stays up until Ctrl-C or SIGTERM (or exits
//! at once with `--exit`, status 1 if any step did not do what it should).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use kitebridge::config::{Config, Role};
use kitebridge::store::{SqliteKv, Store};
use kitebridge_fakes::{
    BuildState, DEFAULT_BITBUCKET_TOKEN, DEFAULT_BUILDKITE_TOKEN, DEFAULT_ORGANIZATION,
    FakeBitbucket, FakeBitbucketOptions, FakeBuildkite, FakeBuildkiteOptions, FakeCommit,
    FakePullRequest, Pipeline, PullRequestState, WebhookAuth, WebhookEvent, deliver_webhook,
};
use serde_json::{Value, json};

/// How `kitebridge sandbox` was asked to run.
pub struct Options {
    pub listen: SocketAddr,
    pub exit: bool,
    pub pace: Duration,
}

const ORG: &str = DEFAULT_ORGANIZATION;
/// Sandbox-only values, printed for the curious: nothing real is protected by them.
const WEBHOOK_TOKEN: &str = "sandbox-webhook-token";
const API_TOKEN: &str = "sandbox-api-token";
/// Short, so the poll loop's safety net shows within seconds.
const POLL_SECS: u64 = 2;
/// How long a step waits for its effect before it counts as not done.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Where builds "link" to: the simulated Buildkite serves no web pages.
const WEB_URL_BASE: &str = "https://simulated-buildkite.invalid";

/// The story's commits on `main` (made up; the simulated Bitbucket needs full SHAs).
const C1: &str = "4e1f0c9b7a2d3e5f6a8b9c0d1e2f3a4b5c6d7e8f";
const C2: &str = "9f8e7d6c5b4a39281706f5e4d3c2b1a098765432";
const C3: &str = "c0ffee00d15ea5e0ba5eba11deadbeef0b5e55ed";

const PIPELINE: &str = "web";
const RELEASE_PIPELINE: &str = "web-release";
const DEPLOY_PIPELINE: &str = "web-deploy";
const PROJECT: &str = "web";
const STEPS: usize = 8;

/// Runs the sandbox until the story is over (`--exit`) or `shutdown` resolves.
pub async fn run(
    opts: Options,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<ExitCode, kitebridge::Error> {
    let mut shutdown = Box::pin(shutdown);
    // Bind first: a busy port is the likeliest problem, and nothing has started yet.
    let (listener, addr) = crate::bind(opts.listen).await.map_err(|e| {
        kitebridge::Error::Startup(format!("{e} (try --listen 127.0.0.1:0 for any free port)"))
    })?;
    let dir = TempDir::new()?;
    let startup = |what: &str, e: std::io::Error| {
        kitebridge::Error::Startup(format!("cannot start the simulated {what}: {e}"))
    };
    let bk = FakeBuildkite::try_start(FakeBuildkiteOptions {
        web_url_base: WEB_URL_BASE.into(),
        ..FakeBuildkiteOptions::default()
    })
    .await
    .map_err(|e| startup("Buildkite", e))?;
    let bb = FakeBitbucket::try_start(FakeBitbucketOptions::default())
        .await
        .map_err(|e| startup("Bitbucket", e))?;

    // The repository and the pipelines that build it. The clone URL's host is the simulated
    // Bitbucket's, which is how kitebridge knows the builds belong to that Bitbucket.
    bb.add_repository("PROJ", "web");
    // The story's commits, one after another on main, and the pull request C2 and C3 came
    // from: what the release's changelog lists.
    let t0 = chrono::Utc::now() - chrono::Duration::hours(3);
    bb.add_commits(
        "PROJ",
        "web",
        vec![
            FakeCommit::new(C1, &[], "Add the checkout page", t0),
            FakeCommit::new(
                C2,
                &[C1],
                "Retry declined cards",
                t0 + chrono::Duration::hours(1),
            ),
            FakeCommit::new(
                C3,
                &[C2],
                "Show the retry to the customer",
                t0 + chrono::Duration::hours(2),
            ),
        ],
    );
    bb.add_pull_request(
        "PROJ",
        "web",
        FakePullRequest {
            id: 42,
            title: "Payments: retry declined cards".into(),
            state: PullRequestState::Merged,
            from_branch: "feature/retry-cards".into(),
            to_branch: "main".into(),
            commits: vec![C2.into(), C3.into()],
        },
    );
    let clone_url = format!("ssh://git@{}:7999/proj/web.git", bb.addr().ip());
    for (slug, name) in [
        (PIPELINE, "Web"),
        (RELEASE_PIPELINE, "Web release"),
        (DEPLOY_PIPELINE, "Web deploy"),
    ] {
        bk.add_pipeline(Pipeline::new(ORG, slug, name, clone_url.clone()));
    }

    let db = dir.path().join("kitebridge.db");
    let config = sandbox_config(&bk, &bb, &db)?;
    kitebridge::telemetry::init(&config.monitor);
    config.require(Role::Serve)?;
    let store = Store::new(SqliteKv::open(&db)?);
    let state = kitebridge::bootstrap::app_state(config, store)?;

    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(crate::serve_on(listener, state, async move {
        let _ = stop_rx.wait_for(|stop| *stop).await;
    }));

    let base = format!("http://{addr}");
    println!("kitebridge sandbox: everything runs on this machine; no account is needed.");
    println!("  SIMULATED Buildkite (not the real one) at {}", bk.url());
    println!(
        "  SIMULATED Bitbucket Data Center 8.19 (not the real one) at {}",
        bb.url()
    );
    println!("kitebridge listening on {base}");
    println!(
        "  the real `kitebridge serve` stack, store {} (deleted on exit)",
        db.display()
    );
    println!(
        "  webhook token {WEBHOOK_TOKEN}, releases API token {API_TOKEN} (sandbox-only values)"
    );
    println!("  poll loop every {POLL_SECS} s");
    println!("  dashboard: {base}/ui/ (sign in with {API_TOKEN})");
    if !addr.ip().is_loopback() {
        println!(
            "  note: {addr} is not a loopback address; anyone who can reach it can use the tokens above"
        );
    }
    if let Some(note) = proxy_note() {
        println!("  note: {note}");
    }

    let mut story = Story::new(&bk, &bb, &base, dir.path(), opts.pace)?;
    let finished = tokio::select! {
        problems = story.play() => Some(problems),
        _ = &mut shutdown => None,
    };
    let last_webhook = story.last_webhook.clone();
    drop(story);

    let code = match finished {
        None => {
            println!("\nInterrupted before the story was over; stopping.");
            if opts.exit {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Some(problems) => {
            print_poke(&base, &bk, &bb, last_webhook.as_deref());
            if problems.is_empty() {
                println!("\nStory: every step did what it should.");
            } else {
                println!(
                    "\nStory: {} step(s) did not do what they should:",
                    problems.len()
                );
                for p in &problems {
                    println!("  - {p}");
                }
            }
            if !opts.exit {
                println!(
                    "\nThe dashboard: open {base}/ui/ and sign in with {API_TOKEN} to cut, deploy and \
                     promote a release with the mouse. From now on the sandbox plays the CI by \
                     itself: every build kitebridge triggers runs and passes within seconds, with \
                     signed webhooks.\nThe sandbox keeps running (the poll loop too): press Ctrl-C to stop."
                );
                tokio::select! {
                    () = play_the_ci(&bk, &base) => {}
                    () = &mut shutdown => {}
                }
                println!("Stopping.");
            }
            if opts.exit && !problems.is_empty() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
    };

    let _ = stop_tx.send(true);
    let served = server
        .await
        .map_err(|e| kitebridge::Error::Startup(format!("server task: {e}")))?;
    bk.shutdown().await;
    bb.shutdown().await;
    let removed = dir.path().display().to_string();
    drop(dir);
    println!("Stopped; removed {removed}.");
    served?;
    Ok(code)
}

/// The configuration `kitebridge serve` would read from its environment, pointing at the
/// simulations. The process environment is only read (for logging settings), never changed.
fn sandbox_config(
    bk: &FakeBuildkite,
    bb: &FakeBitbucket,
    db: &Path,
) -> Result<Config, kitebridge::Error> {
    let mut vars: HashMap<&str, String> = HashMap::from([
        ("BUILDKITE_API_URL", bk.url()),
        ("BUILDKITE_API_TOKEN", DEFAULT_BUILDKITE_TOKEN.to_owned()),
        ("BUILDKITE_ORGANIZATION", ORG.to_owned()),
        ("BUILDKITE_WEBHOOK_TOKEN", WEBHOOK_TOKEN.to_owned()),
        ("BITBUCKET_URL", bb.url()),
        ("BITBUCKET_TOKEN", DEFAULT_BITBUCKET_TOKEN.to_owned()),
        ("KITEBRIDGE_API_TOKEN", API_TOKEN.to_owned()),
        ("KITEBRIDGE_DB", db.display().to_string()),
        ("MONITOR_POLLING_INTERVAL", POLL_SECS.to_string()),
        ("KITEBRIDGE_HTTP_TIMEOUT", "5".to_owned()),
    ]);
    // Logging follows the usual variables; unset, only warnings and errors show (the story is
    // the output).
    for name in ["RUST_LOG", "MONITOR_LOG_LEVEL", "KITEBRIDGE_LOG_FORMAT"] {
        if let Ok(v) = std::env::var(name) {
            vars.insert(name, v);
        }
    }
    Ok(Config::from_lookup(|name| vars.get(name).cloned())?)
}

/// A warning when an HTTP proxy is configured that would also be asked for 127.0.0.1:
/// kitebridge's HTTP client honours the proxy variables, and the proxy cannot reach the
/// simulations on this machine.
fn proxy_note() -> Option<String> {
    let get = |names: [&str; 2]| {
        names
            .iter()
            .find_map(|n| std::env::var(n).ok().filter(|v| !v.trim().is_empty()))
    };
    get(["HTTP_PROXY", "http_proxy"]).or_else(|| get(["ALL_PROXY", "all_proxy"]))?;
    let no_proxy = get(["NO_PROXY", "no_proxy"]).unwrap_or_default();
    if no_proxy
        .split(',')
        .any(|h| matches!(h.trim(), "127.0.0.1" | "*"))
    {
        return None;
    }
    Some(
        "an HTTP proxy is set (HTTP_PROXY/ALL_PROXY) and NO_PROXY does not list 127.0.0.1; \
         if steps time out, run with NO_PROXY=127.0.0.1"
            .into(),
    )
}

/// A directory of its own under the system's temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir, kitebridge::Error> {
        let base = std::env::temp_dir();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let mut last = None;
        for attempt in 0..100u32 {
            let path = base.join(format!(
                "kitebridge-sandbox-{}-{}",
                std::process::id(),
                nanos.wrapping_add(attempt)
            ));
            match std::fs::create_dir(&path) {
                Ok(()) => return Ok(TempDir(path)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => {
                    last = Some(e);
                    break;
                }
            }
        }
        Err(kitebridge::Error::Startup(format!(
            "cannot create a temporary directory in {}: {}",
            base.display(),
            last.map_or_else(|| "unknown error".into(), |e| e.to_string())
        )))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// The story

struct Story<'a> {
    bk: &'a FakeBuildkite,
    bb: &'a FakeBitbucket,
    base: String,
    dir: &'a Path,
    http: reqwest::Client,
    pace: Duration,
    webhooks: usize,
    /// The file holding the last webhook body delivered, for re-sending it by hand.
    last_webhook: Option<PathBuf>,
}

/// A step's verdict: what it showed, or what did not happen.
type StepResult = Result<String, String>;

impl<'a> Story<'a> {
    fn new(
        bk: &'a FakeBuildkite,
        bb: &'a FakeBitbucket,
        base: &str,
        dir: &'a Path,
        pace: Duration,
    ) -> Result<Story<'a>, kitebridge::Error> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| kitebridge::Error::Startup(format!("HTTP client: {e}")))?;
        Ok(Story {
            bk,
            bb,
            base: base.to_owned(),
            dir,
            http,
            pace,
            webhooks: 0,
            last_webhook: None,
        })
    }

    /// Plays every step; returns what went wrong (nothing, if all is well).
    async fn play(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        let r = self.setup().await;
        record(1, r, &mut problems);
        let r = self.failing_build().await;
        record(2, r, &mut problems);
        let r = self.passing_build().await;
        record(3, r, &mut problems);
        let r = self.missed_webhook().await;
        record(4, r, &mut problems);
        let cut = self.release().await;
        let candidate = cut.as_ref().ok().map(|(_, c)| c.clone());
        record(5, cut.map(|(line, _)| line), &mut problems);
        let candidate_shown = candidate.clone();
        let r = match candidate {
            Some(c) => self.deploy(&c).await,
            None => {
                heading(6, "Deploy to staging");
                Err("skipped: there is no built candidate to deploy".into())
            }
        };
        let deployed = r.is_ok();
        record(6, r, &mut problems);
        let r = match (candidate_shown, deployed) {
            (Some(c), true) => self.dashboard(&c).await,
            _ => {
                heading(7, "The dashboard");
                Err("skipped: nothing was deployed to show".into())
            }
        };
        record(7, r, &mut problems);
        self.summary();
        problems
    }

    async fn pause(&self) {
        if !self.pace.is_zero() {
            tokio::time::sleep(self.pace).await;
        }
    }

    // --- steps ----------------------------------------------------------------------------

    async fn setup(&mut self) -> StepResult {
        heading(1, "A repository and the pipelines that build it");
        println!("    SIMULATED Bitbucket: repository PROJ/web");
        let p = self
            .bk
            .pipeline(ORG, PIPELINE)
            .ok_or("pipeline web is missing")?;
        println!(
            "    SIMULATED Buildkite: pipelines {ORG}/{PIPELINE}, {ORG}/{RELEASE_PIPELINE}, \
             {ORG}/{DEPLOY_PIPELINE}, all cloning {}",
            p.repository
        );
        println!(
            "    (the clone URL's host is the simulated Bitbucket's: that is how kitebridge knows \
             where to report)"
        );
        self.pause().await;
        let (code, body) = self.api("GET", "/healthz", None).await?;
        if code != 200 || body["status"] != "ok" {
            return Err(format!("GET /healthz answered {code} {body}"));
        }
        Ok(format!("kitebridge is up: GET /healthz -> {code} {body}"))
    }

    async fn failing_build(&mut self) -> StepResult {
        heading(2, "Build #1 on main is scheduled, runs and fails");
        let b = self.bk.add_build(
            kitebridge_fakes::Build::new(ORG, PIPELINE, C1, "main")
                .with_message("Add the login page"),
        );
        println!(
            "    SIMULATED Buildkite: build #{} of {ORG}/{PIPELINE}, commit {} \"{}\"",
            b.number,
            short(C1),
            b.message
        );
        let key = format!("{ORG}/{PIPELINE}");
        self.deliver(PIPELINE, b.number, WebhookEvent::BuildScheduled)
            .await?;
        self.expect_status(C1, &key, "INPROGRESS").await?;
        self.progress(PIPELINE, b.number, BuildState::Running)
            .await?;
        self.expect_status(C1, &key, "INPROGRESS").await?;
        self.progress(PIPELINE, b.number, BuildState::Failed)
            .await?;
        self.expect_status(C1, &key, "FAILED").await?;
        let states: Vec<String> = self
            .bb
            .history(C1, &key)
            .into_iter()
            .map(|p| p.state)
            .collect();
        let first_failed = states.iter().position(|s| s == "FAILED");
        let in_progress_before = first_failed.is_some_and(|i| {
            states
                .get(..i)
                .is_some_and(|s| s.iter().any(|s| s == "INPROGRESS"))
        });
        if !in_progress_before {
            return Err(format!(
                "expected INPROGRESS then FAILED on {}, Bitbucket received {states:?}",
                short(C1)
            ));
        }
        Ok(format!(
            "commit {}: Bitbucket shows INPROGRESS, then FAILED",
            short(C1)
        ))
    }

    async fn passing_build(&mut self) -> StepResult {
        heading(3, "Build #2, a fix, passes");
        let b = self.bk.add_build(
            kitebridge_fakes::Build::new(ORG, PIPELINE, C2, "main")
                .with_message("Fix the login redirect"),
        );
        println!(
            "    SIMULATED Buildkite: build #{} of {ORG}/{PIPELINE}, commit {} \"{}\"",
            b.number,
            short(C2),
            b.message
        );
        let key = format!("{ORG}/{PIPELINE}");
        self.progress(PIPELINE, b.number, BuildState::Running)
            .await?;
        self.expect_status(C2, &key, "INPROGRESS").await?;
        self.progress(PIPELINE, b.number, BuildState::Passed)
            .await?;
        self.expect_status(C2, &key, "SUCCESSFUL").await?;
        Ok(format!("commit {}: Bitbucket shows SUCCESSFUL", short(C2)))
    }

    async fn missed_webhook(&mut self) -> StepResult {
        heading(4, "A missed webhook: the poll loop is the safety net");
        let b = self.bk.add_build(
            kitebridge_fakes::Build::new(ORG, PIPELINE, C3, "main")
                .with_message("Bump dependencies"),
        );
        self.bk
            .set_build_state(ORG, PIPELINE, b.number, BuildState::Running);
        self.bk
            .set_build_state(ORG, PIPELINE, b.number, BuildState::Passed);
        println!(
            "    SIMULATED Buildkite: build #{} of {ORG}/{PIPELINE}, commit {} \"{}\", ran and \
             passed, but its webhooks were lost (none sent)",
            b.number,
            short(C3),
            b.message
        );
        println!(
            "    waiting for kitebridge's poll loop, which lists recent builds every {POLL_SECS} s ..."
        );
        let started = Instant::now();
        let key = format!("{ORG}/{PIPELINE}");
        let timeout = STEP_TIMEOUT.max(Duration::from_secs(4 * POLL_SECS));
        let bb = self.bb;
        let post = wait_for(
            &format!("the poll loop to report SUCCESSFUL for {}", short(C3)),
            timeout,
            || bb.status(C3, &key).filter(|p| p.state == "SUCCESSFUL"),
        )
        .await?;
        print_post(&post);
        let listings = self
            .bk
            .request_count(&format!("/v2/organizations/{ORG}/builds"));
        Ok(format!(
            "the poll loop found build #{} {:.1} s later and posted SUCCESSFUL ({listings} \
             listings of the simulated Buildkite so far)",
            b.number,
            started.elapsed().as_secs_f64()
        ))
    }

    /// Cuts a release and plays its build; returns the verdict and the built candidate.
    async fn release(&mut self) -> Result<(String, String), String> {
        heading(
            5,
            "A release is cut through the releases API, built by the CI",
        );
        let project = json!({
            "build_pipeline": {"organization": ORG, "pipeline": RELEASE_PIPELINE},
            "version_scheme": "semver",
            "repository": "PROJ/web",
            "environments": [
                {"name": "staging", "deploy_pipeline": {"organization": ORG, "pipeline": DEPLOY_PIPELINE},
                 "env": {"TARGET": "staging"}},
                {"name": "production", "deploy_pipeline": {"organization": ORG, "pipeline": DEPLOY_PIPELINE},
                 "requires": "staging", "env": {"TARGET": "production"}}
            ]
        });
        let path = format!("/projects/{PROJECT}");
        let (code, body) = self.api("PUT", &path, Some(project)).await?;
        if code != 201 && code != 200 {
            return Err(format!("PUT {path} answered {code} {body}"));
        }
        println!(
            "    PUT {path} -> {code}: builds on {ORG}/{RELEASE_PIPELINE}; staging and production \
             (after staging) deploy with {ORG}/{DEPLOY_PIPELINE}"
        );
        self.pause().await;

        let path = format!("/projects/{PROJECT}/releases");
        let (code, body) = self
            .api("POST", &path, Some(json!({"commit": C3, "branch": "main"})))
            .await?;
        if code != 201 {
            return Err(format!("POST {path} answered {code} {body}"));
        }
        let version = text(&body["release"]["version"]);
        let candidate = text(&body["candidate"]["version"]);
        let cut_id = text(&body["release"]["cut_id"]);
        let number = body["candidate"]["build"]["number"]
            .as_u64()
            .ok_or_else(|| format!("the cut has no build: {body}"))?;
        println!(
            "    POST {path} (commit {}) -> {code}: release {version}, candidate {candidate} ({})",
            short(C3),
            text(&body["candidate"]["state"])
        );
        let build = self
            .bk
            .build(ORG, RELEASE_PIPELINE, number)
            .ok_or_else(|| format!("no build #{number} on {ORG}/{RELEASE_PIPELINE}"))?;
        println!(
            "    kitebridge triggered build #{number} on the SIMULATED Buildkite's \
             {ORG}/{RELEASE_PIPELINE}, commit {}, with env:",
            short(&build.commit)
        );
        let env = |k: &str| build.env.get(k).and_then(Value::as_str).unwrap_or("");
        for k in [
            "AVIATOR_RELEASE_CUT_ID",
            "AVIATOR_RELEASE_CANDIDATE_VERSION",
            "AVIATOR_RELEASE_CUT_COMMIT_HASH",
        ] {
            println!("      {k}={}", env(k));
        }
        let expected = [
            ("AVIATOR_RELEASE_CUT_ID", cut_id.as_str()),
            ("AVIATOR_RELEASE_CANDIDATE_VERSION", candidate.as_str()),
            ("AVIATOR_RELEASE_CUT_COMMIT_HASH", C3),
        ];
        for (k, want) in expected {
            if want.is_empty() || env(k) != want {
                return Err(format!("{k} is {:?}, expected {want:?}", env(k)));
            }
        }
        self.pause().await;

        println!("    the sandbox plays the CI: the release build runs and passes");
        self.progress(RELEASE_PIPELINE, number, BuildState::Running)
            .await?;
        self.progress(RELEASE_PIPELINE, number, BuildState::Passed)
            .await?;
        self.expect_status(C3, &format!("{ORG}/{RELEASE_PIPELINE}"), "SUCCESSFUL")
            .await?;
        let path = format!("/projects/{PROJECT}/releases/{version}");
        let c = self
            .api_until(&path, |b| {
                b["candidates"]
                    .as_array()
                    .and_then(|cs| cs.iter().find(|c| c["version"] == candidate.as_str()))
                    .filter(|c| c["state"] == "built")
                    .cloned()
            })
            .await?;
        println!(
            "    GET {path} -> candidate {candidate}: {} (build {})",
            text(&c["state"]),
            text(&c["build_state"])
        );
        let path = format!("/projects/{PROJECT}/releases/{version}/changelog");
        let (code, log) = self.api("GET", &path, None).await?;
        let commits = log["commits"].as_array().cloned().unwrap_or_default();
        if code != 200 || commits.len() != 3 {
            return Err(format!("GET {path} answered {code} {log}"));
        }
        println!(
            "    GET {path} -> {} commits, read from the SIMULATED Bitbucket (the project's first \
             release, so the commit's whole history):",
            commits.len()
        );
        for c in &commits {
            let prs: Vec<String> = c["pull_requests"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| format!("#{} {}", p["id"], text(&p["title"])))
                .collect();
            println!(
                "      {} {:<32} {}",
                short(c["id"].as_str().unwrap_or_default()),
                text(&c["summary"]),
                prs.join(", ")
            );
        }
        Ok((
            format!("release {version}: candidate {candidate} is built"),
            candidate,
        ))
    }

    async fn deploy(&mut self, candidate: &str) -> StepResult {
        heading(6, "Deploy the candidate to staging through the API");
        let path = format!("/projects/{PROJECT}/environments/staging/deployments");
        let (code, body) = self
            .api(
                "POST",
                &path,
                Some(json!({"release_candidate_version": candidate})),
            )
            .await?;
        if code != 201 {
            return Err(format!("POST {path} answered {code} {body}"));
        }
        let id = text(&body["id"]);
        let number = body["build"]["number"]
            .as_u64()
            .ok_or_else(|| format!("the deployment has no build: {body}"))?;
        println!(
            "    POST {path} ({candidate}) -> {code}: deployment {id} ({})",
            text(&body["status"])
        );
        let build = self
            .bk
            .build(ORG, DEPLOY_PIPELINE, number)
            .ok_or_else(|| format!("no build #{number} on {ORG}/{DEPLOY_PIPELINE}"))?;
        println!(
            "    kitebridge triggered build #{number} on the SIMULATED Buildkite's \
             {ORG}/{DEPLOY_PIPELINE} with env:"
        );
        let env = |k: &str| build.env.get(k).and_then(Value::as_str).unwrap_or("");
        for k in [
            "AVIATOR_DEPLOYMENT_ID",
            "AVIATOR_RELEASE_CANDIDATE_VERSION",
            "TARGET",
        ] {
            println!("      {k}={}", env(k));
        }
        if id.is_empty() || env("AVIATOR_DEPLOYMENT_ID") != id {
            return Err(format!(
                "AVIATOR_DEPLOYMENT_ID is {:?}, expected {id:?}",
                env("AVIATOR_DEPLOYMENT_ID")
            ));
        }
        if env("AVIATOR_RELEASE_CANDIDATE_VERSION") != candidate {
            return Err(format!(
                "AVIATOR_RELEASE_CANDIDATE_VERSION is {:?}, expected {candidate:?}",
                env("AVIATOR_RELEASE_CANDIDATE_VERSION")
            ));
        }
        self.pause().await;

        println!("    the sandbox plays the CI: the deploy build runs and passes");
        self.progress(DEPLOY_PIPELINE, number, BuildState::Running)
            .await?;
        self.progress(DEPLOY_PIPELINE, number, BuildState::Passed)
            .await?;
        let path = format!("{path}/{id}");
        let d = self
            .api_until(&path, |b| (b["status"] == "success").then(|| b.clone()))
            .await?;
        println!(
            "    GET {path} -> {} (finished {})",
            text(&d["status"]),
            text(&d["finished_at"])
        );
        Ok(format!(
            "deployment {id} of {candidate} to staging succeeded"
        ))
    }

    /// Signs in to the dashboard as a browser does and reads the project's page: staging runs
    /// the candidate, and production offers to deploy it (promotion order satisfied).
    async fn dashboard(&mut self, candidate: &str) -> StepResult {
        heading(7, "The dashboard shows what runs where");
        let browser = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| e.to_string())?;
        let url = |p: &str| format!("{}{p}", self.base);
        let fail = |what: &str, e: reqwest::Error| format!("{what}: {e}");
        let page = browser
            .get(url("/ui/sign-in"))
            .send()
            .await
            .map_err(|e| fail("GET /ui/sign-in", e))?;
        let pre = set_cookie_pair(&page, "kb_pre")?;
        let html = page.text().await.map_err(|e| fail("GET /ui/sign-in", e))?;
        let csrf = csrf_of(&html)?;
        let signed = browser
            .post(url("/ui/sign-in"))
            .header("cookie", &pre)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!(
                "csrf={csrf}&token={API_TOKEN}&next=%2Fui%2Fprojects%2F{PROJECT}"
            ))
            .send()
            .await
            .map_err(|e| fail("POST /ui/sign-in", e))?;
        if signed.status() != 303 {
            return Err(format!("POST /ui/sign-in answered {}", signed.status()));
        }
        let session = set_cookie_pair(&signed, "kb_session")?;
        println!(
            "    POST /ui/sign-in with the API token -> 303 and a session cookie (HttpOnly, \
             SameSite=Strict)"
        );
        let path = format!("/ui/projects/{PROJECT}");
        let page = browser
            .get(url(&path))
            .header("cookie", &session)
            .send()
            .await
            .map_err(|e| fail(&path, e))?;
        let code = page.status();
        let html = page.text().await.map_err(|e| fail(&path, e))?;
        if code != 200 {
            return Err(format!("GET {path} answered {code}"));
        }
        let staging = section(&html, "staging")?;
        let production = section(&html, "production")?;
        if !staging.contains(&format!("<strong>{candidate}</strong>")) {
            return Err(format!(
                "staging's card does not show {candidate} running:\n{staging}"
            ));
        }
        let offered = format!("data-candidate=\"{candidate}\"");
        if !(production.contains(&offered) && production.contains("class=\"deploy\"")) {
            return Err(format!(
                "production's card does not offer to deploy {candidate}:\n{production}"
            ));
        }
        println!(
            "    GET {path} -> staging runs {candidate}; production offers to deploy it \
             (staging succeeded, so the promotion order allows it)"
        );
        println!(
            "    open {}/ui/ in a browser to do the rest with the mouse",
            self.base
        );
        Ok(format!(
            "the dashboard shows {candidate} in staging, ready for production"
        ))
    }

    fn summary(&self) {
        heading(STEPS, "What kitebridge did");
        let posts = self.bb.posts();
        println!(
            "    Statuses kitebridge posted to the SIMULATED Bitbucket ({}):",
            posts.len()
        );
        println!("      {:<8} {:<22} {:<11} name", "commit", "key", "state");
        for p in &posts {
            println!(
                "      {:<8} {:<22} {:<11} {}",
                short(&p.commit),
                p.key,
                p.state,
                p.name.as_deref().unwrap_or("")
            );
        }
        let created = self.bk.created_builds();
        println!(
            "    Builds kitebridge triggered on the SIMULATED Buildkite ({}):",
            created.len()
        );
        for b in &created {
            let env = |k: &str| b.env.get(k).and_then(Value::as_str).map(str::to_owned);
            let what = env("AVIATOR_DEPLOYMENT_ID")
                .map(|id| format!("AVIATOR_DEPLOYMENT_ID={id}"))
                .or_else(|| {
                    env("AVIATOR_RELEASE_CANDIDATE_VERSION")
                        .map(|v| format!("AVIATOR_RELEASE_CANDIDATE_VERSION={v}"))
                })
                .unwrap_or_default();
            println!(
                "      {:<22} #{:<3} commit {}  {what}",
                format!("{}/{}", b.org, b.pipeline),
                b.number,
                short(&b.commit)
            );
        }
        println!(
            "    Webhooks the sandbox delivered (signed): {}; requests kitebridge made: {} to the \
             SIMULATED Buildkite, {} to the SIMULATED Bitbucket",
            self.webhooks,
            self.bk.requests().len(),
            self.bb.requests().len()
        );
    }

    // --- helpers --------------------------------------------------------------------------

    /// Moves a build to `state` on the simulated Buildkite and delivers the matching webhook.
    async fn progress(
        &mut self,
        pipeline: &str,
        number: u64,
        state: BuildState,
    ) -> Result<(), String> {
        self.bk
            .set_build_state(ORG, pipeline, number, state)
            .ok_or_else(|| format!("no build #{number} on {ORG}/{pipeline}"))?;
        let event = match state {
            BuildState::Scheduled => WebhookEvent::BuildScheduled,
            BuildState::Running => WebhookEvent::BuildRunning,
            BuildState::Failing => WebhookEvent::BuildFailing,
            _ => WebhookEvent::BuildFinished,
        };
        self.deliver(pipeline, number, event).await
    }

    /// Delivers the signed webhook the simulated Buildkite would send now about a build to
    /// kitebridge's webhook route, and prints kitebridge's answer.
    async fn deliver(
        &mut self,
        pipeline: &str,
        number: u64,
        event: WebhookEvent,
    ) -> Result<(), String> {
        let auth = WebhookAuth::Signature {
            token: WEBHOOK_TOKEN.into(),
            timestamp: None,
        };
        let delivery = self
            .bk
            .webhook(ORG, pipeline, number, event, &auth)
            .ok_or_else(|| format!("no build #{number} on {ORG}/{pipeline}"))?;
        let url = format!("{}{}", self.base, kitebridge::http::webhook::PATH);
        let (code, body) = deliver_webhook(&url, &delivery)
            .await
            .map_err(|e| format!("delivering {} failed: {e}", event.as_str()))?;
        self.webhooks += 1;
        let file = self.dir.join("last-webhook.json");
        if std::fs::write(&file, &delivery.body).is_ok() {
            self.last_webhook = Some(file);
        }
        let answer: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        let said = match (answer["status"].as_str(), answer["state"].as_str()) {
            (Some(s), Some(state)) => format!("{s} {state}"),
            (Some(s), None) => s.to_owned(),
            _ => body.chars().take(200).collect(),
        };
        println!(
            "    SIMULATED Buildkite -> signed webhook {} ({pipeline} #{number}) -> kitebridge \
             answered {code}: {said}",
            event.as_str()
        );
        self.pause().await;
        if code != 200 {
            return Err(format!(
                "kitebridge answered {code} to {}: {body}",
                event.as_str()
            ));
        }
        Ok(())
    }

    /// Waits until the simulated Bitbucket's current status for `key` on `commit` is `state`,
    /// then prints the post that made it so.
    async fn expect_status(&self, commit: &str, key: &str, state: &str) -> Result<(), String> {
        let bb = self.bb;
        wait_for(
            &format!(
                "the simulated Bitbucket to show {state} for {key} on {}",
                short(commit)
            ),
            STEP_TIMEOUT,
            || bb.status(commit, key).filter(|p| p.state == state),
        )
        .await?;
        // The newest post for the key (a running build's post replaces the scheduled one's).
        if let Some(p) = bb.history(commit, key).pop() {
            print_post(&p);
        }
        Ok(())
    }

    /// One call to kitebridge's HTTP API, with the bearer token; the answer as JSON.
    async fn api(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value), String> {
        let method = reqwest::Method::from_bytes(method.as_bytes())
            .map_err(|e| format!("method {method}: {e}"))?;
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(API_TOKEN);
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let resp = req
            .send()
            .await
            .map_err(|e| format!("{method} {path}: {e}"))?;
        let code = resp.status().as_u16();
        let text = resp
            .text()
            .await
            .map_err(|e| format!("{method} {path}: {e}"))?;
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((code, value))
    }

    /// GETs `path` until `done` picks something out of a 200 answer (or the step times out).
    async fn api_until(
        &self,
        path: &str,
        done: impl Fn(&Value) -> Option<Value>,
    ) -> Result<Value, String> {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let (code, body) = self.api("GET", path, None).await?;
            if code == 200
                && let Some(v) = done(&body)
            {
                return Ok(v);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "after {} s, GET {path} still answers {code} {body}",
                    STEP_TIMEOUT.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Prints a step's verdict and keeps what went wrong.
fn record(n: usize, r: StepResult, problems: &mut Vec<String>) {
    match r {
        Ok(line) => println!("  [ok] {line}"),
        Err(e) => {
            println!("  [not as expected] {e}");
            problems.push(format!("step {n}: {e}"));
        }
    }
}

/// `name=value` of the cookie an answer sets.
fn set_cookie_pair(r: &reqwest::Response, name: &str) -> Result<String, String> {
    r.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with(&format!("{name}=")))
        .and_then(|c| c.split(';').next())
        .map(str::to_owned)
        .ok_or_else(|| format!("no {name} cookie was set"))
}

/// The CSRF token of the first form in a page.
fn csrf_of(html: &str) -> Result<String, String> {
    let key = "name=\"csrf\" value=\"";
    let at = html
        .find(key)
        .ok_or("the page has no form with a CSRF token")?
        + key.len();
    let end = html[at..].find('"').ok_or("a CSRF token without its end")?;
    Ok(html[at..at + end].to_string())
}

/// The HTML of an environment's card on the project page.
fn section<'a>(html: &'a str, environment: &str) -> Result<&'a str, String> {
    let start = html
        .find(&format!("data-environment=\"{environment}\""))
        .ok_or_else(|| format!("the page has no `{environment}` card"))?;
    let end = html[start..]
        .find("</section>")
        .map_or(html.len(), |e| start + e);
    Ok(&html[start..end])
}

fn heading(n: usize, title: &str) {
    println!("\n[{n}/{STEPS}] {title}");
}

fn print_post(p: &kitebridge_fakes::PostedStatus) {
    println!(
        "    SIMULATED Bitbucket received: {:<10} key={} name={:?} url={}",
        p.state,
        p.key,
        p.name.as_deref().unwrap_or(""),
        p.url
    );
}

/// Polls `f` until it returns something, for at most `timeout`.
async fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "waited {} s for {what}, in vain",
                timeout.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn short(sha: &str) -> &str {
    sha.get(..7).unwrap_or(sha)
}

fn text(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_owned()
}

/// After the story, every build kitebridge triggers on the simulated Buildkite moves one step
/// per second (scheduled, running, passed), each step delivered to kitebridge as Buildkite's
/// signed webhook, so cuts and deployments made from the dashboard or the API finish by
/// themselves.
async fn play_the_ci(bk: &FakeBuildkite, base: &str) {
    let url = format!("{base}{}", kitebridge::http::webhook::PATH);
    let auth = WebhookAuth::Signature {
        token: WEBHOOK_TOKEN.into(),
        timestamp: None,
    };
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        for b in bk.created_builds() {
            let (next, event) = match b.state {
                BuildState::Creating | BuildState::Scheduled => {
                    (BuildState::Running, WebhookEvent::BuildRunning)
                }
                BuildState::Running => (BuildState::Passed, WebhookEvent::BuildFinished),
                _ => continue,
            };
            if bk
                .set_build_state(&b.org, &b.pipeline, b.number, next)
                .is_none()
            {
                continue;
            }
            let Some(delivery) = bk.webhook(&b.org, &b.pipeline, b.number, event, &auth) else {
                continue;
            };
            match deliver_webhook(&url, &delivery).await {
                Ok((code, _)) => println!(
                    "  the sandbox plays the CI: {}/{} #{} {} (kitebridge answered {code})",
                    b.org,
                    b.pipeline,
                    b.number,
                    event.as_str()
                ),
                Err(e) => println!(
                    "  the sandbox plays the CI: delivering {} failed: {e}",
                    event.as_str()
                ),
            }
        }
    }
}

/// The addresses, and commands to paste.
fn print_poke(base: &str, bk: &FakeBuildkite, bb: &FakeBitbucket, last_webhook: Option<&Path>) {
    let auth = format!("-H 'Authorization: Bearer {API_TOKEN}'");
    println!("\nPoke at it by hand (the tokens are sandbox-only values):");
    println!("  kitebridge ({base}):");
    println!("    the dashboard: open {base}/ui/ in a browser, sign in with {API_TOKEN}");
    println!("    curl -s {base}/healthz");
    println!("    curl -s {auth} {base}/projects/{PROJECT}/releases");
    println!("    curl -s {auth} {base}/projects/{PROJECT}/environments/staging/deployments");
    println!(
        "    curl -sX POST {auth} {base}/projects/{PROJECT}/releases -d '{{\"commit\": \"{C3}\", \"branch\": \"main\"}}'"
    );
    println!(
        "      (cuts the next version; the sandbox then plays its build on the SIMULATED Buildkite)"
    );
    if let Some(file) = last_webhook {
        println!(
            "    # re-send the last webhook (token mode; kitebridge answers already_reported):"
        );
        println!(
            "    curl -s -H 'X-Buildkite-Event: build.finished' -H 'X-Buildkite-Token: {WEBHOOK_TOKEN}' \
             -H 'Content-Type: application/json' --data-binary @{} {base}{}",
            file.display(),
            kitebridge::http::webhook::PATH
        );
    }
    println!("  SIMULATED Bitbucket ({}), build #2's commit:", bb.url());
    println!(
        "    curl -s -H 'Authorization: Bearer {DEFAULT_BITBUCKET_TOKEN}' '{}/rest/api/latest/projects/PROJ/repos/web/commits/{C2}/builds?key={ORG}/{PIPELINE}'",
        bb.url()
    );
    println!("  SIMULATED Buildkite ({}), the builds:", bk.url());
    println!(
        "    curl -s -H 'Authorization: Bearer {DEFAULT_BUILDKITE_TOKEN}' '{}/v2/organizations/{ORG}/builds?per_page=10'",
        bk.url()
    );
}
