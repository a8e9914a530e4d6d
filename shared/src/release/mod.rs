//! Releases: projects, releases and their candidates, deployments to environments.
//!
//! - [`model`]: the records, as stored and as the API shows them.
//! - [`version`]: version schemes (semver, calver), next versions, `-rcN` candidate versions.
//! - [`state`]: the state machine as pure functions (build state → candidate / deployment,
//!   Buildkite's latest word by its evidence: a late delivery never moves a record backwards, a
//!   retried build moves it again; the environment's success history, rollback target, stuck
//!   deployments).
//! - [`decide`]: the service's decisions as pure functions: may this candidate deploy here now
//!   (or why not), what a deployment writes, the Buildkite build a cut or a deployment asks for.
//! - [`request`]: the API's requests and their validation; [`error`]: why a request failed,
//!   with its HTTP status.
//! - [`service`]: cut, deploy, roll back, freeze, status updates over the store and Buildkite:
//!   read, decide, write. [`build`]: getting one record's build, exactly once;
//!   [`update`]: compare-and-set updates of one candidate or deployment.
//! - [`changelog`]: what a candidate brings (commits and pull requests since the previous
//!   release), read from Bitbucket once.
//! - [`sweep`]: [`sweep_stuck`] for the poll cycle.
//! - [`tracker`]: the build observer that moves candidates and deployments from build states.
//!
//! The HTTP routes are `http::releases`.

pub mod build;
pub mod changelog;
pub mod decide;
pub mod error;
pub mod model;
pub mod request;
pub mod service;
pub mod state;
pub mod sweep;
pub mod tracker;
pub mod update;
pub mod version;

pub use error::ReleaseError;
pub use request::{
    CutRequest, DeployRequest, FreezeRequest, ProjectSpec, RollbackRequest, StatusRequest,
};
pub use service::ReleaseService;
pub use sweep::sweep_stuck;
