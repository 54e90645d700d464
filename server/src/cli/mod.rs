//! The `herald-server` command line: one `Args` struct per subcommand and a `run()` that
//! dispatches. Admin subcommands sign orders locally with the operator key and talk to
//! the admin API; the server never sees the key.
//!
//! - `mod.rs`: the argument tree, `init`/`serve`, tokens, agents, groups, run, schedules,
//!   jobs;
//! - `client.rs`: the admin API client (pinned to the server's CA);
//! - `catalog.rs`: `catalog` and `open`;
//! - `packages.rs`: `vendor` and `package`;
//! - `messages.rs`: `sender` and `message`;
//! - `users.rs`: `users` (local, on the data directory);
//! - `billing.rs`: `billing` (plans, prices, runs, invoices, exports) and `stats`;
//! - `backup.rs`: `backup`, `backup verify` and `restore` (local, on files);
//! - `demo.rs`: `demo` (a throwaway server with an in-process agent).

pub mod admin;
pub mod backup;
pub mod billing;
pub mod catalog;
pub mod client;
#[cfg(feature = "demo")]
pub mod demo;
mod install;
pub mod messages;
pub mod packages;
pub mod users;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use base64::Engine;
use clap::{Args, Parser, Subcommand};

use herald_shared::codec;
use herald_shared::envelope::{
    Action, Audience, Envelope, Membership, OperatorKey, Order, Repeat, RunSpec, Statement,
};
use herald_shared::schedule::{self, Missed, Schedule};
use herald_shared::token::{Token, SECRET_LEN};

use crate::cli::client::{Client, ClientError};
use crate::config::{self, AdminConfig};
use crate::model::{
    AgentDetail, AgentInfo, CreateJobs, CreateSchedule, CreateToken, Created, JobInfo, JobState,
    ScheduleInfo, SetMembership,
};
use crate::{now_ms, random_bytes};

/// Exit code for bad configuration or usage (EX_USAGE / EX_CONFIG family).
const EXIT_CONFIG: u8 = 64;
/// Default job timeout.
pub(crate) const DEFAULT_TIMEOUT: &str = "10m";
/// Default TTL for jobs waiting for offline agents.
pub(crate) const DEFAULT_TTL: &str = "24h";
/// How long a schedule's standing order stays valid unless told otherwise.
pub(crate) const STANDING_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// The most jobs one API call lists (the API's own limit).
const JOBS_PAGE: u32 = 1000;
/// How far a one-off order's validity starts before now, to tolerate agent clock skew.
pub(crate) const CLOCK_SKEW: Duration = Duration::from_secs(300);

/// Herald's control server and admin CLI.
#[derive(Debug, Parser)]
#[command(name = "herald-server", version, about)]
pub struct Cli {
    /// Data directory (default: /var/lib/herald as root, else the user data directory).
    #[arg(long, global = true, env = "HERALD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Admin configuration file (default: DATA_DIR/admin.toml).
    #[arg(long, global = true, env = "HERALD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Admin API URL (overrides the configuration).
    #[arg(long, global = true, env = "HERALD_SERVER")]
    pub server: Option<String>,
    /// Admin API token (overrides admin.toml's; e.g. a scoped one from `admin-token create`).
    #[arg(
        long,
        global = true,
        env = "HERALD_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// The subcommand.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the data directory, database, CA, operator key and admin token.
    Init(InitArgs),
    /// Run the server.
    Serve(ServeArgs),
    /// Throwaway server, one local agent and a schedule; results stream until Ctrl-C.
    #[cfg(feature = "demo")]
    Demo(DemoArgs),
    /// Enrollment tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Enrolled agents.
    #[command(subcommand)]
    Agents(AgentsCommand),
    /// Group membership.
    #[command(subcommand)]
    Groups(GroupsCommand),
    /// Run a program on agents.
    Run(RunArgs),
    /// Schedules.
    #[command(subcommand)]
    Schedule(ScheduleCommand),
    /// Software vendors and their delegated packages.
    #[command(subcommand)]
    Vendor(crate::cli::packages::VendorCommand),
    /// Signed packages: publish, install, subscribe, roll out.
    #[command(subcommand)]
    Package(crate::cli::packages::PackageCommand),
    /// Push-message senders and their delegated names.
    #[command(subcommand)]
    Sender(crate::cli::messages::SenderCommand),
    /// Push messages: send, list, show, receipts, refusals.
    #[command(subcommand)]
    Message(crate::cli::messages::MessageCommand),
    /// Jobs and their results.
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// Open a browser service page on agents' screens.
    Open(crate::cli::catalog::OpenArgs),
    /// The service catalog users subscribe their devices to.
    #[command(subcommand)]
    Catalog(crate::cli::catalog::CatalogCommand),
    /// Web console accounts (works on the data directory, like `init`).
    #[command(subcommand)]
    Users(crate::cli::users::UsersCommand),
    /// Admin API tokens with scopes (read, metrics, jobs, packages, messages, billing, admin).
    #[command(subcommand, name = "admin-token")]
    AdminToken(crate::cli::admin::AdminTokenCommand),
    /// The audit log: who did what, from where, and whether it worked.
    #[command(subcommand)]
    Audit(crate::cli::admin::AuditCommand),
    /// Metering and billing: price plans, monthly runs, invoices, exports.
    #[command(subcommand)]
    Billing(crate::cli::billing::BillingCommand),
    /// Daily usage and communication statistics.
    Stats(crate::cli::billing::StatsArgs),
    /// Tunnel sessions the relay recorded (shared services), newest first.
    Sessions(SessionsArgs),
    /// The nodes of this server's cluster (several on PostgreSQL; one on SQLite).
    #[command(subcommand)]
    Nodes(NodesCommand),
    /// Archive the data directory while the server runs, or check an archive.
    Backup(crate::cli::backup::BackupArgs),
    /// Restore an archive into a new data directory (--data-dir, required).
    Restore(crate::cli::backup::RestoreArgs),
    /// Print the shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: herald_io::cli::Shell,
    },
    /// Write man pages, one per command and subcommand, into DIR.
    Man {
        /// Directory to write `herald-server*.1` into.
        #[arg(long, default_value = "man")]
        out: PathBuf,
    },
}

