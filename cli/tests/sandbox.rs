//! The real `kitebridge sandbox`: with `--exit` it plays the whole story against the simulated
//! Buildkite and Bitbucket and exits 0 only if every step did what it should (and 1 when they
//! cannot); without it, it stays up, answers `/healthz` at the printed address and exits 0 on
//! SIGTERM. Either way its temporary directory is gone afterwards.

#![cfg(feature = "sandbox")]

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const C1: &str = "4e1f0c9b7a2d3e5f6a8b9c0d1e2f3a4b5c6d7e8f";
const C3: &str = "c0ffee00d15ea5e0ba5eba11deadbeef0b5e55ed";

fn sandbox(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kitebridge"));
    c.arg("sandbox")
        .args(args)
        // Hermetic: no proxy, no log settings from the developer's shell.
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// Stdout line by line as it comes, and stderr whole at the end, read on threads so the child
/// never blocks on a full pipe.
struct Output {
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    stderr: std::thread::JoinHandle<String>,
}

impl Output {
    fn of(child: &mut Child) -> Output {
        let stdout = child.stdout.take().expect("stdout piped");
        let mut stderr = child.stderr.take().expect("stderr piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        Output {
            lines,
            seen: Vec::new(),
            stderr,
        }
    }

    /// Reads lines until one contains `needle` (returned), or panics at `deadline`.
    fn until(&mut self, needle: &str, deadline: Instant) -> String {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no line with {needle:?} in time; output so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Everything printed (the child has exited), and stderr.
    fn finish(mut self) -> (String, String) {
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(10)) {
            self.seen.push(line);
        }
        let stderr = self.stderr.join().unwrap_or_default();
        (self.seen.join("\n"), stderr)
    }
}

fn wait(child: &mut Child, deadline: Instant) -> ExitStatus {
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("kitebridge sandbox did not exit in time");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The value printed after `name=` on its own line.
fn var<'a>(out: &'a str, name: &str) -> &'a str {
    let prefix = format!("{name}=");
    out.lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("{name} not printed:\n{out}"))
}

