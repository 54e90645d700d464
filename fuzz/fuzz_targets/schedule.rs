//! Schedule expressions (`herald_shared::schedule`): what `herald schedule add` reads from
//! `--cron`, `--every` and `--at`, and the fire times the server then evaluates from them.
//!
//! An input is: flags, an expression (cron text, a duration or a time), a zone (one of a
//! list of zones with unusual daylight-saving rules, or free text), and two instants. It
//! is read as each kind in turn:
//!
//! - a duration: [`parse_duration`] of [`format_duration`] gives it back;
//! - a cron expression, built with [`Schedule::cron`] (validated, as the CLI does before
//!   anything is stored): fire times from the first instant must strictly increase, and
//!   each must be the *first* one after any instant before it (asked again from just
//!   before it, and from half-way to it, it comes out the same). Schedules that fail
//!   validation are not walked: one that can never fire makes croner search up to the
//!   year 5000, seconds per call under the sanitizer (docs/FUZZING.md);
//! - an interval of that duration anchored at the first instant, walked the same way;
//! - a time for `--at` in that zone: a one-shot fires once, at it, and its printed form
//!   (for years 0 to 9999, which RFC 3339 can write) reads back to the same instant.
//!
//! [`due`] is asked about each schedule at the second instant. Nothing may panic, and
//! since a fuzz run stops at libFuzzer's `-timeout`, nothing may take long either.

#![no_main]

use std::time::Duration;

use herald_fuzz::Input;
use herald_shared::schedule::{
    due, format_duration, format_time, parse_duration, parse_time, Missed, Schedule,
};
use herald_shared::Millis;
use libfuzzer_sys::fuzz_target;

/// Zones whose transitions are unusual: half-hour and 45-minute offsets, half-hour DST
/// (Lord Howe), DST in the southern summer, a skipped calendar day (Apia, December 2011),
/// a zone without DST, and a negative DST (Dublin's winter time).
const ZONES: [&str; 12] = [
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "Australia/Lord_Howe",
    "Pacific/Chatham",
    "America/Santiago",
    "Asia/Kathmandu",
    "Pacific/Apia",
    "America/St_Johns",
    "Europe/Dublin",
    "Asia/Tokyo",
    "Africa/Casablanca",
];

/// Fire times walked per schedule.
const STEPS: usize = 4;

/// Flags in the first byte.
const FREE_ZONE: u8 = 1;
const NEAR_NOW: u8 = 2;

/// Maps an arbitrary instant to 1900..2300 when asked, where the zone rules change.
fn instant(flags: u8, t: i64) -> Millis {
    if flags & NEAR_NOW == 0 {
        return t;
    }
    const START: i64 = -2_208_988_800_000; // 1900-01-01
    const SPAN: i64 = 400 * 365 * 86_400_000;
    START + t.rem_euclid(SPAN)
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let flags = input.byte();
    let expr = input.text().into_owned();
    let zone_index = input.byte();
    let free_zone = input.text().into_owned();
    let tz = if flags & FREE_ZONE == 0 {
        ZONES[usize::from(zone_index) % ZONES.len()]
    } else {
        free_zone.as_str()
    };
    let from = instant(flags, input.i64());
    let now = instant(flags, input.i64());
    let grace = input.i64();

    let duration = parse_duration(&expr);
    if let Ok(d) = &duration {
        assert_eq!(
            parse_duration(&format_duration(*d)).ok().as_ref(),
            Some(d),
            "{d:?} printed as {} does not read back",
            format_duration(*d)
        );
    }

    if let Ok(schedule) = Schedule::cron(&expr, tz) {
        assert!(schedule.validate().is_ok());
        walk(&schedule, from, now, grace);
    }

    if let Ok(d) = duration {
        if let Ok(schedule) = Schedule::every(d, from) {
            walk(&schedule, from, now, grace);
        }
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        walk(
            &Schedule::Every {
                interval_ms: ms,
                anchor: from,
            },
            now,
            from,
            grace,
        );
    }

    if let Ok(at) = parse_time(&expr, tz, from) {
        let schedule = Schedule::at(at);
        assert_eq!(schedule.next_after(at.saturating_sub(1)), Some(at));
        assert_eq!(schedule.next_after(at), None);
        let printed = format_time(at);
        // RFC 3339 has four-digit years: beyond 0000..=9999 chrono prints an expanded year
        // (`+10136-02-16T04:26:00Z`) that is not RFC 3339, and `--at` does not read it.
        if printed.starts_with(|c: char| c.is_ascii_digit()) {
            assert_eq!(
                parse_time(&printed, "UTC", 0).ok(),
                Some(at),
                "{at} printed as {printed}"
            );
        }
        walk(&schedule, from, now, grace);
    }
    let _ = format_duration(Duration::from_millis(grace.unsigned_abs()));
});

/// Walks a few fire times from `from` and asks `due` at `now`.
fn walk(schedule: &Schedule, from: Millis, now: Millis, grace: i64) {
    let _ = (schedule.describe(), schedule.validate());
    let mut after = from;
    for _ in 0..STEPS {
        let Some(next) = schedule.next_after(after) else {
            break;
        };
        assert!(
            next > after,
            "{schedule}: fire time {next} not after {after}"
        );
        // `next` is the first fire time after `after`, so it is also the first after any
        // instant in between.
        let just_before = next - 1;
        // Rounded down, so that it stays before `next` for negative instants too.
        let half_way = i64::try_from((i128::from(after) + i128::from(next)).div_euclid(2))
            .expect("the mean of two i64 is an i64");
        for between in [just_before, half_way] {
            assert_eq!(
                schedule.next_after(between),
                Some(next),
                "{schedule}: first fire after {after} is {next}, but after {between} it is not"
            );
        }
        after = next;
    }
    for missed in [Missed::Skip, Missed::RunOnce] {
        let (_, next) = due(schedule, from, now, missed, grace);
        if from <= now {
            if let Some(next) = next {
                assert!(next > now, "{schedule}: due at {now} gives next {next}");
            }
        }
    }
}
