//! Directories: the public room directory, room visibility, the user directory; reports;
//! room summaries (previews).

use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::{ApiResult, Error};
use crate::http::extract::{Auth, Json, MaybeAuth, Path, Query};
use crate::rooms::summary::Summary;
use crate::rooms::visibility::event_visible;
use crate::rooms::{self, Room};
use crate::state::AppState;
use crate::storage;
use crate::users::directory::normalise;

#[derive(Deserialize, Default)]
pub struct PublicRoomsQuery {
    limit: Option<i64>,
    since: Option<String>,
    server: Option<String>,
}

#[derive(Deserialize, Default)]
pub struct PublicRoomsBody {
    limit: Option<i64>,
    since: Option<String>,
    server: Option<String>,
    filter: Option<PublicRoomsFilter>,
}

#[derive(Deserialize, Default)]
pub struct PublicRoomsFilter {
    generic_search_term: Option<String>,
    room_types: Option<Vec<Option<String>>>,
}

pub async fn public_rooms_get(
    State(state): State<AppState>,
    Query(q): Query<PublicRoomsQuery>,
) -> ApiResult<axum::Json<Value>> {
    public_rooms(&state, PublicRoomsBody { limit: q.limit, since: q.since, server: q.server, filter: None }).await
}

pub async fn public_rooms_post(
    State(state): State<AppState>,
    _auth: Auth,
    Json(body): Json<PublicRoomsBody>,
) -> ApiResult<axum::Json<Value>> {
    public_rooms(&state, body).await
}

async fn public_rooms(state: &AppState, req: PublicRoomsBody) -> ApiResult<axum::Json<Value>> {
    let term = req.filter.as_ref().and_then(|f| f.generic_search_term.clone());
    let room_types = req.filter.as_ref().and_then(|f| f.room_types.clone());
    if let Some(server) = req.server.as_deref().filter(|s| *s != state.config.server_name) {
        // Another server's directory, asked over federation.
        let server = ruma::ServerName::parse(server).map_err(|_| Error::invalid_param("Invalid server name"))?;
        let mut filter = serde_json::Map::new();
        if let Some(t) = &term {
            filter.insert("generic_search_term".into(), json!(t));
        }
        if let Some(rt) = &room_types {
            filter.insert("room_types".into(), json!(rt));
        }
        let v =
            crate::federation::membership::remote_public_rooms(state, &server, req.limit, req.since.as_deref(), filter)
                .await?;
        return Ok(axum::Json(v));
    }
    let v = rooms::directory::public_rooms(state, req.limit, req.since.as_deref(), term.as_deref(), room_types).await?;
    Ok(axum::Json(v))
}

pub async fn get_visibility(
    State(state): State<AppState>,
    Path(room_id): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    let row = storage::rooms::by_id(&state.db, &room_id).await?.ok_or_else(|| Error::not_found("Unknown room"))?;
    Ok(axum::Json(json!({ "visibility": if row.is_public { "public" } else { "private" } })))
}

#[derive(Deserialize)]
pub struct VisibilityBody {
    visibility: String,
}

pub async fn set_visibility(
    State(state): State<AppState>,
    auth: Auth,
    Path(room_id): Path<String>,
    Json(body): Json<VisibilityBody>,
) -> ApiResult<axum::Json<Value>> {
    let room = Room::load(&state, &room_id).await?;
    let public = match body.visibility.as_str() {
        "public" => true,
        "private" => false,
        _ => return Err(Error::invalid_param("visibility must be public or private")),
    };
    // Publishing speaks for the room: require the power to set its canonical alias.
    let levels = rooms::PowerLevels::load(&state, &room).await?;
    if levels.of(&auth.user_id) < levels.state_event("m.room.canonical_alias") && !auth.is_admin {
        return Err(Error::forbidden("You may not change this room's directory visibility"));
    }
    storage::rooms::set_public(&state.db, room.nid, public).await?;
    Ok(axum::Json(json!({})))
}

#[derive(Deserialize)]
pub struct UserSearchBody {
    search_term: String,
    limit: Option<i64>,
}

pub async fn search_users(
    State(state): State<AppState>,
    auth: Auth,
    Json(body): Json<UserSearchBody>,
) -> ApiResult<axum::Json<Value>> {
    let limit = body.limit.unwrap_or(10).clamp(1, 100);
    let terms: Vec<String> = normalise(&body.search_term).split_whitespace().map(str::to_owned).collect();
    if terms.is_empty() {
        return Ok(axum::Json(json!({ "results": [], "limited": false })));
    }
    let mut rows = storage::directory::search_users(
        &state.db,
        &auth.user_id,
        &terms,
        state.config.user_directory.search_all_local_users,
        limit + 1,
    )
    .await?;
    let limited = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let results: Vec<Value> = rows
        .into_iter()
        .map(|(user_id, name, avatar)| {
            let mut r = json!({ "user_id": user_id });
            if let Some(n) = name {
                r["display_name"] = json!(n);
            }
            if let Some(a) = avatar {
                r["avatar_url"] = json!(a);
            }
            r
        })
        .collect();
    Ok(axum::Json(json!({ "results": results, "limited": limited })))
}

