//! Signed envelopes: what the operator key signs and what an agent checks before acting.
//!
//! The server stores and forwards [`Envelope`]s but cannot create them: only the holder of
//! the operator key can. An agent accepts an envelope only if it is signed by a key it
//! pinned at enrollment, over the exact bytes it carries, and then checks audience,
//! validity window and replay (see [`Order::check`]).

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::codec::{self, CodecError};
use crate::Millis;

/// Prefix mixed into every signature so a Herald signature can never be replayed as a
/// signature over some other protocol's bytes.
pub const SIGNING_CONTEXT: &[u8] = b"herald-envelope-v1\0";

/// Largest payload an envelope may carry.
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// Operator or vendor public key (Ed25519).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// Lower-case hex form, as written in configuration and tokens.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses the hex form.
    pub fn from_hex(s: &str) -> Result<Self, EnvelopeError> {
        let bytes = hex::decode(s.trim()).map_err(|_| EnvelopeError::BadKey)?;
        let key: [u8; 32] = bytes.try_into().map_err(|_| EnvelopeError::BadKey)?;
        VerifyingKey::from_bytes(&key).map_err(|_| EnvelopeError::BadKey)?;
        Ok(PublicKey(key))
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({})", &self.to_hex()[..16])
    }
}

/// The operator's signing key. Lives with the administrator's CLI, never needed by the
/// server process.
pub struct OperatorKey(SigningKey);

/// A vendor's signing key: the same kind of key, delegated by the operator for named
/// packages.
pub type VendorKey = OperatorKey;

impl OperatorKey {
    /// Builds the key from its 32-byte seed.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        OperatorKey(SigningKey::from_bytes(&seed))
    }

    /// Parses the hex seed stored in the key file.
    pub fn from_hex(s: &str) -> Result<Self, EnvelopeError> {
        let bytes = hex::decode(s.trim()).map_err(|_| EnvelopeError::BadKey)?;
        let seed: [u8; 32] = bytes.try_into().map_err(|_| EnvelopeError::BadKey)?;
        Ok(Self::from_seed(seed))
    }

    /// The hex seed, for the key file.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0.to_bytes())
    }

    /// The public half, pinned by agents.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key().to_bytes())
    }

    /// Signs a statement into an envelope.
    pub fn sign(&self, statement: &Statement) -> Result<Envelope, EnvelopeError> {
        let payload = codec::to_bytes(statement)?;
        if payload.len() > MAX_PAYLOAD {
            return Err(EnvelopeError::TooLarge(payload.len()));
        }
        let signature = self.0.sign(&signed_bytes(&payload));
        Ok(Envelope {
            signer: self.public(),
            payload,
            signature: signature.to_bytes().to_vec(),
        })
    }
}

fn signed_bytes(payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(SIGNING_CONTEXT.len() + payload.len());
    bytes.extend_from_slice(SIGNING_CONTEXT);
    bytes.extend_from_slice(payload);
    bytes
}

/// A signed statement as stored by the server and carried to agents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Which key signed (must be one the verifier pins; the field only selects it).
    pub signer: PublicKey,
    /// bincode of a [`Statement`]; the signature covers exactly these bytes.
    pub payload: Vec<u8>,
    /// Ed25519 signature (64 bytes).
    pub signature: Vec<u8>,
}

impl Envelope {
    /// Checks the signature against the pinned keys and decodes the statement.
    pub fn open(&self, trusted: &[PublicKey]) -> Result<Statement, EnvelopeError> {
        if !trusted.contains(&self.signer) {
            return Err(EnvelopeError::UntrustedSigner);
        }
        if self.payload.len() > MAX_PAYLOAD {
            return Err(EnvelopeError::TooLarge(self.payload.len()));
        }
        let key = VerifyingKey::from_bytes(&self.signer.0).map_err(|_| EnvelopeError::BadKey)?;
        let signature =
            Signature::from_slice(&self.signature).map_err(|_| EnvelopeError::BadSignature)?;
        key.verify_strict(&signed_bytes(&self.payload), &signature)
            .map_err(|_| EnvelopeError::BadSignature)?;
        Ok(codec::from_bytes(&self.payload, MAX_PAYLOAD)?)
    }

    /// Decodes the statement *without* checking the signature. Only for the server, which
    /// needs to read what it stores and relays but whose reading grants nothing.
    pub fn peek(&self) -> Result<Statement, EnvelopeError> {
        Ok(codec::from_bytes(&self.payload, MAX_PAYLOAD)?)
    }
}

