//! The console through its router, as a browser would use it: a real store in a temp
//! directory, the admin API merged in as `serve` does, requests driven with
//! `tower::ServiceExt::oneshot`, cookies carried by a tiny test browser, time from a
//! clock the test moves.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use tokio::sync::Notify;
use tower::ServiceExt;

use herald_shared::envelope::{
    Action, Audience, OpenSpec, OperatorKey, Order, Repeat, RunSpec, Statement,
};
use herald_shared::protocol::JobId;
use herald_shared::token::Token;
use herald_shared::Millis;

use super::{auth, ConsoleSettings, ConsoleState, Enrollment};
use crate::api::ApiState;
use crate::model::Role;
use crate::pki::Keyring;
use crate::relay::Relay;
use crate::store::{Store, TestJob};
use crate::ticket::Tickets;

const START: Millis = 1_800_000_000_000;
const PASSWORD: &str = "a good long password";

// === harness ===

struct Harness {
    router: Router,
    console: ConsoleState,
    store: Store,
    tickets: Tickets,
    scheduler: Arc<Notify>,
    clock: Arc<AtomicI64>,
    key: OperatorKey,
    dir: PathBuf,
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn harness_with(settings: ConsoleSettings) -> Harness {
    let dir = std::env::temp_dir().join(format!(
        "herald-console-{}",
        hex::encode(crate::random_bytes::<6>())
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let store = Store::open(&dir).unwrap();
    let tickets = Tickets::from_secret(b"console test key");
    let key = OperatorKey::from_seed([9; 32]);
    let relay = Relay::new(
        store.clone(),
        Arc::new(Keyring::new(Vec::new())),
        "https://127.0.0.1:1/api/v1/artifacts".into(),
        tickets.clone(),
    );
    let scheduler = Arc::new(Notify::new());
    let node = crate::cluster::Node::new(
        store.clone(),
        relay.clone(),
        "test".into(),
        "127.0.0.1:1".into(),
        "127.0.0.1:2".into(),
    );
    let api = ApiState {
        store: store.clone(),
        relay,
        node,
        scheduler: scheduler.clone(),
        operator_keys: Arc::new(vec![key.public()]),
        artifacts: dir.join("artifacts"),
        rollouts: Arc::new(Notify::new()),
        lists: dir.join("lists"),
        public_url: "https://herald.example.org:8443".into(),
        fallbacks: Arc::new(Notify::new()),
        sms_report_secret: None,
        fallback_media: Vec::new(),
        quic_serving: Arc::new(std::sync::atomic::AtomicBool::new(true)),
        install_site: Arc::new(crate::api::install::InstallSite::load(
            &dir,
            "https://herald.example.org:8443",
        )),
    };
    let clock = Arc::new(AtomicI64::new(START));
    let read = clock.clone();
    let console = ConsoleState::new(
        api.clone(),
        tickets.clone(),
        settings,
        Enrollment {
            server: "herald.example.org:4433".into(),
            ca_fingerprint: [7; 32],
            operator_keys: vec![key.public()],
        },
    )
    .with_clock(Arc::new(move || read.load(Ordering::SeqCst)));
    // Merged exactly as `serve` merges it.
    let router = crate::api::router(api).merge(super::router(console.clone()));
    Harness {
        router,
        console,
        store,
        tickets,
        scheduler,
        clock,
        key,
        dir,
    }
}

fn harness() -> Harness {
    harness_with(ConsoleSettings::default())
}

impl Harness {
    fn advance(&self, ms: i64) {
        self.clock.fetch_add(ms, Ordering::SeqCst);
    }

    fn now(&self) -> Millis {
        self.clock.load(Ordering::SeqCst)
    }

    fn browser(&self) -> Browser {
        Browser {
            router: self.router.clone(),
            cookies: HashMap::new(),
            address: "198.51.100.1:40000".parse().unwrap(),
        }
    }

    /// A registered, logged-in user.
    async fn user(&self, login: &str) -> (Browser, i64) {
        let mut browser = self.browser();
        let form = browser.get("/register").await;
        assert_eq!(form.status, StatusCode::OK, "{}", form.body);
        let csrf = form.csrf();
        let done = browser
            .post(
                "/register",
                &[
                    ("csrf", csrf.as_str()),
                    ("login", login),
                    ("password", PASSWORD),
                    ("password2", PASSWORD),
                    ("email", ""),
                    ("phone", ""),
                ],
            )
            .await;
        assert_eq!(done.status, StatusCode::SEE_OTHER, "{}", done.body);
        let id = self.store.user_by_login(login).unwrap().unwrap().id;
        (browser, id)
    }

    async fn admin(&self, login: &str) -> (Browser, i64) {
        let (browser, id) = self.user(login).await;
        self.store.set_role(id, Role::Admin).unwrap();
        (browser, id)
    }

    /// A device linked to `user` through a personal token, as "link a device" does.
    fn device(&self, user: i64, name: &str) -> String {
        let secret = hex::encode(crate::random_bytes::<8>());
        let hash = herald_shared::token::secret_hash(secret.as_bytes());
        self.store
            .add_user_token(&hash, user, 1, self.now() + 60_000, self.now())
            .unwrap();
        let public_key = crate::random_bytes::<32>();
        let id = herald_shared::agent_id(&public_key);
        self.store
            .enroll(&hash, &id, name, &public_key, "{}", self.now())
            .unwrap()
            .unwrap();
        id
    }

    /// Publishes a catalog entry: a program, or (`page`) the server's service page.
    fn entry(&self, name: &str, page: bool, min_interval_ms: u64) {
        let action = if page {
            Action::Open(OpenSpec {
                url: format!("https://herald.example.org:8443/service/{name}"),
                timeout_ms: 600_000,
            })
        } else {
            Action::Run(RunSpec {
                program: "/usr/bin/scan".into(),
                args: vec![],
                timeout_ms: 60_000,
                run_as: None,
            })
        };
        let order = Order {
            id: crate::random_bytes(),
            audience: Audience::All,
            issued_at: 0,
            not_before: 0,
            not_after: START * 2,
            repeat: Repeat::Standing { min_interval_ms },
            action,
        };
        let envelope = self.key.sign(&Statement::Order(order.clone())).unwrap();
        self.store
            .add_catalog_entry(
                name,
                &format!("Title of {name}"),
                "What it does",
                &envelope,
                &order,
                min_interval_ms,
                self.now(),
            )
            .unwrap();
    }

    /// A job of a catalog entry on a device, in a given state.
    fn job(&self, entry: &str, agent: &str, state: &str) -> JobId {
        let order = self.store.test_catalog_order(entry);
        self.store.insert_test_job(&TestJob {
            agent_id: agent,
            order_id: &order,
            schedule_id: None,
            state,
            created_at: self.now(),
            deliver_after: self.now(),
            expires_at: self.now() + 3_600_000,
            forward_pending: false,
            exit_code: None,
            stdout: None,
            error: None,
            finished_at: None,
        })
    }

    fn job_state(&self, job: JobId) -> (String, Option<String>, Option<String>) {
        self.store.test_job_state(job)
    }
}

struct Page {
    status: StatusCode,
    location: Option<String>,
    set_cookies: Vec<String>,
    headers: axum::http::HeaderMap,
    body: String,
}

impl Page {
    /// The first hidden `csrf` field of the page.
    fn csrf(&self) -> String {
        let marker = "name=\"csrf\" value=\"";
        let start = self.body.find(marker).expect("page has a csrf field") + marker.len();
        let end = self.body[start..].find('"').unwrap();
        self.body[start..start + end].to_string()
    }

    fn has_page_id(&self, id: &str) -> bool {
        self.body.contains(&format!("<main id=\"page-{id}\">"))
    }
}

/// Keeps cookies between requests, like a browser (ignoring paths: the server must
/// not rely on the browser to keep cookies apart).
struct Browser {
    router: Router,
    cookies: HashMap<String, String>,
    address: SocketAddr,
}

impl Browser {
    async fn send(&mut self, mut request: Request<Body>) -> Page {
        if !self.cookies.is_empty() {
            let cookie = self
                .cookies
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join("; ");
            request
                .headers_mut()
                .insert(header::COOKIE, cookie.parse().unwrap());
        }
        request.extensions_mut().insert(ConnectInfo(self.address));
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let set_cookies: Vec<String> = headers
            .get_all(header::SET_COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect();
        for cookie in &set_cookies {
            let (pair, attributes) = cookie.split_once(';').unwrap_or((cookie, ""));
            let (name, value) = pair.split_once('=').unwrap();
            if attributes.contains("Max-Age=0") {
                self.cookies.remove(name);
            } else {
                self.cookies.insert(name.to_string(), value.to_string());
            }
        }
        let body = response.into_body().collect().await.unwrap().to_bytes();
        Page {
            status,
            location: headers
                .get(header::LOCATION)
                .map(|v| v.to_str().unwrap().to_string()),
            set_cookies,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }

    async fn get(&mut self, path: &str) -> Page {
        self.send(Request::get(path).body(Body::empty()).unwrap())
            .await
    }

    async fn post(&mut self, path: &str, fields: &[(&str, &str)]) -> Page {
        let body = serde_urlencoded::to_string(fields).unwrap();
        self.send(
            Request::post(path)
                .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(Body::from(body))
                .unwrap(),
        )
        .await
    }

    /// Posts a form with the CSRF token of the page at `from`.
    async fn submit(&mut self, from: &str, path: &str, fields: &[(&str, &str)]) -> Page {
        let csrf = self.get(from).await.csrf();
        let mut all = vec![("csrf", csrf.as_str())];
        all.extend_from_slice(fields);
        self.post(path, &all).await
    }

    async fn login(&mut self, login: &str, password: &str) -> Page {
        let csrf = self.get("/login").await.csrf();
        self.post(
            "/login",
            &[("csrf", &csrf), ("login", login), ("password", password)],
        )
        .await
    }
}

// === accounts and sessions ===

#[tokio::test]
async fn register_then_log_out_and_in_again() {
    let h = harness();
    let mut anonymous = h.browser();
    let page = anonymous.get("/devices").await;
    assert_eq!(page.status, StatusCode::SEE_OTHER);
    assert_eq!(page.location.as_deref(), Some("/login"));
    assert_eq!(anonymous.get("/").await.location.as_deref(), Some("/login"));

    let (mut ann, id) = h.user("ann").await;
    assert_eq!(
        h.store.user(id).unwrap().role,
        Role::User,
        "not admin by itself"
    );
    let devices = ann.get("/devices").await;
    assert_eq!(devices.status, StatusCode::OK);
    assert!(devices.has_page_id("devices"), "{}", devices.body);
    assert!(!devices.body.contains("id=\"nav-admin\""));
    assert_eq!(ann.get("/").await.location.as_deref(), Some("/devices"));
    // The session cookie is what the contract says.
    let session_cookie = ann.cookies.get(auth::SESSION_COOKIE).unwrap().clone();
    assert_eq!(session_cookie.len(), 64);

    let out = ann.submit("/devices", "/logout", &[]).await;
    assert_eq!(out.status, StatusCode::SEE_OTHER);
    assert!(!ann.cookies.contains_key(auth::SESSION_COOKIE));
    // The old cookie is dead on the server too, not only forgotten by the browser.
    ann.cookies
        .insert(auth::SESSION_COOKIE.into(), session_cookie);
    assert_eq!(ann.get("/devices").await.status, StatusCode::SEE_OTHER);

    let wrong = ann.login("ann", "not the password").await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert!(wrong.body.contains("id=\"error\""));
    let right = ann.login("ann", PASSWORD).await;
    assert_eq!(right.status, StatusCode::SEE_OTHER);
    assert_eq!(right.location.as_deref(), Some("/devices"));
    let cookie = right
        .set_cookies
        .iter()
        .find(|c| c.starts_with("__Host-herald_session="))
        .unwrap();
    // `__Host-` cookies need Secure, Path=/ and no Domain, or browsers drop them.
    for attribute in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
        assert!(cookie.contains(attribute), "{cookie}");
    }
    assert!(!cookie.contains("Domain"), "{cookie}");
    let csrf_cookie = anonymous.get("/login").await.set_cookies.join("\n");
    assert!(
        csrf_cookie.starts_with("__Host-herald_csrf=")
            && csrf_cookie.contains("Secure")
            && csrf_cookie.ends_with("Path=/")
            && !csrf_cookie.contains("Domain"),
        "{csrf_cookie}"
    );
    assert_eq!(ann.get("/account").await.status, StatusCode::OK);
}

#[tokio::test]
async fn registration_validates_and_can_be_closed() {
    let h = harness();
    let mut browser = h.browser();
    let csrf = browser.get("/register").await.csrf();
    for (login, password, password2, email) in [
        ("A", PASSWORD, PASSWORD, ""),
        ("ann", "short", "short", ""),
        ("ann", PASSWORD, "another long password", ""),
        ("ann", PASSWORD, PASSWORD, "not-an-address"),
    ] {
        let page = browser
            .post(
                "/register",
                &[
                    ("csrf", &csrf),
                    ("login", login),
                    ("password", password),
                    ("password2", password2),
                    ("email", email),
                ],
            )
            .await;
        assert_eq!(page.status, StatusCode::BAD_REQUEST, "{login} {password}");
        assert!(page.body.contains("<p class=\"error\" id=\"error\">"));
        assert!(page.has_page_id("register"));
    }
    assert!(h.store.users().unwrap().is_empty());
    h.user("ann").await;
    let taken = browser
        .post(
            "/register",
            &[
                ("csrf", &csrf),
                ("login", "ann"),
                ("password", PASSWORD),
                ("password2", PASSWORD),
            ],
        )
        .await;
    assert_eq!(taken.status, StatusCode::BAD_REQUEST);

    let closed = harness_with(ConsoleSettings {
        registration: false,
    });
    let mut browser = closed.browser();
    assert_eq!(browser.get("/register").await.status, StatusCode::FORBIDDEN);
    let csrf = browser.get("/login").await.csrf();
    let page = browser
        .post(
            "/register",
            &[
                ("csrf", &csrf),
                ("login", "ann"),
                ("password", PASSWORD),
                ("password2", PASSWORD),
            ],
        )
        .await;
    assert_eq!(page.status, StatusCode::FORBIDDEN);
    assert!(closed.store.users().unwrap().is_empty());
}

#[tokio::test]
async fn every_page_sends_the_security_headers() {
    let h = harness();
    let (mut ann, _) = h.user("ann").await;
    for path in ["/login", "/devices", "/nowhere", "/static/console.css"] {
        let page = ann.get(path).await;
        let headers = &page.headers;
        assert_eq!(
            headers["content-security-policy"],
            "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
            "{path}"
        );
        assert_eq!(headers["x-content-type-options"], "nosniff");
        assert_eq!(headers["referrer-policy"], "no-referrer");
        assert_eq!(headers["strict-transport-security"], "max-age=31536000");
    }
    let page = ann.get("/devices").await;
    assert!(page.body.contains("name=\"viewport\""));
    assert!(!page.body.contains("<script"));
    assert!(!page.body.contains("http://") && !page.body.contains("https://"));
}

#[tokio::test]
async fn forms_without_the_right_csrf_token_are_refused() {
    let h = harness();
    let (mut ann, id) = h.user("ann").await;
    for fields in [vec![], vec![("csrf", "0".repeat(64))]] {
        let mut all: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
        all.extend([("kind", "email"), ("target", "ann@example.org")]);
        let page = ann.post("/forwarding", &all).await;
        assert_eq!(page.status, StatusCode::FORBIDDEN);
        assert!(page.body.contains("CSRF token missing or wrong"));
    }
    assert!(h.store.destinations(id).unwrap().is_empty());
    // A session's token is not the login form's: the login form checks its cookie.
    let mut other = h.browser();
    let page = other
        .post("/login", &[("login", "ann"), ("password", PASSWORD)])
        .await;
    assert_eq!(page.status, StatusCode::FORBIDDEN);
    assert!(page.body.contains("CSRF token missing or wrong"));
    // Log-out needs it too.
    let page = ann.post("/logout", &[]).await;
    assert_eq!(page.status, StatusCode::FORBIDDEN);
    assert_eq!(ann.get("/devices").await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_password_change_ends_the_other_sessions() {
    let h = harness();
    let (mut first, _) = h.user("ann").await;
    let mut second = h.browser();
    assert_eq!(
        second.login("ann", PASSWORD).await.status,
        StatusCode::SEE_OTHER
    );
    let wrong = first
        .submit(
            "/account",
            "/account/password",
            &[
                ("current", "not it at all"),
                ("password", "a new long password"),
                ("password2", "a new long password"),
            ],
        )
        .await;
    assert_eq!(wrong.status, StatusCode::BAD_REQUEST);
    assert_eq!(second.get("/devices").await.status, StatusCode::OK);
    let changed = first
        .submit(
            "/account",
            "/account/password",
            &[
                ("current", PASSWORD),
                ("password", "a new long password"),
                ("password2", "a new long password"),
            ],
        )
        .await;
    assert_eq!(changed.status, StatusCode::SEE_OTHER, "{}", changed.body);
    assert_eq!(second.get("/devices").await.status, StatusCode::SEE_OTHER);
    assert_eq!(first.get("/devices").await.status, StatusCode::OK);
    assert_eq!(
        second.login("ann", "a new long password").await.status,
        StatusCode::SEE_OTHER
    );
}

#[tokio::test]
async fn sessions_end_after_twelve_idle_hours() {
    let h = harness();
    let (mut ann, _) = h.user("ann").await;
    h.advance(11 * 3600 * 1000);
    assert_eq!(ann.get("/devices").await.status, StatusCode::OK);
    h.advance(11 * 3600 * 1000);
    assert_eq!(
        ann.get("/devices").await.status,
        StatusCode::OK,
        "activity extends it"
    );
    h.advance(auth::SESSION_IDLE_MS);
    assert_eq!(ann.get("/devices").await.status, StatusCode::SEE_OTHER);
}

#[tokio::test]
async fn sessions_end_seven_days_after_login_however_active() {
    let h = harness();
    let (mut ann, _) = h.user("ann").await;
    let step = 11 * 3600 * 1000;
    let mut elapsed = 0;
    while elapsed + step < auth::SESSION_MAX_AGE_MS {
        h.advance(step);
        elapsed += step;
        assert_eq!(
            ann.get("/devices").await.status,
            StatusCode::OK,
            "after {elapsed} ms"
        );
    }
    h.advance(auth::SESSION_MAX_AGE_MS - elapsed);
    assert_eq!(ann.get("/devices").await.status, StatusCode::SEE_OTHER);
}

// === throttling ===

#[tokio::test]
async fn five_failures_lock_an_account_even_against_the_right_password() {
    let h = harness();
    h.user("ann").await;
    let mut attacker = h.browser();
    for _ in 0..5 {
        let page = attacker.login("ann", "guess guess guess").await;
        assert_eq!(page.status, StatusCode::UNAUTHORIZED);
    }
    let locked = attacker.login("ann", PASSWORD).await;
    assert_eq!(locked.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(locked.body.contains("too many failed logins"));
    // The owner, from elsewhere, is locked out as well until the window passes.
    let mut owner = h.browser();
    owner.address = "203.0.113.9:1".parse().unwrap();
    assert_eq!(
        owner.login("ann", PASSWORD).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    h.advance(auth::LOCK_MS - 1);
    assert_eq!(
        owner.login("ann", PASSWORD).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    h.advance(1);
    assert_eq!(
        owner.login("ann", PASSWORD).await.status,
        StatusCode::SEE_OTHER
    );
}

#[tokio::test]
async fn unknown_logins_lock_the_same_way() {
    let h = harness();
    let mut attacker = h.browser();
    for _ in 0..5 {
        assert_eq!(
            attacker.login("ghost", "guess guess guess").await.status,
            StatusCode::UNAUTHORIZED
        );
    }
    assert_eq!(
        attacker.login("ghost", "guess guess guess").await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[tokio::test]
async fn an_address_with_twenty_failures_is_refused() {
    let h = harness();
    h.user("ann").await;
    let mut attacker = h.browser();
    attacker.address = "192.0.2.66:5000".parse().unwrap();
    // Four failures each on five logins: no account locks, the address does.
    for n in 0..20 {
        let login = format!("victim{}", n % 5);
        assert_eq!(
            attacker.login(&login, "guess guess guess").await.status,
            StatusCode::UNAUTHORIZED
        );
    }
    assert_eq!(
        attacker.login("ann", PASSWORD).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    let mut elsewhere = h.browser();
    elsewhere.address = "192.0.2.67:5000".parse().unwrap();
    assert_eq!(
        elsewhere.login("ann", PASSWORD).await.status,
        StatusCode::SEE_OTHER
    );
    h.advance(auth::ADDRESS_WINDOW_MS);
    assert_eq!(
        attacker.login("ann", PASSWORD).await.status,
        StatusCode::SEE_OTHER
    );
}

/// Posts one login form from each of several browsers (one per attempt, all from the
/// same address) at once.
async fn parallel_logins(h: &Harness, attempts: &[(&str, &str)]) -> Vec<StatusCode> {
    let mut browsers = Vec::new();
    for _ in attempts {
        let mut browser = h.browser();
        let csrf = browser.get("/login").await.csrf();
        browsers.push((browser, csrf));
    }
    let posts =
        browsers
            .iter_mut()
            .zip(attempts)
            .map(|((browser, csrf), (login, password))| async move {
                browser
                    .post(
                        "/login",
                        &[
                            ("csrf", csrf.as_str()),
                            ("login", login),
                            ("password", password),
                        ],
                    )
                    .await
            });
    futures_util::future::join_all(posts)
        .await
        .into_iter()
        .map(|page| page.status)
        .collect()
}

#[tokio::test]
async fn parallel_guesses_get_at_most_five_checks_and_lock_the_login() {
    let h = harness();
    h.user("ann").await;
    for login in ["ann", "ghost"] {
        // Twelve wrong guesses at once and the right password right behind them, in
        // rounds: the lock must hold however the attempts overlap.
        let mut burst = vec![(login, "guess guess guess"); 12];
        burst.push((login, PASSWORD));
        let mut checked = 0;
        for round in 0..8 {
            let statuses = parallel_logins(&h, &burst).await;
            for status in &statuses {
                assert!(
                    *status == StatusCode::UNAUTHORIZED || *status == StatusCode::TOO_MANY_REQUESTS,
                    "{login}, round {round}: {statuses:?}"
                );
            }
            checked += statuses
                .iter()
                .filter(|s| **s == StatusCode::UNAUTHORIZED)
                .count();
        }
        assert!(checked <= 5, "{checked} guesses on {login} were checked");
        // Locked: the right password, alone and from elsewhere, is refused.
        let mut owner = h.browser();
        owner.address = "203.0.113.9:1".parse().unwrap();
        assert_eq!(
            owner.login(login, PASSWORD).await.status,
            StatusCode::TOO_MANY_REQUESTS,
            "{login}"
        );
    }
}

#[tokio::test]
async fn wrong_current_passwords_count_as_failed_logins() {
    let h = harness();
    let (mut ann, _) = h.user("ann").await;
    let change = |current: &'static str| {
        [
            ("current", current),
            ("password", "a new long password"),
            ("password2", "a new long password"),
        ]
    };
    for _ in 0..auth::MAX_ACCOUNT_FAILURES {
        let page = ann
            .submit("/account", "/account/password", &change("not it at all"))
            .await;
        assert_eq!(page.status, StatusCode::BAD_REQUEST);
        assert!(page.body.contains("the current password is wrong"));
    }
    let locked = ann
        .submit("/account", "/account/password", &change(PASSWORD))
        .await;
    assert_eq!(
        locked.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        locked.body
    );
    let mut elsewhere = h.browser();
    elsewhere.address = "203.0.113.9:1".parse().unwrap();
    assert_eq!(
        elsewhere.login("ann", PASSWORD).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    h.advance(auth::LOCK_MS);
    let changed = ann
        .submit("/account", "/account/password", &change(PASSWORD))
        .await;
    assert_eq!(changed.status, StatusCode::SEE_OTHER, "{}", changed.body);
}

#[tokio::test]
async fn a_full_hashing_queue_answers_at_once() {
    let h = harness();
    h.user("ann").await;
    let mut places = Vec::new();
    while let Ok(place) = h.console.guard.queue() {
        places.push(place);
    }
    let mut browser = h.browser();
    let page = browser.login("ann", PASSWORD).await;
    assert_eq!(page.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(page.body.contains("busy"), "{}", page.body);
    // A refusal for load is no failed login.
    drop(places);
    assert_eq!(
        browser.login("ann", PASSWORD).await.status,
        StatusCode::SEE_OTHER
    );
}

#[tokio::test]
async fn malformed_logins_are_wrong_without_being_tracked() {
    let h = harness();
    h.user("ann").await;
    let mut attacker = h.browser();
    let huge = "x".repeat(60_000);
    for _ in 0..(auth::MAX_ADDRESS_FAILURES + 5) {
        for login in [huge.as_str(), "ann!", "a b", "é-é-é"] {
            let page = attacker.login(login, "guess guess guess").await;
            assert_eq!(page.status, StatusCode::UNAUTHORIZED);
            assert!(page.body.contains("wrong login or password"));
        }
    }
    assert_eq!(h.console.guard.tracked_unknown(), 0);
    // Nor do they count against the address.
    assert_eq!(
        attacker.login("ann", PASSWORD).await.status,
        StatusCode::SEE_OTHER
    );
}

#[tokio::test]
async fn overlong_form_fields_are_refused_with_400() {
    let h = harness();
    let (mut ann, ann_id) = h.user("ann").await;
    let long_name = "n".repeat(101);
    let long_email = format!("{}@example.org", "a".repeat(250));
    let long_phone = format!("+{}", "1".repeat(20));
    for (field, value) in [
        ("display_name", long_name.as_str()),
        ("email", long_email.as_str()),
        ("phone", long_phone.as_str()),
    ] {
        let page = ann.submit("/account", "/account", &[(field, value)]).await;
        assert_eq!(page.status, StatusCode::BAD_REQUEST, "{field}");
        assert!(
            page.body.contains("id=\"error\"") && page.body.contains(field),
            "{field}: {}",
            page.body
        );
    }
    assert_eq!(h.store.user(ann_id).unwrap().display_name, "");
    let long_password = "p".repeat(1025);
    let page = ann
        .submit(
            "/account",
            "/account/password",
            &[
                ("current", long_password.as_str()),
                ("password", "a new long password"),
                ("password2", "a new long password"),
            ],
        )
        .await;
    assert_eq!(page.status, StatusCode::BAD_REQUEST);
    assert!(page.body.contains("current"));
    let mut other = h.browser();
    let csrf = other.get("/register").await.csrf();
    let page = other
        .post(
            "/register",
            &[
                ("csrf", csrf.as_str()),
                ("login", "bob"),
                ("password", long_password.as_str()),
                ("password2", long_password.as_str()),
            ],
        )
        .await;
    assert_eq!(page.status, StatusCode::BAD_REQUEST);
    assert!(h.store.user_by_login("bob").unwrap().is_none());
}

// === isolation between users ===

#[tokio::test]
async fn another_users_objects_answer_404_and_are_not_listed() {
    let h = harness();
    let (mut ann, ann_id) = h.user("ann").await;
    let (mut bob, _) = h.user("bob").await;
    h.entry("scan", false, 60_000);
    let device = h.device(ann_id, "ann-laptop");
    let bob_device = h.device(h.store.user_by_login("bob").unwrap().unwrap().id, "bob-pc");

    let made = ann
        .submit(
            "/catalog/scan",
            "/subscriptions",
            &[
                ("entry", "scan"),
                ("device", &device),
                ("kind", "every"),
                ("every", "1h"),
            ],
        )
        .await;
    assert_eq!(made.status, StatusCode::SEE_OTHER, "{}", made.body);
    let subscription = h.store.service_subscriptions(Some(ann_id)).unwrap()[0].id;
    let rule = ann
        .submit(
            "/forwarding",
            "/forwarding",
            &[("kind", "email"), ("target", "ann@example.org")],
        )
        .await;
    assert_eq!(rule.status, StatusCode::SEE_OTHER, "{}", rule.body);
    let destination = h.store.destinations(ann_id).unwrap()[0].id;
    let job = h.job("scan", &device, "succeeded");

    // Every GET and POST that names one of ann's objects: 404 for bob, exactly as for
    // an object that does not exist.
    let sub = subscription.to_string();
    let gets = [
        format!("/devices/{device}"),
        format!("/subscriptions/{sub}"),
        format!("/history/{job}"),
    ];
    for path in &gets {
        let page = bob.get(path).await;
        assert_eq!(page.status, StatusCode::NOT_FOUND, "{path}");
        assert!(!page.body.contains("ann-laptop") && !page.body.contains("Title of scan"));
    }
    for path in ["/devices/nope", "/subscriptions/999999", "/history/999999"] {
        assert_eq!(bob.get(path).await.status, StatusCode::NOT_FOUND, "{path}");
    }
    let posts = [
        (
            format!("/subscriptions/{sub}"),
            vec![("kind", "every"), ("every", "2h")],
        ),
        (format!("/subscriptions/{sub}/delete"), vec![]),
        (format!("/forwarding/{destination}/delete"), vec![]),
    ];
    for (path, fields) in &posts {
        let page = bob.submit("/devices", path, fields).await;
        assert_eq!(page.status, StatusCode::NOT_FOUND, "{path}");
    }
    // Nothing of ann's changed.
    let still = h.store.service_subscription(subscription).unwrap();
    assert_eq!(still.when, "every 1h");
    assert_eq!(h.store.destinations(ann_id).unwrap().len(), 1);

    // Bob cannot use ann's device or subscription in his own forms either.
    let page = bob
        .submit(
            "/catalog/scan",
            "/subscriptions",
            &[
                ("entry", "scan"),
                ("device", &device),
                ("kind", "every"),
                ("every", "1h"),
            ],
        )
        .await;
    assert_eq!(page.status, StatusCode::BAD_REQUEST);
    assert_eq!(h.store.service_subscriptions(None).unwrap().len(), 1);
    let page = bob
        .submit(
            "/forwarding",
            "/forwarding",
            &[
                ("kind", "email"),
                ("target", "bob@example.org"),
                ("subscription", &sub),
            ],
        )
        .await;
    assert_eq!(page.status, StatusCode::BAD_REQUEST);

    // Bob's lists show only his own.
    for path in ["/devices", "/subscriptions", "/history", "/forwarding"] {
        let page = bob.get(path).await;
        assert_eq!(page.status, StatusCode::OK, "{path}");
        assert!(!page.body.contains(&device), "{path}");
        assert!(!page.body.contains(&format!("data-subscription=\"{sub}\"")));
        assert!(!page.body.contains(&format!("data-job=\"{job}\"")));
        assert!(!page
            .body
            .contains(&format!("data-destination=\"{destination}\"")));
        assert!(!page.body.contains("ann@example.org"));
    }
    assert!(bob.get("/devices").await.body.contains(&bob_device));

    // Ann sees all of it, and so does an admin.
    for path in &gets {
        assert_eq!(ann.get(path).await.status, StatusCode::OK, "{path}");
    }
    assert!(ann
        .get("/history")
        .await
        .body
        .contains(&format!("data-job=\"{job}\" data-state=\"succeeded\"")));
    let (mut admin, _) = h.admin("root").await;
    for path in &gets {
        assert_eq!(admin.get(path).await.status, StatusCode::OK, "{path}");
    }
    // Only the owner deletes a forwarding rule.
    let page = admin
        .submit(
            "/devices",
            &format!("/forwarding/{destination}/delete"),
            &[],
        )
        .await;
    assert_eq!(page.status, StatusCode::NOT_FOUND);
    let page = ann
        .submit(
            "/forwarding",
            &format!("/forwarding/{destination}/delete"),
            &[],
        )
        .await;
    assert_eq!(page.status, StatusCode::SEE_OTHER);
    assert!(h.store.destinations(ann_id).unwrap().is_empty());
}

// === subscriptions ===

#[tokio::test]
async fn subscribing_checks_the_timing_and_wakes_the_scheduler() {
    let h = harness();
    let (mut ann, ann_id) = h.user("ann").await;
    h.entry("scan", false, 60_000);
    let device = h.device(ann_id, "ann-laptop");
    let catalog = ann.get("/catalog").await;
    assert!(catalog.body.contains("<li data-entry=\"scan\">"));
    let too_often = ann
        .submit(
            "/catalog/scan",
            "/subscriptions",
            &[
                ("entry", "scan"),
                ("device", &device),
                ("kind", "every"),
                ("every", "10s"),
            ],
        )
        .await;
    assert_eq!(too_often.status, StatusCode::BAD_REQUEST);
    assert!(too_often.has_page_id("entry"));
    assert!(
        too_often.body.contains("at most once every 1m"),
        "{}",
        too_often.body
    );
    let bad_cron = ann
        .submit(
            "/catalog/scan",
            "/subscriptions",
            &[
                ("entry", "scan"),
                ("device", &device),
                ("kind", "cron"),
                ("cron", "* * * * * *"),
            ],
        )
        .await;
    assert_eq!(bad_cron.status, StatusCode::BAD_REQUEST);
    assert!(h.store.service_subscriptions(None).unwrap().is_empty());

    let ok = ann
        .submit(
            "/catalog/scan",
            "/subscriptions",
            &[
                ("entry", "scan"),
                ("device", &device),
                ("kind", "cron"),
                ("cron", "0 3 * * *"),
                ("tz", "Europe/Berlin"),
                ("missed", "run-once"),
            ],
        )
        .await;
    assert_eq!(ok.status, StatusCode::SEE_OTHER, "{}", ok.body);
    tokio::time::timeout(std::time::Duration::from_secs(1), h.scheduler.notified())
        .await
        .expect("the scheduler was told");
    let subs = h.store.service_subscriptions(Some(ann_id)).unwrap();
    assert_eq!(subs.len(), 1);
    assert_eq!(subs[0].target, format!("agent:{device}"));
    assert!(subs[0].next_fire_at.unwrap() > h.now());
    let list = ann.get("/subscriptions").await;
    assert!(list
        .body
        .contains(&format!("data-subscription=\"{}\"", subs[0].id)));

    let path = format!("/subscriptions/{}", subs[0].id);
    let edited = ann
        .submit(&path, &path, &[("kind", "every"), ("every", "2h")])
        .await;
    assert_eq!(edited.status, StatusCode::SEE_OTHER);
    assert_eq!(
        h.store.service_subscription(subs[0].id).unwrap().when,
        "every 2h"
    );
    let deleted = ann.submit(&path, &format!("{path}/delete"), &[]).await;
    assert_eq!(deleted.status, StatusCode::SEE_OTHER);
    assert!(h.store.service_subscriptions(None).unwrap().is_empty());
}

#[tokio::test]
async fn linking_a_device_makes_a_personal_one_use_token() {
    let h = harness();
    let (mut ann, ann_id) = h.user("ann").await;
    let page = ann.submit("/devices", "/devices/link", &[]).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.has_page_id("link"));
    let marker = "<code id=\"enroll-token\">";
    let start = page.body.find(marker).unwrap() + marker.len();
    let end = page.body[start..].find("</code>").unwrap();
    let text = &page.body[start..start + end];
    assert!(page.body.contains(&format!("herald-agent enroll {text}")));
    let token = Token::decode(text).unwrap();
    assert_eq!(token.server, "herald.example.org:4433");
    assert_eq!(token.ca_fingerprint, [7; 32]);
    assert_eq!(token.operator_keys, vec![h.key.public()]);
    let key = crate::random_bytes::<32>();
    let agent = herald_shared::agent_id(&key);
    let grant = h
        .store
        .enroll(&token.secret_hash(), &agent, "new-pc", &key, "{}", h.now())
        .unwrap();
    assert!(grant.is_some());
    assert_eq!(h.store.agent_owner(&agent).unwrap(), Some(ann_id));
    assert!(ann
        .get("/devices")
        .await
        .body
        .contains(&format!("<tr data-agent=\"{agent}\">")));
    // One use only.
    let other = crate::random_bytes::<32>();
    let again = h.store.enroll(
        &token.secret_hash(),
        &herald_shared::agent_id(&other),
        "second",
        &other,
        "{}",
        h.now(),
    );
    assert!(matches!(again, Ok(None)));
}

// === browser services ===

#[tokio::test]
async fn a_ticket_opens_the_service_page_once() {
    let h = harness();
    let (_, ann_id) = h.user("ann").await;
    h.entry("confirm", true, 60_000);
    let device = h.device(ann_id, "ann-laptop");
    let job = h.job("confirm", &device, "delivered");
    let ticket = h.tickets.mint(job, h.now() + 600_000);

    let mut visitor = h.browser();
    let redeemed = visitor
        .get(&format!("/service/confirm?herald_ticket={ticket}"))
        .await;
    assert_eq!(redeemed.status, StatusCode::SEE_OTHER, "{}", redeemed.body);
    let next = format!("/service/confirm?job={job}");
    assert_eq!(redeemed.location.as_deref(), Some(next.as_str()));
    let cookie = redeemed
        .set_cookies
        .iter()
        .find(|c| c.starts_with(&format!("herald_visit_{job}=")))
        .unwrap();
    assert!(
        cookie.ends_with("Path=/service/confirm")
            && cookie.contains("HttpOnly")
            && cookie.contains("Secure"),
        "{cookie}"
    );
    let page = visitor.get(&next).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.has_page_id("service"));
    assert!(page.body.contains("Title of confirm") && page.body.contains("What it does"));

    // The same link again, from anywhere: refused.
    for browser in [&mut h.browser(), &mut visitor] {
        let again = browser
            .get(&format!("/service/confirm?herald_ticket={ticket}"))
            .await;
        assert_eq!(again.status, StatusCode::FORBIDDEN);
        assert!(again.body.contains("this link was already used"));
    }

    let csrf = page.csrf();
    let without = visitor
        .post(
            "/service/confirm",
            &[("job", &job.to_string()), ("outcome", "done")],
        )
        .await;
    assert_eq!(without.status, StatusCode::FORBIDDEN);
    let done = visitor
        .post(
            "/service/confirm",
            &[
                ("csrf", &csrf),
                ("job", &job.to_string()),
                ("outcome", "done"),
                ("note", "all good"),
            ],
        )
        .await;
    assert_eq!(done.status, StatusCode::SEE_OTHER, "{}", done.body);
    assert_eq!(
        h.job_state(job),
        ("succeeded".into(), None, Some("done: all good".into()))
    );
    let thanks = visitor.get(&next).await;
    assert!(thanks.body.contains("id=\"thanks\""));
    assert!(!thanks.body.contains("id=\"service-form\""));
    // Answering twice does not change the outcome.
    let twice = visitor
        .post(
            "/service/confirm",
            &[
                ("csrf", &csrf),
                ("job", &job.to_string()),
                ("outcome", "declined"),
            ],
        )
        .await;
    assert_eq!(twice.status, StatusCode::CONFLICT);
    assert_eq!(h.job_state(job).0, "succeeded");
}

#[tokio::test]
async fn two_tickets_in_one_browser_keep_both_visits() {
    let h = harness();
    let (_, ann_id) = h.user("ann").await;
    h.entry("confirm", true, 60_000);
    let device = h.device(ann_id, "ann-laptop");
    let jobs = [
        h.job("confirm", &device, "delivered"),
        h.job("confirm", &device, "delivered"),
    ];
    let mut visitor = h.browser();
    for job in jobs {
        let ticket = h.tickets.mint(job, h.now() + 600_000);
        let redeemed = visitor
            .get(&format!("/service/confirm?herald_ticket={ticket}"))
            .await;
        assert_eq!(redeemed.status, StatusCode::SEE_OTHER, "{}", redeemed.body);
    }
    for job in jobs {
        let page = visitor.get(&format!("/service/confirm?job={job}")).await;
        assert_eq!(page.status, StatusCode::OK, "job {job}: {}", page.body);
        let done = visitor
            .post(
                "/service/confirm",
                &[
                    ("csrf", page.csrf().as_str()),
                    ("job", &job.to_string()),
                    ("outcome", "done"),
                ],
            )
            .await;
        assert_eq!(done.status, StatusCode::SEE_OTHER, "{}", done.body);
        assert_eq!(h.job_state(job).0, "succeeded");
    }
}

#[tokio::test]
async fn a_visit_cookie_admits_only_its_own_job() {
    let h = harness();
    let (_, ann_id) = h.user("ann").await;
    h.entry("confirm", true, 60_000);
    h.entry("other", true, 60_000);
    let device = h.device(ann_id, "ann-laptop");
    let mine = h.job("confirm", &device, "waiting");
    let theirs = h.job("confirm", &device, "waiting");
    let mut visitor = h.browser();
    let ticket = h.tickets.mint(mine, h.now() + 600_000);
    // A ticket works only on its own entry's page.
    let wrong_entry = visitor
        .get(&format!("/service/other?herald_ticket={ticket}"))
        .await;
    assert_eq!(wrong_entry.status, StatusCode::FORBIDDEN);
    let redeemed = visitor
        .get(&format!("/service/confirm?herald_ticket={ticket}"))
        .await;
    assert_eq!(redeemed.status, StatusCode::SEE_OTHER);
    let csrf = visitor
        .get(&format!("/service/confirm?job={mine}"))
        .await
        .csrf();

    let other_page = visitor.get(&format!("/service/confirm?job={theirs}")).await;
    assert_eq!(other_page.status, StatusCode::FORBIDDEN);
    assert!(!other_page.body.contains("service-form"));
    let answer = visitor
        .post(
            "/service/confirm",
            &[
                ("csrf", &csrf),
                ("job", &theirs.to_string()),
                ("outcome", "done"),
            ],
        )
        .await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    assert_eq!(h.job_state(theirs).0, "waiting");
    // No cookie at all: no page.
    assert_eq!(
        h.browser()
            .get(&format!("/service/confirm?job={mine}"))
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    // Forged and expired tickets.
    let forged = Tickets::from_secret(b"someone else").mint(theirs, h.now() + 600_000);
    let expired = h.tickets.mint(theirs, h.now() - 1);
    for bad in [forged, expired, "garbage".to_string()] {
        let page = h
            .browser()
            .get(&format!("/service/confirm?herald_ticket={bad}"))
            .await;
        assert_eq!(page.status, StatusCode::FORBIDDEN, "{bad}");
    }
    assert_eq!(h.job_state(theirs).0, "waiting");
}

#[tokio::test]
async fn external_services_post_the_outcome_once_without_the_admin_token() {
    let h = harness();
    let (_, ann_id) = h.user("ann").await;
    h.entry("confirm", true, 60_000);
    let device = h.device(ann_id, "ann-laptop");
    let job = h.job("confirm", &device, "running");
    let ticket = h.tickets.mint(job, h.now() + 600_000);
    let post = |body: serde_json::Value| {
        Request::post("/api/v1/visits")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_string()))
            .unwrap()
    };
    let mut browser = h.browser();
    let page = browser
        .send(post(serde_json::json!({
            "ticket": ticket, "outcome": "declined", "note": "not now"
        })))
        .await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    let done: serde_json::Value = serde_json::from_str(&page.body).unwrap();
    assert_eq!(done["state"], "failed");
    assert_eq!(
        h.job_state(job),
        (
            "failed".into(),
            Some("declined by the user: not now".into()),
            Some("declined: not now".into())
        )
    );
    let again = browser
        .send(post(
            serde_json::json!({"ticket": ticket, "outcome": "done"}),
        ))
        .await;
    assert_eq!(again.status, StatusCode::FORBIDDEN);
    assert_eq!(h.job_state(job).0, "failed");
    let forged = browser
        .send(post(
            serde_json::json!({"ticket": "v1.1.2.00", "outcome": "done"}),
        ))
        .await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    // The rest of the API still wants the admin token.
    let api = browser.get("/api/v1/agents").await;
    assert_eq!(api.status, StatusCode::UNAUTHORIZED);
}

// === admin ===

#[tokio::test]
async fn admin_pages_refuse_plain_users() {
    let h = harness();
    let (mut ann, ann_id) = h.user("ann").await;
    let device = h.device(ann_id, "ann-laptop");
    h.entry("scan", false, 60_000);
    let job = h.job("scan", &device, "queued");
    let gets = [
        "/admin/agents".to_string(),
        format!("/admin/agents/{device}"),
        "/admin/jobs".to_string(),
        format!("/admin/jobs/{job}"),
        "/admin/schedules".to_string(),
        "/admin/users".to_string(),
    ];
    for path in &gets {
        assert_eq!(ann.get(path).await.status, StatusCode::FORBIDDEN, "{path}");
    }
    let posts = [
        (
            format!("/admin/users/{ann_id}/role"),
            vec![("role", "admin")],
        ),
        (format!("/admin/jobs/{job}/cancel"), vec![]),
        (format!("/admin/agents/{device}/revoke"), vec![]),
        (
            "/admin/schedules".to_string(),
            vec![
                ("entry", "scan"),
                ("target", "all"),
                ("kind", "every"),
                ("every", "1h"),
            ],
        ),
    ];
    for (path, fields) in &posts {
        let page = ann.submit("/devices", path, fields).await;
        assert_eq!(page.status, StatusCode::FORBIDDEN, "{path}");
    }
    assert_eq!(h.store.user(ann_id).unwrap().role, Role::User);
    assert_eq!(h.job_state(job).0, "queued");
    assert!(h.store.agent_active(&device).unwrap());
    assert!(h.store.service_subscriptions(None).unwrap().is_empty());

    let (mut root, _) = h.admin("root").await;
    for path in &gets {
        let page = root.get(path).await;
        assert_eq!(page.status, StatusCode::OK, "{path}");
    }
    let agents = root.get("/admin/agents").await;
    assert!(agents.has_page_id("admin-agents"));
    assert!(agents.body.contains(&format!("data-agent=\"{device}\"")));
    assert!(agents.body.contains("id=\"nav-admin\""));
}

#[tokio::test]
async fn admins_cancel_jobs_revoke_agents_schedule_entries_and_set_roles() {
    let h = harness();
    let (_, ann_id) = h.user("ann").await;
    let (mut root, _) = h.admin("root").await;
    let device = h.device(ann_id, "ann-laptop");
    h.entry("scan", false, 60_000);
    let job = h.job("scan", &device, "running");
    let done = h.job("scan", &device, "succeeded");

    let page = root
        .submit("/admin/jobs", &format!("/admin/jobs/{job}/cancel"), &[])
        .await;
    assert_eq!(page.status, StatusCode::SEE_OTHER);
    assert_eq!(h.job_state(job).0, "canceled");
    root.submit("/admin/jobs", &format!("/admin/jobs/{done}/cancel"), &[])
        .await;
    assert_eq!(
        h.job_state(done).0,
        "succeeded",
        "a finished job stays as it was"
    );

    let page = root
        .submit(
            "/admin/schedules",
            "/admin/schedules",
            &[
                ("entry", "scan"),
                ("target", "group:lab"),
                ("kind", "every"),
                ("every", "30s"),
            ],
        )
        .await;
    assert_eq!(
        page.status,
        StatusCode::BAD_REQUEST,
        "below the entry's minimum"
    );
    let page = root
        .submit(
            "/admin/schedules",
            "/admin/schedules",
            &[
                ("entry", "scan"),
                ("target", "group:lab"),
                ("kind", "every"),
                ("every", "1h"),
            ],
        )
        .await;
    assert_eq!(page.status, StatusCode::SEE_OTHER, "{}", page.body);
    let subs = h.store.service_subscriptions(None).unwrap();
    assert_eq!(subs.len(), 1);
    assert_eq!(subs[0].target, "group:lab");
    let listed = root.get("/admin/schedules").await;
    assert!(listed
        .body
        .contains(&format!("data-subscription=\"{}\"", subs[0].id)));
    let page = root
        .submit(
            "/admin/schedules",
            &format!("/admin/schedules/{}/delete", subs[0].id),
            &[],
        )
        .await;
    assert_eq!(page.status, StatusCode::SEE_OTHER);
    assert!(h.store.service_subscriptions(None).unwrap().is_empty());

    let page = root
        .submit(
            "/admin/users",
            &format!("/admin/users/{ann_id}/role"),
            &[("role", "admin")],
        )
        .await;
    assert_eq!(page.status, StatusCode::SEE_OTHER);
    assert_eq!(h.store.user(ann_id).unwrap().role, Role::Admin);

    let page = root
        .submit(
            "/admin/agents",
            &format!("/admin/agents/{device}/revoke"),
            &[],
        )
        .await;
    assert_eq!(page.status, StatusCode::SEE_OTHER);
    assert!(!h.store.agent_active(&device).unwrap());
}

#[tokio::test]
async fn quotas_bound_subscriptions_link_tokens_and_devices() {
    let h = harness();
    let (mut ann, ann_id) = h.user("ann").await;
    h.entry("scan", false, 60_000);
    let device = h.device(ann_id, "ann-laptop");
    let subscribe = [
        ("entry", "scan"),
        ("device", device.as_str()),
        ("kind", "every"),
        ("every", "1h"),
    ];
    for _ in 0..20 {
        let page = ann
            .submit("/catalog/scan", "/subscriptions", &subscribe)
            .await;
        assert_eq!(page.status, StatusCode::SEE_OTHER, "{}", page.body);
    }
    let page = ann
        .submit("/catalog/scan", "/subscriptions", &subscribe)
        .await;
    assert_eq!(page.status, StatusCode::BAD_REQUEST);
    assert!(page.body.contains("20 subscriptions"), "{}", page.body);
    assert_eq!(h.store.subscription_count(ann_id).unwrap(), 20);

    // Five unused link tokens at most.
    for _ in 0..5 {
        let page = ann.submit("/devices", "/devices/link", &[]).await;
        assert_eq!(page.status, StatusCode::OK);
    }
    let page = ann.submit("/devices", "/devices/link", &[]).await;
    assert_eq!(page.status, StatusCode::BAD_REQUEST);
    assert!(page.has_page_id("devices"));
    assert!(
        page.body.contains("id=\"error\"") && page.body.contains("unused link tokens"),
        "{}",
        page.body
    );
    assert_eq!(h.store.unused_link_tokens(ann_id, h.now()).unwrap(), 5);
    // Once they expire (24 hours; the session kept alive meanwhile), new ones can be
    // made again.
    for _ in 0..2 {
        h.advance(11 * 3600 * 1000);
        assert_eq!(ann.get("/devices").await.status, StatusCode::OK);
    }
    h.advance(2 * 3600 * 1000);
    let page = ann.submit("/devices", "/devices/link", &[]).await;
    assert_eq!(page.status, StatusCode::OK);

    // Ten devices at most, counting unused tokens.
    let (mut bob, bob_id) = h.user("bob").await;
    for i in 0..9 {
        h.device(bob_id, &format!("bob-{i}"));
    }
    let page = bob.submit("/devices", "/devices/link", &[]).await;
    assert_eq!(page.status, StatusCode::OK, "9 devices and no token");
    let page = bob.submit("/devices", "/devices/link", &[]).await;
    assert_eq!(page.status, StatusCode::BAD_REQUEST);
    assert!(page.body.contains("at most 10 devices"), "{}", page.body);
}

#[tokio::test]
async fn list_pages_show_the_newest_two_hundred() {
    let h = harness();
    let (mut root, root_id) = h.admin("root").await;
    h.entry("scan", false, 60_000);
    let device = h.device(root_id, "root-pc");
    for i in 0..205 {
        h.store
            .add_user(&format!("user{i:03}"), "h", Role::User, "", "", h.now())
            .unwrap();
        h.store
            .add_service_subscription(
                root_id,
                "scan",
                &Audience::Agent(device.clone()),
                &herald_shared::schedule::Schedule::Every {
                    interval_ms: 3_600_000,
                    anchor: h.now(),
                },
                herald_shared::schedule::Missed::Skip,
                60_000,
                Some(h.now() + 3_600_000),
                h.now(),
            )
            .unwrap();
    }
    let users = root.get("/admin/users").await;
    assert_eq!(users.body.matches("<tr data-user=").count(), 200);
    assert!(users.body.contains(">user204<"), "newest first");
    assert!(!users.body.contains(&format!("<tr data-user=\"{root_id}\"")));
    let schedules = root.get("/admin/schedules").await;
    assert_eq!(schedules.status, StatusCode::OK);
    assert_eq!(
        schedules.body.matches("<tr data-subscription=").count(),
        200
    );
    // Subscriptions are not listed as operator schedules too.
    assert_eq!(schedules.body.matches("<tr data-schedule=").count(), 0);
    let newest = h.store.subscriptions_page(None, None, 1).unwrap()[0].id;
    assert!(schedules
        .body
        .contains(&format!("<tr data-subscription=\"{newest}\"")));
    for path in ["/subscriptions".to_string(), format!("/devices/{device}")] {
        let page = root.get(&path).await;
        assert_eq!(page.status, StatusCode::OK, "{path}");
        assert_eq!(
            page.body.matches("<tr data-subscription=").count(),
            200,
            "{path}"
        );
    }
}

#[test]
fn one_time_secrets_beyond_the_cap_evict_only_the_oldest() {
    let mut flash = super::Flash::new(3);
    for i in 0..3 {
        flash.insert(format!("s{i}"), format!("secret {i}"));
    }
    // Replacing a secret makes it the newest.
    flash.insert("s0".into(), "newer".into());
    flash.insert("s3".into(), "secret 3".into());
    assert_eq!(flash.remove("s1"), None, "the oldest went");
    assert_eq!(flash.remove("s2").as_deref(), Some("secret 2"));
    assert_eq!(flash.remove("s0").as_deref(), Some("newer"));
    assert_eq!(flash.remove("s3").as_deref(), Some("secret 3"));
    assert_eq!(flash.remove("s3"), None, "shown once");
}

#[tokio::test]
async fn job_output_is_escaped() {
    let h = harness();
    let (mut ann, ann_id) = h.user("ann").await;
    h.entry("scan", false, 60_000);
    let device = h.device(ann_id, "ann-laptop");
    let job = h.job("scan", &device, "succeeded");
    h.store
        .set_test_job_output(job, b"<script>alert(1)</script>", 0);
    let page = ann.get(&format!("/history/{job}")).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.has_page_id("job"));
    assert!(!page.body.contains("<script>alert(1)</script>"));
    assert!(page.body.contains("&#60;script&#62;") || page.body.contains("&lt;script&gt;"));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_messages_page_lists_messages_and_relays_block_requests_for_own_devices_only() {
    use herald_shared::message::{Message, Priority, SenderGrant, DEFAULT_TTL_MS};

    let h = harness();
    let (mut ann, ann_id) = h.user("ann").await;
    let (mut bob, _) = h.user("bob").await;
    let device = h.device(ann_id, "ann-laptop");
    let sender = OperatorKey::from_seed([4; 32]);
    let grant = h
        .key
        .sign(&Statement::Sender(SenderGrant {
            sender: "card".into(),
            display_name: "Card Company".into(),
            key: sender.public(),
            advertising: false,
            issued_at: h.now(),
        }))
        .unwrap();
    let message = Message {
        id: [3; 16],
        sender: "card".into(),
        audience: Audience::Agent(device.clone()),
        title: "Payment <due>".into(),
        body: "Friday".into(),
        priority: Priority::Normal,
        issued_at: h.now(),
        expires_at: h.now() + DEFAULT_TTL_MS,
        collapse: None,
        advertising: false,
        link: None,
        grant,
    };
    let envelope = sender.sign(&Statement::Message(message.clone())).unwrap();
    h.store
        .create_message(
            &message,
            &envelope,
            std::slice::from_ref(&device),
            h.now(),
            h.now(),
        )
        .unwrap();

    let page = ann.get("/messages").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("Payment &#60;due&#62;"), "{}", page.body);
    assert!(page.body.contains("ann-laptop"));
    assert!(page.body.contains("on its way"));
    // Bob sees none of it, and cannot ask ann's device for anything.
    let theirs = bob.get("/messages").await;
    assert!(theirs.body.contains("no-messages"));
    let refused = bob
        .submit(
            "/messages",
            "/messages/block",
            &[("agent", &device), ("sender", "card"), ("action", "block")],
        )
        .await;
    assert_eq!(refused.status, StatusCode::NOT_FOUND);
    assert!(h.store.block_requests(&device).unwrap().is_empty());

    let bad = ann
        .submit(
            "/messages",
            "/messages/block",
            &[("agent", &device), ("sender", "card"), ("action", "maybe")],
        )
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let asked = ann
        .submit(
            "/messages",
            "/messages/block",
            &[("agent", &device), ("sender", "card"), ("action", "block")],
        )
        .await;
    assert_eq!(asked.status, StatusCode::SEE_OTHER, "{}", asked.body);
    let requests = h.store.block_requests(&device).unwrap();
    assert_eq!(requests.len(), 1);
    assert!(requests[0].blocked);
    assert!(ann.get("/messages").await.body.contains("block requested"));
}
