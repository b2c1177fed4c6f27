//! Receipts, read markers and typing notifications.

use std::time::Duration;

use axum::extract::State;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::error::{ApiResult, Error};
use crate::http::extract::{Auth, Json, Path};
use crate::rooms::client::require_joined;
use crate::rooms::visibility::event_visible;
use crate::rooms::{Room, typing};
use crate::state::AppState;
use crate::storage;
use crate::storage::events::EventRow;

const READ: &str = "m.read";
const READ_PRIVATE: &str = "m.read.private";
const FULLY_READ: &str = "m.fully_read";

/// An event of the room that `user` may see; 404 otherwise, so that receipts do not reveal
/// which event IDs exist.
async fn visible_event(state: &AppState, room: &Room, user: &str, event_id: &str) -> ApiResult<EventRow> {
    let not_found = || Error::not_found(format!("Event {event_id} not found in this room"));
    let ev =
        storage::events::by_id(&state.db, event_id).await?.filter(|e| e.room_nid == room.nid).ok_or_else(not_found)?;
    if event_visible(state, room, user, &ev).await? { Ok(ev) } else { Err(not_found()) }
}

/// Moves the fully-read marker (room account data `m.fully_read`) to `ev`, unless it already
/// points at a later event: the marker only moves forwards.
async fn set_fully_read(state: &AppState, room: &Room, user: &str, ev: &EventRow) -> ApiResult<()> {
    let room_id = room.room_id.as_str();
    let current = storage::account_data::get(&state.db, user, Some(room_id), FULLY_READ).await?;
    if let Some(id) = current.as_ref().and_then(|c| c["event_id"].as_str())
        && let Some(old) = storage::events::by_id(&state.db, id).await?
        && old.stream_ordering >= ev.stream_ordering
    {
        return Ok(());
    }
    let content = json!({ "event_id": ev.event_id });
    let pos = storage::account_data::set(&state.db, user, Some(room_id), FULLY_READ, &content).await?;
    crate::sync::account_data_changed(state, user, pos);
    Ok(())
}

async fn set_receipt(
    state: &AppState,
    room: &Room,
    user: &str,
    receipt_type: &str,
    thread_id: Option<&str>,
    ev: &EventRow,
) -> ApiResult<()> {
    let receipt = crate::rooms::receipts::Receipt {
        room_nid: room.nid,
        user_id: user.to_owned(),
        receipt_type: receipt_type.to_owned(),
        thread_id: thread_id.map(str::to_owned),
        event_id: ev.event_id.clone(),
        event_stream: ev.stream_ordering,
    };
    // Committed together with the receipts of other requests; wakes the room's syncs.
    if crate::rooms::receipts::record(state, receipt).await?.is_some() && receipt_type != "m.read.private" {
        crate::appservice::sender::receipt_recorded(state, room.nid, user, receipt_type, &ev.event_id, thread_id);
        crate::federation::edu::receipt_out(state, room, user, &ev.event_id, thread_id).await;
    }
    Ok(())
}

pub async fn post_receipt(
    State(state): State<AppState>,
    auth: Auth,
    Path((room_id, receipt_type, event_id)): Path<(String, String, String)>,
    Json(body): Json<Map<String, Value>>,
) -> ApiResult<axum::Json<Value>> {
    if ![READ, READ_PRIVATE, FULLY_READ].contains(&receipt_type.as_str()) {
        return Err(Error::invalid_param(format!("Unknown receipt type {receipt_type}")));
    }
    // The spec asks for M_INVALID_PARAM (not M_BAD_JSON) for any bad `thread_id`.
    let thread_id = match body.get("thread_id") {
        None => None,
        Some(Value::String(t)) if !t.is_empty() => Some(t.as_str()),
        Some(_) => return Err(Error::invalid_param("thread_id field must be a non-empty string")),
    };
    if thread_id.is_some() && receipt_type == FULLY_READ {
        return Err(Error::invalid_param("thread_id is not compatible with m.fully_read"));
    }
    let room = Room::load(&state, &room_id).await?;
    require_joined(&state, &room, &auth.user_id).await?;
    let ev = visible_event(&state, &room, &auth.user_id, &event_id).await?;
    if let Some(root) = thread_id.filter(|t| *t != "main") {
        // A thread receipt must be for the root or an event of that thread.
        let (rel_type, relates_to) = storage::receipts::relation_of(&state.db, ev.event_nid).await?;
        let in_thread =
            ev.event_id == root || (rel_type.as_deref() == Some("m.thread") && relates_to.as_deref() == Some(root));
        if !in_thread {
            return Err(Error::invalid_param(format!("Event {event_id} is not part of thread {root}")));
        }
    }
    if receipt_type == FULLY_READ {
        set_fully_read(&state, &room, &auth.user_id, &ev).await?;
    } else {
        set_receipt(&state, &room, &auth.user_id, &receipt_type, thread_id, &ev).await?;
    }
    Ok(axum::Json(json!({})))
}

#[derive(Deserialize)]
pub struct ReadMarkersBody {
    #[serde(rename = "m.fully_read")]
    fully_read: Option<String>,
    #[serde(rename = "m.read")]
    read: Option<String>,
    #[serde(rename = "m.read.private")]
    read_private: Option<String>,
}

pub async fn read_markers(
    State(state): State<AppState>,
    auth: Auth,
    Path(room_id): Path<String>,
    Json(body): Json<ReadMarkersBody>,
) -> ApiResult<axum::Json<Value>> {
    let room = Room::load(&state, &room_id).await?;
    require_joined(&state, &room, &auth.user_id).await?;
    // Resolve every event before writing anything, so a bad ID changes nothing.
    let mut updates = Vec::new();
    for (kind, id) in [(FULLY_READ, &body.fully_read), (READ, &body.read), (READ_PRIVATE, &body.read_private)] {
        if let Some(id) = id {
            updates.push((kind, visible_event(&state, &room, &auth.user_id, id).await?));
        }
    }
    for (kind, ev) in updates {
        if kind == FULLY_READ {
            set_fully_read(&state, &room, &auth.user_id, &ev).await?;
        } else {
            set_receipt(&state, &room, &auth.user_id, kind, None, &ev).await?;
        }
    }
    Ok(axum::Json(json!({})))
}

#[derive(Deserialize)]
pub struct TypingBody {
    typing: bool,
    /// Milliseconds.
    timeout: Option<u64>,
}

pub async fn typing(
    State(state): State<AppState>,
    auth: Auth,
    Path((room_id, user_id)): Path<(String, String)>,
    Json(body): Json<TypingBody>,
) -> ApiResult<axum::Json<Value>> {
    if *auth.user_id != user_id {
        return Err(Error::forbidden("Cannot set the typing state of another user"));
    }
    let room = Room::load(&state, &room_id).await?;
    require_joined(&state, &room, &auth.user_id).await?;
    if body.typing {
        let timeout = body.timeout.map(Duration::from_millis).unwrap_or(typing::DEFAULT_TIMEOUT);
        state.typing.start(room.nid, &user_id, timeout);
        crate::cluster::typing_changed(&state, room.nid, &user_id, Some(timeout.min(typing::MAX_TIMEOUT)));
        crate::federation::edu::typing_out(&state, &room, &user_id, Some(timeout.min(typing::MAX_TIMEOUT))).await;
    } else if state.typing.stop(room.nid, &user_id).is_some() {
        crate::cluster::typing_changed(&state, room.nid, &user_id, None);
        crate::federation::edu::typing_out(&state, &room, &user_id, None).await;
    }
    Ok(axum::Json(json!({})))
}
