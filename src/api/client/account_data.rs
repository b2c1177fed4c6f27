//! Client config (account data, global and per room) and room tags, which are stored as room
//! account data of type `m.tag` so that sync delivers them like any other account data.

use axum::extract::State;
use serde_json::{Map, Value, json};

use crate::error::{ApiResult, Error};
use crate::http::extract::{Auth, Json, Path};
use crate::rooms::Room;
use crate::state::AppState;
use crate::storage;

/// Types the server maintains itself: `m.fully_read` through `/read_markers` and `/receipt`,
/// `m.push_rules` through the push rules API.
const SERVER_CONTROLLED: &[&str] = &["m.fully_read", "m.push_rules"];

/// Keeps keys of the primary key index bounded.
const MAX_NAME_BYTES: usize = 255;

/// Account data is private: not even server admins may use another user's.
fn ensure_self(auth: &Auth, user_id: &str) -> ApiResult<()> {
    if &*auth.user_id != user_id {
        return Err(Error::forbidden("Cannot access account data of other users"));
    }
    Ok(())
}

fn check_name(what: &str, name: &str) -> ApiResult<()> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(Error::invalid_param(format!("The {what} must be 1 to {MAX_NAME_BYTES} bytes long")));
    }
    Ok(())
}

fn ensure_client_writable(data_type: &str) -> ApiResult<()> {
    if SERVER_CONTROLLED.contains(&data_type) {
        return Err(Error::new(
            axum::http::StatusCode::METHOD_NOT_ALLOWED,
            "M_BAD_JSON",
            format!("Cannot set {data_type} through this API"),
        ));
    }
    Ok(())
}

/// A room the caller names: 400 `M_INVALID_PARAM` if the ID is malformed, 404 if unknown.
async fn known_room(state: &AppState, room_id: &str) -> ApiResult<Room> {
    <&ruma::RoomId>::try_from(room_id)
        .map_err(|_| Error::invalid_param(format!("{room_id} is not a valid room ID")))?;
    Room::load(state, room_id).await
}

pub async fn get_global(
    State(state): State<AppState>,
    auth: Auth,
    Path((user_id, data_type)): Path<(String, String)>,
) -> ApiResult<axum::Json<Value>> {
    ensure_self(&auth, &user_id)?;
    let content = storage::account_data::get(&state.db, &user_id, None, &data_type)
        .await?
        .ok_or_else(|| Error::not_found("Account data not found"))?;
    Ok(axum::Json(content))
}

pub async fn put_global(
    State(state): State<AppState>,
    auth: Auth,
    Path((user_id, data_type)): Path<(String, String)>,
    Json(body): Json<Map<String, Value>>,
) -> ApiResult<axum::Json<Value>> {
    ensure_self(&auth, &user_id)?;
    check_name("account data type", &data_type)?;
    ensure_client_writable(&data_type)?;
    let pos = storage::account_data::set(&state.db, &user_id, None, &data_type, &Value::Object(body)).await?;
    crate::push::eval::account_data_changed(&state, &user_id, &data_type);
    crate::sync::account_data_changed(&state, &user_id, pos);
    Ok(axum::Json(json!({})))
}

pub async fn get_room(
    State(state): State<AppState>,
    auth: Auth,
    Path((user_id, room_id, data_type)): Path<(String, String, String)>,
) -> ApiResult<axum::Json<Value>> {
    ensure_self(&auth, &user_id)?;
    let room = known_room(&state, &room_id).await?;
    let content = storage::account_data::get(&state.db, &user_id, Some(room.room_id.as_str()), &data_type)
        .await?
        .ok_or_else(|| Error::not_found("Room account data not found"))?;
    Ok(axum::Json(content))
}

pub async fn put_room(
    State(state): State<AppState>,
    auth: Auth,
    Path((user_id, room_id, data_type)): Path<(String, String, String)>,
    Json(body): Json<Map<String, Value>>,
) -> ApiResult<axum::Json<Value>> {
    ensure_self(&auth, &user_id)?;
    check_name("account data type", &data_type)?;
    ensure_client_writable(&data_type)?;
    let room = known_room(&state, &room_id).await?;
    let pos =
        storage::account_data::set(&state.db, &user_id, Some(room.room_id.as_str()), &data_type, &Value::Object(body))
            .await?;
    crate::sync::account_data_changed(&state, &user_id, pos);
    Ok(axum::Json(json!({})))
}

// ---- tags -------------------------------------------------------------------------------

pub async fn get_tags(
    State(state): State<AppState>,
    auth: Auth,
    Path((user_id, room_id)): Path<(String, String)>,
) -> ApiResult<axum::Json<Value>> {
    ensure_self(&auth, &user_id)?;
    let room = known_room(&state, &room_id).await?;
    let content = storage::account_data::get(&state.db, &user_id, Some(room.room_id.as_str()), "m.tag").await?;
    // `m.tag` may also have been written raw through the account data API: serve only an object.
    let tags = content.and_then(|mut c| c.get_mut("tags").map(Value::take)).filter(Value::is_object);
    Ok(axum::Json(json!({ "tags": tags.unwrap_or_else(|| json!({})) })))
}

pub async fn put_tag(
    State(state): State<AppState>,
    auth: Auth,
    Path((user_id, room_id, tag)): Path<(String, String, String)>,
    Json(body): Json<Map<String, Value>>,
) -> ApiResult<axum::Json<Value>> {
    ensure_self(&auth, &user_id)?;
    check_name("tag", &tag)?;
    if body.get("order").is_some_and(|o| !o.is_number()) {
        return Err(Error::bad_json("order: must be a number"));
    }
    let room = known_room(&state, &room_id).await?;
    let pos =
        storage::account_data::set_tag(&state.db, &user_id, room.room_id.as_str(), &tag, &Value::Object(body)).await?;
    crate::sync::account_data_changed(&state, &user_id, pos);
    Ok(axum::Json(json!({})))
}

pub async fn delete_tag(
    State(state): State<AppState>,
    auth: Auth,
    Path((user_id, room_id, tag)): Path<(String, String, String)>,
) -> ApiResult<axum::Json<Value>> {
    ensure_self(&auth, &user_id)?;
    let room = known_room(&state, &room_id).await?;
    // Removing a tag that is not set succeeds (the end state is what the client asked for).
    if let Some(pos) = storage::account_data::remove_tag(&state.db, &user_id, room.room_id.as_str(), &tag).await? {
        crate::sync::account_data_changed(&state, &user_id, pos);
    }
    Ok(axum::Json(json!({})))
}
