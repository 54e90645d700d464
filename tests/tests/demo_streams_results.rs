//! README's one command, `herald-server demo`, really runs a schedule on a local agent
//! and streams its results.

use std::process::{Command, Stdio};

use herald_tests::bin;

#[test]
fn demo_streams_results() {
    let dir = herald_tests::TempDir::new("demo");
    let output = Command::new(bin("herald-server"))
        .args(["demo", "--every", "1s", "--count", "2"])
        .env("TMPDIR", dir.path())
        .env("HERALD_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run demo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "demo failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    let results: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("on demo-agent: succeeded (exit 0)"))
        .collect();
    assert_eq!(results.len(), 2, "expected two results:\n{stdout}");
    assert!(results.iter().all(|l| l.contains("hello from")), "{stdout}");
    // The throwaway directory is removed.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .expect("read temp dir")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("herald-demo-"))
        .collect();
    assert!(leftovers.is_empty(), "demo left {leftovers:?}");
}
