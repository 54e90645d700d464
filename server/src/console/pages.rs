//! A user's pages: devices (and linking one), the catalog, subscriptions and history
//! (forwarding is in `forwarding`). Objects of other users answer 404, exactly like
//! objects that do not exist; admins may see every user's devices, subscriptions and
//! jobs here too.

use std::time::Duration;

use askama::Template;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;

use herald_shared::envelope::Audience;
use herald_shared::schedule::format_duration;
use herald_shared::token::{Token, SECRET_LEN};
use herald_shared::Millis;

use super::account::NoFields;
use super::auth::{Posted, Session};
use super::forms::TimingForm;
use super::{render, see_other, ConsoleError, ConsoleResult, ConsoleState, Layout};
use crate::model::{AgentDetail, AgentInfo, JobInfo};
use crate::model::{CatalogEntry, Subscription};
use crate::model::{Delivery, HistoryEntry};

/// How long a subscription's job may wait for an offline device.
pub(super) const SUBSCRIPTION_TTL_MS: u64 = 3600 * 1000;
/// How long a "link a device" token stays valid.
const LINK_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
/// Runs a history page shows.
const HISTORY_LIMIT: u32 = 200;
/// Rows a list of subscriptions shows (newest first).
pub(super) const LIST_LIMIT: u32 = 200;
/// Catalog subscriptions a plain user may have.
const MAX_SUBSCRIPTIONS: u32 = 20;
/// Devices a plain user may have linked, counting unused "link a device" tokens.
const MAX_DEVICES: u32 = 10;
/// Unused "link a device" tokens a plain user may hold at once.
const MAX_LINK_TOKENS: u32 = 5;
/// Runs a device page shows.
const DEVICE_RUNS: u32 = 20;

/// Parses an id from a path; anything else is "not found".
pub(super) fn path_id(text: &str) -> Result<i64, ConsoleError> {
    text.parse().map_err(|_| ConsoleError::NotFound)
}

// === devices ===

#[derive(Template)]
#[template(path = "devices.html")]
struct DevicesPage {
    layout: Layout,
    devices: Vec<AgentInfo>,
    error: Option<String>,
}

#[derive(Template)]
#[template(path = "link.html")]
struct LinkPage {
    layout: Layout,
    token: String,
    valid_for: String,
    /// The one-line install command, when agent packages are published for it.
    install_command: Option<String>,
}

#[derive(Template)]
#[template(path = "device.html")]
struct DevicePage {
    layout: Layout,
    detail: AgentDetail,
    subscriptions: Vec<Subscription>,
    runs: Vec<HistoryEntry>,
    job_base: &'static str,
}

fn online(state: &ConsoleState) -> impl Fn(&str) -> bool + '_ {
    move |id: &str| state.api.relay.is_online(id)
}

fn devices_page(
    state: &ConsoleState,
    session: &Session,
    status: StatusCode,
    error: Option<String>,
) -> ConsoleResult {
    let devices = state.store().user_agents(session.user.id, &online(state))?;
    Ok(render(
        status,
        &DevicesPage {
            layout: Layout::of(session),
            devices,
            error,
        },
    ))
}

/// `GET /devices`.
pub(super) async fn devices(State(state): State<ConsoleState>, session: Session) -> ConsoleResult {
    devices_page(&state, &session, StatusCode::OK, None)
}

/// Why this user may not have another "link a device" token, if they may not: at
/// most [`MAX_LINK_TOKENS`] unused at once, and devices plus unused tokens at most
/// [`MAX_DEVICES`] (so the tokens out there cannot add more). Admins have no quota.
fn link_quota(
    state: &ConsoleState,
    session: &Session,
    now: Millis,
) -> ConsoleResult<Option<String>> {
    if session.user.is_admin() {
        return Ok(None);
    }
    let user = session.user.id;
    let tokens = state.store().unused_link_tokens(user, now)?;
    if tokens >= MAX_LINK_TOKENS {
        return Ok(Some(format!(
            "you have {tokens} unused link tokens (at most {MAX_LINK_TOKENS}): use one, \
             or wait until they expire {} after they were made",
            format_duration(LINK_TOKEN_TTL)
        )));
    }
    let devices = state.store().device_count(user)?;
    if devices + tokens >= MAX_DEVICES {
        return Ok(Some(format!(
            "an account may link at most {MAX_DEVICES} devices, counting unused link tokens \
             (you have {devices} devices and {tokens} tokens); ask an administrator to \
             revoke a device you no longer use"
        )));
    }
    Ok(None)
}

