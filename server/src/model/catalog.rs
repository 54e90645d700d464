//! The service catalog and users' subscriptions to it.
//!
//! A catalog entry is an operator-signed *standing* order (a program to run, or a
//! browser service page) published with `herald-server catalog add`. Users subscribe a
//! device to an entry with their own timing: the subscription is a schedule that points
//! at the entry's order, so the server can only ever schedule what the operator signed,
//! never more often than the order's minimum interval (which the agent enforces).

use herald_shared::envelope::{Action, Order, Repeat};
use herald_shared::schedule::{Missed, Schedule};
use herald_shared::Millis;
use serde::{Deserialize, Serialize};

/// A catalog entry as listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CatalogEntry {
    /// Short unique name (`[A-Za-z0-9._-]`).
    pub name: String,
    /// Title shown to users.
    pub title: String,
    /// What it does, for users.
    pub description: String,
    /// `run` (standalone program) or `open` (browser service).
    pub kind: String,
    /// The signed action in one line (program and arguments, or the page URL).
    pub summary: String,
    /// Who the operator signed it for (`all`, `group:<name>`, `agent:<id>`).
    pub target: String,
    /// Minimum time between two runs on one device.
    pub min_interval_ms: u64,
    /// The signed order's end of validity.
    pub not_after: Millis,
    /// When it was published.
    pub created_at: Millis,
}

/// A user's (or an admin's) subscription of a device or audience to a catalog entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Subscription {
    /// Schedule id.
    pub id: i64,
    /// Owning user.
    pub owner_user_id: i64,
    /// Owner's login.
    pub owner_login: String,
    /// Catalog entry name.
    pub entry: String,
    /// Catalog entry title.
    pub entry_title: String,
    /// `run` or `open`.
    pub kind: String,
    /// Target (`agent:<id>` for a user's device; admins may use groups or `all`).
    pub target: String,
    /// The device's name when the target is one agent.
    pub agent_name: Option<String>,
    /// The timing.
    pub schedule: Schedule,
    /// The timing in words.
    pub when: String,
    /// Missed-run policy.
    pub missed: Missed,
    /// Next firing, if any.
    pub next_fire_at: Option<Millis>,
    /// Created.
    pub created_at: Millis,
}

/// Why an order cannot be a catalog entry.
pub fn check_entry_order(order: &Order) -> std::result::Result<u64, String> {
    let Repeat::Standing { min_interval_ms } = order.repeat else {
        return Err(
            "a catalog entry must be a standing order (signed with a minimum interval)".into(),
        );
    };
    match &order.action {
        Action::Run(_) => {}
        Action::Open(open) => herald_shared::envelope::check_browser_url(&open.url)?,
        other => {
            return Err(format!(
                "a catalog entry runs a program or opens a service page, not {}",
                other.kind()
            ))
        }
    }
    Ok(min_interval_ms)
}

/// Request body: publish a catalog entry.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreateCatalogEntry {
    /// Entry name.
    pub name: String,
    /// Title.
    pub title: String,
    /// Description.
    pub description: String,
    /// Signed standing order, base64 of the bincode envelope.
    pub envelope: String,
}
