//! `/sync`: initial and incremental sync over the in-memory room cache ([`cache`]), with
//! long-polling woken by a per-user notifier.
//!
//! An incremental sync with nothing new costs no database query: the user's rooms come from the
//! cache, and each stream's per-key heads (room events, receipts, account data, presence) say
//! whether anything changed since the token. A sync that finds changes reads the cache, and the
//! database only for what the cache does not hold (old history, receipts, account data).

pub mod cache;
pub mod filter;
pub mod sliding;
pub mod token;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio::time::Instant;

use crate::api::client::rooms::token as topo_token;
use crate::error::{ApiResult, Error};
use crate::rooms::Room;
use crate::rooms::visibility::{Ignored, Viewer};
use crate::state::AppState;
use crate::storage::rooms::UserMembership;
use crate::storage::{self, now_ms};
use cache::{CachedEvent, RoomEntry, StateMap};
use filter::Filter;
use token::SyncToken;

/// Longest long-poll accepted.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(300);
/// Timeline events per room when the filter does not say.
const DEFAULT_TIMELINE_LIMIT: i64 = 10;
/// Activity within this window counts as "currently active".
const CURRENTLY_ACTIVE_MS: i64 = 5 * 60 * 1000;
/// Sync refreshes the user's presence in the database at most this often when it is unchanged.
const PRESENCE_REFRESH_MS: i64 = 60 * 1000;

pub struct SyncRequest {
    pub since: Option<String>,
    pub filter: Option<String>,
    pub full_state: bool,
    /// MSC4222: joined rooms carry `state_after` (the state at the end of the timeline) instead
    /// of `state` (the state at its start).
    pub use_state_after: bool,
    pub set_presence: Option<String>,
    pub timeout: Duration,
}

/// Reads the current positions of every stream at start-up, so that watermarks and the heads'
/// floors start where the database is.
pub async fn init(state: &AppState) -> anyhow::Result<()> {
    // Not the highest committed position: another instance may still commit a lower one.
    let events = crate::cluster::settled_event_position(&state.db).await?;
    let account_data = storage::account_data::current_stream_position(&state.db).await?;
    let receipts = storage::receipts::current_stream_position(&state.db).await?;
    let presence = storage::presence::current_stream_position(&state.db).await?;
    let to_device = storage::e2ee::to_device_position(&state.db).await?;
    let device_lists = storage::e2ee::device_list_position(&state.db).await?;
    let c = &state.sync;
    crate::state::advance(&state.to_device_stream, to_device);
    crate::state::advance(&state.device_list_stream, device_lists);
    c.to_device_heads.set_floor(to_device);
    c.device_list_heads.set_floor(device_lists);
    c.set_start(events);
    crate::state::advance(&state.event_stream, events);
    crate::state::advance(&state.account_data_stream, account_data);
    crate::state::advance(&state.receipt_stream, receipts);
    crate::state::advance(&state.presence_stream, presence);
    c.room_heads.set_floor(events);
    c.user_heads.set_floor(events);
    c.account_data_heads.set_floor(account_data);
    c.receipt_heads.set_floor(receipts);
    c.presence_heads.set_floor(presence);
    Ok(())
}

/// The positions every stream has safely reached.
pub fn current_token(state: &AppState) -> SyncToken {
    SyncToken {
        events: *state.event_stream.borrow(),
        account_data: *state.account_data_stream.borrow(),
        receipts: *state.receipt_stream.borrow(),
        presence: *state.presence_stream.borrow(),
        typing: state.typing.current_position() as i64,
        to_device: *state.to_device_stream.borrow(),
        device_lists: *state.device_list_stream.borrow(),
    }
}

/// Records an account data change of `user` (after commit) and wakes their syncs.
pub fn account_data_changed(state: &AppState, user: &str, pos: i64) {
    state.sync.account_data_heads.raise(&user.to_owned(), pos);
    crate::cluster::advance(state, &state.account_data_stream, pos);
    state.sync.wake_user(user);
}

/// Records a receipt in a room (after commit) and wakes the room's members.
pub fn receipt_changed(state: &AppState, room_nid: i64, pos: i64) {
    state.sync.receipt_heads.raise(&room_nid, pos);
    crate::cluster::advance(state, &state.receipt_stream, pos);
    state.sync.wake_room(room_nid);
}

/// Records a presence change of `user` (after commit) and wakes those who may see it: the
/// members of their joined rooms (everyone, when their rooms are not cached).
pub fn presence_changed(state: &AppState, user: &str, pos: i64) {
    state.sync.presence_heads.raise(&user.to_owned(), pos);
    crate::cluster::advance(state, &state.presence_stream, pos);
    presence_woken(state, user);
}

/// Wakes those who may see a presence change of `user`.
pub fn presence_woken(state: &AppState, user: &str) {
    state.sync.wake_user(user);
    match state.sync.cached_joined_rooms(user) {
        Some(rooms) => {
            for room in rooms {
                state.sync.wake_room(room);
            }
        }
        None => state.sync.wake_all(),
    }
}

/// Wakes the members of a room whose typing set changed.
pub fn typing_changed(state: &AppState, room_nid: i64) {
    state.sync.wake_room(room_nid);
}

