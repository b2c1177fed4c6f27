//! Simplified sliding sync (MSC4186, `POST /_matrix/client/unstable/org.matrix.simplified_msc3575/sync`),
//! the sync Element X speaks, served from the same in-memory room cache, stream heads and per-user
//! notifier as `/sync` (see ARCHITECTURE.md, "Sliding sync").
//!
//! A request names lists (windows over the user's rooms, ordered by bump stamp) and room
//! subscriptions; the response carries each list's count and windows, and for each room in a
//! window or subscription what the connection has not received yet. What a connection received
//! is its state at a position ([`conn`]): per room, up to which event stream position it was sent
//! and with which parameters; per list, a digest of its last windows; the stream token its
//! extensions were computed at. A request with nothing new long-polls on the user's notifier and
//! answers with the same `pos`, writing nothing.

pub mod conn;
pub mod request;

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::cache::{CachedEvent, RoomEntry, StateMap};
use super::filter::Filter;
use super::token::SyncToken;
use super::{Builder, MAX_TIMEOUT};
use crate::api::client::rooms::token as topo_token;
use crate::error::ApiResult;
use crate::rooms::Room;
use crate::rooms::visibility::Viewer;
use crate::state::AppState;
use crate::storage;
use crate::storage::rooms::UserMembership;
pub use conn::SlidingCaches;
use conn::{ConnState, Position, RoomSent};
use request::{Filters, Request, RoomParams, Scope};

/// Event types that move a room up the list (as Synapse's defaults).
pub const BUMP_TYPES: &[&str] = &[
    "m.room.create",
    "m.room.message",
    "m.room.encrypted",
    "m.sticker",
    "m.call.invite",
    "m.poll.start",
    "m.beacon_info",
];

/// The endpoint (the unstable prefix Element X and Synapse use).
pub const PATH: &str = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync";

/// Heroes per room.
const MAX_HEROES: usize = 5;

/// `POST .../org.matrix.simplified_msc3575/sync`: the response body.
pub async fn sync(
    state: &AppState,
    user: &str,
    device: &str,
    pos: Option<&str>,
    timeout: Duration,
    body: request::Body,
) -> ApiResult<Value> {
    let req = Request::validate(body)?;
    let prev = match pos {
        Some(p) => Some(conn::load(state, p, user, device, &req.conn_id).await?),
        None => None,
    };
    super::set_presence(state, user, "online").await?;
    let deadline = Instant::now() + timeout.min(MAX_TIMEOUT);
    let waiter = state.sync.waiter(user);
    loop {
        // Registered before looking, so a change between the look and the wait still wakes us.
        let notified = waiter.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();

        let out = compute(state, user, device, &req, prev.as_deref()).await?;
        if out.has_updates || prev.is_none() || Instant::now() >= deadline {
            return finish(state, user, device, &req, prev.as_deref(), out).await;
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            // Timed out: one last look answers.
            continue;
        }
    }
}

async fn finish(
    state: &AppState,
    user: &str,
    device: &str,
    req: &Request,
    prev: Option<&Position>,
    out: Output,
) -> ApiResult<Value> {
    let pos = match prev {
        Some(p) if !out.has_updates => p.pos_id,
        _ => conn::store(state, prev, user, device, &req.conn_id, out.conn).await?.pos_id,
    };
    let mut body = out.body;
    body["pos"] = json!(pos.to_string());
    if let Some(t) = &req.txn_id {
        body["txn_id"] = json!(t);
    }
    Ok(body)
}

struct Output {
    body: Value,
    conn: ConnState,
    has_updates: bool,
}

/// A room the user may see in a list or subscription.
struct RoomInfo<'m> {
    m: &'m UserMembership,
    room: Room,
    entry: Arc<parking_lot::RwLock<RoomEntry>>,
    bump: i64,
    room_type: Option<String>,
    encrypted: bool,
    /// Whether lists may show it (left rooms are shown once, when the leave is new).
    listed: bool,
    /// For an invite: the invite says it is a direct chat.
    direct_invite: bool,
}

fn digest(parts: impl IntoIterator<Item = impl AsRef<[u8]>>) -> u64 {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.as_ref().len() as u64).to_le_bytes());
        h.update(p.as_ref());
    }
    let d = h.finalize();
    u64::from_le_bytes(d[..8].try_into().unwrap_or_default())
}

