//! The service catalog's rows: entries (each pointing at its signed standing order) and
//! users' subscriptions (schedules that point at an entry's order).

use super::sql::{params, OptionalExtension, Row};
use crate::model::*;
use crate::store::{insert_order, Store, StoreError};
use herald_shared::envelope::{Audience, Envelope, Order};
use herald_shared::schedule::{Missed, Schedule};
use herald_shared::Millis;

type Result<T, E = StoreError> = std::result::Result<T, E>;

const ENTRY_COLUMNS: &str = "c.name, c.title, c.description, c.kind, c.summary, c.target,
     c.min_interval_ms, c.not_after, c.created_at";

fn entry_row(r: &Row<'_>) -> rusqlite::Result<CatalogEntry> {
    Ok(CatalogEntry {
        name: r.get(0)?,
        title: r.get(1)?,
        description: r.get(2)?,
        kind: r.get(3)?,
        summary: r.get(4)?,
        target: r.get(5)?,
        min_interval_ms: r.get::<_, i64>(6)?.max(0) as u64,
        not_after: r.get(7)?,
        created_at: r.get(8)?,
    })
}

const SUBSCRIPTION_SELECT: &str =
    "SELECT s.id, s.owner_user_id, u.login, s.catalog_name, c.title, c.kind,
            s.target, a.name, s.spec, s.missed, s.next_fire_at, s.created_at
     FROM schedules s
     JOIN users u ON u.id = s.owner_user_id
     JOIN catalog c ON c.name = s.catalog_name
     LEFT JOIN agents a ON s.target = 'agent:' || a.id";

fn subscription_row(r: &Row<'_>) -> rusqlite::Result<Subscription> {
    let spec: String = r.get(8)?;
    let missed: String = r.get(9)?;
    let corrupt = |what: String| {
        rusqlite::Error::FromSqlConversionFailure(8, rusqlite::types::Type::Text, what.into())
    };
    let schedule: Schedule = serde_json::from_str(&spec).map_err(|e| corrupt(e.to_string()))?;
    Ok(Subscription {
        id: r.get(0)?,
        owner_user_id: r.get(1)?,
        owner_login: r.get(2)?,
        entry: r.get(3)?,
        entry_title: r.get(4)?,
        kind: r.get(5)?,
        target: r.get(6)?,
        agent_name: r.get(7)?,
        when: schedule.describe(),
        schedule,
        missed: missed
            .parse()
            .map_err(|_| corrupt(format!("missed policy {missed:?}")))?,
        next_fire_at: r.get(10)?,
        created_at: r.get(11)?,
    })
}

