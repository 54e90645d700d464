//! The relay: accepts agent connections over QUIC, enrolls new agents, and moves signals,
//! acknowledgements and results between agents and the store.
//!
//! One task per connection. The agent opens a control stream and speaks first. Signals
//! for an agent are read from the store (so whatever is queued survives restarts) each
//! time the agent's link is poked; results arrive on unidirectional streams and are
//! acknowledged after they are committed.
//!
//! What is allowed when, what to send and what to store is decided by the connection's
//! state machine in [`link`]; the tasks here read and write frames, call the store,
//! keep the timers and the connection registry, and carry out what the machine answers.

mod acks;
mod link;
mod metrics;
mod tunnel;

use std::collections::HashMap;
use std::net::IpAddr;
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::{Connection, RecvStream, SendStream};
use tokio::sync::{broadcast, mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info, warn};

use herald_io::wire::{self, WireError};
use herald_shared::codec::{DEFAULT_FRAME_LIMIT, RESULT_FRAME_LIMIT};
use herald_shared::protocol::{AgentMsg, Bundle, Enroll, Hello, JobId, ServerMsg, PROTOCOL_MAJOR};
use herald_shared::token::secret_hash;

use crate::metrics::Histogram;
use crate::now_ms;
use crate::pki::{KeyStatus, Keyring};
use crate::store::{Pending, Store};
use crate::ticket::Tickets;
use acks::{AckRecord, Batches, ReportOutcome, ReportRecord, ACK_BATCH};
use link::{version_refusal, Effect, Greeting, Link, Migrated, Stream, Transmit, Violation};
use metrics::{Refusal, Refusals};

pub use link::ADDRESS_CHECK_MS;

/// How long an agent has to open its control stream and say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the observed address is compared, to notice QUIC path migration that the
/// agent does not report (a NAT rebinding). An agent whose own addresses change reports
/// them, and the address is compared then; a tighter timer would wake every idle link
/// (50,000 wake-ups a second at 100,000 agents with 2 s).
const PATH_CHECK: Duration = Duration::from_secs(30);
/// Failed enrollment attempts allowed per source address per window.
const ENROLL_FAILURES_ALLOWED: u32 = 5;
/// Window of the enrollment rate limit.
const ENROLL_WINDOW: Duration = Duration::from_secs(60);
/// How long shutdown waits for connection-close frames to be sent: a base, and more per
/// open connection (100,000 closes take seconds on two cores; an agent that misses its
/// close only notices at its idle timeout, a minute later).
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(2);
const SHUTDOWN_FLUSH_PER_CONNECTION: Duration = Duration::from_micros(100);
/// Outgoing messages buffered per connection before the sender waits. They are boxed:
/// the channel allocates its slots in blocks of 32 up front, and 32 unboxed messages
/// would cost every idle connection about 9 KiB.
const OUTBOX_DEPTH: usize = 256;

/// QUIC application close codes (shared with the agent).
pub use herald_shared::protocol::close;

use crate::model::JobEvent;

/// A connected agent, as the registry knows it.
struct Registered {
    connection: Connection,
    wake: Arc<Wake>,
    generation: u64,
    /// When this connection was admitted (the directory's "online since").
    since: crate::Millis,
}

/// What wakes a link's delivery loop, and why.
#[derive(Default)]
struct Wake {
    notify: Notify,
    /// The store may hold jobs or a membership this link has not sent yet.
    query: std::sync::atomic::AtomicBool,
    /// Signals for jobs already committed, handed over without a query (a broadcast
    /// reaches every connected agent without one database read per agent).
    direct: Mutex<Vec<Outgoing>>,
}

/// Signals a link has handed to QUIC and not yet seen acknowledged, with when: the
/// relay's round trip. Bounded; an agent that never acknowledges only loses samples.
#[derive(Default)]
struct InFlight(Mutex<Vec<(JobId, Instant, Option<OwnedSemaphorePermit>)>>);

/// Most unacknowledged signals a link remembers the send time of.
const IN_FLIGHT_TIMES: usize = 64;

impl InFlight {
    fn sent(&self, job_id: JobId, window: Option<OwnedSemaphorePermit>) {
        let mut sent = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if sent.len() == IN_FLIGHT_TIMES {
            sent.remove(0);
        }
        sent.push((job_id, Instant::now(), window));
    }

    /// The round trip of an acknowledged signal; its place in the window is freed.
    fn acked(&self, job_id: JobId) -> Option<Duration> {
        let mut sent = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let i = sent.iter().position(|(id, ..)| *id == job_id)?;
        let elapsed = sent.swap_remove(i).1.elapsed();
        if sent.is_empty() {
            // Idle links keep no allocation.
            *sent = Vec::new();
        }
        Some(elapsed)
    }
}

/// Links a fan-out wakes before it lets everything else run. Waking 100,000 links at once
/// queues hundreds of thousands of tasks (each link, then its QUIC connection) ahead of
/// the endpoint task that reads the socket; the acknowledgements that come back
/// meanwhile overflow the socket buffer and every dropped one costs a retransmission.
const FAN_OUT_CHUNK: usize = 256;

/// Handshakes in progress at once, per core; connection attempts beyond that are
/// refused at once and come back on the agent's jittered backoff, instead of sitting in
/// (or being dropped from) the socket buffer while their senders' retransmission timers
/// double in step. A guard for storms the reconnect window does not shape (a crash, a
/// network coming back); the window keeps a planned restart under it.
const HANDSHAKES_PER_CORE: usize = 1024;

/// Handshakes a second one core is assumed to sustain when agents come back after a
/// restart, to size the reconnect window a stopping server gives its agents: 100,000
/// agents on two cores spread over 83 s. Measured with the benchmark's swarm doing the
/// agents' side of every handshake on the same two cores: with 10,000 agents 1,000 a
/// second per core came back without a refusal or a dropped packet and 1,500 overran the
/// handshake limit; with 100,000 connected the server sustains only ~1,200 a second in
/// all, and offering 2,000 made refusals and retries spiral (222 s, 7 attempts each).
const RESTART_HANDSHAKES_PER_CORE: u64 = 600;

