//! What a rule sees of its source build: the condition variables (`source.build.*`,
//! `source.pipeline.*`, `target.trigger.*`) and the environment that `${VAR}` templates,
//! `env("X")` and `source.build.env("X")` read.
//!
//! The environment is the pipeline's `env`, overlaid by the build's `env`, overlaid by the
//! built-in `BUILDKITE_*` variables of the source build (Buildkite's table: built-ins win, and a
//! built-in whose value is unknown reads as unset). kitebridge adds `BUILDKITE_BUILD_ID`,
//! `BUILDKITE_BUILD_NUMBER`, `BUILDKITE_BUILD_URL` and `BUILDKITE_SOURCE`, which every job of the
//! source build has and which templates often want.
//!
//! Values follow Buildkite's evaluator: a blank `tag`, `message`, `author.name` or
//! `author.email` (and pipeline `default_branch`/`repository`) is null; a blank branch stays a
//! string; `source_event`/`source_action` exist only for webhook builds.

use std::collections::HashMap;

use serde_json::{Value, json};

use crate::buildkite::model::{Build, Pipeline};
use crate::cond::Context;

/// A source build as a rule sees it.
#[derive(Debug, Clone, Copy)]
pub struct SourceBuild<'a> {
    /// Organization slug.
    pub organization: &'a str,
    pub build: &'a Build,
    /// The webhook's pipeline, or the REST build's nested one.
    pub pipeline: Option<&'a Pipeline>,
}

impl<'a> SourceBuild<'a> {
    pub fn new(organization: &'a str, build: &'a Build, pipeline: Option<&'a Pipeline>) -> Self {
        Self {
            organization,
            build,
            pipeline: pipeline.or(build.pipeline.as_ref()),
        }
    }

    /// The pipeline slug (the pipeline's, else from the build's URLs).
    pub fn pipeline_slug(&self) -> Option<String> {
        self.build.pipeline_slug(self.pipeline)
    }

    /// `organization/pipeline#number`, for people and meta-data.
    pub fn describe(&self) -> String {
        format!(
            "{}/{}#{}",
            self.organization,
            self.pipeline_slug().unwrap_or_default(),
            self.build.number
        )
    }
}

fn presence(v: Option<&str>) -> Value {
    match v {
        Some(s) if !s.trim().is_empty() => Value::String(s.to_owned()),
        _ => Value::Null,
    }
}

fn opt(v: Option<&str>) -> Value {
    v.map_or(Value::Null, |s| Value::String(s.to_owned()))
}

fn extra<'b>(map: &'b serde_json::Map<String, Value>, path: &[&str]) -> Option<&'b Value> {
    let (first, rest) = path.split_first()?;
    rest.iter()
        .try_fold(map.get(*first)?, |v, k| v.get(*k))
        .filter(|v| !v.is_null())
}

