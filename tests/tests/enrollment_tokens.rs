//! Enrollment tokens (DESIGN.md, "Trust model"): limited uses, expiry, clear errors for
//! damaged tokens (exit 64, nothing written), groups granted by the token, and an agent
//! that is already enrolled refuses to enroll again.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use herald_tests::{bin, wait_until, TestServer, DEADLINE};
use serde_json::Value;

/// Exit code of `herald-agent` for configuration and token problems.
const EXIT_CONFIG: i32 = 64;

/// Runs `herald-agent --state-dir DIR enroll TOKEN --name NAME`.
fn enroll(state_dir: &Path, token: &str, name: &str) -> Output {
    Command::new(bin("herald-agent"))
        .arg("--state-dir")
        .arg(state_dir)
        .args(["enroll", token, "--name", name])
        .env("HERALD_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run herald-agent enroll")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Enrolls and asserts success; returns the agent id printed.
fn enroll_ok(server: &TestServer, state_dir: &Path, token: &str, name: &str) -> String {
    let output = enroll(state_dir, token, name);
    assert!(
        output.status.success(),
        "enrolling {name} failed ({}): {}\n--- server log tail:\n{}",
        output.status,
        text(&output.stderr),
        server.log_tail()
    );
    let stdout = text(&output.stdout);
    stdout
        .strip_prefix("enrolled as ")
        .and_then(|rest| rest.split(';').next())
        .unwrap_or_else(|| panic!("enroll prints 'enrolled as ID; ...': {stdout}"))
        .to_string()
}

/// Enrolls and asserts the server refused the token; returns stderr.
fn enroll_refused(state_dir: &Path, token: &str, name: &str) -> String {
    let output = enroll(state_dir, token, name);
    let stderr = text(&output.stderr);
    assert!(
        !output.status.success(),
        "enrolling {name} should have been refused; stdout: {}",
        text(&output.stdout)
    );
    assert!(
        stderr.contains("invalid, used up or expired"),
        "unclear refusal for {name}: {stderr}"
    );
    assert!(
        !state_dir.join("agent.toml").exists(),
        "a refused enrollment wrote agent.toml for {name}"
    );
    stderr
}

fn agent_dir(server: &TestServer, name: &str) -> PathBuf {
    server.dir.path().join(format!("agent-{name}"))
}

/// Ids of all enrolled agents.
fn agent_ids(server: &TestServer) -> Vec<String> {
    let agents = server.json(&["agents", "list"]);
    let mut ids: Vec<String> = agents
        .as_array()
        .expect("agents list is an array")
        .iter()
        .map(|a| a["id"].as_str().expect("agent id").to_string())
        .collect();
    ids.sort();
    ids
}

fn groups(value: &Value) -> Vec<String> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("groups is an array: {value}"))
        .iter()
        .map(|g| g.as_str().expect("group name").to_string())
        .collect()
}

