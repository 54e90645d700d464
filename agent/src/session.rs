//! The daemon side of the user-session helper: a local Unix socket that
//! `herald-agent session` processes connect to from people's desktop sessions, the check
//! of who is connecting (the kernel's peer credentials, never anything the peer says),
//! and the hand-over of browser services to the right helper.
//!
//! The daemon usually runs as a system service with no display, so it cannot open a
//! browser itself; the helper, started at login, can. The wire format is one JSON object
//! per line, each line at most [`LINE_LIMIT`] bytes:
//!
//! - daemon → helper: `{"welcome":{"user":"alice"}}` once accepted,
//!   `{"rejected":{"reason":"..."}}` before closing a refused peer,
//!   `{"open":{"job_id":N,"url":"..."}}`, and `{"notify":{...}}` with a
//!   [`Notice`](crate::notify::Notice) to show on the desktop (no answer is awaited);
//! - helper → daemon: `{"opened":{"job_id":N}}` or `{"failed":{"job_id":N,"error":"..."}}`
//!   for an `open`, and `{"notice":{"displayed":{"message_id":"..."}}}`,
//!   `{"notice":{"opened":{"message_id":"..."}}}` or
//!   `{"notice":{"block":{"message_id":"...","sender":"..."}}}` (a
//!   [`NoticeEvent`](crate::notify::NoticeEvent)) for a notice, at any later time: the
//!   person may click a notice long after it appeared, after the helper has reconnected.
//!
//! A line that is too long or does not parse closes that helper's connection. A notice
//! whose line would be too long has its body shortened ([`fit_notice`]). A notice event
//! is passed on only for a message handed to a helper of the same uid, and a `block`
//! only for that message's own sender, so a helper cannot block senders of messages it
//! was never shown.
//!
//! Who may connect ([`admit`]): a daemon that is not root, only its own uid; a root
//! daemon with `[session] users`, only those users; a root daemon without it, root and
//! the person at the machine ([`seat_user`]: the active user of logind's `seat0` on
//! Linux, the owner of `/dev/console` on macOS), and nobody else when that cannot be
//! told. Otherwise any local account could connect a helper and receive the browser
//! jobs with their one-time tickets. Each uid has at most [`MAX_HELPERS_PER_UID`]
//! connections, so no user can fill the table ([`MAX_HELPERS`]) and lock the others out.
//!
//! Socket path ([`socket_path`]): `[session] socket` in `agent.toml` if set (relative to
//! the state directory); else [`SYSTEM_SOCKET`] (`/run/herald-agent/session.sock`) when
//! the state directory is the system one (`/var/lib/herald-agent`); else `session.sock`
//! inside the state directory. Two agents with different state directories therefore
//! never share a socket, even when both run as root (as the end-to-end tests do).

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use herald_shared::protocol::JobId;

use crate::notify::{Notice, NoticeEvent};
use crate::state::{SessionSettings, SYSTEM_STATE_DIR};
use crate::sync::lock;

/// The helpers' socket of a system install (state directory [`SYSTEM_STATE_DIR`]).
#[cfg(not(target_os = "macos"))]
pub const SYSTEM_SOCKET: &str = "/run/herald-agent/session.sock";
/// The helpers' socket of a system install (state directory [`SYSTEM_STATE_DIR`]); macOS
/// has no `/run`.
#[cfg(target_os = "macos")]
pub const SYSTEM_SOCKET: &str = "/var/run/herald-agent/session.sock";
/// The helpers' socket inside any other state directory.
pub const SOCKET_FILE: &str = "session.sock";
/// Longest line either side accepts, newline included.
pub const LINE_LIMIT: usize = 16 * 1024;
/// How long the daemon waits for a helper to say whether the browser opened.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
/// At most this many helpers are connected at once; more are turned away.
pub const MAX_HELPERS: usize = 64;
/// At most this many helpers of one uid are connected at once (a login session runs
/// one; a few more allow for reconnects racing the old connection's end).
pub const MAX_HELPERS_PER_UID: usize = 4;
/// Where the daemon learns who sits at the machine: logind's record of `seat0`, whose
/// `ACTIVE_UID=` line names the user of the session in the foreground.
#[cfg(not(target_os = "macos"))]
pub const SEAT_FILE: &str = "/run/systemd/seats/seat0";
/// Where the daemon learns who sits at the machine: the owner of the console device is
/// the user logged in at the screen (root at the login window).
#[cfg(target_os = "macos")]
pub const SEAT_FILE: &str = "/dev/console";
/// Longest error text kept from a helper.
const ERROR_LIMIT: usize = 2000;
/// How many handed-out notices the daemon remembers to check the helpers' reports
/// against; a report about an older one is dropped (the message stays in the inbox).
pub const NOTICES_KEPT: usize = 1024;

/// Daemon → helper.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ToHelper {
    /// The helper was accepted, as this user.
    Welcome {
        /// User name the daemon sees for the helper.
        user: String,
    },
    /// The helper is not accepted; the connection closes after this line.
    Rejected {
        /// Why.
        reason: String,
    },
    /// Open this page in the user's browser.
    Open {
        /// The job this belongs to (echoed in the answer).
        job_id: JobId,
        /// The page, ticket included.
        url: String,
    },
    /// Show this message on the desktop; what happens to it comes back as
    /// [`FromHelper::Notice`], whenever it happens.
    Notify(Notice),
}

/// Helper → daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum FromHelper {
    /// The browser was started for this job.
    Opened {
        /// Job id from the `open` message.
        job_id: JobId,
    },
    /// The browser could not be started.
    Failed {
        /// Job id from the `open` message.
        job_id: JobId,
        /// What went wrong.
        error: String,
    },
    /// What happened to a notice from a `notify` message.
    Notice(NoticeEvent),
}

/// Errors setting up the helpers' socket.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The socket's directory could not be created or inspected.
    #[error("cannot prepare the session socket directory {path}: {source}")]
    Dir {
        /// Directory.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// A live process answers on the socket path.
    #[error(
        "another herald-agent already serves session helpers at {0}; give this agent its own \
         `[session] socket` in agent.toml"
    )]
    InUse(PathBuf),
    /// Something that is not a socket sits at the socket path.
    #[error("{0} exists and is not a socket; remove it or set another `[session] socket`")]
    NotSocket(PathBuf),
    /// Binding or setting permissions failed.
    #[error("cannot listen on {path}: {source}{hint}")]
    Bind {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
        /// Advice, if any.
        hint: &'static str,
    },
}

