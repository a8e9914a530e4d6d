//! Release projects, releases, candidates, deployments, environment states and build links.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::encoding::{Page, Versioned, decode, over, put};
use super::keys::{
    ACTIVE_PK, BUILD_LINK_SK, BUILD_LINK_TTL, PROJECT_SK, PROJECTS_PK, RELEASES_PREFIX, active_sk,
    build_link_pk, candidate_sk, candidates_prefix, deployment_sk, deployments_prefix, env_sk,
    project_pk, range_sk, release_index_sk, release_sk,
};
use super::kv::{Cond, MAX_BATCH, Order, Write};
use super::{Result, Store};
use crate::release::changelog::CommitRange;
use crate::release::model::{BuildLink, Candidate, Deployment, EnvironmentState, Project, Release};

#[async_trait]
pub trait ReleaseStore: Send + Sync {
    async fn project(&self, name: &str) -> Result<Option<Versioned<Project>>>;
    /// Creates (`expected` None) or updates (`expected` = the rev read) a project; returns the
    /// new rev. [`StoreError::Conflict`] if it changed meanwhile (or exists, when creating).
    ///
    /// [`StoreError::Conflict`]: super::StoreError::Conflict
    async fn put_project(&self, project: &Project, expected: Option<u64>) -> Result<u64>;
    /// Every project, by name, starting after `page` (a project name).
    async fn list_projects(&self, page: Option<&str>, limit: usize) -> Result<Page<Project>>;
    /// Deletes every record of a project (releases, candidates, deployments, environment
    /// states), a batch at a time, then the project itself if it is still at `rev`
    /// ([`StoreError::Conflict`] if it changed meanwhile). Interrupted, the project remains and
    /// deleting again finishes. Build links expire on their own.
    ///
    /// [`StoreError::Conflict`]: super::StoreError::Conflict
    async fn delete_project(&self, name: &str, rev: u64) -> Result<()>;

    /// Creates a release and its first candidate at once. [`StoreError::Conflict`] if the
    /// version exists in the project.
    ///
    /// [`StoreError::Conflict`]: super::StoreError::Conflict
    async fn create_release(&self, release: &Release, first: &Candidate) -> Result<()>;
    /// A range of commits as last kept (`since` `None`: the whole history of `until`).
    async fn commit_range(
        &self,
        project: &str,
        since: Option<&str>,
        until: &str,
    ) -> Result<Option<Versioned<CommitRange>>>;
    /// Keeps a range (`expected`: the rev read, `None` to create); [`StoreError::Conflict`]
    /// if it changed meanwhile.
    ///
    /// [`StoreError::Conflict`]: super::StoreError::Conflict
    async fn put_commit_range(
        &self,
        project: &str,
        range: &CommitRange,
        expected: Option<u64>,
    ) -> Result<u64>;
    async fn release(&self, project: &str, version: &str) -> Result<Option<Release>>;
    /// Newest first.
    async fn list_releases(
        &self,
        project: &str,
        page: Option<&str>,
        limit: usize,
    ) -> Result<Page<Release>>;

    /// Adds a candidate; [`StoreError::Conflict`] if that number exists.
    ///
    /// [`StoreError::Conflict`]: super::StoreError::Conflict
    async fn add_candidate(&self, candidate: &Candidate) -> Result<()>;
    async fn candidate(
        &self,
        project: &str,
        version: &str,
        number: u32,
    ) -> Result<Option<Versioned<Candidate>>>;
    /// Oldest first.
    async fn candidates(&self, project: &str, version: &str) -> Result<Vec<Versioned<Candidate>>>;
    async fn update_candidate(&self, candidate: &Candidate, rev: u64) -> Result<u64>;

    async fn environment(
        &self,
        project: &str,
        environment: &str,
    ) -> Result<Option<Versioned<EnvironmentState>>>;
    async fn put_environment(&self, state: &EnvironmentState, expected: Option<u64>)
    -> Result<u64>;

    /// Creates a deployment and updates its environment's state in one atomic write.
    async fn create_deployment(
        &self,
        deployment: &Deployment,
        env: &EnvironmentState,
        env_rev: Option<u64>,
    ) -> Result<()>;
    /// Updates a deployment, and optionally its environment's state, in one atomic write.
    async fn update_deployment(
        &self,
        deployment: &Deployment,
        rev: u64,
        env: Option<(&EnvironmentState, Option<u64>)>,
    ) -> Result<u64>;
    async fn deployment(
        &self,
        project: &str,
        environment: &str,
        id: &str,
    ) -> Result<Option<Versioned<Deployment>>>;
    /// Newest first.
    async fn list_deployments(
        &self,
        project: &str,
        environment: &str,
        page: Option<&str>,
        limit: usize,
    ) -> Result<Page<Versioned<Deployment>>>;

    async fn link_build(&self, build_id: &str, link: &BuildLink) -> Result<()>;
    async fn build_link(&self, build_id: &str) -> Result<Option<BuildLink>>;

