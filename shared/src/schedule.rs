//! Schedule expressions: when a schedule fires next. Pure: time is passed in.
//!
//! A [`Schedule`] is one of
//!
//! * **cron**: a standard cron expression evaluated on the wall clock of an
//!   IANA time zone (`"0 3 * * *"` in `Europe/Berlin`);
//! * **every**: a fixed interval counted from an anchor;
//! * **at**: a single instant.
//!
//! All instants are [`Millis`]: Unix time in milliseconds, UTC. Nothing in this
//! module reads the system clock; "now" is always an argument.
//!
//! # Cron syntax
//!
//! Parsing and wall-clock matching are done by the `croner` crate (4.x):
//! five fields `minute hour day-of-month month day-of-week`, or six with a
//! leading `second` field. Supported: `*`, lists `1,5`, ranges `1-5`, steps
//! `*/15` and `10-50/20`, month and weekday names (`JAN`, `MON`), `L` (last
//! day of month / last weekday `5#L`), `W` (nearest weekday), `#` (nth
//! weekday, `MON#2`), `?` (same as `*` in the day fields), and the nicknames
//! `@yearly`, `@annually`, `@monthly`, `@weekly`, `@daily`, `@hourly`. As in
//! Vixie cron, when both day-of-month and day-of-week are restricted a day
//! matches if *either* matches (prefix day-of-week with `+` to require both).
//! A year field (7 fields) is rejected, as are non-standard steps like `0/10`,
//! empty list items (`1,,2`) and partial names (croner alone would read
//! `JANFEB` as `12`). An expression that can never match (`0 0 30 2 *`) is
//! rejected when built. Errors name the offending field where one is to blame.
//!
//! Fire times have one-second resolution: a 5-field expression fires at second
//! `:00`.
//!
//! # Cron across daylight-saving changes
//!
//! A cron expression names wall-clock times; a DST change makes some wall-clock
//! times not exist (spring forward: a *gap*) and others exist twice (fall back:
//! an *overlap*). We follow the classic Vixie cron rules, which tell two kinds
//! of job apart by the minute and hour fields:
//!
//! * a **wildcard job** has a minute or hour field that starts with `*`
//!   (`*/15 * * * *`, `0 * * * *`, `30 */2 * * *`, `@hourly`). It runs on
//!   elapsed time: a wall-clock time inside a gap is simply skipped (it never
//!   happened), and a wall-clock time inside an overlap fires at **both**
//!   instants, so an hourly job keeps firing once per real hour.
//! * every other job is a **fixed-time job** (`30 2 * * *`, `0 1,2,3 * * *`,
//!   `0 9-17 * * MON-FRI`, `@daily`). It runs at most once per wall-clock time:
//!   * in a **gap**, a matching wall-clock time fires at the first instant
//!     after the gap (the moment the clock jumps). Several matching times in
//!     one gap collapse into that single firing, which also merges with a
//!     regular match at that same instant;
//!   * in an **overlap**, a matching wall-clock time fires once, at the
//!     **earlier** instant, and not again when the clock repeats it.
//!
//! The seconds field does not affect the classification.
//!
//! Examples, `Europe/Berlin` 2026 (all verified by the tests below):
//!
//! * `30 2 * * *` on 2026-03-29 (02:00 CET jumps to 03:00 CEST, 02:30 does not
//!   exist): fires at 03:00 CEST = `2026-03-29T01:00:00Z`, then next day at
//!   02:30 CEST = `2026-03-30T00:30:00Z`.
//! * `30 2 * * *` on 2026-10-25 (03:00 CEST falls back to 02:00 CET, 02:30
//!   occurs twice): fires once at 02:30 CEST = `2026-10-25T00:30:00Z`, not at
//!   02:30 CET (`01:30Z`); the next fire is `2026-10-26T01:30:00Z`.
//! * `0 * * * *` on 2026-10-25 fires at `00:00Z` (02:00 CEST), `01:00Z`
//!   (02:00 CET) and `02:00Z` (03:00 CET): once per real hour.
//!
//! **What croner itself does, and why we don't use it for zones.** croner's
//! zoned search (`find_next_occurrence` on a `DateTime<Tz>`) applies the same
//! two rules but classifies differently: a job is "fixed" only if the second,
//! minute and hour fields are each a *single* value. So `30 2,14 * * *` or
//! `0 1-3 * * *` count there as interval jobs: their 02:30 run is silently
//! dropped on spring-forward day and runs *twice* on fall-back day, which is
//! surprising for a "twice a day" job. We therefore use croner only to match
//! and step the **wall clock** (its `NaiveDateTime` search, which knows no
//! zones), and map each wall-clock match to instants here, with the Vixie
//! classification above. Fire times are defined as a *set* of instants and
//! [`Schedule::next_after`] returns the smallest member strictly after its
//! argument, so successive fire times strictly increase: they never go
//! backwards and never repeat, even while `after` lies inside an overlap.
//!
//! # Intervals and one-shots
//!
//! `Every { interval_ms, anchor }` fires at `anchor + k * interval_ms` for
//! k = 1, 2, 3, ... (the first firing is one interval after the anchor, which
//! is normally the creation time). `At { at }` fires once, at `at`.
//!
//! # Missed runs
//!
//! [`due`] decides, from the stored next fire time and "now", whether to fire
//! and what the new next fire time is; see [`Missed`].
//!
//! # Durations
//!
//! [`parse_duration`] reads every duration a user types (`1h30m`), and none is longer
//! than [`MAX_DURATION`] (366 days); [`deadline`] adds durations to a clock reading with
//! checked arithmetic, so expiry times can neither wrap nor mean "no limit".

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, LocalResult, NaiveDateTime, SecondsFormat, TimeDelta, TimeZone, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;
use serde::{Deserialize, Serialize};

/// Unix time in milliseconds, UTC.
pub use crate::Millis;

/// Shortest interval accepted for [`Schedule::Every`].
const MIN_INTERVAL_MS: u64 = 1_000;

/// Longest duration a user may give anywhere (`--timeout`, `--ttl`, `--every`, `--splay`,
/// `--valid`, `--expires`, `+DUR` times, ...): 366 days, which [`parse_duration`] enforces.
///
/// Why 366 days: the longest durations people give are validities, such as a catalog
/// entry's `--valid` (default `365d`) or a release's `--expires`, and "a year" has to fit
/// in a leap year too. Nothing Herald does needs a longer user-given span; what lives
/// longer (standing orders) gets its validity from a constant, not from input. A single
/// bound, far below the limits of the arithmetic, means every sum of a few durations
/// added to a real clock reading stays exact: 366 days is about 3.2 * 10^10 ms, while
/// `i64` milliseconds reach 9.2 * 10^18 (see [`deadline`]). Without it,
/// `--timeout 18446744073709551615ms` ran with no limit and
/// `--timeout 9223372036854775807ms` wrapped into a deadline in the past.
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 86_400);

/// [`MAX_DURATION`] as the user would write it, for error messages.
const MAX_DURATION_TEXT: &str = "366d";

/// [`MAX_DURATION`] in milliseconds (3.2 * 10^10: the cast cannot truncate).
const MAX_DURATION_MS: u64 = MAX_DURATION.as_millis() as u64;

/// Upper bound on wall-clock candidates examined by one cron search. Only
/// candidates that are not yet after `after` are re-examined, which happens
/// inside a DST overlap or gap, so real searches stay far below this.
const MAX_CRON_STEPS: u32 = 1_000_000;

/// When a schedule fires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Schedule {
    /// Standard cron expression (5 fields, or 6 with leading seconds) evaluated in an IANA time zone.
    Cron { expr: String, tz: String },
    /// Fixed interval, counted from an anchor (the time the schedule was created).
    Every { interval_ms: u64, anchor: Millis },
    /// Fire once at this instant.
    At { at: Millis },
}

impl Schedule {
    /// Validates and builds a cron schedule; error names what is wrong (bad field, unknown zone).
    ///
    /// Surrounding whitespace is trimmed from both arguments before storing.
    pub fn cron(expr: &str, tz: &str) -> Result<Schedule, ScheduleError> {
        let compiled = CompiledCron::new(expr, tz)?;
        compiled.check_fires(expr)?;
        Ok(Schedule::Cron {
            expr: expr.trim().to_string(),
            tz: tz.trim().to_string(),
        })
    }

    /// Builds an interval schedule. The interval must be at least one second and at most
    /// [`MAX_DURATION`]; sub-millisecond parts are dropped.
    pub fn every(interval: Duration, anchor: Millis) -> Result<Schedule, ScheduleError> {
        if interval > MAX_DURATION {
            return Err(ScheduleError::DurationTooLong {
                input: format_duration(interval),
            });
        }
        let interval_ms = interval.as_millis() as u64; // at most MAX_DURATION_MS: fits
        if interval_ms < MIN_INTERVAL_MS {
            return Err(ScheduleError::IntervalTooShort {
                interval: format_duration(interval),
            });
        }
        Ok(Schedule::Every {
            interval_ms,
            anchor,
        })
    }

    /// Builds a one-shot schedule.
    pub fn at(at: Millis) -> Schedule {
        Schedule::At { at }
    }

    /// The first fire time strictly after `after`, or None if it never fires again.
    ///
    /// An invalid schedule (e.g. loaded from storage and failing
    /// [`Schedule::validate`]) never fires and returns `None`.
    pub fn next_after(&self, after: Millis) -> Option<Millis> {
        match self {
            Schedule::Cron { expr, tz } => CompiledCron::new(expr, tz).ok()?.next_after(after),
            Schedule::Every {
                interval_ms,
                anchor,
            } => every_next_after(*interval_ms, *anchor, after),
            Schedule::At { at } => (*at > after).then_some(*at),
        }
    }

