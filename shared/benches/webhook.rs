//! The webhook's CPU path per delivery: verify the signature over the raw body, parse the event,
//! map the build to a commit status and build the Bitbucket request (`status_record`), for each
//! example payload. Throughput is reported as deliveries per second on one core.
//!
//! Run: `CARGO_TARGET_DIR=/work/main/target cargo bench -p kitebridge --bench webhook`

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kitebridge::bitbucket::ApiKind;
use kitebridge::buildkite::model::{Event, WebhookPayload};
use kitebridge::buildkite::webhook::{DEFAULT_MAX_SKEW, sign, verify};
use kitebridge::config::Secret;
use kitebridge::report::status_record;
use url::Url;

const TOKEN: &str = "bk-example-webhook-token-8f3a2c";
const NOW: i64 = 1_741_687_781;

/// The example payloads of `tests/fixtures/webhooks`, plus a `ping`.
const PAYLOADS: &[(&str, &str)] = &[
    (
        "build.scheduled",
        include_str!("../../tests/fixtures/webhooks/build.scheduled.json"),
    ),
    (
        "build.running",
        include_str!("../../tests/fixtures/webhooks/build.running.json"),
    ),
    (
        "build.finished.passed",
        include_str!("../../tests/fixtures/webhooks/build.finished.passed.json"),
    ),
    (
        "build.finished.failed",
        include_str!("../../tests/fixtures/webhooks/build.finished.failed.json"),
    ),
    (
        "build.finished.blocked",
        include_str!("../../tests/fixtures/webhooks/build.finished.blocked.json"),
    ),
];

const PING: &str = r#"{"event":"ping","service":{"id":"c9f8372d-c0cd-43dc-9274-768a875cf6ca","provider":"webhook","settings":{"url":"https://kitebridge.example/webhooks/buildkite"}},"organization":{"id":"49801950-1df0-474f-bb56-ad6a930c5cb9","url":"https://api.buildkite.com/v2/organizations/acme-inc","web_url":"https://buildkite.com/acme-inc","name":"ACME Inc","slug":"acme-inc"},"sender":{"id":"c9f8372d-c0cd-43dc-9269-bcbb7f308e3f","name":"ACME Man"}}"#;

/// The examples' pipeline lives on GitHub; point it at a Bitbucket Data Center so the whole
/// path (request building included) runs.
fn on_bitbucket(body: &str) -> Vec<u8> {
    body.replace(
        "git@github.com:acme-inc/web-app.git",
        "ssh://git@bitbucket.example.com:7999/web/app.git",
    )
    .into_bytes()
}

/// The whole CPU path of one delivery; returns something so nothing is optimised away.
fn deliver(body: &[u8], header: &str, tokens: &[Secret], api: &ApiKind, base: &Url) -> usize {
    let verified = verify(Some(header), None, body, tokens, NOW, DEFAULT_MAX_SKEW);
    assert!(verified.is_ok(), "the bench signs its own bodies");
    match Event::parse(body) {
        Ok(Event::Build(p)) => {
            let org = p.organization_slug();
            match status_record(&p.build, Some(&p.pipeline), org.as_deref(), api, base) {
                Ok(record) => record.commit.len(),
                Err(skip) => panic!("not reportable: {skip}"),
            }
        }
        Ok(Event::Ping) => 1,
        Ok(Event::Other(_)) => 2,
        Err(e) => panic!("{e}"),
    }
}

fn bench(c: &mut Criterion) {
    let tokens = [Secret::new(TOKEN)];
    let rotating = [Secret::new("whk-new-token-d04a77"), Secret::new(TOKEN)];
    let api = ApiKind::Repository { cancelled: true };
    let base = Url::parse("https://bitbucket.example.com").expect("url");

    let mut inputs: Vec<(&str, Vec<u8>)> = PAYLOADS
        .iter()
        .map(|(name, body)| (*name, on_bitbucket(body)))
        .collect();
    inputs.push(("ping", PING.as_bytes().to_vec()));

    let mut group = c.benchmark_group("webhook");
    group.throughput(Throughput::Elements(1));
    for (name, body) in &inputs {
        let header = sign(TOKEN, NOW, body);
        group.bench_function(format!("verify+parse+map/{name}"), |b| {
            b.iter(|| deliver(black_box(body), black_box(&header), &tokens, &api, &base))
        });
    }
    // The stages apart, on the largest build payload.
    let (_, body) = &inputs[2];
    let header = sign(TOKEN, NOW, body);
    group.bench_function("stage/verify", |b| {
        b.iter(|| {
            verify(
                Some(black_box(&header)),
                None,
                black_box(body),
                &tokens,
                NOW,
                DEFAULT_MAX_SKEW,
            )
        })
    });
    group.bench_function("stage/verify-two-tokens", |b| {
        b.iter(|| {
            verify(
                Some(black_box(&header)),
                None,
                black_box(body),
                &rotating,
                NOW,
                DEFAULT_MAX_SKEW,
            )
        })
    });
    group.bench_function("stage/parse", |b| b.iter(|| Event::parse(black_box(body))));
    // Where parsing spends its time: the JSON tree alone, and a typed parse straight from the
    // bytes (no intermediate tree, no path tracking). Not kitebridge's path; for comparison.
    group.bench_function("stage/parse-json-tree-only", |b| {
        b.iter(|| serde_json::from_slice::<serde_json::Value>(black_box(body)))
    });
    group.bench_function("stage/parse-typed-from-bytes", |b| {
        b.iter(|| serde_json::from_slice::<WebhookPayload>(black_box(body)))
    });
    let Ok(Event::Build(payload)) = Event::parse(body) else {
        panic!("a build event");
    };
    let org = payload.organization_slug();
    group.bench_function("stage/map+request", |b| {
        b.iter(|| {
            status_record(
                black_box(&payload.build),
                Some(&payload.pipeline),
                org.as_deref(),
                &api,
                &base,
            )
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
