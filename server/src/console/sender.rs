//! The sender's console: for a console user the operator linked to a message sender
//! (`herald-server sender link NAME --user LOGIN`). Compose a message, upload a
//! recipient list, watch a campaign's figures live, cancel it.
//!
//! The sender key never reaches the server: the page asks the server for the message's
//! exact bytes (`POST /sender/draft`), signs them in the browser with the key file the
//! sender picks (WebCrypto Ed25519, `/static/sign.js`), and posts the signature with the
//! list. The server checks the signature against the sender's registered key, as it
//! does for the CLI. (The CLI signs without trusting the server's page at all.)
//!
//! Also here: `/join`, the page an invitation in a fallback SMS or e-mail links to.

use askama::Template;
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use serde::Deserialize;

use herald_shared::codec;
use herald_shared::envelope::{Audience, Envelope, PublicKey, Statement, SIGNING_CONTEXT};
use herald_shared::message::{self, Message, Priority};

use super::auth::{csrf_matches, Posted, Session};
use super::{render, see_other, ConsoleError, ConsoleResult, ConsoleState, Layout};
use crate::api::campaigns::{keep_list, new_list, start_campaign};
use crate::api::Caller;
use crate::model::{
    CampaignRecipient, CampaignStatus, CreateCampaign, Fallback, MessageInfo, MAX_LIST_BYTES,
    RECIPIENT_STATES,
};

/// Campaigns the sender's home page lists.
const CAMPAIGNS_LISTED: u32 = 50;
/// Rows a campaign page shows.
const ROWS_SHOWN: usize = 200;
/// The browser-side signing script.
pub(super) const SIGN_SCRIPT_PATH: &str = "/static/sign.js";
const SIGN_SCRIPT: &str = include_str!("../../templates/sign.js");

/// The sender a signed-in user acts for, or 403.
fn sender_of(session: &Session) -> Result<String, ConsoleError> {
    session.user.sender.clone().ok_or_else(|| {
        ConsoleError::Forbidden(
            "this account does not act for a message sender; the operator links one with `herald-server sender link NAME --user LOGIN`".into(),
        )
    })
}

/// Checks that campaign `id` is the signed-in sender's (404 otherwise: no hint that
/// another sender's exists).
fn own_campaign(state: &ConsoleState, session: &Session, id: &str) -> Result<(), ConsoleError> {
    let sender = sender_of(session)?;
    match state.store().campaign_sender(id) {
        Ok(owner) if owner == sender => Ok(()),
        Ok(_) | Err(crate::store::StoreError::NotFound(_)) => Err(ConsoleError::NotFound),
        Err(e) => Err(e.into()),
    }
}

#[derive(Template)]
#[template(path = "sender.html")]
struct HomePage {
    layout: Layout,
    sender: String,
    messages: Vec<MessageInfo>,
}

/// `GET /sender`.
pub(super) async fn home(State(state): State<ConsoleState>, session: Session) -> ConsoleResult {
    let sender = sender_of(&session)?;
    let messages = state.store().messages(Some(&sender), CAMPAIGNS_LISTED)?;
    Ok(render(
        StatusCode::OK,
        &HomePage {
            layout: Layout::of(&session),
            sender,
            messages,
        },
    ))
}

#[derive(Template)]
#[template(path = "sender_new.html")]
struct ComposePage {
    layout: Layout,
    sender: String,
    error: Option<String>,
}

fn compose(session: &Session, status: StatusCode, error: Option<String>) -> ConsoleResult {
    Ok(render(
        status,
        &ComposePage {
            layout: Layout::of(session),
            sender: sender_of(session)?,
            error,
        },
    ))
}

/// `GET /sender/new`.
pub(super) async fn new(session: Session) -> ConsoleResult {
    compose(&session, StatusCode::OK, None)
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct DraftForm {
    title: String,
    body: String,
    link: String,
    priority: String,
    ttl: String,
    advertising: Option<String>,
}

/// `POST /sender/draft`: the message the sender is about to sign, as the bytes to
/// sign. Answers JSON (`{draft, to_sign}` or `{error}`) for the page's script.
pub(super) async fn draft(
    State(state): State<ConsoleState>,
    Posted(session, form): Posted<DraftForm>,
) -> Response {
    match make_draft(&state, &session, form) {
        Ok((draft, to_sign)) => Json(serde_json::json!({
            "draft": base64::engine::general_purpose::STANDARD.encode(draft),
            "to_sign": base64::engine::general_purpose::STANDARD.encode(to_sign),
        }))
        .into_response(),
        Err(e) => (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({ "error": e })),
        )
            .into_response(),
    }
}

