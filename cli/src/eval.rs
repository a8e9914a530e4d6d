//! `kitebridge eval` and `kitebridge interpolate`: Buildkite conditions and `${VAR}` templates,
//! one at a time or by the thousand (`--batch`), through the same code as trigger rules.
//!
//! Output is one JSON line per case. Exit status: 0 when every case gave a value, 1 when any
//! case gave an error (in the expression or template, or a malformed batch line), 2 for bad
//! usage (unreadable file, bad JSON in an option file, unknown flag), with a message on stderr.

use std::collections::HashMap;
use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use kitebridge::cond::{self, CondError, Context, EntryPoint};
use kitebridge::interpolate::{self, Env, NoEnv};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Bad usage: printed on stderr, exit 2.
#[derive(Debug)]
pub struct Usage(pub String);

pub const EXIT_OK: u8 = 0;
pub const EXIT_ERROR: u8 = 1;
pub const EXIT_USAGE: u8 = 2;

fn read_text(path: &Path) -> Result<String, Usage> {
    if path == Path::new("-") {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin().lock(), &mut s)
            .map_err(|e| Usage(format!("cannot read stdin: {e}")))?;
        return Ok(s);
    }
    std::fs::read_to_string(path).map_err(|e| Usage(format!("cannot read {}: {e}", path.display())))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Result<T, Usage> {
    let text = read_text(path)?;
    serde_json::from_str(&text).map_err(|e| Usage(format!("{}: not {what}: {e}", path.display())))
}

fn string_map(path: Option<&PathBuf>) -> Result<HashMap<String, String>, Usage> {
    match path {
        None => Ok(HashMap::new()),
        Some(p) => read_json(p, "a JSON object of strings"),
    }
}

/// Opens the batch input: a file, or stdin for `-`.
fn open_batch(path: &Path) -> Result<Box<dyn BufRead>, Usage> {
    if path == Path::new("-") {
        return Ok(Box::new(std::io::BufReader::with_capacity(
            1 << 16,
            std::io::stdin(),
        )));
    }
    let f = std::fs::File::open(path)
        .map_err(|e| Usage(format!("cannot read {}: {e}", path.display())))?;
    Ok(Box::new(std::io::BufReader::with_capacity(1 << 16, f)))
}

// ---- output -----------------------------------------------------------------------------------

#[derive(Serialize)]
struct ErrorBody<'a> {
    kind: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    position: Option<usize>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Answer<'a> {
    Value { value: Value },
    Valid { valid: bool },
    Error { error: ErrorBody<'a> },
}

fn cond_error(e: &CondError) -> Answer<'_> {
    Answer::Error {
        error: ErrorBody {
            kind: e.kind.as_str(),
            message: &e.message,
            position: e.position,
        },
    }
}

fn write_line(out: &mut impl Write, answer: &impl Serialize) -> Result<(), Usage> {
    serde_json::to_writer(&mut *out, answer)
        .map_err(|e| Usage(format!("cannot write the output: {e}")))?;
    out.write_all(b"\n")
        .map_err(|e| Usage(format!("cannot write the output: {e}")))
}

// ---- eval -------------------------------------------------------------------------------------

#[derive(clap::Args)]
pub struct EvalArgs {
    /// The condition, e.g. `build.branch =~ /^release-/`.
    pub expr: Option<String>,
    /// Where the condition is used: build_condition, build_condition_with_step,
    /// build_notification or step_notification.
    #[arg(long, default_value = "build_condition", value_parser = parse_entry_point)]
    pub entry_point: EntryPoint,
    /// Parse and check only; do not evaluate.
    #[arg(long)]
    pub validate: bool,
    /// JSON object of variables by dotted name, e.g. {"build.branch": "main"}.
    #[arg(long, value_name = "FILE")]
    pub vars: Option<PathBuf>,
    /// JSON object read by `build.env("X")` and `env("X")` (the build's env).
    #[arg(long, value_name = "FILE")]
    pub build_env: Option<PathBuf>,
    /// JSON object of the pipeline's env (the build's wins over it).
    #[arg(long, value_name = "FILE")]
    pub project_env: Option<PathBuf>,
    /// Many cases, one JSON object a line (`input`, `api`, `entry_point`, `variables`,
    /// `build_env`, `project_env`, `context_only`); `-` for stdin. One result line each.
    #[arg(long, value_name = "FILE")]
    pub batch: Option<PathBuf>,
}

fn parse_entry_point(s: &str) -> Result<EntryPoint, String> {
    match s {
        "build_condition"
        | "build_condition_with_step"
        | "build_notification"
        | "step_notification" => s
            .parse()
            .map_err(|e: kitebridge::cond::CondError| e.message),
        other => Err(format!(
            "unknown entry point {other:?} (build_condition, build_condition_with_step, build_notification, step_notification)"
        )),
    }
}

