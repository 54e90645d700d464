//! The consumer's end of shared services: `herald-agent peers` (the directory) and
//! `herald-agent connect PEER/SERVICE` (a local listener whose connections become
//! tunnels), both on a *side connection*.
//!
//! A side connection is a QUIC connection of its own, authenticated with the agent's
//! identity like the daemon's link, whose first stream starts with a request
//! (`AgentMsg::Request`) instead of a `Hello`: the server answers requests on it and
//! does not take it for the agent's link, so the daemon stays connected meanwhile.
//! Every stream carries one request and its answer ([`herald_shared::peers`]); a tunnel's
//! stream then carries the service's bytes.
//!
//! # Paths
//!
//! `connect` tries a *direct* path first ([`crate::direct`]): for its first local
//! connection it asks the server for a direct session and dials the providing agent's
//! addresses for [`crate::direct::DIAL_TIMEOUT`]. If the dial succeeds, every local
//! connection becomes one stream of that direct connection (each with a fresh session
//! from the server, which the provider expects); if it fails, or the server or the
//! provider refuses a direct session, `connect` uses the relay for good: the server
//! splices this stream to one it opens to the providing agent. `--relay-only` skips the
//! direct path. `connect` prints the path it takes (`path: direct (ADDR)` or `path:
//! relay (direct failed: WHY)`).
//!
//! # Address changes
//!
//! The side connection's socket is bound to the unspecified address, so when this
//! machine's address changes its packets leave from the new one and QUIC migrates the
//! connection (the server accepts migration): open tunnels carry on. When the connection
//! is lost all the same, the tunnels on it end (their TCP connections are closed) and
//! the next local connection opens a new side connection.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quinn::{Connection, Endpoint, RecvStream, SendStream};
use tokio::net::TcpListener;
use tracing::{info, warn};

use herald_io::wire;
use herald_shared::codec::DEFAULT_FRAME_LIMIT;
use herald_shared::peers::{
    DirectOpen, End, OfferAnswer, PeerDevice, StreamAnswer, StreamRequest, TunnelOpen,
    DIRECT_FAILED, DIRECT_REFUSED,
};
use herald_shared::protocol::AgentMsg;

use crate::inbox::Inbox;
use crate::link::{self, LinkError};
use crate::shares::{Role, Shares};
use crate::state::{AgentConfig, Identity, StateError};
use crate::tunnel::{self, Limits};

/// How long connecting and each request's answer may take.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(20);

/// Errors of `peers` and `connect`.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The state directory is not an enrolled agent's.
    #[error(transparent)]
    State(#[from] StateError),
    /// TLS setup.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// Reaching the server failed.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The server did not answer in time.
    #[error("the server did not answer within {} s", ANSWER_TIMEOUT.as_secs())]
    Timeout,
    /// The server refused the request.
    #[error("refused: {0}")]
    Refused(String),
    /// The target is not in this agent's directory.
    #[error("{target} is not in your directory: {reason} (`herald-agent peers` lists what you can reach)")]
    NotListed {
        /// What was asked for.
        target: String,
        /// Why it is not there.
        reason: String,
    },
    /// The local listener could not be bound.
    #[error("cannot listen on {address}: {reason}")]
    Bind {
        /// Address.
        address: SocketAddr,
        /// Cause.
        reason: String,
    },
    /// The server answered something else.
    #[error("unexpected answer from the server: {0}")]
    Protocol(String),
    /// The local session records.
    #[error(transparent)]
    Shares(#[from] crate::shares::ShareError),
    /// The report outbox, where tunnel counters are signed for billing.
    #[error(transparent)]
    Inbox(#[from] crate::inbox::InboxError),
}

impl PeerError {
    /// Whether the person can fix it by asking differently (exit 64).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            PeerError::State(_) | PeerError::NotListed { .. } | PeerError::Bind { .. }
        )
    }
}

/// A side connection to the server, reopened when it is lost.
pub struct Side {
    endpoint: Endpoint,
    config: quinn::ClientConfig,
    /// The server's addresses; the one node that holds a provider after an
    /// [`StreamAnswer::Elsewhere`].
    server: std::sync::Mutex<String>,
    connection: tokio::sync::Mutex<Option<Connection>>,
    /// The agent's identity, for direct connections.
    identity: Identity,
}

// === impl Side ===

