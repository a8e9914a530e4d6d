//! Shell-style substitution inside conditions (`$var`, `${var:-word}`, `"...${var}..."`), which
//! Buildkite's server evaluates against the build's environment. This is richer than
//! [`crate::interpolate`] (it also has `:+`, `+`, `:?`) and its words decode string escapes and
//! quotes. Substring offsets count characters, as the (Ruby) server does.
//!
//! Expansions are interpreted from their source text when evaluated, not compiled beforehand:
//! Buildkite accepts any well-bracketed `${...}` when parsing and reports a malformed one (bad
//! name, unknown operator, out-of-range escape in a word) only if evaluation reaches it, so the
//! same branch that is never taken must never fail.

use std::borrow::Cow;

/// Substitutions read variables where `${VAR}` interpolation does: one [`Env`] trait for both.
use crate::interpolate::Env;

fn is_name_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_'
}

fn is_name_part(c: u8) -> bool {
    is_name_start(c) || c.is_ascii_digit()
}

/// The end (exclusive) of the quoted text opened by `b[start]`, honouring backslashes; `None`
/// when it never closes.
fn quoted_end(b: &[u8], start: usize) -> Option<usize> {
    let quote = b[start];
    let mut i = start + 1;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            c if c == quote => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

/// The end (exclusive) of the expansion starting at `b[start] == b'$'`: `$name` (dots included,
/// they read as text after the value) or a whole `${...}`, in which backslashes escape, quoted
/// text is opaque and only a nested `${` opens a level. `None` when no expansion starts there.
pub(crate) fn expansion_end(b: &[u8], start: usize) -> Option<usize> {
    match b.get(start + 1) {
        Some(&c) if is_name_start(c) => {
            let mut i = start + 2;
            while i < b.len() && (is_name_part(b[i]) || b[i] == b'.') {
                i += 1;
            }
            Some(i)
        }
        Some(b'{') => {
            let mut depth = 1usize;
            let mut i = start + 2;
            while i < b.len() {
                match b[i] {
                    b'\\' => i += 2,
                    b'"' | b'\'' => i = quoted_end(b, i)?,
                    b'$' if b.get(i + 1) == Some(&b'{') => {
                        depth += 1;
                        i += 2;
                    }
                    b'}' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                        i += 1;
                    }
                    _ => i += 1,
                }
            }
            None
        }
        _ => None,
    }
}

/// Whether the source text of a double-quoted string changes when substituted: it holds `$$`
/// or an expansion that no backslash escapes. Otherwise the lexer's decoded value stands.
pub(crate) fn is_template(raw: &str) -> bool {
    raw.contains("$$") || has_expansion(raw)
}

/// Whether the source text of a double-quoted string reads the environment: an expansion that
/// no backslash escapes (`$$` alone does not).
pub(crate) fn has_expansion(raw: &str) -> bool {
    let b = raw.as_bytes();
    let mut i = 0;
    let mut scratch = Vec::new();
    while i < b.len() {
        match b[i] {
            b'$' if b.get(i + 1) == Some(&b'$') => i += 2,
            b'$' if expansion_end(b, i).is_some() => return true,
            b'\\' => match escape(b, i, &mut scratch) {
                Ok(next) => i = next,
                Err(_) => i += 1,
            },
            _ => i += 1,
        }
    }
    false
}

