//! `herald-server catalog ...` and `herald-server open`: the operator signs the service
//! catalog's standing actions and one-off browser services; users only pick the timing.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};

use herald_shared::envelope::{Action, OpenSpec, Repeat};

use crate::cli::{
    deadline, parse_duration, parse_timeout, print_json, usage, CliError, Context, CLOCK_SKEW,
    DEFAULT_TIMEOUT, DEFAULT_TTL,
};
use crate::model::Created;
use crate::model::{CatalogEntry, CreateCatalogEntry};
use crate::now_ms;

/// How long the person at the machine has to complete a browser service by default.
pub(crate) const DEFAULT_OPEN_TIMEOUT: &str = "15m";

/// `catalog ...`.
#[derive(Debug, Subcommand)]
pub enum CatalogCommand {
    /// Publish a service users can subscribe their devices to.
    Add(Box<CatalogAddArgs>),
    /// List the catalog.
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Withdraw an entry, and every subscription to it.
    Rm {
        /// Entry name.
        name: String,
    },
}

/// `catalog add`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["page", "open", "command"])))]
pub struct CatalogAddArgs {
    /// Short unique name (letters, digits, `.`, `_`, `-`).
    pub name: String,
    /// Title shown to users.
    #[arg(long)]
    pub title: String,
    /// What the service does, for users.
    #[arg(long, default_value = "")]
    pub description: String,
    /// Who may be subscribed: `all`, `group:<name>` or `agent:<id or name>`.
    #[arg(long, default_value = "all")]
    pub to: String,
    /// Agents refuse runs closer together than this, whatever the schedule says.
    #[arg(long, default_value = "1m")]
    pub min_interval: String,
    /// How long the signature stays valid.
    #[arg(long, default_value = "365d")]
    pub valid: String,
    /// Limit for each run (programs), or for completing the page (browser services).
    #[arg(long)]
    pub timeout: Option<String>,
    /// A browser service at this server's own service page, `<server>/service/NAME`.
    #[arg(long)]
    pub page: bool,
    /// A browser service at this URL (https, or http to loopback for development).
    #[arg(long)]
    pub open: Option<String>,
    /// A standalone service: absolute path of the program, then its arguments.
    #[arg(last = true, num_args = 1..)]
    pub command: Vec<String>,
}

/// `open`.
#[derive(Debug, Args)]
pub struct OpenArgs {
    /// `agent:<id or name>`, `group:<name>` or `all`.
    #[arg(long)]
    pub to: String,
    /// How long the person has to complete the page.
    #[arg(long, default_value = DEFAULT_OPEN_TIMEOUT)]
    pub timeout: String,
    /// How long the job waits for an offline agent.
    #[arg(long, default_value = DEFAULT_TTL)]
    pub ttl: String,
    /// Wait until the page is completed (or the job otherwise ends) and print the outcome.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: print the outcome as one JSON document (`{"ok", "jobs"}`, each job
    /// as `show --json` prints it, with the person's `outcome`).
    #[arg(long, requires = "wait")]
    pub json: bool,
    /// The page (https, or http to loopback for development).
    pub url: String,
}

/// Builds a browser action after checking its URL the way agents will.
pub(crate) fn open_action(url: &str, timeout: Duration) -> Result<Action, CliError> {
    herald_shared::envelope::check_browser_url(url).map_err(usage)?;
    Ok(Action::Open(OpenSpec {
        url: url.to_string(),
        timeout_ms: timeout.as_millis() as u64,
    }))
}

impl Context {
    /// `catalog ...`.
    pub(crate) async fn catalog(&self, command: CatalogCommand) -> Result<ExitCode, CliError> {
        match command {
            CatalogCommand::Add(args) => self.catalog_add(*args).await,
            CatalogCommand::List { json } => {
                let entries: Vec<CatalogEntry> = self.client().get("/api/v1/catalog").await?;
                if json {
                    print_json(&entries);
                } else if entries.is_empty() {
                    println!("no catalog entries");
                } else {
                    println!(
                        "{:<20} {:<5} {:<10} {:<30} WHAT",
                        "NAME", "KIND", "FOR", "TITLE"
                    );
                    for e in entries {
                        println!(
                            "{:<20} {:<5} {:<10} {:<30} {}",
                            e.name, e.kind, e.target, e.title, e.summary
                        );
                    }
                }
                Ok(ExitCode::SUCCESS)
            }
            CatalogCommand::Rm { name } => {
                let removed: Created = self
                    .client()
                    .delete(&format!("/api/v1/catalog/{name}"))
                    .await?;
                println!(
                    "catalog entry {name} removed with {} subscription(s)",
                    removed.ids.first().copied().unwrap_or_default()
                );
                Ok(ExitCode::SUCCESS)
            }
        }
    }

    async fn catalog_add(&self, args: CatalogAddArgs) -> Result<ExitCode, CliError> {
        if !herald_shared::valid_name(&args.name) {
            return Err(usage(format!(
                "invalid entry name {:?}: use letters, digits, '.', '_' and '-'",
                args.name
            )));
        }
        if args.title.trim().is_empty() {
            return Err(usage("--title must not be empty"));
        }
        let min_interval = parse_duration("--min-interval", &args.min_interval)?;
        let valid = parse_duration("--valid", &args.valid)?;
        let browser = args.page || args.open.is_some();
        let timeout = parse_duration(
            "--timeout",
            args.timeout.as_deref().unwrap_or(if browser {
                DEFAULT_OPEN_TIMEOUT
            } else {
                DEFAULT_TIMEOUT
            }),
        )?;
        let action = if args.page {
            let base = self.admin.server_url.trim_end_matches('/');
            open_action(&format!("{base}/service/{}", args.name), timeout)?
        } else if let Some(url) = &args.open {
            open_action(url, timeout)?
        } else {
            crate::cli::run_action(&args.command, timeout, None)?
        };
        let summary = action.describe();
        let audience = self.audience(&args.to).await?;
        let envelope = self.sign_order(
            audience,
            action,
            Repeat::Standing {
                min_interval_ms: min_interval.as_millis() as u64,
            },
            deadline(now_ms(), &[valid, CLOCK_SKEW], "--valid")?,
        )?;
        let _: Created = self
            .client()
            .post(
                "/api/v1/catalog",
                &CreateCatalogEntry {
                    name: args.name.clone(),
                    title: args.title,
                    description: args.description,
                    envelope,
                },
            )
            .await?;
        println!("catalog entry {} published: {summary}", args.name);
        Ok(ExitCode::SUCCESS)
    }

    /// `open`: a one-off browser service.
    pub(crate) async fn open(&self, args: OpenArgs) -> Result<ExitCode, CliError> {
        let timeout = parse_timeout(&args.timeout)?;
        let ttl = parse_duration("--ttl", &args.ttl)?;
        let action = open_action(&args.url, timeout)?;
        let created = self.queue_once(&args.to, action, timeout, ttl).await?;
        if args.json {
            return self.report_jobs_json(&created.ids, None).await;
        }
        self.report_jobs(&created.ids, args.wait).await
    }
}
