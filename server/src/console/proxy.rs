//! The browser path to shared web services: `https://SERVER/p/OWNER/SERVICE/…` (or
//! `/p/OWNER@DEVICE/SERVICE/…` when the owner shares the service from several online
//! devices), proxied through the relay to an `--http` share.
//!
//! Who may: anyone for a public share; for a club share, a signed-in user the directory
//! lets reach it (`Store::directory`: they share one of its clubs with its owner).
//! Signed out, a club share asks to sign in; otherwise a page says why not (not
//! shared with you, not a web service, offline, refused by the device).
//!
//! How: one tunnel per request. Each request opens a session record, asks the
//! providing agent for a tunnel (`Relay::offer`, which the agent checks against its own
//! share table) and speaks HTTP/1.1 on that QUIC stream with hyper's client. A stream
//! costs no handshake, every request is checked by the agent afresh (a share removed or
//! a member removed stops the next request), and nothing is pooled across browsers;
//! the price is one server-agent round trip per request and one session record each.
//! Bodies stream both ways (never buffered whole); a WebSocket (any `Upgrade`) is
//! passed through and then copied both ways until either side closes. The session's
//! end (bytes each way, one request, outcome) is recorded when the last part of the
//! exchange (the response body, the connection, the upgraded stream) is dropped.
//!
//! What the service sees: the path without the prefix, `X-Forwarded-Prefix`,
//! `X-Forwarded-For` (the client's address), `X-Forwarded-Proto: https` and
//! `X-Forwarded-Host`; never the console's cookies (any cookie named like the
//! console's), the `Authorization` header, or hop-by-hop headers. Its answers have
//! hop-by-hop headers removed, `Location`s that point at this server rewritten into
//! the prefix, cookie paths moved under the prefix, and any attempt to set a cookie
//! named like the console's dropped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use askama::Template;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::{StatusCode, Uri, Version};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;

use herald_shared::peers::{Consumer, TunnelOffer, TunnelOpen};

use super::auth::{CSRF_COOKIE, SESSION_COOKIE, VISIT_COOKIE_PREFIX};
use super::clubs::MaybeSession;
use super::{render, ConsoleState, Layout};
use crate::model::{DirectoryEntry, NewSession, SessionEnd, Via};
use crate::relay::OfferError;
use crate::store::Store;

/// Where shared web services are served.
pub(crate) const PREFIX: &str = "/p/";
/// How long the service may take to start its answer (headers).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// Headers that concern one connection only (RFC 9110 7.6.1), never passed on.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The proxy's routes. Kept apart from the console's pages: the service's answers keep
/// their own security headers, and bodies are streamed without the forms' limit.
pub(super) fn router(state: ConsoleState) -> Router {
    Router::new()
        .route("/p/{peer}/{service}", any(add_slash))
        .route("/p/{peer}/{service}/", any(proxy))
        .route("/p/{peer}/{service}/{*rest}", any(proxy))
        .with_state(state)
}

/// `/p/OWNER/SERVICE` → `/p/OWNER/SERVICE/`, so the service's relative links resolve.
async fn add_slash(uri: Uri) -> Response {
    let target = match uri.query() {
        Some(q) => format!("{}/?{q}", uri.path()),
        None => format!("{}/", uri.path()),
    };
    (StatusCode::PERMANENT_REDIRECT, [(header::LOCATION, target)]).into_response()
}

// === pure parts ===

/// A request path under [`PREFIX`]: the target and the rest of the path (from its `/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SharePath {
    /// Owner, optional device, service.
    pub(crate) target: TunnelOpen,
    /// `/p/PEER/SERVICE`, as the request named it (no trailing slash).
    pub(crate) prefix: String,
    /// The path the service sees, starting with `/`.
    pub(crate) rest: String,
}

/// Splits `/p/PEER/SERVICE/REST`; `None` for anything else (or bad names).
pub(crate) fn split_share_path(path: &str) -> Option<SharePath> {
    let tail = path.strip_prefix(PREFIX)?;
    let mut parts = tail.splitn(3, '/');
    let peer = parts.next()?;
    let service = parts.next()?;
    let rest = format!("/{}", parts.next()?);
    let target = TunnelOpen::parse(&format!("{peer}/{service}")).ok()?;
    Some(SharePath {
        target,
        prefix: format!("/p/{peer}/{service}"),
        rest,
    })
}

