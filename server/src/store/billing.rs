//! Metering and billing storage: usage events (ingested in batches, idempotent by key),
//! the meter step that derives events from stored rows, plans, providers' prices,
//! invoices, closed months, signed session counters and the daily statistics.
//!
//! Writes go through the durable connection: an ingest is answered only after its
//! batch committed, so a client that resends after a crash (no answer) finds its
//! events either stored (counted as duplicates) or absent (stored now), never twice.
//! Rating and closing a month run inside one transaction holding the write lock, so no
//! event lands in a month between its rating and its closing.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::*;
use herald_shared::codec;
use herald_shared::message::{Report, SignedReport, MAX_REPORT};
use herald_shared::peers::{End, SessionUsage};

use crate::model::billing::{
    billable_counters, booking_month, month_bounds, month_of, usage_key_bytes, Counters,
    IngestReport, Invoice, LateNote, Meter, NewUsage, Price, ProviderPrice, StatPoint, StatsBy,
    UsageEvent, UsageTotal, SIGNATURE_GRACE, SIGNATURE_TOLERANCE_BP,
};
use crate::model::Via;

/// Milliseconds in a day (statistics are per UTC day).
const DAY_MS: i64 = 86_400_000;

/// Source names of the events the meter step derives (the `source` of their key).
pub const SOURCE_SESSIONS: &str = "herald/tunnel_sessions";
/// Message deliveries (one event per delivery job).
pub const SOURCE_MESSAGES: &str = "herald/messages";
/// Campaign fallbacks that went out.
pub const SOURCE_FALLBACKS: &str = "herald/fallbacks";
/// Jobs that finished on a user's devices.
pub const SOURCE_JOBS: &str = "herald/jobs";

/// The page cache (KiB, as SQLite's negative `cache_size`) of the durable connection
/// once usage is ingested: the key index takes random inserts, and with SQLite's 2 MiB
/// default nearly every insert reads and writes back a page of it.
const INGEST_CACHE_KIB: i64 = -131_072;
/// WAL pages between automatic checkpoints while usage is ingested (about 40 MiB).
const INGEST_CHECKPOINT_PAGES: i64 = 10_000;
/// SQLite's default, restored after an ingest.
const DEFAULT_CHECKPOINT_PAGES: i64 = 1_000;

/// What the rating of a month reads.
#[derive(Debug, Clone, Default)]
pub struct MonthUsage {
    /// Sums by (account, provider, meter).
    pub totals: Vec<UsageTotal>,
    /// Late events by account.
    pub late: BTreeMap<String, Vec<LateNote>>,
    /// Distinct notes by account.
    pub notes: BTreeMap<String, Vec<String>>,
}

const INSERT_EVENT: &str = "INSERT INTO usage_events (key, source, seq, account, provider,
    meter, quantity, at, month, late_from, note, received_at)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
    ON CONFLICT (key) DO NOTHING";

impl Store {
    /// Stores a batch of usage events in one transaction; an event whose key is stored
    /// already is counted as a duplicate and changes nothing. Events of a closed month
    /// are booked into the next open one (`late_from` says where they belong).
    pub fn ingest_usage(&self, events: &[NewUsage], now: Millis) -> Result<IngestReport> {
        self.blocking(|| {
            let mut conn = self.conn();
            conn.pragma_update(None, "cache_size", INGEST_CACHE_KIB)?;
            // Checkpoint less often while a batch commits: the index pages it dirtied
            // are written back once rather than at every 1000 pages of WAL.
            conn.pragma_update(None, "wal_autocheckpoint", INGEST_CHECKPOINT_PAGES)?;
            let tx = conn.transaction()?;
            let report = insert_events(&tx, events, now);
            let committed = report.and_then(|report| Ok(tx.commit().map(|()| report)?));
            conn.pragma_update(None, "wal_autocheckpoint", DEFAULT_CHECKPOINT_PAGES)?;
            committed
        })
    }

    /// The meter step: derives usage events from closed tunnel sessions, message
    /// deliveries, fallbacks that went out and finished jobs, each once (a row already
    /// metered is skipped by its source and sequence). With `since`, only rows that
    /// ended, were created, went out or finished since then are looked at (the periodic
    /// step); without, every row (`billing run`). Returns how many were new.
    pub fn meter_usage(&self, now: Millis, since: Option<Millis>) -> Result<u64> {
        self.blocking(|| {
            let mut conn = self.conn();
            let tx = conn.transaction()?;
            let mut events = Vec::new();
            derive_sessions(&tx, now, since, &mut events)?;
            derive_messages(&tx, since, &mut events)?;
            derive_fallbacks(&tx, since, &mut events)?;
            derive_jobs(&tx, since, &mut events)?;
            let report = insert_events(&tx, &events, now)?;
            tx.commit()?;
            Ok(report.accepted)
        })
    }

