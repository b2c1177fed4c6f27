//! Ephemeral data across servers (EDUs): typing notifications and read receipts, both ways
//! (<https://spec.matrix.org/latest/server-server-api/#typing-notifications>,
//! <https://spec.matrix.org/latest/server-server-api/#receipts>). Outgoing EDUs go through the
//! federation outbox like events; incoming ones are accepted only for users of the sending
//! server who are joined to the room, in rooms the server's ACL lets it into.
//!
//! To-device messages (`m.direct_to_device`) are delivered to local devices; a device list or
//! signing key update of a remote user marks that user's keys as changed for the local users who
//! share a room with them (their clients then query the keys again, which reaches the user's
//! server). Not handled yet (dropped with a debug log): presence.

use std::time::Duration;

use ruma::{ServerName, UserId};
use serde_json::{Value, json};

use crate::error::{ApiResult, Error};
use crate::rooms::{Room, typing};
use crate::state::AppState;
use crate::storage;

/// Most rooms and users of one receipt EDU looked at.
const MAX_RECEIPT_ROOMS: usize = 100;
const MAX_RECEIPT_USERS: usize = 100;

/// Handles one incoming EDU.
pub async fn receive(state: &AppState, origin: &ServerName, edu: &Value) -> ApiResult<()> {
    let content = edu.get("content").cloned().unwrap_or(Value::Null);
    match edu.get("edu_type").and_then(Value::as_str) {
        Some("m.typing") => typing_in(state, origin, &content).await,
        Some("m.receipt") => receipts_in(state, origin, &content).await,
        Some("m.direct_to_device") => to_device_in(state, origin, &content).await,
        Some("m.device_list_update") | Some("m.signing_key_update") => device_list_in(state, origin, &content).await,
        Some(other) => {
            tracing::debug!(%origin, edu_type = other, "EDU type not handled yet");
            Ok(())
        }
        None => Err(Error::bad_json("EDU without edu_type")),
    }
}

/// The room if `user` is a user of `origin` joined to it (and the ACL lets `origin` in).
async fn joined_room(state: &AppState, origin: &ServerName, room_id: &str, user: &str) -> ApiResult<Option<Room>> {
    let Ok(uid) = <&UserId>::try_from(user) else { return Ok(None) };
    if uid.server_name() != origin {
        return Ok(None);
    }
    let Ok(room) = Room::load(state, room_id).await else { return Ok(None) };
    if crate::federation::acl::check(state, &room, origin).await.is_err() {
        return Ok(None);
    }
    let joined = matches!(storage::rooms::membership(&state.db, room.nid, user).await?, Some((m, _, _)) if m == "join");
    Ok(joined.then_some(room))
}

async fn typing_in(state: &AppState, origin: &ServerName, c: &Value) -> ApiResult<()> {
    let (Some(room_id), Some(user), Some(on)) = (c["room_id"].as_str(), c["user_id"].as_str(), c["typing"].as_bool())
    else {
        return Err(Error::bad_json("m.typing needs room_id, user_id and typing"));
    };
    let Some(room) = joined_room(state, origin, room_id, user).await? else { return Ok(()) };
    if on {
        let timeout = c["timeout"].as_u64().map(Duration::from_millis).unwrap_or(typing::DEFAULT_TIMEOUT);
        let timeout = timeout.min(typing::MAX_TIMEOUT);
        state.typing.start(room.nid, user, timeout);
        crate::cluster::typing_changed(state, room.nid, user, Some(timeout));
    } else if state.typing.stop(room.nid, user).is_some() {
        crate::cluster::typing_changed(state, room.nid, user, None);
    }
    Ok(())
}

async fn receipts_in(state: &AppState, origin: &ServerName, c: &Value) -> ApiResult<()> {
    let Some(rooms) = c.as_object() else { return Err(Error::bad_json("m.receipt content must be an object")) };
    for (room_id, by_type) in rooms.iter().take(MAX_RECEIPT_ROOMS) {
        let Some(read) = by_type.get("m.read").and_then(Value::as_object) else { continue };
        for (user, r) in read.iter().take(MAX_RECEIPT_USERS) {
            let Some(room) = joined_room(state, origin, room_id, user).await? else { continue };
            // The receipt is for the last of the listed events this server has.
            let ids: Vec<String> = r["event_ids"]
                .as_array()
                .into_iter()
                .flatten()
                .take(10)
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect();
            let rows = storage::events::by_ids(&state.db, &ids).await?;
            let Some(ev) = rows
                .into_iter()
                .filter(|e| e.room_nid == room.nid && e.stream_ordering > 0)
                .max_by_key(|e| e.stream_ordering)
            else {
                continue;
            };
            let thread_id = r["data"]["thread_id"].as_str().filter(|t| t.len() <= 255).map(str::to_owned);
            let receipt = crate::rooms::receipts::Receipt {
                room_nid: room.nid,
                user_id: user.clone(),
                receipt_type: "m.read".into(),
                thread_id,
                event_id: ev.event_id.clone(),
                event_stream: ev.stream_ordering,
            };
            crate::rooms::receipts::record(state, receipt).await?;
        }
    }
    Ok(())
}

