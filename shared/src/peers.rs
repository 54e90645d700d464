//! Peers, clubs and shared services: what agents report of their shares, what a consumer
//! asks for on a stream of its own, and what the server offers a providing agent.
//!
//! Streams (all bidirectional; each starts with one frame, then carries raw bytes):
//!
//! - **Consumer → server**, on the agent's link or on a *side connection* (a connection
//!   of an enrolled agent whose first frame is a request rather than a `Hello`; the CLI's
//!   `peers` and `connect` use one, so they do not replace the daemon's link): the first
//!   frame is [`crate::protocol::AgentMsg::Request`]. The server answers one
//!   [`StreamAnswer`]; for an accepted tunnel the stream then carries the service's bytes.
//! - **Server → provider**, on the provider's link: the first frame is a [`TunnelOffer`];
//!   the provider answers one [`OfferAnswer`] after checking the offer against its own
//!   share table, and for an accepted offer the stream then carries the bytes to and from
//!   the share's configured local address. A [`DirectOffer`] on such a stream asks the
//!   provider to *expect* a consumer agent on a direct connection instead; it answers
//!   [`OfferAnswer::Expecting`] with its endpoint's port.
//! - **Consumer → provider**, on a direct QUIC connection between the agents (after
//!   [`StreamRequest::Direct`] was answered [`StreamAnswer::Direct`]): the first frame is
//!   [`DirectOpen`]; the provider answers one [`OfferAnswer`], then the stream carries
//!   the service's bytes.
//!
//! The server vouches for who the consumer is and which of the share's clubs they belong
//! to; the provider decides, from its own table, whether that opens the share.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::Millis;

/// Longest share description, in bytes.
pub const MAX_DESCRIPTION: usize = 500;
/// Most clubs one share may name.
pub const MAX_SHARE_CLUBS: usize = 32;
/// Most shares one agent reports.
pub const MAX_SHARES: usize = 256;
/// The stream reset code a providing agent closes an idle tunnel with, so the server and
/// the consumer record it as `idle` rather than as a failure.
pub const IDLE_RESET: u32 = 1;

/// A service an agent shares, as it reports it for the directory. The local address,
/// limits and everything else the agent enforces stay on the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareInfo {
    /// Service name, unique on the agent ([`crate::valid_name`]).
    pub name: String,
    /// An HTTP service, reachable from browsers under `/p/OWNER/SERVICE/`.
    pub http: bool,
    /// Shared with everyone, signed in or not.
    pub public: bool,
    /// Clubs the share is for (by club name), when not public.
    pub clubs: Vec<String>,
    /// What it is, in the owner's words (any language).
    pub description: String,
}

impl ShareInfo {
    /// Checks what an agent (or a server) must not accept from the other side.
    pub fn check(&self) -> Result<(), String> {
        if !crate::valid_name(&self.name) {
            return Err(format!(
                "share name {:?} must be 1-64 letters, digits, '.', '_' or '-'",
                self.name
            ));
        }
        if self.public != self.clubs.is_empty() {
            return Err(format!(
                "share {} must name at least one club or be public, not both",
                self.name
            ));
        }
        if self.clubs.len() > MAX_SHARE_CLUBS {
            return Err(format!(
                "share {} names {} clubs; at most {MAX_SHARE_CLUBS}",
                self.name,
                self.clubs.len()
            ));
        }
        if let Some(bad) = self.clubs.iter().find(|c| !crate::valid_name(c)) {
            return Err(format!("club name {bad:?} is not a valid name"));
        }
        if self.description.len() > MAX_DESCRIPTION {
            return Err(format!(
                "share {}'s description is longer than {MAX_DESCRIPTION} bytes",
                self.name
            ));
        }
        Ok(())
    }
}

/// What a consumer asks for on a stream it opens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamRequest {
    /// The directory as this agent's user sees it; `query` filters by keyword.
    Peers {
        /// Keyword to search owners, devices, service names and descriptions for.
        query: Option<String>,
    },
    /// A tunnel to a share.
    Tunnel(TunnelOpen),
    /// A tunnel to a share on a direct connection to the providing agent: the server
    /// checks it as for [`StreamRequest::Tunnel`], tells the provider to expect this
    /// agent, and answers [`StreamAnswer::Direct`]. The stream then stays open, carrying
    /// nothing, while the tunnel lasts: the consumer finishes it when the tunnel ends
    /// (the server records the session's end), or resets it with [`DIRECT_FAILED`]
    /// when the provider could not be reached.
    Direct(TunnelOpen),
}

/// A consumer's request for a tunnel: `OWNER/SERVICE` or `OWNER@DEVICE/SERVICE`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelOpen {
    /// The share owner's login.
    pub owner: String,
    /// The owner's device (agent name), when they share the service from several.
    pub device: Option<String>,
    /// The share's name.
    pub service: String,
}

