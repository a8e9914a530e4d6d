//! Trigger rules: Buildkite's `pipeline.trigger_build.pipeline` rule documents, checked when they
//! are loaded and evaluated against finished builds.
//!
//! A rule document is Buildkite's, plus `build` (like a trigger step's `build:`):
//!
//! ```json
//! {"rule": "pipeline.trigger_build.pipeline",
//!  "value": {"source_pipeline": "acme/web", "target_pipeline": "web-deploy",
//!            "conditions": ["source.build.branch == 'main'", "source.build.state == 'passed'"],
//!            "build": {"message": "Deploy ${BUILDKITE_COMMIT:0:7}", "env": {"FROM": "$BUILDKITE_BUILD_NUMBER"}}}}
//! ```
//!
//! - Pipelines are `organization/slug`, or `slug` for the configured organization (when exactly
//!   one is configured; otherwise the source build's organization).
//! - Every condition must hold. Conditions are Buildkite's language ([`crate::cond`]) over
//!   `source.build.*`, `source.build.env("X")`, `source.pipeline.*`, `env("X")` and
//!   `target.trigger.{commit,branch,message}`; see [`vars`].
//! - `build.commit`, `build.branch` and `build.message` default to the source build's; they and
//!   the values of `build.env` and `build.meta_data` are `${VAR}` templates ([`crate::interpolate`])
//!   over the source build's environment ([`vars::environment`]).
//!
//! Where rules come from: `KITEBRIDGE_RULES` (JSON), `KITEBRIDGE_RULES_FILE` (a JSON file), and
//! the store ([`catalog`]). A rule that does not validate is refused with its name and the error.
//! Firing (once per rule and source build) is in [`fire`].

pub mod catalog;
pub mod fire;
pub mod vars;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::buildkite::client::CreateBuild;
use crate::buildkite::model::{Build, BuildState};
use crate::cond::{self, CondError, Expr, Schema};
use crate::config::Config;
use crate::interpolate;
use crate::names::{self, PipelineRef};
pub use vars::SourceBuild;

/// The one rule type kitebridge fires.
pub const TRIGGER_BUILD_RULE: &str = "pipeline.trigger_build.pipeline";

/// Meta-data keys every triggered build carries.
pub const META_RULE: &str = "kitebridge:rule";
pub const META_SOURCE_BUILD_ID: &str = "kitebridge:source_build_id";
pub const META_SOURCE_BUILD: &str = "kitebridge:source_build";

/// A rule document as written (Buildkite's shape). Unknown fields are refused, so a typo such as
/// `condition` is an error instead of a rule that silently ignores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleDocument {
    pub rule: String,
    pub value: RuleValue,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleValue {
    pub source_pipeline: String,
    pub target_pipeline: String,
    #[serde(default)]
    pub conditions: Vec<String>,
    #[serde(default, skip_serializing_if = "BuildTemplate::is_empty")]
    pub build: BuildTemplate,
}

/// The target build's fields, as `${VAR}` templates. Absent fields take the source build's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildTemplate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub meta_data: BTreeMap<String, String>,
}

impl BuildTemplate {
    pub fn is_empty(&self) -> bool {
        *self == BuildTemplate::default()
    }
}

/// What went wrong with a rule, in the kinds `kitebridge rules check` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RuleErrorKind {
    /// Not a rule document (shape, rule type, pipeline names, rule name).
    Document,
    /// A condition's syntax ([`cond::ErrorKind::Parse`]).
    Parse,
    /// A condition names an unknown variable or mixes types.
    Validation,
    /// A condition failed while running, or the target build would be unusable.
    Evaluation,
    /// A condition does not produce a boolean.
    Result,
    /// A `${VAR}` template is malformed or failed (`${VAR?}` unset).
    Interpolation,
}

impl RuleErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Document => "document",
            Self::Parse => "parse",
            Self::Validation => "validation",
            Self::Evaluation => "evaluation",
            Self::Result => "result",
            Self::Interpolation => "interpolation",
        }
    }
}