/// What the operator key can sign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Statement {
    /// An action for agents: a one-off job or the standing action of a schedule.
    Order(Order),
    /// The groups one agent belongs to (replaces earlier memberships).
    Membership(Membership),
    /// A grant of package names to a vendor key.
    Delegation(crate::release::Delegation),
    /// Release metadata (signed by a delegated vendor key, or by the operator).
    Release(crate::release::Release),
    /// A grant of a sender name to a key (operator-signed).
    Sender(crate::message::SenderGrant),
    /// A push message (signed by a granted sender key).
    Message(crate::message::Message),
}

/// Who an order is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Audience {
    /// One agent, by id.
    Agent(String),
    /// Every agent in a group.
    Group(String),
    /// Every agent.
    All,
}

impl std::fmt::Display for Audience {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Audience::Agent(id) => write!(f, "agent:{id}"),
            Audience::Group(g) => write!(f, "group:{g}"),
            Audience::All => f.write_str("all"),
        }
    }
}

impl std::str::FromStr for Audience {
    type Err = String;

    /// Parses `agent:<id>`, `group:<name>` or `all`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("invalid target {s:?}: use agent:<id or name>, group:<name> or all");
        if s == "all" {
            return Ok(Audience::All);
        }
        let (kind, name) = s.split_once(':').ok_or_else(bad)?;
        if !crate::valid_name(name) {
            return Err(bad());
        }
        match kind {
            "agent" => Ok(Audience::Agent(name.to_string())),
            "group" => Ok(Audience::Group(name.to_string())),
            _ => Err(bad()),
        }
    }
}

/// Whether an order may run once or repeatedly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Repeat {
    /// A one-off job: its id may be acted on once per agent (replay cache).
    Once,
    /// A schedule's standing action: the server decides when, but never more often than
    /// every `min_interval_ms`, enforced by the agent.
    Standing {
        /// Minimum time between two runs on one agent.
        min_interval_ms: u64,
    },
}

/// A signed order: what to do, for whom, and when it is valid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// Random id, unique per order; the replay cache and interval checks key on it.
    pub id: [u8; 16],
    /// Who may act on it.
    pub audience: Audience,
    /// When the operator signed it.
    pub issued_at: Millis,
    /// Not valid before this time.
    pub not_before: Millis,
    /// Not valid after this time.
    pub not_after: Millis,
    /// Once or standing.
    pub repeat: Repeat,
    /// What to do.
    pub action: Action,
}

/// What an agent can be asked to do. Further kinds (browser services, updates, messages)
/// join as new variants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// Run an installed program (the seed's *standalone* service type).
    Run(RunSpec),
    /// Install a package release (the server attaches the signed metadata).
    Install(InstallSpec),
    /// Switch a package back to the version installed before the current one.
    Revert {
        /// Package name.
        package: String,
    },
    /// Open a service page in the browser of the person at the machine (the seed's
    /// *browser* service type). The agent hands it to the user-session helper.
    Open(OpenSpec),
}

/// A browser service: the page to open. The agent opens only `https:` URLs, or `http:`
/// to loopback for development ([`check_browser_url`]); it appends a one-time ticket the
/// server attaches to the signal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenSpec {
    /// The service page.
    pub url: String,
    /// How long the person has to complete the page before the job times out.
    pub timeout_ms: u64,
}

impl Action {
    /// Short kind name, for policy and display.
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Run(_) => "run",
            Action::Install(_) => "install",
            Action::Revert { .. } => "revert",
            Action::Open(_) => "open",
        }
    }

    /// One-line description for listings.
    pub fn describe(&self) -> String {
        match self {
            Action::Run(run) => {
                let mut text = run.program.clone();
                for arg in &run.args {
                    text.push(' ');
                    text.push_str(arg);
                }
                text
            }
            Action::Install(spec) => match &spec.version {
                Some(version) => format!("install {} {version}", spec.package),
                None => format!("install {} (latest)", spec.package),
            },
            Action::Revert { package } => format!("revert {package}"),
            Action::Open(open) => format!("open {}", open.url),
        }
    }
}

/// What an install order allows: a package, optionally pinned to one version. Without a
/// version the order is a standing subscription: any newer release of the package that
/// verifies may be installed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallSpec {
    /// Package name.
    pub package: String,
    /// Exact version, or `None` for the latest published.
    pub version: Option<String>,
    /// Limit for download plus install command.
    pub timeout_ms: u64,
}

/// A standalone program run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSpec {
    /// Absolute path of the program; no shell is involved.
    pub program: String,
    /// Arguments.
    pub args: Vec<String>,
    /// Wall-clock limit for the whole run.
    pub timeout_ms: u64,
    /// User to run as (only honoured when the agent runs as root).
    pub run_as: Option<String>,
}

