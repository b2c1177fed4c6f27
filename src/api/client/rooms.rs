//! Rooms: creation, membership, sending, state, reading the timeline.

use axum::extract::{RawQuery, State};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::error::{ApiResult, Error};
use crate::federation::membership;
use crate::http::extract::{Auth, ClientIp, Json, Path, Query};
use crate::rooms::client::{format, require_joined};
use crate::rooms::create::{CreateRoomRequest, create_room as create, member_content};
use crate::rooms::token::RoomToken;
use crate::rooms::visibility::{self, Hv, Ignored, Viewer};
use crate::rooms::{self, NewEvent, Room};
use crate::state::AppState;
use crate::storage;

pub async fn create_room(
    State(state): State<AppState>,
    auth: Auth,
    Json(body): Json<CreateRoomRequest>,
) -> ApiResult<axum::Json<Value>> {
    let created = create(&state, &auth.user_id, body).await?;
    let mut resp = json!({ "room_id": created.room_id });
    if let Some(a) = created.alias {
        resp["room_alias"] = json!(a);
    }
    Ok(axum::Json(resp))
}

pub async fn joined_rooms(State(state): State<AppState>, auth: Auth) -> ApiResult<axum::Json<Value>> {
    Ok(axum::Json(json!({ "joined_rooms": storage::rooms::joined_rooms(&state.db, &auth.user_id).await? })))
}

// ---- membership -------------------------------------------------------------------------

#[derive(Deserialize, Default)]
pub struct JoinBody {
    reason: Option<String>,
}

/// For a join: the room ID and the servers named for it when this server is not in the room
/// (unknown, known only through an invite, or left); `None` for a room joined locally.
async fn remote_target(
    state: &AppState,
    id_or_alias: &str,
    via: Vec<String>,
) -> ApiResult<Option<(ruma::OwnedRoomId, Vec<String>)>> {
    let (room_id, via) = if id_or_alias.starts_with('#') {
        let alias = ruma::RoomAliasId::parse(id_or_alias).map_err(|_| Error::invalid_param("Invalid room alias"))?;
        if alias.server_name().as_str() == state.config.server_name {
            return Ok(None);
        }
        let (room_id, mut servers) = membership::resolve_remote_alias(state, &alias).await?;
        servers.extend(via);
        (room_id, servers)
    } else {
        let room_id = ruma::OwnedRoomId::try_from(id_or_alias)
            .map_err(|_| Error::invalid_param("Expected a room ID or alias"))?;
        (room_id, via)
    };
    match Room::load(state, room_id.as_str()).await {
        Ok(room) if membership::server_in_room(state, &room).await? => Ok(None),
        Ok(_) => Ok(Some((room_id, via))),
        Err(e) if e.errcode == "M_NOT_FOUND" && state.federation.enabled => Ok(Some((room_id, via))),
        Err(e) => Err(e),
    }
}

/// Resolves a room ID or a local alias.
async fn resolve_room(state: &AppState, id_or_alias: &str) -> ApiResult<Room> {
    if id_or_alias.starts_with('#') {
        let (room_id, _, _) = storage::rooms::resolve_alias(&state.db, id_or_alias)
            .await?
            .ok_or_else(|| Error::not_found("Room alias not found"))?;
        return Room::load(state, &room_id).await;
    }
    if !id_or_alias.starts_with('!') {
        return Err(Error::invalid_param("Expected a room ID or alias"));
    }
    Room::load(state, id_or_alias).await
}

async fn set_membership(
    state: &AppState,
    room: &Room,
    sender: &str,
    target: &str,
    membership: &str,
    reason: Option<String>,
) -> ApiResult<String> {
    let mut content = if membership == "join" || membership == "invite" {
        let profile = storage::profiles::get(&state.db, target).await?.unwrap_or_default();
        member_content(membership, &profile, false)
    } else {
        json!({ "membership": membership })
    };
    if let Some(r) = reason {
        content["reason"] = json!(r);
    }
    let id = rooms::send(state, room, sender, NewEvent::state("m.room.member", target, content), None).await?;
    Ok(id.to_string())
}

pub async fn join(
    State(state): State<AppState>,
    auth: Auth,
    Path(room_id_or_alias): Path<String>,
    RawQuery(query): RawQuery,
    Json(body): Json<JoinBody>,
) -> ApiResult<axum::Json<Value>> {
    let mut via = crate::http::extract::query_values(query.as_deref(), "via");
    via.extend(crate::http::extract::query_values(query.as_deref(), "server_name"));
    // A room this server is not in (or an alias of another server): joined over federation.
    if let Some((room_id, via)) = remote_target(&state, &room_id_or_alias, via).await? {
        let servers = membership::join_servers(&state, &room_id, via, &auth.user_id).await?;
        let profile = storage::profiles::get(&state.db, &auth.user_id).await?.unwrap_or_default();
        let mut content = member_content("join", &profile, false);
        if let Some(r) = body.reason {
            content["reason"] = json!(r);
        }
        let room = membership::join_remote(&state, &room_id, &auth.user_id, &servers, content).await?;
        return Ok(axum::Json(json!({ "room_id": room.room_id })));
    }
    let room = resolve_room(&state, &room_id_or_alias).await?;
    if let Some((m, _, _)) = storage::rooms::membership(&state.db, room.nid, &auth.user_id).await?
        && m == "join"
    {
        return Ok(axum::Json(json!({ "room_id": room.room_id })));
    }
    let current = storage::rooms::membership(&state.db, room.nid, &auth.user_id).await?.map(|(m, _, _)| m);
    let join_rules = rooms::current_content(&state, &room, "m.room.join_rules", "").await?.unwrap_or(Value::Null);
    let rule = join_rules["join_rule"].as_str().unwrap_or("invite");
    let profile = storage::profiles::get(&state.db, &auth.user_id).await?.unwrap_or_default();
    let mut content = member_content("join", &profile, false);
    if let Some(r) = body.reason {
        content["reason"] = json!(r);
    }
    if matches!(rule, "restricted" | "knock_restricted") && current.as_deref() != Some("invite") {
        match crate::rooms::client::restricted_join_authoriser(&state, &room, &auth.user_id, &join_rules).await? {
            Some(authoriser) => content["join_authorised_via_users_server"] = json!(authoriser),
            // knock_restricted rooms may still be knocked on; joining needs an allowed room.
            None => return Err(Error::forbidden("You are not a member of any room this room allows joining from")),
        }
    }
    rooms::send(&state, &room, &auth.user_id, NewEvent::state("m.room.member", &auth.user_id, content), None).await?;
    Ok(axum::Json(json!({ "room_id": room.room_id })))
}

