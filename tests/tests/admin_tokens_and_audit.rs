//! Scoped admin tokens and the audit log (OPERATIONS.md, "Admin tokens and the audit
//! log"), against the real server: every route the API describes answers a read-only
//! token's change with 403, and every admin and console action lands in the audit log
//! exactly once, in a hash chain that `audit verify` checks.

use std::process::Command;

use herald_tests::console_client::Console;
use herald_tests::{bin, https_client, wait_until, TestAgent, TestServer, DEADLINE};
use serde_json::Value;

const PASSWORD: &str = "a good long password";

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `admin-token create NAME --scope SCOPE [extra]`; returns the secret it printed.
fn create_token(server: &TestServer, name: &str, scope: &str, extra: &[&str]) -> String {
    let mut args = vec!["admin-token", "create", name, "--scope", scope];
    args.extend_from_slice(extra);
    let secret = server.cli_ok(&args).trim().to_string();
    assert_eq!(secret.len(), 64, "the token is 64 hex digits: {secret:?}");
    secret
}

/// One request with `token`; returns the status and the body.
fn call(server: &TestServer, method: &str, path: &str, token: &str) -> (u16, String) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let client = https_client();
        let url = format!("{}{path}", server.https_url());
        let request = match method {
            "GET" => client.get(url),
            "POST" => client.post(url).json(&serde_json::json!({})),
            "PUT" => client.put(url).body(vec![0u8; 16]),
            "DELETE" => client.delete(url),
            other => panic!("unexpected method {other}"),
        };
        let response = request
            .bearer_auth(token)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = response.status().as_u16();
        (status, response.text().await.unwrap_or_default())
    })
}

/// The API description, fetched without a token.
fn openapi(server: &TestServer) -> Value {
    let (status, body) = call(server, "GET", "/api/v1/openapi.json", "");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("openapi.json is JSON")
}

/// Every operation of the description: method, path with its parameters filled in,
/// and the scope it declares.
fn operations(document: &Value) -> Vec<(String, String, String)> {
    let mut all = Vec::new();
    for (path, item) in document["paths"].as_object().expect("paths") {
        for (method, operation) in item.as_object().expect("path item") {
            let concrete = path
                .split('/')
                .map(|s| if s.starts_with('{') { "1" } else { s })
                .collect::<Vec<_>>()
                .join("/");
            let scope = operation["x-herald-scope"]
                .as_str()
                .unwrap_or_else(|| panic!("{method} {path} declares no scope"))
                .to_string();
            all.push((method.to_ascii_uppercase(), concrete, scope));
        }
    }
    all
}

#[test]
fn read_token_cannot_change_anything() {
    let server = TestServer::start("scope-read");
    let read = create_token(&server, "helpdesk", "read", &[]);
    let metrics = create_token(&server, "prometheus", "metrics", &[]);
    let document = openapi(&server);
    let operations = operations(&document);
    assert!(operations.len() >= 50, "{} operations", operations.len());

    let mut changes = 0;
    let mut refused = 0;
    for (method, path, scope) in &operations {
        if scope == "public" || scope == "gateway" {
            continue;
        }
        let (status, body) = call(&server, method, path, &read);
        if method == "GET" && matches!(scope.as_str(), "read" | "metrics") {
            assert!(
                status != 401 && status != 403,
                "a read token may {method} {path}: {status} {body}"
            );
        } else {
            assert_eq!(status, 403, "a read token may not {method} {path}: {body}");
            assert!(
                body.contains("scope is read"),
                "the refusal says why: {method} {path}: {body}"
            );
            changes += usize::from(method != "GET");
            refused += 1;
        }
    }
    assert!(changes >= 25, "only {changes} changing routes were tried");

    // A billing token (a metering gateway) may do exactly the billing changes besides
    // reading: no jobs, packages, messages or tokens.
    let billing = create_token(&server, "gateway", "billing", &[]);
    let mut billing_routes = 0;
    for (method, path, scope) in &operations {
        if method == "GET" || matches!(scope.as_str(), "public" | "gateway") {
            continue;
        }
        let (status, body) = call(&server, method, path, &billing);
        if scope == "billing" {
            assert_ne!(status, 403, "a billing token may {method} {path}: {body}");
            billing_routes += 1;
        } else {
            assert_eq!(
                status, 403,
                "a billing token may not {method} {path}: {body}"
            );
        }
    }
    assert!(billing_routes >= 5, "{billing_routes} billing routes");

    // The metrics token reads metrics and nothing else.
    assert_eq!(call(&server, "GET", "/metrics", &metrics).0, 200);
    assert_eq!(call(&server, "GET", "/api/v1/agents", &metrics).0, 403);

    // The refusals are in the audit log, under the token's id and name.
    let listed = server.json(&["admin-token", "list"]);
    let id = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "helpdesk")
        .and_then(|t| t["id"].as_str())
        .expect("helpdesk is listed")
        .to_string();
    assert!(
        !listed.to_string().contains(&read),
        "the list never shows a secret"
    );
    let denied = server.json(&["audit", "list", "--actor", &format!("token:{id}")]);
    let denied = denied.as_array().unwrap();
    assert_eq!(denied.len(), refused, "one entry per refusal: {denied:#?}");
    assert!(
        denied.iter().all(|e| e["outcome"]
            .as_str()
            .unwrap()
            .starts_with("denied: this token's scope is read")),
        "each outcome carries the API's own sentence: {denied:#?}"
    );

    // A revoked token opens nothing; an expired one neither.
    server.cli_ok(&["admin-token", "revoke", &id]);
    assert_eq!(call(&server, "GET", "/api/v1/agents", &read).0, 401);
    let brief = create_token(&server, "brief", "read", &["--ttl", "1s"]);
    assert_eq!(call(&server, "GET", "/api/v1/agents", &brief).0, 200);
    wait_until("the one-second token to expire", DEADLINE, || {
        (call(&server, "GET", "/api/v1/agents", &brief).0 == 401).then_some(())
    });

    // The CLI takes a scoped token too, and says why it may not.
    let output = Command::new(bin("herald-server"))
        .arg("--data-dir")
        .arg(server.data_dir())
        .args(["token", "create"])
        .env("HERALD_ADMIN_TOKEN", &metrics)
        .env("HERALD_LOG", "warn")
        .output()
        .expect("run herald-server");
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("scope is metrics"),
        "{}",
        text(&output.stderr)
    );
}

