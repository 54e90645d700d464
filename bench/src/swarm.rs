//! The swarm: many simulated agents in one process, each with its own Ed25519 identity
//! and mutual-TLS QUIC connection, speaking the real protocol (`herald_shared`,
//! `herald_agent::wire`). Many connections share one UDP socket per endpoint.
//!
//! A simulated agent says hello, then acknowledges every signal at once and records when
//! it arrived; it runs nothing. A signal carrying a push message is acknowledged too,
//! then answered with a `stored` receipt signed by the agent's identity key, as a real
//! agent does once the message is in its inbox (the simulated agent keeps no inbox).
//! Like the real agent's report outbox, a receipt is resent on every new connection
//! until the server answers `ReportStored` (kept in memory only).
//! On a lost connection it reconnects with the real agent's full-jitter backoff.
//!
//! Each agent is given one server address, or (for several nodes) the list of every
//! node's address with one of them preferred: it then connects as the real agent does
//! (`herald_agent::link::connect_preferring`: the preferred address first, 4 s each but
//! the last) and afterwards prefers the node that answered last.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use ed25519_dalek::pkcs8::DecodePrivateKey;
use ed25519_dalek::SigningKey;
use quinn::Endpoint;
use tokio::sync::Notify;

use herald_agent::state::Identity;
use herald_io::wire;
use herald_shared::codec::DEFAULT_FRAME_LIMIT;
use herald_shared::envelope::Statement;
use herald_shared::message::{message_hash, Receipt, ReceiptState, Report, SignedReport};
use herald_shared::protocol::{
    Ack, AgentMsg, Facts, Hello, JobId, ServerMsg, PROTOCOL_MAJOR, PROTOCOL_MINOR, SERVER_NAME,
};

/// Connections per client UDP socket.
const AGENTS_PER_ENDPOINT: usize = 2_000;
/// Handshakes in flight at once while first connecting the swarm. Reconnections are not
/// gated: real agents come back independently, each on its own backoff, and a gate would
/// be held by attempts waiting for a server that is still down.
const CONNECT_CONCURRENCY: usize = 64;

/// A signal arriving at a simulated agent.
#[derive(Debug, Clone, Copy)]
pub struct Arrival {
    /// Index of the agent in the swarm.
    pub agent: usize,
    /// Job id.
    pub job_id: JobId,
    /// When it arrived.
    pub at: Instant,
}

/// Shared counters and the record of arrivals.
#[derive(Default)]
pub struct Observed {
    /// Agents with a live session (Welcome received).
    pub connected: AtomicUsize,
    /// Sessions established in total (counts reconnections).
    pub sessions: AtomicUsize,
    /// Connection attempts in total (successful or not).
    pub attempts: AtomicUsize,
    /// Every signal received.
    pub arrivals: Mutex<Vec<Arrival>>,
    /// When each `ReportStored` came back: the server answers only after the report
    /// is committed, so these bound the commits from above.
    pub reports_stored: Mutex<Vec<Instant>>,
    /// Every session's start and end, in order (which node each agent is on, and when
    /// it moved).
    pub links: Mutex<Vec<LinkEvent>>,
    /// Notified on every arrival and every new session.
    pub changed: Notify,
}

impl Observed {
    /// Agents with a live session on `server` now.
    pub fn connected_to(&self, server: SocketAddr) -> usize {
        let links = self.links.lock().expect("links lock");
        let up = links.iter().filter(|l| l.server == server && l.up).count();
        let down = links.iter().filter(|l| l.server == server && !l.up).count();
        up - down
    }

    fn record_link(&self, agent: usize, server: SocketAddr, up: bool) {
        self.links.lock().expect("links lock").push(LinkEvent {
            agent,
            server,
            up,
            at: Instant::now(),
        });
    }
}

/// A session of one agent began (Welcome received) or ended.
#[derive(Debug, Clone, Copy)]
pub struct LinkEvent {
    /// Index of the agent in the swarm.
    pub agent: usize,
    /// The node's address.
    pub server: SocketAddr,
    /// Began (true) or ended.
    pub up: bool,
    /// When.
    pub at: Instant,
}

/// Where an agent connects: one address, or every node's with one preferred.
#[derive(Debug, Clone)]
struct Route {
    /// Every node's address, comma-separated, as `public_addr` lists them; `None` for
    /// one server.
    nodes: Option<String>,
    /// Tried first: the one server, or the node that answered last.
    prefer: SocketAddr,
}

/// One simulated agent's identity.
pub struct SimAgent {
    /// Agent id (from the key).
    pub id: String,
    /// Raw public key.
    pub public_key: Vec<u8>,
    /// The identity key, which signs the agent's reports (receipts).
    key: SigningKey,
    config: quinn::ClientConfig,
}

