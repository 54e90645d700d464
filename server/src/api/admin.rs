//! Admin tokens with scopes, and the audit log.

use axum::extract::{Path, Query, State};
use serde::Deserialize;

use crate::api::{bad, check_hash, ApiResult, ApiState};
use crate::model::{check_token_name, AdminTokenInfo, AuditEntry, AuditVerdict, CreateAdminToken};
use crate::now_ms;
use crate::store::MAX_AUDIT_LIST;

/// `GET /api/v1/admin-tokens`.
pub(crate) async fn list_admin_tokens(
    State(state): State<ApiState>,
) -> ApiResult<Vec<AdminTokenInfo>> {
    Ok(axum::Json(state.store.admin_tokens()?))
}

/// `POST /api/v1/admin-tokens`: the client made the secret; only its hash comes here.
pub(crate) async fn create_admin_token(
    State(state): State<ApiState>,
    axum::Json(body): axum::Json<CreateAdminToken>,
) -> ApiResult<AdminTokenInfo> {
    check_hash("secret_hash", &body.secret_hash)?;
    check_token_name(&body.name).map_err(bad)?;
    let now = now_ms();
    if body.expires_at.is_some_and(|at| at <= now) {
        return Err(bad("token would already be expired"));
    }
    let id = state.store.add_admin_token(
        &body.secret_hash.to_ascii_lowercase(),
        &body.name,
        body.scope,
        body.expires_at,
        now,
    )?;
    Ok(axum::Json(AdminTokenInfo {
        id,
        name: body.name,
        scope: body.scope,
        created_at: now,
        expires_at: body.expires_at,
        revoked_at: None,
    }))
}

/// `DELETE /api/v1/admin-tokens/{id}`.
pub(crate) async fn revoke_admin_token(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<AdminTokenInfo> {
    Ok(axum::Json(state.store.revoke_admin_token(&id, now_ms())?))
}

/// Query of `GET /api/v1/audit`.
#[derive(Debug, Deserialize)]
pub(crate) struct AuditQuery {
    /// Entries at or after this time (ms since the epoch).
    since: Option<i64>,
    /// Only this actor (`token:ID`, `user:LOGIN`, ...).
    actor: Option<String>,
    /// Entries after this sequence number (paging).
    #[serde(default)]
    after: i64,
    /// At most this many (default and most: 10,000).
    limit: Option<u32>,
}

/// `GET /api/v1/audit`.
pub(crate) async fn list_audit(
    State(state): State<ApiState>,
    Query(query): Query<AuditQuery>,
) -> ApiResult<Vec<AuditEntry>> {
    if query.limit == Some(0) {
        return Err(bad("limit must be at least 1"));
    }
    Ok(axum::Json(state.store.audit_entries(
        query.since,
        query.actor.as_deref().filter(|a| !a.is_empty()),
        query.after,
        query.limit.unwrap_or(MAX_AUDIT_LIST),
    )?))
}

/// `GET /api/v1/audit/verify`.
pub(crate) async fn verify_audit(State(state): State<ApiState>) -> ApiResult<AuditVerdict> {
    Ok(axum::Json(state.store.audit_verify()?))
}
