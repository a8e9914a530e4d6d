//! The `kitebridge` command: the self-hosted process and the local tools.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kitebridge::config::Role;

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
    /// Work with trigger rules.
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
    },
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
            let state = kitebridge::bootstrap::self_hosted(Role::Serve)?;
            let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
                kitebridge::Error::Startup(format!("cannot listen on {listen}: {e}"))
            })?;
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            let poll_loop = tokio::spawn(kitebridge::serve::poll_loop(state.clone(), stop_rx));
            let bound = listener.local_addr().unwrap_or(listen);
            tracing::info!(listen = %bound, "kitebridge serving");
            // Printed once the address is bound, so scripts and tests can wait for it.
            println!("kitebridge listening on http://{bound}");
            let served = axum::serve(listener, kitebridge::http::router(state))
                .with_graceful_shutdown(shutdown_signal())
                .await;
            // Requests in flight are answered; let the poll loop finish its cycle, then exit.
            let _ = stop_tx.send(true);
            let _ = poll_loop.await;
            served.map_err(|e| kitebridge::Error::Startup(format!("server: {e}")))?;
            Ok(ExitCode::SUCCESS)
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
        Command::Rules {
            command: RulesCommand::Check { .. },
        } => {
            eprintln!("kitebridge rules check: trigger rules are not built yet");
            Ok(ExitCode::from(2))
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
