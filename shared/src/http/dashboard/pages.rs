//! The dashboard's pages as HTML (maud: written in Rust, every value escaped by construction).
//! Each page is a function of what the handler read; nothing here touches the store.
//!
//! A page's changing part is its `#live` region, which `app.js` fetches again every few seconds
//! ([`LIVE_HEADER`]) and swaps in; without JavaScript the page is complete as served.

use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, html};
use serde_json::Value;

use super::session::FlashKind;
use crate::release::ReleaseError;
use crate::release::changelog::{Changelog, ChangelogCommit, EnvironmentChangelog};
use crate::release::model::{Candidate, Deployment, Project, Release};
use crate::release::service::{EnvironmentOverview, Overview, RefusalView, Waiting};

/// Sent by `app.js` when it fetches a page again for its live region only.
pub const LIVE_HEADER: &str = "x-kitebridge-live";

/// What every signed-in page shows around its content.
pub struct Chrome<'a> {
    /// The sign-out form's CSRF token; `None` on the sign-in page.
    pub csrf: Option<&'a str>,
    pub flash: Option<(FlashKind, String)>,
    /// Where the page is, for the navigation.
    pub crumbs: Vec<(String, String)>,
}

/// A whole page: `title`, the chrome, and `main`.
pub fn layout(title: &str, chrome: &Chrome<'_>, main: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="color-scheme" content="light dark";
                title { (title) " · kitebridge" }
                link rel="stylesheet" href=(super::CSS_PATH);
                script src=(super::JS_PATH) defer {}
            }
            body {
                a.skip href="#main" { "Skip to content" }
                header {
                    nav aria-label="Main" {
                        a.brand href="/ui/" { "kitebridge" }
                        @if chrome.csrf.is_some() {
                            a href="/ui/" { "Projects" }
                            a href="/ui/operator" { "Operator" }
                        }
                        @if let Some(csrf) = chrome.csrf {
                            form #sign-out method="post" action="/ui/sign-out" {
                                input type="hidden" name="csrf" value=(csrf);
                                button type="submit" { "Sign out" }
                            }
                        }
                    }
                    @if !chrome.crumbs.is_empty() {
                        nav.crumbs aria-label="Breadcrumb" {
                            ol {
                                @for (i, (label, href)) in chrome.crumbs.iter().enumerate() {
                                    li {
                                        @if i + 1 == chrome.crumbs.len() {
                                            a href=(href) aria-current="page" { (label) }
                                        } @else {
                                            a href=(href) { (label) }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                main #main tabindex="-1" {
                    @if let Some((kind, message)) = &chrome.flash {
                        @let role = if *kind == FlashKind::Error { "alert" } else { "status" };
                        p #flash class=(kind.as_str()) role=(role) { (message) }
                    }
                    (main)
                }
            }
        }
    }
}

pub fn sign_in(open: bool, csrf: &str, next: &str) -> Markup {
    html! {
        h1 { "Sign in" }
        @if open {
            form #sign-in method="post" action="/ui/sign-in" {
                input type="hidden" name="csrf" value=(csrf);
                input type="hidden" name="next" value=(next);
                label for="token" { "API token" }
                input #token type="password" name="token" required autocomplete="current-password"
                    autofocus;
                button type="submit" { "Sign in" }
            }
            p.hint { "The same token the releases API takes (" code { "KITEBRIDGE_DASHBOARD_TOKEN" }
                ", or " code { "KITEBRIDGE_API_TOKEN" } "). You stay signed in on this browser until you sign out or the session ends." }
        } @else {
            p #flash.error role="alert" {
                "The dashboard is closed: no token is configured. Set "
                code { "KITEBRIDGE_DASHBOARD_TOKEN" } " (or " code { "KITEBRIDGE_API_TOKEN" }
                " when the API checks a bearer token) and restart."
            }
        }
    }
}

pub fn projects(items: &[Project], next: Option<&str>) -> Markup {
    html! {
        h1 { "Projects" }
        @if items.is_empty() {
            p { "No projects yet. Create one with " code { "PUT /projects/{name}" }
                " (see docs/releases.md)." }
        } @else {
            ul.projects {
                @for p in items {
                    li {
                        a data-project=(p.name) href=(format!("/ui/projects/{}", p.name)) { (p.name) }
                        " "
                        span.muted {
                            (p.environments.iter().map(|e| e.name.as_str()).collect::<Vec<_>>().join(" → "))
                        }
                    }
                }
            }
        }
        @if let Some(n) = next {
            a.more href=(format!("/ui/?cursor={n}")) { "More projects" }
        }
    }
}

