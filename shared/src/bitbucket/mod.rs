//! Bitbucket, the destination of every status.
//!
//! - [`repo`]: where a repository lives (a clone URL on this Bitbucket, which project and slug).
//! - [`request`]: the request that posts a commit status to each of the three build-status
//!   APIs (legacy, Data Center, Cloud), and the state mapping. Pure: no I/O.
//! - [`client`]: the HTTP client that sends a [`request::StatusRequest`]
//!   (Basic or Bearer auth, retries); for `BITBUCKET_API=auto` it asks the server once.
//! - [`pacer`]: one per Bitbucket: the rate, the outage backoff and the priority of live posts.
//! - [`commits`]: changelog sources: the commits between two commits, the pull requests of a
//!   commit (Data Center and Cloud).

pub mod repo;
pub mod request;

pub use request::{
    ApiKind, BitbucketState, Capabilities, StatusRequest, build_request, parse_capabilities,
    state_for,
};

pub mod client;
pub mod commits;
pub mod pacer;

pub use client::BitbucketClient;
