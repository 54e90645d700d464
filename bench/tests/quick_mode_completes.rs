//! The CI smoke tests of the harness: `herald-bench all --quick` completes every
//! scenario and `herald-bench campaign --quick` the campaign one (the list ingested,
//! every agent's receipt and every fallback SMS in), and `herald-bench nodes --quick`
//! one node against two on PostgreSQL (where a PostgreSQL server is installed), each
//! printing its figures. No timing thresholds: these machines are shared.

use std::process::Command;

/// Runs `herald-bench ARGS`, checks it succeeded and printed every one of `figures`;
/// returns its output.
fn run_quick(args: &[&str], figures: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_herald-bench"))
        .args(args)
        .env("HERALD_LOG", "error")
        .output()
        .expect("run herald-bench");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "herald-bench {args:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    for figure in figures {
        assert!(stdout.contains(figure), "missing {figure:?} in:\n{stdout}");
    }
    stdout
}

#[test]
fn quick_mode_completes() {
    let stdout = run_quick(
        &["all", "--quick"],
        &[
            "hold: 200 agents connected in",
            "KiB per connection",
            "broadcast: 200 agents",
            "unicast: API call",
            "unicast: relay round trip (signal → ack, server side)",
            "broadcast: relay round trip",
            "broadcast: all acknowledged",
            "unicast: bare quinn round trip",
            "messages: 200 agents",
            "messages: receipts committed",
            "reconnect: server restarted with 200 agents: all back in",
            "agent idle: RSS",
        ],
    );
    assert!(
        stdout.contains("mosquitto: 200 subscribers") || stdout.contains("mosquitto not installed"),
        "no peer line in:\n{stdout}"
    );
}

#[test]
fn campaign_quick_completes() {
    run_quick(
        &["campaign", "--quick", "--runs", "2"],
        &[
            "campaign: 200 agents connected in",
            "campaign: 2000 rows, 2 runs: list uploaded in",
            "campaign: all 200 `stored` receipts counted by the API",
            "campaign: 1800 fallback SMS at the gateway",
            "| fallback SMS/s, first → last |",
        ],
    );
}

/// Whether a PostgreSQL server binary is installed where scripts/pg-cluster.sh looks
/// (Debian's /usr/lib/postgresql/VERSION/bin, or `PG_BIN`).
fn postgres_installed() -> bool {
    if let Some(dir) = std::env::var_os("PG_BIN") {
        return std::path::Path::new(&dir).join("postgres").is_file();
    }
    std::fs::read_dir("/usr/lib/postgresql").is_ok_and(|versions| {
        versions
            .flatten()
            .any(|version| version.path().join("bin/postgres").is_file())
    })
}

#[test]
fn nodes_quick_completes() {
    if !postgres_installed() {
        println!("skipped: needs PostgreSQL (apt-get install postgresql)");
        return;
    }
    run_quick(
        &["nodes", "--quick"],
        &[
            "## 1 node, SQLite, 200 agents",
            "## 1 node, PostgreSQL, 200 agents",
            "## 2 nodes, PostgreSQL, 200 agents",
            "hold: 200 agents connected in",
            "per node: 100 + 100",
            "broadcast: 200 agents, 1 runs: all received in",
            "broadcast: agents on node 1: p50",
            "unicast: API call on node 0 → signal at an agent on node 0",
            "unicast: API call on node 0 → signal at an agent on node 1 (through NOTIFY)",
            "reconnect: node 1 killed (SIGKILL) holding 100 agents: all noticed in",
            "| 2 nodes, PostgreSQL |",
            "ratio: two nodes / one node (PostgreSQL)",
            "ratio: cross-node / same node (two nodes)",
        ],
    );
}
