//! The web console's records as the rest of the server sees them: users and roles,
//! login attempts, sessions, browser-service visits, a user's devices, history and
//! forwarding deliveries. The store (`store::accounts`) reads and writes them.

use herald_shared::protocol::JobId;
use herald_shared::Millis;
use serde::{Deserialize, Serialize};

use super::JobState;
use crate::model::AgentInfo;

/// What a user may do in the console.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything, for every user's objects.
    Admin,
    /// Their own devices, subscriptions, history and forwarding.
    User,
}

impl Role {
    /// The stored and displayed name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::User => "user",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "admin" => Ok(Role::Admin),
            "user" => Ok(Role::User),
            other => Err(format!("unknown role {other:?}: use admin or user")),
        }
    }
}

/// A console account (without its password hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// Id.
    pub id: i64,
    /// Login name (`[a-z0-9._-]`, 3 to 32 characters).
    pub login: String,
    /// Name shown in the console.
    pub display_name: String,
    /// E-mail address, may be empty.
    pub email: String,
    /// Phone number, may be empty.
    pub phone: String,
    /// Role.
    pub role: Role,
    /// Created.
    pub created_at: Millis,
    /// The message sender this user acts for in the console, if the operator linked
    /// one (`herald-server sender link`).
    pub sender: Option<String>,
}

impl User {
    /// Whether the user is an admin.
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }
}

/// What a login attempt is checked against.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// The account.
    pub user: User,
    /// argon2id PHC string.
    pub password_hash: String,
    /// Locked until then, if locked.
    pub locked_until: Option<Millis>,
}

/// How counting a login attempt went, before its password is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginAttempt {
    /// The account is locked: refuse without checking the password.
    Locked,
    /// Counted as a failure until the password proves right; `locks` when this
    /// attempt reached the limit and locked the account (a right password still
    /// unlocks it).
    Counted {
        /// This attempt set the lock.
        locks: bool,
    },
}

/// An agent with the login of the user who linked it.
#[derive(Debug, Clone)]
pub struct OwnedAgent {
    /// The agent.
    pub agent: AgentInfo,
    /// Its owner's login (`None`: enrolled with an operator token).
    pub owner: Option<String>,
}

/// A live browser session.
#[derive(Debug, Clone)]
pub struct SessionRecord {
    /// Whose.
    pub user: User,
    /// The session's CSRF token.
    pub csrf: String,
}

/// A browser-service visit admitted by a redeemed ticket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Visit {
    /// The one job this visit may complete.
    pub job_id: JobId,
    /// The visit's CSRF token.
    pub csrf: String,
}

/// What the person at a browser service answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VisitOutcome {
    /// Did the task: the job succeeds.
    Done,
    /// Declined it: the job fails.
    Declined,
}

impl std::str::FromStr for VisitOutcome {
    type Err = String;

    fn from_str(s: &str) -> Result<VisitOutcome, String> {
        match s {
            "done" => Ok(VisitOutcome::Done),
            "declined" => Ok(VisitOutcome::Declined),
            _ => Err("outcome must be done or declined".into()),
        }
    }
}

/// How completing a visit went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completion {
    /// The job is now in this final state.
    Completed(JobState),
    /// The ticket was spent before (external services post the ticket itself).
    AlreadyUsed,
    /// The job cannot be completed from its current state (already final, not yet
    /// delivered, or not a browser job); the reason in one sentence.
    Refused(String),
}

/// A job as the service page needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceJob {
    /// Job id.
    pub job_id: JobId,
    /// Current state.
    pub state: JobState,
    /// The catalog entry whose order this job carries, if any.
    pub entry: Option<String>,
    /// Order kind (`open` for browser services).
    pub kind: String,
    /// For browser services, the signed page URL (`open URL` in the order's summary).
    pub page: Option<String>,
}

impl ServiceJob {
    /// Whether this job runs the service page of catalog entry `name`: it carries the
    /// entry's own order, or a one-off `herald-server open` of that entry's page.
    pub fn is_for(&self, name: &str) -> bool {
        if self.entry.as_deref() == Some(name) {
            return true;
        }
        let Some(rest) = self.page.as_deref().and_then(|url| url.split_once("://")) else {
            return false;
        };
        let path = rest
            .1
            .split(['?', '#'])
            .next()
            .and_then(|r| r.find('/').map(|i| &r[i..]))
            .unwrap_or("/");
        self.kind == "open" && path == format!("/service/{name}")
    }
}

/// One run in a user's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    /// Job id.
    pub id: JobId,
    /// Device id.
    pub agent_id: String,
    /// Device name.
    pub agent_name: String,
    /// Owner of the device, if it was linked by a user.
    pub owner_user_id: Option<i64>,
    /// Catalog entry name, when the job runs one.
    pub entry: Option<String>,
    /// Catalog entry title.
    pub entry_title: Option<String>,
    /// What it does, in one line.
    pub action: String,
    /// State.
    pub state: JobState,
    /// Created.
    pub created_at: Millis,
    /// Started on the device.
    pub started_at: Option<Millis>,
    /// Finished.
    pub finished_at: Option<Millis>,
    /// Exit code.
    pub exit_code: Option<i32>,
    /// Failure reason.
    pub error: Option<String>,
    /// The note left on a browser service page.
    pub outcome: Option<String>,
}

/// One forwarding of one job's result, with its attempts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Id.
    pub id: i64,
    /// Whose rule it went out under.
    pub user_id: i64,
    /// The job whose result is forwarded.
    pub job_id: JobId,
    /// `email`, `webhook` or `sms`.
    pub kind: String,
    /// Where to.
    pub target: String,
    /// State (set by the forwarding engine).
    pub state: String,
    /// Attempts so far.
    pub attempts: i64,
    /// The latest error.
    pub last_error: Option<String>,
    /// Created.
    pub created_at: Millis,
    /// Finished (delivered or given up).
    pub finished_at: Option<Millis>,
    /// Every attempt, oldest first.
    pub log: Vec<DeliveryAttempt>,
}

/// One attempt of a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryAttempt {
    /// When.
    pub at: Millis,
    /// Whether it went through.
    pub ok: bool,
    /// Status or error text.
    pub detail: String,
}
