//! Joining and leaving rooms across servers
//! (<https://spec.matrix.org/latest/server-server-api/#joining-rooms>):
//!
//! - as the resident server: `make_join`/`send_join` (v2) and `make_leave`/`send_leave` (v2),
//!   the event going through the room engine's remote pipeline (`rooms::remote`) and then to the
//!   room's other servers;
//! - as the joining server: [`join_remote`] asks a resident server for a template, signs the
//!   event, sends it, checks every event of the room state it gets back, stores that state and
//!   appends the join on top of it.

use axum::http::Method;
use ruma::{OwnedServerName, RoomId, ServerName, UserId};
use serde_json::{Value, json};

use super::client::FedError;
use super::pdu;
use crate::error::{ApiResult, Error};
use crate::rooms::remote::{self as engine, Forward, Incoming};
use crate::rooms::{self, Room};
use crate::state::AppState;
use crate::storage;

/// Largest `send_join` answer read (a room's whole state and auth chain).
const MAX_SEND_JOIN_BYTES: usize = 64 * 1024 * 1024;

fn incompatible(version: &str) -> Error {
    Error::new(
        axum::http::StatusCode::BAD_REQUEST,
        "M_INCOMPATIBLE_ROOM_VERSION",
        format!("Your server does not support room version {version}"),
    )
    .with("room_version", json!(version))
}

/// The room, which this server must be in, for a request of `origin` about `user`.
async fn resident_room(
    state: &AppState,
    origin: &ServerName,
    room_id: &str,
    user: &str,
) -> ApiResult<(Room, Vec<String>)> {
    let uid = <&UserId>::try_from(user).map_err(|_| Error::invalid_param("Invalid user ID"))?;
    if uid.server_name() != origin {
        return Err(Error::forbidden("The user is not from the requesting server"));
    }
    let room = Room::load(state, room_id).await?;
    let servers = storage::remote::joined_servers(&state.db, room.nid, "").await?;
    if !servers.iter().any(|s| s == &state.config.server_name) {
        return Err(Error::not_found("This server is not in the room"));
    }
    crate::federation::acl::check(state, &room, origin).await?;
    Ok((room, servers))
}

/// `make_join` / `make_leave`: a membership event template for `user`.
pub async fn make_membership(
    state: &AppState,
    origin: &ServerName,
    room_id: &str,
    user: &str,
    membership: &str,
    versions: &[String],
) -> ApiResult<Value> {
    let (room, _) = resident_room(state, origin, room_id, user).await?;
    let version = room.version.as_str();
    if matches!(membership, "join" | "knock") && !versions.iter().any(|v| v == version) {
        return Err(incompatible(version));
    }
    let mut content = json!({ "membership": membership });
    if membership == "join" {
        // Restricted rooms: a local member with the power to invite vouches for a user who is in
        // one of the allowed rooms (as far as this server knows), unless already invited.
        let rules = rooms::current_content(state, &room, "m.room.join_rules", "").await?.unwrap_or(Value::Null);
        let current = storage::rooms::membership(&state.db, room.nid, user).await?.map(|m| m.0);
        if matches!(rules["join_rule"].as_str(), Some("restricted" | "knock_restricted"))
            && !matches!(current.as_deref(), Some("invite" | "join"))
        {
            match rooms::client::restricted_join_authoriser(state, &room, user, &rules).await? {
                Some(authoriser) => content["join_authorised_via_users_server"] = json!(authoriser),
                None => {
                    return Err(Error::new(
                        axum::http::StatusCode::BAD_REQUEST,
                        "M_UNABLE_TO_AUTHORISE_JOIN",
                        "The user is not in any room this room allows joining from, as far as this server knows",
                    ));
                }
            }
        }
    }
    let event = engine::template(state, &room, user, content).await?;
    Ok(json!({ "room_version": version, "event": event }))
}

