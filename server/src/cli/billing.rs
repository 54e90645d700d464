//! `herald-server billing ...` and `herald-server stats`: price plans and providers'
//! prices, usage ingestion from a file, monthly runs, closing, invoices, exports and the
//! daily statistics, all through the admin API.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};

use crate::cli::{print_json, usage, CliError, Context};
use crate::model::billing::{
    format_minor, parse_month, BillingMonth, IngestReport, Invoice, Meter, PlansText, Price,
    ProviderPrice, RunReport, StatPoint, StatsBy,
};
use crate::model::Created;

/// `billing ...`.
#[derive(Debug, Subcommand)]
pub enum BillingCommand {
    /// Price plans.
    #[command(subcommand)]
    Plan(PlanCommand),
    /// Providers' prices for their paid shares.
    #[command(subcommand)]
    Price(PriceCommand),
    /// Store usage events from a file of JSON lines (or a JSON array); `-` reads stdin.
    Ingest {
        /// The file.
        file: PathBuf,
    },
    /// Meter, then rate a month into draft invoices (running it again changes nothing).
    Run {
        /// The month, YYYY-MM.
        #[arg(long)]
        month: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Rate a month a last time and close it: later events go to the next open month.
    Close {
        /// The month, YYYY-MM.
        #[arg(long)]
        month: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Invoices.
    Invoices {
        /// Only this account (user:ID, sender:NAME, agent:ID).
        #[arg(long)]
        account: Option<String>,
        /// Only this month, YYYY-MM.
        #[arg(long)]
        month: Option<String>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// A month's invoices as CSV or JSON, or its usage as CloudEvents JSON lines.
    Export {
        /// The month, YYYY-MM.
        #[arg(long)]
        month: String,
        /// csv, json or cloudevents.
        #[arg(long, default_value = "csv")]
        format: String,
        /// Write here instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// `billing plan ...`.
#[derive(Debug, Subcommand)]
pub enum PlanCommand {
    /// Check and set the price plans from a TOML file (see docs/BILLING.md).
    Set {
        /// The plans file.
        file: PathBuf,
    },
    /// The plans in force.
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// One plan.
    Show {
        /// Its name.
        name: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

/// `billing price ...`.
#[derive(Debug, Subcommand)]
pub enum PriceCommand {
    /// Set what consumers of a provider's paid shares pay it for a meter.
    Set(PriceSetArgs),
    /// Every provider price.
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

/// `billing price set`.
#[derive(Debug, Args)]
pub struct PriceSetArgs {
    /// The provider (the share owner's account, user:ID).
    #[arg(long)]
    pub provider: String,
    /// The meter (tunnel_bytes, tunnel_seconds, tunnel_requests, ...).
    #[arg(long)]
    pub meter: String,
    /// Price per --per units, a decimal such as 0.05.
    #[arg(long)]
    pub price: String,
    /// Units the price is for.
    #[arg(long, default_value_t = 1)]
    pub per: i64,
    /// Currency (ISO 4217).
    #[arg(long)]
    pub currency: String,
}

/// `stats`.
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Group by account, club, service or sender.
    #[arg(long, default_value = "account")]
    pub by: String,
    /// From this day (YYYY-MM-DD, UTC); default: 30 days ago.
    #[arg(long)]
    pub since: Option<String>,
    /// JSON output.
    #[arg(long, conflicts_with = "csv")]
    pub json: bool,
    /// CSV output.
    #[arg(long)]
    pub csv: bool,
}

/// Days `stats` shows without `--since`.
const STATS_DAYS: i64 = 30;

fn check_month(month: &str) -> Result<(), CliError> {
    parse_month(month).map(|_| ()).map_err(usage)
}

fn encode(text: &str) -> String {
    utf8_percent_encode(text, NON_ALPHANUMERIC).to_string()
}

impl Context {
    /// `billing ...`.
    pub(crate) async fn billing(&self, command: BillingCommand) -> Result<ExitCode, CliError> {
        match command {
            BillingCommand::Plan(command) => self.plan(command).await,
            BillingCommand::Price(command) => self.price(command).await,
            BillingCommand::Ingest { file } => {
                let body = if file.as_os_str() == "-" {
                    std::io::read_to_string(std::io::stdin())
                } else {
                    std::fs::read_to_string(&file)
                }
                .map_err(|e| usage(format!("cannot read {}: {e}", file.display())))?;
                let events = crate::api::billing::parse_usage(&body).map_err(usage)?;
                let mut total = IngestReport::default();
                for chunk in events.chunks(crate::api::billing::MAX_USAGE_BATCH) {
                    let json = serde_json::to_vec(chunk).expect("events serialize");
                    let length = json.len() as u64;
                    let report: IngestReport = self
                        .client()
                        .upload(
                            reqwest::Method::POST,
                            "/api/v1/usage",
                            json.into(),
                            length,
                            "application/json",
                        )
                        .await?;
                    total.accepted += report.accepted;
                    total.duplicates += report.duplicates;
                }
                println!(
                    "{} usage event(s) stored, {} already stored",
                    total.accepted, total.duplicates
                );
                Ok(ExitCode::SUCCESS)
            }
            BillingCommand::Run { month, json } => self.billing_run("runs", &month, json).await,
            BillingCommand::Close { month, json } => self.billing_run("close", &month, json).await,
            BillingCommand::Invoices {
                account,
                month,
                json,
            } => {
                let mut query = Vec::new();
                if let Some(account) = &account {
                    query.push(format!("account={}", encode(account)));
                }
                if let Some(month) = &month {
                    check_month(month)?;
                    query.push(format!("month={month}"));
                }
                let invoices: Vec<Invoice> = self
                    .client()
                    .get(&format!("/api/v1/billing/invoices?{}", query.join("&")))
                    .await?;
                if json {
                    print_json(&invoices);
                } else {
                    print_invoices(&invoices);
                }
                Ok(ExitCode::SUCCESS)
            }
            BillingCommand::Export { month, format, out } => {
                check_month(&month)?;
                if crate::billing::ExportFormat::parse(&format).is_none() {
                    return Err(usage(format!(
                        "--format {format:?}: use csv, json or cloudevents"
                    )));
                }
                let text = self
                    .client()
                    .get_text(&format!(
                        "/api/v1/billing/export?month={month}&format={format}"
                    ))
                    .await?;
                match out {
                    Some(path) => std::fs::write(&path, text).map_err(|e| {
                        CliError::Other(format!("cannot write {}: {e}", path.display()))
                    })?,
                    None => print!("{text}"),
                }
                Ok(ExitCode::SUCCESS)
            }
        }
    }

    async fn billing_run(&self, verb: &str, month: &str, json: bool) -> Result<ExitCode, CliError> {
        check_month(month)?;
        let report: RunReport = self
            .client()
            .post(
                &format!("/api/v1/billing/{verb}"),
                &BillingMonth {
                    month: month.to_string(),
                },
            )
            .await?;
        if json {
            print_json(&report);
            return Ok(ExitCode::SUCCESS);
        }
        let totals: Vec<String> = report
            .totals
            .iter()
            .map(|(currency, total)| format!("{currency} {total} (minor units)"))
            .collect();
        println!(
            "{}: {} invoice(s), {} changed, {} new usage event(s) metered; totals: {}{}",
            report.month,
            report.invoices,
            report.changed,
            report.metered,
            if totals.is_empty() {
                "-".into()
            } else {
                totals.join(", ")
            },
            match report.closed_at {
                Some(_) => "; closed",
                None => "; open (drafts)",
            }
        );
        Ok(ExitCode::SUCCESS)
    }

    async fn plan(&self, command: PlanCommand) -> Result<ExitCode, CliError> {
        match command {
            PlanCommand::Set { file } => {
                let toml = std::fs::read_to_string(&file)
                    .map_err(|e| usage(format!("cannot read {}: {e}", file.display())))?;
                // Checked here for a quick answer, and again by the server.
                let plans = crate::model::billing::Plans::parse(&toml).map_err(usage)?;
                let json = serde_json::to_vec(&PlansText { toml }).expect("text serializes");
                let length = json.len() as u64;
                let _: Created = self
                    .client()
                    .upload(
                        reqwest::Method::PUT,
                        "/api/v1/billing/plans",
                        json.into(),
                        length,
                        "application/json",
                    )
                    .await?;
                println!("{} plan(s) set", plans.plans.len());
                Ok(ExitCode::SUCCESS)
            }
            PlanCommand::List { json } => {
                let shown: crate::api::billing::PlansInForce =
                    self.client().get("/api/v1/billing/plans").await?;
                if json {
                    print_json(&shown.plans);
                    return Ok(ExitCode::SUCCESS);
                }
                println!("operator fee: {} bp", shown.plans.operator.fee_bp);
                println!(
                    "{:<16} {:<8} {:>10} {:<8} ACCOUNTS",
                    "PLAN", "CURRENCY", "FLAT FEE", "DEFAULT"
                );
                for plan in &shown.plans.plans {
                    println!(
                        "{:<16} {:<8} {:>10} {:<8} {}",
                        plan.name,
                        plan.currency,
                        plan.flat_fee.to_string(),
                        if plan.default { "yes" } else { "" },
                        plan.accounts.len()
                    );
                }
                Ok(ExitCode::SUCCESS)
            }
            PlanCommand::Show { name, json } => {
                let shown: crate::api::billing::PlansInForce =
                    self.client().get("/api/v1/billing/plans").await?;
                let plan = shown
                    .plans
                    .plans
                    .iter()
                    .find(|p| p.name == name)
                    .ok_or_else(|| {
                        CliError::Other(format!("no plan {name:?}: see `billing plan list`"))
                    })?;
                if json {
                    print_json(plan);
                    return Ok(ExitCode::SUCCESS);
                }
                println!(
                    "plan {} ({}), flat fee {}",
                    plan.name, plan.currency, plan.flat_fee
                );
                if !plan.accounts.is_empty() {
                    println!("accounts: {}", plan.accounts.join(", "));
                }
                for (meter, price) in &plan.meters {
                    let rule = match price.price {
                        Some(p) => format!("{p} per {}", price.per),
                        None => {
                            let tiers: Vec<String> = price
                                .tiers
                                .iter()
                                .map(|t| match t.up_to {
                                    Some(up) => format!("up to {up}: {}", t.price),
                                    None => format!("beyond: {}", t.price),
                                })
                                .collect();
                            format!(
                                "{:?} tiers per {} ({})",
                                price.mode,
                                price.per,
                                tiers.join("; ")
                            )
                        }
                    };
                    println!("  {meter:<16} included {:<12} {rule}", price.included);
                }
                Ok(ExitCode::SUCCESS)
            }
        }
    }

    async fn price(&self, command: PriceCommand) -> Result<ExitCode, CliError> {
        match command {
            PriceCommand::Set(args) => {
                let price = ProviderPrice {
                    provider: args.provider,
                    meter: Meter::parse(&args.meter)
                        .ok_or_else(|| usage(format!("unknown meter {:?}", args.meter)))?,
                    price: Price::parse(&args.price).map_err(usage)?,
                    per: args.per,
                    currency: args.currency,
                };
                price.check().map_err(usage)?;
                let _: Created = self.client().post("/api/v1/billing/prices", &price).await?;
                println!(
                    "{} charges {} {} per {} {}",
                    price.provider, price.price, price.currency, price.per, price.meter
                );
                Ok(ExitCode::SUCCESS)
            }
            PriceCommand::List { json } => {
                let prices: Vec<ProviderPrice> =
                    self.client().get("/api/v1/billing/prices").await?;
                if json {
                    print_json(&prices);
                    return Ok(ExitCode::SUCCESS);
                }
                for p in &prices {
                    println!(
                        "{:<20} {:<16} {} {} per {}",
                        p.provider,
                        p.meter.as_str(),
                        p.price,
                        p.currency,
                        p.per
                    );
                }
                Ok(ExitCode::SUCCESS)
            }
        }
    }

    /// `stats`.
    pub(crate) async fn stats(&self, args: StatsArgs) -> Result<ExitCode, CliError> {
        if StatsBy::parse(&args.by).is_none() {
            return Err(usage(format!(
                "--by {:?}: use account, club, service or sender",
                args.by
            )));
        }
        let since = match &args.since {
            Some(day) => chrono::NaiveDate::parse_from_str(day, "%Y-%m-%d")
                .map_err(|_| usage(format!("--since {day:?}: use YYYY-MM-DD")))?
                .and_hms_opt(0, 0, 0)
                .expect("midnight exists")
                .and_utc()
                .timestamp_millis(),
            None => crate::now_ms() - STATS_DAYS * 86_400_000,
        };
        let points: Vec<StatPoint> = self
            .client()
            .get(&format!("/api/v1/stats?by={}&since={since}", args.by))
            .await?;
        if args.json {
            print_json(&points);
        } else if args.csv {
            println!("day,{},metric,value", args.by);
            for p in &points {
                println!("{},{},{},{}", p.day, csv_field(&p.key), p.metric, p.value);
            }
        } else {
            println!(
                "{:<10}  {:<28} {:<22} {:>12}",
                "DAY",
                args.by.to_uppercase(),
                "METRIC",
                "VALUE"
            );
            for p in &points {
                println!(
                    "{:<10}  {:<28} {:<22} {:>12}",
                    p.day, p.key, p.metric, p.value
                );
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}

fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

fn print_invoices(invoices: &[Invoice]) {
    if invoices.is_empty() {
        println!("no invoices");
        return;
    }
    for invoice in invoices {
        let money = |amount: i64| {
            format!(
                "{} {}",
                format_minor(amount, invoice.minor_digits),
                invoice.currency
            )
        };
        println!(
            "{} {} (plan {}, {}): {}",
            invoice.month,
            invoice.account,
            invoice.plan,
            invoice.status,
            money(invoice.total)
        );
        if invoice.flat_fee != 0 {
            println!("  flat fee{:>40}", money(invoice.flat_fee));
        }
        for line in &invoice.lines {
            println!(
                "  {:<16} {:>14} used {:>12} included {:>16}",
                line.meter.as_str(),
                line.quantity,
                line.included,
                money(line.amount)
            );
        }
        for charge in &invoice.provider_charges {
            println!(
                "  to {} for {} x{}: {}",
                charge.provider,
                charge.meter,
                charge.quantity,
                money(charge.amount)
            );
        }
        if !invoice.earnings.is_empty() {
            println!(
                "  earned {} net (operator fees {})",
                money(invoice.earnings_net),
                money(invoice.operator_fees)
            );
        }
        for late in &invoice.late {
            println!(
                "  includes {} late event(s) from {} (closed)",
                late.events, late.from_month
            );
        }
        for note in &invoice.notes {
            println!("  note: {note}");
        }
    }
}
