//! kitebridge-fakes: **simulations** of Buildkite's REST API / webhooks and Bitbucket's
//! build-status APIs.

mod buildkite;
mod common;
mod webhook;

pub use buildkite::*;
pub use common::{Fault, RequestRecord};
pub use webhook::{WebhookAuth, WebhookDelivery, WebhookEvent, deliver_webhook, sign_webhook};
