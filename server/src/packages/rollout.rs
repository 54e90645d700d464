//! The rollout driver: turns a newly published release (or a new subscription) into
//! rollouts, and moves rollouts wave by wave as install results arrive.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, Notify};
use tracing::{info, warn};

use crate::now_ms;
use crate::relay::Relay;
use crate::store::{Store, StoreError};

/// How often rollouts are re-checked when nothing happens (job expiry, for one).
const TICK: Duration = Duration::from_secs(2);
/// How often subscriptions are checked for agents that joined their audience.
const CATCH_UP: Duration = Duration::from_secs(10);

/// Starts a rollout for every subscription to `package` and every platform among its
/// targets that has a published release it has not rolled out yet. Returns the rollout
/// ids started.
pub fn start_for_package(store: &Store, package: &str) -> Result<Vec<i64>, StoreError> {
    let now = now_ms();
    let mut started = Vec::new();
    for subscription in store.subscriptions(Some(package))? {
        if subscription.target.is_empty() {
            continue;
        }
        let targets = store.subscription_targets(&subscription.target)?;
        let mut platforms: Vec<&str> = targets.iter().map(|(_, p)| p.as_str()).collect();
        platforms.sort_unstable();
        platforms.dedup();
        for platform in platforms {
            let Some(release) = store.latest_release(package, platform)? else {
                continue;
            };
            let agents: Vec<String> = targets
                .iter()
                .filter(|(_, p)| p == platform)
                .map(|(a, _)| a.clone())
                .collect();
            if let Some((id, state, covered)) = store.rollout_for(subscription.id, release.id)? {
                // Agents that joined the audience since: onto the end of that rollout.
                let joined: Vec<String> = agents
                    .into_iter()
                    .filter(|a| !covered.contains(a))
                    .collect();
                let open = ["running", "paused", "halted", "completed"].contains(&state.as_str());
                if open && !joined.is_empty() {
                    store.extend_rollout(id, &joined, now)?;
                    info!(
                        rollout = id,
                        package,
                        agents = joined.len(),
                        "agents joined a rollout"
                    );
                }
                continue;
            }
            let id = store.start_rollout(subscription.id, release.id, &agents, now)?;
            info!(
                rollout = id,
                package,
                version = %release.version,
                platform,
                agents = agents.len(),
                "rollout started"
            );
            started.push(id);
        }
    }
    Ok(started)
}

/// Every subscribed package, for the periodic check for agents that joined an audience.
fn catch_up(store: &Store) -> Result<(), StoreError> {
    let mut packages: Vec<String> = store
        .subscriptions(None)?
        .into_iter()
        .filter(|s| !s.target.is_empty())
        .map(|s| s.package)
        .collect();
    packages.sort();
    packages.dedup();
    for package in packages {
        start_for_package(store, &package)?;
    }
    Ok(())
}

/// Advances rollouts whenever a job changes (and every [`TICK`]) until `shutdown`; on
/// each tick, agents that joined a subscription's audience are added to its rollout.
pub async fn run(
    store: Store,
    relay: Arc<Relay>,
    wake: Arc<Notify>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut events = relay.subscribe();
    let mut last_catch_up = tokio::time::Instant::now();
    tokio::pin!(shutdown);
    loop {
        // Checked on every pass, not only when idle: a busy server has events all the time.
        if last_catch_up.elapsed() >= CATCH_UP {
            last_catch_up = tokio::time::Instant::now();
            if let Err(e) = catch_up(&store) {
                warn!("checking subscriptions for new agents: {e}");
            }
        }
        match store.advance_rollouts(now_ms()) {
            Ok(advance) => {
                for agent in &advance.poke {
                    relay.poke(agent);
                }
                for (id, reason) in &advance.halted {
                    warn!(rollout = id, %reason, "rollout halted");
                }
            }
            Err(e) => warn!("advancing rollouts: {e}"),
        }
        tokio::select! {
            _ = &mut shutdown => return,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(TICK) => {}
            event = events.recv() => {
                if let Err(broadcast::error::RecvError::Closed) = event {
                    return;
                }
                // One pass covers every change that arrived meanwhile.
                while events.try_recv().is_ok() {}
            }
        }
    }
}
