//! Data Center deployments (7.16+): `POST|GET|DELETE
//! /rest/api/{latest,1.0}/projects/{p}/repos/{r}/commits/{commitId}/deployments`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

use super::{
    Inner, check_state, check_text, dc_error, is_full_sha, lock, parse_dc_body, validation_failed,
};

/// Deployment states Data Center accepts.
const STATES: &[&str] = &[
    "PENDING",
    "IN_PROGRESS",
    "CANCELLED",
    "FAILED",
    "ROLLED_BACK",
    "SUCCESSFUL",
    "UNKNOWN",
];

/// Environment types Data Center accepts.
const ENV_TYPES: &[&str] = &["DEVELOPMENT", "TESTING", "STAGING", "PRODUCTION"];

/// One accepted deployment POST (Data Center).
#[derive(Debug, Clone, PartialEq)]
pub struct PostedDeployment {
    /// Project key, upper case.
    pub project_key: String,
    /// Repository slug.
    pub slug: String,
    /// Commit SHA, lower case.
    pub commit: String,
    /// `key` (the deploying job).
    pub key: String,
    /// `displayName`.
    pub display_name: String,
    /// `description`.
    pub description: String,
    /// `url` (the deployment run).
    pub url: String,
    /// `state` as posted (`PENDING`, `IN_PROGRESS`, `CANCELLED`, `FAILED`, `ROLLED_BACK`,
    /// `SUCCESSFUL`, `UNKNOWN`).
    pub state: String,
    /// `environment.key`.
    pub environment_key: String,
    /// `environment.displayName`.
    pub environment_display_name: String,
    /// `environment.type`, if given.
    pub environment_type: Option<String>,
    /// `environment.url`, if given.
    pub environment_url: Option<String>,
    /// `deploymentSequenceNumber`.
    pub sequence_number: i64,
    /// `lastUpdated` as answered: the posted value (epoch ms) or the time of the POST.
    pub last_updated: i64,
    /// Who posted it (username, or `token:<token>` for an access token).
    pub posted_by: String,
    /// The whole JSON body as posted.
    pub body: Value,
    /// When the fake accepted it.
    pub posted_at: DateTime<Utc>,
}

impl Inner {
    pub(super) fn deployment_post(
        &self,
        project: &str,
        slug: &str,
        commit: &str,
        body: &[u8],
        user: &str,
    ) -> Response {
        if !is_full_sha(commit) {
            return invalid_commit(commit);
        }
        let obj = match parse_dc_body(body) {
            Ok(o) => o,
            Err(r) => return r,
        };
        let unit = self.opts.length_unit;
        let mut errors = Vec::new();
        match obj.get("deploymentSequenceNumber") {
            Some(Value::Number(n)) if n.as_i64().is_some() => {}
            None | Some(Value::Null) => errors.push((
                "deploymentSequenceNumber".to_owned(),
                "deploymentSequenceNumber is required".to_owned(),
            )),
            Some(_) => errors.push((
                "deploymentSequenceNumber".to_owned(),
                "deploymentSequenceNumber must be an integer".to_owned(),
            )),
        }
        check_text(&obj, "key", true, 255, unit, &mut errors);
        check_text(&obj, "displayName", true, 255, unit, &mut errors);
        check_text(&obj, "description", true, 255, unit, &mut errors);
        check_text(&obj, "url", true, 1024, unit, &mut errors);
        check_state(&obj, STATES, &mut errors);
        let empty = Map::new();
        let env = match obj.get("environment") {
            Some(Value::Object(e)) => e,
            None | Some(Value::Null) => {
                errors.push((
                    "environment".to_owned(),
                    "environment is required".to_owned(),
                ));
                &empty
            }
            Some(_) => {
                errors.push((
                    "environment".to_owned(),
                    "environment must be an object {key, displayName, type, url}".to_owned(),
                ));
                &empty
            }
        };
        if obj.get("environment").is_some_and(Value::is_object) {
            let mut env_errors = Vec::new();
            check_text(env, "key", true, 255, unit, &mut env_errors);
            check_text(env, "displayName", true, 255, unit, &mut env_errors);
            check_text(env, "url", false, 1024, unit, &mut env_errors);
            match env.get("type") {
                None | Some(Value::Null) => {}
                Some(Value::String(t)) if ENV_TYPES.contains(&t.as_str()) => {}
                Some(other) => env_errors.push((
                    "type".to_owned(),
                    format!(
                        "type {other} is not valid; expected one of {}",
                        ENV_TYPES.join(", ")
                    ),
                )),
            }
            errors.extend(
                env_errors
                    .into_iter()
                    .map(|(f, m)| (format!("environment.{f}"), format!("environment.{m}"))),
            );
        }
        match obj.get("lastUpdated") {
            None | Some(Value::Null) => {}
            Some(Value::Number(n)) if n.as_i64().is_some_and(|v| v >= 0) => {}
            Some(_) => errors.push((
                "lastUpdated".to_owned(),
                "lastUpdated must be a non-negative integer (epoch milliseconds)".to_owned(),
            )),
        }
        if !errors.is_empty() {
            return validation_failed(&errors);
        }
        let text = |o: &Map<String, Value>, k: &str| {
            o.get(k).and_then(Value::as_str).unwrap_or("").to_owned()
        };
        let opt =
            |o: &Map<String, Value>, k: &str| o.get(k).and_then(Value::as_str).map(str::to_owned);
        let now = Utc::now();
        let (project_key, slug) = self.repo_key(project, slug);
        let posted = PostedDeployment {
            project_key,
            slug,
            commit: commit.to_ascii_lowercase(),
            key: text(&obj, "key"),
            display_name: text(&obj, "displayName"),
            description: text(&obj, "description"),
            url: text(&obj, "url"),
            state: text(&obj, "state"),
            environment_key: text(env, "key"),
            environment_display_name: text(env, "displayName"),
            environment_type: opt(env, "type"),
            environment_url: opt(env, "url"),
            sequence_number: obj
                .get("deploymentSequenceNumber")
                .and_then(Value::as_i64)
                .unwrap_or(0),
            last_updated: obj
                .get("lastUpdated")
                .and_then(Value::as_i64)
                .unwrap_or_else(|| now.timestamp_millis()),
            posted_by: user.to_owned(),
            body: Value::Object(obj.clone()),
            posted_at: now,
        };
        {
            let mut store = lock(&self.extra);
            let index = store.deployments.len();
            store.deployments.push(posted.clone());
            store.current_deployments.insert(identity(&posted), index);
        }
        axum::Json(self.deployment_json(&posted)).into_response()
    }

