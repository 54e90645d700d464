//! Forwarding's rows: users' rules (`destinations`) and the codes that confirm them
//! (`confirmation_codes` counts the codes sent), and the delivery queue (`deliveries`,
//! one per finished job and matching rule, with every attempt in `delivery_attempts`).
//!
//! The forwarder (`crate::forward`) decides what to send when (retries, backoff, which
//! limits apply, how long deliveries are kept) and passes those decisions in; each
//! method here is one step on the rows, in one transaction where a step reads and
//! writes, so that a crash loses nothing and nothing is queued or sent twice.
//!
//! Ownership is decided here, in SQL: every query a user's request leads to takes the
//! user id, and another user's rule is `NotFound`.

use std::collections::hash_map::{Entry, HashMap};

use super::sql::{params, Connection, OptionalExtension, TransactionBehavior};

use herald_shared::Millis;

use crate::model::{
    check_code, code_expiry, excerpt, hash_code, Candidate, CodeMessage, DailyLimits, Destination,
    Enqueued, Facts, Kind, NewDestination, Next, Outgoing, PendingCode, Verdict, CODE_WINDOW,
    DAILY_LIMIT_REACHED, DAILY_WINDOW, FORWARDED_STATES, MAX_CODES_PER_WINDOW, MAX_RULES,
    STDOUT_EXCERPT_BYTES, UNFORWARDED_STATES,
};
use crate::store::{Store, StoreError};

type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Jobs turned into deliveries per transaction.
const ENQUEUE_BATCH: usize = 256;
/// Deliveries deleted per transaction when pruning.
const PRUNE_BATCH: usize = 500;
/// Code requests the forwarder handles per transaction.
const CODE_BATCH: usize = 64;
/// Longest attempt detail stored (a status line or an error, not a whole page).
const DETAIL_MAX_CHARS: usize = 500;

/// Why a rule could not be added or a code not requested.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    /// The user has [`MAX_RULES`] rules.
    #[error("you have {MAX_RULES} forwarding rules, the most there may be: delete one first")]
    TooManyRules,
    /// [`MAX_CODES_PER_WINDOW`] codes went to this destination within the window.
    #[error(
        "{MAX_CODES_PER_WINDOW} codes were sent to {target} within the hour: ask for a new one in {minutes} min"
    )]
    TooManyCodes {
        /// The rule's address or number.
        target: String,
        /// Minutes until the oldest of them leaves the window.
        minutes: i64,
    },
    /// The rule is confirmed already, or needs no code (a webhook).
    #[error("this rule needs no code")]
    NothingToConfirm,
    /// The store failed, or the rule is not the user's (`NotFound`).
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<rusqlite::Error> for RuleError {
    fn from(e: rusqlite::Error) -> Self {
        RuleError::Store(StoreError::Sql(e))
    }
}

/// Whether rules of this kind start unconfirmed (`destinations.kind` values).
fn needs_code(kind: &str) -> bool {
    Kind::parse(kind).is_some_and(Kind::needs_confirmation)
}

/// The kinds that share `kind`'s daily limit, as an SQL list.
fn limit_class(kind: Kind) -> &'static str {
    match kind {
        Kind::Email | Kind::Webhook => "'email', 'webhook'",
        Kind::Sms => "'sms'",
    }
}

// === impl Store: a user's rules ===

