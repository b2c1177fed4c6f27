//! What other servers send and ask about rooms: transactions (`/send/{txnId}`), and the room
//! history this server serves (`event`, `state_ids`, `state`, `event_auth`,
//! `get_missing_events`, `backfill`).
//!
//! A transaction's PDUs are grouped by room; each is checked (`federation::pdu`); when one
//! refers to `prev_events` this server does not have, they are fetched from the origin with
//! `get_missing_events`, and if a gap remains, the state before the event is fetched with
//! `state_ids` (its events checked and stored as outliers) so that the event can still be
//! authorised and placed (as a fork, which state resolution merges). Then the room engine
//! accepts or rejects each event (`rooms::remote::accept`).

use std::collections::{BTreeMap, HashMap, HashSet};

use axum::http::Method;
use ruma::{OwnedEventId, ServerName};
use serde_json::{Map, Value, json};

use super::pdu::{self, Checked};
use crate::error::{ApiResult, Error};
use crate::rooms::Room;
use crate::rooms::remote::{self as engine, Forward, Incoming};
use crate::state::AppState;
use crate::storage;

/// The spec's limits of one transaction.
pub const MAX_PDUS: usize = 50;
pub const MAX_EDUS: usize = 100;
/// Most events fetched to fill one gap (`get_missing_events`).
const MISSING_LIMIT: usize = 20;
/// Most state events fetched one by one for the state before an event.
const MAX_STATE_FETCH: usize = 2000;

/// `PUT /_matrix/federation/v1/send/{txnId}`: processes a transaction once per (origin, ID).
pub async fn transaction(state: &AppState, origin: &ServerName, txn_id: &str, body: &Value) -> ApiResult<Value> {
    if txn_id.is_empty() || txn_id.len() > 255 {
        return Err(Error::invalid_param("Invalid transaction ID"));
    }
    if let Some(o) = body.get("origin").and_then(Value::as_str)
        && o != origin.as_str()
    {
        return Err(Error::forbidden("The transaction's origin is not the requesting server"));
    }
    let pdus = body.get("pdus").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    let edus = body.get("edus").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    if pdus.len() > MAX_PDUS || edus.len() > MAX_EDUS {
        return Err(Error::too_large(format!("At most {MAX_PDUS} PDUs and {MAX_EDUS} EDUs per transaction")));
    }
    if let Some(done) = storage::remote::inbound_txn(&state.db, origin.as_str(), txn_id).await? {
        return Ok(done);
    }
    super::sender::contacted(state, origin.as_str()).await;
    let mut results = Map::new();
    // PDUs by room, in the order they came.
    let mut by_room: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for p in pdus {
        match p.get("room_id").and_then(Value::as_str) {
            Some(r) if r.len() <= 255 => by_room.entry(r.to_owned()).or_default().push(p),
            _ => tracing::info!(%origin, "PDU without a room ID dropped"),
        }
    }
    for (room_id, pdus) in by_room {
        let (outcomes, failed) = room_pdus(state, origin, &room_id, &pdus).await;
        if failed {
            // A server error (not a rejection): not recorded, so that the origin's retry of this
            // transaction processes it again (events already accepted count as accepted).
            return Err(Error::internal());
        }
        for (id, outcome) in outcomes {
            let v = match outcome {
                Ok(()) => json!({}),
                Err(e) => json!({ "error": e }),
            };
            results.insert(id, v);
        }
    }
    for edu in edus {
        if let Err(e) = super::edu::receive(state, origin, edu).await {
            tracing::info!(%origin, error = %e.message, "EDU dropped");
        }
    }
    let response = json!({ "pdus": results });
    storage::remote::record_inbound_txn(&state.db, origin.as_str(), txn_id, &response).await?;
    Ok(response)
}