/// A project: the cut form, the grid of environments and the releases with their candidates.
pub fn project(project: &Project, cut: &CutDefaults, csrf: &str, live: Markup) -> Markup {
    html! {
        h1 { (project.name) }
        details.cut open[cut.commit.is_empty()] {
            summary { "Cut a release" }
            form #cut method="post" action=(format!("/ui/projects/{}/cut", project.name)) {
                input type="hidden" name="csrf" value=(csrf);
                div.field {
                    label for="commit" { "Commit" }
                    input #commit name="commit" required pattern="[0-9a-fA-F]{40}|[0-9a-fA-F]{64}"
                        value=(cut.commit) spellcheck="false" autocomplete="off"
                        aria-describedby="commit-hint";
                    small #commit-hint { "The full SHA the release is built from." }
                }
                div.field {
                    label for="branch" { "Branch" }
                    input #branch name="branch" required value=(cut.branch) autocomplete="off";
                }
                div.field {
                    label for="version" { "Version" }
                    input #version name="version" placeholder="next" autocomplete="off"
                        aria-describedby="version-hint";
                    small #version-hint { "Empty: the next version by the project's scheme." }
                }
                div.field {
                    label for="bump" { "Bump" }
                    select #bump name="bump" {
                        option value="minor" selected { "minor" }
                        option value="patch" { "patch" }
                        option value="major" { "major" }
                    }
                }
                button type="submit" { "Cut" }
            }
        }
        div #live data-live="" { (live) }
    }
}

/// What the cut form starts with: the last cut's commit and branch.
#[derive(Default)]
pub struct CutDefaults {
    pub commit: String,
    pub branch: String,
}

/// The project page's live part: environments side by side, then the releases.
pub fn project_live(
    overview: &Overview,
    releases: &[(Release, Vec<Candidate>)],
    next: Option<&str>,
    csrf: &str,
) -> Markup {
    let columns: Vec<Column<'_>> = overview.environments.iter().map(Column::of).collect();
    let columns = &columns;
    html! {
        h2 #environments-heading { "Environments" }
        @if overview.environments.is_empty() {
            p { "This project has no environments." }
        }
        div #environments.grid aria-labelledby="environments-heading" {
            @for env in &overview.environments {
                (environment_card(&overview.project, env, csrf))
            }
        }
        h2 #releases-heading { "Releases" }
        @if releases.is_empty() {
            p { "Nothing cut yet." }
        } @else {
            div.table-wrap {
                table #releases aria-labelledby="releases-heading" {
                    thead { tr {
                        th scope="col" { "Candidate" }
                        th scope="col" { "Commit" }
                        th scope="col" { "State" }
                        th scope="col" { "Buildkite" }
                        th scope="col" { "Build" }
                        @for e in columns { th scope="col" { (e.name) } }
                        th scope="col" { "Cut" }
                    } }
                    tbody {
                        @for (_, candidates) in releases {
                            @for c in candidates.iter().rev() {
                                tr data-candidate=(c.version) {
                                    th scope="row" {
                                        a.changelog-link href=(format!("/ui/projects/{}/releases/{}?candidate={}", overview.project, c.release_version, c.version)) { (c.version) }
                                    }
                                    td.commit { code title=(c.commit) { (short(&c.commit)) } " " span.muted { (c.branch) } }
                                    td.candidate-state { span class=(format!("badge {}", c.state.as_str())) { (c.state.as_str()) }
                                        @if let Some(m) = &c.error_message { " " small.muted { (m) } } }
                                    td.build-state { (c.build_state.as_deref().unwrap_or("—")) }
                                    td { (build_link(c.build.as_ref())) }
                                    @for e in columns {
                                        td.where data-environment=(e.name) { (e.cell(&c.version)) }
                                    }
                                    td { (when(c.created_at)) }
                                }
                            }
                        }
                    }
                }
            }
        }
        @if let Some(n) = next {
            a.more href=(format!("/ui/projects/{}?cursor={n}", overview.project)) { "Older releases" }
        }
    }
}

