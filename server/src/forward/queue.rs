//! The delivery queue's policy: finished jobs of users' subscriptions become one
//! delivery per matching confirmed forwarding rule, within the owner's daily limits
//! (`Store::enqueue_deliveries`); when a failed attempt is retried is a pure function of
//! the attempt count and the time passed in; deliveries older than [`RETENTION`] are
//! pruned. The rows themselves are the store's (`store::forwarding`).

use std::time::Duration;

use herald_shared::Millis;

use crate::model::{DailyLimits, Enqueued, Next};
use crate::store::{Store, StoreError};

/// Longest retry wait, however many attempts failed.
pub const MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// Deliveries (and their attempts) older than this are deleted.
pub const RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// How often and how patiently a delivery is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts before giving up (at least 1).
    pub max_attempts: u32,
    /// Wait after the first failure; doubles after each further one, up to
    /// [`MAX_BACKOFF`].
    pub first_retry: Duration,
}

/// The wait after the `failures`-th consecutive failure (1 = the first).
pub fn backoff(failures: u32, policy: &RetryPolicy) -> Duration {
    let doublings = failures.saturating_sub(1).min(31);
    policy
        .first_retry
        .saturating_mul(1u32 << doublings)
        .min(MAX_BACKOFF)
}

/// Decides what follows an attempt, given how many attempts came before it.
pub fn next_step(
    attempts_before: u32,
    ok: bool,
    permanent: bool,
    now: Millis,
    policy: &RetryPolicy,
) -> Next {
    let attempts = attempts_before.saturating_add(1);
    if ok {
        Next::Sent
    } else if permanent || attempts >= policy.max_attempts {
        Next::GiveUp
    } else {
        let wait = backoff(attempts, policy).as_millis() as Millis;
        Next::RetryAt(now.saturating_add(wait))
    }
}

/// The outcome of one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// Delivered.
    pub ok: bool,
    /// Status code, SMTP reply or error, as shown in the console.
    pub detail: String,
    /// Retrying cannot help (no gateway configured, rule deleted, bad address).
    pub permanent: bool,
    /// The request may have reached the endpoint, but no answer came (a timeout, or
    /// the connection broke after it was made): whether it was taken is unknown, so a
    /// retry may deliver it twice. Forwarded results retry anyway; campaign fallbacks,
    /// which must never go out twice, do not.
    pub unanswered: bool,
}

impl Attempt {
    /// A delivered attempt.
    pub fn sent(detail: impl Into<String>) -> Attempt {
        Attempt {
            ok: true,
            detail: detail.into(),
            permanent: false,
            unanswered: false,
        }
    }

    /// A failed attempt worth retrying.
    pub fn failed(detail: impl Into<String>) -> Attempt {
        Attempt {
            ok: false,
            detail: detail.into(),
            permanent: false,
            unanswered: false,
        }
    }

    /// A failed attempt that retrying cannot fix.
    pub fn refused(detail: impl Into<String>) -> Attempt {
        Attempt {
            ok: false,
            detail: detail.into(),
            permanent: true,
            unanswered: false,
        }
    }

    /// An attempt with no answer, which may or may not have been delivered (see
    /// [`Attempt::unanswered`](Attempt#structfield.unanswered)).
    pub fn unanswered(detail: impl Into<String>) -> Attempt {
        Attempt {
            ok: false,
            detail: detail.into(),
            permanent: false,
            unanswered: true,
        }
    }
}

/// Turns finished jobs marked `forward_pending` into deliveries under the daily
/// `limits` (see `Store::enqueue_deliveries`): one transaction per batch, so nothing
/// is lost in a crash and nothing is enqueued twice.
pub fn enqueue(store: &Store, now: Millis, limits: &DailyLimits) -> Result<Enqueued, StoreError> {
    store.enqueue_deliveries(now, limits)
}

/// Deletes finished deliveries created more than [`RETENTION`] before `now`, with their
/// attempts, and the counts of codes sent as long ago. Returns how many deliveries went.
pub fn prune(store: &Store, now: Millis) -> Result<usize, StoreError> {
    store.prune_deliveries(now - RETENTION.as_millis() as Millis)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{FORWARDED_STATES, UNFORWARDED_STATES};

    const POLICY: RetryPolicy = RetryPolicy {
        max_attempts: 6,
        first_retry: Duration::from_secs(5),
    };

    #[test]
    fn forwarded_states_are_the_final_ones_of_runs_that_happened() {
        for state in FORWARDED_STATES.iter().chain(UNFORWARDED_STATES.iter()) {
            assert!(
                state
                    .parse::<crate::model::JobState>()
                    .is_ok_and(|s| s.is_final()),
                "{state}"
            );
        }
        // Every final state is one or the other, so every finished job is handled.
        for state in [
            "succeeded",
            "failed",
            "timed_out",
            "refused",
            "interrupted",
            "expired",
            "canceled",
        ] {
            assert!(
                FORWARDED_STATES.contains(&state) != UNFORWARDED_STATES.contains(&state),
                "{state}"
            );
        }
        for state in ["queued", "delivered", "running", "waiting", "refused"] {
            assert!(!FORWARDED_STATES.contains(&state), "{state}");
        }
    }

    #[test]
    fn backoff_doubles_from_the_first_retry_and_is_capped_at_an_hour() {
        let waits: Vec<u64> = (1..=6).map(|n| backoff(n, &POLICY).as_secs()).collect();
        assert_eq!(waits, [5, 10, 20, 40, 80, 160]);
        assert_eq!(backoff(12, &POLICY), MAX_BACKOFF);
        assert_eq!(backoff(u32::MAX, &POLICY), MAX_BACKOFF);
    }

    #[test]
    fn failures_are_retried_until_max_attempts_then_given_up() {
        let now = 1_000_000;
        assert_eq!(next_step(0, true, false, now, &POLICY), Next::Sent);
        assert_eq!(next_step(5, true, false, now, &POLICY), Next::Sent);
        assert_eq!(
            next_step(0, false, false, now, &POLICY),
            Next::RetryAt(now + 5_000)
        );
        assert_eq!(
            next_step(4, false, false, now, &POLICY),
            Next::RetryAt(now + 80_000)
        );
        assert_eq!(next_step(5, false, false, now, &POLICY), Next::GiveUp);
        assert_eq!(next_step(0, false, true, now, &POLICY), Next::GiveUp);
        let once = RetryPolicy {
            max_attempts: 1,
            ..POLICY
        };
        assert_eq!(next_step(0, false, false, now, &once), Next::GiveUp);
    }
}
