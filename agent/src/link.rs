//! The standby loop: connect to the server over QUIC, say hello, then act on signals and
//! deliver results until the connection ends; reconnect with full-jitter exponential
//! backoff. Jobs run independently of the connection, so a dropped link never stops a job
//! and a result waits in the outbox until the server has stored it.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::{Connection, Endpoint, RecvStream, SendStream};
use tokio::sync::{mpsc, Notify};
use tracing::{debug, info, warn};

use herald_shared::codec::{DEFAULT_FRAME_LIMIT, RESULT_FRAME_LIMIT};
use herald_shared::protocol::{
    AgentMsg, Hello, JobId, ServerMsg, Signal, PROTOCOL_MAJOR, PROTOCOL_MINOR, SERVER_NAME,
};

use crate::agent::Agent;
use crate::host;
use herald_io::wire::{self, WireError};

/// First backoff ceiling.
pub const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// Highest backoff ceiling.
pub const BACKOFF_CAP: Duration = Duration::from_secs(60);
/// A connection that lasted this long resets the backoff.
pub const STABLE_PERIOD: Duration = Duration::from_secs(30);
/// How long to wait for the server's answer to `Hello`.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Resolving or reaching the server failed.
    #[error("cannot connect to {server}: {reason}")]
    Connect {
        /// Server address.
        server: String,
        /// Cause.
        reason: String,
    },
    /// The connection failed or closed.
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Reading or writing a frame failed.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The server refused us.
    #[error("server refused: {0}")]
    Refused(String),
    /// The server broke the protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The local store failed.
    #[error(transparent)]
    Journal(#[from] crate::journal::JournalError),
    /// The endpoint could not be rebound after an address change.
    #[error("cannot rebind after an address change: {0}")]
    Rebind(std::io::Error),
}

impl LinkError {
    /// The window a stopping server asked its agents to spread their reconnections
    /// over, if that is why the connection ended.
    pub fn reconnect_window(&self) -> Option<std::ops::Range<Duration>> {
        match self {
            LinkError::Connection(quinn::ConnectionError::ApplicationClosed(close))
                if close.error_code == herald_shared::protocol::close::SHUTDOWN.into() =>
            {
                herald_shared::protocol::close::reconnect_window(&close.reason)
            }
            _ => None,
        }
    }
}

/// Full-jitter exponential backoff: a random delay in `[0, min(cap, base * 2^attempt))`.
pub fn backoff(attempt: u32, base: Duration, cap: Duration, random: u64) -> Duration {
    let ceiling = base
        .saturating_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX))
        .min(cap);
    let ceiling_ms = ceiling.as_millis().max(1) as u64;
    Duration::from_millis(random % ceiling_ms)
}

/// How long to wait before the next connection attempt, advancing `attempt`: a random
/// point of the window a stopping server gave (a planned restart; the backoff starts
/// afresh), else full-jitter backoff.
pub fn next_delay(
    window: Option<std::ops::Range<Duration>>,
    attempt: &mut u32,
    base: Duration,
    cap: Duration,
    random: u64,
) -> Duration {
    let delay = match window {
        Some(window) => {
            *attempt = 0;
            let spread = (window.end - window.start).as_millis() as u64;
            window.start + Duration::from_millis(random % spread.max(1))
        }
        None => backoff(*attempt, base, cap, random),
    };
    *attempt = attempt.saturating_add(1);
    delay
}

/// Resolves the server address.
pub async fn resolve(server: &str) -> Result<SocketAddr, LinkError> {
    let connect_err = |reason: String| LinkError::Connect {
        server: server.to_string(),
        reason,
    };
    tokio::net::lookup_host(server)
        .await
        .map_err(|e| connect_err(e.to_string()))?
        .next()
        .ok_or_else(|| connect_err("no address found".into()))
}

/// Creates a client endpoint suited to reach `server`.
pub fn endpoint_for(server: SocketAddr) -> std::io::Result<Endpoint> {
    Endpoint::client(unspecified_for(server))
}

fn unspecified_for(server: SocketAddr) -> SocketAddr {
    if server.is_ipv6() {
        "[::]:0".parse().expect("valid literal")
    } else {
        "0.0.0.0:0".parse().expect("valid literal")
    }
}

/// Connects and completes the QUIC/TLS handshake.
pub async fn connect(
    endpoint: &Endpoint,
    config: quinn::ClientConfig,
    server: &str,
) -> Result<Connection, LinkError> {
    let addr = resolve(server).await?;
    let connecting = endpoint
        .connect_with(config, addr, SERVER_NAME)
        .map_err(|e| LinkError::Connect {
            server: server.to_string(),
            reason: e.to_string(),
        })?;
    Ok(connecting.await?)
}

/// Runs one session on an established connection until it ends.
pub async fn session(
    agent: Arc<Agent>,
    endpoint: &Endpoint,
    connection: Connection,
) -> Result<(), LinkError> {
    let result = converse(agent, endpoint, &connection).await;
    match (result, connection.close_reason()) {
        // A stream error says only "connection lost"; the close says why (revoked,
        // refused in the handshake, replaced, server shutting down).
        (Err(_), Some(reason)) => Err(LinkError::Connection(reason)),
        (result, _) => result,
    }
}

