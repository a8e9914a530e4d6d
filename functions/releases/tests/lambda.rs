//! The real `releases` binary under a Lambda Runtime API emulator, behind API Gateway (HTTP
//! API, payload 2.0 events), with the DynamoDB emulator as its table and a fake Buildkite on
//! loopback: a project is configured, a cut triggers the release build with the `AVIATOR_*`
//! variables, a retried cut with the same Idempotency-Key is answered from the table without a
//! second build, and requests without the API token are refused with a JSON 401.

use std::path::Path;

use kitebridge_fakes::*;
use kitebridge_tests::lambda::Function;
use serde_json::json;

const API_TOKEN: &str = "releases-lambda-token-5f3a";
const SHA: &str = "4e1f0c9b7a2d3e5f6a8b9c0d1e2f3a4b5c6d7e8f";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_triggers_a_build_through_the_lambda_binary() {
    let bk = FakeBuildkite::start(FakeBuildkiteOptions::default()).await;
    for slug in ["web-release", "web-deploy"] {
        bk.add_pipeline(Pipeline::new(
            DEFAULT_ORGANIZATION,
            slug,
            slug,
            "ssh://git@bitbucket.example:7999/proj/web.git",
        ));
    }
    let mut settings = std::collections::HashMap::from(
        [
            ("BUILDKITE_API_URL", bk.url()),
            ("BUILDKITE_API_TOKEN", DEFAULT_BUILDKITE_TOKEN.to_string()),
            ("KITEBRIDGE_API_TOKEN", API_TOKEN.to_string()),
        ]
        .map(|(k, v)| (k.to_string(), v)),
    );
    settings.extend(kitebridge_tests::dynamodb_settings().await);

    let f = Function::start(
        Path::new(env!("CARGO_BIN_EXE_releases")),
        "releases",
        &settings,
    )
    .await;
    eprintln!("releases ready {:?} after process start", f.ready_after);
    let bearer = format!("Bearer {API_TOKEN}");
    let auth = [
        ("authorization", bearer.as_str()),
        ("content-type", "application/json"),
    ];

    // No token: refused, with a JSON message.
    let a = f.http("GET", "/projects/web", &[], None).await;
    assert_eq!(a.status, 401, "{:?}", a.body);
    assert!(a.body["message"].is_string(), "{:?}", a.body);

    let project = json!({
        "build_pipeline": {"organization": DEFAULT_ORGANIZATION, "pipeline": "web-release"},
        "version_scheme": "semver",
        "environments": [
            {"name": "staging",
             "deploy_pipeline": {"organization": DEFAULT_ORGANIZATION, "pipeline": "web-deploy"}}
        ]
    })
    .to_string();
    let a = f.http("PUT", "/projects/web", &auth, Some(&project)).await;
    assert_eq!(a.status, 201, "{:?}", a.body);

    // The cut: a release build on the build pipeline, with the Aviator variables.
    let cut = json!({"commit": SHA, "branch": "main", "version": "2.0.0"}).to_string();
    let keyed = [auth[0], auth[1], ("idempotency-key", "cut-2.0.0-attempt")];
    let a = f
        .http("POST", "/projects/web/releases", &keyed, Some(&cut))
        .await;
    assert_eq!(a.status, 201, "{:?}", a.body);
    let candidate = &a.body["candidate"];
    assert_eq!(candidate["version"], "2.0.0-rc1");
    assert_eq!(candidate["state"], "building");
    let builds = bk.created_builds();
    assert_eq!(builds.len(), 1, "{builds:?}");
    let b = &builds[0];
    assert_eq!(
        (b.pipeline.as_str(), b.commit.as_str()),
        ("web-release", SHA)
    );
    assert_eq!(b.env["AVIATOR_RELEASE_CUT_ID"], candidate["cut_id"]);
    assert_eq!(b.env["AVIATOR_RELEASE_CANDIDATE_VERSION"], "2.0.0-rc1");
    assert_eq!(b.env["AVIATOR_RELEASE_CUT_COMMIT_HASH"], SHA);

    // API Gateway or the client retries the cut: the same answer, no second build.
    let again = f
        .http("POST", "/projects/web/releases", &keyed, Some(&cut))
        .await;
    assert_eq!(again.status, 201, "{:?}", again.body);
    assert_eq!(again.body["candidate"]["cut_id"], candidate["cut_id"]);
    assert_eq!(bk.created_builds().len(), 1);

    // Read back from the table.
    let a = f
        .http("GET", "/projects/web/releases/2.0.0", &auth, None)
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["candidates"][0]["state"], "building");

    let stopped = f.stop();
    eprintln!("releases peak RSS {} KiB", stopped.peak_rss_kib);
    let output = stopped.output.join("\n");
    for secret in [API_TOKEN, DEFAULT_BUILDKITE_TOKEN] {
        assert!(
            !output.contains(secret),
            "a secret reached the logs:\n{output}"
        );
    }
}

