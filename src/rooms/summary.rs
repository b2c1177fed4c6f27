//! Room summaries: what a user may learn about a room they are not necessarily in, shared by
//! `/room_summary` (MSC3266, spec v1.15) and the space hierarchy (`/hierarchy`, spec v1.2).
//!
//! Who may see a summary follows the spec's `/hierarchy` rules: anyone when the room is
//! `world_readable` or anyone may ask to enter (join rule `public`, `knock`, `knock_restricted`);
//! otherwise its members (joined, invited, knocking) and, for a `restricted` room, users joined
//! to one of the rooms its join rule allows.

use serde_json::{Map, Value, json};

use crate::error::ApiResult;
use crate::state::AppState;
use crate::storage;
use crate::storage::rooms::RoomRow;

/// The state a summary is made of (all with an empty state key).
const SUMMARY_STATE: &[&str] = &[
    "m.room.name",
    "m.room.topic",
    "m.room.avatar",
    "m.room.canonical_alias",
    "m.room.join_rules",
    "m.room.history_visibility",
    "m.room.guest_access",
    "m.room.create",
    "m.room.encryption",
];

pub struct Summary {
    pub room_nid: i64,
    pub join_rule: String,
    pub world_readable: bool,
    pub room_type: Option<String>,
    /// The user's membership (None: never, or no user).
    pub membership: Option<String>,
    /// The summary fields of the spec's `RoomSummary` (without `membership`).
    pub fields: Value,
}

impl Summary {
    /// Reads the summary of a local room (a few indexed queries).
    pub async fn load(state: &AppState, row: &RoomRow, user: Option<&str>) -> ApiResult<Self> {
        let keys: Vec<(String, String)> = SUMMARY_STATE.iter().map(|t| (t.to_string(), String::new())).collect();
        let mut s = Map::new();
        for r in storage::rooms::current_state_for(&state.db, row.room_nid, &keys).await? {
            let v: Value = serde_json::from_str(&r.json).unwrap_or(Value::Null);
            s.insert(r.event_type, v["content"].clone());
        }
        let join_rule = s.get("m.room.join_rules").and_then(|c| c["join_rule"].as_str()).unwrap_or("invite").to_owned();
        let world_readable =
            s.get("m.room.history_visibility").is_some_and(|c| c["history_visibility"] == "world_readable");
        let allowed_room_ids: Vec<String> = match join_rule.as_str() {
            "restricted" | "knock_restricted" => s
                .get("m.room.join_rules")
                .and_then(|c| c["allow"].as_array())
                .map(|a| {
                    a.iter()
                        .filter(|x| x["type"] == "m.room_membership")
                        .filter_map(|x| x["room_id"].as_str().map(str::to_owned))
                        .take(50)
                        .collect()
                })
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        let membership = match user {
            Some(u) => storage::rooms::membership(&state.db, row.room_nid, u).await?.map(|(m, _, _)| m),
            None => None,
        };
        let joined = storage::rooms::joined_count(&state.db, row.room_nid).await?;
        let mut fields = json!({
            "room_id": row.room_id,
            "num_joined_members": joined,
            "join_rule": join_rule,
            "world_readable": world_readable,
            "guest_can_join": s.get("m.room.guest_access").is_some_and(|c| c["guest_access"] == "can_join"),
            "room_version": row.room_version,
        });
        let pick = |k: &str, f: &str| s.get(k).and_then(|c| c[f].as_str()).map(str::to_owned);
        for (key, ty, field) in [
            ("name", "m.room.name", "name"),
            ("topic", "m.room.topic", "topic"),
            ("avatar_url", "m.room.avatar", "url"),
            ("canonical_alias", "m.room.canonical_alias", "alias"),
            ("room_type", "m.room.create", "type"),
            ("encryption", "m.room.encryption", "algorithm"),
        ] {
            if let Some(v) = pick(ty, field) {
                fields[key] = json!(v);
            }
        }
        if !allowed_room_ids.is_empty() {
            fields["allowed_room_ids"] = json!(allowed_room_ids);
        }
        let room_type = pick("m.room.create", "type");
        Ok(Self { room_nid: row.room_nid, join_rule, world_readable, room_type, membership, fields })
    }

    /// Whether `user` (None: anonymous) may see this summary.
    pub async fn visible_to(&self, state: &AppState, user: Option<&str>) -> ApiResult<bool> {
        if self.world_readable
            || matches!(self.join_rule.as_str(), "public" | "knock" | "knock_restricted")
            || matches!(self.membership.as_deref(), Some("join" | "invite" | "knock"))
        {
            return Ok(true);
        }
        match user {
            Some(u) if self.join_rule == "restricted" => {
                Ok(storage::rooms::joined_any(&state.db, u, &self.allowed_room_ids()).await?)
            }
            _ => Ok(false),
        }
    }

    fn allowed_room_ids(&self) -> Vec<String> {
        self.fields["allowed_room_ids"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect())
            .unwrap_or_default()
    }

    pub fn is_space(&self) -> bool {
        self.room_type.as_deref() == Some("m.space")
    }
}
