//! The directory page, `/peers`: for the signed-in user, the online devices and the
//! shares they may reach (their clubs' and public ones), with each device's addresses
//! and online-since, a keyword search (`?q=`, any language), and favourites first.
//!
//! The list is one template (`peers_list.html`) rendered for the page and for
//! `/peers.json`, which the page's script (`/static/peers.js`) polls every few seconds
//! to replace the list as devices come and go; without script the page is complete and
//! a reload updates it.

use askama::Template;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use herald_shared::peers::PeerDevice;

use super::auth::{Posted, Session};
use super::{render, see_other, ConsoleError, ConsoleResult, ConsoleState, Layout};
use crate::model::directory_view;

/// The page's script.
const SCRIPT: &str = include_str!("../../templates/peers.js");
/// Path of the page's script.
pub(super) const SCRIPT_PATH: &str = "/static/peers.js";
/// Longest keyword, in characters.
const MAX_QUERY: usize = 200;

/// `?q=` of the page and its JSON.
#[derive(Debug, Deserialize, Default)]
#[serde(default)]
pub(super) struct Search {
    q: String,
}

impl Search {
    fn keyword(&self) -> String {
        self.q.trim().chars().take(MAX_QUERY).collect()
    }
}

#[derive(Template)]
#[template(path = "peers_list.html")]
struct PeersList {
    devices: Vec<PeerDevice>,
    favourites: std::collections::HashSet<(String, String)>,
    csrf: String,
    q: String,
}

impl PeersList {
    fn starred(&self, agent: &str, share: &str) -> bool {
        self.favourites
            .contains(&(agent.to_string(), share.to_string()))
    }
}

#[derive(Template)]
#[template(path = "peers.html")]
struct PeersPage {
    layout: Layout,
    q: String,
    list: String,
}

/// What `/peers.json` answers.
#[derive(Serialize)]
struct PeersJson {
    devices: Vec<PeerDevice>,
    /// `[agent, share]` pairs the user starred.
    favourites: Vec<(String, String)>,
    /// The list as the page shows it.
    html: String,
}

fn list(state: &ConsoleState, session: &Session, q: &str) -> ConsoleResult<PeersList> {
    let user = session.user.id;
    let favourites = state.store().favourites(user)?;
    let entries = state.store().directory(Some(user), None)?;
    let relay = &state.api.relay;
    let devices = directory_view(entries, |agent| relay.online_since(agent), q, &favourites);
    Ok(PeersList {
        devices,
        favourites,
        csrf: session.csrf.clone(),
        q: q.to_string(),
    })
}

fn html(list: &PeersList) -> ConsoleResult<String> {
    list.render()
        .map_err(|e| ConsoleError::Internal(format!("directory template: {e}")))
}

/// `GET /peers?q=`.
pub(super) async fn page(
    State(state): State<ConsoleState>,
    session: Session,
    Query(search): Query<Search>,
) -> ConsoleResult {
    let q = search.keyword();
    let list = html(&list(&state, &session, &q)?)?;
    let page = PeersPage {
        layout: Layout::of(&session),
        q,
        list,
    };
    Ok(render(StatusCode::OK, &page))
}

/// `GET /peers.json?q=`: the same list, for the page's script and for programs.
/// Signed out: `401` with a JSON error (not a redirect to the login page).
pub(super) async fn json(
    State(state): State<ConsoleState>,
    session: Result<Session, ConsoleError>,
    Query(search): Query<Search>,
) -> ConsoleResult<Response> {
    let session = match session {
        Ok(session) => session,
        Err(ConsoleError::SignIn) => {
            return Ok((
                StatusCode::UNAUTHORIZED,
                Json(serde_json::json!({"error": "sign in first"})),
            )
                .into_response())
        }
        Err(e) => return Err(e),
    };
    let list = list(&state, &session, &search.keyword())?;
    let body = PeersJson {
        html: html(&list)?,
        favourites: list.favourites.iter().cloned().collect(),
        devices: list.devices,
    };
    Ok(Json(body).into_response())
}

/// The star form.
#[derive(Debug, Deserialize, Default)]
#[serde(default)]
pub(super) struct StarForm {
    agent: String,
    share: String,
    /// `1` to star, anything else to unstar.
    on: String,
    /// The search to go back to.
    q: String,
}

/// `POST /peers/favourite`: stars or unstars a share the user may reach.
pub(super) async fn favourite(
    State(state): State<ConsoleState>,
    Posted(session, form): Posted<StarForm>,
) -> ConsoleResult {
    let visible = state
        .store()
        .directory(Some(session.user.id), None)?
        .iter()
        .any(|e| e.agent_id == form.agent && e.service.name == form.share);
    if !visible {
        return Err(ConsoleError::BadRequest(
            "that share is not in your directory (its device may have stopped sharing it)".into(),
        ));
    }
    state.store().set_favourite(
        session.user.id,
        &form.agent,
        &form.share,
        form.on == "1",
        state.now(),
    )?;
    let back = match form.q.trim() {
        "" => "/peers".to_string(),
        q => format!(
            "/peers?{}",
            serde_urlencoded::to_string([("q", q)]).unwrap_or_default()
        ),
    };
    Ok(see_other(&back))
}

/// `GET /static/peers.js`.
pub(super) async fn script() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        SCRIPT,
    )
        .into_response()
}
