//! Forwarding results to other media: when a job of a user's subscription ends, its
//! result goes to the user's forwarding rules (`destinations`): e-mail through the
//! `[smtp]` relay, a signed JSON webhook, or an SMS through the `[sms]` gateway.
//!
//! Forwarding must not become a relay for spam or SMS pumping through the operator's
//! relay and gateway: an e-mail or SMS rule forwards nothing until its owner enters the
//! code sent through it (the rules of `model::confirm`); a user has at most five rules
//! and daily limits per medium; only runs that happened are forwarded; and an SMS or a
//! subject carries no text an agent or a visitor wrote (`message`).
//!
//! The forwarder is one task. It turns finished jobs into `deliveries` rows (one
//! transaction per batch, so a crash loses nothing and nothing is queued twice), makes
//! and sends the confirmation codes asked for, then sends due deliveries, each in its
//! own task with a timeout, round-robin by user and with bounds on how many run at once
//! in all, per user and per destination host (`slots`), so a slow or dead endpoint
//! delays only its owner's deliveries. Every attempt is recorded in
//! `delivery_attempts`; a failure is retried with exponential backoff and given up
//! after `max_attempts`; deliveries older than 30 days are deleted, once an hour. It
//! wakes on job events from the relay, at the next retry time, and every few seconds
//! as a safety net (for jobs finished by writers that announce nothing, and for codes
//! the console asked for).
//!
//! This folder holds the policy and the sending: `queue` (retries, backoff,
//! retention), `slots` (who gets a send slot), `message` (what a result says), `send`
//! (SMTP, webhooks, SMS). The rows (rules, codes, deliveries, attempts) are read and
//! written by the store (`store::forwarding`), each step in one transaction; the
//! records they share are in `model`.

mod fallback;
mod message;
mod queue;
mod send;
mod slots;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use herald_shared::Millis;

use herald_shared::url::is_loopback_host;

use crate::config::{ServerConfig, SmsConfig, SmtpConfig, SmtpTls};
use crate::model::{new_code, CodeMessage, JobEvent};
use crate::store::{Store, StoreError};

use crate::model::{DailyLimits, Kind, Next, DAILY_LIMIT_REACHED};
pub use message::{SmsRequest, SmsTemplate, SMS_MAX_CHARS};
pub use queue::{backoff, enqueue, next_step, prune, Attempt, RetryPolicy, MAX_BACKOFF, RETENTION};
pub use send::{is_public, signature, CONNECT_TIMEOUT, SIGNATURE_HEADER};
pub use slots::Fairness;

/// Deliveries sent at the same time.
pub const CONCURRENCY: usize = Fairness::DEFAULT.total;
/// Scan for finished jobs, due retries and code requests at least this often.
pub const SCAN_INTERVAL: Duration = Duration::from_secs(5);
/// How often old deliveries are pruned (see [`RETENTION`]).
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);
/// On shutdown, how long sends under way may finish before they are abandoned (an
/// abandoned delivery stays pending and is sent after the restart).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Longest webhook URL a rule may have.
pub const MAX_URL_LEN: usize = 2048;

/// What the forwarder needs, from `[smtp]`, `[sms]` and `[forwarding]`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `http:` webhook URLs are allowed.
    pub allow_http: bool,
    /// Webhooks may go to loopback and private addresses.
    pub allow_private_targets: bool,
    /// Retries.
    pub retry: RetryPolicy,
    /// Limit on one attempt.
    pub timeout: Duration,
    /// Sends under way at once: in all, per user, per destination host.
    pub fairness: Fairness,
    /// What one user may have forwarded in a day.
    pub daily: DailyLimits,
    /// Safety-net scan interval.
    pub scan_interval: Duration,
    /// The e-mail relay, if any.
    pub smtp: Option<SmtpConfig>,
    /// The SMS gateway, if any.
    pub sms: Option<SmsConfig>,
    /// Campaign fallbacks one sender may have sent in a UTC day.
    pub fallback_per_sender_day: u64,
    /// Campaign fallbacks sent at once.
    pub fallback_concurrency: usize,
    /// Notified when a campaign is created (its fallbacks may be due at once).
    pub fallbacks: Arc<tokio::sync::Notify>,
}

