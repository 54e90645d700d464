//! Browser services reach the person at the machine only through the user-session helper
//! (`herald-agent session`): without one the job fails and says how to start it; with
//! one, the helper's browser receives the signed page with the server's one-time ticket
//! appended (and the ticket shows up nowhere else); pages outside the URL rule, and any
//! page on an agent whose policy disables browser services, are refused at signal time.
//! A root agent does not let another local account's helper take its browser jobs (run
//! as root only: the helper of another account needs root to start).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use herald_shared::envelope::{Action, Audience, OpenSpec, Order, Repeat};
use herald_tests::console_client::Console;
use herald_tests::session_helper::{
    post_order, recording_browser, running_as_root, set_policy, set_setting, SessionHelper, NOBODY,
};
use herald_tests::{job_ids, now_ms, random_bytes, wait_until, TestAgent, TestServer, DEADLINE};
use serde_json::Value;

/// The signed page: a query and a fragment, so the ticket's place is visible. The host is
/// never contacted (the browser is a script).
const PAGE: &str = "https://service.example.invalid/service/scan?lang=en#top";

/// A one-off browser order for `agent`, valid from a minute ago for an hour.
fn open_order(agent: &TestAgent, url: &str) -> Order {
    let now = now_ms();
    Order {
        id: random_bytes(),
        audience: Audience::Agent(agent.id.clone()),
        issued_at: now - 60_000,
        not_before: now - 60_000,
        not_after: now + 3_600_000,
        repeat: Repeat::Once,
        action: Action::Open(OpenSpec {
            url: url.to_string(),
            timeout_ms: 600_000,
        }),
    }
}

fn post_one(server: &TestServer, order: &Order) -> i64 {
    let ids = post_order(server, order);
    assert_eq!(ids.len(), 1, "one job for one agent: {ids:?}");
    ids[0]
}

/// Waits until the job has left the states before and during its run.
fn wait_settled(server: &TestServer, id: i64) -> Value {
    let unsettled: HashSet<&str> = ["queued", "delivered", "running"].into();
    wait_until(&format!("job {id} to settle"), DEADLINE, || {
        let job = server.job(id);
        (!unsettled.contains(job["state"].as_str().unwrap_or("queued"))).then_some(job)
    })
}

/// Sends `agent` a browser job for [`PAGE`] and waits until a helper has opened it: the
/// job is `waiting` for the page's outcome (or already `succeeded`).
fn open_page(server: &TestServer, agent: &TestAgent) -> (i64, Value) {
    let id = post_one(server, &open_order(agent, PAGE));
    let job = wait_settled(server, id);
    assert!(
        job["state"] == "waiting" || job["state"] == "succeeded",
        "{job:#}"
    );
    (id, job)
}

/// Checks a ticket has the server's form `v1.<job id>.<expiry ms>.<hex>`.
fn assert_ticket_form(ticket: &str, job_id: i64) {
    let parts: Vec<&str> = ticket.split('.').collect();
    assert_eq!(parts.len(), 4, "ticket {ticket:?}");
    assert_eq!(parts[0], "v1", "ticket {ticket:?}");
    assert_eq!(
        parts[1],
        job_id.to_string(),
        "ticket {ticket:?} is for job {job_id}"
    );
    let expiry: i64 = parts[2].parse().expect("ticket expiry is a number");
    assert!(expiry > now_ms(), "ticket {ticket:?} already expired");
    assert!(
        !parts[3].is_empty() && parts[3].bytes().all(|b| b.is_ascii_hexdigit()),
        "ticket {ticket:?}"
    );
}

