//! Relations, threads, event context and timestamp lookup.

use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};

use super::rooms::{RoomEventFilter, token};
use crate::error::{ApiResult, Error};
use crate::http::extract::{Auth, Path, Query};
use crate::rooms::client::{format, visible_range};
use crate::rooms::{Room, relations::bundle};
use crate::state::AppState;
use crate::storage;

async fn visible(state: &AppState, room: &Room, user: &str) -> ApiResult<(i64, i64)> {
    visible_range(state, room, user).await?.ok_or_else(|| Error::forbidden("You are not a member of this room"))
}

/// Relation pagination tokens are `r<stream>`.
fn parse_rel_token(t: &str) -> ApiResult<i64> {
    t.strip_prefix('r').and_then(|s| s.parse().ok()).ok_or_else(|| Error::invalid_param("Invalid pagination token"))
}

#[derive(Deserialize)]
pub struct RelationsQuery {
    from: Option<String>,
    to: Option<String>,
    limit: Option<i64>,
    dir: Option<String>,
}

async fn relations_inner(
    state: &AppState,
    auth: &Auth,
    room_id: &str,
    event_id: &str,
    rel_type: Option<&str>,
    event_type: Option<&str>,
    q: RelationsQuery,
) -> ApiResult<axum::Json<Value>> {
    let room = Room::load(state, room_id).await?;
    let range = visible(state, &room, &auth.user_id).await?;
    let parent = storage::events::by_id(&state.db, event_id)
        .await?
        .filter(|e| e.room_nid == room.nid && e.stream_ordering >= range.0 && e.stream_ordering <= range.1)
        .ok_or_else(|| Error::not_found("Event not found"))?;
    let backwards = match q.dir.as_deref() {
        None | Some("b") => true,
        Some("f") => false,
        Some(_) => return Err(Error::invalid_param("dir must be b or f")),
    };
    let limit = q.limit.unwrap_or(50).clamp(1, 1000);
    let from = match &q.from {
        Some(t) => parse_rel_token(t)?,
        None if backwards => i64::MAX,
        None => i64::MIN,
    };
    let to = q.to.as_deref().map(parse_rel_token).transpose()?;
    let mut rows = storage::events::relations_page(
        &state.db,
        room.nid,
        &parent.event_id,
        rel_type,
        event_type,
        backwards,
        from,
        range,
        limit + 1,
    )
    .await?;
    if let Some(to) = to {
        rows.retain(|r| if backwards { r.stream_ordering > to } else { r.stream_ordering < to });
    }
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let viewer = (&*auth.user_id, &*auth.device_id);
    let mut chunk: Vec<Value> = rows.iter().map(|r| format(&room, r, Some(viewer))).collect();
    bundle(state, &room, viewer, range, &mut chunk).await?;
    let mut resp = json!({ "chunk": chunk });
    if more && let Some(last) = rows.last() {
        resp["next_batch"] = json!(format!("r{}", last.stream_ordering));
    }
    if let Some(f) = q.from {
        resp["prev_batch"] = json!(f);
    }
    Ok(axum::Json(resp))
}

pub async fn relations(
    State(state): State<AppState>,
    auth: Auth,
    Path((room_id, event_id)): Path<(String, String)>,
    Query(q): Query<RelationsQuery>,
) -> ApiResult<axum::Json<Value>> {
    relations_inner(&state, &auth, &room_id, &event_id, None, None, q).await
}

pub async fn relations_by_type(
    State(state): State<AppState>,
    auth: Auth,
    Path((room_id, event_id, rel_type)): Path<(String, String, String)>,
    Query(q): Query<RelationsQuery>,
) -> ApiResult<axum::Json<Value>> {
    relations_inner(&state, &auth, &room_id, &event_id, Some(&rel_type), None, q).await
}

pub async fn relations_by_type_and_event_type(
    State(state): State<AppState>,
    auth: Auth,
    Path((room_id, event_id, rel_type, event_type)): Path<(String, String, String, String)>,
    Query(q): Query<RelationsQuery>,
) -> ApiResult<axum::Json<Value>> {
    relations_inner(&state, &auth, &room_id, &event_id, Some(&rel_type), Some(&event_type), q).await
}

#[derive(Deserialize)]
pub struct ThreadsQuery {
    include: Option<String>,
    from: Option<String>,
    limit: Option<i64>,
}