impl Store {
    /// Publishes a catalog entry with its signed standing order. The caller has checked
    /// the signature and [`check_entry_order`].
    #[allow(clippy::too_many_arguments)]
    pub fn add_catalog_entry(
        &self,
        name: &str,
        title: &str,
        description: &str,
        envelope: &Envelope,
        order: &Order,
        min_interval_ms: u64,
        now: Millis,
    ) -> Result<()> {
        self.blocking(|| {
            let order_id = hex::encode(order.id);
            let mut conn = self.conn();
            let tx = conn.transaction()?;
            let exists = tx
                .query_row(
                    "SELECT 1 FROM catalog WHERE name = ?1",
                    params![name],
                    |_| Ok(()),
                )
                .optional()?
                .is_some();
            if exists {
                return Err(StoreError::Conflict(format!(
                    "catalog entry {name} exists; remove it first or pick another name"
                )));
            }
            insert_order(&tx, &order_id, envelope, &order.action, now)?;
            tx.execute(
                "INSERT INTO catalog (name, title, description, kind, order_id, summary, target,
                                      min_interval_ms, not_after, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    name,
                    title,
                    description,
                    order.action.kind(),
                    order_id,
                    order.action.describe(),
                    order.audience.to_string(),
                    min_interval_ms as i64,
                    order.not_after,
                    now
                ],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    /// All catalog entries, by name.
    pub fn catalog(&self) -> Result<Vec<CatalogEntry>> {
        self.blocking(|| {
            let conn = self.fast();
            let mut stmt = conn.prepare(&format!(
                "SELECT {ENTRY_COLUMNS} FROM catalog c ORDER BY c.name"
            ))?;
            let rows = stmt.query_map([], entry_row)?;
            Ok(rows.collect::<std::result::Result<_, _>>()?)
        })
    }

    /// One catalog entry.
    pub fn catalog_entry(&self, name: &str) -> Result<CatalogEntry> {
        self.blocking(|| {
            self.fast()
                .query_row(
                    &format!("SELECT {ENTRY_COLUMNS} FROM catalog c WHERE c.name = ?1"),
                    params![name],
                    entry_row,
                )
                .optional()?
                .ok_or_else(|| StoreError::NotFound(format!("no catalog entry {name}")))
        })
    }

    /// Withdraws a catalog entry and every subscription to it (their past jobs stay).
    /// Returns how many subscriptions went with it.
    pub fn remove_catalog_entry(&self, name: &str) -> Result<usize> {
        self.blocking(|| {
            let mut conn = self.conn();
            let tx = conn.transaction()?;
            tx.execute(
                "DELETE FROM destinations WHERE schedule_id IN
                     (SELECT id FROM schedules WHERE catalog_name = ?1)",
                params![name],
            )?;
            let subscriptions = tx.execute(
                "DELETE FROM schedules WHERE catalog_name = ?1",
                params![name],
            )?;
            let removed = tx.execute("DELETE FROM catalog WHERE name = ?1", params![name])?;
            if removed == 0 {
                return Err(StoreError::NotFound(format!("no catalog entry {name}")));
            }
            tx.commit()?;
            Ok(subscriptions)
        })
    }

    /// Subscribes `target` to a catalog entry on behalf of `user_id`. The caller has
    /// checked that the user may use the target (their own device, or an admin).
    #[allow(clippy::too_many_arguments)]
    pub fn add_service_subscription(
        &self,
        user_id: i64,
        entry: &str,
        target: &Audience,
        schedule: &Schedule,
        missed: Missed,
        ttl_ms: u64,
        next_fire_at: Option<Millis>,
        now: Millis,
    ) -> Result<i64> {
        self.blocking(|| {
            let spec =
                serde_json::to_string(schedule).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let mut conn = self.conn();
            let tx = conn.transaction()?;
            let (order_id, min_interval_ms): (String, i64) = tx
                .query_row(
                    "SELECT order_id, min_interval_ms FROM catalog WHERE name = ?1",
                    params![entry],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?
                .ok_or_else(|| StoreError::NotFound(format!("no catalog entry {entry}")))?;
            tx.execute(
                "INSERT INTO schedules (order_id, target, spec, missed, splay_ms, ttl_ms,
                                        min_interval_ms, next_fire_at, created_at,
                                        owner_user_id, catalog_name)
                 VALUES (?1, ?2, ?3, ?4, 0, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    order_id,
                    target.to_string(),
                    spec,
                    missed.to_string(),
                    ttl_ms as i64,
                    min_interval_ms,
                    next_fire_at,
                    now,
                    user_id,
                    entry
                ],
            )?;
            let id = tx.last_insert_rowid();
            tx.commit()?;
            Ok(id)
        })
    }

    /// Subscriptions, all (`None`, for admins) or one user's.
    pub fn service_subscriptions(&self, user_id: Option<i64>) -> Result<Vec<Subscription>> {
        self.blocking(|| {
            let conn = self.fast();
            let mut stmt = conn.prepare(&format!(
                "{SUBSCRIPTION_SELECT} WHERE (s.owner_user_id = ?1 OR ?1 IS NULL) ORDER BY s.id"
            ))?;
            let rows = stmt.query_map(params![user_id], subscription_row)?;
            Ok(rows.collect::<std::result::Result<_, _>>()?)
        })
    }

    /// One subscription (the caller checks its owner against the user).
    pub fn service_subscription(&self, id: i64) -> Result<Subscription> {
        self.blocking(|| {
            self.fast()
                .query_row(
                    &format!("{SUBSCRIPTION_SELECT} WHERE s.id = ?1"),
                    params![id],
                    subscription_row,
                )
                .optional()?
                .ok_or_else(|| StoreError::NotFound(format!("no subscription {id}")))
        })
    }

    /// Changes a subscription's timing.
    pub fn update_service_subscription(
        &self,
        id: i64,
        schedule: &Schedule,
        missed: Missed,
        next_fire_at: Option<Millis>,
    ) -> Result<()> {
        self.blocking(|| {
            let spec =
                serde_json::to_string(schedule).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let changed = self.conn().execute(
                "UPDATE schedules SET spec = ?2, missed = ?3, next_fire_at = ?4
                 WHERE id = ?1 AND catalog_name IS NOT NULL",
                params![id, spec, missed.to_string(), next_fire_at],
            )?;
            if changed == 0 {
                return Err(StoreError::NotFound(format!("no subscription {id}")));
            }
            Ok(())
        })
    }

    /// Deletes a subscription and the forwarding rules tied to it (its past jobs and
    /// their delivery log stay).
    pub fn remove_service_subscription(&self, id: i64) -> Result<()> {
        self.blocking(|| {
            let mut conn = self.conn();
            let tx = conn.transaction()?;
            tx.execute(
                "DELETE FROM destinations WHERE schedule_id = ?1",
                params![id],
            )?;
            let changed = tx.execute(
                "DELETE FROM schedules WHERE id = ?1 AND catalog_name IS NOT NULL",
                params![id],
            )?;
            if changed == 0 {
                return Err(StoreError::NotFound(format!("no subscription {id}")));
            }
            tx.commit()?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_shared::envelope::{Action, Repeat};
    use herald_shared::envelope::{OpenSpec, OperatorKey, RunSpec, Statement};

    fn order(repeat: Repeat, action: Action) -> Order {
        Order {
            id: [7; 16],
            audience: Audience::All,
            issued_at: 0,
            not_before: 0,
            not_after: 1_000_000,
            repeat,
            action,
        }
    }

    fn run() -> Action {
        Action::Run(RunSpec {
            program: "/bin/true".into(),
            args: vec![],
            timeout_ms: 1_000,
            run_as: None,
        })
    }

    #[test]
    fn only_standing_run_or_open_orders_are_entries() {
        let standing = Repeat::Standing {
            min_interval_ms: 60_000,
        };
        assert_eq!(check_entry_order(&order(standing, run())), Ok(60_000));
        assert!(check_entry_order(&order(Repeat::Once, run())).is_err());
        let open = |url: &str| {
            Action::Open(OpenSpec {
                url: url.into(),
                timeout_ms: 1_000,
            })
        };
        assert!(check_entry_order(&order(standing, open("https://h/service/x"))).is_ok());
        assert!(check_entry_order(&order(standing, open("http://example.com/"))).is_err());
        let revert = Action::Revert {
            package: "p".into(),
        };
        assert!(check_entry_order(&order(standing, revert)).is_err());
    }

    #[test]
    fn entries_and_subscriptions_round_trip() {
        let dir = std::env::temp_dir().join(format!(
            "herald-catalog-{}",
            hex::encode(crate::random_bytes::<6>())
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let store = Store::open(&dir).unwrap();
        let key = OperatorKey::from_seed([1; 32]);
        let standing = Repeat::Standing {
            min_interval_ms: 1_000,
        };
        let order = order(standing, run());
        let envelope = key.sign(&Statement::Order(order.clone())).unwrap();
        store
            .add_catalog_entry("scan", "Scan", "Runs a scan", &envelope, &order, 1_000, 5)
            .unwrap();
        assert!(matches!(
            store.add_catalog_entry("scan", "Scan", "", &envelope, &order, 1_000, 5),
            Err(StoreError::Conflict(_))
        ));
        let entry = store.catalog_entry("scan").unwrap();
        assert_eq!(entry.kind, "run");
        assert_eq!(entry.summary, "/bin/true");
        store
            .conn()
            .execute(
                "INSERT INTO users (login, password_hash, role, created_at) VALUES ('u', 'x', 'user', 0)",
                [],
            )
            .unwrap();
        let user: i64 = store.conn().last_insert_rowid();
        let schedule = Schedule::every(std::time::Duration::from_secs(5), 0).unwrap();
        let id = store
            .add_service_subscription(
                user,
                "scan",
                &Audience::All,
                &schedule,
                Missed::Skip,
                60_000,
                Some(10),
                5,
            )
            .unwrap();
        let listed = store.service_subscriptions(Some(user)).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].id, id);
        assert_eq!(listed[0].entry_title, "Scan");
        assert!(store
            .service_subscriptions(Some(user + 1))
            .unwrap()
            .is_empty());
        let hourly = Schedule::every(std::time::Duration::from_secs(3600), 0).unwrap();
        store
            .update_service_subscription(id, &hourly, Missed::RunOnce, Some(20))
            .unwrap();
        assert_eq!(store.service_subscription(id).unwrap().schedule, hourly);
        assert_eq!(store.remove_catalog_entry("scan").unwrap(), 1);
        assert!(matches!(
            store.service_subscription(id),
            Err(StoreError::NotFound(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
