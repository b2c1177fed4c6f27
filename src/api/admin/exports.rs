//! Per-user exports (records, issue 19), in the style of Synapse's admin API:
//!
//! - `POST /_synapse/admin/v1/users/{userId}/export` starts a background export:
//!   `{"export_id": ...}`;
//! - `GET /_synapse/admin/v1/users/{userId}/export/{exportId}`: its status and progress;
//! - `GET /_synapse/admin/v1/users/{userId}/export/{exportId}/download`: the zip, once done.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use serde_json::{Value, json};

use super::AdminAuth;
use crate::error::{ApiResult, Error};
use crate::http::extract::Path;
use crate::media::store::{FsStore, MediaStore};
use crate::records::export::{ExportError, check_local_user};
use crate::records::{jobs, slug};
use crate::state::AppState;
use crate::storage;
use crate::storage::records::ExportRow;

/// The local user of the path: 400 for an invalid or remote ID, 404 if unknown.
async fn local_user(state: &AppState, user_id: &str) -> ApiResult<()> {
    match check_local_user(state, user_id).await {
        Ok(_) => Ok(()),
        Err(ExportError::InvalidUser(_)) => Err(Error::invalid_param("Invalid user ID")),
        Err(ExportError::RemoteUser(..)) => Err(Error::invalid_param("Only local users can be exported")),
        Err(ExportError::UnknownUser(_)) => Err(Error::not_found("User not found")),
        Err(ExportError::Database(e)) => Err(e.into()),
        Err(ExportError::Api(e)) => Err(e),
        Err(e) => Err(anyhow::anyhow!(e).into()),
    }
}

/// `POST /_synapse/admin/v1/users/{userId}/export`
pub async fn start(
    State(state): State<AppState>,
    admin: AdminAuth,
    Path(user_id): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    local_user(&state, &user_id).await?;
    let export_id = jobs::start(&state, &user_id, &admin.0.user_id).await?;
    tracing::info!(admin = %admin.0.user_id, %user_id, %export_id, "user export requested");
    Ok(axum::Json(json!({ "export_id": export_id })))
}

async fn job(state: &AppState, user_id: &str, export_id: &str) -> ApiResult<ExportRow> {
    storage::records::get_export(&state.db, export_id)
        .await?
        .filter(|r| r.user_id == user_id)
        .ok_or_else(|| Error::not_found("Unknown export"))
}

fn describe(r: &ExportRow) -> Value {
    let mut v = json!({
        "export_id": r.export_id,
        "user_id": r.user_id,
        "requested_by": r.requested_by,
        "status": r.status,
        "created_ts": r.created_ts,
        "started_ts": r.started_ts,
        "finished_ts": r.finished_ts,
        "expires_ts": r.expires_ts,
        "progress": r.counts(),
    });
    if let Some(e) = &r.error {
        v["error"] = json!(e);
    }
    if r.status == "done" {
        v["size_bytes"] = json!(r.size_bytes);
    }
    v
}

/// `GET /_synapse/admin/v1/users/{userId}/export/{exportId}`
pub async fn status(
    State(state): State<AppState>,
    _: AdminAuth,
    Path((user_id, export_id)): Path<(String, String)>,
) -> ApiResult<axum::Json<Value>> {
    Ok(axum::Json(describe(&job(&state, &user_id, &export_id).await?)))
}

/// `GET /_synapse/admin/v1/users/{userId}/export/{exportId}/download`
pub async fn download(
    State(state): State<AppState>,
    admin: AdminAuth,
    Path((user_id, export_id)): Path<(String, String)>,
) -> ApiResult<Response> {
    let row = job(&state, &user_id, &export_id).await?;
    match row.status.as_str() {
        "done" => {}
        "expired" => return Err(Error::not_found("This export has expired and its archive was deleted")),
        s => return Err(Error::not_found(format!("This export is not finished (status: {s})"))),
    }
    let name = row.file_name.clone().unwrap_or_else(|| jobs::file_name(&export_id));
    if name.contains(['/', '\\']) || name.starts_with('.') {
        return Err(Error::internal());
    }
    let store = FsStore::new(jobs::export_dir(&state));
    let Some(stream) = store.get(&name, None).await? else {
        tracing::error!(%export_id, "export archive missing (deleted, or written by an instance without shared storage)");
        return Err(Error::not_found("The export's archive is missing from this server's export directory"));
    };
    tracing::info!(admin = %admin.0.user_id, %user_id, %export_id, "user export downloaded");
    let localpart = user_id.trim_start_matches('@').split(':').next().unwrap_or("");
    let day = crate::records::utc_iso(row.finished_ts.unwrap_or(row.created_ts));
    let file = format!("parvis-export-{}-{}.zip", slug(localpart, 64), day.get(..10).unwrap_or("").replace('-', ""));
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/zip"));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{file}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    if let Some(size) = row.size_bytes.and_then(|s| u64::try_from(s).ok()) {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    Ok(resp)
}
