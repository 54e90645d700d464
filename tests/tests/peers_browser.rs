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
    // Shares are decided on the machines; nothing listens at the address, which the
    // directory does not need.
    let nowhere = "127.0.0.1:9";
    ann_pc.cli_ok(&[
        "share",
        "add",
        "board",
        "--to",
        nowhere,
        "--http",
        "--club",
        "chess",
        "--description",
        "체스 게임판 — ein Schachbrett",
    ]);
    cat_nas.cli_ok(&[
        "share",
        "add",
        "news",
        "--to",
        nowhere,
        "--http",
        "--public",
        "--description",
        "Nachrichten aus dem Garten",
    ]);
    cat_nas.cli_ok(&[
        "share",
        "add",
        "seeds",
        "--to",
        nowhere,
        "--club",
        "garden",
        "--description",
        "Saatgut-Tausch 씨앗",
    ]);
    // ben sees chess's board and the public news, not the garden's seeds.
    wait_until(
        "the devices' shares in the directory",
        LIVE_DEADLINE,
        || {
            b.goto("/peers");
            (services(b).len() == 2).then_some(())
        },
    );
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
    // Admins see the same view through the API, and the clubs with their members.
    let api = herald_tests::console_client::Console::new(server);
    let view = api.admin_get(server, "/api/v1/directory?user=ben&q=%EC%B2%B4%EC%8A%A4");
    assert_eq!(view.status, 200, "{}", view.body);
    let view: serde_json::Value = serde_json::from_str(&view.body).expect("directory JSON");
    assert_eq!(view[0]["owner"], "ann", "{view}");
    assert_eq!(view[0]["services"][0]["name"], "board", "{view}");
    assert_eq!(view.as_array().map(Vec::len), Some(1), "{view}");
    let club = api.admin_get(server, "/api/v1/clubs/chess");
    let club: serde_json::Value = serde_json::from_str(&club.body).expect("club JSON");
    assert_eq!(club["members"].as_array().map(Vec::len), Some(2), "{club}");
    let nobody = api.admin_get(server, "/api/v1/directory");
    let nobody: serde_json::Value = serde_json::from_str(&nobody.body).expect("directory JSON");
    assert_eq!(
        nobody[0]["services"][0]["name"], "news",
        "signed out: public only"
    );
    assert_eq!(nobody.as_array().map(Vec::len), Some(1), "{nobody}");
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

