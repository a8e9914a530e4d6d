//! Benchmark of the Lambda binaries as Lambda runs them: each under the Runtime API emulator
//! (`kitebridge_tests::lambda`), with the DynamoDB emulator as its table and fake Buildkite and
//! Bitbucket servers on loopback. For each function: cold start (process start -> first
//! `GET /runtime/invocation/next`) over `--starts` fresh processes, then one execution
//! environment kept warm through a workload, and its peak RSS (`VmHWM` of the process):
//!
//! - webhook: `--webhooks` signed deliveries (running, then finished, for half as many builds);
//! - poller: one scheduled cycle over `--builds` changed builds, then the next cycle;
//! - releases: `--cuts` cuts (each triggers a build) and as many reads.
//!
//! ```sh
//! cargo build --release -p kitebridge-webhook -p kitebridge-poller -p kitebridge-releases
//! cargo run -p kitebridge-tests --bin bench-lambda -- --bin-dir target/release
//! ```
//! The emulator is moto behind a serializing wrapper, slower than DynamoDB: per-invocation times
//! here are upper bounds; memory and start-up are what this is for. Moto also copies its whole
//! table for every transaction (its rollback snapshot), so its time and memory grow with the
//! square of the items: keep `--builds` in the hundreds (2,000 took moto past 10 GB). The poll at
//! scale (10,000 builds) is `bench-poll`, the same cycle code over the embedded store.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kitebridge_fakes::*;
use kitebridge_tests::harness::{self, ORG, WEBHOOK_TOKEN};
use kitebridge_tests::lambda::{Function, scheduled_event};
use serde_json::json;

struct Args {
    bin_dir: PathBuf,
    starts: usize,
    webhooks: u64,
    builds: u64,
    cuts: u64,
}

