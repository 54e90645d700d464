//! Who may use the admin API and what they did: admin-token scopes, the records of
//! `admin-token list`, and the audit log's entries and their hash chain.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use herald_shared::Millis;

/// What an admin token may do. Every API route declares the scope it needs
/// ([`Scope::allows`] says which tokens pass).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Read everything, change nothing (monitoring, helpdesk).
    Read,
    /// Only `GET /metrics` (a Prometheus scraper).
    Metrics,
    /// Read, plus jobs, schedules and the catalog of programs and browser services.
    Jobs,
    /// Read, plus vendors, releases, package subscriptions, installs and rollouts.
    Packages,
    /// Read, plus senders, messages and campaigns.
    Messages,
    /// Read, plus usage ingestion, price plans, providers' prices, and rating and
    /// closing months (a metering gateway, a billing clerk).
    Billing,
    /// Everything, including tokens, agents, groups and admin tokens. The token `init`
    /// writes to admin.toml has this scope.
    Admin,
}

/// Every scope, in the order help texts list them.
pub const SCOPES: [Scope; 7] = [
    Scope::Read,
    Scope::Metrics,
    Scope::Jobs,
    Scope::Packages,
    Scope::Messages,
    Scope::Billing,
    Scope::Admin,
];

impl Scope {
    /// The stored and displayed name.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Metrics => "metrics",
            Scope::Jobs => "jobs",
            Scope::Packages => "packages",
            Scope::Messages => "messages",
            Scope::Billing => "billing",
            Scope::Admin => "admin",
        }
    }

    /// Whether a token of this scope may use a route that needs `needed`. Every
    /// scope but `metrics` includes `read`, and `read` includes `metrics`.
    pub fn allows(self, needed: Scope) -> bool {
        match (self, needed) {
            (Scope::Admin, _) => true,
            (have, needed) if have == needed => true,
            (Scope::Metrics, _) => false,
            (_, Scope::Read | Scope::Metrics) => true,
            _ => false,
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Scope {
    type Err = String;

    fn from_str(text: &str) -> Result<Scope, String> {
        SCOPES
            .into_iter()
            .find(|s| s.as_str() == text)
            .ok_or_else(|| {
                format!(
                    "unknown scope {text:?}: one of read, metrics, jobs, packages, messages, billing, admin"
                )
            })
    }
}

/// Request body: a new admin token. The client makes the secret and sends only its
/// hash, as for enrollment tokens; the server never sees the secret.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreateAdminToken {
    /// A name for people (`helpdesk`, `prometheus`): 1 to 64 of a-z, 0-9, '.', '_', '-'.
    pub name: String,
    /// What it may do.
    pub scope: Scope,
    /// SHA-256 of the secret, hex.
    pub secret_hash: String,
    /// When it stops working, if ever.
    pub expires_at: Option<Millis>,
}

/// An admin token as `admin-token list` shows it (never the secret).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdminTokenInfo {
    /// The first 12 hex digits of the secret's SHA-256.
    pub id: String,
    /// Name.
    pub name: String,
    /// Scope.
    pub scope: Scope,
    /// When it was made.
    pub created_at: Millis,
    /// When it stops working, if ever.
    pub expires_at: Option<Millis>,
    /// When it was revoked, if it was.
    pub revoked_at: Option<Millis>,
}

/// The longest admin-token name.
pub const MAX_TOKEN_NAME: usize = 64;

/// Checks an admin-token name.
pub fn check_token_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_TOKEN_NAME {
        return Err(format!(
            "a token name has 1 to {MAX_TOKEN_NAME} characters; {name:?} has {}",
            name.len()
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
    {
        return Err(format!(
            "a token name has only a-z, 0-9, '.', '_' and '-': {name:?}"
        ));
    }
    Ok(())
}

/// One entry of the audit log: who did what to what, from where, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Position in the log, from 1, without gaps.
    pub seq: i64,
    /// When.
    pub at: Millis,
    /// Who: `token:ID (NAME)`, `user:LOGIN`, `vendor:NAME`, `sender:NAME`, `local:USER`
    /// (a command run on the server against the database), or `unknown`.
    pub actor: String,
    /// Client address (as the console and API resolve it, proxies included), or
    /// `local`.
    pub source: String,
    /// What: a dotted name such as `jobs.create`, `console.login`.
    pub action: String,
    /// On what: the request path or the object's name.
    pub target: String,
    /// `ok`, `denied`, or `failed: REASON`.
    pub outcome: String,
    /// The previous entry's hash (64 zeros for the first).
    pub prev_hash: String,
    /// SHA-256 over the previous hash and this entry's fields.
    pub hash: String,
}

/// What a new entry says, before it has a place in the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    /// See [`AuditEntry::actor`].
    pub actor: String,
    /// See [`AuditEntry::source`].
    pub source: String,
    /// See [`AuditEntry::action`].
    pub action: String,
    /// See [`AuditEntry::target`].
    pub target: String,
    /// See [`AuditEntry::outcome`].
    pub outcome: String,
}