fn required_state_digest(rs: &[(String, String)]) -> u64 {
    digest(rs.iter().flat_map(|(t, k)| [t.as_bytes(), k.as_bytes()]))
}

fn merge(into: &mut RoomParams, p: &RoomParams) {
    into.timeline_limit = into.timeline_limit.max(p.timeline_limit);
    into.required_state.extend(p.required_state.iter().cloned());
    into.required_state.sort();
    into.required_state.dedup();
}

/// Whether `required_state` asks for the state entry `(kind, key)` (`$LAZY` aside).
fn wanted(rs: &[(String, String)], kind: &str, key: &str, user: &str) -> bool {
    rs.iter().any(|(t, k)| {
        (t == "*" || t == kind) && (k == "*" || k == key || (k == "$ME" && key == user && kind == "m.room.member"))
    })
}

/// The state entries `required_state` asks for, from a state map (`$LAZY` aside).
fn select_state(state: &StateMap, rs: &[(String, String)], user: &str) -> Vec<Arc<CachedEvent>> {
    let wildcard = rs.iter().any(|(t, k)| t == "*" || k == "*");
    let mut out: Vec<Arc<CachedEvent>> = if wildcard {
        state.iter().filter(|((t, k), _)| wanted(rs, t, k, user)).map(|(_, e)| e.clone()).collect()
    } else {
        rs.iter()
            .filter_map(|(t, k)| {
                let key = if k == "$ME" && t == "m.room.member" { user } else { k.as_str() };
                state.get(&(t.clone(), key.to_owned())).cloned()
            })
            .collect()
    };
    out.sort_by_key(|e| e.stream());
    out.dedup_by_key(|e| e.stream());
    out
}

/// Name, avatar, heroes and member counts, from the room state.
fn summary(state: &StateMap, user: &str, out: &mut Map<String, Value>) {
    let get = |t: &str| state.get(&(t.to_owned(), String::new()));
    if let Some(name) = get("m.room.name").and_then(|e| e.client["content"]["name"].as_str().map(str::to_owned))
        && !name.is_empty()
    {
        out.insert("name".into(), json!(name));
    }
    if let Some(ev) = get("m.room.avatar") {
        match ev.client["content"]["url"].as_str() {
            Some(url) if !url.is_empty() => out.insert("avatar".into(), json!(url)),
            _ => out.insert("avatar".into(), Value::Null),
        };
    }
    let mut members: Vec<&Arc<CachedEvent>> = state
        .iter()
        .filter(|((t, _), e)| t == "m.room.member" && matches!(e.membership(), Some("join" | "invite")))
        .map(|(_, e)| e)
        .collect();
    let joined = members.iter().filter(|e| e.membership() == Some("join")).count();
    out.insert("joined_count".into(), json!(joined));
    out.insert("invited_count".into(), json!(members.len() - joined));
    members.sort_by_key(|e| e.stream());
    let heroes: Vec<Value> = members
        .iter()
        .filter(|e| e.row.state_key.as_deref() != Some(user))
        .take(MAX_HEROES)
        .map(|e| {
            let c = &e.client["content"];
            let mut h = json!({ "user_id": e.row.state_key });
            if let Some(n) = c["displayname"].as_str() {
                h["displayname"] = json!(n);
            }
            if let Some(a) = c["avatar_url"].as_str() {
                h["avatar_url"] = json!(a);
            }
            h
        })
        .collect();
    if !heroes.is_empty() {
        out.insert("heroes".into(), Value::Array(heroes));
    }
}

fn list_matches(
    info: &RoomInfo,
    f: &Filters,
    direct: Option<&HashSet<String>>,
    children: Option<&HashSet<String>>,
) -> bool {
    if let Some(want) = f.is_invite
        && (info.m.membership == "invite") != want
    {
        return false;
    }
    if let Some(want) = f.is_dm {
        let dm = info.direct_invite || direct.is_some_and(|d| d.contains(&info.m.room_id));
        if dm != want {
            return false;
        }
    }
    if let Some(want) = f.is_encrypted
        && info.encrypted != want
    {
        return false;
    }
    if let Some(types) = &f.room_types
        && !types.contains(&info.room_type)
    {
        return false;
    }
    if let Some(types) = &f.not_room_types
        && types.contains(&info.room_type)
    {
        return false;
    }
    if let Some(c) = children
        && !c.contains(&info.m.room_id)
    {
        return false;
    }
    true
}

