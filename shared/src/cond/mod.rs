//! Buildkite's conditional language (step `if:`, notification `if:`, pipeline filter conditions)
//! and kitebridge's trigger-rule conditions, with the semantics of Buildkite's evaluator.
//!
//! - Syntax: `==` `!=` `=~` `!~` `includes`, `&&` `||` `!`, `cond ? a : b`, integers, `'...'`
//!   and `"..."` strings (double quotes decode C escapes and substitute `$VAR`), `true` `false`
//!   `null`, `[...]` arrays, `/regex/i`, `env("X")` and `build.env("X")`, `$VAR`/`${VAR...}`
//!   shell substitution, `//` comments.
//! - Strict types, checked before evaluation: a condition that mixes types is a
//!   [`ErrorKind::Validation`] error even where evaluation would never reach it.
//! - A condition must yield a boolean ([`ErrorKind::Result`] otherwise); null reads as false.
//!
//! Entry points: [`validate`] and [`evaluate`] take an [`EntryPoint`], which fixes the variables
//! (see [`Schema::for_entry_point`]). Trigger rules use [`compile`] + [`Expr::eval`] with their own
//! [`Schema`] (for example [`Schema::trigger_rules`]).
//!
//! ```
//! use kitebridge::cond::{self, Context, EntryPoint};
//! let mut ctx = Context::default();
//! ctx.variables.insert("build.branch".into(), "main".into());
//! assert_eq!(cond::evaluate("build.branch =~ /^ma/", EntryPoint::BuildCondition, &ctx), Ok(true));
//! ```

mod ast;
mod check;
mod eval;
mod lexer;
mod parser;
mod regex;
mod shell;
mod vars;

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use serde_json::Value;

pub use vars::{Schema, VarType};

/// Where a condition is used; decides its variables and how failures read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryPoint {
    /// Step `if:` and pipeline filters (the default). No `step.*`.
    BuildCondition,
    /// A condition that may also read `step.*`.
    BuildConditionWithStep,
    /// Build-level notification `if:`: blank means deliver, any error means do not.
    BuildNotification,
    /// Step-level notification `if:`: like [`EntryPoint::BuildNotification`], with `step.*`.
    StepNotification,
}

impl EntryPoint {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BuildCondition => "build_condition",
            Self::BuildConditionWithStep => "build_condition_with_step",
            Self::BuildNotification => "build_notification",
            Self::StepNotification => "step_notification",
        }
    }

    pub fn allows_step(self) -> bool {
        matches!(self, Self::BuildConditionWithStep | Self::StepNotification)
    }

    /// Notifications never fail: errors read as false and a blank condition as true.
    pub fn is_notification(self) -> bool {
        matches!(self, Self::BuildNotification | Self::StepNotification)
    }
}

impl FromStr for EntryPoint {
    type Err = CondError;

    /// Parses Buildkite's entry point names; an unknown one is a validation error.
    fn from_str(s: &str) -> Result<Self, CondError> {
        Ok(match s {
            "build_condition" | "" => Self::BuildCondition,
            "build_condition_with_step" => Self::BuildConditionWithStep,
            "build_notification" => Self::BuildNotification,
            "step_notification" => Self::StepNotification,
            other => {
                return Err(CondError::new(
                    ErrorKind::Validation,
                    format!("unknown entry point {other:?}"),
                    None,
                ));
            }
        })
    }
}

impl fmt::Display for EntryPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a condition is evaluated against.
#[derive(Debug, Clone, Default)]
pub struct Context {
    /// Variable values by dotted name (`build.branch`, `source.build.commit`...). Missing means
    /// null. Strings, integers, booleans, null and arrays of strings.
    pub variables: HashMap<String, Value>,
    /// The build's environment (`env:` of the build).
    pub build_env: HashMap<String, String>,
    /// The pipeline's environment; the build's wins over it.
    pub project_env: HashMap<String, String>,
    /// Facts that are not variables but feed Buildkite's built-in `BUILDKITE_*` environment:
    /// `pipeline.name`, `build.pull_request.using_merge_refspec`, `build.merge_queue.active`,
    /// `pipeline.use_merge_queue_base_commit_for_git_diff_base`,
    /// `build.triggered_from.{build_id,build_number,build_pipeline_slug,job_id}` and
    /// `build.rebuilt_from.{build_id,build_number}`.
    pub context_only: HashMap<String, Value>,
}

/// The four kinds of failure Buildkite distinguishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// Not valid syntax (including a rejected regex or flag).
    Parse,
    /// Well-formed, but names an unknown variable or function, or mixes types.
    Validation,
    /// Failed while running (`${X:?}` unset, a refused env name built at runtime, ...).
    Evaluation,
    /// The condition does not produce a boolean.
    Result,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Parse => "parse",
            Self::Validation => "validation",
            Self::Evaluation => "evaluation",
            Self::Result => "result",
        }
    }
}

