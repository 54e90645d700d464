//! Herald's resident agent: keeps a QUIC connection to the server, reports its addresses,
//! and acts on operator-signed orders (running installed programs, opening browser
//! services through the user-session helper), keeping every result until the server has
//! stored it.

#![forbid(unsafe_code)]

pub mod agent;
pub mod backoff;
pub mod browser;
pub mod daemon;
pub mod download;
pub mod exec;
pub mod host;
pub mod install;
pub mod journal;
pub mod link;
pub mod options;
pub mod protocol;
pub mod selfupdate;
pub mod session;
pub mod state;
mod sync;
pub mod tls;
pub mod update;

pub use agent::Agent;
pub use backoff::backoff;
pub use daemon::{enroll, run, AgentError};
pub use options::Options;
