//! Push messages end to end, with real processes: a sender delegated by the operator
//! sends a signed message; agents keep it in their inbox and send receipts signed with
//! their own key; the agent enforces its block list and every other check itself, so a
//! server that forgets a block, forges a sender, replays or stretches a message changes
//! nothing on the machine.
//!
//! The hostile server is simulated by writing `orders` and `jobs` rows straight into the
//! running server's database, as in `agent_refuses_bad_envelopes`.

use std::path::PathBuf;
use std::time::Duration;

use herald_shared::codec;
use herald_shared::envelope::{Audience, Envelope, OperatorKey, Statement};
use herald_shared::message::{Message, Priority, SenderGrant, DEFAULT_TTL_MS};
use herald_tests::{now_ms, random_bytes, wait_until, TestAgent, TestServer, DEADLINE};
use rusqlite::{params, Connection};
use serde_json::Value;

/// A sender the operator delegated, with its key in the test directory.
struct Sender {
    key_file: PathBuf,
    key: OperatorKey,
    token: String,
}

/// `sender keygen` + `sender add NAME`.
fn add_sender(server: &TestServer, name: &str, advertising: bool) -> Sender {
    let (key_file, token) = server.add_sender(name, advertising);
    let key = OperatorKey::from_hex(&std::fs::read_to_string(&key_file).unwrap()).unwrap();
    Sender {
        key_file,
        key,
        token,
    }
}

/// `message send --json` with the sender's key; returns the message id.
fn send(server: &TestServer, sender: &Sender, to: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "message",
        "send",
        "--sender-key",
        sender.key_file.to_str().unwrap(),
        "--to",
        to,
    ];
    if !extra.contains(&"--title") {
        args.extend(["--title", "Payment due"]);
    }
    args.extend(["--body", "Your card payment is due on Friday."]);
    args.extend_from_slice(extra);
    let created = server.json(&args);
    created["id"].as_str().expect("message id").to_string()
}

fn show(server: &TestServer, id: &str) -> Value {
    server.json(&["message", "show", id])
}

/// Waits until the agent's receipts for `id` include `state`.
fn wait_recipient(server: &TestServer, id: &str, agent: &TestAgent, state: &str) -> Value {
    wait_until(
        &format!("{} {state} for {id}", agent.name),
        DEADLINE,
        || {
            let detail = show(server, id);
            let recipient = detail["recipients"]
                .as_array()?
                .iter()
                .find(|r| r["agent_id"] == agent.id.as_str())?
                .clone();
            (recipient["state"] == state).then_some(recipient)
        },
    )
}

