//! Clubs in the console: a user's clubs, creating one, inviting by a one-time link or
//! code, joining, leaving, and (for owners) removing and promoting members. A club the
//! user is not in answers 404 (admins see every club). Codes are shown once, stored as
//! their hash, expire after `model::INVITE_TTL_MS` and admit one person.
//!
//! The invitation link `/clubs/join/CODE` only shows what it is for; joining is a POST
//! (with the session's CSRF token), so a link followed by a crawler or a preview joins
//! no one. The session cookie is `SameSite=Strict`: a link opened from another site
//! arrives without it, so the page offers to open it again from here.

use askama::Template;
use axum::extract::FromRequestParts;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;

use super::account::NoFields;
use super::auth::{random_token, token_hash, Posted, Session};
use super::pages::path_id;
use super::{render, see_other, ConsoleError, ConsoleResult, ConsoleState, Layout};
use crate::model::{check_club, invite_code, Club, ClubMember, ClubRole, Leaving, INVITE_TTL_MS};
use crate::store::StoreError;

/// The signed-in user, if any: pages that strangers may open too (an invitation link,
/// a public share).
pub(super) struct MaybeSession(pub(super) Option<Session>);

impl FromRequestParts<ConsoleState> for MaybeSession {
    type Rejection = ConsoleError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &ConsoleState,
    ) -> Result<MaybeSession, ConsoleError> {
        match Session::from_request_parts(parts, state).await {
            Ok(session) => Ok(MaybeSession(Some(session))),
            Err(ConsoleError::SignIn) => Ok(MaybeSession(None)),
            Err(e) => Err(e),
        }
    }
}

/// Flash key of the invitation link made by the last POST, per session.
fn invite_key(session: &Session) -> String {
    format!("club-invite {}", session.token_hash)
}

#[derive(Template)]
#[template(path = "clubs.html")]
struct ClubsPage {
    layout: Layout,
    clubs: Vec<Club>,
    form: ClubForm,
    error: Option<String>,
    join_error: Option<String>,
    notice: Option<String>,
}

#[derive(Template)]
#[template(path = "club.html")]
struct ClubPage {
    layout: Layout,
    club: Club,
    members: Vec<ClubMember>,
    is_owner: bool,
    me: i64,
    invite: Option<String>,
    error: Option<String>,
}

#[derive(Template)]
#[template(path = "club_join.html")]
struct JoinPage {
    layout: Layout,
    code: String,
    club: Option<Club>,
    signed_in: bool,
    error: Option<String>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(default)]
