//! Revocation (DESIGN.md, "Trust model"): `agents revoke` closes the agent's live
//! connection at once, every later handshake fails (also after a server restart), no job
//! can be addressed to it, and `agents list --json` shows when it was revoked. Other
//! agents are not affected.

use std::path::Path;
use std::time::{Duration, Instant};

use herald_tests::{now_ms, strip_ansi, wait_until, TestAgent, TestServer, DEADLINE};
use serde_json::Value;

/// How quickly a revoked agent must show offline and notice it.
const QUICKLY: Duration = Duration::from_secs(5);
/// Failed reconnect attempts to watch before concluding the agent stays out.
const ATTEMPTS: usize = 3;

/// Text appended to a file since `offset` bytes.
fn since(path: &Path, offset: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    String::from_utf8_lossy(text.get(offset..).unwrap_or_default()).into_owned()
}

fn file_len(path: &Path) -> usize {
    std::fs::metadata(path)
        .map(|m| m.len() as usize)
        .unwrap_or(0)
}

/// Fails the test if the server or the agent itself ever shows the agent connected.
fn assert_still_out(server: &TestServer, agent: &TestAgent, when: &str) {
    assert!(
        !server.agent_online(&agent.id),
        "revoked agent is online again ({when})"
    );
    let status = agent.status();
    assert_eq!(
        status["connected"], false,
        "revoked agent believes it is connected ({when}): {status}"
    );
}

/// Waits until a restarted server's admin API answers (the harness's `spawn` waits for a
/// "serving" line in the appended log; this also covers an older harness that matched the
/// previous run's line and returned before the new process listened).
fn wait_for_api(server: &TestServer) {
    wait_until("the restarted server's API to answer", DEADLINE, || {
        server
            .cli(&["agents", "list", "--json"])
            .status
            .success()
            .then_some(())
    });
}

