//! `openapi.yaml` and the router agree: every operation the spec describes is answered by the
//! real router (not its "no such route" 404, not 405), every other method on a described path
//! is 405, the releases module's route table is described, and paths next to the described ones
//! are not served without being described.

use std::collections::{BTreeMap, BTreeSet};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use kitebridge::config::Config;
use kitebridge::store::{SqliteKv, Store};
use serde_json::Value;
use tower::ServiceExt;

const METHODS: [&str; 5] = ["get", "put", "post", "patch", "delete"];
const API_TOKEN: &str = "openapi-test-token";

/// (path template, methods) from the spec.
fn spec_operations() -> BTreeMap<String, BTreeSet<String>> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../openapi.yaml");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    let spec: Value =
        serde_norway::from_str(&text).unwrap_or_else(|e| panic!("parsing {path}: {e}"));
    assert_eq!(spec["openapi"].as_str(), Some("3.1.0"));
    let paths = spec["paths"].as_object().expect("`paths` is a map");
    paths
        .iter()
        .map(|(p, item)| {
            let methods = item
                .as_object()
                .expect("a path item is a map")
                .keys()
                .filter(|k| {
                    METHODS.contains(&k.as_str())
                        || ["head", "options", "trace"].contains(&k.as_str())
                })
                .cloned()
                .collect();
            (p.clone(), methods)
        })
        .collect()
}

/// A concrete URL for a path template.
fn fill(template: &str) -> String {
    template
        .split('/')
        .map(|seg| match seg {
            "{project}" => "web",
            "{environment}" => "staging",
            "{version}" => "1.0.0",
            "{id}" => "01J0000000000000000000000",
            s if s.starts_with('{') => "x",
            s => s,
        })
        .collect::<Vec<_>>()
        .join("/")
}

fn router() -> Router {
    let vars = [
        ("BUILDKITE_API_TOKEN", "bk"),
        ("BUILDKITE_API_URL", "http://127.0.0.1:9"),
        ("BUILDKITE_WEBHOOK_TOKEN", "whk"),
        ("KITEBRIDGE_API_TOKEN", API_TOKEN),
    ];
    let config = Config::from_lookup(|n| {
        vars.iter()
            .find(|(k, _)| *k == n)
            .map(|(_, v)| v.to_string())
    })
    .expect("config");
    let store = Store::new(SqliteKv::in_memory().expect("sqlite"));
    let state = kitebridge::bootstrap::app_state(config, store).expect("state");
    kitebridge::http::router(state)
}

/// Whether `url` is an instance of `template` (each `{param}` stands for one segment).
fn matches_template(template: &str, url: &str) -> bool {
    let t: Vec<&str> = template.split('/').collect();
    let u: Vec<&str> = url.split('/').collect();
    t.len() == u.len()
        && t.iter()
            .zip(&u)
            .all(|(t, u)| (t.starts_with('{') && !u.is_empty()) || t == u)
}

/// Whether the router has a route for this request: not its fallback's "no such route" 404,
/// not a 405.
async fn answers(app: &Router, method: &str, path: &str) -> (bool, StatusCode) {
    let req = Request::builder()
        .method(method.to_ascii_uppercase().as_str())
        .uri(path)
        .header("authorization", format!("Bearer {API_TOKEN}"))
        .header("content-type", "application/json")
        .body(Body::from("{}"))
        .expect("request");
    let resp = app.clone().oneshot(req).await.expect("infallible");
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap_or_default();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let fallback = status == StatusCode::NOT_FOUND
        && body["error"] == "not_found"
        && body["message"] == "no such route";
    (
        !fallback && status != StatusCode::METHOD_NOT_ALLOWED,
        status,
    )
}

#[tokio::test]
async fn every_described_operation_is_served_and_nothing_else() {
    let spec = spec_operations();
    let app = router();
    let mut problems = Vec::new();
    for (template, methods) in &spec {
        let url = fill(template);
        for m in METHODS {
            let (served, status) = answers(&app, m, &url).await;
            let described = methods.contains(m);
            if described && !served {
                problems.push(format!(
                    "{} {template}: described but not served ({status})",
                    m.to_uppercase()
                ));
            }
            if !described && served {
                problems.push(format!(
                    "{} {template}: served ({status}) but not described",
                    m.to_uppercase()
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "openapi.yaml and the router disagree:\n{}",
        problems.join("\n")
    );
}

#[tokio::test]
async fn the_releases_route_table_is_described() {
    let spec = spec_operations();
    for (method, path) in kitebridge::http::releases::ROUTES {
        assert!(
            spec.get(*path).is_some_and(|m| m.contains(*method)),
            "{} {path} is served by http::releases but not in openapi.yaml",
            method.to_uppercase()
        );
    }
}

/// Paths a route could plausibly be added at (parents and children of the described ones, and
/// the other prefixes the AWS template sends to the functions) must not be served unless
/// described.
#[tokio::test]
async fn undescribed_neighbours_are_not_served() {
    let spec = spec_operations();
    let app = router();
    let mut candidates: BTreeSet<String> = [
        "/",
        "/projects",
        "/rules",
        "/rules/x",
        "/webhooks",
        "/webhooks/bitbucket",
        "/metrics",
        "/health",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for template in spec.keys() {
        let url = fill(template);
        candidates.insert(format!("{url}/x"));
        if let Some((parent, _)) = url.rsplit_once('/')
            && !parent.is_empty()
        {
            candidates.insert(parent.to_string());
        }
    }
    let mut problems = Vec::new();
    for url in candidates
        .iter()
        .filter(|u| !spec.keys().any(|t| matches_template(t, u)))
    {
        for m in METHODS {
            let (served, status) = answers(&app, m, url).await;
            if served {
                problems.push(format!(
                    "{} {url}: served ({status}) but not described",
                    m.to_uppercase()
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "routes missing from openapi.yaml:\n{}",
        problems.join("\n")
    );
}