    /// Rates `month` with `rate` and stores the invoices, replacing the month's drafts
    /// only where they changed; returns (invoices, changed). A closed month is not
    /// rated again: its stored invoices are returned with 0 changed.
    pub fn rate_month(
        &self,
        month: &str,
        now: Millis,
        rate: impl FnOnce(&MonthUsage) -> std::result::Result<Vec<Invoice>, String>,
    ) -> Result<(Vec<Invoice>, u64)> {
        let rated = self.blocking(|| {
            let mut conn = self.conn();
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            if closed_at(&tx, month)?.is_some() {
                return Ok(None);
            }
            let usage = month_usage(&tx, month)?;
            let invoices = rate(&usage).map_err(StoreError::Invalid)?;
            let changed = write_invoices(&tx, month, &invoices, now)?;
            tx.commit()?;
            Ok::<_, StoreError>(Some((invoices, changed)))
        })?;
        match rated {
            Some(rated) => Ok(rated),
            None => Ok((self.invoices(None, Some(month))?, 0)),
        }
    }

    /// Rates `month` one last time, stores its invoices as final and closes it, in one
    /// transaction. Closing a closed month changes nothing and returns when it was
    /// closed.
    pub fn close_month(
        &self,
        month: &str,
        now: Millis,
        rate: impl FnOnce(&MonthUsage) -> std::result::Result<Vec<Invoice>, String>,
    ) -> Result<Millis> {
        self.blocking(|| {
            let mut conn = self.conn();
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            if let Some(at) = closed_at(&tx, month)? {
                return Ok(at);
            }
            let usage = month_usage(&tx, month)?;
            let mut invoices = rate(&usage).map_err(StoreError::Invalid)?;
            for invoice in &mut invoices {
                invoice.status = "final".into();
            }
            write_invoices(&tx, month, &invoices, now)?;
            tx.execute(
                "INSERT INTO billing_months (month, closed_at) VALUES (?1, ?2)",
                params![month, now],
            )?;
            tx.commit()?;
            Ok(now)
        })
    }

    /// When `month` was closed, if it was.
    pub fn month_closed_at(&self, month: &str) -> Result<Option<Millis>> {
        self.blocking(|| closed_at(&self.conn(), month))
    }

    /// Stored invoices, by month then account.
    pub fn invoices(&self, account: Option<&str>, month: Option<&str>) -> Result<Vec<Invoice>> {
        self.blocking(|| {
            let conn = self.fast();
            let mut stmt = conn.prepare(
                "SELECT body FROM invoices
                 WHERE (account = ?1 OR ?1 IS NULL) AND (month = ?2 OR ?2 IS NULL)
                 ORDER BY month, account",
            )?;
            let rows = stmt.query_map(params![account, month], |r| r.get::<_, String>(0))?;
            let mut out = Vec::new();
            for body in rows {
                let body = body?;
                out.push(
                    serde_json::from_str(&body)
                        .map_err(|e| StoreError::Corrupt(format!("invoice: {e}")))?,
                );
            }
            Ok(out)
        })
    }

    /// Calls `each` with every usage event billed in `month`, in the order stored.
    pub fn for_each_usage(&self, month: &str, mut each: impl FnMut(UsageEvent)) -> Result<()> {
        self.blocking(|| {
            let conn = self.fast();
            let mut stmt = conn.prepare(
                "SELECT key, source, account, provider, meter, quantity, at, month, note
                 FROM usage_events WHERE month = ?1 ORDER BY id",
            )?;
            let mut rows = stmt.query(params![month])?;
            while let Some(r) = rows.next()? {
                let meter: String = r.get(4)?;
                each(UsageEvent {
                    key: hex::encode(r.get::<_, Vec<u8>>(0)?),
                    source: r.get(1)?,
                    account: r.get(2)?,
                    provider: r.get(3)?,
                    meter: Meter::parse(&meter)
                        .ok_or_else(|| StoreError::Corrupt(format!("unknown meter {meter:?}")))?,
                    quantity: r.get(5)?,
                    time: r.get(6)?,
                    month: r.get(7)?,
                    note: r.get(8)?,
                });
            }
            Ok(())
        })
    }

    /// Stores a plans file's text (already checked); the latest one is in force.
    pub fn set_plans(&self, text: &str, now: Millis) -> Result<()> {
        self.blocking(|| {
            self.conn().execute(
                "INSERT INTO billing_plans (plans, set_at) VALUES (?1, ?2)",
                params![text, now],
            )?;
            Ok(())
        })
    }

