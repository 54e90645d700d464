//! The delivery queue in the database: finished jobs of users' subscriptions become one
//! `deliveries` row per matching forwarding rule; due deliveries are picked, and every
//! attempt is recorded in `delivery_attempts`. When to retry is a pure function of the
//! attempt count and the time passed in.

use std::time::Duration;

use rusqlite::{params, OptionalExtension, TransactionBehavior};

use herald_shared::Millis;

use crate::store::{Store, StoreError};

use super::message::{excerpt, Facts, STDOUT_EXCERPT_BYTES};

/// Job states that are forwarded; every one is final (`crate::model::is_final_state`).
/// A browser job's `waiting` is not: it is forwarded once the page's outcome is in.
pub const FORWARDED_STATES: [&str; 7] = [
    "succeeded",
    "failed",
    "timed_out",
    "refused",
    "interrupted",
    "expired",
    "canceled",
];

/// Jobs turned into deliveries per transaction.
const ENQUEUE_BATCH: usize = 256;
/// Longest retry wait, however many attempts failed.
pub const MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// Longest attempt detail stored (a status line or an error, not a whole page).
const DETAIL_MAX_CHARS: usize = 500;

/// A destination medium.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// E-mail through `[smtp]`.
    Email,
    /// Signed JSON POST.
    Webhook,
    /// Text through the `[sms]` gateway.
    Sms,
}

impl Kind {
    /// Parses a `destinations.kind` value.
    pub fn parse(kind: &str) -> Option<Kind> {
        match kind {
            "email" => Some(Kind::Email),
            "webhook" => Some(Kind::Webhook),
            "sms" => Some(Kind::Sms),
            _ => None,
        }
    }

    /// The `destinations.kind` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Email => "email",
            Kind::Webhook => "webhook",
            Kind::Sms => "sms",
        }
    }
}

/// How often and how patiently a delivery is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts before giving up (at least 1).
    pub max_attempts: u32,
    /// Wait after the first failure; doubles after each further one, up to
    /// [`MAX_BACKOFF`].
    pub first_retry: Duration,
}

/// What follows an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Delivered: done.
    Sent,
    /// Failed: try again at this time.
    RetryAt(Millis),
    /// Failed for the last time (or for a reason retrying cannot fix).
    GiveUp,
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
}

impl Attempt {
    /// A delivered attempt.
    pub fn sent(detail: impl Into<String>) -> Attempt {
        Attempt {
            ok: true,
            detail: detail.into(),
            permanent: false,
        }
    }

    /// A failed attempt worth retrying.
    pub fn failed(detail: impl Into<String>) -> Attempt {
        Attempt {
            ok: false,
            detail: detail.into(),
            permanent: false,
        }
    }

    /// A failed attempt that retrying cannot fix.
    pub fn refused(detail: impl Into<String>) -> Attempt {
        Attempt {
            ok: false,
            detail: detail.into(),
            permanent: true,
        }
    }
}

/// A delivery ready to be sent.
#[derive(Debug, Clone)]
pub(super) struct Outgoing {
    /// Delivery id.
    pub id: i64,
    /// Medium (`None`: a kind this server does not know).
    pub kind: Option<Kind>,
    /// Address, URL or phone number.
    pub target: String,
    /// The rule's webhook secret. `None` with `rule_exists`: the rule has no secret.
    pub secret: Option<String>,
    /// The rule still exists (a user may delete it while deliveries are pending).
    pub rule_exists: bool,
    /// Attempts made so far.
    pub attempts: u32,
    /// What to say.
    pub facts: Facts,
}

/// Turns finished jobs marked `forward_pending` into deliveries, one per matching rule
/// of the subscription's owner (a rule for that subscription or for all of them; for
/// every result, or only when the job did not succeed), and clears the mark in the
/// same transaction: nothing is lost in a crash and nothing is enqueued twice.
/// Returns how many deliveries were created.
pub fn enqueue(store: &Store, now: Millis) -> Result<usize, StoreError> {
    let states = FORWARDED_STATES
        .iter()
        .map(|s| format!("'{s}'"))
        .collect::<Vec<_>>()
        .join(", ");
    // Usually there is nothing to do: find that out with a read (on the index of
    // `forward_pending`), without taking the write lock.
    let any: Option<i64> = store
        .fast()
        .query_row(
            &format!(
                "SELECT id FROM jobs WHERE forward_pending = 1 AND state IN ({states}) LIMIT 1"
            ),
            [],
            |r| r.get(0),
        )
        .optional()?;
    if any.is_none() {
        return Ok(0);
    }
    let select = format!(
        "SELECT j.id, j.schedule_id, s.owner_user_id, j.state
         FROM jobs j LEFT JOIN schedules s ON s.id = j.schedule_id
         WHERE j.forward_pending = 1 AND j.state IN ({states})
         ORDER BY j.id LIMIT {ENQUEUE_BATCH}"
    );
    let mut created = 0;
    loop {
        let mut conn = store.conn();
        // Immediate: the read and the writes form one snapshot, with no upgrade that a
        // concurrent writer could make fail.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let jobs = {
            let mut stmt = tx.prepare(&select)?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, Option<i64>>(1)?,
                    r.get::<_, Option<i64>>(2)?,
                    r.get::<_, String>(3)?,
                ))
            })?;
            rows.collect::<Result<Vec<_>, _>>()?
        };
        for (job_id, schedule_id, owner, state) in &jobs {
            // A subscription deleted since it fired has no owner any more: nothing to do.
            if let (Some(schedule_id), Some(owner)) = (schedule_id, owner) {
                created += tx.execute(
                    "INSERT INTO deliveries (destination_id, user_id, job_id, kind, target, state,
                                             attempts, next_attempt_at, created_at)
                     SELECT d.id, d.user_id, ?1, d.kind, d.target, 'pending', 0, ?5, ?5
                     FROM destinations d
                     WHERE d.user_id = ?2 AND (d.schedule_id IS NULL OR d.schedule_id = ?3)
                       AND (d.only_failures = 0 OR ?4 <> 'succeeded')
                     ORDER BY d.id",
                    params![job_id, owner, schedule_id, state, now],
                )?;
            }
            tx.execute(
                "UPDATE jobs SET forward_pending = 0 WHERE id = ?1",
                params![job_id],
            )?;
        }
        tx.commit()?;
        if jobs.len() < ENQUEUE_BATCH {
            return Ok(created);
        }
    }
}

