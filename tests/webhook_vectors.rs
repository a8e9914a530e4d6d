//! The Buildkite webhook vectors (copied into `tests/fixtures/`): every signature case is
//! verified as the vector expects, and every example payload is parsed and mapped to the commit
//! status each Bitbucket API would get.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kitebridge::bitbucket::request::{ApiKind, BitbucketState, build_request, state_for};
use kitebridge::buildkite::model::{Event, PayloadError, WebhookPayload};
use kitebridge::buildkite::webhook::{DEFAULT_MAX_SKEW, VerifyError, verify};
use kitebridge::config::Secret;
use kitebridge::status::{self, LogicalState, Skip};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use url::Url;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

#[derive(Debug, Deserialize)]
struct SignatureVector {
    name: String,
    token: String,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    body_file: Option<String>,
    #[serde(default)]
    body_sha256: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    expected: String,
    #[serde(default)]
    expected_error_in_go_buildkite: Option<String>,
    /// The vector's "current time", when it has one (for timestamp-window cases).
    #[serde(default, alias = "now_unix")]
    now: Option<i64>,
}

impl SignatureVector {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn body(&self) -> Vec<u8> {
        match (&self.body, &self.body_file) {
            (Some(body), _) => body.as_bytes().to_vec(),
            (None, Some(file)) => {
                let bytes = std::fs::read(fixtures().join(file))
                    .unwrap_or_else(|e| panic!("{}: reading {file}: {e}", self.name));
                if let Some(want) = &self.body_sha256 {
                    assert_eq!(
                        &hex::encode(Sha256::digest(&bytes)),
                        want,
                        "{}: {file} is not byte-identical to the vector's",
                        self.name
                    );
                }
                bytes
            }
            (None, None) => panic!("{}: neither body nor body_file", self.name),
        }
    }

    /// The vector's notion of now; otherwise the signed timestamp itself (the vectors are old
    /// deliveries, replayed as if just received), otherwise any time.
    fn now(&self) -> i64 {
        self.now
            .or_else(|| {
                let header = self.header("X-Buildkite-Signature")?;
                header.split(',').find_map(|part| {
                    let (k, v) = part.split_once('=')?;
                    (k.trim() == "timestamp").then(|| v.trim().parse().ok())?
                })
            })
            .unwrap_or(1_700_000_000)
    }
}

fn signature_vectors() -> Vec<SignatureVector> {
    let text = std::fs::read_to_string(fixtures().join("webhook_signature.json"))
        .expect("tests/fixtures/webhook_signature.json");
    serde_json::from_str(&text).expect("webhook_signature.json is a list of vectors")
}

#[test]
fn every_signature_vector() {
    let vectors = signature_vectors();
    assert!(!vectors.is_empty());
    for v in &vectors {
        let result = verify(
            v.header("X-Buildkite-Signature"),
            v.header("X-Buildkite-Token"),
            &v.body(),
            &[Secret::new(v.token.clone())],
            v.now(),
            DEFAULT_MAX_SKEW,
        );
        match v.expected.as_str() {
            "valid" => assert!(result.is_ok(), "{}: {result:?}", v.name),
            "invalid" => {
                let err = result.expect_err(&v.name);
                if let Some(go) = &v.expected_error_in_go_buildkite {
                    let same_kind = match err {
                        VerifyError::MissingCredentials => {
                            go.starts_with("no X-Buildkite-Signature")
                        }
                        VerifyError::BadSignature => go.contains("signature check failed"),
                        VerifyError::MalformedSignature(_) => {
                            go.contains("format is incorrect") || go.contains("decoding signature")
                        }
                        VerifyError::BadToken => go.contains("token"),
                        _ => false,
                    };
                    assert!(
                        same_kind,
                        "{}: got {err:?}, go-buildkite says {go:?}",
                        v.name
                    );
                }
            }
            other => panic!("{}: unknown expectation {other:?}", v.name),
        }
    }
}

#[test]
fn signature_vectors_fail_with_another_token_or_a_changed_body() {
    for v in signature_vectors().iter().filter(|v| v.expected == "valid") {
        let sig = v.header("X-Buildkite-Signature");
        let tok = v.header("X-Buildkite-Token");
        let other = [Secret::new("not-the-token")];
        assert!(
            verify(sig, tok, &v.body(), &other, v.now(), DEFAULT_MAX_SKEW).is_err(),
            "{}",
            v.name
        );
        // Rotation: the right token second in the list still verifies.
        let both = [Secret::new("not-the-token"), Secret::new(v.token.clone())];
        let ok = verify(sig, tok, &v.body(), &both, v.now(), DEFAULT_MAX_SKEW)
            .unwrap_or_else(|e| panic!("{}: {e}", v.name));
        assert_eq!(ok.token_index, 1);
        if sig.is_some() {
            let mut body = v.body();
            body.push(b' ');
            assert_eq!(
                verify(sig, tok, &body, &both, v.now(), DEFAULT_MAX_SKEW),
                Err(VerifyError::BadSignature),
                "{}",
                v.name
            );
            // Ten minutes later the same delivery is a replay.
            assert!(matches!(
                verify(sig, tok, &v.body(), &both, v.now() + 600, DEFAULT_MAX_SKEW),
                Err(VerifyError::TimestampTooOld { .. })
            ));
        }
    }
}

#[test]
fn signed_bodies_that_are_build_events_parse_or_name_what_is_missing() {
    for v in signature_vectors() {
        match Event::parse(&v.body()) {
            Ok(_) => {}
            // The compact vector body has no commit: a clear error, not a panic or a guess.
            Err(PayloadError::Missing(field)) => assert_eq!(field, "build.commit", "{}", v.name),
            Err(e) => panic!("{}: {e}", v.name),
        }
    }
}

