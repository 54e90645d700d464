//! The server's shared vocabulary: the records the admin API returns, the CLI prints and
//! the store reads and writes. Their JSON form is the stable `--json` output documented
//! in docs/CLI.md. Pure types and rules; nothing here does I/O or imports another folder.
//!
//! - `mod.rs`: agents, jobs, schedules, job events, API request bodies;
//! - `admin.rs`: admin-token scopes, the audit log's entries and hash chain;
//! - `job.rs`: [`JobState`] and its transition table;
//! - `accounts.rs`: console users, sessions, visits, history, deliveries;
//! - `catalog.rs`: catalog entries and subscriptions;
//! - `releases.rs`: vendors, releases, package subscriptions, rollouts and their waves;
//! - `messages.rs`: push-message senders, messages, recipients, receipts, refusals;
//! - `campaigns.rs`: recipient lists, fallbacks, campaign figures;
//! - `peers.rs`: the directory's rows and tunnel session records;
//! - `clubs.rs`: clubs, members, their rules, and the directory as a viewer sees it;
//! - `billing.rs`: usage events, price plans, rating, the rule for signed counters.

mod accounts;
mod admin;
pub mod billing;
mod campaigns;
mod catalog;
mod clubs;
mod confirm;
mod forwarding;
mod job;
mod messages;
mod peers;
mod releases;

pub use accounts::*;
pub use admin::*;
pub use campaigns::*;
pub use catalog::*;
pub use clubs::*;
pub use confirm::{
    check_code, code_expiry, hash_code, new_code, PendingCode, Verdict, CODE_DIGITS, CODE_TTL,
    CODE_WINDOW, MAX_CODES_PER_WINDOW, MAX_WRONG_TRIES,
};
pub use forwarding::*;
pub use job::{IllegalTransition, JobState, UnknownState};
pub use messages::*;
pub use peers::*;
pub use releases::*;

use serde::{Deserialize, Serialize};

use herald_shared::protocol::JobId;
use herald_shared::Millis;

/// An enrolled agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentInfo {
    /// Id derived from the agent's key.
    pub id: String,
    /// Human name (host name by default).
    pub name: String,
    /// Connected right now.
    pub online: bool,
    /// Revocation time, if revoked.
    pub revoked_at: Option<Millis>,
    /// Enrollment time.
    pub enrolled_at: Millis,
    /// Last time the agent was seen (connected or sent something).
    pub last_seen_at: Option<Millis>,
    /// Agent software version.
    pub version: Option<String>,
    /// Groups.
    pub groups: Vec<String>,
    /// Addresses the agent reported for its interfaces (latest report).
    pub local_addresses: Vec<String>,
    /// Address the server observed the connection coming from (latest).
    pub observed_address: Option<String>,
    /// Host facts (JSON object).
    pub facts: serde_json::Value,
}

/// One entry of an agent's address history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AddressEvent {
    /// `local` (reported by the agent) or `observed` (seen by the server).
    pub kind: String,
    /// The address(es), comma separated for local reports.
    pub address: String,
    /// When.
    pub at: Millis,
}

/// An agent with its address history, for `agents show`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentDetail {
    /// The agent.
    #[serde(flatten)]
    pub agent: AgentInfo,
    /// Address history, newest first.
    pub address_history: Vec<AddressEvent>,
}

/// A job: one order for one agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobInfo {
    /// Job id.
    pub id: JobId,
    /// Agent id.
    pub agent_id: String,
    /// Agent name.
    pub agent_name: String,
    /// Schedule that created it, if any.
    pub schedule_id: Option<i64>,
    /// What it does.
    pub action: String,
    /// Where it is in its life (`queued` ... `canceled`: [`JobState`]).
    pub state: JobState,
    /// Created.
    pub created_at: Millis,
    /// Expires if not delivered by then.
    pub expires_at: Millis,
    /// Acknowledged by the agent.
    pub delivered_at: Option<Millis>,
    /// Started on the agent.
    pub started_at: Option<Millis>,
    /// Finished.
    pub finished_at: Option<Millis>,
    /// Exit code.
    pub exit_code: Option<i32>,
    /// Terminating signal.
    pub signal: Option<i32>,
    /// Captured stdout (lossy UTF-8; full bytes are stored).
    pub stdout: String,
    /// Captured stderr.
    pub stderr: String,
    /// stdout was cut at the cap.
    pub stdout_truncated: bool,
    /// stderr was cut at the cap.
    pub stderr_truncated: bool,
    /// Refusal or failure reason.
    pub error: Option<String>,
    /// Latest progress report of an install job.
    #[serde(default)]
    pub progress: Option<String>,
    /// A browser service's outcome as the person posted it (`done` or `declined`, with
    /// their note).
    #[serde(default)]
    pub outcome: Option<String>,
}

