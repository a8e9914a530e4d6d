//! A Lambda Runtime API emulator on loopback, and the real Lambda binaries run under it.
//!
//! [`RuntimeApi`] speaks the runtime interface a function process talks to inside Lambda
//! (`AWS_LAMBDA_RUNTIME_API`): `GET /2018-06-01/runtime/invocation/next` hands out one queued
//! event with the `Lambda-Runtime-*` headers, `POST .../invocation/{id}/response` and
//! `.../invocation/{id}/error` end it, `POST .../runtime/init/error` reports a failed start. One
//! process, one event at a time, as Lambda runs it. [`LambdaProcess`] starts a binary with the
//! environment Lambda gives it (`env_clear`, then the `AWS_LAMBDA_*` variables and the
//! function's settings), keeps what it prints, measures process start -> first
//! `invocation/next` (ready) and, when stopped, its peak RSS (`VmHWM`, read before it exits).
//!
//! Event builders: [`http_api_event`] (API Gateway HTTP API, payload format 2.0, what the SAM
//! template's `HttpApi` events deliver) and [`scheduled_event`] (the EventBridge schedule's
//! event).

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Map, Value, json};
use tokio::sync::{Notify, oneshot};

/// How an invocation ended.
#[derive(Debug)]
pub enum Outcome {
    /// `POST .../response`: the handler's answer (JSON for every kitebridge function).
    Response(Value),
    /// `POST .../error`: the handler failed; the body is the runtime's error document
    /// (`errorType`, `errorMessage`).
    Error(Value),
}

impl Outcome {
    /// The response, or a panic naming the error (for tests).
    pub fn expect_response(self, what: &str) -> Value {
        match self {
            Outcome::Response(v) => v,
            Outcome::Error(e) => panic!("{what}: the invocation failed: {e}"),
        }
    }
}

struct Queued {
    id: String,
    body: Vec<u8>,
    done: oneshot::Sender<Outcome>,
}

#[derive(Default)]
struct Inner {
    queue: Mutex<VecDeque<Queued>>,
    queued: Notify,
    in_flight: Mutex<HashMap<String, oneshot::Sender<Outcome>>>,
    first_next: Mutex<Option<Instant>>,
    next_seen: Notify,
    init_error: Mutex<Option<Value>>,
    counter: Mutex<u64>,
}

/// The Runtime API emulator. Dropping it stops the server.
pub struct RuntimeApi {
    addr: SocketAddr,
    inner: Arc<Inner>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for RuntimeApi {
    fn drop(&mut self) {
        self.server.abort();
    }
}

const PREFIX: &str = "/2018-06-01/runtime";

impl RuntimeApi {
    pub async fn start() -> RuntimeApi {
        let inner = Arc::new(Inner::default());
        let app = Router::new()
            .route(&format!("{PREFIX}/invocation/next"), get(next))
            .route(
                &format!("{PREFIX}/invocation/{{id}}/response"),
                post(respond),
            )
            .route(&format!("{PREFIX}/invocation/{{id}}/error"), post(fail))
            .route(&format!("{PREFIX}/init/error"), post(init_error))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("Runtime API emulator: cannot bind loopback: {e}"));
        let addr = listener.local_addr().expect("bound address");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        RuntimeApi {
            addr,
            inner,
            server,
        }
    }

    /// The value of `AWS_LAMBDA_RUNTIME_API` (host:port, no scheme).
    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    /// When the function first asked for an event, if it has.
    pub fn first_next(&self) -> Option<Instant> {
        *self.inner.first_next.lock().unwrap()
    }

    /// Waits until the function asks for its first event (it is initialised and ready).
    pub async fn wait_ready(&self, timeout: Duration) -> Result<Instant, String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.inner.next_seen.notified();
            if let Some(t) = self.first_next() {
                return Ok(t);
            }
            if let Some(e) = self.init_error() {
                return Err(format!("the function reported an init error: {e}"));
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(format!(
                    "the function did not ask for an event within {timeout:?}"
                ));
            }
        }
    }

    /// What the function sent to `/runtime/init/error`, if anything.
    pub fn init_error(&self) -> Option<Value> {
        self.inner.init_error.lock().unwrap().clone()
    }

    /// Queues `event`, waits for the function to answer it.
    pub async fn invoke(&self, event: &Value, timeout: Duration) -> Result<Outcome, String> {
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut n = self.inner.counter.lock().unwrap();
            *n += 1;
            format!("8476a536-e9f4-11e8-9739-{:012x}", *n)
        };
        self.inner.queue.lock().unwrap().push_back(Queued {
            id: id.clone(),
            body: event.to_string().into_bytes(),
            done: tx,
        });
        self.inner.queued.notify_one();
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(_)) => Err(format!("invocation {id} was dropped")),
            Err(_) => Err(format!("invocation {id}: no answer within {timeout:?}")),
        }
    }
}

