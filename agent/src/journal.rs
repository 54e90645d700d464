//! The agent's local store (SQLite): job journal, replay cache, result outbox and a few
//! values (signed membership, clock high-water mark).
//!
//! Ordering guarantees the delivery semantics: a job is persisted before it is
//! acknowledged, marked started before anything is spawned, and its result is written to
//! the outbox in the same transaction that marks it finished. After a crash, a started
//! job without a result is reported `interrupted`, never re-run.

use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension, Transaction};

use herald_shared::codec;
use herald_shared::envelope::{Envelope, History};
use herald_shared::protocol::{JobId, JobResult, Status};
use herald_shared::Millis;

use crate::sync::lock;

/// Database file inside the state directory.
pub const DB_FILE: &str = "agent.db";

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS jobs (
    job_id INTEGER PRIMARY KEY,
    order_id TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    envelope BLOB,
    marker TEXT,
    updated_at BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    job_id INTEGER PRIMARY KEY,
    result BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS orders_seen (
    order_id TEXT PRIMARY KEY,
    last_run_at BIGINT NOT NULL,
    keep_until BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
"#;

/// Where a job is in the agent's journal. Stored as text ([`JobState::as_str`]); the
/// only way from one state to another is [`JobState::may_become`]'s table.
///
/// ```text
/// (new) ─► accepted ─► started ─► finished
///   ├────► refused
///   └────► kept
/// ```
///
/// A push message's delivery is a job too (so a redelivered job id is answered
/// `Duplicate`): `kept` when its message went into the inbox ([`crate::inbox`]), or
/// `refused`. Nothing runs for it, so recovery never resumes a `kept` job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobState {
    /// Persisted and acknowledged; not started yet (resumed after a restart).
    Accepted,
    /// Refused; a redelivery gets the same answer.
    Refused,
    /// Marked before anything is spawned; after a crash it is reported interrupted.
    Started,
    /// Its result is in the outbox (or was, until the server stored it).
    Finished,
    /// A push message kept in the inbox; final (nothing runs).
    Kept,
}

impl JobState {
    /// Every state, for tests and table checks.
    pub const ALL: [JobState; 5] = [
        JobState::Accepted,
        JobState::Refused,
        JobState::Started,
        JobState::Finished,
        JobState::Kept,
    ];

    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Accepted => "accepted",
            JobState::Refused => "refused",
            JobState::Started => "started",
            JobState::Finished => "finished",
            JobState::Kept => "kept",
        }
    }

    /// Whether a job in `from` (`None`: not in the journal) may move to `to`.
    pub fn may_become(from: Option<JobState>, to: JobState) -> bool {
        matches!(
            (from, to),
            (None, JobState::Accepted)
                | (None, JobState::Refused)
                | (None, JobState::Kept)
                | (Some(JobState::Accepted), JobState::Started)
                | (Some(JobState::Started), JobState::Finished)
        )
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stored job state that is none of [`JobState`]'s spellings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown job state {0:?}")]
pub struct UnknownState(String);

impl FromStr for JobState {
    type Err = UnknownState;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_string()))
    }
}

/// Errors from the journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// SQLite failed.
    #[error("agent database: {0}")]
    Sql(#[from] rusqlite::Error),
    /// A stored value does not decode.
    #[error("agent database holds a corrupt value: {0}")]
    Corrupt(String),
    /// A job was asked to move between states the journal does not allow (a bug, or a
    /// database edited by hand).
    #[error("job {job_id} cannot become {to} from {}", from.map_or("nothing", JobState::as_str))]
    IllegalTransition {
        /// The job.
        job_id: JobId,
        /// Its state (`None`: not in the journal).
        from: Option<JobState>,
        /// The state asked for.
        to: JobState,
    },
}

type Result<T> = std::result::Result<T, JournalError>;

/// What the journal knows about a job id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Known {
    /// Refused earlier, with this reason.
    Refused(String),
    /// Accepted earlier (running or done).
    Accepted,
}

/// A job to resume after a restart.
#[derive(Debug, Clone)]
pub struct Resume {
    /// Job id.
    pub job_id: JobId,
    /// Its signed order.
    pub envelope: Envelope,
}

/// The local store handle.
#[derive(Clone)]
pub struct Journal {
    conn: Arc<Mutex<Connection>>,
}

