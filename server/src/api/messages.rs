//! The push-message part of the API: senders (admin only), messages, their receipts,
//! and the block reports agents sent.
//!
//! A sender's own system submits with its sender token and can act only as itself: it
//! may send messages signed by its own key, and read its own messages, receipts and
//! refusals. The server checks a message's whole signature chain before storing it, to
//! refuse junk early; every agent checks it again and decides for itself.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use base64::Engine;
use serde::Deserialize;

use herald_shared::codec;
use herald_shared::envelope::{Audience, Envelope, Statement};
use herald_shared::message::{self, Message, SignedReport};

use crate::api::{bad, check_hash, decode_envelope, decode_raw_envelope, no_agent};
use crate::api::{ApiError, ApiResult, ApiState, Caller, MAX_LIST};
use crate::model::{
    CreateSender, Created, GrantInfo, MessageCreated, MessageDetail, MessageInfo, ReceiptInfo,
    RefusalInfo, SendMessage, SenderInfo, SenderLink,
};
use crate::now_ms;

fn admin_only(caller: &Caller) -> Result<(), ApiError> {
    match caller {
        Caller::Admin(_) => Ok(()),
        _ => Err(ApiError(
            StatusCode::FORBIDDEN,
            "only the admin token manages senders".into(),
        )),
    }
}

/// A sender token may only see its own messages.
pub(crate) fn may_see(caller: &Caller, sender: &str) -> Result<(), ApiError> {
    match caller {
        Caller::Sender(me) if me != sender => Err(ApiError(
            StatusCode::FORBIDDEN,
            format!("that message is sender {sender}'s, not yours ({me})"),
        )),
        _ => Ok(()),
    }
}

/// `POST /api/v1/senders`.
pub(crate) async fn create_sender(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Json(body): Json<CreateSender>,
) -> ApiResult<Created> {
    admin_only(&caller)?;
    let (envelope, Statement::Sender(grant)) = decode_envelope(&state, &body.envelope)? else {
        return Err(bad("envelope is not a sender grant"));
    };
    grant.validate().map_err(bad)?;
    if state.operator_keys.contains(&grant.key) {
        return Err(bad("that is an operator key; senders need their own key"));
    }
    check_hash("token_hash", &body.token_hash)?;
    state.store.add_sender(
        &grant.sender,
        &grant.display_name,
        &grant.key.to_hex(),
        grant.advertising,
        &envelope,
        &body.token_hash,
        now_ms(),
    )?;
    Ok(Json(Created { ids: vec![] }))
}

/// `GET /api/v1/senders`.
pub(crate) async fn list_senders(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Vec<SenderInfo>> {
    let mut senders = state.store.senders()?;
    if let Caller::Sender(me) = &caller {
        senders.retain(|s| &s.name == me);
    }
    Ok(Json(senders))
}

/// `DELETE /api/v1/senders/{name}`.
pub(crate) async fn remove_sender(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<Created> {
    admin_only(&caller)?;
    state.store.remove_sender(&name)?;
    Ok(Json(Created { ids: vec![] }))
}

/// `POST /api/v1/senders/{name}/users`: lets a console user act for the sender.
pub(crate) async fn link_sender(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    Json(body): Json<SenderLink>,
) -> ApiResult<Created> {
    admin_only(&caller)?;
    state
        .store
        .link_sender(&body.login, body.linked.then_some(name.as_str()))?;
    Ok(Json(Created { ids: vec![] }))
}

/// `GET /api/v1/grants/{public_key}`.
pub(crate) async fn show_grant(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(key): Path<String>,
) -> ApiResult<GrantInfo> {
    let Some((sender, grant)) = state.store.sender_grant(&key)? else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!(
                "no sender holds key {key}; ask the operator to run `herald-server sender add`"
            ),
        ));
    };
    may_see(&caller, &sender)?;
    let bytes = codec::to_bytes(&grant).map_err(|e| bad(e.to_string()))?;
    Ok(Json(GrantInfo {
        sender,
        envelope: base64::engine::general_purpose::STANDARD.encode(bytes),
    }))
}

/// A message (base64 envelope) whose whole chain verifies, from a registered sender
/// with that key, that the caller may send as, not yet expired.
pub(crate) fn verified_message(
    state: &ApiState,
    caller: &Caller,
    envelope: &str,
) -> Result<(Envelope, Message), ApiError> {
    let envelope = decode_raw_envelope(envelope)?;
    let opened = message::open(&envelope, &state.operator_keys)
        .map_err(|e| bad(format!("message refused: {e}")))?;
    let message = opened.message;
    match state.store.sender_grant(&envelope.signer.to_hex())? {
        Some((name, _)) if name == message.sender => {}
        _ => {
            return Err(bad(format!(
                "sender {} is not registered with this key (removed, or never added): `herald-server sender list`",
                message.sender
            )))
        }
    }
    may_see(caller, &message.sender)?;
    if message.expires_at <= now_ms() {
        return Err(bad("the message has already expired"));
    }
    Ok((envelope, message))
}

