//! Buildkite's build and pipeline objects, as they arrive from the REST API (a build with a nested
//! `pipeline`) and in webhooks (`event`, `build` without jobs, `pipeline`, `sender`).
//!
//! Parsing is tolerant: unknown fields are kept (each struct's `extra`, so trigger rules can read
//! any field with [`Build::to_json`]), a new build state becomes [`BuildState::Unknown`], and
//! `null` is accepted wherever Buildkite has been seen to send it. What a `build.*` event cannot
//! do without (`event`, `build.id`, `build.number`, `build.state`, `build.commit`,
//! `pipeline.slug`) is required, and a body lacking it is a [`PayloadError`] naming the field.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

/// A build's `state`. Every state Buildkite documents, plus [`BuildState::Unknown`] so that a
/// state added later never fails parsing.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BuildState {
    Creating,
    Scheduled,
    Running,
    Passed,
    Failing,
    Failed,
    /// Only EventBridge and list filters use it; REST and webhooks keep the last state and set
    /// `blocked: true` instead.
    Blocked,
    Canceling,
    Canceled,
    Skipped,
    NotRun,
    Waiting,
    WaitingFailed,
    Unknown(String),
}

impl BuildState {
    /// Every known state, in lifecycle order (for table tests and docs).
    pub const KNOWN: [BuildState; 13] = [
        BuildState::Creating,
        BuildState::Scheduled,
        BuildState::Waiting,
        BuildState::Running,
        BuildState::Failing,
        BuildState::Blocked,
        BuildState::Canceling,
        BuildState::Passed,
        BuildState::Failed,
        BuildState::WaitingFailed,
        BuildState::Canceled,
        BuildState::Skipped,
        BuildState::NotRun,
    ];

    pub fn parse(s: &str) -> BuildState {
        match s {
            "creating" => BuildState::Creating,
            "scheduled" => BuildState::Scheduled,
            "running" => BuildState::Running,
            "passed" => BuildState::Passed,
            "failing" => BuildState::Failing,
            "failed" => BuildState::Failed,
            "blocked" => BuildState::Blocked,
            "canceling" => BuildState::Canceling,
            "canceled" => BuildState::Canceled,
            "skipped" => BuildState::Skipped,
            "not_run" => BuildState::NotRun,
            "waiting" => BuildState::Waiting,
            "waiting_failed" => BuildState::WaitingFailed,
            other => BuildState::Unknown(other.to_owned()),
        }
    }

    /// The wire name (`not_run`, `waiting_failed`, ...).
    pub fn as_str(&self) -> &str {
        match self {
            BuildState::Creating => "creating",
            BuildState::Scheduled => "scheduled",
            BuildState::Running => "running",
            BuildState::Passed => "passed",
            BuildState::Failing => "failing",
            BuildState::Failed => "failed",
            BuildState::Blocked => "blocked",
            BuildState::Canceling => "canceling",
            BuildState::Canceled => "canceled",
            BuildState::Skipped => "skipped",
            BuildState::NotRun => "not_run",
            BuildState::Waiting => "waiting",
            BuildState::WaitingFailed => "waiting_failed",
            BuildState::Unknown(s) => s,
        }
    }
}

impl fmt::Display for BuildState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for BuildState {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for BuildState {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Ok(BuildState::parse(&s))
    }
}

