//! Clubs, the directory page and shared web services in a real browser: a real
//! `herald-server`, real agents linked to console users, and headless Chromium at 390
//! and 1280 px (screenshots kept like the other browser tests; set
//! `HERALD_SCREENSHOTS=DIR` to choose where).
//!
//! Tests skip (and say so) when Chromium or chromedriver is not installed.

use std::time::Duration;

use herald_tests::browser::{self, Browser};
use herald_tests::{wait_until, TestAgent, TestServer};

/// A password the console accepts.
const PASSWORD: &str = "correct horse battery";
/// How long the directory page may take to follow a device going or coming (it polls
/// every 3 s; the server notices a killed agent's connection within its idle timeout).
const LIVE_DEADLINE: Duration = Duration::from_secs(45);

// === helpers ===

/// A server and a browser on it (fields drop in order: the browser ends first).
struct Console {
    browser: Browser,
    server: TestServer,
}

impl Console {
    fn start(name: &str) -> Option<Console> {
        if !browser::installed() {
            return None;
        }
        let server = TestServer::start(name);
        let browser = Browser::for_server(&server, name)?;
        Some(Console { browser, server })
    }
}

fn log_out(b: &Browser) {
    // Error pages have no navigation: log out from a page that has.
    if b.try_find("#logout").is_none() {
        b.goto("/clubs");
    }
    b.click("#logout");
}

/// Stops an agent the way a device shutting down does (SIGTERM: it closes its link),
/// so the server sees it go at once rather than after the link's idle timeout.
fn stop(agent: &mut TestAgent) {
    let pid = agent.pid().expect("agent running") as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("signal the agent");
    wait_until("the agent to stop", LIVE_DEADLINE, || {
        agent.try_wait().map(|_| ())
    });
    agent.kill();
}

fn log_in(b: &Browser, login: &str) {
    b.goto("/login");
    b.wait_page("page-login");
    b.fill("login", login);
    b.fill("password", PASSWORD);
    b.submit("main form");
    assert_eq!(
        b.page_id(),
        "page-devices",
        "login as {login}: {}",
        b.body_text()
    );
}

/// Links a device to the signed-in user through "link a device" and starts it.
fn link_device(server: &TestServer, b: &Browser, name: &str) -> TestAgent {
    b.goto("/devices");
    b.wait_page("page-devices");
    b.submit("form[action=\"/devices/link\"]");
    b.wait_page("page-link");
    let token = b.text("code#enroll-token").trim().to_string();
    let mut agent = TestAgent::enroll_with_token(server, name, &token);
    agent.spawn();
    agent.wait_online(server);
    agent
}

/// Creates a club through the form; returns the page id it lands on.
fn create_club(b: &Browser, name: &str, description: &str) -> String {
    b.goto("/clubs");
    b.wait_page("page-clubs");
    b.fill_in("#club-form", "name", name);
    b.fill_in("#club-form", "description", description);
    b.submit("#club-form");
    b.page_id()
}

/// An invitation link made by the signed-in owner of `club`.
fn invite(b: &Browser, club: &str) -> String {
    b.goto(&format!("/clubs/{club}"));
    b.wait_page("page-club");
    b.submit("#invite-form");
    b.wait_page("page-club");
    b.text("#invite-link").trim().to_string()
}

/// Follows an invitation link and accepts it; returns the page id it lands on.
fn accept(b: &Browser, link: &str) -> String {
    b.goto(link);
    b.wait_page("page-club-join");
    b.submit("#accept-form");
    b.page_id()
}

/// The members listed on a club's page, with their roles.
fn members(b: &Browser, club: &str) -> Vec<(String, String)> {
    b.goto(&format!("/clubs/{club}"));
    b.wait_page("page-club");
    let rows = b.execute(
        "return Array.from(document.querySelectorAll('#members tr[data-member]'))\
           .map(r => [r.dataset.member, r.dataset.role]);",
    );
    serde_json::from_value(rows).expect("member rows")
}

