//! kitebridge: Buildkite builds become Bitbucket commit statuses, and releases are cut, built and
//! deployed through Buildkite pipelines.
//!
//! Everything lives in this crate; the Lambda functions (`functions/*`) and the `kitebridge`
//! command only wire it up. Modules are named by the domain word a reader would look for:
//!
//! - [`config`]: the typed configuration, read once from the environment.
//! - [`store`]: what kitebridge remembers (poll cursors, reported statuses, releases, trigger
//!   firings), on DynamoDB or on an embedded SQLite file, behind narrow traits.
//! - [`secrets`]: reading secrets from AWS Secrets Manager at cold start.
//! - [`telemetry`]: structured logging.
//! - [`cond`]: Buildkite's conditional language (`if:` expressions and rule conditions).
//! - [`interpolate`]: `${VAR}` expansion as `buildkite-agent pipeline upload` does it.

pub mod bitbucket;
pub mod bootstrap;
pub mod buildkite;
pub mod cond;
pub mod config;
pub mod error;
pub mod http;
pub mod interpolate;
pub mod names;
pub mod net;
pub mod observe;
pub mod poll;
pub mod release;
pub mod report;
pub mod rules;
pub mod secrets;
pub mod serve;
pub mod status;
pub mod store;
pub mod telemetry;
pub mod webhook;

pub use error::Error;