/// A Buildkite build (REST "Build" object, or the `build` of a webhook payload).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Build {
    pub id: String,
    #[serde(default)]
    pub graphql_id: Option<String>,
    pub number: u64,
    pub state: BuildState,
    #[serde(default, deserialize_with = "null_as_default")]
    pub blocked: bool,
    /// What a blocked build looks like while blocked (`passed`, `failed`, `running`); may be null.
    #[serde(default)]
    pub blocked_state: Option<String>,
    #[serde(default)]
    pub cancel_reason: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    /// A full SHA for most builds, but `HEAD` (or any ref) for builds created from the UI or API.
    pub commit: String,
    #[serde(default)]
    pub branch: Option<String>,
    #[serde(default)]
    pub tag: Option<String>,
    /// `webhook`, `api`, `ui`, `trigger_job`, `schedule`, `pipeline_trigger`, ...
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub web_url: Option<String>,
    /// The REST URL of the build.
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default, deserialize_with = "timestamp")]
    pub created_at: Option<DateTime<Utc>>,
    #[serde(default, deserialize_with = "timestamp")]
    pub scheduled_at: Option<DateTime<Utc>>,
    #[serde(default, deserialize_with = "timestamp")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(default, deserialize_with = "timestamp")]
    pub finished_at: Option<DateTime<Utc>>,
    #[serde(default, deserialize_with = "string_map")]
    pub meta_data: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "string_map")]
    pub env: BTreeMap<String, String>,
    /// `null`, `{}` or `{id, base, repository}`.
    #[serde(default)]
    pub pull_request: Option<PullRequest>,
    #[serde(default)]
    pub rebuilt_from: Option<BuildRef>,
    #[serde(default)]
    pub creator: Option<User>,
    #[serde(default, deserialize_with = "author")]
    pub author: Option<Author>,
    /// Present in REST answers (unless `exclude_pipeline=true`); webhooks carry it beside the build.
    #[serde(default)]
    pub pipeline: Option<Pipeline>,
    /// Every other field (`jobs`, `failing_at`, `merge_queue`, `triggered_from`, `steps`, ...).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Build {
    /// The whole build as JSON, known and unknown fields alike (what trigger rules read).
    pub fn to_json(&self) -> Value {
        // Serialising plain data (strings, numbers, maps with string keys) into a `Value`
        // cannot fail; fall back to null rather than panic all the same.
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// The organization slug, from the build's or the pipeline's URLs (`pipeline` overrides the
    /// nested one when given, as in webhooks).
    pub fn organization_slug(&self, pipeline: Option<&Pipeline>) -> Option<String> {
        let pipeline = pipeline.or(self.pipeline.as_ref());
        let urls = [
            self.url.as_deref(),
            pipeline.and_then(|p| p.url.as_deref()),
            self.web_url.as_deref(),
            pipeline.and_then(|p| p.web_url.as_deref()),
        ];
        urls.into_iter()
            .flatten()
            .find_map(|u| slugs_from_url(u).map(|(org, _)| org))
    }

    /// The pipeline slug: the pipeline's own, else the one in the build's URLs.
    pub fn pipeline_slug(&self, pipeline: Option<&Pipeline>) -> Option<String> {
        let pipeline = pipeline.or(self.pipeline.as_ref());
        if let Some(slug) = pipeline.map(|p| p.slug.trim()).filter(|s| !s.is_empty()) {
            return Some(slug.to_owned());
        }
        [self.url.as_deref(), self.web_url.as_deref()]
            .into_iter()
            .flatten()
            .find_map(|u| slugs_from_url(u).and_then(|(_, slug)| slug))
    }
}

