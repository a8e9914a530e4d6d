//! Jobs of a fake Buildkite build, and what Buildkite does when one is retried
//! (`shared/reference/bitbucket-more.md` §6):
//!
//! - only a `failed`, `timed_out` or `canceled` job can be retried, or a `passed` one whose step
//!   permits it (`retry.manual.permit_on_passed`); anything else is 400 "Only failed, timed out
//!   or canceled jobs can be retried";
//! - a job is retried once: the retry is a **new** job (new id, `retries_count` one higher,
//!   `retry_source` naming the old job, `retry_type` `manual`), the old one gets `retried: true`
//!   and `retried_in_job_id`; retrying the old id again is refused;
//! - jobs of a canceled build cannot be retried (422);
//! - the build (same id, same number) goes back to `running`: `finished_at` is cleared,
//!   `started_at` moves to the retry, and its final state is recomputed from the jobs that were
//!   not retried when the new job finishes.
//!
//! Build endpoints hide retried jobs unless `include_retried_jobs=true`.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use crate::buildkite::BuildState;
use crate::common::{base64, iso_millis};

/// A job's state (the subset of Buildkite's job states the fake plays).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobState {
    /// `scheduled`
    Scheduled,
    /// `running`
    Running,
    /// `passed`
    Passed,
    /// `failed`
    Failed,
    /// `canceled`
    Canceled,
    /// `timed_out`
    TimedOut,
}

impl JobState {
    /// The API's name for the state.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Scheduled => "scheduled",
            Self::Running => "running",
            Self::Passed => "passed",
            Self::Failed => "failed",
            Self::Canceled => "canceled",
            Self::TimedOut => "timed_out",
        }
    }

    /// Whether the job has finished.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            Self::Passed | Self::Failed | Self::Canceled | Self::TimedOut
        )
    }
}

/// One command job of a build.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// UUID.
    pub id: String,
    /// Step label.
    pub name: String,
    /// Step key, if the step has one.
    pub step_key: Option<String>,
    /// State.
    pub state: JobState,
    /// Whether the step lets a passed job be retried (`retry.manual.permit_on_passed`).
    pub permit_on_passed: bool,
    /// Whether this job was retried (true on the **old** job).
    pub retried: bool,
    /// The job that retried this one.
    pub retried_in_job_id: Option<String>,
    /// How many times the step was retried before this job (0 for the first attempt).
    pub retries_count: u32,
    /// The job this one retried, and how (`manual` / `automatic`).
    pub retry_source: Option<(String, String)>,
    /// When it started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it finished.
    pub finished_at: Option<DateTime<Utc>>,
}

impl Job {
    /// A job of step `name` in `state`, with a random id.
    pub fn new(name: impl Into<String>, state: JobState) -> Self {
        Self {
            id: uuid::Uuid::new_v4().to_string(),
            name: name.into(),
            step_key: None,
            state,
            permit_on_passed: false,
            retried: false,
            retried_in_job_id: None,
            retries_count: 0,
            retry_source: None,
            started_at: None,
            finished_at: None,
        }
    }

    /// Whose step permits retrying it after it passed.
    pub fn permitting_retry_on_passed(mut self) -> Self {
        self.permit_on_passed = true;
        self
    }

    /// Fill in the times its state implies.
    pub(crate) fn settle_times(&mut self, now: DateTime<Utc>) {
        match self.state {
            JobState::Scheduled => {
                self.started_at = None;
                self.finished_at = None;
            }
            JobState::Running => {
                self.started_at.get_or_insert(now);
                self.finished_at = None;
            }
            _ => {
                self.started_at.get_or_insert(now);
                self.finished_at.get_or_insert(now);
            }
        }
    }

    pub(crate) fn json(&self, build_web_url: &str) -> Value {
        let retry_type = self.retry_source.as_ref().map(|(_, t)| t.clone());
        json!({
            "id": self.id,
            "graphql_id": base64(format!("Job---{}", self.id).as_bytes()),
            "type": "script",
            "name": self.name,
            "step_key": self.step_key,
            "state": self.state.as_str(),
            "web_url": format!("{build_web_url}#{}", self.id),
            "command": "make test",
            "exit_status": match self.state {
                JobState::Passed => json!(0),
                JobState::Failed => json!(1),
                _ => Value::Null,
            },
            "soft_failed": false,
            "started_at": self.started_at.map(iso_millis),
            "finished_at": self.finished_at.map(iso_millis),
            "retried": self.retried,
            "retried_in_job_id": self.retried_in_job_id,
            "retries_count": self.retries_count,
            "retry_type": retry_type,
            "retry_source": self.retry_source.as_ref().map(|(job_id, retry_type)| {
                json!({"job_id": job_id, "retry_type": retry_type})
            }),
        })
    }
}