pub async fn knock(
    State(state): State<AppState>,
    auth: Auth,
    Path(room_id_or_alias): Path<String>,
    RawQuery(query): RawQuery,
    Json(body): Json<JoinBody>,
) -> ApiResult<axum::Json<Value>> {
    let mut via = crate::http::extract::query_values(query.as_deref(), "via");
    via.extend(crate::http::extract::query_values(query.as_deref(), "server_name"));
    if let Some((room_id, via)) = remote_target(&state, &room_id_or_alias, via).await? {
        let servers = membership::join_servers(&state, &room_id, via, &auth.user_id).await?;
        membership::knock_remote(&state, &room_id, &auth.user_id, &servers, body.reason).await?;
        return Ok(axum::Json(json!({ "room_id": room_id })));
    }
    let room = resolve_room(&state, &room_id_or_alias).await?;
    set_membership(&state, &room, &auth.user_id, &auth.user_id, "knock", body.reason).await?;
    Ok(axum::Json(json!({ "room_id": room.room_id })))
}

#[derive(Deserialize)]
pub struct UpgradeBody {
    new_version: String,
}

/// State carried over to the replacement room.
const UPGRADE_COPIED_STATE: &[&str] = &[
    "m.room.join_rules",
    "m.room.history_visibility",
    "m.room.guest_access",
    "m.room.name",
    "m.room.topic",
    "m.room.avatar",
    "m.room.encryption",
    "m.room.server_acl",
    "m.room.canonical_alias",
];

pub async fn upgrade(
    State(state): State<AppState>,
    auth: Auth,
    Path(room_id): Path<String>,
    Json(body): Json<UpgradeBody>,
) -> ApiResult<axum::Json<Value>> {
    let old = Room::load(&state, &room_id).await?;
    let (_, new_rules) = rooms::rules_for(&body.new_version)?;
    require_joined(&state, &old, &auth.user_id).await?;
    let levels = rooms::PowerLevels::load(&state, &old).await?;
    if levels.of(&auth.user_id) < levels.state_event("m.room.tombstone") {
        return Err(Error::forbidden("You may not upgrade this room"));
    }
    let keys: Vec<(String, String)> = UPGRADE_COPIED_STATE.iter().map(|t| (t.to_string(), String::new())).collect();
    let copied = storage::rooms::current_state_for(&state.db, old.nid, &keys).await?;
    let mut initial_state = Vec::new();
    for row in &copied {
        let v: Value = serde_json::from_str(&row.json).unwrap_or(Value::Null);
        initial_state.push(json!({ "type": row.event_type, "state_key": "", "content": v["content"] }));
    }
    let mut pl_override = levels.content().as_object().cloned().unwrap_or_default();
    if new_rules.authorization.explicitly_privilege_room_creators
        && let Some(users) = pl_override.get_mut("users").and_then(Value::as_object_mut)
    {
        // Creators may not appear in v12 power levels: the upgrader is the new room's creator.
        users.remove(&*auth.user_id);
    }
    let last_event = storage::events::page(&state.db, old.nid, true, (i64::MAX, i64::MAX), (0, i64::MAX), 1).await?;
    let mut creation = serde_json::Map::new();
    creation.insert(
        "predecessor".into(),
        json!({ "room_id": old.room_id, "event_id": last_event.first().map(|e| e.event_id.clone()) }),
    );
    let aliases = storage::rooms::aliases_of(&state.db, old.nid).await?;
    let req: CreateRoomRequest = serde_json::from_value(json!({
        "room_version": body.new_version,
        "creation_content": creation,
        "initial_state": initial_state.into_iter().filter(|s| s["type"] != "m.room.canonical_alias").collect::<Vec<_>>(),
        "power_level_content_override": pl_override,
        "preset": "private_chat",
    }))
    .map_err(|e| Error::from(anyhow::anyhow!(e)))?;
    let created = create(&state, &auth.user_id, req).await?;
    let new_room = Room::load(&state, &created.room_id).await?;

    // Point the old room at the new one and stop conversation there.
    let tombstone = json!({ "body": "This room has been replaced", "replacement_room": created.room_id });
    rooms::send(&state, &old, &auth.user_id, NewEvent::state("m.room.tombstone", "", tombstone), None).await?;
    let users_default = levels.content()["users_default"].as_i64().unwrap_or(0);
    let restricted = (users_default + 1).max(50);
    let mut old_pl = levels.content().clone();
    old_pl["events_default"] = json!(restricted);
    old_pl["invite"] = json!(restricted);
    if let Err(e) =
        rooms::send(&state, &old, &auth.user_id, NewEvent::state("m.room.power_levels", "", old_pl), None).await
    {
        tracing::warn!(error = %e, "could not restrict the old room after upgrade");
    }
    // Move local aliases and the canonical alias.
    for a in &aliases {
        storage::rooms::delete_alias(&state.db, a).await?;
        storage::rooms::insert_alias(&state.db, a, new_room.nid, &auth.user_id).await?;
    }
    if let Some(row) = copied.iter().find(|r| r.event_type == "m.room.canonical_alias") {
        let v: Value = serde_json::from_str(&row.json).unwrap_or(Value::Null);
        rooms::send(&state, &old, &auth.user_id, NewEvent::state("m.room.canonical_alias", "", json!({})), None)
            .await?;
        rooms::send(
            &state,
            &new_room,
            &auth.user_id,
            NewEvent::state("m.room.canonical_alias", "", v["content"].clone()),
            None,
        )
        .await?;
    }
    Ok(axum::Json(json!({ "replacement_room": created.room_id })))
}

