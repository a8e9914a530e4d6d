//! Which variables a condition may name, with their types ([`Schema`]), and Buildkite's own
//! tables: the build/pipeline/organization/step variables, the `BUILDKITE_*` names `env()` may
//! read, and the built-in environment derived from the build.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::OnceLock;

use serde_json::Value;

use super::{Context, EntryPoint};

/// The declared type of a variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VarType {
    String,
    Number,
    Bool,
    StringArray,
    /// A string that must be one of these values, compared only as `variable == "value"`.
    Enum(&'static [&'static str]),
    /// Not checked before evaluation; a value of the wrong type fails at evaluation.
    Any,
}

/// The variables a condition may use. Naming anything else is a validation error.
#[derive(Debug, Clone, Default)]
pub struct Schema {
    vars: HashMap<Cow<'static, str>, VarType>,
    /// More names for the env functions, e.g. `source.build.env` (true: reads like `build.env`,
    /// null when unset; false: like `env`, `""` when unset).
    env_aliases: Vec<(String, bool)>,
    /// Buildkite semantics: presence rules, webhook-only fields, the built-in `BUILDKITE_*`
    /// environment and its allow-list.
    pub(crate) buildkite: bool,
}

const BUILD_STATES: &[&str] = &[
    "creating",
    "started",
    "running",
    "scheduled",
    "blocked",
    "passed",
    "failing",
    "failed",
    "canceling",
    "canceled",
    "skipped",
    "not_run",
];
const BLOCKED_STATES: &[&str] = &["failed", "passed", "running"];
const BUILD_SOURCES: &[&str] = &[
    "api",
    "ui",
    "webhook",
    "trigger_job",
    "schedule",
    "pipeline_trigger",
];

/// Every build variable, without the `build.` prefix (trigger rules reuse it as `source.build.`).
const BUILD_VARS: &[(&str, VarType)] = &[
    ("id", VarType::String),
    ("state", VarType::Enum(BUILD_STATES)),
    ("fixed", VarType::Bool),
    ("blocked_state", VarType::Enum(BLOCKED_STATES)),
    ("source", VarType::Enum(BUILD_SOURCES)),
    ("source_event", VarType::String),
    ("source_action", VarType::String),
    ("branch", VarType::String),
    ("tag", VarType::String),
    ("message", VarType::String),
    ("commit", VarType::String),
    ("number", VarType::Number),
    ("creator.id", VarType::String),
    ("creator.name", VarType::String),
    ("creator.email", VarType::String),
    ("creator.teams", VarType::StringArray),
    ("creator.verified", VarType::Bool),
    ("author.id", VarType::String),
    ("author.name", VarType::String),
    ("author.email", VarType::String),
    ("author.teams", VarType::StringArray),
    ("scm.author.name", VarType::String),
    ("scm.author.email", VarType::String),
    ("scm.committer.name", VarType::String),
    ("scm.committer.email", VarType::String),
    ("pull_request.id", VarType::String),
    ("pull_request.base_branch", VarType::String),
    ("pull_request.draft", VarType::Bool),
    ("pull_request.label", VarType::String),
    ("pull_request.labels", VarType::StringArray),
    ("pull_request.repository", VarType::String),
    ("pull_request.repository.fork", VarType::Bool),
    ("merge_queue.base_branch", VarType::String),
    ("merge_queue.base_commit", VarType::String),
];

const PIPELINE_VARS: &[(&str, VarType)] = &[
    ("id", VarType::String),
    ("slug", VarType::String),
    ("default_branch", VarType::String),
    ("repository", VarType::String),
    ("started_passing", VarType::Bool),
    ("started_failing", VarType::Bool),
    ("next_finished_build_exists", VarType::Bool),
];

const ORGANIZATION_VARS: &[(&str, VarType)] = &[("id", VarType::String), ("slug", VarType::String)];

const STEP_VARS: &[(&str, VarType)] = &[
    ("id", VarType::String),
    ("key", VarType::String),
    (
        "type",
        VarType::Enum(&["command", "wait", "input", "trigger", "group"]),
    ),
    ("label", VarType::String),
    (
        "state",
        VarType::Enum(&[
            "ignored",
            "waiting_for_dependencies",
            "ready",
            "waiting_for_input",
            "running",
            "failing",
            "canceled",
            "finished",
        ]),
    ),
    (
        "outcome",
        VarType::Enum(&["neutral", "passed", "soft_failed", "hard_failed", "errored"]),
    ),
];