/// `POST /devices/link`: a one-use personal enrollment token, shown once.
pub(super) async fn link_device(
    State(state): State<ConsoleState>,
    Posted(session, NoFields {}): Posted<NoFields>,
) -> ConsoleResult {
    let enrollment = &state.enrollment;
    let token = Token {
        server: enrollment.server.clone(),
        ca_fingerprint: enrollment.ca_fingerprint,
        operator_keys: enrollment.operator_keys.clone(),
        groups: Vec::new(),
        secret: crate::random_bytes::<SECRET_LEN>(),
    };
    let now = state.now();
    {
        let _quota = state.quota();
        if let Some(error) = link_quota(&state, &session, now)? {
            return devices_page(&state, &session, StatusCode::BAD_REQUEST, Some(error));
        }
        state.store().add_user_token(
            &token.secret_hash(),
            session.user.id,
            1,
            now + LINK_TOKEN_TTL.as_millis() as i64,
            now,
        )?;
    }
    let token = token.encode();
    Ok(render(
        StatusCode::OK,
        &LinkPage {
            layout: Layout::of(&session),
            install_command: crate::api::install::console_command(&state.api, &token),
            token,
            valid_for: format_duration(LINK_TOKEN_TTL),
        },
    ))
}

/// `GET /devices/{agent}`.
pub(super) async fn device(
    State(state): State<ConsoleState>,
    session: Session,
    Path(agent): Path<String>,
) -> ConsoleResult {
    let owner = state.store().agent_owner(&agent)?;
    if !session.may_see(owner) {
        return Err(ConsoleError::NotFound);
    }
    let detail = state.store().agent(&agent, &online(&state))?;
    let target = format!("agent:{agent}");
    let mine = (!session.user.is_admin()).then_some(session.user.id);
    let subscriptions = state
        .store()
        .subscriptions_page(mine, Some(&target), LIST_LIMIT)?;
    let runs = state.store().history(None, Some(&agent), DEVICE_RUNS)?;
    Ok(render(
        StatusCode::OK,
        &DevicePage {
            layout: Layout::of(&session),
            detail,
            subscriptions,
            runs,
            job_base: "/history",
        },
    ))
}

// === catalog ===

#[derive(Template)]
#[template(path = "catalog.html")]
struct CatalogPage {
    layout: Layout,
    entries: Vec<CatalogEntry>,
}

#[derive(Template)]
#[template(path = "entry.html")]
struct EntryPage {
    layout: Layout,
    entry: CatalogEntry,
    min_interval: String,
    devices: Vec<AgentInfo>,
    device: String,
    timing: TimingForm,
    error: Option<String>,
}

/// `GET /catalog`.
pub(super) async fn catalog(State(state): State<ConsoleState>, session: Session) -> ConsoleResult {
    Ok(render(
        StatusCode::OK,
        &CatalogPage {
            layout: Layout::of(&session),
            entries: state.store().catalog()?,
        },
    ))
}

fn entry_page(
    state: &ConsoleState,
    session: &Session,
    entry: CatalogEntry,
    device: String,
    timing: TimingForm,
    error: Option<String>,
) -> ConsoleResult<EntryPage> {
    let devices = state
        .store()
        .user_agents(session.user.id, &|_| false)?
        .into_iter()
        .filter(|a| a.revoked_at.is_none())
        .collect();
    Ok(EntryPage {
        layout: Layout::of(session),
        min_interval: format_duration(Duration::from_millis(entry.min_interval_ms)),
        entry,
        devices,
        device,
        timing,
        error,
    })
}

