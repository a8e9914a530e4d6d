//! Latency benchmark of the webhook through the real `kitebridge serve` binary on loopback.
//!
//! Starts a fake Bitbucket (Data Center) and a fake Buildkite in this process, then the
//! `kitebridge` binary configured by environment to use them (a fresh embedded store in a temp
//! directory; a poll interval of a day so the poll loop stays out of the way). Measures:
//!
//! - cold start: from spawning the process to its first answered `GET /healthz`;
//! - for N signed `build.finished` deliveries of distinct builds, sent one after another: the
//!   time from just before sending to the moment the fake Bitbucket accepted the status post
//!   (its `posted_at`), and the webhook's own round trip.
//!
//! Usage: `bench-webhook-latency [--bin PATH] [--n N] [--env NAME=VALUE]...` (default:
//! `$CARGO_TARGET_DIR/release/kitebridge`, else `target/release/kitebridge`; N = 2000; `--env`
//! adds a variable to kitebridge's otherwise cleared environment).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use chrono::Utc;
use kitebridge_fakes::{
    Build, BuildState, DEFAULT_BITBUCKET_TOKEN, DEFAULT_BUILDKITE_TOKEN, FakeBitbucket,
    FakeBitbucketOptions, FakeBuildkite, FakeBuildkiteOptions, Pipeline, WebhookAuth, WebhookEvent,
};

const ORG: &str = "acme-inc";
const PIPELINE: &str = "web";
const KEY: &str = "acme-inc/web";
const TOKEN: &str = "whk-bench-token-3c9d1e";
const WARM_UP: usize = 50;

struct Args {
    bin: PathBuf,
    n: usize,
    /// Extra `NAME=VALUE` variables for kitebridge (e.g. `SSL_CERT_FILE=...`).
    env: Vec<(String, String)>,
}

fn args() -> Args {
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let mut out = Args {
        bin: PathBuf::from(target).join("release").join("kitebridge"),
        n: 2000,
        env: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match (a.as_str(), it.next()) {
            ("--bin", Some(v)) => out.bin = v.into(),
            ("--n", Some(v)) => out.n = v.parse().unwrap_or_else(|_| usage()),
            ("--env", Some(v)) => match v.split_once('=') {
                Some((k, v)) => out.env.push((k.to_owned(), v.to_owned())),
                None => usage(),
            },
            _ => usage(),
        }
    }
    out
}

fn usage() -> ! {
    eprintln!(
        "usage: bench-webhook-latency [--bin PATH_TO_KITEBRIDGE] [--n DELIVERIES] [--env NAME=VALUE]..."
    );
    std::process::exit(2)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free loopback port: {e}"))
}

/// One `GET /healthz` over a fresh connection; the status code, or `None` if nothing answers.
fn healthz(port: u16) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn summary(name: &str, mut ms: Vec<f64>) {
    ms.sort_by(f64::total_cmp);
    println!(
        "{name}: n={} p50={:.3} ms p90={:.3} ms p99={:.3} ms max={:.3} ms",
        ms.len(),
        percentile(&ms, 50.0),
        percentile(&ms, 90.0),
        percentile(&ms, 99.0),
        ms.last().copied().unwrap_or(f64::NAN)
    );
}

/// Spawns `kitebridge serve`, then polls `GET /healthz` as fast as the loopback allows; prints
/// the time to the first answer (and to the "kitebridge serving" log line).
fn start(bin: &Path, env: &[(&str, String)], port: u16, what: &str) -> Child {
    let listen = format!("127.0.0.1:{port}");
    let started = Instant::now();
    let mut child = Command::new(bin)
        .args(["serve", "--listen", &listen])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    let (tx, rx) = mpsc::channel::<Duration>();
    if let Some(err) = child.stderr.take() {
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if !sent && line.contains("kitebridge serving") {
                    let _ = tx.send(started.elapsed());
                    sent = true;
                }
                eprintln!("  [kitebridge] {line}");
            }
        });
    }
    let (ready, first_status) = loop {
        if let Some(code) = healthz(port) {
            break (started.elapsed(), code);
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("kitebridge exited during start-up: {status}");
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("kitebridge did not answer within 30 s");
        }
        std::thread::sleep(Duration::from_micros(200));
    };
    let listening = rx.recv_timeout(Duration::from_secs(5)).ok();
    println!(
        "cold start, {what}: first answered GET /healthz ({first_status}) after {:.2} ms; \"kitebridge serving\" line after {}",
        ready.as_secs_f64() * 1e3,
        listening.map_or("(not seen)".to_owned(), |d| format!(
            "{:.2} ms",
            d.as_secs_f64() * 1e3
        ))
    );
    child
}

