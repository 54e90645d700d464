//! Campaigns in the API: upload a recipient list, send a signed message to it with a
//! fallback, read the figures and every row, cancel, and take the SMS gateway's
//! delivery reports.
//!
//! A list is uploaded first (`POST /api/v1/lists`, the CSV as the body, streamed to a
//! file), then named by the campaign (`POST /api/v1/campaigns`), which reads it in one
//! transaction. The message is signed for `all`: the list narrows who gets it, and the
//! agent's own checks (the sender's grant, its block list) decide the rest.

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use herald_shared::envelope::Audience;

use crate::api::messages::{may_see, verified_message};
use crate::api::releases::{internal, receive};
use crate::api::{bad, ApiError, ApiResult, ApiState, Caller};
use crate::model::{
    parse_country, CampaignCreated, CampaignRecipient, CampaignStatus, CreateCampaign, Fallback,
    ListUploaded, SmsReport, SmsReportOutcome, DEFAULT_FALLBACK_AFTER_MS, MAX_LIST_BYTES,
    RECIPIENT_STATES,
};
use crate::now_ms;
use crate::store::CampaignPlan;

/// Folder (in the data directory) of uploaded lists.
pub const LIST_DIR: &str = "lists";
/// Uploaded lists no campaign took are deleted after a day.
const LIST_RETENTION: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
/// Uploaded lists (each up to [`MAX_LIST_BYTES`]) that may wait for a campaign at
/// once, so that uploads cannot fill the disk.
const MAX_LISTS_WAITING: usize = 16;
/// Most delivery reports in one callback.
const MAX_REPORTS: usize = 10_000;
/// Fastest `rate`, rows per second.
const MAX_RATE: u32 = 100_000;

/// `POST /api/v1/lists`: the CSV list as the body, stored until a campaign takes it.
pub(crate) async fn upload_list(
    State(state): State<ApiState>,
    body: Body,
) -> ApiResult<ListUploaded> {
    let (id, temp) = new_list(&state).await?;
    let too_long = format!("the list is longer than {MAX_LIST_BYTES} bytes");
    let (bytes, _) = match receive(body, &temp, MAX_LIST_BYTES, &too_long).await {
        Ok(got) => got,
        Err(e) => {
            let _ = tokio::fs::remove_file(&temp).await;
            return Err(e);
        }
    };
    keep_list(&state, &id, &temp).await?;
    Ok(Json(ListUploaded { id, bytes }))
}

/// A new list's id and the file it is received into (old lists are deleted first).
pub(crate) async fn new_list(state: &ApiState) -> Result<(String, std::path::PathBuf), ApiError> {
    tokio::fs::create_dir_all(&state.lists)
        .await
        .map_err(internal)?;
    let waiting = prune_lists(&state.lists).await;
    if waiting >= MAX_LISTS_WAITING {
        return Err(ApiError(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "{waiting} uploaded lists are waiting for a campaign; create campaigns from them, or wait a day for them to be deleted"
            ),
        ));
    }
    let id = hex::encode(crate::random_bytes::<16>());
    let temp = state.lists.join(format!("{id}.upload"));
    Ok((id, temp))
}

/// Makes a received list available to campaigns under its id.
pub(crate) async fn keep_list(
    state: &ApiState,
    id: &str,
    temp: &std::path::Path,
) -> Result<(), ApiError> {
    tokio::fs::rename(temp, list_path(state, id)?)
        .await
        .map_err(internal)
}

fn list_path(state: &ApiState, id: &str) -> Result<std::path::PathBuf, ApiError> {
    if id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(state.lists.join(format!("{id}.csv")))
    } else {
        Err(bad(format!("{id:?} is not a list id (32 hex digits)")))
    }
}

/// Deletes lists (and interrupted uploads) older than [`LIST_RETENTION`]; returns
/// how many are left.
async fn prune_lists(dir: &std::path::Path) -> usize {
    let mut left = 0;
    let Ok(mut entries) = tokio::fs::read_dir(dir).await else {
        return left;
    };
    while let Ok(Some(entry)) = entries.next_entry().await {
        let old = entry
            .metadata()
            .await
            .ok()
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > LIST_RETENTION);
        if old {
            let _ = tokio::fs::remove_file(entry.path()).await;
        } else {
            left += 1;
        }
    }
    left
}