/// The PDUs of one room of a transaction: `(event ID, outcome)`.
async fn room_pdus(
    state: &AppState,
    origin: &ServerName,
    room_id: &str,
    pdus: &[&Value],
) -> (Vec<(String, Result<(), String>)>, bool) {
    let mut out = Vec::new();
    let id_of = |v: &Value| v.get("event_id").and_then(Value::as_str).unwrap_or("").to_owned();
    let room = match Room::load(state, room_id).await {
        Ok(r) => r,
        Err(_) => {
            // Not a room this server is in: nothing to do with its events.
            return (pdus.iter().map(|v| (id_of(v), Err("unknown room".to_owned()))).collect(), false);
        }
    };
    if let Err(e) = super::acl::check(state, &room, origin).await {
        return (pdus.iter().map(|v| (id_of(v), Err(e.message.clone()))).collect(), false);
    }
    let mut checked = Vec::new();
    for v in pdus {
        match pdu::check(state, &room.rules, Some(room_id), v).await {
            Ok(c) => checked.push(c),
            Err(e) => {
                // Without a valid event, its ID is what the sender claims (or the computed one).
                let id = pdu::canonical(v)
                    .ok()
                    .and_then(|o| pdu::event_id(&o, &room.rules).ok())
                    .map(|i| i.to_string())
                    .unwrap_or_else(|| id_of(v));
                out.push((id, Err(e.to_string())));
            }
        }
    }
    if checked.is_empty() {
        return (out, false);
    }
    let incoming = match fill_gaps(state, &room, origin, checked).await {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!(%room_id, %origin, error = %e.message, "filling gaps failed");
            return (out, true);
        }
    };
    let wanted: HashSet<String> = incoming.iter().filter(|i| i.1).map(|i| i.0.checked.event_id.to_string()).collect();
    match engine::accept(state, &room, incoming.into_iter().map(|i| i.0).collect(), Forward::No).await {
        Ok(outcomes) => out.extend(
            outcomes.into_iter().filter(|(id, _)| wanted.contains(id.as_str())).map(|(id, r)| (id.to_string(), r)),
        ),
        Err(e) => {
            tracing::error!(%room_id, %origin, error = %e.message, "accepting remote events failed");
            return (out, true);
        }
    }
    (out, false)
}

/// Adds to `events` what is needed to place them: their missing predecessors (fetched with
/// `get_missing_events`), or the state before them (`state_ids`). Returns every event to accept
/// with whether it was in the transaction (`true`) or fetched.
async fn fill_gaps(
    state: &AppState,
    room: &Room,
    origin: &ServerName,
    events: Vec<Checked>,
) -> ApiResult<Vec<(Incoming, bool)>> {
    let mut have: HashMap<OwnedEventId, (Checked, bool)> =
        events.into_iter().map(|c| (c.event_id.clone(), (c, true))).collect();
    let missing = |have: &HashMap<OwnedEventId, (Checked, bool)>, known: &HashSet<String>| -> Vec<OwnedEventId> {
        let mut m: Vec<OwnedEventId> = have
            .values()
            .flat_map(|(c, _)| c.pdu.prev_events.iter())
            .filter(|p| !have.contains_key(*p) && !known.contains(p.as_str()))
            .cloned()
            .collect();
        m.sort();
        m.dedup();
        m
    };
    let refs: Vec<String> = have.values().flat_map(|(c, _)| c.pdu.prev_events.iter().map(|p| p.to_string())).collect();
    let known: HashSet<String> = storage::remote::known(&state.db, &refs)
        .await?
        .into_values()
        .filter(|k| k.stream_ordering.is_some())
        .map(|k| k.event_id)
        .collect();
    if !missing(&have, &known).is_empty() {
        // The events between what we have (our forward extremities) and theirs.
        let mut conn = state.db.acquire().await?;
        let earliest: Vec<String> =
            storage::events::extremities(&mut conn, room.nid).await?.into_iter().map(|e| e.1).collect();
        drop(conn);
        let latest: Vec<String> = have.keys().map(|k| k.to_string()).collect();
        let body =
            json!({ "earliest_events": earliest, "latest_events": latest, "limit": MISSING_LIMIT, "min_depth": 0 });
        let path = format!(
            "/_matrix/federation/v1/get_missing_events/{}",
            crate::appservice::client::enc(room.room_id.as_str())
        );
        match state.federation.request(Method::POST, origin, &path, Some(&body), true, 8 * 1024 * 1024).await {
            Ok(answer) => {
                for v in answer["events"].as_array().into_iter().flatten().take(MISSING_LIMIT) {
                    match pdu::check(state, &room.rules, Some(room.room_id.as_str()), v).await {
                        Ok(c) => {
                            have.entry(c.event_id.clone()).or_insert((c, false));
                        }
                        Err(e) => tracing::info!(room_id = %room.room_id, %origin, error = %e, "missing event refused"),
                    }
                }
            }
            Err(e) => tracing::info!(room_id = %room.room_id, %origin, error = %e, "get_missing_events failed"),
        }
    }
    // Still a gap: the earliest events whose predecessors are missing get the state before them.
    let mut out: Vec<(Incoming, bool)> = Vec::new();
    let still = missing(&have, &known);
    let mut entries: Vec<(OwnedEventId, (Checked, bool))> = have.into_iter().collect();
    entries.sort_by_key(|(_, (c, _))| c.pdu.depth);
    let in_batch: HashSet<OwnedEventId> = entries.iter().map(|(id, _)| id.clone()).collect();
    for (_, (c, own)) in entries {
        let gap = c.pdu.prev_events.iter().any(|p| still.contains(p))
            && !c.pdu.prev_events.iter().any(|p| in_batch.contains(p));
        let state_before = if gap { state_before(state, room, origin, &c).await.ok() } else { None };
        out.push((Incoming { checked: c, state_before }, own));
    }
    Ok(out)
}

