//! Forwarding results to other media: when a job of a user's subscription ends, its
//! result goes to the user's forwarding rules (`destinations`): e-mail through the
//! `[smtp]` relay, a signed JSON webhook, or an SMS through the `[sms]` gateway.
//!
//! The forwarder is one task. It turns finished jobs into `deliveries` rows (one
//! transaction per batch, so a crash loses nothing and nothing is queued twice), then
//! sends due deliveries, each in its own task with a timeout and a bound on how many run
//! at once, so a slow or dead endpoint delays only its own deliveries. Every attempt is
//! recorded in `delivery_attempts`; a failure is retried with exponential backoff and
//! given up after `max_attempts`. It wakes on job events from the relay, at the next
//! retry time, and every few seconds as a safety net (for jobs finished by writers that
//! announce nothing).

mod message;
mod queue;
mod send;
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

use crate::config::{ServerConfig, SmsConfig, SmtpConfig, SmtpTls};
use crate::relay::JobEvent;
use crate::store::{Store, StoreError};

pub use message::{excerpt, Facts, SmsRequest, SmsTemplate, SMS_MAX_CHARS, STDOUT_EXCERPT_BYTES};
pub use queue::{
    backoff, enqueue, next_step, Attempt, Kind, Next, RetryPolicy, FORWARDED_STATES, MAX_BACKOFF,
};
pub use send::{is_public, signature, SIGNATURE_HEADER};

/// Deliveries sent at the same time.
pub const CONCURRENCY: usize = 16;
/// Scan for finished jobs and due retries at least this often.
pub const SCAN_INTERVAL: Duration = Duration::from_secs(5);
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
    /// Deliveries sent at the same time.
    pub concurrency: usize,
    /// Safety-net scan interval.
    pub scan_interval: Duration,
    /// The e-mail relay, if any.
    pub smtp: Option<SmtpConfig>,
    /// The SMS gateway, if any.
    pub sms: Option<SmsConfig>,
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
            concurrency: CONCURRENCY,
            scan_interval: SCAN_INTERVAL,
            smtp: config.smtp.clone(),
            sms: config.sms.clone(),
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
        for (name, value) in &sms.headers {
            reqwest::header::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("[sms] header name {name:?} is not valid"))?;
            reqwest::header::HeaderValue::from_str(value)
                .map_err(|_| format!("[sms] header {name} has a value that is not valid"))?;
        }
    }
    Ok(())
}

fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
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
    // Sends under way: task id -> delivery id.
    let mut in_flight: HashMap<tokio::task::Id, i64> = HashMap::new();
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut events_open = true;
    tokio::pin!(stop);
    loop {
        let wake = match scan(&store, &senders, &settings, &mut in_flight, &mut tasks) {
            Ok(wake) => wake,
            Err(e) => {
                warn!(error = %e, "forwarding: cannot read the delivery queue; retrying");
                Instant::now() + settings.scan_interval
            }
        };
        tokio::select! {
            _ = &mut stop => break,
            Some(done) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                let id = match done {
                    Ok((id, ())) => id,
                    Err(e) => {
                        warn!(error = %e, "forwarding: a delivery task failed");
                        e.id()
                    }
                };
                in_flight.remove(&id);
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
    if !tasks.is_empty() {
        let drain = async { while tasks.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, drain).await;
        tasks.abort_all();
    }
}

/// Queues finished jobs, starts due deliveries while there is room, and says when to
/// look again.
fn scan(
    store: &Store,
    senders: &Arc<send::Senders>,
    settings: &Settings,
    in_flight: &mut HashMap<tokio::task::Id, i64>,
    tasks: &mut JoinSet<()>,
) -> Result<Instant, StoreError> {
    let now = crate::now_ms();
    let queued = queue::enqueue(store, now)?;
    if queued > 0 {
        debug!(queued, "forwarding: results queued");
    }
    let room = settings.concurrency.saturating_sub(in_flight.len());
    if room > 0 {
        let due = queue::due(store, now, room + in_flight.len())?;
        let busy: Vec<i64> = in_flight.values().copied().collect();
        for delivery in due.into_iter().filter(|d| !busy.contains(d)).take(room) {
            let handle = tasks.spawn(deliver(
                store.clone(),
                senders.clone(),
                settings.retry,
                delivery,
            ));
            in_flight.insert(handle.id(), delivery);
        }
    }
    let mut wake = Instant::now() + settings.scan_interval;
    if let Some(at) = queue::next_due_after(store, now)? {
        wake = wake.min(Instant::now() + millis_until(now, at));
    }
    Ok(wake)
}

fn millis_until(now: Millis, at: Millis) -> Duration {
    Duration::from_millis(at.saturating_sub(now).max(0) as u64)
}

/// Makes one attempt at a delivery and records it.
async fn deliver(store: Store, senders: Arc<send::Senders>, policy: RetryPolicy, id: i64) {
    let out = match queue::load(&store, id) {
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
    if let Err(e) = queue::record(&store, id, &attempt, next, now) {
        warn!(delivery = id, error = %e, "forwarding: cannot record an attempt");
    }
}