pub async fn join_by_id(
    state: State<AppState>,
    auth: Auth,
    Path(room_id): Path<String>,
    query: RawQuery,
    body: Json<JoinBody>,
) -> ApiResult<axum::Json<Value>> {
    join(state, auth, Path(room_id), query, body).await
}

#[derive(Deserialize)]
pub struct TargetBody {
    user_id: String,
    reason: Option<String>,
}

async fn local_target(state: &AppState, user_id: &str) -> ApiResult<()> {
    <&ruma::UserId>::try_from(user_id).map_err(|_| Error::invalid_param("Invalid user_id"))?;
    if !crate::appservice::user_exists(state, user_id).await? {
        return Err(Error::not_found("Unknown user"));
    }
    Ok(())
}

pub async fn invite(
    State(state): State<AppState>,
    auth: Auth,
    Path(room_id): Path<String>,
    Json(body): Json<TargetBody>,
) -> ApiResult<axum::Json<Value>> {
    let room = Room::load(&state, &room_id).await?;
    if !crate::users::is_local(&body.user_id, &state.config.server_name) {
        <&ruma::UserId>::try_from(body.user_id.as_str()).map_err(|_| Error::invalid_param("Invalid user_id"))?;
        let mut content = json!({ "membership": "invite" });
        if let Some(r) = body.reason {
            content["reason"] = json!(r);
        }
        membership::invite_remote(&state, &room, &auth.user_id, &body.user_id, content).await?;
        return Ok(axum::Json(json!({})));
    }
    local_target(&state, &body.user_id).await?;
    if storage::users::get(&state.db, &body.user_id).await?.is_some_and(|u| u.deactivated) {
        return Err(Error::forbidden("This account is deactivated and cannot be invited"));
    }
    set_membership(&state, &room, &auth.user_id, &body.user_id, "invite", body.reason).await?;
    Ok(axum::Json(json!({})))
}

pub async fn leave(
    State(state): State<AppState>,
    auth: Auth,
    Path(room_id): Path<String>,
    Json(body): Json<JoinBody>,
) -> ApiResult<axum::Json<Value>> {
    let room = Room::load(&state, &room_id).await?;
    if !membership::server_in_room(&state, &room).await? {
        // Rejecting an invite from another server: through the inviter's server.
        let ruma_id =
            ruma::OwnedRoomId::try_from(room_id.as_str()).map_err(|_| Error::invalid_param("Invalid room ID"))?;
        let servers = membership::join_servers(&state, &ruma_id, Vec::new(), &auth.user_id).await?;
        let Some(server) = servers.first() else { return Err(Error::forbidden("You are not in this room")) };
        membership::leave_remote(&state, &room, &auth.user_id, server, body.reason).await?;
        return Ok(axum::Json(json!({})));
    }
    set_membership(&state, &room, &auth.user_id, &auth.user_id, "leave", body.reason).await?;
    Ok(axum::Json(json!({})))
}

/// Kick, ban and unban: a membership change of `body.user_id` by the caller, after checking the
/// target's current membership with `allowed` (the auth rules then check the caller's power).
async fn moderate(
    state: &AppState,
    auth: &Auth,
    room_id: &str,
    body: TargetBody,
    membership: &str,
    allowed: fn(Option<&str>) -> Result<(), &'static str>,
) -> ApiResult<axum::Json<Value>> {
    let room = Room::load(state, room_id).await?;
    <&ruma::UserId>::try_from(body.user_id.as_str()).map_err(|_| Error::invalid_param("Invalid user_id"))?;
    let current = storage::rooms::membership(&state.db, room.nid, &body.user_id).await?;
    allowed(current.as_ref().map(|(m, _, _)| m.as_str())).map_err(Error::forbidden)?;
    set_membership(state, &room, &auth.user_id, &body.user_id, membership, body.reason).await?;
    Ok(axum::Json(json!({})))
}

pub async fn kick(
    State(state): State<AppState>,
    auth: Auth,
    Path(room_id): Path<String>,
    Json(body): Json<TargetBody>,
) -> ApiResult<axum::Json<Value>> {
    moderate(&state, &auth, &room_id, body, "leave", |m| m.map(|_| ()).ok_or("The user is not a member of this room"))
        .await
}

pub async fn ban(
    State(state): State<AppState>,
    auth: Auth,
    Path(room_id): Path<String>,
    Json(body): Json<TargetBody>,
) -> ApiResult<axum::Json<Value>> {
    // Banning works whether or not the user ever was in the room.
    moderate(&state, &auth, &room_id, body, "ban", |_| Ok(())).await
}

pub async fn unban(
    State(state): State<AppState>,
    auth: Auth,
    Path(room_id): Path<String>,
    Json(body): Json<TargetBody>,
) -> ApiResult<axum::Json<Value>> {
    moderate(&state, &auth, &room_id, body, "leave", |m| {
        if m == Some("ban") { Ok(()) } else { Err("The user is not banned") }
    })
    .await
}