/// The agent's inbox as `herald-agent inbox --json` lists it.
fn inbox(agent: &TestAgent) -> Vec<Value> {
    agent
        .json(&["inbox"])
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// What a hostile server (or whoever owns its disk) can do: write rows.
struct HostileDb(Connection);

impl HostileDb {
    fn open(server: &TestServer) -> HostileDb {
        let conn = Connection::open(server.db_path()).expect("open the server's database");
        conn.busy_timeout(Duration::from_secs(10)).unwrap();
        HostileDb(conn)
    }

    /// Queues `envelope` for `agent_id` as a message delivery (stored under the
    /// message's id, as the server stores messages, once); returns the job id.
    fn inject(&self, agent_id: &str, envelope: &Envelope) -> i64 {
        let Statement::Message(message) = envelope.peek().unwrap() else {
            panic!("not a message");
        };
        let order_id = message.id_hex();
        let now = now_ms();
        self.0
            .execute(
                "INSERT INTO orders (id, envelope, action, kind, created_at)
                 VALUES (?1, ?2, 'injected', 'message', ?3) ON CONFLICT (id) DO NOTHING",
                params![order_id, codec::to_bytes(envelope).unwrap(), now],
            )
            .unwrap();
        self.0
            .execute(
                "INSERT INTO jobs (agent_id, order_id, state, created_at, deliver_after, expires_at)
                 VALUES (?1, ?2, 'queued', ?3, ?3, ?4)",
                params![agent_id, order_id, now, now + 600_000],
            )
            .unwrap();
        self.0.last_insert_rowid()
    }
}

/// A message signed in the test, with a grant signed by `operator`.
fn signed_message(
    operator: &OperatorKey,
    sender_key: &OperatorKey,
    name: &str,
    grant_ads: bool,
    change: impl FnOnce(&mut Message),
) -> Envelope {
    let now = now_ms();
    let grant = operator
        .sign(&Statement::Sender(SenderGrant {
            sender: name.into(),
            display_name: "Card Company".into(),
            key: sender_key.public(),
            advertising: grant_ads,
            issued_at: now,
        }))
        .unwrap();
    let mut message = Message {
        id: random_bytes(),
        sender: name.into(),
        audience: Audience::All,
        title: "Injected".into(),
        body: "by a hostile server".into(),
        priority: Priority::Normal,
        issued_at: now,
        expires_at: now + DEFAULT_TTL_MS,
        collapse: None,
        advertising: false,
        link: None,
        grant,
    };
    change(&mut message);
    sender_key.sign(&Statement::Message(message)).unwrap()
}

/// Pokes the relay so it re-reads queued jobs (the injected ones too).
fn poke(server: &TestServer, sender: &Sender, agent: &TestAgent) -> String {
    send(
        server,
        sender,
        &format!("agent:{}", agent.name),
        &["--title", "poke"],
    )
}

#[test]
fn message_reaches_the_inbox_and_comes_back_signed() {
    let server = TestServer::start("msg-inbox");
    let a1 = TestAgent::start(&server, "a1");
    let a2 = TestAgent::start(&server, "a2");
    let card = add_sender(&server, "card", false);

    let id = send(&server, &card, "all", &["--priority", "high"]);
    wait_recipient(&server, &id, &a1, "stored");
    wait_recipient(&server, &id, &a2, "stored");

    let detail = show(&server, &id);
    assert_eq!(detail["counts"]["addressed"], 2, "{detail:#}");
    assert_eq!(detail["counts"]["stored"], 2, "{detail:#}");
    assert_eq!(detail["counts"]["success_rate"], 1.0, "{detail:#}");

    // Every receipt verifies against its agent's enrolled key.
    let out = server.cli(&["message", "receipts", &id, "--verify"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("2 of 2 receipts verify"), "{stderr}");

    // And anyone can check them without the server: the report, the key, and the id
    // that is the key's fingerprint.
    let receipts = server.json(&["message", "receipts", &id]);
    for receipt in receipts.as_array().unwrap() {
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(receipt["report"].as_str().unwrap())
            .unwrap();
        let signed: herald_shared::message::SignedReport =
            codec::from_bytes(&bytes, 1 << 16).unwrap();
        let key = hex::decode(receipt["agent_key"].as_str().unwrap()).unwrap();
        assert_eq!(
            herald_shared::agent_id(&key),
            receipt["agent_id"].as_str().unwrap()
        );
        let herald_shared::message::Report::Receipt(r) = signed.verify(&key).unwrap() else {
            panic!("not a receipt");
        };
        assert_eq!(hex::encode(r.message_id), id);
    }

    // Bad input on the command line is refused before anything is asked.
    for (args, wanted) in [
        (vec!["message", "show", "nope"], "not a message id"),
        (
            vec!["message", "list", "--sender", "a&b=c"],
            "a sender name is",
        ),
    ] {
        let out = server.cli(&args);
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(wanted),
            "{args:?}"
        );
    }

    // Deliveries are listed with their message, not among the jobs.
    let jobs = server.json(&["jobs", "list"]);
    assert_eq!(jobs.as_array().map(Vec::len), Some(0), "{jobs:#}");

    // In the inbox of each, under its sender.
    for agent in [&a1, &a2] {
        let messages = inbox(agent);
        assert_eq!(messages.len(), 1, "{messages:?}");
        assert_eq!(messages[0]["sender"], "card");
        assert_eq!(messages[0]["title"], "Payment due");
    }

    // A sender token acts only as its own sender.
    let other = add_sender(&server, "bank", false);
    let out = server.cli(&["message", "show", &id, "--token", &other.token]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not yours"));
    let mine = server.cli_ok(&["message", "show", &id, "--token", &card.token]);
    assert!(mine.contains("success rate 100.0%"), "{mine}");
}

#[test]
fn blocked_sender_is_not_shown_even_if_the_server_forgets() {
    if herald_tests::sqlite_only("deletes sender_blocks rows from herald.db") {
        return;
    }
    let server = TestServer::start("msg-block");
    let a1 = TestAgent::start(&server, "a1");
    let card = add_sender(&server, "card", false);
    let first = send(&server, &card, "agent:a1", &[]);
    wait_recipient(&server, &first, &a1, "stored");

    a1.cli_ok(&["block", "card"]);
    // The agent reports the block, signed; the server lists it.
    wait_until("the block reaches the server", DEADLINE, || {
        let refusals = server.json(&["message", "refusals"]);
        let list = refusals.as_array()?;
        list.iter()
            .any(|r| r["agent_id"] == a1.id.as_str() && r["sender"] == "card")
            .then_some(())
    });
    // The server skips the blocked recipient from now on...
    let skipped = send(&server, &card, "agent:a1", &["--title", "skipped"]);
    wait_recipient(&server, &skipped, &a1, "skipped_blocked");

    // ...but forget it (delete the server's rows) and the agent still refuses.
    Connection::open(server.db_path())
        .unwrap()
        .execute("DELETE FROM sender_blocks", [])
        .unwrap();
    let again = send(&server, &card, "agent:a1", &["--title", "again"]);
    let recipient = wait_recipient(&server, &again, &a1, "refused");
    assert_eq!(recipient["reason"], "blocked", "{recipient:#}");
    let titles: Vec<Value> = inbox(&a1).iter().map(|m| m["title"].clone()).collect();
    assert_eq!(titles, vec![Value::from("Payment due")]);
    // The refusal is a signed receipt.
    let out = server.cli(&["message", "receipts", &again, "--verify"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("1 of 1 receipts verify"));

    // Unblocking is the only way back.
    a1.cli_ok(&["unblock", "card"]);
    wait_until("the unblock reaches the server", DEADLINE, || {
        let refusals = server.json(&["message", "refusals"]);
        refusals.as_array()?.is_empty().then_some(())
    });
    let back = send(&server, &card, "agent:a1", &["--title", "back"]);
    wait_recipient(&server, &back, &a1, "stored");
}

#[test]
fn forged_or_foreign_sender_is_refused() {
    if herald_tests::sqlite_only("plays a hostile server by writing rows into herald.db") {
        return;
    }
    let server = TestServer::start("msg-forged");
    let a1 = TestAgent::start(&server, "a1");
    let card = add_sender(&server, "card", false);
    let db = HostileDb::open(&server);
    let stranger = OperatorKey::from_seed(random_bytes());

    // A grant the operator never signed.
    let forged_grant = signed_message(&stranger, &card.key, "card", false, |_| {});
    let job1 = db.inject(&a1.id, &forged_grant);
    // A real grant, but the message signed by a key it does not name.
    let wrong_key = signed_message(&server.operator_key(), &stranger, "card", false, |m| {
        m.grant =
            signed_message(&server.operator_key(), &card.key, "card", false, |_| {}).peek_grant();
    });
    let job2 = db.inject(&a1.id, &wrong_key);
    poke(&server, &card, &a1);

    for job in [job1, job2] {
        let state = server.wait_job_state(job, "refused", DEADLINE);
        let error = state["error"].as_str().unwrap_or_default();
        assert!(error.contains("not delegated"), "{state:#}");
    }
    assert!(inbox(&a1).iter().all(|m| m["title"] != "Injected"));
}

/// The grant inside a message envelope (test helper).
trait PeekGrant {
    fn peek_grant(&self) -> Envelope;
}

impl PeekGrant for Envelope {
    fn peek_grant(&self) -> Envelope {
        match self.peek().unwrap() {
            Statement::Message(m) => m.grant,
            other => panic!("not a message: {other:?}"),
        }
    }
}

#[test]
fn advertising_needs_permission() {
    if herald_tests::sqlite_only("plays a hostile server by writing rows into herald.db") {
        return;
    }
    let server = TestServer::start("msg-ads");
    let a1 = TestAgent::start(&server, "a1");
    let card = add_sender(&server, "card", false);
    // The server refuses it at once...
    let out = server.cli(&[
        "message",
        "send",
        "--sender-key",
        card.key_file.to_str().unwrap(),
        "--to",
        "all",
        "--title",
        "Sale",
        "--body",
        "50% off",
        "--advertising",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("may not send advertising"));
    // ...and the agent refuses it when a hostile server slips it in.
    let db = HostileDb::open(&server);
    let ad = signed_message(&server.operator_key(), &card.key, "card", false, |m| {
        m.advertising = true
    });
    let job = db.inject(&a1.id, &ad);
    poke(&server, &card, &a1);
    let state = server.wait_job_state(job, "refused", DEADLINE);
    assert!(
        state["error"]
            .as_str()
            .unwrap_or_default()
            .contains("may not send advertising"),
        "{state:#}"
    );
    // A sender allowed to advertise gets through.
    let shop = add_sender(&server, "shop", true);
    let id = send(
        &server,
        &shop,
        "agent:a1",
        &["--advertising", "--title", "Sale"],
    );
    wait_recipient(&server, &id, &a1, "stored");
}

#[test]
fn expired_message_is_dropped() {
    if herald_tests::sqlite_only("plays a hostile server by writing rows into herald.db") {
        return;
    }
    let server = TestServer::start("msg-expired");
    let a1 = TestAgent::start(&server, "a1");
    let card = add_sender(&server, "card", false);
    let db = HostileDb::open(&server);
    // A message that expired an hour ago, which a hostile server keeps sending.
    let old = signed_message(&server.operator_key(), &card.key, "card", false, |m| {
        m.issued_at -= 2 * 3_600_000;
        m.expires_at = now_ms() - 3_600_000;
    });
    let job = db.inject(&a1.id, &old);
    poke(&server, &card, &a1);
    server.wait_job_state(job, "expired", DEADLINE);
    assert!(inbox(&a1).iter().all(|m| m["title"] != "Injected"));
}

#[test]
fn replayed_message_is_ignored() {
    if herald_tests::sqlite_only("plays a hostile server by writing rows into herald.db") {
        return;
    }
    let server = TestServer::start("msg-replay");
    let a1 = TestAgent::start(&server, "a1");
    let card = add_sender(&server, "card", false);
    let db = HostileDb::open(&server);
    let message = signed_message(&server.operator_key(), &card.key, "card", false, |_| {});
    let first = db.inject(&a1.id, &message);
    poke(&server, &card, &a1);
    server.wait_job_state(first, "succeeded", DEADLINE);
    // The same signed message again, under a new delivery.
    let second = db.inject(&a1.id, &message);
    poke(&server, &card, &a1);
    wait_until("the replay is answered", DEADLINE, || {
        let job = server.job(second);
        (job["state"] != "queued").then_some(())
    });
    let injected = inbox(&a1)
        .iter()
        .filter(|m| m["title"] == "Injected")
        .count();
    assert_eq!(injected, 1, "the replay was stored again");
}

#[test]
fn collapse_key_replaces_the_older_message() {
    let server = TestServer::start("msg-collapse");
    let a1 = TestAgent::start(&server, "a1");
    let card = add_sender(&server, "card", false);
    let first = send(
        &server,
        &card,
        "agent:a1",
        &["--collapse", "balance", "--title", "Balance: 10"],
    );
    wait_recipient(&server, &first, &a1, "stored");
    let second = send(
        &server,
        &card,
        "agent:a1",
        &["--collapse", "balance", "--title", "Balance: 20"],
    );
    wait_recipient(&server, &second, &a1, "stored");
    let other = send(&server, &card, "agent:a1", &["--title", "Other"]);
    wait_recipient(&server, &other, &a1, "stored");
    let mut titles: Vec<String> = inbox(&a1)
        .iter()
        .map(|m| m["title"].as_str().unwrap().to_string())
        .collect();
    titles.sort();
    assert_eq!(titles, vec!["Balance: 20", "Other"]);
}

#[test]
fn offline_agent_gets_message_until_ttl() {
    let server = TestServer::start("msg-offline");
    let mut sleeper = TestAgent::enroll(&server, "sleeper", &[]);
    let card = add_sender(&server, "card", false);
    let kept = send(&server, &card, "agent:sleeper", &["--ttl", "1h"]);
    let lost = send(
        &server,
        &card,
        "agent:sleeper",
        &["--ttl", "5s", "--title", "Too late"],
    );
    // Past the short TTL before the agent ever connects (5 s: a loaded machine may take
    // a second or two between signing and the server taking it).
    wait_until("the short TTL passes", DEADLINE, || {
        (show(&server, &lost)["counts"]["expired"] == 1).then_some(())
    });
    sleeper.spawn();
    wait_recipient(&server, &kept, &sleeper, "stored");
    let titles: Vec<Value> = inbox(&sleeper).iter().map(|m| m["title"].clone()).collect();
    assert_eq!(titles, vec![Value::from("Payment due")]);
}

#[test]
fn kill_between_store_and_receipt_loses_and_duplicates_nothing() {
    let mut server = TestServer::start("msg-kill");
    let mut a1 = TestAgent::start(&server, "a1");
    let card = add_sender(&server, "card", false);
    // Both are killed the moment the message is in the inbox: whether the receipt (or
    // even the acknowledgement) had reached the server is a race, and neither outcome
    // may lose the message, store it twice or receipt it twice.
    let id = send(&server, &card, "agent:a1", &[]);
    wait_until("stored in the inbox", DEADLINE, || {
        (!inbox(&a1).is_empty()).then_some(())
    });
    server.kill();
    a1.kill();
    server.spawn();
    a1.spawn();
    a1.wait_online(&server);
    wait_recipient(&server, &id, &a1, "stored");
    assert_eq!(inbox(&a1).len(), 1, "stored twice or lost");
    let receipts = server.json(&["message", "receipts", &id]);
    let stored = receipts
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["state"] == "stored")
        .count();
    assert_eq!(stored, 1, "{receipts:#}");
}

#[test]
fn the_console_asks_and_the_agent_decides() {
    use herald_tests::console_client::Console;

    let server = TestServer::start("msg-console");
    let console = Console::new(&server);
    let mut pc = console.register_with_device(
        &server,
        "alice",
        "alice@example.org",
        "+821012345678",
        "alices-pc",
    );
    pc.spawn();
    pc.wait_online(&server);
    let card = add_sender(&server, "card", false);
    let bank = add_sender(&server, "bank", false);
    let id = send(&server, &card, "agent:alices-pc", &[]);
    wait_recipient(&server, &id, &pc, "stored");
    let page = console.get("/messages");
    assert!(
        page.body.contains(&format!(r#"data-message="{id}""#)),
        "{}",
        page.body
    );

    // Blocked from the console: the agent applies it and says so, signed.
    let ask = |sender: &str, action: &str| {
        let answer = console.submit(
            "/messages",
            "/messages/block",
            &[("agent", &pc.id), ("sender", sender), ("action", action)],
        );
        assert_eq!(
            answer.page_id().as_deref(),
            Some("messages"),
            "{}",
            answer.body
        );
    };
    let blocked_by = |sender: &str| -> Option<String> {
        let senders = pc.json(&["senders"]);
        senders
            .as_array()?
            .iter()
            .find(|s| s["sender"] == sender && s["blocked"] == true)
            .map(|s| s["blocked_by"].as_str().unwrap_or("?").to_string())
    };
    ask("card", "block");
    wait_until("the agent blocks card", DEADLINE, || blocked_by("card"));
    let refusal = wait_until("the block reaches the server", DEADLINE, || {
        let refusals = server.json(&["message", "refusals", "--sender", "card"]);
        refusals.as_array()?.first().cloned()
    });
    assert_eq!(refusal["by"], "console", "{refusal:#}");
    assert_eq!(refusal["phone"], "+821012345678", "{refusal:#}");

    // A block made at the machine is not the console's to undo.
    pc.cli_ok(&["block", "bank"]);
    ask("bank", "unblock");
    wait_until("the agent answers", DEADLINE, || {
        let page = console.get("/messages");
        (!page.body.contains("unblock requested")).then_some(())
    });
    assert_eq!(blocked_by("bank").as_deref(), Some("local"));
    let again = send(
        &server,
        &bank,
        "agent:alices-pc",
        &["--title", "still blocked"],
    );
    wait_recipient(&server, &again, &pc, "skipped_blocked");

    // The console's own block it may undo.
    ask("card", "unblock");
    wait_until("the agent unblocks card", DEADLINE, || {
        blocked_by("card").is_none().then_some(())
    });
    let back = send(&server, &card, "agent:alices-pc", &["--title", "back"]);
    wait_recipient(&server, &back, &pc, "stored");
}

#[test]
fn notification_goes_through_the_desktop_service() {
    use herald_tests::dbus::{NotificationServer, PrivateBus};
    use herald_tests::session_helper::{recording_browser, SessionHelper};

    let server = TestServer::start("msg-notify");
    let Some(bus) = PrivateBus::start(server.dir.path()) else {
        eprintln!("skipped: needs dbus-daemon");
        return;
    };
    let desktop = NotificationServer::start(&bus);
    let a1 = TestAgent::start(&server, "a1");
    let (browser, _record) = recording_browser(server.dir.path());
    let _helper = SessionHelper::start_on_bus(
        &a1,
        &browser.to_string_lossy(),
        &server.dir.path().join("helper.log"),
        Some(bus.address()),
    );
    let card = add_sender(&server, "card", false);

    // The daemon keeps the message, the helper shows it through the desktop's service,
    // and the signed `displayed` receipt comes back.
    let id = send(&server, &card, "agent:a1", &["--priority", "high"]);
    let call = desktop.wait_calls(1);
    assert_eq!(call.app_name, "Herald");
    assert!(call.summary.contains("Card Company"), "{call:?}");
    assert!(call.summary.contains("Payment due"), "{call:?}");
    assert_eq!(call.body, "Your card payment is due on Friday.");
    assert_eq!(call.urgency, Some(2), "high priority is urgent: {call:?}");
    assert!(
        call.actions.iter().any(|a| a == "Block this sender"),
        "{call:?}"
    );
    wait_until("the displayed receipt", DEADLINE, || {
        let detail = show(&server, &id);
        (detail["counts"]["displayed"] == 1).then_some(())
    });

    // "Block this sender": the agent blocks it (by the notification) and says so.
    desktop.invoke_action(call.id, "block");
    wait_until("the agent blocks card", DEADLINE, || {
        let senders = a1.json(&["senders"]);
        senders
            .as_array()?
            .iter()
            .any(|s| s["sender"] == "card" && s["blocked_by"] == "notification")
            .then_some(())
    });
    let refusal = wait_until("the block reaches the server", DEADLINE, || {
        let refusals = server.json(&["message", "refusals"]);
        refusals.as_array()?.first().cloned()
    });
    assert_eq!(refusal["by"], "notification", "{refusal:#}");
    assert_eq!(refusal["sender"], "card", "{refusal:#}");
}
