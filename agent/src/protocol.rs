//! The agent's half of the protocol, as a state machine without I/O.
//!
//! [`Machine::handle`] takes one [`Input`] — something the server said, something the
//! agent's own jobs report, a timer that fired — with the time passed in, and returns
//! the [`Effect`]s to carry out, in order. It opens no socket, starts no task and reads
//! no clock; the driver in [`crate::link`] moves bytes, timers and effects, and applies
//! each input's effects before it feeds the next input. The machine lives as long as
//! the agent: a connection is [`Input::Start`] .. [`Input::Disconnected`], and what
//! outlives a connection (the groups, the results the server has not acknowledged) is
//! kept here across reconnections.
//!
//! # Rules it keeps
//!
//! - The conversation: `Hello` first, then exactly one `Welcome` (or `Refused`), naming
//!   this agent; anything else, or nothing within [`WELCOME_TIMEOUT`], closes the
//!   connection with a [`Fault`]. A peer's misbehaviour never panics.
//! - Signals (only after `Welcome`): deduplicated by job id against the journal (a
//!   resent signal is acknowledged `Duplicate`, or refused again with the stored
//!   reason, and never runs twice); verified against the pinned keys, the local policy
//!   and the groups *as they are when the signal arrives* — a membership that arrived
//!   before it on the control stream has been applied. An accepted job is persisted,
//!   then acknowledged, then run ([`Effect::Persist`], [`Effect::Send`],
//!   [`Effect::Run`]); a refusal is persisted before it is acknowledged. Every signal
//!   gets its own acknowledgement at once; acks are not batched.
//! - Results: every result in the outbox is sent once per connection (after
//!   `Welcome`, and as it is ready), and again on every later connection until the
//!   server acknowledges it with `ResultStored`. Acks may come in any order and more
//!   than once; each one marks the result stored (an idempotent delete).
//! - Push messages (signals whose envelope is a `Statement::Message`, signed by a
//!   sender key the operator granted): checked with [`herald_shared::message::open`]
//!   and [`Opened::check`] against the replay cache and the block list. A kept message
//!   is persisted with its `stored` receipt ([`Effect::KeepMessage`]), then acknowledged
//!   `Accepted`, then shown ([`Effect::ShowNotice`]); a refused or expired one is
//!   persisted with its receipt ([`Effect::RefuseMessage`]), then acknowledged
//!   `Refused`; a message id seen before is acknowledged `Duplicate`.
//! - Reports (signed receipts and block changes): like results, every report in the
//!   store's outbox is sent once per connection after `Welcome` and again on later
//!   connections until `ReportStored`. The store is polled every [`REPORT_POLL`] for
//!   reports written outside the machine (the CLI's `block`).
//! - Addresses: sampled when [`Timer::AddressCheck`] fires; a change is reported and
//!   the endpoint rebound, so the connection migrates.
//!
//! # Why the journal is read through [`Ledger`]
//!
//! Deduplication and the replay cache must survive restarts, so their truth is the
//! journal; keeping a copy here would give two truths. The machine asks the journal
//! through the small [`Ledger`] trait (tests use an in-memory one) and writes to it only
//! through effects, so that "persist, then acknowledge" is an order the effects list
//! shows and the tests check.

use std::collections::{BTreeSet, HashSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use herald_shared::envelope::{
    check_browser_url, Action, Envelope, History, InstallSpec, PublicKey, Refusal, Statement,
};
use herald_shared::message::{self, Message, Opened, ReceiptState, Verdict};
use herald_shared::protocol::{
    Ack, AgentMsg, Bundle, Facts, Hello, JobId, ServerMsg, Signal, Welcome, PROTOCOL_MAJOR,
    PROTOCOL_MINOR,
};
use herald_shared::Millis;

use crate::journal::{JournalError, Known};
use crate::notify::Notice;
use crate::state::Policy;

/// How long to wait for the server's answer to `Hello`.
pub const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// Bounds on the address-check period the server may ask for in `Welcome`.
const ADDRESS_CHECK_MS: std::ops::RangeInclusive<u64> = 1_000..=60_000;
/// How often the store's report outbox is read for reports written outside the machine
/// (a block by the CLI); reading a list of integers is cheap.
pub const REPORT_POLL: Duration = Duration::from_secs(2);

/// The machine's view of time: a monotonic instant for timers and the agent's guarded
/// wall clock (milliseconds) for validity checks.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    /// For timers.
    pub instant: Instant,
    /// For order validity; the agent's clock, guarded against stepping back.
    pub wall: Millis,
}

/// What the machine is told.
#[derive(Debug)]
pub enum Input {
    /// A connection is up: say hello. `addresses` are the local ones now.
    Start {
        /// Local interface addresses.
        addresses: Vec<IpAddr>,
        /// Host facts for `Hello`.
        facts: Facts,
    },
    /// A message arrived on the control stream.
    Received(ServerMsg),
    /// The server finished the control stream.
    ControlClosed,
    /// The local addresses, sampled after [`Effect::SampleAddresses`].
    Addresses(Vec<IpAddr>),
    /// A job's result is in the outbox (stored by the journal).
    ResultReady(JobId),
    /// A running job's report (`Started`, `Progress`) for the server; dropped when no
    /// connection is established, as the server learns the outcome from the result.
    Report(AgentMsg),
    /// These reports are in the store's outbox (written by a kept or refused message, a
    /// notice, the CLI, or read after [`Effect::PollReports`]); ones already known are
    /// ignored.
    ReportsReady(Vec<u64>),
    /// A timer armed with [`Effect::ArmTimer`] is due.
    TimerFired(Timer),
    /// The connection is gone (for whatever reason).
    Disconnected,
}

/// The machine's timers; arming one again replaces its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Timer {
    /// The server must answer `Hello` by then.
    Welcome,
    /// Time to look at the local addresses again.
    AddressCheck,
    /// Time to read the store's report outbox again.
    Reports,
}

/// What the driver must do, in the order given.
#[derive(Debug)]
pub enum Effect {
    /// Send a message on the control stream.
    Send(AgentMsg),
    /// Send the outbox result of this job on its own stream (skip it if the journal no
    /// longer has it: acknowledged meanwhile).
    SendResult(JobId),
    /// Persist an accepted job (with its bundle and ticket). Must succeed before the
    /// effects after it: if it fails, the connection ends and nothing is acknowledged.
    Persist(Acceptance),
    /// Persist a refusal, so that a redelivery gets the same answer.
    PersistRefusal {
        /// Job.
        job_id: JobId,
        /// Its order's id (hex), or `-` when the envelope did not open.
        order_id: String,
        /// Why, as told to the server.
        reason: String,
        /// When (guarded wall clock).
        at: Millis,
    },
    /// Run an accepted (persisted) job.
    Run(Job),
    /// Keep a message: journal row, replay record, inbox row, sender count and signed
    /// `stored` receipt, in one transaction. Must succeed before the effects after it;
    /// the driver feeds the receipt's seq back as [`Input::ReportsReady`].
    KeepMessage(Arrival),
    /// Persist a message's refusal with its signed `refused` or `expired` receipt, in
    /// one transaction, before the refusal is acknowledged; the receipt's seq comes back
    /// as [`Input::ReportsReady`].
    RefuseMessage(Rejection),
    /// Show a kept message's notification (unless it is advertising held by quiet
    /// hours; the driver knows the local time).
    ShowNotice(Notice),
    /// Send this report of the store's outbox as `AgentMsg::Report` (skip it if the
    /// store no longer has it).
    SendReport(u64),
    /// The server stored this report: delete it from the store's outbox.
    DeleteReport(u64),
    /// Read the seqs in the store's report outbox and feed them back as
    /// [`Input::ReportsReady`].
    PollReports,
    /// A console user's block or unblock request, relayed by the server: the store
    /// decides by its own rule (`Inbox::console_request`) and puts its signed answer in
    /// the report outbox; the seq comes back as [`Input::ReportsReady`].
    ConsoleBlock {
        /// Sender name.
        sender: String,
        /// Block (true) or unblock (false).
        blocked: bool,
        /// When (guarded wall clock).
        at: Millis,
    },
    /// Store this verified membership (it is now the agent's).
    StoreMembership(Envelope),
    /// The server stored this result: drop it from the outbox.
    MarkAcknowledged(JobId),
    /// Welcomed: record the connection (status file) and report a pending self-update.
    Connected {
        /// Local addresses.
        addresses: Vec<IpAddr>,
    },
    /// The local addresses changed: record them (the report is an [`Effect::Send`]).
    AddressesChanged {
        /// The new addresses.
        addresses: Vec<IpAddr>,
    },
    /// Rebind the endpoint to a new socket so the connection migrates.
    Rebind,
    /// Sample the local addresses and feed them back as [`Input::Addresses`].
    SampleAddresses,
    /// Fire `Timer` at that instant.
    ArmTimer(Timer, Instant),
    /// End the connection for this reason.
    Close(Fault),
}

