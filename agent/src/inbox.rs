//! The inbox: push messages this agent kept, the senders it has seen, its block list and
//! the outbox of signed reports (receipts, block changes) waiting for the server.
//!
//! Everything lives in the agent's one database (`agent.db`, [`crate::journal`]), so a
//! message is kept in ONE transaction with everything that says so: the journal's job
//! row (a redelivered job id is answered `Duplicate`), the replay record of the message
//! id, the inbox row, the sender's count and the signed `stored` receipt. A refusal is
//! likewise the journal's refusal and its signed receipt together. A crash at any point
//! leaves either all of it or none of it, so nothing is lost and nothing doubled: the
//! server redelivers what was not acknowledged, and the agent answers what it stored.
//!
//! # Rules
//!
//! - A message with the same sender and collapse key as a kept one replaces it.
//! - At most `max_per_sender` messages are kept per sender; the oldest go first.
//! - Expired messages are pruned ([`Inbox::prune`]).
//! - Reports are numbered by the outbox (`seq`), sent until the server answers
//!   `ReportStored`, then deleted ([`Inbox::report_stored`]).
//!
//! Receipts and block changes are signed here with the agent's identity key (the key of
//! its TLS certificate), so the daemon and the CLI (`herald-agent block`) sign alike.

use std::path::Path;

use ed25519_dalek::SigningKey;
use rusqlite::{params, OptionalExtension, Transaction};
use serde::Serialize;

use herald_shared::codec;
use herald_shared::message::{BlockChange, Receipt, ReceiptState, Report, SignedReport};
use herald_shared::peers::SessionUsage;
use herald_shared::Millis;

use crate::journal::{self, JobState, Journal, JournalError};
use crate::notify::Notice;
use crate::protocol::{Arrival, Rejection};
use crate::state::{AgentConfig, Identity, StateError};

/// How long past its expiry a message id stays in the replay cache, so a late
/// redelivery of a kept message is answered `Duplicate` rather than `expired`.
const SEEN_MARGIN_MS: Millis = 24 * 3_600_000;