/// A failed parse, check or evaluation, with where in the condition it happened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} error: {message}", kind.as_str())]
pub struct CondError {
    pub kind: ErrorKind,
    pub message: String,
    /// Byte offset in the condition, when one applies.
    pub position: Option<usize>,
}

impl CondError {
    pub(crate) fn new(
        kind: ErrorKind,
        message: impl Into<String>,
        position: Option<usize>,
    ) -> Self {
        Self {
            kind,
            message: message.into(),
            position,
        }
    }

    /// 1-based line and column (in characters) of [`CondError::position`] within `src`.
    pub fn line_col(&self, src: &str) -> Option<(usize, usize)> {
        let pos = self.position?.min(src.len());
        let before = src.get(..pos)?;
        let line = before.matches('\n').count() + 1;
        let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        Some((line, col))
    }
}

/// A parsed condition, reusable: regexes are compiled once, here. `Display` prints it fully
/// parenthesised; printing and parsing again gives the same tree.
#[derive(Debug, Clone)]
pub struct Expr {
    root: ast::Node,
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.root.fmt(f)
    }
}

/// Parses a condition (syntax and regexes only; no variable or type checks). A blank condition
/// is a parse error here; [`validate`] and [`evaluate`] treat blank as allowed.
pub fn parse(src: &str) -> Result<Expr, CondError> {
    parser::parse(src).map(|root| Expr { root })
}

/// Parses and type-checks a condition against `schema`, ready for [`Expr::eval`].
pub fn compile(src: &str, schema: &Schema) -> Result<Expr, CondError> {
    let expr = parse(src)?;
    expr.check(schema)?;
    Ok(expr)
}

/// True when a condition has nothing but whitespace and comments.
pub fn is_blank(src: &str) -> bool {
    matches!(
        lexer::Lexer::new(src).next_token(),
        Ok(lexer::Token {
            tok: lexer::Tok::Eof,
            ..
        })
    )
}

impl Expr {
    /// Type-checks against `schema`: unknown names, wrong types, non-boolean result.
    pub fn check(&self, schema: &Schema) -> Result<(), CondError> {
        check::Checker { schema }.check_condition(&self.root)
    }

    /// Evaluates a condition already checked against `schema` (see [`compile`]). Null reads as
    /// false; any other non-boolean result is an [`ErrorKind::Result`] error.
    pub fn eval(&self, schema: &Schema, ctx: &Context) -> Result<bool, CondError> {
        let scope = eval::Scope {
            schema,
            ctx,
            raw: false,
        };
        match scope.eval(&self.root)? {
            eval::Val::Bool(b) => Ok(b),
            eval::Val::Null => Ok(false),
            other => Err(CondError::new(
                ErrorKind::Result,
                format!("expected boolean result, got {}", other.type_name()),
                Some(self.root.pos),
            )),
        }
    }

    /// Buildkite's raw evaluator: no type-check, any name in `ctx.variables` readable, `env()`
    /// reads `ctx.build_env` then `ctx.project_env`. Returns whatever value results. For
    /// diagnostics and conformance tests; conditions should go through [`evaluate`].
    pub fn eval_unchecked(&self, ctx: &Context) -> Result<Value, CondError> {
        let schema = Schema::new();
        let scope = eval::Scope {
            schema: &schema,
            ctx,
            raw: true,
        };
        scope.eval(&self.root).map(|v| v.to_json())
    }
}

/// Checks a condition for an entry point without running it. Blank is valid.
pub fn validate(src: &str, entry: EntryPoint) -> Result<(), CondError> {
    if is_blank(src) {
        return Ok(());
    }
    compile(src, Schema::for_entry_point(entry)).map(|_| ())
}

/// Parses, checks and evaluates a condition for an entry point, as Buildkite does. A blank
/// condition is true. For notifications every error reads as false (the notification is not
/// sent) instead of being returned.
pub fn evaluate(src: &str, entry: EntryPoint, ctx: &Context) -> Result<bool, CondError> {
    if is_blank(src) {
        return Ok(true);
    }
    let schema = Schema::for_entry_point(entry);
    let result = compile(src, schema).and_then(|e| e.eval(schema, ctx));
    match result {
        Err(_) if entry.is_notification() => Ok(false),
        other => other,
    }
}

