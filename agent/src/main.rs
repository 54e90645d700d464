//! `herald-agent`: parse arguments, start logging, run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use herald_agent::inbox::{Filter, Inbox, InboxError};
use herald_agent::state::{self, AgentConfig, Status};

/// Exit code for configuration problems (not enrolled, bad state).
const EXIT_CONFIG: u8 = 64;

/// What `herald-agent inbox` does besides listing.
#[derive(Debug, Subcommand)]
enum InboxAction {
    /// Print one message and mark it read (a `read` receipt goes to the sender only if
    /// `[messages] read_receipts` is on).
    Show {
        /// Message id (32 hex digits, as listed).
        id: String,
        /// JSON output (the same object as a list entry).
        #[arg(long)]
        json: bool,
    },
    /// Remove one message.
    Rm {
        /// Message id.
        id: String,
    },
    /// Remove every message of a sender.
    Clear {
        /// Sender name.
        #[arg(long)]
        sender: String,
    },
}

/// What `herald-agent share` does.
#[derive(Debug, Subcommand)]
enum ShareAction {
    /// Share a local service with clubs (or everyone): the server lists it in the
    /// directory and brokers tunnels; this agent checks every tunnel against this table.
    Add {
        /// Service name (letters, digits, '.', '_', '-'; unique on this machine).
        name: String,
        /// The local service's IP:PORT, the only address tunnels connect to (no host
        /// names: the agent resolves nothing).
        #[arg(long)]
        to: String,
        /// An HTTP service (browsers may reach it under /p/OWNER/SERVICE/).
        #[arg(long)]
        http: bool,
        /// A club whose members may reach it (repeat or list several).
        #[arg(long = "club", value_name = "CLUB", num_args = 1.., required_unless_present = "public", conflicts_with = "public")]
        clubs: Vec<String>,
        /// Everyone may reach it.
        #[arg(long)]
        public: bool,
        /// What it is, in your words (any language; the directory is searched by it).
        #[arg(long)]
        description: Option<String>,
        /// Tunnels open at once, at most (default 16).
        #[arg(long, value_name = "N")]
        max_connections: Option<u32>,
        /// Bytes a second in each direction over all its tunnels (default: unlimited).
        #[arg(long, value_name = "BYTES_PER_SECOND")]
        rate_limit: Option<u64>,
    },
    /// List the shares (`--json`: an array of objects with name, to, http, public,
    /// clubs, description, max_connections, rate_limit).
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Stop sharing a service (open tunnels run on; new ones are refused).
    Rm {
        /// Service name.
        name: String,
    },
    /// The recent tunnel sessions of this machine, newest first (`--json`: an array of
    /// objects with id, role (provided or used), session, share, peer, started_at,
    /// ended_at, bytes_up, bytes_down, outcome; times in unix ms).
    Sessions {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

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
    /// List the push messages kept on this machine, newest first (`--json`: an array of
    /// objects with id, sender, display_name, title, body, priority, advertising, link,
    /// collapse, received_at, expires_at, read_at, displayed_at; times in unix ms).
    Inbox {
        /// Only this sender's messages.
        #[arg(long)]
        sender: Option<String>,
        /// Only messages not opened yet.
        #[arg(long)]
        unread: bool,
        /// JSON output.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        action: Option<InboxAction>,
    },
    /// List every sender seen or blocked (`--json`: an array of objects with sender,
    /// display_name, count, in_inbox, last_at, blocked).
    Senders {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Block a sender: its messages are refused from now on (the server is told).
    Block {
        /// Sender name (as `herald-agent senders` lists it).
        sender: String,
    },
    /// Unblock a sender (the server is told).
    Unblock {
        /// Sender name.
        sender: String,
    },
    /// Share local services with clubs, list and remove shares, list tunnel sessions.
    Share {
        #[command(subcommand)]
        action: ShareAction,
    },
    /// The directory: online devices of people who share a club with you (and public
    /// shares), with the services you may reach (`--json`: an array of objects with
    /// owner, device, agent_id, online_since (unix ms), reported, observed, services
    /// (name, http, public, clubs, description)).
    Peers {
        /// Only entries whose owner, device, service or description contains this.
        query: Option<String>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Reach a shared service: listen on a local port and carry each connection to
    /// PEER/SERVICE (or PEER@DEVICE/SERVICE) until interrupted, on a direct connection
    /// to the providing agent when it is reachable, else through the server's relay.
    Connect {
        /// OWNER/SERVICE or OWNER@DEVICE/SERVICE, as `herald-agent peers` lists them.
        target: String,
        /// Local port to listen on.
        #[arg(long)]
        local_port: u16,
        /// Local address to listen on.
        #[arg(long, default_value = "127.0.0.1")]
        bind: std::net::IpAddr,
        /// Always go through the server's relay; never try a direct connection to the
        /// providing agent.
        #[arg(long)]
        relay_only: bool,
    },
    /// Print the shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: herald_io::cli::Shell,
    },
    /// Write man pages, one per command and subcommand, into DIR.
    Man {
        /// Directory to write `herald-agent*.1` into.
        #[arg(long, default_value = "man")]
        out: PathBuf,
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
    let cli: Cli = herald_io::cli::parse();
    init_logging();
    let dir = state::state_dir(cli.state_dir.as_deref());
    match cli.command {
        Command::Completions { shell } => {
            herald_io::cli::completions::<Cli>(shell, &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Man { out } => match herald_io::cli::man_pages::<Cli>(&out) {
            Ok(pages) => {
                println!("{} man pages written to {}", pages.len(), out.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!(
                    "herald-agent: cannot write man pages to {}: {e}",
                    out.display()
                );
                ExitCode::FAILURE
            }
        },
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
        Command::Inbox {
            sender,
            unread,
            json,
            action,
        } => with_inbox(&dir, |inbox, config| match action {
            None => list(inbox, &Filter { sender, unread }, json),
            Some(InboxAction::Show { id, json }) => show(inbox, config, &id, json),
            Some(InboxAction::Rm { id }) => {
                inbox.remove(&id.to_ascii_lowercase())?;
                println!("removed {id}");
                Ok(())
            }
            Some(InboxAction::Clear { sender }) => {
                let n = inbox.clear(&sender)?;
                println!("removed {n} message(s) from {sender}");
                Ok(())
            }
        }),
        Command::Senders { json } => with_inbox(&dir, |inbox, _| senders(inbox, json)),
        Command::Block { sender } => with_inbox(&dir, |inbox, _| {
            inbox.block(&sender, "local", herald_io::now_ms())?;
            println!("blocked {sender}; the server is told when the agent is connected");
            Ok(())
        }),
        Command::Unblock { sender } => with_inbox(&dir, |inbox, _| {
            inbox.unblock(&sender, "local", herald_io::now_ms())?;
            println!("unblocked {sender}; the server is told when the agent is connected");
            Ok(())
        }),
        Command::Share { action } => share(&dir, action),
        Command::Peers { query, json } => peers(&dir, query, json).await,
        Command::Connect {
            target,
            local_port,
            bind,
            relay_only,
        } => {
            let target = match herald_shared::peers::TunnelOpen::parse(&target) {
                Ok(target) => target,
                Err(e) => {
                    eprintln!("herald-agent: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let ready = |line: String| {
                use std::io::Write;
                println!("{line}");
                let _ = std::io::stdout().flush();
            };
            let bind = std::net::SocketAddr::new(bind, local_port);
            peer_result(
                herald_agent::peers::connect(&dir, target, bind, relay_only, ready, shutdown())
                    .await,
            )
        }
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

/// Opens the inbox of the agent in `dir` and runs `f` on it; errors are printed, with
/// exit code 64 for a state directory that is not an enrolled agent's.
fn with_inbox(
    dir: &std::path::Path,
    f: impl FnOnce(&Inbox, &AgentConfig) -> Result<(), InboxError>,
) -> ExitCode {
    let result = Inbox::open(dir).and_then(|(inbox, config)| f(&inbox, &config));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ InboxError::State(_)) => {
            eprintln!("herald-agent: {e} (state directory {})", dir.display());
            ExitCode::from(EXIT_CONFIG)
        }
        Err(e) => {
            eprintln!("herald-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `herald-agent peers`: the directory, through a side connection.
async fn peers(dir: &std::path::Path, query: Option<String>, json: bool) -> ExitCode {
    let run = async {
        let side = herald_agent::peers::Side::new(dir).await?;
        let devices = side.directory(query).await;
        side.close().await;
        devices
    };
    let devices = match run.await {
        Ok(devices) => devices,
        Err(e) => return peer_result(Err(e)),
    };
    if json {
        print_json(&devices);
        return ExitCode::SUCCESS;
    }
    if devices.is_empty() {
        println!("no one shares anything with you right now");
    }
    for d in devices {
        let owner = if d.owner.is_empty() {
            "(nobody)"
        } else {
            d.owner.as_str()
        };
        let reported: Vec<String> = d.reported.iter().map(|a| a.to_string()).collect();
        println!(
            "{owner}@{}  online since {}  reported {}  observed {}",
            d.device,
            local_time(d.online_since),
            if reported.is_empty() {
                "-".to_string()
            } else {
                reported.join(",")
            },
            d.observed.map_or("-".to_string(), |a| a.to_string())
        );
        for s in d.services {
            let with = if s.public {
                "public".to_string()
            } else {
                s.clubs.join(",")
            };
            println!(
                "    {owner}/{:<20} {:<5} {:<20} {}",
                s.name,
                if s.http { "http" } else { "tcp" },
                with,
                s.description
            );
        }
    }
    ExitCode::SUCCESS
}

fn peer_result(result: Result<(), herald_agent::peers::PeerError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("herald-agent: {e}");
            if e.is_usage() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// `herald-agent share …`: edits the table directly; the running daemon notices within
/// about a second and tells the server.
fn share(dir: &std::path::Path, action: ShareAction) -> ExitCode {
    use herald_agent::shares::{Share, ShareError, Shares};
    let run = || -> Result<(), ShareError> {
        // Only an enrolled agent's state directory holds a share table.
        AgentConfig::load(dir)
            .map_err(|e| ShareError::Invalid(format!("{e} (state directory {})", dir.display())))?;
        let shares = Shares::open(dir)?;
        match action {
            ShareAction::Add {
                name,
                to,
                http,
                clubs,
                public,
                description,
                max_connections,
                rate_limit,
            } => {
                let share = Share::new(
                    &name,
                    &to,
                    http,
                    public,
                    clubs,
                    description,
                    max_connections,
                    rate_limit,
                )?;
                shares.add(&share, herald_io::now_ms())?;
                let with = if share.public {
                    "everyone".to_string()
                } else {
                    format!("club(s) {}", share.clubs.join(", "))
                };
                println!("sharing {name} ({}) with {with}; the server is told when the agent is connected", share.to);
            }
            ShareAction::List { json } => {
                let list = shares.list()?;
                if json {
                    print_json(&list);
                } else if list.is_empty() {
                    println!("no shares");
                } else {
                    for s in list {
                        let with = if s.public {
                            "public".to_string()
                        } else {
                            s.clubs.join(",")
                        };
                        let rate = s
                            .rate_limit
                            .map_or("unlimited".to_string(), |r| format!("{r} B/s"));
                        println!(
                            "{:<20} {:<22} {:<5} {:<24} max {:>4}  {rate}  {}",
                            s.name,
                            s.to,
                            if s.http { "http" } else { "tcp" },
                            with,
                            s.max_connections,
                            s.description
                        );
                    }
                }
            }
            ShareAction::Rm { name } => {
                shares.remove(&name)?;
                println!(
                    "no longer sharing {name}; the server is told when the agent is connected"
                );
            }
            ShareAction::Sessions { json } => {
                let list = shares.sessions(herald_agent::shares::SESSIONS_LISTED)?;
                if json {
                    print_json(&list);
                } else if list.is_empty() {
                    println!("no tunnel sessions");
                } else {
                    for s in list {
                        println!(
                            "{}  {:<8} {:<20} {:<32} up {:>10} down {:>10}  {}",
                            local_time(s.started_at),
                            if s.role == herald_agent::shares::Role::Provided {
                                "provided"
                            } else {
                                "used"
                            },
                            s.share,
                            s.peer,
                            s.bytes_up,
                            s.bytes_down,
                            s.outcome
                        );
                    }
                }
            }
        }
        Ok(())
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("herald-agent: {e}");
            if e.is_usage() {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn list(inbox: &Inbox, filter: &Filter, json: bool) -> Result<(), InboxError> {
    let entries = inbox.list(filter)?;
    if json {
        print_json(&entries);
        return Ok(());
    }
    if entries.is_empty() {
        println!("no messages");
    }
    for e in entries {
        let mark = if e.read_at.is_none() { "*" } else { " " };
        let ad = if e.advertising { "[ad] " } else { "" };
        println!(
            "{mark} {}  {}  {:<20}  {ad}{}",
            e.id,
            local_time(e.received_at),
            e.display_name,
            e.title
        );
    }
    Ok(())
}

fn show(inbox: &Inbox, config: &AgentConfig, id: &str, json: bool) -> Result<(), InboxError> {
    let id = id.to_ascii_lowercase();
    let entry = inbox.entry(&id)?;
    inbox.mark_read(&id, herald_io::now_ms(), config.messages.read_receipts)?;
    if json {
        print_json(&entry);
        return Ok(());
    }
    println!("from:     {} ({})", entry.display_name, entry.sender);
    println!("received: {}", local_time(entry.received_at));
    println!("expires:  {}", local_time(entry.expires_at));
    if entry.priority == "high" {
        println!("priority: high");
    }
    if entry.advertising {
        println!("advertising");
    }
    if let Some(link) = &entry.link {
        println!("link:     {link}");
    }
    println!("\n{}\n\n{}", entry.title, entry.body);
    Ok(())
}

fn senders(inbox: &Inbox, json: bool) -> Result<(), InboxError> {
    let senders = inbox.senders()?;
    if json {
        print_json(&senders);
        return Ok(());
    }
    if senders.is_empty() {
        println!("no senders seen");
    }
    for s in senders {
        println!(
            "{:<24} {:<24} {:>6} kept {:>6} in inbox{}",
            s.sender,
            s.display_name,
            s.count,
            s.in_inbox,
            if s.blocked { "  BLOCKED" } else { "" }
        );
    }
    Ok(())
}

fn print_json<T: serde::Serialize>(value: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("inbox entries serialize")
    );
}

/// Unix milliseconds as local `YYYY-MM-DD HH:MM`.
fn local_time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| {
            t.with_timezone(&chrono::Local)
                .format("%Y-%m-%d %H:%M")
                .to_string()
        })
        .unwrap_or_else(|| ms.to_string())
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
    let text = (!herald_io::cli::log_json())
        .then(|| tracing_subscriber::fmt::layer().with_writer(std::io::stderr));
    let json = herald_io::cli::log_json().then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
    });
    tracing_subscriber::registry()
        .with(text)
        .with(json)
        .with(filter)
        .init();
    if let Some((value, e)) = bad {
        tracing::warn!("ignoring HERALD_LOG={value:?} ({e}); using {DEFAULT:?}");
    }
}
