//! Jobs for an enrolled agent that is not running wait for it: they stay `queued` and
//! run once it connects, unless their TTL passes first, in which case they end `expired`
//! and are never run.

use std::time::Duration;

use herald_tests::{TestAgent, TestServer, DEADLINE};

fn millis(v: &serde_json::Value) -> i64 {
    v.as_i64()
        .unwrap_or_else(|| panic!("expected a millisecond time, got {v}"))
}

#[test]
fn offline_agent_gets_queued_jobs() {
    let server = TestServer::start("offline-queued");
    let mut sleeper = TestAgent::enroll(&server, "sleeper", &[]);
    assert!(
        !server.agent_online(&sleeper.id),
        "never started, yet online"
    );

    let target = format!("agent:{}", sleeper.name);
    let ids = server.run_job(&target, &[], &["/bin/echo", "waited for you"]);
    assert_eq!(ids.len(), 1, "one job for one agent: {ids:?}");
    let job_id = ids[0];
    assert_eq!(server.job(job_id)["state"], "queued");

    // Prove the server is busy delivering other work meanwhile: a second, running agent
    // gets and finishes a job; the offline agent's job is still untouched.
    let _awake = TestAgent::start(&server, "awake");
    let marker = server.cli(&[
        "run",
        "--to",
        "agent:awake",
        "--wait",
        "--",
        "/bin/echo",
        "marker",
    ]);
    assert!(
        marker.status.success(),
        "{}",
        String::from_utf8_lossy(&marker.stderr)
    );
    let job = server.job(job_id);
    assert_eq!(job["state"], "queued", "{job:#}");
    assert!(job["delivered_at"].is_null(), "{job:#}");
    assert!(job["started_at"].is_null(), "{job:#}");

    // The agent starts: the queued job is delivered, runs and succeeds.
    sleeper.spawn();
    sleeper.wait_online(&server);
    let job = server.wait_job_state(job_id, "succeeded", DEADLINE);
    assert_eq!(job["stdout"], "waited for you\n", "{job:#}");
    assert_eq!(job["exit_code"], 0);
    assert_eq!(job["agent_id"], sleeper.id.as_str());
    let created = millis(&job["created_at"]);
    let delivered = millis(&job["delivered_at"]);
    assert!(delivered >= created, "{job:#}");
    // started_at is the agent's clock and delivered_at the server's when it handled the
    // ack, which may arrive after the job started: only compare with creation.
    assert!(millis(&job["started_at"]) >= created, "{job:#}");
}

#[test]
fn offline_agent_job_with_ttl_expires_and_never_runs() {
    let server = TestServer::start("offline-ttl");
    let mut sleeper = TestAgent::enroll(&server, "sleeper", &[]);
    let target = format!("agent:{}", sleeper.name);

    // The program leaves a trace if it ever runs.
    let trace = server.dir.path().join("expired-job-ran");
    let script = format!("echo ran > '{}'", trace.display());
    let ids = server.run_job(&target, &["--ttl", "2s"], &["/bin/sh", "-c", &script]);
    assert_eq!(ids.len(), 1, "{ids:?}");
    let job_id = ids[0];
    let job = server.job(job_id);
    assert_eq!(job["state"], "queued", "{job:#}");
    assert_eq!(
        millis(&job["expires_at"]) - millis(&job["created_at"]),
        2000,
        "--ttl 2s sets the expiry: {job:#}"
    );

    let job = server.wait_job_state(job_id, "expired", Duration::from_secs(15));
    assert!(
        millis(&job["finished_at"]) >= millis(&job["expires_at"]),
        "expired before its TTL: {job:#}"
    );
    assert!(job["delivered_at"].is_null(), "{job:#}");

    // Now the agent connects. A fresh marker job reaching it proves it has been served
    // everything the server considers pending.
    sleeper.spawn();
    sleeper.wait_online(&server);
    let marker = server.run_job(&target, &[], &["/bin/echo", "marker"]);
    assert_eq!(marker.len(), 1, "{marker:?}");
    let marker = server.wait_job_state(marker[0], "succeeded", DEADLINE);
    assert_eq!(marker["stdout"], "marker\n");

    let job = server.job(job_id);
    assert_eq!(job["state"], "expired", "an expired job changed: {job:#}");
    assert!(job["delivered_at"].is_null(), "{job:#}");
    assert!(job["started_at"].is_null(), "{job:#}");
    assert!(job["exit_code"].is_null(), "{job:#}");
    assert!(
        !trace.exists(),
        "the expired job's program ran on the agent ({} exists)",
        trace.display()
    );
    let log = sleeper.log();
    assert!(
        !log.contains("expired-job-ran"),
        "the agent was sent the expired job:\n{log}"
    );
}
