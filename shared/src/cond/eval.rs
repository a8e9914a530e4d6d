//! The evaluator. It runs on checked trees (where types already agree) and also, for
//! diagnostics, on unchecked ones, with the raw evaluator's rules: `!x` is true only for false
//! and null, `&&`/`||` short-circuit, values of different types are simply unequal.

use std::borrow::Cow;

use serde_json::Value;

use super::ast::{InfixOp, Kind, Node};
use super::regex::RegexLit;
use super::shell;
use super::vars::{self, Schema, unsupported_buildkite_env};
use super::{CondError, Context, ErrorKind};
use crate::interpolate::Env;

#[derive(Debug, Clone)]
pub(crate) enum Val<'a> {
    Null,
    Bool(bool),
    Int(i64),
    Str(Cow<'a, str>),
    Arr(Vec<Cow<'a, str>>),
    Re(&'a RegexLit),
}

impl Val<'_> {
    pub(crate) fn truthy(&self) -> bool {
        !matches!(self, Val::Null | Val::Bool(false))
    }

    pub(crate) fn to_json(&self) -> Value {
        match self {
            Val::Null => Value::Null,
            Val::Bool(b) => Value::Bool(*b),
            Val::Int(i) => Value::from(*i),
            Val::Str(s) => Value::String(s.to_string()),
            Val::Arr(a) => Value::Array(a.iter().map(|s| Value::String(s.to_string())).collect()),
            Val::Re(r) => Value::String(format!("/{}/{}", r.pattern, r.flags)),
        }
    }

    pub(crate) fn type_name(&self) -> &'static str {
        match self {
            Val::Null => "null",
            Val::Bool(_) => "boolean",
            Val::Int(_) => "number",
            Val::Str(_) => "string",
            Val::Arr(_) => "string array",
            Val::Re(_) => "regular expression",
        }
    }
}

/// Where names and environment variables come from.
pub(crate) struct Scope<'c> {
    pub schema: &'c Schema,
    pub ctx: &'c Context,
    /// Raw mode: no schema; any name in the context's variables is readable.
    pub raw: bool,
}

impl Env for Scope<'_> {
    fn get(&self, name: &str) -> Option<Cow<'_, str>> {
        vars::env(self.schema, self.ctx, name)
    }
}

fn fail(message: impl Into<String>, node: &Node) -> CondError {
    CondError::new(ErrorKind::Evaluation, message, Some(node.pos))
}

fn json_to_val<'c>(v: Cow<'c, Value>, name: &str, node: &Node) -> Result<Val<'c>, CondError> {
    let bad = |what: &str| {
        fail(
            format!("variable `{name}` holds {what}, which conditions cannot use"),
            node,
        )
    };
    Ok(match v {
        Cow::Borrowed(v) => match v {
            Value::Null => Val::Null,
            Value::Bool(b) => Val::Bool(*b),
            Value::Number(n) => Val::Int(n.as_i64().ok_or_else(|| bad("a non-integer number"))?),
            Value::String(s) => Val::Str(Cow::Borrowed(s.as_str())),
            Value::Array(items) => Val::Arr(
                items
                    .iter()
                    .map(|i| i.as_str().map(Cow::Borrowed))
                    .collect::<Option<_>>()
                    .ok_or_else(|| bad("an array that is not all strings"))?,
            ),
            Value::Object(_) => return Err(bad("an object")),
        },
        Cow::Owned(v) => match v {
            Value::String(s) => Val::Str(Cow::Owned(s)),
            other => json_to_val(Cow::Borrowed(&other), name, node)?.into_owned(),
        },
    })
}

impl Val<'_> {
    fn into_owned(self) -> Val<'static> {
        match self {
            Val::Null => Val::Null,
            Val::Bool(b) => Val::Bool(b),
            Val::Int(i) => Val::Int(i),
            Val::Str(s) => Val::Str(Cow::Owned(s.into_owned())),
            Val::Arr(a) => Val::Arr(a.into_iter().map(|s| Cow::Owned(s.into_owned())).collect()),
            // Only built from literals, never from a temporary JSON value.
            Val::Re(_) => Val::Null,
        }
    }
}

/// Declared type vs the value the context holds: a mismatch is the caller's bug, reported as an
/// evaluation error rather than silently compared.
fn matches_declared(v: &Val<'_>, ty: vars::VarType) -> bool {
    use vars::VarType as T;
    matches!(
        (ty, v),
        (_, Val::Null)
            | (T::Any, _)
            | (T::String | T::Enum(_), Val::Str(_))
            | (T::Number, Val::Int(_))
            | (T::Bool, Val::Bool(_))
            | (T::StringArray, Val::Arr(_))
    )
}

