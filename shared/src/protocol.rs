//! Messages between agent and server.
//!
//! The agent opens one bidirectional *control stream* per connection and speaks first
//! (`Hello` or `Enroll`). Results travel on their own unidirectional stream each, since
//! they may be large ([`crate::codec::RESULT_FRAME_LIMIT`]).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::envelope::Envelope;
use crate::Millis;

/// ALPN protocol id.
pub const ALPN: &[u8] = b"herald/1";

/// Protocol version: a different major is refused with a clear message.
pub const PROTOCOL_MAJOR: u16 = 1;
/// Minor protocol version (additions only). 1: push messages (`Report`, `ReportStored`).
/// 2: peers (`Shares`, `Request`, and the streams of [`crate::peers`]). 3: tunnel
/// sessions' signed counters (`Report` carrying [`crate::message::Report::Usage`]), and
/// the direct path (`StreamRequest::Direct`, `StreamAnswer::Direct`, direct offers).
/// 4: `StreamAnswer::Elsewhere` (the provider is on another node of a cluster).
pub const PROTOCOL_MINOR: u16 = 4;

/// The name the server's certificate is issued for and agents verify, whatever address
/// they reach it at (addresses change; the pinned CA is what matters).
pub const SERVER_NAME: &str = "herald-server";

/// QUIC application close codes.
pub mod close {
    use std::time::Duration;

    /// Normal close.
    pub const DONE: u32 = 0;
    /// The peer violated the protocol (malformed frame, unexpected message).
    pub const PROTOCOL: u32 = 1;
    /// The agent was revoked.
    pub const REVOKED: u32 = 2;
    /// Replaced by a newer connection of the same agent.
    pub const REPLACED: u32 = 3;
    /// Refused (not enrolled, version).
    pub const REFUSED: u32 = 4;
    /// The server is shutting down; the reason says over how long agents should spread
    /// their reconnections ([`shutdown_reason`]).
    pub const SHUTDOWN: u32 = 5;

    const WINDOW_PREFIX: &str = "server shutting down; reconnect between ";

    /// The reason a stopping server closes with: readable, and carrying the window in
    /// which its agents should spread their reconnections (from when they read it), so
    /// that they arrive after it is back and at about the rate it can take handshakes.
    pub fn shutdown_reason(window: std::ops::Range<Duration>) -> String {
        format!(
            "{WINDOW_PREFIX}{} and {} ms",
            window.start.as_millis(),
            window.end.as_millis()
        )
    }

    /// Longest wait a close reason can impose on an agent (a server asks for at most
    /// five minutes; anything longer is cut to this).
    const MAX_WINDOW_MS: u64 = 600_000;

    /// The reconnect window of a [`SHUTDOWN`] close's reason, if it has one.
    pub fn reconnect_window(reason: &[u8]) -> Option<std::ops::Range<Duration>> {
        let reason = std::str::from_utf8(reason).ok()?;
        let (start, end) = reason
            .strip_prefix(WINDOW_PREFIX)?
            .strip_suffix(" ms")?
            .split_once(" and ")?;
        let (start, end): (u64, u64) = (start.parse().ok()?, end.parse().ok()?);
        let (start, end) = (start.min(MAX_WINDOW_MS), end.min(MAX_WINDOW_MS));
        (start <= end).then(|| Duration::from_millis(start)..Duration::from_millis(end))
    }
}

/// Server-assigned job id.
pub type JobId = i64;

