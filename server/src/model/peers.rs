//! Peers: the directory's rows and the records of tunnel sessions. The shares themselves
//! are the agents' ([`herald_shared::peers::ShareInfo`]); clubs are in `clubs.rs`.

use serde::{Deserialize, Serialize};

use herald_shared::peers::PeerService;
use herald_shared::Millis;

/// A share the viewer may reach, with its device, whether or not the device is online
/// (the relay knows that; the directory shows only online ones).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectoryEntry {
    /// Providing agent's id.
    pub agent_id: String,
    /// Its name.
    pub device: String,
    /// Its owner's login ("" when linked to nobody).
    pub owner: String,
    /// Its owner's user id.
    pub owner_user_id: Option<i64>,
    /// Addresses the device reported, space-separated as stored.
    pub reported: String,
    /// Address the server last saw it connect from.
    pub observed: Option<String>,
    /// The share, with only the clubs the viewer shares with the owner.
    pub service: PeerService,
}

impl DirectoryEntry {
    /// Whether a keyword matches the owner, device, service name or description,
    /// case-insensitively in any script (an empty keyword matches everything).
    pub fn matches(&self, keyword: &str) -> bool {
        let keyword = keyword.trim().to_lowercase();
        keyword.is_empty()
            || [
                &self.owner,
                &self.device,
                &self.service.name,
                &self.service.description,
            ]
            .iter()
            .any(|field| field.to_lowercase().contains(&keyword))
    }
}

/// How a tunnel session reached the provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// Agent to agent through the server.
    Relay,
    /// Agent to agent directly (the server brokered it).
    Direct,
    /// A browser through the server's HTTPS.
    Browser,
}

impl Via {
    /// Stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Relay => "relay",
            Via::Direct => "direct",
            Via::Browser => "browser",
        }
    }

    /// Parses the stored form.
    pub fn parse(s: &str) -> Option<Via> {
        match s {
            "relay" => Some(Via::Relay),
            "direct" => Some(Via::Direct),
            "browser" => Some(Via::Browser),
            _ => None,
        }
    }
}

/// A tunnel session as it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSession {
    /// Providing agent.
    pub provider_agent_id: String,
    /// Share name.
    pub share: String,
    /// The provider's owner.
    pub provider_user_id: Option<i64>,
    /// The consumer's user, if known (signed-in browser, linked agent).
    pub consumer_user_id: Option<i64>,
    /// The consumer agent, if not a browser.
    pub consumer_agent_id: Option<String>,
    /// How it travels.
    pub via: Via,
    /// The consumer's address as the server sees it.
    pub source: String,
    /// The first request's path (browser sessions).
    pub path: String,
    /// Start time.
    pub started_at: Millis,
}

/// How a tunnel session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionEnd {
    /// Bytes consumer → provider.
    pub bytes_up: u64,
    /// Bytes provider → consumer.
    pub bytes_down: u64,
    /// HTTP requests carried (browser sessions).
    pub requests: u64,
    /// `closed`, or `refused: REASON`, or `failed: REASON`.
    pub outcome: String,
    /// End time.
    pub ended_at: Millis,
}

/// A stored tunnel session (`--json` form).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelSession {
    /// Session id.
    pub id: i64,
    /// Providing agent.
    pub provider_agent_id: String,
    /// Share name.
    pub share: String,
    /// The provider's owner.
    pub provider_user_id: Option<i64>,
    /// The consumer's user.
    pub consumer_user_id: Option<i64>,
    /// The consumer agent (none for a browser).
    pub consumer_agent_id: Option<String>,
    /// `relay`, `direct` or `browser`.
    pub via: Via,
    /// The consumer's address.
    pub source: String,
    /// The first request's path (browser sessions).
    pub path: String,
    /// Start time.
    pub started_at: Millis,
    /// End time, once ended.
    pub ended_at: Option<Millis>,
    /// Bytes consumer → provider.
    pub bytes_up: u64,
    /// Bytes provider → consumer.
    pub bytes_down: u64,
    /// HTTP requests.
    pub requests: u64,
    /// `open`, `closed`, `refused: …`, `failed: …`.
    pub outcome: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keywords_match_any_field_in_any_script() {
        let entry = DirectoryEntry {
            agent_id: "a".into(),
            device: "laptop".into(),
            owner: "Alice".into(),
            owner_user_id: Some(1),
            reported: String::new(),
            observed: None,
            service: PeerService {
                name: "shop".into(),
                http: true,
                public: false,
                clubs: vec!["chess".into()],
                description: "우리 동네 빵집 — Bäckerei".into(),
            },
        };
        for hit in [
            "alice",
            "LAPTOP",
            "Shop",
            "빵집",
            "bäckerei",
            "BÄCKEREI",
            "",
        ] {
            assert!(entry.matches(hit), "{hit}");
        }
        assert!(!entry.matches("camera"));
    }
}
