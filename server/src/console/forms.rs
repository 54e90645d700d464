//! Reading what people type into the console's forms: the timing of a subscription
//! (`every`, `cron`, `once`). Pure functions, time passed in, errors as one sentence to
//! show above the form. Contact details and forwarding targets are checked by
//! `crate::forward::check_target`, the same rule the forwarding engine applies.

use std::time::Duration;

use serde::Deserialize;

use herald_shared::schedule::{self, Missed, Schedule};
use herald_shared::Millis;

use crate::model::Subscription;

/// Default interval offered for a new subscription.
const DEFAULT_EVERY: Duration = Duration::from_secs(3600);
/// Fire times examined when checking a cron expression against a minimum interval.
const CRON_PROBES: usize = 64;

/// The timing fields of the subscribe and edit forms.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default)]
pub(crate) struct TimingForm {
    /// `every`, `cron` or `once`.
    pub(crate) kind: String,
    /// Interval, e.g. `10s`, `5m`.
    pub(crate) every: String,
    /// Cron expression.
    pub(crate) cron: String,
    /// Time zone of `cron` and `at`.
    pub(crate) tz: String,
    /// `YYYY-MM-DDTHH:MM` in `tz`.
    pub(crate) at: String,
    /// `skip` or `run-once`.
    pub(crate) missed: String,
}

/// A parsed timing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Timing {
    /// When it fires.
    pub(crate) schedule: Schedule,
    /// Missed-run policy.
    pub(crate) missed: Missed,
    /// The first firing.
    pub(crate) next_fire_at: Option<Millis>,
}

impl TimingForm {
    /// The form for a new subscription to an entry with this minimum interval.
    pub(crate) fn new_for(min_interval_ms: u64) -> TimingForm {
        let every = DEFAULT_EVERY.max(Duration::from_millis(min_interval_ms));
        TimingForm {
            kind: "every".into(),
            every: schedule::format_duration(every),
            cron: String::new(),
            tz: "UTC".into(),
            at: String::new(),
            missed: "skip".into(),
        }
    }

    /// The form filled with a subscription's current timing.
    pub(crate) fn of(subscription: &Subscription) -> TimingForm {
        let mut form = TimingForm::new_for(0);
        form.missed = subscription.missed.to_string();
        match &subscription.schedule {
            Schedule::Every { interval_ms, .. } => {
                form.every = schedule::format_duration(Duration::from_millis(*interval_ms));
            }
            Schedule::Cron { expr, tz } => {
                form.kind = "cron".into();
                form.cron = expr.clone();
                form.tz = tz.clone();
            }
            Schedule::At { at } => {
                form.kind = "once".into();
                form.at = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(*at)
                    .map(|t| t.format("%Y-%m-%dT%H:%M").to_string())
                    .unwrap_or_default();
            }
        }
        form
    }

    /// Parses the timing. `every` may not be shorter than `min_interval_ms` (the
    /// catalog entry's signed minimum), nor may a cron expression fire more often.
    pub(crate) fn parse(&self, min_interval_ms: u64, now: Millis) -> Result<Timing, String> {
        let tz = match self.tz.trim() {
            "" => "UTC",
            tz => tz,
        };
        let missed = match self.missed.trim() {
            "" => Missed::Skip,
            text => text
                .parse()
                .map_err(|e: schedule::ScheduleError| e.to_string())?,
        };
        let too_often = || {
            format!(
                "this service may run at most once every {}; choose a longer interval",
                schedule::format_duration(Duration::from_millis(min_interval_ms))
            )
        };
        let schedule = match self.kind.trim() {
            "every" => {
                let interval = schedule::parse_duration(&self.every).map_err(|e| e.to_string())?;
                if interval.as_millis() < u128::from(min_interval_ms) {
                    return Err(too_often());
                }
                Schedule::every(interval, now).map_err(|e| e.to_string())?
            }
            "cron" => {
                if self.cron.trim().is_empty() {
                    return Err("enter a cron expression, e.g. 0 3 * * *".into());
                }
                let schedule = Schedule::cron(&self.cron, tz).map_err(|e| e.to_string())?;
                if shortest_gap(&schedule, now).is_some_and(|gap| gap < min_interval_ms as i64) {
                    return Err(too_often());
                }
                schedule
            }
            "once" => {
                if self.at.trim().is_empty() {
                    return Err("enter the date and time to run at".into());
                }
                schedule::check_zone(tz).map_err(|e| e.to_string())?;
                let at = schedule::parse_time(&self.at, tz, now).map_err(|e| e.to_string())?;
                if at <= now {
                    return Err("that time has passed; choose a time in the future".into());
                }
                Schedule::at(at)
            }
            _ => return Err("choose how often: every, cron or once".into()),
        };
        let next_fire_at = schedule.next_after(now - 1);
        Ok(Timing {
            schedule,
            missed,
            next_fire_at,
        })
    }
}