    /// The plans file in force and when it was set.
    pub fn plans_text(&self) -> Result<Option<(String, Millis)>> {
        self.blocking(|| {
            Ok(self
                .fast()
                .query_row(
                    "SELECT plans, set_at FROM billing_plans ORDER BY id DESC LIMIT 1",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?)
        })
    }

    /// Sets (or replaces) a provider's price for a meter.
    pub fn set_provider_price(&self, price: &ProviderPrice, now: Millis) -> Result<()> {
        self.blocking(|| {
            self.conn().execute(
                "INSERT INTO provider_prices (provider, meter, price, per, currency, set_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (provider, meter) DO UPDATE SET price = excluded.price,
                    per = excluded.per, currency = excluded.currency, set_at = excluded.set_at",
                params![
                    price.provider,
                    price.meter.as_str(),
                    price.price.to_string(),
                    price.per,
                    price.currency,
                    now
                ],
            )?;
            Ok(())
        })
    }

    /// Every provider price.
    pub fn provider_prices(&self) -> Result<Vec<ProviderPrice>> {
        self.blocking(|| {
            let conn = self.fast();
            let mut stmt = conn.prepare(
                "SELECT provider, meter, price, per, currency FROM provider_prices
                 ORDER BY provider, meter",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, String>(4)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (provider, meter, price, per, currency) = row?;
                out.push(ProviderPrice {
                    meter: Meter::parse(&meter)
                        .ok_or_else(|| StoreError::Corrupt(format!("unknown meter {meter:?}")))?,
                    price: Price::parse(&price).map_err(StoreError::Corrupt)?,
                    provider,
                    per,
                    currency,
                });
            }
            Ok(out)
        })
    }

    /// Daily series since `since` (Unix ms), grouped as asked; see [`StatPoint`].
    pub fn stats(&self, by: StatsBy, since: Millis) -> Result<Vec<StatPoint>> {
        self.blocking(|| {
            let conn = self.fast();
            let mut points = Vec::new();
            let queries: &[(&str, &str)] = match by {
                StatsBy::Account => &[
                    (
                        "SELECT at / 86400000, account, meter, SUM(quantity) FROM usage_events
                         WHERE at >= ?1 GROUP BY 1, 2, 3",
                        "",
                    ),
                    (
                        "SELECT j.created_at / 86400000, 'user:' || a.owner_user_id, j.state, COUNT(*)
                         FROM jobs j JOIN agents a ON a.id = j.agent_id
                         JOIN orders o ON o.id = j.order_id
                         WHERE a.owner_user_id IS NOT NULL AND o.kind <> 'message'
                           AND j.created_at >= ?1
                         GROUP BY 1, 2, 3",
                        "jobs.",
                    ),
                    (
                        "SELECT h.at / 86400000, 'user:' || a.owner_user_id, 'connections', COUNT(*)
                         FROM address_history h JOIN agents a ON a.id = h.agent_id
                         WHERE h.kind = 'observed' AND a.owner_user_id IS NOT NULL AND h.at >= ?1
                         GROUP BY 1, 2",
                        "",
                    ),
                ],
                StatsBy::Sender => &[(
                    "SELECT j.created_at / 86400000, m.sender, j.state, COUNT(*)
                     FROM jobs j JOIN messages m ON m.id = j.order_id
                     WHERE j.created_at >= ?1 GROUP BY 1, 2, 3",
                    "messages.",
                )],
                StatsBy::Service => &[
                    (
                        "SELECT started_at / 86400000, provider_agent_id || '/' || share,
                            'tunnel.sessions', COUNT(*)
                         FROM tunnel_sessions WHERE started_at >= ?1 GROUP BY 1, 2",
                        "",
                    ),
                    (
                        "SELECT started_at / 86400000, provider_agent_id || '/' || share,
                            'tunnel.bytes', SUM(bytes_up + bytes_down)
                         FROM tunnel_sessions WHERE started_at >= ?1 GROUP BY 1, 2",
                        "",
                    ),
                ],
                StatsBy::Club => &[
                    (
                        "SELECT s.started_at / 86400000, c.club, 'tunnel.sessions', COUNT(*)
                         FROM tunnel_sessions s JOIN share_clubs c
                           ON c.agent_id = s.provider_agent_id AND c.share = s.share
                         WHERE s.started_at >= ?1 GROUP BY 1, 2",
                        "",
                    ),
                    (
                        "SELECT s.started_at / 86400000, c.club, 'tunnel.bytes',
                            SUM(s.bytes_up + s.bytes_down)
                         FROM tunnel_sessions s JOIN share_clubs c
                           ON c.agent_id = s.provider_agent_id AND c.share = s.share
                         WHERE s.started_at >= ?1 GROUP BY 1, 2",
                        "",
                    ),
                ],
            };
            for (sql, prefix) in queries {
                let mut stmt = conn.prepare(sql)?;
                let rows = stmt.query_map(params![since], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, i64>(3)?,
                    ))
                })?;
                for row in rows {
                    let (day, key, metric, value) = row?;
                    points.push(StatPoint {
                        day: day_name(day),
                        key,
                        metric: format!("{prefix}{metric}"),
                        value,
                    });
                }
            }
            points.sort_by(|a, b| (&a.day, &a.key, &a.metric).cmp(&(&b.day, &b.key, &b.metric)));
            Ok(points)
        })
    }
}

fn day_name(day: i64) -> String {
    chrono::DateTime::from_timestamp_millis(day * DAY_MS)
        .unwrap_or_default()
        .format("%Y-%m-%d")
        .to_string()
}

