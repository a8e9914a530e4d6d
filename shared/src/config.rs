//! Configuration: one typed struct, read once from environment variables.
//!
//! The old Ruby connector's variable names are kept (`BUILDKITE_API_TOKEN`, which it documented,
//! and `BUILDKITE_TOKEN`, which it really read; `BITBUCKET_SERVER_*`, which it read before
//! `BITBUCKET_*`), so a deployment of the connector can switch by changing only the image.
//!
//! Parsing never panics: every problem becomes a [`ConfigError`] naming the variable and what was
//! expected, and all problems are reported together. Which variables are *required* depends on
//! the binary ([`Role`]); [`Config::require`] checks that.
//!
//! Secret values are held in [`Secret`], whose `Debug` never shows them, and are never echoed in
//! errors.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use url::Url;

/// A secret value. `Debug` prints `Secret([REDACTED])`; use [`Secret::expose`] at the one place
/// the value is put on the wire.
#[derive(Clone)]
pub struct Secret(SecretString);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(SecretString::from(value.into()))
    }

    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    /// Whether `presented` is this secret, compared in constant time: both sides are hashed
    /// first, so neither the content nor the length of the secret shows in the timing. The one
    /// comparison of every token kitebridge checks (webhook and API tokens).
    pub fn matches(&self, presented: &str) -> bool {
        use sha2::{Digest, Sha256};
        use subtle::ConstantTimeEq;
        let a = Sha256::digest(presented.as_bytes());
        let b = Sha256::digest(self.expose().as_bytes());
        bool::from(a.ct_eq(&b))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([REDACTED])")
    }
}

/// Variables whose values are secrets: never echoed, and the only ones taken from an AWS Secrets
/// Manager secret.
pub const SECRET_VARIABLES: &[&str] = &[
    "BUILDKITE_API_TOKEN",
    "BUILDKITE_TOKEN",
    "BUILDKITE_WEBHOOK_TOKEN",
    "BITBUCKET_PASSWORD",
    "BITBUCKET_SERVER_PASSWORD",
    "BITBUCKET_TOKEN",
    "KITEBRIDGE_API_TOKEN",
    "KITEBRIDGE_DASHBOARD_TOKEN",
    "DMS_SNITCH_ID",
];

/// The environment variable holding the ARN (or name) of the Secrets Manager secret.
pub const SECRETS_ARN_VARIABLE: &str = "KITEBRIDGE_SECRETS_ARN";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{variable}: {problem}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub problem: String,
}

/// Every configuration problem found, reported together so a user fixes them in one go.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalid configuration")?;
        for (i, e) in self.0.iter().enumerate() {
            f.write_str(if i == 0 { ": " } else { "; " })?;
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Which Bitbucket build-status API to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BitbucketApi {
    /// Probe the server once and pick the best API it offers.
    Auto,
    /// `/rest/build-status/1.0/commits/{sha}` (Server and Data Center, commit-scoped).
    Legacy,
    /// `/rest/api/latest/projects/{key}/repos/{slug}/commits/{sha}/builds` (Data Center >= 7.4).
    Repository,
    /// Bitbucket Cloud's `/2.0/repositories/{workspace}/{repo}/commit/{sha}/statuses/build`.
    Cloud,
}

#[derive(Debug, Clone)]
pub enum BitbucketAuth {
    Basic { username: String, password: Secret },
    Bearer(Secret),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Clone)]
pub struct BuildkiteConfig {
    pub api_url: Url,
    pub token: Option<Secret>,
    pub organizations: Vec<String>,
    pub webhook_tokens: Vec<Secret>,
    /// Largest accepted distance between a signed webhook's timestamp and now.
    pub webhook_max_skew: Duration,
    /// Largest webhook body accepted, in bytes (`KITEBRIDGE_WEBHOOK_MAX_BODY`; larger: 413).
    pub webhook_max_body: usize,
}

#[derive(Debug, Clone)]
pub struct BitbucketConfig {
    /// Base URL without a trailing slash, e.g. `https://bitbucket.example.com/bitbucket`.
    pub url: Option<Url>,
    pub auth: Option<BitbucketAuth>,
    pub api: BitbucketApi,
}

#[derive(Debug, Clone)]
pub struct MonitorConfig {
    pub polling_interval: Duration,
    pub initial_search_time: Duration,
    /// A `tracing` filter directive (`warn`, `info`, ...), from `MONITOR_LOG_LEVEL` or `RUST_LOG`.
    pub log_filter: String,
    pub log_format: LogFormat,
}

#[derive(Debug, Clone)]
pub struct DmsConfig {
    pub url: Url,
    pub snitch_id: Secret,
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// DynamoDB table (Lambda functions).
    pub table: Option<String>,
    /// File of the embedded store (`kitebridge serve` and `kitebridge poll`).
    pub db: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub buildkite: BuildkiteConfig,
    pub bitbucket: BitbucketConfig,
    pub monitor: MonitorConfig,
    pub dms: Option<DmsConfig>,
    pub store: StoreConfig,
    /// Bearer token of the releases API.
    pub api_token: Option<Secret>,
    /// How callers of the releases API are authenticated (`KITEBRIDGE_API_AUTH`).
    pub api_auth: ApiAuth,
    /// Most status posts in flight at once.
    pub post_concurrency: usize,
    /// Timeout of every outgoing HTTP request.
    pub http_timeout: Duration,
    /// Deployment statuses stuck longer than this become `error`.
    pub deployment_timeout: Duration,
    /// Trigger rules given inline (`KITEBRIDGE_RULES`, JSON) and from a file (`KITEBRIDGE_RULES_FILE`).
    pub rules_json: Option<String>,
    pub rules_file: Option<PathBuf>,
    /// How statuses reach Bitbucket: pace, health, when to give up.
    pub delivery: DeliveryConfig,
    /// Limits of the HTTP server: timeouts, connections, shutdown.
    pub server: ServerConfig,
    /// The web dashboard's sign-in.
    pub dashboard: DashboardConfig,
    /// Code Insights reports of finished builds (`KITEBRIDGE_CODE_INSIGHTS=on`; off by default
    /// until the server-version probe is paced with the statuses, and skipped where the server
    /// has none).
    pub code_insights: bool,
}

