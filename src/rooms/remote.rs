//! Events from other servers enter a room here, through the same storage as local ones
//! (<https://spec.matrix.org/latest/server-server-api/#checks-performed-on-receipt-of-a-pdu>).
//!
//! A PDU arrives checked by `federation::pdu` (format, signatures, hash). Here, under the room
//! lock, it must pass the authorization rules against its own auth events (step 4) and against
//! the state before it (step 5): the state after its `prev_events`, resolved when there are
//! several (or, when its predecessors could not be had, the state the sending server says is
//! before it). A PDU that fails is rejected: not stored, no effect on the room. A PDU that
//! passes is stored with a stream position, takes its predecessors' place among the room's
//! forward extremities, and the room's current state becomes the resolved state of its forward
//! extremities ([`resolve`](super::resolve)). Several extremities are a fork, which the room's
//! next local event joins (`Head::load`).
//!
//! Not done yet: soft failure (step 6, an event that passes against the state before it but
//! not against the current state is still accepted) and the storage of rejected events.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use ruma::events::StateEventType;
use ruma::{EventId, OwnedEventId, ServerName};
use serde_json::Value;
use sqlx::PgConnection;

use super::pdu::Pdu;
use super::resolve::{self, NidState};
use super::{Appended, Room};
use crate::error::{ApiResult, Error};
use crate::federation::pdu::Checked;
use crate::state::AppState;
use crate::storage;

/// A checked PDU on its way into a room.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub checked: Checked,
    /// The state before the event as the sending server gave it (`/state_ids`), used when some
    /// of its `prev_events` could not be had (nids of stored events).
    pub state_before: Option<NidState>,
}

impl From<Checked> for Incoming {
    fn from(checked: Checked) -> Self {
        Self { checked, state_before: None }
    }
}

/// Who else gets the accepted events.
#[derive(Debug, Clone, Copy)]
pub enum Forward<'a> {
    /// Nobody: the origin sent them to every server in the room (`/send`).
    No,
    /// Every other server in the room but the origin: this server is the resident server of a
    /// join, leave or knock (`send_join`, ...), which the origin sent only here.
    ExceptOrigin(&'a ServerName),
}

/// The outcome of each event.
pub type Outcomes = Vec<(OwnedEventId, Result<(), String>)>;

fn internal(e: impl std::fmt::Display) -> Error {
    Error::from(anyhow::anyhow!("{e}"))
}

/// Resolved groups by (room, input groups): groups never change, so neither does the result.
static RESOLVED: LazyLock<moka::sync::Cache<(i64, Vec<i64>), i64>> = LazyLock::new(|| moka::sync::Cache::new(10_000));

/// Accepts remote PDUs of one room (sorted here by depth). Events already stored count as
/// accepted. Rejections are per event; an `Err` is a failure of the whole batch (nothing
/// stored).
pub async fn accept(
    state: &AppState,
    room: &Room,
    mut pdus: Vec<Incoming>,
    forward: Forward<'_>,
) -> ApiResult<Outcomes> {
    pdus.sort_by_key(|p| p.checked.pdu.depth);
    // Local sends of this process queue behind us; the head they cached is stale after this.
    let queue = state.room_locks.get(room.nid);
    let mut head = queue.writer.clone().lock_owned().await;
    *head = None;
    let writer = state.sync.begin_write(&state.event_stream);
    let mut tx = state.db.begin().await?;
    let lock = super::lock_room(&mut tx, room.nid).await?;
    let before_stream = match lock.extremities.is_empty() {
        true => 0,
        false => storage::events::extremities(&mut tx, room.nid).await?.iter().map(|e| e.4).max().unwrap_or(0),
    };
    let mut outcomes = Outcomes::new();
    let mut appended: Vec<Appended> = Vec::new();
    let mut forked = lock.extremities.len() > 1;
    // The current state changes only after the batch (`update_current_state`).
    let current_group = storage::rooms::by_nid(&mut *tx, room.nid).await?.and_then(|r| r.current_state_group);
    for p in pdus {
        let id = p.checked.event_id.clone();
        match accept_one(state, &mut tx, room, current_group, p, &mut appended).await {
            Ok(linear) => {
                forked |= !linear;
                outcomes.push((id, Ok(())));
            }
            Err(Failure::Reject(reason)) => {
                tracing::info!(room_id = %room.room_id, event_id = %id, reason, "remote event rejected");
                outcomes.push((id, Err(reason)));
            }
            // Dropping the transaction rolls the batch back.
            Err(Failure::Fatal(e)) => return Err(e),
        }
    }
    if appended.is_empty() {
        tx.rollback().await?;
        return Ok(outcomes);
    }
    let state_changed = appended.iter().any(|a| a.row.state_key.is_some());
    if forked || state_changed {
        forked |= update_current_state(&mut tx, room).await?;
    }
    if let Forward::ExceptOrigin(origin) = forward {
        let mut servers = storage::remote::joined_servers(&mut *tx, room.nid, &state.config.server_name).await?;
        servers.retain(|s| s != origin.as_str() && state.federation.is_allowed_name(s));
        if !servers.is_empty() {
            for a in &mut appended {
                storage::remote::enqueue(&mut tx, &servers, a.event_nid).await?;
                a.destinations = servers.clone();
            }
        }
    }
    // Chain the batch for the sync cache: each event on top of the previous one.
    let mut prev = before_stream;
    for a in &mut appended {
        a.prev_stream = prev;
        prev = a.stream;
    }
    let jobs = crate::push::eval::record_batch(state, &mut tx, room, &appended).await?;
    tx.commit().await?;
    if forked || state_changed {
        // The sync cache follows a linear history; a fork or resolved state is read again.
        state.sync.invalidate_room(room.nid);
        crate::cluster::room_invalidated(state, room.nid);
    }
    super::committed(state, room, writer, &appended);
    crate::push::gateway::dispatch(state, jobs);
    drop(head);
    Ok(outcomes)
}

