//! The agent's IP address changes under a live connection: the server records the new
//! observed address, the agent reports its new local address, and jobs still run.
//!
//! Server and agent each run in their own network namespace, joined by a veth pair and
//! addressed only from 198.18.0.0/15 (the benchmarking range), so no traffic leaves the
//! namespaces. Needs root for `ip netns`.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, ExitStatus, Output};
use std::time::Duration;

use herald_tests::netns::{in_ns, ip, log_to, tail, Namespaces};
use herald_tests::{bin, is_root, wait_until, TempDir, DEADLINE};
use serde_json::Value;

const SERVER_IP: &str = "198.18.0.1";
const AGENT_IP: &str = "198.18.0.2";
const AGENT_NEW_IP: &str = "198.18.0.3";
const PREFIX: &str = "/24";
/// Ports inside the server namespace (nothing else listens there).
const QUIC_PORT: u16 = 4433;
const HTTP_PORT: u16 = 8443;
/// veth ends: `SERVER_VETH` in the server namespace, `AGENT_VETH` in the agent's.
const SERVER_VETH: &str = "hv0";
const AGENT_VETH: &str = "hv1";

/// Two namespaces with a server and an agent; removes everything on drop, also when an
/// assertion failed.
struct Lab {
    server_ns: String,
    agent_ns: String,
    namespaces: Namespaces,
    server: Option<Child>,
    agent: Option<Child>,
    dir: TempDir,
}

