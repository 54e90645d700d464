//! Campaigns: a message to a recipient list (ingested in one transaction, so a list is
//! taken whole or not at all), each row's fallback from decision to the carrier's
//! report, and the figures a sender reads.

use std::collections::{HashMap, HashSet};
use std::io::Read;

use herald_shared::message::Message;

use super::messages::{blocked_agents, insert_message, MessageJobs};
use super::*;
use crate::model::fallback_state as fb;
use crate::model::{
    fallback_email, fallback_sms, normalize_phone, BadRow, CampaignCreated, CampaignRecipient,
    CampaignStatus, Fallback, FallbackSend, ListError, ListReader, SmsReport, SmsReportOutcome,
    MAX_BAD_ROWS_LISTED,
};

/// How a campaign goes out, checked by the caller.
#[derive(Debug, Clone)]
pub struct CampaignPlan {
    /// When the first row goes out.
    pub start_at: Millis,
    /// Fallback medium.
    pub fallback: Fallback,
    /// Wait for a `stored` receipt this long.
    pub fallback_after_ms: i64,
    /// Cap on fallbacks.
    pub max_fallback: Option<u64>,
    /// Rows per second.
    pub rate: Option<u32>,
    /// Invitation link for fallbacks to people without the program.
    pub invite_url: Option<String>,
    /// Default country for national numbers.
    pub country: Option<phonenumber::country::Id>,
    /// Refuse the list on any bad row.
    pub strict: bool,
}

/// A new campaign and the deliveries due at once (to hand to connected agents).
#[derive(Debug)]
pub struct CampaignStarted {
    /// What the sender is told.
    pub created: CampaignCreated,
    /// `(agent, job)` pairs due now.
    pub due_now: Vec<(String, JobId)>,
}

/// One fallback attempt's outcome, to record.
#[derive(Debug, Clone)]
pub struct FallbackOutcome {
    /// Campaign id.
    pub campaign: String,
    /// Row.
    pub line: u64,
    /// What to do next.
    pub next: crate::model::Next,
    /// What the gateway or relay said.
    pub detail: String,
    /// The gateway's message id, for its delivery report.
    pub gateway_id: Option<String>,
}

/// Where rows resolve to: console users and agents, loaded once per list.
struct Directory {
    logins: HashMap<String, i64>,
    phones: HashMap<String, i64>,
    emails: HashMap<String, i64>,
    contacts: HashMap<i64, (String, Option<String>, Option<String>)>,
    devices: HashMap<i64, Vec<String>>,
    agents: HashMap<String, (String, Option<i64>)>,
}

impl Directory {
    fn load(tx: &Connection, country: Option<phonenumber::country::Id>) -> Result<Directory> {
        let mut dir = Directory {
            logins: HashMap::new(),
            phones: HashMap::new(),
            emails: HashMap::new(),
            contacts: HashMap::new(),
            devices: HashMap::new(),
            agents: HashMap::new(),
        };
        let mut stmt = tx.prepare("SELECT id, login, email, phone FROM users")?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let (id, login, email, phone): (i64, String, String, String) =
                (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?);
            let phone = (!phone.is_empty())
                .then(|| normalize_phone(&phone, country).ok())
                .flatten();
            let email = (!email.is_empty())
                .then(|| crate::model::normalize_email(&email).ok())
                .flatten();
            if let Some(p) = &phone {
                dir.phones.insert(p.clone(), id);
            }
            if let Some(e) = &email {
                dir.emails.insert(e.to_ascii_lowercase(), id);
            }
            dir.logins.insert(login.clone(), id);
            dir.contacts.insert(id, (login, phone, email));
        }
        let mut stmt = tx.prepare(
            "SELECT id, name, owner_user_id FROM agents WHERE revoked_at IS NULL ORDER BY id",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            let (id, name, owner): (String, String, Option<i64>) =
                (r.get(0)?, r.get(1)?, r.get(2)?);
            if let Some(owner) = owner {
                dir.devices.entry(owner).or_default().push(id.clone());
            }
            dir.agents.insert(name, (id.clone(), owner));
            dir.agents.insert(id.clone(), (id, owner));
        }
        Ok(dir)
    }
}

/// A row resolved: who it is, where the message goes, where a fallback goes.
struct Resolved {
    recipient: String,
    user_id: Option<i64>,
    login: Option<String>,
    devices: Vec<String>,
    phone: Option<String>,
    email: Option<String>,
}

fn resolve(dir: &Directory, row: &crate::model::ListRow) -> Result<Resolved, String> {
    let mut user = None;
    let mut devices = Vec::new();
    let mut agent_only = None;
    if let Some(name) = &row.agent {
        match dir.agents.get(name) {
            Some((id, owner)) => {
                devices.push(id.clone());
                user = *owner;
                if owner.is_none() {
                    agent_only = Some(id.clone());
                }
            }
            None if row.phone.is_none() && row.email.is_none() && row.user.is_none() => {
                return Err(format!(
                    "no agent {name:?}, and no phone or email to fall back to"
                ))
            }
            None => {}
        }
    }
    if user.is_none() && agent_only.is_none() {
        user = row
            .user
            .as_ref()
            .and_then(|login| dir.logins.get(login))
            .or_else(|| row.phone.as_ref().and_then(|p| dir.phones.get(p)))
            .or_else(|| {
                row.email
                    .as_ref()
                    .and_then(|e| dir.emails.get(&e.to_ascii_lowercase()))
            })
            .copied();
        if user.is_none() && row.phone.is_none() && row.email.is_none() {
            if let Some(login) = &row.user {
                return Err(format!(
                    "no user {login:?}, and no phone or email to fall back to"
                ));
            }
        }
        if let Some(id) = user {
            devices = dir.devices.get(&id).cloned().unwrap_or_default();
        }
    }
    let contact = user.and_then(|id| dir.contacts.get(&id));
    let recipient = match (user, &agent_only, &row.phone, &row.email) {
        (Some(id), _, _, _) => format!("u:{id}"),
        (None, Some(agent), _, _) => format!("a:{agent}"),
        (None, None, Some(phone), _) => format!("p:{phone}"),
        (None, None, None, Some(email)) => format!("e:{}", email.to_ascii_lowercase()),
        (None, None, None, None) => return Err("no phone, email, user or agent".into()),
    };
    Ok(Resolved {
        recipient,
        user_id: user,
        login: contact.map(|c| c.0.clone()).or_else(|| row.user.clone()),
        devices,
        phone: row
            .phone
            .clone()
            .or_else(|| contact.and_then(|c| c.1.clone())),
        email: row
            .email
            .clone()
            .or_else(|| contact.and_then(|c| c.2.clone())),
    })
}

