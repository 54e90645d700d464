//! A real browser for console tests: `chromedriver` as a child process on a free
//! loopback port, and one WebDriver session with headless Chromium driven through
//! `fantoccini`. The helpers block (the tests and the rest of the harness are
//! synchronous) and panic with context, like the rest of the harness.
//!
//! The test server has its own CA, which this Chromium does not trust. For a server
//! ([`Browser::for_server`]) Chromium accepts exactly that server's key, by the SHA-256
//! of its SubjectPublicKeyInfo (`--ignore-certificate-errors-spki-list`): any other
//! certificate is still refused. [`Trust::Ca`] adds one CA as a trust anchor the way a
//! person would on Linux: into the NSS database in `$HOME/.pki/nssdb` (a home of the
//! test's own, made with `certutil`), so Chromium verifies the chain and the name as
//! for any public site. [`Trust::Any`] accepts every certificate
//! (`--ignore-certificate-errors`), for other loopback servers.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

use crate::{free_port, wait_until, DEADLINE};

/// The Chromium binary (Debian package `chromium`).
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// The WebDriver server (Debian package `chromium-driver`).
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// Screen widths every page must work at: a phone and a laptop.
pub const WIDTHS: [u32; 2] = [390, 1280];
/// Sideways slack allowed at 390 px (sub-pixel rounding), in CSS pixels.
const OVERFLOW_TOLERANCE: i64 = 2;
/// The window height for screenshots; widths are the caller's (390 and 1280 px).
pub const SCREENSHOT_HEIGHT: u32 = 900;
/// Environment variable naming a directory to keep screenshots in (one folder per
/// browser) instead of `target/<profile>/screenshots/`.
pub const SCREENSHOTS_ENV: &str = "HERALD_SCREENSHOTS";
/// The message tests print when they cannot run.
pub const SKIPPED: &str =
    "skipped: chromium/chromedriver not installed (apt-get install chromium chromium-driver)";

/// A test server's certificate file in its data directory.
const SERVER_CERT: &str = "server.pem";

/// How long one WebDriver command may take before the test fails.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `chromedriver` gets to end after SIGTERM before it is killed.
const DRIVER_GRACE: Duration = Duration::from_secs(5);

/// Chromium's command line: headless, quiet, and with a throwaway profile.
const CHROMIUM_ARGS: &[&str] = &[
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-extensions",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,900",
];