pub async fn threads(
    State(state): State<AppState>,
    auth: Auth,
    Path(room_id): Path<String>,
    Query(q): Query<ThreadsQuery>,
) -> ApiResult<axum::Json<Value>> {
    let room = Room::load(&state, &room_id).await?;
    let range = visible(&state, &room, &auth.user_id).await?;
    let participant = match q.include.as_deref() {
        None | Some("all") => None,
        Some("participated") => Some(&*auth.user_id),
        Some(_) => return Err(Error::invalid_param("include must be all or participated")),
    };
    let limit = q.limit.unwrap_or(20).clamp(1, 100);
    let before = match &q.from {
        Some(t) => parse_rel_token(t)?,
        None => i64::MAX,
    };
    let mut roots = storage::events::thread_roots(&state.db, room.nid, participant, before, range, limit + 1).await?;
    let more = roots.len() as i64 > limit;
    roots.truncate(limit as usize);
    let viewer = (&*auth.user_id, &*auth.device_id);
    let mut chunk: Vec<Value> = roots.iter().map(|(r, _)| format(&room, r, Some(viewer))).collect();
    bundle(&state, &room, viewer, range, &mut chunk).await?;
    let mut resp = json!({ "chunk": chunk });
    if more && let Some((_, latest)) = roots.last() {
        resp["next_batch"] = json!(format!("r{latest}"));
    }
    Ok(axum::Json(resp))
}

#[derive(Deserialize)]
pub struct ContextQuery {
    limit: Option<i64>,
    filter: Option<String>,
}

pub async fn context(
    State(state): State<AppState>,
    auth: Auth,
    Path((room_id, event_id)): Path<(String, String)>,
    Query(q): Query<ContextQuery>,
) -> ApiResult<axum::Json<Value>> {
    let room = Room::load(&state, &room_id).await?;
    let range =
        visible_range(&state, &room, &auth.user_id).await?.ok_or_else(|| Error::not_found("Event not found"))?;
    let ev = storage::events::by_id(&state.db, &event_id)
        .await?
        .filter(|e| e.room_nid == room.nid && e.stream_ordering >= range.0 && e.stream_ordering <= range.1)
        .ok_or_else(|| Error::not_found("Event not found"))?;
    let filter: RoomEventFilter = match &q.filter {
        Some(f) => serde_json::from_str(f).map_err(|e| Error::invalid_param(format!("Invalid filter: {e}")))?,
        None => RoomEventFilter::default(),
    };
    let limit = q.limit.unwrap_or(10).clamp(0, 100);
    let pos = (ev.depth, ev.stream_ordering);
    let n_before = limit / 2;
    let n_after = limit - n_before;
    let mut before = if n_before > 0 {
        storage::events::page(&state.db, room.nid, true, pos, range, n_before).await?
    } else {
        vec![]
    };
    let mut after = if n_after > 0 {
        storage::events::page(&state.db, room.nid, false, pos, range, n_after).await?
    } else {
        vec![]
    };
    before.retain(|r| filter.matches(r));
    after.retain(|r| filter.matches(r));
    let start = before.last().map(|r| token(r.depth, r.stream_ordering)).unwrap_or_else(|| token(pos.0, pos.1));
    let end = after.last().map(|r| token(r.depth, r.stream_ordering)).unwrap_or_else(|| token(pos.0, pos.1));
    // State at the last event returned; with lazy loading only the senders' member events.
    let last_group = after.last().unwrap_or(&ev).state_after;
    let mut state_rows = match last_group {
        Some(g) => storage::rooms::state_events_of_group(&state.db, g).await?,
        None => vec![],
    };
    if filter.lazy_load_members {
        let senders: Vec<&str> = before.iter().chain(after.iter()).chain([&ev]).map(|r| r.sender.as_str()).collect();
        state_rows.retain(|r| {
            r.event_type == "m.room.member" && r.state_key.as_deref().is_some_and(|k| senders.contains(&k))
        });
    }
    let viewer = (&*auth.user_id, &*auth.device_id);
    let mut event = vec![format(&room, &ev, Some(viewer))];
    let mut before_v: Vec<Value> = before.iter().map(|r| format(&room, r, Some(viewer))).collect();
    let mut after_v: Vec<Value> = after.iter().map(|r| format(&room, r, Some(viewer))).collect();
    bundle(&state, &room, viewer, range, &mut event).await?;
    bundle(&state, &room, viewer, range, &mut before_v).await?;
    bundle(&state, &room, viewer, range, &mut after_v).await?;
    Ok(axum::Json(json!({
        "event": event.pop(),
        "events_before": before_v,
        "events_after": after_v,
        "start": start,
        "end": end,
        "state": state_rows.iter().map(|r| format(&room, r, None)).collect::<Vec<_>>(),
    })))
}

#[derive(Deserialize)]
pub struct TimestampQuery {
    ts: i64,
    dir: String,
}

pub async fn timestamp_to_event(
    State(state): State<AppState>,
    auth: Auth,
    Path(room_id): Path<String>,
    Query(q): Query<TimestampQuery>,
) -> ApiResult<axum::Json<Value>> {
    let room = Room::load(&state, &room_id).await?;
    let range = visible(&state, &room, &auth.user_id).await?;
    let forward = match q.dir.as_str() {
        "f" => true,
        "b" => false,
        _ => return Err(Error::invalid_param("dir must be f or b")),
    };
    let ev = storage::events::closest_to_ts(&state.db, room.nid, q.ts, forward, range)
        .await?
        .ok_or_else(|| Error::not_found("No event found in that direction"))?;
    Ok(axum::Json(json!({ "event_id": ev.event_id, "origin_server_ts": ev.origin_server_ts })))
}
