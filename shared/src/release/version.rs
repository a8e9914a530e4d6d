//! Release versions: what a version may look like under each scheme, the next version when a cut
//! names none, and candidate versions (`<version>-rc<N>`).
//!
//! Aviator's documents disagree on the candidate suffix (`.rc1` in the terminology page, `-rc1`
//! in the API reference); kitebridge uses `-rcN` only, and refuses versions that already contain
//! `-rc` so a candidate version always splits one way.
//!
//! - **semver**: `MAJOR.MINOR.PATCH`, plain numbers without leading zeros (no `v` prefix, no
//!   pre-release or build suffix). The next version bumps the highest recent version (minor by
//!   default); the first is `0.1.0` (or `1.0.0` / `0.0.1` for a major / patch bump).
//! - **calver**: `YYYY.MM.DD`, and `YYYY.MM.DD.N` (N = 1, 2, ...) for further releases on the same
//!   day. The next version is today's date (UTC), suffixed when today already has releases.

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

use super::model::VersionScheme;

/// Longest version accepted (it becomes part of store keys and Buildkite variables).
pub const MAX_VERSION_LEN: usize = 64;

/// Which part of a semver version the next cut bumps (ignored for calver).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Bump {
    Major,
    #[default]
    Minor,
    Patch,
}

/// Checks `version` against the project's scheme; the error says what was expected.
pub fn validate(scheme: VersionScheme, version: &str) -> Result<(), String> {
    if version.is_empty() {
        return Err("must not be empty".into());
    }
    if version.len() > MAX_VERSION_LEN {
        return Err(format!("must be at most {MAX_VERSION_LEN} characters"));
    }
    if version.contains("-rc") {
        return Err(
            "must not contain `-rc`: candidate suffixes are added by kitebridge (`<version>-rcN`)"
                .into(),
        );
    }
    let ok = match scheme {
        VersionScheme::Semver => parse_semver(version).is_some(),
        VersionScheme::Calver => parse_calver(version).is_some(),
    };
    if ok {
        Ok(())
    } else {
        Err(match scheme {
            VersionScheme::Semver => format!(
                "`{version}` is not a semver version (MAJOR.MINOR.PATCH, e.g. 1.4.0; no prefix or suffix)"
            ),
            VersionScheme::Calver => format!(
                "`{version}` is not a calver version (YYYY.MM.DD or YYYY.MM.DD.N, e.g. 2026.06.15 or 2026.06.15.2)"
            ),
        })
    }
}

/// Whether `version` has the form of a version of either scheme (semver `MAJOR.MINOR.PATCH`,
/// or calver's `YYYY.MM.DD[.N]` digits whether or not the date exists): the form `openapi.yaml`
/// states. [`validate`] says whether it is one of the project's scheme.
pub fn has_form(version: &str) -> bool {
    if version.len() > MAX_VERSION_LEN {
        return false;
    }
    if parse_semver(version).is_some() {
        return true;
    }
    let parts: Vec<&str> = version.split('.').collect();
    let digits = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_digit());
    match parts.as_slice() {
        [y, m, d] => digits(y, 4) && digits(m, 2) && digits(d, 2),
        [y, m, d, n] => {
            digits(y, 4)
                && digits(m, 2)
                && digits(d, 2)
                && is_plain_number(n)
                && *n != "0"
                && n.parse::<u32>().is_ok()
        }
        _ => false,
    }
}

/// The next version under `scheme`, given recent versions of the project (any order; versions
/// of another scheme are ignored) and today's date.
pub fn next_version(
    scheme: VersionScheme,
    existing: &[String],
    today: NaiveDate,
    bump: Bump,
) -> String {
    match scheme {
        VersionScheme::Semver => {
            let highest = existing.iter().filter_map(|v| parse_semver(v)).max();
            let (major, minor, patch) = match (highest, bump) {
                (None, Bump::Major) => (1, 0, 0),
                (None, Bump::Minor) => (0, 1, 0),
                (None, Bump::Patch) => (0, 0, 1),
                (Some((m, _, _)), Bump::Major) => (m.saturating_add(1), 0, 0),
                (Some((m, n, _)), Bump::Minor) => (m, n.saturating_add(1), 0),
                (Some((m, n, p)), Bump::Patch) => (m, n, p.saturating_add(1)),
            };
            format!("{major}.{minor}.{patch}")
        }
        VersionScheme::Calver => {
            let base = today.format("%Y.%m.%d").to_string();
            let taken = existing
                .iter()
                .filter_map(|v| parse_calver(v))
                .filter(|(d, _)| *d == today)
                .map(|(_, n)| n)
                .max();
            match taken {
                None => base,
                Some(n) => format!("{base}.{}", n.saturating_add(1)),
            }
        }
    }
}

/// `1.4.0` and 2 make `1.4.0-rc2`.
pub fn candidate_version(version: &str, number: u32) -> String {
    format!("{version}-rc{number}")
}

/// Splits `1.4.0-rc2` into (`1.4.0`, 2). `None` unless it ends in `-rcN` with N a positive
/// number without leading zeros.
pub fn parse_candidate(candidate: &str) -> Option<(&str, u32)> {
    let (version, n) = candidate.rsplit_once("-rc")?;
    if version.is_empty() || !is_plain_number(n) {
        return None;
    }
    let n: u32 = n.parse().ok()?;
    (n > 0).then_some((version, n))
}

fn is_plain_number(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'))
}

fn parse_semver(v: &str) -> Option<(u64, u64, u64)> {
    let mut parts = v.split('.');
    let mut next = || -> Option<u64> {
        let p = parts.next()?;
        if !is_plain_number(p) {
            return None;
        }
        p.parse().ok()
    };
    let triple = (next()?, next()?, next()?);
    parts.next().is_none().then_some(triple)
}