impl Settings {
    /// Settings from a validated server configuration.
    pub fn from_config(config: &ServerConfig) -> Settings {
        let forwarding = config.forwarding();
        Settings {
            allow_http: forwarding.allow_http,
            allow_private_targets: forwarding.allow_private_targets,
            retry: RetryPolicy {
                max_attempts: forwarding.max_attempts.max(1),
                first_retry: Duration::from_secs(forwarding.first_retry_secs),
            },
            timeout: Duration::from_secs(forwarding.timeout_secs.max(1)),
            fairness: Fairness::DEFAULT,
            daily: DailyLimits::DEFAULT,
            scan_interval: SCAN_INTERVAL,
            smtp: config.smtp.clone(),
            sms: config.sms.clone(),
            fallback_per_sender_day: forwarding.fallback_per_sender_day,
            fallback_concurrency: forwarding.fallback_concurrency.max(1),
            fallbacks: Default::default(),
        }
    }
}

/// Checks a forwarding rule's destination before it is stored: `email` takes one
/// address, `webhook` an `https:` URL (`http:` too if `allow_http`), `sms` a phone
/// number in international form (`+` and 6 to 15 digits). The error says what is wrong
/// in words a user can act on.
pub fn check_target(kind: &str, target: &str, allow_http: bool) -> Result<(), String> {
    match Kind::parse(kind) {
        Some(Kind::Email) => {
            if target.trim() != target || target.len() > 254 {
                return Err(format!("{target:?} is not an e-mail address"));
            }
            target
                .parse::<lettre::Address>()
                .map(|_| ())
                .map_err(|_| format!("{target:?} is not an e-mail address (like name@example.org)"))
        }
        Some(Kind::Webhook) => check_url("webhook URL", target, allow_http),
        Some(Kind::Sms) => {
            let digits = target.strip_prefix('+').unwrap_or("");
            if (6..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) {
                Ok(())
            } else {
                Err(format!(
                    "{target:?} is not a phone number in international form (like +821012345678)"
                ))
            }
        }
        None => Err(format!(
            "unknown destination kind {kind:?}: use email, webhook or sms"
        )),
    }
}

fn check_url(what: &str, url: &str, allow_http: bool) -> Result<(), String> {
    if url.len() > MAX_URL_LEN {
        return Err(format!(
            "the {what} is longer than {MAX_URL_LEN} characters"
        ));
    }
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    match parsed.scheme() {
        "https" => {}
        "http" if allow_http => {}
        _ => return Err(format!("the {what} must start with https://")),
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(format!("the {what} has no host"));
    }
    Ok(())
}

/// Checks the `[smtp]`, `[sms]` and `[forwarding]` sections (called when the
/// configuration is loaded, so a mistake stops the server at start).
pub fn validate_config(config: &ServerConfig) -> Result<(), String> {
    let forwarding = config.forwarding();
    if forwarding.max_attempts == 0 {
        return Err("[forwarding] max_attempts must be at least 1".into());
    }
    if forwarding.first_retry_secs == 0 || forwarding.timeout_secs == 0 {
        return Err("[forwarding] first_retry_secs and timeout_secs must be at least 1".into());
    }
    if let Some(smtp) = &config.smtp {
        if smtp.host.trim().is_empty() {
            return Err("[smtp] host is empty".into());
        }
        smtp.from
            .parse::<lettre::message::Mailbox>()
            .map_err(|e| format!("[smtp] from {:?} is not an address: {e}", smtp.from))?;
        if smtp.username.is_some() != smtp.password.is_some() {
            return Err("[smtp] username and password go together".into());
        }
        if smtp.tls == SmtpTls::None && !is_loopback_host(&smtp.host) {
            return Err(format!(
                "[smtp] tls = \"none\" is only allowed to a relay on loopback, not {:?}; use \"starttls\" or \"tls\"",
                smtp.host
            ));
        }
        if let Some(ca_file) = &smtp.ca_file {
            send::check_ca_file(ca_file).map_err(|e| format!("[smtp] ca_file: {e}"))?;
        }
    }
    if let Some(sms) = &config.sms {
        reqwest::Method::from_bytes(sms.method.to_ascii_uppercase().as_bytes())
            .map_err(|_| format!("[sms] method {:?} is not an HTTP method", sms.method))?;
        let sample = SmsTemplate::new(sms).render("+10000000000", "Herald test");
        check_url("[sms] url", &sample.url, forwarding.allow_http)?;
        if let Some(pointer) = &sms.id_pointer {
            if !pointer.starts_with('/') {
                return Err(format!(
                    "[sms] id_pointer {pointer:?} is not a JSON pointer: it starts with '/', like \"/id\""
                ));
            }
        }
        if sms.report_secret.as_ref().is_some_and(|s| s.len() < 16) {
            return Err("[sms] report_secret must be at least 16 characters".into());
        }
        for (name, value) in &sms.headers {
            reqwest::header::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("[sms] header name {name:?} is not valid"))?;
            reqwest::header::HeaderValue::from_str(value)
                .map_err(|_| format!("[sms] header {name} has a value that is not valid"))?;
        }
    }
    Ok(())
}

