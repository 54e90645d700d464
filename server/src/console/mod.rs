//! The web console: server-rendered pages on the HTTPS port, next to the admin API.
//!
//! People register, link their devices, subscribe them to the operator's catalog with
//! their own timing, read the history of runs and choose where results are forwarded;
//! admins see and manage everything. The console chooses *when* and *where* a signed
//! catalog entry runs, never *what*. The contract (paths, fields, page ids, status
//! codes) is docs/CONSOLE.md.
//!
//! This module holds the router, the shared state, the error type and the response
//! headers every page carries; `auth` the mechanisms (passwords, sessions, CSRF,
//! throttling); `account`, `pages`, `messages`, `admin`, `billing` (usage, invoices,
//! charts) and `visit` the handlers; `forms` the pure parsing of form input; `clubs` and
//! `peers` the clubs and the directory; `proxy` the browser path to shared web services
//! (`/p/OWNER/SERVICE/`).

mod account;
mod admin;
mod audit;
pub(crate) mod auth;
mod billing;
mod clubs;
mod forms;
mod forwarding;
mod messages;
mod pages;
mod peers;
mod proxy;
mod sender;
#[cfg(test)]
mod tests;
mod visit;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use askama::Template;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;

use herald_shared::envelope::PublicKey;
use herald_shared::Millis;

use crate::api::ApiState;
use crate::config::ConsoleSettings;
use crate::store::StoreError;
use crate::ticket::Tickets;

/// Largest form body the console accepts.
const MAX_FORM_BYTES: usize = 64 * 1024;
/// The stylesheet, served from `/static/console.css` (the CSP forbids inline styles).
const STYLESHEET: &str = include_str!("../../templates/console.css");
/// Path of the stylesheet.
pub const STYLESHEET_PATH: &str = "/static/console.css";
/// Most one-time secrets waiting to be shown at once; beyond it the oldest goes.
const MAX_FLASH: usize = 10_000;
/// Content-Security-Policy of every console response. `form-action` and `base-uri`
/// do not fall back to `default-src`, so they are named: forms post only here, and
/// no injected `<base>` can redirect relative links.
const CSP: &str = "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'";
/// Strict-Transport-Security of every console response: the console is HTTPS only.
const HSTS: &str = "max-age=31536000";

/// What the console puts into the enrollment tokens of "link a device": the same
/// fields `herald-server token create` writes.
#[derive(Debug, Clone)]
pub struct Enrollment {
    /// QUIC address agents connect to (`public_addr` of `herald.toml`).
    pub server: String,
    /// SHA-256 of the server CA certificate.
    pub ca_fingerprint: [u8; 32],
    /// Operator keys agents pin.
    pub operator_keys: Vec<PublicKey>,
}

impl Enrollment {
    /// From the server's configuration and its CA certificate.
    pub fn new(config: &crate::config::ServerConfig, pki: &crate::pki::Pki) -> Enrollment {
        Enrollment {
            server: config.public_addr.clone(),
            ca_fingerprint: crate::pki::fingerprint(&pki.ca),
            operator_keys: config.operator_keys(),
        }
    }
}

/// The clock the console reads (replaceable in tests).
pub type Clock = Arc<dyn Fn() -> Millis + Send + Sync>;

/// What the console's handlers share.
#[derive(Clone)]
pub struct ConsoleState {
    /// The admin API's state: store, relay, scheduler.
    pub api: ApiState,
    /// Checks browser-service tickets.
    pub tickets: Tickets,
    /// `[console]` settings.
    pub settings: Arc<ConsoleSettings>,
    /// For "link a device".
    pub enrollment: Arc<Enrollment>,
    /// Whether webhook targets may be plain `http:` (`[forwarding] allow_http`).
    pub allow_http_webhooks: bool,
    guard: Arc<auth::Guard>,
    clock: Clock,
    /// Secrets to show once on the next page view, by session.
    flash: Arc<Mutex<Flash>>,
    /// Held from counting a user's objects against a quota to storing the new one, so
    /// parallel requests cannot all pass the count.
    quota: Arc<Mutex<()>>,
}