impl Journal {
    /// Opens (creating) the journal in the state directory.
    pub fn open(state_dir: &Path) -> Result<Journal> {
        let conn = Connection::open(state_dir.join(DB_FILE))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        Ok(Journal {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        lock(&self.conn)
    }

    /// What is known about a job id.
    pub fn known(&self, job_id: JobId) -> Result<Option<Known>> {
        let row: Option<(String, Option<String>)> = self
            .conn()
            .query_row(
                "SELECT state, reason FROM jobs WHERE job_id = ?1",
                params![job_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        row.map(|(state, reason)| {
            Ok(match parse_state(&state)? {
                JobState::Refused => Known::Refused(reason.unwrap_or_default()),
                JobState::Accepted | JobState::Started | JobState::Finished | JobState::Kept => {
                    Known::Accepted
                }
            })
        })
        .transpose()
    }

    /// The state of a job, if the journal has it.
    pub fn state(&self, job_id: JobId) -> Result<Option<JobState>> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        state_in(&tx, job_id)
    }

    /// Replay-cache lookup for an order id.
    pub fn history(&self, order_id: &str) -> Result<History> {
        let last: Option<Millis> = self
            .conn()
            .query_row(
                "SELECT last_run_at FROM orders_seen WHERE order_id = ?1",
                params![order_id],
                |r| r.get(0),
            )
            .optional()?;
        Ok(last.map_or(History::Unseen, History::LastRun))
    }

    /// Persists an accepted job and records the order in the replay cache, atomically.
    pub fn accept(
        &self,
        job_id: JobId,
        order_id: &str,
        envelope: &Envelope,
        keep_until: Millis,
        now: Millis,
    ) -> Result<()> {
        let blob = codec::to_bytes(envelope).map_err(|e| JournalError::Corrupt(e.to_string()))?;
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        transition(&tx, job_id, JobState::Accepted)?;
        tx.execute(
            "INSERT INTO jobs (job_id, order_id, state, envelope, updated_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![job_id, order_id, JobState::Accepted.as_str(), blob, now],
        )?;
        tx.execute(
            "INSERT INTO orders_seen (order_id, last_run_at, keep_until) VALUES (?1, ?2, ?3)
             ON CONFLICT (order_id) DO UPDATE SET last_run_at = excluded.last_run_at,
                 keep_until = excluded.keep_until",
            params![order_id, now, keep_until],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Persists a refusal so a redelivery gets the same answer.
    pub fn refuse(&self, job_id: JobId, order_id: &str, reason: &str, now: Millis) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        transition(&tx, job_id, JobState::Refused)?;
        tx.execute(
            "INSERT INTO jobs (job_id, order_id, state, reason, updated_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![job_id, order_id, JobState::Refused.as_str(), reason, now],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Marks a job started, with the marker its processes will carry; called before
    /// anything is spawned.
    pub fn started(&self, job_id: JobId, marker: &str, now: Millis) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        transition(&tx, job_id, JobState::Started)?;
        tx.execute(
            "UPDATE jobs SET state = ?4, marker = ?2, updated_at = ?3 WHERE job_id = ?1",
            params![job_id, marker, now, JobState::Started.as_str()],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Marks a job finished and puts its result in the outbox, atomically.
    pub fn finish(&self, result: &JobResult, now: Millis) -> Result<()> {
        let blob = codec::to_bytes(result).map_err(|e| JournalError::Corrupt(e.to_string()))?;
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        transition(&tx, result.job_id, JobState::Finished)?;
        tx.execute(
            "UPDATE jobs SET state = ?3, envelope = NULL, updated_at = ?2 WHERE job_id = ?1",
            params![result.job_id, now, JobState::Finished.as_str()],
        )?;
        tx.execute(
            "INSERT INTO outbox (job_id, result) VALUES (?1, ?2) ON CONFLICT (job_id) DO NOTHING",
            params![result.job_id, blob],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Results not yet acknowledged by the server, oldest first.
    pub fn outbox(&self) -> Result<Vec<JobResult>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT result FROM outbox ORDER BY job_id")?;
        let rows = stmt.query_map([], |r| r.get::<_, Vec<u8>>(0))?;
        let mut results = Vec::new();
        for blob in rows {
            results.push(
                codec::from_bytes(&blob?, codec::RESULT_FRAME_LIMIT)
                    .map_err(|e| JournalError::Corrupt(e.to_string()))?,
            );
        }
        Ok(results)
    }

    /// The job ids of the results not yet acknowledged, oldest first.
    pub fn outbox_ids(&self) -> Result<Vec<JobId>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT job_id FROM outbox ORDER BY job_id")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    /// One result of the outbox, unless the server has acknowledged it meanwhile.
    pub fn outbox_result(&self, job_id: JobId) -> Result<Option<JobResult>> {
        let blob: Option<Vec<u8>> = self
            .conn()
            .query_row(
                "SELECT result FROM outbox WHERE job_id = ?1",
                params![job_id],
                |r| r.get(0),
            )
            .optional()?;
        blob.map(|blob| {
            codec::from_bytes(&blob, codec::RESULT_FRAME_LIMIT)
                .map_err(|e| JournalError::Corrupt(e.to_string()))
        })
        .transpose()
    }

    /// Number of results waiting in the outbox.
    pub fn outbox_len(&self) -> Result<u64> {
        Ok(self
            .conn()
            .query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))?)
    }

    /// The server stored a result: drop it from the outbox.
    pub fn result_stored(&self, job_id: JobId) -> Result<()> {
        self.conn()
            .execute("DELETE FROM outbox WHERE job_id = ?1", params![job_id])?;
        Ok(())
    }

    /// After a restart: reports started-but-unfinished jobs as interrupted (into the
    /// outbox), returning their process markers so leftovers can be killed, and returns
    /// accepted-but-never-started jobs, which may still run.
    /// `spare` is a started job that is not interrupted (a self-update whose outcome the
    /// update record tells).
    pub fn recover(&self, now: Millis, spare: Option<JobId>) -> Result<(Vec<String>, Vec<Resume>)> {
        let started: Vec<(JobId, Option<String>)> = {
            let conn = self.conn();
            let mut stmt = conn.prepare("SELECT job_id, marker FROM jobs WHERE state = ?1")?;
            let rows = stmt.query_map(params![JobState::Started.as_str()], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?;
            rows.collect::<std::result::Result<_, _>>()?
        };
        let mut markers = Vec::new();
        for (job_id, marker) in started {
            if spare == Some(job_id) {
                continue;
            }
            markers.extend(marker);
            self.finish(
                &JobResult::without_output(
                    job_id,
                    Status::Interrupted,
                    0,
                    now,
                    Some("the agent stopped while the job ran; it was not re-run".into()),
                ),
                now,
            )?;
        }
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT job_id, envelope FROM jobs WHERE state = ?1 AND envelope IS NOT NULL ORDER BY job_id",
        )?;
        let rows = stmt.query_map(params![JobState::Accepted.as_str()], |r| {
            Ok((r.get::<_, JobId>(0)?, r.get::<_, Vec<u8>>(1)?))
        })?;
        let mut resume = Vec::new();
        for row in rows {
            let (job_id, blob) = row?;
            resume.push(Resume {
                job_id,
                envelope: codec::from_bytes(&blob, codec::DEFAULT_FRAME_LIMIT)
                    .map_err(|e| JournalError::Corrupt(e.to_string()))?,
            });
        }
        Ok((markers, resume))
    }

    /// Drops replay entries whose orders can no longer be valid, and old finished jobs.
    pub fn prune(&self, now: Millis, keep_jobs_ms: i64) -> Result<()> {
        let conn = self.conn();
        conn.execute(
            "DELETE FROM orders_seen WHERE keep_until < ?1",
            params![now],
        )?;
        conn.execute(
            "DELETE FROM jobs WHERE state IN (?2, ?3, ?4) AND updated_at < ?1
             AND job_id NOT IN (SELECT job_id FROM outbox)",
            params![
                now - keep_jobs_ms,
                JobState::Finished.as_str(),
                JobState::Refused.as_str(),
                JobState::Kept.as_str()
            ],
        )?;
        Ok(())
    }

    /// Runs `f` in one transaction on the agent database, committed if `f` succeeds
    /// (other stores in the same file, such as the inbox, write with the journal
    /// atomically this way).
    pub(crate) fn transaction<T, E: From<JournalError>>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        let mut conn = self.conn();
        // Immediate: the CLI writes the same file while the daemon runs, and a deferred
        // transaction that reads and then writes could not wait for the other's lock.
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(JournalError::from)?;
        let value = f(&tx)?;
        tx.commit().map_err(JournalError::from)?;
        Ok(value)
    }

    /// Runs `f` on the agent database outside a transaction (for reads of other stores
    /// in the same file, such as the share table).
    pub(crate) fn read<T, E: From<JournalError>>(
        &self,
        f: impl FnOnce(&Connection) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        f(&self.conn())
    }

    /// Reads a stored value.
    pub fn value(&self, key: &str) -> Result<Option<Vec<u8>>> {
        Ok(self
            .conn()
            .query_row("SELECT value FROM kv WHERE key = ?1", params![key], |r| {
                r.get(0)
            })
            .optional()?)
    }

    /// Stores a value.
    pub fn set_value(&self, key: &str, value: &[u8]) -> Result<()> {
        self.conn().execute(
            "INSERT INTO kv (key, value) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![key, value],
        )?;
        Ok(())
    }
}

/// Records a job that ends where it starts (`kept`, `refused`) inside `tx`, after
/// checking the transition.
pub(crate) fn record_final(
    tx: &Transaction<'_>,
    job_id: JobId,
    order_id: &str,
    state: JobState,
    reason: Option<&str>,
    now: Millis,
) -> Result<()> {
    transition(tx, job_id, state)?;
    tx.execute(
        "INSERT INTO jobs (job_id, order_id, state, reason, updated_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![job_id, order_id, state.as_str(), reason, now],
    )?;
    Ok(())
}

/// The one place a stored state string becomes a [`JobState`].
fn parse_state(stored: &str) -> Result<JobState> {
    stored
        .parse()
        .map_err(|e: UnknownState| JournalError::Corrupt(e.to_string()))
}

fn state_in(tx: &Transaction<'_>, job_id: JobId) -> Result<Option<JobState>> {
    let stored: Option<String> = tx
        .query_row(
            "SELECT state FROM jobs WHERE job_id = ?1",
            params![job_id],
            |r| r.get(0),
        )
        .optional()?;
    stored.as_deref().map(parse_state).transpose()
}

/// Checks, inside the transaction that will write it, that `job_id` may become `to`.
fn transition(tx: &Transaction<'_>, job_id: JobId, to: JobState) -> Result<()> {
    let from = state_in(tx, job_id)?;
    if JobState::may_become(from, to) {
        Ok(())
    } else {
        Err(JournalError::IllegalTransition { job_id, from, to })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_shared::envelope::PublicKey;

    fn envelope() -> Envelope {
        Envelope {
            signer: PublicKey([0; 32]),
            payload: vec![1, 2, 3],
            signature: vec![0; 64],
        }
    }

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir =
            std::env::temp_dir().join(format!("herald-journal-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn started_job_is_interrupted_after_restart_and_accepted_job_resumes() {
        let dir = temp_dir("recover");
        let journal = Journal::open(&dir).unwrap();
        journal.accept(1, "o1", &envelope(), 10_000, 1).unwrap();
        journal.started(1, "job-1-m", 2).unwrap();
        journal.accept(2, "o2", &envelope(), 10_000, 3).unwrap();
        drop(journal);

        let journal = Journal::open(&dir).unwrap();
        let (markers, resume) = journal.recover(5, None).unwrap();
        assert_eq!(markers, vec!["job-1-m".to_string()]);
        assert_eq!(resume.len(), 1);
        assert_eq!(resume[0].job_id, 2);
        let outbox = journal.outbox().unwrap();
        assert_eq!(outbox.len(), 1);
        assert_eq!(outbox[0].job_id, 1);
        assert_eq!(outbox[0].status, Status::Interrupted);
        // Recovering again does not duplicate the result.
        journal.recover(6, None).unwrap();
        assert_eq!(journal.outbox_len().unwrap(), 1);
        journal.result_stored(1).unwrap();
        assert_eq!(journal.outbox_len().unwrap(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn replay_cache_and_refusals_persist() {
        let dir = temp_dir("replay");
        let journal = Journal::open(&dir).unwrap();
        assert_eq!(journal.history("o1").unwrap(), History::Unseen);
        journal.accept(1, "o1", &envelope(), 10_000, 7).unwrap();
        journal.refuse(2, "o2", "expired", 8).unwrap();
        drop(journal);
        let journal = Journal::open(&dir).unwrap();
        assert_eq!(journal.history("o1").unwrap(), History::LastRun(7));
        assert_eq!(journal.known(1).unwrap(), Some(Known::Accepted));
        assert_eq!(
            journal.known(2).unwrap(),
            Some(Known::Refused("expired".into()))
        );
        assert_eq!(journal.known(3).unwrap(), None);
        journal.prune(20_000, 0).unwrap();
        assert_eq!(journal.history("o1").unwrap(), History::Unseen);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn job_states_round_trip_through_their_stored_spelling() {
        for state in JobState::ALL {
            assert_eq!(state.as_str().parse::<JobState>(), Ok(state));
        }
        assert!("running".parse::<JobState>().is_err());
        assert!("Accepted".parse::<JobState>().is_err());
    }

    #[test]
    fn the_transition_table_allows_only_the_job_lifecycle() {
        use JobState::*;
        let allowed = [
            (None, Accepted),
            (None, Refused),
            (Some(Accepted), Started),
            (Some(Started), Finished),
            (None, Kept),
        ];
        let froms = std::iter::once(None).chain(JobState::ALL.map(Some));
        for from in froms {
            for to in JobState::ALL {
                assert_eq!(
                    JobState::may_become(from, to),
                    allowed.contains(&(from, to)),
                    "{from:?} -> {to:?}"
                );
            }
        }
    }

    #[test]
    fn an_illegal_transition_is_an_error_and_changes_nothing() {
        let dir = temp_dir("transitions");
        let journal = Journal::open(&dir).unwrap();
        let result = |id| JobResult::without_output(id, Status::Succeeded, 1, 2, None);
        // Nothing to start, nothing to finish.
        assert!(matches!(
            journal.started(1, "m", 1),
            Err(JournalError::IllegalTransition {
                job_id: 1,
                from: None,
                to: JobState::Started
            })
        ));
        assert!(matches!(
            journal.finish(&result(1), 1),
            Err(JournalError::IllegalTransition {
                from: None,
                to: JobState::Finished,
                ..
            })
        ));
        assert_eq!(journal.outbox_len().unwrap(), 0);
        journal.accept(1, "o1", &envelope(), 10_000, 1).unwrap();
        // Accepted twice, or refused once accepted: no.
        assert!(matches!(
            journal.accept(1, "o1", &envelope(), 10_000, 2),
            Err(JournalError::IllegalTransition {
                from: Some(JobState::Accepted),
                ..
            })
        ));
        assert!(matches!(
            journal.refuse(1, "o1", "late", 2),
            Err(JournalError::IllegalTransition {
                to: JobState::Refused,
                ..
            })
        ));
        // Finished before started: no.
        assert!(matches!(
            journal.finish(&result(1), 3),
            Err(JournalError::IllegalTransition {
                from: Some(JobState::Accepted),
                ..
            })
        ));
        assert_eq!(journal.state(1).unwrap(), Some(JobState::Accepted));
        journal.started(1, "m", 3).unwrap();
        journal.finish(&result(1), 4).unwrap();
        assert_eq!(journal.state(1).unwrap(), Some(JobState::Finished));
        // Started again after finishing: no.
        assert!(journal.started(1, "m", 5).is_err());
        assert_eq!(journal.outbox_ids().unwrap(), vec![1]);
        journal.refuse(2, "o2", "expired", 5).unwrap();
        assert!(journal.started(2, "m", 6).is_err());
        assert_eq!(journal.state(2).unwrap(), Some(JobState::Refused));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unknown_stored_state_is_reported_corrupt() {
        let dir = temp_dir("corrupt-state");
        let journal = Journal::open(&dir).unwrap();
        journal.accept(1, "o1", &envelope(), 10_000, 1).unwrap();
        journal
            .conn()
            .execute("UPDATE jobs SET state = 'running' WHERE job_id = 1", [])
            .unwrap();
        assert!(matches!(journal.known(1), Err(JournalError::Corrupt(_))));
        assert!(matches!(
            journal.started(1, "m", 2),
            Err(JournalError::Corrupt(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