/// A row whose fallback is due: campaign, line, user, phone, e-mail.
type DueRow = (String, i64, Option<i64>, Option<String>, Option<String>);
/// What deciding a fallback needs of its campaign: sender, medium, cap, cancel time,
/// expiry.
type CampaignFacts = (String, String, Option<i64>, Option<Millis>, Millis);

/// Start of the UTC day `at` falls in, as a day number.
fn day_of(at: Millis) -> i64 {
    at.div_euclid(86_400_000)
}

/// One row's facts, for figures and the recipient list.
struct RowFacts {
    line: u64,
    phone: Option<String>,
    email: Option<String>,
    login: Option<String>,
    agent: Option<String>,
    devices: u64,
    send_at: Millis,
    fallback_at: Option<Millis>,
    fb_state: Option<String>,
    fb_kind: Option<String>,
    fb_detail: Option<String>,
    stored_at: Option<Millis>,
    displayed: bool,
    read: bool,
    pushed: bool,
    refused: bool,
    open_jobs: bool,
}

impl RowFacts {
    /// The one-word summary `message recipients` shows.
    fn state(&self, canceled: bool) -> &'static str {
        match self.fb_state.as_deref() {
            _ if self.read => "read",
            _ if self.displayed => "displayed",
            _ if self.stored_at.is_some() => "stored",
            Some(fb::DELIVERED) => "fallback_delivered",
            Some(fb::SENT) => "fallback_sent",
            Some(fb::FAILED | fb::INTERRUPTED) => "fallback_failed",
            Some(fb::PENDING | fb::SENDING) => "fallback_pending",
            _ if self.refused => "blocked",
            Some(fb::SKIPPED_BLOCKED) => "blocked",
            Some(fb::CANCELED) => "canceled",
            None if canceled => "canceled",
            None if self.fallback_at.is_some() => "waiting",
            _ if self.open_jobs && !canceled => "waiting",
            _ => "not_reached",
        }
    }

    /// Reached by some channel: stored on a device, reported delivered by the carrier,
    /// or an e-mail the relay took.
    fn reached(&self) -> bool {
        self.stored_at.is_some()
            || self.fb_state.as_deref() == Some(fb::DELIVERED)
            || (self.fb_state.as_deref() == Some(fb::SENT)
                && self.fb_kind.as_deref() == Some("email"))
    }
}

