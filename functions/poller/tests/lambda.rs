//! The real `poller` binary under a Lambda Runtime API emulator, invoked by EventBridge
//! scheduled events as the SAM template's schedule does, with the DynamoDB emulator as its table
//! and fake Buildkite and Bitbucket servers on loopback: a scheduled event runs one
//! poll-and-report cycle; the next is idle (one Buildkite request per organization and filter,
//! nothing to Bitbucket); a Buildkite outage fails the invocation (so the on-failure destination
//! and alarms see it) and loses nothing: the next cycle reports what was missed.

use std::path::Path;

use kitebridge_fakes::*;
use kitebridge_tests::harness::{self, ORG};
use kitebridge_tests::lambda::{Function, Outcome, scheduled_event};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_event_runs_a_poll_through_the_lambda_binary() {
    let (bk, bb) = harness::fakes_for(&["web"]).await;
    let ago = |mins| chrono::Utc::now() - chrono::Duration::minutes(mins);
    let states = [
        BuildState::Passed,
        BuildState::Failed,
        BuildState::Running,
        BuildState::Failing,
        BuildState::Scheduled,
    ];
    for (i, state) in states.iter().enumerate() {
        bk.add_build(
            Build::new(ORG, "web", harness::sha(i as u64 + 1), "main")
                .with_state(*state)
                .with_created_at(ago(30 - i as i64)),
        );
    }
    let mut settings = harness::env(&bk, &bb);
    settings.extend(kitebridge_tests::dynamodb_settings().await);
    settings.insert("BITBUCKET_API".into(), "repository".into());
    settings.insert("MONITOR_INITIAL_SEARCH_TIME".into(), "1".into());

    let f = Function::start(Path::new(env!("CARGO_BIN_EXE_poller")), "poller", &settings).await;
    eprintln!("poller ready {:?} after process start", f.ready_after);

    // First scheduled event: every build reported with its state.
    let summary = f
        .invoke(&scheduled_event())
        .await
        .expect_response("first cycle");
    assert_eq!(summary["posted"], 5, "{summary}");
    assert_eq!(
        summary["failed_organizations"],
        serde_json::json!([]),
        "{summary}"
    );
    let state_of = |n: u64| {
        bb.statuses_for_commit(&harness::sha(n))
            .first()
            .map(|s| s.state.clone())
    };
    let expected = ["SUCCESSFUL", "FAILED", "INPROGRESS", "FAILED", "INPROGRESS"];
    for (i, want) in expected.iter().enumerate() {
        assert_eq!(
            state_of(i as u64 + 1).as_deref(),
            Some(*want),
            "build {}",
            i + 1
        );
    }

    // Second: nothing changed, so 1 Buildkite request per organization and filter, 0 posts.
    bk.clear_requests();
    let posts = bb.posts().len();
    let summary = f
        .invoke(&scheduled_event())
        .await
        .expect_response("idle cycle");
    assert_eq!(summary["posted"], 0, "{summary}");
    assert_eq!(bb.posts().len(), posts);
    assert_eq!(bk.requests().len(), 2, "{:?}", bk.request_counts());

    // Buildkite fails while a build finishes: the invocation fails, nothing is lost.
    bk.set_build_state(ORG, "web", 3, BuildState::Passed)
        .expect("build 3");
    bk.inject_fault_for(Fault::Status(503), std::time::Duration::from_secs(3600));
    match f.invoke(&scheduled_event()).await {
        Outcome::Error(e) => {
            let text = e.to_string();
            assert!(!text.contains(DEFAULT_BUILDKITE_TOKEN), "{text}");
        }
        Outcome::Response(r) => panic!("a cycle with Buildkite down succeeded: {r}"),
    }
    assert_eq!(state_of(3).as_deref(), Some("INPROGRESS"));
    bk.clear_faults();
    let summary = f
        .invoke(&scheduled_event())
        .await
        .expect_response("cycle after the outage");
    assert_eq!(summary["posted"], 1, "{summary}");
    assert_eq!(state_of(3).as_deref(), Some("SUCCESSFUL"));

    let stopped = f.stop();
    eprintln!("poller peak RSS {} KiB", stopped.peak_rss_kib);
    let output = stopped.output.join("\n");
    assert!(
        output.contains("\"posted\""),
        "the cycle's summary line is logged:\n{output}"
    );
    for secret in [
        harness::WEBHOOK_TOKEN,
        DEFAULT_BUILDKITE_TOKEN,
        DEFAULT_BITBUCKET_PASSWORD,
    ] {
        assert!(
            !output.contains(secret),
            "a secret reached the logs:\n{output}"
        );
    }
}
