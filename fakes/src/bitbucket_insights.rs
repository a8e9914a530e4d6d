//! Data Center Code Insights (5.15+) and Bitbucket Cloud commit reports.

use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

use super::deploy::invalid_commit;
use super::extra::{RepoId, is_http_url, is_local_url};
use super::{
    Inner, StatusScope, check_text, cloud_error, dc_error, is_full_sha, lock, parse_dc_body,
    validation_failed,
};

/// A report as currently stored (Data Center Code Insights or Bitbucket Cloud).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredReport {
    /// [`StatusScope::Repository`] on Data Center, [`StatusScope::Cloud`] on Cloud.
    pub scope: StatusScope,
    /// Commit SHA, lower case.
    pub commit: String,
    /// The report key (Data Center `{key}`, Cloud `{reportId}`) as in the path.
    pub key: String,
    /// The report as stored and answered by GET: the PUT body in the flavour's own shape, plus
    /// `key` and `createdDate` (Data Center) or `uuid`, `created_on`, `updated_on` (Cloud).
    pub report: Value,
    /// Who created it (username, or `token:<token>` for an access token).
    pub creator: String,
    /// How many PUTs this (repository, commit, key) has had, counting those before any DELETE.
    pub puts: usize,
    /// When it was first PUT (since its last DELETE).
    pub created_at: DateTime<Utc>,
    /// When it was last PUT.
    pub updated_at: DateTime<Utc>,
    seq: u64,
}

/// An annotation as stored: the posted JSON object plus what the fake adds.
pub(super) type StoredAnnotation = Value;

type ReportId = (RepoId, String, String);

const DC_DATA_TYPES: &[&str] = &[
    "BOOLEAN",
    "DATE",
    "DURATION",
    "LINK",
    "NUMBER",
    "PERCENTAGE",
    "TEXT",
];

/// Check a report's `data` array: at most `max` items, type enum, value consistent with the type.
/// `link_text` is the LINK value's text field (`linktext` on Data Center, `text` on Cloud).
fn check_data(
    data: Option<&Value>,
    max: usize,
    link_text: &str,
    cloud: bool,
    errors: &mut Vec<(String, String)>,
) {
    let items = match data {
        None | Some(Value::Null) => return,
        Some(Value::Array(a)) => a,
        Some(_) => {
            errors.push(("data".to_owned(), "data must be an array".to_owned()));
            return;
        }
    };
    if items.len() > max {
        errors.push((
            "data".to_owned(),
            format!("data can have at most {max} items (it has {})", items.len()),
        ));
    }
    for (i, item) in items.iter().enumerate() {
        let ctx = format!("data[{i}]");
        let Some(obj) = item.as_object() else {
            errors.push((
                ctx,
                "a data item must be an object {title, type, value}".to_owned(),
            ));
            continue;
        };
        if !obj.get("title").is_some_and(Value::is_string) {
            errors.push((format!("{ctx}.title"), "title is required".to_owned()));
        }
        let value = obj.get("value").unwrap_or(&Value::Null);
        if value.is_null() {
            errors.push((format!("{ctx}.value"), "value is required".to_owned()));
            continue;
        }
        let ok = match obj.get("type") {
            None | Some(Value::Null) => !(value.is_array() || value.is_object()),
            Some(Value::String(t)) => match t.as_str() {
                "BOOLEAN" => value.is_boolean(),
                "DATE" | "DURATION" | "NUMBER" => value.is_number(),
                "PERCENTAGE" => value.as_f64().is_some_and(|p| (0.0..=100.0).contains(&p)),
                "TEXT" => value.is_string(),
                "LINK" => value.as_object().is_some_and(|l| {
                    l.get(link_text).is_some_and(Value::is_string)
                        && l.get("href")
                            .and_then(Value::as_str)
                            .is_some_and(|h| is_http_url(h) && !(cloud && is_local_url(h)))
                }),
                other => {
                    errors.push((
                        format!("{ctx}.type"),
                        format!(
                            "{other} is not a valid data type; expected one of {}",
                            DC_DATA_TYPES.join(", ")
                        ),
                    ));
                    true
                }
            },
            Some(_) => false,
        };
        if !ok {
            let t = obj.get("type").and_then(Value::as_str).unwrap_or("(none)");
            let hint = if t == "LINK" {
                format!(" (LINK needs {{\"{link_text}\", \"href\"}} with an http(s) href)")
            } else if t == "PERCENTAGE" {
                " (a number from 0 to 100)".to_owned()
            } else {
                String::new()
            };
            errors.push((
                format!("{ctx}.value"),
                format!("value {value} does not match type {t}{hint}"),
            ));
        }
    }
}

