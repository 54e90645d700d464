//! The protocol of one agent connection, as a state machine without I/O.
//!
//! Like quinn-proto's `Connection`, a [`Link`] owns no socket, no store and no clock:
//! the relay's tasks read frames, call the store and read the time, feed what happened
//! to a `handle_*` method (with `now` passed in), and carry out what it answers. It is
//! what decides what is allowed when; the tasks only move bytes, timers and effects.
//!
//! # What the link decides
//!
//! - **Hello first.** The first message on the control stream must be `Hello` (or
//!   `Enroll`, which is its own short exchange); a `Hello` of another major version is
//!   refused with a message saying so. Anything else first, a second `Hello`, or a
//!   message the server never accepts on that stream closes the connection with
//!   [`close::PROTOCOL`] ([`Violation`]). Input from the network never panics.
//! - **Streams.** The control stream carries acknowledgements, `Started`, progress,
//!   address and share reports; each result comes on a unidirectional stream of its
//!   own, which carries nothing else. A connection whose first message is a `Request`
//!   is a side connection ([`Greeting::Side`]): its streams are the relay's requests
//!   (`tunnel.rs`), as are the bidirectional streams an agent opens besides its control
//!   stream.
//! - **Membership before the jobs it admits.** When the store is read
//!   ([`Link::handle_snapshot`]), a changed membership goes out before any signal: a
//!   group job sent before the membership that admits the agent to the group would be
//!   refused as not addressed to it.
//! - **Each job once per connection.** A pending job already signalled on this
//!   connection is not signalled again, whether it came from the store or was handed
//!   over directly by a fan-out. A new connection is a new `Link`: everything still
//!   unacknowledged is signalled again, and the agent deduplicates by job id.
//! - **Acknowledgements** become records for the relay-wide batch writer
//!   ([`super::acks`]); an ack for a job never sent on this connection, or acked twice,
//!   is passed on all the same: the store only moves a job of this agent that is still
//!   in a state the ack applies to, so a stray ack changes nothing.
//! - **Results** are stored, then acknowledged with `ResultStored`, whether or not this
//!   copy was new: the store keeps results idempotently, and the agent drops a result
//!   from its outbox only once acknowledged.
//! - **Path migration.** The address the connection is observed from is recorded again
//!   when it differs from the last one recorded.
//!
//! # Inputs and outputs
//!
//! | input                              | answer                                   |
//! |------------------------------------|------------------------------------------|
//! | [`Link::handle_greeting`]          | one [`Greeting`]                         |
//! | [`Link::handle_message`]           | one [`Effect`]                           |
//! | [`Link::handle_admitted`]          | the `Welcome` to send                    |
//! | [`Link::handle_result_stored`]     | the `ResultStored` to send               |
//! | [`Link::handle_snapshot`]          | messages from [`Link::poll_transmit`]    |
//! | [`Link::handle_requests`]          | messages from [`Link::poll_transmit`]    |
//! | [`Link::handle_pushed`]            | whether to send the pushed signal        |
//! | [`Link::handle_path`] (timer too)  | maybe a [`Migrated`] path to record      |
//!
//! Nothing here allocates per signal: store snapshots are consumed in place, and
//! effects are returned by value.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};

use herald_shared::envelope::Envelope;
use herald_shared::protocol::{
    close, Ack, AgentMsg, Enroll, Hello, JobId, JobResult, Progress, ServerMsg, Welcome,
    PROTOCOL_MAJOR,
};
use herald_shared::Millis;

use crate::store::{BlockRequest, Pending};

/// How often agents check their local addresses (sent in `Welcome`).
pub const ADDRESS_CHECK_MS: u64 = 5_000;

/// The stream a message arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stream {
    /// The bidirectional stream the agent opens first.
    Control,
    /// A unidirectional stream carrying one result.
    Result,
}

/// Where the conversation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the agent's first message.
    AwaitingHello,
    /// `Hello` accepted; the relay checks the agent is enrolled.
    Admitting,
    /// The agent asked to enroll: that exchange ends the connection.
    Enrolling,
    /// Welcomed: signals, acknowledgements and results flow.
    Open,
}