pub async fn sync(state: &AppState, user: &str, device: &str, req: SyncRequest) -> ApiResult<Value> {
    let filter = Filter::resolve(state, user, req.filter.as_deref()).await?;
    let since = req.since.as_deref().map(SyncToken::parse).transpose()?;
    if let Some(p) = &req.set_presence
        && !["online", "offline", "unavailable"].contains(&p.as_str())
    {
        return Err(Error::invalid_param("set_presence must be online, offline or unavailable"));
    }
    set_presence(state, user, req.set_presence.as_deref().unwrap_or("online")).await?;
    let deadline = Instant::now() + req.timeout.min(MAX_TIMEOUT);
    let waiter = state.sync.waiter(user);
    // Read once per request, when a timeline is first built (usually from the push settings
    // cache: no query); a sync with nothing new never needs it.
    let ignored = tokio::sync::OnceCell::new();
    loop {
        // Registered before looking, so a change between the look and the wait still wakes us.
        let notified = waiter.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();

        let rooms = state.sync.user_rooms(state, user).await?;
        let membership_upto = rooms.read().upto;
        wait_for_events(state, membership_upto).await;
        let current = current_token(state);
        let since = since.map(|s| s.clamp_to(current));
        let next = since.map_or(current, |s| s.max(current));
        let memberships: Vec<UserMembership> = rooms.read().rooms.values().cloned().collect();
        let mut b = Builder {
            state,
            user,
            device,
            filter: &filter,
            ignored: &ignored,
            since,
            next,
            full_state: req.full_state,
            use_state_after: req.use_state_after,
        };
        let (body, has_content) = b.build(memberships).await?;
        if has_content || since.is_none() || req.full_state || Instant::now() >= deadline {
            return Ok(body);
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            // Timed out: one last look (cheap when nothing changed) answers with the latest token.
            continue;
        }
    }
}

/// Memberships are recorded at commit, the watermark a moment later, once every earlier writer
/// has committed too: give it that moment so a new room is not skipped.
async fn wait_for_events(state: &AppState, upto: i64) {
    if *state.event_stream.borrow() >= upto {
        return;
    }
    let mut rx = state.event_stream.subscribe();
    let _ = tokio::time::timeout(Duration::from_secs(2), rx.wait_for(|w| *w >= upto)).await;
}

/// Marks the user online/unavailable as their client syncs, writing only on a change (or at
/// most once a minute to refresh `last_active_ago`).
async fn set_presence(state: &AppState, user: &str, presence: &str) -> ApiResult<()> {
    if !state.config.presence.enabled || presence == "offline" {
        return Ok(());
    }
    let now = now_ms();
    if let Some((p, at)) = state.sync.presence_written.get(user)
        && p == presence
        && now - at < PRESENCE_REFRESH_MS
    {
        return Ok(());
    }
    let current = storage::presence::get(&state.db, user).await?;
    let status = current.as_ref().and_then(|c| c.status_msg.clone());
    let pos = storage::presence::set(&state.db, user, presence, status.as_deref()).await?;
    state.sync.presence_written.insert(user.to_owned(), (presence.to_owned(), now));
    if current.is_none_or(|c| c.state != presence) {
        presence_changed(state, user, pos);
    } else {
        // Only the activity time moved: recorded, but not worth waking anyone.
        state.sync.presence_heads.raise(&user.to_owned(), pos);
        crate::cluster::advance(state, &state.presence_stream, pos);
    }
    Ok(())
}

struct Builder<'a> {
    state: &'a AppState,
    user: &'a str,
    device: &'a str,
    filter: &'a Filter,
    /// Users whose (non-state) events the user does not receive.
    ignored: &'a tokio::sync::OnceCell<Ignored>,
    since: Option<SyncToken>,
    next: SyncToken,
    full_state: bool,
    use_state_after: bool,
}

/// A room's timeline for one response.
struct Timeline {
    events: Vec<Arc<CachedEvent>>,
    limited: bool,
}

