//! The server's database: the only place with SQL. SQLite embedded (WAL,
//! `synchronous=FULL` for acknowledged writes, a relaxed connection for what the
//! protocol re-derives), versioned migrations, portable SQL (no SQLite-only syntax
//! beyond the pragmas) so that a PostgreSQL backend can sit behind the same methods.
//!
//! Every write an acknowledgement depends on is committed before this module returns, so
//! "the admin was told the job exists" implies "the job is on disk". Every public method
//! runs through [`Store::blocking`], the one boundary between async code and the
//! database, so no fsync runs on a tokio worker.
//!
//! An unreadable row (a damaged disk, a hand edit) fails alone: the job whose order
//! cannot be decoded is failed with the reason, a schedule stops, a membership is
//! dropped, each logged once; everything else goes on.
//!
//! Files, by what they store:
//! - `mod.rs`: [`Store`] itself (open, the two connections, the boundary), errors, the
//!   row types callers get back;
//! - `migrations.rs`: the schema;
//! - `admin.rs`: admin tokens and their scopes, the audit log;
//! - `agents.rs`: enrollment tokens, agents, addresses, groups, audiences;
//! - `backup.rs`: online copies for `backup`, their checks, snapshots before migration;
//! - `jobs.rs`: orders and jobs, results, expiry, and the text form of `JobState`;
//! - `schedules.rs`: schedules and their firing;
//! - `accounts.rs`: console users, sessions, visits, a user's devices and history;
//! - `catalog.rs`: the service catalog and subscriptions;
//! - `releases.rs`: vendors, releases, package subscriptions, rollouts;
//! - `forwarding.rs`: forwarding rules, confirmation codes, the delivery queue;
//! - `messages.rs`: push-message senders, messages, receipts and block reports;
//! - `campaigns.rs`: recipient lists, fallbacks and their reports, campaign figures;
//! - `metrics.rs`: counts for `/metrics`, and the timing of durable commits;
//! - `peers.rs`: the shares agents report, the directory, tunnel sessions;
//! - `billing.rs`: usage events and the meter step, plans, prices, invoices, closed
//!   months, signed session counters, daily statistics;
//! - `cluster.rs`: nodes, the agents each holds, notices between nodes, leader locks;
//! - `sql.rs`: the two databases behind one interface (SQLite, PostgreSQL);
//! - `testing.rs` (tests only): set-up and inspection helpers for other folders' tests.

mod accounts;
mod admin;
mod agents;
mod backup;
mod billing;
mod campaigns;
mod catalog;
mod clubs;
mod cluster;
mod forwarding;
mod jobs;
mod messages;
mod metrics;
mod migrations;
mod peers;
mod releases;
mod schedules;
pub(crate) mod sql;
#[cfg(test)]
mod testing;

pub use admin::{AdminCaller, MAX_AUDIT_LIST};
pub(crate) use agents::{agent_row, expand, AGENT_SELECT};
pub use backup::{
    advance_job_ids, check_copy, copy_live, latest_schema_version, BackupError, CopyCheck,
    SNAPSHOTS_KEPT, SNAPSHOT_DIR,
};
pub use billing::{MonthUsage, SOURCE_FALLBACKS, SOURCE_JOBS, SOURCE_MESSAGES, SOURCE_SESSIONS};
pub use campaigns::{CampaignPlan, CampaignStarted, FallbackOutcome};
pub use cluster::{LeaderLocks, NodeRow, WORK_CHANNEL};
pub use forwarding::RuleError;
use jobs::*;
pub(crate) use jobs::{decode_envelope, insert_order};
pub use messages::{ReportStored, StoredReceipt, SKIPPED_BLOCKED};
pub use metrics::{Counts, Tally};
use migrations::*;
pub(crate) use schedules::{schedule_row, SCHEDULE_SELECT};
pub(crate) use sql::RESYNC;
#[cfg(test)]
pub(crate) use testing::TestJob;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use sql::{params, Connection, OptionalExtension, Row};

use herald_shared::codec;
use herald_shared::envelope::{Audience, Envelope};
use herald_shared::protocol::{JobId, JobResult};
use herald_shared::schedule::{Missed, Schedule};
use herald_shared::Millis;

use base64::Engine;

use crate::model::{AddressEvent, AgentDetail, AgentInfo, JobInfo, JobState, ScheduleInfo};