/// Why the machine ends a connection.
#[derive(Debug, thiserror::Error)]
pub enum Fault {
    /// The server refused us.
    #[error("server refused: {0}")]
    Refused(String),
    /// The server broke the protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The journal could not answer.
    #[error(transparent)]
    Journal(#[from] JournalError),
}

/// An accepted job, as it is persisted.
#[derive(Debug, Clone)]
pub struct Acceptance {
    /// Job.
    pub job_id: JobId,
    /// Its order's id (hex), for the replay cache.
    pub order_id: String,
    /// The signed order.
    pub envelope: Envelope,
    /// Until when the order could be valid (replay-cache retention).
    pub keep_until: Millis,
    /// Install orders: the release.
    pub bundle: Option<Bundle>,
    /// Browser services: the server's one-time ticket.
    pub ticket: Option<String>,
    /// When (guarded wall clock).
    pub at: Millis,
}

/// A message that passed every check, as it is kept.
#[derive(Debug, Clone)]
pub struct Arrival {
    /// The job that delivered it.
    pub job_id: JobId,
    /// The message.
    pub message: Message,
    /// Its sender's display name, from the operator's grant.
    pub display_name: String,
    /// [`message::message_hash`] of its envelope (what receipts name).
    pub hash: [u8; 32],
    /// When it arrived (guarded wall clock).
    pub at: Millis,
}

/// A message that is not kept, as its refusal is persisted.
#[derive(Debug, Clone)]
pub struct Rejection {
    /// The job that delivered it.
    pub job_id: JobId,
    /// The message id it claims (read before the signatures were checked when they
    /// fail: the receipt says which delivery was refused).
    pub message_id: [u8; 16],
    /// [`message::message_hash`] of its envelope.
    pub hash: [u8; 32],
    /// The receipt's state: `Refused(reason)` or `Expired`.
    pub state: ReceiptState,
    /// The reason told to the server in the acknowledgement.
    pub reason: String,
    /// When (guarded wall clock).
    pub at: Millis,
}

/// A job to run.
#[derive(Debug, Clone)]
pub struct Job {
    /// Job.
    pub job_id: JobId,
    /// What to do.
    pub action: Action,
    /// Install orders: the release.
    pub bundle: Option<Bundle>,
    /// Browser services: the server's one-time ticket.
    pub ticket: Option<String>,
}

/// What the machine asks the agent's store while it decides.
pub trait Ledger {
    /// What the journal knows about a job id.
    fn known(&self, job_id: JobId) -> Result<Option<Known>, JournalError>;
    /// The replay cache's entry for an order id.
    fn history(&self, order_id: &str) -> History;
    /// Checks an install order's release against what this agent has seen and has
    /// installed (and raises the highest version seen, which must hold even if the job
    /// then fails).
    fn vet_release(
        &self,
        spec: &InstallSpec,
        bundle: Option<&Bundle>,
        now: Millis,
    ) -> Result<(), Refusal>;
    /// Whether a message id is in the replay cache (kept before).
    fn message_seen(&self, message_id: &[u8; 16]) -> Result<bool, JournalError>;
    /// Whether the person blocked this sender.
    fn blocked(&self, sender: &str) -> Result<bool, JournalError>;
}

impl<L: Ledger + ?Sized> Ledger for std::sync::Arc<L> {
    fn message_seen(&self, message_id: &[u8; 16]) -> Result<bool, JournalError> {
        (**self).message_seen(message_id)
    }
    fn blocked(&self, sender: &str) -> Result<bool, JournalError> {
        (**self).blocked(sender)
    }
    fn known(&self, job_id: JobId) -> Result<Option<Known>, JournalError> {
        (**self).known(job_id)
    }
    fn history(&self, order_id: &str) -> History {
        (**self).history(order_id)
    }
    fn vet_release(
        &self,
        spec: &InstallSpec,
        bundle: Option<&Bundle>,
        now: Millis,
    ) -> Result<(), Refusal> {
        (**self).vet_release(spec, bundle, now)
    }
}

/// What the machine is built with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This agent's id.
    pub agent_id: String,
    /// The pinned operator keys.
    pub keys: Vec<PublicKey>,
    /// Local policy.
    pub policy: Policy,
    /// Whether the agent runs as root (needed for `run_as`).
    pub is_root: bool,
    /// The groups the enrollment token granted (until a membership says otherwise).
    pub token_groups: Vec<String>,
    /// The agent's software version, for `Hello`.
    pub agent_version: String,
}

/// Where the current connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No connection.
    Idle,
    /// `Hello` sent.
    AwaitingWelcome,
    /// `Welcome` received.
    Established,
    /// A [`Fault`] ended it; waiting for [`Input::Disconnected`].
    Closed,
}

/// The agent's protocol state.
pub struct Machine<L> {
    settings: Settings,
    ledger: L,
    phase: Phase,
    groups: Vec<String>,
    membership_issued_at: Option<Millis>,
    /// Results not yet acknowledged (mirrors the journal's outbox).
    outbox: BTreeSet<JobId>,
    /// Results sent on this connection.
    sent: HashSet<JobId>,
    /// Reports not yet stored by the server (mirrors the store's report outbox).
    reports: BTreeSet<u64>,
    /// Reports sent on this connection.
    reports_sent: HashSet<u64>,
    addresses: Vec<IpAddr>,
    address_check: Duration,
}

// === impl Machine ===

impl<L: Ledger> Machine<L> {
    /// A machine with no connection. `membership` is the stored one (applied if it
    /// still verifies), `outbox` the results waiting for the server.
    pub fn new(
        settings: Settings,
        membership: Option<Envelope>,
        outbox: impl IntoIterator<Item = JobId>,
        ledger: L,
    ) -> Machine<L> {
        let mut machine = Machine {
            groups: settings.token_groups.clone(),
            settings,
            ledger,
            phase: Phase::Idle,
            membership_issued_at: None,
            outbox: outbox.into_iter().collect(),
            sent: HashSet::new(),
            reports: BTreeSet::new(),
            reports_sent: HashSet::new(),
            addresses: Vec::new(),
            address_check: Duration::from_millis(*ADDRESS_CHECK_MS.end()),
        };
        if let Some(envelope) = membership {
            // Already stored: the store effect is not needed.
            let _ = machine.membership(envelope);
        }
        machine
    }

    /// Adds the reports waiting in the store at startup (sent after `Welcome`).
    pub fn with_reports(mut self, seqs: impl IntoIterator<Item = u64>) -> Machine<L> {
        self.reports.extend(seqs);
        self
    }

