//! The real `kitebridge` binary: `poll` runs one cycle against fake Buildkite and Bitbucket
//! servers and exits 0 (1 when the cycle fails); `serve` answers `/healthz`, runs the poll loop,
//! and exits 0 on SIGTERM.

mod support;

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use kitebridge_fakes::*;

const ORG: &str = DEFAULT_ORGANIZATION;

fn sha(n: u64) -> String {
    format!("{n:040x}")
}

async fn fakes() -> (
    FakeBuildkite,
    FakeBitbucket,
    HashMap<String, String>,
    std::path::PathBuf,
) {
    let bk = FakeBuildkite::start(FakeBuildkiteOptions::default()).await;
    let bb = FakeBitbucket::start(FakeBitbucketOptions::default()).await;
    bb.add_repository("PROJ", "web");
    let repo = format!("ssh://git@{}:7999/proj/web.git", bb.addr().ip());
    bk.add_pipeline(Pipeline::new(ORG, "web", "Web", repo));
    let dir = std::env::temp_dir().join(format!(
        "kitebridge-cli-{}",
        std::process::id() as u128 * 1000 + rand_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let vars = HashMap::from(
        [
            ("BUILDKITE_API_URL", bk.url()),
            ("BUILDKITE_API_TOKEN", DEFAULT_BUILDKITE_TOKEN.into()),
            ("BUILDKITE_ORGANIZATION", ORG.into()),
            ("BUILDKITE_WEBHOOK_TOKEN", "whk".into()),
            ("BITBUCKET_URL", bb.url()),
            ("BITBUCKET_TOKEN", DEFAULT_BITBUCKET_TOKEN.into()),
            ("KITEBRIDGE_API_TOKEN", "api".into()),
            ("KITEBRIDGE_DB", dir.join("kb.db").display().to_string()),
            ("MONITOR_POLLING_INTERVAL", "1".into()),
        ]
        .map(|(k, v)| (k.to_string(), v)),
    );
    (bk, bb, vars, dir)
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() % 1000)
        .unwrap_or(0)
}

fn kitebridge() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kitebridge"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_runs_one_cycle_and_says_how_it_went() {
    let (bk, bb, vars, dir) = fakes().await;
    bk.add_build(Build::new(ORG, "web", sha(1), "main").with_state(BuildState::Passed));
    let out = kitebridge()
        .arg("poll")
        .env_clear()
        .envs(&vars)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["posted"], 1, "{summary}");
    assert_eq!(
        bb.status(&sha(1), "acme-inc/web").unwrap().state,
        "SUCCESSFUL"
    );

    // The store is a file: a second run knows what was reported.
    let out = kitebridge()
        .arg("poll")
        .env_clear()
        .envs(&vars)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(bb.posts().len(), 1);

    // A failed cycle exits 1.
    bk.inject_fault_for(Fault::Status(500), Duration::from_secs(3600));
    let out = kitebridge()
        .arg("poll")
        .env_clear()
        .envs(&vars)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));

    // Bad configuration: exit 1 with the variable named, no secret shown.
    let mut bad = vars.clone();
    bad.insert("MONITOR_POLLING_INTERVAL".into(), "often".into());
    let out = kitebridge()
        .arg("poll")
        .env_clear()
        .envs(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("MONITOR_POLLING_INTERVAL"), "{stderr}");
    assert!(!stderr.contains(DEFAULT_BUILDKITE_TOKEN), "{stderr}");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_answers_polls_and_stops_on_sigterm() {
    let (bk, bb, vars, dir) = fakes().await;
    bk.add_build(Build::new(ORG, "web", sha(7), "main").with_state(BuildState::Failed));
    let (mut child, base) = support::spawn_serve(
        kitebridge()
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env_clear()
            .envs(&vars),
    );

    // The poll loop reports the build.
    let deadline = Instant::now() + Duration::from_secs(20);
    while bb.status(&sha(7), "acme-inc/web").is_none() {
        assert!(
            Instant::now() < deadline,
            "the poll loop never reported the build"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let health: serde_json::Value = reqwest::get(format!("{base}/healthz"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["status"], "ok");
    assert!(health["last_successful_poll"].is_string(), "{health}");

    // The operator view: the cycle's summary, the status posted, an empty outbox; token only.
    let client = reqwest::Client::new();
    let refused = client.get(format!("{base}/operator")).send().await.unwrap();
    assert_eq!(refused.status().as_u16(), 401);
    let op: serde_json::Value = client
        .get(format!("{base}/operator"))
        .bearer_auth("api")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let cycle = &op["poll_cycles"][0];
    assert_eq!(cycle["ok"], true, "{op}");
    assert!(cycle["at"].is_string() && cycle["summary"]["builds_seen"].as_u64() >= Some(1));
    let posted = op["recent_posted"].as_array().unwrap();
    assert!(
        posted
            .iter()
            .any(|p| p["commit"] == sha(7).as_str() && p["state"] == "FAILED"),
        "{op}"
    );
    assert_eq!(op["outbox"]["depth"], 0, "{op}");
    assert_eq!(op["outbox"]["oldest_age_seconds"], serde_json::Value::Null);
    assert_eq!(op["recent_refused"], serde_json::json!([]));

    // SIGTERM: stop taking requests, finish, exit 0.
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "serve did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
    let _ = std::fs::remove_dir_all(dir);
}

/// A status Bitbucket refuses (a repository it does not have) shows in the operator view: the
/// refusal with its error, a failed cycle, and the status waiting in the outbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_view_shows_refusals_and_the_outbox() {
    let (bk, bb, vars, dir) = fakes().await;
    let missing = format!("ssh://git@{}:7999/proj/gone.git", bb.addr().ip());
    bk.add_pipeline(Pipeline::new(ORG, "gone", "Gone", missing));
    bk.add_build(Build::new(ORG, "gone", sha(9), "main").with_state(BuildState::Passed));
    let (mut child, base) = support::spawn_serve(
        kitebridge()
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env_clear()
            .envs(&vars),
    );

    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let op = loop {
        let op: serde_json::Value = client
            .get(format!("{base}/operator"))
            .bearer_auth("api")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if op["recent_refused"]
            .as_array()
            .is_some_and(|r| !r.is_empty())
            && op["poll_cycles"].as_array().is_some_and(|c| !c.is_empty())
        {
            break op;
        }
        assert!(Instant::now() < deadline, "no refusal shown: {op}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let refusal = &op["recent_refused"][0];
    assert_eq!(refusal["commit"], sha(9).as_str(), "{op}");
    assert!(
        refusal["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{op}"
    );
    assert_eq!(op["poll_cycles"][0]["ok"], false, "{op}");
    assert!(op["poll_cycles"][0]["error"].is_string(), "{op}");
    assert_eq!(op["outbox"]["depth"], 1, "{op}");
    assert!(
        op["outbox"]["oldest_age_seconds"].as_i64() >= Some(0),
        "{op}"
    );
    assert!(
        !op.to_string().contains(DEFAULT_BITBUCKET_TOKEN),
        "no secrets: {op}"
    );

    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(dir);
}