pub async fn forget(
    State(state): State<AppState>,
    auth: Auth,
    Path(room_id): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    let room = Room::load(&state, &room_id).await?;
    match storage::rooms::membership(&state.db, room.nid, &auth.user_id).await? {
        Some((m, _, _)) if m == "join" || m == "invite" || m == "knock" => {
            Err(Error::unknown("You must leave the room before forgetting it"))
        }
        _ => {
            storage::rooms::forget(&state.db, room.nid, &auth.user_id).await?;
            state.sync.invalidate_user(&auth.user_id);
            Ok(axum::Json(json!({})))
        }
    }
}

// ---- sending ----------------------------------------------------------------------------

fn object(body: Value) -> ApiResult<Value> {
    if body.is_object() { Ok(body) } else { Err(Error::bad_json("Content must be a JSON object")) }
}

/// MSC4140: `?org.matrix.msc4140.delay=<ms>` on `/send` and `/state` schedules the event instead.
#[derive(Deserialize, Default)]
pub struct DelayQuery {
    #[serde(rename = "org.matrix.msc4140.delay")]
    delay: Option<String>,
    #[serde(rename = "org.matrix.msc4140.parent_delay_id")]
    parent_delay_id: Option<String>,
}

impl DelayQuery {
    /// The requested delay, validated; `None` for an immediate send.
    fn delay(&self, state: &AppState) -> ApiResult<Option<u64>> {
        if self.parent_delay_id.is_some() {
            return Err(Error::invalid_param("org.matrix.msc4140.parent_delay_id is not supported"));
        }
        self.delay.as_deref().map(|d| crate::rtc::delayed::parse_delay(state, d)).transpose()
    }
}

pub async fn send_message(
    State(state): State<AppState>,
    auth: Auth,
    ClientIp(ip): ClientIp,
    Path((room_id, event_type, txn_id)): Path<(String, String, String)>,
    Query(dq): Query<DelayQuery>,
    Json(body): Json<Value>,
) -> ApiResult<axum::Json<Value>> {
    if let Some(delay_ms) = dq.delay(&state)? {
        let room = Room::load(&state, &room_id).await?;
        let scope = rooms::txn_scope(&["rooms", &room_id, "send", &event_type]);
        let delay_id = crate::rtc::delayed::schedule(
            &state,
            crate::rtc::delayed::Schedule {
                user_id: &auth.user_id,
                device_id: &auth.device_id,
                is_admin: auth.is_admin,
                room: &room,
                event_type: &event_type,
                state_key: None,
                content: body,
                delay_ms,
                txn: Some((scope, &txn_id)),
            },
        )
        .await?;
        return Ok(axum::Json(json!({ "delay_id": delay_id })));
    }
    let limits = &state.rate_limits;
    // Appservices with `rate_limited: false` (and their senders) and, when configured, bots
    // are not limited.
    let exempt = auth.rate_exempt || (auth.is_bot && state.config.bots.exempt_from_rate_limits);
    if !exempt {
        limits.check_user(&limits.messages_per_user, &auth.user_id, auth.is_admin)?;
        limits.check_user(&limits.messages_per_ip, &ip.to_string(), auth.is_admin)?;
    }
    if event_type.is_empty() || event_type.len() > 255 {
        return Err(Error::invalid_param("Invalid event type"));
    }
    if event_type == "m.room.redaction" {
        return Err(Error::invalid_param("Use the /redact endpoint to redact events"));
    }
    let room = Room::load(&state, &room_id).await?;
    if event_type == "m.reaction" {
        refuse_duplicate_annotation(&state, &room, &auth, &txn_id, &body).await?;
    }
    let ev = NewEvent::message(&event_type, object(body)?);
    let scope = rooms::txn_scope(&["rooms", &room_id, "send", &event_type]);
    let txn = rooms::ClientTxn { device: &auth.device_id, scope: &scope, id: &txn_id };
    let id = rooms::send(&state, &room, &auth.user_id, ev, Some(txn)).await?;
    Ok(axum::Json(json!({ "event_id": id })))
}

/// The spec: a second identical annotation (same sender, target and key) is refused with 400
/// `M_DUPLICATE_ANNOTATION`. A retry of the very send that made it (same device and txn ID) is
/// let through, so that the pipeline answers it with the recorded event ID.
async fn refuse_duplicate_annotation(
    state: &AppState,
    room: &Room,
    auth: &Auth,
    txn_id: &str,
    body: &Value,
) -> ApiResult<()> {
    let rel = &body["m.relates_to"];
    let (Some("m.annotation"), Some(target), Some(key)) =
        (rel["rel_type"].as_str(), rel["event_id"].as_str(), rel["key"].as_str())
    else {
        return Ok(());
    };
    let Some((device, txn)) = storage::events::own_annotation(&state.db, room.nid, target, &auth.user_id, key).await?
    else {
        return Ok(());
    };
    if device.as_deref() == Some(&*auth.device_id) && txn.as_deref() == Some(txn_id) {
        return Ok(());
    }
    Err(Error::new(
        axum::http::StatusCode::BAD_REQUEST,
        "M_DUPLICATE_ANNOTATION",
        "You already sent this annotation for this event",
    ))
}

/// `/rooms/{room_id}/state/{event_type}[/{state_key}]`: the state key may be absent (empty).
#[derive(Deserialize)]
pub struct StatePath {
    room_id: String,
    event_type: String,
    #[serde(default)]
    state_key: String,
}

