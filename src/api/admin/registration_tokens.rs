//! Registration tokens, with Synapse's admin API shape
//! (`/_synapse/admin/v1/registration_tokens`).

use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};

use super::AdminAuth;
use crate::error::{ApiResult, Error};
use crate::http::extract::{Json, Path};
use crate::state::AppState;
use crate::storage;
use crate::storage::registration::RegistrationToken;

fn token_json(t: &RegistrationToken) -> Value {
    json!({
        "token": t.token,
        "uses_allowed": t.uses_allowed,
        "pending": 0,
        "completed": t.completed,
        "expiry_time": t.expiry_ts,
    })
}

pub async fn list(State(state): State<AppState>, _: AdminAuth) -> ApiResult<axum::Json<Value>> {
    let tokens = storage::registration::list_tokens(&state.db).await?;
    Ok(axum::Json(json!({ "registration_tokens": tokens.iter().map(token_json).collect::<Vec<_>>() })))
}

#[derive(Deserialize)]
pub struct NewToken {
    token: Option<String>,
    uses_allowed: Option<i32>,
    expiry_time: Option<i64>,
    length: Option<usize>,
}

pub async fn create(
    State(state): State<AppState>,
    _: AdminAuth,
    Json(body): Json<NewToken>,
) -> ApiResult<axum::Json<Value>> {
    let token = match body.token {
        Some(t) => {
            if t.is_empty() || t.len() > 64 || !t.chars().all(|c| c.is_ascii_alphanumeric() || "._~-".contains(c)) {
                return Err(Error::invalid_param("token must be 1-64 characters of [A-Za-z0-9._~-]"));
            }
            t
        }
        None => {
            let len = body.length.unwrap_or(16);
            if !(1..=64).contains(&len) {
                return Err(Error::invalid_param("length must be between 1 and 64"));
            }
            use rand::Rng;
            let mut rng = rand::thread_rng();
            (0..len).map(|_| rng.sample(rand::distributions::Alphanumeric) as char).collect()
        }
    };
    if body.uses_allowed.is_some_and(|u| u < 0) {
        return Err(Error::invalid_param("uses_allowed must be a non-negative integer or null"));
    }
    if body.expiry_time.is_some_and(|e| e < storage::now_ms()) {
        return Err(Error::invalid_param("expiry_time must not be in the past"));
    }
    if !storage::registration::create_token(&state.db, &token, body.uses_allowed, body.expiry_time).await? {
        return Err(Error::invalid_param("Token already exists"));
    }
    Ok(axum::Json(json!({
        "token": token, "uses_allowed": body.uses_allowed, "pending": 0, "completed": 0,
        "expiry_time": body.expiry_time,
    })))
}

pub async fn get(
    State(state): State<AppState>,
    _: AdminAuth,
    Path(token): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    let t = storage::registration::get_token(&state.db, &token)
        .await?
        .ok_or_else(|| Error::not_found("No such registration token"))?;
    Ok(axum::Json(token_json(&t)))
}

pub async fn delete(
    State(state): State<AppState>,
    _: AdminAuth,
    Path(token): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    if !storage::registration::delete_token(&state.db, &token).await? {
        return Err(Error::not_found("No such registration token"));
    }
    Ok(axum::Json(json!({})))
}
