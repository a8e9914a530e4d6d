//! Poll-and-report end to end: the real poll cycle against fake Buildkite and Bitbucket servers
//! that enforce the APIs' rules, with faults injected. After the faults stop, every build's
//! latest state is on its commit, and nothing was posted twice.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use kitebridge::poll::Poller;
use kitebridge::store::{CursorStore, SqliteKv, Store, StoreError, Versioned};
use kitebridge_fakes::*;
use kitebridge_tests::harness::{self, ORG, clone_url, sha};

struct World {
    bk: FakeBuildkite,
    bb: FakeBitbucket,
    vars: HashMap<String, String>,
}

async fn world(flavour: BitbucketFlavour) -> World {
    let bk = FakeBuildkite::start(FakeBuildkiteOptions::default()).await;
    let bb = FakeBitbucket::start(FakeBitbucketOptions::with_flavour(flavour)).await;
    bb.add_repository("PROJ", "web");
    bb.add_repository("PROJ", "api");
    bb.add_repository("acme", "web"); // the Cloud workspace
    bk.add_pipeline(Pipeline::new(
        ORG,
        "web",
        "Web",
        clone_url(&bb, "PROJ", "web"),
    ));
    bk.add_pipeline(Pipeline::new(
        ORG,
        "api",
        "API",
        clone_url(&bb, "PROJ", "api"),
    ));
    bk.add_pipeline(Pipeline::new(
        ORG,
        "elsewhere",
        "Elsewhere",
        "git@github.com:acme/elsewhere.git",
    ));
    let vars = harness::env(&bk, &bb);
    World { bk, bb, vars }
}

fn data_center() -> BitbucketFlavour {
    BitbucketFlavour::DataCenter {
        version: "8.19.0".into(),
        cancelled_status: true,
    }
}

fn poller(w: &World) -> Poller {
    harness::app(&w.vars).poller.expect("poller configured")
}

fn key(pipeline: &str) -> String {
    format!("{ORG}/{pipeline}")
}

fn state_on(w: &World, commit: &str, pipeline: &str) -> Option<String> {
    w.bb.status(commit, &key(pipeline)).map(|s| s.state)
}

#[tokio::test]
async fn every_state_lands_on_its_commit_and_skips_are_not_posted() {
    let w = world(data_center()).await;
    let cases = [
        (1, BuildState::Scheduled, false, "INPROGRESS"),
        (2, BuildState::Running, false, "INPROGRESS"),
        (3, BuildState::Failing, false, "FAILED"),
        (4, BuildState::Passed, false, "SUCCESSFUL"),
        (5, BuildState::Passed, true, "FAILED"), // blocked is not a success
        (6, BuildState::Failed, false, "FAILED"),
        (7, BuildState::Canceled, false, "CANCELLED"),
        (8, BuildState::Canceling, false, "CANCELLED"),
        (9, BuildState::Skipped, false, "CANCELLED"),
        (10, BuildState::NotRun, false, "CANCELLED"),
        (11, BuildState::Creating, false, "INPROGRESS"),
    ];
    for (n, state, blocked, _) in cases {
        w.bk.add_build(
            Build::new(ORG, "web", sha(n), "main")
                .with_state(state)
                .with_blocked(blocked),
        );
    }
    // Not reported: a commit that is not a full SHA, and a pipeline whose repository is not on
    // this Bitbucket.
    w.bk.add_build(Build::new(ORG, "web", "HEAD", "main").with_state(BuildState::Passed));
    w.bk.add_build(Build::new(ORG, "elsewhere", sha(99), "main").with_state(BuildState::Passed));

    let summary = poller(&w).cycle().await.expect("cycle succeeds");
    for (n, state, blocked, expected) in cases {
        assert_eq!(
            state_on(&w, &sha(n), "web").as_deref(),
            Some(expected),
            "{state:?} (blocked: {blocked})"
        );
    }
    assert_eq!(w.bb.statuses_for_commit(&sha(99)).len(), 0);
    assert_eq!(summary.builds_seen, 13);
    assert_eq!(summary.skipped, 2);
    assert_eq!(summary.reported.posted, 11);
    assert_eq!(w.bb.posts().len(), 11, "one post per build");

    // The status fields follow the API's rules (the fake refuses anything else) and say what
    // a person needs: pipeline and number, a link to the build.
    let s = w.bb.status(&sha(4), &key("web")).unwrap();
    assert!(s.name.as_deref().unwrap_or("").contains("Web #"), "{s:?}");
    assert!(
        s.url
            .starts_with("https://buildkite.com/acme-inc/web/builds/"),
        "{}",
        s.url
    );
    assert_eq!(s.body["ref"], "refs/heads/main");
    assert_eq!(s.body["parent"], key("web"));
}

