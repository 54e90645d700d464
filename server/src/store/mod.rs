//! The server's database: SQLite embedded (WAL, `synchronous=FULL`), versioned
//! migrations, portable SQL (no SQLite-only syntax beyond the pragmas) so that a
//! PostgreSQL backend can follow.
//!
//! Every write an acknowledgement depends on is committed before this module returns, so
//! "the admin was told the job exists" implies "the job is on disk".

mod accounts;
mod catalog;
mod forwarding;
mod releases;
#[cfg(test)]
mod testing;

pub use forwarding::RuleError;
#[cfg(test)]
pub(crate) use testing::TestJob;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension, Row};

use herald_shared::codec;
use herald_shared::envelope::{Audience, Envelope};
use herald_shared::protocol::{JobId, JobResult};
use herald_shared::schedule::{Missed, Schedule};
use herald_shared::Millis;

use crate::model::{AddressEvent, AgentDetail, AgentInfo, JobInfo, JobState, ScheduleInfo};

/// File name of the database inside the data directory.
pub const DB_FILE: &str = "herald.db";

/// Migrations, applied in order; index + 1 is the schema version.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE agents (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    public_key BLOB NOT NULL UNIQUE,
    enrolled_at BIGINT NOT NULL,
    revoked_at BIGINT,
    last_seen_at BIGINT,
    version TEXT,
    facts TEXT NOT NULL DEFAULT '{}',
    local_addresses TEXT NOT NULL DEFAULT '',
    observed_address TEXT,
    membership BLOB
);
CREATE TABLE agent_groups (
    agent_id TEXT NOT NULL REFERENCES agents(id),
    group_name TEXT NOT NULL,
    PRIMARY KEY (agent_id, group_name)
);
CREATE INDEX agent_groups_by_group ON agent_groups(group_name);
CREATE TABLE address_history (
    id INTEGER PRIMARY KEY,
    agent_id TEXT NOT NULL REFERENCES agents(id),
    kind TEXT NOT NULL,
    address TEXT NOT NULL,
    at BIGINT NOT NULL
);
CREATE INDEX address_history_by_agent ON address_history(agent_id, at);
CREATE TABLE tokens (
    secret_hash TEXT PRIMARY KEY,
    groups TEXT NOT NULL,
    uses_left INTEGER NOT NULL,
    expires_at BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE admin_tokens (
    token_hash TEXT PRIMARY KEY,
    created_at BIGINT NOT NULL
);
CREATE TABLE orders (
    id TEXT PRIMARY KEY,
    envelope BLOB NOT NULL,
    action TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE schedules (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    order_id TEXT NOT NULL REFERENCES orders(id),
    target TEXT NOT NULL,
    spec TEXT NOT NULL,
    missed TEXT NOT NULL,
    splay_ms BIGINT NOT NULL,
    ttl_ms BIGINT NOT NULL,
    min_interval_ms BIGINT NOT NULL DEFAULT 0,
    next_fire_at BIGINT,
    created_at BIGINT NOT NULL
);
CREATE INDEX schedules_by_next_fire ON schedules(next_fire_at);
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    agent_id TEXT NOT NULL REFERENCES agents(id),
    order_id TEXT NOT NULL REFERENCES orders(id),
    schedule_id BIGINT,
    state TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    deliver_after BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    delivered_at BIGINT,
    started_at BIGINT,
    finished_at BIGINT,
    attempt INTEGER,
    exit_code INTEGER,
    signal INTEGER,
    stdout BLOB,
    stderr BLOB,
    stdout_truncated INTEGER NOT NULL DEFAULT 0,
    stderr_truncated INTEGER NOT NULL DEFAULT 0,
    error TEXT
);
CREATE INDEX jobs_by_agent_state ON jobs(agent_id, state);
CREATE INDEX jobs_by_state_expiry ON jobs(state, expires_at);
CREATE INDEX jobs_by_state_deliver ON jobs(state, deliver_after);
"#,
    r#"
CREATE TABLE vendors (
    name TEXT PRIMARY KEY,
    public_key TEXT NOT NULL UNIQUE,
    packages TEXT NOT NULL,
    delegation BLOB NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL
);
CREATE TABLE releases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    package TEXT NOT NULL,
    version TEXT NOT NULL,
    platform TEXT NOT NULL,
    vendor TEXT REFERENCES vendors(name),
    metadata BLOB NOT NULL,
    sha256 TEXT NOT NULL,
    length BIGINT NOT NULL,
    url TEXT,
    expires_at BIGINT NOT NULL,
    state TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    published_at BIGINT,
    UNIQUE (package, version, platform)
);
CREATE TABLE package_subscriptions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    package TEXT NOT NULL,
    order_id TEXT NOT NULL REFERENCES orders(id),
    target TEXT NOT NULL,
    waves TEXT NOT NULL,
    max_failures DOUBLE PRECISION NOT NULL,
    ttl_ms BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX package_subscriptions_by_package ON package_subscriptions(package);
CREATE TABLE rollouts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    release_id BIGINT NOT NULL REFERENCES releases(id),
    subscription_id BIGINT NOT NULL REFERENCES package_subscriptions(id),
    state TEXT NOT NULL,
    wave INTEGER NOT NULL,
    reason TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX rollouts_by_state ON rollouts(state);
CREATE TABLE rollout_targets (
    rollout_id BIGINT NOT NULL REFERENCES rollouts(id),
    position INTEGER NOT NULL,
    agent_id TEXT NOT NULL REFERENCES agents(id),
    job_id BIGINT REFERENCES jobs(id),
    PRIMARY KEY (rollout_id, position)
);
ALTER TABLE jobs ADD COLUMN release_id BIGINT REFERENCES releases(id);
ALTER TABLE jobs ADD COLUMN progress TEXT;
"#,
    // Web console: accounts, sessions, the service catalog, users' subscriptions,
    // browser-service visits, and forwarding of results.
    r#"
