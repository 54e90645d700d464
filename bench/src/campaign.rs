//! The campaign scenario (issue 14): one sender-signed message to a recipient list of
//! `rows` rows, `agents` of them naming simulated agents (the `agent` column, by name)
//! and the rest distinct Korean mobile numbers (`+8210…`) with no device, whose SMS
//! fallback goes out at once to a stand-in gateway in this process
//! (`crate::gateway`). The swarm is the one the other scenarios use: each agent acks
//! the message's signal and sends a `stored` receipt signed with its identity key.
//!
//! What is timed, per run (a new campaign each run, from the same list, once the
//! previous one is all in):
//!
//! - **upload**: `POST /api/v1/lists`, the CSV streamed to the server's file.
//! - **ingest**: `POST /api/v1/campaigns` until it answers: the list read and
//!   normalised row by row, every row, target and delivery job committed in one
//!   transaction, the deliveries handed to the connected agents.
//! - **all stored**: from just before `POST /api/v1/campaigns` until the API counts
//!   every agent's `stored` receipt (`GET /api/v1/messages?sender=S&limit=1`, polled
//!   every 10 ms as in the messages scenario: the campaign's `status` reads every row of
//!   the list, too heavy to poll); and the last `ReportStored` answer at an agent (the
//!   server answers once the receipt is committed).
//! - **fallback SMS per second**: requests at the gateway, count ÷ (last − first), and
//!   the median of the whole seconds counted from the first. The gateway answers at
//!   once, so this is the server's rate (decide, claim, send at most
//!   `[forwarding] fallback_concurrency` at once, record).
//!
//! Afterwards `GET /api/v1/messages/{id}/status` must show every receipt stored and
//! every fallback sent (none failed), and the gateway must have had each number once.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use herald_server::config::ForwardingConfig;
use herald_server::model::{CreateCampaign, Fallback, MAX_ROWS};
use herald_shared::envelope::Audience;

use crate::cluster::udp_receive_drops;
use crate::gateway::Gateway;
use crate::messages::SENDER;
use crate::scenarios::{enrolled_cluster, print_drops};
use crate::stats::{median, median_f64, ms};
use crate::swarm::Swarm;

/// How often the benchmark asks the API for the message's counts.
const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// How often a slow run says how far it got.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(5);
/// The target for ingesting the list.
const INGEST_TARGET: Duration = Duration::from_secs(2);
/// Wait for a `stored` receipt before an agent row falls back: longer than any run, so
/// that only the rows without a device send SMS.
const FALLBACK_AFTER_MS: i64 = 30 * 60_000;
/// The sender's daily fallback cap, raised for the benchmark (the default, 100,000,
/// would stop the second run of a 100,000-row list).
const DAILY_CAP: u64 = 1_000_000_000;

/// How big, how often.
#[derive(Debug, Clone)]
pub struct CampaignPlan {
    /// Rows in the list.
    pub rows: usize,
    /// Rows naming a simulated agent (one agent each); the others are phone numbers.
    pub agents: usize,
    /// Campaigns sent, one after another.
    pub runs: usize,
    /// `[forwarding] fallback_concurrency`; the server's default when `None`.
    pub fallback_concurrency: Option<usize>,
    /// Deadline for any one phase.
    pub deadline: Duration,
}

impl CampaignPlan {
    /// The benchmark: 100,000 rows, 10,000 of them agents.
    pub const ROWS: usize = 100_000;
    /// Agents in the benchmark.
    pub const AGENTS: usize = 10_000;
    /// Rows in the quick plan.
    pub const QUICK_ROWS: usize = 2_000;
    /// Agents in the quick plan.
    pub const QUICK_AGENTS: usize = 200;
}

/// One run's figures.
struct Run {
    /// `POST /api/v1/lists` answered.
    upload: Duration,
    /// `POST /api/v1/campaigns` answered.
    ingest: Duration,
    /// From before `POST /api/v1/campaigns` until the API counted every `stored` receipt.
    stored: Duration,
    /// ... until the last `ReportStored` answer at an agent.
    last_answer: Duration,
    /// ... until the first and the last SMS at the gateway.
    first_sms: Duration,
    last_sms: Duration,
    /// SMS ÷ (last − first).
    sms_rate: f64,
    /// Median SMS count of the whole seconds from the first SMS.
    sms_bucket: f64,
    /// The last `GET /api/v1/messages/{id}/status` (every row read) answered.
    status: Duration,
    /// Sessions the swarm's agents opened during the run.
    reconnections: usize,
}