/// The dashboard (`/ui/`): who may sign in, and for how long.
#[derive(Debug, Clone)]
pub struct DashboardConfig {
    /// The token a person signs in with (`KITEBRIDGE_DASHBOARD_TOKEN`, else the API token when
    /// the API checks a bearer token). `None`: the dashboard signs nobody in.
    pub token: Option<Secret>,
    /// How long a session lasts (`KITEBRIDGE_SESSION_LIFETIME`, minutes).
    pub session_lifetime: Duration,
}

/// Limits that keep slow or many clients from holding `kitebridge serve` (and, for the request
/// layers, each Lambda invocation) without end.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// How long a connection may take to send a request's headers, counted from when the server
    /// starts waiting for them, so it also closes a keep-alive connection left idle
    /// (`KITEBRIDGE_SERVER_HEADER_TIMEOUT`, seconds).
    pub header_timeout: Duration,
    /// Longest a request may take from its headers to its answer, body included
    /// (`KITEBRIDGE_SERVER_REQUEST_TIMEOUT`, seconds; then 503).
    pub request_timeout: Duration,
    /// Most connections open at once; more wait in the listen queue
    /// (`KITEBRIDGE_SERVER_MAX_CONNECTIONS`).
    pub max_connections: usize,
    /// Most requests handled at once; more wait their turn (`KITEBRIDGE_SERVER_MAX_REQUESTS`).
    pub max_requests: usize,
    /// After SIGTERM or Ctrl-C, how long requests in flight may take to finish before the
    /// remaining connections are dropped (`KITEBRIDGE_SHUTDOWN_TIMEOUT`, seconds).
    pub shutdown_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// Posts per second Bitbucket allows this user (`BITBUCKET_RATE_LIMIT`); without it the
    /// pacer learns the limit from 429 answers.
    pub rate_limit: Option<f64>,
    /// `/healthz` fails while a status has waited undelivered longer than this
    /// (`KITEBRIDGE_HEALTH_MAX_UNDELIVERED`, minutes).
    pub max_undelivered_age: Duration,
    /// A status Bitbucket keeps refusing (401, 403, 404, 400...) leaves the outbox after this
    /// (`KITEBRIDGE_OUTBOX_GIVE_UP`, hours).
    pub give_up_after: Duration,
}

/// How the releases API authenticates callers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ApiAuth {
    /// `Authorization: Bearer <KITEBRIDGE_API_TOKEN>`, checked by kitebridge.
    #[default]
    Token,
    /// API Gateway's IAM authorization (SigV4) protects the routes before they reach
    /// kitebridge, which then checks nothing itself and needs no `KITEBRIDGE_API_TOKEN`.
    Iam,
}

/// What a binary needs; [`Config::require`] checks the variables each role cannot do without.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Scheduled poll-and-report.
    Poller,
    /// Buildkite webhook receiver.
    Webhook,
    /// Releases API.
    Releases,
    /// `kitebridge serve`: all of the above in one process.
    Serve,
}

pub const DEFAULT_BUILDKITE_API_URL: &str = "https://api.buildkite.com";
pub const DEFAULT_BITBUCKET_CLOUD_URL: &str = "https://api.bitbucket.org";
pub const DEFAULT_DMS_URL: &str = "https://nosnch.in";

impl Config {
    /// Reads the process environment, and checks the CA certificates it names.
    pub fn from_env() -> Result<Config, ConfigErrors> {
        let vars = process_env();
        let lookup = |name: &str| vars.get(name).cloned();
        with_problems(Config::from_lookup(lookup), ca_certificate_problems(lookup))
    }

    /// Reads the process environment, with the secret variables overlaid from the AWS Secrets
    /// Manager secret named by `KITEBRIDGE_SECRETS_ARN`, if set, read with the SDK
    /// configuration `sdk`. Call once, at cold start.
    pub async fn from_env_and_secrets_manager(
        sdk: &aws_config::SdkConfig,
    ) -> Result<Config, crate::Error> {
        let vars = process_env();
        if vars
            .get(SECRETS_ARN_VARIABLE)
            .is_none_or(|v| v.trim().is_empty())
        {
            return Ok(Config::from_lookup(|name| vars.get(name).cloned())?);
        }
        Config::from_vars_and_secret(vars, &aws_sdk_secretsmanager::Client::new(sdk)).await
    }

    /// Fails, with every problem of the environment, when the CA certificates it names cannot
    /// be loaded. Call it before anything builds an HTTPS client: the AWS SDK's panics when it
    /// finds no CA certificate, and reqwest's says only "builder error".
    pub fn check_ca_certificates_in_env() -> Result<(), ConfigErrors> {
        let vars = process_env();
        let lookup = |name: &str| vars.get(name).cloned();
        let ca = ca_certificate_problems(lookup);
        if ca.is_empty() {
            return Ok(());
        }
        with_problems(Config::from_lookup(lookup), ca).map(|_| ())
    }

    /// `vars`, with the secret variables overlaid from the Secrets Manager secret named by
    /// `KITEBRIDGE_SECRETS_ARN` (if set), read through `client`.
    pub async fn from_vars_and_secret(
        mut vars: HashMap<String, String>,
        client: &aws_sdk_secretsmanager::Client,
    ) -> Result<Config, crate::Error> {
        if let Some(arn) = vars
            .get(SECRETS_ARN_VARIABLE)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
        {
            let secret = crate::secrets::fetch_with(client, &arn).await?;
            overlay_secrets(&mut vars, &secret)?;
        }
        Ok(Config::from_lookup(|name| vars.get(name).cloned())?)
    }

    /// Reads configuration through `lookup` (the environment, or a map in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigErrors> {
        let mut p = Parser {
            lookup: &lookup,
            errors: Vec::new(),
        };

        let buildkite = BuildkiteConfig {
            api_url: p
                .url("BUILDKITE_API_URL")
                .unwrap_or_else(|| default_url(DEFAULT_BUILDKITE_API_URL)),
            token: p.secret_any(&["BUILDKITE_API_TOKEN", "BUILDKITE_TOKEN"]),
            organizations: p.list("BUILDKITE_ORGANIZATION", is_slug, "an organization slug"),
            webhook_tokens: p
                .list("BUILDKITE_WEBHOOK_TOKEN", |s| !s.is_empty(), "a token")
                .into_iter()
                .map(Secret::new)
                .collect(),
            webhook_max_skew: Duration::from_secs(p.number(
                "KITEBRIDGE_WEBHOOK_MAX_SKEW",
                300,
                1..=86_400,
            )),
            // 1 MiB by default; at most 6 MiB, the largest request a Lambda function can receive.
            webhook_max_body: p.number("KITEBRIDGE_WEBHOOK_MAX_BODY", 1 << 20, 1024..=6 << 20)
                as usize,
        };

