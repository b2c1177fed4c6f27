//! Login, token refresh and logout.

use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::auth::{self, hash_token};
use crate::error::{ApiResult, Error};
use crate::http::extract::{Auth, ClientIp, Json};
use crate::state::AppState;
use crate::{storage, users};

/// `GET /login`: password login, and with SSO providers configured, `m.login.sso` (each
/// provider a button) and `m.login.token` (how an SSO login finishes).
pub async fn flows(State(state): State<AppState>) -> axum::Json<Value> {
    let mut flows = vec![json!({ "type": "m.login.password" })];
    if !state.appservices.is_empty() {
        flows.push(json!({ "type": super::register::APPSERVICE_LOGIN }));
    }
    if state.sso.enabled() {
        let idps: Vec<Value> = state
            .sso
            .providers()
            .map(|p| {
                let mut idp = json!({ "id": p.id, "name": p.name });
                if let Some(b) = &p.brand {
                    idp["brand"] = json!(b);
                }
                if let Some(i) = &p.icon {
                    idp["icon"] = json!(i);
                }
                idp
            })
            .collect();
        let mut sso = json!({ "type": "m.login.sso", "identity_providers": idps });
        // Spec v1.18 "OAuth 2.0 aware clients": with the OAuth 2.0 API on, SSO is preferred.
        if crate::oauth::base(&state).is_some() {
            sso["oauth_aware_preferred"] = json!(true);
        }
        flows.push(sso);
        flows.push(json!({ "type": "m.login.token" }));
    }
    axum::Json(json!({ "flows": flows }))
}

#[derive(Deserialize)]
pub struct LoginBody {
    #[serde(rename = "type")]
    kind: String,
    identifier: Option<Identifier>,
    /// Deprecated top-level user name, still sent by some clients.
    user: Option<String>,
    password: Option<String>,
    /// `m.login.token`: the single-use token of an SSO login.
    token: Option<String>,
    device_id: Option<String>,
    initial_device_display_name: Option<String>,
    #[serde(default)]
    refresh_token: bool,
}

#[derive(Deserialize)]
pub struct Identifier {
    #[serde(rename = "type")]
    kind: String,
    user: Option<String>,
}

pub async fn login(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    headers: axum::http::HeaderMap,
    uri: axum::http::Uri,
    Json(body): Json<LoginBody>,
) -> ApiResult<axum::Json<Value>> {
    let ip = ip.to_string();
    if body.kind == super::register::APPSERVICE_LOGIN {
        return appservice_login(&state, &headers, &uri, &ip, &body).await;
    }
    state.rate_limits.check(&state.rate_limits.login_per_ip, &ip)?;
    if body.kind == "m.login.token" {
        return token_login(&state, &ip, &body).await;
    }
    if body.kind != "m.login.password" {
        return Err(Error::unknown(format!("Unknown login type {}", body.kind)));
    }
    let name = match &body.identifier {
        Some(Identifier { kind, user }) if kind == "m.id.user" => user.clone(),
        Some(Identifier { kind, .. }) => {
            return Err(Error::unknown(format!("Unsupported identifier type {kind}")));
        }
        None => body.user.clone(),
    }
    .ok_or_else(|| Error::bad_json("identifier.user is required"))?;
    let password = body.password.as_deref().ok_or_else(|| Error::bad_json("password is required"))?;
    let (user_id, _) = users::parse_login_user(&name, &state.config.server_name)?;
    state.rate_limits.check(&state.rate_limits.login_per_account, &user_id)?;

    let user = storage::users::get(&state.db, &user_id).await?;
    // The password is always checked first (against a dummy hash for unknown users): a wrong
    // password gets the same answer, in the same time, whether the account exists, is active or
    // is deactivated. Only the right password learns that the account is deactivated.
    let hash = user.as_ref().and_then(|u| u.password_hash.as_deref());
    if !state.passwords.verify(password, hash).await {
        tracing::info!(user_id, "failed login");
        return Err(Error::forbidden("Invalid username or password"));
    }
    if user.as_ref().is_some_and(|u| u.deactivated) {
        return Err(Error::user_deactivated());
    }
    let (device_id, tokens) = auth::start_device_session(
        &state,
        &user_id,
        body.device_id.as_deref(),
        body.initial_device_display_name.as_deref(),
        Some(&ip),
        body.refresh_token,
    )
    .await?;
    Ok(axum::Json(login_response(&state, &user_id, &device_id, tokens)))
}