/// Whether a cookie name is one of the console's (or could pass for one).
pub(crate) fn is_console_cookie(name: &str) -> bool {
    let name = name.trim();
    name == SESSION_COOKIE
        || name == CSRF_COOKIE
        || name.starts_with(VISIT_COOKIE_PREFIX)
        || name.to_ascii_lowercase().starts_with("__host-herald")
        || name.to_ascii_lowercase().starts_with("__secure-herald")
        || name.to_ascii_lowercase().starts_with("herald_")
}

/// What the proxy tells the service about the request.
#[derive(Debug, Clone)]
pub(crate) struct Forwarded {
    /// `/p/PEER/SERVICE`.
    pub(crate) prefix: String,
    /// The browser's address.
    pub(crate) client: String,
    /// The `Host` the browser asked for.
    pub(crate) host: Option<HeaderValue>,
}

/// Whether a request asks to switch protocols (a WebSocket).
pub(crate) fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && connection_tokens(headers).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = String> + '_ {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// Removes hop-by-hop headers, and those `Connection` names; with `keep_upgrade`, puts
/// `Connection: upgrade` and the `Upgrade` header back.
fn strip_hop_by_hop(headers: &HeaderMap, keep_upgrade: bool) -> HeaderMap {
    let named: Vec<String> = connection_tokens(headers)
        .map(|t| t.to_ascii_lowercase())
        .collect();
    let mut out = HeaderMap::new();
    for (name, value) in headers {
        let lower = name.as_str();
        if HOP_BY_HOP.contains(&lower) || named.iter().any(|n| n == lower) {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    if keep_upgrade {
        if let Some(upgrade) = headers.get(header::UPGRADE) {
            out.insert(header::UPGRADE, upgrade.clone());
            out.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
    }
    out
}

/// The request headers the service gets.
pub(crate) fn upstream_headers(headers: &HeaderMap, forwarded: &Forwarded) -> HeaderMap {
    let mut out = strip_hop_by_hop(headers, is_upgrade(headers));
    out.remove(header::AUTHORIZATION);
    out.remove(header::FORWARDED);
    for name in [
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-forwarded-prefix",
    ] {
        out.remove(name);
    }
    out.remove(header::COOKIE);
    let kept: Vec<&str> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|pair| !pair.is_empty())
        .filter(|pair| !is_console_cookie(pair.split('=').next().unwrap_or(pair)))
        .collect();
    if !kept.is_empty() {
        if let Ok(value) = HeaderValue::from_str(&kept.join("; ")) {
            out.insert(header::COOKIE, value);
        }
    }
    let mut set = |name: &'static str, value: &str| {
        if let Ok(value) = HeaderValue::from_str(value) {
            out.insert(HeaderName::from_static(name), value);
        }
    };
    set("x-forwarded-prefix", &forwarded.prefix);
    set("x-forwarded-for", &forwarded.client);
    set("x-forwarded-proto", "https");
    if let Some(host) = forwarded.host.as_ref().and_then(|h| h.to_str().ok()) {
        set("x-forwarded-host", host);
    }
    out
}

/// A `Location` pointing at this server (`/x`, or `https://HOST/x`), moved under the
/// prefix; other locations (relative, other hosts) unchanged.
pub(crate) fn rewrite_location(location: &str, prefix: &str, host: Option<&str>) -> String {
    if location.starts_with('/') && !location.starts_with("//") {
        if location == prefix || location.starts_with(&format!("{prefix}/")) {
            return location.to_string();
        }
        return format!("{prefix}{location}");
    }
    if let Some(host) = host {
        for scheme in ["https://", "http://"] {
            let origin = format!("{scheme}{host}");
            if let Some(path) = location.strip_prefix(&origin) {
                if path.is_empty() || path.starts_with('/') {
                    let path = if path.is_empty() { "/" } else { path };
                    return format!("https://{host}{}", rewrite_location(path, prefix, None));
                }
            }
        }
    }
    location.to_string()
}

/// A service's `Set-Cookie` as the browser gets it: `None` for a cookie named like the
/// console's; an explicit `Path` moved under the prefix (without one the browser's
/// default, the request's directory, is already under it).
pub(crate) fn rewrite_set_cookie(value: &str, prefix: &str) -> Option<String> {
    let mut parts = value.split(';');
    let pair = parts.next()?.trim();
    let name = pair.split('=').next()?.trim();
    if name.is_empty() || is_console_cookie(name) {
        return None;
    }
    let mut out = vec![pair.to_string()];
    for attribute in parts {
        let attribute = attribute.trim();
        let (key, val) = attribute.split_once('=').unwrap_or((attribute, ""));
        if key.trim().eq_ignore_ascii_case("path") {
            let val = val.trim();
            let val = if val.starts_with('/') { val } else { "/" };
            if val == prefix || val.starts_with(&format!("{prefix}/")) {
                out.push(format!("Path={val}"));
            } else {
                out.push(format!("Path={prefix}{val}"));
            }
        } else if !attribute.is_empty() {
            out.push(attribute.to_string());
        }
    }
    Some(out.join("; "))
}

/// Response headers a service may not send: they would reach beyond its prefix (wipe the
/// console's cookies and storage, widen a service worker's scope, or keep a window it
/// opens on a console page within its reach).
const WITHHELD: &[&str] = &[
    "clear-site-data",
    "service-worker-allowed",
    "cross-origin-opener-policy",
    "cross-origin-opener-policy-report-only",
];

/// The Content-Security-Policy added to every service response, on top of the
/// service's own: its page shares the console's origin, so its scripts may connect,
/// post forms, frame and run workers only under its own prefix. (Console pages forbid
/// framing and open in their own browsing context group, `Cross-Origin-Opener-Policy:
/// same-origin`, so a service's page cannot read them through a window either.)
pub(crate) fn share_policy(host: &str, prefix: &str) -> String {
    let here = format!("https://{host}{prefix}/");
    let ws = format!("wss://{host}{prefix}/");
    format!(
        "connect-src {here} {ws}; form-action {here}; frame-src {here}; child-src {here}; \
         worker-src {here}; object-src 'none'; base-uri {here}"
    )
}

/// The response headers the browser gets.
pub(crate) fn downstream_headers(
    headers: &HeaderMap,
    switching: bool,
    prefix: &str,
    host: Option<&str>,
) -> HeaderMap {
    let mut out = strip_hop_by_hop(headers, switching);
    for name in WITHHELD {
        out.remove(*name);
    }
    // Without a host the policy cannot name this server: allow nothing to connect.
    let policy = match host {
        Some(host) => share_policy(host, prefix),
        None => "connect-src 'none'; form-action 'none'; frame-src 'none'; child-src 'none'; \
                 worker-src 'none'; object-src 'none'; base-uri 'none'"
            .to_string(),
    };
    if let Ok(value) = HeaderValue::from_str(&policy) {
        out.append(header::CONTENT_SECURITY_POLICY, value);
    }
    if let Some(location) = out.get(header::LOCATION).and_then(|l| l.to_str().ok()) {
        if let Ok(value) = HeaderValue::from_str(&rewrite_location(location, prefix, host)) {
            out.insert(header::LOCATION, value);
        }
    }
    let cookies: Vec<HeaderValue> = out
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| rewrite_set_cookie(v, prefix))
        .filter_map(|v| HeaderValue::from_str(&v).ok())
        .collect();
    out.remove(header::SET_COOKIE);
    for cookie in cookies {
        out.append(header::SET_COOKIE, cookie);
    }
    out
}

