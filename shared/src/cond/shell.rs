//! Shell-style substitution inside conditions (`$var`, `${var:-word}`, `"...${var}..."`), which
//! Buildkite's server evaluates against the build's environment. This is richer than
//! [`crate::interpolate`] (it also has `:+`, `+`, `:?`) and its words decode string escapes and
//! quotes. Substring offsets count characters, as the (Ruby) server does.

use std::borrow::Cow;

use super::lexer::{brace_end, bytes_to_string, decode_escape};

#[derive(Debug, Clone)]
pub(crate) struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone)]
enum Part {
    Lit(String),
    Exp(Box<Expansion>),
}

#[derive(Debug, Clone)]
struct Expansion {
    name: String,
    op: Op,
}

#[derive(Debug, Clone)]
enum Op {
    Plain,
    /// `:-` (colon) or `-`.
    Default(bool, Template),
    /// `:+` or `+`.
    Alternate(bool, Template),
    /// `:?` or `?`.
    Required(bool, Template),
    Substring(Template, Option<Template>),
}

/// Where substitutions read variables.
pub(crate) trait ShellEnv {
    fn get(&self, name: &str) -> Option<Cow<'_, str>>;
}

impl Template {
    /// A raw `$name...` or `${...}` token from the lexer.
    pub(crate) fn parse_token(raw: &str) -> Result<Self, String> {
        let b = raw.as_bytes();
        let mut parts = Vec::new();
        if b.get(1) == Some(&b'{') {
            parts.push(Part::Exp(Box::new(parse_braced(&raw[2..raw.len() - 1])?)));
        } else {
            let end = name_end(b, 1);
            parts.push(Part::Exp(Box::new(Expansion {
                name: raw[1..end].to_owned(),
                op: Op::Plain,
            })));
            if end < raw.len() {
                parts.push(Part::Lit(raw[end..].to_owned()));
            }
        }
        Ok(Self { parts })
    }

    /// The decoded value of a double-quoted string: `$$` is a `$`, a `$` that starts nothing is
    /// kept, backslashes were already decoded by the lexer.
    pub(crate) fn parse_string(value: &str) -> Result<Self, String> {
        parse_parts(value, false)
    }

    /// The variable name of a bare token (exactly one plain `$x`/`${x}`): unset then means
    /// null, not "".
    pub(crate) fn bare_name(&self) -> Option<&str> {
        match self.parts.as_slice() {
            [Part::Exp(e)] if matches!(e.op, Op::Plain) => Some(&e.name),
            _ => None,
        }
    }

    pub(crate) fn expand<E: ShellEnv + ?Sized>(
        &self,
        env: &E,
        out: &mut String,
    ) -> Result<(), String> {
        for part in &self.parts {
            match part {
                Part::Lit(s) => out.push_str(s),
                Part::Exp(e) => e.expand(env, out)?,
            }
        }
        Ok(())
    }
}

impl Expansion {
    fn expand<E: ShellEnv + ?Sized>(&self, env: &E, out: &mut String) -> Result<(), String> {
        let value = env.get(&self.name);
        let usable = |colon: bool| match &value {
            Some(v) => !colon || !v.is_empty(),
            None => false,
        };
        match &self.op {
            Op::Plain => out.push_str(value.as_deref().unwrap_or("")),
            Op::Default(colon, word) => {
                if usable(*colon) {
                    out.push_str(value.as_deref().unwrap_or(""));
                } else {
                    word.expand(env, out)?;
                }
            }
            Op::Alternate(colon, word) => {
                if usable(*colon) {
                    word.expand(env, out)?;
                }
            }
            Op::Required(colon, word) => {
                if usable(*colon) {
                    out.push_str(value.as_deref().unwrap_or(""));
                } else {
                    let mut msg = String::new();
                    word.expand(env, &mut msg)?;
                    if msg.is_empty() {
                        msg.push_str(if *colon {
                            "parameter null or not set"
                        } else {
                            "parameter not set"
                        });
                    }
                    return Err(format!("{}: {msg}", self.name));
                }
            }
            Op::Substring(offset, length) => {
                let v = value.as_deref().unwrap_or("");
                let offset = number(offset, env, "offset")?;
                let length = length
                    .as_ref()
                    .map(|l| number(l, env, "length"))
                    .transpose()?;
                let chars = v.chars().count();
                let (from, to) = crate::interpolate::substring_range(chars, offset, length);
                out.extend(v.chars().skip(from).take(to - from));
            }
        }
        Ok(())
    }
}

fn number<E: ShellEnv + ?Sized>(t: &Template, env: &E, what: &str) -> Result<i64, String> {
    let mut s = String::new();
    t.expand(env, &mut s)?;
    s.trim()
        .parse::<i64>()
        .map_err(|_| format!("substring {what} {s:?} is not an integer"))
}

fn name_end(b: &[u8], from: usize) -> usize {
    let mut i = from;
    while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
        i += 1;
    }
    i
}

