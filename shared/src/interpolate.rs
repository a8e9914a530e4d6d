//! `${VAR}` interpolation exactly as `buildkite-agent pipeline upload` does it (buildkite/interpolate
//! v0.1.5).
//!
//! Supported: `$NAME`, `${NAME}`, `${NAME:-word}`, `${NAME-word}`, `${NAME?msg}`,
//! `${NAME:offset}` and `${NAME:offset:length}` (bash-style, counted in **bytes**), the escapes
//! `$$` and `\$` (each one literal `$`), and `$(` left alone. A `$` that starts nothing (end of
//! input, a space, a digit, `_`, ...) is kept as is. Everything else inside braces
//! (`${NAME:?msg}`, `${NAME:+alt}`, `${NAME+alt}`, `${_NAME}`, ...) is an error with upstream's
//! message. Expansion is single-pass: values are never expanded again.
//!
//! Names must start with a Unicode letter and continue with letters, digits or `_`.
//!
//! Because substrings count bytes, a cut can land inside a multi-byte character: [`interpolate`]
//! then replaces the broken sequence with U+FFFD, while [`interpolate_bytes`] returns the exact
//! bytes upstream produces.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;

/// Why a template could not be interpolated. The message is upstream's, word for word, because
/// users see it in pipeline upload errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InterpolateError {
    pub message: String,
}

impl InterpolateError {
    fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }
}

/// Where variable values come from, for `${VAR}` interpolation and for the shell-style
/// substitutions of conditions ([`crate::cond`]). `None` means unset, which differs from
/// set-but-empty for `${NAME-word}` and `${NAME?msg}`.
pub trait Env {
    fn get(&self, name: &str) -> Option<Cow<'_, str>>;
}

impl<S: BuildHasher> Env for HashMap<String, String, S> {
    fn get(&self, name: &str) -> Option<Cow<'_, str>> {
        HashMap::get(self, name).map(|v| Cow::Borrowed(v.as_str()))
    }
}

impl Env for BTreeMap<String, String> {
    fn get(&self, name: &str) -> Option<Cow<'_, str>> {
        BTreeMap::get(self, name).map(|v| Cow::Borrowed(v.as_str()))
    }
}

/// An [`Env`] backed by a closure, for callers whose variables live elsewhere.
pub struct FnEnv<F>(pub F);

impl<F: Fn(&str) -> Option<String>> Env for FnEnv<F> {
    fn get(&self, name: &str) -> Option<Cow<'_, str>> {
        (self.0)(name).map(Cow::Owned)
    }
}

/// No variables at all: every name is unset.
pub struct NoEnv;

impl Env for NoEnv {
    fn get(&self, _name: &str) -> Option<Cow<'_, str>> {
        None
    }
}

