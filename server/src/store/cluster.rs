//! The nodes of a cluster: each node's heartbeat and the leader roles it holds, the
//! agents each holds (valid while its node's heartbeat is fresh), the notices that carry
//! "agent X has work" between nodes (PostgreSQL's `NOTIFY`), and the locks that make one
//! node the scheduler, the rollout driver, the forwarder and the meter.
//!
//! On SQLite a server is the only node: notices go nowhere and every lock is its own.

use super::sql::{params, Pg};
use super::{Result, Store};

use herald_shared::Millis;

/// The channel nodes tell each other about work on.
pub const WORK_CHANNEL: &str = "herald_work";

/// A node as `nodes list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeRow {
    /// The node's id (its data directory's, stable across restarts).
    pub id: String,
    /// Where agents reach it.
    pub quic_addr: String,
    /// Its HTTPS listener.
    pub http_addr: String,
    /// When it started.
    pub started_at: Millis,
    /// Its latest heartbeat.
    pub heartbeat_at: Millis,
    /// Leader roles it holds (`scheduler`, `rollouts`, ...).
    pub roles: Vec<String>,
    /// Agents connected to it now.
    pub agents: u64,
}

impl Store {
    /// Records that node `node` is alive now, with the roles it holds.
    pub fn node_heartbeat(&self, node: &NodeRow, now: Millis) -> Result<()> {
        self.blocking(|| {
            self.fast().execute(
                "INSERT INTO nodes (id, quic_addr, http_addr, started_at, heartbeat_at, roles)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (id) DO UPDATE SET quic_addr = excluded.quic_addr,
                     http_addr = excluded.http_addr, started_at = excluded.started_at,
                     heartbeat_at = excluded.heartbeat_at, roles = excluded.roles",
                params![
                    node.id,
                    node.quic_addr,
                    node.http_addr,
                    node.started_at,
                    now,
                    node.roles.join(",")
                ],
            )?;
            Ok(())
        })
    }

    /// Records which node holds each of `online` agents now (and that `offline` left
    /// `node`), in one transaction.
    pub fn node_presence(
        &self,
        node: &str,
        online: &[(String, Millis)],
        offline: &[String],
    ) -> Result<()> {
        self.blocking(|| {
            let mut conn = self.fast();
            let tx = conn.transaction()?;
            for agent in offline {
                tx.execute(
                    "DELETE FROM agent_nodes WHERE agent_id = ?1 AND node_id = ?2",
                    params![agent, node],
                )?;
            }
            for (agent, since) in online {
                tx.execute(
                    "INSERT INTO agent_nodes (agent_id, node_id, since) VALUES (?1, ?2, ?3)
                     ON CONFLICT (agent_id) DO UPDATE SET node_id = excluded.node_id,
                         since = excluded.since",
                    params![agent, node, since],
                )?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// Forgets what `node` held (at its start: an earlier run's agents are gone).
    pub fn node_forget_agents(&self, node: &str) -> Result<()> {
        self.blocking(|| {
            self.fast()
                .execute("DELETE FROM agent_nodes WHERE node_id = ?1", params![node])?;
            Ok(())
        })
    }

    /// The nodes whose heartbeat is later than `alive_after`, with the agents each holds.
    pub fn nodes(&self, alive_after: Millis) -> Result<Vec<NodeRow>> {
        self.blocking(|| {
            let conn = self.fast();
            let mut stmt = conn.prepare(
                "SELECT n.id, n.quic_addr, n.http_addr, n.started_at, n.heartbeat_at, n.roles,
                        (SELECT COUNT(*) FROM agent_nodes a WHERE a.node_id = n.id)
                 FROM nodes n WHERE n.heartbeat_at > ?1 ORDER BY n.id",
            )?;
            let rows = stmt.query_map(params![alive_after], |r| {
                let roles: String = r.get(5)?;
                Ok(NodeRow {
                    id: r.get(0)?,
                    quic_addr: r.get(1)?,
                    http_addr: r.get(2)?,
                    started_at: r.get(3)?,
                    heartbeat_at: r.get(4)?,
                    roles: roles
                        .split(',')
                        .filter(|r| !r.is_empty())
                        .map(str::to_string)
                        .collect(),
                    agents: r.get::<_, i64>(6)? as u64,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// The agents live nodes other than `node` hold: since when, and the node's QUIC
    /// address.
    pub fn agents_elsewhere(
        &self,
        node: &str,
        alive_after: Millis,
    ) -> Result<std::collections::HashMap<String, (Millis, String)>> {
        self.blocking(|| {
            let conn = self.fast();
            let mut stmt = conn.prepare(
                "SELECT a.agent_id, a.since, n.quic_addr FROM agent_nodes a
                 JOIN nodes n ON n.id = a.node_id
                 WHERE n.id <> ?1 AND n.heartbeat_at > ?2",
            )?;
            let rows = stmt.query_map(params![node, alive_after], |r| {
                Ok((r.get(0)?, (r.get(1)?, r.get(2)?)))
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// Tells every node (PostgreSQL's `NOTIFY`; nothing on SQLite).
    pub fn notify_nodes(&self, payload: &str) -> Result<()> {
        self.blocking(|| {
            let conn = self.fast();
            if conn.is_postgres() {
                conn.query_row(
                    "SELECT pg_notify(?1, ?2)",
                    params![WORK_CHANNEL, payload],
                    |_| Ok(()),
                )?;
            }
            Ok(())
        })
    }

    /// Starts listening for other nodes' notices (PostgreSQL; `None` on SQLite, where
    /// there are no other nodes).
    pub fn listen_to_nodes(
        &self,
        notices: tokio::sync::mpsc::UnboundedSender<String>,
    ) -> Result<Option<()>> {
        match &self.postgres {
            Some(url) => {
                super::sql::listen(url, WORK_CHANNEL, notices)
                    .map_err(|e| super::StoreError::Corrupt(e.to_string()))?;
                Ok(Some(()))
            }
            None => Ok(None),
        }
    }

    /// A connection of its own to hold leader locks on (PostgreSQL); `None` on SQLite,
    /// where this server leads everything.
    pub fn leader_locks(&self) -> Result<Option<LeaderLocks>> {
        match &self.postgres {
            Some(url) => Ok(Some(LeaderLocks(std::sync::Mutex::new(Pg::connect_once(
                url,
            )?)))),
            None => Ok(None),
        }
    }
}

/// A connection holding PostgreSQL advisory locks, one per leader role: the lock is held
/// while the connection lives, so a node that dies (or loses the database) lets it go.
pub struct LeaderLocks(std::sync::Mutex<Pg>);

impl LeaderLocks {
    /// Takes `role`'s lock if no other node holds it.
    pub fn try_lead(&self, role: &str) -> Result<bool> {
        Ok(self
            .conn()
            .query_bool("SELECT pg_try_advisory_lock(?1)", role_key(role))?)
    }

    /// Whether the connection (and so every lock it took) is still there.
    pub fn alive(&self) -> bool {
        self.conn().query_bool("SELECT ?1 = 0", 0).unwrap_or(false)
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Pg> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The advisory lock key of a leader role.
fn role_key(role: &str) -> i64 {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("herald leader {role}").as_bytes());
    i64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
}
