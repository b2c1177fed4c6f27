//! Sync filters (the spec's `Filter`): parsed from a stored filter ID or inline JSON, and
//! applied to events in memory.

use serde::Deserialize;
use serde_json::Value;

use super::cache::CachedEvent;
use crate::error::{ApiResult, Error};
use crate::state::AppState;
use crate::storage;

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct Filter {
    pub event_fields: Option<Vec<String>>,
    pub event_format: Option<String>,
    pub presence: EventFilter,
    pub account_data: EventFilter,
    pub room: RoomFilter,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct EventFilter {
    pub limit: Option<i64>,
    pub types: Option<Vec<String>>,
    pub not_types: Option<Vec<String>>,
    pub senders: Option<Vec<String>>,
    pub not_senders: Option<Vec<String>>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct RoomFilter {
    pub rooms: Option<Vec<String>>,
    pub not_rooms: Option<Vec<String>>,
    pub include_leave: bool,
    pub ephemeral: RoomEventFilter,
    pub state: RoomEventFilter,
    pub timeline: RoomEventFilter,
    pub account_data: RoomEventFilter,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct RoomEventFilter {
    pub limit: Option<i64>,
    pub types: Option<Vec<String>>,
    pub not_types: Option<Vec<String>>,
    pub senders: Option<Vec<String>>,
    pub not_senders: Option<Vec<String>>,
    pub rooms: Option<Vec<String>>,
    pub not_rooms: Option<Vec<String>>,
    pub contains_url: Option<bool>,
    pub lazy_load_members: bool,
    pub include_redundant_members: bool,
    pub unread_thread_notifications: bool,
}

/// `*` matches any run of characters (the spec's only wildcard for types); linear for ordinary
/// patterns, O(n·m) at worst, never panics (see `crate::glob`).
pub fn glob(pattern: &str, value: &str) -> bool {
    crate::glob::matches(pattern, value, false)
}

/// Largest filter accepted, as JSON text (uploaded or inline in `/sync`).
pub const MAX_FILTER_BYTES: usize = 16 * 1024;
/// Most entries in any one list of a filter (`types`, `not_types`, `senders`, `rooms`,
/// `event_fields`...).
pub const MAX_LIST_ENTRIES: usize = 500;
/// Longest entry of such a list, in bytes: the spec's limit on event types and IDs, so no
/// longer entry can be useful.
pub const MAX_ENTRY_BYTES: usize = 255;

fn check_list(name: &str, list: &Option<Vec<String>>) -> Result<(), String> {
    let Some(list) = list else { return Ok(()) };
    if list.len() > MAX_LIST_ENTRIES {
        return Err(format!("{name}: more than {MAX_LIST_ENTRIES} entries"));
    }
    if list.iter().any(|e| e.len() > MAX_ENTRY_BYTES) {
        return Err(format!("{name}: an entry is longer than {MAX_ENTRY_BYTES} bytes"));
    }
    Ok(())
}

fn type_ok(types: &Option<Vec<String>>, not_types: &Option<Vec<String>>, kind: &str) -> bool {
    if not_types.as_ref().is_some_and(|t| t.iter().any(|p| glob(p, kind))) {
        return false;
    }
    types.as_ref().is_none_or(|t| t.iter().any(|p| glob(p, kind)))
}

fn sender_ok(senders: &Option<Vec<String>>, not_senders: &Option<Vec<String>>, sender: &str) -> bool {
    if not_senders.as_ref().is_some_and(|s| s.iter().any(|x| x == sender)) {
        return false;
    }
    senders.as_ref().is_none_or(|s| s.iter().any(|x| x == sender))
}

impl EventFilter {
    fn check_limits(&self, at: &str) -> Result<(), String> {
        check_list(&format!("{at}.types"), &self.types)?;
        check_list(&format!("{at}.not_types"), &self.not_types)?;
        check_list(&format!("{at}.senders"), &self.senders)?;
        check_list(&format!("{at}.not_senders"), &self.not_senders)
    }

    pub fn allows(&self, kind: &str, sender: Option<&str>) -> bool {
        type_ok(&self.types, &self.not_types, kind)
            && sender.is_none_or(|s| sender_ok(&self.senders, &self.not_senders, s))
    }

    pub fn limit(&self, default: i64) -> usize {
        self.limit.unwrap_or(default).clamp(0, 1000) as usize
    }
}

impl RoomEventFilter {
    pub fn check_limits(&self, at: &str) -> Result<(), String> {
        check_list(&format!("{at}.types"), &self.types)?;
        check_list(&format!("{at}.not_types"), &self.not_types)?;
        check_list(&format!("{at}.senders"), &self.senders)?;
        check_list(&format!("{at}.not_senders"), &self.not_senders)?;
        check_list(&format!("{at}.rooms"), &self.rooms)?;
        check_list(&format!("{at}.not_rooms"), &self.not_rooms)
    }

    pub fn allows_room(&self, room_id: &str) -> bool {
        !self.not_rooms.as_ref().is_some_and(|r| r.iter().any(|x| x == room_id))
            && self.rooms.as_ref().is_none_or(|r| r.iter().any(|x| x == room_id))
    }

    pub fn allows_kind(&self, kind: &str, sender: Option<&str>) -> bool {
        type_ok(&self.types, &self.not_types, kind)
            && sender.is_none_or(|s| sender_ok(&self.senders, &self.not_senders, s))
    }

    pub fn allows(&self, ev: &CachedEvent) -> bool {
        self.allows_kind(&ev.row.event_type, Some(&ev.row.sender))
            && self.contains_url.is_none_or(|want| want == ev.has_url)
    }

    pub fn limit(&self, default: i64) -> usize {
        self.limit.unwrap_or(default).clamp(1, 1000) as usize
    }

    /// The `filter` query parameter of `/messages` and `/context`: inline JSON, within the same
    /// limits as a sync filter.
    pub fn from_param(param: Option<&str>) -> ApiResult<Self> {
        let Some(param) = param.map(str::trim).filter(|p| !p.is_empty()) else { return Ok(Self::default()) };
        if param.len() > MAX_FILTER_BYTES {
            return Err(Error::invalid_param(format!("filter is larger than {MAX_FILTER_BYTES} bytes")));
        }
        let filter: Self = serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(param))
            .map_err(|e| Error::invalid_param(format!("Invalid filter at {}: {}", e.path(), e.inner())))?;
        filter.check_limits("filter").map_err(|e| Error::invalid_param(format!("Filter too large: {e}")))?;
        Ok(filter)
    }

    /// [`Self::allows`] for a stored event (whose URL presence is read from its content only
    /// when the filter asks).
    pub fn allows_row(&self, row: &storage::events::EventRow) -> bool {
        self.allows_kind(&row.event_type, Some(&row.sender))
            && self.contains_url.is_none_or(|want| {
                let has = serde_json::from_str::<Value>(&row.json).is_ok_and(|v| v["content"]["url"].is_string());
                has == want
            })
    }
}

impl RoomFilter {
    pub fn allows_room(&self, room_id: &str) -> bool {
        !self.not_rooms.as_ref().is_some_and(|r| r.iter().any(|x| x == room_id))
            && self.rooms.as_ref().is_none_or(|r| r.iter().any(|x| x == room_id))
    }
}

impl Filter {
    /// The `filter` query parameter of `/sync`: a filter ID of this user, or inline JSON.
    pub async fn resolve(state: &AppState, user_id: &str, param: Option<&str>) -> ApiResult<Self> {
        let Some(param) = param.map(str::trim).filter(|p| !p.is_empty()) else {
            return Ok(Self::default());
        };
        if param.starts_with('{') {
            if param.len() > MAX_FILTER_BYTES {
                return Err(Error::invalid_param(format!("Inline filter is larger than {MAX_FILTER_BYTES} bytes")));
            }
            let value =
                serde_json::from_str(param).map_err(|e| Error::invalid_param(format!("Invalid inline filter: {e}")))?;
            return Self::from_value(value);
        }
        let id: i64 = param.parse().map_err(|_| Error::invalid_param("filter must be a filter ID or a JSON object"))?;
        // Stored filters never change (there is no API to), so a parsed one is good for ever;
        // clients send the same filter ID with every sync.
        let key = (user_id.to_owned(), id);
        if let Some(filter) = state.filter_cache.get(&key) {
            return Ok(filter);
        }
        let value = storage::filters::get(&state.db, user_id, id)
            .await?
            .ok_or_else(|| Error::not_found(format!("No filter {param} for this user")))?;
        let filter = Self::from_value(value)?;
        state.filter_cache.insert(key, filter.clone());
        Ok(filter)
    }

    pub fn from_value(value: Value) -> ApiResult<Self> {
        let filter: Self = serde_path_to_error::deserialize(value)
            .map_err(|e| Error::invalid_param(format!("Invalid filter at {}: {}", e.path(), e.inner())))?;
        if let Some(f) = &filter.event_format
            && f != "client"
            && f != "federation"
        {
            return Err(Error::invalid_param("event_format must be client or federation"));
        }
        filter.check_limits().map_err(|e| Error::invalid_param(format!("Filter too large: {e}")))?;
        Ok(filter)
    }

    /// The first size limit the filter exceeds (list lengths and entry lengths; the caller
    /// bounds the JSON text to [`MAX_FILTER_BYTES`]).
    pub fn check_limits(&self) -> Result<(), String> {
        check_list("event_fields", &self.event_fields)?;
        self.presence.check_limits("presence")?;
        self.account_data.check_limits("account_data")?;
        check_list("room.rooms", &self.room.rooms)?;
        check_list("room.not_rooms", &self.room.not_rooms)?;
        self.room.ephemeral.check_limits("room.ephemeral")?;
        self.room.state.check_limits("room.state")?;
        self.room.timeline.check_limits("room.timeline")?;
        self.room.account_data.check_limits("room.account_data")
    }

    /// Applies `event_fields` (dotted paths, `\.` escaping a dot) to a client event.
    pub fn project(&self, ev: Value) -> Value {
        let Some(fields) = &self.event_fields else { return ev };
        let mut out = serde_json::Map::new();
        for f in fields {
            let path = split_path(f);
            if let Some(v) = lookup(&ev, &path) {
                insert_path(&mut out, &path, v.clone());
            }
        }
        Value::Object(out)
    }
}

fn split_path(f: &str) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = f.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'.') => {
                parts.last_mut().unwrap_or(&mut String::new()).push('.');
                chars.next();
            }
            '.' => parts.push(String::new()),
            c => {
                if let Some(p) = parts.last_mut() {
                    p.push(c)
                }
            }
        }
    }
    parts
}

