//! What `/metrics` reads from the database, and how long durable commits take.
//!
//! Counts: the two tables that grow without bound are counted incrementally (a
//! [`Tally`] keeps what earlier scrapes counted): jobs below the oldest open job are
//! settled and counted once, by id range; receipts and usage events are insert-only and
//! counted by rowid. So a scrape reads the open and expired jobs (through the state indexes), the
//! jobs since the oldest open one, and the new receipts; the first scrape after a start
//! counts everything once. Forwards and their attempts are pruned by age, messages,
//! rollouts and campaign fallbacks are few or bounded by what senders send: those are
//! grouped as they are. The counting runs on a read-only connection of its own, so a
//! scrape never holds up the relay's writes. The unit test below times scrapes over a
//! million jobs.
//!
//! Commit latency: SQLite calls the commit hook when a commit starts and the
//! write-ahead-log hook when its frames are written and synced, both on the thread that
//! commits; the time between them is the durable commit. Registering a WAL hook
//! replaces SQLite's automatic checkpoint (which is itself a WAL hook), so ours
//! checkpoints the way the default does, at [`AUTOCHECKPOINT_PAGES`].

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use rusqlite::OpenFlags;

use super::sql::{params, Connection, Transaction};

use herald_shared::Millis;

use super::{Result, Store, StoreError};
use crate::metrics::Histogram;

/// Pages in the write-ahead log past which a commit checkpoints it: SQLite's default
/// (`SQLITE_DEFAULT_WAL_AUTOCHECKPOINT`), which our WAL hook takes over.
const AUTOCHECKPOINT_PAGES: i32 = 1000;

/// Counts of what the database holds, by the labels `/metrics` gives them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    /// Jobs by state.
    pub jobs: Vec<(String, u64)>,
    /// Push messages: `live` until they expire, then `expired`.
    pub messages: Vec<(String, u64)>,
    /// Message receipts agents reported, by state (`stored`, `displayed`, ...).
    pub receipts: Vec<(String, u64)>,
    /// Forwarded results by medium (`webhook`, `email`, `sms`) and state.
    pub forwards: Vec<(String, String, u64)>,
    /// Forwarding attempts by medium and result (`ok`, `error`).
    pub forward_attempts: Vec<(String, String, u64)>,
    /// Campaign fallbacks by medium and state.
    pub fallbacks: Vec<(String, String, u64)>,
    /// Package rollouts by state.
    pub rollouts: Vec<(String, u64)>,
    /// Usage events stored, by meter (only ever grows).
    pub usage: Vec<(String, u64)>,
}

/// What earlier counts saw of the two tables that only grow, so that the next count
/// reads only what changed: jobs (never deleted; once settled, a job's state never
/// changes again, except an expired job's late result) and receipts (insert-only).
/// One per `/metrics` source, passed to every [`Store::counts`].
#[derive(Debug, Default)]
pub struct Tally {
    /// Every job with an id up to here was settled or expired when counted.
    jobs_upto: i64,
    /// Their counts by state.
    jobs: BTreeMap<String, u64>,
    /// Receipts with a rowid up to here are counted.
    receipts_upto: i64,
    /// Their counts by state.
    receipts: BTreeMap<String, u64>,
    /// Usage events with an id up to here are counted (insert-only).
    usage_upto: i64,
    /// Their counts by meter.
    usage: BTreeMap<String, u64>,
}

/// States a job leaves again: the open ones (an expired job's late result is caught by
/// its count going down).
const OPEN_STATES: &str = "'queued', 'delivered', 'running', 'waiting'";