/// Why a browser service could not be handed to a helper.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// No (suitable) helper is connected.
    #[error(
        "no user-session helper{} is connected, so there is no browser to open the page in: \
         the person at this machine must be logged in to a desktop session running \
         `herald-agent session` (installed to start at login from installers/, or started by hand)",
        .user.as_ref().map(|u| format!(" of user {u}")).unwrap_or_default()
    )]
    NoHelper {
        /// The user `[session] user` asks for, if any.
        user: Option<String>,
    },
    /// The daemon could not open its socket, so no helper can connect.
    #[error("the session helper socket is not available ({0}); see the agent log")]
    NoSocket(String),
    /// The helper tried and failed.
    #[error("the session helper of user {user} could not open the browser: {error}")]
    Helper {
        /// Helper's user.
        user: String,
        /// Its report.
        error: String,
    },
    /// The helper did not answer in time.
    #[error("the session helper of user {user} did not answer within {secs} s")]
    TimedOut {
        /// Helper's user.
        user: String,
        /// Seconds waited.
        secs: u64,
    },
    /// The helper went away before answering.
    #[error("the session helper of user {user} disconnected before answering")]
    Disconnected {
        /// Helper's user.
        user: String,
    },
}

/// Errors reading one line.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LineError {
    /// Longer than [`LINE_LIMIT`].
    #[error("line longer than {LINE_LIMIT} bytes")]
    TooLong,
    /// The stream ended in the middle of a line.
    #[error("connection closed in the middle of a line")]
    Truncated,
    /// Not UTF-8.
    #[error("line is not UTF-8")]
    NotUtf8,
    /// I/O error.
    #[error(transparent)]
    Io(#[from] io::Error),
}

// === socket path and peer check ===

/// The helpers' socket for an agent with this state directory and settings (see the
/// module documentation).
pub fn socket_path(state_dir: &Path, settings: &SessionSettings) -> PathBuf {
    match &settings.socket {
        Some(socket) => state_dir.join(socket),
        None if state_dir == Path::new(SYSTEM_STATE_DIR) => PathBuf::from(SYSTEM_SOCKET),
        None => state_dir.join(SOCKET_FILE),
    }
}

/// A connecting process, as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Effective uid.
    pub uid: u32,
    /// Its user name, if the uid resolves to one.
    pub user: Option<String>,
}

impl Peer {
    fn display_name(&self) -> String {
        self.user
            .clone()
            .unwrap_or_else(|| format!("uid {}", self.uid))
    }
}

/// Whether a daemon running as `daemon_uid` accepts a helper from `peer`, given
/// `[session] users` and the uid of the person at the machine (`seat`, see
/// [`seat_user`]; `None` when it cannot be told):
///
/// - a daemon that is not root accepts only its own uid;
/// - a root daemon with `users` accepts only those users;
/// - a root daemon without `users` accepts root and the seat's user, and when the seat's
///   user cannot be told, root only (the reason then tells the admin to set `users`).
pub fn admit(
    daemon_uid: u32,
    peer: &Peer,
    users: &[String],
    seat: Option<u32>,
) -> Result<(), String> {
    if daemon_uid != 0 {
        return if peer.uid == daemon_uid {
            Ok(())
        } else {
            Err(format!(
                "this herald-agent runs as uid {daemon_uid} and accepts only helpers of that \
                 user, not {}",
                peer.display_name()
            ))
        };
    }
    if !users.is_empty() {
        return if peer.user.as_ref().is_some_and(|u| users.contains(u)) {
            Ok(())
        } else {
            Err(format!(
                "{} is not listed in `[session] users` of this herald-agent",
                peer.display_name()
            ))
        };
    }
    match seat {
        _ if peer.uid == 0 => Ok(()),
        Some(uid) if uid == peer.uid => Ok(()),
        Some(uid) => Err(format!(
            "{} is not the user at this machine's screen (uid {uid}); this herald-agent \
             accepts only that user's helper, unless `[session] users` in its agent.toml \
             lists others",
            peer.display_name()
        )),
        None => Err(format!(
            "this herald-agent cannot tell who is at this machine's screen (no logind seat \
             with an active user), so it accepts no helper of {}; the admin must list the \
             users whose helpers may connect as `[session] users = [\"name\", ...]` in \
             agent.toml",
            peer.display_name()
        )),
    }
}

/// The uid of the person at the machine, read from `seat_file` ([`SEAT_FILE`]): on
/// Linux its `ACTIVE_UID=` line, on macOS its owner. `None` when there is no such file
/// (no logind, as in containers) or no active user.
pub fn seat_user(seat_file: &Path) -> Option<u32> {
    #[cfg(target_os = "macos")]
    {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(seat_file).ok().map(|m| m.uid())
    }
    #[cfg(not(target_os = "macos"))]
    {
        std::fs::read_to_string(seat_file)
            .ok()
            .and_then(|text| active_uid(&text))
    }
}

/// The `ACTIVE_UID=` value of a logind seat file (plain `KEY=value` lines).
pub fn active_uid(seat_file: &str) -> Option<u32> {
    seat_file
        .lines()
        .find_map(|line| line.trim().strip_prefix("ACTIVE_UID="))
        .and_then(|uid| uid.trim().parse().ok())
}

fn user_name(uid: u32) -> Option<String> {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
}

/// Prepares and binds the helpers' socket: creates a missing directory (0755 when
/// `shared`, else 0700), removes a stale socket file (refusing if a live process still
/// answers on it), binds, and sets the socket's mode (0666 when `shared`, because the
/// peer check is the access control; else 0600). Needs a tokio runtime.
pub fn bind(path: &Path, shared: bool) -> Result<UnixListener, SessionError> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(if shared { 0o755 } else { 0o700 })
                .create(dir)
                .map_err(|source| SessionError::Dir {
                    path: dir.to_path_buf(),
                    source,
                })?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(SessionError::InUse(path.to_path_buf()));
            }
            let _ = std::fs::remove_file(path);
        }
        Ok(_) => return Err(SessionError::NotSocket(path.to_path_buf())),
        Err(_) => {}
    }
    let bind_error = |source: io::Error| SessionError::Bind {
        path: path.to_path_buf(),
        hint: if path.as_os_str().len() > 100 {
            " (the path may be too long for a Unix socket; set a shorter `[session] socket`)"
        } else {
            ""
        },
        source,
    };
    let listener = UnixListener::bind(path).map_err(bind_error)?;
    std::fs::set_permissions(
        path,
        std::fs::Permissions::from_mode(if shared { 0o666 } else { 0o600 }),
    )
    .map_err(bind_error)?;
    Ok(listener)
}

// === line I/O, shared with the helper side ===

/// Reads one line of at most [`LINE_LIMIT`] bytes (without its newline); `None` at a
/// clean end of stream.
pub(crate) async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
) -> Result<Option<String>, LineError> {
    let mut buf = Vec::new();
    let n = reader
        .take(LINE_LIMIT as u64)
        .read_until(b'\n', &mut buf)
        .await?;
    if n == 0 {
        return Ok(None);
    }
    if buf.pop() != Some(b'\n') {
        return Err(if n >= LINE_LIMIT {
            LineError::TooLong
        } else {
            LineError::Truncated
        });
    }
    String::from_utf8(buf)
        .map(Some)
        .map_err(|_| LineError::NotUtf8)
}