/// Check an optional URL field: http(s), and on Cloud not pointing at localhost.
fn check_url(
    obj: &Map<String, Value>,
    field: &str,
    cloud: bool,
    errors: &mut Vec<(String, String)>,
) {
    match obj.get(field) {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if is_http_url(s) => {
            if cloud && is_local_url(s) {
                errors.push((
                    field.to_owned(),
                    format!("{field} must not point at localhost"),
                ));
            }
        }
        Some(_) => errors.push((
            field.to_owned(),
            format!("{field} must be an absolute http or https URL"),
        )),
    }
}

fn check_enum(
    obj: &Map<String, Value>,
    field: &str,
    required: bool,
    allowed: &[&str],
    errors: &mut Vec<(String, String)>,
) {
    match obj.get(field) {
        None | Some(Value::Null) => {
            if required {
                errors.push((field.to_owned(), format!("{field} is required")));
            }
        }
        Some(Value::String(s)) if allowed.contains(&s.as_str()) => {}
        Some(other) => errors.push((
            field.to_owned(),
            format!(
                "{other} is not a valid {field}; expected one of {}",
                allowed.join(", ")
            ),
        )),
    }
}

fn prefixed(prefix: &str, errors: Vec<(String, String)>) -> Vec<(String, String)> {
    errors
        .into_iter()
        .map(|(c, m)| (format!("{prefix}.{c}"), m))
        .collect()
}

fn cloud_bad_request(errors: &[(String, String)]) -> Response {
    let mut fields = Map::new();
    for (c, m) in errors {
        fields.insert(c.clone(), json!([m]));
    }
    let summary = errors
        .iter()
        .map(|(c, m)| format!("{c}: {m}"))
        .collect::<Vec<_>>()
        .join("; ");
    cloud_error(
        StatusCode::BAD_REQUEST,
        format!("report-service.general.bad-request: {summary}"),
        Some(Value::Object(fields)),
    )
}

impl Inner {
    fn report_id(&self, owner: &str, slug: &str, commit: &str, key: &str) -> ReportId {
        (
            self.repo_key(owner, slug),
            commit.to_ascii_lowercase(),
            key.to_owned(),
        )
    }

    fn scope_of(&self, owner: &str, slug: &str) -> StatusScope {
        let (o, s) = self.repo_key(owner, slug);
        if self.cloud() {
            StatusScope::Cloud {
                workspace: o,
                repo_slug: s,
            }
        } else {
            StatusScope::Repository {
                project_key: o,
                slug: s,
            }
        }
    }

