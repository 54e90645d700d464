//! A damaged row in the server's database fails alone: an unreadable stored order fails
//! its own job (state and reason stored, one warning in the log) while the agent stays
//! connected and every other job still reaches it; an unreadable schedule stops firing
//! while the others go on.

use herald_tests::{wait_until, TestAgent, TestServer, DEADLINE};

/// Replaces a job's stored signed order with 200 random bytes, as a damaged disk would.
fn damage_order_of(server: &TestServer, job_id: i64) {
    let db = rusqlite::Connection::open(server.db_path()).expect("open herald.db");
    let changed = db
        .execute(
            "UPDATE orders SET envelope = randomblob(200)
             WHERE id = (SELECT order_id FROM jobs WHERE id = ?1)",
            [job_id],
        )
        .expect("damage the order");
    assert_eq!(changed, 1);
}

fn warnings_about(server: &TestServer, needle: &str) -> usize {
    herald_tests::strip_ansi(&std::fs::read_to_string(server.log_path()).unwrap_or_default())
        .lines()
        .filter(|l| l.contains("WARN") && l.contains(needle))
        .count()
}

#[test]
fn a_damaged_stored_order_fails_alone() {
    if herald_tests::sqlite_only("damages an order row in herald.db") {
        return;
    }
    let mut server = TestServer::start("damaged-order");
    let mut agent = TestAgent::enroll(&server, "laptop", &[]);
    let damaged = server.run_job("agent:laptop", &[], &["/bin/echo", "never sent"])[0];
    let healthy = server.run_job("agent:laptop", &[], &["/bin/echo", "still sent"])[0];

    server.kill();
    damage_order_of(&server, damaged);
    server.spawn();
    agent.spawn();

    // The healthy job, queued after the damaged one, still arrives and runs.
    let job = server.wait_job_state(healthy, "succeeded", DEADLINE);
    assert_eq!(job["stdout"], "still sent\n", "{job:#}");
    let job = server.wait_job_state(damaged, "failed", DEADLINE);
    let error = job["error"].as_str().unwrap_or_default();
    assert!(error.contains("stored order is damaged"), "{job:#}");

    // The link stays up: new work goes through at once.
    agent.wait_online(&server);
    let out = server.cli_ok(&[
        "run",
        "--to",
        "agent:laptop",
        "--wait",
        "--",
        "/bin/echo",
        "after",
    ]);
    assert!(out.contains("after"), "{out}");

    // Said once, at warn level, with the job id.
    let needle = format!("job={damaged}");
    wait_until("the warning about the damaged job", DEADLINE, || {
        (warnings_about(&server, &needle) > 0).then_some(())
    });
    agent.kill();
    agent.spawn();
    agent.wait_online(&server);
    server.cli_ok(&["run", "--to", "agent:laptop", "--wait", "--", "/bin/true"]);
    assert_eq!(warnings_about(&server, &needle), 1, "{}", server.log_tail());
}

#[test]
fn a_damaged_schedule_stops_alone() {
    if herald_tests::sqlite_only("damages a schedule row in herald.db") {
        return;
    }
    let mut server = TestServer::start("damaged-schedule");
    let _agent = TestAgent::start(&server, "desk");
    let add = |text: &str| {
        let out = server.cli_ok(&[
            "schedule",
            "add",
            "--to",
            "agent:desk",
            "--every",
            "1s",
            "--",
            "/bin/echo",
            text,
        ]);
        out.strip_prefix("schedule ")
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|id| id.parse::<i64>().ok())
            .unwrap_or_else(|| panic!("unexpected `schedule add` output: {out:?}"))
    };
    let broken = add("broken");
    let healthy = add("healthy");

    server.kill();
    {
        let db = rusqlite::Connection::open(server.db_path()).expect("open herald.db");
        db.execute(
            "UPDATE schedules SET spec = 'not json at all' WHERE id = ?1",
            [broken],
        )
        .expect("damage the schedule");
    }
    server.spawn();

    // The healthy schedule keeps firing after the restart: count its new jobs.
    let jobs_of = |id: i64| {
        herald_tests::all_jobs(&server)
            .into_iter()
            .filter(|j| j["schedule_id"] == id)
            .count()
    };
    let before = jobs_of(healthy);
    wait_until("the healthy schedule to fire twice more", DEADLINE, || {
        (jobs_of(healthy) >= before + 2).then_some(())
    });
    let needle = format!("schedule={broken}");
    assert_eq!(warnings_about(&server, &needle), 1, "{}", server.log_tail());
}