/// An environment as a column of the releases table: where each candidate runs or ran.
struct Column<'a> {
    name: &'a str,
    current: Option<&'a str>,
    deploying: Option<&'a Deployment>,
    successes: &'a [String],
}

impl<'a> Column<'a> {
    fn of(env: &'a EnvironmentOverview) -> Column<'a> {
        Column {
            name: &env.name,
            current: env.current.as_ref().map(|d| d.candidate_version.as_str()),
            deploying: env.deploying.as_ref(),
            successes: &env.successes,
        }
    }

    fn cell(&self, version: &str) -> Markup {
        html! {
            @if self.deploying.is_some_and(|d| d.candidate_version == version) {
                span.badge.in_progress { "deploying" }
            } @else if self.current == Some(version) {
                span.badge.success { "running" }
            } @else if self.successes.iter().any(|s| s == version) {
                span.muted { "was deployed" }
            } @else {
                span.muted { "—" }
            }
        }
    }
}

fn environment_card(project: &str, env: &EnvironmentOverview, csrf: &str) -> Markup {
    let href = format!("/ui/projects/{project}/environments/{}", env.name);
    html! {
        section.environment.frozen[env.frozen] data-environment=(env.name)
            aria-labelledby=(format!("env-{}", env.name)) {
            h3 id=(format!("env-{}", env.name)) {
                a.environment-link href=(href) { (env.name) }
                @if env.frozen { " " span.frozen-badge.badge { "frozen" } }
            }
            @if let Some(r) = &env.requires { p.muted { "after " (r) } }
            @if env.frozen {
                p.freeze-reason { "Frozen" @if let Some(r) = &env.freeze_reason { ": " (r) } }
            }
            dl {
                dt { "Running" }
                dd.current {
                    @match &env.current {
                        Some(d) => { strong { (d.candidate_version) } " " span.muted { "since " (when(d.finished_at.unwrap_or(d.updated_at))) } },
                        None => span.muted { "Nothing deployed" },
                    }
                }
                @if let Some(p) = &env.previous {
                    dt { "Before" }
                    dd.previous { (p.candidate_version) }
                }
                @if let Some(d) = &env.deploying {
                    dt { "Deploying" }
                    dd.deploying { strong { (d.candidate_version) } " " span class=(format!("badge {}", d.status.as_str())) { (d.status.as_str()) }
                        @if d.rollback { " (rollback)" } }
                }
            }
            @if !env.candidates.is_empty() {
                h4 { "Ready to deploy" }
                ul.waiting-list {
                    @for w in &env.candidates { (waiting(project, &env.name, env.freeze_reason.as_deref(), w, csrf)) }
                }
            }
        }
    }
}

/// A refusal as the page words it: the API's message, except where it names an API field the
/// page has no control for (a frozen environment's "pass `force`").
fn refusal_words(r: &RefusalView, environment: &str, freeze_reason: Option<&str>) -> String {
    if r.error == "environment_frozen" {
        let why = freeze_reason.map(|r| format!(": {r}")).unwrap_or_default();
        format!("{environment} is frozen{why}; unfreeze it to deploy")
    } else {
        r.message.clone()
    }
}

fn waiting(
    project: &str,
    environment: &str,
    freeze_reason: Option<&str>,
    w: &Waiting,
    csrf: &str,
) -> Markup {
    let reason_id = format!("why-{environment}-{}", w.version);
    html! {
        li.waiting data-candidate=(w.version) {
            span.version { (w.version) } " " code.muted title=(w.commit) { (short(&w.commit)) }
            @match &w.refusal {
                None => {
                    form.deploy method="post" action=(format!("/ui/projects/{project}/environments/{environment}/deploy")) {
                        input type="hidden" name="csrf" value=(csrf);
                        input type="hidden" name="candidate" value=(w.version);
                        button type="submit" { "Deploy " span.visually-hidden { (w.version) " to " (environment) } }
                    }
                },
                Some(r) => {
                    button type="button" disabled aria-describedby=(reason_id) { "Deploy" }
                    p.refusal id=(reason_id) data-error=(r.error) { (refusal_words(r, environment, freeze_reason)) }
                },
            }
        }
    }
}

/// A release's page: its candidates, and what the chosen one (the newest by default) brings.
pub fn changelog(
    project: &str,
    release: &Release,
    candidates: &[Candidate],
    chosen: Option<&str>,
    log: &Result<Changelog, ReleaseError>,
) -> Markup {
    let chosen = chosen
        .map(str::to_owned)
        .or_else(|| candidates.last().map(|c| c.version.clone()))
        .unwrap_or_default();
    html! {
        h1 { "Release " (release.version) " " span.muted { "of " (project) } }
        p.muted { "Cut from " code title=(release.commit) { (short(&release.commit)) } " on " (release.branch) " at " (when(release.created_at)) }
        nav aria-label="Candidates" {
            ul.candidates {
                @for c in candidates.iter().rev() {
                    li {
                        @if c.version == chosen {
                            strong aria-current="true" { (c.version) }
                        } @else {
                            a href=(format!("/ui/projects/{project}/releases/{}?candidate={}", release.version, c.version)) { (c.version) }
                        }
                        " " span class=(format!("badge {}", c.state.as_str())) { (c.state.as_str()) }
                    }
                }
            }
        }
        h2 #changes-heading { "What " (chosen) " brings" }
        @match log {
            Err(e) => p.refusal data-error=(e.kind()) { (e.message()) },
            Ok(log) => {
                p.muted {
                    @let n = log.commits.len();
                    @let commits = if n == 1 { "commit" } else { "commits" };
                    @match &log.since_candidate_version {
                        Some(v) => { (n) " " (commits) " since " (v) }
                        None => { "The project's first release: " (n) " " (commits) }
                    }
                    @if !log.complete { " (the first " (log.commits.len()) " shown)" }
                    " · " (log.repository)
                }
                @if log.commits.is_empty() {
                    p { "No new commits." }
                } @else {
                    div #changelog { (commit_list(&log.commits)) }
                }
            },
        }
    }
}

/// What the environment page shows about a rollback now.
pub enum RollbackView {
    /// It would start: back to this candidate.
    Ready(String),
    /// It would be refused unless forced (frozen): back to this candidate.
    NeedsForce {
        target: String,
        error: &'static str,
        message: String,
    },
    /// It would be refused: nothing to go back to, or a deployment runs.
    Refused {
        error: &'static str,
        message: String,
    },
}

pub struct EnvironmentPage<'a> {
    pub project: &'a str,
    pub environment: &'a str,
    pub requires: Option<&'a str>,
    pub frozen: bool,
    pub freeze_reason: Option<&'a str>,
    pub active: Option<&'a Deployment>,
    pub deployments: &'a [Deployment],
    pub next: Option<&'a str>,
    pub rollback: RollbackView,
}

