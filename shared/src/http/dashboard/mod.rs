//! The releases dashboard at `/ui/`: server-rendered pages over the same [`ReleaseService`] the
//! releases API uses, so what a page offers is what the API would do. Served by
//! `kitebridge serve` and by the releases Lambda alike (it is part of [`super::router`]).
//!
//! - Sign-in exchanges the dashboard token for a signed session cookie ([`session`]); every
//!   form carries a CSRF token bound to the session, and is refused (403) without it.
//! - Actions are plain HTML forms that post and redirect back (post/redirect/get) with a
//!   one-time message; a refused action says why, in the API's words.
//! - A page's changing part refreshes itself (`app.js` fetches it again every few seconds);
//!   without JavaScript every page reads the same, and every action works.
//!
//! The routes are listed in [`ROUTES`]; the README's "The dashboard" describes the pages, and
//! docs/aws.md how they are protected on AWS.

mod pages;
pub mod session;

use axum::Router;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use maud::Markup;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use self::pages::{Chrome, CutDefaults, EnvironmentPage, LIVE_HEADER, RollbackView};
use self::session::{
    FLASH_COOKIE, FlashKind, PRE_SESSION_COOKIE, SESSION_COOKIE, Session, Sessions, cookie_value,
    is_loopback, set_cookie,
};
use super::RawBody;
use super::health::{HealthState, assess};
use crate::release::state::rollback_target;
use crate::release::version::Bump;
use crate::release::{
    CutRequest, DeployRequest, FreezeRequest, ReleaseError, ReleaseService, RollbackRequest,
};
use crate::store::{OutboxStats, Ring, StatusLedger, Store};

/// The stylesheet and the script, compiled into the binary.
pub const CSS_PATH: &str = "/ui/static/app.css";
pub const JS_PATH: &str = "/ui/static/app.js";
const CSS: &str = include_str!("static/app.css");
const JS: &str = include_str!("static/app.js");

/// Largest form body the dashboard reads.
pub const FORM_MAX_BODY: usize = 16 << 10;

/// Releases per page of a project, deployments per page of an environment.
const RELEASES_PER_PAGE: usize = 10;
const DEPLOYMENTS_PER_PAGE: usize = 25;
const PROJECTS_PER_PAGE: usize = 50;
/// How long a wrong token waits for its answer.
const FAILED_SIGN_IN_PAUSE: std::time::Duration = std::time::Duration::from_millis(400);
/// A flash message is cut to this many characters (it travels in a cookie).
const FLASH_MAX: usize = 600;

/// What the dashboard's handlers share.
#[derive(Clone)]
pub struct DashboardState {
    pub service: ReleaseService,
    pub store: Store,
    pub health: HealthState,
    pub sessions: Sessions,
}

macro_rules! routes {
    ($($method:ident $path:literal => $handler:ident),* $(,)?) => {
        /// Every `(method, path)` of the dashboard; [`routes`] is built from this list.
        pub const ROUTES: &[(&str, &str)] = &[$((stringify!($method), $path)),*];

        /// The dashboard's routes, with their state.
        pub fn routes<S: Clone + Send + Sync + 'static>(state: DashboardState) -> Router<S> {
            let router = Router::new()$(.route($path, axum::routing::$method($handler)))*
                .with_state(state);
            super::with_body_limit(router, FORM_MAX_BODY)
                .layer(axum::middleware::map_response(page_headers))
        }
    };
}

routes! {
    get "/ui" => to_root,
    get "/ui/" => projects,
    get "/ui/static/app.css" => css,
    get "/ui/static/app.js" => js,
    get "/ui/sign-in" => sign_in_page,
    post "/ui/sign-in" => sign_in,
    post "/ui/sign-out" => sign_out,
    get "/ui/operator" => operator,
    get "/ui/projects/{project}" => project,
    post "/ui/projects/{project}/cut" => cut,
    get "/ui/projects/{project}/releases/{version}" => changelog,
    get "/ui/projects/{project}/environments/{environment}" => environment,
    post "/ui/projects/{project}/environments/{environment}/deploy" => deploy,
    get "/ui/projects/{project}/environments/{environment}/rollback" => confirm_rollback,
    post "/ui/projects/{project}/environments/{environment}/rollback" => rollback,
    post "/ui/projects/{project}/environments/{environment}/freeze" => freeze,
    post "/ui/projects/{project}/environments/{environment}/unfreeze" => unfreeze,
}