/// `pull_request` of a build. `id` is the PR number as text (a number is accepted too).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PullRequest {
    #[serde(default, deserialize_with = "string_or_number")]
    pub id: Option<String>,
    /// The base branch.
    #[serde(default)]
    pub base: Option<String>,
    #[serde(default)]
    pub repository: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `rebuilt_from`: the build this one is a rebuild of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildRef {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub number: Option<u64>,
    #[serde(default)]
    pub url: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A Buildkite user (`creator`, `created_by`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct User {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The commit author, `{username, name, email}`; a bare string is taken as the email.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Author {
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A Buildkite pipeline (REST "Pipeline" object, or the `pipeline` of a webhook payload).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pipeline {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub graphql_id: Option<String>,
    pub slug: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    /// The clone URL (`git@host:proj/repo.git`, `https://host/scm/proj/repo.git`, ...).
    #[serde(default)]
    pub repository: Option<String>,
    #[serde(default)]
    pub web_url: Option<String>,
    /// The REST URL of the pipeline.
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub default_branch: Option<String>,
    #[serde(default)]
    pub cluster_id: Option<String>,
    #[serde(default)]
    pub provider: Option<Provider>,
    #[serde(default, deserialize_with = "string_map")]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub tags: Option<Vec<String>>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Pipeline {
    /// The organization slug, from the pipeline's URLs.
    pub fn organization_slug(&self) -> Option<String> {
        [self.url.as_deref(), self.web_url.as_deref()]
            .into_iter()
            .flatten()
            .find_map(|u| slugs_from_url(u).map(|(org, _)| org))
    }
}

/// `pipeline.provider`: the source host integration (`github`, `bitbucket_server`, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provider {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub webhook_url: Option<String>,
    #[serde(default)]
    pub settings: Map<String, Value>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `sender`: the user who created the webhook (not who triggered the build).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sender {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The body of a `build.*` webhook.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WebhookPayload {
    pub event: String,
    pub build: Build,
    pub pipeline: Pipeline,
    #[serde(default)]
    pub sender: Option<Sender>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl WebhookPayload {
    /// The organization slug, from the build's or the pipeline's URLs.
    pub fn organization_slug(&self) -> Option<String> {
        self.build.organization_slug(Some(&self.pipeline))
    }
}

/// A webhook body, by event family. Only `build.*` events are parsed in full; anything else is
/// to be acknowledged and ignored.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Build(Box<WebhookPayload>),
    Ping,
    /// Any other event (`job.*`, `agent.*`, names added later), by name.
    Other(String),
}

/// Why a webhook body could not be used. Messages name the field and never quote the body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PayloadError {
    #[error("the body is not JSON: {0}")]
    NotJson(String),
    #[error("the body is not a JSON object")]
    NotAnObject,
    #[error("`{0}` is missing")]
    Missing(String),
    #[error("`{field}` is invalid: {problem}")]
    Invalid { field: String, problem: String },
}

impl Event {
    /// Parses a webhook body. The event name is the body's `event`.
    ///
    /// Well-formed bodies take a fast path, deserialized straight from the bytes; anything the
    /// fast path refuses is parsed again by the careful path, whose only job is to name the
    /// missing or invalid field.
    pub fn parse(body: &[u8]) -> Result<Event, PayloadError> {
        // Build events are the hot path: one pass over the bytes into the typed payload.
        if let Ok(p) = serde_json::from_slice::<WebhookPayload>(body)
            && p.event.starts_with("build.")
        {
            return Ok(Event::Build(Box::new(p)));
        }
        Event::parse_carefully(body)
    }

    fn parse_carefully(body: &[u8]) -> Result<Event, PayloadError> {
        let value: Value =
            serde_json::from_slice(body).map_err(|e| PayloadError::NotJson(e.to_string()))?;
        let Some(object) = value.as_object() else {
            return Err(PayloadError::NotAnObject);
        };
        let event = match object.get("event") {
            Some(Value::String(s)) => s.clone(),
            None | Some(Value::Null) => return Err(PayloadError::Missing("event".into())),
            Some(_) => {
                return Err(PayloadError::Invalid {
                    field: "event".into(),
                    problem: "expected a string".into(),
                });
            }
        };
        if event == "ping" {
            Ok(Event::Ping)
        } else if event.starts_with("build.") {
            WebhookPayload::from_value(value).map(|p| Event::Build(Box::new(p)))
        } else {
            Ok(Event::Other(event))
        }
    }
}

impl WebhookPayload {
    /// Parses the body of a `build.*` webhook, naming the first missing or invalid field.
    pub fn parse(body: &[u8]) -> Result<WebhookPayload, PayloadError> {
        let value: Value =
            serde_json::from_slice(body).map_err(|e| PayloadError::NotJson(e.to_string()))?;
        WebhookPayload::from_value(value)
    }

    pub fn from_value(value: Value) -> Result<WebhookPayload, PayloadError> {
        if !value.is_object() {
            return Err(PayloadError::NotAnObject);
        }
        // Check presence first: serde's "missing field `id`" does not say which object lacks it.
        for path in [
            "event",
            "build",
            "build.id",
            "build.number",
            "build.state",
            "build.commit",
            "pipeline",
            "pipeline.slug",
        ] {
            let found = path
                .split('.')
                .try_fold(&value, |v, key| v.get(key))
                .filter(|v| !v.is_null());
            if found.is_none() {
                return Err(PayloadError::Missing(path.to_owned()));
            }
        }
        serde_path_to_error::deserialize(value).map_err(|e| {
            let field = e.path().to_string();
            let problem = e.into_inner().to_string();
            // serde_json appends " at line L column C" only when parsing text; a `Value` has none.
            PayloadError::Invalid { field, problem }
        })
    }
}

/// `(organization, pipeline)` slugs from a Buildkite URL:
/// `https://api.buildkite.com/v2/organizations/{org}/pipelines/{slug}/builds/{n}` or
/// `https://buildkite.com/{org}/{slug}/builds/{n}`. The pipeline is `None` for a URL that names
/// only the organization.
pub fn slugs_from_url(url: &str) -> Option<(String, Option<String>)> {
    let parsed = url::Url::parse(url).ok()?;
    let segments: Vec<&str> = parsed.path_segments()?.filter(|s| !s.is_empty()).collect();
    let (org, pipeline) = if let Some(i) = segments
        .windows(2)
        .position(|w| w == ["v2", "organizations"])
    {
        let org = segments.get(i + 2)?;
        let pipeline = match (segments.get(i + 3), segments.get(i + 4)) {
            (Some(&"pipelines"), Some(slug)) => Some(*slug),
            _ => None,
        };
        (*org, pipeline)
    } else {
        // A web URL has no fixed prefix; only accept Buildkite's own host so that an unrelated
        // URL never yields a made-up organization.
        let host = parsed.host_str()?;
        if host != "buildkite.com" && !host.ends_with(".buildkite.com") {
            return None;
        }
        (*segments.first()?, segments.get(1).copied())
    };
    if !is_slug(org) {
        return None;
    }
    Some((
        org.to_owned(),
        pipeline.filter(|p| is_slug(p)).map(str::to_owned),
    ))
}

use crate::names::is_slug;

// ---- lenient field parsers ----

fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// ISO 8601 / RFC 3339 (`2015-05-09T21:05:59.874Z`), or the older `2013-09-03 13:24:38 UTC`;
/// null, missing or empty is `None`.
fn timestamp<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<DateTime<Utc>>, D::Error> {
    let Some(s) = Option::<String>::deserialize(deserializer)? else {
        return Ok(None);
    };
    parse_timestamp(&s).map_err(serde::de::Error::custom)
}

pub(crate) fn parse_timestamp(s: &str) -> Result<Option<DateTime<Utc>>, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(Some(t.with_timezone(&Utc)));
    }
    for format in ["%Y-%m-%d %H:%M:%S%.f UTC", "%Y-%m-%dT%H:%M:%S%.f"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, format) {
            return Ok(Some(t.and_utc()));
        }
    }
    Err(format!("{s:?} is not an ISO 8601 timestamp"))
}

/// A string-to-string map; null is empty, and a non-string value is kept as its JSON text.
fn string_map<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    let map = Option::<Map<String, Value>>::deserialize(deserializer)?.unwrap_or_default();
    Ok(map
        .into_iter()
        .filter_map(|(k, v)| match v {
            Value::Null => None,
            Value::String(s) => Some((k, s)),
            other => Some((k, other.to_string())),
        })
        .collect())
}

