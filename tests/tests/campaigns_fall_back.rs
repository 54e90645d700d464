//! Campaigns fall back, end to end with real processes: a sender sends one signed
//! message to a recipient list (`message send --list`); rows without the program get an
//! SMS (or e-mail) at once, rows whose devices did not store the message by the
//! deadline get one then, and nobody who blocked the sender gets one at all. The SMS
//! gateway is a loopback stand-in (`receivers::SmsGateway`) that answers with message
//! ids and calls the server back with delivery reports; the mailbox is a real SMTP
//! server with STARTTLS when aiosmtpd is installed.
//!
//! Also: bad rows are reported by line and `--strict` refuses the list; a list is
//! ingested whole or not at all, even when the server is killed in the middle; the
//! `--max-fallback` cap holds across restarts; and no fallback goes out twice, neither
//! one that was being sent when the server died nor one the gateway never answered.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use herald_tests::console_client::{between, Console};
use herald_tests::receivers::{SmsGateway, SmtpReceiver};
use herald_tests::{bin, now_ms, wait_until, TestAgent, TestServer, DEADLINE};
use serde_json::{json, Value};

/// The secret the gateway's delivery reports carry.
const SECRET: &str = "gateway-report-secret-0123456789";
/// What every campaign says.
const TITLE: &str = "Payment due";
const BODY: &str = "Your card payment is due on Friday.";
/// The sender's display name, which fallbacks carry.
const DISPLAY_NAME: &str = "Card Company";

/// A server whose `[sms]` is `gateway`, which reports back to it; `extra` is appended
/// to `[forwarding]` (or is further sections).
fn start_server(name: &str, gateway: &SmsGateway, extra: &str) -> TestServer {
    let config = format!(
        "[forwarding]\nallow_http = true\n{extra}\n{}",
        gateway.config(SECRET)
    );
    let server = TestServer::start_with_config(name, &config);
    gateway.report_to(&server, SECRET);
    server
}

/// A sender the operator delegated: its key file and API token.
struct Sender {
    key_file: PathBuf,
    token: String,
}

/// `sender keygen` + `sender add card`.
fn add_sender(server: &TestServer) -> Sender {
    let (key_file, token) = server.add_sender("card", false);
    Sender { key_file, token }
}

/// Writes a list file into the test directory.
fn write_list(server: &TestServer, name: &str, text: &str) -> PathBuf {
    let path = server.dir.path().join(name);
    std::fs::write(&path, text).expect("write the list");
    path
}