/// `send_join` (v2) / `send_leave` (v2): the signed membership event of a user of `origin`.
/// Returns the join's answer (the state before the event and its auth chain) or `{}`.
pub async fn send_membership(
    state: &AppState,
    origin: &ServerName,
    room_id: &str,
    event_id: &str,
    membership: &str,
    body: &Value,
) -> ApiResult<Value> {
    let user = body.get("state_key").and_then(Value::as_str).unwrap_or_default();
    let (room, _) = resident_room(state, origin, room_id, user).await?;
    // A restricted join one of our users vouches for needs our signature too.
    let authoriser = body["content"]["join_authorised_via_users_server"].as_str();
    let vouched =
        membership == "join" && authoriser.is_some_and(|a| crate::users::is_local(a, &state.config.server_name));
    let mut body = body.clone();
    if vouched {
        let mut obj = pdu::canonical(&body).map_err(|e| Error::bad_json(e.to_string()))?;
        ruma::signatures::sign_event(&state.config.server_name, &state.event_signer, &mut obj, &room.rules.redaction)
            .map_err(|e| Error::bad_json(e.to_string()))?;
        body = serde_json::to_value(&obj).map_err(|e| Error::from(anyhow::anyhow!(e)))?;
    }
    let body = &body;
    let checked =
        pdu::check(state, &room.rules, Some(room_id), body).await.map_err(|e| Error::bad_json(e.to_string()))?;
    if checked.event_id.as_str() != event_id {
        return Err(Error::bad_json("The event ID does not match the event"));
    }
    let p = &checked.pdu;
    let content: Value = serde_json::from_str(p.content.get()).unwrap_or(Value::Null);
    if p.kind.to_string() != "m.room.member"
        || p.state_key.as_deref() != Some(p.sender.as_str())
        || content["membership"] != membership
    {
        return Err(Error::bad_json(format!("Not a {membership} event of its sender")));
    }
    let outcomes =
        engine::accept(state, &room, vec![Incoming::from(checked.clone())], Forward::ExceptOrigin(origin)).await?;
    if let Some((_, Err(reason))) = outcomes.first() {
        return Err(Error::forbidden(format!("The event was rejected: {reason}")));
    }
    if membership == "knock" {
        return Ok(json!({ "knock_room_state": stripped_state(state, &room).await? }));
    }
    if membership != "join" {
        return Ok(json!({}));
    }
    let row = storage::events::by_id(&state.db, event_id).await?.ok_or_else(Error::internal)?;
    let (pdus, auth_chain) = state_and_auth_chain(state, row.state_before, &[row.event_nid]).await?;
    let (pdus, auth_chain): (Vec<Value>, Vec<Value>) =
        (pdus.into_iter().map(|p| p.1).collect(), auth_chain.into_iter().map(|p| p.1).collect());
    let servers = storage::remote::joined_servers(&state.db, room.nid, "").await?;
    let mut answer = json!({
        "origin": state.config.server_name,
        "state": pdus,
        "auth_chain": auth_chain,
        "members_omitted": false,
        "servers_in_room": servers,
    });
    if vouched {
        answer["event"] = serde_json::from_str(&checked.json).map_err(|e| Error::from(anyhow::anyhow!(e)))?;
    }
    Ok(answer)
}

/// The events of a state group and the auth chain of those events and of `also`, as
/// `(event ID, PDU)`.
pub async fn state_and_auth_chain(
    state: &AppState,
    group: Option<i64>,
    also: &[i64],
) -> ApiResult<(Vec<(String, Value)>, Vec<(String, Value)>)> {
    let Some(group) = group else { return Err(Error::not_found("No state is known at this event")) };
    let map = storage::state::load_group(&state.db, group).await?;
    let nids: Vec<i64> = map.values().copied().collect();
    let mut chain_of = nids.clone();
    chain_of.extend_from_slice(also);
    let chain = storage::remote::auth_chain(&state.db, &chain_of).await?;
    let parse = |rows: Vec<(String, String)>| -> Vec<(String, Value)> {
        rows.into_iter().filter_map(|(id, j)| Some((id, serde_json::from_str(&j).ok()?))).collect()
    };
    Ok((
        parse(storage::remote::json_of_nids(&state.db, &nids).await?),
        parse(storage::remote::json_of_nids(&state.db, &chain).await?),
    ))
}

