//! Server notices (Synapse's `/_synapse/admin/v1/send_server_notice`): the system user
//! (`server_notices.system_mxid_localpart`, a bot account) sends into a room of the recipient's
//! own, created on the first notice: invite-only, named `server_notices.room_name`, the recipient
//! invited and unable to post (`events_default: 100`), tagged `m.server_notice` for them (clients
//! show it apart). A recipient who left it gets a new room with the next notice.

use serde_json::{Value, json};

use crate::error::{ApiResult, Error};
use crate::rooms::{ClientTxn, NewEvent, Room};
use crate::state::AppState;
use crate::storage;

pub const TAG: &str = "m.server_notice";

/// The system user's ID, when server notices are enabled.
pub fn system_user(state: &AppState) -> Option<String> {
    state.config.server_notices.system_mxid_localpart.as_ref().map(|l| format!("@{l}:{}", state.config.server_name))
}

/// The recipient's notices room, created (or re-created) when needed.
async fn notices_room(state: &AppState, system: &str, user: &str) -> ApiResult<Room> {
    if let Some(room_id) = storage::server_notices::room_of(&state.db, user).await?
        && let Ok(room) = Room::load(state, &room_id).await
    {
        let m = storage::rooms::membership(&state.db, room.nid, user).await?.map(|(m, _, _)| m);
        if matches!(m.as_deref(), Some("join" | "invite")) {
            return Ok(room);
        }
    }
    let cfg = &state.config.server_notices;
    let req: crate::rooms::create::CreateRoomRequest = serde_json::from_value(json!({
        "preset": "private_chat",
        "name": cfg.room_name,
        "invite": [user],
        "power_level_content_override": { "events_default": 100 },
    }))
    .map_err(|_| Error::internal())?;
    let created = crate::rooms::create::create_room(state, system, req).await?;
    // Tagged for the recipient before they even join, as Synapse does.
    let pos = storage::account_data::set_tag(&state.db, user, &created.room_id, TAG, &json!({ "order": 0.5 })).await?;
    crate::sync::account_data_changed(state, user, pos);
    storage::server_notices::set_room(&state.db, user, &created.room_id).await?;
    tracing::info!(user, room_id = %created.room_id, "server notices room created");
    Room::load(state, &created.room_id).await
}

/// Sends a notice. `txn`: the admin's transaction (a retried `PUT` sends nothing new).
pub async fn send(
    state: &AppState,
    user: &str,
    kind: &str,
    state_key: Option<&str>,
    content: Value,
    txn: Option<ClientTxn<'_>>,
) -> ApiResult<String> {
    let system = system_user(state).ok_or_else(|| Error::unrecognized("Server notices are not enabled"))?;
    let uid = <&ruma::UserId>::try_from(user).map_err(|_| Error::invalid_param("Invalid user_id"))?;
    if uid.server_name().as_str() != state.config.server_name {
        return Err(Error::invalid_param("Server notices can only be sent to local users"));
    }
    match storage::users::get(&state.db, user).await? {
        None => return Err(Error::not_found("Unknown user")),
        Some(u) if u.deactivated => return Err(Error::invalid_param("The user is deactivated")),
        Some(_) => {}
    }
    if user == system {
        return Err(Error::invalid_param("The system user receives no notices"));
    }
    if !content.is_object() {
        return Err(Error::bad_json("content must be an object"));
    }
    super::ensure_bot_user(state, &system, Some(&state.config.server_notices.system_mxid_display_name)).await?;
    // One room per user even under concurrent notices (in this process).
    let lock = state.webhooks.notice_lock(user);
    let _guard = lock.lock().await;
    let room = notices_room(state, &system, user).await?;
    let ev = match state_key {
        Some(k) => NewEvent::state(kind, k, content),
        None => NewEvent::message(kind, content),
    };
    Ok(crate::rooms::send(state, &room, &system, ev, txn).await?.to_string())
}