CREATE TABLE users (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    login TEXT NOT NULL UNIQUE,
    display_name TEXT NOT NULL DEFAULT '',
    email TEXT NOT NULL DEFAULT '',
    phone TEXT NOT NULL DEFAULT '',
    password_hash TEXT NOT NULL,
    role TEXT NOT NULL,
    failed_logins INTEGER NOT NULL DEFAULT 0,
    locked_until BIGINT,
    created_at BIGINT NOT NULL
);
CREATE TABLE web_sessions (
    token_hash TEXT PRIMARY KEY,
    user_id BIGINT NOT NULL REFERENCES users(id),
    csrf TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    last_seen_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX web_sessions_by_user ON web_sessions(user_id);
CREATE TABLE visits (
    token_hash TEXT PRIMARY KEY,
    job_id BIGINT NOT NULL REFERENCES jobs(id),
    csrf TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
ALTER TABLE tokens ADD COLUMN owner_user_id BIGINT REFERENCES users(id);
ALTER TABLE agents ADD COLUMN owner_user_id BIGINT REFERENCES users(id);
CREATE INDEX agents_by_owner ON agents(owner_user_id);
ALTER TABLE orders ADD COLUMN kind TEXT NOT NULL DEFAULT 'run';
ALTER TABLE orders ADD COLUMN open_timeout_ms BIGINT;
CREATE TABLE catalog (
    name TEXT PRIMARY KEY,
    title TEXT NOT NULL,
    description TEXT NOT NULL,
    kind TEXT NOT NULL,
    order_id TEXT NOT NULL REFERENCES orders(id),
    summary TEXT NOT NULL,
    target TEXT NOT NULL,
    min_interval_ms BIGINT NOT NULL,
    not_after BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
ALTER TABLE schedules ADD COLUMN owner_user_id BIGINT REFERENCES users(id);
ALTER TABLE schedules ADD COLUMN catalog_name TEXT;
CREATE INDEX schedules_by_owner ON schedules(owner_user_id);
ALTER TABLE jobs ADD COLUMN visit_redeemed_at BIGINT;
ALTER TABLE jobs ADD COLUMN outcome TEXT;
ALTER TABLE jobs ADD COLUMN forward_pending INTEGER NOT NULL DEFAULT 0;
CREATE INDEX jobs_by_forward ON jobs(forward_pending, state);
CREATE TABLE destinations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id BIGINT NOT NULL REFERENCES users(id),
    schedule_id BIGINT,
    kind TEXT NOT NULL,
    target TEXT NOT NULL,
    secret TEXT,
    only_failures INTEGER NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX destinations_by_user ON destinations(user_id);
CREATE TABLE deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    destination_id BIGINT NOT NULL,
    user_id BIGINT NOT NULL REFERENCES users(id),
    job_id BIGINT NOT NULL REFERENCES jobs(id),
    kind TEXT NOT NULL,
    target TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    last_error TEXT,
    created_at BIGINT NOT NULL,
    finished_at BIGINT
);
CREATE INDEX deliveries_due ON deliveries(state, next_attempt_at);
CREATE INDEX deliveries_by_job ON deliveries(job_id);
CREATE TABLE delivery_attempts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    delivery_id BIGINT NOT NULL REFERENCES deliveries(id),
    at BIGINT NOT NULL,
    ok INTEGER NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX delivery_attempts_by_delivery ON delivery_attempts(delivery_id);
"#,
    // Forwarding: e-mail and SMS rules are confirmed with a code sent to the target
    // (webhooks need none); codes sent and deliveries per user are counted for the
    // daily limits; deliveries are pruned by age.
    r#"
ALTER TABLE destinations ADD COLUMN confirmed_at BIGINT;
ALTER TABLE destinations ADD COLUMN confirm_code_hash TEXT;
ALTER TABLE destinations ADD COLUMN confirm_expires_at BIGINT;
ALTER TABLE destinations ADD COLUMN confirm_tries INTEGER NOT NULL DEFAULT 0;
ALTER TABLE destinations ADD COLUMN confirm_requested_at BIGINT;
ALTER TABLE destinations ADD COLUMN confirm_note TEXT;
UPDATE destinations SET confirmed_at = created_at WHERE kind = 'webhook';
CREATE TABLE confirmation_codes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id BIGINT NOT NULL,
    kind TEXT NOT NULL,
    target TEXT NOT NULL,
    sent_at BIGINT NOT NULL
);
CREATE INDEX confirmation_codes_by_user ON confirmation_codes(user_id, sent_at);
CREATE INDEX destinations_code_requested ON destinations(confirm_requested_at)
    WHERE confirm_requested_at IS NOT NULL;
ALTER TABLE deliveries ADD COLUMN over_limit INTEGER NOT NULL DEFAULT 0;
CREATE INDEX deliveries_by_user ON deliveries(user_id, created_at);
CREATE INDEX deliveries_by_created ON deliveries(created_at);
"#,
];

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
    Sql(#[from] rusqlite::Error),
    /// A stored value does not decode.
    #[error("corrupt stored value: {0}")]
    Corrupt(String),
    /// A name or id that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A uniqueness or state conflict.
    #[error("{0}")]
    Conflict(String),
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

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
}

impl Store {
    /// Opens (creating if needed) and migrates the database in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Store> {
        let path = data_dir.join(DB_FILE);
        let mut durable = connect(&path, "FULL")?;
        migrate(&mut durable)?;
        let relaxed = connect(&path, "NORMAL")?;
        Ok(Store {
            durable: Arc::new(Mutex::new(durable)),
            relaxed: Arc::new(Mutex::new(relaxed)),
        })
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

    // === admin tokens ===

    /// Stores the hash of an admin API token.
    pub fn add_admin_token(&self, token_hash: &str, now: Millis) -> Result<()> {
        self.conn().execute(
            "INSERT INTO admin_tokens (token_hash, created_at) VALUES (?1, ?2)",
            params![token_hash, now],
        )?;
        Ok(())
    }