fn closed_at(conn: &Connection, month: &str) -> Result<Option<Millis>> {
    Ok(conn
        .query_row(
            "SELECT closed_at FROM billing_months WHERE month = ?1",
            params![month],
            |r| r.get(0),
        )
        .optional()?)
}

fn insert_events(tx: &Connection, events: &[NewUsage], now: Millis) -> Result<IngestReport> {
    let closed: BTreeSet<String> = tx
        .prepare("SELECT month FROM billing_months")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut stmt = tx.prepare_cached(INSERT_EVENT)?;
    let mut report = IngestReport::default();
    // Events of a batch mostly share a month: its bounds and booking are worked out
    // once.
    let mut current: Option<(Millis, Millis, String, Option<String>)> = None;
    for event in events {
        let (_, _, month, late_from) = match &current {
            Some((start, end, ..)) if (*start..*end).contains(&event.time) => {
                current.as_ref().expect("just matched")
            }
            _ => {
                let (start, end) = month_bounds(event.time);
                let own = month_of(event.time);
                let month = booking_month(event.time, &closed);
                let late_from = (month != own).then_some(own);
                current.insert((start, end, month, late_from))
            }
        };
        let inserted = stmt.execute(params![
            usage_key_bytes(&event.source, &event.seq),
            event.source,
            event.seq,
            event.account,
            event.provider,
            event.meter.as_str(),
            event.quantity,
            event.time,
            month,
            late_from,
            event.note,
            now
        ])?;
        if inserted == 1 {
            report.accepted += 1;
        } else {
            report.duplicates += 1;
        }
    }
    Ok(report)
}

fn month_usage(tx: &Connection, month: &str) -> Result<MonthUsage> {
    let mut usage = MonthUsage::default();
    {
        let mut stmt = tx.prepare(
            "SELECT account, provider, meter, SUM(quantity) FROM usage_events
             WHERE month = ?1 GROUP BY account, provider, meter",
        )?;
        let mut rows = stmt.query(params![month])?;
        while let Some(r) = rows.next()? {
            let meter: String = r.get(2)?;
            usage.totals.push(UsageTotal {
                account: r.get(0)?,
                provider: r.get(1)?,
                meter: Meter::parse(&meter)
                    .ok_or_else(|| StoreError::Corrupt(format!("unknown meter {meter:?}")))?,
                quantity: r.get(3)?,
            });
        }
    }
    {
        let mut stmt = tx.prepare(
            "SELECT account, late_from, COUNT(*) FROM usage_events
             WHERE month = ?1 AND late_from IS NOT NULL GROUP BY account, late_from",
        )?;
        let rows = stmt.query_map(params![month], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })?;
        for row in rows {
            let (account, from_month, events) = row?;
            usage.late.entry(account).or_default().push(LateNote {
                from_month,
                events: events as u64,
            });
        }
    }
    {
        let mut stmt = tx.prepare(
            "SELECT DISTINCT account, note FROM usage_events
             WHERE month = ?1 AND note <> '' ORDER BY account, note",
        )?;
        let rows = stmt.query_map(params![month], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })?;
        for row in rows {
            let (account, note) = row?;
            usage.notes.entry(account).or_default().push(note);
        }
    }
    Ok(usage)
}

