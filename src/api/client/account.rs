//! Account management: whoami, password change, deactivation.

use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::{self, uia};
use crate::error::ApiResult;
use crate::http::extract::{Auth, Json};
use crate::state::AppState;
use crate::users::profile::{ProfileChange, after_profile_change};
use crate::{storage, users};

pub async fn whoami(auth: Auth) -> axum::Json<Value> {
    axum::Json(json!({
        "user_id": &*auth.user_id,
        "device_id": &*auth.device_id,
        "is_guest": false,
    }))
}

fn password_flow() -> Vec<Vec<&'static str>> {
    vec![vec![uia::PASSWORD]]
}

#[derive(Deserialize)]
pub struct PasswordBody {
    new_password: String,
    #[serde(default = "yes")]
    logout_devices: bool,
    auth: Option<Value>,
}

fn yes() -> bool {
    true
}

pub async fn change_password(
    State(state): State<AppState>,
    auth: Auth,
    line: uia::RequestLine,
    Json(raw): Json<Value>,
) -> ApiResult<axum::Json<Value>> {
    let body: PasswordBody = uia::parse_body(&raw)?;
    users::check_password_policy(&state, &body.new_password)?;
    let binding = uia::RequestBinding::new(&line, &raw);
    uia::check_bound(&state, "change_password", &auth.user_id, &password_flow(), body.auth.as_ref(), binding).await?;
    let hash = state.passwords.hash(&body.new_password).await?;
    storage::users::set_password_hash(&state.db, &auth.user_id, Some(&hash)).await?;
    if body.logout_devices {
        auth::delete_other_devices(&state, &auth.user_id, Some(&auth.device_id)).await?;
    }
    tracing::info!(user_id = %auth.user_id, "password changed");
    Ok(axum::Json(json!({})))
}

#[derive(Deserialize)]
pub struct DeactivateBody {
    auth: Option<Value>,
    #[serde(default)]
    erase: bool,
}

pub async fn deactivate(
    State(state): State<AppState>,
    auth: Auth,
    Json(body): Json<DeactivateBody>,
) -> ApiResult<axum::Json<Value>> {
    uia::check(&state, "deactivate", Some(&auth.user_id), &password_flow(), body.auth.as_ref()).await?;
    let mut tx = state.db.begin().await?;
    storage::users::deactivate(&mut *tx, &auth.user_id).await?;
    let revoked =
        storage::devices::delete(&mut *tx, &auth.user_id, storage::devices::Selection::AllExcept(None)).await?;
    if body.erase {
        storage::profiles::clear(&mut *tx, &auth.user_id).await?;
    }
    storage::directory::remove_user(&mut *tx, &auth.user_id).await?;
    tx.commit().await?;
    state.auth.evict(&revoked).await;
    state.auth.evict_one(&auth.token_hash).await;
    if body.erase {
        after_profile_change(&state, ProfileChange { user_id: auth.user_id.to_string(), profile: Default::default() });
    }
    tracing::info!(user_id = %auth.user_id, erase = body.erase, "account deactivated");
    Ok(axum::Json(json!({ "id_server_unbind_result": "no-support" })))
}
