//! Requests on streams agents open: the directory (`herald-agent peers`) and tunnels
//! through the relay (`herald-agent connect`).
//!
//! An agent opens them on a *side connection* (a connection whose first stream starts
//! with `AgentMsg::Request`; it is admitted like a link, enrolled and active agents only,
//! but not registered as the agent's link) or on its link. Each stream carries one
//! request and its [`StreamAnswer`]; a tunnel's stream then carries the service's bytes.
//!
//! # Who reaches what
//!
//! The consumer is the agent's owner (the user it is linked to; an agent linked to nobody
//! sees public shares only). The directory is the store's
//! ([`crate::store::Store::directory`]) narrowed to devices online now. A tunnel resolves
//! `OWNER[@DEVICE]/SERVICE` among those entries ([`resolve`]), records a session
//! ([`Via::Relay`]), and offers it to the provider with the clubs the consumer and the
//! share have in common; the provider decides from its own table
//! ([`Relay::offer`]). Every refusal is answered with its reason and logged; those
//! that got as far as a provider are recorded as sessions too.
//!
//! A *direct* tunnel (`StreamRequest::Direct`) is resolved and checked the same way and
//! recorded with [`Via::Direct`]; the provider is told to expect the consumer agent for
//! that session ([`herald_shared::peers::DirectOffer`], answered with its endpoint's
//! port), and the consumer gets the provider's key and the addresses to try. The bytes
//! then go between the agents: the server holds the request stream until the consumer
//! ends it, and records the session's end with no bytes (it saw none).
//!
//! # Bytes
//!
//! The two streams are spliced chunk by chunk (`read_chunk`/`write_chunk`: the bytes
//! quinn received are handed on without a copy), each direction finishing the other
//! side when it ends; a failure on either resets both.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use quinn::{Connection, RecvStream, SendStream};
use tracing::{debug, info, warn};

use herald_shared::codec::DEFAULT_FRAME_LIMIT;
use herald_shared::peers::{
    Consumer, DirectOffer, OfferAnswer, PeerDevice, StreamAnswer, StreamRequest, TunnelOffer,
    TunnelOpen, DIRECT_FAILED, DIRECT_REFUSED, IDLE_RESET,
};
use herald_shared::protocol::AgentMsg;

use super::{read_frame, write_frame, LinkError, OfferError, Relay, HELLO_TIMEOUT, OFFER_TIMEOUT};
use crate::model::{directory_view, DirectoryEntry, NewSession, SessionEnd, Via};
use crate::now_ms;
use crate::pki::KeyStatus;

/// Most bytes handed on per chunk.
const CHUNK: usize = 64 * 1024;

/// Most side connections one agent may have open at once (each `peers` or `connect`
/// holds one); more are refused, so one agent cannot tie up the relay with idle ones.
pub(super) const MAX_SIDE_CONNECTIONS: u32 = 16;

/// Side connections open per agent.
#[derive(Default)]
pub(super) struct Sides(Arc<Mutex<HashMap<String, u32>>>);

/// One open side connection's place under [`MAX_SIDE_CONNECTIONS`], freed on drop.
pub(super) struct SidePlace {
    sides: Arc<Mutex<HashMap<String, u32>>>,
    agent_id: String,
}

impl Sides {
    /// A place for another side connection of `agent_id`, unless it has the most.
    pub(super) fn enter(&self, agent_id: &str) -> Option<SidePlace> {
        let mut open = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(agent_id.to_string()).or_default();
        if *count >= MAX_SIDE_CONNECTIONS {
            return None;
        }
        *count += 1;
        Some(SidePlace {
            sides: self.0.clone(),
            agent_id: agent_id.to_string(),
        })
    }
}

impl Drop for SidePlace {
    fn drop(&mut self) {
        let mut open = self.sides.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.agent_id) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.agent_id);
            }
        }
    }
}

/// The agent asking, as the server knows it.
#[derive(Debug, Clone)]
struct Asker {
    agent_id: String,
    /// The user it is linked to: (id, login).
    owner: Option<(i64, String)>,
    /// Where its connection comes from.
    source: SocketAddr,
}

/// Why a tunnel request is not served by this node.
enum NotHere {
    /// Refused, with the reason for people.
    Refused(String),
    /// The provider is connected to the cluster's node at this address.
    Elsewhere(String),
}

