//! Account management: whoami, password change, deactivation, third-party identifiers.

use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};

use axum::http::StatusCode;

use crate::auth::{self, uia};
use crate::error::{ApiResult, Error};
use crate::http::extract::{Auth, Json};
use crate::state::AppState;
use crate::{storage, users};

pub async fn whoami(auth: Auth) -> axum::Json<Value> {
    axum::Json(json!({
        "user_id": &*auth.user_id,
        "device_id": &*auth.device_id,
        "is_guest": false,
    }))
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
    let flows = uia::user_flows(&state, &auth.user_id).await?;
    uia::check_bound(&state, "change_password", &auth.user_id, &flows, body.auth.as_ref(), binding).await?;
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
    line: uia::RequestLine,
    Json(raw): Json<Value>,
) -> ApiResult<axum::Json<Value>> {
    let body: DeactivateBody = uia::parse_body(&raw)?;
    let binding = uia::RequestBinding::new(&line, &raw);
    let flows = uia::user_flows(&state, &auth.user_id).await?;
    uia::check_bound(&state, "deactivate", &auth.user_id, &flows, body.auth.as_ref(), binding).await?;
    users::deactivate::deactivate(&state, &auth.user_id, body.erase).await?;
    Ok(axum::Json(json!({ "id_server_unbind_result": "no-support" })))
}

// ---- third-party identifiers ------------------------------------------------------------
//
// Parvis binds no third-party identifiers (no e-mail or SMS validation, no identity server):
// the list is always empty, adding or binding one is refused, and removing one is a no-op.

/// `GET /account/3pid`.
/// `GET /account/3pid`: the e-mail address the identity provider asserts (kept in sync at each
/// SSO login) or the administrator recorded; Parvis validates no identifier itself.
pub async fn threepids(State(state): State<AppState>, auth: Auth) -> ApiResult<axum::Json<Value>> {
    let list = storage::sso::threepids(&state.db, &auth.user_id).await?;
    Ok(axum::Json(json!({ "threepids": list })))
}

/// `POST /account/3pid/add`, `/account/3pid/bind` and the deprecated `POST /account/3pid`: no
/// validation session can exist (`requestToken` is refused), so the identifier cannot be proved.
pub async fn add_threepid(_auth: Auth, Json(_body): Json<Value>) -> ApiResult<axum::Json<Value>> {
    Err(Error::new(
        StatusCode::BAD_REQUEST,
        "M_THREEPID_AUTH_FAILED",
        "This server does not support third-party identifiers: none can be added or bound",
    ))
}

/// `POST /account/3pid/delete` and `/account/3pid/unbind`: nothing is bound, nothing to remove.
pub async fn remove_threepid(_auth: Auth, Json(_body): Json<Value>) -> ApiResult<axum::Json<Value>> {
    Ok(axum::Json(json!({ "id_server_unbind_result": "no-support" })))
}

/// `POST /account/3pid/{medium}/requestToken`: no medium is supported.
pub async fn threepid_request_token(Json(_body): Json<Value>) -> ApiResult<axum::Json<Value>> {
    Err(Error::new(
        StatusCode::BAD_REQUEST,
        "M_THREEPID_MEDIUM_NOT_SUPPORTED",
        "This server does not support third-party identifiers",
    ))
}