#[test]
fn browser_job_fails_without_a_helper_and_opens_the_ticketed_page_with_one() {
    let server = TestServer::start("browser-helper");
    let agent = TestAgent::start(&server, "desk");

    // (a) Nobody logged in with a helper: the job fails, saying how to start one.
    let lonely = post_one(&server, &open_order(&agent, PAGE));
    let job = server.wait_job_state(lonely, "failed", DEADLINE);
    let error = job["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("herald-agent session") && error.contains("no user-session helper"),
        "{job:#}"
    );

    // (b) With a helper whose $BROWSER records what it is given.
    let (browser, record) = recording_browser(server.dir.path());
    let helper = SessionHelper::start(
        &agent,
        &browser.to_string_lossy(),
        &server.dir.path().join("helper.log"),
    );
    // `waiting` once the server holds a browser job open for the page's outcome.
    let (id, job) = open_page(&server, &agent);
    assert_eq!(job["error"], Value::Null, "{job:#}");
    let opened = std::fs::read_to_string(&record).expect("the browser was started");
    let lines: Vec<&str> = opened.lines().collect();
    assert_eq!(lines.len(), 1, "opened once: {opened:?}");
    let url = lines[0];
    let (page, fragment) = PAGE.split_once('#').expect("PAGE has a fragment");
    let ticket = url
        .strip_prefix(&format!("{page}&herald_ticket="))
        .and_then(|rest| rest.strip_suffix(&format!("#{fragment}")))
        .unwrap_or_else(|| panic!("the ticket goes after the query, before the fragment: {url}"));
    assert_ticket_form(ticket, id);

    // The result names the page and the user, never the ticket; nor do the logs.
    let stdout = job["stdout"].as_str().unwrap_or_default();
    assert!(
        stdout.starts_with(&format!("opened {PAGE} in the browser of user ")),
        "{job:#}"
    );
    assert!(
        !job.to_string().contains(ticket),
        "ticket in the job: {job:#}"
    );
    assert!(!agent.log().contains(ticket), "ticket in the agent log");
    assert!(!helper.log().contains(ticket), "ticket in the helper log");
}

#[test]
fn a_one_off_open_of_a_catalog_page_is_completed_by_the_person_at_the_machine() {
    let server = TestServer::start("browser-one-off");
    let agent = TestAgent::start(&server, "desk");
    let (browser, record) = recording_browser(server.dir.path());
    let _helper = SessionHelper::start(
        &agent,
        &browser.to_string_lossy(),
        &server.dir.path().join("helper.log"),
    );
    server.cli_ok(&[
        "catalog",
        "add",
        "checkin",
        "--title",
        "Check in",
        "--page",
        "--min-interval",
        "1s",
    ]);
    let page = format!("{}/service/checkin", server.https_url());
    let ids = job_ids(&server.cli_ok(&["open", "--to", &format!("agent:{}", agent.id), &page]));
    assert_eq!(ids.len(), 1, "one job: {ids:?}");
    let id = ids[0];
    let url = wait_until("the page to be opened", DEADLINE, || {
        let opened = std::fs::read_to_string(&record).ok()?;
        opened.lines().next().map(str::to_string)
    });
    let path = url
        .strip_prefix(&server.https_url())
        .unwrap_or_else(|| panic!("the signed page on this server: {url}"));
    assert!(path.starts_with("/service/checkin?herald_ticket="), "{url}");

    // The ticket lets this visit in once, to this job's page.
    let console = Console::new(&server);
    let visit = console.get(path);
    assert_eq!(
        visit.page_id().as_deref(),
        Some("service"),
        "{}",
        visit.body
    );
    assert!(visit.url.ends_with(&format!("?job={id}")), "{}", visit.url);
    let again = Console::new(&server).get(path);
    assert_eq!(again.status, 403, "a ticket works once: {}", again.body);
    assert!(again.body.contains("already used"), "{}", again.body);

    let done = console.post(
        "/service/checkin",
        &[
            ("csrf", &visit.csrf()),
            ("job", &id.to_string()),
            ("outcome", "done"),
            ("note", "at my desk"),
        ],
    );
    assert_eq!(done.status, 200, "{}", done.body);
    let job = server.wait_job_state(id, "succeeded", DEADLINE);
    assert!(
        job.to_string().contains("done: at my desk"),
        "the outcome is stored with the job: {job:#}"
    );
}

