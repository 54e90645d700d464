//! The admin API: HTTPS JSON under `/api/v1`, authenticated by a bearer admin token
//! (stored hashed), plus Prometheus metrics at `/metrics`.
//!
//! - `mod.rs`: the router, authentication, body limits, tokens, agents, groups, jobs,
//!   schedules, metrics;
//! - `catalog.rs`: catalog entries;
//! - `releases.rs`: vendors, releases and artifacts, package subscriptions, installs,
//!   rollouts;
//! - `messages.rs`: push-message senders, messages, receipts, refusals;
//! - `install.rs`: `/install.sh` and the list of installer packages it reads;
//! - `clubs.rs`: clubs and members, and the directory as a user sees it;
//! - `billing.rs`: usage ingestion, plans, prices, runs, invoices, exports, statistics.
//!
//! Orders arrive already signed by the operator key; the server checks them against the
//! operator keys in its configuration only to refuse junk early. Agents check again.

mod admin;
pub mod billing;
pub mod campaigns;
mod catalog;
mod clubs;
pub mod install;
mod openapi;
pub mod routes;

pub mod messages;
pub mod releases;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use base64::Engine;
use serde::Deserialize;
use tokio::sync::{broadcast, Notify};

use herald_shared::codec;
use herald_shared::envelope::{Audience, Envelope, Order, PublicKey, Repeat, Statement};
use herald_shared::protocol::JobId;

use crate::model::{
    AgentDetail, AgentInfo, ApiErrorBody, CreateJobs, CreateSchedule, CreateToken, Created,
    JobInfo, ScheduleInfo, SetMembership,
};
use crate::now_ms;
use crate::relay::Relay;
use crate::store::{Store, StoreError};

/// Longest `wait_ms` a client may ask for on a job long poll.
const MAX_WAIT: Duration = Duration::from_secs(300);
/// Longest TTL for a job.
const MAX_TTL_MS: u64 = 30 * 24 * 3600 * 1000;
/// Most jobs a list returns.
pub(crate) const MAX_LIST: u32 = 1000;

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// Database.
    pub store: Store,
    /// Relay.
    pub relay: Arc<Relay>,
    /// Tells the scheduler that deadlines changed.
    pub scheduler: Arc<Notify>,
    /// Operator keys from the configuration.
    pub operator_keys: Arc<Vec<PublicKey>>,
    /// Where artifacts are stored.
    pub artifacts: std::path::PathBuf,
    /// Tells the rollout driver that something changed.
    pub rollouts: Arc<Notify>,
    /// Where uploaded recipient lists wait for their campaign.
    pub lists: std::path::PathBuf,
    /// The server's public HTTPS URL (invitation links).
    pub public_url: String,
    /// Tells the forwarder that a campaign's fallbacks may be due.
    pub fallbacks: Arc<Notify>,
    /// `[sms] report_secret`: what the gateway's delivery reports must carry.
    pub sms_report_secret: Option<String>,
    /// Fallback media this server is set up for (`[sms]`, `[smtp]`).
    pub fallback_media: Vec<crate::model::Fallback>,
    /// The QUIC endpoint is bound and the relay serves it (`/readyz`).
    pub quic_serving: Arc<std::sync::atomic::AtomicBool>,
    /// The URL and certificate pin of the one-line install.
    pub install_site: Arc<install::InstallSite>,
    /// This node of the cluster (the only one on SQLite).
    pub node: crate::cluster::Node,
}

/// `GET /api/v1/nodes`.
pub(crate) async fn nodes(State(state): State<ApiState>) -> ApiResult<Vec<crate::store::NodeRow>> {
    Ok(Json(state.node.list(crate::now_ms())?))
}

/// Who made an API request.
#[derive(Debug, Clone)]
pub enum Caller {
    /// An admin token, with its scope (already checked against the route's).
    Admin(crate::store::AdminCaller),
    /// A vendor's token (may only publish its own releases).
    Vendor(String),
    /// A message sender's token (may only send and read its own messages).
    Sender(String),
}

impl Caller {
    /// How the audit log names the caller.
    pub fn actor(&self) -> String {
        match self {
            Caller::Admin(admin) => format!("token:{} ({})", admin.id, admin.name),
            Caller::Vendor(name) => format!("vendor:{name}"),
            Caller::Sender(name) => format!("sender:{name}"),
        }
    }
}

/// An API failure: status and one sentence.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ApiErrorBody { error: self.1 })).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(m) => ApiError(StatusCode::NOT_FOUND, m),
            StoreError::Conflict(m) => ApiError(StatusCode::CONFLICT, m),
            StoreError::Invalid(m) => ApiError(StatusCode::BAD_REQUEST, m),
            other => {
                tracing::error!("store: {other}");
                ApiError(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("server error: {other}"),
                )
            }
        }
    }
}