/// The example payloads and what each must become.
const PAYLOADS: &[(&str, &str, LogicalState, [BitbucketState; 3])] = {
    use BitbucketState::*;
    &[
        (
            "build.scheduled.json",
            "build.scheduled",
            LogicalState::InProgress,
            [Inprogress, Inprogress, Inprogress],
        ),
        (
            "build.running.json",
            "build.running",
            LogicalState::InProgress,
            [Inprogress, Inprogress, Inprogress],
        ),
        (
            "build.finished.passed.json",
            "build.finished",
            LogicalState::Successful,
            [Successful, Successful, Successful],
        ),
        (
            "build.finished.failed.json",
            "build.finished",
            LogicalState::Failed,
            [Failed, Failed, Failed],
        ),
        (
            "build.finished.blocked.json",
            "build.finished",
            LogicalState::Blocked,
            [Failed, Failed, Stopped],
        ),
    ]
};

fn payload(file: &str) -> WebhookPayload {
    let body = std::fs::read(fixtures().join("webhooks").join(file)).expect(file);
    match Event::parse(&body) {
        Ok(Event::Build(p)) => *p,
        other => panic!("{file}: {other:?}"),
    }
}

#[test]
fn every_example_payload_maps_to_the_expected_state() {
    let listed: Vec<_> = std::fs::read_dir(fixtures().join("webhooks"))
        .expect("tests/fixtures/webhooks")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    for file in &listed {
        assert!(
            PAYLOADS.iter().any(|p| p.0 == file),
            "{file} has no expectation here"
        );
    }

    let apis = [
        ApiKind::Legacy,
        ApiKind::Repository { cancelled: true },
        ApiKind::Cloud,
    ];
    for (file, event, logical, words) in PAYLOADS {
        let p = payload(file);
        assert_eq!(&p.event, event, "{file}");
        assert!(
            p.build.extra.get("jobs").is_none(),
            "{file}: webhook builds have no jobs"
        );
        assert_eq!(p.organization_slug().as_deref(), Some("acme-inc"), "{file}");

        let s = status::map(&p.build, Some(&p.pipeline), None).expect(file);
        assert_eq!(s.logical, *logical, "{file}");
        assert_eq!(s.key, "acme-inc/web-app", "{file}");
        assert_eq!(s.name, format!("Web App #{}", p.build.number), "{file}");
        assert_eq!(s.version.build, p.build.number, "{file}");
        assert_eq!(s.url, p.build.web_url.clone().unwrap_or_default(), "{file}");
        assert!(!s.description.contains('\n'), "{file}: {}", s.description);
        if *logical == LogicalState::Blocked {
            assert!(
                s.description.starts_with("Blocked"),
                "{file}: {}",
                s.description
            );
        }
        for (api, word) in apis.iter().zip(words) {
            assert_eq!(state_for(api, s.logical), *word, "{file} on {api:?}");
        }
        // Blocked is never a success, and a finished build is never left in progress.
        if p.build.blocked {
            assert!(
                words.iter().all(|w| *w != BitbucketState::Successful),
                "{file}"
            );
        }
        if p.build.finished_at.is_some() {
            assert!(
                words.iter().all(|w| *w != BitbucketState::Inprogress),
                "{file}"
            );
            assert!(s.duration_ms.is_some(), "{file}");
        }
    }
}

#[test]
fn example_payloads_build_requests_only_for_repositories_on_bitbucket() {
    let dc = Url::parse("https://bitbucket.example.com").expect("url");
    let cloud = Url::parse("https://api.bitbucket.org").expect("url");
    for (file, _, _, words) in PAYLOADS {
        let p = payload(file);
        let mut s = status::map(&p.build, Some(&p.pipeline), None).expect(file);

        // The examples' pipeline lives on GitHub: nothing is posted to any Bitbucket.
        for (api, base) in [
            (ApiKind::Legacy, &dc),
            (ApiKind::Repository { cancelled: true }, &dc),
            (ApiKind::Cloud, &cloud),
        ] {
            assert!(
                matches!(
                    build_request(&api, base, &s),
                    Err(Skip::NotOnBitbucket { .. })
                ),
                "{file} on {api:?}"
            );
        }

        s.repository = Some("ssh://git@bitbucket.example.com:7999/web/app.git".into());
        let legacy = build_request(&ApiKind::Legacy, &dc, &s).expect(file);
        assert_eq!(legacy.state, words[0]);
        assert_eq!(
            legacy.path,
            format!("/rest/build-status/1.0/commits/{}", s.commit)
        );
        let repository =
            build_request(&ApiKind::Repository { cancelled: true }, &dc, &s).expect(file);
        assert_eq!(repository.state, words[1]);
        assert_eq!(
            repository.path,
            format!(
                "/rest/api/latest/projects/WEB/repos/app/commits/{}/builds",
                s.commit
            )
        );
        assert_eq!(repository.body.parent.as_deref(), Some("acme-inc/web-app"));

        s.repository = Some("git@bitbucket.org:acme-inc/web-app.git".into());
        let cloud_req = build_request(&ApiKind::Cloud, &cloud, &s).expect(file);
        assert_eq!(cloud_req.state, words[2]);
        assert_eq!(
            cloud_req.path,
            format!(
                "/2.0/repositories/acme-inc/web-app/commit/{}/statuses/build",
                s.commit
            )
        );
    }
}