/// Time a stopping server allows itself to be started again, in the reconnect window it
/// gives its agents.
const RESTART_ALLOWANCE: Duration = Duration::from_secs(1);

/// Longest reconnect window a stopping server asks for.
const RECONNECT_WINDOW_CAP: Duration = Duration::from_secs(300);

/// Fan-out signals in flight at once: sent and not yet acknowledged. The agents'
/// acknowledgements come back about as fast as signals go out, and a whole broadcast's
/// worth at once overflows the socket buffer before quinn's single reader drains it
/// (100,000 agents: 1.9 million datagrams dropped, the last ack read after 42 s). A window
/// keeps the returning acks within what the buffer holds.
const FAN_OUT_WINDOW: usize = 4096;

/// How long a fan-out waits for room in the window before it sends anyway: agents that
/// never acknowledge must not hold up every later broadcast.
const FAN_OUT_WAIT: Duration = Duration::from_secs(1);

/// A message for a link's writer; a fan-out signal holds its place in the window until
/// the agent acknowledges it (or the link ends).
struct Outgoing {
    msg: ServerMsg,
    window: Option<OwnedSemaphorePermit>,
}

impl Outgoing {
    fn new(msg: ServerMsg) -> Box<Outgoing> {
        Box::new(Outgoing { msg, window: None })
    }
}

/// One signed order's one-off jobs for connected agents, queued for [`fan_out`].
struct FanOut {
    envelope: herald_shared::envelope::Envelope,
    open_timeout_ms: Option<u64>,
    jobs: Vec<(String, JobId)>,
}

/// Shared relay state.
pub struct Relay {
    store: Store,
    keyring: Arc<Keyring>,
    links: Mutex<HashMap<String, Registered>>,
    generation: std::sync::atomic::AtomicU64,
    events: broadcast::Sender<JobEvent>,
    enroll_failures: Mutex<HashMap<IpAddr, (Instant, u32)>>,
    artifact_base: String,
    /// Mints the one-time tickets browser signals carry.
    tickets: Tickets,
    /// Acknowledgements to commit, in batches, by [`Relay::write_acks`].
    acks: mpsc::UnboundedSender<AckRecord>,
    /// Verified reports, to the relay-wide batch writer.
    reports: mpsc::UnboundedSender<ReportRecord>,
    /// Signal handed to QUIC → acknowledgement read, over every link.
    signal_rtt: Histogram,
    /// Fan-outs waiting for [`fan_out`], in order (a later order's signal never
    /// overtakes an earlier one's at an agent).
    fan_outs: mpsc::UnboundedSender<FanOut>,
    /// Room for fan-out signals in flight ([`FAN_OUT_WINDOW`]).
    window: Arc<Semaphore>,
    /// Failed connection attempts, by reason (`/metrics`).
    refusals: Refusals,
    /// What earlier `/metrics` scrapes counted in the store.
    tally: Mutex<crate::store::Tally>,
    /// Side connections open per agent (`peers`, `connect`).
    sides: tunnel::Sides,
    /// What other nodes of a cluster must hear (set by [`Relay::join_cluster`]).
    cluster: std::sync::OnceLock<mpsc::UnboundedSender<ClusterNote>>,
    /// Agents connected to the cluster's other nodes (refreshed with each heartbeat):
    /// since when, and the node's address.
    elsewhere: std::sync::RwLock<HashMap<String, (crate::Millis, String)>>,
}

/// What this node tells the other nodes of its cluster (`crate::cluster` sends it on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterNote {
    /// An agent that is not connected here has work.
    Work(String),
    /// A job's state changed here.
    Event(JobId),
    /// An agent key was enrolled or revoked here.
    Keys,
    /// An agent connected here, at this time.
    Online(String, crate::Millis),
    /// An agent left this node.
    Offline(String),
}

/// How long a providing agent has to answer a tunnel offer.
pub const OFFER_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a tunnel offer did not open a tunnel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OfferError {
    /// The providing agent is not connected.
    #[error("the device sharing it is offline")]
    Offline,
    /// It did not answer in time (an agent too old to know tunnels never answers).
    #[error("the device sharing it did not answer")]
    NoAnswer,
    /// It refused, from its own share table.
    #[error("the device sharing it refused: {0}")]
    Refused(String),
    /// The stream failed.
    #[error("the tunnel failed: {0}")]
    Failed(String),
}

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("protocol violation: {0}")]
    Violation(#[from] Violation),
    #[error("timed out waiting for the agent")]
    Timeout,
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The relay-wide report writer failed or is gone (the server is stopping).
    #[error("cannot store a report: {0}")]
    Reports(String),
}

impl Relay {
    /// Builds the relay.
    ///
    /// `artifact_base` is the HTTPS URL agents download artifacts from
    /// (`https://host:port/api/v1/artifacts`); the artifact's hash is appended.
    pub fn new(
        store: Store,
        keyring: Arc<Keyring>,
        artifact_base: String,
        tickets: Tickets,
    ) -> Arc<Relay> {
        let (events, _) = broadcast::channel(4096);
        let (acks, ack_queue) = mpsc::unbounded_channel();
        let (reports, report_queue) = mpsc::unbounded_channel();
        let (fan_outs, fan_out_queue) = mpsc::unbounded_channel();
        let ack_store = store.clone();
        let relay = Arc::new(Relay {
            store,
            keyring,
            links: Mutex::new(HashMap::new()),
            generation: Default::default(),
            events,
            enroll_failures: Mutex::new(HashMap::new()),
            artifact_base,
            tickets,
            acks,
            reports,
            signal_rtt: Histogram::default(),
            fan_outs,
            window: Arc::new(Semaphore::new(FAN_OUT_WINDOW)),
            refusals: Refusals::default(),
            tally: Mutex::default(),
            sides: tunnel::Sides::default(),
            cluster: std::sync::OnceLock::new(),
            elsewhere: Default::default(),
        });
        // Need a runtime: the relay is built inside `serve`.
        tokio::spawn(write_reports(
            ack_store.clone(),
            Arc::downgrade(&relay),
            report_queue,
        ));
        tokio::spawn(write_acks(ack_store, Arc::downgrade(&relay), ack_queue));
        tokio::spawn(fan_out(
            Arc::downgrade(&relay),
            relay.window.clone(),
            fan_out_queue,
        ));
        relay
    }