fn make_draft(
    state: &ConsoleState,
    session: &Session,
    form: DraftForm,
) -> Result<(Vec<u8>, Vec<u8>), String> {
    let sender = sender_of(session).map_err(|e| e.to_string())?;
    let Some((_, grant)) = state
        .store()
        .sender_by_name(&sender)
        .map_err(|e| e.to_string())?
    else {
        return Err(format!("sender {sender} was removed"));
    };
    let priority: Priority = match form.priority.as_str() {
        "" => Priority::Normal,
        other => other.parse()?,
    };
    let ttl = match form.ttl.trim() {
        "" => message::DEFAULT_TTL_MS,
        text => herald_shared::schedule::parse_duration(text)
            .map_err(|e| format!("time to live: {e}"))?
            .as_millis() as i64,
    };
    if ttl > message::MAX_TTL_MS {
        return Err("the time to live is at most 28 days".into());
    }
    let now = state.now();
    let link = Some(form.link.trim().to_string()).filter(|l| !l.is_empty());
    let message = Message {
        id: crate::random_bytes(),
        sender,
        audience: Audience::All,
        title: form.title.trim().to_string(),
        body: form.body.replace("\r\n", "\n"),
        priority,
        issued_at: now,
        expires_at: now + ttl,
        collapse: None,
        advertising: form.advertising.is_some(),
        link,
        grant,
    };
    message.validate()?;
    let draft = codec::to_bytes(&Statement::Message(message)).map_err(|e| e.to_string())?;
    let mut to_sign = SIGNING_CONTEXT.to_vec();
    to_sign.extend_from_slice(&draft);
    Ok((draft, to_sign))
}

/// `POST /sender/campaigns` (multipart): the signed draft, the options and the list.
pub(super) async fn create(
    State(state): State<ConsoleState>,
    session: Session,
    mut multipart: Multipart,
) -> ConsoleResult {
    let sender = sender_of(&session)?;
    let (list, temp) = new_list(&state.api)
        .await
        .map_err(|e| ConsoleError::Internal(e.1))?;
    let fields = read_form(&mut multipart, &temp).await;
    let fields = match fields {
        Ok(fields) => fields,
        Err(e) => {
            let _ = tokio::fs::remove_file(&temp).await;
            return compose(&session, StatusCode::BAD_REQUEST, Some(e));
        }
    };
    if !csrf_matches(fields.get("csrf"), &session.csrf) {
        let _ = tokio::fs::remove_file(&temp).await;
        return Err(ConsoleError::Csrf);
    }
    let outcome = async {
        if !fields.list_given {
            return Err("choose a recipient list (a CSV file)".to_string());
        }
        keep_list(&state.api, &list, &temp).await.map_err(|e| e.1)?;
        let (key, _) = state
            .store()
            .sender_by_name(&sender)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("sender {sender} was removed"))?;
        let decode = |name: &str| {
            base64::engine::general_purpose::STANDARD
                .decode(fields.get(name))
                .map_err(|_| "the page did not sign the message (is JavaScript on?)".to_string())
        };
        let envelope = Envelope {
            signer: PublicKey::from_hex(&key).map_err(|e| e.to_string())?,
            payload: decode("draft")?,
            signature: decode("signature")?,
        };
        let envelope = codec::to_bytes(&envelope).map_err(|e| e.to_string())?;
        let body = campaign_options(&fields, list.clone())?;
        let body = CreateCampaign {
            envelope: base64::engine::general_purpose::STANDARD.encode(envelope),
            ..body
        };
        start_campaign(&state.api, &Caller::Sender(sender.clone()), body).map_err(|e| {
            if e.1.contains("signature") || e.1.contains("refused") {
                format!("{} (was the key file sender {sender}'s key?)", e.1)
            } else {
                e.1
            }
        })
    }
    .await;
    match outcome {
        Ok(created) => Ok(see_other(&format!("/sender/campaigns/{}", created.id))),
        Err(error) => {
            let _ = tokio::fs::remove_file(&temp).await;
            compose(&session, StatusCode::BAD_REQUEST, Some(error))
        }
    }
}