impl Store {
    /// Creates a campaign from an uploaded list: the message, one row per readable and
    /// new recipient, one delivery job per device, all in one transaction (a crash or
    /// a refusal leaves nothing). With `plan.strict`, any bad row refuses the list.
    pub fn create_campaign(
        &self,
        message: &Message,
        envelope: &Envelope,
        list: impl Read,
        plan: &CampaignPlan,
        now: Millis,
    ) -> Result<CampaignStarted> {
        self.blocking(|| {
            let mut reader = ListReader::new(list, plan.country).map_err(list_error)?;
            let mut conn = self.conn();
            let tx = conn.transaction()?;
            let id = message.id_hex();
            insert_message(&tx, message, envelope, now)?;
            tx.execute(
                "INSERT INTO campaigns (id, sender, fallback, fallback_after_ms, max_fallback,
                                        rate, invite_url, start_at, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    id,
                    message.sender,
                    plan.fallback.as_str(),
                    plan.fallback_after_ms,
                    plan.max_fallback.map(|n| n as i64),
                    plan.rate.map(i64::from),
                    plan.invite_url,
                    plan.start_at,
                    now
                ],
            )?;
            let dir = Directory::load(&tx, plan.country)?;
            let blocked = blocked_agents(&tx, &message.sender)?;
            let mut jobs = MessageJobs::prepare(&tx, message, plan.start_at, now)?;
            let mut insert_row = tx.prepare(
                "INSERT INTO campaign_rows (campaign_id, line, recipient, phone, email, login,
                                            agent, user_id, devices, send_at, fallback_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
                 ON CONFLICT (campaign_id, recipient) DO NOTHING",
            )?;
            let mut insert_target = tx.prepare(
                "INSERT INTO campaign_targets (campaign_id, line, agent_id) VALUES (?1, ?2, ?3)",
            )?;
            let mut created = CampaignCreated {
                id: id.clone(),
                addressed: 0,
                with_program: 0,
                no_program: 0,
                devices: 0,
                skipped_blocked: 0,
                duplicates: 0,
                bad: 0,
                bad_rows: Vec::new(),
            };
            let mut due_now = Vec::new();
            let mut jobbed: HashSet<String> = HashSet::new();
            while let Some(row) = reader.next_row().map_err(list_error)? {
                let resolved = row.and_then(|row| match resolve(&dir, &row) {
                    Ok(resolved) => Ok((row, resolved)),
                    Err(reason) => Err(BadRow {
                        line: row.line,
                        reason,
                    }),
                });
                let (row, resolved) = match resolved {
                    Ok(ok) => ok,
                    Err(bad) => {
                        created.bad += 1;
                        if created.bad_rows.len() < MAX_BAD_ROWS_LISTED {
                            created.bad_rows.push(bad);
                        }
                        continue;
                    }
                };
                let send_at = match plan.rate {
                    Some(rate) if rate > 0 => plan.start_at.saturating_add(
                        (created.addressed as i64).saturating_mul(1000) / i64::from(rate),
                    ),
                    _ => plan.start_at,
                };
                let fallback_at = match plan.fallback {
                    Fallback::None => None,
                    _ if resolved.devices.is_empty() => Some(send_at),
                    _ => Some(send_at.saturating_add(plan.fallback_after_ms)),
                };
                let inserted = insert_row.execute(params![
                    id,
                    row.line as i64,
                    resolved.recipient,
                    resolved.phone,
                    resolved.email,
                    resolved.login,
                    row.agent,
                    resolved.user_id,
                    resolved.devices.len() as i64,
                    send_at,
                    fallback_at
                ])?;
                if inserted == 0 {
                    created.duplicates += 1;
                    continue;
                }
                created.addressed += 1;
                if resolved.devices.is_empty() {
                    created.no_program += 1;
                } else {
                    created.with_program += 1;
                }
                jobs.deliver_at(send_at);
                for agent in &resolved.devices {
                    insert_target.execute(params![id, row.line as i64, agent])?;
                    if !jobbed.insert(agent.clone()) {
                        continue;
                    }
                    created.devices += 1;
                    match jobs.insert(agent, blocked.contains(agent))? {
                        Some(job) if send_at <= now => due_now.push((agent.clone(), job)),
                        Some(_) => {}
                        None => created.skipped_blocked += 1,
                    }
                }
            }
            if created.addressed == 0 && created.bad == 0 {
                return Err(StoreError::Invalid("the list has no rows".into()));
            }
            if plan.strict && created.bad > 0 {
                return Err(StoreError::Invalid(strict_refusal(&created)));
            }
            if created.addressed == 0 {
                return Err(StoreError::Invalid(format!(
                    "no row of the list can be used; {}",
                    strict_refusal(&created)
                )));
            }
            tx.execute(
                "UPDATE campaigns SET rows_bad = ?2, rows_duplicate = ?3 WHERE id = ?1",
                params![id, created.bad as i64, created.duplicates as i64],
            )?;
            drop((jobs, insert_row, insert_target));
            tx.commit()?;
            Ok(CampaignStarted { created, due_now })
        })
    }

    /// Cancels what of a message has not gone out: queued deliveries, and fallbacks
    /// not yet handed to a gateway. Returns (deliveries, fallbacks) canceled.
    pub fn cancel_message(&self, id: &str, now: Millis) -> Result<(u64, u64)> {
        self.blocking(|| {
            let mut conn = self.conn();
            let tx = conn.transaction()?;
            let exists: Option<String> = tx
                .query_row("SELECT id FROM messages WHERE id = ?1", params![id], |r| r.get(0))
                .optional()?;
            if exists.is_none() {
                return Err(StoreError::NotFound(format!("no message {id}")));
            }
            let jobs = tx.execute(
                "UPDATE jobs SET state = 'canceled', finished_at = ?2,
                        error = 'the sender canceled the message'
                 WHERE order_id = ?1 AND state = 'queued'",
                params![id, now],
            )?;
            tx.execute(
                "UPDATE campaigns SET canceled_at = ?2 WHERE id = ?1 AND canceled_at IS NULL",
                params![id, now],
            )?;
            let fallbacks = tx.execute(
                "UPDATE campaign_rows SET fb_state = ?3, fb_detail = 'the sender canceled the message'
                 WHERE campaign_id = ?1 AND (fb_state IS NULL AND fallback_at IS NOT NULL
                                             OR fb_state = ?2)",
                params![id, fb::PENDING, fb::CANCELED],
            )?;
            tx.commit()?;
            Ok((jobs as u64, fallbacks as u64))
        })
    }

    // === fallbacks ===

    /// Rows whose fallback is due are decided, in one transaction: not needed (a
    /// device stored it), skipped (blocked on any of the person's devices, no address,
    /// expired, over the campaign's or the sender's daily cap, canceled), or pending.
    /// Each row is decided once. Returns how many were decided.
    pub fn decide_fallbacks(&self, now: Millis, limit: u32, daily_cap: u64) -> Result<usize> {
        self.blocking(|| {
            let mut conn = self.conn();
            let tx = conn.transaction()?;
            let due: Vec<DueRow> = {
                let mut stmt = tx.prepare(
                    "SELECT campaign_id, line, user_id, phone, email FROM campaign_rows
                     WHERE fb_state IS NULL AND fallback_at IS NOT NULL AND fallback_at <= ?1
                     ORDER BY fallback_at LIMIT ?2",
                )?;
                let rows = stmt.query_map(params![now, limit], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })?;
                rows.collect::<Result<_, _>>()?
            };
            let mut campaigns: HashMap<String, CampaignFacts> = HashMap::new();
            let mut days: HashMap<String, i64> = HashMap::new();
            let mut used_by: HashMap<String, i64> = HashMap::new();
            let day = day_of(now);
            let mut set = tx.prepare(
                "UPDATE campaign_rows SET fb_state = ?3, fb_kind = ?4, fb_target = ?5,
                        fb_next_at = ?6, fb_detail = ?7
                 WHERE campaign_id = ?1 AND line = ?2 AND fb_state IS NULL",
            )?;
            let mut blocked_stmt = tx.prepare(
                "SELECT EXISTS (SELECT 1 FROM sender_blocks b
                    WHERE b.sender = ?3 AND b.blocked = 1 AND (
                        b.agent_id IN (SELECT agent_id FROM campaign_targets
                                       WHERE campaign_id = ?1 AND line = ?2)
                        OR b.agent_id IN (SELECT id FROM agents WHERE owner_user_id = ?4)))
                 OR EXISTS (SELECT 1 FROM campaign_targets t JOIN message_receipts r
                    ON r.message_id = t.campaign_id AND r.agent_id = t.agent_id
                    WHERE t.campaign_id = ?1 AND t.line = ?2 AND r.state = 'refused')",
            )?;
            let mut stored_stmt = tx.prepare(
                "SELECT EXISTS (SELECT 1 FROM campaign_targets t JOIN message_receipts r
                    ON r.message_id = t.campaign_id AND r.agent_id = t.agent_id
                    WHERE t.campaign_id = ?1 AND t.line = ?2 AND r.state = 'stored')",
            )?;
            for (campaign, line, user_id, phone, email) in &due {
                if !campaigns.contains_key(campaign) {
                    let facts = tx.query_row(
                        "SELECT c.sender, c.fallback, c.max_fallback, c.canceled_at, m.expires_at
                         FROM campaigns c JOIN messages m ON m.id = c.id WHERE c.id = ?1",
                        params![campaign],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
                    )?;
                    campaigns.insert(campaign.clone(), facts);
                }
                let (sender, kind, max, canceled_at, expires_at) = &campaigns[campaign];
                let target = match kind.as_str() {
                    "sms" => phone.clone(),
                    "email" => email.clone(),
                    _ => None,
                };
                let blocked: bool = blocked_stmt
                    .query_row(params![campaign, line, sender, user_id], |r| r.get(0))?;
                let (state, detail): (&str, Option<&str>) = if canceled_at.is_some() {
                    (fb::CANCELED, Some("the sender canceled the message"))
                } else if blocked {
                    (
                        fb::SKIPPED_BLOCKED,
                        Some("the recipient blocked this sender"),
                    )
                } else if stored_stmt.query_row(params![campaign, line], |r| r.get::<_, bool>(0))? {
                    (fb::NOT_NEEDED, None)
                } else if now >= *expires_at {
                    (fb::SKIPPED_EXPIRED, Some("the message expired first"))
                } else if target.is_none() {
                    (
                        fb::SKIPPED_NO_ADDRESS,
                        Some(if kind == "sms" {
                            "no phone number"
                        } else {
                            "no e-mail address"
                        }),
                    )
                } else {
                    let used = match used_by.get(campaign) {
                        Some(n) => *n,
                        None => tx.query_row(
                            "SELECT fallbacks FROM campaigns WHERE id = ?1",
                            params![campaign],
                            |r| r.get(0),
                        )?,
                    };
                    let today = match days.get(sender) {
                        Some(n) => *n,
                        None => tx
                            .query_row(
                                "SELECT count FROM fallback_days WHERE sender = ?1 AND day = ?2",
                                params![sender, day],
                                |r| r.get(0),
                            )
                            .optional()?
                            .unwrap_or(0),
                    };
                    if max.is_some_and(|max| used >= max) {
                        (
                            fb::SKIPPED_CAP,
                            Some("the campaign's --max-fallback was reached"),
                        )
                    } else if today as u64 >= daily_cap {
                        (
                            fb::SKIPPED_CAP,
                            Some("the sender's daily fallback cap was reached"),
                        )
                    } else {
                        used_by.insert(campaign.clone(), used + 1);
                        days.insert(sender.clone(), today + 1);
                        (fb::PENDING, None)
                    }
                };
                let pending = state == fb::PENDING;
                set.execute(params![
                    campaign,
                    line,
                    state,
                    pending.then_some(kind.as_str()),
                    if pending { target.as_deref() } else { None },
                    pending.then_some(now),
                    detail
                ])?;
            }
            // The counts were kept here for the batch: one write each.
            for (campaign, used) in &used_by {
                tx.execute(
                    "UPDATE campaigns SET fallbacks = ?2 WHERE id = ?1",
                    params![campaign, used],
                )?;
            }
            for (sender, count) in &days {
                tx.execute(
                    "INSERT INTO fallback_days (sender, day, count) VALUES (?1, ?2, ?3)
                     ON CONFLICT (sender, day) DO UPDATE SET count = excluded.count",
                    params![sender, day, count],
                )?;
            }
            drop((set, blocked_stmt, stored_stmt));
            tx.commit()?;
            Ok(due.len())
        })
    }

    /// Takes up to `limit` pending fallbacks that are due and marks them `sending`
    /// (one transaction), with the text each carries.
    pub fn claim_fallbacks(&self, now: Millis, limit: u32) -> Result<Vec<FallbackSend>> {
        self.blocking(|| {
            let mut conn = self.conn();
            let tx = conn.transaction()?;
            let mut claimed: Vec<FallbackSend> = {
                let mut stmt = tx.prepare(
                    "SELECT r.campaign_id, r.line, r.fb_kind, r.fb_target, r.fb_attempts,
                            m.title, m.body, m.link, m.advertising,
                            COALESCE(s.display_name, c.sender), c.invite_url, r.devices
                     FROM campaign_rows r JOIN campaigns c ON c.id = r.campaign_id
                     JOIN messages m ON m.id = r.campaign_id
                     LEFT JOIN senders s ON s.name = c.sender
                     WHERE r.fb_state = 'pending' AND r.fb_next_at <= ?1
                     ORDER BY r.fb_next_at LIMIT ?2",
                )?;
                let rows = stmt.query_map(params![now, limit], |r| {
                    let kind: String = r.get(2)?;
                    let title: String = r.get(5)?;
                    let body: String = r.get(6)?;
                    let link: Option<String> = r.get(7)?;
                    let advertising: bool = r.get(8)?;
                    let name: String = r.get(9)?;
                    let invite: Option<String> = r.get(10)?;
                    let devices: i64 = r.get(11)?;
                    // Only people without the program are invited to get it.
                    let invite = invite.filter(|_| devices == 0);
                    let kind = kind.parse().unwrap_or(Fallback::None);
                    let (subject, text) = match kind {
                        Fallback::Email => fallback_email(
                            &name,
                            &title,
                            &body,
                            link.as_deref(),
                            advertising,
                            invite.as_deref(),
                        ),
                        _ => (
                            String::new(),
                            fallback_sms(
                                &name,
                                &title,
                                &body,
                                link.as_deref(),
                                advertising,
                                invite.as_deref(),
                            ),
                        ),
                    };
                    Ok(FallbackSend {
                        campaign: r.get(0)?,
                        line: r.get::<_, i64>(1)? as u64,
                        kind,
                        target: r.get(3)?,
                        attempts: r.get(4)?,
                        text,
                        subject,
                    })
                })?;
                rows.collect::<Result<_, _>>()?
            };
            {
                // A row another forwarder claimed since it was read (two nodes of a
                // cluster during a failover) is left to it: a claim is the row moving
                // from `pending`, and only one moves it.
                let mut mark = tx.prepare(
                    "UPDATE campaign_rows SET fb_state = 'sending', fb_attempts = fb_attempts + 1
                     WHERE campaign_id = ?1 AND line = ?2 AND fb_state = 'pending'",
                )?;
                let mut mine = Vec::with_capacity(claimed.len());
                for send in claimed {
                    if mark.execute(params![send.campaign, send.line as i64])? == 1 {
                        mine.push(send);
                    }
                }
                claimed = mine;
            }
            tx.commit()?;
            Ok(claimed)
        })
    }

    /// Records fallback attempts, in one transaction. A delivery report that came in
    /// before its send was recorded is applied now.
    pub fn record_fallbacks(&self, outcomes: &[FallbackOutcome], now: Millis) -> Result<()> {
        use crate::model::Next;
        self.blocking(|| {
            let mut conn = self.conn();
            let tx = conn.transaction()?;
            {
                let mut sent = tx.prepare(
                    "UPDATE campaign_rows SET fb_state = 'sent', fb_sent_at = ?3, fb_detail = ?4,
                            fb_gateway_id = ?5
                     WHERE campaign_id = ?1 AND line = ?2 AND fb_state = 'sending'",
                )?;
                let mut retry = tx.prepare(
                    "UPDATE campaign_rows SET fb_state = 'pending', fb_next_at = ?3, fb_detail = ?4
                     WHERE campaign_id = ?1 AND line = ?2 AND fb_state = 'sending'",
                )?;
                let mut failed = tx.prepare(
                    "UPDATE campaign_rows SET fb_state = 'failed', fb_detail = ?3
                     WHERE campaign_id = ?1 AND line = ?2 AND fb_state = 'sending'",
                )?;
                for o in outcomes {
                    let line = o.line as i64;
                    match o.next {
                        Next::Sent => {
                            sent.execute(params![o.campaign, line, now, o.detail, o.gateway_id])?;
                            if let Some(gateway_id) = &o.gateway_id {
                                let early: Option<(String, Option<String>)> = tx
                                    .query_row(
                                        "SELECT status, detail FROM sms_reports WHERE gateway_id = ?1",
                                        params![gateway_id],
                                        |r| Ok((r.get(0)?, r.get(1)?)),
                                    )
                                    .optional()?;
                                if let Some((status, detail)) = early {
                                    apply_report(&tx, gateway_id, &status, detail.as_deref(), now)?;
                                }
                            }
                        }
                        Next::RetryAt(at) => {
                            retry.execute(params![o.campaign, line, at, o.detail])?;
                        }
                        Next::GiveUp => {
                            failed.execute(params![o.campaign, line, o.detail])?;
                        }
                    }
                }
            }
            tx.commit()?;
            Ok(())
        })
    }

    /// Fallbacks that were being sent when the server stopped become `interrupted`:
    /// whether the gateway took them is unknown, and sending again could send twice.
    pub fn interrupt_fallbacks(&self) -> Result<usize> {
        self.blocking(|| {
            Ok(self.conn().execute(
                "UPDATE campaign_rows SET fb_state = ?1,
                        fb_detail = 'the server stopped while sending; not sent again, so that it is never sent twice'
                 WHERE fb_state = 'sending'",
                params![fb::INTERRUPTED],
            )?)
        })
    }

    /// When the next fallback is due (decision or send), if any.
    pub fn next_fallback_at(&self) -> Result<Option<Millis>> {
        self.blocking(|| {
            let conn = self.fast();
            let decide: Option<Millis> = conn.query_row(
                "SELECT MIN(fallback_at) FROM campaign_rows
                 WHERE fb_state IS NULL AND fallback_at IS NOT NULL",
                [],
                |r| r.get(0),
            )?;
            let send: Option<Millis> = conn.query_row(
                "SELECT MIN(fb_next_at) FROM campaign_rows WHERE fb_state = 'pending'",
                [],
                |r| r.get(0),
            )?;
            Ok([decide, send].into_iter().flatten().min())
        })
    }

    /// Takes the SMS gateway's delivery reports (one transaction). Idempotent: a
    /// report for an SMS already reported is a duplicate; one for an id no fallback
    /// has yet is kept and applied when the send is recorded.
    pub fn sms_reports(&self, reports: &[SmsReport], now: Millis) -> Result<Vec<SmsReportOutcome>> {
        self.blocking(|| {
            let mut conn = self.conn();
            let tx = conn.transaction()?;
            let mut outcomes = Vec::with_capacity(reports.len());
            for report in reports {
                let status = match report.status.to_ascii_lowercase().as_str() {
                    "delivered" => fb::DELIVERED,
                    "failed" | "undelivered" | "rejected" | "expired" => fb::FAILED,
                    _ => {
                        outcomes.push(SmsReportOutcome {
                            id: report.id.clone(),
                            outcome: "ignored".into(),
                        });
                        continue;
                    }
                };
                let detail = report
                    .detail
                    .as_deref()
                    .map(|d| d.chars().take(200).collect::<String>());
                let new = tx.execute(
                    "INSERT INTO sms_reports (gateway_id, status, detail, received_at)
                     VALUES (?1, ?2, ?3, ?4) ON CONFLICT (gateway_id) DO NOTHING",
                    params![report.id, status, detail, now],
                )?;
                let outcome = if new == 0 {
                    "duplicate"
                } else if apply_report(&tx, &report.id, status, detail.as_deref(), now)? {
                    "updated"
                } else {
                    "kept"
                };
                outcomes.push(SmsReportOutcome {
                    id: report.id.clone(),
                    outcome: outcome.into(),
                });
            }
            tx.commit()?;
            Ok(outcomes)
        })
    }

    /// Deletes delivery reports older than `before` (they have been applied, or never
    /// will be).
    pub fn prune_sms_reports(&self, before: Millis) -> Result<usize> {
        self.blocking(|| {
            Ok(self.conn().execute(
                "DELETE FROM sms_reports WHERE received_at < ?1",
                params![before],
            )?)
        })
    }

    // === figures ===

    /// The sender of a message, or `NotFound`.
    pub fn message_sender(&self, id: &str) -> Result<String> {
        self.blocking(|| {
            self.fast()
                .query_row(
                    "SELECT sender FROM messages WHERE id = ?1",
                    params![id],
                    |r| r.get(0),
                )
                .optional()?
                .ok_or_else(|| StoreError::NotFound(format!("no message {id}")))
        })
    }

    /// The sender of a campaign, or `NotFound`.
    pub fn campaign_sender(&self, id: &str) -> Result<String> {
        self.blocking(|| {
            self.fast()
                .query_row("SELECT sender FROM campaigns WHERE id = ?1", params![id], |r| r.get(0))
                .optional()?
                .ok_or_else(|| {
                    StoreError::NotFound(format!(
                        "no campaign {id} (a message sent without --list has no campaign figures: `message show {id}`)"
                    ))
                })
        })
    }

    /// A campaign's figures.
    pub fn campaign_status(&self, id: &str, now: Millis) -> Result<CampaignStatus> {
        self.blocking(|| {
            let conn = self.fast();
            let mut status = conn
                .query_row(
                    "SELECT c.id, c.sender, m.title, c.fallback, c.created_at, c.start_at,
                            m.expires_at, c.canceled_at, c.invite_url IS NOT NULL
                     FROM campaigns c JOIN messages m ON m.id = c.id WHERE c.id = ?1",
                    params![id],
                    |r| {
                        Ok((
                            CampaignStatus {
                                id: r.get(0)?,
                                sender: r.get(1)?,
                                title: r.get(2)?,
                                fallback: r.get(3)?,
                                created_at: r.get(4)?,
                                start_at: r.get(5)?,
                                expires_at: r.get(6)?,
                                canceled_at: r.get(7)?,
                                ..CampaignStatus::default()
                            },
                            r.get::<_, bool>(8)?,
                        ))
                    },
                )
                .optional()?
                .ok_or_else(|| StoreError::NotFound(format!("no campaign {id}")))?;
            let (ref mut s, invite) = status;
            let canceled = s.canceled_at.is_some();
            let linked = if invite {
                linked_contacts(&conn)?
            } else {
                HashSet::new()
            };
            let mut delays = Vec::new();
            let mut reached = 0;
            let mut per_minute: std::collections::BTreeMap<Millis, u64> = Default::default();
            scan_rows(&conn, id, now, |row| {
                s.addressed += 1;
                if row.devices > 0 {
                    s.with_program += 1;
                } else {
                    s.no_program += 1;
                    if invite && row.fb_state.as_deref() != Some(fb::SKIPPED_BLOCKED) {
                        s.invited += 1;
                        let keys = [
                            row.phone.as_ref().map(|p| format!("p:{p}")),
                            row.email
                                .as_ref()
                                .map(|e| format!("e:{}", e.to_ascii_lowercase())),
                        ];
                        if keys.iter().flatten().any(|k| linked.contains(k)) {
                            s.invited_linked += 1;
                        }
                    }
                }
                s.pushed += u64::from(row.pushed);
                if let Some(at) = row.stored_at {
                    s.stored += 1;
                    delays.push(at - row.send_at);
                    *per_minute.entry(at - at.rem_euclid(60_000)).or_default() += 1;
                }
                s.displayed += u64::from(row.displayed);
                s.read += u64::from(row.read);
                if row.stored_at.is_none() {
                    if row.refused {
                        s.refused += 1;
                    } else if row.devices > 0 && !row.open_jobs {
                        s.expired += 1;
                    }
                }
                match row.fb_state.as_deref() {
                    Some(fb::SENT) => s.fallback_sent += 1,
                    Some(fb::DELIVERED) => {
                        s.fallback_sent += 1;
                        s.fallback_delivered += 1;
                    }
                    Some(fb::FAILED | fb::INTERRUPTED) => {
                        s.fallback_sent += 1;
                        s.fallback_failed += 1;
                    }
                    Some(fb::PENDING | fb::SENDING) => s.fallback_pending += 1,
                    Some(fb::SKIPPED_BLOCKED) => s.fallback_skipped_blocked += 1,
                    Some(fb::SKIPPED_CAP) => s.fallback_skipped_cap += 1,
                    Some(fb::SKIPPED_NO_ADDRESS | fb::SKIPPED_EXPIRED) => {
                        s.fallback_skipped_other += 1
                    }
                    _ => {}
                }
                // E-mails the relay took count as delivered: there is no report.
                if row.fb_state.as_deref() == Some(fb::SENT)
                    && row.fb_kind.as_deref() == Some("email")
                {
                    s.fallback_delivered += 1;
                }
                if row.reached() {
                    reached += 1;
                } else if matches!(
                    row.state(canceled),
                    "not_reached" | "blocked" | "canceled" | "fallback_failed"
                ) {
                    s.not_reached += 1;
                }
                Ok(())
            })?;
            s.push_rate = ratio(s.stored, s.with_program);
            s.fallback_rate = ratio(s.fallback_delivered, s.fallback_sent);
            s.reach_rate = ratio(reached, s.addressed);
            delays.sort_unstable();
            s.stored_ms_p50 = percentile(&delays, 50);
            s.stored_ms_p90 = percentile(&delays, 90);
            s.stored_ms_p99 = percentile(&delays, 99);
            s.stored_per_minute = per_minute.into_iter().collect();
            Ok(status.0)
        })
    }

    /// A campaign's rows, each with its state; `state` filters.
    pub fn campaign_recipients(
        &self,
        id: &str,
        state: Option<&str>,
        now: Millis,
    ) -> Result<Vec<CampaignRecipient>> {
        self.blocking(|| {
            let conn = self.fast();
            let canceled: Option<Millis> = conn
                .query_row(
                    "SELECT canceled_at FROM campaigns WHERE id = ?1",
                    params![id],
                    |r| r.get(0),
                )
                .optional()?
                .ok_or_else(|| StoreError::NotFound(format!("no campaign {id}")))?;
            let mut out = Vec::new();
            scan_rows(&conn, id, now, |row| {
                let summary = row.state(canceled.is_some());
                if state.is_none_or(|s| s == summary) {
                    out.push(CampaignRecipient {
                        line: row.line,
                        phone: row.phone,
                        email: row.email,
                        user: row.login,
                        agent: row.agent,
                        devices: row.devices,
                        state: summary.to_string(),
                        fallback_state: row.fb_state,
                        fallback_detail: row.fb_detail,
                        stored_at: row.stored_at,
                    });
                }
                Ok(())
            })?;
            Ok(out)
        })
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

fn percentile(sorted: &[i64], p: usize) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (sorted.len() * p).div_ceil(100).max(1) - 1;
    Some(sorted[rank.min(sorted.len() - 1)])
}

