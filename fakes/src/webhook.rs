//! Buildkite webhook deliveries: body, `X-Buildkite-Event`, and either the plain
//! `X-Buildkite-Token` or the `X-Buildkite-Signature` HMAC header.

use hmac::{KeyInit, Mac};

/// A Buildkite build webhook event (plus `ping`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WebhookEvent {
    /// `build.scheduled`
    BuildScheduled,
    /// `build.running`
    BuildRunning,
    /// `build.failing`
    BuildFailing,
    /// `build.finished` (blocked builds arrive as this, with `blocked: true`)
    BuildFinished,
    /// `build.skipped`
    BuildSkipped,
    /// `ping`
    Ping,
}

impl WebhookEvent {
    /// The event name, as in `X-Buildkite-Event` and the body's `event`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BuildScheduled => "build.scheduled",
            Self::BuildRunning => "build.running",
            Self::BuildFailing => "build.failing",
            Self::BuildFinished => "build.finished",
            Self::BuildSkipped => "build.skipped",
            Self::Ping => "ping",
        }
    }
}

/// How a delivery proves it comes from Buildkite (the webhook's "Token" setting).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookAuth {
    /// `X-Buildkite-Token: <token>` (Buildkite's default).
    Token(String),
    /// `X-Buildkite-Signature: timestamp=<unix>,signature=<hex HMAC-SHA256 of "<timestamp>.<body>">`,
    /// keyed with the webhook token. `timestamp` `None` means now.
    Signature {
        /// The webhook token (the HMAC key).
        token: String,
        /// Unix seconds to sign with; `None`: the current time.
        timestamp: Option<i64>,
    },
    /// Neither header (a forged or misconfigured delivery).
    None,
}

/// One webhook request, ready to send with [`deliver_webhook`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookDelivery {
    /// The event.
    pub event: WebhookEvent,
    /// Headers to send (`Content-Type`, `X-Buildkite-Event`, and the auth header).
    pub headers: Vec<(String, String)>,
    /// The exact JSON body (the signature covers these bytes).
    pub body: String,
}

impl WebhookDelivery {
    /// A delivery of `body` for `event`, authenticated as `auth` says.
    pub fn new(event: WebhookEvent, body: String, auth: &WebhookAuth) -> Self {
        let mut headers = vec![
            ("Content-Type".to_owned(), "application/json".to_owned()),
            ("X-Buildkite-Event".to_owned(), event.as_str().to_owned()),
        ];
        match auth {
            WebhookAuth::Token(t) => headers.push(("X-Buildkite-Token".to_owned(), t.clone())),
            WebhookAuth::Signature { token, timestamp } => {
                let ts = timestamp.unwrap_or_else(|| chrono::Utc::now().timestamp());
                headers.push((
                    "X-Buildkite-Signature".to_owned(),
                    format!(
                        "timestamp={ts},signature={}",
                        sign_webhook(token, ts, &body)
                    ),
                ));
            }
            WebhookAuth::None => {}
        }
        Self {
            event,
            headers,
            body,
        }
    }

    /// The value of header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// Buildkite's webhook signature: lowercase hex HMAC-SHA256, keyed with the webhook token, of
/// `"<timestamp>.<body>"`.
pub fn sign_webhook(token: &str, timestamp: i64, body: &str) -> String {
    let mut mac = match hmac::Hmac::<sha2::Sha256>::new_from_slice(token.as_bytes()) {
        Ok(m) => m,
        // HMAC takes keys of any length; this branch cannot run.
        Err(_) => return String::new(),
    };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// POST `delivery` to `url` as Buildkite would (10 s timeout, no proxy) and return the answer's
/// status code and body.
pub async fn deliver_webhook(
    url: &str,
    delivery: &WebhookDelivery,
) -> Result<(u16, String), reqwest::Error> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(std::time::Duration::from_secs(10))
        .build()?;
    let mut req = client.post(url).body(delivery.body.clone());
    for (k, v) in &delivery.headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    let body = resp.text().await?;
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The valid case of go-buildkite's fixture (copied from the shared vectors).
    #[test]
    fn signature_matches_go_buildkite_fixture() {
        let token = "29b1ff5779c76bd48ba6705eb99ff970";
        let body = r#"{"event":"ping","service":{"id":"c9f8372d-c0cd-43dc-9274-768a875cf6ca","provider":"webhook","settings":{"url":"https://server.com/webhooks"}},"organization":{"id":"49801950-1df0-474f-bb56-ad6a930c5cb9","graphql_id":"T3JnYW5pemF0aW9uLS0tZTBmMzk3MgsTksGkxOWYtZTZjNzczZTJiYjEy","url":"https://api.buildkite.com/v2/organizations/acme-inc","web_url":"https://buildkite.com/acme-inc","name":"ACME Inc","slug":"acme-inc","agents_url":"https://api.buildkite.com/v2/organizations/acme-inc/agents","emojis_url":"https://api.buildkite.com/v2/organizations/acme-inc/emojis","created_at":"2021-02-03T20:34:10.486Z","pipelines_url":"https://api.buildkite.com/v2/organizations/acme-inc/pipelines"},"sender":{"id":"c9f8372d-c0cd-43dc-9269-bcbb7f308e3f","name":"ACME Man"}}"#;
        let expected = "582d496ac2d869dd97a3101c4cda346288c49a742592daf582ec64c86449f79c";
        assert_eq!(sign_webhook(token, 1642080837, body), expected);

        let d = WebhookDelivery::new(
            WebhookEvent::Ping,
            body.to_owned(),
            &WebhookAuth::Signature {
                token: token.to_owned(),
                timestamp: Some(1642080837),
            },
        );
        assert_eq!(
            d.header("x-buildkite-signature"),
            Some(format!("timestamp=1642080837,signature={expected}").as_str())
        );
        assert_eq!(d.header("X-Buildkite-Event"), Some("ping"));
        assert_eq!(d.header("X-Buildkite-Token"), None);
    }

    #[test]
    fn token_mode_sends_the_token_only() {
        let d = WebhookDelivery::new(
            WebhookEvent::BuildFinished,
            "{}".to_owned(),
            &WebhookAuth::Token("t0k".to_owned()),
        );
        assert_eq!(d.header("X-Buildkite-Token"), Some("t0k"));
        assert_eq!(d.header("X-Buildkite-Signature"), None);
        assert_eq!(d.header("X-Buildkite-Event"), Some("build.finished"));
    }
}