// === the session record ===

/// Counts a session's bytes and records its end once every part holding it is gone.
struct Metered {
    store: Store,
    id: i64,
    up: AtomicU64,
    down: AtomicU64,
    outcome: Mutex<String>,
}

impl Metered {
    fn fail(&self, why: String) {
        *self.outcome.lock().unwrap_or_else(|e| e.into_inner()) = why;
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        let end = SessionEnd {
            bytes_up: self.up.load(Ordering::Relaxed),
            bytes_down: self.down.load(Ordering::Relaxed),
            requests: 1,
            outcome: std::mem::take(self.outcome.get_mut().unwrap_or_else(|e| e.into_inner())),
            ended_at: crate::now_ms(),
        };
        if let Err(e) = self.store.close_session(self.id, &end) {
            tracing::warn!(session = self.id, "cannot record the end of a session: {e}");
        }
    }
}

// === the handler ===

#[derive(Template)]
#[template(path = "share_refused.html")]
struct Refused {
    layout: Layout,
    title: String,
    message: String,
    sign_in: bool,
    choices: Vec<String>,
}

fn refused(status: StatusCode, title: &str, message: String) -> Response {
    page(status, title, message, false, Vec::new())
}

fn page(
    status: StatusCode,
    title: &str,
    message: String,
    sign_in: bool,
    choices: Vec<String>,
) -> Response {
    let mut response = render(
        status,
        &Refused {
            layout: Layout::bare(),
            title: title.to_string(),
            message,
            sign_in,
            choices,
        },
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // The console's own page: its security headers (the proxy's routes sit outside the
    // layer that adds them). `security_headers` never waits.
    use futures_util::FutureExt;
    super::security_headers(response)
        .now_or_never()
        .unwrap_or_else(|| (StatusCode::INTERNAL_SERVER_ERROR, "security headers").into_response())
}

/// Which shares the request may reach: the online `http` one it names, or a page why not.
// The error is the answer itself, made at most once per request: no use boxing it.
#[allow(clippy::result_large_err)]
fn choose(
    state: &ConsoleState,
    viewer: Option<i64>,
    path: &SharePath,
) -> Result<DirectoryEntry, Response> {
    let target = &path.target;
    let named = format!("{}/{}", target.owner, target.service);
    let entries = state
        .store()
        .directory(viewer, Some(&target.owner))
        .map_err(|e| {
            tracing::error!("directory: {e}");
            refused(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Server error",
                "Something went wrong on the server; try again later.".into(),
            )
        })?;
    let mut found: Vec<DirectoryEntry> = entries
        .into_iter()
        .filter(|e| e.owner == target.owner && e.service.name == target.service)
        .filter(|e| target.device.as_ref().is_none_or(|d| *d == e.device))
        .collect();
    if found.is_empty() {
        return Err(match viewer {
            None => page(
                StatusCode::FORBIDDEN,
                "Sign in",
                format!(
                    "{named} is not shared publicly. If it is shared with a club of yours, \
                     log in, then open this address again."
                ),
                true,
                Vec::new(),
            ),
            Some(_) => refused(
                StatusCode::NOT_FOUND,
                "Not shared with you",
                format!(
                    "No service {named} is shared with you: it does not exist, or its owner \
                     shares it only with clubs you are not in."
                ),
            ),
        });
    }
    found.retain(|e| e.service.http);
    if found.is_empty() {
        return Err(refused(
            StatusCode::NOT_FOUND,
            "Not a web service",
            format!(
                "{named} is not shared as a web (http) service; reach it with \
                 `herald-agent connect {named}` instead."
            ),
        ));
    }
    found.retain(|e| state.api.relay.online_since(&e.agent_id).is_some());
    match found.len() {
        0 => Err(refused(
            StatusCode::SERVICE_UNAVAILABLE,
            "Offline",
            format!("The device sharing {named} is offline; try again when it is back."),
        )),
        1 => Ok(found.remove(0)),
        _ => Err(page(
            StatusCode::CONFLICT,
            "Several devices",
            format!(
                "{} shares {} from several devices; choose one.",
                target.owner, target.service
            ),
            false,
            found
                .iter()
                .map(|e| format!("/p/{}@{}/{}/", e.owner, e.device, e.service.name))
                .collect(),
        )),
    }
}

/// Any request under `/p/PEER/SERVICE/`.
async fn proxy(
    State(state): State<ConsoleState>,
    MaybeSession(session): MaybeSession,
    mut request: Request,
) -> Response {
    let Some(path) = split_share_path(request.uri().path()) else {
        return refused(
            StatusCode::NOT_FOUND,
            "Not found",
            "Shared services are at /p/OWNER/SERVICE/.".into(),
        );
    };
    let viewer = session.as_ref().map(|s| s.user.id);
    let entry = match choose(&state, viewer, &path) {
        Ok(entry) => entry,
        Err(page) => return page,
    };
    let client = crate::https::ClientAddr::of(request.extensions())
        .map(|ip| ip.to_string())
        .unwrap_or_default();
    let upstream_uri = match request.uri().query() {
        Some(q) => format!("{}?{q}", path.rest),
        None => path.rest.clone(),
    };
    let id = match state.store().open_session(&NewSession {
        provider_agent_id: entry.agent_id.clone(),
        share: entry.service.name.clone(),
        provider_user_id: entry.owner_user_id,
        consumer_user_id: viewer,
        consumer_agent_id: None,
        via: Via::Browser,
        source: client.clone(),
        path: path.rest.clone(),
        started_at: state.now(),
    }) {
        Ok(id) => id,
        Err(e) => {
            tracing::error!("tunnel session: {e}");
            return refused(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Server error",
                "Something went wrong on the server; try again later.".into(),
            );
        }
    };
    let metered = Arc::new(Metered {
        store: state.store().clone(),
        id,
        up: AtomicU64::new(0),
        down: AtomicU64::new(0),
        outcome: Mutex::new("closed".into()),
    });
    let offer = TunnelOffer {
        session: id,
        share: entry.service.name.clone(),
        consumer: Consumer::Browser {
            user: session.as_ref().map(|s| s.user.login.clone()),
            address: client.clone(),
        },
        clubs: entry.service.clubs.clone(),
    };
    let (send, recv) = match state.api.relay.offer(&entry.agent_id, &offer).await {
        Ok(pair) => pair,
        Err(e) => {
            let status = match e {
                OfferError::Offline => StatusCode::SERVICE_UNAVAILABLE,
                OfferError::NoAnswer => StatusCode::GATEWAY_TIMEOUT,
                OfferError::Refused(_) => StatusCode::FORBIDDEN,
                OfferError::Failed(_) => StatusCode::BAD_GATEWAY,
            };
            metered.fail(match &e {
                OfferError::Refused(why) => format!("refused: {why}"),
                other => format!("failed: {other}"),
            });
            return refused(status, "Not reachable", format!("{e}."));
        }
    };
    let (mut sender, connection) = match hyper::client::conn::http1::handshake(TokioIo::new(
        tokio::io::join(recv, send),
    ))
    .await
    {
        Ok(pair) => pair,
        Err(e) => {
            metered.fail(format!("failed: {e}"));
            return refused(StatusCode::BAD_GATEWAY, "Not reachable", format!("{e}."));
        }
    };
    {
        let metered = metered.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!(session = metered.id, "shared service connection: {e}");
            }
        });
    }

    let forwarded = Forwarded {
        prefix: path.prefix.clone(),
        client,
        host: request.headers().get(header::HOST).cloned(),
    };
    let upgrade = is_upgrade(request.headers());
    let browser_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
    let headers = upstream_headers(request.headers(), &forwarded);
    let method = request.method().clone();
    let up = metered.clone();
    let body = Body::new(request.into_body().map_frame(move |frame| {
        if let Some(data) = frame.data_ref() {
            up.up.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        frame
    }));
    let mut upstream = hyper::Request::new(body);
    *upstream.method_mut() = method;
    *upstream.version_mut() = Version::HTTP_11;
    *upstream.headers_mut() = headers;
    match upstream_uri.parse() {
        Ok(uri) => *upstream.uri_mut() = uri,
        Err(_) => {
            metered.fail("failed: bad path".into());
            return refused(
                StatusCode::BAD_REQUEST,
                "Bad request",
                "The path is not valid.".into(),
            );
        }
    }

    let mut response =
        match tokio::time::timeout(RESPONSE_TIMEOUT, sender.send_request(upstream)).await {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => {
                metered.fail(format!("failed: {e}"));
                return refused(
                    StatusCode::BAD_GATEWAY,
                    "No answer",
                    format!("The shared service did not answer properly: {e}."),
                );
            }
            Err(_) => {
                metered.fail("failed: no answer in time".into());
                return refused(
                    StatusCode::GATEWAY_TIMEOUT,
                    "No answer",
                    "The shared service did not answer in time.".into(),
                );
            }
        };
    let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    let host = forwarded.host.as_ref().and_then(|h| h.to_str().ok());
    let headers = downstream_headers(response.headers(), switching, &path.prefix, host);
    let status = response.status();
    if switching {
        if let Some(browser_upgrade) = browser_upgrade {
            let service_upgrade = hyper::upgrade::on(&mut response);
            let metered = metered.clone();
            tokio::spawn(async move {
                match tokio::try_join!(browser_upgrade, service_upgrade) {
                    Ok((browser, service)) => {
                        let mut browser = TokioIo::new(browser);
                        let mut service = TokioIo::new(service);
                        match tokio::io::copy_bidirectional(&mut browser, &mut service).await {
                            Ok((up, down)) => {
                                metered.up.fetch_add(up, Ordering::Relaxed);
                                metered.down.fetch_add(down, Ordering::Relaxed);
                            }
                            Err(e) => {
                                tracing::debug!(session = metered.id, "upgraded stream: {e}")
                            }
                        }
                    }
                    Err(e) => metered.fail(format!("failed: upgrade: {e}")),
                }
            });
        }
    }
    let down = metered;
    let body = Body::new(response.into_body().map_frame(move |frame| {
        if let Some(data) = frame.data_ref() {
            down.down.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        frame
    }));
    let mut out = Response::new(body);
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn share_paths_split_into_target_prefix_and_rest() {
        let p = split_share_path("/p/alice/web/a/b.html").unwrap();
        assert_eq!(p.target.owner, "alice");
        assert_eq!(p.target.service, "web");
        assert_eq!(p.prefix, "/p/alice/web");
        assert_eq!(p.rest, "/a/b.html");
        let p = split_share_path("/p/alice@nas/web/").unwrap();
        assert_eq!(p.target.device.as_deref(), Some("nas"));
        assert_eq!(p.prefix, "/p/alice@nas/web");
        assert_eq!(p.rest, "/");
        for bad in [
            "/p/alice/web",
            "/p/alice",
            "/x/alice/web/",
            "/p/a b/web/",
            "/p//web/",
        ] {
            assert!(split_share_path(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn the_service_never_sees_console_cookies_or_credentials() {
        let forwarded = Forwarded {
            prefix: "/p/alice/web".into(),
            client: "192.0.2.7".into(),
            host: Some(HeaderValue::from_static("herald.example:8443")),
        };
        let h = upstream_headers(
            &map(&[
                ("host", "herald.example:8443"),
                (
                    "cookie",
                    "__Host-herald_session=s3cret; app=1; __Host-herald_csrf=c",
                ),
                ("cookie", "herald_visit_12=v; theme=dark"),
                ("authorization", "Bearer x"),
                ("x-forwarded-for", "10.9.9.9"),
                ("connection", "keep-alive, x-private"),
                ("x-private", "hop"),
                ("keep-alive", "timeout=5"),
                ("accept", "text/html"),
            ]),
            &forwarded,
        );
        assert_eq!(h["cookie"], "app=1; theme=dark");
        assert!(h.get("authorization").is_none());
        assert!(h.get("connection").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get("x-private").is_none(), "named by Connection");
        assert_eq!(
            h["x-forwarded-for"], "192.0.2.7",
            "the client's, not its claim"
        );
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "herald.example:8443");
        assert_eq!(h["x-forwarded-prefix"], "/p/alice/web");
        assert_eq!(h["host"], "herald.example:8443");
        assert_eq!(h["accept"], "text/html");
        let only_console = upstream_headers(
            &map(&[("cookie", "__Host-herald_session=s3cret")]),
            &forwarded,
        );
        assert!(only_console.get("cookie").is_none());
    }

    #[test]
    fn websocket_upgrades_keep_their_headers() {
        let forwarded = Forwarded {
            prefix: "/p/a/b".into(),
            client: "::1".into(),
            host: None,
        };
        let h = upstream_headers(
            &map(&[
                ("connection", "keep-alive, Upgrade"),
                ("upgrade", "websocket"),
                ("sec-websocket-key", "k"),
            ]),
            &forwarded,
        );
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["sec-websocket-key"], "k");
        let plain = upstream_headers(&map(&[("upgrade", "h2c")]), &forwarded);
        assert!(plain.get("upgrade").is_none(), "no Connection: upgrade");
    }

    #[test]
    fn locations_at_this_server_move_under_the_prefix() {
        let p = "/p/alice/web";
        let host = Some("h.example:8443");
        assert_eq!(rewrite_location("/login", p, host), "/p/alice/web/login");
        assert_eq!(
            rewrite_location("/p/alice/web/x", p, host),
            "/p/alice/web/x"
        );
        assert_eq!(rewrite_location("next.html", p, host), "next.html");
        assert_eq!(
            rewrite_location("//evil.example/", p, host),
            "//evil.example/"
        );
        assert_eq!(
            rewrite_location("http://h.example:8443/a?b=1", p, host),
            "https://h.example:8443/p/alice/web/a?b=1"
        );
        assert_eq!(
            rewrite_location("https://other.example/a", p, host),
            "https://other.example/a"
        );
    }

    #[test]
    fn service_cookies_stay_under_the_prefix_and_never_pose_as_the_consoles() {
        let p = "/p/alice/web";
        assert_eq!(
            rewrite_set_cookie("sid=1; Path=/; HttpOnly", p).as_deref(),
            Some("sid=1; Path=/p/alice/web/; HttpOnly")
        );
        assert_eq!(
            rewrite_set_cookie("sid=1; path=/app", p).as_deref(),
            Some("sid=1; Path=/p/alice/web/app")
        );
        assert_eq!(
            rewrite_set_cookie("sid=1; Max-Age=60", p).as_deref(),
            Some("sid=1; Max-Age=60")
        );
        assert_eq!(
            rewrite_set_cookie("__Host-herald_session=x; Path=/", p),
            None
        );
        assert_eq!(rewrite_set_cookie("herald_visit_3=x", p), None);
        let h = downstream_headers(
            &map(&[
                ("set-cookie", "a=1; Path=/"),
                ("set-cookie", "__Host-herald_csrf=x; Path=/; Secure"),
                ("location", "/done"),
                ("transfer-encoding", "chunked"),
                ("content-type", "text/plain"),
            ]),
            false,
            p,
            None,
        );
        let cookies: Vec<_> = h.get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["a=1; Path=/p/alice/web/"]);
        assert_eq!(h["location"], "/p/alice/web/done");
        assert!(h.get("transfer-encoding").is_none());
        assert_eq!(h["content-type"], "text/plain");
    }

    #[test]
    fn service_pages_are_confined_to_their_prefix() {
        let h = downstream_headers(
            &map(&[
                ("content-security-policy", "default-src 'self'"),
                ("clear-site-data", "\"cookies\""),
                ("service-worker-allowed", "/"),
                ("cross-origin-opener-policy", "same-origin"),
            ]),
            false,
            "/p/alice/web",
            Some("h.example:8443"),
        );
        let policies: Vec<_> = h.get_all("content-security-policy").iter().collect();
        assert_eq!(policies.len(), 2, "the service's own policy stays");
        let ours = policies[1].to_str().unwrap();
        assert!(ours.contains(
            "connect-src https://h.example:8443/p/alice/web/ wss://h.example:8443/p/alice/web/;"
        ));
        assert!(ours.contains("form-action https://h.example:8443/p/alice/web/;"));
        for gone in [
            "clear-site-data",
            "service-worker-allowed",
            "cross-origin-opener-policy",
        ] {
            assert!(h.get(gone).is_none(), "{gone}");
        }
    }
}
