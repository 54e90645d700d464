//! The standby loop: connect to the server over QUIC and drive the protocol machine
//! ([`crate::protocol`]) until the connection ends; reconnect with full-jitter
//! exponential backoff ([`mod@crate::backoff`]). Jobs run independently of the connection,
//! so a dropped link never stops a job and a result waits in the outbox until the
//! server has stored it.
//!
//! This module only moves things: frames from the control stream and reports from the
//! agent's jobs become [`Input`]s, timers fire, and the machine's [`Effect`]s are carried
//! out here (sending, storing through the agent, rebinding the endpoint). What the
//! protocol *does* is decided in the machine.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::{Connection, Endpoint, RecvStream, SendStream};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use herald_shared::codec::{DEFAULT_FRAME_LIMIT, RESULT_FRAME_LIMIT};
use herald_shared::protocol::{AgentMsg, JobId, ServerMsg, SERVER_NAME};

use crate::agent::{Agent, Events};
use crate::host;
use crate::journal::Journal;
use crate::protocol::{Effect, Fault, Input, Machine, Now, Timer};
use herald_io::wire::{self, WireError};

pub use crate::backoff::{backoff, next_delay, BACKOFF_BASE, BACKOFF_CAP, STABLE_PERIOD};

/// Frames read from the control stream but not yet handled; the reader waits beyond
/// this, so a flooding server is slowed down rather than buffered.
const READ_AHEAD: usize = 16;

/// The protocol machine as the link drives it.
pub type AgentMachine = Machine<Arc<Agent>>;

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
    /// The inbox failed (keeping a message, reading a report).
    #[error(transparent)]
    Inbox(#[from] crate::inbox::InboxError),
    /// The endpoint could not be rebound after an address change.
    #[error("cannot rebind after an address change: {0}")]
    Rebind(std::io::Error),
}