fn fed_error(server: &ServerName, e: FedError) -> Error {
    match e {
        FedError::Status { status, body } if (400..500).contains(&status) => {
            let errcode = known_errcode(body["errcode"].as_str().unwrap_or("M_FORBIDDEN"));
            let msg = body["error"].as_str().unwrap_or("refused").to_owned();
            let status = axum::http::StatusCode::from_u16(status).unwrap_or(axum::http::StatusCode::FORBIDDEN);
            Error::new(status, errcode, format!("{server}: {msg}"))
        }
        e => Error::new(axum::http::StatusCode::BAD_GATEWAY, "M_UNKNOWN", format!("{server}: {e}")),
    }
}

/// A remote server's `errcode`, if it is one of those passed on to clients; `M_UNKNOWN`
/// otherwise.
fn known_errcode(code: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        "M_FORBIDDEN",
        "M_NOT_FOUND",
        "M_INCOMPATIBLE_ROOM_VERSION",
        "M_UNABLE_TO_AUTHORISE_JOIN",
        "M_UNABLE_TO_GRANT_JOIN",
        "M_BAD_JSON",
        "M_INVALID_PARAM",
        "M_LIMIT_EXCEEDED",
        "M_UNSUPPORTED_ROOM_VERSION",
    ];
    KNOWN.iter().find(|k| **k == code).copied().unwrap_or("M_UNKNOWN")
}

/// Joins `user` (local) to a room this server is not in, through the first of `servers` that
/// lets it. `content` is the member event's content (membership, profile, reason).
pub async fn join_remote(
    state: &AppState,
    room_id: &RoomId,
    user: &str,
    servers: &[OwnedServerName],
    content: Value,
) -> ApiResult<Room> {
    if !state.federation.enabled {
        return Err(Error::not_found("Unknown room (federation is disabled)"));
    }
    let mut last = Error::not_found("No server to join the room through");
    for server in servers.iter().filter(|s| s.as_str() != state.config.server_name) {
        match join_through(state, room_id, user, server, content.clone()).await {
            Ok(room) => return Ok(room),
            Err(e) => {
                tracing::info!(%room_id, %server, error = %e.message, "joining through this server failed");
                last = e;
            }
        }
    }
    Err(last)
}

/// A membership event made on another server (`make_join`/`make_leave`/`make_knock`), filled in
/// and signed here, ready for the matching `send_*`.
struct Made {
    version: String,
    rules: ruma::room_version_rules::RoomVersionRules,
    event_id: ruma::OwnedEventId,
    json: String,
    signed: Value,
}

fn bad_gateway(server: &ServerName, what: impl std::fmt::Display) -> Error {
    Error::new(axum::http::StatusCode::BAD_GATEWAY, "M_UNKNOWN", format!("{server}: {what}"))
}

/// Asks `server` for a `membership` event template of `user` in `room_id`, checks that it is
/// one, puts `content` in it (keeping a restricted join's authoriser, which the resident
/// chooses), and signs it.
async fn make_and_sign(
    state: &AppState,
    server: &ServerName,
    room_id: &RoomId,
    user: &str,
    membership: &str,
    mut content: Value,
) -> ApiResult<Made> {
    let mut path = format!(
        "/_matrix/federation/v1/make_{membership}/{}/{}",
        crate::appservice::client::enc(room_id.as_str()),
        crate::appservice::client::enc(user)
    );
    if membership != "leave" {
        let versions: Vec<String> = rooms::SUPPORTED_VERSIONS.iter().map(|v| format!("ver={v}")).collect();
        path = format!("{path}?{}", versions.join("&"));
    }
    let made = state
        .federation
        .request(Method::GET, server, &path, None, true, 1024 * 1024)
        .await
        .map_err(|e| fed_error(server, e))?;
    let version = made["room_version"].as_str().unwrap_or("1").to_owned();
    let (_, rules) = rooms::rules_for(&version)?;
    let mut event = made["event"].clone();
    if !event.is_object()
        || event["room_id"] != room_id.as_str()
        || event["sender"] != user
        || event["state_key"] != user
        || event["type"] != "m.room.member"
    {
        return Err(bad_gateway(server, format!("invalid {membership} template")));
    }
    if let Some(a) = event["content"].get("join_authorised_via_users_server") {
        content["join_authorised_via_users_server"] = a.clone();
    }
    event["content"] = content;
    event["origin_server_ts"] = json!(storage::now_ms());
    event["origin"] = json!(state.config.server_name);
    if let Some(o) = event.as_object_mut() {
        for k in ["signatures", "hashes", "unsigned", "event_id"] {
            o.remove(k);
        }
    }
    let (event_id, json) = rooms::sign(state, event, &rules)?;
    let signed: Value = serde_json::from_str(&json).map_err(|e| Error::from(anyhow::anyhow!(e)))?;
    Ok(Made { version, rules, event_id, json, signed })
}