/// Why one event was not stored: the rules refused it (the batch goes on), or a server error
/// (the database may have aborted the transaction: the whole batch fails, nothing is committed).
enum Failure {
    Reject(String),
    Fatal(Error),
}

fn reject(reason: impl Into<String>) -> Failure {
    Failure::Reject(reason.into())
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Fatal(e)
    }
}

impl From<sqlx::Error> for Failure {
    fn from(e: sqlx::Error) -> Self {
        Failure::Fatal(e.into())
    }
}

/// Authorises and stores one event. `Ok(true)`: it extended the room's only extremity.
async fn accept_one(
    state: &AppState,
    conn: &mut PgConnection,
    room: &Room,
    current_group: Option<i64>,
    p: Incoming,
    appended: &mut Vec<Appended>,
) -> Result<bool, Failure> {
    let Incoming { checked, state_before: given } = p;
    let pdu = &checked.pdu;
    let event_id = checked.event_id.as_str();
    if pdu.room_id.as_ref().is_some_and(|r| *r != room.room_id) {
        return Err(reject("event of another room"));
    }
    // Ids the event refers to, and what this server has of them.
    let mut refs: Vec<String> = pdu.prev_events.iter().chain(&pdu.auth_events).map(|e| e.to_string()).collect();
    refs.push(event_id.to_owned());
    let known = storage::remote::known(&mut *conn, &refs).await?;
    if let Some(k) = known.get(event_id) {
        if k.stream_ordering.is_some() {
            return Ok(true);
        }
        // An outlier (part of a state we were given) now arrives in the timeline: not supported
        // yet; it stays an outlier.
        return Ok(true);
    }
    if known.values().any(|k| k.room_nid != room.nid) {
        return Err(reject("refers to events of another room"));
    }
    let prevs: Vec<&storage::remote::Known> = pdu
        .prev_events
        .iter()
        .filter_map(|id| known.get(id.as_str()))
        // Predecessors in the room's timeline whose state is known (not an invite or its
        // rejection recorded while this server was not in the room).
        .filter(|k| k.stream_ordering.is_some() && k.state_after.is_some())
        .collect();
    let auth_known: Vec<&storage::remote::Known> =
        pdu.auth_events.iter().filter_map(|id| known.get(id.as_str())).collect();
    if auth_known.len() != pdu.auth_events.len() {
        return Err(reject("unknown auth events"));
    }

    // The state before the event.
    let all_prevs_known = prevs.len() == pdu.prev_events.len();
    let (before, before_group): (StateBefore, Option<i64>) = if all_prevs_known && !prevs.is_empty() {
        let mut groups: Vec<i64> = prevs.iter().filter_map(|k| k.state_after).collect();
        groups.sort_unstable();
        groups.dedup();
        match groups.as_slice() {
            [g] if Some(*g) == current_group => (StateBefore::Current, Some(*g)),
            [g] => (StateBefore::Map(storage::state::load_group(&mut *conn, *g).await?), Some(*g)),
            _ => {
                let key = (room.nid, groups.clone());
                match RESOLVED.get(&key) {
                    Some(g) => (StateBefore::Map(storage::state::load_group(&mut *conn, g).await?), Some(g)),
                    None => {
                        let map = resolve::resolve_groups(&mut *conn, room, &groups).await?;
                        let entries: Vec<(i64, i64)> = map.iter().map(|(k, v)| (*k, *v)).collect();
                        let g = storage::state::create_group(&mut *conn, room.nid, None, &entries).await?;
                        RESOLVED.insert(key, g);
                        (StateBefore::Map(map), Some(g))
                    }
                }
            }
        }
    } else if let Some(map) = given {
        let entries: Vec<(i64, i64)> = map.iter().map(|(k, v)| (*k, *v)).collect();
        let g = storage::state::create_group(&mut *conn, room.nid, None, &entries).await?;
        (StateBefore::Map(map), Some(g))
    } else {
        return Err(reject("unknown prev_events"));
    };

    authorize(conn, room, pdu, &auth_known, &before).await?;

    // Stored.
    let content: Value = serde_json::from_str(pdu.content.get()).unwrap_or(Value::Null);
    let kind = pdu.kind.to_string();
    let relation = content.get("m.relates_to");
    let rel_type = relation.and_then(|r| r.get("rel_type")).and_then(Value::as_str);
    let relates_to = relation.and_then(|r| r.get("event_id")).and_then(Value::as_str);
    let search_config = crate::search::text_config(&state.config.search.language);
    let search = crate::search::searchable(&kind, &content).map(|(k, t)| (k, t, search_config.as_str()));
    let redacts = pdu.redacts.as_ref().map(|r| r.to_string());
    let sender = pdu.sender.to_string();
    let origin_server_ts = u64::from(pdu.origin_server_ts.get()) as i64;
    let prev_ids: Vec<String> = pdu.prev_events.iter().map(|e| e.to_string()).collect();
    let prev_nids: Vec<i64> = prevs.iter().map(|k| k.event_nid).collect();
    let auth_nids: Vec<i64> = auth_known.iter().map(|k| k.event_nid).collect();
    let written = storage::events::append(
        conn,
        &storage::events::NewEventRow {
            event_id,
            room_nid: room.nid,
            depth: pdu.depth,
            event_type: &kind,
            state_key: pdu.state_key.as_deref(),
            sender: &sender,
            origin_server_ts,
            json: &checked.json,
            state_before: before_group,
            state_after: if pdu.state_key.is_some() { None } else { before_group },
            redacts: redacts.as_deref(),
            rel_type,
            relates_to,
            txn: None,
            search,
        },
        None,
        &prev_ids,
        &auth_nids,
        &prev_nids,
    )
    .await?;
    let Some((event_nid, stream)) = written else {
        return Err(reject("not stored"));
    };
    let mut state_after = before_group;
    if let Some(sk) = &pdu.state_key {
        let key_nid = storage::state::intern_key(conn, &kind, sk).await?;
        let g = storage::state::create_group(conn, room.nid, before_group, &[(key_nid, event_nid)]).await?;
        storage::remote::set_state_after(conn, event_nid, g).await?;
        state_after = Some(g);
    }
    if let Some(target) = &redacts
        && may_redact(conn, room, pdu, target, &before).await?
    {
        storage::events::mark_redacted(conn, target, room.nid, event_id).await?;
    }
    let linear = all_prevs_known && prevs.len() == 1;
    appended.push(Appended {
        event_id: checked.event_id.clone(),
        event_nid,
        stream,
        prev_stream: 0,
        row: storage::events::EventRow {
            event_nid,
            event_id: event_id.to_owned(),
            room_nid: room.nid,
            stream_ordering: stream,
            depth: pdu.depth,
            event_type: kind,
            state_key: pdu.state_key.clone(),
            sender,
            origin_server_ts,
            json: checked.json.clone(),
            redacted_by: None,
            txn_device: None,
            txn_id: None,
            state_before: before_group,
            state_after,
        },
        content,
        destinations: Vec::new(),
    });
    Ok(linear)
}

