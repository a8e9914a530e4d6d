//! Regex literals: Buildkite's accepted subset, checked the way its validator checks it, then
//! translated to the `regex` crate's syntax and compiled once per expression.
//!
//! Rejected (parse errors, as Buildkite rejects them): lookbehind, atomic groups, possessive
//! quantifiers, named captures and conditionals; any flag other than `i`. Matching is linear
//! time (no backtracking), so there is no catastrophic case to time out. Backreferences and
//! lookahead, which Buildkite's engine may accept, cannot be run in linear time and are rejected.
//!
//! Translation keeps Buildkite's meaning where the syntaxes differ: `\d`, `\w`, `\s`, `\h` and
//! `\b` are ASCII, a `{` that does not start a valid `{n}`, `{n,}`, `{n,m}` or `{,m}` is a literal,
//! and `\Z` is end of text or before a final newline.

use std::fmt::Write as _;

/// A compiled regex literal.
#[derive(Debug, Clone)]
pub(crate) struct RegexLit {
    pub pattern: String,
    pub flags: String,
    pub re: regex::Regex,
}

/// Compiled literals by (pattern, flags), errors included: the same rule conditions are parsed
/// again for every build they are checked against, and compiling a regex costs tens of
/// microseconds while cloning a compiled one shares it. Bounded: emptied when full.
static CACHE: std::sync::LazyLock<std::sync::Mutex<Compiled>> =
    std::sync::LazyLock::new(Default::default);
type Compiled = std::collections::HashMap<(String, String), Result<regex::Regex, String>>;
const CACHE_CAPACITY: usize = 1024;

impl RegexLit {
    pub(crate) fn compile(pattern: &str, flags: &str) -> Result<Self, String> {
        let key = (pattern.to_owned(), flags.to_owned());
        let cached = CACHE.lock().ok().and_then(|cache| cache.get(&key).cloned());
        let re = match cached {
            Some(re) => re,
            None => {
                let re = Self::build(pattern, flags);
                if let Ok(mut cache) = CACHE.lock() {
                    if cache.len() >= CACHE_CAPACITY {
                        cache.clear();
                    }
                    cache.insert(key.clone(), re.clone());
                }
                re
            }
        }?;
        Ok(Self {
            pattern: key.0,
            flags: key.1,
            re,
        })
    }

    fn build(pattern: &str, flags: &str) -> Result<regex::Regex, String> {
        let mut case_insensitive = false;
        for f in flags.chars() {
            match f {
                'i' => case_insensitive = true,
                other => return Err(format!("unsupported regexp flag: {other}")),
            }
        }
        validate(pattern)?;
        let translated = translate(pattern);
        let re = regex::RegexBuilder::new(&translated)
            .case_insensitive(case_insensitive)
            .size_limit(1 << 20)
            .dfa_size_limit(1 << 20)
            .nest_limit(64)
            .build()
            .map_err(|e| match e {
                regex::Error::Syntax(s) => format!(
                    "could not parse regexp: {}",
                    s.lines().last().unwrap_or("invalid syntax")
                ),
                regex::Error::CompiledTooBig(_) => "regexp is too large".to_owned(),
                _ => "could not parse regexp".to_owned(),
            })?;
        Ok(re)
    }
}

fn unsupported(feature: &str) -> Result<(), String> {
    Err(format!("unsupported regexp feature: {feature}"))
}

/// Buildkite's validator: walks the pattern outside character classes, honouring escapes. A
/// class does not nest (`[[]` is one class holding `[`); only a `]` right after its `[` is
/// literal; `[:alpha:]`-style sets inside one are skipped whole. A `(?#...)` comment is text,
/// not a feature, up to its first `)`; one that never closes ends the check.
pub(crate) fn validate(pattern: &str) -> Result<(), String> {
    let b = pattern.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'\\' {
            i += 2;
            continue;
        }
        if c == b'[' {
            i = class_end(b, i);
            continue;
        }
        let rest = &b[i..];
        if rest.starts_with(b"(?#") {
            match rest.iter().position(|&x| x == b')') {
                Some(p) => {
                    i += p + 1;
                    continue;
                }
                None => return Ok(()),
            }
        }
        if rest.starts_with(b"(?<=") {
            return unsupported("lookbehind");
        }
        if rest.starts_with(b"(?<!") {
            return unsupported("nlookbehind");
        }
        if rest.starts_with(b"(?>") {
            return unsupported("atomic");
        }
        if rest.starts_with(b"(?<") || rest.starts_with(b"(?P<") {
            return unsupported("named_ab");
        }
        if rest.starts_with(b"(?'") {
            return unsupported("named_sq");
        }
        if rest.starts_with(b"(?(") {
            return unsupported("condition_open");
        }
        if b.get(i + 1) == Some(&b'+') {
            match c {
                b'?' => return unsupported("zero_or_one_possessive"),
                b'*' => return unsupported("zero_or_more_possessive"),
                b'+' => return unsupported("one_or_more_possessive"),
                b'}' if bounded_quantifier_ends_at(b, i) => {
                    return unsupported("bounded_possessive");
                }
                _ => {}
            }
        }
        i += 1;
    }
    Ok(())
}