/// Agent → server on the control stream (and, for `Result`, on a uni stream).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AgentMsg {
    /// First message on an enrolled agent's connection.
    Hello(Hello),
    /// First message on a new agent's connection.
    Enroll(Enroll),
    /// Answer to a signal.
    Ack {
        /// Job the signal carried.
        job_id: JobId,
        /// What the agent did with it.
        ack: Ack,
    },
    /// A job started running.
    Started {
        /// Job id.
        job_id: JobId,
        /// When.
        at: Millis,
    },
    /// The local addresses changed (or the periodic report).
    Addresses(Vec<IpAddr>),
    /// A finished job's result (sent on its own stream).
    Result(JobResult),
    /// How a long job (an install) is getting on; the latest one is kept with the job.
    Progress {
        /// Job id.
        job_id: JobId,
        /// Where it is.
        progress: Progress,
    },
    /// A signed receipt or block-list change from the agent's report outbox; resent on
    /// every connection until the server answers `ReportStored` with its `seq`.
    Report {
        /// The agent's outbox sequence number (local; the server echoes it).
        seq: u64,
        /// The report, signed by the agent's identity key.
        report: crate::message::SignedReport,
    },
    /// The agent's share table as the directory should list it (the whole table, sent
    /// after `Welcome` and whenever it changes).
    Shares(Vec<crate::peers::ShareInfo>),
    /// First frame of a stream the agent opens for a request of its own (the directory,
    /// a tunnel); on a connection's first stream it makes that a side connection.
    Request(crate::peers::StreamRequest),
}

/// Stages of an install job, for operators watching a rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Progress {
    /// Fetching the artifact; percent of the declared length.
    Downloading {
        /// 0 to 100.
        percent: u8,
    },
    /// Download verified; unpacking and running the install command.
    Installing,
    /// The new agent binary is starting; it must come back healthy.
    Restarting,
}

impl std::fmt::Display for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Progress::Downloading { percent } => write!(f, "downloading {percent}%"),
            Progress::Installing => f.write_str("installing"),
            Progress::Restarting => f.write_str("restarting"),
        }
    }
}

/// Server → agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ServerMsg {
    /// Answer to `Hello`.
    Welcome(Welcome),
    /// Answer to `Enroll` when it succeeded.
    Enrolled {
        /// The id the server derived from the agent's certificate.
        agent_id: String,
    },
    /// The server will not talk to this agent; the reason is for people.
    Refused(String),
    /// Something to do.
    Signal(Signal),
    /// A result was stored; the agent may drop it from its outbox.
    ResultStored {
        /// Job id.
        job_id: JobId,
        /// Attempt number.
        attempt: u32,
    },
    /// A new signed membership for this agent.
    Membership(Envelope),
    /// A report was stored (or refused for good); the agent may drop it from its outbox.
    ReportStored {
        /// The agent's sequence number.
        seq: u64,
    },
    /// A console user asks this agent to block (or unblock) a sender. Not signed: the
    /// agent applies a block (it only narrows what is shown), but undoes only a block
    /// that was itself made from the console; either way it answers with a signed
    /// `BlockChange` report of the sender's state as it now is.
    BlockRequest {
        /// The server's request id (for logs).
        id: i64,
        /// Sender name.
        sender: String,
        /// Block (true) or unblock (false).
        blocked: bool,
    },
}

/// Sent by the agent when it connects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol version (major, minor).
    pub protocol: (u16, u16),
    /// Agent software version.
    pub agent_version: String,
    /// Host facts.
    pub facts: Facts,
    /// Local interface addresses.
    pub addresses: Vec<IpAddr>,
}

/// What the agent reports about its machine.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Facts {
    /// Host name.
    pub hostname: String,
    /// Operating system name and version.
    pub os: String,
    /// Kernel version.
    pub kernel: String,
    /// CPU architecture.
    pub arch: String,
    /// Logical CPUs.
    pub cpus: u32,
    /// Total memory in bytes.
    pub memory: u64,
    /// Release platform (`linux-x86_64`), matched against package metadata.
    pub platform: String,
}

/// Enrollment request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Enroll {
    /// Protocol version (major, minor).
    pub protocol: (u16, u16),
    /// The token secret.
    pub secret: Vec<u8>,
    /// Name the agent proposes (its host name by default).
    pub name: String,
    /// Host facts.
    pub facts: Facts,
}

/// Answer to `Hello`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// Server time, for the agent's information (it does not trust it for validity).
    pub server_time: Millis,
    /// The agent id as the server knows it (from the certificate).
    pub agent_id: String,
    /// Latest signed membership for this agent, if any.
    pub membership: Option<Envelope>,
    /// How often the agent checks its local addresses.
    pub address_check_ms: u64,
}

