//! Discovery and what Element asks for at start-up: `/versions`, `.well-known`, capabilities,
//! TURN credentials, third-party protocols.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha1::Sha1;

use crate::error::{ApiResult, Error};
use crate::http::extract::Auth;
use crate::state::AppState;

/// The spec versions whose client-server API Parvis serves. Kept honest: a version is advertised
/// only once its features exist (v1.11: authenticated media; v1.13: room reports, one-time keys
/// claimed in upload order; v1.14: user reports, `/rooms/{id}/initialSync`; v1.15: the OAuth 2.0
/// API and `/auth_metadata`), since clients switch behaviour on these numbers. Not yet: v1.16. Long-standing modules
/// still missing (`/search`, `/rooms/{id}/hierarchy`) are listed in the README.
pub const SPEC_VERSIONS: &[&str] = &[
    "r0.0.1", "r0.1.0", "r0.2.0", "r0.3.0", "r0.4.0", "r0.5.0", "r0.6.0", "r0.6.1", "v1.1", "v1.2", "v1.3", "v1.4",
    "v1.5", "v1.6", "v1.7", "v1.8", "v1.9", "v1.10", "v1.11", "v1.12", "v1.13", "v1.14", "v1.15",
];

/// Unstable and pre-stabilisation feature flags clients test for, each backed by an
/// implementation (what Element Web, matrix-js-sdk and matrix-rust-sdk check):
pub const UNSTABLE_FEATURES: &[(&str, &str)] = &[
    // Element Web hides cross-signing and Secure Backup set-up without it.
    ("org.matrix.e2e_cross_signing", "/keys/device_signing/upload, /keys/signatures/upload"),
    // `GET /rooms/{id}/aliases`.
    ("org.matrix.msc2432", "room alias listing"),
    // Private read receipts (`m.read.private`), stable since v1.4.
    ("org.matrix.msc2285.stable", "private read receipts"),
    // `room_types` filter of `/publicRooms`.
    ("org.matrix.msc3827.stable", "room type filter in the room directory"),
    // Threads, threaded receipts and per-thread notification counts (js-sdk checks these flags).
    ("org.matrix.msc3440.stable", "threads"),
    ("org.matrix.msc3771", "threaded read receipts"),
    ("org.matrix.msc3773", "thread notification counts"),
    // Dehydrated devices (`api::client::dehydrated`). Clients probe the endpoint itself and
    // turn the feature on from `.well-known` (`org.matrix.msc3814` in `well_known.client_extra`).
    ("org.matrix.msc3814", "dehydrated devices"),
    // Custom profile fields on the stable endpoints (spec v1.16).
    ("uk.tcpip.msc4133.stable", "extended profiles"),
    // Delayed events (`rtc::delayed`): Element Call's delayed "leave" needs it.
    ("org.matrix.msc4140", "delayed events"),
    // `use_state_after` on `/sync` (`state_after` instead of `state`).
    ("org.matrix.msc4222", "state_after in sync"),
    // Simplified sliding sync (`sync::sliding`): Element X refuses servers without it.
    ("org.matrix.simplified_msc3575", "simplified sliding sync"),
];

pub async fn versions() -> axum::Json<Value> {
    let unstable: serde_json::Map<String, Value> =
        UNSTABLE_FEATURES.iter().map(|(k, _)| (k.to_string(), Value::Bool(true))).collect();
    axum::Json(json!({
        "versions": SPEC_VERSIONS,
        "unstable_features": unstable
    }))
}

pub async fn well_known_client(State(state): State<AppState>) -> Response {
    let Some(base) = state.config.client_base_url() else {
        return Error::not_found("No client discovery information configured").into_response();
    };
    let mut body = serde_json::Map::new();
    body.insert("m.homeserver".into(), json!({ "base_url": base }));
    if let Some(domain) = &state.config.jitsi.domain {
        body.insert("im.vector.riot.jitsi".into(), json!({ "preferredDomain": domain }));
    }
    let foci = super::rtc::rtc_foci(&state);
    if !foci.is_empty() {
        body.insert("org.matrix.msc4143.rtc_foci".into(), Value::Array(foci));
    }
    // Explicit extra keys win over the generated ones.
    for (k, v) in &state.config.well_known.client_extra {
        body.insert(k.clone(), serde_json::to_value(v).unwrap_or(Value::Null));
    }
    axum::Json(Value::Object(body)).into_response()
}

pub async fn well_known_server(State(state): State<AppState>) -> Response {
    match &state.config.well_known.server {
        Some(s) => axum::Json(json!({ "m.server": s })).into_response(),
        None => Error::not_found("No server delegation configured").into_response(),
    }
}

pub async fn capabilities(State(state): State<AppState>, _auth: Auth) -> axum::Json<Value> {
    let available: serde_json::Map<String, Value> =
        crate::rooms::SUPPORTED_VERSIONS.iter().map(|v| (v.to_string(), json!("stable"))).collect();
    axum::Json(json!({
        "capabilities": {
            "m.room_versions": { "default": state.config.rooms.default_version, "available": available },
            "m.change_password": { "enabled": true },
            "m.set_displayname": { "enabled": true },
            "m.set_avatar_url": { "enabled": true },
            "m.3pid_changes": { "enabled": false },
            "m.get_login_token": { "enabled": false },
            "m.profile_fields": { "enabled": true }
        }
    }))
}

/// Time-limited TURN credentials in coturn's `use-auth-secret` scheme: the username is
/// `<expiry unix time>:<user id>`, the password `base64(HMAC-SHA1(secret, username))`.
pub async fn turn_server(State(state): State<AppState>, auth: Auth) -> ApiResult<axum::Json<Value>> {
    let turn = &state.config.turn;
    let Some(secret) = turn.shared_secret.as_deref().filter(|_| !turn.uris.is_empty()) else {
        return Ok(axum::Json(json!({})));
    };
    let (username, password) = turn_credentials(secret, &auth.user_id, turn.user_lifetime_secs, now_secs());
    Ok(axum::Json(json!({
        "username": username,
        "password": password,
        "uris": turn.uris,
        "ttl": turn.user_lifetime_secs,
    })))
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

pub fn turn_credentials(secret: &str, user_id: &str, lifetime_secs: u64, now_secs: u64) -> (String, String) {
    let username = format!("{}:{user_id}", now_secs + lifetime_secs);
    let mut mac = Hmac::<Sha1>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(username.as_bytes());
    let password = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    (username, password)
}

#[cfg(test)]
mod tests {
    #[test]
    fn turn_credentials_match_coturn_scheme() {
        // Reference computed with: printf '%s' '1000:@a:hs' | openssl dgst -sha1 -hmac secret -binary | base64
        let (u, p) = super::turn_credentials("secret", "@a:hs", 400, 600);
        assert_eq!(u, "1000:@a:hs");
        assert_eq!(p, "2wrAW+OUaVHlklK6+31P2EGrnPE=");
    }
}