/// A CA bundle that cannot be read is a start-up error naming `SSL_CERT_FILE` (not reqwest's
/// "builder error", nor a TLS failure while fetching the secret), reported to the Runtime API
/// although TLS cannot be set up; malformed URLs are quoted without their credentials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_ca_bundle_is_named_and_no_secret_is_echoed() {
    use kitebridge_tests::lambda::{LambdaProcess, RuntimeApi, lambda_environment};
    let api = RuntimeApi::start().await;
    let mut env = lambda_environment(&api, "releases");
    env.extend(
        [
            ("KITEBRIDGE_TABLE", "kitebridge"),
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:9"),
            (
                "KITEBRIDGE_SECRETS_ARN",
                "arn:aws:secretsmanager:us-east-1:123456789012:secret:kitebridge",
            ),
            ("SSL_CERT_FILE", "/nonexistent/kitebridge/ca-bundle.pem"),
            ("BUILDKITE_API_TOKEN", "bk-token-do-not-log"),
            ("KITEBRIDGE_API_TOKEN", API_TOKEN),
            // Refused as credentials in a URL, and unparsable (so quoted, redacted).
            (
                "BITBUCKET_URL",
                "https://svc:pa ss-do-not-log@bitbucket.example.com",
            ),
            (
                "BUILDKITE_API_URL",
                "https://svc:pass/do-not-log@[api.buildkite.example",
            ),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    let mut process = LambdaProcess::spawn(Path::new(env!("CARGO_BIN_EXE_releases")), &env);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(status) = process.exited() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "it kept running");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), Some(1));
    assert!(api.first_next().is_none(), "it asked for events");
    let report = api
        .init_error()
        .expect("an init error reported to the Runtime API");
    assert_eq!(
        report["errorType"], "Runtime.ConfigurationError",
        "{report}"
    );
    let message = report["errorMessage"].as_str().unwrap_or_default();
    let output = process.stop().output.join("\n");
    for text in [message, output.as_str()] {
        assert!(
            text.contains("SSL_CERT_FILE: cannot read the CA bundle"),
            "{text}"
        );
        assert!(text.contains("BITBUCKET_URL"), "{text}");
        assert!(text.contains("BUILDKITE_API_URL"), "{text}");
        assert!(!text.contains("builder error"), "{text}");
        assert!(!text.contains("do-not-log"), "a secret was echoed: {text}");
        assert!(!text.contains(API_TOKEN), "a secret was echoed: {text}");
    }
}