/// Sends a made event (`send_join` and `send_leave` are v2, `send_knock` v1); returns the answer.
async fn send_made(
    state: &AppState,
    server: &ServerName,
    room_id: &RoomId,
    membership: &str,
    made: &Made,
    max: usize,
) -> ApiResult<Value> {
    let v = if membership == "knock" { "v1" } else { "v2" };
    let path = format!(
        "/_matrix/federation/{v}/send_{membership}/{}/{}",
        crate::appservice::client::enc(room_id.as_str()),
        crate::appservice::client::enc(made.event_id.as_str())
    );
    state
        .federation
        .request(Method::PUT, server, &path, Some(&made.signed), true, max)
        .await
        .map_err(|e| fed_error(server, e))
}

/// Records a local user's membership event in a room this server is not in (an invite received,
/// a knock or a rejection sent), with the stripped state the other server gave: the room is
/// created if unknown, the event stored with a stream position, and the user's sync woken.
async fn record_outside(
    state: &AppState,
    room_id: &str,
    version: &str,
    creator: &str,
    event: &pdu::Checked,
    json: &str,
    stripped: &Value,
) -> ApiResult<()> {
    let mut tx = state.db.begin().await?;
    let room_nid = storage::remote::ensure_room(&mut tx, room_id, version, creator).await?;
    let room = match Room::load(state, room_id).await {
        Ok(room) => room,
        // Created by this transaction: not visible to `Room::load` yet.
        Err(_) => Room::from_row(&storage::rooms::RoomRow {
            room_nid,
            room_id: room_id.to_owned(),
            room_version: version.to_owned(),
            creator: creator.to_owned(),
            is_public: false,
            current_state_group: None,
        })?,
    };
    let writer = state.sync.begin_write(&state.event_stream);
    rooms::lock_room(&mut tx, room_nid).await?;
    let appended = engine::store_invite(&mut tx, &room, event, json, stripped).await?;
    tx.commit().await?;
    state.sync.invalidate_room(room_nid);
    crate::cluster::room_invalidated(state, room_nid);
    rooms::committed(state, &room, writer, &appended);
    Ok(())
}

/// The creator named by a stripped state's `m.room.create`, else `fallback`.
fn stripped_creator(stripped: &[Value], fallback: &str) -> String {
    stripped
        .iter()
        .find(|e| e["type"] == "m.room.create")
        .and_then(|e| e["sender"].as_str())
        .unwrap_or(fallback)
        .to_owned()
}

