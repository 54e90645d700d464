//! Harness support for desktop notifications: a private D-Bus session bus (a
//! `dbus-daemon` of the test's own, so nothing reaches the real desktop) and a recording
//! stand-in for the desktop's notification service (`org.freedesktop.Notifications`) that
//! answers `Notify` with ids, remembers every call, and emits `ActionInvoked` on demand as
//! if the person had clicked.
//!
//! Tests that need this start with [`PrivateBus::start`], which returns `None` when
//! `dbus-daemon` is not installed (Debian package `dbus-daemon`); such a test prints
//! "skipped: needs dbus-daemon" and returns.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use zbus::object_server::SignalEmitter;
use zbus::zvariant::{OwnedValue, Value};

use crate::wait_until;

/// The notification service's well-known bus name.
pub const SERVICE: &str = "org.freedesktop.Notifications";
/// The notification service's object path.
pub const SERVICE_PATH: &str = "/org/freedesktop/Notifications";
/// What [`NotificationServer`] answers to `GetCapabilities`.
pub const CAPABILITIES: [&str; 2] = ["actions", "body"];
/// How long a bus call from the harness may take.
const CALL_DEADLINE: Duration = Duration::from_secs(20);

/// Where `dbus-daemon` is installed, if it is (searched on `PATH`).
pub fn dbus_daemon() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("dbus-daemon"))
        .find(|candidate| candidate.is_file())
}

/// A `dbus-daemon` serving a session bus on a socket in the test directory; killed on
/// drop.
pub struct PrivateBus {
    address: String,
    log: PathBuf,
    child: Option<Child>,
}

impl PrivateBus {
    /// Starts a bus with its socket and configuration in `dir` and waits until it
    /// accepts connections. `None` when `dbus-daemon` is not installed.
    pub fn start(dir: &Path) -> Option<PrivateBus> {
        let program = dbus_daemon()?;
        let socket = dir.join("bus");
        let config = dir.join("bus.conf");
        // The session bus's usual rules, without the system's includes: anyone who can
        // reach the socket (only this uid: EXTERNAL authentication) may own any name.
        std::fs::write(
            &config,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"#,
                socket.display()
            ),
        )
        .expect("write bus.conf");
        let log = dir.join("dbus-daemon.log");
        let logfile = std::fs::File::create(&log).expect("create dbus-daemon log");
        let child = Command::new(program)
            .arg(format!("--config-file={}", config.display()))
            .arg("--nofork")
            .arg("--nopidfile")
            .stdin(Stdio::null())
            .stdout(logfile.try_clone().expect("clone log file"))
            .stderr(logfile)
            .spawn()
            .expect("spawn dbus-daemon");
        let mut bus = PrivateBus {
            address: format!("unix:path={}", socket.display()),
            log,
            child: Some(child),
        };
        wait_until("the private D-Bus to listen", crate::DEADLINE, || {
            if let Some(status) = bus.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!(
                    "dbus-daemon exited ({status}):\n{}",
                    std::fs::read_to_string(&bus.log).unwrap_or_default()
                );
            }
            std::os::unix::net::UnixStream::connect(&socket)
                .ok()
                .map(|_| ())
        });
        Some(bus)
    }

    /// The bus address, for `DBUS_SESSION_BUS_ADDRESS`.
    pub fn address(&self) -> &str {
        &self.address
    }
}

impl Drop for PrivateBus {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- dbus-daemon log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One `Notify` call as the service received it.
#[derive(Debug, Clone, PartialEq)]
pub struct NotifyCall {
    /// The id the service answered with.
    pub id: u32,
    /// `app_name`.
    pub app_name: String,
    /// `replaces_id`.
    pub replaces_id: u32,
    /// `app_icon`.
    pub app_icon: String,
    /// `summary`.
    pub summary: String,
    /// `body`.
    pub body: String,
    /// `actions`, in the flat `[key, label, ...]` form.
    pub actions: Vec<String>,
    /// The `urgency` hint when it is a byte, as the specification wants.
    pub urgency: Option<u8>,
    /// The names of all hints.
    pub hints: Vec<String>,
    /// `expire_timeout`.
    pub expire_timeout: i32,
}

/// The recording service object.
struct Recorder {
    calls: Arc<Mutex<Vec<NotifyCall>>>,
    next_id: u32,
}

#[zbus::interface(name = "org.freedesktop.Notifications")]
impl Recorder {
    #[allow(clippy::too_many_arguments)]
    async fn notify(
        &mut self,
        app_name: String,
        replaces_id: u32,
        app_icon: String,
        summary: String,
        body: String,
        actions: Vec<String>,
        hints: HashMap<String, OwnedValue>,
        expire_timeout: i32,
    ) -> u32 {
        // Ids start high, so a client that confuses them with anything small shows.
        self.next_id += 1;
        let id = 100 + self.next_id;
        let urgency = hints.get("urgency").and_then(|v| match &**v {
            Value::U8(byte) => Some(*byte),
            _ => None,
        });
        let mut names: Vec<String> = hints.keys().cloned().collect();
        names.sort();
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(NotifyCall {
                id,
                app_name,
                replaces_id,
                app_icon,
                summary,
                body,
                actions,
                urgency,
                hints: names,
                expire_timeout,
            });
        id
    }

