//! The federation listener (`listen.federation`). Federation with other servers is not there yet
//! (issue 13); for now this router serves what third parties ask a server's federation address:
//! `GET /_matrix/federation/v1/openid/userinfo`, which Jitsi's matrix-user-verification service
//! (and widgets) call to verify an OpenID token. Everything else answers 404 `M_UNRECOGNIZED`.
//! The same endpoint is also served on the client listener (`api::router`), for deployments
//! whose federation address is the client one.

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::ApiResult;
use crate::http::extract::Query;
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/_matrix/federation/v1/openid/userinfo", get(openid_userinfo))
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
