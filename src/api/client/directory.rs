//! Directories: the public room directory, room visibility, the user directory; reports;
//! room summaries (previews).

use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::{ApiResult, Error};
use crate::http::extract::{Auth, Json, MaybeAuth, Path, Query};
use crate::rooms::visibility::event_visible;
use crate::rooms::{self, Room};
use crate::state::AppState;
use crate::storage;
use crate::users::directory::normalise;

/// Upper bound of rooms the directory scans (a municipal deployment has far fewer).
const MAX_PUBLIC_ROOMS: i64 = 10_000;

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
    if req.server.as_deref().is_some_and(|s| s != state.config.server_name) {
        return Err(Error::not_found("Other servers' directories need federation, which is not available yet"));
    }
    let limit = req.limit.unwrap_or(100).clamp(1, 500) as usize;
    let offset: usize = match &req.since {
        Some(t) => t
            .strip_prefix('o')
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| Error::invalid_param("Invalid since token"))?,
        None => 0,
    };
    let term =
        req.filter.as_ref().and_then(|f| f.generic_search_term.as_deref()).map(normalise).filter(|t| !t.is_empty());
    let room_types = req.filter.as_ref().and_then(|f| f.room_types.clone());
    let mut entries = Vec::new();
    for r in storage::directory::public_rooms(&state.db, MAX_PUBLIC_ROOMS).await? {
        let s = &r.state.0;
        let name = s["m.room.name"]["name"].as_str();
        let topic = s["m.room.topic"]["topic"].as_str();
        let alias = s["m.room.canonical_alias"]["alias"].as_str();
        if let Some(t) = &term {
            let hay = normalise(&format!(
                "{} {} {} {}",
                name.unwrap_or(""),
                topic.unwrap_or(""),
                alias.unwrap_or(""),
                r.room_id
            ));
            if !hay.contains(t.as_str()) {
                continue;
            }
        }
        let room_type = s["m.room.create"]["type"].as_str().map(str::to_owned);
        if let Some(types) = &room_types
            && !types.contains(&room_type)
        {
            continue;
        }
        let mut e = json!({
            "room_id": r.room_id,
            "num_joined_members": r.num_joined_members,
            "world_readable": s["m.room.history_visibility"]["history_visibility"] == "world_readable",
            "guest_can_join": s["m.room.guest_access"]["guest_access"] == "can_join",
            "join_rule": s["m.room.join_rules"]["join_rule"].as_str().unwrap_or("invite"),
        });
        for (k, v) in [
            ("name", name),
            ("topic", topic),
            ("canonical_alias", alias),
            ("avatar_url", s["m.room.avatar"]["url"].as_str()),
        ] {
            if let Some(v) = v {
                e[k] = json!(v);
            }
        }
        if let Some(t) = room_type {
            e["room_type"] = json!(t);
        }
        entries.push(e);
    }
    let total = entries.len();
    let page: Vec<Value> = entries.into_iter().skip(offset).take(limit).collect();
    let mut resp = json!({ "chunk": page, "total_room_count_estimate": total });
    if offset + limit < total {
        resp["next_batch"] = json!(format!("o{}", offset + limit));
    }
    if offset > 0 {
        resp["prev_batch"] = json!(format!("o{}", offset.saturating_sub(limit)));
    }
    Ok(axum::Json(resp))
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

/// Room summary (MSC3266, spec v1.15): a preview of a room the user may or may not be in.
///
/// Who may see it follows MSC3266 (the `/hierarchy` rules): anyone, without a token, when the
/// room is `world_readable` or anyone may ask to enter (join rule `public`, `knock`,
/// `knock_restricted`); otherwise only its members (joined, invited, knocking) and, for a
/// `restricted` room, users joined to one of the rooms its join rule allows. Anyone else gets the
/// same 404 `M_NOT_FOUND` as for a room that does not exist: the room's existence is not divulged.
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
    let room = Room::from_row(&row)?;
    let keys: Vec<(String, String)> = [
        "m.room.name",
        "m.room.topic",
        "m.room.avatar",
        "m.room.canonical_alias",
        "m.room.join_rules",
        "m.room.history_visibility",
        "m.room.guest_access",
        "m.room.create",
        "m.room.encryption",
    ]
    .iter()
    .map(|t| (t.to_string(), String::new()))
    .collect();
    let mut s = serde_json::Map::new();
    for r in storage::rooms::current_state_for(&state.db, room.nid, &keys).await? {
        let v: Value = serde_json::from_str(&r.json).unwrap_or(Value::Null);
        s.insert(r.event_type, v["content"].clone());
    }
    let join_rule = s.get("m.room.join_rules").and_then(|c| c["join_rule"].as_str()).unwrap_or("invite").to_owned();
    let world_readable =
        s.get("m.room.history_visibility").is_some_and(|c| c["history_visibility"] == "world_readable");
    let allowed_room_ids: Vec<String> = match join_rule.as_str() {
        "restricted" | "knock_restricted" => s
            .get("m.room.join_rules")
            .and_then(|c| c["allow"].as_array())
            .map(|a| {
                a.iter()
                    .filter(|x| x["type"] == "m.room_membership")
                    .filter_map(|x| x["room_id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
        _ => Vec::new(),
    };
    let membership = match &auth {
        Some(a) => storage::rooms::membership(&state.db, room.nid, &a.user_id).await?.map(|(m, _, _)| m),
        None => None,
    };
    let previewable = world_readable
        || matches!(join_rule.as_str(), "public" | "knock" | "knock_restricted")
        || matches!(membership.as_deref(), Some("join" | "invite" | "knock"))
        || match &auth {
            Some(a) if join_rule == "restricted" => joined_to_any(&state, &a.user_id, &allowed_room_ids).await?,
            _ => false,
        };
    if !previewable {
        return Err(not_found());
    }
    let joined = storage::rooms::member_events(&state.db, room.nid, Some("join"), None).await?.len();
    let mut out = json!({
        "room_id": room.room_id,
        "num_joined_members": joined,
        "join_rule": join_rule,
        "world_readable": world_readable,
        "guest_can_join": s.get("m.room.guest_access").is_some_and(|c| c["guest_access"] == "can_join"),
        "room_version": row.room_version,
    });
    let pick = |k: &str, f: &str| s.get(k).and_then(|c| c[f].as_str()).map(str::to_owned);
    for (key, ty, field) in [
        ("name", "m.room.name", "name"),
        ("topic", "m.room.topic", "topic"),
        ("avatar_url", "m.room.avatar", "url"),
        ("canonical_alias", "m.room.canonical_alias", "alias"),
        ("room_type", "m.room.create", "type"),
        ("encryption", "m.room.encryption", "algorithm"),
    ] {
        if let Some(v) = pick(ty, field) {
            out[key] = json!(v);
        }
    }
    if !allowed_room_ids.is_empty() {
        out["allowed_room_ids"] = json!(allowed_room_ids);
    }
    // Required when authenticated, absent otherwise.
    if auth.is_some() {
        out["membership"] = json!(membership.as_deref().unwrap_or("leave"));
    }
    Ok(axum::Json(out))
}

/// Whether `user` is joined to one of `room_ids` (the rooms a restricted join rule allows).
async fn joined_to_any(state: &AppState, user: &str, room_ids: &[String]) -> ApiResult<bool> {
    for id in room_ids {
        if let Some(r) = storage::rooms::by_id(&state.db, id).await?
            && storage::rooms::membership(&state.db, r.room_nid, user).await?.is_some_and(|(m, _, _)| m == "join")
        {
            return Ok(true);
        }
    }
    Ok(false)
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