impl From<String> for NotHere {
    fn from(reason: String) -> NotHere {
        NotHere::Refused(reason)
    }
}

impl Relay {
    /// A side connection: admitted like a link (an enrolled, active agent), then every
    /// stream it opens carries one request, starting with `first` on `send`/`recv`.
    pub(super) async fn side(
        self: Arc<Self>,
        connection: &Connection,
        key: &[u8],
        first: StreamRequest,
        mut send: SendStream,
        recv: RecvStream,
    ) -> Result<(), LinkError> {
        let agent_id = herald_shared::agent_id(key);
        if self.keyring.status(key) != KeyStatus::Enrolled || !self.store.agent_active(&agent_id)? {
            debug!(%agent_id, "side connection of an agent that is not enrolled refused");
            let answer = StreamAnswer::Refused(
                "this agent is not enrolled; run `herald-agent enroll TOKEN`".into(),
            );
            let _ = write_frame(&mut send, &answer).await;
            let _ = send.finish();
            let _ = tokio::time::timeout(HELLO_TIMEOUT, send.stopped()).await;
            connection.close(super::close::REFUSED.into(), b"not enrolled");
            return Ok(());
        }
        let Some(_place) = self.sides.enter(&agent_id) else {
            warn!(%agent_id, "side connection refused: {MAX_SIDE_CONNECTIONS} already open");
            let answer = StreamAnswer::Refused(format!(
                "this agent already has {MAX_SIDE_CONNECTIONS} `peers` or `connect` connections open; end one first"
            ));
            let _ = write_frame(&mut send, &answer).await;
            let _ = send.finish();
            let _ = tokio::time::timeout(HELLO_TIMEOUT, send.stopped()).await;
            connection.close(super::close::REFUSED.into(), b"too many side connections");
            return Ok(());
        };
        debug!(%agent_id, remote = %connection.remote_address(), "side connection");
        let relay = self.clone();
        let source = connection.remote_address();
        let requester = agent_id.clone();
        tokio::spawn(async move {
            relay.request(&requester, source, first, send, recv).await;
        });
        self.accept_requests(connection, &agent_id).await
    }

    /// Serves the streams an agent opens on `connection` (a side connection, or its
    /// link besides the control stream): each is one request, in a task of its own.
    pub(super) async fn accept_requests(
        self: Arc<Self>,
        connection: &Connection,
        agent_id: &str,
    ) -> Result<(), LinkError> {
        loop {
            let (send, mut recv) = connection.accept_bi().await?;
            let relay = self.clone();
            let agent_id = agent_id.to_string();
            let source = connection.remote_address();
            tokio::spawn(async move {
                let first = tokio::time::timeout(
                    HELLO_TIMEOUT,
                    read_frame::<AgentMsg>(&mut recv, DEFAULT_FRAME_LIMIT),
                )
                .await;
                match first {
                    Ok(Ok(Some(AgentMsg::Request(request)))) => {
                        relay.request(&agent_id, source, request, send, recv).await
                    }
                    Ok(Ok(None)) => {}
                    other => {
                        warn!(%agent_id, "a stream the agent opened carried no request: {other:?}");
                        let _ = recv.stop(0u32.into());
                    }
                }
            });
        }
    }

