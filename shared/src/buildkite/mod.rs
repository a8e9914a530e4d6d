//! Buildkite: what its builds and pipelines look like ([`model`]) and how a webhook delivery is
//! proven to come from Buildkite ([`webhook`]).
//!
//! Everything here is pure: the REST client and the webhook HTTP handler are built on top.

pub mod model;
pub mod webhook;

pub use model::{Build, BuildState, Event, PayloadError, Pipeline, WebhookPayload};
pub use webhook::{Credential, DEFAULT_MAX_SKEW, Verified, VerifyError, verify};
