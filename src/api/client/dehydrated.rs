//! Dehydrated devices (MSC3814) under `/_matrix/client/unstable/org.matrix.msc3814.v1/`. The logic
//! is in `crate::e2ee::dehydrated`.

use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::e2ee::dehydrated::{self, EventsStyle};
use crate::error::ApiResult;
use crate::http::extract::{Auth, Json, Path, Query};
use crate::state::AppState;

type JsonResult = ApiResult<axum::Json<Value>>;

pub async fn put(State(state): State<AppState>, auth: Auth, Json(body): Json<Value>) -> JsonResult {
    let device_id = dehydrated::put(&state, &auth.user_id, &body).await?;
    Ok(axum::Json(json!({ "device_id": device_id })))
}

pub async fn get(State(state): State<AppState>, auth: Auth) -> JsonResult {
    Ok(axum::Json(dehydrated::get(&state, &auth.user_id).await?))
}

pub async fn delete(State(state): State<AppState>, auth: Auth) -> JsonResult {
    let device_id = dehydrated::delete(&state, &auth.user_id).await?;
    Ok(axum::Json(json!({ "device_id": device_id })))
}

#[derive(Deserialize)]
pub struct EventsQuery {
    from: Option<String>,
    limit: Option<i64>,
}

#[derive(Deserialize)]
pub struct EventsBody {
    next_batch: Option<String>,
}

/// `POST .../events` with `{ "next_batch" }`: what clients send today (ruma, matrix-rust-sdk).
pub async fn events_post(
    State(state): State<AppState>,
    auth: Auth,
    Path(device_id): Path<String>,
    Query(q): Query<EventsQuery>,
    Json(body): Json<EventsBody>,
) -> JsonResult {
    let from = body.next_batch.as_deref();
    Ok(axum::Json(dehydrated::events(&state, &auth.user_id, &device_id, from, q.limit, EventsStyle::Post).await?))
}

/// `GET .../events?from=`: MSC3814's latest revision.
pub async fn events_get(
    State(state): State<AppState>,
    auth: Auth,
    Path(device_id): Path<String>,
    Query(q): Query<EventsQuery>,
) -> JsonResult {
    let from = q.from.as_deref();
    Ok(axum::Json(dehydrated::events(&state, &auth.user_id, &device_id, from, q.limit, EventsStyle::Get).await?))
}
