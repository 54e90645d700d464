//! A server killed with SIGKILL and restarted keeps its state: schedules, queued jobs
//! and finished results survive, a running agent reconnects by itself, and new work
//! goes through.

use herald_tests::{now_ms, wait_until, TestAgent, TestServer, DEADLINE};
use serde_json::Value;

/// How many times the server log says it started serving.
fn serving_count(server: &TestServer) -> usize {
    std::fs::read_to_string(server.log_path())
        .unwrap_or_default()
        .matches("herald-server serving")
        .count()
}

/// SIGKILLs the server and starts it again on the same data directory and ports,
/// waiting until the *new* process serves (the log is appended to, so the harness's
/// own readiness check would see the first process's line).
fn kill_and_restart(server: &mut TestServer) {
    let before = serving_count(server);
    server.kill();
    server.spawn();
    wait_until("the restarted server to serve", DEADLINE, || {
        (serving_count(server) > before).then_some(())
    });
}

fn schedule_id(out: &str) -> i64 {
    out.strip_prefix("schedule ")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("unexpected `schedule add` output: {out:?}"))
}

fn without_next_fire(mut schedules: Value, id: i64) -> Value {
    for s in schedules.as_array_mut().expect("schedule list is an array") {
        if s["id"] == id {
            s["next_fire_at"] = Value::Null;
        }
    }
    schedules
}

#[test]
fn server_restart_keeps_state() {
    let mut server = TestServer::start("restart");
    let mut runner = TestAgent::start(&server, "runner");
    let mut sleeper = TestAgent::enroll(&server, "sleeper", &[]);
    let runner_pid = runner.pid();

    // A finished job with output.
    let done = server.cli(&[
        "run",
        "--to",
        "agent:runner",
        "--wait",
        "--",
        "/bin/echo",
        "before the crash",
    ]);
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let finished = server.json(&["jobs", "list"])[0].clone();
    assert_eq!(finished["state"], "succeeded", "{finished:#}");
    assert_eq!(finished["stdout"], "before the crash\n");
    let finished_id = finished["id"].as_i64().expect("job id");

    // Schedules: two that will not fire during the test, and one that fires every second
    // (for the offline agent, so with `--missed skip` it only creates jobs once that
    // agent is up after the restart).
    server.cli_ok(&[
        "schedule",
        "add",
        "--to",
        "all",
        "--cron",
        "0 3 * * *",
        "--tz",
        "Europe/Berlin",
        "--missed",
        "run-once",
        "--",
        "/bin/echo",
        "nightly",
    ]);
    server.cli_ok(&[
        "schedule",
        "add",
        "--to",
        "agent:sleeper",
        "--every",
        "1h",
        "--ttl",
        "2h",
        "--",
        "/bin/echo",
        "hourly",
    ]);
    let ticking = schedule_id(&server.cli_ok(&[
        "schedule",
        "add",
        "--to",
        "agent:sleeper",
        "--every",
        "1s",
        "--",
        "/bin/echo",
        "tick",
    ]));
    let schedules = server.json(&["schedule", "list"]);
    assert_eq!(schedules.as_array().map(Vec::len), Some(3), "{schedules:#}");

    // A job queued for the offline agent.
    let queued = server.run_job("agent:sleeper", &[], &["/bin/echo", "survived the crash"]);
    assert_eq!(queued.len(), 1, "{queued:?}");
    let queued = queued[0];
    assert_eq!(server.job(queued)["state"], "queued");

    let restarted_at = now_ms();
    kill_and_restart(&mut server);

    // Schedules are unchanged (the ticking one's next fire time moves on, of course).
    let after = server.json(&["schedule", "list"]);
    assert_eq!(
        without_next_fire(after, ticking),
        without_next_fire(schedules, ticking),
        "schedules changed across the restart"
    );
    // Results survive.
    let job = server.job(finished_id);
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(job["stdout"], "before the crash\n", "{job:#}");
    assert_eq!(job["exit_code"], 0);
    // The queued job is still queued.
    let job = server.job(queued);
    assert_eq!(job["state"], "queued", "{job:#}");

    // The job queued before the crash is delivered when its agent comes up.
    sleeper.spawn();
    sleeper.wait_online(&server);
    let job = server.wait_job_state(queued, "succeeded", DEADLINE);
    assert_eq!(job["stdout"], "survived the crash\n", "{job:#}");
    assert_eq!(job["agent_id"], sleeper.id.as_str());

    // The surviving interval schedule keeps firing after the restart.
    wait_until(
        "the 1s schedule to fire after the restart",
        DEADLINE,
        || {
            let jobs = server.json(&["jobs", "list", "--limit", "10000"]);
            jobs.as_array()
                .expect("jobs list is an array")
                .iter()
                .any(|j| {
                    j["schedule_id"] == ticking
                        && j["state"] == "succeeded"
                        && j["created_at"].as_i64() > Some(restarted_at)
                })
                .then_some(())
        },
    );

    // The running agent reconnects by itself (same process, not restarted by us).
    // A crashed server cannot close connections, so this relies on the agent noticing
    // the dead connection (keep-alive, stateless reset) in good time.
    wait_until(
        "the running agent to reconnect to the restarted server",
        DEADLINE,
        || server.agent_online(&runner.id).then_some(()),
    );
    assert!(runner.try_wait().is_none(), "the agent process exited");
    assert_eq!(runner.pid(), runner_pid);

    // New work goes through.
    let out = server.cli(&[
        "run",
        "--to",
        "agent:runner",
        "--wait",
        "--",
        "/bin/echo",
        "after the crash",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "after the crash\n");
}