#[test]
fn browser_reaches_a_shared_page_without_the_agent() {
    if herald_tests::sqlite_only("reads the session rows from herald.db") {
        return;
    }
    let Some(console) = Console::start("peers-web") else {
        return;
    };
    let (b, server) = (&console.browser, &console.server);
    let service = WebService::start();
    // ann shares the service with "chess" (ben is in it, cat is not) and publicly.
    b.register("ann", PASSWORD);
    let mut ann_pc = link_device(server, b, "ann-pc");
    assert_eq!(create_club(b, "chess", ""), "page-club");
    let chess = invite(b, "chess");
    let to = service.address.to_string();
    ann_pc.cli_ok(&[
        "share",
        "add",
        "web",
        "--to",
        &to,
        "--http",
        "--club",
        "chess",
        "--description",
        "체스 기록 — Partien",
    ]);
    ann_pc.cli_ok(&["share", "add", "open", "--to", &to, "--http", "--public"]);
    log_out(b);
    b.register("cat", PASSWORD);
    log_out(b);
    b.register("ben", PASSWORD);
    assert_eq!(accept(b, &chess), "page-club");
    wait_until("ann's shares in ben's directory", LIVE_DEADLINE, || {
        b.goto("/peers");
        let all = services(b);
        (all.contains(&"web".to_string()) && all.contains(&"open".to_string())).then_some(())
    });

    // From the directory's link to the page, with its relative link and its WebSocket.
    b.click("tr[data-service=\"web\"] a.open");
    assert_eq!(b.path(), "/p/ann/web/");
    assert_eq!(b.text("#shared"), "A shared page");
    assert_eq!(b.text("#path"), "/", "the prefix is stripped");
    let seen: serde_json::Value =
        serde_json::from_str(&b.text("#headers")).expect("the headers the service saw");
    assert_eq!(seen["x-forwarded-prefix"], "/p/ann/web");
    assert_eq!(seen["x-forwarded-proto"], "https");
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert!(
        seen["x-forwarded-host"]
            .as_str()
            .is_some_and(|h| h.starts_with("127.0.0.1:")),
        "{seen}"
    );
    wait_until("the WebSocket echo", LIVE_DEADLINE, || {
        (b.text("#ws-echo") == "echo: hello 체스").then_some(())
    });
    b.shoot("shared-page");
    // The service's own cookie comes back (under the prefix); the console's never goes.
    let (status, body) = b.fetch("GET", "/p/ann/web/headers?x=1");
    assert_eq!(status, 200);
    let seen: serde_json::Value = serde_json::from_str(&body).expect("headers JSON");
    assert_eq!(seen["path"], "/headers?x=1");
    assert_eq!(seen["headers"]["cookie"], "app=1", "{seen}");
    assert!(b
        .cookie("__Host-herald_session")
        .is_some_and(|c| c != "forged"));
    // The page shares the console's origin, yet its scripts cannot read console pages:
    // not by fetching them (its policy confines it to its prefix) nor through a window
    // it opens (console pages are in their own browsing context group).
    b.execute(
        "window.__steal = 'pending';\
         fetch('/account').then(r => r.text()).then(t => { window.__steal = 'read ' + t.length; })\
           .catch(() => { window.__steal = 'blocked'; });",
    );
    let fetched = wait_until("the fetch of a console page", LIVE_DEADLINE, || {
        let v = b.execute("return window.__steal;");
        (v != "pending").then_some(v)
    });
    assert_eq!(fetched, "blocked");
    b.execute(
        "window.__open = 'pending'; const w = window.open('/account', 'steal'); const t0 = Date.now();\
         const tick = () => { let v = null;\
           try { v = (!w || w.closed) ? 'no handle' : (w.location.pathname === '/account'\
                 && w.document.readyState === 'complete' ? 'read ' + w.document.body.innerHTML.length : null); }\
           catch (e) { v = 'blocked'; }\
           if (v) { window.__open = v; } else if (Date.now() - t0 < 20000) { setTimeout(tick, 100); }\
           else { window.__open = 'timeout'; } };\
         tick();",
    );
    let opened = wait_until("the window on a console page", LIVE_DEADLINE, || {
        let v = b.execute("return window.__open;");
        (v != "pending").then_some(v)
    });
    assert!(opened == "no handle" || opened == "blocked", "{opened}");
    b.click("#next");
    assert_eq!(b.path(), "/p/ann/web/next.html");
    b.find("#next-page");
    b.goto("/p/ann/web/redirect");
    assert_eq!(
        b.path(),
        "/p/ann/web/next.html",
        "Location moved under the prefix"
    );
    // A large body streams through whole.
    b.execute(
        "window.__big = null;\
         fetch('/p/ann/web/big').then(r => r.arrayBuffer()).then(buf => {\
           const a = new Uint8Array(buf); let sum = 0;\
           for (let i = 0; i < a.length; i++) { sum = (sum * 31 + a[i]) % 1000000007; }\
           window.__big = [a.length, sum]; }).catch(e => { window.__big = [0, String(e)]; });",
    );
    let answer = wait_until("the big body", LIVE_DEADLINE, || {
        let value = b.execute("return window.__big;");
        (!value.is_null()).then_some(value)
    });
    let expected = (0..BIG).fold(0u64, |sum, i| {
        (sum * 31 + u64::from(big_byte(i))) % 1_000_000_007
    });
    assert_eq!(answer, serde_json::json!([BIG, expected]), "the big body");
    // And a large upload streams to the service whole.
    b.execute(
        "window.__up = null; const a = new Uint8Array(8388608);\
         for (let i = 0; i < a.length; i++) { a[i] = (i * 7) % 253; }\
         fetch('/p/ann/web/upload', {method: 'POST', body: a}).then(r => r.json())\
           .then(v => { window.__up = v; }).catch(e => { window.__up = [0, String(e)]; });",
    );
    let answer = wait_until("the upload", LIVE_DEADLINE, || {
        let value = b.execute("return window.__up;");
        (!value.is_null()).then_some(value)
    });
    let expected = (0..BIG).fold(0u64, |sum, i| {
        (sum * 31 + ((i * 7) % 253) as u64) % 1_000_000_007
    });
    assert_eq!(answer, serde_json::json!([BIG, expected]), "the upload");
    // Sessions are recorded per request, with their bytes, and closed.
    wait_until("the sessions to close", LIVE_DEADLINE, || {
        let sessions = browser_sessions(server);
        let big = sessions.iter().find(|s| s.path == "/big")?;
        let upload = sessions.iter().find(|s| s.path == "/upload")?;
        (big.bytes_down >= BIG as i64
            && upload.bytes_up >= BIG as i64
            && sessions.iter().all(|s| s.ended))
        .then_some(())
    });
    let sessions = browser_sessions(server);
    assert!(sessions
        .iter()
        .all(|s| s.share == "web" || s.share == "open"));
    assert!(
        sessions.iter().any(|s| s.path == "/ws"),
        "the WebSocket's session"
    );

    // Signed out: the club share asks to sign in; the public one opens.
    log_out(b);
    b.goto("/p/ann/web/");
    assert_eq!(b.page_id(), "page-share-refused");
    assert!(
        b.text("#error").contains("not shared publicly"),
        "{}",
        b.body_text()
    );
    b.find("#login-link");
    b.shoot("shared-sign-in");
    b.goto("/p/ann/open/");
    assert_eq!(b.text("#shared"), "A shared page");
    // A user outside the club is refused.
    log_in(b, "cat");
    b.goto("/p/ann/web/");
    assert_eq!(b.page_id(), "page-share-refused");
    assert!(
        b.text("#error").contains("not shared with you") || b.text("#error").contains("No service"),
        "{}",
        b.body_text()
    );
    let (status, _) = b.fetch("GET", "/p/ann/web/headers");
    assert_eq!(status, 404);

    // With ann's device gone, a member is told it is offline.
    log_out(b);
    log_in(b, "ben");
    stop(&mut ann_pc);
    let (status, body) = b.fetch("GET", "/p/ann/web/");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("offline"), "{body}");

    // Whatever was asked, the service never saw a console cookie or credentials.
    let seen = service.seen();
    assert!(!seen.is_empty());
    for request in &seen {
        assert!(
            !request.path.starts_with("/p/"),
            "prefix not stripped: {request:?}"
        );
        for (name, value) in &request.headers {
            assert_ne!(name, "authorization", "{request:?}");
            if name == "cookie" {
                assert!(
                    !value.to_ascii_lowercase().contains("herald"),
                    "{request:?}"
                );
            }
        }
    }
}