async fn converse(
    agent: Arc<Agent>,
    endpoint: &Endpoint,
    connection: &Connection,
) -> Result<(), LinkError> {
    let (mut send, mut recv) = connection.open_bi().await?;
    let mut addresses = host::addresses();
    write_frame(
        &mut send,
        &AgentMsg::Hello(Hello {
            protocol: (PROTOCOL_MAJOR, PROTOCOL_MINOR),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            facts: host::facts(),
            addresses: addresses.clone(),
        }),
    )
    .await?;
    let welcome = tokio::time::timeout(WELCOME_TIMEOUT, read_message(&mut recv))
        .await
        .map_err(|_| LinkError::Protocol("no answer to Hello".into()))??;
    let welcome = match welcome {
        Some(ServerMsg::Welcome(welcome)) => welcome,
        Some(ServerMsg::Refused(reason)) => return Err(LinkError::Refused(reason)),
        Some(other) => {
            return Err(LinkError::Protocol(format!(
                "expected Welcome, got {other:?}"
            )))
        }
        None => return Err(LinkError::Protocol("server closed the stream".into())),
    };
    if welcome.agent_id != agent.id() {
        return Err(LinkError::Protocol(format!(
            "server calls us {} but our key says {}",
            welcome.agent_id,
            agent.id()
        )));
    }
    if let Some(envelope) = welcome.membership {
        agent.membership(&envelope);
    }
    info!(server = %connection.remote_address(), "connected");
    agent.set_connected(true, None, &addresses);
    agent.connected();

    let (to_server, outgoing) = mpsc::unbounded_channel();
    agent.attach(to_server.clone());
    let check = Duration::from_millis(welcome.address_check_ms.clamp(1_000, 60_000));
    let result = tokio::select! {
        r = writer(send, outgoing) => r,
        r = reader(&agent, &mut recv, &to_server) => r,
        r = send_results(&agent, connection) => r,
        r = watch_addresses(&agent, endpoint, &to_server, check, &mut addresses) => r,
    };
    agent.detach();
    result
}

async fn writer(
    mut send: SendStream,
    mut outgoing: mpsc::UnboundedReceiver<AgentMsg>,
) -> Result<(), LinkError> {
    while let Some(msg) = outgoing.recv().await {
        write_frame(&mut send, &msg).await?;
    }
    Ok(())
}

async fn reader(
    agent: &Arc<Agent>,
    recv: &mut RecvStream,
    to_server: &mpsc::UnboundedSender<AgentMsg>,
) -> Result<(), LinkError> {
    while let Some(msg) = read_message(recv).await? {
        match msg {
            ServerMsg::Signal(Signal {
                job_id,
                envelope,
                bundle,
                ticket,
            }) => {
                let ack = agent.clone().signal(job_id, envelope, bundle, ticket)?;
                let _ = to_server.send(AgentMsg::Ack { job_id, ack });
            }
            ServerMsg::ResultStored { job_id, .. } => {
                debug!(job_id, "result stored by server");
                agent.journal().result_stored(job_id)?;
            }
            ServerMsg::Membership(envelope) => agent.membership(&envelope),
            ServerMsg::Refused(reason) => return Err(LinkError::Refused(reason)),
            other => {
                return Err(LinkError::Protocol(format!("unexpected message {other:?}")));
            }
        }
    }
    Err(LinkError::Protocol(
        "server closed the control stream".into(),
    ))
}

/// Sends every outbox result once per connection, then waits for new ones.
async fn send_results(agent: &Agent, connection: &Connection) -> Result<(), LinkError> {
    let mut sent: HashSet<JobId> = HashSet::new();
    let notify: Arc<Notify> = agent.outbox_notify();
    loop {
        let notified = notify.notified();
        for result in agent.journal().outbox()? {
            if sent.insert(result.job_id) {
                let mut stream = connection.open_uni().await?;
                wire::write_frame(&mut stream, &AgentMsg::Result(result), RESULT_FRAME_LIMIT)
                    .await?;
                let _ = stream.finish();
            }
        }
        notified.await;
    }
}

/// Checks the local addresses; on a change, reports them and rebinds the endpoint so the
/// connection migrates to the new path.
async fn watch_addresses(
    agent: &Agent,
    endpoint: &Endpoint,
    to_server: &mpsc::UnboundedSender<AgentMsg>,
    every: Duration,
    current: &mut Vec<IpAddr>,
) -> Result<(), LinkError> {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = host::addresses();
        if &now == current {
            continue;
        }
        info!(from = ?current, to = ?now, "local addresses changed");
        *current = now.clone();
        agent.set_connected(true, None, current);
        let _ = to_server.send(AgentMsg::Addresses(now));
        let local = endpoint.local_addr().map_err(LinkError::Rebind)?;
        let socket =
            std::net::UdpSocket::bind(SocketAddr::new(local.ip(), 0)).map_err(LinkError::Rebind)?;
        endpoint.rebind(socket).map_err(LinkError::Rebind)?;
        debug!("endpoint rebound; connection migrates");
    }
}