/// Posts a form to `action` with the page's CSRF token, as a page's own form would
/// (for actions the page offers no button for); returns the resulting page's id.
fn post_with_csrf(b: &Browser, action: &str) -> String {
    b.execute(&format!(
        "const f = document.createElement('form'); f.method = 'post'; f.action = {action:?};\
         const c = document.createElement('input'); c.type = 'hidden'; c.name = 'csrf';\
         c.value = document.querySelector('input[name=csrf]').value; f.appendChild(c);\
         const s = document.createElement('button'); s.type = 'submit'; s.id = 'forged';\
         f.appendChild(s); document.body.appendChild(f);"
    ));
    b.click("#forged");
    b.page_id()
}

/// The user id in a member's remove form on an owner's club page.
fn remove_action(b: &Browser, login: &str) -> String {
    let form = b.find(&format!(
        "tr[data-member=\"{login}\"] form[action$=\"/remove\"]"
    ));
    b.attr(&form, "action").expect("remove form action")
}

/// Writes an agent's reported shares into the server's database, as the agent's report
/// would (`Store::set_shares`): (name, http, public, clubs, description).
fn set_shares(server: &TestServer, agent: &str, shares: &[(&str, bool, bool, &[&str], &str)]) {
    let db = rusqlite::Connection::open(server.db_path()).expect("open the server's database");
    db.busy_timeout(Duration::from_secs(10))
        .expect("busy timeout");
    db.execute("DELETE FROM shares WHERE agent_id = ?1", [agent])
        .expect("clear shares");
    db.execute("DELETE FROM share_clubs WHERE agent_id = ?1", [agent])
        .expect("clear share clubs");
    for (name, http, public, clubs, description) in shares {
        db.execute(
            "INSERT INTO shares (agent_id, name, http, public, description, reported_at)
             VALUES (?1, ?2, ?3, ?4, ?5, 1)",
            rusqlite::params![agent, name, http, public, description],
        )
        .expect("insert share");
        for club in *clubs {
            db.execute(
                "INSERT INTO share_clubs (agent_id, share, club) VALUES (?1, ?2, ?3)",
                rusqlite::params![agent, name, club],
            )
            .expect("insert share club");
        }
    }
}

/// The directory page's devices and their services, as shown now.
fn directory(b: &Browser) -> Vec<(String, Vec<String>)> {
    let rows = b.execute(
        "return Array.from(document.querySelectorAll('#directory section.peer'))\
           .map(s => [s.dataset.owner + '/' + s.dataset.device,\
                      Array.from(s.querySelectorAll('tr[data-service]')).map(r => r.dataset.service)]);",
    );
    serde_json::from_value(rows).expect("directory rows")
}

fn services(b: &Browser) -> Vec<String> {
    directory(b).into_iter().flat_map(|(_, s)| s).collect()
}

// === tests ===

