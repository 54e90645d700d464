//! Push messages: senders, messages (an order row of kind `message` plus one job per
//! recipient, so delivery, redelivery and expiry are the jobs'), the agents' signed
//! reports (receipts and block-list changes), and the listings built from them.
//!
//! A receipt moves its job: `stored` to succeeded, `refused` to refused, `expired` to
//! expired, from any state still waiting for the agent. Reports are kept as signed, so
//! anyone can verify them later against the agent's enrolled key.

use super::*;

use herald_shared::message::{BlockChange, Message, Receipt, SignedReport};

use crate::model::{
    MessageCounts, MessageDetail, MessageInfo, ReceiptInfo, RecipientInfo, RefusalInfo, SenderInfo,
    UserBlock, UserMessage,
};

/// The reason stored for a recipient the server skipped because its agent had reported
/// blocking the sender.
pub const SKIPPED_BLOCKED: &str = "skipped: the agent reported that its user blocked this sender";

/// A stored receipt with what verifying it needs.
#[derive(Debug, Clone)]
pub struct StoredReceipt {
    /// As listed.
    pub info: ReceiptInfo,
    /// The signed report, as stored (bincode of a `SignedReport`).
    pub report: Vec<u8>,
    /// The agent's enrolled Ed25519 public key (raw).
    pub agent_key: Vec<u8>,
}

/// What [`Store::store_report`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportStored {
    /// A receipt; its job changed (tell watchers).
    Receipt {
        /// The job it moved, if any.
        job_id: Option<JobId>,
    },
    /// A block-list change.
    Block,
    /// One end's signed counters of a tunnel session.
    Usage,
}

const MESSAGE_SELECT: &str = "SELECT m.id, m.sender, m.title, m.priority, m.advertising, m.audience,
        m.created_at, m.expires_at,
        (SELECT COUNT(*) FROM jobs j WHERE j.order_id = m.id),
        (SELECT COUNT(*) FROM message_receipts r WHERE r.message_id = m.id AND r.state = 'stored'),
        (SELECT COUNT(*) FROM message_receipts r WHERE r.message_id = m.id AND r.state = 'displayed'),
        (SELECT COUNT(*) FROM message_receipts r WHERE r.message_id = m.id AND r.state = 'read'),
        (SELECT COUNT(*) FROM jobs j WHERE j.order_id = m.id AND j.state IN ('refused', 'failed', 'canceled')),
        (SELECT COUNT(*) FROM jobs j WHERE j.order_id = m.id AND j.state = 'expired'),
        (SELECT COUNT(*) FROM jobs j WHERE j.order_id = m.id AND j.state IN ('queued', 'delivered', 'running'))
     FROM messages m";

fn message_row(r: &Row) -> rusqlite::Result<MessageInfo> {
    let count = |i: usize| -> rusqlite::Result<u64> { Ok(r.get::<_, i64>(i)?.max(0) as u64) };
    let addressed = count(8)?;
    let stored = count(9)?;
    Ok(MessageInfo {
        id: r.get(0)?,
        sender: r.get(1)?,
        title: r.get(2)?,
        priority: r.get(3)?,
        advertising: r.get(4)?,
        audience: r.get(5)?,
        created_at: r.get(6)?,
        expires_at: r.get(7)?,
        counts: MessageCounts {
            addressed,
            stored,
            displayed: count(10)?,
            read: count(11)?,
            refused: count(12)?,
            expired: count(13)?,
            pending: count(14)?,
            success_rate: if addressed == 0 {
                0.0
            } else {
                stored as f64 / addressed as f64
            },
        },
    })
}

impl Store {
    // === senders ===

