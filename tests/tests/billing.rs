//! Metering and billing end to end (issue 16): a real server process, usage through
//! `POST /api/v1/usage` and derived from real stored rows (a message delivered to a real
//! agent, a job run on it, tunnel sessions as the relay records them), rated by
//! `herald-server billing run` and exported.

use std::collections::BTreeMap;

use herald_shared::message::Report;
use herald_shared::peers::{End, SessionUsage};
use herald_tests::{now_ms, TestAgent, TestServer, DEADLINE};
use serde_json::{json, Value};

const PLANS: &str = r#"
[operator]
fee_bp = 1000

[[plan]]
name = "standard"
currency = "EUR"
flat_fee = "2.00"
default = true

[plan.meters.tunnel_bytes]
per = 1000000
included = 1000000
price = "0.01"

[plan.meters.tunnel_seconds]
price = "0.001"

[plan.meters.messages_sent]
price = "0.10"

[plan.meters.jobs_run]
price = "0.25"

[plan.meters.fallback_sms]
mode = "volume"
tiers = [{ up_to = 100, price = "0.09" }, { price = "0.07" }]
"#;

/// The admin token `init` wrote into the data directory's `admin.toml`.
fn admin_token(server: &TestServer) -> String {
    let text = std::fs::read_to_string(server.data_dir().join("admin.toml")).expect("admin.toml");
    text.lines()
        .find_map(|l| l.strip_prefix("admin_token = "))
        .map(|v| v.trim().trim_matches('"').to_string())
        .expect("admin_token in admin.toml")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// `POST /api/v1/usage` with `body`; the status and the answer, or the transport error.
fn post_usage(server: &TestServer, body: String) -> Result<(u16, Value), String> {
    let url = format!("{}/api/v1/usage", server.https_url());
    let token = admin_token(server);
    runtime().block_on(async {
        let response = herald_tests::https_client()
            .post(&url)
            .bearer_auth(&token)
            .header("content-type", "application/x-ndjson")
            .body(body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let text = response.text().await.map_err(|e| e.to_string())?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    })
}

/// Ingests events that must be taken; returns (accepted, duplicates).
fn ingest(server: &TestServer, events: &[Value]) -> (u64, u64) {
    let body: String = events.iter().map(|e| format!("{e}\n")).collect();
    let (status, answer) = post_usage(server, body).expect("an answer");
    assert_eq!(status, 200, "{answer}");
    (
        answer["accepted"].as_u64().expect("accepted"),
        answer["duplicates"].as_u64().expect("duplicates"),
    )
}

fn event(seq: &str, account: &str, meter: &str, quantity: i64, time: i64) -> Value {
    json!({"source": "test/gateway", "seq": seq, "account": account, "meter": meter,
           "quantity": quantity, "time": time})
}

fn month_of(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    // Civil-from-days (Howard Hinnant), enough for a month name.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}")
}

fn next_month(month: &str) -> String {
    let (year, m) = month.split_once('-').expect("YYYY-MM");
    let (year, m): (i64, i64) = (year.parse().expect("year"), m.parse().expect("month"));
    if m == 12 {
        format!("{:04}-01", year + 1)
    } else {
        format!("{year:04}-{:02}", m + 1)
    }
}

fn set_plans(server: &TestServer) {
    let file = server.dir.path().join("plans.toml");
    std::fs::write(&file, PLANS).expect("write plans");
    let out = server.cli_ok(&["billing", "plan", "set", file.to_str().expect("path")]);
    assert!(out.contains("1 plan(s) set"), "{out}");
}

fn invoices(server: &TestServer, month: &str) -> Value {
    server.json(&["billing", "invoices", "--month", month])
}

fn invoice<'a>(all: &'a Value, account: &str) -> &'a Value {
    all.as_array()
        .expect("invoice list")
        .iter()
        .find(|i| i["account"] == account)
        .unwrap_or_else(|| panic!("no invoice for {account} in {all:#}"))
}

fn line<'a>(invoice: &'a Value, meter: &str) -> &'a Value {
    invoice["lines"]
        .as_array()
        .expect("lines")
        .iter()
        .find(|l| l["meter"] == meter)
        .unwrap_or_else(|| panic!("no {meter} line in {invoice:#}"))
}

