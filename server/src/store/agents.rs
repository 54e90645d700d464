//! Agents and how they get in: enrollment tokens, enrollment, revocation,
//! connection facts and address history, group membership, audience expansion.

use super::*;

impl Store {
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
        self.blocking(|| {
            let groups =
                serde_json::to_string(groups).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            self.conn().execute(
                "INSERT INTO tokens (secret_hash, groups, uses_left, expires_at, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![secret_hash, groups, uses, expires_at, now],
            )?;
            Ok(())
        })
    }

    /// Enrollment tokens that can still enroll (uses left, not expired), newest first.
    pub fn tokens(&self, now: Millis) -> Result<Vec<crate::model::TokenInfo>> {
        self.blocking(|| {
            let conn = self.fast();
            let mut stmt = conn.prepare(
                "SELECT t.secret_hash, t.groups, t.uses_left, t.expires_at, t.created_at, u.login
                 FROM tokens t LEFT JOIN users u ON u.id = t.owner_user_id
                 WHERE t.uses_left > 0 AND t.expires_at > ?1
                 ORDER BY t.created_at DESC, t.secret_hash",
            )?;
            let rows = stmt.query_map(params![now], |r| {
                let hash: String = r.get(0)?;
                let groups: String = r.get(1)?;
                Ok((hash, groups, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
            })?;
            rows.map(|row| {
                let (hash, groups, uses_left, expires_at, created_at, owner) = row?;
                Ok(crate::model::TokenInfo {
                    id: hash.chars().take(TOKEN_ID_LEN).collect(),
                    groups: serde_json::from_str(&groups)
                        .map_err(|e| StoreError::Corrupt(format!("token groups: {e}")))?,
                    uses_left,
                    expires_at,
                    created_at,
                    owner,
                })
            })
            .collect()
        })
    }

    /// Revokes the enrollment token whose secret's hash starts with `id` (at least
    /// [`TOKEN_ID_LEN`] hex digits, naming one token): it enrolls no one from now on.
    pub fn revoke_token(&self, id: &str) -> Result<()> {
        if id.len() < TOKEN_ID_LEN || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(StoreError::Invalid(format!(
                "{id:?} is not a token id: {TOKEN_ID_LEN} or more hex digits, as `token list` prints"
            )));
        }
        self.blocking(|| {
            let conn = self.conn();
            let pattern = format!("{}%", id.to_ascii_lowercase());
            let matching: Vec<String> = {
                let mut stmt = conn
                    .prepare("SELECT secret_hash FROM tokens WHERE secret_hash LIKE ?1 LIMIT 2")?;
                let rows = stmt.query_map(params![pattern], |r| r.get(0))?;
                rows.collect::<Result<_, _>>()?
            };
            match matching.as_slice() {
                [] => Err(StoreError::NotFound(format!("no enrollment token {id}"))),
                [hash] => {
                    conn.execute("DELETE FROM tokens WHERE secret_hash = ?1", params![hash])?;
                    Ok(())
                }
                _ => Err(StoreError::Conflict(format!(
                    "{id} names more than one token: give more digits"
                ))),
            }
        })
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
        self.blocking(|| {
            self.conn().execute(
                "INSERT INTO tokens (secret_hash, groups, uses_left, expires_at, created_at, owner_user_id)
                 VALUES (?1, '[]', ?2, ?3, ?4, ?5)",
                params![secret_hash, uses, expires_at, now, user_id],
            )?;
            Ok(())
        })
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
        self.blocking(|| {
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
        })
    }

    /// Public keys of all agents, with whether each is revoked (for the handshake check).
    pub fn agent_keys(&self) -> Result<Vec<(Vec<u8>, bool)>> {
        self.blocking(|| {
            let conn = self.conn();
            let mut stmt = conn.prepare("SELECT public_key, revoked_at IS NOT NULL FROM agents")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// Marks an agent revoked.
    pub fn revoke(&self, agent_id: &str, now: Millis) -> Result<Vec<u8>> {
        self.blocking(|| {
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
        })
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
        self.blocking(|| {
            let mut conn = self.fast();
            let tx = conn.transaction()?;
            tx.execute(
                "UPDATE agents SET version = ?2, facts = ?3, last_seen_at = ?4 WHERE id = ?1",
                params![agent_id, version, facts, now],
            )?;
            record_observed(&tx, agent_id, observed, now)?;
            tx.commit()?;
            Ok(())
        })
    }

    /// Records the observed remote address if it changed (connect or path migration).
    pub fn observed_address(&self, agent_id: &str, observed: &str, now: Millis) -> Result<()> {
        self.blocking(|| {
            let mut conn = self.fast();
            let tx = conn.transaction()?;
            record_observed(&tx, agent_id, observed, now)?;
            tx.commit()?;
            Ok(())
        })
    }

    /// Records the agent's reported local addresses if they changed.
    pub fn local_addresses(&self, agent_id: &str, addresses: &str, now: Millis) -> Result<()> {
        self.blocking(|| {
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
        })
    }

    /// Updates last-seen time.
    pub fn touch(&self, agent_id: &str, now: Millis) -> Result<()> {
        self.blocking(|| {
            self.fast().execute(
                "UPDATE agents SET last_seen_at = ?2 WHERE id = ?1",
                params![agent_id, now],
            )?;
            Ok(())
        })
    }

    /// Finds an agent by id or name.
    pub fn resolve_agent(&self, id_or_name: &str) -> Result<String> {
        self.blocking(|| {
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
        })
    }

    /// Lists agents; `online` tells which are connected.
    pub fn agents(&self, online: &dyn Fn(&str) -> bool) -> Result<Vec<AgentInfo>> {
        self.blocking(|| {
            let conn = self.fast();
            let mut stmt = conn.prepare(&format!("{AGENT_SELECT} ORDER BY name"))?;
            let rows = stmt.query_map([], |r| agent_row(r, online))?;
            let mut agents: Vec<AgentInfo> = rows.collect::<Result<_, _>>()?;
            for agent in &mut agents {
                agent.groups = groups_of(&conn, &agent.id)?;
            }
            Ok(agents)
        })
    }

    /// Agents enrolled and not revoked (for `/metrics`: one count, not every row).
    pub fn enrolled_count(&self) -> Result<u64> {
        self.blocking(|| {
            let conn = self.fast();
            let count: i64 = conn.query_row(
                "SELECT COUNT(*) FROM agents WHERE revoked_at IS NULL",
                [],
                |r| r.get(0),
            )?;
            Ok(count as u64)
        })
    }

    /// One agent with its address history.
    pub fn agent(&self, id: &str, online: &dyn Fn(&str) -> bool) -> Result<AgentDetail> {
        self.blocking(|| {
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
        })
    }

    /// Whether the agent exists and was revoked.
    pub fn agent_revoked(&self, id: &str) -> Result<bool> {
        self.blocking(|| {
            Ok(self
                .conn()
                .query_row(
                    "SELECT 1 FROM agents WHERE id = ?1 AND revoked_at IS NOT NULL",
                    params![id],
                    |_| Ok(()),
                )
                .optional()?
                .is_some())
        })
    }

    /// Whether the agent exists and is not revoked.
    pub fn agent_active(&self, id: &str) -> Result<bool> {
        self.blocking(|| {
            Ok(self
                .conn()
                .query_row(
                    "SELECT 1 FROM agents WHERE id = ?1 AND revoked_at IS NULL",
                    params![id],
                    |_| Ok(()),
                )
                .optional()?
                .is_some())
        })
    }

    /// Replaces an agent's groups with a signed membership.
    pub fn set_membership(
        &self,
        agent_id: &str,
        groups: &[String],
        envelope: &Envelope,
    ) -> Result<()> {
        self.blocking(|| {
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
        })
    }

    /// The latest signed membership of an agent.
    pub fn membership(&self, agent_id: &str) -> Result<Option<Envelope>> {
        self.blocking(|| {
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
        })
    }

    /// Active agents an audience names right now.
    pub fn expand(&self, audience: &Audience) -> Result<Vec<String>> {
        self.blocking(|| {
            let conn = self.fast();
            expand(&conn, audience)
        })
    }
}

pub(super) fn record_observed(
    tx: &Connection,
    agent_id: &str,
    observed: &str,
    now: Millis,
) -> Result<()> {
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

pub(super) fn groups_of(conn: &Connection, agent_id: &str) -> Result<Vec<String>> {
    let mut stmt = conn
        .prepare("SELECT group_name FROM agent_groups WHERE agent_id = ?1 ORDER BY group_name")?;
    let rows = stmt.query_map(params![agent_id], |r| r.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
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

/// Hex digits of a token's hash that name it in `token list` and `token revoke`.
pub(crate) const TOKEN_ID_LEN: usize = 12;
