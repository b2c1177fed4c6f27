//! `GET /notifications`: the events that notified the caller, newest first.

use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::{ApiResult, Error};
use crate::http::extract::{Auth, Query};
use crate::rooms::{Room, client, rules_for};
use crate::state::AppState;
use crate::storage;

/// Page size when the client gives none, and the most one page holds.
const DEFAULT_LIMIT: u64 = 20;
const MAX_LIMIT: u64 = 100;

#[derive(Deserialize)]
pub struct Params {
    from: Option<String>,
    limit: Option<u64>,
    only: Option<String>,
}

pub async fn list(State(state): State<AppState>, auth: Auth, Query(q): Query<Params>) -> ApiResult<axum::Json<Value>> {
    let before = match q.from.as_deref() {
        None | Some("") => None,
        Some(t) => Some(
            t.parse::<i64>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| Error::invalid_param("from is not a token this endpoint returned"))?,
        ),
    };
    let limit = match q.limit {
        None => DEFAULT_LIMIT,
        Some(0) => return Err(Error::invalid_param("limit must be at least 1")),
        Some(l) => l.min(MAX_LIMIT),
    };
    // The spec's only filter; other values filter nothing.
    let only_highlight = q.only.as_deref() == Some("highlight");
    let rows = storage::push::notifications(&state.db, &auth.user_id, before, limit as i64, only_highlight).await?;
    let next_token = (rows.len() as u64 == limit).then(|| rows.last().map(|r| r.event.stream_ordering.to_string()));
    let mut notifications = Vec::with_capacity(rows.len());
    for r in rows {
        let (version, rules) = rules_for(&r.room_version)?;
        let room_id = ruma::OwnedRoomId::try_from(r.room_id.as_str()).map_err(|_| Error::internal())?;
        let room = Room { nid: r.event.room_nid, room_id, version, rules };
        notifications.push(json!({
            "actions": r.actions.0,
            "event": client::format(&room, &r.event, Some((&*auth.user_id, &*auth.device_id))),
            "read": r.read,
            "room_id": r.room_id,
            "ts": r.ts,
        }));
    }
    let mut body = json!({ "notifications": notifications });
    if let Some(Some(token)) = next_token {
        body["next_token"] = json!(token);
    }
    Ok(axum::Json(body))
}
