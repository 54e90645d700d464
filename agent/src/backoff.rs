//! When to try again: the reconnect delays of the agent's link to the server (and of the
//! user-session helper's link to the agent, and of the bench swarm, which copies the
//! agent).
//!
//! Full-jitter exponential backoff, reset only after a connection stayed up for
//! [`STABLE_PERIOD`]; a stopping server may instead name a window to come back in, and
//! then a random point of that window replaces the backoff.

use std::ops::Range;
use std::time::Duration;

/// First backoff ceiling.
pub const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// Highest backoff ceiling.
pub const BACKOFF_CAP: Duration = Duration::from_secs(60);
/// A connection that lasted this long resets the backoff.
pub const STABLE_PERIOD: Duration = Duration::from_secs(30);

/// Full-jitter exponential backoff: a random delay in `[0, min(cap, base * 2^attempt))`.
pub fn backoff(attempt: u32, base: Duration, cap: Duration, random: u64) -> Duration {
    let ceiling = base
        .saturating_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX))
        .min(cap);
    let ceiling_ms = ceiling.as_millis().max(1) as u64;
    Duration::from_millis(random % ceiling_ms)
}

/// How long to wait before the next connection attempt, advancing `attempt`: a random
/// point of the window a stopping server gave (a planned restart; the backoff starts
/// afresh), else full-jitter backoff.
pub fn next_delay(
    window: Option<Range<Duration>>,
    attempt: &mut u32,
    base: Duration,
    cap: Duration,
    random: u64,
) -> Duration {
    let delay = match window {
        Some(window) => {
            *attempt = 0;
            let spread = (window.end - window.start).as_millis() as u64;
            window.start + Duration::from_millis(random % spread.max(1))
        }
        None => backoff(*attempt, base, cap, random),
    };
    *attempt = attempt.saturating_add(1);
    delay
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reconnect_window_replaces_the_backoff_and_restarts_it() {
        let base = Duration::from_millis(500);
        let cap = Duration::from_secs(60);
        let window = Duration::from_secs(3)..Duration::from_secs(8);
        let mut attempt = 6;
        for random in [0, 1, 4_999, 5_000, u64::MAX] {
            attempt = 6;
            let delay = next_delay(Some(window.clone()), &mut attempt, base, cap, random);
            assert!(window.contains(&delay), "{delay:?} outside {window:?}");
            assert_eq!(attempt, 1, "the backoff starts afresh after a window");
        }
        // An empty window (one agent) is its start.
        let at = Duration::from_secs(2)..Duration::from_secs(2);
        assert_eq!(
            next_delay(Some(at), &mut attempt, base, cap, 7),
            Duration::from_secs(2)
        );
        // Without a window: the backoff of the attempt, which then advances.
        attempt = 3;
        let delay = next_delay(None, &mut attempt, base, cap, 12_345);
        assert_eq!(delay, backoff(3, base, cap, 12_345));
        assert_eq!(attempt, 4);
    }

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let base = Duration::from_millis(500);
        let cap = Duration::from_secs(60);
        for attempt in 0..40 {
            for random in [0u64, 1, 12345, u64::MAX] {
                let d = backoff(attempt, base, cap, random);
                let ceiling = (500u128 << attempt.min(20)).min(60_000);
                assert!(d.as_millis() < ceiling, "attempt {attempt}: {d:?}");
            }
        }
        // Jitter: different random input, different delay.
        assert_ne!(backoff(5, base, cap, 1), backoff(5, base, cap, 7777));
    }
}
