//! Herald's resident agent: keeps a QUIC connection to the server, reports its addresses,
//! and acts on operator-signed orders (running installed programs, opening browser
//! services through the user-session helper), keeping every result until the server has
//! stored it.

#![forbid(unsafe_code)]

pub mod agent;
pub mod browser;
pub mod download;
pub mod exec;
pub mod files;
pub mod host;
pub mod install;
pub mod journal;
pub mod link;
pub mod selfupdate;
pub mod session;
pub mod state;
pub mod tls;
pub mod update;
pub mod wire;

pub use agent::{enroll, run, Agent, AgentError, Options};
pub use link::backoff;

/// The wall clock in unix milliseconds.
pub fn now_ms() -> herald_shared::Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as herald_shared::Millis)
        .unwrap_or(0)
}

/// Random bytes from the operating system.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    // Without an OS random source the agent cannot make keys or markers at all.
    getrandom::fill(&mut bytes).expect("operating system random source");
    bytes
}