/// The compose form's fields, the list streamed to a file on the way.
#[derive(Default)]
struct Fields {
    values: std::collections::HashMap<String, String>,
    list_given: bool,
}

impl Fields {
    fn get(&self, name: &str) -> &str {
        self.values.get(name).map_or("", String::as_str)
    }
}

/// Text fields (each at most 64 KiB) and the `list` file (at most
/// [`MAX_LIST_BYTES`], written to `temp`).
async fn read_form(multipart: &mut Multipart, temp: &std::path::Path) -> Result<Fields, String> {
    use tokio::io::AsyncWriteExt;
    let mut fields = Fields::default();
    let broken =
        |e: axum::extract::multipart::MultipartError| format!("the form did not arrive whole: {e}");
    while let Some(mut field) = multipart.next_field().await.map_err(broken)? {
        let name = field.name().unwrap_or_default().to_string();
        if name == "list" {
            let mut file = tokio::fs::File::create(temp)
                .await
                .map_err(|e| format!("cannot store the list: {e}"))?;
            let mut length = 0u64;
            while let Some(chunk) = field.chunk().await.map_err(broken)? {
                length += chunk.len() as u64;
                if length > MAX_LIST_BYTES {
                    return Err(format!("the list is longer than {MAX_LIST_BYTES} bytes"));
                }
                file.write_all(&chunk)
                    .await
                    .map_err(|e| format!("cannot store the list: {e}"))?;
            }
            file.sync_all()
                .await
                .map_err(|e| format!("cannot store the list: {e}"))?;
            fields.list_given = length > 0;
        } else {
            let text = field.text().await.map_err(broken)?;
            if text.len() > 64 * 1024 {
                return Err(format!("the field {name} is too long"));
            }
            fields.values.insert(name, text);
        }
    }
    Ok(fields)
}

fn campaign_options(fields: &Fields, list: String) -> Result<CreateCampaign, String> {
    let fallback: Fallback = match fields.get("fallback") {
        "" => Fallback::None,
        other => other.parse()?,
    };
    let fallback_after_ms = match fields.get("fallback_after").trim() {
        "" => None,
        text => Some(
            herald_shared::schedule::parse_duration(text)
                .map_err(|e| format!("fallback after: {e}"))?
                .as_millis() as i64,
        ),
    };
    let number = |name: &str, what: &str| -> Result<Option<u64>, String> {
        match fields.get(name).trim() {
            "" => Ok(None),
            text => text
                .parse::<u64>()
                .map(Some)
                .map_err(|_| format!("{what} must be a whole number")),
        }
    };
    let country = Some(fields.get("country").trim().to_string()).filter(|c| !c.is_empty());
    Ok(CreateCampaign {
        envelope: String::new(),
        list,
        deliver_at: None,
        fallback,
        fallback_after_ms,
        max_fallback: number("max_fallback", "the fallback cap")?,
        rate: number("rate", "the rate")?
            .map(|r| u32::try_from(r).map_err(|_| "the rate is too high".to_string()))
            .transpose()?,
        invite: !fields.get("invite").is_empty(),
        country,
        strict: !fields.get("strict").is_empty(),
    })
}

#[derive(Template)]
#[template(path = "sender_campaign.html")]
struct CampaignPage {
    layout: Layout,
    s: CampaignStatus,
    funnel: Vec<Bar>,
    series: String,
    series_max: u64,
    rows: Vec<CampaignRecipient>,
    more_rows: usize,
    states: &'static [&'static str],
    filter: String,
    live: bool,
}

/// One bar of the funnel chart (SVG units: 0 to 300 wide).
struct Bar {
    label: &'static str,
    count: u64,
    width: u64,
    y: u64,
}

impl CampaignPage {
    fn percent(&self, rate: &f64) -> String {
        format!("{:.1}%", rate * 100.0)
    }

