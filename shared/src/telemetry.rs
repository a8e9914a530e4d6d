//! Structured logging with `tracing`. Secrets are kept out by construction: they are
//! [`crate::config::Secret`]s, whose `Debug` is redacted, and no code logs request headers.

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, MonitorConfig};

/// Installs the global subscriber. Safe to call more than once (later calls do nothing), so tests
/// and binaries can both call it.
pub fn init(monitor: &MonitorConfig) {
    let filter = EnvFilter::try_new(&monitor.log_filter).unwrap_or_else(|_| EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match monitor.log_format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Text => builder.with_ansi(false).try_init(),
    };
}

/// On Lambda, prints one CloudWatch Embedded Metric Format line counting `metric` once in
/// namespace `kitebridge`, dimension `Function` (see `docs/aws.md`); `fields` (an object) are
/// kept as searchable log fields. Elsewhere it does nothing: `serve` and `poll` say the same in
/// their logs.
pub fn emit_count(metric: &str, fields: serde_json::Value) {
    let Ok(function) = std::env::var("AWS_LAMBDA_FUNCTION_NAME") else {
        return;
    };
    println!(
        "{}",
        emf_line(metric, &function, chrono::Utc::now(), fields)
    );
}

fn emf_line(
    metric: &str,
    function: &str,
    at: chrono::DateTime<chrono::Utc>,
    fields: serde_json::Value,
) -> serde_json::Value {
    let mut line = serde_json::json!({
        "_aws": {
            "Timestamp": at.timestamp_millis(),
            "CloudWatchMetrics": [{
                "Namespace": "kitebridge",
                "Dimensions": [["Function"]],
                "Metrics": [{"Name": metric, "Unit": "Count"}],
            }],
        },
    });
    if let (Some(obj), serde_json::Value::Object(extra)) = (line.as_object_mut(), fields) {
        obj.extend(extra);
        obj.insert("Function".into(), function.into());
        obj.insert(metric.into(), 1.into());
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_emf_line_counts_one_metric_by_function() {
        let at = chrono::DateTime::from_timestamp_millis(1_764_064_800_000).unwrap();
        let line = emf_line(
            "StatusAbandoned",
            "kitebridge-Poller",
            at,
            serde_json::json!({"commit": "abc"}),
        );
        assert_eq!(line["_aws"]["Timestamp"], 1_764_064_800_000i64);
        assert_eq!(
            line["_aws"]["CloudWatchMetrics"][0]["Metrics"][0]["Name"],
            "StatusAbandoned"
        );
        assert_eq!(line["Function"], "kitebridge-Poller");
        assert_eq!(line["StatusAbandoned"], 1);
        assert_eq!(line["commit"], "abc");
    }
}