/// Signs in at the console; returns the final status.
fn log_in(console: &Console, login: &str, password: &str) -> u16 {
    let form = console.get("/login");
    console
        .post(
            "/login",
            &[
                ("csrf", form.csrf().as_str()),
                ("login", login),
                ("password", password),
            ],
        )
        .status
}

#[test]
fn audit_log_records_every_action_once_and_detects_an_edited_row() {
    if herald_tests::sqlite_only("edits and deletes audit_log rows in herald.db") {
        return;
    }
    let mut server = TestServer::start("audit");
    let agent = TestAgent::start(&server, "alpha");

    // Admin actions through the API, each once (starting the agent made its token).
    create_token(&server, "helpdesk", "read", &[]);
    server.run_job(&format!("agent:{}", agent.name), &[], &["/bin/true"]);
    let schedule = herald_tests::add_schedule(
        &server,
        &[
            "--to",
            &format!("agent:{}", agent.name),
            "--every",
            "1h",
            "--",
            "/bin/true",
        ],
    );
    server.cli_ok(&["schedule", "rm", &schedule.to_string()]);
    server.add_vendor("acme", "acme-*");
    server.add_sender("cards", false);
    server.cli_ok(&["groups", "add", &agent.name, "web"]);
    server.cli_ok(&["agents", "revoke", &agent.name]);

    // Local account commands, and the console: a failed and a good sign-in, an admin action.
    let added = server.add_user("ann", true, PASSWORD);
    assert!(added.status.success(), "{}", text(&added.stderr));
    server.cli_ok(&["users", "set-role", "ann", "admin"]);
    let console = Console::new(&server);
    assert_eq!(log_in(&console, "ann", "not the password"), 401);
    assert_eq!(log_in(&console, "ann", PASSWORD), 200);
    let users = console.get("/admin/users");
    let ann_id = herald_tests::console_client::between(&users.body, "data-user=\"", "\"")
        .expect("a user row");
    console.submit(
        "/admin/users",
        &format!("/admin/users/{ann_id}/role"),
        &[("role", "admin")],
    );

    let entries = server.json(&["audit", "list"]);
    let entries = entries.as_array().expect("audit list is an array");
    let count = |action: &str| entries.iter().filter(|e| e["action"] == action).count();
    for action in [
        "tokens.create",
        "admin_tokens.create",
        "jobs.create",
        "schedules.create",
        "schedules.remove",
        "vendors.create",
        "senders.create",
        "groups.set",
        "agents.revoke",
        "users.add",
        "users.set_role",
        "console:/admin/users/{id}/role",
    ] {
        assert_eq!(count(action), 1, "{action} once: {entries:#?}");
    }
    assert_eq!(count("console.login"), 2, "{entries:#?}");
    let logins: Vec<&Value> = entries
        .iter()
        .filter(|e| e["action"] == "console.login")
        .collect();
    assert_eq!(logins[0]["actor"], "user:ann");
    assert_eq!(logins[0]["outcome"], "failed: wrong login or password");
    assert_eq!(logins[1]["outcome"], "ok");
    assert_eq!(logins[1]["source"], "127.0.0.1");
    let revoke = entries
        .iter()
        .find(|e| e["action"] == "agents.revoke")
        .unwrap();
    assert!(
        revoke["actor"].as_str().unwrap().ends_with("(init)"),
        "{revoke}"
    );
    assert_eq!(
        revoke["target"],
        format!("/api/v1/agents/{}/revoke", agent.name)
    );
    assert_eq!(
        entries.iter().find(|e| e["action"] == "users.add").unwrap()["actor"],
        "local:operator"
    );
    // The console page shows the log and that the chain holds.
    let page = console.get("/admin/audit");
    assert_eq!(page.status, 200);
    assert!(page.body.contains("Chain intact"), "{}", page.body);
    assert!(page.body.contains("agents.revoke"));

    let verdict = server.json(&["audit", "verify"]);
    assert_eq!(verdict["problems"], serde_json::json!([]), "{verdict}");
    assert_eq!(verdict["entries"].as_u64().unwrap() as usize, entries.len());

    // Someone with the database file edits an entry: verify names it and fails.
    server.kill();
    let seq = revoke["seq"].as_i64().unwrap();
    let db = rusqlite::Connection::open(server.db_path()).expect("open the database");
    db.execute(
        "UPDATE audit_log SET actor = 'token:000000000000 (someone)' WHERE seq = ?1",
        [seq],
    )
    .expect("edit the entry");
    drop(db);
    server.spawn();
    let output = server.cli(&["audit", "verify"]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output.stdout));
    assert!(
        text(&output.stdout).contains(&format!("entry {seq}: its contents were changed")),
        "{}",
        text(&output.stdout)
    );
    // And a deleted entry too.
    server.kill();
    let db = rusqlite::Connection::open(server.db_path()).expect("open the database");
    db.execute("DELETE FROM audit_log WHERE seq = 2", [])
        .expect("delete an entry");
    drop(db);
    server.spawn();
    let broken = server.cli(&["audit", "verify", "--json"]);
    let verdict: Value = serde_json::from_slice(&broken.stdout).expect("JSON verdict");
    let problems = verdict["problems"].to_string();
    assert!(
        problems.contains("entries 2 to 2 are missing"),
        "{problems}"
    );
}