/// The other servers of a room that get its EDUs.
async fn destinations(state: &AppState, room: &Room) -> ApiResult<Vec<String>> {
    if !state.federation.enabled {
        return Ok(Vec::new());
    }
    let mut servers = storage::remote::joined_servers(&state.db, room.nid, &state.config.server_name).await?;
    servers.retain(|s| state.federation.is_allowed_name(s));
    Ok(servers)
}

async fn send(state: &AppState, room: &Room, edu: Value) {
    match destinations(state, room).await {
        Ok(d) if !d.is_empty() => match storage::remote::enqueue_edu(&state.db, &d, &edu).await {
            Ok(()) => state.federation.sender.wake_all(&d),
            Err(e) => tracing::warn!(room_id = %room.room_id, error = %e, "queueing an EDU failed"),
        },
        Ok(_) => {}
        Err(e) => tracing::warn!(room_id = %room.room_id, error = %e.message, "finding a room's servers failed"),
    }
}

/// A local user started or stopped typing: the room's other servers hear of it.
pub async fn typing_out(state: &AppState, room: &Room, user: &str, timeout: Option<Duration>) {
    let mut content = json!({ "room_id": room.room_id, "user_id": user, "typing": timeout.is_some() });
    if let Some(t) = timeout {
        content["timeout"] = json!(t.as_millis() as u64);
    }
    send(state, room, json!({ "edu_type": "m.typing", "content": content })).await;
}

/// A local user's public read receipt: the room's other servers hear of it.
pub async fn receipt_out(state: &AppState, room: &Room, user: &str, event_id: &str, thread_id: Option<&str>) {
    let mut data = json!({ "ts": storage::now_ms() });
    if let Some(t) = thread_id {
        data["thread_id"] = json!(t);
    }
    let content = json!({ room.room_id.as_str(): { "m.read": { user: { "event_ids": [event_id], "data": data } } } });
    send(state, room, json!({ "edu_type": "m.receipt", "content": content })).await;
}

async fn to_device_in(state: &AppState, origin: &ServerName, c: &Value) -> ApiResult<()> {
    let (Some(sender), Some(kind), Some(messages)) =
        (c["sender"].as_str(), c["type"].as_str(), c["messages"].as_object())
    else {
        return Err(Error::bad_json("m.direct_to_device needs sender, type and messages"));
    };
    let from_origin = <&UserId>::try_from(sender).is_ok_and(|u| u.server_name() == origin);
    if !from_origin || kind.len() > 255 {
        return Err(Error::forbidden("to-device sender is not a user of the origin"));
    }
    crate::e2ee::receive_to_device(state, sender, kind, messages).await
}

async fn device_list_in(state: &AppState, origin: &ServerName, c: &Value) -> ApiResult<()> {
    let Some(user) = c["user_id"].as_str() else { return Err(Error::bad_json("device list update without user_id")) };
    if !<&UserId>::try_from(user).is_ok_and(|u| u.server_name() == origin) {
        return Err(Error::forbidden("device list update for a user of another server"));
    }
    // Only users someone here shares a room with matter.
    if storage::remote::shares_room_with_local(&state.db, user, &state.config.server_name).await? {
        crate::e2ee::remote_devices_changed(state, user).await?;
    }
    Ok(())
}

/// A local user's devices or keys changed: the servers of the rooms they are in hear of it
/// (`m.device_list_update` with the user's current stream position; receivers query the
/// devices again). Sent after the change committed: a crash in between loses the update (the
/// next change repairs it).
pub async fn device_list_out(state: &AppState, user: &str, stream_id: i64) {
    if !state.federation.enabled {
        return;
    }
    let servers = match storage::remote::servers_sharing_rooms(&state.db, user, &state.config.server_name).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(user, error = %e, "finding the servers of a user's rooms failed");
            return;
        }
    };
    let servers: Vec<String> = servers.into_iter().filter(|s| state.federation.is_allowed_name(s)).collect();
    if servers.is_empty() {
        return;
    }
    // One update is enough: it names no previous update, which makes the receiver fetch the
    // user's devices again (`user/devices`).
    let device =
        storage::e2ee::device_ids(&state.db, user).await.ok().and_then(|d| d.into_iter().next()).unwrap_or_default();
    let edu = json!({ "edu_type": "m.device_list_update", "content": {
        "user_id": user, "device_id": device, "stream_id": stream_id, "prev_id": [],
    }});
    if let Err(e) = storage::remote::enqueue_edu(&state.db, &servers, &edu).await {
        tracing::warn!(user, error = %e, "queueing a device list update failed");
        return;
    }
    state.federation.sender.wake_all(&servers);
}