/// `herald-agent status --json`.
fn agent_status(state_dir: &Path) -> Value {
    let output = Command::new(bin("herald-agent"))
        .arg("--state-dir")
        .arg(state_dir)
        .args(["status", "--json"])
        .env("HERALD_LOG", "warn")
        .output()
        .expect("run herald-agent status");
    assert!(output.status.success(), "{}", text(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("status --json is JSON")
}

#[test]
fn single_use_token_admits_one_agent() {
    let server = TestServer::start("token-once");
    let token = server.token(&["--uses", "1"]);
    let first = enroll_ok(&server, &agent_dir(&server, "first"), &token, "first");
    let stderr = enroll_refused(&agent_dir(&server, "second"), &token, "second");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(agent_ids(&server), [first]);
}

#[test]
fn two_use_token_admits_exactly_two_and_grants_its_groups() {
    let server = TestServer::start("token-twice");
    let token = server.token(&["--uses", "2", "--group", "web"]);
    let mut admitted = vec![
        enroll_ok(&server, &agent_dir(&server, "web1"), &token, "web1"),
        enroll_ok(&server, &agent_dir(&server, "web2"), &token, "web2"),
    ];
    enroll_refused(&agent_dir(&server, "web3"), &token, "web3");
    admitted.sort();
    assert_eq!(agent_ids(&server), admitted);

    for name in ["web1", "web2"] {
        let detail = server.json(&["agents", "show", name]);
        assert_eq!(groups(&detail["groups"]), ["web"], "{detail}");
        // The agent recorded the token's groups too.
        let status = agent_status(&agent_dir(&server, name));
        assert_eq!(groups(&status["groups"]), ["web"], "{status}");
    }
    // And the group addresses them.
    let created = server.cli(&["run", "--to", "group:web", "--", "/bin/true"]);
    assert!(created.status.success(), "{}", text(&created.stderr));
    assert_eq!(
        text(&created.stdout)
            .lines()
            .filter(|l| l.starts_with("job "))
            .count(),
        2,
        "group:web names both agents: {}",
        text(&created.stdout)
    );
}

#[test]
fn expired_token_is_refused() {
    let server = TestServer::start("token-ttl");
    let created = SystemTime::now();
    let token = server.token(&["--ttl", "1s"]);
    let ttl = Duration::from_secs(1);
    // The token expires one second after it was created; wait for that moment to pass.
    wait_until("the token's one-second TTL to pass", DEADLINE, || {
        (created.elapsed().unwrap_or_default() > ttl + Duration::from_millis(100)).then_some(())
    });
    enroll_refused(&agent_dir(&server, "late"), &token, "late");
    assert!(agent_ids(&server).is_empty());
}

#[test]
fn damaged_tokens_are_rejected_clearly_without_writing_state() {
    let server = TestServer::start("token-damaged");
    let token = server.token(&[]);
    let body = token
        .strip_prefix("hrld1_")
        .unwrap_or_else(|| panic!("tokens start with hrld1_: {token}"));
    let damaged = [
        (
            "truncated",
            token[..token.len() - 10].to_string(),
            "damaged",
        ),
        ("cut-short", token[..token.len() / 2].to_string(), "damaged"),
        (
            "bad-base64",
            format!("hrld1_{}!!", &body[..body.len() - 2]),
            "damaged",
        ),
        (
            "wrong-prefix",
            format!("hrld2_{body}"),
            "not a Herald enrollment token",
        ),
        (
            "no-prefix",
            body.to_string(),
            "not a Herald enrollment token",
        ),
        ("empty", String::new(), "not a Herald enrollment token"),
    ];
    for (name, bad, expected) in &damaged {
        let dir = agent_dir(&server, name);
        let output = enroll(&dir, bad, name);
        let stderr = text(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(EXIT_CONFIG),
            "{name}: exit status {} (stderr: {stderr})",
            output.status
        );
        assert!(
            stderr.contains(expected),
            "{name}: expected a message containing {expected:?}, got: {stderr}"
        );
        assert!(
            stderr.lines().count() <= 2 && !stderr.contains("panicked"),
            "{name}: not a clear one-line error: {stderr}"
        );
        assert!(
            !dir.exists(),
            "{name}: a rejected token left state behind in {}",
            dir.display()
        );
    }

    // Nothing reached the server: no agent, and the intact token still works once.
    assert!(agent_ids(&server).is_empty());
    let id = enroll_ok(&server, &agent_dir(&server, "intact"), &token, "intact");
    assert_eq!(agent_ids(&server), [id]);
}

#[test]
fn enrolled_agent_refuses_to_enroll_again() {
    let server = TestServer::start("token-again");
    let dir = agent_dir(&server, "settled");
    let id = enroll_ok(&server, &dir, &server.token(&[]), "settled");
    let config = std::fs::read(dir.join("agent.toml")).expect("agent.toml written");
    let key = std::fs::read(dir.join("identity.key")).expect("identity.key written");

    let fresh = server.token(&["--group", "db"]);
    let output = enroll(&dir, &fresh, "settled-again");
    let stderr = text(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(EXIT_CONFIG),
        "re-enrollment exit status {} (stderr: {stderr})",
        output.status
    );
    assert!(
        stderr.contains("already enrolled"),
        "unclear message for re-enrollment: {stderr}"
    );
    // Its state is untouched and the server did not see a second enrollment.
    assert_eq!(
        std::fs::read(dir.join("agent.toml")).expect("agent.toml"),
        config
    );
    assert_eq!(
        std::fs::read(dir.join("identity.key")).expect("identity.key"),
        key
    );
    assert_eq!(agent_ids(&server), std::slice::from_ref(&id));
    let detail = server.json(&["agents", "show", &id]);
    assert_eq!(detail["name"], "settled", "{detail}");
    assert!(groups(&detail["groups"]).is_empty(), "{detail}");

    // The fresh token was not consumed by the refused attempt.
    let other = enroll_ok(&server, &agent_dir(&server, "newcomer"), &fresh, "newcomer");
    assert_eq!(
        groups(&server.json(&["agents", "show", &other])["groups"]),
        ["db"]
    );
}