        let api = p.bitbucket_api();
        let mut url = p.url_any(&["BITBUCKET_SERVER_URL", "BITBUCKET_URL"]);
        if url.is_none() && api == BitbucketApi::Cloud {
            url = Some(default_url(DEFAULT_BITBUCKET_CLOUD_URL));
        }
        let username = p.string_any(&["BITBUCKET_SERVER_USERNAME", "BITBUCKET_USERNAME"]);
        let password = p.secret_any(&["BITBUCKET_SERVER_PASSWORD", "BITBUCKET_PASSWORD"]);
        let bearer = p.secret_any(&["BITBUCKET_TOKEN"]);
        let auth = match (bearer, username, password) {
            (Some(token), _, _) => Some(BitbucketAuth::Bearer(token)),
            (None, Some(username), Some(password)) => {
                Some(BitbucketAuth::Basic { username, password })
            }
            (None, Some(_), None) => {
                p.error(
                    "BITBUCKET_PASSWORD",
                    "required when BITBUCKET_USERNAME is set",
                );
                None
            }
            (None, None, Some(_)) => {
                p.error(
                    "BITBUCKET_USERNAME",
                    "required when BITBUCKET_PASSWORD is set",
                );
                None
            }
            (None, None, None) => None,
        };
        let bitbucket = BitbucketConfig { url, auth, api };

        let log_filter = p.log_filter();
        let log_format = match p.string("KITEBRIDGE_LOG_FORMAT").as_deref() {
            None => {
                if lookup("AWS_LAMBDA_FUNCTION_NAME").is_some() {
                    LogFormat::Json
                } else {
                    LogFormat::Text
                }
            }
            Some(v) if v.eq_ignore_ascii_case("json") => LogFormat::Json,
            Some(v) if v.eq_ignore_ascii_case("text") => LogFormat::Text,
            Some(v) => {
                let problem = format!("expected `json` or `text`, got `{v}`");
                p.error("KITEBRIDGE_LOG_FORMAT", problem);
                LogFormat::Text
            }
        };
        let monitor = MonitorConfig {
            polling_interval: Duration::from_secs(p.number(
                "MONITOR_POLLING_INTERVAL",
                60,
                1..=86_400,
            )),
            initial_search_time: Duration::from_secs(
                3600 * p.number("MONITOR_INITIAL_SEARCH_TIME", 168, 0..=24 * 366),
            ),
            log_filter,
            log_format,
        };

        let dms_url = p
            .url("DMS_URL")
            .unwrap_or_else(|| default_url(DEFAULT_DMS_URL));
        let dms = p.secret_any(&["DMS_SNITCH_ID"]).map(|snitch_id| DmsConfig {
            url: dms_url,
            snitch_id,
        });

        let store = StoreConfig {
            table: p.string("KITEBRIDGE_TABLE"),
            db: p.string("KITEBRIDGE_DB").map(PathBuf::from),
        };

        let rate_limit =
            p.string("BITBUCKET_RATE_LIMIT")
                .and_then(|v| match v.trim().parse::<f64>() {
                    Ok(r) if r.is_finite() && r > 0.0 && r <= 100_000.0 => Some(r),
                    _ => {
                        let problem =
                            format!("expected requests per second (a number above 0), got `{v}`");
                        p.error("BITBUCKET_RATE_LIMIT", problem);
                        None
                    }
                });
        let delivery = DeliveryConfig {
            rate_limit,
            max_undelivered_age: Duration::from_secs(
                60 * p.number("KITEBRIDGE_HEALTH_MAX_UNDELIVERED", 15, 1..=7 * 24 * 60),
            ),
            give_up_after: Duration::from_secs(
                3600 * p.number("KITEBRIDGE_OUTBOX_GIVE_UP", 72, 1..=90 * 24),
            ),
        };
        let api_token = p.secret_any(&["KITEBRIDGE_API_TOKEN"]);
        let api_auth = p.api_auth();
        let dashboard = DashboardConfig {
            // Under IAM the API token (if any) is not what callers prove, so the dashboard has
            // its own; under token auth it is the API's unless given.
            token: p.secret_any(&["KITEBRIDGE_DASHBOARD_TOKEN"]).or_else(|| {
                (api_auth == ApiAuth::Token)
                    .then(|| api_token.clone())
                    .flatten()
            }),
            session_lifetime: Duration::from_secs(
                60 * p.number("KITEBRIDGE_SESSION_LIFETIME", 12 * 60, 1..=30 * 24 * 60),
            ),
        };
        let config = Config {
            buildkite,
            bitbucket,
            monitor,
            dms,
            store,
            api_token,
            api_auth,
            dashboard,
            code_insights: p.switch("KITEBRIDGE_CODE_INSIGHTS", false),
            post_concurrency: p.number("KITEBRIDGE_POST_CONCURRENCY", 64, 1..=512) as usize,
            http_timeout: Duration::from_secs(p.number("KITEBRIDGE_HTTP_TIMEOUT", 10, 1..=300)),
            deployment_timeout: Duration::from_secs(
                60 * p.number("KITEBRIDGE_DEPLOYMENT_TIMEOUT", 60, 1..=7 * 24 * 60),
            ),
            rules_json: p.string("KITEBRIDGE_RULES"),
            rules_file: p.string("KITEBRIDGE_RULES_FILE").map(PathBuf::from),
            delivery,
            server: ServerConfig {
                header_timeout: Duration::from_secs(p.number(
                    "KITEBRIDGE_SERVER_HEADER_TIMEOUT",
                    10,
                    1..=300,
                )),
                request_timeout: Duration::from_secs(p.number(
                    "KITEBRIDGE_SERVER_REQUEST_TIMEOUT",
                    60,
                    1..=900,
                )),
                max_connections: p.number("KITEBRIDGE_SERVER_MAX_CONNECTIONS", 1024, 1..=65_536)
                    as usize,
                max_requests: p.number("KITEBRIDGE_SERVER_MAX_REQUESTS", 256, 1..=65_536) as usize,
                shutdown_timeout: Duration::from_secs(p.number(
                    "KITEBRIDGE_SHUTDOWN_TIMEOUT",
                    20,
                    1..=600,
                )),
            },
        };
        if p.errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(p.errors))
        }
    }

    /// Checks that everything `role` cannot work without is set; reports every gap at once.
    pub fn require(&self, role: Role) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        let mut need = |ok: bool, variable: &'static str, problem: &str| {
            if !ok {
                errors.push(ConfigError {
                    variable,
                    problem: problem.to_string(),
                });
            }
        };
        let polls = matches!(role, Role::Poller | Role::Serve);
        let reports = matches!(role, Role::Poller | Role::Webhook | Role::Serve);
        let releases = matches!(role, Role::Releases | Role::Serve);
        if polls || releases {
            need(
                self.buildkite.token.is_some(),
                "BUILDKITE_API_TOKEN",
                "required (a Buildkite API access token; BUILDKITE_TOKEN is accepted too)",
            );
        }
        if polls {
            need(
                !self.buildkite.organizations.is_empty(),
                "BUILDKITE_ORGANIZATION",
                "required (one organization slug, or several separated by commas)",
            );
        }
        if reports {
            need(
                self.bitbucket.url.is_some(),
                "BITBUCKET_URL",
                "required (the base URL of Bitbucket, e.g. https://bitbucket.example.com)",
            );
            need(
                self.bitbucket.auth.is_some(),
                "BITBUCKET_TOKEN",
                "required, or BITBUCKET_USERNAME and BITBUCKET_PASSWORD",
            );
        }
        if matches!(role, Role::Webhook | Role::Serve) {
            need(
                !self.buildkite.webhook_tokens.is_empty(),
                "BUILDKITE_WEBHOOK_TOKEN",
                "required (the webhook's token; several separated by commas while rotating)",
            );
        }
        // Nothing stands in front of `kitebridge serve` to check IAM signatures: `iam` there
        // would leave the releases and rules APIs open to anyone who can reach the port.
        need(
            !(role == Role::Serve && self.api_auth == ApiAuth::Iam),
            "KITEBRIDGE_API_AUTH",
            "`iam` is for the Lambda functions behind API Gateway's IAM authorization; \
             `kitebridge serve` checks the bearer token (KITEBRIDGE_API_TOKEN)",
        );
        if releases && self.api_auth == ApiAuth::Token {
            need(
                self.api_token.is_some(),
                "KITEBRIDGE_API_TOKEN",
                "required (the bearer token clients of the releases API send)",
            );
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors(errors))
        }
    }
}

