//! Push messages: what a sender signs, what an agent checks before keeping one, and the
//! reports an agent signs with its own key (receipts, block-list changes).
//!
//! A sender is delegated by the operator ([`SenderGrant`], an operator-signed
//! statement: "key K may sign messages as NAME"). A [`Message`] is signed by the sender
//! key and carries that grant inside its signed payload, so an agent can check the whole
//! chain with nothing but its pinned operator keys ([`open`]). The server stores and
//! relays messages; it can neither write one nor change one.
//!
//! What comes back is signed by the agent's identity key (the Ed25519 key of its TLS
//! certificate, which the server recorded at enrollment): a [`Receipt`] per state a
//! message reached on the machine, and a [`BlockChange`] per block or unblock. Anyone
//! holding the agent's enrolled key can verify them ([`SignedReport::verify`]); the
//! server cannot fake them.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::codec;
use crate::envelope::{check_browser_url, Audience, Envelope, PublicKey, Statement};
use crate::Millis;

/// Longest title, in bytes.
pub const MAX_TITLE: usize = 200;
/// Longest body, in bytes.
pub const MAX_BODY: usize = 4096;
/// Longest display name of a sender, in bytes.
pub const MAX_DISPLAY_NAME: usize = 100;
/// Longest collapse key, in bytes.
pub const MAX_COLLAPSE: usize = 64;
/// Longest a message may live (28 days).
pub const MAX_TTL_MS: i64 = 28 * 24 * 3_600_000;
/// How long a message lives unless the sender says otherwise (3 days).
pub const DEFAULT_TTL_MS: i64 = 3 * 24 * 3_600_000;
/// Longest reason a refusal receipt carries.
pub const MAX_REASON: usize = 500;

/// Prefix of every agent signature over a report, so it can never pass for a signature
/// over an envelope or another protocol's bytes.
const REPORT_CONTEXT: &[u8] = b"herald-report-v1\0";

/// The operator's delegation of a sender name to a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SenderGrant {
    /// The sender's name (`valid_name`), shown with its display name.
    pub sender: String,
    /// What people see as the sender (`Card Company`).
    pub display_name: String,
    /// The key that may sign messages as `sender`.
    pub key: PublicKey,
    /// Whether its messages may be marked as advertising.
    pub advertising: bool,
    /// When the operator signed it.
    pub issued_at: Millis,
}

impl SenderGrant {
    /// Checks the fields as the CLI accepts them.
    pub fn validate(&self) -> Result<(), String> {
        if !crate::valid_name(&self.sender) {
            return Err(format!(
                "invalid sender name {:?}: use 1 to 64 of letters, digits, '.', '_' and '-'",
                self.sender
            ));
        }
        let name = self.display_name.trim();
        if name.is_empty() || self.display_name.len() > MAX_DISPLAY_NAME {
            return Err(format!(
                "the display name must be 1 to {MAX_DISPLAY_NAME} bytes"
            ));
        }
        if self.display_name.chars().any(char::is_control) {
            return Err("the display name contains control characters".into());
        }
        Ok(())
    }
}

/// How a notification is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Priority {
    /// An ordinary notice.
    Normal,
    /// Shown as urgent (a disaster warning, a fraud alert).
    High,
}

impl Priority {
    /// Stored and shown spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Normal => "normal",
            Priority::High => "high",
        }
    }
}

impl std::str::FromStr for Priority {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "normal" => Ok(Priority::Normal),
            "high" => Ok(Priority::High),
            other => Err(format!("invalid priority {other:?}: use normal or high")),
        }
    }
}

/// A message, as its sender signs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Random id; agents keep each id once (replay) and receipts name it.
    pub id: [u8; 16],
    /// The sender name; must be the one the grant names.
    pub sender: String,
    /// Who it is for.
    pub audience: Audience,
    /// Short title (at most [`MAX_TITLE`] bytes).
    pub title: String,
    /// Text (at most [`MAX_BODY`] bytes).
    pub body: String,
    /// How it is shown.
    pub priority: Priority,
    /// When the sender signed it.
    pub issued_at: Millis,
    /// Not kept or shown after this time (at most [`MAX_TTL_MS`] after `issued_at`).
    pub expires_at: Millis,
    /// A newer message with the same sender and collapse key replaces the older one.
    pub collapse: Option<String>,
    /// Marked as advertising: shown with that prefix, held during quiet hours, and only
    /// from senders whose grant allows it.
    pub advertising: bool,
    /// Optional page to open (`https:`).
    pub link: Option<String>,
    /// The operator's signed [`SenderGrant`] for the signing key.
    pub grant: Envelope,
}