impl Store {
    /// Stores a forwarding rule: a webhook confirmed at once, an e-mail or SMS rule
    /// unconfirmed with a code asked for (the forwarder sends it). At most
    /// [`MAX_RULES`] per user.
    pub fn add_destination(&self, new: &NewDestination<'_>, now: Millis) -> Result<i64, RuleError> {
        self.blocking(|| {
            let code = needs_code(new.kind);
            let mut conn = self.conn();
            // Immediate: the count and the insert are one step, so two requests at once
            // cannot both add the fifth rule.
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let count: i64 = tx.query_row(
                "SELECT COUNT(*) FROM destinations WHERE user_id = ?1",
                params![new.user_id],
                |r| r.get(0),
            )?;
            if count >= MAX_RULES {
                return Err(RuleError::TooManyRules);
            }
            tx.execute(
                "INSERT INTO destinations (user_id, schedule_id, kind, target, secret, only_failures,
                                           created_at, confirmed_at, confirm_requested_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    new.user_id,
                    new.schedule_id,
                    new.kind,
                    new.target,
                    new.secret,
                    new.only_failures,
                    now,
                    (!code).then_some(now),
                    code.then_some(now),
                ],
            )?;
            let id = tx.last_insert_rowid();
            tx.commit()?;
            Ok(id)
        })
    }

    /// A user's forwarding rules, oldest first.
    pub fn destinations(&self, user_id: i64) -> Result<Vec<Destination>> {
        self.blocking(|| {
            let conn = self.fast();
            let mut stmt = conn.prepare(
                "SELECT d.id, d.user_id, d.schedule_id, c.title, d.kind, d.target, d.only_failures,
                        d.created_at, d.confirmed_at, d.confirm_requested_at, d.confirm_note,
                        d.confirm_expires_at, d.confirm_code_hash
                 FROM destinations d
                 LEFT JOIN schedules s ON s.id = d.schedule_id
                 LEFT JOIN catalog c ON c.name = s.catalog_name
                 WHERE d.user_id = ?1 ORDER BY d.id",
            )?;
            let rows = stmt.query_map(params![user_id], |r| {
                let has_code = r.get::<_, Option<String>>(12)?.is_some();
                Ok(Destination {
                    id: r.get(0)?,
                    user_id: r.get(1)?,
                    schedule_id: r.get(2)?,
                    subscription_title: r.get(3)?,
                    kind: r.get(4)?,
                    target: r.get(5)?,
                    only_failures: r.get(6)?,
                    created_at: r.get(7)?,
                    confirmed: r.get::<_, Option<Millis>>(8)?.is_some(),
                    code_requested: r.get::<_, Option<Millis>>(9)?.is_some(),
                    code_note: r.get(10)?,
                    code_expires_at: if has_code { r.get(11)? } else { None },
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// Deletes a forwarding rule of this user; `NotFound` for anyone else's. (The
    /// codes sent for it stay counted: deleting and re-adding a rule sends no more.)
    pub fn remove_destination(&self, user_id: i64, id: i64) -> Result<()> {
        self.blocking(|| {
            let changed = self.conn().execute(
                "DELETE FROM destinations WHERE id = ?1 AND user_id = ?2",
                params![id, user_id],
            )?;
            if changed == 0 {
                return Err(StoreError::NotFound(format!("no forwarding rule {id}")));
            }
            Ok(())
        })
    }

    /// Asks for a new code for an unconfirmed rule of this user (the forwarder makes
    /// and sends it). Refused after [`MAX_CODES_PER_WINDOW`] codes to the same
    /// destination within the window, counting the codes of deleted rules too.
    pub fn request_confirmation_code(
        &self,
        user_id: i64,
        id: i64,
        now: Millis,
    ) -> Result<(), RuleError> {
        self.blocking(|| {
            let mut conn = self.conn();
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let row: Option<(String, String, Option<Millis>)> = tx
                .query_row(
                    "SELECT kind, target, confirmed_at FROM destinations WHERE id = ?1 AND user_id = ?2",
                    params![id, user_id],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?;
            let Some((kind, target, confirmed_at)) = row else {
                return Err(StoreError::NotFound(format!("no forwarding rule {id}")).into());
            };
            if confirmed_at.is_some() || !needs_code(&kind) {
                return Err(RuleError::NothingToConfirm);
            }
            let (sent, oldest) = codes_in_window(&tx, user_id, &kind, &target, now)?;
            if sent >= MAX_CODES_PER_WINDOW {
                let free_at = oldest.unwrap_or(now) + CODE_WINDOW.as_millis() as Millis;
                return Err(RuleError::TooManyCodes {
                    target,
                    minutes: ((free_at - now).max(0) + 59_999) / 60_000,
                });
            }
            tx.execute(
                "UPDATE destinations SET confirm_requested_at = ?2, confirm_note = NULL WHERE id = ?1",
                params![id, now],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    /// Checks a code entered for a rule of this user, counting a wrong one and
    /// confirming the rule on the right one (`NotFound` for anyone else's rule). A
    /// confirmed rule answers `Confirmed` again.
    pub fn confirm_destination(
        &self,
        user_id: i64,
        id: i64,
        entered: &str,
        now: Millis,
    ) -> Result<Verdict> {
        self.blocking(|| {
            let mut conn = self.conn();
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let row: Option<(Option<Millis>, PendingCode)> = tx
                .query_row(
                    "SELECT confirmed_at, confirm_code_hash, confirm_expires_at, confirm_tries
                     FROM destinations WHERE id = ?1 AND user_id = ?2",
                    params![id, user_id],
                    |r| {
                        Ok((
                            r.get(0)?,
                            PendingCode {
                                hash: r.get(1)?,
                                expires_at: r.get(2)?,
                                tries: r.get::<_, i64>(3)?.clamp(0, u32::MAX as i64) as u32,
                            },
                        ))
                    },
                )
                .optional()?;
            let Some((confirmed_at, pending)) = row else {
                return Err(StoreError::NotFound(format!("no forwarding rule {id}")));
            };
            if confirmed_at.is_some() {
                return Ok(Verdict::Confirmed);
            }
            let verdict = check_code(id, &pending, entered, now);
            match verdict {
                Verdict::Confirmed => {
                    tx.execute(
                        "UPDATE destinations SET confirmed_at = ?2, confirm_code_hash = NULL,
                                confirm_expires_at = NULL, confirm_tries = 0,
                                confirm_requested_at = NULL, confirm_note = NULL
                         WHERE id = ?1",
                        params![id, now],
                    )?;
                }
                Verdict::Wrong { tries_left } => {
                    // The last wrong try voids the code: not even the right one works now.
                    tx.execute(
                        "UPDATE destinations SET confirm_tries = confirm_tries + 1,
                                confirm_code_hash = CASE WHEN ?2 THEN NULL ELSE confirm_code_hash END
                         WHERE id = ?1",
                        params![id, tries_left == 0],
                    )?;
                }
                Verdict::Malformed | Verdict::Expired | Verdict::TooManyTries | Verdict::NoCode => {}
            }
            tx.commit()?;
            Ok(verdict)
        })
    }
}

// === impl Store: the forwarder's codes ===

impl Store {
    /// Makes the codes asked for: for each rule with a request, unless its destination
    /// had [`MAX_CODES_PER_WINDOW`] codes within the window or its owner reached the
    /// daily limit of the medium in `limits` (codes count like deliveries), draws a code
    /// with `new_code`, stores its hash (salted with `salt`) with the expiry and zero
    /// tries, and counts it; a request that is refused gets the reason as its note. The
    /// codes are returned to be sent (the store never holds them).
    pub fn take_code_requests(
        &self,
        now: Millis,
        limits: &DailyLimits,
        mut new_code: impl FnMut() -> String,
        mut salt: impl FnMut() -> [u8; 16],
    ) -> Result<Vec<CodeMessage>> {
        self.blocking(|| {
            // Usually there is none: find that out with a read, without the write lock.
            let any: Option<i64> = self
                .fast()
                .query_row(
                    "SELECT id FROM destinations WHERE confirm_requested_at IS NOT NULL LIMIT 1",
                    [],
                    |r| r.get(0),
                )
                .optional()?;
            if any.is_none() {
                return Ok(Vec::new());
            }
            let mut conn = self.conn();
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let requests: Vec<(i64, i64, String, String, Option<Millis>)> = {
                let mut stmt = tx.prepare(&format!(
                    "SELECT id, user_id, kind, target, confirmed_at FROM destinations
                     WHERE confirm_requested_at IS NOT NULL ORDER BY confirm_requested_at, id
                     LIMIT {CODE_BATCH}"
                ))?;
                let rows = stmt.query_map([], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })?;
                rows.collect::<Result<_, _>>()?
            };
            let mut out = Vec::new();
            for (id, user_id, kind_text, target, confirmed_at) in requests {
                let kind = Kind::parse(&kind_text).filter(|k| k.needs_confirmation());
                let Some(kind) = kind.filter(|_| confirmed_at.is_none()) else {
                    // Confirmed meanwhile, or a kind that has no codes: nothing to send.
                    drop_request(&tx, id, None)?;
                    continue;
                };
                let (sent, _) = codes_in_window(&tx, user_id, &kind_text, &target, now)?;
                if sent >= MAX_CODES_PER_WINDOW {
                    let note = format!(
                        "Not sent: {MAX_CODES_PER_WINDOW} codes were sent here within the hour; ask again later."
                    );
                    drop_request(&tx, id, Some(&note))?;
                    continue;
                }
                if daily_used(&tx, user_id, kind, now)? >= limits.cap(kind) {
                    drop_request(&tx, id, Some("Not sent: daily limit reached."))?;
                    continue;
                }
                let code = new_code();
                tx.execute(
                    "UPDATE destinations SET confirm_code_hash = ?2, confirm_expires_at = ?3,
                            confirm_tries = 0, confirm_requested_at = NULL, confirm_note = ?4
                     WHERE id = ?1",
                    params![
                        id,
                        hash_code(id, &code, salt()),
                        code_expiry(now),
                        "Sending the code…"
                    ],
                )?;
                tx.execute(
                    "INSERT INTO confirmation_codes (user_id, kind, target, sent_at) VALUES (?1, ?2, ?3, ?4)",
                    params![user_id, kind_text, target, now],
                )?;
                out.push(CodeMessage {
                    destination_id: id,
                    user_id,
                    kind,
                    target,
                    code,
                });
            }
            tx.commit()?;
            Ok(out)
        })
    }

    /// Records what became of a code's sending, for the owner to see (on an
    /// unconfirmed rule only).
    pub fn note_code_result(&self, destination_id: i64, note: &str) -> Result<()> {
        self.blocking(|| {
            self.conn().execute(
                "UPDATE destinations SET confirm_note = ?2 WHERE id = ?1 AND confirmed_at IS NULL",
                params![destination_id, note],
            )?;
            Ok(())
        })
    }
}

/// Codes sent to this destination of this user within the window, and when the oldest
/// of them was sent.
fn codes_in_window(
    conn: &Connection,
    user_id: i64,
    kind: &str,
    target: &str,
    now: Millis,
) -> Result<(u32, Option<Millis>)> {
    let since = now - CODE_WINDOW.as_millis() as Millis;
    let (count, oldest): (i64, Option<Millis>) = conn.query_row(
        "SELECT COUNT(*), MIN(sent_at) FROM confirmation_codes
         WHERE user_id = ?1 AND sent_at > ?2 AND kind = ?3 AND target = ?4",
        params![user_id, since, kind, target],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    Ok((count.max(0) as u32, oldest))
}

/// Clears a code request that is not carried out, with the reason if there is one.
fn drop_request(conn: &Connection, id: i64, note: Option<&str>) -> Result<()> {
    conn.execute(
        "UPDATE destinations SET confirm_requested_at = NULL, confirm_note = COALESCE(?2, confirm_note)
         WHERE id = ?1",
        params![id, note],
    )?;
    Ok(())
}

/// What a user has used of the daily limit that `kind` falls under, at `now`:
/// deliveries created within the day (not those given up for the limit) and codes sent.
fn daily_used(conn: &Connection, user_id: i64, kind: Kind, now: Millis) -> Result<u32> {
    let since = now - DAILY_WINDOW.as_millis() as Millis;
    let class = limit_class(kind);
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

// === impl Store: the delivery queue ===

impl Store {
    /// Turns finished jobs marked `forward_pending` into deliveries, one per matching
    /// confirmed rule of the subscription's owner (a rule for that subscription or for
    /// all of them; for every result, or only when the job did not succeed), and clears
    /// the mark in the same transaction: nothing is lost in a crash and nothing is
    /// enqueued twice. Jobs in [`UNFORWARDED_STATES`] are only marked handled. A
    /// delivery beyond its owner's daily limit in `limits` is given up at once, with an
    /// attempt saying so.
    pub fn enqueue_deliveries(&self, now: Millis, limits: &DailyLimits) -> Result<Enqueued> {
        self.blocking(|| {
            let states = FORWARDED_STATES
                .iter()
                .chain(UNFORWARDED_STATES.iter())
                .map(|s| format!("'{s}'"))
                .collect::<Vec<_>>()
                .join(", ");
            // Usually there is nothing to do: find that out with a read (on the index of
            // `forward_pending`), without taking the write lock.
            let any: Option<i64> = self
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
                let mut conn = self.conn();
                // Immediate: the read and the writes form one snapshot, with no upgrade
                // that a concurrent writer could make fail.
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
                    // A subscription deleted since it fired has no owner any more: nothing
                    // to do.
                    let forwarded = FORWARDED_STATES.contains(&state.as_str());
                    if let (true, Some(schedule_id), Some(owner)) = (forwarded, schedule_id, owner)
                    {
                        let rules = matching_rules(&tx, *owner, *schedule_id, state)?;
                        for (rule_id, kind_text, target) in rules {
                            let over = match Kind::parse(&kind_text) {
                                Some(kind) => {
                                    let count = match used.entry((*owner, limit_class(kind))) {
                                        Entry::Occupied(e) => e.into_mut(),
                                        Entry::Vacant(e) => {
                                            e.insert(daily_used(&tx, *owner, kind, now)?)
                                        }
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
        })
    }

    /// Pending deliveries due at `now`, round-robin by user: every user's earliest due,
    /// then every user's second, and so on, at most `per_user` of each user and `limit`
    /// in all.
    pub fn due_deliveries(
        &self,
        now: Millis,
        per_user: usize,
        limit: usize,
    ) -> Result<Vec<Candidate>> {
        self.blocking(|| {
            let conn = self.fast();
            let mut stmt = conn.prepare_cached(
                "SELECT id, user_id, kind, target FROM (
                     SELECT id, user_id, kind, target, next_attempt_at,
                            ROW_NUMBER() OVER (PARTITION BY user_id ORDER BY next_attempt_at, id) AS turn
                     FROM deliveries WHERE state = 'pending' AND next_attempt_at <= ?1) AS due
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
        })
    }

    /// The earliest retry time after `now`, if any delivery waits for one.
    pub fn next_delivery_due_after(&self, now: Millis) -> Result<Option<Millis>> {
        self.blocking(|| {
            Ok(self.fast().query_row(
                "SELECT MIN(next_attempt_at) FROM deliveries WHERE state = 'pending' AND next_attempt_at > ?1",
                params![now],
                |r| r.get(0),
            )?)
        })
    }

    /// A pending delivery with what it should say (its job's output cut to
    /// [`STDOUT_EXCERPT_BYTES`]); `None` if it is no longer pending.
    pub fn outgoing_delivery(&self, delivery_id: i64) -> Result<Option<Outgoing>> {
        self.blocking(|| {
            let conn = self.fast();
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
        })
    }

    /// Records an attempt (`ok`, with its `detail` cut to a status line's length) and
    /// moves the delivery on as `next` says, in one transaction. A delivery that is no
    /// longer pending is left as it is; the attempt is recorded all the same.
    pub fn record_delivery_attempt(
        &self,
        delivery_id: i64,
        ok: bool,
        detail: &str,
        next: Next,
        now: Millis,
    ) -> Result<()> {
        self.blocking(|| {
            let detail: String = detail.chars().take(DETAIL_MAX_CHARS).collect();
            let mut conn = self.conn();
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            tx.execute(
                "INSERT INTO delivery_attempts (delivery_id, at, ok, detail) VALUES (?1, ?2, ?3, ?4)",
                params![delivery_id, now, ok, detail],
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
        })
    }

    /// Deletes finished deliveries created before `cutoff`, with their attempts, and
    /// the counts of codes sent before then, a batch per transaction (so the write lock
    /// is never held long). Returns how many deliveries went.
    pub fn prune_deliveries(&self, cutoff: Millis) -> Result<usize> {
        self.blocking(|| {
            self.conn().execute(
                "DELETE FROM confirmation_codes WHERE sent_at < ?1",
                params![cutoff],
            )?;
            let mut deleted = 0;
            loop {
                let mut conn = self.conn();
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
        })
    }
}

/// The confirmed rules of `owner` that take a result of this subscription in `state`:
/// (id, kind, target), oldest first.
fn matching_rules(
    conn: &Connection,
    owner: i64,
    schedule_id: i64,
    state: &str,
) -> Result<Vec<(i64, String, String)>> {
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
#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Role;

    fn store() -> (Store, herald_tests::TempDir) {
        let dir = herald_tests::TempDir::new("store-forwarding");
        (Store::open(dir.path()).expect("open store"), dir)
    }

    fn rule<'a>(user_id: i64, kind: &'a str, target: &'a str) -> NewDestination<'a> {
        NewDestination {
            user_id,
            schedule_id: None,
            kind,
            target,
            secret: (kind == "webhook").then_some("s"),
            only_failures: false,
        }
    }

    const LIMITS: DailyLimits = DailyLimits {
        email_and_webhook: 200,
        sms: 20,
    };
    const NOW: Millis = 1_700_000_000_000;

    fn take(store: &Store, now: Millis, code: &str) -> Vec<CodeMessage> {
        store
            .take_code_requests(now, &LIMITS, || code.to_string(), || [1; 16])
            .unwrap()
    }

    #[test]
    fn only_the_owner_removes_a_destination() {
        let (store, _dir) = store();
        let a = store.add_user("ann", "h", Role::User, "", "", 1).unwrap();
        let b = store.add_user("bob", "h", Role::User, "", "", 1).unwrap();
        let id = store
            .add_destination(&rule(a, "email", "a@example.org"), 1)
            .unwrap();
        assert!(matches!(
            store.remove_destination(b, id),
            Err(StoreError::NotFound(_))
        ));
        assert_eq!(store.destinations(a).unwrap().len(), 1);
        assert!(store.destinations(b).unwrap().is_empty());
        store.remove_destination(a, id).unwrap();
        assert!(store.destinations(a).unwrap().is_empty());
    }

    #[test]
    fn a_user_has_at_most_five_rules() {
        let (store, _dir) = store();
        let a = store.add_user("ann", "h", Role::User, "", "", 1).unwrap();
        let b = store.add_user("bob", "h", Role::User, "", "", 1).unwrap();
        for n in 0..MAX_RULES {
            let target = format!("https://h.example/{n}");
            store
                .add_destination(&rule(a, "webhook", &target), 1)
                .unwrap();
        }
        assert!(matches!(
            store.add_destination(&rule(a, "email", "a@example.org"), 1),
            Err(RuleError::TooManyRules)
        ));
        // Another user's count is their own.
        store
            .add_destination(&rule(b, "sms", "+15551234567"), 1)
            .unwrap();
        // Deleting one makes room.
        let first = store.destinations(a).unwrap()[0].id;
        store.remove_destination(a, first).unwrap();
        store
            .add_destination(&rule(a, "email", "a@example.org"), 1)
            .unwrap();
    }

    #[test]
    fn e_mail_and_sms_rules_start_unconfirmed_with_a_code_asked_for_webhooks_do_not() {
        let (store, _dir) = store();
        let a = store.add_user("ann", "h", Role::User, "", "", 1).unwrap();
        store
            .add_destination(&rule(a, "email", "a@example.org"), NOW)
            .unwrap();
        store
            .add_destination(&rule(a, "sms", "+15551234567"), NOW)
            .unwrap();
        store
            .add_destination(&rule(a, "webhook", "https://h.example/x"), NOW)
            .unwrap();
        let rules = store.destinations(a).unwrap();
        let states: Vec<(bool, bool)> = rules
            .iter()
            .map(|d| (d.confirmed, d.code_requested))
            .collect();
        assert_eq!(states, [(false, true), (false, true), (true, false)]);
        assert!(matches!(
            store.request_confirmation_code(a, rules[2].id, NOW),
            Err(RuleError::NothingToConfirm)
        ));
    }

    #[test]
    fn a_code_is_made_once_stored_hashed_and_confirms_only_its_rule() {
        let (store, _dir) = store();
        let a = store.add_user("ann", "h", Role::User, "", "", 1).unwrap();
        let b = store.add_user("bob", "h", Role::User, "", "", 1).unwrap();
        let id = store
            .add_destination(&rule(a, "sms", "+15551234567"), NOW)
            .unwrap();
        let sent = take(&store, NOW, "314159");
        assert_eq!(
            sent,
            [CodeMessage {
                destination_id: id,
                user_id: a,
                kind: Kind::Sms,
                target: "+15551234567".into(),
                code: "314159".into(),
            }]
        );
        // Taken: not made again.
        assert!(take(&store, NOW, "999999").is_empty());
        let stored: String = store
            .conn()
            .query_row(
                "SELECT confirm_code_hash FROM destinations WHERE id = ?1",
                params![id],
                |r| r.get(0),
            )
            .unwrap();
        assert!(!stored.contains("314159"));
        // Bob cannot confirm ann's rule, even with the code.
        assert!(matches!(
            store.confirm_destination(b, id, "314159", NOW),
            Err(StoreError::NotFound(_))
        ));
        assert_eq!(
            store.confirm_destination(a, id, "314158", NOW).unwrap(),
            Verdict::Wrong { tries_left: 4 }
        );
        assert_eq!(
            store
                .confirm_destination(a, id, "314159", NOW + 1000)
                .unwrap(),
            Verdict::Confirmed
        );
        let confirmed = &store.destinations(a).unwrap()[0];
        assert!(confirmed.confirmed && !confirmed.code_requested);
        assert!(confirmed.code_expires_at.is_none());
    }

    #[test]
    fn five_wrong_codes_void_it_and_an_hour_expires_it() {
        let (store, _dir) = store();
        let a = store.add_user("ann", "h", Role::User, "", "", 1).unwrap();
        let id = store
            .add_destination(&rule(a, "email", "a@example.org"), NOW)
            .unwrap();
        take(&store, NOW, "111111");
        for left in (0..5).rev() {
            assert_eq!(
                store.confirm_destination(a, id, "222222", NOW).unwrap(),
                Verdict::Wrong { tries_left: left }
            );
        }
        assert_eq!(
            store.confirm_destination(a, id, "111111", NOW).unwrap(),
            Verdict::NoCode
        );
        // A new code starts over; it expires after an hour.
        store.request_confirmation_code(a, id, NOW + 1).unwrap();
        take(&store, NOW + 1, "333333");
        assert_eq!(
            store
                .confirm_destination(a, id, "333333", NOW + 1 + 3_600_000)
                .unwrap(),
            Verdict::Expired
        );
        assert!(!store.destinations(a).unwrap()[0].confirmed);
    }

    #[test]
    fn three_codes_an_hour_per_destination_even_across_deleted_rules() {
        let (store, _dir) = store();
        let a = store.add_user("ann", "h", Role::User, "", "", 1).unwrap();
        let id = store
            .add_destination(&rule(a, "email", "a@example.org"), NOW)
            .unwrap();
        assert_eq!(take(&store, NOW, "000001").len(), 1);
        store.request_confirmation_code(a, id, NOW + 10).unwrap();
        assert_eq!(take(&store, NOW + 10, "000002").len(), 1);
        // Deleting and adding the rule again does not reset the count.
        store.remove_destination(a, id).unwrap();
        let id = store
            .add_destination(&rule(a, "email", "a@example.org"), NOW + 20)
            .unwrap();
        assert_eq!(take(&store, NOW + 20, "000003").len(), 1);
        let refused = store
            .request_confirmation_code(a, id, NOW + 30)
            .unwrap_err();
        assert!(
            matches!(refused, RuleError::TooManyCodes { minutes: 60, .. }),
            "{refused}"
        );
        // A request that slipped through (the add of a new rule) is refused with a note.
        store.remove_destination(a, id).unwrap();
        store
            .add_destination(&rule(a, "email", "a@example.org"), NOW + 40)
            .unwrap();
        assert!(take(&store, NOW + 40, "000004").is_empty());
        let refused = &store.destinations(a).unwrap()[0];
        assert!(!refused.code_requested);
        assert!(refused
            .code_note
            .as_deref()
            .unwrap_or("")
            .contains("within the hour"));
        // Another address is another count; an hour later the first one is free again.
        let other = store.add_destination(&rule(a, "email", "b@example.org"), NOW + 50);
        assert!(other.is_ok());
        assert_eq!(take(&store, NOW + 50, "000005").len(), 1);
        let first = store.destinations(a).unwrap()[0].id;
        store
            .request_confirmation_code(a, first, NOW + 3_600_001)
            .unwrap();
        assert_eq!(take(&store, NOW + 3_600_001, "000006").len(), 1);
    }

    #[test]
    fn codes_count_toward_the_daily_limit_of_their_medium() {
        let (store, _dir) = store();
        let a = store.add_user("ann", "h", Role::User, "", "", 1).unwrap();
        let tight = DailyLimits {
            email_and_webhook: 200,
            sms: 2,
        };
        let mut made = 0;
        for n in 0..3 {
            let target = format!("+1555123456{n}");
            store
                .add_destination(&rule(a, "sms", &target), NOW)
                .unwrap();
            made += store
                .take_code_requests(NOW, &tight, || "123456".into(), || [0; 16])
                .unwrap()
                .len();
        }
        assert_eq!(made, 2);
        let last = &store.destinations(a).unwrap()[2];
        assert_eq!(
            last.code_note.as_deref(),
            Some("Not sent: daily limit reached.")
        );
        // E-mail is another medium.
        store
            .add_destination(&rule(a, "email", "a@example.org"), NOW)
            .unwrap();
        assert_eq!(
            store
                .take_code_requests(NOW, &tight, || "123456".into(), || [0; 16])
                .unwrap()
                .len(),
            1
        );
    }
}