/// One piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item<'a> {
    /// Text copied to the output as is (escapes such as `\\` stay two characters).
    Text(&'a str),
    Expansion(Expansion<'a>),
}

/// The expansions upstream knows, with its names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expansion<'a> {
    /// `$NAME` or `${NAME}`.
    Variable { identifier: &'a str },
    /// `${NAME:-word}`: word when unset or empty.
    EmptyValue {
        identifier: &'a str,
        content: Vec<Item<'a>>,
    },
    /// `${NAME-word}`: word when unset.
    UnsetValue {
        identifier: &'a str,
        content: Vec<Item<'a>>,
    },
    /// `${NAME:offset}` / `${NAME:offset:length}`, in bytes.
    Substring {
        identifier: &'a str,
        offset: i64,
        length: Option<i64>,
    },
    /// `${NAME?msg}`: an error when unset.
    Required {
        identifier: &'a str,
        message: Vec<Item<'a>>,
    },
    /// `$$` or `\$`: one literal `$`. `potential_identifier` is what follows (a name, or a
    /// `{...}` group), which upstream reports from `Identifiers()` as `$` + it.
    Escaped { potential_identifier: &'a str },
}

/// Parses a template into items (upstream's AST), without expanding anything.
pub fn parse(template: &str) -> Result<Vec<Item<'_>>, InterpolateError> {
    let mut p = Parser {
        src: template,
        pos: 0,
    };
    p.expression(None)
}

/// Interpolates `template` against `env`. See the module docs for the rules.
pub fn interpolate<E: Env + ?Sized>(template: &str, env: &E) -> Result<String, InterpolateError> {
    // Fast path: nothing to expand (no `$`) means the template is returned as is.
    if !template.contains('$') {
        return Ok(template.to_owned());
    }
    let items = parse(template)?;
    let mut out = String::with_capacity(template.len() + 16);
    expand_items(&items, env, &mut out)?;
    Ok(out)
}

/// Like [`interpolate`], but returns the exact bytes, even when a byte-based substring cut a
/// character in half.
pub fn interpolate_bytes<E: Env + ?Sized>(
    template: &str,
    env: &E,
) -> Result<Vec<u8>, InterpolateError> {
    if !template.contains('$') {
        return Ok(template.as_bytes().to_vec());
    }
    let items = parse(template)?;
    let mut out = Vec::with_capacity(template.len() + 16);
    expand_items(&items, env, &mut out)?;
    Ok(out)
}

/// Convenience for the common case of a map of variables.
pub fn interpolate_map<S: BuildHasher>(
    template: &str,
    env: &HashMap<String, String, S>,
) -> Result<String, InterpolateError> {
    interpolate(template, env)
}

/// Upstream's `Identifiers()`: names of the expansions in order, with `$NAME` for escaped ones
/// (`$$NAME`, `\$NAME`). Like upstream, the fallback of `${A-word}` is not searched.
pub fn identifiers(template: &str) -> Result<Vec<String>, InterpolateError> {
    fn walk(items: &[Item<'_>], out: &mut Vec<String>) {
        for item in items {
            let Item::Expansion(e) = item else { continue };
            match e {
                Expansion::Variable { identifier }
                | Expansion::UnsetValue { identifier, .. }
                | Expansion::Substring { identifier, .. }
                | Expansion::Required { identifier, .. } => out.push((*identifier).to_owned()),
                Expansion::EmptyValue {
                    identifier,
                    content,
                } => {
                    out.push((*identifier).to_owned());
                    walk(content, out);
                }
                Expansion::Escaped {
                    potential_identifier,
                } => out.push(format!("${potential_identifier}")),
            }
        }
    }
    let items = parse(template)?;
    let mut out = Vec::new();
    walk(&items, &mut out);
    Ok(out)
}

/// The variable names a template can read, anywhere (fallbacks and messages included), each once,
/// in first-seen order. Escaped `$$NAME` is not a reference. Useful to check rules up front.
pub fn referenced_variables(template: &str) -> Result<Vec<String>, InterpolateError> {
    fn walk<'a>(items: &[Item<'a>], out: &mut Vec<&'a str>) {
        for item in items {
            let Item::Expansion(e) = item else { continue };
            let (name, nested) = match e {
                Expansion::Variable { identifier } | Expansion::Substring { identifier, .. } => {
                    (*identifier, None)
                }
                Expansion::EmptyValue {
                    identifier,
                    content,
                }
                | Expansion::UnsetValue {
                    identifier,
                    content,
                } => (*identifier, Some(content)),
                Expansion::Required {
                    identifier,
                    message,
                } => (*identifier, Some(message)),
                Expansion::Escaped { .. } => continue,
            };
            if !out.contains(&name) {
                out.push(name);
            }
            if let Some(nested) = nested {
                walk(nested, out);
            }
        }
    }
    let items = parse(template)?;
    let mut out = Vec::new();
    walk(&items, &mut out);
    Ok(out.into_iter().map(str::to_owned).collect())
}

/// Output that can take text and, for byte-based substrings, raw bytes.
trait Sink {
    fn text(&mut self, s: &str);
    fn bytes(&mut self, b: &[u8]);
}

