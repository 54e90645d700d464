//! The delivery queue in the database: finished jobs of users' subscriptions become one
//! `deliveries` row per matching confirmed forwarding rule, within the owner's daily
//! limits; due deliveries are picked round-robin by user, every attempt is recorded in
//! `delivery_attempts`, and old deliveries are pruned. When to retry is a pure function
//! of the attempt count and the time passed in.

use std::collections::hash_map::{Entry, HashMap};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use herald_shared::Millis;

use crate::store::{Store, StoreError};

use super::message::{excerpt, Facts, STDOUT_EXCERPT_BYTES};

/// Job states that are forwarded: the ends of runs that happened (a browser service's
/// outcome makes its job `succeeded` or `failed`). Every one is final
/// (`crate::model::is_final_state`); a browser job's `waiting` is not, and is forwarded
/// once the page's outcome is in.
pub const FORWARDED_STATES: [&str; 4] = ["succeeded", "failed", "timed_out", "interrupted"];
/// Final states that are not forwarded: nothing ran (`refused`, whose reason the agent
/// writes; `expired`; `canceled`). Their jobs are only marked handled.
pub const UNFORWARDED_STATES: [&str; 3] = ["refused", "expired", "canceled"];

/// Jobs turned into deliveries per transaction.
const ENQUEUE_BATCH: usize = 256;
/// Longest retry wait, however many attempts failed.
pub const MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// Longest attempt detail stored (a status line or an error, not a whole page).
const DETAIL_MAX_CHARS: usize = 500;
/// The window of the daily limits.
pub(super) const DAY: Duration = Duration::from_secs(24 * 3600);
/// Deliveries (and their attempts) older than this are deleted.
pub const RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
/// Deliveries deleted per transaction when pruning.
const PRUNE_BATCH: usize = 500;
/// Why a delivery over the owner's daily limit is given up.
pub const DAILY_LIMIT_REACHED: &str = "daily limit reached";

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

    /// Rules of this kind forward nothing until confirmed with a code sent through
    /// them. A webhook needs none: its owner controls the endpoint, and every request
    /// carries a signature under a secret only the owner was shown.
    pub fn needs_confirmation(self) -> bool {
        matches!(self, Kind::Email | Kind::Sms)
    }

    /// The kinds that share this kind's daily limit, as an SQL list.
    fn limit_class(self) -> &'static str {
        match self {
            Kind::Email | Kind::Webhook => "'email', 'webhook'",
            Kind::Sms => "'sms'",
        }
    }
}

/// How much one user may have forwarded in a day (the last 24 hours, codes included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DailyLimits {
    /// E-mails and webhook posts together (deliveries and confirmation codes).
    pub email_and_webhook: u32,
    /// SMS (deliveries and confirmation codes).
    pub sms: u32,
}

impl DailyLimits {
    /// The limits of a server that does not say otherwise.
    pub const DEFAULT: DailyLimits = DailyLimits {
        email_and_webhook: 200,
        sms: 20,
    };

    /// The limit that applies to a kind.
    pub fn cap(&self, kind: Kind) -> u32 {
        match kind {
            Kind::Email | Kind::Webhook => self.email_and_webhook,
            Kind::Sms => self.sms,
        }
    }
}

impl Default for DailyLimits {
    fn default() -> Self {
        DailyLimits::DEFAULT
    }
}

/// What a user has used of the daily limit that `kind` falls under, at `now`:
/// deliveries created within the day (not those given up for the limit) and codes sent.
pub(super) fn daily_used(
    conn: &Connection,
    user_id: i64,
    kind: Kind,
    now: Millis,
) -> Result<u32, StoreError> {
    let since = now - DAY.as_millis() as Millis;
    let class = kind.limit_class();
    let used: i64 = conn.query_row(
        &format!(
            "SELECT (SELECT COUNT(*) FROM deliveries
                     WHERE user_id = ?1 AND created_at > ?2 AND over_limit = 0
                       AND kind IN ({class}))
                  + (SELECT COUNT(*) FROM confirmation_codes
                     WHERE user_id = ?1 AND sent_at > ?2 AND kind IN ({class}))"
        ),
        params![user_id, since],
        |r| r.get(0),
    )?;
    Ok(used.clamp(0, u32::MAX as i64) as u32)
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
    /// The rule is confirmed (a rule of a kind that needs it forwards nothing before).
    pub rule_confirmed: bool,
    /// Attempts made so far.
    pub attempts: u32,
    /// What to say.
    pub facts: Facts,
}