fn main() {
    let args = args();
    if !args.bin.is_file() {
        eprintln!(
            "{} does not exist: build it with `cargo build --release -p kitebridge-cli` or pass --bin",
            args.bin.display()
        );
        std::process::exit(1);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("tokio: {e}"));

    let (bk, bb) = rt.block_on(async {
        let bk = FakeBuildkite::start(FakeBuildkiteOptions::default()).await;
        bk.add_pipeline(Pipeline::new(
            ORG,
            PIPELINE,
            "Web",
            "ssh://git@127.0.0.1:7999/proj/web.git",
        ));
        let bb = FakeBitbucket::start(FakeBitbucketOptions::default()).await;
        bb.add_repository("PROJ", "web");
        (bk, bb)
    });

    let dir = std::env::temp_dir().join(format!("kitebridge-bench-{}", ulid::Ulid::new()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");

    let mut env: Vec<(&str, String)> = vec![
        ("BITBUCKET_URL", bb.url()),
        ("BITBUCKET_TOKEN", DEFAULT_BITBUCKET_TOKEN.into()),
        ("BUILDKITE_API_URL", bk.url()),
        ("BUILDKITE_API_TOKEN", DEFAULT_BUILDKITE_TOKEN.into()),
        ("BUILDKITE_ORGANIZATION", ORG.into()),
        ("BUILDKITE_WEBHOOK_TOKEN", TOKEN.into()),
        ("KITEBRIDGE_API_TOKEN", "bench-api-token".into()),
        (
            "KITEBRIDGE_DB",
            dir.join("kitebridge.db").display().to_string(),
        ),
        ("MONITOR_POLLING_INTERVAL", "86400".into()),
        // Start-up lines only: per-delivery lines stay off, as with the default level.
        (
            "RUST_LOG",
            "warn,kitebridge=info,kitebridge::webhook=warn".into(),
        ),
        ("KITEBRIDGE_LOG_FORMAT", "text".into()),
    ];
    env.extend(args.env.iter().map(|(k, v)| (k.as_str(), v.clone())));
    let mut child = start(&args.bin, &env, port, "first start (new store)");
    // Deliveries, one after another, over one keep-alive connection.
    let url = format!("http://{listen}/webhooks/buildkite");
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap_or_else(|e| panic!("reqwest: {e}"));
    let auth = WebhookAuth::Signature {
        token: TOKEN.to_owned(),
        timestamp: None,
    };
    let total = WARM_UP + args.n;
    let mut sent_at = Vec::with_capacity(total);
    let mut round_trips = Vec::with_capacity(total);
    rt.block_on(async {
        for i in 0..total {
            let commit: String = (0..40)
                .map(|_| char::from_digit(fastrand::u32(0..16), 16).unwrap_or('0'))
                .collect();
            let build = bk.add_build(
                Build::new(ORG, PIPELINE, commit.clone(), "main").with_state(BuildState::Passed),
            );
            let Some(d) = bk.webhook(
                ORG,
                PIPELINE,
                build.number,
                WebhookEvent::BuildFinished,
                &auth,
            ) else {
                panic!("the fake has the build it just added");
            };
            let mut req = client.post(&url).body(d.body.clone());
            for (k, v) in &d.headers {
                req = req.header(k.as_str(), v.as_str());
            }
            let t0 = Utc::now();
            let i0 = Instant::now();
            let resp = req
                .send()
                .await
                .unwrap_or_else(|e| panic!("delivery {i}: {e}"));
            let status = resp.status();
            let text = resp.text().await.unwrap_or_default();
            let rtt = i0.elapsed();
            assert!(status.is_success(), "delivery {i}: {status} {text}");
            if i >= WARM_UP {
                sent_at.push((commit, t0));
                round_trips.push(rtt.as_secs_f64() * 1e3);
            }
        }
    });

    let posts = bb.posts();
    let mut to_post = Vec::with_capacity(sent_at.len());
    for (commit, t0) in &sent_at {
        let Some(p) = posts.iter().find(|p| &p.commit == commit && p.key == KEY) else {
            panic!("no status was posted for {commit}");
        };
        let ms = (p.posted_at - *t0).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e3;
        to_post.push(ms);
    }
    summary("webhook sent -> Bitbucket status received", to_post);
    summary("webhook round trip (200 answered)", round_trips);

    // Stop the process we started (by its id), then time a restart on the same store.
    let _ = child.kill();
    let _ = child.wait();
    let mut child = start(&args.bin, &env, free_port(), "restart (existing store)");
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    drop(bk);
    drop(bb);
}