async fn join_through(
    state: &AppState,
    room_id: &RoomId,
    user: &str,
    server: &ServerName,
    content: Value,
) -> ApiResult<Room> {
    let made = make_and_sign(state, server, room_id, user, "join", content).await?;
    let answer = send_made(state, server, room_id, "join", &made, MAX_SEND_JOIN_BYTES).await?;
    let Made { version, rules, event_id, signed, .. } = made;
    // The join as the resident returned it (restricted joins: with its signature added).
    let join_value = match answer.get("event") {
        Some(e) if e.is_object() => e.clone(),
        _ => signed,
    };
    let bad = |what: String| Error::new(axum::http::StatusCode::BAD_GATEWAY, "M_UNKNOWN", format!("{server}: {what}"));
    let join = pdu::check(state, &rules, Some(room_id.as_str()), &join_value).await.map_err(|e| bad(e.to_string()))?;
    if join.event_id != event_id {
        return Err(bad("the join event came back changed".into()));
    }
    let (state_pdus, chain_pdus) = match (answer["state"].as_array(), answer["auth_chain"].as_array()) {
        (Some(s), Some(c)) => (s, c),
        _ => return Err(bad("send_join answer without state or auth chain".into())),
    };
    // Every event checked (signatures, hashes); failures are left out.
    let mut state_events = Vec::with_capacity(state_pdus.len());
    let mut all = Vec::with_capacity(state_pdus.len() + chain_pdus.len());
    for v in chain_pdus {
        match pdu::check(state, &rules, Some(room_id.as_str()), v).await {
            Ok(c) => all.push(c),
            Err(e) => tracing::info!(%room_id, %server, error = %e, "auth chain event refused"),
        }
    }
    for v in state_pdus {
        match pdu::check(state, &rules, Some(room_id.as_str()), v).await {
            Ok(c) => {
                state_events.push(c.event_id.clone());
                all.push(c);
            }
            Err(e) => tracing::info!(%room_id, %server, error = %e, "state event refused"),
        }
    }
    let create = all
        .iter()
        .find(|c| c.pdu.kind == ruma::events::TimelineEventType::RoomCreate && c.pdu.state_key.as_deref() == Some(""))
        .ok_or_else(|| bad("no m.room.create in the room state".into()))?;
    let create_version = serde_json::from_str::<Value>(create.pdu.content.get())
        .ok()
        .and_then(|c| c["room_version"].as_str().map(str::to_owned));
    if create_version.as_deref().unwrap_or("1") != version {
        return Err(bad("the room version does not match its create event".into()));
    }
    let creator = create.pdu.sender.to_string();

    // The room and its state (outliers), then the join on top of that state.
    let mut tx = state.db.begin().await?;
    let room_nid = storage::remote::ensure_room(&mut tx, room_id.as_str(), &version, &creator).await?;
    let room = Room::from_row(&storage::rooms::RoomRow {
        room_nid,
        room_id: room_id.to_string(),
        room_version: version.clone(),
        creator: creator.clone(),
        is_public: false,
        current_state_group: None,
    })?;
    let stored = engine::store_outliers(&mut tx, &room, all.clone()).await?;
    let mut entries = Vec::new();
    for c in all.iter().filter(|c| state_events.contains(&c.event_id)) {
        if let (Some(nid), Some(key)) = (stored.get(&c.event_id), &c.pdu.state_key) {
            entries.push((*nid, c.pdu.kind.to_string(), key.clone()));
        }
    }
    let before = engine::state_map(&mut tx, &entries).await?;
    tx.commit().await?;
    let outcomes =
        engine::accept(state, &room, vec![Incoming { checked: join, state_before: Some(before) }], Forward::No).await?;
    if let Some((_, Err(reason))) = outcomes.first() {
        return Err(bad(format!("our join does not pass the room's rules: {reason}")));
    }
    state.room_cache.invalidate(room_id.as_str());
    Room::load(state, room_id.as_str()).await
}

/// The stripped state sent with an invite (`invite_room_state`) and shown to the invitee.
pub async fn stripped_state(state: &AppState, room: &Room) -> ApiResult<Vec<Value>> {
    let keys: Vec<(String, String)> = [
        "m.room.create",
        "m.room.name",
        "m.room.avatar",
        "m.room.topic",
        "m.room.join_rules",
        "m.room.canonical_alias",
        "m.room.encryption",
    ]
    .iter()
    .map(|t| ((*t).to_owned(), String::new()))
    .collect();
    let rows = storage::rooms::current_state_for(&state.db, room.nid, &keys).await?;
    Ok(rows
        .iter()
        .filter_map(|r| serde_json::from_str::<Value>(&r.json).ok())
        .map(|v| json!({ "type": v["type"], "state_key": v["state_key"], "sender": v["sender"], "content": v["content"] }))
        .collect())
}

