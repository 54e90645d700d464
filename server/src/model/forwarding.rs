//! Forwarding's records as the forwarder (`crate::forward`), the console and the store
//! (`store::forwarding`) share them: the media and their daily limits, users' rules,
//! the codes that confirm them, and the deliveries of finished jobs' results. Pure:
//! what to send when is decided in `crate::forward`, the rows are kept in the store.

use std::time::Duration;

use serde::Serialize;

use herald_shared::Millis;

/// Job states that are forwarded: the ends of runs that happened (a browser service's
/// outcome makes its job `succeeded` or `failed`). Every one is final
/// ([`crate::model::JobState::is_final`]); a browser job's `waiting` is not, and is
/// forwarded once the page's outcome is in.
pub const FORWARDED_STATES: [&str; 4] = ["succeeded", "failed", "timed_out", "interrupted"];
/// Final states that are not forwarded: nothing ran (`refused`, whose reason the agent
/// writes; `expired`; `canceled`). Their jobs are only marked handled.
pub const UNFORWARDED_STATES: [&str; 3] = ["refused", "expired", "canceled"];

/// Forwarding rules one user may have.
pub const MAX_RULES: i64 = 5;
/// The window of the daily limits.
pub const DAILY_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// Why a delivery over the owner's daily limit is given up.
pub const DAILY_LIMIT_REACHED: &str = "daily limit reached";
/// How much of a job's standard output an e-mail or webhook carries.
pub const STDOUT_EXCERPT_BYTES: usize = 2048;

/// A destination medium.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// E-mail through `[smtp]`.
    Email,
    /// Signed JSON POST.
    Webhook,
    /// Text through the `[sms]` gateway.
    Sms,
}

impl Kind {
    /// Parses a `destinations.kind` value.
    pub fn parse(kind: &str) -> Option<Kind> {
        match kind {
            "email" => Some(Kind::Email),
            "webhook" => Some(Kind::Webhook),
            "sms" => Some(Kind::Sms),
            _ => None,
        }
    }

    /// The `destinations.kind` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Email => "email",
            Kind::Webhook => "webhook",
            Kind::Sms => "sms",
        }
    }

    /// Rules of this kind forward nothing until confirmed with a code sent through
    /// them. A webhook needs none: its owner controls the endpoint, and every request
    /// carries a signature under a secret only the owner was shown.
    pub fn needs_confirmation(self) -> bool {
        matches!(self, Kind::Email | Kind::Sms)
    }
}

/// How much one user may have forwarded in a day (the last 24 hours, codes included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DailyLimits {
    /// E-mails and webhook posts together (deliveries and confirmation codes).
    pub email_and_webhook: u32,
    /// SMS (deliveries and confirmation codes).
    pub sms: u32,
}

impl DailyLimits {
    /// The limits of a server that does not say otherwise.
    pub const DEFAULT: DailyLimits = DailyLimits {
        email_and_webhook: 200,
        sms: 20,
    };

    /// The limit that applies to a kind.
    pub fn cap(&self, kind: Kind) -> u32 {
        match kind {
            Kind::Email | Kind::Webhook => self.email_and_webhook,
            Kind::Sms => self.sms,
        }
    }
}

impl Default for DailyLimits {
    fn default() -> Self {
        DailyLimits::DEFAULT
    }
}

// === rules ===

/// A forwarding rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// Id.
    pub id: i64,
    /// Owner.
    pub user_id: i64,
    /// The subscription whose results it forwards (`None`: all of the user's).
    pub schedule_id: Option<i64>,
    /// The subscription's entry title, for display.
    pub subscription_title: Option<String>,
    /// `email`, `webhook` or `sms`.
    pub kind: String,
    /// Address, URL or phone number.
    pub target: String,
    /// Only failed runs are forwarded.
    pub only_failures: bool,
    /// Created.
    pub created_at: Millis,
    /// Confirmed (webhooks from the start); an unconfirmed rule forwards nothing.
    pub confirmed: bool,
    /// A code was asked for and is not sent yet.
    pub code_requested: bool,
    /// What became of the latest code ("Code sent.", why it was not sent).
    pub code_note: Option<String>,
    /// Until when the latest code may be entered.
    pub code_expires_at: Option<Millis>,
}