/// The state before an event.
enum StateBefore {
    /// The room's current state (the `current_state` table answers).
    Current,
    Map(NidState),
}

impl StateBefore {
    /// The state events for `keys`.
    async fn events(
        &self,
        conn: &mut PgConnection,
        room: &Room,
        keys: &[(String, String)],
    ) -> ApiResult<Vec<Arc<Pdu>>> {
        let rows = match self {
            StateBefore::Current => storage::rooms::current_state_for(&mut *conn, room.nid, keys).await?,
            StateBefore::Map(map) => {
                let nids: Vec<i64> = storage::remote::key_nids(&mut *conn, keys)
                    .await?
                    .into_iter()
                    .filter_map(|(k, _, _)| map.get(&k).copied())
                    .collect();
                storage::events::by_nids(&mut *conn, &nids).await?
            }
        };
        rows.iter().map(|r| Pdu::parse(&r.event_id, &r.json).map(Arc::new).map_err(internal)).collect()
    }
}

/// Steps 4 and 5: the authorization rules against the event's auth events, then against the
/// state before it.
async fn authorize(
    conn: &mut PgConnection,
    room: &Room,
    pdu: &Pdu,
    auth_known: &[&storage::remote::Known],
    before: &StateBefore,
) -> Result<(), Failure> {
    let rules = &room.rules.authorization;
    let nids: Vec<i64> = auth_known.iter().map(|k| k.event_nid).collect();
    let auth_rows = storage::events::by_nids(&mut *conn, &nids).await?;
    let mut auth_by_id: HashMap<OwnedEventId, Arc<Pdu>> = HashMap::new();
    let mut auth_by_key: HashMap<(StateEventType, String), Arc<Pdu>> = HashMap::new();
    for r in &auth_rows {
        let p = Arc::new(Pdu::parse(&r.event_id, &r.json).map_err(internal)?);
        if let Some(k) = &p.state_key {
            auth_by_key.insert((StateEventType::from(p.kind.to_string()), k.clone()), p.clone());
        }
        auth_by_id.insert(p.event_id.clone(), p);
    }
    // v12: the create event is not among the auth events; it is the room ID's event.
    let create = before.events(conn, room, &[("m.room.create".to_owned(), String::new())]).await?;
    for c in &create {
        auth_by_id.entry(c.event_id.clone()).or_insert_with(|| c.clone());
        auth_by_key.entry((StateEventType::RoomCreate, String::new())).or_insert_with(|| c.clone());
    }
    ruma::state_res::check_state_independent_auth_rules(rules, pdu, |id: &EventId| auth_by_id.get(id).cloned())
        .map_err(|e| reject(format!("auth events: {e}")))?;
    ruma::state_res::check_state_dependent_auth_rules(rules, pdu, |t: &StateEventType, k: &str| {
        auth_by_key.get(&(t.clone(), k.to_owned())).cloned()
    })
    .map_err(|e| reject(format!("auth events: {e}")))?;

    let content = &pdu.content;
    let needed = super::auth_keys(&pdu.kind, &pdu.sender, pdu.state_key.as_deref(), content, room).map_err(reject)?;
    let events = before.events(conn, room, &needed).await?;
    let by_key: HashMap<(StateEventType, String), Arc<Pdu>> = events
        .into_iter()
        .map(|p| ((StateEventType::from(p.kind.to_string()), p.state_key.clone().unwrap_or_default()), p))
        .collect();
    ruma::state_res::check_state_dependent_auth_rules(rules, pdu, |t: &StateEventType, k: &str| {
        by_key.get(&(t.clone(), k.to_owned())).cloned()
    })
    .map_err(|e| reject(format!("state before the event: {e}")))?;
    Ok(())
}

