//! Benchmark of a backlog drained through a rate-limited Bitbucket, with live webhooks arriving
//! meanwhile.
//!
//! A fake Buildkite holds a backlog of changed builds: by default two builds of one pipeline on
//! each of 1,000 commits (`--layout rebuild`), the second (a higher build number, created 30 s
//! later) superseding the first, so each commit has one status (commit, key) whose newest state
//! must be delivered and one superseded state that must never be posted. `--layout pipelines`
//! instead puts one build of each of two pipelines on every commit (two distinct statuses per
//! commit, nothing superseded). A fake Bitbucket Data Center limits the user with a token bucket
//! (default 20 tokens, refilled at 50/s; a 429 with `Retry-After` when empty).
//!
//! `--mode serve` (default) runs the real `kitebridge serve`: its first poll cycle drains the
//! backlog while the webhook receiver is live; every `--live-every-ms` a new build (on a new
//! commit) is added and its signed `build.finished` delivery is sent, and the time from sending
//! it to the fake Bitbucket accepting its status is measured. `--mode poll` runs one
//! `kitebridge poll` cycle instead (no webhooks).
//!
//! Reported: time until every distinct status was delivered (from the first request kitebridge
//! made to Bitbucket, and from process start) against the lower bound (distinct - bucket) /
//! refill and the ratio; status posts answered 429 and their share; posts per delivered status;
//! superseded states posted (every accepted post is checked against the newest build of its
//! (commit, key)); live webhook latency.
//!
//! ```sh
//! cargo build --release -p kitebridge-cli -p kitebridge-tests --bin kitebridge --bin bench-backlog
//! target/release/bench-backlog --kitebridge target/release/kitebridge
//! target/release/bench-backlog --kitebridge target/release/kitebridge --mode poll
//! ```
//! Options: `--commits N` (1000), `--layout rebuild|pipelines`, `--bucket N` (20),
//! `--refill PER_S` (50), `--live-every-ms MS` (1000), `--poll-interval S` (60, serve only),
//! `--timeout S` (180), `--timeline` (posts accepted and refused, second by second), `--env NAME=VALUE` (added to kitebridge's otherwise cleared
//! environment, e.g. `BITBUCKET_RATE_LIMIT=50`).

use std::collections::HashMap;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use kitebridge_fakes::*;
use kitebridge_tests::harness::{self, ORG, WEBHOOK_TOKEN, clone_url, sha};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Serve,
    Poll,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// Two builds of one pipeline per commit; the second supersedes the first.
    Rebuild,
    /// One build of each of two pipelines per commit.
    Pipelines,
}

struct Args {
    mode: Mode,
    layout: Layout,
    commits: u64,
    bucket: u32,
    refill: f64,
    live_every: Duration,
    poll_interval: u64,
    timeout: Duration,
    kitebridge: String,
    env: Vec<(String, String)>,
    timeline: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: bench-backlog [--kitebridge PATH] [--mode serve|poll] [--layout rebuild|pipelines] \
         [--commits N] [--bucket N] [--refill PER_S] [--live-every-ms MS] [--poll-interval S] \
         [--timeout S] [--env NAME=VALUE]..."
    );
    std::process::exit(2)
}

fn args() -> Args {
    let mut a = Args {
        mode: Mode::Serve,
        layout: Layout::Rebuild,
        commits: 1000,
        bucket: 20,
        refill: 50.0,
        live_every: Duration::from_millis(1000),
        poll_interval: 60,
        timeout: Duration::from_secs(180),
        kitebridge: "target/release/kitebridge".into(),
        env: Vec::new(),
        timeline: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--timeline" {
            a.timeline = true;
            continue;
        }
        let Some(value) = it.next() else { usage() };
        let num = |v: &str| v.parse::<f64>().unwrap_or_else(|_| usage());
        match flag.as_str() {
            "--mode" => {
                a.mode = match value.as_str() {
                    "serve" => Mode::Serve,
                    "poll" => Mode::Poll,
                    _ => usage(),
                }
            }
            "--layout" => {
                a.layout = match value.as_str() {
                    "rebuild" => Layout::Rebuild,
                    "pipelines" => Layout::Pipelines,
                    _ => usage(),
                }
            }
            "--commits" => a.commits = num(&value) as u64,
            "--bucket" => a.bucket = num(&value) as u32,
            "--refill" => a.refill = num(&value),
            "--live-every-ms" => a.live_every = Duration::from_millis(num(&value) as u64),
            "--poll-interval" => a.poll_interval = num(&value) as u64,
            "--timeout" => a.timeout = Duration::from_secs_f64(num(&value)),
            "--kitebridge" => a.kitebridge = value,
            "--env" => match value.split_once('=') {
                Some((k, v)) => a.env.push((k.to_owned(), v.to_owned())),
                None => usage(),
            },
            _ => usage(),
        }
    }
    a
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free loopback port: {e}"))
}