/// The inside of `${...}`.
fn parse_braced(body: &str) -> Result<Expansion, String> {
    let b = body.as_bytes();
    if !b
        .first()
        .is_some_and(|c| c.is_ascii_alphabetic() || *c == b'_')
    {
        return Err(format!("bad substitution: ${{{body}}}"));
    }
    let end = name_end(b, 0);
    let name = body[..end].to_owned();
    let rest = &body[end..];
    let word = |s: &str| parse_parts(s, true);
    let op = match rest.as_bytes() {
        [] => Op::Plain,
        [b':', b'-', ..] => Op::Default(true, word(&rest[2..])?),
        [b':', b'+', ..] => Op::Alternate(true, word(&rest[2..])?),
        [b':', b'?', ..] => Op::Required(true, word(&rest[2..])?),
        [b'-', ..] => Op::Default(false, word(&rest[1..])?),
        [b'+', ..] => Op::Alternate(false, word(&rest[1..])?),
        [b'?', ..] => Op::Required(false, word(&rest[1..])?),
        [b':', ..] => {
            let body = &rest[1..];
            match top_level_colon(body.as_bytes()) {
                Some(i) => Op::Substring(word(&body[..i])?, Some(word(&body[i + 1..])?)),
                None => Op::Substring(word(body)?, None),
            }
        }
        _ => return Err(format!("bad substitution: ${{{body}}}")),
    };
    Ok(Expansion { name, op })
}

fn top_level_colon(b: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'$' if b.get(i + 1) == Some(&b'{') => i = brace_end(b, i + 1)?,
            b':' => return Some(i),
            _ => i += 1,
        }
    }
    None
}

/// Text with substitutions. In a `word` (inside `${...}`), backslash escapes decode as in a
/// double-quoted string and quotes group text; in a string value they are plain text.
fn parse_parts(s: &str, word: bool) -> Result<Template, String> {
    let b = s.as_bytes();
    let mut parts = Vec::new();
    let mut lit: Vec<u8> = Vec::new();
    let mut i = 0;
    let flush = |lit: &mut Vec<u8>, parts: &mut Vec<Part>| {
        if !lit.is_empty() {
            parts.push(Part::Lit(bytes_to_string(std::mem::take(lit))));
        }
    };
    while i < b.len() {
        let c = b[i];
        if c == b'$' {
            match b.get(i + 1) {
                Some(b'$') => {
                    lit.push(b'$');
                    i += 2;
                }
                Some(b'{') => {
                    let end = brace_end(b, i + 1).ok_or("unterminated `${`")?;
                    flush(&mut lit, &mut parts);
                    parts.push(Part::Exp(Box::new(parse_braced(&s[i + 2..end - 1])?)));
                    i = end;
                }
                Some(n) if n.is_ascii_alphabetic() || *n == b'_' => {
                    let end = name_end(b, i + 1);
                    flush(&mut lit, &mut parts);
                    parts.push(Part::Exp(Box::new(Expansion {
                        name: s[i + 1..end].to_owned(),
                        op: Op::Plain,
                    })));
                    i = end;
                }
                _ => {
                    lit.push(b'$');
                    i += 1;
                }
            }
            continue;
        }
        if word && c == b'\\' && i + 1 < b.len() {
            i = decode_escape(b, i + 1, &mut lit).ok_or("octal escape out of range")?;
            continue;
        }
        if word && (c == b'"' || c == b'\'') {
            let mut j = i + 1;
            let mut inner = Vec::new();
            while j < b.len() && b[j] != c {
                if b[j] == b'\\' && j + 1 < b.len() {
                    if c == b'"' {
                        j = decode_escape(b, j + 1, &mut inner)
                            .ok_or("octal escape out of range")?;
                        continue;
                    }
                    if b[j + 1] == b'\\' || b[j + 1] == b'\'' {
                        j += 1;
                    }
                }
                inner.push(b[j]);
                j += 1;
            }
            if j >= b.len() {
                return Err("unterminated quote in substitution".into());
            }
            let inner = bytes_to_string(inner);
            if c == b'"' && inner.contains('$') {
                flush(&mut lit, &mut parts);
                parts.extend(parse_parts(&inner, false)?.parts);
            } else {
                lit.extend_from_slice(inner.as_bytes());
            }
            i = j + 1;
            continue;
        }
        lit.push(c);
        i += 1;
    }
    flush(&mut lit, &mut parts);
    Ok(Template { parts })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct M(HashMap<&'static str, &'static str>);
    impl ShellEnv for M {
        fn get(&self, name: &str) -> Option<Cow<'_, str>> {
            self.0.get(name).map(|v| Cow::Borrowed(*v))
        }
    }

    fn run(t: Result<Template, String>) -> Result<String, String> {
        let env = M(HashMap::from([
            ("branch", "main"),
            ("empty", ""),
            ("two", "2"),
        ]));
        let mut out = String::new();
        t?.expand(&env, &mut out)?;
        Ok(out)
    }

    #[test]
    fn tokens() {
        let cases = [
            ("$branch.deploy", "main.deploy"),
            ("${branch}", "main"),
            ("${notset-xx}", "xx"),
            ("${empty-xx}", ""),
            ("${empty:-xx}", "xx"),
            ("${branch:+yes}", "yes"),
            ("${empty:+yes}", ""),
            ("${empty+yes}", "yes"),
            ("${branch:1:2}", "ai"),
            ("${branch: -1}", "n"),
            ("${branch:$two}", "in"),
            ("${branch:25:2}", ""),
            ("${notset-\\x41\\svalue}", "A value"),
            ("${notset-\"}\"}", "}"),
            ("${notset-'$x'}", "$x"),
            ("${notset-${empty:-${branch}}}", "main"),
        ];
        for (src, want) in cases {
            assert_eq!(
                run(Template::parse_token(src)),
                Ok(want.to_owned()),
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
            "${1}",
            "${a%b}",
        ] {
            assert!(run(Template::parse_token(src)).is_err(), "{src}");
        }
    }

    #[test]
    fn strings() {
        assert_eq!(
            run(Template::parse_string("${branch}-$$-$ $branch")),
            Ok("main-$-$ main".to_owned())
        );
    }
}