/// Decodes the backslash escape at `b[start]` as a double-quoted string does, appending to
/// `out`; returns the index after it. Fails for a lone trailing backslash and for an octal
/// escape above `\377`.
pub(crate) fn escape(b: &[u8], start: usize, out: &mut Vec<u8>) -> Result<usize, String> {
    let Some(&e) = b.get(start + 1) else {
        return Err("unterminated string escape".into());
    };
    let simple = match e {
        b'n' => Some(b'\n'),
        b's' => Some(b' '),
        b'r' => Some(b'\r'),
        b't' => Some(b'\t'),
        b'v' => Some(0x0b),
        b'f' => Some(0x0c),
        b'b' => Some(0x08),
        b'a' => Some(0x07),
        b'e' => Some(0x1b),
        _ => None,
    };
    if let Some(s) = simple {
        out.push(s);
        return Ok(start + 2);
    }
    if e == b'x' {
        let hex = |j: usize| b.get(j).and_then(|c| (*c as char).to_digit(16));
        if let (Some(h), Some(l)) = (hex(start + 2), hex(start + 3)) {
            // Two hex digits are at most 0xff.
            out.push((h * 16 + l) as u8);
            return Ok(start + 4);
        }
        out.push(b'x');
        return Ok(start + 2);
    }
    if (b'0'..=b'7').contains(&e) {
        let mut value: u32 = 0;
        let mut j = start + 1;
        while j < start + 4 && j < b.len() && (b'0'..=b'7').contains(&b[j]) {
            value = value * 8 + u32::from(b[j] - b'0');
            j += 1;
        }
        let byte = u8::try_from(value).map_err(|_| {
            format!(
                "octal escape out of range: \\{}",
                String::from_utf8_lossy(&b[start + 1..j])
            )
        })?;
        out.push(byte);
        return Ok(j);
    }
    // Anything else (`\\`, `\"`, `\$`, a multi-byte character...) stands for itself.
    let len = std::str::from_utf8(&b[start + 1..])
        .ok()
        .and_then(|s| s.chars().next())
        .map_or(1, char::len_utf8);
    out.extend_from_slice(&b[start + 1..start + 1 + len]);
    Ok(start + 1 + len)
}

/// A backslash inside single quotes escapes only `\` and `'`; before anything else it is kept.
pub(crate) fn single_quoted_escape(b: &[u8], start: usize, out: &mut Vec<u8>) -> Option<usize> {
    let e = *b.get(start + 1)?;
    if e != b'\\' && e != b'\'' {
        out.push(b'\\');
    }
    out.push(e);
    Some(start + 2)
}

pub(crate) fn bytes_to_string(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// A standalone `$name...` or `${...}` token. `None` is "unset" (a condition reads it as null).
pub(crate) fn eval_token<E: Env + ?Sized>(raw: &str, env: &E) -> Result<Option<String>, String> {
    if let Some(inner) = raw.strip_prefix("${").and_then(|r| r.strip_suffix('}')) {
        return braced(inner, env);
    }
    let body = raw.strip_prefix('$').unwrap_or(raw);
    let Some((name, rest)) = split_name(body) else {
        return Err(format!("invalid shell expansion: {raw}"));
    };
    let value = env.get(name);
    if rest.is_empty() {
        return Ok(value.map(Cow::into_owned));
    }
    let mut out = value.map(Cow::into_owned).unwrap_or_default();
    out.push_str(rest);
    Ok(Some(out))
}

fn split_name(s: &str) -> Option<(&str, &str)> {
    let b = s.as_bytes();
    if !b.first().is_some_and(|&c| is_name_start(c)) {
        return None;
    }
    let end = b.iter().position(|&c| !is_name_part(c)).unwrap_or(b.len());
    Some(s.split_at(end))
}

/// The inside of `${...}`.
fn braced<E: Env + ?Sized>(inner: &str, env: &E) -> Result<Option<String>, String> {
    let bad = || format!("invalid shell expansion: ${{{inner}}}");
    let (name, rest) = split_name(inner).ok_or_else(bad)?;
    if rest.is_empty() {
        return Ok(env.get(name).map(Cow::into_owned));
    }
    let (op, word) = match rest.as_bytes() {
        [b':', b'-' | b'+' | b'?', ..] => rest.split_at(2),
        [b':', ..] => return substring(name, &rest[1..], env),
        [b'-' | b'+' | b'?', ..] => rest.split_at(1),
        _ => return Err(bad()),
    };
    let value = env.get(name);
    // With a colon, an empty value counts as unset.
    let set = value
        .as_deref()
        .is_some_and(|v| !op.starts_with(':') || !v.is_empty());
    Ok(Some(match op.trim_start_matches(':') {
        "?" if set => value.map(Cow::into_owned).unwrap_or_default(),
        "?" => return Err(format!("parameter null or not set: {name}")),
        "+" if set => eval_string(word, env)?,
        "+" => String::new(),
        _ if set => value.map(Cow::into_owned).unwrap_or_default(),
        _ => eval_string(word, env)?,
    }))
}

/// `${name:offset}` and `${name:offset:length}`, counted in characters. The offset is evaluated
/// (and must be an integer) even when the variable is unset, which then reads as unset.
fn substring<E: Env + ?Sized>(name: &str, raw: &str, env: &E) -> Result<Option<String>, String> {
    let parts = split_top_level_colons(raw);
    if parts.len() > 2 {
        return Err(format!("invalid shell substring: {raw}"));
    }
    let offset = integer(parts[0], env)?;
    let Some(value) = env.get(name) else {
        return Ok(None);
    };
    let chars: Vec<char> = value.chars().collect();
    let len = i64::try_from(chars.len()).unwrap_or(i64::MAX);
    let from = if offset < 0 { len + offset } else { offset }.max(0);
    if from >= len {
        return Ok(Some(String::new()));
    }
    let to = match parts.get(1) {
        Some(length) => {
            let length = integer(length, env)?;
            if length < 0 {
                len + length
            } else {
                from.saturating_add(length)
            }
        }
        None => len,
    }
    .clamp(from, len);
    // Both bounds are within 0..=len here.
    Ok(Some(chars[from as usize..to as usize].iter().collect()))
}

fn integer<E: Env + ?Sized>(raw: &str, env: &E) -> Result<i64, String> {
    let text = eval_string(raw, env)?;
    let t = text.trim();
    let digits = t.strip_prefix('-').unwrap_or(t);
    if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return Err(format!(
            "substring operation requires integer argument, not {t:?}"
        ));
    }
    t.parse::<i64>()
        .map_err(|_| format!("substring argument {t:?} is out of range"))
}

