//! A real browser for the dashboard's tests: Debian's `chromedriver` on a free loopback port,
//! driving a headless Chromium with a profile of its own, through fantoccini. Screenshots go
//! to `target/screenshots/`. Everything is torn down when the [`Browser`] is dropped (the
//! chromedriver process group is killed, so no Chromium is left behind after a panic).
//!
//! Included by `tests/browser.rs` only (`#[path]`), so the other test binaries neither build
//! nor warn about it.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};

/// Where the peers are, unless `CHROMEDRIVER` / `CHROMIUM` say otherwise.
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";
const MISSING: &str = "chromedriver not found: run scripts/test, which installs Debian's chromium and chromium-driver";

/// How long a `wait_*` helper waits before it fails the test.
pub const WAIT: Duration = Duration::from_secs(15);

/// A chromedriver, its Chromium session, and where screenshots go.
pub struct Browser {
    pub client: Client,
    driver: Child,
    profile: PathBuf,
    screenshots: PathBuf,
    log: PathBuf,
}

fn peer(var: &str, default: &str) -> PathBuf {
    let path = std::env::var_os(var).map_or_else(|| PathBuf::from(default), PathBuf::from);
    assert!(
        path.is_file(),
        "{MISSING} ({} is missing; set {var} to use another)",
        path.display()
    );
    path
}

/// The workspace's `target` directory: `CARGO_TARGET_DIR` if set, else `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => workspace.join(dir),
        _ => workspace.join("target"),
    }
}

