//! Every case of `fixtures/conditional.json` (buildkite/conditional's root-package table tests),
//! `fixtures/conditional_upstream.json` (every test table of the stored copy of
//! buildkite/conditional, see docs/rules.md) and `fixtures/conditional_internal.json` (its raw
//! evaluator and precedence tests) against `kitebridge::cond`. A case that cannot be honoured
//! fails. Only a case carrying a `skip_reason` (an older upstream table that a newer one
//! contradicts) is not run; skips are counted and printed.

use std::collections::HashMap;

use kitebridge::cond::{self, Context, EntryPoint};
use serde_json::Value;

const PUBLIC: &str = include_str!("fixtures/conditional.json");
const INTERNAL: &str = include_str!("fixtures/conditional_internal.json");
const UPSTREAM: &str = include_str!("fixtures/conditional_upstream.json");

fn string_map(v: Option<&Value>) -> HashMap<String, String> {
    v.and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

fn value_map(v: Option<&Value>) -> HashMap<String, Value> {
    v.and_then(Value::as_object)
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default()
}

fn public_case(case: &Value) -> Result<(), String> {
    let input = case["input"].as_str().ok_or("no input")?;
    let ctx = Context {
        variables: value_map(case.get("variables")),
        build_env: string_map(case.get("build_env")),
        project_env: string_map(case.get("project_env")),
        context_only: value_map(case.get("context_only")),
    };
    let entry = case["entry_point"].as_str().unwrap_or("build_condition");
    let got: Result<Value, cond::CondError> =
        entry
            .parse::<EntryPoint>()
            .and_then(|entry| match case["api"].as_str() {
                Some("validate") => {
                    cond::validate(input, entry).map(|()| Value::String("valid".into()))
                }
                _ => cond::evaluate(input, entry, &ctx).map(Value::Bool),
            });
    match (case.get("expected"), case.get("expected_error")) {
        (Some(want), _) => match got {
            Ok(v) if v == *want => Ok(()),
            other => Err(format!("got {other:?}, want {want}")),
        },
        (None, Some(kind)) => {
            let err = match got {
                Err(e) if Some(e.kind.as_str()) == kind.as_str() => e,
                other => return Err(format!("got {other:?}, want a {kind} error")),
            };
            let needles = case
                .get("expected_error_message_contains")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for needle in needles {
                let needle = needle.as_str().unwrap_or_default();
                if !err.message.contains(needle) {
                    return Err(format!("message {:?} lacks {needle:?}", err.message));
                }
            }
            Ok(())
        }
        _ => Err("case has no expectation".into()),
    }
}

fn internal_case(case: &Value) -> Result<(), String> {
    let input = case["input"].as_str().ok_or("no input")?;
    match case["kind"].as_str() {
        Some("raw_evaluator") => {
            let mut ctx = Context::default();
            if let Some(scope) = case.get("scope").and_then(Value::as_object) {
                for (k, v) in scope {
                    if k == "__env_function_values" {
                        ctx.build_env = string_map(Some(v));
                    } else {
                        ctx.variables.insert(k.clone(), v.clone());
                    }
                }
            }
            let got = cond::parse(input)
                .and_then(|e| e.eval_unchecked(&ctx))
                .map_err(|e| e.to_string())?;
            if got == case["expected"] {
                Ok(())
            } else {
                Err(format!("got {got}, want {}", case["expected"]))
            }
        }
        Some("parse_precedence") => {
            let printed = cond::parse(input).map_err(|e| e.to_string())?.to_string();
            if Some(printed.as_str()) == case["expected_ast_string"].as_str() {
                Ok(())
            } else {
                Err(format!(
                    "printed {printed}, want {}",
                    case["expected_ast_string"]
                ))
            }
        }
        other => Err(format!("unknown kind {other:?}")),
    }
}

fn run(fixture: &str, check: fn(&Value) -> Result<(), String>) {
    let all: Vec<Value> = serde_json::from_str(fixture).expect("fixture is JSON");
    assert!(!all.is_empty());
    let mut skipped = 0;
    let mut failures = Vec::new();
    for (i, case) in all.iter().enumerate() {
        if let Some(why) = case.get("skip_reason") {
            skipped += 1;
            eprintln!("skipped #{i} {}: {why}", case["name"]);
            continue;
        }
        if let Err(why) = check(case) {
            failures.push(format!(
                "#{i} {}: {:?}: {why}",
                case["name"].as_str().unwrap_or(""),
                case["input"]
            ));
        }
    }
    let ran = all.len() - skipped;
    assert!(
        failures.is_empty(),
        "{} of {ran} vectors failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    eprintln!("{ran} passed, 0 failed, {skipped} skipped");
}

#[test]
fn every_public_conditional_vector() {
    run(PUBLIC, public_case);
}

#[test]
fn every_upstream_conditional_vector() {
    run(UPSTREAM, public_case);
}

#[test]
fn every_internal_conditional_vector() {
    run(INTERNAL, internal_case);
}
