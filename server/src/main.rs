//! `herald-server`: parse arguments, start logging, run.

use std::process::ExitCode;

/// Threads for blocking work: the store's (each store call leaves its worker thread
/// through `block_in_place`, see `Store::blocking`), password hashing, file I/O. Store
/// calls queue on one connection anyway, so more threads would only wait there; tokio's
/// default of 512 let a connection storm grow the process by hundreds of idle threads.
const MAX_BLOCKING_THREADS: usize = 32;

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("herald-server: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run())
}

async fn run() -> ExitCode {
    let cli: herald_server::cli::Cli = herald_io::cli::parse();
    // `herald_agent`: the demo's in-process agent.
    let filter = tracing_subscriber::EnvFilter::try_from_env("HERALD_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("warn,herald_server=info,herald_agent=info")
    });
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if herald_io::cli::log_json() {
        logs.json().init();
    } else {
        logs.init();
    }
    herald_server::cli::run(cli).await
}