    /// Subscribes to job state changes.
    pub fn subscribe(&self) -> broadcast::Receiver<JobEvent> {
        self.events.subscribe()
    }

    /// Announces a job state change (to the other nodes too).
    pub fn job_changed(&self, job_id: JobId) {
        self.job_changed_here(job_id);
        self.tell_cluster(ClusterNote::Event(job_id));
    }

    /// Announces a job state change another node reported.
    pub fn job_changed_here(&self, job_id: JobId) {
        let _ = self.events.send(JobEvent { job_id });
    }

    /// Makes this relay one node of a cluster: what the others must hear comes out of
    /// the returned channel. Once.
    pub fn join_cluster(&self) -> Option<mpsc::UnboundedReceiver<ClusterNote>> {
        let (notes, received) = mpsc::unbounded_channel();
        self.cluster.set(notes).ok()?;
        Some(received)
    }

    fn tell_cluster(&self, note: ClusterNote) {
        if let Some(cluster) = self.cluster.get() {
            let _ = cluster.send(note);
        }
    }

    /// Records which agents the cluster's other nodes hold.
    pub fn connected_elsewhere(&self, agents: HashMap<String, (crate::Millis, String)>) {
        *self.elsewhere.write().unwrap_or_else(|e| e.into_inner()) = agents;
    }

    /// The address of the other node an agent is connected to, if it is connected
    /// there and not here.
    pub fn node_of(&self, agent_id: &str) -> Option<String> {
        if self.lock_links().contains_key(agent_id) {
            return None;
        }
        self.elsewhere
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(agent_id)
            .map(|(_, node)| node.clone())
    }

    /// Replaces the keyring's keys (a cluster node hears of another's enrollments).
    pub fn reload_keys(&self) -> Result<(), crate::store::StoreError> {
        self.keyring.replace(self.store.agent_keys()?);
        Ok(())
    }

    /// Whether an agent is connected.
    pub fn is_online(&self, agent_id: &str) -> bool {
        self.online_since(agent_id).is_some()
    }

    /// When a connected agent's connection was admitted; `None` when it is offline.
    pub fn online_since(&self, agent_id: &str) -> Option<crate::Millis> {
        let here = self.lock_links().get(agent_id).map(|l| l.since);
        here.or_else(|| {
            self.elsewhere
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(agent_id)
                .map(|(since, _)| *since)
        })
    }

    /// Offers a tunnel to a connected providing agent: opens a stream on its link, sends
    /// the offer and waits (at most [`OFFER_TIMEOUT`]) for its answer. On acceptance the
    /// stream carries the share's bytes from then on. The caller records the session
    /// (the offer carries its id) and its end.
    pub async fn offer(
        &self,
        provider: &str,
        offer: &herald_shared::peers::TunnelOffer,
    ) -> Result<(SendStream, RecvStream), OfferError> {
        use herald_shared::peers::OfferAnswer;
        let connection = self
            .lock_links()
            .get(provider)
            .map(|l| l.connection.clone())
            .ok_or(OfferError::Offline)?;
        let exchange = async {
            let (mut send, mut recv) = connection.open_bi().await?;
            write_frame(&mut send, offer).await?;
            let answer = read_frame::<OfferAnswer>(&mut recv, DEFAULT_FRAME_LIMIT).await?;
            Ok::<_, LinkError>((send, recv, answer))
        };
        match tokio::time::timeout(OFFER_TIMEOUT, exchange).await {
            Err(_) => Err(OfferError::NoAnswer),
            Ok(Err(e)) => Err(OfferError::Failed(e.to_string())),
            Ok(Ok((_, _, None))) => Err(OfferError::Failed("the agent closed the stream".into())),
            Ok(Ok((_, _, Some(OfferAnswer::Refused(reason))))) => Err(OfferError::Refused(reason)),
            Ok(Ok((send, recv, Some(OfferAnswer::Accepted)))) => Ok((send, recv)),
            Ok(Ok((_, _, Some(OfferAnswer::Expecting { .. })))) => Err(OfferError::Failed(
                "the device answered a relayed offer as a direct one".into(),
            )),
        }
    }

    /// Number of connected agents.
    pub fn online_count(&self) -> usize {
        self.lock_links().len()
    }

    /// Tells an agent's link to look for pending jobs: here, or at the node that
    /// holds it.
    pub fn poke(&self, agent_id: &str) {
        if !self.poke_here(agent_id) {
            self.tell_cluster(ClusterNote::Work(agent_id.to_string()));
        }
    }

    /// Tells an agent's link to look for pending jobs if it is connected here.
    pub fn poke_here(&self, agent_id: &str) -> bool {
        match self.lock_links().get(agent_id) {
            Some(link) => {
                link.wake
                    .query
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                link.wake.notify.notify_one();
                true
            }
            None => false,
        }
    }

    /// Tells every link here to look for pending jobs (notices may have been missed).
    pub fn poke_all_here(&self) {
        let agents: Vec<String> = self.lock_links().keys().cloned().collect();
        for agent in agents {
            self.poke_here(&agent);
        }
    }