/// The rooms of the user's `m.direct` (cached per user until their account data moves).
async fn direct_rooms(state: &AppState, user: &str) -> ApiResult<Arc<HashSet<String>>> {
    let head = state.sync.account_data_heads.get(&user.to_owned());
    if let Some((at, set)) = state.sliding.direct.get(user)
        && at >= head
    {
        return Ok(set);
    }
    let content = storage::account_data::get(&state.db, user, None, "m.direct").await?;
    let set: HashSet<String> = content
        .as_ref()
        .and_then(Value::as_object)
        .map(|o| {
            o.values().filter_map(Value::as_array).flatten().filter_map(Value::as_str).map(str::to_owned).collect()
        })
        .unwrap_or_default();
    let set = Arc::new(set);
    state.sliding.direct.insert(user.to_owned(), (head, set.clone()));
    Ok(set)
}

/// Rooms that the given spaces (that the user is joined to) list as children.
fn space_children(spaces: &[String], infos: &[RoomInfo]) -> HashSet<String> {
    let mut out = HashSet::new();
    for sp in spaces {
        let Some(info) = infos.iter().find(|i| &i.m.room_id == sp && i.m.membership == "join") else { continue };
        let e = info.entry.read();
        for ((t, k), ev) in &e.state {
            if t == "m.space.child" && ev.client["content"]["via"].as_array().is_some_and(|v| !v.is_empty()) {
                out.insert(k.clone());
            }
        }
    }
    out
}