/// A local user invites a user of another server: the invite event is built at the room's head,
/// signed, sent to the invitee's server (`invite` v2), which signs it too, and only then
/// appended, and sent to the room's other servers.
pub async fn invite_remote(state: &AppState, room: &Room, sender: &str, target: &str, content: Value) -> ApiResult<()> {
    let target_id = <&UserId>::try_from(target).map_err(|_| Error::invalid_param("Invalid user_id"))?;
    let server = target_id.server_name().to_owned();
    if !state.federation.enabled || !state.federation.is_allowed(&server) {
        return Err(Error::forbidden(format!("This server does not federate with {server}")));
    }
    crate::federation::acl::check(state, room, &server).await?;
    let event = engine::member_event(state, room, sender, target, content).await?;
    let (event_id, json_text) = rooms::sign(state, event, &room.rules)?;
    let signed: Value = serde_json::from_str(&json_text).map_err(|e| Error::from(anyhow::anyhow!(e)))?;
    let body = json!({
        "event": signed,
        "room_version": room.version.as_str(),
        "invite_room_state": stripped_state(state, room).await?,
    });
    let path = format!(
        "/_matrix/federation/v2/invite/{}/{}",
        crate::appservice::client::enc(room.room_id.as_str()),
        crate::appservice::client::enc(event_id.as_str())
    );
    let answer = state
        .federation
        .request(Method::PUT, &server, &path, Some(&body), true, 1024 * 1024)
        .await
        .map_err(|e| fed_error(&server, e))?;
    let bad = |what: &str| Error::new(axum::http::StatusCode::BAD_GATEWAY, "M_UNKNOWN", format!("{server}: {what}"));
    let returned = answer.get("event").ok_or_else(|| bad("no event in the invite answer"))?;
    let checked =
        pdu::check(state, &room.rules, Some(room.room_id.as_str()), returned).await.map_err(|e| bad(&e.to_string()))?;
    if checked.event_id != event_id {
        return Err(bad("the invite came back changed"));
    }
    // The invitee's server must have signed it.
    let signed_by_invitee =
        returned["signatures"].get(server.as_str()).and_then(Value::as_object).is_some_and(|m| !m.is_empty());
    if !signed_by_invitee {
        return Err(bad("the invite came back without the invitee server's signature"));
    }
    let outcomes = engine::accept(state, room, vec![Incoming::from(checked)], Forward::ExceptOrigin(&server)).await?;
    if let Some((_, Err(reason))) = outcomes.first() {
        return Err(Error::forbidden(format!("The invite was rejected: {reason}")));
    }
    Ok(())
}

/// `PUT /_matrix/federation/v2/invite/{roomId}/{eventId}`: a user of `origin` invites a local
/// user. The event is checked, signed by this server and returned; when this server is not in
/// the room, the invite is stored (with the stripped state the inviting server sent) so that
/// the invitee sees it.
pub async fn receive_invite(
    state: &AppState,
    origin: &ServerName,
    room_id: &str,
    event_id: &str,
    body: &Value,
) -> ApiResult<Value> {
    let version = body.get("room_version").and_then(Value::as_str).unwrap_or("1");
    let (_, rules) = rooms::rules_for(version).map_err(|_| incompatible(version))?;
    let event = body.get("event").ok_or_else(|| Error::bad_json("Missing event"))?;
    let checked = pdu::check(state, &rules, Some(room_id), event).await.map_err(|e| Error::bad_json(e.to_string()))?;
    if checked.event_id.as_str() != event_id {
        return Err(Error::bad_json("The event ID does not match the event"));
    }
    let p = &checked.pdu;
    let content: Value = serde_json::from_str(p.content.get()).unwrap_or(Value::Null);
    if p.kind.to_string() != "m.room.member" || content["membership"] != "invite" {
        return Err(Error::bad_json("Not an invite"));
    }
    if p.sender.server_name() != origin {
        return Err(Error::forbidden("The inviter is not from the requesting server"));
    }
    let invitee = p.state_key.clone().unwrap_or_default();
    let uid = <&UserId>::try_from(invitee.as_str()).map_err(|_| Error::bad_json("Invalid state_key"))?;
    if uid.server_name().as_str() != state.config.server_name {
        return Err(Error::bad_json("The invitee is not a user of this server"));
    }
    let user = storage::users::get(&state.db, &invitee).await?;
    if user.as_ref().is_none_or(|u| u.deactivated) {
        return Err(Error::not_found("Unknown user"));
    }
    // Our signature on the event.
    let mut obj =
        pdu::canonical(&serde_json::from_str::<Value>(&checked.json).map_err(|e| Error::from(anyhow::anyhow!(e)))?)
            .map_err(|e| Error::bad_json(e.to_string()))?;
    ruma::signatures::sign_event(&state.config.server_name, &state.event_signer, &mut obj, &rules.redaction)
        .map_err(|e| Error::from(anyhow::anyhow!(e)))?;
    let signed_json = serde_json::to_string(&obj).map_err(|e| Error::from(anyhow::anyhow!(e)))?;
    let signed: Value = serde_json::from_str(&signed_json).map_err(|e| Error::from(anyhow::anyhow!(e)))?;

    let in_room = match Room::load(state, room_id).await {
        Ok(room) => storage::remote::joined_servers(&state.db, room.nid, "")
            .await?
            .iter()
            .any(|s| s == &state.config.server_name),
        Err(_) => false,
    };
    if !in_room {
        // Kept for the invitee: the event (with a stream position, so that their sync sees it)
        // and the stripped state, the only state this server has of the room.
        let stripped: Vec<Value> = body
            .get("invite_room_state")
            .and_then(Value::as_array)
            .map(|a| a.iter().take(50).cloned().collect())
            .unwrap_or_default();
        let creator = stripped_creator(&stripped, p.sender.as_str());
        record_outside(state, room_id, version, &creator, &checked, &signed_json, &json!(stripped)).await?;
    }
    Ok(json!({ "event": signed }))
}