#[test]
fn clubs_life_cycle_in_the_console() {
    let Some(console) = Console::start("clubs-life") else {
        return;
    };
    let b = &console.browser;
    b.register("ann", PASSWORD);
    // Bad and duplicate names are refused with the reason.
    assert_eq!(create_club(b, "chess club", ""), "page-clubs");
    assert!(b.text("#error").contains("no spaces"), "{}", b.body_text());
    assert_eq!(
        create_club(b, "chess", "체스 동호회 — Schachklub"),
        "page-club"
    );
    assert_eq!(members(b, "chess"), [("ann".into(), "owner".into())]);
    assert_eq!(create_club(b, "chess", ""), "page-clubs");
    assert!(
        b.text("#error").contains("already exists"),
        "{}",
        b.body_text()
    );
    let link = invite(b, "chess");
    assert!(link.contains("/clubs/join/"), "{link}");
    b.shoot("club-invite");
    // The last owner cannot leave while others remain (checked once ben is in).
    log_out(b);

    b.register("ben", PASSWORD);
    // A code that was never issued, typed or as a link.
    b.goto("/clubs");
    b.fill_in("#join-form", "code", "not-a-real-code");
    b.submit("#join-form");
    assert!(
        b.text("#join-error").contains("not known"),
        "{}",
        b.body_text()
    );
    b.goto("/clubs/join/0123456789abcdef");
    b.wait_page("page-club-join");
    assert!(b.text("#error").contains("not known"), "{}", b.body_text());
    assert_eq!(accept(b, &link), "page-club");
    assert_eq!(
        members(b, "chess"),
        [
            ("ann".into(), "owner".into()),
            ("ben".into(), "member".into())
        ]
    );
    b.shoot("club-members");
    // A member cannot remove anyone, even with a well-formed request.
    b.goto("/clubs/chess");
    assert!(b.try_find("form[action$=\"/remove\"]").is_none());
    let ann_row = b.find("tr[data-member=\"ann\"]");
    let ann_id = b.attr(&ann_row, "data-user").expect("member's user id");
    let page = post_with_csrf(b, &format!("/clubs/chess/members/{ann_id}/remove"));
    assert_eq!(page, "page-club", "{}", b.body_text());
    assert!(
        b.text("#error").contains("only the club's owners"),
        "{}",
        b.body_text()
    );
    log_out(b);

    // The link admits one person only.
    b.register("cat", PASSWORD);
    b.goto(&link);
    b.wait_page("page-club-join");
    assert!(
        b.text("#error").contains("already been used"),
        "{}",
        b.body_text()
    );
    assert!(b.try_find("#accept-form").is_none());
    b.shoot("club-used-code");
    // A non-member does not see the club at all.
    b.goto("/clubs/chess");
    assert_eq!(b.page_id(), "page-not-found");
    log_out(b);

    log_in(b, "ann");
    b.goto("/clubs/chess");
    let page = post_with_csrf(b, "/clubs/chess/leave");
    assert_eq!(page, "page-club");
    assert!(b.text("#error").contains("last owner"), "{}", b.body_text());
    // The owner removes ben, invites cat, makes her an owner and leaves.
    b.goto("/clubs/chess");
    let remove = remove_action(b, "ben");
    b.submit(&format!("form[action=\"{remove}\"]"));
    assert_eq!(members(b, "chess"), [("ann".into(), "owner".into())]);
    let link = invite(b, "chess");
    log_out(b);
    log_in(b, "cat");
    assert_eq!(accept(b, &link), "page-club");
    log_out(b);
    log_in(b, "ann");
    b.goto("/clubs/chess");
    b.submit("tr[data-member=\"cat\"] form[action$=\"/promote\"]");
    assert_eq!(
        members(b, "chess"),
        [
            ("ann".into(), "owner".into()),
            ("cat".into(), "owner".into())
        ]
    );
    b.goto("/clubs/chess");
    b.submit("#leave-form");
    assert_eq!(b.page_id(), "page-clubs");
    assert!(b.text("#notice").contains("You left the club chess"));
    assert!(b.try_find("tr[data-club=\"chess\"]").is_none());
    log_out(b);
    // The last member leaving deletes the club.
    log_in(b, "cat");
    b.goto("/clubs/chess");
    b.submit("#leave-form");
    assert!(b.text("#notice").contains("deleted"), "{}", b.body_text());
    b.shoot("clubs-after-leaving");
}

