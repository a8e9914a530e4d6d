//! The releases API's requests, and their validation: each field checked, a wrong one named in
//! a 400 ([`ReleaseError::Invalid`]) before anything is read or written.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::error::ReleaseError;
use super::model::{DeploymentStatus, Environment, PipelineRef, VersionScheme};
use super::version::{self, Bump};
use crate::names;

type Result<T> = std::result::Result<T, ReleaseError>;

/// `PUT /projects/{project}`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectSpec {
    #[serde(default)]
    pub build_pipeline: Option<PipelineRef>,
    #[serde(default)]
    pub environments: Vec<Environment>,
    #[serde(default)]
    pub version_scheme: VersionScheme,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// `OWNER/slug` on the configured Bitbucket, for changelogs.
    #[serde(default)]
    pub repository: Option<String>,
    /// `.gitignore` lines selecting the commits a changelog lists.
    #[serde(default)]
    pub paths: Vec<String>,
}

/// `POST /projects/{project}/releases`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CutRequest {
    pub commit: String,
    pub branch: String,
    #[serde(default)]
    pub version: Option<String>,
    /// Which part of a semver version the next version bumps when `version` is absent.
    #[serde(default)]
    pub bump: Bump,
}

/// `POST /projects/{project}/environments/{env}/deployments`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployRequest {
    pub release_candidate_version: String,
    #[serde(default)]
    pub force: bool,
}

/// `PATCH /projects/{project}/environments/{env}/deployments`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusRequest {
    pub release_candidate_version: String,
    pub status: String,
    #[serde(default)]
    pub error_message: Option<String>,
    #[serde(default)]
    pub force: bool,
}

/// `POST /projects/{project}/environments/{env}/rollback`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    #[serde(default)]
    pub force: bool,
}

/// `PUT /projects/{project}/environments/{env}/freeze`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FreezeRequest {
    pub frozen: bool,
    #[serde(default)]
    pub reason: Option<String>,
}

const MAX_ENVIRONMENTS: usize = 50;
const MAX_VARIABLES: usize = 100;
const MAX_VALUE: usize = 4096;
const MAX_TEXT: usize = 1000;

/// Project and environment names ([`names::validate_release_name`]).
pub fn validate_name(field: &str, name: &str) -> Result<()> {
    names::validate_release_name(name).map_err(|m| ReleaseError::invalid(field, m))
}

pub(super) fn validate_commit(commit: &str) -> Result<String> {
    let ok = matches!(commit.len(), 40 | 64) && commit.bytes().all(|b| b.is_ascii_hexdigit());
    if !ok {
        return Err(ReleaseError::invalid(
            "commit",
            "must be a full commit SHA (40 hexadecimal digits, or 64 for SHA-256 repositories)",
        ));
    }
    Ok(commit.to_ascii_lowercase())
}

pub(super) fn validate_branch(branch: &str) -> Result<()> {
    if branch.is_empty()
        || branch.chars().count() > 255
        || branch.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(ReleaseError::invalid(
            "branch",
            "must be a branch name: 1 to 255 characters without spaces",
        ));
    }
    Ok(())
}

fn validate_pipeline(field: &str, p: &PipelineRef) -> Result<()> {
    let slug = names::is_written_slug;
    if !slug(&p.organization) {
        return Err(ReleaseError::invalid(
            format!("{field}.organization"),
            "must be a Buildkite organization slug",
        ));
    }
    if !slug(&p.pipeline) {
        return Err(ReleaseError::invalid(
            format!("{field}.pipeline"),
            "must be a Buildkite pipeline slug",
        ));
    }
    Ok(())
}