/// `POST /api/v1/messages`: verifies the message's chain, stores it with one delivery
/// per addressed agent (skipping agents that reported blocking the sender), and hands
/// it to the connected ones.
pub(crate) async fn send_message(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Json(body): Json<SendMessage>,
) -> ApiResult<MessageCreated> {
    let (envelope, message) = verified_message(&state, &caller, &body.envelope)?;
    let now = now_ms();
    let deliver_at = body.deliver_at.unwrap_or(now).max(now);
    if deliver_at >= message.expires_at {
        return Err(bad("--at is after the message expires"));
    }
    let agents = state.store.expand(&message.audience)?;
    if agents.is_empty() {
        return Err(no_agent(&state, &message.audience)?);
    }
    let addressed = agents.len() as u64;
    let (queued, skipped) = state
        .store
        .create_message(&message, &envelope, &agents, deliver_at, now)?;
    if deliver_at <= now {
        match message.audience {
            // Audience checks on the agent use the membership: group messages follow it
            // through the store read, as group jobs do.
            Audience::Group(_) | Audience::Agent(_) => {
                for (agent, _) in &queued {
                    state.relay.poke(agent);
                }
            }
            Audience::All => state.relay.push(&envelope, None, queued),
        }
    }
    state.scheduler.notify_one();
    Ok(Json(MessageCreated {
        id: message.id_hex(),
        addressed,
        skipped_blocked: skipped,
    }))
}

#[derive(Deserialize)]
pub(crate) struct MessagesQuery {
    sender: Option<String>,
    limit: Option<u32>,
}

/// `GET /api/v1/messages`.
pub(crate) async fn list_messages(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<MessagesQuery>,
) -> ApiResult<Vec<MessageInfo>> {
    let sender = match (&caller, q.sender) {
        (Caller::Sender(me), Some(other)) if &other != me => {
            may_see(&caller, &other)?;
            None
        }
        (Caller::Sender(me), _) => Some(me.clone()),
        (_, sender) => sender,
    };
    let limit = q.limit.unwrap_or(100);
    if limit > MAX_LIST {
        return Err(bad(format!("limit must be at most {MAX_LIST}")));
    }
    Ok(Json(state.store.messages(sender.as_deref(), limit)?))
}

/// `GET /api/v1/messages/{id}`.
pub(crate) async fn show_message(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<MessageDetail> {
    let detail = state.store.message(&id)?;
    may_see(&caller, &detail.info.sender)?;
    Ok(Json(detail))
}

#[derive(Deserialize)]
pub(crate) struct ReceiptsQuery {
    #[serde(default)]
    verify: bool,
}

/// `GET /api/v1/messages/{id}/receipts[?verify=true]`: every stored receipt, as signed;
/// with `verify`, each checked against its agent's enrolled key.
pub(crate) async fn list_receipts(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<ReceiptsQuery>,
) -> ApiResult<Vec<ReceiptInfo>> {
    let detail = state.store.message(&id)?;
    may_see(&caller, &detail.info.sender)?;
    let receipts = state.store.receipts(&id)?;
    Ok(Json(
        receipts
            .into_iter()
            .map(|stored| {
                let mut info = stored.info;
                if q.verify {
                    info.verified = Some(verify_receipt(&stored.report, &stored.agent_key, &id));
                }
                info
            })
            .collect(),
    ))
}

/// Whether a stored report is a receipt for message `id`, signed by the key given.
fn verify_receipt(blob: &[u8], key: &[u8], id: &str) -> bool {
    let Ok(signed) = codec::from_bytes::<SignedReport>(blob, message::MAX_REPORT * 2) else {
        return false;
    };
    matches!(
        signed.verify(key),
        Ok(message::Report::Receipt(r)) if hex::encode(r.message_id) == id
    )
}

#[derive(Deserialize)]
pub(crate) struct RefusalsQuery {
    sender: Option<String>,
}

/// `GET /api/v1/refusals[?sender=S]`: who blocked whom, as the agents reported.
pub(crate) async fn list_refusals(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<RefusalsQuery>,
) -> ApiResult<Vec<RefusalInfo>> {
    let sender = match &caller {
        Caller::Sender(me) => {
            if let Some(other) = &q.sender {
                may_see(&caller, other)?;
            }
            Some(me.clone())
        }
        _ => q.sender,
    };
    Ok(Json(state.store.refusals(sender.as_deref())?))
}