pub(super) struct ClubForm {
    name: String,
    description: String,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct CodeForm {
    code: String,
}

fn clubs_page(state: &ConsoleState, session: &Session) -> ConsoleResult<ClubsPage> {
    Ok(ClubsPage {
        layout: Layout::of(session),
        clubs: state.store().clubs_of(session.user.id)?,
        form: ClubForm::default(),
        error: None,
        join_error: None,
        notice: None,
    })
}

/// The status of a refusal the user can act on.
fn refusal(e: StoreError) -> Result<(StatusCode, String), ConsoleError> {
    match e {
        StoreError::Conflict(m) => Ok((StatusCode::CONFLICT, m)),
        StoreError::NotFound(m) => Ok((StatusCode::NOT_FOUND, m)),
        StoreError::Invalid(m) => Ok((StatusCode::BAD_REQUEST, m)),
        other => Err(other.into()),
    }
}

/// `GET /clubs`.
pub(super) async fn list(State(state): State<ConsoleState>, session: Session) -> ConsoleResult {
    Ok(render(StatusCode::OK, &clubs_page(&state, &session)?))
}

/// `POST /clubs`: creates a club with the user as its owner.
pub(super) async fn create(
    State(state): State<ConsoleState>,
    Posted(session, form): Posted<ClubForm>,
) -> ConsoleResult {
    let name = form.name.trim();
    let description = form.description.trim();
    // The store counts the user's clubs and checks the name in the same transaction.
    let problem = match check_club(name, description) {
        Err(problem) => Some((StatusCode::BAD_REQUEST, problem)),
        Ok(()) => match state
            .store()
            .create_club(name, description, session.user.id, state.now())
        {
            Ok(_) => None,
            Err(e) => Some(refusal(e)?),
        },
    };
    match problem {
        None => Ok(see_other(&format!("/clubs/{name}"))),
        Some((status, problem)) => {
            let mut page = clubs_page(&state, &session)?;
            page.form = form;
            page.error = Some(problem);
            Ok(render(status, &page))
        }
    }
}

/// `POST /clubs/join`: joins with a code (or the whole link pasted).
pub(super) async fn join(
    State(state): State<ConsoleState>,
    Posted(session, form): Posted<CodeForm>,
) -> ConsoleResult {
    let code = invite_code(&form.code);
    let problem = if code.is_empty() {
        (StatusCode::BAD_REQUEST, "enter the invitation code".into())
    } else {
        match state
            .store()
            .accept_invite(&token_hash(code), session.user.id, state.now())
        {
            Ok(club) => return Ok(see_other(&format!("/clubs/{}", club.name))),
            Err(e) => refusal(e)?,
        }
    };
    let mut page = clubs_page(&state, &session)?;
    page.join_error = Some(problem.1);
    Ok(render(problem.0, &page))
}

/// `GET /clubs/join/{code}`: what the invitation is for, and the button that accepts.
pub(super) async fn join_link(
    State(state): State<ConsoleState>,
    Path(code): Path<String>,
    session: MaybeSession,
) -> ConsoleResult {
    let MaybeSession(session) = session;
    let layout = match &session {
        Some(s) => Layout::of(s),
        None => Layout::anonymous(),
    };
    let (status, club, error) = match state.store().invite_club(&token_hash(&code), state.now()) {
        Ok(club) => (StatusCode::OK, Some(club), None),
        Err(e) => {
            let (status, m) = refusal(e)?;
            (status, None, Some(m))
        }
    };
    // Signed out, the page names no club: the code alone shows nothing to strangers.
    let signed_in = session.is_some();
    let page = JoinPage {
        layout,
        code,
        club: club.filter(|_| signed_in),
        signed_in,
        error: error.filter(|_| signed_in),
    };
    Ok(render(
        if signed_in { status } else { StatusCode::OK },
        &page,
    ))
}

fn club_page(
    state: &ConsoleState,
    session: &Session,
    name: &str,
    error: Option<String>,
) -> ConsoleResult<ClubPage> {
    let club = state
        .store()
        .club(name, Some(session.user.id))?
        .filter(|c| c.role.is_some() || session.user.is_admin())
        .ok_or(ConsoleError::NotFound)?;
    Ok(ClubPage {
        layout: Layout::of(session),
        members: state.store().club_members(club.id)?,
        is_owner: club.role == Some(ClubRole::Owner),
        me: session.user.id,
        invite: state.flash().remove(&invite_key(session)),
        error,
        club,
    })
}

/// The club page again with a refusal, or the error page for anything else.
fn club_refusal(
    state: &ConsoleState,
    session: &Session,
    name: &str,
    e: StoreError,
) -> ConsoleResult {
    let (status, message) = refusal(e)?;
    let page = club_page(state, session, name, Some(message))?;
    Ok(render(status, &page))
}

/// `GET /clubs/{name}`: members, and the owners' controls.
pub(super) async fn show(
    State(state): State<ConsoleState>,
    Path(name): Path<String>,
    session: Session,
) -> ConsoleResult {
    let page = club_page(&state, &session, &name, None)?;
    Ok(render(StatusCode::OK, &page))
}

fn member_club(state: &ConsoleState, session: &Session, name: &str) -> ConsoleResult<Club> {
    state
        .store()
        .club(name, Some(session.user.id))?
        .filter(|c| c.role.is_some())
        .ok_or(ConsoleError::NotFound)
}

/// `POST /clubs/{name}/invite`: a new one-time code; its link is shown once.
pub(super) async fn invite(
    State(state): State<ConsoleState>,
    Path(name): Path<String>,
    Posted(session, NoFields {}): Posted<NoFields>,
) -> ConsoleResult {
    let club = member_club(&state, &session, &name)?;
    let code = random_token();
    let now = state.now();
    match state.store().add_invite(
        club.id,
        &token_hash(&code),
        session.user.id,
        now,
        now + INVITE_TTL_MS,
    ) {
        Ok(()) => {
            let link = format!(
                "{}/clubs/join/{code}",
                state.api.public_url.trim_end_matches('/')
            );
            state.flash().insert(invite_key(&session), link);
            Ok(see_other(&format!("/clubs/{name}")))
        }
        Err(e) => club_refusal(&state, &session, &name, e),
    }
}

/// `POST /clubs/{name}/leave`. The last member leaving deletes the club.
pub(super) async fn leave(
    State(state): State<ConsoleState>,
    Path(name): Path<String>,
    Posted(session, NoFields {}): Posted<NoFields>,
) -> ConsoleResult {
    let club = member_club(&state, &session, &name)?;
    match state.store().leave_club(club.id, session.user.id) {
        Ok(leaving) => {
            let mut page = clubs_page(&state, &session)?;
            page.notice = Some(match leaving {
                Leaving::Leave => format!("You left the club {name}."),
                Leaving::DeleteClub => {
                    format!("You left the club {name}; you were its last member, so it is deleted.")
                }
            });
            Ok(render(StatusCode::OK, &page))
        }
        Err(e) => club_refusal(&state, &session, &name, e),
    }
}

/// `POST /clubs/{name}/members/{user}/remove` (owners).
pub(super) async fn remove(
    State(state): State<ConsoleState>,
    Path((name, user)): Path<(String, String)>,
    Posted(session, NoFields {}): Posted<NoFields>,
) -> ConsoleResult {
    let user = path_id(&user)?;
    let club = member_club(&state, &session, &name)?;
    match state
        .store()
        .remove_member(club.id, Some(session.user.id), user)
    {
        Ok(()) => Ok(see_other(&format!("/clubs/{name}"))),
        Err(e) => club_refusal(&state, &session, &name, e),
    }
}

/// `POST /clubs/{name}/members/{user}/promote` (owners): makes a member an owner.
pub(super) async fn promote(
    State(state): State<ConsoleState>,
    Path((name, user)): Path<(String, String)>,
    Posted(session, NoFields {}): Posted<NoFields>,
) -> ConsoleResult {
    let user = path_id(&user)?;
    let club = member_club(&state, &session, &name)?;
    match state.store().promote_member(club.id, session.user.id, user) {
        Ok(()) => Ok(see_other(&format!("/clubs/{name}"))),
        Err(e) => club_refusal(&state, &session, &name, e),
    }
}