impl<'c> Scope<'c> {
    pub(crate) fn eval(&self, node: &'c Node) -> Result<Val<'c>, CondError> {
        Ok(match &node.kind {
            Kind::Null => Val::Null,
            Kind::Bool(b) => Val::Bool(*b),
            Kind::Int(i) => Val::Int(*i),
            Kind::Str(s) if s.template => Val::Str(Cow::Owned(
                shell::eval_string(&s.raw, self).map_err(|m| fail(m, node))?,
            )),
            Kind::Str(s) => Val::Str(Cow::Borrowed(s.value.as_str())),
            Kind::Shell(s) => match shell::eval_token(&s.raw, self).map_err(|m| fail(m, node))? {
                Some(v) => Val::Str(Cow::Owned(v)),
                None => Val::Null,
            },
            Kind::Regex(r) => Val::Re(r),
            Kind::Ident(name) => {
                let value = if self.raw {
                    match self.ctx.variables.get(name) {
                        Some(v) => Cow::Borrowed(v),
                        None => return Err(fail(format!("`{name}` is not a variable"), node)),
                    }
                } else {
                    vars::variable(self.schema, self.ctx, name)
                };
                let v = json_to_val(value, name, node)?;
                if !self.raw
                    && let Some(ty) = self.schema.get(name)
                    && !matches_declared(&v, ty)
                {
                    return Err(fail(
                        format!(
                            "variable `{name}` holds a {}, not the declared type",
                            v.type_name()
                        ),
                        node,
                    ));
                }
                v
            }
            Kind::Array(items) => {
                let mut out = Vec::with_capacity(items.len());
                for item in items {
                    match self.eval(item)? {
                        Val::Str(s) => out.push(s),
                        other => {
                            return Err(fail(
                                format!(
                                    "array elements must be strings, found {}",
                                    other.type_name()
                                ),
                                item,
                            ));
                        }
                    }
                }
                Val::Arr(out)
            }
            Kind::Not(inner) => Val::Bool(!self.eval(inner)?.truthy()),
            Kind::Ternary { cond, then, other } => {
                if self.eval(cond)?.truthy() {
                    self.eval(then)?
                } else {
                    self.eval(other)?
                }
            }
            Kind::Call { name, args } => self.call(node, name, args)?,
            Kind::Infix { op, lhs, rhs } => Val::Bool(self.infix(*op, lhs, rhs)?),
        })
    }

    fn call(&self, node: &'c Node, name: &str, args: &'c [Node]) -> Result<Val<'c>, CondError> {
        let Some(build_env) = self.schema.env_function_kind(name) else {
            return Err(fail(format!("`{name}` is not a function"), node));
        };
        let [arg] = args else {
            return Err(fail(format!("`{name}` takes one argument"), node));
        };
        // A name computed at evaluation fails closed when it comes out blank or unset (an
        // indirect `env(env("X"))` whose inner variable is missing), or names a `BUILDKITE_*`
        // variable conditions may not read.
        let key = match self.eval(arg)? {
            Val::Str(s) if !s.is_empty() => s,
            Val::Str(_) | Val::Null => {
                return Err(fail(
                    format!(
                        "the argument to `{name}` is blank; it must name an environment variable"
                    ),
                    arg,
                ));
            }
            other => {
                return Err(fail(
                    format!("`{name}` needs a string, found {}", other.type_name()),
                    arg,
                ));
            }
        };
        if self.schema.buildkite && unsupported_buildkite_env(&key) {
            return Err(fail(vars::unsupported_env_message(&key), arg));
        }
        Ok(match vars::env(self.schema, self.ctx, &key) {
            Some(v) => Val::Str(v),
            None if build_env => Val::Null,
            None => Val::Str(Cow::Borrowed("")),
        })
    }

    fn infix(&self, op: InfixOp, lhs: &'c Node, rhs: &'c Node) -> Result<bool, CondError> {
        match op {
            InfixOp::And => Ok(self.eval(lhs)?.truthy() && self.eval(rhs)?.truthy()),
            InfixOp::Or => Ok(self.eval(lhs)?.truthy() || self.eval(rhs)?.truthy()),
            InfixOp::Eq => Ok(equal(&self.eval(lhs)?, &self.eval(rhs)?)),
            InfixOp::NotEq => Ok(!equal(&self.eval(lhs)?, &self.eval(rhs)?)),
            InfixOp::ReEq | InfixOp::ReNotEq => {
                let negate = op == InfixOp::ReNotEq;
                let l = self.eval(lhs)?;
                let r = self.eval(rhs)?;
                let Val::Re(re) = r else {
                    return Err(fail(
                        format!("`{}` needs a regular expression on the right", op.as_str()),
                        rhs,
                    ));
                };
                match l {
                    Val::Null => Ok(negate),
                    Val::Str(s) => Ok(re.re.is_match(&s) != negate),
                    other => Err(fail(
                        format!(
                            "`{}` needs a string, found {}",
                            op.as_str(),
                            other.type_name()
                        ),
                        lhs,
                    )),
                }
            }
            InfixOp::Includes => {
                let l = self.eval(lhs)?;
                let r = self.eval(rhs)?;
                let items = match l {
                    Val::Null => return Ok(false),
                    Val::Arr(items) => items,
                    other => {
                        return Err(fail(
                            format!("`includes` needs an array, found {}", other.type_name()),
                            lhs,
                        ));
                    }
                };
                match r {
                    Val::Null => Ok(false),
                    Val::Str(s) => Ok(items.contains(&s)),
                    Val::Re(re) => Ok(items.iter().any(|i| re.re.is_match(i))),
                    other => Err(fail(
                        format!("`includes` cannot look for a {}", other.type_name()),
                        rhs,
                    )),
                }
            }
        }
    }
}

fn equal(a: &Val<'_>, b: &Val<'_>) -> bool {
    match (a, b) {
        (Val::Null, Val::Null) => true,
        (Val::Bool(x), Val::Bool(y)) => x == y,
        (Val::Int(x), Val::Int(y)) => x == y,
        (Val::Str(x), Val::Str(y)) => x == y,
        (Val::Arr(x), Val::Arr(y)) => x == y,
        (Val::Re(x), Val::Re(y)) => x.pattern == y.pattern && x.flags == y.flags,
        _ => false,
    }
}