    /// GET (`admin_user` `None`) or DELETE (`Some(caller)`) one deployment by its identity.
    pub(super) fn deployment_get(
        &self,
        project: &str,
        slug: &str,
        commit: &str,
        query: &[(String, String)],
        admin_user: Option<&str>,
    ) -> Response {
        if !is_full_sha(commit) {
            return invalid_commit(commit);
        }
        if let Some(user) = admin_user
            && !self.is_admin(user)
        {
            return dc_error(
                StatusCode::UNAUTHORIZED,
                "You are not permitted to delete deployments of this repository: repository admin permission is required",
                "com.atlassian.bitbucket.AuthorisationException",
            );
        }
        let param = |k: &str| {
            query
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.as_str())
                .filter(|v| !v.is_empty())
        };
        let not_found = || {
            dc_error(
                StatusCode::NOT_FOUND,
                format!(
                    "No deployment exists for commit {commit} with the given key, environmentKey and deploymentSequenceNumber"
                ),
                "com.atlassian.bitbucket.deployment.NoSuchDeploymentException",
            )
        };
        let (Some(key), Some(env), Some(seq)) = (
            param("key"),
            param("environmentKey"),
            param("deploymentSequenceNumber").and_then(|s| s.parse::<i64>().ok()),
        ) else {
            return not_found();
        };
        let (project_key, slug) = self.repo_key(project, slug);
        let id = (
            (project_key, slug),
            commit.to_ascii_lowercase(),
            key.to_owned(),
            env.to_owned(),
            seq,
        );
        let mut store = lock(&self.extra);
        let Some(index) = store.current_deployments.get(&id).copied() else {
            return not_found();
        };
        if admin_user.is_some() {
            store.current_deployments.remove(&id);
            return StatusCode::NO_CONTENT.into_response();
        }
        let Some(d) = store.deployments.get(index).cloned() else {
            return not_found();
        };
        drop(store);
        axum::Json(self.deployment_json(&d)).into_response()
    }

    fn deployment_json(&self, d: &PostedDeployment) -> Value {
        let mut env = json!({"key": d.environment_key, "displayName": d.environment_display_name});
        if let Some(t) = &d.environment_type {
            env["type"] = json!(t);
        }
        if let Some(u) = &d.environment_url {
            env["url"] = json!(u);
        }
        json!({
            "deploymentSequenceNumber": d.sequence_number,
            "key": d.key,
            "displayName": d.display_name,
            "description": d.description,
            "url": d.url,
            "state": d.state,
            "environment": env,
            "lastUpdated": d.last_updated,
            "repository": self.repo_json(&d.project_key, &d.slug),
            "toCommit": self.dc_commit_json_by_id(&d.project_key, &d.slug, &d.commit),
            "fromCommit": Value::Null,
        })
    }
}

/// The identity tuple a deployment is upserted on.
pub(super) fn identity(
    d: &PostedDeployment,
) -> (super::extra::RepoId, String, String, String, i64) {
    (
        (d.project_key.clone(), d.slug.clone()),
        d.commit.clone(),
        d.key.clone(),
        d.environment_key.clone(),
        d.sequence_number,
    )
}

pub(super) fn invalid_commit(commit: &str) -> Response {
    dc_error(
        StatusCode::BAD_REQUEST,
        format!("'{commit}' is not a valid commit ID: a full 40-character SHA-1 is required"),
        "com.atlassian.bitbucket.commit.InvalidCommitIdException",
    )
}
