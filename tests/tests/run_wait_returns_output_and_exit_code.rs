//! Enroll → connect → `run --wait` returns the program's output and exit code; the
//! relay's round trip is on `/metrics`.

use herald_tests::console_client::Console;
use herald_tests::{TestAgent, TestServer};

#[test]
fn run_wait_returns_output_and_exit_code() {
    let server = TestServer::start("run-wait");
    let agent = TestAgent::start(&server, "alpha");

    let ok = server.cli(&[
        "run",
        "--to",
        "all",
        "--wait",
        "--",
        "/bin/echo",
        "hello",
        "world",
    ]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&ok.stdout), "hello world\n");

    let target = format!("agent:{}", agent.name);
    let failed = server.cli(&[
        "run",
        "--to",
        &target,
        "--wait",
        "--",
        "/bin/sh",
        "-c",
        "echo out; echo err >&2; exit 7",
    ]);
    assert_eq!(failed.status.code(), Some(7));
    assert_eq!(String::from_utf8_lossy(&failed.stdout), "out\n");
    assert!(String::from_utf8_lossy(&failed.stderr).starts_with("err\n"));

    // The results are stored with the job.
    let jobs = server.json(&["jobs", "list"]);
    let jobs = jobs.as_array().expect("jobs list is an array");
    assert_eq!(jobs.len(), 2);
    assert_eq!(jobs[0]["state"], "failed");
    assert_eq!(jobs[0]["exit_code"], 7);
    assert_eq!(jobs[1]["state"], "succeeded");
    assert_eq!(jobs[1]["stdout"], "hello world\n");
    assert_eq!(jobs[1]["agent_id"], agent.id.as_str());

    // Both signals were acknowledged: the relay timed both round trips.
    let metrics = Console::new(&server).admin_get(&server, "/metrics");
    assert_eq!(metrics.status, 200, "{}", metrics.body);
    assert!(
        metrics.body.contains("herald_agents_connected 1\n")
            && metrics.body.contains("herald_agents_enrolled 1\n"),
        "{}",
        metrics.body
    );
    assert!(
        metrics
            .body
            .contains("# TYPE herald_signal_ack_seconds histogram\n"),
        "{}",
        metrics.body
    );
    assert!(
        metrics.body.contains("herald_signal_ack_seconds_count 2\n"),
        "{}",
        metrics.body
    );
}
