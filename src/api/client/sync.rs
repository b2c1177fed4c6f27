//! `GET /sync`: parameters in, the sync engine (`crate::sync`) does the rest.

use std::time::Duration;

use axum::extract::State;
use serde::Deserialize;
use serde_json::Value;

use crate::error::{ApiResult, Error};
use crate::http::extract::{Auth, Query};
use crate::state::AppState;
use crate::sync::{SyncRequest, sync as run};

#[derive(Deserialize)]
pub struct SyncQuery {
    since: Option<String>,
    filter: Option<String>,
    full_state: Option<String>,
    set_presence: Option<String>,
    timeout: Option<String>,
    use_state_after: Option<String>,
    #[serde(rename = "org.matrix.msc4222.use_state_after")]
    use_state_after_unstable: Option<String>,
}

pub async fn sync(
    State(state): State<AppState>,
    auth: Auth,
    Query(q): Query<SyncQuery>,
) -> ApiResult<axum::Json<Value>> {
    let full_state = match q.full_state.as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return Err(Error::invalid_param("full_state must be true or false")),
    };
    let timeout = match q.timeout.as_deref() {
        None => Duration::ZERO,
        Some(t) => Duration::from_millis(
            t.parse::<u64>().map_err(|_| Error::invalid_param("timeout must be a non-negative integer"))?,
        ),
    };
    let mut use_state_after = false;
    for v in [q.use_state_after.as_deref(), q.use_state_after_unstable.as_deref()].into_iter().flatten() {
        match v {
            "true" => use_state_after = true,
            "false" => {}
            _ => return Err(Error::invalid_param("use_state_after must be true or false")),
        }
    }
    let req = SyncRequest {
        since: q.since,
        filter: q.filter,
        full_state,
        use_state_after,
        set_presence: q.set_presence,
        timeout,
    };
    Ok(axum::Json(run(&state, &auth.user_id, &auth.device_id, req).await?))
}
