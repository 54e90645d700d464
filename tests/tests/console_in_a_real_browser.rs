//! The web console in a real browser: a real `herald-server`, a real `herald-agent` (and
//! its session helper), and headless Chromium driven over WebDriver, going through the
//! pages as a person would (docs/CONSOLE.md is the contract: paths, form fields, page
//! ids and data attributes). Each test prints where its screenshots went; set
//! `HERALD_SCREENSHOTS=DIR` to keep them after a passing run.
//!
//! Tests skip (and say so) when Chromium or chromedriver is not installed.

use std::time::Duration;

use herald_tests::browser::{self, Browser};
use herald_tests::session_helper::{recording_browser, SessionHelper};
use herald_tests::{wait_until, TestAgent, TestServer};

/// A password the console accepts (at least 10 characters).
const PASSWORD: &str = "correct horse battery";
/// How long runs on a seconds timing may take to show up in the history.
const RUN_DEADLINE: Duration = Duration::from_secs(60);

// === console helpers ===

/// A server and a browser on it (fields drop in order: the browser ends first).
struct Console {
    browser: Browser,
    server: TestServer,
}

impl Console {
    /// Starts a server and a browser, or `None` if there is no browser to drive.
    fn start(name: &str) -> Option<Console> {
        if !browser::installed() {
            return None;
        }
        let server = TestServer::start(name);
        let browser = Browser::for_server(&server, name)?;
        Some(Console { browser, server })
    }
}

/// Registers `login` through `/register`, which logs the new account in and goes to
/// `/devices`.
fn register(b: &Browser, login: &str) {
    b.register(login, PASSWORD);
    b.find("form[action=\"/logout\"]");
}

/// Logs in through `/login`; returns the page the console went to.
fn try_log_in(b: &Browser, login: &str, password: &str) -> String {
    b.goto("/login");
    b.wait_page("page-login");
    b.fill("login", login);
    b.fill("password", password);
    b.submit("main form");
    b.page_id()
}

/// Logs in and checks that it worked (the console goes to `/devices`).
fn log_in(b: &Browser, login: &str, password: &str) {
    let page = try_log_in(b, login, password);
    assert_eq!(page, "page-devices", "login as {login}: {}", b.body_text());
}

/// Links a new machine from `/devices`: asks for a token, enrolls a real agent with
/// it, starts the agent and waits until the device list shows it.
fn link_device(console: &Console, name: &str) -> TestAgent {
    let b = &console.browser;
    b.goto("/devices");
    b.wait_page("page-devices");
    b.submit("form[action=\"/devices/link\"]");
    b.wait_page("page-link");
    let token = b.text("code#enroll-token").trim().to_string();
    assert!(!token.is_empty(), "no enrollment token: {}", b.body_text());
    assert!(
        b.body_text()
            .contains(&format!("herald-agent enroll {token}")),
        "the link page shows the enroll command: {}",
        b.body_text()
    );
    let mut agent = TestAgent::enroll_with_token(&console.server, name, &token);
    agent.spawn();
    agent.wait_online(&console.server);
    b.goto("/devices");
    b.wait_page("page-devices");
    b.find(&format!("#devices tr[data-agent=\"{}\"]", agent.id));
    agent
}

/// Subscribes `device` to catalog entry `entry` every `every` from the entry's page;
/// returns the new subscription's id (the newest `data-subscription` row).
fn subscribe_every(b: &Browser, entry: &str, device: &str, every: &str) -> String {
    b.goto("/catalog");
    b.wait_page("page-catalog");
    b.click(&format!(
        "li[data-entry=\"{entry}\"] a[href=\"/catalog/{entry}\"]"
    ));
    b.wait_page("page-entry");
    let form = "main form:has([name=\"kind\"])";
    b.fill_in(form, "device", device);
    b.fill_in(form, "kind", "every");
    b.fill_in(form, "every", every);
    b.submit(form);
    assert_ne!(
        b.page_id(),
        "page-entry",
        "subscribing was refused: {}",
        b.body_text()
    );
    b.goto("/subscriptions");
    b.wait_page("page-subscriptions");
    let ids: Vec<String> = b
        .find_all("tr[data-subscription]")
        .iter()
        .filter_map(|row| b.attr(row, "data-subscription"))
        .collect();
    ids.iter()
        .max_by_key(|id| id.parse::<i64>().unwrap_or(0))
        .cloned()
        .unwrap_or_else(|| panic!("no subscription listed: {}", b.body_text()))
}

