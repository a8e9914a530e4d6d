//! The `kitebridge` command: the self-hosted process and the local tools.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kitebridge::config::Role;

mod eval;
mod rules;
#[cfg(feature = "sandbox")]
mod sandbox;

#[derive(Parser)]
#[command(
    name = "kitebridge",
    version,
    about = "Buildkite -> Bitbucket commit statuses, releases and trigger rules"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run everything in one process: webhook receiver, releases API, poll loop, embedded store.
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
    /// Run one poll-and-report cycle, then exit (status 0 only if the cycle succeeded).
    Poll,
    #[cfg(feature = "sandbox")]
    /// Try kitebridge with no accounts: SIMULATED Buildkite and Bitbucket servers on loopback,
    /// `kitebridge serve` wired to them, and a short story (builds fail and pass, a webhook is
    /// missed, a release is cut and deployed) showing what kitebridge does. See docs/sandbox.md.
    Sandbox {
        /// Address kitebridge listens on (`127.0.0.1:0`: any free port; the address is printed).
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Play the story, print the summary and exit (status 0 only if every step did what
        /// it should) instead of staying up.
        #[arg(long)]
        exit: bool,
        /// Pause between the story's steps, in milliseconds, so a human can follow.
        #[arg(long, default_value_t = 400, value_name = "MS")]
        pace_ms: u64,
    },
    /// Work with trigger rules.
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
    },
    /// Evaluate or validate a Buildkite condition (`if:`, notification `if:`, rule conditions),
    /// exactly as Buildkite would. Prints one JSON line: {"value": ...}, {"valid": true} or
    /// {"error": {"kind", "message", "position"}}. Exit 0 with a value, 1 with an error in the
    /// expression, 2 for bad usage.
    Eval(eval::EvalArgs),
    /// Expand a `${VAR}` template exactly as `buildkite-agent pipeline upload` does. Prints
    /// {"value": "..."} or {"error": {"message": ...}}. Exit 0, 1 on a template error, 2 for bad
    /// usage.
    Interpolate(eval::InterpolateArgs),
}

#[derive(Subcommand)]
enum RulesCommand {
    /// Dry run: show what each rule would do for a webhook payload.
    Check {
        /// JSON file of rules.
        #[arg(long)]
        rules: std::path::PathBuf,
        /// A Buildkite webhook payload (JSON).
        #[arg(long)]
        event: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The local tools need no runtime: answer them before starting one.
    let cli = match cli.command {
        Command::Eval(args) => return eval::finish("eval", eval::eval(args)),
        Command::Interpolate(args) => {
            return eval::finish("interpolate", eval::interpolate(args));
        }
        Command::Rules {
            command: RulesCommand::Check { rules, event },
        } => return eval::finish("rules check", rules::check(&rules, &event)),
        command => Cli { command },
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kitebridge: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kitebridge: {e}");
            ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode, kitebridge::Error> {
    match cli.command {
        Command::Serve { listen } => {
            // Ctrl-C and SIGTERM are caught from here on: one arriving during start-up still
            // means a clean stop.
            let shutdown = shutdown_signal();
            let state = kitebridge::bootstrap::self_hosted(Role::Serve)?;
            let (listener, bound) = bind(listen).await?;
            tracing::info!(listen = %bound, "kitebridge serving");
            // Printed once the address is bound, so scripts and tests can wait for it.
            println!("kitebridge listening on http://{bound}");
            serve_on(listener, state, shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(feature = "sandbox")]
        Command::Sandbox {
            listen,
            exit,
            pace_ms,
        } => {
            let shutdown = shutdown_signal();
            sandbox::run(
                sandbox::Options {
                    listen,
                    exit,
                    pace: std::time::Duration::from_millis(pace_ms),
                },
                shutdown,
            )
            .await
        }
        Command::Poll => {
            let state = kitebridge::bootstrap::self_hosted(Role::Poller)?;
            let Some(poller) = state.poller else {
                return Err(kitebridge::Error::Startup(
                    "the poller is not configured".into(),
                ));
            };
            match poller.cycle().await {
                Ok(summary) => {
                    println!("{}", serde_json::to_string(&summary).unwrap_or_default());
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("kitebridge poll: {e}");
                    Ok(ExitCode::from(1))
                }
            }
        }
        Command::Rules { .. } | Command::Eval { .. } | Command::Interpolate { .. } => {
            // Answered in `main` before the runtime starts.
            Ok(ExitCode::from(2))
        }
    }
}

/// Binds `listen`; the error names the address.
async fn bind(
    listen: SocketAddr,
) -> Result<(tokio::net::TcpListener, SocketAddr), kitebridge::Error> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| kitebridge::Error::Startup(format!("cannot listen on {listen}: {e}")))?;
    let bound = listener.local_addr().unwrap_or(listen);
    Ok((listener, bound))
}

/// The self-hosted process on a bound listener: every HTTP route (webhook receiver, releases
/// and rules APIs, `/healthz`) and, beside it, the poll loop. Returns once `shutdown` has
/// resolved, the requests in flight have been answered (or `KITEBRIDGE_SHUTDOWN_TIMEOUT` has
/// passed) and the poll loop has finished its cycle. `kitebridge serve` and `kitebridge
/// sandbox` both run exactly this.
async fn serve_on(
    listener: tokio::net::TcpListener,
    state: kitebridge::http::AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), kitebridge::Error> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let poll_loop = match state.poller.clone() {
        Some(poller) => Some(tokio::spawn(kitebridge::serve::poll_loop(
            poller,
            state.store.clone(),
            state.config.monitor.polling_interval,
            stop_rx,
        ))),
        None => {
            tracing::warn!("poll loop not started: Buildkite or Bitbucket is not configured");
            None
        }
    };
    let limits = state.config.server.clone();
    kitebridge::serve::serve(listener, kitebridge::http::router(state), &limits, shutdown).await;
    // Requests in flight are answered; let the poll loop finish its cycle, then return.
    let _ = stop_tx.send(true);
    if let Some(poll_loop) = poll_loop {
        let _ = poll_loop.await;
    }
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM. The handlers are installed when this is called (not when it
/// is first awaited), so a signal that arrives before then is not lost.
fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let interrupt = signal(SignalKind::interrupt()).ok();
        let terminate = signal(SignalKind::terminate()).ok();
        async move {
            let wait = |s: Option<tokio::signal::unix::Signal>| async move {
                match s {
                    Some(mut s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = wait(interrupt) => {},
                _ = wait(terminate) => {},
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
