//! Encryption endpoints: `keys/*`, `sendToDevice`, `room_keys/*`. The logic is in `crate::e2ee`.

use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::uia;
use crate::e2ee;
use crate::error::{ApiResult, Error};
use crate::http::extract::{Auth, Json, Path, Query};
use crate::state::AppState;
use crate::sync::token::SyncToken;

type JsonResult = ApiResult<axum::Json<Value>>;

pub async fn upload(State(state): State<AppState>, auth: Auth, Json(body): Json<Value>) -> JsonResult {
    Ok(axum::Json(e2ee::upload_keys(&state, &auth.user_id, &auth.device_id, &body).await?))
}

pub async fn query(State(state): State<AppState>, auth: Auth, Json(body): Json<Value>) -> JsonResult {
    Ok(axum::Json(e2ee::query_keys(&state, &auth.user_id, &body).await?))
}

pub async fn claim(State(state): State<AppState>, _auth: Auth, Json(body): Json<Value>) -> JsonResult {
    Ok(axum::Json(e2ee::claim_keys(&state, &body).await?))
}

#[derive(Deserialize)]
pub struct ChangesQuery {
    from: String,
    to: String,
}

pub async fn changes(State(state): State<AppState>, auth: Auth, Query(q): Query<ChangesQuery>) -> JsonResult {
    let from = SyncToken::parse(&q.from)?;
    let to = SyncToken::parse(&q.to)?;
    let (changed, left) = e2ee::key_changes(&state, &auth.user_id, &from, &to).await?;
    Ok(axum::Json(json!({ "changed": changed, "left": left })))
}

pub async fn device_signing_upload(
    State(state): State<AppState>,
    auth: Auth,
    line: uia::RequestLine,
    Json(body): Json<Value>,
) -> JsonResult {
    // Everything is checked (signatures verified) first; a first upload, or one that changes
    // nothing, needs no authentication; anything else does, bound to this very request.
    let upload = e2ee::prepare_signing_upload(&state, &auth.user_id, &body).await?;
    if upload.needs_auth {
        let binding = uia::RequestBinding::new(&line, &body);
        // Sessions from the OAuth 2.0 API approve the reset on the account page (`m.oauth`).
        let flows = if crate::oauth::base(&state).is_some()
            && crate::storage::oauth::session(&state.db, &auth.user_id, &auth.device_id).await?.is_some()
        {
            vec![vec![uia::OAUTH]]
        } else {
            uia::user_flows(&state, &auth.user_id).await?
        };
        uia::check_bound(&state, "device_signing_upload", &auth.user_id, &flows, body.get("auth"), binding).await?;
    }
    e2ee::store_signing_upload(&state, &auth.user_id, upload).await?;
    Ok(axum::Json(json!({})))
}

pub async fn signatures_upload(State(state): State<AppState>, auth: Auth, Json(body): Json<Value>) -> JsonResult {
    Ok(axum::Json(e2ee::upload_signatures(&state, &auth.user_id, &body).await?))
}

pub async fn send_to_device(
    State(state): State<AppState>,
    auth: Auth,
    Path((event_type, txn_id)): Path<(String, String)>,
    Json(body): Json<Value>,
) -> JsonResult {
    e2ee::send_to_device(&state, &auth.user_id, &auth.device_id, &event_type, &txn_id, &body).await?;
    Ok(axum::Json(json!({})))
}

// ---- key backup ----

pub async fn create_backup(State(state): State<AppState>, auth: Auth, Json(body): Json<Value>) -> JsonResult {
    Ok(axum::Json(e2ee::backup::create_version(&state, &auth.user_id, &body).await?))
}

pub async fn latest_backup(State(state): State<AppState>, auth: Auth) -> JsonResult {
    Ok(axum::Json(e2ee::backup::get_version(&state, &auth.user_id, None).await?))
}

pub async fn get_backup(State(state): State<AppState>, auth: Auth, Path(version): Path<String>) -> JsonResult {
    Ok(axum::Json(e2ee::backup::get_version(&state, &auth.user_id, Some(&version)).await?))
}