/// Reloads `/history` until at least `count` rows are in `state`; returns their job ids.
fn wait_history(b: &Browser, state: &str, count: usize) -> Vec<String> {
    wait_until(
        &format!("{count} runs {state} in /history"),
        RUN_DEADLINE,
        || {
            b.goto("/history");
            b.wait_page("page-history");
            let jobs: Vec<String> = b
                .find_all(&format!("tr[data-job][data-state=\"{state}\"]"))
                .iter()
                .filter_map(|row| b.attr(row, "data-job"))
                .collect();
            (jobs.len() >= count).then_some(jobs)
        },
    )
}

/// Publishes the standalone entry `hello` (runs `/bin/echo hello-from-herald`).
fn publish_hello(server: &TestServer) {
    server.cli_ok(&[
        "catalog",
        "add",
        "hello",
        "--title",
        "Say hello",
        "--description",
        "Prints a greeting on the machine.",
        "--min-interval",
        "1s",
        "--",
        "/bin/echo",
        "hello-from-herald",
    ]);
}

/// Makes the admin `login` with `herald-server users add LOGIN --admin` (the password
/// on stdin) and logs the browser in as it, in a fresh browser session.
fn log_in_as_new_admin(console: &Console, login: &str) {
    let output = console.server.add_user(login, true, PASSWORD);
    assert!(
        output.status.success(),
        "`herald-server users add {login} --admin` failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    console.browser.clear_cookies();
    log_in(&console.browser, login, PASSWORD);
}

// === reaching the console ===

/// Chromium completes a TLS handshake with the server (whose certificate must be one
/// browsers take: not Ed25519) and `/` sends a visitor to the login page.
#[test]
fn the_console_opens_in_chromium() {
    if !browser::installed() {
        return;
    }
    let server = TestServer::start("console-opens");
    let Some(b) = Browser::for_server(&server, "console-opens") else {
        return;
    };
    b.goto("/");
    b.wait_page("page-login");
    assert_eq!(b.path(), "/login");

    // Control: the tests' browsers trust the server's key and nothing else, so a
    // browser that pins another key refuses the same server.
    let other = server.dir.path().join("other.pem");
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()])
        .expect("make a certificate");
    std::fs::write(&other, cert.cert.pem()).expect("write other.pem");
    let Some(stranger) = Browser::start(
        server.dir.path(),
        "stranger",
        &server.https_url(),
        browser::Trust::Key(&other),
    ) else {
        return;
    };
    // Chromium shows its certificate warning page instead of the console (or, in
    // some versions, fails the navigation).
    let refused = match stranger.try_goto("/login") {
        Ok(()) => stranger.page_id().is_empty() && stranger.source().contains("ERR_CERT"),
        Err(e) => e.contains("ERR_CERT"),
    };
    assert!(
        refused,
        "a browser that does not trust the server's key got in: {}",
        stranger.body_text()
    );
}

// === standalone services ===

#[test]
fn standalone_service_runs_on_the_timing_chosen_in_the_console() {
    let Some(console) = Console::start("console-standalone") else {
        return;
    };
    publish_hello(&console.server);
    let b = &console.browser;

    register(b, "alice");
    let agent = link_device(&console, "alice-laptop");
    subscribe_every(b, "hello", &agent.id, "2s");

    let jobs = wait_history(b, "succeeded", 2);
    let ids: Vec<i64> = jobs.iter().filter_map(|j| j.parse().ok()).collect();
    assert!(
        ids.windows(2).all(|w| w[0] > w[1]),
        "history is newest first: {ids:?}"
    );
    b.goto(&format!("/history/{}", jobs[0]));
    b.wait_page("page-job");
    assert_eq!(b.text("#job-state").trim(), "succeeded");
    let stdout = b.text("pre#stdout");
    assert!(
        stdout.contains("hello-from-herald"),
        "the job page shows the output: {stdout}"
    );

    // The device page lists the runs too.
    b.goto(&format!("/devices/{}", agent.id));
    b.wait_page("page-device");
    assert!(b.body_text().contains("Say hello"), "{}", b.body_text());
}

// === browser services ===