/// One condition: validate or evaluate, and the line to print. `true` when it gave a value.
fn eval_one(
    input: &str,
    entry: Result<EntryPoint, CondError>,
    validate: bool,
    ctx: &Context,
    out: &mut impl Write,
) -> Result<bool, Usage> {
    let entry = match entry {
        Ok(e) => e,
        Err(e) => {
            write_line(out, &cond_error(&e))?;
            return Ok(false);
        }
    };
    if validate {
        return match cond::validate(input, entry) {
            Ok(()) => write_line(out, &Answer::Valid { valid: true }).map(|()| true),
            Err(e) => write_line(out, &cond_error(&e)).map(|()| false),
        };
    }
    match cond::evaluate(input, entry, ctx) {
        Ok(b) => write_line(
            out,
            &Answer::Value {
                value: Value::Bool(b),
            },
        )
        .map(|()| true),
        Err(e) => write_line(out, &cond_error(&e)).map(|()| false),
    }
}

pub fn eval(args: EvalArgs) -> Result<u8, Usage> {
    let stdout = std::io::stdout();
    let mut out = BufWriter::with_capacity(1 << 16, stdout.lock());
    let code = match (&args.batch, &args.expr) {
        (Some(_), Some(_)) => {
            return Err(Usage(
                "give either an expression or --batch, not both".into(),
            ));
        }
        (None, None) => {
            return Err(Usage(
                "give an expression (or --batch FILE); see `kitebridge eval --help`".into(),
            ));
        }
        (Some(batch), None) => {
            if args.vars.is_some() || args.build_env.is_some() || args.project_env.is_some() {
                return Err(Usage(
                    "--vars, --build-env and --project-env do not apply to --batch (each line carries its own)".into(),
                ));
            }
            eval_batch(open_batch(batch)?, &mut out)?
        }
        (None, Some(expr)) => {
            let variables: HashMap<String, Value> = match &args.vars {
                None => HashMap::new(),
                Some(p) => read_json(p, "a JSON object of variables by dotted name")?,
            };
            let ctx = Context {
                // Facts like `pipeline.name` feed the built-in env without being variables.
                context_only: variables.clone(),
                variables,
                build_env: string_map(args.build_env.as_ref())?,
                project_env: string_map(args.project_env.as_ref())?,
            };
            if eval_one(expr, Ok(args.entry_point), args.validate, &ctx, &mut out)? {
                EXIT_OK
            } else {
                EXIT_ERROR
            }
        }
    };
    out.flush()
        .map_err(|e| Usage(format!("cannot write the output: {e}")))?;
    Ok(code)
}

/// Nulls read as absent; string maps tolerate non-string values by skipping them.
fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// One line of `eval --batch`, shaped like the cases of `conditional.json`.
#[derive(Deserialize)]
struct EvalCase<'a> {
    #[serde(borrow)]
    input: std::borrow::Cow<'a, str>,
    #[serde(default, borrow)]
    api: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    entry_point: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, deserialize_with = "nullable")]
    variables: HashMap<String, Value>,
    #[serde(default, deserialize_with = "nullable")]
    build_env: HashMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    project_env: HashMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    context_only: HashMap<String, Value>,
}

fn malformed(line_no: usize, message: &str, out: &mut impl Write) -> Result<(), Usage> {
    write_line(
        out,
        &Answer::Error {
            error: ErrorBody {
                kind: "input",
                message: &format!("line {line_no}: {message}"),
                position: None,
            },
        },
    )
}

fn eval_batch(input: Box<dyn BufRead>, out: &mut impl Write) -> Result<u8, Usage> {
    each_case(input, |line_no, text| {
        let case: EvalCase<'_> = match serde_json::from_str(text) {
            Ok(c) => c,
            Err(e) => {
                malformed(line_no, &format!("not a case: {e}"), out)?;
                return Ok(false);
            }
        };
        let validate = match case.api.as_deref() {
            None | Some("evaluate") => false,
            Some("validate") => true,
            Some(other) => {
                malformed(
                    line_no,
                    &format!("`api` is {other:?}; expected \"evaluate\" or \"validate\""),
                    out,
                )?;
                return Ok(false);
            }
        };
        let entry = case
            .entry_point
            .as_deref()
            .unwrap_or("build_condition")
            .parse::<EntryPoint>();
        let ctx = Context {
            variables: case.variables,
            build_env: case.build_env,
            project_env: case.project_env,
            context_only: case.context_only,
        };
        eval_one(&case.input, entry, validate, &ctx, out)
    })
}

