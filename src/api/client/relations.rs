//! Relations, threads, event context and timestamp lookup.

use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};

use super::rooms::{RoomEventFilter, Walk, require_readable, token, walk};
use crate::error::{ApiResult, Error};
use crate::http::extract::{Auth, Path, Query};
use crate::rooms::client::format;
use crate::rooms::token::RoomToken;
use crate::rooms::visibility::{Ignored, Viewer};
use crate::rooms::{Room, relations::bundle};
use crate::state::AppState;
use crate::storage;

/// The viewer, once the room is known to be readable by them at all.
async fn viewer(state: &AppState, room: &Room, user: &str) -> ApiResult<Viewer> {
    let viewer = Viewer::load(state, room, user).await?;
    require_readable(state, room, &viewer).await?;
    Ok(viewer)
}

/// A relations (or threads) pagination token as the exclusive stream cursor of a walk: their own
/// `r<stream>` tokens (the last stream ordering returned, in the walk's direction), or any
/// timeline token (`rooms::token`), read as the position between events it names. `from` walks
/// away from the cursor (backwards: orderings below it), `to` keeps what lies before it.
fn rel_cursor(t: &str, backwards: bool, is_from: bool) -> ApiResult<i64> {
    if let Some(r) = t.strip_prefix('r') {
        return r.parse().map_err(|_| Error::invalid_param("Invalid pagination token"));
    }
    let first_after = RoomToken::parse(t)?.stream_boundary();
    Ok(if backwards == is_from { first_after } else { first_after.saturating_sub(1) })
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
    // The spec answers 404 alike for a parent that does not exist and one the user cannot read.
    let who = viewer(state, &room, &auth.user_id).await.map_err(|e| match e.errcode {
        "M_FORBIDDEN" => Error::not_found("Event not found"),
        _ => e,
    })?;
    let parent = storage::events::by_id(&state.db, event_id)
        .await?
        .filter(|e| e.room_nid == room.nid)
        .ok_or_else(|| Error::not_found("Event not found"))?;
    if !who.sees(state, &parent).await? {
        return Err(Error::not_found("Event not found"));
    }
    let backwards = match q.dir.as_deref() {
        None | Some("b") => true,
        Some("f") => false,
        Some(_) => return Err(Error::invalid_param("dir must be b or f")),
    };
    let limit = q.limit.unwrap_or(50).clamp(1, 1000);
    let from = match &q.from {
        Some(t) => rel_cursor(t, backwards, true)?,
        None if backwards => i64::MAX,
        None => i64::MIN,
    };
    let to = q.to.as_deref().map(|t| rel_cursor(t, backwards, false)).transpose()?;
    // Relations the user may not see are skipped: read further pages (bounded) to fill the chunk.
    let mut rows = Vec::new();
    let mut cursor = from;
    let mut more = true;
    for _ in 0..10 {
        let mut page = storage::events::relations_page(
            &state.db,
            room.nid,
            &parent.event_id,
            rel_type,
            event_type,
            backwards,
            cursor,
            (i64::MIN, i64::MAX),
            limit + 1,
        )
        .await?;
        let mut last_page = page.len() as i64 <= limit;
        if let Some(to) = to {
            let n = page.len();
            page.retain(|r| if backwards { r.stream_ordering > to } else { r.stream_ordering < to });
            last_page |= page.len() < n;
        }
        let visible = who.visible(state, &page).await?;
        let mut chunk_full = false;
        for (row, visible) in page.into_iter().zip(visible) {
            if rows.len() as i64 == limit {
                chunk_full = true;
                break;
            }
            cursor = row.stream_ordering;
            if visible {
                rows.push(row);
            }
        }
        if chunk_full {
            break;
        }
        if last_page {
            more = false;
            break;
        }
    }
    let viewer = (&*auth.user_id, &*auth.device_id);
    let mut chunk: Vec<Value> = rows.iter().map(|r| format(&room, r, Some(viewer))).collect();
    bundle(state, &room, viewer, &who, &mut chunk).await?;
    let mut resp = json!({ "chunk": chunk });
    if more {
        resp["next_batch"] = json!(format!("r{cursor}"));
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
    let who = viewer(&state, &room, &auth.user_id).await?;
    let participant = match q.include.as_deref() {
        None | Some("all") => None,
        Some("participated") => Some(&*auth.user_id),
        Some(_) => return Err(Error::invalid_param("include must be all or participated")),
    };
    let limit = q.limit.unwrap_or(20).clamp(1, 100);
    let mut before = match &q.from {
        Some(t) => rel_cursor(t, true, true)?,
        None => i64::MAX,
    };
    // Roots the user may not see are skipped: read further pages (bounded) to fill the chunk.
    let mut roots = Vec::new();
    let mut more = true;
    'pages: for _ in 0..10 {
        let page =
            storage::events::thread_roots(&state.db, room.nid, participant, before, (i64::MIN, i64::MAX), limit + 1)
                .await?;
        let last_page = page.len() as i64 <= limit;
        let rows: Vec<&storage::events::EventRow> = page.iter().map(|(r, _)| r).collect();
        let visible = who.visible(&state, &rows).await?;
        for ((row, latest), visible) in page.into_iter().zip(visible) {
            if roots.len() as i64 == limit {
                break 'pages;
            }
            before = latest;
            if visible {
                roots.push(row);
            }
        }
        if last_page {
            more = false;
            break;
        }
    }
    let viewer = (&*auth.user_id, &*auth.device_id);
    let mut chunk: Vec<Value> = roots.iter().map(|r| format(&room, r, Some(viewer))).collect();
    bundle(&state, &room, viewer, &who, &mut chunk).await?;
    let mut resp = json!({ "chunk": chunk });
    if more {
        resp["next_batch"] = json!(format!("r{before}"));
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
    let not_found = || Error::not_found("Event not found");
    let ev =
        storage::events::by_id(&state.db, &event_id).await?.filter(|e| e.room_nid == room.nid).ok_or_else(not_found)?;
    let who = Viewer::load(&state, &room, &auth.user_id).await?;
    if !who.sees(&state, &ev).await? {
        return Err(not_found());
    }
    let filter = RoomEventFilter::from_param(q.filter.as_deref())?;
    let ignored = Ignored::load(&state, &auth.user_id).await?;
    let limit = q.limit.unwrap_or(10).clamp(0, 100);
    let n_before = limit / 2;
    let n_after = limit - n_before;
    // Positions between events: just before the event, and just after it.
    let at = (ev.depth, ev.stream_ordering);
    let after_at = (ev.depth, ev.stream_ordering + 1);
    let Walk { events: before, cursor: start, .. } =
        walk(&state, &room, &who, &ignored, &filter, true, at, None, n_before).await?;
    let Walk { events: after, cursor: end, .. } =
        walk(&state, &room, &who, &ignored, &filter, false, after_at, None, n_after).await?;
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
    bundle(&state, &room, viewer, &who, &mut event).await?;
    bundle(&state, &room, viewer, &who, &mut before_v).await?;
    bundle(&state, &room, viewer, &who, &mut after_v).await?;
    Ok(axum::Json(json!({
        "event": event.pop(),
        "events_before": before_v,
        "events_after": after_v,
        "start": token(start.0, start.1),
        "end": token(end.0, end.1),
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
    let who = viewer(&state, &room, &auth.user_id).await?;
    let forward = match q.dir.as_str() {
        "f" => true,
        "b" => false,
        _ => return Err(Error::invalid_param("dir must be f or b")),
    };
    // The closest event the user may see, among the 100 closest.
    let rows = storage::events::closest_to_ts(&state.db, room.nid, q.ts, forward, 100).await?;
    let visible = who.visible(&state, &rows).await?;
    let ev = rows
        .into_iter()
        .zip(visible)
        .find_map(|(r, v)| v.then_some(r))
        .ok_or_else(|| Error::not_found("No event found in that direction"))?;
    Ok(axum::Json(json!({ "event_id": ev.event_id, "origin_server_ts": ev.origin_server_ts })))
}