/// Largest stored report blob that is read back.
const REPORT_LIMIT: usize = 2 * herald_shared::message::MAX_REPORT;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS inbox (
    message_id TEXT PRIMARY KEY,
    sender TEXT NOT NULL,
    display_name TEXT NOT NULL,
    title TEXT NOT NULL,
    body TEXT NOT NULL,
    priority TEXT NOT NULL,
    advertising INTEGER NOT NULL,
    link TEXT,
    collapse TEXT,
    received_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    read_at BIGINT,
    displayed_at BIGINT,
    notified_at BIGINT,
    hash BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS inbox_by_sender ON inbox (sender, received_at);
CREATE TABLE IF NOT EXISTS messages_seen (
    message_id TEXT PRIMARY KEY,
    keep_until BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS senders_seen (
    sender TEXT PRIMARY KEY,
    display_name TEXT NOT NULL,
    count INTEGER NOT NULL,
    last_at BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS blocked (
    sender TEXT PRIMARY KEY,
    at BIGINT NOT NULL,
    by TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS reports (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    report BLOB NOT NULL
);
"#;

/// Errors of the inbox.
#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    /// The database failed.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The state directory is not an enrolled agent's.
    #[error(transparent)]
    State(#[from] StateError),
    /// The identity key is not an Ed25519 PKCS#8 key.
    #[error("the identity key cannot sign reports: {0}")]
    Key(String),
    /// No kept message has this id.
    #[error("no message {0} in the inbox; `herald-agent inbox` lists them")]
    UnknownMessage(String),
    /// Unblocking a sender that is not blocked.
    #[error("sender {0} is not blocked; `herald-agent senders` lists them")]
    NotBlocked(String),
    /// Not a sender name.
    #[error("{0:?} is not a sender name (1 to 64 of letters, digits, '.', '_' and '-')")]
    InvalidSender(String),
    /// Blocking a sender that already is.
    #[error("sender {0} is already blocked")]
    AlreadyBlocked(String),
}

impl From<rusqlite::Error> for InboxError {
    fn from(e: rusqlite::Error) -> Self {
        InboxError::Journal(JournalError::Sql(e))
    }
}

type Result<T> = std::result::Result<T, InboxError>;

/// A kept message, as listed (`herald-agent inbox --json` prints these fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    /// Message id, 32 hex digits.
    pub id: String,
    /// Sender name.
    pub sender: String,
    /// What people see as the sender.
    pub display_name: String,
    /// Title.
    pub title: String,
    /// Body text.
    pub body: String,
    /// `normal` or `high`.
    pub priority: String,
    /// Marked as advertising.
    pub advertising: bool,
    /// Page to open, if any.
    pub link: Option<String>,
    /// Collapse key, if any.
    pub collapse: Option<String>,
    /// When it arrived (unix ms).
    pub received_at: Millis,
    /// When it expires (unix ms).
    pub expires_at: Millis,
    /// When the person opened it (unix ms), if they did.
    pub read_at: Option<Millis>,
    /// When its notification was shown (unix ms), if it was.
    pub displayed_at: Option<Millis>,
}

impl Entry {
    /// The notice that shows it.
    pub fn notice(&self) -> Notice {
        Notice {
            message_id: self.id.clone(),
            sender: self.sender.clone(),
            display_name: self.display_name.clone(),
            title: self.title.clone(),
            body: self.body.clone(),
            high: self.priority == "high",
            advertising: self.advertising,
            link: self.link.clone(),
        }
    }
}

/// A sender this agent has seen (`herald-agent senders --json` prints these fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SenderEntry {
    /// Sender name.
    pub sender: String,
    /// Display name of its latest message ("" if only blocked, never seen).
    pub display_name: String,
    /// Messages kept from it, ever.
    pub count: u64,
    /// Messages from it in the inbox now.
    pub in_inbox: u64,
    /// When its latest message arrived (unix ms), if any.
    pub last_at: Option<Millis>,
    /// Whether it is blocked.
    pub blocked: bool,
    /// Who blocked it, if blocked: `local`, `notification` or `console`.
    pub blocked_by: Option<String>,
}

/// Which kept messages to list.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only this sender's.
    pub sender: Option<String>,
    /// Only those not opened yet.
    pub unread: bool,
}

/// The inbox on the agent database.
#[derive(Clone)]
pub struct Inbox {
    journal: Journal,
    key: SigningKey,
    agent_id: String,
}

// === impl Inbox ===

impl Inbox {
    /// The inbox on an open journal, signing with the agent's identity.
    pub fn new(journal: Journal, identity: &Identity) -> Result<Inbox> {
        let key = signing_key(identity)?;
        journal.transaction(|tx| tx.execute_batch(SCHEMA).map_err(InboxError::from))?;
        Ok(Inbox {
            journal,
            key,
            agent_id: identity.agent_id(),
        })
    }

    /// Opens the inbox of the enrolled agent in `state_dir` (for the CLI); returns it
    /// with the agent's configuration.
    pub fn open(state_dir: &Path) -> Result<(Inbox, AgentConfig)> {
        let config = AgentConfig::load(state_dir)?;
        let identity = Identity::load_or_create(state_dir)?;
        let journal = Journal::open(state_dir)?;
        Ok((Inbox::new(journal, &identity)?, config))
    }

    /// Keeps an arrived message (see the module docs for what that is, atomically);
    /// returns the seq of its `stored` receipt.
    pub fn keep(&self, arrival: &Arrival, max_per_sender: u32) -> Result<u64> {
        let m = &arrival.message;
        let id = m.id_hex();
        let report = self.sign(Report::Receipt(Receipt {
            message_id: m.id,
            message_hash: arrival.hash,
            agent_id: self.agent_id.clone(),
            state: ReceiptState::Stored,
            at: arrival.at,
        }));
        self.journal.transaction(|tx| {
            journal::record_final(tx, arrival.job_id, &id, JobState::Kept, None, arrival.at)?;
            tx.execute(
                "INSERT INTO messages_seen (message_id, keep_until) VALUES (?1, ?2)
                 ON CONFLICT (message_id) DO UPDATE SET keep_until = excluded.keep_until",
                params![id, m.expires_at.saturating_add(SEEN_MARGIN_MS)],
            )?;
            if let Some(collapse) = &m.collapse {
                tx.execute(
                    "DELETE FROM inbox WHERE sender = ?1 AND collapse = ?2",
                    params![m.sender, collapse],
                )?;
            }
            tx.execute(
                "INSERT INTO inbox (message_id, sender, display_name, title, body, priority,
                     advertising, link, collapse, received_at, expires_at, hash)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
                 ON CONFLICT (message_id) DO NOTHING",
                params![
                    id,
                    m.sender,
                    arrival.display_name,
                    m.title,
                    m.body,
                    m.priority.as_str(),
                    m.advertising,
                    m.link,
                    m.collapse,
                    arrival.at,
                    m.expires_at,
                    arrival.hash.as_slice(),
                ],
            )?;
            tx.execute(
                "INSERT INTO senders_seen (sender, display_name, count, last_at)
                 VALUES (?1, ?2, 1, ?3)
                 ON CONFLICT (sender) DO UPDATE SET display_name = excluded.display_name,
                     count = count + 1, last_at = excluded.last_at",
                params![m.sender, arrival.display_name, arrival.at],
            )?;
            tx.execute(
                "DELETE FROM inbox WHERE sender = ?1 AND message_id NOT IN (
                     SELECT message_id FROM inbox WHERE sender = ?1
                     ORDER BY received_at DESC, rowid DESC LIMIT ?2)",
                // Zero would drop the message just kept: at least that one stays.
                params![m.sender, max_per_sender.max(1)],
            )?;
            push_report(tx, &report)
        })
    }

    /// Records a refused (or expired) message: the journal's refusal and the signed
    /// receipt, atomically; returns the receipt's seq.
    pub fn refuse(&self, rejection: &Rejection) -> Result<u64> {
        let report = self.sign(Report::Receipt(Receipt {
            message_id: rejection.message_id,
            message_hash: rejection.hash,
            agent_id: self.agent_id.clone(),
            state: rejection.state.clone(),
            at: rejection.at,
        }));
        self.journal.transaction(|tx| {
            journal::record_final(
                tx,
                rejection.job_id,
                &hex::encode(rejection.message_id),
                JobState::Refused,
                Some(&rejection.reason),
                rejection.at,
            )?;
            push_report(tx, &report)
        })
    }

    /// Whether a message id was kept before (the replay cache).
    pub fn seen(&self, message_id: &[u8; 16]) -> Result<bool> {
        self.journal.transaction(|tx| {
            Ok(tx
                .query_row(
                    "SELECT 1 FROM messages_seen WHERE message_id = ?1",
                    params![hex::encode(message_id)],
                    |_| Ok(()),
                )
                .optional()?
                .is_some())
        })
    }

    /// Whether a sender is blocked.
    pub fn is_blocked(&self, sender: &str) -> Result<bool> {
        self.journal.transaction(|tx| blocked_in(tx, sender))
    }

    /// Kept messages, newest first.
    pub fn list(&self, filter: &Filter) -> Result<Vec<Entry>> {
        self.journal.transaction(|tx| {
            let mut stmt = tx.prepare(&format!(
                "SELECT {COLUMNS} FROM inbox
                 WHERE (?1 IS NULL OR sender = ?1) AND (?2 = 0 OR read_at IS NULL)
                 ORDER BY received_at DESC, rowid DESC"
            ))?;
            let rows = stmt.query_map(params![filter.sender, filter.unread], entry)?;
            Ok(rows.collect::<std::result::Result<_, _>>()?)
        })
    }

    /// One kept message.
    pub fn entry(&self, id: &str) -> Result<Entry> {
        self.journal
            .transaction(|tx| entry_in(tx, id))?
            .ok_or_else(|| InboxError::UnknownMessage(id.to_string()))
    }

    /// The person opened a message: marks it read (the first time) and, if `receipt`,
    /// puts a signed `read` receipt in the outbox. Returns that receipt's seq.
    pub fn mark_read(&self, id: &str, at: Millis, receipt: bool) -> Result<Option<u64>> {
        self.mark(id, at, "read_at", receipt.then_some(ReceiptState::Read))
    }

    /// Its notification was shown: marks it displayed (the first time) with a signed
    /// `displayed` receipt. Returns that receipt's seq.
    pub fn mark_displayed(&self, id: &str, at: Millis) -> Result<Option<u64>> {
        self.mark(id, at, "displayed_at", Some(ReceiptState::Displayed))
    }

    /// Handed to a user-session helper to show (not shown again by
    /// [`Inbox::undisplayed`]).
    pub fn mark_notified(&self, id: &str, at: Millis) -> Result<()> {
        self.journal.transaction(|tx| {
            tx.execute(
                "UPDATE inbox SET notified_at = ?2 WHERE message_id = ?1",
                params![id, at],
            )?;
            Ok(())
        })
    }

    fn mark(
        &self,
        id: &str,
        at: Millis,
        column: &'static str,
        state: Option<ReceiptState>,
    ) -> Result<Option<u64>> {
        self.journal.transaction(|tx| {
            let row: Option<(Vec<u8>, Option<Millis>)> = tx
                .query_row(
                    &format!("SELECT hash, {column} FROM inbox WHERE message_id = ?1"),
                    params![id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let Some((hash, before)) = row else {
                return Err(InboxError::UnknownMessage(id.to_string()));
            };
            if before.is_some() {
                return Ok(None);
            }
            tx.execute(
                &format!("UPDATE inbox SET {column} = ?2 WHERE message_id = ?1"),
                params![id, at],
            )?;
            let Some(state) = state else { return Ok(None) };
            let receipt = Receipt {
                message_id: decode_id(id)?,
                message_hash: hash
                    .try_into()
                    .map_err(|_| corrupt("a message hash is not 32 bytes"))?,
                agent_id: self.agent_id.clone(),
                state,
                at,
            };
            push_report(tx, &self.sign(Report::Receipt(receipt))).map(Some)
        })
    }

    /// Messages not yet handed to a helper nor shown, and not expired at `now`, oldest
    /// first, from senders not blocked.
    pub fn undisplayed(&self, now: Millis) -> Result<Vec<Entry>> {
        self.journal.transaction(|tx| {
            let mut stmt = tx.prepare(&format!(
                "SELECT {COLUMNS} FROM inbox
                 WHERE displayed_at IS NULL AND notified_at IS NULL AND read_at IS NULL
                   AND expires_at >= ?1 AND sender NOT IN (SELECT sender FROM blocked)
                 ORDER BY received_at, rowid"
            ))?;
            let rows = stmt.query_map(params![now], entry)?;
            Ok(rows.collect::<std::result::Result<_, _>>()?)
        })
    }

    /// Removes one kept message.
    pub fn remove(&self, id: &str) -> Result<()> {
        let removed = self.journal.transaction(|tx| {
            Ok::<_, InboxError>(tx.execute("DELETE FROM inbox WHERE message_id = ?1", params![id])?)
        })?;
        if removed == 0 {
            return Err(InboxError::UnknownMessage(id.to_string()));
        }
        Ok(())
    }

    /// Removes every kept message of a sender; returns how many.
    pub fn clear(&self, sender: &str) -> Result<u64> {
        self.journal.transaction(|tx| {
            let n = tx.execute("DELETE FROM inbox WHERE sender = ?1", params![sender])?;
            Ok(n as u64)
        })
    }

    /// Every sender seen or blocked, by name.
    pub fn senders(&self) -> Result<Vec<SenderEntry>> {
        self.journal.transaction(|tx| {
            let mut stmt = tx.prepare(
                "SELECT name, COALESCE(s.display_name, ''), COALESCE(s.count, 0), s.last_at,
                     (SELECT COUNT(*) FROM inbox i WHERE i.sender = name),
                     (SELECT b.by FROM blocked b WHERE b.sender = name)
                 FROM (SELECT sender AS name FROM senders_seen
                       UNION SELECT sender FROM blocked) names
                 LEFT JOIN senders_seen s ON s.sender = name
                 ORDER BY name",
            )?;
            let rows = stmt.query_map([], |r| {
                let blocked_by: Option<String> = r.get(5)?;
                Ok(SenderEntry {
                    sender: r.get(0)?,
                    display_name: r.get(1)?,
                    count: r.get(2)?,
                    last_at: r.get(3)?,
                    in_inbox: r.get(4)?,
                    blocked: blocked_by.is_some(),
                    blocked_by,
                })
            })?;
            Ok(rows.collect::<std::result::Result<_, _>>()?)
        })
    }

    /// Blocks a sender and puts the signed block change in the outbox, atomically;
    /// returns its seq. `by`: `local`, `notification` or `console`.
    pub fn block(&self, sender: &str, by: &str, at: Millis) -> Result<u64> {
        if !herald_shared::valid_name(sender) {
            return Err(InboxError::InvalidSender(sender.to_string()));
        }
        let report = self.block_change(sender, true, by, at);
        self.journal.transaction(|tx| {
            if blocked_in(tx, sender)? {
                return Err(InboxError::AlreadyBlocked(sender.to_string()));
            }
            tx.execute(
                "INSERT INTO blocked (sender, at, by) VALUES (?1, ?2, ?3)",
                params![sender, at, by],
            )?;
            push_report(tx, &report)
        })
    }

    /// Unblocks a sender and puts the signed block change in the outbox, atomically;
    /// returns its seq.
    pub fn unblock(&self, sender: &str, by: &str, at: Millis) -> Result<u64> {
        let report = self.block_change(sender, false, by, at);
        self.journal.transaction(|tx| {
            if tx.execute("DELETE FROM blocked WHERE sender = ?1", params![sender])? == 0 {
                return Err(InboxError::NotBlocked(sender.to_string()));
            }
            push_report(tx, &report)
        })
    }

    /// A console user's request, relayed by the server, to block or unblock `sender`.
    /// The agent decides: a block is applied (it only narrows what is shown, and a
    /// server can withhold messages anyway), an unblock only undoes a block that was
    /// itself made from the console; a block made at the machine (`local`,
    /// `notification`) stays until it is undone there. Either way the answer is a
    /// signed block change stating the sender's state as it now is, in the outbox;
    /// returns its seq and whether the request was applied.
    pub fn console_request(&self, sender: &str, blocked: bool, at: Millis) -> Result<(u64, bool)> {
        if !herald_shared::valid_name(sender) {
            return Err(InboxError::InvalidSender(sender.to_string()));
        }
        self.journal.transaction(|tx| {
            let current: Option<String> = tx
                .query_row(
                    "SELECT by FROM blocked WHERE sender = ?1",
                    params![sender],
                    |r| r.get(0),
                )
                .optional()?;
            let (now_blocked, by, applied) = match (blocked, current) {
                (true, None) => {
                    tx.execute(
                        "INSERT INTO blocked (sender, at, by) VALUES (?1, ?2, 'console')",
                        params![sender, at],
                    )?;
                    (true, "console".to_string(), true)
                }
                // Already blocked: nothing to do; the answer says by whom.
                (true, Some(by)) => (true, by, true),
                (false, Some(by)) if by == "console" => {
                    tx.execute("DELETE FROM blocked WHERE sender = ?1", params![sender])?;
                    (false, "console".to_string(), true)
                }
                // Blocked at the machine: only the machine undoes it.
                (false, Some(by)) => (true, by, false),
                (false, None) => (false, "console".to_string(), true),
            };
            let report = self.block_change(sender, now_blocked, &by, at);
            Ok((push_report(tx, &report)?, applied))
        })
    }

    /// Signs one end's counters of a tunnel session and puts them in the outbox; returns
    /// their seq. The agent id signed is this agent's, whatever `usage` says.
    pub fn queue_usage(&self, mut usage: SessionUsage) -> Result<u64> {
        usage.agent_id = self.agent_id.clone();
        let report = self.sign(Report::Usage(usage));
        self.journal.transaction(|tx| push_report(tx, &report))
    }

    /// The seqs of the reports waiting for the server, oldest first.
    pub fn report_seqs(&self) -> Result<Vec<u64>> {
        self.journal.transaction(|tx| {
            let mut stmt = tx.prepare("SELECT seq FROM reports ORDER BY seq")?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            Ok(rows.collect::<std::result::Result<_, _>>()?)
        })
    }

    /// One waiting report, unless the server stored it meanwhile.
    pub fn report(&self, seq: u64) -> Result<Option<SignedReport>> {
        let blob: Option<Vec<u8>> = self.journal.transaction(|tx| {
            Ok::<_, InboxError>(
                tx.query_row(
                    "SELECT report FROM reports WHERE seq = ?1",
                    params![seq],
                    |r| r.get(0),
                )
                .optional()?,
            )
        })?;
        blob.map(|blob| codec::from_bytes(&blob, REPORT_LIMIT).map_err(|e| corrupt(&e.to_string())))
            .transpose()
    }

    /// The server stored a report: drop it (idempotent).
    pub fn report_stored(&self, seq: u64) -> Result<()> {
        self.journal.transaction(|tx| {
            tx.execute("DELETE FROM reports WHERE seq = ?1", params![seq])?;
            Ok(())
        })
    }

    /// Drops expired messages and replay records that can no longer matter.
    pub fn prune(&self, now: Millis) -> Result<()> {
        self.journal.transaction(|tx| {
            tx.execute("DELETE FROM inbox WHERE expires_at < ?1", params![now])?;
            tx.execute(
                "DELETE FROM messages_seen WHERE keep_until < ?1",
                params![now],
            )?;
            Ok(())
        })
    }

    fn block_change(&self, sender: &str, blocked: bool, by: &str, at: Millis) -> SignedReport {
        self.sign(Report::Block(BlockChange {
            agent_id: self.agent_id.clone(),
            sender: sender.to_string(),
            blocked,
            by: by.to_string(),
            at,
        }))
    }

    fn sign(&self, report: Report) -> SignedReport {
        SignedReport::sign(&self.key, &report)
    }
}

/// The agent's identity key as an Ed25519 signing key.
pub fn signing_key(identity: &Identity) -> Result<SigningKey> {
    use ed25519_dalek::pkcs8::DecodePrivateKey;
    SigningKey::from_pkcs8_der(identity.key.secret_pkcs8_der())
        .map_err(|e| InboxError::Key(e.to_string()))
}

const COLUMNS: &str = "message_id, sender, display_name, title, body, priority, advertising, \
     link, collapse, received_at, expires_at, read_at, displayed_at";

fn entry(r: &rusqlite::Row<'_>) -> rusqlite::Result<Entry> {
    Ok(Entry {
        id: r.get(0)?,
        sender: r.get(1)?,
        display_name: r.get(2)?,
        title: r.get(3)?,
        body: r.get(4)?,
        priority: r.get(5)?,
        advertising: r.get(6)?,
        link: r.get(7)?,
        collapse: r.get(8)?,
        received_at: r.get(9)?,
        expires_at: r.get(10)?,
        read_at: r.get(11)?,
        displayed_at: r.get(12)?,
    })
}

fn entry_in(tx: &Transaction<'_>, id: &str) -> Result<Option<Entry>> {
    Ok(tx
        .query_row(
            &format!("SELECT {COLUMNS} FROM inbox WHERE message_id = ?1"),
            params![id],
            entry,
        )
        .optional()?)
}

fn blocked_in(tx: &Transaction<'_>, sender: &str) -> Result<bool> {
    Ok(tx
        .query_row(
            "SELECT 1 FROM blocked WHERE sender = ?1",
            params![sender],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

fn push_report(tx: &Transaction<'_>, report: &SignedReport) -> Result<u64> {
    let blob = codec::to_bytes(report).map_err(|e| corrupt(&e.to_string()))?;
    tx.execute("INSERT INTO reports (report) VALUES (?1)", params![blob])?;
    u64::try_from(tx.last_insert_rowid()).map_err(|_| corrupt("a negative report seq"))
}

fn decode_id(id: &str) -> Result<[u8; 16]> {
    hex::decode(id)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| corrupt("a stored message id is not 32 hex digits"))
}

fn corrupt(what: &str) -> InboxError {
    InboxError::Journal(JournalError::Corrupt(what.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_shared::envelope::{Audience, Envelope, PublicKey};
    use herald_shared::message::{Message, Priority};

    const T0: Millis = 1_700_000_000_000;

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("herald-inbox-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn open(dir: &Path) -> (Inbox, Identity) {
        let identity = Identity::load_or_create(dir).unwrap();
        let inbox = Inbox::new(Journal::open(dir).unwrap(), &identity).unwrap();
        (inbox, identity)
    }

    fn arrival(job_id: i64, id: u8, sender: &str, collapse: Option<&str>, at: Millis) -> Arrival {
        Arrival {
            job_id,
            message: Message {
                id: [id; 16],
                sender: sender.into(),
                audience: Audience::All,
                title: format!("title {id}"),
                body: "body".into(),
                priority: Priority::Normal,
                issued_at: at,
                expires_at: at + 1_000_000,
                collapse: collapse.map(str::to_string),
                advertising: false,
                link: None,
                grant: Envelope {
                    signer: PublicKey([0; 32]),
                    payload: Vec::new(),
                    signature: Vec::new(),
                },
            },
            display_name: format!("{sender} Inc."),
            hash: [id; 32],
            at,
        }
    }

    fn ids(inbox: &Inbox) -> Vec<String> {
        inbox
            .list(&Filter::default())
            .unwrap()
            .into_iter()
            .map(|e| e.id)
            .collect()
    }

    fn verified(inbox: &Inbox, identity: &Identity, seq: u64) -> Report {
        inbox
            .report(seq)
            .unwrap()
            .unwrap()
            .verify(&identity.public_key)
            .unwrap()
    }

    #[test]
    fn the_signing_key_is_the_identity_key() {
        let dir = temp_dir("key");
        let identity = Identity::load_or_create(&dir).unwrap();
        let key = signing_key(&identity).unwrap();
        assert_eq!(
            key.verifying_key().to_bytes().as_slice(),
            identity.public_key
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn keeping_writes_journal_replay_inbox_sender_and_a_signed_stored_receipt() {
        let dir = temp_dir("keep");
        let (inbox, identity) = open(&dir);
        let seq = inbox.keep(&arrival(7, 1, "card", None, T0), 10).unwrap();
        let journal = Journal::open(&dir).unwrap();
        assert_eq!(
            journal.known(7).unwrap(),
            Some(crate::journal::Known::Accepted)
        );
        assert_eq!(journal.state(7).unwrap(), Some(JobState::Kept));
        assert!(inbox.seen(&[1; 16]).unwrap());
        assert!(!inbox.seen(&[2; 16]).unwrap());
        assert_eq!(ids(&inbox), vec![hex::encode([1u8; 16])]);
        let senders = inbox.senders().unwrap();
        assert_eq!(senders.len(), 1);
        assert_eq!((senders[0].count, senders[0].in_inbox), (1, 1));
        let Report::Receipt(receipt) = verified(&inbox, &identity, seq) else {
            panic!("not a receipt")
        };
        assert_eq!(receipt.state, ReceiptState::Stored);
        assert_eq!(receipt.message_hash, [1; 32]);
        // The same job id again is not kept twice (the journal refuses the transition,
        // and the whole transaction with it).
        assert!(inbox.keep(&arrival(7, 1, "card", None, T0), 10).is_err());
        assert_eq!(inbox.report_seqs().unwrap(), vec![seq]);
        assert_eq!(inbox.senders().unwrap()[0].count, 1);
        // Nothing of the journal job is resumed after a restart.
        let (markers, resume) = journal.recover(T0, None).unwrap();
        assert!(markers.is_empty() && resume.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_keep_that_fails_at_its_last_step_leaves_nothing_behind() {
        let dir = temp_dir("atomic");
        let (inbox, _) = open(&dir);
        // The receipt is written last; without its table the whole keep must vanish,
        // as it does when the process is killed before the commit.
        inbox
            .journal
            .transaction(|tx| {
                tx.execute_batch("DROP TABLE reports")
                    .map_err(InboxError::from)
            })
            .unwrap();
        assert!(inbox.keep(&arrival(1, 1, "card", None, T0), 10).is_err());
        assert!(!inbox.seen(&[1; 16]).unwrap());
        assert!(ids(&inbox).is_empty());
        assert!(inbox.senders().unwrap().is_empty());
        assert_eq!(Journal::open(&dir).unwrap().known(1).unwrap(), None);
        // Reopened (the schema is created again), the redelivery is kept once.
        let (inbox, _) = open(&dir);
        inbox.keep(&arrival(1, 1, "card", None, T0), 10).unwrap();
        assert_eq!(ids(&inbox).len(), 1);
        assert_eq!(inbox.report_seqs().unwrap().len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn collapse_replaces_and_the_per_sender_limit_drops_the_oldest() {
        let dir = temp_dir("collapse");
        let (inbox, _) = open(&dir);
        inbox
            .keep(&arrival(1, 1, "card", Some("balance"), T0), 2)
            .unwrap();
        inbox
            .keep(&arrival(2, 2, "card", Some("balance"), T0 + 1), 2)
            .unwrap();
        // Another sender's same collapse key is not touched.
        inbox
            .keep(&arrival(3, 3, "bank", Some("balance"), T0 + 2), 2)
            .unwrap();
        assert_eq!(
            ids(&inbox),
            vec![hex::encode([3u8; 16]), hex::encode([2u8; 16])]
        );
        inbox.keep(&arrival(4, 4, "card", None, T0 + 3), 2).unwrap();
        inbox.keep(&arrival(5, 5, "card", None, T0 + 4), 2).unwrap();
        let card = inbox
            .list(&Filter {
                sender: Some("card".into()),
                unread: false,
            })
            .unwrap();
        assert_eq!(
            card.iter().map(|e| e.id.clone()).collect::<Vec<_>>(),
            vec![hex::encode([5u8; 16]), hex::encode([4u8; 16])]
        );
        // Expired ones are pruned.
        inbox.prune(T0 + 1_000_004).unwrap();
        assert_eq!(ids(&inbox), vec![hex::encode([5u8; 16])]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn read_displayed_and_refused_receipts_are_signed_once() {
        let dir = temp_dir("receipts");
        let (inbox, identity) = open(&dir);
        inbox.keep(&arrival(1, 1, "card", None, T0), 10).unwrap();
        let id = hex::encode([1u8; 16]);
        assert_eq!(inbox.undisplayed(T0).unwrap().len(), 1);
        let seq = inbox.mark_displayed(&id, T0 + 1).unwrap().unwrap();
        assert!(matches!(
            verified(&inbox, &identity, seq),
            Report::Receipt(Receipt {
                state: ReceiptState::Displayed,
                ..
            })
        ));
        assert_eq!(inbox.mark_displayed(&id, T0 + 2).unwrap(), None);
        assert!(inbox.undisplayed(T0).unwrap().is_empty());
        // Read receipts off: marked read, nothing reported.
        assert_eq!(inbox.mark_read(&id, T0 + 3, false).unwrap(), None);
        assert_eq!(inbox.entry(&id).unwrap().read_at, Some(T0 + 3));
        assert!(matches!(
            inbox.mark_read("00", T0, true),
            Err(InboxError::UnknownMessage(_))
        ));
        let seq = inbox
            .refuse(&Rejection {
                job_id: 9,
                message_id: [9; 16],
                hash: [9; 32],
                state: ReceiptState::Expired,
                reason: "message expired".into(),
                at: T0,
            })
            .unwrap();
        assert!(matches!(
            verified(&inbox, &identity, seq),
            Report::Receipt(Receipt {
                state: ReceiptState::Expired,
                ..
            })
        ));
        assert_eq!(
            Journal::open(&dir).unwrap().known(9).unwrap(),
            Some(crate::journal::Known::Refused("message expired".into()))
        );
        inbox.report_stored(seq).unwrap();
        inbox.report_stored(seq).unwrap();
        assert_eq!(inbox.report(seq).unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn block_and_unblock_write_the_list_and_a_signed_change() {
        let dir = temp_dir("block");
        let (inbox, identity) = open(&dir);
        assert!(matches!(
            inbox.unblock("card", "local", T0),
            Err(InboxError::NotBlocked(_))
        ));
        assert!(matches!(
            inbox.block("no such/sender", "local", T0),
            Err(InboxError::InvalidSender(_))
        ));
        let seq = inbox.block("card", "local", T0).unwrap();
        assert!(inbox.is_blocked("card").unwrap());
        assert!(matches!(
            inbox.block("card", "local", T0),
            Err(InboxError::AlreadyBlocked(_))
        ));
        let Report::Block(change) = verified(&inbox, &identity, seq) else {
            panic!("not a block change")
        };
        assert!(change.blocked);
        assert_eq!(change.by, "local");
        let senders = inbox.senders().unwrap();
        assert_eq!(senders.len(), 1);
        assert!(senders[0].blocked);
        assert_eq!(senders[0].count, 0);
        let seq = inbox.unblock("card", "local", T0 + 1).unwrap();
        assert!(matches!(
            verified(&inbox, &identity, seq),
            Report::Block(BlockChange { blocked: false, .. })
        ));
        assert!(!inbox.is_blocked("card").unwrap());
        assert_eq!(inbox.report_seqs().unwrap().len(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_console_may_block_but_undoes_only_its_own_blocks() {
        let dir = temp_dir("console");
        let (inbox, identity) = open(&dir);
        let answer = |seq| match verified(&inbox, &identity, seq) {
            Report::Block(change) => (change.blocked, change.by),
            other => panic!("not a block change: {other:?}"),
        };
        // Blocked from the console, and undone from it.
        let (seq, applied) = inbox.console_request("card", true, T0).unwrap();
        assert!(applied && inbox.is_blocked("card").unwrap());
        assert_eq!(answer(seq), (true, "console".to_string()));
        let (seq, applied) = inbox.console_request("card", false, T0 + 1).unwrap();
        assert!(applied && !inbox.is_blocked("card").unwrap());
        assert_eq!(answer(seq), (false, "console".to_string()));
        // Blocked at the machine: the console cannot undo it; the answer says so.
        inbox.block("bank", "local", T0).unwrap();
        let (seq, applied) = inbox.console_request("bank", false, T0 + 2).unwrap();
        assert!(!applied);
        assert!(inbox.is_blocked("bank").unwrap());
        assert_eq!(answer(seq), (true, "local".to_string()));
        // A block request for a sender already blocked keeps who blocked it.
        let (seq, _) = inbox.console_request("bank", true, T0 + 3).unwrap();
        assert_eq!(answer(seq), (true, "local".to_string()));
        assert!(matches!(
            inbox.console_request("no such/sender", true, T0),
            Err(InboxError::InvalidSender(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
