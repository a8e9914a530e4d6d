//! The release domain's records, as stored and as the API shows them.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::status::StatusVersion;

pub use crate::names::PipelineRef;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum VersionScheme {
    #[default]
    Semver,
    Calver,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Environment {
    pub name: String,
    /// None: deployment status comes by API (`PATCH`).
    #[serde(default)]
    pub deploy_pipeline: Option<PipelineRef>,
    /// Promotion order: a candidate must have been deployed successfully here first.
    #[serde(default)]
    pub requires: Option<String>,
    /// Extra variables for the deploy pipeline's builds.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Project {
    pub name: String,
    /// None: "not configured", a cut counts as built at once.
    #[serde(default)]
    pub build_pipeline: Option<PipelineRef>,
    #[serde(default)]
    pub environments: Vec<Environment>,
    #[serde(default)]
    pub version_scheme: VersionScheme,
    /// Extra variables for the build pipeline's builds.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// `OWNER/slug` on the configured Bitbucket (Data Center project key, or Cloud workspace),
    /// where changelogs are read from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    /// `.gitignore` lines: a changelog lists only the commits touching a file they match
    /// (a monorepo's project). Empty: every commit.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A version pinned to a commit. Immutable once cut; its candidates carry what changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    pub project: String,
    pub version: String,
    /// `AVIATOR_RELEASE_CUT_ID`: a ULID, so cut ids sort by time.
    pub cut_id: String,
    pub commit: String,
    pub branch: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CandidateState {
    Pending,
    Building,
    Built,
    Failed,
    Canceled,
}

impl CandidateState {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Built | Self::Failed | Self::Canceled)
    }

    /// Order of progress: a candidate only ever moves to a higher rank.
    pub fn rank(self) -> u8 {
        match self {
            Self::Pending => 0,
            Self::Building => 1,
            Self::Built | Self::Failed | Self::Canceled => 2,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Building => "building",
            Self::Built => "built",
            Self::Failed => "failed",
            Self::Canceled => "canceled",
        }
    }
}

/// A Buildkite build kitebridge created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildRef {
    pub organization: String,
    pub pipeline: String,
    pub id: String,
    pub number: u64,
    #[serde(default)]
    pub web_url: Option<String>,
    /// Buildkite's evidence of the last observation of this build applied to its candidate or
    /// deployment ([`crate::release::state::candidate_follows`]), so that a re-run (a retried
    /// job) is told from a late delivery. Stored, never answered: see [`Candidate::answered`].
    /// `None` before the first observation and in records written before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed: Option<StatusVersion>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Candidate {
    pub project: String,
    pub release_version: String,
    /// 1 for `<version>-rc1`, ...
    pub number: u32,
    /// `AVIATOR_RELEASE_CANDIDATE_VERSION`, e.g. `1.4.0-rc2`.
    pub version: String,
    pub cut_id: String,
    pub commit: String,
    pub branch: String,
    pub state: CandidateState,
    #[serde(default)]
    pub build: Option<BuildRef>,
    /// The last Buildkite state seen for its build (`scheduled`, `running`, `passed`, ...).
    #[serde(default)]
    pub build_state: Option<String>,
    /// Why it failed, when kitebridge knows (e.g. Buildkite refused to create the build).
    #[serde(default)]
    pub error_message: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Candidate {
    /// The candidate as the API shows it. The store and the API serialize the same record, so
    /// what only tracking needs ([`BuildRef::observed`]) is taken out of answers here.
    pub fn answered(mut self) -> Self {
        if let Some(b) = &mut self.build {
            b.observed = None;
        }
        self
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeploymentStatus {
    Pending,
    InProgress,
    Success,
    Failure,
    Canceled,
    Error,
}

impl DeploymentStatus {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Success | Self::Failure | Self::Canceled | Self::Error
        )
    }

    /// Order of progress: tracking only ever moves a deployment to a higher rank.
    pub fn rank(self) -> u8 {
        match self {
            Self::Pending => 0,
            Self::InProgress => 1,
            Self::Success | Self::Failure | Self::Canceled | Self::Error => 2,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::InProgress => "in_progress",
            Self::Success => "success",
            Self::Failure => "failure",
            Self::Canceled => "canceled",
            Self::Error => "error",
        }
    }

    /// Parses the wire name; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => Self::Pending,
            "in_progress" => Self::InProgress,
            "success" => Self::Success,
            "failure" => Self::Failure,
            "canceled" => Self::Canceled,
            "error" => Self::Error,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    /// `AVIATOR_DEPLOYMENT_ID`: a ULID, so deployments sort by time.
    pub id: String,
    pub project: String,
    pub environment: String,
    pub release_version: String,
    pub candidate_version: String,
    pub commit: String,
    pub status: DeploymentStatus,
    #[serde(default)]
    pub build: Option<BuildRef>,
    /// The candidate that was live before (what a rollback returns to).
    #[serde(default)]
    pub from_candidate_version: Option<String>,
    #[serde(default)]
    pub rollback: bool,
    #[serde(default)]
    pub forced: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[serde(default)]
    pub finished_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub error_message: Option<String>,
}

impl Deployment {
    /// The deployment as the API shows it (see [`Candidate::answered`]).
    pub fn answered(mut self) -> Self {
        if let Some(b) = &mut self.build {
            b.observed = None;
        }
        self
    }
}

/// Per-environment state that deployments coordinate on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvironmentState {
    pub project: String,
    pub environment: String,
    #[serde(default)]
    pub frozen: bool,
    /// Why it was frozen, as given by whoever froze it.
    #[serde(default)]
    pub freeze_reason: Option<String>,
    /// The one deployment not yet finished, if any.
    #[serde(default)]
    pub active_deployment: Option<String>,
    /// Candidate versions deployed successfully here, oldest first (for rollback and promotion).
    #[serde(default)]
    pub successes: Vec<String>,
}

/// What a Buildkite build created by kitebridge belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BuildLink {
    Candidate {
        project: String,
        release_version: String,
        number: u32,
    },
    Deployment {
        project: String,
        environment: String,
        id: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate_json() -> serde_json::Value {
        serde_json::json!({
            "project": "web", "release_version": "1.0.0", "number": 1, "version": "1.0.0-rc1",
            "cut_id": "01J", "commit": "a".repeat(40), "branch": "main", "state": "failed",
            "build": {"organization": "acme", "pipeline": "web-release", "id": "b1", "number": 7},
            "created_at": "2024-05-01T10:00:00Z", "updated_at": "2024-05-01T10:05:00Z"
        })
    }

    #[test]
    fn records_stored_before_versions_were_kept_still_decode() {
        let c: Candidate = serde_json::from_value(candidate_json()).unwrap();
        assert_eq!(c.build.unwrap().observed, None);
    }

    #[test]
    fn the_version_is_stored_but_not_answered() {
        let mut c: Candidate = serde_json::from_value(candidate_json()).unwrap();
        let version = StatusVersion {
            build: 7,
            epoch_ms: 1_714_557_900_000,
            rank: 7,
        };
        c.build.as_mut().unwrap().observed = Some(version);
        let stored = serde_json::to_value(&c).unwrap();
        assert_eq!(
            stored["build"]["observed"],
            serde_json::json!({"build": 7, "epoch_ms": 1_714_557_900_000_i64, "rank": 7})
        );
        let back: Candidate = serde_json::from_value(stored).unwrap();
        assert_eq!(back, c);
        let answered = serde_json::to_value(c.answered()).unwrap();
        let mut keys: Vec<&str> = answered["build"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            ["id", "number", "organization", "pipeline", "web_url"]
        );
    }
}