fn validate_variables(field: &str, vars: &BTreeMap<String, String>) -> Result<()> {
    if vars.len() > MAX_VARIABLES {
        return Err(ReleaseError::invalid(
            field,
            format!("at most {MAX_VARIABLES} variables"),
        ));
    }
    for (name, value) in vars {
        let f = format!("{field}.{name}");
        let mut chars = name.chars();
        let ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
            && name.len() <= 128;
        if !ok {
            return Err(ReleaseError::invalid(
                f,
                "variable names are letters, digits and `_`, not starting with a digit",
            ));
        }
        let upper = name.to_ascii_uppercase();
        if upper.starts_with("AVIATOR_") || upper.starts_with("BUILDKITE") {
            return Err(ReleaseError::invalid(
                f,
                "AVIATOR_* and BUILDKITE* variables are set by kitebridge and Buildkite",
            ));
        }
        if value.chars().count() > MAX_VALUE {
            return Err(ReleaseError::invalid(
                f,
                format!("at most {MAX_VALUE} characters"),
            ));
        }
    }
    Ok(())
}

pub(super) fn validate_spec(spec: &ProjectSpec) -> Result<()> {
    use super::changelog::{MAX_PATH_LEN, MAX_PATHS, PathFilter};
    if spec.paths.len() > MAX_PATHS {
        return Err(ReleaseError::invalid(
            "paths",
            format!("at most {MAX_PATHS} patterns"),
        ));
    }
    for (i, p) in spec.paths.iter().enumerate() {
        if p.trim().is_empty() || p.chars().count() > MAX_PATH_LEN || p.contains(['\n', '\r']) {
            return Err(ReleaseError::invalid(
                format!("paths[{i}]"),
                format!("must be one .gitignore line of 1 to {MAX_PATH_LEN} characters"),
            ));
        }
    }
    PathFilter::new(&spec.paths).map_err(|m| ReleaseError::unprocessable("paths", m))?;
    if let Some(r) = &spec.repository
        && crate::bitbucket::commits::RepositoryRef::parse(r).is_none()
    {
        return Err(ReleaseError::invalid(
            "repository",
            "must be OWNER/slug: a Data Center project key (or Cloud workspace) and a repository \
             slug, of letters, digits, `-`, `_` and `.`",
        ));
    }
    if let Some(p) = &spec.build_pipeline {
        validate_pipeline("build_pipeline", p)?;
    }
    validate_variables("env", &spec.env)?;
    if spec.environments.len() > MAX_ENVIRONMENTS {
        return Err(ReleaseError::invalid(
            "environments",
            format!("at most {MAX_ENVIRONMENTS} environments"),
        ));
    }
    let names: Vec<&str> = spec.environments.iter().map(|e| e.name.as_str()).collect();
    for (i, e) in spec.environments.iter().enumerate() {
        let field = format!("environments[{i}]");
        validate_name(&format!("{field}.name"), &e.name)?;
        if names[..i].contains(&e.name.as_str()) {
            return Err(ReleaseError::unprocessable(
                format!("{field}.name"),
                format!("environment `{}` is listed twice", e.name),
            ));
        }
        if let Some(p) = &e.deploy_pipeline {
            validate_pipeline(&format!("{field}.deploy_pipeline"), p)?;
        }
        validate_variables(&format!("{field}.env"), &e.env)?;
        if let Some(req) = &e.requires
            && (req == &e.name || !names.contains(&req.as_str()))
        {
            return Err(ReleaseError::unprocessable(
                format!("{field}.requires"),
                format!("must name another environment of the project, not `{req}`"),
            ));
        }
    }
    // Promotion order must not loop (a -> b -> a would block both forever).
    for e in &spec.environments {
        let mut seen = vec![e.name.as_str()];
        let mut at = e;
        while let Some(next) = at.requires.as_deref() {
            if seen.contains(&next) {
                return Err(ReleaseError::unprocessable(
                    "environments",
                    format!("promotion order loops: {} -> {next}", seen.join(" -> ")),
                ));
            }
            seen.push(next);
            match spec.environments.iter().find(|x| x.name == next) {
                Some(x) => at = x,
                None => break,
            }
        }
    }
    Ok(())
}

