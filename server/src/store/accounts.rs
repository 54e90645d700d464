//! The web console's records: user accounts, browser sessions, login failure counters,
//! browser-service visits, and the user-scoped queries behind the console's pages (a
//! user's devices, the history of runs on them, forwarding rules and their delivery log).
//!
//! Ownership is decided here, in SQL, so a page can never show another user's rows by
//! forgetting a check: every user-scoped query takes the user id.

use super::sql::{params, OptionalExtension, Row};
use crate::model::Subscription;
use crate::model::*;
use crate::model::{AgentInfo, ScheduleInfo};
use crate::store::{agent_row, schedule_row, Store, StoreError, AGENT_SELECT, SCHEDULE_SELECT};
use herald_shared::protocol::JobId;
use herald_shared::Millis;

type Result<T, E = StoreError> = std::result::Result<T, E>;

/// States from which the person's outcome completes a browser job: once its agent took
/// it (a page can be finished before the agent's own result arrives).
const VISIT_SOURCES: [JobState; 3] = [JobState::Delivered, JobState::Running, JobState::Waiting];

const USER_COLUMNS: &str =
    "u.id, u.login, u.display_name, u.email, u.phone, u.role, u.created_at, u.sender";

fn user_row(r: &Row<'_>) -> rusqlite::Result<User> {
    let role: String = r.get(5)?;
    Ok(User {
        id: r.get(0)?,
        login: r.get(1)?,
        display_name: r.get(2)?,
        email: r.get(3)?,
        phone: r.get(4)?,
        role: role.parse().map_err(|e: String| {
            rusqlite::Error::FromSqlConversionFailure(5, rusqlite::types::Type::Text, e.into())
        })?,
        created_at: r.get(6)?,
        sender: r.get(7)?,
    })
}

const HISTORY_SELECT: &str =
    "SELECT j.id, j.agent_id, a.name, a.owner_user_id, c.name, c.title, o.action,
            j.state, j.created_at, j.started_at, j.finished_at, j.exit_code, j.error, j.outcome
     FROM jobs j
     JOIN agents a ON a.id = j.agent_id
     JOIN orders o ON o.id = j.order_id
     LEFT JOIN catalog c ON c.order_id = j.order_id";

fn history_row(r: &Row<'_>) -> rusqlite::Result<HistoryEntry> {
    Ok(HistoryEntry {
        id: r.get(0)?,
        agent_id: r.get(1)?,
        agent_name: r.get(2)?,
        owner_user_id: r.get(3)?,
        entry: r.get(4)?,
        entry_title: r.get(5)?,
        action: r.get(6)?,
        state: r.get(7)?,
        created_at: r.get(8)?,
        started_at: r.get(9)?,
        finished_at: r.get(10)?,
        exit_code: r.get(11)?,
        error: r.get(12)?,
        outcome: r.get(13)?,
    })
}

const DELIVERY_SELECT: &str =
    "SELECT id, user_id, job_id, kind, target, state, attempts, last_error,
            created_at, finished_at FROM deliveries";

fn delivery_row(r: &Row<'_>) -> rusqlite::Result<Delivery> {
    Ok(Delivery {
        id: r.get(0)?,
        user_id: r.get(1)?,
        job_id: r.get(2)?,
        kind: r.get(3)?,
        target: r.get(4)?,
        state: r.get(5)?,
        attempts: r.get(6)?,
        last_error: r.get(7)?,
        created_at: r.get(8)?,
        finished_at: r.get(9)?,
        log: Vec::new(),
    })
}

// === impl Store: users ===

impl Store {
    /// Gives an agent to a user, as if it had been linked with their personal token
    /// (the demo's agent).
    pub fn set_agent_owner(&self, agent_id: &str, user_id: i64) -> Result<()> {
        self.blocking(|| {
            let changed = self.conn().execute(
                "UPDATE agents SET owner_user_id = ?2 WHERE id = ?1",
                params![agent_id, user_id],
            )?;
            if changed == 0 {
                return Err(StoreError::NotFound(format!("no agent {agent_id}")));
            }
            Ok(())
        })
    }