impl ConsoleState {
    /// Builds the console's state.
    pub fn new(
        api: ApiState,
        tickets: Tickets,
        settings: ConsoleSettings,
        enrollment: Enrollment,
    ) -> ConsoleState {
        ConsoleState {
            api,
            tickets,
            settings: Arc::new(settings),
            enrollment: Arc::new(enrollment),
            allow_http_webhooks: false,
            guard: Arc::new(auth::Guard::default()),
            clock: Arc::new(crate::now_ms),
            flash: Arc::new(Mutex::new(Flash::new(MAX_FLASH))),
            quota: Arc::new(Mutex::new(())),
        }
    }

    /// Replaces the clock (tests of lockout windows and expiry).
    pub fn with_clock(mut self, clock: Clock) -> ConsoleState {
        self.clock = clock;
        self
    }

    /// Lets webhook targets be plain `http:` (`[forwarding] allow_http`).
    pub fn with_http_webhooks(mut self, allow: bool) -> ConsoleState {
        self.allow_http_webhooks = allow;
        self
    }

    pub(crate) fn now(&self) -> Millis {
        (self.clock)()
    }

    pub(crate) fn store(&self) -> &crate::store::Store {
        &self.api.store
    }

    fn flash(&self) -> std::sync::MutexGuard<'_, Flash> {
        self.flash.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serializes quota checks with the inserts they guard (no `.await` while held).
    pub(crate) fn quota(&self) -> std::sync::MutexGuard<'_, ()> {
        self.quota.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One-time secrets waiting to be shown, by session, at most `cap`: beyond it the
/// oldest is forgotten (its rule exists, its secret was simply never shown), so a
/// flood of new secrets cannot wipe the ones other users are about to see.
pub(crate) struct Flash {
    cap: usize,
    next: u64,
    by_key: HashMap<String, (u64, String)>,
    order: BTreeMap<u64, String>,
}

impl Flash {
    fn new(cap: usize) -> Flash {
        Flash {
            cap,
            next: 0,
            by_key: HashMap::new(),
            order: BTreeMap::new(),
        }
    }

    /// Keeps a secret for `key`, replacing an earlier one.
    pub(crate) fn insert(&mut self, key: String, secret: String) {
        let seq = self.next;
        self.next += 1;
        if let Some((old, _)) = self.by_key.insert(key.clone(), (seq, secret)) {
            self.order.remove(&old);
        }
        self.order.insert(seq, key);
        while self.by_key.len() > self.cap {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            self.by_key.remove(&oldest);
        }
    }