/// Headers on every dashboard answer: pages are never cached or framed, and run only the
/// dashboard's own script and style.
async fn page_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    let set = |h: &mut HeaderMap, name: &'static str, value: &'static str| {
        h.entry(name).or_insert(HeaderValue::from_static(value));
    };
    set(
        h,
        "content-security-policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
         connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    );
    set(h, "x-content-type-options", "nosniff");
    set(h, "referrer-policy", "same-origin");
    set(h, "cache-control", "no-store");
    resp
}

// ---------------------------------------------------------------------------------------------
// Sessions as extractors

/// A signed-in request: its session, and the CSRF token its forms carry.
struct Signed {
    csrf: String,
    flash: Option<(FlashKind, String)>,
    /// The page is fetched for its live region only.
    live: bool,
    secure: bool,
}

impl FromRequestParts<DashboardState> for Signed {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &DashboardState,
    ) -> Result<Self, Response> {
        let now = chrono::Utc::now().timestamp();
        let session: Option<Session> = cookie_value(&parts.headers, SESSION_COOKIE)
            .and_then(|v| state.sessions.verify(&v, now));
        let Some(session) = session else {
            return Err(signed_out(parts));
        };
        let flash =
            cookie_value(&parts.headers, FLASH_COOKIE).and_then(|v| state.sessions.read_flash(&v));
        Ok(Signed {
            csrf: state.sessions.csrf(&session),
            flash,
            live: parts.headers.contains_key(LIVE_HEADER),
            secure: !is_loopback(&parts.headers),
        })
    }
}

/// Without a valid session: a page goes to the sign-in page (and back here after); a form is
/// refused; the live refresh is told to stop (401), so it never swaps a sign-in page in.
fn signed_out(parts: &Parts) -> Response {
    if parts.method == Method::GET && !parts.headers.contains_key(LIVE_HEADER) {
        let next = parts.uri.path_and_query().map_or("/ui/", |p| p.as_str());
        let to = format!(
            "/ui/sign-in?next={}",
            percent_encoding::utf8_percent_encode(next, percent_encoding::NON_ALPHANUMERIC)
        );
        return see_other(&to, Vec::new());
    }
    let status = if parts.method == Method::GET {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::FORBIDDEN
    };
    bare_page(
        status,
        "Signed out",
        "Your session has ended or is not valid. Sign in again.",
    )
}

/// A page for a request that has no session to show it with.
fn bare_page(status: StatusCode, title: &str, message: &str) -> Response {
    let chrome = Chrome {
        csrf: None,
        flash: None,
        crumbs: vec![("Sign in".into(), "/ui/sign-in".into())],
    };
    let body = pages::layout(title, &chrome, pages::problem(message));
    (status, html(body)).into_response()
}

