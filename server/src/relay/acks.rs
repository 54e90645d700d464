//! The rule that groups agents' acknowledgements (and signed reports) into store
//! transactions, without I/O.
//!
//! Every link hands its acknowledgements to one relay-wide writer, and its reports
//! (message receipts, block changes) to another. One transaction per record would cost
//! a broadcast to 100,000 agents 100,000 commits; instead a batch is whatever has queued
//! up while the previous batch was being written (at most [`ACK_BATCH`]), so a burst
//! costs a few commits and a lone record is written at once.
//!
//! [`Batches`] keeps that rule; `write_in_batches` in the relay only moves records from
//! the links' channel into it, runs the transaction it hands out on the blocking pool,
//! and reports back when it is done.

use std::collections::VecDeque;

use herald_shared::protocol::JobId;

/// An acknowledgement on its way to the store: (agent, job, refusal reason).
pub(crate) type AckRecord = (String, JobId, Option<String>);

/// A verified report on its way to the store, with who waits to hear how it fared.
#[derive(Debug)]
pub(crate) struct ReportRecord {
    /// The agent whose key verified it.
    pub(crate) agent_id: String,
    /// The report as signed (kept so anyone can verify it later).
    pub(crate) signed: herald_shared::message::SignedReport,
    /// What it says.
    pub(crate) report: herald_shared::message::Report,
    /// Told once the batch holding it is written.
    pub(crate) done: tokio::sync::oneshot::Sender<ReportOutcome>,
}

/// How a report fared in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ReportOutcome {
    /// Committed (or kept before: reports are stored idempotently).
    Stored,
    /// Refused for good (a receipt for a message the agent was never sent): resending
    /// it would change nothing, so it is acknowledged all the same.
    Dropped(String),
    /// The store failed; the agent keeps it and sends it again on its next connection.
    Failed(String),
}

/// Most records committed in one transaction.
pub(crate) const ACK_BATCH: usize = 4096;

/// Records waiting for the store, and whether a batch is being written.
#[derive(Debug)]
pub(crate) struct Batches<T> {
    waiting: VecDeque<T>,
    writing: bool,
}

/// Acknowledgements waiting for the store.
#[cfg(test)]
pub(crate) type AckBatches = Batches<AckRecord>;

impl<T> Default for Batches<T> {
    fn default() -> Self {
        Batches {
            waiting: VecDeque::new(),
            writing: false,
        }
    }
}

// === impl Batches ===

impl<T> Batches<T> {
    /// A record arrived from a link.
    pub(crate) fn handle_ack(&mut self, record: T) {
        self.waiting.push_back(record);
    }

    /// The batch handed out last is written (committed or failed).
    pub(crate) fn handle_written(&mut self) {
        self.writing = false;
    }

    /// The next batch to write: everything waiting, up to [`ACK_BATCH`], oldest first;
    /// none while the previous batch is still being written.
    pub(crate) fn poll_batch(&mut self) -> Option<Vec<T>> {
        if self.writing || self.waiting.is_empty() {
            return None;
        }
        let take = self.waiting.len().min(ACK_BATCH);
        let batch: Vec<T> = self.waiting.drain(..take).collect();
        if self.waiting.is_empty() {
            // A broadcast's burst does not stay allocated.
            self.waiting = VecDeque::new();
        }
        self.writing = true;
        Some(batch)
    }

    /// Whether nothing waits and nothing is being written.
    pub(crate) fn is_idle(&self) -> bool {
        !self.writing && self.waiting.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(job_id: JobId) -> AckRecord {
        (format!("agent-{job_id}"), job_id, None)
    }

    fn ids(batch: &[AckRecord]) -> Vec<JobId> {
        batch.iter().map(|(_, id, _)| *id).collect()
    }

    #[test]
    fn a_lone_ack_is_written_at_once() {
        let mut acks = AckBatches::default();
        assert!(acks.poll_batch().is_none());
        acks.handle_ack(record(1));
        assert_eq!(ids(&acks.poll_batch().expect("a batch")), [1]);
        acks.handle_written();
        assert!(acks.is_idle());
    }

    #[test]
    fn acks_arriving_during_a_write_go_out_together_in_the_next_batch() {
        let mut acks = AckBatches::default();
        acks.handle_ack(record(1));
        let first = acks.poll_batch().expect("first batch");
        assert_eq!(ids(&first), [1]);
        for id in 2..=5 {
            acks.handle_ack(record(id));
            // Nothing more until the first batch is written.
            assert!(acks.poll_batch().is_none());
        }
        assert!(!acks.is_idle());
        acks.handle_written();
        assert_eq!(ids(&acks.poll_batch().expect("second batch")), [2, 3, 4, 5]);
        assert!(acks.poll_batch().is_none());
    }

    #[test]
    fn a_batch_holds_at_most_ack_batch_records_in_arrival_order() {
        let mut acks = AckBatches::default();
        let total = ACK_BATCH as JobId + 10;
        for id in 0..total {
            acks.handle_ack(record(id));
        }
        let first = acks.poll_batch().expect("first batch");
        assert_eq!(first.len(), ACK_BATCH);
        assert_eq!(ids(&first[..3]), [0, 1, 2]);
        acks.handle_written();
        let rest = acks.poll_batch().expect("the rest");
        assert_eq!(ids(&rest), (ACK_BATCH as JobId..total).collect::<Vec<_>>());
        acks.handle_written();
        assert!(acks.is_idle());
    }

    #[test]
    fn duplicate_and_stray_acks_are_kept_for_the_store_to_judge() {
        // The batch writer does not deduplicate: the store moves a job only from a
        // state the ack applies to, so a repeated ack is harmless there.
        let mut acks = AckBatches::default();
        acks.handle_ack(record(9));
        acks.handle_ack(record(9));
        assert_eq!(ids(&acks.poll_batch().expect("a batch")), [9, 9]);
    }
}
