//! The I/O that the agent and the server share, kept out of both so that neither binary
//! depends on the other and `herald-shared` stays free of I/O:
//!
//! - [`wire`]: frames (`herald_shared::codec`) read from and written to QUIC streams;
//! - [`files`]: atomic writes and private (0600) files and directories;
//! - [`tls`]: the handshake checks both ends' certificate verifiers share;
//! - [`cli`]: what both command lines share: usage errors exit 64, shell completions,
//!   man pages, JSON logs;
//! - [`now_ms`] and [`random_bytes`]: the one clock and the one random source of the
//!   workspace;
//! - [`postgres_url`]: a PostgreSQL URL naming another database (the test harness's and
//!   the benchmark's database per server).

#![forbid(unsafe_code)]

pub mod cli;
pub mod files;
pub mod postgres_url;
pub mod tls;
pub mod wire;

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
    // Without an OS random source no key, token or marker can be made at all.
    getrandom::fill(&mut bytes).expect("operating system random source");
    bytes
}
