//! Schedules fire as promised: `--every` fires repeatedly about one interval apart,
//! `--at` fires exactly once, `schedule rm` stops a schedule, and malformed cron
//! expressions or unknown time zones are refused with one clear sentence.

use std::time::Duration;

use herald_tests::{add_schedule, all_jobs, wait_until, TestAgent, TestServer, DEADLINE};
use serde_json::Value;

/// Every job whose action is `action`, oldest first.
fn jobs_with_action(server: &TestServer, action: &str) -> Vec<Value> {
    all_jobs(server)
        .into_iter()
        .filter(|j| j["action"] == action)
        .collect()
}

/// Every job created by schedule `id`, oldest first.
fn schedule_jobs(server: &TestServer, id: i64) -> Vec<Value> {
    all_jobs(server)
        .into_iter()
        .filter(|j| j["schedule_id"] == id)
        .collect()
}

/// Waits until schedule `id` has at least `n` succeeded jobs; returns all its jobs.
fn wait_succeeded(server: &TestServer, id: i64, n: usize, deadline: Duration) -> Vec<Value> {
    wait_until(
        &format!("{n} succeeded jobs from schedule {id}"),
        deadline,
        || {
            let jobs = schedule_jobs(server, id);
            let ok = jobs.iter().filter(|j| j["state"] == "succeeded").count();
            (ok >= n).then_some(jobs)
        },
    )
}

fn schedule_entry(server: &TestServer, id: i64) -> Option<Value> {
    server
        .json(&["schedule", "list"])
        .as_array()
        .expect("schedule list is an array")
        .iter()
        .find(|s| s["id"] == id)
        .cloned()
}

fn millis(v: &Value) -> i64 {
    v.as_i64()
        .unwrap_or_else(|| panic!("expected a millisecond time, got {v}"))
}

#[test]
fn every_1s_fires_repeatedly_about_one_second_apart() {
    let server = TestServer::start("sched-every");
    let agent = TestAgent::start(&server, "alpha");
    let target = format!("agent:{}", agent.name);

    let id = add_schedule(
        &server,
        &["--to", &target, "--every", "1s", "--", "/bin/echo", "tick"],
    );
    let jobs = wait_succeeded(&server, id, 3, DEADLINE);

    let succeeded: Vec<&Value> = jobs.iter().filter(|j| j["state"] == "succeeded").collect();
    assert!(succeeded.len() >= 3, "{jobs:#?}");
    for job in &succeeded {
        assert_eq!(job["stdout"], "tick\n", "{job:#}");
        assert_eq!(job["agent_id"], agent.id.as_str());
    }
    // Every firing (not just the successful ones) is about one second after the last.
    let created: Vec<i64> = jobs.iter().map(|j| millis(&j["created_at"])).collect();
    for pair in created.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            (800..=3000).contains(&gap),
            "firings of an `--every 1s` schedule should be ~1 s apart, got {gap} ms: {created:?}"
        );
    }
    // Nothing is refused by the agent's minimum-interval guard.
    assert!(
        jobs.iter()
            .all(|j| ["succeeded", "queued", "delivered", "running"]
                .contains(&j["state"].as_str().unwrap_or_default())),
        "{jobs:#?}"
    );
}

#[test]
fn at_fires_exactly_once() {
    let server = TestServer::start("sched-at");
    let agent = TestAgent::start(&server, "alpha");
    let target = format!("agent:{}", agent.name);

    let once = add_schedule(
        &server,
        &["--to", &target, "--at", "+2s", "--", "/bin/echo", "once"],
    );
    let entry = schedule_entry(&server, once).expect("the new schedule is listed");
    let at = millis(&entry["next_fire_at"]);
    assert!(
        schedule_jobs(&server, once).is_empty(),
        "fired before its time"
    );

    let jobs = wait_succeeded(&server, once, 1, DEADLINE);
    assert_eq!(jobs.len(), 1, "{jobs:#?}");
    assert_eq!(jobs[0]["stdout"], "once\n");
    assert!(
        millis(&jobs[0]["created_at"]) >= at,
        "fired at {} before its time {at}",
        jobs[0]["created_at"]
    );

    // Let the scheduler keep working for a while: a marker schedule firing three times
    // (over two seconds) proves several later ticks happened.
    let marker = add_schedule(
        &server,
        &[
            "--to",
            &target,
            "--every",
            "1s",
            "--",
            "/bin/echo",
            "marker",
        ],
    );
    wait_succeeded(&server, marker, 3, DEADLINE);

    let jobs = schedule_jobs(&server, once);
    assert_eq!(
        jobs.len(),
        1,
        "an --at schedule fired more than once: {jobs:#?}"
    );
    let entry = schedule_entry(&server, once);
    if let Some(entry) = entry {
        assert!(
            entry["next_fire_at"].is_null(),
            "a fired --at schedule still has a next fire time: {entry:#}"
        );
    }
}

