//! Outgoing HTTP: one `reqwest` client per process (connection pooling, a timeout on every
//! request) and the retry rule every caller shares: 429 and 5xx and transport failures are
//! retried with exponential backoff and full jitter, and a server's own wait (`Retry-After`, or
//! Buildkite's `RateLimit-Reset`) is honoured.

use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::{Client, RequestBuilder, Response, StatusCode};

/// Builds the shared client. TLS roots come from the platform (so a corporate CA installed on
/// the host is trusted, as Bitbucket Server behind a firewall often needs), or from
/// `SSL_CERT_FILE` / `SSL_CERT_DIR` when set.
pub fn client(timeout: Duration) -> Result<Client, crate::Error> {
    Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .pool_idle_timeout(Duration::from_secs(60))
        .user_agent(concat!("kitebridge/", env!("CARGO_PKG_VERSION")))
        .build()
        // reqwest's own text is only "builder error"; the cause is in its source chain. With
        // nothing but timeouts set, building can only fail at loading the CA certificates.
        .map_err(|e| {
            crate::Error::Startup(format!(
                "cannot set up TLS for the HTTP client (CA certificates come from \
                 {} or {} when set, else from the system's store): {}",
                crate::config::CA_FILE_VARIABLE,
                crate::config::CA_DIR_VARIABLE,
                error_chain(&e)
            ))
        })
}

#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub attempts: u32,
    /// First backoff; doubles each attempt, up to `cap`.
    pub base: Duration,
    pub cap: Duration,
    /// Longest server-requested wait honoured; a longer one ends the retries (the work stays
    /// queued for a later cycle instead of holding this one).
    pub max_server_wait: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 4,
            base: Duration::from_millis(200),
            cap: Duration::from_secs(5),
            max_server_wait: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// Full jitter: a uniform wait in `[0, min(cap, base * 2^attempt)]`.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX))
            .min(self.cap);
        ceiling.mul_f64(fastrand::f64())
    }
}

/// Why a request finally failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SendError {
    #[error("timed out")]
    Timeout,
    /// The server refused the connection: nothing was sent, so nothing can have been acted on.
    #[error("connection failed: {0}")]
    Refused(String),
    /// Connecting failed otherwise (DNS, TLS), or the connection broke while the request was
    /// being sent: the server may have received it.
    #[error("connection failed: {0}")]
    Connect(String),
    #[error("HTTP {status}: {message}")]
    Status {
        status: u16,
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("request failed: {0}")]
    Other(String),
}

impl SendError {
    /// Worth trying again later (the outbox keeps it).
    pub fn is_transient(&self) -> bool {
        match self {
            SendError::Timeout | SendError::Refused(_) | SendError::Connect(_) => true,
            SendError::Status { status, .. } => is_retryable_status(*status),
            SendError::Other(_) => false,
        }
    }

