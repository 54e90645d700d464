//! A job's life as a typed state machine. The store keeps the state as text; this enum
//! is the one mapping between the two (`as_str` / `FromStr`), and `may_become` is the
//! one table of legal transitions, which the store's updates are built from.
//!
//! ```text
//! queued ──ack──> delivered ──started──> running ──result──> succeeded | failed |
//!   │  \             │    \                 │                timed_out | refused |
//!   │   \refused     │     \result          │ (browser page)   interrupted
//!   │    v           v      v               v
//!   │  refused     refused  final         waiting ──visit/deadline──> succeeded |
//!   │                                                                  failed | timed_out
//!   ├──TTL──> expired ──late result──> final (the agent did run it)
//!   └──cancel / revoke (from any open state)──> canceled
//! ```

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Committed, waiting for its agent.
    Queued,
    /// The agent acknowledged it (stored in its journal).
    Delivered,
    /// The agent started it.
    Running,
    /// A browser service page was opened; waiting for the person's outcome.
    Waiting,
    /// Finished with success.
    Succeeded,
    /// Finished with failure.
    Failed,
    /// Ran past its timeout (or the page was not completed in time).
    TimedOut,
    /// The agent refused the order (signature, audience, policy, replay).
    Refused,
    /// The agent stopped while it ran (crash, restart); not re-run.
    Interrupted,
    /// Its TTL passed before the agent took it.
    Expired,
    /// Canceled by an administrator or its owner, or its agent was revoked.
    Canceled,
}

/// A state change the table does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a job cannot go from {from} to {to}")]
pub struct IllegalTransition {
    /// The state it was in.
    pub from: JobState,
    /// The state asked for.
    pub to: JobState,
}

/// A state name that is not one of ours.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown job state {0:?}")]
pub struct UnknownState(pub String);

impl JobState {
    /// Every state, in the order of a job's life.
    pub const ALL: [JobState; 11] = [
        JobState::Queued,
        JobState::Delivered,
        JobState::Running,
        JobState::Waiting,
        JobState::Succeeded,
        JobState::Failed,
        JobState::TimedOut,
        JobState::Refused,
        JobState::Interrupted,
        JobState::Expired,
        JobState::Canceled,
    ];

    /// The states in which an agent's result is taken. Not `waiting`: a browser job's
    /// agent resends the result that put it there, and the person's outcome decides.
    pub const TAKES_RESULT: [JobState; 4] = [
        JobState::Queued,
        JobState::Delivered,
        JobState::Running,
        JobState::Expired,
    ];

    /// The states an agent's result may put a job in.
    pub const RESULTS: [JobState; 5] = [
        JobState::Succeeded,
        JobState::Failed,
        JobState::TimedOut,
        JobState::Refused,
        JobState::Interrupted,
    ];