    /// Hands committed one-off jobs of one signed order straight to the links of the
    /// connected agents among them, with no store read; agents not connected get them
    /// from the store when they connect. Only for orders whose audience does not depend
    /// on group membership (a group job must follow the membership that admits the
    /// agent; those go through [`Relay::poke`]). Returns at once; [`fan_out`] wakes the
    /// links a chunk at a time.
    pub fn push(
        &self,
        envelope: &herald_shared::envelope::Envelope,
        open_timeout_ms: Option<u64>,
        jobs: Vec<(String, JobId)>,
    ) {
        let _ = self.fan_outs.send(FanOut {
            envelope: envelope.clone(),
            open_timeout_ms,
            jobs,
        });
    }

    /// Queues one chunk of a fan-out's signals on their links and wakes them.
    fn push_chunk(
        &self,
        fan_out: &FanOut,
        jobs: &[(String, JobId)],
        mut window: Option<OwnedSemaphorePermit>,
    ) {
        let links = self.lock_links();
        for (agent_id, job_id) in jobs {
            let Some(link) = links.get(agent_id) else {
                // Perhaps connected to another node, which reads it from the store.
                self.tell_cluster(ClusterNote::Work(agent_id.clone()));
                continue;
            };
            let signal = herald_shared::protocol::Signal {
                job_id: *job_id,
                envelope: fan_out.envelope.clone(),
                bundle: None,
                ticket: fan_out
                    .open_timeout_ms
                    .map(|timeout| self.ticket(*job_id, timeout)),
            };
            link.wake
                .direct
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(Outgoing {
                    msg: ServerMsg::Signal(signal),
                    window: window.as_mut().and_then(|w| w.split(1)),
                });
            link.wake.notify.notify_one();
        }
    }

    fn ticket(&self, job_id: JobId, timeout_ms: u64) -> String {
        self.tickets
            .mint(job_id, now_ms().saturating_add(timeout_ms as i64))
    }

    /// Revokes: closes the live connection; the keyring refuses the next handshake.
    pub fn revoke(&self, agent_id: &str, key: Vec<u8>) {
        self.keyring.revoked(key);
        self.tell_cluster(ClusterNote::Keys);
        if let Some(link) = self.lock_links().remove(agent_id) {
            self.tell_cluster(ClusterNote::Offline(agent_id.to_string()));
            link.connection
                .close(close::REVOKED.into(), b"agent revoked");
        }
    }

    /// Sends a new membership to the agent, if connected.
    pub fn membership_changed(&self, agent_id: &str) {
        // The link reads the membership from the store on poke; simplest is to close
        // nothing and let the link loop pick it up.
        self.poke(agent_id);
    }

