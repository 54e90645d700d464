//! Browser services: the server's own service page (`/service/{name}`) and the
//! outcome endpoint of external services (`POST /api/v1/visits`).
//!
//! The agent opens the page with the one-time ticket the relay minted into the
//! signal. Redeeming it (once: `jobs.visit_redeemed_at`) creates a *visit*: a cookie
//! named after the job (`herald_visit_<job>`) and scoped to the entry's page, that
//! admits that job's page only, with its own CSRF token. One cookie per job, so a
//! second ticket opened in the same browser does not end the first visit.
//! The visitor's answer completes the job: `done` succeeds, `declined` fails.

use askama::Template;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::header::SET_COOKIE;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Form, Json};
use serde::{Deserialize, Serialize};

use herald_shared::protocol::JobId;
use herald_shared::Millis;

use super::auth::{self, VISIT_COOKIE_PREFIX};
use super::{render, see_other, ConsoleError, ConsoleResult, ConsoleState, Layout};
use crate::api::ApiError;
use crate::model::CatalogEntry;
use crate::model::{Completion, Visit, VisitOutcome};
use crate::ticket::TicketError;

/// Longest note a visitor may leave.
const MAX_NOTE: usize = 1000;
/// Lifetime of a visit when the ticket's expiry cannot be read (it always can).
const FALLBACK_VISIT_MS: i64 = 3600 * 1000;