impl Store {
    /// Counts for `/metrics`, read in one transaction so that they agree, on a
    /// connection of their own so that no other reader or writer waits for them.
    pub fn counts(&self, tally: &mut Tally, now: Millis) -> Result<Counts> {
        self.blocking(|| {
            let path = self
                .fast()
                .sqlite()
                .and_then(|c| c.path())
                .map(PathBuf::from);
            let mut conn = match (self.postgres_url(), path) {
                (Some(url), _) => Connection::postgres(url)?,
                (None, Some(path)) => Connection::Sqlite(rusqlite::Connection::open_with_flags(
                    path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?),
                (None, None) => return Err(StoreError::Corrupt("the database has no file".into())),
            };
            conn.busy_timeout(super::BUSY_TIMEOUT)?;
            let tx = conn.transaction()?;
            let newest = count_jobs(&tx, tally)?;
            count_appended(
                &tx,
                ("message_receipts", "rowid", "state"),
                &mut tally.receipts_upto,
                &mut tally.receipts,
            )?;
            count_appended(
                &tx,
                ("usage_events", "id", "meter"),
                &mut tally.usage_upto,
                &mut tally.usage,
            )?;
            let counts = Counts {
                jobs: tally_plus(
                    &tally.jobs,
                    by_one(
                        &tx,
                        "SELECT state, COUNT(*) FROM jobs WHERE id > ?1 AND id <= ?2
                         GROUP BY state",
                        params![tally.jobs_upto, newest],
                    )?,
                ),
                messages: by_one(
                    &tx,
                    "SELECT CASE WHEN expires_at > ?1 THEN 'live' ELSE 'expired' END AS state,
                            COUNT(*)
                     FROM messages GROUP BY state",
                    params![now],
                )?,
                receipts: tally
                    .receipts
                    .iter()
                    .map(|(s, n)| (s.clone(), *n))
                    .collect(),
                usage: tally.usage.iter().map(|(m, n)| (m.clone(), *n)).collect(),
                forwards: by_two(
                    &tx,
                    "SELECT kind, state, COUNT(*) FROM deliveries GROUP BY kind, state",
                )?,
                forward_attempts: by_two(
                    &tx,
                    "SELECT d.kind, CASE WHEN a.ok <> 0 THEN 'ok' ELSE 'error' END AS result,
                            COUNT(*)
                     FROM delivery_attempts a JOIN deliveries d ON d.id = a.delivery_id
                     GROUP BY d.kind, result",
                )?,
                fallbacks: by_two(
                    &tx,
                    "SELECT COALESCE(r.fb_kind, c.fallback), r.fb_state, COUNT(*)
                     FROM campaign_rows r JOIN campaigns c ON c.id = r.campaign_id
                     WHERE r.fb_state IS NOT NULL
                     GROUP BY 1, 2",
                )?,
                rollouts: by_one(
                    &tx,
                    "SELECT state, COUNT(*) FROM rollouts GROUP BY state",
                    [],
                )?,
            };
            tx.commit()?;
            Ok(counts)
        })
    }

    /// How long durable commits took.
    pub fn commit_latency(&self) -> &Histogram {
        &self.commits
    }
}

/// Moves `tally`'s job watermark up to just below the oldest open job, counting the
/// jobs it passes, and returns the newest job's id. Reads the open and the expired jobs
/// through the state indexes and the passed jobs by id range; only a first count (after
/// a start, or a late result) reads a whole state index.
///
/// The id ranges are closed on both sides (`id > ?1 AND id <= ?2`): with one side open
/// SQLite walks a state index in full for the `GROUP BY` instead of the few rows.
fn count_jobs(tx: &Transaction<'_>, tally: &mut Tally) -> Result<i64> {
    let expired_below: i64 = tx.query_row(
        "SELECT COUNT(*) FROM jobs WHERE state = 'expired' AND id <= ?1",
        params![tally.jobs_upto],
        |r| r.get(0),
    )?;
    if tally.jobs.get("expired").copied().unwrap_or(0) != expired_below as u64 {
        // An expired job took a late result: count again from the start.
        tally.jobs_upto = 0;
        tally.jobs.clear();
    }
    let newest: i64 = tx.query_row("SELECT COALESCE(MAX(id), 0) FROM jobs", [], |r| r.get(0))?;
    let oldest_open: Option<i64> = tx.query_row(
        &format!("SELECT MIN(id) FROM jobs WHERE state IN ({OPEN_STATES})"),
        [],
        |r| r.get(0),
    )?;
    let upto = oldest_open.map_or(newest, |id| id - 1);
    if upto <= tally.jobs_upto {
        return Ok(newest);
    }
    if tally.jobs_upto == 0 {
        // Everything through the state index, minus the jobs past the watermark.
        let all = by_one(tx, "SELECT state, COUNT(*) FROM jobs GROUP BY state", [])?;
        let past = by_one(
            tx,
            "SELECT state, COUNT(*) FROM jobs WHERE id > ?1 AND id <= ?2 GROUP BY state",
            params![upto, newest],
        )?;
        tally.jobs = all.into_iter().collect();
        for (state, n) in past {
            if let Some(count) = tally.jobs.get_mut(&state) {
                *count -= n;
            }
        }
        tally.jobs.retain(|_, n| *n > 0);
    } else {
        let passed = by_one(
            tx,
            "SELECT state, COUNT(*) FROM jobs WHERE id > ?1 AND id <= ?2 GROUP BY state",
            params![tally.jobs_upto, upto],
        )?;
        for (state, n) in passed {
            *tally.jobs.entry(state).or_default() += n;
        }
    }
    tally.jobs_upto = upto;
    Ok(newest)
}

/// Counts the rows appended to an insert-only `table` since the last count, by
/// `label`, into `counts`; `upto` is the highest `key` counted.
fn count_appended(
    tx: &Transaction<'_>,
    (table, key, label): (&str, &str, &str),
    upto: &mut i64,
    counts: &mut BTreeMap<String, u64>,
) -> Result<()> {
    let newest: i64 = tx.query_row(
        &format!("SELECT COALESCE(MAX({key}), 0) FROM {table}"),
        [],
        |r| r.get(0),
    )?;
    if newest > *upto {
        let mut stmt = tx.prepare(&format!(
            "SELECT {label}, COUNT(*) FROM {table}
             WHERE {key} > ?1 AND {key} <= ?2 GROUP BY {label}"
        ))?;
        let rows = stmt.query_map(params![*upto, newest], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
        })?;
        for row in rows {
            let (value, n) = row?;
            *counts.entry(value).or_default() += n as u64;
        }
        *upto = newest;
    }
    Ok(())
}