    fn lock_links(&self) -> std::sync::MutexGuard<'_, HashMap<String, Registered>> {
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Accepts connections until `shutdown` resolves, then closes them all.
    pub async fn serve(
        self: Arc<Self>,
        endpoint: quinn::Endpoint,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        let handshaking = Arc::new(Semaphore::new(HANDSHAKES_PER_CORE * cores));
        loop {
            tokio::select! {
                incoming = endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let Ok(slot) = handshaking.clone().try_acquire_owned() else {
                        // Shed load: the agent retries on its jittered backoff at once,
                        // instead of waiting out retransmission timeouts that double.
                        self.refusals.add(Refusal::Overload);
                        incoming.refuse();
                        continue;
                    };
                    let relay = self.clone();
                    tokio::spawn(async move {
                        let remote = incoming.remote_address();
                        let connected = incoming.await;
                        drop(slot);
                        match connected {
                            Ok(connection) => relay.handle(connection).await,
                            Err(e) => {
                                relay.refusals.add(Refusal::of_handshake(&e));
                                debug!(%remote, "handshake failed: {e}");
                            }
                        }
                    });
                }
                _ = &mut shutdown => break,
            }
        }
        let open = u32::try_from(endpoint.open_connections()).unwrap_or(u32::MAX);
        let links = std::mem::take(&mut *self.lock_links());
        // Agents spread their reconnections over a window sized so that they arrive at
        // about the rate this server takes handshakes; all at once, most would be
        // dropped in the socket buffer and wait out doubling retransmission timers.
        // They start once the close frames have typically gone out (the flush below
        // also waits for stragglers) and the server has had a second to come back;
        // attempts before that get no answer and are retransmitted.
        let closing = SHUTDOWN_FLUSH_PER_CONNECTION * open;
        let flush = SHUTDOWN_FLUSH + closing;
        let rate = RESTART_HANDSHAKES_PER_CORE * cores as u64;
        let spread =
            Duration::from_millis(links.len() as u64 * 1000 / rate).min(RECONNECT_WINDOW_CAP);
        let back = closing + RESTART_ALLOWANCE;
        let reason = close::shutdown_reason(back..back + spread);
        for link in links.values() {
            link.connection
                .close(close::SHUTDOWN.into(), reason.as_bytes());
        }
        drop(links);
        // Let the close frames go out: without them agents only notice at their idle
        // timeout (a minute), since a stopped server cannot answer with resets. Agents
        // that try to come back meanwhile get no answer (a closed endpoint would refuse
        // them, and each refusal doubles their backoff): their handshake packets are
        // retransmitted and reach the restarted server.
        let deadline = tokio::time::sleep(flush);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                incoming = endpoint.accept() => match incoming {
                    Some(incoming) => incoming.ignore(),
                    None => break,
                },
                () = endpoint.wait_idle() => break,
                () = &mut deadline => break,
            }
        }
        endpoint.close(close::SHUTDOWN.into(), reason.as_bytes());
    }

    async fn handle(self: Arc<Self>, connection: Connection) {
        let remote = connection.remote_address();
        let result = self.clone().converse(&connection).await;
        match result {
            Ok(()) => debug!(%remote, "connection closed"),
            Err(LinkError::Connection(e)) => debug!(%remote, "connection ended: {e}"),
            Err(LinkError::Violation(violation)) => {
                let code = violation.code();
                let e = LinkError::Violation(violation);
                warn!(%remote, "closing connection: {e}");
                connection.close(code.into(), e.to_string().as_bytes());
            }
            Err(e @ (LinkError::Wire(WireError::Codec(_)) | LinkError::Protocol(_))) => {
                warn!(%remote, "closing connection: {e}");
                connection.close(close::PROTOCOL.into(), e.to_string().as_bytes());
            }
            Err(e) => {
                debug!(%remote, "connection failed: {e}");
                connection.close(close::PROTOCOL.into(), b"error");
            }
        }
    }

    async fn converse(self: Arc<Self>, connection: &Connection) -> Result<(), LinkError> {
        let Some(key) = peer_key(connection) else {
            self.refusals.add(Refusal::BadCertificate);
            return Err(LinkError::Protocol("no usable client certificate".into()));
        };
        let timed_out = || {
            self.refusals.add(Refusal::Timeout);
            LinkError::Timeout
        };
        let (mut send, mut recv) = tokio::time::timeout(HELLO_TIMEOUT, connection.accept_bi())
            .await
            .map_err(|_| timed_out())??;
        let first = tokio::time::timeout(HELLO_TIMEOUT, read_frame(&mut recv, DEFAULT_FRAME_LIMIT))
            .await
            .map_err(|_| timed_out())??;
        let Some(first) = first else {
            return Ok(());
        };
        let mut link = Link::new();
        match link.handle_greeting(first) {
            Greeting::Enroll(enroll) => self.enroll(connection, &key, enroll, &mut send).await,
            Greeting::Admit(hello) => {
                self.session(connection, &key, link, hello, send, recv)
                    .await
            }
            Greeting::Side(request) => self.side(connection, &key, request, send, recv).await,
            Greeting::Refuse(reason) => {
                // Only a Hello of another protocol version is refused here.
                self.refusals.add(Refusal::Version);
                refuse(connection, &mut send, &reason).await
            }
            Greeting::Close(violation) => {
                self.refusals.add(Refusal::Protocol);
                Err(violation.into())
            }
        }
    }

    async fn enroll(
        &self,
        connection: &Connection,
        key: &[u8],
        enroll: Enroll,
        send: &mut SendStream,
    ) -> Result<(), LinkError> {
        let ip = connection.remote_address().ip();
        if self.enroll_blocked(ip) {
            self.refusals.add(Refusal::Enrollment);
            return refuse(
                connection,
                send,
                "too many failed enrollment attempts; try again later",
            )
            .await;
        }
        if enroll.protocol.0 != PROTOCOL_MAJOR {
            self.refusals.add(Refusal::Version);
            return refuse(connection, send, &version_refusal(enroll.protocol.0)).await;
        }
        if self.keyring.status(key) != KeyStatus::Unknown {
            self.refusals.add(Refusal::Enrollment);
            return refuse(connection, send, "this agent identity is already enrolled").await;
        }
        let agent_id = herald_shared::agent_id(key);
        let name = if herald_shared::valid_name(&enroll.name) {
            enroll.name.clone()
        } else {
            format!("agent-{}", &agent_id[..8])
        };
        let facts = serde_json::to_string(&enroll.facts).unwrap_or_else(|_| "{}".into());
        let granted = self.store.enroll(
            &secret_hash(&enroll.secret),
            &agent_id,
            &name,
            key,
            &facts,
            now_ms(),
        );
        match granted {
            Ok(Some(grant)) => {
                self.keyring.enrolled(key.to_vec());
                self.tell_cluster(ClusterNote::Keys);
                info!(%agent_id, %name, groups = ?grant.groups, "agent enrolled");
                write_frame(send, &ServerMsg::Enrolled { agent_id }).await?;
                let _ = send.finish();
                let _ = tokio::time::timeout(HELLO_TIMEOUT, send.stopped()).await;
                connection.close(close::DONE.into(), b"enrolled");
                Ok(())
            }
            Ok(None) => {
                self.enroll_failed(ip);
                self.refusals.add(Refusal::Enrollment);
                refuse(
                    connection,
                    send,
                    "enrollment token is invalid, used up or expired",
                )
                .await
            }
            Err(crate::store::StoreError::Conflict(reason)) => {
                self.refusals.add(Refusal::Enrollment);
                refuse(connection, send, &reason).await
            }
            Err(e) => Err(e.into()),
        }
    }

    fn enroll_blocked(&self, ip: IpAddr) -> bool {
        let mut failures = self
            .enroll_failures
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        failures.retain(|_, (since, _)| since.elapsed() < ENROLL_WINDOW);
        failures
            .get(&ip)
            .is_some_and(|(_, count)| *count >= ENROLL_FAILURES_ALLOWED)
    }

    fn enroll_failed(&self, ip: IpAddr) {
        let mut failures = self
            .enroll_failures
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let entry = failures.entry(ip).or_insert((Instant::now(), 0));
        entry.1 += 1;
    }

    /// An agent's session, from its accepted `Hello` to the end of the connection.
    async fn session(
        self: Arc<Self>,
        connection: &Connection,
        key: &[u8],
        mut link: Link,
        hello: Hello,
        mut send: SendStream,
        mut recv: RecvStream,
    ) -> Result<(), LinkError> {
        let agent_id = herald_shared::agent_id(key);
        let status = self.keyring.status(key);
        if status != KeyStatus::Enrolled || !self.store.agent_active(&agent_id)? {
            self.refusals.add(match status {
                KeyStatus::Unknown => Refusal::UnknownAgent,
                // Enrolled in the keyring but no longer active in the store: revoked.
                KeyStatus::Enrolled | KeyStatus::Revoked => Refusal::Revoked,
            });
            return refuse(
                connection,
                &mut send,
                "this agent is not enrolled; run `herald-agent enroll TOKEN`",
            )
            .await;
        }
        let now = now_ms();
        let observed = connection.remote_address();
        let facts = serde_json::to_string(&hello.facts).unwrap_or_else(|_| "{}".into());
        self.store.agent_connected(
            &agent_id,
            &hello.agent_version,
            &facts,
            &observed.to_string(),
            now,
        )?;
        self.store
            .local_addresses(&agent_id, &join_addresses(&hello.addresses), now)?;
        let membership = self.store.membership(&agent_id)?;
        let welcome = link.handle_admitted(agent_id.clone(), membership, observed, now);
        write_frame(&mut send, &welcome).await?;

        let wake = Arc::new(Wake::default());
        wake.query.store(true, std::sync::atomic::Ordering::SeqCst);
        let generation = self
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(old) = self.lock_links().insert(
            agent_id.clone(),
            Registered {
                connection: connection.clone(),
                wake: wake.clone(),
                generation,
                since: now,
            },
        ) {
            old.connection
                .close(close::REPLACED.into(), b"replaced by a newer connection");
        }
        self.tell_cluster(ClusterNote::Online(agent_id.clone(), now));
        info!(%agent_id, %observed, version = %hello.agent_version, "agent connected");

        let (outbox, outbox_rx) = mpsc::channel(OUTBOX_DEPTH);
        let in_flight = InFlight::default();
        let conn = Conn {
            agent_id: &agent_id,
            key,
            connection,
            link: Mutex::new(link),
            in_flight: &in_flight,
            outbox,
        };
        let result = tokio::select! {
            r = writer(send, outbox_rx, &in_flight) => r,
            r = self.deliver(&conn, wake) => r,
            r = self.read_control(&conn, &mut recv) => r,
            r = self.read_results(&conn) => r,
            r = self.watch_path(&conn) => r,
            r = self.clone().accept_requests(connection, &agent_id) => r,
        };
        drop(conn);
        {
            let mut links = self.lock_links();
            if links
                .get(&agent_id)
                .is_some_and(|l| l.generation == generation)
            {
                links.remove(&agent_id);
                self.tell_cluster(ClusterNote::Offline(agent_id.clone()));
            }
        }
        let _ = self.store.touch(&agent_id, now_ms());
        info!(%agent_id, "agent disconnected");
        result
    }

    /// Sends every pending job (once per connection) and new memberships, then waits to
    /// be woken: by a poke (read the store again) or by signals pushed directly. The
    /// store is read first, so jobs go out in job order when both are due.
    async fn deliver(&self, conn: &Conn<'_>, wake: Arc<Wake>) -> Result<(), LinkError> {
        loop {
            if wake.query.swap(false, std::sync::atomic::Ordering::SeqCst) {
                let membership = self.store.membership(conn.agent_id)?;
                let pending = self.store.pending(conn.agent_id, now_ms())?;
                for job_id in pending.failed {
                    self.job_changed(job_id);
                }
                let requests = self.store.block_requests(conn.agent_id)?;
                {
                    let mut link = conn.link();
                    link.handle_snapshot(membership, pending.jobs);
                    link.handle_requests(requests);
                }
                // The guard is dropped before each send: the link is never held across
                // an await.
                while let Some(transmit) = conn.poll_transmit() {
                    let msg = match transmit {
                        Transmit::Membership(envelope) => ServerMsg::Membership(envelope),
                        Transmit::Signal(job) => ServerMsg::Signal(self.signal(job)),
                        Transmit::BlockRequest(r) => ServerMsg::BlockRequest {
                            id: r.id,
                            sender: r.sender,
                            blocked: r.blocked,
                        },
                    };
                    if conn.outbox.send(Outgoing::new(msg)).await.is_err() {
                        return Ok(());
                    }
                }
            }
            let direct =
                std::mem::take(&mut *wake.direct.lock().unwrap_or_else(|e| e.into_inner()));
            for outgoing in direct {
                let ServerMsg::Signal(signal) = &outgoing.msg else {
                    continue;
                };
                let fresh = conn.link().handle_pushed(signal.job_id);
                if fresh && conn.outbox.send(Box::new(outgoing)).await.is_err() {
                    return Ok(());
                }
            }
            wake.notify.notified().await;
        }
    }

    /// A pending job as the agent gets it: an install's release with where to download
    /// it, a browser job's one-time ticket.
    fn signal(&self, job: Pending) -> herald_shared::protocol::Signal {
        let bundle = job.release.map(|r| Bundle {
            url: r
                .url
                .unwrap_or_else(|| format!("{}/{}", self.artifact_base, r.sha256)),
            release: r.metadata,
            delegation: r.delegation,
        });
        herald_shared::protocol::Signal {
            job_id: job.job_id,
            envelope: job.envelope,
            bundle,
            ticket: job
                .open_timeout_ms
                .map(|timeout| self.ticket(job.job_id, timeout)),
        }
    }

    async fn read_control(&self, conn: &Conn<'_>, recv: &mut RecvStream) -> Result<(), LinkError> {
        while let Some(msg) = read_frame::<AgentMsg>(recv, DEFAULT_FRAME_LIMIT).await? {
            let effect = conn.link().handle_message(Stream::Control, msg, now_ms());
            if self.apply(conn, effect).await?.is_break() {
                return Ok(());
            }
        }
        Ok(())
    }

    async fn read_results(&self, conn: &Conn<'_>) -> Result<(), LinkError> {
        loop {
            let mut recv = conn.connection.accept_uni().await?;
            let Some(msg) = read_frame::<AgentMsg>(&mut recv, RESULT_FRAME_LIMIT).await? else {
                continue;
            };
            let effect = conn.link().handle_message(Stream::Result, msg, now_ms());
            if self.apply(conn, effect).await?.is_break() {
                return Ok(());
            }
        }
    }

    /// Checks the path every [`PATH_CHECK`].
    async fn watch_path(&self, conn: &Conn<'_>) -> Result<(), LinkError> {
        let mut tick = tokio::time::interval(PATH_CHECK);
        loop {
            tick.tick().await;
            self.check_path(conn, now_ms())?;
        }
    }

    /// Records the observed address again if QUIC has migrated the path.
    fn check_path(&self, conn: &Conn<'_>, now: crate::Millis) -> Result<(), LinkError> {
        let observed = conn.connection.remote_address();
        let Some(Migrated { from, to }) = conn.link().handle_path(observed) else {
            return Ok(());
        };
        let agent_id = conn.agent_id;
        info!(%agent_id, %from, %to, "connection migrated");
        self.store
            .observed_address(agent_id, &to.to_string(), now)?;
        Ok(())
    }

    /// Carries out what the link decided about a message. Breaks when the connection's
    /// writer is gone (the session is ending).
    async fn apply(&self, conn: &Conn<'_>, effect: Effect) -> Result<ControlFlow<()>, LinkError> {
        let agent_id = conn.agent_id;
        match effect {
            Effect::StoreAck { job_id, refused } => {
                if let Some(rtt) = conn.in_flight.acked(job_id) {
                    self.signal_rtt.observe(rtt);
                }
                debug!(%agent_id, job_id, ?refused, "ack");
                // Committed by write_acks, batched with other agents' acks.
                let _ = self.acks.send((agent_id.to_string(), job_id, refused));
            }
            Effect::StoreStarted { job_id, at, now } => {
                self.store.started(agent_id, job_id, at, now)?;
                self.job_changed(job_id);
            }
            Effect::StoreProgress { job_id, progress } => {
                self.store
                    .progress(agent_id, job_id, &progress.to_string())?;
                self.job_changed(job_id);
            }
            Effect::StoreAddresses { addresses, now } => {
                info!(%agent_id, ?addresses, "agent reported addresses");
                self.check_path(conn, now)?;
                self.store
                    .local_addresses(agent_id, &join_addresses(&addresses), now)?;
            }
            Effect::StoreShares { shares, now } => {
                info!(%agent_id, shares = shares.len(), "agent reported its shares");
                self.store.set_shares(agent_id, &shares, now)?;
            }
            Effect::StoreResult { result, now } => {
                let stored = self.store.store_result(agent_id, &result, now)?;
                debug!(%agent_id, job_id = result.job_id, stored, status = result.status.as_str(), "result");
                if stored {
                    self.job_changed(result.job_id);
                }
                let ack = conn
                    .link()
                    .handle_result_stored(result.job_id, result.attempt);
                if conn.outbox.send(Outgoing::new(ack)).await.is_err() {
                    return Ok(ControlFlow::Break(()));
                }
            }
            Effect::StoreReport { seq, report } => {
                self.store_report(conn, report).await?;
                let ack = ServerMsg::ReportStored { seq };
                if conn.outbox.send(Outgoing::new(ack)).await.is_err() {
                    return Ok(ControlFlow::Break(()));
                }
            }
            Effect::Close(violation) => return Err(violation.into()),
        }
        Ok(ControlFlow::Continue(()))
    }

    /// Verifies a signed report against the key the connection authenticated with and
    /// stores it (in the relay-wide batch), returning once it is committed. A report
    /// that does not verify, or names a message the agent was never sent, is logged and
    /// dropped: sending it again would not change it, so it is acknowledged all the same.
    async fn store_report(
        &self,
        conn: &Conn<'_>,
        signed: herald_shared::message::SignedReport,
    ) -> Result<(), LinkError> {
        let agent_id = conn.agent_id;
        let report = match signed.verify(conn.key) {
            Ok(report) => report,
            Err(e) => {
                warn!(%agent_id, "dropping a report that does not verify: {e}");
                return Ok(());
            }
        };
        let (done, outcome) = tokio::sync::oneshot::channel();
        let record = ReportRecord {
            agent_id: agent_id.to_string(),
            signed,
            report,
            done,
        };
        if self.reports.send(record).is_err() {
            return Err(LinkError::Reports("the report writer has stopped".into()));
        }
        match outcome.await {
            Ok(ReportOutcome::Stored) => Ok(()),
            Ok(ReportOutcome::Dropped(reason)) => {
                warn!(%agent_id, "dropping a report: {reason}");
                Ok(())
            }
            // The agent keeps it and sends it again on its next connection.
            Ok(ReportOutcome::Failed(reason)) => Err(LinkError::Reports(reason)),
            Err(_) => Err(LinkError::Reports("the report writer has stopped".into())),
        }
    }
}