impl Message {
    /// Checks the limits a sender must keep; the CLI and the API refuse a message that
    /// breaks one, and an agent refuses it too.
    pub fn validate(&self) -> Result<(), String> {
        if self.title.trim().is_empty() {
            return Err("the title is empty".into());
        }
        if self.title.len() > MAX_TITLE {
            return Err(format!(
                "the title is {} bytes; at most {MAX_TITLE}",
                self.title.len()
            ));
        }
        if self.body.len() > MAX_BODY {
            return Err(format!(
                "the body is {} bytes; at most {MAX_BODY} (4 KiB)",
                self.body.len()
            ));
        }
        if self.title.chars().any(char::is_control) {
            return Err("the title contains control characters".into());
        }
        let ttl = self.expires_at.saturating_sub(self.issued_at);
        if ttl <= 0 || ttl > MAX_TTL_MS {
            return Err("the message must expire within 28 days of being signed".into());
        }
        if let Some(key) = &self.collapse {
            if !crate::valid_name(key) {
                return Err(format!(
                    "invalid collapse key {key:?}: use 1 to {MAX_COLLAPSE} of letters, digits, '.', '_' and '-'"
                ));
            }
        }
        if let Some(link) = &self.link {
            check_browser_url(link).map_err(|e| format!("link: {e}"))?;
        }
        Ok(())
    }

    /// The id as hex, as listed and stored.
    pub fn id_hex(&self) -> String {
        hex::encode(self.id)
    }
}

/// SHA-256 of a message envelope's signed payload: what receipts name, so a receipt
/// proves which exact message reached the machine.
pub fn message_hash(envelope: &Envelope) -> [u8; 32] {
    sha2::Sha256::digest(&envelope.payload).into()
}

/// Why a message is not kept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageRefusal {
    /// Signature, grant or encoding wrong, or limits broken.
    #[error("invalid message: {0}")]
    Invalid(String),
    /// The sender is not one the operator delegated with this key.
    #[error("sender not delegated by the operator: {0}")]
    Undelegated(String),
    /// Marked advertising by a sender not allowed to.
    #[error("sender {0} may not send advertising")]
    Advertising(String),
    /// For other agents.
    #[error("not addressed to this agent ({0})")]
    NotForMe(String),
    /// The person blocked this sender.
    #[error("blocked")]
    Blocked,
}

/// A message that verified: its statement and the grant that allowed it.
#[derive(Debug, Clone)]
pub struct Opened {
    /// The message.
    pub message: Message,
    /// The operator's grant for its sender.
    pub grant: SenderGrant,
}

/// Checks a message envelope's chain: the grant is signed by one of `operator_keys`,
/// the envelope by the granted key, the sender name and advertising flag are what the
/// grant allows, and the limits hold. Audience, expiry, replay and the block list are
/// the agent's next checks ([`Opened::check`]).
pub fn open(envelope: &Envelope, operator_keys: &[PublicKey]) -> Result<Opened, MessageRefusal> {
    let invalid = |e: &dyn std::fmt::Display| MessageRefusal::Invalid(e.to_string());
    let Statement::Message(unverified) = envelope.peek().map_err(|e| invalid(&e))? else {
        return Err(MessageRefusal::Invalid("not a message".into()));
    };
    let grant = match unverified.grant.open(operator_keys) {
        Ok(Statement::Sender(grant)) => grant,
        Ok(_) => {
            return Err(MessageRefusal::Undelegated(
                "the grant is not a sender grant".into(),
            ))
        }
        Err(e) => return Err(MessageRefusal::Undelegated(format!("grant: {e}"))),
    };
    if envelope.signer != grant.key {
        return Err(MessageRefusal::Undelegated(format!(
            "signed by a key the operator did not grant to sender {}",
            grant.sender
        )));
    }
    let Statement::Message(message) = envelope.open(&[grant.key]).map_err(|e| invalid(&e))? else {
        return Err(MessageRefusal::Invalid("not a message".into()));
    };
    if message.sender != grant.sender {
        return Err(MessageRefusal::Undelegated(format!(
            "the key is granted to sender {}, not {}",
            grant.sender, message.sender
        )));
    }
    if message.advertising && !grant.advertising {
        return Err(MessageRefusal::Advertising(message.sender));
    }
    message.validate().map_err(|e| invalid(&e))?;
    Ok(Opened { message, grant })
}