/// A new forwarding rule.
#[derive(Debug, Clone)]
pub struct NewDestination<'a> {
    /// Owner.
    pub user_id: i64,
    /// The subscription, or `None` for all.
    pub schedule_id: Option<i64>,
    /// `email`, `webhook` or `sms`.
    pub kind: &'a str,
    /// Address, URL or phone number (checked by the caller).
    pub target: &'a str,
    /// Webhook signing secret.
    pub secret: Option<&'a str>,
    /// Only failed runs.
    pub only_failures: bool,
}

/// A code to send, made by `Store::take_code_requests`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeMessage {
    /// The rule.
    pub destination_id: i64,
    /// Its owner.
    pub user_id: i64,
    /// `Email` or `Sms`.
    pub kind: Kind,
    /// Address or number.
    pub target: String,
    /// The code (kept nowhere else: the store has its hash).
    pub code: String,
}

// === deliveries ===

/// What one `Store::enqueue_deliveries` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Enqueued {
    /// Deliveries queued to be sent.
    pub queued: usize,
    /// Deliveries given up at once because their owner reached a daily limit:
    /// (delivery, job, kind).
    pub over_limit: Vec<(i64, i64, String)>,
}

/// A due delivery, with what the forwarder's fairness rules look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Delivery id.
    pub id: i64,
    /// Whose rule it goes out under.
    pub user: i64,
    /// Medium (`None`: unknown).
    pub kind: Option<Kind>,
    /// Address, URL or phone number.
    pub target: String,
}

/// A delivery ready to be sent.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Delivery id.
    pub id: i64,
    /// Medium (`None`: a kind this server does not know).
    pub kind: Option<Kind>,
    /// Address, URL or phone number.
    pub target: String,
    /// The rule's webhook secret. `None` with `rule_exists`: the rule has no secret.
    pub secret: Option<String>,
    /// The rule still exists (a user may delete it while deliveries are pending).
    pub rule_exists: bool,
    /// The rule is confirmed (a rule of a kind that needs it forwards nothing before).
    pub rule_confirmed: bool,
    /// Attempts made so far.
    pub attempts: u32,
    /// What to say.
    pub facts: Facts,
}

/// The facts about a finished job that every medium carries (the webhook's JSON body;
/// how each medium renders them is `crate::forward`'s).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Facts {
    /// Job id.
    pub job_id: i64,
    /// Agent id.
    pub agent_id: String,
    /// Device (agent) name.
    pub agent_name: String,
    /// Catalog entry title (or, for a job outside the catalog, what it does).
    pub entry: String,
    /// Final state (`succeeded`, `failed`, ...).
    pub state: String,
    /// Exit code, if the program exited.
    pub exit_code: Option<i32>,
    /// Failure or refusal reason.
    pub error: Option<String>,
    /// A browser service's outcome note.
    pub outcome: Option<String>,
    /// When the job finished (milliseconds since the Unix epoch).
    pub finished_at: Option<Millis>,
    /// The start of the standard output (at most [`STDOUT_EXCERPT_BYTES`], lossy UTF-8).
    pub stdout: String,
}

/// What follows an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Delivered: done.
    Sent,
    /// Failed: try again at this time.
    RetryAt(Millis),
    /// Failed for the last time (or for a reason retrying cannot fix).
    GiveUp,
}

/// The start of a job's output: at most `limit` bytes, cut at a character boundary.
pub fn excerpt(bytes: &[u8], limit: usize) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(limit)]);
    let mut text = text.into_owned();
    // A multi-byte character cut in half becomes one U+FFFD at the very end: drop it.
    if bytes.len() > limit && text.ends_with('\u{FFFD}') {
        text.pop();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excerpt_cuts_at_a_character_boundary() {
        let bytes = "aé".repeat(1000).into_bytes(); // 3 bytes per pair
        let text = excerpt(&bytes, 2048);
        assert!(text.len() <= 2048);
        assert!(!text.contains('\u{FFFD}'));
        assert!(bytes.starts_with(text.as_bytes()));
        assert_eq!(excerpt(b"short", 2048), "short");
    }
}