#[tokio::test]
async fn every_page_is_read_and_an_idle_cycle_costs_one_request_per_filter() {
    let w = world(data_center()).await;
    // Builds from a while ago (outside the cursor's overlap), so the second cycle is truly idle.
    let then = Utc::now() - chrono::Duration::minutes(30);
    for n in 0..250u64 {
        w.bk.add_build(
            Build::new(
                ORG,
                if n % 2 == 0 { "web" } else { "api" },
                sha(n + 1),
                "main",
            )
            .with_state(BuildState::Passed)
            .with_created_at(then + chrono::Duration::seconds(n as i64))
            .with_finished_at(then + chrono::Duration::seconds(n as i64 + 60)),
        );
    }
    let p = poller(&w);
    let summary = p.cycle().await.unwrap();
    assert_eq!(summary.reported.posted, 250);
    assert!(summary.pages >= 3, "pages: {}", summary.pages);
    for n in 0..250u64 {
        let pipeline = if n % 2 == 0 { "web" } else { "api" };
        assert_eq!(
            state_on(&w, &sha(n + 1), pipeline).as_deref(),
            Some("SUCCESSFUL"),
            "build {n}"
        );
    }

    // Nothing changed: one listing request per filter (created, finished), nothing to Bitbucket.
    w.bk.clear_requests();
    w.bb.clear_requests();
    let summary = p.cycle().await.unwrap();
    assert_eq!(summary.reported.posted, 0);
    assert_eq!(w.bk.requests().len(), 2, "{:?}", w.bk.requests());
    assert_eq!(w.bb.requests().len(), 0, "{:?}", w.bb.requests());
}

#[tokio::test]
async fn later_states_are_reported_by_later_cycles_and_never_regress() {
    let w = world(data_center()).await;
    let b =
        w.bk.add_build(Build::new(ORG, "web", sha(1), "main").with_state(BuildState::Running));
    let p = poller(&w);
    p.cycle().await.unwrap();
    assert_eq!(state_on(&w, &sha(1), "web").as_deref(), Some("INPROGRESS"));

    // Finishes after the cursor moved past its creation: the "finished" listing finds it.
    // Move the cursor to after the build's creation so only that listing can see it.
    w.bk.set_build_state(ORG, "web", b.number, BuildState::Passed);
    p.cycle().await.unwrap();
    assert_eq!(state_on(&w, &sha(1), "web").as_deref(), Some("SUCCESSFUL"));

    // A rebuild on the same commit replaces the status (same key); the older build finishing
    // late does not bring its state back.
    let rebuild =
        w.bk.add_build(Build::new(ORG, "web", sha(1), "main").with_state(BuildState::Running));
    p.cycle().await.unwrap();
    assert_eq!(state_on(&w, &sha(1), "web").as_deref(), Some("INPROGRESS"));
    w.bk.set_build_state(ORG, "web", rebuild.number, BuildState::Failed);
    w.bk.set_build_state(ORG, "web", b.number, BuildState::Passed);
    p.cycle().await.unwrap();
    assert_eq!(state_on(&w, &sha(1), "web").as_deref(), Some("FAILED"));
    let states: Vec<String> =
        w.bb.history(&sha(1), &key("web"))
            .into_iter()
            .map(|s| s.state)
            .collect();
    assert_eq!(
        states,
        vec!["INPROGRESS", "SUCCESSFUL", "INPROGRESS", "FAILED"]
    );
}

/// A first cycle finds many commits each built twice (a build and its rebuild, listed on the
/// same pages and reported many at a time): only the rebuild's state is ever posted, never the
/// superseded one, not even for a moment before it.
#[tokio::test]
async fn a_rebuild_listed_with_the_build_it_replaced_is_the_only_state_posted() {
    let w = world(data_center()).await;
    let commits = 150u64;
    for n in 1..=commits {
        w.bk.add_build(Build::new(ORG, "web", sha(n), "main").with_state(BuildState::Failed));
    }
    for n in 1..=commits {
        w.bk.add_build(Build::new(ORG, "web", sha(n), "main").with_state(BuildState::Passed));
    }
    let summary = poller(&w).cycle().await.unwrap();
    assert_eq!(summary.reported.posted, commits, "{summary:?}");
    for n in 1..=commits {
        let states: Vec<String> =
            w.bb.history(&sha(n), &key("web"))
                .into_iter()
                .map(|s| s.state)
                .collect();
        assert_eq!(states, ["SUCCESSFUL"], "commit {n}");
    }
}