    /// Whether an admin token hash is known.
    pub fn admin_token_valid(&self, token_hash: &str) -> Result<bool> {
        Ok(self
            .conn()
            .query_row(
                "SELECT 1 FROM admin_tokens WHERE token_hash = ?1",
                params![token_hash],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    // === enrollment ===

    /// Registers an enrollment token by the hash of its secret.
    pub fn add_token(
        &self,
        secret_hash: &str,
        groups: &[String],
        uses: u32,
        expires_at: Millis,
        now: Millis,
    ) -> Result<()> {
        let groups =
            serde_json::to_string(groups).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.conn().execute(
            "INSERT INTO tokens (secret_hash, groups, uses_left, expires_at, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![secret_hash, groups, uses, expires_at, now],
        )?;
        Ok(())
    }

    /// Registers a personal enrollment token: agents enrolled with it belong to the
    /// user (the web console's "link a device").
    pub fn add_user_token(
        &self,
        secret_hash: &str,
        user_id: i64,
        uses: u32,
        expires_at: Millis,
        now: Millis,
    ) -> Result<()> {
        self.conn().execute(
            "INSERT INTO tokens (secret_hash, groups, uses_left, expires_at, created_at, owner_user_id)
             VALUES (?1, '[]', ?2, ?3, ?4, ?5)",
            params![secret_hash, uses, expires_at, now, user_id],
        )?;
        Ok(())
    }

    /// Enrolls an agent with a token: checks and consumes one use of the token and
    /// records the agent, in one transaction. Returns the groups granted, or `None` if the
    /// token is unknown, used up or expired (one answer for all three, on purpose).
    pub fn enroll(
        &self,
        secret_hash: &str,
        agent_id: &str,
        name: &str,
        public_key: &[u8],
        facts: &str,
        now: Millis,
    ) -> Result<Option<TokenGrant>> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let grant: Option<(String, i64, Millis, Option<i64>)> = tx
            .query_row(
                "SELECT groups, uses_left, expires_at, owner_user_id FROM tokens WHERE secret_hash = ?1",
                params![secret_hash],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        let Some((groups, uses_left, expires_at, owner)) = grant else {
            return Ok(None);
        };
        if uses_left <= 0 || expires_at <= now {
            return Ok(None);
        }
        let groups: Vec<String> =
            serde_json::from_str(&groups).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let existing: Option<Option<Millis>> = tx
            .query_row(
                "SELECT revoked_at FROM agents WHERE id = ?1",
                params![agent_id],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(revoked) = existing {
            if revoked.is_some() {
                return Err(StoreError::Conflict(format!(
                    "agent {agent_id} is revoked; it must generate a new identity"
                )));
            }
            return Err(StoreError::Conflict(format!(
                "agent {agent_id} is already enrolled"
            )));
        }
        // Names are unique; on a clash, suffix with the id so enrollment never fails
        // because two machines share a host name. A name shaped like an agent id is
        // suffixed too, so it can never be mistaken for another agent's id.
        let taken: bool = tx
            .query_row(
                "SELECT 1 FROM agents WHERE name = ?1",
                params![name],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
        let id_shaped = name.len() == agent_id.len() && name.bytes().all(|b| b.is_ascii_hexdigit());
        let name = if taken || id_shaped {
            format!("{name}-{}", &agent_id[..6])
        } else {
            name.to_string()
        };
        tx.execute(
            "UPDATE tokens SET uses_left = uses_left - 1 WHERE secret_hash = ?1",
            params![secret_hash],
        )?;
        tx.execute(
            "INSERT INTO agents (id, name, public_key, enrolled_at, facts, owner_user_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![agent_id, name, public_key, now, facts, owner],
        )?;
        for group in &groups {
            tx.execute(
                "INSERT INTO agent_groups (agent_id, group_name) VALUES (?1, ?2)",
                params![agent_id, group],
            )?;
        }
        tx.commit()?;
        Ok(Some(TokenGrant { groups }))
    }

    /// Public keys of all agents, with whether each is revoked (for the handshake check).
    pub fn agent_keys(&self) -> Result<Vec<(Vec<u8>, bool)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT public_key, revoked_at IS NOT NULL FROM agents")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Marks an agent revoked.
    pub fn revoke(&self, agent_id: &str, now: Millis) -> Result<Vec<u8>> {
        let conn = self.conn();
        let key: Vec<u8> = conn
            .query_row(
                "SELECT public_key FROM agents WHERE id = ?1",
                params![agent_id],
                |r| r.get(0),
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound(format!("no agent {agent_id}")))?;
        conn.execute(
            "UPDATE agents SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
            params![agent_id, now],
        )?;
        conn.execute(
            &format!(
                "UPDATE jobs SET state = 'canceled', finished_at = ?2, error = 'agent revoked'
                 WHERE agent_id = ?1 AND state IN ({})",
                JobState::sql_sources(JobState::Canceled)
            ),
            params![agent_id, now],
        )?;
        Ok(key)
    }

    // === agents ===

    /// Records a connection: version, facts, addresses, last seen.
    pub fn agent_connected(
        &self,
        agent_id: &str,
        version: &str,
        facts: &str,
        observed: &str,
        now: Millis,
    ) -> Result<()> {
        let mut conn = self.fast();
        let tx = conn.transaction()?;
        tx.execute(
            "UPDATE agents SET version = ?2, facts = ?3, last_seen_at = ?4 WHERE id = ?1",
            params![agent_id, version, facts, now],
        )?;
        record_observed(&tx, agent_id, observed, now)?;
        tx.commit()?;
        Ok(())
    }

    /// Records the observed remote address if it changed (connect or path migration).
    pub fn observed_address(&self, agent_id: &str, observed: &str, now: Millis) -> Result<()> {
        let mut conn = self.fast();
        let tx = conn.transaction()?;
        record_observed(&tx, agent_id, observed, now)?;
        tx.commit()?;
        Ok(())
    }

    /// Records the agent's reported local addresses if they changed.
    pub fn local_addresses(&self, agent_id: &str, addresses: &str, now: Millis) -> Result<()> {
        let mut conn = self.fast();
        let tx = conn.transaction()?;
        let current: Option<String> = tx
            .query_row(
                "SELECT local_addresses FROM agents WHERE id = ?1",
                params![agent_id],
                |r| r.get(0),
            )
            .optional()?;
        tx.execute(
            "UPDATE agents SET last_seen_at = ?2 WHERE id = ?1",
            params![agent_id, now],
        )?;
        if current.as_deref() != Some(addresses) {
            tx.execute(
                "UPDATE agents SET local_addresses = ?2 WHERE id = ?1",
                params![agent_id, addresses],
            )?;
            tx.execute(
                "INSERT INTO address_history (agent_id, kind, address, at) VALUES (?1, 'local', ?2, ?3)",
                params![agent_id, addresses, now],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Updates last-seen time.
    pub fn touch(&self, agent_id: &str, now: Millis) -> Result<()> {
        self.fast().execute(
            "UPDATE agents SET last_seen_at = ?2 WHERE id = ?1",
            params![agent_id, now],
        )?;
        Ok(())
    }

    /// Finds an agent by id or name.
    pub fn resolve_agent(&self, id_or_name: &str) -> Result<String> {
        // An exact id wins over a name, so nobody can shadow an agent by enrolling a
        // machine named like its id.
        self.fast()
            .query_row(
                "SELECT id FROM agents WHERE id = ?1 OR name = ?1
                 ORDER BY CASE WHEN id = ?1 THEN 0 ELSE 1 END LIMIT 1",
                params![id_or_name],
                |r| r.get(0),
            )
            .optional()?
            .ok_or_else(|| {
                StoreError::NotFound(format!("no agent named or with id {id_or_name:?}"))
            })
    }

    /// Lists agents; `online` tells which are connected.
    pub fn agents(&self, online: &dyn Fn(&str) -> bool) -> Result<Vec<AgentInfo>> {
        let conn = self.fast();
        let mut stmt = conn.prepare(&format!("{AGENT_SELECT} ORDER BY name"))?;
        let rows = stmt.query_map([], |r| agent_row(r, online))?;
        let mut agents: Vec<AgentInfo> = rows.collect::<Result<_, _>>()?;
        for agent in &mut agents {
            agent.groups = groups_of(&conn, &agent.id)?;
        }
        Ok(agents)
    }

    /// Agents enrolled and not revoked (for `/metrics`: one count, not every row).
    pub fn enrolled_count(&self) -> Result<u64> {
        let conn = self.fast();
        let count: i64 = conn.query_row(
            "SELECT COUNT(*) FROM agents WHERE revoked_at IS NULL",
            [],
            |r| r.get(0),
        )?;
        Ok(count as u64)
    }

    /// One agent with its address history.
    pub fn agent(&self, id: &str, online: &dyn Fn(&str) -> bool) -> Result<AgentDetail> {
        let conn = self.fast();
        let mut agent = conn
            .query_row(&format!("{AGENT_SELECT} WHERE id = ?1"), params![id], |r| {
                agent_row(r, online)
            })
            .optional()?
            .ok_or_else(|| StoreError::NotFound(format!("no agent {id}")))?;
        agent.groups = groups_of(&conn, id)?;
        let mut stmt = conn.prepare(
            "SELECT kind, address, at FROM address_history WHERE agent_id = ?1
             ORDER BY at DESC, id DESC LIMIT 100",
        )?;
        let history = stmt
            .query_map(params![id], |r| {
                Ok(AddressEvent {
                    kind: r.get(0)?,
                    address: r.get(1)?,
                    at: r.get(2)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(AgentDetail {
            agent,
            address_history: history,
        })
    }

    /// Whether the agent exists and is not revoked.
    pub fn agent_active(&self, id: &str) -> Result<bool> {
        Ok(self
            .conn()
            .query_row(
                "SELECT 1 FROM agents WHERE id = ?1 AND revoked_at IS NULL",
                params![id],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    /// Replaces an agent's groups with a signed membership.
    pub fn set_membership(
        &self,
        agent_id: &str,
        groups: &[String],
        envelope: &Envelope,
    ) -> Result<()> {
        let blob = codec::to_bytes(envelope).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let changed = tx.execute(
            "UPDATE agents SET membership = ?2 WHERE id = ?1",
            params![agent_id, blob],
        )?;
        if changed == 0 {
            return Err(StoreError::NotFound(format!("no agent {agent_id}")));
        }
        tx.execute(
            "DELETE FROM agent_groups WHERE agent_id = ?1",
            params![agent_id],
        )?;
        for group in groups {
            tx.execute(
                "INSERT INTO agent_groups (agent_id, group_name) VALUES (?1, ?2)",
                params![agent_id, group],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The latest signed membership of an agent.
    pub fn membership(&self, agent_id: &str) -> Result<Option<Envelope>> {
        let blob: Option<Option<Vec<u8>>> = self
            .conn()
            .query_row(
                "SELECT membership FROM agents WHERE id = ?1",
                params![agent_id],
                |r| r.get(0),
            )
            .optional()?;
        let Some(blob) = blob.flatten() else {
            return Ok(None);
        };
        match decode_envelope(&blob) {
            Ok(envelope) => Ok(Some(envelope)),
            Err(e) => {
                // Unreadable: forget it (once, so it is logged once) rather than fail
                // every link to this agent. Jobs for its groups are refused by the agent
                // until the operator signs its membership again (`groups add`).
                self.conn().execute(
                    "UPDATE agents SET membership = NULL WHERE id = ?1",
                    params![agent_id],
                )?;
                tracing::warn!(
                    agent = agent_id,
                    "dropped the agent's stored group membership: it cannot be read ({e}); sign it again with `herald-server groups add`"
                );
                Ok(None)
            }
        }
    }

    /// Active agents an audience names right now.
    pub fn expand(&self, audience: &Audience) -> Result<Vec<String>> {
        let conn = self.fast();
        expand(&conn, audience)
    }

    // === orders and jobs ===

    /// Stores an order and one queued job per agent, in one transaction.
    #[allow(clippy::too_many_arguments)]
    pub fn create_jobs(
        &self,
        order_id: &str,
        envelope: &Envelope,
        action: &herald_shared::envelope::Action,
        agents: &[(String, Millis)],
        schedule_id: Option<i64>,
        ttl_ms: u64,
        now: Millis,
    ) -> Result<Vec<JobId>> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        insert_order(&tx, order_id, envelope, action, now)?;
        let ids = insert_jobs(&tx, order_id, agents, schedule_id, ttl_ms, now)?;
        tx.commit()?;
        Ok(ids)
    }

    /// Jobs waiting to be signalled to an agent (queued, due, not expired).
    pub fn pending(&self, agent_id: &str, now: Millis) -> Result<PendingJobs> {
        let conn = self.fast();
        let mut stmt = conn.prepare(
            "SELECT j.id, o.envelope, r.metadata, v.delegation, r.url, r.sha256, o.open_timeout_ms
             FROM jobs j JOIN orders o ON o.id = j.order_id
             LEFT JOIN releases r ON r.id = j.release_id
             LEFT JOIN vendors v ON v.name = r.vendor
             WHERE j.agent_id = ?1 AND j.state = 'queued' AND j.deliver_after <= ?2
               AND j.expires_at > ?2
             ORDER BY j.id",
        )?;
        let rows = stmt.query_map(params![agent_id, now], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, Option<Vec<u8>>>(2)?,
                r.get::<_, Option<Vec<u8>>>(3)?,
                r.get::<_, Option<String>>(4)?,
                r.get::<_, Option<String>>(5)?,
                r.get::<_, Option<i64>>(6)?,
            ))
        })?;
        let mut pending = Vec::new();
        let mut damaged = Vec::new();
        for row in rows {
            let (job_id, blob, metadata, delegation, url, sha256, open_timeout_ms) = row?;
            // One unreadable row must not stop the others: it fails alone (below).
            let decoded = (|| -> Result<Pending> {
                let release = match metadata {
                    Some(metadata) => Some(PendingRelease {
                        metadata: decode_envelope(&metadata)?,
                        delegation: delegation.map(|d| decode_envelope(&d)).transpose()?,
                        url,
                        sha256: sha256.unwrap_or_default(),
                    }),
                    None => None,
                };
                Ok(Pending {
                    job_id,
                    envelope: decode_envelope(&blob)?,
                    release,
                    open_timeout_ms: open_timeout_ms.map(|ms| ms.max(0) as u64),
                })
            })();
            match decoded {
                Ok(job) => pending.push(job),
                Err(e) => damaged.push((job_id, e.to_string())),
            }
        }
        drop(stmt);
        drop(conn);
        let mut failed = Vec::new();
        for (job_id, reason) in damaged {
            if self.fail_damaged_job(job_id, &reason, now)? {
                tracing::warn!(
                    job = job_id,
                    agent = agent_id,
                    "job failed: its stored order cannot be read ({reason}); the agent's other jobs go on"
                );
                failed.push(job_id);
            }
        }
        Ok(PendingJobs {
            jobs: pending,
            failed,
        })
    }

    /// Marks a queued job whose stored order cannot be decoded as failed, with the
    /// reason. Returns whether it was still queued (so the caller logs it once).
    fn fail_damaged_job(&self, job_id: JobId, reason: &str, now: Millis) -> Result<bool> {
        let changed = self.conn().execute(
            "UPDATE jobs SET state = 'failed', finished_at = ?2,
                    error = 'the stored order is damaged and cannot be sent: ' || ?3
             WHERE id = ?1 AND state = 'queued'",
            params![job_id, now, reason],
        )?;
        Ok(changed > 0)
    }

    /// Records an install job's latest progress report.
    pub fn progress(&self, agent_id: &str, job_id: JobId, progress: &str) -> Result<()> {
        self.fast().execute(
            "UPDATE jobs SET progress = ?3
             WHERE id = ?1 AND agent_id = ?2 AND state IN ('queued', 'delivered', 'running')",
            params![job_id, agent_id, progress],
        )?;
        Ok(())
    }

    /// Applies an agent's acknowledgement. Only the job's own agent can move it.
    pub fn ack(
        &self,
        agent_id: &str,
        job_id: JobId,
        refused: Option<&str>,
        now: Millis,
    ) -> Result<()> {
        self.ack_batch(
            &[(agent_id.to_string(), job_id, refused.map(str::to_string))],
            now,
        )
    }

    /// Applies many acknowledgements in one transaction (the relay batches them: one
    /// commit for a whole broadcast's acks instead of one each). `refused` as in
    /// [`Store::ack`].
    pub fn ack_batch(&self, acks: &[(String, JobId, Option<String>)], now: Millis) -> Result<()> {
        let mut conn = self.fast();
        let tx = conn.transaction()?;
        {
            let mut accepted = tx.prepare_cached(
                "UPDATE jobs SET state = 'delivered', delivered_at = ?3
                 WHERE id = ?1 AND agent_id = ?2 AND state = 'queued'",
            )?;
            let mut refused = tx.prepare_cached(
                "UPDATE jobs SET state = 'refused', delivered_at = ?3, finished_at = ?3, error = ?4
                 WHERE id = ?1 AND agent_id = ?2 AND state IN ('queued', 'delivered')",
            )?;
            for (agent_id, job_id, reason) in acks {
                match reason {
                    None => accepted.execute(params![job_id, agent_id, now])?,
                    Some(reason) => refused.execute(params![job_id, agent_id, now, reason])?,
                };
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Marks a job running.
    pub fn started(&self, agent_id: &str, job_id: JobId, at: Millis, now: Millis) -> Result<()> {
        self.fast().execute(
            "UPDATE jobs SET state = 'running', started_at = ?3,
                    delivered_at = COALESCE(delivered_at, ?4)
             WHERE id = ?1 AND agent_id = ?2 AND state IN ('queued', 'delivered')",
            params![job_id, agent_id, at, now],
        )?;
        Ok(())
    }

    /// Stores a result idempotently: a result for a job already final is ignored.
    /// Returns whether it was stored now.
    pub fn store_result(&self, agent_id: &str, result: &JobResult, now: Millis) -> Result<bool> {
        // A browser service's agent only opened the page: the job waits for the page's
        // outcome (posted to the console) until the order's timeout.
        let changed = self.conn().execute(
            &format!(
            "UPDATE jobs SET
                    state = CASE WHEN ?3 = 'succeeded' AND o.kind = 'open' THEN 'waiting' ELSE ?3 END,
                    expires_at = CASE WHEN ?3 = 'succeeded' AND o.kind = 'open'
                                      THEN ?14 + COALESCE(o.open_timeout_ms, 0) ELSE jobs.expires_at END,
                    attempt = ?4, exit_code = ?5, signal = ?6,
                    stdout = ?7, stderr = ?8, stdout_truncated = ?9, stderr_truncated = ?10,
                    started_at = COALESCE(started_at, ?11), finished_at = ?12, error = ?13,
                    delivered_at = COALESCE(delivered_at, ?14)
             FROM orders o
             WHERE jobs.id = ?1 AND jobs.agent_id = ?2 AND o.id = jobs.order_id
               AND jobs.state IN ({})",
            JobState::sql_list(&JobState::TAKES_RESULT)
        ),
            params![
                result.job_id,
                agent_id,
                result.status.as_str(),
                result.attempt,
                result.exit_code,
                result.signal,
                result.stdout,
                result.stderr,
                result.stdout_truncated,
                result.stderr_truncated,
                (result.started_at > 0).then_some(result.started_at),
                result.finished_at,
                result.error,
                now,
            ],
        )?;
        Ok(changed > 0)
    }

    /// Expires queued jobs whose TTL passed. Returns how many.
    pub fn expire(&self, now: Millis) -> Result<usize> {
        let conn = self.conn();
        let expired = conn.execute(
            "UPDATE jobs SET state = 'expired', finished_at = ?1
             WHERE state = 'queued' AND expires_at <= ?1",
            params![now],
        )?;
        let unanswered = conn.execute(
            "UPDATE jobs SET state = 'timed_out', finished_at = ?1,
                    error = 'the service page was not completed in time'
             WHERE state = 'waiting' AND expires_at <= ?1",
            params![now],
        )?;
        Ok(expired + unanswered)
    }

    /// Earliest time something job-related falls due: a queued job's expiry or delayed
    /// delivery.
    pub fn next_job_deadline(&self, now: Millis) -> Result<Option<Millis>> {
        let conn = self.fast();
        let expiry: Option<Millis> = conn.query_row(
            "SELECT MIN(expires_at) FROM jobs WHERE state IN ('queued', 'waiting')",
            [],
            |r| r.get(0),
        )?;
        let deliver: Option<Millis> = conn.query_row(
            "SELECT MIN(deliver_after) FROM jobs WHERE state = 'queued' AND deliver_after > ?1",
            params![now],
            |r| r.get(0),
        )?;
        Ok([expiry, deliver].into_iter().flatten().min())
    }

    /// Agents with queued jobs whose delayed delivery is due. Jobs due at once
    /// (`deliver_after = created_at`) were handed to their links when they were made.
    pub fn agents_with_due_jobs(&self, now: Millis, since: Millis) -> Result<Vec<String>> {
        let conn = self.fast();
        let mut stmt = conn.prepare(
            "SELECT DISTINCT agent_id FROM jobs WHERE state = 'queued'
             AND deliver_after > ?2 AND deliver_after <= ?1 AND deliver_after > created_at",
        )?;
        let rows = stmt.query_map(params![now, since], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// One job.
    pub fn job(&self, job_id: JobId) -> Result<JobInfo> {
        self.fast()
            .query_row(
                &format!("{JOB_SELECT} WHERE j.id = ?1"),
                params![job_id],
                job_row,
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound(format!("no job {job_id}")))
    }

    /// Jobs, newest first, optionally for one agent.
    pub fn jobs(&self, agent_id: Option<&str>, limit: u32) -> Result<Vec<JobInfo>> {
        let conn = self.fast();
        let mut stmt = conn.prepare(&format!(
            "{JOB_SELECT} WHERE (?1 IS NULL OR j.agent_id = ?1) ORDER BY j.id DESC LIMIT ?2"
        ))?;
        let rows = stmt.query_map(params![agent_id, limit], job_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    // === schedules ===

    /// Stores a schedule and its standing order.
    #[allow(clippy::too_many_arguments)]
    pub fn add_schedule(
        &self,
        order_id: &str,
        envelope: &Envelope,
        action: &herald_shared::envelope::Action,
        target: &Audience,
        schedule: &Schedule,
        missed: Missed,
        splay_ms: u64,
        ttl_ms: u64,
        min_interval_ms: u64,
        next_fire_at: Option<Millis>,
        now: Millis,
    ) -> Result<i64> {
        let spec =
            serde_json::to_string(schedule).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        insert_order(&tx, order_id, envelope, action, now)?;
        tx.execute(
            "INSERT INTO schedules (order_id, target, spec, missed, splay_ms, ttl_ms, min_interval_ms,
                                    next_fire_at, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                order_id,
                target.to_string(),
                spec,
                missed.to_string(),
                splay_ms,
                ttl_ms,
                min_interval_ms,
                next_fire_at,
                now
            ],
        )?;
        let id = tx.last_insert_rowid();
        tx.commit()?;
        Ok(id)
    }

    /// Removes a schedule (its past jobs stay).
    pub fn remove_schedule(&self, id: i64) -> Result<()> {
        let changed = self
            .conn()
            .execute("DELETE FROM schedules WHERE id = ?1", params![id])?;
        if changed == 0 {
            return Err(StoreError::NotFound(format!("no schedule {id}")));
        }
        Ok(())
    }

    /// All schedules.
    pub fn schedules(&self) -> Result<Vec<ScheduleInfo>> {
        let conn = self.fast();
        let mut stmt = conn.prepare(&format!("{SCHEDULE_SELECT} ORDER BY s.id"))?;
        let rows = stmt.query_map([], schedule_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The earliest next fire time of any schedule.
    pub fn next_fire_at(&self) -> Result<Option<Millis>> {
        Ok(self
            .conn()
            .query_row("SELECT MIN(next_fire_at) FROM schedules", [], |r| r.get(0))?)
    }

    /// Schedules due at `now`.
    pub fn due_schedules(&self, now: Millis) -> Result<Vec<DueSchedule>> {
        let conn = self.fast();
        let mut stmt = conn.prepare(
            "SELECT id, order_id, target, spec, missed, splay_ms, ttl_ms, next_fire_at, min_interval_ms
             FROM schedules WHERE next_fire_at <= ?1 ORDER BY next_fire_at",
        )?;
        let rows = stmt.query_map(params![now], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, i64>(6)?,
                r.get::<_, Millis>(7)?,
                r.get::<_, i64>(8)?,
            ))
        })?;
        let mut due = Vec::new();
        let mut damaged = Vec::new();
        for row in rows {
            let (
                id,
                order_id,
                target,
                spec,
                missed,
                splay_ms,
                ttl_ms,
                next_fire_at,
                min_interval_ms,
            ) = row?;
            let decoded = (|| -> std::result::Result<DueSchedule, String> {
                Ok(DueSchedule {
                    id,
                    order_id,
                    audience: target.parse()?,
                    schedule: serde_json::from_str(&spec).map_err(|e| e.to_string())?,
                    missed: missed
                        .parse()
                        .map_err(|_| format!("missed policy {missed:?}"))?,
                    splay_ms: splay_ms as u64,
                    ttl_ms: ttl_ms as u64,
                    min_interval_ms: min_interval_ms.max(0) as u64,
                    next_fire_at,
                })
            })();
            match decoded {
                Ok(schedule) => due.push(schedule),
                Err(reason) => damaged.push((id, reason)),
            }
        }
        drop(stmt);
        drop(conn);
        // One unreadable schedule must not stop the others: it stops firing, once.
        for (id, reason) in damaged {
            let stopped = self.conn().execute(
                "UPDATE schedules SET next_fire_at = NULL WHERE id = ?1 AND next_fire_at IS NOT NULL",
                params![id],
            )?;
            if stopped > 0 {
                tracing::warn!(
                    schedule = id,
                    "schedule stopped: its stored row cannot be read ({reason}); remove it and add it again"
                );
            }
        }
        Ok(due)
    }

    /// Records a firing: creates the jobs and moves the schedule's next fire time, in one
    /// transaction, so a crash never fires twice or loses a firing.
    pub fn fire(
        &self,
        schedule: &DueSchedule,
        agents: &[(String, Millis)],
        next_fire_at: Option<Millis>,
        now: Millis,
    ) -> Result<Vec<JobId>> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        // Move the schedule first: if it was removed since it was read, fire nothing.
        let moved = tx.execute(
            "UPDATE schedules SET next_fire_at = ?2 WHERE id = ?1",
            params![schedule.id, next_fire_at],
        )?;
        if moved == 0 {
            return Ok(Vec::new());
        }
        let ids = insert_jobs(
            &tx,
            &schedule.order_id,
            agents,
            Some(schedule.id),
            schedule.ttl_ms,
            now,
        )?;
        // A user's subscription: its results are forwarded by the user's rules.
        if let (Some(first), Some(last)) = (ids.first(), ids.last()) {
            tx.execute(
                "UPDATE jobs SET forward_pending = 1
                 WHERE id BETWEEN ?1 AND ?2 AND schedule_id = ?3
                   AND EXISTS (SELECT 1 FROM schedules s
                               WHERE s.id = ?3 AND s.owner_user_id IS NOT NULL)",
                params![first, last, schedule.id],
            )?;
        }
        tx.commit()?;
        Ok(ids)
    }

    /// When this agent last received a job from this schedule (acknowledged or started).
    pub fn last_delivery_from_schedule(
        &self,
        agent_id: &str,
        schedule_id: i64,
    ) -> Result<Option<Millis>> {
        Ok(self.fast().query_row(
            "SELECT MAX(COALESCE(delivered_at, started_at)) FROM jobs
             WHERE agent_id = ?1 AND schedule_id = ?2",
            params![agent_id, schedule_id],
            |r| r.get(0),
        )?)
    }

    /// Agents among `agents` that already have an undelivered job from this schedule
    /// (for coalescing missed runs).
    pub fn has_queued_from_schedule(&self, agent_id: &str, schedule_id: i64) -> Result<bool> {
        Ok(self
            .conn()
            .query_row(
                "SELECT 1 FROM jobs WHERE agent_id = ?1 AND schedule_id = ?2 AND state = 'queued' LIMIT 1",
                params![agent_id, schedule_id],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }
}

// === the storage boundary of typed states ===

impl rusqlite::types::ToSql for JobState {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(self.as_str().into())
    }
}

impl rusqlite::types::FromSql for JobState {
    fn column_result(value: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        value
            .as_str()?
            .parse()
            .map_err(|e: crate::model::UnknownState| rusqlite::types::FromSqlError::Other(e.into()))
    }
}

fn connect(path: &Path, synchronous: &str) -> Result<Connection> {
    let open_err = |source| StoreError::Open {
        path: path.to_path_buf(),
        source,
    };
    let conn = Connection::open(path).map_err(open_err)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(open_err)?;
    conn.pragma_update(None, "synchronous", synchronous)
        .map_err(open_err)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(open_err)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(open_err)?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> Result<()> {
    conn.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")?;
    let version: Option<i64> =
        conn.query_row("SELECT MAX(version) FROM schema_version", [], |r| r.get(0))?;
    let version = version.unwrap_or(0) as usize;
    if version > MIGRATIONS.len() {
        return Err(StoreError::TooNew {
            found: version,
            known: MIGRATIONS.len(),
        });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES (?1)",
            params![(index + 1) as i64],
        )?;
        tx.commit()?;
    }
    Ok(())
}

fn record_observed(tx: &Connection, agent_id: &str, observed: &str, now: Millis) -> Result<()> {
    let current: Option<Option<String>> = tx
        .query_row(
            "SELECT observed_address FROM agents WHERE id = ?1",
            params![agent_id],
            |r| r.get(0),
        )
        .optional()?;
    if current.flatten().as_deref() != Some(observed) {
        tx.execute(
            "UPDATE agents SET observed_address = ?2 WHERE id = ?1",
            params![agent_id, observed],
        )?;
        tx.execute(
            "INSERT INTO address_history (agent_id, kind, address, at) VALUES (?1, 'observed', ?2, ?3)",
            params![agent_id, observed, now],
        )?;
    }
    Ok(())
}

pub(crate) fn insert_order(
    tx: &Connection,
    order_id: &str,
    envelope: &Envelope,
    action: &herald_shared::envelope::Action,
    now: Millis,
) -> Result<()> {
    let blob = codec::to_bytes(envelope).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let open_timeout_ms = match action {
        herald_shared::envelope::Action::Open(open) => Some(open.timeout_ms as i64),
        _ => None,
    };
    let inserted = tx.execute(
        "INSERT INTO orders (id, envelope, action, kind, open_timeout_ms, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (id) DO NOTHING",
        params![
            order_id,
            blob,
            action.describe(),
            action.kind(),
            open_timeout_ms,
            now
        ],
    )?;
    if inserted == 0 {
        return Err(StoreError::Conflict(format!(
            "order {order_id} was submitted before; sign a new one"
        )));
    }
    Ok(())
}

fn insert_jobs(
    tx: &Connection,
    order_id: &str,
    agents: &[(String, Millis)],
    schedule_id: Option<i64>,
    ttl_ms: u64,
    now: Millis,
) -> Result<Vec<JobId>> {
    let mut stmt = tx.prepare(
        "INSERT INTO jobs (agent_id, order_id, schedule_id, state, created_at, deliver_after, expires_at)
         VALUES (?1, ?2, ?3, 'queued', ?4, ?5, ?6)",
    )?;
    let mut ids = Vec::with_capacity(agents.len());
    for (agent_id, deliver_after) in agents {
        let expires_at = deliver_after.saturating_add(ttl_ms as i64);
        stmt.execute(params![
            agent_id,
            order_id,
            schedule_id,
            now,
            deliver_after,
            expires_at
        ])?;
        ids.push(tx.last_insert_rowid());
    }
    Ok(ids)
}

pub(crate) fn expand(conn: &Connection, audience: &Audience) -> Result<Vec<String>> {
    let (sql, arg) = match audience {
        Audience::Agent(id) => (
            "SELECT id FROM agents WHERE id = ?1 AND revoked_at IS NULL",
            id.as_str(),
        ),
        Audience::Group(group) => (
            "SELECT a.id FROM agents a JOIN agent_groups g ON g.agent_id = a.id
             WHERE g.group_name = ?1 AND a.revoked_at IS NULL ORDER BY a.id",
            group.as_str(),
        ),
        Audience::All => (
            "SELECT id FROM agents WHERE revoked_at IS NULL AND ?1 = ?1 ORDER BY id",
            "",
        ),
    };
    let mut stmt = conn.prepare(sql)?;
    let rows = stmt.query_map(params![arg], |r| r.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn groups_of(conn: &Connection, agent_id: &str) -> Result<Vec<String>> {
    let mut stmt = conn
        .prepare("SELECT group_name FROM agent_groups WHERE agent_id = ?1 ORDER BY group_name")?;
    let rows = stmt.query_map(params![agent_id], |r| r.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub(crate) fn decode_envelope(blob: &[u8]) -> Result<Envelope> {
    codec::from_bytes(blob, codec::DEFAULT_FRAME_LIMIT)
        .map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// A schedule with its order's action, for [`schedule_row`]; callers add `WHERE`/`ORDER`.
pub(crate) const SCHEDULE_SELECT: &str =
    "SELECT s.id, s.target, s.spec, s.missed, s.splay_ms, o.action, s.next_fire_at, \
     s.created_at FROM schedules s JOIN orders o ON o.id = s.order_id";

pub(crate) fn schedule_row(r: &Row<'_>) -> rusqlite::Result<ScheduleInfo> {
    let spec: String = r.get(2)?;
    let when = serde_json::from_str::<Schedule>(&spec)
        .map(|s| s.describe())
        .unwrap_or_else(|_| format!("unreadable schedule {spec}"));
    Ok(ScheduleInfo {
        id: r.get(0)?,
        target: r.get(1)?,
        when,
        missed: r.get(3)?,
        splay_ms: r.get::<_, i64>(4)?.max(0) as u64,
        action: r.get(5)?,
        next_fire_at: r.get(6)?,
        created_at: r.get(7)?,
    })
}

pub(crate) const AGENT_SELECT: &str =
    "SELECT id, name, revoked_at, enrolled_at, last_seen_at, version, \
     facts, local_addresses, observed_address FROM agents";

pub(crate) fn agent_row(r: &Row<'_>, online: &dyn Fn(&str) -> bool) -> rusqlite::Result<AgentInfo> {
    let id: String = r.get(0)?;
    let facts: String = r.get(6)?;
    let local: String = r.get(7)?;
    Ok(AgentInfo {
        online: online(&id),
        id,
        name: r.get(1)?,
        revoked_at: r.get(2)?,
        enrolled_at: r.get(3)?,
        last_seen_at: r.get(4)?,
        version: r.get(5)?,
        groups: Vec::new(),
        local_addresses: local
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
        observed_address: r.get(8)?,
        facts: serde_json::from_str(&facts).unwrap_or(serde_json::Value::Null),
    })
}

const JOB_SELECT: &str = "SELECT j.id, j.agent_id, a.name, j.schedule_id, o.action, j.state, \
     j.created_at, j.expires_at, j.delivered_at, j.started_at, j.finished_at, j.exit_code, \
     j.signal, j.stdout, j.stderr, j.stdout_truncated, j.stderr_truncated, j.error, \
     j.progress, j.outcome FROM jobs j JOIN orders o ON o.id = j.order_id JOIN agents a ON a.id = j.agent_id";

fn job_row(r: &Row<'_>) -> rusqlite::Result<JobInfo> {
    let text = |i: usize| -> rusqlite::Result<String> {
        let bytes: Option<Vec<u8>> = r.get(i)?;
        Ok(String::from_utf8_lossy(&bytes.unwrap_or_default()).into_owned())
    };
    Ok(JobInfo {
        id: r.get(0)?,
        agent_id: r.get(1)?,
        agent_name: r.get(2)?,
        schedule_id: r.get(3)?,
        action: r.get(4)?,
        state: r.get(5)?,
        created_at: r.get(6)?,
        expires_at: r.get(7)?,
        delivered_at: r.get(8)?,
        started_at: r.get(9)?,
        finished_at: r.get(10)?,
        exit_code: r.get(11)?,
        signal: r.get(12)?,
        stdout: text(13)?,
        stderr: text(14)?,
        stdout_truncated: r.get(15)?,
        stderr_truncated: r.get(16)?,
        error: r.get(17)?,
        progress: r.get(18)?,
        outcome: r.get(19)?,
    })
}