/// The state before `event` as `origin` has it (`state_ids`), its events fetched, checked and
/// stored as outliers.
pub async fn state_before(
    state: &AppState,
    room: &Room,
    origin: &ServerName,
    event: &Checked,
) -> ApiResult<crate::rooms::resolve::NidState> {
    let path = format!(
        "/_matrix/federation/v1/state_ids/{}?event_id={}",
        crate::appservice::client::enc(room.room_id.as_str()),
        crate::appservice::client::enc(event.event_id.as_str())
    );
    let answer = state
        .federation
        .request(Method::GET, origin, &path, None, true, 16 * 1024 * 1024)
        .await
        .map_err(|e| Error::from(anyhow::anyhow!("state_ids: {e}")))?;
    let ids = |k: &str| -> Vec<String> {
        answer[k].as_array().into_iter().flatten().filter_map(Value::as_str).map(str::to_owned).collect()
    };
    let (state_ids, chain_ids) = (ids("pdu_ids"), ids("auth_chain_ids"));
    if state_ids.len() + chain_ids.len() > MAX_STATE_FETCH * 4 {
        return Err(Error::too_large("state too large"));
    }
    let mut all_ids: Vec<String> = state_ids.iter().chain(&chain_ids).cloned().collect();
    all_ids.sort();
    all_ids.dedup();
    let known = storage::remote::known(&state.db, &all_ids).await?;
    let unknown: Vec<&String> = all_ids.iter().filter(|i| !known.contains_key(*i)).collect();
    if unknown.len() > MAX_STATE_FETCH {
        return Err(Error::too_large("too many unknown state events"));
    }
    let mut fetched = Vec::new();
    for id in unknown {
        let path = format!("/_matrix/federation/v1/event/{}", crate::appservice::client::enc(id));
        let Ok(answer) = state.federation.request(Method::GET, origin, &path, None, true, 128 * 1024).await else {
            continue;
        };
        let Some(v) = answer["pdus"].as_array().and_then(|a| a.first()) else { continue };
        match pdu::check(state, &room.rules, Some(room.room_id.as_str()), v).await {
            Ok(c) if c.event_id.as_str() == id => fetched.push(c),
            _ => tracing::info!(room_id = %room.room_id, event_id = %id, "fetched state event refused"),
        }
    }
    let mut tx = state.db.begin().await?;
    engine::store_outliers(&mut tx, room, fetched).await?;
    let known = storage::remote::known(&mut *tx, &state_ids).await?;
    let nids: Vec<i64> = known.values().map(|k| k.event_nid).collect();
    let rows = storage::events::by_nids(&mut *tx, &nids).await?;
    let entries: Vec<(i64, String, String)> =
        rows.into_iter().filter_map(|r| Some((r.event_nid, r.event_type, r.state_key?))).collect();
    let map = engine::state_map(&mut tx, &entries).await?;
    tx.commit().await?;
    Ok(map)
}

/// Whether `origin` may read a room's events: it has (or had) a member in the room, and the
/// room's ACL lets it.
pub async fn may_read(state: &AppState, room: &Room, origin: &ServerName) -> ApiResult<()> {
    super::acl::check(state, room, origin).await?;
    if !storage::remote::server_has_member(&state.db, room.nid, origin.as_str()).await? {
        return Err(Error::forbidden("Your server is not in the room"));
    }
    Ok(())
}

/// `GET /event/{eventId}`.
pub async fn event(state: &AppState, origin: &ServerName, event_id: &str) -> ApiResult<Value> {
    let row = storage::events::by_id(&state.db, event_id).await?.ok_or_else(|| Error::not_found("Unknown event"))?;
    let room = storage::rooms::by_nid(&state.db, row.room_nid).await?.ok_or_else(Error::internal)?;
    let room = Room::load(state, &room.room_id).await?;
    may_read(state, &room, origin).await?;
    let pdu: Value = serde_json::from_str(&row.json).map_err(|e| Error::from(anyhow::anyhow!(e)))?;
    Ok(json!({ "origin": state.config.server_name, "origin_server_ts": storage::now_ms(), "pdus": [pdu] }))
}

/// The event `event_id` of `room`, which `origin` may read.
async fn room_event(
    state: &AppState,
    origin: &ServerName,
    room_id: &str,
    event_id: &str,
) -> ApiResult<(Room, storage::events::EventRow)> {
    let room = Room::load(state, room_id).await?;
    may_read(state, &room, origin).await?;
    let row = storage::events::by_id(&state.db, event_id).await?.filter(|r| r.room_nid == room.nid);
    Ok((room, row.ok_or_else(|| Error::not_found("Unknown event"))?))
}