    fn close_notification(&self, _id: u32) {}

    fn get_capabilities(&self) -> Vec<String> {
        CAPABILITIES.iter().map(|c| c.to_string()).collect()
    }

    fn get_server_information(&self) -> (String, String, String, String) {
        (
            "herald-tests".into(),
            "herald".into(),
            "0".into(),
            "1.2".into(),
        )
    }

    #[zbus(signal)]
    async fn action_invoked(
        emitter: &SignalEmitter<'_>,
        id: u32,
        action_key: &str,
    ) -> zbus::Result<()>;

    #[zbus(signal)]
    async fn notification_closed(
        emitter: &SignalEmitter<'_>,
        id: u32,
        reason: u32,
    ) -> zbus::Result<()>;
}

/// A stand-in desktop notification service on a [`PrivateBus`], with a tokio runtime of
/// its own so plain `#[test]`s can use it.
pub struct NotificationServer {
    runtime: tokio::runtime::Runtime,
    connection: zbus::Connection,
    calls: Arc<Mutex<Vec<NotifyCall>>>,
}

impl NotificationServer {
    /// Connects to `bus`, serves the interface and takes the service's name.
    pub fn start(bus: &PrivateBus) -> NotificationServer {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime for the notification server");
        let calls = Arc::new(Mutex::new(Vec::new()));
        let recorder = Recorder {
            calls: calls.clone(),
            next_id: 0,
        };
        let address = bus.address().to_string();
        let connection = runtime
            .block_on(async {
                tokio::time::timeout(CALL_DEADLINE, async {
                    zbus::connection::Builder::address(address.as_str())?
                        .serve_at(SERVICE_PATH, recorder)?
                        .name(SERVICE)?
                        .build()
                        .await
                })
                .await
            })
            .expect("the notification server connects in time")
            .expect("the notification server connects to the private bus");
        NotificationServer {
            runtime,
            connection,
            calls,
        }
    }

    /// Every `Notify` call so far, oldest first.
    pub fn calls(&self) -> Vec<NotifyCall> {
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits until there have been `count` `Notify` calls; returns the last of them.
    pub fn wait_calls(&self, count: usize) -> NotifyCall {
        wait_until(
            &format!("{count} Notify call(s) on the notification service"),
            crate::DEADLINE,
            || {
                let calls = self.calls();
                (calls.len() >= count).then(|| calls[count - 1].clone())
            },
        )
    }

    /// Emits `ActionInvoked(id, key)`, as when the person clicks an action.
    pub fn invoke_action(&self, id: u32, key: &str) {
        self.emit(|emitter| async move { Recorder::action_invoked(&emitter, id, key).await });
    }

    /// Emits `NotificationClosed(id, reason)` (1 expired, 2 dismissed, 3 closed by call).
    pub fn close(&self, id: u32, reason: u32) {
        self.emit(
            |emitter| async move { Recorder::notification_closed(&emitter, id, reason).await },
        );
    }

    fn emit<F, Fut>(&self, signal: F)
    where
        F: FnOnce(SignalEmitter<'static>) -> Fut,
        Fut: std::future::Future<Output = zbus::Result<()>>,
    {
        let emitter = SignalEmitter::new(&self.connection, SERVICE_PATH)
            .expect("the service path is a valid object path");
        self.runtime
            .block_on(async { tokio::time::timeout(CALL_DEADLINE, signal(emitter)).await })
            .expect("the signal is sent in time")
            .expect("the signal is sent");
    }
}