async fn compute(
    state: &AppState,
    user: &str,
    device: &str,
    req: &Request,
    prev: Option<&Position>,
) -> ApiResult<Output> {
    let user_rooms = state.sync.user_rooms(state, user).await?;
    let membership_upto = user_rooms.read().upto;
    super::wait_for_events(state, membership_upto).await;
    let current = super::current_token(state);
    let since: Option<SyncToken> = match prev {
        Some(p) => Some(p.state.sync_token()?.clamp_to(current)),
        None => None,
    };
    let next = since.map_or(current, |s| s.max(current));
    let (memberships, known): (Vec<UserMembership>, HashSet<i64>) = {
        let u = user_rooms.read();
        (
            u.rooms.values().filter(|m| m.stream_ordering <= next.events).cloned().collect(),
            u.rooms.keys().copied().collect(),
        )
    };
    let empty = ConnState::default();
    let prev_state = prev.map_or(&empty, |p| &p.state);
    let filter = Filter::default();
    let ignored = tokio::sync::OnceCell::new();
    let b = Builder {
        state,
        user,
        device,
        filter: &filter,
        ignored: &ignored,
        since,
        next,
        full_state: false,
        use_state_after: false,
    };

    // The rooms lists may show and the subscribed ones, with what ordering and filters need.
    let mut infos: Vec<RoomInfo> = Vec::new();
    let mut need_bump: Vec<usize> = Vec::new();
    for m in &memberships {
        let listed = match m.membership.as_str() {
            "join" | "invite" | "knock" => true,
            // A departure the connection has not been told about yet.
            "leave" | "ban" => prev_state.rooms.get(&m.room_nid).is_some_and(|r| r.m != m.stream_ordering),
            _ => false,
        };
        if !listed && !req.subscriptions.contains_key(&m.room_id) {
            continue;
        }
        let (room, entry) = b.room_of(m).await?;
        let (bump, room_type, encrypted, direct_invite) = {
            let e = entry.read();
            let bump = if m.membership == "join" {
                e.timeline
                    .iter()
                    .rev()
                    .filter(|ev| ev.stream() <= next.events)
                    .find(|ev| BUMP_TYPES.contains(&ev.row.event_type.as_str()))
                    .map(|ev| ev.stream())
            } else {
                Some(m.stream_ordering)
            };
            let bump = match bump {
                Some(b) => b,
                None if e.complete_from == 0 => m.stream_ordering,
                None => match state.sliding.bumps.get(&room.nid) {
                    Some((read_at, b)) if e.complete_from <= read_at => b,
                    _ => {
                        need_bump.push(infos.len());
                        m.stream_ordering
                    }
                },
            };
            let create = e.state.get(&("m.room.create".to_owned(), String::new()));
            let room_type = create.and_then(|c| c.client["content"]["type"].as_str().map(str::to_owned));
            let encrypted = e.state.contains_key(&("m.room.encryption".to_owned(), String::new()));
            let direct_invite = m.membership == "invite"
                && e.state
                    .get(&("m.room.member".to_owned(), user.to_owned()))
                    .is_some_and(|ev| ev.client["content"]["is_direct"] == json!(true));
            (bump, room_type, encrypted, direct_invite)
        };
        infos.push(RoomInfo { m, room, entry, bump, room_type, encrypted, listed, direct_invite });
    }
    if !need_bump.is_empty() {
        // Rooms whose cached timeline holds no bump event (only state, lately): one query.
        let nids: Vec<i64> = need_bump.iter().map(|i| infos[*i].room.nid).collect();
        let found: HashMap<i64, i64> =
            storage::sliding_sync::latest_of_types(&state.db, &nids, BUMP_TYPES, next.events)
                .await?
                .into_iter()
                .collect();
        for i in need_bump {
            let info = &mut infos[i];
            if let Some(b) = found.get(&info.room.nid) {
                info.bump = *b;
                state.sliding.bumps.insert(info.room.nid, (next.events, *b));
            }
        }
    }
    let by_id: HashMap<&str, usize> = infos.iter().enumerate().map(|(i, r)| (r.m.room_id.as_str(), i)).collect();

    // Lists: filter, order by bump stamp (newest first), cut the windows.
    let direct = if req.lists.values().any(|l| l.filters.is_dm.is_some()) {
        Some(direct_rooms(state, user).await?)
    } else {
        None
    };
    let mut params: BTreeMap<usize, RoomParams> = BTreeMap::new();
    let mut windows: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    let mut lists_out = Map::new();
    let mut new_lists = HashMap::new();
    let mut lists_changed = false;
    for (name, l) in &req.lists {
        let children = l.filters.spaces.as_ref().map(|s| space_children(s, &infos));
        let mut matched: Vec<usize> = (0..infos.len())
            .filter(|i| infos[*i].listed && list_matches(&infos[*i], &l.filters, direct.as_deref(), children.as_ref()))
            .collect();
        matched.sort_by(|a, b| (infos[*b].bump, infos[*b].room.nid).cmp(&(infos[*a].bump, infos[*a].room.nid)));
        let count = matched.len();
        let mut ops = Vec::new();
        let mut window = Vec::new();
        let mut parts: Vec<String> = vec![count.to_string()];
        for (start, end) in &l.ranges {
            let ids: &[usize] = if *start < count { &matched[*start..=(*end).min(count - 1)] } else { &[] };
            let room_ids: Vec<&str> = ids.iter().map(|i| infos[*i].m.room_id.as_str()).collect();
            parts.push(format!("{start}-{end}"));
            parts.extend(room_ids.iter().map(|r| r.to_string()));
            ops.push(json!({ "op": "SYNC", "range": [start, end], "room_ids": room_ids }));
            window.extend_from_slice(ids);
        }
        let d = digest(&parts);
        lists_changed |= prev_state.lists.get(name) != Some(&d);
        new_lists.insert(name.clone(), d);
        lists_out.insert(name.clone(), json!({ "count": count, "ops": ops }));
        for i in &window {
            merge(params.entry(*i).or_default(), &l.params);
        }
        windows.insert(name.as_str(), window);
    }
    let mut subscribed: Vec<usize> = Vec::new();
    for (room_id, p) in &req.subscriptions {
        // Rooms the user has no membership in are not theirs to see: left out, as Synapse does.
        if let Some(i) = by_id.get(room_id.as_str()) {
            merge(params.entry(*i).or_default(), p);
            subscribed.push(*i);
        }
    }

    // Rooms: what the connection has not received.
    let mut rooms_out = Map::new();
    let mut new_rooms: HashMap<i64, RoomSent> =
        prev_state.rooms.iter().filter(|(nid, _)| known.contains(nid)).map(|(k, v)| (*k, v.clone())).collect();
    let mut initial_rooms: HashSet<i64> = HashSet::new();
    let mut joined_sent: Vec<(String, i64)> = Vec::new();
    for (i, p) in &params {
        let info = &infos[*i];
        let sent = prev_state.rooms.get(&info.room.nid);
        let built = match info.m.membership.as_str() {
            "join" => joined_room(&b, info, p, sent).await?,
            "invite" | "knock" => invited_room(&b, info, p, sent).await?,
            _ => left_room(&b, info, p, sent).await?,
        };
        if let Some((v, s, initial)) = built {
            if initial {
                initial_rooms.insert(info.room.nid);
            }
            if info.m.membership == "join" {
                joined_sent.push((info.m.room_id.clone(), info.room.nid));
            }
            rooms_out.insert(info.m.room_id.clone(), Value::Object(v));
            new_rooms.insert(info.room.nid, s);
        }
    }
    // Unread counts from the push engine: one query for the joined rooms sent.
    if !joined_sent.is_empty() {
        let nids: Vec<i64> = joined_sent.iter().map(|(_, n)| *n).collect();
        let counts = storage::push::unread_counts_unthreaded(&state.db, user, &nids).await?;
        for (room_id, nid) in &joined_sent {
            let c = counts.get(nid);
            if let Some(Value::Object(r)) = rooms_out.get_mut(room_id) {
                r.insert("notification_count".into(), json!(c.map_or(0, |c| c.notification_count)));
                r.insert("highlight_count".into(), json!(c.map_or(0, |c| c.highlight_count)));
            }
        }
    }
    for v in rooms_out.values_mut() {
        if let Value::Object(r) = v {
            r.entry("notification_count").or_insert(json!(0));
            r.entry("highlight_count").or_insert(json!(0));
        }
    }

    // Extensions.
    let relevant = |scope: &Scope| -> Vec<usize> {
        let mut out: Vec<usize> = Vec::new();
        for (name, w) in &windows {
            if scope.covers_list(name) {
                out.extend(w);
            }
        }
        for i in &subscribed {
            if scope.covers_subscription(&infos[*i].m.room_id) {
                out.push(*i);
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    };
    let mut ext = Map::new();
    let mut ext_updates = false;
    if let Some((ext_since, limit)) = req.to_device {
        let (events, next_batch) =
            to_device(state, user, device, ext_since.unwrap_or(0), next.to_device, limit).await?;
        ext_updates |= !events.is_empty();
        ext.insert("to_device".into(), json!({ "next_batch": next_batch.to_string(), "events": events }));
    }
    if req.e2ee {
        let (changed, left) =
            if since.is_some() { b.device_lists(&memberships).await? } else { (Vec::new(), Vec::new()) };
        ext_updates |= !changed.is_empty() || !left.is_empty();
        let counts = crate::e2ee::key_counts(state, user, device).await?;
        ext.insert(
            "e2ee".into(),
            json!({
                "device_lists": { "changed": changed, "left": left },
                "device_one_time_keys_count": counts.0,
                "device_unused_fallback_key_types": counts.1,
            }),
        );
    }
    if let Some(scope) = &req.account_data {
        let rel: HashMap<&str, i64> =
            relevant(scope).into_iter().map(|i| (infos[i].m.room_id.as_str(), infos[i].room.nid)).collect();
        let ad_since = since.map_or(0, |s| s.account_data);
        let any_new = rel.values().any(|n| initial_rooms.contains(n));
        let head = state.sync.account_data_heads.get(&user.to_owned());
        let rows = if since.is_none() || any_new {
            storage::account_data::changed_since(&state.db, user, 0).await?
        } else if head > ad_since {
            storage::account_data::changed_since(&state.db, user, ad_since).await?
        } else {
            Vec::new()
        };
        let mut global = Vec::new();
        let mut per_room: Map<String, Value> = Map::new();
        for row in rows {
            if row.stream_ordering > next.account_data {
                continue;
            }
            let ev = json!({ "type": row.data_type, "content": row.content });
            let fresh = since.is_none() || row.stream_ordering > ad_since;
            match row.room_id {
                None if fresh => global.push(ev),
                Some(r) => {
                    if let Some(nid) = rel.get(r.as_str())
                        && (fresh || initial_rooms.contains(nid))
                        && let Some(a) = per_room.entry(r).or_insert_with(|| json!([])).as_array_mut()
                    {
                        a.push(ev);
                    }
                }
                _ => {}
            }
        }
        ext_updates |= !global.is_empty() || !per_room.is_empty();
        ext.insert("account_data".into(), json!({ "global": global, "rooms": per_room }));
    }
    if let Some(scope) = &req.receipts {
        let rel: Vec<&RoomInfo> =
            relevant(scope).into_iter().map(|i| &infos[i]).filter(|r| r.m.membership == "join").collect();
        let r_since = since.map_or(0, |s| s.receipts);
        let (fresh, moved): (Vec<i64>, Vec<i64>) = rel
            .iter()
            .map(|r| r.room.nid)
            .filter(|n| since.is_none() || initial_rooms.contains(n) || state.sync.receipt_heads.get(n) > r_since)
            .partition(|n| since.is_none() || initial_rooms.contains(n));
        let mut rows: HashMap<i64, Vec<storage::receipts::ReceiptRow>> = HashMap::new();
        for (nids, from) in [(fresh, 0), (moved, r_since)] {
            if nids.is_empty() {
                continue;
            }
            for r in storage::receipts::for_rooms_since(&state.db, &nids, user, from).await? {
                if r.stream_ordering <= next.receipts {
                    rows.entry(r.room_nid).or_default().push(r);
                }
            }
        }
        let mut out = Map::new();
        for r in rel {
            if let Some(list) = rows.get(&r.room.nid) {
                out.insert(r.m.room_id.clone(), super::receipt_event(list));
            }
        }
        ext_updates |= !out.is_empty();
        ext.insert("receipts".into(), json!({ "rooms": out }));
    }
    if let Some(scope) = &req.typing {
        let t_since = since.map_or(0, |s| s.typing);
        let mut out = Map::new();
        for i in relevant(scope) {
            let r = &infos[i];
            if r.m.membership != "join" {
                continue;
            }
            let fresh = since.is_none() || initial_rooms.contains(&r.room.nid);
            if !fresh && state.typing.room_position(r.room.nid) as i64 <= t_since {
                continue;
            }
            let users = state.typing.typing_users(r.room.nid);
            if fresh && users.is_empty() {
                continue;
            }
            out.insert(r.m.room_id.clone(), json!({ "type": "m.typing", "content": { "user_ids": users } }));
        }
        ext_updates |= !out.is_empty();
        ext.insert("typing".into(), json!({ "rooms": out }));
    }

    let has_updates = !rooms_out.is_empty() || lists_changed || ext_updates;
    let mut body = json!({ "lists": lists_out, "rooms": rooms_out });
    if !ext.is_empty() {
        body["extensions"] = Value::Object(ext);
    }
    Ok(Output { body, conn: ConnState { token: next.to_string(), rooms: new_rooms, lists: new_lists }, has_updates })
}

/// To-device messages of the device after `since` (those up to it are acknowledged, so
/// deleted), at most `limit`; and the `next_batch` to hand out. Without new messages for the
/// user, no query.
async fn to_device(
    state: &AppState,
    user: &str,
    device: &str,
    since: i64,
    upto: i64,
    limit: i64,
) -> ApiResult<(Vec<Value>, i64)> {
    let key = (user.to_owned(), device.to_owned());
    let unacked = state.sync.to_device_unacked.get(&key);
    if state.sync.to_device_heads.get(&user.to_owned()) <= since {
        if unacked.is_some_and(|x| since >= x) {
            storage::e2ee::take_to_device(&state.db, user, device, since, since, 0).await?;
            state.sync.to_device_unacked.invalidate(&key);
        }
        return Ok((Vec::new(), since));
    }
    let upto = upto.max(since);
    let rows = storage::e2ee::take_to_device(&state.db, user, device, since, upto, limit).await?;
    let next_batch = match rows.last() {
        Some(last) if rows.len() as i64 == limit => last.0,
        _ => upto,
    };
    match rows.last() {
        Some(last) => state.sync.to_device_unacked.insert(key, last.0),
        None => state.sync.to_device_unacked.invalidate(&key),
    }
    let events = rows
        .into_iter()
        .map(|(_, sender, kind, content)| json!({ "sender": sender, "type": kind, "content": content }));
    Ok((events.collect(), next_batch))
}

type Built = Option<(Map<String, Value>, RoomSent, bool)>;

/// A joined room: everything for a room new to the connection (or whose membership changed), the
/// events and state changes since it was sent otherwise, older events when the timeline limit
/// grew, the whole `required_state` when it changed; `None` when there is nothing new.
async fn joined_room(
    b: &Builder<'_>,
    info: &RoomInfo<'_>,
    p: &RoomParams,
    sent: Option<&RoomSent>,
) -> ApiResult<Built> {
    let (state, user, next) = (b.state, b.user, b.next);
    let m = info.m;
    let nid = info.room.nid;
    let rs_digest = required_state_digest(&p.required_state);
    let initial = sent.is_none_or(|s| s.m != m.stream_ordering);
    let expanded = sent.is_some_and(|s| !initial && s.t < p.timeline_limit);
    let rs_changed = sent.is_some_and(|s| !initial && s.r != rs_digest);
    let sent_upto = sent.map_or(0, |s| s.s);
    let events_changed = !initial && state.sync.room_heads.get(&nid) > sent_upto;
    let receipts_moved = !initial && b.since.is_some_and(|s| state.sync.receipt_heads.get(&nid) > s.receipts);
    if !(initial || expanded || rs_changed || events_changed || receipts_moved) {
        return Ok(None);
    }
    let entry = &info.entry;
    let cutoff = crate::rooms::retention::cached_cutoff(state, &entry.read());
    let viewer = Viewer::joined(user, m.stream_ordering).with_expiry(cutoff);
    let after = if initial || expanded { 0 } else { sent_upto };
    let timeline = if initial || expanded || events_changed {
        b.timeline(&info.room, entry, after, next.events, p.timeline_limit, &viewer).await?
    } else {
        super::Timeline { events: Vec::new(), limited: false }
    };
    let changes = if !initial && !rs_changed && events_changed {
        b.state_between(&info.room, entry, sent_upto, next.events + 1).await?
    } else {
        Vec::new()
    };
    let lazy = p.required_state.iter().any(|(t, k)| t == "m.room.member" && k == "$LAZY");
    let mut lazy_sent: HashSet<String> = match sent {
        Some(s) if !initial && !rs_changed => s.z.iter().cloned().collect(),
        _ => HashSet::new(),
    };
    let mut out = Map::new();
    let required_state: Vec<Arc<CachedEvent>> = {
        let e = entry.read();
        let current: Cow<StateMap> = if e.upto > next.events {
            e.state_before(next.events + 1).map(Cow::Owned).unwrap_or(Cow::Borrowed(&e.state))
        } else {
            Cow::Borrowed(&e.state)
        };
        let mut rs = if initial || rs_changed {
            select_state(&current, &p.required_state, user)
        } else {
            changes
                .into_iter()
                .filter(|ev| {
                    let (t, k) = (ev.row.event_type.as_str(), ev.row.state_key.as_deref().unwrap_or(""));
                    wanted(&p.required_state, t, k, user) || (lazy && t == "m.room.member" && lazy_sent.contains(k))
                })
                .collect()
        };
        if lazy {
            let have: HashSet<String> = rs
                .iter()
                .filter(|e| e.row.event_type == "m.room.member")
                .filter_map(|e| e.row.state_key.clone())
                .collect();
            for ev in &timeline.events {
                let who = ev.row.sender.as_str();
                if lazy_sent.contains(who) || have.contains(who) {
                    continue;
                }
                if let Some(member) = current.get(&("m.room.member".to_owned(), who.to_owned())) {
                    rs.push(member.clone());
                }
                lazy_sent.insert(who.to_owned());
            }
            for who in have {
                lazy_sent.insert(who);
            }
            rs.sort_by_key(|e| e.stream());
            rs.dedup_by_key(|e| e.stream());
        }
        if initial || rs_changed || rs.iter().any(|e| e.row.state_key.is_some()) {
            summary(&current, user, &mut out);
        }
        rs
    };
    if initial {
        out.insert("initial".into(), json!(true));
    }
    if expanded {
        out.insert("unstable_expanded_timeline".into(), json!(true));
    }
    let mut events: Vec<Value> = timeline.events.iter().map(|e| b.format(e)).collect();
    b.bundle(&info.room, entry, &viewer, &timeline.events, &mut events).await?;
    let num_live = if initial { 0 } else { timeline.events.iter().filter(|e| e.stream() > sent_upto).count() };
    let prev_batch = match timeline.events.first() {
        Some(e) => Some(topo_token(e.row.depth, e.stream())),
        None if initial => Some(next.to_string()),
        None => None,
    };
    out.insert("timeline".into(), Value::Array(events));
    out.insert("limited".into(), json!(timeline.limited));
    if let Some(pb) = prev_batch {
        out.insert("prev_batch".into(), json!(pb));
    }
    out.insert("num_live".into(), json!(num_live));
    if !required_state.is_empty() {
        out.insert("required_state".into(), Value::Array(required_state.iter().map(|e| b.format(e)).collect()));
    }
    out.insert("bump_stamp".into(), json!(info.bump.max(0)));
    let mut z: Vec<String> = lazy_sent.into_iter().collect();
    z.sort();
    z.truncate(conn::MAX_LAZY_REMEMBERED);
    let s = RoomSent { s: next.events, m: m.stream_ordering, t: p.timeline_limit, r: rs_digest, z };
    Ok(Some((out, s, initial)))
}

/// An invite (or knock): its stripped state, once per membership.
async fn invited_room(
    b: &Builder<'_>,
    info: &RoomInfo<'_>,
    p: &RoomParams,
    sent: Option<&RoomSent>,
) -> ApiResult<Built> {
    let m = info.m;
    if sent.is_some_and(|s| s.m == m.stream_ordering) {
        return Ok(None);
    }
    let mut out = Map::new();
    out.insert("initial".into(), json!(true));
    if m.membership == "invite" {
        out.insert("invite_state".into(), Value::Array(b.stripped(m).await?));
    }
    {
        let e = info.entry.read();
        if let Some(name) = e
            .state
            .get(&("m.room.name".to_owned(), String::new()))
            .and_then(|ev| ev.client["content"]["name"].as_str().map(str::to_owned))
        {
            out.insert("name".into(), json!(name));
        }
    }
    out.insert("bump_stamp".into(), json!(info.bump.max(0)));
    let s = RoomSent {
        s: m.stream_ordering,
        m: m.stream_ordering,
        t: p.timeline_limit,
        r: required_state_digest(&p.required_state),
        z: Vec::new(),
    };
    Ok(Some((out, s, true)))
}

/// A room the user left (or was kicked or banned from) since the connection last had it: the
/// timeline up to the departure (only the membership event when it did not end a join).
async fn left_room(b: &Builder<'_>, info: &RoomInfo<'_>, p: &RoomParams, sent: Option<&RoomSent>) -> ApiResult<Built> {
    let (state, user) = (b.state, b.user);
    let m = info.m;
    if sent.is_some_and(|s| s.m == m.stream_ordering) {
        return Ok(None);
    }
    let viewer = Viewer::load(state, &info.room, user).await?;
    let after = sent.map_or(0, |s| s.s);
    let timeline = if viewer.departed_from_join() == Some(m.stream_ordering) {
        b.timeline(&info.room, &info.entry, after, m.stream_ordering, p.timeline_limit.max(1), &viewer).await?
    } else {
        let rows = storage::events::by_nids(&state.db, &[m.event_nid]).await?;
        let events = rows.into_iter().map(|r| Arc::new(CachedEvent::new(&info.room, r, None))).collect();
        super::Timeline { events, limited: false }
    };
    let own: Vec<Value> = timeline
        .events
        .iter()
        .filter(|e| e.row.event_type == "m.room.member" && e.row.state_key.as_deref() == Some(user))
        .map(|e| b.format(e))
        .collect();
    let mut out = Map::new();
    if sent.is_none() {
        out.insert("initial".into(), json!(true));
    }
    let prev_batch = timeline.events.first().map(|e| topo_token(e.row.depth, e.stream()));
    out.insert("timeline".into(), Value::Array(timeline.events.iter().map(|e| b.format(e)).collect()));
    out.insert("limited".into(), json!(timeline.limited));
    if let Some(pb) = prev_batch {
        out.insert("prev_batch".into(), json!(pb));
    }
    out.insert("num_live".into(), json!(timeline.events.iter().filter(|e| e.stream() > after).count()));
    if !own.is_empty() {
        out.insert("required_state".into(), Value::Array(own));
    }
    out.insert("bump_stamp".into(), json!(info.bump.max(0)));
    let s = RoomSent {
        s: m.stream_ordering,
        m: m.stream_ordering,
        t: p.timeline_limit,
        r: required_state_digest(&p.required_state),
        z: Vec::new(),
    };
    Ok(Some((out, s, sent.is_none())))
}