fn db(server: &TestServer) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(server.db_path()).expect("open the server's database");
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .expect("busy timeout");
    conn
}

fn user_id(server: &TestServer, login: &str) -> i64 {
    db(server)
        .query_row("SELECT id FROM users WHERE login = ?1", [login], |r| {
            r.get(0)
        })
        .expect("user id")
}

/// A closed tunnel session, as the relay records one (store/peers.rs's columns), with
/// the last counts its ends signed (the consumer's only when it has an agent), as the
/// agents' outboxes deliver them: what the bill is made of.
#[allow(clippy::too_many_arguments)]
fn record_session(
    server: &TestServer,
    provider: &TestAgent,
    provider_user: i64,
    consumer: Option<(&TestAgent, i64)>,
    via: &str,
    started: i64,
    seconds: i64,
    bytes: (i64, i64),
    requests: i64,
) {
    let db = db(server);
    db.execute(
        "INSERT INTO tunnel_sessions (provider_agent_id, share, provider_user_id,
            consumer_user_id, consumer_agent_id, via, started_at, ended_at, bytes_up,
            bytes_down, requests, outcome)
         VALUES (?1, 'shop', ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 'closed')",
        rusqlite::params![
            provider.id,
            provider_user,
            consumer.map(|(_, user)| user),
            consumer.map(|(agent, _)| agent.id.clone()),
            via,
            started,
            started + seconds * 1000,
            bytes.0,
            bytes.1,
            requests
        ],
    )
    .expect("record a session");
    let session = db.last_insert_rowid();
    let ends = std::iter::once((provider, End::Provider))
        .chain(consumer.map(|(agent, _)| (agent, End::Consumer)));
    for (agent, end) in ends {
        let usage = SessionUsage {
            agent_id: agent.id.clone(),
            session,
            end,
            seq: 0,
            bytes_up: bytes.0 as u64,
            bytes_down: bytes.1 as u64,
            requests: requests as u64,
            seconds: seconds as u64,
            last: true,
            at: started + seconds * 1000,
        };
        db.execute(
            "INSERT INTO usage_signatures (session_id, side, agent_id, seq, bytes_up,
                bytes_down, requests, seconds, final, signature, signed_at, received_at)
             VALUES (?1, ?2, ?3, 0, ?4, ?5, ?6, ?7, 1, ?8, ?9, ?9)",
            rusqlite::params![
                session,
                end.as_str(),
                agent.id,
                bytes.0,
                bytes.1,
                requests,
                seconds,
                agent.sign_report(&Report::Usage(usage.clone())),
                usage.at
            ],
        )
        .expect("store a signed count");
    }
}

