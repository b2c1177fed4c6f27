//! `POST /search` (the engine is `crate::search::engine`).

use axum::extract::State;
use serde::Deserialize;
use serde_json::Value;

use crate::error::ApiResult;
use crate::http::extract::{Auth, Json, Query};
use crate::search::engine::{self, SearchRequest};
use crate::state::AppState;

#[derive(Deserialize)]
pub struct SearchQuery {
    next_batch: Option<String>,
}

pub async fn search(
    State(state): State<AppState>,
    auth: Auth,
    Query(q): Query<SearchQuery>,
    Json(body): Json<SearchRequest>,
) -> ApiResult<axum::Json<Value>> {
    Ok(axum::Json(engine::search(&state, &auth.user_id, &auth.device_id, body, q.next_batch.as_deref()).await?))
}