pub async fn put_state(
    State(state): State<AppState>,
    auth: Auth,
    Path(StatePath { room_id, event_type: kind, state_key: key }): Path<StatePath>,
    Query(dq): Query<DelayQuery>,
    Json(body): Json<Value>,
) -> ApiResult<axum::Json<Value>> {
    let state = &state;
    let room = Room::load(state, &room_id).await?;
    if let Some(delay_ms) = dq.delay(state)? {
        let delay_id = crate::rtc::delayed::schedule(
            state,
            crate::rtc::delayed::Schedule {
                user_id: &auth.user_id,
                device_id: &auth.device_id,
                is_admin: auth.is_admin,
                room: &room,
                event_type: &kind,
                state_key: Some(&key),
                content: body,
                delay_ms,
                txn: None,
            },
        )
        .await?;
        return Ok(axum::Json(json!({ "delay_id": delay_id })));
    }
    let content = object(body)?;
    if kind == "m.room.canonical_alias" {
        let mut aliases: Vec<&str> =
            content["alt_aliases"].as_array().map(|a| a.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
        if let Some(a) = content["alias"].as_str() {
            aliases.push(a);
        }
        for a in aliases {
            match storage::rooms::resolve_alias(&state.db, a).await? {
                Some((rid, _, _)) if rid == room.room_id.as_str() => {}
                _ => {
                    return Err(Error::new(
                        axum::http::StatusCode::BAD_REQUEST,
                        "M_BAD_ALIAS",
                        format!("{a} does not point to this room"),
                    ));
                }
            }
        }
    }
    let id = rooms::send(state, &room, &auth.user_id, NewEvent::state(&kind, &key, content), None).await?;
    Ok(axum::Json(json!({ "event_id": id })))
}

#[derive(Deserialize, Default)]
pub struct RedactBody {
    reason: Option<String>,
}

pub async fn redact(
    State(state): State<AppState>,
    auth: Auth,
    Path((room_id, event_id, txn_id)): Path<(String, String, String)>,
    Json(body): Json<RedactBody>,
) -> ApiResult<axum::Json<Value>> {
    let room = Room::load(&state, &room_id).await?;
    let target = storage::events::by_id(&state.db, &event_id)
        .await?
        .filter(|e| e.room_nid == room.nid)
        .ok_or_else(|| Error::not_found("Event not found"))?;
    if target.sender != *auth.user_id {
        let levels = rooms::PowerLevels::load(&state, &room).await?;
        if levels.of(&auth.user_id) < levels.action("redact", 50) {
            return Err(Error::forbidden("You cannot redact other users' events"));
        }
    }
    let mut content = json!({});
    if let Some(r) = body.reason {
        content["reason"] = json!(r);
    }
    let scope = rooms::txn_scope(&["rooms", &room_id, "redact", &event_id]);
    let txn = rooms::ClientTxn { device: &auth.device_id, scope: &scope, id: &txn_id };
    let ev = NewEvent { kind: "m.room.redaction".into(), state_key: None, content, redacts: Some(event_id) };
    let id = rooms::send(&state, &room, &auth.user_id, ev, Some(txn)).await?;
    Ok(axum::Json(json!({ "event_id": id })))
}

// ---- reading ----------------------------------------------------------------------------

/// The state a user may read: the current state while joined (or in a world-readable room), the
/// state at their departure after leaving a room they had joined.
async fn readable_state_group(state: &AppState, room: &Room, user: &str) -> ApiResult<Option<i64>> {
    match storage::rooms::membership(&state.db, room.nid, user).await? {
        Some((m, _, _)) if m == "join" => return Ok(None),
        Some((m, _, _)) if m == "leave" || m == "ban" => {
            // The state when their last membership `join` ended (not a later invite's end).
            let viewer = Viewer::load(state, room, user).await?;
            if let Some(departure) = viewer.departed_from_join() {
                return Ok(storage::events::state_after_at(&state.db, room.nid, departure).await?);
            }
        }
        _ => {}
    }
    if visibility::current(state, room).await? == Hv::WorldReadable {
        return Ok(None);
    }
    Err(Error::forbidden("You are not a member of this room"))
}

/// The state `user` may read: current for a member or a world-readable room, as of their
/// departure for a departed member; 403 otherwise.
pub async fn readable_state(state: &AppState, room: &Room, user: &str) -> ApiResult<Vec<storage::events::EventRow>> {
    Ok(match readable_state_group(state, room, user).await? {
        None => storage::rooms::current_state(&state.db, room.nid).await?,
        Some(group) => storage::rooms::state_events_of_group(&state.db, group).await?,
    })
}

pub async fn get_state(
    State(state): State<AppState>,
    auth: Auth,
    Path(room_id): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    let room = Room::load(&state, &room_id).await?;
    let rows = readable_state(&state, &room, &auth.user_id).await?;
    Ok(axum::Json(Value::Array(rows.iter().map(|r| format(&room, r, None)).collect())))
}

#[derive(Deserialize)]
pub struct FormatQuery {
    format: Option<String>,
}

pub async fn get_state_event(
    State(state): State<AppState>,
    auth: Auth,
    Path(StatePath { room_id, event_type: kind, state_key: key }): Path<StatePath>,
    Query(q): Query<FormatQuery>,
) -> ApiResult<axum::Json<Value>> {
    let state = &state;
    let room = Room::load(state, &room_id).await?;
    let row = match readable_state_group(state, &room, &auth.user_id).await? {
        None => storage::rooms::current_state_for(&state.db, room.nid, &[(kind.clone(), key.clone())]).await?.pop(),
        Some(group) => storage::rooms::state_events_of_group(&state.db, group)
            .await?
            .into_iter()
            .find(|r| r.event_type == kind && r.state_key.as_deref() == Some(key.as_str())),
    }
    .ok_or_else(|| Error::not_found("State event not found"))?;
    let ev = format(&room, &row, None);
    Ok(axum::Json(if q.format.as_deref() == Some("event") { ev } else { ev["content"].clone() }))
}

pub async fn get_event(
    State(state): State<AppState>,
    auth: Auth,
    Path((room_id, event_id)): Path<(String, String)>,
) -> ApiResult<axum::Json<Value>> {
    let room = Room::load(&state, &room_id).await?;
    let not_found = || Error::not_found("Event not found");
    let row =
        storage::events::by_id(&state.db, &event_id).await?.filter(|e| e.room_nid == room.nid).ok_or_else(not_found)?;
    let viewer = Viewer::load(&state, &room, &auth.user_id).await?;
    if !viewer.sees(&state, &row).await? {
        return Err(not_found());
    }
    let mut ev = [format(&room, &row, Some((&auth.user_id, &auth.device_id)))];
    rooms::relations::bundle(&state, &room, (&auth.user_id, &auth.device_id), &viewer, &mut ev).await?;
    let [ev] = ev;
    Ok(axum::Json(ev))
}

#[derive(Deserialize)]
pub struct MessagesQuery {
    dir: String,
    from: Option<String>,
    to: Option<String>,
    limit: Option<i64>,
    filter: Option<String>,
}

pub use crate::sync::filter::RoomEventFilter;

pub use crate::rooms::token::topological as token;

/// The room may be read at all: the user has (or had) a membership, or it is world-readable.
pub async fn require_readable(state: &AppState, room: &Room, viewer: &Viewer) -> ApiResult<()> {
    if viewer.ever_member || visibility::current(state, room).await? == Hv::WorldReadable {
        return Ok(());
    }
    Err(Error::forbidden("You are not a member of this room"))
}

/// A walk through a room's timeline from a position: what it found and where it stopped.
pub struct Walk {
    pub events: Vec<storage::events::EventRow>,
    /// The position after the last event looked at, in the walk's direction.
    pub cursor: (i64, i64),
    /// No further events (in the room, or before `to`).
    pub exhausted: bool,
}

/// Reads up to `limit` events the viewer may see (and the filter accepts, and not from ignored
/// users) from `from` (a position between events) in one direction, stopping at `to`. Reads
/// pages until the chunk is full, at most 10 pages of at least 50 rows.
#[allow(clippy::too_many_arguments)]
pub async fn walk(
    state: &AppState,
    room: &Room,
    viewer: &Viewer,
    ignored: &Ignored,
    filter: &RoomEventFilter,
    backwards: bool,
    from: (i64, i64),
    to: Option<(i64, i64)>,
    limit: i64,
) -> ApiResult<Walk> {
    let mut events = Vec::new();
    let mut cursor = from;
    let mut exhausted = false;
    let page_size = limit.max(50);
    if limit <= 0 {
        return Ok(Walk { events, cursor, exhausted });
    }
    let upto = viewer.read_limit(state, room).await?;
    'pages: for _ in 0..10 {
        let rows = storage::events::page(&state.db, room.nid, backwards, cursor, (i64::MIN, upto), page_size).await?;
        let got = rows.len() as i64;
        let visible = viewer.visible(state, &rows).await?;
        for (row, visible) in rows.into_iter().zip(visible) {
            let pos = (row.depth, row.stream_ordering);
            if let Some(t) = to
                && (if backwards { pos < t } else { pos >= t })
            {
                exhausted = true;
                break 'pages;
            }
            cursor = if backwards { pos } else { (pos.0, pos.1.saturating_add(1)) };
            if visible && filter.allows_row(&row) && !ignored.hides(&row) {
                events.push(row);
                if events.len() as i64 == limit {
                    break 'pages;
                }
            }
        }
        if got < page_size {
            exhausted = true;
            break;
        }
    }
    Ok(Walk { events, cursor, exhausted })
}