/// Sets a sent fallback SMS to a reported final state. Returns whether one was.
fn apply_report(
    tx: &Connection,
    gateway_id: &str,
    status: &str,
    detail: Option<&str>,
    now: Millis,
) -> Result<bool> {
    let changed = tx.execute(
        "UPDATE campaign_rows SET fb_state = ?2, fb_reported_at = ?3,
                fb_detail = COALESCE(?4, fb_detail)
         WHERE fb_gateway_id = ?1 AND fb_state = 'sent'",
        params![
            gateway_id,
            status,
            now,
            detail.map(|d| format!("carrier: {d}"))
        ],
    )?;
    Ok(changed > 0)
}

/// `p:PHONE` and `e:EMAIL` of console users with a device linked.
fn linked_contacts(conn: &Connection) -> Result<HashSet<String>> {
    let mut stmt = conn.prepare(
        "SELECT u.phone, u.email FROM users u
         WHERE EXISTS (SELECT 1 FROM agents a WHERE a.owner_user_id = u.id AND a.revoked_at IS NULL)",
    )?;
    let mut rows = stmt.query([])?;
    let mut out = HashSet::new();
    while let Some(r) = rows.next()? {
        let (phone, email): (String, String) = (r.get(0)?, r.get(1)?);
        if let Ok(p) = normalize_phone(&phone, None) {
            out.insert(format!("p:{p}"));
        }
        if !email.is_empty() {
            out.insert(format!("e:{}", email.to_ascii_lowercase()));
        }
    }
    Ok(out)
}

