//! Occurrences missed while an agent is offline follow the schedule's `--missed`
//! policy: `run-once` coalesces them into a single waiting job however many pass,
//! `skip` creates nothing for the offline agent. When the agent comes up the coalesced
//! job runs and both schedules go on firing normally, whenever between two occurrences
//! the agent happens to come back (the catch-up run must not make the agent refuse the
//! next regular occurrence as "too soon").

use std::time::Duration;

use herald_tests::{
    add_schedule, now_ms, schedule_entry, wait_until, TestAgent, TestServer, DEADLINE,
};
use serde_json::Value;

fn next_fire_at(server: &TestServer, id: i64) -> i64 {
    let entry = schedule_entry(server, id);
    entry["next_fire_at"]
        .as_i64()
        .unwrap_or_else(|| panic!("schedule {id} has no next fire time: {entry:#}"))
}

/// Every job created by schedule `id`, oldest first.
fn schedule_jobs(server: &TestServer, id: i64) -> Vec<Value> {
    let jobs = server.json(&["jobs", "list", "--limit", "10000"]);
    let mut jobs: Vec<Value> = jobs
        .as_array()
        .expect("jobs list is an array")
        .iter()
        .filter(|j| j["schedule_id"] == id)
        .cloned()
        .collect();
    jobs.sort_by_key(|j| j["id"].as_i64());
    jobs
}

/// States a job of a healthy schedule may be in.
const HEALTHY: [&str; 4] = ["queued", "delivered", "running", "succeeded"];

/// Polls `check` every few milliseconds (for waits whose timing matters) until it
/// holds, or panics after `deadline`.
fn wait_closely(what: &str, deadline: Duration, mut check: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !check() {
        assert!(start.elapsed() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// When, relative to the run-once schedule's occurrences, the agent comes back.
#[derive(Clone, Copy)]
enum Return {
    /// Right after an occurrence: the catch-up run is most of an interval before the
    /// next one.
    JustAfterOccurrence,
    /// About 450 ms before an occurrence (less than the signed minimum interval of
    /// 500 ms for `--every 1s`): the catch-up run and the next regular run are close.
    JustBeforeOccurrence,
}

#[test]
fn missed_runs_follow_policy() {
    missed_runs("missed-policy", Return::JustAfterOccurrence);
}

#[test]
fn catch_up_run_does_not_refuse_the_next_occurrence() {
    missed_runs("missed-policy-late", Return::JustBeforeOccurrence);
}

fn missed_runs(name: &str, comes_back: Return) {
    let server = TestServer::start(name);
    let mut sleeper = TestAgent::enroll(&server, "sleeper", &[]);
    assert!(
        !server.agent_online(&sleeper.id),
        "never started, yet online"
    );

    let once = add_schedule(
        &server,
        &[
            "--to",
            "agent:sleeper",
            "--every",
            "1s",
            "--missed",
            "run-once",
            "--",
            "/bin/echo",
            "run-once",
        ],
    );
    let skip = add_schedule(
        &server,
        &[
            "--to",
            "agent:sleeper",
            "--every",
            "1s",
            "--missed",
            "skip",
            "--",
            "/bin/echo",
            "skip",
        ],
    );
    assert_eq!(schedule_entry(&server, once)["missed"], "run-once");
    assert_eq!(schedule_entry(&server, skip)["missed"], "skip");

    // Let at least three occurrences of each pass while the agent is down.
    let once_first = next_fire_at(&server, once);
    let skip_first = next_fire_at(&server, skip);
    wait_until(
        "three occurrences of both schedules to pass",
        DEADLINE,
        || {
            (next_fire_at(&server, once) >= once_first + 3000
                && next_fire_at(&server, skip) >= skip_first + 3000)
                .then_some(())
        },
    );

    let once_jobs = schedule_jobs(&server, once);
    assert_eq!(
        once_jobs.len(),
        1,
        "run-once must coalesce missed occurrences into one job: {once_jobs:#?}"
    );
    let catch_up = &once_jobs[0];
    assert_eq!(catch_up["state"], "queued", "{catch_up:#}");
    assert_eq!(catch_up["agent_id"], sleeper.id.as_str(), "{catch_up:#}");
    assert!(catch_up["delivered_at"].is_null(), "{catch_up:#}");
    let catch_up_id = catch_up["id"].as_i64().expect("job id");

    let skip_jobs = schedule_jobs(&server, skip);
    assert!(
        skip_jobs.is_empty(),
        "a skip schedule created jobs for an offline agent: {skip_jobs:#?}"
    );

    // The agent comes up (at a chosen point between two occurrences): the coalesced
    // job runs.
    match comes_back {
        Return::JustAfterOccurrence => {
            let next = next_fire_at(&server, once);
            wait_closely("the next run-once occurrence", DEADLINE, || {
                next_fire_at(&server, once) > next
            });
        }
        Return::JustBeforeOccurrence => {
            let next = next_fire_at(&server, once);
            wait_closely("450 ms before the next occurrence", DEADLINE, || {
                now_ms() >= next - 450
            });
        }
    }
    sleeper.spawn();
    sleeper.wait_online(&server);
    let job = server.wait_job_state(catch_up_id, "succeeded", DEADLINE);
    assert_eq!(job["stdout"], "run-once\n", "{job:#}");

    // Both schedules go on firing normally for the now-online agent.
    let (once_jobs, skip_jobs) = wait_until(
        "two more succeeded runs of each schedule",
        Duration::from_secs(15),
        || {
            let once_jobs = schedule_jobs(&server, once);
            let skip_jobs = schedule_jobs(&server, skip);
            let ok = |jobs: &[Value]| {
                jobs.iter()
                    .filter(|j| j["id"] != catch_up_id && j["state"] == "succeeded")
                    .count()
            };
            (ok(&once_jobs) >= 2 && ok(&skip_jobs) >= 2).then_some((once_jobs, skip_jobs))
        },
    );
    for job in once_jobs.iter().chain(&skip_jobs) {
        assert!(
            HEALTHY.contains(&job["state"].as_str().unwrap_or_default()),
            "a run after the agent came back did not go through: {job:#}\n\
             run-once jobs: {once_jobs:#?}\nskip jobs: {skip_jobs:#?}"
        );
        assert_eq!(job["agent_id"], sleeper.id.as_str(), "{job:#}");
    }
    for (jobs, out) in [(&once_jobs, "run-once\n"), (&skip_jobs, "skip\n")] {
        for job in jobs.iter().filter(|j| j["state"] == "succeeded") {
            assert_eq!(job["stdout"], out, "{job:#}");
        }
    }
}