/// The hash before the first entry.
pub const AUDIT_GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The hash of an entry: SHA-256 over the previous hash and each field, each
/// length-prefixed so that no two different entries hash alike.
pub fn audit_hash(prev_hash: &str, seq: i64, at: Millis, event: &AuditEvent) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"herald-audit-v1");
    for field in [
        prev_hash.as_bytes(),
        &seq.to_be_bytes(),
        &at.to_be_bytes(),
        event.actor.as_bytes(),
        event.source.as_bytes(),
        event.action.as_bytes(),
        event.target.as_bytes(),
        event.outcome.as_bytes(),
    ] {
        hasher.update((field.len() as u64).to_be_bytes());
        hasher.update(field);
    }
    hex::encode(hasher.finalize())
}

impl AuditEntry {
    /// The event this entry records.
    pub fn event(&self) -> AuditEvent {
        AuditEvent {
            actor: self.actor.clone(),
            source: self.source.clone(),
            action: self.action.clone(),
            target: self.target.clone(),
            outcome: self.outcome.clone(),
        }
    }
}

/// What `audit verify` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditVerdict {
    /// Entries checked.
    pub entries: u64,
    /// The last entry's hash: write it down (or ship the log) to notice a cut tail.
    pub head: String,
    /// The breaks found, `entry N: ...`, the first [`MAX_LISTED_PROBLEMS`] of them.
    /// Empty when the chain holds.
    pub problems: Vec<String>,
    /// How many breaks were found in all.
    pub problem_count: u64,
}

/// Most breaks a verdict lists (all are counted): a log rewritten wholesale would
/// otherwise give one line per entry.
pub const MAX_LISTED_PROBLEMS: usize = 1000;

/// Checks a chain of entries fed in order: each hash, each link, and no gap in the
/// sequence. A changed field breaks that entry's hash; a deleted entry breaks the next
/// one's link and leaves a gap.
#[derive(Debug)]
pub struct ChainCheck {
    verdict: AuditVerdict,
    expected_seq: i64,
}

impl Default for ChainCheck {
    fn default() -> Self {
        ChainCheck {
            verdict: AuditVerdict {
                entries: 0,
                head: AUDIT_GENESIS.to_string(),
                problems: Vec::new(),
                problem_count: 0,
            },
            expected_seq: 1,
        }
    }
}

impl ChainCheck {
    /// Checks the next entry.
    pub fn push(&mut self, entry: &AuditEntry) {
        self.verdict.entries += 1;
        if entry.seq != self.expected_seq {
            self.problem(format!(
                "entry {}: expected entry {} here; entries {} to {} are missing",
                entry.seq,
                self.expected_seq,
                self.expected_seq,
                entry.seq - 1
            ));
        }
        if entry.prev_hash != self.verdict.head {
            self.problem(format!(
                "entry {}: does not link to the entry before it (deleted or edited)",
                entry.seq
            ));
        }
        if audit_hash(&entry.prev_hash, entry.seq, entry.at, &entry.event()) != entry.hash {
            self.problem(format!("entry {}: its contents were changed", entry.seq));
        }
        self.expected_seq = entry.seq + 1;
        self.verdict.head = entry.hash.clone();
    }

    fn problem(&mut self, text: String) {
        self.verdict.problem_count += 1;
        if self.verdict.problems.len() < MAX_LISTED_PROBLEMS {
            self.verdict.problems.push(text);
        }
    }

    /// The verdict over every entry pushed.
    pub fn finish(self) -> AuditVerdict {
        self.verdict
    }
}

