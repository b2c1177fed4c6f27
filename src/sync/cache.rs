//! The in-memory cache behind `/sync`: per room, the recent timeline (already formatted for
//! clients), the current state and membership; per user, their rooms and memberships. Entries are
//! updated by the write pipeline after each commit ([`SyncService::committed`]) and loaded lazily
//! from PostgreSQL on a miss. See ARCHITECTURE.md, "The sync cache", for the invariants.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use serde_json::{Value, json};

use crate::error::ApiResult;
use crate::rooms::{Appended, Room, client};
use crate::state::AppState;
use crate::storage::events::EventRow;
use crate::storage::{self, now_ms};

/// Most timeline events kept per room.
pub const TIMELINE_CAP: usize = 100;

/// One event as sync serves it.
#[derive(Debug)]
pub struct CachedEvent {
    pub row: EventRow,
    /// The client format without `unsigned` (redacted if the event was redacted).
    pub client: Value,
    pub has_url: bool,
    /// For a state event: the event it replaced in the room state, if any.
    pub replaces: Option<Arc<CachedEvent>>,
}

impl CachedEvent {
    pub fn new(room: &Room, row: EventRow, replaces: Option<Arc<CachedEvent>>) -> Self {
        let mut client = client::format(room, &row, None);
        if let Some(o) = client.as_object_mut() {
            o.remove("unsigned");
        }
        let has_url = client["content"]["url"].is_string();
        Self { row, client, has_url, replaces }
    }

    pub fn stream(&self) -> i64 {
        self.row.stream_ordering
    }

    pub fn key(&self) -> Option<(String, String)> {
        self.row.state_key.as_ref().map(|k| (self.row.event_type.clone(), k.clone()))
    }

    pub fn membership(&self) -> Option<&str> {
        self.client["content"]["membership"].as_str()
    }

    /// The event for a client: `viewer` (user, device) sees its own `transaction_id`.
    pub fn to_client(&self, viewer: Option<(&str, &str)>) -> Value {
        let mut ev = self.client.clone();
        let mut unsigned = json!({ "age": (now_ms() - self.row.origin_server_ts).max(0) });
        if let (Some((user, device)), Some(d), Some(t)) = (viewer, &self.row.txn_device, &self.row.txn_id)
            && user == self.row.sender
            && device == d
        {
            unsigned["transaction_id"] = json!(t);
        }
        if let Some(by) = &self.row.redacted_by {
            unsigned["redacted_because"] = json!({ "event_id": by, "type": "m.room.redaction" });
        }
        if let Some(prev) = &self.replaces {
            unsigned["replaces_state"] = json!(prev.row.event_id);
            unsigned["prev_content"] = prev.client["content"].clone();
            unsigned["prev_sender"] = json!(prev.row.sender);
        }
        ev["unsigned"] = unsigned;
        ev
    }

    fn weight(&self) -> usize {
        // The stored JSON plus its parsed copy, roughly.
        3 * self.row.json.len() + 256
    }
}

/// One-time key counts per algorithm and unused fallback key types of a device.
pub type KeyCounts = Arc<(HashMap<String, i64>, Vec<String>)>;

/// Members whose member event a device already received in a room.
pub type SentMembers = Arc<Mutex<std::collections::HashSet<String>>>;

pub type StateMap = HashMap<(String, String), Arc<CachedEvent>>;

/// A room's recent history and current state.
pub struct RoomEntry {
    pub room: Room,
    /// Every event of the room with a stream position up to here has been applied.
    pub upto: i64,
    /// The timeline holds every event of the room with a stream position above this.
    pub complete_from: i64,
    pub timeline: VecDeque<Arc<CachedEvent>>,
    /// The current state (as of `upto`).
    pub state: StateMap,
    size: usize,
}

impl RoomEntry {
    fn empty(room: Room) -> Self {
        Self { room, upto: 0, complete_from: 0, timeline: VecDeque::new(), state: HashMap::new(), size: 512 }
    }

