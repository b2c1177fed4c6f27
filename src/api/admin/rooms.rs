//! Rooms in the admin API: the two Synapse endpoints Jitsi's matrix-user-verification service asks
//! (`members` to check that a user may join a room's conference, `state` for their power level,
//! which makes them a Jitsi moderator), with Synapse's shapes, and meeting rooms (a Parvis
//! endpoint: Synapse has none).

use axum::extract::State;
use serde_json::{Value, json};

use super::AdminAuth;
use crate::error::ApiResult;
use crate::http::extract::{Json, Path};
use crate::rooms::Room;
use crate::rtc::jitsi::{MeetingRequest, create_meeting as create};
use crate::state::AppState;
use crate::storage;

/// `GET /_synapse/admin/v1/rooms/{roomId}/members`: `{"members": [joined user IDs], "total": n}`.
pub async fn members(
    State(state): State<AppState>,
    _admin: AdminAuth,
    Path(room_id): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    let room = Room::load(&state, &room_id).await?;
    let members: Vec<String> = storage::rooms::current_state(&state.db, room.nid)
        .await?
        .into_iter()
        .filter(|r| r.event_type == "m.room.member")
        .filter(|r| {
            serde_json::from_str::<Value>(&r.json)
                .ok()
                .and_then(|v| v["content"]["membership"].as_str().map(|m| m == "join"))
                == Some(true)
        })
        .filter_map(|r| r.state_key)
        .collect();
    Ok(axum::Json(json!({ "total": members.len(), "members": members })))
}

/// `GET /_synapse/admin/v1/rooms/{roomId}/state`: `{"state": [current state events]}`.
pub async fn state(
    State(state): State<AppState>,
    _admin: AdminAuth,
    Path(room_id): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    let room = Room::load(&state, &room_id).await?;
    let events: Vec<Value> = storage::rooms::current_state(&state.db, room.nid)
        .await?
        .iter()
        .map(|r| crate::rooms::client::format(&room, r, None))
        .collect();
    Ok(axum::Json(json!({ "state": events })))
}

/// `POST /_parvis/admin/v1/meetings`: creates a meeting room (see `rtc::jitsi`); `creator` is a
/// local user (the calling admin by default). Answers the room, widget and conference IDs and the
/// plain Jitsi link for guests.
pub async fn create_meeting(
    State(state): State<AppState>,
    AdminAuth(admin): AdminAuth,
    Json(body): Json<MeetingRequest>,
) -> ApiResult<axum::Json<Value>> {
    let meeting = create(&state, &admin.user_id, body).await?;
    Ok(axum::Json(meeting.to_json()))
}