async fn next(State(inner): State<Arc<Inner>>) -> Response {
    {
        let mut first = inner.first_next.lock().unwrap();
        if first.is_none() {
            *first = Some(Instant::now());
        }
    }
    inner.next_seen.notify_waiters();
    let job = loop {
        let notified = inner.queued.notified();
        if let Some(job) = inner.queue.lock().unwrap().pop_front() {
            break job;
        }
        notified.await;
    };
    inner
        .in_flight
        .lock()
        .unwrap()
        .insert(job.id.clone(), job.done);
    let deadline_ms = chrono::Utc::now().timestamp_millis() + 30_000;
    let mut headers = HeaderMap::new();
    let set = |h: &mut HeaderMap, k: &'static str, v: String| {
        h.insert(k, HeaderValue::from_str(&v).expect("header value"));
    };
    set(&mut headers, "lambda-runtime-aws-request-id", job.id);
    set(
        &mut headers,
        "lambda-runtime-deadline-ms",
        deadline_ms.to_string(),
    );
    set(
        &mut headers,
        "lambda-runtime-invoked-function-arn",
        "arn:aws:lambda:us-east-1:123456789012:function:kitebridge-test".into(),
    );
    set(
        &mut headers,
        "lambda-runtime-trace-id",
        "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=0".into(),
    );
    set(&mut headers, "content-type", "application/json".into());
    (StatusCode::OK, headers, job.body).into_response()
}

fn finish(inner: &Inner, id: &str, outcome: Outcome) -> Response {
    match inner.in_flight.lock().unwrap().remove(id) {
        Some(done) => {
            let _ = done.send(outcome);
            (StatusCode::ACCEPTED, axum::Json(json!({"status": "OK"}))).into_response()
        }
        None => (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"errorMessage": format!("unknown request id {id}"),
                              "errorType": "InvalidRequestID"})),
        )
            .into_response(),
    }
}

async fn respond(
    State(inner): State<Arc<Inner>>,
    UrlPath(id): UrlPath<String>,
    body: Bytes,
) -> Response {
    let value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    finish(&inner, &id, Outcome::Response(value))
}

async fn fail(
    State(inner): State<Arc<Inner>>,
    UrlPath(id): UrlPath<String>,
    body: Bytes,
) -> Response {
    let value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    finish(&inner, &id, Outcome::Error(value))
}

async fn init_error(State(inner): State<Arc<Inner>>, body: Bytes) -> Response {
    let value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    *inner.init_error.lock().unwrap() = Some(value);
    inner.next_seen.notify_waiters();
    (StatusCode::ACCEPTED, axum::Json(json!({"status": "OK"}))).into_response()
}

