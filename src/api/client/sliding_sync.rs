//! `POST /_matrix/client/unstable/org.matrix.simplified_msc3575/sync` (MSC4186): parameters in,
//! the sliding sync engine (`crate::sync::sliding`) does the rest.

use std::time::Duration;

use axum::extract::State;
use serde::Deserialize;
use serde_json::Value;

use crate::error::{ApiResult, Error};
use crate::http::extract::{Auth, Json, Query};
use crate::state::AppState;
use crate::sync::sliding::{self, request::Body};

#[derive(Deserialize)]
pub struct SlidingQuery {
    pos: Option<String>,
    timeout: Option<String>,
}

pub async fn sync(
    State(state): State<AppState>,
    auth: Auth,
    Query(q): Query<SlidingQuery>,
    Json(body): Json<Body>,
) -> ApiResult<axum::Json<Value>> {
    let timeout = match q.timeout.as_deref() {
        None => Duration::ZERO,
        Some(t) => Duration::from_millis(
            t.parse::<u64>().map_err(|_| Error::invalid_param("timeout must be a non-negative integer"))?,
        ),
    };
    let out = sliding::sync(&state, &auth.user_id, &auth.device_id, q.pos.as_deref(), timeout, body).await?;
    Ok(axum::Json(out))
}