#[test]
fn pages_outside_the_rule_and_disabled_policy_are_refused_at_signal_time() {
    let server = TestServer::start("browser-refused");
    let open = TestAgent::start(&server, "open-desk");
    let mut closed = TestAgent::enroll(&server, "closed-desk", &[]);
    set_policy(&closed, "allow_browser", "false");
    closed.spawn();
    closed.wait_online(&server);
    let (browser, record) = recording_browser(server.dir.path());
    let _helper = SessionHelper::start(
        &open,
        &browser.to_string_lossy(),
        &server.dir.path().join("helper.log"),
    );

    // (c) Plain http to a host that is not loopback, validly signed: refused.
    let plain = post_one(&server, &open_order(&open, "http://example.invalid/"));
    let job = server.wait_job_state(plain, "refused", DEADLINE);
    let error = job["error"].as_str().unwrap_or_default();
    assert!(error.contains("https"), "{job:#}");

    // (d) A good page on an agent whose owner turned browser services off: refused.
    let off = post_one(&server, &open_order(&closed, PAGE));
    let job = server.wait_job_state(off, "refused", DEADLINE);
    let error = job["error"].as_str().unwrap_or_default();
    assert!(error.contains("allow_browser"), "{job:#}");

    // Control: the same helper does open a good page, so the refusals above are the
    // agent's doing, not a broken helper.
    open_page(&server, &open);
    let opened = std::fs::read_to_string(&record).expect("the browser was started");
    assert_eq!(
        opened.lines().count(),
        1,
        "only the good page opened: {opened:?}"
    );
    assert!(
        opened.starts_with("https://service.example.invalid/"),
        "{opened:?}"
    );
}

/// A directory every local account can traverse and read, outside the test tree (whose
/// parents may be private); removed at the end unless the test failed.
struct OpenDir(PathBuf);

impl OpenDir {
    fn new(name: &str) -> OpenDir {
        use std::os::unix::fs::PermissionsExt;
        let nonce: [u8; 8] = random_bytes();
        let dir = std::env::temp_dir().join(format!("herald-{name}-{}", hex::encode(nonce)));
        std::fs::create_dir_all(&dir).expect("create open dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
            .expect("open the dir to every account");
        OpenDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for OpenDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("shared test files kept in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[test]
fn another_local_account_cannot_take_the_browser_jobs_of_a_root_agent() {
    if !running_as_root() {
        // An agent not running as root admits only its own uid: the first test's helper
        // (same uid) shows that side; the unit tests cover the rule itself.
        eprintln!("skipped: starting a helper as another account needs root");
        return;
    }
    let server = TestServer::start("browser-foreign");
    // Everything the other account must reach: the socket, the binary, the browser.
    let open = OpenDir::new("browser-foreign");
    let socket = open.path().join("sock").join("session.sock");
    let binary = open.path().join("herald-agent");
    std::fs::copy(herald_tests::bin("herald-agent"), &binary).expect("copy herald-agent");
    let (browser, record) = recording_browser(open.path());
    {
        use std::os::unix::fs::PermissionsExt;
        // Writable by all, so that a wrongly admitted helper visibly opens the page.
        std::fs::write(&record, "").expect("create the record");
        std::fs::set_permissions(&record, std::fs::Permissions::from_mode(0o666))
            .expect("open the record");
    }
    let mut agent = TestAgent::enroll(&server, "desk", &[]);
    let socket_toml = serde_json::to_string(&socket.to_string_lossy()).expect("quote path");
    set_setting(&agent, "session", "socket", &socket_toml);
    agent.spawn();
    agent.wait_online(&server);

    // Another account (an SSH user, a service account) connects a helper: refused, with
    // the advice for the admin, and it receives no job.
    let foreign = SessionHelper::start_as(
        NOBODY,
        &binary,
        &socket,
        &browser.to_string_lossy(),
        &server.dir.path().join("foreign-helper.log"),
    );
    let log = foreign.wait_log("did not accept this helper");
    assert!(log.contains("[session] users"), "{log}");
    assert!(agent.log().contains("session helper refused"), "agent log");
    let id = post_one(&server, &open_order(&agent, PAGE));
    let job = server.wait_job_state(id, "failed", DEADLINE);
    let error = job["error"].as_str().unwrap_or_default();
    assert!(error.contains("no user-session helper"), "{job:#}");
    assert_eq!(
        std::fs::read_to_string(&record).expect("read the record"),
        "",
        "the other account's browser opened the page"
    );

    // Root's own helper is admitted and gets the job.
    let _own = SessionHelper::start(
        &agent,
        &browser.to_string_lossy(),
        &server.dir.path().join("helper.log"),
    );
    let (_, job) = open_page(&server, &agent);
    let stdout = job["stdout"].as_str().unwrap_or_default();
    assert!(
        stdout.trim_end().ends_with("in the browser of user root"),
        "{job:#}"
    );
    let opened = std::fs::read_to_string(&record).expect("read the record");
    assert_eq!(opened.lines().count(), 1, "{opened:?}");
    assert!(
        !foreign.log().contains("connected to herald-agent"),
        "{}",
        foreign.log()
    );
}