/// Splits on `:` outside nested `${...}`, quotes and backslash escapes.
fn split_top_level_colons(raw: &str) -> Vec<&str> {
    let b = raw.as_bytes();
    let mut parts = Vec::new();
    let mut start = 0;
    let mut depth = 0usize;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' | b'\'' => i = quoted_end(b, i).unwrap_or(i + 1),
            b'$' if b.get(i + 1) == Some(&b'{') => {
                depth += 1;
                i += 2;
            }
            b'}' if depth > 0 => {
                depth -= 1;
                i += 1;
            }
            b':' if depth == 0 => {
                parts.push(&raw[start..i]);
                start = i + 1;
                i += 1;
            }
            _ => i += 1,
        }
    }
    parts.push(&raw[start.min(raw.len())..]);
    parts
}

/// Substitutes a word (the text after an operator) or the source text of a double-quoted
/// string: backslash escapes decode, `$$` is a `$`, quotes group text (single quotes keep `$`
/// literal), a `$` that starts nothing is kept.
pub(crate) fn eval_string<E: Env + ?Sized>(raw: &str, env: &E) -> Result<String, String> {
    let b = raw.as_bytes();
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            q @ (b'"' | b'\'') => i = quoted(raw, i, q, env, &mut out)?,
            b'$' => i = dollar(raw, i, env, &mut out)?,
            b'\\' => i = escape(b, i, &mut out)?,
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    Ok(bytes_to_string(out))
}

fn dollar<E: Env + ?Sized>(
    raw: &str,
    i: usize,
    env: &E,
    out: &mut Vec<u8>,
) -> Result<usize, String> {
    let b = raw.as_bytes();
    if b.get(i + 1) == Some(&b'$') {
        out.push(b'$');
        return Ok(i + 2);
    }
    let Some(end) = expansion_end(b, i) else {
        out.push(b'$');
        return Ok(i + 1);
    };
    if let Some(value) = eval_token(&raw[i..end], env)? {
        out.extend_from_slice(value.as_bytes());
    }
    Ok(end)
}

