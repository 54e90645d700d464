//! Admin pages: every agent, job, schedule and user. Plain users get 403 here.
//! Admins schedule catalog entries only; arbitrary commands still need the operator key.

use askama::Template;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::Deserialize;

use herald_shared::envelope::Audience;

use super::account::NoFields;
use super::auth::{Admin, Posted, Session};
use super::forms::TimingForm;
use super::pages::{path_id, JobPage, LIST_LIMIT, SUBSCRIPTION_TTL_MS};
use super::{render, see_other, ConsoleError, ConsoleResult, ConsoleState, Layout};
use crate::model::{AgentDetail, ScheduleInfo};
use crate::model::{CatalogEntry, Subscription};
use crate::model::{HistoryEntry, OwnedAgent, Role, User};
use crate::store::StoreError;

/// Runs an agent's admin page shows.
const AGENT_RUNS: u32 = 50;

fn require_admin(session: &Session) -> ConsoleResult<()> {
    if session.user.is_admin() {
        Ok(())
    } else {
        Err(ConsoleError::Forbidden(
            "this page is for administrators".into(),
        ))
    }
}

// === agents ===

#[derive(Template)]
#[template(path = "admin_agents.html")]
struct AgentsPage {
    layout: Layout,
    agents: Vec<OwnedAgent>,
}

#[derive(Template)]
#[template(path = "admin_agent.html")]
struct AgentPage {
    layout: Layout,
    detail: AgentDetail,
    owner: Option<String>,
    runs: Vec<HistoryEntry>,
    job_base: &'static str,
}

/// `GET /admin/agents`.
pub(super) async fn agents(
    State(state): State<ConsoleState>,
    Admin(session): Admin,
) -> ConsoleResult {
    let relay = state.api.relay.clone();
    let agents = state
        .store()
        .agents_page(LIST_LIMIT, &|id| relay.is_online(id))?;
    Ok(render(
        StatusCode::OK,
        &AgentsPage {
            layout: Layout::of(&session),
            agents,
        },
    ))
}

/// `GET /admin/agents/{id}`.
pub(super) async fn agent(
    State(state): State<ConsoleState>,
    Admin(session): Admin,
    Path(id): Path<String>,
) -> ConsoleResult {
    let relay = state.api.relay.clone();
    let detail = state.store().agent(&id, &|a| relay.is_online(a))?;
    let owner = match state.store().agent_owner(&id)? {
        Some(user) => Some(state.store().user(user)?.login),
        None => None,
    };
    let runs = state.store().history(None, Some(&id), AGENT_RUNS)?;
    Ok(render(
        StatusCode::OK,
        &AgentPage {
            layout: Layout::of(&session),
            detail,
            owner,
            runs,
            job_base: "/admin/jobs",
        },
    ))
}

/// `POST /admin/agents/{id}/revoke`: what the API's revoke does.
pub(super) async fn revoke(
    State(state): State<ConsoleState>,
    Path(id): Path<String>,
    Posted(session, NoFields {}): Posted<NoFields>,
) -> ConsoleResult {
    require_admin(&session)?;
    let key = state.store().revoke(&id, state.now())?;
    state.api.relay.revoke(&id, key);
    state.api.relay.job_changed(0);
    Ok(see_other(&format!("/admin/agents/{id}")))
}

// === jobs ===

#[derive(Template)]
#[template(path = "admin_jobs.html")]
struct JobsPage {
    layout: Layout,
    runs: Vec<HistoryEntry>,
    job_base: &'static str,
}

/// `GET /admin/jobs`.
pub(super) async fn jobs(
    State(state): State<ConsoleState>,
    Admin(session): Admin,
) -> ConsoleResult {
    Ok(render(
        StatusCode::OK,
        &JobsPage {
            layout: Layout::of(&session),
            runs: state.store().history(None, None, LIST_LIMIT)?,
            job_base: "/admin/jobs",
        },
    ))
}

/// `GET /admin/jobs/{id}`.
pub(super) async fn job(
    State(state): State<ConsoleState>,
    Admin(session): Admin,
    Path(id): Path<String>,
) -> ConsoleResult {
    let id = path_id(&id)?;
    let entry = state.store().history_entry(id)?;
    let job = state.store().job(id)?;
    Ok(render(
        StatusCode::OK,
        &JobPage {
            layout: Layout::of(&session),
            page: "admin-job",
            admin: true,
            cancelable: !job.is_final(),
            deliveries: state.store().job_deliveries(id)?,
            job,
            entry,
        },
    ))
}

/// `POST /admin/jobs/{id}/cancel`.
pub(super) async fn cancel(
    State(state): State<ConsoleState>,
    Path(id): Path<String>,
    Posted(session, NoFields {}): Posted<NoFields>,
) -> ConsoleResult {
    require_admin(&session)?;
    let id = path_id(&id)?;
    if state.store().cancel_job(id, state.now())? {
        state.api.relay.job_changed(id);
    }
    Ok(see_other(&format!("/admin/jobs/{id}")))
}

// === schedules ===