/// A job retried in a build that had finished, after the cursor moved past it: the
/// `finished_from` listing finds it finishing again, and its new end replaces the old one, red
/// to green and green to red.
#[tokio::test]
async fn a_build_that_finished_again_is_reported_again() {
    let w = world(data_center()).await;
    let old = Utc::now() - chrono::Duration::minutes(10);
    let b = w.bk.add_build(
        Build::new(ORG, "web", sha(1), "main")
            .with_state(BuildState::Failed)
            .with_created_at(old),
    );
    let p = poller(&w);
    p.cycle().await.unwrap();
    assert_eq!(state_on(&w, &sha(1), "web").as_deref(), Some("FAILED"));

    for (state, word) in [
        (BuildState::Passed, "SUCCESSFUL"),
        (BuildState::Failed, "FAILED"),
    ] {
        // Retried: runs again, then ends again (a newer `finished_at`) before the next cycle.
        tokio::time::sleep(Duration::from_millis(5)).await;
        w.bk.set_build_state(ORG, "web", b.number, BuildState::Running);
        w.bk.set_build_state(ORG, "web", b.number, state);
        let summary = p.cycle().await.unwrap();
        assert_eq!(summary.reported.posted, 1, "{summary:?}");
        assert_eq!(state_on(&w, &sha(1), "web").as_deref(), Some(word));
    }
    // An idle cycle after that posts nothing.
    let summary = p.cycle().await.unwrap();
    assert_eq!(summary.reported.posted, 0, "{summary:?}");
    assert_eq!(w.bb.history(&sha(1), &key("web")).len(), 3);
}

#[tokio::test]
async fn bitbucket_outage_loses_nothing() {
    let w = world(data_center()).await;
    let store = Store::new(SqliteKv::in_memory().unwrap());
    let p = poller_on(&w, store.clone());
    // The API was resolved before the outage (a process that has run a while).
    p.bitbucket.api().await.unwrap();
    for n in 1..=20 {
        w.bk.add_build(Build::new(ORG, "web", sha(n), "main").with_state(BuildState::Passed));
    }
    // Bitbucket fails every request for a while: 5xx, then dropped connections. The cycle
    // fails (no heartbeat, the alarm sees it), and the outbox keeps the work.
    w.bb.inject_fault_for(Fault::Status(503), Duration::from_secs(3600));
    let error = p.cycle().await.expect_err("an outage is a failed cycle");
    assert!(
        error.to_string().contains("20 statuses were not delivered"),
        "{error}"
    );
    assert!(w.bb.posts().is_empty());
    assert_eq!(pending(&store).await, 20);
    // Backoff belongs to Bitbucket, not to each status: the first wave (posted in parallel
    // before any answer came back) and a few probes, not retries of each of the 20.
    let tried = w.bb.requests().len();
    assert!(
        tried <= 20 + 4,
        "{tried} requests to a Bitbucket that is down"
    );

    w.bb.clear_faults();
    w.bb.inject_fault_for(Fault::DropConnection, Duration::from_secs(3600));
    wait_for_probe(&p).await;
    assert!(p.cycle().await.is_err());
    assert_eq!(pending(&store).await, 20);

    // Recovered: the next cycle delivers everything held, at once.
    w.bb.clear_faults();
    wait_for_probe(&p).await;
    let summary = p.cycle().await.unwrap();
    assert_eq!(
        summary.retried.posted + summary.reported.posted,
        20,
        "{summary:?}"
    );
    assert_eq!(pending(&store).await, 0);
    for n in 1..=20 {
        assert_eq!(
            state_on(&w, &sha(n), "web").as_deref(),
            Some("SUCCESSFUL"),
            "build {n}"
        );
    }
    assert_eq!(w.bb.posts().len(), 20);
}