#[test]
fn billing_run_is_idempotent_and_closed_months_do_not_change() {
    if herald_tests::sqlite_only("writes agents and tunnel sessions into herald.db") {
        return;
    }
    let server = TestServer::start("billing-idempotent");
    set_plans(&server);
    // Real stored rows: a user who owns a real agent that runs a job, a sender whose
    // message is delivered to it, and two tunnel sessions to the user's share.
    assert!(server
        .add_user("alice", false, "correct horse battery")
        .status
        .success());
    assert!(server
        .add_user("bob", false, "correct horse battery")
        .status
        .success());
    let (alice, bob) = (user_id(&server, "alice"), user_id(&server, "bob"));
    let agent = TestAgent::start(&server, "shop-box");
    db(&server)
        .execute(
            "UPDATE agents SET owner_user_id = ?1 WHERE id = ?2",
            rusqlite::params![alice, agent.id],
        )
        .expect("link the agent to alice");
    let job = server.run_job("agent:shop-box", &[], &["/bin/true"])[0];
    server.wait_job_state(job, "succeeded", DEADLINE);
    let (sender_key, _) = server.add_sender("acme", false);
    server.cli_ok(&[
        "message",
        "send",
        "--sender-key",
        sender_key.to_str().expect("path"),
        "--to",
        "agent:shop-box",
        "--title",
        "Invoice ready",
        "--body",
        "Your invoice is ready.",
    ]);
    let now = now_ms();
    let month = month_of(now);
    // bob used alice's share for 100 s and 3.5 MB; a browser without a signed-in user
    // used it for 10 s (billed to alice's own account, and said so).
    let bob_box = TestAgent::enroll(&server, "bob-box", &[]);
    record_session(
        &server,
        &agent,
        alice,
        Some((&bob_box, bob)),
        "relay",
        now - 200_000,
        100,
        (500_000, 3_000_000),
        0,
    );
    record_session(
        &server,
        &agent,
        alice,
        None,
        "browser",
        now - 100_000,
        10,
        (1_000, 9_000),
        4,
    );
    server.cli_ok(&[
        "billing",
        "price",
        "set",
        "--provider",
        &format!("user:{alice}"),
        "--meter",
        "tunnel_seconds",
        "--price",
        "0.02",
        "--currency",
        "EUR",
    ]);
    // Usage through the API: 250 fallback SMS for acme (volume tier 2: 250 x 0.07).
    assert_eq!(
        ingest(
            &server,
            &[event("sms-1", "sender:acme", "fallback_sms", 250, now)]
        ),
        (1, 0)
    );

    let first = server.json(&["billing", "run", "--month", &month]);
    assert!(
        first["changed"].as_u64().expect("changed") >= 3,
        "{first:#}"
    );
    let drafts = invoices(&server, &month);
    let bob_invoice = invoice(&drafts, &format!("user:{bob}"));
    // 3.5 MB with 1 MB included: 2.5 x 0.01 = 0.025 EUR, 2.5 cents rounds to even 2;
    // 100 s x 0.001 = 0.10; flat 2.00; alice's price: 100 s x 0.02 = 2.00.
    assert_eq!(line(bob_invoice, "tunnel_bytes")["quantity"], 3_500_000);
    assert_eq!(line(bob_invoice, "tunnel_bytes")["amount"], 2);
    assert_eq!(line(bob_invoice, "tunnel_seconds")["amount"], 10);
    assert_eq!(bob_invoice["provider_charges"][0]["amount"], 200);
    assert_eq!(bob_invoice["total"], 200 + 2 + 10 + 200);
    let alice_invoice = invoice(&drafts, &format!("user:{alice}"));
    assert_eq!(
        line(alice_invoice, "jobs_run")["quantity"],
        1,
        "{alice_invoice:#}"
    );
    assert_eq!(line(alice_invoice, "tunnel_requests")["quantity"], 4);
    assert_eq!(alice_invoice["earnings_net"], 180, "2.00 less the 10 % fee");
    assert!(
        alice_invoice["notes"][0]
            .as_str()
            .expect("note")
            .contains("billed to the provider"),
        "{alice_invoice:#}"
    );
    let acme = invoice(&drafts, "sender:acme");
    assert_eq!(line(acme, "messages_sent")["quantity"], 1, "one delivery");
    assert_eq!(line(acme, "fallback_sms")["amount"], 250 * 7);
    assert!(drafts
        .as_array()
        .expect("list")
        .iter()
        .all(|i| i["status"] == "draft"));

    // Again: nothing changes.
    let second = server.json(&["billing", "run", "--month", &month]);
    assert_eq!(second["changed"], 0, "{second:#}");
    assert_eq!(second["metered"], 0, "rows are metered once");
    assert_eq!(invoices(&server, &month), drafts);

    // A new event for the open month replaces that draft only.
    assert_eq!(
        ingest(
            &server,
            &[event("sms-2", "sender:acme", "fallback_sms", 10, now)]
        ),
        (1, 0)
    );
    let third = server.json(&["billing", "run", "--month", &month]);
    assert_eq!(third["changed"], 1, "{third:#}");
    let redrafted = invoices(&server, &month);
    assert_eq!(
        line(invoice(&redrafted, "sender:acme"), "fallback_sms")["quantity"],
        260
    );

    // Closing makes the invoices final; later events for that month go to the next one.
    let closed = server.json(&["billing", "close", "--month", &month]);
    assert!(closed["closed_at"].is_i64(), "{closed:#}");
    let finals = invoices(&server, &month);
    assert!(finals
        .as_array()
        .expect("list")
        .iter()
        .all(|i| i["status"] == "final"));
    assert_eq!(
        ingest(
            &server,
            &[event("sms-late", "sender:acme", "fallback_sms", 5, now)]
        ),
        (1, 0)
    );
    let after = server.json(&["billing", "run", "--month", &month]);
    assert_eq!(after["changed"], 0, "{after:#}");
    let closed_again = server.json(&["billing", "close", "--month", &month]);
    assert_eq!(closed_again["closed_at"], closed["closed_at"]);
    assert_eq!(
        invoices(&server, &month),
        finals,
        "a closed month never changes"
    );
    let next = next_month(&month);
    server.json(&["billing", "run", "--month", &next]);
    let later = invoices(&server, &next);
    let acme_next = invoice(&later, "sender:acme");
    assert_eq!(line(acme_next, "fallback_sms")["quantity"], 5);
    assert_eq!(acme_next["late"][0]["from_month"], month.as_str());
    assert_eq!(acme_next["late"][0]["events"], 1);
    let text = server.cli_ok(&[
        "billing",
        "invoices",
        "--account",
        "sender:acme",
        "--month",
        &next,
    ]);
    assert!(
        text.contains(&format!("1 late event(s) from {month}")),
        "{text}"
    );
}

