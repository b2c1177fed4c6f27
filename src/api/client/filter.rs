//! Filters (`POST /user/{userId}/filter`, `GET /user/{userId}/filter/{filterId}`): validated
//! against the spec's `Filter` shape, stored as sent, referenced by ID in `/sync`.

use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::{ApiResult, Error};
use crate::http::extract::{Auth, Json, Path};
use crate::state::AppState;
use crate::storage;

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

/// Largest filter accepted (they are sent back on every sync that references them).
const MAX_FILTER_BYTES: usize = 16 * 1024;

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
    serde_path_to_error::deserialize::<_, Filter>(&body)
        .map_err(|e| Error::bad_json(format!("{}: {}", e.path(), e.inner())))?;
    if serde_json::to_vec(&body).map(|b| b.len()).unwrap_or(usize::MAX) > MAX_FILTER_BYTES {
        return Err(Error::too_large("Filter is larger than 16 KiB"));
    }
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
