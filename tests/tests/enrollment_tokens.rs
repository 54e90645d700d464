//! Enrollment tokens (DESIGN.md, "Trust model"): limited uses, expiry, clear errors for
//! damaged tokens (exit 64, nothing written, the use not spent, even for one changed
//! character), groups granted by the token, and an agent that is already enrolled refuses
//! to enroll again.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use herald_shared::codec;
use herald_shared::token::{Token, TOKEN_PREFIX};
use herald_tests::{bin, wait_until, TestServer, DEADLINE};
use rusqlite::Connection;
use serde_json::Value;

/// What the agent says about a token that was changed on the way.
const DAMAGED: &str = "this token is damaged; copy it again";

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
        .strip_prefix(TOKEN_PREFIX)
        .unwrap_or_else(|| panic!("tokens start with {TOKEN_PREFIX}: {token}"));
    let damaged = [
        ("truncated", token[..token.len() - 10].to_string(), DAMAGED),
        ("cut-short", token[..token.len() / 2].to_string(), DAMAGED),
        (
            "bad-base64",
            format!("{TOKEN_PREFIX}{}!!", &body[..body.len() - 2]),
            DAMAGED,
        ),
        ("damaged-prefix", format!("hrld3_{body}"), DAMAGED),
        ("extra-character", format!("{token}A"), DAMAGED),
        ("version-1", version_1(&token), "made by an older server"),
        (
            "no-prefix",
            body.to_string(),
            "not a Herald enrollment token",
        ),
        (
            "something-else",
            "correct horse battery staple".to_string(),
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

/// The same token in the version 1 format (no checksum), as an older server made it.
fn version_1(token: &str) -> String {
    let token = Token::decode(token).expect("a fresh token decodes");
    let bytes = codec::to_bytes(&token).expect("a token encodes");
    format!("hrld1_{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// The uses left on a token, read from the server's database.
fn uses_left(server: &TestServer, token: &str) -> i64 {
    let hash = Token::decode(token).expect("token decodes").secret_hash();
    Connection::open(server.db_path())
        .expect("open the server's database")
        .query_row(
            "SELECT uses_left FROM tokens WHERE secret_hash = ?1",
            [hash],
            |row| row.get(0),
        )
        .expect("the token is in the database")
}

/// The bug this guards against: one character changed in the middle of a token landed in
/// the operator key; the agent enrolled, spent the token's only use, and pinned a key that
/// signs nothing, refusing every job from then on. Now the agent refuses the token before
/// it contacts the server, so the use is still there for the intact copy.
#[test]
fn a_token_changed_in_one_character_is_refused_before_it_is_spent() {
    if herald_tests::sqlite_only("reads the stored token rows from herald.db") {
        return;
    }
    let server = TestServer::start("token-one-char");
    let token = server.token(&["--uses", "1"]);
    let intact = Token::decode(&token).expect("a fresh token decodes");

    // A character in the middle of the operator key: its byte offset is the server
    // address (one length byte and the text), the CA fingerprint, the key count, then
    // half the key's 32 bytes.
    assert!(
        intact.server.len() < 128,
        "one-byte length: {}",
        intact.server
    );
    let byte = 1 + intact.server.len() + 32 + 1 + 16;
    let at = TOKEN_PREFIX.len() + byte * 4 / 3;
    let mut chars: Vec<char> = token.chars().collect();
    chars[at] = if chars[at] == 'A' { 'B' } else { 'A' };
    let damaged: String = chars.into_iter().collect();

    // Without the checksum this would have read as a token for another operator key.
    let bytes = URL_SAFE_NO_PAD
        .decode(&damaged[TOKEN_PREFIX.len()..])
        .expect("still base64");
    let unchecked: Token =
        codec::from_bytes(&bytes[..bytes.len() - 8], bytes.len()).expect("still a token's shape");
    assert_ne!(unchecked.operator_keys, intact.operator_keys);
    assert_eq!(unchecked.secret, intact.secret);

    let dir = agent_dir(&server, "one-char");
    let output = enroll(&dir, &damaged, "one-char");
    let stderr = text(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(EXIT_CONFIG),
        "exit status {} (stderr: {stderr})",
        output.status
    );
    assert!(stderr.contains(DAMAGED), "unclear message: {stderr}");
    assert!(
        !dir.exists(),
        "a damaged token left state in {}",
        dir.display()
    );

    // The use was not spent: the database still counts it, and the intact token enrolls.
    assert!(agent_ids(&server).is_empty());
    assert_eq!(uses_left(&server, &token), 1);
    let id = enroll_ok(&server, &agent_dir(&server, "intact"), &token, "intact");
    assert_eq!(agent_ids(&server), [id]);
    assert_eq!(uses_left(&server, &token), 0);
    // And the agent pinned the real operator key.
    let config = std::fs::read_to_string(agent_dir(&server, "intact").join("agent.toml"))
        .expect("agent.toml written");
    assert!(
        config.contains(&server.operator_key().public().to_hex()),
        "agent.toml does not pin the operator key: {config}"
    );
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

/// `token list` shows the tokens that can still enroll (with uses left and groups, never
/// the secret), and `token revoke ID` stops one: the agent is refused as for a used-up
/// token, and the other token still works.
#[test]
fn a_listed_token_can_be_revoked_and_then_enrolls_no_one() {
    let server = TestServer::start("token-revoke");
    let kept = server.token(&["--uses", "2", "--group", "lab"]);
    let revoked = server.token(&["--uses", "3"]);
    let listed = server.json(&["token", "list"]);
    let listed = listed.as_array().expect("a list");
    assert_eq!(listed.len(), 2, "{listed:?}");
    let shown = format!("{listed:?}");
    assert!(
        !shown.contains(&revoked) && !shown.contains(&kept),
        "no secret is listed"
    );
    let three = listed
        .iter()
        .find(|t| t["uses_left"] == 3)
        .expect("the three-use token");
    let id = three["id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 12);
    let lab = listed.iter().find(|t| t["uses_left"] == 2).unwrap();
    assert_eq!(lab["groups"], serde_json::json!(["lab"]));

    let out = server.cli_ok(&["token", "revoke", &id]);
    assert!(out.contains("revoked"), "{out}");
    enroll_refused(&agent_dir(&server, "late"), &revoked, "late");
    enroll_ok(&server, &agent_dir(&server, "labby"), &kept, "labby");
    let listed = server.json(&["token", "list"]);
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");

    // A malformed or unknown id is refused with a message.
    let bad = server.cli(&["token", "revoke", "xyz"]);
    assert_eq!(bad.status.code(), Some(EXIT_CONFIG));
    let unknown = server.cli(&["token", "revoke", "000000000000"]);
    assert!(!unknown.status.success());
    assert!(
        text(&unknown.stderr).contains("no enrollment token"),
        "{unknown:?}"
    );
}