/// Variables whose blank value (empty or whitespace) reads as null.
const PRESENCE: &[&str] = &[
    "build.tag",
    "build.message",
    "build.author.name",
    "build.author.email",
    "pipeline.default_branch",
    "pipeline.repository",
];

impl Schema {
    /// No variables at all (conditions over literals and `env()` only).
    pub fn new() -> Self {
        Self::default()
    }

    /// Declares (or redeclares) a variable.
    pub fn declare(&mut self, name: impl Into<String>, ty: VarType) -> &mut Self {
        self.vars.insert(Cow::Owned(name.into()), ty);
        self
    }

    /// Declares every name with type [`VarType::Any`].
    pub fn with_names<I: IntoIterator<Item = S>, S: Into<String>>(names: I) -> Self {
        let mut s = Self::new();
        for n in names {
            s.declare(n, VarType::Any);
        }
        s
    }

    /// Makes `name(...)` an env function too: like `build.env` (null when unset) when
    /// `like_build_env`, else like `env` (`""` when unset). Trigger rules use
    /// `source.build.env("X")`.
    pub fn env_function(&mut self, name: impl Into<String>, like_build_env: bool) -> &mut Self {
        self.env_aliases.push((name.into(), like_build_env));
        self
    }

    /// `Some(like_build_env)` when `name` is an env function here.
    pub(crate) fn env_function_kind(&self, name: &str) -> Option<bool> {
        match name {
            "env" => Some(false),
            "build.env" => Some(true),
            _ => self
                .env_aliases
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, b)| *b),
        }
    }

    pub fn get(&self, name: &str) -> Option<VarType> {
        self.vars.get(name).copied()
    }

    fn add(&mut self, prefix: &str, table: &[(&'static str, VarType)]) {
        for (name, ty) in table {
            self.vars.insert(Cow::Owned(format!("{prefix}{name}")), *ty);
        }
    }

    /// Buildkite's variables for an entry point (`step.*` only where steps are allowed).
    pub fn for_entry_point(entry: EntryPoint) -> &'static Schema {
        static BASE: OnceLock<Schema> = OnceLock::new();
        static STEP: OnceLock<Schema> = OnceLock::new();
        let build = |step: bool| {
            let mut s = Schema {
                buildkite: true,
                ..Schema::default()
            };
            s.add("build.", BUILD_VARS);
            s.add("pipeline.", PIPELINE_VARS);
            s.add("organization.", ORGANIZATION_VARS);
            if step {
                s.add("step.", STEP_VARS);
            }
            s
        };
        if entry.allows_step() {
            STEP.get_or_init(|| build(true))
        } else {
            BASE.get_or_init(|| build(false))
        }
    }

    /// kitebridge's trigger rules: `source.build.*` (every build variable), `source.pipeline.*`,
    /// and `target.trigger.{branch,commit,message}`. Values are taken as given (no Buildkite
    /// presence rules); `env()` reads the context's env maps.
    pub fn trigger_rules() -> Schema {
        let mut s = Schema::new();
        s.add("source.build.", BUILD_VARS);
        s.add("source.pipeline.", PIPELINE_VARS);
        s.add("source.pipeline.", &[("name", VarType::String)]);
        s.add(
            "target.trigger.",
            &[
                ("branch", VarType::String),
                ("commit", VarType::String),
                ("message", VarType::String),
            ],
        );
        s
    }

    /// Why `name` is not a variable here, for the validation message.
    pub(crate) fn unknown_message(&self, name: &str) -> String {
        if self.buildkite
            && name.starts_with("step.")
            && STEP_VARS.iter().any(|(n, _)| name[5..] == **n)
        {
            return format!("`{name}` is only available in step conditions and step notifications");
        }
        format!("`{name}` is not a variable")
    }
}

