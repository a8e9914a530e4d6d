//! Start-up shared by every binary: configuration, logging, store, clients. Runs once (at cold
//! start on Lambda) and fails with a message naming what is wrong, never a panic.

use std::sync::Arc;
use std::time::Duration;

use crate::Error;
use crate::bitbucket::BitbucketClient;
use crate::config::{Config, Role};
use crate::http::AppState;
use crate::net::RetryPolicy;
use crate::observe::BuildObserver;
use crate::poll::Poller;
use crate::report::Reporter;
use crate::store::{DynamoKv, SqliteKv, Store};

/// Lambda start-up: configuration from the environment (secrets overlaid from AWS Secrets
/// Manager when `KITEBRIDGE_SECRETS_ARN` is set), JSON logs, the DynamoDB store.
pub async fn lambda(role: Role) -> Result<AppState, Error> {
    // First: the AWS SDK's HTTPS client panics at construction without CA certificates.
    Config::check_ca_certificates_in_env()?;
    // One SDK configuration (region, credentials chain, endpoints) for every AWS client.
    let sdk = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let config = Config::from_env_and_secrets_manager(&sdk).await?;
    crate::telemetry::init(&config.monitor);
    config.require(role)?;
    let table = config.store.table.clone().ok_or_else(|| {
        Error::Startup("KITEBRIDGE_TABLE: required (the DynamoDB table's name)".into())
    })?;
    let store = Store::new(DynamoKv::from_sdk_config(&sdk, table));
    app_state(config, store)
}

/// [`lambda`], or, when start-up fails, what Lambda expects of a runtime that cannot start: the
/// reason reported to the Runtime API (`POST /runtime/init/error`, so the failed invocation and
/// the function's error metric name it), one line on stderr (the function's log), exit 1. The
/// message is the configuration error's text: variable names and problems, never a secret.
pub async fn lambda_or_exit(role: Role) -> AppState {
    match lambda(role).await {
        Ok(state) => state,
        Err(e) => {
            let message = e.to_string();
            let kind = match e {
                Error::Config(_) => "Runtime.ConfigurationError",
                Error::Secrets(_) => "Runtime.SecretsError",
                Error::Store(_) => "Runtime.StoreError",
                Error::Startup(_) => "Runtime.StartupError",
            };
            eprintln!(
                "{}",
                serde_json::json!({"level": "ERROR", "message": format!("kitebridge cannot start: {message}"), "errorType": kind})
            );
            report_init_error(kind, &message).await;
            std::process::exit(1)
        }
    }
}

async fn report_init_error(kind: &str, message: &str) {
    let Ok(api) = std::env::var("AWS_LAMBDA_RUNTIME_API") else {
        return;
    };
    // The Runtime API is plain HTTP inside the sandbox: no CA certificate is needed, so a broken
    // CA configuration (one reason to be here) must not keep the report from being sent.
    let Ok(client) = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .tls_certs_only(std::iter::empty())
        .build()
    else {
        return;
    };
    let _ = client
        .post(format!("http://{api}/2018-06-01/runtime/init/error"))
        .header("Lambda-Runtime-Function-Error-Type", kind)
        .json(&serde_json::json!({"errorMessage": message, "errorType": kind, "stackTrace": []}))
        .send()
        .await;
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
    app_state(config, store)
}

