//! Notices: how a kept message is shown to the person at the machine.
//!
//! The daemon keeps messages ([`crate::inbox`]); the user-session helper shows each new
//! one through the desktop's notification service and reports back what happened
//! ([`NoticeEvent`]). Advertising is held during quiet hours ([`QuietHours`]).
//!
//! This file holds the types both sides share, the quiet-hours rule, and the helper's
//! client of the desktop notification service ([`Desktop`]).
//!
//! # How a notice is shown
//!
//! Through the freedesktop notification service on the D-Bus session bus
//! (`org.freedesktop.Notifications`, which GNOME, KDE, XFCE, dunst, mako and others
//! provide): `Notify` with [`APP_NAME`], the summary from [`summary`] (`[Ad] ` for
//! advertising, then `Sender: Title`), the body, the actions [`ACTIONS`] ("Open" as the
//! default action and as a button, "Block this sender"), the urgency hint from
//! [`urgency`], and the server's default expiry. The service answers with an id; the
//! person's click comes back as an `ActionInvoked(id, key)` signal, turned into a
//! [`Choice`] by [`choice`]. Only ids this process was given are acted on: the signal
//! goes to every client of the service.
//!
//! # Limitations
//!
//! - Linux and the BSDs only, in practice: macOS and Windows have no freedesktop
//!   notification service, so [`Desktop::connect`] fails there (there is no session bus)
//!   and the message simply stays unread in the inbox. A Notification Center or toast
//!   path is not written.
//! - A notification service without the `actions` capability shows the notice but never
//!   reports a click; the message then stays unopened in the inbox.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Mutex};
use tracing::debug;
use zbus::export::futures_core::Stream;
use zbus::zvariant::Value;

/// A message as the helper shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Notice {
    /// Message id (hex).
    pub message_id: String,
    /// Sender name (for "Block this sender").
    pub sender: String,
    /// What people see as the sender.
    pub display_name: String,
    /// Title.
    pub title: String,
    /// Body text.
    pub body: String,
    /// Shown as urgent.
    pub high: bool,
    /// Marked as advertising (prefixed as such).
    pub advertising: bool,
    /// Page the "Open" action opens; without one, "Open" only marks the message read
    /// (there is no inbox window: `herald-agent inbox` lists it).
    pub link: Option<String>,
}

/// What the helper reports about a notice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum NoticeEvent {
    /// The desktop's notification service took it (it is on screen).
    Displayed {
        /// Message id (hex).
        message_id: String,
    },
    /// The person chose "Open".
    Opened {
        /// Message id (hex).
        message_id: String,
    },
    /// The person chose "Block this sender".
    Block {
        /// Message id (hex).
        message_id: String,
        /// Sender name.
        sender: String,
    },
}

/// The local hours during which advertising is held (`[messages] quiet_hours`).
///
/// The span starts at `start` and ends just before `end`; when `end` is earlier in the day
/// than `start` it runs over midnight (`21:00-08:00` holds from 21:00 to 07:59).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuietHours {
    /// Start, minutes after local midnight.
    pub start: u32,
    /// End, minutes after local midnight (before `start` when the span wraps midnight).
    pub end: u32,
}

/// Minutes in a day.
const DAY: u32 = 24 * 60;

/// Why `[messages] quiet_hours` is not a span of the day.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuietHoursError {
    /// Not two times joined by `-`.
    #[error(
        "quiet hours {0:?} are not a span like \"21:00-08:00\" (start-end, 24-hour \
         HH:MM); set `[messages] quiet_hours = \"\"` for none"
    )]
    Shape(String),
    /// One side is not a time of day.
    #[error("quiet hours {text:?}: {time:?} is not a time of day (HH:MM from 00:00 to 23:59)")]
    Time {
        /// The whole setting.
        text: String,
        /// The side that does not parse.
        time: String,
    },
    /// Start and end are the same minute, which could mean all day or never.
    #[error("quiet hours {0:?} start and end at the same time; give a span, or \"\" for none")]
    Empty(String),
}