/// The environment Lambda gives every function process (before the function's own settings).
pub fn lambda_environment(runtime_api: &RuntimeApi, function: &str) -> HashMap<String, String> {
    HashMap::from(
        [
            ("AWS_LAMBDA_RUNTIME_API", runtime_api.address()),
            ("AWS_LAMBDA_FUNCTION_NAME", format!("kitebridge-{function}")),
            ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256".into()),
            ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST".into()),
            (
                "AWS_LAMBDA_LOG_GROUP_NAME",
                format!("/aws/lambda/kitebridge-{function}"),
            ),
            (
                "AWS_LAMBDA_LOG_STREAM_NAME",
                "2026/11/25/[$LATEST]0123".into(),
            ),
            ("AWS_LAMBDA_INITIALIZATION_TYPE", "on-demand".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_DEFAULT_REGION", "us-east-1".into()),
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
            ("AWS_SESSION_TOKEN", "testing".into()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
            ("_HANDLER", "bootstrap".into()),
            ("LAMBDA_TASK_ROOT", "/var/task".into()),
            ("TZ", ":UTC".into()),
            (
                "PATH",
                std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into()),
            ),
        ]
        .map(|(k, v)| (k.to_string(), v)),
    )
}

/// A function binary running under a [`RuntimeApi`].
pub struct LambdaProcess {
    child: Child,
    started: Instant,
    output: Arc<Mutex<Vec<String>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

/// What a stopped process left behind.
#[derive(Debug)]
pub struct Stopped {
    /// Peak resident set size, in KiB (`VmHWM` just before it was stopped).
    pub peak_rss_kib: u64,
    /// Everything it printed on stdout and stderr, line by line.
    pub output: Vec<String>,
}

impl LambdaProcess {
    /// Starts `binary` with exactly `env` (nothing inherited).
    pub fn spawn(binary: &Path, env: &HashMap<String, String>) -> LambdaProcess {
        let started = Instant::now();
        let mut child = Command::new(binary)
            .env_clear()
            .envs(env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let output = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        let streams: [Option<Box<dyn Read + Send>>; 2] = [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ];
        for stream in streams.into_iter().flatten() {
            let output = output.clone();
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    output.lock().unwrap().push(line);
                }
            }));
        }
        LambdaProcess {
            child,
            started,
            output,
            readers,
        }
    }

    /// When the process was started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The output so far.
    pub fn output(&self) -> Vec<String> {
        self.output.lock().unwrap().clone()
    }

    /// Whether it has exited (with its status), without waiting.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Stops it as Lambda does when it retires an execution environment (SIGTERM, then SIGKILL
    /// after 2 s) and collects its peak RSS and output.
    pub fn stop(mut self) -> Stopped {
        let pid = self.child.id() as libc::pid_t;
        // The peak of the running program itself. (`wait4`'s `ru_maxrss` would also count the
        // parent's pages the child held between fork and exec: a floor of the test's own RSS.)
        let hwm = peak_rss_kib(pid);
        let mut rusage: libc::rusage = unsafe { std::mem::zeroed() };
        let mut status = 0;
        // SAFETY: plain syscalls on our own child's pid, which is not reaped before wait4.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut reaped = false;
        while Instant::now() < deadline {
            // SAFETY: as above; WNOHANG returns 0 while the child runs.
            let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut rusage) };
            if r == pid {
                reaped = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if !reaped {
            // SAFETY: as above.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::wait4(pid, &mut status, 0, &mut rusage);
            }
        }
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        Stopped {
            peak_rss_kib: hwm.unwrap_or(rusage.ru_maxrss.max(0) as u64),
            output: self.output.lock().unwrap().clone(),
        }
    }
}

/// `VmHWM` of a running process (peak resident set since its exec), in KiB.
pub fn peak_rss_kib(pid: libc::pid_t) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// An API Gateway HTTP API event (payload format 2.0) for one request, as the `$default` stage
/// delivers it. Header names are lower-cased, as API Gateway does.
pub fn http_api_event(
    method: &str,
    path_and_query: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Value {
    let (path, query) = path_and_query
        .split_once('?')
        .unwrap_or((path_and_query, ""));
    let headers: Map<String, Value> = headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), json!(v)))
        .collect();
    let mut event = json!({
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": query,
        "headers": headers,
        "requestContext": {
            "accountId": "123456789012",
            "apiId": "kb12345678",
            "domainName": "kb12345678.execute-api.us-east-1.amazonaws.com",
            "domainPrefix": "kb12345678",
            "http": {
                "method": method,
                "path": path,
                "protocol": "HTTP/1.1",
                "sourceIp": "203.0.113.7",
                "userAgent": "kitebridge-tests"
            },
            "requestId": "JKJaXmPLvHcESHA=",
            "routeKey": "$default",
            "stage": "$default",
            "time": "25/Nov/2026:10:02:03 +0000",
            "timeEpoch": 1_795_600_923_000u64
        },
        "isBase64Encoded": false
    });
    if let Some(body) = body {
        event["body"] = json!(body);
    }
    event
}

/// The event an EventBridge schedule (`rate(...)`) delivers.
pub fn scheduled_event() -> Value {
    json!({
        "version": "0",
        "id": "53dc4d37-cffa-4f76-80c9-8b7d4a4d2eaa",
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": "123456789012",
        "time": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "region": "us-east-1",
        "resources": ["arn:aws:events:us-east-1:123456789012:rule/kitebridge-poll"],
        "detail": {}
    })
}

