//! `herald-bench billing` (issue 16): usage events ingested per second through the
//! store's batch path (`Store::ingest_usage`, one transaction per batch on the durable
//! connection, as `POST /api/v1/usage` uses it), a resend of every batch (all
//! duplicates), and `billing run` for one month over many accounts, in process on a
//! fresh SQLite database.

use std::path::Path;
use std::time::Instant;

use herald_server::model::billing::{Meter, NewUsage};
use herald_server::store::Store;

/// What to measure.
#[derive(Debug, Clone, Copy)]
pub struct BillingPlan {
    /// Events in the month.
    pub events: usize,
    /// Accounts they are spread over.
    pub accounts: usize,
    /// Events per ingest call.
    pub batch: usize,
}

/// A plans file with tiers, an included quantity and a flat fee on several meters, so
/// the run rates every line the way a real one would.
const PLANS: &str = r#"
[operator]
fee_bp = 1000

[[plan]]
name = "standard"
currency = "EUR"
flat_fee = "2.00"
default = true

[plan.meters.tunnel_bytes]
per = 1000000000
included = 1000000000
tiers = [{ up_to = 10000000000, price = "0.10" }, { price = "0.05" }]

[plan.meters.messages_sent]
mode = "volume"
tiers = [{ up_to = 1000, price = "0.01" }, { price = "0.008" }]

[plan.meters.jobs_run]
included = 100
price = "0.02"
"#;

/// The month every generated event falls in, and a time inside it.
const MONTH: &str = "2026-11";
const MONTH_START_MS: i64 = 1_793_491_200_000; // 2026-11-01T00:00:00Z

fn events(plan: &BillingPlan, from: usize, to: usize) -> Vec<NewUsage> {
    let meters = [Meter::TunnelBytes, Meter::MessagesSent, Meter::JobsRun];
    (from..to)
        .map(|i| NewUsage {
            source: "bench/gateway".into(),
            seq: i.to_string(),
            account: format!("user:{}", i % plan.accounts),
            provider: None,
            meter: meters[i % meters.len()],
            quantity: (i % 1000) as i64 + 1,
            time: MONTH_START_MS + (i as i64 % 2_000_000_000),
            note: String::new(),
        })
        .collect()
}

/// Runs the measurements in `dir` (created, then removed) and prints them.
pub fn run(plan: BillingPlan, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let store = Store::open(dir)?;
    store.set_plans(PLANS, herald_server::now_ms())?;
    let mut ingest_secs = 0.0;
    let mut generate_secs = 0.0;
    let mut from = 0;
    while from < plan.events {
        let to = (from + plan.batch).min(plan.events);
        let started = Instant::now();
        let batch = events(&plan, from, to);
        generate_secs += started.elapsed().as_secs_f64();
        let started = Instant::now();
        let report = store.ingest_usage(&batch, herald_server::now_ms())?;
        ingest_secs += started.elapsed().as_secs_f64();
        anyhow::ensure!(
            report.accepted as usize == batch.len(),
            "fresh events were refused"
        );
        from = to;
    }
    println!(
        "ingest: {} events in batches of {} in {:.2} s: {:.0} events/s (generating them took {:.2} s more)",
        plan.events,
        plan.batch,
        ingest_secs,
        plan.events as f64 / ingest_secs,
        generate_secs
    );
    // A resend of the first 10 % (or one batch): every event is a duplicate.
    let resend = (plan.events / 10).max(plan.batch.min(plan.events));
    let batch = events(&plan, 0, resend.min(plan.batch));
    let started = Instant::now();
    let mut duplicates = 0;
    let mut sent = 0;
    while sent < resend {
        let report = store.ingest_usage(&batch, herald_server::now_ms())?;
        duplicates += report.duplicates;
        sent += batch.len();
    }
    let secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(duplicates as usize == sent, "a resend stored events twice");
    println!(
        "resend: {sent} duplicate events in {secs:.2} s: {:.0} events/s, none stored",
        sent as f64 / secs
    );
    let started = Instant::now();
    let report = herald_server::billing::run_month(&store, MONTH, herald_server::now_ms())?;
    let first = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let again = herald_server::billing::run_month(&store, MONTH, herald_server::now_ms())?;
    let second = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        again.changed == 0,
        "a second run changed {} invoices",
        again.changed
    );
    println!(
        "billing run {MONTH}: {} invoices for {} accounts from {} events in {first:.2} s; \
         again (nothing changes) in {second:.2} s; totals {:?} (minor units)",
        report.invoices, plan.accounts, plan.events, report.totals
    );
    let size: u64 = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    println!("database: {:.0} MiB", size as f64 / (1024.0 * 1024.0));
    drop(store);
    std::fs::remove_dir_all(dir)?;
    Ok(())
}