#[derive(Template)]
#[template(path = "service.html")]
struct ServicePage {
    layout: Layout,
    entry: CatalogEntry,
    job_id: JobId,
    csrf: String,
    closed: bool,
    state: String,
    note: String,
    error: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct ServiceQuery {
    herald_ticket: Option<String>,
    job: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct AnswerForm {
    csrf: String,
    job: String,
    outcome: String,
    note: String,
}

/// `POST /api/v1/visits` body.
#[derive(Debug, Deserialize)]
pub(crate) struct VisitAnswer {
    /// The ticket the service page was opened with.
    pub(crate) ticket: String,
    /// `done` or `declined`.
    pub(crate) outcome: String,
    /// What the person wrote, if anything.
    #[serde(default)]
    pub(crate) note: String,
}

/// `POST /api/v1/visits` answer.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct VisitDone {
    /// The job.
    pub(crate) job: JobId,
    /// Its final state.
    pub(crate) state: String,
}

fn forbidden(text: &str) -> ConsoleError {
    ConsoleError::Forbidden(text.to_string())
}

/// The expiry written into a ticket (`v1.<job>.<expiry>.<tag>`), once verified.
fn ticket_expiry(ticket: &str) -> Option<Millis> {
    ticket.split('.').nth(2)?.parse().ok()
}

/// A browser-service entry by name, or 404.
fn browser_entry(state: &ConsoleState, name: &str) -> ConsoleResult<CatalogEntry> {
    let entry = state.store().catalog_entry(name)?;
    if entry.kind != "open" {
        return Err(ConsoleError::NotFound);
    }
    Ok(entry)
}

/// The name of the cookie of a job's visit.
fn visit_cookie(job_id: JobId) -> String {
    format!("{VISIT_COOKIE_PREFIX}{job_id}")
}

/// The visit this browser holds for `job_id`, if any.
fn visit_for(state: &ConsoleState, headers: &HeaderMap, job_id: JobId) -> ConsoleResult<Visit> {
    let token = auth::cookie(headers, &visit_cookie(job_id))
        .ok_or_else(|| forbidden("open this page from the link on your device"))?;
    let visit = state
        .store()
        .visit(&auth::token_hash(token), state.now())?
        .ok_or_else(|| forbidden("this visit has ended; open the page from your device again"))?;
    if visit.job_id != job_id {
        return Err(forbidden("this page belongs to another task"));
    }
    Ok(visit)
}

/// `GET /service/{name}`: redeems `?herald_ticket=` once, or shows `?job=` to the
/// visit that holds it.
pub(super) async fn service_page(
    State(state): State<ConsoleState>,
    Path(name): Path<String>,
    Query(query): Query<ServiceQuery>,
    headers: HeaderMap,
) -> ConsoleResult {
    let entry = browser_entry(&state, &name)?;
    if let Some(ticket) = query.herald_ticket {
        return redeem(&state, &entry, &ticket);
    }
    let job_id: JobId = query
        .job
        .as_deref()
        .and_then(|j| j.parse().ok())
        .ok_or_else(|| forbidden("open this page from the link on your device"))?;
    let visit = visit_for(&state, &headers, job_id)?;
    page(&state, entry, &visit, StatusCode::OK, String::new(), None)
}

fn redeem(state: &ConsoleState, entry: &CatalogEntry, ticket: &str) -> ConsoleResult {
    let now = state.now();
    let job_id = match state.tickets.verify(ticket, now) {
        Ok(job_id) => job_id,
        Err(TicketError::Expired) => return Err(forbidden("this link has expired")),
        Err(TicketError::Invalid) => return Err(forbidden("this link is not valid")),
    };
    let job = state
        .store()
        .service_job(job_id)?
        .ok_or_else(|| forbidden("this link is not valid"))?;
    if !job.is_for(&entry.name) {
        return Err(forbidden("this link is not for this service"));
    }
    if !state.store().redeem_ticket(job_id, now)? {
        return Err(forbidden("this link was already used"));
    }
    let token = auth::random_token();
    let expires_at = ticket_expiry(ticket).unwrap_or(now + FALLBACK_VISIT_MS);
    state.store().create_visit(
        &auth::token_hash(&token),
        job_id,
        &auth::random_token(),
        now,
        expires_at,
    )?;
    let mut response = see_other(&format!("/service/{}?job={job_id}", entry.name));
    // Lax, not Strict: the page is often reached from a link outside the console.
    // Scoped to this entry's page: other pages, the console's included, never see it.
    response.headers_mut().append(
        SET_COOKIE,
        auth::set_cookie(
            &visit_cookie(job_id),
            Some(&token),
            &format!("/service/{}", entry.name),
            "Lax",
        ),
    );
    Ok(response)
}

fn page(
    state: &ConsoleState,
    entry: CatalogEntry,
    visit: &Visit,
    status: StatusCode,
    note: String,
    error: Option<String>,
) -> ConsoleResult {
    let job = state
        .store()
        .service_job(visit.job_id)?
        .ok_or(ConsoleError::NotFound)?;
    if !job.is_for(&entry.name) {
        return Err(forbidden("this page belongs to another service"));
    }
    Ok(render(
        status,
        &ServicePage {
            layout: Layout::bare(),
            entry,
            job_id: visit.job_id,
            csrf: visit.csrf.clone(),
            closed: job.state.is_final(),
            state: job.state.to_string(),
            note,
            error,
        },
    ))
}

/// `POST /service/{name}`: the visitor's answer.
pub(super) async fn answer(
    State(state): State<ConsoleState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    Form(form): Form<AnswerForm>,
) -> ConsoleResult {
    let entry = browser_entry(&state, &name)?;
    let job_id: JobId = form
        .job
        .parse()
        .map_err(|_| forbidden("this page belongs to another task"))?;
    let visit = visit_for(&state, &headers, job_id)?;
    if !auth::csrf_matches(&form.csrf, &visit.csrf) {
        return Err(ConsoleError::Csrf);
    }
    let note = form.note.trim().to_string();
    let outcome = match form.outcome.parse::<VisitOutcome>() {
        Ok(outcome) if note.chars().count() <= MAX_NOTE => outcome,
        Ok(_) => {
            let error = format!("the note may be at most {MAX_NOTE} characters");
            return page(
                &state,
                entry,
                &visit,
                StatusCode::BAD_REQUEST,
                note,
                Some(error),
            );
        }
        Err(error) => {
            return page(
                &state,
                entry,
                &visit,
                StatusCode::BAD_REQUEST,
                note,
                Some(error),
            )
        }
    };
    match state
        .store()
        .complete_visit(job_id, outcome, &note, false, state.now())?
    {
        Completion::Completed(_) => {
            state.api.relay.job_changed(job_id);
            Ok(see_other(&format!("/service/{}?job={job_id}", entry.name)))
        }
        Completion::AlreadyUsed => Err(forbidden("this link was already used")),
        Completion::Refused(reason) => page(
            &state,
            entry,
            &visit,
            StatusCode::CONFLICT,
            note,
            Some(reason),
        ),
    }
}

/// `POST /api/v1/visits`: an external browser service reports the outcome with the
/// ticket it was opened with. Public (the ticket is the credential); one answer per
/// ticket.
pub(super) async fn api_answer(
    State(state): State<ConsoleState>,
    body: Result<Json<VisitAnswer>, JsonRejection>,
) -> Response {
    match api_answer_inner(&state, body) {
        Ok(done) => Json(done).into_response(),
        Err(e) => e.into_response(),
    }
}

fn api_answer_inner(
    state: &ConsoleState,
    body: Result<Json<VisitAnswer>, JsonRejection>,
) -> Result<VisitDone, ApiError> {
    let Json(answer) = body.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let now = state.now();
    let job_id = state
        .tickets
        .verify(&answer.ticket, now)
        .map_err(|e| ApiError(StatusCode::FORBIDDEN, e.to_string()))?;
    let outcome: VisitOutcome = answer
        .outcome
        .parse()
        .map_err(|e: String| ApiError(StatusCode::BAD_REQUEST, e))?;
    let note = answer.note.trim();
    if note.chars().count() > MAX_NOTE {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("the note may be at most {MAX_NOTE} characters"),
        ));
    }
    let completion = state
        .store()
        .complete_visit(job_id, outcome, note, true, now)
        .map_err(ApiError::from)?;
    match completion {
        Completion::Completed(final_state) => {
            state.api.relay.job_changed(job_id);
            Ok(VisitDone {
                job: job_id,
                state: final_state.to_string(),
            })
        }
        Completion::AlreadyUsed => Err(ApiError(
            StatusCode::FORBIDDEN,
            "this ticket was already used".into(),
        )),
        Completion::Refused(reason) => Err(ApiError(StatusCode::CONFLICT, reason)),
    }
}