/// The process environment. A variable that is not UTF-8 is read lossily rather than panicking
/// (as `std::env::vars` would); a value mangled that way is then refused by its own check.
fn process_env() -> HashMap<String, String> {
    std::env::vars_os()
        .map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        })
        .collect()
}

/// `parsed`, failing with `more` problems added to its own.
fn with_problems(
    parsed: Result<Config, ConfigErrors>,
    more: Vec<ConfigError>,
) -> Result<Config, ConfigErrors> {
    match parsed {
        Ok(config) if more.is_empty() => Ok(config),
        Ok(_) => Err(ConfigErrors(more)),
        Err(ConfigErrors(mut errors)) => {
            errors.extend(more);
            Err(ConfigErrors(errors))
        }
    }
}

/// A PEM bundle of CA certificates that replaces the system's (read by rustls, for both
/// kitebridge's HTTP client and the AWS SDK's).
pub const CA_FILE_VARIABLE: &str = "SSL_CERT_FILE";
/// Directories of CA certificates, separated by `:` (read by rustls like [`CA_FILE_VARIABLE`]).
pub const CA_DIR_VARIABLE: &str = "SSL_CERT_DIR";

/// What is wrong with the CA certificates `SSL_CERT_FILE` and `SSL_CERT_DIR` name, if set.
///
/// rustls only logs a warning for an unreadable file or directory, and then either fails with
/// "No CA certificates were loaded from the system" (which reqwest reports as "builder error")
/// or, when the other variable supplies some, quietly trusts less than the user asked for.
/// Both become a start-up error naming the variable. The paths are shown: they are not secrets.
pub fn ca_certificate_problems(lookup: impl Fn(&str) -> Option<String>) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    if let Some(file) = lookup(CA_FILE_VARIABLE) {
        let problem = if file.trim().is_empty() {
            Some("set but empty; unset it to use the system's CA certificates".to_string())
        } else {
            match std::fs::read(&file) {
                Err(e) => Some(format!("cannot read the CA bundle `{file}`: {e}")),
                Ok(pem) => match reqwest::Certificate::from_pem_bundle(&pem) {
                    Ok(certs) if !certs.is_empty() => None,
                    _ => Some(format!(
                        "`{file}` holds no PEM certificate (`-----BEGIN CERTIFICATE-----`)"
                    )),
                },
            }
        };
        if let Some(problem) = problem {
            errors.push(ConfigError {
                variable: CA_FILE_VARIABLE,
                problem,
            });
        }
    }
    if let Some(dirs) = lookup(CA_DIR_VARIABLE) {
        for dir in std::env::split_paths(&dirs).filter(|d| !d.as_os_str().is_empty()) {
            if let Err(e) = std::fs::read_dir(&dir) {
                errors.push(ConfigError {
                    variable: CA_DIR_VARIABLE,
                    problem: format!("cannot read the directory `{}`: {e}", dir.display()),
                });
            }
        }
    }
    errors
}

