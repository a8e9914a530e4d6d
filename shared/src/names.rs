//! The names kitebridge accepts, each rule in one place: Buildkite slugs (as Buildkite writes
//! them, and as someone may write them in a rule or a project), project and environment
//! names, rule names; and [`PipelineRef`], a Buildkite pipeline named by them.
//!
//! The rules differ on purpose: a slug read from Buildkite or the environment is taken at any
//! length, while names that someone writes into a document end up in store keys, URLs and build
//! meta-data, so they are bounded.

use serde::{Deserialize, Serialize};

/// Longest slug a rule or a project may name.
pub const MAX_WRITTEN_SLUG: usize = 100;
/// Longest project or environment name.
pub const MAX_RELEASE_NAME: usize = 64;
/// Longest rule name.
pub const MAX_RULE_NAME: usize = 100;

/// A Buildkite organization or pipeline slug as Buildkite writes it: letters, digits, `-` and
/// `_`, at least one (read from build URLs and from `BUILDKITE_ORGANIZATION`).
pub fn is_slug(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A slug written into a rule or a project: [`is_slug`], and at most [`MAX_WRITTEN_SLUG`] bytes.
pub fn is_written_slug(s: &str) -> bool {
    s.len() <= MAX_WRITTEN_SLUG && is_slug(s)
}

/// Project and environment names: 1 to [`MAX_RELEASE_NAME`] letters, digits, `-` and `_` (as
/// Aviator allows), so they are safe in store keys, URLs and meta-data.
pub fn validate_release_name(name: &str) -> Result<(), String> {
    if name.len() <= MAX_RELEASE_NAME && is_slug(name) {
        Ok(())
    } else {
        Err(format!(
            "must be 1 to {MAX_RELEASE_NAME} letters, digits, `-` or `_`"
        ))
    }
}

/// Rule names: 1 to [`MAX_RULE_NAME`] of letters, digits, `-`, `_` and `.`, starting with a
/// letter or digit (they appear in URLs, store keys and build meta-data; without `#`, a store
/// key joining a rule name and a build id is unambiguous).
pub fn validate_rule_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_RULE_NAME
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a rule name: use 1 to {MAX_RULE_NAME} letters, digits, `-`, `_` or `.`, starting with a letter or digit"
        ))
    }
}

/// A Buildkite pipeline, by organization and slug (a release project's build pipeline, an
/// environment's deploy pipeline, a trigger rule's resolved source or target).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PipelineRef {
    pub organization: String,
    pub pipeline: String,
}

impl std::fmt::Display for PipelineRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.organization, self.pipeline)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_rule_accepts_what_its_callers_accepted() {
        let long = "a".repeat(101);
        let cases: [(&str, bool, bool, bool, bool); 10] = [
            // name, slug, written slug, release name, rule name
            ("web", true, true, true, true),
            ("web-app_2", true, true, true, true),
            ("", false, false, false, false),
            ("web app", false, false, false, false),
            ("web/app", false, false, false, false),
            ("web.app", false, false, false, true),
            ("-web", true, true, true, false),
            ("_web", true, true, true, false),
            ("déploy", false, false, false, false),
            ("a#b", false, false, false, false),
        ];
        for (name, slug, written, release, rule) in cases {
            assert_eq!(is_slug(name), slug, "{name:?}");
            assert_eq!(is_written_slug(name), written, "{name:?}");
            assert_eq!(validate_release_name(name).is_ok(), release, "{name:?}");
            assert_eq!(validate_rule_name(name).is_ok(), rule, "{name:?}");
        }
        assert!(is_slug(&long) && !is_written_slug(&long));
        assert!(is_written_slug(&long[1..]));
        assert!(validate_release_name(&"a".repeat(64)).is_ok());
        assert!(validate_release_name(&"a".repeat(65)).is_err());
        assert!(validate_rule_name(&long[1..]).is_ok());
        assert!(validate_rule_name(&long).is_err());
    }
}
