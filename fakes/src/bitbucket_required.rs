//! Data Center required builds (merge checks on build statuses), 7.14+ (version unconfirmed):
//! `/rest/required-builds/{latest,1.0}/projects/{p}/repos/{r}/condition[/{id}]` and
//! `.../conditions`.

use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::{Inner, dc_error, lock, parse_dc_body, validation_failed};

const MATCHER_TYPES: &[&str] = &[
    "ANY_REF",
    "BRANCH",
    "PATTERN",
    "MODEL_CATEGORY",
    "MODEL_BRANCH",
];

fn check_matcher(
    obj: &Map<String, Value>,
    field: &str,
    required: bool,
    errors: &mut Vec<(String, String)>,
) {
    let m = match obj.get(field) {
        None | Some(Value::Null) => {
            if required {
                errors.push((field.to_owned(), format!("{field} is required")));
            }
            return;
        }
        Some(Value::Object(m)) => m,
        Some(_) => {
            errors.push((
                field.to_owned(),
                format!("{field} must be an object {{id, type: {{id}}}}"),
            ));
            return;
        }
    };
    if m.get("id")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        errors.push((format!("{field}.id"), "id is required".to_owned()));
    }
    let t = m
        .get("type")
        .and_then(|t| t.get("id"))
        .and_then(Value::as_str);
    if !t.is_some_and(|t| MATCHER_TYPES.contains(&t)) {
        errors.push((
            format!("{field}.type.id"),
            format!("type.id must be one of {}", MATCHER_TYPES.join(", ")),
        ));
    }
}

impl Inner {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn required_builds(
        &self,
        project: &str,
        slug: &str,
        id: Option<&str>,
        list: bool,
        method: &Method,
        query: &[(String, String)],
        body: &[u8],
        user: &str,
    ) -> Response {
        let repo = self.repo_key(project, slug);
        if list {
            if *method != Method::GET {
                return dc_error(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed", "");
            }
            let values = lock(&self.extra)
                .required_builds
                .iter()
                .filter(|(r, _)| *r == repo)
                .map(|(_, c)| c.clone())
                .collect();
            return self.dc_page(
                values,
                query,
                &format!("required-builds/{}/{}", repo.0, repo.1),
            );
        }
        if !self.is_admin(user) {
            return dc_error(
                StatusCode::UNAUTHORIZED,
                "You are not permitted to change required builds: repository admin permission is required",
                "com.atlassian.bitbucket.AuthorisationException",
            );
        }
        let id = match id.map(str::parse::<u64>) {
            None => None,
            Some(Ok(n)) => Some(n),
            Some(Err(_)) => {
                return dc_error(
                    StatusCode::NOT_FOUND,
                    "No such required builds condition",
                    "com.atlassian.bitbucket.build.requiredbuilds.NoSuchRequiredBuildConditionException",
                );
            }
        };
        let not_found = || {
            dc_error(
                StatusCode::NOT_FOUND,
                "No such required builds condition",
                "com.atlassian.bitbucket.build.requiredbuilds.NoSuchRequiredBuildConditionException",
            )
        };
        let exists = |n: u64| {
            lock(&self.extra)
                .required_builds
                .iter()
                .any(|(r, c)| *r == repo && c["id"] == n)
        };
        match (method.clone(), id) {
            (Method::DELETE, Some(n)) => {
                if !exists(n) {
                    return not_found();
                }
                lock(&self.extra)
                    .required_builds
                    .retain(|(r, c)| !(*r == repo && c["id"] == n));
                StatusCode::NO_CONTENT.into_response()
            }
            (Method::POST, None) | (Method::PUT, Some(_)) => {
                if let Some(n) = id
                    && !exists(n)
                {
                    return not_found();
                }
                let obj = match parse_dc_body(body) {
                    Ok(o) => o,
                    Err(r) => return r,
                };
                let mut errors = Vec::new();
                match obj.get("buildParentKeys") {
                    Some(Value::Array(keys)) if !keys.is_empty() && keys.len() <= 100 => {
                        if !keys.iter().all(|k| {
                            k.as_str().is_some_and(|s| {
                                !s.trim().is_empty() && s.encode_utf16().count() <= 1024
                            })
                        }) {
                            errors.push((
                                "buildParentKeys".to_owned(),
                                "every build parent key must be a non-blank string of at most 1024 characters".to_owned(),
                            ));
                        }
                    }
                    _ => errors.push((
                        "buildParentKeys".to_owned(),
                        "buildParentKeys must be an array of 1 to 100 keys".to_owned(),
                    )),
                }
                check_matcher(&obj, "refMatcher", true, &mut errors);
                check_matcher(&obj, "exemptRefMatcher", false, &mut errors);
                if !errors.is_empty() {
                    return validation_failed(&errors);
                }
                let mut store = lock(&self.extra);
                let n = id.unwrap_or_else(|| {
                    store.seq += 1;
                    store.seq
                });
                let mut cond = Value::Object(obj);
                cond["id"] = json!(n);
                match store
                    .required_builds
                    .iter_mut()
                    .find(|(r, c)| *r == repo && c["id"] == n)
                {
                    Some(slot) => slot.1 = cond.clone(),
                    None => store.required_builds.push((repo, cond.clone())),
                }
                axum::Json(cond).into_response()
            }
            _ => dc_error(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed", ""),
        }
    }
}

impl super::FakeBitbucket {
    /// The required-builds conditions of a repository (Data Center), as answered by GET.
    pub fn required_build_conditions(&self, project_key: &str, slug: &str) -> Vec<Value> {
        let repo = self.inner.repo_key(project_key, slug);
        lock(&self.inner.extra)
            .required_builds
            .iter()
            .filter(|(r, _)| *r == repo)
            .map(|(_, c)| c.clone())
            .collect()
    }
}
