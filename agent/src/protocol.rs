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
use herald_shared::protocol::{
    Ack, AgentMsg, Bundle, Facts, Hello, JobId, ServerMsg, Signal, Welcome, PROTOCOL_MAJOR,
    PROTOCOL_MINOR,
};
use herald_shared::Millis;

use crate::journal::{JournalError, Known};
use crate::state::Policy;

/// How long to wait for the server's answer to `Hello`.
pub const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// Bounds on the address-check period the server may ask for in `Welcome`.
const ADDRESS_CHECK_MS: std::ops::RangeInclusive<u64> = 1_000..=60_000;

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
}

impl<L: Ledger + ?Sized> Ledger for std::sync::Arc<L> {
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
            addresses: Vec::new(),
            address_check: Duration::from_millis(*ADDRESS_CHECK_MS.end()),
        };
        if let Some(envelope) = membership {
            // Already stored: the store effect is not needed.
            let _ = machine.membership(envelope);
        }
        machine
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
            Input::Report(msg) if self.is_established() => vec![Effect::Send(msg)],
            Input::Report(_) => Vec::new(),
            Input::TimerFired(Timer::Welcome) if self.phase == Phase::AwaitingWelcome => {
                self.close("no answer to Hello")
            }
            Input::TimerFired(Timer::AddressCheck) if self.is_established() => vec![
                Effect::SampleAddresses,
                Effect::ArmTimer(Timer::AddressCheck, now.instant + self.address_check),
            ],
            // A timer of an earlier phase or connection.
            Input::TimerFired(_) => Vec::new(),
            Input::Disconnected => {
                self.phase = Phase::Idle;
                self.sent.clear();
                Vec::new()
            }
        }
    }

    fn start(&mut self, addresses: Vec<IpAddr>, facts: Facts, now: Now) -> Vec<Effect> {
        // A start without the previous connection's end: that one is gone.
        self.sent.clear();
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
            (Phase::Established, ServerMsg::Membership(envelope)) => self.membership(envelope),
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
        effects
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
