//! Orders and jobs: creation (one order, one job per agent), what is pending for an
//! agent, acknowledgements, progress, results (stored idempotently), expiry, listing.
//! Job states are typed (`model::JobState`); this file is where they meet their text.

use super::*;

impl Store {
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
        self.blocking(|| {
            let mut conn = self.conn();
            let tx = conn.transaction()?;
            insert_order(&tx, order_id, envelope, action, now)?;
            let ids = insert_jobs(&tx, order_id, agents, schedule_id, ttl_ms, now)?;
            tx.commit()?;
            Ok(ids)
        })
    }

    /// Jobs waiting to be signalled to an agent (queued, due, not expired).
    pub fn pending(&self, agent_id: &str, now: Millis) -> Result<PendingJobs> {
        self.blocking(|| {
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
        self.blocking(|| {
            self.fast().execute(
                "UPDATE jobs SET progress = ?3
                 WHERE id = ?1 AND agent_id = ?2 AND state IN ('queued', 'delivered', 'running')",
                params![job_id, agent_id, progress],
            )?;
            Ok(())
        })
    }

    /// Applies an agent's acknowledgement. Only the job's own agent can move it.
    pub fn ack(
        &self,
        agent_id: &str,
        job_id: JobId,
        refused: Option<&str>,
        now: Millis,
    ) -> Result<()> {
        self.blocking(|| {
            self.ack_batch(
                &[(agent_id.to_string(), job_id, refused.map(str::to_string))],
                now,
            )
        })
    }

    /// Applies many acknowledgements in one transaction (the relay batches them: one
    /// commit for a whole broadcast's acks instead of one each). `refused` as in
    /// [`Store::ack`].
    pub fn ack_batch(&self, acks: &[(String, JobId, Option<String>)], now: Millis) -> Result<()> {
        self.blocking(|| {
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
        })
    }

    /// Marks a job running.
    pub fn started(&self, agent_id: &str, job_id: JobId, at: Millis, now: Millis) -> Result<()> {
        self.blocking(|| {
            self.fast().execute(
                "UPDATE jobs SET state = 'running', started_at = ?3,
                        delivered_at = COALESCE(delivered_at, ?4)
                 WHERE id = ?1 AND agent_id = ?2 AND state IN ('queued', 'delivered')",
                params![job_id, agent_id, at, now],
            )?;
            Ok(())
        })
    }

    /// Stores a result idempotently: a result for a job already final is ignored.
    /// Returns whether it was stored now.
    pub fn store_result(&self, agent_id: &str, result: &JobResult, now: Millis) -> Result<bool> {
        self.blocking(|| {
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
        })
    }

    /// Expires queued jobs whose TTL passed. Returns how many.
    pub fn expire(&self, now: Millis) -> Result<usize> {
        self.blocking(|| {
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
        })
    }

    /// Earliest time something job-related falls due: a queued job's expiry or delayed
    /// delivery.
    pub fn next_job_deadline(&self, now: Millis) -> Result<Option<Millis>> {
        self.blocking(|| {
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
        })
    }

    /// Agents with queued jobs whose delayed delivery is due. Jobs due at once
    /// (`deliver_after = created_at`) were handed to their links when they were made.
    pub fn agents_with_due_jobs(&self, now: Millis, since: Millis) -> Result<Vec<String>> {
        self.blocking(|| {
            let conn = self.fast();
            let mut stmt = conn.prepare(
                "SELECT DISTINCT agent_id FROM jobs WHERE state = 'queued'
                 AND deliver_after > ?2 AND deliver_after <= ?1 AND deliver_after > created_at",
            )?;
            let rows = stmt.query_map(params![now, since], |r| r.get(0))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// One job.
    pub fn job(&self, job_id: JobId) -> Result<JobInfo> {
        self.blocking(|| {
            self.fast()
                .query_row(
                    &format!("{JOB_SELECT} WHERE j.id = ?1"),
                    params![job_id],
                    job_row,
                )
                .optional()?
                .ok_or_else(|| StoreError::NotFound(format!("no job {job_id}")))
        })
    }

    /// Jobs, newest first, optionally for one agent. Message deliveries are jobs too
    /// but are listed with their message (`Store::message`), not here.
    pub fn jobs(
        &self,
        agent_id: Option<&str>,
        before: Option<JobId>,
        limit: u32,
    ) -> Result<Vec<JobInfo>> {
        self.blocking(|| {
            let conn = self.fast();
            let mut stmt = conn.prepare(&format!(
                "{JOB_SELECT} WHERE (j.agent_id = ?1 OR ?1 IS NULL) AND (j.id < ?2 OR ?2 IS NULL)
                   AND o.kind <> 'message'
                 ORDER BY j.id DESC LIMIT ?3"
            ))?;
            let rows = stmt.query_map(params![agent_id, before, limit], job_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }
}

pub(crate) fn insert_order(
    tx: &Connection,
    order_id: &str,
    envelope: &Envelope,
    action: &herald_shared::envelope::Action,
    now: Millis,
) -> Result<()> {
    let open_timeout_ms = match action {
        herald_shared::envelope::Action::Open(open) => Some(open.timeout_ms as i64),
        _ => None,
    };
    insert_order_row(
        tx,
        order_id,
        envelope,
        &action.describe(),
        action.kind(),
        open_timeout_ms,
        now,
    )
}

/// Stores a signed envelope as an order row: what it does (for listings), its kind,
/// and a browser order's visit time. A second submission of the same id is refused.
pub(crate) fn insert_order_row(
    tx: &Connection,
    order_id: &str,
    envelope: &Envelope,
    describe: &str,
    kind: &str,
    open_timeout_ms: Option<i64>,
    now: Millis,
) -> Result<()> {
    let blob = codec::to_bytes(envelope).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let inserted = tx.execute(
        "INSERT INTO orders (id, envelope, action, kind, open_timeout_ms, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (id) DO NOTHING",
        params![order_id, blob, describe, kind, open_timeout_ms, now],
    )?;
    if inserted == 0 {
        return Err(StoreError::Conflict(format!(
            "order {order_id} was submitted before; sign a new one"
        )));
    }
    Ok(())
}

pub(super) fn insert_jobs(
    tx: &Connection,
    order_id: &str,
    agents: &[(String, Millis)],
    schedule_id: Option<i64>,
    ttl_ms: u64,
    now: Millis,
) -> Result<Vec<JobId>> {
    let mut stmt = tx.prepare(
        "INSERT INTO jobs (agent_id, order_id, schedule_id, state, created_at, deliver_after, expires_at)
         VALUES (?1, ?2, ?3, 'queued', ?4, ?5, ?6) RETURNING id",
    )?;
    let mut ids = Vec::with_capacity(agents.len());
    for (agent_id, deliver_after) in agents {
        let expires_at = deliver_after.saturating_add(ttl_ms as i64);
        // RETURNING: one round trip on PostgreSQL, where ids are not the connection's.
        ids.push(stmt.query_row(
            params![
                agent_id,
                order_id,
                schedule_id,
                now,
                deliver_after,
                expires_at
            ],
            |r| r.get(0),
        )?);
    }
    Ok(ids)
}

pub(crate) fn decode_envelope(blob: &[u8]) -> Result<Envelope> {
    codec::from_bytes(blob, codec::DEFAULT_FRAME_LIMIT)
        .map_err(|e| StoreError::Corrupt(e.to_string()))
}

pub(super) const JOB_SELECT: &str = "SELECT j.id, j.agent_id, a.name, j.schedule_id, o.action, j.state, \
     j.created_at, j.expires_at, j.delivered_at, j.started_at, j.finished_at, j.exit_code, \
     j.signal, j.stdout, j.stderr, j.stdout_truncated, j.stderr_truncated, j.error, \
     j.progress, j.outcome FROM jobs j JOIN orders o ON o.id = j.order_id JOIN agents a ON a.id = j.agent_id";

pub(super) fn job_row(r: &Row<'_>) -> rusqlite::Result<JobInfo> {
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
