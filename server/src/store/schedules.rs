//! Schedules: their standing orders, what is due, and firing (jobs created and the next
//! fire time moved in one transaction).

use super::*;

impl Store {
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
        self.blocking(|| {
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
        })
    }

    /// Removes a schedule (its past jobs stay).
    pub fn remove_schedule(&self, id: i64) -> Result<()> {
        self.blocking(|| {
            let changed = self
                .conn()
                .execute("DELETE FROM schedules WHERE id = ?1", params![id])?;
            if changed == 0 {
                return Err(StoreError::NotFound(format!("no schedule {id}")));
            }
            Ok(())
        })
    }

    /// All schedules.
    pub fn schedules(&self) -> Result<Vec<ScheduleInfo>> {
        self.blocking(|| {
            let conn = self.fast();
            let mut stmt = conn.prepare(&format!("{SCHEDULE_SELECT} ORDER BY s.id"))?;
            let rows = stmt.query_map([], schedule_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// The earliest next fire time of any schedule.
    pub fn next_fire_at(&self) -> Result<Option<Millis>> {
        self.blocking(|| {
            Ok(self
                .conn()
                .query_row("SELECT MIN(next_fire_at) FROM schedules", [], |r| r.get(0))?)
        })
    }

    /// Schedules due at `now`.
    pub fn due_schedules(&self, now: Millis) -> Result<Vec<DueSchedule>> {
        self.blocking(|| {
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
        })
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
        self.blocking(|| {
            let mut conn = self.conn();
            let tx = conn.transaction()?;
            // Move the schedule first, from the fire time it was read with: if it was
            // removed or fired since (by another node's scheduler that still thought
            // itself the leader), fire nothing.
            let moved = tx.execute(
                "UPDATE schedules SET next_fire_at = ?2 WHERE id = ?1 AND next_fire_at = ?3",
                params![schedule.id, next_fire_at, schedule.next_fire_at],
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
        })
    }

    /// When this agent last received a job from this schedule (acknowledged or started).
    pub fn last_delivery_from_schedule(
        &self,
        agent_id: &str,
        schedule_id: i64,
    ) -> Result<Option<Millis>> {
        self.blocking(|| {
            Ok(self.fast().query_row(
                "SELECT MAX(COALESCE(delivered_at, started_at)) FROM jobs
                 WHERE agent_id = ?1 AND schedule_id = ?2",
                params![agent_id, schedule_id],
                |r| r.get(0),
            )?)
        })
    }

    /// Agents among `agents` that already have an undelivered job from this schedule
    /// (for coalescing missed runs).
    pub fn has_queued_from_schedule(&self, agent_id: &str, schedule_id: i64) -> Result<bool> {
        self.blocking(|| {
            Ok(self
                .conn()
                .query_row(
                    "SELECT 1 FROM jobs WHERE agent_id = ?1 AND schedule_id = ?2 AND state = 'queued' LIMIT 1",
                    params![agent_id, schedule_id],
                    |_| Ok(()),
                )
                .optional()?
                .is_some())
        })
    }
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
