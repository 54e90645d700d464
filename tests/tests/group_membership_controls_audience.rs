//! Group membership decides who a `group:` job reaches: `groups add` puts an agent in
//! the audience, `groups remove` takes it out again (a job for an empty group is
//! refused with a clear error and creates nothing), and a token scoped with `--group`
//! puts the agent in that group from enrollment. The agent keeps its own, signed view of
//! its groups: it learns of additions and removals and a group schedule for a group
//! that is empty again fires for nobody.

use herald_tests::{
    add_schedule, all_jobs, strip_ansi, wait_until, TestAgent, TestServer, DEADLINE,
};
use serde_json::Value;

/// The groups `agents show --json` lists for an agent.
fn groups_of(server: &TestServer, agent: &str) -> Vec<String> {
    let detail = server.json(&["agents", "show", agent]);
    detail["groups"]
        .as_array()
        .unwrap_or_else(|| panic!("`agents show {agent} --json` has no groups list: {detail:#}"))
        .iter()
        .map(|g| g.as_str().expect("group names are strings").to_string())
        .collect()
}

/// `next_fire_at` of schedule `id` as `schedule list --json` reports it.
fn next_fire_at(server: &TestServer, id: i64) -> i64 {
    let list = server.json(&["schedule", "list"]);
    let entry = list
        .as_array()
        .expect("schedule list is an array")
        .iter()
        .find(|s| s["id"] == id)
        .unwrap_or_else(|| panic!("schedule {id} not listed: {list:#}"))
        .clone();
    entry["next_fire_at"]
        .as_i64()
        .unwrap_or_else(|| panic!("schedule {id} has no next fire time: {entry:#}"))
}

/// The group lists the agent logged as applied ("groups updated"), in order.
fn logged_group_updates(agent: &TestAgent) -> Vec<String> {
    strip_ansi(&agent.log())
        .lines()
        .filter(|l| l.contains("groups updated"))
        .map(|l| {
            l.split("groups=")
                .nth(1)
                .unwrap_or_default()
                .trim()
                .to_string()
        })
        .collect()
}

#[test]
fn group_membership_controls_audience() {
    let server = TestServer::start("groups-audience");
    let alpha = TestAgent::start(&server, "alpha");
    let bravo = TestAgent::start(&server, "bravo");
    assert!(groups_of(&server, "alpha").is_empty());
    assert!(groups_of(&server, "bravo").is_empty());

    // alpha joins web: a group:web job reaches alpha, and only alpha.
    let out = server.cli_ok(&["groups", "add", "alpha", "web"]);
    assert!(out.contains("web"), "{out}");
    assert_eq!(groups_of(&server, "alpha"), ["web"]);
    assert_eq!(groups_of(&server, &alpha.id), ["web"], "show by id");
    assert!(groups_of(&server, "bravo").is_empty());

    let ids = server.run_job("group:web", &[], &["/bin/echo", "for web"]);
    assert_eq!(ids.len(), 1, "group:web has one member: {ids:?}");
    let job = server.wait_job_state(ids[0], "succeeded", DEADLINE);
    assert_eq!(job["agent_id"], alpha.id.as_str(), "{job:#}");
    assert_eq!(job["stdout"], "for web\n", "{job:#}");
    let jobs = all_jobs(&server);
    assert_eq!(jobs.len(), 1, "exactly one job was created: {jobs:#?}");
    assert!(
        jobs.iter().all(|j| j["agent_id"] != bravo.id.as_str()),
        "{jobs:#?}"
    );

    // alpha leaves web: group:web is empty, a job for it is refused and nothing stored.
    server.cli_ok(&["groups", "remove", "alpha", "web"]);
    assert!(groups_of(&server, "alpha").is_empty());
    let refused = server.cli(&["run", "--to", "group:web", "--", "/bin/echo", "nobody"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success(),
        "run --to group:web with no members succeeded: {}",
        String::from_utf8_lossy(&refused.stdout)
    );
    assert!(
        stderr.contains("no active agent matches") && stderr.contains("group:web"),
        "the error should say no agent matches group:web: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let jobs = all_jobs(&server);
    assert_eq!(jobs.len(), 1, "a refused run created jobs: {jobs:#?}");

    // A token scoped to ops puts its agent in ops from enrollment.
    let mut charlie = TestAgent::enroll(&server, "charlie", &["--group", "ops"]);
    assert_eq!(groups_of(&server, "charlie"), ["ops"]);
    charlie.spawn();
    charlie.wait_online(&server);
    let ids = server.run_job("group:ops", &[], &["/bin/echo", "for ops"]);
    assert_eq!(ids.len(), 1, "group:ops has one member: {ids:?}");
    let job = server.wait_job_state(ids[0], "succeeded", DEADLINE);
    assert_eq!(job["agent_id"], charlie.id.as_str(), "{job:#}");
    assert_eq!(job["stdout"], "for ops\n", "{job:#}");

    // bravo joins and leaves web; the agent itself applies both signed memberships.
    server.cli_ok(&["groups", "add", "bravo", "web"]);
    wait_until("bravo to apply its web membership", DEADLINE, || {
        logged_group_updates(&bravo)
            .last()
            .is_some_and(|g| g.contains("\"web\""))
            .then_some(())
    });
    server.cli_ok(&["groups", "remove", "bravo", "web"]);
    assert!(groups_of(&server, "bravo").is_empty());
    wait_until("bravo to apply leaving web", DEADLINE, || {
        let updates = logged_group_updates(&bravo);
        (updates.len() >= 2 && updates.last().is_some_and(|g| !g.contains("web"))).then_some(())
    });

    // A group:web schedule now fires for nobody: let three occurrences pass.
    let jobs_before = all_jobs(&server).len();
    let id = add_schedule(
        &server,
        &[
            "--to",
            "group:web",
            "--every",
            "1s",
            "--",
            "/bin/echo",
            "web schedule",
        ],
    );
    let first = next_fire_at(&server, id);
    wait_until("three group:web occurrences to pass", DEADLINE, || {
        (next_fire_at(&server, id) >= first + 3000).then_some(())
    });
    let jobs = all_jobs(&server);
    let from_schedule: Vec<&Value> = jobs.iter().filter(|j| j["schedule_id"] == id).collect();
    assert!(
        from_schedule.is_empty(),
        "a group:web schedule created jobs although web is empty: {from_schedule:#?}"
    );
    assert!(
        jobs.iter().all(|j| j["agent_id"] != bravo.id.as_str()),
        "bravo got a job: {jobs:#?}"
    );
    assert_eq!(jobs.len(), jobs_before, "{jobs:#?}");
    let log = bravo.log();
    assert!(
        !log.contains("web schedule"),
        "bravo was sent the group:web schedule's action:\n{log}"
    );
}