    /// The reports waiting for the server's acknowledgement, oldest first.
    pub fn reports(&self) -> impl Iterator<Item = u64> + '_ {
        self.reports.iter().copied()
    }

    /// The store the machine consults.
    pub fn ledger(&self) -> &L {
        &self.ledger
    }

    /// The groups audience checks use now.
    pub fn groups(&self) -> &[String] {
        &self.groups
    }

    /// The results waiting for the server's acknowledgement, oldest first.
    pub fn outbox(&self) -> impl Iterator<Item = JobId> + '_ {
        self.outbox.iter().copied()
    }

    /// Whether the server has welcomed us on the current connection.
    pub fn is_established(&self) -> bool {
        self.phase == Phase::Established
    }

    /// Handles one input; returns what to do, in order.
    pub fn handle(&mut self, input: Input, now: Now) -> Vec<Effect> {
        match input {
            Input::Start { addresses, facts } => self.start(addresses, facts, now),
            Input::Received(msg) => self.received(msg, now),
            Input::ControlClosed => match self.phase {
                Phase::AwaitingWelcome => self.close("server closed the stream"),
                Phase::Established => self.close("server closed the control stream"),
                Phase::Idle | Phase::Closed => Vec::new(),
            },
            Input::Addresses(addresses) => self.addresses(addresses),
            Input::ResultReady(job_id) => {
                self.outbox.insert(job_id);
                if self.is_established() && self.sent.insert(job_id) {
                    vec![Effect::SendResult(job_id)]
                } else {
                    Vec::new()
                }
            }
            Input::ReportsReady(seqs) => {
                self.reports.extend(seqs);
                self.unsent_reports()
            }
            Input::Report(msg) if self.is_established() => vec![Effect::Send(msg)],
            Input::Report(_) => Vec::new(),
            Input::TimerFired(Timer::Welcome) if self.phase == Phase::AwaitingWelcome => {
                self.close("no answer to Hello")
            }
            Input::TimerFired(Timer::AddressCheck) if self.is_established() => vec![
                Effect::SampleAddresses,
                Effect::ArmTimer(Timer::AddressCheck, now.instant + self.address_check),
            ],
            Input::TimerFired(Timer::Reports) if self.is_established() => vec![
                Effect::PollReports,
                Effect::ArmTimer(Timer::Reports, now.instant + REPORT_POLL),
            ],
            // A timer of an earlier phase or connection.
            Input::TimerFired(_) => Vec::new(),
            Input::Disconnected => {
                self.phase = Phase::Idle;
                self.sent.clear();
                self.reports_sent.clear();
                Vec::new()
            }
        }
    }

    fn start(&mut self, addresses: Vec<IpAddr>, facts: Facts, now: Now) -> Vec<Effect> {
        // A start without the previous connection's end: that one is gone.
        self.sent.clear();
        self.reports_sent.clear();
        self.phase = Phase::AwaitingWelcome;
        self.addresses = addresses.clone();
        vec![
            Effect::Send(AgentMsg::Hello(Hello {
                protocol: (PROTOCOL_MAJOR, PROTOCOL_MINOR),
                agent_version: self.settings.agent_version.clone(),
                facts,
                addresses,
            })),
            Effect::ArmTimer(Timer::Welcome, now.instant + WELCOME_TIMEOUT),
        ]
    }

    fn received(&mut self, msg: ServerMsg, now: Now) -> Vec<Effect> {
        match (self.phase, msg) {
            (Phase::Closed, _) => Vec::new(),
            (_, ServerMsg::Refused(reason)) => self.fail(Fault::Refused(reason)),
            (Phase::AwaitingWelcome, ServerMsg::Welcome(welcome)) => self.welcome(welcome, now),
            (Phase::AwaitingWelcome, other) => {
                self.close(&format!("expected Welcome, got {other:?}"))
            }
            (Phase::Established, ServerMsg::Signal(signal)) => self.signal(signal, now),
            (Phase::Established, ServerMsg::ResultStored { job_id, .. }) => {
                debug!(job_id, "result stored by server");
                // Out of order or repeated acks are fine: each is an idempotent delete.
                self.outbox.remove(&job_id);
                vec![Effect::MarkAcknowledged(job_id)]
            }
            (Phase::Established, ServerMsg::ReportStored { seq }) => {
                debug!(seq, "report stored by server");
                self.reports.remove(&seq);
                vec![Effect::DeleteReport(seq)]
            }
            (Phase::Established, ServerMsg::Membership(envelope)) => self.membership(envelope),
            (
                Phase::Established,
                ServerMsg::BlockRequest {
                    id,
                    sender,
                    blocked,
                },
            ) => {
                info!(id, %sender, blocked, "block request from the console");
                vec![Effect::ConsoleBlock {
                    sender,
                    blocked,
                    at: now.wall,
                }]
            }
            (Phase::Established, other) => self.close(&format!("unexpected message {other:?}")),
            (Phase::Idle, other) => self.close(&format!("{other:?} without a connection")),
        }
    }

    fn welcome(&mut self, welcome: Welcome, now: Now) -> Vec<Effect> {
        if welcome.agent_id != self.settings.agent_id {
            return self.close(&format!(
                "server calls us {} but our key says {}",
                welcome.agent_id, self.settings.agent_id
            ));
        }
        let mut effects = match welcome.membership {
            Some(envelope) => self.membership(envelope),
            None => Vec::new(),
        };
        self.phase = Phase::Established;
        self.address_check = Duration::from_millis(
            welcome
                .address_check_ms
                .clamp(*ADDRESS_CHECK_MS.start(), *ADDRESS_CHECK_MS.end()),
        );
        effects.push(Effect::Connected {
            addresses: self.addresses.clone(),
        });
        // The first check at once, then every period (as an interval would).
        effects.push(Effect::ArmTimer(Timer::AddressCheck, now.instant));
        for &job_id in &self.outbox {
            if self.sent.insert(job_id) {
                effects.push(Effect::SendResult(job_id));
            }
        }
        effects.extend(self.unsent_reports());
        effects.push(Effect::ArmTimer(Timer::Reports, now.instant + REPORT_POLL));
        effects
    }

    /// The known reports not yet sent on this connection, if it is established.
    fn unsent_reports(&mut self) -> Vec<Effect> {
        if !self.is_established() {
            return Vec::new();
        }
        let sent = &mut self.reports_sent;
        self.reports
            .iter()
            .filter(|seq| sent.insert(**seq))
            .map(|&seq| Effect::SendReport(seq))
            .collect()
    }

    /// Applies a signed membership if it verifies, names us and is not older than ours.
    fn membership(&mut self, envelope: Envelope) -> Vec<Effect> {
        let Ok(Statement::Membership(membership)) = envelope.open(&self.settings.keys) else {
            warn!("ignoring a membership that does not verify");
            return Vec::new();
        };
        if membership.agent_id != self.settings.agent_id {
            warn!("ignoring a membership for another agent");
            return Vec::new();
        }
        if self
            .membership_issued_at
            .is_some_and(|at| at > membership.issued_at)
        {
            return Vec::new();
        }
        info!(groups = ?membership.groups, "groups updated");
        self.membership_issued_at = Some(membership.issued_at);
        self.groups = membership.groups;
        vec![Effect::StoreMembership(envelope)]
    }

    /// Deduplicate, verify, then persist, acknowledge and run (or persist the refusal
    /// and acknowledge it).
    fn signal(&mut self, signal: Signal, now: Now) -> Vec<Effect> {
        let Signal {
            job_id,
            envelope,
            bundle,
            ticket,
        } = signal;
        match self.ledger.known(job_id) {
            Err(e) => return self.fail(Fault::Journal(e)),
            Ok(Some(Known::Refused(reason))) => return vec![ack(job_id, Ack::Refused(reason))],
            Ok(Some(Known::Accepted)) => return vec![ack(job_id, Ack::Duplicate)],
            Ok(None) => {}
        }
        if let Ok(Statement::Message(peeked)) = envelope.peek() {
            return self.message(job_id, envelope, peeked.id, now);
        }
        let order = match envelope.open(&self.settings.keys) {
            Ok(Statement::Order(order)) => order,
            Ok(_) => return refuse(job_id, "-", Refusal::Invalid("not an order".into()), now),
            Err(e) => return refuse(job_id, "-", Refusal::Invalid(e.to_string()), now),
        };
        let order_id = hex::encode(order.id);
        let verdict = self.policy(&order.action).and_then(|()| {
            order.check(
                &self.settings.agent_id,
                &self.groups,
                now.wall,
                self.ledger.history(&order_id),
            )
        });
        let verdict = verdict.and_then(|()| match &order.action {
            Action::Install(spec) => self.ledger.vet_release(spec, bundle.as_ref(), now.wall),
            _ => Ok(()),
        });
        if let Err(refusal) = verdict {
            return refuse(job_id, &order_id, refusal, now);
        }
        let ticket = ticket.filter(|_| matches!(order.action, Action::Open(_)));
        info!(job_id, action = %order.action.describe(), "job accepted");
        vec![
            Effect::Persist(Acceptance {
                job_id,
                order_id,
                envelope,
                keep_until: order.not_after,
                bundle: bundle.clone(),
                ticket: ticket.clone(),
                at: now.wall,
            }),
            ack(job_id, Ack::Accepted),
            Effect::Run(Job {
                job_id,
                action: order.action,
                bundle,
                ticket,
            }),
        ]
    }

    /// A push message: open (signatures, grant, limits), check (audience, replay,
    /// expiry, block list), then keep, acknowledge and show, or persist the refusal with
    /// its receipt and acknowledge it. `claimed_id` is the id read before the checks.
    fn message(
        &mut self,
        job_id: JobId,
        envelope: Envelope,
        claimed_id: [u8; 16],
        now: Now,
    ) -> Vec<Effect> {
        let hash = message::message_hash(&envelope);
        let rejection = |state: ReceiptState, reason: String| {
            warn!(job_id, %reason, "message refused");
            vec![
                Effect::RefuseMessage(Rejection {
                    job_id,
                    message_id: claimed_id,
                    hash,
                    state,
                    reason: reason.clone(),
                    at: now.wall,
                }),
                ack(job_id, Ack::Refused(reason)),
            ]
        };
        let opened = match message::open(&envelope, &self.settings.keys) {
            Ok(opened) => opened,
            Err(refusal) => {
                let reason = refusal.to_string();
                return rejection(ReceiptState::Refused(reason.clone()), reason);
            }
        };
        let seen = self.ledger.message_seen(&opened.message.id);
        let blocked = self.ledger.blocked(&opened.message.sender);
        let (seen, blocked) = match (seen, blocked) {
            (Ok(seen), Ok(blocked)) => (seen, blocked),
            (Err(e), _) | (_, Err(e)) => return self.fail(Fault::Journal(e)),
        };
        match opened.check(
            &self.settings.agent_id,
            &self.groups,
            now.wall,
            seen,
            blocked,
        ) {
            Verdict::Keep => {}
            Verdict::Seen => return vec![ack(job_id, Ack::Duplicate)],
            Verdict::Expired => {
                return rejection(ReceiptState::Expired, "message expired".into());
            }
            Verdict::Refuse(refusal) => {
                let reason = refusal.to_string();
                return rejection(ReceiptState::Refused(reason.clone()), reason);
            }
        }
        let Opened { message, grant } = opened;
        info!(job_id, id = %message.id_hex(), sender = %message.sender, "message kept");
        let notice = Notice {
            message_id: message.id_hex(),
            sender: message.sender.clone(),
            display_name: grant.display_name.clone(),
            title: message.title.clone(),
            body: message.body.clone(),
            high: message.priority == message::Priority::High,
            advertising: message.advertising,
            link: message.link.clone(),
        };
        vec![
            Effect::KeepMessage(Arrival {
                job_id,
                message,
                display_name: grant.display_name,
                hash,
                at: now.wall,
            }),
            ack(job_id, Ack::Accepted),
            Effect::ShowNotice(notice),
        ]
    }

    /// The machine's own policy (`agent.toml`'s `[policy]`).
    fn policy(&self, action: &Action) -> Result<(), Refusal> {
        let policy = &self.settings.policy;
        match action {
            Action::Run(run) => {
                if !policy.allow_run {
                    return Err(Refusal::Policy(
                        "running programs is disabled on this machine".into(),
                    ));
                }
                if !policy.programs.is_empty() && !policy.programs.contains(&run.program) {
                    return Err(Refusal::Policy(format!(
                        "{} is not in the program allowlist",
                        run.program
                    )));
                }
                if run.run_as.is_some() && !self.settings.is_root {
                    return Err(Refusal::Policy(
                        "run-as user given but the agent is not running as root".into(),
                    ));
                }
                Ok(())
            }
            Action::Open(open) => {
                if !policy.allow_browser {
                    return Err(Refusal::Policy(
                        "browser services are disabled on this machine (allow_browser = false)"
                            .into(),
                    ));
                }
                check_browser_url(&open.url).map_err(Refusal::Policy)
            }
            Action::Install(_) | Action::Revert { .. } => {
                if policy.allow_install {
                    Ok(())
                } else {
                    Err(Refusal::Policy(
                        "installing packages is disabled on this machine".into(),
                    ))
                }
            }
        }
    }

    fn addresses(&mut self, addresses: Vec<IpAddr>) -> Vec<Effect> {
        if !self.is_established() || addresses == self.addresses {
            return Vec::new();
        }
        info!(from = ?self.addresses, to = ?addresses, "local addresses changed");
        self.addresses = addresses.clone();
        vec![
            Effect::AddressesChanged {
                addresses: addresses.clone(),
            },
            Effect::Send(AgentMsg::Addresses(addresses)),
            Effect::Rebind,
        ]
    }

    fn close(&mut self, reason: &str) -> Vec<Effect> {
        self.fail(Fault::Protocol(reason.to_string()))
    }

    fn fail(&mut self, fault: Fault) -> Vec<Effect> {
        self.phase = Phase::Closed;
        vec![Effect::Close(fault)]
    }
}

