//! The real `kitebridge` binary: every case of `tests/fixtures/conditional.json` and
//! `tests/fixtures/conditional_upstream.json` (skips excepted, counted and printed) and every
//! `Interpolate` case of `tests/fixtures/interpolate.json` through `--batch`, single cases, exit
//! codes and stderr for bad usage, and `rules check` on a webhook payload.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{Value, json};

const CONDITIONAL: &str = include_str!("../../tests/fixtures/conditional.json");
const UPSTREAM: &str = include_str!("../../tests/fixtures/conditional_upstream.json");
const INTERPOLATE: &str = include_str!("../../tests/fixtures/interpolate.json");
const PASSED: &str = "../tests/fixtures/webhooks/build.finished.passed.json";
const RUNNING: &str = "../tests/fixtures/webhooks/build.running.json";

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kitebridge"))
}

fn temp_file(contents: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let path = std::env::temp_dir().join(format!(
        "kitebridge-cli-test-{}-{}.json",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&path, contents).expect("write temp file");
    path
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("run kitebridge")
}

fn lines(out: &Output) -> Vec<Value> {
    String::from_utf8(out.stdout.clone())
        .expect("UTF-8 output")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

fn batch_of(cases: &[Value], fields: &[&str]) -> String {
    let mut s = String::new();
    for c in cases {
        let mut line = serde_json::Map::new();
        for f in fields {
            if let Some(v) = c.get(*f) {
                line.insert((*f).to_owned(), v.clone());
            }
        }
        s.push_str(&Value::Object(line).to_string());
        s.push('\n');
    }
    s
}

/// Runs every case of a conditional fixture but those with a `skip_reason` through one
/// `eval --batch` and checks each answer; returns how many ran.
fn conditional_fixture_through_the_batch(fixture: &str, min_cases: usize) -> usize {
    let all: Vec<Value> = serde_json::from_str(fixture).unwrap();
    let (skipped, cases): (Vec<Value>, Vec<Value>) = all
        .into_iter()
        .partition(|c| c.get("skip_reason").is_some());
    for c in &skipped {
        eprintln!("skipped {:?}: {}", c["name"], c["skip_reason"]);
    }
    assert!(cases.len() >= min_cases);
    // The whole case, extra fields and all: the batch ignores what it does not know.
    let mut input = String::new();
    for c in &cases {
        input.push_str(&c.to_string());
        input.push('\n');
    }
    let file = temp_file(&input);
    let out = run(&["eval", "--batch", file.to_str().unwrap()]);
    let got = lines(&out);
    assert_eq!(got.len(), cases.len(), "one line per case");
    let mut failures = Vec::new();
    for (i, (case, got)) in cases.iter().zip(&got).enumerate() {
        let ok = match (case.get("expected"), case.get("expected_error")) {
            (Some(Value::String(s)), _) if s == "valid" => *got == json!({"valid": true}),
            (Some(want), _) => *got == json!({"value": want}),
            (None, Some(kind)) => {
                got["error"]["kind"] == *kind
                    && case
                        .get("expected_error_message_contains")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .all(|n| {
                            got["error"]["message"]
                                .as_str()
                                .is_some_and(|m| m.contains(n.as_str().unwrap_or_default()))
                        })
            }
            _ => false,
        };
        if !ok {
            failures.push(format!(
                "#{i} {} {}: got {got}",
                case["name"], case["input"]
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    // Some cases are errors, so the batch as a whole exits 1.
    assert_eq!(out.status.code(), Some(1));
    let _ = std::fs::remove_file(file);
    eprintln!(
        "{} passed, 0 failed, {} skipped through `eval --batch`",
        cases.len(),
        skipped.len()
    );
    cases.len()
}

#[test]
fn every_conditional_vector_through_the_batch() {
    conditional_fixture_through_the_batch(CONDITIONAL, 100);
}

#[test]
fn every_upstream_conditional_vector_through_the_batch() {
    conditional_fixture_through_the_batch(UPSTREAM, 250);
}

#[test]
fn every_interpolate_vector_through_the_batch() {
    let cases: Vec<Value> = serde_json::from_str::<Vec<Value>>(INTERPOLATE)
        .unwrap()
        .into_iter()
        .filter(|c| c["api"] == "Interpolate")
        .collect();
    assert!(cases.len() >= 40);
    let file = temp_file(&batch_of(&cases, &["input", "env"]));
    let out = run(&["interpolate", "--batch", file.to_str().unwrap()]);
    let got = lines(&out);
    assert_eq!(got.len(), cases.len());
    let mut failures = Vec::new();
    for (case, got) in cases.iter().zip(&got) {
        let ok = if let Some(want) = case.get("expected") {
            *got == json!({"value": want})
        } else if let Some(want) = case.get("expected_error") {
            got["error"]["message"] == *want
        } else if let Some(hex) = case.get("expected_bytes_hex") {
            got["bytes_hex"] == *hex
        } else {
            false
        };
        if !ok {
            failures.push(format!("{}: got {got}, case {case}", case["input"]));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(out.status.code(), Some(1), "some cases are errors");
    let _ = std::fs::remove_file(file);
}

#[test]
fn batches_from_stdin_go_on_after_a_malformed_line() {
    let input = concat!(
        r#"{"input": "build.branch == 'main'", "variables": {"build.branch": "main"}}"#,
        "\n",
        "this is not json\n",
        "\n",
        r#"{"api": "validate", "input": "build.nope"}"#,
        "\n",
        r#"{"input": "true", "api": "frobnicate"}"#,
        "\n",
        r#"{"input": "build.branch == 'x'"}"#,
        "\n",
    );
    let mut child = bin()
        .args(["eval", "--batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let got = lines(&out);
    assert_eq!(got.len(), 5, "{got:?}");
    assert_eq!(got[0], json!({"value": true}));
    assert_eq!(got[1]["error"]["kind"], "input");
    assert!(
        got[1]["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("line 2:")
    );
    assert_eq!(got[2]["error"]["kind"], "validation");
    assert_eq!(got[3]["error"]["kind"], "input");
    assert_eq!(got[4], json!({"value": false}));
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn single_conditions_with_files() {
    let vars = temp_file(
        r#"{"build.branch": "main", "pipeline.slug": "web", "build.pull_request.labels": ["a"]}"#,
    );
    let benv = temp_file(r#"{"DEPLOY": "yes"}"#);
    let penv = temp_file(r#"{"DEPLOY": "no", "REGION": "eu"}"#);
    let out = run(&[
        "eval",
        "build.branch == 'main' && build.pull_request.labels includes 'a' && build.env('DEPLOY') == 'yes' && env('REGION') == 'eu' && env('BUILDKITE_PIPELINE_SLUG') == 'web'",
        "--vars",
        vars.to_str().unwrap(),
        "--build-env",
        benv.to_str().unwrap(),
        "--project-env",
        penv.to_str().unwrap(),
    ]);
    assert_eq!(lines(&out), vec![json!({"value": true})]);
    assert_eq!(out.status.code(), Some(0));

    let out = run(&["eval", "--validate", "build.branch =~ /x/i"]);
    assert_eq!(lines(&out), vec![json!({"valid": true})]);
    assert_eq!(out.status.code(), Some(0));

    // A typical mistake: a regex feature outside Buildkite's subset.
    let out = run(&["eval", "build.branch =~ /(?<=release-)\\d+/"]);
    let got = lines(&out);
    assert_eq!(got[0]["error"]["kind"], "parse");
    assert!(got[0]["error"]["position"].is_number());
    assert_eq!(out.status.code(), Some(1));

    // step.* exists, but not for build conditions.
    let out = run(&["eval", "step.key == 'x'"]);
    assert_eq!(lines(&out)[0]["error"]["kind"], "validation");
    let out = run(&[
        "eval",
        "step.key == 'x'",
        "--entry-point",
        "build_condition_with_step",
    ]);
    assert_eq!(lines(&out), vec![json!({"value": false})]);
    // Notifications read a broken condition as false.
    let out = run(&["eval", "nope ==", "--entry-point", "build_notification"]);
    assert_eq!(lines(&out), vec![json!({"value": false})]);
    assert_eq!(out.status.code(), Some(0));
    let out = run(&["eval", "'x'"]);
    assert_eq!(lines(&out)[0]["error"]["kind"], "result");
    for f in [vars, benv, penv] {
        let _ = std::fs::remove_file(f);
    }
}

#[test]
fn single_interpolations() {
    let env = temp_file(r#"{"BUILDKITE_COMMIT": "4e1f0c9b7a2d", "EMPTY": ""}"#);
    let e = env.to_str().unwrap();
    let out = run(&[
        "interpolate",
        "Deploy ${BUILDKITE_COMMIT:0:7} $$HOME ${EMPTY:-d}",
        "--env",
        e,
    ]);
    assert_eq!(
        lines(&out),
        vec![json!({"value": "Deploy 4e1f0c9 $HOME d"})]
    );
    assert_eq!(out.status.code(), Some(0));
    // A typical mistake: a required variable that is not set.
    let out = run(&[
        "interpolate",
        "${DEPLOY_TARGET?must name an environment}",
        "--env",
        e,
    ]);
    assert_eq!(
        lines(&out),
        vec![json!({"error": {"message": "$DEPLOY_TARGET: must name an environment"}})]
    );
    assert_eq!(out.status.code(), Some(1));
    let out = run(&["interpolate", "${A:+b}"]);
    assert_eq!(out.status.code(), Some(1));
    let _ = std::fs::remove_file(env);
}

#[test]
fn bad_usage_exits_2_with_a_message() {
    let bad_json = temp_file("{not json");
    let cases: Vec<Vec<&str>> = vec![
        vec!["eval", "--frobnicate", "true"],
        vec!["eval"],
        vec!["eval", "true", "--vars", "/nonexistent/vars.json"],
        vec!["eval", "true", "--vars", bad_json.to_str().unwrap()],
        vec!["eval", "true", "--entry-point", "nowhere"],
        vec!["eval", "true", "--batch", "/nonexistent/batch"],
        vec!["interpolate"],
        vec!["interpolate", "$X", "--env", bad_json.to_str().unwrap()],
        vec!["interpolate", "--batch", "/nonexistent/batch"],
        vec![
            "rules",
            "check",
            "--rules",
            "/nonexistent",
            "--event",
            PASSED,
        ],
        vec![
            "rules",
            "check",
            "--rules",
            bad_json.to_str().unwrap(),
            "--event",
            PASSED,
        ],
    ];
    for args in cases {
        let out = run(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.trim().is_empty(), "{args:?}: no message");
    }
    let out = run(&["eval", "true", "--vars", "/nonexistent/vars.json"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/vars.json"));
    let _ = std::fs::remove_file(bad_json);
}

fn rule(name: &str, value: Value) -> Value {
    json!({"name": name, "rule": "pipeline.trigger_build.pipeline", "value": value})
}

#[test]
fn rules_check_on_a_webhook_payload() {
    let rules = json!([
        rule(
            "deploy",
            json!({
                "source_pipeline": "acme-inc/web-app",
                "target_pipeline": "web-deploy",
                "conditions": ["source.build.branch == 'main' && source.build.state == 'passed'"],
                "build": {"message": "Deploy ${BUILDKITE_COMMIT:0:7}", "env": {"FROM": "$BUILDKITE_BUILD_NUMBER"}}
            })
        ),
        rule(
            "only-tags",
            json!({
                "source_pipeline": "web-app",
                "target_pipeline": "release",
                "conditions": ["source.build.tag != null"]
            })
        ),
        rule(
            "elsewhere",
            json!({"source_pipeline": "api", "target_pipeline": "x"})
        ),
    ]);
    let file = temp_file(&rules.to_string());
    let out = run(&[
        "rules",
        "check",
        "--rules",
        file.to_str().unwrap(),
        "--event",
        PASSED,
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = lines(&out);
    assert_eq!(got.len(), 3);
    assert_eq!(got[0]["rule"], "deploy");
    assert_eq!(got[0]["trigger"], true);
    assert_eq!(got[0]["target"], "acme-inc/web-deploy");
    assert_eq!(got[0]["build"]["message"], "Deploy 4e1f0c9");
    assert_eq!(got[0]["build"]["branch"], "main");
    assert_eq!(got[0]["build"]["env"]["FROM"], "1842");
    assert_eq!(got[0]["build"]["meta_data"]["kitebridge:rule"], "deploy");
    assert_eq!(got[1]["trigger"], false);
    assert!(got[1]["reason"].as_str().unwrap().contains("conditions[0]"));
    assert_eq!(got[2]["trigger"], false);
    assert!(
        got[2]["reason"]
            .as_str()
            .unwrap()
            .contains("source pipeline")
    );

    // A running build: the conditions hold, but nothing fires until it finishes.
    let out = run(&[
        "rules",
        "check",
        "--rules",
        file.to_str().unwrap(),
        "--event",
        RUNNING,
    ]);
    let got = lines(&out);
    assert_eq!(got[0]["trigger"], false);
    assert!(got[0]["reason"].as_str().unwrap().contains("not finished"));

    // Errors: one line per broken rule, the others still evaluated; exit 1.
    let broken = json!([
        rule(
            "bad-regex",
            json!({"source_pipeline": "web-app", "target_pipeline": "x",
            "conditions": ["source.build.branch =~ /(?<name>x)/"]})
        ),
        rule(
            "unset",
            json!({"source_pipeline": "web-app", "target_pipeline": "x",
            "build": {"message": "${DEPLOY_ENV?}"}})
        ),
        rule(
            "fine",
            json!({"source_pipeline": "web-app", "target_pipeline": "x"})
        ),
    ]);
    let bad = temp_file(&broken.to_string());
    let out = run(&[
        "rules",
        "check",
        "--rules",
        bad.to_str().unwrap(),
        "--event",
        PASSED,
    ]);
    assert_eq!(out.status.code(), Some(1));
    let got = lines(&out);
    assert_eq!(
        got[0],
        json!({"rule": "bad-regex", "kind": "parse", "message": got[0]["message"]})
    );
    assert!(
        got[0]["message"]
            .as_str()
            .unwrap()
            .contains("conditions[0]")
    );
    assert_eq!(got[1]["rule"], "unset");
    assert_eq!(got[1]["kind"], "interpolation");
    assert!(
        got[1]["message"]
            .as_str()
            .unwrap()
            .contains("$DEPLOY_ENV: not set")
    );
    assert_eq!(got[2]["trigger"], true);
    for f in [file, bad] {
        let _ = std::fs::remove_file(f);
    }
}