/// `init`.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Address agents use to reach this server.
    #[arg(long, default_value = "127.0.0.1:4433")]
    pub public_addr: String,
    /// QUIC listen address.
    #[arg(long, default_value = config::DEFAULT_QUIC_LISTEN)]
    pub quic_listen: SocketAddr,
    /// HTTPS admin API listen address.
    #[arg(long, default_value = config::DEFAULT_HTTP_LISTEN)]
    pub http_listen: SocketAddr,
    /// Keep the store in this PostgreSQL database instead of SQLite's file
    /// (`postgres://USER@HOST:PORT/DATABASE`; written as `[database] url`). Every node of a
    /// cluster names the same one.
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
}

/// `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// QUIC listen address (overrides herald.toml).
    #[arg(long, env = "HERALD_QUIC_LISTEN")]
    pub quic_listen: Option<SocketAddr>,
    /// HTTPS listen address (overrides herald.toml).
    #[arg(long, env = "HERALD_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
}

/// `demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Interval of the demo schedule.
    #[arg(long, default_value = "5s")]
    pub every: String,
    /// Stop after this many results (default: run until Ctrl-C).
    #[arg(long)]
    pub count: Option<u32>,
}

/// `token ...`.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create an enrollment token and print it.
    Create {
        /// Group the enrolled agent joins (repeatable).
        #[arg(long = "group")]
        groups: Vec<String>,
        /// How many agents may enroll with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// How long it stays valid.
        #[arg(long, default_value = "24h")]
        ttl: String,
        /// Also print the one-line install command for this token: it pins the server's
        /// key and carries the SHA-256 of each operator-signed agent package, checked here.
        #[arg(long)]
        install_command: bool,
        /// With --install-command: the URL devices reach the server at (default: the one
        /// this CLI uses).
        #[arg(long, requires = "install_command")]
        install_url: Option<String>,
        /// With --install-command: the platform of the packages (their releases' platform
        /// is PLATFORM-deb, PLATFORM-rpm and PLATFORM-tar).
        #[arg(long, default_value_t = herald_shared::release::this_platform())]
        install_platform: String,
    },
    /// List the enrollment tokens that can still enroll (never their secrets).
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Revoke an enrollment token by the id `token list` prints.
    Revoke {
        /// Token id (12 or more hex digits).
        id: String,
    },
}

/// `agents ...`.
#[derive(Debug, Subcommand)]
pub enum AgentsCommand {
    /// List agents.
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Show one agent with its address history.
    Show {
        /// Agent id or name.
        agent: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Revoke an agent: its connection is closed and refused from now on.
    Revoke {
        /// Agent id or name.
        agent: String,
    },
}

/// `groups ...`.
#[derive(Debug, Subcommand)]
pub enum GroupsCommand {
    /// Add an agent to a group.
    Add {
        /// Agent id or name.
        agent: String,
        /// Group.
        group: String,
    },
    /// Remove an agent from a group.
    Remove {
        /// Agent id or name.
        agent: String,
        /// Group.
        group: String,
    },
}

/// `run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// `agent:<id or name>`, `group:<name>` or `all`.
    #[arg(long)]
    pub to: String,
    /// Wall-clock limit for the program.
    #[arg(long, default_value = DEFAULT_TIMEOUT)]
    pub timeout: String,
    /// How long the job waits for an offline agent.
    #[arg(long, default_value = DEFAULT_TTL)]
    pub ttl: String,
    /// User to run as (agent must run as root).
    #[arg(long)]
    pub user: Option<String>,
    /// Wait for the results and print them; exit with the program's status.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: print the results as one JSON document (`{"ok", "jobs"}`, each job
    /// as `show --json` prints it) instead of the programs' output.
    #[arg(long, requires = "wait")]
    pub json: bool,
    /// Absolute path of the program, then its arguments.
    #[arg(last = true, required = true, num_args = 1..)]
    pub command: Vec<String>,
}

/// `schedule ...`.
#[derive(Debug, Subcommand)]
pub enum ScheduleCommand {
    /// Add a schedule.
    Add(Box<ScheduleAddArgs>),
    /// List schedules.
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Remove a schedule.
    Rm {
        /// Schedule id.
        id: i64,
    },
}

/// `schedule add`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("when").required(true).args(["cron", "every", "at"])))]
pub struct ScheduleAddArgs {
    /// `agent:<id or name>`, `group:<name>` or `all`.
    #[arg(long)]
    pub to: String,
    /// Cron expression (5 fields, or 6 with seconds).
    #[arg(long)]
    pub cron: Option<String>,
    /// Time zone for --cron and --at (IANA name).
    #[arg(long, default_value = "UTC")]
    pub tz: String,
    /// Fixed interval, e.g. 10s, 5m, 1h.
    #[arg(long)]
    pub every: Option<String>,
    /// One time: RFC 3339, "YYYY-MM-DD HH:MM" in --tz, or +DUR.
    #[arg(long)]
    pub at: Option<String>,
    /// What to do about occurrences missed while an agent was offline.
    #[arg(long, default_value = "skip")]
    pub missed: Missed,
    /// Spread each firing over up to this long, per agent.
    #[arg(long)]
    pub splay: Option<String>,
    /// Wall-clock limit for each run.
    #[arg(long, default_value = DEFAULT_TIMEOUT)]
    pub timeout: String,
    /// How long each created job waits for an offline agent.
    #[arg(long, default_value = DEFAULT_TTL)]
    pub ttl: String,
    /// User to run as.
    #[arg(long)]
    pub user: Option<String>,
    /// Open this browser service page instead of running a program.
    #[arg(long, conflicts_with_all = ["command", "user"])]
    pub open: Option<String>,
    /// Absolute path of the program, then its arguments.
    #[arg(last = true, num_args = 1..)]
    pub command: Vec<String>,
}

