//! The user-session helper, `herald-agent session`: started at login in the person's
//! desktop session, it connects to the daemon's session socket (see [`crate::session`])
//! and opens the browser services the daemon hands it, in the user's default browser.
//!
//! It keeps reconnecting, with capped backoff, for the whole login session, so a daemon
//! restart or upgrade does not need a new login. The browser is `$BROWSER` when set: a
//! colon-separated list of commands tried in order, where `%s` stands for the URL (else
//! the URL is the last argument); otherwise `xdg-open` (`open` on macOS). No shell is
//! involved: commands are split with shell-like quoting rules and run directly.
//!
//! It also shows the daemon's push messages as desktop notifications ([`crate::notify`]),
//! and reports back what the person did with them: `displayed` once the desktop's
//! notification service took one, `opened` when the person clicked it or "Open" (the
//! message's link, if any, is opened like a browser service), `block` for "Block this
//! sender". Without a reachable session bus or notification service it logs a warning and
//! reports nothing, so the message stays unread in the inbox. Reports made while the
//! daemon is away wait for the next connection.
//!
//! The helper serves only a daemon running as root or as its own user ([`check_daemon`],
//! from the kernel's peer credentials): whoever else answers on the socket path (a
//! squatter on a `[session] socket` in a directory others can write to) could otherwise
//! make it open any page in the user's browser.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use herald_shared::envelope::check_browser_url;

use crate::notify::{Choice, Desktop, Notice, NoticeEvent};
use crate::session::{self, FromHelper, ToHelper};
use crate::state::{self, AgentConfig, SessionSettings};
use crate::sync::lock;

/// A browser command that exits with an error within this long has failed; one still
/// running after it (or exiting 0) has opened the page.
pub const LAUNCH_WAIT: Duration = Duration::from_secs(3);
/// First reconnect backoff ceiling.
pub const RECONNECT_BASE: Duration = Duration::from_millis(500);
/// Highest reconnect backoff ceiling.
pub const RECONNECT_CAP: Duration = Duration::from_secs(30);
/// The browser command when `$BROWSER` is not set.
#[cfg(target_os = "macos")]
pub const DEFAULT_BROWSER: &str = "open";
/// The browser command when `$BROWSER` is not set.
#[cfg(not(target_os = "macos"))]
pub const DEFAULT_BROWSER: &str = "xdg-open";
/// How much of a failed browser command's stderr is reported.
const STDERR_TAIL: usize = 1000;
/// After a browser command exits, how long its stderr may still take to arrive.
const STDERR_GRACE: Duration = Duration::from_millis(200);

/// Why one browser command did not open the page.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    /// The command line does not split (unbalanced quotes) or is empty.
    #[error("cannot parse browser command {0:?}")]
    Parse(String),
    /// The program could not be started (missing, not executable).
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// Program.
        program: String,
        /// Cause.
        source: io::Error,
    },
    /// The program exited with an error within [`LAUNCH_WAIT`].
    #[error("{program} failed ({status}){}", stderr_suffix(.stderr))]
    Exited {
        /// Program.
        program: String,
        /// Exit status.
        status: String,
        /// The end of its stderr.
        stderr: String,
    },
    /// Waiting for the program failed.
    #[error("waiting for {program}: {source}")]
    Wait {
        /// Program.
        program: String,
        /// Cause.
        source: io::Error,
    },
}

fn stderr_suffix(stderr: &str) -> String {
    if stderr.is_empty() {
        String::new()
    } else {
        format!(": {stderr}")
    }
}

/// Why the page could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The URL is not one a browser service may open.
    #[error("refusing to open the page: {0}")]
    Url(String),
    /// `$BROWSER` names no command.
    #[error("no browser command to try")]
    NoCommand,
    /// Every command failed.
    #[error("{}", join_attempts(.0))]
    Failed(Vec<AttemptError>),
}

/// Why the helper will not serve what answers on the socket.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DaemonError {
    /// The kernel did not say who serves the socket.
    #[error("cannot tell who serves the session socket: {0}")]
    Credentials(String),
    /// The socket is served by another ordinary user.
    #[error(
        "the session socket is served by uid {daemon}, which is neither root nor this user \
         (uid {own}), so it is not a herald-agent to take pages from; another user may have \
         taken the socket path: use a `[session] socket` in a directory only root (or this \
         user) can write to"
    )]
    Foreign {
        /// Uid of the process that serves the socket.
        daemon: u32,
        /// This helper's uid.
        own: u32,
    },
}