/// Parses, checks and evaluates against a caller's own variables (trigger rules). Blank is true.
pub fn evaluate_with(src: &str, schema: &Schema, ctx: &Context) -> Result<bool, CondError> {
    if is_blank(src) {
        return Ok(true);
    }
    compile(src, schema)?.eval(schema, ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(vars: &[(&str, Value)]) -> Context {
        Context {
            variables: vars
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
            ..Context::default()
        }
    }

    #[test]
    fn evaluates() {
        let c = ctx(&[
            ("build.branch", "main".into()),
            ("build.state", "passed".into()),
            ("build.creator.teams", serde_json::json!(["a", "b"])),
            ("build.number", 7.into()),
        ]);
        let cases = [
            ("build.branch == 'main' && build.number == 7", true),
            ("build.state == \"passed\" ? true : false", true),
            ("build.creator.teams includes /^b$/", true),
            ("build.creator.teams includes 'c'", false),
            ("build.tag == null", true),
            ("!build.pull_request.draft", true),
            ("build.env('MISSING') == null && env('MISSING') == ''", true),
            ("env('BUILDKITE_BRANCH') == 'main'", true),
            ("env('BUILDKITE_PULL_REQUEST') == 'false'", true),
            ("\"$$x\" == '$x'", true),
            ("   // nothing\n", true),
        ];
        for (src, want) in cases {
            assert_eq!(
                evaluate(src, EntryPoint::BuildCondition, &c),
                Ok(want),
                "{src}"
            );
        }
    }

    #[test]
    fn error_kinds() {
        let c = Context::default();
        let cases = [
            ("build.branch ==", ErrorKind::Parse),
            ("nope == 1", ErrorKind::Validation),
            ("step.key == 'x'", ErrorKind::Validation),
            ("build.state == 'nope'", ErrorKind::Validation),
            ("1 == 'one'", ErrorKind::Validation),
            ("'x'", ErrorKind::Result),
            ("${nope:?} == 'x'", ErrorKind::Evaluation),
        ];
        for (src, kind) in cases {
            let got = evaluate(src, EntryPoint::BuildCondition, &c);
            assert_eq!(got.map_err(|e| e.kind), Err(kind), "{src}");
        }
    }

    #[test]
    fn positions() {
        let e = validate("true &&\n  nope == 1", EntryPoint::BuildCondition).unwrap_err();
        assert_eq!(e.position, Some(10));
        assert_eq!(e.line_col("true &&\n  nope == 1"), Some((2, 3)));
    }

    #[test]
    fn notifications_swallow_errors() {
        let c = Context::default();
        assert_eq!(
            evaluate("nope ==", EntryPoint::BuildNotification, &c),
            Ok(false)
        );
        assert_eq!(evaluate("", EntryPoint::StepNotification, &c), Ok(true));
    }

    #[test]
    fn trigger_rules() {
        let schema = Schema::trigger_rules();
        let c = ctx(&[
            ("source.build.commit", "abc".into()),
            ("target.trigger.commit", "abc".into()),
            ("source.build.state", "passed".into()),
        ]);
        let src = "source.build.commit == target.trigger.commit && source.build.state == 'passed'";
        assert_eq!(evaluate_with(src, &schema, &c), Ok(true));
        let err = evaluate_with("build.branch == 'x'", &schema, &c).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Validation);
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    fn tokens() -> impl Strategy<Value = String> {
        let atom = prop_oneof![
            Just("build.branch".to_owned()),
            Just("build.state".to_owned()),
            Just("build.creator.teams".to_owned()),
            Just("'a'".to_owned()),
            Just("\"b$x\"".to_owned()),
            Just("${x:-y}".to_owned()),
            Just("$x.y".to_owned()),
            Just("/a+b/i".to_owned()),
            Just("12".to_owned()),
            Just("true".to_owned()),
            Just("null".to_owned()),
            Just("env('X')".to_owned()),
            Just("[\"a\", 'b']".to_owned()),
        ];
        let op = prop_oneof![
            Just(" == "),
            Just(" != "),
            Just(" =~ "),
            Just(" !~ "),
            Just(" includes "),
            Just(" && "),
            Just(" || "),
            Just(" ? "),
            Just(" : "),
            Just("!"),
            Just("("),
            Just(")"),
        ];
        prop::collection::vec((atom, op), 0..8)
            .prop_map(|parts| parts.into_iter().map(|(a, o)| format!("{a}{o}")).collect())
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(src in "\\PC{0,64}") {
            let ctx = Context::default();
            let _ = evaluate(&src, EntryPoint::BuildConditionWithStep, &ctx);
            if let Ok(e) = parse(&src) {
                let _ = e.eval_unchecked(&ctx);
            }
        }

        #[test]
        fn token_soup_never_panics_and_prints_stably(src in tokens()) {
            let ctx = Context::default();
            let _ = evaluate(&src, EntryPoint::BuildCondition, &ctx);
            if let Ok(e) = parse(&src) {
                let _ = e.eval_unchecked(&ctx);
                let printed = e.to_string();
                let again = parse(&printed).expect("printed form parses");
                prop_assert_eq!(again.to_string(), printed);
            }
        }
    }
}