#[test]
fn admins_read_the_audit_log_in_a_real_browser() {
    if herald_tests::sqlite_only("edits an audit_log row in herald.db") {
        return;
    }
    let server = TestServer::start("audit-browser");
    let Some(browser) = herald_tests::browser::Browser::for_server(&server, "admin") else {
        return;
    };
    let added = server.add_user("ann", true, PASSWORD);
    assert!(added.status.success(), "{}", text(&added.stderr));
    create_token(&server, "helpdesk", "read", &[]);
    browser.goto("/login");
    browser.wait_page("page-login");
    browser.fill("login", "ann");
    browser.fill("password", PASSWORD);
    browser.submit("main form");
    assert_eq!(browser.page_id(), "page-devices", "{}", browser.body_text());

    browser.goto("/admin/audit");
    browser.wait_page("page-admin-audit");
    assert!(
        browser.text("#chain").contains("Chain intact"),
        "{}",
        browser.body_text()
    );
    let actions: Vec<String> = browser
        .find_all("#audit tbody tr")
        .iter()
        .filter_map(|row| browser.attr(row, "data-action"))
        .collect();
    assert_eq!(
        actions,
        ["console.login", "admin_tokens.create", "users.add"],
        "newest first"
    );
    browser.shoot("admin-audit");

    // Filtered by actor.
    browser.goto("/admin/audit?actor=local%3Aoperator");
    browser.wait_page("page-admin-audit");
    assert_eq!(browser.find_all("#audit tbody tr").len(), 1);

    // An entry edited behind the server's back shows on the next load.
    let db = rusqlite::Connection::open(server.db_path()).expect("open the database");
    db.execute(
        "UPDATE audit_log SET target = 'someone-else' WHERE seq = 1",
        [],
    )
    .expect("edit the entry");
    drop(db);
    browser.goto("/admin/audit");
    browser.wait_page("page-admin-audit");
    let chain = browser.text("#chain");
    assert!(chain.contains("Chain BROKEN"), "{chain}");
    assert!(
        chain.contains("entry 1: its contents were changed"),
        "{chain}"
    );
}