#[test]
fn browser_service_opens_with_a_one_time_ticket_and_records_the_outcome() {
    let Some(console) = Console::start("console-checkin") else {
        return;
    };
    console.server.cli_ok(&[
        "catalog",
        "add",
        "checkin",
        "--title",
        "Check in",
        "--description",
        "Confirm that you are at your desk.",
        "--page",
        "--min-interval",
        "1s",
    ]);
    let b = &console.browser;
    register(b, "bob");
    let agent = link_device(&console, "bob-desktop");
    let (script, opened) = recording_browser(console.server.dir.path());
    let helper = SessionHelper::start(
        &agent,
        &script.to_string_lossy(),
        &console.server.dir.path().join("session-helper.log"),
    );
    subscribe_every(b, "checkin", &agent.id, "5s");

    // The helper hands the page to "the browser": this test delivers it to Chromium.
    let url = wait_until("the helper to open the service page", RUN_DEADLINE, || {
        std::fs::read_to_string(&opened)
            .ok()?
            .lines()
            .find(|l| l.contains("/service/checkin") && l.contains("herald_ticket="))
            .map(str::to_string)
    });
    // The helper answers the agent after the browser was started: keep it until the
    // agent has reported the page open (the job waits for the person), or a loaded
    // machine may see the helper gone before its answer and the job fail.
    wait_until("the agent to report the page open", RUN_DEADLINE, || {
        herald_tests::all_jobs(&console.server)
            .iter()
            .any(|j| j["state"] != "queued" && j["state"] != "delivered" && j["state"] != "running")
            .then_some(())
    });
    drop(helper);

    // A visitor with no console session: only the ticket lets them in.
    b.clear_cookies();
    b.goto(&url);
    b.wait_page("page-service");
    let job = b
        .current_url()
        .split_once("job=")
        .map(|(_, rest)| rest.split('&').next().unwrap_or_default().to_string())
        .unwrap_or_else(|| {
            panic!(
                "redeeming the ticket redirects to ?job=ID: {}",
                b.current_url()
            )
        });
    assert!(
        !b.current_url().contains("herald_ticket="),
        "the ticket leaves the address bar"
    );
    assert!(b.body_text().contains("Check in"), "{}", b.body_text());
    b.shoot("service");
    // The task waits for the person: the page offers the answer form.
    let done = "main form button[name=\"outcome\"][value=\"done\"]";
    b.find(done);
    b.fill("note", "at my desk");
    b.click(done);
    b.wait_page("page-service");
    assert!(
        b.try_find("p.error").is_none(),
        "answering Done was refused: {}",
        b.body_text()
    );
    b.find("#thanks");
    assert!(b.try_find(done).is_none(), "the form is gone once answered");

    // The same ticket a second time is refused, and the visit admits only its own job.
    b.goto(&url);
    let again = b.body_text();
    assert!(
        again.contains("already used") && b.try_find(done).is_none(),
        "a used ticket is refused with 'this link was already used': {again}"
    );
    let (status, _) = b.fetch("GET", &url);
    assert_eq!(status, 403, "a used ticket answers 403");
    let other_job = job.parse::<i64>().expect("numeric job id") + 1;
    let (status, _) = b.fetch("GET", &format!("/service/checkin?job={other_job}"));
    assert_eq!(status, 403, "the visit cookie admits only its own job");
    // Nor is the visit a console session.
    b.goto("/history");
    b.wait_page("page-login");

    // The owner sees the outcome in the history.
    log_in(b, "bob", PASSWORD);
    wait_until(
        &format!("job {job} succeeded in /history"),
        RUN_DEADLINE,
        || {
            b.goto("/history");
            b.wait_page("page-history");
            b.try_find(&format!("tr[data-job=\"{job}\"][data-state=\"succeeded\"]"))
        },
    );
    b.goto(&format!("/history/{job}"));
    b.wait_page("page-job");
    assert_eq!(b.text("#job-state").trim(), "succeeded");
    assert_eq!(
        b.text("#outcome").trim(),
        "done: at my desk",
        "the job page shows the outcome and the note"
    );
}

// === every page on a phone and a laptop ===

