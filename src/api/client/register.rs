//! Registration: `/register` with user-interactive auth, `/register/available`, and
//! registration-token validity.

use axum::extract::State;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::auth::uia;
use crate::error::{ApiResult, Error};
use crate::http::extract::{ClientIp, Json, Query};
use crate::state::AppState;
use crate::{storage, users};

#[derive(Deserialize)]
pub struct RegisterQuery {
    #[serde(default)]
    kind: Option<String>,
}

#[derive(Deserialize)]
pub struct RegisterBody {
    /// `m.login.application_service`: an appservice registers a user of its namespace.
    #[serde(rename = "type")]
    kind: Option<String>,
    username: Option<String>,
    password: Option<String>,
    device_id: Option<String>,
    initial_device_display_name: Option<String>,
    #[serde(default)]
    inhibit_login: bool,
    #[serde(default)]
    refresh_token: bool,
    auth: Option<Value>,
}

#[derive(Serialize)]
pub struct RegisterResponse {
    user_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    access_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    device_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    refresh_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_in_ms: Option<i64>,
    home_server: String,
}

fn ensure_enabled(state: &AppState) -> ApiResult<()> {
    if !state.config.registration.enabled {
        return Err(Error::forbidden("Registration has been disabled"));
    }
    Ok(())
}

fn flows(state: &AppState) -> Vec<Vec<&'static str>> {
    if state.config.registration.require_token { vec![vec![uia::REGISTRATION_TOKEN]] } else { vec![vec![uia::DUMMY]] }
}

pub async fn register(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    Query(q): Query<RegisterQuery>,
    headers: axum::http::HeaderMap,
    uri: axum::http::Uri,
    Json(body): Json<RegisterBody>,
) -> ApiResult<axum::Json<RegisterResponse>> {
    if body.kind.as_deref() == Some(APPSERVICE_LOGIN) {
        return appservice_register(&state, &headers, &uri, &ip.to_string(), body).await;
    }
    state.rate_limits.check(&state.rate_limits.registration_per_ip, &ip.to_string())?;
    match q.kind.as_deref() {
        None | Some("user") => {}
        Some("guest") => {
            return Err(Error::new(
                axum::http::StatusCode::FORBIDDEN,
                "M_GUEST_ACCESS_FORBIDDEN",
                "Guest access is disabled",
            ));
        }
        Some(_) => return Err(Error::invalid_param("kind must be `user` or `guest`")),
    }
    ensure_enabled(&state)?;
    // Check everything the client can fix *before* asking it to authenticate.
    let localpart = match &body.username {
        Some(u) => u.to_lowercase(),
        None => random_localpart(),
    };
    users::validate_new_localpart(&localpart, &state.config.server_name)?;
    users::check_not_reserved(&state, &localpart)?;
    let user_id = format!("@{localpart}:{}", state.config.server_name);
    if storage::users::exists(&state.db, &user_id).await? {
        return Err(Error::user_in_use());
    }
    if let Some(p) = &body.password {
        users::check_password_policy(&state, p)?;
    }

    let outcome = uia::check(&state, "register", None, &flows(&state), body.auth.as_ref()).await?;

    let user_id = users::create_account(
        &state,
        users::NewAccount {
            localpart: &localpart,
            password: body.password.as_deref(),
            is_admin: false,
            user_type: None,
            displayname: None,
            registration_token: outcome.registration_token.as_deref(),
        },
    )
    .await?;
    registered(&state, user_id, &body, &ip.to_string()).await
}

pub const APPSERVICE_LOGIN: &str = "m.login.application_service";

/// The appservice authenticating a request by its `as_token` (header or `access_token`).
pub fn appservice_of(
    state: &AppState,
    headers: &axum::http::HeaderMap,
    uri: &axum::http::Uri,
) -> ApiResult<std::sync::Arc<crate::appservice::Registration>> {
    let token = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
        .map(|t| t.trim().to_owned())
        .or_else(|| {
            url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
                .find(|(k, _)| k == "access_token")
                .map(|(_, v)| v.into_owned())
        })
        .ok_or_else(Error::missing_token)?;
    state.appservices.by_token(&token).cloned().ok_or_else(|| Error::unknown_token(false))
}