#[test]
fn directory_shows_only_what_my_clubs_share() {
    let Some(console) = Console::start("peers-directory") else {
        return;
    };
    let (b, server) = (&console.browser, &console.server);
    // ann and ben are in "chess"; cat runs "garden" alone. ann shares a board with
    // chess, cat shares seeds with garden and news with everyone.
    b.register("ann", PASSWORD);
    let mut ann_pc = link_device(server, b, "ann-pc");
    assert_eq!(create_club(b, "chess", ""), "page-club");
    let chess = invite(b, "chess");
    log_out(b);
    b.register("cat", PASSWORD);
    let cat_nas = link_device(server, b, "cat-nas");
    assert_eq!(create_club(b, "garden", ""), "page-club");
    log_out(b);
    b.register("ben", PASSWORD);
    assert_eq!(accept(b, &chess), "page-club");
    set_shares(
        server,
        &ann_pc.id,
        &[(
            "board",
            true,
            false,
            &["chess"],
            "체스 게임판 — ein Schachbrett",
        )],
    );
    set_shares(
        server,
        &cat_nas.id,
        &[
            ("news", true, true, &[], "Nachrichten aus dem Garten"),
            ("seeds", false, false, &["garden"], "Saatgut-Tausch 씨앗"),
        ],
    );

    // ben sees chess's board and the public news, not the garden's seeds.
    b.goto("/peers");
    b.wait_page("page-peers");
    assert_eq!(
        directory(b),
        [
            ("ann/ann-pc".to_string(), vec!["board".to_string()]),
            ("cat/cat-nas".to_string(), vec!["news".to_string()]),
        ]
    );
    let observed = b.text("section.peer[data-device=\"ann-pc\"] .observed");
    assert!(
        observed.contains("127.0.0.1"),
        "observed address: {observed}"
    );
    assert!(b.text("#directory").contains("Online since"));
    let board = b.find("tr[data-service=\"board\"] a.open");
    assert_eq!(b.attr(&board, "href").as_deref(), Some("/p/ann/board/"));
    b.shoot("directory");
    // Search in Korean and German, from the form.
    b.fill_in("#search-form", "q", "체스");
    b.submit("#search-form");
    assert_eq!(services(b), ["board"]);
    b.shoot("directory-search");
    b.fill_in("#search-form", "q", "SCHACHBRETT");
    b.submit("#search-form");
    assert_eq!(services(b), ["board"]);
    b.goto("/peers?q=%EC%94%A8%EC%95%97");
    assert!(services(b).is_empty(), "seeds are not ben's to find");
    assert!(b.try_find("#no-peers").is_some());

    // Favourites come first, and stay across visits.
    b.goto("/peers");
    b.submit("tr[data-service=\"news\"] form.star-form");
    assert_eq!(b.page_id(), "page-peers");
    let order: Vec<String> = directory(b).into_iter().map(|(d, _)| d).collect();
    assert_eq!(order, ["cat/cat-nas", "ann/ann-pc"], "favourite first");
    let news = b.find("tr[data-service=\"news\"]");
    assert_eq!(b.attr(&news, "data-favourite").as_deref(), Some("1"));
    b.reload();
    let order: Vec<String> = directory(b).into_iter().map(|(d, _)| d).collect();
    assert_eq!(order, ["cat/cat-nas", "ann/ann-pc"]);

    // The open page follows ann's device going offline and coming back, without a reload.
    b.execute("window.__sameDocument = true;");
    stop(&mut ann_pc);
    wait_until("the directory to drop ann's device", LIVE_DEADLINE, || {
        (!directory(b).iter().any(|(d, _)| d == "ann/ann-pc")).then_some(())
    });
    ann_pc.spawn();
    ann_pc.wait_online(server);
    wait_until(
        "the directory to list ann's device again",
        LIVE_DEADLINE,
        || {
            directory(b)
                .iter()
                .any(|(d, _)| d == "ann/ann-pc")
                .then_some(())
        },
    );
    assert_eq!(
        b.execute("return window.__sameDocument === true;"),
        serde_json::Value::Bool(true),
        "the page was not reloaded"
    );
    log_out(b);

    // cat sees her own garden's seeds and the news, not chess's board.
    log_in(b, "cat");
    b.goto("/peers");
    let all = services(b);
    assert!(
        all.contains(&"seeds".to_string()) && all.contains(&"news".to_string()),
        "{all:?}"
    );
    assert!(!all.contains(&"board".to_string()), "{all:?}");
    // The JSON the page polls says the same, and refuses strangers.
    let (status, body) = b.fetch("GET", "/peers.json?q=board");
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&body).expect("peers.json");
    assert_eq!(json["devices"].as_array().map(Vec::len), Some(0), "{json}");
    log_out(b);
    let (status, _) = b.fetch("GET", "/peers.json");
    assert_eq!(status, 401);
    drop(cat_nas);
}
