//! The dashboard's pages through the real `kitebridge serve` binary on loopback, for a project
//! with many releases: time to the whole answer (an upper bound of the server's time: loopback
//! adds a few microseconds) and bytes sent, per page.
//!
//! Seeds, through the releases API, a project with three environments and no build pipeline
//! (a cut counts as built at once) with `--releases` releases; a third of them deployed to
//! staging and a tenth to production by status updates (`PATCH .../deployments`). Then signs in
//! as a browser does and requests each page `--n` times, one after another, on one keep-alive
//! connection.
//!
//! Usage: `bench-dashboard [--bin PATH] [--releases N] [--n N]` (default
//! `$CARGO_TARGET_DIR/release/kitebridge`, else `target/release/kitebridge`; 1,000 releases;
//! 300 requests per page).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

const TOKEN: &str = "dashboard-bench-token";
const SHA: &str = "4e1f0c9b7a2d3e5f6a8b9c0d1e2f3a4b5c6d7e8f";

struct Args {
    bin: PathBuf,
    releases: usize,
    n: usize,
}

fn args() -> Args {
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let mut out = Args {
        bin: PathBuf::from(target).join("release").join("kitebridge"),
        releases: 1000,
        n: 300,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match (a.as_str(), it.next()) {
            ("--bin", Some(v)) => out.bin = v.into(),
            ("--releases", Some(v)) => out.releases = v.parse().unwrap_or_else(|_| usage()),
            ("--n", Some(v)) => out.n = v.parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }
    out
}

fn usage() -> ! {
    eprintln!("usage: bench-dashboard [--bin PATH_TO_KITEBRIDGE] [--releases N] [--n N]");
    std::process::exit(2)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = args();
    let dir =
        std::env::temp_dir().join(format!("kitebridge-bench-dashboard-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut child = Command::new(&args.bin)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env_clear()
        .env("KITEBRIDGE_API_TOKEN", TOKEN)
        .env("KITEBRIDGE_DB", dir.join("kb.db"))
        // Nothing to poll or report: no organization's builds are watched.
        .env("BUILDKITE_API_URL", "http://127.0.0.1:9")
        .env("BUILDKITE_API_TOKEN", "unused")
        .env("BUILDKITE_ORGANIZATION", "acme-inc")
        .env("BUILDKITE_WEBHOOK_TOKEN", "unused")
        .env("BITBUCKET_URL", "http://127.0.0.1:9")
        .env("BITBUCKET_TOKEN", "unused")
        .env("MONITOR_POLLING_INTERVAL", "86400")
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", args.bin.display()));
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let base = line.trim().rsplit(' ').next().unwrap().to_string();

    let api = reqwest::Client::new();
    let bearer = format!("Bearer {TOKEN}");
    let project = json!({
        "environments": [
            {"name": "staging"},
            {"name": "production", "requires": "staging"},
            {"name": "eu-production", "requires": "staging"}
        ]
    });
    let r = api
        .put(format!("{base}/projects/web"))
        .header("authorization", &bearer)
        .json(&project)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let seeded = Instant::now();
    for i in 0..args.releases {
        let r = api
            .post(format!("{base}/projects/web/releases"))
            .header("authorization", &bearer)
            .json(&json!({"commit": SHA, "branch": "main", "bump": "patch"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
        let v: serde_json::Value = r.json().await.unwrap();
        let candidate = v["candidate"]["version"].as_str().unwrap().to_string();
        let mut envs = Vec::new();
        if i % 3 == 0 {
            envs.push("staging");
        }
        if i % 9 == 0 {
            envs.push("production");
        }
        for env in envs {
            let r = api
                .patch(format!(
                    "{base}/projects/web/environments/{env}/deployments"
                ))
                .header("authorization", &bearer)
                .json(&json!({"release_candidate_version": candidate, "status": "success"}))
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success(), "{}", r.text().await.unwrap());
        }
    }
    eprintln!(
        "seeded {} releases in {:.1} s",
        args.releases,
        seeded.elapsed().as_secs_f64()
    );

    // Sign in as a browser does.
    let browser = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let page = browser
        .get(format!("{base}/ui/sign-in"))
        .send()
        .await
        .unwrap();
    let pre = cookie(&page, "kb_pre");
    let html = page.text().await.unwrap();
    let csrf = csrf_of(&html);
    let signed = browser
        .post(format!("{base}/ui/sign-in"))
        .header("cookie", &pre)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("csrf={csrf}&token={TOKEN}&next=%2Fui%2F"))
        .send()
        .await
        .unwrap();
    assert_eq!(signed.status(), 303);
    let session = cookie(&signed, "kb_session");

    println!(
        "{:<44} {:>8} {:>8} {:>8} {:>9}",
        "page", "p50 ms", "p99 ms", "max ms", "bytes"
    );
    for (path, live) in [
        ("/ui/", false),
        ("/ui/projects/web", false),
        ("/ui/projects/web", true),
        ("/ui/projects/web/environments/staging", false),
        ("/ui/operator", false),
    ] {
        let mut times = Vec::with_capacity(args.n);
        let mut bytes = 0;
        for _ in 0..args.n {
            let mut req = browser
                .get(format!("{base}{path}"))
                .header("cookie", &session);
            if live {
                req = req.header("x-kitebridge-live", "1");
            }
            let t = Instant::now();
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 200, "{path}");
            let body = r.bytes().await.unwrap();
            times.push(t.elapsed());
            bytes = body.len();
        }
        times.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let name = if live {
            format!("{path} (live refresh)")
        } else {
            path.to_string()
        };
        println!(
            "{name:<44} {:>8.2} {:>8.2} {:>8.2} {:>9}",
            ms(percentile(&times, 0.5)),
            ms(percentile(&times, 0.99)),
            ms(*times.last().unwrap()),
            bytes
        );
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

fn cookie(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with(&format!("{name}=")))
        .and_then(|c| c.split(';').next())
        .unwrap_or_else(|| panic!("no {name} cookie"))
        .to_string()
}

fn csrf_of(html: &str) -> String {
    let key = "name=\"csrf\" value=\"";
    let at = html.find(key).expect("a CSRF token in the page") + key.len();
    html[at..at + html[at..].find('"').unwrap()].to_string()
}
