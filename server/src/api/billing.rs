//! `/api/v1/usage`, `/api/v1/billing/...` and `/api/v1/stats`: usage ingestion, price
//! plans and providers' prices, monthly runs and closing, invoices, exports and the
//! daily statistics. The rules are in `model/billing.rs`, the runs in `billing/`.

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use crate::api::{bad, ApiError, ApiResult, ApiState};
use crate::billing::{BillingError, ExportFormat};
use crate::model::billing::{
    check_account, parse_month, BillingMonth, IngestReport, NewUsage, Plans, PlansText,
    ProviderPrice, RunReport, StatPoint, StatsBy,
};
use crate::model::Created;
use herald_shared::Millis;

/// The most events one `POST /api/v1/usage` takes (the body limit allows about this).
pub const MAX_USAGE_BATCH: usize = 20_000;

impl From<BillingError> for ApiError {
    fn from(e: BillingError) -> Self {
        match e {
            BillingError::Month(m) => bad(m),
            BillingError::NoPlans => ApiError(StatusCode::CONFLICT, e.to_string()),
            BillingError::Store(e) => e.into(),
            BillingError::Plans(_) => ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }
}

/// Reads events from a JSON array or from JSON lines (one event per line); the error
/// names the line or index of the first bad event.
pub fn parse_usage(body: &str) -> Result<Vec<NewUsage>, String> {
    let trimmed = body.trim_start();
    let events: Vec<NewUsage> = if trimmed.starts_with('[') {
        serde_json::from_str(trimmed).map_err(|e| format!("usage events: {e}"))?
    } else {
        body.lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(n, line)| {
                serde_json::from_str(line).map_err(|e| format!("usage events, line {}: {e}", n + 1))
            })
            .collect::<Result<_, _>>()?
    };
    if events.is_empty() {
        return Err("no usage events: send a JSON array or JSON lines of events".into());
    }
    if events.len() > MAX_USAGE_BATCH {
        return Err(format!(
            "{} events in one request; send at most {MAX_USAGE_BATCH}",
            events.len()
        ));
    }
    for (i, event) in events.iter().enumerate() {
        event
            .check()
            .map_err(|e| format!("usage event {}: {e}", i + 1))?;
    }
    Ok(events)
}

/// `POST /api/v1/usage`: stores events (idempotent by key) and answers after the
/// commit.
pub(crate) async fn ingest(State(state): State<ApiState>, body: String) -> ApiResult<IngestReport> {
    let events = parse_usage(&body).map_err(bad)?;
    Ok(Json(state.store.ingest_usage(&events, crate::now_ms())?))
}

/// The plans in force (`GET /api/v1/billing/plans`).
#[derive(Debug, Serialize, Deserialize)]
pub struct PlansInForce {
    /// The file as set.
    pub toml: String,
    /// When it was set.
    pub set_at: Millis,
    /// As read.
    pub plans: Plans,
}

/// `GET /api/v1/billing/plans`.
pub(crate) async fn show_plans(State(state): State<ApiState>) -> ApiResult<PlansInForce> {
    let (toml, set_at) = state
        .store
        .plans_text()?
        .ok_or_else(|| ApiError::from(BillingError::NoPlans))?;
    let plans = Plans::parse(&toml).map_err(|e| ApiError::from(BillingError::Plans(e)))?;
    Ok(Json(PlansInForce {
        toml,
        set_at,
        plans,
    }))
}

/// `PUT /api/v1/billing/plans`: checks and stores a plans file.
pub(crate) async fn set_plans(
    State(state): State<ApiState>,
    Json(body): Json<PlansText>,
) -> ApiResult<Created> {
    Plans::parse(&body.toml).map_err(bad)?;
    state.store.set_plans(&body.toml, crate::now_ms())?;
    Ok(Json(Created { ids: vec![] }))
}

/// `GET /api/v1/billing/prices`.
pub(crate) async fn list_prices(State(state): State<ApiState>) -> ApiResult<Vec<ProviderPrice>> {
    Ok(Json(state.store.provider_prices()?))
}

/// `POST /api/v1/billing/prices`: sets a provider's price for a meter.
pub(crate) async fn set_price(
    State(state): State<ApiState>,
    Json(body): Json<ProviderPrice>,
) -> ApiResult<Created> {
    body.check().map_err(bad)?;
    state.store.set_provider_price(&body, crate::now_ms())?;
    Ok(Json(Created { ids: vec![] }))
}

/// `POST /api/v1/billing/runs`: meters and rates a month.
pub(crate) async fn run(
    State(state): State<ApiState>,
    Json(body): Json<BillingMonth>,
) -> ApiResult<RunReport> {
    Ok(Json(crate::billing::run_month(
        &state.store,
        &body.month,
        crate::now_ms(),
    )?))
}

/// `POST /api/v1/billing/close`: rates a month a last time and closes it.
pub(crate) async fn close(
    State(state): State<ApiState>,
    Json(body): Json<BillingMonth>,
) -> ApiResult<RunReport> {
    Ok(Json(crate::billing::close_month(
        &state.store,
        &body.month,
        crate::now_ms(),
    )?))
}

/// Filters of `GET /api/v1/billing/invoices`.
#[derive(Debug, Deserialize)]
pub(crate) struct InvoiceQuery {
    account: Option<String>,
    month: Option<String>,
}

/// `GET /api/v1/billing/invoices`.
pub(crate) async fn invoices(
    State(state): State<ApiState>,
    Query(query): Query<InvoiceQuery>,
) -> ApiResult<Vec<crate::model::billing::Invoice>> {
    if let Some(month) = &query.month {
        parse_month(month).map_err(bad)?;
    }
    if let Some(account) = &query.account {
        check_account(account).map_err(bad)?;
    }
    Ok(Json(state.store.invoices(
        query.account.as_deref(),
        query.month.as_deref(),
    )?))
}

/// Parameters of `GET /api/v1/billing/export`.
#[derive(Debug, Deserialize)]
pub(crate) struct ExportQuery {
    month: String,
    format: String,
}

/// `GET /api/v1/billing/export?month=YYYY-MM&format=csv|json|cloudevents`.
pub(crate) async fn export(
    State(state): State<ApiState>,
    Query(query): Query<ExportQuery>,
) -> Result<Response, ApiError> {
    let format = ExportFormat::parse(&query.format).ok_or_else(|| {
        bad(format!(
            "unknown export format {:?}: use csv, json or cloudevents",
            query.format
        ))
    })?;
    let text = crate::billing::export(&state.store, &query.month, format)?;
    Ok(([(header::CONTENT_TYPE, format.content_type())], text).into_response())
}

/// Parameters of `GET /api/v1/stats`.
#[derive(Debug, Deserialize)]
pub(crate) struct StatsQuery {
    by: Option<String>,
    since: Option<Millis>,
}

/// `GET /api/v1/stats?by=account|club|service|sender&since=MS`.
pub(crate) async fn stats(
    State(state): State<ApiState>,
    Query(query): Query<StatsQuery>,
) -> ApiResult<Vec<StatPoint>> {
    let by = match query.by.as_deref() {
        None => StatsBy::Account,
        Some(text) => StatsBy::parse(text).ok_or_else(|| {
            bad(format!(
                "unknown grouping {text:?}: use account, club, service or sender"
            ))
        })?,
    };
    Ok(Json(state.store.stats(by, query.since.unwrap_or(0))?))
}