impl Builder<'_> {
    async fn build(&mut self, memberships: Vec<UserMembership>) -> ApiResult<(Value, bool)> {
        let since_events = self.since.map_or(0, |s| s.events);
        let mut join = Map::new();
        let mut invite = Map::new();
        let mut knock = Map::new();
        let mut leave = Map::new();

        // Account data: one query, only if this user's changed since the token.
        let ad_since = self.since.map_or(0, |s| s.account_data);
        let mut global_ad = Vec::new();
        let mut room_ad: HashMap<String, Vec<Value>> = HashMap::new();
        if self.since.is_none() || self.state.sync.account_data_heads.get(&self.user.to_owned()) > ad_since {
            for row in storage::account_data::changed_since(&self.state.db, self.user, ad_since).await? {
                if row.stream_ordering > self.next.account_data {
                    continue;
                }
                let ev = json!({ "type": row.data_type, "content": row.content });
                match row.room_id {
                    None if self.filter.account_data.allows(&row.data_type, None) => global_ad.push(ev),
                    Some(r) if self.filter.room.account_data.allows_kind(&row.data_type, None) => {
                        room_ad.entry(r).or_default().push(ev)
                    }
                    _ => {}
                }
            }
        }

        // Receipts: one query for the rooms whose receipts moved.
        let joined: Vec<&UserMembership> = memberships
            .iter()
            .filter(|m| m.membership == "join" && m.stream_ordering <= self.next.events)
            .filter(|m| self.filter.room.allows_room(&m.room_id))
            .collect();
        let receipt_since = self.since.map_or(0, |s| s.receipts);
        let receipt_rooms: Vec<i64> = joined
            .iter()
            .filter(|m| {
                self.since.is_none()
                    || m.stream_ordering > since_events
                    || self.state.sync.receipt_heads.get(&m.room_nid) > receipt_since
            })
            .filter(|m| self.filter.room.ephemeral.allows_room(&m.room_id))
            .map(|m| m.room_nid)
            .collect();
        let mut receipts: HashMap<i64, Vec<storage::receipts::ReceiptRow>> = HashMap::new();
        if !receipt_rooms.is_empty() && self.filter.room.ephemeral.allows_kind("m.receipt", None) {
            // Newly joined rooms get all their receipts, the others what changed.
            let newly: HashSet<i64> = joined
                .iter()
                .filter(|m| self.since.is_none() || m.stream_ordering > since_events || self.full_state)
                .map(|m| m.room_nid)
                .collect();
            let (new_rooms, old_rooms): (Vec<i64>, Vec<i64>) = receipt_rooms.iter().partition(|r| newly.contains(r));
            for (rooms, from) in [(new_rooms, 0), (old_rooms, receipt_since)] {
                if rooms.is_empty() {
                    continue;
                }
                for r in storage::receipts::for_rooms_since(&self.state.db, &rooms, self.user, from).await? {
                    if r.stream_ordering <= self.next.receipts {
                        receipts.entry(r.room_nid).or_default().push(r);
                    }
                }
            }
        }

        // Rooms whose unread counts may have changed (new events, receipts, or new to the client).
        let mut count_rooms: Vec<(String, i64)> = Vec::new();
        for m in &memberships {
            if m.stream_ordering > self.next.events || !self.filter.room.allows_room(&m.room_id) {
                continue;
            }
            let changed = self.since.is_none() || m.stream_ordering > since_events;
            match m.membership.as_str() {
                "join" => {
                    // A receipt (the user's own, typically) can lower the counts.
                    let receipts_moved =
                        self.since.is_some() && self.state.sync.receipt_heads.get(&m.room_nid) > receipt_since;
                    match self.joined_room(m, room_ad.remove(&m.room_id), receipts.remove(&m.room_nid)).await? {
                        Some((v, events_or_new)) => {
                            join.insert(m.room_id.clone(), v);
                            if events_or_new || receipts_moved {
                                count_rooms.push((m.room_id.clone(), m.room_nid));
                            }
                        }
                        None if receipts_moved => {
                            join.insert(m.room_id.clone(), json!({}));
                            count_rooms.push((m.room_id.clone(), m.room_nid));
                        }
                        None => {}
                    }
                }
                "invite" if changed => {
                    invite.insert(m.room_id.clone(), json!({ "invite_state": { "events": self.stripped(m).await? } }));
                }
                "knock" if changed => {
                    knock.insert(m.room_id.clone(), json!({ "knock_state": { "events": self.stripped(m).await? } }));
                }
                "leave" | "ban"
                    if (self.since.is_some() && changed)
                        || (self.filter.room.include_leave && (changed || self.full_state)) =>
                {
                    if let Some(v) = self.left_room(m, room_ad.remove(&m.room_id)).await? {
                        leave.insert(m.room_id.clone(), v);
                    }
                }
                _ => {}
            }
        }

        self.unread_counts(&mut join, &count_rooms).await?;
        let presence = self.presence(&memberships).await?;
        let to_device = self.take_to_device().await?;
        let (changed, left) = self.device_lists(&memberships).await?;
        let has_content = !(join.is_empty()
            && invite.is_empty()
            && knock.is_empty()
            && leave.is_empty()
            && presence.is_empty()
            && global_ad.is_empty()
            && to_device.is_empty()
            && changed.is_empty()
            && left.is_empty());
        let mut body = json!({ "next_batch": self.next.to_string() });
        if !to_device.is_empty() {
            body["to_device"] = json!({ "events": to_device });
        }
        if !changed.is_empty() || !left.is_empty() {
            body["device_lists"] = json!({ "changed": changed, "left": left });
        }
        let counts = crate::e2ee::key_counts(self.state, self.user, self.device).await?;
        body["device_one_time_keys_count"] = json!(counts.0);
        body["device_unused_fallback_key_types"] = json!(counts.1);
        let mut rooms = Map::new();
        for (k, v) in [("join", join), ("invite", invite), ("knock", knock), ("leave", leave)] {
            if !v.is_empty() {
                rooms.insert(k.into(), Value::Object(v));
            }
        }
        if !rooms.is_empty() {
            body["rooms"] = Value::Object(rooms);
        }
        if !presence.is_empty() {
            body["presence"] = json!({ "events": presence });
        }
        if !global_ad.is_empty() {
            body["account_data"] = json!({ "events": global_ad });
        }
        Ok((body, has_content))
    }

    /// `unread_notifications` (and per thread, when the filter asks) for the given rooms: one
    /// query for all of them.
    async fn unread_counts(&self, join: &mut Map<String, Value>, rooms: &[(String, i64)]) -> ApiResult<()> {
        if rooms.is_empty() {
            return Ok(());
        }
        let nids: Vec<i64> = rooms.iter().map(|(_, n)| *n).collect();
        let threaded = self.filter.room.timeline.unread_thread_notifications;
        let counts = if threaded {
            storage::push::unread_counts(&self.state.db, self.user, &nids).await?
        } else {
            storage::push::unread_counts_unthreaded(&self.state.db, self.user, &nids).await?
        };
        for (room_id, nid) in rooms {
            let (Some(c), Some(Value::Object(section))) = (counts.get(nid), join.get_mut(room_id)) else { continue };
            section.insert(
                "unread_notifications".into(),
                json!({ "notification_count": c.notification_count, "highlight_count": c.highlight_count }),
            );
            if threaded {
                let threads: Map<String, Value> = c
                    .threads
                    .iter()
                    .map(|(t, (n, h))| (t.clone(), json!({ "notification_count": n, "highlight_count": h })))
                    .collect();
                section.insert("unread_thread_notifications".into(), Value::Object(threads));
            }
        }
        Ok(())
    }

    /// To-device messages for this device: those up to `since` are acknowledged (deleted), the
    /// next ones (at most [`crate::e2ee::TO_DEVICE_PER_SYNC`]) delivered. Without new messages for
    /// the user, no query.
    async fn take_to_device(&mut self) -> ApiResult<Vec<Value>> {
        let since = self.since.map_or(0, |s| s.to_device);
        let key = (self.user.to_owned(), self.device.to_owned());
        let unacked = self.state.sync.to_device_unacked.get(&key);
        let has_new = self.state.sync.to_device_heads.get(&self.user.to_owned()) > since;
        if !has_new {
            if unacked.is_some_and(|x| since >= x) {
                storage::e2ee::take_to_device(&self.state.db, self.user, self.device, since, since, 0).await?;
                self.state.sync.to_device_unacked.invalidate(&key);
            }
            return Ok(Vec::new());
        }
        let limit = crate::e2ee::TO_DEVICE_PER_SYNC;
        let rows =
            storage::e2ee::take_to_device(&self.state.db, self.user, self.device, since, self.next.to_device, limit)
                .await?;
        if let Some(last) = rows.last() {
            if rows.len() as i64 == limit {
                // More are waiting: the token stops after what this response carries.
                self.next.to_device = last.0.max(since);
            }
            self.state.sync.to_device_unacked.insert(key, last.0);
        } else {
            self.state.sync.to_device_unacked.invalidate(&key);
        }
        Ok(rows
            .into_iter()
            .map(|(_, sender, kind, content)| json!({ "sender": sender, "type": kind, "content": content }))
            .collect())
    }

    /// `device_lists` of an incremental sync: users sharing a room with the user whose devices or
    /// keys changed since the token, or who started sharing one (`changed`), and users who no
    /// longer share any (`left`).
    async fn device_lists(&self, memberships: &[UserMembership]) -> ApiResult<(Vec<String>, Vec<String>)> {
        let Some(since) = self.since else { return Ok((Vec::new(), Vec::new())) };
        let sync = &self.state.sync;
        let mut changed: HashSet<String> = HashSet::new();
        let mut left_candidates: HashSet<String> = HashSet::new();
        let mut co: Option<HashSet<String>> = None;
        if self.next.device_lists > since.device_lists {
            let members = crate::e2ee::co_members(self.state, self.user).await?;
            for u in &members {
                if sync.device_list_heads.get(u) > since.device_lists {
                    changed.insert(u.clone());
                }
            }
            co = Some(members);
        }
        for m in memberships {
            if m.stream_ordering > self.next.events {
                continue;
            }
            let newly = m.stream_ordering > since.events;
            let events_moved = sync.room_heads.get(&m.room_nid) > since.events;
            if !newly && !events_moved {
                continue;
            }
            let (_, entry) = self.room_of(m).await?;
            let e = entry.read();
            match (m.membership.as_str(), newly) {
                ("join", true) => changed.extend(RoomEntry::members_of(&e.state, "join").map(str::to_owned)),
                ("join", false) => match e.events_in(since.events, self.next.events) {
                    Some(evs) => {
                        for ev in evs.iter().filter(|ev| ev.row.event_type == "m.room.member") {
                            let who = ev.row.state_key.clone().unwrap_or_default();
                            match ev.membership() {
                                Some("join") if ev.replaces.as_ref().and_then(|p| p.membership()) != Some("join") => {
                                    changed.insert(who);
                                }
                                Some("leave" | "ban") => {
                                    left_candidates.insert(who);
                                }
                                _ => {}
                            }
                        }
                    }
                    // Too much happened to tell: everyone present may have changed.
                    None => changed.extend(RoomEntry::members_of(&e.state, "join").map(str::to_owned)),
                },
                ("leave" | "ban", true) => {
                    left_candidates.extend(RoomEntry::members_of(&e.state, "join").map(str::to_owned))
                }
                _ => {}
            }
        }
        if changed.is_empty() && left_candidates.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let co = match co {
            Some(c) => c,
            None => crate::e2ee::co_members(self.state, self.user).await?,
        };
        let mut left: Vec<String> = left_candidates.into_iter().filter(|u| !co.contains(u) && u != self.user).collect();
        let mut changed: Vec<String> = changed.into_iter().filter(|u| co.contains(u)).collect();
        changed.sort();
        left.sort();
        Ok((changed, left))
    }

    /// Bundled aggregations (`unsigned.m.relations`: latest edit, thread summary, references) for
    /// timeline events. Relations always come after their target, so for events inside the cached
    /// window every relation is in the cache too and no query is needed; older events (from the
    /// database path) are bundled with one query.
    async fn bundle(
        &self,
        room: &Room,
        entry: &Arc<parking_lot::RwLock<RoomEntry>>,
        who: &Viewer,
        timeline: &[Arc<CachedEvent>],
        events: &mut [Value],
    ) -> ApiResult<()> {
        if self.filter.event_format.as_deref() == Some("federation") || self.filter.event_fields.is_some() {
            return Ok(());
        }
        let viewer = (self.user, self.device);
        let (cached, older): (Vec<usize>, Vec<usize>) = {
            let e = entry.read();
            (0..timeline.len()).partition(|i| timeline[*i].stream() > e.complete_from)
        };
        if !cached.is_empty() {
            let e = entry.read();
            let targets: HashSet<&str> = cached.iter().map(|i| timeline[*i].row.event_id.as_str()).collect();
            let hidden = who.hidden_in_cache(&e, e.complete_from);
            let mut rels: HashMap<&str, Vec<(&str, &Arc<CachedEvent>)>> = HashMap::new();
            for ev in &e.timeline {
                if ev.row.redacted_by.is_some()
                    || who.expired(&ev.row)
                    || hidden.as_ref().is_some_and(|h| h.contains(&ev.stream()))
                {
                    continue;
                }
                let r = &ev.client["content"]["m.relates_to"];
                if let (Some(t), Some(id)) = (r["rel_type"].as_str(), r["event_id"].as_str())
                    && targets.contains(id)
                {
                    rels.entry(id).or_default().push((t, ev));
                }
            }
            for i in cached {
                let target = &timeline[i];
                let Some(list) = rels.get(target.row.event_id.as_str()) else { continue };
                let mut agg = Map::new();
                if let Some((_, latest)) = list
                    .iter()
                    .filter(|(t, r)| {
                        *t == "m.replace"
                            && r.row.sender == target.row.sender
                            && r.row.event_type == target.row.event_type
                    })
                    .max_by(|a, b| {
                        (a.1.row.origin_server_ts, &a.1.row.event_id)
                            .cmp(&(b.1.row.origin_server_ts, &b.1.row.event_id))
                    })
                {
                    agg.insert("m.replace".into(), latest.to_client(Some(viewer)));
                }
                let thread: Vec<&Arc<CachedEvent>> =
                    list.iter().filter(|(t, _)| *t == "m.thread").map(|(_, r)| *r).collect();
                if let Some(latest) = thread.last() {
                    let participated =
                        target.row.sender == self.user || thread.iter().any(|r| r.row.sender == self.user);
                    agg.insert(
                        "m.thread".into(),
                        json!({ "latest_event": latest.to_client(Some(viewer)), "count": thread.len(), "current_user_participated": participated }),
                    );
                }
                let refs: Vec<Value> = list
                    .iter()
                    .filter(|(t, _)| *t == "m.reference")
                    .map(|(_, r)| json!({ "event_id": r.row.event_id }))
                    .collect();
                if !refs.is_empty() {
                    agg.insert("m.reference".into(), json!({ "chunk": refs }));
                }
                if !agg.is_empty() {
                    events[i]["unsigned"]["m.relations"] = Value::Object(agg);
                }
            }
        }
        if !older.is_empty() {
            let mut subset: Vec<Value> = older.iter().map(|i| events[*i].clone()).collect();
            crate::rooms::relations::bundle(self.state, room, viewer, who, &mut subset).await?;
            for (i, v) in older.into_iter().zip(subset) {
                events[i] = v;
            }
        }
        Ok(())
    }

    fn viewer(&self) -> Option<(&str, &str)> {
        Some((self.user, self.device))
    }

    fn format(&self, ev: &CachedEvent) -> Value {
        let v = if self.filter.event_format.as_deref() == Some("federation") {
            serde_json::from_str(&ev.row.json).unwrap_or(Value::Null)
        } else {
            ev.to_client(self.viewer())
        };
        self.filter.project(v)
    }

    async fn room_of(&self, m: &UserMembership) -> ApiResult<(Room, Arc<parking_lot::RwLock<RoomEntry>>)> {
        let room = Room::load(self.state, &m.room_id).await?;
        let entry = self.state.sync.room(self.state, &room).await?;
        Ok((room, entry))
    }

    /// A joined room's section, or `None` if nothing changed for an incremental sync.
    async fn joined_room(
        &self,
        m: &UserMembership,
        account_data: Option<Vec<Value>>,
        receipts: Option<Vec<storage::receipts::ReceiptRow>>,
    ) -> ApiResult<Option<(Value, bool)>> {
        let since_events = self.since.map_or(0, |s| s.events);
        // A room new to this client (initial sync, or joined since the token) gets its recent
        // history and full state; `full_state` asks for the full state with the normal timeline.
        let initial = self.since.is_none() || m.stream_ordering > since_events;
        let full = initial || self.full_state;
        let typing_since = self.since.map_or(0, |s| s.typing);
        let typing_changed = self.state.typing.room_position(m.room_nid) as i64 > typing_since;
        let events_changed = self.state.sync.room_heads.get(&m.room_nid) > since_events;
        if !full && !events_changed && !typing_changed && account_data.is_none() && receipts.is_none() {
            return Ok(None);
        }
        let (room, entry) = self.room_of(m).await?;
        let upto = self.next.events;
        let limit = self.filter.room.timeline.limit(DEFAULT_TIMELINE_LIMIT);
        let mut out = Map::new();

        // Joined since their membership event: everything after it is visible without looking;
        // a timeline reaching back before it (a new room for the client) is checked per event.
        let expired_before = crate::rooms::retention::cached_cutoff(self.state, &entry.read());
        let viewer = Viewer::joined(self.user, m.stream_ordering).with_expiry(expired_before);
        let timeline = if initial {
            self.timeline(&room, &entry, 0, upto, limit, &viewer).await?
        } else if events_changed || full {
            self.timeline(&room, &entry, since_events, upto, limit, &viewer).await?
        } else {
            Timeline { events: Vec::new(), limited: false }
        };
        let start = timeline.events.first().map_or(upto + 1, |e| e.stream());
        let state_events = if self.use_state_after {
            self.state_after(&room, &entry, full, since_events, upto, &timeline).await?
        } else if full {
            let state = self.state_before(&room, &entry, start, timeline.events.first()).await?;
            self.lazy_filter(&room, &entry, state, &timeline, true)
        } else if timeline.limited {
            let gap = self.state_between(&room, &entry, since_events, start).await?;
            self.lazy_filter(&room, &entry, gap, &timeline, false)
        } else {
            self.lazy_filter(&room, &entry, Vec::new(), &timeline, false)
        };
        let members_changed =
            full || timeline.events.iter().chain(state_events.iter()).any(|e| e.row.event_type == "m.room.member");
        let initial = full;

        if initial || !timeline.events.is_empty() {
            let prev_batch = match timeline.events.first() {
                Some(e) => topo_token(e.row.depth, e.stream()),
                None => self.next.to_string(),
            };
            let mut events: Vec<Value> = timeline.events.iter().map(|e| self.format(e)).collect();
            self.bundle(&room, &entry, &viewer, &timeline.events, &mut events).await?;
            out.insert(
                "timeline".into(),
                json!({ "events": events, "limited": timeline.limited, "prev_batch": prev_batch }),
            );
        }
        let state_key = if self.use_state_after { "state_after" } else { "state" };
        if initial || !state_events.is_empty() {
            out.insert(
                state_key.into(),
                json!({ "events": state_events.iter().map(|e| self.format(e)).collect::<Vec<_>>() }),
            );
        }
        if members_changed {
            out.insert("summary".into(), summary(&entry.read().state, self.user));
        }

        let mut ephemeral = Vec::new();
        let eph = &self.filter.room.ephemeral;
        if eph.allows_room(&m.room_id) && eph.allows_kind("m.typing", None) && (initial || typing_changed) {
            let users = self.state.typing.typing_users(m.room_nid);
            if !users.is_empty() || !initial {
                ephemeral.push(json!({ "type": "m.typing", "content": { "user_ids": users } }));
            }
        }
        if let Some(rows) = receipts
            && !rows.is_empty()
        {
            ephemeral.push(receipt_event(&rows));
        }
        if !ephemeral.is_empty() {
            out.insert("ephemeral".into(), json!({ "events": ephemeral }));
        }
        if let Some(ad) = account_data {
            out.insert("account_data".into(), json!({ "events": ad }));
        }
        if out.is_empty() {
            return Ok(None);
        }
        if initial {
            for k in ["timeline", state_key, "ephemeral", "account_data"] {
                out.entry(k).or_insert_with(|| json!({ "events": [] }));
            }
        }
        Ok(Some((Value::Object(out), initial || !timeline.events.is_empty())))
    }

    /// A room the user left (or was kicked or banned from): the timeline up to their departure.
    async fn left_room(&self, m: &UserMembership, account_data: Option<Vec<Value>>) -> ApiResult<Option<Value>> {
        let (room, entry) = self.room_of(m).await?;
        let since_events = self.since.map_or(0, |s| s.events);
        let limit = self.filter.room.timeline.limit(DEFAULT_TIMELINE_LIMIT);
        // What they could see: the timeline up to their departure, per event; nothing of the
        // room's history if the departure did not end a membership `join` (a rejected or
        // withdrawn invite, a withdrawn knock, a ban without joining): only the membership event.
        let viewer = Viewer::load(self.state, &room, self.user).await?;
        let was_joined = viewer.departed_from_join() == Some(m.stream_ordering);
        let incremental = self.since.is_some() && !self.full_state && since_events > 0;
        let (timeline, state) = if !was_joined {
            let ev = storage::events::by_nids(&self.state.db, &[m.event_nid]).await?;
            let events = ev.into_iter().map(|r| Arc::new(CachedEvent::new(&room, r, None))).collect();
            (Timeline { events, limited: false }, Vec::new())
        } else if incremental {
            let timeline = self.timeline(&room, &entry, since_events, m.stream_ordering, limit, &viewer).await?;
            let state = if timeline.limited {
                let before = timeline.events.first().map_or(m.stream_ordering + 1, |e| e.stream());
                self.state_between(&room, &entry, since_events, before).await?
            } else {
                Vec::new()
            };
            (timeline, state)
        } else {
            let after = 0;
            let timeline = self.timeline(&room, &entry, after, m.stream_ordering, limit, &viewer).await?;
            let start = timeline.events.first().map_or(m.stream_ordering + 1, |e| e.stream());
            let state = self.state_before(&room, &entry, start, timeline.events.first()).await?;
            (timeline, state)
        };
        let prev_batch = match timeline.events.first() {
            Some(e) => topo_token(e.row.depth, e.stream()),
            None => self.next.to_string(),
        };
        Ok(Some(json!({
            "timeline": {
                "events": timeline.events.iter().map(|e| self.format(e)).collect::<Vec<_>>(),
                "limited": timeline.limited,
                "prev_batch": prev_batch,
            },
            "state": { "events": state.iter().map(|e| self.format(e)).collect::<Vec<_>>() },
            "account_data": { "events": account_data.unwrap_or_default() },
        })))
    }

    /// The stripped state shown with an invite or a knock.
    async fn stripped(&self, m: &UserMembership) -> ApiResult<Vec<Value>> {
        let sent = match m.membership.as_str() {
            "invite" | "knock" => storage::remote::invite_room_state(&self.state.db, m.room_nid, self.user).await?,
            _ => None,
        };
        let (_, entry) = self.room_of(m).await?;
        let e = entry.read();
        let mut out = Vec::new();
        for kind in [
            "m.room.create",
            "m.room.name",
            "m.room.avatar",
            "m.room.topic",
            "m.room.join_rules",
            "m.room.canonical_alias",
            "m.room.encryption",
        ] {
            if let Some(ev) = e.state.get(&(kind.to_owned(), String::new())) {
                out.push(stripped_event(ev));
            }
        }
        if out.is_empty()
            && let Some(sent) = &sent
        {
            // An invite from another server into a room this server is not in: the stripped
            // state that server sent is all there is.
            out.extend(sent.as_array().cloned().unwrap_or_default().into_iter().filter(|v| v.is_object()));
        }
        // The membership event itself (and who sent it, for "X invited you").
        if let Some(ev) = e.state.get(&("m.room.member".to_owned(), self.user.to_owned())) {
            if ev.row.sender != self.user
                && let Some(inviter) = e.state.get(&("m.room.member".to_owned(), ev.row.sender.clone()))
            {
                out.push(stripped_event(inviter));
            }
            out.push(stripped_event(ev));
        }
        Ok(out)
    }

    /// The last `limit` events in `(after, upto]` that the viewer may see (history visibility),
    /// the filter accepts and are not from ignored users; from the cache when it holds enough of
    /// them, else from the database.
    async fn timeline(
        &self,
        room: &Room,
        entry: &Arc<parking_lot::RwLock<RoomEntry>>,
        after: i64,
        upto: i64,
        limit: usize,
        viewer: &Viewer,
    ) -> ApiResult<Timeline> {
        let f = &self.filter.room.timeline;
        let ignored = self.ignored.get_or_try_init(|| Ignored::load(self.state, self.user)).await?;
        {
            let e = entry.read();
            let from = after.max(e.complete_from);
            // Usually `None`: every event of the window is inside the viewer's join period.
            let hidden = viewer.hidden_in_cache(&e, from);
            let mut candidates: Vec<Arc<CachedEvent>> = e
                .timeline
                .iter()
                .filter(|ev| ev.stream() > from && ev.stream() <= upto && f.allows(ev))
                .filter(|ev| !ignored.hides(&ev.row) && !viewer.expired(&ev.row))
                .filter(|ev| hidden.as_ref().is_none_or(|h| !h.contains(&ev.stream())))
                .cloned()
                .collect();
            if candidates.len() > limit {
                let cut = candidates.len() - limit;
                candidates.drain(..cut);
                return Ok(Timeline { events: candidates, limited: true });
            }
            if after >= e.complete_from {
                return Ok(Timeline { events: candidates, limited: false });
            }
        }
        // Older than the cache: read backwards from the database (bounded).
        let mut events = Vec::new();
        let mut cursor = upto;
        let mut exhausted = false;
        for _ in 0..10 {
            let rows = storage::events::latest_in_range(&self.state.db, room.nid, after, cursor, 200).await?;
            let n = rows.len();
            let visible = viewer.visible(self.state, &rows).await?;
            for (row, visible) in rows.into_iter().zip(visible) {
                cursor = row.stream_ordering - 1;
                if !visible || ignored.hides(&row) {
                    continue;
                }
                let ev = CachedEvent::new(room, row, None);
                if f.allows(&ev) {
                    events.push(Arc::new(ev));
                    if events.len() > limit {
                        break;
                    }
                }
            }
            if n < 200 {
                exhausted = true;
                break;
            }
            if events.len() > limit {
                break;
            }
        }
        let limited = events.len() > limit || !exhausted;
        events.truncate(limit);
        events.reverse();
        Ok(Timeline { events, limited })
    }

    /// The state before stream position `at` (the start of a timeline), after the state filter.
    async fn state_before(
        &self,
        room: &Room,
        entry: &Arc<parking_lot::RwLock<RoomEntry>>,
        at: i64,
        first: Option<&Arc<CachedEvent>>,
    ) -> ApiResult<Vec<Arc<CachedEvent>>> {
        let cached = entry.read().state_before(at);
        let mut events: Vec<Arc<CachedEvent>> = match cached {
            Some(s) => s.into_values().collect(),
            None => {
                let group = first.and_then(|f| f.row.state_before);
                match group {
                    Some(g) => storage::rooms::state_events_of_group(&self.state.db, g)
                        .await?
                        .into_iter()
                        .map(|r| Arc::new(CachedEvent::new(room, r, None)))
                        .collect(),
                    None => Vec::new(),
                }
            }
        };
        let f = &self.filter.room.state;
        events.retain(|e| f.allows(e));
        events.sort_by_key(|e| e.stream());
        Ok(events)
    }

    /// MSC4222's `state_after`: the state at the end of the timeline (`upto`): all of it for a
    /// room new to the client (or `full_state`), else every state change in `(since, upto]`,
    /// including those of the timeline itself. From the cache whenever it covers the window.
    async fn state_after(
        &self,
        room: &Room,
        entry: &Arc<parking_lot::RwLock<RoomEntry>>,
        full: bool,
        since: i64,
        upto: i64,
        timeline: &Timeline,
    ) -> ApiResult<Vec<Arc<CachedEvent>>> {
        let events = if full {
            let cached = entry.read().state_before(upto + 1);
            let mut events: Vec<Arc<CachedEvent>> = match cached {
                Some(s) => s.into_values().collect(),
                None => {
                    let rows = match timeline.events.last().and_then(|e| e.row.state_after) {
                        Some(g) => storage::rooms::state_events_of_group(&self.state.db, g).await?,
                        None => storage::rooms::current_state(&self.state.db, room.nid).await?,
                    };
                    rows.into_iter().map(|r| Arc::new(CachedEvent::new(room, r, None))).collect()
                }
            };
            let f = &self.filter.room.state;
            events.retain(|e| f.allows(e));
            events.sort_by_key(|e| e.stream());
            events
        } else {
            self.state_between(room, entry, since, upto + 1).await?
        };
        // Lazy loading decides which member events go out, except the timeline's own state
        // events: they are state changes the client must apply.
        let in_timeline: HashSet<&str> = timeline.events.iter().map(|e| e.row.event_id.as_str()).collect();
        let (own, rest): (Vec<_>, Vec<_>) =
            events.into_iter().partition(|e| in_timeline.contains(e.row.event_id.as_str()));
        let mut out = self.lazy_filter(room, entry, rest, timeline, full);
        out.extend(own);
        out.sort_by_key(|e| e.stream());
        Ok(out)
    }

    /// The latest state event per key in `(after, before)`: what a gappy timeline skipped.
    async fn state_between(
        &self,
        room: &Room,
        entry: &Arc<parking_lot::RwLock<RoomEntry>>,
        after: i64,
        before: i64,
    ) -> ApiResult<Vec<Arc<CachedEvent>>> {
        let cached = entry.read().events_in(after, before - 1);
        let mut events: Vec<Arc<CachedEvent>> = match cached {
            Some(evs) => {
                let mut latest: HashMap<(String, String), Arc<CachedEvent>> = HashMap::new();
                for ev in evs {
                    if let Some(k) = ev.key() {
                        latest.insert(k, ev);
                    }
                }
                latest.into_values().collect()
            }
            None => storage::events::state_changes_between(&self.state.db, room.nid, after, before)
                .await?
                .into_iter()
                .map(|r| Arc::new(CachedEvent::new(room, r, None)))
                .collect(),
        };
        let f = &self.filter.room.state;
        events.retain(|e| f.allows(e));
        events.sort_by_key(|e| e.stream());
        Ok(events)
    }

    /// Lazy-loading members: keeps only the member events of the timeline's senders (and the
    /// user's own on an initial sync), adding missing ones from the current state, and, unless
    /// redundant members are asked for, not those this device already has.
    fn lazy_filter(
        &self,
        room: &Room,
        entry: &Arc<parking_lot::RwLock<RoomEntry>>,
        state: Vec<Arc<CachedEvent>>,
        timeline: &Timeline,
        initial: bool,
    ) -> Vec<Arc<CachedEvent>> {
        let f = &self.filter.room.state;
        if !f.lazy_load_members {
            return state;
        }
        let mut wanted: HashSet<&str> = timeline.events.iter().map(|e| e.row.sender.as_str()).collect();
        if initial {
            wanted.insert(self.user);
        }
        // Senders whose member event is in the timeline already have it.
        for e in &timeline.events {
            if e.row.event_type == "m.room.member"
                && let Some(k) = &e.row.state_key
            {
                wanted.remove(k.as_str());
            }
        }
        let key = (self.user.to_owned(), self.device.to_owned(), room.nid);
        let sent = self.state.sync.lazy_sent.get_with(key, Default::default);
        let mut sent = sent.lock();
        if initial {
            sent.clear();
        }
        let mut out: Vec<Arc<CachedEvent>> = Vec::new();
        let mut have: HashSet<String> = HashSet::new();
        for e in state {
            if e.row.event_type != "m.room.member" {
                out.push(e);
                continue;
            }
            let who = e.row.state_key.clone().unwrap_or_default();
            if wanted.contains(who.as_str()) && (f.include_redundant_members || !sent.contains(&who)) {
                have.insert(who.clone());
                out.push(e);
            }
        }
        // Senders whose member event is not in the delta: their current one.
        {
            let e = entry.read();
            for who in wanted {
                if have.contains(who) || (!f.include_redundant_members && sent.contains(who)) {
                    continue;
                }
                if let Some(ev) = e.state.get(&("m.room.member".to_owned(), who.to_owned())) {
                    out.push(ev.clone());
                    have.insert(who.to_owned());
                }
            }
        }
        sent.extend(have);
        for e in &timeline.events {
            if e.row.event_type == "m.room.member"
                && let Some(k) = &e.row.state_key
            {
                sent.insert(k.clone());
            }
        }
        out.sort_by_key(|e| e.stream());
        out
    }

    /// Presence of the users the syncing user shares a joined room with (and their own).
    async fn presence(&self, memberships: &[UserMembership]) -> ApiResult<Vec<Value>> {
        if !self.state.config.presence.enabled {
            return Ok(Vec::new());
        }
        let since = self.since.map_or(0, |s| s.presence);
        if self.since.is_some() && self.next.presence <= since {
            return Ok(Vec::new());
        }
        let mut users: HashSet<String> = HashSet::new();
        users.insert(self.user.to_owned());
        for m in memberships.iter().filter(|m| m.membership == "join") {
            let (_, entry) = self.room_of(m).await?;
            let e = entry.read();
            users.extend(RoomEntry::members_of(&e.state, "join").map(str::to_owned));
        }
        let heads = &self.state.sync.presence_heads;
        let users: Vec<String> = users.into_iter().filter(|u| self.since.is_none() || heads.get(u) > since).collect();
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let pf = &self.filter.presence;
        if !pf.allows("m.presence", None) {
            return Ok(Vec::new());
        }
        let now = now_ms();
        let mut out = Vec::new();
        for p in storage::presence::changed_since(&self.state.db, &users, since).await? {
            if p.stream_ordering > self.next.presence || !pf.allows("m.presence", Some(&p.user_id)) {
                continue;
            }
            let ago = (now - p.last_active_ts).max(0);
            let mut content = json!({
                "presence": p.state,
                "last_active_ago": ago,
                "currently_active": p.state == "online" && ago < CURRENTLY_ACTIVE_MS,
            });
            if let Some(msg) = p.status_msg {
                content["status_msg"] = json!(msg);
            }
            out.push(json!({ "type": "m.presence", "sender": p.user_id, "content": content }));
        }
        out.truncate(pf.limit(1000).max(1));
        Ok(out)
    }
}

