//! AWS Lambda: one poll-and-report cycle per EventBridge scheduled event.

use kitebridge::config::Role;
use lambda_runtime::{LambdaEvent, service_fn};

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    let state = kitebridge::bootstrap::lambda_or_exit(Role::Poller).await;
    let poller = state.poller.ok_or("the poller is not configured")?;
    let poller = &poller;
    lambda_runtime::run(service_fn(
        move |_event: LambdaEvent<serde_json::Value>| async move {
            // An error fails the invocation, so the dead-letter queue and the alarms see it.
            let summary = poller.cycle().await?;
            kitebridge::poll::emit_success_metric(&summary);
            Ok::<_, lambda_runtime::Error>(serde_json::to_value(&summary)?)
        },
    ))
    .await
}