fn batch(prefix: &str, n: usize, time: i64) -> Vec<Value> {
    (0..n)
        .map(|i| {
            event(
                &format!("{prefix}-{i}"),
                &format!("user:{}", i % 50),
                "jobs_run",
                1,
                time,
            )
        })
        .collect()
}

fn jobs_total(server: &TestServer, month: &str) -> i64 {
    invoices(server, month)
        .as_array()
        .expect("list")
        .iter()
        .flat_map(|i| i["lines"].as_array().expect("lines").clone())
        .filter(|l| l["meter"] == "jobs_run")
        .map(|l| l["quantity"].as_i64().expect("quantity"))
        .sum()
}

#[test]
fn duplicate_events_are_counted_once() {
    if herald_tests::sqlite_only("counts the stored rows in herald.db") {
        return;
    }
    let mut server = TestServer::start("billing-duplicates");
    set_plans(&server);
    let now = now_ms();
    let month = month_of(now);
    // The same key twice in one request, and again in a second request.
    let twice = [
        event("k1", "user:1", "jobs_run", 3, now),
        event("k1", "user:1", "jobs_run", 3, now),
    ];
    assert_eq!(ingest(&server, &twice), (1, 1));
    assert_eq!(ingest(&server, &twice[..1]), (0, 1));
    // The same as a JSON array, through the CLI.
    let file = server.dir.path().join("again.json");
    std::fs::write(&file, serde_json::to_string(&twice[..1]).expect("json")).expect("write");
    let out = server.cli_ok(&["billing", "ingest", file.to_str().expect("path")]);
    assert!(
        out.contains("0 usage event(s) stored, 1 already stored"),
        "{out}"
    );

    // An answer lost to a crash: the batch committed, the server is killed before the
    // client used the answer, and the client resends everything after the restart.
    let first = batch("a", 2000, now);
    assert_eq!(ingest(&server, &first), (2000, 0));
    server.kill();
    server.spawn();
    let mut resend = first.clone();
    resend.extend(batch("b", 500, now));
    assert_eq!(ingest(&server, &resend), (500, 2000));

    // kill -9 while a large batch is in flight (before, during or after its commit:
    // whichever it was, the resend completes it without counting anything twice).
    let big = batch("c", 8000, now);
    let body: String = big.iter().map(|e| format!("{e}\n")).collect();
    let pid = server.pid().expect("running");
    let url = format!("{}/api/v1/usage", server.https_url());
    let token = admin_token(&server);
    let killed = std::thread::scope(|scope| {
        let request = scope.spawn(|| {
            runtime().block_on(async {
                herald_tests::https_client()
                    .post(&url)
                    .bearer_auth(&token)
                    .body(body.clone())
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
            })
        });
        // Kill as soon as the batch is being written: the WAL file changes.
        let wal = server.data_dir().join("herald.db-wal");
        let written = || std::fs::metadata(&wal).and_then(|m| m.modified()).ok();
        let before = written();
        herald_tests::wait_until("the batch to reach the database", DEADLINE, || {
            (written() != before || request.is_finished()).then_some(())
        });
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill -9");
        request.join().expect("request thread")
    });
    eprintln!("the in-flight request ended with {killed:?}");
    server.kill();
    server.spawn();
    let (accepted, duplicates) = ingest(&server, &big);
    assert_eq!(accepted + duplicates, 8000);
    assert!(
        killed.is_ok() || duplicates == 0 || duplicates == 8000,
        "a batch is committed whole or not at all: {accepted} new, {duplicates} old"
    );
    server.json(&["billing", "run", "--month", &month]);
    assert_eq!(
        jobs_total(&server, &month),
        3 + 2000 + 500 + 8000,
        "each event once"
    );
    // Prometheus counts each stored event once too.
    let stored: i64 = db(&server)
        .query_row(
            "SELECT COUNT(*) FROM usage_events WHERE meter = 'jobs_run'",
            [],
            |r| r.get(0),
        )
        .expect("count events");
    let metrics = get_metrics(&server);
    assert!(
        metrics.contains(&format!(
            "herald_usage_events_total{{meter=\"jobs_run\"}} {stored}\n"
        )),
        "{stored} events: {metrics}"
    );
}