pub async fn put_backup(
    State(state): State<AppState>,
    auth: Auth,
    Path(version): Path<String>,
    Json(body): Json<Value>,
) -> JsonResult {
    e2ee::backup::update_version(&state, &auth.user_id, &version, &body).await?;
    Ok(axum::Json(json!({})))
}

pub async fn delete_backup(State(state): State<AppState>, auth: Auth, Path(version): Path<String>) -> JsonResult {
    e2ee::backup::delete_version(&state, &auth.user_id, &version).await?;
    Ok(axum::Json(json!({})))
}

#[derive(Deserialize)]
pub struct VersionQuery {
    version: Option<String>,
}

fn version_of(q: &VersionQuery) -> ApiResult<&str> {
    q.version.as_deref().ok_or_else(|| Error::missing_param("version is required"))
}

pub async fn get_all_keys(State(state): State<AppState>, auth: Auth, Query(q): Query<VersionQuery>) -> JsonResult {
    Ok(axum::Json(e2ee::backup::get_keys(&state, &auth.user_id, version_of(&q)?, None, None).await?))
}

pub async fn put_all_keys(
    State(state): State<AppState>,
    auth: Auth,
    Query(q): Query<VersionQuery>,
    Json(body): Json<Value>,
) -> JsonResult {
    Ok(axum::Json(e2ee::backup::put_keys(&state, &auth.user_id, version_of(&q)?, None, None, &body).await?))
}

pub async fn delete_all_keys(State(state): State<AppState>, auth: Auth, Query(q): Query<VersionQuery>) -> JsonResult {
    Ok(axum::Json(e2ee::backup::delete_keys(&state, &auth.user_id, version_of(&q)?, None, None).await?))
}

pub async fn get_room_keys(
    State(state): State<AppState>,
    auth: Auth,
    Path(room_id): Path<String>,
    Query(q): Query<VersionQuery>,
) -> JsonResult {
    Ok(axum::Json(e2ee::backup::get_keys(&state, &auth.user_id, version_of(&q)?, Some(&room_id), None).await?))
}

pub async fn put_room_keys(
    State(state): State<AppState>,
    auth: Auth,
    Path(room_id): Path<String>,
    Query(q): Query<VersionQuery>,
    Json(body): Json<Value>,
) -> JsonResult {
    Ok(axum::Json(e2ee::backup::put_keys(&state, &auth.user_id, version_of(&q)?, Some(&room_id), None, &body).await?))
}

pub async fn delete_room_keys(
    State(state): State<AppState>,
    auth: Auth,
    Path(room_id): Path<String>,
    Query(q): Query<VersionQuery>,
) -> JsonResult {
    Ok(axum::Json(e2ee::backup::delete_keys(&state, &auth.user_id, version_of(&q)?, Some(&room_id), None).await?))
}

pub async fn get_session_key(
    State(state): State<AppState>,
    auth: Auth,
    Path((room_id, session_id)): Path<(String, String)>,
    Query(q): Query<VersionQuery>,
) -> JsonResult {
    let v = version_of(&q)?;
    Ok(axum::Json(e2ee::backup::get_keys(&state, &auth.user_id, v, Some(&room_id), Some(&session_id)).await?))
}

pub async fn put_session_key(
    State(state): State<AppState>,
    auth: Auth,
    Path((room_id, session_id)): Path<(String, String)>,
    Query(q): Query<VersionQuery>,
    Json(body): Json<Value>,
) -> JsonResult {
    let v = version_of(&q)?;
    Ok(axum::Json(e2ee::backup::put_keys(&state, &auth.user_id, v, Some(&room_id), Some(&session_id), &body).await?))
}

pub async fn delete_session_key(
    State(state): State<AppState>,
    auth: Auth,
    Path((room_id, session_id)): Path<(String, String)>,
    Query(q): Query<VersionQuery>,
) -> JsonResult {
    let v = version_of(&q)?;
    Ok(axum::Json(e2ee::backup::delete_keys(&state, &auth.user_id, v, Some(&room_id), Some(&session_id)).await?))
}