fn agent_entry(server: &TestServer, id: &str) -> Value {
    let agents = server.json(&["agents", "list"]);
    agents
        .as_array()
        .expect("agents list is an array")
        .iter()
        .find(|a| a["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("agent {id} missing from agents list: {agents}"))
}

#[test]
fn revoked_agent_is_cut_off() {
    let started = Instant::now();
    let mut server = TestServer::start("revoke");
    let doomed = TestAgent::start(&server, "doomed");
    let bystander = TestAgent::start(&server, "bystander");
    let doomed_log = server.dir.path().join("agent-doomed.log");

    // Before: both are usable.
    let before = server.cli(&["run", "--to", "agent:doomed", "--wait", "--", "/bin/true"]);
    assert!(
        before.status.success(),
        "{}",
        String::from_utf8_lossy(&before.stderr)
    );
    assert_eq!(agent_entry(&server, &doomed.id)["revoked_at"], Value::Null);

    let agent_offset = file_len(&doomed_log);
    let revoked_at_lower = now_ms();
    let out = server.cli_ok(&["agents", "revoke", "doomed"]);
    assert!(out.contains("revoked"), "revoke output: {out}");
    let revoke_time = Instant::now();

    // The live connection is closed at once: offline on the server, lost on the agent.
    wait_until("the revoked agent to show offline", QUICKLY, || {
        (!server.agent_online(&doomed.id)).then_some(())
    });
    wait_until("the agent to log the lost connection", QUICKLY, || {
        since(&doomed_log, agent_offset)
            .contains("connection lost")
            .then_some(())
    });
    eprintln!("revoked agent cut off after {:?}", revoke_time.elapsed());

    // It cannot come back: watch several of its reconnect attempts fail, checking all
    // along that it never shows online.
    wait_until(
        &format!("{ATTEMPTS} failed reconnect attempts of the revoked agent"),
        DEADLINE,
        || {
            assert_still_out(&server, &doomed, "while reconnecting");
            let log = since(&doomed_log, agent_offset);
            // One "reconnecting in" for the closed connection, one per failed attempt.
            (log.matches("reconnecting in").count() > ATTEMPTS).then_some(())
        },
    );
    let new_log = strip_ansi(&since(&doomed_log, agent_offset));
    assert!(
        !new_log.contains("herald_agent::link: connected"),
        "the revoked agent connected again:\n{new_log}"
    );
    assert_still_out(&server, &doomed, "after its reconnect attempts");

    // Jobs cannot be addressed to it; `all` reaches only the bystander.
    let direct = server.cli(&["run", "--to", "agent:doomed", "--", "/bin/true"]);
    let stderr = String::from_utf8_lossy(&direct.stderr);
    assert!(
        !direct.status.success(),
        "a job for a revoked agent was accepted: {}",
        String::from_utf8_lossy(&direct.stdout)
    );
    assert!(
        stderr.contains("is revoked") && stderr.contains("enroll the machine again"),
        "unclear refusal for a revoked agent: {stderr}"
    );
    let all = server.cli(&["run", "--to", "all", "--wait", "--", "/bin/echo", "hi"]);
    assert!(
        all.status.success(),
        "{}",
        String::from_utf8_lossy(&all.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&all.stdout), "hi\n");
    let jobs = server.json(&["jobs", "list"]);
    let jobs = jobs.as_array().expect("jobs list is an array");
    assert_eq!(
        jobs.iter()
            .filter(|j| j["agent_id"] == doomed.id.as_str())
            .count(),
        1,
        "only the job from before the revocation is the revoked agent's: {jobs:?}"
    );
    assert!(server.agent_online(&bystander.id), "bystander was affected");

    // `agents list --json` records the revocation.
    let entry = agent_entry(&server, &doomed.id);
    let revoked_at = entry["revoked_at"]
        .as_i64()
        .unwrap_or_else(|| panic!("revoked_at missing: {entry}"));
    assert!(
        revoked_at >= revoked_at_lower && revoked_at <= now_ms(),
        "revoked_at {revoked_at} is not the time of revocation: {entry}"
    );
    assert_eq!(entry["online"], false, "{entry}");
    assert_eq!(
        agent_entry(&server, &bystander.id)["revoked_at"],
        Value::Null
    );

    // Revocation survives a server restart: the next handshakes are refused too.
    let agent_offset_restart = file_len(&doomed_log);
    server.kill();
    let server_offset = file_len(&server.log_path());
    server.spawn();
    wait_for_api(&server);
    wait_until(
        "the revoked agent's handshake to be refused by the restarted server",
        Duration::from_secs(45),
        || {
            assert_still_out(&server, &doomed, "after the server restart");
            let server_log = strip_ansi(&since(&server.log_path(), server_offset));
            server_log
                .lines()
                .any(|l| l.contains("handshake failed") && l.contains("Revoked"))
                .then_some(())
        },
    );
    assert_still_out(&server, &doomed, "after a refused handshake");
    let entry = agent_entry(&server, &doomed.id);
    assert_eq!(entry["revoked_at"], revoked_at, "{entry}");
    let after_restart = strip_ansi(&since(&doomed_log, agent_offset_restart));
    assert!(
        !after_restart.contains("herald_agent::link: connected"),
        "the revoked agent connected to the restarted server:\n{after_restart}"
    );

    // "Revocation is immediate: the live connection is closed and the next handshake
    // fails" (DESIGN.md). Every reconnect attempt made before the restart must have
    // failed in the TLS handshake, not been admitted by TLS and turned away afterwards.
    let admitted: Vec<&str> = new_log
        .lines()
        .filter(|l| l.contains("reconnecting in"))
        .skip(1) // the revoked connection itself
        .filter(|l| !l.contains("handshake failed"))
        .collect();
    assert!(
        admitted.is_empty(),
        "after revocation (before any server restart) the agent still completed TLS \
         handshakes and was only refused at Hello:\n{}",
        admitted.join("\n")
    );
    eprintln!("revocation test took {:?}", started.elapsed());
}