fn join_attempts(attempts: &[AttemptError]) -> String {
    attempts
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

// === browser commands ===

/// The browser commands to try, in order: `$BROWSER` split at `:` if it names any,
/// else [`DEFAULT_BROWSER`].
pub fn browser_commands(browser_env: Option<&str>) -> Vec<String> {
    let listed: Vec<String> = browser_env
        .unwrap_or_default()
        .split(':')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::to_string)
        .collect();
    if listed.is_empty() {
        vec![DEFAULT_BROWSER.to_string()]
    } else {
        listed
    }
}

/// The argument vector for one browser command and a URL: the command split with
/// shell-like quoting (no shell runs it), every `%s` replaced by the URL, or the URL
/// appended when there is no `%s`.
pub fn command_line(template: &str, url: &str) -> Result<Vec<String>, AttemptError> {
    let mut argv = shlex::split(template)
        .filter(|argv| argv.first().is_some_and(|program| !program.is_empty()))
        .ok_or_else(|| AttemptError::Parse(template.to_string()))?;
    if argv.iter().any(|a| a.contains("%s")) {
        for arg in &mut argv {
            *arg = arg.replace("%s", url);
        }
    } else {
        argv.push(url.to_string());
    }
    Ok(argv)
}

/// Opens `url` with the first of `commands` that works; returns that command's program.
/// A command that cannot start or fails within `wait` is followed by the next.
pub async fn launch(commands: &[String], url: &str, wait: Duration) -> Result<String, LaunchError> {
    check_browser_url(url).map_err(LaunchError::Url)?;
    if commands.is_empty() {
        return Err(LaunchError::NoCommand);
    }
    let mut attempts = Vec::new();
    for template in commands {
        let attempt = match command_line(template, url) {
            Ok(argv) => launch_one(&argv, wait).await.map(|()| argv[0].clone()),
            Err(e) => Err(e),
        };
        match attempt {
            Ok(program) => return Ok(program),
            Err(e) => {
                debug!("browser command failed, trying the next one: {e}");
                attempts.push(e);
            }
        }
    }
    Err(LaunchError::Failed(attempts))
}

/// Starts one browser command detached (own process group, no stdin/stdout) and judges
/// it within `wait`; a process still running then is reaped in the background.
async fn launch_one(argv: &[String], wait: Duration) -> Result<(), AttemptError> {
    let program = argv[0].clone();
    let mut child = tokio::process::Command::new(&program)
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|source| AttemptError::Spawn {
            program: program.clone(),
            source,
        })?;
    let tail = Arc::new(Mutex::new(Vec::new()));
    let reader = child
        .stderr
        .take()
        .map(|stderr| tokio::spawn(keep_tail(stderr, tail.clone())));
    match tokio::time::timeout(wait, child.wait()).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => {
            if let Some(reader) = reader {
                let _ = tokio::time::timeout(STDERR_GRACE, reader).await;
            }
            let stderr = String::from_utf8_lossy(&lock(&tail)).trim().to_string();
            Err(AttemptError::Exited {
                program,
                status: status.to_string(),
                stderr,
            })
        }
        Ok(Err(source)) => Err(AttemptError::Wait { program, source }),
        Err(_) => {
            // Still running: a browser started in the foreground. Reap it when it ends.
            tokio::spawn(async move {
                let _ = child.wait().await;
            });
            Ok(())
        }
    }
}

/// Reads `stream` to its end, keeping the last [`STDERR_TAIL`] bytes in `tail`.
async fn keep_tail(mut stream: impl AsyncRead + Unpin, tail: Arc<Mutex<Vec<u8>>>) {
    let mut chunk = [0u8; 4096];
    while let Ok(n) = stream.read(&mut chunk).await {
        if n == 0 {
            break;
        }
        let mut kept = lock(&tail);
        kept.extend_from_slice(&chunk[..n]);
        let excess = kept.len().saturating_sub(STDERR_TAIL);
        kept.drain(..excess);
    }
}

// === the helper ===

