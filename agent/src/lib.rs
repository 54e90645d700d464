//! Herald's resident agent: keeps a QUIC connection to the server, reports its addresses,
//! and acts on operator-signed orders (running installed programs, opening browser
//! services through the user-session helper), keeping every result until the server has
//! stored it.

#![forbid(unsafe_code)]

pub mod agent;
pub mod browser;
pub mod download;
pub mod exec;
pub mod host;
pub mod install;
pub mod journal;
pub mod link;
pub mod selfupdate;
pub mod session;
pub mod state;
pub mod tls;
pub mod update;

pub use agent::{enroll, run, Agent, AgentError, Options};
pub use link::backoff;