/// `POST /api/v1/campaigns`: checks the message and the options, then reads the list
/// into the campaign in one transaction and hands the deliveries due now to the
/// connected agents.
pub(crate) async fn create_campaign(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Json(body): Json<CreateCampaign>,
) -> ApiResult<CampaignCreated> {
    Ok(Json(start_campaign(&state, &caller, body)?))
}

/// Creates a campaign from an uploaded list (the API's and the sender console's way).
pub(crate) fn start_campaign(
    state: &ApiState,
    caller: &Caller,
    body: CreateCampaign,
) -> Result<CampaignCreated, ApiError> {
    let (envelope, message) = verified_message(state, caller, &body.envelope)?;
    if message.audience != Audience::All {
        return Err(bad(format!(
            "a list campaign's message is signed for all (the list narrows it), not {}",
            message.audience
        )));
    }
    let now = now_ms();
    let start_at = body.deliver_at.unwrap_or(now).max(now);
    if start_at >= message.expires_at {
        return Err(bad("--at is after the message expires"));
    }
    let ttl = message.expires_at - start_at;
    let fallback_after_ms = body
        .fallback_after_ms
        .unwrap_or(DEFAULT_FALLBACK_AFTER_MS.min(ttl / 2));
    if body.fallback != Fallback::None && (fallback_after_ms <= 0 || fallback_after_ms >= ttl) {
        return Err(bad(format!(
            "--fallback-after must be more than 0 and less than the message's time to live ({} s from the start)",
            ttl / 1000
        )));
    }
    if body.fallback != Fallback::None && !state.fallback_media.contains(&body.fallback) {
        return Err(bad(match body.fallback {
            Fallback::Sms => {
                "--fallback sms needs an SMS gateway: [sms] in herald.toml (docs/OPERATIONS.md)"
            }
            _ => {
                "--fallback email needs an e-mail relay: [smtp] in herald.toml (docs/OPERATIONS.md)"
            }
        }));
    }
    if let Some(rate) = body.rate {
        if rate == 0 || rate > MAX_RATE {
            return Err(bad(format!("--rate must be 1 to {MAX_RATE} per second")));
        }
    }
    let country = body
        .country
        .as_deref()
        .map(parse_country)
        .transpose()
        .map_err(bad)?;
    let path = list_path(state, &body.list)?;
    let file = std::fs::File::open(&path).map_err(|_| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!(
                "no list {}: upload it with POST /api/v1/lists (lists are kept a day)",
                body.list
            ),
        )
    })?;
    let plan = CampaignPlan {
        start_at,
        fallback: body.fallback,
        fallback_after_ms,
        max_fallback: body.max_fallback,
        rate: body.rate,
        invite_url: body.invite.then(|| format!("{}/join", state.public_url)),
        country,
        strict: body.strict,
    };
    let started = state.store.create_campaign(
        &message,
        &envelope,
        std::io::BufReader::with_capacity(256 * 1024, file),
        &plan,
        now,
    );
    // Taken or refused, the list (phone numbers, addresses) is not kept: a retry
    // uploads it again.
    let _ = std::fs::remove_file(&path);
    let started = started?;
    tracing::info!(
        campaign = %started.created.id,
        sender = %message.sender,
        rows = started.created.addressed,
        devices = started.created.devices,
        bad = started.created.bad,
        "campaign created"
    );
    if !started.due_now.is_empty() {
        state.relay.push(&envelope, None, started.due_now);
    }
    state.scheduler.notify_one();
    state.fallbacks.notify_one();
    Ok(started.created)
}

/// The campaign's sender, checked against the caller.
fn campaign_of(state: &ApiState, caller: &Caller, id: &str) -> Result<(), ApiError> {
    let sender = state.store.campaign_sender(id)?;
    may_see(caller, &sender)
}