fn string_or_number<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<String>, D::Error> {
    match Option::<Value>::deserialize(deserializer)? {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(_) => Err(serde::de::Error::custom("expected a string or a number")),
    }
}

fn author<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Author>, D::Error> {
    match Option::<Value>::deserialize(deserializer)? {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(email)) => Ok(Some(Author {
            email: Some(email),
            ..Author::default()
        })),
        Some(v @ Value::Object(_)) => serde_json::from_value(v)
            .map(Some)
            .map_err(serde::de::Error::custom),
        Some(_) => Err(serde::de::Error::custom("expected an object or an email")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn minimal_build() -> Value {
        json!({"id": "b1", "number": 7, "state": "passed", "commit": "abc"})
    }

    #[test]
    fn every_state_round_trips_and_new_states_are_kept() {
        for state in BuildState::KNOWN {
            let parsed: BuildState = serde_json::from_value(json!(state.as_str())).unwrap();
            assert_eq!(parsed, state);
            assert_eq!(
                serde_json::to_value(&parsed).unwrap(),
                json!(state.as_str())
            );
        }
        let parsed: BuildState = serde_json::from_value(json!("paused")).unwrap();
        assert_eq!(parsed, BuildState::Unknown("paused".into()));
        assert_eq!(serde_json::to_value(&parsed).unwrap(), json!("paused"));
    }

    #[test]
    fn minimal_build_parses_with_defaults() {
        let b: Build = serde_json::from_value(minimal_build()).unwrap();
        assert_eq!(b.number, 7);
        assert!(!b.blocked);
        assert_eq!(b.started_at, None);
        assert!(b.meta_data.is_empty());
        assert!(b.pipeline.is_none());
    }

    #[test]
    fn nulls_are_tolerated() {
        let mut v = minimal_build();
        for k in [
            "blocked",
            "blocked_state",
            "message",
            "branch",
            "tag",
            "created_at",
            "started_at",
            "finished_at",
            "meta_data",
            "env",
            "pull_request",
            "rebuilt_from",
            "creator",
            "author",
            "pipeline",
        ] {
            v[k] = Value::Null;
        }
        let b: Build = serde_json::from_value(v).unwrap();
        assert!(!b.blocked);
        assert!(b.author.is_none());
    }

    #[test]
    fn timestamps_accept_iso_and_the_older_utc_form() {
        let mut v = minimal_build();
        v["created_at"] = json!("2015-05-09T21:05:59.874Z");
        v["started_at"] = json!("2013-09-03 13:24:38 UTC");
        v["finished_at"] = json!("2015-05-09T23:05:59+02:00");
        v["scheduled_at"] = json!("");
        let b: Build = serde_json::from_value(v).unwrap();
        assert_eq!(
            b.created_at.unwrap().to_rfc3339(),
            "2015-05-09T21:05:59.874+00:00"
        );
        assert_eq!(
            b.started_at.unwrap().to_rfc3339(),
            "2013-09-03T13:24:38+00:00"
        );
        assert_eq!(
            b.finished_at.unwrap().to_rfc3339(),
            "2015-05-09T21:05:59+00:00"
        );
        assert_eq!(b.scheduled_at, None);

        let mut v = minimal_build();
        v["started_at"] = json!("yesterday");
        assert!(serde_json::from_value::<Build>(v).is_err());
    }

    #[test]
    fn unknown_fields_are_kept_and_serialised_back() {
        let mut v = minimal_build();
        v["failing_at"] = json!("2025-01-01T00:00:00Z");
        v["jobs"] = json!([{"id": "j"}]);
        let b: Build = serde_json::from_value(v).unwrap();
        assert_eq!(b.extra["jobs"], json!([{"id": "j"}]));
        let back = b.to_json();
        assert_eq!(back["failing_at"], json!("2025-01-01T00:00:00Z"));
        assert_eq!(back["number"], json!(7));
    }

    #[test]
    fn author_may_be_an_email_and_pr_id_a_number() {
        let mut v = minimal_build();
        v["author"] = json!("dana@example.com");
        v["pull_request"] = json!({"id": 415, "base": "main", "labels": ["x"]});
        v["meta_data"] = json!({"a": "b", "n": 1});
        let b: Build = serde_json::from_value(v).unwrap();
        assert_eq!(b.author.unwrap().email.as_deref(), Some("dana@example.com"));
        let pr = b.pull_request.unwrap();
        assert_eq!(pr.id.as_deref(), Some("415"));
        assert_eq!(pr.extra["labels"], json!(["x"]));
        assert_eq!(b.meta_data["n"], "1");

        let mut v = minimal_build();
        v["pull_request"] = json!({});
        let b: Build = serde_json::from_value(v).unwrap();
        assert_eq!(b.pull_request.unwrap().id, None);
    }

    #[test]
    fn rest_build_with_nested_pipeline() {
        let mut v = minimal_build();
        v["url"] = json!("https://api.buildkite.com/v2/organizations/acme/pipelines/web/builds/7");
        v["pipeline"] = json!({"id": "p", "slug": "web", "name": "Web", "repository": "git@x:a/b.git",
                               "provider": {"id": "bitbucket", "settings": {}}});
        let b: Build = serde_json::from_value(v).unwrap();
        assert_eq!(b.pipeline.as_ref().unwrap().slug, "web");
        assert_eq!(b.organization_slug(None).as_deref(), Some("acme"));
        assert_eq!(b.pipeline_slug(None).as_deref(), Some("web"));
    }

    #[test]
    fn slugs_from_urls() {
        type Slugs<'a> = Option<(&'a str, Option<&'a str>)>;
        let cases: &[(&str, Slugs)] = &[
            (
                "https://api.buildkite.com/v2/organizations/acme-inc/pipelines/web-app/builds/1",
                Some(("acme-inc", Some("web-app"))),
            ),
            (
                "https://api.buildkite.com/v2/organizations/acme-inc/pipelines/web-app",
                Some(("acme-inc", Some("web-app"))),
            ),
            (
                "http://127.0.0.1:9000/v2/organizations/acme/pipelines/p/builds/3",
                Some(("acme", Some("p"))),
            ),
            (
                "https://api.buildkite.com/v2/organizations/acme",
                Some(("acme", None)),
            ),
            (
                "https://buildkite.com/acme-inc/web-app/builds/1844",
                Some(("acme-inc", Some("web-app"))),
            ),
            ("https://buildkite.com/acme-inc", Some(("acme-inc", None))),
            ("https://example.com/acme/web/builds/1", None),
            ("https://buildkite.com/", None),
            ("not a url", None),
            ("https://buildkite.com/a%20b/x", None),
        ];
        for (url, want) in cases {
            let got = slugs_from_url(url);
            let want = want.map(|(o, p)| (o.to_owned(), p.map(str::to_owned)));
            assert_eq!(got, want, "{url}");
        }
    }

    #[test]
    fn webhook_payload_errors_name_the_field() {
        let ok = json!({"event": "build.finished", "build": minimal_build(), "pipeline": {"slug": "web"}});
        assert!(WebhookPayload::from_value(ok.clone()).is_ok());

        let cases: &[(&str, Value, PayloadError)] = &[
            (
                "no event",
                json!(null),
                PayloadError::Missing("event".into()),
            ),
            (
                "no build",
                json!(null),
                PayloadError::Missing("build".into()),
            ),
            (
                "no commit",
                json!(null),
                PayloadError::Missing("build.commit".into()),
            ),
            (
                "no pipeline slug",
                json!(null),
                PayloadError::Missing("pipeline.slug".into()),
            ),
        ];
        for (name, _, want) in cases {
            let mut v = ok.clone();
            match *name {
                "no event" => drop(v.as_object_mut().unwrap().remove("event")),
                "no build" => drop(v.as_object_mut().unwrap().remove("build")),
                "no commit" => drop(v["build"].as_object_mut().unwrap().remove("commit")),
                _ => v["pipeline"] = json!({"name": "x"}),
            }
            assert_eq!(&WebhookPayload::from_value(v).unwrap_err(), want, "{name}");
        }

        let mut v = ok.clone();
        v["build"]["number"] = json!("seven");
        match WebhookPayload::from_value(v).unwrap_err() {
            PayloadError::Invalid { field, .. } => assert_eq!(field, "build.number"),
            other => panic!("{other:?}"),
        }
        let mut v = ok;
        v["build"]["finished_at"] = json!("soon");
        match WebhookPayload::from_value(v).unwrap_err() {
            PayloadError::Invalid { field, .. } => assert_eq!(field, "build.finished_at"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            WebhookPayload::parse(b"[1]").unwrap_err(),
            PayloadError::NotAnObject
        );
        assert!(matches!(
            WebhookPayload::parse(b"{").unwrap_err(),
            PayloadError::NotJson(_)
        ));
    }

    #[test]
    fn events_by_family() {
        assert_eq!(Event::parse(br#"{"event":"ping"}"#).unwrap(), Event::Ping);
        assert_eq!(
            Event::parse(br#"{"event":"job.finished","job":{}}"#).unwrap(),
            Event::Other("job.finished".into())
        );
        assert_eq!(
            Event::parse(br#"{"event":"build.running"}"#).unwrap_err(),
            PayloadError::Missing("build".into())
        );
        assert!(matches!(
            Event::parse(br#"{"event":5}"#).unwrap_err(),
            PayloadError::Invalid { .. }
        ));
    }
}