impl QuietHours {
    /// Parses `HH:MM-HH:MM` (spaces around the parts allowed); an empty string is `None`
    /// (never hold).
    pub fn parse(text: &str) -> Result<Option<QuietHours>, QuietHoursError> {
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Ok(None);
        }
        let (start, end) = trimmed
            .split_once('-')
            .ok_or_else(|| QuietHoursError::Shape(text.to_string()))?;
        let minute = |time: &str| {
            clock_minute(time.trim()).ok_or_else(|| QuietHoursError::Time {
                text: text.to_string(),
                time: time.trim().to_string(),
            })
        };
        let (start, end) = (minute(start)?, minute(end)?);
        if start == end {
            return Err(QuietHoursError::Empty(text.to_string()));
        }
        Ok(Some(QuietHours { start, end }))
    }

    /// Whether a notice of advertising must wait at `local_minute` (minutes after local
    /// midnight; taken modulo a day), and if so how many minutes until the quiet hours
    /// end.
    pub fn holds(&self, local_minute: u32) -> Option<u32> {
        let now = local_minute % DAY;
        let inside = if self.start < self.end {
            (self.start..self.end).contains(&now)
        } else {
            now >= self.start || now < self.end
        };
        // `(end - now) mod DAY`, which is never 0 inside the span.
        inside.then(|| (self.end + DAY - now) % DAY)
    }
}

/// Minutes after midnight of a strict `HH:MM` (two digits each).
fn clock_minute(time: &str) -> Option<u32> {
    let (hours, minutes) = time.split_once(':')?;
    let two_digits = |s: &str| {
        (s.len() == 2 && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<u32>().ok())
            .flatten()
    };
    let (hours, minutes) = (two_digits(hours)?, two_digits(minutes)?);
    (hours < 24 && minutes < 60).then_some(hours * 60 + minutes)
}

impl Notice {
    /// How many minutes this notice must wait at `local_minute` (minutes after local
    /// midnight): only advertising waits, and only inside `quiet` hours.
    pub fn held(&self, quiet: Option<&QuietHours>, local_minute: u32) -> Option<u32> {
        quiet
            .filter(|_| self.advertising)
            .and_then(|q| q.holds(local_minute))
    }
}

// === what the desktop is asked ===

/// The application name the notification service shows.
pub const APP_NAME: &str = "Herald";
/// Action keys and labels, in the service's flat `[key, label, ...]` form: `default` is
/// what clicking the notice itself does.
pub const ACTIONS: [&str; 6] = [
    "default",
    "Open",
    "open",
    "Open",
    "block",
    "Block this sender",
];
/// Prefix of an advertisement's summary.
pub const AD_PREFIX: &str = "[Ad] ";
/// `expire_timeout` of `Notify`: the service's own default.
pub const EXPIRE_DEFAULT: i32 = -1;
/// The well-known bus name of the notification service.
pub const SERVICE: &str = "org.freedesktop.Notifications";
/// The object path of the notification service.
pub const SERVICE_PATH: &str = "/org/freedesktop/Notifications";
/// How long `Notify` may take; a service that hangs must not stall later notices.
pub const NOTIFY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(25);
/// How many shown notices the client remembers for their actions; a notice older than
/// that is still in the inbox, only its buttons stop working.
pub const SHOWN_LIMIT: usize = 256;

/// The summary line: `[Ad] ` for advertising, then `Sender: Title` (the title alone
/// when the sender has no display name).
pub fn summary(notice: &Notice) -> String {
    let prefix = if notice.advertising { AD_PREFIX } else { "" };
    let sender = notice.display_name.trim();
    if sender.is_empty() {
        format!("{prefix}{}", notice.title)
    } else {
        format!("{prefix}{sender}: {}", notice.title)
    }
}

/// The `urgency` hint: 2 (critical) for high priority, else 1 (normal).
pub fn urgency(notice: &Notice) -> u8 {
    if notice.high {
        2
    } else {
        1
    }
}

/// What the person chose on a shown notice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// Clicked the notice or "Open".
    Open,
    /// Clicked "Block this sender".
    Block,
}

/// The choice an `ActionInvoked` key stands for (`None` for keys Herald did not offer).
pub fn choice(action_key: &str) -> Option<Choice> {
    match action_key {
        "default" | "open" => Some(Choice::Open),
        "block" => Some(Choice::Block),
        _ => None,
    }
}

// === impl Desktop ===

