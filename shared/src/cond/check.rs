//! The type-checker: strict types before anything runs, as Buildkite's validator does. Both sides
//! of `&&`/`||` are checked even when evaluation would skip one.

use super::ast::{InfixOp, Kind, Node, StrLit};
use super::shell;
use super::vars::{self, Schema, VarType, unsupported_buildkite_env, unsupported_env_message};
use super::{CondError, ErrorKind};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ty {
    /// Not known before evaluation ([`VarType::Any`]); accepted everywhere.
    Unknown,
    Null,
    Bool,
    Number,
    Str,
    /// An enum variable, by name (for messages) and allowed values.
    Enum(&'static [&'static str]),
    Regex,
    Array,
}

impl Ty {
    fn describe(self) -> &'static str {
        match self {
            Ty::Unknown => "unknown",
            Ty::Null => "null",
            Ty::Bool => "boolean",
            Ty::Number => "number",
            Ty::Str => "string",
            Ty::Enum(_) => "enumeration value",
            Ty::Regex => "regular expression",
            Ty::Array => "string array",
        }
    }
}

fn invalid(message: impl Into<String>, node: &Node) -> CondError {
    CondError::new(ErrorKind::Validation, message, Some(node.pos))
}

fn unexpected(want: &str, got: Ty, node: &Node) -> CondError {
    invalid(
        format!(
            "unexpected type: expected {want} but found {}",
            got.describe()
        ),
        node,
    )
}

/// A string literal whose value is known before evaluation (not a `"...$x..."` template).
fn static_str(node: &Node) -> Option<&StrLit> {
    match &node.kind {
        Kind::Str(s) if !s.template => Some(s),
        _ => None,
    }
}

pub(crate) struct Checker<'s> {
    pub schema: &'s Schema,
}