    /// Applies one event (events must come in stream order; older ones are ignored).
    fn apply(&mut self, row: EventRow) {
        if row.stream_ordering <= self.upto {
            return;
        }
        self.upto = row.stream_ordering;
        if let Some(target) = redaction_target(&row) {
            self.redact(&target, &row.event_id);
        }
        let key = row.state_key.as_ref().map(|k| (row.event_type.clone(), k.clone()));
        let replaces = key.as_ref().and_then(|k| self.state.get(k).cloned());
        let ev = Arc::new(CachedEvent::new(&self.room, row, replaces));
        self.size += ev.weight();
        if let Some(k) = key {
            self.state.insert(k, ev.clone());
        }
        self.timeline.push_back(ev);
        while self.timeline.len() > TIMELINE_CAP {
            if let Some(old) = self.timeline.pop_front() {
                self.complete_from = old.stream();
                if old.row.state_key.is_none() {
                    self.size = self.size.saturating_sub(old.weight());
                }
            }
        }
    }

    fn redact(&mut self, target: &str, by: &str) {
        let Some(pos) = self.timeline.iter().position(|e| e.row.event_id == target) else {
            // Older than the cached timeline: only a state entry may need updating.
            if let Some((k, e)) =
                self.state.iter().find(|(_, e)| e.row.event_id == target).map(|(k, e)| (k.clone(), e.clone()))
            {
                let mut row = e.row.clone();
                row.redacted_by = Some(by.to_owned());
                self.state.insert(k, Arc::new(CachedEvent::new(&self.room, row, e.replaces.clone())));
            }
            return;
        };
        let old = self.timeline[pos].clone();
        if old.row.redacted_by.is_some() {
            return;
        }
        let mut row = old.row.clone();
        row.redacted_by = Some(by.to_owned());
        let new = Arc::new(CachedEvent::new(&self.room, row, old.replaces.clone()));
        if let Some(k) = new.key()
            && self.state.get(&k).is_some_and(|e| e.row.event_id == target)
        {
            self.state.insert(k, new.clone());
        }
        self.timeline[pos] = new;
    }

    /// Events with stream positions in `(after, upto]`, oldest first; `None` if the cache does
    /// not hold all of them.
    pub fn events_in(&self, after: i64, upto: i64) -> Option<Vec<Arc<CachedEvent>>> {
        if after < self.complete_from {
            return None;
        }
        Some(self.timeline.iter().filter(|e| e.stream() > after && e.stream() <= upto).cloned().collect())
    }

    /// The state just before stream position `at` (all events from `at` on must be cached).
    pub fn state_before(&self, at: i64) -> Option<StateMap> {
        if at <= self.complete_from {
            return None;
        }
        let mut state = self.state.clone();
        for ev in self.timeline.iter().rev().take_while(|e| e.stream() >= at) {
            if let Some(k) = ev.key() {
                match &ev.replaces {
                    Some(prev) => state.insert(k, prev.clone()),
                    None => state.remove(&k),
                };
            }
        }
        Some(state)
    }

    /// Current members with a given membership, from a state map.
    pub fn members_of<'a>(state: &'a StateMap, membership: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        state
            .iter()
            .filter(move |((t, _), e)| t == "m.room.member" && e.membership() == Some(membership))
            .map(|((_, k), _)| k.as_str())
    }
}

fn redaction_target(row: &EventRow) -> Option<String> {
    if row.event_type != "m.room.redaction" {
        return None;
    }
    let v: Value = serde_json::from_str(&row.json).ok()?;
    v.get("redacts").or_else(|| v["content"].get("redacts")).and_then(Value::as_str).map(str::to_owned)
}

/// A user's rooms and their membership in each.
#[derive(Default)]
pub struct UserRooms {
    pub upto: i64,
    pub rooms: HashMap<i64, storage::rooms::UserMembership>,
}

/// "The latest position of X is at least this": per key, with a floor for keys never seen by
/// this process (the stream position at start-up, so anything older is assumed changed).
pub struct Heads<K> {
    floor: std::sync::atomic::AtomicI64,
    map: Mutex<HashMap<K, i64>>,
}