pub fn environment(
    page: &EnvironmentPage<'_>,
    changes: Option<&Result<EnvironmentChangelog, ReleaseError>>,
    csrf: &str,
    live: Markup,
) -> Markup {
    let base = format!(
        "/ui/projects/{}/environments/{}",
        page.project, page.environment
    );
    html! {
        h1 { (page.environment) " " span.muted { "in " (page.project) } }
        @if let Some(r) = page.requires { p.muted { "Deploys after " (r) " (promotion order)." } }
        div.actions {
            @if page.frozen {
                form #unfreeze method="post" action=(format!("{base}/unfreeze")) {
                    input type="hidden" name="csrf" value=(csrf);
                    button type="submit" { "Unfreeze" }
                }
            } @else {
                form #freeze method="post" action=(format!("{base}/freeze")) {
                    input type="hidden" name="csrf" value=(csrf);
                    label for="reason" { "Reason" }
                    input #reason name="reason" required maxlength="1000" placeholder="e.g. holiday freeze";
                    button type="submit" { "Freeze" }
                }
            }
            (rollback_action(&base, &page.rollback, csrf))
        }
        div #live data-live="" { (live) }
        @if let Some(changes) = changes {
            section #waiting aria-labelledby="waiting-heading" {
                h2 #waiting-heading { "Waiting to be promoted" }
                @match changes {
                    Err(e) => p.refusal data-error=(e.kind()) { (e.message()) },
                    Ok(c) => {
                        @match &c.waiting {
                            None => p.muted { "Nothing: " (page.environment) " runs the newest candidate it can." },
                            Some(w) => {
                                p {
                                    strong { (w.candidate_version) }
                                    @if let Some(from) = &c.waiting_in { " runs in " (from) }
                                    " and would bring " (c.commits.len())
                                    @if c.commits.len() == 1 { " commit" } @else { " commits" }
                                    @match &c.deployed {
                                        Some(d) => { " over " (d.candidate_version) }
                                        None => {}
                                    }
                                    ":"
                                }
                                (commit_list(&c.commits))
                            },
                        }
                    },
                }
            }
        }
    }
}