/// A directory of its own under the system's temporary directory.
fn temp_dir(what: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("kitebridge-{what}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Kills the process group `child` leads (chromedriver and the Chromium it started).
fn kill_group(child: &mut Child) {
    if child.try_wait().ok().flatten().is_none() {
        // SAFETY: plain kill(2) on the group this test created with process_group(0).
        unsafe {
            libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL);
        }
    }
    let _ = child.wait();
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session. `name` names the screenshot
    /// folder (`target/screenshots/<name>/`).
    pub async fn start(name: &str) -> Browser {
        let chromedriver = peer("CHROMEDRIVER", CHROMEDRIVER);
        let chromium = peer("CHROMIUM", CHROMIUM);
        let profile = temp_dir("chromium-profile");
        let log = profile.with_extension("chromedriver.log");
        let screenshots = target_dir().join("screenshots").join(name);
        let _ = std::fs::remove_dir_all(&screenshots);
        std::fs::create_dir_all(&screenshots).unwrap();

        // A free port can be taken between the probe and chromedriver's bind: try a few.
        let mut last = String::new();
        for _ in 0..5 {
            let port = free_port();
            let mut driver = Command::new(&chromedriver)
                .arg(format!("--port={port}"))
                .arg(format!("--log-path={}", log.display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .unwrap_or_else(|e| panic!("{MISSING} ({}: {e})", chromedriver.display()));
            let url = format!("http://127.0.0.1:{port}");
            match ready(&url, &mut driver).await {
                Ok(()) => {
                    let client = match session(&url, &chromium, &profile).await {
                        Ok(c) => c,
                        Err(e) => {
                            kill_group(&mut driver);
                            let log = std::fs::read_to_string(&log).unwrap_or_default();
                            panic!("chromedriver could not start Chromium: {e}\n{log}");
                        }
                    };
                    return Browser {
                        client,
                        driver,
                        profile,
                        screenshots,
                        log,
                    };
                }
                Err(e) => {
                    kill_group(&mut driver);
                    last = e;
                }
            }
        }
        panic!("chromedriver never became ready: {last}");
    }

    /// Closes the session (Chromium quits), then stops chromedriver.
    pub async fn close(self) {
        let _ = tokio::time::timeout(Duration::from_secs(10), self.client.clone().close()).await;
        let _ = std::fs::remove_file(&self.log);
        // Drop kills what is left of chromedriver's group and removes the profile.
    }

    /// Saves a PNG of the window as `target/screenshots/<name>/<file>.png`; returns its path.
    pub async fn screenshot(&self, file: &str) -> PathBuf {
        let png = self.client.screenshot().await.unwrap();
        let path = self.screenshots.join(format!("{file}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }

    /// The page at a phone's size (390 x 844 CSS pixels): saves a whole-page screenshot and
    /// returns how much wider than the window the document is (0 when nothing needs sideways
    /// scrolling of the page itself; wide tables scroll inside their own box). The window is set
    /// back afterwards.
    pub async fn on_a_phone(&self, file: &str) -> i64 {
        let (w, h) = self.client.get_window_size().await.unwrap();
        self.client.set_window_size(390, 844).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let overflow = self
            .js(
                "return document.documentElement.scrollWidth - window.innerWidth;",
                vec![],
            )
            .await
            .as_i64()
            .unwrap_or(i64::MAX);
        self.screenshot_full(file).await;
        self.client
            .set_window_size(w as u32, h as u32)
            .await
            .unwrap();
        overflow
    }

    /// Like [`Browser::screenshot`], of the whole page: the window is made as tall as the
    /// document for the picture, then set back.
    pub async fn screenshot_full(&self, file: &str) -> PathBuf {
        let (w, h) = self.client.get_window_size().await.unwrap();
        let need = self
            .js(
                "return document.documentElement.scrollHeight + (window.outerHeight - window.innerHeight);",
                vec![],
            )
            .await
            .as_u64()
            .unwrap_or(h);
        self.client
            .set_window_size(w as u32, need.clamp(h, 4000) as u32)
            .await
            .unwrap();
        let path = self.screenshot(file).await;
        self.client
            .set_window_size(w as u32, h as u32)
            .await
            .unwrap();
        path
    }

    pub async fn goto(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    }

    pub async fn url(&self) -> String {
        self.client.current_url().await.unwrap().to_string()
    }

    /// The page's visible text (for failure messages).
    pub async fn text(&self) -> String {
        match self.client.find(Locator::Css("body")).await {
            Ok(body) => body.text().await.unwrap_or_default(),
            Err(_) => self.client.source().await.unwrap_or_default(),
        }
    }

    /// The one element `css` selects, or a failure naming it and showing the page.
    pub async fn find(&self, css: &str) -> Element {
        match self.client.find(Locator::Css(css)).await {
            Ok(e) => e,
            Err(e) => panic!(
                "no {css} on {}: {e}\n--- page ---\n{}",
                self.url().await,
                self.text().await
            ),
        }
    }

    pub async fn find_all(&self, css: &str) -> Vec<Element> {
        self.client.find_all(Locator::Css(css)).await.unwrap()
    }

    pub async fn exists(&self, css: &str) -> bool {
        !self.find_all(css).await.is_empty()
    }

    /// Runs a script in the page; its result.
    pub async fn js(&self, script: &str, args: Vec<Value>) -> Value {
        self.client
            .execute(script, args)
            .await
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// Polls `probe` (a script returning a value, `null` while not there yet) without
    /// reloading, until it returns something other than `null`/`false`, for at most
    /// [`WAIT`]. Fails with `what` and the page's text.
    pub async fn wait_js(&self, what: &str, probe: &str, args: Vec<Value>) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            // A page being replaced can fail a script: that is "not yet".
            if let Ok(v) = self.client.execute(probe, args.clone()).await
                && !v.is_null()
                && v != json!(false)
            {
                return v;
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {} s waiting until {what} on {}\n--- page ---\n{}",
                    WAIT.as_secs(),
                    self.url().await,
                    self.text().await
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until `css` selects something; the first match.
    pub async fn wait_for(&self, css: &str) -> Element {
        self.wait_js(
            &format!("{css} is on the page"),
            "return document.querySelector(arguments[0]) !== null;",
            vec![json!(css)],
        )
        .await;
        self.find(css).await
    }

    /// Waits until the text of the first element `css` selects contains `want`.
    pub async fn wait_text(&self, css: &str, want: &str) -> String {
        let v = self
            .wait_js(
                &format!("{css} shows {want:?}"),
                "const e = document.querySelector(arguments[0]);
                 return e && e.textContent.includes(arguments[1]) ? e.textContent : null;",
                vec![json!(css), json!(want)],
            )
            .await;
        v.as_str().unwrap_or_default().trim().to_string()
    }

    /// Waits until the browser is at `path` (an absolute path on the same origin, matched up
    /// to the query), e.g. after a form's 303.
    pub async fn wait_path(&self, path: &str) {
        self.wait_js(
            &format!("the browser is at {path}"),
            "return location.pathname === arguments[0] && document.readyState === 'complete';",
            vec![json!(path)],
        )
        .await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        kill_group(&mut self.driver);
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// Waits (10 s at most) until chromedriver at `url` answers `/status` ready.
async fn ready(url: &str, driver: &mut Child) -> Result<(), String> {
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = driver.try_wait().unwrap() {
            return Err(format!("chromedriver exited: {status}"));
        }
        if let Ok(r) = http.get(format!("{url}/status")).send().await
            && let Ok(v) = r.json::<Value>().await
            && v["value"]["ready"] == true
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("{url}/status never answered ready"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn session(url: &str, chromium: &Path, profile: &Path) -> Result<Client, String> {
    let args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,1000",
    ]
    .map(String::from)
    .into_iter()
    .chain([format!("--user-data-dir={}", profile.display())])
    .collect::<Vec<_>>();
    let caps = json!({
        "browserName": "chrome",
        "goog:chromeOptions": {"binary": chromium, "args": args},
    });
    let Value::Object(caps) = caps else {
        unreachable!()
    };
    ClientBuilder::new(HttpConnector::new())
        .capabilities(caps)
        .connect(url)
        .await
        .map_err(|e| e.to_string())
}