/// Writes a month's invoices, touching only those whose content changed, and removes
/// drafts of accounts that no longer have one. Returns how many changed.
fn write_invoices(tx: &Connection, month: &str, invoices: &[Invoice], now: Millis) -> Result<u64> {
    let mut stored: HashMap<String, String> = tx
        .prepare("SELECT account, body FROM invoices WHERE month = ?1")?
        .query_map(params![month], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut changed = 0;
    {
        let mut upsert = tx.prepare(
            "INSERT INTO invoices (month, account, currency, total, status, body, written_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (month, account) DO UPDATE SET currency = excluded.currency,
                total = excluded.total, status = excluded.status, body = excluded.body,
                written_at = excluded.written_at",
        )?;
        for invoice in invoices {
            // Serializing our own plain data cannot fail.
            let body = serde_json::to_string(invoice).expect("an invoice serializes");
            if stored.remove(&invoice.account).as_deref() == Some(body.as_str()) {
                continue;
            }
            upsert.execute(params![
                month,
                invoice.account,
                invoice.currency,
                invoice.total,
                invoice.status,
                body,
                now
            ])?;
            changed += 1;
        }
    }
    let mut remove = tx.prepare("DELETE FROM invoices WHERE month = ?1 AND account = ?2")?;
    for account in stored.keys() {
        remove.execute(params![month, account])?;
        changed += 1;
    }
    Ok(changed)
}

// === Signed session counters ===

/// Stores one end's signed counters of a tunnel session (verified by the caller against
/// the key its connection authenticated with). Only the session's own provider or
/// consumer agent may sign for it; a resend of the same count changes nothing. The
/// whole signed report is kept, so the meter step verifies it again and a row edited
/// afterwards is caught.
pub(super) fn store_usage(
    tx: &Connection,
    agent_id: &str,
    usage: &SessionUsage,
    signed: &[u8],
    now: Millis,
) -> Result<()> {
    let ends: Option<(String, Option<String>)> = tx
        .query_row(
            "SELECT provider_agent_id, consumer_agent_id FROM tunnel_sessions WHERE id = ?1",
            params![usage.session],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let Some((provider, consumer)) = ends else {
        return Err(StoreError::Invalid(format!(
            "counters for an unknown tunnel session {}",
            usage.session
        )));
    };
    let signer = match usage.end {
        End::Provider => Some(provider),
        End::Consumer => consumer,
    };
    if signer.as_deref() != Some(agent_id) {
        return Err(StoreError::Invalid(format!(
            "agent {agent_id} is not the {} of tunnel session {}",
            usage.end.as_str(),
            usage.session
        )));
    }
    tx.execute(
        "INSERT INTO usage_signatures (session_id, side, agent_id, seq, bytes_up,
            bytes_down, requests, seconds, final, signature, signed_at, received_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
         ON CONFLICT DO NOTHING",
        params![
            usage.session,
            usage.end.as_str(),
            agent_id,
            usage.seq,
            usage.bytes_up as i64,
            usage.bytes_down as i64,
            usage.requests as i64,
            usage.seconds as i64,
            usage.last,
            signed,
            usage.at,
            now
        ],
    )?;
    Ok(())
}

/// One end's latest count of a session that still verifies, and what was wrong with
/// the rows that did not (for the invoice's notes and the log).
#[derive(Default)]
struct EndCount {
    counters: Option<Counters>,
    last: bool,
    problems: Vec<String>,
}

/// Reads back the counters both ends signed for `session`, verifying each stored
/// report again against the signer's enrolled key: a row whose report does not verify,
/// or whose columns differ from what was signed, is set aside and said so.
fn signed_counts(tx: &Connection, session: i64) -> Result<(EndCount, EndCount)> {
    let mut stmt = tx.prepare_cached(
        "SELECT u.side, u.agent_id, u.bytes_up, u.bytes_down, u.requests, u.seconds, u.final,
            u.signature, a.public_key
         FROM usage_signatures u LEFT JOIN agents a ON a.id = u.agent_id
         WHERE u.session_id = ?1 ORDER BY u.seq DESC",
    )?;
    let mut rows = stmt.query(params![session])?;
    let (mut provider, mut consumer) = (EndCount::default(), EndCount::default());
    while let Some(r) = rows.next()? {
        let side: String = r.get(0)?;
        let agent_id: String = r.get(1)?;
        let stored = Counters {
            bytes_up: r.get::<_, i64>(2)? as u64,
            bytes_down: r.get::<_, i64>(3)? as u64,
            requests: r.get::<_, i64>(4)? as u64,
            seconds: r.get::<_, i64>(5)? as u64,
        };
        let last: bool = r.get(6)?;
        let blob: Vec<u8> = r.get(7)?;
        let key: Option<Vec<u8>> = r.get(8)?;
        let count = match side.as_str() {
            "provider" => &mut provider,
            "consumer" => &mut consumer,
            _ => continue,
        };
        if count.counters.is_some() {
            continue;
        }
        let verified = codec::from_bytes::<SignedReport>(&blob, 2 * MAX_REPORT)
            .map_err(|e| e.to_string())
            .and_then(|signed| {
                let key = key.ok_or_else(|| format!("agent {agent_id} is not enrolled"))?;
                signed.verify(&key).map_err(|e| e.to_string())
            });
        match verified {
            Ok(Report::Usage(u)) if u.session == session && u.end.as_str() == side => {
                let signed = Counters {
                    bytes_up: u.bytes_up,
                    bytes_down: u.bytes_down,
                    requests: u.requests,
                    seconds: u.seconds,
                };
                if signed != stored || u.last != last {
                    count.problems.push(format!(
                        "the {side}'s stored counters differ from what it signed; the signed ones count"
                    ));
                }
                count.counters = Some(signed);
                count.last = u.last;
            }
            Ok(_) => count.problems.push(format!(
                "a stored {side} report is not this session's counters"
            )),
            Err(e) => count
                .problems
                .push(format!("a stored {side} signature does not verify ({e})")),
        }
    }
    Ok((provider, consumer))
}

// === The meter step ===

/// Bills closed tunnel sessions from the counters their ends signed, never from the
/// server's own count ([`billable_counters`]: the lower of both ends). A session waits
/// for both ends' last counts until [`SIGNATURE_GRACE`] after it ended, then is billed
/// with what arrived; one that cannot be billed (no consumer signature) gets a zero
/// event with the reason, so it is decided once. Refused sessions carried nothing and
/// are not metered.
fn derive_sessions(
    tx: &Connection,
    now: Millis,
    since: Option<Millis>,
    out: &mut Vec<NewUsage>,
) -> Result<()> {
    let mut stmt = tx.prepare(
        "SELECT s.id, s.provider_agent_id, s.provider_user_id, s.consumer_user_id,
            s.consumer_agent_id, s.via, s.ended_at
         FROM tunnel_sessions s
         WHERE s.ended_at IS NOT NULL AND (s.ended_at >= ?2 OR ?2 IS NULL)
           AND s.outcome NOT LIKE 'refused%' AND NOT EXISTS (
            SELECT 1 FROM usage_events e
            WHERE e.source = ?1 AND e.seq = s.id || ':tunnel_bytes')
         ORDER BY s.id",
    )?;
    let mut rows = stmt.query(params![SOURCE_SESSIONS, since])?;
    while let Some(r) = rows.next()? {
        let id: i64 = r.get(0)?;
        let provider_agent: String = r.get(1)?;
        let provider_user: Option<i64> = r.get(2)?;
        let consumer_user: Option<i64> = r.get(3)?;
        let consumer_agent: Option<String> = r.get(4)?;
        let via_text: String = r.get(5)?;
        let ended: i64 = r.get(6)?;
        let Some(via) = Via::parse(&via_text) else {
            tracing::warn!(
                session = id,
                "tunnel session of unknown kind {via_text:?} not metered"
            );
            continue;
        };
        let (provider, consumer) = signed_counts(tx, id)?;
        let complete = provider.last && (via == Via::Browser || consumer.last);
        if !complete && now < ended.saturating_add(SIGNATURE_GRACE) {
            continue;
        }
        let provider_account = match provider_user {
            Some(user) => format!("user:{user}"),
            None => format!("agent:{provider_agent}"),
        };
        let (account, earner, mut notes) = match (consumer_user, &consumer_agent) {
            (Some(user), _) => (format!("user:{user}"), Some(provider_account), Vec::new()),
            (None, Some(agent)) => (format!("agent:{agent}"), Some(provider_account), Vec::new()),
            (None, None) => (
                provider_account,
                None,
                vec![format!(
                    "{via_text} session without a signed-in user: billed to the provider's own account"
                )],
            ),
        };
        for problem in provider.problems.iter().chain(&consumer.problems) {
            tracing::warn!(session = id, "{problem}");
            notes.push(format!("tunnel session {id}: {problem}"));
        }
        let mut push = |meter: Meter, quantity: i64, notes: &[String]| {
            out.push(NewUsage {
                source: SOURCE_SESSIONS.into(),
                seq: format!("{id}:{meter}"),
                account: account.clone(),
                provider: earner.clone(),
                meter,
                quantity,
                time: ended,
                note: notes.join("; "),
            })
        };
        let billable = match billable_counters(
            via,
            provider.counters,
            consumer.counters,
            SIGNATURE_TOLERANCE_BP,
        ) {
            Ok(billable) => billable,
            Err(why) => {
                tracing::warn!(session = id, "tunnel session not billed: {why}");
                notes.push(format!("tunnel session {id} not billed: {why}"));
                // The bytes event marks the session as metered, so it is kept at 0.
                push(Meter::TunnelBytes, 0, &notes);
                continue;
            }
        };
        if billable.provider_only {
            notes.push("browser sessions are billed at the provider's signed counts alone".into());
        }
        if billable.disagreement {
            tracing::warn!(
                session = id,
                "the ends of a tunnel session disagree beyond the tolerance"
            );
            notes.push(format!(
                "tunnel session {id}: the two ends' counts differ by more than \
                 {SIGNATURE_TOLERANCE_BP} basis points; the lower was billed"
            ));
        }
        let counters = billable.counters;
        for (meter, quantity) in [
            (Meter::TunnelBytes, counters.bytes_up + counters.bytes_down),
            (Meter::TunnelSeconds, counters.seconds),
            (Meter::TunnelRequests, counters.requests),
        ] {
            // The bytes event marks the session as metered, so it is kept even at 0.
            if quantity == 0 && meter != Meter::TunnelBytes {
                continue;
            }
            push(meter, quantity.min(i64::MAX as u64) as i64, &notes);
        }
    }
    Ok(())
}

fn derive_messages(tx: &Connection, since: Option<Millis>, out: &mut Vec<NewUsage>) -> Result<()> {
    let mut stmt = tx.prepare(
        "SELECT j.id, m.sender, j.created_at FROM jobs j JOIN messages m ON m.id = j.order_id
         WHERE (j.created_at >= ?2 OR ?2 IS NULL) AND NOT EXISTS (
            SELECT 1 FROM usage_events e WHERE e.source = ?1 AND e.seq = CAST(j.id AS TEXT))
         ORDER BY j.id",
    )?;
    let rows = stmt.query_map(params![SOURCE_MESSAGES, since], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
        ))
    })?;
    for row in rows {
        let (job, sender, at) = row?;
        out.push(NewUsage {
            source: SOURCE_MESSAGES.into(),
            seq: job.to_string(),
            account: format!("sender:{sender}"),
            provider: None,
            meter: Meter::MessagesSent,
            quantity: 1,
            time: at,
            note: String::new(),
        });
    }
    Ok(())
}