/// Runs the scenario with a server and swarm of its own in `dir`.
pub async fn campaign(dir: &Path, bin_dir: &Path, plan: &CampaignPlan) -> anyhow::Result<()> {
    let (rows, agents) = (plan.rows, plan.agents);
    anyhow::ensure!(
        rows > 0 && agents <= rows && rows as u64 <= MAX_ROWS,
        "--rows must be 1 to {MAX_ROWS} and --agents at most --rows"
    );
    let sms = rows - agents;
    println!("\n## campaign: {rows} rows, {agents} with simulated agents, {sms} by SMS");
    let gateway = Gateway::start().await?;
    let (mut cluster, swarm_agents) = enrolled_cluster(dir, bin_dir, agents).await?;
    cluster.configure(|config| {
        let mut forwarding = config.forwarding.take().unwrap_or_default();
        forwarding = ForwardingConfig {
            allow_http: true,
            fallback_per_sender_day: DAILY_CAP,
            fallback_concurrency: plan
                .fallback_concurrency
                .unwrap_or(forwarding.fallback_concurrency),
            ..forwarding
        };
        println!(
            "setup: [forwarding] fallback_concurrency = {}, fallback_per_sender_day = {DAILY_CAP}; [sms] a loopback HTTP gateway stand-in",
            forwarding.fallback_concurrency
        );
        config.forwarding = Some(forwarding);
        config.sms = Some(gateway.sms_config());
    })?;
    cluster.start().await?;
    let swarm = Swarm::start(swarm_agents, cluster.quic)?;
    let connected = swarm.wait_connected(agents, plan.deadline).await?;
    println!(
        "campaign: {agents} agents connected in {:.2} s",
        connected.as_secs_f64()
    );
    let sender = cluster.add_sender(SENDER).await?;
    let list = list_csv(rows, agents);
    let list_bytes = list.len();
    let drops = udp_receive_drops();
    let mut runs = Vec::with_capacity(plan.runs);
    for _ in 0..plan.runs {
        let gateway_before = gateway.count();
        let answers_before = swarm.reports_stored_count();
        let sessions_before = swarm.observed.sessions.load(Ordering::SeqCst);
        let started = Instant::now();
        let uploaded = cluster.upload_list(list.clone()).await?;
        let upload = started.elapsed();
        anyhow::ensure!(
            uploaded.bytes == list_bytes as u64,
            "the server took {} of the list's {list_bytes} bytes",
            uploaded.bytes
        );
        let request = CreateCampaign {
            envelope: sender.signed_message(Audience::All)?,
            list: uploaded.id,
            deliver_at: None,
            fallback: Fallback::Sms,
            fallback_after_ms: Some(FALLBACK_AFTER_MS),
            max_fallback: None,
            rate: None,
            invite: false,
            country: None,
            strict: true,
        };
        let t0 = Instant::now();
        let created = cluster.create_campaign(&request).await?;
        let ingest = t0.elapsed();
        anyhow::ensure!(
            created.addressed == rows as u64
                && created.with_program == agents as u64
                && created.no_program == sms as u64
                && created.devices == agents as u64,
            "the campaign took {} rows ({} with a device, {} without, {} devices, {} bad, {} duplicates), not {rows} ({agents} with a device)",
            created.addressed,
            created.with_program,
            created.no_program,
            created.devices,
            created.bad,
            created.duplicates
        );

        let mut stored = (agents == 0).then_some(Duration::ZERO);
        let mut counted = 0;
        let mut report = Instant::now();
        loop {
            if stored.is_none() {
                let info = cluster.newest_message(SENDER).await?;
                if let Some(info) = info.filter(|m| m.id == created.id) {
                    counted = info.counts.stored;
                    if counted >= agents as u64 {
                        stored = Some(t0.elapsed());
                    }
                }
            }
            let sent = gateway.count() - gateway_before;
            if stored.is_some() && sent >= sms {
                break;
            }
            if report.elapsed() >= PROGRESS_INTERVAL {
                println!(
                    "campaign: after {:.0} s, {counted} of {agents} receipts stored, {sent} of {sms} SMS at the gateway",
                    t0.elapsed().as_secs_f64(),
                );
                report = Instant::now();
            }
            anyhow::ensure!(
                t0.elapsed() < plan.deadline,
                "campaign {}: {counted} of {agents} stored receipts and {sent} of {sms} SMS after {:?}",
                created.id,
                plan.deadline
            );
            tokio::time::sleep(if stored.is_some() {
                // Only the gateway's count now, which is in this process.
                POLL_INTERVAL / 2
            } else {
                POLL_INTERVAL
            })
            .await;
        }
        let stored = stored.unwrap_or_default();
        let answers = if agents > 0 {
            swarm
                .wait_reports_stored(answers_before, agents, plan.deadline)
                .await?
        } else {
            Vec::new()
        };
        let since = |at: &Instant| at.saturating_duration_since(t0);
        let last_answer = answers.iter().map(since).max().unwrap_or_default();

        // Every fallback recorded as sent, and none sent twice.
        let (status, status_time) = loop {
            let asked = Instant::now();
            let status = cluster.campaign_status(&created.id).await?;
            if status.fallback_sent >= sms as u64 && status.fallback_pending == 0 {
                break (status, asked.elapsed());
            }
            anyhow::ensure!(
                t0.elapsed() < plan.deadline,
                "campaign {}: {} of {sms} fallbacks recorded as sent after {:?}",
                created.id,
                status.fallback_sent,
                plan.deadline
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        anyhow::ensure!(
            status.stored == agents as u64 && status.fallback_failed == 0,
            "campaign {}: status counts {} stored (of {agents}), {} fallbacks failed",
            created.id,
            status.stored,
            status.fallback_failed
        );
        let requests = gateway.since(gateway_before);
        let distinct: HashSet<&str> = requests.iter().map(|r| r.to.as_str()).collect();
        anyhow::ensure!(
            requests.len() == sms && distinct.len() == sms,
            "the gateway took {} SMS for {} numbers, not one for each of {sms}",
            requests.len(),
            distinct.len()
        );
        let times: Vec<Instant> = requests.iter().map(|r| r.at).collect();
        let (sms_rate, sms_bucket) = sms_rates(&times);
        runs.push(Run {
            upload,
            ingest,
            stored,
            last_answer,
            first_sms: times.iter().map(since).min().unwrap_or_default(),
            last_sms: times.iter().map(since).max().unwrap_or_default(),
            sms_rate,
            sms_bucket,
            status: status_time,
            reconnections: swarm.observed.sessions.load(Ordering::SeqCst) - sessions_before,
        });
    }

    let pick = |f: fn(&Run) -> Duration| median(&runs.iter().map(f).collect::<Vec<_>>());
    let each = |f: fn(&Run) -> Duration| {
        runs.iter()
            .map(|r| ms(f(r)))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    let rates = |f: fn(&Run) -> f64| {
        let all: Vec<f64> = runs.iter().map(f).collect();
        (
            median_f64(&all),
            all.iter()
                .map(|r| format!("{r:.0}"))
                .collect::<Vec<_>>()
                .join(" / "),
        )
    };
    let ingest = pick(|r| r.ingest);
    println!(
        "campaign: {rows} rows, {} runs: list uploaded in {} ms ({:.1} MiB), ingested (POST /api/v1/campaigns answered) in {} ms (medians; target ≤ {} ms: {})",
        runs.len(),
        ms(pick(|r| r.upload)),
        list_bytes as f64 / 1048576.0,
        ms(ingest),
        INGEST_TARGET.as_millis(),
        if ingest <= INGEST_TARGET { "met" } else { "not met" }
    );
    println!(
        "campaign: all {agents} `stored` receipts counted by the API (polled every 10 ms) {} ms after the POST, last ReportStored at {} ms (medians)",
        ms(pick(|r| r.stored)),
        ms(pick(|r| r.last_answer))
    );
    let (rate, rate_runs) = rates(|r| r.sms_rate);
    let (bucket, bucket_runs) = rates(|r| r.sms_bucket);
    println!(
        "campaign: {sms} fallback SMS at the gateway from {} to {} ms after the POST: {rate:.0}/s first → last, {bucket:.0}/s median second (medians)",
        ms(pick(|r| r.first_sms)),
        ms(pick(|r| r.last_sms)),
    );
    println!(
        "campaign: status of the campaign (GET /api/v1/messages/{{id}}/status, every row read) answered in {} ms (median)",
        ms(pick(|r| r.status))
    );
    println!(
        "campaign: agents that reconnected during the runs: {}",
        runs.iter().map(|r| r.reconnections).sum::<usize>()
    );
    print_drops("campaign", drops);
    println!("\n| campaign, {rows} rows ({agents} agents, {sms} SMS) | median | each run |");
    println!("|---|---|---|");
    for (figure, median, each) in [
        (
            "list upload, POST /api/v1/lists (ms)".to_string(),
            ms(pick(|r| r.upload)),
            each(|r| r.upload),
        ),
        (
            "ingest, POST /api/v1/campaigns answered (ms)".to_string(),
            ms(ingest),
            each(|r| r.ingest),
        ),
        (
            format!("all {agents} `stored` receipts counted by the API (ms after the POST)"),
            ms(pick(|r| r.stored)),
            each(|r| r.stored),
        ),
        (
            "last ReportStored at an agent (ms after the POST)".to_string(),
            ms(pick(|r| r.last_answer)),
            each(|r| r.last_answer),
        ),
        (
            "first fallback SMS at the gateway (ms after the POST)".to_string(),
            ms(pick(|r| r.first_sms)),
            each(|r| r.first_sms),
        ),
        (
            "last fallback SMS at the gateway (ms after the POST)".to_string(),
            ms(pick(|r| r.last_sms)),
            each(|r| r.last_sms),
        ),
        (
            format!("campaign status, GET /api/v1/messages/{{id}}/status ({rows} rows; ms)"),
            ms(pick(|r| r.status)),
            each(|r| r.status),
        ),
        (
            "fallback SMS/s, first → last".to_string(),
            format!("{rate:.0}"),
            rate_runs,
        ),
        (
            "fallback SMS/s, median whole second".to_string(),
            format!("{bucket:.0}"),
            bucket_runs,
        ),
    ] {
        println!("| {figure} | {median} | {each} |");
    }
    swarm.stop().await;
    cluster.stop(false);
    Ok(())
}

/// The list: a header, then `rows` rows of which `agents`, spread evenly, name a
/// simulated agent (`,sim-I`) and the others a distinct phone number (`+8210…,`).
pub fn list_csv(rows: usize, agents: usize) -> Vec<u8> {
    use std::fmt::Write;
    let mut out = String::with_capacity(16 * rows + 16);
    out.push_str("phone,agent\n");
    let (mut agent, mut phone) = (0, 0);
    for k in 0..rows {
        // Agent rows so far, after this row: rises by at most one a row, to `agents`.
        if (k + 1) * agents / rows > agent {
            let _ = writeln!(out, ",sim-{agent}");
            agent += 1;
        } else {
            let _ = writeln!(out, "{},", phone_number(phone));
            phone += 1;
        }
    }
    out.into_bytes()
}

/// The `k`-th phone number: a valid Korean mobile number in E.164, distinct for every
/// `k` below 80 million.
pub fn phone_number(k: usize) -> String {
    format!("+8210{:08}", 20_000_000 + k)
}

/// SMS per second over a run's requests: count ÷ (last − first), and the median count
/// of the whole seconds from the first request (the overall rate when there is none).
fn sms_rates(times: &[Instant]) -> (f64, f64) {
    let (Some(first), Some(last)) = (times.iter().min(), times.iter().max()) else {
        return (0.0, 0.0);
    };
    let span = last.duration_since(*first);
    let overall = times.len() as f64 / span.as_secs_f64().max(1e-3);
    let whole = span.as_secs() as usize;
    if whole == 0 {
        return (overall, overall);
    }
    let mut buckets = vec![0u64; whole];
    for t in times {
        let second = t.duration_since(*first).as_secs() as usize;
        if let Some(bucket) = buckets.get_mut(second) {
            *bucket += 1;
        }
    }
    let counts: Vec<f64> = buckets.iter().map(|&c| c as f64).collect();
    (overall, median_f64(&counts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_spreads_agents_and_its_numbers_are_valid_and_distinct() {
        let list = String::from_utf8(list_csv(1000, 100)).unwrap();
        let lines: Vec<&str> = list.lines().collect();
        assert_eq!(lines[0], "phone,agent");
        assert_eq!(lines.len(), 1001);
        let agent_rows: Vec<usize> = (1..lines.len())
            .filter(|&i| lines[i].starts_with(','))
            .collect();
        assert_eq!(agent_rows.len(), 100);
        assert_eq!(lines[agent_rows[0]], ",sim-0");
        assert_eq!(lines[agent_rows[99]], ",sim-99");
        // Every tenth row.
        assert!(agent_rows.windows(2).all(|w| w[1] - w[0] == 10));
        let phones: HashSet<&str> = lines[1..]
            .iter()
            .filter_map(|l| l.strip_suffix(','))
            .collect();
        assert_eq!(phones.len(), 900);
        assert_eq!(
            String::from_utf8(list_csv(3, 3)).unwrap().lines().count(),
            4
        );
        assert!(!String::from_utf8(list_csv(3, 0)).unwrap().contains("sim"));
        // As the server reads them: valid numbers, already in E.164.
        for k in [0, 1, 89_999, 999_999] {
            let number = phone_number(k);
            assert_eq!(
                herald_server::model::normalize_phone(&number, None).as_deref(),
                Ok(number.as_str())
            );
        }
    }

    #[test]
    fn sms_rates_count_whole_seconds() {
        let t = Instant::now();
        // 10 in the first second, 20 in the second, 5 in the last half second.
        let mut times: Vec<Instant> = (0..10)
            .map(|i| t + Duration::from_millis(i * 100))
            .collect();
        times.extend((0..20).map(|i| t + Duration::from_millis(1000 + i * 50)));
        times.extend((0..5).map(|i| t + Duration::from_millis(2000 + i * 100)));
        let (overall, bucket) = sms_rates(&times);
        assert!((overall - 35.0 / 2.4).abs() < 1e-9, "{overall}");
        assert_eq!(bucket, 10.0);
        assert_eq!(sms_rates(&[]), (0.0, 0.0));
    }
}
