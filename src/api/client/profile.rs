//! Profiles: `GET /profile/{userId}` and per-field get/set/delete (`displayname`, `avatar_url`
//! and custom fields).

use axum::extract::State;
use serde_json::{Map, Value, json};

use crate::error::{ApiResult, Error};
use crate::http::extract::{Auth, Json, Path};
use crate::state::AppState;
use crate::storage;
use crate::users::profile;

async fn load(state: &AppState, user_id: &str) -> ApiResult<Map<String, Value>> {
    let (_, server) = user_id
        .strip_prefix('@')
        .and_then(|r| r.split_once(':'))
        .ok_or_else(|| Error::invalid_param("Invalid user ID"))?;
    if server != state.config.server_name {
        let uid = <&ruma::UserId>::try_from(user_id).map_err(|_| Error::invalid_param("Invalid user ID"))?;
        return crate::federation::membership::remote_profile(state, uid).await;
    }
    let mut user = storage::users::get(&state.db, user_id).await?;
    if user.is_none() && crate::appservice::user_exists(state, user_id).await? {
        user = storage::users::get(&state.db, user_id).await?;
    }
    if user.is_none_or(|u| u.deactivated) {
        return Err(Error::not_found("Profile not found"));
    }
    storage::profiles::get(&state.db, user_id).await?.ok_or_else(|| Error::not_found("Profile not found"))
}

pub async fn get_profile(State(state): State<AppState>, Path(user_id): Path<String>) -> ApiResult<axum::Json<Value>> {
    Ok(axum::Json(Value::Object(load(&state, &user_id).await?)))
}

pub async fn get_field(
    State(state): State<AppState>,
    Path((user_id, key)): Path<(String, String)>,
) -> ApiResult<axum::Json<Value>> {
    let p = load(&state, &user_id).await?;
    let v = p.get(&key).ok_or_else(|| Error::not_found(format!("Profile has no {key}")))?;
    Ok(axum::Json(json!({ key: v })))
}

fn ensure_own(auth: &Auth, user_id: &str) -> ApiResult<()> {
    if &*auth.user_id != user_id && !auth.is_admin {
        return Err(Error::forbidden("Cannot change another user's profile"));
    }
    Ok(())
}

pub async fn set_field(
    State(state): State<AppState>,
    auth: Auth,
    Path((user_id, key)): Path<(String, String)>,
    Json(body): Json<Map<String, Value>>,
) -> ApiResult<axum::Json<Value>> {
    ensure_own(&auth, &user_id)?;
    let value = body.get(&key).ok_or_else(|| Error::bad_json(format!("Body must contain `{key}`")))?;
    if body.len() != 1 {
        return Err(Error::bad_json(format!("Body must contain only `{key}`")));
    }
    let value = if value.is_null() { None } else { Some(value.clone()) };
    profile::set_field(&state, &user_id, &key, value).await?;
    Ok(axum::Json(json!({})))
}

pub async fn delete_field(
    State(state): State<AppState>,
    auth: Auth,
    Path((user_id, key)): Path<(String, String)>,
) -> ApiResult<axum::Json<Value>> {
    ensure_own(&auth, &user_id)?;
    profile::set_field(&state, &user_id, &key, None).await?;
    Ok(axum::Json(json!({})))
}