impl Sink for String {
    fn text(&mut self, s: &str) {
        self.push_str(s);
    }
    fn bytes(&mut self, b: &[u8]) {
        self.push_str(&String::from_utf8_lossy(b));
    }
}

impl Sink for Vec<u8> {
    fn text(&mut self, s: &str) {
        self.extend_from_slice(s.as_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.extend_from_slice(b);
    }
}

fn expand_items<E: Env + ?Sized, S: Sink>(
    items: &[Item<'_>],
    env: &E,
    out: &mut S,
) -> Result<(), InterpolateError> {
    for item in items {
        match item {
            Item::Text(t) => out.text(t),
            Item::Expansion(e) => expand(e, env, out)?,
        }
    }
    Ok(())
}

fn expand<E: Env + ?Sized, S: Sink>(
    e: &Expansion<'_>,
    env: &E,
    out: &mut S,
) -> Result<(), InterpolateError> {
    match e {
        Expansion::Variable { identifier } => {
            if let Some(v) = env.get(identifier) {
                out.text(&v);
            }
        }
        Expansion::EmptyValue {
            identifier,
            content,
        } => match env.get(identifier) {
            Some(v) if !v.is_empty() => out.text(&v),
            _ => expand_items(content, env, out)?,
        },
        Expansion::UnsetValue {
            identifier,
            content,
        } => match env.get(identifier) {
            Some(v) => out.text(&v),
            None => expand_items(content, env, out)?,
        },
        Expansion::Substring {
            identifier,
            offset,
            length,
        } => {
            let v = env.get(identifier).unwrap_or_default();
            let (from, to) = substring_range(v.len(), *offset, *length);
            match v.get(from..to) {
                Some(s) => out.text(s),
                None => out.bytes(&v.as_bytes()[from..to]),
            }
        }
        Expansion::Required {
            identifier,
            message,
        } => match env.get(identifier) {
            Some(v) => out.text(&v),
            None => {
                let mut msg = String::new();
                expand_items(message, env, &mut msg)?;
                if msg.is_empty() {
                    msg.push_str("not set");
                }
                return Err(InterpolateError::new(format!("${identifier}: {msg}")));
            }
        },
        Expansion::Escaped { .. } => out.text("$"),
    }
    Ok(())
}

/// Bash-style offset/length over `len` bytes, clamped the way upstream clamps. The returned range
/// is always within `0..=len` and ordered.
pub(crate) fn substring_range(len: usize, offset: i64, length: Option<i64>) -> (usize, usize) {
    let len_i = i64::try_from(len).unwrap_or(i64::MAX);
    let mut from = offset;
    if from < 0 {
        from = from.saturating_add(len_i);
    }
    let from = from.clamp(0, len_i);
    let to = match length {
        None => len_i,
        Some(l) if l >= 0 => from.saturating_add(l).min(len_i),
        Some(l) => l.saturating_add(len_i).max(from).min(len_i),
    };
    // Both values are clamped into 0..=len, which came from a usize.
    (from as usize, to as usize)
}

struct Parser<'a> {
    src: &'a str,
    pos: usize,
}

impl<'a> Parser<'a> {
    fn rest(&self) -> &'a str {
        &self.src[self.pos..]
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn next(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    fn scan_until(&mut self, stop: impl Fn(char) -> bool) -> &'a str {
        let start = self.pos;
        let rest = self.rest();
        let end = rest.find(stop).unwrap_or(rest.len());
        self.pos += end;
        &self.src[start..self.pos]
    }