/// One agent session's parts, shared by its tasks (which run in one task, joined by
/// `select!`: the link's lock is never contended, and never held across an await).
struct Conn<'a> {
    agent_id: &'a str,
    /// The agent's public key, as its certificate proved (reports are verified with it).
    key: &'a [u8],
    connection: &'a Connection,
    link: Mutex<Link>,
    in_flight: &'a InFlight,
    outbox: mpsc::Sender<Box<Outgoing>>,
}

impl Conn<'_> {
    fn link(&self) -> std::sync::MutexGuard<'_, Link> {
        self.link.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The link's next message to send. A call of its own so that the guard is gone
    /// before the caller awaits the send (in a `while let` it would live through the
    /// loop's body).
    fn poll_transmit(&self) -> Option<Transmit> {
        self.link().poll_transmit()
    }
}

/// Commits records in the batches [`Batches`] forms: whatever has queued up while the
/// previous batch was written goes in the next transaction, so a broadcast's thousands
/// of acknowledgements (or receipts) cost a few commits, not thousands. `write` runs on
/// the blocking pool with each batch and does the rest (commit, then tell whoever
/// waits). Ends when every sender is gone and the last batch is written.
async fn write_in_batches<T, W>(mut queue: mpsc::UnboundedReceiver<T>, write: W)
where
    T: Send + 'static,
    W: Fn(Vec<T>) + Clone + Send + 'static,
{
    /// The write in progress, if any (never ready when there is none).
    async fn finished(
        writing: &mut Option<tokio::task::JoinHandle<()>>,
    ) -> Result<(), tokio::task::JoinError> {
        match writing {
            Some(write) => write.await,
            None => std::future::pending().await,
        }
    }

    let mut batches = Batches::default();
    let mut arrived = Vec::with_capacity(64);
    let mut writing = None;
    let mut open = true;
    loop {
        if let Some(records) = batches.poll_batch() {
            let write = write.clone();
            writing = Some(tokio::task::spawn_blocking(move || write(records)));
        }
        if !open && batches.is_idle() {
            return;
        }
        tokio::select! {
            received = queue.recv_many(&mut arrived, ACK_BATCH), if open => {
                // Zero: every sender is gone with the relay; write what is left.
                open = received > 0;
                for record in arrived.drain(..) {
                    batches.handle_ack(record);
                }
            }
            _ = finished(&mut writing) => {
                writing = None;
                batches.handle_written();
            }
        }
    }
}