/// Whether a helper running as `own` may serve a daemon whose socket is held by
/// `daemon`: only root's (a system agent) or its own user's.
pub fn check_daemon(daemon: u32, own: u32) -> Result<(), DaemonError> {
    if daemon == 0 || daemon == own {
        Ok(())
    } else {
        Err(DaemonError::Foreign { daemon, own })
    }
}

/// [`check_daemon`] for a connected socket, from the kernel's peer credentials.
fn check_stream(stream: &UnixStream) -> Result<(), DaemonError> {
    let daemon = stream
        .peer_cred()
        .map_err(|e| DaemonError::Credentials(e.to_string()))?
        .uid();
    check_daemon(daemon, nix::unistd::Uid::effective().as_raw())
}

/// Where the helper looks for the daemon: `socket` if given; else the socket of the
/// agent with state directory `state_dir` (its `[session] socket` if its agent.toml is
/// readable); else the system agent's socket, then the user's own agent's.
pub fn helper_sockets(socket: Option<&Path>, state_dir: Option<&Path>) -> Vec<PathBuf> {
    let for_dir = |dir: &Path| {
        let settings = AgentConfig::load(dir)
            .map(|c| c.session)
            .unwrap_or_else(|_| SessionSettings::default());
        session::socket_path(dir, &settings)
    };
    if let Some(socket) = socket {
        return vec![socket.to_path_buf()];
    }
    if let Some(dir) = state_dir {
        return vec![for_dir(dir)];
    }
    let mut sockets = vec![PathBuf::from(session::SYSTEM_SOCKET)];
    let own = for_dir(&state::state_dir(None));
    if !sockets.contains(&own) {
        sockets.push(own);
    }
    sockets
}

/// How the helper runs.
#[derive(Debug, Clone)]
pub struct HelperOptions {
    /// Candidate sockets: the first that exists is used (the first if none does).
    pub sockets: Vec<PathBuf>,
    /// Browser commands, tried in order.
    pub browsers: Vec<String>,
    /// See [`LAUNCH_WAIT`].
    pub launch_wait: Duration,
    /// First reconnect backoff ceiling.
    pub backoff_base: Duration,
    /// Highest reconnect backoff ceiling.
    pub backoff_cap: Duration,
}

impl HelperOptions {
    /// Options for `herald-agent session`: sockets from the flags, browsers from
    /// `$BROWSER`, default timings.
    pub fn from_env(socket: Option<&Path>, state_dir: Option<&Path>) -> HelperOptions {
        let browser = std::env::var("BROWSER").ok();
        HelperOptions {
            sockets: helper_sockets(socket, state_dir),
            browsers: browser_commands(browser.as_deref()),
            launch_wait: LAUNCH_WAIT,
            backoff_base: RECONNECT_BASE,
            backoff_cap: RECONNECT_CAP,
        }
    }
}

/// `herald-agent session`: connects to the daemon and serves it until `shutdown`
/// resolves, reconnecting whenever the connection is lost.
pub async fn run(options: HelperOptions, shutdown: impl std::future::Future<Output = ()>) {
    // The desktop side outlives daemon connections: a notice shown before a daemon
    // restart can still be clicked after it.
    let (notices, to_show) = mpsc::unbounded_channel();
    let (events, mut reports) = mpsc::unbounded_channel();
    let desktop = show_notices(
        to_show,
        events,
        options.browsers.clone(),
        options.launch_wait,
    );
    tokio::select! {
        _ = connect_forever(&options, &notices, &mut reports) => {}
        _ = desktop => {}
        _ = shutdown => info!("session helper stopping"),
    }
}

async fn connect_forever(
    options: &HelperOptions,
    notices: &mpsc::UnboundedSender<Notice>,
    reports: &mut mpsc::UnboundedReceiver<NoticeEvent>,
) {
    let mut attempt: u32 = 0;
    let mut quiet = false;
    loop {
        let path = options
            .sockets
            .iter()
            .find(|p| p.exists())
            .or(options.sockets.first())
            .cloned()
            .unwrap_or_else(|| PathBuf::from(session::SYSTEM_SOCKET));
        match UnixStream::connect(&path).await {
            Ok(stream) => {
                if let Err(e) = check_stream(&stream) {
                    // Closed unread; said at every attempt, backing off as after a refusal.
                    warn!(socket = %path.display(), "refusing to serve this socket: {e}");
                    quiet = false;
                } else {
                    let (welcomed, why) =
                        serve_daemon(stream, &path, options, notices, reports).await;
                    if welcomed {
                        attempt = 0;
                        quiet = false;
                        info!(socket = %path.display(), %why, "lost the connection to herald-agent; reconnecting");
                    } else {
                        warn!(socket = %path.display(), %why, "herald-agent did not accept this helper");
                    }
                }
            }
            Err(e) if quiet => debug!(socket = %path.display(), "cannot reach herald-agent: {e}"),
            Err(e) => {
                // Said once per outage; the daemon may simply not be running yet.
                warn!(socket = %path.display(), "cannot reach herald-agent ({e}); will keep trying");
                quiet = true;
            }
        }
        let random = u64::from_le_bytes(herald_io::random_bytes());
        let delay =
            crate::backoff::backoff(attempt, options.backoff_base, options.backoff_cap, random);
        attempt = attempt.saturating_add(1);
        tokio::time::sleep(delay).await;
    }
}