/// A declared variable's value, with Buildkite's derivations when the schema asks for them.
pub(crate) fn variable<'c>(schema: &Schema, ctx: &'c Context, name: &str) -> Cow<'c, Value> {
    static NULL: Value = Value::Null;
    let raw = |n: &str| ctx.variables.get(n).unwrap_or(&NULL);
    if !schema.buildkite {
        return Cow::Borrowed(raw(name));
    }
    match name {
        "build.source_event" | "build.source_action" => {
            if raw("build.source").as_str() != Some("webhook") {
                return Cow::Borrowed(&NULL);
            }
            let v = raw(name);
            if !v.is_null() {
                return Cow::Borrowed(v);
            }
            let env_name = if name == "build.source_event" {
                "BUILDKITE_GITHUB_EVENT"
            } else {
                "BUILDKITE_GITHUB_ACTION"
            };
            match user_env(ctx, env_name) {
                Some(v) => Cow::Owned(Value::String(v.to_owned())),
                None => Cow::Borrowed(&NULL),
            }
        }
        "build.pull_request.label" => {
            if variable(schema, ctx, "build.source_event").as_str() == Some("pull_request") {
                Cow::Borrowed(raw(name))
            } else {
                Cow::Borrowed(&NULL)
            }
        }
        _ if PRESENCE.contains(&name) => match raw(name) {
            Value::String(s) if s.trim().is_empty() => Cow::Borrowed(&NULL),
            v => Cow::Borrowed(v),
        },
        _ => Cow::Borrowed(raw(name)),
    }
}

fn user_env<'c>(ctx: &'c Context, name: &str) -> Option<&'c str> {
    ctx.build_env
        .get(name)
        .or_else(|| ctx.project_env.get(name))
        .map(String::as_str)
}

/// The `BUILDKITE_*` names conditions may read (everything else under that prefix is refused).
pub(crate) const SUPPORTED_BUILDKITE_ENV: &[&str] = &[
    "BUILDKITE_BRANCH",
    "BUILDKITE_TAG",
    "BUILDKITE_MESSAGE",
    "BUILDKITE_COMMIT",
    "BUILDKITE_PIPELINE_SLUG",
    "BUILDKITE_PIPELINE_NAME",
    "BUILDKITE_PIPELINE_ID",
    "BUILDKITE_ORGANIZATION_SLUG",
    "BUILDKITE_TRIGGERED_FROM_BUILD_ID",
    "BUILDKITE_TRIGGERED_FROM_BUILD_NUMBER",
    "BUILDKITE_TRIGGERED_FROM_BUILD_PIPELINE_SLUG",
    "BUILDKITE_TRIGGERED_FROM_BUILD_JOB_ID",
    "BUILDKITE_REBUILT_FROM_BUILD_ID",
    "BUILDKITE_REBUILT_FROM_BUILD_NUMBER",
    "BUILDKITE_REPO",
    "BUILDKITE_PULL_REQUEST",
    "BUILDKITE_PULL_REQUEST_BASE_BRANCH",
    "BUILDKITE_PULL_REQUEST_REPO",
    "BUILDKITE_PULL_REQUEST_LABELS",
    "BUILDKITE_PULL_REQUEST_USING_MERGE_REFSPEC",
    "BUILDKITE_MERGE_QUEUE_BASE_BRANCH",
    "BUILDKITE_MERGE_QUEUE_BASE_COMMIT",
    "BUILDKITE_GIT_DIFF_BASE",
    "BUILDKITE_GITHUB_ACTION",
    "BUILDKITE_GITHUB_COMMENT_ID",
    "BUILDKITE_GITHUB_DEPLOYMENT_ID",
    "BUILDKITE_GITHUB_DEPLOYMENT_TASK",
    "BUILDKITE_GITHUB_DEPLOYMENT_ENVIRONMENT",
    "BUILDKITE_GITHUB_DEPLOYMENT_PAYLOAD",
    "BUILDKITE_GITHUB_EVENT",
    "BUILDKITE_GITHUB_REVIEW_ID",
    "BUILDKITE_GITHUB_CHECK_RUN_CONCLUSION",
    "BUILDKITE_GITHUB_CHECK_RUN_NAME",
    "BUILDKITE_GITHUB_DEPLOYMENT_STATUS_ENVIRONMENT",
    "BUILDKITE_GITHUB_DEPLOYMENT_STATUS_STATE",
    "BUILDKITE_GITHUB_RELEASE_DRAFT",
    "BUILDKITE_GITHUB_RELEASE_PRERELEASE",
    "BUILDKITE_GITHUB_RELEASE_TAG",
    "BUILDKITE_GITHUB_REVIEW_STATE",
];

/// What the server accepts as an environment variable name in a literal `env("...")`.
pub(crate) fn is_env_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

pub(crate) fn unsupported_buildkite_env(name: &str) -> bool {
    name.starts_with("BUILDKITE_") && !SUPPORTED_BUILDKITE_ENV.contains(&name)
}