impl From<Fault> for LinkError {
    fn from(fault: Fault) -> Self {
        match fault {
            Fault::Refused(reason) => LinkError::Refused(reason),
            Fault::Protocol(reason) => LinkError::Protocol(reason),
            Fault::Journal(e) => LinkError::Journal(e),
        }
    }
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

/// How long one of several server addresses has to answer before the next is tried
/// (a single address is given the whole handshake timeout).
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(4);

/// Resolves the first address of `server`: one `host:port`, or several separated by
/// commas (the nodes of a cluster); for the endpoint's address family.
pub async fn resolve(server: &str) -> Result<SocketAddr, LinkError> {
    let connect_err = |reason: String| LinkError::Connect {
        server: server.to_string(),
        reason,
    };
    let first = server.split(',').map(str::trim).next().unwrap_or_default();
    tokio::net::lookup_host(first)
        .await
        .map_err(|e| connect_err(e.to_string()))?
        .next()
        .ok_or_else(|| connect_err("no address found".into()))
}

/// Every address `server` names (each `host:port` of a comma-separated list, every
/// record of each name), without repeats, in a random order, `prefer` first when it is
/// among them (the node that answered last: an agent sticks to it).
pub async fn candidates(
    server: &str,
    prefer: Option<SocketAddr>,
) -> Result<Vec<SocketAddr>, LinkError> {
    let mut all: Vec<SocketAddr> = Vec::new();
    let mut errors = Vec::new();
    for name in server.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        match tokio::net::lookup_host(name).await {
            Ok(addrs) => {
                for addr in addrs {
                    if !all.contains(&addr) {
                        all.push(addr);
                    }
                }
            }
            Err(e) => errors.push(format!("{name}: {e}")),
        }
    }
    if all.is_empty() {
        return Err(LinkError::Connect {
            server: server.to_string(),
            reason: if errors.is_empty() {
                "no address found".into()
            } else {
                errors.join("; ")
            },
        });
    }
    // Fisher-Yates, so that agents spread over the nodes.
    for i in (1..all.len()).rev() {
        let j = (random_u64() % (i as u64 + 1)) as usize;
        all.swap(i, j);
    }
    if let Some(position) = prefer.and_then(|p| all.iter().position(|a| *a == p)) {
        let preferred = all.remove(position);
        all.insert(0, preferred);
    }
    Ok(all)
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

/// Connects and completes the QUIC/TLS handshake with the first of `server`'s
/// addresses that answers ([`candidates`]; `prefer` is tried first).
pub async fn connect(
    endpoint: &Endpoint,
    config: quinn::ClientConfig,
    server: &str,
) -> Result<Connection, LinkError> {
    connect_preferring(endpoint, config, server, None).await
}

/// [`connect`], trying `prefer` first if `server` names it.
pub async fn connect_preferring(
    endpoint: &Endpoint,
    config: quinn::ClientConfig,
    server: &str,
    prefer: Option<SocketAddr>,
) -> Result<Connection, LinkError> {
    let addrs = candidates(server, prefer).await?;
    let last = addrs.len() - 1;
    let mut failures = Vec::new();
    for (i, addr) in addrs.into_iter().enumerate() {
        debug!(%addr, "connecting");
        let attempt = async {
            let connecting = endpoint
                .connect_with(config.clone(), addr, SERVER_NAME)
                .map_err(|e| LinkError::Connect {
                    server: addr.to_string(),
                    reason: e.to_string(),
                })?;
            Ok::<_, LinkError>(connecting.await?)
        };
        let outcome = if i == last {
            attempt.await
        } else {
            tokio::time::timeout(ATTEMPT_TIMEOUT, attempt)
                .await
                .unwrap_or_else(|_| {
                    Err(LinkError::Connect {
                        server: addr.to_string(),
                        reason: format!("no answer within {} s", ATTEMPT_TIMEOUT.as_secs()),
                    })
                })
        };
        match outcome {
            Ok(connection) => return Ok(connection),
            // The last address's error is the one to report, with the others'.
            Err(e) if i == last && failures.is_empty() => return Err(e),
            Err(e) => {
                warn!(%addr, "server address did not answer: {e}");
                failures.push(format!("{addr}: {e}"));
            }
        }
    }
    Err(LinkError::Connect {
        server: server.to_string(),
        reason: failures.join("; "),
    })
}

/// Runs one session on an established connection until it ends.
pub async fn session(
    agent: &Arc<Agent>,
    machine: &mut AgentMachine,
    events: &mut Events,
    endpoint: &Endpoint,
    connection: Connection,
) -> Result<(), LinkError> {
    agent.hold_link(Some((endpoint.clone(), connection.clone())));
    let result = converse(agent, machine, events, endpoint, &connection).await;
    agent.hold_link(None);
    machine.handle(Input::Disconnected, now(agent));
    match (result, connection.close_reason()) {
        // A stream error says only "connection lost"; the close says why (revoked,
        // refused in the handshake, replaced, server shutting down).
        (Err(_), Some(reason)) => Err(LinkError::Connection(reason)),
        (result, _) => result,
    }
}

/// The tasks of one connection: the control stream's writer and reader, the result
/// sender (results are large and go on their own streams, so they do not hold up the
/// control stream), and the loop that feeds the machine and carries out its effects.
async fn converse(
    agent: &Arc<Agent>,
    machine: &mut AgentMachine,
    events: &mut Events,
    endpoint: &Endpoint,
    connection: &Connection,
) -> Result<(), LinkError> {
    let (send, recv) = connection.open_bi().await?;
    let (to_server, outgoing) = mpsc::unbounded_channel();
    let (frames_in, frames) = mpsc::channel(READ_AHEAD);
    let (results_out, results) = mpsc::unbounded_channel();
    let mut driver = Driver {
        agent,
        endpoint,
        connection,
        to_server,
        results: results_out,
        timers: HashMap::new(),
    };
    let start = Input::Start {
        addresses: host::addresses(),
        facts: host::facts(),
    };
    tokio::select! {
        r = writer(send, outgoing) => r,
        r = reader(recv, frames_in) => r,
        r = send_results(agent.journal(), connection, results) => r,
        r = accept_offers(agent, connection) => r,
        r = driver.run(machine, start, frames, events) => r,
    }
}

/// Serves the streams the server opens: each is a tunnel offer ([`crate::tunnel`]).
/// Tunnels run in tasks of their own and end with the connection's streams.
async fn accept_offers(agent: &Arc<Agent>, connection: &Connection) -> Result<(), LinkError> {
    loop {
        let (send, recv) = connection.accept_bi().await?;
        let agent = agent.clone();
        tokio::spawn(async move { agent.provide(send, recv).await });
    }
}

/// Accepts direct connections from consumer agents on the link's endpoint
/// ([`crate::direct`]): each connection's streams are served as the agent whose key
/// its handshake proved, each stream in a task of its own.
async fn accept_direct(agent: Arc<Agent>, endpoint: Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        let agent = agent.clone();
        tokio::spawn(async move {
            let from = incoming.remote_address();
            let connection = match incoming.await {
                Ok(connection) => connection,
                Err(e) => {
                    debug!(%from, "direct connection failed: {e}");
                    return;
                }
            };
            let Some(key) = crate::direct::peer_key(&connection) else {
                // The handshake's verifier admits only agent certificates.
                connection.close(0u32.into(), b"no agent key");
                return;
            };
            let consumer = herald_shared::agent_id(&key);
            info!(%from, %consumer, "direct connection");
            while let Ok((send, recv)) = connection.accept_bi().await {
                let agent = agent.clone();
                let consumer = consumer.clone();
                tokio::spawn(async move { agent.serve_direct(&consumer, send, recv).await });
            }
            debug!(%from, %consumer, "direct connection ended");
        });
    }
}