/// Commits acknowledgements in batches, then tells watchers the jobs changed.
async fn write_acks(
    store: Store,
    relay: std::sync::Weak<Relay>,
    queue: mpsc::UnboundedReceiver<AckRecord>,
) {
    write_in_batches(queue, move |records: Vec<AckRecord>| {
        if let Err(e) = store.ack_batch(&records, now_ms()) {
            // The jobs stay queued and are signalled again on the next connection; the
            // agent answers duplicates from its journal.
            warn!(acks = records.len(), "cannot store acknowledgements: {e}");
            return;
        }
        if let Some(relay) = relay.upgrade() {
            for (_, job_id, _) in &records {
                relay.job_changed(*job_id);
            }
        }
    })
    .await
}

/// Commits verified reports in batches; each waiting session hears how its report
/// fared before it acknowledges it to the agent.
async fn write_reports(
    store: Store,
    relay: std::sync::Weak<Relay>,
    queue: mpsc::UnboundedReceiver<ReportRecord>,
) {
    write_in_batches(queue, move |records: Vec<ReportRecord>| {
        let items: Vec<_> = records
            .iter()
            .map(|r| (r.agent_id.as_str(), &r.signed, &r.report))
            .collect();
        match store.store_reports(&items, now_ms()) {
            Ok(outcomes) => {
                let relay = relay.upgrade();
                for (record, outcome) in records.into_iter().zip(outcomes) {
                    let outcome = match outcome {
                        Ok(crate::store::ReportStored::Receipt {
                            job_id: Some(job_id),
                        }) => {
                            if let Some(relay) = &relay {
                                relay.job_changed(job_id);
                            }
                            ReportOutcome::Stored
                        }
                        Ok(_) => ReportOutcome::Stored,
                        Err(e) => ReportOutcome::Dropped(e.to_string()),
                    };
                    let _ = record.done.send(outcome);
                }
            }
            Err(e) => {
                let reason = e.to_string();
                for record in records {
                    let _ = record.done.send(ReportOutcome::Failed(reason.clone()));
                }
            }
        }
    })
    .await
}