fn is_ulid(s: &str) -> bool {
    s.len() == 26 && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// The temporary directory the sandbox said it uses (the store's parent).
fn temp_dir(out: &str) -> std::path::PathBuf {
    let line = out
        .lines()
        .find(|l| l.contains("(deleted on exit)"))
        .unwrap_or_else(|| panic!("no store line:\n{out}"));
    let path = line
        .split_whitespace()
        .find(|w| w.ends_with("kitebridge.db"))
        .unwrap_or_else(|| panic!("no store path in {line:?}"));
    std::path::Path::new(path)
        .parent()
        .expect("the store is in a directory")
        .to_path_buf()
}

/// Position of the first line containing every needle, after line `from`.
fn line_with(out: &str, from: usize, needles: &[&str]) -> usize {
    out.lines()
        .enumerate()
        .skip(from)
        .find(|(_, l)| needles.iter().all(|n| l.contains(n)))
        .map(|(i, _)| i)
        .unwrap_or_else(|| panic!("no line with {needles:?} after line {from}:\n{out}"))
}

#[test]
fn exit_plays_the_whole_story_and_says_what_happened() {
    let mut child = sandbox(&["--exit", "--listen", "127.0.0.1:0", "--pace-ms", "0"])
        .spawn()
        .expect("run kitebridge");
    let output = Output::of(&mut child);
    let status = wait(&mut child, Instant::now() + Duration::from_secs(60));
    let (out, stderr) = output.finish();
    assert!(status.success(), "{status:?}\n{out}\nstderr:\n{stderr}");

    // The simulations are labelled as such, with their addresses; kitebridge's real one.
    assert!(
        out.contains("SIMULATED Buildkite (not the real one) at http://127.0.0.1:"),
        "{out}"
    );
    assert!(out.contains("SIMULATED Bitbucket"), "{out}");
    let listen = line_with(&out, 0, &["kitebridge listening on http://127.0.0.1:"]);
    let port = out.lines().nth(listen).unwrap().rsplit(':').next().unwrap();
    assert!(port.parse::<u16>().is_ok_and(|p| p != 0), "{out}");
    for line in out.lines().filter(|l| l.contains("Bitbucket received")) {
        assert!(line.contains("SIMULATED"), "{line}");
    }

    // Build #1: INPROGRESS then FAILED on its commit, posted to the simulated Bitbucket.
    let step2 = line_with(&out, 0, &["[2/8]"]);
    let inprogress = line_with(&out, step2, &["Bitbucket received: INPROGRESS", "Web #1"]);
    let failed = line_with(&out, inprogress, &["Bitbucket received: FAILED", "Web #1"]);
    line_with(
        &out,
        failed,
        &["[ok] commit 4e1f0c9: Bitbucket shows INPROGRESS, then FAILED"],
    );
    // Build #2: SUCCESSFUL after it.
    let step3 = line_with(&out, failed, &["[3/8]"]);
    line_with(&out, step3, &["Bitbucket received: SUCCESSFUL", "Web #2"]);
    // Build #3: no webhook, the poll loop reported it.
    let step4 = line_with(&out, step3, &["[4/8]"]);
    line_with(&out, step4, &["[ok] the poll loop found build #3"]);

    // The release build's variables, with values.
    let cut_id = var(&out, "AVIATOR_RELEASE_CUT_ID");
    assert!(is_ulid(cut_id), "{cut_id:?}");
    assert_eq!(var(&out, "AVIATOR_RELEASE_CANDIDATE_VERSION"), "0.1.0-rc1");
    assert_eq!(var(&out, "AVIATOR_RELEASE_CUT_COMMIT_HASH"), C3);
    line_with(
        &out,
        step4,
        &["[ok] release 0.1.0: candidate 0.1.0-rc1 is built"],
    );

    // The deployment: its id in the deploy build's env, and it succeeded.
    let deployment = var(&out, "AVIATOR_DEPLOYMENT_ID");
    assert!(is_ulid(deployment), "{deployment:?}");
    line_with(
        &out,
        step4,
        &[&format!(
            "[ok] deployment {deployment} of 0.1.0-rc1 to staging succeeded"
        )],
    );

    // The summary and the commands to paste.
    let step7 = line_with(&out, step4, &["[7/8] The dashboard shows what runs where"]);
    line_with(
        &out,
        step7,
        &["[ok] the dashboard shows 0.1.0-rc1 in staging, ready for production"],
    );
    let summary = line_with(&out, step7, &["[8/8] What kitebridge did"]);
    line_with(
        &out,
        summary,
        &[&C1[..7], "acme-inc/web", "FAILED", "Web #1"],
    );
    line_with(
        &out,
        summary,
        &[
            "acme-inc/web-release",
            "#1",
            "AVIATOR_RELEASE_CANDIDATE_VERSION=0.1.0-rc1",
        ],
    );
    line_with(&out, summary, &["curl -s http://127.0.0.1:", "/healthz"]);
    line_with(
        &out,
        summary,
        &[
            "Authorization: Bearer sandbox-api-token",
            "/projects/web/releases",
        ],
    );
    assert!(
        out.contains("Story: every step did what it should."),
        "{out}"
    );
    assert!(!out.contains("[not as expected]"), "{out}");

    // The serve stack's logs (warnings and errors by default) stay quiet on the happy path.
    assert!(stderr.trim().is_empty(), "stderr:\n{stderr}");
    let dir = temp_dir(&out);
    assert!(!dir.exists(), "{} was not removed", dir.display());
}

#[test]
fn exit_is_not_zero_when_the_story_goes_wrong() {
    // kitebridge's HTTP client honours HTTP_PROXY; a proxy that refuses every connection keeps
    // it from reaching the simulations, so the steps cannot do what they should.
    let mut cmd = sandbox(&["--exit", "--listen", "127.0.0.1:0", "--pace-ms", "0"]);
    cmd.env("HTTP_PROXY", "http://127.0.0.1:9");
    let mut child = cmd.spawn().expect("run kitebridge");
    let output = Output::of(&mut child);
    let status = wait(&mut child, Instant::now() + Duration::from_secs(90));
    let (out, stderr) = output.finish();
    assert_eq!(status.code(), Some(1), "{out}\nstderr:\n{stderr}");
    assert!(out.contains("NO_PROXY"), "the proxy is pointed out:\n{out}");
    assert!(out.contains("[not as expected]"), "{out}");
    assert!(out.contains("did not do what they should"), "{out}");
    assert!(
        !out.contains("Story: every step did what it should."),
        "{out}"
    );
    let dir = temp_dir(&out);
    assert!(!dir.exists(), "{} was not removed", dir.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_exit_it_stays_up_until_sigterm() {
    let mut child = sandbox(&["--listen", "127.0.0.1:0", "--pace-ms", "0"])
        .spawn()
        .expect("run kitebridge");
    let mut output = Output::of(&mut child);
    let deadline = Instant::now() + Duration::from_secs(60);
    let line = output.until("kitebridge listening on ", deadline);
    let base = line.trim().rsplit(' ').next().unwrap().to_string();
    assert!(base.starts_with("http://127.0.0.1:"), "{line}");
    output.until("press Ctrl-C to stop", deadline);

    // Still up after the story: kitebridge answers at the printed address.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(child.try_wait().unwrap().is_none(), "exited on its own");
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let resp = client.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let health: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(health["status"], "ok", "{health}");

    // SIGTERM: a clean stop, exit 0, nothing left behind.
    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = wait(&mut child, Instant::now() + Duration::from_secs(20));
    let (out, stderr) = output.finish();
    assert!(status.success(), "{status:?}\n{out}\nstderr:\n{stderr}");
    assert!(out.contains("Stopped; removed"), "{out}");
    let dir = temp_dir(&out);
    assert!(!dir.exists(), "{} was not removed", dir.display());
}