/// What an agent decides about a message that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Keep it (store it in the inbox and notify).
    Keep,
    /// Seen before (a replay or redelivery): do nothing new.
    Seen,
    /// Past its expiry: not kept; an `expired` receipt goes back.
    Expired,
    /// Not kept; a `refused` receipt with the reason goes back.
    Refuse(MessageRefusal),
}

impl Opened {
    /// The agent's checks after the signatures: audience (its id, its verified groups,
    /// or all), whether it saw this id before, expiry, and its block list.
    pub fn check(
        &self,
        agent_id: &str,
        groups: &[String],
        now: Millis,
        seen: bool,
        blocked: bool,
    ) -> Verdict {
        let m = &self.message;
        let addressed = match &m.audience {
            Audience::Agent(id) => id == agent_id,
            Audience::Group(group) => groups.iter().any(|g| g == group),
            Audience::All => true,
        };
        if !addressed {
            return Verdict::Refuse(MessageRefusal::NotForMe(m.audience.to_string()));
        }
        if seen {
            return Verdict::Seen;
        }
        if now > m.expires_at {
            return Verdict::Expired;
        }
        if blocked {
            return Verdict::Refuse(MessageRefusal::Blocked);
        }
        Verdict::Keep
    }
}

/// The states a receipt reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReceiptState {
    /// Kept in the inbox.
    Stored,
    /// The notification was shown.
    Displayed,
    /// The person opened it (only if the agent's `read_receipts` is on).
    Read,
    /// Not kept, and why.
    Refused(String),
    /// Arrived after its expiry.
    Expired,
}

impl ReceiptState {
    /// Stored and listed spelling (without the reason).
    pub fn as_str(&self) -> &'static str {
        match self {
            ReceiptState::Stored => "stored",
            ReceiptState::Displayed => "displayed",
            ReceiptState::Read => "read",
            ReceiptState::Refused(_) => "refused",
            ReceiptState::Expired => "expired",
        }
    }

    /// A refusal's reason.
    pub fn reason(&self) -> Option<&str> {
        match self {
            ReceiptState::Refused(reason) => Some(reason),
            _ => None,
        }
    }
}

/// What an agent says happened to a message on its machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The message.
    pub message_id: [u8; 16],
    /// [`message_hash`] of the envelope the agent received.
    pub message_hash: [u8; 32],
    /// The agent (derived from the signing key; checked by verifiers).
    pub agent_id: String,
    /// What happened.
    pub state: ReceiptState,
    /// When, by the agent's guarded clock.
    pub at: Millis,
}

/// A block or unblock on an agent, reported so the server can skip blocked recipients
/// and tell the sender; the agent's own list stays the truth.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockChange {
    /// The agent.
    pub agent_id: String,
    /// The sender name.
    pub sender: String,
    /// Blocked (true) or unblocked (false).
    pub blocked: bool,
    /// Who asked: `local` (the person at the machine), `notification` (the action on a
    /// notice) or `console` (a console user's request the agent applied).
    pub by: String,
    /// When, by the agent's guarded clock.
    pub at: Millis,
}

/// What an agent signs and reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Report {
    /// A message's state on the machine.
    Receipt(Receipt),
    /// A change of the block list.
    Block(BlockChange),
    /// One end's signed counters of a tunnel session (for billing).
    Usage(crate::peers::SessionUsage),
}

impl Report {
    /// The agent the report claims to be from.
    pub fn agent_id(&self) -> &str {
        match self {
            Report::Receipt(r) => &r.agent_id,
            Report::Block(b) => &b.agent_id,
            Report::Usage(u) => &u.agent_id,
        }
    }
}

/// A report and the agent's signature over its exact bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedReport {
    /// bincode of a [`Report`].
    pub payload: Vec<u8>,
    /// Ed25519 signature by the agent's identity key (64 bytes).
    pub signature: Vec<u8>,
}

/// Largest report payload.
pub const MAX_REPORT: usize = 4096;

