//! Room creation: the `m.room.create` event (which, from v12, names the room) and the initial
//! state that presets and the request ask for, all in one transaction.

use ruma::RoomId;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{Head, NewEvent, Room, append, committed, rules_for, sign};
use crate::error::{ApiResult, Error};
use crate::state::AppState;
use crate::storage::{self, now_ms};

#[derive(Debug, Default, Deserialize)]
pub struct CreateRoomRequest {
    pub visibility: Option<String>,
    pub room_alias_name: Option<String>,
    pub name: Option<String>,
    pub topic: Option<String>,
    #[serde(default)]
    pub invite: Vec<String>,
    pub room_version: Option<String>,
    pub creation_content: Option<Map<String, Value>>,
    #[serde(default)]
    pub initial_state: Vec<InitialState>,
    pub preset: Option<String>,
    #[serde(default)]
    pub is_direct: bool,
    pub power_level_content_override: Option<Map<String, Value>>,
}

#[derive(Debug, Deserialize)]
pub struct InitialState {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub state_key: String,
    pub content: Value,
}

pub struct Created {
    pub room_id: String,
    pub alias: Option<String>,
}

pub async fn create_room(state: &AppState, creator: &str, req: CreateRoomRequest) -> ApiResult<Created> {
    let version = req.room_version.clone().unwrap_or_else(|| state.config.rooms.default_version.clone());
    let (version_id, rules) = rules_for(&version)?;
    let public = match req.visibility.as_deref() {
        None | Some("private") => false,
        Some("public") => true,
        Some(v) => return Err(Error::invalid_param(format!("Unknown visibility {v}"))),
    };
    let preset = match req.preset.as_deref() {
        Some(p @ ("private_chat" | "trusted_private_chat" | "public_chat")) => p,
        Some(p) => return Err(Error::invalid_param(format!("Unknown preset {p}"))),
        None if public => "public_chat",
        None => "private_chat",
    };
    let server = &state.config.server_name;
    for u in &req.invite {
        let uid =
            <&ruma::UserId>::try_from(u.as_str()).map_err(|_| Error::invalid_param(format!("Invalid user ID {u}")))?;
        if uid.server_name().as_str() != server {
            return Err(Error::forbidden(
                "Inviting users of other servers needs federation, which is not available yet",
            ));
        }
        if !crate::appservice::user_exists(state, u).await? {
            return Err(Error::not_found(format!("Unknown user {u}")));
        }
    }
    let alias = match &req.room_alias_name {
        Some(name) => {
            if name.is_empty() || name.contains(':') || name.contains('#') || name.chars().any(char::is_whitespace) {
                return Err(Error::invalid_param("room_alias_name must be a plain localpart"));
            }
            let alias = format!("#{name}:{server}");
            crate::appservice::check_alias_allowed(state, &alias, None, creator)?;
            if storage::rooms::resolve_alias(&state.db, &alias).await?.is_some() {
                return Err(Error::new(
                    axum::http::StatusCode::BAD_REQUEST,
                    "M_ROOM_IN_USE",
                    "Room alias already taken",
                ));
            }
            Some(alias)
        }
        None => None,
    };

    // m.room.create
    let trusted = preset == "trusted_private_chat";
    let mut create_content = req.creation_content.clone().unwrap_or_default();
    create_content.insert("room_version".into(), json!(version));
    if !rules.authorization.use_room_create_sender {
        create_content.insert("creator".into(), json!(creator));
    }
    if rules.authorization.additional_room_creators && trusted && !req.invite.is_empty() {
        create_content.insert("additional_creators".into(), json!(req.invite));
    }
    let ts = create_ts();
    let provisional_room_id = if rules.authorization.room_create_event_id_as_room_id {
        None
    } else {
        Some(RoomId::new_v1(<&ruma::ServerName>::try_from(server.as_str()).map_err(|_| Error::internal())?))
    };
    let mut create = json!({
        "type": "m.room.create",
        "state_key": "",
        "sender": creator,
        "content": create_content,
        "origin_server_ts": ts,
        "depth": 1,
        "prev_events": [],
        "auth_events": [],
    });
    if let Some(r) = &provisional_room_id {
        create["room_id"] = json!(r);
    }
    let (create_id, create_json) = sign(state, create, &rules)?;
    let room_id = match provisional_room_id {
        Some(r) => r,
        None => RoomId::new_v2(create_id.as_str().trim_start_matches('$')).map_err(|_| Error::internal())?,
    };
    // The create event is checked by the same rules as every other event.
    let create_pdu =
        super::pdu::Pdu::parse(create_id.as_str(), &create_json).map_err(|e| Error::from(anyhow::anyhow!(e)))?;
    ruma::state_res::check_state_independent_auth_rules(&rules.authorization, &create_pdu, |_: &ruma::EventId| {
        None::<super::pdu::Pdu>
    })
    .map_err(Error::forbidden)?;

    let writer = state.sync.begin_write(&state.event_stream);
    let mut tx = state.db.begin().await?;
    // The room needs no lock: no other transaction can see it before this one commits, and
    // once it is visible
    // every writer takes the room lock (`rooms::lock_room`, a row lock on the `room_extremities`
    // row inserted below).
    let room_nid = storage::rooms::insert(&mut tx, room_id.as_str(), &version, creator).await?;
    // Before its first stream position: the event writers' lock (see `cluster`).
    storage::events::lock_event_writers(&mut tx).await?;
    let (create_nid, create_stream) = storage::events::insert(
        &mut tx,
        &storage::events::NewEventRow {
            event_id: create_id.as_str(),
            room_nid,
            depth: 1,
            event_type: "m.room.create",
            state_key: Some(""),
            sender: creator,
            origin_server_ts: ts,
            json: &create_json,
            state_before: None,
            state_after: None,
            redacts: None,
            rel_type: None,
            relates_to: None,
            txn: None,
            search: None,
        },
    )
    .await?;
    let key = storage::state::intern_key(&mut tx, "m.room.create", "").await?;
    let group = storage::state::create_group(&mut tx, room_nid, None, &[(key, create_nid)]).await?;
    sqlx::query("UPDATE events SET state_after = $2 WHERE event_nid = $1")
        .bind(create_nid)
        .bind(group)
        .execute(&mut *tx)
        .await?;
    storage::state::set_current(&mut tx, room_nid, key, create_nid).await?;
    storage::rooms::set_current_group(&mut tx, room_nid, group).await?;
    sqlx::query("INSERT INTO room_extremities (room_nid, event_nids) VALUES ($1, ARRAY[$2::bigint])")
        .bind(room_nid)
        .bind(create_nid)
        .execute(&mut *tx)
        .await?;

    let room = Room { nid: room_nid, room_id: room_id.clone(), version: version_id, rules: rules.clone() };
    let profile = storage::profiles::get(&mut *tx, creator).await?.unwrap_or_default();
    let mut events = vec![NewEvent::state("m.room.member", creator, member_content("join", &profile, false))];

    // Power levels: defaults, then the preset, then the client's override.
    let mut users = Map::new();
    if !rules.authorization.explicitly_privilege_room_creators {
        users.insert(creator.into(), json!(100));
        if trusted {
            for u in &req.invite {
                users.insert(u.clone(), json!(100));
            }
        }
    }
    let mut pl = json!({
        "users": users,
        "users_default": 0,
        "events": {
            "m.room.name": 50, "m.room.power_levels": 100, "m.room.history_visibility": 100,
            "m.room.canonical_alias": 50, "m.room.avatar": 50, "m.room.tombstone": 100,
            "m.room.server_acl": 100, "m.room.encryption": 100
        },
        "events_default": 0,
        "state_default": 50,
        "ban": 50,
        "kick": 50,
        "redact": 50,
        "invite": if preset == "public_chat" { 50 } else { 0 },
        "notifications": { "room": 50 },
    });
    if let Some(o) = &req.power_level_content_override {
        for (k, v) in o {
            pl[k] = v.clone();
        }
    }
    events.push(NewEvent::state("m.room.power_levels", "", pl));
    if let Some(a) = &alias {
        events.push(NewEvent::state("m.room.canonical_alias", "", json!({ "alias": a })));
    }
    let join_rule = if preset == "public_chat" { "public" } else { "invite" };
    let mut preset_state = vec![
        NewEvent::state("m.room.join_rules", "", json!({ "join_rule": join_rule })),
        NewEvent::state("m.room.history_visibility", "", json!({ "history_visibility": "shared" })),
    ];
    if preset != "public_chat" {
        preset_state.push(NewEvent::state("m.room.guest_access", "", json!({ "guest_access": "can_join" })));
    }
    // initial_state wins over the preset for the same (type, state_key).
    for s in &req.initial_state {
        if s.kind == "m.room.create" || s.kind == "m.room.member" || s.kind == "m.room.power_levels" {
            return Err(Error::bad_json(format!("initial_state cannot contain {}", s.kind)));
        }
    }
    preset_state
        .retain(|p| !req.initial_state.iter().any(|s| s.kind == p.kind && Some(&s.state_key) == p.state_key.as_ref()));
    events.extend(preset_state);
    events.extend(req.initial_state.iter().map(|s| NewEvent::state(&s.kind, &s.state_key, s.content.clone())));
    if let Some(name) = &req.name {
        events.push(NewEvent::state("m.room.name", "", json!({ "name": name })));
    }
    if let Some(topic) = &req.topic {
        events.push(NewEvent::state(
            "m.room.topic",
            "",
            json!({ "topic": topic, "m.topic": [{ "body": topic, "mimetype": "text/plain" }] }),
        ));
    }
    for u in &req.invite {
        let p = storage::profiles::get(&mut *tx, u).await?.unwrap_or_default();
        events.push(NewEvent::state("m.room.member", u, member_content("invite", &p, req.is_direct)));
    }
    let mut head = Head::new(create_nid, create_id.to_string(), 1, create_stream, Some(group));
    let mut appended = Vec::with_capacity(events.len());
    for ev in events {
        appended.push(append(state, &mut tx, &room, &mut head, creator, ev, None).await?);
    }
    if let Some(a) = &alias {
        storage::rooms::insert_alias(&mut *tx, a, room_nid, creator).await?;
    }
    if public {
        storage::rooms::set_public(&mut *tx, room_nid, true).await?;
    }
    let push_jobs = crate::push::eval::record_batch(state, &mut tx, &room, &appended).await?;
    tx.commit().await?;
    committed(state, &room, writer, &appended);
    crate::push::gateway::dispatch(state, push_jobs);
    tracing::info!(room_id = %room_id, version, preset, "room created");
    Ok(Created { room_id: room_id.to_string(), alias })
}

/// The create event's timestamp, strictly increasing within this process: from room version 12 the
/// room ID is the create event's hash, so two rooms created by the same user with the same
/// options in the same millisecond would otherwise get the same ID.
fn create_ts() -> i64 {
    static LAST: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);
    let now = now_ms();
    let prev = LAST
        .fetch_update(std::sync::atomic::Ordering::SeqCst, std::sync::atomic::Ordering::SeqCst, |last| {
            Some(now.max(last + 1))
        })
        .unwrap_or(now);
    now.max(prev + 1)
}

/// Member event content carrying the user's current profile.
pub fn member_content(membership: &str, profile: &Map<String, Value>, is_direct: bool) -> Value {
    let mut c = json!({ "membership": membership });
    for key in ["displayname", "avatar_url"] {
        if let Some(v) = profile.get(key) {
            c[key] = v.clone();
        }
    }
    if is_direct {
        c["is_direct"] = json!(true);
    }
    c
}
