//! `/api/v1/catalog`: the operator publishes, lists and removes catalog entries.

use crate::api::{bad, decode_order, ApiResult, ApiState};
use crate::model::Created;
use crate::model::*;
use axum::extract::{Path, State};
use axum::Json;

/// `POST /api/v1/catalog`: publishes an operator-signed standing order as an entry.
pub(crate) async fn create_entry(
    State(state): State<ApiState>,
    Json(body): Json<CreateCatalogEntry>,
) -> ApiResult<Created> {
    if !herald_shared::valid_name(&body.name) {
        return Err(bad(format!("invalid entry name {:?}", body.name)));
    }
    let title = body.title.trim();
    if title.is_empty() || title.len() > 200 || body.description.len() > 4000 {
        return Err(bad(
            "a title of 1 to 200 characters and a description of at most 4000 are required",
        ));
    }
    let (envelope, order) = decode_order(&state, &body.envelope)?;
    let min_interval_ms = check_entry_order(&order).map_err(bad)?;
    let now = crate::now_ms();
    if order.not_after <= now {
        return Err(bad("the signed order has already expired"));
    }
    state.store.add_catalog_entry(
        &body.name,
        title,
        body.description.trim(),
        &envelope,
        &order,
        min_interval_ms,
        now,
    )?;
    Ok(Json(Created { ids: vec![] }))
}

/// `GET /api/v1/catalog`.
pub(crate) async fn list_entries(State(state): State<ApiState>) -> ApiResult<Vec<CatalogEntry>> {
    Ok(Json(state.store.catalog()?))
}

/// `DELETE /api/v1/catalog/{name}`: answers with the number of subscriptions removed.
pub(crate) async fn remove_entry(
    State(state): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<Created> {
    let removed = state.store.remove_catalog_entry(&name)?;
    state.scheduler.notify_one();
    Ok(Json(Created {
        ids: vec![removed as i64],
    }))
}