/// The tally's counts plus `more`, by label, sorted.
fn tally_plus(tally: &BTreeMap<String, u64>, more: Vec<(String, u64)>) -> Vec<(String, u64)> {
    let mut all = tally.clone();
    for (state, n) in more {
        *all.entry(state).or_default() += n;
    }
    all.into_iter().collect()
}

fn by_one(
    tx: &Transaction<'_>,
    sql: &str,
    params: impl super::sql::Params,
) -> Result<Vec<(String, u64)>> {
    let mut stmt = tx.prepare(sql)?;
    let rows = stmt.query_map(params, |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64)))?;
    let mut all: Vec<(String, u64)> = rows.collect::<Result<_, _>>()?;
    all.sort();
    Ok(all)
}

fn by_two(tx: &Transaction<'_>, sql: &str) -> Result<Vec<(String, String, u64)>> {
    let mut stmt = tx.prepare(sql)?;
    let rows = stmt.query_map([], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64))
    })?;
    let mut all: Vec<(String, String, u64)> = rows.collect::<Result<_, _>>()?;
    all.sort();
    Ok(all)
}

thread_local! {
    /// The commit in progress on this thread: when it started, and where it is
    /// recorded. Set by the commit hook, taken by the WAL hook (a plain `fn`, which
    /// cannot capture the histogram itself).
    static COMMITTING: RefCell<Option<(Instant, Arc<Histogram>)>> = const { RefCell::new(None) };
}

/// Records how long each commit on `conn` takes into `commits`.
pub(super) fn time_commits(conn: &rusqlite::Connection, commits: Arc<Histogram>) {
    conn.commit_hook(Some(move || {
        COMMITTING.with(|c| *c.borrow_mut() = Some((Instant::now(), commits.clone())));
        // false: go on with the commit.
        false
    }));
    conn.wal_hook(Some(committed));
}