#[derive(Deserialize, Default)]
pub struct ReportBody {
    reason: Option<String>,
    score: Option<i32>,
}

pub async fn report_event(
    State(state): State<AppState>,
    auth: Auth,
    Path((room_id, event_id)): Path<(String, String)>,
    Json(body): Json<ReportBody>,
) -> ApiResult<axum::Json<Value>> {
    let room = Room::load(&state, &room_id).await?;
    let not_found = || Error::not_found("Event not found");
    let ev =
        storage::events::by_id(&state.db, &event_id).await?.filter(|e| e.room_nid == room.nid).ok_or_else(not_found)?;
    if !event_visible(&state, &room, &auth.user_id, &ev).await? {
        return Err(not_found());
    }
    if body.score.is_some_and(|s| !(-100..=0).contains(&s)) {
        return Err(Error::invalid_param("score must be between -100 and 0"));
    }
    if body.reason.as_ref().is_some_and(|r| r.len() > 1000) {
        return Err(Error::invalid_param("reason is too long"));
    }
    storage::directory::insert_report(
        &state.db,
        &room_id,
        Some(&event_id),
        &auth.user_id,
        body.reason.as_deref(),
        body.score,
    )
    .await?;
    tracing::info!(room_id, event_id, reporter = %auth.user_id, "event reported");
    Ok(axum::Json(json!({})))
}

pub async fn report_room(
    State(state): State<AppState>,
    auth: Auth,
    Path(room_id): Path<String>,
    Json(body): Json<ReportBody>,
) -> ApiResult<axum::Json<Value>> {
    Room::load(&state, &room_id).await?;
    if body.reason.as_ref().is_some_and(|r| r.len() > 1000) {
        return Err(Error::invalid_param("reason is too long"));
    }
    storage::directory::insert_report(&state.db, &room_id, None, &auth.user_id, body.reason.as_deref(), None).await?;
    tracing::info!(room_id, reporter = %auth.user_id, "room reported");
    Ok(axum::Json(json!({})))
}

/// Room summary (MSC3266, spec v1.15): a preview of a room the user may or may not be in (who
/// may see it: `rooms::summary`). Anyone else gets the same 404 `M_NOT_FOUND` as for a room
/// that does not exist: the room's existence is not divulged.
pub async fn room_summary(
    State(state): State<AppState>,
    MaybeAuth(auth): MaybeAuth,
    Path(id_or_alias): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    let not_found = || Error::not_found("Room not found");
    let room_id = if id_or_alias.starts_with('#') {
        storage::rooms::resolve_alias(&state.db, &id_or_alias).await?.ok_or_else(not_found)?.0
    } else {
        id_or_alias
    };
    let row = storage::rooms::by_id(&state.db, &room_id).await?.ok_or_else(not_found)?;
    let user = auth.as_ref().map(|a| &*a.user_id);
    let summary = Summary::load(&state, &row, user).await?;
    if !summary.visible_to(&state, user).await? {
        return Err(not_found());
    }
    let mut out = summary.fields;
    // Required when authenticated, absent otherwise.
    if auth.is_some() {
        out["membership"] = json!(summary.membership.as_deref().unwrap_or("leave"));
    }
    Ok(axum::Json(out))
}

#[derive(Deserialize)]
pub struct UserReportBody {
    reason: String,
}

/// `POST /users/{userId}/report` (spec v1.14): a report about a user, kept for the server's
/// moderators. A local user who does not exist is 404; a remote user cannot be checked
/// without federation and is accepted.
pub async fn report_user(
    State(state): State<AppState>,
    auth: Auth,
    Path(user_id): Path<String>,
    Json(body): Json<UserReportBody>,
) -> ApiResult<axum::Json<Value>> {
    if ruma::UserId::parse(&user_id).is_err() {
        return Err(Error::invalid_param("Invalid user ID"));
    }
    if body.reason.len() > 1000 {
        return Err(Error::invalid_param("reason is too long"));
    }
    if crate::users::is_local(&user_id, &state.config.server_name)
        && !storage::users::exists(&state.db, &user_id).await?
    {
        return Err(Error::not_found("The user was not found"));
    }
    storage::directory::insert_user_report(&state.db, &user_id, &auth.user_id, &body.reason).await?;
    tracing::info!(reported = %user_id, reporter = %auth.user_id, "user reported");
    Ok(axum::Json(json!({})))
}