    /// The request may have reached the server and may still take effect (it timed out, or
    /// the connection broke after it was sent).
    pub fn is_ambiguous(&self) -> bool {
        matches!(self, SendError::Timeout | SendError::Connect(_))
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            SendError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

fn is_retryable_status(status: u16) -> bool {
    status == 429 || status == 408 || (500..=599).contains(&status) && status != 501
}

/// Longest wait a server may ask for; a longer (or absurd) one is taken as this.
pub const MAX_SERVER_WAIT: Duration = crate::bitbucket::pacer::MAX_SERVER_WAIT;

/// The wait a server asked for: `Retry-After` (seconds or an HTTP date), else Buildkite's
/// `RateLimit-Reset` / `RateLimit-User-Reset` when a limit is exhausted. Capped at
/// [`MAX_SERVER_WAIT`], so no header can overflow a clock addition.
pub fn server_wait(status: StatusCode, headers: &HeaderMap) -> Option<Duration> {
    asked_wait(status, headers).map(|w| w.min(MAX_SERVER_WAIT))
}

fn asked_wait(status: StatusCode, headers: &HeaderMap) -> Option<Duration> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(v) = header("retry-after") {
        if let Ok(secs) = v.parse::<u64>() {
            return Some(Duration::from_secs(secs.min(MAX_SERVER_WAIT.as_secs())));
        }
        if v.bytes().all(|b| b.is_ascii_digit()) && !v.is_empty() {
            // Too many digits for a u64: absurd, so the cap.
            return Some(MAX_SERVER_WAIT);
        }
        if let Ok(date) = chrono::DateTime::parse_from_rfc2822(v) {
            let wait = date.with_timezone(&chrono::Utc) - chrono::Utc::now();
            return Some(wait.to_std().unwrap_or(Duration::ZERO));
        }
    }
    if status == StatusCode::TOO_MANY_REQUESTS {
        let reset = ["ratelimit-user-reset", "ratelimit-reset"]
            .iter()
            .filter_map(|h| {
                let v = header(h)?;
                v.parse::<u64>().ok().or_else(|| {
                    (!v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                        .then_some(MAX_SERVER_WAIT.as_secs())
                })
            })
            .map(|s| s.min(MAX_SERVER_WAIT.as_secs()))
            .max();
        // Buildkite's advice: wait the reset, plus a little so the window has really turned.
        return reset.map(|s| Duration::from_secs(s) + Duration::from_millis(500));
    }
    None
}

/// Whether a request may be sent twice: status posts may (the same key replaces), creating a
/// build may not once the server could have received it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idempotence {
    Idempotent,
    /// Retried only when the server certainly did not act: connection refused, or 429.
    NotIdempotent,
}

/// Sends the request `make` builds, retrying per `policy`. Returns the first successful (2xx)
/// response, or the last failure. Non-2xx answers that are not retryable (400, 401, 404, 422...)
/// come back at once as [`SendError::Status`] with the start of the body as the message.
pub async fn send(
    make: impl Fn() -> RequestBuilder,
    policy: &RetryPolicy,
    idempotence: Idempotence,
) -> Result<Response, SendError> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = make().send().await;
        let error = match result {
            Ok(resp) if resp.status().is_success() => return Ok(resp),
            Ok(resp) => {
                let status = resp.status();
                let retry_after = server_wait(status, resp.headers());
                let message = body_snippet(resp).await;
                SendError::Status {
                    status: status.as_u16(),
                    message,
                    retry_after,
                }
            }
            Err(e) => classify(&e),
        };
        let may_retry = match idempotence {
            Idempotence::Idempotent => error.is_transient(),
            Idempotence::NotIdempotent => {
                matches!(
                    error,
                    SendError::Status { status: 429, .. } | SendError::Refused(_)
                )
            }
        };
        if !may_retry || attempt >= policy.attempts {
            return Err(error);
        }
        let wait = match error.retry_after() {
            Some(w) if w > policy.max_server_wait => return Err(error),
            Some(w) => w,
            None => policy.backoff(attempt),
        };
        tracing::debug!(attempt, wait_ms = wait.as_millis() as u64, error = %error, "retrying");
        tokio::time::sleep(wait).await;
    }
}

fn classify(e: &reqwest::Error) -> SendError {
    if e.is_timeout() {
        SendError::Timeout
    } else if e.is_connect() && refused(e) {
        SendError::Refused(error_chain(e))
    } else if e.is_connect() {
        // The source chain says why (DNS, TLS); the URL is left out because it may carry a
        // path the caller treats as sensitive.
        SendError::Connect(error_chain(e))
    } else if e.is_request() || e.is_body() {
        SendError::Connect(error_chain(e))
    } else {
        SendError::Other(error_chain(e))
    }
}

/// Whether the connection was refused, by the I/O error kind in the error's source chain.
fn refused(e: &reqwest::Error) -> bool {
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(s) = source {
        if s.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            return true;
        }
        source = s.source();
    }
    false
}

fn error_chain(e: &reqwest::Error) -> String {
    let mut parts = Vec::new();
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(s) = source {
        parts.push(s.to_string());
        source = s.source();
    }
    if parts.is_empty() {
        let mut s = e.to_string();
        if let Some(url) = e.url() {
            s = s.replace(url.as_str(), "<url>");
        }
        parts.push(s);
    }
    parts.join(": ")
}