fn extra_str(map: &serde_json::Map<String, Value>, path: &[&str]) -> Option<String> {
    match extra(map, path)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn string_array(v: Option<&Value>) -> Value {
    match v {
        Some(Value::Array(a)) => Value::Array(
            a.iter()
                .filter_map(|x| x.as_str().map(|s| Value::String(s.to_owned())))
                .collect(),
        ),
        _ => Value::Null,
    }
}

/// The environment of the source build (see the module docs).
pub fn environment(source: &SourceBuild<'_>) -> HashMap<String, String> {
    let b = source.build;
    let p = source.pipeline;
    let mut env: HashMap<String, String> = HashMap::new();
    if let Some(p) = p {
        env.extend(p.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    env.extend(b.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    let mut set = |name: &str, value: Option<String>| match value {
        Some(v) => {
            env.insert(name.to_owned(), v);
        }
        None => {
            env.remove(name);
        }
    };
    let pr = b.pull_request.as_ref().filter(|pr| pr.id.is_some());
    let mq = |k: &str| extra_str(&b.extra, &["merge_queue", k]);
    let tf = |k: &str| extra_str(&b.extra, &["triggered_from", k]);
    set("BUILDKITE_BRANCH", b.branch.clone());
    set("BUILDKITE_TAG", Some(b.tag.clone().unwrap_or_default()));
    set(
        "BUILDKITE_MESSAGE",
        Some(b.message.clone().unwrap_or_default()),
    );
    set("BUILDKITE_COMMIT", Some(b.commit.clone()));
    set("BUILDKITE_REPO", p.and_then(|p| p.repository.clone()));
    set("BUILDKITE_PIPELINE_SLUG", source.pipeline_slug());
    set("BUILDKITE_PIPELINE_NAME", p.and_then(|p| p.name.clone()));
    set("BUILDKITE_PIPELINE_ID", p.and_then(|p| p.id.clone()));
    set(
        "BUILDKITE_ORGANIZATION_SLUG",
        Some(source.organization.to_owned()),
    );
    set(
        "BUILDKITE_PULL_REQUEST",
        Some(
            pr.and_then(|pr| pr.id.clone())
                .unwrap_or_else(|| "false".into()),
        ),
    );
    set(
        "BUILDKITE_PULL_REQUEST_BASE_BRANCH",
        Some(pr.and_then(|pr| pr.base.clone()).unwrap_or_default()),
    );
    set(
        "BUILDKITE_PULL_REQUEST_REPO",
        Some(pr.and_then(|pr| pr.repository.clone()).unwrap_or_default()),
    );
    let labels = pr
        .and_then(|pr| pr.extra.get("labels"))
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    set("BUILDKITE_PULL_REQUEST_LABELS", Some(labels));
    let refspec = pr
        .and_then(|pr| pr.extra.get("using_merge_refspec"))
        .and_then(Value::as_bool)
        == Some(true);
    set(
        "BUILDKITE_PULL_REQUEST_USING_MERGE_REFSPEC",
        Some(if refspec { "true" } else { "" }.to_owned()),
    );
    set("BUILDKITE_MERGE_QUEUE_BASE_BRANCH", mq("base_branch"));
    set("BUILDKITE_MERGE_QUEUE_BASE_COMMIT", mq("base_commit"));
    set(
        "BUILDKITE_GIT_DIFF_BASE",
        Some(mq("base_branch").unwrap_or_default()),
    );
    set("BUILDKITE_TRIGGERED_FROM_BUILD_ID", tf("build_id"));
    set("BUILDKITE_TRIGGERED_FROM_BUILD_NUMBER", tf("build_number"));
    set(
        "BUILDKITE_TRIGGERED_FROM_BUILD_PIPELINE_SLUG",
        tf("build_pipeline_slug"),
    );
    set("BUILDKITE_TRIGGERED_FROM_BUILD_JOB_ID", tf("job_id"));
    let rebuilt = b.rebuilt_from.as_ref();
    set(
        "BUILDKITE_REBUILT_FROM_BUILD_ID",
        rebuilt.and_then(|r| r.id.clone()),
    );
    set(
        "BUILDKITE_REBUILT_FROM_BUILD_NUMBER",
        rebuilt.and_then(|r| r.number).map(|n| n.to_string()),
    );
    // kitebridge's additions (every job of the source build has them).
    set("BUILDKITE_BUILD_ID", Some(b.id.clone()));
    set("BUILDKITE_BUILD_NUMBER", Some(b.number.to_string()));
    set("BUILDKITE_BUILD_URL", b.web_url.clone());
    set("BUILDKITE_SOURCE", b.source.clone());
    env
}

/// The condition variables by dotted name.
pub fn variables(
    source: &SourceBuild<'_>,
    commit: &str,
    branch: &str,
    message: &str,
) -> HashMap<String, Value> {
    let b = source.build;
    let p = source.pipeline;
    let mut v: HashMap<String, Value> = HashMap::with_capacity(48);
    let mut put = |name: &str, value: Value| {
        v.insert(format!("source.{name}"), value);
    };
    let webhook = b.source.as_deref() == Some("webhook");
    let from_env = |k: &str| {
        if webhook {
            opt(b.env.get(k).map(String::as_str))
        } else {
            Value::Null
        }
    };
    put("build.id", json!(b.id));
    put("build.state", json!(b.state.as_str()));
    put(
        "build.fixed",
        extra(&b.extra, &["fixed"]).cloned().unwrap_or(Value::Null),
    );
    put("build.blocked_state", presence(b.blocked_state.as_deref()));
    put("build.source", opt(b.source.as_deref()));
    put("build.source_event", from_env("BUILDKITE_GITHUB_EVENT"));
    put("build.source_action", from_env("BUILDKITE_GITHUB_ACTION"));
    put("build.branch", opt(b.branch.as_deref()));
    put("build.tag", presence(b.tag.as_deref()));
    put("build.message", presence(b.message.as_deref()));
    put("build.commit", json!(b.commit));
    put("build.number", json!(b.number));
    let creator = b.creator.as_ref();
    put(
        "build.creator.id",
        opt(creator.and_then(|c| c.id.as_deref())),
    );
    put(
        "build.creator.name",
        opt(creator.and_then(|c| c.name.as_deref())),
    );
    put(
        "build.creator.email",
        opt(creator.and_then(|c| c.email.as_deref())),
    );
    put(
        "build.creator.teams",
        string_array(creator.and_then(|c| c.extra.get("teams"))),
    );
    put(
        "build.creator.verified",
        creator
            .and_then(|c| c.extra.get("verified"))
            .filter(|x| x.is_boolean())
            .cloned()
            .unwrap_or(Value::Null),
    );
    let author = b.author.as_ref();
    let author_name = author.and_then(|a| a.name.as_deref());
    let author_email = author.and_then(|a| a.email.as_deref());
    put(
        "build.author.id",
        opt(author
            .and_then(|a| a.extra.get("id"))
            .and_then(Value::as_str)),
    );
    put("build.author.name", presence(author_name));
    put("build.author.email", presence(author_email));
    put(
        "build.author.teams",
        string_array(author.and_then(|a| a.extra.get("teams"))),
    );
    put("build.scm.author.name", opt(author_name));
    put("build.scm.author.email", opt(author_email));
    put("build.scm.committer.name", Value::Null);
    put("build.scm.committer.email", Value::Null);
    let pr = b.pull_request.as_ref().filter(|pr| pr.id.is_some());
    put(
        "build.pull_request.id",
        opt(pr.and_then(|pr| pr.id.as_deref())),
    );
    put(
        "build.pull_request.base_branch",
        opt(pr.and_then(|pr| pr.base.as_deref())),
    );
    put(
        "build.pull_request.draft",
        pr.and_then(|pr| pr.extra.get("draft"))
            .filter(|x| x.is_boolean())
            .cloned()
            .unwrap_or(Value::Null),
    );
    let labels = string_array(pr.and_then(|pr| pr.extra.get("labels")));
    put(
        "build.pull_request.label",
        if from_env("BUILDKITE_GITHUB_EVENT").as_str() == Some("pull_request") {
            labels
                .as_array()
                .and_then(|a| a.first().cloned())
                .unwrap_or(Value::Null)
        } else {
            Value::Null
        },
    );
    put("build.pull_request.labels", labels);
    put(
        "build.pull_request.repository",
        opt(pr.and_then(|pr| pr.repository.as_deref())),
    );
    put(
        "build.pull_request.repository.fork",
        pr.and_then(|pr| pr.extra.get("repository_fork"))
            .filter(|x| x.is_boolean())
            .cloned()
            .unwrap_or(Value::Null),
    );
    put(
        "build.merge_queue.base_branch",
        opt(extra_str(&b.extra, &["merge_queue", "base_branch"]).as_deref()),
    );
    put(
        "build.merge_queue.base_commit",
        opt(extra_str(&b.extra, &["merge_queue", "base_commit"]).as_deref()),
    );
    put("pipeline.id", opt(p.and_then(|p| p.id.as_deref())));
    put("pipeline.slug", opt(source.pipeline_slug().as_deref()));
    put("pipeline.name", opt(p.and_then(|p| p.name.as_deref())));
    put(
        "pipeline.default_branch",
        presence(p.and_then(|p| p.default_branch.as_deref())),
    );
    put(
        "pipeline.repository",
        presence(p.and_then(|p| p.repository.as_deref())),
    );
    for n in [
        "pipeline.started_passing",
        "pipeline.started_failing",
        "pipeline.next_finished_build_exists",
    ] {
        put(n, Value::Null);
    }
    v.insert("target.trigger.commit".into(), json!(commit));
    v.insert("target.trigger.branch".into(), json!(branch));
    v.insert("target.trigger.message".into(), json!(message));
    v
}

/// The evaluation context of a rule's conditions: [`variables`], and `env` (from
/// [`environment`]) as what `env("X")` and `source.build.env("X")` read.
pub fn context(
    source: &SourceBuild<'_>,
    commit: &str,
    branch: &str,
    message: &str,
    env: HashMap<String, String>,
) -> Context {
    Context {
        variables: variables(source, commit, branch, message),
        build_env: env,
        project_env: HashMap::new(),
        context_only: HashMap::new(),
    }
}
