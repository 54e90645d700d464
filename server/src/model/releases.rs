//! Software distribution in the store: vendors (operator delegations), releases (vendor-
//! signed metadata plus the artifact's state), package subscriptions (operator-signed
//! standing install orders) and rollouts (waves of install jobs with a failure threshold).
//!
//! The server never signs anything here; it records what the operator and vendors
//! signed, decides *when* each agent gets an install job, and halts a rollout whose
//! failures pass the subscription's threshold.

use herald_shared::protocol::JobId;
use herald_shared::Millis;
use serde::{Deserialize, Serialize};

/// A registered vendor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VendorInfo {
    /// Vendor name.
    pub name: String,
    /// Public key (hex).
    pub public_key: String,
    /// Delegated package patterns.
    pub packages: Vec<String>,
    /// When added.
    pub created_at: Millis,
}

/// A release as listed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReleaseInfo {
    /// Id.
    pub id: i64,
    /// Package name.
    pub package: String,
    /// Version.
    pub version: String,
    /// Platform.
    pub platform: String,
    /// Signing vendor (`None`: the operator).
    pub vendor: Option<String>,
    /// Artifact SHA-256 (hex).
    pub sha256: String,
    /// Artifact length.
    pub length: u64,
    /// External URL, if any.
    pub url: Option<String>,
    /// Metadata expiry.
    pub expires_at: Millis,
    /// `uploading` or `published`.
    pub state: String,
    /// When it was registered.
    pub created_at: Millis,
    /// When the artifact became available.
    pub published_at: Option<Millis>,
}

/// A package subscription.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubscriptionInfo {
    /// Id.
    pub id: i64,
    /// Package.
    pub package: String,
    /// Target (`agent:`, `group:`, `all`).
    pub target: String,
    /// Wave plan.
    pub waves: String,
    /// Failure fraction that halts a rollout.
    pub max_failures: f64,
    /// TTL of each install job.
    pub ttl_ms: u64,
    /// When created.
    pub created_at: Millis,
}

/// One agent's part in a rollout.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RolloutTarget {
    /// Agent id.
    pub agent_id: String,
    /// Wave it belongs to (0 = canary).
    pub wave: usize,
    /// Its job, once its wave started.
    pub job_id: Option<JobId>,
    /// The job's state (`waiting` before its wave).
    pub state: String,
    /// Latest progress report.
    pub progress: Option<String>,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

/// A rollout with its counts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RolloutInfo {
    /// Id.
    pub id: i64,
    /// Package.
    pub package: String,
    /// Version.
    pub version: String,
    /// Platform.
    pub platform: String,
    /// Subscription it serves.
    pub subscription_id: i64,
    /// `running`, `paused`, `halted`, `completed` or `superseded`.
    pub state: String,
    /// Current wave (0 = canary).
    pub wave: usize,
    /// Cumulative target counts at the end of each wave.
    pub wave_ends: Vec<usize>,
    /// Why it halted.
    pub reason: Option<String>,
    /// Targets that succeeded.
    pub succeeded: usize,
    /// Targets that failed (any final state but success).
    pub failed: usize,
    /// Targets with a job still under way.
    pub in_progress: usize,
    /// Targets whose wave has not started.
    pub waiting: usize,
    /// Every target.
    pub targets: Vec<RolloutTarget>,
    /// When created.
    pub created_at: Millis,
    /// Last state change.
    pub updated_at: Millis,
}

/// A wave plan: the first entry is usually a canary count, the rest percentages of all
/// targets, cumulative (`1,10%,50%,100%`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waves(Vec<WaveStep>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WaveStep {
    Count(usize),
    Percent(u8),
}

impl std::str::FromStr for Waves {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let bad = |part: &str| {
            format!(
                "invalid wave {part:?} in {s:?}: use counts and percentages, e.g. 1,10%,50%,100%"
            )
        };
        let mut steps = Vec::new();
        for part in s.split(',').map(str::trim) {
            let step = match part.strip_suffix('%') {
                Some(p) => match p.parse::<u8>() {
                    Ok(p) if (1..=100).contains(&p) => WaveStep::Percent(p),
                    _ => return Err(bad(part)),
                },
                None => match part.parse::<usize>() {
                    Ok(n) if n > 0 => WaveStep::Count(n),
                    _ => return Err(bad(part)),
                },
            };
            steps.push(step);
        }
        if steps.is_empty() || steps.len() > 20 {
            return Err(format!("invalid waves {s:?}: give 1 to 20 steps"));
        }
        Ok(Waves(steps))
    }
}

impl std::fmt::Display for Waves {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|s| match s {
                WaveStep::Count(n) => n.to_string(),
                WaveStep::Percent(p) => format!("{p}%"),
            })
            .collect();
        f.write_str(&parts.join(","))
    }
}

impl Waves {
    /// Cumulative target counts at the end of each wave for `total` targets: never
    /// decreasing, empty waves dropped, and the last one always covers everyone.
    pub fn ends(&self, total: usize) -> Vec<usize> {
        let mut ends: Vec<usize> = Vec::new();
        for step in &self.0 {
            let end = match *step {
                WaveStep::Count(n) => n.min(total),
                WaveStep::Percent(p) => (total * p as usize).div_ceil(100),
            };
            if end > ends.last().copied().unwrap_or(0) {
                ends.push(end);
            }
        }
        if ends.last().copied().unwrap_or(0) < total {
            ends.push(total);
        }
        ends
    }
}

/// What a rollout step decided, for logging and poking agents.
#[derive(Debug, Default)]
pub struct Advance {
    /// Agents that got new jobs.
    pub poke: Vec<String>,
    /// Rollouts that halted, with the reason.
    pub halted: Vec<(i64, String)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waves_are_cumulative_and_cover_everyone() {
        let waves: Waves = "1,10%,50%,100%".parse().unwrap();
        assert_eq!(waves.ends(100), vec![1, 10, 50, 100]);
        assert_eq!(waves.ends(3), vec![1, 2, 3]);
        assert_eq!(waves.ends(1), vec![1]);
        assert_eq!(waves.ends(0), Vec::<usize>::new());
        let partial: Waves = "2,50%".parse().unwrap();
        assert_eq!(partial.ends(10), vec![2, 5, 10]);
        assert_eq!(waves.to_string(), "1,10%,50%,100%");
    }

    #[test]
    fn bad_waves_are_refused() {
        for bad in ["", "0", "1,0%", "101%", "x", "1,,2"] {
            assert!(bad.parse::<Waves>().is_err(), "{bad:?}");
        }
    }
}