/// `GET /api/v1/messages/{id}/status`.
pub(crate) async fn campaign_status(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<CampaignStatus> {
    campaign_of(&state, &caller, &id)?;
    Ok(Json(state.store.campaign_status(&id, now_ms())?))
}

#[derive(Deserialize)]
pub(crate) struct RecipientsQuery {
    state: Option<String>,
    format: Option<String>,
}

/// `GET /api/v1/messages/{id}/recipients[?state=S][&format=csv]`.
pub(crate) async fn campaign_recipients(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<RecipientsQuery>,
) -> Result<Response, ApiError> {
    if let Some(s) = &q.state {
        if !RECIPIENT_STATES.contains(&s.as_str()) {
            return Err(bad(format!(
                "unknown state {s:?}: use one of {}",
                RECIPIENT_STATES.join(", ")
            )));
        }
    }
    campaign_of(&state, &caller, &id)?;
    let rows = state
        .store
        .campaign_recipients(&id, q.state.as_deref(), now_ms())?;
    match q.format.as_deref() {
        None | Some("json") => Ok(Json(rows).into_response()),
        Some("csv") => Ok((
            [(header::CONTENT_TYPE, "text/csv; charset=utf-8")],
            recipients_csv(&rows).map_err(|e| bad(e.to_string()))?,
        )
            .into_response()),
        Some(other) => Err(bad(format!("unknown format {other:?}: use json or csv"))),
    }
}

/// The rows as CSV, with a header.
pub fn recipients_csv(rows: &[CampaignRecipient]) -> Result<Vec<u8>, csv::Error> {
    let mut out = csv::Writer::from_writer(Vec::new());
    out.write_record([
        "line",
        "phone",
        "email",
        "user",
        "agent",
        "devices",
        "state",
        "fallback_state",
        "fallback_detail",
        "stored_at",
    ])?;
    for r in rows {
        out.write_record([
            r.line.to_string(),
            r.phone.clone().unwrap_or_default(),
            r.email.clone().unwrap_or_default(),
            r.user.clone().unwrap_or_default(),
            r.agent.clone().unwrap_or_default(),
            r.devices.to_string(),
            r.state.clone(),
            r.fallback_state.clone().unwrap_or_default(),
            r.fallback_detail.clone().unwrap_or_default(),
            r.stored_at.map(|t| t.to_string()).unwrap_or_default(),
        ])?;
    }
    out.into_inner().map_err(|e| e.into_error().into())
}

/// `POST /api/v1/messages/{id}/cancel`: what has not gone out does not.
pub(crate) async fn cancel_message(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<serde_json::Value> {
    let sender = state.store.message_sender(&id)?;
    may_see(&caller, &sender)?;
    let (deliveries, fallbacks) = state.store.cancel_message(&id, now_ms())?;
    tracing::info!(message = %id, deliveries, fallbacks, "message canceled");
    Ok(Json(serde_json::json!({
        "id": id,
        "deliveries_canceled": deliveries,
        "fallbacks_canceled": fallbacks,
    })))
}

/// One report or several.
#[derive(Deserialize)]
#[serde(untagged)]
pub(crate) enum Reports {
    One(SmsReport),
    Many(Vec<SmsReport>),
}

/// `POST /api/v1/sms/reports`: the gateway's delivery reports, authenticated by
/// `[sms] report_secret` (`Authorization: Bearer SECRET`), not by an admin token.
/// Idempotent by the gateway's message id.
pub(crate) async fn sms_reports(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let Some(secret) = &state.sms_report_secret else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            "delivery reports are not set up on this server ([sms] report_secret)".into(),
        ));
    };
    let given = super::bearer(&headers).unwrap_or("");
    if !bool::from(given.as_bytes().ct_eq(secret.as_bytes())) {
        return Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "wrong or missing gateway secret (Authorization: Bearer SECRET)".into(),
        ));
    }
    let reports: Reports = serde_json::from_slice(&body).map_err(|e| {
        bad(format!(
            "a delivery report is {{\"id\": ..., \"status\": \"delivered\"|\"failed\"}} or a list of them: {e}"
        ))
    })?;
    let (reports, one) = match reports {
        Reports::One(report) => (vec![report], true),
        Reports::Many(reports) => (reports, false),
    };
    if reports.len() > MAX_REPORTS {
        return Err(bad(format!("at most {MAX_REPORTS} reports per request")));
    }
    if let Some(r) = reports.iter().find(|r| r.id.is_empty() || r.id.len() > 200) {
        return Err(bad(format!("report id {:?} must be 1 to 200 bytes", r.id)));
    }
    let outcomes = state.store.sms_reports(&reports, now_ms())?;
    if one {
        let outcome: &SmsReportOutcome = &outcomes[0];
        let status = if outcome.outcome == "kept" {
            StatusCode::ACCEPTED
        } else {
            StatusCode::OK
        };
        return Ok((status, Json(outcome.clone())).into_response());
    }
    Ok(Json(outcomes).into_response())
}
