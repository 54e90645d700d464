//! The software-distribution part of the admin API: vendors, releases and their
//! artifacts, subscriptions, one-off installs and rollouts.
//!
//! Vendors authenticate with their own API token and may only register releases signed
//! by their delegated key and upload those releases' artifacts. Artifacts are served
//! without authentication by hash: agents verify every byte against signed metadata, and
//! packages are not secrets.

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use http_body_util::BodyExt;
use serde::Deserialize;
use sha2::Digest;
use tokio::io::AsyncWriteExt;

use herald_shared::envelope::{Action, Repeat, Statement};
use herald_shared::release::{self, check_pattern};

use crate::api::{
    bad, check_hash, decode_envelope, decode_order, decode_raw_envelope, ApiError, ApiResult,
    ApiState, Caller,
};
use crate::model::{
    CreateJobs, CreateRelease, CreateSubscription, CreateVendor, Created, InstallsCreated,
};
use crate::model::{ReleaseInfo, RolloutInfo, SubscriptionInfo, VendorInfo, Waves};
use crate::now_ms;
use crate::packages::rollout;

/// Directory (inside the data directory) holding artifacts, named by their SHA-256.
pub const ARTIFACT_DIR: &str = "artifacts";
/// Longest TTL for install jobs.
const MAX_TTL_MS: u64 = 30 * 24 * 3600 * 1000;

fn admin_only(caller: &Caller) -> Result<(), ApiError> {
    match caller {
        Caller::Admin(_) => Ok(()),
        Caller::Vendor(_) | Caller::Sender(_) => Err(ApiError(
            StatusCode::FORBIDDEN,
            "vendor tokens may only publish releases".into(),
        )),
    }
}

/// `POST /api/v1/vendors`.
pub(crate) async fn create_vendor(
    State(state): State<ApiState>,
    Json(body): Json<CreateVendor>,
) -> ApiResult<Created> {
    let (envelope, Statement::Delegation(grant)) = decode_envelope(&state, &body.envelope)? else {
        return Err(bad("envelope is not a delegation"));
    };
    if !herald_shared::valid_name(&grant.vendor) {
        return Err(bad(format!("invalid vendor name {:?}", grant.vendor)));
    }
    if grant.packages.is_empty() {
        return Err(bad("a delegation needs at least one package pattern"));
    }
    for pattern in &grant.packages {
        check_pattern(pattern).map_err(bad)?;
    }
    if state.operator_keys.contains(&grant.key) {
        return Err(bad("that is an operator key; vendors need their own key"));
    }
    check_hash("token_hash", &body.token_hash)?;
    state.store.add_vendor(
        &grant.vendor,
        &grant.key.to_hex(),
        &grant.packages,
        &envelope,
        &body.token_hash,
        now_ms(),
    )?;
    Ok(Json(Created { ids: vec![] }))
}

/// `GET /api/v1/vendors`.
pub(crate) async fn list_vendors(State(state): State<ApiState>) -> ApiResult<Vec<VendorInfo>> {
    Ok(Json(state.store.vendors()?))
}

/// `POST /api/v1/releases`: registers signed metadata; the artifact follows with `PUT
/// /api/v1/releases/{id}/artifact` unless the metadata names an external URL.
pub(crate) async fn create_release(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Json(body): Json<CreateRelease>,
) -> ApiResult<ReleaseInfo> {
    let envelope = decode_raw_envelope(&body.envelope)?;
    let (vendor, delegation) = if state.operator_keys.contains(&envelope.signer) {
        (None, None)
    } else {
        match state.store.vendor_by_key(&envelope.signer.to_hex())? {
            Some((name, delegation)) => (Some(name), Some(delegation)),
            None => {
                return Err(bad(
                    "release is signed by a key that is neither an operator's nor a registered vendor's",
                ))
            }
        }
    };
    if let (Caller::Vendor(me), Some(signer)) = (&caller, &vendor) {
        if me != signer {
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                format!("release is signed by vendor {signer}, not by you ({me})"),
            ));
        }
    }
    if let (Caller::Vendor(me), None) = (&caller, &vendor) {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            format!("vendor {me} cannot publish operator-signed releases"),
        ));
    }
    let metadata = release::verify(&envelope, delegation.as_ref(), &state.operator_keys)
        .map_err(|e| bad(e.to_string()))?;
    if let Some(url) = &metadata.url {
        check_download_url(url).map_err(bad)?;
    }
    if metadata.expires_at <= now_ms() {
        return Err(bad("release metadata is already expired"));
    }
    let info = state
        .store
        .add_release(&metadata, vendor.as_deref(), &envelope, now_ms())?;
    if info.state == "published" {
        published(&state, &info.package)?;
    }
    Ok(Json(info))
}

use herald_shared::url::check_download_url;

