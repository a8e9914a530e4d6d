//! Shared set-up for kitebridge's integration tests: real local peers, started here.
//!
//! - [`dynamodb`]: moto's server (the DynamoDB emulator, from PyPI) on a free loopback port,
//!   one per test binary, stopped when the test binary exits; a fresh table per test.
//!
//! A peer that cannot be started fails the test with a message saying how to install it; no test
//! skips silently.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::Client;
use kitebridge::store::DynamoKv;

/// The emulator's endpoint, e.g. `http://127.0.0.1:41234`.
pub struct Emulator {
    pub endpoint: String,
    // Held so the emulator lives as long as the test binary; see `start_moto`.
    _child: Child,
}

static MOTO: OnceLock<Emulator> = OnceLock::new();

/// Environment variable naming the emulator command (default: `python3 tests/support/moto_serial.py`).
pub const MOTO_COMMAND_VAR: &str = "KITEBRIDGE_MOTO_SERVER";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("cannot find a free loopback port: {e}"))
}

/// Starts moto's server under a tiny shell guard that kills it when our stdin closes, i.e. when
/// the test binary exits however it exits (statics are never dropped, so no `Drop` could).
fn start_moto() -> Emulator {
    // Default: moto behind a lock that serializes requests (see moto_serial.py for why).
    let command = std::env::var(MOTO_COMMAND_VAR).unwrap_or_else(|_| {
        format!(
            "python3 {}/support/moto_serial.py",
            env!("CARGO_MANIFEST_DIR")
        )
    });
    let mut last_error = String::new();
    for _ in 0..3 {
        let port = free_port();
        let script = format!(
            "{command} -H 127.0.0.1 -p {port} >/dev/null 2>&1 & pid=$!; echo started; \
             while read -r _; do :; done; kill $pid 2>/dev/null; wait $pid 2>/dev/null"
        );
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(&script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run sh to start the DynamoDB emulator: {e}"));
        if let Some(out) = child.stdout.take() {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
        }
        let endpoint = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Emulator {
                    endpoint,
                    _child: child,
                };
            }
            if let Ok(Some(status)) = child.try_wait() {
                last_error = format!("it exited with {status}");
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if last_error.is_empty() {
            last_error = "it did not answer within 30 s".into();
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!(
        "the DynamoDB emulator could not be started ({last_error}). Install it with \
         `pip install \"moto[server]==5.2.1\"` (the CI script does), or set {MOTO_COMMAND_VAR} \
         to its command."
    )
}

/// The emulator for this test binary, started on first use.
pub fn emulator() -> &'static Emulator {
    MOTO.get_or_init(start_moto)
}

/// The AWS SDK configuration for the emulator: its endpoint, `us-east-1`, static test
/// credentials. Every SDK client in the tests is built from it.
pub fn sdk_config() -> aws_config::SdkConfig {
    use aws_sdk_dynamodb::config::{Credentials, SharedCredentialsProvider};
    aws_config::SdkConfig::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(&emulator().endpoint)
        .credentials_provider(SharedCredentialsProvider::new(Credentials::new(
            "testing",
            "testing",
            None,
            None,
            "kitebridge-tests",
        )))
        .build()
}

/// A real `aws-sdk-dynamodb` client pointed at the emulator.
pub async fn dynamodb_client() -> Client {
    Client::new(&sdk_config())
}

/// A fresh table, created as the SAM template creates it.
pub async fn dynamodb() -> DynamoKv {
    let table = format!(
        "kitebridge-test-{}",
        ulid::Ulid::new().to_string().to_lowercase()
    );
    let kv = DynamoKv::new(dynamodb_client().await, table);
    kv.create_table()
        .await
        .unwrap_or_else(|e| panic!("cannot create a table in the DynamoDB emulator: {e}"));
    kv
}

/// A fresh table in the emulator and the settings a Lambda binary needs to use it
/// (`KITEBRIDGE_TABLE`, `AWS_ENDPOINT_URL`): the SDK finds the emulator as it would find
/// DynamoDB, through its standard configuration.
pub async fn dynamodb_settings() -> std::collections::HashMap<String, String> {
    let kv = dynamodb().await;
    std::collections::HashMap::from([
        ("KITEBRIDGE_TABLE".to_string(), kv.table().to_string()),
        ("AWS_ENDPOINT_URL".to_string(), emulator().endpoint.clone()),
    ])
}

pub mod lambda;

pub mod harness {
    //! A kitebridge wired to fake Buildkite and Bitbucket servers on loopback, built through the
    //! same start-up code the binaries use ([`kitebridge::bootstrap::app_state`]).

    use std::collections::HashMap;

    use kitebridge::config::Config;
    use kitebridge::http::AppState;
    use kitebridge::store::{SqliteKv, Store};
    use kitebridge_fakes::*;

    pub const ORG: &str = DEFAULT_ORGANIZATION;
    pub const WEBHOOK_TOKEN: &str = "whk-test-token";
    pub const API_TOKEN: &str = "api-test-token";

    /// Environment variables for a kitebridge talking to these fakes.
    pub fn env(bk: &FakeBuildkite, bb: &FakeBitbucket) -> HashMap<String, String> {
        HashMap::from(
            [
                ("BUILDKITE_API_URL", bk.url()),
                ("BUILDKITE_API_TOKEN", DEFAULT_BUILDKITE_TOKEN.to_string()),
                ("BUILDKITE_ORGANIZATION", ORG.to_string()),
                ("BUILDKITE_WEBHOOK_TOKEN", WEBHOOK_TOKEN.to_string()),
                ("BITBUCKET_URL", bb.url()),
                ("BITBUCKET_USERNAME", DEFAULT_BITBUCKET_USER.to_string()),
                ("BITBUCKET_PASSWORD", DEFAULT_BITBUCKET_PASSWORD.to_string()),
                ("KITEBRIDGE_API_TOKEN", API_TOKEN.to_string()),
                ("KITEBRIDGE_HTTP_TIMEOUT", "2".to_string()),
            ]
            .map(|(k, v)| (k.to_string(), v)),
        )
    }

    pub fn config(vars: &HashMap<String, String>) -> Config {
        Config::from_lookup(|n| vars.get(n).cloned())
            .unwrap_or_else(|e| panic!("test configuration: {e}"))
    }

    /// An app on an in-memory embedded store.
    pub fn app(vars: &HashMap<String, String>) -> AppState {
        app_on(
            vars,
            Store::new(SqliteKv::in_memory().unwrap_or_else(|e| panic!("sqlite: {e}"))),
        )
    }

    pub fn app_on(vars: &HashMap<String, String>, store: Store) -> AppState {
        kitebridge::bootstrap::app_state(config(vars), store)
            .unwrap_or_else(|e| panic!("app state: {e}"))
    }

    /// A fake Buildkite and a fake Bitbucket holding repository `PROJ/web`, with one Buildkite
    /// pipeline per slug in `pipelines`, each cloning that repository.
    pub async fn fakes_for(pipelines: &[&str]) -> (FakeBuildkite, FakeBitbucket) {
        let bk = FakeBuildkite::start(FakeBuildkiteOptions::default()).await;
        let bb = FakeBitbucket::start(FakeBitbucketOptions::default()).await;
        bb.add_repository("PROJ", "web");
        for slug in pipelines {
            bk.add_pipeline(Pipeline::new(
                ORG,
                *slug,
                *slug,
                clone_url(&bb, "PROJ", "web"),
            ));
        }
        (bk, bb)
    }

    /// A Data Center clone URL for the fake Bitbucket's host.
    pub fn clone_url(bb: &FakeBitbucket, project: &str, repo: &str) -> String {
        format!(
            "ssh://git@{}:7999/{}/{}.git",
            bb.addr().ip(),
            project.to_lowercase(),
            repo
        )
    }

    /// A full SHA made from a number.
    pub fn sha(n: u64) -> String {
        format!("{n:040x}")
    }
}