    /// Re-checks a schedule loaded from storage (cron parses, zone exists).
    pub fn validate(&self) -> Result<(), ScheduleError> {
        match self {
            Schedule::Cron { expr, tz } => CompiledCron::new(expr, tz)?.check_fires(expr),
            Schedule::Every { interval_ms, .. } => {
                if *interval_ms < MIN_INTERVAL_MS {
                    Err(ScheduleError::IntervalTooShort {
                        interval: format_duration(Duration::from_millis(*interval_ms)),
                    })
                } else {
                    Ok(())
                }
            }
            Schedule::At { .. } => Ok(()),
        }
    }

    /// Short human text, e.g. "every 10s", "cron '0 3 * * *' Europe/Berlin", "at 2026-11-23T10:00:00Z".
    pub fn describe(&self) -> String {
        match self {
            Schedule::Cron { expr, tz } => format!("cron '{expr}' {tz}"),
            Schedule::Every { interval_ms, .. } => {
                format!(
                    "every {}",
                    format_duration(Duration::from_millis(*interval_ms))
                )
            }
            Schedule::At { at } => format!("at {}", format_time(*at)),
        }
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// What to do about occurrences missed while the server was down or the agent offline.
///
/// Text form (`Display`, `FromStr`, serde): `skip`, `run-once`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Missed {
    /// Drop missed occurrences; fire only if the latest one is still within the grace period.
    Skip,
    /// Fire once for any number of missed occurrences.
    RunOnce,
}

impl fmt::Display for Missed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Missed::Skip => "skip",
            Missed::RunOnce => "run-once",
        })
    }
}

impl FromStr for Missed {
    type Err = ScheduleError;

    /// Accepts `skip` and `run-once` (case-insensitive; `run_once` too).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let norm = s.trim().to_ascii_lowercase().replace('_', "-");
        match norm.as_str() {
            "skip" => Ok(Missed::Skip),
            "run-once" => Ok(Missed::RunOnce),
            _ => Err(ScheduleError::UnknownMissedPolicy {
                input: s.to_string(),
            }),
        }
    }
}

/// Given the stored next fire time and "now", decide what firing to do:
/// returns `(fire_now: bool, next_fire_at: Option<Millis>)`. If one or more occurrences <= now were missed,
/// RunOnce fires once (coalesced) and Skip fires only if the most recent missed occurrence is within
/// `grace_ms` of now (i.e. it is just "due", not "missed"); either way next_fire_at is the first occurrence strictly after now.
///
/// If `stored_next > now` nothing is due and `(false, Some(stored_next))` is returned.
/// `stored_next` itself counts as an occurrence. A negative `grace_ms` is treated as 0.
pub fn due(
    schedule: &Schedule,
    stored_next: Millis,
    now: Millis,
    missed: Missed,
    grace_ms: i64,
) -> (bool, Option<Millis>) {
    if stored_next > now {
        return (false, Some(stored_next));
    }
    let fire = match missed {
        Missed::RunOnce => true,
        Missed::Skip => {
            let window_start = now.saturating_sub(grace_ms.max(0));
            stored_next >= window_start
                || schedule
                    .next_after(window_start.saturating_sub(1))
                    .is_some_and(|t| t >= window_start && t <= now)
        }
    };
    (fire, schedule.next_after(now))
}

/// Parses durations like "500ms", "10s", "5m", "1h30m", "2d", "1w"; rejects empty input,
/// garbage and anything longer than [`MAX_DURATION`] (366 days), with a clear error.
///
/// Units: `w` (7 days), `d`, `h`, `m`, `s`, `ms`; each may appear once,
/// largest first, each with a whole number (`1h30m`, not `1.5h` or `30m1h`).
/// `"0s"` parses to zero; [`Schedule::every`] is what rejects short intervals.
/// All arithmetic is checked, so no input can wrap around into a short duration.
pub fn parse_duration(s: &str) -> Result<Duration, ScheduleError> {
    let bad = |reason: String| ScheduleError::InvalidDuration {
        input: s.to_string(),
        reason,
    };
    let text = s.trim();
    if text.is_empty() {
        return Err(bad("it is empty".to_string()));
    }
    let mut rest = text;
    let mut total_ms: u64 = 0;
    let mut last_rank: Option<u8> = None;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            let found = rest.chars().next().unwrap_or(' ');
            return Err(bad(format!("expected a number at '{found}'")));
        }
        let (number, after_number) = rest.split_at(digits);
        let unit_len = after_number
            .bytes()
            .take_while(u8::is_ascii_alphabetic)
            .count();
        let (unit, after_unit) = after_number.split_at(unit_len);
        if unit.is_empty() {
            return Err(bad(match after_number.chars().next() {
                None => format!("'{number}' has no unit (use ms, s, m, h, d or w)"),
                Some('.') | Some(',') => {
                    "fractions are not supported: use a smaller unit (1h30m, 1500ms)".to_string()
                }
                Some(c) => format!("unexpected character '{c}' after '{number}'"),
            }));
        }
        let (rank, unit_ms): (u8, u64) = match unit {
            "w" => (0, 7 * 86_400_000),
            "d" => (1, 86_400_000),
            "h" => (2, 3_600_000),
            "m" => (3, 60_000),
            "s" => (4, 1_000),
            "ms" => (5, 1),
            other => {
                return Err(bad(format!(
                    "unknown unit '{other}' (use ms, s, m, h, d or w)"
                )));
            }
        };
        if last_rank.is_some_and(|last| rank <= last) {
            return Err(bad(
                "each unit may appear once, largest first (e.g. 1h30m)".to_string()
            ));
        }
        last_rank = Some(rank);
        let too_long = || ScheduleError::DurationTooLong {
            input: s.to_string(),
        };
        // `number` is all ASCII digits, so parsing fails only beyond u64.
        let n: u64 = number.parse().map_err(|_| too_long())?;
        total_ms = n
            .checked_mul(unit_ms)
            .and_then(|part| total_ms.checked_add(part))
            .filter(|&total| total <= MAX_DURATION_MS)
            .ok_or_else(too_long)?;
        rest = after_unit;
    }
    Ok(Duration::from_millis(total_ms))
}

/// `now` plus the given durations, in milliseconds; `None` if the sum leaves the `i64`
/// range. The server CLI computes expiry times with this (`now + ttl + timeout + skew`),
/// so an oversized input is an error instead of a wrapped, past deadline. With parts
/// bounded by [`MAX_DURATION`] and a real clock, the answer is always `Some`.
pub fn deadline(now: Millis, parts: &[Duration]) -> Option<Millis> {
    parts.iter().try_fold(now, |at, part| {
        at.checked_add(i64::try_from(part.as_millis()).ok()?)
    })
}

/// Formats a duration compactly ("1h30m", "10s", "250ms").
///
/// Millisecond precision: zero is `"0s"`, a non-zero duration under 1ms is
/// `"<1ms"`. The output (other than `"<1ms"`) is accepted by [`parse_duration`].
pub fn format_duration(d: Duration) -> String {
    let mut ms = d.as_millis();
    if ms == 0 {
        return if d.is_zero() { "0s" } else { "<1ms" }.to_string();
    }
    let mut out = String::new();
    for (unit, unit_ms) in [
        ("w", 7 * 86_400_000u128),
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
        ("ms", 1),
    ] {
        let q = ms / unit_ms;
        if q > 0 {
            out.push_str(&format!("{q}{unit}"));
            ms %= unit_ms;
        }
    }
    out
}

/// Parses a time for `--at`: RFC 3339 ("2026-11-23T10:00:00Z", with offset), or `"YYYY-MM-DD HH:MM[:SS]"` / `"YYYY-MM-DDTHH:MM[:SS]"` interpreted in zone `tz` (IANA name), or "+DUR" meaning now + duration. Errors for nonexistent local times (DST gap); ambiguous local times take the earlier instant.
///
/// Local forms may carry fractional seconds (`10:00:00.250`). `tz` is only
/// looked at (and only rejected) for the local forms.
pub fn parse_time(s: &str, tz: &str, now: Millis) -> Result<Millis, ScheduleError> {
    let text = s.trim();
    let out_of_range = || ScheduleError::TimeOutOfRange {
        input: s.to_string(),
    };
    if let Some(rest) = text.strip_prefix('+') {
        let d = parse_duration(rest)?;
        let ms = i64::try_from(d.as_millis()).map_err(|_| out_of_range())?;
        let t = now.checked_add(ms).ok_or_else(out_of_range)?;
        return representable(t).ok_or_else(out_of_range);
    }
    if let Ok(dt) = DateTime::parse_from_rfc3339(text) {
        return Ok(dt.timestamp_millis());
    }
    const LOCAL_FORMS: [&str; 4] = [
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%d %H:%M",
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%dT%H:%M",
    ];
    for form in LOCAL_FORMS {
        if let Ok(naive) = NaiveDateTime::parse_from_str(text, form) {
            let zone = parse_zone(tz)?;
            return match zone.from_local_datetime(&naive) {
                LocalResult::Single(t) => Ok(t.timestamp_millis()),
                LocalResult::Ambiguous(earlier, _) => Ok(earlier.timestamp_millis()),
                LocalResult::None => Err(ScheduleError::NonexistentLocalTime {
                    input: s.to_string(),
                    tz: tz.to_string(),
                }),
            };
        }
    }
    Err(ScheduleError::InvalidTime {
        input: s.to_string(),
    })
}

