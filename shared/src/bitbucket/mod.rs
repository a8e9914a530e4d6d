//! Bitbucket: where a repository lives ([`repo`]) and the request that posts a commit status to
//! each of the three build-status APIs ([`request`]).
//!
//! Everything here is pure; the HTTP client that sends a [`request::StatusRequest`] is built on
//! top.

pub mod repo;
pub mod request;

pub use request::{
    ApiKind, BitbucketState, Capabilities, StatusRequest, build_request, parse_capabilities,
    state_for,
};

pub mod client;
pub mod pacer;

pub use client::BitbucketClient;