impl<K: Hash + Eq + Clone> Default for Heads<K> {
    fn default() -> Self {
        Self { floor: Default::default(), map: Mutex::new(HashMap::new()) }
    }
}

impl<K: Hash + Eq + Clone> Heads<K> {
    pub fn set_floor(&self, pos: i64) {
        self.floor.store(pos, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn get(&self, k: &K) -> i64 {
        self.map.lock().get(k).copied().unwrap_or_else(|| self.floor.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Records a change at `pos`.
    pub fn raise(&self, k: &K, pos: i64) {
        let mut m = self.map.lock();
        let e = m.entry(k.clone()).or_insert(pos);
        *e = (*e).max(pos);
    }

    /// After loading `k` from the database at position `pos`: the head is now known exactly,
    /// unless a change recorded meanwhile is newer.
    fn learned(&self, k: &K, pos: i64) {
        self.map.lock().entry(k.clone()).or_insert(pos);
    }
}

/// Writers of the event stream in flight. Positions come from a sequence inside transactions
/// that commit in any order, so the safe watermark (what sync may read up to) is held below the
/// positions of every writer still in flight: each writer records the highest position seen when
/// it began, and all its own positions are above that.
#[derive(Default)]
struct Writers {
    next: u64,
    active: std::collections::BTreeMap<u64, i64>,
    max_seen: i64,
    /// Rooms with events above the watermark, to wake once it passes them: (position, room).
    pending_wakes: Vec<(i64, i64)>,
    /// Other instances are alive: the watermark is moved by the cluster's poller
    /// ([`SyncCaches::advance_events`]), which accounts for their writers too.
    multi: bool,
}

/// A writer of the event stream; finish it after commit (dropping it counts as a rollback).
pub struct Writer<'a> {
    caches: &'a SyncCaches,
    stream: &'a tokio::sync::watch::Sender<i64>,
    id: u64,
    done: bool,
}

impl Writer<'_> {
    /// The writer committed events up to `max_pos` (0: none): advances the watermark past every
    /// finished writer and wakes the rooms it now covers.
    pub fn finish(mut self, max_pos: i64) {
        self.done = true;
        self.caches.end_write(self.id, max_pos, self.stream);
    }
}

impl Drop for Writer<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.caches.end_write(self.id, 0, self.stream);
        }
    }
}

/// The caches and notifier of the sync engine.
pub struct SyncCaches {
    rooms: moka::sync::Cache<i64, Arc<RwLock<RoomEntry>>>,
    users: moka::sync::Cache<String, Arc<RwLock<UserRooms>>>,
    pub room_heads: Heads<i64>,
    pub user_heads: Heads<String>,
    pub account_data_heads: Heads<String>,
    pub receipt_heads: Heads<i64>,
    pub presence_heads: Heads<String>,
    pub device_list_heads: Heads<String>,
    pub to_device_heads: Heads<String>,
    /// One-time key counts and unused fallback key types per (user, device).
    key_counts: moka::sync::Cache<(String, String), KeyCounts>,
    /// The highest to-device position delivered to a device and not yet acknowledged.
    pub to_device_unacked: moka::sync::Cache<(String, String), i64>,
    waiters: Mutex<HashMap<String, Arc<tokio::sync::Notify>>>,
    writers: Mutex<Writers>,
    /// Members already sent to a device per room (lazy loading without redundant members).
    pub lazy_sent: moka::sync::Cache<(String, String, i64), SentMembers>,
    /// Last presence written by sync per user: (state, when), to write only on change.
    pub presence_written: moka::sync::Cache<String, (String, i64)>,
}