// === the forwarder task ===

/// Runs the forwarder until `stop` resolves. `events` are the relay's job events
/// (`Relay::subscribe`).
pub async fn run(
    store: Store,
    mut events: broadcast::Receiver<JobEvent>,
    settings: Settings,
    stop: impl Future<Output = ()>,
) {
    let senders = Arc::new(send::Senders::new(&settings));
    let (stop_fallbacks, stopped) = tokio::sync::watch::channel(false);
    let fallbacks = tokio::spawn(fallback::run(
        store.clone(),
        senders.clone(),
        settings.clone(),
        settings.fallbacks.clone(),
        stopped,
    ));
    let mut state = Sends {
        in_flight: HashMap::new(),
        tasks: JoinSet::new(),
        // Pruning starts with the first scan.
        next_prune: Instant::now(),
    };
    let mut events_open = true;
    tokio::pin!(stop);
    loop {
        let wake = match state.scan(&store, &senders, &settings) {
            Ok(wake) => wake,
            Err(e) => {
                warn!(error = %e, "forwarding: cannot read the delivery queue; retrying");
                Instant::now() + settings.scan_interval
            }
        };
        tokio::select! {
            _ = &mut stop => break,
            Some(done) = state.tasks.join_next_with_id(), if !state.tasks.is_empty() => {
                let id = match done {
                    Ok((id, ())) => id,
                    Err(e) => {
                        warn!(error = %e, "forwarding: a delivery task failed");
                        e.id()
                    }
                };
                state.in_flight.remove(&id);
            }
            event = events.recv(), if events_open => match event {
                // Many events come at once under load: one scan covers them all.
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    while let Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) = events.try_recv() {}
                }
                Err(broadcast::error::RecvError::Closed) => events_open = false,
            },
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
    let _ = stop_fallbacks.send(true);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, fallbacks).await;
    let tasks = &mut state.tasks;
    if !tasks.is_empty() {
        let drain = async { while tasks.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, drain).await;
        tasks.abort_all();
    }
}

/// The forwarder task's state: the sends under way, and when to prune next.
struct Sends {
    /// Sends under way, by task.
    in_flight: HashMap<tokio::task::Id, slots::Flight>,
    tasks: JoinSet<()>,
    next_prune: Instant,
}