pub async fn messages(
    State(state): State<AppState>,
    auth: Auth,
    Path(room_id): Path<String>,
    Query(q): Query<MessagesQuery>,
) -> ApiResult<axum::Json<Value>> {
    let room = Room::load(&state, &room_id).await?;
    let backwards = match q.dir.as_str() {
        "b" => true,
        "f" => false,
        _ => return Err(Error::invalid_param("dir must be b or f")),
    };
    let limit = q.limit.unwrap_or(10).clamp(1, 1000);
    let filter = RoomEventFilter::from_param(q.filter.as_deref())?;
    let viewer = Viewer::load(&state, &room, &auth.user_id).await?;
    require_readable(&state, &room, &viewer).await?;
    let ignored = Ignored::load(&state, &auth.user_id).await?;
    // Every token form this server hands out (see `rooms::token`).
    let start = match q.from.as_deref().map(RoomToken::parse).transpose()? {
        Some(t) => t.position(&state, room.nid).await?,
        None if backwards => (i64::MAX, i64::MAX),
        None => (i64::MIN, i64::MIN),
    };
    let to = match q.to.as_deref().map(RoomToken::parse).transpose()? {
        Some(t) => Some(t.position(&state, room.nid).await?),
        None => None,
    };
    let mut page = walk(&state, &room, &viewer, &ignored, &filter, backwards, start, to, limit).await?;
    // Past the beginning of what this server has of a room joined over federation: the history
    // before it is asked of the room's other servers, then read again.
    if backwards
        && page.exhausted
        && to.is_none()
        && crate::federation::backfill::backfill(&state, &room, limit).await? > 0
    {
        page = walk(&state, &room, &viewer, &ignored, &filter, backwards, start, to, limit).await?;
    }
    let Walk { events: chunk, cursor, exhausted } = page;
    let device = (&*auth.user_id, &*auth.device_id);
    let mut events: Vec<Value> = chunk.iter().map(|r| format(&room, r, Some(device))).collect();
    rooms::relations::bundle(&state, &room, device, &viewer, &mut events).await?;
    let mut resp = json!({
        "start": q.from.clone().unwrap_or_else(|| token(start.0.clamp(0, i64::MAX), start.1.clamp(0, i64::MAX))),
        "chunk": events,
    });
    if !exhausted {
        resp["end"] = json!(token(cursor.0, cursor.1));
    }
    if filter.lazy_load_members {
        let mut senders: Vec<String> = chunk.iter().map(|r| r.sender.clone()).collect();
        senders.sort();
        senders.dedup();
        let keys: Vec<(String, String)> = senders.into_iter().map(|s| ("m.room.member".to_owned(), s)).collect();
        let members = storage::rooms::current_state_for(&state.db, room.nid, &keys).await?;
        resp["state"] = json!(members.iter().map(|r| format(&room, r, None)).collect::<Vec<_>>());
    }
    Ok(axum::Json(resp))
}