impl SyncCaches {
    pub fn new(budget_bytes: u64) -> Self {
        Self {
            rooms: moka::sync::Cache::builder()
                .max_capacity(budget_bytes)
                .weigher(|_, e: &Arc<RwLock<RoomEntry>>| e.read().size.min(u32::MAX as usize) as u32)
                .build(),
            users: moka::sync::Cache::builder().max_capacity(200_000).build(),
            room_heads: Heads::default(),
            user_heads: Heads::default(),
            account_data_heads: Heads::default(),
            receipt_heads: Heads::default(),
            presence_heads: Heads::default(),
            device_list_heads: Heads::default(),
            to_device_heads: Heads::default(),
            key_counts: moka::sync::Cache::builder().max_capacity(200_000).support_invalidation_closures().build(),
            to_device_unacked: moka::sync::Cache::builder().max_capacity(200_000).build(),
            waiters: Mutex::new(HashMap::new()),
            writers: Mutex::new(Writers::default()),
            lazy_sent: moka::sync::Cache::builder().max_capacity(100_000).build(),
            presence_written: moka::sync::Cache::builder().max_capacity(200_000).build(),
        }
    }

    /// The event stream position at start-up.
    pub fn set_start(&self, pos: i64) {
        let mut w = self.writers.lock();
        w.max_seen = w.max_seen.max(pos);
    }

    /// Registers a writer of the event stream, before it takes any position.
    pub fn begin_write<'a>(&'a self, stream: &'a tokio::sync::watch::Sender<i64>) -> Writer<'a> {
        let mut w = self.writers.lock();
        let id = w.next;
        w.next += 1;
        let cap = w.max_seen;
        w.active.insert(id, cap);
        Writer { caches: self, stream, id, done: false }
    }

    fn end_write(&self, id: u64, max_pos: i64, stream: &tokio::sync::watch::Sender<i64>) {
        let (safe, wake) = {
            let mut w = self.writers.lock();
            w.active.remove(&id);
            w.max_seen = w.max_seen.max(max_pos);
            if w.multi {
                return;
            }
            let safe = w.active.values().next().copied().unwrap_or(w.max_seen).min(w.max_seen);
            let mut wake = Vec::new();
            w.pending_wakes.retain(|(pos, room)| {
                if *pos <= safe {
                    wake.push(*room);
                    false
                } else {
                    true
                }
            });
            (safe, wake)
        };
        crate::state::advance(stream, safe);
        for room in wake {
            self.wake_room(room);
        }
    }

    /// Switches between the in-process watermark (alone) and the cluster's (`multi`). Back to
    /// alone, the in-process one continues from `known`, the position the cluster reached.
    pub fn set_multi(&self, multi: bool, known: i64) {
        let mut w = self.writers.lock();
        w.multi = multi;
        w.max_seen = w.max_seen.max(known);
    }

    /// Multi mode: every event up to `pos` has committed and the heads of the `rooms` that
    /// gained events were raised; moves the watermark and wakes those rooms' members.
    pub fn advance_events(
        &self,
        stream: &tokio::sync::watch::Sender<i64>,
        pos: i64,
        rooms: impl IntoIterator<Item = i64>,
    ) {
        let mut wake: std::collections::HashSet<i64> = rooms.into_iter().collect();
        {
            let mut w = self.writers.lock();
            w.max_seen = w.max_seen.max(pos);
            w.pending_wakes.retain(|(p, room)| {
                if *p <= pos {
                    wake.insert(*room);
                    false
                } else {
                    true
                }
            });
        }
        crate::state::advance(stream, pos);
        for room in wake {
            self.wake_room(room);
        }
    }

    /// Bytes held by room entries (approximate).
    pub fn room_bytes(&self) -> u64 {
        self.rooms.run_pending_tasks();
        self.rooms.weighted_size()
    }

    /// The waiter a long-polling sync of `user` sleeps on.
    pub fn waiter(&self, user: &str) -> Arc<tokio::sync::Notify> {
        self.waiters.lock().entry(user.to_owned()).or_default().clone()
    }

    pub fn wake_user(&self, user: &str) {
        if let Some(n) = self.waiters.lock().get(user) {
            n.notify_waiters();
        }
    }