#[test]
fn every_page_works_on_a_phone_screen() {
    let Some(console) = Console::start("console-screens") else {
        return;
    };
    publish_hello(&console.server);
    let b = &console.browser;

    b.goto("/login");
    b.wait_page("page-login");
    b.shoot("login");
    b.goto("/register");
    b.wait_page("page-register");
    b.shoot("register");

    register(b, "carol");
    b.goto("/devices");
    b.wait_page("page-devices");
    b.shoot("devices-empty");
    b.submit("form[action=\"/devices/link\"]");
    b.wait_page("page-link");
    b.shoot("link");
    let token = b.text("code#enroll-token").trim().to_string();
    let mut agent = TestAgent::enroll_with_token(&console.server, "carol-phone", &token);
    agent.spawn();
    agent.wait_online(&console.server);
    b.goto("/devices");
    b.find(&format!("tr[data-agent=\"{}\"]", agent.id));
    b.shoot("devices");

    b.goto("/catalog");
    b.wait_page("page-catalog");
    b.shoot("catalog");
    b.goto("/catalog/hello");
    b.wait_page("page-entry");
    b.shoot("entry");
    let subscription = subscribe_every(b, "hello", &agent.id, "2s");
    b.shoot("subscriptions");
    b.goto(&format!("/subscriptions/{subscription}"));
    b.wait_page("page-subscription");
    b.shoot("subscription");

    let jobs = wait_history(b, "succeeded", 1);
    b.shoot("history");
    b.goto(&format!("/history/{}", jobs[0]));
    b.wait_page("page-job");
    b.shoot("job");
    b.goto(&format!("/devices/{}", agent.id));
    b.wait_page("page-device");
    b.shoot("device");

    b.goto("/forwarding");
    b.wait_page("page-forwarding");
    b.fill("kind", "webhook");
    b.fill("target", "https://127.0.0.1:9/hook");
    b.submit("main form:has([name=\"target\"])");
    b.goto("/forwarding");
    b.wait_page("page-forwarding");
    b.find("tr[data-destination]");
    b.shoot("forwarding");

    b.goto("/account");
    b.wait_page("page-account");
    b.shoot("account");

    // An admin sees every agent, job, schedule and user.
    log_in_as_new_admin(&console, "root");
    for (path, page, name) in [
        (
            "/admin/agents".to_string(),
            "page-admin-agents",
            "admin-agents",
        ),
        (
            format!("/admin/agents/{}", agent.id),
            "page-admin-agent",
            "admin-agent",
        ),
        ("/admin/jobs".to_string(), "page-admin-jobs", "admin-jobs"),
        (
            format!("/admin/jobs/{}", jobs[0]),
            "page-admin-job",
            "admin-job",
        ),
        (
            "/admin/schedules".to_string(),
            "page-admin-schedules",
            "admin-schedules",
        ),
        (
            "/admin/users".to_string(),
            "page-admin-users",
            "admin-users",
        ),
    ] {
        b.goto(&path);
        b.wait_page(page);
        b.shoot(name);
    }
    println!("screenshots in {}", b.screenshot_dir().display());
}

// === security, from a real browser and real HTTP ===

/// POSTs a form with the browser's session cookie; returns the status and body.
fn post_form(base: &str, path: &str, session: &str, form: &[(&str, &str)]) -> (u16, String) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let response = herald_tests::https_client()
            .post(format!("{base}{path}"))
            .header("Cookie", format!("__Host-herald_session={session}"))
            .form(form)
            .send()
            .await
            .expect("POST to the console");
        let status = response.status().as_u16();
        (status, response.text().await.unwrap_or_default())
    })
}

#[test]
fn forms_without_the_csrf_token_are_refused() {
    let Some(console) = Console::start("console-csrf") else {
        return;
    };
    let b = &console.browser;
    register(b, "dave");
    b.goto("/account");
    b.wait_page("page-account");
    let session = b
        .cookie("__Host-herald_session")
        .expect("the console sets __Host-herald_session");
    let csrf_field = b.find("form[action=\"/account\"] input[name=\"csrf\"]");
    let csrf = b
        .attr(&csrf_field, "value")
        .expect("the account form carries its csrf token");
    let base = console.server.https_url();

    let (status, body) = post_form(
        &base,
        "/account",
        &session,
        &[("display_name", "Mallory was here")],
    );
    assert_eq!(status, 403, "no csrf field: {body}");
    assert!(body.contains("CSRF token missing or wrong"), "{body}");
    let (status, body) = post_form(
        &base,
        "/account",
        &session,
        &[("display_name", "Mallory was here"), ("csrf", "0000")],
    );
    assert_eq!(status, 403, "a wrong csrf token: {body}");

    // Control: the same request with the page's token is accepted, so the refusals
    // above were about the token and not about the cookie.
    let (status, body) = post_form(
        &base,
        "/account",
        &session,
        &[("display_name", "Dave"), ("csrf", &csrf)],
    );
    assert_eq!(status, 303, "the page's own token: {body}");
    b.goto("/account");
    let shown = b.find("main [name=\"display_name\"]");
    assert_eq!(b.attr(&shown, "value").as_deref(), Some("Dave"));
}

