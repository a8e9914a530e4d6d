//! Buildkite: the REST API client, webhook verification, and the build and pipeline types.

pub mod client;