/// Quoted text inside a word, from the opening quote at `start`; returns the index after the
/// closing quote.
fn quoted<E: Env + ?Sized>(
    raw: &str,
    start: usize,
    quote: u8,
    env: &E,
    out: &mut Vec<u8>,
) -> Result<usize, String> {
    let b = raw.as_bytes();
    let mut i = start + 1;
    while i < b.len() {
        match b[i] {
            c if c == quote => return Ok(i + 1),
            b'\\' if quote == b'\'' => {
                i = single_quoted_escape(b, i, out).ok_or("unterminated string escape")?;
            }
            b'\\' => i = escape(b, i, out)?,
            b'$' if quote == b'"' => i = dollar(raw, i, env, out)?,
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    Err("unterminated shell string".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct M(HashMap<&'static str, &'static str>);
    impl Env for M {
        fn get(&self, name: &str) -> Option<Cow<'_, str>> {
            self.0.get(name).map(|v| Cow::Borrowed(*v))
        }
    }

    fn env() -> M {
        M(HashMap::from([
            ("branch", "main"),
            ("empty", ""),
            ("two", "2"),
        ]))
    }

    #[test]
    fn tokens() {
        let cases = [
            ("$branch.deploy", Some("main.deploy")),
            ("$notset.deploy", Some(".deploy")),
            ("${branch}", Some("main")),
            ("${notset}", None),
            ("${notset:1}", None),
            ("${notset-xx}", Some("xx")),
            ("${empty-xx}", Some("")),
            ("${empty:-xx}", Some("xx")),
            ("${branch:+yes}", Some("yes")),
            ("${empty:+yes}", Some("")),
            ("${empty+yes}", Some("yes")),
            ("${branch:1:2}", Some("ai")),
            ("${branch: -1}", Some("n")),
            ("${branch:$two}", Some("in")),
            ("${branch:1:-1}", Some("ai")),
            ("${branch:25:2}", Some("")),
            ("${branch:${empty:-1}:${two+2}}", Some("ai")),
            ("${notset-\\x41\\svalue}", Some("A value")),
            ("${notset-\"}\"}", Some("}")),
            ("${notset-'$x'}", Some("$x")),
            ("${notset-\\$branch}", Some("$branch")),
            ("${notset-${empty:-${branch}}}", Some("main")),
            ("${branch-\\400}", Some("main")),
            ("${notset-{}", Some("{")),
        ];
        for (src, want) in cases {
            assert_eq!(
                eval_token(src, &env()),
                Ok(want.map(str::to_owned)),
                "{src}"
            );
        }
    }

    #[test]
    fn token_errors() {
        for src in [
            "${notset:?}",
            "${notset?why}",
            "${branch:x}",
            "${notset:x}",
            "${branch:1:2:3}",
            "${1}",
            "${a.b}",
            "${a%b}",
            "${notset-\\400}",
            "${notset-'x}",
        ] {
            assert!(eval_token(src, &env()).is_err(), "{src}");
        }
    }

    #[test]
    fn strings() {
        let cases = [
            ("${branch}-$$-$ $branch", "main-$-$ main"),
            ("C:\\\\${branch}", "C:\\main"),
            ("\\${branch}", "${branch}"),
            ("'$branch'", "$branch"),
            ("\\xff\\377", "\u{fffd}\u{fffd}"),
        ];
        for (src, want) in cases {
            assert_eq!(eval_string(src, &env()), Ok(want.to_owned()), "{src}");
        }
        assert!(eval_string("\\400", &env()).is_err());
        assert!(is_template("a $$ b") && is_template("${x}") && is_template("\\\\$x"));
        assert!(!is_template("\\$x") && !is_template("cost $5") && !is_template("plain"));
        assert!(!has_expansion("$$x") && has_expansion("$$$x"));
    }

    #[test]
    fn expansion_ends() {
        let src = b"${branch:${empty:-1}:${two+2}} rest";
        assert_eq!(expansion_end(src, 0), Some(30));
        assert_eq!(expansion_end(b"$1", 0), None);
        assert_eq!(expansion_end(b"${x", 0), None);
        assert_eq!(expansion_end(b"${x-\"}\"}", 0), Some(8));
    }
}