/// `GET /metrics` with the admin token.
fn get_metrics(server: &TestServer) -> String {
    let url = format!("{}/metrics", server.https_url());
    let token = admin_token(server);
    runtime().block_on(async {
        let response = herald_tests::https_client()
            .get(&url)
            .bearer_auth(&token)
            .send()
            .await
            .expect("GET /metrics");
        assert_eq!(response.status().as_u16(), 200);
        response.text().await.expect("metrics text")
    })
}

fn csv_rows(text: &str) -> Vec<BTreeMap<String, String>> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().expect("header").split(',').collect();
    lines
        .map(|l| {
            header
                .iter()
                .map(|h| h.to_string())
                .zip(l.split(',').map(String::from))
                .collect()
        })
        .collect()
}

#[test]
fn export_totals_equal_invoice_totals() {
    let server = TestServer::start("billing-export");
    set_plans(&server);
    server.cli_ok(&[
        "billing",
        "price",
        "set",
        "--provider",
        "user:7",
        "--meter",
        "tunnel_seconds",
        "--price",
        "0.015",
        "--currency",
        "EUR",
    ]);
    let now = now_ms();
    let month = month_of(now);
    let mut events = Vec::new();
    for (i, account) in ["user:1", "user:2", "sender:shop", "agent:abc"]
        .iter()
        .enumerate()
    {
        let i = i as i64;
        events.push(event(
            &format!("b{i}"),
            account,
            "tunnel_bytes",
            1_234_567 * (i + 1),
            now,
        ));
        events.push(event(
            &format!("m{i}"),
            account,
            "messages_sent",
            17 * i + 3,
            now,
        ));
        events.push(event(
            &format!("s{i}"),
            account,
            "fallback_sms",
            60 * i + 1,
            now,
        ));
        let mut paid = event(
            &format!("t{i}"),
            account,
            "tunnel_seconds",
            333 * (i + 1),
            now,
        );
        paid["provider"] = json!("user:7");
        events.push(paid);
    }
    assert_eq!(ingest(&server, &events), (16, 0));
    server.json(&["billing", "run", "--month", &month]);
    let invoices = invoices(&server, &month);
    let list = invoices.as_array().expect("list");
    assert_eq!(list.len(), 5, "four payers and the provider");

    let dir = server.dir.path();
    let export = |format: &str| -> String {
        let out = dir.join(format!("export.{format}"));
        server.cli_ok(&[
            "billing",
            "export",
            "--month",
            &month,
            "--format",
            format,
            "--out",
            out.to_str().expect("path"),
        ]);
        std::fs::read_to_string(&out).expect("export written")
    };
    // CSV: an account's flat fee, usage and provider charge rows add up to its total.
    let mut csv_totals: BTreeMap<String, i64> = BTreeMap::new();
    for row in csv_rows(&export("csv")) {
        if row["kind"] != "earning" {
            *csv_totals.entry(row["account"].clone()).or_default() +=
                row["amount_minor"].parse::<i64>().expect("amount");
        }
    }
    let invoice_totals: BTreeMap<String, i64> = list
        .iter()
        .map(|i| {
            (
                i["account"].as_str().expect("account").to_string(),
                i["total"].as_i64().expect("total"),
            )
        })
        .collect();
    assert_eq!(csv_totals, invoice_totals);
    assert!(invoice_totals.values().all(|&t| t > 0));

    // JSON: the invoices themselves.
    let json_export: Value = serde_json::from_str(&export("json")).expect("JSON export");
    assert_eq!(json_export, invoices);

    // CloudEvents: every event once, with its quantities summing to the invoice lines.
    let mut quantities: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut ids = std::collections::BTreeSet::new();
    for text in export("cloudevents").lines() {
        let ce: Value = serde_json::from_str(text).expect("a CloudEvent per line");
        assert_eq!(ce["specversion"], "1.0");
        let meter = ce["data"]["meter"].as_str().expect("meter").to_string();
        assert_eq!(ce["type"], format!("herald.usage.{meter}"));
        assert_eq!(ce["source"], "test/gateway");
        assert!(ce["time"].as_str().expect("time").ends_with('Z'));
        assert!(
            ids.insert(ce["id"].as_str().expect("id").to_string()),
            "ids are unique"
        );
        *quantities
            .entry((ce["subject"].as_str().expect("subject").to_string(), meter))
            .or_default() += ce["data"]["quantity"].as_i64().expect("quantity");
    }
    assert_eq!(ids.len(), 16);
    let mut lines: BTreeMap<(String, String), i64> = BTreeMap::new();
    for invoice in list {
        for l in invoice["lines"].as_array().expect("lines") {
            lines.insert(
                (
                    invoice["account"].as_str().expect("account").into(),
                    l["meter"].as_str().expect("meter").into(),
                ),
                l["quantity"].as_i64().expect("quantity"),
            );
        }
    }
    assert_eq!(quantities, lines);
    // The provider's statement: what four consumers paid for 333 x (1+2+3+4) s at 0.015,
    // less 10 %.
    let provider = invoice(&invoices, "user:7");
    let gross: i64 = provider["earnings"]
        .as_array()
        .expect("earnings")
        .iter()
        .map(|e| e["gross"].as_i64().expect("gross"))
        .sum();
    assert_eq!(
        gross,
        500 + 999 + 1498 + 1998,
        "per consumer: 4.995, 9.99, 14.985, 19.98 rounded half to even"
    );
}