#[test]
fn schedule_rm_stops_the_schedule() {
    let server = TestServer::start("sched-rm");
    let agent = TestAgent::start(&server, "alpha");
    let target = format!("agent:{}", agent.name);

    let doomed = add_schedule(
        &server,
        &[
            "--to",
            &target,
            "--every",
            "1s",
            "--",
            "/bin/echo",
            "doomed",
        ],
    );
    wait_succeeded(&server, doomed, 2, DEADLINE);

    let out = server.cli_ok(&["schedule", "rm", &doomed.to_string()]);
    assert!(out.contains(&format!("schedule {doomed} removed")), "{out}");
    let after_rm = jobs_with_action(&server, "/bin/echo doomed").len();
    assert!(
        schedule_entry(&server, doomed).is_none(),
        "removed schedule still listed"
    );

    // Removing it again is an error, not a silent success.
    let again = server.cli(&["schedule", "rm", &doomed.to_string()]);
    assert!(
        !again.status.success(),
        "removing a removed schedule succeeded"
    );

    // A marker schedule created after the removal fires three times (two seconds and
    // more of scheduler ticks in which the removed one would have fired twice). Its
    // jobs are counted by action, not by schedule id.
    add_schedule(
        &server,
        &[
            "--to",
            &target,
            "--every",
            "1s",
            "--",
            "/bin/echo",
            "marker",
        ],
    );
    wait_until("3 succeeded marker jobs", DEADLINE, || {
        let ok = jobs_with_action(&server, "/bin/echo marker")
            .iter()
            .filter(|j| j["state"] == "succeeded")
            .count();
        (ok >= 3).then_some(())
    });

    // Count by the doomed schedule's own action, so the check does not depend on ids.
    let doomed_jobs = jobs_with_action(&server, "/bin/echo doomed");
    assert_eq!(
        doomed_jobs.len(),
        after_rm,
        "a removed schedule kept creating jobs: {doomed_jobs:#?}"
    );
}

#[test]
fn schedule_ids_are_not_reused_after_rm() {
    let server = TestServer::start("sched-id-reuse");
    let agent = TestAgent::start(&server, "alpha");
    let target = format!("agent:{}", agent.name);

    let old = add_schedule(
        &server,
        &["--to", &target, "--every", "1s", "--", "/bin/echo", "old"],
    );
    wait_succeeded(&server, old, 1, DEADLINE);
    server.cli_ok(&["schedule", "rm", &old.to_string()]);

    // A schedule added after the removal must get a fresh id; otherwise it inherits the
    // removed schedule's past jobs (and, with `--missed run-once`, its queued jobs
    // suppress the new schedule's firings for offline agents).
    let new = add_schedule(
        &server,
        &["--to", &target, "--at", "+1h", "--", "/bin/echo", "new"],
    );
    let inherited = schedule_jobs(&server, new);
    assert!(
        inherited.is_empty(),
        "schedule {new} (added after `schedule rm {old}`) already has jobs of the removed \
         schedule: {inherited:#?}"
    );
    assert_ne!(new, old, "schedule id {old} was reused after `schedule rm`");
}

/// Asserts `schedule add` refused with a non-zero status and one clear sentence on
/// stderr that mentions every word of `mentions`.
fn assert_refused(server: &TestServer, args: &[&str], mentions: &[&str]) {
    let mut all = vec!["schedule", "add", "--to", "all"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--", "/bin/true"]);
    let out = server.cli(&all);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "{all:?} succeeded; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        out.status.code().is_some(),
        "{all:?} died of a signal: {}",
        out.status
    );
    for bad in [
        "panicked",
        "backtrace",
        "RUST_BACKTRACE",
        "Error {",
        "thread '",
    ] {
        assert!(
            !stderr.contains(bad),
            "{all:?} stderr contains {bad:?}:\n{stderr}"
        );
    }
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "{all:?} should print one sentence, got:\n{stderr}"
    );
    assert!(lines[0].starts_with("herald-server: "), "{all:?}: {stderr}");
    for word in mentions {
        assert!(
            lines[0].contains(word),
            "{all:?}: the error should mention {word:?}: {stderr}"
        );
    }
}

#[test]
fn schedule_add_refuses_bad_cron_and_unknown_time_zone() {
    let server = TestServer::start("sched-bad");

    assert_refused(&server, &["--cron", "61 * * * *"], &["cron", "61"]);
    assert_refused(&server, &["--cron", "* * *"], &["cron"]);
    assert_refused(&server, &["--cron", "every tuesday"], &["cron"]);
    assert_refused(&server, &["--cron", "0 0 30 2 *"], &["cron"]);
    assert_refused(
        &server,
        &["--cron", "0 3 * * *", "--tz", "Mars/Olympus_Mons"],
        &["time zone", "Mars/Olympus_Mons"],
    );
    assert_refused(
        &server,
        &["--at", "2099-01-01 10:00", "--tz", "Nowhere/Atlantis"],
        &["time zone", "Nowhere/Atlantis"],
    );

    // Nothing was stored by the refused commands.
    let schedules = server.json(&["schedule", "list"]);
    assert_eq!(schedules, serde_json::json!([]), "{schedules:#}");
}