/// The shortest time between consecutive firings among the next few.
fn shortest_gap(schedule: &Schedule, now: Millis) -> Option<i64> {
    let mut previous = schedule.next_after(now)?;
    let mut shortest: Option<i64> = None;
    for _ in 0..CRON_PROBES {
        let Some(next) = schedule.next_after(previous) else {
            break;
        };
        let gap = next - previous;
        shortest = Some(shortest.map_or(gap, |s| s.min(gap)));
        previous = next;
    }
    shortest
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Millis = 1_800_000_000_000;

    fn form(kind: &str) -> TimingForm {
        TimingForm {
            kind: kind.into(),
            tz: "UTC".into(),
            ..TimingForm::default()
        }
    }

    #[test]
    fn every_parses_and_respects_the_minimum_interval() {
        let mut f = form("every");
        f.every = "5m".into();
        let timing = f.parse(60_000, NOW).unwrap();
        assert_eq!(
            timing.schedule,
            Schedule::every(Duration::from_secs(300), NOW).unwrap()
        );
        assert_eq!(timing.next_fire_at, Some(NOW + 300_000));
        assert_eq!(timing.missed, Missed::Skip);
        f.every = "30s".into();
        let err = f.parse(60_000, NOW).unwrap_err();
        assert!(err.contains("at most once every 1m"), "{err}");
        f.every = "soon".into();
        assert!(f.parse(0, NOW).is_err());
        f.every = "500ms".into();
        assert!(
            f.parse(0, NOW).is_err(),
            "below the schedule's own 1s floor"
        );
    }

    #[test]
    fn cron_is_checked_against_the_minimum_interval() {
        let mut f = form("cron");
        f.cron = "0 3 * * *".into();
        f.tz = "Europe/Berlin".into();
        let timing = f.parse(3_600_000, NOW).unwrap();
        assert_eq!(
            timing.schedule,
            Schedule::cron("0 3 * * *", "Europe/Berlin").unwrap()
        );
        assert!(timing.next_fire_at.unwrap() > NOW);
        f.cron = "* * * * *".into();
        assert!(f
            .parse(3_600_000, NOW)
            .unwrap_err()
            .contains("at most once every 1h"));
        assert!(f.parse(60_000, NOW).is_ok());
        f.cron = "not cron".into();
        assert!(f.parse(0, NOW).is_err());
        f.cron = "0 3 * * *".into();
        f.tz = "Mars/Olympus".into();
        assert!(f.parse(0, NOW).unwrap_err().contains("time zone"));
    }

    #[test]
    fn once_takes_a_local_time_in_the_zone_and_refuses_the_past() {
        let mut f = form("once");
        f.at = "2030-01-01T10:00".into();
        f.tz = "Europe/Berlin".into();
        let timing = f.parse(0, NOW).unwrap();
        // 10:00 in Berlin in winter is 09:00 UTC.
        let expected = chrono::DateTime::parse_from_rfc3339("2030-01-01T09:00:00Z")
            .unwrap()
            .timestamp_millis();
        assert_eq!(timing.schedule, Schedule::at(expected));
        assert_eq!(timing.next_fire_at, Some(expected));
        f.at = "2020-01-01T10:00".into();
        assert!(f.parse(0, NOW).unwrap_err().contains("passed"));
        f.at = String::new();
        assert!(f.parse(0, NOW).is_err());
    }

    #[test]
    fn missed_policy_and_kind_are_validated() {
        let mut f = form("every");
        f.every = "1h".into();
        f.missed = "run-once".into();
        assert_eq!(f.parse(0, NOW).unwrap().missed, Missed::RunOnce);
        f.missed = "sometimes".into();
        assert!(f.parse(0, NOW).is_err());
        assert!(form("weekly").parse(0, NOW).is_err());
    }

    #[test]
    fn a_subscription_form_round_trips_its_timing() {
        let mut f = form("cron");
        f.cron = "*/5 * * * *".into();
        f.missed = "run-once".into();
        let timing = f.parse(0, NOW).unwrap();
        let sub = Subscription {
            id: 1,
            owner_user_id: 1,
            owner_login: "ann".into(),
            entry: "scan".into(),
            entry_title: "Scan".into(),
            kind: "run".into(),
            target: "all".into(),
            agent_name: None,
            when: String::new(),
            schedule: timing.schedule.clone(),
            missed: timing.missed,
            next_fire_at: None,
            created_at: 0,
        };
        let again = TimingForm::of(&sub).parse(0, NOW).unwrap();
        assert_eq!(again.schedule, timing.schedule);
        assert_eq!(again.missed, Missed::RunOnce);
    }
}