    /// Answers one request.
    async fn request(
        &self,
        agent_id: &str,
        source: SocketAddr,
        request: StreamRequest,
        mut send: SendStream,
        recv: RecvStream,
    ) {
        let owner = match self.store.agent_owner_login(agent_id) {
            Ok(owner) => owner,
            Err(e) => {
                warn!(%agent_id, "cannot read the agent's owner: {e}");
                return answer(
                    send,
                    StreamAnswer::Refused("the server cannot read its store".into()),
                )
                .await;
            }
        };
        let asker = Asker {
            agent_id: agent_id.to_string(),
            owner,
            source,
        };
        match request {
            StreamRequest::Peers { query } => {
                let reply = match self.peers_for(&asker, query.as_deref()) {
                    Ok(devices) => StreamAnswer::Peers(devices),
                    Err(e) => {
                        warn!(%agent_id, "cannot read the directory: {e}");
                        StreamAnswer::Refused("the server cannot read the directory".into())
                    }
                };
                answer(send, reply).await;
            }
            StreamRequest::Tunnel(open) => match self.open_tunnel(&asker, &open).await {
                Ok(Opened {
                    session,
                    provider,
                    streams,
                }) => {
                    let relayed = StreamAnswer::Relayed {
                        session,
                        provider: provider.clone(),
                    };
                    if let Err(e) = write_frame(&mut send, &relayed).await {
                        self.end_session(session, 0, 0, &format!("failed: {e}"));
                        return;
                    }
                    info!(session, consumer = %agent_id, %provider, target = %open, "tunnel open");
                    let (up, down, outcome) = splice((send, recv), streams).await;
                    info!(session, up, down, %outcome, "tunnel closed");
                    self.end_session(session, up, down, &outcome);
                }
                Err(NotHere::Elsewhere(server)) => {
                    let _ = recv;
                    answer(send, StreamAnswer::Elsewhere { server }).await;
                }
                Err(NotHere::Refused(reason)) => {
                    warn!(consumer = %agent_id, user = ?asker.owner.as_ref().map(|o| &o.1), target = %open, "tunnel refused: {reason}");
                    let _ = recv;
                    answer(send, StreamAnswer::Refused(reason)).await;
                }
            },
            StreamRequest::Direct(open) => self.direct(&asker, &open, send, recv).await,
        }
    }

    /// A direct tunnel: checked and recorded as a relayed one would be, expected by the
    /// provider, answered with where to reach it; then the stream is held until the
    /// consumer finishes it (the session's end) or gives up on the direct path.
    async fn direct(
        &self,
        asker: &Asker,
        open: &TunnelOpen,
        mut send: SendStream,
        mut recv: RecvStream,
    ) {
        let brokered = match self.broker_direct(asker, open).await {
            Ok(brokered) => brokered,
            Err(NotHere::Elsewhere(server)) => {
                return answer(send, StreamAnswer::Elsewhere { server }).await;
            }
            Err(NotHere::Refused(reason)) => {
                warn!(consumer = %asker.agent_id, target = %open, "direct tunnel refused: {reason}");
                return answer(send, StreamAnswer::Refused(reason)).await;
            }
        };
        let session = brokered.session;
        if let Err(e) = write_frame(&mut send, &brokered.answer).await {
            self.end_session(session, 0, 0, &format!("failed: {e}"));
            return;
        }
        info!(session, consumer = %asker.agent_id, provider = %brokered.provider, target = %open, "direct tunnel brokered");
        let outcome = direct_end(&mut recv).await;
        info!(session, %outcome, "direct tunnel ended");
        // The bytes went between the agents: the server saw none of them.
        self.end_session(session, 0, 0, &outcome);
        let _ = send.finish();
    }

    /// Resolves a direct tunnel request, records its session ([`Via::Direct`]) and has
    /// the provider expect the consumer.
    async fn broker_direct(&self, asker: &Asker, open: &TunnelOpen) -> Result<Brokered, NotHere> {
        let entry = self.reachable(asker, open)?;
        self.held_here(&entry)?;
        let session = self
            .start_session(asker, &entry, Via::Direct)
            .map_err(internal)?;
        let offer = DirectOffer {
            offer: tunnel_offer(session, asker, &entry),
            consumer_address: asker.source,
        };
        match self.expect(&entry.agent_id, &offer).await {
            Ok(Expecting {
                port,
                provider_key,
                observed,
            }) => Ok(Brokered {
                session,
                provider: entry.agent_id.clone(),
                answer: StreamAnswer::Direct {
                    session,
                    provider_key,
                    candidates: candidates(&entry.reported, observed, port),
                },
            }),
            Err(e) => Err(NotHere::Refused(self.offer_failed(session, e))),
        }
    }