/// The first 300 characters of an error body, for messages (Bitbucket's errors say which field
/// is wrong). Error bodies carry no secrets: they describe our request, not our credentials.
async fn body_snippet(resp: Response) -> String {
    match resp.text().await {
        Ok(text) => text
            .chars()
            .take(300)
            .collect::<String>()
            .trim()
            .to_string(),
        Err(_) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn backoff_is_bounded_and_grows() {
        let p = RetryPolicy::default();
        for attempt in 0..40 {
            assert!(p.backoff(attempt) <= p.cap);
        }
        let p = RetryPolicy {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(100),
            ..RetryPolicy::default()
        };
        assert!(p.backoff(1) <= Duration::from_millis(200));
    }

    #[test]
    fn server_wait_reads_retry_after_and_buildkite_reset() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("7"));
        assert_eq!(
            server_wait(StatusCode::SERVICE_UNAVAILABLE, &h),
            Some(Duration::from_secs(7))
        );
        let mut h = HeaderMap::new();
        h.insert("ratelimit-reset", HeaderValue::from_static("42"));
        assert_eq!(
            server_wait(StatusCode::TOO_MANY_REQUESTS, &h),
            Some(Duration::from_millis(42_500))
        );
        // A reset header on a successful answer is not a request to wait.
        assert_eq!(server_wait(StatusCode::OK, &h), None);
        assert_eq!(
            server_wait(StatusCode::TOO_MANY_REQUESTS, &HeaderMap::new()),
            None
        );
        // Absurd waits are capped, never overflow.
        for absurd in [
            "10000000000000",
            "99999999999999999999999999",
            "18446744073709551615",
        ] {
            let mut h = HeaderMap::new();
            h.insert("retry-after", HeaderValue::from_str(absurd).unwrap());
            assert_eq!(
                server_wait(StatusCode::TOO_MANY_REQUESTS, &h),
                Some(MAX_SERVER_WAIT)
            );
            let mut h = HeaderMap::new();
            h.insert("ratelimit-reset", HeaderValue::from_str(absurd).unwrap());
            assert_eq!(
                server_wait(StatusCode::TOO_MANY_REQUESTS, &h),
                Some(MAX_SERVER_WAIT)
            );
        }
        let mut h = HeaderMap::new();
        h.insert(
            "retry-after",
            HeaderValue::from_static("Fri, 31 Dec 9999 23:59:59 GMT"),
        );
        assert_eq!(
            server_wait(StatusCode::SERVICE_UNAVAILABLE, &h),
            Some(MAX_SERVER_WAIT)
        );
    }

    /// A port nothing listens on: bound, then closed again.
    fn closed_port() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    }

    #[tokio::test]
    async fn a_refused_connection_is_told_by_its_kind_and_retried_even_when_not_idempotent() {
        let url = format!("http://127.0.0.1:{}/", closed_port());
        let http = client(Duration::from_secs(2)).unwrap();
        let err = http.get(&url).send().await.unwrap_err();
        let classified = classify(&err);
        assert!(
            matches!(classified, SendError::Refused(_)),
            "{classified:?}"
        );
        assert!(classified.is_transient());
        assert!(!classified.is_ambiguous());

        let policy = RetryPolicy {
            attempts: 3,
            base: Duration::from_millis(1),
            cap: Duration::from_millis(2),
            ..RetryPolicy::default()
        };
        let tries = std::sync::atomic::AtomicU32::new(0);
        let result = send(
            || {
                tries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                http.post(&url)
            },
            &policy,
            Idempotence::NotIdempotent,
        )
        .await;
        assert!(matches!(result, Err(SendError::Refused(_))));
        assert_eq!(
            tries.into_inner(),
            3,
            "nothing was sent, so each attempt may be retried"
        );
    }

    #[test]
    fn which_failures_may_have_reached_the_server() {
        let cases = [
            (SendError::Timeout, true, true),
            (SendError::Refused("refused".into()), true, false),
            (SendError::Connect("connection reset".into()), true, true),
            (SendError::Other("builder".into()), false, false),
        ];
        for (e, transient, ambiguous) in cases {
            assert_eq!(
                (e.is_transient(), e.is_ambiguous()),
                (transient, ambiguous),
                "{e:?}"
            );
        }
    }

    #[test]
    fn transient_statuses() {
        for s in [429, 500, 502, 503, 504, 408] {
            assert!(is_retryable_status(s), "{s}");
        }
        for s in [400, 401, 403, 404, 409, 422, 501] {
            assert!(!is_retryable_status(s), "{s}");
        }
    }
}