/// Formats Millis as RFC 3339 UTC with seconds ("2026-11-23T10:00:00Z"), used by the CLI.
///
/// Milliseconds are shown only when non-zero ("2026-11-23T10:00:00.250Z"). A value
/// outside chrono's range (beyond about ±262,000 years) prints as `"<n>ms since epoch"`.
pub fn format_time(t: Millis) -> String {
    match DateTime::<Utc>::from_timestamp_millis(t) {
        Some(dt) => dt.to_rfc3339_opts(SecondsFormat::AutoSi, true),
        None => format!("{t}ms since epoch"),
    }
}

/// Everything that can be wrong with a schedule or with user input for one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// The cron expression as a whole is malformed (empty, wrong number of fields, unknown nickname).
    #[error("invalid cron expression '{expr}': {reason}")]
    InvalidCron { expr: String, reason: String },
    /// One field of the cron expression is malformed or out of range.
    #[error("invalid {field} field '{value}' in cron expression '{expr}': {reason}")]
    InvalidCronField {
        expr: String,
        field: &'static str,
        value: String,
        reason: String,
    },
    /// The cron expression parses but matches no date at all.
    #[error("cron expression '{expr}' never fires: no date matches it (e.g. day 30 of February)")]
    CronNeverFires { expr: String },
    /// The time zone is not a known IANA name.
    #[error(
        "unknown time zone '{tz}': use an IANA name such as 'UTC', 'Europe/Berlin' or 'America/New_York' (names are case-sensitive)"
    )]
    UnknownTimeZone { tz: String },
    /// An interval schedule shorter than one second.
    #[error("interval '{interval}' is too short: the minimum is 1s")]
    IntervalTooShort { interval: String },
    /// A duration string that cannot be read.
    #[error("invalid duration '{input}': {reason} (examples: 500ms, 10s, 5m, 1h30m, 2d, 1w)")]
    InvalidDuration { input: String, reason: String },
    /// A duration longer than [`MAX_DURATION`].
    #[error("duration '{input}' is too long: the longest accepted is {MAX_DURATION_TEXT}")]
    DurationTooLong { input: String },
    /// A time string in none of the accepted forms.
    #[error(
        "cannot read time '{input}': use RFC 3339 ('2026-11-23T10:00:00Z' or '2026-11-23T11:00:00+01:00'), a local 'YYYY-MM-DD HH:MM[:SS]', or '+DURATION' such as '+10m'"
    )]
    InvalidTime { input: String },
    /// A local time that falls into a daylight-saving gap of the zone.
    #[error(
        "local time '{input}' does not exist in {tz} (the clocks skip it for daylight saving): pick another time or give an explicit offset"
    )]
    NonexistentLocalTime { input: String, tz: String },
    /// A time that is valid text but outside the representable range.
    #[error("time '{input}' is out of the supported range")]
    TimeOutOfRange { input: String },
    /// A missed-run policy other than `skip` or `run-once`.
    #[error("unknown missed-run policy '{input}': use 'skip' or 'run-once'")]
    UnknownMissedPolicy { input: String },
}

// ---------------------------------------------------------------------------
// Internals

fn representable(t: Millis) -> Option<Millis> {
    DateTime::<Utc>::from_timestamp_millis(t).map(|_| t)
}

/// Checks that `tz` names an IANA time zone.
pub fn check_zone(tz: &str) -> Result<(), ScheduleError> {
    parse_zone(tz).map(|_| ())
}

fn parse_zone(tz: &str) -> Result<Tz, ScheduleError> {
    tz.trim()
        .parse::<Tz>()
        .map_err(|_| ScheduleError::UnknownTimeZone { tz: tz.to_string() })
}

fn every_next_after(interval_ms: u64, anchor: Millis, after: Millis) -> Option<Millis> {
    if interval_ms == 0 {
        return None;
    }
    let (i, a, x) = (
        i128::from(interval_ms),
        i128::from(anchor),
        i128::from(after),
    );
    let first = a + i;
    let next = if x < first {
        first
    } else {
        a + ((x - a) / i + 1) * i
    };
    i64::try_from(next).ok()
}

fn cron_parser() -> CronParser {
    CronParser::builder()
        .seconds(Seconds::Optional)
        .year(Year::Disallowed)
        .build()
}

const FIELDS_5: [&str; 5] = ["minute", "hour", "day-of-month", "month", "day-of-week"];
const FIELDS_6: [&str; 6] = [
    "second",
    "minute",
    "hour",
    "day-of-month",
    "month",
    "day-of-week",
];
const MONTH_NAMES: [&str; 12] = [
    "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
];
const WEEKDAY_NAMES: [&str; 8] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT", "L"];
const NICKNAMES: [&str; 6] = [
    "@yearly",
    "@annually",
    "@monthly",
    "@weekly",
    "@daily",
    "@hourly",
];

/// A parsed cron schedule, ready to search.
struct CompiledCron {
    cron: Cron,
    tz: Tz,
    /// Vixie "wildcard" job: minute or hour field starts with `*` (see module doc).
    wildcard: bool,
}

impl CompiledCron {
    fn new(expr: &str, tz: &str) -> Result<Self, ScheduleError> {
        let (cron, wildcard) = parse_cron(expr)?;
        let tz = parse_zone(tz)?;
        Ok(CompiledCron { cron, tz, wildcard })
    }

    /// Rejects expressions that match no date at all (croner gives up at year 5000).
    fn check_fires(&self, expr: &str) -> Result<(), ScheduleError> {
        let start = DateTime::<Utc>::UNIX_EPOCH.naive_utc();
        match self.cron.find_next_occurrence(&start, false) {
            Ok(_) => Ok(()),
            Err(_) => Err(ScheduleError::CronNeverFires {
                expr: expr.to_string(),
            }),
        }
    }

    /// Next wall-clock match strictly after `w`, via croner's zone-less search.
    fn next_wall(&self, w: &NaiveDateTime) -> Option<NaiveDateTime> {
        self.cron.find_next_occurrence(w, false).ok()
    }

    /// See the module doc for the rules. Works in whole seconds.
    fn next_after(&self, after: Millis) -> Option<Millis> {
        // f * 1000 > after  <=>  f > floor(after / 1000), for whole seconds f.
        let after_s = after.div_euclid(1000);
        let wall_now = DateTime::<Utc>::from_timestamp(after_s, 0)?
            .with_timezone(&self.tz)
            .naive_local();

        // Wall times below `wall_now` can only fire after `after` when `after`
        // lies in the first pass of an overlap: their second pass is still to
        // come. Only wildcard jobs fire on second passes, so only they look back.
        let mut cursor = wall_now;
        if self.wildcard {
            if let LocalResult::Ambiguous(e, l) = self.tz.from_local_datetime(&wall_now) {
                if l.timestamp() > after_s {
                    let overlap = l.timestamp() - e.timestamp();
                    cursor = wall_now.checked_sub_signed(TimeDelta::try_seconds(overlap)?)?;
                }
            }
        }

        // Wall matches come in wall-clock order, which is instant order except
        // inside an overlap. `pending` holds a second-pass instant found while
        // first-pass instants later on the wall clock may still come earlier.
        let mut pending: Option<i64> = None;
        for _ in 0..MAX_CRON_STEPS {
            let w = match self.next_wall(&cursor) {
                Some(w) => w,
                None => break,
            };
            cursor = w;
            match self.tz.from_local_datetime(&w) {
                LocalResult::Single(t) => {
                    // Past the overlap: nothing here beats `pending`.
                    if pending.is_some() {
                        break;
                    }
                    let t = t.timestamp();
                    if t > after_s {
                        return Some(t * 1000);
                    }
                }
                LocalResult::Ambiguous(e, l) => {
                    let (e, l) = (e.timestamp(), l.timestamp());
                    if e > after_s {
                        let best = pending.map_or(e, |p| p.min(e));
                        return Some(best * 1000);
                    }
                    if self.wildcard && l > after_s && pending.is_none() {
                        pending = Some(l);
                    }
                }
                LocalResult::None => {
                    if pending.is_some() {
                        break;
                    }
                    if !self.wildcard {
                        let t = first_instant_after_gap(&self.tz, &w)?;
                        if t > after_s {
                            return Some(t * 1000);
                        }
                    }
                }
            }
        }
        pending.map(|p| p * 1000)
    }
}

