//! Buildkite: what its builds and pipelines look like ([`model`]), how a webhook delivery is
//! proven to come from Buildkite ([`webhook`]), and the REST API client ([`client`]).

pub mod client;
pub mod model;
pub mod webhook;

pub use model::{Build, BuildState, Event, PayloadError, Pipeline, WebhookPayload};
pub use webhook::{Credential, DEFAULT_MAX_SKEW, Verified, VerifyError, verify};