    /// Tells a connected provider to expect a direct consumer: opens a stream on its
    /// link, sends `offer` and waits (at most [`OFFER_TIMEOUT`]) for its answer.
    async fn expect(&self, provider: &str, offer: &DirectOffer) -> Result<Expecting, OfferError> {
        let connection = self
            .lock_links()
            .get(provider)
            .map(|l| l.connection.clone())
            .ok_or(OfferError::Offline)?;
        let provider_key = herald_io::tls::peer_agent_key(&connection)
            .ok_or_else(|| OfferError::Failed("the device's link carries no agent key".into()))?;
        let exchange = async {
            let (mut send, mut recv) = connection.open_bi().await?;
            write_frame(&mut send, offer).await?;
            let answer = read_frame::<OfferAnswer>(&mut recv, DEFAULT_FRAME_LIMIT).await?;
            let _ = send.finish();
            Ok::<_, LinkError>(answer)
        };
        match tokio::time::timeout(OFFER_TIMEOUT, exchange).await {
            Err(_) => Err(OfferError::NoAnswer),
            Ok(Err(e)) => Err(OfferError::Failed(e.to_string())),
            Ok(Ok(None)) => Err(OfferError::Failed("the agent closed the stream".into())),
            Ok(Ok(Some(OfferAnswer::Refused(reason)))) => Err(OfferError::Refused(reason)),
            Ok(Ok(Some(OfferAnswer::Accepted))) => Err(OfferError::Failed(
                "the device took a direct offer for a relayed one".into(),
            )),
            Ok(Ok(Some(OfferAnswer::Expecting { port }))) => Ok(Expecting {
                port,
                provider_key,
                observed: connection.remote_address(),
            }),
        }
    }

    /// The directory as `asker`'s owner sees it, online devices only.
    fn peers_for(
        &self,
        asker: &Asker,
        query: Option<&str>,
    ) -> Result<Vec<PeerDevice>, crate::store::StoreError> {
        let entries = self
            .store
            .directory(asker.owner.as_ref().map(|o| o.0), None)?;
        // The console's view of the same directory, without favourites (`peers` has none).
        Ok(directory_view(
            entries,
            |agent_id| self.online_since(agent_id),
            query.unwrap_or_default(),
            &Default::default(),
        ))
    }

    /// Resolves a tunnel request, records its session and has the provider accept it.
    async fn open_tunnel(&self, asker: &Asker, open: &TunnelOpen) -> Result<Opened, NotHere> {
        let entry = self.reachable(asker, open)?;
        self.held_here(&entry)?;
        let session = self
            .start_session(asker, &entry, Via::Relay)
            .map_err(internal)?;
        let offer = tunnel_offer(session, asker, &entry);
        match self.offer(&entry.agent_id, &offer).await {
            Ok(streams) => Ok(Opened {
                session,
                provider: entry.agent_id.clone(),
                streams,
            }),
            Err(e) => Err(NotHere::Refused(self.offer_failed(session, e))),
        }
    }

    /// Whether the entry's provider is connected to this node; else which node holds it
    /// (the consumer asks that node: tunnels are not spliced between nodes).
    fn held_here(&self, entry: &DirectoryEntry) -> Result<(), NotHere> {
        match self.node_of(&entry.agent_id) {
            Some(node) => Err(NotHere::Elsewhere(node)),
            None => Ok(()),
        }
    }

    /// The online share a tunnel request names, if the asker may reach it (the same
    /// rules for relayed and direct tunnels); a share whose device is offline is
    /// recorded as a refused session.
    fn reachable(&self, asker: &Asker, open: &TunnelOpen) -> Result<DirectoryEntry, String> {
        let viewer = asker.owner.as_ref().map(|o| o.0);
        let entries = self
            .store
            .directory(viewer, Some(&open.owner))
            .map_err(internal)?;
        let entry = match resolve(&entries, open, |id| self.online_since(id).is_some()) {
            Ok(entry) => entry,
            Err(Unresolved::NoOwner) => {
                let exists = self
                    .store
                    .user_by_login(&open.owner)
                    .map_err(internal)?
                    .is_some();
                return Err(if exists {
                    format!("{} shares nothing with you", open.owner)
                } else {
                    format!("there is no user named {}", open.owner)
                });
            }
            Err(Unresolved::Refused(reason)) => return Err(reason),
            Err(Unresolved::Offline(entry)) => {
                let reason = format!(
                    "{}'s device {} sharing {} is offline",
                    entry.owner, entry.device, entry.service.name
                );
                if let Ok(session) = self.start_session(asker, entry, Via::Relay) {
                    self.end_session(session, 0, 0, &format!("refused: {reason}"));
                }
                return Err(reason);
            }
        };
        Ok(entry.clone())
    }

