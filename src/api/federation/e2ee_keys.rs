//! E2EE keys of local users for other servers (`X-Matrix`-authenticated):
//! `GET /_matrix/federation/v1/user/devices/{userId}`, `POST /_matrix/federation/v1/user/keys/query`
//! and `POST /_matrix/federation/v1/user/keys/claim` (see `e2ee::federation_*`).

use axum::Router;
use axum::extract::State;
use axum::routing::{get, post};
use serde_json::Value;

use crate::e2ee;
use crate::error::{ApiResult, Error};
use crate::federation::auth::{Origin, Signed};
use crate::http::extract::Path;
use crate::state::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/_matrix/federation/v1/user/devices/{user_id}", get(user_devices))
        .route("/_matrix/federation/v1/user/keys/query", post(keys_query))
        .route("/_matrix/federation/v1/user/keys/claim", post(keys_claim))
}

async fn user_devices(
    State(state): State<AppState>,
    Path(user_id): Path<String>,
    Origin(origin): Origin,
) -> ApiResult<axum::Json<Value>> {
    tracing::debug!(%origin, user_id, "federation user/devices");
    Ok(axum::Json(e2ee::federation_user_devices(&state, &user_id).await?))
}

fn body(signed: Signed) -> ApiResult<Value> {
    signed.content.filter(Value::is_object).ok_or_else(|| Error::bad_json("Expected a JSON object"))
}

async fn keys_query(State(state): State<AppState>, signed: Signed) -> ApiResult<axum::Json<Value>> {
    tracing::debug!(origin = %signed.origin, "federation user/keys/query");
    Ok(axum::Json(e2ee::federation_query_keys(&state, &body(signed)?).await?))
}

async fn keys_claim(State(state): State<AppState>, signed: Signed) -> ApiResult<axum::Json<Value>> {
    tracing::debug!(origin = %signed.origin, "federation user/keys/claim");
    Ok(axum::Json(e2ee::federation_claim_keys(&state, &body(signed)?).await?))
}