/// Lets the time pass until the pacer probes Bitbucket again (cycles are a minute apart in
/// production; here they run back to back).
async fn wait_for_probe(p: &Poller) {
    if let Some(s) = p.reporter.pacer().snapshot().down_for_s {
        tokio::time::sleep(Duration::from_secs_f64(s + 0.05)).await;
    }
}

fn poller_on(w: &World, store: Store) -> Poller {
    harness::app_on(&w.vars, store).poller.expect("poller")
}

async fn pending(store: &Store) -> usize {
    use kitebridge::store::StatusLedger;
    store
        .due(Utc::now() + chrono::Duration::days(1), 10_000)
        .await
        .unwrap()
        .len()
}

#[tokio::test]
async fn buildkite_outage_keeps_the_cursor_and_the_next_cycle_catches_up() {
    let w = world(data_center()).await;
    let store = Store::new(SqliteKv::in_memory().unwrap());
    let p = poller_on(&w, store.clone());
    for n in 1..=5 {
        w.bk.add_build(Build::new(ORG, "web", sha(n), "main").with_state(BuildState::Passed));
    }
    // Down for longer than the retries: the cycle fails and the cursor stays unset.
    w.bk.inject_fault_for(Fault::Status(500), Duration::from_secs(3600));
    assert!(p.cycle().await.is_err());
    assert_eq!(store.cursor(ORG).await.unwrap(), None);
    assert!(w.bb.posts().is_empty());

    // A short burst of 5xx, a 429 and a timeout are retried within the cycle.
    w.bk.clear_faults();
    w.bk.inject_fault(Fault::Status(502), 1);
    w.bk.inject_fault(
        Fault::RateLimited {
            retry_after_secs: 1,
        },
        1,
    );
    let summary = p.cycle().await.expect("transient failures are retried");
    assert_eq!(summary.reported.posted, 5);
    assert!(store.cursor(ORG).await.unwrap().is_some());
    for n in 1..=5 {
        assert_eq!(state_on(&w, &sha(n), "web").as_deref(), Some("SUCCESSFUL"));
    }
}

#[tokio::test]
async fn hangs_time_out_and_are_retried() {
    let w = world(data_center()).await;
    let p = poller(&w);
    w.bk.add_build(Build::new(ORG, "web", sha(1), "main").with_state(BuildState::Passed));
    w.bk.inject_fault(Fault::Hang, 1);
    let started = std::time::Instant::now();
    p.cycle()
        .await
        .expect("a hung request times out and is retried");
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(state_on(&w, &sha(1), "web").as_deref(), Some("SUCCESSFUL"));
}

/// A cursor store that fails its next N writes, as a crash between posting and saving the
/// cursor would leave things.
struct FailingCursor {
    inner: Store,
    failures: AtomicUsize,
}

#[async_trait]
impl CursorStore for FailingCursor {
    async fn cursor(&self, org: &str) -> Result<Option<Versioned<DateTime<Utc>>>, StoreError> {
        self.inner.cursor(org).await
    }
    async fn advance_cursor(
        &self,
        org: &str,
        expected: Option<&Versioned<DateTime<Utc>>>,
        to: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        if self.failures.load(Ordering::SeqCst) > 0 {
            self.failures.fetch_sub(1, Ordering::SeqCst);
            return Err(StoreError::Unavailable(
                "injected: crashed before saving the cursor".into(),
            ));
        }
        self.inner.advance_cursor(org, expected, to).await
    }
}

#[tokio::test]
async fn a_crash_between_posting_and_saving_the_cursor_posts_nothing_twice() {
    let w = world(data_center()).await;
    let store = Store::new(SqliteKv::in_memory().unwrap());
    let mut p = poller_on(&w, store.clone());
    p.cursors = Arc::new(FailingCursor {
        inner: store.clone(),
        failures: AtomicUsize::new(1),
    });
    for n in 1..=30 {
        w.bk.add_build(Build::new(ORG, "api", sha(n), "main").with_state(BuildState::Failed));
    }
    assert!(
        p.cycle().await.is_err(),
        "the cursor write failed, so the cycle failed"
    );
    assert_eq!(w.bb.posts().len(), 30);
    assert_eq!(store.cursor(ORG).await.unwrap(), None);
    // The next cycle covers the same window again: nothing is posted twice.
    let summary = p.cycle().await.unwrap();
    assert_eq!(summary.reported.posted, 0);
    assert_eq!(summary.reported.already_reported, 30);
    assert_eq!(w.bb.posts().len(), 30);
    assert!(store.cursor(ORG).await.unwrap().is_some());
}