impl Lab {
    fn new() -> Lab {
        Lab {
            server_ns: String::new(),
            agent_ns: String::new(),
            namespaces: Namespaces::default(),
            server: None,
            agent: None,
            dir: TempDir::new("ip-change"),
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("server")
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("agent")
    }

    fn server_log(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn agent_log(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    /// Creates both namespaces and the veth pair between them.
    fn network(&mut self) {
        self.server_ns = self.namespaces.add("herald-srv");
        self.agent_ns = self.namespaces.add("herald-agt");
        self.namespaces.veth(
            (
                &self.server_ns,
                SERVER_VETH,
                Some(&format!("{SERVER_IP}{PREFIX}")),
            ),
            (
                &self.agent_ns,
                AGENT_VETH,
                Some(&format!("{AGENT_IP}{PREFIX}")),
            ),
        );
    }

    /// Runs a `herald-server` CLI command inside the server namespace.
    fn cli(&self, args: &[&str]) -> Output {
        in_ns(&self.server_ns, &bin("herald-server"))
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(args)
            .env("HERALD_LOG", "warn")
            .output()
            .expect("run herald-server CLI")
    }

    fn cli_ok(&self, args: &[&str]) -> String {
        let output = self.cli(args);
        assert!(
            output.status.success(),
            "herald-server {args:?} failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn agent_detail(&self, agent: &str) -> Value {
        let out = self.cli_ok(&["agents", "show", agent, "--json"]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON: {e}\n{out}"))
    }

    /// Initialises and starts the server in its namespace.
    fn start_server(&mut self) {
        let quic = format!("{SERVER_IP}:{QUIC_PORT}");
        self.cli_ok(&[
            "init",
            "--public-addr",
            &quic,
            "--quic-listen",
            &quic,
            "--http-listen",
            &format!("127.0.0.1:{HTTP_PORT}"),
        ]);
        let log = self.server_log();
        let child = in_ns(&self.server_ns, &bin("herald-server"))
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("serve")
            .env("HERALD_LOG", "info,herald_server=debug")
            .stdout(log_to(&log))
            .stderr(log_to(&log))
            .spawn()
            .expect("spawn herald-server");
        self.server = Some(child);
        wait_until("the server to serve", DEADLINE, || {
            std::fs::read_to_string(&log)
                .ok()
                .filter(|t| t.contains("herald-server serving"))
                .map(|_| ())
        });
    }

    /// Enrolls and starts the agent in its namespace; returns its id.
    fn start_agent(&mut self, name: &str) -> String {
        let token = self.cli_ok(&["token", "create"]).trim().to_string();
        let output = in_ns(&self.agent_ns, &bin("herald-agent"))
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(["enroll", &token, "--name", name])
            .env("HERALD_LOG", "warn")
            .output()
            .expect("run herald-agent enroll");
        assert!(
            output.status.success(),
            "enroll failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        let id = stdout
            .split_whitespace()
            .nth(2)
            .expect("enroll prints 'enrolled as ID'")
            .trim_end_matches(';')
            .to_string();
        let log = self.agent_log();
        let child = in_ns(&self.agent_ns, &bin("herald-agent"))
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("run")
            .env("HERALD_LOG", "info,herald_agent=debug")
            .stdout(log_to(&log))
            .stderr(log_to(&log))
            .spawn()
            .expect("spawn herald-agent");
        self.agent = Some(child);
        id
    }

    /// Runs a server CLI command with a deadline; output goes through files so a full
    /// pipe cannot block it.
    fn cli_within(&self, args: &[&str], deadline: Duration) -> (ExitStatus, String, String) {
        let out = self.dir.path().join("cli.out");
        let err = self.dir.path().join("cli.err");
        let mut child = in_ns(&self.server_ns, &bin("herald-server"))
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(args)
            .env("HERALD_LOG", "warn")
            .stdout(File::create(&out).expect("create cli.out"))
            .stderr(File::create(&err).expect("create cli.err"))
            .spawn()
            .expect("spawn herald-server CLI");
        let status = wait_until(&format!("herald-server {args:?}"), deadline, || match child
            .try_wait()
        {
            Ok(Some(status)) => Some(status),
            Ok(None) => None,
            Err(e) => panic!("wait for the CLI: {e}"),
        });
        (
            status,
            std::fs::read_to_string(&out).unwrap_or_default(),
            std::fs::read_to_string(&err).unwrap_or_default(),
        )
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- server log tail:\n{}", tail(&self.server_log(), 40));
            eprintln!("--- agent log tail:\n{}", tail(&self.agent_log(), 40));
        }
        for child in [self.agent.take(), self.server.take()]
            .into_iter()
            .flatten()
        {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
        // The namespaces go when `self.namespaces` is dropped, after the processes.
    }
}

fn history_has(detail: &Value, kind: &str, matches: impl Fn(&str) -> bool) -> bool {
    detail["address_history"].as_array().is_some_and(|h| {
        h.iter()
            .any(|e| e["kind"] == kind && e["address"].as_str().is_some_and(&matches))
    })
}

fn local_addresses(detail: &Value) -> Vec<String> {
    detail["local_addresses"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn ip_change_migrates_connection() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let mut lab = Lab::new();
    lab.network();
    lab.start_server();
    let agent = lab.start_agent("mover");

    let before = wait_until("agent online", DEADLINE, || {
        let detail = lab.agent_detail(&agent);
        (detail["online"] == true).then_some(detail)
    });
    let old_prefix = format!("{AGENT_IP}:");
    let observed = before["observed_address"].as_str().unwrap_or_default();
    assert!(
        observed.starts_with(&old_prefix),
        "observed address {observed:?}, expected {AGENT_IP}:*\n{before:#}"
    );
    assert_eq!(local_addresses(&before), [AGENT_IP], "{before:#}");
    assert!(history_has(&before, "observed", |a| a.starts_with(&old_prefix)));

    // Move the agent to a new address: add the new one, then remove the old one.
    let a = lab.agent_ns.clone();
    ip(&[
        "-n",
        &a,
        "addr",
        "add",
        &format!("{AGENT_NEW_IP}{PREFIX}"),
        "dev",
        AGENT_VETH,
    ]);
    ip(&[
        "-n",
        &a,
        "addr",
        "del",
        &format!("{AGENT_IP}{PREFIX}"),
        "dev",
        AGENT_VETH,
    ]);

    let new_prefix = format!("{AGENT_NEW_IP}:");
    let after = wait_until(
        "the server to record the agent's new address",
        DEADLINE,
        || {
            let detail = lab.agent_detail(&agent);
            let observed = detail["observed_address"].as_str().unwrap_or_default();
            let done = detail["online"] == true
                && observed.starts_with(&new_prefix)
                && history_has(&detail, "observed", |a| a.starts_with(&new_prefix))
                && history_has(&detail, "local", |a| {
                    a.split(',').any(|x| x == AGENT_NEW_IP)
                })
                && local_addresses(&detail) == [AGENT_NEW_IP];
            done.then_some(detail)
        },
    );
    // The old observed address is still in the history, older than the new one.
    let history = after["address_history"].as_array().expect("history");
    let newest_observed = history
        .iter()
        .position(|e| e["kind"] == "observed")
        .expect("an observed entry");
    assert!(
        history[newest_observed]["address"]
            .as_str()
            .is_some_and(|a| a.starts_with(&new_prefix)),
        "{after:#}"
    );
    assert!(
        history[newest_observed..]
            .iter()
            .any(|e| e["kind"] == "observed"
                && e["address"]
                    .as_str()
                    .is_some_and(|a| a.starts_with(&old_prefix))),
        "{after:#}"
    );
    let connects = std::fs::read_to_string(lab.server_log())
        .unwrap_or_default()
        .matches("agent connected")
        .count();
    eprintln!(
        "observed {} -> {}; {}",
        before["observed_address"],
        after["observed_address"],
        if connects > 1 {
            "the agent reconnected"
        } else {
            "the connection migrated"
        }
    );

    // Jobs still reach the agent and come back.
    let (status, stdout, stderr) = lab.cli_within(
        &[
            "run",
            "--to",
            "agent:mover",
            "--wait",
            "--",
            "/bin/echo",
            "still",
            "here",
        ],
        DEADLINE,
    );
    assert!(status.success(), "run --wait failed ({status}): {stderr}");
    assert_eq!(stdout, "still here\n");
}
