//! Herald's control server: the relay (QUIC), the scheduler, the store (SQLite), the
//! admin API (HTTPS) and the admin CLI that drives it.

#![forbid(unsafe_code)]

pub mod api;
pub mod cli;
pub mod client;
pub mod config;
pub mod demo;
pub mod https;
pub mod init;
pub mod model;
pub mod pki;
pub mod relay;
pub mod scheduler;
pub mod serve;
pub mod store;

pub use herald_shared::Millis;

/// The wall clock in unix milliseconds.
pub fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

/// Random bytes from the operating system.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    // The OS random source failing is unrecoverable for a server that mints secrets.
    getrandom::fill(&mut bytes).expect("operating system random source");
    bytes
}