#[tokio::test]
async fn two_cycles_at_once_post_each_status_once() {
    let w = world(data_center()).await;
    let store = Store::new(SqliteKv::in_memory().unwrap());
    let (a, b) = (poller_on(&w, store.clone()), poller_on(&w, store.clone()));
    for n in 1..=60 {
        w.bk.add_build(Build::new(ORG, "web", sha(n), "main").with_state(BuildState::Passed));
    }
    w.bb.set_latency(Duration::from_millis(5));
    let (ra, rb) = tokio::join!(a.cycle(), b.cycle());
    ra.unwrap();
    rb.unwrap();
    assert_eq!(w.bb.posts().len(), 60, "each status posted once");
    for n in 1..=60 {
        assert_eq!(state_on(&w, &sha(n), "web").as_deref(), Some("SUCCESSFUL"));
    }
}

#[tokio::test]
async fn the_first_cycle_looks_back_the_initial_search_time() {
    let mut w = world(data_center()).await;
    w.vars
        .insert("MONITOR_INITIAL_SEARCH_TIME".into(), "1".into());
    let now = Utc::now();
    w.bk.add_build(
        Build::new(ORG, "web", sha(1), "main")
            .with_state(BuildState::Passed)
            .with_created_at(now - chrono::Duration::minutes(30)),
    );
    w.bk.add_build(
        Build::new(ORG, "web", sha(2), "main")
            .with_state(BuildState::Passed)
            .with_created_at(now - chrono::Duration::hours(3))
            .with_finished_at(now - chrono::Duration::hours(2)),
    );
    poller(&w).cycle().await.unwrap();
    assert_eq!(state_on(&w, &sha(1), "web").as_deref(), Some("SUCCESSFUL"));
    assert_eq!(
        state_on(&w, &sha(2), "web"),
        None,
        "older than MONITOR_INITIAL_SEARCH_TIME"
    );
}

#[tokio::test]
async fn each_api_and_each_auth() {
    // Legacy: a Server without the capabilities resource; picked by `auto`.
    let w = world(BitbucketFlavour::Server {
        version: "6.10.0".into(),
    })
    .await;
    w.bk.add_build(Build::new(ORG, "web", sha(1), "main").with_state(BuildState::Canceled));
    poller(&w).cycle().await.unwrap();
    let s = w.bb.status(&sha(1), &key("web")).expect("posted");
    assert_eq!(s.scope, StatusScope::Commit);
    assert_eq!(s.state, "FAILED", "the legacy API has no CANCELLED");

    // Data Center without cancelledStatus: FAILED; with a bearer token.
    let mut w = world(BitbucketFlavour::DataCenter {
        version: "7.21.0".into(),
        cancelled_status: false,
    })
    .await;
    w.vars.remove("BITBUCKET_USERNAME");
    w.vars.remove("BITBUCKET_PASSWORD");
    w.vars
        .insert("BITBUCKET_TOKEN".into(), DEFAULT_BITBUCKET_TOKEN.into());
    w.bk.add_build(Build::new(ORG, "web", sha(1), "main").with_state(BuildState::Canceled));
    poller(&w).cycle().await.unwrap();
    let s = w.bb.status(&sha(1), &key("web")).expect("posted");
    assert!(
        matches!(s.scope, StatusScope::Repository { .. }),
        "{:?}",
        s.scope
    );
    assert_eq!(s.state, "FAILED");

    // Cloud: STOPPED for a canceled build.
    let mut w = world(BitbucketFlavour::Cloud).await;
    w.vars.insert("BITBUCKET_API".into(), "cloud".into());
    w.bk.add_pipeline(Pipeline::new(
        ORG,
        "cloudy",
        "Cloudy",
        "git@bitbucket.org:acme/web.git",
    ));
    w.bk.add_build(Build::new(ORG, "cloudy", sha(1), "main").with_state(BuildState::Canceled));
    poller(&w).cycle().await.unwrap();
    let s = w.bb.status(&sha(1), &key("cloudy")).expect("posted");
    assert_eq!(s.state, "STOPPED");

    // Wrong credentials: nothing posted, the status waits in the outbox (a person must fix it).
    let mut w = world(data_center()).await;
    w.vars.insert("BITBUCKET_PASSWORD".into(), "wrong".into());
    w.bk.add_build(Build::new(ORG, "web", sha(1), "main").with_state(BuildState::Passed));
    let err = poller(&w).cycle().await;
    // The API probe itself is refused, so the organization fails and the cursor stays.
    assert!(err.is_err());
    assert!(w.bb.posts().is_empty());
}