#[test]
fn bad_usage_and_bad_plans_get_clear_errors() {
    let server = TestServer::start("billing-errors");
    let (status, answer) = post_usage(&server, "{\"source\": 1}\n".into()).expect("answer");
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"].as_str().expect("error").contains("line 1"),
        "{answer}"
    );
    let negative = event("x", "user:1", "jobs_run", -1, now_ms()).to_string();
    let (status, answer) = post_usage(&server, negative).expect("answer");
    assert_eq!(status, 400);
    assert!(
        answer["error"]
            .as_str()
            .expect("error")
            .contains("negative"),
        "{answer}"
    );
    let nobody = event("x", "alice", "jobs_run", 1, now_ms()).to_string();
    let (status, answer) = post_usage(&server, nobody).expect("answer");
    assert_eq!(status, 400);
    assert!(
        answer["error"].as_str().expect("error").contains("user:ID"),
        "{answer}"
    );
    let out = server.cli(&["billing", "run", "--month", "2026-11"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("billing plan set"),
        "{out:?}"
    );
    let file = server.dir.path().join("bad.toml");
    std::fs::write(
        &file,
        PLANS.replace("flat_fee = \"2.00\"", "flat_fee = 2.5"),
    )
    .expect("write");
    let out = server.cli(&["billing", "plan", "set", file.to_str().expect("path")]);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("float"),
        "{out:?}"
    );
    let out = server.cli(&["billing", "run", "--month", "2026-13"]);
    assert_eq!(out.status.code(), Some(64));
}

/// A password the console accepts.
const PASSWORD: &str = "correct horse battery";