/// `GET /state_ids/{roomId}?event_id=` (`ids`) and `GET /state/{roomId}?event_id=`: the state
/// before the event and its auth chain.
pub async fn state_at(
    state: &AppState,
    origin: &ServerName,
    room_id: &str,
    event_id: &str,
    ids: bool,
) -> ApiResult<Value> {
    let (_, row) = room_event(state, origin, room_id, event_id).await?;
    let (pdus, chain) = if row.state_before.is_none() && row.event_type == "m.room.create" {
        // Nothing comes before a room's creation.
        (Vec::new(), Vec::new())
    } else {
        super::membership::state_and_auth_chain(state, row.state_before, &[]).await?
    };
    if ids {
        let id = |v: Vec<(String, Value)>| -> Vec<String> { v.into_iter().map(|p| p.0).collect() };
        return Ok(json!({ "pdu_ids": id(pdus), "auth_chain_ids": id(chain) }));
    }
    let pdu = |v: Vec<(String, Value)>| -> Vec<Value> { v.into_iter().map(|p| p.1).collect() };
    Ok(json!({ "pdus": pdu(pdus), "auth_chain": pdu(chain) }))
}

/// `GET /event_auth/{roomId}/{eventId}`: the event's full auth chain.
pub async fn event_auth(state: &AppState, origin: &ServerName, room_id: &str, event_id: &str) -> ApiResult<Value> {
    let (_, row) = room_event(state, origin, room_id, event_id).await?;
    let chain = storage::remote::auth_chain(&state.db, &[row.event_nid]).await?;
    let pdus: Vec<Value> = storage::remote::json_of_nids(&state.db, &chain)
        .await?
        .into_iter()
        .filter_map(|(_, j)| serde_json::from_str(&j).ok())
        .collect();
    Ok(json!({ "auth_chain": pdus }))
}

/// `POST /get_missing_events/{roomId}`.
pub async fn missing_events(state: &AppState, origin: &ServerName, room_id: &str, body: &Value) -> ApiResult<Value> {
    let room = Room::load(state, room_id).await?;
    may_read(state, &room, origin).await?;
    let list = |k: &str| -> ApiResult<Vec<String>> {
        let a = body.get(k).and_then(Value::as_array).ok_or_else(|| Error::bad_json(format!("{k} must be a list")))?;
        if a.len() > 100 {
            return Err(Error::too_large(format!("Too many {k}")));
        }
        Ok(a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
    };
    let (earliest, latest) = (list("earliest_events")?, list("latest_events")?);
    let limit = body.get("limit").and_then(Value::as_i64).unwrap_or(10).clamp(1, 100);
    let min_depth = body.get("min_depth").and_then(Value::as_i64).unwrap_or(0);
    let events: Vec<Value> = storage::remote::missing_events(&state.db, room.nid, &earliest, &latest, min_depth, limit)
        .await?
        .into_iter()
        .filter_map(|j| serde_json::from_str(&j).ok())
        .collect();
    Ok(json!({ "events": events }))
}

/// `GET /backfill/{roomId}?v=&limit=`.
pub async fn backfill(
    state: &AppState,
    origin: &ServerName,
    room_id: &str,
    from: &[String],
    limit: i64,
) -> ApiResult<Value> {
    let room = Room::load(state, room_id).await?;
    may_read(state, &room, origin).await?;
    if from.is_empty() || from.len() > 20 {
        return Err(Error::invalid_param("Give between 1 and 20 event IDs in v"));
    }
    let pdus: Vec<Value> = storage::remote::backfill(&state.db, room.nid, from, limit.clamp(1, 100))
        .await?
        .into_iter()
        .filter_map(|j| serde_json::from_str(&j).ok())
        .collect();
    Ok(json!({ "origin": state.config.server_name, "origin_server_ts": storage::now_ms(), "pdus": pdus }))
}

/// `GET /timestamp_to_event/{roomId}?ts=&dir=`: the event closest to `ts` in that direction.
pub async fn timestamp_to_event(
    state: &AppState,
    origin: &ServerName,
    room_id: &str,
    ts: i64,
    forward: bool,
) -> ApiResult<Value> {
    let room = Room::load(state, room_id).await?;
    may_read(state, &room, origin).await?;
    let rows = storage::events::closest_to_ts(&state.db, room.nid, ts, forward, 1).await?;
    let row = rows.first().ok_or_else(|| Error::not_found("No event found"))?;
    Ok(json!({ "event_id": row.event_id, "origin_server_ts": row.origin_server_ts }))
}
