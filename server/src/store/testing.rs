//! Test support: rows the other folders' tests set up directly, because the flows
//! that make them (an agent enrolling, a signed order, a catalog entry, a finished
//! job) are not what those tests are about, and reads of state no store method shows.
//! Test builds only; a helper panics when the database refuses, as the test would.

use super::sql::params;

use herald_shared::Millis;

use crate::model::DeliveryAttempt;
use crate::store::Store;

/// A job row to insert as it is: no state machine, no order checks.
#[derive(Debug, Clone)]
pub(crate) struct TestJob<'a> {
    /// Agent (the row must exist).
    pub agent_id: &'a str,
    /// Order (the row must exist).
    pub order_id: &'a str,
    /// Schedule that made it.
    pub schedule_id: Option<i64>,
    /// State, stored as it is.
    pub state: &'a str,
    /// Created.
    pub created_at: Millis,
    /// Deliverable from.
    pub deliver_after: Millis,
    /// Expires.
    pub expires_at: Millis,
    /// Marked for the forwarder (as the scheduler marks a subscription's jobs).
    pub forward_pending: bool,
    /// Exit code.
    pub exit_code: Option<i32>,
    /// Standard output.
    pub stdout: Option<&'a [u8]>,
    /// Failure reason.
    pub error: Option<&'a str>,
    /// Finished.
    pub finished_at: Option<Millis>,
}

// === set-up ===

impl Store {
    /// An agent row: enrolled at `now`, public key `x'01'`.
    pub(crate) fn insert_test_agent(&self, id: &str, name: &str, now: Millis) {
        self.conn()
            .execute(
                "INSERT INTO agents (id, name, public_key, enrolled_at) VALUES (?1, ?2, x'01', ?3)",
                params![id, name, now],
            )
            .expect("test set-up: insert an agent");
    }

    /// An order row with a placeholder envelope (`x'00'`): never delivered to an agent.
    pub(crate) fn insert_test_order(&self, id: &str, action: &str, now: Millis) {
        self.conn()
            .execute(
                "INSERT INTO orders (id, envelope, action, created_at) VALUES (?1, x'00', ?2, ?3)",
                params![id, action, now],
            )
            .expect("test set-up: insert an order");
    }

    /// A catalog entry of kind `run` for every device, pointing at `order_id`.
    pub(crate) fn insert_test_catalog_entry(
        &self,
        name: &str,
        title: &str,
        order_id: &str,
        now: Millis,
    ) {
        self.conn()
            .execute(
                "INSERT INTO catalog (name, title, description, kind, order_id, summary, target,
                                      min_interval_ms, not_after, created_at)
                 VALUES (?1, ?2, '', 'run', ?3, 'run scan', 'all', 0, ?4, ?4)",
                params![name, title, order_id, now],
            )
            .expect("test set-up: insert a catalog entry");
    }

    /// A subscription of `owner` to a catalog entry: a schedule of `order_id` for
    /// `target`, created at 0, that never fires by itself. Returns its id.
    pub(crate) fn insert_test_subscription(
        &self,
        owner: i64,
        order_id: &str,
        target: &str,
        catalog_name: &str,
    ) -> i64 {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO schedules (order_id, target, spec, missed, splay_ms, ttl_ms, created_at,
                                    owner_user_id, catalog_name)
             VALUES (?1, ?2, '{}', 'skip', 0, 60000, 0, ?3, ?4)",
            params![order_id, target, owner, catalog_name],
        )
        .expect("test set-up: insert a subscription");
        conn.last_insert_rowid()
    }

    /// A job row as given. Returns its id.
    pub(crate) fn insert_test_job(&self, job: &TestJob<'_>) -> i64 {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO jobs (agent_id, order_id, schedule_id, state, created_at, deliver_after,
                               expires_at, forward_pending, exit_code, stdout, error, finished_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            params![
                job.agent_id,
                job.order_id,
                job.schedule_id,
                job.state,
                job.created_at,
                job.deliver_after,
                job.expires_at,
                job.forward_pending,
                job.exit_code,
                job.stdout,
                job.error,
                job.finished_at,
            ],
        )
        .expect("test set-up: insert a job");
        conn.last_insert_rowid()
    }

    /// Sets a job's state as it is, past the state machine.
    pub(crate) fn set_test_job_state(&self, job_id: i64, state: &str) {
        self.conn()
            .execute(
                "UPDATE jobs SET state = ?2 WHERE id = ?1",
                params![job_id, state],
            )
            .expect("test set-up: set a job's state");
    }

    /// Sets a job's standard output and exit code.
    pub(crate) fn set_test_job_output(&self, job_id: i64, stdout: &[u8], exit_code: i32) {
        self.conn()
            .execute(
                "UPDATE jobs SET stdout = ?2, exit_code = ?3 WHERE id = ?1",
                params![job_id, stdout, exit_code],
            )
            .expect("test set-up: set a job's output");
    }

    /// Marks a job for the forwarder, or clears the mark.
    pub(crate) fn set_test_forward_pending(&self, job_id: i64, pending: bool) {
        self.conn()
            .execute(
                "UPDATE jobs SET forward_pending = ?2 WHERE id = ?1",
                params![job_id, pending],
            )
            .expect("test set-up: mark a job for forwarding");
    }

    /// A forwarding rule confirmed at 0 (created at 0), past the codes and the limit
    /// of rules. Returns its id.
    pub(crate) fn insert_test_rule(
        &self,
        user_id: i64,
        schedule_id: Option<i64>,
        kind: &str,
        target: &str,
        secret: Option<&str>,
        only_failures: bool,
    ) -> i64 {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO destinations (user_id, schedule_id, kind, target, secret, only_failures,
                                       created_at, confirmed_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, 0, 0)",
            params![user_id, schedule_id, kind, target, secret, only_failures],
        )
        .expect("test set-up: insert a forwarding rule");
        conn.last_insert_rowid()
    }

    /// Sets when a rule was confirmed (`None`: unconfirmed), past the codes.
    pub(crate) fn set_test_rule_confirmed_at(&self, destination_id: i64, at: Option<Millis>) {
        self.conn()
            .execute(
                "UPDATE destinations SET confirmed_at = ?2 WHERE id = ?1",
                params![destination_id, at],
            )
            .expect("test set-up: confirm a rule");
    }

    /// A finished `webhook` delivery to target `x` in `state`, with one successful
    /// attempt (detail `x`) at `created_at`, and no retry due. Returns its id.
    pub(crate) fn insert_test_delivery(
        &self,
        destination_id: i64,
        user_id: i64,
        job_id: i64,
        state: &str,
        created_at: Millis,
    ) -> i64 {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO deliveries (destination_id, user_id, job_id, kind, target, state,
                                     attempts, next_attempt_at, created_at)
             VALUES (?1, ?2, ?3, 'webhook', 'x', ?4, 1, ?6, ?5)",
            params![
                destination_id,
                user_id,
                job_id,
                state,
                created_at,
                i64::MAX / 2
            ],
        )
        .expect("test set-up: insert a delivery");
        let id = conn.last_insert_rowid();
        conn.execute(
            "INSERT INTO delivery_attempts (delivery_id, at, ok, detail) VALUES (?1, ?2, 1, 'x')",
            params![id, created_at],
        )
        .expect("test set-up: insert an attempt");
        id
    }
}