    fn start_session(
        &self,
        asker: &Asker,
        entry: &DirectoryEntry,
        via: Via,
    ) -> Result<i64, crate::store::StoreError> {
        self.store.open_session(&NewSession {
            provider_agent_id: entry.agent_id.clone(),
            share: entry.service.name.clone(),
            provider_user_id: entry.owner_user_id,
            consumer_user_id: asker.owner.as_ref().map(|o| o.0),
            consumer_agent_id: Some(asker.agent_id.clone()),
            via,
            source: asker.source.to_string(),
            path: String::new(),
            started_at: now_ms(),
        })
    }

    fn end_session(&self, session: i64, up: u64, down: u64, outcome: &str) {
        let end = SessionEnd {
            bytes_up: up,
            bytes_down: down,
            requests: 0,
            outcome: outcome.to_string(),
            ended_at: now_ms(),
        };
        if let Err(e) = self.store.close_session(session, &end) {
            warn!(session, "cannot record the end of a tunnel session: {e}");
        }
    }
}

impl Relay {
    /// Ends a session whose offer the provider did not take (`failed: …` when it could
    /// not answer, `refused: …` otherwise); returns the reason for the consumer.
    fn offer_failed(&self, session: i64, e: OfferError) -> String {
        let outcome = match &e {
            OfferError::Failed(_) => format!("failed: {e}"),
            _ => format!("refused: {e}"),
        };
        self.end_session(session, 0, 0, &outcome);
        e.to_string()
    }
}

fn internal(e: crate::store::StoreError) -> String {
    warn!("tunnel: {e}");
    "the server cannot read its store".to_string()
}

/// The offer for `entry`'s share to `asker`, with the clubs they have in common.
fn tunnel_offer(session: i64, asker: &Asker, entry: &DirectoryEntry) -> TunnelOffer {
    TunnelOffer {
        session,
        share: entry.service.name.clone(),
        consumer: Consumer::Agent {
            agent_id: asker.agent_id.clone(),
            user: asker.owner.as_ref().map(|o| o.1.clone()),
        },
        clubs: entry.service.clubs.clone(),
    }
}

/// A provider's yes to a direct offer.
struct Expecting {
    /// Its endpoint's port.
    port: u16,
    /// Its key, from its link's handshake.
    provider_key: [u8; 32],
    /// Where its link comes from now.
    observed: SocketAddr,
}

/// A direct tunnel the provider expects.
struct Brokered {
    session: i64,
    provider: String,
    answer: StreamAnswer,
}

/// The addresses a consumer tries for a provider whose endpoint listens on `port`:
/// every address it reports and the one its link comes from, with that port, and the
/// observed address as it is (a NAT that maps the endpoint to one outside port for every
/// destination forwards it there). Unspecified addresses are skipped; no duplicates.
fn candidates(reported: &str, observed: SocketAddr, port: u16) -> Vec<SocketAddr> {
    let reported = reported
        .split([',', ' '])
        .filter_map(|a| a.trim().parse::<std::net::IpAddr>().ok());
    let mut all: Vec<SocketAddr> = Vec::new();
    let with_port = std::iter::once(observed.ip())
        .chain(reported)
        .map(|ip| SocketAddr::new(ip, port));
    for addr in with_port.chain(std::iter::once(observed)) {
        if !addr.ip().is_unspecified() && addr.port() != 0 && !all.contains(&addr) {
            all.push(addr);
        }
    }
    all
}

/// Waits for the consumer to end a direct session's stream; returns the outcome.
async fn direct_end(recv: &mut RecvStream) -> String {
    match recv.read_chunk(CHUNK, true).await {
        Ok(None) => "closed".to_string(),
        Ok(Some(_)) => {
            let _ = recv.stop(0u32.into());
            "failed: the consumer sent bytes on a direct session's request stream".to_string()
        }
        Err(quinn::ReadError::Reset(code)) if code == DIRECT_FAILED.into() => {
            "failed: the consumer could not reach the device directly (it used the relay)"
                .to_string()
        }
        Err(quinn::ReadError::Reset(code)) if code == DIRECT_REFUSED.into() => {
            "refused: the device refused the direct stream".to_string()
        }
        Err(e) => format!("failed: {e}"),
    }
}

/// A tunnel the provider accepted.
struct Opened {
    session: i64,
    provider: String,
    streams: (SendStream, RecvStream),
}

async fn answer(mut send: SendStream, answer: StreamAnswer) {
    if write_frame(&mut send, &answer).await.is_ok() {
        let _ = send.finish();
        let _ = tokio::time::timeout(HELLO_TIMEOUT, send.stopped()).await;
    }
}