/// Writes one message as a JSON line.
pub(crate) async fn write_line<W: AsyncWrite + Unpin, T: Serialize>(
    writer: &mut W,
    message: &T,
) -> io::Result<()> {
    let mut line = serde_json::to_vec(message).map_err(io::Error::other)?;
    line.push(b'\n');
    writer.write_all(&line).await?;
    writer.flush().await
}

// === impl Sessions ===

/// The connected helpers, and the browser services waiting for their answer.
pub struct Sessions {
    daemon_uid: u32,
    users: Vec<String>,
    preferred: Option<String>,
    seat_file: PathBuf,
    answer_timeout: Duration,
    registry: Mutex<Registry>,
    notice_events: mpsc::UnboundedSender<NoticeEvent>,
    notice_receiver: Mutex<Option<mpsc::UnboundedReceiver<NoticeEvent>>>,
}

#[derive(Default)]
struct Registry {
    next_id: u64,
    /// Oldest first.
    helpers: Vec<Helper>,
    pending: HashMap<JobId, Pending>,
    unavailable: Option<String>,
    notices: HandedNotices,
}

/// The notices handed to helpers, by message id, at most [`NOTICES_KEPT`]: the uid of
/// the helper that got each, and the message's sender.
#[derive(Default)]
struct HandedNotices {
    given: HashMap<String, (u32, String)>,
    /// Message ids, oldest first.
    order: std::collections::VecDeque<String>,
}

impl HandedNotices {
    fn insert(&mut self, message_id: &str, uid: u32, sender: &str) {
        let previous = self
            .given
            .insert(message_id.to_string(), (uid, sender.to_string()));
        if previous.is_none() {
            self.order.push_back(message_id.to_string());
        }
        while self.order.len() > NOTICES_KEPT {
            if let Some(old) = self.order.pop_front() {
                self.given.remove(&old);
            }
        }
    }

    /// Whether a helper of `uid` may report `event`: the message was handed to that uid,
    /// and a block names the message's own sender.
    fn allows(&self, uid: u32, event: &NoticeEvent) -> bool {
        let (message_id, sender) = match event {
            NoticeEvent::Displayed { message_id } | NoticeEvent::Opened { message_id } => {
                (message_id, None)
            }
            NoticeEvent::Block { message_id, sender } => (message_id, Some(sender)),
        };
        self.given
            .get(message_id)
            .is_some_and(|(given_uid, given_sender)| {
                *given_uid == uid && sender.is_none_or(|s| s == given_sender)
            })
    }
}

struct Helper {
    id: u64,
    uid: u32,
    user: String,
    sender: mpsc::UnboundedSender<ToHelper>,
}

/// Why a helper that passed [`admit`] is still turned away.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum RegisterError {
    /// Its uid already has [`MAX_HELPERS_PER_UID`] connections.
    #[error("{user} already has {MAX_HELPERS_PER_UID} session helpers connected")]
    UidFull {
        /// The helper's user.
        user: String,
    },
    /// [`MAX_HELPERS`] are connected.
    #[error("already {MAX_HELPERS} session helpers connected")]
    Full,
}

struct Pending {
    helper: u64,
    answer: oneshot::Sender<Result<(), String>>,
}

impl Sessions {
    /// An empty registry for a daemon running as `daemon_uid`, waiting `answer_timeout`
    /// for each helper answer, learning who is at the machine from [`SEAT_FILE`].
    pub fn new(settings: &SessionSettings, daemon_uid: u32, answer_timeout: Duration) -> Sessions {
        let (notice_events, notice_receiver) = mpsc::unbounded_channel();
        Sessions {
            daemon_uid,
            users: settings.users.clone(),
            preferred: settings.user.clone(),
            seat_file: PathBuf::from(SEAT_FILE),
            answer_timeout,
            registry: Mutex::new(Registry::default()),
            notice_events,
            notice_receiver: Mutex::new(Some(notice_receiver)),
        }
    }

    /// The same, learning who is at the machine from `seat_file` instead (see
    /// [`seat_user`]).
    pub fn with_seat_file(self, seat_file: PathBuf) -> Sessions {
        Sessions { seat_file, ..self }
    }

    /// The uid of the person at the machine, read now; only a root daemon asks (any
    /// other accepts only its own uid anyway).
    fn seat(&self) -> Option<u32> {
        (self.daemon_uid == 0)
            .then(|| seat_user(&self.seat_file))
            .flatten()
    }

    /// Records that the socket could not be opened, so browser jobs say why.
    pub fn set_unavailable(&self, reason: String) {
        lock(&self.registry).unavailable = Some(reason);
    }

    /// The users of the connected helpers, oldest connection first.
    pub fn helpers(&self) -> Vec<String> {
        lock(&self.registry)
            .helpers
            .iter()
            .map(|h| h.user.clone())
            .collect()
    }

    /// Hands a notice to the helper of the person at the machine (chosen as for
    /// [`Sessions::open`]), without waiting; returns whether a helper took it. What the
    /// helper then reports comes out of [`Sessions::notice_events`].
    pub fn notify(&self, notice: &crate::notify::Notice) -> bool {
        let seat = self.seat();
        let mut registry = lock(&self.registry);
        let Ok(helper) = self.choose(&registry, seat) else {
            return false;
        };
        let uid = helper.uid;
        let sent = helper.sender.send(ToHelper::Notify(fit_notice(notice)));
        if sent.is_err() {
            return false;
        }
        registry
            .notices
            .insert(&notice.message_id, uid, &notice.sender);
        true
    }

    /// The stream of what helpers report about notices (displayed, opened, "block this
    /// sender"). The first call gets the receiver; later calls get `None`.
    pub fn notice_events(&self) -> Option<mpsc::UnboundedReceiver<crate::notify::NoticeEvent>> {
        lock(&self.notice_receiver).take()
    }

