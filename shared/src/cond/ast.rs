//! The parsed form of a condition. `Display` prints it fully parenthesised, the way Buildkite's
//! own parser tests print it (`(a || (b && c))`); printing and parsing again gives the same tree.

use std::fmt;

use super::regex::RegexLit;

#[derive(Debug, Clone)]
pub(crate) struct Node {
    /// Byte offset of the node's first token in the source.
    pub pos: usize,
    /// Longest path to a leaf; bounded by the parser so walking the tree cannot overflow.
    pub height: usize,
    pub kind: Kind,
}

impl Node {
    pub(crate) fn new(pos: usize, kind: Kind) -> Self {
        let child = |n: &Node| n.height;
        let height = 1 + match &kind {
            Kind::Array(items) | Kind::Call { args: items, .. } => {
                items.iter().map(child).max().unwrap_or(0)
            }
            Kind::Not(inner) => inner.height,
            Kind::Infix { lhs, rhs, .. } => lhs.height.max(rhs.height),
            Kind::Ternary { cond, then, other } => cond.height.max(then.height).max(other.height),
            _ => 0,
        };
        Self { pos, height, kind }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InfixOp {
    Eq,
    NotEq,
    ReEq,
    ReNotEq,
    Includes,
    And,
    Or,
}

impl InfixOp {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Eq => "==",
            Self::NotEq => "!=",
            Self::ReEq => "=~",
            Self::ReNotEq => "!~",
            Self::Includes => "includes",
            Self::And => "&&",
            Self::Or => "||",
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct StrLit {
    pub value: String,
    /// Source text between the quotes, kept so printing round-trips exactly.
    pub raw: String,
    pub double: bool,
    /// A double-quoted string whose source holds `$$` or an unescaped expansion: its value is
    /// substituted from `raw` at evaluation time, and is unknown before.
    pub template: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct ShellLit {
    pub raw: String,
}

#[derive(Debug, Clone)]
pub(crate) enum Kind {
    Ident(String),
    Int(i64),
    Bool(bool),
    Null,
    Str(Box<StrLit>),
    Regex(Box<RegexLit>),
    Shell(Box<ShellLit>),
    Array(Vec<Node>),
    Call {
        name: String,
        args: Vec<Node>,
    },
    Not(Box<Node>),
    Infix {
        op: InfixOp,
        lhs: Box<Node>,
        rhs: Box<Node>,
    },
    Ternary {
        cond: Box<Node>,
        then: Box<Node>,
        other: Box<Node>,
    },
}

fn list(f: &mut fmt::Formatter<'_>, items: &[Node]) -> fmt::Result {
    for (i, n) in items.iter().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        write!(f, "{n}")?;
    }
    Ok(())
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Ident(name) => f.write_str(name),
            Kind::Int(v) => write!(f, "{v}"),
            Kind::Bool(v) => write!(f, "{v}"),
            Kind::Null => f.write_str("null"),
            Kind::Str(s) => {
                let q = if s.double { '"' } else { '\'' };
                write!(f, "{q}{}{q}", s.raw)
            }
            Kind::Regex(r) => write!(f, "/{}/{}", r.pattern, r.flags),
            Kind::Shell(s) => f.write_str(&s.raw),
            Kind::Array(items) => {
                f.write_str("[")?;
                list(f, items)?;
                f.write_str("]")
            }
            Kind::Call { name, args } => {
                write!(f, "{name}(")?;
                list(f, args)?;
                f.write_str(")")
            }
            Kind::Not(inner) => write!(f, "(!{inner})"),
            Kind::Infix { op, lhs, rhs } => write!(f, "({lhs} {} {rhs})", op.as_str()),
            Kind::Ternary { cond, then, other } => write!(f, "({cond} ? {then} : {other})"),
        }
    }
}