/// A browser request through API Gateway (payload 2.0): cookies travel in the event's
/// `cookies` array (API Gateway takes them out of the headers), and come back in the
/// response's `cookies` array.
async fn browse(
    f: &Function,
    method: &str,
    path: &str,
    cookies: &[String],
    form: Option<&str>,
) -> (u16, Vec<String>, String, Option<String>) {
    let headers: Vec<(&str, &str)> = match form {
        Some(_) => vec![("content-type", "application/x-www-form-urlencoded")],
        None => vec![],
    };
    let mut event = kitebridge_tests::lambda::http_api_event(method, path, &headers, form);
    if !cookies.is_empty() {
        event["cookies"] = json!(cookies);
    }
    let response = f.invoke(&event).await.expect_response(path);
    let answer = kitebridge_tests::lambda::HttpAnswer::from_lambda(&response);
    let set: Vec<String> = response["cookies"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let location = answer.header("location").map(str::to_owned);
    let body = match answer.body {
        serde_json::Value::String(s) => s,
        other => other.to_string(),
    };
    (answer.status, set, body, location)
}

/// `name=value` of the cookie `name` among `Set-Cookie` values.
fn cookie<'a>(set: &'a [String], name: &str) -> &'a str {
    set.iter()
        .find(|c| c.starts_with(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name} cookie set: {set:?}"))
}

fn pair(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap().to_string()
}

fn csrf_of(html: &str) -> String {
    let at = html
        .find("name=\"csrf\" value=\"")
        .unwrap_or_else(|| panic!("no CSRF token in the page:\n{html}"));
    let rest = &html[at + "name=\"csrf\" value=\"".len()..];
    rest[..rest.find('"').unwrap()].to_string()
}

/// The dashboard through the real `releases` binary behind API Gateway: signing in sets a
/// `Secure` session cookie (API Gateway is never loopback), the project page reads the table,
/// a cut from the page triggers the release build, and a form without its CSRF token does
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_signs_in_and_cuts_through_the_lambda_binary() {
    let bk = FakeBuildkite::start(FakeBuildkiteOptions::default()).await;
    bk.add_pipeline(Pipeline::new(
        DEFAULT_ORGANIZATION,
        "web-release",
        "web-release",
        "ssh://git@bitbucket.example:7999/proj/web.git",
    ));
    let mut settings = std::collections::HashMap::from(
        [
            ("BUILDKITE_API_URL", bk.url()),
            ("BUILDKITE_API_TOKEN", DEFAULT_BUILDKITE_TOKEN.to_string()),
            ("KITEBRIDGE_API_TOKEN", API_TOKEN.to_string()),
        ]
        .map(|(k, v)| (k.to_string(), v)),
    );
    settings.extend(kitebridge_tests::dynamodb_settings().await);
    let f = Function::start(
        Path::new(env!("CARGO_BIN_EXE_releases")),
        "releases",
        &settings,
    )
    .await;
    let bearer = format!("Bearer {API_TOKEN}");
    let project = json!({
        "build_pipeline": {"organization": DEFAULT_ORGANIZATION, "pipeline": "web-release"},
        "environments": [{"name": "staging"}]
    })
    .to_string();
    let a = f
        .http(
            "PUT",
            "/projects/web",
            &[
                ("authorization", &bearer),
                ("content-type", "application/json"),
            ],
            Some(&project),
        )
        .await;
    assert_eq!(a.status, 201, "{:?}", a.body);

    // Signed out: to the sign-in page, and back afterwards.
    let (status, _, _, location) = browse(&f, "GET", "/ui/projects/web", &[], None).await;
    assert_eq!(status, 303);
    assert_eq!(
        location.as_deref(),
        Some("/ui/sign-in?next=%2Fui%2Fprojects%2Fweb")
    );
    let (status, set, page, _) = browse(&f, "GET", "/ui/sign-in", &[], None).await;
    assert_eq!(status, 200, "{page}");
    let pre = cookie(&set, "kb_pre");
    assert!(pre.contains("Secure") && pre.contains("HttpOnly"), "{pre}");
    let csrf = csrf_of(&page);

    // A wrong token: refused, no session.
    let wrong = format!("csrf={csrf}&token=nope&next=%2Fui%2Fprojects%2Fweb");
    let (status, set, _, _) = browse(&f, "POST", "/ui/sign-in", &[pair(pre)], Some(&wrong)).await;
    assert_eq!(status, 401);
    assert!(!set.iter().any(|c| c.starts_with("kb_session=")), "{set:?}");

    let form = format!("csrf={csrf}&token={API_TOKEN}&next=%2Fui%2Fprojects%2Fweb");
    let (status, set, _, location) =
        browse(&f, "POST", "/ui/sign-in", &[pair(pre)], Some(&form)).await;
    assert_eq!(status, 303);
    assert_eq!(location.as_deref(), Some("/ui/projects/web"));
    let session = cookie(&set, "kb_session");
    for flag in ["HttpOnly", "SameSite=Strict", "Secure", "Path=/ui"] {
        assert!(session.contains(flag), "{session} lacks {flag}");
    }
    let jar = vec![pair(session)];

    let (status, _, page, _) = browse(&f, "GET", "/ui/projects/web", &jar, None).await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("data-environment=\"staging\""), "{page}");
    let csrf = csrf_of(&page);

    // A cut without the CSRF token does nothing; with it, the release build starts.
    let cut = format!("commit={SHA}&branch=main&version=&bump=minor");
    let (status, _, _, _) = browse(&f, "POST", "/ui/projects/web/cut", &jar, Some(&cut)).await;
    assert_eq!(status, 403);
    assert!(bk.created_builds().is_empty());
    let cut = format!("csrf={csrf}&{cut}");
    let (status, set, _, location) =
        browse(&f, "POST", "/ui/projects/web/cut", &jar, Some(&cut)).await;
    assert_eq!(status, 303);
    assert_eq!(location.as_deref(), Some("/ui/projects/web"));
    assert!(cookie(&set, "kb_flash").contains("Secure"));
    let builds = bk.created_builds();
    assert_eq!(builds.len(), 1, "{builds:?}");
    assert_eq!(
        builds[0].env["AVIATOR_RELEASE_CANDIDATE_VERSION"],
        "0.1.0-rc1"
    );
    let mut with_flash = jar.clone();
    with_flash.push(pair(cookie(&set, "kb_flash")));
    let (status, _, page, _) = browse(&f, "GET", "/ui/projects/web", &with_flash, None).await;
    assert_eq!(status, 200);
    assert!(page.contains("candidate 0.1.0-rc1 is building"), "{page}");
    assert!(page.contains("data-candidate=\"0.1.0-rc1\""), "{page}");

    let output = f.stop().output.join("\n");
    for secret in [API_TOKEN, DEFAULT_BUILDKITE_TOKEN, csrf.as_str()] {
        assert!(
            !output.contains(secret),
            "a secret reached the logs:\n{output}"
        );
    }
}

