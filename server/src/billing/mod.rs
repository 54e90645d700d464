//! Billing: the monthly run that rates usage into invoices, closing months, the
//! periodic meter step, and exports. The rules themselves are pure and live in
//! [`crate::model::billing`]; the rows are in `store/billing.rs`. This folder sits at the
//! relay/scheduler level: it uses the store and the model, and the API, console, CLI
//! and `serve` use it.
//!
//! - `mod.rs`: [`run_month`], [`close_month`], [`plans`], [`meter_periodically`];
//! - `export.rs`: invoices as CSV or JSON, raw usage as CloudEvents JSON lines.
//!
//! The meter step runs over every row at the start of every `billing run` and `billing
//! close`, and every [`METER_EVERY`] inside `serve` over the rows of the last
//! [`METER_WINDOW`].

mod export;

pub use export::{export, ExportFormat};

use std::time::Duration;

use crate::model::billing::{parse_month, rate_month, Invoice, Plans, ProviderPrice, RunReport};
use crate::store::{MonthUsage, Store, StoreError};
use herald_shared::Millis;

/// How often `serve` derives usage events from stored sessions, messages, fallbacks
/// and jobs.
pub const METER_EVERY: Duration = Duration::from_secs(60);
/// How far back the periodic step looks (rows that ended, went out or finished since):
/// it stays cheap on large tables, and anything older is caught by `billing run`,
/// which looks at every row.
pub const METER_WINDOW: Duration = Duration::from_secs(2 * 24 * 3600);

/// Errors of a billing run.
#[derive(Debug, thiserror::Error)]
pub enum BillingError {
    /// The month is not `YYYY-MM`.
    #[error("{0}")]
    Month(String),
    /// No plans were set.
    #[error("no price plans: set them with `herald-server billing plan set FILE`")]
    NoPlans,
    /// The stored plans do not parse (a hand edit).
    #[error("stored plans: {0}")]
    Plans(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The plans in force.
pub fn plans(store: &Store) -> Result<Plans, BillingError> {
    let (text, _) = store.plans_text()?.ok_or(BillingError::NoPlans)?;
    Plans::parse(&text).map_err(BillingError::Plans)
}

/// Reads, checks and sets a plans file (`[billing] plans_file`), unless the plans in
/// force are that text already. The error says what is wrong with the file.
pub fn set_plans_file(store: &Store, path: &std::path::Path, now: Millis) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
    Plans::parse(&text)?;
    let current = store.plans_text().map_err(|e| e.to_string())?;
    if current.is_none_or(|(stored, _)| stored != text) {
        store.set_plans(&text, now).map_err(|e| e.to_string())?;
        tracing::info!(path = %path.display(), "price plans set from [billing] plans_file");
    }
    Ok(())
}

/// Meters, then rates `month` and stores its invoices (drafts replaced where they
/// changed). Running it twice changes nothing the second time; a closed month is not
/// rated again.
pub fn run_month(store: &Store, month: &str, now: Millis) -> Result<RunReport, BillingError> {
    let (metered, rating) = prepare(store, month, now)?;
    let (invoices, changed) = store.rate_month(month, now, |usage| rating.rate(usage))?;
    report(store, month, metered, &invoices, changed)
}

/// Meters, rates `month` a last time and closes it: its invoices become final and
/// events that arrive later for it are booked into the next open month.
pub fn close_month(store: &Store, month: &str, now: Millis) -> Result<RunReport, BillingError> {
    let (metered, rating) = prepare(store, month, now)?;
    store.close_month(month, now, |usage| rating.rate(usage))?;
    let invoices = store.invoices(None, Some(month))?;
    report(store, month, metered, &invoices, 0)
}

/// A month's rating with the plans and providers' prices in force.
struct Rating<'a> {
    month: &'a str,
    plans: Plans,
    prices: Vec<ProviderPrice>,
}

impl Rating<'_> {
    fn rate(&self, usage: &MonthUsage) -> Result<Vec<Invoice>, String> {
        Ok(rate_month(
            self.month,
            &self.plans,
            &self.prices,
            &usage.totals,
            &usage.late,
            &usage.notes,
        ))
    }
}

/// What a run and a close share: checks the month, reads the plans, meters (returns how
/// many events were new) and reads the providers' prices.
fn prepare<'a>(
    store: &Store,
    month: &'a str,
    now: Millis,
) -> Result<(u64, Rating<'a>), BillingError> {
    parse_month(month).map_err(BillingError::Month)?;
    let plans = plans(store)?;
    let metered = store.meter_usage(now, None)?;
    let prices = store.provider_prices()?;
    Ok((
        metered,
        Rating {
            month,
            plans,
            prices,
        },
    ))
}

fn report(
    store: &Store,
    month: &str,
    metered: u64,
    invoices: &[crate::model::billing::Invoice],
    changed: u64,
) -> Result<RunReport, BillingError> {
    let mut totals = std::collections::BTreeMap::new();
    for invoice in invoices {
        *totals.entry(invoice.currency.clone()).or_insert(0) += invoice.total;
    }
    Ok(RunReport {
        month: month.to_string(),
        metered,
        invoices: invoices.len() as u64,
        changed,
        totals,
        closed_at: store.month_closed_at(month)?,
    })
}

/// Runs the meter step every [`METER_EVERY`] until `stopped`.
pub async fn meter_periodically(store: Store, stopped: impl std::future::Future<Output = ()>) {
    tokio::pin!(stopped);
    let mut tick = tokio::time::interval(METER_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            _ = tick.tick() => {
                let now = crate::now_ms();
                let window = METER_WINDOW.as_millis() as Millis;
                match store.meter_usage(now, Some(now - window)) {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(events = n, "metered usage"),
                    Err(e) => tracing::warn!("meter step failed: {e}"),
                }
            }
        }
    }
}
