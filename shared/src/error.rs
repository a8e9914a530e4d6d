//! The crate's top-level error, for wiring code (binaries, start-up). Each boundary keeps its own
//! error enum (store, HTTP clients, API answers) and converts into this one.

use crate::config::ConfigErrors;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigErrors),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("reading the secret from AWS Secrets Manager failed: {0}")]
    Secrets(String),
    #[error("{0}")]
    Startup(String),
}