/// Overlays the secret variables found in a Secrets Manager secret string (a JSON object of
/// variable name to value) onto `vars`. Keys that are not secret variables are refused, so the
/// secret cannot silently change behaviour.
pub fn overlay_secrets(
    vars: &mut HashMap<String, String>,
    secret_json: &str,
) -> Result<(), ConfigErrors> {
    const EXPECTED: &str = "the secret must be a JSON object of variable names to strings";
    let refuse = |problem: String| {
        ConfigErrors(vec![ConfigError {
            variable: SECRETS_ARN_VARIABLE,
            problem,
        }])
    };
    // serde's messages quote what they found ("invalid type: string \"hunter2\""), so only the
    // kind of problem and its position are kept, and the shape found is named, never shown.
    let parsed: serde_json::Value = serde_json::from_str(secret_json).map_err(|e| {
        refuse(format!(
            "{EXPECTED}; it is not valid JSON (line {}, column {})",
            e.line(),
            e.column()
        ))
    })?;
    let parsed = match parsed {
        serde_json::Value::Object(map) => map,
        other => {
            let found = match other {
                serde_json::Value::Null => "null",
                serde_json::Value::Bool(_) => "a boolean",
                serde_json::Value::Number(_) => "a number",
                serde_json::Value::String(_) => "a JSON string",
                serde_json::Value::Array(_) => "an array",
                serde_json::Value::Object(_) => "an object",
            };
            return Err(refuse(format!("{EXPECTED}; found {found}")));
        }
    };
    let mut errors = Vec::new();
    for (key, value) in parsed {
        let Some(&name) = SECRET_VARIABLES.iter().find(|n| **n == key) else {
            // A key that looks like a variable name is shown (the usual slip: a non-secret
            // variable put in the secret); anything else may be a value pasted as a key.
            let shown = if is_variable_name(&key) {
                format!("`{key}`")
            } else {
                "that is not a variable name".to_string()
            };
            errors.push(ConfigError {
                variable: SECRETS_ARN_VARIABLE,
                problem: format!(
                    "the secret has a key {shown}; the keys must be among {}",
                    SECRET_VARIABLES.join(", ")
                ),
            });
            continue;
        };
        match value {
            serde_json::Value::String(s) => {
                vars.insert(name.to_string(), s);
            }
            _ => errors.push(ConfigError {
                variable: SECRETS_ARN_VARIABLE,
                problem: format!("the secret's `{name}` must be a string"),
            }),
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ConfigErrors(errors))
    }
}

fn default_url(s: &str) -> Url {
    // The defaults are constant, valid URLs; a failure here is a programming error caught by
    // the unit tests, so fall back to a harmless value rather than panic at run time.
    Url::parse(s)
        .unwrap_or_else(|_| Url::parse("http://127.0.0.1/").unwrap_or_else(|_| unreachable!()))
}

fn is_variable_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.starts_with(|c: char| c.is_ascii_uppercase())
        && s.chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

/// `raw` (a value that did not parse as a URL) fit to quote in an error: anything that may be
/// credentials (before the last `@`) or a token in the query or fragment is replaced. The
/// authority's end cannot be trusted in a malformed value (a password may hold `/`), so
/// everything up to the last `@` goes.
fn redact_url(raw: &str) -> String {
    let (scheme, rest) = match raw.find("://") {
        Some(i) => raw.split_at(i + 3),
        None => ("", raw),
    };
    let rest = match rest.rfind('@') {
        Some(i) => format!("***{}", &rest[i..]),
        None => rest.to_string(),
    };
    let rest = match rest.find(['?', '#']) {
        Some(i) => format!("{}{}***", &rest[..i], &rest[i..=i]),
        None => rest,
    };
    format!("{scheme}{rest}")
}

use crate::names::is_slug;

struct Parser<'a, F: Fn(&str) -> Option<String>> {
    lookup: &'a F,
    errors: Vec<ConfigError>,
}