/// One connection: answers `open` messages and hands `notify` messages to the desktop
/// (`notices`), sending the desktop's `reports`, until it ends. Returns whether the
/// daemon welcomed this helper, and why the connection ended.
async fn serve_daemon(
    stream: UnixStream,
    path: &Path,
    options: &HelperOptions,
    notices: &mpsc::UnboundedSender<Notice>,
    reports: &mut mpsc::UnboundedReceiver<NoticeEvent>,
) -> (bool, String) {
    let (read, mut write) = stream.into_split();
    let (answers, mut outgoing) = mpsc::unbounded_channel::<FromHelper>();
    let (welcome, welcomed_here) = oneshot::channel::<()>();
    let mut welcome = Some(welcome);
    let mut welcomed = false;
    let writer = async {
        // Notice reports wait for the welcome: a daemon that turns this helper away
        // would drop them, and the next one may take them.
        if welcomed_here.await.is_err() {
            return "closed before the welcome".to_string();
        }
        loop {
            let message = tokio::select! {
                Some(answer) = outgoing.recv() => answer,
                Some(report) = reports.recv() => FromHelper::Notice(report),
                else => return "stopped".to_string(),
            };
            if let Err(e) = session::write_line(&mut write, &message).await {
                return format!("write failed: {e}");
            }
        }
    };
    let reader = async {
        let mut reader = BufReader::new(read);
        loop {
            let line = match session::read_line(&mut reader).await {
                Ok(Some(line)) => line,
                Ok(None) => return "closed by herald-agent".to_string(),
                Err(e) => return e.to_string(),
            };
            match serde_json::from_str::<ToHelper>(&line) {
                Ok(ToHelper::Welcome { user }) => {
                    welcomed = true;
                    if let Some(welcome) = welcome.take() {
                        let _ = welcome.send(());
                    }
                    info!(socket = %path.display(), %user, "connected to herald-agent");
                }
                Ok(ToHelper::Rejected { reason }) => return reason,
                Ok(ToHelper::Open { job_id, url }) => {
                    // The URL carries a one-time ticket: log the job, not the URL.
                    info!(job_id, "opening a browser service");
                    let answers = answers.clone();
                    let browsers = options.browsers.clone();
                    let wait = options.launch_wait;
                    tokio::spawn(async move {
                        let answer = match launch(&browsers, &url, wait).await {
                            Ok(program) => {
                                info!(job_id, %program, "browser started");
                                FromHelper::Opened { job_id }
                            }
                            Err(e) => {
                                warn!(job_id, "could not open the browser");
                                FromHelper::Failed {
                                    job_id,
                                    error: e.to_string(),
                                }
                            }
                        };
                        let _ = answers.send(answer);
                    });
                }
                Ok(ToHelper::Notify(notice)) => {
                    debug!(message_id = %notice.message_id, "showing a message on the desktop");
                    // The desktop task lives as long as `run`, which outlives this.
                    let _ = notices.send(notice);
                }
                Err(e) => return format!("bad message from herald-agent: {e}"),
            }
        }
    };
    let why = tokio::select! {
        why = writer => why,
        why = reader => why,
    };
    (welcomed, why)
}

// === notices ===