impl SimAgent {
    /// Makes a new identity and its client configuration pinned to the server CA.
    pub fn generate(ca_fingerprint: [u8; 32], keep_alive: Duration) -> anyhow::Result<SimAgent> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
        let public_key = key.public_key_raw().to_vec();
        let signing = SigningKey::from_pkcs8_der(&key.serialize_der())
            .map_err(|e| anyhow::anyhow!("reading the generated Ed25519 key as PKCS#8: {e}"))?;
        anyhow::ensure!(
            signing.verifying_key().as_bytes()[..] == public_key[..],
            "the PKCS#8 key does not match the certificate's public key"
        );
        let cert =
            rcgen::CertificateParams::new(vec!["herald-agent".to_string()])?.self_signed(&key)?;
        let identity = Identity {
            cert: cert.der().clone(),
            key: rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()),
            public_key: public_key.clone(),
        };
        let config = herald_agent::tls::client_config(ca_fingerprint, &identity, keep_alive)?;
        Ok(SimAgent {
            id: identity.agent_id(),
            public_key,
            key: signing,
            config,
        })
    }

    /// Gives up on a silent server after `idle` (with keep-alives every `keep_alive`)
    /// instead of the agent's `IDLE_TIMEOUT`: the only two settings of the agent's QUIC
    /// transport (`herald_agent::tls::client_config`). For smoke tests that kill a node
    /// and cannot wait a minute for its agents to notice.
    pub fn with_idle_timeout(
        mut self,
        keep_alive: Duration,
        idle: Duration,
    ) -> anyhow::Result<SimAgent> {
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(keep_alive));
        transport.max_idle_timeout(Some(idle.try_into().context("idle timeout")?));
        self.config.transport_config(Arc::new(transport));
        Ok(self)
    }
}

/// The running swarm.
pub struct Swarm {
    /// Counters and arrivals.
    pub observed: Arc<Observed>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    endpoints: Vec<Endpoint>,
}

impl Swarm {
    /// Starts every agent; they connect (with bounded concurrency) and stay connected,
    /// reconnecting when their connection drops.
    pub fn start(agents: Vec<SimAgent>, server: SocketAddr) -> anyhow::Result<Swarm> {
        Swarm::start_routed(agents, |_| Route {
            nodes: None,
            prefer: server,
        })
    }

    /// [`Swarm::start`] against several nodes: every agent knows every node's address,
    /// and agent `i` prefers `nodes[i % nodes.len()]` (so the swarm is split evenly, as
    /// if each had last been connected there); when its node stops answering it moves
    /// to another as the real agent does.
    pub fn start_on_nodes(agents: Vec<SimAgent>, nodes: &[SocketAddr]) -> anyhow::Result<Swarm> {
        anyhow::ensure!(!nodes.is_empty(), "no node to connect to");
        let list = nodes
            .iter()
            .map(SocketAddr::to_string)
            .collect::<Vec<_>>()
            .join(",");
        Swarm::start_routed(agents, |i| Route {
            nodes: Some(list.clone()),
            prefer: nodes[i % nodes.len()],
        })
    }

    fn start_routed(
        agents: Vec<SimAgent>,
        route: impl Fn(usize) -> Route,
    ) -> anyhow::Result<Swarm> {
        let observed = Arc::new(Observed::default());
        let endpoint_count = agents.len().div_ceil(AGENTS_PER_ENDPOINT).max(1);
        // Large socket buffers like the server's: a broadcast's thousands of signals
        // arrive at once, and each packet the kernel drops costs its connection a
        // retransmission timeout.
        let endpoints = (0..endpoint_count)
            .map(|_| {
                let socket = herald_server::serve::quic_socket(
                    "127.0.0.1:0".parse().expect("valid literal"),
                )?;
                Endpoint::new(
                    quinn::EndpointConfig::default(),
                    None,
                    socket,
                    Arc::new(quinn::TokioRuntime),
                )
            })
            .collect::<Result<Vec<_>, _>>()
            .context("binding client UDP sockets")?;
        let gate = Arc::new(tokio::sync::Semaphore::new(CONNECT_CONCURRENCY));
        let tasks = agents
            .into_iter()
            .enumerate()
            .map(|(index, agent)| {
                let endpoint = endpoints[index % endpoint_count].clone();
                let observed = observed.clone();
                let gate = gate.clone();
                tokio::spawn(run_agent(
                    index,
                    agent,
                    endpoint,
                    route(index),
                    observed,
                    gate,
                ))
            })
            .collect();
        Ok(Swarm {
            observed,
            tasks,
            endpoints,
        })
    }