fn args() -> Args {
    let mut a = Args {
        bin_dir: PathBuf::from("target/release"),
        starts: 20,
        webhooks: 1000,
        builds: 300,
        cuts: 100,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        let n = || value.parse().unwrap_or_else(|_| panic!("{flag} N"));
        match flag.as_str() {
            "--bin-dir" => a.bin_dir = PathBuf::from(&value),
            "--starts" => a.starts = n() as usize,
            "--webhooks" => a.webhooks = n(),
            "--builds" => a.builds = n(),
            "--cuts" => a.cuts = n(),
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

struct Fakes {
    bk: FakeBuildkite,
    bb: FakeBitbucket,
    settings: HashMap<String, String>,
}

async fn fakes() -> Fakes {
    let (bk, bb) = harness::fakes_for(&["web", "web-release", "web-deploy"]).await;
    let mut settings = harness::env(&bk, &bb);
    settings.extend(kitebridge_tests::dynamodb_settings().await);
    settings.insert("BITBUCKET_API".into(), "repository".into());
    settings.insert("MONITOR_INITIAL_SEARCH_TIME".into(), "1".into());
    // As the SAM template does (there it names Amazon Linux 2023's bundle): the TLS roots are
    // read from one file instead of every file in the certificate directory.
    for bundle in [
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
    ] {
        if Path::new(bundle).exists() {
            settings.insert("SSL_CERT_FILE".into(), bundle.into());
            break;
        }
    }
    Fakes { bk, bb, settings }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

async fn cold_starts(
    binary: &Path,
    name: &str,
    settings: &HashMap<String, String>,
    n: usize,
) -> String {
    let mut times = Vec::with_capacity(n);
    let mut rss = 0;
    for _ in 0..n {
        let f = Function::start(binary, name, settings).await;
        times.push(f.ready_after);
        rss = rss.max(f.stop().peak_rss_kib);
    }
    times.sort();
    format!(
        "ready p50 {}, p90 {}, max {} over {n} starts (idle RSS {:.1} MiB)",
        ms(percentile(&times, 0.5)),
        ms(percentile(&times, 0.9)),
        ms(*times.last().expect("at least one start")),
        rss as f64 / 1024.0
    )
}

fn report(name: &str, binary: &Path, start: &str, work: &str, peak_kib: u64) {
    let size = std::fs::metadata(binary).map(|m| m.len()).unwrap_or(0);
    println!(
        "{name:9} {:.2} MB | {start} | {work} | peak RSS {:.1} MiB",
        size as f64 / 1e6,
        peak_kib as f64 / 1024.0
    );
}

async fn webhook(a: &Args) {
    let binary = a.bin_dir.join("webhook");
    let f = fakes().await;
    let start = cold_starts(&binary, "webhook", &f.settings, a.starts).await;
    let func = Function::start(&binary, "webhook", &f.settings).await;
    let auth = WebhookAuth::Signature {
        token: WEBHOOK_TOKEN.into(),
        timestamp: None,
    };
    let began = Instant::now();
    let builds = a.webhooks.div_ceil(2);
    let mut sent = 0;
    for i in 0..builds {
        let b = f.bk.add_build(
            Build::new(ORG, "web", harness::sha(i + 1), "main").with_state(BuildState::Running),
        );
        for event in [WebhookEvent::BuildRunning, WebhookEvent::BuildFinished] {
            if event == WebhookEvent::BuildFinished {
                f.bk.set_build_state(ORG, "web", b.number, BuildState::Passed);
            }
            let d =
                f.bk.webhook(ORG, "web", b.number, event, &auth)
                    .expect("build");
            let answer = func.deliver(&d).await;
            assert_eq!(answer.status, 200, "{:?}", answer.body);
            sent += 1;
        }
    }
    let took = began.elapsed();
    assert_eq!(f.bb.current_statuses().len() as u64, builds);
    let stopped = func.stop();
    let work = format!(
        "{sent} webhooks, {} per invocation",
        ms(took / sent.max(1) as u32)
    );
    report("webhook", &binary, &start, &work, stopped.peak_rss_kib);
}

async fn poller(a: &Args) {
    let binary = a.bin_dir.join("poller");
    let f = fakes().await;
    let start = cold_starts(&binary, "poller", &f.settings, a.starts).await;
    let now = chrono::Utc::now();
    let states = [BuildState::Passed, BuildState::Failed, BuildState::Running];
    f.bk.add_builds((0..a.builds).map(|i| {
        Build::new(ORG, "web", harness::sha(i + 1), "main")
            .with_state(states[i as usize % states.len()])
            .with_created_at(now - chrono::Duration::seconds(1800 - (i % 1700) as i64))
    }));
    let func = Function::start(&binary, "poller", &f.settings).await;
    let began = Instant::now();
    let summary = func
        .invoke_within(&scheduled_event(), Duration::from_secs(900))
        .await
        .expect_response("cycle");
    let took = began.elapsed();
    assert_eq!(summary["posted"], json!(a.builds), "{summary}");
    // The next cycle re-reads the builds that finished within the cursor's 2-minute overlap
    // (all of them, here) and finds each already reported.
    let again = func
        .invoke_within(&scheduled_event(), Duration::from_secs(900))
        .await
        .expect_response("next cycle");
    assert_eq!(again["posted"], 0, "{again}");
    let stopped = func.stop();
    let work = format!(
        "cycle of {} changed builds in {:.1} s, then the next cycle",
        a.builds,
        took.as_secs_f64()
    );
    report("poller", &binary, &start, &work, stopped.peak_rss_kib);
}

async fn releases(a: &Args) {
    let binary = a.bin_dir.join("releases");
    let f = fakes().await;
    let start = cold_starts(&binary, "releases", &f.settings, a.starts).await;
    let func = Function::start(&binary, "releases", &f.settings).await;
    let bearer = format!("Bearer {}", harness::API_TOKEN);
    let auth = [
        ("authorization", bearer.as_str()),
        ("content-type", "application/json"),
    ];
    let project = json!({
        "build_pipeline": {"organization": ORG, "pipeline": "web-release"},
        "version_scheme": "semver",
        "environments": [{"name": "staging", "deploy_pipeline": {"organization": ORG, "pipeline": "web-deploy"}}]
    })
    .to_string();
    let a0 = func
        .http("PUT", "/projects/web", &auth, Some(&project))
        .await;
    assert_eq!(a0.status, 201, "{:?}", a0.body);
    let began = Instant::now();
    for i in 0..a.cuts {
        let version = format!("1.{i}.0");
        let cut = json!({"commit": harness::sha(i + 1), "branch": "main", "version": version})
            .to_string();
        let c = func
            .http("POST", "/projects/web/releases", &auth, Some(&cut))
            .await;
        assert_eq!(c.status, 201, "{:?}", c.body);
        let r = func
            .http(
                "GET",
                &format!("/projects/web/releases/{version}"),
                &auth,
                None,
            )
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    let took = began.elapsed();
    assert_eq!(f.bk.created_builds().len() as u64, a.cuts);
    let stopped = func.stop();
    let work = format!(
        "{} cuts + {} reads, {} per request",
        a.cuts,
        a.cuts,
        ms(took / (2 * a.cuts.max(1)) as u32)
    );
    report("releases", &binary, &start, &work, stopped.peak_rss_kib);
}

#[tokio::main]
async fn main() {
    let a = args();
    for name in ["webhook", "poller", "releases"] {
        let p = a.bin_dir.join(name);
        assert!(
            p.exists(),
            "{} is missing: build the functions first",
            p.display()
        );
    }
    println!(
        "function  size | cold start under the Runtime API emulator | warm workload | peak RSS"
    );
    webhook(&a).await;
    poller(&a).await;
    releases(&a).await;
}