fn lookup<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(k))
}

fn insert_path(out: &mut serde_json::Map<String, Value>, path: &[String], v: Value) {
    match path {
        [] => {}
        [last] => {
            out.insert(last.clone(), v);
        }
        [first, rest @ ..] => {
            let child = out.entry(first.clone()).or_insert_with(|| Value::Object(Default::default()));
            if let Value::Object(m) = child {
                insert_path(m, rest, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn wildcards() {
        assert!(glob("m.*", "m.room.message"));
        assert!(glob("*", "x"));
        assert!(glob("m.room.*age", "m.room.message"));
        assert!(!glob("m.room.*age", "m.room.member"));
        assert!(!glob("m.room.member", "m.room.member2"));
    }

    #[test]
    fn wildcards_are_linear_and_unicode_safe() {
        let started = std::time::Instant::now();
        let kind = "a".repeat(10_000);
        assert!(!glob(&format!("{}b", "*a".repeat(20)), &kind));
        assert!(glob("ü*", "über.ß"));
        assert!(!glob("*ß*x", "über.ß"));
        assert!(started.elapsed().as_millis() < 1000);
    }

    #[test]
    fn limits() {
        let many: Vec<String> = (0..=MAX_LIST_ENTRIES).map(|i| format!("m.{i}")).collect();
        for f in [
            json!({ "room": { "timeline": { "types": many } } }),
            json!({ "account_data": { "not_types": ["x".repeat(MAX_ENTRY_BYTES + 1)] } }),
            json!({ "room": { "rooms": many } }),
            json!({ "event_fields": many }),
        ] {
            let e = Filter::from_value(f).unwrap_err();
            assert_eq!((e.status.as_u16(), e.errcode), (400, "M_INVALID_PARAM"));
        }
        assert!(Filter::from_value(json!({ "room": { "timeline": { "types": ["m.*"], "limit": 5 } } })).is_ok());
    }

    proptest::proptest! {
        /// Any JSON is a filter or a 400 `M_INVALID_PARAM`, and applying a parsed filter never
        /// panics.
        #[test]
        fn arbitrary_json_parses_or_400(v in crate::http::extract::testing::json(), kind in ".{0,20}") {
            match Filter::from_value(v) {
                Ok(f) => {
                    let _ = f.account_data.allows(&kind, Some("@a:b"));
                    let _ = f.room.timeline.allows_kind(&kind, Some(&kind));
                    let _ = f.room.allows_room(&kind);
                }
                Err(e) => proptest::prop_assert_eq!((e.status.as_u16(), e.errcode), (400, "M_INVALID_PARAM")),
            }
        }
    }

    #[test]
    fn event_fields_projection() {
        let f = Filter {
            event_fields: Some(vec!["type".into(), "content.body".into(), "content.m\\.x".into()]),
            ..Default::default()
        };
        let ev = json!({"type": "m.room.message", "sender": "@a:x", "content": {"body": "hi", "msgtype": "m.text", "m.x": 1}});
        assert_eq!(f.project(ev), json!({"type": "m.room.message", "content": {"body": "hi", "m.x": 1}}));
    }
}