/// Given `b[open] == b'['`, the index just past the class's closing `]` (or the end), as the
/// validator sees it.
fn class_end(b: &[u8], open: usize) -> usize {
    let mut i = open + 1;
    let mut first = true;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'[' if matches!(b.get(i + 1), Some(b':' | b'.' | b'=')) => {
                let marker = b[i + 1];
                let mut j = i + 2;
                while j + 1 < b.len() && !(b[j] == marker && b[j + 1] == b']') {
                    j += 1;
                }
                i = if j + 1 < b.len() { j + 2 } else { i + 1 };
            }
            b']' if first => i += 1,
            b']' => return i + 1,
            _ => i += 1,
        }
        first = false;
    }
    b.len()
}

fn bounded_quantifier_ends_at(b: &[u8], close: usize) -> bool {
    let Some(open) = b[..close].iter().rposition(|&c| c == b'{') else {
        return false;
    };
    let backslashes = b[..open].iter().rev().take_while(|&&c| c == b'\\').count();
    backslashes % 2 == 0 && is_quantifier_body(&b[open + 1..close])
}

/// `n`, `n,`, `n,m` or `,m`.
fn is_quantifier_body(body: &[u8]) -> bool {
    let mut parts = body.splitn(2, |&c| c == b',');
    let first = parts.next().unwrap_or_default();
    let second = parts.next();
    let digits = |s: &[u8]| s.iter().all(u8::is_ascii_digit);
    match second {
        None => !first.is_empty() && digits(first),
        Some(second) => digits(first) && digits(second) && !(first.is_empty() && second.is_empty()),
    }
}

/// Rewrites Buildkite (Onigmo/RE2-style) syntax into the `regex` crate's.
fn translate(pattern: &str) -> String {
    let b = pattern.as_bytes();
    let mut out = String::with_capacity(pattern.len() + 8);
    let mut i = 0;
    let mut class_depth = 0usize;
    while i < pattern.len() {
        let c = b[i];
        if c == b'\\' {
            let Some(next) = pattern[i + 1..].chars().next() else {
                out.push_str("\\\\");
                break;
            };
            let ascii = match next {
                'd' => Some("[0-9]"),
                'D' => Some("[^0-9]"),
                'w' => Some("[0-9A-Za-z_]"),
                'W' => Some("[^0-9A-Za-z_]"),
                's' => Some("[\\t\\n\\x0B\\f\\r ]"),
                'S' => Some("[^\\t\\n\\x0B\\f\\r ]"),
                'h' => Some("[0-9a-fA-F]"),
                'H' => Some("[^0-9a-fA-F]"),
                _ => None,
            };
            match (ascii, next) {
                (Some(set), _) => out.push_str(set),
                (None, 'b') if class_depth == 0 => out.push_str("(?-u:\\b)"),
                (None, 'B') if class_depth == 0 => out.push_str("(?-u:\\B)"),
                (None, 'Z') if class_depth == 0 => out.push_str("(?:\\n?\\z)"),
                (None, '/') => out.push('/'),
                // An escaped non-alphanumeric character is itself, whatever it is.
                (None, c) if !c.is_ascii_alphanumeric() => {
                    out.push_str(&regex::escape(c.encode_utf8(&mut [0; 4])));
                }
                (None, c) => {
                    out.push('\\');
                    out.push(c);
                }
            }
            i += 1 + next.len_utf8();
            continue;
        }
        if class_depth > 0 {
            match c {
                b'[' if matches!(b.get(i + 1), Some(b':')) => {
                    // POSIX set: copy through to its closing `:]`.
                    if let Some(end) = pattern[i + 2..].find(":]") {
                        out.push_str(&pattern[i..i + 2 + end + 2]);
                        i += 2 + end + 2;
                        continue;
                    }
                    out.push_str("\\[");
                }
                b'[' => {
                    class_depth += 1;
                    out.push('[');
                    i += 1;
                    i += class_leading(b, i, &mut out);
                    continue;
                }
                b']' => {
                    class_depth -= 1;
                    out.push(']');
                }
                // Literal inside a class for Buildkite, but an operator for the `regex` crate.
                b'&' | b'~' | b'-' if b.get(i + 1) == Some(&c) => {
                    let _ = write!(out, "\\{}", c as char);
                }
                _ => {
                    let ch = pattern[i..].chars().next().unwrap_or('?');
                    out.push(ch);
                    i += ch.len_utf8();
                    continue;
                }
            }
            i += 1;
            continue;
        }
        if b[i..].starts_with(b"(?#")
            && let Some(p) = b[i..].iter().position(|&x| x == b')')
        {
            // A comment matches nothing; the `regex` crate has no syntax for one.
            i += p + 1;
            continue;
        }
        match c {
            b'[' => {
                class_depth = 1;
                out.push('[');
                i += 1;
                i += class_leading(b, i, &mut out);
                continue;
            }
            b'{' => {
                let close = b[i + 1..].iter().position(|&x| x == b'}');
                match close {
                    Some(p) if i > 0 && is_quantifier_body(&b[i + 1..i + 1 + p]) => {
                        let body = &pattern[i + 1..i + 1 + p];
                        if let Some(max) = body.strip_prefix(',') {
                            let _ = write!(out, "{{0,{max}}}");
                        } else {
                            let _ = write!(out, "{{{body}}}");
                        }
                        i += p + 2;
                        continue;
                    }
                    _ => out.push_str("\\{"),
                }
            }
            b'}' => out.push_str("\\}"),
            _ => {
                let ch = pattern[i..].chars().next().unwrap_or('?');
                out.push(ch);
                i += ch.len_utf8();
                continue;
            }
        }
        i += 1;
    }
    // An unclosed class is a syntax error in both flavours; leave it for the compiler to report.
    out
}