/// Writes one control frame.
pub async fn write_frame<T: serde::Serialize>(
    send: &mut SendStream,
    msg: &T,
) -> Result<(), LinkError> {
    Ok(wire::write_frame(send, msg, DEFAULT_FRAME_LIMIT).await?)
}

/// Reads one control frame from the server.
pub async fn read_message(recv: &mut RecvStream) -> Result<Option<ServerMsg>, LinkError> {
    Ok(wire::read_frame(recv, DEFAULT_FRAME_LIMIT).await?)
}

/// Runs sessions forever, reconnecting with backoff.
pub async fn run_forever(
    agent: Arc<Agent>,
    config: quinn::ClientConfig,
    options: &crate::agent::Options,
) {
    let mut attempt: u32 = 0;
    let mut endpoint: Option<Endpoint> = None;
    loop {
        let started = tokio::time::Instant::now();
        let outcome = async {
            let addr = resolve(agent.server()).await?;
            let ep = match &endpoint {
                Some(ep) => ep.clone(),
                None => {
                    let ep = endpoint_for(addr).map_err(|e| LinkError::Connect {
                        server: agent.server().to_string(),
                        reason: e.to_string(),
                    })?;
                    endpoint = Some(ep.clone());
                    ep
                }
            };
            let connection = connect(&ep, config.clone(), agent.server()).await?;
            session(agent.clone(), &ep, connection).await
        }
        .await;
        let error = match &outcome {
            Ok(()) => "connection ended".to_string(),
            Err(e) => e.to_string(),
        };
        if started.elapsed() >= STABLE_PERIOD {
            attempt = 0;
        }
        if error.contains("rebind") {
            // A fresh endpoint on the next attempt.
            endpoint = None;
        }
        let delay = next_delay(
            outcome.as_ref().err().and_then(LinkError::reconnect_window),
            &mut attempt,
            options.backoff_base,
            options.backoff_cap,
            random_u64(),
        );
        warn!("{error}; reconnecting in {} ms", delay.as_millis());
        agent.set_connected(false, Some(error), &[]);
        tokio::time::sleep(delay).await;
    }
}

fn random_u64() -> u64 {
    u64::from_le_bytes(herald_io::random_bytes())
}

/// A lock that survives poisoning (the protected data stays consistent).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reconnect_window_replaces_the_backoff_and_restarts_it() {
        let base = Duration::from_millis(500);
        let cap = Duration::from_secs(60);
        let window = Duration::from_secs(3)..Duration::from_secs(8);
        let mut attempt = 6;
        for random in [0, 1, 4_999, 5_000, u64::MAX] {
            attempt = 6;
            let delay = next_delay(Some(window.clone()), &mut attempt, base, cap, random);
            assert!(window.contains(&delay), "{delay:?} outside {window:?}");
            assert_eq!(attempt, 1, "the backoff starts afresh after a window");
        }
        // An empty window (one agent) is its start.
        let at = Duration::from_secs(2)..Duration::from_secs(2);
        assert_eq!(
            next_delay(Some(at), &mut attempt, base, cap, 7),
            Duration::from_secs(2)
        );
        // Without a window: the backoff of the attempt, which then advances.
        attempt = 3;
        let delay = next_delay(None, &mut attempt, base, cap, 12_345);
        assert_eq!(delay, backoff(3, base, cap, 12_345));
        assert_eq!(attempt, 4);
    }

    #[test]
    fn a_stopping_server_s_close_gives_the_reconnect_window() {
        use herald_shared::protocol::close;
        let closed = |code: u32, reason: String| {
            LinkError::Connection(quinn::ConnectionError::ApplicationClosed(
                quinn::ApplicationClose {
                    error_code: code.into(),
                    reason: reason.into_bytes().into(),
                },
            ))
        };
        let window = Duration::from_millis(3_000)..Duration::from_millis(4_500);
        assert_eq!(
            closed(close::SHUTDOWN, close::shutdown_reason(window.clone())).reconnect_window(),
            Some(window.clone())
        );
        // Only a shutdown's reason counts, and only in its own format.
        assert_eq!(
            closed(close::REPLACED, close::shutdown_reason(window)).reconnect_window(),
            None
        );
        assert_eq!(
            closed(close::SHUTDOWN, "server shutting down".into()).reconnect_window(),
            None
        );
        assert_eq!(
            LinkError::Connection(quinn::ConnectionError::TimedOut).reconnect_window(),
            None
        );
    }

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let base = Duration::from_millis(500);
        let cap = Duration::from_secs(60);
        for attempt in 0..40 {
            for random in [0u64, 1, 12345, u64::MAX] {
                let d = backoff(attempt, base, cap, random);
                let ceiling = (500u128 << attempt.min(20)).min(60_000);
                assert!(d.as_millis() < ceiling, "attempt {attempt}: {d:?}");
            }
        }
        // Jitter: different random input, different delay.
        assert_ne!(backoff(5, base, cap, 1), backoff(5, base, cap, 7777));
    }
}
