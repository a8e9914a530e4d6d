//! The Lambda path of the webhook: API Gateway events (HTTP API payload format 2.0, and 1.0)
//! as JSON, deserialized by `lambda_http` and run through `lambda_http::Adapter` (what
//! `lambda_http::run(router)` in `functions/webhook` wraps around the router) into kitebridge's
//! real router; the Lambda response is then serialized as the runtime would send it back.

#[path = "webhook_support.rs"]
mod webhook_support;

use base64::Engine as _;
use kitebridge_fakes::{BuildState, WebhookAuth, WebhookDelivery, WebhookEvent};
use lambda_http::request::LambdaRequest;
use lambda_http::{Adapter, Context, LambdaEvent, Service};
use serde_json::{Map, Value, json};
use webhook_support::*;

fn header_map(d: &WebhookDelivery) -> Map<String, Value> {
    // API Gateway lower-cases header names in payload 2.0.
    d.headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), json!(v)))
        .collect()
}

fn body_field(d: &WebhookDelivery, base64: bool) -> Value {
    if base64 {
        json!(base64::engine::general_purpose::STANDARD.encode(d.body.as_bytes()))
    } else {
        json!(d.body)
    }
}

/// An API Gateway HTTP API (payload format 2.0) event for `d`.
fn v2_event(method: &str, d: &WebhookDelivery, base64: bool) -> String {
    json!({
        "version": "2.0",
        "routeKey": "POST /webhooks/buildkite",
        "rawPath": "/webhooks/buildkite",
        "rawQueryString": "",
        "headers": header_map(d),
        "requestContext": {
            "accountId": "123456789012",
            "apiId": "abc123",
            "domainName": "abc123.execute-api.eu-west-1.amazonaws.com",
            "domainPrefix": "abc123",
            "http": {
                "method": method,
                "path": "/webhooks/buildkite",
                "protocol": "HTTP/1.1",
                "sourceIp": "203.0.113.7",
                "userAgent": "Buildkite-Request"
            },
            "requestId": "req-1",
            "routeKey": "POST /webhooks/buildkite",
            "stage": "$default",
            "time": "11/Mar/2025:10:02:03 +0000",
            "timeEpoch": 1741687323000u64
        },
        "body": body_field(d, base64),
        "isBase64Encoded": base64
    })
    .to_string()
}

/// The same request in payload format 1.0 (HTTP API with format 1.0, `$default` stage).
fn v1_event(method: &str, d: &WebhookDelivery, base64: bool) -> String {
    let headers: Map<String, Value> = d
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    let multi: Map<String, Value> = d
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), json!([v])))
        .collect();
    json!({
        "version": "1.0",
        "resource": "/webhooks/buildkite",
        "path": "/webhooks/buildkite",
        "httpMethod": method,
        "headers": headers,
        "multiValueHeaders": multi,
        "queryStringParameters": null,
        "multiValueQueryStringParameters": null,
        "requestContext": {
            "accountId": "123456789012",
            "apiId": "abc123",
            "domainName": "abc123.execute-api.eu-west-1.amazonaws.com",
            "domainPrefix": "abc123",
            "extendedRequestId": "ext-1",
            "httpMethod": method,
            "identity": {"sourceIp": "203.0.113.7", "userAgent": "Buildkite-Request"},
            "path": "/webhooks/buildkite",
            "protocol": "HTTP/1.1",
            "requestId": "req-1",
            "requestTime": "11/Mar/2025:10:02:03 +0000",
            "requestTimeEpoch": 1741687323000u64,
            "resourceId": "POST /webhooks/buildkite",
            "resourcePath": "/webhooks/buildkite",
            "stage": "$default"
        },
        "pathParameters": null,
        "stageVariables": null,
        "body": body_field(d, base64),
        "isBase64Encoded": base64
    })
    .to_string()
}

/// Runs one API Gateway event through `lambda_http` into the router; returns the Lambda
/// response as the runtime would serialize it (`statusCode`, `headers`, `body`, ...).
async fn invoke(env: &Env, event: &str) -> (u16, Value) {
    let request: LambdaRequest = serde_json::from_str(event).expect("an API Gateway event");
    let mut adapter = Adapter::from(env.router());
    let response = adapter
        .call(LambdaEvent::new(request, Context::default()))
        .await
        .expect("the router is infallible");
    let wire = serde_json::to_value(&response).expect("serializable response");
    let status = wire["statusCode"].as_u64().expect("statusCode") as u16;
    let body = wire["body"].as_str().unwrap_or("");
    let body: Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("answer body is not JSON ({e}): {wire}"));
    (status, body)
}

#[tokio::test]
async fn api_gateway_v2_and_v1_events_reach_the_webhook() {
    let env = Env::start().await;
    type Shape = fn(&str, &WebhookDelivery, bool) -> String;
    let shapes: [(&str, Shape); 2] = [("2.0", v2_event), ("1.0", v1_event)];
    for (version, shape) in shapes {
        for base64 in [false, true] {
            let what = format!("payload {version}, base64 {base64}");

            // A signed build.finished: 200 and posted to Bitbucket.
            let build = env.new_build(BuildState::Passed);
            let d = env.delivery(&build, WebhookEvent::BuildFinished, &signed());
            let (status, body) = invoke(&env, &shape("POST", &d, base64)).await;
            assert_eq!(status, 200, "{what}: {body}");
            assert_eq!(body["status"], "posted", "{what}");
            assert_eq!(
                env.bb.status(&build.commit, KEY).expect("posted").state,
                "SUCCESSFUL",
                "{what}"
            );

            // Token mode works the same way.
            let build = env.new_build(BuildState::Running);
            let d = env.delivery(
                &build,
                WebhookEvent::BuildRunning,
                &WebhookAuth::Token(OLD_TOKEN.into()),
            );
            let (status, _) = invoke(&env, &shape("POST", &d, base64)).await;
            assert_eq!(status, 200, "{what}");

            // A forged one: 401 JSON, nothing posted.
            let build = env.new_build(BuildState::Failed);
            let forged = env.delivery(
                &build,
                WebhookEvent::BuildFinished,
                &WebhookAuth::Token("guessed".into()),
            );
            let (status, body) = invoke(&env, &shape("POST", &forged, base64)).await;
            assert_eq!(status, 401, "{what}: {body}");
            assert_eq!(body["error"], "unauthorized", "{what}");
            assert!(env.bb.status(&build.commit, KEY).is_none(), "{what}");

            // A signed body altered in transit: 401 (the signature covers the decoded bytes).
            let mut tampered = env.delivery(&build, WebhookEvent::BuildFinished, &signed());
            tampered.body = tampered.body.replace("\"failed\"", "\"passed\"");
            let (status, _) = invoke(&env, &shape("POST", &tampered, base64)).await;
            assert_eq!(status, 401, "{what}");

            // ping: 200; another method: 405.
            let ping = env.bk.ping_webhook(ORG, "https://x.example/", &signed());
            assert_eq!(
                invoke(&env, &shape("POST", &ping, base64)).await.0,
                200,
                "{what}"
            );
            let (status, body) = invoke(&env, &shape("GET", &ping, base64)).await;
            assert_eq!(status, 405, "{what}: {body}");
        }
    }
}
