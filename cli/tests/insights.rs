//! Code Insights through the real `kitebridge serve` and the fakes: a finished build's report
//! lands on its commit (Data Center and Cloud) once, names the failed step and fits every limit
//! the fake enforces; an old Data Center is detected and skipped with one log line; a report
//! Bitbucket could not take is put by a later poll cycle.

mod support;

use std::collections::HashMap;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use kitebridge_fakes::*;
use serde_json::Value;

const ORG: &str = DEFAULT_ORGANIZATION;
const WEBHOOK_TOKEN: &str = "whk-insights";
const COMMIT: &str = "4e1f0c9b7a2d3e5f6a8b9c0d1e2f3a4b5c6d7e8f";

struct Serve {
    child: Child,
    base: String,
    log: std::path::PathBuf,
    dir: std::path::PathBuf,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Serve {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn serve(bk: &FakeBuildkite, bb: &FakeBitbucket, extra: &[(&str, &str)]) -> Serve {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("kitebridge-insights-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut vars: HashMap<String, String> = [
        ("BUILDKITE_API_URL", bk.url()),
        ("BUILDKITE_API_TOKEN", DEFAULT_BUILDKITE_TOKEN.into()),
        ("BUILDKITE_ORGANIZATION", ORG.into()),
        ("BUILDKITE_WEBHOOK_TOKEN", WEBHOOK_TOKEN.into()),
        ("BITBUCKET_URL", bb.url()),
        ("BITBUCKET_TOKEN", DEFAULT_BITBUCKET_TOKEN.into()),
        ("KITEBRIDGE_API_TOKEN", "api".into()),
        ("KITEBRIDGE_DB", dir.join("kb.db").display().to_string()),
        ("MONITOR_POLLING_INTERVAL", "1".into()),
        ("KITEBRIDGE_HTTP_TIMEOUT", "2".into()),
        ("KITEBRIDGE_CODE_INSIGHTS", "on".into()),
    ]
    .map(|(k, v)| (k.to_string(), v))
    .into();
    for (k, v) in extra {
        vars.insert(k.to_string(), v.to_string());
    }
    let log = dir.join("serve.log");
    let (child, base) = support::spawn_serve(
        Command::new(env!("CARGO_BIN_EXE_kitebridge"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env_clear()
            .envs(&vars)
            .stderr(std::fs::File::create(&log).unwrap()),
    );
    Serve {
        child,
        base,
        log,
        dir,
    }
}

/// The pipeline `web` on `owner/web` of the fake Bitbucket, and a finished build of it whose
/// `:rust: test` step failed (a retried lint job passed on its second run).
fn failed_build(bk: &FakeBuildkite, bb: &FakeBitbucket, repo: String) -> u64 {
    bk.add_pipeline(Pipeline::new(ORG, "web", "Web", repo));
    let _ = bb;
    let b = bk.add_build(
        Build::new(ORG, "web", COMMIT, "main")
            .with_job(Job::new(":rust: test", JobState::Failed))
            .with_job(Job::new("lint", JobState::Passed))
            .with_state(BuildState::Failed),
    );
    b.number
}

async fn deliver(s: &Serve, bk: &FakeBuildkite, number: u64) {
    let auth = WebhookAuth::Signature {
        token: WEBHOOK_TOKEN.into(),
        timestamp: None,
    };
    let d = bk
        .webhook(ORG, "web", number, WebhookEvent::BuildFinished, &auth)
        .unwrap();
    let (code, body) = deliver_webhook(&format!("{}/webhooks/buildkite", s.base), &d)
        .await
        .unwrap();
    // 202: the status waits in the outbox (Bitbucket down).
    assert!(code == 200 || code == 202, "{code} {body}");
}

async fn wait_for_report(bb: &FakeBitbucket, within: Duration) -> StoredReport {
    let deadline = Instant::now() + within;
    loop {
        if let Some(r) = bb.reports().into_iter().find(|r| r.commit == COMMIT) {
            return r;
        }
        assert!(Instant::now() < deadline, "no report on {COMMIT}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_build_reports_its_failed_step_to_data_center_once() {
    let bk = FakeBuildkite::start(FakeBuildkiteOptions::default()).await;
    let bb = FakeBitbucket::start(FakeBitbucketOptions::default()).await;
    bb.add_repository("PROJ", "web");
    let repo = format!("ssh://git@{}:7999/proj/web.git", bb.addr().ip());
    let number = failed_build(&bk, &bb, repo);
    bk.add_annotation(
        ORG,
        "web",
        number,
        "error",
        "test-summary",
        "<h3>1 test failed</h3><p><code>checkout::retries_declined_cards</code></p>",
    );
    let s = serve(&bk, &bb, &[]);
    deliver(&s, &bk, number).await;
    let r = wait_for_report(&bb, Duration::from_secs(10)).await;
    assert_eq!(r.key, "kitebridge.web");
    let details = r.report["details"].as_str().unwrap();
    assert!(
        details.contains("Annotations: [error] 1 test failed checkout::retries_declined_cards"),
        "{details}"
    );
    assert_eq!(r.report["result"], "FAIL", "{}", r.report);
    assert_eq!(r.report["title"], "Buildkite: Web");
    let details = r.report["details"].as_str().unwrap();
    assert!(details.contains("Failed: :rust: test."), "{details}");
    assert!(!details.contains("lint"), "{details}");
    let link = r.report["link"].as_str().unwrap();
    assert!(link.ends_with(&format!("/builds/{number}")), "{link}");
    // The status went as ever.
    let deadline = Instant::now() + Duration::from_secs(10);
    while bb.status(COMMIT, "acme-inc/web").map(|p| p.state) != Some("FAILED".into()) {
        assert!(Instant::now() < deadline, "no FAILED status on {COMMIT}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Delivered again, and seen by poll cycles: put once.
    deliver(&s, &bk, number).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let again: Vec<StoredReport> = bb.reports();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].puts, 1, "the report was put again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_gets_its_own_report_shape() {
    let bk = FakeBuildkite::start(FakeBuildkiteOptions::default()).await;
    let bb =
        FakeBitbucket::start(FakeBitbucketOptions::with_flavour(BitbucketFlavour::Cloud)).await;
    bb.add_repository("acme", "web");
    let number = failed_build(&bk, &bb, "git@bitbucket.org:acme/web.git".into());
    let s = serve(&bk, &bb, &[("BITBUCKET_API", "cloud")]);
    deliver(&s, &bk, number).await;
    let r = wait_for_report(&bb, Duration::from_secs(10)).await;
    assert_eq!(r.report["result"], "FAILED", "{}", r.report);
    assert_eq!(r.report["report_type"], "TEST");
    let link = r.report["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["type"] == "LINK")
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(link["value"]["text"], format!("#{number}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_data_center_is_skipped_with_one_log_line() {
    let bk = FakeBuildkite::start(FakeBuildkiteOptions::default()).await;
    let bb = FakeBitbucket::start(FakeBitbucketOptions::with_flavour(
        BitbucketFlavour::DataCenter {
            version: "5.10.0".into(),
            cancelled_status: false,
        },
    ))
    .await;
    bb.add_repository("PROJ", "web");
    let repo = format!("ssh://git@{}:7999/proj/web.git", bb.addr().ip());
    let number = failed_build(&bk, &bb, repo);
    let s = serve(&bk, &bb, &[]);
    deliver(&s, &bk, number).await;
    deliver(&s, &bk, number).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(bb.reports().is_empty());
    let insights_calls = bb
        .requests()
        .iter()
        .filter(|r| r.path.contains("/insights/"))
        .count();
    assert_eq!(insights_calls, 0);
    let log = s.log();
    assert_eq!(
        log.matches("has no Code Insights").count(),
        1,
        "one line, not a loop:\n{log}"
    );
    assert!(
        bb.status(COMMIT, "acme-inc/web").is_some(),
        "statuses go on"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_bitbucket_could_not_take_is_put_by_a_later_cycle() {
    let bk = FakeBuildkite::start(FakeBuildkiteOptions::default()).await;
    let bb = FakeBitbucket::start(FakeBitbucketOptions::default()).await;
    bb.add_repository("PROJ", "web");
    let repo = format!("ssh://git@{}:7999/proj/web.git", bb.addr().ip());
    let number = failed_build(&bk, &bb, repo);
    // Named, so the delivery need not ask which status API the server has.
    let s = serve(&bk, &bb, &[("BITBUCKET_API", "repository")]);
    bb.inject_fault(Fault::Status(503), 50);
    deliver(&s, &bk, number).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(bb.reports().is_empty());
    bb.clear_faults();
    let r = wait_for_report(&bb, Duration::from_secs(25)).await;
    assert_eq!(r.report["result"], "FAIL");
    assert_eq!(r.puts, 1);
}