/// Whether a redaction takes effect now: its sender may redact others' events (power level
/// `redact` in the state before it), or the target comes from the sender's own server.
async fn may_redact(
    conn: &mut PgConnection,
    room: &Room,
    pdu: &Pdu,
    target: &str,
    before: &StateBefore,
) -> ApiResult<bool> {
    if let Some(t) = storage::events::by_id(&mut *conn, target).await? {
        if t.room_nid != room.nid {
            return Ok(false);
        }
        let target_server = t.sender.split_once(':').map(|x| x.1).unwrap_or("");
        if target_server == pdu.sender.server_name().as_str() {
            return Ok(true);
        }
    }
    let pl = before.events(conn, room, &[("m.room.power_levels".to_owned(), String::new())]).await?;
    let content: Value = pl.first().and_then(|p| serde_json::from_str(p.content.get()).ok()).unwrap_or(Value::Null);
    let level =
        |c: &Value| c["users"][pdu.sender.as_str()].as_i64().or_else(|| c["users_default"].as_i64()).unwrap_or(0);
    Ok(level(&content) >= content["redact"].as_i64().unwrap_or(50))
}

/// Makes the room's current state the resolved state of its forward extremities. Returns
/// whether the room has several.
pub async fn update_current_state(conn: &mut PgConnection, room: &Room) -> ApiResult<bool> {
    let ext = storage::events::extremities(&mut *conn, room.nid).await?;
    let old_group = storage::rooms::by_nid(&mut *conn, room.nid).await?.and_then(|r| r.current_state_group);
    let mut groups: Vec<i64> = ext.iter().filter_map(|e| e.3).collect();
    groups.sort_unstable();
    groups.dedup();
    let (new_group, new_map) = match groups.as_slice() {
        [] => return Ok(false),
        [g] => (*g, None),
        _ => {
            let key = (room.nid, groups.clone());
            match RESOLVED.get(&key) {
                Some(g) => (g, None),
                None => {
                    let map = resolve::resolve_groups(&mut *conn, room, &groups).await?;
                    let entries: Vec<(i64, i64)> = map.iter().map(|(k, v)| (*k, *v)).collect();
                    let g = storage::state::create_group(&mut *conn, room.nid, None, &entries).await?;
                    RESOLVED.insert(key, g);
                    (g, Some(map))
                }
            }
        }
    };
    if Some(new_group) != old_group {
        let old = match old_group {
            Some(g) => storage::state::load_group(&mut *conn, g).await?,
            None => NidState::new(),
        };
        let new = match new_map {
            Some(m) => m,
            None => storage::state::load_group(&mut *conn, new_group).await?,
        };
        resolve::set_current_state(conn, room, &old, &new, new_group).await?;
    }
    Ok(ext.len() > 1)
}