/// Why a retry was refused: the HTTP status and Buildkite's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryRefused {
    /// 400, 404 or 422.
    pub status: u16,
    /// The message Buildkite answers with.
    pub message: String,
}

impl RetryRefused {
    fn new(status: u16, message: &str) -> Self {
        Self {
            status,
            message: message.to_owned(),
        }
    }
}

/// Retry job `job_id` of a build whose jobs are `jobs` and whose state is `build_state`: the
/// new job (already pushed onto `jobs`), or why Buildkite refuses.
pub(crate) fn retry(
    jobs: &mut Vec<Job>,
    build_state: BuildState,
    job_id: &str,
) -> Result<Job, RetryRefused> {
    let Some(old) = jobs.iter_mut().find(|j| j.id == job_id) else {
        return Err(RetryRefused::new(404, "No job found"));
    };
    if matches!(build_state, BuildState::Canceled | BuildState::Canceling) {
        return Err(RetryRefused::new(
            422,
            "Jobs of canceled builds can't be retried",
        ));
    }
    if old.retried {
        return Err(RetryRefused::new(400, "Jobs can only be retried once"));
    }
    let retryable = matches!(
        old.state,
        JobState::Failed | JobState::TimedOut | JobState::Canceled
    ) || (old.state == JobState::Passed && old.permit_on_passed);
    if !retryable {
        return Err(RetryRefused::new(
            400,
            "Only failed, timed out or canceled jobs can be retried",
        ));
    }
    let mut new = Job::new(old.name.clone(), JobState::Scheduled);
    new.step_key = old.step_key.clone();
    new.permit_on_passed = old.permit_on_passed;
    new.retries_count = old.retries_count + 1;
    new.retry_source = Some((old.id.clone(), "manual".to_owned()));
    old.retried = true;
    old.retried_in_job_id = Some(new.id.clone());
    jobs.push(new.clone());
    Ok(new)
}

/// The build's state as its jobs that were not retried make it, or `None` when it has no jobs
/// (its state is then whatever the test set).
pub(crate) fn build_state_from(jobs: &[Job]) -> Option<BuildState> {
    let current: Vec<&Job> = jobs.iter().filter(|j| !j.retried).collect();
    if current.is_empty() {
        return None;
    }
    let failed = current
        .iter()
        .any(|j| matches!(j.state, JobState::Failed | JobState::TimedOut));
    let unfinished = current.iter().any(|j| !j.state.is_finished());
    Some(if unfinished {
        if failed {
            BuildState::Failing
        } else if current.iter().all(|j| j.state == JobState::Scheduled) {
            BuildState::Scheduled
        } else {
            BuildState::Running
        }
    } else if failed {
        BuildState::Failed
    } else if current.iter().any(|j| j.state == JobState::Canceled) {
        BuildState::Canceled
    } else {
        BuildState::Passed
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_job_is_retried_once_through_a_new_job() {
        let mut jobs = vec![
            Job::new("build", JobState::Passed),
            Job::new("test", JobState::Failed),
        ];
        let failed = jobs[1].id.clone();
        assert_eq!(build_state_from(&jobs), Some(BuildState::Failed));
        let new = retry(&mut jobs, BuildState::Failed, &failed).unwrap();
        assert_eq!(new.retries_count, 1);
        assert_eq!(new.retry_source, Some((failed.clone(), "manual".into())));
        assert!(jobs[1].retried);
        assert_eq!(jobs[1].retried_in_job_id.as_deref(), Some(new.id.as_str()));
        assert_eq!(
            retry(&mut jobs, BuildState::Running, &failed).unwrap_err(),
            RetryRefused::new(400, "Jobs can only be retried once")
        );
        assert_eq!(build_state_from(&jobs), Some(BuildState::Running));
        jobs[2].state = JobState::Passed;
        assert_eq!(build_state_from(&jobs), Some(BuildState::Passed));
    }

    #[test]
    fn what_buildkite_refuses_to_retry() {
        let mut jobs = vec![
            Job::new("ok", JobState::Passed),
            Job::new("ok-permitted", JobState::Passed).permitting_retry_on_passed(),
            Job::new("failed", JobState::Failed),
        ];
        let ids: Vec<String> = jobs.iter().map(|j| j.id.clone()).collect();
        assert_eq!(
            retry(&mut jobs, BuildState::Passed, &ids[0])
                .unwrap_err()
                .status,
            400
        );
        assert!(retry(&mut jobs, BuildState::Passed, &ids[1]).is_ok());
        assert_eq!(
            retry(&mut jobs, BuildState::Canceled, &ids[2])
                .unwrap_err()
                .status,
            422
        );
        assert_eq!(
            retry(&mut jobs, BuildState::Failed, "nope")
                .unwrap_err()
                .status,
            404
        );
    }
}
