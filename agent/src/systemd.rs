//! Tells systemd how the agent is doing (`sd_notify`): `READY=1` once the standby loop
//! starts (connected or trying to), `STOPPING=1` on shutdown, and `WATCHDOG=1` from the
//! loops that do the agent's work, so that a hung loop stops the pings and systemd
//! (`WatchdogSec=` in installers/systemd/herald-agent.service) restarts the agent.
//!
//! Everything here is a no-op when the agent is not started by systemd (`NOTIFY_SOCKET`
//! and `WATCHDOG_USEC` unset), as in the tests and under other service managers.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio::time::Instant;

/// How many pings fit in systemd's watchdog period: a ping every third of it leaves two
/// chances before systemd gives up.
const PINGS_PER_PERIOD: u32 = 3;

/// `READY=1`: the agent is up (the standby loop is about to connect).
pub fn ready() {
    notify(NotifyState::Ready);
}

/// `STOPPING=1`: the agent is shutting down on request.
pub fn stopping() {
    notify(NotifyState::Stopping);
}

fn notify(state: NotifyState<'_>) {
    if let Err(e) = sd_notify::notify(&[state]) {
        tracing::warn!("cannot notify systemd: {e}");
    }
}

/// Sends `WATCHDOG=1` at most once per ping period; owned by the loop whose progress it
/// vouches for.
#[derive(Debug)]
pub struct Watchdog {
    /// `None` when systemd asked for no watchdog.
    every: Option<Duration>,
    next: Instant,
}

impl Watchdog {
    /// A watchdog with systemd's period (`WATCHDOG_USEC`), or an idle one.
    pub fn from_env() -> Watchdog {
        let every = sd_notify::watchdog_enabled().map(|period| period / PINGS_PER_PERIOD);
        Watchdog {
            every,
            next: Instant::now(),
        }
    }

    /// Resolves when the next ping is due; never when there is no watchdog. Cancel-safe:
    /// the deadline lives in `self`, so a loop that is always busy still pings on time.
    pub async fn due(&self) {
        match self.every {
            Some(_) => tokio::time::sleep_until(self.next).await,
            None => std::future::pending().await,
        }
    }

    /// Pings systemd and sets the next deadline.
    pub fn ping(&mut self) {
        if let Some(every) = self.every {
            notify(NotifyState::Watchdog);
            self.next = Instant::now() + every;
        }
    }

    /// Awaits `work`, pinging while it runs: for waits that are part of the loop's work
    /// and bounded by their own timeouts (connecting, the backoff before reconnecting).
    pub async fn while_awaiting<T>(&mut self, work: impl std::future::Future<Output = T>) -> T {
        tokio::pin!(work);
        loop {
            tokio::select! {
                out = &mut work => return out,
                () = self.due() => self.ping(),
            }
        }
    }
}