#[derive(Template)]
#[template(path = "admin_schedules.html")]
struct SchedulesPage {
    layout: Layout,
    schedules: Vec<ScheduleInfo>,
    subscriptions: Vec<Subscription>,
    entries: Vec<CatalogEntry>,
    entry: String,
    target: String,
    timing: TimingForm,
    error: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct ScheduleForm {
    entry: String,
    target: String,
    #[serde(flatten)]
    timing: TimingForm,
}

fn schedules_page(
    state: &ConsoleState,
    session: &Session,
    form: ScheduleForm,
    error: Option<String>,
) -> ConsoleResult<SchedulesPage> {
    // Operator schedules and subscriptions are told apart in SQL, each list newest
    // first and bounded.
    Ok(SchedulesPage {
        layout: Layout::of(session),
        schedules: state.store().operator_schedules(LIST_LIMIT)?,
        subscriptions: state.store().subscriptions_page(None, None, LIST_LIMIT)?,
        entries: state.store().catalog()?,
        entry: form.entry,
        target: form.target,
        timing: form.timing,
        error,
    })
}

/// `GET /admin/schedules`.
pub(super) async fn schedules(
    State(state): State<ConsoleState>,
    Admin(session): Admin,
) -> ConsoleResult {
    let form = ScheduleForm {
        target: "all".into(),
        timing: TimingForm::new_for(0),
        ..ScheduleForm::default()
    };
    let page = schedules_page(&state, &session, form, None)?;
    Ok(render(StatusCode::OK, &page))
}

/// The audience a target names, with agent names resolved to ids.
fn target(state: &ConsoleState, text: &str) -> Result<Audience, String> {
    match text.trim().parse::<Audience>()? {
        Audience::Agent(name) => match state.store().resolve_agent(&name) {
            Ok(id) => Ok(Audience::Agent(id)),
            Err(StoreError::NotFound(m)) => Err(m),
            Err(e) => Err(e.to_string()),
        },
        Audience::Group(group) if !herald_shared::valid_name(&group) => {
            Err(format!("invalid group name {group:?}"))
        }
        other => Ok(other),
    }
}

/// `POST /admin/schedules`: a catalog entry on any target.
pub(super) async fn add_schedule(
    State(state): State<ConsoleState>,
    Posted(session, form): Posted<ScheduleForm>,
) -> ConsoleResult {
    require_admin(&session)?;
    let now = state.now();
    let checked = state
        .store()
        .catalog_entry(form.entry.trim())
        .map_err(|_| "choose a catalog entry".to_string())
        .and_then(|entry| {
            let audience = target(&state, &form.target)?;
            let timing = form.timing.parse(entry.min_interval_ms, now)?;
            Ok((entry, audience, timing))
        });
    let (entry, audience, timing) = match checked {
        Ok(ok) => ok,
        Err(error) => {
            let page = schedules_page(&state, &session, form, Some(error))?;
            return Ok(render(StatusCode::BAD_REQUEST, &page));
        }
    };
    state.store().add_service_subscription(
        session.user.id,
        &entry.name,
        &audience,
        &timing.schedule,
        timing.missed,
        SUBSCRIPTION_TTL_MS,
        timing.next_fire_at,
        now,
    )?;
    state.api.scheduler.notify_one();
    Ok(see_other("/admin/schedules"))
}

/// `POST /admin/schedules/{id}/delete`: an operator schedule or a subscription.
pub(super) async fn delete_schedule(
    State(state): State<ConsoleState>,
    Path(id): Path<String>,
    Posted(session, NoFields {}): Posted<NoFields>,
) -> ConsoleResult {
    require_admin(&session)?;
    let id = path_id(&id)?;
    match state.store().service_subscription(id) {
        Ok(_) => state.store().remove_service_subscription(id)?,
        Err(StoreError::NotFound(_)) => state.store().remove_schedule(id)?,
        Err(e) => return Err(e.into()),
    }
    state.api.scheduler.notify_one();
    Ok(see_other("/admin/schedules"))
}

// === users ===

#[derive(Template)]
#[template(path = "admin_users.html")]
struct UsersPage {
    layout: Layout,
    users: Vec<User>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct RoleForm {
    role: String,
}

/// `GET /admin/users`.
pub(super) async fn users(
    State(state): State<ConsoleState>,
    Admin(session): Admin,
) -> ConsoleResult {
    Ok(render(
        StatusCode::OK,
        &UsersPage {
            layout: Layout::of(&session),
            users: state.store().users_page(LIST_LIMIT)?,
        },
    ))
}

/// `POST /admin/users/{id}/role`.
pub(super) async fn set_role(
    State(state): State<ConsoleState>,
    Path(id): Path<String>,
    Posted(session, form): Posted<RoleForm>,
) -> ConsoleResult {
    require_admin(&session)?;
    let role: Role = form.role.parse().map_err(ConsoleError::BadRequest)?;
    state.store().set_role(path_id(&id)?, role)?;
    Ok(see_other("/admin/users"))
}

#[derive(Template)]
#[template(path = "admin_audit.html")]
struct AuditPage {
    layout: Layout,
    verdict: crate::model::AuditVerdict,
    entries: Vec<crate::model::AuditEntry>,
    actor: String,
    limit: u32,
}

#[derive(Deserialize, Default)]
#[serde(default)]
pub(super) struct AuditFilter {
    actor: String,
}

/// `GET /admin/audit`: the newest entries, and whether the chain holds.
pub(super) async fn audit(
    State(state): State<ConsoleState>,
    Admin(session): Admin,
    axum::extract::Query(filter): axum::extract::Query<AuditFilter>,
) -> ConsoleResult {
    let actor = filter.actor.trim().to_string();
    let limit = LIST_LIMIT;
    Ok(render(
        StatusCode::OK,
        &AuditPage {
            layout: Layout::of(&session),
            verdict: state.store().audit_verify()?,
            entries: state
                .store()
                .audit_recent(Some(actor.as_str()).filter(|a| !a.is_empty()), limit)?,
            actor,
            limit,
        },
    ))
}