/// The environment a Buildkite condition sees: built-in values first (they override), then the
/// build's env, then the project's. Refused `BUILDKITE_*` names read as unset.
pub(crate) fn env<'c>(schema: &Schema, ctx: &'c Context, name: &str) -> Option<Cow<'c, str>> {
    if !schema.buildkite {
        return user_env(ctx, name).map(Cow::Borrowed);
    }
    if let Some(builtin) = builtin_env(schema, ctx, name) {
        return builtin;
    }
    if unsupported_buildkite_env(name) {
        return None;
    }
    user_env(ctx, name).map(Cow::Borrowed)
}

/// `Some(value)` when `name` is a built-in (whose value may be unset), `None` when it is not.
#[allow(clippy::option_option)]
fn builtin_env<'c>(schema: &Schema, ctx: &'c Context, name: &str) -> Option<Option<Cow<'c, str>>> {
    let var = |n: &str| variable(schema, ctx, n);
    let only = |n: &str| ctx.context_only.get(n).unwrap_or(&Value::Null);
    let text = |v: Cow<'c, Value>| -> Option<Cow<'c, str>> {
        match v {
            Cow::Borrowed(Value::String(s)) => Some(Cow::Borrowed(s.as_str())),
            Cow::Owned(Value::String(s)) => Some(Cow::Owned(s)),
            Cow::Borrowed(Value::Null) | Cow::Owned(Value::Null) => None,
            other => Some(Cow::Owned(match other.as_ref() {
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                v => v.to_string(),
            })),
        }
    };
    let or = |v: Option<Cow<'c, str>>, d: &'static str| Some(v.unwrap_or(Cow::Borrowed(d)));
    let truthy = |v: &Value| v.as_bool() == Some(true);
    let value = match name {
        "BUILDKITE_BRANCH" => text(var("build.branch")),
        "BUILDKITE_TAG" => or(text(var("build.tag")), ""),
        "BUILDKITE_MESSAGE" => or(text(var("build.message")), ""),
        "BUILDKITE_COMMIT" => text(var("build.commit")),
        "BUILDKITE_REPO" => text(var("pipeline.repository")),
        "BUILDKITE_PIPELINE_SLUG" => text(var("pipeline.slug")),
        "BUILDKITE_PIPELINE_NAME" => text(Cow::Borrowed(only("pipeline.name"))),
        "BUILDKITE_PIPELINE_ID" => text(var("pipeline.id")),
        "BUILDKITE_ORGANIZATION_SLUG" => text(var("organization.slug")),
        "BUILDKITE_PULL_REQUEST" => or(text(var("build.pull_request.id")), "false"),
        "BUILDKITE_PULL_REQUEST_BASE_BRANCH" => or(text(var("build.pull_request.base_branch")), ""),
        "BUILDKITE_PULL_REQUEST_REPO" => or(text(var("build.pull_request.repository")), ""),
        "BUILDKITE_PULL_REQUEST_LABELS" => {
            let labels = var("build.pull_request.labels");
            let joined = labels
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            Some(Cow::Owned(joined))
        }
        "BUILDKITE_PULL_REQUEST_USING_MERGE_REFSPEC" => Some(Cow::Borrowed(
            if truthy(only("build.pull_request.using_merge_refspec")) {
                "true"
            } else {
                ""
            },
        )),
        "BUILDKITE_MERGE_QUEUE_BASE_BRANCH" => text(var("build.merge_queue.base_branch")),
        "BUILDKITE_MERGE_QUEUE_BASE_COMMIT" => text(var("build.merge_queue.base_commit")),
        "BUILDKITE_GIT_DIFF_BASE" => {
            if truthy(only("build.merge_queue.active")) {
                let commit = truthy(only(
                    "pipeline.use_merge_queue_base_commit_for_git_diff_base",
                ));
                or(
                    text(var(if commit {
                        "build.merge_queue.base_commit"
                    } else {
                        "build.merge_queue.base_branch"
                    })),
                    "",
                )
            } else {
                Some(Cow::Borrowed(""))
            }
        }
        "BUILDKITE_TRIGGERED_FROM_BUILD_ID" => or(
            text(Cow::Borrowed(only("build.triggered_from.build_id"))),
            "",
        ),
        "BUILDKITE_TRIGGERED_FROM_BUILD_NUMBER" => or(
            text(Cow::Borrowed(only("build.triggered_from.build_number"))),
            "",
        ),
        "BUILDKITE_TRIGGERED_FROM_BUILD_PIPELINE_SLUG" => or(
            text(Cow::Borrowed(only(
                "build.triggered_from.build_pipeline_slug",
            ))),
            "",
        ),
        "BUILDKITE_TRIGGERED_FROM_BUILD_JOB_ID" => {
            or(text(Cow::Borrowed(only("build.triggered_from.job_id"))), "")
        }
        "BUILDKITE_REBUILT_FROM_BUILD_ID" => {
            or(text(Cow::Borrowed(only("build.rebuilt_from.build_id"))), "")
        }
        "BUILDKITE_REBUILT_FROM_BUILD_NUMBER" => or(
            text(Cow::Borrowed(only("build.rebuilt_from.build_number"))),
            "",
        ),
        _ => return None,
    };
    Some(value)
}