/// A membership event template for a remote user (`make_join`, `make_leave`, `make_knock`): the
/// fields the resident server decides (`prev_events`, `auth_events`, `depth`), checked against
/// the room's current state so that a join that cannot succeed fails here (403).
pub async fn template(state: &AppState, room: &Room, user: &str, content: Value) -> ApiResult<Value> {
    member_event(state, room, user, user, content).await
}

/// An `m.room.member` event of `sender` about `target` at the room's head (unsigned), checked
/// against the room's current state.
pub async fn member_event(state: &AppState, room: &Room, user: &str, target: &str, content: Value) -> ApiResult<Value> {
    let sender = <&ruma::UserId>::try_from(user).map_err(|_| Error::invalid_param("Invalid user ID"))?;
    let mut conn = state.db.acquire().await?;
    let ext = storage::events::extremities(&mut conn, room.nid).await?;
    if ext.is_empty() {
        return Err(Error::not_found("This server is not in the room"));
    }
    let skip = ext.len().saturating_sub(20);
    let prev: Vec<&str> = ext[skip..].iter().map(|e| e.1.as_str()).collect();
    let depth = ext.iter().map(|e| e.2).max().unwrap_or(0).saturating_add(1);
    let content_raw = serde_json::value::to_raw_value(&content).map_err(|e| Error::bad_json(e.to_string()))?;
    let kind = ruma::events::TimelineEventType::RoomMember;
    let keys = super::auth_keys(&kind, sender, Some(target), &content_raw, room).map_err(Error::forbidden)?;
    let rows = storage::rooms::current_state_for(&mut *conn, room.nid, &keys).await?;
    let auth_ids: Vec<&str> = rows
        .iter()
        .filter(|r| !(r.event_type == "m.room.create" && room.rules.authorization.room_create_event_id_as_room_id))
        .map(|r| r.event_id.as_str())
        .collect();
    let value = serde_json::json!({
        "type": "m.room.member",
        "room_id": room.room_id,
        "sender": user,
        "state_key": target,
        "content": content,
        "origin": state.config.server_name,
        "origin_server_ts": storage::now_ms(),
        "depth": depth,
        "prev_events": prev,
        "auth_events": auth_ids,
    });
    // The template as the event it will become (its ID does not matter to the rules).
    let pdu = Pdu::parse("$template", &value.to_string()).map_err(internal)?;
    let mut by_id: HashMap<OwnedEventId, Arc<Pdu>> = HashMap::new();
    let mut by_key: HashMap<(StateEventType, String), Arc<Pdu>> = HashMap::new();
    for r in &rows {
        let p = Arc::new(Pdu::parse(&r.event_id, &r.json).map_err(internal)?);
        by_key
            .insert((StateEventType::from(r.event_type.as_str()), r.state_key.clone().unwrap_or_default()), p.clone());
        by_id.insert(p.event_id.clone(), p);
    }
    ruma::state_res::check_state_independent_auth_rules(&room.rules.authorization, &pdu, |id: &EventId| {
        by_id.get(id).cloned()
    })
    .map_err(|e| Error::forbidden(e.to_string()))?;
    ruma::state_res::check_state_dependent_auth_rules(
        &room.rules.authorization,
        &pdu,
        |t: &StateEventType, k: &str| by_key.get(&(t.clone(), k.to_owned())).cloned(),
    )
    .map_err(|e| Error::forbidden(e.to_string()))?;
    Ok(value)
}