#[test]
fn usage_and_billing_pages_in_a_real_browser() {
    if herald_tests::sqlite_only("writes usage rows into herald.db") {
        return;
    }
    use herald_tests::browser::{self, Browser};
    if !browser::installed() {
        eprintln!("skipped: no Chromium/chromedriver");
        return;
    }
    let server = TestServer::start("billing-console");
    set_plans(&server);
    let Some(b) = Browser::for_server(&server, "billing-console") else {
        return;
    };
    b.register("carol", PASSWORD);
    let carol = user_id(&server, "carol");
    let account = format!("user:{carol}");
    let now = now_ms();
    let month = month_of(now);
    let day = 86_400_000;
    let mut events = Vec::new();
    for d in 0..10 {
        events.push(event(
            &format!("j{d}"),
            &account,
            "jobs_run",
            3 + d,
            now - d * day,
        ));
        events.push(event(
            &format!("b{d}"),
            &account,
            "tunnel_bytes",
            400_000 * (d + 1),
            now - d * day,
        ));
    }
    events.push(event("other", "sender:acme", "messages_sent", 40, now));
    ingest(&server, &events);
    server.json(&["billing", "run", "--month", &month]);

    // Reached from the navigation, on every page.
    b.goto("/devices");
    b.click("#nav-usage");
    b.wait_page("page-usage");
    assert_eq!(b.text("#account"), account);
    let charts = b.find_all("figure.chart-box svg.chart");
    assert_eq!(
        charts.len(),
        2,
        "one chart per meter used: {}",
        b.body_text()
    );
    assert!(
        b.find_all("figure[data-metric=\"jobs_run\"] rect").len() >= 30,
        "a bar per day"
    );
    let invoice = format!("section.invoice[data-month=\"{month}\"]");
    b.find(&invoice);
    assert!(b.text(&invoice).contains("draft"), "{}", b.text(&invoice));
    assert!(
        !b.body_text().contains("sender:acme"),
        "only the user's own account"
    );
    b.shoot("billing-account-usage");

    assert!(server.add_user("root", true, PASSWORD).status.success());
    b.clear_cookies();
    b.goto("/login");
    b.wait_page("page-login");
    b.fill("login", "root");
    b.fill("password", PASSWORD);
    b.submit("main form");
    b.goto("/admin/billing");
    b.wait_page("page-admin-billing");
    b.find(&format!("#months tr[data-month=\"{month}\"]"));
    assert!(
        b.body_text().contains("sender:acme"),
        "every account: {}",
        b.body_text()
    );
    assert!(!b.find_all("figure.chart-box svg.chart").is_empty());
    b.shoot("billing-admin-overview");
    println!("screenshots in {}", b.screenshot_dir().display());
}

#[test]
fn the_configured_plans_file_is_set_at_start_and_a_bad_one_stops_it() {
    let plans =
        std::env::temp_dir().join(format!("herald-billing-plans-{}.toml", std::process::id()));
    std::fs::write(&plans, PLANS).expect("write plans");
    let mut server = TestServer::start_with_config(
        "billing-plans-file",
        &format!(
            "[billing]\nplans_file = {:?}\n",
            plans.to_str().expect("path")
        ),
    );
    let shown = server.json(&["billing", "plan", "show", "standard"]);
    assert_eq!(shown["currency"], "EUR");
    assert_eq!(shown["flat_fee"], "2");

    // A float price in the file: the next start stops and names the file.
    server.kill();
    std::fs::write(
        &plans,
        PLANS.replace("flat_fee = \"2.00\"", "flat_fee = 2.0"),
    )
    .expect("write");
    let mut child = std::process::Command::new(herald_tests::bin("herald-server"))
        .arg("--data-dir")
        .arg(server.data_dir())
        .arg("serve")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn serve");
    let status = herald_tests::wait_until("serve to refuse the plans file", DEADLINE, || {
        child.try_wait().expect("wait for serve")
    });
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().expect("stderr"), &mut stderr)
        .expect("stderr");
    let _ = std::fs::remove_file(&plans);
    assert_eq!(status.code(), Some(64), "a configuration error: {stderr}");
    assert!(
        stderr.contains(plans.to_str().expect("path")) && stderr.contains("float"),
        "{stderr}"
    );
}
