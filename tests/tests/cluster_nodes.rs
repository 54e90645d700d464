//! Several `herald-server` nodes on one PostgreSQL database (docs/SCALE-OUT.md): work
//! given to one node reaches an agent connected to another through PostgreSQL's
//! notices, a node killed with SIGKILL loses nothing it acknowledged (its agents move to
//! the other node), the scheduler's leader fails over without firing an occurrence
//! twice, and a server without a database URL stays on SQLite as it always was.
//!
//! The cluster tests need PostgreSQL (`HERALD_TEST_DATABASE_URL`, which scripts/test.sh
//! sets for the suite's second run); elsewhere they say "skipped needs PostgreSQL".

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::Value;

use herald_tests::{add_schedule, all_jobs, wait_until, TestAgent, TestServer, DEADLINE};

/// Long enough for an agent to notice its node died (no close frame arrives after
/// SIGKILL: its idle timeout) and to come back through its backoff to another node.
const MOVE_DEADLINE: Duration = Duration::from_secs(90);

/// The live nodes as `nodes list --json` on `server` shows them, by id.
fn nodes(server: &TestServer) -> BTreeMap<String, Value> {
    server
        .json(&["nodes", "list"])
        .as_array()
        .expect("nodes list is an array")
        .iter()
        .map(|n| (n["id"].as_str().expect("a node id").to_string(), n.clone()))
        .collect()
}

/// `run --wait` of `echo TEXT` on `agent` through `server`; it prints the output.
fn run_echo(server: &TestServer, agent: &TestAgent, text: &str) {
    let out = server.cli_ok(&[
        "run",
        "--to",
        &format!("agent:{}", agent.name),
        "--wait",
        "--",
        "/bin/echo",
        text,
    ]);
    assert!(out.contains(text), "{out}");
}

/// The id of the node that holds `role`, as `server` sees it, once exactly one does.
fn leader(server: &TestServer, role: &str) -> String {
    wait_until(&format!("one node to lead {role}"), DEADLINE, || {
        let holders: Vec<String> = nodes(server)
            .into_iter()
            .filter(|(_, n)| {
                n["roles"]
                    .as_array()
                    .is_some_and(|r| r.iter().any(|x| x == role))
            })
            .map(|(id, _)| id)
            .collect();
        (holders.len() == 1).then(|| holders[0].clone())
    })
}

/// The node id of `server` (its QUIC address ends it).
fn node_id_of(server: &TestServer, listed: &BTreeMap<String, Value>) -> String {
    let suffix = format!("/127.0.0.1:{}", server.quic_port);
    listed
        .keys()
        .find(|id| id.ends_with(&suffix))
        .unwrap_or_else(|| panic!("no node serves {suffix}: {listed:#?}"))
        .clone()
}

#[test]
fn job_through_one_node_reaches_an_agent_on_another() {
    let Some(mut nodes_) = TestServer::start_cluster("cluster-route", 2) else {
        return;
    };
    // The agent comes up while the first node is down, so it connects to the second
    // and stays there (it keeps to the address that answered).
    nodes_[0].kill();
    let mut agent = TestAgent::enroll(&nodes_[1], "faraway", &[]);
    agent.spawn();
    agent.wait_online(&nodes_[1]);
    nodes_[0].spawn();
    let (first, second) = (&nodes_[0], &nodes_[1]);

    // Both nodes are listed, each with its own listeners, and the second holds the agent.
    let listed = wait_until(
        "both nodes listed, the agent on the second",
        DEADLINE,
        || {
            let listed = nodes(first);
            let second_id = node_id_of(second, &listed);
            (listed.len() == 2 && listed[&second_id]["agents"] == 1).then_some(listed)
        },
    );
    let first_id = node_id_of(first, &listed);
    assert_eq!(listed[&first_id]["agents"], 0, "{listed:#?}");
    assert_eq!(
        listed[&first_id]["http_addr"],
        format!("127.0.0.1:{}", first.http_port)
    );
    for role in ["scheduler", "rollouts", "forwarding", "meter"] {
        leader(first, role);
    }
    // The first node shows the agent online although another node holds it.
    wait_until("the first node to see the agent online", DEADLINE, || {
        first.agent_online(&agent.id).then_some(())
    });

    // A job made through the first node: committed there, signalled by the second
    // (nothing polls: the notice is what wakes the agent's link), and `run --wait`
    // on the first node hears of its end from the second.
    run_echo(first, &agent, "across nodes");
    let jobs = all_jobs(first);
    assert_eq!(jobs.len(), 1, "{jobs:#?}");
    assert_eq!(jobs[0]["state"], "succeeded", "{jobs:#?}");
    assert_eq!(jobs[0]["stdout"], "across nodes\n");
    // The second node agrees: one database.
    assert_eq!(all_jobs(second)[0]["state"], "succeeded");
}

