//! Turns a condition into tokens. Byte-oriented like Buildkite's lexer: identifiers, numbers and
//! operators are ASCII; strings may hold any UTF-8 and decode C-style escapes.

use super::shell::{bytes_to_string, escape, expansion_end, single_quoted_escape};
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
        let Some(end) = expansion_end(self.b, start) else {
            let message = if self.at(start + 1) == b'{' {
                "unterminated `${`"
            } else {
                "`$` must be followed by a variable name or `{`"
            };
            return Err(err(message, start));
        };
        self.pos = end;
        Ok(Token {
            tok: Tok::Shell(&self.src[start..end]),
            pos: start,
        })
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
            let next = if quote == b'\'' {
                single_quoted_escape(self.b, i, &mut out)
                    .ok_or_else(|| err("unterminated string", start))?
            } else {
                // A bad escape (an octal one above `\377`) makes the whole string unlexable.
                escape(self.b, i, &mut out).map_err(|m| {
                    if i + 1 >= self.b.len() {
                        err("unterminated string", start)
                    } else {
                        err(m, i)
                    }
                })?
            };
            i = next;
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
