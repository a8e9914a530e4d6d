//! kitebridge: Buildkite builds become Bitbucket commit statuses, and releases are cut, built and
//! deployed through Buildkite pipelines.
//!
//! Everything lives in this crate; the Lambda functions (`functions/*`) and the `kitebridge`
//! command only wire it up. `ARCHITECTURE.md` at the top of the repository walks a webhook and a
//! poll through these modules. Modules are named by the domain word a reader would look for:
//!
//! The edge and the wiring:
//! - [`http`]: the router, state per role, [`http::ApiError`], authentication, layers and the
//!   handlers; the only module that knows HTTP answers. Nothing else imports it.
//! - [`bootstrap`]: start-up for every binary (configuration, logging, store, clients, state).
//! - [`serve`]: the self-hosted server (timeouts, connection limit, shutdown deadline) and its
//!   supervised poll loop.
//! - [`config`]: the typed configuration, read once from the environment; [`secrets`]: AWS
//!   Secrets Manager at cold start; [`telemetry`]: structured logging; [`error`]: the
//!   top-level error of wiring code.
//!
//! The domain:
//! - [`buildkite`]: builds and webhook payloads, the webhook's proof, the REST client.
//! - [`bitbucket`]: repositories, the status request per API, the client, the pacer.
//! - [`status`]: which status a build is reported as, and how two observations order (pure).
//! - [`report`]: the one path every status takes (ledger, pacer, post, outbox).
//! - [`webhook`]: what a verified `build.*` delivery does (report, then observers).
//! - [`poll`]: one poll-and-report cycle.
//! - [`observe`]: what else a build moves: [`release`] tracking and trigger [`rules`].
//! - [`release`]: projects, releases, candidates, deployments (decisions pure, in `decide`).
//! - [`rules`]: trigger rules; [`cond`]: Buildkite's conditional language; [`interpolate`]:
//!   `${VAR}` expansion as `buildkite-agent pipeline upload` does it.
//! - [`names`]: every naming rule (slugs, project, environment and rule names).
//!
//! Underneath:
//! - [`store`]: what kitebridge remembers, behind narrow traits over one small key-value
//!   interface, on DynamoDB or on an embedded SQLite file.
//! - [`net`]: one HTTP client per process and the retry rule every caller shares.

pub mod bitbucket;
pub mod bootstrap;
pub mod buildkite;
pub mod cond;
pub mod config;
pub mod error;
pub mod http;
pub mod insights;
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
