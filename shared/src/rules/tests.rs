use super::*;
use crate::buildkite::model::WebhookPayload;
use serde_json::json;

const PASSED: &str = include_str!("../../../tests/fixtures/webhooks/build.finished.passed.json");
const FAILED: &str = include_str!("../../../tests/fixtures/webhooks/build.finished.failed.json");
const BLOCKED: &str = include_str!("../../../tests/fixtures/webhooks/build.finished.blocked.json");

fn payload(s: &str) -> WebhookPayload {
    WebhookPayload::parse(s.as_bytes()).unwrap()
}

fn rule(value: serde_json::Value) -> Result<Rule, RuleError> {
    Rule::from_json(
        "deploy",
        json!({"rule": TRIGGER_BUILD_RULE, "value": value}),
    )
}

fn decide(r: &Rule, p: &WebhookPayload) -> Result<Decision, RuleError> {
    let org = p.organization_slug().unwrap();
    let src = SourceBuild::new(&org, &p.build, Some(&p.pipeline));
    r.evaluate(&src, None)
}

#[test]
fn triggers_with_interpolated_fields_and_meta_data() {
    let p = payload(PASSED);
    let r = rule(json!({
        "source_pipeline": "acme-inc/web-app",
        "target_pipeline": "web-deploy",
        "conditions": [
            "source.build.branch == 'main' && source.build.state == 'passed'",
            "target.trigger.commit == source.build.commit",
            "// comments are fine\nsource.pipeline.slug =~ /^web/",
            "env('BUILDKITE_PULL_REQUEST') == 'false' && source.build.env('NOPE') == null",
        ],
        "build": {
            "message": "Deploy ${BUILDKITE_COMMIT:0:7} from #${BUILDKITE_BUILD_NUMBER}",
            "env": {"FROM": "$BUILDKITE_PIPELINE_SLUG", "DEFAULTED": "${NOPE:-x}"},
            "meta_data": {"by": "${BUILDKITE_ORGANIZATION_SLUG}"}
        }
    }))
    .unwrap();
    assert!(r.is_source("acme-inc", "web-app", None));
    assert!(!r.is_source("other", "web-app", None));
    let Decision::Trigger {
        organization,
        pipeline,
        build,
    } = decide(&r, &p).unwrap()
    else {
        panic!("expected a trigger")
    };
    assert_eq!(
        (organization.as_str(), pipeline.as_str()),
        ("acme-inc", "web-deploy")
    );
    assert_eq!(build.commit, p.build.commit);
    assert_eq!(build.branch, "main");
    assert_eq!(build.message, "Deploy 4e1f0c9 from #1842");
    assert_eq!(build.env["FROM"], "web-app");
    assert_eq!(build.env["DEFAULTED"], "x");
    assert_eq!(build.meta_data["by"], "acme-inc");
    assert_eq!(build.meta_data[META_RULE], "deploy");
    assert_eq!(build.meta_data[META_SOURCE_BUILD_ID], p.build.id);
    assert_eq!(build.meta_data[META_SOURCE_BUILD], "acme-inc/web-app#1842");
}

