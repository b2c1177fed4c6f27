//! Filters (`POST /user/{userId}/filter`, `GET /user/{userId}/filter/{filterId}`): validated
//! against the spec's `Filter` shape, stored as sent, referenced by ID in `/sync`.

use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::{ApiResult, Error};
use crate::http::extract::{Auth, Json, Path};
use crate::state::AppState;
use crate::storage;
use crate::sync::filter::MAX_FILTER_BYTES;

/// The spec's `Filter`; unknown fields are allowed (clients send extensions), known ones must
/// have the right types.
#[derive(Deserialize)]
#[allow(dead_code)]
struct Filter {
    event_fields: Option<Vec<String>>,
    event_format: Option<EventFormat>,
    presence: Option<EventFilter>,
    account_data: Option<EventFilter>,
    room: Option<RoomFilter>,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum EventFormat {
    Client,
    Federation,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct EventFilter {
    limit: Option<u32>,
    types: Option<Vec<String>>,
    not_types: Option<Vec<String>>,
    senders: Option<Vec<String>>,
    not_senders: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct RoomFilter {
    rooms: Option<Vec<String>>,
    not_rooms: Option<Vec<String>>,
    include_leave: Option<bool>,
    ephemeral: Option<RoomEventFilter>,
    state: Option<RoomEventFilter>,
    timeline: Option<RoomEventFilter>,
    account_data: Option<RoomEventFilter>,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct RoomEventFilter {
    limit: Option<u32>,
    types: Option<Vec<String>>,
    not_types: Option<Vec<String>>,
    senders: Option<Vec<String>>,
    not_senders: Option<Vec<String>>,
    rooms: Option<Vec<String>>,
    not_rooms: Option<Vec<String>>,
    contains_url: Option<bool>,
    include_redundant_members: Option<bool>,
    lazy_load_members: Option<bool>,
    unread_thread_notifications: Option<bool>,
}

/// A filter as uploaded: the spec's shape (`M_BAD_JSON` naming the field), at most
/// [`MAX_FILTER_BYTES`] of JSON and within the list limits `/sync` enforces
/// (`crate::sync::filter`), so that a stored filter is always usable.
fn validate(body: &Value) -> ApiResult<()> {
    serde_path_to_error::deserialize::<_, Filter>(body)
        .map_err(|e| Error::bad_json(format!("{}: {}", e.path(), e.inner())))?;
    if serde_json::to_vec(body).map(|b| b.len()).unwrap_or(usize::MAX) > MAX_FILTER_BYTES {
        return Err(Error::bad_json(format!("Filter is larger than {MAX_FILTER_BYTES} bytes")));
    }
    let parsed = crate::sync::filter::Filter::from_value(body.clone()).map_err(|e| Error::bad_json(e.message))?;
    parsed.check_limits().map_err(|e| Error::bad_json(format!("Filter too large: {e}")))
}

fn ensure_self(auth: &Auth, user_id: &str) -> ApiResult<()> {
    if *auth.user_id != *user_id {
        return Err(Error::forbidden("Cannot use filters of another user"));
    }
    Ok(())
}

pub async fn create(
    State(state): State<AppState>,
    auth: Auth,
    Path(user_id): Path<String>,
    Json(body): Json<Value>,
) -> ApiResult<axum::Json<Value>> {
    ensure_self(&auth, &user_id)?;
    validate(&body)?;
    let id = storage::filters::insert(&state.db, &user_id, &body).await?;
    Ok(axum::Json(json!({ "filter_id": id.to_string() })))
}

pub async fn get(
    State(state): State<AppState>,
    auth: Auth,
    Path((user_id, filter_id)): Path<(String, String)>,
) -> ApiResult<axum::Json<Value>> {
    ensure_self(&auth, &user_id)?;
    let not_found = || Error::not_found("No such filter");
    let nid: i64 = filter_id.parse().map_err(|_| not_found())?;
    storage::filters::get(&state.db, &user_id, nid).await?.map(axum::Json).ok_or_else(not_found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn limits() {
        assert!(validate(&json!({ "room": { "timeline": { "types": ["m.*"] } } })).is_ok());
        let many: Vec<String> = (0..501).map(|i| format!("t{i}")).collect();
        let e = validate(&json!({ "room": { "timeline": { "not_types": many } } })).unwrap_err();
        assert_eq!((e.status.as_u16(), e.errcode), (400, "M_BAD_JSON"));
        let e = validate(&json!({ "presence": { "types": ["x".repeat(256)] } })).unwrap_err();
        assert_eq!((e.status.as_u16(), e.errcode), (400, "M_BAD_JSON"));
        let e = validate(&json!({ "junk": "x".repeat(MAX_FILTER_BYTES) })).unwrap_err();
        assert_eq!((e.status.as_u16(), e.errcode), (400, "M_BAD_JSON"));
    }

    proptest! {
        /// Any JSON object is either a valid filter or a 400 `M_BAD_JSON`, never a panic.
        #[test]
        fn arbitrary_json_is_accepted_or_400(v in crate::http::extract::testing::filter_like_json()) {
            if let Err(e) = validate(&v) {
                prop_assert_eq!((e.status.as_u16(), e.errcode), (400, "M_BAD_JSON"));
            }
        }
    }
}
