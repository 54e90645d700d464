//! Subscriptions roll new releases out in waves: the canary first, each later wave only
//! after the previous one finished; a rollout whose failures pass the threshold halts and
//! leaves the rest of the fleet on the version it had; a paused rollout starts no new
//! wave until it is resumed. The server's artifact endpoint serves ranges.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use herald_tests::{wait_until, AcceptAnyServerCert, TestAgent, TestServer, DEADLINE};
use serde_json::Value;

/// A server with a vendor `acme` allowed `acme-*`; returns the vendor key file.
fn with_vendor(server: &TestServer) -> std::path::PathBuf {
    server.add_vendor("acme", "acme-*").0
}

/// Writes a versioned script artifact and publishes it.
fn publish(server: &TestServer, key: &Path, version: &str, extra: &[&str]) {
    let dir = server.dir.path().join(format!("build-{version}"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("acme-tool");
    std::fs::write(&file, format!("#!/bin/sh\necho acme-tool {version}\n")).unwrap();
    let mut args = vec![
        "package",
        "publish",
        "--quiet",
        "--vendor-key",
        key.to_str().unwrap(),
        "acme-tool",
        version,
        file.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    server.cli_ok(&args);
}

fn rollouts(server: &TestServer) -> Vec<Value> {
    server
        .json(&["package", "rollout", "list", "acme-tool"])
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn rollout_of(server: &TestServer, version: &str) -> Option<Value> {
    rollouts(server)
        .into_iter()
        .find(|r| r["version"] == version)
}

fn wait_rollout(server: &TestServer, version: &str, state: &str) -> Value {
    wait_until(
        &format!("rollout of {version} to be {state}"),
        DEADLINE,
        || rollout_of(server, version).filter(|r| r["state"] == state),
    )
}

fn current(agent: &TestAgent) -> Option<String> {
    std::fs::read_link(agent.state_dir.join("packages/acme-tool/current"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

fn run_installed(agent: &TestAgent) -> String {
    let out =
        std::process::Command::new(agent.state_dir.join("packages/acme-tool/current/acme-tool"))
            .output()
            .expect("run the installed tool");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn fleet(server: &TestServer) -> Vec<TestAgent> {
    ["a1", "a2", "a3"]
        .iter()
        .map(|name| {
            let mut agent = TestAgent::enroll(server, name, &["--group", "fleet"]);
            agent.spawn();
            agent.wait_online(server);
            agent
        })
        .collect()
}

#[test]
fn waves_start_only_after_the_previous_wave_finished_and_failures_halt_the_rollout() {
    let server = TestServer::start("rollout-waves");
    let agents = fleet(&server);
    let key = with_vendor(&server);
    publish(&server, &key, "1.0.0", &[]);
    server.cli_ok(&[
        "package",
        "subscribe",
        "--to",
        "group:fleet",
        "acme-tool",
        "--waves",
        "1,2,100%",
        "--max-failures",
        "0%",
    ]);

    let done = wait_rollout(&server, "1.0.0", "completed");
    assert_eq!(done["succeeded"], 3, "{done:#}");
    assert_eq!(done["wave_ends"], serde_json::json!([1, 2, 3]));
    let targets = done["targets"].as_array().unwrap().clone();
    let waves: Vec<u64> = targets
        .iter()
        .map(|t| t["wave"].as_u64().unwrap())
        .collect();
    assert_eq!(waves, vec![0, 1, 2]);
    // Each wave's job was created only once the wave before it had finished.
    let jobs: Vec<Value> = targets
        .iter()
        .map(|t| server.job(t["job_id"].as_i64().unwrap()))
        .collect();
    for pair in jobs.windows(2) {
        let finished = pair[0]["finished_at"].as_i64().unwrap();
        let created = pair[1]["created_at"].as_i64().unwrap();
        assert!(
            created >= finished,
            "job {} created at {created} before job {} finished at {finished}",
            pair[1]["id"],
            pair[0]["id"]
        );
        // The last progress report before the result.
        assert_eq!(pair[0]["progress"], "installing", "{:#}", pair[0]);
    }
    for agent in &agents {
        assert_eq!(current(agent).as_deref(), Some("1.0.0"));
        assert_eq!(run_installed(agent), "acme-tool 1.0.0");
    }

    // 1.1.0's install command fails: the canary fails, the rollout halts there.
    publish(
        &server,
        &key,
        "1.1.0",
        &["--install-cmd", "/bin/sh -c 'echo broken; exit 3'"],
    );
    let halted = wait_rollout(&server, "1.1.0", "halted");
    assert_eq!(halted["failed"], 1, "{halted:#}");
    assert_eq!(halted["waiting"], 2, "{halted:#}");
    assert!(
        halted["reason"]
            .as_str()
            .unwrap()
            .contains("1 of 1 installs failed"),
        "{halted:#}"
    );
    let canary = &halted["targets"][0];
    let failed = server.job(canary["job_id"].as_i64().unwrap());
    assert_eq!(failed["state"], "failed");
    assert_eq!(failed["exit_code"], 3);
    assert!(
        failed["error"].as_str().unwrap().contains("stays at 1.0.0"),
        "{failed:#}"
    );
    assert_eq!(failed["stdout"].as_str().unwrap().trim(), "broken");
    for agent in &agents {
        assert_eq!(current(agent).as_deref(), Some("1.0.0"), "{}", agent.name);
        assert!(
            !agent.state_dir.join("packages/acme-tool/1.1.0").exists(),
            "{} kept the failed version",
            agent.name
        );
    }
    // Resuming does not override the threshold: it halts again at once.
    let id = halted["id"].as_i64().unwrap().to_string();
    server.cli_ok(&["package", "rollout", "resume", &id]);
    let again = wait_rollout(&server, "1.1.0", "halted");
    assert_eq!(again["waiting"], 2, "{again:#}");
    let refused = server.cli(&["package", "rollout", "pause", &id]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("is halted"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}

#[test]
fn a_paused_rollout_starts_no_new_wave_until_resumed() {
    let server = TestServer::start("rollout-pause");
    let mut agents = fleet(&server);
    let key = with_vendor(&server);
    publish(&server, &key, "1.0.0", &[]);
    server.cli_ok(&[
        "package",
        "subscribe",
        "--to",
        "group:fleet",
        "acme-tool",
        "--waves",
        "1,100%",
    ]);
    let first = wait_rollout(&server, "1.0.0", "completed");
    // Targets are ordered the same way in every rollout: the canary is the first.
    let canary_id = first["targets"][0]["agent_id"]
        .as_str()
        .unwrap()
        .to_string();
    let canary = agents.iter_mut().find(|a| a.id == canary_id).unwrap();
    canary.kill();

    // With the canary offline its job waits; pause meanwhile.
    publish(&server, &key, "2.0.0", &[]);
    let running = wait_rollout(&server, "2.0.0", "running");
    let id = running["id"].as_i64().unwrap().to_string();
    server.cli_ok(&["package", "rollout", "pause", &id]);
    let canary = agents.iter_mut().find(|a| a.id == canary_id).unwrap();
    canary.spawn();
    canary.wait_online(&server);
    let paused = wait_until("the canary to update", DEADLINE, || {
        rollout_of(&server, "2.0.0").filter(|r| r["succeeded"] == 1)
    });
    assert_eq!(paused["state"], "paused");
    // The rollout driver re-checks every 2 s; give it two rounds to (wrongly) advance.
    std::thread::sleep(Duration::from_secs(5));
    let still = rollout_of(&server, "2.0.0").unwrap();
    assert_eq!(still["waiting"], 2, "a paused rollout advanced: {still:#}");
    for agent in agents.iter().filter(|a| a.id != canary_id) {
        assert_eq!(current(agent).as_deref(), Some("1.0.0"));
    }

    server.cli_ok(&["package", "rollout", "resume", &id]);
    let done = wait_rollout(&server, "2.0.0", "completed");
    assert_eq!(done["succeeded"], 3, "{done:#}");
    for agent in &agents {
        assert_eq!(run_installed(agent), "acme-tool 2.0.0");
    }
    // The superseded version is kept for revert; a revert goes back to it.
    let out = server.cli_ok(&[
        "package",
        "revert",
        "--to",
        "group:fleet",
        "acme-tool",
        "--wait",
    ]);
    assert_eq!(out.matches("reverted to 1.0.0").count(), 3, "{out}");
    for agent in &agents {
        assert_eq!(run_installed(agent), "acme-tool 1.0.0");
    }
}

#[test]
fn the_artifact_endpoint_serves_byte_ranges_without_authentication() {
    let server = TestServer::start("artifact-ranges");
    let key = with_vendor(&server);
    publish(&server, &key, "1.0.0", &[]);
    let release = &server.json(&["package", "list", "acme-tool"])[0];
    let sha = release["sha256"].as_str().unwrap();
    let body = "#!/bin/sh\necho acme-tool 1.0.0\n";
    let path = format!("/api/v1/artifacts/{sha}");

    let (status, bytes) = https_get(server.http_port, &path, Some("bytes=10-19"));
    assert_eq!(status, 206);
    assert_eq!(bytes, &body.as_bytes()[10..20]);
    let (status, bytes) = https_get(server.http_port, &path, None);
    assert_eq!(status, 200);
    assert_eq!(bytes, body.as_bytes());
    let (status, _) = https_get(
        server.http_port,
        &format!("/api/v1/artifacts/{}", "0".repeat(64)),
        None,
    );
    assert_eq!(status, 404);
    let (status, _) = https_get(server.http_port, "/api/v1/artifacts/..%2Fherald.db", None);
    assert_eq!(status, 400);
}

/// A bare HTTP/1.1 GET over TLS (the server's CA is not what this test is about).
fn https_get(port: u16, path: &str, range: Option<&str>) -> (u16, Vec<u8>) {
    use std::io::{Read, Write};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(AcceptAnyServerCert::new())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("herald-server").unwrap();
    let connection = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut tls = rustls::StreamOwned::new(connection, tcp);
    let range = range.map(|r| format!("Range: {r}\r\n")).unwrap_or_default();
    write!(
        tls,
        "GET {path} HTTP/1.1\r\nHost: herald-server\r\n{range}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = Vec::new();
    let _ = tls.read_to_end(&mut response);
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete response head");
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, response[split + 4..].to_vec())
}

#[test]
fn an_agent_that_joins_a_subscribed_group_later_gets_the_current_release() {
    let server = TestServer::start("rollout-late-joiner");
    let mut first = TestAgent::enroll(&server, "a1", &["--group", "fleet"]);
    first.spawn();
    first.wait_online(&server);
    let key = with_vendor(&server);
    publish(&server, &key, "1.0.0", &[]);
    server.cli_ok(&["package", "subscribe", "--to", "group:fleet", "acme-tool"]);
    let done = wait_rollout(&server, "1.0.0", "completed");
    assert_eq!(done["targets"].as_array().unwrap().len(), 1);

    let mut late = TestAgent::enroll(&server, "late", &["--group", "fleet"]);
    late.spawn();
    late.wait_online(&server);
    wait_until("the late agent to get 1.0.0", DEADLINE, || {
        (current(&late).as_deref() == Some("1.0.0")).then_some(())
    });
    assert_eq!(run_installed(&late), "acme-tool 1.0.0");
    let again = wait_rollout(&server, "1.0.0", "completed");
    assert_eq!(again["succeeded"], 2, "{again:#}");
    assert_eq!(
        rollouts(&server).len(),
        1,
        "a new rollout instead of the same one"
    );
    // An agent outside the group gets nothing.
    let mut outsider = TestAgent::enroll(&server, "outsider", &[]);
    outsider.spawn();
    outsider.wait_online(&server);
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(current(&outsider), None);
}
