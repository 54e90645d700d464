//! `/api/v1/clubs`, `/api/v1/directory` and `/api/v1/sessions`: admins read every club
//! and its members, remove a member, see the directory as any user sees it, and read
//! the tunnel sessions the relay recorded. Users manage their own clubs in the console
//! (`console::clubs`).

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;

use herald_shared::peers::PeerDevice;

use crate::api::{ApiError, ApiResult, ApiState};
use crate::model::{directory_view, Club, ClubDetail, Created, TunnelSession};

fn club_named(state: &ApiState, name: &str) -> Result<Club, ApiError> {
    state
        .store
        .club(name, None)?
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no club named {name}")))
}

/// `GET /api/v1/clubs`.
pub(crate) async fn list_clubs(State(state): State<ApiState>) -> ApiResult<Vec<Club>> {
    Ok(Json(state.store.clubs()?))
}

/// `GET /api/v1/clubs/{name}`: the club and its members.
pub(crate) async fn show_club(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<ClubDetail> {
    let club = club_named(&state, &name)?;
    let members = state.store.club_members(club.id)?;
    Ok(Json(ClubDetail { club, members }))
}

/// `DELETE /api/v1/clubs/{name}/members/{login}`: an admin removes anyone, but not a
/// club's last owner while others remain.
pub(crate) async fn remove_member(
    State(state): State<ApiState>,
    Path((name, login)): Path<(String, String)>,
) -> ApiResult<Created> {
    let club = club_named(&state, &name)?;
    let user = state
        .store
        .user_by_login(&login)?
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no user {login}")))?;
    state.store.remove_member(club.id, None, user.id)?;
    Ok(Json(Created { ids: vec![user.id] }))
}

/// Query of `GET /api/v1/directory`.
#[derive(Debug, Deserialize)]
pub(crate) struct DirectoryQuery {
    /// Whose view (a login); none for what someone signed out sees (public shares).
    user: Option<String>,
    /// Keyword.
    #[serde(default)]
    q: String,
}

/// `GET /api/v1/directory?user=LOGIN&q=WORD`: the online devices and shares `user` may
/// reach, as their console's directory page lists them.
pub(crate) async fn directory(
    State(state): State<ApiState>,
    Query(query): Query<DirectoryQuery>,
) -> ApiResult<Vec<PeerDevice>> {
    let viewer = match &query.user {
        Some(login) => Some(
            state
                .store
                .user_by_login(login)?
                .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no user {login}")))?
                .id,
        ),
        None => None,
    };
    let favourites = match viewer {
        Some(user) => state.store.favourites(user)?,
        None => Default::default(),
    };
    let entries = state.store.directory(viewer, None)?;
    Ok(Json(directory_view(
        entries,
        |agent| state.relay.online_since(agent),
        &query.q,
        &favourites,
    )))
}

/// Most sessions `GET /api/v1/sessions` answers with.
const MAX_SESSIONS: u32 = 10_000;

/// Query of `GET /api/v1/sessions`.
#[derive(Debug, Deserialize)]
pub(crate) struct SessionsQuery {
    /// Only sessions to this providing agent.
    agent: Option<String>,
    /// Newest first, at most this many (default 100).
    limit: Option<u32>,
}

/// `GET /api/v1/sessions?agent=ID&limit=N`: tunnel sessions as the relay recorded them,
/// newest first.
pub(crate) async fn sessions(
    State(state): State<ApiState>,
    Query(query): Query<SessionsQuery>,
) -> ApiResult<Vec<TunnelSession>> {
    let limit = query.limit.unwrap_or(100);
    if !(1..=MAX_SESSIONS).contains(&limit) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("limit must be 1 to {MAX_SESSIONS}, got {limit}"),
        ));
    }
    Ok(Json(state.store.sessions(query.agent.as_deref(), limit)?))
}