/// `POST /register` with `type: m.login.application_service`: the appservice's `as_token`
/// registers a user of its user namespace (whether or not registration is open; no UIA).
async fn appservice_register(
    state: &AppState,
    headers: &axum::http::HeaderMap,
    uri: &axum::http::Uri,
    ip: &str,
    body: RegisterBody,
) -> ApiResult<axum::Json<RegisterResponse>> {
    let reg = appservice_of(state, headers, uri)?;
    let localpart =
        body.username.as_deref().ok_or_else(|| Error::missing_param("username is required"))?.to_lowercase();
    users::validate_new_localpart(&localpart, &state.config.server_name)?;
    let user_id = format!("@{localpart}:{}", state.config.server_name);
    if !reg.is_interested_in_user(&user_id) {
        return Err(Error::new(
            axum::http::StatusCode::BAD_REQUEST,
            "M_EXCLUSIVE",
            "User ID is not in the application service's namespace",
        ));
    }
    if let Some(owner) = state.appservices.exclusive_user_owner(&user_id)
        && owner.id != reg.id
    {
        return Err(Error::new(
            axum::http::StatusCode::BAD_REQUEST,
            "M_EXCLUSIVE",
            "User ID is reserved by another application service",
        ));
    }
    let user_id = users::create_appservice_account(state, &localpart).await?;
    registered(state, user_id, &body, ip).await
}

/// The answer to a successful registration: a device session unless `inhibit_login`.
async fn registered(
    state: &AppState,
    user_id: String,
    body: &RegisterBody,
    ip: &str,
) -> ApiResult<axum::Json<RegisterResponse>> {
    let home_server = state.config.server_name.clone();
    if body.inhibit_login {
        return Ok(axum::Json(RegisterResponse {
            user_id,
            access_token: None,
            device_id: None,
            refresh_token: None,
            expires_in_ms: None,
            home_server,
        }));
    }
    let (device_id, tokens) = crate::auth::start_device_session(
        state,
        &user_id,
        body.device_id.as_deref(),
        body.initial_device_display_name.as_deref(),
        Some(ip),
        body.refresh_token,
    )
    .await?;
    Ok(axum::Json(RegisterResponse {
        user_id,
        access_token: Some(tokens.access_token),
        device_id: Some(device_id),
        refresh_token: tokens.refresh_token,
        expires_in_ms: tokens.expires_in_ms,
        home_server,
    }))
}

fn random_localpart() -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    (0..12).map(|_| (b'a' + rng.gen_range(0..26)) as char).collect()
}

#[derive(Deserialize)]
pub struct AvailableQuery {
    username: String,
}

pub async fn available(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    Query(q): Query<AvailableQuery>,
) -> ApiResult<axum::Json<Value>> {
    ensure_enabled(&state)?;
    state.rate_limits.check(&state.rate_limits.registration_per_ip, &ip.to_string())?;
    let localpart = q.username.to_lowercase();
    users::validate_new_localpart(&localpart, &state.config.server_name)?;
    users::check_not_reserved(&state, &localpart)?;
    if storage::users::exists(&state.db, &format!("@{localpart}:{}", state.config.server_name)).await? {
        return Err(Error::user_in_use());
    }
    Ok(axum::Json(json!({ "available": true })))
}

#[derive(Deserialize)]
pub struct ValidityQuery {
    token: String,
}

pub async fn token_validity(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    Query(q): Query<ValidityQuery>,
) -> ApiResult<axum::Json<Value>> {
    ensure_enabled(&state)?;
    state.rate_limits.check(&state.rate_limits.registration_per_ip, &ip.to_string())?;
    let valid = q.token.len() <= 64 && storage::registration::token_is_valid(&state.db, &q.token).await?;
    Ok(axum::Json(json!({ "valid": valid })))
}
