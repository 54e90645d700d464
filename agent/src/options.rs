//! The agent's tunables: the defaults a shipped agent runs with, shorter ones in tests.

use std::time::Duration;

use crate::{backoff, exec, session, tls};

/// Tunables, mostly for tests.
#[derive(Debug, Clone)]
pub struct Options {
    /// First backoff ceiling.
    pub backoff_base: Duration,
    /// Highest backoff ceiling.
    pub backoff_cap: Duration,
    /// QUIC keep-alive interval.
    pub keep_alive: Duration,
    /// Grace between SIGTERM and SIGKILL for timed-out jobs.
    pub kill_grace: Duration,
    /// How long a browser service waits for the session helper's answer.
    pub session_answer: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            backoff_base: backoff::BACKOFF_BASE,
            backoff_cap: backoff::BACKOFF_CAP,
            keep_alive: tls::KEEP_ALIVE,
            kill_grace: exec::KILL_GRACE,
            session_answer: session::ANSWER_TIMEOUT,
        }
    }
}
