//! AWS Lambda: the Buildkite webhook receiver behind API Gateway (HTTP API).

use kitebridge::config::Role;

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    let state = kitebridge::bootstrap::lambda_or_exit(Role::Webhook).await;
    lambda_http::run(kitebridge::http::router(state)).await
}