/// An HTTP API (payload 2.0) response, as `lambda_http` returns it to API Gateway.
#[derive(Debug)]
pub struct HttpAnswer {
    pub status: u16,
    pub headers: Map<String, Value>,
    /// The body parsed as JSON (`Value::Null` when empty, a string when not JSON).
    pub body: Value,
}

impl HttpAnswer {
    pub fn from_lambda(response: &Value) -> HttpAnswer {
        let status = response["statusCode"]
            .as_u64()
            .unwrap_or_else(|| panic!("no statusCode in the Lambda response: {response}"))
            as u16;
        let raw = response["body"].as_str().unwrap_or("");
        let text = if response["isBase64Encoded"].as_bool() == Some(true) {
            {
                use base64::Engine as _;
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(raw)
                    .unwrap_or_else(|e| panic!("a base64 body that does not decode: {e}"));
                String::from_utf8(bytes).expect("UTF-8 body")
            }
        } else {
            raw.to_string()
        };
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        HttpAnswer {
            status,
            headers: response["headers"].as_object().cloned().unwrap_or_default(),
            body,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| v.as_str())
    }
}

/// One function under test: its Runtime API and its process, started and ready.
pub struct Function {
    pub api: RuntimeApi,
    pub process: LambdaProcess,
    /// Process start -> first `invocation/next`.
    pub ready_after: Duration,
}

impl Function {
    /// Starts `binary` as function `name` with the Lambda environment plus `settings`, and
    /// waits (up to 30 s) until it asks for its first event. Panics with its output if it fails
    /// to start.
    pub async fn start(binary: &Path, name: &str, settings: &HashMap<String, String>) -> Function {
        let api = RuntimeApi::start().await;
        let mut env = lambda_environment(&api, name);
        env.extend(settings.iter().map(|(k, v)| (k.clone(), v.clone())));
        let mut process = LambdaProcess::spawn(binary, &env);
        let deadline = Instant::now() + Duration::from_secs(30);
        let ready = loop {
            match api.wait_ready(Duration::from_millis(50)).await {
                Ok(at) => break Ok(at),
                Err(e) if api.init_error().is_some() => break Err(e),
                Err(_) => {}
            }
            if let Some(status) = process.exited() {
                break Err(format!("it exited during start-up ({status})"));
            }
            if Instant::now() > deadline {
                break Err("it did not ask for an event within 30 s".to_string());
            }
        };
        match ready {
            Ok(at) => {
                let ready_after = at.saturating_duration_since(process.started());
                Function {
                    api,
                    process,
                    ready_after,
                }
            }
            Err(e) => {
                let stopped = process.stop();
                panic!(
                    "{name} ({}) did not start: {e}\n--- its output ---\n{}",
                    binary.display(),
                    stopped.output.join("\n")
                );
            }
        }
    }

    /// Invokes it with `event`; panics with the function's output if there is no answer in 30 s.
    pub async fn invoke(&self, event: &Value) -> Outcome {
        self.invoke_within(event, Duration::from_secs(30)).await
    }

    /// [`Function::invoke`] with another timeout (the poller's is 300 s on Lambda).
    pub async fn invoke_within(&self, event: &Value, timeout: Duration) -> Outcome {
        match self.api.invoke(event, timeout).await {
            Ok(outcome) => outcome,
            Err(e) => panic!(
                "{e}\n--- the function's output ---\n{}",
                self.process.output().join("\n")
            ),
        }
    }

    /// One HTTP request through API Gateway (payload 2.0) to this function.
    pub async fn http(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> HttpAnswer {
        let event = http_api_event(method, path, headers, body);
        let response = self
            .invoke(&event)
            .await
            .expect_response(&format!("{method} {path}"));
        HttpAnswer::from_lambda(&response)
    }

    /// A Buildkite webhook delivery, sent as API Gateway hands it to the function.
    pub async fn deliver(&self, d: &kitebridge_fakes::WebhookDelivery) -> HttpAnswer {
        let headers: Vec<(&str, &str)> = d
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.http("POST", "/webhooks/buildkite", &headers, Some(&d.body))
            .await
    }

    pub fn stop(self) -> Stopped {
        self.process.stop()
    }
}
