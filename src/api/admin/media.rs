//! Media administration, at Synapse's admin API paths: delete a media item, quarantine and
//! release it, purge the remote media cache, list a user's uploads, show one item.

use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};

use super::AdminAuth;
use crate::error::{ApiResult, Error};
use crate::http::extract::{Path, Query};
use crate::media;
use crate::state::AppState;
use crate::storage::media::MediaRow;
use crate::storage::{self, now_ms};

fn describe(r: &MediaRow) -> Value {
    json!({
        "media_id": r.media_id,
        "media_type": r.content_type,
        "media_length": r.size,
        "upload_name": r.upload_name,
        "created_ts": r.created_ts,
        "last_access_ts": r.last_access_ts,
        "quarantined_by": r.quarantined_by,
        "safe_from_quarantine": false,
        "user_id": r.uploader,
        "sha256": r.sha256.as_deref().map(hex::encode),
    })
}

/// `GET /_synapse/admin/v1/media/{server_name}/{media_id}`
pub async fn info(
    State(state): State<AppState>,
    _: AdminAuth,
    Path((server_name, media_id)): Path<(String, String)>,
) -> ApiResult<axum::Json<Value>> {
    let row = storage::media::get(&state.db, &server_name, &media_id)
        .await?
        .filter(|r| r.storage_key.is_some())
        .ok_or_else(|| Error::not_found("Unknown media"))?;
    Ok(axum::Json(json!({ "media_info": describe(&row) })))
}

/// `DELETE /_synapse/admin/v1/media/{server_name}/{media_id}`
pub async fn delete(
    State(state): State<AppState>,
    admin: AdminAuth,
    Path((server_name, media_id)): Path<(String, String)>,
) -> ApiResult<axum::Json<Value>> {
    if !media::delete(&state, &server_name, &media_id).await? {
        return Err(Error::not_found("Unknown media"));
    }
    tracing::info!(admin = %admin.0.user_id, %server_name, %media_id, "media deleted by an admin");
    Ok(axum::Json(json!({ "deleted_media": [media_id], "total": 1 })))
}

async fn set_quarantine(state: &AppState, server_name: &str, media_id: &str, by: Option<&str>) -> ApiResult<()> {
    if !storage::media::set_quarantine(&state.db, server_name, media_id, by, now_ms()).await? {
        return Err(Error::not_found("Unknown media"));
    }
    state.media.thumbnails.forget(server_name, media_id).await;
    Ok(())
}

/// `POST /_synapse/admin/v1/media/quarantine/{server_name}/{media_id}`: served as 404 from now on.
pub async fn quarantine(
    State(state): State<AppState>,
    admin: AdminAuth,
    Path((server_name, media_id)): Path<(String, String)>,
) -> ApiResult<axum::Json<Value>> {
    set_quarantine(&state, &server_name, &media_id, Some(&admin.0.user_id)).await?;
    tracing::info!(admin = %admin.0.user_id, %server_name, %media_id, "media quarantined");
    Ok(axum::Json(json!({})))
}

/// `POST /_synapse/admin/v1/media/unquarantine/{server_name}/{media_id}`
pub async fn unquarantine(
    State(state): State<AppState>,
    _: AdminAuth,
    Path((server_name, media_id)): Path<(String, String)>,
) -> ApiResult<axum::Json<Value>> {
    set_quarantine(&state, &server_name, &media_id, None).await?;
    Ok(axum::Json(json!({})))
}

#[derive(Deserialize)]
pub struct PurgeQuery {
    before_ts: i64,
}

/// `POST /_synapse/admin/v1/purge_media_cache?before_ts=<ms>`: deletes cached remote media (and
/// URL preview images) not accessed since then.
pub async fn purge_cache(
    State(state): State<AppState>,
    _: AdminAuth,
    Query(q): Query<PurgeQuery>,
) -> ApiResult<axum::Json<Value>> {
    if q.before_ts < 0 {
        return Err(Error::invalid_param("before_ts must be a timestamp in milliseconds"));
    }
    let deleted = media::purge_cache(&state, q.before_ts).await?;
    Ok(axum::Json(json!({ "deleted": deleted })))
}

#[derive(Deserialize)]
pub struct ListQuery {
    from: Option<i64>,
    limit: Option<i64>,
    order_by: Option<String>,
    dir: Option<String>,
}

/// The page of a user's media that `from`, `limit`, `order_by` and `dir` select, and the total.
async fn user_media_page(state: &AppState, user_id: &str, q: &ListQuery) -> ApiResult<(Vec<MediaRow>, i64, i64)> {
    let from = q.from.unwrap_or(0);
    let limit = q.limit.unwrap_or(100);
    if from < 0 || !(1..=1000).contains(&limit) {
        return Err(Error::invalid_param("from must be >= 0 and limit between 1 and 1000"));
    }
    let ascending = match q.dir.as_deref() {
        None | Some("f") => true,
        Some("b") => false,
        Some(_) => return Err(Error::invalid_param("dir must be f or b")),
    };
    let order_by = q.order_by.as_deref().unwrap_or("created_ts");
    let (rows, total) = storage::media::list_by_uploader(&state.db, user_id, from, limit, order_by, ascending).await?;
    Ok((rows, total, from))
}

/// `GET /_synapse/admin/v1/users/{user_id}/media`
pub async fn list_user_media(
    State(state): State<AppState>,
    _: AdminAuth,
    Path(user_id): Path<String>,
    Query(q): Query<ListQuery>,
) -> ApiResult<axum::Json<Value>> {
    let (rows, total, from) = user_media_page(&state, &user_id, &q).await?;
    let mut resp = json!({ "media": rows.iter().map(describe).collect::<Vec<_>>(), "total": total });
    if from + (rows.len() as i64) < total {
        resp["next_token"] = json!(from + rows.len() as i64);
    }
    Ok(axum::Json(resp))
}

/// `DELETE /_synapse/admin/v1/users/{user_id}/media`: deletes the page of the user's media that
/// the same parameters as the listing select (by default their 100 oldest uploads).
pub async fn delete_user_media(
    State(state): State<AppState>,
    admin: AdminAuth,
    Path(user_id): Path<String>,
    Query(q): Query<ListQuery>,
) -> ApiResult<axum::Json<Value>> {
    let (rows, _, _) = user_media_page(&state, &user_id, &q).await?;
    let mut deleted = Vec::new();
    for r in rows {
        if media::delete(&state, &r.server_name, &r.media_id).await? {
            deleted.push(r.media_id);
        }
    }
    tracing::info!(admin = %admin.0.user_id, %user_id, count = deleted.len(), "user media deleted by an admin");
    Ok(axum::Json(json!({ "total": deleted.len(), "deleted_media": deleted })))
}