fn derive_fallbacks(tx: &Connection, since: Option<Millis>, out: &mut Vec<NewUsage>) -> Result<()> {
    let mut stmt = tx.prepare(
        "SELECT r.campaign_id, r.line, c.sender, r.fb_kind, r.fb_sent_at
         FROM campaign_rows r JOIN campaigns c ON c.id = r.campaign_id
         WHERE r.fb_sent_at IS NOT NULL AND (r.fb_sent_at >= ?2 OR ?2 IS NULL) AND NOT EXISTS (
            SELECT 1 FROM usage_events e
            WHERE e.source = ?1 AND e.seq = r.campaign_id || ':' || r.line)",
    )?;
    let rows = stmt.query_map(params![SOURCE_FALLBACKS, since], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, Option<String>>(3)?,
            r.get::<_, i64>(4)?,
        ))
    })?;
    for row in rows {
        let (campaign, line, sender, kind, at) = row?;
        let meter = match kind.as_deref() {
            Some("sms") => Meter::FallbackSms,
            Some("email") => Meter::FallbackEmail,
            other => {
                tracing::warn!(%campaign, line, "fallback of unknown kind {other:?} not metered");
                continue;
            }
        };
        out.push(NewUsage {
            source: SOURCE_FALLBACKS.into(),
            seq: format!("{campaign}:{line}"),
            account: format!("sender:{sender}"),
            provider: None,
            meter,
            quantity: 1,
            time: at,
            note: String::new(),
        });
    }
    Ok(())
}