#[derive(Deserialize)]
pub struct InitialSyncQuery {
    limit: Option<i64>,
}

/// `GET /rooms/{roomId}/initialSync`: a snapshot of a room (its state, latest messages, the
/// user's room account data), for peeking into world-readable rooms; Element also asks it
/// for rooms it is in. Readable as `/state` and `/messages` are: a member sees the current
/// state, a departed member the room as they left it, anyone a world-readable room.
pub async fn initial_sync(
    State(state): State<AppState>,
    auth: Auth,
    Path(room_id): Path<String>,
    Query(q): Query<InitialSyncQuery>,
) -> ApiResult<axum::Json<Value>> {
    let room = Room::load(&state, &room_id).await?;
    let viewer = Viewer::load(&state, &room, &auth.user_id).await?;
    require_readable(&state, &room, &viewer).await?;
    let state_rows = readable_state(&state, &room, &auth.user_id).await?;
    let limit = q.limit.unwrap_or(10).clamp(0, 100);
    let ignored = Ignored::load(&state, &auth.user_id).await?;
    let filter = RoomEventFilter::default();
    let Walk { events: mut chunk, cursor, .. } =
        walk(&state, &room, &viewer, &ignored, &filter, true, (i64::MAX, i64::MAX), None, limit).await?;
    chunk.reverse();
    // `start` names the position before the oldest message, `end` the one after the newest:
    // both can be given to `/messages` (backwards from `start`, forwards from `end`).
    let start = token(cursor.0, cursor.1);
    let end = match chunk.last() {
        Some(e) => token(e.depth, e.stream_ordering.saturating_add(1)),
        None => start.clone(),
    };
    let device = (&*auth.user_id, &*auth.device_id);
    let mut messages: Vec<Value> = chunk.iter().map(|r| format(&room, r, Some(device))).collect();
    rooms::relations::bundle(&state, &room, device, &viewer, &mut messages).await?;
    let membership = storage::rooms::membership(&state.db, room.nid, &auth.user_id).await?.map(|(m, _, _)| m);
    let is_public = storage::rooms::by_id(&state.db, room.room_id.as_str()).await?.is_some_and(|r| r.is_public);
    let account_data: Vec<Value> = storage::account_data::room_all(&state.db, &auth.user_id, room.room_id.as_str())
        .await?
        .into_iter()
        .map(|(kind, content)| json!({ "type": kind, "content": content.0 }))
        .collect();
    let mut resp = json!({
        "room_id": room.room_id,
        "messages": { "start": start, "end": end, "chunk": messages },
        "state": state_rows.iter().map(|r| format(&room, r, None)).collect::<Vec<_>>(),
        "visibility": if is_public { "public" } else { "private" },
        "account_data": account_data,
    });
    if let Some(m) = membership.filter(|m| ["invite", "join", "leave", "ban"].contains(&m.as_str())) {
        resp["membership"] = json!(m);
    }
    Ok(axum::Json(resp))
}

#[derive(Deserialize)]
pub struct MembersQuery {
    membership: Option<String>,
    not_membership: Option<String>,
    at: Option<String>,
}

pub async fn members(
    State(state): State<AppState>,
    auth: Auth,
    Path(room_id): Path<String>,
    Query(q): Query<MembersQuery>,
) -> ApiResult<axum::Json<Value>> {
    let room = Room::load(&state, &room_id).await?;
    let group = readable_state_group(&state, &room, &auth.user_id).await?;
    let rows = match (group, &q.at) {
        (None, None) => {
            storage::rooms::member_events(&state.db, room.nid, q.membership.as_deref(), q.not_membership.as_deref())
                .await?
        }
        (group, at) => {
            // State at a point of the timeline (or at the user's departure).
            let group = match at {
                Some(t) => {
                    // The state at a position: after the last event before it (a sync token:
                    // after the last event at or before its stream position).
                    let (from, upto) = match RoomToken::parse(t)? {
                        RoomToken::Topological { depth, stream } => ((depth, stream), i64::MAX),
                        RoomToken::Stream(pos) => ((i64::MAX, i64::MAX), pos),
                    };
                    let viewer = Viewer::load(&state, &room, &auth.user_id).await?;
                    // A departed member reads no further than their departure.
                    let upto = upto.min(if viewer.is_joined() { i64::MAX } else { viewer.joined_until() });
                    let last = storage::events::page(&state.db, room.nid, true, from, (i64::MIN, upto), 1).await?;
                    match last.first() {
                        None => group,
                        Some(e) => {
                            // Readable if the event before the position or the one after it is
                            // visible (the state before a user's first visible event is what
                            // their sync showed them).
                            let next =
                                storage::events::page(&state.db, room.nid, false, from, (i64::MIN, upto), 1).await?;
                            let rows: Vec<&storage::events::EventRow> = [e].into_iter().chain(next.first()).collect();
                            if !viewer.visible(&state, &rows).await?.into_iter().any(|v| v) {
                                return Err(Error::forbidden("You may not see the room at that point"));
                            }
                            e.state_after.or(group)
                        }
                    }
                }
                None => group,
            };
            let Some(group) = group else { return Err(Error::not_found("No state at that point")) };
            storage::rooms::state_events_of_group(&state.db, group)
                .await?
                .into_iter()
                .filter(|r| r.event_type == "m.room.member")
                .filter(|r| {
                    let m = serde_json::from_str::<Value>(&r.json)
                        .ok()
                        .and_then(|v| v["content"]["membership"].as_str().map(str::to_owned))
                        .unwrap_or_default();
                    q.membership.as_deref().is_none_or(|w| w == m) && q.not_membership.as_deref().is_none_or(|w| w != m)
                })
                .collect()
        }
    };
    Ok(axum::Json(json!({ "chunk": rows.iter().map(|r| format(&room, r, None)).collect::<Vec<_>>() })))
}