/// What one [`enqueue`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Enqueued {
    /// Deliveries queued to be sent.
    pub queued: usize,
    /// Deliveries given up at once because their owner reached a daily limit:
    /// (delivery, job, kind).
    pub over_limit: Vec<(i64, i64, String)>,
}

/// Turns finished jobs marked `forward_pending` into deliveries, one per matching
/// confirmed rule of the subscription's owner (a rule for that subscription or for all
/// of them; for every result, or only when the job did not succeed), and clears the
/// mark in the same transaction: nothing is lost in a crash and nothing is enqueued
/// twice. Jobs in [`UNFORWARDED_STATES`] are only marked handled. A delivery beyond its
/// owner's daily limit is given up at once, with an attempt saying so.
pub fn enqueue(store: &Store, now: Millis, limits: &DailyLimits) -> Result<Enqueued, StoreError> {
    let states = FORWARDED_STATES
        .iter()
        .chain(UNFORWARDED_STATES.iter())
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
    let mut done = Enqueued::default();
    if any.is_none() {
        return Ok(done);
    }
    let select = format!(
        "SELECT j.id, j.schedule_id, s.owner_user_id, j.state
         FROM jobs j LEFT JOIN schedules s ON s.id = j.schedule_id
         WHERE j.forward_pending = 1 AND j.state IN ({states})
         ORDER BY j.id LIMIT {ENQUEUE_BATCH}"
    );
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
        // What each (user, limit) has used, read once per batch and counted on here.
        let mut used: HashMap<(i64, &'static str), u32> = HashMap::new();
        for (job_id, schedule_id, owner, state) in &jobs {
            // A subscription deleted since it fired has no owner any more: nothing to do.
            let forwarded = FORWARDED_STATES.contains(&state.as_str());
            if let (true, Some(schedule_id), Some(owner)) = (forwarded, schedule_id, owner) {
                let rules = matching_rules(&tx, *owner, *schedule_id, state)?;
                for (rule_id, kind_text, target) in rules {
                    let over = match Kind::parse(&kind_text) {
                        Some(kind) => {
                            let count = match used.entry((*owner, kind.limit_class())) {
                                Entry::Occupied(e) => e.into_mut(),
                                Entry::Vacant(e) => e.insert(daily_used(&tx, *owner, kind, now)?),
                            };
                            let over = *count >= limits.cap(kind);
                            if !over {
                                *count += 1;
                            }
                            over
                        }
                        // Unknown kinds are queued, and refused when sent.
                        None => false,
                    };
                    if over {
                        tx.execute(
                            "INSERT INTO deliveries (destination_id, user_id, job_id, kind, target,
                                                     state, attempts, next_attempt_at, last_error,
                                                     created_at, finished_at, over_limit)
                             VALUES (?1, ?2, ?3, ?4, ?5, 'given_up', 1, ?6, ?7, ?6, ?6, 1)",
                            params![
                                rule_id,
                                owner,
                                job_id,
                                kind_text,
                                target,
                                now,
                                DAILY_LIMIT_REACHED
                            ],
                        )?;
                        let delivery = tx.last_insert_rowid();
                        tx.execute(
                            "INSERT INTO delivery_attempts (delivery_id, at, ok, detail)
                             VALUES (?1, ?2, 0, ?3)",
                            params![delivery, now, DAILY_LIMIT_REACHED],
                        )?;
                        done.over_limit.push((delivery, *job_id, kind_text));
                    } else {
                        tx.execute(
                            "INSERT INTO deliveries (destination_id, user_id, job_id, kind, target,
                                                     state, attempts, next_attempt_at, created_at)
                             VALUES (?1, ?2, ?3, ?4, ?5, 'pending', 0, ?6, ?6)",
                            params![rule_id, owner, job_id, kind_text, target, now],
                        )?;
                        done.queued += 1;
                    }
                }
            }
            tx.execute(
                "UPDATE jobs SET forward_pending = 0 WHERE id = ?1",
                params![job_id],
            )?;
        }
        tx.commit()?;
        if jobs.len() < ENQUEUE_BATCH {
            return Ok(done);
        }
    }
}

