//! Pratt parser with Buildkite's precedence, lowest to highest: ternary `?:` (right
//! associative) < `||` < `&&` < `==` `!=` `=~` `!~` `includes` (one level, left associative) <
//! prefix `!` < call.

use super::ast::{InfixOp, Kind, Node, ShellLit, StrLit};
use super::lexer::{Lexer, Tok, Token};
use super::regex::RegexLit;
use super::shell;
use super::{CondError, ErrorKind};

const LOWEST: u8 = 1;
const TERNARY: u8 = 2;
const OR: u8 = 3;
const AND: u8 = 4;
const EQUALS: u8 = 5;
const PREFIX: u8 = 6;
const CALL: u8 = 7;

/// Deep nesting is refused rather than allowed to exhaust the stack.
const MAX_DEPTH: usize = 200;

fn precedence(t: &Tok<'_>) -> u8 {
    match t {
        Tok::Eq | Tok::NotEq | Tok::ReEq | Tok::ReNotEq | Tok::Includes => EQUALS,
        Tok::And => AND,
        Tok::Or => OR,
        Tok::Question => TERNARY,
        Tok::LParen => CALL,
        _ => LOWEST,
    }
}

fn err(message: impl Into<String>, pos: usize) -> CondError {
    CondError::new(ErrorKind::Parse, message, Some(pos))
}

fn describe(t: &Tok<'_>) -> String {
    match t {
        Tok::Ident(s) | Tok::Int(s) | Tok::Shell(s) => format!("`{s}`"),
        Tok::Str { raw, .. } => format!("string {raw:?}"),
        Tok::Regex { pattern, .. } => format!("regular expression /{pattern}/"),
        Tok::Eof => "end of expression".to_owned(),
        other => format!("{other:?}"),
    }
}

pub(crate) struct Parser<'a> {
    lexer: Lexer<'a>,
    cur: Token<'a>,
    peek: Token<'a>,
    depth: usize,
}

/// Parses a whole condition. A blank one (only whitespace and comments) is a parse error here;
/// entry points decide what blank means before calling this.
pub(crate) fn parse(src: &str) -> Result<Node, CondError> {
    let mut lexer = Lexer::new(src);
    let cur = lexer.next_token()?;
    if cur.tok == Tok::Eof {
        return Err(err("empty expression", 0));
    }
    let peek = lexer.next_token()?;
    let mut p = Parser {
        lexer,
        cur,
        peek,
        depth: 0,
    };
    let node = p.expression(LOWEST)?;
    if p.peek.tok != Tok::Eof {
        return Err(err(
            format!("unexpected {} after expression", describe(&p.peek.tok)),
            p.peek.pos,
        ));
    }
    Ok(node)
}

impl<'a> Parser<'a> {
    fn advance(&mut self) -> Result<(), CondError> {
        let next = self.lexer.next_token()?;
        self.cur = std::mem::replace(&mut self.peek, next);
        Ok(())
    }

    fn expect_peek(&mut self, want: &Tok<'_>, what: &str) -> Result<(), CondError> {
        if std::mem::discriminant(&self.peek.tok) == std::mem::discriminant(want) {
            self.advance()
        } else {
            Err(err(
                format!("expected {what}, got {}", describe(&self.peek.tok)),
                self.peek.pos,
            ))
        }
    }

