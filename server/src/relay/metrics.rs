//! The relay's side of `/metrics`: why agents' connection attempts failed, counted by
//! reason, and [`Relay::metrics_text`], the whole exposition (the relay's counters, the
//! store's counts and commit latency, the build) that the admin API and the separate
//! metrics listener both serve.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::metrics::{self, Kind};
use crate::model::JobState;
use crate::store::{Counts, StoreError};

use super::Relay;

/// Why an agent's connection attempt failed before it was admitted (or enrolled).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Refused at once: too many handshakes were in progress.
    Overload,
    /// The TLS handshake, or the agent's first message, did not come in time.
    Timeout,
    /// The client certificate is unusable (not an Ed25519 key, a bad signature, none).
    BadCertificate,
    /// The agent's key was revoked.
    Revoked,
    /// A key that was never enrolled said `Hello`.
    UnknownAgent,
    /// Another QUIC or Herald protocol version.
    Version,
    /// An enrollment was refused (bad, used-up or expired token; already enrolled; too
    /// many failures from the address).
    Enrollment,
    /// The first message broke the protocol.
    Protocol,
    /// Anything else: the client gave up or reset, or refused our certificate.
    Other,
}

impl Refusal {
    /// Every reason, in the order `/metrics` lists them.
    const ALL: [Refusal; 9] = [
        Refusal::Overload,
        Refusal::Timeout,
        Refusal::BadCertificate,
        Refusal::Revoked,
        Refusal::UnknownAgent,
        Refusal::Version,
        Refusal::Enrollment,
        Refusal::Protocol,
        Refusal::Other,
    ];

    /// The `reason` label.
    fn as_str(self) -> &'static str {
        match self {
            Refusal::Overload => "overload",
            Refusal::Timeout => "timeout",
            Refusal::BadCertificate => "bad_certificate",
            Refusal::Revoked => "revoked",
            Refusal::UnknownAgent => "unknown_agent",
            Refusal::Version => "version",
            Refusal::Enrollment => "enrollment",
            Refusal::Protocol => "protocol",
            Refusal::Other => "other",
        }
    }

    /// Why a QUIC handshake failed.
    pub(crate) fn of_handshake(error: &quinn::ConnectionError) -> Refusal {
        use quinn::ConnectionError as E;
        match error {
            E::TimedOut => Refusal::Timeout,
            E::VersionMismatch => Refusal::Version,
            E::TransportError(e) => Refusal::of_transport_error(e.code.into()),
            _ => Refusal::Other,
        }
    }

    /// Why we closed a handshake with this transport error code. Our certificate
    /// verifier's refusals reach us as TLS alerts, which QUIC carries as error
    /// 0x100 + alert (RFC 9001, 4.8): `certificate_revoked` for a revoked key, another
    /// alert for a certificate we cannot use.
    fn of_transport_error(code: u64) -> Refusal {
        /// TLS `certificate_revoked` (RFC 8446, 6.2).
        const CERTIFICATE_REVOKED: u64 = 0x100 + 44;
        match code {
            CERTIFICATE_REVOKED => Refusal::Revoked,
            0x100..=0x1ff => Refusal::BadCertificate,
            _ => Refusal::Other,
        }
    }
}

/// Failed connection attempts per [`Refusal`], since the server started.
#[derive(Debug, Default)]
pub(crate) struct Refusals([AtomicU64; Refusal::ALL.len()]);

impl Refusals {
    /// Counts one failed attempt.
    pub(crate) fn add(&self, reason: Refusal) {
        self.0[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, text: &mut String) {
        let counts: Vec<[(&str, &str); 1]> = Refusal::ALL
            .iter()
            .map(|r| [("reason", r.as_str())])
            .collect();
        metrics::family(
            text,
            "herald_agent_handshake_failures_total",
            Kind::Counter,
            "Agent connection attempts that failed before the agent was admitted or enrolled, by reason.",
            counts
                .iter()
                .zip(&self.0)
                .map(|(labels, n)| (&labels[..], n.load(Ordering::Relaxed))),
        );
    }
}

impl Relay {
    /// The whole `/metrics` exposition in Prometheus text format.
    pub fn metrics_text(&self) -> Result<String, StoreError> {
        let counts = {
            let mut tally = self.tally.lock().unwrap_or_else(|e| e.into_inner());
            self.store.counts(&mut tally, crate::now_ms())?
        };
        let enrolled = self.store.enrolled_count()?;
        let mut text = String::new();
        metrics::build_info(&mut text);
        metrics::single(
            &mut text,
            "herald_agents_connected",
            Kind::Gauge,
            "Agents connected now.",
            self.online_count() as u64,
        );
        metrics::single(
            &mut text,
            "herald_agents_enrolled",
            Kind::Gauge,
            "Agents enrolled and not revoked.",
            enrolled,
        );
        render_counts(&mut text, &counts);
        self.store.commit_latency().render(
            &mut text,
            "herald_db_commit_seconds",
            "Time a durable (synchronous=FULL) database commit takes, from its start until its write-ahead log is synced.",
        );
        self.render_metrics(&mut text);
        Ok(text)
    }