/// Carries out the machine's effects for one connection.
struct Driver<'a> {
    agent: &'a Arc<Agent>,
    endpoint: &'a Endpoint,
    connection: &'a Connection,
    to_server: mpsc::UnboundedSender<AgentMsg>,
    results: mpsc::UnboundedSender<JobId>,
    timers: HashMap<Timer, Instant>,
}

impl Driver<'_> {
    /// Feeds the machine until an effect ends the connection. Each input's effects are
    /// carried out, in order, before the next input is taken.
    async fn run(
        &mut self,
        machine: &mut AgentMachine,
        start: Input,
        mut frames: mpsc::Receiver<Input>,
        events: &mut Events,
    ) -> Result<(), LinkError> {
        let mut input = start;
        // The watchdog is fed from this loop: if an effect or the machine hangs, the
        // pings stop and systemd restarts the agent.
        let mut watchdog = crate::systemd::Watchdog::from_env();
        watchdog.ping();
        loop {
            let mut queue = VecDeque::from([input]);
            while let Some(input) = queue.pop_front() {
                for effect in machine.handle(input, now(self.agent)) {
                    queue.extend(self.apply(effect)?);
                }
            }
            let due = self
                .timers
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(t, at)| (*t, *at));
            // Every branch is cancel-safe: the reader and the jobs queue into channels.
            input = loop {
                tokio::select! {
                    Some(frame) = frames.recv() => break frame,
                    Some(event) = events.recv() => break event,
                    () = sleep_until(due.map(|(_, at)| at)) => {
                        let (timer, _) = due.expect("the sleep ends only with a deadline");
                        self.timers.remove(&timer);
                        break Input::TimerFired(timer);
                    }
                    () = watchdog.due() => watchdog.ping(),
                    // The channels' senders outlive this loop; only an agent being dropped
                    // closes them.
                    else => return Ok(()),
                }
            };
        }
    }

    /// Carries out one effect; some give the machine an input back.
    fn apply(&mut self, effect: Effect) -> Result<Option<Input>, LinkError> {
        match effect {
            Effect::Send(msg) => {
                // Fails only when the writer has ended, which ends the session anyway.
                let _ = self.to_server.send(msg);
            }
            Effect::SendResult(job_id) => {
                let _ = self.results.send(job_id);
            }
            Effect::Persist(acceptance) => self.agent.persist(&acceptance)?,
            Effect::PersistRefusal {
                job_id,
                order_id,
                reason,
                at,
            } => self
                .agent
                .journal()
                .refuse(job_id, &order_id, &reason, at)?,
            Effect::Run(job) => self.agent.spawn(job),
            Effect::KeepMessage(arrival) => {
                let seq = self.agent.keep_message(&arrival)?;
                return Ok(Some(Input::ReportsReady(vec![seq])));
            }
            Effect::RefuseMessage(rejection) => {
                let seq = self.agent.inbox().refuse(&rejection)?;
                return Ok(Some(Input::ReportsReady(vec![seq])));
            }
            Effect::ShowNotice(notice) => self.agent.show_notice(&notice),
            Effect::SendReport(seq) => {
                // Gone: the server stored it meanwhile.
                if let Some(report) = self.agent.inbox().report(seq)? {
                    let _ = self.to_server.send(AgentMsg::Report { seq, report });
                }
            }
            Effect::DeleteReport(seq) => self.agent.inbox().report_stored(seq)?,
            Effect::ConsoleBlock {
                sender,
                blocked,
                at,
            } => {
                match self.agent.inbox().console_request(&sender, blocked, at) {
                    Ok((seq, applied)) => {
                        if !applied {
                            info!(%sender, "not unblocking at the console's request: the block was made on this machine");
                        }
                        return Ok(Some(Input::ReportsReady(vec![seq])));
                    }
                    // A sender name the server should never have sent: nothing to do.
                    Err(crate::inbox::InboxError::InvalidSender(name)) => {
                        warn!(sender = %name, "ignoring a block request for an invalid sender name");
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Effect::PollReports => {
                return Ok(Some(Input::ReportsReady(self.agent.inbox().report_seqs()?)));
            }
            Effect::StoreMembership(envelope) => self.agent.store_membership(&envelope),
            Effect::MarkAcknowledged(job_id) => self.agent.journal().result_stored(job_id)?,
            Effect::Connected { addresses } => {
                info!(server = %self.connection.remote_address(), "connected");
                self.agent.set_connected(true, None, &addresses);
                self.agent.connected();
                // The directory lists what this machine shares: the whole table after
                // every Welcome (changes in between come from `Agent::report_shares`).
                match self.agent.shares().infos() {
                    Ok(infos) => {
                        let _ = self.to_server.send(AgentMsg::Shares(infos));
                    }
                    Err(e) => warn!("cannot read the share table: {e}"),
                }
            }
            Effect::AddressesChanged { addresses } => {
                self.agent.set_connected(true, None, &addresses)
            }
            Effect::Rebind => rebind(self.endpoint)?,
            Effect::SampleAddresses => return Ok(Some(Input::Addresses(host::addresses()))),
            Effect::ArmTimer(timer, at) => {
                self.timers.insert(timer, at);
            }
            Effect::Close(fault) => return Err(fault.into()),
        }
        Ok(None)
    }
}

/// The machine's time: the monotonic clock and the agent's guarded wall clock.
fn now(agent: &Agent) -> Now {
    Now {
        instant: Instant::now(),
        wall: agent.guarded_now(),
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
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

/// Reads the control stream into the machine's queue; its end is an input too.
async fn reader(mut recv: RecvStream, frames: mpsc::Sender<Input>) -> Result<(), LinkError> {
    while let Some(msg) = read_message(&mut recv).await? {
        if frames.send(Input::Received(msg)).await.is_err() {
            return Ok(());
        }
    }
    let _ = frames.send(Input::ControlClosed).await;
    // The machine decides what the end means; the driver ends the session.
    std::future::pending().await
}

/// Sends the results the machine asks for, each on its own stream.
async fn send_results(
    journal: &Journal,
    connection: &Connection,
    mut ids: mpsc::UnboundedReceiver<JobId>,
) -> Result<(), LinkError> {
    while let Some(job_id) = ids.recv().await {
        // Gone: the server acknowledged it meanwhile.
        let Some(result) = journal.outbox_result(job_id)? else {
            continue;
        };
        let mut stream = connection.open_uni().await?;
        wire::write_frame(&mut stream, &AgentMsg::Result(result), RESULT_FRAME_LIMIT).await?;
        let _ = stream.finish();
    }
    Ok(())
}

/// Moves the endpoint to a fresh socket on the same local address, so the connection
/// migrates to the new path.
fn rebind(endpoint: &Endpoint) -> Result<(), LinkError> {
    let local = endpoint.local_addr().map_err(LinkError::Rebind)?;
    let socket =
        std::net::UdpSocket::bind(SocketAddr::new(local.ip(), 0)).map_err(LinkError::Rebind)?;
    endpoint.rebind(socket).map_err(LinkError::Rebind)?;
    debug!("endpoint rebound; connection migrates");
    Ok(())
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

/// Runs sessions forever, reconnecting with backoff (`(base, cap)`).
pub async fn run_forever(
    agent: Arc<Agent>,
    mut machine: AgentMachine,
    mut events: Events,
    config: quinn::ClientConfig,
    (base, cap): (Duration, Duration),
) {
    let mut attempt: u32 = 0;
    let mut endpoint: Option<Endpoint> = None;
    // The address that answered last: tried first next time (the agent sticks to it).
    let mut answered: Option<SocketAddr> = None;
    // The endpoint's accept loop for direct connections, ended with the endpoint.
    let mut direct: Option<tokio::task::AbortHandle> = None;
    // While connected, the session's driver loop feeds systemd's watchdog; while not,
    // this loop does, through connecting (bounded by the idle timeout) and the backoff.
    let mut watchdog = crate::systemd::Watchdog::from_env();
    loop {
        let started = tokio::time::Instant::now();
        let outcome = async {
            let addr = watchdog.while_awaiting(resolve(agent.server())).await?;
            let ep = match &endpoint {
                Some(ep) => ep.clone(),
                None => {
                    let ep = endpoint_for(addr).map_err(|e| LinkError::Connect {
                        server: agent.server().to_string(),
                        reason: e.to_string(),
                    })?;
                    if let Some(config) = agent.direct_config() {
                        ep.set_server_config(Some(config));
                        let accepting = tokio::spawn(accept_direct(agent.clone(), ep.clone()));
                        if let Some(old) = direct.replace(accepting.abort_handle()) {
                            old.abort();
                        }
                    }
                    endpoint = Some(ep.clone());
                    ep
                }
            };
            let connection = watchdog
                .while_awaiting(connect_preferring(
                    &ep,
                    config.clone(),
                    agent.server(),
                    answered,
                ))
                .await?;
            if answered != Some(connection.remote_address()) {
                info!(server = %connection.remote_address(), "connected to the server at this address");
            }
            answered = Some(connection.remote_address());
            session(&agent, &mut machine, &mut events, &ep, connection).await
        }
        .await;
        if started.elapsed() >= STABLE_PERIOD {
            attempt = 0;
        }
        if let Err(LinkError::Rebind(_)) = &outcome {
            // A fresh endpoint on the next attempt.
            endpoint = None;
        }
        let error = match &outcome {
            Ok(()) => "connection ended".to_string(),
            Err(e) => e.to_string(),
        };
        let delay = next_delay(
            outcome.as_ref().err().and_then(LinkError::reconnect_window),
            &mut attempt,
            base,
            cap,
            random_u64(),
        );
        warn!("{error}; reconnecting in {} ms", delay.as_millis());
        agent.set_connected(false, Some(error), &[]);
        watchdog.while_awaiting(tokio::time::sleep(delay)).await;
    }
}

fn random_u64() -> u64 {
    u64::from_le_bytes(herald_io::random_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn candidates_are_every_address_once_in_a_random_order_the_preferred_first() {
        let list = "127.0.0.1:1, 127.0.0.1:2,127.0.0.1:3,127.0.0.1:1";
        let addr = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        let mut firsts = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let all = candidates(list, None).await.unwrap();
            let mut sorted = all.clone();
            sorted.sort();
            assert_eq!(sorted, [addr(1), addr(2), addr(3)]);
            firsts.insert(all[0]);
        }
        assert_eq!(firsts.len(), 3, "every node comes first sometimes");
        for _ in 0..20 {
            assert_eq!(candidates(list, Some(addr(2))).await.unwrap()[0], addr(2));
        }
        // A preferred address no longer listed is ignored.
        assert_eq!(candidates(list, Some(addr(9))).await.unwrap().len(), 3);
        assert!(candidates(" , ", None).await.is_err());
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
}
