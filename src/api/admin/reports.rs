//! Moderators read what users reported: Synapse's `GET /_synapse/admin/v1/event_reports`.

use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};

use super::AdminAuth;
use crate::error::{ApiResult, Error};
use crate::http::extract::Query;
use crate::state::AppState;
use crate::storage;

#[derive(Deserialize)]
pub struct ReportsQuery {
    from: Option<i64>,
    limit: Option<i64>,
    room_id: Option<String>,
    user_id: Option<String>,
}

pub async fn list(
    State(state): State<AppState>,
    _: AdminAuth,
    Query(q): Query<ReportsQuery>,
) -> ApiResult<axum::Json<Value>> {
    let from = q.from.unwrap_or(0);
    let limit = q.limit.unwrap_or(100);
    if from < 0 || !(1..=1000).contains(&limit) {
        return Err(Error::invalid_param("from must be >= 0 and limit between 1 and 1000"));
    }
    let (rows, total) =
        storage::directory::list_reports(&state.db, from, limit, q.room_id.as_deref(), q.user_id.as_deref()).await?;
    let reports: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "id": r.id, "received_ts": r.received_ts, "room_id": r.room_id, "event_id": r.event_id,
                "user_id": r.reporter, "reason": r.reason, "score": r.score,
            })
        })
        .collect();
    let mut resp = json!({ "event_reports": reports, "total": total });
    if from + (rows.len() as i64) < total {
        resp["next_token"] = json!(from + rows.len() as i64);
    }
    Ok(axum::Json(resp))
}