/// Whether an agent may open `url` in a browser: `https:` to any host, or `http:` to a
/// loopback host (`localhost`, `127.0.0.0/8`, `[::1]`) for development. URLs with user
/// info (`http://127.0.0.1@elsewhere/`), whitespace or control characters are refused,
/// so what is checked is what the browser will load.
pub fn check_browser_url(url: &str) -> Result<(), String> {
    if url.len() > 2048 {
        return Err("URL longer than 2048 bytes".into());
    }
    if url.bytes().any(|b| b <= b' ' || b == 0x7f || b == b'\\') {
        return Err(format!(
            "URL {url:?} contains whitespace, control characters or backslashes"
        ));
    }
    let lower = url.to_ascii_lowercase();
    let (rest, https) = if let Some(rest) = lower.strip_prefix("https://") {
        (rest, true)
    } else if let Some(rest) = lower.strip_prefix("http://") {
        (rest, false)
    } else {
        return Err(format!("URL {url:?} is not https: (or http: to loopback)"));
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        return Err(format!("URL {url:?} carries user info; refused"));
    }
    let host = if let Some(bracketed) = authority.strip_prefix('[') {
        match bracketed.split_once(']') {
            Some((host, port)) if port.is_empty() || port.starts_with(':') => host,
            _ => return Err(format!("URL {url:?} has a malformed host")),
        }
    } else {
        authority.split(':').next().unwrap_or_default()
    };
    if host.is_empty() {
        return Err(format!("URL {url:?} has no host"));
    }
    if https {
        return Ok(());
    }
    if crate::url::is_loopback_host(host) {
        Ok(())
    } else {
        Err(format!(
            "URL {url:?} is plain http: to a host that is not loopback; only https: is allowed"
        ))
    }
}

/// The groups an agent belongs to, signed so a hostile server cannot widen an order's
/// reach by inventing memberships.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    /// Agent id.
    pub agent_id: String,
    /// All groups of that agent.
    pub groups: Vec<String>,
    /// Later memberships replace earlier ones.
    pub issued_at: Millis,
}

/// Why an agent refuses an order. The text is reported to the server.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The order names other agents.
    #[error("not addressed to this agent ({0})")]
    NotForMe(String),
    /// Before `not_before`.
    #[error("not valid yet")]
    NotYetValid,
    /// After `not_after`.
    #[error("expired")]
    Expired,
    /// A one-off order already acted on.
    #[error("replayed order")]
    Replayed,
    /// A standing order fired again sooner than its minimum interval.
    #[error("too soon: standing order ran {since_ms} ms ago, minimum interval {min_ms} ms")]
    TooSoon {
        /// Time since the last run.
        since_ms: i64,
        /// Minimum interval the operator signed.
        min_ms: u64,
    },
    /// Disabled or disallowed by the agent's local policy.
    #[error("refused by local policy: {0}")]
    Policy(String),
    /// Envelope invalid (signature, signer, encoding).
    #[error("invalid envelope: {0}")]
    Invalid(String),
    /// The release an install order carries is refused.
    #[error("{0}")]
    Release(String),
}

/// What the agent knows when checking an order's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum History {
    /// Never acted on this order id.
    Unseen,
    /// Acted on it last at this time.
    LastRun(Millis),
}