/// Shows each notice on the desktop, one at a time, and turns what the person does into
/// reports on `events`. Connects to the session bus at the first notice, and again after
/// the bus or the notification service failed; opens a notice's link with `browsers`.
async fn show_notices(
    mut notices: mpsc::UnboundedReceiver<Notice>,
    events: mpsc::UnboundedSender<NoticeEvent>,
    browsers: Vec<String>,
    wait: Duration,
) {
    let (choices, mut chosen) = mpsc::unbounded_channel();
    let mut desktop: Option<Desktop> = None;
    loop {
        tokio::select! {
            notice = notices.recv() => {
                let Some(notice) = notice else { return };
                let message_id = notice.message_id.clone();
                if desktop.is_none() {
                    match Desktop::connect(choices.clone()).await {
                        Ok(connected) => desktop = Some(connected),
                        Err(e) => {
                            warn!(%message_id, "cannot show a message as a desktop notification: {e}");
                            continue;
                        }
                    }
                }
                let Some(connected) = &desktop else { continue };
                match connected.show(&notice).await {
                    Ok(id) => {
                        debug!(%message_id, id, "message shown on the desktop");
                        let _ = events.send(NoticeEvent::Displayed { message_id });
                    }
                    Err(e) => {
                        warn!(%message_id, "cannot show a message as a desktop notification: {e}");
                        // Reconnect for the next one: the bus or the service may be back.
                        desktop = None;
                    }
                }
            }
            Some((choice, notice)) = chosen.recv() => {
                let event = match choice {
                    Choice::Open => {
                        if let Some(link) = notice.link.clone() {
                            open_link(&browsers, link, wait, &notice.message_id);
                        }
                        // The person opened the message, whether or not its page did.
                        NoticeEvent::Opened { message_id: notice.message_id }
                    }
                    Choice::Block => NoticeEvent::Block {
                        message_id: notice.message_id,
                        sender: notice.sender,
                    },
                };
                info!(?event, "the person acted on a desktop notification");
                let _ = events.send(event);
            }
        }
    }
}