fn published(state: &ApiState, package: &str) -> Result<(), ApiError> {
    rollout::start_for_package(&state.store, package)?;
    state.rollouts.notify_one();
    Ok(())
}

#[derive(Deserialize)]
pub(crate) struct PackageQuery {
    package: Option<String>,
}

/// `GET /api/v1/releases`.
pub(crate) async fn list_releases(
    State(state): State<ApiState>,
    Query(q): Query<PackageQuery>,
) -> ApiResult<Vec<ReleaseInfo>> {
    Ok(Json(state.store.releases(q.package.as_deref())?))
}

/// `GET /api/v1/releases/{id}`.
pub(crate) async fn show_release(
    State(state): State<ApiState>,
    Path(id): Path<i64>,
) -> ApiResult<ReleaseInfo> {
    Ok(Json(state.store.release(id)?))
}

/// `PUT /api/v1/releases/{id}/artifact`: the artifact's bytes. Streamed to a temporary
/// file, hashed, cut off at the declared length, and only then put in place.
pub(crate) async fn upload_artifact(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<i64>,
    body: Body,
) -> ApiResult<ReleaseInfo> {
    let info = state.store.release(id)?;
    if let Caller::Vendor(me) = &caller {
        if info.vendor.as_deref() != Some(me.as_str()) {
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                format!("release {id} is not yours"),
            ));
        }
    }
    if info.state != "uploading" {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("release {id} is already {}", info.state),
        ));
    }
    tokio::fs::create_dir_all(&state.artifacts)
        .await
        .map_err(internal)?;
    let final_path = state.artifacts.join(&info.sha256);
    let temp = state.artifacts.join(format!(
        "{}.upload-{}",
        info.sha256,
        hex::encode(crate::random_bytes::<8>())
    ));
    let too_long = format!(
        "artifact is longer than the {} bytes its metadata declares",
        info.length
    );
    let outcome = receive(body, &temp, info.length, &too_long).await;
    let (length, hash) = match outcome {
        Ok(got) => got,
        Err(e) => {
            let _ = tokio::fs::remove_file(&temp).await;
            return Err(e);
        }
    };
    if length != info.length || hash != info.sha256 {
        let _ = tokio::fs::remove_file(&temp).await;
        return Err(bad(format!(
            "artifact does not match the signed metadata: got {length} bytes with SHA-256 {hash}, \
             expected {} bytes with {}",
            info.length, info.sha256
        )));
    }
    tokio::fs::rename(&temp, &final_path)
        .await
        .map_err(internal)?;
    state.store.publish_release(id, now_ms())?;
    published(&state, &info.package)?;
    Ok(Json(state.store.release(id)?))
}

/// Streams a request body to `temp` (synced), refusing it past `limit` bytes with
/// `too_long`. Returns its length and SHA-256 (hex).
pub(crate) async fn receive(
    body: Body,
    temp: &std::path::Path,
    limit: u64,
    too_long: &str,
) -> Result<(u64, String), ApiError> {
    let mut file = tokio::fs::File::create(temp).await.map_err(internal)?;
    let mut hasher = sha2::Sha256::new();
    let mut length: u64 = 0;
    let mut body = body;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| bad(format!("upload interrupted: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        length += data.len() as u64;
        if length > limit {
            return Err(ApiError(
                StatusCode::PAYLOAD_TOO_LARGE,
                too_long.to_string(),
            ));
        }
        hasher.update(&data);
        file.write_all(&data).await.map_err(internal)?;
    }
    file.sync_all().await.map_err(internal)?;
    Ok((length, hex::encode(hasher.finalize())))
}

pub(crate) fn internal(e: std::io::Error) -> ApiError {
    tracing::error!("artifact storage: {e}");
    ApiError(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("cannot store the artifact: {e}"),
    )
}

/// `GET /api/v1/artifacts/{sha256}`: the artifact, with range requests.
pub(crate) async fn download_artifact(
    State(state): State<ApiState>,
    Path(sha256): Path<String>,
    request: Request,
) -> Response {
    if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return bad("artifacts are named by their SHA-256 in hex").into_response();
    }
    let path = state.artifacts.join(sha256.to_ascii_lowercase());
    if !path.is_file() {
        return ApiError(StatusCode::NOT_FOUND, "no such artifact".into()).into_response();
    }
    use tower::ServiceExt;
    let Ok(response) = tower_http::services::ServeFile::new(path)
        .oneshot(request)
        .await;
    response.map(Body::new)
}

