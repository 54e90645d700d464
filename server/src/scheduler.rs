//! The scheduler: fires schedules when they fall due, expires jobs whose TTL passed and
//! releases splayed deliveries. It sleeps until the earliest deadline in the store (an
//! indexed `MIN`), or until told that schedules changed; it never polls at a fixed rate.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tracing::{info, warn};

use herald_shared::schedule::{self, Missed};
use herald_shared::Millis;

use crate::now_ms;
use crate::relay::Relay;
use crate::store::{DueSchedule, Store, StoreError};

/// An occurrence is "due" rather than "missed" within this much of its time.
const GRACE_MS: i64 = 5_000;
/// Extra spacing beyond a standing order's minimum interval, for delivery jitter.
const INTERVAL_MARGIN_MS: i64 = 100;
/// Longest sleep, as a guard against clock jumps (the wall clock may step).
const MAX_SLEEP: Duration = Duration::from_secs(60);
/// Pause after a store error before trying again.
const ERROR_BACKOFF: Duration = Duration::from_secs(1);

/// Runs until `shutdown` resolves. `changed` is notified when schedules or jobs with
/// deadlines are added.
pub async fn run(
    store: Store,
    relay: Arc<Relay>,
    changed: Arc<Notify>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut released_until = now_ms();
    loop {
        let now = now_ms();
        let sleep = match tick(&store, &relay, now, released_until) {
            Ok(next) => {
                released_until = now;
                next.map(|at| Duration::from_millis((at - now).max(0) as u64))
                    .unwrap_or(MAX_SLEEP)
                    .min(MAX_SLEEP)
            }
            Err(e) => {
                warn!("scheduler: {e}");
                ERROR_BACKOFF
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(sleep) => {}
            _ = changed.notified() => {}
            _ = &mut shutdown => return,
        }
    }
}

/// Does everything due at `now`; returns the next deadline.
fn tick(
    store: &Store,
    relay: &Relay,
    now: Millis,
    released_until: Millis,
) -> Result<Option<Millis>, StoreError> {
    for due in store.due_schedules(now)? {
        fire(store, relay, &due, now)?;
    }
    let expired = store.expire(now)?;
    if expired > 0 {
        info!(expired, "jobs expired before delivery");
        // Long polls re-read job state on any event; job id 0 means "several".
        relay.job_changed(0);
    }
    for agent in store.agents_with_due_jobs(now, released_until)? {
        relay.poke(&agent);
    }
    let next_fire = store.next_fire_at()?;
    let next_job = store.next_job_deadline(now)?;
    Ok([next_fire, next_job].into_iter().flatten().min())
}

fn fire(store: &Store, relay: &Relay, due: &DueSchedule, now: Millis) -> Result<(), StoreError> {
    let (fire_now, next) =
        schedule::due(&due.schedule, due.next_fire_at, now, due.missed, GRACE_MS);
    let mut agents = Vec::new();
    if fire_now {
        for agent in store.expand(&due.audience)? {
            let online = relay.is_online(&agent);
            let keep = match due.missed {
                // An offline agent misses this occurrence.
                Missed::Skip => online,
                // Coalesce: at most one waiting job per agent and schedule.
                Missed::RunOnce => !store.has_queued_from_schedule(&agent, due.id)?,
            };
            if keep {
                let mut deliver_after = now + splay(&agent, due.id, due.next_fire_at, due.splay_ms);
                // A catch-up run delivered on reconnect may sit just before this
                // occurrence; the agent would refuse a second run inside the signed
                // minimum interval, so hold this one back until it is allowed.
                if due.min_interval_ms > 0 {
                    if let Some(last) = store.last_delivery_from_schedule(&agent, due.id)? {
                        deliver_after = deliver_after
                            .max(last + due.min_interval_ms as i64 + INTERVAL_MARGIN_MS);
                    }
                }
                agents.push((agent, deliver_after));
            }
        }
    }
    let ids = store.fire(due, &agents, next, now)?;
    if fire_now {
        info!(schedule = due.id, jobs = ids.len(), next = ?next.map(schedule::format_time), "schedule fired");
    }
    for (agent, deliver_after) in &agents {
        if *deliver_after <= now {
            relay.poke(agent);
        }
    }
    Ok(())
}

/// A stable per-agent delay in `[0, splay_ms)`, so a large fan-out is spread out but the
/// same agent lands at the same offset every time.
fn splay(agent: &str, schedule_id: i64, occurrence: Millis, splay_ms: u64) -> Millis {
    if splay_ms == 0 {
        return 0;
    }
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    hasher.update(agent.as_bytes());
    hasher.update(schedule_id.to_be_bytes());
    hasher.update(occurrence.to_be_bytes());
    let digest = hasher.finalize();
    let value = u64::from_be_bytes(digest[..8].try_into().expect("8 bytes of a 32-byte digest"));
    (value % splay_ms) as Millis
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splay_is_bounded_and_stable() {
        for i in 0..100 {
            let agent = format!("agent{i}");
            let d = splay(&agent, 1, 1000, 5000);
            assert!((0..5000).contains(&d));
            assert_eq!(d, splay(&agent, 1, 1000, 5000));
        }
        assert_eq!(splay("a", 1, 1000, 0), 0);
    }
}