#[test]
fn one_user_cannot_open_another_users_runs_or_subscriptions() {
    let Some(console) = Console::start("console-isolation") else {
        return;
    };
    publish_hello(&console.server);
    let b = &console.browser;
    register(b, "erin");
    let agent = link_device(&console, "erin-laptop");
    let subscription = subscribe_every(b, "hello", &agent.id, "2s");
    let jobs = wait_history(b, "succeeded", 1);
    let forwarding_id = {
        b.goto("/forwarding");
        b.wait_page("page-forwarding");
        b.fill("kind", "webhook");
        b.fill("target", "https://127.0.0.1:9/erin");
        b.submit("main form:has([name=\"target\"])");
        b.goto("/forwarding");
        let row = b.find("tr[data-destination]");
        b.attr(&row, "data-destination").expect("destination id")
    };

    b.clear_cookies();
    register(b, "frank");
    for path in [
        format!("/history/{}", jobs[0]),
        format!("/subscriptions/{subscription}"),
        format!("/devices/{}", agent.id),
    ] {
        let (status, body) = b.fetch("GET", &path);
        assert_eq!(status, 404, "frank opening erin's {path}: {body}");
        b.goto(&path);
        let text = b.body_text();
        assert!(
            !text.contains("hello-from-herald") && !text.contains("erin"),
            "{path} shows erin's data to frank: {text}"
        );
    }
    // Admin pages are not for plain users.
    let (status, _) = b.fetch("GET", "/admin/users");
    assert_eq!(status, 403, "a plain user asking for /admin/users");
    // Nor change or delete them: a POST with frank's own valid csrf token.
    b.goto("/account");
    let csrf_field = b.find("form[action=\"/account\"] input[name=\"csrf\"]");
    let csrf = b.attr(&csrf_field, "value").expect("csrf token");
    let session = b.cookie("__Host-herald_session").expect("frank's session");
    let base = console.server.https_url();
    for path in [
        format!("/subscriptions/{subscription}/delete"),
        format!("/forwarding/{forwarding_id}/delete"),
    ] {
        let (status, body) = post_form(&base, &path, &session, &[("csrf", &csrf)]);
        assert_eq!(status, 404, "frank posting {path}: {body}");
    }
    // Erin's subscription and rule are still there.
    b.clear_cookies();
    log_in(b, "erin", PASSWORD);
    b.goto("/subscriptions");
    b.find(&format!("tr[data-subscription=\"{subscription}\"]"));
    b.goto("/forwarding");
    b.find(&format!("tr[data-destination=\"{forwarding_id}\"]"));
}

#[test]
fn repeated_wrong_passwords_lock_the_login() {
    let Some(console) = Console::start("console-lockout") else {
        return;
    };
    let b = &console.browser;
    register(b, "grace");
    b.clear_cookies();
    for attempt in 1..=6 {
        let page = try_log_in(b, "grace", "wrong password!");
        assert_eq!(page, "page-login", "wrong password {attempt} was accepted");
    }
    let page = try_log_in(b, "grace", PASSWORD);
    let text = b.body_text();
    assert_eq!(page, "page-login", "the right password got in: {text}");
    assert!(
        text.to_lowercase().contains("too many failed logins"),
        "locked out with 'too many failed logins': {text}"
    );
    b.shoot("login-locked");
    // The same answer for a login that does not exist (no hint which ones do).
    for _ in 1..=6 {
        try_log_in(b, "nobody-here", "wrong password!");
    }
    try_log_in(b, "nobody-here", PASSWORD);
    assert!(b
        .body_text()
        .to_lowercase()
        .contains("too many failed logins"));
}