    /// Takes the secret kept for `key`, if any.
    pub(crate) fn remove(&mut self, key: &str) -> Option<String> {
        let (seq, secret) = self.by_key.remove(key)?;
        self.order.remove(&seq);
        Some(secret)
    }
}

/// Builds the console's router. It is not behind the admin API's bearer-token check:
/// merge it next to `api::router`.
pub fn router(state: ConsoleState) -> Router {
    let pages = Router::new()
        .route("/", get(account::home))
        .route(STYLESHEET_PATH, get(stylesheet))
        .route(
            "/register",
            get(account::register_form).post(account::register),
        )
        .route("/login", get(account::login_form).post(account::login))
        .route("/logout", post(account::logout))
        .route("/account", get(account::show).post(account::update))
        .route("/account/password", post(account::change_password))
        .route("/devices", get(pages::devices))
        .route("/devices/link", post(pages::link_device))
        .route("/devices/{agent}", get(pages::device))
        .route("/catalog", get(pages::catalog))
        .route("/catalog/{name}", get(pages::entry))
        .route(
            "/subscriptions",
            get(pages::subscriptions).post(pages::subscribe),
        )
        .route(
            "/subscriptions/{id}",
            get(pages::subscription).post(pages::edit_subscription),
        )
        .route(
            "/subscriptions/{id}/delete",
            post(pages::delete_subscription),
        )
        .route("/join", get(sender::join))
        .route(sender::SIGN_SCRIPT_PATH, get(sender::sign_script))
        .route("/sender", get(sender::home))
        .route("/sender/new", get(sender::new))
        .route("/sender/draft", post(sender::draft))
        .route(
            "/sender/campaigns",
            post(sender::create).layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/sender/campaigns/{id}", get(sender::campaign))
        .route("/sender/campaigns/{id}/cancel", post(sender::cancel))
        .route("/messages", get(messages::show))
        .route("/messages/block", post(messages::block))
        .route("/clubs", get(clubs::list).post(clubs::create))
        .route("/clubs/join", post(clubs::join))
        .route("/clubs/join/{code}", get(clubs::join_link))
        .route("/clubs/{name}", get(clubs::show))
        .route("/clubs/{name}/invite", post(clubs::invite))
        .route("/clubs/{name}/leave", post(clubs::leave))
        .route("/clubs/{name}/members/{user}/remove", post(clubs::remove))
        .route("/clubs/{name}/members/{user}/promote", post(clubs::promote))
        .route("/peers", get(peers::page))
        .route("/peers.json", get(peers::json))
        .route("/peers/favourite", post(peers::favourite))
        .route(peers::SCRIPT_PATH, get(peers::script))
        .route("/history", get(pages::history))
        .route("/history/{job}", get(pages::job))
        .route(
            "/forwarding",
            get(forwarding::forwarding).post(forwarding::add_forwarding),
        )
        .route(
            "/forwarding/{id}/confirm",
            post(forwarding::confirm_forwarding),
        )
        .route("/forwarding/{id}/resend", post(forwarding::resend_code))
        .route(
            "/forwarding/{id}/delete",
            post(forwarding::delete_forwarding),
        )
        .route(
            "/service/{name}",
            get(visit::service_page).post(visit::answer),
        )
        .route("/api/v1/visits", post(visit::api_answer))
        .route("/admin/agents", get(admin::agents))
        .route("/admin/agents/{id}", get(admin::agent))
        .route("/admin/agents/{id}/revoke", post(admin::revoke))
        .route("/admin/jobs", get(admin::jobs))
        .route("/admin/jobs/{id}", get(admin::job))
        .route("/admin/jobs/{id}/cancel", post(admin::cancel))
        .route(
            "/admin/schedules",
            get(admin::schedules).post(admin::add_schedule),
        )
        .route("/admin/schedules/{id}/delete", post(admin::delete_schedule))
        .route("/admin/users", get(admin::users))
        .route("/admin/users/{id}/role", post(admin::set_role))
        .route("/admin/audit", get(admin::audit))
        .route("/admin/billing", get(billing::admin))
        .route("/account/usage", get(billing::usage))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            audit::audit_posts,
        ))
        .layer(axum::middleware::map_response(security_headers))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_FORM_BYTES))
        .with_state(state.clone());
    // Outside the pages' layers: services keep their own headers and stream bodies. The
    // pages go second so that their (layered) fallback answers unknown paths.
    proxy::router(state).merge(pages)
}

async fn stylesheet() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        STYLESHEET,
    )
        .into_response()
}

async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static(HSTS),
    );
    // Its own browsing context group: a shared web service's page (same origin, under
    // `/p/`) that opens a console page gets no handle on it.
    headers.insert(
        axum::http::HeaderName::from_static("cross-origin-opener-policy"),
        HeaderValue::from_static("same-origin"),
    );
    // Pages show personal data and one-time secrets: never from a cache.
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

// === layout and rendering ===

/// What the base layout needs: who is signed in (for the nav) and the CSRF token of
/// the log-out button.
#[derive(Debug, Clone, Default)]
pub(crate) struct Layout {
    /// Signed-in user's login.
    pub(crate) login: Option<String>,
    /// Whether to show the admin link.
    pub(crate) is_admin: bool,
    /// Whether to show the sender link (the user acts for a message sender).
    pub(crate) is_sender: bool,
    /// The session's CSRF token.
    pub(crate) csrf: String,
    /// No navigation at all (error and service pages, whoever sees them).
    pub(crate) bare: bool,
}

impl Layout {
    /// The layout of pages seen without a session.
    pub(crate) fn anonymous() -> Layout {
        Layout::default()
    }

    /// A layout without navigation.
    pub(crate) fn bare() -> Layout {
        Layout {
            bare: true,
            ..Layout::default()
        }
    }

    /// The layout of a signed-in user's pages.
    pub(crate) fn of(session: &auth::Session) -> Layout {
        Layout {
            login: Some(session.user.login.clone()),
            is_admin: session.user.is_admin(),
            is_sender: session.user.sender.is_some(),
            csrf: session.csrf.clone(),
            bare: false,
        }
    }
}

