//! Herald's control server: the relay (QUIC), the scheduler, the store (SQLite), the
//! admin API and web console (HTTPS) and the admin CLI that drives it. The folders and
//! which way they depend on each other are in docs/ARCHITECTURE.md.
//!
//! The server does not depend on the agent crate. Only `herald-server demo`
//! (`cli/demo.rs`, behind the default `demo` feature) starts a real agent in-process, so
//! that one command runs the whole loop without building and finding a second binary.

#![forbid(unsafe_code)]

pub mod api;
pub mod billing;
pub mod cli;
pub mod cluster;
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
