//! Copies of the database: the online copy `herald-server backup` puts in its archive,
//! the checks `backup verify` and `restore` run on a copy, and the snapshot [`Store::open`]
//! takes before it migrates an older schema.
//!
//! # How the live database is copied
//!
//! With SQLite's online backup API, from a connection of our own (never the server's:
//! `backup` runs as a separate process beside `serve`), in *one* step. The database is in
//! WAL mode, where a reader never blocks a writer, so one step holds a read transaction
//! for the length of the copy and the server keeps committing meanwhile; what the copy
//! holds is exactly the database as of the moment that transaction began. Copying in
//! several small steps would not help writers (they are not blocked anyway) and would
//! hurt the copy: the backup API restarts from page one whenever another process writes
//! between two steps, which under steady load may never finish.
//!
//! # Snapshots before migration
//!
//! When [`Store::open`] finds a database whose schema is older than this server's, it
//! first copies it to `snapshots/herald-vN-<time>.db` in the data directory and keeps
//! the newest [`SNAPSHOTS_KEPT`], so a migration that goes wrong can be undone by
//! stopping the server and putting the snapshot back as `herald.db`.
//!
//! SQL here is SQLite's own (`PRAGMA integrity_check`, `sqlite_sequence`): copies and
//! checks of a file are what a PostgreSQL backend would do with its own tools.

use std::path::{Path, PathBuf};

use rusqlite::backup::{Backup, StepResult};
use rusqlite::{params, Connection, OpenFlags};

use herald_shared::Millis;

use super::{DB_FILE, MIGRATIONS};

/// Directory (inside the data directory) holding the snapshots taken before migrations.
pub const SNAPSHOT_DIR: &str = "snapshots";

/// How many snapshots are kept: enough to step back over the last few upgrades, few
/// enough that a data directory does not grow by a database copy per upgrade forever.
pub const SNAPSHOTS_KEPT: usize = 3;

/// How long a copy waits for a database another connection holds locked.
const COPY_PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);

/// How many `integrity_check` problems are reported at most (SQLite lists one a row).
const INTEGRITY_REPORTED: usize = 10;

/// Errors copying or checking a database file.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// There is no database to copy.
    #[error("no database at {0} (run `herald-server init` first, or pass --data-dir)")]
    Missing(PathBuf),
    /// Another connection kept the database locked for longer than the copy waits.
    #[error("database {0} stayed locked for {secs} s; try again", secs = COPY_PATIENCE.as_secs())]
    Locked(PathBuf),
    /// SQLite refused the file or the copy.
    #[error("database {path}: {source}")]
    Sql {
        /// The file concerned.
        path: PathBuf,
        /// Cause.
        source: rusqlite::Error,
    },
    /// A file or directory operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was attempted.
        action: &'static str,
        /// The file concerned.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

type Result<T, E = BackupError> = std::result::Result<T, E>;

fn sql(path: &Path) -> impl Fn(rusqlite::Error) -> BackupError + '_ {
    move |source| BackupError::Sql {
        path: path.to_path_buf(),
        source,
    }
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl Fn(std::io::Error) -> BackupError + 'a {
    move |source| BackupError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// The schema version this server migrates databases to.
pub fn latest_schema_version() -> usize {
    MIGRATIONS.len()
}

/// What [`check_copy`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyCheck {
    /// The copy's schema version (0 for an empty database).
    pub schema_version: usize,
    /// What `PRAGMA integrity_check` reported, if anything (at most a few lines).
    pub problems: Vec<String>,
}

/// Copies the live database of `data_dir` to `dest` (which must not exist) while a
/// server may be using it, and returns the copy's schema version. See the module docs
/// for why one step.
pub fn copy_live(data_dir: &Path, dest: &Path) -> Result<usize> {
    let source_path = data_dir.join(DB_FILE);
    if !source_path.is_file() {
        return Err(BackupError::Missing(source_path));
    }
    // Read-write without CREATE: a reader of a WAL database takes part in the shared
    // memory index, and a missing file must not be created empty.
    let source = Connection::open_with_flags(
        &source_path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sql(&source_path))?;
    source
        .busy_timeout(super::BUSY_TIMEOUT)
        .map_err(sql(&source_path))?;
    copy(&source, &source_path, dest)?;
    Ok(check_copy(dest)?.schema_version)
}

