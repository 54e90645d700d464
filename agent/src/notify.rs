//! Notices: how a kept message is shown to the person at the machine.
//!
//! The daemon keeps messages ([`crate::inbox`]); the user-session helper shows each new
//! one through the desktop's notification service and reports back what happened
//! ([`NoticeEvent`]). Advertising is held during quiet hours ([`QuietHours`]).
//!
//! This file holds the types both sides share; the D-Bus client and the quiet-hours
//! rule live here too.

use serde::{Deserialize, Serialize};

/// A message as the helper shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Notice {
    /// Message id (hex).
    pub message_id: String,
    /// Sender name (for "Block this sender").
    pub sender: String,
    /// What people see as the sender.
    pub display_name: String,
    /// Title.
    pub title: String,
    /// Body text.
    pub body: String,
    /// Shown as urgent.
    pub high: bool,
    /// Marked as advertising (prefixed as such).
    pub advertising: bool,
    /// Page the "Open" action opens; the inbox when absent.
    pub link: Option<String>,
}

/// What the helper reports about a notice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum NoticeEvent {
    /// The desktop's notification service took it (it is on screen).
    Displayed {
        /// Message id (hex).
        message_id: String,
    },
    /// The person chose "Open".
    Opened {
        /// Message id (hex).
        message_id: String,
    },
    /// The person chose "Block this sender".
    Block {
        /// Message id (hex).
        message_id: String,
        /// Sender name.
        sender: String,
    },
}

/// The local hours during which advertising is held (`[messages] quiet_hours`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuietHours {
    /// Start, minutes after local midnight.
    pub start: u32,
    /// End, minutes after local midnight (before `start` when the span wraps midnight).
    pub end: u32,
}

impl QuietHours {
    /// Parses `HH:MM-HH:MM`; an empty string is `None` (never hold).
    pub fn parse(text: &str) -> Result<Option<QuietHours>, String> {
        // Filled in with the quiet-hours rule.
        let _ = text;
        Ok(None)
    }

    /// Whether a notice of advertising must wait at `local_minute` (minutes after local
    /// midnight), and if so how many minutes until the quiet hours end.
    pub fn holds(&self, local_minute: u32) -> Option<u32> {
        let _ = local_minute;
        None
    }
}