/// With IAM authorization and no dashboard token, the dashboard is closed: it says so and signs
/// nobody in (not even with the API token, which IAM does not use).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_iam_without_a_dashboard_token_the_dashboard_is_closed() {
    let mut settings = std::collections::HashMap::from(
        [
            ("KITEBRIDGE_API_AUTH", "iam"),
            ("KITEBRIDGE_API_TOKEN", API_TOKEN),
            ("BUILDKITE_API_TOKEN", DEFAULT_BUILDKITE_TOKEN),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    settings.extend(kitebridge_tests::dynamodb_settings().await);
    let f = Function::start(
        Path::new(env!("CARGO_BIN_EXE_releases")),
        "releases",
        &settings,
    )
    .await;
    let (status, set, page, _) = browse(&f, "GET", "/ui/sign-in", &[], None).await;
    assert_eq!(status, 200);
    assert!(page.contains("The dashboard is closed"), "{page}");
    assert!(!page.contains("id=\"sign-in\""), "{page}");
    let pre = pair(cookie(&set, "kb_pre"));
    let form = format!("csrf=&token={API_TOKEN}");
    let (status, set, _, _) = browse(&f, "POST", "/ui/sign-in", &[pre], Some(&form)).await;
    assert_eq!(status, 403);
    assert!(!set.iter().any(|c| c.starts_with("kb_session=")), "{set:?}");
    f.stop();
}
