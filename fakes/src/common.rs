//! What both fakes share: the loopback server, the request log, added latency and injected
//! faults.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// One request as the fake saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// HTTP method, upper case (`GET`, `POST`, ...).
    pub method: String,
    /// Path without the query string, as sent (not percent-decoded).
    pub path: String,
    /// Raw query string (without `?`), if any.
    pub query: Option<String>,
    /// When the request arrived.
    pub at: DateTime<Utc>,
    /// Status of the answer; `None` while it is still being handled, or when the fake dropped the
    /// connection or hung instead of answering.
    pub status: Option<u16>,
}

/// A failure the fake plays instead of answering normally (see `inject_fault`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status (e.g. 500, 502, 503) and a short error body, as a failing
    /// service or its load balancer would.
    Status(u16),
    /// Answer 429 as the service does when rate limited, telling the client to wait this many
    /// seconds (`Retry-After` on Bitbucket, `RateLimit-Reset` and the JSON body on Buildkite).
    RateLimited {
        /// Seconds the client is told to wait.
        retry_after_secs: u64,
    },
    /// Accept the request and never answer (until the fake's `hang_for` has passed or the fake
    /// is shut down); longer than any sane client timeout.
    Hang,
    /// Close the connection without sending a response.
    DropConnection,
    /// Act on the request as usual, then close the connection instead of sending the answer:
    /// the change is made but the client never learns it (a lost answer).
    LoseAnswer,
    /// Hold the request for this long without answering (longer than the client's timeout, so
    /// it gives up), then act on it: the change lands after the client stopped waiting, and
    /// possibly after a later request of the same client (a post that timed out but was
    /// applied later).
    ApplyLate {
        /// How long the request is held before it is acted on.
        delay: Duration,
    },
}

#[derive(Debug, Clone)]
struct FaultRule {
    fault: Fault,
    remaining: Option<usize>,
    until: Option<Instant>,
}

/// The part of a fake that is independent of the API it simulates.
pub(crate) struct Harness {
    log: Mutex<Vec<RequestRecord>>,
    faults: Mutex<Vec<FaultRule>>,
    latency: Mutex<Duration>,
    hang_for: Duration,
    shutdown: watch::Sender<bool>,
    rate_limited: Box<dyn Fn(u64) -> Response + Send + Sync>,
}

/// Lock a mutex, going on with the data if a panicking thread poisoned it (the fakes' state is
/// always left consistent between statements).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Harness {
    pub(crate) fn new(
        hang_for: Duration,
        latency: Duration,
        rate_limited: Box<dyn Fn(u64) -> Response + Send + Sync>,
    ) -> Arc<Self> {
        let (shutdown, _) = watch::channel(false);
        Arc::new(Self {
            log: Mutex::new(Vec::new()),
            faults: Mutex::new(Vec::new()),
            latency: Mutex::new(latency),
            hang_for,
            shutdown,
            rate_limited,
        })
    }

    pub(crate) fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.log).clone()
    }

    pub(crate) fn request_counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for r in lock(&self.log).iter() {
            *counts.entry(r.path.clone()).or_insert(0) += 1;
        }
        counts
    }

    pub(crate) fn request_count(&self, path: &str) -> usize {
        lock(&self.log).iter().filter(|r| r.path == path).count()
    }

    pub(crate) fn clear_requests(&self) {
        lock(&self.log).clear();
    }

    pub(crate) fn set_latency(&self, latency: Duration) {
        *lock(&self.latency) = latency;
    }

    pub(crate) fn inject(&self, fault: Fault, remaining: Option<usize>, until: Option<Instant>) {
        lock(&self.faults).push(FaultRule {
            fault,
            remaining,
            until,
        });
    }

    pub(crate) fn clear_faults(&self) {
        lock(&self.faults).clear();
    }

    /// The fault to play for the request arriving now, if any (consumes one use).
    fn take_fault(&self) -> Option<Fault> {
        let now = Instant::now();
        let mut faults = lock(&self.faults);
        faults.retain(|r| r.remaining != Some(0) && r.until.is_none_or(|u| u > now));
        let rule = faults.first_mut()?;
        if let Some(n) = rule.remaining.as_mut() {
            *n -= 1;
        }
        Some(rule.fault.clone())
    }
}