    /// Wakes every waiting sync. Only a waiter that a sync holds can have anyone to wake; the
    /// others are dropped here (a sync asks for a new one), so this costs the number of syncs
    /// in progress, not of users who ever synced.
    pub fn wake_all(&self) {
        self.waiters.lock().retain(|_, n| {
            let held = Arc::strong_count(n) > 1;
            if held {
                n.notify_waiters();
            }
            held
        });
    }

    /// Wakes the joined and invited members of a room (everyone, if the room is not cached).
    pub fn wake_room(&self, room_nid: i64) {
        let Some(entry) = self.rooms.get(&room_nid) else {
            return self.wake_all();
        };
        let members: Vec<String> = {
            let e = entry.read();
            e.state
                .iter()
                .filter(|((t, _), ev)| {
                    t == "m.room.member" && matches!(ev.membership(), Some("join" | "invite" | "knock"))
                })
                .map(|((_, k), _)| k.clone())
                .collect()
        };
        let waiters = self.waiters.lock();
        for m in members {
            if let Some(n) = waiters.get(&m) {
                n.notify_waiters();
            }
        }
    }

    /// Applies committed events to the cached entries (before the watermark moves past them) and
    /// queues the wake-up of whoever they concern.
    /// `previous` is the stream position of the room's last event before the batch, as read
    /// under the room's lock (0 for a new room).
    pub fn committed(&self, server_name: &str, room: &Room, previous: i64, events: &[Appended]) {
        let Some(last) = events.iter().map(|a| a.stream).max() else { return };
        // Commits of one room are serialised (by the database lock, across instances too), so
        // an entry holding every event up to the room's previous one can take the batch; one
        // that does not (loaded from a snapshot taken before a commit it then missed, or behind
        // another instance's commit) stays behind and catches up from the database when read.
        self.room_heads.raise(&room.nid, last);
        if let Some(entry) = self.rooms.get(&room.nid) {
            let mut e = entry.write();
            if e.upto >= previous {
                for a in events {
                    e.apply(a.row.clone());
                }
            }
            drop(e);
            self.rooms.insert(room.nid, entry);
        }
        let mut affected = Vec::new();
        for a in events {
            if a.row.event_type == "m.room.member"
                && let Some(user) = &a.row.state_key
            {
                affected.push(user.clone());
                if crate::users::is_local(user, server_name) {
                    self.user_heads.raise(user, a.stream);
                    if let Some(u) = self.users.get(user) {
                        let mut u = u.write();
                        let membership = a.content["membership"].as_str().unwrap_or("leave").to_owned();
                        let newer = u.rooms.get(&room.nid).is_none_or(|m| m.stream_ordering < a.stream);
                        if newer {
                            u.rooms.insert(
                                room.nid,
                                storage::rooms::UserMembership {
                                    room_nid: room.nid,
                                    room_id: room.room_id.to_string(),
                                    membership,
                                    event_nid: a.event_nid,
                                    stream_ordering: a.stream,
                                },
                            );
                        }
                        u.upto = u.upto.max(a.stream);
                    }
                }
            }
        }
        // Woken once the watermark covers these events (see `end_write`); users whose
        // membership changed may not be members any more, so they are woken here too.
        self.writers.lock().pending_wakes.push((last, room.nid));
        for u in affected {
            self.wake_user(&u);
        }
    }

    /// The user's rooms, from the cache or the database.
    pub async fn user_rooms(&self, state: &AppState, user: &str) -> ApiResult<Arc<RwLock<UserRooms>>> {
        let head = self.user_heads.get(&user.to_owned());
        if let Some(u) = self.users.get(user)
            && u.read().upto >= head
        {
            return Ok(u);
        }
        let rows = storage::rooms::user_memberships(&state.db, user).await?;
        let upto = rows.iter().map(|r| r.stream_ordering).max().unwrap_or(0);
        self.user_heads.learned(&user.to_owned(), upto);
        let entry =
            Arc::new(RwLock::new(UserRooms { upto, rooms: rows.into_iter().map(|r| (r.room_nid, r)).collect() }));
        self.users.insert(user.to_owned(), entry.clone());
        Ok(entry)
    }

