//! `--splay` spreads one firing of a schedule over time: the jobs of a firing are all
//! created at once, but each agent's job is delivered (and started) after its own delay
//! below the splay, so not all at the same moment. A splay above half the interval is
//! refused.

use std::collections::BTreeSet;
use std::time::Duration;

use herald_tests::{add_schedule, schedule_entry, wait_until, TestAgent, TestServer};
use serde_json::Value;

const AGENTS: usize = 4;
const SPLAY_MS: i64 = 4_000;

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

fn millis(job: &Value, field: &str) -> i64 {
    job[field]
        .as_i64()
        .unwrap_or_else(|| panic!("job has no {field}: {job:#}"))
}

/// max − min of a job time field over `jobs`.
fn spread(jobs: &[Value], field: &str) -> i64 {
    let times: Vec<i64> = jobs.iter().map(|j| millis(j, field)).collect();
    times.iter().max().expect("jobs") - times.iter().min().expect("jobs")
}

#[test]
fn splay_spreads_delivery() {
    let server = TestServer::start("splay");
    let agents: Vec<TestAgent> = (0..AGENTS)
        .map(|i| TestAgent::start(&server, &format!("node{i}")))
        .collect();
    let ids: BTreeSet<&str> = agents.iter().map(|a| a.id.as_str()).collect();

    // A splay above half the interval is refused (the agents' minimum-interval guard
    // could not tell splayed runs from a loop).
    let refused = server.cli(&[
        "schedule",
        "add",
        "--to",
        "all",
        "--every",
        "10s",
        "--splay",
        "6s",
        "--",
        "/bin/true",
    ]);
    assert!(!refused.status.success(), "--splay 6s --every 10s accepted");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--splay"), "{stderr}");

    let id = add_schedule(
        &server,
        &[
            "--to",
            "all",
            "--every",
            "10s",
            "--splay",
            "4s",
            "--",
            "/bin/echo",
            "splayed",
        ],
    );
    let entry = schedule_entry(&server, id);
    assert_eq!(entry["splay_ms"], SPLAY_MS, "{entry:#}");
    let first = entry["next_fire_at"]
        .as_i64()
        .unwrap_or_else(|| panic!("no next fire time: {entry:#}"));

    // One firing: every agent's job of it has succeeded.
    let jobs = wait_until(
        "every agent's job of the first firing to succeed",
        Duration::from_secs(25),
        || {
            let jobs = schedule_jobs(&server, id);
            let first_created = jobs.first().map(|j| millis(j, "created_at"))?;
            let firing: Vec<Value> = jobs
                .into_iter()
                .filter(|j| millis(j, "created_at") < first_created + 1_000)
                .collect();
            (firing.len() >= AGENTS && firing.iter().all(|j| j["state"] == "succeeded"))
                .then_some(firing)
        },
    );

    assert_eq!(jobs.len(), AGENTS, "one job per agent: {jobs:#?}");
    let got: BTreeSet<&str> = jobs
        .iter()
        .map(|j| j["agent_id"].as_str().expect("agent id"))
        .collect();
    assert_eq!(got, ids, "one job for each agent: {jobs:#?}");
    for job in &jobs {
        assert_eq!(job["stdout"], "splayed\n", "{job:#}");
        let created = millis(job, "created_at");
        assert!(created >= first, "fired before its time {first}: {job:#}");
        for field in ["delivered_at", "started_at"] {
            let delay = millis(job, field) - created;
            assert!(
                (0..SPLAY_MS + 500).contains(&delay),
                "{field} is {delay} ms after creation, outside the 4 s splay: {job:#}"
            );
        }
    }
    assert!(
        spread(&jobs, "created_at") < 1_000,
        "the jobs of one firing are created together: {jobs:#?}"
    );
    for field in ["delivered_at", "started_at"] {
        let s = spread(&jobs, field);
        assert!(
            s > 0 && s < SPLAY_MS + 500,
            "{field} should be spread over (0, 4.5) s, spread is {s} ms: {jobs:#?}"
        );
    }
}