/// A way the agent broke the protocol; the connection is closed with
/// [`close::PROTOCOL`] and this as the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Violation {
    /// The first message on the control stream was neither `Hello` nor `Enroll`.
    #[error("expected Hello or Enroll, got {0}")]
    NotGreeting(&'static str),
    /// A message the control stream does not carry (a second `Hello`, a `Result`), or
    /// any message while the agent's first one is still being answered.
    #[error("unexpected {0} on the control stream")]
    OnControlStream(&'static str),
    /// A result stream carried something other than a result.
    #[error("unexpected {0} on a result stream")]
    OnResultStream(&'static str),
    /// A message other than the greeting before the agent said `Hello`.
    #[error("{0} before Hello")]
    BeforeHello(&'static str),
    /// A share table that breaks the rules of [`herald_shared::peers::ShareInfo::check`].
    #[error("bad share table: {0}")]
    Shares(String),
}

impl Violation {
    /// The QUIC application close code.
    pub(crate) fn code(&self) -> u32 {
        close::PROTOCOL
    }
}

/// What the relay does about the agent's first message.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Greeting {
    /// Run the enrollment exchange; it ends the connection.
    Enroll(Enroll),
    /// Send `Refused` with this reason and close with [`close::REFUSED`].
    Refuse(String),
    /// Admit the agent if it is enrolled (refuse it otherwise), record the connection
    /// and its addresses, then answer with [`Link::handle_admitted`].
    Admit(Hello),
    /// A side connection: answer this request (and every stream the agent opens after
    /// it) if the agent is enrolled; it is not the agent's link.
    Side(herald_shared::peers::StreamRequest),
    /// Close the connection with [`Violation::code`] and the violation as the reason.
    Close(Violation),
}

/// What the relay does about an agent's message once the link is open.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Effect {
    /// Queue an acknowledgement for the relay-wide batch writer.
    StoreAck {
        /// Job the signal carried.
        job_id: JobId,
        /// The agent's reason, if it refused the job.
        refused: Option<String>,
    },
    /// Mark the job running.
    StoreStarted {
        /// Job id.
        job_id: JobId,
        /// When it started, by the agent's clock.
        at: Millis,
        /// When the report arrived.
        now: Millis,
    },
    /// Keep the job's latest progress.
    StoreProgress {
        /// Job id.
        job_id: JobId,
        /// Where it is.
        progress: Progress,
    },
    /// Check the path first (the report is sent from the new path once the agent has
    /// moved its socket: [`Link::handle_path`]), then record the agent's addresses.
    StoreAddresses {
        /// As reported.
        addresses: Vec<IpAddr>,
        /// When the report arrived.
        now: Millis,
    },
    /// Replace the agent's shares in the directory. A table with a bad share closes the
    /// link (a well-behaved agent checks its own table before reporting it).
    StoreShares {
        /// The whole table.
        shares: Vec<herald_shared::peers::ShareInfo>,
        /// When the report arrived.
        now: Millis,
    },
    /// Store the result (idempotently), then send [`Link::handle_result_stored`].
    StoreResult {
        /// The result.
        result: JobResult,
        /// When it arrived.
        now: Millis,
    },
    /// Verify and store a signed report (a message receipt or a block-list change),
    /// then send `ReportStored` with its `seq`.
    StoreReport {
        /// The agent's outbox sequence number, echoed back.
        seq: u64,
        /// The report as signed.
        report: herald_shared::message::SignedReport,
    },
    /// Close the connection with [`Violation::code`] and the violation as the reason.
    Close(Violation),
}

/// The connection's path moved (QUIC migration, a NAT rebinding): record the address
/// it is now observed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Migrated {
    /// The address recorded before.
    pub(crate) from: SocketAddr,
    /// The address now.
    pub(crate) to: SocketAddr,
}

/// A message the link wants sent, in order.
// Handed straight from `poll_transmit` to the caller, never stored or queued: boxing the
// larger variant would cost an allocation per signal and save nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub(crate) enum Transmit {
    /// The agent's new signed membership.
    Membership(Envelope),
    /// A pending job to signal; the relay renders it (attaches the release's download
    /// URL and mints a ticket) into a `Signal`.
    Signal(Pending),
    /// A console user's block or unblock request for this agent.
    BlockRequest(BlockRequest),
}