    /// Appends the relay's own metrics in Prometheus text format: handshake failures
    /// and the signal round trip.
    pub fn render_metrics(&self, text: &mut String) {
        self.refusals.render(text);
        self.signal_rtt.render(
            text,
            "herald_signal_ack_seconds",
            "Relay round trip: a signal handed to QUIC until the agent's acknowledgement is read.",
        );
    }
}

/// The store's counts. Every job state is listed, at zero when no job is in it, so an
/// alert on a state has a series from the start; other labels are what the database
/// holds.
fn render_counts(text: &mut String, counts: &Counts) {
    let jobs: Vec<([(&str, &str); 1], u64)> = JobState::ALL
        .iter()
        .map(|state| {
            let n = counts
                .jobs
                .iter()
                .find(|(s, _)| s == state.as_str())
                .map_or(0, |(_, n)| *n);
            ([("state", state.as_str())], n)
        })
        .chain(
            // A state this server does not know (written by another version).
            counts
                .jobs
                .iter()
                .filter(|(s, _)| s.parse::<JobState>().is_err())
                .map(|(s, n)| ([("state", s.as_str())], *n)),
        )
        .collect();
    metrics::family(
        text,
        "herald_jobs",
        Kind::Gauge,
        "Jobs in the database by state (push-message deliveries included).",
        jobs.iter().map(|(l, n)| (&l[..], *n)),
    );
    one_label(
        text,
        "herald_messages",
        "Push messages in the database: live until they expire, then expired.",
        "state",
        &counts.messages,
    );
    one_label(
        text,
        "herald_message_receipts",
        "Message receipts devices reported, by state (stored, displayed, read, refused, expired).",
        "state",
        &counts.receipts,
    );
    two_labels(
        text,
        "herald_forwards",
        "Results forwarded to users' destinations, by medium and state (pending, sent, given_up); pruned with age.",
        ("medium", "state"),
        &counts.forwards,
    );
    two_labels(
        text,
        "herald_forward_attempts",
        "Forwarding attempts on record, by medium and result (ok, error); pruned with their forwards.",
        ("medium", "result"),
        &counts.forward_attempts,
    );
    two_labels(
        text,
        "herald_campaign_fallbacks",
        "Campaign fallbacks (SMS or e-mail to recipients the message did not reach), by medium and state.",
        ("medium", "state"),
        &counts.fallbacks,
    );
    one_label(
        text,
        "herald_rollouts",
        "Package rollouts by state.",
        "state",
        &counts.rollouts,
    );
    let meters: Vec<[(&str, &str); 1]> = counts
        .usage
        .iter()
        .map(|(meter, _)| [("meter", meter.as_str())])
        .collect();
    metrics::family(
        text,
        "herald_usage_events_total",
        Kind::Counter,
        "Usage events stored for billing, by meter (each counted once, however often it was sent).",
        meters
            .iter()
            .zip(&counts.usage)
            .map(|(l, (_, n))| (&l[..], *n)),
    );
}

fn one_label(text: &mut String, name: &str, help: &str, label: &str, rows: &[(String, u64)]) {
    let labels: Vec<[(&str, &str); 1]> = rows.iter().map(|(v, _)| [(label, v.as_str())]).collect();
    metrics::family(
        text,
        name,
        Kind::Gauge,
        help,
        labels.iter().zip(rows).map(|(l, (_, n))| (&l[..], *n)),
    );
}

fn two_labels(
    text: &mut String,
    name: &str,
    help: &str,
    (first, second): (&str, &str),
    rows: &[(String, String, u64)],
) {
    let labels: Vec<[(&str, &str); 2]> = rows
        .iter()
        .map(|(a, b, _)| [(first, a.as_str()), (second, b.as_str())])
        .collect();
    metrics::family(
        text,
        name,
        Kind::Gauge,
        help,
        labels.iter().zip(rows).map(|(l, (_, _, n))| (&l[..], *n)),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_job_state_is_listed_and_unknown_ones_kept() {
        let counts = Counts {
            jobs: vec![("succeeded".into(), 3), ("someday".into(), 1)],
            forwards: vec![("sms".into(), "sent".into(), 2)],
            ..Counts::default()
        };
        let mut text = String::new();
        render_counts(&mut text, &counts);
        assert!(text.contains("herald_jobs{state=\"queued\"} 0\n"), "{text}");
        assert!(
            text.contains("herald_jobs{state=\"succeeded\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("herald_jobs{state=\"someday\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("herald_forwards{medium=\"sms\",state=\"sent\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE herald_rollouts gauge\n"), "{text}");
    }

    #[test]
    fn handshake_errors_are_told_apart() {
        let tls = |alert| u64::from(quinn::TransportErrorCode::crypto(alert));
        assert_eq!(Refusal::of_transport_error(tls(44)), Refusal::Revoked);
        assert_eq!(
            Refusal::of_transport_error(tls(42)),
            Refusal::BadCertificate
        );
        assert_eq!(Refusal::of_transport_error(0x0a), Refusal::Other);
        assert_eq!(
            Refusal::of_handshake(&quinn::ConnectionError::TimedOut),
            Refusal::Timeout
        );
        assert_eq!(
            Refusal::of_handshake(&quinn::ConnectionError::Reset),
            Refusal::Other
        );
        let refusals = Refusals::default();
        refusals.add(Refusal::Revoked);
        refusals.add(Refusal::Revoked);
        let mut text = String::new();
        refusals.render(&mut text);
        assert!(
            text.contains("herald_agent_handshake_failures_total{reason=\"revoked\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("herald_agent_handshake_failures_total{reason=\"overload\"} 0\n"),
            "{text}"
        );
    }
}
