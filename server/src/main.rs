//! `herald-server`: parse arguments, start logging, run.

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HERALD_LOG").unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("warn,herald_server=info,herald_agent=info")
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    herald_server::cli::run(herald_server::cli::Cli::parse()).await
}