    fn expression(&mut self, prec: u8) -> Result<Node, CondError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(err("expression is nested too deeply", self.cur.pos));
        }
        let mut left = self.prefix()?;
        while self.peek.tok != Tok::Eof && prec < precedence(&self.peek.tok) {
            self.advance()?;
            left = self.infix(left)?;
        }
        self.depth -= 1;
        Ok(left)
    }

    fn prefix(&mut self) -> Result<Node, CondError> {
        let pos = self.cur.pos;
        let kind = match &self.cur.tok {
            Tok::Ident(name) => {
                if name.ends_with('.') || name.contains("..") {
                    return Err(err(format!("invalid dotted identifier: {name}"), pos));
                }
                Kind::Ident((*name).to_owned())
            }
            Tok::Int(digits) => match digits.parse::<i64>() {
                Ok(v) => Kind::Int(v),
                Err(_) => return Err(err(format!("could not parse {digits:?} as integer"), pos)),
            },
            Tok::True => Kind::Bool(true),
            Tok::False => Kind::Bool(false),
            Tok::Null => Kind::Null,
            Tok::Str { value, raw, double } => {
                let template = *double && shell::is_template(raw);
                Kind::Str(Box::new(StrLit {
                    value: value.clone(),
                    raw: (*raw).to_owned(),
                    double: *double,
                    template,
                }))
            }
            Tok::Regex { pattern, flags } => Kind::Regex(Box::new(
                RegexLit::compile(pattern, flags).map_err(|m| err(m, pos))?,
            )),
            Tok::Shell(raw) => Kind::Shell(Box::new(ShellLit {
                raw: (*raw).to_owned(),
            })),
            Tok::Bang => {
                self.advance()?;
                let inner = self.expression(PREFIX)?;
                return self.node(pos, Kind::Not(Box::new(inner)));
            }
            Tok::LParen => {
                self.advance()?;
                let inner = self.expression(LOWEST)?;
                self.expect_peek(&Tok::RParen, "`)`")?;
                return Ok(inner);
            }
            Tok::LBracket => {
                let items = self.list(&Tok::RBracket, "`,` or `]`")?;
                return self.node(pos, Kind::Array(items));
            }
            other => {
                return Err(err(format!("unexpected {}", describe(other)), pos));
            }
        };
        self.node(pos, kind)
    }

    fn node(&self, pos: usize, kind: Kind) -> Result<Node, CondError> {
        let node = Node::new(pos, kind);
        if node.height > MAX_DEPTH {
            return Err(err("expression is nested too deeply", pos));
        }
        Ok(node)
    }

    fn infix(&mut self, left: Node) -> Result<Node, CondError> {
        let pos = left.pos;
        let op = match self.cur.tok {
            Tok::Eq => InfixOp::Eq,
            Tok::NotEq => InfixOp::NotEq,
            Tok::ReEq => InfixOp::ReEq,
            Tok::ReNotEq => InfixOp::ReNotEq,
            Tok::Includes => InfixOp::Includes,
            Tok::And => InfixOp::And,
            Tok::Or => InfixOp::Or,
            Tok::Question => {
                self.advance()?;
                let then = self.expression(LOWEST)?;
                self.expect_peek(&Tok::Colon, "`:`")?;
                self.advance()?;
                let other = self.expression(TERNARY - 1)?;
                return self.node(
                    pos,
                    Kind::Ternary {
                        cond: Box::new(left),
                        then: Box::new(then),
                        other: Box::new(other),
                    },
                );
            }
            Tok::LParen => {
                let Kind::Ident(name) = left.kind else {
                    return Err(err("only a function name can be called", self.cur.pos));
                };
                let args = self.list(&Tok::RParen, "`,` or `)`")?;
                return self.node(pos, Kind::Call { name, args });
            }
            _ => return Err(err("unexpected token", self.cur.pos)),
        };
        let prec = precedence(&self.cur.tok);
        self.advance()?;
        let right = self.expression(prec)?;
        self.node(
            pos,
            Kind::Infix {
                op,
                lhs: Box::new(left),
                rhs: Box::new(right),
            },
        )
    }

    /// Comma-separated expressions up to `end`; `cur` is the opening bracket or parenthesis.
    fn list(&mut self, end: &Tok<'_>, what: &str) -> Result<Vec<Node>, CondError> {
        let mut items = Vec::new();
        if std::mem::discriminant(&self.peek.tok) == std::mem::discriminant(end) {
            self.advance()?;
            return Ok(items);
        }
        self.advance()?;
        items.push(self.expression(LOWEST)?);
        while self.peek.tok == Tok::Comma {
            self.advance()?;
            self.advance()?;
            items.push(self.expression(LOWEST)?);
        }
        self.expect_peek(end, what)?;
        Ok(items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(src: &str) -> String {
        parse(src)
            .map(|n| n.to_string())
            .unwrap_or_else(|e| format!("ERR {}", e.message))
    }

    #[test]
    fn precedence_table() {
        let cases = [
            ("true", "true"),
            ("!(true == true)", "(!(true == true))"),
            ("a || b && c", "(a || (b && c))"),
            ("env(env(LLAMAS)) == true", "(env(env(LLAMAS)) == true)"),
            (
                "a || b ? c || d : e || f ? g : h",
                "((a || b) ? (c || d) : ((e || f) ? g : h))",
            ),
            ("!a == b", "((!a) == b)"),
            ("a == b == c", "((a == b) == c)"),
            (
                "[1, 'x', [\"y\"]] includes /z/i",
                "([1, 'x', [\"y\"]] includes /z/i)",
            ),
            ("build.env('A', $b.c)", "build.env('A', $b.c)"),
            ("!!5", "(!(!5))"),
        ];
        for (src, want) in cases {
            assert_eq!(p(src), want, "{src}");
        }
    }

    #[test]
    fn parse_errors() {
        for src in [
            "",
            "  // only a comment",
            "nope != == one",
            "a b",
            "(a",
            "[a,",
            "a ? b",
            "a.",
            "a..b",
            "f(a b)",
            "99999999999999999999",
            "1 @> 2",
            "\"a\\777\"",
            "x =~ /a/x",
            "x =~ /(?<=a)/",
        ] {
            assert!(parse(src).is_err(), "{src:?}");
        }
    }

    #[test]
    fn deep_nesting_is_refused_not_a_crash() {
        let src = "(".repeat(10_000) + "true" + &")".repeat(10_000);
        assert!(parse(&src).is_err());
        let src = "!".repeat(10_000) + "true";
        assert!(parse(&src).is_err());
    }
}