fn html(m: Markup) -> ([(header::HeaderName, &'static str); 1], String) {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        m.into_string(),
    )
}

fn see_other(to: &str, cookies: Vec<String>) -> Response {
    let mut resp = (StatusCode::SEE_OTHER, [(header::LOCATION, to.to_string())]).into_response();
    for c in cookies {
        if let Ok(v) = HeaderValue::from_str(&c) {
            resp.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    resp
}

impl Signed {
    /// A full page (with the chrome), or only its live region when the script asks for it.
    /// A flash message shown here is cleared.
    fn page(
        &self,
        title: &str,
        crumbs: Vec<(String, String)>,
        main: impl FnOnce() -> Markup,
        live: Markup,
    ) -> Response {
        if self.live {
            return (StatusCode::OK, html(live)).into_response();
        }
        let chrome = Chrome {
            csrf: Some(&self.csrf),
            flash: self.flash.clone(),
            crumbs,
        };
        let mut resp =
            (StatusCode::OK, html(pages::layout(title, &chrome, main()))).into_response();
        if self.flash.is_some() {
            let clear = set_cookie(FLASH_COOKIE, "", None, self.secure);
            if let Ok(v) = HeaderValue::from_str(&clear) {
                resp.headers_mut().append(header::SET_COOKIE, v);
            }
        }
        resp
    }

    /// A page that could not be read (no such project, the store down), with its status.
    fn problem(&self, e: &ReleaseError) -> Response {
        let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if self.live {
            return status.into_response();
        }
        let chrome = Chrome {
            csrf: Some(&self.csrf),
            flash: None,
            crumbs: vec![("Projects".into(), "/ui/".into())],
        };
        (
            status,
            html(pages::layout(
                "Error",
                &chrome,
                pages::problem(&e.message()),
            )),
        )
            .into_response()
    }

    /// Back to `to` with a message for the next page.
    fn redirect(
        &self,
        state: &DashboardState,
        to: &str,
        kind: FlashKind,
        message: &str,
    ) -> Response {
        let message: String = message.chars().take(FLASH_MAX).collect();
        let cookies = state
            .sessions
            .flash_value(kind, &message)
            .map(|v| {
                set_cookie(
                    FLASH_COOKIE,
                    &v,
                    Some(std::time::Duration::from_secs(60)),
                    self.secure,
                )
            })
            .into_iter()
            .collect();
        see_other(to, cookies)
    }
}

/// Why a form was not acted on.
enum FormRefused {
    /// Its CSRF token is missing or not this session's.
    Csrf,
    /// Its fields are not what the dashboard sends.
    Malformed(String),
}

impl IntoResponse for FormRefused {
    fn into_response(self) -> Response {
        match self {
            FormRefused::Csrf => bare_page(
                StatusCode::FORBIDDEN,
                "Form refused",
                "This form did not come from this session of the dashboard (its CSRF token is \
                 missing or wrong). Reload the page and try again.",
            ),
            FormRefused::Malformed(e) => bare_page(
                StatusCode::BAD_REQUEST,
                "Form not understood",
                &format!("The form's fields are not what the dashboard sends: {e}"),
            ),
        }
    }
}

/// A form's fields, once its CSRF token is checked against the session's. The token is
/// checked before the rest is read, so a forged form learns nothing about its other fields.
fn form<T: DeserializeOwned>(signed: &Signed, body: &[u8]) -> Result<T, FormRefused> {
    let presented = serde_urlencoded::from_bytes::<Vec<(String, String)>>(body)
        .ok()
        .and_then(|pairs| pairs.into_iter().find(|(k, _)| k == "csrf").map(|(_, v)| v))
        .unwrap_or_default();
    if !Sessions::csrf_matches(&signed.csrf, &presented) {
        return Err(FormRefused::Csrf);
    }
    serde_urlencoded::from_bytes::<T>(body).map_err(|e| FormRefused::Malformed(e.to_string()))
}

// ---------------------------------------------------------------------------------------------
// Static files

async fn css() -> Response {
    asset("text/css; charset=utf-8", CSS)
}

async fn js() -> Response {
    asset("text/javascript; charset=utf-8", JS)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        body,
    )
        .into_response()
}

async fn to_root() -> Response {
    see_other("/ui/", Vec::new())
}

// ---------------------------------------------------------------------------------------------
// Sign-in and sign-out

#[derive(Deserialize)]
struct NextQuery {
    #[serde(default)]
    next: Option<String>,
}

/// Only a dashboard path is a place to go back to after signing in (never another site).
fn safe_next(next: Option<&str>) -> &str {
    match next {
        Some(n) if n.starts_with("/ui/") && !n.starts_with("/ui//") && !n.contains('\\') => n,
        _ => "/ui/",
    }
}

async fn sign_in_page(
    State(state): State<DashboardState>,
    headers: HeaderMap,
    Query(q): Query<NextQuery>,
) -> Response {
    sign_in_answer(
        &state,
        &headers,
        StatusCode::OK,
        None,
        safe_next(q.next.as_deref()),
    )
}

/// The sign-in page, with a new pre-session cookie its form's CSRF token is bound to.
fn sign_in_answer(
    state: &DashboardState,
    headers: &HeaderMap,
    status: StatusCode,
    flash: Option<(FlashKind, String)>,
    next: &str,
) -> Response {
    let pre = session::random_token();
    let csrf = state.sessions.pre_session_csrf(&pre);
    let chrome = Chrome {
        csrf: None,
        flash,
        crumbs: Vec::new(),
    };
    let body = pages::layout(
        "Sign in",
        &chrome,
        pages::sign_in(state.sessions.is_open(), &csrf, next),
    );
    let mut resp = (status, html(body)).into_response();
    let cookie = set_cookie(
        PRE_SESSION_COOKIE,
        &pre,
        Some(std::time::Duration::from_secs(3600)),
        !is_loopback(headers),
    );
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    resp
}

#[derive(Deserialize)]
struct SignInForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    token: String,
    #[serde(default)]
    next: Option<String>,
}

async fn sign_in(
    State(state): State<DashboardState>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Response {
    let form: SignInForm = match serde_urlencoded::from_bytes(&body) {
        Ok(f) => f,
        Err(_) => {
            return bare_page(
                StatusCode::BAD_REQUEST,
                "Sign in",
                "The sign-in form was not understood.",
            );
        }
    };
    let next = safe_next(form.next.as_deref()).to_string();
    let pre = cookie_value(&headers, PRE_SESSION_COOKIE).unwrap_or_default();
    let expected = state.sessions.pre_session_csrf(&pre);
    if pre.is_empty() || !Sessions::csrf_matches(&expected, &form.csrf) {
        return sign_in_answer(
            &state,
            &headers,
            StatusCode::FORBIDDEN,
            Some((
                FlashKind::Error,
                "The sign-in form expired (or cookies are off); try again.".into(),
            )),
            &next,
        );
    }
    if !state.sessions.token_matches(form.token.trim()) {
        tracing::warn!("dashboard sign-in refused: wrong token");
        // Guessing costs time: a wrong token is answered only after a pause.
        tokio::time::sleep(FAILED_SIGN_IN_PAUSE).await;
        return sign_in_answer(
            &state,
            &headers,
            StatusCode::UNAUTHORIZED,
            Some((
                FlashKind::Error,
                "That token is not the dashboard's token.".into(),
            )),
            &next,
        );
    }
    let now = chrono::Utc::now().timestamp();
    let Some((_, value)) = state.sessions.issue(now) else {
        return sign_in_answer(&state, &headers, StatusCode::FORBIDDEN, None, &next);
    };
    let secure = !is_loopback(&headers);
    tracing::info!("dashboard sign-in");
    see_other(
        &next,
        vec![
            set_cookie(
                SESSION_COOKIE,
                &value,
                Some(state.sessions.lifetime()),
                secure,
            ),
            set_cookie(PRE_SESSION_COOKIE, "", None, secure),
        ],
    )
}

/// A form with nothing but its CSRF token.
#[derive(Deserialize)]
struct CsrfOnly {}

async fn sign_out(signed: Signed, RawBody(body): RawBody) -> Response {
    if let Err(r) = form::<CsrfOnly>(&signed, &body) {
        return r.into_response();
    }
    see_other(
        "/ui/sign-in",
        vec![
            set_cookie(SESSION_COOKIE, "", None, signed.secure),
            set_cookie(FLASH_COOKIE, "", None, signed.secure),
        ],
    )
}

// ---------------------------------------------------------------------------------------------
// Pages

#[derive(Deserialize)]
struct CursorQuery {
    #[serde(default)]
    cursor: Option<String>,
}

async fn projects(
    State(state): State<DashboardState>,
    signed: Signed,
    Query(q): Query<CursorQuery>,
) -> Response {
    let cursor = q.cursor.as_deref().filter(|c| !c.is_empty());
    match state.service.list_projects(cursor, PROJECTS_PER_PAGE).await {
        Ok(page) => {
            let main = pages::projects(&page.items, page.next.as_deref());
            signed.page("Projects", Vec::new(), || main.clone(), main.clone())
        }
        Err(e) => signed.problem(&e),
    }
}

fn project_crumbs(project: &str) -> Vec<(String, String)> {
    vec![
        ("Projects".into(), "/ui/".into()),
        (project.to_string(), format!("/ui/projects/{project}")),
    ]
}

async fn project(
    State(state): State<DashboardState>,
    signed: Signed,
    Path(name): Path<String>,
    Query(q): Query<CursorQuery>,
) -> Response {
    let read = async {
        let p = state.service.project(&name).await?;
        let overview = state.service.overview(&name).await?;
        let cursor = q.cursor.as_deref().filter(|c| !c.is_empty());
        let page = state
            .service
            .releases_with_candidates(&name, cursor, RELEASES_PER_PAGE)
            .await?;
        Ok::<_, ReleaseError>((p, overview, page.items, page.next))
    };
    match read.await {
        Ok((p, overview, releases, next)) => {
            let live = pages::project_live(&overview, &releases, next.as_deref(), &signed.csrf);
            let defaults = releases
                .first()
                .map(|(r, _)| CutDefaults {
                    commit: r.commit.clone(),
                    branch: r.branch.clone(),
                })
                .unwrap_or_default();
            let csrf = signed.csrf.clone();
            signed.page(
                &p.name,
                project_crumbs(&p.name),
                || pages::project(&p, &defaults, &csrf, live.clone()),
                live.clone(),
            )
        }
        Err(e) => signed.problem(&e),
    }
}

#[derive(Deserialize)]
struct CandidateQuery {
    #[serde(default)]
    candidate: Option<String>,
}

/// A release's candidate and what it brings: the commits since the previous release, with
/// their pull requests.
async fn changelog(
    State(state): State<DashboardState>,
    signed: Signed,
    Path((project, version)): Path<(String, String)>,
    Query(q): Query<CandidateQuery>,
) -> Response {
    let candidate = q.candidate.as_deref().filter(|c| !c.is_empty());
    let mut crumbs = project_crumbs(&project);
    crumbs.push((
        version.clone(),
        format!("/ui/projects/{project}/releases/{version}"),
    ));
    let read = state.service.changelog(&project, &version, candidate).await;
    let (release, candidates) = match state.service.release(&project, &version).await {
        Ok(r) => r,
        Err(e) => return signed.problem(&e),
    };
    let main = pages::changelog(&project, &release, &candidates, candidate, &read);
    signed.page(
        &format!("{version} · {project}"),
        crumbs,
        || main.clone(),
        main.clone(),
    )
}

async fn environment(
    State(state): State<DashboardState>,
    signed: Signed,
    Path((project, env)): Path<(String, String)>,
    Query(q): Query<CursorQuery>,
) -> Response {
    let cursor = q.cursor.as_deref().filter(|c| !c.is_empty());
    let read = async {
        let (cfg, st, active) = state.service.environment(&project, &env).await?;
        let page = state
            .service
            .list_deployments(&project, &env, cursor, DEPLOYMENTS_PER_PAGE)
            .await?;
        let latest = match (cursor, page.items.first()) {
            (None, first) => first.cloned(),
            (Some(_), _) => state
                .service
                .list_deployments(&project, &env, None, 1)
                .await?
                .items
                .into_iter()
                .next(),
        };
        Ok::<_, ReleaseError>((cfg, st, active, page, latest))
    };
    let (cfg, st, active, page, latest) = match read.await {
        Ok(v) => v,
        Err(e) => return signed.problem(&e),
    };
    let rollback = match (&active, rollback_target(latest.as_ref(), &st)) {
        (Some(d), _) => RollbackView::Refused {
            error: "deployment_in_progress",
            message: format!(
                "deployment {} of `{}` is {}; wait for it to finish before rolling back",
                d.id,
                d.candidate_version,
                d.status.as_str()
            ),
        },
        (None, Err(e)) => RollbackView::Refused {
            error: "nothing_to_roll_back",
            message: e.to_string(),
        },
        (None, Ok(target)) if st.frozen => RollbackView::NeedsForce {
            target,
            error: "environment_frozen",
            message: format!(
                "`{env}` is frozen{}",
                st.freeze_reason
                    .as_deref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            ),
        },
        (None, Ok(target)) => RollbackView::Ready(target),
    };
    let view = EnvironmentPage {
        project: &project,
        environment: &cfg.name,
        requires: cfg.requires.as_deref(),
        frozen: st.frozen,
        freeze_reason: st.freeze_reason.as_deref(),
        active: active.as_ref(),
        deployments: &page.items,
        next: page.next.as_deref(),
        rollback,
    };
    let live = pages::environment_live(&view);
    // What waits to be promoted here: read once per page view (not by the live refresh, so a
    // slow Bitbucket never holds it up), and only for a project that names its repository.
    let changes = if signed.live {
        None
    } else {
        match state.service.environment_changelog(&project, &env).await {
            Err(e) if e.kind() == "repository_not_configured" => None,
            other => Some(other),
        }
    };
    let mut crumbs = project_crumbs(&project);
    crumbs.push((
        cfg.name.clone(),
        format!("/ui/projects/{project}/environments/{}", cfg.name),
    ));
    signed.page(
        &format!("{} · {project}", cfg.name),
        crumbs,
        || pages::environment(&view, changes.as_ref(), &signed.csrf, live.clone()),
        live.clone(),
    )
}

async fn operator(State(state): State<DashboardState>, signed: Signed) -> Response {
    let health = serde_json::to_value(assess(&state.health).await.1).unwrap_or_default();
    let store = &state.store;
    let read = async {
        let stats: OutboxStats = store.outbox_stats().await?;
        let oldest = stats
            .oldest_queued_at
            .map(|t| (chrono::Utc::now() - t).num_seconds().max(0));
        let mut outbox = serde_json::to_value(&stats).unwrap_or_default();
        outbox["oldest_age_seconds"] = serde_json::json!(oldest);
        Ok::<_, crate::store::StoreError>((
            outbox,
            store.recent(Ring::PollCycles).await?,
            store.recent(Ring::Posted).await?,
            store.recent(Ring::Refused).await?,
        ))
    };
    match read.await {
        Ok((outbox, cycles, posted, refused)) => {
            let live = pages::operator_live(&health, &outbox, &cycles, &posted, &refused);
            let crumbs = vec![("Operator".to_string(), "/ui/operator".to_string())];
            signed.page(
                "Operator",
                crumbs,
                || maud::html! { h1 { "Operator" } div #live data-live="" { (live.clone()) } },
                live.clone(),
            )
        }
        Err(e) => signed.problem(&ReleaseError::from(e)),
    }
}

// ---------------------------------------------------------------------------------------------
// Actions: each answers 303 back to its page, with what happened.

#[derive(Deserialize)]
struct CutForm {
    commit: String,
    branch: String,
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    bump: Option<Bump>,
}

async fn cut(
    State(state): State<DashboardState>,
    signed: Signed,
    Path(project): Path<String>,
    RawBody(body): RawBody,
) -> Response {
    let f: CutForm = match form(&signed, &body) {
        Ok(f) => f,
        Err(r) => return r.into_response(),
    };
    let back = format!("/ui/projects/{project}");
    let req = CutRequest {
        commit: f.commit.trim().to_string(),
        branch: f.branch.trim().to_string(),
        version: f
            .version
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty()),
        bump: f.bump.unwrap_or_default(),
    };
    match state.service.cut(&project, req).await {
        Ok(c) => signed.redirect(
            &state,
            &back,
            FlashKind::Notice,
            &format!(
                "Cut release {}: candidate {} is {}.",
                c.release.version,
                c.candidate.version,
                c.candidate.state.as_str()
            ),
        ),
        Err(e) => signed.redirect(&state, &back, FlashKind::Error, &refused("cut", &e)),
    }
}

fn refused(what: &str, e: &ReleaseError) -> String {
    format!("The {what} was refused: {}", e.message())
}

#[derive(Deserialize)]
struct DeployForm {
    candidate: String,
}

async fn deploy(
    State(state): State<DashboardState>,
    signed: Signed,
    Path((project, env)): Path<(String, String)>,
    RawBody(body): RawBody,
) -> Response {
    let f: DeployForm = match form(&signed, &body) {
        Ok(f) => f,
        Err(r) => return r.into_response(),
    };
    let back = format!("/ui/projects/{project}");
    let req = DeployRequest {
        release_candidate_version: f.candidate,
        force: false,
    };
    match state.service.deploy(&project, &env, req).await {
        Ok(d) => signed.redirect(
            &state,
            &back,
            FlashKind::Notice,
            &format!(
                "Deploying {} to {env} (deployment {}, {}).",
                d.candidate_version,
                d.id,
                d.status.as_str()
            ),
        ),
        Err(e) => signed.redirect(&state, &back, FlashKind::Error, &refused("deployment", &e)),
    }
}

/// The confirmation a forced rollback needs.
async fn confirm_rollback(
    State(state): State<DashboardState>,
    signed: Signed,
    Path((project, env)): Path<(String, String)>,
) -> Response {
    let read = async {
        let (_, st, active) = state.service.environment(&project, &env).await?;
        let latest = state
            .service
            .list_deployments(&project, &env, None, 1)
            .await?
            .items
            .into_iter()
            .next();
        Ok::<_, ReleaseError>((st, active, latest))
    };
    let (st, active, latest) = match read.await {
        Ok(v) => v,
        Err(e) => return signed.problem(&e),
    };
    let back = format!("/ui/projects/{project}/environments/{env}");
    if active.is_some() {
        return signed.redirect(
            &state,
            &back,
            FlashKind::Error,
            "A deployment is running here; a rollback waits for it to finish.",
        );
    }
    let target = match rollback_target(latest.as_ref(), &st) {
        Ok(t) => t,
        Err(e) => return signed.redirect(&state, &back, FlashKind::Error, &e.to_string()),
    };
    let why = if st.frozen {
        format!(
            "`{env}` is frozen{}",
            st.freeze_reason
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        )
    } else {
        "nothing: a normal rollback would start".to_string()
    };
    let mut crumbs = project_crumbs(&project);
    crumbs.push((env.clone(), back.clone()));
    let main = pages::confirm_rollback(&project, &env, &target, &why, &signed.csrf);
    signed.page(
        "Confirm the rollback",
        crumbs,
        || main.clone(),
        main.clone(),
    )
}

#[derive(Deserialize)]
struct RollbackForm {
    #[serde(default)]
    force: Option<String>,
    #[serde(default)]
    confirm: Option<String>,
}

async fn rollback(
    State(state): State<DashboardState>,
    signed: Signed,
    Path((project, env)): Path<(String, String)>,
    RawBody(body): RawBody,
) -> Response {
    let f: RollbackForm = match form(&signed, &body) {
        Ok(f) => f,
        Err(r) => return r.into_response(),
    };
    let back = format!("/ui/projects/{project}/environments/{env}");
    let force = f.force.as_deref() == Some("true");
    if force && f.confirm.as_deref() != Some("yes") {
        // A forced rollback is only ever the confirmation page's.
        return see_other(&format!("{back}/rollback?force=1"), Vec::new());
    }
    match state
        .service
        .rollback(&project, &env, RollbackRequest { force })
        .await
    {
        Ok(d) => signed.redirect(
            &state,
            &back,
            FlashKind::Notice,
            &format!(
                "Rolling {env} back to {}{} (deployment {}).",
                d.candidate_version,
                if force { ", forced" } else { "" },
                d.id
            ),
        ),
        Err(e) => signed.redirect(&state, &back, FlashKind::Error, &refused("rollback", &e)),
    }
}

#[derive(Deserialize)]
struct FreezeForm {
    #[serde(default)]
    reason: String,
}

async fn freeze(
    State(state): State<DashboardState>,
    signed: Signed,
    Path((project, env)): Path<(String, String)>,
    RawBody(body): RawBody,
) -> Response {
    let f: FreezeForm = match form(&signed, &body) {
        Ok(f) => f,
        Err(r) => return r.into_response(),
    };
    let reason = f.reason.trim().to_string();
    set_frozen(
        &state,
        &signed,
        &project,
        &env,
        true,
        Some(reason).filter(|r| !r.is_empty()),
    )
    .await
}

async fn unfreeze(
    State(state): State<DashboardState>,
    signed: Signed,
    Path((project, env)): Path<(String, String)>,
    RawBody(body): RawBody,
) -> Response {
    if let Err(r) = form::<CsrfOnly>(&signed, &body) {
        return r.into_response();
    }
    set_frozen(&state, &signed, &project, &env, false, None).await
}

async fn set_frozen(
    state: &DashboardState,
    signed: &Signed,
    project: &str,
    env: &str,
    frozen: bool,
    reason: Option<String>,
) -> Response {
    let back = format!("/ui/projects/{project}/environments/{env}");
    let what = if frozen { "freeze" } else { "unfreeze" };
    match state
        .service
        .freeze(project, env, FreezeRequest { frozen, reason })
        .await
    {
        Ok(st) => signed.redirect(
            state,
            &back,
            FlashKind::Notice,
            &if st.frozen {
                format!(
                    "Froze {env}{}. Deploys are refused until it is unfrozen.",
                    st.freeze_reason
                        .as_deref()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default()
                )
            } else {
                format!("Unfroze {env}.")
            },
        ),
        Err(e) => signed.redirect(state, &back, FlashKind::Error, &refused(what, &e)),
    }
}