/// Why a notice could not be shown.
#[derive(Debug, thiserror::Error)]
pub enum DesktopError {
    /// No session bus could be reached.
    #[error(
        "cannot reach the desktop session bus ({0}); is this a desktop session with \
         DBUS_SESSION_BUS_ADDRESS set? Messages stay unread in the inbox"
    )]
    Bus(zbus::Error),
    /// Connecting to the session bus took longer than [`NOTIFY_TIMEOUT`].
    #[error(
        "the desktop session bus did not answer within {} s; messages stay unread in the inbox",
        NOTIFY_TIMEOUT.as_secs()
    )]
    BusTimedOut,
    /// Subscribing to the service's signals failed.
    #[error("cannot listen to the desktop notification service: {0}")]
    Subscribe(zbus::Error),
    /// `Notify` failed (no service on the bus, or it refused).
    #[error(
        "the desktop notification service ({SERVICE}) did not show the notice: {0}; is a \
         notification daemon running in this session?"
    )]
    Notify(zbus::Error),
    /// `Notify` was not answered within [`NOTIFY_TIMEOUT`].
    #[error(
        "the desktop notification service ({SERVICE}) did not answer within {} s",
        NOTIFY_TIMEOUT.as_secs()
    )]
    TimedOut,
}

/// The client side of `org.freedesktop.Notifications` (the part Herald uses).
#[zbus::proxy(
    interface = "org.freedesktop.Notifications",
    default_service = "org.freedesktop.Notifications",
    default_path = "/org/freedesktop/Notifications",
    gen_blocking = false
)]
trait Notifications {
    /// Shows a notification; returns its id.
    #[allow(clippy::too_many_arguments)]
    fn notify(
        &self,
        app_name: &str,
        replaces_id: u32,
        app_icon: &str,
        summary: &str,
        body: &str,
        actions: &[&str],
        hints: HashMap<&str, Value<'_>>,
        expire_timeout: i32,
    ) -> zbus::Result<u32>;

    /// The person chose an action of notification `id`.
    #[zbus(signal)]
    fn action_invoked(&self, id: u32, action_key: String) -> zbus::Result<()>;

    /// Notification `id` is gone (expired, dismissed, or closed by the service).
    #[zbus(signal)]
    fn notification_closed(&self, id: u32, reason: u32) -> zbus::Result<()>;
}

/// The notices on screen, by the service's id, oldest first, at most [`SHOWN_LIMIT`].
#[derive(Default)]
struct Shown {
    notices: HashMap<u32, Notice>,
    order: VecDeque<u32>,
}

impl Shown {
    fn insert(&mut self, id: u32, notice: Notice) {
        if self.notices.insert(id, notice).is_none() {
            self.order.push_back(id);
        }
        while self.order.len() > SHOWN_LIMIT {
            if let Some(old) = self.order.pop_front() {
                self.notices.remove(&old);
            }
        }
    }

    fn remove(&mut self, id: u32) -> Option<Notice> {
        let notice = self.notices.remove(&id)?;
        self.order.retain(|&o| o != id);
        Some(notice)
    }
}

/// A connection to the desktop notification service on the session bus. What the person
/// does with the notices it showed comes out of the channel given to
/// [`Desktop::connect`]; dropping the `Desktop` stops listening.
pub struct Desktop {
    proxy: NotificationsProxy<'static>,
    /// Locked across `Notify`, so an action is never looked up before its notice is in.
    shown: Arc<Mutex<Shown>>,
    listener: tokio::task::JoinHandle<()>,
}

impl Desktop {
    /// Connects to the session bus (`DBUS_SESSION_BUS_ADDRESS`, else the user's runtime
    /// directory's `bus`) and subscribes to the service's signals. Each choice the person
    /// makes on a notice shown through this `Desktop` is sent to `choices`.
    pub async fn connect(
        choices: mpsc::UnboundedSender<(Choice, Notice)>,
    ) -> Result<Desktop, DesktopError> {
        // A bus that accepts but never answers must not stall the helper's notices.
        let connection = tokio::time::timeout(NOTIFY_TIMEOUT, zbus::Connection::session())
            .await
            .map_err(|_| DesktopError::BusTimedOut)?
            .map_err(DesktopError::Bus)?;
        let proxy = NotificationsProxy::new(&connection)
            .await
            .map_err(DesktopError::Bus)?;
        // Subscribed before the first `Notify`, so no click can be missed.
        let actions = proxy
            .receive_action_invoked()
            .await
            .map_err(DesktopError::Subscribe)?;
        let closed = proxy
            .receive_notification_closed()
            .await
            .map_err(DesktopError::Subscribe)?;
        let shown = Arc::new(Mutex::new(Shown::default()));
        let listener = tokio::spawn(listen(actions, closed, shown.clone(), choices));
        Ok(Desktop {
            proxy,
            shown,
            listener,
        })
    }

