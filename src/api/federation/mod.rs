//! The federation listener (`listen.federation`). Federation is being built (issue 13); this
//! router serves its foundation (see README, "Federation"):
//!
//! - `GET /_matrix/federation/v1/version` (unauthenticated);
//! - `GET /_matrix/key/v2/server` (our signed keys), `POST /_matrix/key/v2/query` and
//!   `GET /_matrix/key/v2/query/{serverName}` (the notary);
//! - `GET /_matrix/federation/v1/query/profile` (`X-Matrix`-authenticated);
//! - media (`media.rs`): `GET /_matrix/federation/v1/media/download|thumbnail/{mediaId}`;
//! - E2EE keys (`e2ee_keys.rs`): `GET /_matrix/federation/v1/user/devices/{userId}`,
//!   `POST /_matrix/federation/v1/user/keys/query` and `.../user/keys/claim`;
//! - `GET /_matrix/federation/v1/openid/userinfo`, which Jitsi's matrix-user-verification
//!   service (and widgets) call to verify an OpenID token; the same handler is also routed on the
//!   client listener (`api::router`), for deployments whose federation address is the client one.
//!
//! With `federation.enabled = false` only `openid/userinfo` is served. Everything else answers
//! 404 `M_UNRECOGNIZED` (405 for a known path with another method).

mod e2ee_keys;
mod media;
mod rooms;

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use ruma::ServerName;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::error::{ApiResult, Error};
use crate::federation::auth::Origin;
use crate::federation::keys;
use crate::http::extract::{Json, Path, Query};
use crate::state::AppState;
use crate::storage;

pub fn router(federation_enabled: bool) -> Router<AppState> {
    let r = Router::new().route("/_matrix/federation/v1/openid/userinfo", get(openid_userinfo));
    if !federation_enabled {
        return r;
    }
    r.route("/_matrix/federation/v1/version", get(version))
        .route("/_matrix/key/v2/server", get(server_keys))
        .route("/_matrix/key/v2/query", axum::routing::post(query_keys))
        .route("/_matrix/key/v2/query/{server_name}", get(query_server_keys))
        .route("/_matrix/federation/v1/query/profile", get(query_profile))
        .merge(rooms::router())
        .merge(media::router())
        .merge(e2ee_keys::router())
}

#[derive(Deserialize)]
pub struct UserInfoQuery {
    access_token: Option<String>,
}

/// `GET /_matrix/federation/v1/openid/userinfo?access_token=`: `{"sub": userId}` for a valid
/// OpenID token; 401 `M_UNKNOWN_TOKEN` for anything else (expired, unknown, an access token).
pub async fn openid_userinfo(
    State(state): State<AppState>,
    Query(q): Query<UserInfoQuery>,
) -> ApiResult<axum::Json<Value>> {
    let sub = crate::rtc::openid::verify(&state, q.access_token.as_deref().unwrap_or("")).await?;
    Ok(axum::Json(json!({ "sub": sub })))
}

/// `GET /_matrix/federation/v1/version`.
async fn version() -> axum::Json<Value> {
    axum::Json(json!({ "server": { "name": "Parvis", "version": env!("CARGO_PKG_VERSION") } }))
}

/// `GET /_matrix/key/v2/server`: our keys, signed.
async fn server_keys(State(state): State<AppState>) -> ApiResult<axum::Json<Value>> {
    Ok(axum::Json(keys::own_document(&state).await?))
}

/// `POST /_matrix/key/v2/query`: the notary.
async fn query_keys(State(state): State<AppState>, Json(body): Json<Value>) -> ApiResult<axum::Json<Value>> {
    let wanted = keys::parse_query(&body)?;
    let server_keys = keys::notary_query(&state, wanted).await?;
    Ok(axum::Json(json!({ "server_keys": server_keys })))
}

#[derive(Deserialize)]
struct QueryServerKeys {
    minimum_valid_until_ts: Option<i64>,
}

/// `GET /_matrix/key/v2/query/{serverName}`: the notary, for one server.
async fn query_server_keys(
    State(state): State<AppState>,
    Path(server_name): Path<String>,
    Query(q): Query<QueryServerKeys>,
) -> ApiResult<axum::Json<Value>> {
    let server = ServerName::parse(&server_name)
        .map_err(|_| Error::invalid_param(format!("Invalid server name {server_name}")))?;
    let min = q.minimum_valid_until_ts.unwrap_or(0).max(storage::now_ms());
    let server_keys = keys::notary_query(&state, vec![(server, min)]).await?;
    Ok(axum::Json(json!({ "server_keys": server_keys })))
}

#[derive(Deserialize)]
struct ProfileQuery {
    user_id: Option<String>,
    field: Option<String>,
}

/// `GET /_matrix/federation/v1/query/profile?user_id=&field=`: a local user's profile (one field
/// when `field` is given). 400 for a user of another server, 404 `M_NOT_FOUND` for an unknown or
/// deactivated one.
async fn query_profile(
    State(state): State<AppState>,
    Query(q): Query<ProfileQuery>,
    Origin(origin): Origin,
) -> ApiResult<axum::Json<Value>> {
    let user_id = q.user_id.ok_or_else(|| Error::missing_param("Missing user_id"))?;
    let user = <&ruma::UserId>::try_from(user_id.as_str())
        .map_err(|_| Error::invalid_param("user_id is not a valid user ID"))?;
    if user.server_name().as_str() != state.config.server_name {
        return Err(Error::invalid_param("user_id is not a user of this server"));
    }
    if let Some(f) = &q.field
        && (f.is_empty() || f.len() > 255)
    {
        return Err(Error::invalid_param("Invalid field"));
    }
    tracing::debug!(%origin, user_id, "federation profile query");
    let found = storage::users::get(&state.db, &user_id).await?;
    if found.is_none_or(|u| u.deactivated) {
        return Err(Error::not_found("Profile not found"));
    }
    let profile = storage::profiles::get(&state.db, &user_id).await?.unwrap_or_default();
    let out: Map<String, Value> = match q.field {
        Some(f) => profile.into_iter().filter(|(k, v)| *k == f && !v.is_null()).collect(),
        None => profile.into_iter().filter(|(_, v)| !v.is_null()).collect(),
    };
    Ok(axum::Json(Value::Object(out)))
}
