//! Campaign fallbacks: when a row's time comes, the store decides it (not needed,
//! skipped, or pending), and pending ones go out through the same SMS gateway and SMTP
//! relay as forwarded results, with the same timeout, retries and backoff. They are
//! taken in batches of as many as are sent at once (`fallback_concurrency`): claimed
//! (`sending`) in one transaction, all sent together, recorded in one transaction.
//!
//! A fallback never goes out twice (an SMS costs money, and a person texted twice
//! blames the sender). So one that was being sent when the server died is not sent
//! again: it stays `interrupted`. That is why a batch is no larger than what is sent at
//! once: a row claimed but still waiting for a send slot would be interrupted by a
//! crash too, and lost, though it never went out. And a send that got no answer (a
//! timeout, or a connection lost after it was made) is not retried but `failed`: the
//! gateway may have taken it. Only a refusal the gateway answered, or a connection
//! that was never made, is retried.

use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

use super::send::Senders;
use super::{millis_until, RetryPolicy, Settings};
use crate::model::{Fallback, FallbackSend};
use crate::store::{FallbackOutcome, Store};

/// Rows decided in one transaction.
const DECIDE_BATCH: u32 = 1000;
/// Most fallbacks claimed in one transaction (fewer if fewer are sent at once).
const SEND_BATCH: u32 = 256;
/// Delivery reports are kept this long for a send that has not been recorded.
const REPORT_RETENTION_MS: i64 = 30 * 24 * 3_600_000;

/// Runs until `stop` turns true. `wake` is notified when a campaign is created.
pub(super) async fn run(
    store: Store,
    senders: Arc<Senders>,
    settings: Settings,
    wake: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    match store.interrupt_fallbacks() {
        Ok(0) => {}
        Ok(n) => warn!(
            fallbacks = n,
            "campaign fallbacks were being sent when the server stopped; they are marked interrupted and not sent again"
        ),
        Err(e) => warn!(error = %e, "campaign fallbacks: cannot mark interrupted sends"),
    }
    let mut next_prune = tokio::time::Instant::now();
    loop {
        if *stop.borrow() {
            return;
        }
        if tokio::time::Instant::now() >= next_prune {
            next_prune += super::PRUNE_INTERVAL;
            let before = crate::now_ms() - REPORT_RETENTION_MS;
            if let Err(e) = store.prune_sms_reports(before) {
                warn!(error = %e, "campaign fallbacks: cannot prune old delivery reports");
            }
        }
        let busy = match step(&store, &senders, &settings).await {
            Ok(busy) => busy,
            Err(e) => {
                warn!(error = %e, "campaign fallbacks: cannot read the queue; retrying");
                false
            }
        };
        if busy {
            continue;
        }
        let now = crate::now_ms();
        let mut sleep = settings.scan_interval;
        if let Ok(Some(at)) = store.next_fallback_at() {
            sleep = sleep.min(millis_until(now, at).max(Duration::from_millis(5)));
        }
        tokio::select! {
            // The forwarder that started this loop is gone (stopped, or no longer the
            // cluster's leader): so is this loop.
            changed = stop.changed() => if changed.is_err() {
                return;
            },
            _ = wake.notified() => {}
            _ = tokio::time::sleep(sleep) => {}
        }
    }
}

/// Decides what is due and sends one batch. Returns whether there may be more to do
/// at once.
async fn step(
    store: &Store,
    senders: &Arc<Senders>,
    settings: &Settings,
) -> Result<bool, crate::store::StoreError> {
    let now = crate::now_ms();
    let decided = store.decide_fallbacks(now, DECIDE_BATCH, settings.fallback_per_sender_day)?;
    // Only as many as go out at once: every claimed row is being sent from now on, so
    // a crash interrupts no row that was still waiting (see the module doc).
    let at_once = settings.fallback_concurrency.clamp(1, SEND_BATCH as usize);
    let claimed = store.claim_fallbacks(now, at_once as u32)?;
    if claimed.is_empty() {
        return Ok(decided as u32 == DECIDE_BATCH);
    }
    let policy = settings.retry;
    let outcomes: Vec<FallbackOutcome> = stream::iter(claimed)
        .map(|send| {
            let senders = senders.clone();
            async move { send_one(&senders, send, &policy).await }
        })
        .buffer_unordered(at_once)
        .collect()
        .await;
    let sent = outcomes
        .iter()
        .filter(|o| matches!(o.next, crate::model::Next::Sent))
        .count();
    info!(
        sent,
        attempted = outcomes.len(),
        "campaign fallbacks handed to the gateway or relay"
    );
    store.record_fallbacks(&outcomes, crate::now_ms())?;
    Ok(true)
}

async fn send_one(senders: &Senders, send: FallbackSend, policy: &RetryPolicy) -> FallbackOutcome {
    let (attempt, gateway_id) = match send.kind {
        Fallback::Sms => {
            senders
                .bounded_with_id(senders.sms_with_id(&send.target, &send.text))
                .await
        }
        Fallback::Email => (
            senders
                .bounded(senders.email(&send.target, &send.subject, send.text.clone()))
                .await,
            None,
        ),
        Fallback::None => (
            super::Attempt::refused("the campaign has no fallback medium"),
            None,
        ),
    };
    // No answer: it may have gone out, and it must not go out twice.
    let give_up = attempt.unanswered;
    let next = super::next_step(
        send.attempts,
        attempt.ok,
        attempt.permanent || give_up,
        crate::now_ms(),
        policy,
    );
    let detail = if give_up {
        format!(
            "{}; not sent again: the gateway or relay may have taken it, and a fallback never goes out twice",
            attempt.detail
        )
    } else {
        attempt.detail
    };
    if !attempt.ok {
        warn!(
            campaign = %send.campaign,
            line = send.line,
            kind = send.kind.as_str(),
            detail = %detail,
            "campaign fallback not sent"
        );
    }
    FallbackOutcome {
        campaign: send.campaign,
        line: send.line,
        next,
        detail,
        gateway_id,
    }
}
