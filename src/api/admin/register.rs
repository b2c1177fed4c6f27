//! Shared-secret registration, exactly as Synapse's `/_synapse/admin/v1/register`:
//! `GET` hands out a single-use nonce; `POST` carries
//! `mac = hex(HMAC-SHA1(secret, nonce \0 username \0 password \0 ("admin"|"notadmin") [\0 user_type]))`.

use axum::extract::State;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::{Value, json};
use sha1::Sha1;
use subtle::ConstantTimeEq;

use crate::error::{ApiResult, Error};
use crate::http::extract::{ClientIp, Json};
use crate::state::AppState;
use crate::storage::{self, now_ms};
use crate::users;

/// How long a nonce stays usable (Synapse: 60 s).
const NONCE_LIFETIME_MS: i64 = 60_000;

fn secret(state: &AppState) -> ApiResult<&str> {
    state.config.registration.shared_secret.as_deref().ok_or_else(|| {
        Error::new(axum::http::StatusCode::BAD_REQUEST, "M_UNKNOWN", "Shared secret registration is not enabled")
    })
}

pub async fn nonce(State(state): State<AppState>) -> ApiResult<axum::Json<Value>> {
    secret(&state)?;
    storage::registration::delete_expired_nonces(&state.db, now_ms() - NONCE_LIFETIME_MS).await?;
    let nonce = hex::encode(rand::random::<[u8; 16]>());
    storage::registration::insert_nonce(&state.db, &nonce).await?;
    Ok(axum::Json(json!({ "nonce": nonce })))
}

#[derive(Deserialize)]
pub struct SharedSecretBody {
    nonce: Option<String>,
    username: Option<String>,
    password: Option<String>,
    #[serde(default)]
    admin: bool,
    user_type: Option<String>,
    displayname: Option<String>,
    mac: Option<String>,
}

pub fn compute_mac(
    secret: &str,
    nonce: &str,
    user: &str,
    password: &str,
    admin: bool,
    user_type: Option<&str>,
) -> String {
    let mut mac = Hmac::<Sha1>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(nonce.as_bytes());
    mac.update(b"\x00");
    mac.update(user.as_bytes());
    mac.update(b"\x00");
    mac.update(password.as_bytes());
    mac.update(b"\x00");
    mac.update(if admin { b"admin" } else { b"notadmin" });
    if let Some(t) = user_type {
        mac.update(b"\x00");
        mac.update(t.as_bytes());
    }
    hex::encode(mac.finalize().into_bytes())
}

pub async fn register(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    Json(body): Json<SharedSecretBody>,
) -> ApiResult<axum::Json<Value>> {
    let secret = secret(&state)?.to_owned();
    state.rate_limits.check(&state.rate_limits.registration_per_ip, &ip.to_string())?;
    let nonce = body.nonce.ok_or_else(|| Error::missing_param("nonce must be specified"))?;
    let username = body.username.ok_or_else(|| Error::missing_param("username must be specified"))?;
    let password = body.password.ok_or_else(|| Error::missing_param("password must be specified"))?;
    let mac = body.mac.ok_or_else(|| Error::missing_param("mac must be specified"))?;
    if let Some(t) = &body.user_type
        && !["bot", "support"].contains(&t.as_str())
    {
        return Err(Error::invalid_param("Invalid user type"));
    }
    if !storage::registration::take_nonce(&state.db, &nonce, now_ms() - NONCE_LIFETIME_MS).await? {
        return Err(Error::unknown("unrecognised nonce"));
    }
    let expected = compute_mac(&secret, &nonce, &username, &password, body.admin, body.user_type.as_deref());
    if !bool::from(expected.as_bytes().ct_eq(mac.to_ascii_lowercase().as_bytes())) {
        return Err(Error::forbidden("HMAC incorrect"));
    }
    let user_id = users::create_account(
        &state,
        users::NewAccount {
            localpart: &username,
            password: Some(&password),
            is_admin: body.admin,
            user_type: body.user_type.as_deref(),
            displayname: body.displayname.as_deref(),
            registration_token: None,
        },
    )
    .await?;
    let (device_id, tokens) =
        crate::auth::start_device_session(&state, &user_id, None, None, Some(&ip.to_string()), false).await?;
    Ok(axum::Json(json!({
        "user_id": user_id,
        "access_token": tokens.access_token,
        "device_id": device_id,
        "home_server": state.config.server_name,
    })))
}

#[cfg(test)]
mod tests {
    #[test]
    fn mac_matches_synapse() {
        // Computed with Synapse's algorithm in Python:
        // hmac.new(b"s3cret", b"abc\x00alice\x00pw\x00notadmin", hashlib.sha1).hexdigest()
        assert_eq!(
            super::compute_mac("s3cret", "abc", "alice", "pw", false, None),
            "d7cd8fe38bb2b37bacf757920ef46050075d427d"
        );
        // ... with b"abc\x00bob\x00pw\x00admin\x00bot"
        assert_eq!(
            super::compute_mac("s3cret", "abc", "bob", "pw", true, Some("bot")),
            "cc0680de8a10db17d3a649897781538900553879"
        );
    }
}