/// Opens a message's link in the background, the way browser services are opened
/// (the same URL rule and browser commands); a failure is only logged.
fn open_link(browsers: &[String], link: String, wait: Duration, message_id: &str) {
    let browsers = browsers.to_vec();
    let message_id = message_id.to_string();
    tokio::spawn(async move {
        match launch(&browsers, &link, wait).await {
            Ok(program) => info!(%message_id, %program, "opened the message's link"),
            Err(e) => warn!(%message_id, "cannot open the message's link: {e}"),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    const URL: &str = "https://h/s?a=1&herald_ticket=v1.2.3.ab";

    #[test]
    fn browser_list_splits_at_colons_or_falls_back() {
        assert_eq!(browser_commands(None), vec![DEFAULT_BROWSER]);
        assert_eq!(browser_commands(Some("  ")), vec![DEFAULT_BROWSER]);
        assert_eq!(
            browser_commands(Some("firefox %s: chromium::w3m")),
            vec!["firefox %s", "chromium", "w3m"]
        );
    }

    #[test]
    fn url_replaces_percent_s_or_is_appended_without_a_shell() {
        assert_eq!(command_line("firefox", URL).unwrap(), vec!["firefox", URL]);
        assert_eq!(
            command_line("firefox --new-window %s", URL).unwrap(),
            vec!["firefox", "--new-window", URL]
        );
        assert_eq!(
            command_line("'/opt/my browser/run' --url=%s -x", URL).unwrap(),
            vec!["/opt/my browser/run", &format!("--url={URL}"), "-x"]
        );
        // Shell syntax in the URL stays one literal argument.
        let nasty = "https://h/$(touch x);`id`";
        assert_eq!(command_line("b", nasty).unwrap(), vec!["b", nasty]);
        assert!(matches!(
            command_line("firefox 'unbalanced", URL),
            Err(AttemptError::Parse(_))
        ));
        assert!(matches!(
            command_line("''", URL),
            Err(AttemptError::Parse(_))
        ));
    }

    fn commands(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn a_missing_first_command_falls_back_to_the_next() {
        let used = launch(
            &commands(&["/nonexistent/herald-browser %s", "true"]),
            URL,
            LAUNCH_WAIT,
        )
        .await
        .unwrap();
        assert_eq!(used, "true");
    }

    #[tokio::test]
    async fn a_quick_failure_reports_the_stderr_tail() {
        let error = launch(
            &commands(&["sh -c 'echo cannot open display >&2; exit 3'"]),
            URL,
            LAUNCH_WAIT,
        )
        .await
        .unwrap_err();
        let text = error.to_string();
        assert!(text.contains("cannot open display"), "{text}");
        assert!(text.contains('3'), "{text}");
        let both = launch(&commands(&["/nonexistent/a", "false"]), URL, LAUNCH_WAIT)
            .await
            .unwrap_err();
        assert!(
            matches!(&both, LaunchError::Failed(a) if a.len() == 2),
            "{both:?}"
        );
    }

    #[tokio::test]
    async fn a_browser_still_running_after_the_wait_has_opened() {
        let start = Instant::now();
        launch(
            &commands(&["sh -c 'sleep 20' %s"]),
            URL,
            Duration::from_millis(300),
        )
        .await
        .unwrap();
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    #[tokio::test]
    async fn urls_outside_the_rule_are_not_opened() {
        let error = launch(&commands(&["true"]), "http://example.invalid/", LAUNCH_WAIT)
            .await
            .unwrap_err();
        assert!(matches!(error, LaunchError::Url(_)), "{error:?}");
    }

    #[test]
    fn only_a_root_or_own_daemon_is_served() {
        assert_eq!(check_daemon(0, 1000), Ok(()));
        assert_eq!(check_daemon(1000, 1000), Ok(()));
        assert_eq!(check_daemon(0, 0), Ok(()));
        // A squatter on the socket path: another ordinary user.
        let refused = check_daemon(1001, 1000).unwrap_err();
        assert_eq!(
            refused,
            DaemonError::Foreign {
                daemon: 1001,
                own: 1000
            }
        );
        let text = refused.to_string();
        assert!(
            text.contains("uid 1001") && text.contains("[session] socket"),
            "{text}"
        );
        // Root's helper does not serve an ordinary user's daemon either.
        assert!(check_daemon(1000, 0).is_err());
    }

    #[tokio::test]
    async fn the_daemon_side_is_checked_by_its_peer_credentials() {
        let nonce: [u8; 4] = herald_io::random_bytes();
        let dir = std::env::temp_dir().join(format!(
            "herald-browser-cred-{}-{}",
            std::process::id(),
            hex::encode(nonce)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join(session::SOCKET_FILE);
        let _listener = session::bind(&socket, false).unwrap();
        // Served by this process, so by this user (or root): trusted.
        let stream = UnixStream::connect(&socket).await.unwrap();
        assert_eq!(check_stream(&stream), Ok(()));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn the_helper_opens_what_the_daemon_hands_it() {
        let nonce: [u8; 4] = herald_io::random_bytes();
        let dir = std::env::temp_dir().join(format!(
            "herald-browser-{}-{}",
            std::process::id(),
            hex::encode(nonce)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join(session::SOCKET_FILE);
        let record = dir.join("opened");
        let listener = session::bind(&socket, false).unwrap();
        let sessions = Arc::new(session::Sessions::new(
            &SessionSettings::default(),
            nix::unistd::Uid::effective().as_raw(),
            Duration::from_secs(20),
        ));
        let server = tokio::spawn(session::serve(listener, sessions.clone()));
        let options = HelperOptions {
            sockets: vec![socket.clone()],
            browsers: vec![format!("sh -c 'echo \"$0\" >> {}'", record.display())],
            launch_wait: LAUNCH_WAIT,
            backoff_base: Duration::from_millis(20),
            backoff_cap: Duration::from_millis(100),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let helper = tokio::spawn(run(options, async {
            let _ = stopped.await;
        }));
        let deadline = Instant::now() + Duration::from_secs(20);
        while sessions.helpers().is_empty() {
            assert!(Instant::now() < deadline, "helper never connected");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        sessions.open(1, URL).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(&record).unwrap(),
            format!("{URL}\n")
        );

        // The daemon restarts: the helper comes back by itself.
        server.abort();
        let _ = server.await;
        let sessions = Arc::new(session::Sessions::new(
            &SessionSettings::default(),
            nix::unistd::Uid::effective().as_raw(),
            Duration::from_secs(20),
        ));
        // The stale socket file is replaced; the old connections closed with `serve`.
        let listener = session::bind(&socket, false).unwrap();
        tokio::spawn(session::serve(listener, sessions.clone()));
        while sessions.helpers().is_empty() {
            assert!(Instant::now() < deadline, "helper never reconnected");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = stop.send(());
        helper.await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