/// `GET /catalog/{name}`.
pub(super) async fn entry(
    State(state): State<ConsoleState>,
    session: Session,
    Path(name): Path<String>,
) -> ConsoleResult {
    let entry = state.store().catalog_entry(&name)?;
    let timing = TimingForm::new_for(entry.min_interval_ms);
    let page = entry_page(&state, &session, entry, String::new(), timing, None)?;
    Ok(render(StatusCode::OK, &page))
}

// === subscriptions ===

#[derive(Template)]
#[template(path = "subscriptions.html")]
struct SubscriptionsPage {
    layout: Layout,
    subscriptions: Vec<Subscription>,
}

#[derive(Template)]
#[template(path = "subscription.html")]
struct SubscriptionPage {
    layout: Layout,
    subscription: Subscription,
    timing: TimingForm,
    error: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct SubscribeForm {
    entry: String,
    device: String,
    #[serde(flatten)]
    timing: TimingForm,
}

/// `GET /subscriptions`.
pub(super) async fn subscriptions(
    State(state): State<ConsoleState>,
    session: Session,
) -> ConsoleResult {
    Ok(render(
        StatusCode::OK,
        &SubscriptionsPage {
            layout: Layout::of(&session),
            subscriptions: state.store().subscriptions_page(
                Some(session.user.id),
                None,
                LIST_LIMIT,
            )?,
        },
    ))
}

/// Why `device` may not be subscribed to `entry` by this user, if it may not.
fn check_device(
    state: &ConsoleState,
    session: &Session,
    entry: &CatalogEntry,
    device: &str,
) -> ConsoleResult<Option<String>> {
    let mine = state
        .store()
        .user_agents(session.user.id, &|_| false)?
        .into_iter()
        .any(|a| a.id == device && a.revoked_at.is_none());
    if !mine {
        return Ok(Some("choose one of your devices".into()));
    }
    let offered = match entry.target.parse::<Audience>() {
        Ok(audience) => state
            .store()
            .expand(&audience)?
            .iter()
            .any(|id| id == device),
        Err(_) => false,
    };
    if !offered {
        return Ok(Some(
            "this service is not offered to that device; ask the operator".into(),
        ));
    }
    Ok(None)
}

/// `POST /subscriptions`.
pub(super) async fn subscribe(
    State(state): State<ConsoleState>,
    Posted(session, form): Posted<SubscribeForm>,
) -> ConsoleResult {
    let entry = state.store().catalog_entry(form.entry.trim())?;
    let now = state.now();
    let quota = state.quota();
    let problem = match check_device(&state, &session, &entry, &form.device)? {
        Some(problem) => Err(problem),
        None => match subscription_quota(&state, &session)? {
            Some(problem) => Err(problem),
            None => form.timing.parse(entry.min_interval_ms, now),
        },
    };
    let timing = match problem {
        Ok(timing) => timing,
        Err(error) => {
            drop(quota);
            let page = entry_page(
                &state,
                &session,
                entry,
                form.device,
                form.timing,
                Some(error),
            )?;
            return Ok(render(StatusCode::BAD_REQUEST, &page));
        }
    };
    state.store().add_service_subscription(
        session.user.id,
        &entry.name,
        &Audience::Agent(form.device.clone()),
        &timing.schedule,
        timing.missed,
        SUBSCRIPTION_TTL_MS,
        timing.next_fire_at,
        now,
    )?;
    drop(quota);
    state.api.scheduler.notify_one();
    Ok(see_other("/subscriptions"))
}

/// Why this user may not subscribe once more, if they may not (at most
/// [`MAX_SUBSCRIPTIONS`]; admins have no quota).
fn subscription_quota(state: &ConsoleState, session: &Session) -> ConsoleResult<Option<String>> {
    if session.user.is_admin() {
        return Ok(None);
    }
    let count = state.store().subscription_count(session.user.id)?;
    Ok((count >= MAX_SUBSCRIPTIONS).then(|| {
        format!(
            "you have {count} subscriptions, the most an account may have; \
             delete one you no longer need first"
        )
    }))
}

/// A subscription this user may see (their own; any for admins), else 404.
fn visible_subscription(
    state: &ConsoleState,
    session: &Session,
    id: &str,
) -> ConsoleResult<Subscription> {
    let subscription = state.store().service_subscription(path_id(id)?)?;
    if !session.may_see(Some(subscription.owner_user_id)) {
        return Err(ConsoleError::NotFound);
    }
    Ok(subscription)
}

/// `GET /subscriptions/{id}`.
pub(super) async fn subscription(
    State(state): State<ConsoleState>,
    session: Session,
    Path(id): Path<String>,
) -> ConsoleResult {
    let subscription = visible_subscription(&state, &session, &id)?;
    Ok(render(
        StatusCode::OK,
        &SubscriptionPage {
            layout: Layout::of(&session),
            timing: TimingForm::of(&subscription),
            subscription,
            error: None,
        },
    ))
}

/// `POST /subscriptions/{id}`: changes the timing.
pub(super) async fn edit_subscription(
    State(state): State<ConsoleState>,
    Path(id): Path<String>,
    Posted(session, timing): Posted<TimingForm>,
) -> ConsoleResult {
    let subscription = visible_subscription(&state, &session, &id)?;
    let entry = state.store().catalog_entry(&subscription.entry)?;
    let parsed = match timing.parse(entry.min_interval_ms, state.now()) {
        Ok(parsed) => parsed,
        Err(error) => {
            return Ok(render(
                StatusCode::BAD_REQUEST,
                &SubscriptionPage {
                    layout: Layout::of(&session),
                    subscription,
                    timing,
                    error: Some(error),
                },
            ))
        }
    };
    state.store().update_service_subscription(
        subscription.id,
        &parsed.schedule,
        parsed.missed,
        parsed.next_fire_at,
    )?;
    state.api.scheduler.notify_one();
    Ok(see_other(&format!("/subscriptions/{}", subscription.id)))
}

/// `POST /subscriptions/{id}/delete`.
pub(super) async fn delete_subscription(
    State(state): State<ConsoleState>,
    Path(id): Path<String>,
    Posted(session, NoFields {}): Posted<NoFields>,
) -> ConsoleResult {
    let subscription = visible_subscription(&state, &session, &id)?;
    state.store().remove_service_subscription(subscription.id)?;
    state.api.scheduler.notify_one();
    Ok(see_other("/subscriptions"))
}

// === history ===

#[derive(Template)]
#[template(path = "history.html")]
struct HistoryPage {
    layout: Layout,
    runs: Vec<HistoryEntry>,
    job_base: &'static str,
}

/// A job's page (the user's and the admin's).
#[derive(Template)]
#[template(path = "job.html")]
pub(super) struct JobPage {
    pub(super) layout: Layout,
    pub(super) page: &'static str,
    pub(super) admin: bool,
    pub(super) cancelable: bool,
    pub(super) job: JobInfo,
    pub(super) entry: HistoryEntry,
    pub(super) deliveries: Vec<Delivery>,
}

/// `GET /history`.
pub(super) async fn history(State(state): State<ConsoleState>, session: Session) -> ConsoleResult {
    Ok(render(
        StatusCode::OK,
        &HistoryPage {
            layout: Layout::of(&session),
            runs: state
                .store()
                .history(Some(session.user.id), None, HISTORY_LIMIT)?,
            job_base: "/history",
        },
    ))
}

/// `GET /history/{job}`.
pub(super) async fn job(
    State(state): State<ConsoleState>,
    session: Session,
    Path(id): Path<String>,
) -> ConsoleResult {
    let id = path_id(&id)?;
    let entry = state.store().history_entry(id)?;
    if !session.may_see(entry.owner_user_id) {
        return Err(ConsoleError::NotFound);
    }
    let job = state.store().job(id)?;
    let deliveries = state
        .store()
        .job_deliveries(id)?
        .into_iter()
        .filter(|d| session.user.is_admin() || d.user_id == session.user.id)
        .collect();
    Ok(render(
        StatusCode::OK,
        &JobPage {
            layout: Layout::of(&session),
            page: "job",
            admin: false,
            cancelable: false,
            job,
            entry,
            deliveries,
        },
    ))
}