fn healthz_answers(port: u16) -> bool {
    use std::io::Write;
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn secs_between(a: DateTime<Utc>, b: DateTime<Utc>) -> f64 {
    (b - a).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6
}

/// The build number a status links to (`.../builds/N`).
fn build_number(url: &str) -> Option<u64> {
    url.rsplit('/').next()?.parse().ok()
}

/// The state Bitbucket Data Center shows for a build in this state.
fn dc_state(state: BuildState) -> &'static str {
    match state {
        BuildState::Passed => "SUCCESSFUL",
        BuildState::Failed => "FAILED",
        BuildState::Canceled => "CANCELLED",
        _ => "INPROGRESS",
    }
}

/// What must end up on Bitbucket: per (commit, key), the newest build's number and state.
type Wanted = HashMap<(String, String), (u64, &'static str)>;

/// When every wanted status was first posted with its newest state, if all were.
fn delivered_at(
    wanted: &Wanted,
    posts: &[PostedStatus],
) -> HashMap<(String, String), DateTime<Utc>> {
    let mut at = HashMap::new();
    for p in posts {
        let id = (p.commit.clone(), p.key.clone());
        if let Some((number, state)) = wanted.get(&id)
            && build_number(&p.url) == Some(*number)
            && p.state == *state
        {
            at.entry(id).or_insert(p.posted_at);
        }
    }
    at
}

#[tokio::main]
async fn main() {
    let a = args();
    let timeline = a.timeline;
    if !std::path::Path::new(&a.kitebridge).is_file() {
        eprintln!(
            "{} does not exist: build it with `cargo build --release -p kitebridge-cli` or pass --kitebridge",
            a.kitebridge
        );
        std::process::exit(1);
    }
    let bk = FakeBuildkite::start(FakeBuildkiteOptions::default()).await;
    let bb = FakeBitbucket::start(FakeBitbucketOptions {
        rate_limit: Some(TokenBucket {
            size: a.bucket,
            refill_per_sec: a.refill,
        }),
        ..FakeBitbucketOptions::default()
    })
    .await;
    bb.add_repository("PROJ", "web");
    let pipelines: &[&str] = match a.layout {
        Layout::Rebuild => &["web"],
        Layout::Pipelines => &["web", "api"],
    };
    for p in pipelines {
        bk.add_pipeline(Pipeline::new(ORG, *p, *p, clone_url(&bb, "PROJ", "web")));
    }

    // The backlog: commits over the last 50 minutes. Rebuild: a first build that failed (or
    // was canceled), then 30 s later a second one (passed, failed or still running).
    let start = Utc::now() - chrono::Duration::minutes(50);
    let span_ms = 45 * 60 * 1000 / a.commits.max(1) as i64;
    let finished = |b: Build, state: BuildState, created: DateTime<Utc>| {
        let b = b.with_state(state).with_created_at(created);
        if state == BuildState::Running {
            b
        } else {
            b.with_finished_at(created + chrono::Duration::minutes(3))
        }
    };
    let mut backlog = Vec::new();
    for i in 0..a.commits {
        let created = start + chrono::Duration::milliseconds(i as i64 * span_ms);
        let commit = sha(i + 1);
        match a.layout {
            Layout::Rebuild => {
                let first = [BuildState::Failed, BuildState::Canceled][(i % 2) as usize];
                let second = [
                    BuildState::Passed,
                    BuildState::Passed,
                    BuildState::Failed,
                    BuildState::Running,
                ][(i % 4) as usize];
                let b = Build::new(ORG, "web", commit.clone(), "main");
                backlog.push(finished(b.clone(), first, created));
                backlog.push(finished(b, second, created + chrono::Duration::seconds(30)));
            }
            Layout::Pipelines => {
                for (n, p) in pipelines.iter().enumerate() {
                    let state = [BuildState::Passed, BuildState::Failed][(i as usize + n) % 2];
                    let b = Build::new(ORG, *p, commit.clone(), "main");
                    backlog.push(finished(b, state, created));
                }
            }
        }
    }
    // Added in creation order, so build numbers grow with time as on Buildkite.
    backlog.sort_by_key(|b| b.created_at);
    let added = bk.add_builds(backlog);
    let mut wanted: Wanted = HashMap::new();
    for b in &added {
        let id = (b.commit.clone(), format!("{}/{}", b.org, b.pipeline));
        let entry = wanted.entry(id).or_insert((0, ""));
        if b.number > entry.0 {
            *entry = (b.number, dc_state(b.state));
        }
    }
    let distinct = wanted.len();
    let superseded_builds = added.len() - distinct;
    let bound = (distinct as f64 - f64::from(a.bucket)).max(0.0) / a.refill;
    println!(
        "backlog: {} changed builds on {} commits, {distinct} distinct statuses ({superseded_builds} superseded builds); bucket {} refilled at {}/s; lower bound ({distinct} - {}) / {} = {bound:.1} s",
        added.len(),
        a.commits,
        a.bucket,
        a.refill,
        a.bucket,
        a.refill,
    );

    let dir = std::env::temp_dir().join(format!("kitebridge-bench-{}", ulid::Ulid::new()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let mut vars = harness::env(&bk, &bb);
    vars.insert(
        "KITEBRIDGE_DB".into(),
        dir.join("kitebridge.db").display().to_string(),
    );
    vars.insert("KITEBRIDGE_HTTP_TIMEOUT".into(), "10".into());
    vars.insert(
        "MONITOR_POLLING_INTERVAL".into(),
        a.poll_interval.to_string(),
    );
    vars.insert("KITEBRIDGE_LOG_FORMAT".into(), "text".into());
    vars.insert("RUST_LOG".into(), "warn,kitebridge::poll=info".into());
    vars.extend(a.env.iter().cloned());

    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut cmd = Command::new(&a.kitebridge);
    match a.mode {
        Mode::Serve => cmd.args(["serve", "--listen", &listen]),
        Mode::Poll => cmd.arg("poll"),
    };
    let err_path = dir.join("stderr");
    let spawned_at = Utc::now();
    let mut child: Child = cmd
        .env_clear()
        .envs(&vars)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.join("stdout")).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", a.kitebridge));
    let t0 = Instant::now();

    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("reqwest");
    let auth = WebhookAuth::Signature {
        token: WEBHOOK_TOKEN.to_owned(),
        timestamp: None,
    };
    let url = format!("http://{listen}/webhooks/buildkite");
    // (commit, sent at, answer) of each live delivery.
    let mut live: Vec<(String, u64, DateTime<Utc>)> = Vec::new();
    let mut answers = Vec::new();
    let mut next_live = Instant::now();
    let mut all_delivered: Option<Instant> = None;
    let mut exited = None;
    if a.mode == Mode::Serve {
        while !healthz_answers(port) {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "kitebridge exited during start-up ({status}): {}",
                    std::fs::read_to_string(&err_path).unwrap_or_default()
                );
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "kitebridge did not start"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    loop {
        if t0.elapsed() > a.timeout {
            println!("TIMEOUT after {} s", a.timeout.as_secs());
            break;
        }
        if a.mode == Mode::Serve && Instant::now() >= next_live {
            next_live += a.live_every;
            let commit = sha(1_000_000 + live.len() as u64);
            let build = bk.add_build(
                Build::new(ORG, "web", commit.clone(), "main").with_state(BuildState::Passed),
            );
            let d = bk
                .webhook(ORG, "web", build.number, WebhookEvent::BuildFinished, &auth)
                .expect("the build just added");
            let mut req = client.post(&url).body(d.body.clone());
            for (k, v) in &d.headers {
                req = req.header(k.as_str(), v.as_str());
            }
            live.push((commit, build.number, Utc::now()));
            answers.push(tokio::spawn(async move {
                match req.send().await {
                    Ok(r) => {
                        let code = r.status().as_u16();
                        (code, r.text().await.unwrap_or_default())
                    }
                    Err(e) => (0, e.to_string()),
                }
            }));
        }
        if a.mode == Mode::Poll
            && let Some(status) = child.try_wait().expect("wait")
        {
            exited = Some((status, t0.elapsed()));
            break;
        }
        if all_delivered.is_none() && delivered_at(&wanted, &bb.posts()).len() == distinct {
            all_delivered = Some(Instant::now());
        }
        // Serve: a few more live deliveries after the backlog is through, then stop.
        if let Some(t) = all_delivered
            && a.mode == Mode::Serve
            && t.elapsed() >= a.live_every * 3
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let the last live deliveries land (each waits at most a few seconds).
    let mut codes: HashMap<u16, usize> = HashMap::new();
    for h in answers {
        if let Ok((code, text)) = h.await {
            if code != 200 {
                eprintln!("live delivery answered {code}: {text}");
            }
            *codes.entry(code).or_default() += 1;
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    if exited.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();

    // ---- analysis ----
    let posts = bb.posts();
    let requests = bb.requests();
    let status_posts: Vec<&RequestRecord> = requests
        .iter()
        // Every POST to Bitbucket is a status post (legacy or repository-scoped API).
        .filter(|r| r.method == "POST")
        .collect();
    let first_request = requests.iter().map(|r| r.at).min();
    let limited = status_posts
        .iter()
        .filter(|r| r.status == Some(429))
        .count();
    let other_failed = status_posts
        .iter()
        .filter(|r| !matches!(r.status, Some(200..=299) | Some(429)))
        .count();
    let delivered = delivered_at(&wanted, &posts);
    if timeline && let Some(f) = first_request {
        // Per second since the first request: status posts accepted, answered 429.
        let mut rows: Vec<(usize, usize)> = Vec::new();
        for r in &status_posts {
            let sec = secs_between(f, r.at).max(0.0) as usize;
            if rows.len() <= sec {
                rows.resize(sec + 1, (0, 0));
            }
            match r.status {
                Some(429) => rows[sec].1 += 1,
                _ => rows[sec].0 += 1,
            }
        }
        println!("timeline (second: posts answered 2xx / 429):");
        for (sec, (ok, limited)) in rows.iter().enumerate() {
            println!("  {sec:>3}: {ok:>4} / {limited:>3}");
        }
    }
    let last = delivered.values().max().copied();

    // Every accepted post against the newest build of its (commit, key).
    let mut live_wanted: Wanted = HashMap::new();
    for (commit, number, _) in &live {
        live_wanted.insert(
            (commit.clone(), format!("{ORG}/web")),
            (*number, "SUCCESSFUL"),
        );
    }
    let (mut superseded, mut wrong, mut repeated) = (0, 0, 0);
    let mut seen: HashMap<(String, String), usize> = HashMap::new();
    for p in &posts {
        let id = (p.commit.clone(), p.key.clone());
        let Some((number, state)) = wanted.get(&id).or_else(|| live_wanted.get(&id)) else {
            wrong += 1;
            continue;
        };
        match build_number(&p.url) {
            Some(n) if n < *number => {
                superseded += 1;
                if superseded <= 5 {
                    let newest = posts.iter().find(|q| {
                        q.commit == p.commit
                            && q.key == p.key
                            && build_number(&q.url) == Some(*number)
                    });
                    println!(
                        "superseded post: {} {} build {n} ({}) at {}, newest build {number} posted at {:?}",
                        p.commit,
                        p.key,
                        p.state,
                        p.posted_at,
                        newest.map(|q| q.posted_at)
                    );
                }
            }
            Some(n) if n == *number && p.state == *state => {
                let k = seen.entry(id).or_default();
                *k += 1;
                if *k > 1 {
                    repeated += 1;
                }
            }
            _ => wrong += 1,
        }
    }

    // Live latency: from sending the webhook to the fake accepting its status; `during`: of
    // the deliveries sent before the backlog was through.
    let (mut latencies, mut during) = (Vec::new(), Vec::new());
    let mut live_missing = 0;
    for (commit, number, sent) in &live {
        match posts
            .iter()
            .find(|p| &p.commit == commit && build_number(&p.url) == Some(*number))
        {
            Some(p) => {
                let l = secs_between(*sent, p.posted_at);
                latencies.push(l);
                if last.is_some_and(|d| *sent <= d) {
                    during.push(l);
                }
            }
            None => live_missing += 1,
        }
    }
    latencies.sort_by(f64::total_cmp);
    during.sort_by(f64::total_cmp);
    let live_during_n = live
        .iter()
        .filter(|(_, _, sent)| last.is_some_and(|d| *sent <= d))
        .count();

    let cycles: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("poll cycle"))
        .collect();
    for l in &cycles {
        println!("  [kitebridge] {l}");
    }
    let warnings = stderr.lines().filter(|l| l.contains(" WARN ")).count();
    let errors = stderr.lines().filter(|l| l.contains(" ERROR ")).count();
    println!("kitebridge log: {warnings} WARN lines, {errors} ERROR lines; the first:");
    let firsts = stderr.lines().filter(|l| l.contains(" WARN ")).take(8);
    for l in firsts.chain(stderr.lines().filter(|l| l.contains(" ERROR ")).take(8)) {
        println!("  [kitebridge] {l}");
    }
    if let Some((status, took)) = exited {
        println!(
            "kitebridge poll exited {status} after {:.2} s",
            took.as_secs_f64()
        );
    }

    println!("delivered {}/{distinct} distinct statuses", delivered.len());
    let (from_first, from_spawn) = match (last, first_request) {
        (Some(l), Some(f)) if delivered.len() == distinct => {
            (secs_between(f, l), secs_between(spawned_at, l))
        }
        _ => (f64::NAN, f64::NAN),
    };
    let bound_with_live =
        (distinct as f64 + live_during_n as f64 - f64::from(a.bucket)).max(0.0) / a.refill;
    println!(
        "time to deliver every distinct status: {from_first:.2} s from kitebridge's first Bitbucket request ({from_spawn:.2} s from process start); lower bound {bound:.2} s; ratio {:.3} (target <= 1.2)",
        from_first / bound
    );
    println!(
        "  counting the {live_during_n} live statuses sent meanwhile, which share the bucket: bound {bound_with_live:.2} s, ratio {:.3}",
        from_first / bound_with_live
    );
    let total = status_posts.len();
    println!(
        "status posts: {total} ({} accepted, {limited} answered 429 = {:.2}% (target <= 5%), {other_failed} other failures); {:.3} posts per delivered status",
        posts.len(),
        100.0 * limited as f64 / total.max(1) as f64,
        total as f64 / (delivered.len() + live.len() - live_missing).max(1) as f64
    );
    println!(
        "superseded states posted: {superseded} (target 0); repeated posts of a delivered state: {repeated}; posts matching no wanted status: {wrong}"
    );
    if a.mode == Mode::Serve {
        let mut codes: Vec<_> = codes.into_iter().collect();
        codes.sort();
        println!(
            "live webhooks: {} sent ({live_during_n} while the backlog drained), answers {codes:?}, {live_missing} never delivered; sent -> status accepted: p50 {:.3} s, p90 {:.3} s, max {:.3} s (target: within 2 s)",
            live.len(),
            percentile(&latencies, 50.0),
            percentile(&latencies, 90.0),
            latencies.last().copied().unwrap_or(f64::NAN),
        );
        println!(
            "  of those sent while the backlog drained: p50 {:.3} s, max {:.3} s",
            percentile(&during, 50.0),
            during.last().copied().unwrap_or(f64::NAN),
        );
    }
    println!(
        "RESULT mode={} distinct={distinct} delivered={} drain_s={from_first:.2} bound_s={bound:.2} ratio={:.3} posts={total} limited={limited} limited_pct={:.2} superseded_posted={superseded} live={} live_p50_s={:.3} live_max_s={:.3}",
        if a.mode == Mode::Serve {
            "serve"
        } else {
            "poll"
        },
        delivered.len(),
        from_first / bound,
        100.0 * limited as f64 / total.max(1) as f64,
        live.len(),
        percentile(&latencies, 50.0),
        latencies.last().copied().unwrap_or(f64::NAN),
    );
    let _ = std::fs::remove_dir_all(dir);
}