/// Why a tunnel request resolves to no online share.
#[derive(Debug, PartialEq)]
enum Unresolved<'a> {
    /// Nothing of that owner is visible to the consumer.
    NoOwner,
    /// The share exists for the consumer but its device is offline.
    Offline(&'a DirectoryEntry),
    /// Another reason, for people.
    Refused(String),
}

/// Finds the entry a tunnel request names among those the consumer may reach.
fn resolve<'a>(
    entries: &'a [DirectoryEntry],
    open: &TunnelOpen,
    online: impl Fn(&str) -> bool,
) -> Result<&'a DirectoryEntry, Unresolved<'a>> {
    let owners: Vec<&DirectoryEntry> = entries.iter().filter(|e| e.owner == open.owner).collect();
    if owners.is_empty() {
        return Err(Unresolved::NoOwner);
    }
    let named: Vec<&DirectoryEntry> = owners
        .into_iter()
        .filter(|e| e.service.name == open.service)
        .filter(|e| open.device.as_ref().is_none_or(|d| &e.device == d))
        .collect();
    let Some(first) = named.first() else {
        let from = open
            .device
            .as_ref()
            .map(|d| format!(" from {d}"))
            .unwrap_or_default();
        return Err(Unresolved::Refused(format!(
            "{} shares no service {}{from} with you",
            open.owner, open.service
        )));
    };
    let up: Vec<&DirectoryEntry> = named
        .iter()
        .copied()
        .filter(|e| online(&e.agent_id))
        .collect();
    match up.as_slice() {
        [] => Err(Unresolved::Offline(first)),
        [one] => Ok(one),
        several => Err(Unresolved::Refused(format!(
            "{} shares {} from several devices ({}); ask for {}@DEVICE/{}",
            open.owner,
            open.service,
            several
                .iter()
                .map(|e| e.device.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            open.owner,
            open.service
        ))),
    }
}

/// Moves bytes between the consumer's streams and the provider's until both directions
/// have finished or one fails; returns (bytes up, bytes down, outcome).
async fn splice(
    consumer: (SendStream, RecvStream),
    provider: (SendStream, RecvStream),
) -> (u64, u64, String) {
    let (mut to_consumer, mut from_consumer) = consumer;
    let (mut to_provider, mut from_provider) = provider;
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    let result = tokio::try_join!(
        pump(&mut from_consumer, &mut to_provider, &up),
        pump(&mut from_provider, &mut to_consumer, &down),
    );
    let outcome = match result {
        Ok(_) => "closed".to_string(),
        Err(Ended::Idle) => {
            // The provider closed an idle tunnel: pass that on as it is.
            let _ = to_consumer.reset(IDLE_RESET.into());
            let _ = from_consumer.stop(IDLE_RESET.into());
            "idle".to_string()
        }
        Err(Ended::Failed(e)) => {
            // Neither side may take a cut-off stream for a finished one.
            let _ = to_consumer.reset(0u32.into());
            let _ = to_provider.reset(0u32.into());
            let _ = from_consumer.stop(0u32.into());
            let _ = from_provider.stop(0u32.into());
            format!("failed: {e}")
        }
    };
    (up.into_inner(), down.into_inner(), outcome)
}

/// Why a direction of a splice ended early.
#[derive(Debug)]
enum Ended {
    /// The provider reset its stream for idleness.
    Idle,
    /// A stream failed.
    Failed(String),
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ended::Idle => f.write_str("idle"),
            Ended::Failed(e) => f.write_str(e),
        }
    }
}

