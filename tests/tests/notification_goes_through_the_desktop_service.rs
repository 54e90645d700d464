//! A push message reaches the person through the desktop's own notification service: the
//! user-session helper (`herald-agent session`), handed a notice by the daemon, calls
//! `org.freedesktop.Notifications.Notify` on the session bus with Herald's name, the
//! sender in the summary (`[Ad] ` for advertising), the body, "Open" and "Block this
//! sender" actions and the priority as urgency; it reports `displayed` once the service
//! answered, and turns the person's clicks (`ActionInvoked`) into `opened` (opening the
//! message's link in the browser) and `block` reports for the daemon. Clicks on other
//! applications' notifications are ignored. Without a session bus the helper says so in
//! its log and reports nothing, and keeps serving browser jobs.
//!
//! Tested at the session-protocol level: the test plays the daemon on the helper's socket
//! and runs a private bus (`dbus-daemon`) with a recording notification service. Skipped
//! (with a message) when `dbus-daemon` is not installed.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;

use herald_tests::dbus::{NotificationServer, PrivateBus};
use herald_tests::session_helper::recording_browser;
use herald_tests::{bin, strip_ansi, wait_until, TempDir, DEADLINE};
use serde_json::{json, Value};

/// The page the advertisement links to (never contacted: the browser is a script).
const LINK: &str = "https://cards.example.invalid/offer?id=7";

/// A `herald-agent session --socket PATH` process; killed on drop.
struct Helper {
    log: PathBuf,
    child: Option<Child>,
}

impl Helper {
    fn start(socket: &Path, bus_address: &str, browser: &Path, log: &Path) -> Helper {
        let logfile = std::fs::File::create(log).expect("create helper log");
        let child = Command::new(bin("herald-agent"))
            .arg("session")
            .arg("--socket")
            .arg(socket)
            .env("DBUS_SESSION_BUS_ADDRESS", bus_address)
            // No fallback to a real desktop's bus in the runtime directory.
            .env_remove("XDG_RUNTIME_DIR")
            .env("BROWSER", browser)
            .env("HERALD_LOG", "info,herald_agent=debug")
            .stdin(Stdio::null())
            .stdout(logfile.try_clone().expect("clone log file"))
            .stderr(logfile)
            .spawn()
            .expect("spawn herald-agent session");
        Helper {
            log: log.to_path_buf(),
            child: Some(child),
        }
    }

    fn log(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }

    fn wait_log(&self, text: &str) {
        wait_until(&format!("the helper to log {text:?}"), DEADLINE, || {
            self.log().contains(text).then_some(())
        });
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- session helper log:\n{}", self.log());
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The test's side of the session socket: what a daemon would say and hear.
struct FakeDaemon {
    stream: UnixStream,
    lines: mpsc::Receiver<String>,
}

impl FakeDaemon {
    /// Waits for the helper to connect, and welcomes it.
    fn accept(listener: &UnixListener) -> FakeDaemon {
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let stream = wait_until("the helper to connect", DEADLINE, || {
            listener.accept().ok().map(|(stream, _)| stream)
        });
        stream.set_nonblocking(false).expect("blocking stream");
        let reader = stream.try_clone().expect("clone stream");
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(reader).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let mut daemon = FakeDaemon { stream, lines };
        daemon.send(&json!({"welcome": {"user": "tester"}}));
        daemon
    }

    fn send(&mut self, message: &Value) {
        let mut line = message.to_string();
        line.push('\n');
        self.stream
            .write_all(line.as_bytes())
            .expect("write to the helper");
    }

    /// The helper's next line, parsed.
    fn next(&self) -> Value {
        let line = self
            .lines
            .recv_timeout(DEADLINE)
            .expect("the helper reports within the deadline");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad line {line:?}: {e}"))
    }
}

fn notice(id: &str, title: &str, high: bool, advertising: bool, link: Option<&str>) -> Value {
    json!({"notify": {
        "message_id": id,
        "sender": "cards",
        "display_name": "Card Company",
        "title": title,
        "body": format!("Body of {title}."),
        "high": high,
        "advertising": advertising,
        "link": link,
    }})
}

const ACTIONS: [&str; 6] = [
    "default",
    "Open",
    "open",
    "Open",
    "block",
    "Block this sender",
];

#[test]
fn notices_are_shown_by_the_desktop_service_and_clicks_come_back() {
    let dir = TempDir::new("notify-desktop");
    let Some(bus) = PrivateBus::start(dir.path()) else {
        println!("skipped: needs dbus-daemon");
        return;
    };
    let service = NotificationServer::start(&bus);
    let socket = dir.path().join("session.sock");
    let listener = UnixListener::bind(&socket).expect("bind the fake daemon's socket");
    let (browser, record) = recording_browser(dir.path());
    let helper = Helper::start(
        &socket,
        bus.address(),
        &browser,
        &dir.path().join("helper.log"),
    );
    let mut daemon = FakeDaemon::accept(&listener);

    // An urgent message: shown with urgency 2, the sender in the summary.
    daemon.send(&notice("aa01", "Payment due", true, false, None));
    let due = service.wait_calls(1);
    assert_eq!(due.app_name, "Herald");
    assert_eq!(due.replaces_id, 0);
    assert_eq!(due.summary, "Card Company: Payment due");
    assert_eq!(due.body, "Body of Payment due.");
    assert_eq!(due.actions, ACTIONS);
    assert_eq!(due.urgency, Some(2), "{due:?}");
    assert_eq!(due.expire_timeout, -1);
    assert_eq!(
        daemon.next(),
        json!({"notice": {"displayed": {"message_id": "aa01"}}})
    );

    // Advertising with a link: marked as such, normal urgency.
    daemon.send(&notice("aa02", "New card", false, true, Some(LINK)));
    let ad = service.wait_calls(2);
    assert_eq!(ad.summary, "[Ad] Card Company: New card");
    assert_eq!(ad.urgency, Some(1), "{ad:?}");
    assert_ne!(ad.id, due.id);
    assert_eq!(
        daemon.next(),
        json!({"notice": {"displayed": {"message_id": "aa02"}}})
    );

    // A click on some other application's notification is not ours to report; the
    // person then blocks the sender from the first notice.
    service.invoke_action(due.id + ad.id, "default");
    service.invoke_action(due.id, "block");
    assert_eq!(
        daemon.next(),
        json!({"notice": {"block": {"message_id": "aa01", "sender": "cards"}}})
    );

    // Clicking the advertisement opens its link in the browser and reports it opened.
    service.invoke_action(ad.id, "default");
    assert_eq!(
        daemon.next(),
        json!({"notice": {"opened": {"message_id": "aa02"}}})
    );
    let opened = wait_until("the browser to open the link", DEADLINE, || {
        std::fs::read_to_string(&record).ok()
    });
    assert_eq!(opened, format!("{LINK}\n"));

    // Browser services still work beside notices.
    daemon.send(&json!({"open": {"job_id": 7, "url": LINK}}));
    assert_eq!(daemon.next(), json!({"opened": {"job_id": 7}}));
    drop(helper);
}

#[test]
fn without_a_session_bus_the_helper_warns_and_reports_nothing() {
    let dir = TempDir::new("notify-nobus");
    let socket = dir.path().join("session.sock");
    let listener = UnixListener::bind(&socket).expect("bind the fake daemon's socket");
    let (browser, _record) = recording_browser(dir.path());
    let missing = format!("unix:path={}", dir.path().join("no-bus").display());
    let helper = Helper::start(&socket, &missing, &browser, &dir.path().join("helper.log"));
    let mut daemon = FakeDaemon::accept(&listener);
    daemon.send(&notice("bb01", "Payment due", false, false, None));
    helper.wait_log("cannot reach the desktop session bus");
    // Nothing was reported for the notice: the next line answers a later browser job.
    daemon.send(&json!({"open": {"job_id": 8, "url": LINK}}));
    assert_eq!(daemon.next(), json!({"opened": {"job_id": 8}}));
}