/// How long a statement waits for another connection's write lock.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// File name of the database inside the data directory.
pub const DB_FILE: &str = "herald.db";

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Opening or migrating the database failed.
    #[error("cannot open database {path}: {source}")]
    Open {
        /// Database file.
        path: PathBuf,
        /// Cause.
        source: rusqlite::Error,
    },
    /// The database is newer than this server.
    #[error("database schema version {found} is newer than this server understands ({known}); upgrade herald-server")]
    TooNew {
        /// Version found.
        found: usize,
        /// Latest known.
        known: usize,
    },
    /// A query failed.
    #[error("database error: {0}")]
    Sql(rusqlite::Error),
    /// A stored value does not decode.
    #[error("corrupt stored value: {0}")]
    Corrupt(String),
    /// A name or id that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A uniqueness or state conflict.
    #[error("{0}")]
    Conflict(String),
    /// Input that cannot be taken (a list with bad rows under `--strict`).
    #[error("{0}")]
    Invalid(String),
    /// The snapshot before a migration could not be taken (the migration did not run).
    #[error("not migrating without a snapshot: {0}")]
    Snapshot(#[from] BackupError),
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> StoreError {
        match &e {
            // Text PostgreSQL refuses (a NUL character) came with the request: say so
            // as bad input, as SQLite would simply not have found or stored it.
            rusqlite::Error::SqliteFailure(f, Some(message))
                if f.extended_code == rusqlite::ffi::SQLITE_MISMATCH
                    && message.starts_with("PostgreSQL:") =>
            {
                StoreError::Invalid(format!(
                    "the request holds text the database cannot store ({message})"
                ))
            }
            _ => StoreError::Sql(e),
        }
    }
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

pub use crate::model::BlockRequest;

/// A registered enrollment token.
#[derive(Debug, Clone)]
pub struct TokenGrant {
    /// Groups the new agent joins.
    pub groups: Vec<String>,
}

/// What [`Store::pending`] found for an agent.
#[derive(Debug, Clone, Default)]
pub struct PendingJobs {
    /// Jobs ready to be signalled, in job order.
    pub jobs: Vec<Pending>,
    /// Jobs whose stored order could not be read: failed now, with the reason stored.
    pub failed: Vec<JobId>,
}

/// A job ready to be signalled.
#[derive(Debug, Clone)]
pub struct Pending {
    /// Job id.
    pub job_id: JobId,
    /// Signed order.
    pub envelope: Envelope,
    /// For install jobs: the release to attach.
    pub release: Option<PendingRelease>,
    /// For browser jobs: how long the visit may take (the ticket's lifetime).
    pub open_timeout_ms: Option<u64>,
}

/// The release an install job carries.
#[derive(Debug, Clone)]
pub struct PendingRelease {
    /// Signed metadata.
    pub metadata: Envelope,
    /// The vendor's delegation, if vendor-signed.
    pub delegation: Option<Envelope>,
    /// The external URL from the metadata, if any.
    pub url: Option<String>,
    /// Artifact hash (hex), which names it on the server's download endpoint.
    pub sha256: String,
}

/// A schedule as the scheduler needs it.
#[derive(Debug, Clone)]
pub struct DueSchedule {
    /// Id.
    pub id: i64,
    /// Order id.
    pub order_id: String,
    /// Target.
    pub audience: Audience,
    /// When it fires.
    pub schedule: Schedule,
    /// Missed-run policy.
    pub missed: Missed,
    /// Splay.
    pub splay_ms: u64,
    /// TTL of created jobs.
    pub ttl_ms: u64,
    /// The minimum interval the standing order carries (the agent enforces it).
    pub min_interval_ms: u64,
    /// Stored next fire time.
    pub next_fire_at: Millis,
}

/// The database handle. Cloning shares the connections.
///
/// Two connections to the same file. `durable` commits with `synchronous=FULL`: job and
/// schedule creation, results, enrollment, revocation: everything someone is told
/// happened. `relaxed` commits with `synchronous=NORMAL` (in WAL mode: no fsync per
/// commit, still atomic and crash-safe for the process) and serves reads: delivery
/// acknowledgements, "started", addresses, last-seen. A power loss may roll back the
/// latest relaxed writes, and the protocol re-derives them: a job whose ack was lost is
/// `queued` again, is redelivered, and the agent answers `Duplicate`.
#[derive(Clone)]
pub struct Store {
    durable: Arc<Mutex<Connection>>,
    relaxed: Arc<Mutex<Connection>>,
    /// The PostgreSQL database's URL, when the store is there (`[database] url`).
    postgres: Option<Arc<str>>,
    /// How long `durable`'s commits take (`/metrics`).
    commits: Arc<crate::metrics::Histogram>,
}

impl Store {
    /// Opens (creating if needed) and migrates the database in `data_dir`, copying an
    /// older one to `snapshots/` first.
    pub fn open(data_dir: &Path) -> Result<Store> {
        Store::open_database(data_dir, None)
    }

    /// Opens and migrates the store: the PostgreSQL database at `url` when there is one
    /// (`[database] url`), else SQLite's file in `data_dir` (see [`Store::open`]).
    pub fn open_database(data_dir: &Path, url: Option<&str>) -> Result<Store> {
        let commits = Arc::new(crate::metrics::Histogram::new(
            crate::metrics::COMMIT_BOUNDS_US,
        ));
        let (mut durable, relaxed) = match url {
            Some(url) => {
                let open = |url| {
                    Connection::postgres(url).map_err(|source| StoreError::Open {
                        path: PathBuf::from(redact_url(url)),
                        source,
                    })
                };
                (open(url)?, open(url)?)
            }
            None => {
                let path = data_dir.join(DB_FILE);
                let durable = connect(&path, "FULL")?;
                if let Some(sqlite) = durable.sqlite() {
                    backup::snapshot_before_migration(sqlite, data_dir, crate::now_ms())?;
                }
                (durable, connect(&path, "NORMAL")?)
            }
        };
        migrate(&mut durable)?;
        durable.time_commits(commits.clone());
        Ok(Store {
            durable: Arc::new(Mutex::new(durable)),
            relaxed: Arc::new(Mutex::new(relaxed)),
            postgres: url.map(Arc::from),
            commits,
        })
    }

    /// The PostgreSQL database's URL, when the store is there.
    pub fn postgres_url(&self) -> Option<&str> {
        self.postgres.as_deref()
    }

    /// The database boundary: every public store method runs its body through here, so
    /// that SQLite's work (and the fsync of every durable commit) never runs on a tokio
    /// worker thread. On the multi-threaded runtime the worker hands its other tasks to
    /// another thread for the duration (`block_in_place`); anywhere else (the CLI, a
    /// blocking thread, a single-threaded test runtime) the body runs as it is.
    ///
    /// A second implementation (PostgreSQL) sits behind the same methods.
    pub(crate) fn blocking<R>(&self, body: impl FnOnce() -> R) -> R {
        use tokio::runtime::{Handle, RuntimeFlavor};
        match Handle::try_current() {
            Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(body)
            }
            _ => body(),
        }
    }

    pub(crate) fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock would poison it; the connection itself stays
        // consistent (SQLite rolls back the open transaction), so keep using it.
        self.durable.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn fast(&self) -> MutexGuard<'_, Connection> {
        self.relaxed.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Commits a small write, waiting at most `wait` for the write lock: whether the
    /// database takes writes now (`/readyz`).
    pub fn check_writable(&self, wait: std::time::Duration, now: Millis) -> Result<()> {
        self.blocking(|| {
            let conn = self.conn();
            conn.busy_timeout(wait)?;
            let written = conn.execute(
                "INSERT INTO health (id, checked_at) VALUES (1, ?1)
                 ON CONFLICT (id) DO UPDATE SET checked_at = excluded.checked_at",
                params![now],
            );
            conn.busy_timeout(BUSY_TIMEOUT)?;
            written?;
            Ok(())
        })
    }

    /// The name `sql` (one `?1` parameter) finds, if any: a vendor or sender by its
    /// token hash.
    fn name_where(&self, sql: &str, key: &str) -> Result<Option<String>> {
        self.blocking(|| {
            Ok(self
                .fast()
                .query_row(sql, params![key], |r| r.get(0))
                .optional()?)
        })
    }

    /// The name and signed grant `sql` (one `?1` parameter) finds, if any: a vendor's
    /// delegation or a sender's grant by its public key.
    fn name_and_envelope(&self, sql: &str, key: &str) -> Result<Option<(String, Envelope)>> {
        self.blocking(|| {
            let row: Option<(String, Vec<u8>)> = self
                .fast()
                .query_row(sql, params![key], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            row.map(|(name, blob)| Ok((name, decode_envelope(&blob)?)))
                .transpose()
        })
    }
}

fn connect(path: &Path, synchronous: &str) -> Result<Connection> {
    let open_err = |source| StoreError::Open {
        path: path.to_path_buf(),
        source,
    };
    let conn = rusqlite::Connection::open(path).map_err(open_err)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(open_err)?;
    conn.pragma_update(None, "synchronous", synchronous)
        .map_err(open_err)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(open_err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
    Ok(Connection::Sqlite(conn))
}

/// `url` without its password, for messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}
