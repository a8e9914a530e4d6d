//! Start-up shared by every binary: configuration, logging, store. Runs once (at cold start on
//! Lambda) and fails with a message naming what is wrong, never a panic.

use std::sync::Arc;

use crate::Error;
use crate::config::{Config, Role};
use crate::http::AppState;
use crate::store::{DynamoKv, SqliteKv, Store};

/// Lambda start-up: configuration from the environment (secrets overlaid from AWS Secrets
/// Manager when `KITEBRIDGE_SECRETS_ARN` is set), JSON logs, the DynamoDB store.
pub async fn lambda(role: Role) -> Result<AppState, Error> {
    let config = Config::from_env_and_secrets_manager().await?;
    crate::telemetry::init(&config.monitor);
    config.require(role)?;
    let table = config.store.table.clone().ok_or_else(|| {
        Error::Startup("KITEBRIDGE_TABLE: required (the DynamoDB table's name)".into())
    })?;
    let store = Store::new(DynamoKv::from_env(table).await);
    Ok(AppState {
        config: Arc::new(config),
        store,
    })
}

/// Self-hosted start-up: configuration from the environment, the embedded store at
/// `KITEBRIDGE_DB` (default `kitebridge.db` in the working directory).
pub fn self_hosted(role: Role) -> Result<AppState, Error> {
    let config = Config::from_env()?;
    crate::telemetry::init(&config.monitor);
    config.require(role)?;
    let path = config
        .store
        .db
        .clone()
        .unwrap_or_else(|| "kitebridge.db".into());
    let store = Store::new(SqliteKv::open(path)?);
    Ok(AppState {
        config: Arc::new(config),
        store,
    })
}
