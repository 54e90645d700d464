//! `herald-server admin-token ...` (scoped admin tokens) and `herald-server audit ...`
//! (the audit log and its hash chain).

use std::process::ExitCode;

use clap::Subcommand;

use crate::cli::{parse_duration, print_json, usage, CliError, Context};
use crate::model::{
    check_token_name, AdminTokenInfo, AuditEntry, AuditVerdict, CreateAdminToken, Scope,
};
use crate::{now_ms, random_bytes};

/// `admin-token ...`.
#[derive(Debug, Subcommand)]
pub enum AdminTokenCommand {
    /// Create an admin API token with a scope and print it (once: only its hash is kept).
    Create {
        /// A name for people: 1 to 64 of a-z, 0-9, '.', '_', '-'.
        name: String,
        /// What it may do: read (everything, change nothing), metrics (only /metrics),
        /// jobs, packages, messages (read plus that area), admin (everything).
        #[arg(long)]
        scope: Scope,
        /// How long it works (e.g. 30d); default: until revoked.
        #[arg(long)]
        ttl: Option<String>,
    },
    /// List admin tokens (never their secrets).
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Revoke an admin token by the id `admin-token list` prints.
    Revoke {
        /// Token id (12 or more hex digits).
        id: String,
    },
}

/// `audit ...`.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Print audit entries, oldest first.
    List {
        /// Only entries from this long ago (e.g. 24h) or since this time (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// Only this actor: `token:ID`, `user:LOGIN`, `vendor:NAME`, `sender:NAME`,
        /// `local:USER`.
        #[arg(long)]
        actor: Option<String>,
        /// JSON output (one array).
        #[arg(long)]
        json: bool,
    },
    /// Check the hash chain: finds an edited or deleted entry. Exits 1 if broken.
    Verify {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

impl clap::ValueEnum for Scope {
    fn value_variants<'a>() -> &'a [Self] {
        &crate::model::SCOPES
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.as_str()))
    }
}

/// Entries fetched per request while listing.
const PAGE: u32 = 1000;

/// Reads `--since`: a duration back from now, or an RFC 3339 time.
fn parse_since(text: &str) -> Result<i64, CliError> {
    if let Ok(at) = chrono::DateTime::parse_from_rfc3339(text) {
        return Ok(at.timestamp_millis());
    }
    let ago = parse_duration("--since", text).map_err(|_| {
        usage(format!(
            "--since {text:?} is neither a duration (24h, 7d) nor an RFC 3339 time (2026-12-01T00:00:00Z)"
        ))
    })?;
    Ok(now_ms().saturating_sub(ago.as_millis() as i64))
}

impl Context {
    /// `admin-token ...`.
    pub(crate) async fn admin_token(
        &self,
        command: AdminTokenCommand,
    ) -> Result<ExitCode, CliError> {
        match command {
            AdminTokenCommand::Create { name, scope, ttl } => {
                check_token_name(&name).map_err(usage)?;
                let expires_at = match ttl {
                    Some(ttl) => Some(now_ms() + parse_duration("--ttl", &ttl)?.as_millis() as i64),
                    None => None,
                };
                let secret = hex::encode(random_bytes::<32>());
                let created: AdminTokenInfo = self
                    .client()
                    .post(
                        "/api/v1/admin-tokens",
                        &CreateAdminToken {
                            name: name.clone(),
                            scope,
                            secret_hash: herald_shared::token::secret_hash(secret.as_bytes()),
                            expires_at,
                        },
                    )
                    .await?;
                eprintln!(
                    "admin token {} ({name}, scope {scope}) created; it is shown only now. \
                     Use it as `Authorization: Bearer TOKEN` or HERALD_ADMIN_TOKEN.",
                    created.id
                );
                println!("{secret}");
                Ok(ExitCode::SUCCESS)
            }
            AdminTokenCommand::List { json } => {
                let tokens: Vec<AdminTokenInfo> = self.client().get("/api/v1/admin-tokens").await?;
                if json {
                    print_json(&tokens);
                    return Ok(ExitCode::SUCCESS);
                }
                println!(
                    "{:<12} {:<20} {:<9} {:<23} {:<23} REVOKED",
                    "ID", "NAME", "SCOPE", "CREATED", "EXPIRES"
                );
                for t in tokens {
                    println!(
                        "{:<12} {:<20} {:<9} {:<23} {:<23} {}",
                        t.id,
                        t.name,
                        t.scope.as_str(),
                        crate::console::when(t.created_at),
                        t.expires_at
                            .map(crate::console::when)
                            .unwrap_or_else(|| "never".into()),
                        t.revoked_at
                            .map(crate::console::when)
                            .unwrap_or_else(|| "-".into()),
                    );
                }
                Ok(ExitCode::SUCCESS)
            }
            AdminTokenCommand::Revoke { id } => {
                crate::cli::check_token_id(&id, "admin-token list")?;
                let revoked: AdminTokenInfo = self
                    .client()
                    .delete(&format!("/api/v1/admin-tokens/{id}"))
                    .await?;
                println!(
                    "admin token {} ({}, scope {}) revoked",
                    revoked.id, revoked.name, revoked.scope
                );
                Ok(ExitCode::SUCCESS)
            }
        }
    }

    /// `audit ...`.
    pub(crate) async fn audit(&self, command: AuditCommand) -> Result<ExitCode, CliError> {
        match command {
            AuditCommand::List { since, actor, json } => {
                let since = since.as_deref().map(parse_since).transpose()?;
                let mut query = String::new();
                if let Some(since) = since {
                    query.push_str(&format!("&since={since}"));
                }
                if let Some(actor) = &actor {
                    query.push_str(&format!(
                        "&actor={}",
                        percent_encoding::utf8_percent_encode(
                            actor,
                            percent_encoding::NON_ALPHANUMERIC
                        )
                    ));
                }
                let mut all: Vec<AuditEntry> = Vec::new();
                let mut after = 0;
                loop {
                    let page: Vec<AuditEntry> = self
                        .client()
                        .get(&format!("/api/v1/audit?after={after}&limit={PAGE}{query}"))
                        .await?;
                    let full = page.len() as u32 == PAGE;
                    if let Some(last) = page.last() {
                        after = last.seq;
                    }
                    if json {
                        all.extend(page);
                    } else {
                        for e in page {
                            println!(
                                "{:>6} {} {} from {} {} {} -> {}",
                                e.seq,
                                crate::console::when(e.at),
                                e.actor,
                                e.source,
                                e.action,
                                e.target,
                                e.outcome
                            );
                        }
                    }
                    if !full {
                        break;
                    }
                }
                if json {
                    print_json(&all);
                }
                Ok(ExitCode::SUCCESS)
            }
            AuditCommand::Verify { json } => {
                let verdict: AuditVerdict = self.client().get("/api/v1/audit/verify").await?;
                if json {
                    print_json(&verdict);
                } else if verdict.problems.is_empty() {
                    println!(
                        "audit log intact: {} entries; head {}",
                        verdict.entries, verdict.head
                    );
                } else {
                    for problem in &verdict.problems {
                        println!("{problem}");
                    }
                    let unlisted = verdict.problem_count - verdict.problems.len() as u64;
                    if unlisted > 0 {
                        println!("... and {unlisted} more");
                    }
                    println!(
                        "audit log BROKEN: {} problems in {} entries",
                        verdict.problem_count, verdict.entries
                    );
                }
                Ok(if verdict.problems.is_empty() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                })
            }
        }
    }
}