/// Everything the handlers and the poller use, built from configuration once. Parts whose
/// settings are absent are `None`; [`Config::require`] has already refused a role that needs
/// them.
pub fn app_state(config: Config, store: Store) -> Result<AppState, Error> {
    let http = crate::net::client(config.http_timeout)?;
    let bitbucket = BitbucketClient::new(http.clone(), &config.bitbucket);
    let ledger = Arc::new(store.clone());
    // One pacer for the one Bitbucket: webhooks and poll cycles share its turns.
    let pacer = Arc::new(crate::bitbucket::pacer::Pacer::new(
        config.delivery.rate_limit,
    ));
    // A possible re-run is confirmed with Buildkite, when there is a token to ask with.
    let recheck: Option<Arc<dyn crate::report::Recheck>> =
        match (&bitbucket, &config.buildkite.token) {
            (Some(b), Some(token)) => Some(Arc::new(crate::report::BuildkiteRecheck {
                buildkite: crate::buildkite::client::BuildkiteClient::new(
                    http.clone(),
                    config.buildkite.api_url.clone(),
                    token.clone(),
                )
                .with_retry_policy(RetryPolicy {
                    attempts: 2,
                    base: Duration::from_millis(100),
                    cap: Duration::from_millis(500),
                    max_server_wait: Duration::from_secs(2),
                }),
                bitbucket: b.clone(),
            })),
            _ => None,
        };
    let poll_reporter = bitbucket.as_ref().map(|b| {
        let r = Reporter::new(
            ledger.clone(),
            Arc::new(b.clone()),
            pacer.clone(),
            config.post_concurrency,
        )
        .with_give_up_after(config.delivery.give_up_after)
        .with_unanswered_settle(config.http_timeout);
        match &recheck {
            Some(rc) => r.with_recheck(rc.clone()),
            None => r,
        }
    });
    // A webhook's status goes ahead of the backlog, and is left to the outbox rather than
    // keep Buildkite waiting.
    let webhook_reporter = poll_reporter.as_ref().map(Reporter::live);
    // The configured trigger rules, read and validated once: the firer fires this list and the
    // rules API shows it, whatever happens to KITEBRIDGE_RULES_FILE afterwards.
    let rules =
        Arc::new(crate::rules::config_rules(&config).map_err(|e| Error::Startup(e.to_string()))?);
    let firer = crate::rules::fire::RuleFirer::from_config(
        &config,
        http.clone(),
        store.clone(),
        rules.clone(),
    )?;
    // Release tracking, trigger rules and Code Insights reports register here.
    let mut observers: Vec<Arc<dyn BuildObserver>> = vec![
        Arc::new(crate::release::tracker::ReleaseTracker::new(
            Arc::new(store.clone()),
            config.deployment_timeout,
        )),
        Arc::new(firer),
    ];
    if let Some(b) = bitbucket.as_ref().filter(|_| config.code_insights) {
        let buildkite = config.buildkite.token.clone().map(|token| {
            crate::buildkite::client::BuildkiteClient::new(
                http.clone(),
                config.buildkite.api_url.clone(),
                token,
            )
        });
        let mut insights =
            crate::insights::InsightsReporter::new(Arc::new(store.clone()), b.clone(), buildkite);
        if let Some(r) = &webhook_reporter {
            insights = insights.with_pacer(r.pacer().clone());
        }
        observers.push(Arc::new(insights));
    }
    let poller = match (&bitbucket, poll_reporter) {
        (Some(b), Some(reporter)) => Poller::from_config(
            &config,
            http.clone(),
            Arc::new(store.clone()),
            reporter,
            b.clone(),
        )
        .map(|p| p.with_observers(observers.clone())),
        _ => None,
    };
    // The releases API creates builds while a caller waits (API Gateway gives up after 30 s):
    // a short wait for a spent rate limit at most, then the caller is told to retry.
    let buildkite = config.buildkite.token.clone().map(|token| {
        crate::buildkite::client::BuildkiteClient::new(
            http.clone(),
            config.buildkite.api_url.clone(),
            token,
        )
        .with_retry_policy(RetryPolicy {
            attempts: 3,
            base: Duration::from_millis(200),
            cap: Duration::from_secs(2),
            max_server_wait: Duration::from_secs(5),
        })
    });
    Ok(AppState {
        config: Arc::new(config),
        store,
        http,
        bitbucket,
        poller,
        webhook_reporter,
        observers,
        buildkite,
        rules,
    })
}