/// Stores events given as a room's state or auth chain (a `send_join` answer, `/state_ids` at
/// an event) as outliers, each authorised against its auth events (step 4), auth events first.
/// Events that fail, or whose auth events are missing, are left out. Returns the stored events'
/// nids by ID.
pub async fn store_outliers(
    conn: &mut PgConnection,
    room: &Room,
    mut events: Vec<Checked>,
) -> ApiResult<HashMap<OwnedEventId, i64>> {
    events.sort_by_key(|c| c.pdu.depth);
    let mut stored: HashMap<OwnedEventId, i64> = HashMap::new();
    let mut pdus: HashMap<OwnedEventId, Arc<Pdu>> = HashMap::new();
    // Already stored ones count.
    let ids: Vec<String> = events
        .iter()
        .flat_map(|c| c.pdu.auth_events.iter().map(|e| e.to_string()))
        .chain(events.iter().map(|c| c.event_id.to_string()))
        .collect();
    let known = storage::remote::known(&mut *conn, &ids).await?;
    let known_nids: Vec<i64> = known.values().filter(|k| k.room_nid == room.nid).map(|k| k.event_nid).collect();
    for r in storage::events::by_nids(&mut *conn, &known_nids).await? {
        let p = Arc::new(Pdu::parse(&r.event_id, &r.json).map_err(internal)?);
        stored.insert(p.event_id.clone(), r.event_nid);
        pdus.insert(p.event_id.clone(), p);
    }
    // Auth events before the events they authorise: repeat passes until nothing more fits (the
    // depth order makes one pass enough for well-formed chains).
    let mut pending = events;
    loop {
        let before = pending.len();
        let mut rest = Vec::new();
        for c in pending {
            if stored.contains_key(&c.event_id) {
                continue;
            }
            if !c.pdu.auth_events.iter().all(|a| pdus.contains_key(a)) {
                rest.push(c);
                continue;
            }
            let mut by_key: HashMap<(StateEventType, String), Arc<Pdu>> = HashMap::new();
            for a in &c.pdu.auth_events {
                let p = &pdus[a];
                by_key.insert(
                    (StateEventType::from(p.kind.to_string()), p.state_key.clone().unwrap_or_default()),
                    p.clone(),
                );
            }
            if room.rules.authorization.room_create_event_id_as_room_id
                && let Some(create) = pdus.values().find(|p| p.kind == ruma::events::TimelineEventType::RoomCreate)
            {
                by_key.entry((StateEventType::RoomCreate, String::new())).or_insert_with(|| create.clone());
            }
            let independent = ruma::state_res::check_state_independent_auth_rules(
                &room.rules.authorization,
                &c.pdu,
                |id: &EventId| pdus.get(id).cloned(),
            );
            let dependent = independent.and_then(|_| {
                ruma::state_res::check_state_dependent_auth_rules(
                    &room.rules.authorization,
                    &c.pdu,
                    |t: &StateEventType, k: &str| by_key.get(&(t.clone(), k.to_owned())).cloned(),
                )
            });
            if let Err(e) = dependent {
                tracing::info!(room_id = %room.room_id, event_id = %c.event_id, error = %e, "state event rejected");
                continue;
            }
            let auth_nids: Vec<i64> = c.pdu.auth_events.iter().filter_map(|a| stored.get(a).copied()).collect();
            let kind = c.pdu.kind.to_string();
            let sender = c.pdu.sender.to_string();
            let redacts = c.pdu.redacts.as_ref().map(|r| r.to_string());
            let nid = storage::remote::insert_outlier(
                &mut *conn,
                &storage::events::NewEventRow {
                    event_id: c.event_id.as_str(),
                    room_nid: room.nid,
                    depth: c.pdu.depth,
                    event_type: &kind,
                    state_key: c.pdu.state_key.as_deref(),
                    sender: &sender,
                    origin_server_ts: u64::from(c.pdu.origin_server_ts.get()) as i64,
                    json: &c.json,
                    state_before: None,
                    state_after: None,
                    redacts: redacts.as_deref(),
                    rel_type: None,
                    relates_to: None,
                    txn: None,
                    search: None,
                },
                &auth_nids,
            )
            .await?;
            stored.insert(c.event_id.clone(), nid);
            pdus.insert(c.event_id.clone(), Arc::new(c.pdu));
        }
        if rest.is_empty() || rest.len() == before {
            for c in &rest {
                tracing::info!(room_id = %room.room_id, event_id = %c.event_id, "state event without its auth events left out");
            }
            break;
        }
        pending = rest;
    }
    Ok(stored)
}

