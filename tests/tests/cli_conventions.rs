//! What both command lines promise alike: a usage error exits 64 (as every other usage
//! error of ours does), `completions SHELL` prints a script that knows the
//! subcommands, `man` writes a page per command and subcommand, and
//! `HERALD_LOG_FORMAT=json` makes the logs one JSON object per line.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use herald_tests::{bin, free_port, TempDir};

#[test]
fn usage_errors_exit_64_on_both_binaries() {
    for (binary, args) in [
        ("herald-server", vec!["no-such-command"]),
        ("herald-server", vec!["message", "send", "--title"]),
        ("herald-agent", vec!["status", "--no-such-flag"]),
    ] {
        let out = Command::new(bin(binary)).args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(64), "{binary} {args:?}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.starts_with("error:"), "{binary} {args:?}: {stderr}");
    }
    // Help is not an error.
    let out = Command::new(bin("herald-agent"))
        .arg("--help")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn completions_and_man_pages_cover_the_subcommands() {
    let dir = TempDir::new("cli-man");
    for (binary, sub, page) in [
        ("herald-server", "message", "herald-server-message-send.1"),
        ("herald-agent", "inbox", "herald-agent-inbox.1"),
    ] {
        for shell in ["bash", "zsh", "fish"] {
            let out = Command::new(bin(binary))
                .args(["completions", shell])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{binary} completions {shell}: {out:?}"
            );
            let script = String::from_utf8_lossy(&out.stdout);
            assert!(
                script.contains(sub),
                "{binary} {shell} completion lacks {sub}"
            );
        }
        let out_dir = dir.path().join(binary);
        let out = Command::new(bin(binary))
            .args(["man", "--out"])
            .arg(&out_dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "{binary} man: {out:?}");
        let text = std::fs::read_to_string(out_dir.join(page))
            .unwrap_or_else(|e| panic!("{binary} man wrote no {page}: {e}"));
        assert!(
            text.starts_with(".ie") || text.contains(".TH"),
            "{page} is roff: {text}"
        );
    }
    let pages = std::fs::read_dir(dir.path().join("herald-server"))
        .unwrap()
        .count();
    assert!(
        pages > 40,
        "one page per server command and subcommand, got {pages}"
    );
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = TempDir::new("cli-json-logs");
    let quic = format!("127.0.0.1:{}", free_port());
    let http = format!("127.0.0.1:{}", free_port());
    let init = Command::new(bin("herald-server"))
        .arg("--data-dir")
        .arg(dir.path())
        .args([
            "init",
            "--public-addr",
            &quic,
            "--quic-listen",
            &quic,
            "--http-listen",
            &http,
        ])
        .output()
        .unwrap();
    assert!(init.status.success(), "init: {init:?}");
    let mut server = Command::new(bin("herald-server"))
        .arg("--data-dir")
        .arg(dir.path())
        .arg("serve")
        .env("HERALD_LOG_FORMAT", "json")
        .env("HERALD_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The lines are read beside the test, so that a server that logs nothing cannot
    // block it: the first line must come within the deadline.
    let stderr = server.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let first = rx.recv_timeout(Duration::from_secs(30));
    let _ = server.kill();
    let _ = server.wait();
    let line = first.expect("the server logs as it starts");
    let value: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
    assert!(value["level"].is_string(), "{line}");
    assert!(value["fields"]["message"].is_string(), "{line}");
    // Whatever else it wrote before it was stopped is JSON too.
    for line in rx.try_iter() {
        serde_json::from_str::<serde_json::Value>(&line)
            .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
    }
}