/// Wakes the links of each queued fan-out, [`FAN_OUT_CHUNK`] at a time, letting the
/// woken links, their connections and the socket reader run in between. Ends when the
/// relay is gone.
async fn fan_out(
    relay: std::sync::Weak<Relay>,
    window: Arc<Semaphore>,
    mut queue: mpsc::UnboundedReceiver<FanOut>,
) {
    while let Some(fan_out) = queue.recv().await {
        for chunk in fan_out.jobs.chunks(FAN_OUT_CHUNK) {
            let room = tokio::time::timeout(
                FAN_OUT_WAIT,
                window.clone().acquire_many_owned(chunk.len() as u32),
            )
            .await;
            let Some(relay) = relay.upgrade() else {
                return;
            };
            // Without room after the wait, send anyway, outside the window.
            relay.push_chunk(&fan_out, chunk, room.ok().and_then(Result::ok));
            drop(relay);
            tokio::task::yield_now().await;
        }
    }
}

async fn writer(
    mut send: SendStream,
    mut outbox: mpsc::Receiver<Box<Outgoing>>,
    in_flight: &InFlight,
) -> Result<(), LinkError> {
    while let Some(outgoing) = outbox.recv().await {
        let Outgoing { msg, window } = *outgoing;
        if let ServerMsg::Signal(signal) = &msg {
            in_flight.sent(signal.job_id, window);
        }
        write_frame(&mut send, &msg).await?;
    }
    Ok(())
}

async fn refuse(
    connection: &Connection,
    send: &mut SendStream,
    reason: &str,
) -> Result<(), LinkError> {
    info!(remote = %connection.remote_address(), "refusing agent: {reason}");
    write_frame(send, &ServerMsg::Refused(reason.to_string())).await?;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
    connection.close(close::REFUSED.into(), reason.as_bytes());
    Ok(())
}

fn peer_key(connection: &Connection) -> Option<Vec<u8>> {
    herald_io::tls::peer_agent_key(connection).map(|key| key.to_vec())
}

fn join_addresses(addresses: &[IpAddr]) -> String {
    let mut text: Vec<String> = addresses.iter().map(|a| a.to_string()).collect();
    text.sort();
    text.join(",")
}

async fn read_frame<T: serde::de::DeserializeOwned>(
    recv: &mut RecvStream,
    limit: usize,
) -> Result<Option<T>, LinkError> {
    Ok(wire::read_frame(recv, limit).await?)
}

async fn write_frame<T: serde::Serialize>(send: &mut SendStream, msg: &T) -> Result<(), LinkError> {
    Ok(wire::write_frame(send, msg, DEFAULT_FRAME_LIMIT).await?)
}