#[tokio::test]
async fn several_organizations_each_with_its_cursor() {
    let bk = FakeBuildkite::start(FakeBuildkiteOptions {
        organizations: vec![ORG.into(), "acme-labs".into()],
        ..FakeBuildkiteOptions::default()
    })
    .await;
    let bb = FakeBitbucket::start(FakeBitbucketOptions::with_flavour(data_center())).await;
    bb.add_repository("PROJ", "web");
    bk.add_pipeline(Pipeline::new(
        ORG,
        "web",
        "Web",
        clone_url(&bb, "PROJ", "web"),
    ));
    bk.add_pipeline(Pipeline::new(
        "acme-labs",
        "web",
        "Web",
        clone_url(&bb, "PROJ", "web"),
    ));
    bk.add_build(Build::new(ORG, "web", sha(1), "main").with_state(BuildState::Passed));
    bk.add_build(Build::new("acme-labs", "web", sha(2), "main").with_state(BuildState::Failed));
    let mut vars = harness::env(&bk, &bb);
    vars.insert("BUILDKITE_ORGANIZATION".into(), format!("{ORG},acme-labs"));
    let store = Store::new(SqliteKv::in_memory().unwrap());
    let p = harness::app_on(&vars, store.clone()).poller.unwrap();
    let summary = p.cycle().await.unwrap();
    assert_eq!(summary.organizations, 2);
    assert_eq!(summary.cursors_moved, 2);
    assert_eq!(
        bb.status(&sha(1), "acme-inc/web").unwrap().state,
        "SUCCESSFUL"
    );
    assert_eq!(bb.status(&sha(2), "acme-labs/web").unwrap().state, "FAILED");
    assert!(store.cursor("acme-labs").await.unwrap().is_some());
}

#[tokio::test]
async fn poll_on_dynamodb() {
    let w = world(data_center()).await;
    let store = Store::new(kitebridge_tests::dynamodb().await);
    for n in 1..=120 {
        w.bk.add_build(Build::new(ORG, "web", sha(n), "main").with_state(BuildState::Passed));
    }
    let p = poller_on(&w, store.clone());
    let summary = p.cycle().await.unwrap();
    assert_eq!(summary.reported.posted, 120);
    let again = p.cycle().await.unwrap();
    assert_eq!(again.reported.posted, 0);
    assert_eq!(w.bb.posts().len(), 120);
    assert!(store.cursor(ORG).await.unwrap().is_some());
}

/// A stand-in for Dead Man's Snitch: counts `GET /{token}`.
async fn snitch_server() -> (String, Arc<AtomicUsize>) {
    use axum::{Router, extract::Path, routing::get};
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let app = Router::new().route(
        "/{token}",
        get(move |Path(token): Path<String>| {
            let counter = counter.clone();
            async move {
                assert_eq!(token, "snitch-token");
                counter.fetch_add(1, Ordering::SeqCst);
                "Got it, thanks!"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, hits)
}

#[tokio::test]
async fn heartbeat_only_after_a_cycle_that_succeeded() {
    let mut w = world(data_center()).await;
    let (url, hits) = snitch_server().await;
    w.vars.insert("DMS_URL".into(), url);
    w.vars.insert("DMS_SNITCH_ID".into(), "snitch-token".into());
    w.bk.add_build(Build::new(ORG, "web", sha(1), "main").with_state(BuildState::Passed));
    let p = poller(&w);
    p.cycle().await.unwrap();
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    assert!(p.last_success().is_some());

    // A failed cycle does not ping.
    w.bk.inject_fault_for(Fault::Status(500), Duration::from_secs(3600));
    assert!(p.cycle().await.is_err());
    assert_eq!(hits.load(Ordering::SeqCst), 1);

    // A ping that fails never fails the cycle.
    w.bk.clear_faults();
    let mut w2 = world(data_center()).await;
    w2.vars
        .insert("DMS_URL".into(), "http://127.0.0.1:9".into());
    w2.vars
        .insert("DMS_SNITCH_ID".into(), "snitch-token".into());
    poller(&w2)
        .cycle()
        .await
        .expect("an unreachable snitch does not fail the cycle");
}
