//! Herald's control server: the relay (QUIC), the scheduler, the store (SQLite), the
//! admin API (HTTPS) and the admin CLI that drives it.

#![forbid(unsafe_code)]

pub mod api;
pub mod cli;
pub mod config;
pub mod console;
pub mod forward;
pub mod https;
pub mod init;
pub mod metrics;
pub mod model;
pub mod packages;
pub mod pki;
pub mod relay;
pub mod scheduler;
pub mod serve;
pub mod store;
pub mod ticket;

pub use herald_shared::Millis;

// One clock and one random source for the whole workspace.
pub use herald_io::{now_ms, random_bytes};