fn ack(job_id: JobId, ack: Ack) -> Effect {
    Effect::Send(AgentMsg::Ack { job_id, ack })
}

fn refuse(job_id: JobId, order_id: &str, refusal: Refusal, now: Now) -> Vec<Effect> {
    let reason = refusal.to_string();
    warn!(job_id, %reason, "job refused");
    vec![
        Effect::PersistRefusal {
            job_id,
            order_id: order_id.to_string(),
            reason: reason.clone(),
            at: now.wall,
        },
        ack(job_id, Ack::Refused(reason)),
    ]
}

#[cfg(test)]
mod tests {
    //! Deterministic: no sockets, no runtime, time advanced by hand. The rig plays the
    //! driver: it applies the machine's store effects to an in-memory ledger before the
    //! next input, as the link does with the journal.

    use std::cell::RefCell;
    use std::collections::{BTreeMap, HashMap};

    use herald_shared::envelope::{Audience, Membership, OperatorKey, Order, Repeat, RunSpec};
    use herald_shared::message::SenderGrant;
    use herald_shared::protocol::Progress;

    use super::*;

    const AGENT: &str = "agent-1";
    const T0: Millis = 1_700_000_000_000;

    /// The journal, in memory.
    #[derive(Default)]
    struct Memory {
        jobs: HashMap<JobId, Known>,
        seen: HashMap<String, Millis>,
        outbox: BTreeMap<JobId, ()>,
        messages: HashSet<[u8; 16]>,
        blocked: HashSet<String>,
        reports: BTreeSet<u64>,
        broken: bool,
    }

    #[derive(Default)]
    struct FakeLedger(RefCell<Memory>);