/// A local user leaves a room this server is not in (rejects an invite from another server):
/// `make_leave`/`send_leave` through `server`, then the leave is recorded locally.
pub async fn leave_remote(
    state: &AppState,
    room: &Room,
    user: &str,
    server: &ServerName,
    reason: Option<String>,
) -> ApiResult<()> {
    let room_id = room.room_id.as_ref();
    let mut content = json!({ "membership": "leave" });
    if let Some(r) = reason {
        content["reason"] = json!(r);
    }
    let made = make_and_sign(state, server, room_id, user, "leave", content).await?;
    send_made(state, server, room_id, "leave", &made, 1024 * 1024).await?;
    let checked = pdu::check(state, &made.rules, Some(room_id.as_str()), &made.signed)
        .await
        .map_err(|e| Error::from(anyhow::anyhow!("our own leave: {e}")))?;
    record_outside(state, room_id.as_str(), &made.version, user, &checked, &made.json, &Value::Null).await
}

/// Whether this server has a joined member in a room.
pub async fn server_in_room(state: &AppState, room: &Room) -> ApiResult<bool> {
    let servers = storage::remote::joined_servers(&state.db, room.nid, "").await?;
    Ok(servers.iter().any(|s| s == &state.config.server_name))
}

/// The servers to join a room through, for a room ID: the `via` (or legacy `server_name`)
/// parameters, the server of the room ID (before v12), and the server of whoever invited the
/// user (an invite from another server).
pub async fn join_servers(
    state: &AppState,
    room_id: &RoomId,
    via: Vec<String>,
    user: &str,
) -> ApiResult<Vec<OwnedServerName>> {
    let mut out: Vec<OwnedServerName> = Vec::new();
    if let Some(room) = storage::rooms::by_id(&state.db, room_id.as_str()).await?
        && let Some((m, event_nid, _)) = storage::rooms::membership(&state.db, room.room_nid, user).await?
        && m == "invite"
        && let Some(ev) = storage::events::by_nids(&state.db, &[event_nid]).await?.first()
        && let Ok(inviter) = <&UserId>::try_from(ev.sender.as_str())
    {
        out.push(inviter.server_name().to_owned());
    }
    for v in via.iter().take(20) {
        if let Ok(s) = ServerName::parse(v) {
            out.push(s);
        }
    }
    if let Some(s) = room_id.server_name() {
        out.push(s.to_owned());
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|s| seen.insert(s.clone()) && s.as_str() != state.config.server_name);
    Ok(out)
}

