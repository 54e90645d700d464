//! `herald-bench campaign --quick` (the smoke test of the campaign scenario) completes:
//! the list is ingested, every agent's receipt and every fallback SMS arrive, and the
//! figures are printed. No timing thresholds: these machines are shared.

use std::process::Command;

#[test]
fn campaign_quick_completes() {
    let output = Command::new(env!("CARGO_BIN_EXE_herald-bench"))
        .args(["campaign", "--quick", "--runs", "2"])
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
        "campaign: 200 agents connected in",
        "campaign: 2000 rows, 2 runs: list uploaded in",
        "campaign: all 200 `stored` receipts counted by the API",
        "campaign: 1800 fallback SMS at the gateway",
        "| fallback SMS/s, first → last |",
    ] {
        assert!(stdout.contains(figure), "missing {figure:?} in:\n{stdout}");
    }
}