impl Order {
    /// Decides whether an agent may act on this order. Pure: the agent supplies its id,
    /// its verified groups, the time (already guarded against clock steps) and what its
    /// replay cache says about this order id.
    pub fn check(
        &self,
        agent_id: &str,
        groups: &[String],
        now: Millis,
        history: History,
    ) -> Result<(), Refusal> {
        let addressed = match &self.audience {
            Audience::Agent(id) => id == agent_id,
            Audience::Group(group) => groups.iter().any(|g| g == group),
            Audience::All => true,
        };
        if !addressed {
            return Err(Refusal::NotForMe(self.audience.to_string()));
        }
        if now < self.not_before {
            return Err(Refusal::NotYetValid);
        }
        if now > self.not_after {
            return Err(Refusal::Expired);
        }
        match (self.repeat, history) {
            (_, History::Unseen) => Ok(()),
            (Repeat::Once, History::LastRun(_)) => Err(Refusal::Replayed),
            (Repeat::Standing { min_interval_ms }, History::LastRun(last)) => {
                let since_ms = now.saturating_sub(last);
                if since_ms < min_interval_ms as i64 {
                    Err(Refusal::TooSoon {
                        since_ms,
                        min_ms: min_interval_ms,
                    })
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// Errors opening or creating envelopes.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    /// Signed by a key this agent does not pin.
    #[error("signed by a key that is not trusted")]
    UntrustedSigner,
    /// The signature does not verify over the payload.
    #[error("signature does not verify")]
    BadSignature,
    /// A key is not valid Ed25519 (or not 32 bytes of hex).
    #[error("not a valid Ed25519 key")]
    BadKey,
    /// The payload exceeds [`MAX_PAYLOAD`].
    #[error("payload of {0} bytes is too large")]
    TooLarge(usize),
    /// The payload does not decode.
    #[error(transparent)]
    Codec(#[from] CodecError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(audience: Audience, repeat: Repeat) -> Order {
        Order {
            id: [7; 16],
            audience,
            issued_at: 1_000,
            not_before: 1_000,
            not_after: 10_000,
            repeat,
            action: Action::Run(RunSpec {
                program: "/bin/true".into(),
                args: vec![],
                timeout_ms: 1000,
                run_as: None,
            }),
        }
    }

    #[test]
    fn browser_urls_must_be_https_or_loopback_http() {
        for good in [
            "https://herald.example/service/x?a=b",
            "https://10.0.0.1:8443/",
            "http://127.0.0.1:8080/service/checkin",
            "http://localhost/",
            "http://[::1]:9/x",
            "HTTP://127.1.2.3/",
        ] {
            assert_eq!(check_browser_url(good), Ok(()), "{good}");
        }
        for bad in [
            "http://example.com/",
            "http://10.0.0.1/",
            "http://127.0.0.1@evil.example/",
            "https://user:pw@host/",
            "file:///etc/passwd",
            "javascript:alert(1)",
            "ftp://127.0.0.1/",
            "https:///nohost",
            "http://[::1/",
            "https://host/ with space",
            "http://localhost.evil.example/",
            "http://127.0.0.1\\@evil.example/",
        ] {
            assert!(check_browser_url(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn signed_envelope_opens_with_the_pinned_key() {
        let key = OperatorKey::from_seed([1; 32]);
        let statement = Statement::Order(order(Audience::All, Repeat::Once));
        let envelope = key.sign(&statement).unwrap();
        assert_eq!(envelope.open(&[key.public()]).unwrap(), statement);
    }

    #[test]
    fn tampered_payload_is_rejected() {
        let key = OperatorKey::from_seed([1; 32]);
        let mut envelope = key
            .sign(&Statement::Order(order(Audience::All, Repeat::Once)))
            .unwrap();
        let last = envelope.payload.len() - 1;
        envelope.payload[last] ^= 1;
        assert!(matches!(
            envelope.open(&[key.public()]),
            Err(EnvelopeError::BadSignature)
        ));
    }

    #[test]
    fn other_signer_is_rejected_even_if_named() {
        let operator = OperatorKey::from_seed([1; 32]);
        let intruder = OperatorKey::from_seed([2; 32]);
        let mut envelope = intruder
            .sign(&Statement::Order(order(Audience::All, Repeat::Once)))
            .unwrap();
        assert!(matches!(
            envelope.open(&[operator.public()]),
            Err(EnvelopeError::UntrustedSigner)
        ));
        // Claiming to be the operator does not help: the signature does not verify.
        envelope.signer = operator.public();
        assert!(matches!(
            envelope.open(&[operator.public()]),
            Err(EnvelopeError::BadSignature)
        ));
    }

    #[test]
    fn audience_window_and_replay_are_checked() {
        let groups = vec!["web".to_string()];
        let for_other = order(Audience::Agent("b".into()), Repeat::Once);
        assert!(matches!(
            for_other.check("a", &groups, 2_000, History::Unseen),
            Err(Refusal::NotForMe(_))
        ));
        let for_group = order(Audience::Group("web".into()), Repeat::Once);
        assert_eq!(
            for_group.check("a", &groups, 2_000, History::Unseen),
            Ok(())
        );
        assert!(for_group.check("a", &[], 2_000, History::Unseen).is_err());
        let once = order(Audience::All, Repeat::Once);
        assert_eq!(
            once.check("a", &[], 500, History::Unseen),
            Err(Refusal::NotYetValid)
        );
        assert_eq!(
            once.check("a", &[], 10_001, History::Unseen),
            Err(Refusal::Expired)
        );
        assert_eq!(
            once.check("a", &[], 2_000, History::LastRun(1_500)),
            Err(Refusal::Replayed)
        );
        let standing = order(
            Audience::All,
            Repeat::Standing {
                min_interval_ms: 1_000,
            },
        );
        assert!(matches!(
            standing.check("a", &[], 2_000, History::LastRun(1_500)),
            Err(Refusal::TooSoon { .. })
        ));
        assert_eq!(
            standing.check("a", &[], 2_600, History::LastRun(1_500)),
            Ok(())
        );
    }
}
