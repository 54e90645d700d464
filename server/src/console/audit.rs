//! The console's share of the audit log: every POST (an action that changes something,
//! or reveals a secret such as a device-link token) is recorded with the signed-in user,
//! the client address and how it ended. Sign-in and registration record themselves,
//! with the login tried.

use std::net::IpAddr;

use axum::extract::{FromRequestParts, MatchedPath, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::auth::{client_ip, Session};
use super::{ConsoleError, ConsoleResult, ConsoleState};
use crate::model::AuditEvent;

/// Paths that audit themselves ([`record`]) or are not people's actions (an external
/// service's answer to a visit carries its own ticket).
const NOT_HERE: [&str; 3] = ["/login", "/register", "/api/v1/visits"];

/// How the log names someone signing in or registering: by the login tried, when it
/// could be one.
pub(super) fn login_actor(login: &str) -> String {
    let tried = login.trim().to_lowercase();
    match super::auth::check_login(&tried) {
        Ok(()) => format!("user:{tried}"),
        Err(_) => "anonymous".into(),
    }
}

/// How an answer's status reads in the log.
pub(super) fn outcome(status: StatusCode) -> String {
    match status.as_u16() {
        100..=399 => "ok".into(),
        401 => "failed: wrong login or password".into(),
        403 => "denied".into(),
        429 => "denied: too many attempts".into(),
        code => format!(
            "failed: {code} {}",
            status.canonical_reason().unwrap_or_default()
        ),
    }
}

/// Appends an entry; if it cannot be written the answer becomes an error page, so no
/// action goes unrecorded while looking done.
pub(super) fn record(
    state: &ConsoleState,
    actor: String,
    ip: Option<IpAddr>,
    action: &str,
    target: &str,
    result: ConsoleResult,
) -> ConsoleResult {
    let outcome = match &result {
        Ok(response) => outcome(response.status()),
        Err(e) => format!("failed: {e}"),
    };
    let event = AuditEvent {
        actor,
        source: ip
            .map(|ip| ip.to_string())
            .unwrap_or_else(|| "unknown".into()),
        action: action.into(),
        target: target.into(),
        outcome,
    };
    match state.store().audit(&event, state.now()) {
        Ok(_) => result,
        Err(e) => {
            tracing::error!(action, "audit log not written: {e}");
            Err(ConsoleError::Internal(format!(
                "the audit log could not record this action: {e}"
            )))
        }
    }
}

/// The layer: audits every POST but [`NOT_HERE`].
pub(super) async fn audit_posts(
    State(state): State<ConsoleState>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path().to_string();
    if request.method() != Method::POST || NOT_HERE.contains(&path.as_str()) {
        return next.run(request).await;
    }
    let (mut parts, body) = request.into_parts();
    let actor = match Session::from_request_parts(&mut parts, &state).await {
        Ok(session) => format!("user:{}", session.user.login),
        Err(_) => "anonymous".to_string(),
    };
    let ip = client_ip(&parts);
    let action = match parts.extensions.get::<MatchedPath>() {
        Some(matched) => format!("console:{}", matched.as_str()),
        None => "console:unknown".to_string(),
    };
    let response = next.run(Request::from_parts(parts, body)).await;
    match record(&state, actor, ip, &action, &path, Ok(response)) {
        Ok(response) => response,
        Err(e) => e.into_response(),
    }
}