/// A state map (for [`Incoming::state_before`]) of stored state events.
pub async fn state_map(conn: &mut PgConnection, events: &[(i64, String, String)]) -> ApiResult<NidState> {
    let names: Vec<(String, String)> = events.iter().map(|(_, t, k)| (t.clone(), k.clone())).collect();
    let keys = storage::remote::intern_keys(conn, &names).await?;
    Ok(keys.into_iter().zip(events).map(|(k, (nid, _, _))| (k, *nid)).collect())
}

/// Stores a local user's membership event in a room this server is not in (an invite from
/// another server, or the rejection of one): the event with a stream position (the user's sync
/// shows it), as the room's current state entry for the user, and for an invite the stripped
/// state the inviting server sent.
pub async fn store_invite(
    conn: &mut PgConnection,
    room: &Room,
    invite: &Checked,
    json: &str,
    stripped: &Value,
) -> ApiResult<Vec<Appended>> {
    let p = &invite.pdu;
    let invitee = p.state_key.clone().unwrap_or_default();
    if storage::remote::known(&mut *conn, &[invite.event_id.to_string()]).await?.contains_key(invite.event_id.as_str())
    {
        return Ok(Vec::new());
    }
    let sender = p.sender.to_string();
    let origin_server_ts = u64::from(p.origin_server_ts.get()) as i64;
    let written = storage::events::append(
        conn,
        &storage::events::NewEventRow {
            event_id: invite.event_id.as_str(),
            room_nid: room.nid,
            depth: p.depth,
            event_type: "m.room.member",
            state_key: Some(&invitee),
            sender: &sender,
            origin_server_ts,
            json,
            state_before: None,
            state_after: None,
            redacts: None,
            rel_type: None,
            relates_to: None,
            txn: None,
            search: None,
        },
        None,
        &[],
        &[],
        &[],
    )
    .await?
    .ok_or_else(Error::internal)?;
    let (event_nid, stream) = written;
    // Not an extremity: this server is not in the room (a join starts from the resident's).
    storage::remote::set_extremities(conn, room.nid, &[]).await?;
    let key_nid = storage::state::intern_key(conn, "m.room.member", &invitee).await?;
    storage::state::set_current(conn, room.nid, key_nid, event_nid).await?;
    let content: Value = serde_json::from_str(p.content.get()).unwrap_or(Value::Null);
    match content["membership"].as_str() {
        Some(m @ ("invite" | "knock")) => {
            storage::remote::set_invite(conn, room.nid, &invitee, m, event_nid, stream, stripped).await?
        }
        m => {
            let m = m.unwrap_or("leave").to_owned();
            storage::remote::set_memberships(conn, room.nid, &[(invitee.clone(), m, event_nid, stream)]).await?
        }
    }
    Ok(vec![Appended {
        event_id: invite.event_id.clone(),
        event_nid,
        stream,
        prev_stream: 0,
        row: storage::events::EventRow {
            event_nid,
            event_id: invite.event_id.to_string(),
            room_nid: room.nid,
            stream_ordering: stream,
            depth: p.depth,
            event_type: "m.room.member".into(),
            state_key: Some(invitee),
            sender,
            origin_server_ts,
            json: json.to_owned(),
            redacted_by: None,
            txn_device: None,
            txn_id: None,
            state_before: None,
            state_after: None,
        },
        content,
        destinations: Vec::new(),
    }])
}

