//! The public room directory of this server (`/publicRooms` for clients and, over federation,
//! for other servers).

use serde_json::{Value, json};

use crate::error::{ApiResult, Error};
use crate::state::AppState;
use crate::storage;
use crate::users::directory::normalise;

/// Upper bound of rooms the directory scans (a municipal deployment has far fewer).
const MAX_PUBLIC_ROOMS: i64 = 10_000;

/// A page of the published rooms, optionally filtered by a search term and room types.
pub async fn public_rooms(
    state: &AppState,
    limit: Option<i64>,
    since: Option<&str>,
    term: Option<&str>,
    room_types: Option<Vec<Option<String>>>,
) -> ApiResult<Value> {
    let limit = limit.unwrap_or(100).clamp(1, 500) as usize;
    let offset: usize = match since {
        Some(t) => t
            .strip_prefix('o')
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| Error::invalid_param("Invalid since token"))?,
        None => 0,
    };
    let term = term.map(normalise).filter(|t| !t.is_empty());
    let mut entries = Vec::new();
    for r in storage::directory::public_rooms(&state.db, MAX_PUBLIC_ROOMS).await? {
        let s = &r.state.0;
        let name = s["m.room.name"]["name"].as_str();
        let topic = s["m.room.topic"]["topic"].as_str();
        let alias = s["m.room.canonical_alias"]["alias"].as_str();
        if let Some(t) = &term {
            let hay = normalise(&format!(
                "{} {} {} {}",
                name.unwrap_or(""),
                topic.unwrap_or(""),
                alias.unwrap_or(""),
                r.room_id
            ));
            if !hay.contains(t.as_str()) {
                continue;
            }
        }
        let room_type = s["m.room.create"]["type"].as_str().map(str::to_owned);
        if let Some(types) = &room_types
            && !types.contains(&room_type)
        {
            continue;
        }
        let mut e = json!({
            "room_id": r.room_id,
            "num_joined_members": r.num_joined_members,
            "world_readable": s["m.room.history_visibility"]["history_visibility"] == "world_readable",
            "guest_can_join": s["m.room.guest_access"]["guest_access"] == "can_join",
            "join_rule": s["m.room.join_rules"]["join_rule"].as_str().unwrap_or("invite"),
        });
        for (k, v) in [
            ("name", name),
            ("topic", topic),
            ("canonical_alias", alias),
            ("avatar_url", s["m.room.avatar"]["url"].as_str()),
        ] {
            if let Some(v) = v {
                e[k] = json!(v);
            }
        }
        if let Some(t) = room_type {
            e["room_type"] = json!(t);
        }
        entries.push(e);
    }
    let total = entries.len();
    let page: Vec<Value> = entries.into_iter().skip(offset).take(limit).collect();
    let mut resp = json!({ "chunk": page, "total_room_count_estimate": total });
    if offset + limit < total {
        resp["next_batch"] = json!(format!("o{}", offset + limit));
    }
    if offset > 0 {
        resp["prev_batch"] = json!(format!("o{}", offset.saturating_sub(limit)));
    }
    Ok(resp)
}