/// The protocol state of one agent connection.
#[derive(Debug)]
pub(crate) struct Link {
    phase: Phase,
    /// The membership the agent holds as far as this connection knows (the one in
    /// `Welcome`, or the last one sent since).
    membership: Option<Envelope>,
    /// `membership` changed and is not yet handed out by [`Link::poll_transmit`].
    membership_due: bool,
    /// The latest store snapshot's jobs not yet looked at by [`Link::poll_transmit`].
    due_jobs: std::vec::IntoIter<Pending>,
    /// Jobs signalled on this connection.
    sent: HashSet<JobId>,
    /// Block requests not yet handed out by [`Link::poll_transmit`].
    due_requests: Vec<BlockRequest>,
    /// Block requests sent on this connection.
    requests_sent: HashSet<i64>,
    /// The address the connection was last recorded as coming from.
    observed: Option<SocketAddr>,
}

impl Default for Link {
    fn default() -> Link {
        Link::new()
    }
}

// === impl Link ===

impl Link {
    /// A new connection, waiting for the agent's first message.
    pub(crate) fn new() -> Link {
        Link {
            phase: Phase::AwaitingHello,
            membership: None,
            membership_due: false,
            due_jobs: Vec::new().into_iter(),
            sent: HashSet::new(),
            due_requests: Vec::new(),
            requests_sent: HashSet::new(),
            observed: None,
        }
    }

    /// The agent's first message on the control stream.
    pub(crate) fn handle_greeting(&mut self, msg: AgentMsg) -> Greeting {
        if self.phase != Phase::AwaitingHello {
            // A second greeting.
            return Greeting::Close(Violation::OnControlStream(msg_name(&msg)));
        }
        match msg {
            AgentMsg::Hello(hello) if hello.protocol.0 != PROTOCOL_MAJOR => {
                Greeting::Refuse(version_refusal(hello.protocol.0))
            }
            AgentMsg::Hello(hello) => {
                self.phase = Phase::Admitting;
                Greeting::Admit(hello)
            }
            AgentMsg::Enroll(enroll) => {
                self.phase = Phase::Enrolling;
                Greeting::Enroll(enroll)
            }
            AgentMsg::Request(request) => {
                // Its exchanges are the relay's (`tunnel.rs`); nothing more comes here.
                self.phase = Phase::Enrolling;
                Greeting::Side(request)
            }
            other => Greeting::Close(Violation::NotGreeting(msg_name(&other))),
        }
    }

    /// A later message from the agent, on `stream`.
    pub(crate) fn handle_message(&mut self, stream: Stream, msg: AgentMsg, now: Millis) -> Effect {
        match (stream, self.phase) {
            (Stream::Control, Phase::Open) => control(msg, now),
            (Stream::Result, Phase::Open) => match msg {
                AgentMsg::Result(result) => Effect::StoreResult { result, now },
                other => Effect::Close(Violation::OnResultStream(msg_name(&other))),
            },
            (_, Phase::AwaitingHello) => Effect::Close(Violation::BeforeHello(msg_name(&msg))),
            // The first message is still being answered (or was an enrollment).
            (Stream::Control, Phase::Admitting | Phase::Enrolling) => {
                Effect::Close(Violation::OnControlStream(msg_name(&msg)))
            }
            (Stream::Result, Phase::Admitting | Phase::Enrolling) => {
                Effect::Close(Violation::OnResultStream(msg_name(&msg)))
            }
        }
    }

    /// The relay admitted the agent: `membership` is its current one from the store,
    /// `observed` the address the connection comes from. Returns the `Welcome` to send.
    /// The store is to be read for pending jobs next.
    pub(crate) fn handle_admitted(
        &mut self,
        agent_id: String,
        membership: Option<Envelope>,
        observed: SocketAddr,
        now: Millis,
    ) -> ServerMsg {
        self.phase = Phase::Open;
        self.observed = Some(observed);
        self.membership = membership.clone();
        ServerMsg::Welcome(Welcome {
            server_time: now,
            agent_id,
            membership,
            address_check_ms: ADDRESS_CHECK_MS,
        })
    }

    /// A result from [`Effect::StoreResult`] is committed (or was already): the
    /// acknowledgement to send, so the agent drops it from its outbox.
    pub(crate) fn handle_result_stored(&mut self, job_id: JobId, attempt: u32) -> ServerMsg {
        ServerMsg::ResultStored { job_id, attempt }
    }

    /// The store's view: the agent's current membership and its pending jobs in job
    /// order. What to send comes out of [`Link::poll_transmit`]: the membership first
    /// if it changed, then each job not yet signalled on this connection. A snapshot
    /// replaces whatever an earlier one left unpolled (the newer one is the truth).
    pub(crate) fn handle_snapshot(&mut self, membership: Option<Envelope>, jobs: Vec<Pending>) {
        if membership != self.membership {
            // A membership taken away is not announced: the agent keeps the last one it
            // has until a new one replaces it.
            self.membership_due = membership.is_some();
            self.membership = membership;
        }
        self.due_jobs = jobs.into_iter();
    }