fn derive_jobs(tx: &Connection, since: Option<Millis>, out: &mut Vec<NewUsage>) -> Result<()> {
    let mut stmt = tx.prepare(
        "SELECT j.id, a.owner_user_id, j.finished_at FROM jobs j
         JOIN agents a ON a.id = j.agent_id JOIN orders o ON o.id = j.order_id
         WHERE j.finished_at IS NOT NULL AND (j.finished_at >= ?2 OR ?2 IS NULL)
           AND a.owner_user_id IS NOT NULL
           AND o.kind <> 'message' AND NOT EXISTS (
            SELECT 1 FROM usage_events e WHERE e.source = ?1 AND e.seq = CAST(j.id AS TEXT))
         ORDER BY j.id",
    )?;
    let rows = stmt.query_map(params![SOURCE_JOBS, since], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, i64>(2)?,
        ))
    })?;
    for row in rows {
        let (job, user, at) = row?;
        out.push(NewUsage {
            source: SOURCE_JOBS.into(),
            seq: job.to_string(),
            account: format!("user:{user}"),
            provider: None,
            meter: Meter::JobsRun,
            quantity: 1,
            time: at,
            note: String::new(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{NewSession, SessionEnd};
    use crate::store::messages::tests::{agent, report, store, NOW};

    /// A session from `consumer` (an agent) or a browser to `provider`'s share, closed
    /// at `NOW` after 10 s with `outcome`.
    fn session(store: &Store, provider: &str, consumer: Option<&str>, outcome: &str) -> i64 {
        let id = store
            .open_session(&NewSession {
                provider_agent_id: provider.into(),
                share: "shop".into(),
                provider_user_id: None,
                consumer_user_id: None,
                consumer_agent_id: consumer.map(str::to_string),
                via: if consumer.is_some() {
                    Via::Relay
                } else {
                    Via::Browser
                },
                source: "127.0.0.1:1".into(),
                path: String::new(),
                started_at: NOW - 10_000,
            })
            .unwrap();
        let end = SessionEnd {
            bytes_up: 999_999,
            bytes_down: 999_999,
            requests: 1,
            outcome: outcome.into(),
            ended_at: NOW,
        };
        store.close_session(id, &end).unwrap();
        id
    }

    fn usage(agent_id: &str, session: i64, end: End, seq: u32, bytes: u64) -> Report {
        Report::Usage(SessionUsage {
            agent_id: agent_id.into(),
            session,
            end,
            seq,
            bytes_up: bytes,
            bytes_down: bytes,
            requests: 1,
            seconds: 10,
            last: true,
            at: NOW,
        })
    }

    /// The session's bytes event, if metered: (account, quantity, note).
    fn billed(store: &Store, session: i64) -> Option<(String, i64, String)> {
        store
            .conn()
            .query_row(
                "SELECT account, quantity, note FROM usage_events WHERE source = ?1 AND seq = ?2",
                params![SOURCE_SESSIONS, format!("{session}:tunnel_bytes")],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .unwrap()
    }

    #[test]
    fn sessions_bill_the_lower_signed_count_and_only_their_own_ends_may_sign() {
        let store = store();
        let (provider, provider_key) = agent(&store, 1, "shop-box");
        let (consumer, consumer_key) = agent(&store, 2, "laptop");
        let (stranger, stranger_key) = agent(&store, 3, "other");
        let send = |agent_id: &str, key, r: Report| {
            let (signed, r) = report(key, r);
            store.store_report(agent_id, &signed, &r, NOW)
        };

        // Both ends signed; the provider over-reports: the consumer's count is billed and
        // the gap flagged. (The server's own count, 999,999 each way, plays no part.)
        let both = session(&store, &provider, Some(&consumer), "closed");
        let fair = usage(&consumer, both, End::Consumer, 0, 1_000);
        send(&consumer, &consumer_key, fair).unwrap();
        let inflated = usage(&provider, both, End::Provider, 0, 50_000);
        send(&provider, &provider_key, inflated).unwrap();
        // Only the session's own ends may sign for it, and only for a session that exists.
        let intruder = usage(&stranger, both, End::Consumer, 1, 1);
        assert!(send(&stranger, &stranger_key, intruder).is_err());
        let posing = usage(&consumer, both, End::Provider, 1, 1);
        assert!(send(&consumer, &consumer_key, posing).is_err());
        let nowhere = usage(&consumer, 9_999, End::Consumer, 0, 1);
        assert!(send(&consumer, &consumer_key, nowhere).is_err());

        // A browser session: the provider's count alone, marked so.
        let browser = session(&store, &provider, None, "closed");
        let counted = usage(&provider, browser, End::Provider, 0, 700);
        send(&provider, &provider_key, counted).unwrap();

        // The consumer never signed: not billed, once the grace is over, and said so.
        let unsigned = session(&store, &provider, Some(&consumer), "closed");
        let alone = usage(&provider, unsigned, End::Provider, 0, 5_000);
        send(&provider, &provider_key, alone).unwrap();
        // A refused session carried nothing: no event, for anyone.
        let refused = session(&store, &provider, Some(&consumer), "refused: no such share");

        // Within the grace, a session missing an end's last count waits.
        assert_eq!(store.meter_usage(NOW + 1_000, None).unwrap(), 3 + 3);
        assert_eq!(
            billed(&store, unsigned),
            None,
            "waits for the consumer's count"
        );
        let (account, quantity, note) = billed(&store, both).unwrap();
        assert_eq!(account, format!("agent:{consumer}"));
        assert_eq!(
            quantity, 2_000,
            "the lower of both ends, never the server's count"
        );
        assert!(note.contains("differ by more than"), "{note}");
        let (account, quantity, note) = billed(&store, browser).unwrap();
        assert_eq!(account, format!("agent:{provider}"));
        assert_eq!(quantity, 1_400);
        assert!(note.contains("provider's signed counts alone"), "{note}");
        assert_eq!(billed(&store, refused), None);

        store.meter_usage(NOW + SIGNATURE_GRACE, None).unwrap();
        let (_, quantity, note) = billed(&store, unsigned).unwrap();
        assert_eq!(quantity, 0);
        assert!(
            note.contains("not billed: no counters signed by the consumer"),
            "{note}"
        );
    }

    #[test]
    fn an_edited_or_forged_stored_count_is_set_aside() {
        let store = store();
        let (provider, provider_key) = agent(&store, 1, "shop-box");
        let (consumer, consumer_key) = agent(&store, 2, "laptop");
        let id = session(&store, &provider, Some(&consumer), "closed");
        for (agent_id, key, end, bytes) in [
            (&provider, &provider_key, End::Provider, 1_000),
            (&consumer, &consumer_key, End::Consumer, 1_000),
        ] {
            let (signed, r) = report(key, usage(agent_id, id, end, 0, bytes));
            store.store_report(agent_id, &signed, &r, NOW).unwrap();
        }
        // Someone with the database raises the consumer's columns and swaps the
        // provider's report for one signed by another key.
        let other_key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        let (forged, _) = report(&other_key, usage(&provider, id, End::Provider, 0, 90_000));
        store
            .conn()
            .execute_batch(&format!(
                "UPDATE usage_signatures SET bytes_up = 50000, bytes_down = 50000
                 WHERE session_id = {id} AND side = 'consumer'"
            ))
            .unwrap();
        store
            .conn()
            .execute(
                "UPDATE usage_signatures SET bytes_up = 90000, bytes_down = 90000,
                    signature = ?2 WHERE session_id = ?1 AND side = 'provider'",
                params![id, codec::to_bytes(&forged).unwrap()],
            )
            .unwrap();
        // The provider's last count no longer verifies: the session waits for it...
        store.meter_usage(NOW + 1_000, None).unwrap();
        assert_eq!(billed(&store, id), None);
        // ...until the grace is over.
        store.meter_usage(NOW + SIGNATURE_GRACE, None).unwrap();
        let (_, quantity, note) = billed(&store, id).unwrap();
        // The consumer's signed count stands; the provider's forged one is ignored.
        assert_eq!(quantity, 2_000, "{note}");
        assert!(
            note.contains("consumer's stored counters differ from what it signed"),
            "{note}"
        );
        assert!(
            note.contains("provider signature does not verify"),
            "{note}"
        );
    }
}