    /// Registers a sender: its operator-signed grant and the hash of its API token.
    #[allow(clippy::too_many_arguments)]
    pub fn add_sender(
        &self,
        name: &str,
        display_name: &str,
        public_key: &str,
        advertising: bool,
        grant: &Envelope,
        token_hash: &str,
        now: Millis,
    ) -> Result<()> {
        self.blocking(|| {
            let blob = codec::to_bytes(grant).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let conn = self.conn();
            let exists: Option<String> = conn
                .query_row(
                    "SELECT name FROM senders WHERE name = ?1 OR public_key = ?2",
                    params![name, public_key],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(existing) = exists {
                return Err(StoreError::Conflict(format!(
                    "sender {existing} already exists with that name or key; remove it first"
                )));
            }
            conn.execute(
                "INSERT INTO senders (name, display_name, public_key, advertising, grant_envelope, token_hash, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![name, display_name, public_key, advertising, blob, token_hash, now],
            )?;
            Ok(())
        })
    }

    /// Every sender.
    pub fn senders(&self) -> Result<Vec<SenderInfo>> {
        self.blocking(|| {
            let conn = self.fast();
            let mut stmt = conn.prepare(
                "SELECT s.name, s.display_name, s.public_key, s.advertising, s.created_at,
                        (SELECT COUNT(*) FROM messages m WHERE m.sender = s.name)
                 FROM senders s ORDER BY s.name",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(SenderInfo {
                    name: r.get(0)?,
                    display_name: r.get(1)?,
                    public_key: r.get(2)?,
                    advertising: r.get(3)?,
                    created_at: r.get(4)?,
                    messages: r.get::<_, i64>(5)?.max(0) as u64,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// Lets console user `login` act for `sender` in the console (or no longer, with
    /// `None`).
    pub fn link_sender(&self, login: &str, sender: Option<&str>) -> Result<()> {
        self.blocking(|| {
            let conn = self.conn();
            if let Some(sender) = sender {
                let known: Option<String> = conn
                    .query_row(
                        "SELECT name FROM senders WHERE name = ?1",
                        params![sender],
                        |r| r.get(0),
                    )
                    .optional()?;
                if known.is_none() {
                    return Err(StoreError::NotFound(format!("no sender {sender}")));
                }
            }
            let changed = conn.execute(
                "UPDATE users SET sender = ?2 WHERE login = ?1",
                params![login, sender],
            )?;
            if changed == 0 {
                return Err(StoreError::NotFound(format!("no console user {login}")));
            }
            Ok(())
        })
    }

    /// A sender's public key (hex) and operator-signed grant.
    pub fn sender_by_name(&self, name: &str) -> Result<Option<(String, Envelope)>> {
        self.name_and_envelope(
            "SELECT public_key, grant_envelope FROM senders WHERE name = ?1",
            name,
        )
    }

    /// Removes a sender: its token stops working and the server takes no more messages
    /// signed by its key. Messages already sent stay (with their receipts).
    pub fn remove_sender(&self, name: &str) -> Result<()> {
        self.blocking(|| {
            let removed = self
                .conn()
                .execute("DELETE FROM senders WHERE name = ?1", params![name])?;
            if removed == 0 {
                return Err(StoreError::NotFound(format!("no sender named {name:?}")));
            }
            Ok(())
        })
    }

    /// The sender whose API token has this hash.
    pub fn sender_by_token(&self, token_hash: &str) -> Result<Option<String>> {
        self.name_where("SELECT name FROM senders WHERE token_hash = ?1", token_hash)
    }

    /// The sender holding a public key (hex), with its operator-signed grant.
    pub fn sender_grant(&self, public_key: &str) -> Result<Option<(String, Envelope)>> {
        self.name_and_envelope(
            "SELECT name, grant_envelope FROM senders WHERE public_key = ?1",
            public_key,
        )
    }

    // === messages ===

    /// Stores a verified message and one delivery job per agent in `agents`, in one
    /// transaction. Agents whose latest report says they block the sender get a job
    /// that is refused at once ([`SKIPPED_BLOCKED`]); the others are queued from
    /// `deliver_at`. Returns the queued `(agent, job)` pairs and how many were skipped.
    pub fn create_message(
        &self,
        message: &Message,
        envelope: &Envelope,
        agents: &[String],
        deliver_at: Millis,
        now: Millis,
    ) -> Result<(Vec<(String, JobId)>, u64)> {
        self.blocking(|| {
            let mut conn = self.conn();
            let tx = conn.transaction()?;
            insert_message(&tx, message, envelope, now)?;
            let blocked = blocked_agents(&tx, &message.sender)?;
            let mut jobs = MessageJobs::prepare(&tx, message, deliver_at, now)?;
            let mut queued = Vec::with_capacity(agents.len());
            let mut skipped = 0;
            for agent in agents {
                match jobs.insert(agent, blocked.contains(agent))? {
                    Some(job) => queued.push((agent.clone(), job)),
                    None => skipped += 1,
                }
            }
            drop(jobs);
            tx.commit()?;
            Ok((queued, skipped))
        })
    }

    /// Messages, newest first; `sender` filters.
    pub fn messages(&self, sender: Option<&str>, limit: u32) -> Result<Vec<MessageInfo>> {
        self.blocking(|| {
            let conn = self.fast();
            let mut stmt = conn.prepare(&format!(
                "{MESSAGE_SELECT} WHERE (m.sender = ?1 OR ?1 IS NULL)
                 ORDER BY m.created_at DESC, m.id LIMIT ?2"
            ))?;
            let rows = stmt.query_map(params![sender, limit], message_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// One message with every recipient's state.
    pub fn message(&self, id: &str) -> Result<MessageDetail> {
        self.blocking(|| {
            let conn = self.fast();
            let info = conn
                .query_row(
                    &format!("{MESSAGE_SELECT} WHERE m.id = ?1"),
                    params![id],
                    message_row,
                )
                .optional()?
                .ok_or_else(|| StoreError::NotFound(format!("no message {id}")))?;
            let (body, link, collapse): (String, Option<String>, Option<String>) = conn.query_row(
                "SELECT body, link, collapse FROM messages WHERE id = ?1",
                params![id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )?;
            let mut stmt = conn.prepare(
                "SELECT j.agent_id, a.name, j.state, j.error,
                        (SELECT at FROM message_receipts r WHERE r.message_id = j.order_id
                            AND r.agent_id = j.agent_id AND r.state = 'stored'),
                        (SELECT at FROM message_receipts r WHERE r.message_id = j.order_id
                            AND r.agent_id = j.agent_id AND r.state = 'displayed'),
                        (SELECT at FROM message_receipts r WHERE r.message_id = j.order_id
                            AND r.agent_id = j.agent_id AND r.state = 'read')
                 FROM jobs j JOIN agents a ON a.id = j.agent_id
                 WHERE j.order_id = ?1 ORDER BY a.name",
            )?;
            let recipients = stmt
                .query_map(params![id], |r| {
                    let job_state: String = r.get(2)?;
                    let reason: Option<String> = r.get(3)?;
                    let stored_at: Option<Millis> = r.get(4)?;
                    let state = match (job_state.as_str(), &reason) {
                        (_, Some(reason)) if reason == SKIPPED_BLOCKED => "skipped_blocked",
                        (_, _) if stored_at.is_some() => "stored",
                        ("succeeded", _) => "stored",
                        ("failed" | "canceled", _) => "refused",
                        (other, _) => other,
                    }
                    .to_string();
                    Ok(RecipientInfo {
                        agent_id: r.get(0)?,
                        agent: r.get(1)?,
                        state,
                        reason,
                        stored_at,
                        displayed_at: r.get(5)?,
                        read_at: r.get(6)?,
                    })
                })?
                .collect::<Result<_, _>>()?;
            Ok(MessageDetail {
                info,
                body,
                link,
                collapse,
                recipients,
            })
        })
    }

    /// A message's stored receipts, each with the signed report as stored and its
    /// agent's enrolled public key (raw), for verification.
    pub fn receipts(&self, id: &str) -> Result<Vec<StoredReceipt>> {
        self.blocking(|| {
            let conn = self.fast();
            let exists: Option<String> = conn
                .query_row("SELECT id FROM messages WHERE id = ?1", params![id], |r| {
                    r.get(0)
                })
                .optional()?;
            if exists.is_none() {
                return Err(StoreError::NotFound(format!("no message {id}")));
            }
            let mut stmt = conn.prepare(
                "SELECT r.agent_id, r.state, r.reason, r.at, r.report, a.public_key
                 FROM message_receipts r JOIN agents a ON a.id = r.agent_id
                 WHERE r.message_id = ?1 ORDER BY r.agent_id, r.at",
            )?;
            let rows = stmt.query_map(params![id], |r| {
                let report: Vec<u8> = r.get(4)?;
                let agent_key: Vec<u8> = r.get(5)?;
                Ok(StoredReceipt {
                    info: ReceiptInfo {
                        agent_id: r.get(0)?,
                        state: r.get(1)?,
                        reason: r.get(2)?,
                        at: r.get(3)?,
                        report: base64::engine::general_purpose::STANDARD.encode(&report),
                        agent_key: hex::encode(&agent_key),
                        verified: None,
                    },
                    report,
                    agent_key,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// Blocks agents reported (latest report per agent and sender says blocked).
    pub fn refusals(&self, sender: Option<&str>) -> Result<Vec<RefusalInfo>> {
        self.blocking(|| {
            let conn = self.fast();
            let mut stmt = conn.prepare(
                "SELECT b.agent_id, a.name, NULLIF(u.phone, ''), b.sender, b.by, b.at
                 FROM sender_blocks b JOIN agents a ON a.id = b.agent_id
                 LEFT JOIN users u ON u.id = a.owner_user_id
                 WHERE b.blocked = 1 AND (b.sender = ?1 OR ?1 IS NULL)
                 ORDER BY b.at DESC, b.agent_id",
            )?;
            let rows = stmt.query_map(params![sender], |r| {
                Ok(RefusalInfo {
                    agent_id: r.get(0)?,
                    agent: r.get(1)?,
                    phone: r.get(2)?,
                    sender: r.get(3)?,
                    by: r.get(4)?,
                    at: r.get(5)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    // === console users' block requests ===

    /// Records a console user's request that `agent_id` block (or unblock) `sender`,
    /// replacing an earlier unanswered one for the same pair. Returns its id.
    pub fn request_block(
        &self,
        agent_id: &str,
        sender: &str,
        blocked: bool,
        user_id: i64,
        now: Millis,
    ) -> Result<i64> {
        self.blocking(|| {
            let mut conn = self.conn();
            let tx = conn.transaction()?;
            tx.execute(
                "DELETE FROM block_requests WHERE agent_id = ?1 AND sender = ?2",
                params![agent_id, sender],
            )?;
            tx.execute(
                "INSERT INTO block_requests (agent_id, sender, blocked, user_id, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![agent_id, sender, blocked, user_id, now],
            )?;
            let id = tx.last_insert_rowid();
            tx.commit()?;
            Ok(id)
        })
    }

    /// An agent's unanswered block requests.
    pub fn block_requests(&self, agent_id: &str) -> Result<Vec<BlockRequest>> {
        self.blocking(|| {
            let conn = self.fast();
            let mut stmt = conn.prepare_cached(
                "SELECT id, sender, blocked FROM block_requests WHERE agent_id = ?1 ORDER BY id",
            )?;
            let rows = stmt.query_map(params![agent_id], |r| {
                Ok(BlockRequest {
                    id: r.get(0)?,
                    sender: r.get(1)?,
                    blocked: r.get(2)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// The messages sent to a console user's devices, newest first, one row per
    /// message and device.
    pub fn user_messages(&self, user_id: i64, limit: u32) -> Result<Vec<UserMessage>> {
        self.blocking(|| {
            let conn = self.fast();
            let mut stmt = conn.prepare(
                "SELECT m.id, m.sender, COALESCE(s.display_name, m.sender), m.title, m.advertising,
                        a.id, a.name, j.state, j.error, m.created_at,
                        (SELECT MAX(CASE r.state WHEN 'read' THEN 3 WHEN 'displayed' THEN 2
                                                 WHEN 'stored' THEN 1 ELSE 0 END)
                         FROM message_receipts r
                         WHERE r.message_id = m.id AND r.agent_id = a.id)
                 FROM jobs j
                 JOIN messages m ON m.id = j.order_id
                 JOIN agents a ON a.id = j.agent_id
                 LEFT JOIN senders s ON s.name = m.sender
                 WHERE a.owner_user_id = ?1
                 ORDER BY m.created_at DESC, a.name LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![user_id, limit], |r| {
                let job_state: String = r.get(7)?;
                let error: Option<String> = r.get(8)?;
                let best: Option<i64> = r.get(10)?;
                let state = match (best, job_state.as_str()) {
                    (Some(3), _) => "read",
                    (Some(2), _) => "displayed",
                    (Some(1), _) => "stored",
                    (_, "refused" | "failed" | "canceled") => "refused",
                    (_, "expired") => "expired",
                    _ => "on its way",
                };
                Ok(UserMessage {
                    message_id: r.get(0)?,
                    sender: r.get(1)?,
                    display_name: r.get(2)?,
                    title: r.get(3)?,
                    advertising: r.get(4)?,
                    agent_id: r.get(5)?,
                    agent: r.get(6)?,
                    state: state.to_string(),
                    reason: error,
                    created_at: r.get(9)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// Per device of a console user, the senders it reported blocking, and the requests
    /// still waiting for an answer.
    pub fn user_blocks(&self, user_id: i64) -> Result<Vec<UserBlock>> {
        self.blocking(|| {
            let conn = self.fast();
            let mut stmt = conn.prepare(
                "SELECT a.id, a.name, b.sender, b.blocked, b.by, NULL
                 FROM sender_blocks b JOIN agents a ON a.id = b.agent_id
                 WHERE a.owner_user_id = ?1 AND b.blocked = 1
                 UNION ALL
                 SELECT a.id, a.name, q.sender, q.blocked, 'console', q.created_at
                 FROM block_requests q JOIN agents a ON a.id = q.agent_id
                 WHERE a.owner_user_id = ?1
                 ORDER BY 2, 3",
            )?;
            let rows = stmt.query_map(params![user_id], |r| {
                Ok(UserBlock {
                    agent_id: r.get(0)?,
                    agent: r.get(1)?,
                    sender: r.get(2)?,
                    blocked: r.get(3)?,
                    by: r.get(4)?,
                    requested_at: r.get(5)?,
                })
            })?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    // === the agents' signed reports ===

    /// Stores reports that verified against their agents' keys, in one transaction,
    /// idempotently: a receipt once per (message, agent, state), a block change only if
    /// newer than the one kept. A report that cannot be stored (a receipt for a
    /// message its agent was never sent: [`StoreError::NotFound`]) fails alone, with
    /// its error in its place; only a failure of the transaction itself fails them all.
    pub fn store_reports(
        &self,
        reports: &[(&str, &SignedReport, &herald_shared::message::Report)],
        now: Millis,
    ) -> Result<Vec<Result<ReportStored>>> {
        self.blocking(|| {
            let mut conn = self.conn();
            // Immediate: the batch reads before it writes, and a deferred transaction
            // whose snapshot went stale could not take the write lock (SQLITE_BUSY at
            // once, without waiting).
            let mut tx =
                conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let mut outcomes = Vec::with_capacity(reports.len());
            for (agent_id, signed, report) in reports {
                // Each report in its own savepoint: one that cannot be stored (a
                // receipt for a message never sent, a row that breaks a constraint)
                // fails alone instead of failing its whole batch, and its agent with it.
                let item = tx.savepoint()?;
                let outcome = store_one(&item, agent_id, signed, report, now);
                if outcome.is_ok() {
                    item.commit()?;
                }
                outcomes.push(outcome);
            }
            tx.commit()?;
            Ok(outcomes)
        })
    }

    /// [`Store::store_reports`] for one report.
    pub fn store_report(
        &self,
        agent_id: &str,
        signed: &SignedReport,
        report: &herald_shared::message::Report,
        now: Millis,
    ) -> Result<ReportStored> {
        self.store_reports(&[(agent_id, signed, report)], now)?
            .pop()
            .expect("one outcome per report")
    }
}

fn store_one(
    tx: &Connection,
    agent_id: &str,
    signed: &SignedReport,
    report: &herald_shared::message::Report,
    now: Millis,
) -> Result<ReportStored> {
    let blob = codec::to_bytes(signed).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    match report {
        herald_shared::message::Report::Receipt(receipt) => Ok(ReportStored::Receipt {
            job_id: store_receipt(tx, agent_id, receipt, &blob, now)?,
        }),
        herald_shared::message::Report::Block(change) => {
            store_block(tx, change, &blob, now)?;
            Ok(ReportStored::Block)
        }
        herald_shared::message::Report::Usage(usage) => {
            super::billing::store_usage(tx, agent_id, usage, &blob, now)?;
            Ok(ReportStored::Usage)
        }
    }
}

/// The order and message rows of a verified message.
pub(super) fn insert_message(
    tx: &Connection,
    message: &Message,
    envelope: &Envelope,
    now: Millis,
) -> Result<()> {
    let id = message.id_hex();
    let describe = format!("message from {}: {}", message.sender, message.title);
    insert_order_row(tx, &id, envelope, &describe, "message", None, now)?;
    tx.execute(
        "INSERT INTO messages (id, sender, title, body, priority, advertising, audience,
                               collapse, link, hash, created_at, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        params![
            id,
            message.sender,
            message.title,
            message.body,
            message.priority.as_str(),
            message.advertising,
            message.audience.to_string(),
            message.collapse,
            message.link,
            hex::encode(herald_shared::message::message_hash(envelope)),
            now,
            message.expires_at,
        ],
    )?;
    Ok(())
}

/// Agents whose latest report says they block `sender`.
pub(super) fn blocked_agents(
    tx: &Connection,
    sender: &str,
) -> Result<std::collections::HashSet<String>> {
    let mut stmt =
        tx.prepare("SELECT agent_id FROM sender_blocks WHERE sender = ?1 AND blocked = 1")?;
    let rows = stmt.query_map(params![sender], |r| r.get(0))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Inserts a message's delivery jobs, one per agent.
pub(super) struct MessageJobs<'t> {
    insert: super::sql::Statement<'t>,
    id: String,
    expires_at: Millis,
    now: Millis,
    deliver_at: Millis,
}

impl<'t> MessageJobs<'t> {
    pub(super) fn prepare(
        tx: &'t Connection,
        message: &Message,
        deliver_at: Millis,
        now: Millis,
    ) -> Result<Self> {
        Ok(MessageJobs {
            insert: tx.prepare(
                "INSERT INTO jobs (agent_id, order_id, state, created_at, deliver_after,
                                   expires_at, finished_at, error)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?,
            id: message.id_hex(),
            expires_at: message.expires_at,
            now,
            deliver_at,
        })
    }

    /// Sets when the next jobs are delivered from.
    pub(super) fn deliver_at(&mut self, at: Millis) {
        self.deliver_at = at;
    }

    /// One agent's job: queued (its id returned), or, for an agent that reported
    /// blocking the sender, refused at once ([`SKIPPED_BLOCKED`]).
    pub(super) fn insert(&mut self, agent: &str, blocked: bool) -> Result<Option<JobId>> {
        if blocked {
            self.insert.execute(params![
                agent,
                self.id,
                JobState::Refused.as_str(),
                self.now,
                self.deliver_at,
                self.expires_at,
                self.now,
                SKIPPED_BLOCKED
            ])?;
            Ok(None)
        } else {
            let job = self.insert.insert(params![
                agent,
                self.id,
                JobState::Queued.as_str(),
                self.now,
                self.deliver_at,
                self.expires_at,
                None::<Millis>,
                None::<String>
            ])?;
            Ok(Some(job))
        }
    }
}

fn store_receipt(
    tx: &Connection,
    agent_id: &str,
    receipt: &Receipt,
    blob: &[u8],
    now: Millis,
) -> Result<Option<JobId>> {
    use herald_shared::message::ReceiptState;
    let message_id = hex::encode(receipt.message_id);
    let job: Option<(JobId, String)> = tx
        .query_row(
            "SELECT id, state FROM jobs WHERE order_id = ?1 AND agent_id = ?2",
            params![message_id, agent_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let Some((job_id, _)) = job else {
        return Err(StoreError::NotFound(format!(
            "agent {agent_id} reported on message {message_id}, which was not sent to it"
        )));
    };
    tx.execute(
        "INSERT INTO message_receipts (message_id, agent_id, state, reason, at, report, received_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (message_id, agent_id, state) DO NOTHING",
        params![
            message_id,
            agent_id,
            receipt.state.as_str(),
            receipt.state.reason(),
            receipt.at,
            blob,
            now
        ],
    )?;
    let (to, error) = match &receipt.state {
        ReceiptState::Stored | ReceiptState::Displayed | ReceiptState::Read => {
            (JobState::Succeeded, None)
        }
        ReceiptState::Refused(reason) => (JobState::Refused, Some(reason.as_str())),
        ReceiptState::Expired => (JobState::Expired, Some("arrived after its expiry")),
    };
    // The agent refuses an expired message in its acknowledgement too, which may be
    // committed first: the signed receipt is the more precise word, and wins.
    let from: &[JobState] = match receipt.state {
        ReceiptState::Expired => &[
            JobState::Queued,
            JobState::Delivered,
            JobState::Running,
            JobState::Refused,
        ],
        _ => &[JobState::Queued, JobState::Delivered, JobState::Running],
    };
    let changed = tx.execute(
        &format!(
            "UPDATE jobs SET state = ?2, finished_at = ?3, error = COALESCE(?4, error),
                    delivered_at = COALESCE(delivered_at, ?3)
             WHERE id = ?1 AND state IN ({})",
            JobState::sql_list(from)
        ),
        params![job_id, to.as_str(), now, error],
    )?;
    Ok((changed > 0).then_some(job_id))
}

fn store_block(tx: &Connection, change: &BlockChange, blob: &[u8], now: Millis) -> Result<()> {
    // The agent's answer settles any console request for this sender, applied or not.
    tx.execute(
        "DELETE FROM block_requests WHERE agent_id = ?1 AND sender = ?2",
        params![change.agent_id, change.sender],
    )?;
    tx.execute(
        "INSERT INTO sender_blocks (agent_id, sender, blocked, by, at, report, received_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (agent_id, sender) DO UPDATE SET
            blocked = excluded.blocked, by = excluded.by, at = excluded.at,
            report = excluded.report, received_at = excluded.received_at
         WHERE excluded.at >= sender_blocks.at",
        params![
            change.agent_id,
            change.sender,
            change.blocked,
            change.by,
            change.at,
            blob,
            now
        ],
    )?;
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    use ed25519_dalek::SigningKey;
    use herald_shared::envelope::{Audience, OperatorKey, Statement};
    use herald_shared::message::{
        message_hash, BlockChange, Message, Priority, Receipt, ReceiptState, Report, SenderGrant,
        SignedReport, DEFAULT_TTL_MS,
    };

    pub(crate) const NOW: Millis = 1_700_000_000_000;

    pub(crate) fn store() -> Store {
        let dir = std::env::temp_dir().join(format!(
            "herald-messages-{}",
            hex::encode(crate::random_bytes::<6>())
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Store::open(&dir).unwrap()
    }

    /// An agent with a real key; returns its id and key.
    pub(crate) fn agent(store: &Store, seed: u8, name: &str) -> (String, SigningKey) {
        let key = SigningKey::from_bytes(&[seed; 32]);
        let public = key.verifying_key().to_bytes();
        let id = herald_shared::agent_id(&public);
        store
            .conn()
            .execute(
                "INSERT INTO agents (id, name, public_key, enrolled_at) VALUES (?1, ?2, ?3, ?4)",
                params![id, name, public.to_vec(), NOW],
            )
            .unwrap();
        (id, key)
    }

    pub(crate) fn message() -> (Message, Envelope) {
        let operator = OperatorKey::from_seed([1; 32]);
        let sender = OperatorKey::from_seed([2; 32]);
        let grant = operator
            .sign(&Statement::Sender(SenderGrant {
                sender: "card".into(),
                display_name: "Card Company".into(),
                key: sender.public(),
                advertising: false,
                issued_at: NOW,
            }))
            .unwrap();
        let message = Message {
            id: [7; 16],
            sender: "card".into(),
            audience: Audience::All,
            title: "Payment due".into(),
            body: "Friday".into(),
            priority: Priority::Normal,
            issued_at: NOW,
            expires_at: NOW + DEFAULT_TTL_MS,
            collapse: None,
            advertising: false,
            link: None,
            grant,
        };
        let envelope = sender.sign(&Statement::Message(message.clone())).unwrap();
        (message, envelope)
    }

    pub(crate) fn report(key: &SigningKey, report: Report) -> (SignedReport, Report) {
        (SignedReport::sign(key, &report), report)
    }

    pub(crate) fn block(agent: &str, blocked: bool, at: Millis) -> Report {
        Report::Block(BlockChange {
            agent_id: agent.into(),
            sender: "card".into(),
            blocked,
            by: "local".into(),
            at,
        })
    }

    #[test]
    fn blocked_recipients_are_skipped_and_receipts_are_kept_once() {
        let store = store();
        let (a1, k1) = agent(&store, 11, "a1");
        let (a2, k2) = agent(&store, 12, "a2");
        let (signed, body) = report(&k1, block(&a1, true, NOW));
        assert_eq!(
            store.store_report(&a1, &signed, &body, NOW).unwrap(),
            ReportStored::Block
        );
        // An older unblock arriving late changes nothing.
        let (signed, body) = report(&k1, block(&a1, false, NOW - 1));
        store.store_report(&a1, &signed, &body, NOW).unwrap();
        assert_eq!(store.refusals(Some("card")).unwrap().len(), 1);

        let (message, envelope) = message();
        let (queued, skipped) = store
            .create_message(&message, &envelope, &[a1.clone(), a2.clone()], NOW, NOW)
            .unwrap();
        assert_eq!(skipped, 1);
        assert_eq!(queued.len(), 1);
        assert_eq!(queued[0].0, a2);

        let stored = Report::Receipt(Receipt {
            message_id: message.id,
            message_hash: message_hash(&envelope),
            agent_id: a2.clone(),
            state: ReceiptState::Stored,
            at: NOW + 5,
        });
        let (signed, body) = report(&k2, stored);
        assert_eq!(
            store.store_report(&a2, &signed, &body, NOW).unwrap(),
            ReportStored::Receipt {
                job_id: Some(queued[0].1)
            }
        );
        // Resent (the ack was lost): kept once, the job not moved again.
        assert_eq!(
            store.store_report(&a2, &signed, &body, NOW).unwrap(),
            ReportStored::Receipt { job_id: None }
        );
        assert_eq!(store.receipts(&message.id_hex()).unwrap().len(), 1);

        let detail = store.message(&message.id_hex()).unwrap();
        assert_eq!(detail.info.counts.addressed, 2);
        assert_eq!(detail.info.counts.stored, 1);
        assert_eq!(detail.info.counts.refused, 1);
        assert_eq!(detail.info.counts.success_rate, 0.5);
        let states: Vec<&str> = detail.recipients.iter().map(|r| r.state.as_str()).collect();
        assert_eq!(states, vec!["skipped_blocked", "stored"]);
    }

    #[test]
    fn a_receipt_for_a_message_never_sent_is_refused() {
        let store = store();
        let (a1, k1) = agent(&store, 11, "a1");
        let (message, envelope) = message();
        let (signed, body) = report(
            &k1,
            Report::Receipt(Receipt {
                message_id: message.id,
                message_hash: message_hash(&envelope),
                agent_id: a1.clone(),
                state: ReceiptState::Stored,
                at: NOW,
            }),
        );
        assert!(matches!(
            store.store_report(&a1, &signed, &body, NOW),
            Err(StoreError::NotFound(_))
        ));
    }

    #[test]
    fn the_agents_answer_settles_a_console_request() {
        let store = store();
        let (a1, k1) = agent(&store, 11, "a1");
        store
            .conn()
            .execute(
                "INSERT INTO users (id, login, password_hash, role, created_at)
                 VALUES (1, 'alice', 'x', 'user', ?1)",
                params![NOW],
            )
            .unwrap();
        let first = store.request_block(&a1, "card", true, 1, NOW).unwrap();
        // Asked again before the agent answered: one request, the newer.
        let second = store.request_block(&a1, "card", false, 1, NOW).unwrap();
        let pending = store.block_requests(&a1).unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].id, second);
        assert_ne!(first, second);
        let (signed, body) = report(&k1, block(&a1, false, NOW));
        store.store_report(&a1, &signed, &body, NOW).unwrap();
        assert!(store.block_requests(&a1).unwrap().is_empty());
    }

    #[test]
    fn one_report_that_cannot_be_stored_fails_alone_in_its_batch() {
        let store = store();
        let (a1, k1) = agent(&store, 11, "a1");
        let (message, envelope) = message();
        store
            .create_message(&message, &envelope, std::slice::from_ref(&a1), NOW, NOW)
            .unwrap();
        let receipt = |id: [u8; 16]| {
            report(
                &k1,
                Report::Receipt(Receipt {
                    message_id: id,
                    message_hash: message_hash(&envelope),
                    agent_id: a1.clone(),
                    state: ReceiptState::Stored,
                    at: NOW,
                }),
            )
        };
        let (stray, stray_body) = receipt([9; 16]);
        let (good, good_body) = receipt(message.id);
        let outcomes = store
            .store_reports(&[(&a1, &stray, &stray_body), (&a1, &good, &good_body)], NOW)
            .unwrap();
        assert!(matches!(outcomes[0], Err(StoreError::NotFound(_))));
        assert!(matches!(
            outcomes[1],
            Ok(ReportStored::Receipt { job_id: Some(_) })
        ));
        assert_eq!(store.receipts(&message.id_hex()).unwrap().len(), 1);
    }
}