pub async fn joined_members(
    State(state): State<AppState>,
    auth: Auth,
    Path(room_id): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    let room = Room::load(&state, &room_id).await?;
    require_joined(&state, &room, &auth.user_id).await?;
    let rows = storage::rooms::member_events(&state.db, room.nid, Some("join"), None).await?;
    let mut joined = Map::new();
    for r in rows {
        let v: Value = serde_json::from_str(&r.json).unwrap_or(Value::Null);
        let mut entry = json!({});
        if let Some(d) = v["content"]["displayname"].as_str() {
            entry["display_name"] = json!(d);
        }
        if let Some(a) = v["content"]["avatar_url"].as_str() {
            entry["avatar_url"] = json!(a);
        }
        joined.insert(r.state_key.unwrap_or_default(), entry);
    }
    Ok(axum::Json(json!({ "joined": joined })))
}

// ---- aliases ----------------------------------------------------------------------------

fn check_local_alias(state: &AppState, alias: &str) -> ApiResult<()> {
    let (local, server) = alias
        .strip_prefix('#')
        .and_then(|a| a.split_once(':'))
        .ok_or_else(|| Error::invalid_param("Invalid room alias"))?;
    if local.is_empty() || server != state.config.server_name {
        return Err(Error::invalid_param("Room alias must be on this server"));
    }
    Ok(())
}

pub async fn get_alias(State(state): State<AppState>, Path(alias): Path<String>) -> ApiResult<axum::Json<Value>> {
    check_local_alias(&state, &alias)?;
    let mut found = storage::rooms::resolve_alias(&state.db, &alias).await?;
    if found.is_none()
        && state.appservices.all().iter().any(|r| r.is_alias_in_namespace(&alias))
        && crate::appservice::client::query_alias(&state, &alias).await
    {
        // The appservice created the room and its alias while we waited.
        found = storage::rooms::resolve_alias(&state.db, &alias).await?;
    }
    let (room_id, _, _) = found.ok_or_else(|| Error::not_found("Room alias not found"))?;
    Ok(axum::Json(json!({ "room_id": room_id, "servers": [state.config.server_name] })))
}

#[derive(Deserialize)]
pub struct AliasBody {
    room_id: String,
}

pub async fn put_alias(
    State(state): State<AppState>,
    auth: Auth,
    Path(alias): Path<String>,
    Json(body): Json<AliasBody>,
) -> ApiResult<axum::Json<Value>> {
    check_local_alias(&state, &alias)?;
    crate::appservice::check_alias_allowed(&state, &alias, auth.appservice.as_deref(), &auth.user_id)?;
    let room = Room::load(&state, &body.room_id).await?;
    // An appservice manages the aliases of its namespace without being in the room.
    let appservice_alias = auth
        .appservice
        .as_deref()
        .and_then(|id| state.appservices.by_id(id))
        .is_some_and(|r| r.is_alias_in_namespace(&alias));
    // Pointing an alias at a room speaks for it: only its members may (and server admins).
    if !auth.is_admin && !appservice_alias {
        let joined =
            storage::rooms::membership(&state.db, room.nid, &auth.user_id).await?.is_some_and(|(m, _, _)| m == "join");
        if !joined {
            return Err(Error::forbidden("You must be joined to the room to give it an alias"));
        }
    }
    if !storage::rooms::insert_alias(&state.db, &alias, room.nid, &auth.user_id).await? {
        return Err(Error::new(axum::http::StatusCode::CONFLICT, "M_UNKNOWN", "Room alias already exists"));
    }
    Ok(axum::Json(json!({})))
}

pub async fn delete_alias(
    State(state): State<AppState>,
    auth: Auth,
    Path(alias): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    check_local_alias(&state, &alias)?;
    let (room_id, _, creator) = storage::rooms::resolve_alias(&state.db, &alias)
        .await?
        .ok_or_else(|| Error::not_found("Room alias not found"))?;
    // The alias's creator, a server admin, or a member of the room with the power to change its
    // canonical alias (as Synapse: being joined is required for the last).
    if creator != *auth.user_id && !auth.is_admin {
        let room = Room::load(&state, &room_id).await?;
        let joined =
            storage::rooms::membership(&state.db, room.nid, &auth.user_id).await?.is_some_and(|(m, _, _)| m == "join");
        let levels = rooms::PowerLevels::load(&state, &room).await?;
        if !joined || levels.of(&auth.user_id) < levels.state_event("m.room.canonical_alias") {
            return Err(Error::forbidden("You may not delete this alias"));
        }
    }
    storage::rooms::delete_alias(&state.db, &alias).await?;
    Ok(axum::Json(json!({})))
}

pub async fn room_aliases(
    State(state): State<AppState>,
    auth: Auth,
    Path(room_id): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    let room = Room::load(&state, &room_id).await?;
    require_readable(&state, &room, &Viewer::load(&state, &room, &auth.user_id).await?).await?;
    Ok(axum::Json(json!({ "aliases": storage::rooms::aliases_of(&state.db, room.nid).await? })))
}