pub(crate) fn bad(message: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, message.into())
}

pub(crate) type ApiResult<T> = Result<Json<T>, ApiError>;

/// Builds the router from the route table ([`routes::ROUTES`]).
pub fn router(state: ApiState) -> Router {
    routes::build(state)
}

/// How long `/readyz` waits for the database's write lock.
const READY_WAIT: Duration = Duration::from_secs(1);

/// `GET /readyz`: 200 when the database takes a write (within [`READY_WAIT`]) and the
/// QUIC endpoint is served; 503 with the reasons otherwise. No token: for load
/// balancers and orchestrators.
pub(crate) async fn readyz(State(state): State<ApiState>) -> Response {
    let readiness = Readiness::check(&state.store, &state.quic_serving, READY_WAIT);
    let database = match &readiness.database {
        Ok(()) => "writable".to_string(),
        Err(e) => format!("not writable: {e}"),
    };
    let quic = if readiness.quic_serving {
        "serving"
    } else {
        "not serving"
    };
    let status = if readiness.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(serde_json::json!({"ready": readiness.ready(), "database": database, "quic": quic})),
    )
        .into_response()
}

/// What `/readyz` and systemd's watchdog (serve.rs) check.
#[derive(Debug)]
pub struct Readiness {
    /// Whether the database took a small write in time, or why not.
    pub database: Result<(), String>,
    /// Whether the relay serves the QUIC endpoint.
    pub quic_serving: bool,
}

impl Readiness {
    /// Commits a write (waiting at most `wait` for the lock) and reads the relay's flag.
    pub fn check(
        store: &Store,
        quic_serving: &std::sync::atomic::AtomicBool,
        wait: Duration,
    ) -> Readiness {
        Readiness {
            database: store
                .check_writable(wait, crate::now_ms())
                .map_err(|e| e.to_string()),
            quic_serving: quic_serving.load(std::sync::atomic::Ordering::SeqCst),
        }
    }

    /// Both hold.
    pub fn ready(&self) -> bool {
        self.database.is_ok() && self.quic_serving
    }
}

/// The largest request body the API reads (artifact uploads aside).
pub const BODY_LIMIT: usize = 2 * 1024 * 1024;
/// How much of an oversized body is read and dropped so that the client, still sending,
/// gets the 413 answer instead of a reset connection.
const DRAIN_LIMIT: u64 = 64 * 1024 * 1024;
/// How long that draining may take.
const DRAIN_TIME: Duration = Duration::from_secs(10);

/// Answers a body declared larger than [`BODY_LIMIT`] with 413 and a message. It reads
/// the rest of the body first (up to [`DRAIN_LIMIT`], within [`DRAIN_TIME`]): a server
/// that answers and closes while the client is still sending makes the client's TCP
/// stack reset the connection, and the client would see a TLS error instead of the
/// answer. Beyond that the answer is sent with `Connection: close`, best effort.
pub(crate) async fn refuse_oversized(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let declared = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let Some(length) = declared.filter(|&n| n > BODY_LIMIT as u64) else {
        return next.run(request).await;
    };
    let error = ApiError(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the request body is {length} bytes; the API accepts at most {BODY_LIMIT} bytes"),
    );
    if length <= DRAIN_LIMIT {
        let mut body = request.into_body().into_data_stream();
        let drain = async {
            use futures_util::StreamExt;
            while let Some(Ok(_)) = body.next().await {}
        };
        if tokio::time::timeout(DRAIN_TIME, drain).await.is_ok() {
            return error.into_response();
        }
    }
    let mut response = error.into_response();
    response.headers_mut().insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    response
}

pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

/// Checks a SHA-256 given in hex (token hashes).
pub(crate) fn check_hash(field: &str, text: &str) -> Result<(), ApiError> {
    if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(bad(format!("{field} must be 64 hex digits")))
    }
}

/// Decodes a base64 bincode envelope without opening it.
pub(crate) fn decode_raw_envelope(text: &str) -> Result<Envelope, ApiError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|_| bad("envelope is not valid base64"))?;
    codec::from_bytes(&bytes, codec::DEFAULT_FRAME_LIMIT)
        .map_err(|e| bad(format!("envelope does not decode: {e}")))
}

/// Decodes an envelope and opens it with the operator keys.
pub(crate) fn decode_envelope(
    state: &ApiState,
    text: &str,
) -> Result<(Envelope, Statement), ApiError> {
    let envelope = decode_raw_envelope(text)?;
    let statement = envelope
        .open(&state.operator_keys)
        .map_err(|e| bad(format!("envelope refused: {e}")))?;
    Ok((envelope, statement))
}

/// Decodes an operator-signed order.
pub(crate) fn decode_order(state: &ApiState, text: &str) -> Result<(Envelope, Order), ApiError> {
    match decode_envelope(state, text)? {
        (envelope, Statement::Order(order)) => Ok((envelope, order)),
        _ => Err(bad("envelope is not an order")),
    }
}