    /// The helper for a browser page or a notice: see [`Sessions::open`]. The error, when
    /// there is none, says why.
    fn choose<'r>(
        &self,
        registry: &'r Registry,
        seat: Option<u32>,
    ) -> Result<&'r Helper, OpenError> {
        let wanted = self.preferred.as_ref().filter(|_| self.daemon_uid == 0);
        let helpers = &registry.helpers;
        let at_screen = seat.and_then(|seat| helpers.iter().rev().find(|h| h.uid == seat));
        let chosen = at_screen.or_else(|| {
            helpers
                .iter()
                .rev()
                .find(|h| wanted.is_none_or(|w| &h.user == w))
        });
        match chosen {
            Some(helper) => Ok(helper),
            None => Err(match &registry.unavailable {
                Some(reason) => OpenError::NoSocket(reason.clone()),
                None => OpenError::NoHelper {
                    user: wanted.cloned(),
                },
            }),
        }
    }

    /// Hands a page to a helper and waits for its answer. The helper is, most recent
    /// connection first: one of the user at the machine's screen (read now, since people
    /// switch); else, for a root daemon with `[session] user`, that user's (and none
    /// other); else any. Returns the user whose browser opened it.
    pub async fn open(&self, job_id: JobId, url: &str) -> Result<String, OpenError> {
        let seat = self.seat();
        let (answer, answered) = oneshot::channel();
        let user = {
            let mut registry = lock(&self.registry);
            let helper = self.choose(&registry, seat)?;
            let (id, user) = (helper.id, helper.user.clone());
            let sent = helper.sender.send(ToHelper::Open {
                job_id,
                url: url.to_string(),
            });
            if sent.is_err() {
                return Err(OpenError::Disconnected { user });
            }
            registry
                .pending
                .insert(job_id, Pending { helper: id, answer });
            user
        };
        match tokio::time::timeout(self.answer_timeout, answered).await {
            Ok(Ok(Ok(()))) => Ok(user),
            Ok(Ok(Err(error))) => Err(OpenError::Helper { user, error }),
            Ok(Err(_)) => Err(OpenError::Disconnected { user }),
            Err(_) => {
                lock(&self.registry).pending.remove(&job_id);
                Err(OpenError::TimedOut {
                    user,
                    secs: self.answer_timeout.as_secs(),
                })
            }
        }
    }

    /// Adds an admitted helper, unless its uid or the whole table is full.
    fn register(
        &self,
        peer: &Peer,
        sender: mpsc::UnboundedSender<ToHelper>,
    ) -> Result<u64, RegisterError> {
        let user = peer.display_name();
        let mut registry = lock(&self.registry);
        let of_uid = registry
            .helpers
            .iter()
            .filter(|h| h.uid == peer.uid)
            .count();
        if of_uid >= MAX_HELPERS_PER_UID {
            return Err(RegisterError::UidFull { user });
        }
        if registry.helpers.len() >= MAX_HELPERS {
            return Err(RegisterError::Full);
        }
        registry.next_id += 1;
        let id = registry.next_id;
        registry.helpers.push(Helper {
            id,
            uid: peer.uid,
            user,
            sender,
        });
        Ok(id)
    }

    fn unregister(&self, id: u64) {
        let mut registry = lock(&self.registry);
        registry.helpers.retain(|h| h.id != id);
        // Dropping the senders tells the waiting jobs the helper went away.
        registry.pending.retain(|_, p| p.helper != id);
    }

    fn answer(&self, helper: u64, message: FromHelper) {
        let (job_id, outcome) = match message {
            FromHelper::Notice(event) => return self.notice_event(helper, event),
            FromHelper::Opened { job_id } => (job_id, Ok(())),
            FromHelper::Failed { job_id, mut error } => {
                if error.len() > ERROR_LIMIT {
                    let mut cut = ERROR_LIMIT;
                    while !error.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    error.truncate(cut);
                    error.push('…');
                }
                (job_id, Err(error))
            }
        };
        let mut registry = lock(&self.registry);
        match registry.pending.get(&job_id) {
            Some(pending) if pending.helper == helper => {
                if let Some(pending) = registry.pending.remove(&job_id) {
                    let _ = pending.answer.send(outcome);
                }
            }
            _ => warn!(job_id, "session helper answered for a job it was not given"),
        }
    }

    /// Passes on a helper's report about a notice, if that helper's uid was given it.
    fn notice_event(&self, helper: u64, event: NoticeEvent) {
        let registry = lock(&self.registry);
        let uid = registry
            .helpers
            .iter()
            .find(|h| h.id == helper)
            .map(|h| h.uid);
        if !uid.is_some_and(|uid| registry.notices.allows(uid, &event)) {
            warn!(
                ?event,
                "session helper reported on a notice it was not given; ignored"
            );
            return;
        }
        // Nobody listening (no inbox in this daemon): the report has nowhere to go.
        let _ = self.notice_events.send(event);
    }

    /// Serves one connection: peer check, registration, messages until it closes.
    async fn handle(self: Arc<Self>, stream: UnixStream) {
        let uid = match stream.peer_cred() {
            Ok(cred) => cred.uid(),
            Err(e) => {
                warn!("cannot read a session helper's credentials, closing: {e}");
                return;
            }
        };
        let peer = Peer {
            uid,
            user: user_name(uid),
        };
        let (read, mut write) = stream.into_split();
        if let Err(reason) = admit(self.daemon_uid, &peer, &self.users, self.seat()) {
            warn!(uid, %reason, "session helper refused");
            let _ = write_line(&mut write, &ToHelper::Rejected { reason }).await;
            return;
        }
        let user = peer.display_name();
        let (sender, mut outgoing) = mpsc::unbounded_channel();
        let _ = sender.send(ToHelper::Welcome { user: user.clone() });
        let id = match self.register(&peer, sender) {
            Ok(id) => id,
            Err(e) => {
                let reason = e.to_string();
                warn!(uid, %reason, "session helper refused");
                let _ = write_line(&mut write, &ToHelper::Rejected { reason }).await;
                return;
            }
        };
        info!(%user, uid, "session helper connected");
        let writer = async {
            while let Some(message) = outgoing.recv().await {
                if let Err(e) = write_line(&mut write, &message).await {
                    return format!("write failed: {e}");
                }
            }
            "registry dropped".to_string()
        };
        let reader = async {
            let mut reader = tokio::io::BufReader::new(read);
            loop {
                match read_line(&mut reader).await {
                    Ok(Some(line)) => match serde_json::from_str::<FromHelper>(&line) {
                        Ok(message) => self.answer(id, message),
                        Err(e) => return format!("bad message, closing: {e}"),
                    },
                    Ok(None) => return "closed".to_string(),
                    Err(e) => return format!("{e}, closing"),
                }
            }
        };
        let why = tokio::select! {
            why = writer => why,
            why = reader => why,
        };
        self.unregister(id);
        info!(%user, uid, %why, "session helper disconnected");
    }
}