/// A campaign's rows (`?1`) with what their targets' jobs and receipts say at `?2`.
/// A row's jobs are looked up through its own targets (`campaign_targets` by campaign
/// and line, then `jobs_by_order` by order and agent): written as a join, the planner
/// walked every job of the campaign for every row, which made `message status` on a
/// 100,000-row list with 10,000 devices take many minutes.
const ROW_FACTS: &str = "
    SELECT r.line, r.phone, r.email, r.login, r.agent, r.devices, r.send_at, r.fallback_at,
        r.fb_state, r.fb_kind, r.fb_detail,
        (SELECT MIN(mr.received_at) FROM campaign_targets t JOIN message_receipts mr
            ON mr.message_id = t.campaign_id AND mr.agent_id = t.agent_id
            WHERE t.campaign_id = r.campaign_id AND t.line = r.line AND mr.state = 'stored'),
        EXISTS (SELECT 1 FROM campaign_targets t JOIN message_receipts mr
            ON mr.message_id = t.campaign_id AND mr.agent_id = t.agent_id
            WHERE t.campaign_id = r.campaign_id AND t.line = r.line AND mr.state = 'displayed'),
        EXISTS (SELECT 1 FROM campaign_targets t JOIN message_receipts mr
            ON mr.message_id = t.campaign_id AND mr.agent_id = t.agent_id
            WHERE t.campaign_id = r.campaign_id AND t.line = r.line AND mr.state = 'read'),
        EXISTS (SELECT 1 FROM campaign_targets t
            WHERE t.campaign_id = r.campaign_id AND t.line = r.line
              AND EXISTS (SELECT 1 FROM jobs j
                  WHERE j.order_id = t.campaign_id AND j.agent_id = t.agent_id
                    AND j.delivered_at IS NOT NULL)),
        EXISTS (SELECT 1 FROM campaign_targets t
            WHERE t.campaign_id = r.campaign_id AND t.line = r.line
              AND EXISTS (SELECT 1 FROM jobs j
                  WHERE j.order_id = t.campaign_id AND j.agent_id = t.agent_id
                    AND j.state = 'refused')),
        EXISTS (SELECT 1 FROM campaign_targets t
            WHERE t.campaign_id = r.campaign_id AND t.line = r.line
              AND EXISTS (SELECT 1 FROM jobs j
                  WHERE j.order_id = t.campaign_id AND j.agent_id = t.agent_id
                    AND j.state IN ('queued', 'delivered', 'running') AND j.expires_at > ?2))
    FROM campaign_rows r WHERE r.campaign_id = ?1 ORDER BY r.line";