pub fn parse_candidate_field(field: &str, v: &str) -> Result<(String, u32)> {
    version::parse_candidate(v)
        .map(|(r, n)| (r.to_string(), n))
        .ok_or_else(|| {
            ReleaseError::invalid(
                field,
                format!("`{v}` is not a candidate version (`<version>-rcN`)"),
            )
        })
}

pub(super) fn parse_status(status: &str) -> Result<DeploymentStatus> {
    DeploymentStatus::parse(status).ok_or_else(|| {
        ReleaseError::invalid(
            "status",
            format!(
                "`{status}` is not a status: pending, in_progress, success, failure, canceled or error"
            ),
        )
    })
}

pub(super) fn optional_text(field: &str, v: Option<String>) -> Result<Option<String>> {
    match v {
        Some(s) if s.chars().count() > MAX_TEXT => Err(ReleaseError::invalid(
            field,
            format!("at most {MAX_TEXT} characters"),
        )),
        other => Ok(other.filter(|s| !s.trim().is_empty())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(envs: Vec<(&str, Option<&str>)>) -> ProjectSpec {
        ProjectSpec {
            build_pipeline: None,
            environments: envs
                .into_iter()
                .map(|(n, r)| Environment {
                    name: n.into(),
                    deploy_pipeline: None,
                    requires: r.map(str::to_string),
                    env: BTreeMap::new(),
                })
                .collect(),
            version_scheme: VersionScheme::Semver,
            env: BTreeMap::new(),
            repository: None,
            paths: Vec::new(),
        }
    }

    fn field(r: Result<()>) -> String {
        match r {
            Err(ReleaseError::Invalid { field, .. }) => field,
            Err(ReleaseError::Unprocessable { field, .. }) => field,
            other => panic!("expected a 400 or 422, got {other:?}"),
        }
    }

    #[test]
    fn project_specs_are_checked_field_by_field() {
        assert!(validate_spec(&spec(vec![("staging", None), ("prod", Some("staging"))])).is_ok());
        assert_eq!(
            field(validate_spec(&spec(vec![("prod", Some("prod"))]))),
            "environments[0].requires"
        );
        assert_eq!(
            field(validate_spec(&spec(vec![("prod", Some("qa"))]))),
            "environments[0].requires"
        );
        assert_eq!(
            field(validate_spec(&spec(vec![
                ("a", Some("b")),
                ("b", Some("a"))
            ]))),
            "environments"
        );
        assert_eq!(
            field(validate_spec(&spec(vec![("a", None), ("a", None)]))),
            "environments[1].name"
        );
        assert_eq!(
            field(validate_spec(&spec(vec![("bad name", None)]))),
            "environments[0].name"
        );
        let mut s = spec(vec![]);
        s.env.insert("AVIATOR_DEPLOYMENT_ID".into(), "x".into());
        assert_eq!(field(validate_spec(&s)), "env.AVIATOR_DEPLOYMENT_ID");
        let mut s = spec(vec![]);
        s.env.insert("1X".into(), "x".into());
        assert_eq!(field(validate_spec(&s)), "env.1X");
        let mut s = spec(vec![]);
        s.build_pipeline = Some(PipelineRef {
            organization: "acme".into(),
            pipeline: "web release".into(),
        });
        assert_eq!(field(validate_spec(&s)), "build_pipeline.pipeline");
    }

    #[test]
    fn commits_and_branches() {
        assert_eq!(validate_commit(&"AB".repeat(20)).unwrap(), "ab".repeat(20));
        assert!(validate_commit(&"a".repeat(64)).is_ok());
        for bad in ["HEAD", "abc123", &"g".repeat(40), &"a".repeat(41)] {
            assert!(validate_commit(bad).is_err(), "{bad}");
        }
        assert!(validate_branch("release/1.4").is_ok());
        for bad in ["", "a b", "a\nb", &"b".repeat(256)] {
            assert!(validate_branch(bad).is_err(), "{bad:?}");
        }
    }
}