/// Accepts helpers on `listener` until the future is dropped, which also closes every
/// helper connection (they reconnect to the next daemon).
pub async fn serve(listener: UnixListener, sessions: Arc<Sessions>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(sessions.clone().handle(stream));
                }
                Err(e) => {
                    // Out of descriptors and the like: do not spin.
                    warn!("accepting a session helper failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// `notice` as sent to a helper: with its body shortened (at a character boundary, ending
/// in `…`) so that its `notify` line fits in [`LINE_LIMIT`]; the whole message stays in
/// the inbox. The other fields are short by the inbox's limits; should they not be, the
/// body goes entirely and the title is shortened too.
pub fn fit_notice(notice: &Notice) -> Notice {
    let fits = |n: &Notice| {
        serde_json::to_vec(&ToHelper::Notify(n.clone())).is_ok_and(|line| line.len() < LINE_LIMIT)
        // the newline takes the last byte
    };
    let mut fitted = notice.clone();
    if fits(&fitted) {
        return fitted;
    }
    fitted.body = cut_to_fit(&notice.body, |body| {
        fits(&Notice {
            body: body.to_string(),
            ..notice.clone()
        })
    });
    if !fits(&fitted) {
        fitted.title = cut_to_fit(&notice.title, |title| {
            fits(&Notice {
                title: title.to_string(),
                ..fitted.clone()
            })
        });
    }
    fitted
}

/// The longest start of `text`, cut at a character boundary and marked with `…`, that
/// `fits` (found by bisection, since JSON escapes make the size of a cut unpredictable);
/// empty if none does.
fn cut_to_fit(text: &str, fits: impl Fn(&str) -> bool) -> String {
    let cut = |end: usize| format!("{}…", &text[..end]);
    let boundaries: Vec<usize> = text.char_indices().map(|(i, _)| i).collect();
    // Invariant: boundaries[..low] fit (the empty start counts as fitting), from `high` on
    // they do not.
    let (mut low, mut high) = (0, boundaries.len());
    while low < high {
        let middle = (low + high) / 2;
        if fits(&cut(boundaries[middle])) {
            low = middle + 1;
        } else {
            high = middle;
        }
    }
    match low {
        0 => String::new(),
        n => cut(boundaries[n - 1]),
    }
}

/// `url` with the one-time `ticket` added as the query parameter `herald_ticket`:
/// after an existing query, before any `#fragment`. Characters outside the unreserved
/// set are percent-encoded, so a ticket cannot add parameters or change the page.
pub fn with_ticket(url: &str, ticket: &str) -> String {
    let (base, fragment) = url.split_at(url.find('#').unwrap_or(url.len()));
    let separator = match base.find('?') {
        None => "?",
        Some(_) if base.ends_with('?') || base.ends_with('&') => "",
        Some(_) => "&",
    };
    format!(
        "{base}{separator}herald_ticket={}{fragment}",
        encode(ticket)
    )
}

/// Percent-encodes everything outside RFC 3986's unreserved characters.
pub fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::BufReader;

    fn peer(uid: u32, user: &str) -> Peer {
        Peer {
            uid,
            user: Some(user.to_string()),
        }
    }

    #[test]
    fn a_user_daemon_accepts_only_its_own_uid() {
        for seat in [None, Some(1000), Some(1001)] {
            assert_eq!(admit(1000, &peer(1000, "alice"), &[], seat), Ok(()));
            let refused = admit(1000, &peer(1001, "bob"), &[], seat).unwrap_err();
            assert!(refused.contains("bob"), "{refused}");
            // Not even root, and `users` does not widen it.
            assert!(admit(1000, &peer(0, "root"), &[], seat).is_err());
            assert!(admit(1000, &peer(1001, "bob"), &["bob".into()], seat).is_err());
        }
    }

    #[test]
    fn a_root_daemon_without_users_admits_root_and_the_seat_user_only() {
        let seat = Some(1000);
        assert_eq!(admit(0, &peer(1000, "alice"), &[], seat), Ok(()));
        assert_eq!(admit(0, &peer(0, "root"), &[], seat), Ok(()));
        // An SSH user or a service account is not the person at the machine.
        let refused = admit(0, &peer(33, "www-data"), &[], seat).unwrap_err();
        assert!(refused.contains("www-data"), "{refused}");
        assert!(refused.contains("[session] users"), "{refused}");
        let nameless = Peer {
            uid: 4242,
            user: None,
        };
        assert!(admit(0, &nameless, &[], seat)
            .unwrap_err()
            .contains("uid 4242"));
    }

    #[test]
    fn a_root_daemon_that_cannot_tell_the_seat_user_admits_root_only_and_says_to_set_users() {
        assert_eq!(admit(0, &peer(0, "root"), &[], None), Ok(()));
        let refused = admit(0, &peer(1000, "alice"), &[], None).unwrap_err();
        assert!(refused.contains("alice"), "{refused}");
        assert!(refused.contains("`[session] users = ["), "{refused}");
    }

    #[test]
    fn a_root_daemon_with_users_admits_only_those() {
        let users = vec!["alice".to_string()];
        for seat in [None, Some(1000), Some(1001)] {
            assert_eq!(admit(0, &peer(1000, "alice"), &users, seat), Ok(()));
            let refused = admit(0, &peer(1001, "bob"), &users, seat).unwrap_err();
            assert!(refused.contains("bob"), "{refused}");
            let nameless = Peer {
                uid: 4242,
                user: None,
            };
            assert!(admit(0, &nameless, &users, seat)
                .unwrap_err()
                .contains("uid 4242"));
        }
    }

    #[test]
    fn the_seat_user_is_the_active_uid_logind_records() {
        let seat0 = "IS_SEAT0=1\nCAN_MULTI_SESSION=1\nACTIVE=c2\nACTIVE_UID=1000\n\
                     SESSIONS=c2 c1\nUIDS=1000 1001\n";
        assert_eq!(active_uid(seat0), Some(1000));
        // Nobody in the foreground (the greeter gone, a text console): no ACTIVE_UID.
        assert_eq!(active_uid("IS_SEAT0=1\nSESSIONS=\n"), None);
        assert_eq!(active_uid("ACTIVE_UID=\n"), None);
        assert_eq!(active_uid("ACTIVE_UID=-1\n"), None);
        assert_eq!(active_uid("UIDS=1000\n"), None);
        #[cfg(not(target_os = "macos"))]
        {
            let dir = TempDir::new("seat");
            let file = dir.0.join("seat0");
            std::fs::write(&file, seat0).unwrap();
            assert_eq!(seat_user(&file), Some(1000));
            // No logind (a container): unknown.
            assert_eq!(seat_user(&dir.0.join("missing")), None);
        }
    }

    #[test]
    fn socket_path_is_per_state_dir_unless_system_or_configured() {
        let default = SessionSettings::default();
        assert_eq!(
            socket_path(Path::new("/tmp/t1/agent"), &default),
            Path::new("/tmp/t1/agent/session.sock")
        );
        assert_eq!(
            socket_path(Path::new(SYSTEM_STATE_DIR), &default),
            Path::new(SYSTEM_SOCKET)
        );
        let absolute = SessionSettings {
            socket: Some("/run/h/s.sock".into()),
            ..Default::default()
        };
        assert_eq!(
            socket_path(Path::new(SYSTEM_STATE_DIR), &absolute),
            Path::new("/run/h/s.sock")
        );
        let relative = SessionSettings {
            socket: Some("sockets/s.sock".into()),
            ..Default::default()
        };
        assert_eq!(
            socket_path(Path::new("/srv/a"), &relative),
            Path::new("/srv/a/sockets/s.sock")
        );
    }

    #[test]
    fn ticket_goes_into_the_query_before_the_fragment() {
        let t = "v1.7.1700000000000.abcdef";
        assert_eq!(
            with_ticket("https://h/service/x", t),
            format!("https://h/service/x?herald_ticket={t}")
        );
        assert_eq!(
            with_ticket("https://h/s?a=1", t),
            format!("https://h/s?a=1&herald_ticket={t}")
        );
        assert_eq!(
            with_ticket("https://h/s?", t),
            format!("https://h/s?herald_ticket={t}")
        );
        assert_eq!(
            with_ticket("https://h/s?a=1#part", t),
            format!("https://h/s?a=1&herald_ticket={t}#part")
        );
        assert_eq!(
            with_ticket("https://h/s#x?y", t),
            format!("https://h/s?herald_ticket={t}#x?y")
        );
        // A hostile ticket cannot add parameters, a fragment or spaces.
        assert_eq!(
            with_ticket("https://h/s", "a&b=c#d e"),
            "https://h/s?herald_ticket=a%26b%3Dc%23d%20e"
        );
    }

    #[test]
    fn messages_have_the_documented_json_form() {
        let open = ToHelper::Open {
            job_id: 5,
            url: "https://h/".into(),
        };
        assert_eq!(
            serde_json::to_string(&open).unwrap(),
            r#"{"open":{"job_id":5,"url":"https://h/"}}"#
        );
        assert_eq!(
            serde_json::from_str::<FromHelper>(r#"{"opened":{"job_id":5}}"#).unwrap(),
            FromHelper::Opened { job_id: 5 }
        );
        assert_eq!(
            serde_json::from_str::<FromHelper>(r#"{"failed":{"job_id":5,"error":"x"}}"#).unwrap(),
            FromHelper::Failed {
                job_id: 5,
                error: "x".into()
            }
        );
        assert!(serde_json::from_str::<FromHelper>(r#"{"opened":{"job_id":5,"x":1}}"#).is_err());
    }

    #[tokio::test]
    async fn lines_are_capped() {
        let long = vec![b'a'; LINE_LIMIT + 10];
        let mut input = BufReader::new(&long[..]);
        assert!(matches!(
            read_line(&mut input).await,
            Err(LineError::TooLong)
        ));
        let mut exact = vec![b'b'; LINE_LIMIT - 1];
        exact.push(b'\n');
        let mut input = BufReader::new(&exact[..]);
        assert_eq!(
            read_line(&mut input).await.unwrap().unwrap().len(),
            LINE_LIMIT - 1
        );
        assert!(read_line(&mut input).await.unwrap().is_none());
        let mut input = BufReader::new(&b"partial"[..]);
        assert!(matches!(
            read_line(&mut input).await,
            Err(LineError::Truncated)
        ));
    }

    /// A temporary directory for sockets, removed at the end.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let nonce: [u8; 4] = herald_io::random_bytes();
            let dir = std::env::temp_dir().join(format!(
                "herald-session-{name}-{}-{}",
                std::process::id(),
                hex::encode(nonce)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn me() -> u32 {
        nix::unistd::Uid::effective().as_raw()
    }

    fn serving(dir: &TempDir, timeout: Duration) -> (Arc<Sessions>, PathBuf) {
        let path = dir.0.join(SOCKET_FILE);
        let listener = bind(&path, false).unwrap();
        let sessions = Arc::new(Sessions::new(&SessionSettings::default(), me(), timeout));
        tokio::spawn(serve(listener, sessions.clone()));
        (sessions, path)
    }

    /// A fake helper: connects and waits for its welcome, so it is registered.
    async fn fake_helper(
        path: &Path,
    ) -> (
        BufReader<tokio::net::unix::OwnedReadHalf>,
        tokio::net::unix::OwnedWriteHalf,
    ) {
        let stream = UnixStream::connect(path).await.unwrap();
        let (read, write) = stream.into_split();
        let mut read = BufReader::new(read);
        let line = read_line(&mut read).await.unwrap().unwrap();
        assert!(matches!(
            serde_json::from_str::<ToHelper>(&line).unwrap(),
            ToHelper::Welcome { .. }
        ));
        (read, write)
    }

    async fn next_open(read: &mut BufReader<tokio::net::unix::OwnedReadHalf>) -> (JobId, String) {
        let line = read_line(read).await.unwrap().unwrap();
        match serde_json::from_str::<ToHelper>(&line).unwrap() {
            ToHelper::Open { job_id, url } => (job_id, url),
            other => panic!("expected open, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_connected_helper_opens_and_answers() {
        let dir = TempDir::new("open");
        let (sessions, path) = serving(&dir, Duration::from_secs(10));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (mut read, mut write) = fake_helper(&path).await;
        assert_eq!(sessions.helpers().len(), 1);
        let helper = tokio::spawn(async move {
            let (job_id, url) = next_open(&mut read).await;
            assert_eq!(url, "https://h/s?herald_ticket=t");
            write_line(&mut write, &FromHelper::Opened { job_id })
                .await
                .unwrap();
            let (job_id, _) = next_open(&mut read).await;
            write_line(
                &mut write,
                &FromHelper::Failed {
                    job_id,
                    error: "no display".into(),
                },
            )
            .await
            .unwrap();
            (read, write)
        });
        let user = sessions
            .open(3, "https://h/s?herald_ticket=t")
            .await
            .unwrap();
        assert_eq!(
            user,
            user_name(me()).unwrap_or_else(|| format!("uid {}", me()))
        );
        let failed = sessions.open(4, "https://h/other").await.unwrap_err();
        assert!(
            matches!(&failed, OpenError::Helper { error, .. } if error == "no display"),
            "{failed:?}"
        );
        let (read, write) = helper.await.unwrap();
        // Gone helper: the registry forgets it.
        drop((read, write));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !sessions.helpers().is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "helper not dropped");
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(matches!(
            sessions.open(5, "https://h/").await,
            Err(OpenError::NoHelper { user: None })
        ));
    }

    #[tokio::test]
    async fn without_a_helper_the_reason_says_how_to_start_one() {
        let dir = TempDir::new("none");
        let (sessions, _path) = serving(&dir, Duration::from_secs(10));
        let error = sessions.open(1, "https://h/").await.unwrap_err();
        assert_eq!(error, OpenError::NoHelper { user: None });
        let text = error.to_string();
        assert!(text.contains("herald-agent session"), "{text}");
    }

    #[tokio::test]
    async fn a_silent_helper_times_out_and_a_leaving_one_disconnects() {
        let dir = TempDir::new("silent");
        let (sessions, path) = serving(&dir, Duration::from_millis(200));
        let (mut read, write) = fake_helper(&path).await;
        let error = sessions.open(9, "https://h/").await.unwrap_err();
        assert!(matches!(error, OpenError::TimedOut { .. }), "{error:?}");
        let (job_id, _) = next_open(&mut read).await;
        assert_eq!(job_id, 9);
        // A late answer is ignored rather than crossing into another job.
        let mut write = write;
        write_line(&mut write, &FromHelper::Opened { job_id: 9 })
            .await
            .unwrap();
        // A helper that leaves while a job waits: the job learns at once.
        let open = sessions.open(10, "https://h/");
        let leave = async {
            let _ = next_open(&mut read).await;
            drop(write);
            drop(read);
        };
        let (error, ()) = tokio::join!(open, leave);
        assert!(
            matches!(error, Err(OpenError::Disconnected { .. })),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn a_bad_line_closes_that_helper_only() {
        let dir = TempDir::new("bad");
        let (sessions, path) = serving(&dir, Duration::from_secs(10));
        let (_good_read, _good_write) = fake_helper(&path).await;
        let (mut bad_read, mut bad_write) = fake_helper(&path).await;
        assert_eq!(sessions.helpers().len(), 2);
        bad_write.write_all(b"{\"nonsense\":1}\n").await.unwrap();
        // The daemon closes the bad connection: the read side sees the end.
        let end = tokio::time::timeout(Duration::from_secs(10), read_line(&mut bad_read))
            .await
            .expect("the daemon closes a helper that sent a bad line");
        assert!(matches!(end, Ok(None) | Err(_)), "{end:?}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while sessions.helpers().len() != 1 {
            assert!(tokio::time::Instant::now() < deadline, "bad helper kept");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn the_preferred_user_gets_the_job_on_a_root_daemon() {
        let dir = TempDir::new("preferred");
        let path = dir.0.join(SOCKET_FILE);
        let seat0 = dir.0.join("seat0");
        let listener = bind(&path, false).unwrap();
        let settings = SessionSettings {
            user: Some("nobody-here".into()),
            ..Default::default()
        };
        // Pretend to be root for the selection rule; the helper connects as whoever we
        // are, and is admitted as the person at the machine.
        std::fs::write(&seat0, format!("ACTIVE_UID={}\n", me())).unwrap();
        let sessions = Arc::new(
            Sessions::new(&settings, 0, Duration::from_secs(10)).with_seat_file(seat0.clone()),
        );
        tokio::spawn(serve(listener, sessions.clone()));
        let _helper = fake_helper(&path).await;
        // Someone else is at the machine now, without a helper: `[session] user` decides.
        std::fs::write(&seat0, "ACTIVE_UID=4242\n").unwrap();
        let error = sessions.open(1, "https://h/").await.unwrap_err();
        assert_eq!(
            error,
            OpenError::NoHelper {
                user: Some("nobody-here".into())
            }
        );
    }

    /// A registered stand-in helper: its receiving end and its registry id.
    struct FakeHelper {
        id: u64,
        inbox: mpsc::UnboundedReceiver<ToHelper>,
    }

    fn register_fake(sessions: &Sessions, uid: u32, user: &str) -> FakeHelper {
        let (sender, inbox) = mpsc::unbounded_channel();
        let id = sessions.register(&peer(uid, user), sender).unwrap();
        FakeHelper { id, inbox }
    }

    /// Opens a page and answers it from whichever fake helper received it; returns that
    /// helper's index and the user `open` reports.
    async fn open_and_answer(
        sessions: &Arc<Sessions>,
        job_id: JobId,
        helpers: &mut [FakeHelper],
    ) -> (usize, String) {
        let open = tokio::spawn({
            let sessions = sessions.clone();
            async move { sessions.open(job_id, "https://h/").await }
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let index = 'found: loop {
            for (i, helper) in helpers.iter_mut().enumerate() {
                if let Ok(ToHelper::Open { job_id: got, .. }) = helper.inbox.try_recv() {
                    assert_eq!(got, job_id);
                    break 'found i;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no helper got job {job_id}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        sessions.answer(helpers[index].id, FromHelper::Opened { job_id });
        (index, open.await.unwrap().unwrap())
    }

    #[tokio::test]
    async fn jobs_go_to_the_user_at_the_screen_as_read_at_open_time() {
        let dir = TempDir::new("route");
        let seat0 = dir.0.join("seat0");
        let settings = SessionSettings {
            user: Some("carol".into()),
            ..Default::default()
        };
        let sessions = Arc::new(
            Sessions::new(&settings, 0, Duration::from_secs(10)).with_seat_file(seat0.clone()),
        );
        let mut helpers = vec![
            register_fake(&sessions, 1000, "alice"),
            register_fake(&sessions, 1001, "bob"),
            register_fake(&sessions, 1002, "carol"),
            register_fake(&sessions, 0, "root"),
        ];
        // Alice at the screen: hers, though others connected later.
        std::fs::write(&seat0, "ACTIVE=c1\nACTIVE_UID=1000\n").unwrap();
        assert_eq!(
            open_and_answer(&sessions, 1, &mut helpers).await,
            (0, "alice".to_string())
        );
        // Bob switched in: the next job is his.
        std::fs::write(&seat0, "ACTIVE=c2\nACTIVE_UID=1001\n").unwrap();
        assert_eq!(
            open_and_answer(&sessions, 2, &mut helpers).await,
            (1, "bob".to_string())
        );
        // Nobody (known) at the screen: `[session] user`.
        std::fs::remove_file(&seat0).unwrap();
        assert_eq!(
            open_and_answer(&sessions, 3, &mut helpers).await,
            (2, "carol".to_string())
        );
        // Without `[session] user`: the most recent helper.
        let plain = Arc::new(
            Sessions::new(&SessionSettings::default(), 0, Duration::from_secs(10))
                .with_seat_file(seat0.clone()),
        );
        let mut helpers = vec![
            register_fake(&plain, 1000, "alice"),
            register_fake(&plain, 1001, "bob"),
        ];
        assert_eq!(
            open_and_answer(&plain, 4, &mut helpers).await,
            (1, "bob".to_string())
        );
        std::fs::write(&seat0, "ACTIVE_UID=1000\n").unwrap();
        assert_eq!(
            open_and_answer(&plain, 5, &mut helpers).await,
            (0, "alice".to_string())
        );
    }

    fn a_notice(message_id: &str, sender: &str) -> Notice {
        Notice {
            message_id: message_id.into(),
            sender: sender.into(),
            display_name: "Card Company".into(),
            title: "Payment due".into(),
            body: "Your statement is ready.".into(),
            high: true,
            advertising: false,
            link: None,
        }
    }

    #[test]
    fn notices_go_to_the_helper_at_the_screen_and_its_reports_come_back() {
        let dir = TempDir::new("notices");
        let seat0 = dir.0.join("seat0");
        let sessions = Sessions::new(&SessionSettings::default(), 0, Duration::from_secs(10))
            .with_seat_file(seat0.clone());
        let mut events = sessions
            .notice_events()
            .expect("the first call gets the stream");
        assert!(sessions.notice_events().is_none());
        // Nobody to show it to.
        assert!(!sessions.notify(&a_notice("m1", "cards")));

        let mut alice = register_fake(&sessions, 1000, "alice");
        let mut bob = register_fake(&sessions, 1001, "bob");
        std::fs::write(&seat0, "ACTIVE_UID=1000\n").unwrap();
        assert!(sessions.notify(&a_notice("m1", "cards")));
        assert_eq!(
            alice.inbox.try_recv().unwrap(),
            ToHelper::Notify(a_notice("m1", "cards"))
        );
        assert!(bob.inbox.try_recv().is_err());

        let displayed = NoticeEvent::Displayed {
            message_id: "m1".into(),
        };
        sessions.answer(alice.id, FromHelper::Notice(displayed.clone()));
        assert_eq!(events.try_recv().unwrap(), displayed);
        // Another uid's helper cannot report on it, nor anyone on a message never
        // handed out, nor block someone other than the message's sender.
        sessions.answer(bob.id, FromHelper::Notice(displayed.clone()));
        let unknown = NoticeEvent::Opened {
            message_id: "m9".into(),
        };
        sessions.answer(alice.id, FromHelper::Notice(unknown));
        let forged = NoticeEvent::Block {
            message_id: "m1".into(),
            sender: "bank".into(),
        };
        sessions.answer(alice.id, FromHelper::Notice(forged));
        assert!(events.try_recv().is_err());
        let block = NoticeEvent::Block {
            message_id: "m1".into(),
            sender: "cards".into(),
        };
        sessions.answer(alice.id, FromHelper::Notice(block.clone()));
        assert_eq!(events.try_recv().unwrap(), block);

        // A reconnected helper of the same uid may still report (a late click).
        sessions.unregister(alice.id);
        let again = register_fake(&sessions, 1000, "alice");
        let opened = NoticeEvent::Opened {
            message_id: "m1".into(),
        };
        sessions.answer(again.id, FromHelper::Notice(opened.clone()));
        assert_eq!(events.try_recv().unwrap(), opened);
    }

    #[test]
    fn notice_messages_have_the_documented_json_form() {
        let line = serde_json::to_value(ToHelper::Notify(a_notice("ab", "cards"))).unwrap();
        assert_eq!(
            line,
            serde_json::json!({"notify": {
                "message_id": "ab", "sender": "cards", "display_name": "Card Company",
                "title": "Payment due", "body": "Your statement is ready.",
                "high": true, "advertising": false, "link": null,
            }})
        );
        for (text, event) in [
            (
                r#"{"notice":{"displayed":{"message_id":"ab"}}}"#,
                NoticeEvent::Displayed {
                    message_id: "ab".into(),
                },
            ),
            (
                r#"{"notice":{"opened":{"message_id":"ab"}}}"#,
                NoticeEvent::Opened {
                    message_id: "ab".into(),
                },
            ),
            (
                r#"{"notice":{"block":{"message_id":"ab","sender":"cards"}}}"#,
                NoticeEvent::Block {
                    message_id: "ab".into(),
                    sender: "cards".into(),
                },
            ),
        ] {
            assert_eq!(
                serde_json::from_str::<FromHelper>(text).unwrap(),
                FromHelper::Notice(event)
            );
        }
        assert!(serde_json::from_str::<FromHelper>(r#"{"notice":{"closed":{}}}"#).is_err());
    }

    #[test]
    fn a_long_notice_is_cut_to_fit_a_line() {
        let line_length = |n: &Notice| {
            serde_json::to_vec(&ToHelper::Notify(n.clone()))
                .unwrap()
                .len()
                + 1
        };
        let short = a_notice("m", "s");
        assert_eq!(fit_notice(&short), short);
        // Quotes take two bytes in JSON, multi-byte characters must not be split.
        let long = Notice {
            body: "é\"".repeat(LINE_LIMIT),
            ..a_notice("m", "s")
        };
        let fitted = fit_notice(&long);
        assert!(
            line_length(&fitted) <= LINE_LIMIT,
            "{}",
            line_length(&fitted)
        );
        assert!(
            line_length(&fitted) > LINE_LIMIT - 100,
            "cut no more than needed"
        );
        assert!(fitted.body.ends_with('…'));
        assert!(long.body.starts_with(fitted.body.trim_end_matches('…')));
        assert_eq!(fitted.title, long.title);
        let both = Notice {
            title: "t".repeat(LINE_LIMIT),
            ..long
        };
        let fitted = fit_notice(&both);
        assert!(line_length(&fitted) <= LINE_LIMIT);
        assert!(fitted.body.is_empty() && fitted.title.ends_with('…'));
    }

    #[test]
    fn one_uid_cannot_fill_the_helper_table() {
        let sessions = Sessions::new(&SessionSettings::default(), 0, Duration::from_secs(1));
        let mut kept = Vec::new();
        for _ in 0..MAX_HELPERS_PER_UID {
            kept.push(register_fake(&sessions, 33, "www-data"));
        }
        let (sender, _inbox) = mpsc::unbounded_channel();
        let refused = sessions
            .register(&peer(33, "www-data"), sender)
            .unwrap_err();
        assert_eq!(
            refused,
            RegisterError::UidFull {
                user: "www-data".into()
            }
        );
        assert!(refused.to_string().contains("www-data"), "{refused}");
        // Others still get in, up to the global cap.
        for uid in 1000.. {
            if sessions.helpers().len() == MAX_HELPERS {
                break;
            }
            kept.push(register_fake(&sessions, uid, "other"));
        }
        let (sender, _inbox) = mpsc::unbounded_channel();
        assert_eq!(
            sessions.register(&peer(7, "fresh"), sender).unwrap_err(),
            RegisterError::Full
        );
    }

    #[tokio::test]
    async fn a_helper_over_its_uids_cap_is_turned_away() {
        let dir = TempDir::new("cap");
        let (sessions, path) = serving(&dir, Duration::from_secs(10));
        let mut kept = Vec::new();
        for _ in 0..MAX_HELPERS_PER_UID {
            kept.push(fake_helper(&path).await);
        }
        let stream = UnixStream::connect(&path).await.unwrap();
        let mut read = BufReader::new(stream);
        let line = read_line(&mut read).await.unwrap().unwrap();
        match serde_json::from_str::<ToHelper>(&line).unwrap() {
            ToHelper::Rejected { reason } => {
                assert!(
                    reason.contains(&format!("{MAX_HELPERS_PER_UID} session helpers")),
                    "{reason}"
                )
            }
            other => panic!("expected a rejection, got {other:?}"),
        }
        assert_eq!(sessions.helpers().len(), MAX_HELPERS_PER_UID);
        // One leaves: there is room again.
        drop(kept.pop());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while sessions.helpers().len() == MAX_HELPERS_PER_UID {
            assert!(tokio::time::Instant::now() < deadline, "helper not dropped");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        kept.push(fake_helper(&path).await);
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_but_a_live_one_is_not_taken_over() {
        let dir = TempDir::new("stale");
        let path = dir.0.join(SOCKET_FILE);
        let first = bind(&path, false).unwrap();
        assert!(matches!(bind(&path, false), Err(SessionError::InUse(_))));
        drop(first);
        // The file remains after the listener is gone: stale, so it is replaced.
        assert!(path.exists());
        let _second = bind(&path, true).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o666);
        let plain = dir.0.join("plain");
        std::fs::write(&plain, b"x").unwrap();
        assert!(matches!(
            bind(&plain, false),
            Err(SessionError::NotSocket(_))
        ));
    }
}
