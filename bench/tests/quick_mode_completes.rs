//! `herald-bench all --quick` (the CI smoke test of the harness) completes every
//! scenario and prints its figures. No timing thresholds: these machines are shared.

use std::process::Command;

#[test]
fn quick_mode_completes() {
    let output = Command::new(env!("CARGO_BIN_EXE_herald-bench"))
        .args(["all", "--quick"])
        .env("HERALD_LOG", "error")
        .output()
        .expect("run herald-bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "herald-bench failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    for figure in [
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
    ] {
        assert!(stdout.contains(figure), "missing {figure:?} in:\n{stdout}");
    }
    assert!(
        stdout.contains("mosquitto: 200 subscribers") || stdout.contains("mosquitto not installed"),
        "no peer line in:\n{stdout}"
    );
}