    /// The rooms a user is joined to, if their rooms are cached.
    pub fn cached_joined_rooms(&self, user: &str) -> Option<Vec<i64>> {
        let u = self.users.get(user)?;
        let u = u.read();
        Some(u.rooms.values().filter(|m| m.membership == "join").map(|m| m.room_nid).collect())
    }

    pub fn key_counts(&self, user: &str, device: &str) -> Option<KeyCounts> {
        self.key_counts.get(&(user.to_owned(), device.to_owned()))
    }

    pub fn put_key_counts(&self, user: &str, device: &str, counts: KeyCounts) {
        self.key_counts.insert((user.to_owned(), device.to_owned()), counts);
    }

    /// After keys of a device (or, with `None`, of all the user's devices) changed.
    pub fn invalidate_key_counts(&self, user: &str, device: Option<&str>) {
        match device {
            Some(d) => self.key_counts.invalidate(&(user.to_owned(), d.to_owned())),
            None => {
                let user = user.to_owned();
                let _ = self.key_counts.invalidate_entries_if(move |(u, _), _| *u == user);
            }
        }
    }

    /// Forgets a user's cached rooms (after `forget`, which changes no stream).
    pub fn invalidate_user(&self, user: &str) {
        self.users.invalidate(user);
    }

    /// Drops a room's entry: the next read reloads it from the database (after a commit whose
    /// outcome is unknown).
    pub fn invalidate_room(&self, room_nid: i64) {
        self.rooms.invalidate(&room_nid);
    }

    /// A room's entry, current up to the latest commit this process knows of.
    pub async fn room(&self, state: &AppState, room: &Room) -> ApiResult<Arc<RwLock<RoomEntry>>> {
        let head = self.room_heads.get(&room.nid);
        if let Some(e) = self.rooms.get(&room.nid) {
            let upto = e.read().upto;
            if upto >= head {
                return Ok(e);
            }
            // Behind (a commit this process did not apply): catch up from the database.
            let rows =
                storage::events::latest_in_range(&state.db, room.nid, upto, i64::MAX, TIMELINE_CAP as i64).await?;
            if rows.len() < TIMELINE_CAP {
                {
                    let mut w = e.write();
                    for row in rows.into_iter().rev() {
                        w.apply(row);
                    }
                }
                self.rooms.insert(room.nid, e.clone());
                return Ok(e);
            }
        }
        let entry = Arc::new(RwLock::new(load_room(state, room).await?));
        let upto = entry.read().upto;
        self.room_heads.learned(&room.nid, upto);
        self.rooms.insert(room.nid, entry.clone());
        Ok(entry)
    }
}

/// Loads a room's entry: the state before the oldest cached event, then the recent events
/// applied one by one (so every state event knows what it replaced).
async fn load_room(state: &AppState, room: &Room) -> ApiResult<RoomEntry> {
    let mut rows = storage::events::latest_in_range(&state.db, room.nid, 0, i64::MAX, TIMELINE_CAP as i64).await?;
    rows.reverse();
    let mut entry = RoomEntry::empty(room.clone());
    // Capped, or a room joined over federation (its first local event, the join, has the state
    // the resident server gave before it): the state before the first event comes first.
    if let Some(first) = rows.first()
        && (rows.len() == TIMELINE_CAP || first.state_before.is_some())
    {
        entry.complete_from = first.stream_ordering - 1;
        if let Some(group) = first.state_before {
            for row in storage::rooms::state_events_of_group(&state.db, group).await? {
                let ev = Arc::new(CachedEvent::new(room, row, None));
                entry.size += ev.weight();
                if let Some(k) = ev.key() {
                    entry.state.insert(k, ev);
                }
            }
        }
        entry.upto = entry.complete_from;
    }
    for row in rows {
        entry.apply(row);
    }
    Ok(entry)
}