impl TunnelOpen {
    /// Parses `OWNER/SERVICE` or `OWNER@DEVICE/SERVICE`.
    pub fn parse(target: &str) -> Result<TunnelOpen, String> {
        let bad = || {
            format!(
                "{target:?} is not OWNER/SERVICE or OWNER@DEVICE/SERVICE (for example alice/web)"
            )
        };
        let (peer, service) = target.split_once('/').ok_or_else(bad)?;
        let (owner, device) = match peer.split_once('@') {
            Some((owner, device)) => (owner, Some(device.to_string())),
            None => (peer, None),
        };
        let names = [Some(owner), device.as_deref(), Some(service)];
        if names.into_iter().flatten().any(|n| !crate::valid_name(n)) {
            return Err(bad());
        }
        Ok(TunnelOpen {
            owner: owner.to_string(),
            device,
            service: service.to_string(),
        })
    }
}

impl std::fmt::Display for TunnelOpen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.device {
            Some(device) => write!(f, "{}@{device}/{}", self.owner, self.service),
            None => write!(f, "{}/{}", self.owner, self.service),
        }
    }
}

/// The server's answer to a [`StreamRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamAnswer {
    /// The directory.
    Peers(Vec<PeerDevice>),
    /// The tunnel is open through the server; the stream now carries the service's bytes.
    Relayed {
        /// The server's session id (both ends record it).
        session: i64,
        /// The providing agent's id.
        provider: String,
    },
    /// Refused; the reason is for people.
    Refused(String),
    /// The provider expects this agent on a direct connection for `session`: connect to
    /// one of `candidates` (authenticating the provider by `provider_key`), then open a
    /// stream whose first frame is [`DirectOpen`].
    Direct {
        /// The server's session id, which the provider was told to expect.
        session: i64,
        /// The providing agent's Ed25519 key, the only one its certificate may carry.
        provider_key: [u8; 32],
        /// Addresses its endpoint may be reached at: those it reports and the one the
        /// server sees, with the port it listens on.
        candidates: Vec<SocketAddr>,
    },
    /// The provider is connected to another node of the server's cluster: ask again
    /// there (`host:port`), where the tunnel is spliced or brokered (protocol minor 4).
    Elsewhere {
        /// The node's address.
        server: String,
    },
}

/// The stream reset code a consumer gives up a direct session with, when no candidate
/// address answered (it then uses the relay).
pub const DIRECT_FAILED: u32 = 2;
/// The stream reset code a consumer ends a direct session with when the provider
/// refused the direct stream.
pub const DIRECT_REFUSED: u32 = 3;

/// An online device in the directory, with the services its owner shares with the viewer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerDevice {
    /// Owner's login (empty for a device linked to nobody: only its public shares show).
    pub owner: String,
    /// Device (agent) name.
    pub device: String,
    /// Agent id.
    pub agent_id: String,
    /// Connected since (server time).
    pub online_since: Millis,
    /// Addresses the device reports.
    pub reported: Vec<IpAddr>,
    /// Address the server sees it connect from.
    pub observed: Option<SocketAddr>,
    /// Shares the viewer may reach.
    pub services: Vec<PeerService>,
}

/// A share as the directory lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerService {
    /// Share name.
    pub name: String,
    /// Reachable from a browser.
    pub http: bool,
    /// Shared with everyone.
    pub public: bool,
    /// The share's clubs that the viewer belongs to.
    pub clubs: Vec<String>,
    /// Description.
    pub description: String,
}

/// Who a tunnel is for, as the server vouches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Consumer {
    /// Another agent.
    Agent {
        /// Its id (from its certificate).
        agent_id: String,
        /// The login of the user it is linked to, if any.
        user: Option<String>,
    },
    /// A web browser through the server's HTTPS (`/p/OWNER/SERVICE/`).
    Browser {
        /// The signed-in console user, if any (public shares need none).
        user: Option<String>,
        /// The browser's address as the server sees it.
        address: String,
    },
}

/// First frame of a stream the server opens to a providing agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelOffer {
    /// The server's session id.
    pub session: i64,
    /// Share name.
    pub share: String,
    /// Who is asking.
    pub consumer: Consumer,
    /// The share's clubs the server vouches the consumer belongs to (empty for a public
    /// share reached by a non-member).
    pub clubs: Vec<String>,
}

/// The providing agent's answer to a [`TunnelOffer`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OfferAnswer {
    /// Connected to the local service; the stream now carries its bytes.
    Accepted,
    /// Refused; the reason is for people (and for the server's session record).
    Refused(String),
    /// The answer to a [`DirectOffer`]: the consumer is expected on a direct connection
    /// to the endpoint listening on `port`.
    Expecting {
        /// The UDP port of the provider's endpoint (its link's).
        port: u16,
    },
}

/// First frame of a stream the server opens to a providing agent to have it *expect* a
/// consumer agent on a direct connection, for [`DirectOffer::offer`]'s session.
///
/// It encodes as the [`TunnelOffer`] followed by the consumer's address, so an agent
/// that predates direct paths reads trailing bytes and refuses it (the consumer then
/// uses the relay), and a relayed offer never decodes as one ([`Offer::decode`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectOffer {
    /// The session, share, consumer (always an agent) and vouched clubs, as relayed.
    pub offer: TunnelOffer,
    /// The consumer's address as the server sees it (for the provider's log).
    pub consumer_address: SocketAddr,
}