/// Stores events of a room's history fetched from another server (`/backfill`), oldest first,
/// each authorised against its auth events and against the state before it: `state` is the
/// state before the oldest one (as its server gave it), carried forward through the state
/// events of the batch (exact for a linear history). They take backfill positions (before every
/// stream position: history for `/messages`, never new to `/sync`) and are not extremities.
/// Returns how many were stored.
pub async fn store_backfilled(
    state: &AppState,
    room: &Room,
    mut events: Vec<Checked>,
    mut before: NidState,
) -> ApiResult<usize> {
    events.sort_by_key(|c| c.pdu.depth);
    let mut tx = state.db.begin().await?;
    let entries: Vec<(i64, i64)> = before.iter().map(|(k, v)| (*k, *v)).collect();
    let mut group = storage::state::create_group(&mut tx, room.nid, None, &entries).await?;
    let search_config = crate::search::text_config(&state.config.search.language);
    let mut stored = 0;
    for c in events {
        let pdu = &c.pdu;
        let refs: Vec<String> =
            pdu.auth_events.iter().map(|e| e.to_string()).chain(std::iter::once(c.event_id.to_string())).collect();
        let known = storage::remote::known(&mut *tx, &refs).await?;
        if let Some(k) = known.get(c.event_id.as_str()) {
            // Held as an outlier (part of the state given on the join): now placed in the history.
            if k.stream_ordering.is_none() && k.room_nid == room.nid {
                let prev: Vec<String> = pdu.prev_events.iter().map(|e| e.to_string()).collect();
                let mut after = group;
                if let Some(sk) = &pdu.state_key {
                    let key_nid = storage::state::intern_key(&mut tx, &pdu.kind.to_string(), sk).await?;
                    after =
                        storage::state::create_group(&mut tx, room.nid, Some(group), &[(key_nid, k.event_nid)]).await?;
                    before.insert(key_nid, k.event_nid);
                }
                if storage::remote::promote_outlier(&mut tx, k.event_nid, group, after, &prev).await?.is_some() {
                    group = after;
                    stored += 1;
                }
            }
            continue;
        }
        let auth_known: Vec<&storage::remote::Known> =
            pdu.auth_events.iter().filter_map(|id| known.get(id.as_str())).filter(|k| k.room_nid == room.nid).collect();
        if auth_known.len() != pdu.auth_events.len() {
            tracing::info!(room_id = %room.room_id, event_id = %c.event_id, "backfilled event without its auth events left out");
            continue;
        }
        let map = StateBefore::Map(before.clone());
        match authorize(&mut tx, room, pdu, &auth_known, &map).await {
            Ok(()) => {}
            Err(Failure::Reject(reason)) => {
                tracing::info!(room_id = %room.room_id, event_id = %c.event_id, reason, "backfilled event rejected");
                continue;
            }
            Err(Failure::Fatal(e)) => return Err(e),
        }
        let content: Value = serde_json::from_str(pdu.content.get()).unwrap_or(Value::Null);
        let kind = pdu.kind.to_string();
        let relation = content.get("m.relates_to");
        let search = crate::search::searchable(&kind, &content).map(|(k, t)| (k, t, search_config.as_str()));
        let redacts = pdu.redacts.as_ref().map(|r| r.to_string());
        let sender = pdu.sender.to_string();
        let prev: Vec<String> = pdu.prev_events.iter().map(|e| e.to_string()).collect();
        let auth_nids: Vec<i64> = auth_known.iter().map(|k| k.event_nid).collect();
        let Some((nid, _)) = storage::remote::insert_backfilled(
            &mut tx,
            &storage::events::NewEventRow {
                event_id: c.event_id.as_str(),
                room_nid: room.nid,
                depth: pdu.depth,
                event_type: &kind,
                state_key: pdu.state_key.as_deref(),
                sender: &sender,
                origin_server_ts: u64::from(pdu.origin_server_ts.get()) as i64,
                json: &c.json,
                state_before: Some(group),
                state_after: if pdu.state_key.is_some() { None } else { Some(group) },
                redacts: redacts.as_deref(),
                rel_type: relation.and_then(|r| r.get("rel_type")).and_then(Value::as_str),
                relates_to: relation.and_then(|r| r.get("event_id")).and_then(Value::as_str),
                txn: None,
                search,
            },
            &prev,
            &auth_nids,
        )
        .await?
        else {
            continue;
        };
        if let Some(sk) = &pdu.state_key {
            let key_nid = storage::state::intern_key(&mut tx, &kind, sk).await?;
            group = storage::state::create_group(&mut tx, room.nid, Some(group), &[(key_nid, nid)]).await?;
            storage::remote::set_state_after(&mut tx, nid, group).await?;
            before.insert(key_nid, nid);
        }
        stored += 1;
    }
    tx.commit().await?;
    Ok(stored)
}