/// `POST /api/v1/subscriptions`.
pub(crate) async fn create_subscription(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Json(body): Json<CreateSubscription>,
) -> ApiResult<Created> {
    admin_only(&caller)?;
    let (envelope, order) = decode_order(&state, &body.envelope)?;
    let Action::Install(spec) = &order.action else {
        return Err(bad("a subscription's order must be an install"));
    };
    if spec.version.is_some() || !matches!(order.repeat, Repeat::Standing { .. }) {
        return Err(bad(
            "a subscription's order must be standing and name no version",
        ));
    }
    let waves: Waves = body.waves.parse().map_err(bad)?;
    if !(0.0..=1.0).contains(&body.max_failures) {
        return Err(bad("max_failures must be between 0 and 1"));
    }
    if body.ttl_ms == 0 || body.ttl_ms > MAX_TTL_MS {
        return Err(bad("ttl must be between 1 ms and 30 days"));
    }
    let id = state.store.add_subscription(
        &hex::encode(order.id),
        &envelope,
        &order.action,
        &spec.package,
        &order.audience,
        &waves,
        body.max_failures,
        body.ttl_ms,
        now_ms(),
    )?;
    published(&state, &spec.package)?;
    Ok(Json(Created { ids: vec![id] }))
}

/// `GET /api/v1/subscriptions`.
pub(crate) async fn list_subscriptions(
    State(state): State<ApiState>,
    Query(q): Query<PackageQuery>,
) -> ApiResult<Vec<SubscriptionInfo>> {
    Ok(Json(state.store.subscriptions(q.package.as_deref())?))
}

/// `DELETE /api/v1/subscriptions/{id}`.
pub(crate) async fn remove_subscription(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<i64>,
) -> ApiResult<Created> {
    admin_only(&caller)?;
    state.store.remove_subscription(id, now_ms())?;
    Ok(Json(Created { ids: vec![id] }))
}

/// `POST /api/v1/installs`: a one-off install of one version; each agent gets the
/// release for its platform.
pub(crate) async fn create_installs(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Json(body): Json<CreateJobs>,
) -> ApiResult<InstallsCreated> {
    admin_only(&caller)?;
    let (envelope, order) = decode_order(&state, &body.envelope)?;
    let Action::Install(spec) = &order.action else {
        return Err(bad("not an install order"));
    };
    let Some(version) = &spec.version else {
        return Err(bad("a one-off install names a version"));
    };
    if body.ttl_ms == 0 || body.ttl_ms > MAX_TTL_MS {
        return Err(bad("ttl must be between 1 ms and 30 days"));
    }
    let agents = state.store.expand(&order.audience)?;
    let mut targets = Vec::new();
    let mut skipped = Vec::new();
    for (agent, platform) in state.store.platforms(&agents)? {
        match state.store.release_for(&spec.package, version, &platform)? {
            Some(release) => targets.push((agent, release.id)),
            None => skipped.push(agent),
        }
    }
    if targets.is_empty() {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!(
                "no published release of {} {version} for the platforms of {}",
                spec.package, order.audience
            ),
        ));
    }
    let now = now_ms();
    let ids = state.store.create_install_jobs(
        &hex::encode(order.id),
        &envelope,
        &order.action,
        &targets,
        body.ttl_ms,
        now,
    )?;
    for (agent, _) in &targets {
        state.relay.poke(agent);
    }
    state.scheduler.notify_one();
    Ok(Json(InstallsCreated { ids, skipped }))
}

/// `GET /api/v1/rollouts`.
pub(crate) async fn list_rollouts(
    State(state): State<ApiState>,
    Query(q): Query<PackageQuery>,
) -> ApiResult<Vec<RolloutInfo>> {
    Ok(Json(state.store.rollouts(q.package.as_deref())?))
}

/// `GET /api/v1/rollouts/{id}`.
pub(crate) async fn show_rollout(
    State(state): State<ApiState>,
    Path(id): Path<i64>,
) -> ApiResult<RolloutInfo> {
    Ok(Json(state.store.rollout(id)?))
}

/// `POST /api/v1/rollouts/{id}/{pause|resume}`.
pub(crate) async fn control_rollout(
    State(state): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path((id, verb)): Path<(i64, String)>,
) -> ApiResult<RolloutInfo> {
    admin_only(&caller)?;
    let pause = match verb.as_str() {
        "pause" => true,
        "resume" => false,
        other => return Err(bad(format!("unknown rollout action {other:?}"))),
    };
    state.store.set_rollout_state(id, pause, now_ms())?;
    state.rollouts.notify_one();
    Ok(Json(state.store.rollout(id)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn download_urls_must_be_https_or_loopback_http() {
        assert!(check_download_url("https://cdn.example/a.tgz").is_ok());
        assert!(check_download_url("http://127.0.0.1:8080/a").is_ok());
        assert!(check_download_url("http://[::1]:8080/a").is_ok());
        assert!(check_download_url("http://localhost/a").is_ok());
        assert!(check_download_url("http://198.18.0.1/a").is_err());
        assert!(check_download_url("http://127.0.0.1.evil/a").is_err());
        assert!(check_download_url("ftp://127.0.0.1/a").is_err());
    }
}