    /// The store's pending block requests for this agent (read with each snapshot):
    /// each goes out once per connection, after the membership and before the jobs.
    pub(crate) fn handle_requests(&mut self, mut requests: Vec<BlockRequest>) {
        // Popped from the end: oldest last in the vector goes first.
        requests.reverse();
        self.due_requests = requests;
    }

    /// A signal handed over directly (a fan-out, with no store read): whether to send
    /// it, that is, whether it was not already signalled on this connection.
    pub(crate) fn handle_pushed(&mut self, job_id: JobId) -> bool {
        self.sent.insert(job_id)
    }

    /// The next message to send, if any.
    pub(crate) fn poll_transmit(&mut self) -> Option<Transmit> {
        if std::mem::take(&mut self.membership_due) {
            if let Some(membership) = &self.membership {
                return Some(Transmit::Membership(membership.clone()));
            }
        }
        while let Some(request) = self.due_requests.pop() {
            if self.requests_sent.insert(request.id) {
                return Some(Transmit::BlockRequest(request));
            }
        }
        for job in self.due_jobs.by_ref() {
            if self.sent.insert(job.job_id) {
                return Some(Transmit::Signal(job));
            }
        }
        // Drained: let the snapshot's buffer go, so idle links hold none.
        self.due_jobs = Vec::new().into_iter();
        None
    }

    /// The address the connection is observed from now (on the path-check timer, and
    /// before an address report is recorded).
    pub(crate) fn handle_path(&mut self, observed: SocketAddr) -> Option<Migrated> {
        // Before admission there is nothing to compare with: the connection's address
        // is recorded when it is admitted.
        let from = self.observed?;
        if from == observed {
            return None;
        }
        self.observed = Some(observed);
        Some(Migrated { from, to: observed })
    }
}

/// A message on the control stream of an open link.
fn control(msg: AgentMsg, now: Millis) -> Effect {
    match msg {
        AgentMsg::Ack { job_id, ack } => Effect::StoreAck {
            job_id,
            refused: match ack {
                Ack::Refused(reason) => Some(reason),
                Ack::Accepted | Ack::Duplicate => None,
            },
        },
        AgentMsg::Started { job_id, at } => Effect::StoreStarted { job_id, at, now },
        AgentMsg::Progress { job_id, progress } => Effect::StoreProgress { job_id, progress },
        AgentMsg::Addresses(addresses) => Effect::StoreAddresses { addresses, now },
        AgentMsg::Report { seq, report } => Effect::StoreReport { seq, report },
        AgentMsg::Shares(shares) => {
            if shares.len() > herald_shared::peers::MAX_SHARES {
                return Effect::Close(Violation::Shares(format!(
                    "{} shares; at most {}",
                    shares.len(),
                    herald_shared::peers::MAX_SHARES
                )));
            }
            match shares.iter().try_for_each(|s| s.check()) {
                Ok(()) => Effect::StoreShares { shares, now },
                Err(reason) => Effect::Close(Violation::Shares(reason)),
            }
        }
        other @ (AgentMsg::Hello(_)
        | AgentMsg::Enroll(_)
        | AgentMsg::Result(_)
        | AgentMsg::Request(_)) => Effect::Close(Violation::OnControlStream(msg_name(&other))),
    }
}

/// The refusal a `Hello` or `Enroll` of another protocol major version gets.
pub(crate) fn version_refusal(major: u16) -> String {
    format!(
        "protocol version {major} is not supported by this server (it speaks {PROTOCOL_MAJOR}); upgrade the agent or server so they match"
    )
}