fn commit_list(commits: &[ChangelogCommit]) -> Markup {
    html! {
        ol.changelog {
            @for c in commits {
                li data-commit=(c.commit.id) {
                    code title=(c.commit.id) { (short(&c.commit.id)) } " "
                    span.summary { (c.commit.summary) } " "
                    span.muted { (c.commit.author) }
                    @match &c.pull_requests {
                        None => { " " span.muted { "(pull requests not known yet)" } },
                        Some(prs) => {
                            @for pr in prs {
                                " "
                                @match pr.url.as_deref() {
                                    Some(u) => a.pull-request href=(u) rel="noreferrer" { "#" (pr.id) " " (pr.title) },
                                    None => span.pull-request { "#" (pr.id) " " (pr.title) },
                                }
                                " " span class=(format!("badge {}", pr.state.to_ascii_lowercase())) { (pr.state.to_ascii_lowercase()) }
                            }
                        },
                    }
                }
            }
        }
    }
}

fn rollback_action(base: &str, view: &RollbackView, csrf: &str) -> Markup {
    html! {
        @match view {
            RollbackView::Ready(target) => {
                form #rollback method="post" action=(format!("{base}/rollback")) {
                    input type="hidden" name="csrf" value=(csrf);
                    button type="submit" { "Roll back to " (target) }
                }
            },
            RollbackView::NeedsForce { target, error, message } => {
                div #rollback {
                    button type="button" disabled aria-describedby="rollback-why" { "Roll back to " (target) }
                    p.refusal #rollback-why data-error=(error) { (message) }
                    a #rollback-force.button href=(format!("{base}/rollback?force=1")) { "Force the rollback…" }
                }
            },
            RollbackView::Refused { error, message } => {
                div #rollback {
                    button type="button" disabled aria-describedby="rollback-why" { "Roll back" }
                    p.refusal #rollback-why data-error=(error) { (message) }
                }
            },
        }
    }
}

/// The environment page's live part: its state and its deployment history.
pub fn environment_live(page: &EnvironmentPage<'_>) -> Markup {
    html! {
        @if page.frozen {
            p.freeze-reason { span.frozen-badge.badge { "frozen" } " "
                (page.freeze_reason.unwrap_or("no reason given")) }
        }
        @if let Some(d) = page.active {
            p.deploying { "Deploying " strong { (d.candidate_version) } " "
                span class=(format!("badge {}", d.status.as_str())) { (d.status.as_str()) } }
        }
        h2 #history-heading { "Deployments" }
        @if page.deployments.is_empty() {
            p { "Nothing deployed here yet." }
        } @else {
            div.table-wrap {
                table #deployments aria-labelledby="history-heading" {
                    thead { tr {
                        th scope="col" { "Candidate" }
                        th scope="col" { "Status" }
                        th scope="col" { "From" }
                        th scope="col" { "Build" }
                        th scope="col" { "Started" }
                        th scope="col" { "Finished" }
                    } }
                    tbody {
                        @for d in page.deployments {
                            tr data-deployment=(d.id) {
                                th.candidate scope="row" { (d.candidate_version)
                                    @if d.rollback { " " span.badge.rollback { "rollback" } }
                                    @if d.forced { " " span.badge.forced { "forced" } } }
                                td.status { span class=(format!("badge {}", d.status.as_str())) { (d.status.as_str()) }
                                    @if let Some(m) = &d.error_message { " " small.muted { (m) } } }
                                td { (d.from_candidate_version.as_deref().unwrap_or("—")) }
                                td { (build_link(d.build.as_ref())) }
                                td { (when(d.created_at)) }
                                td { @match d.finished_at { Some(t) => (when(t)), None => span.muted { "—" } } }
                            }
                        }
                    }
                }
            }
        }
        @if let Some(n) = page.next {
            a.more href=(format!("/ui/projects/{}/environments/{}?cursor={n}", page.project, page.environment)) { "Older deployments" }
        }
    }
}