impl Checker<'_> {
    /// Checks a whole condition: it must produce a boolean (or null, read as false).
    pub(crate) fn check_condition(&self, node: &Node) -> Result<(), CondError> {
        match self.check(node)? {
            Ty::Bool | Ty::Null | Ty::Unknown => Ok(()),
            other => Err(CondError::new(
                ErrorKind::Result,
                format!("expected boolean result, got {}", other.describe()),
                Some(node.pos),
            )),
        }
    }

    fn check(&self, node: &Node) -> Result<Ty, CondError> {
        Ok(match &node.kind {
            Kind::Bool(_) => Ty::Bool,
            Kind::Null => Ty::Null,
            Kind::Int(_) => Ty::Number,
            Kind::Str(_) | Kind::Shell(_) => Ty::Str,
            Kind::Regex(_) => Ty::Regex,
            Kind::Ident(name) => match self.schema.get(name) {
                None => return Err(invalid(self.schema.unknown_message(name), node)),
                Some(VarType::String) => Ty::Str,
                Some(VarType::Number) => Ty::Number,
                Some(VarType::Bool) => Ty::Bool,
                Some(VarType::StringArray) => Ty::Array,
                Some(VarType::Enum(values)) => Ty::Enum(values),
                Some(VarType::Any) => Ty::Unknown,
            },
            Kind::Not(inner) => {
                self.expect(inner, &[Ty::Bool, Ty::Null], "boolean")?;
                Ty::Bool
            }
            Kind::Array(items) => {
                for item in items {
                    self.expect(item, &[Ty::Str], "string")?;
                }
                Ty::Array
            }
            Kind::Call { name, args } => self.check_call(node, name, args)?,
            Kind::Infix { op, lhs, rhs } => self.check_infix(*op, lhs, rhs)?,
            Kind::Ternary { cond, then, other } => {
                self.expect(cond, &[Ty::Bool, Ty::Null], "boolean")?;
                let a = self.check(then)?;
                let b = self.check(other)?;
                for (t, n) in [(a, then), (b, other)] {
                    if matches!(t, Ty::Enum(_) | Ty::Regex) {
                        return Err(unexpected("a comparable value", t, n));
                    }
                }
                match (a, b) {
                    (Ty::Null | Ty::Unknown, t) | (t, Ty::Null | Ty::Unknown) => t,
                    (x, y) if x == y => x,
                    (x, y) => {
                        return Err(invalid(
                            format!(
                                "both branches of `?:` must have the same type, found {} and {}",
                                x.describe(),
                                y.describe()
                            ),
                            other,
                        ));
                    }
                }
            }
        })
    }

    fn expect(&self, node: &Node, allowed: &[Ty], want: &str) -> Result<Ty, CondError> {
        let t = self.check(node)?;
        if t == Ty::Unknown || allowed.contains(&t) {
            Ok(t)
        } else {
            Err(unexpected(want, t, node))
        }
    }

    fn check_infix(&self, op: InfixOp, lhs: &Node, rhs: &Node) -> Result<Ty, CondError> {
        match op {
            InfixOp::And | InfixOp::Or => {
                self.expect(lhs, &[Ty::Bool, Ty::Null], "boolean")?;
                self.expect(rhs, &[Ty::Bool, Ty::Null], "boolean")?;
            }
            InfixOp::ReEq | InfixOp::ReNotEq => {
                self.expect(lhs, &[Ty::Str, Ty::Null], "string or null")?;
                self.expect(rhs, &[Ty::Regex], "regular expression")?;
            }
            InfixOp::Includes => {
                self.expect(lhs, &[Ty::Array, Ty::Null], "string array or null")?;
                self.expect(
                    rhs,
                    &[Ty::Str, Ty::Regex, Ty::Null],
                    "string, regular expression, or null",
                )?;
            }
            InfixOp::Eq | InfixOp::NotEq => self.check_equality(lhs, rhs)?,
        }
        Ok(Ty::Bool)
    }

    fn check_equality(&self, lhs: &Node, rhs: &Node) -> Result<(), CondError> {
        let l = self.check(lhs)?;
        let r = self.check(rhs)?;
        if let Ty::Enum(_) = r {
            if let (Some(lit), Ty::Enum(values)) = (static_str(lhs), r)
                && !values.contains(&lit.value.as_str())
            {
                return Err(invalid(
                    format!("{:?} is not a valid `{rhs}`", lit.value),
                    lhs,
                ));
            }
            return Err(invalid(
                format!("`{rhs}` must be on the left of the comparison, as `{rhs} == \"value\"`"),
                rhs,
            ));
        }
        if let Ty::Enum(values) = l {
            return match r {
                Ty::Null | Ty::Unknown => Ok(()),
                Ty::Str => match static_str(rhs) {
                    Some(lit) if !values.contains(&lit.value.as_str()) => Err(invalid(
                        format!("{:?} is not a valid `{lhs}`", lit.value),
                        rhs,
                    )),
                    _ => Ok(()),
                },
                other => Err(unexpected("string or null", other, rhs)),
            };
        }
        match (l, r) {
            (Ty::Null | Ty::Unknown, _) | (_, Ty::Null | Ty::Unknown) => Ok(()),
            (x, y) if x == y => Ok(()),
            (x, y) => Err(unexpected(x.describe(), y, rhs)),
        }
    }

    fn check_call(&self, node: &Node, name: &str, args: &[Node]) -> Result<Ty, CondError> {
        if self.schema.env_function_kind(name).is_none() {
            return Err(invalid(format!("`{name}` is not a function"), node));
        }
        if args.len() != 1 {
            return Err(invalid(
                format!(
                    "wrong number of arguments for `{name}`: got {}, want 1",
                    args.len()
                ),
                node,
            ));
        }
        let arg = &args[0];
        self.expect(arg, &[Ty::Str], "string")?;
        // A name built by substitution is only known at evaluation, which checks it then.
        if let Kind::Str(lit) = &arg.kind
            && !(lit.double && shell::has_expansion(&lit.raw))
            && let Some(message) = literal_env_name_error(self.schema, name, &lit.value)
        {
            return Err(invalid(message, arg));
        }
        Ok(Ty::Str)
    }
}

/// Why a literal argument to `env`/`build.env` is refused, in the server's words: a `$` (with
/// the name it probably meant), a name that is not `[A-Za-z0-9_]+`, or a `BUILDKITE_*` name
/// conditions cannot read (with a close supported one when there is).
fn literal_env_name_error(schema: &Schema, function: &str, key: &str) -> Option<String> {
    if key.contains('$') {
        let suggestion = key.replace('$', "");
        let mut msg = format!("Argument to `{function}` should not include `$`");
        if !suggestion.is_empty() {
            msg.push_str(&format!(" - did you mean {suggestion}?"));
        }
        return Some(msg);
    }
    if !vars::is_env_name(key) {
        return Some(format!(
            "Argument to `{function}` should be an environment variable name"
        ));
    }
    (schema.buildkite && unsupported_buildkite_env(key)).then(|| unsupported_env_message(key))
}