/// A message kind's name, for violations and logs.
pub(crate) fn msg_name(msg: &AgentMsg) -> &'static str {
    match msg {
        AgentMsg::Hello(_) => "Hello",
        AgentMsg::Enroll(_) => "Enroll",
        AgentMsg::Ack { .. } => "Ack",
        AgentMsg::Started { .. } => "Started",
        AgentMsg::Addresses(_) => "Addresses",
        AgentMsg::Result(_) => "Result",
        AgentMsg::Progress { .. } => "Progress",
        AgentMsg::Report { .. } => "Report",
        AgentMsg::Shares(_) => "Shares",
        AgentMsg::Request(_) => "Request",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use herald_shared::envelope::PublicKey;
    use herald_shared::protocol::{Facts, Status};

    const NOW: Millis = 1_700_000_000_000;

    fn envelope(n: u8) -> Envelope {
        Envelope {
            signer: PublicKey([n; 32]),
            payload: vec![n],
            signature: vec![0; 64],
        }
    }

    fn job(job_id: JobId) -> Pending {
        Pending {
            job_id,
            envelope: envelope(7),
            release: None,
            open_timeout_ms: None,
        }
    }

    fn jobs(ids: &[JobId]) -> Vec<Pending> {
        ids.iter().copied().map(job).collect()
    }

    fn hello(major: u16) -> AgentMsg {
        AgentMsg::Hello(Hello {
            protocol: (major, 0),
            agent_version: "0.1.0".into(),
            facts: Facts::default(),
            addresses: vec![],
        })
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], port))
    }

    fn result(job_id: JobId) -> JobResult {
        JobResult::without_output(job_id, Status::Succeeded, NOW - 10, NOW - 5, None)
    }

    /// A link past `Hello` and `Welcome`, with `membership` as its agent's.
    fn open(membership: Option<Envelope>) -> Link {
        let mut link = Link::new();
        assert!(matches!(
            link.handle_greeting(hello(PROTOCOL_MAJOR)),
            Greeting::Admit(_)
        ));
        link.handle_admitted("agent".into(), membership, addr(4000), NOW);
        link
    }

    /// A [`Transmit`], comparable.
    #[derive(Debug, PartialEq)]
    enum Sent {
        Membership(Envelope),
        Signal(JobId),
        Request(i64),
    }

    /// Everything the link wants sent now, in order.
    fn drain(link: &mut Link) -> Vec<Sent> {
        std::iter::from_fn(|| link.poll_transmit())
            .map(|t| match t {
                Transmit::Membership(envelope) => Sent::Membership(envelope),
                Transmit::Signal(job) => Sent::Signal(job.job_id),
                Transmit::BlockRequest(r) => Sent::Request(r.id),
            })
            .collect()
    }

    /// The job ids of the signals among `sent`.
    fn signalled(sent: &[Sent]) -> Vec<JobId> {
        sent.iter()
            .filter_map(|t| match t {
                Sent::Signal(job_id) => Some(*job_id),
                Sent::Membership(_) | Sent::Request(_) => None,
            })
            .collect()
    }

    fn ack(job_id: JobId, ack: Ack) -> AgentMsg {
        AgentMsg::Ack { job_id, ack }
    }

    fn closed_for(effect: Effect) -> Violation {
        match effect {
            Effect::Close(violation) => violation,
            other => panic!("expected a close, got {other:?}"),
        }
    }

    // === dedupe ===

    #[test]
    fn a_pending_job_already_sent_on_this_connection_is_not_sent_twice() {
        let mut link = open(None);
        link.handle_snapshot(None, jobs(&[1, 2]));
        assert_eq!(signalled(&drain(&mut link)), [1, 2]);

        // Poked again before the agent acknowledged: the store still lists 1 and 2.
        link.handle_snapshot(None, jobs(&[1, 2, 3]));
        assert_eq!(signalled(&drain(&mut link)), [3]);

        // A fan-out hands over a job the store read already sent, and a new one.
        assert!(!link.handle_pushed(3));
        assert!(link.handle_pushed(4));
        // ...which the store lists on the next poke: not sent again either.
        link.handle_snapshot(None, jobs(&[4]));
        assert!(drain(&mut link).is_empty());
    }

    #[test]
    fn after_reconnect_unacknowledged_jobs_are_sent_again() {
        let mut first = open(None);
        first.handle_snapshot(None, jobs(&[1, 2]));
        assert!(first.handle_pushed(3));
        assert_eq!(signalled(&drain(&mut first)), [1, 2]);

        // The connection drops before the acks are stored; the agent comes back.
        let mut second = open(None);
        second.handle_snapshot(None, jobs(&[1, 2]));
        assert_eq!(signalled(&drain(&mut second)), [1, 2]);
        assert!(second.handle_pushed(3));
    }

    #[test]
    fn the_same_job_twice_in_one_snapshot_is_sent_once() {
        let mut link = open(None);
        link.handle_snapshot(None, jobs(&[5, 5, 6]));
        assert_eq!(signalled(&drain(&mut link)), [5, 6]);
    }

    #[test]
    fn a_newer_snapshot_replaces_an_unpolled_one() {
        let mut link = open(None);
        link.handle_snapshot(None, jobs(&[1, 2, 3]));
        assert!(matches!(link.poll_transmit(), Some(Transmit::Signal(j)) if j.job_id == 1));
        // Job 2 was acknowledged meanwhile (say, from another connection's journal).
        link.handle_snapshot(None, jobs(&[3, 4]));
        assert_eq!(signalled(&drain(&mut link)), [3, 4]);
    }

    // === membership ===

    #[test]
    fn membership_goes_out_before_the_jobs_it_admits() {
        let mut link = open(Some(envelope(1)));
        link.handle_snapshot(Some(envelope(2)), jobs(&[10, 11]));
        let sent = drain(&mut link);
        assert_eq!(sent.len(), 3);
        assert_eq!(sent[0], Sent::Membership(envelope(2)));
        assert_eq!(signalled(&sent[1..]), [10, 11]);
    }

    #[test]
    fn membership_in_the_welcome_is_not_sent_again() {
        let mut link = Link::new();
        link.handle_greeting(hello(PROTOCOL_MAJOR));
        let welcome = link.handle_admitted("agent-1".into(), Some(envelope(1)), addr(1), NOW);
        assert_eq!(
            welcome,
            ServerMsg::Welcome(Welcome {
                server_time: NOW,
                agent_id: "agent-1".into(),
                membership: Some(envelope(1)),
                address_check_ms: ADDRESS_CHECK_MS,
            })
        );
        link.handle_snapshot(Some(envelope(1)), jobs(&[1]));
        assert_eq!(drain(&mut link), [Sent::Signal(1)]);
    }

    #[test]
    fn a_changed_membership_is_sent_once() {
        let mut link = open(None);
        link.handle_snapshot(Some(envelope(3)), vec![]);
        assert_eq!(drain(&mut link), [Sent::Membership(envelope(3))]);
        link.handle_snapshot(Some(envelope(3)), vec![]);
        assert!(drain(&mut link).is_empty());
    }

    #[test]
    fn a_membership_taken_away_is_not_announced_and_a_new_one_is() {
        let mut link = open(Some(envelope(1)));
        link.handle_snapshot(None, jobs(&[1]));
        assert_eq!(signalled(&drain(&mut link)), [1]);
        assert!(link.poll_transmit().is_none());
        // Given back: the agent hears of it again.
        link.handle_snapshot(Some(envelope(1)), vec![]);
        assert_eq!(drain(&mut link), [Sent::Membership(envelope(1))]);
    }

    // === acknowledgements ===

    #[test]
    fn acks_become_store_records_with_the_refusal_reason() {
        let mut link = open(None);
        link.handle_snapshot(None, jobs(&[1, 2, 3]));
        drain(&mut link);
        let records: Vec<Effect> = [
            ack(1, Ack::Accepted),
            ack(2, Ack::Duplicate),
            ack(3, Ack::Refused("not addressed to this agent".into())),
        ]
        .into_iter()
        .map(|msg| link.handle_message(Stream::Control, msg, NOW))
        .collect();
        assert_eq!(
            records,
            [
                Effect::StoreAck {
                    job_id: 1,
                    refused: None
                },
                Effect::StoreAck {
                    job_id: 2,
                    refused: None
                },
                Effect::StoreAck {
                    job_id: 3,
                    refused: Some("not addressed to this agent".into())
                },
            ]
        );
    }

    #[test]
    fn acks_for_jobs_never_sent_or_acked_twice_pass_on_without_harm() {
        let mut link = open(None);
        // Never sent on this connection (a signal from before a reconnect), then acked
        // twice: each goes to the store, which moves a job only from a state the ack
        // applies to.
        for _ in 0..2 {
            assert_eq!(
                link.handle_message(Stream::Control, ack(99, Ack::Accepted), NOW),
                Effect::StoreAck {
                    job_id: 99,
                    refused: None
                }
            );
        }
        // The stray acks changed nothing about what this connection sends.
        link.handle_snapshot(None, jobs(&[99]));
        assert_eq!(signalled(&drain(&mut link)), [99]);
        assert_eq!(
            link.handle_message(Stream::Control, ack(99, Ack::Duplicate), NOW),
            Effect::StoreAck {
                job_id: 99,
                refused: None
            }
        );
    }

    // === results, progress, addresses ===

    #[test]
    fn a_result_is_stored_then_acknowledged() {
        let mut link = open(None);
        let effect = link.handle_message(Stream::Result, AgentMsg::Result(result(7)), NOW);
        assert_eq!(
            effect,
            Effect::StoreResult {
                result: result(7),
                now: NOW
            }
        );
        assert_eq!(
            link.handle_result_stored(7, 1),
            ServerMsg::ResultStored {
                job_id: 7,
                attempt: 1
            }
        );
    }

    #[test]
    fn a_duplicate_result_is_acknowledged_again() {
        let mut link = open(None);
        for _ in 0..2 {
            // The store keeps results idempotently: the second copy changes nothing, and
            // the agent still needs the acknowledgement to drop it from its outbox.
            let effect = link.handle_message(Stream::Result, AgentMsg::Result(result(7)), NOW);
            assert!(matches!(effect, Effect::StoreResult { ref result, .. } if result.job_id == 7));
            assert_eq!(
                link.handle_result_stored(7, 1),
                ServerMsg::ResultStored {
                    job_id: 7,
                    attempt: 1
                }
            );
        }
    }

    #[test]
    fn started_progress_and_addresses_are_stored_with_the_time_they_arrived() {
        let mut link = open(None);
        assert_eq!(
            link.handle_message(
                Stream::Control,
                AgentMsg::Started {
                    job_id: 4,
                    at: NOW - 1
                },
                NOW
            ),
            Effect::StoreStarted {
                job_id: 4,
                at: NOW - 1,
                now: NOW
            }
        );
        assert_eq!(
            link.handle_message(
                Stream::Control,
                AgentMsg::Progress {
                    job_id: 4,
                    progress: Progress::Installing
                },
                NOW
            ),
            Effect::StoreProgress {
                job_id: 4,
                progress: Progress::Installing
            }
        );
        let addresses = vec![IpAddr::from([10, 0, 0, 2])];
        assert_eq!(
            link.handle_message(Stream::Control, AgentMsg::Addresses(addresses.clone()), NOW),
            Effect::StoreAddresses {
                addresses,
                now: NOW
            }
        );
    }

    #[test]
    fn a_migrated_path_is_recorded_once() {
        let mut link = Link::new();
        // Nothing to compare with before admission.
        assert_eq!(link.handle_path(addr(1)), None);
        link.handle_greeting(hello(PROTOCOL_MAJOR));
        link.handle_admitted("agent".into(), None, addr(1), NOW);
        assert_eq!(link.handle_path(addr(1)), None);
        assert_eq!(
            link.handle_path(addr(2)),
            Some(Migrated {
                from: addr(1),
                to: addr(2)
            })
        );
        assert_eq!(link.handle_path(addr(2)), None);
    }

    // === what is allowed when ===

    #[test]
    fn a_hello_of_another_major_version_is_refused_with_a_clear_message() {
        let mut link = Link::new();
        let Greeting::Refuse(reason) = link.handle_greeting(hello(PROTOCOL_MAJOR + 1)) else {
            panic!("expected a refusal");
        };
        assert!(
            reason.contains("protocol version 2 is not supported"),
            "{reason}"
        );
        assert!(reason.contains("upgrade the agent or server"), "{reason}");
    }

    #[test]
    fn anything_but_hello_or_enroll_first_closes_with_a_protocol_error() {
        for msg in [
            ack(1, Ack::Accepted),
            AgentMsg::Addresses(vec![]),
            AgentMsg::Result(result(1)),
        ] {
            let mut link = Link::new();
            let Greeting::Close(violation) = link.handle_greeting(msg) else {
                panic!("expected a close");
            };
            assert_eq!(violation.code(), close::PROTOCOL);
            assert!(violation
                .to_string()
                .starts_with("expected Hello or Enroll, got "));
        }
    }

    #[test]
    fn messages_before_hello_close_with_a_protocol_error() {
        let mut link = Link::new();
        let violation =
            closed_for(link.handle_message(Stream::Control, ack(1, Ack::Accepted), NOW));
        assert_eq!(violation, Violation::BeforeHello("Ack"));
        assert_eq!(violation.code(), close::PROTOCOL);
        let violation =
            closed_for(link.handle_message(Stream::Result, AgentMsg::Result(result(1)), NOW));
        assert_eq!(violation, Violation::BeforeHello("Result"));
    }

    #[test]
    fn a_second_hello_closes_with_a_protocol_error() {
        let mut link = open(None);
        let violation =
            closed_for(link.handle_message(Stream::Control, hello(PROTOCOL_MAJOR), NOW));
        assert_eq!(violation.code(), close::PROTOCOL);
        assert_eq!(
            violation.to_string(),
            "unexpected Hello on the control stream"
        );
        // Fed as a greeting again, it is the same violation.
        let Greeting::Close(again) = link.handle_greeting(hello(PROTOCOL_MAJOR)) else {
            panic!("expected a close");
        };
        assert_eq!(again, violation);
    }

    #[test]
    fn messages_on_the_wrong_stream_close_with_a_protocol_error() {
        let mut link = open(None);
        let violation =
            closed_for(link.handle_message(Stream::Control, AgentMsg::Result(result(1)), NOW));
        assert_eq!(
            violation.to_string(),
            "unexpected Result on the control stream"
        );
        let violation = closed_for(link.handle_message(Stream::Result, ack(1, Ack::Accepted), NOW));
        assert_eq!(violation.to_string(), "unexpected Ack on a result stream");
        assert_eq!(violation.code(), close::PROTOCOL);
        // An enrollment on an open link is never accepted.
        let enroll = AgentMsg::Enroll(Enroll {
            protocol: (PROTOCOL_MAJOR, 0),
            secret: vec![1; 32],
            name: "host".into(),
            facts: Facts::default(),
        });
        let violation = closed_for(link.handle_message(Stream::Control, enroll, NOW));
        assert_eq!(
            violation.to_string(),
            "unexpected Enroll on the control stream"
        );
    }

    #[test]
    fn an_enrollment_is_its_own_exchange() {
        let mut link = Link::new();
        let enroll = Enroll {
            protocol: (PROTOCOL_MAJOR, 0),
            secret: vec![1; 32],
            name: "host".into(),
            facts: Facts::default(),
        };
        assert_eq!(
            link.handle_greeting(AgentMsg::Enroll(enroll.clone())),
            Greeting::Enroll(enroll)
        );
        let violation =
            closed_for(link.handle_message(Stream::Control, hello(PROTOCOL_MAJOR), NOW));
        assert_eq!(violation.code(), close::PROTOCOL);
    }

    #[test]
    fn a_request_first_makes_a_side_connection_and_never_a_link() {
        use herald_shared::peers::StreamRequest;
        let request = StreamRequest::Peers { query: None };
        let mut link = Link::new();
        assert_eq!(
            link.handle_greeting(AgentMsg::Request(request.clone())),
            Greeting::Side(request.clone())
        );
        // Nothing of a link's conversation follows on it.
        let violation =
            closed_for(link.handle_message(Stream::Control, hello(PROTOCOL_MAJOR), NOW));
        assert_eq!(violation.code(), close::PROTOCOL);
        // And a request on an open link's control stream is a violation: requests go on
        // streams of their own.
        let mut open = open(None);
        let violation =
            closed_for(open.handle_message(Stream::Control, AgentMsg::Request(request), NOW));
        assert_eq!(
            violation.to_string(),
            "unexpected Request on the control stream"
        );
    }

    #[test]
    fn messages_while_the_hello_is_answered_close_with_a_protocol_error() {
        let mut link = Link::new();
        assert!(matches!(
            link.handle_greeting(hello(PROTOCOL_MAJOR)),
            Greeting::Admit(_)
        ));
        let violation =
            closed_for(link.handle_message(Stream::Control, ack(1, Ack::Accepted), NOW));
        assert_eq!(violation.code(), close::PROTOCOL);
    }

    #[test]
    fn block_requests_go_once_per_connection_after_the_membership_before_jobs() {
        let request = |id: i64| BlockRequest {
            id,
            sender: "card".into(),
            blocked: true,
        };
        let mut link = Link::new();
        link.handle_snapshot(Some(envelope(1)), jobs(&[10]));
        link.handle_requests(vec![request(1), request(2)]);
        assert_eq!(
            drain(&mut link),
            vec![
                Sent::Membership(envelope(1)),
                Sent::Request(1),
                Sent::Request(2),
                Sent::Signal(10)
            ]
        );
        // The next snapshot still lists them (unanswered): not sent again.
        link.handle_snapshot(Some(envelope(1)), jobs(&[10]));
        link.handle_requests(vec![request(1), request(2), request(3)]);
        assert_eq!(drain(&mut link), vec![Sent::Request(3)]);
    }
}