impl fmt::Display for RuleErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for RuleErrorKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A rule that cannot be loaded or evaluated: `{"rule", "kind", "message"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("rule `{rule}`: {kind} error: {message}")]
pub struct RuleError {
    pub rule: String,
    pub kind: RuleErrorKind,
    pub message: String,
}

impl RuleError {
    fn new(rule: &str, kind: RuleErrorKind, message: impl Into<String>) -> Self {
        Self {
            rule: rule.to_owned(),
            kind,
            message: message.into(),
        }
    }

    fn condition(rule: &str, index: usize, src: &str, e: &CondError) -> Self {
        let kind = match e.kind {
            cond::ErrorKind::Parse => RuleErrorKind::Parse,
            cond::ErrorKind::Validation => RuleErrorKind::Validation,
            cond::ErrorKind::Evaluation => RuleErrorKind::Evaluation,
            cond::ErrorKind::Result => RuleErrorKind::Result,
        };
        let place = match e.line_col(src) {
            Some((line, col)) => format!(" (line {line}, column {col})"),
            None => String::new(),
        };
        Self::new(
            rule,
            kind,
            format!("conditions[{index}]: {}{place}", e.message),
        )
    }
}

/// A pipeline as a rule names it: `organization/slug`, or a bare `slug` whose organization is
/// resolved when the rule is applied ([`RulePipeline::resolve`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RulePipeline {
    pub organization: Option<String>,
    pub slug: String,
}

impl RulePipeline {
    pub fn parse(s: &str) -> Result<RulePipeline, String> {
        let (org, slug) = match s.split_once('/') {
            Some((o, p)) => (Some(o), p),
            None => (None, s),
        };
        for part in org.into_iter().chain([slug]) {
            if !names::is_written_slug(part) {
                return Err(format!(
                    "{s:?} is not a pipeline: write `organization/slug` or `slug` (letters, digits, `-` and `_`)"
                ));
            }
        }
        Ok(RulePipeline {
            organization: org.map(str::to_owned),
            slug: slug.to_owned(),
        })
    }

    /// The organization: the rule's own, else `default` (the configured one), else `fallback`
    /// (the source build's).
    pub fn organization<'a>(&'a self, default: Option<&'a str>, fallback: &'a str) -> &'a str {
        self.organization.as_deref().or(default).unwrap_or(fallback)
    }

    /// The pipeline with its organization resolved as [`RulePipeline::organization`] does.
    pub fn resolve(&self, default: Option<&str>, fallback: &str) -> PipelineRef {
        PipelineRef {
            organization: self.organization(default, fallback).to_owned(),
            pipeline: self.slug.clone(),
        }
    }
}

impl fmt::Display for RulePipeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.organization {
            Some(o) => write!(f, "{o}/{}", self.slug),
            None => f.write_str(&self.slug),
        }
    }
}

pub use crate::names::validate_rule_name as validate_name;

/// The variables rule conditions may use: [`Schema::trigger_rules`] plus `source.build.env("X")`
/// (null when unset, like `build.env`).
pub fn schema() -> &'static Schema {
    static SCHEMA: OnceLock<Schema> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        let mut s = Schema::trigger_rules();
        s.env_function("source.build.env", true);
        s
    })
}

/// A rule that validated: ready to evaluate.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    pub document: RuleDocument,
    pub source: RulePipeline,
    pub target: RulePipeline,
    /// Compiled conditions, with their text; blank ones are `None` (always true).
    conditions: Vec<(String, Option<Expr>)>,
}

/// What a rule decides for a build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Trigger this build of `organization/pipeline`.
    Trigger {
        organization: String,
        pipeline: String,
        /// The target build a rule would create.
        build: CreateBuild,
    },
    /// Not this build, and why.
    Skip(String),
}

impl Rule {
    /// Validates a document: the rule type, both pipelines, every condition (parse and type
    /// check) and every template.
    pub fn new(name: &str, document: RuleDocument) -> Result<Rule, RuleError> {
        validate_name(name).map_err(|m| RuleError::new(name, RuleErrorKind::Document, m))?;
        let doc_err = |m: String| RuleError::new(name, RuleErrorKind::Document, m);
        if document.rule != TRIGGER_BUILD_RULE {
            return Err(doc_err(format!(
                "`rule` is {:?}; kitebridge fires only {TRIGGER_BUILD_RULE:?}",
                document.rule
            )));
        }
        let v = &document.value;
        let source = RulePipeline::parse(&v.source_pipeline)
            .map_err(|m| doc_err(format!("source_pipeline: {m}")))?;
        let target = RulePipeline::parse(&v.target_pipeline)
            .map_err(|m| doc_err(format!("target_pipeline: {m}")))?;
        let mut conditions = Vec::with_capacity(v.conditions.len());
        for (i, src) in v.conditions.iter().enumerate() {
            let expr = if cond::is_blank(src) {
                None
            } else {
                Some(
                    cond::compile(src, schema())
                        .map_err(|e| RuleError::condition(name, i, src, &e))?,
                )
            };
            conditions.push((src.clone(), expr));
        }
        let b = &v.build;
        let templates = [
            ("build.commit", b.commit.as_deref()),
            ("build.branch", b.branch.as_deref()),
            ("build.message", b.message.as_deref()),
        ]
        .into_iter()
        .filter_map(|(f, t)| t.map(|t| (f.to_owned(), t)))
        .chain(
            b.env
                .iter()
                .map(|(k, t)| (format!("build.env.{k}"), t.as_str())),
        )
        .chain(
            b.meta_data
                .iter()
                .map(|(k, t)| (format!("build.meta_data.{k}"), t.as_str())),
        );
        for (field, template) in templates {
            interpolate::parse(template).map_err(|e| {
                RuleError::new(name, RuleErrorKind::Interpolation, format!("{field}: {e}"))
            })?;
        }
        Ok(Rule {
            name: name.to_owned(),
            document,
            source,
            target,
            conditions,
        })
    }

    /// Parses a document from JSON, then validates it.
    pub fn from_json(name: &str, document: Value) -> Result<Rule, RuleError> {
        validate_name(name).map_err(|m| RuleError::new(name, RuleErrorKind::Document, m))?;
        // serde would also read a struct from an array of its fields in order; a rule document
        // is JSON objects all the way down (as openapi.yaml says).
        for (path, v) in [
            ("document", Some(&document)),
            ("value", document.get("value")),
            (
                "value.build",
                document.get("value").and_then(|v| v.get("build")),
            ),
        ] {
            if let Some(v) = v
                && !v.is_object()
            {
                return Err(RuleError::new(
                    name,
                    RuleErrorKind::Document,
                    format!("{path}: must be a JSON object"),
                ));
            }
        }
        let doc: RuleDocument = serde_path_to_error::deserialize(document).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let msg = if path == "." {
                inner.to_string()
            } else {
                format!("{path}: {inner}")
            };
            RuleError::new(name, RuleErrorKind::Document, msg)
        })?;
        Rule::new(name, doc)
    }

    /// Whether a build of `organization/slug` is this rule's source. `default_org` is the
    /// configured organization, if exactly one is configured.
    pub fn is_source(&self, organization: &str, slug: &str, default_org: Option<&str>) -> bool {
        self.source.slug == slug
            && self.source.organization(default_org, organization) == organization
    }

    /// Evaluates the rule for a source build (which must be its source: see [`Rule::is_source`]).
    /// Interpolates the build fields, then checks every condition.
    pub fn evaluate(
        &self,
        source: &SourceBuild<'_>,
        default_org: Option<&str>,
    ) -> Result<Decision, RuleError> {
        let build = source.build;
        let env = vars::environment(source);
        let name = self.name.as_str();
        let expand = |field: &str, template: &str| {
            interpolate::interpolate(template, &env).map_err(|e| {
                RuleError::new(name, RuleErrorKind::Interpolation, format!("{field}: {e}"))
            })
        };
        let t = &self.document.value.build;
        let field = |f: &str, template: &Option<String>, default: Option<&str>| match template {
            Some(t) => expand(f, t),
            None => Ok(default.unwrap_or_default().to_owned()),
        };
        let commit = field("build.commit", &t.commit, Some(&build.commit))?;
        let branch = field("build.branch", &t.branch, build.branch.as_deref())?;
        let message = field("build.message", &t.message, build.message.as_deref())?;
        let mut env_out = BTreeMap::new();
        for (k, v) in &t.env {
            env_out.insert(k.clone(), expand(&format!("build.env.{k}"), v)?);
        }
        let mut meta_data = BTreeMap::new();
        for (k, v) in &t.meta_data {
            meta_data.insert(k.clone(), expand(&format!("build.meta_data.{k}"), v)?);
        }

        let ctx = vars::context(source, &commit, &branch, &message, env);
        for (i, (src, expr)) in self.conditions.iter().enumerate() {
            let Some(expr) = expr else { continue };
            match expr.eval(schema(), &ctx) {
                Ok(true) => {}
                Ok(false) => {
                    return Ok(Decision::Skip(format!(
                        "conditions[{i}] is false: {}",
                        src.trim()
                    )));
                }
                Err(e) => return Err(RuleError::condition(name, i, src, &e)),
            }
        }
        // Buildkite refuses a build without them (422); say so here, with the rule's name.
        for (f, v) in [("commit", &commit), ("branch", &branch)] {
            if v.trim().is_empty() {
                return Err(RuleError::new(
                    name,
                    RuleErrorKind::Evaluation,
                    format!("the target build's {f} is empty (Buildkite requires one)"),
                ));
            }
        }
        meta_data.insert(META_RULE.to_owned(), self.name.clone());
        meta_data.insert(META_SOURCE_BUILD_ID.to_owned(), build.id.clone());
        meta_data.insert(META_SOURCE_BUILD.to_owned(), source.describe());
        let target = self.target.resolve(default_org, source.organization);
        Ok(Decision::Trigger {
            organization: target.organization,
            pipeline: target.pipeline,
            build: CreateBuild {
                commit,
                branch,
                message,
                env: env_out,
                meta_data,
            },
        })
    }
}

/// Whether a build has finished for good: a terminal state and not held by a block step (a
/// blocked build finishes again once unblocked, and a rule fires only once per build).
pub fn is_finished(build: &Build) -> bool {
    !build.blocked
        && matches!(
            build.state,
            BuildState::Passed
                | BuildState::Failed
                | BuildState::Canceled
                | BuildState::Skipped
                | BuildState::NotRun
        )
}

/// Reads a rules file or variable: a JSON array of `{"name", "rule", "value"}`, or an object of
/// name to `{"rule", "value"}`. Each rule is validated; every error is returned.
pub fn parse_rules(json: &str) -> Result<Vec<Rule>, Vec<RuleError>> {
    let each = parse_rules_each(json).map_err(|e| vec![e])?;
    let mut rules = Vec::with_capacity(each.len());
    let mut errors = Vec::new();
    for r in each {
        match r {
            Ok(r) => rules.push(r),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(rules)
    } else {
        Err(errors)
    }
}

/// Like [`parse_rules`], but one result per rule, in order (for dry runs that report each).
/// The error is for a text that is not a rules document at all (rule `*`).
pub fn parse_rules_each(json: &str) -> Result<Vec<Result<Rule, RuleError>>, RuleError> {
    let whole = |m: String| RuleError::new("*", RuleErrorKind::Document, m);
    let value: Value = serde_json::from_str(json).map_err(|e| whole(format!("not JSON: {e}")))?;
    let named: Vec<(String, Value)> = match value {
        Value::Object(map) => map.into_iter().collect(),
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.into_iter().enumerate() {
                let Value::Object(mut obj) = item else {
                    return Err(whole(format!("[{i}] is not an object")));
                };
                let Some(Value::String(name)) = obj.remove("name") else {
                    return Err(whole(format!("[{i}] has no `name` (a string)")));
                };
                out.push((name, Value::Object(obj)));
            }
            out
        }
        _ => {
            return Err(whole(
                "expected an array of rules or an object of rules by name".into(),
            ));
        }
    };
    let mut seen = std::collections::HashSet::new();
    Ok(named
        .into_iter()
        .map(|(name, doc)| {
            if !seen.insert(name.clone()) {
                return Err(RuleError::new(
                    &name,
                    RuleErrorKind::Document,
                    "defined twice",
                ));
            }
            Rule::from_json(&name, doc)
        })
        .collect())
}

/// Why the configured rules cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("KITEBRIDGE_RULES_FILE: cannot read {path}: {message}")]
    File { path: String, message: String },
    #[error("{variable}: {}", .errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid {
        variable: &'static str,
        errors: Vec<RuleError>,
    },
}

/// The rules from `KITEBRIDGE_RULES` and `KITEBRIDGE_RULES_FILE`, validated; a name given twice is
/// refused.
pub fn config_rules(config: &Config) -> Result<Vec<Rule>, LoadError> {
    let mut rules: Vec<Rule> = Vec::new();
    if let Some(json) = &config.rules_json {
        rules = parse_rules(json).map_err(|errors| LoadError::Invalid {
            variable: "KITEBRIDGE_RULES",
            errors,
        })?;
    }
    if let Some(path) = &config.rules_file {
        let text = std::fs::read_to_string(path).map_err(|e| LoadError::File {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let more = parse_rules(&text).map_err(|errors| LoadError::Invalid {
            variable: "KITEBRIDGE_RULES_FILE",
            errors,
        })?;
        let mut dup = Vec::new();
        for r in more {
            if rules.iter().any(|x| x.name == r.name) {
                dup.push(RuleError::new(
                    &r.name,
                    RuleErrorKind::Document,
                    "defined in both KITEBRIDGE_RULES and KITEBRIDGE_RULES_FILE",
                ));
            } else {
                rules.push(r);
            }
        }
        if !dup.is_empty() {
            return Err(LoadError::Invalid {
                variable: "KITEBRIDGE_RULES_FILE",
                errors: dup,
            });
        }
    }
    Ok(rules)
}

/// The configured organization that bare pipeline slugs mean: set only when exactly one is
/// configured (with several, a bare slug means the source build's organization).
pub fn default_organization(config: &Config) -> Option<String> {
    match config.buildkite.organizations.as_slice() {
        [one] => Some(one.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