async fn create_token(
    State(state): State<ApiState>,
    Json(body): Json<CreateToken>,
) -> ApiResult<Created> {
    check_hash("secret_hash", &body.secret_hash)?;
    if body.uses == 0 {
        return Err(bad("uses must be at least 1"));
    }
    if let Some(g) = body.groups.iter().find(|g| !herald_shared::valid_name(g)) {
        return Err(bad(format!("invalid group name {g:?}")));
    }
    let now = now_ms();
    if body.expires_at <= now {
        return Err(bad("token would already be expired"));
    }
    state.store.add_token(
        &body.secret_hash,
        &body.groups,
        body.uses,
        body.expires_at,
        now,
    )?;
    Ok(Json(Created { ids: vec![] }))
}

/// `GET /api/v1/tokens`: enrollment tokens that can still enroll.
async fn list_tokens(State(state): State<ApiState>) -> ApiResult<Vec<crate::model::TokenInfo>> {
    Ok(Json(state.store.tokens(now_ms())?))
}

/// `DELETE /api/v1/tokens/{id}`: the token enrolls no one from now on.
async fn revoke_token(
    State(state): State<ApiState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> ApiResult<Created> {
    state.store.revoke_token(&id)?;
    Ok(Json(Created { ids: vec![] }))
}

async fn list_agents(State(state): State<ApiState>) -> ApiResult<Vec<AgentInfo>> {
    let relay = state.relay.clone();
    Ok(Json(state.store.agents(&|id| relay.is_online(id))?))
}

async fn show_agent(
    State(state): State<ApiState>,
    Path(agent): Path<String>,
) -> ApiResult<AgentDetail> {
    let id = state.store.resolve_agent(&agent)?;
    let relay = state.relay.clone();
    Ok(Json(state.store.agent(&id, &|id| relay.is_online(id))?))
}

async fn revoke_agent(
    State(state): State<ApiState>,
    Path(agent): Path<String>,
) -> ApiResult<Created> {
    let id = state.store.resolve_agent(&agent)?;
    let key = state.store.revoke(&id, now_ms())?;
    state.relay.revoke(&id, key);
    state.relay.job_changed(0);
    Ok(Json(Created { ids: vec![] }))
}

async fn set_membership(
    State(state): State<ApiState>,
    Path(agent): Path<String>,
    Json(body): Json<SetMembership>,
) -> ApiResult<Created> {
    let id = state.store.resolve_agent(&agent)?;
    let (envelope, statement) = decode_envelope(&state, &body.envelope)?;
    let Statement::Membership(membership) = statement else {
        return Err(bad("envelope is not a membership"));
    };
    if membership.agent_id != id {
        return Err(bad("membership names another agent"));
    }
    if let Some(g) = membership
        .groups
        .iter()
        .find(|g| !herald_shared::valid_name(g))
    {
        return Err(bad(format!("invalid group name {g:?}")));
    }
    state
        .store
        .set_membership(&id, &membership.groups, &envelope)?;
    state.relay.membership_changed(&id);
    Ok(Json(Created { ids: vec![] }))
}

/// Why an order reaches nobody: a revoked agent is named as such.
pub(crate) fn no_agent(state: &ApiState, audience: &Audience) -> Result<ApiError, ApiError> {
    let reason = match audience {
        Audience::Agent(id) if state.store.agent_revoked(id)? => {
            format!("agent {id} is revoked; enroll the machine again to send it work")
        }
        other => format!("no active agent matches {other}"),
    };
    Ok(ApiError(StatusCode::NOT_FOUND, reason))
}

#[derive(Deserialize)]
struct JobsQuery {
    agent: Option<String>,
    /// Only jobs older than this one (paging: pass the last id of the previous page).
    before: Option<JobId>,
    limit: Option<u32>,
}

async fn list_jobs(
    State(state): State<ApiState>,
    Query(q): Query<JobsQuery>,
) -> ApiResult<Vec<JobInfo>> {
    let agent = match q.agent {
        Some(a) => Some(state.store.resolve_agent(&a)?),
        None => None,
    };
    let limit = q.limit.unwrap_or(100);
    if limit > MAX_LIST {
        return Err(bad(format!(
            "limit must be at most {MAX_LIST}; page with before=<the last id of the previous page>"
        )));
    }
    Ok(Json(state.store.jobs(agent.as_deref(), q.before, limit)?))
}

#[derive(Deserialize)]
struct JobQuery {
    /// Long poll: wait up to this long for the job to reach a final state.
    wait_ms: Option<u64>,
}

async fn show_job(
    State(state): State<ApiState>,
    Path(job): Path<JobId>,
    Query(q): Query<JobQuery>,
) -> ApiResult<JobInfo> {
    let mut events = state.relay.subscribe();
    let mut info = state.store.job(job)?;
    let wait = Duration::from_millis(q.wait_ms.unwrap_or(0)).min(MAX_WAIT);
    let deadline = tokio::time::Instant::now() + wait;
    while !info.is_final() {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            // Deadline passed, or the server is shutting down.
            Err(_) | Ok(Err(broadcast::error::RecvError::Closed)) => break,
            Ok(Ok(event)) if event.job_id != job && event.job_id != 0 => continue,
            // Our job changed, several did, or we lagged behind: read it again.
            Ok(_) => info = state.store.job(job)?,
        }
    }
    Ok(Json(info))
}

