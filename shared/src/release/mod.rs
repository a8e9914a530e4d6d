//! Releases: projects, releases and their candidates, deployments to environments.
//!
//! - [`model`]: the records, as stored and as the API shows them.
//! - [`version`]: version schemes (semver, calver), next versions, `-rcN` candidate versions.
//! - [`state`]: the state machine as pure functions (build state → candidate / deployment,
//!   Buildkite's latest word by its evidence: a late delivery never moves a record backwards, a
//!   retried build moves it again; the environment's success history, rollback target, stuck
//!   deployments).
//! - [`service`]: cut, deploy, roll back, freeze, status updates over the store and Buildkite;
//!   [`service::sweep_stuck`] for the poll cycle.
//! - [`tracker`]: the build observer that moves candidates and deployments from build states.
//!
//! The HTTP routes are `http::releases`.

pub mod model;
pub mod service;
pub mod state;
pub mod tracker;
pub mod version;

pub use service::{
    CutRequest, DeployRequest, FreezeRequest, ProjectSpec, ReleaseError, ReleaseService,
    RollbackRequest, StatusRequest, sweep_stuck,
};