/// A browser session as the server recorded it.
#[derive(Debug)]
struct BrowserSession {
    share: String,
    path: String,
    ended: bool,
    bytes_up: i64,
    bytes_down: i64,
}

fn browser_sessions(server: &TestServer) -> Vec<BrowserSession> {
    let db = rusqlite::Connection::open(server.db_path()).expect("open the server's database");
    db.busy_timeout(Duration::from_secs(10))
        .expect("busy timeout");
    let mut stmt = db
        .prepare(
            "SELECT share, path, ended_at IS NOT NULL, bytes_up, bytes_down FROM tunnel_sessions
             WHERE via = 'browser' ORDER BY id",
        )
        .expect("sessions query");
    stmt.query_map([], |r| {
        Ok(BrowserSession {
            share: r.get(0)?,
            path: r.get(1)?,
            ended: r.get(2)?,
            bytes_up: r.get(3)?,
            bytes_down: r.get(4)?,
        })
    })
    .expect("sessions")
    .collect::<Result<_, _>>()
    .expect("session rows")
}

// === a shared web service ===

/// Bytes of `/big`, streamed in [`CHUNK`]-byte pieces.
const BIG: usize = 8 * 1024 * 1024;
const CHUNK: usize = 64 * 1024;

/// The byte at `offset` of `/big` (the test recomputes its checksum).
fn big_byte(offset: usize) -> u8 {
    (offset.wrapping_mul(31) % 251) as u8
}

