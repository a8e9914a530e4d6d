//! Turns a condition into tokens. Byte-oriented like Buildkite's lexer: identifiers, numbers and
//! operators are ASCII; strings may hold any UTF-8 and decode C-style escapes.

use super::{CondError, ErrorKind};

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Tok<'a> {
    /// A flat dotted name such as `build.branch` (dots are part of the name).
    Ident(&'a str),
    Int(&'a str),
    /// `value` has escapes decoded; `raw` is the text between the quotes.
    Str {
        value: String,
        raw: &'a str,
        double: bool,
    },
    Regex {
        pattern: &'a str,
        flags: &'a str,
    },
    /// `$name...` or `${...}`, raw.
    Shell(&'a str),
    True,
    False,
    Null,
    Includes,
    Eq,
    NotEq,
    ReEq,
    ReNotEq,
    Bang,
    And,
    Or,
    Question,
    Colon,
    Comma,
    LParen,
    RParen,
    LBracket,
    RBracket,
    Eof,
}

#[derive(Debug, Clone)]
pub(crate) struct Token<'a> {
    pub tok: Tok<'a>,
    pub pos: usize,
}

pub(crate) struct Lexer<'a> {
    src: &'a str,
    b: &'a [u8],
    pos: usize,
}

fn err(message: impl Into<String>, pos: usize) -> CondError {
    CondError::new(ErrorKind::Parse, message, Some(pos))
}

pub(crate) fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_'
}

pub(crate) fn is_ident_part(c: u8) -> bool {
    is_ident_start(c) || c.is_ascii_digit() || c == b'.'
}

impl<'a> Lexer<'a> {
    pub(crate) fn new(src: &'a str) -> Self {
        Self {
            src,
            b: src.as_bytes(),
            pos: 0,
        }
    }

    fn at(&self, i: usize) -> u8 {
        self.b.get(i).copied().unwrap_or(0)
    }

    fn skip_trivia(&mut self) {
        loop {
            while matches!(self.at(self.pos), b' ' | b'\t' | b'\n' | b'\r') {
                self.pos += 1;
            }
            if self.at(self.pos) == b'/' && self.at(self.pos + 1) == b'/' {
                while self.pos < self.b.len() && self.b[self.pos] != b'\n' {
                    self.pos += 1;
                }
                continue;
            }
            return;
        }
    }

    pub(crate) fn next_token(&mut self) -> Result<Token<'a>, CondError> {
        self.skip_trivia();
        let start = self.pos;
        let c = self.at(start);
        let two = |t: Tok<'a>, me: &mut Self| {
            me.pos += 2;
            Ok(Token { tok: t, pos: start })
        };
        let one = |t: Tok<'a>, me: &mut Self| {
            me.pos += 1;
            Ok(Token { tok: t, pos: start })
        };
        if start >= self.b.len() {
            return Ok(Token {
                tok: Tok::Eof,
                pos: start,
            });
        }
        match (c, self.at(start + 1)) {
            (b'=', b'=') => two(Tok::Eq, self),
            (b'=', b'~') => two(Tok::ReEq, self),
            (b'!', b'=') => two(Tok::NotEq, self),
            (b'!', b'~') => two(Tok::ReNotEq, self),
            (b'!', _) => one(Tok::Bang, self),
            (b'&', b'&') => two(Tok::And, self),
            (b'|', b'|') => two(Tok::Or, self),
            (b',', _) => one(Tok::Comma, self),
            (b'?', _) => one(Tok::Question, self),
            (b':', _) => one(Tok::Colon, self),
            (b'(', _) => one(Tok::LParen, self),
            (b')', _) => one(Tok::RParen, self),
            (b'[', _) => one(Tok::LBracket, self),
            (b']', _) => one(Tok::RBracket, self),
            (b'$', _) => self.shell(),
            (b'"', _) | (b'\'', _) => self.string(c),
            (b'/', _) => self.regex(),
            _ if is_ident_start(c) => {
                let end = self.scan(start, is_ident_part);
                let word = &self.src[start..end];
                self.pos = end;
                let tok = match word {
                    "true" => Tok::True,
                    "false" => Tok::False,
                    "null" => Tok::Null,
                    "includes" => Tok::Includes,
                    _ => Tok::Ident(word),
                };
                Ok(Token { tok, pos: start })
            }
            _ if c.is_ascii_digit() => {
                let end = self.scan(start, |c| c.is_ascii_digit());
                self.pos = end;
                Ok(Token {
                    tok: Tok::Int(&self.src[start..end]),
                    pos: start,
                })
            }
            _ => {
                let ch = self.src[start..].chars().next().unwrap_or('?');
                Err(err(format!("unexpected character {ch:?}"), start))
            }
        }
    }

    fn scan(&self, from: usize, f: impl Fn(u8) -> bool) -> usize {
        let mut i = from;
        while i < self.b.len() && f(self.b[i]) {
            i += 1;
        }
        i
    }

    fn shell(&mut self) -> Result<Token<'a>, CondError> {
        let start = self.pos;
        let c = self.at(start + 1);
        if is_ident_start(c) {
            let end = self.scan(start + 1, is_ident_part);
            self.pos = end;
            return Ok(Token {
                tok: Tok::Shell(&self.src[start..end]),
                pos: start,
            });
        }
        if c != b'{' {
            return Err(err("`$` must be followed by a variable name or `{`", start));
        }
        match brace_end(self.b, start + 1) {
            Some(end) => {
                self.pos = end;
                Ok(Token {
                    tok: Tok::Shell(&self.src[start..end]),
                    pos: start,
                })
            }
            None => Err(err("unterminated `${`", start)),
        }
    }

    fn string(&mut self, quote: u8) -> Result<Token<'a>, CondError> {
        let start = self.pos;
        let mut out = Vec::new();
        let mut i = start + 1;
        loop {
            let Some(&c) = self.b.get(i) else {
                return Err(err("unterminated string", start));
            };
            if c == quote {
                break;
            }
            if c != b'\\' {
                out.push(c);
                i += 1;
                continue;
            }
            let Some(&e) = self.b.get(i + 1) else {
                return Err(err("unterminated string", start));
            };
            if quote == b'\'' {
                if e != b'\\' && e != b'\'' {
                    out.push(b'\\');
                }
                out.push(e);
                i += 2;
                continue;
            }
            i = decode_escape(self.b, i + 1, &mut out)
                .ok_or_else(|| err("octal escape out of range in string", i))?;
        }
        self.pos = i + 1;
        Ok(Token {
            tok: Tok::Str {
                value: bytes_to_string(out),
                raw: &self.src[start + 1..i],
                double: quote == b'"',
            },
            pos: start,
        })
    }

    fn regex(&mut self) -> Result<Token<'a>, CondError> {
        let start = self.pos;
        let mut i = start + 1;
        let mut escaped = false;
        loop {
            let Some(&c) = self.b.get(i) else {
                return Err(err("unterminated regular expression", start));
            };
            if c == b'/' && !escaped {
                break;
            }
            escaped = c == b'\\' && !escaped;
            i += 1;
        }
        let flags_end = self.scan(i + 1, is_ident_start);
        self.pos = flags_end;
        Ok(Token {
            tok: Tok::Regex {
                pattern: &self.src[start + 1..i],
                flags: &self.src[i + 1..flags_end],
            },
            pos: start,
        })
    }
}

