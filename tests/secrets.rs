//! Secrets from AWS Secrets Manager (the emulator's), read once at start-up through the real SDK
//! client, overlaid on the environment; a secret never shows in Debug output.

use std::collections::HashMap;

use aws_sdk_secretsmanager::Client;

async fn client() -> Client {
    Client::new(&kitebridge_tests::sdk_config())
}

#[tokio::test]
async fn secrets_come_from_one_secret_read_at_start() {
    let client = client().await;
    let name = format!("kitebridge-{}", ulid::Ulid::new());
    let created = client
        .create_secret()
        .name(&name)
        .secret_string(r#"{"BUILDKITE_API_TOKEN":"bk-from-secret-xyzzy","BITBUCKET_PASSWORD":"pw-from-secret-xyzzy","KITEBRIDGE_API_TOKEN":"api-from-secret-xyzzy"}"#)
        .send()
        .await
        .expect("create secret in the emulator");
    let arn = created.arn().expect("arn").to_string();
    let vars = HashMap::from([
        ("KITEBRIDGE_SECRETS_ARN".to_string(), arn),
        ("BITBUCKET_USERNAME".to_string(), "ci".to_string()),
        ("BITBUCKET_PASSWORD".to_string(), "from-env".to_string()),
        ("BUILDKITE_ORGANIZATION".to_string(), "acme".to_string()),
    ]);
    let config = kitebridge::config::Config::from_vars_and_secret(vars, &client)
        .await
        .unwrap();
    assert_eq!(
        config.buildkite.token.as_ref().unwrap().expose(),
        "bk-from-secret-xyzzy"
    );
    assert_eq!(
        config.api_token.as_ref().unwrap().expose(),
        "api-from-secret-xyzzy"
    );
    match &config.bitbucket.auth {
        Some(kitebridge::config::BitbucketAuth::Basic { username, password }) => {
            assert_eq!(username, "ci");
            assert_eq!(
                password.expose(),
                "pw-from-secret-xyzzy",
                "the secret wins over the environment"
            );
        }
        other => panic!("unexpected auth {other:?}"),
    }
    assert!(!format!("{config:?}").contains("xyzzy"));

    // A missing secret is a start-up error that names the problem.
    let vars = HashMap::from([(
        "KITEBRIDGE_SECRETS_ARN".to_string(),
        "no-such-secret".to_string(),
    )]);
    let err = kitebridge::config::Config::from_vars_and_secret(vars, &client)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("Secrets Manager"), "{err}");
}
