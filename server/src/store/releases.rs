//! Vendors, releases, package subscriptions and rollouts: their rows, and the install
//! jobs a rollout wave queues.

use super::sql::{params, Connection, OptionalExtension};
use crate::model::*;
use crate::store::{expand, insert_order, Store, StoreError};
use herald_shared::codec;
use herald_shared::envelope::{Audience, Envelope};
use herald_shared::protocol::JobId;
use herald_shared::Millis;

type Result<T, E = StoreError> = std::result::Result<T, E>;

impl Store {
    // === vendors ===

    /// Registers a vendor with its operator-signed delegation and API token hash.
    pub fn add_vendor(
        &self,
        name: &str,
        public_key: &str,
        packages: &[String],
        delegation: &Envelope,
        token_hash: &str,
        now: Millis,
    ) -> Result<()> {
        self.blocking(|| {
            let blob = encode(delegation)?;
            let conn = self.conn();
            let exists: Option<String> = conn
                .query_row(
                    "SELECT name FROM vendors WHERE name = ?1 OR public_key = ?2",
                    params![name, public_key],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(existing) = exists {
                return Err(StoreError::Conflict(format!(
                    "vendor {existing} already exists with that name or key"
                )));
            }
            conn.execute(
                "INSERT INTO vendors (name, public_key, packages, delegation, token_hash, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![name, public_key, packages.join(","), blob, token_hash, now],
            )?;
            Ok(())
        })
    }

    /// Every vendor.
    pub fn vendors(&self) -> Result<Vec<VendorInfo>> {
        self.blocking(|| {
            let conn = self.fast();
            let mut stmt = conn.prepare(
                "SELECT name, public_key, packages, created_at FROM vendors ORDER BY name",
            )?;
            let rows = stmt.query_map([], |r| {
                let packages: String = r.get(2)?;
                Ok(VendorInfo {
                    name: r.get(0)?,
                    public_key: r.get(1)?,
                    packages: packages.split(',').map(str::to_string).collect(),
                    created_at: r.get(3)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// The vendor whose API token has this hash.
    pub fn vendor_by_token(&self, token_hash: &str) -> Result<Option<String>> {
        self.name_where("SELECT name FROM vendors WHERE token_hash = ?1", token_hash)
    }

    /// The vendor holding a public key, with its delegation.
    pub fn vendor_by_key(&self, public_key: &str) -> Result<Option<(String, Envelope)>> {
        self.name_and_envelope(
            "SELECT name, delegation FROM vendors WHERE public_key = ?1",
            public_key,
        )
    }

    // === releases ===

    /// Registers release metadata. An identical release still uploading is returned
    /// again (so an interrupted upload can be retried); anything else that exists is a
    /// conflict.
    #[allow(clippy::too_many_arguments)]
    pub fn add_release(
        &self,
        release: &herald_shared::release::Release,
        vendor: Option<&str>,
        metadata: &Envelope,
        now: Millis,
    ) -> Result<ReleaseInfo> {
        self.blocking(|| {
            let sha256 = hex::encode(release.sha256);
            let conn = self.conn();
            let existing: Option<(i64, String, String)> = conn
                .query_row(
                    "SELECT id, sha256, state FROM releases
                     WHERE package = ?1 AND version = ?2 AND platform = ?3",
                    params![release.package, release.version, release.platform],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?;
            if let Some((id, hash, state)) = existing {
                if hash == sha256 && state == "uploading" {
                    drop(conn);
                    return self.release(id);
                }
                return Err(StoreError::Conflict(format!(
                    "{} {} for {} is already {state}; publish a new version",
                    release.package, release.version, release.platform
                )));
            }
            let state = if release.url.is_some() {
                "published"
            } else {
                "uploading"
            };
            conn.execute(
                "INSERT INTO releases (package, version, platform, vendor, metadata, sha256, length,
                                       url, expires_at, state, created_at, published_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                params![
                    release.package,
                    release.version,
                    release.platform,
                    vendor,
                    encode(metadata)?,
                    sha256,
                    release.length as i64,
                    release.url,
                    release.expires_at,
                    state,
                    now,
                    (state == "published").then_some(now),
                ],
            )?;
            let id = conn.last_insert_rowid();
            drop(conn);
            self.release(id)
        })
    }

    /// One release.
    pub fn release(&self, id: i64) -> Result<ReleaseInfo> {
        self.blocking(|| {
            self.fast()
                .query_row(
                    &format!("{RELEASE_SELECT} WHERE id = ?1"),
                    params![id],
                    release_row,
                )
                .optional()?
                .ok_or_else(|| StoreError::NotFound(format!("no release {id}")))
        })
    }

    /// Releases, newest first, optionally of one package.
    pub fn releases(&self, package: Option<&str>) -> Result<Vec<ReleaseInfo>> {
        self.blocking(|| {
            let conn = self.fast();
            let mut stmt = conn.prepare(&format!(
                "{RELEASE_SELECT} WHERE (package = ?1 OR ?1 IS NULL) ORDER BY id DESC"
            ))?;
            let rows = stmt.query_map(params![package], release_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// Marks a release's artifact complete.
    pub fn publish_release(&self, id: i64, now: Millis) -> Result<()> {
        self.blocking(|| {
            self.conn().execute(
                "UPDATE releases SET state = 'published', published_at = ?2
                 WHERE id = ?1 AND state = 'uploading'",
                params![id, now],
            )?;
            Ok(())
        })
    }

    /// The newest published release of a package for a platform, by semantic version.
    pub fn latest_release(&self, package: &str, platform: &str) -> Result<Option<ReleaseInfo>> {
        self.blocking(|| {
            Ok(self
                .releases(Some(package))?
                .into_iter()
                .filter(|r| r.state == "published" && r.platform == platform)
                .max_by(|a, b| version_of(&a.version).cmp(&version_of(&b.version))))
        })
    }

    /// The newest published operator-signed release of `package` for each platform,
    /// with its signed metadata as stored (what `/install.sh`'s list offers). Releases
    /// whose artifact lives at an external URL are left out: the installer downloads
    /// from this server only.
    pub fn latest_operator_releases(&self, package: &str) -> Result<Vec<(ReleaseInfo, Vec<u8>)>> {
        self.blocking(|| {
            let conn = self.fast();
            let mut stmt = conn.prepare(&format!(
                "{RELEASE_SELECT} WHERE package = ?1 AND vendor IS NULL AND state = 'published'
                 AND url IS NULL ORDER BY platform, id"
            ))?;
            let rows = stmt.query_map(params![package], release_row)?;
            let mut latest: Vec<ReleaseInfo> = Vec::new();
            for row in rows {
                let row = row?;
                match latest.last_mut() {
                    Some(last) if last.platform == row.platform => {
                        if version_of(&row.version) > version_of(&last.version) {
                            *last = row;
                        }
                    }
                    _ => latest.push(row),
                }
            }
            let mut out = Vec::with_capacity(latest.len());
            for release in latest {
                let metadata: Vec<u8> = conn.query_row(
                    "SELECT metadata FROM releases WHERE id = ?1",
                    params![release.id],
                    |r| r.get(0),
                )?;
                out.push((release, metadata));
            }
            Ok(out)
        })
    }

    /// The published release of one exact version for a platform.
    pub fn release_for(
        &self,
        package: &str,
        version: &str,
        platform: &str,
    ) -> Result<Option<ReleaseInfo>> {
        self.blocking(|| {
            Ok(self.releases(Some(package))?.into_iter().find(|r| {
                r.state == "published"
                    && r.platform == platform
                    && version_of(&r.version) == version_of(version)
            }))
        })
    }

    /// Each agent's release platform (from the facts it reported), in one pass over the
    /// agents table.
    pub fn platforms(&self, agents: &[String]) -> Result<Vec<(String, String)>> {
        self.blocking(|| {
            let mut known = std::collections::HashMap::with_capacity(agents.len());
            {
                let conn = self.fast();
                let mut stmt =
                    conn.prepare("SELECT id, facts FROM agents WHERE revoked_at IS NULL")?;
                let rows =
                    stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
                for row in rows {
                    let (id, facts) = row?;
                    known.insert(id, facts);
                }
            }
            Ok(agents
                .iter()
                .map(|agent| {
                    let platform = known
                        .get(agent)
                        .and_then(|f| serde_json::from_str::<serde_json::Value>(f).ok())
                        .and_then(|v| v.get("platform")?.as_str().map(str::to_string))
                        .unwrap_or_default();
                    (agent.clone(), platform)
                })
                .collect())
        })
    }

    /// Creates one-off install jobs, each carrying the release for its agent's platform.
    pub fn create_install_jobs(
        &self,
        order_id: &str,
        envelope: &Envelope,
        action: &herald_shared::envelope::Action,
        targets: &[(String, i64)],
        ttl_ms: u64,
        now: Millis,
    ) -> Result<Vec<JobId>> {
        self.blocking(|| {
            let mut conn = self.conn();
            let tx = conn.transaction()?;
            insert_order(&tx, order_id, envelope, action, now)?;
            let mut ids = Vec::with_capacity(targets.len());
            for (agent, release_id) in targets {
                ids.push(insert_install_job(
                    &tx,
                    agent,
                    order_id,
                    *release_id,
                    ttl_ms,
                    now,
                )?);
            }
            tx.commit()?;
            Ok(ids)
        })
    }

    // === subscriptions ===

    /// Stores a subscription and its standing install order.
    #[allow(clippy::too_many_arguments)]
    pub fn add_subscription(
        &self,
        order_id: &str,
        envelope: &Envelope,
        action: &herald_shared::envelope::Action,
        package: &str,
        audience: &Audience,
        waves: &Waves,
        max_failures: f64,
        ttl_ms: u64,
        now: Millis,
    ) -> Result<i64> {
        self.blocking(|| {
            let mut conn = self.conn();
            let tx = conn.transaction()?;
            insert_order(&tx, order_id, envelope, action, now)?;
            tx.execute(
                "INSERT INTO package_subscriptions (package, order_id, target, waves, max_failures,
                                                    ttl_ms, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    package,
                    order_id,
                    audience.to_string(),
                    waves.to_string(),
                    max_failures,
                    ttl_ms as i64,
                    now
                ],
            )?;
            let id = tx.last_insert_rowid();
            tx.commit()?;
            Ok(id)
        })
    }

    /// Subscriptions, optionally to one package.
    pub fn subscriptions(&self, package: Option<&str>) -> Result<Vec<SubscriptionInfo>> {
        self.blocking(|| {
            let conn = self.fast();
            let mut stmt = conn.prepare(
                "SELECT id, package, target, waves, max_failures, ttl_ms, created_at
                 FROM package_subscriptions WHERE (package = ?1 OR ?1 IS NULL) ORDER BY id",
            )?;
            let rows = stmt.query_map(params![package], |r| {
                Ok(SubscriptionInfo {
                    id: r.get(0)?,
                    package: r.get(1)?,
                    target: r.get(2)?,
                    waves: r.get(3)?,
                    max_failures: r.get(4)?,
                    ttl_ms: r.get::<_, i64>(5)? as u64,
                    created_at: r.get(6)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// Removes a subscription; its running rollouts stop creating jobs.
    pub fn remove_subscription(&self, id: i64, now: Millis) -> Result<()> {
        self.blocking(|| {
            let mut conn = self.conn();
            let tx = conn.transaction()?;
            tx.execute(
                "UPDATE rollouts SET state = 'cancelled', updated_at = ?2
                 WHERE subscription_id = ?1 AND state IN ('running', 'paused')",
                params![id, now],
            )?;
            // Rollouts keep their history; the subscription row stays for them, marked gone
            // by an empty target.
            let changed = tx.execute(
                "UPDATE package_subscriptions SET target = '' WHERE id = ?1 AND target <> ''",
                params![id],
            )?;
            if changed == 0 {
                return Err(StoreError::NotFound(format!("no subscription {id}")));
            }
            tx.commit()?;
            Ok(())
        })
    }

    // === rollouts ===

    /// Starts a rollout of `release_id` for a subscription over `targets` (in order),
    /// superseding the subscription's unfinished rollouts for the same platform.
    pub fn start_rollout(
        &self,
        subscription_id: i64,
        release_id: i64,
        targets: &[String],
        now: Millis,
    ) -> Result<i64> {
        self.blocking(|| {
            let mut conn = self.conn();
            let tx = conn.transaction()?;
            tx.execute(
                "UPDATE rollouts SET state = 'superseded', updated_at = ?3
                 WHERE subscription_id = ?1 AND state IN ('running', 'paused', 'halted')
                   AND release_id IN (SELECT id FROM releases WHERE platform =
                                      (SELECT platform FROM releases WHERE id = ?2))",
                params![subscription_id, release_id, now],
            )?;
            tx.execute(
                "INSERT INTO rollouts (release_id, subscription_id, state, wave, created_at, updated_at)
                 VALUES (?1, ?2, 'running', 0, ?3, ?3)",
                params![release_id, subscription_id, now],
            )?;
            let id = tx.last_insert_rowid();
            {
                let mut stmt = tx.prepare(
                    "INSERT INTO rollout_targets (rollout_id, position, agent_id) VALUES (?1, ?2, ?3)",
                )?;
                for (position, agent) in targets.iter().enumerate() {
                    stmt.execute(params![id, position as i64, agent])?;
                }
            }
            tx.commit()?;
            Ok(id)
        })
    }

    /// Pauses or resumes a rollout.
    pub fn set_rollout_state(&self, id: i64, pause: bool, now: Millis) -> Result<()> {
        self.blocking(|| {
            let (from, to) = if pause {
                (&["running"][..], "paused")
            } else {
                (&["paused", "halted"][..], "running")
            };
            let conn = self.conn();
            let state: Option<String> = conn
                .query_row(
                    "SELECT state FROM rollouts WHERE id = ?1",
                    params![id],
                    |r| r.get(0),
                )
                .optional()?;
            let state = state.ok_or_else(|| StoreError::NotFound(format!("no rollout {id}")))?;
            if !from.contains(&state.as_str()) {
                return Err(StoreError::Conflict(format!(
                    "rollout {id} is {state}; cannot {}",
                    if pause { "pause it" } else { "resume it" }
                )));
            }
            conn.execute(
                "UPDATE rollouts SET state = ?2, reason = NULL, updated_at = ?3 WHERE id = ?1",
                params![id, to, now],
            )?;
            Ok(())
        })
    }

    /// Rollouts, newest first, optionally of one package.
    pub fn rollouts(&self, package: Option<&str>) -> Result<Vec<RolloutInfo>> {
        self.blocking(|| {
            let ids: Vec<i64> = {
                let conn = self.fast();
                let mut stmt = conn.prepare(
                    "SELECT o.id FROM rollouts o JOIN releases r ON r.id = o.release_id
                     WHERE (r.package = ?1 OR ?1 IS NULL) ORDER BY o.id DESC",
                )?;
                let rows = stmt.query_map(params![package], |r| r.get(0))?;
                rows.collect::<Result<_, _>>()?
            };
            ids.into_iter().map(|id| self.rollout(id)).collect()
        })
    }

    /// One rollout with its targets.
    pub fn rollout(&self, id: i64) -> Result<RolloutInfo> {
        self.blocking(|| {
            let conn = self.fast();
            rollout(&conn, id)
        })
    }

    /// Moves every running rollout forward: starts the next wave when the current one
    /// has finished, halts a rollout whose failures pass its threshold, completes one
    /// whose last wave finished.
    pub fn advance_rollouts(&self, now: Millis) -> Result<Advance> {
        self.blocking(|| {
            let mut advance = Advance::default();
            let mut conn = self.conn();
            let running: Vec<i64> = {
                let mut stmt = conn.prepare("SELECT id FROM rollouts WHERE state = 'running'")?;
                let rows = stmt.query_map([], |r| r.get(0))?;
                rows.collect::<Result<_, _>>()?
            };
            for id in running {
                let tx = conn.transaction()?;
                let info = rollout(&tx, id)?;
                let (order_id, max_failures, ttl_ms): (String, f64, i64) = tx.query_row(
                    "SELECT s.order_id, s.max_failures, s.ttl_ms FROM rollouts o
                     JOIN package_subscriptions s ON s.id = o.subscription_id WHERE o.id = ?1",
                    params![id],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )?;
                let release_id: i64 = tx.query_row(
                    "SELECT release_id FROM rollouts WHERE id = ?1",
                    params![id],
                    |r| r.get(0),
                )?;
                let released = info.targets.iter().filter(|t| t.job_id.is_some()).count();
                if info.targets.is_empty() {
                    tx.execute(
                        "UPDATE rollouts SET state = 'completed', updated_at = ?2 WHERE id = ?1",
                        params![id, now],
                    )?;
                    tx.commit()?;
                    continue;
                }
                if info.failed > 0 && info.failed as f64 > max_failures * released.max(1) as f64 {
                    let reason = format!(
                        "{} of {} installs failed, more than the {}% allowed",
                        info.failed,
                        released,
                        (max_failures * 100.0).round()
                    );
                    tx.execute(
                        "UPDATE rollouts SET state = 'halted', reason = ?2, updated_at = ?3
                         WHERE id = ?1",
                        params![id, reason, now],
                    )?;
                    tx.commit()?;
                    advance.halted.push((id, reason));
                    continue;
                }
                let wave_done = info.in_progress == 0
                    && info
                        .targets
                        .iter()
                        .filter(|t| t.wave <= info.wave)
                        .all(|t| t.job_id.is_some());
                let mut wave = info.wave.min(info.wave_ends.len() - 1);
                if released > 0 && wave_done {
                    if wave + 1 < info.wave_ends.len() {
                        wave += 1;
                    } else {
                        tx.execute(
                            "UPDATE rollouts SET state = 'completed', updated_at = ?2 WHERE id = ?1",
                            params![id, now],
                        )?;
                        tx.commit()?;
                        continue;
                    }
                }
                // Start the wave's jobs (all of them when it begins; late joiners later).
                let mut changed = wave != info.wave;
                for (position, target) in info.targets.iter().enumerate() {
                    if target.wave <= wave && target.job_id.is_none() {
                        changed = true;
                        let job = insert_install_job(
                            &tx,
                            &target.agent_id,
                            &order_id,
                            release_id,
                            ttl_ms as u64,
                            now,
                        )?;
                        tx.execute(
                            "UPDATE rollout_targets SET job_id = ?3
                             WHERE rollout_id = ?1 AND position = ?2",
                            params![id, position as i64, job],
                        )?;
                        advance.poke.push(target.agent_id.clone());
                    }
                }
                if changed {
                    tx.execute(
                        "UPDATE rollouts SET wave = ?2, updated_at = ?3 WHERE id = ?1",
                        params![id, wave as i64, now],
                    )?;
                }
                tx.commit()?;
            }
            Ok(advance)
        })
    }

    /// A subscription's rollout of a release, if any: its id, state and targets.
    pub fn rollout_for(
        &self,
        subscription_id: i64,
        release_id: i64,
    ) -> Result<Option<(i64, String, Vec<String>)>> {
        self.blocking(|| {
            let conn = self.fast();
            let found: Option<(i64, String)> = conn
                .query_row(
                    "SELECT id, state FROM rollouts WHERE subscription_id = ?1 AND release_id = ?2",
                    params![subscription_id, release_id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let Some((id, state)) = found else {
                return Ok(None);
            };
            let mut stmt =
                conn.prepare("SELECT agent_id FROM rollout_targets WHERE rollout_id = ?1")?;
            let rows = stmt.query_map(params![id], |r| r.get(0))?;
            Ok(Some((id, state, rows.collect::<Result<_, _>>()?)))
        })
    }

    /// Adds agents that joined a subscription's audience after its rollout started; they
    /// go at the end (the last wave). A completed rollout runs again for them.
    pub fn extend_rollout(&self, id: i64, agents: &[String], now: Millis) -> Result<()> {
        self.blocking(|| {
            let mut conn = self.conn();
            let tx = conn.transaction()?;
            let next: i64 = tx.query_row(
                "SELECT COALESCE(MAX(position) + 1, 0) FROM rollout_targets WHERE rollout_id = ?1",
                params![id],
                |r| r.get(0),
            )?;
            {
                let mut stmt = tx.prepare(
                    "INSERT INTO rollout_targets (rollout_id, position, agent_id) VALUES (?1, ?2, ?3)",
                )?;
                for (offset, agent) in agents.iter().enumerate() {
                    stmt.execute(params![id, next + offset as i64, agent])?;
                }
            }
            tx.execute(
                "UPDATE rollouts SET state = 'running', updated_at = ?2
                 WHERE id = ?1 AND state = 'completed'",
                params![id, now],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    /// The agents a subscription's audience names now, with their platforms.
    pub fn subscription_targets(&self, target: &str) -> Result<Vec<(String, String)>> {
        self.blocking(|| {
            let audience: Audience = target.parse().map_err(|e: String| StoreError::Corrupt(e))?;
            let agents = {
                let conn = self.fast();
                expand(&conn, &audience)?
            };
            self.platforms(&agents)
        })
    }
}

fn insert_install_job(
    tx: &Connection,
    agent_id: &str,
    order_id: &str,
    release_id: i64,
    ttl_ms: u64,
    now: Millis,
) -> Result<JobId> {
    tx.execute(
        "INSERT INTO jobs (agent_id, order_id, state, created_at, deliver_after, expires_at,
                           release_id)
         VALUES (?1, ?2, 'queued', ?3, ?3, ?4, ?5)",
        params![
            agent_id,
            order_id,
            now,
            now.saturating_add(ttl_ms as i64),
            release_id
        ],
    )?;
    Ok(tx.last_insert_rowid())
}

fn rollout(conn: &Connection, id: i64) -> Result<RolloutInfo> {
    let head = conn
        .query_row(
            "SELECT o.id, r.package, r.version, r.platform, o.subscription_id, o.state, o.wave,
                    o.reason, o.created_at, o.updated_at, s.waves
             FROM rollouts o JOIN releases r ON r.id = o.release_id
             JOIN package_subscriptions s ON s.id = o.subscription_id WHERE o.id = ?1",
            params![id],
            |r| {
                Ok((
                    RolloutInfo {
                        id: r.get(0)?,
                        package: r.get(1)?,
                        version: r.get(2)?,
                        platform: r.get(3)?,
                        subscription_id: r.get(4)?,
                        state: r.get(5)?,
                        wave: r.get::<_, i64>(6)? as usize,
                        wave_ends: Vec::new(),
                        reason: r.get(7)?,
                        succeeded: 0,
                        failed: 0,
                        in_progress: 0,
                        waiting: 0,
                        targets: Vec::new(),
                        created_at: r.get(8)?,
                        updated_at: r.get(9)?,
                    },
                    r.get::<_, String>(10)?,
                ))
            },
        )
        .optional()?;
    let (mut info, waves) = head.ok_or_else(|| StoreError::NotFound(format!("no rollout {id}")))?;
    let waves: Waves = waves.parse().map_err(StoreError::Corrupt)?;
    let mut stmt = conn.prepare(
        "SELECT t.agent_id, t.job_id, j.state, j.progress, j.error FROM rollout_targets t
         LEFT JOIN jobs j ON j.id = t.job_id WHERE t.rollout_id = ?1 ORDER BY t.position",
    )?;
    let rows = stmt.query_map(params![id], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, Option<i64>>(1)?,
            r.get::<_, Option<String>>(2)?,
            r.get::<_, Option<String>>(3)?,
            r.get::<_, Option<String>>(4)?,
        ))
    })?;
    let rows: Vec<_> = rows.collect::<Result<_, _>>()?;
    info.wave_ends = waves.ends(rows.len());
    for (position, (agent_id, job_id, state, progress, error)) in rows.into_iter().enumerate() {
        let wave = info
            .wave_ends
            .iter()
            .position(|&end| position < end)
            .unwrap_or(0);
        // No job yet: the target waits for its wave.
        match state.as_deref().map(str::parse::<JobState>) {
            None | Some(Ok(JobState::Waiting)) => info.waiting += 1,
            Some(Ok(JobState::Succeeded)) => info.succeeded += 1,
            Some(Ok(s)) if s.is_final() => info.failed += 1,
            _ => info.in_progress += 1,
        }
        info.targets.push(RolloutTarget {
            agent_id,
            wave,
            job_id,
            state: state.unwrap_or_else(|| "waiting".into()),
            progress,
            error,
        });
    }
    Ok(info)
}

fn version_of(text: &str) -> Option<semver::Version> {
    semver::Version::parse(text).ok()
}

fn encode(envelope: &Envelope) -> Result<Vec<u8>> {
    codec::to_bytes(envelope).map_err(|e| StoreError::Corrupt(e.to_string()))
}

const RELEASE_SELECT: &str = "SELECT id, package, version, platform, vendor, sha256, length, url, \
     expires_at, state, created_at, published_at FROM releases";

fn release_row(r: &super::sql::Row<'_>) -> rusqlite::Result<ReleaseInfo> {
    Ok(ReleaseInfo {
        id: r.get(0)?,
        package: r.get(1)?,
        version: r.get(2)?,
        platform: r.get(3)?,
        vendor: r.get(4)?,
        sha256: r.get(5)?,
        length: r.get::<_, i64>(6)? as u64,
        url: r.get(7)?,
        expires_at: r.get(8)?,
        state: r.get(9)?,
        created_at: r.get(10)?,
        published_at: r.get(11)?,
    })
}