impl<F: Fn(&str) -> Option<String>> Parser<'_, F> {
    fn error(&mut self, variable: &'static str, problem: impl Into<String>) {
        self.errors.push(ConfigError {
            variable,
            problem: problem.into(),
        });
    }

    /// A set, non-blank value, trimmed. Blank counts as unset, as in the old connector's YAML.
    fn string(&mut self, name: &'static str) -> Option<String> {
        (self.lookup)(name)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    }

    fn string_any(&mut self, names: &[&'static str]) -> Option<String> {
        names.iter().find_map(|n| self.string(n))
    }

    fn secret_any(&mut self, names: &[&'static str]) -> Option<Secret> {
        self.string_any(names).map(Secret::new)
    }

    /// `on`/`off` (also `true`/`false`, `1`/`0`); absent: `default`.
    fn switch(&mut self, name: &'static str, default: bool) -> bool {
        let Some(raw) = self.string(name) else {
            return default;
        };
        match raw.to_ascii_lowercase().as_str() {
            "on" | "true" | "1" => true,
            "off" | "false" | "0" => false,
            _ => {
                self.error(name, format!("expected on or off, got `{raw}`"));
                default
            }
        }
    }

    fn number(
        &mut self,
        name: &'static str,
        default: u64,
        range: std::ops::RangeInclusive<u64>,
    ) -> u64 {
        let Some(raw) = self.string(name) else {
            return default;
        };
        match raw.parse::<u64>() {
            Ok(n) if range.contains(&n) => n,
            _ => {
                let problem = format!(
                    "expected a whole number from {} to {}, got `{raw}`",
                    range.start(),
                    range.end()
                );
                self.error(name, problem);
                default
            }
        }
    }

    fn url(&mut self, name: &'static str) -> Option<Url> {
        let raw = self.string(name)?;
        match Url::parse(&raw) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.has_host() => {
                if !u.username().is_empty() || u.password().is_some() {
                    // Credentials in the URL end up in logs and error messages; refuse them
                    // without echoing the URL.
                    self.error(
                        name,
                        "must not contain credentials; use BITBUCKET_USERNAME/BITBUCKET_PASSWORD or BITBUCKET_TOKEN",
                    );
                    return None;
                }
                Some(normalize_base(u))
            }
            _ => {
                let shown = redact_url(&raw);
                self.error(name, format!("expected an http(s) URL, got `{shown}`"));
                None
            }
        }
    }

    fn url_any(&mut self, names: &[&'static str]) -> Option<Url> {
        for n in names {
            if self.string(n).is_some() {
                return self.url(n);
            }
        }
        None
    }

    fn list(
        &mut self,
        name: &'static str,
        valid: impl Fn(&str) -> bool,
        what: &str,
    ) -> Vec<String> {
        let Some(raw) = self.string(name) else {
            return Vec::new();
        };
        let items: Vec<String> = raw
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if items.is_empty() || !items.iter().all(|s| valid(s)) {
            let shown = if SECRET_VARIABLES.contains(&name) {
                String::new()
            } else {
                format!(", got `{raw}`")
            };
            self.error(
                name,
                format!("expected {what}, or several separated by commas{shown}"),
            );
            return Vec::new();
        }
        let mut seen = std::collections::HashSet::new();
        items
            .into_iter()
            .filter(|s| seen.insert(s.clone()))
            .collect()
    }

    fn bitbucket_api(&mut self) -> BitbucketApi {
        match self
            .string("BITBUCKET_API")
            .map(|s| s.to_ascii_lowercase())
            .as_deref()
        {
            None | Some("auto") => BitbucketApi::Auto,
            Some("legacy") => BitbucketApi::Legacy,
            Some("repository") => BitbucketApi::Repository,
            Some("cloud") => BitbucketApi::Cloud,
            Some(other) => {
                let problem =
                    format!("expected one of auto, legacy, repository, cloud; got `{other}`");
                self.error("BITBUCKET_API", problem);
                BitbucketApi::Auto
            }
        }
    }

    fn api_auth(&mut self) -> ApiAuth {
        match self
            .string("KITEBRIDGE_API_AUTH")
            .map(|s| s.to_ascii_lowercase())
            .as_deref()
        {
            None | Some("token") => ApiAuth::Token,
            Some("iam") => ApiAuth::Iam,
            Some(other) => {
                let problem = format!("expected token or iam, got `{other}`");
                self.error("KITEBRIDGE_API_AUTH", problem);
                ApiAuth::Token
            }
        }
    }

    fn log_filter(&mut self) -> String {
        // RUST_LOG, when set, wins: it is the standard knob for fine-grained filters.
        if let Some(directive) = self.string("RUST_LOG") {
            return directive;
        }
        // Ruby Logger's levels, as the old connector accepted them.
        match self
            .string("MONITOR_LOG_LEVEL")
            .map(|s| s.to_ascii_uppercase())
            .as_deref()
        {
            None | Some("WARN") | Some("WARNING") => "warn".into(),
            Some("DEBUG") => "debug".into(),
            Some("INFO") => "info".into(),
            Some("ERROR") | Some("FATAL") | Some("UNKNOWN") => "error".into(),
            Some("TRACE") => "trace".into(),
            Some(other) => {
                let problem = format!("expected DEBUG, INFO, WARN, ERROR or FATAL, got `{other}`");
                self.error("MONITOR_LOG_LEVEL", problem);
                "warn".into()
            }
        }
    }
}

/// Drops a trailing slash so `{base}/rest/...` never becomes `//rest/...` (an old connector bug).
fn normalize_base(mut u: Url) -> Url {
    let trimmed = u.path().trim_end_matches('/').to_string();
    u.set_path(&trimmed);
    u.set_query(None);
    u.set_fragment(None);
    u
}

/// Joins a base URL (as normalized above) and an absolute path.
pub fn join_url(base: &Url, path: &str) -> String {
    let b = base.as_str().trim_end_matches('/');
    format!("{b}/{}", path.trim_start_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pairs: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|n| map.get(n).cloned())
    }

    #[test]
    fn defaults_match_the_old_connector() {
        let c = config(&[]).unwrap();
        assert_eq!(c.monitor.polling_interval, Duration::from_secs(60));
        assert_eq!(
            c.monitor.initial_search_time,
            Duration::from_secs(168 * 3600)
        );
        assert_eq!(c.monitor.log_filter, "warn");
        assert_eq!(c.buildkite.api_url.as_str(), "https://api.buildkite.com/");
        assert_eq!(c.bitbucket.api, BitbucketApi::Auto);
        assert!(c.dms.is_none());
        assert_eq!(c.buildkite.webhook_max_skew, Duration::from_secs(300));
    }

    #[test]
    fn accepts_the_variable_the_old_connector_really_read() {
        let c = config(&[("BUILDKITE_TOKEN", "bk-old")]).unwrap();
        assert_eq!(c.buildkite.token.unwrap().expose(), "bk-old");
        let c = config(&[
            ("BUILDKITE_TOKEN", "bk-old"),
            ("BUILDKITE_API_TOKEN", "bk-new"),
        ])
        .unwrap();
        assert_eq!(c.buildkite.token.unwrap().expose(), "bk-new");
    }

    #[test]
    fn organizations_and_webhook_tokens_are_lists() {
        let c = config(&[
            ("BUILDKITE_ORGANIZATION", "acme, acme-labs,acme"),
            ("BUILDKITE_WEBHOOK_TOKEN", "old-token,new-token"),
        ])
        .unwrap();
        assert_eq!(c.buildkite.organizations, vec!["acme", "acme-labs"]);
        let tokens: Vec<&str> = c
            .buildkite
            .webhook_tokens
            .iter()
            .map(|t| t.expose())
            .collect();
        assert_eq!(tokens, vec!["old-token", "new-token"]);
    }

    #[test]
    fn errors_name_the_variable_and_what_is_expected() {
        let err = config(&[
            ("MONITOR_POLLING_INTERVAL", "soon"),
            ("BITBUCKET_API", "server"),
            ("BUILDKITE_ORGANIZATION", "acme inc"),
            ("BITBUCKET_URL", "bitbucket.example.com"),
        ])
        .unwrap_err();
        let vars: Vec<&str> = err.0.iter().map(|e| e.variable).collect();
        assert_eq!(
            vars,
            vec![
                "BUILDKITE_ORGANIZATION",
                "BITBUCKET_API",
                "BITBUCKET_URL",
                "MONITOR_POLLING_INTERVAL"
            ]
        );
        let text = err.to_string();
        assert!(text.contains(
            "MONITOR_POLLING_INTERVAL: expected a whole number from 1 to 86400, got `soon`"
        ));
        assert!(text.contains("BITBUCKET_API: expected one of auto, legacy, repository, cloud"));
    }

    #[test]
    fn secrets_never_appear_in_debug_or_errors() {
        let c = config(&[
            ("BUILDKITE_API_TOKEN", "bkua_supersecret1"),
            ("BITBUCKET_USERNAME", "ci"),
            ("BITBUCKET_PASSWORD", "hunter2-supersecret2"),
            ("BUILDKITE_WEBHOOK_TOKEN", "whk-supersecret3"),
            ("KITEBRIDGE_API_TOKEN", "api-supersecret4"),
            ("DMS_SNITCH_ID", "snitch-supersecret5"),
        ])
        .unwrap();
        let debug = format!("{c:?}");
        assert!(!debug.contains("supersecret"), "{debug}");
        assert!(debug.contains("REDACTED"));

        let err = config(&[(
            "BITBUCKET_URL",
            "https://ci:hunter2-supersecret@bitbucket.example.com",
        )])
        .unwrap_err();
        assert!(!err.to_string().contains("supersecret"), "{err}");
    }

    #[test]
    fn bitbucket_auth_and_url() {
        let c = config(&[
            ("BITBUCKET_URL", "https://bb.example.com/bitbucket/"),
            ("BITBUCKET_TOKEN", "t"),
        ])
        .unwrap();
        assert!(matches!(c.bitbucket.auth, Some(BitbucketAuth::Bearer(_))));
        let url = c.bitbucket.url.unwrap();
        assert_eq!(
            join_url(&url, "/rest/build-status/1.0/commits/x"),
            "https://bb.example.com/bitbucket/rest/build-status/1.0/commits/x"
        );

        let err = config(&[("BITBUCKET_USERNAME", "ci")]).unwrap_err();
        assert_eq!(err.0[0].variable, "BITBUCKET_PASSWORD");

        let c = config(&[("BITBUCKET_API", "cloud")]).unwrap();
        assert_eq!(
            c.bitbucket.url.unwrap().as_str(),
            "https://api.bitbucket.org/"
        );
    }

    #[test]
    fn log_levels_follow_ruby_logger_names() {
        assert_eq!(
            config(&[("MONITOR_LOG_LEVEL", "debug")])
                .unwrap()
                .monitor
                .log_filter,
            "debug"
        );
        assert_eq!(
            config(&[("MONITOR_LOG_LEVEL", "FATAL")])
                .unwrap()
                .monitor
                .log_filter,
            "error"
        );
        assert!(config(&[("MONITOR_LOG_LEVEL", "loud")]).is_err());
    }

    #[test]
    fn require_lists_every_missing_variable_for_the_role() {
        let c = config(&[]).unwrap();
        let err = c.require(Role::Poller).unwrap_err();
        let vars: Vec<&str> = err.0.iter().map(|e| e.variable).collect();
        assert_eq!(
            vars,
            vec![
                "BUILDKITE_API_TOKEN",
                "BUILDKITE_ORGANIZATION",
                "BITBUCKET_URL",
                "BITBUCKET_TOKEN"
            ]
        );
        let err = c.require(Role::Webhook).unwrap_err();
        let vars: Vec<&str> = err.0.iter().map(|e| e.variable).collect();
        assert_eq!(
            vars,
            vec![
                "BITBUCKET_URL",
                "BITBUCKET_TOKEN",
                "BUILDKITE_WEBHOOK_TOKEN"
            ]
        );
        let err = c.require(Role::Releases).unwrap_err();
        let vars: Vec<&str> = err.0.iter().map(|e| e.variable).collect();
        assert_eq!(vars, vec!["BUILDKITE_API_TOKEN", "KITEBRIDGE_API_TOKEN"]);
    }

    #[test]
    fn server_limits_have_defaults_and_bounds() {
        let c = config(&[]).unwrap();
        assert_eq!(c.server.header_timeout, Duration::from_secs(10));
        assert_eq!(c.server.request_timeout, Duration::from_secs(60));
        assert_eq!(c.server.max_connections, 1024);
        assert_eq!(c.server.max_requests, 256);
        assert_eq!(c.server.shutdown_timeout, Duration::from_secs(20));
        let c = config(&[
            ("KITEBRIDGE_SERVER_HEADER_TIMEOUT", "2"),
            ("KITEBRIDGE_SHUTDOWN_TIMEOUT", "5"),
            ("KITEBRIDGE_SERVER_MAX_CONNECTIONS", "200"),
        ])
        .unwrap();
        assert_eq!(c.server.header_timeout, Duration::from_secs(2));
        assert_eq!(c.server.shutdown_timeout, Duration::from_secs(5));
        assert_eq!(c.server.max_connections, 200);
        for (name, bad) in [
            ("KITEBRIDGE_SERVER_HEADER_TIMEOUT", "0"),
            ("KITEBRIDGE_SERVER_REQUEST_TIMEOUT", "soon"),
            ("KITEBRIDGE_SERVER_MAX_CONNECTIONS", "0"),
            ("KITEBRIDGE_SERVER_MAX_REQUESTS", "-1"),
            ("KITEBRIDGE_SHUTDOWN_TIMEOUT", "601"),
        ] {
            let e = config(&[(name, bad)]).unwrap_err().to_string();
            assert!(e.contains(name), "{name}={bad}: {e}");
        }
    }

    #[test]
    fn iam_auth_needs_no_api_token() {
        assert_eq!(config(&[]).unwrap().api_auth, ApiAuth::Token);
        let c = config(&[("KITEBRIDGE_API_AUTH", "IAM"), ("BUILDKITE_API_TOKEN", "t")]).unwrap();
        assert_eq!(c.api_auth, ApiAuth::Iam);
        // ... accepted by the releases Lambda, refused by the self-hosted process.
        let errors = c.require(Role::Serve).unwrap_err().0;
        assert!(
            errors.iter().any(|e| e.variable == "KITEBRIDGE_API_AUTH"),
            "{errors:?}"
        );
        assert!(c.require(Role::Releases).is_ok());
        let c = config(&[
            ("KITEBRIDGE_API_AUTH", "token"),
            ("BUILDKITE_API_TOKEN", "t"),
        ])
        .unwrap();
        let err = c.require(Role::Releases).unwrap_err();
        assert_eq!(err.0[0].variable, "KITEBRIDGE_API_TOKEN");
        let err = config(&[("KITEBRIDGE_API_AUTH", "none")]).unwrap_err();
        assert_eq!(err.0[0].variable, "KITEBRIDGE_API_AUTH");
    }

    #[test]
    fn secrets_manager_overlay_takes_only_secret_variables() {
        let mut vars = HashMap::new();
        vars.insert("BITBUCKET_PASSWORD".to_string(), "from-env".to_string());
        overlay_secrets(
            &mut vars,
            r#"{"BITBUCKET_PASSWORD":"from-secret","KITEBRIDGE_API_TOKEN":"t"}"#,
        )
        .unwrap();
        assert_eq!(vars["BITBUCKET_PASSWORD"], "from-secret");
        assert_eq!(vars["KITEBRIDGE_API_TOKEN"], "t");

        let err = overlay_secrets(&mut vars, r#"{"BITBUCKET_URL":"https://x"}"#).unwrap_err();
        assert!(err.to_string().contains("BITBUCKET_URL"));
        let err = overlay_secrets(&mut vars, "not json supersecret").unwrap_err();
        assert!(!err.to_string().contains("supersecret"));
    }

    #[test]
    fn secrets_manager_errors_name_the_shape_never_the_content() {
        let mut vars = HashMap::new();
        for (secret, found) in [
            (r#""hunter2-supersecret""#, "found a JSON string"),
            (r#"["hunter2-supersecret"]"#, "found an array"),
            ("4242424242", "found a number"),
            ("null", "found null"),
            (
                r#"{"BITBUCKET_PASSWORD": "hunter2-supersecret""#,
                "not valid JSON",
            ),
            (
                r#"{"hunter2-supersecret": "x"}"#,
                "a key that is not a variable name",
            ),
            (
                r#"{"BITBUCKET_PASSWORD": ["hunter2-supersecret"]}"#,
                "must be a string",
            ),
        ] {
            let text = overlay_secrets(&mut vars, secret).unwrap_err().to_string();
            assert!(text.contains(found), "{secret}: {text}");
            assert!(text.contains(SECRETS_ARN_VARIABLE), "{text}");
            assert!(
                !text.contains("hunter2") && !text.contains("4242"),
                "{text}"
            );
        }
    }

    #[test]
    fn malformed_urls_are_quoted_without_credentials_or_query() {
        for (raw, kept) in [
            ("https://ci:pa ss-supersecret@bitbucket.example.com", ""),
            (
                "ci:supersecret@bitbucket.example.com",
                "@bitbucket.example.com",
            ),
            (
                "https://ci:pass/supersecret@bb.example.com/x",
                "https://***@bb.example.com/x",
            ),
            (
                "https://ci:supersecret@bb example.com",
                "https://***@bb example.com",
            ),
            (
                "htps://bb.example.com/?token=supersecret#x",
                "htps://bb.example.com/?***",
            ),
            ("bitbucket.example.com", "got `bitbucket.example.com`"),
        ] {
            let err = config(&[("BITBUCKET_URL", raw)]).unwrap_err();
            let text = err.to_string();
            assert_eq!(err.0[0].variable, "BITBUCKET_URL", "{text}");
            assert!(!text.contains("supersecret"), "{raw}: {text}");
            assert!(text.contains(kept), "{raw}: {text}");
        }
    }

    /// A public root (ISRG Root X2), only ever parsed here.
    const PEM: &str = "-----BEGIN CERTIFICATE-----
MIICGzCCAaGgAwIBAgIQQdKd0XLq7qeAwSxs6S+HUjAKBggqhkjOPQQDAzBPMQsw
CQYDVQQGEwJVUzEpMCcGA1UEChMgSW50ZXJuZXQgU2VjdXJpdHkgUmVzZWFyY2gg
R3JvdXAxFTATBgNVBAMTDElTUkcgUm9vdCBYMjAeFw0yMDA5MDQwMDAwMDBaFw00
MDA5MTcxNjAwMDBaME8xCzAJBgNVBAYTAlVTMSkwJwYDVQQKEyBJbnRlcm5ldCBT
ZWN1cml0eSBSZXNlYXJjaCBHcm91cDEVMBMGA1UEAxMMSVNSRyBSb290IFgyMHYw
EAYHKoZIzj0CAQYFK4EEACIDYgAEzZvVn4CDCuwJSvMWSj5cz3es3mcFDR0HttwW
+1qLFNvicWDEukWVEYmO6gbf9yoWHKS5xcUy4APgHoIYOIvXRdgKam7mAHf7AlF9
ItgKbppbd9/w+kHsOdx1ymgHDB/qo0IwQDAOBgNVHQ8BAf8EBAMCAQYwDwYDVR0T
AQH/BAUwAwEB/zAdBgNVHQ4EFgQUfEKWrt5LSDv6kviejM9ti6lyN5UwCgYIKoZI
zj0EAwMDaAAwZQIwe3lORlCEwkSHRhtFcP9Ymd70/aTSVaYgLXTWNLxBo1BfASdW
tL4ndQavEi51mI38AjEAi/V3bNTIZargCyzuFJ0nN6T5U6VR5CmD1/iQMVtCnwr1
/q4AaOeMSQ+2b1tbFfLn
-----END CERTIFICATE-----
";

    #[test]
    fn ca_certificate_variables_are_checked_and_named() {
        let dir = std::env::temp_dir().join(format!("kitebridge-ca-{}", ulid::Ulid::new()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.pem");
        std::fs::write(&good, PEM).unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let missing = dir.join("missing.pem");
        let path = |p: &std::path::Path| p.display().to_string();
        let check = |pairs: &[(&str, String)]| {
            ca_certificate_problems(|n| pairs.iter().find(|(k, _)| *k == n).map(|(_, v)| v.clone()))
        };

        assert_eq!(check(&[]), vec![]);
        assert_eq!(check(&[(CA_FILE_VARIABLE, path(&good))]), vec![]);
        assert_eq!(check(&[(CA_DIR_VARIABLE, path(&dir))]), vec![]);
        for (value, says) in [
            (path(&missing), "cannot read the CA bundle"),
            (path(&dir), "cannot read the CA bundle"),
            (path(&junk), "holds no PEM certificate"),
            (" ".to_string(), "set but empty"),
        ] {
            let problems = check(&[(CA_FILE_VARIABLE, value.clone())]);
            assert_eq!(problems.len(), 1, "{value}: {problems:?}");
            assert_eq!(problems[0].variable, "SSL_CERT_FILE");
            assert!(problems[0].problem.contains(says), "{problems:?}");
        }
        let problems = check(&[(
            CA_DIR_VARIABLE,
            format!("{}:{}", path(&dir), path(&missing)),
        )]);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].variable, "SSL_CERT_DIR");
        assert!(
            problems[0].problem.contains(&path(&missing)),
            "{problems:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