    /// Creates an account. Fails with `Conflict` if the login is taken.
    pub fn add_user(
        &self,
        login: &str,
        password_hash: &str,
        role: Role,
        email: &str,
        phone: &str,
        now: Millis,
    ) -> Result<i64> {
        self.blocking(|| {
            let conn = self.conn();
            let inserted = conn.execute(
                "INSERT INTO users (login, password_hash, role, email, phone, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (login) DO NOTHING",
                params![login, password_hash, role.as_str(), email, phone, now],
            )?;
            if inserted == 0 {
                return Err(StoreError::Conflict(format!(
                    "the login {login} is taken; choose another"
                )));
            }
            Ok(conn.last_insert_rowid())
        })
    }

    /// One account.
    pub fn user(&self, id: i64) -> Result<User> {
        self.blocking(|| {
            self.fast()
                .query_row(
                    &format!("SELECT {USER_COLUMNS} FROM users u WHERE u.id = ?1"),
                    params![id],
                    user_row,
                )
                .optional()?
                .ok_or_else(|| StoreError::NotFound(format!("no user {id}")))
        })
    }

    /// One account by login.
    pub fn user_by_login(&self, login: &str) -> Result<Option<User>> {
        self.blocking(|| {
            Ok(self
                .fast()
                .query_row(
                    &format!("SELECT {USER_COLUMNS} FROM users u WHERE u.login = ?1"),
                    params![login],
                    user_row,
                )
                .optional()?)
        })
    }

    /// What a login is checked against, if the login exists.
    pub fn credentials(&self, login: &str) -> Result<Option<Credentials>> {
        self.blocking(|| {
            Ok(self
                .conn()
                .query_row(
                    &format!(
                        "SELECT {USER_COLUMNS}, u.password_hash, u.locked_until
                         FROM users u WHERE u.login = ?1"
                    ),
                    params![login],
                    |r| {
                        Ok(Credentials {
                            user: user_row(r)?,
                            password_hash: r.get(8)?,
                            locked_until: r.get(9)?,
                        })
                    },
                )
                .optional()?)
        })
    }

    /// The password hash of an account.
    pub fn password_hash(&self, user_id: i64) -> Result<String> {
        self.blocking(|| {
            self.conn()
                .query_row(
                    "SELECT password_hash FROM users WHERE id = ?1",
                    params![user_id],
                    |r| r.get(0),
                )
                .optional()?
                .ok_or_else(|| StoreError::NotFound(format!("no user {user_id}")))
        })
    }