/// [`ChainCheck`] over a whole chain.
pub fn verify_chain(entries: impl IntoIterator<Item = AuditEntry>) -> AuditVerdict {
    let mut check = ChainCheck::default();
    for entry in entries {
        check.push(&entry);
    }
    check.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: i64) -> Vec<AuditEntry> {
        let mut prev = AUDIT_GENESIS.to_string();
        (1..=n)
            .map(|seq| {
                let event = AuditEvent {
                    actor: "token:abc".into(),
                    source: "127.0.0.1".into(),
                    action: "jobs.create".into(),
                    target: format!("/api/v1/jobs/{seq}"),
                    outcome: "ok".into(),
                };
                let hash = audit_hash(&prev, seq, 1000 + seq, &event);
                let entry = AuditEntry {
                    seq,
                    at: 1000 + seq,
                    actor: event.actor,
                    source: event.source,
                    action: event.action,
                    target: event.target,
                    outcome: event.outcome,
                    prev_hash: prev.clone(),
                    hash: hash.clone(),
                };
                prev = hash;
                entry
            })
            .collect()
    }

    #[test]
    fn an_intact_chain_verifies() {
        let entries = chain(5);
        let head = entries[4].hash.clone();
        let verdict = verify_chain(entries);
        assert_eq!(verdict.problems, Vec::<String>::new());
        assert_eq!((verdict.entries, verdict.head), (5, head));
    }

    #[test]
    fn an_edited_field_breaks_that_entry() {
        let mut entries = chain(5);
        entries[2].outcome = "denied".into();
        let verdict = verify_chain(entries);
        assert_eq!(verdict.problems, ["entry 3: its contents were changed"]);
    }

    #[test]
    fn a_rewritten_log_lists_a_bounded_number_of_breaks() {
        let mut entries = chain(MAX_LISTED_PROBLEMS as i64 + 10);
        for entry in &mut entries {
            entry.outcome = "denied".into();
        }
        let verdict = verify_chain(entries);
        assert_eq!(verdict.problems.len(), MAX_LISTED_PROBLEMS);
        assert_eq!(verdict.problem_count, MAX_LISTED_PROBLEMS as u64 + 10);
    }

    #[test]
    fn a_deleted_entry_is_found() {
        let mut entries = chain(5);
        entries.remove(1);
        let verdict = verify_chain(entries);
        assert_eq!(verdict.problems.len(), 2, "{:?}", verdict.problems);
        assert!(verdict.problems[0].contains("entries 2 to 2 are missing"));
        assert!(verdict.problems[1].contains("does not link"));
    }

    #[test]
    fn a_rehashed_edit_still_breaks_the_next_link() {
        let mut entries = chain(4);
        entries[1].actor = "token:other".into();
        entries[1].hash = audit_hash(&entries[1].prev_hash, 2, entries[1].at, &entries[1].event());
        let verdict = verify_chain(entries);
        assert_eq!(
            verdict.problems,
            ["entry 3: does not link to the entry before it (deleted or edited)"]
        );
    }

    #[test]
    fn fields_cannot_be_shifted_between_each_other() {
        let a = AuditEvent {
            actor: "ab".into(),
            source: "c".into(),
            action: String::new(),
            target: String::new(),
            outcome: String::new(),
        };
        let b = AuditEvent {
            actor: "a".into(),
            source: "bc".into(),
            ..a.clone()
        };
        assert_ne!(
            audit_hash(AUDIT_GENESIS, 1, 1, &a),
            audit_hash(AUDIT_GENESIS, 1, 1, &b)
        );
    }

    #[test]
    fn scopes_include_read_except_metrics() {
        for scope in SCOPES {
            assert!(Scope::Admin.allows(scope));
            assert!(scope.allows(scope));
            assert_eq!(
                scope.allows(Scope::Read),
                scope != Scope::Metrics,
                "{scope}"
            );
            assert!(scope.allows(Scope::Metrics));
        }
        assert!(!Scope::Read.allows(Scope::Jobs));
        assert!(!Scope::Jobs.allows(Scope::Packages));
        assert!(!Scope::Messages.allows(Scope::Admin));
        assert!(!Scope::Metrics.allows(Scope::Read));
        assert_eq!("jobs".parse::<Scope>(), Ok(Scope::Jobs));
        assert!("root".parse::<Scope>().is_err());
    }
}