/// `m.login.application_service`: the appservice's `as_token` opens a device session for a
/// user of its namespace (no password).
async fn appservice_login(
    state: &AppState,
    headers: &axum::http::HeaderMap,
    uri: &axum::http::Uri,
    ip: &str,
    body: &LoginBody,
) -> ApiResult<axum::Json<Value>> {
    let reg = super::register::appservice_of(state, headers, uri)?;
    let name = match &body.identifier {
        Some(Identifier { kind, user }) if kind == "m.id.user" => user.clone(),
        Some(Identifier { kind, .. }) => {
            return Err(Error::unknown(format!("Unsupported identifier type {kind}")));
        }
        None => body.user.clone(),
    }
    .ok_or_else(|| Error::bad_json("identifier.user is required"))?;
    let (user_id, _) = users::parse_login_user(&name, &state.config.server_name)?;
    if !reg.can_control(&user_id) {
        return Err(Error::forbidden("The user is not in the application service's namespace"));
    }
    let user = storage::users::get(&state.db, &user_id).await?;
    match user {
        None => return Err(Error::forbidden("Application service has not registered this user")),
        Some(u) if u.deactivated => return Err(Error::user_deactivated()),
        Some(_) => {}
    }
    let (device_id, tokens) = auth::start_device_session(
        state,
        &user_id,
        body.device_id.as_deref(),
        body.initial_device_display_name.as_deref(),
        Some(ip),
        body.refresh_token,
    )
    .await?;
    Ok(axum::Json(login_response(state, &user_id, &device_id, tokens)))
}

/// `m.login.token`: consumes the token (single use, expired or not) and opens a device session
/// that remembers its provider session (for RP-initiated and back-channel logout).
async fn token_login(state: &AppState, ip: &str, body: &LoginBody) -> ApiResult<axum::Json<Value>> {
    let token = body.token.as_deref().ok_or_else(|| Error::bad_json("token is required"))?;
    if token.is_empty() || token.len() > 256 {
        return Err(Error::forbidden("Invalid login token"));
    }
    let mut conn = state.db.acquire().await?;
    let found = storage::sso::take_login_token(&mut conn, &hash_token(token)).await?;
    drop(conn);
    let Some(found) = found.filter(|t| t.expires_ts >= storage::now_ms()) else {
        tracing::info!("invalid or expired login token");
        return Err(Error::forbidden("Invalid login token"));
    };
    let user = storage::users::get(&state.db, &found.user_id).await?;
    if user.as_ref().is_none_or(|u| u.deactivated) {
        return Err(Error::user_deactivated());
    }
    let (device_id, tokens) = auth::start_device_session(
        state,
        &found.user_id,
        body.device_id.as_deref(),
        body.initial_device_display_name.as_deref(),
        Some(ip),
        body.refresh_token,
    )
    .await?;
    let mut conn = state.db.acquire().await?;
    storage::sso::insert_device_session(&mut conn, &found.user_id, &device_id, &found).await?;
    Ok(axum::Json(login_response(state, &found.user_id, &device_id, tokens)))
}

fn login_response(state: &AppState, user_id: &str, device_id: &str, tokens: auth::IssuedTokens) -> Value {
    let mut resp = json!({
        "user_id": user_id,
        "access_token": tokens.access_token,
        "device_id": device_id,
        "home_server": state.config.server_name,
    });
    if let Some(rt) = tokens.refresh_token {
        resp["refresh_token"] = json!(rt);
        resp["expires_in_ms"] = json!(tokens.expires_in_ms);
    }
    if let Some(base) = state.config.client_base_url() {
        resp["well_known"] = json!({ "m.homeserver": { "base_url": base } });
    }
    resp
}

#[derive(Deserialize)]
pub struct RefreshBody {
    refresh_token: String,
}

pub async fn refresh(State(state): State<AppState>, Json(body): Json<RefreshBody>) -> ApiResult<axum::Json<Value>> {
    let mut tx = state.db.begin().await?;
    let Some((user_id, device_id, revoked)) =
        storage::tokens::take_refresh(&mut tx, &hash_token(&body.refresh_token)).await?
    else {
        return Err(Error::unknown_token(false));
    };
    let tokens = state.auth.issue(&mut tx, &user_id, &device_id, true).await?;
    tx.commit().await?;
    state.auth.evict(&revoked).await;
    Ok(axum::Json(json!({
        "access_token": tokens.access_token,
        "refresh_token": tokens.refresh_token,
        "expires_in_ms": tokens.expires_in_ms,
    })))
}

/// Logs out this device: the spec deletes the device along with the token.
pub async fn logout(State(state): State<AppState>, auth: Auth) -> ApiResult<axum::Json<Value>> {
    auth::delete_devices(&state, &auth.user_id, &[auth.device_id.to_string()]).await?;
    // The token may belong to no device row any more (cascade already removed it); be explicit.
    storage::tokens::delete_access(&state.db, &auth.token_hash).await?;
    state.auth.evict_one(&auth.token_hash).await;
    Ok(axum::Json(json!({})))
}

pub async fn logout_all(State(state): State<AppState>, auth: Auth) -> ApiResult<axum::Json<Value>> {
    auth::delete_other_devices(&state, &auth.user_id, None).await?;
    state.auth.evict_one(&auth.token_hash).await;
    Ok(axum::Json(json!({})))
}