/// Errors verifying a report.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    /// Not a valid Ed25519 public key.
    #[error("the agent key is not a valid Ed25519 key")]
    BadKey,
    /// The signature does not verify.
    #[error("the signature does not verify")]
    BadSignature,
    /// The payload does not decode or is too large.
    #[error("the report does not decode: {0}")]
    Codec(String),
    /// Signed by the right key but naming another agent.
    #[error("the report names agent {claimed}, but the key is agent {actual}'s")]
    WrongAgent {
        /// In the report.
        claimed: String,
        /// Derived from the key.
        actual: String,
    },
}

impl SignedReport {
    /// Signs `report` with an agent's identity key.
    pub fn sign(key: &SigningKey, report: &Report) -> SignedReport {
        let payload = codec::to_bytes(report).expect("reports always encode");
        let signature = key.sign(&report_bytes(&payload)).to_bytes().to_vec();
        SignedReport { payload, signature }
    }

    /// Checks the signature against the agent's raw Ed25519 public key (as enrolled),
    /// and that the report names the agent that key belongs to.
    pub fn verify(&self, public_key: &[u8]) -> Result<Report, ReportError> {
        let key: [u8; 32] = public_key.try_into().map_err(|_| ReportError::BadKey)?;
        let key = VerifyingKey::from_bytes(&key).map_err(|_| ReportError::BadKey)?;
        let signature =
            Signature::from_slice(&self.signature).map_err(|_| ReportError::BadSignature)?;
        key.verify_strict(&report_bytes(&self.payload), &signature)
            .map_err(|_| ReportError::BadSignature)?;
        let report = self.peek()?;
        let actual = crate::agent_id(public_key);
        if report.agent_id() != actual {
            return Err(ReportError::WrongAgent {
                claimed: report.agent_id().to_string(),
                actual,
            });
        }
        Ok(report)
    }

    /// Decodes without checking the signature (for listing what is stored).
    pub fn peek(&self) -> Result<Report, ReportError> {
        codec::from_bytes(&self.payload, MAX_REPORT).map_err(|e| ReportError::Codec(e.to_string()))
    }
}