    impl Ledger for FakeLedger {
        fn known(&self, job_id: JobId) -> Result<Option<Known>, JournalError> {
            let memory = self.0.borrow();
            if memory.broken {
                return Err(JournalError::Corrupt("disk on fire".into()));
            }
            Ok(memory.jobs.get(&job_id).cloned())
        }
        fn history(&self, order_id: &str) -> History {
            self.0
                .borrow()
                .seen
                .get(order_id)
                .map_or(History::Unseen, |&at| History::LastRun(at))
        }
        fn vet_release(
            &self,
            _: &InstallSpec,
            _: Option<&Bundle>,
            _: Millis,
        ) -> Result<(), Refusal> {
            Ok(())
        }
        fn message_seen(&self, message_id: &[u8; 16]) -> Result<bool, JournalError> {
            Ok(self.0.borrow().messages.contains(message_id))
        }
        fn blocked(&self, sender: &str) -> Result<bool, JournalError> {
            Ok(self.0.borrow().blocked.contains(sender))
        }
    }

    struct Rig {
        machine: Machine<FakeLedger>,
        key: OperatorKey,
        instant: Instant,
        wall: Millis,
        /// Jobs the rig was told to run, in order.
        runs: Vec<JobId>,
        /// Everything sent on the control stream, in order.
        sent: Vec<AgentMsg>,
        /// Results sent on their own streams, in order.
        results: Vec<JobId>,
        /// Reports sent, in order.
        reports: Vec<u64>,
        /// Notices shown, by message id.
        notices: Vec<String>,
    }

    impl Rig {
        fn new() -> Rig {
            Rig::with_outbox(Vec::new())
        }

        fn with_outbox(outbox: Vec<JobId>) -> Rig {
            let key = OperatorKey::from_seed([7; 32]);
            let settings = Settings {
                agent_id: AGENT.into(),
                keys: vec![key.public()],
                policy: Policy::default(),
                is_root: false,
                token_groups: vec!["base".into()],
                agent_version: "0.0.0-test".into(),
            };
            let ledger = FakeLedger::default();
            for &id in &outbox {
                ledger.0.borrow_mut().outbox.insert(id, ());
            }
            Rig {
                machine: Machine::new(settings, None, outbox, ledger),
                key,
                instant: Instant::now(),
                wall: T0,
                runs: Vec::new(),
                sent: Vec::new(),
                results: Vec::new(),
                reports: Vec::new(),
                notices: Vec::new(),
            }
        }

        fn now(&self) -> Now {
            Now {
                instant: self.instant,
                wall: self.wall,
            }
        }

        /// Feeds one input and carries out its effects like the driver; returns them.
        fn feed(&mut self, input: Input) -> Vec<Effect> {
            let effects = self.machine.handle(input, self.now());
            let mut memory = self.machine.ledger().0.borrow_mut();
            for effect in &effects {
                match effect {
                    Effect::Persist(a) => {
                        assert!(memory.jobs.insert(a.job_id, Known::Accepted).is_none());
                        memory.seen.insert(a.order_id.clone(), a.at);
                    }
                    Effect::PersistRefusal { job_id, reason, .. } => {
                        memory.jobs.insert(*job_id, Known::Refused(reason.clone()));
                    }
                    Effect::Run(job) => {
                        assert_eq!(memory.jobs.get(&job.job_id), Some(&Known::Accepted));
                        self.runs.push(job.job_id);
                    }
                    Effect::Send(msg) => self.sent.push(msg.clone()),
                    Effect::SendResult(id) => self.results.push(*id),
                    Effect::MarkAcknowledged(id) => {
                        memory.outbox.remove(id);
                    }
                    Effect::KeepMessage(a) => {
                        assert!(memory.jobs.insert(a.job_id, Known::Accepted).is_none());
                        assert!(memory.messages.insert(a.message.id), "kept twice");
                    }
                    Effect::RefuseMessage(r) => {
                        memory
                            .jobs
                            .insert(r.job_id, Known::Refused(r.reason.clone()));
                    }
                    Effect::ShowNotice(n) => {
                        assert!(memory
                            .messages
                            .iter()
                            .any(|id| hex::encode(id) == n.message_id));
                        self.notices.push(n.message_id.clone());
                    }
                    Effect::SendReport(seq) => self.reports.push(*seq),
                    Effect::DeleteReport(seq) => {
                        memory.reports.remove(seq);
                    }
                    _ => {}
                }
            }
            effects
        }

        fn connect(&mut self) -> Vec<Effect> {
            self.feed(Input::Start {
                addresses: vec!["10.0.0.2".parse().unwrap()],
                facts: Facts::default(),
            });
            self.feed(Input::Received(ServerMsg::Welcome(welcome(AGENT, None))))
        }

        fn order(&self, audience: Audience) -> Envelope {
            let order = Order {
                id: order_id_for(&audience, self.wall),
                audience,
                issued_at: self.wall,
                not_before: self.wall - 1_000,
                not_after: self.wall + 3_600_000,
                repeat: Repeat::Once,
                action: Action::Run(RunSpec {
                    program: "/bin/true".into(),
                    args: Vec::new(),
                    timeout_ms: 1_000,
                    run_as: None,
                }),
            };
            self.key.sign(&Statement::Order(order)).unwrap()
        }

        fn membership(&self, groups: &[&str], issued_at: Millis) -> Envelope {
            let membership = Membership {
                agent_id: AGENT.into(),
                groups: groups.iter().map(|g| g.to_string()).collect(),
                issued_at,
            };
            self.key.sign(&Statement::Membership(membership)).unwrap()
        }

        /// The acks sent, in order.
        fn acks(&self) -> Vec<(JobId, Ack)> {
            self.sent
                .iter()
                .filter_map(|m| match m {
                    AgentMsg::Ack { job_id, ack } => Some((*job_id, ack.clone())),
                    _ => None,
                })
                .collect()
        }
    }