/// Resolves an alias of another server (`query/directory`): the room ID and servers to join
/// through.
pub async fn resolve_remote_alias(
    state: &AppState,
    alias: &ruma::RoomAliasId,
) -> ApiResult<(ruma::OwnedRoomId, Vec<String>)> {
    let server = alias.server_name();
    let path =
        format!("/_matrix/federation/v1/query/directory?room_alias={}", crate::appservice::client::enc(alias.as_str()));
    let answer =
        state.federation.request(Method::GET, server, &path, None, true, 64 * 1024).await.map_err(|e| match e {
            FedError::Status { status: 404, .. } => Error::not_found("Room alias not found"),
            e => fed_error(server, e),
        })?;
    let room_id = answer["room_id"].as_str().and_then(|r| ruma::OwnedRoomId::try_from(r).ok()).ok_or_else(|| {
        Error::new(axum::http::StatusCode::BAD_GATEWAY, "M_UNKNOWN", format!("{server}: invalid directory answer"))
    })?;
    let mut servers: Vec<String> = answer["servers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .take(20)
        .map(str::to_owned)
        .collect();
    servers.insert(0, server.to_string());
    Ok((room_id, servers))
}

/// A local user knocks on a room this server is not in: `make_knock`/`send_knock` through the
/// first of `servers` that answers; the knock is recorded locally with the stripped state the
/// resident server returned (the user's sync shows it under `knock`).
pub async fn knock_remote(
    state: &AppState,
    room_id: &RoomId,
    user: &str,
    servers: &[OwnedServerName],
    reason: Option<String>,
) -> ApiResult<()> {
    let mut last = Error::not_found("No server to knock through");
    for server in servers.iter().filter(|s| s.as_str() != state.config.server_name) {
        match knock_through(state, room_id, user, server, reason.clone()).await {
            Ok(()) => return Ok(()),
            Err(e) => last = e,
        }
    }
    Err(last)
}

async fn knock_through(
    state: &AppState,
    room_id: &RoomId,
    user: &str,
    server: &ServerName,
    reason: Option<String>,
) -> ApiResult<()> {
    let mut content = json!({ "membership": "knock" });
    if let Some(r) = reason {
        content["reason"] = json!(r);
    }
    let made = make_and_sign(state, server, room_id, user, "knock", content).await?;
    let answer = send_made(state, server, room_id, "knock", &made, 1024 * 1024).await?;
    let stripped: Vec<Value> =
        answer["knock_room_state"].as_array().map(|a| a.iter().take(50).cloned().collect()).unwrap_or_default();
    let checked = pdu::check(state, &made.rules, Some(room_id.as_str()), &made.signed)
        .await
        .map_err(|e| Error::from(anyhow::anyhow!("our own knock: {e}")))?;
    let creator = stripped_creator(&stripped, user);
    record_outside(state, room_id.as_str(), &made.version, &creator, &checked, &made.json, &json!(stripped)).await
}

/// A user of another server's profile (`query/profile`), bounded, non-string fields kept as they
/// came. 404 `M_NOT_FOUND` when that server has none; 502 when it cannot be asked.
pub async fn remote_profile(state: &AppState, user: &UserId) -> ApiResult<serde_json::Map<String, Value>> {
    let server = user.server_name();
    if !state.federation.enabled {
        return Err(Error::not_found("Profile not found (federation is disabled)"));
    }
    let path =
        format!("/_matrix/federation/v1/query/profile?user_id={}", crate::appservice::client::enc(user.as_str()));
    match state.federation.request(Method::GET, server, &path, None, true, 64 * 1024).await {
        Ok(Value::Object(o)) => Ok(o),
        Ok(_) => {
            Err(Error::new(axum::http::StatusCode::BAD_GATEWAY, "M_UNKNOWN", format!("{server}: invalid profile")))
        }
        Err(FedError::Status { status: 404, .. }) => Err(Error::not_found("Profile not found")),
        Err(e) => Err(fed_error(server, e)),
    }
}

/// Another server's public room directory (`publicRooms` over federation), its answer passed on.
pub async fn remote_public_rooms(
    state: &AppState,
    server: &ServerName,
    limit: Option<i64>,
    since: Option<&str>,
    filter: serde_json::Map<String, Value>,
) -> ApiResult<Value> {
    if !state.federation.enabled {
        return Err(Error::not_found("Other servers' directories need federation, which is disabled"));
    }
    let mut body = json!({ "filter": filter });
    if let Some(l) = limit {
        body["limit"] = json!(l.clamp(1, 500));
    }
    if let Some(s) = since {
        body["since"] = json!(s);
    }
    let answer = state
        .federation
        .request(Method::POST, server, "/_matrix/federation/v1/publicRooms", Some(&body), true, 4 * 1024 * 1024)
        .await
        .map_err(|e| fed_error(server, e))?;
    if !answer["chunk"].is_array() {
        return Err(Error::new(
            axum::http::StatusCode::BAD_GATEWAY,
            "M_UNKNOWN",
            format!("{server}: invalid directory"),
        ));
    }
    Ok(answer)
}