/// The middleware every request goes through: log, latency, faults.
async fn harness_layer(State(h): State<Arc<Harness>>, req: Request, next: Next) -> Response {
    let index = {
        let mut log = lock(&h.log);
        log.push(RequestRecord {
            method: req.method().as_str().to_owned(),
            path: req.uri().path().to_owned(),
            query: req.uri().query().map(str::to_owned),
            at: Utc::now(),
            status: None,
        });
        log.len() - 1
    };
    let latency = *lock(&h.latency);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let response = match h.take_fault() {
        None => next.run(req).await,
        Some(Fault::Status(code)) => fault_status(code),
        Some(Fault::RateLimited { retry_after_secs }) => (h.rate_limited)(retry_after_secs),
        Some(Fault::Hang) => {
            let mut rx = h.shutdown.subscribe();
            tokio::select! {
                _ = tokio::time::sleep(h.hang_for) => {}
                _ = rx.wait_for(|stop| *stop) => {}
            }
            return dropped_connection();
        }
        Some(Fault::DropConnection) => return dropped_connection(),
        Some(Fault::LoseAnswer) => {
            let answer = next.run(req).await;
            if let Some(r) = lock(&h.log).get_mut(index) {
                r.status = Some(answer.status().as_u16());
            }
            return dropped_connection();
        }
        Some(Fault::ApplyLate { delay }) => {
            // The body is read now, while the client is still connected; the work is detached
            // from the connection so it lands after `delay` even though the client hung up.
            let (parts, body) = req.into_parts();
            let Ok(bytes) = axum::body::to_bytes(body, 16 << 20).await else {
                return dropped_connection();
            };
            let req = Request::from_parts(parts, Body::from(bytes));
            let h2 = h.clone();
            let work = tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let answer = next.run(req).await;
                if let Some(r) = lock(&h2.log).get_mut(index) {
                    r.status = Some(answer.status().as_u16());
                }
            });
            let _ = work.await;
            return dropped_connection();
        }
    };
    if let Some(r) = lock(&h.log).get_mut(index) {
        r.status = Some(response.status().as_u16());
    }
    response
}

fn fault_status(code: u16) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let reason = status.canonical_reason().unwrap_or("Error");
    if status == StatusCode::BAD_GATEWAY || status == StatusCode::SERVICE_UNAVAILABLE {
        // What a load balancer in front of the service answers: HTML, not the API's JSON.
        let body = format!(
            "<html><head><title>{code} {reason}</title></head><body><h1>{code} {reason}</h1></body></html>"
        );
        let mut resp = (status, body).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        resp
    } else {
        (
            status,
            axum::Json(
                serde_json::json!({ "message": format!("{code} {reason} (injected fault)") }),
            ),
        )
            .into_response()
    }
}

/// A body that fails on its first read: hyper then closes the connection without having
/// written the response head, so the client sees the connection drop.
struct FailingBody;

impl http_body::Body for FailingBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        Poll::Ready(Some(Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "fake: injected dropped connection",
        ))))
    }
}

fn dropped_connection() -> Response {
    Response::new(Body::new(FailingBody))
}

/// A running loopback server.
pub(crate) struct Server {
    pub(crate) addr: SocketAddr,
    pub(crate) harness: Arc<Harness>,
    task: Option<JoinHandle<()>>,
}

impl Server {
    /// Bind 127.0.0.1:0 and serve the router that `app` makes from the base URL (with the
    /// harness layer around it) in the background.
    pub(crate) async fn start(
        app: impl FnOnce(String) -> Router,
        harness: Arc<Harness>,
    ) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let app = app(format!("http://{addr}")).layer(middleware::from_fn_with_state(
            harness.clone(),
            harness_layer,
        ));
        let mut rx = harness.shutdown.subscribe();
        let task = tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = rx.wait_for(|stop| *stop).await;
            });
            let _ = serve.await;
        });
        Ok(Self {
            addr,
            harness,
            task: Some(task),
        })
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub(crate) async fn shutdown(&mut self) {
        self.harness.shutdown.send_replace(true);
        if let Some(task) = self.task.take() {
            // Idle keep-alive connections close at once; give busy ones a moment.
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                // Still busy: the task is detached and ends with its last connection.
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // The serve task shuts down gracefully in the background: it stops accepting, closes
        // idle connections and ends hanging requests.
        self.harness.shutdown.send_replace(true);
        self.task.take();
    }
}

