//! The real `kitebridge serve` under clients that misbehave, and the edge every request passes:
//! half-sent requests are closed after the header timeout, SIGTERM exits within the shutdown
//! deadline whatever the clients do, every answer carries an `x-request-id`, and the rules API
//! shows the rules loaded at start-up. Loopback only; every wait is bounded.

mod support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use kitebridge_fakes::*;

const ORG: &str = DEFAULT_ORGANIZATION;
const API_TOKEN: &str = "api-token";

/// A running `kitebridge serve`; killed when dropped, so a failed assertion leaves nothing.
struct Serve {
    child: Child,
    base: String,
    addr: std::net::SocketAddr,
    dir: std::path::PathBuf,
    _fakes: (FakeBuildkite, FakeBitbucket),
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let dir =
        std::env::temp_dir().join(format!("kitebridge-{name}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Starts `kitebridge serve` on a loopback port against fake peers, with `extra` settings.
async fn serve(name: &str, extra: &[(&str, String)]) -> Serve {
    let bk = FakeBuildkite::start(FakeBuildkiteOptions::default()).await;
    let bb = FakeBitbucket::start(FakeBitbucketOptions::default()).await;
    let dir = temp_dir(name);
    let mut vars: HashMap<String, String> = [
        ("BUILDKITE_API_URL", bk.url()),
        ("BUILDKITE_API_TOKEN", DEFAULT_BUILDKITE_TOKEN.into()),
        ("BUILDKITE_ORGANIZATION", ORG.into()),
        ("BUILDKITE_WEBHOOK_TOKEN", "whk".into()),
        ("BITBUCKET_URL", bb.url()),
        ("BITBUCKET_TOKEN", DEFAULT_BITBUCKET_TOKEN.into()),
        ("KITEBRIDGE_API_TOKEN", API_TOKEN.into()),
        ("KITEBRIDGE_DB", dir.join("kb.db").display().to_string()),
        ("MONITOR_POLLING_INTERVAL", "1".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    for (k, v) in extra {
        vars.insert(k.to_string(), v.clone());
    }
    let (child, base) = support::spawn_serve(
        Command::new(env!("CARGO_BIN_EXE_kitebridge"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env_clear()
            .envs(&vars),
    );
    let addr = base.trim_start_matches("http://").parse().unwrap();
    Serve {
        child,
        base,
        addr,
        dir,
        _fakes: (bk, bb),
    }
}

/// `n` connections that each send the first half of a request and then nothing.
fn half_requests(addr: std::net::SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|_| {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
            s.write_all(b"POST /webhooks/buildkite HTTP/1.1\r\nHost: kitebridge\r\nContent-Len")
                .unwrap();
            s
        })
        .collect()
}

/// `n` connections that each send a request's headers and the first bytes of its body, then
/// nothing: requests in flight that only a deadline ends.
fn half_bodies(addr: std::net::SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|_| {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
            s.write_all(
                b"POST /webhooks/buildkite HTTP/1.1\r\nHost: kitebridge\r\n\
                  Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"event\":",
            )
            .unwrap();
            s
        })
        .collect()
}

/// Whether the server has closed `s` (end of stream or reset), waiting at most until `deadline`.
fn closed_by(s: &mut TcpStream, deadline: Instant) -> bool {
    let mut buf = [0u8; 512];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return true,
            // Whatever the server says before closing (a 408) is fine; keep reading to the end.
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false;
            }
            Err(_) => return true,
        }
    }
}

fn sigterm(child: &Child) {
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_requests_and_idle_connections_are_closed_after_the_header_timeout() {
    let s = serve(
        "header-timeout",
        &[("KITEBRIDGE_SERVER_HEADER_TIMEOUT", "2".into())],
    )
    .await;
    let started = Instant::now();
    let addr = s.addr;
    let closed = tokio::task::spawn_blocking(move || {
        let mut conns = half_requests(addr, 199);
        // And one kept alive after a whole request, then left idle.
        let mut idle = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
        idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: kitebridge\r\n\r\n")
            .unwrap();
        let mut head = [0u8; 12];
        idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        idle.read_exact(&mut head).unwrap();
        assert!(head.starts_with(b"HTTP/1.1 "), "{head:?}");
        conns.push(idle);
        let deadline = Instant::now() + Duration::from_secs(8);
        conns
            .iter_mut()
            .map(|c| closed_by(c, deadline))
            .filter(|closed| *closed)
            .count()
    })
    .await
    .unwrap();
    assert_eq!(closed, 200, "connections the server closed");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(8), "closing took {took:?}");

    // The server still answers.
    let health = reqwest::get(format!("{}/healthz", s.base)).await.unwrap();
    assert!(health.status().is_success() || health.status().as_u16() == 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_within_the_shutdown_deadline_whatever_clients_do() {
    let mut s = serve(
        "shutdown",
        &[
            // Long enough that only the shutdown deadline can end these connections.
            ("KITEBRIDGE_SERVER_HEADER_TIMEOUT", "120".into()),
            ("KITEBRIDGE_SHUTDOWN_TIMEOUT", "2".into()),
        ],
    )
    .await;
    let addr = s.addr;
    let conns = tokio::task::spawn_blocking(move || {
        let mut conns = half_requests(addr, 100);
        conns.extend(half_bodies(addr, 100));
        conns
    })
    .await
    .unwrap();
    // Let the server accept them all before the signal.
    let answered = reqwest::get(format!("{}/healthz", s.base)).await.unwrap();
    assert!(answered.status().as_u16() == 200 || answered.status().as_u16() == 503);

    let signalled = Instant::now();
    sigterm(&s.child);
    let deadline = signalled + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = s.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "serve did not exit within 10 s of SIGTERM (deadline 2 s)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
    let took = signalled.elapsed();
    assert!(
        took >= Duration::from_millis(1500),
        "exited after {took:?}: the requests in flight should have held it until the deadline"
    );
    drop(conns);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_carries_a_request_id() {
    let s = serve("request-id", &[]).await;
    let client = reqwest::Client::new();
    let made_up = client
        .get(format!("{}/healthz", s.base))
        .send()
        .await
        .unwrap();
    let id = made_up.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(!id.is_empty());

    // A caller's id is kept, on errors too.
    let missing = client
        .get(format!("{}/no/such/route", s.base))
        .header("x-request-id", "req-1234")
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(missing.headers()["x-request-id"], "req-1234");
    let body: serde_json::Value = missing.json().await.unwrap();
    assert_eq!(body["error"], "not_found");

    let refused = client
        .get(format!("{}/rules", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    assert!(refused.headers().contains_key("x-request-id"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rules_api_shows_the_rules_loaded_at_start_up() {
    let dir = temp_dir("rules-file");
    let file = dir.join("rules.json");
    let rule = |target: &str| {
        serde_json::json!({"rule": "pipeline.trigger_build.pipeline",
            "value": {"source_pipeline": "web", "target_pipeline": target}})
    };
    std::fs::write(
        &file,
        serde_json::json!({"deploy-web": rule("web-deploy")}).to_string(),
    )
    .unwrap();
    let s = serve(
        "rules",
        &[("KITEBRIDGE_RULES_FILE", file.display().to_string())],
    )
    .await;
    let client = reqwest::Client::new();
    let names = || async {
        let answer = client
            .get(format!("{}/rules", s.base))
            .bearer_auth(API_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
        let body: serde_json::Value = answer.json().await.unwrap();
        body["rules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["name"].as_str().unwrap().to_string(),
                    r["origin"].as_str().unwrap().to_string(),
                    r["value"]["target_pipeline"].as_str().unwrap().to_string(),
                )
            })
            .collect::<Vec<_>>()
    };
    let loaded = vec![(
        "deploy-web".to_string(),
        "config".to_string(),
        "web-deploy".to_string(),
    )];
    assert_eq!(names().await, loaded);

    // The file changes on disk (another rule, and the first one changed); the process keeps
    // the rules it fires, and the API shows those.
    std::fs::write(
        &file,
        serde_json::json!({"deploy-api": rule("api-deploy"), "deploy-web": rule("elsewhere")})
            .to_string(),
    )
    .unwrap();
    assert_eq!(names().await, loaded);
    let one = client
        .get(format!("{}/rules/deploy-api", s.base))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(one.status(), 404);
    let _ = std::fs::remove_dir_all(dir);
}
