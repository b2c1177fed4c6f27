//! Presence: `GET/PUT /presence/{userId}/status`. Large deployments often disable presence
//! (`presence.enabled = false`); the endpoints then say so with 403 rather than pretend.

use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::{ApiResult, Error};
use crate::http::extract::{Auth, Json, Path};
use crate::state::AppState;
use crate::storage::{self, now_ms};

/// Activity within this window counts as "currently active".
const CURRENTLY_ACTIVE_MS: i64 = 5 * 60 * 1000;

fn ensure_enabled(state: &AppState) -> ApiResult<()> {
    if !state.config.presence.enabled {
        return Err(Error::forbidden("Presence is disabled on this server"));
    }
    Ok(())
}

#[derive(Deserialize)]
pub struct SetPresence {
    presence: String,
    status_msg: Option<String>,
}

pub async fn set(
    State(state): State<AppState>,
    auth: Auth,
    Path(user_id): Path<String>,
    Json(body): Json<SetPresence>,
) -> ApiResult<axum::Json<Value>> {
    ensure_enabled(&state)?;
    if *auth.user_id != *user_id {
        return Err(Error::forbidden("You cannot set the presence of another user"));
    }
    if !["online", "unavailable", "offline"].contains(&body.presence.as_str()) {
        return Err(Error::invalid_param("presence must be online, unavailable or offline"));
    }
    if body.status_msg.as_ref().is_some_and(|m| m.len() > 1024) {
        return Err(Error::invalid_param("status_msg is longer than 1024 bytes"));
    }
    let pos = storage::presence::set(&state.db, &user_id, &body.presence, body.status_msg.as_deref()).await?;
    crate::sync::presence_changed(&state, &user_id, pos);
    Ok(axum::Json(json!({})))
}

pub async fn get(
    State(state): State<AppState>,
    auth: Auth,
    Path(user_id): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    ensure_enabled(&state)?;
    if !storage::users::exists(&state.db, &user_id).await? {
        return Err(Error::not_found("Unknown user"));
    }
    // Presence is shared with people one shares a room with, as Synapse does.
    if *auth.user_id != *user_id && !storage::presence::share_a_room(&state.db, &auth.user_id, &user_id).await? {
        return Err(Error::forbidden("You do not share a room with this user"));
    }
    let Some(p) = storage::presence::get(&state.db, &user_id).await? else {
        return Ok(axum::Json(json!({ "presence": "offline" })));
    };
    let ago = (now_ms() - p.last_active_ts).max(0);
    let mut resp = json!({
        "presence": p.state,
        "last_active_ago": ago,
        "currently_active": p.state == "online" && ago < CURRENTLY_ACTIVE_MS,
    });
    if let Some(m) = p.status_msg {
        resp["status_msg"] = json!(m);
    }
    Ok(axum::Json(resp))
}
