//! The push-message scenario: one sender-signed message to `all`, and every simulated
//! agent's signed `stored` receipt back into the server's database.
//!
//! What is timed, per run, from just before `POST /api/v1/messages`:
//!
//! - **all received**: the last agent has the message's signal (comparable to the
//!   broadcast figure and to Mosquitto's fan-out).
//! - **all stored**: the server's API counts N `stored` receipts for the message. The
//!   benchmark polls `GET /api/v1/messages?sender=S&limit=1` every 10 ms (the counts of
//!   `GET /api/v1/messages/{id}`, without its one row per recipient); so this figure is
//!   late by at most one poll interval and one request.
//! - **receipts committed per second**: the relay answers `ReportStored` only after it
//!   committed the receipt, so the agents' arrival times of those answers bound each
//!   commit from above: N / (last answer − first answer), and N over the whole run.
//!
//! The simulated agents keep no inbox: a real agent writes the message to its own disk
//! before it signs the receipt, which this leaves out.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use herald_shared::envelope::Audience;

use crate::cluster::{udp_receive_drops, Cluster};
use crate::scenarios::{print_drops, Figures, Plan};
use crate::stats::{median, median_f64, ms, percentile};
use crate::swarm::Swarm;

/// How often the benchmark asks the API for the message's counts.
const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// How often a slow run says how far it got.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(5);
/// The benchmark's sender name.
pub(crate) const SENDER: &str = "bench";

/// One run's figures.
struct Run {
    /// The API call returned (the message is stored and handed to the relay).
    accepted: Duration,
    /// The last agent had the signal.
    received: Duration,
    /// The API counted every `stored` receipt.
    stored: Duration,
    /// First and last `ReportStored` answer at an agent.
    first_answer: Duration,
    last_answer: Duration,
    /// Sessions the swarm's agents opened during the run (a dropped link reconnects and
    /// resends its unanswered receipts).
    reconnections: usize,
}

/// Sends `plan.broadcast_runs` messages to all `plan.agents` agents, one after another,
/// each once every receipt of the previous one is committed.
pub async fn messages(
    cluster: &Cluster,
    swarm: &Swarm,
    plan: &Plan,
    figures: &mut Figures,
) -> anyhow::Result<()> {
    let n = plan.agents;
    let sender = cluster.add_sender(SENDER).await?;
    let drops = udp_receive_drops();
    let mut runs = Vec::with_capacity(plan.broadcast_runs);
    let mut latencies = Vec::new();
    let mut last_id = None;
    for _ in 0..plan.broadcast_runs {
        let arrivals_before = swarm.arrival_count();
        let answers_before = swarm.reports_stored_count();
        let sessions_before = swarm.observed.sessions.load(Ordering::SeqCst);
        let t0 = Instant::now();
        let created = cluster.send_message(&sender, Audience::All).await?;
        let accepted = t0.elapsed();
        anyhow::ensure!(
            created.addressed == n as u64,
            "the message was addressed to {} agents, not {n}",
            created.addressed
        );
        let mut report = Instant::now();
        let stored = loop {
            let info = cluster.newest_message(SENDER).await?;
            if let Some(info) = info.filter(|m| m.id == created.id) {
                if info.counts.stored >= n as u64 {
                    break t0.elapsed();
                }
                if report.elapsed() >= PROGRESS_INTERVAL {
                    println!(
                        "messages: after {:.0} s, {} of {n} receipts stored, {} signals received, {} ReportStored answers, {} reconnections so far",
                        t0.elapsed().as_secs_f64(),
                        info.counts.stored,
                        swarm.arrival_count() - arrivals_before,
                        swarm.reports_stored_count() - answers_before,
                        swarm.observed.sessions.load(Ordering::SeqCst) - sessions_before
                    );
                    report = Instant::now();
                }
                anyhow::ensure!(
                    t0.elapsed() < plan.deadline,
                    "message {}: {} of {n} stored receipts after {:?}",
                    created.id,
                    info.counts.stored,
                    plan.deadline
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        };
        let answers = swarm
            .wait_reports_stored(answers_before, n, plan.deadline)
            .await?;
        let arrivals = swarm.arrivals_since(arrivals_before);
        anyhow::ensure!(
            arrivals.len() >= n,
            "only {} of {n} agents recorded the message's signal",
            arrivals.len()
        );
        let run: Vec<Duration> = arrivals.iter().map(|a| a.at.duration_since(t0)).collect();
        let received = run.iter().copied().max().unwrap_or_default();
        latencies.extend(run);
        let since = |at: &Instant| at.duration_since(t0);
        runs.push(Run {
            accepted,
            received,
            stored,
            first_answer: answers.iter().map(since).min().unwrap_or_default(),
            last_answer: answers.iter().map(since).max().unwrap_or_default(),
            reconnections: swarm.observed.sessions.load(Ordering::SeqCst) - sessions_before,
        });
        last_id = Some(created.id);
    }
    // Once, not in the poll: the full detail lists every recipient.
    if let Some(id) = last_id {
        let detail = cluster.message(&id).await?;
        anyhow::ensure!(
            detail.info.counts.stored == n as u64,
            "GET /api/v1/messages/{id} counts {} stored receipts, not {n}",
            detail.info.counts.stored
        );
    }

    let pick = |f: fn(&Run) -> Duration| median(&runs.iter().map(f).collect::<Vec<_>>());
    let stored = pick(|r| r.stored);
    let received = pick(|r| r.received);
    figures.messages_received = Some(received);
    figures.messages_stored = Some(stored);
    let commit_rates: Vec<f64> = runs
        .iter()
        .map(|r| n as f64 / (r.last_answer - r.first_answer).as_secs_f64().max(1e-6))
        .collect();
    let overall_rates: Vec<f64> = runs
        .iter()
        .map(|r| n as f64 / r.last_answer.as_secs_f64())
        .collect();
    println!(
        "messages: {n} agents, {} runs: API call answered in {} ms, all received in {} ms, all `stored` receipts counted by the API (polled every 10 ms) in {} ms (medians)",
        runs.len(),
        ms(pick(|r| r.accepted)),
        ms(received),
        ms(stored)
    );
    println!(
        "messages: signal at the agent per agent p50 {} ms, p99 {} ms",
        ms(percentile(&latencies, 50.0)),
        ms(percentile(&latencies, 99.0))
    );
    println!(
        "messages: receipts committed {:.0}/s between the first and last ReportStored, {:.0}/s over the whole run (medians); last ReportStored at {} ms",
        median_f64(&commit_rates),
        median_f64(&overall_rates),
        ms(pick(|r| r.last_answer))
    );
    println!(
        "messages: each run, received / last ReportStored / counted stored: {}",
        runs.iter()
            .map(|r| format!(
                "{} / {} / {} ms",
                ms(r.received),
                ms(r.last_answer),
                ms(r.stored)
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "messages: agents that reconnected during the runs (their link dropped; receipts resent): {}",
        runs.iter().map(|r| r.reconnections).sum::<usize>()
    );
    print_drops("messages", drops);
    Ok(())
}