    /// Waits until at least `n` agents have a live session, or the deadline passes.
    pub async fn wait_connected(&self, n: usize, deadline: Duration) -> anyhow::Result<Duration> {
        let start = Instant::now();
        loop {
            let notified = self.observed.changed.notified();
            if self.observed.connected.load(Ordering::SeqCst) >= n {
                return Ok(start.elapsed());
            }
            let left = deadline.checked_sub(start.elapsed()).with_context(|| {
                format!(
                    "only {} of {n} agents connected after {deadline:?}",
                    self.observed.connected.load(Ordering::SeqCst)
                )
            })?;
            let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), notified).await;
        }
    }

    /// Waits until `job_ids` have all arrived (one per agent per job), returning the
    /// arrivals of those jobs. Each arrival is looked at once (a broadcast to 100,000
    /// agents must not rescan the whole record on every arrival).
    pub async fn wait_arrivals(
        &self,
        job_ids: &[JobId],
        deadline: Duration,
    ) -> anyhow::Result<Vec<Arrival>> {
        let start = Instant::now();
        let wanted: std::collections::HashSet<JobId> = job_ids.iter().copied().collect();
        let mut got = Vec::with_capacity(wanted.len());
        let mut scanned = 0;
        loop {
            let notified = self.observed.changed.notified();
            {
                let arrivals = self.observed.arrivals.lock().expect("arrivals lock");
                got.extend(
                    arrivals[scanned..]
                        .iter()
                        .filter(|a| wanted.contains(&a.job_id))
                        .copied(),
                );
                scanned = arrivals.len();
            }
            if got.len() >= wanted.len() {
                return Ok(got);
            }
            let left = deadline.checked_sub(start.elapsed()).with_context(|| {
                format!(
                    "only {} of {} signals arrived after {deadline:?}",
                    got.len(),
                    wanted.len()
                )
            })?;
            let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), notified).await;
        }
    }

    /// Signals received so far (an index into the record of arrivals).
    pub fn arrival_count(&self) -> usize {
        self.observed.arrivals.lock().expect("arrivals lock").len()
    }

    /// The arrivals recorded after the first `from`.
    pub fn arrivals_since(&self, from: usize) -> Vec<Arrival> {
        self.observed.arrivals.lock().expect("arrivals lock")[from..].to_vec()
    }

    /// `ReportStored` answers received so far (an index into their record).
    pub fn reports_stored_count(&self) -> usize {
        self.observed
            .reports_stored
            .lock()
            .expect("reports lock")
            .len()
    }

    /// Waits until `n` more `ReportStored` answers than the first `from` have arrived,
    /// returning when each of those arrived.
    pub async fn wait_reports_stored(
        &self,
        from: usize,
        n: usize,
        deadline: Duration,
    ) -> anyhow::Result<Vec<Instant>> {
        let start = Instant::now();
        loop {
            let notified = self.observed.changed.notified();
            {
                let stored = self.observed.reports_stored.lock().expect("reports lock");
                if stored.len() >= from + n {
                    return Ok(stored[from..from + n].to_vec());
                }
            }
            let left = deadline.checked_sub(start.elapsed()).with_context(|| {
                format!(
                    "only {} of {n} receipts were answered ReportStored after {deadline:?}",
                    self.reports_stored_count().saturating_sub(from)
                )
            })?;
            let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), notified).await;
        }
    }

    /// Stops every agent.
    pub async fn stop(self) {
        for task in &self.tasks {
            task.abort();
        }
        for endpoint in &self.endpoints {
            endpoint.close(0u32.into(), b"bench done");
        }
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

async fn run_agent(
    index: usize,
    agent: SimAgent,
    endpoint: Endpoint,
    mut route: Route,
    observed: Arc<Observed>,
    gate: Arc<tokio::sync::Semaphore>,
) {
    let mut attempt = 0u32;
    let mut gate = Some(gate);
    let mut outbox = Outbox::default();
    loop {
        let started = Instant::now();
        let permit = match gate.take() {
            Some(gate) => Some(gate.acquire_owned().await.expect("semaphore open")),
            None => None,
        };
        observed.attempts.fetch_add(1, Ordering::Relaxed);
        let ended = session(
            index,
            &agent,
            &endpoint,
            &mut route,
            &observed,
            permit,
            &mut outbox,
        )
        .await;
        if started.elapsed() > herald_agent::link::STABLE_PERIOD {
            attempt = 0;
        }
        let random = u64::from_le_bytes(herald_io::random_bytes());
        // As the real agent does (`herald_agent::link::run_forever`).
        let window = ended
            .err()
            .and_then(|e| e.downcast::<herald_agent::link::LinkError>().ok())
            .and_then(|e| e.reconnect_window());
        let delay = herald_agent::link::next_delay(
            window,
            &mut attempt,
            herald_agent::link::BACKOFF_BASE,
            herald_agent::link::BACKOFF_CAP,
            random,
        );
        tokio::time::sleep(delay).await;
    }
}

async fn session(
    index: usize,
    agent: &SimAgent,
    endpoint: &Endpoint,
    route: &mut Route,
    observed: &Observed,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    outbox: &mut Outbox,
) -> anyhow::Result<()> {
    let connection = match &route.nodes {
        None => {
            endpoint
                .connect_with(agent.config.clone(), route.prefer, SERVER_NAME)?
                .await?
        }
        Some(nodes) => {
            herald_agent::link::connect_preferring(
                endpoint,
                agent.config.clone(),
                nodes,
                Some(route.prefer),
            )
            .await?
        }
    };
    let server = connection.remote_address();
    route.prefer = server;
    let (mut send, mut recv) = connection.open_bi().await?;
    let hello = AgentMsg::Hello(Hello {
        protocol: (PROTOCOL_MAJOR, PROTOCOL_MINOR),
        agent_version: "swarm".into(),
        facts: Facts::default(),
        addresses: Vec::new(),
    });
    wire::write_frame(&mut send, &hello, DEFAULT_FRAME_LIMIT).await?;
    match wire::read_frame::<ServerMsg>(&mut recv, DEFAULT_FRAME_LIMIT).await? {
        Some(ServerMsg::Welcome(_)) => {}
        other => anyhow::bail!("expected Welcome, got {other:?}"),
    }
    drop(permit);
    observed.record_link(index, server, true);
    observed.connected.fetch_add(1, Ordering::SeqCst);
    observed.sessions.fetch_add(1, Ordering::SeqCst);
    observed.changed.notify_waiters();
    let result = async {
        for (&seq, report) in &outbox.pending {
            let report = AgentMsg::Report {
                seq,
                report: report.clone(),
            };
            wire::write_frame(&mut send, &report, DEFAULT_FRAME_LIMIT).await?;
        }
        while let Some(msg) = wire::read_frame::<ServerMsg>(&mut recv, DEFAULT_FRAME_LIMIT).await? {
            if let ServerMsg::ReportStored { seq } = msg {
                let at = Instant::now();
                outbox.pending.remove(&seq);
                observed
                    .reports_stored
                    .lock()
                    .expect("reports lock")
                    .push(at);
                observed.changed.notify_waiters();
            }
            if let ServerMsg::Signal(signal) = msg {
                let at = Instant::now();
                let ack = AgentMsg::Ack {
                    job_id: signal.job_id,
                    ack: Ack::Accepted,
                };
                wire::write_frame(&mut send, &ack, DEFAULT_FRAME_LIMIT).await?;
                if let Ok(Statement::Message(message)) = signal.envelope.peek() {
                    outbox.next_seq += 1;
                    let signed = stored_receipt(agent, &message.id, &signal.envelope);
                    outbox.pending.insert(outbox.next_seq, signed.clone());
                    let report = AgentMsg::Report {
                        seq: outbox.next_seq,
                        report: signed,
                    };
                    wire::write_frame(&mut send, &report, DEFAULT_FRAME_LIMIT).await?;
                }
                observed
                    .arrivals
                    .lock()
                    .expect("arrivals lock")
                    .push(Arrival {
                        agent: index,
                        job_id: signal.job_id,
                        at,
                    });
                observed.changed.notify_waiters();
            }
        }
        anyhow::Ok(())
    }
    .await;
    observed.record_link(index, server, false);
    observed.connected.fetch_sub(1, Ordering::SeqCst);
    observed.changed.notify_waiters();
    // Why the connection ended, as the agent would see it (a stopping server's reason
    // carries its reconnect window).
    match connection.close_reason() {
        Some(reason) => Err(herald_agent::link::LinkError::Connection(reason).into()),
        None => result,
    }
}

/// Reports sent and not yet answered `ReportStored`, by sequence number; resent on each
/// new connection, as the real agent's outbox is.
#[derive(Default)]
struct Outbox {
    next_seq: u64,
    pending: std::collections::BTreeMap<u64, SignedReport>,
}

/// The receipt a real agent sends once a message is in its inbox, signed by its identity
/// key (the key its certificate proves, so the server can verify it).
fn stored_receipt(
    agent: &SimAgent,
    message_id: &[u8; 16],
    envelope: &herald_shared::envelope::Envelope,
) -> SignedReport {
    let receipt = Receipt {
        message_id: *message_id,
        message_hash: message_hash(envelope),
        agent_id: agent.id.clone(),
        state: ReceiptState::Stored,
        at: herald_server::now_ms(),
    };
    SignedReport::sign(&agent.key, &Report::Receipt(receipt))
}