/// (date, N): N = 0 for `YYYY.MM.DD`.
fn parse_calver(v: &str) -> Option<(NaiveDate, u32)> {
    let parts: Vec<&str> = v.split('.').collect();
    let (y, m, d, n) = match parts.as_slice() {
        [y, m, d] => (*y, *m, *d, None),
        [y, m, d, n] => (*y, *m, *d, Some(*n)),
        _ => return None,
    };
    let digits = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(y, 4) || !digits(m, 2) || !digits(d, 2) {
        return None;
    }
    let date = NaiveDate::from_ymd_opt(y.parse().ok()?, m.parse().ok()?, d.parse().ok()?)?;
    let n = match n {
        None => 0,
        Some(n) if is_plain_number(n) && n != "0" => n.parse().ok()?,
        Some(_) => return None,
    };
    Some((date, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(s: &str) -> NaiveDate {
        NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()
    }

    #[test]
    fn form_is_either_scheme_and_no_more() {
        for v in ["1.4.0", "0.0.0", "2026.06.15", "2026.02.31", "2026.06.15.2"] {
            assert!(has_form(v), "{v}");
        }
        for v in [
            "",
            "v1.0.0",
            "1.0",
            "01.0.0",
            "2026.06.5",
            "2026.06.15.0",
            "1.0.0-rc1",
        ] {
            assert!(!has_form(v), "{v}");
        }
    }

    #[test]
    fn validation_per_scheme() {
        use VersionScheme::*;
        let cases: &[(VersionScheme, &str, bool)] = &[
            (Semver, "1.4.0", true),
            (Semver, "0.0.0", true),
            (Semver, "10.20.30", true),
            (Semver, "v1.4.0", false),
            (Semver, "1.4", false),
            (Semver, "1.4.0.1", false),
            (Semver, "01.4.0", false),
            (Semver, "1.4.0-beta", false),
            (Semver, "1.4.0-rc1", false),
            (Semver, "", false),
            (Semver, "1..0", false),
            (Semver, "99999999999999999999.0.0", false),
            (Calver, "2026.06.15", true),
            (Calver, "2026.06.15.2", true),
            (Calver, "2026.02.30", false),
            (Calver, "2026.6.15", false),
            (Calver, "2026.06.15.0", false),
            (Calver, "2026.06.15.02", false),
            (Calver, "2026.06.15-1", false),
            (Calver, "1.4.0", false),
        ];
        for (scheme, v, ok) in cases {
            assert_eq!(validate(*scheme, v).is_ok(), *ok, "{scheme:?} {v}");
        }
        assert!(validate(Semver, &"1".repeat(70)).is_err());
        assert!(
            validate(Semver, "1.4")
                .unwrap_err()
                .contains("MAJOR.MINOR.PATCH")
        );
    }

    #[test]
    fn next_semver_bumps_the_highest() {
        let v = |xs: &[&str]| xs.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let today = day("2026-06-15");
        let s = VersionScheme::Semver;
        assert_eq!(next_version(s, &[], today, Bump::Minor), "0.1.0");
        assert_eq!(next_version(s, &[], today, Bump::Major), "1.0.0");
        assert_eq!(next_version(s, &[], today, Bump::Patch), "0.0.1");
        let seen = v(&["1.2.0", "1.10.0", "1.9.3", "2026.06.15", "junk"]);
        assert_eq!(next_version(s, &seen, today, Bump::Minor), "1.11.0");
        assert_eq!(next_version(s, &seen, today, Bump::Patch), "1.10.1");
        assert_eq!(next_version(s, &seen, today, Bump::Major), "2.0.0");
    }

    #[test]
    fn next_calver_is_today_then_numbered() {
        let v = |xs: &[&str]| xs.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let c = VersionScheme::Calver;
        let today = day("2026-06-15");
        assert_eq!(next_version(c, &[], today, Bump::Minor), "2026.06.15");
        assert_eq!(
            next_version(c, &v(&["2026.06.14", "2026.06.14.3"]), today, Bump::Minor),
            "2026.06.15"
        );
        assert_eq!(
            next_version(c, &v(&["2026.06.15"]), today, Bump::Minor),
            "2026.06.15.1"
        );
        assert_eq!(
            next_version(
                c,
                &v(&["2026.06.15", "2026.06.15.4", "1.0.0"]),
                today,
                Bump::Major
            ),
            "2026.06.15.5"
        );
        // What it makes is always valid.
        for existing in [v(&[]), v(&["2026.06.15"]), v(&["2026.06.15.9"])] {
            let next = next_version(c, &existing, today, Bump::Minor);
            assert!(validate(c, &next).is_ok(), "{next}");
        }
    }

    #[test]
    fn candidate_versions_round_trip() {
        assert_eq!(candidate_version("1.4.0", 2), "1.4.0-rc2");
        assert_eq!(parse_candidate("1.4.0-rc2"), Some(("1.4.0", 2)));
        assert_eq!(
            parse_candidate("2026.06.15.1-rc12"),
            Some(("2026.06.15.1", 12))
        );
        for bad in [
            "1.4.0",
            "1.4.0-rc",
            "1.4.0-rc0",
            "1.4.0-rc01",
            "-rc1",
            "1.4.0-rcx",
            "1.4.0.rc1",
        ] {
            assert_eq!(parse_candidate(bad), None, "{bad}");
        }
        for n in [1, 9, 10, 12345] {
            let c = candidate_version("3.0.1", n);
            assert_eq!(parse_candidate(&c), Some(("3.0.1", n)));
        }
    }
}