    /// Shows `notice`; returns the service's id for it.
    pub async fn show(&self, notice: &Notice) -> Result<u32, DesktopError> {
        let mut shown = self.shown.lock().await;
        let hints = HashMap::from([("urgency", Value::U8(urgency(notice)))]);
        let summary = summary(notice);
        let call = self.proxy.notify(
            APP_NAME,
            0,
            "",
            &summary,
            &notice.body,
            &ACTIONS,
            hints,
            EXPIRE_DEFAULT,
        );
        let id = tokio::time::timeout(NOTIFY_TIMEOUT, call)
            .await
            .map_err(|_| DesktopError::TimedOut)?
            .map_err(DesktopError::Notify)?;
        shown.insert(id, notice.clone());
        Ok(id)
    }
}

impl Drop for Desktop {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

/// Turns the service's signals for our notices into choices, until the bus connection
/// ends.
async fn listen(
    mut actions: ActionInvokedStream,
    mut closed: NotificationClosedStream,
    shown: Arc<Mutex<Shown>>,
    choices: mpsc::UnboundedSender<(Choice, Notice)>,
) {
    loop {
        tokio::select! {
            signal = next(&mut actions) => {
                let Some(signal) = signal else { break };
                let Ok(args) = signal.args() else { continue };
                let (id, key) = (args.id, args.action_key);
                let Some(choice) = choice(&key) else {
                    debug!(id, %key, "ignoring an action Herald did not offer");
                    continue;
                };
                // Not ours (another application's notification) when it was never shown
                // here. A notice's first action closes it on most servers; remove it so
                // a second click does not report twice.
                let Some(notice) = shown.lock().await.remove(id) else { continue };
                if choices.send((choice, notice)).is_err() {
                    break;
                }
            }
            signal = next(&mut closed) => {
                let Some(signal) = signal else { break };
                if let Ok(args) = signal.args() {
                    shown.lock().await.remove(args.id);
                }
            }
        }
    }
    debug!("stopped listening to the desktop notification service");
}

/// The next item of a stream.
fn next<S: Stream + Unpin>(stream: &mut S) -> impl Future<Output = Option<S::Item>> + '_ {
    std::future::poll_fn(move |cx| Pin::new(&mut *stream).poll_next(cx))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(h: u32, m: u32) -> u32 {
        h * 60 + m
    }

    fn notice(advertising: bool, high: bool) -> Notice {
        Notice {
            message_id: "ab12".into(),
            sender: "cards".into(),
            display_name: "Card Company".into(),
            title: "Payment due".into(),
            body: "Your statement is ready.".into(),
            high,
            advertising,
            link: None,
        }
    }

    #[test]
    fn quiet_hours_parse_spans_and_empty() {
        assert_eq!(QuietHours::parse(""), Ok(None));
        assert_eq!(QuietHours::parse("  "), Ok(None));
        assert_eq!(
            QuietHours::parse("21:00-08:00"),
            Ok(Some(QuietHours {
                start: at(21, 0),
                end: at(8, 0)
            }))
        );
        assert_eq!(
            QuietHours::parse(" 12:30 - 13:45 "),
            Ok(Some(QuietHours {
                start: at(12, 30),
                end: at(13, 45)
            }))
        );
    }