/// A page with a one-line message (errors, "thank you").
#[derive(Template)]
#[template(path = "message.html")]
pub(crate) struct MessagePage {
    pub(crate) layout: Layout,
    /// Page id (without `page-`).
    pub(crate) page: String,
    /// Heading.
    pub(crate) title: String,
    /// The message.
    pub(crate) message: String,
    /// Whether the message is an error (`<p class="error" id="error">`).
    pub(crate) is_error: bool,
}

/// Renders a template with a status.
pub(crate) fn render(status: StatusCode, page: &impl Template) -> Response {
    match page.render() {
        Ok(html) => (
            status,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            html,
        )
            .into_response(),
        Err(e) => {
            tracing::error!("console template: {e}");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "page could not be rendered",
            )
                .into_response()
        }
    }
}

/// `303 See Other` to a path.
pub(crate) fn see_other(path: &str) -> Response {
    Redirect::to(path).into_response()
}

/// A time for people: `2026-11-23 10:00:00 UTC`, or a dash for none.
pub(crate) fn when(t: impl Stamp) -> String {
    match t.millis() {
        Some(ms) => chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
            .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
            .unwrap_or_else(|| ms.to_string()),
        None => "—".to_string(),
    }
}

/// Something that may be a time (templates hand over values and references alike).
pub(crate) trait Stamp {
    fn millis(&self) -> Option<Millis>;
}

impl Stamp for Millis {
    fn millis(&self) -> Option<Millis> {
        Some(*self)
    }
}

impl Stamp for Option<Millis> {
    fn millis(&self) -> Option<Millis> {
        *self
    }
}

impl<T: Stamp + ?Sized> Stamp for &T {
    fn millis(&self) -> Option<Millis> {
        (**self).millis()
    }
}

// === errors ===

/// Why a console request failed. Each variant is one kind of answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConsoleError {
    /// No (live) session: go to the login page.
    #[error("sign in first")]
    SignIn,
    /// Does not exist, or belongs to someone else (no hint which).
    #[error("not found")]
    NotFound,
    /// Not allowed.
    #[error("{0}")]
    Forbidden(String),
    /// The form's CSRF token is missing or wrong.
    #[error("CSRF token missing or wrong")]
    Csrf,
    /// Input that cannot be read at all (no form to re-render).
    #[error("{0}")]
    BadRequest(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Anything else on our side.
    #[error("{0}")]
    Internal(String),
}

/// Result of a console handler.
pub(crate) type ConsoleResult<T = Response> = Result<T, ConsoleError>;

fn message(status: StatusCode, page: &str, title: &str, text: String) -> Response {
    render(
        status,
        &MessagePage {
            layout: Layout::bare(),
            page: page.to_string(),
            title: title.to_string(),
            message: text,
            is_error: true,
        },
    )
}

impl IntoResponse for ConsoleError {
    fn into_response(self) -> Response {
        match self {
            ConsoleError::SignIn => see_other("/login"),
            ConsoleError::NotFound | ConsoleError::Store(StoreError::NotFound(_)) => message(
                StatusCode::NOT_FOUND,
                "not-found",
                "Not found",
                "There is nothing here.".into(),
            ),
            ConsoleError::Forbidden(text) => {
                message(StatusCode::FORBIDDEN, "forbidden", "Not allowed", text)
            }
            ConsoleError::Csrf => (
                StatusCode::FORBIDDEN,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                "CSRF token missing or wrong",
            )
                .into_response(),
            ConsoleError::BadRequest(text) => {
                message(StatusCode::BAD_REQUEST, "bad-request", "Bad request", text)
            }
            ConsoleError::Store(StoreError::Conflict(text)) => {
                message(StatusCode::CONFLICT, "conflict", "Conflict", text)
            }
            ConsoleError::Store(e) => {
                tracing::error!("console store: {e}");
                message(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "error",
                    "Server error",
                    "Something went wrong on the server; try again later.".into(),
                )
            }
            ConsoleError::Internal(e) => {
                tracing::error!("console: {e}");
                message(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "error",
                    "Server error",
                    "Something went wrong on the server; try again later.".into(),
                )
            }
        }
    }
}