/// What one request looked like when it reached the service.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    headers: Vec<(String, String)>,
}

/// A small HTTP/1.1 service on loopback: `/` a page with a relative link, a script that
/// talks to `ws` (a WebSocket echo), and the headers it got; `/headers` the same as
/// JSON; `/big` a streamed body; `/redirect` a redirect to `/next.html`. Every request's
/// headers are kept for the test to inspect.
struct WebService {
    address: std::net::SocketAddr,
    seen: std::sync::Arc<std::sync::Mutex<Vec<Seen>>>,
    _runtime: tokio::runtime::Runtime,
}

impl WebService {
    fn start() -> WebService {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind the service");
        let address = listener.local_addr().expect("service address");
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = seen.clone();
        runtime.spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let record = record.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let record = record.clone();
                        async move {
                            let response = match request.uri().path() {
                                "/upload" => count_upload(request).await,
                                _ => answer(request, &record),
                            };
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        WebService {
            address,
            seen,
            _runtime: runtime,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen lock").clone()
    }
}

/// A response body: whole, or `/big`'s bytes made as they are read.
enum Reply {
    Whole(Option<hyper::body::Bytes>),
    Big { sent: usize },
}

impl hyper::body::Body for Reply {
    type Data = hyper::body::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let frame = match &mut *self {
            Reply::Whole(bytes) => bytes.take(),
            Reply::Big { sent } if *sent < BIG => {
                let end = (*sent + CHUNK).min(BIG);
                let chunk: Vec<u8> = (*sent..end).map(big_byte).collect();
                *sent = end;
                Some(hyper::body::Bytes::from(chunk))
            }
            Reply::Big { .. } => None,
        };
        std::task::Poll::Ready(frame.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const APP_JS: &str = r#"
const out = document.getElementById('ws-echo');
const url = location.href.replace(/^http/, 'ws').replace(/[^/]*$/, '') + 'ws';
const ws = new WebSocket(url);
ws.onopen = () => ws.send('hello 체스');
ws.onmessage = (e) => { out.textContent = e.data; };
ws.onerror = () => { out.textContent = 'error'; };
"#;

fn answer(
    mut request: hyper::Request<hyper::body::Incoming>,
    record: &std::sync::Mutex<Vec<Seen>>,
) -> hyper::Response<Reply> {
    let headers: Vec<(String, String)> = request
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("?").to_string()))
        .collect();
    let path = request.uri().to_string();
    record.lock().expect("seen lock").push(Seen {
        path: path.clone(),
        headers: headers.clone(),
    });
    let json: serde_json::Map<String, serde_json::Value> = headers
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    let whole = |status: u16, kind: &str, body: String| {
        hyper::Response::builder()
            .status(status)
            .header("content-type", kind)
            .body(Reply::Whole(Some(body.into())))
            .expect("response")
    };
    match request.uri().path() {
        "/" => {
            let mut response = whole(
                200,
                "text/html; charset=utf-8",
                format!(
                    "<!doctype html><html><head><meta charset=\"utf-8\">\
                     <meta name=\"viewport\" content=\"width=device-width\"><title>shared</title></head>\
                     <body><h1 id=\"shared\">A shared page</h1><p id=\"path\">{}</p>\
                     <p><a id=\"next\" href=\"next.html\">next</a></p>\
                     <p id=\"ws-echo\">waiting</p><pre id=\"headers\" style=\"white-space: pre-wrap; word-break: break-all\">{}</pre>\
                     <script src=\"app.js\"></script></body></html>",
                    html_escape(&path),
                    html_escape(&serde_json::Value::Object(json).to_string())
                ),
            );
            response.headers_mut().insert(
                "set-cookie",
                hyper::header::HeaderValue::from_static("app=1; Path=/; HttpOnly"),
            );
            response.headers_mut().append(
                "set-cookie",
                hyper::header::HeaderValue::from_static(
                    "__Host-herald_session=forged; Path=/; Secure",
                ),
            );
            response
        }
        "/next.html" => whole(
            200,
            "text/html; charset=utf-8",
            "<!doctype html><title>next</title><h1 id=\"next-page\">Next</h1>".into(),
        ),
        "/app.js" => whole(200, "text/javascript", APP_JS.into()),
        "/headers" => whole(
            200,
            "application/json",
            serde_json::json!({"path": path, "headers": json}).to_string(),
        ),
        "/redirect" => hyper::Response::builder()
            .status(302)
            .header("location", "/next.html")
            .body(Reply::Whole(None))
            .expect("response"),
        "/big" => hyper::Response::builder()
            .header("content-type", "application/octet-stream")
            .body(Reply::Big { sent: 0 })
            .expect("response"),
        "/ws" => {
            let key = request
                .headers()
                .get("sec-websocket-key")
                .and_then(|k| k.to_str().ok())
                .unwrap_or_default()
                .to_string();
            let accept = {
                use base64::Engine;
                let digest = ring::digest::digest(
                    &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
                    format!("{key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11").as_bytes(),
                );
                base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
            };
            let upgrade = hyper::upgrade::on(&mut request);
            tokio::spawn(async move {
                if let Ok(upgraded) = upgrade.await {
                    let _ = websocket_echo(hyper_util::rt::TokioIo::new(upgraded)).await;
                }
            });
            hyper::Response::builder()
                .status(101)
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-accept", accept)
                .body(Reply::Whole(None))
                .expect("response")
        }
        _ => whole(404, "text/plain", "no such page".into()),
    }
}

/// `POST /upload`: reads the body as it comes and answers its length and checksum.
async fn count_upload(request: hyper::Request<hyper::body::Incoming>) -> hyper::Response<Reply> {
    use hyper::body::Body;
    let mut body = request.into_body();
    let (mut len, mut sum) = (0usize, 0u64);
    while let Some(frame) =
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
    {
        let Ok(frame) = frame else { break };
        if let Some(data) = frame.data_ref() {
            for b in data.iter() {
                sum = (sum * 31 + u64::from(*b)) % 1_000_000_007;
            }
            len += data.len();
        }
    }
    hyper::Response::builder()
        .header("content-type", "application/json")
        .body(Reply::Whole(Some(
            serde_json::json!([len, sum]).to_string().into(),
        )))
        .expect("response")
}

/// Answers each text frame with `echo: TEXT` until the browser closes.
async fn websocket_echo(
    mut io: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let mut head = [0u8; 2];
        io.read_exact(&mut head).await?;
        let opcode = head[0] & 0x0f;
        let mut len = u64::from(head[1] & 0x7f);
        if len == 126 {
            len = u64::from(io.read_u16().await?);
        } else if len == 127 {
            len = io.read_u64().await?;
        }
        let mut mask = [0u8; 4];
        if head[1] & 0x80 != 0 {
            io.read_exact(&mut mask).await?;
        }
        let mut payload = vec![0u8; len.min(1 << 20) as usize];
        io.read_exact(&mut payload).await?;
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
        match opcode {
            0x8 => {
                io.write_all(&[0x88, 0]).await?;
                return Ok(());
            }
            0x1 => {
                let mut reply = b"echo: ".to_vec();
                reply.extend_from_slice(&payload);
                let mut frame = vec![0x81];
                if reply.len() < 126 {
                    frame.push(reply.len() as u8);
                } else {
                    frame.push(126);
                    frame.extend_from_slice(&(reply.len() as u16).to_be_bytes());
                }
                frame.extend_from_slice(&reply);
                io.write_all(&frame).await?;
            }
            _ => {}
        }
    }
}
