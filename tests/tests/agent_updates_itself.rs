//! The agent updates its own binary through an operator-signed `herald-agent` release:
//! it swaps the verified binary in, restarts into it and reports success once the new
//! binary has reconnected; a new binary that cannot come up (exits at once, or never
//! reconnects) is replaced by the previous one, which comes back and reports the failure.

use std::path::{Path, PathBuf};

use herald_tests::{wait_until, TestAgent, TestServer, DEADLINE};
use serde_json::Value;
use sha2::Digest;

fn sha256(path: &Path) -> String {
    hex::encode(sha2::Sha256::digest(
        std::fs::read(path).expect("read binary"),
    ))
}

/// An enrolled agent running from its own copy of the binary, with a short health
/// deadline for updates.
fn agent(server: &TestServer, name: &str) -> (TestAgent, PathBuf) {
    let mut agent = TestAgent::enroll(server, name, &[]);
    let binary = agent.use_own_binary();
    let config = agent.state_dir.join("agent.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("health_deadline_secs = 120"), "{text}");
    std::fs::write(
        &config,
        text.replace("health_deadline_secs = 120", "health_deadline_secs = 8"),
    )
    .unwrap();
    agent.spawn();
    agent.wait_online(server);
    (agent, binary)
}

/// Publishes `artifact` as `herald-agent VERSION`, signed by the operator key, and
/// installs it on `agent`; returns the job id.
fn push_update(server: &TestServer, agent: &TestAgent, version: &str, artifact: &Path) -> i64 {
    let operator_key = server.data_dir().join("operator.key");
    server.cli_ok(&[
        "package",
        "publish",
        "--quiet",
        "--vendor-key",
        operator_key.to_str().unwrap(),
        "herald-agent",
        version,
        artifact.to_str().unwrap(),
    ]);
    let out = server.cli_ok(&[
        "package",
        "install",
        "--to",
        &format!("agent:{}", agent.name),
        "herald-agent",
        version,
    ]);
    *herald_tests::job_ids(&out)
        .first()
        .unwrap_or_else(|| panic!("no job id in {out:?}"))
}

fn finished(server: &TestServer, job: i64) -> Value {
    wait_until(&format!("job {job} to finish"), DEADLINE, || {
        let value = server.job(job);
        let state = value["state"].as_str().unwrap_or("").to_string();
        ["succeeded", "failed", "refused", "interrupted", "timed_out"]
            .contains(&state.as_str())
            .then_some(value)
    })
}

#[test]
fn self_update_swaps_the_binary_and_reports_success_after_reconnecting() {
    let server = TestServer::start("self-update-ok");
    let (agent, binary) = agent(&server, "a1");
    let before = sha256(&binary);
    let pid = agent.pid().unwrap();

    // The "new version": the same program with a trailer, so its hash differs.
    let new = server.dir.path().join("herald-agent");
    let mut bytes = std::fs::read(&binary).unwrap();
    bytes.extend_from_slice(b"\nherald-agent 0.2.0 test build\n");
    std::fs::write(&new, &bytes).unwrap();
    let job = push_update(&server, &agent, "0.2.0", &new);

    let result = finished(&server, job);
    assert_eq!(result["state"], "succeeded", "{result:#}\n{}", agent.log());
    assert!(
        result["stdout"]
            .as_str()
            .unwrap()
            .contains("updated to 0.2.0 and reconnected"),
        "{result:#}"
    );
    assert_eq!(sha256(&binary), sha256(&new), "binary not swapped");
    let previous = agent.state_dir.join("update/herald-agent.previous");
    assert_eq!(sha256(&previous), before, "previous binary not kept");
    // Restarted in place: the same process, running the new program.
    assert_eq!(agent.status()["connected"], true);
    let status_pid = std::fs::read_to_string(agent.state_dir.join("status.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v["pid"].as_u64());
    assert_eq!(status_pid, Some(pid as u64));
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(exe, binary.canonicalize().unwrap());
    assert!(
        !agent.state_dir.join("update/pending.json").exists(),
        "update record left behind"
    );

    // The updated agent still works, and the same version again is a no-op.
    let out = server.cli_ok(&[
        "run",
        "--to",
        "agent:a1",
        "--wait",
        "--",
        "/bin/echo",
        "alive",
    ]);
    assert_eq!(out.trim(), "alive");
    let again = server.cli_ok(&[
        "package",
        "install",
        "--to",
        "agent:a1",
        "herald-agent",
        "0.2.0",
        "--wait",
    ]);
    assert!(again.contains("already installed"), "{again}");
    assert_eq!(agent.pid(), Some(pid));
}

/// Starts an update to a binary that cannot come up and checks the agent comes back as
/// the previous binary and reports why.
fn reverts(name: &str, broken: &str, reason: &str) {
    let server = TestServer::start(name);
    let (agent, binary) = agent(&server, "a1");
    let before = sha256(&binary);
    let new = server.dir.path().join("herald-agent");
    std::fs::write(&new, broken).unwrap();
    let job = push_update(&server, &agent, "0.3.0", &new);

    let result = finished(&server, job);
    assert_eq!(result["state"], "failed", "{result:#}");
    let error = result["error"].as_str().unwrap();
    assert!(error.contains(reason), "{error}");
    assert!(error.contains("previous agent was restored"), "{error}");
    assert_eq!(sha256(&binary), before, "previous binary not restored");
    // The restored agent is connected and runs jobs.
    wait_until("the restored agent online", DEADLINE, || {
        server.agent_online(&agent.id).then_some(())
    });
    let out = server.cli_ok(&[
        "run",
        "--to",
        "agent:a1",
        "--wait",
        "--",
        "/bin/echo",
        "back",
    ]);
    assert_eq!(out.trim(), "back");
    // The failed version is not remembered as installed: a fixed 0.3.0 could install.
    let record = agent.state_dir.join("update/pending.json");
    assert!(!record.exists(), "update record left behind");
}

#[test]
fn a_new_binary_that_exits_at_once_is_replaced_by_the_previous_one() {
    reverts(
        "self-update-exits",
        "#!/bin/sh\necho broken build >&2\nexit 1\n",
        "exited before reporting healthy",
    );
}

#[test]
fn a_new_binary_that_never_reconnects_is_replaced_at_the_deadline() {
    reverts(
        "self-update-hangs",
        "#!/bin/sh\nexec sleep 600\n",
        "did not report healthy within 8 s",
    );
}

#[test]
fn vendors_cannot_publish_the_agent_itself() {
    let server = TestServer::start("self-update-reserved");
    let key = server.dir.path().join("v.key");
    let public = server.vendor_keygen(&key);
    let refused = server.cli(&["vendor", "add", "evil", "--key", &public, "--packages", "*"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("herald-agent"));
    server.cli_ok(&[
        "vendor",
        "add",
        "acme",
        "--key",
        &public,
        "--packages",
        "acme-*",
    ]);
    let artifact = server.dir.path().join("herald-agent");
    std::fs::write(&artifact, "#!/bin/sh\n").unwrap();
    let refused = server.cli(&[
        "package",
        "publish",
        "--quiet",
        "--vendor-key",
        key.to_str().unwrap(),
        "herald-agent",
        "9.0.0",
        artifact.to_str().unwrap(),
    ]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("not delegated package herald-agent"),
        "{stderr}"
    );
    // Nothing was registered.
    let releases = server.json(&["package", "list"]);
    assert_eq!(releases, serde_json::json!([]));
}