pub fn confirm_rollback(
    project: &str,
    environment: &str,
    target: &str,
    why: &str,
    csrf: &str,
) -> Markup {
    let base = format!("/ui/projects/{project}/environments/{environment}");
    html! {
        h1 { "Force a rollback of " (environment) "?" }
        p { "A normal rollback is refused: " strong.refusal { (why) } }
        p { "Forcing it deploys " strong { (target) } " to " (environment)
            " anyway. The deployment is marked as forced." }
        form #confirm-rollback method="post" action=(format!("{base}/rollback")) {
            input type="hidden" name="csrf" value=(csrf);
            input type="hidden" name="force" value="true";
            input type="hidden" name="confirm" value="yes";
            button.danger type="submit" { "Yes, force the rollback to " (target) }
            " "
            a href=(base) { "Cancel" }
        }
    }
}

/// kitebridge's own state: health, the outbox, the last poll cycles, statuses posted and
/// refused.
pub fn operator_live(
    health: &Value,
    outbox: &Value,
    cycles: &[Value],
    posted: &[Value],
    refused: &[Value],
) -> Markup {
    let status = health["status"].as_str().unwrap_or("unknown");
    html! {
        section #health aria-labelledby="health-heading" {
            h2 #health-heading { "Health " span class=(format!("badge {status}")) { (status) } }
            @if let Some(problems) = health["problems"].as_array().filter(|p| !p.is_empty()) {
                ul.problems { @for p in problems { li { (text(p)) } } }
            }
            (key_values(health, &["store", "last_successful_poll"]))
        }
        section #outbox aria-labelledby="outbox-heading" {
            h2 #outbox-heading { "Outbox" }
            (key_values(outbox, &["depth", "oldest_age_seconds", "oldest_queued_at", "corrupt"]))
        }
        section #poll-cycles aria-labelledby="cycles-heading" {
            h2 #cycles-heading { "Last poll cycles" }
            (records(cycles, "No poll cycle recorded yet."))
        }
        section #recent-posted aria-labelledby="posted-heading" {
            h2 #posted-heading { "Statuses posted (sampled)" }
            (records(posted, "None yet."))
        }
        section #recent-refused aria-labelledby="refused-heading" {
            h2 #refused-heading { "Statuses refused (sampled)" }
            (records(refused, "None."))
        }
    }
}

fn key_values(v: &Value, keys: &[&str]) -> Markup {
    html! {
        dl.kv {
            @for k in keys {
                dt { (k.replace('_', " ")) }
                dd { (text(&v[*k])) }
            }
        }
    }
}

/// A table of JSON records; its columns are the first record's keys.
fn records(items: &[Value], empty: &str) -> Markup {
    let columns: Vec<&String> = items
        .first()
        .and_then(Value::as_object)
        .map(|o| o.keys().collect())
        .unwrap_or_default();
    html! {
        @if items.is_empty() {
            p.muted { (empty) }
        } @else {
            div.table-wrap {
                table {
                    thead { tr { @for c in &columns { th scope="col" { (c.replace('_', " ")) } } } }
                    tbody {
                        @for item in items {
                            tr { @for c in &columns { td { (text(&item[c.as_str()])) } } }
                        }
                    }
                }
            }
        }
    }
}

/// A page that says what went wrong (a project that does not exist, the store down).
pub fn problem(message: &str) -> Markup {
    html! {
        h1 { "Something is not right" }
        p #flash.error role="alert" { (message) }
        p { a href="/ui/" { "Back to the projects" } }
    }
}

/// A Buildkite build's number, linked to its page when Buildkite gave one.
fn build_link(build: Option<&crate::release::model::BuildRef>) -> Markup {
    html! {
        @match build {
            Some(b) => {
                @match b.web_url.as_deref() {
                    Some(url) => a.build-link href=(url) rel="noreferrer" { "#" (b.number) },
                    None => span { "#" (b.number) },
                }
            },
            None => span.muted { "—" },
        }
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "—".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn short(sha: &str) -> &str {
    sha.get(..12).unwrap_or(sha)
}

fn when(t: DateTime<Utc>) -> Markup {
    html! { time datetime=(t.to_rfc3339()) { (t.format("%Y-%m-%d %H:%M UTC")) } }
}