/// For a wall time `w` inside a DST gap, the instant (in seconds) at which the
/// clock jumps over the gap, i.e. the first instant whose wall time is past `w`.
fn first_instant_after_gap(tz: &Tz, w: &NaiveDateTime) -> Option<i64> {
    let in_gap = |v: &NaiveDateTime| matches!(tz.from_local_datetime(v), LocalResult::None);
    let add = |v: &NaiveDateTime, s: i64| v.checked_add_signed(TimeDelta::try_seconds(s)?);
    // Gallop to a wall time past the gap, then bisect to its first second.
    let mut lo = *w;
    let mut step = 1i64;
    let mut hi = add(w, step)?;
    while in_gap(&hi) {
        lo = hi;
        step *= 2;
        if step > 8 * 86_400 {
            return None;
        }
        hi = add(w, step)?;
    }
    while (hi - lo).num_seconds() > 1 {
        let mid = add(&lo, (hi - lo).num_seconds() / 2)?;
        if in_gap(&mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    match tz.from_local_datetime(&hi) {
        LocalResult::Single(t) => Some(t.timestamp()),
        LocalResult::Ambiguous(e, _) => Some(e.timestamp()),
        LocalResult::None => None,
    }
}

/// Parses with croner, restricted to 5 or 6 fields (or a nickname), and
/// classifies the job as Vixie "wildcard" or fixed-time.
fn parse_cron(expr: &str) -> Result<(Cron, bool), ScheduleError> {
    let invalid = |reason: String| ScheduleError::InvalidCron {
        expr: expr.to_string(),
        reason,
    };
    let text = expr.trim();
    if text.is_empty() {
        return Err(invalid("it is empty".to_string()));
    }
    let parser = cron_parser();
    let wildcard;
    if text.starts_with('@') {
        let lower = text.to_ascii_lowercase();
        if !NICKNAMES.contains(&lower.as_str()) {
            return Err(invalid(format!(
                "unknown nickname; use one of {}",
                NICKNAMES.join(", ")
            )));
        }
        wildcard = lower == "@hourly";
    } else {
        let fields: Vec<&str> = text.split_whitespace().collect();
        let names: &[&str] = match fields.len() {
            5 => &FIELDS_5,
            6 => &FIELDS_6,
            n => {
                return Err(invalid(format!(
                    "expected 5 fields (minute hour day-of-month month day-of-week) \
                     or 6 with a leading seconds field, found {n}"
                )));
            }
        };
        for (field, name) in fields.iter().zip(names) {
            let body = match *name {
                "day-of-week" => field.strip_prefix('+').unwrap_or(field),
                _ => field,
            };
            let field_error = |reason: String| ScheduleError::InvalidCronField {
                expr: expr.to_string(),
                field: name,
                value: (*field).to_string(),
                reason,
            };
            if body.is_empty() || body.split(',').any(str::is_empty) {
                return Err(field_error("empty item in list".to_string()));
            }
            // croner replaces names by substring ("JANFEB" would become "12"):
            // accept only whole names and the letter specifiers.
            let allowed: &[&str] = match *name {
                "month" => &MONTH_NAMES,
                "day-of-week" => &WEEKDAY_NAMES,
                "day-of-month" => &["L", "W", "LW"],
                _ => &[],
            };
            for word in body
                .split(|c: char| !c.is_ascii_alphabetic())
                .filter(|w| !w.is_empty())
            {
                let upper = word.to_ascii_uppercase();
                if !allowed.contains(&upper.as_str()) {
                    return Err(field_error(format!("unknown name '{word}'")));
                }
            }
        }
        let off = fields.len() - 5;
        wildcard = fields[off].starts_with('*') || fields[off + 1].starts_with('*');
        if let Err(whole) = parser.parse(text) {
            // Name the culprit: parse each field alone, the others set to `*`.
            for (i, (field, name)) in fields.iter().zip(names).enumerate() {
                let mut probe = vec!["*"; fields.len()];
                probe[i] = field;
                if let Err(e) = parser.parse(&probe.join(" ")) {
                    return Err(ScheduleError::InvalidCronField {
                        expr: expr.to_string(),
                        field: name,
                        value: (*field).to_string(),
                        reason: croner_reason(&e),
                    });
                }
            }
            return Err(invalid(croner_reason(&whole)));
        }
    }
    let cron = parser.parse(text).map_err(|e| invalid(croner_reason(&e)))?;
    // A time-of-day or month field that selects nothing would make croner's
    // search crawl to its year-5000 limit; refuse it up front.
    let p = &cron.pattern;
    let any =
        |range: std::ops::RangeInclusive<u32>, f: &dyn Fn(u32) -> bool| range.into_iter().any(f);
    if !(any(0..=59, &|v| p.second_match(v).unwrap_or(false))
        && any(0..=59, &|v| p.minute_match(v).unwrap_or(false))
        && any(0..=23, &|v| p.hour_match(v).unwrap_or(false))
        && any(1..=12, &|v| p.month_match(v).unwrap_or(false)))
    {
        return Err(ScheduleError::CronNeverFires {
            expr: expr.to_string(),
        });
    }
    Ok((cron, wildcard))
}

/// croner's message, without its generic prefixes.
fn croner_reason(e: &croner::errors::CronError) -> String {
    let msg = e.to_string();
    for prefix in [
        "Component error: ",
        "Invalid pattern: ",
        "Pattern contains illegal characters: ",
    ] {
        if let Some(rest) = msg.strip_prefix(prefix) {
            return rest.to_string();
        }
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An RFC 3339 literal as Millis (the hand-computed UTC instants below).
    fn t(s: &str) -> Millis {
        DateTime::parse_from_rfc3339(s)
            .unwrap_or_else(|e| panic!("bad test literal {s}: {e}"))
            .timestamp_millis()
    }

    fn cron(expr: &str, tz: &str) -> Schedule {
        Schedule::cron(expr, tz).unwrap_or_else(|e| panic!("{expr} {tz}: {e}"))
    }

    /// The next `n` fire times after `after`, as RFC 3339 UTC text.
    fn fires(s: &Schedule, after: &str, n: usize) -> Vec<String> {
        let mut out = Vec::new();
        let mut cur = t(after);
        for _ in 0..n {
            match s.next_after(cur) {
                Some(next) => {
                    assert!(next > cur, "{s}: {next} not after {cur}");
                    out.push(format_time(next));
                    cur = next;
                }
                None => break,
            }
        }
        out
    }

    #[test]
    fn cron_utc_next_fire_times() {
        let s = cron("0 3 * * *", "UTC");
        assert_eq!(
            fires(&s, "2026-11-23T10:00:00Z", 2),
            ["2026-11-24T03:00:00Z", "2026-11-25T03:00:00Z"]
        );
        // Exactly on a fire time: strictly after.
        assert_eq!(
            fires(&s, "2026-11-24T03:00:00Z", 1),
            ["2026-11-25T03:00:00Z"]
        );
        // Sub-second `after` just before a fire time.
        assert_eq!(
            s.next_after(t("2026-11-24T03:00:00Z") - 1),
            Some(t("2026-11-24T03:00:00Z"))
        );
        let s = cron("*/15 * * * *", "UTC");
        assert_eq!(
            fires(&s, "2026-11-23T10:07:30Z", 3),
            [
                "2026-11-23T10:15:00Z",
                "2026-11-23T10:30:00Z",
                "2026-11-23T10:45:00Z"
            ]
        );
        // 2026-11-23 is a Monday.
        let s = cron("0 12 * * MON", "UTC");
        assert_eq!(
            fires(&s, "2026-11-23T12:00:00Z", 2),
            ["2026-11-30T12:00:00Z", "2026-12-07T12:00:00Z"]
        );
        let s = cron("0 0 1 * *", "UTC");
        assert_eq!(
            fires(&s, "2026-11-23T00:00:00Z", 2),
            ["2026-12-01T00:00:00Z", "2027-01-01T00:00:00Z"]
        );
        let s = cron("0 0 L 2 *", "UTC");
        assert_eq!(
            fires(&s, "2026-11-23T00:00:00Z", 2),
            ["2027-02-28T00:00:00Z", "2028-02-29T00:00:00Z"]
        );
        let s = cron("0 0 29 2 *", "UTC");
        assert_eq!(
            fires(&s, "2026-01-01T00:00:00Z", 1),
            ["2028-02-29T00:00:00Z"]
        );
    }

    #[test]
    fn cron_accepts_names_and_extensions() {
        // 2026-11-27 is the last Friday of November; 2026-12-11 the 2nd Friday of December.
        assert_eq!(
            fires(
                &cron("0 9 * jan,Dec mon-FRI", "UTC"),
                "2026-11-23T00:00:00Z",
                1
            ),
            ["2026-12-01T09:00:00Z"]
        );
        assert_eq!(
            fires(&cron("0 0 * * 5#L", "UTC"), "2026-11-23T00:00:00Z", 1),
            ["2026-11-27T00:00:00Z"]
        );
        assert_eq!(
            fires(&cron("0 0 * DEC FRI#2", "UTC"), "2026-11-23T00:00:00Z", 1),
            ["2026-12-11T00:00:00Z"]
        );
        // 2026-11-15 is a Sunday: nearest weekday is Monday the 16th.
        assert_eq!(
            fires(&cron("0 0 15W * *", "UTC"), "2026-11-01T00:00:00Z", 1),
            ["2026-11-16T00:00:00Z"]
        );
        assert_eq!(
            fires(&cron("0 0 L * ?", "UTC"), "2026-11-01T00:00:00Z", 1),
            ["2026-11-30T00:00:00Z"]
        );
    }

    #[test]
    fn cron_six_fields_have_leading_seconds() {
        let s = cron("*/20 * * * * *", "UTC");
        assert_eq!(
            fires(&s, "2026-11-23T10:00:05.500Z", 3),
            [
                "2026-11-23T10:00:20Z",
                "2026-11-23T10:00:40Z",
                "2026-11-23T10:01:00Z"
            ]
        );
        let s = cron("30 0 3 * * *", "UTC");
        assert_eq!(
            fires(&s, "2026-11-23T10:00:00Z", 1),
            ["2026-11-24T03:00:30Z"]
        );
    }

    #[test]
    fn cron_nicknames_are_accepted() {
        assert_eq!(
            fires(&cron("@hourly", "UTC"), "2026-11-23T10:20:00Z", 1),
            ["2026-11-23T11:00:00Z"]
        );
        assert_eq!(
            fires(&cron("@daily", "Europe/Berlin"), "2026-11-23T10:20:00Z", 1),
            ["2026-11-23T23:00:00Z"]
        );
        assert_eq!(
            fires(&cron("@Weekly", "UTC"), "2026-11-23T10:20:00Z", 1),
            ["2026-11-29T00:00:00Z"]
        );
    }

    // Europe/Berlin 2026: CET (+1) -> CEST (+2) on Sun 2026-03-29 at 01:00Z
    // (02:00 local jumps to 03:00); back on Sun 2026-10-25 at 01:00Z (03:00
    // CEST falls back to 02:00 CET, so 02:00-02:59 happen twice).

    #[test]
    fn cron_berlin_spring_forward_fixed_time_fires_when_gap_ends() {
        let s = cron("30 2 * * *", "Europe/Berlin");
        assert_eq!(
            fires(&s, "2026-03-27T12:00:00Z", 4),
            [
                "2026-03-28T01:30:00Z", // 02:30 CET
                "2026-03-29T01:00:00Z", // 02:30 missing -> 03:00 CEST
                "2026-03-30T00:30:00Z", // 02:30 CEST
                "2026-03-31T00:30:00Z",
            ]
        );
        // Asked from inside the gap's wall-clock hour, after the jump.
        assert_eq!(
            s.next_after(t("2026-03-29T01:00:00Z")),
            Some(t("2026-03-30T00:30:00Z"))
        );
    }

    #[test]
    fn cron_berlin_fall_back_fixed_time_fires_once() {
        let s = cron("30 2 * * *", "Europe/Berlin");
        assert_eq!(
            fires(&s, "2026-10-23T12:00:00Z", 3),
            [
                "2026-10-24T00:30:00Z", // 02:30 CEST
                "2026-10-25T00:30:00Z", // first 02:30 (CEST) only
                "2026-10-26T01:30:00Z", // 02:30 CET
            ]
        );
        // From inside the repeated hour (either pass) the repeat is not fired.
        for after in [
            "2026-10-25T00:45:00Z",
            "2026-10-25T01:00:00Z",
            "2026-10-25T01:29:59Z",
        ] {
            assert_eq!(
                s.next_after(t(after)),
                Some(t("2026-10-26T01:30:00Z")),
                "{after}"
            );
        }
    }

    #[test]
    fn cron_berlin_hourly_wildcard_follows_real_hours_across_both_transitions() {
        let s = cron("0 * * * *", "Europe/Berlin");
        assert_eq!(
            fires(&s, "2026-03-28T23:30:00Z", 3),
            [
                "2026-03-29T00:00:00Z", // 01:00 CET
                "2026-03-29T01:00:00Z", // 03:00 CEST (02:00 skipped)
                "2026-03-29T02:00:00Z", // 04:00 CEST
            ]
        );
        assert_eq!(
            fires(&s, "2026-10-24T23:30:00Z", 4),
            [
                "2026-10-25T00:00:00Z", // 02:00 CEST
                "2026-10-25T01:00:00Z", // 02:00 CET
                "2026-10-25T02:00:00Z", // 03:00 CET
                "2026-10-25T03:00:00Z",
            ]
        );
    }

    #[test]
    fn cron_berlin_wildcard_asked_in_first_pass_finds_repeated_times() {
        // 02:50 CEST: the next */20 match is 02:00 CET, an hour "earlier" on the wall.
        let s = cron("*/20 * * * *", "Europe/Berlin");
        assert_eq!(
            fires(&s, "2026-10-25T00:50:00Z", 4),
            [
                "2026-10-25T01:00:00Z",
                "2026-10-25T01:20:00Z",
                "2026-10-25T01:40:00Z",
                "2026-10-25T02:00:00Z",
            ]
        );
        // ... but a first-pass match that is sooner still wins (02:55 CEST).
        let s = cron("*/5 * * * *", "Europe/Berlin");
        assert_eq!(
            fires(&s, "2026-10-25T00:50:00Z", 3),
            [
                "2026-10-25T00:55:00Z",
                "2026-10-25T01:00:00Z",
                "2026-10-25T01:05:00Z",
            ]
        );
        let s = cron("10 * * * *", "Europe/Berlin");
        assert_eq!(
            fires(&s, "2026-10-25T00:30:00Z", 2),
            ["2026-10-25T01:10:00Z", "2026-10-25T02:10:00Z"]
        );
    }

    #[test]
    fn cron_berlin_multi_hour_fixed_job_uses_vixie_rules_not_croner_job_types() {
        // croner alone would treat this as an interval job (two hours listed):
        // skip 02:30 in spring and fire 02:30 twice in autumn.
        let s = cron("30 1,2,3 * * *", "Europe/Berlin");
        assert_eq!(
            fires(&s, "2026-03-28T23:00:00Z", 3),
            [
                "2026-03-29T00:30:00Z", // 01:30 CET
                "2026-03-29T01:00:00Z", // 02:30 missing -> 03:00 CEST
                "2026-03-29T01:30:00Z", // 03:30 CEST
            ]
        );
        assert_eq!(
            fires(&s, "2026-10-24T23:00:00Z", 3),
            [
                "2026-10-24T23:30:00Z", // 01:30 CEST
                "2026-10-25T00:30:00Z", // 02:30 CEST, once
                "2026-10-25T02:30:00Z", // 03:30 CET
            ]
        );
        // Several matches in one gap collapse into one firing, merged with 03:00.
        let s = cron("0,30 2,3 * * *", "Europe/Berlin");
        assert_eq!(
            fires(&s, "2026-03-28T23:00:00Z", 2),
            ["2026-03-29T01:00:00Z", "2026-03-29T01:30:00Z"]
        );
    }

    // America/New_York 2026: EST (-5) -> EDT (-4) on Sun 2026-03-08 at 07:00Z
    // (02:00 jumps to 03:00); back on Sun 2026-11-01 at 06:00Z (02:00 EDT
    // falls back to 01:00 EST, so 01:00-01:59 happen twice).

    #[test]
    fn cron_new_york_across_both_transitions() {
        let s = cron("30 2 * * *", "America/New_York");
        assert_eq!(
            fires(&s, "2026-03-06T12:00:00Z", 3),
            [
                "2026-03-07T07:30:00Z", // 02:30 EST
                "2026-03-08T07:00:00Z", // 02:30 missing -> 03:00 EDT
                "2026-03-09T06:30:00Z", // 02:30 EDT
            ]
        );
        let s = cron("30 1 * * *", "America/New_York");
        assert_eq!(
            fires(&s, "2026-10-30T12:00:00Z", 3),
            [
                "2026-10-31T05:30:00Z", // 01:30 EDT
                "2026-11-01T05:30:00Z", // first 01:30 (EDT) only
                "2026-11-02T06:30:00Z", // 01:30 EST
            ]
        );
        let s = cron("0 9 * * 1-5", "America/New_York");
        assert_eq!(
            fires(&s, "2026-03-06T00:00:00Z", 2),
            ["2026-03-06T14:00:00Z", "2026-03-09T13:00:00Z"]
        );
        let s = cron("*/30 * * * *", "America/New_York");
        assert_eq!(
            fires(&s, "2026-11-01T05:00:00Z", 5),
            [
                "2026-11-01T05:30:00Z", // 01:30 EDT
                "2026-11-01T06:00:00Z", // 01:00 EST
                "2026-11-01T06:30:00Z", // 01:30 EST
                "2026-11-01T07:00:00Z", // 02:00 EST
                "2026-11-01T07:30:00Z",
            ]
        );
        assert_eq!(
            fires(&s, "2026-03-08T06:00:00Z", 3),
            [
                "2026-03-08T06:30:00Z", // 01:30 EST
                "2026-03-08T07:00:00Z", // 03:00 EDT
                "2026-03-08T07:30:00Z",
            ]
        );
    }

    #[test]
    fn cron_fire_times_strictly_increase_and_daily_jobs_fire_once_per_local_day() {
        let start = t("2026-01-01T00:00:00Z");
        let end = t("2027-01-01T00:00:00Z");
        for tz in [
            "UTC",
            "Europe/Berlin",
            "America/New_York",
            "Australia/Lord_Howe",
        ] {
            for expr in [
                "30 2 * * *",
                "0 */6 * * *",
                "*/20 1-3 * * *",
                "15 1,2,3 * * 0",
                "0 0 * * *",
            ] {
                let s = cron(expr, tz);
                let zone: Tz = tz.parse().unwrap();
                let mut prev = start;
                let mut days = std::collections::BTreeSet::new();
                let mut count = 0;
                while let Some(next) = s.next_after(prev) {
                    if next >= end {
                        break;
                    }
                    assert!(
                        next > prev,
                        "{expr} {tz}: went back at {}",
                        format_time(next)
                    );
                    if expr == "30 2 * * *" {
                        let day = DateTime::from_timestamp_millis(next)
                            .unwrap()
                            .with_timezone(&zone)
                            .date_naive();
                        assert!(days.insert(day), "{expr} {tz}: twice on {day}");
                    }
                    prev = next;
                    count += 1;
                }
                assert!(count > 0, "{expr} {tz}");
            }
        }
    }

    /// Brute force over every minute: a wildcard job fires at each instant
    /// whose wall-clock time matches.
    #[test]
    fn cron_wildcard_jobs_match_brute_force_around_dst() {
        let windows = [
            (
                "Europe/Berlin",
                "2026-03-28T22:00:00Z",
                "2026-03-29T04:00:00Z",
            ),
            (
                "Europe/Berlin",
                "2026-10-24T22:00:00Z",
                "2026-10-25T04:00:00Z",
            ),
            (
                "America/New_York",
                "2026-03-08T04:00:00Z",
                "2026-03-08T10:00:00Z",
            ),
            (
                "America/New_York",
                "2026-11-01T03:00:00Z",
                "2026-11-01T09:00:00Z",
            ),
            (
                "Australia/Lord_Howe",
                "2026-04-04T12:00:00Z",
                "2026-04-04T18:00:00Z",
            ),
        ];
        for expr in ["*/5 * * * *", "7,37 * * * *", "* 1-2 * * *", "0 * * * *"] {
            let (cr, wildcard) = parse_cron(expr).unwrap();
            assert!(wildcard);
            for (tz, from, to) in windows {
                let zone: Tz = tz.parse().unwrap();
                let s = cron(expr, tz);
                let (from, to) = (t(from), t(to));
                let expected: Vec<Millis> = (from / 60_000..to / 60_000)
                    .map(|m| m * 60_000)
                    .filter(|&m| {
                        let wall = DateTime::from_timestamp_millis(m)
                            .unwrap()
                            .with_timezone(&zone)
                            .naive_local();
                        cr.is_time_matching(&wall).unwrap()
                    })
                    .collect();
                // From every minute (and half minute) of the window.
                for after in (from..to - 3_600_000).step_by(30_000) {
                    let got = s.next_after(after);
                    match expected.iter().copied().find(|&e| e > after) {
                        Some(want) => {
                            assert_eq!(got, Some(want), "{expr} {tz} after {}", format_time(after))
                        }
                        // Nothing left in the window: the answer lies beyond it.
                        None => assert!(got.is_some_and(|g| g >= to), "{expr} {tz}"),
                    }
                }
            }
        }
    }

    #[test]
    fn cron_invalid_expressions_name_the_problem() {
        let field_of = |expr: &str| match Schedule::cron(expr, "UTC") {
            Err(ScheduleError::InvalidCronField { field, .. }) => field,
            other => panic!("{expr}: {other:?}"),
        };
        assert_eq!(field_of("60 * * * *"), "minute");
        assert_eq!(field_of("0 24 * * *"), "hour");
        assert_eq!(field_of("0 0 32 * *"), "day-of-month");
        assert_eq!(field_of("0 0 * 13 *"), "month");
        assert_eq!(field_of("0 0 * * 8"), "day-of-week");
        assert_eq!(field_of("61 0 0 * * *"), "second");
        assert_eq!(field_of("x * * * *"), "minute");
        assert_eq!(field_of("1,,2 * * * *"), "minute");
        assert_eq!(field_of("0 0 * * +"), "day-of-week");
        assert_eq!(field_of("0 0 * JANFEB *"), "month");
        assert_eq!(field_of("0 0 * * SUNMON"), "day-of-week");
        assert_eq!(field_of("0 0 * * MONDAY"), "day-of-week");
        let e = Schedule::cron("0 24 * * *", "UTC").unwrap_err().to_string();
        assert!(e.contains("hour") && e.contains("'24'"), "{e}");
        for expr in ["", "   ", "* * * *", "0 0 0 1 1 * 2030", "@reboot"] {
            assert!(
                matches!(
                    Schedule::cron(expr, "UTC"),
                    Err(ScheduleError::InvalidCron { .. })
                ),
                "{expr:?}"
            );
        }
        assert!(matches!(
            Schedule::cron("0 0 30 2 *", "UTC"),
            Err(ScheduleError::CronNeverFires { .. })
        ));
    }

    #[test]
    fn cron_unknown_zone_is_rejected() {
        for tz in ["Mars/Olympus", "", "europe/berlin", "CEST"] {
            let err = Schedule::cron("0 3 * * *", tz).unwrap_err();
            assert!(
                matches!(err, ScheduleError::UnknownTimeZone { .. }),
                "{tz}: {err:?}"
            );
        }
        assert!(Schedule::cron("0 3 * * *", "Mars/Olympus")
            .unwrap_err()
            .to_string()
            .contains("Mars/Olympus"));
    }

    #[test]
    fn validate_rechecks_stored_schedules() {
        let bad_cron = Schedule::Cron {
            expr: "99 * * * *".into(),
            tz: "UTC".into(),
        };
        assert!(bad_cron.validate().is_err());
        assert_eq!(bad_cron.next_after(0), None);
        let bad_zone = Schedule::Cron {
            expr: "0 * * * *".into(),
            tz: "Nowhere/Atlantis".into(),
        };
        assert!(matches!(
            bad_zone.validate(),
            Err(ScheduleError::UnknownTimeZone { .. })
        ));
        let zero = Schedule::Every {
            interval_ms: 0,
            anchor: 0,
        };
        assert!(zero.validate().is_err());
        assert_eq!(zero.next_after(0), None);
        assert!(cron("0 3 * * *", "Europe/Berlin").validate().is_ok());
        assert!(Schedule::at(5).validate().is_ok());
        assert!(Schedule::every(Duration::from_secs(1), 0)
            .unwrap()
            .validate()
            .is_ok());
    }

    #[test]
    fn every_aligns_to_anchor() {
        let anchor = t("2026-11-23T10:00:00.123Z");
        let s = Schedule::every(Duration::from_secs(10), anchor).unwrap();
        assert_eq!(s.next_after(anchor), Some(anchor + 10_000));
        assert_eq!(s.next_after(anchor - 5_000_000), Some(anchor + 10_000));
        assert_eq!(s.next_after(anchor + 9_999), Some(anchor + 10_000));
        assert_eq!(s.next_after(anchor + 10_000), Some(anchor + 20_000));
        assert_eq!(s.next_after(anchor + 35_000), Some(anchor + 40_000));
        // Long after: still on the anchor's grid.
        let far = anchor + 123_456_789;
        let next = s.next_after(far).unwrap();
        assert!(next > far && next - far <= 10_000);
        assert_eq!((next - anchor) % 10_000, 0);
        // No overflow at the end of time.
        assert_eq!(s.next_after(i64::MAX), None);
        let s = Schedule::every(Duration::from_secs(3600), i64::MAX - 10).unwrap();
        assert_eq!(s.next_after(0), None);
    }

    #[test]
    fn every_rejects_intervals_under_one_second() {
        let zero = parse_duration("0s").unwrap();
        assert!(matches!(
            Schedule::every(zero, 0),
            Err(ScheduleError::IntervalTooShort { .. })
        ));
        assert!(Schedule::every(Duration::from_millis(999), 0).is_err());
        assert!(Schedule::every(Duration::from_millis(1000), 0).is_ok());
        for too_long in [Duration::MAX, MAX_DURATION + Duration::from_millis(1)] {
            assert!(matches!(
                Schedule::every(too_long, 0),
                Err(ScheduleError::DurationTooLong { .. })
            ));
        }
        assert!(Schedule::every(MAX_DURATION, 0).is_ok());
    }

    #[test]
    fn at_fires_once_then_none() {
        let at = t("2026-11-23T10:00:00Z");
        let s = Schedule::at(at);
        assert_eq!(s.next_after(at - 1), Some(at));
        assert_eq!(s.next_after(i64::MIN), Some(at));
        assert_eq!(s.next_after(at), None);
        assert_eq!(s.next_after(at + 1), None);
    }

    #[test]
    fn due_run_once_coalesces_missed_occurrences() {
        let anchor = t("2026-11-23T10:00:00Z");
        let s = Schedule::every(Duration::from_secs(60), anchor).unwrap();
        let stored = anchor + 60_000;
        // Down for 5.5 minutes: 5 occurrences missed -> one firing.
        let now = anchor + 330_000;
        assert_eq!(
            due(&s, stored, now, Missed::RunOnce, 1_000),
            (true, Some(anchor + 360_000))
        );
        let c = cron("0 * * * *", "UTC");
        assert_eq!(
            due(
                &c,
                t("2026-11-23T01:00:00Z"),
                t("2026-11-23T05:30:00Z"),
                Missed::RunOnce,
                0
            ),
            (true, Some(t("2026-11-23T06:00:00Z")))
        );
    }

    #[test]
    fn due_skip_fires_only_when_latest_occurrence_is_within_grace() {
        let anchor = t("2026-11-23T10:00:00Z");
        let s = Schedule::every(Duration::from_secs(60), anchor).unwrap();
        let stored = anchor + 60_000;
        // Several missed, the latest (anchor+5m) is 30s old: beyond a 5s grace.
        let now = anchor + 330_000;
        assert_eq!(
            due(&s, stored, now, Missed::Skip, 5_000),
            (false, Some(anchor + 360_000))
        );
        // ... but within a 45s grace.
        assert_eq!(
            due(&s, stored, now, Missed::Skip, 45_000),
            (true, Some(anchor + 360_000))
        );
        // Just due (stored time reached 2s ago): fires.
        assert_eq!(
            due(&s, stored, stored + 2_000, Missed::Skip, 5_000),
            (true, Some(stored + 60_000))
        );
        // Exactly on time with zero grace fires; negative grace acts as zero.
        assert_eq!(
            due(&s, stored, stored, Missed::Skip, 0),
            (true, Some(stored + 60_000))
        );
        assert_eq!(
            due(&s, stored, stored, Missed::Skip, -7),
            (true, Some(stored + 60_000))
        );
        let c = cron("0 * * * *", "UTC");
        assert_eq!(
            due(
                &c,
                t("2026-11-23T01:00:00Z"),
                t("2026-11-23T05:00:03Z"),
                Missed::Skip,
                5_000
            ),
            (true, Some(t("2026-11-23T06:00:00Z")))
        );
        assert_eq!(
            due(
                &c,
                t("2026-11-23T01:00:00Z"),
                t("2026-11-23T05:30:00Z"),
                Missed::Skip,
                5_000
            ),
            (false, Some(t("2026-11-23T06:00:00Z")))
        );
    }

    #[test]
    fn due_before_stored_time_does_nothing() {
        let s = Schedule::every(Duration::from_secs(60), 0).unwrap();
        for missed in [Missed::Skip, Missed::RunOnce] {
            assert_eq!(
                due(&s, 60_000, 59_999, missed, 1_000),
                (false, Some(60_000))
            );
        }
    }

    #[test]
    fn due_one_shot_fires_once_then_has_no_next() {
        let at = t("2026-11-23T10:00:00Z");
        let s = Schedule::at(at);
        let late = at + 3_600_000;
        assert_eq!(due(&s, at, late, Missed::RunOnce, 1_000), (true, None));
        assert_eq!(due(&s, at, late, Missed::Skip, 1_000), (false, None));
        assert_eq!(due(&s, at, at + 500, Missed::Skip, 1_000), (true, None));
    }

    #[test]
    fn missed_parses_and_displays() {
        assert_eq!("skip".parse::<Missed>().unwrap(), Missed::Skip);
        assert_eq!("run-once".parse::<Missed>().unwrap(), Missed::RunOnce);
        assert_eq!(" Run_Once ".parse::<Missed>().unwrap(), Missed::RunOnce);
        assert!(matches!(
            "sometimes".parse::<Missed>(),
            Err(ScheduleError::UnknownMissedPolicy { .. })
        ));
        assert_eq!(Missed::Skip.to_string(), "skip");
        assert_eq!(Missed::RunOnce.to_string(), "run-once");
    }

    #[test]
    fn parse_duration_accepts_good_forms() {
        let ok = |s: &str| parse_duration(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(ok("500ms"), Duration::from_millis(500));
        assert_eq!(ok("10s"), Duration::from_secs(10));
        assert_eq!(ok("5m"), Duration::from_secs(300));
        assert_eq!(ok("1h30m"), Duration::from_secs(5400));
        assert_eq!(ok("2d"), Duration::from_secs(172_800));
        assert_eq!(ok("1w"), Duration::from_secs(604_800));
        assert_eq!(ok("1w2d3h4m5s6ms"), Duration::from_millis(788_645_006));
        assert_eq!(ok(" 90s "), Duration::from_secs(90));
        assert_eq!(ok("0s"), Duration::ZERO);
        assert_eq!(ok("007m"), Duration::from_secs(420));
    }

    #[test]
    fn parse_duration_rejects_bad_forms() {
        for s in [
            "", " ", "10", "s", "ms", "1.5h", "1,5h", "-5s", "+5s", "5 s", "5S", "5sec", "30m1h",
            "1h1h", "1m1m", "5mss", "h1", "1h 30m", "1µs", "5\u{0}s", "١s",
        ] {
            match parse_duration(s) {
                Err(ScheduleError::InvalidDuration { input, reason }) => {
                    assert_eq!(input, s);
                    assert!(!reason.is_empty());
                }
                other => panic!("{s:?}: {other:?}"),
            }
        }
        let e = parse_duration("1.5h").unwrap_err().to_string();
        assert!(e.contains("fractions"), "{e}");
        let e = parse_duration("10").unwrap_err().to_string();
        assert!(e.contains("no unit"), "{e}");
    }

    #[test]
    fn parse_duration_rejects_overflow() {
        for s in [
            "18446744073709551616ms",
            "99999999999999999999999s",
            "18446744073709551615s",
            "40000000000w",
            "18446744073709551s1000ms",
            // Both from the robustness issue: once accepted, the first ran with no limit
            // and the second wrapped into a deadline in the past.
            "18446744073709551615ms",
            "9223372036854775807ms",
        ] {
            assert!(
                matches!(
                    parse_duration(s),
                    Err(ScheduleError::DurationTooLong { .. })
                ),
                "{s}"
            );
        }
    }

    #[test]
    fn parse_duration_bound_is_366_days_and_named_in_the_error() {
        assert_eq!(MAX_DURATION, Duration::from_secs(366 * 86_400));
        assert_eq!(Duration::from_millis(MAX_DURATION_MS), MAX_DURATION);
        assert_eq!(parse_duration(MAX_DURATION_TEXT).unwrap(), MAX_DURATION);
        for at_limit in [
            "366d",
            "52w2d",
            "8784h",
            "527040m",
            "31622400s",
            "31622400000ms",
        ] {
            assert_eq!(
                parse_duration(at_limit).unwrap(),
                MAX_DURATION,
                "{at_limit}"
            );
        }
        assert_eq!(
            parse_duration("365d").unwrap(),
            Duration::from_secs(365 * 86_400)
        );
        for beyond in ["367d", "366d1ms", "52w2d0h0m0s1ms", "53w", "31622400001ms"] {
            let e = parse_duration(beyond).unwrap_err();
            assert_eq!(
                e,
                ScheduleError::DurationTooLong {
                    input: beyond.to_string()
                }
            );
            assert!(e.to_string().contains("366d"), "{e}");
        }
        // A relative time is bounded the same way.
        assert!(matches!(
            parse_time("+367d", "UTC", 0),
            Err(ScheduleError::DurationTooLong { .. })
        ));
    }

    #[test]
    fn deadline_adds_with_checked_arithmetic() {
        let now = t("2026-11-23T10:00:00Z");
        assert_eq!(deadline(now, &[]), Some(now));
        assert_eq!(
            deadline(now, &[Duration::from_secs(60), Duration::from_millis(5)]),
            Some(now + 60_005)
        );
        assert_eq!(
            deadline(now, &[MAX_DURATION, MAX_DURATION]),
            Some(now + 2 * 31_622_400_000)
        );
        // Sub-millisecond parts are dropped, as everywhere else.
        assert_eq!(
            deadline(now, &[Duration::from_micros(1_999)]),
            Some(now + 1)
        );
        assert_eq!(deadline(i64::MAX, &[Duration::from_millis(1)]), None);
        assert_eq!(deadline(now, &[Duration::from_millis(u64::MAX)]), None);
        assert_eq!(deadline(now, &[Duration::MAX]), None);
        assert_eq!(
            deadline(now, &[Duration::from_millis(i64::MAX as u64 / 2 + 1); 2]),
            None
        );
        assert_eq!(deadline(i64::MIN, &[Duration::ZERO]), Some(i64::MIN));
    }

    #[test]
    fn format_duration_is_compact_and_round_trips() {
        assert_eq!(format_duration(Duration::from_secs(5400)), "1h30m");
        assert_eq!(format_duration(Duration::from_secs(10)), "10s");
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(format_duration(Duration::ZERO), "0s");
        assert_eq!(format_duration(Duration::from_nanos(10)), "<1ms");
        assert_eq!(format_duration(Duration::from_secs(8 * 86_400)), "1w1d");
        assert_eq!(format_duration(Duration::from_millis(61_001)), "1m1s1ms");
        for ms in [
            1u64,
            999,
            1000,
            61_001,
            3_600_000,
            788_645_006,
            MAX_DURATION_MS,
        ] {
            let d = Duration::from_millis(ms);
            assert_eq!(parse_duration(&format_duration(d)).unwrap(), d, "{ms}");
        }
    }

    #[test]
    fn parse_time_accepts_each_form() {
        let now = t("2026-11-23T10:00:00Z");
        let utc = t("2026-11-23T10:00:00Z");
        assert_eq!(parse_time("2026-11-23T10:00:00Z", "UTC", now).unwrap(), utc);
        assert_eq!(
            parse_time("2026-11-23T11:00:00+01:00", "America/New_York", now).unwrap(),
            utc
        );
        assert_eq!(
            parse_time("2026-11-23T10:00:00.250Z", "UTC", now).unwrap(),
            utc + 250
        );
        // Local forms, in the given zone (Berlin is +01:00 in November).
        for s in [
            "2026-11-23 11:00",
            "2026-11-23 11:00:00",
            "2026-11-23T11:00",
            "2026-11-23T11:00:00",
        ] {
            assert_eq!(parse_time(s, "Europe/Berlin", now).unwrap(), utc, "{s}");
        }
        assert_eq!(
            parse_time("2026-11-23 05:00", "America/New_York", now).unwrap(),
            utc
        );
        assert_eq!(
            parse_time("2026-11-23 10:00:30.5", "UTC", now).unwrap(),
            utc + 30_500
        );
        // Relative.
        assert_eq!(parse_time("+10m", "UTC", now).unwrap(), now + 600_000);
        assert_eq!(
            parse_time("+1h30m", "Bad/Zone", now).unwrap(),
            now + 5_400_000
        );
        // RFC 3339 ignores the zone argument, even a bad one.
        assert_eq!(
            parse_time("2026-11-23T10:00:00Z", "Bad/Zone", now).unwrap(),
            utc
        );
    }

    #[test]
    fn parse_time_dst_gap_is_an_error_and_overlap_takes_earlier() {
        let err = parse_time("2026-03-29 02:30", "Europe/Berlin", 0).unwrap_err();
        assert!(
            matches!(err, ScheduleError::NonexistentLocalTime { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("Europe/Berlin"));
        assert!(parse_time("2026-03-08T02:15", "America/New_York", 0).is_err());
        assert_eq!(
            parse_time("2026-10-25 02:30", "Europe/Berlin", 0).unwrap(),
            t("2026-10-25T00:30:00Z")
        );
        assert_eq!(
            parse_time("2026-11-01 01:30", "America/New_York", 0).unwrap(),
            t("2026-11-01T05:30:00Z")
        );
    }

    #[test]
    fn parse_time_rejects_bad_zone_and_garbage() {
        assert!(matches!(
            parse_time("2026-11-23 10:00", "Mars/Olympus", 0),
            Err(ScheduleError::UnknownTimeZone { .. })
        ));
        for s in [
            "",
            "tomorrow",
            "2026-11-23",
            "10:00",
            "2026-13-01 10:00",
            "2026-02-30 10:00",
            "2026-11-23 25:00",
            "2026-11-23T10:00:00+25:00",
            "23.11.2026 10:00",
        ] {
            assert!(
                matches!(
                    parse_time(s, "UTC", 0),
                    Err(ScheduleError::InvalidTime { .. })
                ),
                "{s:?}"
            );
        }
        assert!(matches!(
            parse_time("+1x", "UTC", 0),
            Err(ScheduleError::InvalidDuration { .. })
        ));
        assert!(matches!(
            parse_time("+1w", "UTC", i64::MAX - 5),
            Err(ScheduleError::TimeOutOfRange { .. })
        ));
    }

    #[test]
    fn format_time_is_rfc3339_utc() {
        assert_eq!(
            format_time(t("2026-11-23T10:00:00Z")),
            "2026-11-23T10:00:00Z"
        );
        assert_eq!(format_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_time(1_250), "1970-01-01T00:00:01.250Z");
        assert_eq!(format_time(i64::MAX), format!("{}ms since epoch", i64::MAX));
        let now = t("2026-11-23T10:00:00Z");
        for ms in [0, 1_250, -1, now] {
            assert_eq!(parse_time(&format_time(ms), "UTC", now).unwrap(), ms);
        }
    }

    #[test]
    fn describe_is_short() {
        assert_eq!(
            Schedule::every(Duration::from_secs(10), 0)
                .unwrap()
                .describe(),
            "every 10s"
        );
        assert_eq!(
            cron(" 0 3 * * * ", "Europe/Berlin").describe(),
            "cron '0 3 * * *' Europe/Berlin"
        );
        assert_eq!(
            Schedule::at(t("2026-11-23T10:00:00Z")).describe(),
            "at 2026-11-23T10:00:00Z"
        );
    }

    #[test]
    fn no_panic_on_garbage_input() {
        let odd = [
            "",
            " ",
            "\t\n",
            "*",
            "* * * * * * * *",
            "@",
            "@@daily",
            "@daily *",
            "*/0 * * * *",
            "0/10 * * * *",
            "/5 * * * *",
            "1-0 * * * *",
            "5-1 * * * *",
            "*/99999999999 * * * *",
            "99999999999999999999 * * * *",
            "-1 * * * *",
            "0 0 0 * *",
            "0 0 L W *",
            "0 0 LW * *",
            "0 0 * * 5#9",
            "0 0 * * #",
            "0 0 * * L#L",
            "0 0 ? ? ?",
            "0 0 * * +",
            "+ + + + +",
            "0 0 * * ++MON",
            ",,,, * * * *",
            "1,,2 * * * *",
            "1--2 * * * *",
            "** * * * *",
            "ß * * * *",
            "0 0 * JANFEB *",
            "0 0 * * SUNMON",
            "0 0 32W * *",
            "0 0 0W * *",
            "\u{0} * * * *",
            "💥",
            "+",
            "+-1s",
            "+999999999999999999999w",
            "1h-1m",
            "9223372036854775807ms",
            "2026-11-23T10:00:00",
            "2026-11-23T24:00:00Z",
            "0000-00-00 00:00",
            "+275760-09-13 00:00",
            "-262144-01-01 00:00",
            "2026-11-23 10:00:60",
            "run-once!",
            "SKIP",
        ];
        let times = [
            i64::MIN,
            -62_135_596_800_001,
            -1,
            0,
            t("2026-03-29T01:30:00Z"),
            i64::MAX,
        ];
        for s in odd {
            let _ = Schedule::cron(s, "UTC");
            let _ = Schedule::cron("0 3 * * *", s);
            let _ = parse_duration(s);
            let _ = s.parse::<Missed>();
            for now in times {
                let _ = parse_time(s, "Europe/Berlin", now);
                let _ = parse_time(s, s, now);
                let raw = Schedule::Cron {
                    expr: s.to_string(),
                    tz: "Europe/Berlin".to_string(),
                };
                let _ = raw.validate();
                let _ = raw.next_after(now);
                let _ = raw.describe();
            }
        }
        let schedules = [
            cron("* * * * * *", "Europe/Berlin"),
            cron("0 0 29 2 *", "Pacific/Apia"),
            Schedule::Every {
                interval_ms: u64::MAX,
                anchor: i64::MIN,
            },
            Schedule::Every {
                interval_ms: 1,
                anchor: i64::MAX,
            },
            Schedule::at(i64::MIN),
        ];
        for s in &schedules {
            for now in times {
                let _ = s.next_after(now);
                let _ = s.describe();
                for stored in times {
                    for grace in [i64::MIN, -1, 0, i64::MAX] {
                        let _ = due(s, stored, now, Missed::Skip, grace);
                        let _ = due(s, stored, now, Missed::RunOnce, grace);
                    }
                }
            }
        }
        let _ = format_time(i64::MIN);
        let _ = format_duration(Duration::MAX);
    }

    mod properties {
        //! Property tests for the duration bound: whatever the user types, a duration is
        //! either refused or at most `MAX_DURATION`, and deadlines built from such
        //! durations never overflow.

        use super::super::*;
        use proptest::prelude::*;

        const UNITS: [(&str, u128); 6] = [
            ("w", 7 * 86_400_000),
            ("d", 86_400_000),
            ("h", 3_600_000),
            ("m", 60_000),
            ("s", 1_000),
            ("ms", 1),
        ];

        /// 2000-01-01 to 2200-01-01: any clock Herald will meet.
        const REALISTIC_NOW: std::ops::RangeInclusive<i64> = 946_684_800_000..=7_258_118_400_000;

        /// Well-formed duration text: some units in order, each with a number of up to 25
        /// digits (so far beyond u64), plus the exact value in u128 milliseconds.
        fn well_formed() -> impl Strategy<Value = (String, u128)> {
            (
                proptest::sample::subsequence(UNITS.to_vec(), 1..=UNITS.len()),
                proptest::collection::vec("[0-9]{1,25}", UNITS.len()),
            )
                .prop_map(|(units, numbers)| {
                    let mut text = String::new();
                    let mut total: u128 = 0;
                    for ((unit, unit_ms), number) in units.into_iter().zip(numbers) {
                        text.push_str(&number);
                        text.push_str(unit);
                        // At most 25 digits: below 10^25, times 6.05 * 10^8 fits u128.
                        total += number.parse::<u128>().expect("digits") * unit_ms;
                    }
                    (text, total)
                })
        }

        /// Text that looks like a duration but may be anything: digits, unit letters,
        /// signs, dots and spaces in any order.
        fn duration_like() -> impl Strategy<Value = String> {
            "[0-9wdhmsµ.,+\\- ]{0,40}"
        }

        fn bounded(d: Duration) -> Result<(), TestCaseError> {
            prop_assert!(d <= MAX_DURATION, "{d:?} exceeds MAX_DURATION");
            Ok(())
        }

        proptest! {
            #[test]
            fn any_text_is_refused_or_at_most_the_bound(s in "\\PC{0,40}") {
                if let Ok(d) = parse_duration(&s) {
                    bounded(d)?;
                }
            }

            #[test]
            fn duration_like_text_is_refused_or_at_most_the_bound(s in duration_like()) {
                if let Ok(d) = parse_duration(&s) {
                    bounded(d)?;
                }
            }

            #[test]
            fn well_formed_text_parses_exactly_or_is_too_long((s, ms) in well_formed()) {
                match parse_duration(&s) {
                    Ok(d) => {
                        prop_assert!(ms <= u128::from(MAX_DURATION_MS), "{s} accepted");
                        prop_assert_eq!(d.as_millis(), ms);
                    }
                    Err(ScheduleError::DurationTooLong { input }) => {
                        prop_assert!(ms > u128::from(MAX_DURATION_MS), "{s} refused");
                        prop_assert_eq!(input, s);
                    }
                    Err(e) => prop_assert!(false, "{s}: {e}"),
                }
            }

            #[test]
            fn deadlines_from_bounded_durations_never_overflow(
                now in REALISTIC_NOW,
                parts in proptest::collection::vec(0..=MAX_DURATION_MS, 0..=8),
            ) {
                let parts: Vec<Duration> = parts.into_iter().map(Duration::from_millis).collect();
                let exact = i128::from(now)
                    + parts.iter().map(|p| p.as_millis() as i128).sum::<i128>();
                prop_assert_eq!(deadline(now, &parts).map(i128::from), Some(exact));
            }

            #[test]
            fn parsed_durations_make_deadlines_that_never_overflow(
                now in REALISTIC_NOW,
                texts in proptest::collection::vec(duration_like(), 0..=8),
            ) {
                let parts: Vec<Duration> =
                    texts.iter().filter_map(|t| parse_duration(t).ok()).collect();
                prop_assert!(deadline(now, &parts).is_some());
            }

            #[test]
            fn formatting_then_parsing_round_trips(ms in 0..=MAX_DURATION_MS) {
                let d = Duration::from_millis(ms);
                prop_assert_eq!(parse_duration(&format_duration(d)), Ok(d));
            }

            #[test]
            fn formatted_durations_beyond_the_bound_are_refused(
                ms in MAX_DURATION_MS + 1..=u64::MAX,
            ) {
                let text = format_duration(Duration::from_millis(ms));
                let refused = matches!(
                    parse_duration(&text),
                    Err(ScheduleError::DurationTooLong { .. })
                );
                prop_assert!(refused, "{} accepted", text);
            }
        }
    }
}