    /// The stored name (also the JSON and CLI name).
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Delivered => "delivered",
            JobState::Running => "running",
            JobState::Waiting => "waiting",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::TimedOut => "timed_out",
            JobState::Refused => "refused",
            JobState::Interrupted => "interrupted",
            JobState::Expired => "expired",
            JobState::Canceled => "canceled",
        }
    }

    /// Nothing more will happen to the job (an expired job still takes a late result:
    /// see `may_become`).
    pub fn is_final(self) -> bool {
        !matches!(
            self,
            JobState::Queued | JobState::Delivered | JobState::Running | JobState::Waiting
        )
    }

    /// Whether a job in this state may move to `next`: the transition table.
    pub fn may_become(self, next: JobState) -> bool {
        use JobState::*;
        match (self, next) {
            (Queued, Delivered | Running | Expired | Canceled) => true,
            (Delivered, Running | Canceled) => true,
            (Running, Canceled) => true,
            (Waiting, Succeeded | Failed | TimedOut | Canceled) => true,
            // A refusal is an acknowledgement: it comes before anything started.
            (Queued | Delivered, Refused) => true,
            // A result: from any state before it, and for an expired job whose agent ran
            // it after all (it says so, with its output).
            (Queued | Delivered | Running | Expired, Waiting) => true,
            (Queued | Delivered | Running | Expired, next) => JobState::RESULTS.contains(&next),
            _ => false,
        }
    }

    /// Moves to `next` if the table allows it.
    pub fn transition(self, next: JobState) -> Result<JobState, IllegalTransition> {
        if self.may_become(next) {
            Ok(next)
        } else {
            Err(IllegalTransition {
                from: self,
                to: next,
            })
        }
    }

    /// The states from which a job may move to `next`, as an SQL list
    /// (`'queued', 'delivered'`) for the store's guarded updates.
    pub fn sql_sources(next: JobState) -> String {
        JobState::ALL
            .iter()
            .filter(|from| from.may_become(next))
            .map(|from| format!("'{}'", from.as_str()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The open (not final) states as an SQL list.
    pub fn sql_open() -> String {
        let open: Vec<JobState> = JobState::ALL
            .into_iter()
            .filter(|s| !s.is_final())
            .collect();
        JobState::sql_list(&open)
    }

    /// States as an SQL list: `'queued', 'delivered'`.
    pub fn sql_list(states: &[JobState]) -> String {
        states
            .iter()
            .map(|s| format!("'{}'", s.as_str()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = UnknownState;

    fn from_str(s: &str) -> Result<JobState, UnknownState> {
        JobState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::JobState::{self, *};

    /// The whole table, row by row: from each state, the states it may move to.
    const TABLE: [(JobState, &[JobState]); 11] = [
        (
            Queued,
            &[
                Delivered,
                Running,
                Waiting,
                Succeeded,
                Failed,
                TimedOut,
                Refused,
                Interrupted,
                Expired,
                Canceled,
            ],
        ),
        (
            Delivered,
            &[
                Running,
                Waiting,
                Succeeded,
                Failed,
                TimedOut,
                Refused,
                Interrupted,
                Canceled,
            ],
        ),
        (
            Running,
            &[
                Waiting,
                Succeeded,
                Failed,
                TimedOut,
                Refused,
                Interrupted,
                Canceled,
            ],
        ),
        (Waiting, &[Succeeded, Failed, TimedOut, Canceled]),
        (Succeeded, &[]),
        (Failed, &[]),
        (TimedOut, &[]),
        (Refused, &[]),
        (Interrupted, &[]),
        (
            Expired,
            &[Waiting, Succeeded, Failed, TimedOut, Refused, Interrupted],
        ),
        (Canceled, &[]),
    ];

    #[test]
    fn the_transition_table_is_exactly_this() {
        for (from, allowed) in TABLE {
            for to in JobState::ALL {
                let legal = allowed.contains(&to);
                assert_eq!(from.may_become(to), legal, "{from} -> {to}");
                match from.transition(to) {
                    Ok(next) => assert!(legal && next == to, "{from} -> {to}"),
                    Err(e) => assert!(!legal && e.from == from && e.to == to, "{from} -> {to}"),
                }
            }
        }
    }

    #[test]
    fn final_states_go_nowhere_but_an_expired_job_takes_a_late_result() {
        for state in JobState::ALL {
            if state.is_final() && state != Expired {
                assert!(
                    JobState::ALL.iter().all(|to| !state.may_become(*to)),
                    "{state}"
                );
            }
        }
        assert!(Expired.is_final());
        assert!(Expired.may_become(Succeeded));
        assert!(!Expired.may_become(Queued));
    }

    #[test]
    fn names_round_trip_and_unknown_names_are_errors() {
        for state in JobState::ALL {
            assert_eq!(state.as_str().parse::<JobState>(), Ok(state));
            let json = serde_json::to_string(&state).expect("serializes");
            assert_eq!(json, format!("\"{}\"", state.as_str()));
        }
        assert!("done".parse::<JobState>().is_err());
        assert!("Queued".parse::<JobState>().is_err());
    }

    #[test]
    fn a_result_is_taken_only_where_the_table_allows_it() {
        for from in JobState::TAKES_RESULT {
            for to in JobState::RESULTS {
                assert!(from.may_become(to), "{from} -> {to}");
            }
        }
        assert!(!JobState::TAKES_RESULT.contains(&Waiting));
    }

    #[test]
    fn sql_lists_follow_the_table() {
        assert_eq!(JobState::sql_sources(Delivered), "'queued'");
        assert_eq!(JobState::sql_sources(Running), "'queued', 'delivered'");
        assert_eq!(
            JobState::sql_sources(Succeeded),
            "'queued', 'delivered', 'running', 'waiting', 'expired'"
        );
        assert_eq!(
            JobState::sql_open(),
            "'queued', 'delivered', 'running', 'waiting'"
        );
    }
}