/// Calls `each` with every row of a campaign, in list order.
fn scan_rows(
    conn: &Connection,
    id: &str,
    now: Millis,
    mut each: impl FnMut(RowFacts) -> Result<()>,
) -> Result<()> {
    let mut stmt = conn.prepare(ROW_FACTS)?;
    let mut rows = stmt.query(params![id, now])?;
    while let Some(r) = rows.next()? {
        each(RowFacts {
            line: r.get::<_, i64>(0)? as u64,
            phone: r.get(1)?,
            email: r.get(2)?,
            login: r.get(3)?,
            agent: r.get(4)?,
            devices: r.get::<_, i64>(5)? as u64,
            send_at: r.get(6)?,
            fallback_at: r.get(7)?,
            fb_state: r.get(8)?,
            fb_kind: r.get(9)?,
            fb_detail: r.get(10)?,
            stored_at: r.get(11)?,
            displayed: r.get(12)?,
            read: r.get(13)?,
            pushed: r.get(14)?,
            refused: r.get(15)?,
            open_jobs: r.get(16)?,
        })?;
    }
    Ok(())
}

fn list_error(e: ListError) -> StoreError {
    StoreError::Invalid(e.to_string())
}

/// The refusal text of a strict campaign: the count and the first bad rows.
fn strict_refusal(created: &CampaignCreated) -> String {
    let mut text = format!("{} rows cannot be used:", created.bad);
    for bad in created.bad_rows.iter().take(20) {
        text.push_str(&format!("\n  line {}: {}", bad.line, bad.reason));
    }
    if created.bad > 20 {
        text.push_str(&format!("\n  ... and {} more", created.bad - 20));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    use herald_shared::message::{Receipt, ReceiptState, Report};

    use crate::model::Next;
    use crate::store::messages::tests::{agent, block, message, report, store, NOW};

    fn user(store: &Store, login: &str, phone: &str, email: &str) -> i64 {
        let conn = store.conn();
        conn.execute(
            "INSERT INTO users (login, email, phone, password_hash, role, created_at)
             VALUES (?1, ?2, ?3, 'x', 'user', ?4)",
            params![login, email, phone, NOW],
        )
        .unwrap();
        conn.last_insert_rowid()
    }

    fn own(store: &Store, agent: &str, user: i64) {
        store
            .conn()
            .execute(
                "UPDATE agents SET owner_user_id = ?2 WHERE id = ?1",
                params![agent, user],
            )
            .unwrap();
    }

    fn plan(fallback: Fallback) -> CampaignPlan {
        CampaignPlan {
            start_at: NOW,
            fallback,
            fallback_after_ms: 60_000,
            max_fallback: None,
            rate: None,
            invite_url: None,
            country: Some(crate::model::parse_country("KR").unwrap()),
            strict: false,
        }
    }

    fn state(store: &Store, line: u64) -> Option<String> {
        store
            .conn()
            .query_row(
                "SELECT fb_state FROM campaign_rows WHERE line = ?1",
                params![line as i64],
                |r| r.get(0),
            )
            .unwrap()
    }

    #[test]
    fn rows_resolve_to_devices_or_fall_back_and_each_row_is_decided_once() {
        let store = store();
        let (alice_pc, alice_key) = agent(&store, 3, "alice-pc");
        let (bob_pc, bob_key) = agent(&store, 4, "bob-pc");
        let alice = user(&store, "alice", "010-1111-2222", "alice@example.org");
        let bob = user(&store, "bob", "+82 10 3333 4444", "");
        own(&store, &alice_pc, alice);
        own(&store, &bob_pc, bob);
        // Bob blocked the sender on his device.
        let (signed, r) = report(&bob_key, block(&bob_pc, true, NOW - 1));
        store.store_report(&bob_pc, &signed, &r, NOW).unwrap();
        let (m, envelope) = message();
        let list = "phone,email,user\n\
                    01011112222,,\n\
                    +821033334444,,\n\
                    010-5555-6666,,\n\
                    ,carol@example.org,\n\
                    +82 10 1111 2222,,\n\
                    bogus,,\n\
                    ,,nobody\n";
        let started = store
            .create_campaign(&m, &envelope, list.as_bytes(), &plan(Fallback::Sms), NOW)
            .unwrap();
        let c = &started.created;
        assert_eq!(
            (
                c.addressed,
                c.with_program,
                c.no_program,
                c.devices,
                c.skipped_blocked
            ),
            (4, 2, 2, 2, 1)
        );
        assert_eq!((c.duplicates, c.bad), (1, 2));
        assert_eq!(
            c.bad_rows.iter().map(|b| b.line).collect::<Vec<_>>(),
            vec![7, 8]
        );
        assert_eq!(started.due_now.len(), 1, "Alice's device gets it now");

        // At once: the rows without the program (line 4 by SMS; line 5 has no phone).
        assert_eq!(store.decide_fallbacks(NOW, 100, 100).unwrap(), 2);
        assert_eq!(state(&store, 4).as_deref(), Some(fb::PENDING));
        assert_eq!(state(&store, 5).as_deref(), Some(fb::SKIPPED_NO_ADDRESS));
        assert_eq!(state(&store, 2), None, "devices get their minute");
        // Alice stores it; Bob's device refused (he blocked the sender).
        let stored = Report::Receipt(Receipt {
            message_id: m.id,
            message_hash: herald_shared::message::message_hash(&envelope),
            agent_id: alice_pc.clone(),
            state: ReceiptState::Stored,
            at: NOW + 5,
        });
        let (signed, r) = report(&alice_key, stored);
        store
            .store_report(&alice_pc, &signed, &r, NOW + 10)
            .unwrap();
        assert_eq!(store.decide_fallbacks(NOW + 60_000, 100, 100).unwrap(), 2);
        assert_eq!(state(&store, 2).as_deref(), Some(fb::NOT_NEEDED));
        assert_eq!(state(&store, 3).as_deref(), Some(fb::SKIPPED_BLOCKED));
        assert_eq!(store.decide_fallbacks(NOW + 120_000, 100, 100).unwrap(), 0);

        // The pending one is claimed once, sent, and reported.
        let claimed = store.claim_fallbacks(NOW + 60_000, 10).unwrap();
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].target, "+821055556666");
        assert_eq!(claimed[0].text, "card: Payment due - Friday");
        assert!(store.claim_fallbacks(NOW + 60_000, 10).unwrap().is_empty());
        // The report comes before the send is recorded: it is kept, then applied.
        let reports = [SmsReport {
            id: "gw-1".into(),
            status: "delivered".into(),
            detail: None,
        }];
        assert_eq!(store.sms_reports(&reports, NOW).unwrap()[0].outcome, "kept");
        store
            .record_fallbacks(
                &[FallbackOutcome {
                    campaign: c.id.clone(),
                    line: 4,
                    next: Next::Sent,
                    detail: "HTTP 200".into(),
                    gateway_id: Some("gw-1".into()),
                }],
                NOW + 61_000,
            )
            .unwrap();
        assert_eq!(state(&store, 4).as_deref(), Some(fb::DELIVERED));
        assert_eq!(
            store.sms_reports(&reports, NOW).unwrap()[0].outcome,
            "duplicate"
        );

        let s = store.campaign_status(&c.id, NOW + 120_000).unwrap();
        assert_eq!(
            (
                s.addressed,
                s.with_program,
                s.stored,
                s.refused,
                s.no_program
            ),
            (4, 2, 1, 1, 2)
        );
        assert_eq!((s.fallback_sent, s.fallback_delivered), (1, 1));
        assert_eq!(s.fallback_skipped_blocked, 1);
        assert_eq!(s.not_reached, 2, "Bob (blocked) and Carol (no phone)");
        assert_eq!(s.reach_rate, 0.5);
        assert_eq!(s.stored_ms_p50, Some(10));
        let rows = store
            .campaign_recipients(&c.id, Some("blocked"), NOW + 120_000)
            .unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].user.as_deref(), Some("bob"));
    }

    #[test]
    fn strict_refuses_the_whole_list_and_leaves_nothing() {
        let store = store();
        let (m, envelope) = message();
        let mut strict = plan(Fallback::Sms);
        strict.strict = true;
        let list = "phone\n+821055556666\nnot a phone\n";
        let e = store
            .create_campaign(&m, &envelope, list.as_bytes(), &strict, NOW)
            .unwrap_err();
        assert!(e.to_string().contains("line 3"), "{e}");
        let count: i64 = store
            .conn()
            .query_row("SELECT COUNT(*) FROM messages", [], |r| r.get(0))
            .unwrap();
        assert_eq!(count, 0);
    }

    #[test]
    fn the_cap_and_the_interruption_keep_fallbacks_to_at_most_one_per_row() {
        let store = store();
        let (m, envelope) = message();
        let mut capped = plan(Fallback::Sms);
        capped.max_fallback = Some(2);
        let list = "phone\n+821055556661\n+821055556662\n+821055556663\n";
        let c = store
            .create_campaign(&m, &envelope, list.as_bytes(), &capped, NOW)
            .unwrap()
            .created;
        store.decide_fallbacks(NOW, 100, 100).unwrap();
        assert_eq!(state(&store, 4).as_deref(), Some(fb::SKIPPED_CAP));
        assert_eq!(store.claim_fallbacks(NOW, 10).unwrap().len(), 2);
        // The server dies while sending: nothing is sent again.
        assert_eq!(store.interrupt_fallbacks().unwrap(), 2);
        assert!(store.claim_fallbacks(NOW + 1, 10).unwrap().is_empty());
        let s = store.campaign_status(&c.id, NOW).unwrap();
        assert_eq!((s.fallback_failed, s.fallback_skipped_cap), (2, 1));
    }

    #[test]
    fn the_row_scan_finds_each_rows_jobs_by_order_and_agent() {
        // Not by order alone: that walks every job of the campaign for every row.
        let store = store();
        let conn = store.conn();
        let mut stmt = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {ROW_FACTS}"))
            .unwrap();
        let plan: Vec<String> = stmt
            .query_map(params!["c", NOW], |r| r.get(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let jobs: Vec<&String> = plan.iter().filter(|d| d.contains(" j ")).collect();
        assert_eq!(jobs.len(), 3, "{plan:#?}");
        assert!(
            jobs.iter()
                .all(|d| d.contains("jobs_by_order (order_id=? AND agent_id=?)")),
            "{plan:#?}"
        );
    }
}