#[test]
fn node_killed_its_agents_move_and_nothing_acknowledged_is_lost() {
    let Some(mut nodes_) = TestServer::start_cluster("cluster-kill", 2) else {
        return;
    };
    // Every agent on the first node: the second is down while they come up.
    nodes_[1].kill();
    let mut agents: Vec<TestAgent> = (0..3)
        .map(|i| {
            let mut agent = TestAgent::enroll(&nodes_[0], &format!("mover{i}"), &[]);
            agent.spawn();
            agent.wait_online(&nodes_[0]);
            agent
        })
        .collect();
    nodes_[1].spawn();

    // Jobs through the second node, acknowledged (their ids printed) before the first
    // node dies; each appends its own mark to its agent's file when it ends.
    let marks_dir = nodes_[1].dir.path().join("marks");
    std::fs::create_dir_all(&marks_dir).unwrap();
    let mut expected: BTreeMap<i64, (String, String)> = BTreeMap::new();
    for agent in &agents {
        for n in 0..4 {
            let mark = format!("{}-{n}", agent.name);
            let file = marks_dir.join(format!("{}.marks", agent.name));
            let script = format!("sleep 1; echo {mark} >> '{}'", file.display());
            let ids = nodes_[1].run_job(
                &format!("agent:{}", agent.name),
                &[],
                &["/bin/sh", "-c", &script],
            );
            assert_eq!(ids.len(), 1);
            expected.insert(ids[0], (agent.name.clone(), mark));
        }
    }
    // Some of them in flight on the first node when it is killed.
    wait_until("a job running", DEADLINE, || {
        expected
            .keys()
            .any(|id| nodes_[1].job(*id)["state"] == "running")
            .then_some(())
    });
    nodes_[0].kill();

    // Every job ends exactly once: succeeded, its mark written once.
    for id in expected.keys() {
        let job = nodes_[1].wait_job_state(*id, "succeeded", MOVE_DEADLINE);
        assert_eq!(job["exit_code"], 0, "{job:#}");
    }
    for agent in &agents {
        let file = marks_dir.join(format!("{}.marks", agent.name));
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        let mut marks: Vec<&str> = text.lines().collect();
        marks.sort();
        let want: Vec<&str> = expected
            .values()
            .filter(|(name, _)| name == &agent.name)
            .map(|(_, mark)| mark.as_str())
            .collect();
        assert_eq!(marks, want, "{}'s jobs each ran once", agent.name);
    }
    // The agents moved: the surviving node holds all three.
    wait_until("the second node to hold every agent", DEADLINE, || {
        let listed = nodes(&nodes_[1]);
        let id = node_id_of(&nodes_[1], &listed);
        (listed.len() == 1 && listed[&id]["agents"] == 3).then_some(())
    });
    for agent in &mut agents {
        assert!(agent.try_wait().is_none(), "agent {} exited", agent.name);
    }
}