fn report_bytes(payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(REPORT_CONTEXT.len() + payload.len());
    bytes.extend_from_slice(REPORT_CONTEXT);
    bytes.extend_from_slice(payload);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::OperatorKey;

    const NOW: Millis = 1_700_000_000_000;

    fn grant(operator: &OperatorKey, sender: &OperatorKey, name: &str, ads: bool) -> Envelope {
        operator
            .sign(&Statement::Sender(SenderGrant {
                sender: name.into(),
                display_name: "Card Company".into(),
                key: sender.public(),
                advertising: ads,
                issued_at: NOW,
            }))
            .unwrap()
    }

    fn message(grant: Envelope, name: &str) -> Message {
        Message {
            id: [1; 16],
            sender: name.into(),
            audience: Audience::All,
            title: "Payment due".into(),
            body: "Your card payment is due on Friday.".into(),
            priority: Priority::Normal,
            issued_at: NOW,
            expires_at: NOW + DEFAULT_TTL_MS,
            collapse: None,
            advertising: false,
            link: None,
            grant,
        }
    }

    fn keys() -> (OperatorKey, OperatorKey) {
        (
            OperatorKey::from_seed([1; 32]),
            OperatorKey::from_seed([2; 32]),
        )
    }

    #[test]
    fn a_message_opens_with_the_operator_key_alone() {
        let (operator, sender) = keys();
        let m = message(grant(&operator, &sender, "card", false), "card");
        let envelope = sender.sign(&Statement::Message(m.clone())).unwrap();
        let opened = open(&envelope, &[operator.public()]).unwrap();
        assert_eq!(opened.message, m);
        assert_eq!(opened.grant.sender, "card");
        assert_eq!(opened.check("a1", &[], NOW, false, false), Verdict::Keep);
        assert_eq!(
            opened.check("a1", &[], NOW, false, true),
            Verdict::Refuse(MessageRefusal::Blocked)
        );
        assert_eq!(opened.check("a1", &[], NOW, true, false), Verdict::Seen);
        assert_eq!(
            opened.check("a1", &[], NOW + DEFAULT_TTL_MS + 1, false, false),
            Verdict::Expired
        );
    }

    #[test]
    fn foreign_or_forged_senders_are_refused() {
        let (operator, sender) = keys();
        let stranger = OperatorKey::from_seed([3; 32]);
        // A grant signed by someone other than the operator.
        let m = message(grant(&stranger, &sender, "card", false), "card");
        let envelope = sender.sign(&Statement::Message(m)).unwrap();
        assert!(matches!(
            open(&envelope, &[operator.public()]),
            Err(MessageRefusal::Undelegated(_))
        ));
        // A real grant, but the message signed by another key.
        let m = message(grant(&operator, &sender, "card", false), "card");
        let envelope = stranger.sign(&Statement::Message(m)).unwrap();
        assert!(matches!(
            open(&envelope, &[operator.public()]),
            Err(MessageRefusal::Undelegated(_))
        ));
        // A real grant for another name.
        let m = message(grant(&operator, &sender, "card", false), "bank");
        let envelope = sender.sign(&Statement::Message(m)).unwrap();
        assert!(matches!(
            open(&envelope, &[operator.public()]),
            Err(MessageRefusal::Undelegated(_))
        ));
        // Altered after signing.
        let m = message(grant(&operator, &sender, "card", false), "card");
        let mut envelope = sender.sign(&Statement::Message(m)).unwrap();
        let last = envelope.payload.len() - 1;
        envelope.payload[last] ^= 1;
        assert!(open(&envelope, &[operator.public()]).is_err());
    }

    #[test]
    fn advertising_needs_the_grant_to_allow_it() {
        let (operator, sender) = keys();
        let mut m = message(grant(&operator, &sender, "card", false), "card");
        m.advertising = true;
        let envelope = sender.sign(&Statement::Message(m.clone())).unwrap();
        assert_eq!(
            open(&envelope, &[operator.public()]).unwrap_err(),
            MessageRefusal::Advertising("card".into())
        );
        m.grant = grant(&operator, &sender, "card", true);
        let envelope = sender.sign(&Statement::Message(m)).unwrap();
        assert!(open(&envelope, &[operator.public()]).is_ok());
    }

    #[test]
    fn limits_are_checked() {
        let (operator, sender) = keys();
        let good = message(grant(&operator, &sender, "card", false), "card");
        assert_eq!(good.validate(), Ok(()));
        type Change = Box<dyn Fn(&mut Message)>;
        let cases: Vec<(Change, &str)> = vec![
            (
                Box::new(|m| m.title = "x".repeat(MAX_TITLE + 1)),
                "title is 201 bytes",
            ),
            (Box::new(|m| m.title = " ".into()), "title is empty"),
            (
                Box::new(|m| m.body = "x".repeat(MAX_BODY + 1)),
                "at most 4096",
            ),
            (
                Box::new(|m| m.expires_at = m.issued_at + MAX_TTL_MS + 1),
                "28 days",
            ),
            (
                Box::new(|m| m.collapse = Some("a b".into())),
                "collapse key",
            ),
            (
                Box::new(|m| m.link = Some("http://evil.example/".into())),
                "link:",
            ),
        ];
        for (change, wanted) in cases {
            let mut m = good.clone();
            change(&mut m);
            let error = m.validate().unwrap_err();
            assert!(error.contains(wanted), "{error} lacks {wanted}");
        }
    }

    #[test]
    fn reports_verify_against_the_agent_key_only() {
        let key = SigningKey::from_bytes(&[9; 32]);
        let public = key.verifying_key().to_bytes();
        let agent = crate::agent_id(&public);
        let report = Report::Receipt(Receipt {
            message_id: [1; 16],
            message_hash: [2; 32],
            agent_id: agent.clone(),
            state: ReceiptState::Stored,
            at: NOW,
        });
        let signed = SignedReport::sign(&key, &report);
        assert_eq!(signed.verify(&public), Ok(report));
        let other = SigningKey::from_bytes(&[8; 32]).verifying_key().to_bytes();
        assert_eq!(signed.verify(&other), Err(ReportError::BadSignature));
        let mut altered = signed.clone();
        altered.payload[0] ^= 1;
        assert!(altered.verify(&public).is_err());
        // Signed by the right key, but naming someone else.
        let lie = SignedReport::sign(
            &key,
            &Report::Block(BlockChange {
                agent_id: "someone-else".into(),
                sender: "card".into(),
                blocked: false,
                by: "local".into(),
                at: NOW,
            }),
        );
        assert!(matches!(
            lie.verify(&public),
            Err(ReportError::WrongAgent { .. })
        ));
    }
}