/// A job for the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Signal {
    /// Server job id (the agent deduplicates on it).
    pub job_id: JobId,
    /// The operator-signed order.
    pub envelope: Envelope,
    /// For install orders: the release to install (its signatures are checked by the
    /// agent; the server only attaches it).
    pub bundle: Option<Bundle>,
    /// For browser services: a one-time, short-lived ticket the agent appends to the
    /// page URL (`herald_ticket=`), which lets that visit in as this device's user.
    pub ticket: Option<String>,
}

/// A release as the server attaches it to an install signal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bundle {
    /// Release metadata, signed by a vendor key or the operator.
    pub release: Envelope,
    /// The operator's delegation to that vendor key, if vendor-signed.
    pub delegation: Option<Envelope>,
    /// Where to fetch the artifact when the metadata names no URL (the server's own
    /// HTTPS endpoint). Unsigned: integrity comes from the signed hash and length.
    pub url: String,
}

/// The agent's answer to a signal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ack {
    /// Persisted; will run.
    Accepted,
    /// Will not run; the reason is stored with the job.
    Refused(String),
    /// Already known (a redelivery); its result, if any, comes from the outbox.
    Duplicate,
}

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    /// Exit code 0.
    Succeeded,
    /// Nonzero exit, killed by a signal, or could not start.
    Failed,
    /// Killed at its timeout.
    TimedOut,
    /// The agent stopped while it ran; it is not re-run.
    Interrupted,
}

impl Status {
    /// Name used in storage and output.
    pub fn as_str(&self) -> &'static str {
        match self {
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::TimedOut => "timed_out",
            Status::Interrupted => "interrupted",
        }
    }
}

/// A finished job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobResult {
    /// Job id.
    pub job_id: JobId,
    /// Attempt number (the server stores idempotently by agent, job and attempt).
    pub attempt: u32,
    /// How it ended.
    pub status: Status,
    /// Exit code, if it exited.
    pub exit_code: Option<i32>,
    /// Terminating signal, if killed.
    pub signal: Option<i32>,
    /// Captured stdout (capped).
    pub stdout: Vec<u8>,
    /// Captured stderr (capped).
    pub stderr: Vec<u8>,
    /// stdout was cut at the cap.
    pub stdout_truncated: bool,
    /// stderr was cut at the cap.
    pub stderr_truncated: bool,
    /// Start time (0 if it never started).
    pub started_at: Millis,
    /// End time.
    pub finished_at: Millis,
    /// Why it failed to start or was interrupted.
    pub error: Option<String>,
}

impl JobResult {
    /// A result without output: a job that could not start or was interrupted.
    pub fn without_output(
        job_id: JobId,
        status: Status,
        started_at: Millis,
        finished_at: Millis,
        error: Option<String>,
    ) -> JobResult {
        JobResult {
            job_id,
            attempt: 1,
            status,
            exit_code: None,
            signal: None,
            stdout: Vec::new(),
            stderr: Vec::new(),
            stdout_truncated: false,
            stderr_truncated: false,
            started_at,
            finished_at,
            error,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shutdown_reasons_carry_the_reconnect_window() {
        use std::time::Duration;
        let window = Duration::from_millis(3_000)..Duration::from_millis(36_333);
        let reason = close::shutdown_reason(window.clone());
        assert_eq!(
            reason,
            "server shutting down; reconnect between 3000 and 36333 ms"
        );
        assert_eq!(close::reconnect_window(reason.as_bytes()), Some(window));
        assert_eq!(close::reconnect_window(b"server shutting down"), None);
        assert_eq!(
            close::reconnect_window(b"server shutting down; reconnect between x and 5 ms"),
            None
        );
        // An empty window is fine (one agent), a reversed one is not.
        assert_eq!(
            close::reconnect_window(b"server shutting down; reconnect between 5 and 5 ms"),
            Some(Duration::from_millis(5)..Duration::from_millis(5))
        );
        assert_eq!(
            close::reconnect_window(b"server shutting down; reconnect between 6 and 5 ms"),
            None
        );
        // No server can park its agents for longer than ten minutes.
        assert_eq!(
            close::reconnect_window(
                b"server shutting down; reconnect between 1000 and 99999999999 ms"
            ),
            Some(Duration::from_millis(1000)..Duration::from_secs(600))
        );
        assert_eq!(close::reconnect_window(&[0xff, 0xfe]), None);
    }
}