fn committed(wal: &rusqlite::hooks::Wal, pages: i32) -> rusqlite::Result<()> {
    if let Some((started, commits)) = COMMITTING.with(|c| c.borrow_mut().take()) {
        commits.observe(started.elapsed());
    }
    if pages >= AUTOCHECKPOINT_PAGES {
        // As SQLite's own hook: a passive checkpoint; a busy reader only delays it.
        let _ = wal.checkpoint();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::TestJob;

    fn store() -> (Store, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "herald-store-metrics-{}",
            hex::encode(crate::random_bytes::<6>())
        ));
        std::fs::create_dir_all(&dir).unwrap();
        (Store::open(&dir).unwrap(), dir)
    }

    #[test]
    fn durable_commits_are_timed_and_relaxed_ones_are_not() {
        let (store, dir) = store();
        let before = count(store.commit_latency());
        store
            .check_writable(std::time::Duration::from_secs(1), 1)
            .unwrap();
        store
            .check_writable(std::time::Duration::from_secs(1), 2)
            .unwrap();
        assert_eq!(count(store.commit_latency()), before + 2);
        store
            .fast()
            .execute("UPDATE health SET checked_at = 3", [])
            .unwrap();
        assert_eq!(count(store.commit_latency()), before + 2);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_wal_is_still_checkpointed() {
        let (store, dir) = store();
        let wal = dir.join(format!("{}-wal", crate::store::DB_FILE));
        // Far more than AUTOCHECKPOINT_PAGES pages: without a checkpoint the log grows
        // to hold them all.
        let blob = vec![7u8; 64 * 1024];
        for i in 0..400 {
            store
                .conn()
                .execute(
                    "INSERT INTO health (id, checked_at) VALUES (?1, 0)",
                    rusqlite::params![i + 10],
                )
                .unwrap();
            store
                .conn()
                .execute("CREATE TABLE IF NOT EXISTS big (b BLOB)", [])
                .unwrap();
            store
                .conn()
                .execute("INSERT INTO big (b) VALUES (?1)", [&blob])
                .unwrap();
        }
        // 400 × 64 KiB = 25 MiB written; a checkpointed log restarts from its start
        // and stays near AUTOCHECKPOINT_PAGES pages (4 MiB with 4 KiB pages).
        let wal_len = std::fs::metadata(&wal).unwrap().len();
        assert!(wal_len < 12 * 1024 * 1024, "WAL is {wal_len} bytes");
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn insert_job_rows(store: &Store) {
        store.insert_test_agent("a1", "one", 0);
        store.insert_test_order("o1", "run", 0);
    }

    fn job(state: &str) -> TestJob<'_> {
        TestJob {
            agent_id: "a1",
            order_id: "o1",
            schedule_id: None,
            state,
            created_at: 0,
            deliver_after: 0,
            expires_at: 0,
            forward_pending: false,
            exit_code: None,
            stdout: None,
            error: None,
            finished_at: None,
        }
    }

    fn count(h: &Histogram) -> u64 {
        let mut text = String::new();
        h.render(&mut text, "x", "x");
        text.lines()
            .find_map(|l| l.strip_prefix("x_count "))
            .unwrap()
            .parse()
            .unwrap()
    }

    #[test]
    fn counts_group_by_their_labels() {
        let (store, dir) = store();
        insert_job_rows(&store);
        for state in ["succeeded", "failed", "queued"] {
            store.insert_test_job(&job(state));
        }
        let counts = store.counts(&mut Tally::default(), 0).unwrap();
        assert_eq!(
            counts.jobs,
            vec![
                ("failed".to_string(), 1),
                ("queued".to_string(), 1),
                ("succeeded".to_string(), 1)
            ]
        );
        assert!(counts.messages.is_empty());
        assert!(counts.rollouts.is_empty());
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// The incremental counts always equal a count from scratch: as jobs settle, as
    /// new ones come, and when an expired job takes a late result.
    #[test]
    fn a_tally_counts_what_a_fresh_count_does() {
        let (store, dir) = store();
        insert_job_rows(&store);
        let mut tally = Tally::default();
        let check = |tally: &mut Tally| {
            let kept = store.counts(tally, 0).unwrap();
            let fresh = store.counts(&mut Tally::default(), 0).unwrap();
            assert_eq!(kept, fresh);
            kept
        };
        let expired = store.insert_test_job(&job("expired"));
        store.insert_test_job(&job("succeeded"));
        let queued = store.insert_test_job(&job("queued"));
        store.insert_test_job(&job("failed"));
        check(&mut tally);
        store.set_test_job_state(queued, "succeeded");
        store.insert_test_job(&job("running"));
        check(&mut tally);
        assert!(tally.jobs_upto >= queued, "settled jobs pass the watermark");
        store.set_test_job_state(expired, "succeeded");
        let counts = check(&mut tally);
        assert_eq!(
            counts.jobs,
            vec![
                ("failed".to_string(), 1),
                ("running".to_string(), 1),
                ("succeeded".to_string(), 3)
            ]
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A scrape every 15 s must stay cheap on a big database: a million jobs (with
    /// output; the newest thousand still open, one in a hundred expired), counted from
    /// scratch once after a start, then incrementally.
    #[test]
    fn counting_a_million_jobs_is_cheap_after_the_first_scrape() {
        let (store, dir) = store();
        insert_job_rows(&store);
        store
            .conn()
            .execute_batch(
                "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000000)
                 INSERT INTO jobs (agent_id, order_id, state, created_at, deliver_after,
                                   expires_at, stdout, stderr)
                 SELECT 'a1', 'o1',
                        CASE WHEN i > 999000 THEN 'queued'
                             WHEN i % 100 = 0 THEN 'expired'
                             WHEN i % 10 = 0 THEN 'failed'
                             ELSE 'succeeded' END,
                        i, i, i, zeroblob(200), zeroblob(50)
                 FROM n",
            )
            .unwrap();
        let mut tally = Tally::default();
        let started = Instant::now();
        let first = store.counts(&mut tally, 0).unwrap();
        let first_took = started.elapsed();
        store.insert_test_job(&job("succeeded"));
        let started = Instant::now();
        let next = store.counts(&mut tally, 0).unwrap();
        let next_took = started.elapsed();
        eprintln!("1,000,000 jobs: first scrape {first_took:?}, next {next_took:?}");
        let total = |c: &Counts| c.jobs.iter().map(|(_, n)| n).sum::<u64>();
        assert_eq!(total(&first), 1_000_000);
        assert_eq!(total(&next), 1_000_001);
        assert!(
            next_took < std::time::Duration::from_millis(50),
            "an incremental scrape took {next_took:?}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
