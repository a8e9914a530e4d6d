//! Where each record lives in the one table: its partition and sort keys, and how long it is
//! kept. The layout is described in the module docs of [`super`]; this is the only place that
//! spells it.

const DAY: i64 = 86_400;
/// A reported/desired status is kept this long after its last change.
pub(super) const STATUS_TTL: i64 = 90 * DAY;
pub(super) const FIRING_TTL: i64 = 90 * DAY;
pub(super) const IDEMPOTENCY_TTL: i64 = DAY;
pub(super) const BUILD_LINK_TTL: i64 = 180 * DAY;

pub(super) const CURSOR_PK: &str = "CURSOR";
pub(super) const OUTBOX_PK: &str = "OUTBOX";
pub(super) const RULE_PK: &str = "RULE";
pub(super) const PENDING_FIRING_PK: &str = "RULEFIRING";
/// The active-deployment index: `ACTIVE_DEPLOYMENTS` / `{project}#{environment}`, present exactly
/// while the environment state names an active deployment. Written in the same batch as the
/// environment state, so the two never disagree.
pub(super) const ACTIVE_PK: &str = "ACTIVE_DEPLOYMENTS";
pub(super) const PROJECT_SK: &str = "PROJECT";
/// The project listing: `PROJECTS` / `{project}`, a copy of each project written in the same
/// batch as the project itself (DynamoDB has no cross-partition prefix scan).
pub(super) const PROJECTS_PK: &str = "PROJECTS";
pub(super) const RELEASES_PREFIX: &str = "RELEASES#";
pub(super) const BUILD_LINK_SK: &str = "LINK";

pub(super) fn status_pk(commit: &str) -> String {
    format!("STATUS#{commit}")
}

pub(super) fn outbox_sk(commit: &str, key: &str) -> String {
    format!("{commit}#{key}")
}

pub(super) fn firing_pk(rule: &str) -> String {
    format!("FIRING#{rule}")
}

pub(super) fn pending_firing_sk(rule: &str, source_build: &str) -> String {
    // Rule names cannot contain `#` (see `names::validate_rule_name`), so the key is unambiguous.
    format!("{rule}#{source_build}")
}

pub(super) fn idempotency_pk(scope: &str) -> String {
    format!("IDEMPOTENCY#{scope}")
}

pub(super) fn project_pk(project: &str) -> String {
    format!("PROJECT#{project}")
}

pub(super) fn release_sk(version: &str) -> String {
    format!("RELEASE#{version}")
}

pub(super) fn release_index_sk(cut_id: &str) -> String {
    format!("{RELEASES_PREFIX}{cut_id}")
}

/// A kept range of commits: `since..until` (`-` for a whole history).
pub(super) fn range_sk(since: Option<&str>, until: &str) -> String {
    format!("COMMITS#{}..{until}", since.unwrap_or("-"))
}

pub(super) fn candidates_prefix(version: &str) -> String {
    format!("CANDIDATE#{version}#")
}

pub(super) fn candidate_sk(version: &str, number: u32) -> String {
    format!("CANDIDATE#{version}#{number:06}")
}

pub(super) fn env_sk(environment: &str) -> String {
    format!("ENV#{environment}")
}

pub(super) fn deployments_prefix(environment: &str) -> String {
    format!("DEPLOYMENT#{environment}#")
}

pub(super) fn deployment_sk(environment: &str, id: &str) -> String {
    format!("DEPLOYMENT#{environment}#{id}")
}

pub(super) fn active_sk(project: &str, environment: &str) -> String {
    format!("{project}#{environment}")
}

pub(super) fn build_link_pk(build_id: &str) -> String {
    format!("BUILD#{build_id}")
}
