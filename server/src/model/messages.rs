//! Push messages as the server keeps and shows them: senders, messages with their
//! per-recipient state and counts, receipts, and who blocked whom. The JSON form is the
//! API's and the CLI's `--json` output (docs/API.md, docs/CLI.md).

use serde::{Deserialize, Serialize};

use herald_shared::Millis;

/// A delegated sender.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SenderInfo {
    /// Sender name.
    pub name: String,
    /// What recipients see.
    pub display_name: String,
    /// Public key (hex).
    pub public_key: String,
    /// May mark messages as advertising.
    pub advertising: bool,
    /// When added.
    pub created_at: Millis,
    /// Messages sent so far.
    pub messages: u64,
}

/// Request body: register a sender (`POST /api/v1/senders`).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreateSender {
    /// Operator-signed sender grant, base64 of the bincode envelope.
    pub envelope: String,
    /// SHA-256 (hex) of the sender's API token.
    pub token_hash: String,
}

/// Request body: send a message (`POST /api/v1/messages`).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SendMessage {
    /// Sender-signed message, base64 of the bincode envelope.
    pub envelope: String,
    /// Deliver from this time on (Unix ms); now when absent.
    #[serde(default)]
    pub deliver_at: Option<Millis>,
}

/// Answer to `POST /api/v1/messages`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageCreated {
    /// Message id (hex).
    pub id: String,
    /// Recipients (agents) the audience named.
    pub addressed: u64,
    /// Of those, skipped because they reported blocking the sender.
    pub skipped_blocked: u64,
}

/// Counts over a message's recipients.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MessageCounts {
    /// Recipients addressed.
    pub addressed: u64,
    /// With a signed `stored` receipt.
    pub stored: u64,
    /// With a signed `displayed` receipt.
    pub displayed: u64,
    /// With a signed `read` receipt.
    pub read: u64,
    /// Refused by the agent (signed), or skipped because the agent reported a block.
    pub refused: u64,
    /// Expired before it reached the agent, or arrived expired.
    pub expired: u64,
    /// Not heard of yet.
    pub pending: u64,
    /// stored ÷ addressed (0 when nobody was addressed).
    pub success_rate: f64,
}

/// A message as listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageInfo {
    /// Id (hex).
    pub id: String,
    /// Sender name.
    pub sender: String,
    /// Title.
    pub title: String,
    /// `normal` or `high`.
    pub priority: String,
    /// Marked as advertising.
    pub advertising: bool,
    /// Audience as given (`all`, `group:x`, `agent:id`).
    pub audience: String,
    /// When the server took it.
    pub created_at: Millis,
    /// When it expires.
    pub expires_at: Millis,
    /// Counts over recipients.
    pub counts: MessageCounts,
}

/// One recipient's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecipientInfo {
    /// Agent id.
    pub agent_id: String,
    /// Agent name.
    pub agent: String,
    /// The delivery's state: `queued`, `delivered`, `stored`, `refused`, `expired`,
    /// `skipped_blocked`.
    pub state: String,
    /// Why it was refused or skipped.
    pub reason: Option<String>,
    /// When the signed receipts say it was stored, displayed, read.
    pub stored_at: Option<Millis>,
    /// Shown as a notification.
    pub displayed_at: Option<Millis>,
    /// Opened by the person.
    pub read_at: Option<Millis>,
}

/// A message with everyone it was for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageDetail {
    /// The message.
    #[serde(flatten)]
    pub info: MessageInfo,
    /// Body text.
    pub body: String,
    /// Link, if any.
    pub link: Option<String>,
    /// Collapse key, if any.
    pub collapse: Option<String>,
    /// Per recipient.
    pub recipients: Vec<RecipientInfo>,
}

/// One stored receipt, as `message receipts` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReceiptInfo {
    /// Agent id.
    pub agent_id: String,
    /// `stored`, `displayed`, `read`, `refused`, `expired`.
    pub state: String,
    /// A refusal's reason.
    pub reason: Option<String>,
    /// When, by the agent's clock.
    pub at: Millis,
    /// The signed report (base64 of its bincode), for anyone to verify.
    pub report: String,
    /// The agent's enrolled Ed25519 public key (hex) the report should verify against;
    /// its SHA-256's first 10 bytes are the agent id.
    pub agent_key: String,
    /// Whether the signature verifies against the agent's enrolled key (only filled in
    /// when asked to verify).
    pub verified: Option<bool>,
}

/// A block-list entry an agent reported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RefusalInfo {
    /// Agent id.
    pub agent_id: String,
    /// Agent name.
    pub agent: String,
    /// The phone number of the console user the agent is linked to, if any.
    pub phone: Option<String>,
    /// Sender name.
    pub sender: String,
    /// Who asked on the machine: `local`, `notification`, `console`.
    pub by: String,
    /// When, by the agent's clock.
    pub at: Millis,
}

/// The grant a sender key holds (`GET /api/v1/grants/{key}`), for the sender's CLI to
/// put inside the messages it signs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GrantInfo {
    /// Sender name.
    pub sender: String,
    /// The operator-signed grant, base64 of the bincode envelope.
    pub envelope: String,
}

/// A console user's request that a device block or unblock a sender, waiting for the
/// agent's signed answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRequest {
    /// Request id.
    pub id: i64,
    /// Sender name.
    pub sender: String,
    /// Block (true) or unblock (false).
    pub blocked: bool,
}

/// A message as a console user sees it on one of their devices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserMessage {
    /// Message id (hex).
    pub message_id: String,
    /// Sender name.
    pub sender: String,
    /// What the sender is called.
    pub display_name: String,
    /// Title.
    pub title: String,
    /// Marked as advertising.
    pub advertising: bool,
    /// The device's agent id.
    pub agent_id: String,
    /// The device's name.
    pub agent: String,
    /// `on its way`, `stored`, `displayed`, `read`, `refused`, `expired`.
    pub state: String,
    /// Why it was refused.
    pub reason: Option<String>,
    /// When it was sent.
    pub created_at: Millis,
}

/// A sender blocked on one of a console user's devices, or a request pending.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserBlock {
    /// Agent id.
    pub agent_id: String,
    /// Device name.
    pub agent: String,
    /// Sender name.
    pub sender: String,
    /// Blocked (for a pending request: whether it asks to block).
    pub blocked: bool,
    /// Who blocked it on the machine (`local`, `notification`, `console`).
    pub by: String,
    /// Set for a request the agent has not answered yet.
    pub requested_at: Option<Millis>,
}

/// Request body: link a console user to a sender (`POST /api/v1/senders/{name}/users`).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SenderLink {
    /// Console login.
    pub login: String,
    /// Link (true) or unlink (false).
    pub linked: bool,
}
