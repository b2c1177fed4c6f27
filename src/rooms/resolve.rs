//! State resolution over stored state groups: the state of a room where its DAG forks (several
//! `prev_events`, several forward extremities), by the room version's algorithm (v2, and v2.1
//! for room version 12) from `ruma::state_res`.
//!
//! Groups are `key_nid → event_nid` maps (`storage::state`). Sets that agree are merged without
//! loading anything; otherwise the auth chains of the sets, the conflicted events and the state
//! entries the authorization rules may ask about are loaded, and `ruma::state_res::resolve` runs
//! over them in memory.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use ruma::events::StateEventType;
use ruma::state_res::utils::event_id_set::EventIdSet;
use ruma::{EventId, OwnedEventId};
use sqlx::PgConnection;

use super::Room;
use super::pdu::Pdu;
use crate::error::{ApiResult, Error};
use crate::storage;

/// A state map as stored.
pub type NidState = HashMap<i64, i64>;

fn internal(e: impl std::fmt::Display) -> Error {
    Error::from(anyhow::anyhow!("state resolution: {e}"))
}

/// Resolves the states of `groups` (the states after each of an event's `prev_events`, or after
/// each forward extremity). Returns the resolved map.
pub async fn resolve_groups(conn: &mut PgConnection, room: &Room, groups: &[i64]) -> ApiResult<NidState> {
    let mut distinct: Vec<i64> = groups.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    let mut maps = Vec::with_capacity(distinct.len());
    for g in &distinct {
        maps.push(storage::state::load_group(&mut *conn, *g).await?);
    }
    resolve_maps(conn, room, maps).await
}

/// Resolves state maps (see [`resolve_groups`]).
pub async fn resolve_maps(conn: &mut PgConnection, room: &Room, mut maps: Vec<NidState>) -> ApiResult<NidState> {
    maps.dedup();
    if maps.len() <= 1 {
        return Ok(maps.pop().unwrap_or_default());
    }
    // Conflicted keys: those whose value differs between the sets, or is missing from one.
    let all_keys: HashSet<i64> = maps.iter().flat_map(|m| m.keys().copied()).collect();
    let conflicted: Vec<i64> = all_keys
        .iter()
        .copied()
        .filter(|k| {
            let first = maps[0].get(k);
            first.is_none() || maps.iter().any(|m| m.get(k) != first)
        })
        .collect();
    if conflicted.is_empty() {
        return Ok(maps.swap_remove(0));
    }

    // The auth chain of each set.
    let mut chains: Vec<HashSet<i64>> = Vec::with_capacity(maps.len());
    for m in &maps {
        let nids: Vec<i64> = m.values().copied().collect();
        chains.push(storage::remote::auth_chain(&mut *conn, &nids).await?.into_iter().collect());
    }
    // Events the algorithm may look at: the conflicted events, every auth chain event that is not
    // in all chains (and their own chains, which are within the union), and the state entries
    // the authorization rules ask about (create, power levels, join rules, members).
    let conflicted_events: HashSet<i64> =
        conflicted.iter().flat_map(|k| maps.iter().filter_map(move |m| m.get(k).copied())).collect();
    let mut load: HashSet<i64> = chains.iter().flatten().copied().collect();
    load.extend(conflicted_events.iter().copied());
    // Key names of every key in the sets (to build ruma's maps).
    let all_key_list: Vec<i64> = all_keys.iter().copied().collect();
    let key_names: HashMap<i64, (StateEventType, String)> = storage::remote::keys(&mut *conn, &all_key_list)
        .await?
        .into_iter()
        .map(|(nid, t, k)| (nid, (StateEventType::from(t), k)))
        .collect();
    let key_by_name: HashMap<(StateEventType, String), i64> =
        key_names.iter().map(|(nid, name)| (name.clone(), *nid)).collect();
    // Unconflicted entries the auth rules can reach: every non-member entry (few) and the member
    // entries of the users the loaded events are about.
    let mut users: HashSet<String> = HashSet::new();
    let loaded_rows = storage::events::by_nids(&mut *conn, &load.iter().copied().collect::<Vec<_>>()).await?;
    for r in &loaded_rows {
        users.insert(r.sender.clone());
        if let Some(k) = &r.state_key {
            users.insert(k.clone());
        }
    }
    let mut extra = Vec::new();
    for (nid, (t, k)) in &key_names {
        if *t != StateEventType::RoomMember || users.contains(k) {
            extra.extend(maps.iter().filter_map(|m| m.get(nid).copied()).filter(|e| !load.contains(e)));
        }
    }
    extra.sort_unstable();
    extra.dedup();
    let mut rows = loaded_rows;
    rows.extend(storage::events::by_nids(&mut *conn, &extra).await?);

    let mut events: HashMap<OwnedEventId, Arc<Pdu>> = HashMap::with_capacity(rows.len());
    let mut id_of: HashMap<i64, OwnedEventId> = HashMap::with_capacity(rows.len());
    for r in rows {
        let pdu = Pdu::parse(&r.event_id, &r.json).map_err(internal)?;
        id_of.insert(r.event_nid, pdu.event_id.clone());
        events.insert(pdu.event_id.clone(), Arc::new(pdu));
    }
    // Event IDs of every entry of the sets (most are not loaded: only their IDs are needed).
    let missing_ids: Vec<i64> =
        maps.iter().flat_map(|m| m.values().copied()).filter(|n| !id_of.contains_key(n)).collect();
    for (nid, id) in storage::remote::event_ids(&mut *conn, &missing_ids).await? {
        id_of.insert(nid, OwnedEventId::try_from(id).map_err(internal)?);
    }
    let nid_of: HashMap<OwnedEventId, i64> = id_of.iter().map(|(n, id)| (id.clone(), *n)).collect();

    let state_maps: Vec<ruma::state_res::StateMap<OwnedEventId>> = maps
        .iter()
        .map(|m| {
            m.iter()
                .filter_map(|(k, e)| Some((key_names.get(k)?.clone(), id_of.get(e)?.clone())))
                .collect::<ruma::state_res::StateMap<OwnedEventId>>()
        })
        .collect();
    let auth_chains: Vec<EventIdSet<OwnedEventId>> =
        chains.iter().map(|c| c.iter().filter_map(|n| id_of.get(n).cloned()).collect()).collect();

    let fetch = |id: &EventId| events.get(id).cloned();
    let subgraph = |conflicted: &ruma::state_res::StateMap<Vec<OwnedEventId>>| {
        Some(conflicted_subgraph(conflicted.values().flatten(), &events).into_iter().collect::<EventIdSet<_>>())
    };
    let rules = &room.rules;
    let state_res = rules.state_res.v2_rules().ok_or_else(|| internal("room version without state resolution v2"))?;
    let resolved =
        ruma::state_res::resolve(&rules.authorization, state_res, state_maps.iter(), auth_chains, fetch, subgraph)
            .map_err(internal)?;
    let mut out = NidState::with_capacity(resolved.len());
    for (name, id) in resolved {
        let (Some(k), Some(e)) = (key_by_name.get(&name), nid_of.get(&id)) else {
            return Err(internal(format!("resolved entry {id} is unknown")));
        };
        out.insert(*k, *e);
    }
    Ok(out)
}