impl JobInfo {
    /// The job reached a final state.
    pub fn is_final(&self) -> bool {
        self.state.is_final()
    }
}

/// A schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleInfo {
    /// Schedule id.
    pub id: i64,
    /// Target as given (`agent:..`, `group:..`, `all`).
    pub target: String,
    /// When it fires, in words.
    pub when: String,
    /// `skip` or `run-once`.
    pub missed: String,
    /// Splay in milliseconds.
    pub splay_ms: u64,
    /// What it does.
    pub action: String,
    /// Next fire time, if any.
    pub next_fire_at: Option<Millis>,
    /// Created.
    pub created_at: Millis,
}

/// Request body: create a one-off job.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreateJobs {
    /// Signed order, base64 of the bincode envelope.
    pub envelope: String,
    /// How long it may wait for an offline agent.
    pub ttl_ms: u64,
}

/// Request body: create a schedule.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreateSchedule {
    /// Signed standing order, base64 of the bincode envelope.
    pub envelope: String,
    /// When it fires.
    #[schema(value_type = Object)]
    pub schedule: herald_shared::schedule::Schedule,
    /// `skip` or `run-once`.
    #[schema(value_type = String)]
    pub missed: herald_shared::schedule::Missed,
    /// Splay in milliseconds.
    pub splay_ms: u64,
    /// TTL of each job it creates.
    pub ttl_ms: u64,
}

/// Request body: register an enrollment token.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreateToken {
    /// SHA-256 of the secret, hex.
    pub secret_hash: String,
    /// Groups granted.
    pub groups: Vec<String>,
    /// Number of enrollments allowed.
    pub uses: u32,
    /// Expiry time.
    pub expires_at: Millis,
}

/// An enrollment token as listed (`token list`): never its secret, only the start of
/// the secret's hash, which names it for `token revoke`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenInfo {
    /// The first 12 hex digits of the secret's SHA-256.
    pub id: String,
    /// Groups an agent enrolled with it joins.
    pub groups: Vec<String>,
    /// Enrollments left.
    pub uses_left: u32,
    /// When it stops working.
    pub expires_at: Millis,
    /// When it was made.
    pub created_at: Millis,
    /// The console user whose devices it links (a personal token), if any.
    pub owner: Option<String>,
}

/// Request body: set an agent's groups with a signed membership.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SetMembership {
    /// Signed membership, base64 of the bincode envelope.
    pub envelope: String,
}

/// Response: ids of what was created.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Created {
    /// Ids.
    pub ids: Vec<i64>,
}

/// Error body of every failed API call.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiErrorBody {
    /// One sentence for a person.
    pub error: String,
}

/// Request body: register a vendor.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreateVendor {
    /// Operator-signed delegation, base64 of the bincode envelope.
    pub envelope: String,
    /// SHA-256 (hex) of the vendor's API token.
    pub token_hash: String,
}

/// Request body: register release metadata.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreateRelease {
    /// Vendor- or operator-signed release metadata, base64 of the bincode envelope.
    pub envelope: String,
}

/// Request body: subscribe agents to a package.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreateSubscription {
    /// Operator-signed standing install order, base64 of the bincode envelope.
    pub envelope: String,
    /// Wave plan, e.g. `1,10%,50%,100%`.
    pub waves: String,
    /// Fraction of failed installs (0 to 1) that halts a rollout.
    pub max_failures: f64,
    /// How long each install job waits for an offline agent.
    pub ttl_ms: u64,
}

/// Response: install jobs created, and agents left out.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstallsCreated {
    /// Job ids.
    pub ids: Vec<i64>,
    /// Agents with no published release for their platform.
    pub skipped: Vec<String>,
}
/// A job changed state (for long polls and the demo's live output).
#[derive(Debug, Clone, Copy)]
pub struct JobEvent {
    /// Job id.
    pub job_id: JobId,
}
