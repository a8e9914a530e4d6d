//! Releases: projects, releases and their candidates, deployments to environments.

pub mod model;