    #[test]
    fn bad_quiet_hours_say_what_is_wrong() {
        let error = QuietHours::parse("25:00-08:00").unwrap_err();
        assert_eq!(
            error,
            QuietHoursError::Time {
                text: "25:00-08:00".into(),
                time: "25:00".into()
            }
        );
        assert!(
            error.to_string().contains("\"25:00\" is not a time of day"),
            "{error}"
        );
        let error = QuietHours::parse("25:00").unwrap_err();
        assert_eq!(error, QuietHoursError::Shape("25:00".into()));
        let error = QuietHours::parse("21:00").unwrap_err();
        assert_eq!(error, QuietHoursError::Shape("21:00".into()));
        assert!(error.to_string().contains("\"21:00-08:00\""), "{error}");
        let error = QuietHours::parse("ab").unwrap_err();
        assert_eq!(error, QuietHoursError::Shape("ab".into()));
        for (text, side) in [
            ("ab-cd", "ab"),
            ("21:00-ab", "ab"),
            ("21:60-08:00", "21:60"),
            ("9:00-17:00", "9:00"),
            ("21:00-08:00:00", "08:00:00"),
            ("-08:00", ""),
            ("+1:00-08:00", "+1:00"),
        ] {
            match QuietHours::parse(text) {
                Err(QuietHoursError::Time { time, .. }) => assert_eq!(time, side, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        assert_eq!(
            QuietHours::parse("08:00-08:00"),
            Err(QuietHoursError::Empty("08:00-08:00".into()))
        );
    }

    #[test]
    fn quiet_hours_over_midnight_hold_until_the_end() {
        let night = QuietHours::parse("21:00-08:00").unwrap().unwrap();
        assert_eq!(night.holds(at(20, 59)), None);
        assert_eq!(night.holds(at(21, 0)), Some(11 * 60));
        assert_eq!(night.holds(at(23, 59)), Some(8 * 60 + 1));
        assert_eq!(night.holds(0), Some(8 * 60));
        assert_eq!(night.holds(at(7, 59)), Some(1));
        assert_eq!(night.holds(at(8, 0)), None);
        assert_eq!(night.holds(at(12, 0)), None);
        // A minute past the day wraps (the caller's clock arithmetic, not a new day).
        assert_eq!(night.holds(DAY + at(7, 0)), Some(60));
        let lunch = QuietHours::parse("12:00-13:30").unwrap().unwrap();
        assert_eq!(lunch.holds(at(11, 59)), None);
        assert_eq!(lunch.holds(at(12, 0)), Some(90));
        assert_eq!(lunch.holds(at(13, 29)), Some(1));
        assert_eq!(lunch.holds(at(13, 30)), None);
        assert_eq!(lunch.holds(at(0, 0)), None);
    }

    #[test]
    fn quiet_hours_hold_advertising() {
        let night = QuietHours::parse("21:00-08:00").unwrap();
        let late = at(22, 30);
        let ad = notice(true, false);
        assert_eq!(ad.held(night.as_ref(), late), Some(9 * 60 + 30));
        assert_eq!(ad.held(night.as_ref(), at(9, 0)), None);
        // Other messages, urgent or not, are shown at once.
        assert_eq!(notice(false, false).held(night.as_ref(), late), None);
        assert_eq!(notice(false, true).held(night.as_ref(), late), None);
        // No quiet hours: nothing waits.
        assert_eq!(ad.held(None, late), None);
    }

    #[test]
    fn the_summary_names_the_sender_and_marks_advertising() {
        assert_eq!(summary(&notice(false, false)), "Card Company: Payment due");
        assert_eq!(
            summary(&notice(true, false)),
            "[Ad] Card Company: Payment due"
        );
        let anonymous = Notice {
            display_name: " ".into(),
            ..notice(false, false)
        };
        assert_eq!(summary(&anonymous), "Payment due");
        assert_eq!(urgency(&notice(false, true)), 2);
        assert_eq!(urgency(&notice(true, false)), 1);
    }

    #[test]
    fn only_offered_actions_are_choices() {
        assert_eq!(choice("default"), Some(Choice::Open));
        assert_eq!(choice("open"), Some(Choice::Open));
        assert_eq!(choice("block"), Some(Choice::Block));
        assert_eq!(choice("inline-reply"), None);
        // Every offered key is understood.
        for key in ACTIONS.iter().step_by(2) {
            assert!(choice(key).is_some(), "{key}");
        }
    }

    #[test]
    fn remembered_notices_are_capped_oldest_first() {
        let mut shown = Shown::default();
        for id in 0..(SHOWN_LIMIT as u32 + 10) {
            shown.insert(id, notice(false, false));
        }
        assert_eq!(shown.notices.len(), SHOWN_LIMIT);
        assert!(shown.remove(0).is_none());
        assert!(shown.remove(SHOWN_LIMIT as u32 + 9).is_some());
        assert!(shown.remove(SHOWN_LIMIT as u32 + 9).is_none());
    }
}