/// Pending deliveries due at `now`, oldest due first.
pub(super) fn due(store: &Store, now: Millis, limit: usize) -> Result<Vec<i64>, StoreError> {
    let conn = store.fast();
    let mut stmt = conn.prepare(
        "SELECT id FROM deliveries WHERE state = 'pending' AND next_attempt_at <= ?1
         ORDER BY next_attempt_at, id LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![now, limit as i64], |r| r.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The earliest retry time after `now`, if any delivery waits for one.
pub(super) fn next_due_after(store: &Store, now: Millis) -> Result<Option<Millis>, StoreError> {
    Ok(store.fast().query_row(
        "SELECT MIN(next_attempt_at) FROM deliveries WHERE state = 'pending' AND next_attempt_at > ?1",
        params![now],
        |r| r.get(0),
    )?)
}

/// Loads a pending delivery with what it should say; `None` if it is no longer pending.
pub(super) fn load(store: &Store, delivery_id: i64) -> Result<Option<Outgoing>, StoreError> {
    let conn = store.fast();
    let row = conn
        .query_row(
            "SELECT dl.kind, dl.target, dl.attempts, d.id, d.secret,
                    j.id, j.agent_id, a.name, COALESCE(c.title, s.catalog_name, o.action),
                    j.state, j.exit_code, j.error, j.outcome, j.finished_at, j.stdout
             FROM deliveries dl
             JOIN jobs j ON j.id = dl.job_id
             JOIN agents a ON a.id = j.agent_id
             JOIN orders o ON o.id = j.order_id
             LEFT JOIN destinations d ON d.id = dl.destination_id
             LEFT JOIN schedules s ON s.id = j.schedule_id
             LEFT JOIN catalog c ON c.name = s.catalog_name
             WHERE dl.id = ?1 AND dl.state = 'pending'",
            params![delivery_id],
            |r| {
                let stdout: Option<Vec<u8>> = r.get(14)?;
                Ok(Outgoing {
                    id: delivery_id,
                    kind: Kind::parse(&r.get::<_, String>(0)?),
                    target: r.get(1)?,
                    attempts: r.get::<_, i64>(2)?.max(0) as u32,
                    rule_exists: r.get::<_, Option<i64>>(3)?.is_some(),
                    secret: r.get(4)?,
                    facts: Facts {
                        job_id: r.get(5)?,
                        agent_id: r.get(6)?,
                        agent_name: r.get(7)?,
                        entry: r.get(8)?,
                        state: r.get(9)?,
                        exit_code: r.get(10)?,
                        error: r.get(11)?,
                        outcome: r.get(12)?,
                        finished_at: r.get(13)?,
                        stdout: excerpt(&stdout.unwrap_or_default(), STDOUT_EXCERPT_BYTES),
                    },
                })
            },
        )
        .optional()?;
    Ok(row)
}

/// Records an attempt and moves the delivery on, in one transaction.
pub(super) fn record(
    store: &Store,
    delivery_id: i64,
    attempt: &Attempt,
    next: Next,
    now: Millis,
) -> Result<(), StoreError> {
    let detail: String = attempt.detail.chars().take(DETAIL_MAX_CHARS).collect();
    let mut conn = store.conn();
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute(
        "INSERT INTO delivery_attempts (delivery_id, at, ok, detail) VALUES (?1, ?2, ?3, ?4)",
        params![delivery_id, now, attempt.ok, detail],
    )?;
    match next {
        Next::Sent => tx.execute(
            "UPDATE deliveries SET state = 'sent', attempts = attempts + 1, last_error = NULL,
                    finished_at = ?2
             WHERE id = ?1 AND state = 'pending'",
            params![delivery_id, now],
        )?,
        Next::RetryAt(at) => tx.execute(
            "UPDATE deliveries SET attempts = attempts + 1, next_attempt_at = ?2, last_error = ?3
             WHERE id = ?1 AND state = 'pending'",
            params![delivery_id, at, detail],
        )?,
        Next::GiveUp => tx.execute(
            "UPDATE deliveries SET state = 'given_up', attempts = attempts + 1, last_error = ?3,
                    finished_at = ?2
             WHERE id = ?1 AND state = 'pending'",
            params![delivery_id, now, detail],
        )?,
    };
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: RetryPolicy = RetryPolicy {
        max_attempts: 6,
        first_retry: Duration::from_secs(5),
    };

    #[test]
    fn forwarded_states_are_the_final_ones() {
        for state in FORWARDED_STATES {
            assert!(crate::model::is_final_state(state), "{state}");
        }
        for state in ["queued", "delivered", "running", "waiting"] {
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