    /// A distinct order id per audience and time, without randomness.
    fn order_id_for(audience: &Audience, at: Millis) -> [u8; 16] {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&at.to_be_bytes());
        for (i, b) in audience.to_string().bytes().enumerate() {
            id[8 + i % 8] ^= b;
        }
        id
    }

    fn welcome(agent_id: &str, membership: Option<Envelope>) -> Welcome {
        Welcome {
            server_time: T0,
            agent_id: agent_id.into(),
            membership,
            address_check_ms: 5_000,
        }
    }

    fn signal(job_id: JobId, envelope: Envelope) -> Input {
        Input::Received(ServerMsg::Signal(Signal {
            job_id,
            envelope,
            bundle: None,
            ticket: None,
        }))
    }

    /// A message from sender `card`, granted by `operator` to `sender_key`.
    fn message_from(
        operator: &OperatorKey,
        sender_key: &OperatorKey,
        id: u8,
        audience: Audience,
    ) -> Envelope {
        let grant = operator
            .sign(&Statement::Sender(SenderGrant {
                sender: "card".into(),
                display_name: "Card Company".into(),
                key: sender_key.public(),
                advertising: false,
                issued_at: T0,
            }))
            .unwrap();
        let message = Message {
            id: [id; 16],
            sender: "card".into(),
            audience,
            title: "Payment due".into(),
            body: "Friday.".into(),
            priority: message::Priority::Normal,
            issued_at: T0,
            expires_at: T0 + message::DEFAULT_TTL_MS,
            collapse: None,
            advertising: false,
            link: None,
            grant,
        };
        sender_key.sign(&Statement::Message(message)).unwrap()
    }

    fn sender_key() -> OperatorKey {
        OperatorKey::from_seed([5; 32])
    }

    fn stored(job_id: JobId) -> Input {
        Input::Received(ServerMsg::ResultStored { job_id, attempt: 1 })
    }

    fn protocol_fault(effects: &[Effect]) -> Option<&str> {
        match effects {
            [Effect::Close(Fault::Protocol(reason))] => Some(reason),
            _ => None,
        }
    }

    // === signals ===

    #[test]
    fn a_resent_signal_runs_once_and_is_acked_as_duplicate() {
        let mut rig = Rig::new();
        rig.connect();
        let order = rig.order(Audience::Agent(AGENT.into()));
        rig.feed(signal(1, order.clone()));
        rig.feed(signal(1, order.clone()));
        // And again after a reconnection (the server resends unacknowledged signals).
        rig.feed(Input::Disconnected);
        rig.connect();
        rig.feed(signal(1, order));
        assert_eq!(rig.runs, vec![1]);
        assert_eq!(
            rig.acks(),
            vec![(1, Ack::Accepted), (1, Ack::Duplicate), (1, Ack::Duplicate)]
        );
    }

    #[test]
    fn a_resent_refused_signal_gets_the_same_refusal_and_never_runs() {
        let mut rig = Rig::new();
        rig.connect();
        let order = rig.order(Audience::Group("elsewhere".into()));
        rig.feed(signal(4, order.clone()));
        rig.feed(signal(4, order));
        assert!(rig.runs.is_empty());
        let acks = rig.acks();
        assert_eq!(acks.len(), 2);
        assert!(matches!(&acks[0].1, Ack::Refused(r) if r.starts_with("not addressed")));
        assert_eq!(acks[0], acks[1]);
    }

    #[test]
    fn a_job_is_persisted_before_it_is_acked_and_acked_before_it_runs() {
        let mut rig = Rig::new();
        rig.connect();
        let effects = rig.feed(signal(2, rig.order(Audience::All)));
        assert!(matches!(
            effects.as_slice(),
            [
                Effect::Persist(Acceptance { job_id: 2, .. }),
                Effect::Send(AgentMsg::Ack {
                    job_id: 2,
                    ack: Ack::Accepted
                }),
                Effect::Run(Job { job_id: 2, .. }),
            ]
        ));
        // A refusal, too, is stored before it is told.
        rig.wall += 7_200_000;
        let late = rig.order(Audience::All);
        rig.wall += 7_200_000;
        let effects = rig.feed(signal(3, late));
        assert!(matches!(
            effects.as_slice(),
            [
                Effect::PersistRefusal { job_id: 3, .. },
                Effect::Send(AgentMsg::Ack {
                    job_id: 3,
                    ack: Ack::Refused(_)
                }),
            ]
        ));
    }

    #[test]
    fn every_signal_is_acked_at_once_not_batched() {
        let mut rig = Rig::new();
        rig.connect();
        for job_id in 10..15 {
            rig.wall += 1;
            let order = rig.order(Audience::All);
            let before = rig.acks().len();
            rig.feed(signal(job_id, order));
            assert_eq!(
                rig.acks().len(),
                before + 1,
                "job {job_id} acked by its own input"
            );
        }
        assert_eq!(rig.runs, (10..15).collect::<Vec<_>>());
    }

    #[test]
    fn a_replayed_order_under_a_new_job_id_is_refused() {
        let mut rig = Rig::new();
        rig.connect();
        let order = rig.order(Audience::All);
        rig.feed(signal(1, order.clone()));
        rig.feed(signal(2, order));
        assert_eq!(rig.runs, vec![1]);
        assert_eq!(rig.acks()[1], (2, Ack::Refused("replayed order".into())));
    }

    #[test]
    fn a_signal_the_journal_cannot_check_closes_the_connection_unacked() {
        let mut rig = Rig::new();
        rig.connect();
        rig.machine.ledger().0.borrow_mut().broken = true;
        let effects = rig.feed(signal(1, rig.order(Audience::All)));
        assert!(matches!(
            effects.as_slice(),
            [Effect::Close(Fault::Journal(_))]
        ));
        assert!(rig.acks().is_empty());
        assert!(rig.runs.is_empty());
    }

    // === messages ===

    #[test]
    fn a_kept_message_is_persisted_before_its_ack_and_shown_after() {
        let mut rig = Rig::new();
        rig.connect();
        let envelope = message_from(&rig.key, &sender_key(), 1, Audience::All);
        let effects = rig.feed(signal(1, envelope.clone()));
        assert!(matches!(
            effects.as_slice(),
            [
                Effect::KeepMessage(Arrival { job_id: 1, display_name, hash, .. }),
                Effect::Send(AgentMsg::Ack { job_id: 1, ack: Ack::Accepted }),
                Effect::ShowNotice(Notice { title, .. }),
            ] if display_name == "Card Company"
                && *hash == message::message_hash(&envelope)
                && title == "Payment due"
        ));
        assert!(rig.runs.is_empty(), "a message is not a job to run");
        assert_eq!(rig.notices, vec![hex::encode([1u8; 16])]);
    }

    #[test]
    fn a_blocked_sender_s_message_is_refused_with_a_receipt_and_not_kept() {
        let mut rig = Rig::new();
        rig.connect();
        rig.machine
            .ledger()
            .0
            .borrow_mut()
            .blocked
            .insert("card".into());
        let envelope = message_from(&rig.key, &sender_key(), 1, Audience::All);
        let effects = rig.feed(signal(1, envelope));
        assert!(matches!(
            effects.as_slice(),
            [
                Effect::RefuseMessage(Rejection {
                    job_id: 1,
                    message_id,
                    state: ReceiptState::Refused(reason),
                    ..
                }),
                Effect::Send(AgentMsg::Ack { job_id: 1, ack: Ack::Refused(told) }),
            ] if *message_id == [1; 16] && reason == "blocked" && told == "blocked"
        ));
        assert!(rig.notices.is_empty());
        assert!(rig.machine.ledger().0.borrow().messages.is_empty());
        // Redelivered: the same refusal, from the journal.
        rig.feed(signal(
            1,
            message_from(&rig.key, &sender_key(), 1, Audience::All),
        ));
        assert_eq!(rig.acks()[1], (1, Ack::Refused("blocked".into())));
    }

    #[test]
    fn a_replayed_or_redelivered_message_is_a_duplicate_and_kept_once() {
        let mut rig = Rig::new();
        rig.connect();
        let envelope = message_from(&rig.key, &sender_key(), 1, Audience::Agent(AGENT.into()));
        rig.feed(signal(1, envelope.clone()));
        rig.feed(signal(1, envelope.clone()));
        let effects = rig.feed(signal(2, envelope));
        assert!(matches!(
            effects.as_slice(),
            [Effect::Send(AgentMsg::Ack {
                job_id: 2,
                ack: Ack::Duplicate
            })]
        ));
        assert_eq!(
            rig.acks(),
            vec![(1, Ack::Accepted), (1, Ack::Duplicate), (2, Ack::Duplicate)]
        );
        assert_eq!(rig.notices.len(), 1);
    }

    #[test]
    fn a_message_from_a_sender_the_operator_did_not_grant_is_refused() {
        let mut rig = Rig::new();
        rig.connect();
        let stranger = OperatorKey::from_seed([3; 32]);
        let envelope = message_from(&stranger, &sender_key(), 1, Audience::All);
        let effects = rig.feed(signal(1, envelope));
        assert!(matches!(
            effects.as_slice(),
            [
                Effect::RefuseMessage(Rejection { state: ReceiptState::Refused(reason), .. }),
                Effect::Send(AgentMsg::Ack { ack: Ack::Refused(_), .. }),
            ] if reason.starts_with("sender not delegated")
        ));
        // Signed by the operator itself instead of a granted sender key: refused too.
        let envelope = message_from(&rig.key, &sender_key(), 2, Audience::All);
        let mut forged = envelope.clone();
        forged.signer = rig.key.public();
        rig.feed(signal(2, forged));
        assert!(matches!(&rig.acks()[1], (2, Ack::Refused(_))));
        assert!(rig.machine.ledger().0.borrow().messages.is_empty());
    }

    #[test]
    fn an_expired_or_misaddressed_message_gets_its_receipt() {
        let mut rig = Rig::new();
        rig.connect();
        rig.feed(signal(
            1,
            message_from(
                &rig.key,
                &sender_key(),
                1,
                Audience::Agent("agent-2".into()),
            ),
        ));
        rig.wall = T0 + message::DEFAULT_TTL_MS + 1;
        let effects = rig.feed(signal(
            2,
            message_from(&rig.key, &sender_key(), 2, Audience::All),
        ));
        assert!(matches!(
            effects.as_slice(),
            [
                Effect::RefuseMessage(Rejection {
                    state: ReceiptState::Expired,
                    ..
                }),
                Effect::Send(AgentMsg::Ack {
                    ack: Ack::Refused(_),
                    ..
                }),
            ]
        ));
        assert!(matches!(&rig.acks()[0], (1, Ack::Refused(r)) if r.starts_with("not addressed")));
    }

    #[test]
    fn a_message_the_store_cannot_check_closes_the_connection_unacked() {
        let mut rig = Rig::new();
        rig.connect();
        rig.machine.ledger().0.borrow_mut().broken = true;
        let effects = rig.feed(signal(
            1,
            message_from(&rig.key, &sender_key(), 1, Audience::All),
        ));
        assert!(matches!(
            effects.as_slice(),
            [Effect::Close(Fault::Journal(_))]
        ));
        assert!(rig.acks().is_empty());
    }

    // === reports ===

    #[test]
    fn reports_are_resent_on_every_connection_until_stored() {
        let mut rig = Rig::new();
        let settings = Settings {
            agent_id: AGENT.into(),
            keys: Vec::new(),
            policy: Policy::default(),
            is_root: false,
            token_groups: Vec::new(),
            agent_version: "0".into(),
        };
        rig.machine = Machine::new(settings, None, [], FakeLedger::default()).with_reports([2, 1]);
        // Ready while disconnected: waits for Welcome.
        assert!(rig.feed(Input::ReportsReady(vec![3])).is_empty());
        rig.connect();
        assert_eq!(rig.reports, vec![1, 2, 3], "oldest first, after Welcome");
        // Told again (a poll of the store): not sent twice on one connection.
        rig.feed(Input::ReportsReady(vec![1, 2, 3, 4]));
        assert_eq!(rig.reports, vec![1, 2, 3, 4]);
        let effects = rig.feed(Input::Received(ServerMsg::ReportStored { seq: 2 }));
        assert!(matches!(effects.as_slice(), [Effect::DeleteReport(2)]));
        rig.feed(Input::Received(ServerMsg::ReportStored { seq: 2 }));
        rig.feed(Input::Received(ServerMsg::ReportStored { seq: 4 }));
        rig.feed(Input::Disconnected);
        rig.reports.clear();
        rig.connect();
        assert_eq!(rig.reports, vec![1, 3]);
        assert_eq!(rig.machine.reports().collect::<Vec<_>>(), vec![1, 3]);
    }

    #[test]
    fn the_report_outbox_is_polled_only_while_established() {
        let mut rig = Rig::new();
        let effects = rig.connect();
        assert!(effects.iter().any(
            |e| matches!(e, Effect::ArmTimer(Timer::Reports, at) if *at == rig.instant + REPORT_POLL)
        ));
        rig.instant += REPORT_POLL;
        let effects = rig.feed(Input::TimerFired(Timer::Reports));
        assert!(matches!(
            effects.as_slice(),
            [Effect::PollReports, Effect::ArmTimer(Timer::Reports, at)]
                if *at == rig.instant + REPORT_POLL
        ));
        rig.feed(Input::Disconnected);
        assert!(rig.feed(Input::TimerFired(Timer::Reports)).is_empty());
    }

    // === membership ===

    #[test]
    fn a_membership_just_before_a_job_is_applied_before_its_audience_check() {
        let mut rig = Rig::new();
        rig.connect();
        let for_web = rig.order(Audience::Group("web".into()));
        let membership = rig.membership(&["base", "web"], T0);
        let effects = rig.feed(Input::Received(ServerMsg::Membership(membership)));
        assert!(matches!(effects.as_slice(), [Effect::StoreMembership(_)]));
        rig.feed(signal(1, for_web));
        assert_eq!(rig.acks(), vec![(1, Ack::Accepted)]);
        assert_eq!(rig.runs, vec![1]);
    }

    #[test]
    fn a_job_before_the_membership_that_admits_it_is_refused() {
        let mut rig = Rig::new();
        rig.connect();
        rig.feed(signal(1, rig.order(Audience::Group("web".into()))));
        let membership = rig.membership(&["web"], T0);
        rig.feed(Input::Received(ServerMsg::Membership(membership)));
        assert!(matches!(&rig.acks()[0], (1, Ack::Refused(_))));
        assert!(rig.runs.is_empty());
    }

    #[test]
    fn the_membership_in_welcome_admits_the_first_job() {
        let mut rig = Rig::new();
        rig.feed(Input::Start {
            addresses: Vec::new(),
            facts: Facts::default(),
        });
        let membership = rig.membership(&["web"], T0);
        let effects = rig.feed(Input::Received(ServerMsg::Welcome(welcome(
            AGENT,
            Some(membership),
        ))));
        assert!(matches!(effects.first(), Some(Effect::StoreMembership(_))));
        rig.feed(signal(1, rig.order(Audience::Group("web".into()))));
        assert_eq!(rig.runs, vec![1]);
    }

    #[test]
    fn an_older_or_foreign_or_forged_membership_changes_nothing() {
        let mut rig = Rig::new();
        rig.connect();
        let newer = rig.membership(&["web"], T0 + 10);
        rig.feed(Input::Received(ServerMsg::Membership(newer)));
        let older = rig.membership(&["db"], T0);
        let forged = OperatorKey::from_seed([9; 32])
            .sign(&Statement::Membership(Membership {
                agent_id: AGENT.into(),
                groups: vec!["root".into()],
                issued_at: T0 + 20,
            }))
            .unwrap();
        let foreign = rig
            .key
            .sign(&Statement::Membership(Membership {
                agent_id: "agent-2".into(),
                groups: vec!["db".into()],
                issued_at: T0 + 30,
            }))
            .unwrap();
        for envelope in [older, forged, foreign] {
            let effects = rig.feed(Input::Received(ServerMsg::Membership(envelope)));
            assert!(effects.is_empty());
        }
        assert_eq!(rig.machine.groups(), ["web".to_string()]);
    }

    #[test]
    fn a_stored_membership_is_in_force_before_any_connection() {
        let key = OperatorKey::from_seed([7; 32]);
        let stored = key
            .sign(&Statement::Membership(Membership {
                agent_id: AGENT.into(),
                groups: vec!["web".into()],
                issued_at: T0,
            }))
            .unwrap();
        let settings = Settings {
            agent_id: AGENT.into(),
            keys: vec![key.public()],
            policy: Policy::default(),
            is_root: false,
            token_groups: vec!["base".into()],
            agent_version: "0".into(),
        };
        let machine = Machine::new(settings, Some(stored), [], FakeLedger::default());
        assert_eq!(machine.groups(), ["web".to_string()]);
    }

    // === results ===

    #[test]
    fn an_unacked_result_is_resent_after_reconnect_and_an_acked_one_is_not() {
        let mut rig = Rig::new();
        rig.connect();
        rig.feed(Input::ResultReady(1));
        rig.feed(Input::ResultReady(2));
        // Told twice (a finished job and a recovery both report it): sent once.
        rig.feed(Input::ResultReady(2));
        assert_eq!(rig.results, vec![1, 2]);
        rig.feed(stored(1));
        rig.feed(Input::Disconnected);
        // Ready while disconnected: waits for the next connection.
        rig.feed(Input::ResultReady(3));
        assert_eq!(rig.results, vec![1, 2]);
        rig.results.clear();
        rig.connect();
        assert_eq!(rig.results, vec![2, 3]);
        rig.feed(stored(2));
        rig.feed(stored(3));
        rig.feed(Input::Disconnected);
        rig.results.clear();
        rig.connect();
        assert!(rig.results.is_empty());
        assert_eq!(rig.machine.outbox().count(), 0);
    }

    #[test]
    fn results_waiting_at_startup_are_sent_after_welcome_not_before() {
        let mut rig = Rig::with_outbox(vec![5, 3]);
        rig.feed(Input::Start {
            addresses: Vec::new(),
            facts: Facts::default(),
        });
        assert!(rig.results.is_empty());
        rig.feed(Input::Received(ServerMsg::Welcome(welcome(AGENT, None))));
        assert_eq!(rig.results, vec![3, 5], "oldest first");
    }

    #[test]
    fn out_of_order_and_duplicate_acks_leave_the_right_outbox() {
        let mut rig = Rig::new();
        rig.connect();
        for id in [1, 2, 3] {
            rig.feed(Input::ResultReady(id));
        }
        rig.feed(stored(2));
        rig.feed(stored(2));
        assert_eq!(rig.machine.outbox().collect::<Vec<_>>(), vec![1, 3]);
        rig.feed(stored(1));
        // An ack for a result this agent never had.
        let effects = rig.feed(stored(99));
        assert!(matches!(effects.as_slice(), [Effect::MarkAcknowledged(99)]));
        assert_eq!(rig.machine.outbox().collect::<Vec<_>>(), vec![3]);
        let memory = rig.machine.ledger().0.borrow();
        assert!(memory.outbox.is_empty() || memory.outbox.keys().all(|id| *id == 3));
        drop(memory);
        // Only 3 goes again on the next connection.
        rig.feed(Input::Disconnected);
        rig.results.clear();
        rig.connect();
        assert_eq!(rig.results, vec![3]);
    }

    // === conversation ===

    #[test]
    fn hello_is_sent_first_with_a_deadline_for_welcome() {
        let mut rig = Rig::new();
        let effects = rig.feed(Input::Start {
            addresses: Vec::new(),
            facts: Facts::default(),
        });
        assert!(matches!(
            effects.as_slice(),
            [
                Effect::Send(AgentMsg::Hello(Hello { protocol: (PROTOCOL_MAJOR, _), .. })),
                Effect::ArmTimer(Timer::Welcome, at),
            ] if *at == rig.instant + WELCOME_TIMEOUT
        ));
    }

    #[test]
    fn a_signal_before_welcome_is_a_protocol_error() {
        let mut rig = Rig::new();
        rig.feed(Input::Start {
            addresses: Vec::new(),
            facts: Facts::default(),
        });
        let effects = rig.feed(signal(1, rig.order(Audience::All)));
        assert!(protocol_fault(&effects).is_some_and(|r| r.starts_with("expected Welcome")));
        assert!(rig.runs.is_empty());
        assert!(rig.acks().is_empty());
        // Closed: what still arrives is ignored.
        assert!(rig.feed(signal(2, rig.order(Audience::All))).is_empty());
    }

    #[test]
    fn a_second_welcome_is_a_protocol_error() {
        let mut rig = Rig::new();
        rig.connect();
        let effects = rig.feed(Input::Received(ServerMsg::Welcome(welcome(AGENT, None))));
        assert!(protocol_fault(&effects).is_some_and(|r| r.starts_with("unexpected message")));
    }

    #[test]
    fn messages_for_the_wrong_conversation_are_protocol_errors() {
        // `Enrolled` belongs to enrollment, not to a Hello connection.
        for established in [false, true] {
            let mut rig = Rig::new();
            if established {
                rig.connect();
            } else {
                rig.feed(Input::Start {
                    addresses: Vec::new(),
                    facts: Facts::default(),
                });
            }
            let enrolled = ServerMsg::Enrolled {
                agent_id: AGENT.into(),
            };
            assert!(protocol_fault(&rig.feed(Input::Received(enrolled))).is_some());
        }
        // Anything before a connection started.
        let mut rig = Rig::new();
        assert!(protocol_fault(&rig.feed(stored(1))).is_some());
    }

    #[test]
    fn a_welcome_naming_another_agent_is_a_protocol_error() {
        let mut rig = Rig::new();
        rig.feed(Input::Start {
            addresses: Vec::new(),
            facts: Facts::default(),
        });
        let effects = rig.feed(Input::Received(ServerMsg::Welcome(welcome(
            "agent-2", None,
        ))));
        assert!(protocol_fault(&effects).is_some_and(|r| r.contains("agent-2")));
    }

    #[test]
    fn no_welcome_in_time_closes_and_a_late_timer_is_ignored() {
        let mut rig = Rig::new();
        rig.feed(Input::Start {
            addresses: Vec::new(),
            facts: Facts::default(),
        });
        rig.instant += WELCOME_TIMEOUT;
        let effects = rig.feed(Input::TimerFired(Timer::Welcome));
        assert_eq!(protocol_fault(&effects), Some("no answer to Hello"));
        // Welcomed in time: the welcome timer is stale.
        let mut rig = Rig::new();
        rig.connect();
        assert!(rig.feed(Input::TimerFired(Timer::Welcome)).is_empty());
    }

    #[test]
    fn refused_and_closed_streams_end_the_connection() {
        let mut rig = Rig::new();
        rig.feed(Input::Start {
            addresses: Vec::new(),
            facts: Facts::default(),
        });
        let effects = rig.feed(Input::Received(ServerMsg::Refused("revoked".into())));
        assert!(matches!(effects.as_slice(), [Effect::Close(Fault::Refused(r))] if r == "revoked"));
        let mut rig = Rig::new();
        rig.connect();
        let effects = rig.feed(Input::ControlClosed);
        assert_eq!(
            protocol_fault(&effects),
            Some("server closed the control stream")
        );
    }

    #[test]
    fn job_reports_go_out_only_on_an_established_connection() {
        let mut rig = Rig::new();
        let started = AgentMsg::Started { job_id: 1, at: T0 };
        assert!(rig.feed(Input::Report(started.clone())).is_empty());
        rig.connect();
        let progress = AgentMsg::Progress {
            job_id: 1,
            progress: Progress::Installing,
        };
        assert!(matches!(
            rig.feed(Input::Report(progress)).as_slice(),
            [Effect::Send(AgentMsg::Progress { .. })]
        ));
        rig.feed(Input::Disconnected);
        assert!(rig.feed(Input::Report(started)).is_empty());
    }

    // === addresses ===

    #[test]
    fn an_address_change_is_reported_and_rebinds_and_the_check_repeats() {
        let mut rig = Rig::new();
        let effects = rig.connect();
        assert!(effects
            .iter()
            .any(|e| matches!(e, Effect::ArmTimer(Timer::AddressCheck, at) if *at == rig.instant)));
        let effects = rig.feed(Input::TimerFired(Timer::AddressCheck));
        assert!(matches!(
            effects.as_slice(),
            [Effect::SampleAddresses, Effect::ArmTimer(Timer::AddressCheck, at)]
                if *at == rig.instant + Duration::from_secs(5)
        ));
        let same = vec!["10.0.0.2".parse().unwrap()];
        assert!(rig.feed(Input::Addresses(same)).is_empty());
        let moved: Vec<IpAddr> = vec!["192.168.1.9".parse().unwrap()];
        let effects = rig.feed(Input::Addresses(moved.clone()));
        assert!(matches!(
            effects.as_slice(),
            [
                Effect::AddressesChanged { .. },
                Effect::Send(AgentMsg::Addresses(a)),
                Effect::Rebind,
            ] if *a == moved
        ));
        // Not welcomed: nothing to report on.
        rig.feed(Input::Disconnected);
        assert!(rig.feed(Input::TimerFired(Timer::AddressCheck)).is_empty());
    }

    #[test]
    fn results_are_sent_only_once_per_connection() {
        let mut rig = Rig::new();
        rig.connect();
        rig.feed(Input::ResultReady(1));
        rig.feed(Input::ResultReady(1));
        assert_eq!(rig.results, vec![1]);
    }
}