/// Generates the controls both fakes share (request log, latency, faults) as inherent methods.
macro_rules! harness_controls {
    ($ty:ty) => {
        impl $ty {
            /// Every request received so far, in arrival order.
            pub fn requests(&self) -> Vec<$crate::RequestRecord> {
                self.server.harness.requests()
            }

            /// Number of requests received per path (query string excluded).
            pub fn request_counts(&self) -> std::collections::BTreeMap<String, usize> {
                self.server.harness.request_counts()
            }

            /// Number of requests received for exactly this path (query string excluded).
            pub fn request_count(&self, path: &str) -> usize {
                self.server.harness.request_count(path)
            }

            /// Forget the requests logged so far.
            pub fn clear_requests(&self) {
                self.server.harness.clear_requests()
            }

            /// Add this latency before every answer from now on (zero turns it off).
            pub fn set_latency(&self, latency: std::time::Duration) {
                self.server.harness.set_latency(latency)
            }

            /// Play `fault` instead of answering the next `count` requests.
            ///
            /// Faults are played in the order they were injected; one still active comes first.
            pub fn inject_fault(&self, fault: $crate::Fault, count: usize) {
                self.server.harness.inject(fault, Some(count), None)
            }

            /// Play `fault` instead of answering every request that arrives during `duration`
            /// from now.
            pub fn inject_fault_for(&self, fault: $crate::Fault, duration: std::time::Duration) {
                // A duration too long to represent means "until cleared".
                let until = std::time::Instant::now().checked_add(duration);
                self.server.harness.inject(fault, None, until)
            }

            /// Remove every injected fault.
            pub fn clear_faults(&self) {
                self.server.harness.clear_faults()
            }

            /// Base URL, `http://127.0.0.1:PORT`, without a trailing slash.
            pub fn url(&self) -> String {
                self.server.url()
            }

            /// The socket address the fake listens on.
            pub fn addr(&self) -> std::net::SocketAddr {
                self.server.addr
            }

            /// Stop serving: stop accepting connections, end hanging requests and wait (up to
            /// 5 s) for open connections to finish. Dropping the fake also stops it, without
            /// waiting.
            pub async fn shutdown(mut self) {
                self.server.shutdown().await
            }
        }
    };
}
pub(crate) use harness_controls;

/// Read the whole body, refusing more than `limit` bytes.
pub(crate) async fn read_body(body: Body, limit: usize) -> Result<Bytes, ()> {
    axum::body::to_bytes(body, limit).await.map_err(|_| ())
}

/// Split a path into percent-decoded segments (empty segments dropped).
pub(crate) fn segments(path: &str) -> Vec<String> {
    path.split('/')
        .filter(|s| !s.is_empty())
        .map(percent_decode)
        .collect()
}

fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// Parse a query string into (key, value) pairs, decoded, in order.
pub(crate) fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    match query {
        None => Vec::new(),
        Some(q) => url::form_urlencoded::parse(q.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect(),
    }
}

/// RFC 3339 with milliseconds and `Z`, as Buildkite writes timestamps.
pub(crate) fn iso_millis(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Standard base64 with padding (for GraphQL ids and Basic auth).
pub(crate) fn base64(input: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(input)
}

/// Decode standard base64 (padding optional); `None` on invalid input.
pub(crate) fn base64_decode(input: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    LENIENT.decode(input).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for s in [
            "",
            "f",
            "fo",
            "foo",
            "foob",
            "fooba",
            "foobar",
            "Build---abc",
        ] {
            let e = base64(s.as_bytes());
            assert_eq!(base64_decode(&e).unwrap(), s.as_bytes());
        }
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64(b"fo"), "Zm8=");
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(segments("/a/%7Ejdoe/b%20c/"), vec!["a", "~jdoe", "b c"]);
        assert_eq!(segments("/x%2"), vec!["x%2"]);
    }
}