#[test]
fn a_false_condition_says_which() {
    let p = payload(FAILED);
    let r = rule(json!({
        "source_pipeline": "web-app",
        "target_pipeline": "web-deploy",
        "conditions": ["true", "source.build.state == 'passed'"],
    }))
    .unwrap();
    match decide(&r, &p).unwrap() {
        Decision::Skip(why) => assert!(why.contains("conditions[1]"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn pull_request_variables_and_env() {
    let p = payload(FAILED);
    let r = rule(json!({
        "source_pipeline": "web-app",
        "target_pipeline": "x",
        "conditions": ["source.build.pull_request.id != null && env('BUILDKITE_PULL_REQUEST') == source.build.pull_request.id"],
    }))
    .unwrap();
    assert!(matches!(decide(&r, &p), Ok(Decision::Trigger { .. })));
}

#[test]
fn load_errors_name_the_rule_and_the_problem() {
    let cases = [
        (
            json!({"source_pipeline": "a", "target_pipeline": "b", "conditions": ["build.branch == 'x'"]}),
            RuleErrorKind::Validation,
            "conditions[0]",
        ),
        (
            json!({"source_pipeline": "a", "target_pipeline": "b", "conditions": ["source.build.branch =="]}),
            RuleErrorKind::Parse,
            "conditions[0]",
        ),
        (
            json!({"source_pipeline": "a", "target_pipeline": "b", "conditions": ["source.build.branch =~ /(?<=a)b/"]}),
            RuleErrorKind::Parse,
            "conditions[0]",
        ),
        (
            json!({"source_pipeline": "a", "target_pipeline": "b", "conditions": ["source.build.state == 'done'"]}),
            RuleErrorKind::Validation,
            "not a valid",
        ),
        (
            json!({"source_pipeline": "a", "target_pipeline": "b", "conditions": ["'x'"]}),
            RuleErrorKind::Result,
            "conditions[0]",
        ),
        (
            json!({"source_pipeline": "a/b/c", "target_pipeline": "b"}),
            RuleErrorKind::Document,
            "source_pipeline",
        ),
        (
            json!({"source_pipeline": "a", "target_pipeline": ""}),
            RuleErrorKind::Document,
            "target_pipeline",
        ),
        (
            json!({"source_pipeline": "a", "target_pipeline": "b", "condition": []}),
            RuleErrorKind::Document,
            "condition",
        ),
        (
            json!({"source_pipeline": "a", "target_pipeline": "b", "build": {"message": "${X:+y}"}}),
            RuleErrorKind::Interpolation,
            "build.message",
        ),
        (
            json!({"source_pipeline": "a", "target_pipeline": "b", "build": {"env": {"A": "${_X}"}}}),
            RuleErrorKind::Interpolation,
            "build.env.A",
        ),
    ];
    for (value, kind, needle) in cases {
        let e = rule(value.clone()).unwrap_err();
        assert_eq!(e.rule, "deploy");
        assert_eq!(e.kind, kind, "{value}: {e}");
        assert!(e.message.contains(needle), "{value}: {e}");
    }
    let e = Rule::from_json("x", json!({"rule": "pipeline.artifacts_read.pipeline", "value": {"source_pipeline": "a", "target_pipeline": "b"}})).unwrap_err();
    assert_eq!(e.kind, RuleErrorKind::Document);
    let e = Rule::from_json("bad name", json!({})).unwrap_err();
    assert!(e.message.contains("not a rule name"), "{e}");
}

#[test]
fn runtime_errors_are_rule_errors() {
    let p = payload(PASSED);
    let r = rule(json!({"source_pipeline": "web-app", "target_pipeline": "b", "build": {"message": "${MISSING?set it}"}})).unwrap();
    let e = decide(&r, &p).unwrap_err();
    assert_eq!(e.kind, RuleErrorKind::Interpolation);
    assert!(e.message.contains("$MISSING: set it"), "{e}");
    let r = rule(json!({"source_pipeline": "web-app", "target_pipeline": "b", "conditions": ["${MISSING:?} == 'x'"]})).unwrap();
    assert_eq!(decide(&r, &p).unwrap_err().kind, RuleErrorKind::Evaluation);
    let r = rule(
        json!({"source_pipeline": "web-app", "target_pipeline": "b", "build": {"branch": "$NOPE"}}),
    )
    .unwrap();
    assert!(
        decide(&r, &p)
            .unwrap_err()
            .message
            .contains("branch is empty")
    );
}

#[test]
fn finished_means_terminal_and_not_blocked() {
    assert!(is_finished(&payload(PASSED).build));
    assert!(is_finished(&payload(FAILED).build));
    assert!(!is_finished(&payload(BLOCKED).build));
}

#[test]
fn rules_files_in_both_shapes() {
    let doc = json!({"rule": TRIGGER_BUILD_RULE, "value": {"source_pipeline": "a", "target_pipeline": "b"}});
    let array = json!([{"name": "one", "rule": doc["rule"], "value": doc["value"]}]);
    let object = json!({"one": doc, "two": doc});
    assert_eq!(parse_rules(&array.to_string()).unwrap().len(), 1);
    assert_eq!(parse_rules(&object.to_string()).unwrap().len(), 2);
    let errs = parse_rules(r#"{"ok": {"rule": "pipeline.trigger_build.pipeline", "value": {"source_pipeline": "a", "target_pipeline": "b"}}, "bad": {"rule": "x", "value": {"source_pipeline": "a", "target_pipeline": "b"}}}"#).unwrap_err();
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].rule, "bad");
    assert!(parse_rules("[1]").is_err());
    assert!(parse_rules("nope").is_err());
}

mod proptests {
    use super::*;
    use proptest::prelude::*;

    fn slug() -> impl Strategy<Value = String> {
        "[a-z0-9][a-z0-9_-]{0,12}"
    }

    fn template() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("$BUILDKITE_COMMIT".to_owned()),
            Just("${BUILDKITE_BRANCH:-main}".to_owned()),
            Just("Deploy ${BUILDKITE_COMMIT:0:7}".to_owned()),
            Just("$$literal \\$too".to_owned()),
            "[a-zA-Z0-9 .-]{0,16}",
        ]
    }

    fn condition() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("source.build.branch == 'main'".to_owned()),
            Just("source.build.state == 'passed' || source.build.state == 'failed'".to_owned()),
            Just("source.build.env('X') == null".to_owned()),
            Just("target.trigger.commit == source.build.commit".to_owned()),
            Just("source.build.message =~ /deploy/i // why".to_owned()),
            Just("".to_owned()),
        ]
    }

    fn document() -> impl Strategy<Value = RuleDocument> {
        (
            (proptest::option::of(slug()), slug()),
            (proptest::option::of(slug()), slug()),
            prop::collection::vec(condition(), 0..4),
            proptest::option::of(template()),
            proptest::option::of(template()),
            prop::collection::btree_map("[A-Z][A-Z_]{0,6}", template(), 0..3),
            prop::collection::btree_map("[a-z][a-z:_-]{0,8}", template(), 0..3),
        )
            .prop_map(|(src, dst, conditions, commit, message, env, meta_data)| {
                let p = |(o, s): (Option<String>, String)| match o {
                    Some(o) => format!("{o}/{s}"),
                    None => s,
                };
                RuleDocument {
                    rule: TRIGGER_BUILD_RULE.to_owned(),
                    value: RuleValue {
                        source_pipeline: p(src),
                        target_pipeline: p(dst),
                        conditions,
                        build: BuildTemplate {
                            commit,
                            branch: None,
                            message,
                            env,
                            meta_data,
                        },
                    },
                }
            })
    }

    proptest! {
        /// A rule document survives JSON and validation unchanged: what the API stores and
        /// shows is what was sent.
        #[test]
        fn rule_documents_round_trip(doc in document()) {
            let json = serde_json::to_value(&doc).unwrap();
            let rule = Rule::from_json("r", json.clone()).unwrap();
            prop_assert_eq!(&rule.document, &doc);
            let again = serde_json::to_value(&rule.document).unwrap();
            prop_assert_eq!(&again, &json);
            let text = serde_json::to_string(&again).unwrap();
            let back: RuleDocument = serde_json::from_str(&text).unwrap();
            prop_assert_eq!(back, doc);
        }

        #[test]
        fn arbitrary_documents_never_panic(s in "\\PC{0,80}") {
            let _ = parse_rules(&s);
            let _ = Rule::from_json("r", json!({"rule": TRIGGER_BUILD_RULE, "value": {"source_pipeline": s, "target_pipeline": "b", "conditions": [s]}}));
        }
    }
}
