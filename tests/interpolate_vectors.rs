//! Every case of `fixtures/interpolate.json` (buildkite/interpolate v0.1.5 tests plus outputs of
//! the real library) against `kitebridge::interpolate`. A case that cannot be honoured fails.

use std::collections::HashMap;

use kitebridge::interpolate::{self, Expansion, Item};
use serde_json::{Value, json};

const FIXTURE: &str = include_str!("fixtures/interpolate.json");

fn env_of(case: &Value) -> HashMap<String, String> {
    case.get("env")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// Upstream's AST as the fixture spells it.
fn ast_json(items: &[Item<'_>]) -> Value {
    Value::Array(
        items
            .iter()
            .map(|item| match item {
                Item::Text(t) => json!({ "text": t }),
                Item::Expansion(e) => json!({ "expansion": expansion_json(e) }),
            })
            .collect(),
    )
}

fn expansion_json(e: &Expansion<'_>) -> Value {
    match e {
        Expansion::Variable { identifier } => {
            json!({"type": "VariableExpansion", "identifier": identifier})
        }
        Expansion::EmptyValue {
            identifier,
            content,
        } => {
            json!({"type": "EmptyValueExpansion", "identifier": identifier, "content": ast_json(content)})
        }
        Expansion::UnsetValue {
            identifier,
            content,
        } => {
            json!({"type": "UnsetValueExpansion", "identifier": identifier, "content": ast_json(content)})
        }
        Expansion::Required {
            identifier,
            message,
        } => {
            json!({"type": "RequiredExpansion", "identifier": identifier, "message": ast_json(message)})
        }
        Expansion::Substring {
            identifier,
            offset,
            length,
        } => {
            let mut v =
                json!({"type": "SubstringExpansion", "identifier": identifier, "offset": offset});
            if let Some(l) = length {
                v["length"] = json!(l);
                v["has_length"] = json!(true);
            }
            v
        }
        Expansion::Escaped {
            potential_identifier,
        } => {
            let mut v = json!({"type": "EscapedExpansion"});
            if !potential_identifier.is_empty() {
                v["potential_identifier"] = json!(potential_identifier);
            }
            v
        }
    }
}

fn check(case: &Value) -> Result<(), String> {
    let input = case["input"].as_str().ok_or("no input")?;
    let api = case["api"].as_str().ok_or("no api")?;
    match api {
        "Interpolate" => {
            let env = env_of(case);
            if let Some(hex) = case.get("expected_bytes_hex").and_then(Value::as_str) {
                let got = interpolate::interpolate_bytes(input, &env).map_err(|e| e.message)?;
                let got_hex: String = got.iter().map(|b| format!("{b:02x}")).collect();
                return if got_hex == hex {
                    Ok(())
                } else {
                    Err(format!("bytes {got_hex}, want {hex}"))
                };
            }
            let got = interpolate::interpolate(input, &env);
            match (case.get("expected"), case.get("expected_error")) {
                (Some(want), _) => match got {
                    Ok(s) if want.as_str() == Some(s.as_str()) => Ok(()),
                    other => Err(format!("got {other:?}, want {want}")),
                },
                (None, Some(want)) => match got {
                    Err(e) if want.as_str() == Some(e.message.as_str()) => Ok(()),
                    other => Err(format!("got {other:?}, want error {want}")),
                },
                _ => Err("case has no expectation".into()),
            }
        }
        "Identifiers" => {
            let got = interpolate::identifiers(input).map_err(|e| e.message)?;
            let want = &case["expected_identifiers"];
            if json!(got) == *want {
                Ok(())
            } else {
                Err(format!("identifiers {got:?}, want {want}"))
            }
        }
        "Parse" => {
            let got = ast_json(&interpolate::parse(input).map_err(|e| e.message)?);
            let want = &case["expected_ast"];
            if got == *want {
                Ok(())
            } else {
                Err(format!("ast {got}, want {want}"))
            }
        }
        other => Err(format!("unknown api {other}")),
    }
}

#[test]
fn every_interpolate_vector() {
    let cases: Vec<Value> = serde_json::from_str(FIXTURE).expect("fixture is JSON");
    assert!(!cases.is_empty());
    let failures: Vec<String> = cases
        .iter()
        .enumerate()
        .filter_map(|(i, case)| {
            check(case)
                .err()
                .map(|why| format!("#{i} {:?}: {why}", case["input"]))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} interpolate vectors failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