/// Copies the database `source` (at `source_path`) to a new file `dest` in one backup
/// step, and makes the copy durable.
fn copy(source: &Connection, source_path: &Path, dest: &Path) -> Result<()> {
    let mut target = Connection::open(dest).map_err(sql(dest))?;
    {
        let backup = Backup::new(source, &mut target).map_err(sql(source_path))?;
        let started = std::time::Instant::now();
        // -1: every page in one step (see the module docs). Busy or Locked only happen
        // while another connection holds an exclusive lock (a checkpoint truncating the
        // WAL), which is short: wait and try again, for a while.
        while backup.step(-1).map_err(sql(source_path))? != StepResult::Done {
            if started.elapsed() > COPY_PATIENCE {
                return Err(BackupError::Locked(source_path.to_path_buf()));
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    // A self-contained file: no WAL beside it.
    target
        .pragma_update(None, "journal_mode", "DELETE")
        .map_err(sql(dest))?;
    target.close().map_err(|(_, e)| sql(dest)(e))?;
    std::fs::File::open(dest)
        .and_then(|f| f.sync_all())
        .map_err(io("cannot sync", dest))?;
    Ok(())
}

/// Opens a database copy read-only and runs `PRAGMA integrity_check` on it.
pub fn check_copy(path: &Path) -> Result<CopyCheck> {
    if !path.is_file() {
        return Err(BackupError::Missing(path.to_path_buf()));
    }
    let conn =
        Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(sql(path))?;
    let mut statement = conn.prepare("PRAGMA integrity_check").map_err(sql(path))?;
    let mut problems: Vec<String> = statement
        .query_map([], |r| r.get::<_, String>(0))
        .map_err(sql(path))?
        .collect::<rusqlite::Result<_>>()
        .map_err(sql(path))?;
    if problems.len() == 1 && problems[0] == "ok" {
        problems.clear();
    }
    problems.truncate(INTEGRITY_REPORTED);
    Ok(CopyCheck {
        schema_version: schema_version(&conn).map_err(sql(path))?,
        problems,
    })
}

/// The schema version of an open database (0 when it has none yet).
fn schema_version(conn: &Connection) -> rusqlite::Result<usize> {
    let has_table: bool = conn.query_row(
        "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'",
        [],
        |r| r.get(0),
    )?;
    if !has_table {
        return Ok(0);
    }
    let version: Option<i64> =
        conn.query_row("SELECT MAX(version) FROM schema_version", [], |r| r.get(0))?;
    Ok(version.unwrap_or(0).max(0) as usize)
}

/// Moves the job id counter of the database at `path` on by `gap`, so that a restored
/// server never hands out again an id the old one gave to a job after the backup: agents
/// deduplicate signals by job id and would answer such a job `Duplicate` and never run
/// it. Returns the next job id.
pub fn advance_job_ids(path: &Path, gap: i64) -> Result<i64> {
    let conn = Connection::open(path).map_err(sql(path))?;
    let next = (|| -> rusqlite::Result<i64> {
        let highest: i64 = conn.query_row(
            "SELECT MAX(COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'jobs'), 0),
                        COALESCE((SELECT MAX(id) FROM jobs), 0))",
            [],
            |r| r.get(0),
        )?;
        let seq = highest.saturating_add(gap);
        let tx = conn.unchecked_transaction()?;
        tx.execute("DELETE FROM sqlite_sequence WHERE name = 'jobs'", [])?;
        tx.execute(
            "INSERT INTO sqlite_sequence (name, seq) VALUES ('jobs', ?1)",
            params![seq],
        )?;
        tx.commit()?;
        Ok(seq + 1)
    })()
    .map_err(sql(path))?;
    conn.close().map_err(|(_, e)| sql(path)(e))?;
    Ok(next)
}

/// Before a migration: when the database `conn` (the file in `data_dir`) has a schema
/// older than this server's (and is not new and empty), copies it to
/// `snapshots/herald-vN-<now>.db` and removes all but the newest [`SNAPSHOTS_KEPT`].
/// Returns the snapshot's path, if one was taken.
pub(super) fn snapshot_before_migration(
    conn: &Connection,
    data_dir: &Path,
    now: Millis,
) -> Result<Option<PathBuf>> {
    let db = data_dir.join(DB_FILE);
    let version = schema_version(conn).map_err(sql(&db))?;
    if version == 0 || version >= MIGRATIONS.len() {
        return Ok(None);
    }
    let dir = data_dir.join(SNAPSHOT_DIR);
    herald_io::files::create_private_dir(&dir).map_err(|e| BackupError::Io {
        action: e.action,
        path: e.path,
        source: e.source,
    })?;
    let stamp = chrono::DateTime::from_timestamp_millis(now)
        .unwrap_or_default()
        .format("%Y%m%dT%H%M%S%.3fZ");
    let path = dir.join(format!("herald-v{version}-{stamp}.db"));
    let partial = path.with_extension("partial");
    let _ = std::fs::remove_file(&partial);
    copy(conn, &db, &partial)?;
    std::fs::rename(&partial, &path).map_err(io("cannot rename", &partial))?;
    herald_io::files::sync_dir(&dir);
    tracing::info!(
        snapshot = %path.display(),
        from = version,
        to = MIGRATIONS.len(),
        "database snapshot taken before migrating the schema"
    );
    prune_snapshots(&dir)?;
    Ok(Some(path))
}

/// Removes all but the newest [`SNAPSHOTS_KEPT`] snapshots (by the time in their name).
fn prune_snapshots(dir: &Path) -> Result<()> {
    let mut snapshots: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
        .map_err(io("cannot list", dir))?
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let name = path.file_name()?.to_str()?;
            let stamp = name.strip_prefix("herald-v")?.strip_suffix(".db")?;
            let (_, stamp) = stamp.split_once('-')?;
            Some((stamp.to_string(), path))
        })
        .collect();
    snapshots.sort();
    let excess = snapshots.len().saturating_sub(SNAPSHOTS_KEPT);
    for (_, path) in snapshots.drain(..excess) {
        std::fs::remove_file(&path).map_err(io("cannot remove", &path))?;
        tracing::info!(snapshot = %path.display(), "old database snapshot removed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    fn temp_dir(name: &str) -> herald_tests::TempDir {
        herald_tests::TempDir::new(name)
    }

    /// A database in `dir` migrated only to `version`, with one marker row.
    fn database_at(dir: &Path, version: usize) {
        let conn = Connection::open(dir.join(DB_FILE)).unwrap();
        conn.execute_batch("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            .unwrap();
        for (index, sql) in MIGRATIONS.iter().enumerate().take(version) {
            conn.execute_batch(sql).unwrap();
            conn.execute(
                "INSERT INTO schema_version (version) VALUES (?1)",
                params![(index + 1) as i64],
            )
            .unwrap();
        }
        conn.execute(
            "INSERT INTO admin_tokens (token_hash, created_at) VALUES ('marker', 1)",
            [],
        )
        .unwrap();
    }

    fn snapshots(dir: &Path) -> Vec<PathBuf> {
        let mut all: Vec<PathBuf> = std::fs::read_dir(dir.join(SNAPSHOT_DIR))
            .map(|d| d.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default();
        all.sort();
        all
    }

    #[test]
    fn migration_from_an_older_version_leaves_a_snapshot_at_the_old_version() {
        let dir = temp_dir("snapshot-before-migration");
        let old = MIGRATIONS.len() - 1;
        database_at(dir.path(), old);

        let store = Store::open(dir.path()).unwrap();
        drop(store);

        let taken = snapshots(dir.path());
        assert_eq!(taken.len(), 1, "{taken:?}");
        let name = taken[0].file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with(&format!("herald-v{old}-")), "{name}");
        let check = check_copy(&taken[0]).unwrap();
        assert_eq!(
            check.schema_version, old,
            "the snapshot opens at the old version"
        );
        assert!(check.problems.is_empty(), "{:?}", check.problems);
        let conn = Connection::open(&taken[0]).unwrap();
        let marker: String = conn
            .query_row("SELECT token_hash FROM admin_tokens", [], |r| r.get(0))
            .unwrap();
        assert_eq!(marker, "marker");
        // The live database moved on.
        let live = check_copy(&dir.path().join(DB_FILE)).unwrap();
        assert_eq!(live.schema_version, MIGRATIONS.len());
    }

    #[test]
    fn no_snapshot_for_a_new_or_current_database() {
        let dir = temp_dir("snapshot-none");
        drop(Store::open(dir.path()).unwrap());
        drop(Store::open(dir.path()).unwrap());
        assert!(snapshots(dir.path()).is_empty());
    }

    #[test]
    fn only_the_newest_snapshots_are_kept() {
        let dir = temp_dir("snapshot-prune");
        database_at(dir.path(), 1);
        let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
        for minute in 0..(SNAPSHOTS_KEPT as i64 + 2) {
            let now = 1_800_000_000_000 + minute * 60_000;
            snapshot_before_migration(&conn, dir.path(), now)
                .unwrap()
                .expect("an old database is snapshotted");
        }
        let kept = snapshots(dir.path());
        assert_eq!(kept.len(), SNAPSHOTS_KEPT, "{kept:?}");
        // The two oldest (minutes 0 and 1) went: 1_800_000_000_000 is 08:00:00 UTC.
        let names: Vec<String> = kept
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert!(names[0].ends_with("T080200.000Z.db"), "{names:?}");
        assert!(names[2].ends_with("T080400.000Z.db"), "{names:?}");
    }

    #[test]
    fn a_live_copy_checks_clean_and_job_ids_move_on() {
        let dir = temp_dir("copy-live");
        let store = Store::open(dir.path()).unwrap();
        let copy = dir.path().join("copy.db");
        let version = copy_live(dir.path(), &copy).unwrap();
        assert_eq!(version, MIGRATIONS.len());
        drop(store);
        assert_eq!(
            check_copy(&copy).unwrap(),
            CopyCheck {
                schema_version: MIGRATIONS.len(),
                problems: Vec::new()
            }
        );
        assert_eq!(advance_job_ids(&copy, 1000).unwrap(), 1001);
        assert_eq!(advance_job_ids(&copy, 1000).unwrap(), 2001);
    }

    #[test]
    fn copying_a_missing_database_says_so() {
        let dir = temp_dir("copy-missing");
        let err = copy_live(dir.path(), &dir.path().join("copy.db")).unwrap_err();
        assert!(matches!(err, BackupError::Missing(_)), "{err}");
    }
}