impl Sends {
    /// Queues finished jobs, sends the codes asked for, starts due deliveries while
    /// there is room, prunes when it is time, and says when to look again.
    fn scan(
        &mut self,
        store: &Store,
        senders: &Arc<send::Senders>,
        settings: &Settings,
    ) -> Result<Instant, StoreError> {
        let now = crate::now_ms();
        if Instant::now() >= self.next_prune {
            self.next_prune = Instant::now() + PRUNE_INTERVAL;
            match queue::prune(store, now) {
                Ok(0) => {}
                Ok(deleted) => info!(deleted, "forwarding: old deliveries deleted"),
                Err(e) => warn!(error = %e, "forwarding: cannot delete old deliveries"),
            }
        }
        let enqueued = queue::enqueue(store, now, &settings.daily)?;
        if enqueued.queued > 0 {
            debug!(queued = enqueued.queued, "forwarding: results queued");
        }
        for (delivery, job, kind) in &enqueued.over_limit {
            warn!(
                delivery,
                job,
                kind,
                attempts = 1,
                detail = DAILY_LIMIT_REACHED,
                "forwarding given up"
            );
        }
        let codes = store.take_code_requests(
            now,
            &settings.daily,
            || new_code(|| u32::from_le_bytes(crate::random_bytes::<4>())),
            crate::random_bytes::<16>,
        )?;
        for code in codes {
            let flight = slots::Flight {
                delivery: None,
                user: code.user_id,
                host: slots::host_key(Some(code.kind), &code.target),
            };
            let handle = self
                .tasks
                .spawn(send_code(store.clone(), senders.clone(), code));
            self.in_flight.insert(handle.id(), flight);
        }
        let fairness = &settings.fairness;
        if self.in_flight.len() < fairness.total {
            // Enough turns per user to get past those under way and those whose host is
            // busy.
            let turns = fairness.per_user.saturating_mul(4).max(1);
            let due = store.due_deliveries(now, turns, fairness.total.saturating_mul(turns))?;
            let flying: Vec<&slots::Flight> = self.in_flight.values().collect();
            for (candidate, flight) in slots::pick(due, &flying, fairness) {
                let handle = self.tasks.spawn(deliver(
                    store.clone(),
                    senders.clone(),
                    settings.retry,
                    candidate.id,
                ));
                self.in_flight.insert(handle.id(), flight);
            }
        }
        let mut wake = (Instant::now() + settings.scan_interval).min(self.next_prune);
        if let Some(at) = store.next_delivery_due_after(now)? {
            wake = wake.min(Instant::now() + millis_until(now, at));
        }
        Ok(wake)
    }
}

fn millis_until(now: Millis, at: Millis) -> Duration {
    Duration::from_millis(at.saturating_sub(now).max(0) as u64)
}

/// Makes one attempt at a delivery and records it.
async fn deliver(store: Store, senders: Arc<send::Senders>, policy: RetryPolicy, id: i64) {
    let out = match store.outgoing_delivery(id) {
        Ok(Some(out)) => out,
        Ok(None) => return,
        Err(e) => {
            warn!(delivery = id, error = %e, "forwarding: cannot load a delivery");
            return;
        }
    };
    let attempt = senders.send(&out).await;
    let now = crate::now_ms();
    let id = out.id;
    let next = next_step(out.attempts, attempt.ok, attempt.permanent, now, &policy);
    let kind = out.kind.map_or("unknown", Kind::as_str);
    let job = out.facts.job_id;
    let attempts = out.attempts + 1;
    match next {
        Next::Sent => {
            info!(delivery = id, job, kind, attempts, detail = %attempt.detail, "result forwarded")
        }
        Next::RetryAt(at) => info!(
            delivery = id, job, kind, attempts, detail = %attempt.detail,
            retry_in_ms = at - now, "forwarding failed; will retry"
        ),
        Next::GiveUp => warn!(
            delivery = id, job, kind, attempts, detail = %attempt.detail,
            "forwarding given up"
        ),
    }
    if let Err(e) = store.record_delivery_attempt(id, attempt.ok, &attempt.detail, next, now) {
        warn!(delivery = id, error = %e, "forwarding: cannot record an attempt");
    }
}

/// Sends a confirmation code and notes the outcome on the rule. (Neither the code nor
/// the address goes to the log.)
async fn send_code(store: Store, senders: Arc<send::Senders>, code: CodeMessage) {
    let attempt = senders.send_code(&code).await;
    let destination = code.destination_id;
    let kind = code.kind.as_str();
    let note = if attempt.ok {
        info!(destination, kind, detail = %attempt.detail, "confirmation code sent");
        "Code sent.".to_string()
    } else {
        warn!(destination, kind, detail = %attempt.detail, "confirmation code not sent");
        format!("The code could not be sent: {}", attempt.detail)
    };
    if let Err(e) = store.note_code_result(destination, &note) {
        warn!(destination, error = %e, "forwarding: cannot note a code's sending");
    }
}