impl Side {
    /// Prepares a side connection for the enrolled agent in `state_dir` (connects on
    /// first use).
    pub async fn new(state_dir: &Path) -> Result<Side, PeerError> {
        let config = AgentConfig::load(state_dir)?;
        let identity = Identity::load_or_create(state_dir)?;
        let fingerprint = config.fingerprint().map_err(|reason| StateError::Invalid {
            path: state_dir.join(crate::state::AGENT_CONFIG),
            reason,
        })?;
        let client = crate::tls::client_config(fingerprint, &identity, crate::tls::KEEP_ALIVE)?;
        let addr = link::resolve(&config.server).await?;
        let endpoint = link::endpoint_for(addr).map_err(|e| LinkError::Connect {
            server: config.server.clone(),
            reason: e.to_string(),
        })?;
        Ok(Side {
            endpoint,
            config: client,
            server: std::sync::Mutex::new(config.server),
            connection: tokio::sync::Mutex::new(None),
            identity,
        })
    }

    /// The server's addresses.
    pub fn server(&self) -> String {
        self.server
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The live connection, or a new one.
    async fn connection(&self) -> Result<Connection, PeerError> {
        let mut held = self.connection.lock().await;
        if let Some(connection) = held.as_ref().filter(|c| c.close_reason().is_none()) {
            return Ok(connection.clone());
        }
        // Each further address of a cluster may cost its attempt's timeout first.
        let server = self.server();
        let extra = link::ATTEMPT_TIMEOUT * server.matches(',').count() as u32;
        let connection = tokio::time::timeout(
            ANSWER_TIMEOUT + extra,
            link::connect(&self.endpoint, self.config.clone(), &server),
        )
        .await
        .map_err(|_| PeerError::Timeout)??;
        info!(%server, "side connection open");
        *held = Some(connection.clone());
        Ok(connection)
    }

    /// Sends one request on a stream of its own; returns the stream with the answer. A
    /// connection found lost is replaced once.
    pub async fn request(
        &self,
        request: &StreamRequest,
    ) -> Result<(SendStream, RecvStream, StreamAnswer), PeerError> {
        let mut retried = false;
        let mut redirected = false;
        loop {
            let connection = self.connection().await?;
            match tokio::time::timeout(ANSWER_TIMEOUT, exchange(&connection, request)).await {
                // The provider is on another node of the cluster: ask that node (once;
                // the server's certificate is checked as for any node).
                Ok(Ok((_, _, StreamAnswer::Elsewhere { server }))) if !redirected => {
                    info!(%server, "the provider is connected to another node; asking it");
                    *self.server.lock().unwrap_or_else(|e| e.into_inner()) = server;
                    self.forget(&connection).await;
                    redirected = true;
                }
                // A server that restarted does not know the connection and cannot say so
                // (its reset key is new): give up on it rather than wait for the idle
                // timeout, and try once on a new one.
                Err(_) if !retried => {
                    warn!("no answer on the side connection; reconnecting");
                    self.forget(&connection).await;
                    retried = true;
                }
                Err(_) => return Err(PeerError::Timeout),
                Ok(Ok(answered)) => return Ok(answered),
                Ok(Err(e)) if !retried && connection.close_reason().is_some() => {
                    warn!("side connection lost ({e}); reconnecting");
                    retried = true;
                }
                Ok(Err(e)) => return Err(e),
            }
        }
    }

    /// Drops `connection` if it is still the one held, so the next request reconnects.
    async fn forget(&self, connection: &Connection) {
        let mut held = self.connection.lock().await;
        if held
            .as_ref()
            .is_some_and(|c| c.stable_id() == connection.stable_id())
        {
            connection.close(herald_shared::protocol::close::DONE.into(), b"no answer");
            *held = None;
        }
    }

    /// The directory as this agent's user sees it.
    pub async fn directory(&self, query: Option<String>) -> Result<Vec<PeerDevice>, PeerError> {
        let (_, _, answer) = self.request(&StreamRequest::Peers { query }).await?;
        match answer {
            StreamAnswer::Peers(devices) => Ok(devices),
            StreamAnswer::Refused(reason) => Err(PeerError::Refused(reason)),
            other => Err(PeerError::Protocol(format!("{other:?}"))),
        }
    }

    /// Closes the connection and waits briefly for the close to reach the server.
    pub async fn close(&self) {
        if let Some(connection) = self.connection.lock().await.take() {
            connection.close(herald_shared::protocol::close::DONE.into(), b"done");
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

async fn exchange(
    connection: &Connection,
    request: &StreamRequest,
) -> Result<(SendStream, RecvStream, StreamAnswer), PeerError> {
    let (mut send, mut recv) = connection.open_bi().await.map_err(LinkError::from)?;
    link::write_frame(&mut send, &AgentMsg::Request(request.clone())).await?;
    let answer = wire::read_frame::<StreamAnswer>(&mut recv, DEFAULT_FRAME_LIMIT)
        .await
        .map_err(LinkError::from)?
        .ok_or_else(|| {
            PeerError::Protocol("the server closed the stream without an answer".into())
        })?;
    Ok((send, recv, answer))
}

/// Finds `target` among the devices of the directory: its owner's device (the named
/// one, if any) that lists the service.
pub fn find<'a>(
    devices: &'a [PeerDevice],
    target: &TunnelOpen,
) -> Result<&'a PeerDevice, PeerError> {
    let not_listed = |reason: String| PeerError::NotListed {
        target: target.to_string(),
        reason,
    };
    let owners: Vec<&PeerDevice> = devices.iter().filter(|d| d.owner == target.owner).collect();
    if owners.is_empty() {
        return Err(not_listed(format!(
            "no online device of {} shares anything with you",
            target.owner
        )));
    }
    let offering: Vec<&PeerDevice> = owners
        .into_iter()
        .filter(|d| target.device.as_ref().is_none_or(|name| &d.device == name))
        .filter(|d| d.services.iter().any(|s| s.name == target.service))
        .collect();
    match offering.as_slice() {
        [] => Err(not_listed(format!(
            "{} shares no service {} with you{}",
            target.owner,
            target.service,
            target
                .device
                .as_ref()
                .map(|d| format!(" from {d}"))
                .unwrap_or_default()
        ))),
        [one] => Ok(one),
        several => Err(not_listed(format!(
            "{} shares {} from several devices ({}); name one as {}@DEVICE/{}",
            target.owner,
            target.service,
            several
                .iter()
                .map(|d| d.device.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            target.owner,
            target.service
        ))),
    }
}

/// `herald-agent connect`: checks the target in the directory, listens on `bind`, and
/// turns every local connection into a tunnel until `shutdown` resolves. `ready` is told
/// the line to print once listening.
pub async fn connect(
    state_dir: &Path,
    target: TunnelOpen,
    bind: SocketAddr,
    relay_only: bool,
    ready: impl FnOnce(String),
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), PeerError> {
    let shares = Shares::open(state_dir)?;
    let (inbox, config) = Inbox::open(state_dir)?;
    let usage = Arc::new(Usage {
        inbox,
        interval: config.peers.usage_interval(),
    });
    let side = Arc::new(Side::new(state_dir).await?);
    let devices = side.directory(None).await?;
    find(&devices, &target)?;
    let listener = TcpListener::bind(bind).await.map_err(|e| PeerError::Bind {
        address: bind,
        reason: e.to_string(),
    })?;
    let local = listener.local_addr().unwrap_or(bind);
    if relay_only {
        ready(format!(
            "{target}: relay through {}; listening on {local}",
            side.server()
        ));
    } else {
        ready(format!(
            "{target}: direct if reachable, else relay through {}; listening on {local}",
            side.server()
        ));
    }
    let path = Arc::new(tokio::sync::Mutex::new(if relay_only {
        Route::Relay
    } else {
        Route::Untried
    }));
    tokio::pin!(shutdown);
    loop {
        let (tcp, from) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!("accepting a local connection failed: {e}");
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let side = side.clone();
        let shares = shares.clone();
        let target = target.clone();
        let usage = usage.clone();
        let path = path.clone();
        tokio::spawn(async move {
            if let Some(tcp) = direct_one(&side, &shares, &usage, &target, &path, tcp, from).await {
                tunnel_one(&side, &shares, &usage, &target, tcp, from).await;
            }
        });
    }
    side.close().await;
    Ok(())
}

/// Where the consumer's end signs its counters of each session, and how often.
struct Usage {
    inbox: Inbox,
    interval: Duration,
}

/// Splices an accepted tunnel, the consumer's end: signs its counts as it goes and
/// records the session locally (`share sessions`).
#[allow(clippy::too_many_arguments)]
async fn use_session(
    shares: &Shares,
    usage: &Usage,
    session: i64,
    name: &str,
    peer: &str,
    tcp: tokio::net::TcpStream,
    send: SendStream,
    recv: RecvStream,
) -> tunnel::Spliced {
    let record = shares
        .open_session(Role::Used, session, name, peer, herald_io::now_ms())
        .map_err(|e| warn!("cannot record tunnel session {session}: {e}"))
        .ok();
    let meter = tunnel::Meter {
        inbox: &usage.inbox,
        session,
        end: End::Consumer,
        interval: usage.interval,
        // The daemon sends what is queued in the outbox within seconds.
        queued: &|_| {},
    };
    let spliced = tunnel::splice_metered(tcp, send, recv, Limits::default(), &meter).await;
    info!(session, %peer, up = spliced.to_stream, down = spliced.from_stream, outcome = %spliced.outcome, "tunnel closed");
    if let Some(id) = record {
        let end = shares.close_session(
            id,
            spliced.to_stream,
            spliced.from_stream,
            &spliced.outcome,
            herald_io::now_ms(),
        );
        if let Err(e) = end {
            warn!("cannot record the end of tunnel session {session}: {e}");
        }
    }
    spliced
}

/// How `connect` reaches the provider.
enum Route {
    /// The direct path was not tried yet.
    Untried,
    /// A direct connection to the provider holding `key`, at `addr`.
    Direct {
        connection: Connection,
        key: [u8; 32],
        addr: SocketAddr,
    },
    /// Through the relay, for good.
    Relay,
}

/// Prints the path `connect` takes.
fn announce(line: &str) {
    use std::io::Write;
    println!("{line}");
    let _ = std::io::stdout().flush();
}

/// One local connection's tunnel on the direct path, if that is the path; gives the TCP
/// connection back when it should go through the relay instead.
#[allow(clippy::too_many_arguments)]
async fn direct_one(
    side: &Side,
    shares: &Shares,
    usage: &Usage,
    target: &TunnelOpen,
    path: &tokio::sync::Mutex<Route>,
    tcp: tokio::net::TcpStream,
    from: SocketAddr,
) -> Option<tokio::net::TcpStream> {
    let name = target.to_string();
    // Held while the path is decided, so the connections after the first wait for it.
    let mut held = path.lock().await;
    if matches!(*held, Route::Relay) {
        return Some(tcp);
    }
    let (mut request, _answers, answer) =
        match side.request(&StreamRequest::Direct(target.clone())).await {
            Ok(answered) => answered,
            Err(e) => {
                eprintln!("{name}: cannot open a tunnel for {from}: {e}");
                return None;
            }
        };
    let (session, provider_key, candidates) = match answer {
        StreamAnswer::Direct {
            session,
            provider_key,
            candidates,
        } => (session, provider_key, candidates),
        StreamAnswer::Refused(reason) => {
            // Whatever refused the direct session, the relay says whether a tunnel may
            // open at all (and why not).
            *held = Route::Relay;
            announce(&format!("path: relay (direct failed: refused: {reason})"));
            return Some(tcp);
        }
        other => {
            eprintln!("{name}: unexpected answer to a direct tunnel request: {other:?}");
            return None;
        }
    };
    let live = match &*held {
        Route::Direct {
            connection,
            key,
            addr,
        } if *key == provider_key && connection.close_reason().is_none() => {
            Some((connection.clone(), *addr))
        }
        _ => None,
    };
    let (connection, addr) = match live {
        Some(live) => live,
        None => {
            let dialed = match crate::direct::client_config(&side.identity, provider_key) {
                Ok(config) => {
                    crate::direct::dial(
                        &side.endpoint,
                        config,
                        &candidates,
                        crate::direct::DIAL_TIMEOUT,
                    )
                    .await
                }
                Err(e) => Err(e.to_string()),
            };
            match dialed {
                Ok((connection, addr)) => {
                    announce(&format!("path: direct ({addr})"));
                    *held = Route::Direct {
                        connection: connection.clone(),
                        key: provider_key,
                        addr,
                    };
                    (connection, addr)
                }
                Err(why) => {
                    let _ = request.reset(DIRECT_FAILED.into());
                    *held = Route::Relay;
                    announce(&format!("path: relay (direct failed: {why})"));
                    return Some(tcp);
                }
            }
        }
    };
    drop(held);
    let opened = async {
        let (mut send, mut recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
        wire::write_frame(&mut send, &DirectOpen { session }, DEFAULT_FRAME_LIMIT)
            .await
            .map_err(|e| e.to_string())?;
        let answer = wire::read_frame::<OfferAnswer>(&mut recv, DEFAULT_FRAME_LIMIT)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the device closed the stream without an answer")?;
        Ok::<_, String>((send, recv, answer))
    };
    let now = herald_io::now_ms();
    let (send, recv) = match tokio::time::timeout(ANSWER_TIMEOUT, opened).await {
        Ok(Ok((send, recv, OfferAnswer::Accepted))) => (send, recv),
        Ok(Ok((_, _, OfferAnswer::Refused(reason)))) => {
            eprintln!("{name}: refused: {reason}");
            let _ = request.reset(DIRECT_REFUSED.into());
            let recorded = shares
                .open_session(Role::Used, session, &name, "", now)
                .and_then(|id| shares.close_session(id, 0, 0, &format!("refused: {reason}"), now));
            if let Err(e) = recorded {
                warn!("cannot record a refused tunnel: {e}");
            }
            return None;
        }
        Ok(Ok((_, _, other))) => {
            eprintln!("{name}: unexpected answer on the direct path: {other:?}");
            let _ = request.reset(DIRECT_FAILED.into());
            return None;
        }
        Ok(Err(e)) => {
            // The direct connection broke: the next local connection dials again.
            warn!(%addr, "direct stream failed ({e}); this connection goes through the relay");
            let _ = request.reset(DIRECT_FAILED.into());
            *path.lock().await = Route::Untried;
            return Some(tcp);
        }
        Err(_) => {
            warn!(%addr, "no answer on the direct path in {} s", ANSWER_TIMEOUT.as_secs());
            let _ = request.reset(DIRECT_FAILED.into());
            return Some(tcp);
        }
    };
    let peer = format!("direct {addr}");
    use_session(shares, usage, session, &name, &peer, tcp, send, recv).await;
    // The server records the session's end.
    let _ = request.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), request.stopped()).await;
    None
}

/// One local connection's tunnel.
async fn tunnel_one(
    side: &Side,
    shares: &Shares,
    usage: &Usage,
    target: &TunnelOpen,
    tcp: tokio::net::TcpStream,
    from: SocketAddr,
) {
    let name = target.to_string();
    let now = herald_io::now_ms();
    let (send, recv, answer) = match side.request(&StreamRequest::Tunnel(target.clone())).await {
        Ok(answered) => answered,
        Err(e) => {
            eprintln!("{name}: cannot open a tunnel for {from}: {e}");
            return;
        }
    };
    match answer {
        StreamAnswer::Relayed { session, provider } => {
            let peer = format!("agent {provider}");
            use_session(shares, usage, session, &name, &peer, tcp, send, recv).await;
        }
        StreamAnswer::Refused(reason) => {
            eprintln!("{name}: refused: {reason}");
            let recorded = shares
                .open_session(Role::Used, 0, &name, "", now)
                .and_then(|id| shares.close_session(id, 0, 0, &format!("refused: {reason}"), now));
            if let Err(e) = recorded {
                warn!("cannot record a refused tunnel: {e}");
            }
            // Dropping the TCP connection closes it.
        }
        StreamAnswer::Peers(_) | StreamAnswer::Direct { .. } | StreamAnswer::Elsewhere { .. } => {
            eprintln!("{name}: the server answered a tunnel request with something else");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_shared::peers::PeerService;

    fn device(owner: &str, name: &str, services: &[&str]) -> PeerDevice {
        PeerDevice {
            owner: owner.into(),
            device: name.into(),
            agent_id: format!("id-{name}"),
            online_since: 0,
            reported: vec![],
            observed: None,
            services: services
                .iter()
                .map(|s| PeerService {
                    name: s.to_string(),
                    http: false,
                    public: false,
                    clubs: vec!["chess".into()],
                    description: String::new(),
                })
                .collect(),
        }
    }

    #[test]
    fn targets_are_found_by_owner_service_and_device() {
        let devices = [
            device("alice", "laptop", &["web"]),
            device("alice", "nas", &["web", "files"]),
        ];
        let open = |t: &str| TunnelOpen::parse(t).unwrap();
        assert_eq!(find(&devices, &open("alice/files")).unwrap().device, "nas");
        assert_eq!(
            find(&devices, &open("alice@laptop/web")).unwrap().device,
            "laptop"
        );
        let reason = |t: &str| find(&devices, &open(t)).unwrap_err().to_string();
        assert!(reason("alice/web").contains("several devices (laptop, nas)"));
        assert!(reason("alice/cam").contains("alice shares no service cam with you"));
        assert!(reason("alice@laptop/files").contains("from laptop"));
        assert!(reason("bob/web").contains("no online device of bob"));
    }
}
