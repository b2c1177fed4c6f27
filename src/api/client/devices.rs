//! Device management. Deleting devices requires user-interactive auth.

use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::{self, uia};
use crate::error::{ApiResult, Error};
use crate::http::extract::{Auth, Json, Path};
use crate::state::AppState;
use crate::storage;

pub async fn list(State(state): State<AppState>, auth: Auth) -> ApiResult<axum::Json<Value>> {
    let devices = storage::devices::list(&state.db, &auth.user_id).await?;
    Ok(axum::Json(json!({ "devices": devices.into_iter().map(|d| device_json(&auth.user_id, d)).collect::<Vec<_>>() })))
}

fn device_json(user_id: &str, d: storage::devices::DeviceRow) -> Value {
    let mut v = json!({ "device_id": d.device_id, "user_id": user_id });
    // Absent fields are omitted rather than null, as clients expect.
    if let Some(n) = d.display_name {
        v["display_name"] = json!(n);
    }
    if let Some(ip) = d.last_seen_ip {
        v["last_seen_ip"] = json!(ip);
    }
    if let Some(ts) = d.last_seen_ts {
        v["last_seen_ts"] = json!(ts);
    }
    v
}

pub async fn get(
    State(state): State<AppState>,
    auth: Auth,
    Path(device_id): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    let d = storage::devices::get(&state.db, &auth.user_id, &device_id)
        .await?
        .ok_or_else(|| Error::not_found("No such device"))?;
    Ok(axum::Json(device_json(&auth.user_id, d)))
}

#[derive(Deserialize)]
pub struct RenameBody {
    display_name: Option<String>,
}

pub async fn rename(
    State(state): State<AppState>,
    auth: Auth,
    Path(device_id): Path<String>,
    Json(body): Json<RenameBody>,
) -> ApiResult<axum::Json<Value>> {
    if body.display_name.as_ref().is_some_and(|n| n.len() > 1024) {
        return Err(Error::invalid_param("display_name is longer than 1024 bytes"));
    }
    if !storage::devices::rename(&state.db, &auth.user_id, &device_id, body.display_name.as_deref()).await? {
        return Err(Error::not_found("No such device"));
    }
    crate::e2ee::devices_changed(&state, &auth.user_id).await?;
    Ok(axum::Json(json!({})))
}

#[derive(Deserialize)]
pub struct DeleteBody {
    auth: Option<Value>,
}

pub async fn delete(
    State(state): State<AppState>,
    auth: Auth,
    Path(device_id): Path<String>,
    line: uia::RequestLine,
    Json(raw): Json<Value>,
) -> ApiResult<axum::Json<Value>> {
    let body: DeleteBody = uia::parse_body(&raw)?;
    let binding = uia::RequestBinding::new(&line, &raw);
    delete_with_uia(&state, &auth, vec![device_id], body.auth.as_ref(), binding).await
}

#[derive(Deserialize)]
pub struct DeleteManyBody {
    devices: Vec<String>,
    auth: Option<Value>,
}

pub async fn delete_many(
    State(state): State<AppState>,
    auth: Auth,
    line: uia::RequestLine,
    Json(raw): Json<Value>,
) -> ApiResult<axum::Json<Value>> {
    let body: DeleteManyBody = uia::parse_body(&raw)?;
    if body.devices.len() > 1000 {
        return Err(Error::invalid_param("At most 1000 devices at once"));
    }
    let binding = uia::RequestBinding::new(&line, &raw);
    delete_with_uia(&state, &auth, body.devices, body.auth.as_ref(), binding).await
}

/// UIA bound to the request: a session started for deleting some devices cannot complete the
/// deletion of others.
async fn delete_with_uia(
    state: &AppState,
    auth: &Auth,
    devices: Vec<String>,
    uia_auth: Option<&Value>,
    binding: uia::RequestBinding,
) -> ApiResult<axum::Json<Value>> {
    let flows = uia::user_flows(state, &auth.user_id).await?;
    uia::check_bound(state, "delete_devices", &auth.user_id, &flows, uia_auth, binding).await?;
    // Deleting a device that does not exist is not an error (the outcome is the same).
    auth::delete_devices(state, &auth.user_id, &devices).await?;
    Ok(axum::Json(json!({})))
}