/// `jobs ...`.
#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// List jobs, newest first.
    List {
        /// Only this agent's jobs.
        #[arg(long)]
        agent: Option<String>,
        /// How many, newest first (any number: fetched a page of 1,000 at a time).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Show one job with its output.
    Show {
        /// Job id.
        job: i64,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

/// A CLI failure: printed as one sentence.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Wrong usage or configuration.
    #[error("{0}")]
    Usage(String),
    /// The API call failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Configuration could not be read.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

impl CliError {
    fn exit_code(&self) -> ExitCode {
        match self {
            CliError::Usage(_) | CliError::Config(_) => ExitCode::from(EXIT_CONFIG),
            _ => ExitCode::FAILURE,
        }
    }
}

/// Checks a token id as `LIST_COMMAND` prints it: 12 or more hex digits.
pub(crate) fn check_token_id(id: &str, list_command: &str) -> Result<(), CliError> {
    if id.len() < 12 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(usage(format!(
            "{id:?} is not a token id: 12 or more hex digits, as `{list_command}` prints"
        )));
    }
    Ok(())
}

pub(crate) fn usage(message: impl Into<String>) -> CliError {
    CliError::Usage(message.into())
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> ExitCode {
    match dispatch(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("herald-server: {e}");
            e.exit_code()
        }
    }
}

async fn dispatch(cli: Cli) -> Result<ExitCode, CliError> {
    let data_dir = config::data_dir(cli.data_dir.as_deref());
    let admin = || -> Result<Context, CliError> {
        let path = cli
            .config
            .clone()
            .unwrap_or_else(|| data_dir.join(config::ADMIN_CONFIG));
        let mut config = AdminConfig::load(&path)?;
        if let Some(token) = &cli.token {
            config.admin_token = token.clone();
        }
        Context::new(config, cli.server.as_deref())
    };
    match cli.command {
        Command::Init(args) => init(&data_dir, args),
        Command::Serve(args) => {
            let overrides = crate::serve::Overrides {
                quic_listen: args.quic_listen,
                http_listen: args.http_listen,
            };
            crate::serve::run(&data_dir, &overrides)
                .await
                .map_err(|e| usage(e.to_string()))?;
            Ok(ExitCode::SUCCESS)
        }
        #[cfg(feature = "demo")]
        Command::Demo(args) => crate::cli::demo::run(args).await.map_err(CliError::Other),
        Command::Token(TokenCommand::Create {
            groups,
            uses,
            ttl,
            install_command,
            install_url,
            install_platform,
        }) => {
            let install = install_command.then_some((install_url, install_platform));
            admin()?.token_create(groups, uses, &ttl, install).await
        }
        Command::Token(TokenCommand::List { json }) => {
            let tokens: Vec<crate::model::TokenInfo> =
                admin()?.client.get("/api/v1/tokens").await?;
            if json {
                print_json(&tokens);
            } else if tokens.is_empty() {
                println!("no enrollment tokens can enroll");
            } else {
                println!(
                    "{:<12} {:>4} {:<23} {:<12} GROUPS",
                    "ID", "USES", "EXPIRES", "OWNER"
                );
                for t in tokens {
                    println!(
                        "{:<12} {:>4} {:<23} {:<12} {}",
                        t.id,
                        t.uses_left,
                        crate::console::when(t.expires_at),
                        t.owner.as_deref().unwrap_or("-"),
                        t.groups.join(",")
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Token(TokenCommand::Revoke { id }) => {
            check_token_id(&id, "token list")?;
            let _: Created = admin()?
                .client
                .delete(&format!("/api/v1/tokens/{id}"))
                .await?;
            println!("enrollment token {id} revoked: it enrolls no one from now on");
            Ok(ExitCode::SUCCESS)
        }
        Command::AdminToken(command) => admin()?.admin_token(command).await,
        Command::Audit(command) => admin()?.audit(command).await,
        Command::Agents(command) => admin()?.agents(command).await,
        Command::Groups(command) => admin()?.groups(command).await,
        Command::Run(args) => admin()?.run(args).await,
        Command::Schedule(command) => admin()?.schedule(command).await,
        Command::Jobs(command) => admin()?.jobs(command).await,
        Command::Vendor(crate::cli::packages::VendorCommand::Keygen { out }) => {
            crate::cli::packages::keygen(&out)
        }
        Command::Vendor(command) => admin()?.vendor(command).await,
        Command::Package(command) => admin()?.package(command).await,
        Command::Sender(crate::cli::messages::SenderCommand::Keygen { out }) => {
            crate::cli::messages::sender_keygen(&out)
        }
        Command::Sender(command) => admin()?.sender(command).await,
        Command::Message(command) => admin()?.message(command).await,
        Command::Open(args) => admin()?.open(args).await,
        Command::Catalog(command) => admin()?.catalog(command).await,
        Command::Billing(command) => admin()?.billing(command).await,
        Command::Stats(args) => admin()?.stats(args).await,
        Command::Sessions(args) => admin()?.sessions(args).await,
        Command::Nodes(NodesCommand::List { json }) => admin()?.nodes(json).await,
        Command::Completions { shell } => {
            herald_io::cli::completions::<Cli>(shell, &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { out } => {
            let pages = herald_io::cli::man_pages::<Cli>(&out).map_err(|e| {
                CliError::Other(format!("cannot write man pages to {}: {e}", out.display()))
            })?;
            println!("{} man pages written to {}", pages.len(), out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Backup(args) => crate::cli::backup::backup(&data_dir, args),
        Command::Restore(args) => crate::cli::backup::restore(cli.data_dir.as_deref(), args),
        Command::Users(command) => {
            crate::cli::users::run(&data_dir, command, &mut std::io::stdin().lock()).map_err(|e| {
                match e {
                    crate::cli::users::UsersError::Usage(m) => usage(m),
                    other => CliError::Other(other.to_string()),
                }
            })
        }
    }
}

fn init(data_dir: &Path, args: InitArgs) -> Result<ExitCode, CliError> {
    let done = crate::init::init(&crate::init::InitOptions {
        data_dir: data_dir.to_path_buf(),
        public_addr: args.public_addr,
        quic_listen: args.quic_listen,
        http_listen: args.http_listen,
        database_url: args.database_url,
    })
    .map_err(|e| usage(e.to_string()))?;
    println!("Initialised Herald server in {}", done.data_dir.display());
    println!("  CA fingerprint:  {}", done.ca_fingerprint);
    println!("  operator key:    {}", done.operator_key);
    println!("  admin config:    {}", done.admin_config.display());
    println!(
        "The operator private key is in {}; keep it with the administrator, not on the server.",
        data_dir.join(config::OPERATOR_KEY).display()
    );
    println!("Next: herald-server serve");
    Ok(ExitCode::SUCCESS)
}

/// What admin subcommands need: the admin configuration and an API client.
pub(crate) struct Context {
    pub(crate) admin: AdminConfig,
    pub(crate) client: Client,
}

impl Context {
    /// Builds a context from an admin configuration.
    pub(crate) fn new(admin: AdminConfig, server: Option<&str>) -> Result<Context, CliError> {
        let client = Client::new(&admin, server)?;
        Ok(Context { admin, client })
    }

    /// The API client.
    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    pub(crate) fn operator_key(&self) -> Result<OperatorKey, CliError> {
        let text = herald_io::files::read_string(&self.admin.operator_key)
            .map_err(|e| usage(format!("{e} (the operator key is needed to sign orders)")))?;
        OperatorKey::from_hex(&text).map_err(|_| {
            usage(format!(
                "{} does not hold a valid operator key",
                self.admin.operator_key.display()
            ))
        })
    }

    pub(crate) fn sign(&self, statement: &Statement) -> Result<String, CliError> {
        let envelope: Envelope = self
            .operator_key()?
            .sign(statement)
            .map_err(|e| CliError::Other(e.to_string()))?;
        let bytes = codec::to_bytes(&envelope).map_err(|e| CliError::Other(e.to_string()))?;
        Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    /// Signs an order valid from a little before now (agent clock skew) to `not_after`.
    pub(crate) fn sign_order(
        &self,
        audience: Audience,
        action: Action,
        repeat: Repeat,
        not_after: i64,
    ) -> Result<String, CliError> {
        let now = now_ms();
        self.sign(&Statement::Order(Order {
            id: random_bytes(),
            audience,
            issued_at: now,
            not_before: now - CLOCK_SKEW.as_millis() as i64,
            not_after,
            repeat,
            action,
        }))
    }

    /// Queues one-off jobs for a signed order.
    pub(crate) async fn queue_jobs(
        &self,
        envelope: String,
        ttl: Duration,
    ) -> Result<Created, CliError> {
        Ok(self
            .client
            .post(
                "/api/v1/jobs",
                &CreateJobs {
                    envelope,
                    ttl_ms: ttl.as_millis() as u64,
                },
            )
            .await?)
    }

    /// Signs a one-off order for `target`, valid until its jobs can no longer run, and
    /// queues its jobs.
    pub(crate) async fn queue_once(
        &self,
        target: &str,
        action: Action,
        timeout: Duration,
        ttl: Duration,
    ) -> Result<Created, CliError> {
        let audience = self.audience(target).await?;
        let envelope = self.sign_order(
            audience,
            action,
            Repeat::Once,
            deadline(
                now_ms(),
                &[ttl, timeout, CLOCK_SKEW],
                "--ttl plus --timeout",
            )?,
        )?;
        self.queue_jobs(envelope, ttl).await
    }

    /// Prints the queued jobs, or with `wait` waits for each and prints how it ended
    /// (the outcome of a browser service, else the error, else the output); succeeds
    /// when every job succeeded.
    pub(crate) async fn report_jobs(&self, ids: &[i64], wait: bool) -> Result<ExitCode, CliError> {
        if !wait {
            print_queued(ids);
            return Ok(ExitCode::SUCCESS);
        }
        let all_ok = self
            .wait_each(ids, |job| {
                let detail = job
                    .outcome
                    .clone()
                    .or_else(|| job.error.clone())
                    .or_else(|| Some(job.stdout.trim().to_string()).filter(|s| !s.is_empty()))
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default();
                println!(
                    "job {} on {}: {}{detail}",
                    job.id, job.agent_name, job.state
                );
            })
            .await?;
        Ok(if all_ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    }

    /// `--wait --json` of `open` and `package install`: waits for every job and
    /// prints them as one JSON document (with the agents skipped, if any); succeeds
    /// when every job succeeded.
    pub(crate) async fn report_jobs_json(
        &self,
        ids: &[i64],
        skipped: Option<&[String]>,
    ) -> Result<ExitCode, CliError> {
        let jobs = self.wait_all(ids).await?;
        print_jobs_json(&jobs, skipped);
        Ok(if all_succeeded(&jobs) {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    }

    /// Waits for each job in turn; all of them, as they ended.
    async fn wait_all(&self, ids: &[i64]) -> Result<Vec<JobInfo>, CliError> {
        let mut jobs = Vec::with_capacity(ids.len());
        self.wait_each(ids, |job| jobs.push(job.clone())).await?;
        Ok(jobs)
    }

    /// Parses a target and resolves an agent name to its id (orders name ids).
    pub(crate) async fn audience(&self, target: &str) -> Result<Audience, CliError> {
        match target.parse::<Audience>().map_err(usage)? {
            Audience::Agent(name) => {
                let detail: AgentDetail =
                    self.client.get(&format!("/api/v1/agents/{name}")).await?;
                Ok(Audience::Agent(detail.agent.id))
            }
            other => Ok(other),
        }
    }

    /// `token create`; with `install` (URL, platform), the one-line install command too.
    async fn token_create(
        &self,
        groups: Vec<String>,
        uses: u32,
        ttl: &str,
        install: Option<(Option<String>, String)>,
    ) -> Result<ExitCode, CliError> {
        // Checked before the token exists, so a refusal leaves no token behind.
        let checked = match &install {
            Some((url, platform)) => {
                Some(install::check_packages(self, url.as_deref(), platform).await?)
            }
            None => None,
        };
        let token = self.create_token(groups, uses, ttl).await?;
        println!("{token}");
        if let Some(checked) = checked {
            println!("{}", checked.command(&token));
        }
        Ok(ExitCode::SUCCESS)
    }

    /// Registers a new enrollment token with the server and returns its text.
    pub(crate) async fn create_token(
        &self,
        groups: Vec<String>,
        uses: u32,
        ttl: &str,
    ) -> Result<String, CliError> {
        let ttl = parse_duration("--ttl", ttl)?;
        if uses == 0 {
            return Err(usage("--uses must be at least 1"));
        }
        if let Some(g) = groups.iter().find(|g| !herald_shared::valid_name(g)) {
            return Err(usage(format!(
                "invalid group name {g:?}: use letters, digits, '.', '_' and '-'"
            )));
        }
        let ca = crate::pki::load_cert(&self.admin.ca_cert).map_err(|e| usage(e.to_string()))?;
        let token = Token {
            server: self.admin.public_addr.clone(),
            ca_fingerprint: crate::pki::fingerprint(&ca),
            operator_keys: vec![self.operator_key()?.public()],
            groups: groups.clone(),
            secret: random_bytes::<SECRET_LEN>(),
        };
        let _: Created = self
            .client
            .post(
                "/api/v1/tokens",
                &CreateToken {
                    secret_hash: token.secret_hash(),
                    groups,
                    uses,
                    expires_at: deadline(now_ms(), &[ttl], "--ttl")?,
                },
            )
            .await?;
        Ok(token.encode())
    }

    async fn agents(&self, command: AgentsCommand) -> Result<ExitCode, CliError> {
        match command {
            AgentsCommand::List { json } => {
                let agents: Vec<AgentInfo> = self.client.get("/api/v1/agents").await?;
                if json {
                    print_json(&agents);
                } else {
                    print_agents(&agents);
                }
            }
            AgentsCommand::Show { agent, json } => {
                let detail: AgentDetail =
                    self.client.get(&format!("/api/v1/agents/{agent}")).await?;
                if json {
                    print_json(&detail);
                } else {
                    print_agent(&detail);
                }
            }
            AgentsCommand::Revoke { agent } => {
                let _: Created = self
                    .client
                    .post(&format!("/api/v1/agents/{agent}/revoke"), &())
                    .await?;
                println!("revoked {agent}");
            }
        }
        Ok(ExitCode::SUCCESS)
    }

    async fn groups(&self, command: GroupsCommand) -> Result<ExitCode, CliError> {
        let (agent, group, add) = match command {
            GroupsCommand::Add { agent, group } => (agent, group, true),
            GroupsCommand::Remove { agent, group } => (agent, group, false),
        };
        if !herald_shared::valid_name(&group) {
            return Err(usage(format!("invalid group name {group:?}")));
        }
        let detail: AgentDetail = self.client.get(&format!("/api/v1/agents/{agent}")).await?;
        let mut groups = detail.agent.groups.clone();
        if add {
            if !groups.contains(&group) {
                groups.push(group.clone());
            }
        } else {
            groups.retain(|g| g != &group);
        }
        groups.sort();
        let envelope = self.sign(&Statement::Membership(Membership {
            agent_id: detail.agent.id.clone(),
            groups: groups.clone(),
            issued_at: now_ms(),
        }))?;
        let _: Created = self
            .client
            .post(
                &format!("/api/v1/agents/{}/membership", detail.agent.id),
                &SetMembership { envelope },
            )
            .await?;
        println!("{}: groups {}", detail.agent.name, display_list(&groups));
        Ok(ExitCode::SUCCESS)
    }

    async fn run(&self, args: RunArgs) -> Result<ExitCode, CliError> {
        let timeout = parse_timeout(&args.timeout)?;
        let ttl = parse_duration("--ttl", &args.ttl)?;
        let action = run_action(&args.command, timeout, args.user)?;
        let created = self.queue_once(&args.to, action, timeout, ttl).await?;
        if !args.wait {
            print_queued(&created.ids);
            return Ok(ExitCode::SUCCESS);
        }
        let single = created.ids.len() == 1;
        if args.json {
            let jobs = self.wait_all(&created.ids).await?;
            print_jobs_json(&jobs, None);
            return Ok(match (single, jobs.first()) {
                (true, Some(job)) => ExitCode::from(job.exit_code.unwrap_or(1).clamp(0, 255) as u8),
                _ if all_succeeded(&jobs) => ExitCode::SUCCESS,
                _ => ExitCode::FAILURE,
            });
        }
        let mut last_code = 0;
        let all_ok = self
            .wait_each(&created.ids, |job| {
                if !single {
                    println!("== job {} on {} : {}", job.id, job.agent_name, job.state);
                }
                print!("{}", job.stdout);
                eprint!("{}", job.stderr);
                if job.stdout_truncated || job.stderr_truncated {
                    eprintln!("(output truncated)");
                }
                if job.state != JobState::Succeeded {
                    let reason = job
                        .error
                        .clone()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default();
                    eprintln!(
                        "job {} on {} ended {}{reason}",
                        job.id, job.agent_name, job.state
                    );
                }
                last_code = job.exit_code.unwrap_or(1);
            })
            .await?;
        let _ = std::io::stdout().flush();
        Ok(if single {
            ExitCode::from(last_code.clamp(0, 255) as u8)
        } else if all_ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    }

    /// Waits for each job in turn, handing each to `ended` as it reaches a final state;
    /// whether every one succeeded.
    pub(crate) async fn wait_each(
        &self,
        ids: &[i64],
        mut ended: impl FnMut(&JobInfo),
    ) -> Result<bool, CliError> {
        let mut all_ok = true;
        for id in ids {
            let job = self.wait_job(*id).await?;
            ended(&job);
            all_ok &= job.state == JobState::Succeeded;
        }
        Ok(all_ok)
    }

    pub(crate) async fn wait_job(&self, id: i64) -> Result<JobInfo, CliError> {
        loop {
            let job: JobInfo = self
                .client
                .get(&format!("/api/v1/jobs/{id}?wait_ms=300000"))
                .await?;
            if job.is_final() {
                return Ok(job);
            }
        }
    }

    async fn schedule(&self, command: ScheduleCommand) -> Result<ExitCode, CliError> {
        match command {
            ScheduleCommand::Add(args) => self.schedule_add(*args).await,
            ScheduleCommand::List { json } => {
                let schedules: Vec<ScheduleInfo> = self.client.get("/api/v1/schedules").await?;
                if json {
                    print_json(&schedules);
                } else {
                    print_schedules(&schedules);
                }
                Ok(ExitCode::SUCCESS)
            }
            ScheduleCommand::Rm { id } => {
                let _: Created = self
                    .client
                    .delete(&format!("/api/v1/schedules/{id}"))
                    .await?;
                println!("schedule {id} removed");
                Ok(ExitCode::SUCCESS)
            }
        }
    }

    async fn schedule_add(&self, args: ScheduleAddArgs) -> Result<ExitCode, CliError> {
        let command = match &args.open {
            Some(url) => format!("open {url}"),
            None => args.command.join(" "),
        };
        let (id, when) = self.add_schedule(args).await?;
        println!("schedule {id} added: {} {command}", when.describe());
        Ok(ExitCode::SUCCESS)
    }

    /// Signs a standing order and registers the schedule; returns its id.
    pub(crate) async fn add_schedule(
        &self,
        args: ScheduleAddArgs,
    ) -> Result<(i64, Schedule), CliError> {
        let now = now_ms();
        let timeout = parse_timeout(&args.timeout)?;
        let ttl = parse_duration("--ttl", &args.ttl)?;
        let splay = args
            .splay
            .as_deref()
            .map(|s| parse_duration("--splay", s))
            .transpose()?
            .unwrap_or_default();
        // A zone given with --every or --at +DUR is not used, but a typo is still a typo.
        schedule::check_zone(&args.tz).map_err(|e| usage(e.to_string()))?;
        let when = if let Some(expr) = &args.cron {
            Schedule::cron(expr, &args.tz).map_err(|e| usage(e.to_string()))?
        } else if let Some(every) = &args.every {
            Schedule::every(parse_duration("--every", every)?, now)
                .map_err(|e| usage(e.to_string()))?
        } else if let Some(at) = &args.at {
            let at = schedule::parse_time(at, &args.tz, now).map_err(|e| usage(e.to_string()))?;
            if at <= now {
                return Err(usage("--at is in the past"));
            }
            Schedule::at(at)
        } else {
            unreachable!("clap requires one of --cron, --every, --at")
        };
        let repeat = match &when {
            Schedule::At { .. } => Repeat::Once,
            _ => {
                let gap = min_gap(&when, now);
                if splay.as_millis() as i64 * 2 > gap {
                    return Err(usage("--splay must be at most half the time between runs"));
                }
                // The agent refuses runs closer than this: half the schedule's shortest
                // gap, less the splay, so legitimate firings always pass.
                Repeat::Standing {
                    min_interval_ms: (gap / 2 - splay.as_millis() as i64).max(0) as u64,
                }
            }
        };
        let action = match &args.open {
            Some(url) => crate::cli::catalog::open_action(url, timeout)?,
            None => run_action(&args.command, timeout, args.user)?,
        };
        let audience = self.audience(&args.to).await?;
        let not_after = match &when {
            Schedule::At { at } => deadline(
                *at,
                &[ttl, timeout, CLOCK_SKEW],
                "--at plus --ttl and --timeout",
            )?,
            _ => deadline(now, &[STANDING_VALIDITY], "the standing validity")?,
        };
        let envelope = self.sign_order(audience, action, repeat, not_after)?;
        let created: Created = self
            .client
            .post(
                "/api/v1/schedules",
                &CreateSchedule {
                    envelope,
                    schedule: when.clone(),
                    missed: args.missed,
                    splay_ms: splay.as_millis() as u64,
                    ttl_ms: ttl.as_millis() as u64,
                },
            )
            .await?;
        Ok((created.ids.first().copied().unwrap_or_default(), when))
    }

    /// The newest `limit` jobs, a page of at most [`JOBS_PAGE`] at a time, and whether
    /// there are more.
    async fn list_jobs(
        &self,
        agent: Option<&str>,
        limit: u32,
    ) -> Result<(Vec<JobInfo>, bool), CliError> {
        let mut jobs: Vec<JobInfo> = Vec::new();
        // One more than asked for tells whether there are more.
        let wanted = limit as usize + 1;
        loop {
            let page = (wanted - jobs.len()).min(JOBS_PAGE as usize);
            let mut path = format!("/api/v1/jobs?limit={page}");
            if let Some(agent) = agent {
                path.push_str(&format!("&agent={agent}"));
            }
            if let Some(last) = jobs.last() {
                path.push_str(&format!("&before={}", last.id));
            }
            let batch: Vec<JobInfo> = self.client.get(&path).await?;
            let done = batch.len() < page;
            jobs.extend(batch);
            if done || jobs.len() >= wanted {
                break;
            }
        }
        let more = jobs.len() > limit as usize;
        jobs.truncate(limit as usize);
        Ok((jobs, more))
    }

    async fn jobs(&self, command: JobsCommand) -> Result<ExitCode, CliError> {
        match command {
            JobsCommand::List { agent, limit, json } => {
                let (jobs, more) = self.list_jobs(agent.as_deref(), limit).await?;
                if json {
                    print_json(&jobs);
                } else {
                    print_jobs(&jobs);
                }
                if more {
                    eprintln!(
                        "showing the newest {limit} jobs; there are more (use --limit to see them)"
                    );
                }
            }
            JobsCommand::Show { job, json } => {
                let job: JobInfo = self.client.get(&format!("/api/v1/jobs/{job}")).await?;
                if json {
                    print_json(&job);
                } else {
                    print_job(&job);
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}

pub(crate) fn run_action(
    command: &[String],
    timeout: Duration,
    user: Option<String>,
) -> Result<Action, CliError> {
    let (program, args) = command
        .split_first()
        .ok_or_else(|| usage("give the program after --"))?;
    if !program.starts_with('/') {
        return Err(usage(format!(
            "program {program:?} must be an absolute path (no shell, no PATH lookup), e.g. /usr/bin/{program}"
        )));
    }
    Ok(Action::Run(RunSpec {
        program: program.clone(),
        args: args.to_vec(),
        timeout_ms: timeout.as_millis() as u64,
        run_as: user,
    }))
}

/// Shortest gap between consecutive firings over the next few occurrences.
fn min_gap(when: &Schedule, now: i64) -> i64 {
    let mut gap = i64::MAX;
    let mut t = now;
    for _ in 0..50 {
        let Some(next) = when.next_after(t) else {
            break;
        };
        if t != now {
            gap = gap.min(next - t);
        }
        t = next;
    }
    if gap == i64::MAX {
        0
    } else {
        gap
    }
}

/// `now` plus durations, in unix milliseconds, or a usage error naming what is too long
/// (each duration is bounded by `schedule::MAX_DURATION`, so only a date far out can
/// overflow; the sum is checked all the same).
pub(crate) fn deadline(now: i64, parts: &[Duration], what: &str) -> Result<i64, CliError> {
    schedule::deadline(now, parts).ok_or_else(|| usage(format!("{what} is too far in the future")))
}

/// A `--timeout`: a duration of at least one second (zero would mean no limit at all,
/// which an order never has).
pub(crate) fn parse_timeout(text: &str) -> Result<Duration, CliError> {
    let timeout = parse_duration("--timeout", text)?;
    if timeout < Duration::from_secs(1) {
        return Err(usage(format!(
            "--timeout {text}: a program needs at least 1s; there is no \"no limit\""
        )));
    }
    Ok(timeout)
}

/// Says each job was queued (the answer without `--wait`).
fn print_queued(ids: &[i64]) {
    for id in ids {
        println!("job {id} queued");
    }
}

pub(crate) fn parse_duration(flag: &str, text: &str) -> Result<Duration, CliError> {
    schedule::parse_duration(text).map_err(|e| usage(format!("{flag}: {e}")))
}

fn all_succeeded(jobs: &[JobInfo]) -> bool {
    jobs.iter().all(|job| job.state == JobState::Succeeded)
}

/// The one JSON document `--wait --json` prints: whether every job succeeded, the
/// jobs as they ended, and the agents skipped (`package install` only).
fn print_jobs_json(jobs: &[JobInfo], skipped: Option<&[String]>) {
    let mut doc = serde_json::json!({ "ok": all_succeeded(jobs), "jobs": jobs });
    if let Some(skipped) = skipped {
        doc["skipped"] = serde_json::json!(skipped);
    }
    print_json(&doc);
}

pub(crate) fn print_json<T: serde::Serialize>(value: &T) {
    // Serializing our own plain data types cannot fail.
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("plain data serializes")
    );
}

fn display_list(items: &[String]) -> String {
    if items.is_empty() {
        "-".into()
    } else {
        items.join(",")
    }
}

/// `nodes`.
#[derive(Debug, clap::Subcommand)]
pub enum NodesCommand {
    /// The live nodes: addresses, last heartbeat, leader roles, agents each holds.
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

/// `sessions`.
#[derive(Debug, clap::Args)]
pub struct SessionsArgs {
    /// Only sessions to this providing agent (its id).
    #[arg(long)]
    pub agent: Option<String>,
    /// At most this many, newest first (1 to 10,000).
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
    /// JSON output.
    #[arg(long)]
    pub json: bool,
}

impl Context {
    /// `nodes list`.
    pub(crate) async fn nodes(&self, json: bool) -> Result<ExitCode, CliError> {
        let nodes: Vec<crate::store::NodeRow> = self.client().get("/api/v1/nodes").await?;
        if json {
            print_json(&nodes);
            return Ok(ExitCode::SUCCESS);
        }
        println!(
            "{:<28} {:<22} {:<22} {:>7}  {:<24} ROLES",
            "NODE", "QUIC", "HTTPS", "AGENTS", "HEARTBEAT"
        );
        for n in &nodes {
            println!(
                "{:<28} {:<22} {:<22} {:>7}  {:<24} {}",
                n.id,
                n.quic_addr,
                n.http_addr,
                n.agents,
                schedule::format_time(n.heartbeat_at),
                display_list(&n.roles)
            );
        }
        Ok(ExitCode::SUCCESS)
    }

    /// `sessions`.
    pub(crate) async fn sessions(&self, args: SessionsArgs) -> Result<ExitCode, CliError> {
        let mut path = format!("/api/v1/sessions?limit={}", args.limit);
        if let Some(agent) = &args.agent {
            // An agent id is 20 hex digits (`herald_shared::agent_id`).
            if agent.len() != 20 || !agent.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(usage(format!("--agent {agent:?} is not an agent id")));
            }
            path.push_str(&format!("&agent={agent}"));
        }
        let sessions: Vec<crate::model::TunnelSession> = self.client().get(&path).await?;
        if args.json {
            print_json(&sessions);
            return Ok(ExitCode::SUCCESS);
        }
        if sessions.is_empty() {
            println!("no tunnel sessions");
            return Ok(ExitCode::SUCCESS);
        }
        println!(
            "{:>6}  {:<24} {:<7} {:<20} {:<20} {:<20} {:>12} {:>12}  OUTCOME",
            "ID", "STARTED", "VIA", "SHARE", "PROVIDER", "CONSUMER", "UP", "DOWN"
        );
        for s in &sessions {
            let consumer = match (&s.consumer_agent_id, s.consumer_user_id) {
                (Some(agent), _) => agent.clone(),
                (None, Some(user)) => format!("user:{user}"),
                (None, None) => s.source.clone(),
            };
            println!(
                "{:>6}  {:<24} {:<7} {:<20} {:<20} {:<20} {:>12} {:>12}  {}",
                s.id,
                schedule::format_time(s.started_at),
                s.via.as_str(),
                s.share,
                s.provider_agent_id,
                consumer,
                s.bytes_up,
                s.bytes_down,
                s.outcome
            );
        }
        Ok(ExitCode::SUCCESS)
    }
}

pub(crate) fn time(t: Option<i64>) -> String {
    t.map(schedule::format_time).unwrap_or_else(|| "-".into())
}

fn print_agents(agents: &[AgentInfo]) {
    println!(
        "{:<22} {:<20} {:<8} {:<22} {:<30} GROUPS",
        "ID", "NAME", "STATE", "OBSERVED", "LOCAL"
    );
    for a in agents {
        let state = if a.revoked_at.is_some() {
            "revoked"
        } else if a.online {
            "online"
        } else {
            "offline"
        };
        println!(
            "{:<22} {:<20} {:<8} {:<22} {:<30} {}",
            a.id,
            a.name,
            state,
            a.observed_address.as_deref().unwrap_or("-"),
            display_list(&a.local_addresses),
            display_list(&a.groups)
        );
    }
}

fn print_agent(detail: &AgentDetail) {
    let a = &detail.agent;
    println!("id:          {}", a.id);
    println!("name:        {}", a.name);
    println!("online:      {}", a.online);
    println!("revoked:     {}", time(a.revoked_at));
    println!("enrolled:    {}", time(Some(a.enrolled_at)));
    println!("last seen:   {}", time(a.last_seen_at));
    println!("version:     {}", a.version.as_deref().unwrap_or("-"));
    println!("groups:      {}", display_list(&a.groups));
    println!(
        "observed:    {}",
        a.observed_address.as_deref().unwrap_or("-")
    );
    println!("local:       {}", display_list(&a.local_addresses));
    println!("facts:       {}", a.facts);
    println!("address history:");
    for event in &detail.address_history {
        println!(
            "  {}  {:<8} {}",
            schedule::format_time(event.at),
            event.kind,
            event.address
        );
    }
}

fn print_schedules(schedules: &[ScheduleInfo]) {
    println!(
        "{:<4} {:<24} {:<34} {:<9} {:<22} ACTION",
        "ID", "TARGET", "WHEN", "MISSED", "NEXT"
    );
    for s in schedules {
        println!(
            "{:<4} {:<24} {:<34} {:<9} {:<22} {}",
            s.id,
            s.target,
            s.when,
            s.missed,
            time(s.next_fire_at),
            s.action
        );
    }
}

fn print_jobs(jobs: &[JobInfo]) {
    println!(
        "{:<6} {:<20} {:<12} {:<5} {:<22} {:<22} ACTION",
        "ID", "AGENT", "STATE", "EXIT", "CREATED", "FINISHED"
    );
    for j in jobs {
        println!(
            "{:<6} {:<20} {:<12} {:<5} {:<24} {:<24} {}",
            j.id,
            j.agent_name,
            j.state,
            j.exit_code
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into()),
            schedule::format_time(j.created_at),
            time(j.finished_at),
            j.action
        );
    }
}

fn print_job(j: &JobInfo) {
    println!("job:       {}", j.id);
    println!("agent:     {} ({})", j.agent_name, j.agent_id);
    println!("action:    {}", j.action);
    println!("state:     {}", j.state);
    if let Some(s) = j.schedule_id {
        println!("schedule:  {s}");
    }
    println!("created:   {}", schedule::format_time(j.created_at));
    println!("delivered: {}", time(j.delivered_at));
    println!("started:   {}", time(j.started_at));
    println!("finished:  {}", time(j.finished_at));
    if let Some(code) = j.exit_code {
        println!("exit code: {code}");
    }
    if let Some(signal) = j.signal {
        println!("signal:    {signal}");
    }
    if let Some(error) = &j.error {
        println!("error:     {error}");
    }
    if let Some(progress) = &j.progress {
        if !j.is_final() {
            println!("progress:  {progress}");
        }
    }
    if let Some(outcome) = &j.outcome {
        println!("outcome:   {outcome}");
    }
    println!(
        "--- stdout{}",
        if j.stdout_truncated {
            " (truncated)"
        } else {
            ""
        }
    );
    print!("{}", j.stdout);
    println!(
        "--- stderr{}",
        if j.stderr_truncated {
            " (truncated)"
        } else {
            ""
        }
    );
    print!("{}", j.stderr);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeout_is_at_least_a_second_and_at_most_the_bound() {
        assert_eq!(parse_timeout("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_timeout("10m").unwrap(), Duration::from_secs(600));
        for bad in [
            "0s",
            "0ms",
            "999ms",
            "18446744073709551615ms",
            "9223372036854775807ms",
            "367d",
        ] {
            let error = parse_timeout(bad).unwrap_err().to_string();
            assert!(error.contains("--timeout"), "{bad}: {error}");
        }
    }

    #[test]
    fn deadlines_are_checked_sums() {
        let day = Duration::from_secs(86_400);
        assert_eq!(
            deadline(1_000, &[day], "--ttl").unwrap(),
            1_000 + 86_400_000
        );
        let error = deadline(i64::MAX - 10, &[day], "--ttl")
            .unwrap_err()
            .to_string();
        assert!(error.contains("--ttl is too far in the future"), "{error}");
    }
}
