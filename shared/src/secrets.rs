//! AWS Secrets Manager: one secret, a JSON object of secret variables, read once at cold start.

use crate::Error;

/// Fetches the secret string of `secret_id` (an ARN or a name) through `client` (built from the
/// standard AWS configuration chain: the function's role on Lambda;
/// `AWS_ENDPOINT_URL_SECRETS_MANAGER` is honoured for local runs).
pub async fn fetch_with(
    client: &aws_sdk_secretsmanager::Client,
    secret_id: &str,
) -> Result<String, Error> {
    let out = client
        .get_secret_value()
        .secret_id(secret_id)
        .send()
        .await
        // The SDK error names the operation and the service's message; it never holds the value.
        .map_err(|e| {
            Error::Secrets(aws_sdk_secretsmanager::error::DisplayErrorContext(e).to_string())
        })?;
    out.secret_string().map(str::to_string).ok_or_else(|| {
        Error::Secrets(format!(
            "secret {secret_id} has no string value (binary secrets are not supported)"
        ))
    })
}