async fn create_jobs(
    State(state): State<ApiState>,
    Json(body): Json<CreateJobs>,
) -> ApiResult<Created> {
    let (envelope, order) = decode_order(&state, &body.envelope)?;
    if matches!(order.action, herald_shared::envelope::Action::Install(_)) {
        return Err(bad(
            "install orders go to /api/v1/installs or /api/v1/subscriptions",
        ));
    }
    if body.ttl_ms == 0 || body.ttl_ms > MAX_TTL_MS {
        return Err(bad("ttl must be between 1 ms and 30 days"));
    }
    let agents = state.store.expand(&order.audience)?;
    if agents.is_empty() {
        return Err(no_agent(&state, &order.audience)?);
    }
    let now = now_ms();
    let ids = state.store.create_jobs(
        &hex::encode(order.id),
        &envelope,
        &order.action,
        &agents.iter().map(|a| (a.clone(), now)).collect::<Vec<_>>(),
        None,
        body.ttl_ms,
        now,
    )?;
    match order.audience {
        // A group job must follow the membership that admits the agent: the link reads
        // both from the store, in that order. One agent's link reads the store too: one
        // query, and it sends whatever else is queued for the agent in job order.
        Audience::Group(_) | Audience::Agent(_) => {
            for agent in &agents {
                state.relay.poke(agent);
            }
        }
        // A fan-out to every agent: no store read per agent.
        Audience::All => {
            let open_timeout_ms = match &order.action {
                herald_shared::envelope::Action::Open(open) => Some(open.timeout_ms),
                _ => None,
            };
            let jobs: Vec<(String, i64)> = agents.into_iter().zip(ids.iter().copied()).collect();
            state.relay.push(&envelope, open_timeout_ms, jobs);
        }
    }
    state.scheduler.notify_one();
    Ok(Json(Created { ids }))
}

async fn create_schedule(
    State(state): State<ApiState>,
    Json(body): Json<CreateSchedule>,
) -> ApiResult<Created> {
    let (envelope, order) = decode_order(&state, &body.envelope)?;
    if matches!(order.action, herald_shared::envelope::Action::Install(_)) {
        return Err(bad(
            "installs are scheduled by publishing releases to subscriptions",
        ));
    }
    body.schedule
        .validate()
        .map_err(|e| bad(format!("invalid schedule: {e}")))?;
    if body.ttl_ms == 0 || body.ttl_ms > MAX_TTL_MS {
        return Err(bad("ttl must be between 1 ms and 30 days"));
    }
    if let Audience::Agent(id) = &order.audience {
        if !state.store.agent_active(id)? {
            return Err(no_agent(&state, &order.audience)?);
        }
    }
    let now = now_ms();
    let next = body.schedule.next_after(now - 1);
    let id = state.store.add_schedule(
        &hex::encode(order.id),
        &envelope,
        &order.action,
        &order.audience,
        &body.schedule,
        body.missed,
        body.splay_ms,
        body.ttl_ms,
        match order.repeat {
            Repeat::Standing { min_interval_ms } => min_interval_ms,
            Repeat::Once => 0,
        },
        next,
        now,
    )?;
    state.scheduler.notify_one();
    Ok(Json(Created { ids: vec![id] }))
}

async fn list_schedules(State(state): State<ApiState>) -> ApiResult<Vec<ScheduleInfo>> {
    Ok(Json(state.store.schedules()?))
}

async fn remove_schedule(State(state): State<ApiState>, Path(id): Path<i64>) -> ApiResult<Created> {
    state.store.remove_schedule(id)?;
    state.scheduler.notify_one();
    Ok(Json(Created { ids: vec![id] }))
}

pub(crate) async fn metrics(State(state): State<ApiState>) -> Response {
    metrics_response(&state.relay, &state.node)
}

/// The Prometheus text of every metric (admin API and the `[metrics]` listener).
pub fn metrics_response(relay: &Relay, node: &crate::cluster::Node) -> Response {
    match relay.metrics_text().map(|mut text| {
        node.render_metrics(&mut text);
        text
    }) {
        Ok(text) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => {
            tracing::warn!("cannot read metrics: {e}");
            ApiError::from(e).into_response()
        }
    }
}
