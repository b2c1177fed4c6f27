//! What clients see: events in the client format (which events: `visibility.rs`).

use serde_json::{Value, json};

use super::Room;
use crate::error::{ApiResult, Error};
use crate::state::AppState;
use crate::storage::events::EventRow;
use crate::storage::{self, now_ms};

/// Formats a stored event for a client. `viewer` is `(user_id, device_id)`: the sending device
/// sees its `transaction_id`. Redacted events are served redacted.
pub fn format(room: &Room, row: &EventRow, viewer: Option<(&str, &str)>) -> Value {
    let mut pdu: Value = serde_json::from_str(&row.json).unwrap_or(Value::Null);
    if row.redacted_by.is_some()
        && let Ok(obj) = super::to_canonical(pdu.clone())
        && let Ok(redacted) = ruma::canonical_json::redact(obj, &room.rules.redaction, None)
    {
        pdu = serde_json::to_value(redacted).unwrap_or(Value::Null);
    }
    let mut ev = json!({
        "type": row.event_type,
        "content": pdu.get("content").cloned().unwrap_or_else(|| json!({})),
        "event_id": row.event_id,
        "sender": row.sender,
        "origin_server_ts": row.origin_server_ts,
        "room_id": room.room_id,
    });
    if let Some(sk) = &row.state_key {
        ev["state_key"] = json!(sk);
    }
    if let Some(r) = pdu.get("redacts") {
        ev["redacts"] = r.clone();
    } else if let Some(r) = pdu["content"].get("redacts") {
        // Clients written for older versions look for the top-level key.
        ev["redacts"] = r.clone();
    }
    let mut unsigned = json!({ "age": (now_ms() - row.origin_server_ts).max(0) });
    if let (Some((user, device)), Some(d), Some(t)) = (viewer, &row.txn_device, &row.txn_id)
        && user == row.sender
        && device == d
    {
        unsigned["transaction_id"] = json!(t);
    }
    if let Some(by) = &row.redacted_by {
        unsigned["redacted_because"] = json!({ "event_id": by, "type": "m.room.redaction" });
    }
    ev["unsigned"] = unsigned;
    ev
}

/// Requires the user to be joined to the room (for writes and member-only reads).
pub async fn require_joined(state: &AppState, room: &Room, user: &str) -> ApiResult<()> {
    match storage::rooms::membership(&state.db, room.nid, user).await? {
        Some((m, _, _)) if m == "join" => Ok(()),
        _ => Err(Error::forbidden("You are not joined to this room")),
    }
}

/// For a restricted room: if `user` is joined to one of the rooms the join rules allow, a local
/// member of this room with the power to invite, who vouches for the join.
pub async fn restricted_join_authoriser(
    state: &AppState,
    room: &Room,
    user: &str,
    join_rules: &Value,
) -> ApiResult<Option<String>> {
    let allowed: Vec<&str> = join_rules["allow"]
        .as_array()
        .map(|a| a.iter().filter(|c| c["type"] == "m.room_membership").filter_map(|c| c["room_id"].as_str()).collect())
        .unwrap_or_default();
    let mut eligible = false;
    for rid in allowed {
        if let Some(r) = storage::rooms::by_id(&state.db, rid).await?
            && matches!(storage::rooms::membership(&state.db, r.room_nid, user).await?, Some((m, _, _)) if m == "join")
        {
            eligible = true;
            break;
        }
    }
    if !eligible {
        return Ok(None);
    }
    let pl = super::PowerLevels::load(state, room).await?;
    let invite_level = pl.action("invite", 0);
    for member in storage::rooms::member_events(&state.db, room.nid, Some("join"), None).await? {
        let Some(candidate) = member.state_key else { continue };
        if !crate::users::is_local(&candidate, &state.config.server_name) {
            continue;
        }
        if pl.of(&candidate) >= invite_level {
            return Ok(Some(candidate));
        }
    }
    Ok(None)
}