/// The conflicted state subgraph (v2.1): every event that is both reachable from a conflicted
/// event through `auth_events` and leads to a conflicted event, within the loaded events.
fn conflicted_subgraph<'a>(
    conflicted: impl Iterator<Item = &'a OwnedEventId>,
    events: &HashMap<OwnedEventId, Arc<Pdu>>,
) -> HashSet<OwnedEventId> {
    let conflicted: HashSet<OwnedEventId> = conflicted.cloned().collect();
    // Ancestors of the conflicted events (through auth events).
    let mut ancestors: HashSet<OwnedEventId> = HashSet::new();
    let mut stack: Vec<OwnedEventId> = conflicted.iter().cloned().collect();
    while let Some(id) = stack.pop() {
        if let Some(ev) = events.get(&id) {
            for a in &ev.auth_events {
                if ancestors.insert(a.clone()) {
                    stack.push(a.clone());
                }
            }
        }
    }
    // Of those (and the conflicted events), the ones that lead to a conflicted event.
    let mut leads: HashMap<OwnedEventId, bool> = HashMap::new();
    fn reaches(
        id: &OwnedEventId,
        conflicted: &HashSet<OwnedEventId>,
        events: &HashMap<OwnedEventId, Arc<Pdu>>,
        memo: &mut HashMap<OwnedEventId, bool>,
    ) -> bool {
        // Iterative post-order walk (auth chains can be deep).
        let mut stack = vec![(id.clone(), false)];
        while let Some((cur, expanded)) = stack.pop() {
            if memo.contains_key(&cur) {
                continue;
            }
            let auth = events.get(&cur).map(|e| e.auth_events.clone()).unwrap_or_default();
            if expanded {
                let r = auth.iter().any(|a| conflicted.contains(a) || memo.get(a).copied().unwrap_or(false));
                memo.insert(cur, r);
            } else {
                stack.push((cur, true));
                for a in auth {
                    if !memo.contains_key(&a) {
                        stack.push((a, false));
                    }
                }
            }
        }
        memo.get(id).copied().unwrap_or(false)
    }
    let mut out: HashSet<OwnedEventId> = conflicted.clone();
    for id in &ancestors {
        if reaches(id, &conflicted, events, &mut leads) || conflicted.contains(id) {
            out.insert(id.clone());
        }
    }
    out
}

/// Makes `state` the room's current state: writes the entries that changed since `old`, removes
/// the ones that went away, follows memberships, and records `group` as the current group.
pub async fn set_current_state(
    conn: &mut PgConnection,
    room: &Room,
    old: &NidState,
    state: &NidState,
    group: i64,
) -> ApiResult<()> {
    let changed: Vec<(i64, i64)> = state.iter().filter(|(k, e)| old.get(k) != Some(e)).map(|(k, e)| (*k, *e)).collect();
    let removed: Vec<i64> = old.keys().filter(|k| !state.contains_key(k)).copied().collect();
    if !changed.is_empty() {
        storage::remote::set_current_many(&mut *conn, room.nid, &changed).await?;
    }
    if !removed.is_empty() {
        storage::remote::remove_current(&mut *conn, room.nid, &removed).await?;
    }
    storage::rooms::set_current_group(&mut *conn, room.nid, group).await?;
    // Memberships of the member entries that changed.
    let nids: Vec<i64> = changed.iter().map(|(_, e)| *e).collect();
    let rows = storage::events::by_nids(&mut *conn, &nids).await?;
    let memberships: Vec<(String, String, i64, i64)> = rows
        .iter()
        .filter(|r| r.event_type == "m.room.member")
        .filter_map(|r| {
            let user = r.state_key.clone()?;
            let membership = serde_json::from_str::<serde_json::Value>(&r.json)
                .ok()
                .and_then(|v| v["content"]["membership"].as_str().map(str::to_owned))
                .unwrap_or_else(|| "leave".into());
            Some((user, membership, r.event_nid, r.stream_ordering))
        })
        .collect();
    if !memberships.is_empty() {
        storage::remote::set_memberships(&mut *conn, room.nid, &memberships).await?;
    }
    Ok(())
}