    /// All accounts, by login.
    pub fn users(&self) -> Result<Vec<User>> {
        self.blocking(|| {
            let conn = self.fast();
            let mut stmt = conn.prepare(&format!(
                "SELECT {USER_COLUMNS} FROM users u ORDER BY u.login"
            ))?;
            let rows = stmt.query_map([], user_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// Changes an account's role.
    pub fn set_role(&self, user_id: i64, role: Role) -> Result<()> {
        self.blocking(|| {
            let changed = self.conn().execute(
                "UPDATE users SET role = ?2 WHERE id = ?1",
                params![user_id, role.as_str()],
            )?;
            if changed == 0 {
                return Err(StoreError::NotFound(format!("no user {user_id}")));
            }
            Ok(())
        })
    }

    /// Changes an account's name and contact details.
    pub fn update_user_details(
        &self,
        user_id: i64,
        display_name: &str,
        email: &str,
        phone: &str,
    ) -> Result<()> {
        self.blocking(|| {
            let changed = self.conn().execute(
                "UPDATE users SET display_name = ?2, email = ?3, phone = ?4 WHERE id = ?1",
                params![user_id, display_name, email, phone],
            )?;
            if changed == 0 {
                return Err(StoreError::NotFound(format!("no user {user_id}")));
            }
            Ok(())
        })
    }

    /// Replaces a password and ends every session of the account, in one transaction.
    pub fn set_password(&self, user_id: i64, password_hash: &str) -> Result<()> {
        self.blocking(|| {
            let mut conn = self.conn();
            let tx = conn.transaction()?;
            let changed = tx.execute(
                "UPDATE users SET password_hash = ?2, failed_logins = 0, locked_until = NULL
                 WHERE id = ?1",
                params![user_id, password_hash],
            )?;
            if changed == 0 {
                return Err(StoreError::NotFound(format!("no user {user_id}")));
            }
            tx.execute(
                "DELETE FROM web_sessions WHERE user_id = ?1",
                params![user_id],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    // === login failures ===

    /// Counts a login attempt as a failure *before* its password is checked, so that
    /// attempts sent in parallel cannot all pass a check made before any of them
    /// failed. The attempt that makes `max_failures` consecutive ones locks the
    /// account until `now + lock_ms` (and the count starts again); while locked,
    /// attempts are refused uncounted. A right password undoes the count with
    /// [`Store::login_succeeded`].
    ///
    /// Written on the relaxed connection: a failure costs no fsync, so a wrong
    /// password for a real account takes no longer than one for a login that does not
    /// exist (counted in memory); a power cut may forget the latest counts.
    pub fn begin_login(
        &self,
        user_id: i64,
        max_failures: u32,
        lock_ms: i64,
        now: Millis,
    ) -> Result<LoginAttempt> {
        self.blocking(|| {
            let mut conn = self.fast();
            let tx = conn.transaction()?;
            let failures: Option<i64> = tx
                .query_row(
                    "UPDATE users SET failed_logins = failed_logins + 1
                     WHERE id = ?1 AND (locked_until IS NULL OR locked_until <= ?2)
                     RETURNING failed_logins",
                    params![user_id, now],
                    |r| r.get(0),
                )
                .optional()?;
            let Some(failures) = failures else {
                return Ok(LoginAttempt::Locked);
            };
            let locks = failures >= i64::from(max_failures);
            if locks {
                tx.execute(
                    "UPDATE users SET failed_logins = 0, locked_until = ?2 WHERE id = ?1",
                    params![user_id, now.saturating_add(lock_ms)],
                )?;
            }
            tx.commit()?;
            Ok(LoginAttempt::Counted { locks })
        })
    }

    /// Whether an account is locked at `now`.
    pub fn login_locked(&self, user_id: i64, now: Millis) -> Result<bool> {
        self.blocking(|| {
            let until: Option<Option<Millis>> = self
                .fast()
                .query_row(
                    "SELECT locked_until FROM users WHERE id = ?1",
                    params![user_id],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(until.flatten().is_some_and(|until| until > now))
        })
    }

    /// The password of a counted attempt proved right: clears the count, and the lock
    /// if this attempt set it (`locked_by_this`). Returns false, clearing nothing, if
    /// another attempt locked the account meanwhile: the caller refuses the login.
    pub fn login_succeeded(&self, user_id: i64, locked_by_this: bool, now: Millis) -> Result<bool> {
        self.blocking(|| {
            let changed = self.fast().execute(
                "UPDATE users SET failed_logins = 0, locked_until = NULL
                 WHERE id = ?1 AND (?3 OR locked_until IS NULL OR locked_until <= ?2)",
                params![user_id, now, locked_by_this],
            )?;
            Ok(changed > 0)
        })
    }

    // === sessions ===

    /// Stores a new session by the hash of its cookie value. It ends after `idle_ms`
    /// without use, and `max_age_ms` after now however much it is used.
    pub fn create_session(
        &self,
        token_hash: &str,
        user_id: i64,
        csrf: &str,
        now: Millis,
        idle_ms: i64,
        max_age_ms: i64,
    ) -> Result<()> {
        self.blocking(|| {
            let conn = self.conn();
            // Housekeeping on the rare path (a login), not on every request.
            conn.execute(
                "DELETE FROM web_sessions WHERE expires_at <= ?1",
                params![now],
            )?;
            conn.execute(
                "INSERT INTO web_sessions (token_hash, user_id, csrf, created_at, last_seen_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?4, ?5)",
                params![
                    token_hash,
                    user_id,
                    csrf,
                    now,
                    now.saturating_add(idle_ms.min(max_age_ms))
                ],
            )?;
            Ok(())
        })
    }

    /// The live session with this cookie hash, if any; pushes its idle expiry forward,
    /// never past `max_age_ms` after the session began.
    pub fn session(
        &self,
        token_hash: &str,
        now: Millis,
        idle_ms: i64,
        max_age_ms: i64,
    ) -> Result<Option<SessionRecord>> {
        self.blocking(|| {
            let conn = self.fast();
            let found = conn
                .query_row(
                    &format!(
                        "SELECT {USER_COLUMNS}, s.csrf, s.last_seen_at
                         FROM web_sessions s JOIN users u ON u.id = s.user_id
                         WHERE s.token_hash = ?1 AND s.expires_at > ?2
                           AND s.created_at > ?2 - ?3"
                    ),
                    params![token_hash, now, max_age_ms],
                    |r| Ok((user_row(r)?, r.get::<_, String>(8)?, r.get::<_, Millis>(9)?)),
                )
                .optional()?;
            let Some((user, csrf, last_seen)) = found else {
                return Ok(None);
            };
            // Writing on every request would serialize page views on the database lock;
            // a minute of slack in a 12-hour idle timeout does not matter.
            if now - last_seen > 60_000 {
                conn.execute(
                    "UPDATE web_sessions SET last_seen_at = ?2,
                            expires_at = MIN(?3, created_at + ?4)
                     WHERE token_hash = ?1",
                    params![token_hash, now, now.saturating_add(idle_ms), max_age_ms],
                )?;
            }
            Ok(Some(SessionRecord { user, csrf }))
        })
    }

    /// Ends one session.
    pub fn end_session(&self, token_hash: &str) -> Result<()> {
        self.blocking(|| {
            self.conn().execute(
                "DELETE FROM web_sessions WHERE token_hash = ?1",
                params![token_hash],
            )?;
            Ok(())
        })
    }

    // === browser-service visits ===

    /// The job behind a service page: its state and the catalog entry it runs.
    pub fn service_job(&self, job_id: JobId) -> Result<Option<ServiceJob>> {
        self.blocking(|| {
            Ok(self
                .conn()
                .query_row(
                    "SELECT j.id, j.state, c.name, o.kind, o.action
                     FROM jobs j JOIN orders o ON o.id = j.order_id
                     LEFT JOIN catalog c ON c.order_id = j.order_id
                     WHERE j.id = ?1",
                    params![job_id],
                    |r| {
                        let action: String = r.get(4)?;
                        Ok(ServiceJob {
                            job_id: r.get(0)?,
                            state: r.get(1)?,
                            entry: r.get(2)?,
                            kind: r.get(3)?,
                            page: action.strip_prefix("open ").map(str::to_string),
                        })
                    },
                )
                .optional()?)
        })
    }

    /// Redeems a job's ticket: true the first time, false ever after.
    pub fn redeem_ticket(&self, job_id: JobId, now: Millis) -> Result<bool> {
        self.blocking(|| {
            let changed = self.conn().execute(
                "UPDATE jobs SET visit_redeemed_at = ?2 WHERE id = ?1 AND visit_redeemed_at IS NULL",
                params![job_id, now],
            )?;
            Ok(changed > 0)
        })
    }

    /// Stores a visit admitted by a redeemed ticket.
    pub fn create_visit(
        &self,
        token_hash: &str,
        job_id: JobId,
        csrf: &str,
        now: Millis,
        expires_at: Millis,
    ) -> Result<()> {
        self.blocking(|| {
            let conn = self.conn();
            conn.execute("DELETE FROM visits WHERE expires_at <= ?1", params![now])?;
            conn.execute(
                "INSERT INTO visits (token_hash, job_id, csrf, created_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![token_hash, job_id, csrf, now, expires_at],
            )?;
            Ok(())
        })
    }

    /// The live visit with this cookie hash, if any.
    pub fn visit(&self, token_hash: &str, now: Millis) -> Result<Option<Visit>> {
        self.blocking(|| {
            Ok(self
                .conn()
                .query_row(
                    "SELECT job_id, csrf FROM visits WHERE token_hash = ?1 AND expires_at > ?2",
                    params![token_hash, now],
                    |r| {
                        Ok(Visit {
                            job_id: r.get(0)?,
                            csrf: r.get(1)?,
                        })
                    },
                )
                .optional()?)
        })
    }

    /// Completes a browser job with the visitor's answer: `done` succeeds, `declined`
    /// fails with the note as the reason; the job's outcome is `done` or `declined`,
    /// followed by `: NOTE` when a note was left. With
    /// `redeem`, the ticket is also spent in the same statement (external services post
    /// the ticket itself), and a ticket already spent is refused.
    pub fn complete_visit(
        &self,
        job_id: JobId,
        outcome: VisitOutcome,
        note: &str,
        redeem: bool,
        now: Millis,
    ) -> Result<Completion> {
        self.blocking(|| {
            let (state, error, word) = match outcome {
                VisitOutcome::Done => (JobState::Succeeded, None, "done"),
                VisitOutcome::Declined => (
                    JobState::Failed,
                    Some(format!("declined by the user: {note}")),
                    "declined",
                ),
            };
            let answer = if note.is_empty() {
                word.to_string()
            } else {
                format!("{word}: {note}")
            };
            let conn = self.conn();
            let changed = conn.execute(
                &format!(
                    "UPDATE jobs SET state = ?2, finished_at = ?3, outcome = ?4, error = ?5,
                        started_at = COALESCE(started_at, ?3),
                        delivered_at = COALESCE(delivered_at, ?3),
                        visit_redeemed_at = COALESCE(visit_redeemed_at, ?3)
                 WHERE id = ?1 AND state IN ({})
                   AND (?6 = 0 OR visit_redeemed_at IS NULL)
                   AND EXISTS (SELECT 1 FROM orders o WHERE o.id = jobs.order_id
                               AND o.kind = 'open')",
                    JobState::sql_list(&VISIT_SOURCES)
                ),
                params![job_id, state, now, answer, error, redeem],
            )?;
            if changed > 0 {
                return Ok(Completion::Completed(state));
            }
            let current: Option<(JobState, Option<Millis>)> = conn
                .query_row(
                    "SELECT state, visit_redeemed_at FROM jobs WHERE id = ?1",
                    params![job_id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            Ok(match current {
                None => Completion::Refused(format!("no job {job_id}")),
                Some((_, Some(_))) if redeem => Completion::AlreadyUsed,
                Some((state, _)) if state.is_final() => {
                    Completion::Refused(format!("this task is already closed ({state})"))
                }
                Some((state, _)) => {
                    Completion::Refused(format!("this task cannot be completed now ({state})"))
                }
            })
        })
    }

    // === devices ===

    /// A user's devices, by name; `online` tells which are connected.
    pub fn user_agents(
        &self,
        user_id: i64,
        online: &dyn Fn(&str) -> bool,
    ) -> Result<Vec<AgentInfo>> {
        self.blocking(|| {
            let conn = self.fast();
            let mut stmt = conn.prepare(&format!(
                "{AGENT_SELECT} WHERE owner_user_id = ?1 ORDER BY name"
            ))?;
            let rows = stmt.query_map(params![user_id], |r| agent_row(r, online))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// The owner of an agent (`None` if it was enrolled with an operator token).
    /// `NotFound` if there is no such agent.
    pub fn agent_owner(&self, agent_id: &str) -> Result<Option<i64>> {
        self.blocking(|| {
            self.fast()
                .query_row(
                    "SELECT owner_user_id FROM agents WHERE id = ?1",
                    params![agent_id],
                    |r| r.get(0),
                )
                .optional()?
                .ok_or_else(|| StoreError::NotFound(format!("no agent {agent_id}")))
        })
    }

    // === quotas and bounded lists ===

    /// How many catalog subscriptions a user owns.
    pub fn subscription_count(&self, user_id: i64) -> Result<u32> {
        self.blocking(|| {
            Ok(self.fast().query_row(
                "SELECT COUNT(*) FROM schedules WHERE owner_user_id = ?1 AND catalog_name IS NOT NULL",
                params![user_id],
                |r| r.get(0),
            )?)
        })
    }

    /// How many devices (not revoked) a user has linked.
    pub fn device_count(&self, user_id: i64) -> Result<u32> {
        self.blocking(|| {
            Ok(self.fast().query_row(
                "SELECT COUNT(*) FROM agents WHERE owner_user_id = ?1 AND revoked_at IS NULL",
                params![user_id],
                |r| r.get(0),
            )?)
        })
    }

    /// How many of a user's "link a device" tokens are neither used up nor expired.
    pub fn unused_link_tokens(&self, user_id: i64, now: Millis) -> Result<u32> {
        self.blocking(|| {
            Ok(self.fast().query_row(
                "SELECT COUNT(*) FROM tokens
                 WHERE owner_user_id = ?1 AND uses_left > 0 AND expires_at > ?2",
                params![user_id, now],
                |r| r.get(0),
            )?)
        })
    }

    /// Catalog subscriptions, newest first, at most `limit`: one user's (`Some`) or
    /// everyone's, optionally only those on one target (`agent:ID`, ...).
    pub fn subscriptions_page(
        &self,
        owner: Option<i64>,
        target: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Subscription>> {
        self.blocking(|| {
            let ids: Vec<i64> = {
                let conn = self.fast();
                let mut stmt = conn.prepare(
                    "SELECT id FROM schedules
                     WHERE catalog_name IS NOT NULL
                       AND (owner_user_id = ?1 OR ?1 IS NULL) AND (target = ?2 OR ?2 IS NULL)
                     ORDER BY id DESC LIMIT ?3",
                )?;
                let rows = stmt.query_map(params![owner, target, limit], |r| r.get(0))?;
                rows.collect::<Result<_, _>>()?
            };
            // The subscription's own query, row by row (at most `limit` indexed look-ups),
            // keeps one definition of what a subscription reads.
            let mut subscriptions = Vec::with_capacity(ids.len());
            for id in ids {
                match self.service_subscription(id) {
                    Ok(s) => subscriptions.push(s),
                    // Withdrawn between the two reads.
                    Err(StoreError::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(subscriptions)
        })
    }

    /// Operator schedules (not catalog subscriptions), newest first, at most `limit`.
    pub fn operator_schedules(&self, limit: u32) -> Result<Vec<ScheduleInfo>> {
        self.blocking(|| {
            let conn = self.fast();
            let mut stmt = conn.prepare(&format!(
                "{SCHEDULE_SELECT} WHERE s.catalog_name IS NULL ORDER BY s.id DESC LIMIT ?1"
            ))?;
            let rows = stmt.query_map(params![limit], schedule_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// Agents, newest first, at most `limit`, with their groups and their owner's
    /// login; `online` tells which are connected.
    pub fn agents_page(
        &self,
        limit: u32,
        online: &dyn Fn(&str) -> bool,
    ) -> Result<Vec<OwnedAgent>> {
        self.blocking(|| {
            let conn = self.fast();
            let mut stmt = conn.prepare(
                "SELECT a.id, a.name, a.revoked_at, a.enrolled_at, a.last_seen_at, a.version,
                        a.local_addresses, a.observed_address, u.login,
                        (SELECT group_concat(g.group_name, char(10)) FROM agent_groups g
                         WHERE g.agent_id = a.id)
                 FROM agents a LEFT JOIN users u ON u.id = a.owner_user_id
                 ORDER BY a.enrolled_at DESC, a.id LIMIT ?1",
            )?;
            let rows = stmt.query_map(params![limit], |r| {
                let id: String = r.get(0)?;
                let local: String = r.get(6)?;
                let groups: Option<String> = r.get(9)?;
                let mut groups: Vec<String> = groups
                    .unwrap_or_default()
                    .split('\n')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect();
                groups.sort();
                Ok(OwnedAgent {
                    agent: AgentInfo {
                        online: online(&id),
                        id,
                        name: r.get(1)?,
                        revoked_at: r.get(2)?,
                        enrolled_at: r.get(3)?,
                        last_seen_at: r.get(4)?,
                        version: r.get(5)?,
                        groups,
                        local_addresses: local
                            .split(',')
                            .filter(|s| !s.is_empty())
                            .map(str::to_string)
                            .collect(),
                        observed_address: r.get(7)?,
                        facts: serde_json::Value::Null,
                    },
                    owner: r.get(8)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// Accounts, newest first, at most `limit`.
    pub fn users_page(&self, limit: u32) -> Result<Vec<User>> {
        self.blocking(|| {
            let conn = self.fast();
            let mut stmt = conn.prepare(&format!(
                "SELECT {USER_COLUMNS} FROM users u ORDER BY u.id DESC LIMIT ?1"
            ))?;
            let rows = stmt.query_map(params![limit], user_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    // === history ===

    /// Runs, newest first (message deliveries are on the messages page instead): on one
    /// user's devices (`Some`), or everywhere (`None`),
    /// optionally on one device.
    pub fn history(
        &self,
        user_id: Option<i64>,
        agent_id: Option<&str>,
        limit: u32,
    ) -> Result<Vec<HistoryEntry>> {
        self.blocking(|| {
            let conn = self.fast();
            let mut stmt = conn.prepare(&format!(
                "{HISTORY_SELECT}
                 WHERE (a.owner_user_id = ?1 OR ?1 IS NULL) AND (j.agent_id = ?2 OR ?2 IS NULL)
                   AND o.kind <> 'message'
                 ORDER BY j.id DESC LIMIT ?3"
            ))?;
            let rows = stmt.query_map(params![user_id, agent_id, limit], history_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// One run.
    pub fn history_entry(&self, job_id: JobId) -> Result<HistoryEntry> {
        self.blocking(|| {
            self.fast()
                .query_row(
                    &format!("{HISTORY_SELECT} WHERE j.id = ?1"),
                    params![job_id],
                    history_row,
                )
                .optional()?
                .ok_or_else(|| StoreError::NotFound(format!("no job {job_id}")))
        })
    }

    /// Cancels a job that has not finished. Returns false if it already had.
    pub fn cancel_job(&self, job_id: JobId, now: Millis) -> Result<bool> {
        self.blocking(|| {
            let conn = self.conn();
            let changed = conn.execute(
                &format!(
                    "UPDATE jobs SET state = 'canceled', finished_at = ?2,
                            error = 'canceled by an administrator'
                     WHERE id = ?1 AND state IN ({})",
                    JobState::sql_sources(JobState::Canceled)
                ),
                params![job_id, now],
            )?;
            if changed == 0 {
                let exists = conn
                    .query_row("SELECT 1 FROM jobs WHERE id = ?1", params![job_id], |_| {
                        Ok(())
                    })
                    .optional()?
                    .is_some();
                if !exists {
                    return Err(StoreError::NotFound(format!("no job {job_id}")));
                }
            }
            Ok(changed > 0)
        })
    }

    // === forwarding (the rules and the queue themselves: `store::forwarding`) ===

    /// A user's latest deliveries, newest first, with their attempts.
    pub fn user_deliveries(&self, user_id: i64, limit: u32) -> Result<Vec<Delivery>> {
        self.blocking(|| self.deliveries_where("user_id = ?1", user_id, limit))
    }

    /// The deliveries of one job's result, newest first, with their attempts.
    pub fn job_deliveries(&self, job_id: JobId) -> Result<Vec<Delivery>> {
        self.blocking(|| self.deliveries_where("job_id = ?1", job_id, 100))
    }

    fn deliveries_where(&self, filter: &str, key: i64, limit: u32) -> Result<Vec<Delivery>> {
        let conn = self.fast();
        let mut stmt = conn.prepare(&format!(
            "{DELIVERY_SELECT} WHERE {filter} ORDER BY id DESC LIMIT ?2"
        ))?;
        let mut deliveries: Vec<Delivery> = stmt
            .query_map(params![key, limit], delivery_row)?
            .collect::<Result<_, _>>()?;
        let mut attempts = conn.prepare(
            "SELECT at, ok, detail FROM delivery_attempts WHERE delivery_id = ?1 ORDER BY id",
        )?;
        for delivery in &mut deliveries {
            delivery.log = attempts
                .query_map(params![delivery.id], |r| {
                    Ok(DeliveryAttempt {
                        at: r.get(0)?,
                        ok: r.get(1)?,
                        detail: r.get(2)?,
                    })
                })?
                .collect::<Result<_, _>>()?;
        }
        Ok(deliveries)
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_service_job_is_for_its_entry_or_a_one_off_open_of_its_page() {
        let job = |entry: Option<&str>, page: Option<&str>| ServiceJob {
            job_id: 1,
            state: JobState::Waiting,
            entry: entry.map(str::to_string),
            kind: "open".into(),
            page: page.map(str::to_string),
        };
        assert!(job(Some("checkin"), None).is_for("checkin"));
        assert!(!job(Some("other"), None).is_for("checkin"));
        let one_off = job(None, Some("https://h:8443/service/checkin?x=1#top"));
        assert!(one_off.is_for("checkin"));
        assert!(!one_off.is_for("check"));
        assert!(!job(None, Some("https://h/service/checkin/more")).is_for("checkin"));
        assert!(!job(None, Some("https://h/other/service/checkin")).is_for("checkin"));
        assert!(!job(None, None).is_for("checkin"));
    }
    use super::*;

    fn store() -> (Store, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "herald-accounts-{}",
            hex::encode(crate::random_bytes::<6>())
        ));
        std::fs::create_dir_all(&dir).unwrap();
        (Store::open(&dir).unwrap(), dir)
    }

    #[test]
    fn logins_are_unique_and_roles_round_trip() {
        let (store, dir) = store();
        let id = store.add_user("ann", "h", Role::User, "", "", 1).unwrap();
        assert!(matches!(
            store.add_user("ann", "h2", Role::Admin, "", "", 2),
            Err(StoreError::Conflict(_))
        ));
        assert_eq!(store.user(id).unwrap().role, Role::User);
        store.set_role(id, Role::Admin).unwrap();
        assert!(store.user(id).unwrap().is_admin());
        assert!(matches!(
            store.set_role(id + 1, Role::User),
            Err(StoreError::NotFound(_))
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn attempts_count_before_the_check_lock_at_the_fifth_and_a_right_password_resets() {
        let (store, dir) = store();
        let id = store.add_user("bob", "h", Role::User, "", "", 1).unwrap();
        let counted = LoginAttempt::Counted { locks: false };
        for _ in 0..4 {
            assert_eq!(store.begin_login(id, 5, 1_000, 10).unwrap(), counted);
        }
        assert!(store.login_succeeded(id, false, 10).unwrap());
        for _ in 0..4 {
            assert_eq!(store.begin_login(id, 5, 1_000, 10).unwrap(), counted);
        }
        assert!(!store.login_locked(id, 10).unwrap());
        assert_eq!(
            store.begin_login(id, 5, 1_000, 10).unwrap(),
            LoginAttempt::Counted { locks: true }
        );
        let creds = store.credentials("bob").unwrap().unwrap();
        assert_eq!(creds.locked_until, Some(1_010));
        assert!(store.login_locked(id, 1_009).unwrap());
        // Locked: refused uncounted, and an attempt counted before the lock that
        // proves right does not unlock it; the one that set the lock does.
        assert_eq!(
            store.begin_login(id, 5, 1_000, 20).unwrap(),
            LoginAttempt::Locked
        );
        assert!(!store.login_succeeded(id, false, 20).unwrap());
        assert!(store.login_locked(id, 20).unwrap());
        assert!(store.login_succeeded(id, true, 20).unwrap());
        assert!(!store.login_locked(id, 20).unwrap());
        // After a lock runs out, the count starts again.
        for _ in 0..4 {
            store.begin_login(id, 5, 1_000, 30).unwrap();
        }
        assert_eq!(
            store.begin_login(id, 5, 1_000, 30).unwrap(),
            LoginAttempt::Counted { locks: true }
        );
        assert_eq!(
            store.begin_login(id, 5, 1_000, 1_030).unwrap(),
            LoginAttempt::Counted { locks: false }
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn sessions_expire_when_idle_and_end_with_a_password_change() {
        let (store, dir) = store();
        let id = store.add_user("cy", "h", Role::User, "", "", 1).unwrap();
        let long = i64::MAX / 4;
        store
            .create_session("s1", id, "c1", 0, 1_000, long)
            .unwrap();
        store
            .create_session("s2", id, "c2", 0, 1_000, long)
            .unwrap();
        assert_eq!(
            store.session("s1", 999, 1_000, long).unwrap().unwrap().csrf,
            "c1"
        );
        assert!(store.session("s1", 1_000, 1_000, long).unwrap().is_none());
        // Activity pushes the idle expiry forward.
        store
            .create_session("s3", id, "c3", 0, 100_000, long)
            .unwrap();
        assert!(store
            .session("s3", 90_000, 100_000, long)
            .unwrap()
            .is_some());
        assert!(store
            .session("s3", 150_000, 100_000, long)
            .unwrap()
            .is_some());
        store.set_password(id, "h2").unwrap();
        assert!(store
            .session("s3", 150_001, 100_000, long)
            .unwrap()
            .is_none());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn sessions_end_at_their_maximum_age_however_active() {
        let (store, dir) = store();
        let id = store.add_user("dee", "h", Role::User, "", "", 1).unwrap();
        store
            .create_session("s", id, "c", 0, 100_000, 250_000)
            .unwrap();
        for now in [90_000, 180_000, 249_999] {
            assert!(store.session("s", now, 100_000, 250_000).unwrap().is_some());
        }
        assert!(store
            .session("s", 250_000, 100_000, 250_000)
            .unwrap()
            .is_none());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