    /// Store a report (PUT), keeping the creator and creation time of an existing one.
    fn store_report(
        &self,
        id: ReportId,
        scope: StatusScope,
        mut report: Value,
        user: &str,
    ) -> StoredReport {
        let now = Utc::now();
        let mut store = lock(&self.extra);
        let puts = {
            let n = store.report_puts.entry(id.clone()).or_insert(0);
            *n += 1;
            *n
        };
        store.seq += 1;
        let seq = store.seq;
        let (creator, created_at, seq) = match store.reports.get(&id) {
            Some(r) => (r.creator.clone(), r.created_at, r.seq),
            None => (user.to_owned(), now, seq),
        };
        if self.cloud() {
            report["uuid"] = json!(format!("{{{}}}", super::uuid_from(&id.1, &id.2)));
            report["type"] = json!("report");
            report["created_on"] =
                json!(created_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true));
            report["updated_on"] = json!(now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true));
        } else {
            report["key"] = json!(id.2);
            if report.get("createdDate").is_none_or(Value::is_null) {
                report["createdDate"] = json!(created_at.timestamp_millis());
            }
        }
        let stored = StoredReport {
            scope,
            commit: id.1.clone(),
            key: id.2.clone(),
            report,
            creator,
            puts,
            created_at,
            updated_at: now,
            seq,
        };
        store.reports.insert(id, stored.clone());
        stored
    }

    fn reports_for_commit(&self, id: &ReportId) -> Vec<Value> {
        let store = lock(&self.extra);
        let mut list: Vec<&StoredReport> = store
            .reports
            .iter()
            .filter(|((r, c, _), _)| *r == id.0 && *c == id.1)
            .map(|(_, v)| v)
            .collect();
        list.sort_by_key(|r| r.seq);
        list.into_iter().map(|r| r.report.clone()).collect()
    }

    // --- Data Center ------------------------------------------------------------------------

    #[allow(clippy::too_many_arguments)]
    pub(super) fn insights(
        &self,
        project: &str,
        slug: &str,
        commit: &str,
        key: Option<&str>,
        annotations: Option<Option<&str>>,
        method: &Method,
        query: &[(String, String)],
        body: &[u8],
        user: &str,
    ) -> Response {
        if !is_full_sha(commit) {
            return invalid_commit(commit);
        }
        let not_allowed = || dc_error(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed", "");
        let Some(key) = key else {
            if *method != Method::GET {
                return not_allowed();
            }
            let id = self.report_id(project, slug, commit, "");
            if annotations.is_some() {
                return self.dc_commit_annotations(&id, query);
            }
            let page_key = format!("insights/{}/{}/{}", id.0.0, id.0.1, id.1);
            return self.dc_page(self.reports_for_commit(&id), query, &page_key);
        };
        let id = self.report_id(project, slug, commit, key);
        let not_found = || {
            dc_error(
                StatusCode::NOT_FOUND,
                format!("No insight report with key '{key}' exists on commit {commit}"),
                "com.atlassian.bitbucket.codeinsights.report.NoSuchInsightReportException",
            )
        };
        let existing = lock(&self.extra).reports.get(&id).cloned();
        let forbidden = |what: &str| {
            dc_error(
                StatusCode::UNAUTHORIZED,
                format!(
                    "You are not permitted to {what}: only the report's creator (or a repository admin) may"
                ),
                "com.atlassian.bitbucket.AuthorisationException",
            )
        };
        if let Some(one) = annotations {
            let Some(report) = existing else {
                return not_found();
            };
            if let Some(ext) = one {
                // PUT .../annotations/{externalId} (create or replace), DELETE one.
                return match *method {
                    Method::PUT => {
                        if report.creator != user {
                            return dc_error(
                                StatusCode::UNAUTHORIZED,
                                "Only the creator of a report may add annotations to it",
                                "com.atlassian.bitbucket.AuthorisationException",
                            );
                        }
                        let mut a = match parse_dc_body(body) {
                            Ok(o) => Value::Object(o),
                            Err(r) => return r,
                        };
                        a["externalId"] = json!(ext);
                        self.dc_annotations_add(id, vec![a], Some(ext))
                    }
                    Method::DELETE => {
                        if report.creator != user && !self.is_admin(user) {
                            return forbidden("delete this annotation");
                        }
                        if let Some(list) = lock(&self.extra).annotations.get_mut(&id) {
                            list.retain(|a| {
                                a.get("externalId").and_then(Value::as_str) != Some(ext)
                            });
                        }
                        StatusCode::NO_CONTENT.into_response()
                    }
                    _ => not_allowed(),
                };
            }
            return match *method {
                Method::POST => {
                    if report.creator != user {
                        return dc_error(
                            StatusCode::UNAUTHORIZED,
                            "Only the creator of a report may add annotations to it",
                            "com.atlassian.bitbucket.AuthorisationException",
                        );
                    }
                    self.dc_annotations_post(id, body)
                }
                Method::GET => {
                    let list = lock(&self.extra)
                        .annotations
                        .get(&id)
                        .cloned()
                        .unwrap_or_default();
                    axum::Json(json!({"totalCount": list.len(), "annotations": list}))
                        .into_response()
                }
                Method::DELETE => {
                    if report.creator != user && !self.is_admin(user) {
                        return forbidden("delete these annotations");
                    }
                    let ids: Vec<&str> = query
                        .iter()
                        .filter(|(k, _)| k == "externalId")
                        .map(|(_, v)| v.as_str())
                        .collect();
                    let mut store = lock(&self.extra);
                    if let Some(list) = store.annotations.get_mut(&id) {
                        if ids.is_empty() {
                            list.clear();
                        } else {
                            list.retain(|a| {
                                !a.get("externalId")
                                    .and_then(Value::as_str)
                                    .is_some_and(|e| ids.contains(&e))
                            });
                        }
                    }
                    StatusCode::NO_CONTENT.into_response()
                }
                _ => not_allowed(),
            };
        }
        match *method {
            Method::PUT => {
                if let Some(r) = &existing
                    && r.creator != user
                {
                    return forbidden("replace this report");
                }
                match self.dc_report_check(key, body) {
                    Ok(obj) => {
                        let scope = self.scope_of(project, slug);
                        let stored = self.store_report(id, scope, Value::Object(obj), user);
                        axum::Json(stored.report).into_response()
                    }
                    Err(r) => r,
                }
            }
            Method::GET => match existing {
                Some(r) => axum::Json(r.report).into_response(),
                None => not_found(),
            },
            Method::DELETE => {
                let Some(r) = existing else {
                    return not_found();
                };
                if r.creator != user && !self.is_admin(user) {
                    return forbidden("delete this report");
                }
                let mut store = lock(&self.extra);
                store.reports.remove(&id);
                store.annotations.remove(&id);
                StatusCode::NO_CONTENT.into_response()
            }
            _ => not_allowed(),
        }
    }

    fn dc_report_check(&self, key: &str, body: &[u8]) -> Result<Map<String, Value>, Response> {
        let obj = parse_dc_body(body)?;
        let unit = self.opts.length_unit;
        let mut errors = Vec::new();
        if key.chars().count() > 50 {
            errors.push((
                "key".to_owned(),
                "The field 'key' cannot be more than 50 characters long".to_owned(),
            ));
        }
        check_text(&obj, "title", true, 450, unit, &mut errors);
        check_text(&obj, "details", false, 2000, unit, &mut errors);
        check_text(&obj, "reporter", false, 450, unit, &mut errors);
        check_enum(&obj, "result", false, &["PASS", "FAIL"], &mut errors);
        check_url(&obj, "link", false, &mut errors);
        check_url(&obj, "logoUrl", false, &mut errors);
        check_data(obj.get("data"), 6, "linktext", false, &mut errors);
        match obj.get("createdDate") {
            None | Some(Value::Null) => {}
            Some(v) if v.as_i64().is_some_and(|d| d >= 0) => {}
            Some(_) => errors.push((
                "createdDate".to_owned(),
                "createdDate must be epoch milliseconds".to_owned(),
            )),
        }
        if errors.is_empty() {
            Ok(obj)
        } else {
            Err(validation_failed(&errors))
        }
    }

    fn dc_annotations_post(&self, id: ReportId, body: &[u8]) -> Response {
        let obj = match parse_dc_body(body) {
            Ok(o) => o,
            Err(r) => return r,
        };
        let list = match obj.get("annotations") {
            Some(Value::Array(a)) if !a.is_empty() => a.clone(),
            _ => {
                return validation_failed(&[(
                    "annotations".to_owned(),
                    "annotations must be a non-empty array".to_owned(),
                )]);
            }
        };
        self.dc_annotations_add(id, list, None)
    }

    /// Validate and store `list`; `replace`: the externalId whose annotations it replaces
    /// (PUT of one annotation).
    fn dc_annotations_add(
        &self,
        id: ReportId,
        list: Vec<Value>,
        replace: Option<&str>,
    ) -> Response {
        let unit = self.opts.length_unit;
        let mut errors = Vec::new();
        for (i, a) in list.iter().enumerate() {
            let ctx = format!("annotations[{i}]");
            let Some(a) = a.as_object() else {
                errors.push((ctx, "an annotation must be an object".to_owned()));
                continue;
            };
            let mut e = Vec::new();
            check_text(a, "message", true, 2000, unit, &mut e);
            check_enum(a, "severity", true, &["LOW", "MEDIUM", "HIGH"], &mut e);
            check_text(a, "path", false, 50000, unit, &mut e);
            check_enum(
                a,
                "type",
                false,
                &["VULNERABILITY", "CODE_SMELL", "BUG"],
                &mut e,
            );
            check_url(a, "link", false, &mut e);
            check_text(a, "externalId", false, 449, unit, &mut e);
            match a.get("line") {
                None | Some(Value::Null) => {}
                Some(v) if v.as_i64().is_some_and(|l| l >= 0) => {}
                Some(_) => e.push(("line".to_owned(), "line must be an integer >= 0".to_owned())),
            }
            errors.extend(prefixed(&ctx, e));
        }
        if !errors.is_empty() {
            return validation_failed(&errors);
        }
        let mut store = lock(&self.extra);
        if let (Some(ext), Some(list)) = (replace, store.annotations.get_mut(&id)) {
            list.retain(|a| a.get("externalId").and_then(Value::as_str) != Some(ext));
        }
        let have = store.annotations.get(&id).map_or(0, Vec::len);
        let max = self.opts.max_annotations_per_report;
        if have + list.len() > max {
            return validation_failed(&[(
                "annotations".to_owned(),
                format!(
                    "The report already has {have} annotations; adding {} would exceed the limit of {max} per report. No annotation was added.",
                    list.len()
                ),
            )]);
        }
        let entry = store.annotations.entry(id.clone()).or_default();
        for mut a in list {
            a["reportKey"] = json!(id.2);
            entry.push(a);
        }
        StatusCode::NO_CONTENT.into_response()
    }

    /// `GET .../commits/{c}/annotations?key=&severity=&type=&path=&externalId=` (all repeatable).
    fn dc_commit_annotations(&self, id: &ReportId, query: &[(String, String)]) -> Response {
        let wanted = |k: &str| -> Vec<&str> {
            query
                .iter()
                .filter(|(n, _)| n == k)
                .map(|(_, v)| v.as_str())
                .collect()
        };
        let filters = [
            ("reportKey", wanted("key")),
            ("severity", wanted("severity")),
            ("type", wanted("type")),
            ("path", wanted("path")),
            ("externalId", wanted("externalId")),
        ];
        let store = lock(&self.extra);
        let mut keys: Vec<(&ReportId, u64)> = store
            .annotations
            .keys()
            .filter(|(r, c, _)| *r == id.0 && *c == id.1)
            .map(|k| (k, store.reports.get(k).map_or(u64::MAX, |r| r.seq)))
            .collect();
        keys.sort_by_key(|(_, seq)| *seq);
        let list: Vec<Value> = keys
            .into_iter()
            .flat_map(|(k, _)| store.annotations.get(k).cloned().unwrap_or_default())
            .filter(|a| {
                filters.iter().all(|(field, vals)| {
                    vals.is_empty()
                        || a.get(*field)
                            .and_then(Value::as_str)
                            .is_some_and(|v| vals.contains(&v))
                })
            })
            .collect();
        axum::Json(json!({"totalCount": list.len(), "annotations": list})).into_response()
    }

    // --- Cloud ------------------------------------------------------------------------------

    #[allow(clippy::too_many_arguments)]
    pub(super) fn cloud_reports(
        &self,
        ws: &str,
        slug: &str,
        commit: &str,
        report_id: Option<&str>,
        annotations: Option<Option<&str>>,
        method: &Method,
        query: &[(String, String)],
        body: &[u8],
        user: &str,
    ) -> Response {
        if !is_full_sha(commit) {
            return cloud_error(
                StatusCode::NOT_FOUND,
                format!("Commit not found: {commit}"),
                None,
            );
        }
        let not_allowed =
            || cloud_error(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed", None);
        let Some(key) = report_id else {
            if *method != Method::GET {
                return not_allowed();
            }
            let id = self.report_id(ws, slug, commit, "");
            let url = format!(
                "{}/2.0/repositories/{ws}/{slug}/commit/{commit}/reports",
                self.base
            );
            return cloud_page(self.reports_for_commit(&id), query, 10, &url);
        };
        let id = self.report_id(ws, slug, commit, key);
        let existing = {
            let store = lock(&self.extra);
            store.reports.get(&id).cloned().or_else(|| {
                // `{reportId}` may also be the report's uuid.
                store
                    .reports
                    .values()
                    .find(|r| {
                        r.scope == self.scope_of(ws, slug)
                            && r.commit == id.1
                            && r.report.get("uuid").and_then(Value::as_str) == Some(key)
                    })
                    .cloned()
            })
        };
        let id = match &existing {
            Some(r) => (id.0, id.1, r.key.clone()),
            None => id,
        };
        let not_found = || {
            cloud_error(
                StatusCode::NOT_FOUND,
                format!("Report {key} not found"),
                None,
            )
        };
        if let Some(one) = annotations {
            if existing.is_none() {
                return not_found();
            }
            if let Some(ann) = one {
                return self.cloud_annotation_one(id, ann, method, body);
            }
            return match *method {
                Method::POST => self.cloud_annotations_post(id, body),
                Method::GET => {
                    let list = lock(&self.extra)
                        .annotations
                        .get(&id)
                        .cloned()
                        .unwrap_or_default();
                    let url = format!(
                        "{}/2.0/repositories/{ws}/{slug}/commit/{commit}/reports/{key}/annotations",
                        self.base
                    );
                    cloud_page(list, query, 10, &url)
                }
                _ => not_allowed(),
            };
        }
        match *method {
            Method::PUT => {
                let obj = match serde_json::from_slice::<Value>(body) {
                    Ok(Value::Object(o)) => o,
                    Ok(_) => {
                        return cloud_error(
                            StatusCode::BAD_REQUEST,
                            "Expected a JSON object",
                            None,
                        );
                    }
                    Err(e) => {
                        return cloud_error(
                            StatusCode::BAD_REQUEST,
                            format!("Invalid JSON: {e}"),
                            None,
                        );
                    }
                };
                let mut errors = Vec::new();
                let unit = super::LengthUnit::Chars;
                check_text(&obj, "title", true, usize::MAX, unit, &mut errors);
                for f in ["details", "external_id", "reporter"] {
                    check_text(&obj, f, false, usize::MAX, unit, &mut errors);
                }
                check_enum(
                    &obj,
                    "result",
                    false,
                    &["PASSED", "FAILED", "PENDING"],
                    &mut errors,
                );
                check_enum(
                    &obj,
                    "report_type",
                    false,
                    &["SECURITY", "COVERAGE", "TEST", "BUG"],
                    &mut errors,
                );
                check_url(&obj, "link", true, &mut errors);
                check_url(&obj, "logo_url", true, &mut errors);
                if obj
                    .get("remote_link_enabled")
                    .is_some_and(|v| !(v.is_boolean() || v.is_null()))
                {
                    errors.push((
                        "remote_link_enabled".to_owned(),
                        "remote_link_enabled must be a boolean".to_owned(),
                    ));
                }
                check_data(obj.get("data"), 10, "text", true, &mut errors);
                if !errors.is_empty() {
                    return cloud_bad_request(&errors);
                }
                let scope = self.scope_of(ws, slug);
                let stored = self.store_report(id, scope, Value::Object(obj), user);
                axum::Json(stored.report).into_response()
            }
            Method::GET => match existing {
                Some(r) => axum::Json(r.report).into_response(),
                None => not_found(),
            },
            Method::DELETE => {
                if existing.is_none() {
                    return not_found();
                }
                let mut store = lock(&self.extra);
                store.reports.remove(&id);
                store.annotations.remove(&id);
                StatusCode::NO_CONTENT.into_response()
            }
            _ => not_allowed(),
        }
    }

    fn cloud_annotations_post(&self, id: ReportId, body: &[u8]) -> Response {
        let list = match serde_json::from_slice::<Value>(body) {
            Ok(Value::Array(a)) => a,
            Ok(_) => {
                return cloud_bad_request(&[(
                    "annotations".to_owned(),
                    "the body must be a JSON array of annotations".to_owned(),
                )]);
            }
            Err(e) => {
                return cloud_error(StatusCode::BAD_REQUEST, format!("Invalid JSON: {e}"), None);
            }
        };
        match self.cloud_annotations_add(id, list, true) {
            Ok(list) => axum::Json(Value::Array(list)).into_response(),
            Err(r) => r,
        }
    }

    /// `GET|PUT|DELETE .../reports/{id}/annotations/{annotationId}` (the annotation's uuid or
    /// external id).
    fn cloud_annotation_one(
        &self,
        id: ReportId,
        ann: &str,
        method: &Method,
        body: &[u8],
    ) -> Response {
        let matches = |a: &Value| {
            a.get("uuid").and_then(Value::as_str) == Some(ann)
                || a.get("external_id").and_then(Value::as_str) == Some(ann)
        };
        let not_found = || {
            cloud_error(
                StatusCode::NOT_FOUND,
                format!("Annotation {ann} not found"),
                None,
            )
        };
        match *method {
            Method::GET => {
                let store = lock(&self.extra);
                match store
                    .annotations
                    .get(&id)
                    .and_then(|l| l.iter().find(|a| matches(a)))
                {
                    Some(a) => axum::Json(a.clone()).into_response(),
                    None => not_found(),
                }
            }
            Method::DELETE => {
                let mut store = lock(&self.extra);
                let Some(list) = store.annotations.get_mut(&id) else {
                    return not_found();
                };
                let before = list.len();
                list.retain(|a| !matches(a));
                if list.len() == before {
                    return not_found();
                }
                StatusCode::NO_CONTENT.into_response()
            }
            Method::PUT => {
                let mut a = match serde_json::from_slice::<Value>(body) {
                    Ok(v @ Value::Object(_)) => v,
                    Ok(_) => {
                        return cloud_error(
                            StatusCode::BAD_REQUEST,
                            "Expected a JSON object",
                            None,
                        );
                    }
                    Err(e) => {
                        return cloud_error(
                            StatusCode::BAD_REQUEST,
                            format!("Invalid JSON: {e}"),
                            None,
                        );
                    }
                };
                let existing_ext = lock(&self.extra)
                    .annotations
                    .get(&id)
                    .and_then(|l| l.iter().find(|a| matches(a)).cloned())
                    .and_then(|a| a.get("external_id").cloned());
                a["external_id"] = existing_ext.unwrap_or_else(|| json!(ann));
                match self.cloud_annotations_add(id, vec![a], false) {
                    Ok(mut list) => axum::Json(list.pop().unwrap_or(Value::Null)).into_response(),
                    Err(r) => r,
                }
            }
            _ => cloud_error(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed", None),
        }
    }

    /// Validate and upsert (by `external_id`) `list`; `batch`: a POST (1 to 100 items).
    fn cloud_annotations_add(
        &self,
        id: ReportId,
        list: Vec<Value>,
        batch: bool,
    ) -> Result<Vec<Value>, Response> {
        if batch && (list.is_empty() || list.len() > 100) {
            return Err(cloud_bad_request(&[(
                "annotations".to_owned(),
                format!(
                    "a request must carry between 1 and 100 annotations (it has {})",
                    list.len()
                ),
            )]));
        }
        let unit = super::LengthUnit::Chars;
        let mut errors = Vec::new();
        for (i, a) in list.iter().enumerate() {
            let ctx = format!("[{i}]");
            let Some(a) = a.as_object() else {
                errors.push((ctx, "an annotation must be an object".to_owned()));
                continue;
            };
            let mut e = Vec::new();
            if a.get("summary").is_none_or(Value::is_null) {
                e.push(("summary".to_owned(), "summary is required".to_owned()));
            } else if let Some(Value::String(s)) = a.get("summary")
                && s.chars().count() > 450
            {
                e.push((
                    "summary".to_owned(),
                    "The summary field cannot contain more than 450 characters".to_owned(),
                ));
            } else {
                check_text(a, "summary", true, 450, unit, &mut e);
            }
            for f in ["details", "path", "external_id"] {
                check_text(a, f, false, usize::MAX, unit, &mut e);
            }
            check_enum(
                a,
                "annotation_type",
                false,
                &["VULNERABILITY", "CODE_SMELL", "BUG"],
                &mut e,
            );
            check_enum(
                a,
                "severity",
                false,
                &["CRITICAL", "HIGH", "MEDIUM", "LOW"],
                &mut e,
            );
            check_enum(
                a,
                "result",
                false,
                &["PASSED", "FAILED", "SKIPPED", "IGNORED"],
                &mut e,
            );
            check_url(a, "link", true, &mut e);
            match a.get("line") {
                None | Some(Value::Null) => {}
                Some(v) if v.as_i64().is_some_and(|l| l >= 1) => {}
                Some(_) => e.push(("line".to_owned(), "line must be an integer >= 1".to_owned())),
            }
            errors.extend(prefixed(&ctx, e));
        }
        if !errors.is_empty() {
            return Err(cloud_bad_request(&errors));
        }
        let mut store = lock(&self.extra);
        let existing = store.annotations.get(&id).cloned().unwrap_or_default();
        let ext = |a: &Value| {
            a.get("external_id")
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        let replacing = list
            .iter()
            .filter(|a| {
                ext(a).is_some_and(|e| existing.iter().any(|x| ext(x).as_deref() == Some(&e)))
            })
            .count();
        let max = self.opts.max_annotations_per_report;
        if existing.len() + list.len() - replacing > max {
            return Err(cloud_bad_request(&[(
                "annotations".to_owned(),
                format!(
                    "a report can have at most {max} annotations (it has {}); none of these {} was added",
                    existing.len(),
                    list.len()
                ),
            )]));
        }
        let now = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let entry = store.annotations.entry(id.clone()).or_default();
        let mut answered = Vec::new();
        for (i, mut a) in list.into_iter().enumerate() {
            let e = ext(&a);
            let pos = e
                .as_ref()
                .and_then(|e| entry.iter().position(|x| ext(x).as_deref() == Some(e)));
            let uuid = match pos.and_then(|p| entry.get(p)).and_then(|x| x.get("uuid")) {
                Some(u) => u.clone(),
                None => json!(format!(
                    "{{{}}}",
                    super::uuid_from(&id.1, &format!("{}/{}/{}", id.2, entry.len(), i))
                )),
            };
            a["uuid"] = uuid;
            a["type"] = json!("report_annotation");
            a["created_on"] = json!(now);
            a["updated_on"] = json!(now);
            match pos {
                Some(p) => {
                    if let Some(slot) = entry.get_mut(p) {
                        *slot = a.clone();
                    }
                }
                None => entry.push(a.clone()),
            }
            answered.push(a);
        }
        Ok(answered)
    }
}

/// A Cloud page-number page (`page`, `pagelen` default `default_len`, at most 100).
pub(super) fn cloud_page(
    items: Vec<Value>,
    query: &[(String, String)],
    default_len: usize,
    self_url: &str,
) -> Response {
    let param = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let pagelen = match param("pagelen").map(str::parse::<usize>) {
        None => default_len,
        Some(Ok(n)) if (1..=100).contains(&n) => n,
        Some(_) => {
            return cloud_error(
                StatusCode::BAD_REQUEST,
                "Invalid pagelen: it must be between 1 and 100",
                None,
            );
        }
    };
    let page = match param("page").map(str::parse::<usize>) {
        None => 1,
        Some(Ok(n)) if n >= 1 => n,
        Some(_) => return cloud_error(StatusCode::BAD_REQUEST, "Invalid page", None),
    };
    let size = items.len();
    let values: Vec<Value> = items
        .into_iter()
        .skip((page - 1).saturating_mul(pagelen))
        .take(pagelen)
        .collect();
    let mut body = json!({"pagelen": pagelen, "size": size, "page": page, "values": values});
    if page.saturating_mul(pagelen) < size {
        body["next"] = json!(format!("{self_url}?page={}&pagelen={pagelen}", page + 1));
    }
    axum::Json(body).into_response()
}

impl super::FakeBitbucket {
    /// The current reports (Data Center Code Insights and Cloud), oldest first.
    pub fn reports(&self) -> Vec<StoredReport> {
        let store = lock(&self.inner.extra);
        let mut list: Vec<StoredReport> = store.reports.values().cloned().collect();
        list.sort_by_key(|r| r.seq);
        list
    }

    /// The annotations of report `key` on `commit` (any repository), in the order stored;
    /// duplicates are kept, as Bitbucket does.
    pub fn annotations(&self, commit: &str, key: &str) -> Vec<Value> {
        let commit = commit.to_ascii_lowercase();
        let store = lock(&self.inner.extra);
        let mut ids: Vec<&ReportId> = store
            .annotations
            .keys()
            .filter(|(_, c, k)| *c == commit && k == key)
            .collect();
        ids.sort();
        ids.into_iter()
            .flat_map(|id| store.annotations.get(id).cloned().unwrap_or_default())
            .collect()
    }
}