#[test]
fn scheduler_leader_fails_over_without_double_firing() {
    let Some(mut nodes_) = TestServer::start_cluster("cluster-lead", 2) else {
        return;
    };
    let leading = leader(&nodes_[0], "scheduler");
    let listed = nodes(&nodes_[0]);
    let (dies, watcher) = if node_id_of(&nodes_[0], &listed) == leading {
        (0, 1)
    } else {
        (1, 0)
    };
    // The agent on whichever node it picks; if that is the leader, it moves.
    let mut agent = TestAgent::enroll(&nodes_[watcher], "ticker", &[]);
    agent.spawn();
    wait_until("the agent online", DEADLINE, || {
        nodes_[watcher].agent_online(&agent.id).then_some(())
    });
    let target = format!("agent:{}", agent.name);
    let id = add_schedule(
        &nodes_[watcher],
        &["--to", &target, "--every", "1s", "--", "/bin/echo", "tick"],
    );
    let ran = |server: &TestServer| -> Vec<Value> {
        all_jobs(server)
            .into_iter()
            .filter(|j| j["schedule_id"] == id)
            .collect()
    };
    wait_until("three firings before the failover", DEADLINE, || {
        (ran(&nodes_[watcher]).len() >= 3).then_some(())
    });

    nodes_[dies].kill();
    let before = ran(&nodes_[watcher]).len();
    let survivor = &nodes_[watcher];
    let survivor_id = node_id_of(survivor, &nodes(survivor));
    // The dead node's lease runs out (it leaves the list) and the survivor takes the
    // lock, which PostgreSQL let go when the dead node's connection ended.
    wait_until("the survivor to lead the scheduler alone", DEADLINE, || {
        (leader(survivor, "scheduler") == survivor_id && nodes(survivor).len() == 1).then_some(())
    });
    wait_until("three firings after the failover", MOVE_DEADLINE, || {
        (ran(survivor).len() >= before + 3).then_some(())
    });

    // No occurrence fired twice: firings of an `--every 1s` schedule never come within
    // a few hundred milliseconds of each other, as two leaders firing one would.
    let jobs = ran(survivor);
    let created: BTreeSet<i64> = jobs
        .iter()
        .map(|j| j["created_at"].as_i64().expect("created_at"))
        .collect();
    assert_eq!(
        created.len(),
        jobs.len(),
        "two firings at one instant: {jobs:#?}"
    );
    let created: Vec<i64> = created.into_iter().collect();
    for pair in created.windows(2) {
        assert!(
            pair[1] - pair[0] >= 300,
            "two firings {} ms apart: {created:?}",
            pair[1] - pair[0]
        );
    }
    drop(agent);
}

#[test]
fn sqlite_stays_the_default() {
    // `init` and `serve` with no database URL, whatever this run's backend.
    let server = TestServer::start_on_sqlite("sqlite-default");
    let config = std::fs::read_to_string(server.data_dir().join("herald.toml")).unwrap();
    assert!(!config.contains("[database]"), "{config}");
    assert!(
        server.db_path().is_file(),
        "no herald.db in the data directory"
    );

    // One node, leading everything, holding its agents.
    let agent = TestAgent::start(&server, "local");
    let listed = wait_until("one node holding the agent", DEADLINE, || {
        let listed = nodes(&server);
        (listed.len() == 1 && listed.values().next().unwrap()["agents"] == 1).then_some(listed)
    });
    let node = listed.values().next().unwrap();
    let roles: Vec<&str> = node["roles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert_eq!(
        roles,
        ["forwarding", "meter", "rollouts", "scheduler"],
        "{node:#}"
    );
    run_echo(&server, &agent, "on sqlite");

    // A database URL that is not PostgreSQL's is refused by `init`, which writes nothing.
    let dir = herald_tests::TempDir::new("sqlite-default-bad-url");
    let data = dir.path().join("server");
    let out = std::process::Command::new(herald_tests::bin("herald-server"))
        .arg("--data-dir")
        .arg(&data)
        .args(["init", "--database-url", "mysql://root@127.0.0.1/herald"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not a PostgreSQL URL"), "{stderr}");
    assert!(!data.join("herald.toml").exists());
}

#[test]
fn a_node_carries_on_after_its_database_connections_are_cut() {
    if herald_tests::postgres_only("cuts the server's PostgreSQL connections") {
        return;
    }
    let server = TestServer::start("cluster-cut");
    let agent = TestAgent::start(&server, "steady");
    run_echo(&server, &agent, "before the cut");
    // PostgreSQL ends every session of the server (as a database restart or failover
    // would): its store, its notices and its leader locks.
    let cut = server.sql_execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
        &[],
    );
    assert!(cut >= 3, "{cut} sessions cut");
    // The store connects again at its next statement (none was in a transaction), and
    // the node takes its leader roles back.
    run_echo(&server, &agent, "after the cut");
    wait_until("the node to lead the scheduler again", DEADLINE, || {
        let listed = nodes(&server);
        let node = listed.values().next()?;
        let roles = node["roles"].as_array()?;
        roles.iter().any(|r| r == "scheduler").then_some(())
    });
    let id = add_schedule(
        &server,
        &[
            "--to",
            &format!("agent:{}", agent.name),
            "--every",
            "1s",
            "--",
            "/bin/echo",
            "tick",
        ],
    );
    wait_until("the schedule to fire after the cut", DEADLINE, || {
        all_jobs(&server)
            .iter()
            .any(|j| j["schedule_id"] == id && j["state"] == "succeeded")
            .then_some(())
    });
}