// === inspection ===

impl Store {
    /// The order a catalog entry points at.
    pub(crate) fn test_catalog_order(&self, name: &str) -> String {
        self.conn()
            .query_row(
                "SELECT order_id FROM catalog WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .expect("test inspection: a catalog entry")
    }

    /// (state, error, outcome) of a job, as stored.
    pub(crate) fn test_job_state(&self, job_id: i64) -> (String, Option<String>, Option<String>) {
        self.conn()
            .query_row(
                "SELECT state, error, outcome FROM jobs WHERE id = ?1",
                [job_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .expect("test inspection: a job")
    }

    /// A job's `forward_pending` mark (1: not handled by the forwarder yet).
    pub(crate) fn test_forward_pending(&self, job_id: i64) -> i64 {
        self.conn()
            .query_row(
                "SELECT forward_pending FROM jobs WHERE id = ?1",
                params![job_id],
                |r| r.get(0),
            )
            .expect("test inspection: a job's forwarding mark")
    }

    /// How many jobs wait for the forwarder.
    pub(crate) fn test_forward_pending_count(&self) -> i64 {
        self.conn()
            .query_row(
                "SELECT COUNT(*) FROM jobs WHERE forward_pending = 1",
                [],
                |r| r.get(0),
            )
            .expect("test inspection: jobs marked for forwarding")
    }

    /// Every delivery's id, in id order.
    pub(crate) fn test_delivery_ids(&self) -> Vec<i64> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT id FROM deliveries ORDER BY id")
            .expect("test inspection: deliveries");
        let rows = stmt
            .query_map([], |r| r.get(0))
            .expect("test inspection: deliveries");
        rows.collect::<Result<_, _>>()
            .expect("test inspection: deliveries")
    }

    /// (job, rule) of every delivery, in id order.
    pub(crate) fn test_delivery_routes(&self) -> Vec<(i64, i64)> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT job_id, destination_id FROM deliveries ORDER BY id")
            .expect("test inspection: deliveries");
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .expect("test inspection: deliveries");
        rows.collect::<Result<_, _>>()
            .expect("test inspection: deliveries")
    }

    /// The delivery of a job's result to a rule (panics if there is none).
    pub(crate) fn test_delivery_id(&self, job_id: i64, destination_id: i64) -> i64 {
        self.conn()
            .query_row(
                "SELECT id FROM deliveries WHERE job_id = ?1 AND destination_id = ?2",
                params![job_id, destination_id],
                |r| r.get(0),
            )
            .expect("test inspection: the delivery of a job to a rule")
    }

    /// (state, attempts, last_error) of a delivery.
    pub(crate) fn test_delivery_state(&self, id: i64) -> (String, i64, Option<String>) {
        self.conn()
            .query_row(
                "SELECT state, attempts, last_error FROM deliveries WHERE id = ?1",
                params![id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .expect("test inspection: a delivery")
    }

    /// Every attempt of a delivery, in order.
    pub(crate) fn test_delivery_attempts(&self, id: i64) -> Vec<DeliveryAttempt> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT at, ok, detail FROM delivery_attempts WHERE delivery_id = ?1 ORDER BY id",
            )
            .expect("test inspection: attempts");
        let rows = stmt
            .query_map(params![id], |r| {
                Ok(DeliveryAttempt {
                    at: r.get(0)?,
                    ok: r.get(1)?,
                    detail: r.get(2)?,
                })
            })
            .expect("test inspection: attempts");
        rows.collect::<Result<_, _>>()
            .expect("test inspection: attempts")
    }
}