/// One direction: chunks from `from` handed to `to` as they are, then `to` finished.
async fn pump(from: &mut RecvStream, to: &mut SendStream, count: &AtomicU64) -> Result<(), Ended> {
    loop {
        match from.read_chunk(CHUNK, true).await {
            Ok(Some(chunk)) => {
                let n = chunk.bytes.len() as u64;
                to.write_chunk(chunk.bytes)
                    .await
                    .map_err(|e| Ended::Failed(format!("write: {e}")))?;
                count.fetch_add(n, Ordering::Relaxed);
            }
            Ok(None) => {
                let _ = to.finish();
                return Ok(());
            }
            Err(quinn::ReadError::Reset(code)) if code == IDLE_RESET.into() => {
                return Err(Ended::Idle)
            }
            Err(e) => return Err(Ended::Failed(format!("read: {e}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_shared::peers::PeerService;

    fn entry(owner: &str, device: &str, service: &str) -> DirectoryEntry {
        DirectoryEntry {
            agent_id: format!("id-{device}"),
            device: device.into(),
            owner: owner.into(),
            owner_user_id: Some(1),
            reported: "192.0.2.1,2001:db8::1".into(),
            observed: Some("198.51.100.7:4000".into()),
            service: PeerService {
                name: service.into(),
                http: false,
                public: false,
                clubs: vec!["chess".into()],
                description: String::new(),
            },
        }
    }

    #[test]
    fn requests_resolve_to_one_online_device_or_say_why_not() {
        let entries = [
            entry("alice", "laptop", "web"),
            entry("alice", "nas", "files"),
            entry("alice", "nas", "web"),
        ];
        let all = |_: &str| true;
        let open = |t: &str| TunnelOpen::parse(t).unwrap();
        assert_eq!(
            resolve(&entries, &open("alice/files"), all).unwrap().device,
            "nas"
        );
        assert_eq!(
            resolve(&entries, &open("alice@laptop/web"), all)
                .unwrap()
                .device,
            "laptop"
        );
        assert_eq!(
            resolve(&entries, &open("bob/web"), all),
            Err(Unresolved::NoOwner)
        );
        let refused = |r| match r {
            Err(Unresolved::Refused(reason)) => reason,
            other => panic!("{other:?}"),
        };
        assert!(refused(resolve(&entries, &open("alice/web"), all)).contains("(laptop, nas)"));
        assert!(refused(resolve(&entries, &open("alice/cam"), all)).contains("no service cam"));
        // Only the laptop is online: no ambiguity left.
        let laptop = |id: &str| id == "id-laptop";
        assert_eq!(
            resolve(&entries, &open("alice/web"), laptop)
                .unwrap()
                .device,
            "laptop"
        );
        assert!(matches!(
            resolve(&entries, &open("alice/files"), laptop),
            Err(Unresolved::Offline(e)) if e.device == "nas"
        ));
    }

    #[test]
    fn the_directory_groups_online_devices_with_their_addresses() {
        let entries = vec![
            entry("alice", "laptop", "web"),
            entry("alice", "nas", "files"),
            entry("alice", "nas", "web"),
        ];
        let devices = directory_view(
            entries,
            |id| (id == "id-nas").then_some(42),
            "",
            &Default::default(),
        );
        assert_eq!(devices.len(), 1);
        let nas = &devices[0];
        assert_eq!((nas.device.as_str(), nas.online_since), ("nas", 42));
        assert_eq!(
            nas.services
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>(),
            ["files", "web"]
        );
        assert_eq!(nas.reported.len(), 2);
        assert_eq!(nas.observed, Some("198.51.100.7:4000".parse().unwrap()));
    }

    #[test]
    fn direct_candidates_are_the_device_s_addresses_with_its_endpoint_s_port() {
        let observed: SocketAddr = "203.0.113.9:61000".parse().unwrap();
        let found = candidates("192.0.2.1,2001:db8::1, 0.0.0.0,nonsense", observed, 5000);
        let expected: Vec<SocketAddr> = [
            "203.0.113.9:5000",
            "192.0.2.1:5000",
            "[2001:db8::1]:5000",
            "203.0.113.9:61000",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        assert_eq!(found, expected);
        // Not behind a NAT: the observed address is the endpoint itself, once.
        let direct: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        assert_eq!(
            candidates("192.0.2.1", direct, 5000),
            vec![direct],
            "no duplicates"
        );
    }

    #[test]
    fn an_agent_s_side_connections_are_capped_and_freed() {
        let sides = Sides::default();
        let places: Vec<SidePlace> = (0..MAX_SIDE_CONNECTIONS)
            .map(|_| sides.enter("a").expect("under the cap"))
            .collect();
        assert!(sides.enter("a").is_none(), "one more than the cap");
        assert!(sides.enter("b").is_some(), "another agent has its own");
        drop(places);
        let again = sides.enter("a");
        assert!(again.is_some(), "freed on drop");
        drop(again);
        assert!(
            !sides.0.lock().unwrap().contains_key("a"),
            "an agent with none open leaves no entry"
        );
    }
}