fn stripped_event(ev: &CachedEvent) -> Value {
    json!({
        "type": ev.row.event_type,
        "state_key": ev.row.state_key,
        "sender": ev.row.sender,
        "content": ev.client["content"],
    })
}

/// The room summary: heroes and member counts.
fn summary(state: &StateMap, user: &str) -> Value {
    let mut members: Vec<(&str, &str, i64)> = state
        .iter()
        .filter(|((t, _), _)| t == "m.room.member")
        .map(|((_, k), e)| (k.as_str(), e.membership().unwrap_or("leave"), e.stream()))
        .collect();
    members.sort_by_key(|(_, _, s)| *s);
    let joined = members.iter().filter(|(_, m, _)| *m == "join").count();
    let invited = members.iter().filter(|(_, m, _)| *m == "invite").count();
    let mut heroes: Vec<&str> = members
        .iter()
        .filter(|(u, m, _)| *u != user && matches!(*m, "join" | "invite"))
        .map(|(u, _, _)| *u)
        .take(5)
        .collect();
    if heroes.is_empty() {
        heroes = members.iter().filter(|(u, _, _)| *u != user).map(|(u, _, _)| *u).take(5).collect();
    }
    json!({ "m.heroes": heroes, "m.joined_member_count": joined, "m.invited_member_count": invited })
}

/// Receipts of one room as an `m.receipt` event.
fn receipt_event(rows: &[storage::receipts::ReceiptRow]) -> Value {
    let mut content = Map::new();
    for r in rows {
        let mut receipt = json!({ "ts": r.ts });
        if let Some(t) = &r.thread_id {
            receipt["thread_id"] = json!(t);
        }
        let by_event = content.entry(r.event_id.clone()).or_insert_with(|| json!({}));
        by_event[&r.receipt_type][&r.user_id] = receipt;
    }
    json!({ "type": "m.receipt", "content": content })
}