    /// Every environment with an unfinished deployment, across projects, in key order (for the
    /// stuck-deployment sweep, which cannot otherwise find them without scanning the table).
    /// The store keeps this index itself, in the same atomic write as each environment state
    /// ([`ReleaseStore::put_environment`], [`ReleaseStore::create_deployment`],
    /// [`ReleaseStore::update_deployment`]), so it always agrees with
    /// [`EnvironmentState::active_deployment`].
    async fn active_deployments(
        &self,
        page: Option<&str>,
        limit: usize,
    ) -> Result<Page<ActiveDeployment>>;
}

/// An entry of the active-deployment index: environment `environment` of `project` has the
/// unfinished deployment `id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveDeployment {
    pub project: String,
    pub environment: String,
    pub id: String,
}

fn active_index_write(state: &EnvironmentState) -> Result<Write> {
    let sk = active_sk(&state.project, &state.environment);
    match &state.active_deployment {
        Some(id) => put(
            ACTIVE_PK.into(),
            sk,
            1,
            &ActiveDeployment {
                project: state.project.clone(),
                environment: state.environment.clone(),
                id: id.clone(),
            },
            None,
            Cond::Always,
        ),
        None => Ok(Write::Delete {
            pk: ACTIVE_PK.into(),
            sk,
            cond: Cond::Always,
        }),
    }
}

#[async_trait]
impl ReleaseStore for Store {
    async fn commit_range(
        &self,
        project: &str,
        since: Option<&str>,
        until: &str,
    ) -> Result<Option<Versioned<CommitRange>>> {
        self.get_doc(&project_pk(project), &range_sk(since, until))
            .await
    }

    async fn put_commit_range(
        &self,
        project: &str,
        range: &CommitRange,
        expected: Option<u64>,
    ) -> Result<u64> {
        let (rev, cond) = over(expected);
        self.kv
            .write(vec![put(
                project_pk(project),
                range_sk(range.since.as_deref(), &range.until),
                rev,
                range,
                None,
                cond,
            )?])
            .await?;
        Ok(rev)
    }

    async fn project(&self, name: &str) -> Result<Option<Versioned<Project>>> {
        self.get_doc(&project_pk(name), PROJECT_SK).await
    }

    async fn put_project(&self, project: &Project, expected: Option<u64>) -> Result<u64> {
        let (rev, cond) = over(expected);
        self.kv
            .write(vec![
                put(
                    project_pk(&project.name),
                    PROJECT_SK.into(),
                    rev,
                    project,
                    None,
                    cond,
                )?,
                put(
                    PROJECTS_PK.into(),
                    project.name.clone(),
                    rev,
                    project,
                    None,
                    Cond::Always,
                )?,
            ])
            .await?;
        Ok(rev)
    }

    async fn list_projects(&self, page: Option<&str>, limit: usize) -> Result<Page<Project>> {
        Ok(self
            .query_page(PROJECTS_PK, "", page, limit, Order::Ascending)
            .await?
            .values())
    }

    async fn delete_project(&self, name: &str, rev: u64) -> Result<()> {
        let pk = project_pk(name);
        let mut after: Option<String> = None;
        loop {
            let items = self
                .kv
                .query(&pk, "", after.as_deref(), MAX_BATCH, Order::Ascending)
                .await?;
            let Some(last) = items.last() else { break };
            after = Some(last.sk.clone());
            let writes: Vec<Write> = items
                .into_iter()
                .filter(|i| i.sk != PROJECT_SK)
                .map(|i| Write::Delete {
                    pk: i.pk,
                    sk: i.sk,
                    cond: Cond::Always,
                })
                .collect();
            if !writes.is_empty() {
                self.kv.write(writes).await?;
            }
        }
        self.kv
            .write(vec![
                Write::Delete {
                    pk,
                    sk: PROJECT_SK.into(),
                    cond: Cond::Rev(rev),
                },
                Write::Delete {
                    pk: PROJECTS_PK.into(),
                    sk: name.into(),
                    cond: Cond::Always,
                },
            ])
            .await
    }

    async fn create_release(&self, release: &Release, first: &Candidate) -> Result<()> {
        let pk = project_pk(&release.project);
        self.kv
            .write(vec![
                put(
                    pk.clone(),
                    release_sk(&release.version),
                    1,
                    release,
                    None,
                    Cond::Absent,
                )?,
                put(
                    pk.clone(),
                    release_index_sk(&release.cut_id),
                    1,
                    release,
                    None,
                    Cond::Absent,
                )?,
                put(
                    pk,
                    candidate_sk(&first.release_version, first.number),
                    1,
                    first,
                    None,
                    Cond::Absent,
                )?,
            ])
            .await
    }

    async fn release(&self, project: &str, version: &str) -> Result<Option<Release>> {
        Ok(self
            .get_doc(&project_pk(project), &release_sk(version))
            .await?
            .map(|v| v.value))
    }

    async fn list_releases(
        &self,
        project: &str,
        page: Option<&str>,
        limit: usize,
    ) -> Result<Page<Release>> {
        Ok(self
            .query_page(
                &project_pk(project),
                RELEASES_PREFIX,
                page,
                limit,
                Order::Descending,
            )
            .await?
            .values())
    }

