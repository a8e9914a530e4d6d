//! `kitebridge rules check --rules FILE --event PAYLOAD.json`: a dry run of trigger rules against
//! a webhook payload. One JSON line per rule:
//!
//! - `{"rule", "trigger": true, "target": "org/slug", "build": {commit, branch, message, env, meta_data}}`
//! - `{"rule", "trigger": false, "reason": "..."}`
//! - `{"rule", "kind", "message"}` when the rule does not validate or fails to evaluate.
//!
//! Exit 0 when every rule evaluated, 1 when any rule has an error, 2 for bad usage (unreadable
//! files, a payload that is not a `build.*` webhook, a rules file that is not a rules document).

use std::io::{BufWriter, Write};
use std::path::Path;

use kitebridge::buildkite::model::WebhookPayload;
use kitebridge::rules::{self, Decision, SourceBuild};
use serde_json::{Value, json};

use crate::eval::{EXIT_ERROR, EXIT_OK, Usage};

pub fn check(rules_path: &Path, event_path: &Path) -> Result<u8, Usage> {
    let read =
        |p: &Path| std::fs::read(p).map_err(|e| Usage(format!("cannot read {}: {e}", p.display())));
    let rules_text = String::from_utf8(read(rules_path)?)
        .map_err(|_| Usage(format!("{}: not UTF-8", rules_path.display())))?;
    let payload = WebhookPayload::parse(&read(event_path)?).map_err(|e| {
        Usage(format!(
            "{}: not a Buildkite build webhook payload: {e}",
            event_path.display()
        ))
    })?;
    let each = rules::parse_rules_each(&rules_text)
        .map_err(|e| Usage(format!("{}: {}", rules_path.display(), e.message)))?;
    let organization = payload.organization_slug().ok_or_else(|| {
        Usage(format!(
            "{}: the payload's URLs name no organization",
            event_path.display()
        ))
    })?;
    let source = SourceBuild::new(&organization, &payload.build, Some(&payload.pipeline));
    let slug = source.pipeline_slug().unwrap_or_default();

    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let mut code = EXIT_OK;
    for result in each {
        let line = match result {
            Err(e) => {
                code = EXIT_ERROR;
                json!(e)
            }
            Ok(rule) if !rule.is_source(&organization, &slug, None) => json!({
                "rule": rule.name,
                "trigger": false,
                "reason": format!(
                    "the rule's source pipeline is {}; this build is from {organization}/{slug}",
                    rule.source
                ),
            }),
            // The observer looks only at finished builds; so does the dry run.
            Ok(rule) if !rules::is_finished(&payload.build) => json!({
                "rule": rule.name,
                "trigger": false,
                "reason": format!(
                    "the build has not finished (state {}{}); rules fire on finished builds",
                    payload.build.state,
                    if payload.build.blocked { ", blocked" } else { "" }
                ),
            }),
            Ok(rule) => match rule.evaluate(&source, None) {
                Err(e) => {
                    code = EXIT_ERROR;
                    json!(e)
                }
                Ok(Decision::Skip(reason)) => {
                    json!({"rule": rule.name, "trigger": false, "reason": reason})
                }
                Ok(Decision::Trigger {
                    organization: org,
                    pipeline,
                    build,
                }) => json!({
                    "rule": rule.name,
                    "trigger": true,
                    "target": format!("{org}/{pipeline}"),
                    "build": build,
                }),
            },
        };
        write_line(&mut out, &line)?;
    }
    out.flush()
        .map_err(|e| Usage(format!("cannot write the output: {e}")))?;
    Ok(code)
}

fn write_line(out: &mut impl Write, v: &Value) -> Result<(), Usage> {
    serde_json::to_writer(&mut *out, v)
        .and_then(|()| out.write_all(b"\n").map_err(serde_json::Error::io))
        .map_err(|e| Usage(format!("cannot write the output: {e}")))
}
