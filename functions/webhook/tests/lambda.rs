//! The real `webhook` binary under a Lambda Runtime API emulator, as Lambda runs it behind the
//! HTTP API: API Gateway (payload 2.0) events in, Lambda responses out, the DynamoDB emulator
//! as its table (found through `AWS_ENDPOINT_URL`, as the SDK finds DynamoDB), fake Buildkite
//! and Bitbucket servers on loopback. A signed webhook becomes a commit status; a forged one is
//! refused with a JSON 401; a repeated one is not posted twice (the table remembers).

use std::path::Path;

use kitebridge_fakes::*;
use kitebridge_tests::harness::{self, ORG, WEBHOOK_TOKEN};
use kitebridge_tests::lambda::Function;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_becomes_a_commit_status_through_the_lambda_binary() {
    let (bk, bb) = harness::fakes_for(&["web"]).await;
    let mut settings = harness::env(&bk, &bb);
    settings.extend(kitebridge_tests::dynamodb_settings().await);
    settings.insert("BITBUCKET_API".into(), "repository".into());

    let f = Function::start(
        Path::new(env!("CARGO_BIN_EXE_webhook")),
        "webhook",
        &settings,
    )
    .await;
    eprintln!("webhook ready {:?} after process start", f.ready_after);

    // A ping (sent when the webhook is saved in Buildkite) is answered 200.
    let ping = bk.ping_webhook(
        ORG,
        "https://example.invalid/webhooks/buildkite",
        &WebhookAuth::Token(WEBHOOK_TOKEN.into()),
    );
    let a = f.deliver(&ping).await;
    assert_eq!(a.status, 200, "{:?}", a.body);

    // build.running, then build.finished (passed): INPROGRESS, then SUCCESSFUL.
    let sha = harness::sha(0xbeef);
    let build =
        bk.add_build(Build::new(ORG, "web", sha.clone(), "main").with_state(BuildState::Running));
    let auth = WebhookAuth::Signature {
        token: WEBHOOK_TOKEN.into(),
        timestamp: None,
    };
    let running = bk
        .webhook(ORG, "web", build.number, WebhookEvent::BuildRunning, &auth)
        .expect("build exists");
    let a = f.deliver(&running).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let posted = bb.statuses_for_commit(&sha);
    assert_eq!(posted.len(), 1, "{posted:?}");
    assert_eq!(posted[0].state, "INPROGRESS");

    bk.set_build_state(ORG, "web", build.number, BuildState::Passed)
        .expect("build exists");
    let finished = bk
        .webhook(ORG, "web", build.number, WebhookEvent::BuildFinished, &auth)
        .expect("build exists");
    let a = f.deliver(&finished).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let current = bb.statuses_for_commit(&sha);
    assert_eq!(current.len(), 1, "one key per pipeline: {current:?}");
    assert_eq!(current[0].state, "SUCCESSFUL");
    assert!(current[0].url.contains("/builds/"), "{:?}", current[0]);
    let posts = bb.posts().len();

    // The same delivery again (Buildkite retries): answered 200, not posted twice.
    let a = f.deliver(&finished).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(
        bb.posts().len(),
        posts,
        "a repeated delivery was posted again"
    );

    // A forged delivery: 401 with a JSON message, nothing posted.
    let forged = bk
        .webhook(
            ORG,
            "web",
            build.number,
            WebhookEvent::BuildFinished,
            &WebhookAuth::Signature {
                token: "not-the-token".into(),
                timestamp: None,
            },
        )
        .expect("build exists");
    let a = f.deliver(&forged).await;
    assert_eq!(a.status, 401, "{:?}", a.body);
    assert!(
        a.body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{:?}",
        a.body
    );
    assert_eq!(a.header("content-type"), Some("application/json"));
    assert_eq!(bb.posts().len(), posts);

    let stopped = f.stop();
    eprintln!("webhook peak RSS {} KiB", stopped.peak_rss_kib);
    let output = stopped.output.join("\n");
    for secret in [
        WEBHOOK_TOKEN,
        DEFAULT_BUILDKITE_TOKEN,
        DEFAULT_BITBUCKET_PASSWORD,
    ] {
        assert!(
            !output.contains(secret),
            "a secret reached the logs:\n{output}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misconfigured_function_tells_lambda_why_it_cannot_start() {
    use kitebridge_tests::lambda::{LambdaProcess, RuntimeApi, lambda_environment};
    let api = RuntimeApi::start().await;
    let mut env = lambda_environment(&api, "webhook");
    // No webhook token, and a password that must not be echoed.
    env.extend(
        [
            ("KITEBRIDGE_TABLE", "kitebridge"),
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:9"),
            ("BITBUCKET_URL", "https://bitbucket.example.com"),
            ("BITBUCKET_USERNAME", "svc"),
            ("BITBUCKET_PASSWORD", "hunter2-do-not-log"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let mut process = LambdaProcess::spawn(Path::new(env!("CARGO_BIN_EXE_webhook")), &env);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(status) = process.exited() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "it kept running");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), Some(1));
    assert!(
        api.first_next().is_none(),
        "it asked for events while misconfigured"
    );
    let report = api
        .init_error()
        .expect("an init error reported to the Runtime API");
    assert_eq!(
        report["errorType"], "Runtime.ConfigurationError",
        "{report}"
    );
    let message = report["errorMessage"].as_str().unwrap_or_default();
    assert!(message.contains("BUILDKITE_WEBHOOK_TOKEN"), "{message}");
    let output = process.stop().output.join("\n");
    assert!(output.contains("BUILDKITE_WEBHOOK_TOKEN"), "{output}");
    assert!(
        !message.contains("hunter2") && !output.contains("hunter2"),
        "{message}\n{output}"
    );
}