    async fn add_candidate(&self, candidate: &Candidate) -> Result<()> {
        self.kv
            .write(vec![put(
                project_pk(&candidate.project),
                candidate_sk(&candidate.release_version, candidate.number),
                1,
                candidate,
                None,
                Cond::Absent,
            )?])
            .await
    }

    async fn candidate(
        &self,
        project: &str,
        version: &str,
        number: u32,
    ) -> Result<Option<Versioned<Candidate>>> {
        self.get_doc(&project_pk(project), &candidate_sk(version, number))
            .await
    }

    async fn candidates(&self, project: &str, version: &str) -> Result<Vec<Versioned<Candidate>>> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let items = self
                .kv
                .query(
                    &project_pk(project),
                    &candidates_prefix(version),
                    after.as_deref(),
                    100,
                    Order::Ascending,
                )
                .await?;
            for item in &items {
                out.push(decode(item)?);
            }
            match items.last() {
                Some(last) if items.len() == 100 => after = Some(last.sk.clone()),
                _ => break,
            }
        }
        Ok(out)
    }

    async fn update_candidate(&self, candidate: &Candidate, rev: u64) -> Result<u64> {
        self.kv
            .write(vec![put(
                project_pk(&candidate.project),
                candidate_sk(&candidate.release_version, candidate.number),
                rev + 1,
                candidate,
                None,
                Cond::Rev(rev),
            )?])
            .await?;
        Ok(rev + 1)
    }

    async fn environment(
        &self,
        project: &str,
        environment: &str,
    ) -> Result<Option<Versioned<EnvironmentState>>> {
        self.get_doc(&project_pk(project), &env_sk(environment))
            .await
    }

    async fn put_environment(
        &self,
        state: &EnvironmentState,
        expected: Option<u64>,
    ) -> Result<u64> {
        let (rev, cond) = over(expected);
        self.kv
            .write(vec![
                put(
                    project_pk(&state.project),
                    env_sk(&state.environment),
                    rev,
                    state,
                    None,
                    cond,
                )?,
                active_index_write(state)?,
            ])
            .await?;
        Ok(rev)
    }

    async fn create_deployment(
        &self,
        deployment: &Deployment,
        env: &EnvironmentState,
        env_rev: Option<u64>,
    ) -> Result<()> {
        let pk = project_pk(&deployment.project);
        let (rev, cond) = over(env_rev);
        self.kv
            .write(vec![
                put(
                    pk.clone(),
                    deployment_sk(&deployment.environment, &deployment.id),
                    1,
                    deployment,
                    None,
                    Cond::Absent,
                )?,
                put(pk, env_sk(&env.environment), rev, env, None, cond)?,
                active_index_write(env)?,
            ])
            .await
    }

    async fn update_deployment(
        &self,
        deployment: &Deployment,
        rev: u64,
        env: Option<(&EnvironmentState, Option<u64>)>,
    ) -> Result<u64> {
        let pk = project_pk(&deployment.project);
        let mut writes = vec![put(
            pk.clone(),
            deployment_sk(&deployment.environment, &deployment.id),
            rev + 1,
            deployment,
            None,
            Cond::Rev(rev),
        )?];
        if let Some((state, env_rev)) = env {
            let (erev, cond) = over(env_rev);
            writes.push(put(
                pk,
                env_sk(&state.environment),
                erev,
                state,
                None,
                cond,
            )?);
            writes.push(active_index_write(state)?);
        }
        self.kv.write(writes).await?;
        Ok(rev + 1)
    }

    async fn deployment(
        &self,
        project: &str,
        environment: &str,
        id: &str,
    ) -> Result<Option<Versioned<Deployment>>> {
        self.get_doc(&project_pk(project), &deployment_sk(environment, id))
            .await
    }

    async fn list_deployments(
        &self,
        project: &str,
        environment: &str,
        page: Option<&str>,
        limit: usize,
    ) -> Result<Page<Versioned<Deployment>>> {
        self.query_page(
            &project_pk(project),
            &deployments_prefix(environment),
            page,
            limit,
            Order::Descending,
        )
        .await
    }

    async fn link_build(&self, build_id: &str, link: &BuildLink) -> Result<()> {
        self.kv
            .write(vec![put(
                build_link_pk(build_id),
                BUILD_LINK_SK.into(),
                1,
                link,
                Some(BUILD_LINK_TTL),
                Cond::Always,
            )?])
            .await
    }

    async fn build_link(&self, build_id: &str) -> Result<Option<BuildLink>> {
        Ok(self
            .get_doc(&build_link_pk(build_id), BUILD_LINK_SK)
            .await?
            .map(|v| v.value))
    }

    async fn active_deployments(
        &self,
        page: Option<&str>,
        limit: usize,
    ) -> Result<Page<ActiveDeployment>> {
        Ok(self
            .query_page(ACTIVE_PK, "", page, limit, Order::Ascending)
            .await?
            .values())
    }
}