/// Decodes the escape whose letter is at `b[i]` (the backslash is at `i - 1`) as a double-quoted
/// string does, appending to `out`. Returns the index after the escape, or `None` for an octal
/// escape above `\377`.
pub(crate) fn decode_escape(b: &[u8], i: usize, out: &mut Vec<u8>) -> Option<usize> {
    let e = b.get(i).copied()?;
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
        return Some(i + 1);
    }
    if e == b'x' {
        let hex = |j: usize| b.get(j).and_then(|c| (*c as char).to_digit(16));
        if let (Some(h), Some(l)) = (hex(i + 1), hex(i + 2)) {
            // Two hex digits are at most 0xff.
            out.push((h * 16 + l) as u8);
            return Some(i + 3);
        }
        out.push(b'x');
        return Some(i + 1);
    }
    if (b'0'..=b'7').contains(&e) {
        let mut value: u32 = 0;
        let mut j = i;
        while j < i + 3 && j < b.len() && (b'0'..=b'7').contains(&b[j]) {
            value = value * 8 + u32::from(b[j] - b'0');
            j += 1;
        }
        let byte = u8::try_from(value).ok()?;
        out.push(byte);
        return Some(j);
    }
    // Anything else (`\\`, `\"`, `\$`, a multi-byte character...) stands for itself.
    let len = std::str::from_utf8(&b[i..])
        .ok()
        .and_then(|s| s.chars().next())
        .map_or(1, char::len_utf8);
    out.extend_from_slice(&b[i..i + len]);
    Some(i + len)
}

pub(crate) fn bytes_to_string(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// Given `b[open] == b'{'`, returns the index just past its matching `}`, skipping quoted text
/// and backslash escapes; `None` when it never closes.
pub(crate) fn brace_end(b: &[u8], open: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut i = open;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 1,
            q @ (b'"' | b'\'') => {
                i += 1;
                while i < b.len() && b[i] != q {
                    if b[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
                if i >= b.len() {
                    return None;
                }
            }
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i + 1);
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(src: &str) -> Vec<Tok<'_>> {
        let mut l = Lexer::new(src);
        let mut out = Vec::new();
        loop {
            let t = l.next_token().unwrap();
            if t.tok == Tok::Eof {
                return out;
            }
            out.push(t.tok);
        }
    }

    #[test]
    fn operators_and_names() {
        assert_eq!(
            toks("build.env(\"X\") != null // c\n && !a =~ /x\\/y/i"),
            vec![
                Tok::Ident("build.env"),
                Tok::LParen,
                Tok::Str {
                    value: "X".into(),
                    raw: "X",
                    double: true
                },
                Tok::RParen,
                Tok::NotEq,
                Tok::Null,
                Tok::And,
                Tok::Bang,
                Tok::Ident("a"),
                Tok::ReEq,
                Tok::Regex {
                    pattern: "x\\/y",
                    flags: "i"
                },
            ]
        );
    }

    #[test]
    fn string_escapes() {
        let t = toks(r#""a\x41\141\n\$\q" 'a\n\'\\'"#);
        assert_eq!(
            t[0],
            Tok::Str {
                value: "aAa\n$q".into(),
                raw: r"a\x41\141\n\$\q",
                double: true
            }
        );
        assert_eq!(
            t[1],
            Tok::Str {
                value: "a\\n'\\".into(),
                raw: r"a\n\'\\",
                double: false
            }
        );
    }

    #[test]
    fn errors() {
        for src in [
            "\"abc",
            "/abc",
            "@",
            "=",
            "&",
            "|",
            "\"\\400\"",
            "${x",
            "$1",
            "#",
        ] {
            let mut l = Lexer::new(src);
            let r = (0..4).try_for_each(|_| l.next_token().map(|_| ()));
            assert!(r.is_err(), "{src}");
        }
    }

    #[test]
    fn shell_tokens() {
        assert_eq!(
            toks("$a.b ${x-\"}\"} x"),
            vec![
                Tok::Shell("$a.b"),
                Tok::Shell("${x-\"}\"}"),
                Tok::Ident("x")
            ]
        );
    }
}
