//! A user's messages: what senders sent to their devices, with each device's state,
//! and blocking or unblocking a sender for a device.
//!
//! A block from here is a request the server relays; the agent decides. It applies a
//! block (that only narrows what it shows), and undoes only a block that was itself
//! made from the console: a block made at the machine (`herald-agent block`, or the
//! notification's "Block this sender") is undone only there. Either way the agent
//! answers with a signed report of the sender's state, which this page then shows.

use askama::Template;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;

use super::auth::{Posted, Session};
use super::{render, see_other, ConsoleError, ConsoleResult, ConsoleState, Layout};
use crate::model::{UserBlock, UserMessage};

/// Rows the messages page shows (newest first).
const MESSAGES_LIMIT: u32 = 200;

#[derive(Template)]
#[template(path = "messages.html")]
struct MessagesPage {
    layout: Layout,
    messages: Vec<UserMessage>,
    blocks: Vec<UserBlock>,
    error: Option<String>,
}

fn messages_page(
    state: &ConsoleState,
    session: &Session,
    status: StatusCode,
    error: Option<String>,
) -> ConsoleResult {
    let user = session.user.id;
    Ok(render(
        status,
        &MessagesPage {
            layout: Layout::of(session),
            messages: state.store().user_messages(user, MESSAGES_LIMIT)?,
            blocks: state.store().user_blocks(user)?,
            error,
        },
    ))
}

/// `GET /messages`.
pub(super) async fn show(State(state): State<ConsoleState>, session: Session) -> ConsoleResult {
    messages_page(&state, &session, StatusCode::OK, None)
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct BlockForm {
    /// The device's agent id.
    agent: String,
    /// Sender name.
    sender: String,
    /// `block` or `unblock`.
    action: String,
}

/// `POST /messages/block`: asks one of the user's devices to block or unblock a
/// sender.
pub(super) async fn block(
    State(state): State<ConsoleState>,
    Posted(session, form): Posted<BlockForm>,
) -> ConsoleResult {
    let blocked = match form.action.as_str() {
        "block" => true,
        "unblock" => false,
        _ => {
            return messages_page(
                &state,
                &session,
                StatusCode::BAD_REQUEST,
                Some("choose block or unblock".into()),
            )
        }
    };
    if !herald_shared::valid_name(&form.sender) {
        return messages_page(
            &state,
            &session,
            StatusCode::BAD_REQUEST,
            Some(format!("{:?} is not a sender name", form.sender)),
        );
    }
    // Only the user's own devices; another's answers like one that does not exist.
    let owned = state
        .store()
        .user_agents(session.user.id, &|_| false)?
        .into_iter()
        .any(|a| a.id == form.agent && a.revoked_at.is_none());
    if !owned {
        return Err(ConsoleError::NotFound);
    }
    state.store().request_block(
        &form.agent,
        &form.sender,
        blocked,
        session.user.id,
        state.now(),
    )?;
    state.api.relay.poke(&form.agent);
    Ok(see_other("/messages"))
}
