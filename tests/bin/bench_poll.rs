//! Benchmark of poll-and-report: N changed builds on a fake Buildkite, a fake Bitbucket, a fixed
//! latency added to every fake API call, and the real `kitebridge poll` binary (one cycle, then
//! exit) with its embedded store. Prints wall time, requests to each API, the child's peak RSS,
//! and the cost of an idle cycle run right after.
//!
//! ```sh
//! cargo build --release -p kitebridge-cli -p kitebridge-tests --bin kitebridge --bin bench-poll
//! target/release/bench-poll --builds 10000 --latency-ms 50 --kitebridge target/release/kitebridge
//! ```
//! Options: `--concurrency N` (sets `KITEBRIDGE_POST_CONCURRENCY`).

use std::process::Command;
use std::time::{Duration, Instant};

use chrono::Utc;
use kitebridge_fakes::*;
use kitebridge_tests::harness::{self, ORG, clone_url, sha};

struct Args {
    builds: u64,
    latency: Duration,
    kitebridge: String,
    concurrency: Option<usize>,
}

fn args() -> Args {
    let mut a = Args {
        builds: 1000,
        latency: Duration::from_millis(50),
        kitebridge: "target/release/kitebridge".into(),
        concurrency: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--builds" => a.builds = value.parse().expect("--builds N"),
            "--latency-ms" => {
                a.latency = Duration::from_millis(value.parse().expect("--latency-ms N"))
            }
            "--kitebridge" => a.kitebridge = value,
            "--concurrency" => a.concurrency = Some(value.parse().expect("--concurrency N")),
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

/// CPU time (user + system) of the finished children, in seconds.
fn children_cpu_secs() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a rusage struct into the pointer we pass; RUSAGE_CHILDREN is valid.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, usage.as_mut_ptr()) };
    assert_eq!(rc, 0, "getrusage");
    // SAFETY: getrusage returned 0, so the struct is initialised.
    let u = unsafe { usage.assume_init() };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(u.ru_utime) + secs(u.ru_stime)
}

#[tokio::main]
async fn main() {
    let a = args();
    let bk = FakeBuildkite::start(FakeBuildkiteOptions {
        // Listing is bounded by the organization limit like the real one; keep the real default.
        ..FakeBuildkiteOptions::default()
    })
    .await;
    let bb = FakeBitbucket::start(FakeBitbucketOptions::default()).await;
    let pipelines = ["web", "api", "mobile", "infra"];
    for p in pipelines {
        bb.add_repository("PROJ", p);
        bk.add_pipeline(Pipeline::new(
            ORG,
            p,
            p.to_uppercase(),
            clone_url(&bb, "PROJ", p),
        ));
    }
    let start = Utc::now() - chrono::Duration::minutes(50);
    let states = [
        BuildState::Passed,
        BuildState::Failed,
        BuildState::Running,
        BuildState::Canceled,
    ];
    bk.add_builds((0..a.builds).map(|n| {
        let created = start + chrono::Duration::milliseconds((n * 250) as i64 % 2_400_000);
        let mut b = Build::new(ORG, pipelines[(n % 4) as usize], sha(n + 1), "main")
            .with_state(states[(n % 4) as usize])
            .with_created_at(created)
            .with_message("Bump dependencies\n\nA longer body that kitebridge never sends whole.");
        if states[(n % 4) as usize] != BuildState::Running {
            b = b.with_finished_at(created + chrono::Duration::minutes(3));
        }
        b
    }));
    bk.set_latency(a.latency);
    bb.set_latency(a.latency);

    let dir = std::env::temp_dir().join(format!("kitebridge-bench-{}", ulid::Ulid::new()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut vars = harness::env(&bk, &bb);
    vars.insert(
        "KITEBRIDGE_DB".into(),
        dir.join("kitebridge.db").display().to_string(),
    );
    vars.insert("MONITOR_LOG_LEVEL".into(), "WARN".into());
    vars.insert("KITEBRIDGE_HTTP_TIMEOUT".into(), "30".into());
    if let Some(c) = a.concurrency {
        vars.insert("KITEBRIDGE_POST_CONCURRENCY".into(), c.to_string());
    }

    let run = |label: &str| {
        bk.clear_requests();
        bb.clear_requests();
        let t = Instant::now();
        let out_path = dir.join("stdout");
        let err_path = dir.join("stderr");
        let cpu_before = children_cpu_secs();
        let mut child = Command::new(&a.kitebridge)
            .arg("poll")
            .env_clear()
            .envs(&vars)
            .stdout(std::fs::File::create(&out_path).expect("stdout file"))
            .stderr(std::fs::File::create(&err_path).expect("stderr file"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", a.kitebridge));
        // Peak RSS of the program itself: its VmHWM, sampled until it exits. (getrusage's
        // children maxrss would count this process's pages, held by the child before exec.)
        let pid = child.id() as libc::pid_t;
        let mut peak_kib = 0;
        let status = loop {
            if let Some(k) = kitebridge_tests::lambda::peak_rss_kib(pid) {
                peak_kib = peak_kib.max(k);
            }
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let wall = t.elapsed();
        let cpu = children_cpu_secs() - cpu_before;
        let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
        assert!(
            status.success(),
            "kitebridge poll failed: {}",
            std::fs::read_to_string(&err_path).unwrap_or_default()
        );
        let bk_requests = bk.requests().len();
        let bb_requests = bb.requests().len();
        println!(
            "{label}: {:.2} s wall, {bk_requests} Buildkite requests, {bb_requests} Bitbucket requests; summary {}",
            wall.as_secs_f64(),
            stdout.trim()
        );
        println!("{label}: {cpu:.2} s of CPU (user + system)");
        (wall, bk_requests, bb_requests, peak_kib)
    };

    let (wall, bk_n, bb_n, peak_kib) = run(&format!("{} changed builds", a.builds));
    let rss_mib = peak_kib as f64 / 1024.0;
    let expected = a.builds as usize;
    let statuses = bb.current_statuses().len();
    assert_eq!(statuses, expected, "every build's status is on Bitbucket");
    // What a client sending one request at a time needs for the same requests: each waits the
    // added latency at least.
    let serial = (bk_n + bb_n) as f64 * a.latency.as_secs_f64();
    println!(
        "peak RSS of kitebridge poll: {rss_mib:.1} MiB; one-request-at-a-time lower bound for the same {} requests: {serial:.0} s (the old connector also GETs before each POST: {:.0} s)",
        bk_n + bb_n,
        (bk_n + 2 * bb_n) as f64 * a.latency.as_secs_f64()
    );
    let (idle_wall, idle_bk, idle_bb, _) = run("idle cycle");
    println!(
        "RESULT builds={} latency_ms={} wall_s={:.2} buildkite_requests={bk_n} bitbucket_requests={bb_n} peak_rss_mib={rss_mib:.1} idle_wall_s={:.2} idle_buildkite_requests={idle_bk} idle_bitbucket_requests={idle_bb}",
        a.builds,
        a.latency.as_millis(),
        wall.as_secs_f64(),
        idle_wall.as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(dir);
}