/// Runs `case` on each non-blank line of a batch, numbered from 1, in order. The exit code is
/// [`EXIT_ERROR`] when any case answered with an error (`false`), else [`EXIT_OK`].
fn each_case(
    mut input: Box<dyn BufRead>,
    mut case: impl FnMut(usize, &str) -> Result<bool, Usage>,
) -> Result<u8, Usage> {
    let mut code = EXIT_OK;
    let mut line = String::new();
    let mut line_no = 0;
    loop {
        line.clear();
        let n = input
            .read_line(&mut line)
            .map_err(|e| Usage(format!("cannot read the batch: {e}")))?;
        if n == 0 {
            break;
        }
        line_no += 1;
        let text = line.trim();
        if !text.is_empty() && !case(line_no, text)? {
            code = EXIT_ERROR;
        }
    }
    Ok(code)
}

// ---- interpolate ------------------------------------------------------------------------------

#[derive(clap::Args)]
pub struct InterpolateArgs {
    /// The template, e.g. 'Deploy ${BUILDKITE_COMMIT:0:7}'.
    pub template: Option<String>,
    /// JSON object of variables (none when absent).
    #[arg(long, value_name = "FILE")]
    pub env: Option<PathBuf>,
    /// Many cases, one JSON object a line (`input`, `env`; `env` null means no variables);
    /// `-` for stdin.
    #[arg(long, value_name = "FILE")]
    pub batch: Option<PathBuf>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Interpolated<'a> {
    Value {
        value: &'a str,
    },
    /// A byte-based substring cut a character: the exact bytes, and the text with U+FFFD.
    Bytes {
        value: &'a str,
        bytes_hex: String,
    },
    Error {
        error: MessageOnly<'a>,
    },
}

#[derive(Serialize)]
struct MessageOnly<'a> {
    message: &'a str,
}

fn interpolate_one<E: Env + ?Sized>(
    template: &str,
    env: &E,
    out: &mut impl Write,
) -> Result<bool, Usage> {
    match interpolate::interpolate_bytes(template, env) {
        Ok(bytes) => match std::str::from_utf8(&bytes) {
            Ok(text) => write_line(out, &Interpolated::Value { value: text }).map(|()| true),
            Err(_) => {
                let text = String::from_utf8_lossy(&bytes);
                let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
                write_line(
                    out,
                    &Interpolated::Bytes {
                        value: &text,
                        bytes_hex: hex,
                    },
                )
                .map(|()| true)
            }
        },
        Err(e) => write_line(
            out,
            &Interpolated::Error {
                error: MessageOnly {
                    message: &e.message,
                },
            },
        )
        .map(|()| false),
    }
}

/// One line of `interpolate --batch`, shaped like the `Interpolate` cases of
/// `interpolate.json`: `env` null or absent means no variables at all.
#[derive(Deserialize)]
struct InterpolateCase<'a> {
    #[serde(borrow)]
    input: std::borrow::Cow<'a, str>,
    #[serde(default)]
    env: Option<HashMap<String, String>>,
}

pub fn interpolate(args: InterpolateArgs) -> Result<u8, Usage> {
    let stdout = std::io::stdout();
    let mut out = BufWriter::with_capacity(1 << 16, stdout.lock());
    let code = match (&args.batch, &args.template) {
        (Some(_), Some(_)) => {
            return Err(Usage("give either a template or --batch, not both".into()));
        }
        (None, None) => {
            return Err(Usage(
                "give a template (or --batch FILE); see `kitebridge interpolate --help`".into(),
            ));
        }
        (Some(batch), None) => {
            if args.env.is_some() {
                return Err(Usage(
                    "--env does not apply to --batch (each line carries its own)".into(),
                ));
            }
            each_case(open_batch(batch)?, |line_no, text| {
                Ok(match serde_json::from_str::<InterpolateCase<'_>>(text) {
                    Ok(case) => match &case.env {
                        Some(env) => interpolate_one(&case.input, env, &mut out)?,
                        None => interpolate_one(&case.input, &NoEnv, &mut out)?,
                    },
                    Err(e) => {
                        write_line(
                            &mut out,
                            &Interpolated::Error {
                                error: MessageOnly {
                                    message: &format!("line {line_no}: not a case: {e}"),
                                },
                            },
                        )?;
                        false
                    }
                })
            })?
        }
        (None, Some(template)) => {
            let env = string_map(args.env.as_ref())?;
            if interpolate_one(template, &env, &mut out)? {
                EXIT_OK
            } else {
                EXIT_ERROR
            }
        }
    };
    out.flush()
        .map_err(|e| Usage(format!("cannot write the output: {e}")))?;
    Ok(code)
}

/// Turns a command's result into the process exit status, printing usage errors on stderr.
pub fn finish(command: &str, result: Result<u8, Usage>) -> ExitCode {
    match result {
        Ok(code) => ExitCode::from(code),
        Err(Usage(message)) => {
            eprintln!("kitebridge {command}: {message}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}