/// The confirmed rules of `owner` that take a result of this subscription in `state`:
/// (id, kind, target), oldest first.
fn matching_rules(
    conn: &Connection,
    owner: i64,
    schedule_id: i64,
    state: &str,
) -> Result<Vec<(i64, String, String)>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT d.id, d.kind, d.target FROM destinations d
         WHERE d.user_id = ?1 AND (d.schedule_id IS NULL OR d.schedule_id = ?2)
           AND (d.only_failures = 0 OR ?3 <> 'succeeded')
           AND d.confirmed_at IS NOT NULL
         ORDER BY d.id",
    )?;
    let rows = stmt.query_map(params![owner, schedule_id, state], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// A due delivery, with what the forwarder's fairness rules look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Candidate {
    /// Delivery id.
    pub id: i64,
    /// Whose rule it goes out under.
    pub user: i64,
    /// Medium (`None`: unknown).
    pub kind: Option<Kind>,
    /// Address, URL or phone number.
    pub target: String,
}

/// Pending deliveries due at `now`, round-robin by user: every user's earliest due,
/// then every user's second, and so on, at most `per_user` of each user and `limit` in
/// all.
pub(super) fn due(
    store: &Store,
    now: Millis,
    per_user: usize,
    limit: usize,
) -> Result<Vec<Candidate>, StoreError> {
    let conn = store.fast();
    let mut stmt = conn.prepare_cached(
        "SELECT id, user_id, kind, target FROM (
             SELECT id, user_id, kind, target, next_attempt_at,
                    ROW_NUMBER() OVER (PARTITION BY user_id ORDER BY next_attempt_at, id) AS turn
             FROM deliveries WHERE state = 'pending' AND next_attempt_at <= ?1)
         WHERE turn <= ?2
         ORDER BY turn, next_attempt_at, id LIMIT ?3",
    )?;
    let rows = stmt.query_map(params![now, per_user as i64, limit as i64], |r| {
        Ok(Candidate {
            id: r.get(0)?,
            user: r.get(1)?,
            kind: Kind::parse(&r.get::<_, String>(2)?),
            target: r.get(3)?,
        })
    })?;
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
                    j.state, j.exit_code, j.error, j.outcome, j.finished_at, j.stdout,
                    d.confirmed_at
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
                    rule_confirmed: r.get::<_, Option<Millis>>(15)?.is_some(),
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

/// Deletes finished deliveries created more than [`RETENTION`] before `now`, with their
/// attempts, and the counts of codes sent as long ago, a batch per transaction (so
/// the write lock is never held long). Returns how many deliveries went.
pub fn prune(store: &Store, now: Millis) -> Result<usize, StoreError> {
    let cutoff = now - RETENTION.as_millis() as Millis;
    store.conn().execute(
        "DELETE FROM confirmation_codes WHERE sent_at < ?1",
        params![cutoff],
    )?;
    let mut deleted = 0;
    loop {
        let mut conn = store.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let ids: Vec<i64> = {
            let mut stmt = tx.prepare_cached(
                "SELECT id FROM deliveries WHERE created_at < ?1 AND state <> 'pending'
                 ORDER BY created_at LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![cutoff, PRUNE_BATCH as i64], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        for id in &ids {
            tx.execute(
                "DELETE FROM delivery_attempts WHERE delivery_id = ?1",
                params![id],
            )?;
            tx.execute("DELETE FROM deliveries WHERE id = ?1", params![id])?;
        }
        tx.commit()?;
        deleted += ids.len();
        if ids.len() < PRUNE_BATCH {
            return Ok(deleted);
        }
    }
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