    fn seconds(&self, ms: &Option<i64>) -> String {
        ms.map_or("-".into(), |ms| format!("{:.1} s", ms as f64 / 1000.0))
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct RowsQuery {
    state: String,
}

/// `GET /sender/campaigns/{id}`: figures, charts and rows; refreshes itself while the
/// campaign is under way.
pub(super) async fn campaign(
    State(state): State<ConsoleState>,
    session: Session,
    Path(id): Path<String>,
    Query(q): Query<RowsQuery>,
) -> ConsoleResult {
    own_campaign(&state, &session, &id)?;
    if !q.state.is_empty() && !RECIPIENT_STATES.contains(&q.state.as_str()) {
        return Err(ConsoleError::BadRequest(format!(
            "unknown state {:?}",
            q.state
        )));
    }
    let now = state.now();
    let s = state.store().campaign_status(&id, now)?;
    let filter = (!q.state.is_empty()).then_some(q.state.as_str());
    let mut rows = state.store().campaign_recipients(&id, filter, now)?;
    let more_rows = rows.len().saturating_sub(ROWS_SHOWN);
    rows.truncate(ROWS_SHOWN);
    let live = s.canceled_at.is_none()
        && now < s.expires_at
        && (s.fallback_pending > 0
            || s.stored + s.refused + s.expired < s.with_program
            || s.fallback_sent > s.fallback_delivered + s.fallback_failed);
    let steps: [(&'static str, u64); 8] = [
        ("addressed", s.addressed),
        ("with the program", s.with_program),
        ("pushed", s.pushed),
        ("stored", s.stored),
        ("displayed", s.displayed),
        ("read", s.read),
        ("fallback sent", s.fallback_sent),
        ("fallback delivered", s.fallback_delivered),
    ];
    let top = s.addressed.max(1);
    let funnel = steps
        .iter()
        .enumerate()
        .map(|(i, (label, count))| Bar {
            label,
            count: *count,
            width: (count * 300).div_ceil(top).min(300),
            y: i as u64 * 24,
        })
        .collect();
    let series_max = s
        .stored_per_minute
        .iter()
        .map(|(_, n)| *n)
        .max()
        .unwrap_or(0);
    let series = series_points(&s.stored_per_minute, series_max);
    Ok(render(
        StatusCode::OK,
        &CampaignPage {
            layout: Layout::of(&session),
            s,
            funnel,
            series,
            series_max,
            rows,
            more_rows,
            states: &RECIPIENT_STATES,
            filter: q.state,
            live,
        },
    ))
}

/// Points of the receipts-per-minute line, in a 300 × 100 box (empty with fewer than
/// one minute).
fn series_points(per_minute: &[(i64, u64)], max: u64) -> String {
    let (Some(first), Some(last)) = (per_minute.first(), per_minute.last()) else {
        return String::new();
    };
    let span = (last.0 - first.0).max(60_000) as f64;
    let max = max.max(1) as f64;
    per_minute
        .iter()
        .map(|(at, n)| {
            let x = (at - first.0) as f64 / span * 300.0;
            let y = 100.0 - *n as f64 / max * 100.0;
            format!("{x:.1},{y:.1}")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct NoFields {}

/// `POST /sender/campaigns/{id}/cancel`.
pub(super) async fn cancel(
    State(state): State<ConsoleState>,
    Path(id): Path<String>,
    Posted(session, _): Posted<NoFields>,
) -> ConsoleResult {
    own_campaign(&state, &session, &id)?;
    state.store().cancel_message(&id, state.now())?;
    Ok(see_other(&format!("/sender/campaigns/{id}")))
}

/// `GET /static/sign.js`.
pub(super) async fn sign_script() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        SIGN_SCRIPT,
    )
        .into_response()
}

#[derive(Template)]
#[template(path = "join.html")]
struct JoinPage {
    layout: Layout,
    registration: bool,
}

/// `GET /join`: where an invitation in a fallback message leads.
pub(super) async fn join(State(state): State<ConsoleState>) -> ConsoleResult {
    Ok(render(
        StatusCode::OK,
        &JoinPage {
            layout: Layout::anonymous(),
            registration: state.settings.registration,
        },
    ))
}