    fn expression(&mut self, stop: Option<char>) -> Result<Vec<Item<'a>>, InterpolateError> {
        let mut items = Vec::new();
        while let Some(c) = self.peek() {
            if Some(c) == stop {
                break;
            }
            let rest = self.rest();
            if rest.starts_with("\\\\") {
                items.push(Item::Text(&rest[..2]));
                self.pos += 2;
                continue;
            }
            if rest.starts_with("\\$") || rest.starts_with("$$") {
                self.pos += 2;
                let potential_identifier = self.peek_identifier();
                items.push(Item::Expansion(Expansion::Escaped {
                    potential_identifier,
                }));
                continue;
            }
            if rest.starts_with("$(") {
                items.push(Item::Text(&rest[..2]));
                self.pos += 2;
                continue;
            }
            if c == '$' {
                match rest[1..].chars().next() {
                    Some('{') => {
                        self.pos += 2;
                        items.push(Item::Expansion(self.brace_expansion()?));
                    }
                    Some(n) if n.is_alphabetic() => {
                        self.pos += 1;
                        let identifier = self.identifier()?;
                        items.push(Item::Expansion(Expansion::Variable { identifier }));
                    }
                    // A `$` that starts nothing stays literal (v0.1.5).
                    _ => {
                        items.push(Item::Text(&rest[..1]));
                        self.pos += 1;
                    }
                }
                continue;
            }
            let start = self.pos;
            self.pos += c.len_utf8();
            self.scan_until(|r| r == '$' || r == '\\' || Some(r) == stop);
            items.push(Item::Text(&self.src[start..self.pos]));
        }
        Ok(items)
    }

    /// What follows an escaped `$`, without consuming it: a `{...}` group or a name.
    fn peek_identifier(&self) -> &'a str {
        let rest = self.rest();
        if rest.starts_with('{') {
            return rest.find('}').map_or("", |end| &rest[..=end]);
        }
        match rest.chars().next() {
            Some(c) if c.is_alphabetic() => {
                let end = rest.find(|r| !is_ident_char(r)).unwrap_or(rest.len());
                &rest[..end]
            }
            _ => "",
        }
    }

    fn identifier(&mut self) -> Result<&'a str, InterpolateError> {
        match self.peek() {
            Some(c) if c.is_alphabetic() => Ok(self.scan_until(|r| !is_ident_char(r))),
            other => Err(InterpolateError::new(format!(
                "Expected identifier to start with a letter, got {}",
                show(other)
            ))),
        }
    }

    fn brace_expansion(&mut self) -> Result<Expansion<'a>, InterpolateError> {
        let identifier = self.identifier()?;
        if self.peek() == Some('}') {
            self.pos += 1;
            return Ok(Expansion::Variable { identifier });
        }
        let exp = match self.next() {
            Some(':') if self.peek() == Some('-') => {
                self.pos += 1;
                Expansion::EmptyValue {
                    identifier,
                    content: self.expression(Some('}'))?,
                }
            }
            Some(':') => self.substring(identifier)?,
            Some('-') => Expansion::UnsetValue {
                identifier,
                content: self.expression(Some('}'))?,
            },
            Some('?') => Expansion::Required {
                identifier,
                message: self.expression(Some('}'))?,
            },
            other => {
                return Err(InterpolateError::new(format!(
                    "Expected an operator, got {}",
                    show(other)
                )));
            }
        };
        match self.next() {
            Some('}') => Ok(exp),
            other => Err(InterpolateError::new(format!(
                "Expected brace expansion to end with }}, got {}",
                show(other)
            ))),
        }
    }

    fn substring(&mut self, identifier: &'a str) -> Result<Expansion<'a>, InterpolateError> {
        let offset = self.scan_until(|r| r == ':' || r == '}');
        let offset = atoi(offset.trim())
            .map_err(|e| InterpolateError::new(format!("Unable to parse offset: {e}")))?;
        if self.peek() == Some('}') {
            return Ok(Expansion::Substring {
                identifier,
                offset,
                length: None,
            });
        }
        self.next();
        let length = self.scan_until(|r| r == '}');
        let length = atoi(length.trim())
            .map_err(|e| InterpolateError::new(format!("Unable to parse length: {e}")))?;
        Ok(Expansion::Substring {
            identifier,
            offset,
            length: Some(length),
        })
    }
}