/// What a stream the server opens to a providing agent starts with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offer {
    /// A tunnel through the relay, on this stream.
    Tunnel(TunnelOffer),
    /// A consumer to expect on a direct connection.
    Direct(DirectOffer),
}

impl Offer {
    /// Decodes a frame's payload as either kind: a [`DirectOffer`] when the whole
    /// payload is one, otherwise a [`TunnelOffer`].
    pub fn decode(payload: &[u8], limit: usize) -> Result<Offer, crate::codec::CodecError> {
        match crate::codec::from_bytes::<DirectOffer>(payload, limit) {
            Ok(direct) => Ok(Offer::Direct(direct)),
            Err(_) => crate::codec::from_bytes::<TunnelOffer>(payload, limit).map(Offer::Tunnel),
        }
    }
}

/// First frame of a stream a consumer opens on a direct connection to a provider; the
/// provider answers one [`OfferAnswer`] (`Accepted` or `Refused`), then the stream
/// carries the service's bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectOpen {
    /// The session the server told the provider to expect from this agent.
    pub session: i64,
}

/// Which end of a tunnel session signed a [`SessionUsage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum End {
    /// The agent whose share was reached.
    Provider,
    /// The agent that reached it (`herald-agent connect`).
    Consumer,
}

impl End {
    /// `provider` or `consumer`, as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            End::Provider => "provider",
            End::Consumer => "consumer",
        }
    }
}

/// One end's cumulative counters of a tunnel session, signed by that end's agent and
/// sent as [`crate::message::Report::Usage`] through its report outbox: at intervals
/// while the session is open and once more when it closes (`last`). Each is the whole
/// count so far, so a lost one costs nothing but its interval. The server bills the
/// lower of both ends' counts (a browser session has only the provider's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionUsage {
    /// The signing agent (derived from the key; checked by verifiers).
    pub agent_id: String,
    /// The server's session id.
    pub session: i64,
    /// Which end signs.
    pub end: End,
    /// 0, 1, 2… per session and end; the highest is the latest count.
    pub seq: u32,
    /// Bytes from the consumer to the provider, as this end counted them.
    pub bytes_up: u64,
    /// Bytes from the provider to the consumer.
    pub bytes_down: u64,
    /// Requests (connections) carried: 1 for a tunnel.
    pub requests: u64,
    /// Seconds open so far, rounded up.
    pub seconds: u64,
    /// The session has closed at this end: no later count follows.
    pub last: bool,
    /// When, by the agent's guarded clock.
    pub at: Millis,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnel_targets_parse_and_print() {
        let t = TunnelOpen::parse("alice/web").unwrap();
        assert_eq!(
            (t.owner.as_str(), t.device, t.service.as_str()),
            ("alice", None, "web")
        );
        let t = TunnelOpen::parse("alice@laptop/web").unwrap();
        assert_eq!(t.device.as_deref(), Some("laptop"));
        assert_eq!(t.to_string(), "alice@laptop/web");
        for bad in [
            "alice",
            "/web",
            "alice/",
            "alice@/web",
            "a b/web",
            "alice/web/x",
        ] {
            assert!(TunnelOpen::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn offers_decode_as_the_kind_they_were_sent_as() {
        let offer = TunnelOffer {
            session: 7,
            share: "web".into(),
            consumer: Consumer::Agent {
                agent_id: "bob-agent".into(),
                user: Some("bob".into()),
            },
            clubs: vec!["chess".into()],
        };
        let direct = DirectOffer {
            offer: offer.clone(),
            consumer_address: "198.51.100.7:4000".parse().unwrap(),
        };
        let limit = crate::codec::DEFAULT_FRAME_LIMIT;
        let relayed = crate::codec::to_bytes(&offer).unwrap();
        let expected = crate::codec::to_bytes(&direct).unwrap();
        assert_eq!(
            Offer::decode(&relayed, limit).unwrap(),
            Offer::Tunnel(offer)
        );
        assert_eq!(
            Offer::decode(&expected, limit).unwrap(),
            Offer::Direct(direct)
        );
        // An agent that knows only relayed offers refuses a direct one.
        assert!(crate::codec::from_bytes::<TunnelOffer>(&expected, limit).is_err());
        assert!(Offer::decode(b"\xff", limit).is_err());
    }

    #[test]
    fn shares_name_clubs_or_are_public() {
        let share = ShareInfo {
            name: "web".into(),
            http: true,
            public: false,
            clubs: vec!["chess".into()],
            description: "Ma page d'échecs 체스".into(),
        };
        share.check().unwrap();
        let both = ShareInfo {
            public: true,
            ..share.clone()
        };
        assert!(both.check().is_err());
        let neither = ShareInfo {
            clubs: vec![],
            ..share.clone()
        };
        assert!(neither.check().is_err());
        let bad_club = ShareInfo {
            clubs: vec!["no spaces".into()],
            ..share.clone()
        };
        assert!(bad_club.check().is_err());
        let long = ShareInfo {
            description: "x".repeat(MAX_DESCRIPTION + 1),
            ..share
        };
        assert!(long.check().is_err());
    }
}