/// Which certificates the browser accepts besides those of the system's CAs.
#[derive(Debug, Clone, Copy)]
pub enum Trust<'a> {
    /// Only the key of this PEM certificate (a test server's `server.pem`).
    Key(&'a Path),
    /// Certificates issued by this PEM CA, for the names they carry (and those of the
    /// system's CAs).
    Ca(&'a Path),
    /// Any certificate.
    Any,
}

/// Whether Chromium and chromedriver are installed; prints [`SKIPPED`] if not.
pub fn installed() -> bool {
    let ok = Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists();
    if !ok {
        println!("{SKIPPED}");
    }
    ok
}

/// A `chromedriver` process with one headless Chromium session.
pub struct Browser {
    runtime: tokio::runtime::Runtime,
    client: Option<Client>,
    driver: Option<Child>,
    driver_log: PathBuf,
    base: String,
    screenshots: PathBuf,
}

impl Browser {
    /// Starts a browser for `server`'s console, trusting the server's own key, with
    /// its profile and logs in the server's test directory; `name` tells browsers on
    /// one server apart. Returns `None` (after printing [`SKIPPED`]) when the browser
    /// is not installed.
    pub fn for_server(server: &crate::TestServer, name: &str) -> Option<Browser> {
        let cert = server.data_dir().join(SERVER_CERT);
        Browser::start(
            server.dir.path(),
            name,
            &server.https_url(),
            Trust::Key(&cert),
        )
    }

    /// Starts chromedriver and Chromium with a profile and logs under `dir`; relative
    /// paths given to [`Browser::goto`] are resolved against `base`. Screenshots go to
    /// `target/<profile>/screenshots/NAME` (kept after the test, for people to look at),
    /// or to `$HERALD_SCREENSHOTS/NAME` when that is set. Returns
    /// `None` (after printing [`SKIPPED`]) when the browser is not installed.
    pub fn start(dir: &Path, name: &str, base: &str, trust: Trust<'_>) -> Option<Browser> {
        if !installed() {
            return None;
        }
        let port = free_port();
        let driver_log = dir.join(format!("chromedriver-{name}.log"));
        let log = std::fs::File::create(&driver_log).expect("create chromedriver log");
        let mut driver = Command::new(CHROMEDRIVER);
        if let Trust::Ca(ca) = trust {
            // Chromium reads user-added trust anchors from $HOME/.pki/nssdb.
            let home = dir.join(format!("home-{name}"));
            nss_db_trusting(&home, ca);
            driver.env("HOME", &home);
        }
        let driver = driver
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .expect("spawn chromedriver");
        let screenshots = match std::env::var_os(SCREENSHOTS_ENV) {
            Some(keep) => PathBuf::from(keep).join(name),
            None => default_screenshot_dir().join(name),
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime for WebDriver");
        let mut browser = Browser {
            runtime,
            client: None,
            driver: Some(driver),
            driver_log,
            base: base.trim_end_matches('/').to_string(),
            screenshots,
        };
        wait_until("chromedriver to answer /status", DEADLINE, || {
            driver_ready(port).then_some(())
        });
        let profile = dir.join(format!("chromium-profile-{name}"));
        let mut args: Vec<String> = CHROMIUM_ARGS.iter().map(|a| a.to_string()).collect();
        // The SPKI list only takes effect with a --user-data-dir of the test's own.
        args.push(format!("--user-data-dir={}", profile.display()));
        match trust {
            Trust::Key(cert) => args.push(format!(
                "--ignore-certificate-errors-spki-list={}",
                spki_sha256_base64(cert)
            )),
            Trust::Any => args.push("--ignore-certificate-errors".into()),
            Trust::Ca(_) => {}
        }
        let capabilities = json!({
            "browserName": "chrome",
            "acceptInsecureCerts": matches!(trust, Trust::Any),
            "pageLoadStrategy": "normal",
            "goog:chromeOptions": { "binary": CHROMIUM, "args": args },
        });
        let capabilities = match capabilities {
            Value::Object(map) => map,
            _ => unreachable!("a JSON object literal"),
        };
        let url = format!("http://127.0.0.1:{port}");
        let client = browser.block_on("open a WebDriver session", async {
            ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                .capabilities(capabilities)
                .connect(&url)
                .await
        });
        browser.client = Some(client);
        Some(browser)
    }

    /// Runs one WebDriver future to completion, failing the test with `what` and the
    /// chromedriver log on error or after [`COMMAND_TIMEOUT`].
    fn block_on<T, E: std::fmt::Debug>(
        &self,
        what: &str,
        future: impl std::future::Future<Output = Result<T, E>>,
    ) -> T {
        let outcome = self.run(future);
        self.settle(what, outcome)
    }

    /// Runs one WebDriver future with [`COMMAND_TIMEOUT`].
    fn run<T>(
        &self,
        future: impl std::future::Future<Output = T>,
    ) -> Result<T, tokio::time::error::Elapsed> {
        self.runtime
            .block_on(async { tokio::time::timeout(COMMAND_TIMEOUT, future).await })
    }

    /// The value of a finished WebDriver command, or a test failure naming `what`.
    fn settle<T, E: std::fmt::Debug>(
        &self,
        what: &str,
        outcome: Result<Result<T, E>, tokio::time::error::Elapsed>,
    ) -> T {
        match outcome {
            Ok(Ok(value)) => value,
            Ok(Err(e)) => panic!(
                "browser: {what} failed: {e:?}\n--- chromedriver log tail:\n{}",
                self.driver_log_tail()
            ),
            Err(_) => panic!(
                "browser: {what} took longer than {COMMAND_TIMEOUT:?}\n--- chromedriver log tail:\n{}",
                self.driver_log_tail()
            ),
        }
    }

    fn driver_log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.driver_log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// The WebDriver client (for what these helpers do not cover).
    pub fn client(&self) -> &Client {
        self.client.as_ref().expect("session open until drop")
    }

    /// The absolute URL for `path_or_url` (a path starting `/` is on the server).
    pub fn url(&self, path_or_url: &str) -> String {
        if path_or_url.starts_with('/') {
            format!("{}{path_or_url}", self.base)
        } else {
            path_or_url.to_string()
        }
    }

    /// Navigates to a path on the server (or an absolute URL) and waits for the load.
    pub fn goto(&self, path_or_url: &str) {
        if let Err(e) = self.try_goto(path_or_url) {
            panic!(
                "{e}\n--- chromedriver log tail:\n{}",
                self.driver_log_tail()
            );
        }
    }

    /// Like [`Browser::goto`], but returns why the page could not be loaded (a TLS or
    /// certificate error, for instance) instead of failing the test.
    pub fn try_goto(&self, path_or_url: &str) -> Result<(), String> {
        let url = self.url(path_or_url);
        match self.run(self.client().goto(&url)) {
            Ok(Ok(())) => Ok(()),
            Err(_) => Err(format!(
                "browser: go to {url} took longer than {COMMAND_TIMEOUT:?}"
            )),
            Ok(Err(e)) => {
                let error = format!("{e:?}");
                let mut why = String::new();
                if error.contains("ERR_SSL_PROTOCOL_ERROR") {
                    why = "\nBrowsers accept only ECDSA or RSA server certificates (not \
                           Ed25519); see pki.rs, whose tests check the algorithm."
                        .to_string();
                }
                Err(format!("browser: go to {url} failed: {error}{why}"))
            }
        }
    }

    /// Reloads the page.
    pub fn reload(&self) {
        self.block_on("reload", self.client().refresh());
    }

    /// The current URL.
    pub fn current_url(&self) -> String {
        self.block_on("read the URL", self.client().current_url())
            .to_string()
    }

    /// The current URL's path (without the query).
    pub fn path(&self) -> String {
        self.block_on("read the URL", self.client().current_url())
            .path()
            .to_string()
    }

    /// The id of the page's `<main>` (`page-...`), or `""` if it has none (or the page
    /// is between two documents).
    pub fn page_id(&self) -> String {
        self.try_execute("const m = document.querySelector('main[id]'); return m ? m.id : '';")
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    }

    /// Waits until the page is `page-NAME` (e.g. after a redirect), failing with the
    /// page's text if it does not come.
    pub fn wait_page(&self, id: &str) {
        let start = Instant::now();
        while self.page_id() != id {
            if start.elapsed() > DEADLINE {
                panic!(
                    "expected <main id={id:?}>, at {} with {:?}:\n{}",
                    self.current_url(),
                    self.page_id(),
                    self.body_text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The first element matching `css`, failing the test if there is none.
    pub fn find(&self, css: &str) -> Element {
        self.try_find(css).unwrap_or_else(|| {
            panic!(
                "no element {css:?} at {}:\n{}",
                self.current_url(),
                self.body_text()
            )
        })
    }

    /// The first element matching `css`, if any.
    pub fn try_find(&self, css: &str) -> Option<Element> {
        self.find_all(css).into_iter().next()
    }

    /// Every element matching `css`.
    pub fn find_all(&self, css: &str) -> Vec<Element> {
        self.block_on(
            &format!("find {css:?}"),
            self.client().find_all(Locator::Css(css)),
        )
    }

    /// The visible text of the first element matching `css`.
    pub fn text(&self, css: &str) -> String {
        let element = self.find(css);
        self.block_on(&format!("read the text of {css:?}"), element.text())
    }

    /// An attribute of an element.
    pub fn attr(&self, element: &Element, name: &str) -> Option<String> {
        self.block_on(&format!("read attribute {name}"), element.attr(name))
    }

    /// The text of the whole page (for assertions and failure messages).
    pub fn body_text(&self) -> String {
        match self.try_find("body") {
            Some(body) => self.block_on("read the page text", body.text()),
            None => String::new(),
        }
    }

    /// The page's HTML as the browser has it.
    pub fn source(&self) -> String {
        self.block_on("read the page source", self.client().source())
    }

    /// Fills the field `name` in the form matching `form` the way a person would:
    /// types into text fields, picks the option of a `<select>`, clicks the radio button
    /// with that value, and sets a checkbox checked for any value but `""`.
    pub fn fill_in(&self, form: &str, name: &str, value: &str) {
        let css = format!("{form} [name=\"{name}\"]");
        let fields = self.find_all(&css);
        let field = fields.first().unwrap_or_else(|| {
            panic!(
                "no field {css:?} at {}:\n{}",
                self.current_url(),
                self.source()
            )
        });
        let tag = self.block_on("read a field's tag", field.tag_name());
        let kind = self.attr(field, "type").unwrap_or_default();
        match (tag.to_ascii_lowercase().as_str(), kind.as_str()) {
            ("select", _) => {
                self.block_on(
                    &format!("choose {value:?} in {name}"),
                    field.select_by_value(value),
                );
            }
            ("input", "radio") => {
                let radio = self.find(&format!("{css}[value=\"{value}\"]"));
                self.block_on(&format!("choose {name}={value}"), radio.click());
            }
            ("input", "checkbox") => {
                let checked = self.block_on("read a checkbox", field.is_selected());
                let wanted = !value.is_empty();
                if checked != wanted {
                    self.block_on(&format!("toggle {name}"), field.click());
                }
            }
            _ => {
                self.block_on(&format!("clear {name}"), field.clear());
                self.block_on(&format!("type into {name}"), field.send_keys(value));
            }
        }
    }

    /// Fills a field of the page's main form (`main form`).
    pub fn fill(&self, name: &str, value: &str) {
        self.fill_in("main form", name, value);
    }

    /// Submits the form matching `form` by clicking its submit button (or, if it has
    /// none, by submitting it), and waits for the next page to load.
    pub fn submit(&self, form: &str) {
        let button = format!(
            "{form} button[type=submit], {form} input[type=submit], {form} button:not([type])"
        );
        match self.try_find(&button) {
            Some(button) => self.navigate_with(|| self.click_element(&button)),
            None => {
                let form = self.find(form);
                self.navigate_with(|| {
                    self.block_on(
                        "submit a form",
                        self.client()
                            .execute("arguments[0].requestSubmit();", vec![json!(form)]),
                    );
                });
            }
        }
    }

    /// Clicks the first element matching `css` (a link or a submit button) and waits for
    /// the next page to load.
    pub fn click(&self, css: &str) {
        let element = self.find(css);
        self.navigate_with(|| self.click_element(&element));
    }

    fn click_element(&self, element: &Element) {
        // Bring it into view first: on a 390 px screen the button may be below the fold.
        self.block_on(
            "scroll into view",
            self.client().execute(
                "arguments[0].scrollIntoView({block: 'center'});",
                vec![json!(element)],
            ),
        );
        self.block_on("click", element.click());
    }

    /// Runs `action`, which should make the browser load another document, and waits
    /// until that document has replaced the current one and finished loading. A click
    /// returns before the navigation it starts commits, so the old document is marked
    /// and the wait lasts until the mark is gone.
    fn navigate_with(&self, action: impl FnOnce()) {
        self.execute("window.__heraldPrevious = true;");
        action();
        let start = Instant::now();
        loop {
            let state = self.try_execute(
                "return window.__heraldPrevious === undefined && \
                 document.readyState === 'complete';",
            );
            if state == Some(Value::Bool(true)) {
                return;
            }
            if start.elapsed() > DEADLINE {
                // Most likely the browser did not submit: say which fields it refused.
                let invalid = self.try_execute(
                    "return Array.from(document.querySelectorAll(':invalid'))\
                       .filter(e => e.name)\
                       .map(e => e.name + ': ' + e.validationMessage).join('; ');",
                );
                panic!(
                    "no new page after {DEADLINE:?} at {} (fields the browser refused: {})",
                    self.current_url(),
                    invalid.as_ref().and_then(Value::as_str).unwrap_or("none")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the document has loaded (`document.readyState == "complete"`).
    pub fn wait_loaded(&self) {
        wait_until("the page to load", DEADLINE, || {
            (self.try_execute("return document.readyState;")? == "complete").then_some(())
        });
    }

    /// Runs `script` in the page; `None` if it could not run (e.g. mid-navigation).
    pub fn try_execute(&self, script: &str) -> Option<Value> {
        match self.run(self.client().execute(script, Vec::new())) {
            Ok(Ok(value)) => Some(value),
            _ => None,
        }
    }

    /// Runs `script` in the page and returns its value.
    pub fn execute(&self, script: &str) -> Value {
        self.block_on("run a script", self.client().execute(script, Vec::new()))
    }

    /// Fetches `path` from the page with the browser's cookies (`fetch`, no redirects
    /// followed) and returns the HTTP status and body: what the browser would get.
    pub fn fetch(&self, method: &str, path: &str) -> (u16, String) {
        let script = "const [method, url, done] = arguments;\
             fetch(url, {method, redirect: 'manual', credentials: 'same-origin'})\
               .then(async r => done([r.status, await r.text()]))\
               .catch(e => done([0, String(e)]));";
        let answer = self.block_on(
            &format!("fetch {path}"),
            self.client()
                .execute_async(script, vec![json!(method), json!(self.url(path))]),
        );
        let status = answer[0].as_u64().unwrap_or(0) as u16;
        let body = answer[1].as_str().unwrap_or_default().to_string();
        (status, body)
    }

    /// The value of the cookie `name` for the current page, if set (HttpOnly included).
    pub fn cookie(&self, name: &str) -> Option<String> {
        let cookies = self.block_on("read cookies", self.client().get_all_cookies());
        cookies
            .iter()
            .find(|c| c.name() == name)
            .map(|c| c.value().to_string())
    }

    /// Deletes every cookie of the current site (a fresh visitor).
    pub fn clear_cookies(&self) {
        self.block_on("delete cookies", self.client().delete_all_cookies());
    }

    /// Resizes the window to `width` x [`SCREENSHOT_HEIGHT`].
    pub fn set_width(&self, width: u32) {
        self.block_on(
            &format!("resize to {width}px"),
            self.client().set_window_size(width, SCREENSHOT_HEIGHT),
        );
    }

    /// How many CSS pixels the page is wider than the viewport (`> 0`: it scrolls
    /// sideways).
    pub fn horizontal_overflow(&self) -> i64 {
        let value = self.execute(
            "const e = document.documentElement;\
             return Math.max(e.scrollWidth, document.body ? document.body.scrollWidth : 0) \
                    - e.clientWidth;",
        );
        value.as_i64().unwrap_or(0)
    }

    /// The viewport width in CSS pixels.
    pub fn viewport_width(&self) -> i64 {
        self.execute("return document.documentElement.clientWidth;")
            .as_i64()
            .unwrap_or(0)
    }

    /// Takes the page's screenshots at both [`WIDTHS`] and checks that at 390 px it
    /// does not scroll sideways.
    pub fn shoot(&self, name: &str) {
        for width in WIDTHS {
            self.screenshot(name, width);
            if width == 390 {
                let overflow = self.horizontal_overflow();
                assert!(
                    overflow <= OVERFLOW_TOLERANCE,
                    "{name} ({}) scrolls sideways by {overflow} px at 390 px (viewport {} px)",
                    self.current_url(),
                    self.viewport_width()
                );
            }
        }
    }

    /// Registers `login` (with `password` and `LOGIN@example.test`) through
    /// `/register`, which logs the new account in and goes to `/devices`.
    pub fn register(&self, login: &str, password: &str) {
        self.goto("/register");
        self.wait_page("page-register");
        self.fill("login", login);
        self.fill("password", password);
        self.fill("password2", password);
        self.fill("email", &format!("{login}@example.test"));
        self.submit("main form");
        assert_eq!(
            self.page_id(),
            "page-devices",
            "registering {login}: {}",
            self.body_text()
        );
    }

    /// Chooses a local file in the file input matching `css`.
    pub fn attach(&self, css: &str, path: &Path) {
        let field = self.find(css);
        let path = path.to_str().expect("UTF-8 path");
        self.block_on("choose a file", field.send_keys(path));
    }

    /// Resizes the window to `width` x [`SCREENSHOT_HEIGHT`], saves a PNG of the
    /// viewport as `NAME-WIDTHpx.png` in the screenshot directory, prints and returns
    /// its path.
    pub fn screenshot(&self, name: &str, width: u32) -> PathBuf {
        self.set_width(width);
        let png = self.block_on("take a screenshot", self.client().screenshot());
        std::fs::create_dir_all(&self.screenshots).expect("create screenshot dir");
        let path = self.screenshots.join(format!("{name}-{width}px.png"));
        std::fs::write(&path, png).expect("write screenshot");
        println!("screenshot: {}", path.display());
        path
    }

    /// The directory screenshots are saved in.
    pub fn screenshot_dir(&self) -> &Path {
        &self.screenshots
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ending the session makes chromedriver quit Chromium; then end chromedriver.
        if let Some(client) = self.client.take() {
            let _ = self
                .runtime
                .block_on(async { tokio::time::timeout(DRIVER_GRACE, client.close()).await });
        }
        if let Some(mut driver) = self.driver.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(driver.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let start = Instant::now();
            while matches!(driver.try_wait(), Ok(None)) && start.elapsed() < DRIVER_GRACE {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = driver.kill();
            let _ = driver.wait();
        }
    }
}

/// Whether chromedriver on `port` answers `GET /status` with `"ready": true`.
fn driver_ready(port: u16) -> bool {
    let Ok(mut tcp) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(2)));
    if write!(
        tcp,
        "GET /status HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .is_err()
    {
        return false;
    }
    let mut response = String::new();
    let _ = tcp.read_to_string(&mut response);
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str::<Value>(body)
        .map(|v| v["value"]["ready"] == true)
        .unwrap_or(false)
}

/// The `certutil` binary (Debian package `libnss3-tools`).
pub const CERTUTIL: &str = "/usr/bin/certutil";

/// Creates an NSS database in `home/.pki/nssdb` with `ca` (a PEM file) trusted to
/// issue server certificates.
fn nss_db_trusting(home: &Path, ca: &Path) {
    assert!(
        Path::new(CERTUTIL).exists(),
        "{CERTUTIL} is missing (apt-get install libnss3-tools)"
    );
    let db = home.join(".pki/nssdb");
    std::fs::create_dir_all(&db).expect("create the NSS database directory");
    let db_arg = format!("sql:{}", db.display());
    let run = |args: &[&str]| {
        let output = Command::new(CERTUTIL)
            .args(args)
            .output()
            .expect("run certutil");
        assert!(
            output.status.success(),
            "certutil {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    run(&["-N", "-d", &db_arg, "--empty-password"]);
    let ca = ca.to_str().expect("test paths are UTF-8");
    run(&["-A", "-d", &db_arg, "-n", "test-ca", "-t", "C,,", "-i", ca]);
}

/// The base64 SHA-256 of the SubjectPublicKeyInfo of the PEM certificate at `path`, as
/// Chromium's `--ignore-certificate-errors-spki-list` wants it.
pub fn spki_sha256_base64(path: &Path) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;

    let pem =
        std::fs::read(path).unwrap_or_else(|e| panic!("read certificate {}: {e}", path.display()));
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem)
        .unwrap_or_else(|e| panic!("no PEM certificate in {}: {e}", path.display()));
    let cert = pem
        .parse_x509()
        .unwrap_or_else(|e| panic!("bad certificate in {}: {e}", path.display()));
    let digest = sha2::Sha256::digest(cert.public_key().raw);
    base64::engine::general_purpose::STANDARD.encode(digest)
}

/// `target/<profile>/screenshots`, next to the test binaries' `deps/`.
fn default_screenshot_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent().map(Path::to_path_buf))
        .unwrap_or_else(std::env::temp_dir)
        .join("screenshots")
}