fn is_ident_char(c: char) -> bool {
    c.is_alphabetic() || c.is_numeric() || c == '_'
}

fn show(c: Option<char>) -> String {
    c.map_or_else(|| "EOF".to_owned(), String::from)
}

/// Go's `strconv.Atoi`, including its error text (users see it).
fn atoi(s: &str) -> Result<i64, String> {
    let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("strconv.Atoi: parsing {s:?}: invalid syntax"));
    }
    s.trim_start_matches('+')
        .parse::<i64>()
        .map_err(|_| format!("strconv.Atoi: parsing {s:?}: value out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn table() {
        let e = env(&[("A", "alpha"), ("EMPTY", ""), ("C", "1adf998e39")]);
        let cases: &[(&str, &str)] = &[
            ("plain", "plain"),
            ("$A-$A.x", "alpha-alpha.x"),
            ("${A}b", "alphab"),
            ("${EMPTY:-d}", "d"),
            ("${EMPTY-d}", ""),
            ("${MISSING-d}", "d"),
            ("${C:0:7}", "1adf998"),
            ("${C: -3}", "e39"),
            ("${C:2:-2}", "df998e"),
            ("${C:100}", ""),
            ("${C: -100:2}", "1a"),
            ("$$A \\$A", "$A $A"),
            ("$", "$"),
            ("a $ b $1 $_X", "a $ b $1 $_X"),
            ("$(date)", "$(date)"),
            ("\\\\", "\\\\"),
            ("${E:-a}b}", "ab}"),
            ("$$$A", "$alpha"),
        ];
        for (input, want) in cases {
            assert_eq!(interpolate(input, &e).as_deref(), Ok(*want), "{input}");
        }
    }

    #[test]
    fn errors() {
        let e = env(&[]);
        let cases: &[(&str, &str)] = &[
            ("${X?}", "$X: not set"),
            ("${X?need $Y}", "$X: need "),
            ("${X+a}", "Expected an operator, got +"),
            ("${_X}", "Expected identifier to start with a letter, got _"),
            ("${X", "Expected an operator, got EOF"),
            (
                "${X:1:z}",
                "Unable to parse length: strconv.Atoi: parsing \"z\": invalid syntax",
            ),
        ];
        for (input, want) in cases {
            let got = interpolate(input, &e).map_err(|e| e.message);
            assert_eq!(got, Err((*want).to_owned()), "{input}");
        }
    }

    #[test]
    fn byte_substrings() {
        let e = env(&[("V", "héllo")]);
        assert_eq!(
            interpolate_bytes("${V:2}", &e).unwrap(),
            b"\xa9llo".to_vec()
        );
        assert_eq!(interpolate("${V:2}", &e).unwrap(), "\u{fffd}llo");
    }

    #[test]
    fn referenced() {
        assert_eq!(
            referenced_variables("$A ${B-$C} $$D ${A?$E}").unwrap(),
            vec!["A", "B", "C", "E"]
        );
    }

    #[test]
    fn huge_numbers_do_not_panic() {
        let e = env(&[("V", "abc")]);
        for t in [
            "${V:-9223372036854775808}",
            "${V: -9223372036854775808:-9223372036854775808}",
            "${V:9223372036854775807:9223372036854775807}",
            "${V:99999999999999999999}",
        ] {
            let _ = interpolate(t, &e);
        }
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn never_panics(template in "[$\\\\{}:?+\\-a-zA-Z0-9_ é]{0,40}") {
            let env: HashMap<String, String> =
                [("a".to_owned(), "héllo".to_owned()), ("B".to_owned(), String::new())].into();
            let _ = interpolate(&template, &env);
            let _ = interpolate_bytes(&template, &env);
            let _ = identifiers(&template);
            let _ = referenced_variables(&template);
        }

        #[test]
        fn anything_never_panics(template in "\\PC{0,40}") {
            let _ = interpolate(&template, &NoEnv);
        }
    }
}