/// The validation message for a literal `BUILDKITE_*` name conditions may not read: a "did you
/// mean" when a supported name is close (Jaro-Winkler, then Levenshtein), else "not supported".
pub(crate) fn unsupported_env_message(name: &str) -> String {
    match suggest(name) {
        Some(s) => format!("{name:?} is not a valid environment variable, did you mean {s:?}?"),
        None => format!(
            "Interpolation of {name:?} is not supported (see \
             https://buildkite.com/docs/pipelines/environment-variables#variable-interpolation). \
             You can instead interpolate this variable at runtime (see \
             https://buildkite.com/docs/pipelines/environment-variables#runtime-variable-interpolation). \
             If you are still having issues, please contact hello@buildkite.com."
        ),
    }
}

fn suggest(input: &str) -> Option<&'static str> {
    if input.is_empty() {
        return None;
    }
    let threshold = if input.chars().count() > 3 {
        0.834
    } else {
        0.77
    };
    let mut candidates: Vec<(f64, &'static str)> = SUPPORTED_BUILDKITE_ENV
        .iter()
        .filter(|w| **w != input)
        .map(|w| (jaro_winkler(w, input), *w))
        .filter(|(score, _)| *score >= threshold)
        .collect();
    candidates.sort_by(|a, b| b.0.total_cmp(&a.0));
    let max_distance = input.chars().count().div_ceil(4);
    candidates
        .into_iter()
        .find(|(_, w)| levenshtein(w, input) <= max_distance)
        .map(|(_, w)| w)
}

fn jaro_winkler(a: &str, b: &str) -> f64 {
    if a == b {
        return 1.0;
    }
    let l: Vec<char> = a.chars().collect();
    let r: Vec<char> = b.chars().collect();
    if l.is_empty() || r.is_empty() {
        return 0.0;
    }
    let window = (l.len().max(r.len()) / 2).saturating_sub(1);
    let mut lm = vec![false; l.len()];
    let mut rm = vec![false; r.len()];
    let mut matches = 0usize;
    for (i, ch) in l.iter().enumerate() {
        let lo = i.saturating_sub(window);
        let hi = (i + window + 1).min(r.len());
        for j in lo..hi {
            if !rm[j] && r[j] == *ch {
                lm[i] = true;
                rm[j] = true;
                matches += 1;
                break;
            }
        }
    }
    if matches == 0 {
        return 0.0;
    }
    let mut transpositions = 0usize;
    let mut j = 0;
    for (i, matched) in lm.iter().enumerate() {
        if !matched {
            continue;
        }
        while !rm[j] {
            j += 1;
        }
        if l[i] != r[j] {
            transpositions += 1;
        }
        j += 1;
    }
    let m = matches as f64;
    let jaro =
        (m / l.len() as f64 + m / r.len() as f64 + (m - transpositions as f64 / 2.0) / m) / 3.0;
    let prefix = l.iter().zip(&r).take(4).take_while(|(x, y)| x == y).count();
    jaro + prefix as f64 * 0.1 * (1.0 - jaro)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let r: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=r.len()).collect();
    let mut cur = vec![0; r.len() + 1];
    for (i, lc) in a.chars().enumerate() {
        cur[0] = i + 1;
        for (j, rc) in r.iter().enumerate() {
            let cost = usize::from(lc != *rc);
            cur[j + 1] = (prev[j + 1] + 1).min(cur[j] + 1).min(prev[j] + cost);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[r.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions() {
        assert_eq!(suggest("BUILDKITE_MESSGE"), Some("BUILDKITE_MESSAGE"));
        assert_eq!(suggest("BUILDKITE_AGENT_ACCESS_TOKEN"), None);
        assert_eq!(levenshtein("kitten", "sitting"), 3);
    }
}
