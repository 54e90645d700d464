//! Herald's resident agent: keeps a QUIC connection to the server, reports its addresses,
//! and acts on operator-signed orders (running installed programs, opening browser
//! services through the user-session helper), keeping every result until the server has
//! stored it; keeps sender-signed push messages in an inbox, shows them as desktop
//! notifications and answers with receipts signed by its own key.
//!
//! # Modules, top to bottom (each depends only on those below it; `scripts/modgraph.py
//! agent/src` checks that)
//!
//! - [`daemon`]: the `enroll` and `run` commands.
//! - [`link`]: the QUIC driver — connects, reconnects ([`mod@backoff`]), moves frames,
//!   timers and effects for the protocol machine.
//! - [`agent`]: persists and runs the jobs the machine accepts, keeps their results;
//!   [`update`] installs packages (and hands the agent's own binary to [`selfupdate`]),
//!   through a trait the agent implements.
//! - [`peers`]: the consumer's end of shared services (`peers`, `connect`) on a side
//!   connection; [`tunnel`]: the providing end, the byte pump and the signed counts of
//!   each session; [`shares`]: the share table every tunnel is checked against, and the
//!   session records; [`direct`]: direct connections between agents (the provider's
//!   expectations, the consumer's dial).
//! - [`inbox`]: keeps the push messages the machine accepts (with the senders seen, the
//!   block list and the outbox of signed reports), in the same database and
//!   transactions as the journal.
//! - [`protocol`]: the agent's half of the protocol, a state machine without I/O.
//! - [`journal`] (the local store), [`session`] and [`browser`] (the user-session
//!   helper, which shows notices through [`notify`]), [`exec`], [`download`], [`install`], [`tls`], [`state`], [`host`],
//!   [`options`], [`systemd`] (readiness and watchdog notices), and `sync` (locking that
//!   survives poisoning).

#![forbid(unsafe_code)]

pub mod agent;
pub mod backoff;
pub mod browser;
pub mod daemon;
pub mod direct;
pub mod download;
pub mod exec;
pub mod host;
pub mod inbox;
pub mod install;
pub mod journal;
pub mod link;
pub mod notify;
pub mod options;
pub mod peers;
pub mod protocol;
pub mod selfupdate;
pub mod session;
pub mod shares;
pub mod state;
mod sync;
pub mod systemd;
pub mod tls;
pub mod tunnel;
pub mod update;

pub use agent::Agent;
pub use backoff::backoff;
pub use daemon::{enroll, run, AgentError};
pub use options::Options;
