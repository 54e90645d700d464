//! `herald-agent`: parse arguments, start logging, run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use herald_agent::state::{self, AgentConfig, Status};

/// Exit code for configuration problems (not enrolled, bad state).
const EXIT_CONFIG: u8 = 64;

/// Herald's resident agent.
#[derive(Debug, Parser)]
#[command(name = "herald-agent", version, about)]
struct Cli {
    /// State directory (default: /var/lib/herald-agent as root, else the user data dir).
    #[arg(long, global = true, env = "HERALD_STATE_DIR")]
    state_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Enroll with the server named in TOKEN.
    Enroll {
        /// The enrollment token from `herald-server token create`.
        token: String,
        /// Name to register under (default: the host name).
        #[arg(long)]
        name: Option<String>,
    },
    /// Run the standby loop (normally started at boot by the service manager).
    Run,
    /// Run the user-session helper that opens browser services (normally started at
    /// login; see installers/).
    Session {
        /// The daemon's session socket (default: that of the agent in --state-dir if
        /// given, else /run/herald-agent/session.sock, else the user's own agent's).
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Show enrollment and connection state.
    Status {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Watches a self-update on trial and puts the previous binary back if the new one
    /// fails (started by the agent itself).
    #[command(hide = true, name = "update-watchdog")]
    UpdateWatchdog {
        /// Process id of the agent on trial.
        #[arg(long)]
        pid: u32,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    let dir = state::state_dir(cli.state_dir.as_deref());
    match cli.command {
        Command::Enroll { token, name } => {
            match herald_agent::enroll(&dir, &token, name.as_deref()).await {
                Ok(id) => {
                    println!("enrolled as {id}; state in {}", dir.display());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        Command::Run => {
            match herald_agent::run(&dir, herald_agent::Options::default(), shutdown()).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            }
        }
        Command::Session { socket } => {
            let options = herald_agent::browser::HelperOptions::from_env(
                socket.as_deref(),
                cli.state_dir.as_deref(),
            );
            herald_agent::browser::run(options, shutdown()).await;
            ExitCode::SUCCESS
        }
        Command::Status { json } => status(&dir, json),
        Command::UpdateWatchdog { pid } => {
            let options = herald_agent::selfupdate::WatchdogOptions {
                exec_after_revert: true,
            };
            match herald_agent::selfupdate::watchdog(&dir, pid, options) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("herald-agent update-watchdog: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler only fails outside a runtime");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn fail(error: &herald_agent::AgentError) -> ExitCode {
    eprintln!("herald-agent: {error}");
    match error {
        herald_agent::AgentError::State(_)
        | herald_agent::AgentError::AlreadyEnrolled(_)
        | herald_agent::AgentError::Token(_) => ExitCode::from(EXIT_CONFIG),
        _ => ExitCode::FAILURE,
    }
}

fn status(dir: &std::path::Path, json: bool) -> ExitCode {
    let config = match AgentConfig::load(dir) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("herald-agent: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let status = Status::load(dir);
    let outbox = herald_agent::journal::Journal::open(dir)
        .and_then(|j| j.outbox_len())
        .unwrap_or(0);
    if json {
        let value = serde_json::json!({
            "agent_id": config.agent_id,
            "server": config.server,
            "groups": config.token_groups,
            "connected": status.as_ref().is_some_and(|s| s.connected),
            "since": status.as_ref().map(|s| s.since),
            "last_error": status.as_ref().and_then(|s| s.last_error.clone()),
            "addresses": status.as_ref().map(|s| s.addresses.clone()).unwrap_or_default(),
            "results_waiting": outbox,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&value).expect("json value serializes")
        );
    } else {
        println!("agent id:        {}", config.agent_id);
        println!("server:          {}", config.server);
        match &status {
            Some(s) if s.connected => println!("connection:      connected since {}", s.since),
            Some(s) => println!(
                "connection:      not connected{}",
                s.last_error
                    .as_ref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            ),
            None => println!("connection:      agent has not run yet"),
        }
        println!("results waiting: {outbox}");
    }
    ExitCode::SUCCESS
}

/// Logs to stderr, filtered by `HERALD_LOG` (`LEVEL` and `TARGET=LEVEL` directives, e.g.
/// `warn,herald_agent=debug`). A target filter rather than `EnvFilter`: the resident agent
/// does not need span and field filters, and leaving out their regular expressions keeps
/// its resident code smaller.
fn init_logging() {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::prelude::*;
    const DEFAULT: &str = "warn,herald_agent=info";
    let (filter, bad) = match std::env::var("HERALD_LOG") {
        Ok(value) => match value.parse::<Targets>() {
            Ok(filter) => (filter, None),
            Err(e) => (DEFAULT.parse().expect("valid default"), Some((value, e))),
        },
        Err(_) => (DEFAULT.parse().expect("valid default"), None),
    };
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(filter)
        .init();
    if let Some((value, e)) = bad {
        tracing::warn!("ignoring HERALD_LOG={value:?} ({e}); using {DEFAULT:?}");
    }
}