/// After a `[`: copies a leading `^` and a leading literal `]`, returns bytes consumed.
fn class_leading(b: &[u8], at: usize, out: &mut String) -> usize {
    let mut n = 0;
    if b.get(at) == Some(&b'^') {
        out.push('^');
        n += 1;
    }
    if b.get(at + n) == Some(&b']') {
        out.push_str("\\]");
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    #[test]
    fn cached_literals_keep_their_flags_and_errors() {
        for _ in 0..2 {
            let plain = RegexLit::compile("^release-", "").unwrap();
            let folded = RegexLit::compile("^release-", "i").unwrap();
            assert!(!plain.re.is_match("RELEASE-1"));
            assert!(folded.re.is_match("RELEASE-1"));
            assert_eq!(
                (plain.pattern.as_str(), plain.flags.as_str()),
                ("^release-", "")
            );
            assert_eq!(folded.flags, "i");
            let e = RegexLit::compile("(?<=a)b", "").unwrap_err();
            assert_eq!(e, "unsupported regexp feature: lookbehind");
            assert!(RegexLit::compile("^release-", "x").is_err());
        }
    }

    use super::*;

    fn m(pattern: &str, flags: &str, hay: &str) -> bool {
        RegexLit::compile(pattern, flags).unwrap().re.is_match(hay)
    }

    #[test]
    fn accepted_and_matching() {
        assert!(m(r"^features\/", "", "features/api"));
        assert!(m(r"fee\$", "", "fee$"));
        assert!(!m(r"fee\$", "", "fee"));
        assert!(m(r"^v[[:digit:]]+$", "", "v123"));
        assert!(m(r"\[skip tests\]", "i", "[SKIP TESTS] please"));
        assert!(m(r"}+", "", "}}}"));
        assert!(m(r"[](?<=]", "", "]"));
        assert!(m(r"\(\?<=a\)", "", "(?<=a)"));
        assert!(m(r"a{,2}b", "", "aab"));
        assert!(m(r"a{x", "", "a{x"));
        assert!(m(r"^\d+$", "", "123"));
        assert!(!m(r"^\d+$", "", "١٢٣"));
        assert!(m(r"x\Z", "", "x\n"));
        assert!(m(r"^(main$|release\/.*$)", "", "release/foo"));
        assert!(m(r"[a&&b]", "", "&"));
        // A comment is not a feature, whatever it says, and matches nothing.
        assert!(m(r"^a(?#(?<=x)b$", "", "ab"));
        assert!(m(r"[^]x]", "", "y") && !m(r"[^]x]", "", "x"));
    }

    #[test]
    fn rejected() {
        for p in [
            "(?<=a)b",
            "(?<!a)b",
            "(?>a)",
            "a?+",
            "a*+",
            "a++",
            "a{1,3}+",
            "(?<n>x)",
            "(?P<n>x)",
            "(?'n'x)",
            "(?(1)a|b)",
            "(a)\\1",
            "a(?=b)",
            "[a",
            // Classes do not nest: `[[]` is one class, so the lookbehind after it is outside.
            "[[](?<=a)b",
            // A comment that never closes is not valid syntax.
            "a(?#b",
        ] {
            assert!(RegexLit::compile(p, "").is_err(), "{p}");
        }
        assert!(RegexLit::compile("a", "x").is_err());
        assert!(RegexLit::compile("a", "m").is_err());
    }
}