/// The arguments of `message send --list` with the sender's token.
fn send_args(sender: &Sender, list: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "message",
        "send",
        "--sender-key",
        sender.key_file.to_str().unwrap(),
        "--token",
        &sender.token,
        "--title",
        TITLE,
        "--body",
        BODY,
        "--list",
        list.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// `message send --list FILE ... --json`: the campaign as created.
fn send_campaign(server: &TestServer, sender: &Sender, list: &Path, extra: &[&str]) -> Value {
    let args = send_args(sender, list, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    server.json(&args)
}

/// `message send --list FILE ...`, whatever its outcome.
fn try_send_campaign(server: &TestServer, sender: &Sender, list: &Path, extra: &[&str]) -> Output {
    let args = send_args(sender, list, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    server.cli(&args)
}

fn campaign_id(created: &Value) -> String {
    created["id"].as_str().expect("campaign id").to_string()
}

/// `message status ID --json`.
fn status(server: &TestServer, id: &str) -> Value {
    server.json(&["message", "status", id])
}

/// Waits until the campaign's status satisfies `done`; returns it.
fn wait_status(server: &TestServer, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    wait_until(what, DEADLINE, || {
        let s = status(server, id);
        done(&s).then_some(s)
    })
}

/// `message recipients ID [--state S] --json`.
fn recipients(server: &TestServer, id: &str, state: Option<&str>) -> Vec<Value> {
    let mut args = vec!["message", "recipients", id];
    if let Some(state) = state {
        args.extend(["--state", state]);
    }
    server.json(&args).as_array().cloned().unwrap_or_default()
}

/// The row of `recipients` at list line `line`.
fn row(rows: &[Value], line: u64) -> &Value {
    rows.iter()
        .find(|r| r["line"] == line)
        .unwrap_or_else(|| panic!("no row at line {line}: {rows:#?}"))
}

/// A console user with a phone number and an e-mail address, and a device linked to
/// them (enrolled, not started).
fn person(server: &TestServer, login: &str, phone: &str) -> TestAgent {
    Console::new(server).register_with_device(
        server,
        login,
        &format!("{login}@example.org"),
        phone,
        &format!("{login}s-pc"),
    )
}

#[test]
fn recipients_without_the_program_get_sms_at_once() {
    let gateway = SmsGateway::start();
    let server = start_server("camp-at-once", &gateway, "");
    let card = add_sender(&server);
    let mut alice = person(&server, "alice", "+821011110000");
    alice.spawn();
    alice.wait_online(&server);

    // Alice has the program; the other two do not (one written in national form).
    let list = write_list(
        &server,
        "list.csv",
        "phone\n+821011110000\n010-5555-0001\n+82 10 5555 0002\n",
    );
    let created = send_campaign(
        &server,
        &card,
        &list,
        &["--country", "KR", "--fallback", "sms", "--invite"],
    );
    let id = campaign_id(&created);
    assert_eq!(
        (
            &created["addressed"],
            &created["with_program"],
            &created["no_program"],
            &created["devices"]
        ),
        (&json!(3), &json!(1), &json!(2), &json!(1)),
        "{created:#}"
    );

    // The default deadline is ten minutes; the two without the program get their SMS
    // now, in E.164, with the sender's name, the message and the invitation.
    let sms = gateway.wait_messages(2, DEADLINE);
    let start_at = status(&server, &id)["start_at"].as_i64().unwrap();
    let numbers: HashSet<&str> = sms.iter().map(|s| s.to.as_str()).collect();
    assert_eq!(numbers, HashSet::from(["+821055550001", "+821055550002"]));
    let expected = format!(
        "{DISPLAY_NAME}: {TITLE} - {BODY} Get the app: {}/join",
        server.https_url()
    );
    for sms in &sms {
        assert_eq!(sms.text, expected);
        assert!(
            sms.at - start_at < 15_000,
            "an SMS {} ms after the start is not at once",
            sms.at - start_at
        );
    }
    // Alice's device stored it: she is not texted (her deadline is minutes away).
    let s = wait_status(&server, &id, "Alice's stored receipt", |s| s["stored"] == 1);
    assert_eq!(s["no_program"], 2, "{s:#}");
    let rows = recipients(&server, &id, None);
    assert_eq!(row(&rows, 2)["state"], "stored", "{rows:#?}");
    assert_eq!(row(&rows, 2)["phone"], "+821011110000", "{rows:#?}");

    // The carrier reports both delivered.
    let s = wait_status(&server, &id, "two fallbacks reported delivered", |s| {
        s["fallback_delivered"] == 2
    });
    assert_eq!(
        (
            &s["fallback_sent"],
            &s["fallback_failed"],
            &s["fallback_pending"]
        ),
        (&json!(2), &json!(0), &json!(0)),
        "{s:#}"
    );
    assert_eq!(s["reach_rate"], 1.0, "{s:#}");
    assert_eq!(s["invited"], 2, "{s:#}");
    let delivered = recipients(&server, &id, Some("fallback_delivered"));
    let lines: Vec<&Value> = delivered.iter().map(|r| &r["line"]).collect();
    assert_eq!(lines, vec![&json!(3), &json!(4)], "{delivered:#?}");
    assert_eq!(gateway.messages().len(), 2, "nobody was texted twice");
}

#[test]
fn unreceived_messages_fall_back_after_the_deadline() {
    let gateway = SmsGateway::start();
    let server = start_server("camp-deadline", &gateway, "");
    let card = add_sender(&server);
    // Bob's only device was linked and ran, and is off now.
    let mut bob = person(&server, "bob", "+821022220000");
    bob.spawn();
    bob.wait_online(&server);
    // Killed: the server may not notice before the deadline, and pushes into a dead
    // connection; either way no `stored` receipt comes.
    bob.kill();
    // Carol's is on.
    let mut carol = person(&server, "carol", "+821033330000");
    carol.spawn();
    carol.wait_online(&server);

    // Bob by his phone (national form), Carol by her login.
    let list = write_list(&server, "list.csv", "phone,user\n010-2222-0000,\n,carol\n");
    let created = send_campaign(
        &server,
        &card,
        &list,
        &[
            "--country",
            "KR",
            "--fallback",
            "sms",
            "--fallback-after",
            "2s",
        ],
    );
    let id = campaign_id(&created);
    assert_eq!(created["with_program"], 2, "{created:#}");
    assert_eq!(created["no_program"], 0, "{created:#}");

    // Bob's SMS comes, and not before the deadline.
    let sms = gateway.wait_messages(1, DEADLINE);
    let start_at = status(&server, &id)["start_at"].as_i64().unwrap();
    assert_eq!(sms[0].to, "+821022220000");
    assert!(
        sms[0].at >= start_at + 2000,
        "the fallback went out {} ms after the start, before the 2 s deadline",
        sms[0].at - start_at
    );
    // Carol's device stored it in time: decided at the same deadline, not needed.
    let s = wait_status(&server, &id, "both rows decided", |s| {
        s["fallback_pending"] == 0 && s["fallback_sent"] == 1
    });
    assert_eq!(s["stored"], 1, "{s:#}");
    let rows = recipients(&server, &id, None);
    assert_eq!(row(&rows, 3)["user"], "carol", "{rows:#?}");
    assert_eq!(row(&rows, 3)["state"], "stored", "{rows:#?}");
    assert_eq!(row(&rows, 3)["fallback_state"], "not_needed", "{rows:#?}");
    assert_eq!(row(&rows, 2)["user"], "bob", "{rows:#?}");
    assert!(
        ["fallback_sent", "fallback_delivered"].contains(&row(&rows, 2)["state"].as_str().unwrap()),
        "{rows:#?}"
    );
    let texted: Vec<String> = gateway.messages().into_iter().map(|s| s.to).collect();
    assert_eq!(texted, vec!["+821022220000"], "Carol is not texted");
}

#[test]
fn blocked_recipients_get_no_fallback() {
    let gateway = SmsGateway::start();
    let server = start_server("camp-blocked", &gateway, "");
    let card = add_sender(&server);
    // Dave has two devices: he blocked the sender on his PC, and his laptop is off, so
    // it will not store the message by the deadline. Blocking on any device counts.
    let console = Console::new(&server);
    let mut pc = console.register_with_device(
        &server,
        "dave",
        "dave@example.org",
        "+821044440000",
        "daves-pc",
    );
    let link = console.submit("/devices", "/devices/link", &[]);
    let token = between(&link.body, r#"<code id="enroll-token">"#, "</code>")
        .expect("a second enrollment token");
    let _laptop = TestAgent::enroll_with_token(&server, "daves-laptop", token.trim());
    pc.spawn();
    pc.wait_online(&server);
    pc.cli_ok(&["block", "card"]);
    wait_until("the block reaches the server", DEADLINE, || {
        let refusals = server.json(&["message", "refusals", "--sender", "card"]);
        (!refusals.as_array()?.is_empty()).then_some(())
    });

    // Dave, and someone without the program who does get a text.
    let list = write_list(&server, "list.csv", "phone\n+821044440000\n+821055550009\n");
    let created = send_campaign(
        &server,
        &card,
        &list,
        &["--fallback", "sms", "--fallback-after", "2s"],
    );
    let id = campaign_id(&created);
    assert_eq!(created["devices"], 2, "{created:#}");
    assert_eq!(created["skipped_blocked"], 1, "the blocked PC gets nothing");

    // Past Dave's deadline his row is decided: skipped, blocked.
    let s = wait_status(&server, &id, "Dave's fallback decided", |s| {
        s["fallback_skipped_blocked"] == 1 && s["fallback_pending"] == 0
    });
    assert_eq!(s["fallback_sent"], 1, "{s:#}");
    let texted: Vec<String> = gateway.messages().into_iter().map(|s| s.to).collect();
    assert_eq!(texted, vec!["+821055550009"], "Dave is never texted");
    let blocked = recipients(&server, &id, Some("blocked"));
    assert_eq!(blocked.len(), 1, "{blocked:#?}");
    assert_eq!(blocked[0]["phone"], "+821044440000");
    assert_eq!(blocked[0]["fallback_state"], "skipped_blocked");
    assert_eq!(blocked[0]["devices"], 2);

    // The refusal report the sender is owed names the phone (with its own token).
    let csv = server.cli_ok(&[
        "message",
        "refusals",
        "--sender",
        "card",
        "--csv",
        "--token",
        &card.token,
    ]);
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("phone,sender,agent,by,at"), "{csv}");
    let refusal: Vec<&str> = lines.next().expect("one refusal").split(',').collect();
    assert_eq!(
        &refusal[..4],
        ["+821044440000", "card", pc.id.as_str(), "local"]
    );
    assert_eq!(lines.next(), None, "{csv}");
}

#[test]
fn carrier_reports_mark_fallback_delivered_or_failed() {
    let gateway = SmsGateway::start();
    gateway.fail("+821055550012");
    let server = start_server("camp-reports", &gateway, "");
    let card = add_sender(&server);
    let list = write_list(
        &server,
        "list.csv",
        "phone\n+821055550011\n+821055550012\n+821055550013\n",
    );
    let created = send_campaign(&server, &card, &list, &["--fallback", "sms"]);
    let id = campaign_id(&created);

    // Three SMS, three reports from the carrier: two delivered, one failed. A report
    // may overtake the server's record of its send; then it is kept and applied.
    let sms = gateway.wait_messages(3, DEADLINE);
    let reports = gateway.wait_reports(3, DEADLINE);
    for report in &reports {
        let outcome = report.answer["outcome"].as_str().unwrap_or_default();
        assert!(
            (report.answer_status, outcome) == (200, "updated")
                || (report.answer_status, outcome) == (202, "kept"),
            "{report:?}"
        );
    }
    let s = wait_status(&server, &id, "the reports applied", |s| {
        s["fallback_delivered"] == 2 && s["fallback_failed"] == 1
    });
    assert_eq!(s["fallback_sent"], 3, "{s:#}");
    let failed = recipients(&server, &id, Some("fallback_failed"));
    assert_eq!(failed.len(), 1, "{failed:#?}");
    assert_eq!(failed[0]["phone"], "+821055550012");
    assert_eq!(failed[0]["fallback_state"], "failed");
    assert!(
        failed[0]["fallback_detail"]
            .as_str()
            .unwrap_or_default()
            .contains("test gateway"),
        "the carrier's words are kept: {failed:#?}"
    );

    let id_of = |to: &str| sms.iter().find(|s| s.to == to).unwrap().id.clone();
    let delivered_id = id_of("+821055550011");
    // The same report again, and a contradicting one: duplicates, nothing changes.
    for status in ["delivered", "failed"] {
        let (code, answer) =
            gateway.post_report(SECRET, &json!({"id": delivered_id, "status": status}));
        assert_eq!(
            (code, answer["outcome"].as_str()),
            (200, Some("duplicate")),
            "{answer}"
        );
    }
    // An id no fallback has: kept (it may belong to a send not yet recorded).
    let (code, answer) = gateway.post_report(SECRET, &json!({"id": "gw-999", "status": "failed"}));
    assert_eq!(
        (code, answer["outcome"].as_str()),
        (202, Some("kept")),
        "{answer}"
    );
    // A wrong secret, or none: refused, and nothing changes.
    let other = id_of("+821055550013");
    for secret in ["not-the-gateway-secret-000000000", ""] {
        let (code, answer) = gateway.post_report(secret, &json!({"id": other, "status": "failed"}));
        assert_eq!(code, 401, "{answer}");
    }
    // Several at once, one answer each.
    let (code, answer) = gateway.post_report(
        SECRET,
        &json!([
            {"id": delivered_id, "status": "delivered"},
            {"id": "gw-1000", "status": "delivered"},
            {"id": other, "status": "queued"},
        ]),
    );
    assert_eq!(code, 200, "{answer}");
    let outcomes: Vec<&str> = answer
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, vec!["duplicate", "kept", "ignored"]);

    let s = status(&server, &id);
    assert_eq!(
        (
            &s["fallback_sent"],
            &s["fallback_delivered"],
            &s["fallback_failed"]
        ),
        (&json!(3), &json!(2), &json!(1)),
        "{s:#}"
    );
    let rows = recipients(&server, &id, None);
    let states: Vec<&str> = rows.iter().map(|r| r["state"].as_str().unwrap()).collect();
    assert_eq!(
        states,
        vec![
            "fallback_delivered",
            "fallback_failed",
            "fallback_delivered"
        ]
    );
}

#[test]
fn bad_rows_are_reported_by_line_and_strict_refuses_the_list() {
    let server = TestServer::start("camp-bad-rows");
    let card = add_sender(&server);
    let list = write_list(
        &server,
        "list.csv",
        "phone,email,user,agent\n\
         +821055550021,,,\n\
         not a phone,,,\n\
         ,someone@,,\n\
         ,,ghost,\n\
         ,,,nosuch\n\
         \n\
         +821055550022,,,,extra\n\
         ,carol@example.org,,\n",
    );
    let bad_lines = [3u64, 4, 5, 6, 8];

    // Strict: refused, with the lines, and nothing is created.
    let out = try_send_campaign(&server, &card, &list, &["--strict"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a strict send with bad rows succeeded"
    );
    assert!(stderr.contains("5 rows cannot be used"), "{stderr}");
    for line in bad_lines {
        assert!(
            stderr.contains(&format!("line {line}: ")),
            "line {line}: {stderr}"
        );
    }
    let messages = server.json(&["message", "list"]);
    assert_eq!(messages, json!([]), "a refused list leaves no message");

    // Not strict: the good rows are taken, and each bad one is named by line.
    let out = try_send_campaign(&server, &card, &list, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("sent to 2 recipients"), "{stdout}");
    assert!(stdout.contains("5 bad rows"), "{stdout}");
    for (line, words) in [
        (3, "not a phone"),
        (4, "someone@"),
        (5, "no user \"ghost\""),
        (6, "no agent \"nosuch\""),
        (8, "fields"),
    ] {
        let said = stderr
            .lines()
            .find(|l| l.starts_with(&format!("line {line}: ")))
            .unwrap_or_else(|| panic!("line {line} is not reported: {stderr}"));
        assert!(said.contains(words), "{said}");
    }

    let created = send_campaign(&server, &card, &list, &[]);
    assert_eq!(created["addressed"], 2, "{created:#}");
    assert_eq!(created["bad"], 5, "{created:#}");
    let lines: Vec<u64> = created["bad_rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["line"].as_u64().unwrap())
        .collect();
    assert_eq!(lines, bad_lines);
    let rows = recipients(&server, &campaign_id(&created), None);
    let taken: Vec<&Value> = rows.iter().map(|r| &r["line"]).collect();
    assert_eq!(taken, vec![&json!(2), &json!(9)], "{rows:#?}");
}

/// Rows in the all-or-nothing list: enough that reading it takes a while.
const BIG_LIST_ROWS: u64 = 300_000;

#[test]
fn campaign_is_all_or_nothing() {
    if herald_tests::sqlite_only("times a kill by the growth of herald.db-wal") {
        return;
    }
    let mut server = TestServer::start("camp-all-or-nothing");
    let card = add_sender(&server);
    let mut text = String::from("phone\n");
    for i in 0..BIG_LIST_ROWS {
        text.push_str(&format!("+8210{:08}\n", 20_000_000 + i));
    }
    let list = write_list(&server, "big.csv", &text);

    // The send runs beside the test; once the upload is in and the database is
    // growing, the campaign is being read in, and the server is killed.
    let args = send_args(&card, &list, &["--json"]);
    let mut send = Command::new(bin("herald-server"))
        .arg("--data-dir")
        .arg(server.data_dir())
        .args(&args)
        .env("HERALD_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn message send");
    let lists = server.data_dir().join("lists");
    let wal = server.data_dir().join("herald.db-wal");
    let wal_size = || std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    let uploaded = || {
        std::fs::read_dir(&lists).ok().is_some_and(|entries| {
            entries
                .flatten()
                .any(|e| e.path().extension().is_some_and(|x| x == "csv"))
        })
    };
    wait_until("the list uploaded", DEADLINE * 2, || {
        uploaded().then_some(())
    });
    let before = wal_size();
    wait_until("the ingest under way", DEADLINE * 2, || {
        (wal_size() > before + 8 * 1024 * 1024 || !uploaded()).then_some(())
    });
    let finished_first = send.try_wait().expect("poll message send").is_some();
    server.kill();
    let _ = send.kill();
    let _ = send.wait();
    server.spawn();

    // Whole, or nothing at all.
    let db = rusqlite::Connection::open(server.db_path()).expect("open the database");
    let count = |sql: &str| -> i64 { db.query_row(sql, [], |r| r.get(0)).unwrap() };
    let campaigns = count("SELECT COUNT(*) FROM campaigns");
    let rows = count("SELECT COUNT(*) FROM campaign_rows");
    let messages = count("SELECT COUNT(*) FROM messages");
    let listed = server.json(&["message", "list"]);
    match campaigns {
        0 => {
            assert_eq!((rows, messages), (0, 0), "a partial campaign survived");
            assert_eq!(listed, json!([]));
            println!("killed during the ingest: nothing was kept");
            // The sender sends it again, and it is taken whole.
            let created = send_campaign(&server, &card, &list, &[]);
            assert_eq!(created["addressed"], BIG_LIST_ROWS, "{created:#}");
            assert_eq!(
                count("SELECT COUNT(*) FROM campaign_rows"),
                BIG_LIST_ROWS as i64
            );
        }
        1 => {
            assert_eq!(rows, BIG_LIST_ROWS as i64, "a partial campaign survived");
            assert_eq!(messages, 1);
            assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed:#}");
            println!(
                "the ingest had committed before the kill (send finished: {finished_first}): all {rows} rows kept"
            );
        }
        n => panic!("{n} campaigns from one send"),
    }
}

#[test]
fn fallback_is_capped_and_never_sent_twice() {
    let gateway = SmsGateway::start();
    // One send at a time, so that when the server dies only one is in flight.
    let mut server = start_server("camp-capped", &gateway, "fallback_concurrency = 1\n");
    let card = add_sender(&server);
    // Five without the program, three whose devices are off: eight rows, at most six
    // fallbacks.
    let without: Vec<String> = (1..=5)
        .map(|i| format!("+8210555500{:02}", 30 + i))
        .collect();
    let with: Vec<String> = (1..=3)
        .map(|i| format!("+8210555500{:02}", 40 + i))
        .collect();
    let mut list = String::from("phone,agent\n");
    for phone in &without {
        list.push_str(&format!("{phone},\n"));
    }
    let mut devices = Vec::new();
    for (i, phone) in with.iter().enumerate() {
        let agent = TestAgent::enroll(&server, &format!("d{i}"), &[]);
        list.push_str(&format!("{phone},{}\n", agent.name));
        devices.push(agent);
    }
    let list = write_list(&server, "list.csv", &list);
    // The gateway holds its answers, so the server can die mid-send.
    for phone in &without {
        gateway.hold(phone);
    }
    let created = send_campaign(
        &server,
        &card,
        &list,
        &[
            "--fallback",
            "sms",
            "--fallback-after",
            "6s",
            "--max-fallback",
            "6",
        ],
    );
    let id = campaign_id(&created);
    assert_eq!(
        (&created["addressed"], &created["no_program"]),
        (&json!(8), &json!(5)),
        "{created:#}"
    );
    let deadline = status(&server, &id)["start_at"].as_i64().unwrap() + 6000;

    // The first of the five is being sent when the server dies, before the device
    // rows' deadline; it comes back after it.
    let first = gateway.wait_messages(1, DEADLINE)[0].to.clone();
    assert!(
        now_ms() < deadline,
        "the machine is too slow for this test's 6 s deadline"
    );
    server.kill();
    gateway.release();
    for phone in &with {
        gateway.hold(phone);
    }
    wait_until("the deadline to pass", DEADLINE, || {
        (now_ms() > deadline + 200).then_some(())
    });
    server.spawn();

    // The other four go out now (they had not been sent), and one device row fits
    // under the cap; it is being sent when the server dies again.
    let sms = gateway.wait_messages(6, DEADLINE);
    let last = sms[5].to.clone();
    assert!(with.contains(&last), "{sms:?}");
    server.kill();
    gateway.release();
    server.spawn();

    // Neither send in flight is repeated; the two other device rows were over the cap.
    let s = wait_status(&server, &id, "every row decided", |s| {
        s["fallback_pending"] == 0 && s["fallback_delivered"] == 4 && s["fallback_failed"] == 2
    });
    assert_eq!(
        (&s["fallback_sent"], &s["fallback_skipped_cap"]),
        (&json!(6), &json!(2)),
        "{s:#}"
    );
    let rows = recipients(&server, &id, None);
    let mut interrupted: Vec<&str> = rows
        .iter()
        .filter(|r| r["fallback_state"] == "interrupted")
        .map(|r| r["phone"].as_str().unwrap())
        .collect();
    interrupted.sort();
    assert_eq!(
        interrupted,
        vec![first.as_str(), last.as_str()],
        "{rows:#?}"
    );
    assert!(
        rows.iter()
            .filter(|r| r["fallback_state"] == "interrupted")
            .all(|r| r["fallback_detail"]
                .as_str()
                .unwrap_or_default()
                .contains("not sent again")),
        "{rows:#?}"
    );
    let capped: Vec<&Value> = rows
        .iter()
        .filter(|r| r["fallback_state"] == "skipped_cap")
        .collect();
    assert_eq!(capped.len(), 2, "{rows:#?}");
    assert!(capped.iter().all(|r| r["devices"] == 1), "{rows:#?}");
    let texted: Vec<String> = gateway.messages().into_iter().map(|s| s.to).collect();
    let unique: HashSet<&String> = texted.iter().collect();
    assert_eq!(
        unique.len(),
        texted.len(),
        "a number was texted twice: {texted:?}"
    );
    assert_eq!(texted.len(), 6, "--max-fallback 6: {texted:?}");
}

#[test]
fn unanswered_sms_is_not_sent_again() {
    let gateway = SmsGateway::start();
    // The gateway takes one SMS and does not answer within the server's 1 s: it may
    // have sent it, so sending it again could text the person twice.
    gateway.hold("+821055550051");
    let server = start_server(
        "camp-unanswered",
        &gateway,
        "timeout_secs = 1\nfirst_retry_secs = 1\n",
    );
    let card = add_sender(&server);
    let list = write_list(&server, "list.csv", "phone\n+821055550051\n+821055550052\n");
    let created = send_campaign(&server, &card, &list, &["--fallback", "sms"]);
    let id = campaign_id(&created);

    let s = wait_status(&server, &id, "both fallbacks final", |s| {
        s["fallback_pending"] == 0 && s["fallback_sent"] == 2
    });
    assert_eq!(
        (&s["fallback_delivered"], &s["fallback_failed"]),
        (&json!(1), &json!(1)),
        "{s:#}"
    );
    let failed = recipients(&server, &id, Some("fallback_failed"));
    assert_eq!(failed.len(), 1, "{failed:#?}");
    assert_eq!(failed[0]["phone"], "+821055550051");
    let detail = failed[0]["fallback_detail"].as_str().unwrap_or_default();
    assert!(detail.contains("not sent again"), "{detail}");
    // Final: it will not be sent again either.
    let texted: Vec<String> = gateway.messages().into_iter().map(|s| s.to).collect();
    assert_eq!(
        texted.len(),
        2,
        "an unanswered SMS was sent again: {texted:?}"
    );
}

#[test]
fn email_fallback_reaches_the_mailbox() {
    let receivers = herald_tests::TempDir::new("camp-email-smtp");
    let Some(smtp) = SmtpReceiver::start(receivers.path()) else {
        return;
    };
    let config = format!(
        "[smtp]\nhost = \"127.0.0.1\"\nport = {}\nfrom = \"Herald <herald@example.org>\"\n\
         tls = \"starttls\"\nca_file = {:?}\n",
        smtp.port(),
        smtp.ca_file().to_str().expect("UTF-8 temp path")
    );
    let server = TestServer::start_with_config("camp-email", &config);
    let card = add_sender(&server);
    // Erin has the program on a device that is off; Frank has none.
    let _erin = person(&server, "erin", "");
    let list = write_list(
        &server,
        "list.csv",
        "email\nerin@example.org\nfrank@example.org\n",
    );
    let created = send_campaign(
        &server,
        &card,
        &list,
        &["--fallback", "email", "--fallback-after", "2s", "--invite"],
    );
    let id = campaign_id(&created);
    assert_eq!(
        (&created["with_program"], &created["no_program"]),
        (&json!(1), &json!(1)),
        "{created:#}"
    );

    // Frank's mail first (at once), Erin's after her deadline; over STARTTLS.
    let mails = smtp.wait_mails_blocking(2, DEADLINE);
    let to: Vec<&str> = mails.iter().map(|m| m.rcpt_tos[0].as_str()).collect();
    assert_eq!(to, vec!["frank@example.org", "erin@example.org"]);
    for mail in &mails {
        assert!(mail.tls, "sent without STARTTLS");
        assert_eq!(mail.header("Subject").as_deref(), Some(TITLE));
        let body = mail.text();
        assert!(
            body.contains(&format!("{DISPLAY_NAME} sent you a message")),
            "{body}"
        );
        assert!(body.contains(BODY), "{body}");
    }
    // Only Frank, who has no program, is invited to get it.
    let invite = format!("{}/join", server.https_url());
    assert!(mails[0].text().contains(&invite), "{}", mails[0].text());
    assert!(!mails[1].text().contains(&invite), "{}", mails[1].text());

    // A mail the relay took counts as delivered.
    let s = wait_status(&server, &id, "both mails recorded", |s| {
        s["fallback_sent"] == 2 && s["fallback_pending"] == 0
    });
    assert_eq!(s["fallback_delivered"], 2, "{s:#}");
    let sent = recipients(&server, &id, Some("fallback_sent"));
    assert_eq!(sent.len(), 2, "{sent:#?}");
}
