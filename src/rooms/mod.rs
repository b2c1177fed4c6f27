//! The room engine: every event that enters a room, local or (later) remote, goes through one
//! pipeline: build → hash and sign → authorise against the state before it → persist in one
//! transaction (event, edges, state group, current state, memberships, extremities, txn) →
//! notify.
//!
//! Writes to one room are serialised by a row lock on the room's `room_extremities` row (so
//! several Parvis processes sharing a database stay correct; see [`lock_room`]) plus an
//! in-process mutex (so concurrent requests of one process queue in memory rather than holding
//! pool connections). The mutex also guards what the writer knows of the room's head
//! ([`Head`]), which spares the head and auth-state lookups while no other process writes.

pub mod client;
pub mod create;
pub mod directory;
pub mod pdu;
pub mod receipts;
pub mod relations;
pub mod remote;
pub mod resolve;
pub mod retention;
pub mod summary;
pub mod token;
pub mod typing;
pub mod visibility;

use std::collections::HashMap;
use std::sync::Arc;

use ruma::events::{StateEventType, TimelineEventType};
use ruma::room_version_rules::RoomVersionRules;
use ruma::{CanonicalJsonObject, CanonicalJsonValue, EventId, OwnedEventId, OwnedRoomId, RoomVersionId, UserId};
use serde_json::{Value, json};
use sqlx::PgConnection;

use crate::error::{ApiResult, Error};
use crate::state::AppState;
use crate::storage::{self, now_ms};
use pdu::Pdu;

/// Room versions this server can create and join.
pub const SUPPORTED_VERSIONS: &[&str] = &["6", "7", "8", "9", "10", "11", "12"];

/// Internal marker: the client transaction was committed by a concurrent request.
const DUPLICATE_TXN: &str = "PARVIS_DUPLICATE_TXN";

/// A room as the engine needs it.
#[derive(Debug, Clone)]
pub struct Room {
    pub nid: i64,
    pub room_id: OwnedRoomId,
    pub version: RoomVersionId,
    pub rules: RoomVersionRules,
}

impl Room {
    pub fn from_row(row: &storage::rooms::RoomRow) -> ApiResult<Self> {
        let version = RoomVersionId::try_from(row.room_version.as_str()).map_err(|_| Error::internal())?;
        let rules = version.rules().ok_or_else(Error::internal)?;
        let room_id = OwnedRoomId::try_from(row.room_id.as_str()).map_err(|_| Error::internal())?;
        Ok(Self { nid: row.room_nid, room_id, version, rules })
    }

    /// Loads a room by ID; 404 `M_NOT_FOUND` if this server does not know it. A room's ID,
    /// number and version never change, so they are cached for the life of the process.
    pub async fn load(state: &AppState, room_id: &str) -> ApiResult<Self> {
        if let Some(room) = state.room_cache.get(room_id) {
            return Ok(room);
        }
        let row = storage::rooms::by_id(&state.db, room_id).await?.ok_or_else(|| Error::not_found("Unknown room"))?;
        let room = Self::from_row(&row)?;
        state.room_cache.insert(room_id.to_owned(), room.clone());
        Ok(room)
    }
}

pub fn rules_for(version: &str) -> ApiResult<(RoomVersionId, RoomVersionRules)> {
    let unsupported = || {
        Error::new(
            axum::http::StatusCode::BAD_REQUEST,
            "M_UNSUPPORTED_ROOM_VERSION",
            format!("Room version {version} is not supported"),
        )
    };
    if !SUPPORTED_VERSIONS.contains(&version) {
        return Err(unsupported());
    }
    let id = RoomVersionId::try_from(version).map_err(|_| unsupported())?;
    let rules = id.rules().ok_or_else(unsupported)?;
    Ok((id, rules))
}

/// What a client (or the server itself) wants to put into a room.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub kind: String,
    pub state_key: Option<String>,
    pub content: Value,
    /// For `m.room.redaction`: the event to redact.
    pub redacts: Option<String>,
}

impl NewEvent {
    pub fn state(kind: &str, state_key: &str, content: Value) -> Self {
        Self { kind: kind.into(), state_key: Some(state_key.into()), content, redacts: None }
    }
    pub fn message(kind: &str, content: Value) -> Self {
        Self { kind: kind.into(), state_key: None, content, redacts: None }
    }
}

/// A client transaction. The spec scopes a transaction ID to the device and the request's path:
/// `scope` is that path without the transaction ID and the version prefix (see [`txn_scope`]).
#[derive(Debug, Clone, Copy)]
pub struct ClientTxn<'a> {
    pub device: &'a str,
    pub scope: &'a str,
    pub id: &'a str,
}

pub type Txn<'a> = Option<ClientTxn<'a>>;

/// The scope of a transaction ID: the request path's parts before the ID, e.g.
/// `["rooms", room_id, "send", event_type]`, joined with `/` (room IDs, event types and event IDs
/// contain no `/` that could make two paths collide: path segments arrive percent-decoded, so a
/// `/` inside one is escaped here).
pub fn txn_scope(parts: &[&str]) -> String {
    parts.iter().map(|p| p.replace('%', "%25").replace('/', "%2F")).collect::<Vec<_>>().join("/")
}

/// The outcome of appending an event.
#[derive(Debug, Clone)]
pub struct Appended {
    pub event_id: OwnedEventId,
    pub event_nid: i64,
    pub stream: i64,
    /// The stream position of the room's last event before this one (read under the lock).
    pub prev_stream: i64,
    /// The event as stored (what the sync cache and push evaluation work from).
    pub row: storage::events::EventRow,
    /// Its content, already parsed.
    pub content: Value,
    /// The servers it was queued for (woken after the commit).
    pub destinations: Vec<String>,
}

/// A send waiting for its room's writer.
struct Pending {
    sender: String,
    ev: NewEvent,
    /// `(device, scope, txn_id)`.
    txn: Option<(String, String, String)>,
    reply: tokio::sync::oneshot::Sender<ApiResult<OwnedEventId>>,
}

impl Pending {
    fn txn(&self) -> Txn<'_> {
        self.txn.as_ref().map(|(device, scope, id)| ClientTxn { device, scope, id })
    }
}

/// Per-room write queue: sends are queued, and whoever holds the room's writer lock appends
/// everything queued in one transaction (group commit: one fsync for many events). The writer
/// lock holds the room's [`Head`] as this process last committed it.
#[derive(Default)]
pub struct RoomQueue {
    pending: parking_lot::Mutex<Vec<Pending>>,
    writer: Arc<tokio::sync::Mutex<Option<Head>>>,
}

/// A room's head as of one event: what appending the next event needs (its `prev_events`,
/// depth and state group) and the current state entries the authorization rules asked for so
/// far (`None`: no such state), all as they were right after that event.
///
/// Kept by the room's writer between transactions and used only after the room lock returned
/// exactly this event as the room's single forward extremity ([`lock_room`]): every append moves
/// the extremity to a new event, so an unchanged extremity means that nothing was appended since
/// (by this process or another one) and the state entries are current. Otherwise it is loaded
/// again under the lock ([`Head::load`]). It is only ever built from the database under the lock
/// or advanced by the events of a transaction that then committed.
#[derive(Debug, Clone)]
pub struct Head {
    /// The forward extremity (the newest one when the DAG has forked).
    pub event_nid: i64,
    pub event_id: String,
    /// The other forward extremities, `(nid, ID)`, when the DAG has forked (federation): the next
    /// event names them all in its `prev_events` and joins the forks.
    pub others: Vec<(i64, String)>,
    pub depth: i64,
    /// The newest extremity's stream position (the sync cache applies a batch only on top of it).
    pub stream: i64,
    /// The state after the extremity; where the DAG forked, the resolved state of the
    /// extremities (the room's current state group).
    pub state_after: Option<i64>,
    state: HashMap<(String, String), Option<AuthEntry>>,
    /// The other servers with a joined member, which get this room's events (loaded when first
    /// needed, forgotten after a membership change).
    servers: Option<Arc<Vec<String>>>,
}

/// A current state event as the authorization rules need it.
#[derive(Debug, Clone)]
struct AuthEntry {
    event_nid: i64,
    event_type: String,
    pdu: Arc<Pdu>,
}

/// Most state entries a [`Head`] keeps between transactions (it starts over past that).
const HEAD_STATE_CAP: usize = 1024;

impl Head {
    /// The head right after `event` (whose state group is `state_after`), nothing looked up yet.
    pub fn new(event_nid: i64, event_id: String, depth: i64, stream: i64, state_after: Option<i64>) -> Self {
        Self {
            event_nid,
            event_id,
            others: Vec::new(),
            depth,
            stream,
            state_after,
            state: HashMap::new(),
            servers: None,
        }
    }

    /// Reads the head from the database; the caller holds the room lock.
    pub async fn load(conn: &mut PgConnection, room: &Room) -> ApiResult<Self> {
        let extremities = storage::events::extremities(&mut *conn, room.nid).await?;
        // Ordered by depth, then stream: the last one is the newest.
        let Some((event_nid, event_id, depth, state_after, _)) = extremities.last().cloned() else {
            // A room known only through an invite: this server is not in it.
            return Err(Error::forbidden("This server is not in the room"));
        };
        let stream = extremities.iter().map(|e| e.4).max().unwrap_or(0);
        let mut head = Self::new(event_nid, event_id, depth, stream, state_after);
        if extremities.len() > 1 {
            // A forked DAG (federation): the next event joins the forks (at most the spec's 20
            // `prev_events`, the newest ones) on the resolved state, which `rooms::remote` keeps
            // as the room's current state.
            let skip = extremities.len().saturating_sub(20);
            head.others = extremities[skip..extremities.len() - 1].iter().map(|e| (e.0, e.1.clone())).collect();
            head.depth = extremities.iter().map(|e| e.2).max().unwrap_or(depth);
            head.state_after = storage::rooms::by_nid(&mut *conn, room.nid).await?.and_then(|r| r.current_state_group);
        }
        Ok(head)
    }

    /// Whether the room lock's view of the extremities is this head.
    fn is(&self, extremities: &[i64]) -> bool {
        self.others.is_empty() && extremities == [self.event_nid]
    }

    /// The `prev_events` of the next event.
    fn prev_ids(&self) -> Vec<String> {
        self.others.iter().map(|o| o.1.clone()).chain(std::iter::once(self.event_id.clone())).collect()
    }

    /// The extremities the next event replaces.
    fn prev_nids(&self) -> Vec<i64> {
        self.others.iter().map(|o| o.0).chain(std::iter::once(self.event_nid)).collect()
    }

    /// The other servers in the room (see [`Head::servers`]), read under the room lock.
    async fn servers(&mut self, conn: &mut PgConnection, room: &Room, own: &str) -> ApiResult<Arc<Vec<String>>> {
        if let Some(s) = &self.servers {
            return Ok(s.clone());
        }
        let s = Arc::new(storage::remote::joined_servers(conn, room.nid, own).await?);
        self.servers = Some(s.clone());
        Ok(s)
    }

    /// The current state entries for `keys`, reading those not known yet in one query.
    async fn auth_state(
        &mut self,
        conn: &mut PgConnection,
        room_nid: i64,
        keys: &[(String, String)],
    ) -> ApiResult<Vec<AuthEntry>> {
        let missing: Vec<(String, String)> = keys.iter().filter(|k| !self.state.contains_key(*k)).cloned().collect();
        if !missing.is_empty() {
            let rows = storage::rooms::current_state_for(&mut *conn, room_nid, &missing).await?;
            for k in missing {
                self.state.insert(k, None);
            }
            for row in rows {
                let pdu = Pdu::parse(&row.event_id, &row.json).map_err(|e| Error::from(anyhow::anyhow!(e)))?;
                let key = (row.event_type.clone(), row.state_key.unwrap_or_default());
                self.state.insert(
                    key,
                    Some(AuthEntry { event_nid: row.event_nid, event_type: row.event_type, pdu: Arc::new(pdu) }),
                );
            }
        }
        Ok(keys.iter().filter_map(|k| self.state.get(k).cloned().flatten()).collect())
    }
}

/// The write queues of the rooms of this process (the database lock is the authority).
pub struct RoomLocks(moka::sync::Cache<i64, Arc<RoomQueue>>);

impl Default for RoomLocks {
    fn default() -> Self {
        Self(moka::sync::Cache::builder().max_capacity(100_000).build())
    }
}

impl RoomLocks {
    fn get(&self, room_nid: i64) -> Arc<RoomQueue> {
        self.0.get_with(room_nid, Default::default)
    }
}

/// Most events appended in one transaction.
const MAX_BATCH: usize = 64;

/// Sends one event into a room on behalf of a local user, idempotently per client transaction.
/// A retried transaction is recognised when its `event_txns` row conflicts (see `append`).
pub async fn send(state: &AppState, room: &Room, sender: &str, ev: NewEvent, txn: Txn<'_>) -> ApiResult<OwnedEventId> {
    // A state event cancels other users' delayed events for the same state (MSC4140).
    let state_entry = ev.state_key.clone().map(|k| (ev.kind.clone(), k));
    let id = send_inner(state, room, sender, ev, txn).await?;
    if let Some((kind, key)) = state_entry {
        crate::rtc::delayed::state_overwritten(state, room, &kind, &key, sender).await;
    }
    Ok(id)
}

async fn send_inner(
    state: &AppState,
    room: &Room,
    sender: &str,
    ev: NewEvent,
    txn: Txn<'_>,
) -> ApiResult<OwnedEventId> {
    let queue = state.room_locks.get(room.nid);
    let (reply, answer) = tokio::sync::oneshot::channel();
    queue.pending.lock().push(Pending {
        sender: sender.to_owned(),
        ev,
        txn: txn.map(|t| (t.device.to_owned(), t.scope.to_owned(), t.id.to_owned())),
        reply,
    });
    // Whoever gets the writer drains the queue; our own send may already have been taken by the
    // previous writer, in which case there is little or nothing left to do.
    let mut guard = queue.writer.clone().lock_owned().await;
    let batch: Vec<Pending> = {
        let mut p = queue.pending.lock();
        let n = p.len().min(MAX_BATCH);
        p.drain(..n).collect()
    };
    if !batch.is_empty() {
        // A task of its own: a client hanging up must not abort the others' events.
        let (state, room) = (state.clone(), room.clone());
        let _ = tokio::spawn(async move {
            write_batch(&state, &room, batch, &mut guard).await;
            drop(guard);
        })
        .await;
    } else {
        drop(guard);
    }
    answer.await.map_err(|_| Error::internal())?
}

/// Appends a batch of sends and answers each sender.
///
/// Nothing is acknowledged that is not committed. Every statement's outcome is propagated (a
/// database error aborts the transaction: PostgreSQL then refuses every later statement and turns
/// `COMMIT` into a silent rollback, so an error must never be swallowed), and the commit is
/// only attempted after every statement of the batch succeeded. One bad event costs only its own
/// sender:
/// - an event whose append fails with a server error (it may have written part of itself) is
///   answered with that error, the transaction rolled back, and the batch retried without it;
/// - a failure no single event can be blamed for (push evaluation) retries the events one by one,
///   each in its own transaction, so that each sender gets the outcome of its own event;
/// - a failed `BEGIN`, room lock or `COMMIT` fails the whole batch with 500 (the client retries
///   with its transaction ID). A failed `COMMIT` may still have committed: the room's sync cache
///   entry is dropped so that the next read reloads it from the database.
///
/// Rejections (4xx) are decided before the event writes anything and leave the transaction
/// usable for the rest of the batch.
///
/// `head` is the room's head as this process last committed it (see [`Head`]); it is taken for
/// the attempt and put back only after a commit, so a failed attempt leaves none.
async fn write_batch(state: &AppState, room: &Room, mut batch: Vec<Pending>, head: &mut Option<Head>) {
    loop {
        match attempt_batch(state, room, &batch, head).await {
            Attempt::Committed(results) => {
                for (p, result) in batch.into_iter().zip(results) {
                    let _ = p.reply.send(result);
                }
                return;
            }
            Attempt::FailedAt(i, e) => {
                tracing::error!(room_id = %room.room_id, sender = %batch[i].sender, error = %e.message,
                    "event failed in its write transaction; retrying the rest of its batch");
                let p = batch.remove(i);
                let _ = p.reply.send(Err(e));
                if batch.is_empty() {
                    return;
                }
            }
            Attempt::Unattributed(e) if batch.len() > 1 => {
                tracing::error!(room_id = %room.room_id, size = batch.len(), error = %e.message,
                    "room write batch failed; retrying its events one by one");
                for p in batch {
                    Box::pin(write_batch(state, room, vec![p], head)).await;
                }
                return;
            }
            Attempt::Unattributed(e) | Attempt::Aborted(e) => {
                tracing::error!(room_id = %room.room_id, size = batch.len(), error = %e.message, "room write batch failed");
                for p in batch {
                    let _ = p.reply.send(Err(Error::internal()));
                }
                return;
            }
        }
    }
}

/// The outcome of one transaction over a batch.
enum Attempt {
    /// Committed; one result per event of the batch (rejections included).
    Committed(Vec<ApiResult<OwnedEventId>>),
    /// The event at this index failed with a server error; the transaction was rolled back.
    FailedAt(usize, Error),
    /// The batch failed and no single event can be blamed; rolled back.
    Unattributed(Error),
    /// The transaction could not be started, locked or committed.
    Aborted(Error),
}

/// One transaction over a batch (see [`write_batch`]). Dropping the transaction or the stream
/// writer on an early return rolls both back.
async fn attempt_batch(state: &AppState, room: &Room, batch: &[Pending], cached: &mut Option<Head>) -> Attempt {
    tracing::debug!(room = %room.room_id, size = batch.len(), "room write batch");
    let writer = state.sync.begin_write(&state.event_stream);
    let mut tx = match state.db.begin().await {
        Ok(tx) => tx,
        Err(e) => return Attempt::Aborted(e.into()),
    };
    let lock = match lock_room(&mut tx, room.nid).await {
        Ok(lock) => lock,
        Err(e) => return Attempt::Aborted(e.into()),
    };
    // The head this process committed last, if nothing was appended since (by anyone).
    let mut head = match cached.take().filter(|h| h.is(&lock.extremities)) {
        Some(h) => h,
        None => match Head::load(&mut tx, room).await {
            Ok(h) => h,
            Err(e) => return Attempt::Aborted(e),
        },
    };
    let mut results = Vec::with_capacity(batch.len());
    let mut appended: Vec<Appended> = Vec::new();
    for (i, p) in batch.iter().enumerate() {
        let txn = p.txn();
        let appending =
            std::panic::AssertUnwindSafe(append(state, &mut tx, room, &mut head, &p.sender, p.ev.clone(), txn));
        // A panic (a bug, or a library tripping on hostile content) fails its own event only.
        let Ok(outcome) = futures_util::FutureExt::catch_unwind(appending).await else {
            tracing::error!(room_id = %room.room_id, sender = %p.sender, "appending an event panicked");
            return Attempt::FailedAt(i, Error::internal());
        };
        let result = match outcome {
            Ok(a) => {
                let id = a.event_id.clone();
                appended.push(a);
                Ok(id)
            }
            // The same client transaction was recorded first (by this batch or another
            // process): answer with that event. Nothing of ours was written.
            Err(e) if e.errcode == DUPLICATE_TXN => {
                let Some(t) = txn else { return Attempt::FailedAt(i, Error::internal()) };
                match storage::events::txn_event(&mut *tx, &p.sender, t.device, t.scope, t.id).await {
                    Ok(Some(id)) => OwnedEventId::try_from(id).map_err(|_| Error::internal()),
                    Ok(None) => return Attempt::FailedAt(i, Error::internal()),
                    Err(e) => return Attempt::FailedAt(i, e.into()),
                }
            }
            // A server error may come from the database, which has then aborted the transaction.
            Err(e) if e.status.is_server_error() => return Attempt::FailedAt(i, e),
            Err(e) => Err(e),
        };
        results.push(result);
    }
    if let Some(marker) = &state.config.testing.fail_push_containing
        && appended.iter().any(|a| a.content.to_string().contains(marker.as_str()))
    {
        // Fault injection (tests only): a failure of the batch as a whole, as in push evaluation.
        if let Err(e) = sqlx::query("SELECT 1 / 0").execute(&mut *tx).await {
            return Attempt::Unattributed(e.into());
        }
    }
    if let Some(marker) = &state.config.testing.stall_commit_containing
        && appended.iter().any(|a| a.content.to_string().contains(marker.as_str()))
    {
        // Fault injection (tests only): a slow writer, positions taken, not yet committed.
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    }
    let jobs = {
        use futures_util::FutureExt;
        let eval = std::panic::AssertUnwindSafe(crate::push::eval::record_batch(state, &mut tx, room, &appended));
        match eval.catch_unwind().await {
            Ok(Ok(jobs)) => jobs,
            Ok(Err(e)) => return Attempt::Unattributed(e),
            // A bug in rule evaluation must not make the room unwritable: the events are kept,
            // without notifications for this batch (evaluation writes its rows in one final
            // statement, so none of them was written).
            Err(_) => {
                tracing::error!(room_id = %room.room_id, "push rule evaluation panicked; batch stored without notifications");
                Vec::new()
            }
        }
    };
    if let Err(e) = tx.commit().await {
        crate::cluster::room_invalidated(state, room.nid);
        return Attempt::Aborted(e.into());
    }
    if head.state.len() > HEAD_STATE_CAP {
        head.state.clear();
    }
    *cached = Some(head);
    committed(state, room, writer, &appended);
    crate::push::gateway::dispatch(state, jobs);
    Attempt::Committed(results)
}

/// A room's write lock, held until the end of the transaction.
#[derive(Debug)]
pub struct RoomLock {
    /// The room's forward extremities as of the lock (event nids).
    pub extremities: Vec<i64>,
}

/// Takes a room's write lock: a row lock (`FOR NO KEY UPDATE`) on its `room_extremities` row,
/// which every append updates. Every writer of a room's events takes it first (a room being
/// created is invisible to others until its transaction commits, so `createRoom` needs none).
/// The same statement takes the shared event-writers lock, before any stream position is taken
/// (see `storage::events::lock_extremities`).
pub async fn lock_room(conn: &mut PgConnection, room_nid: i64) -> sqlx::Result<RoomLock> {
    let extremities = storage::events::lock_extremities(conn, room_nid).await?;
    Ok(RoomLock { extremities })
}

/// Called after a transaction that appended `events` to `room` committed: updates the sync
/// cache, then moves the event stream watermark (which wakes the syncs waiting for the room).
pub fn committed(state: &AppState, room: &Room, writer: crate::sync::cache::Writer<'_>, events: &[Appended]) {
    let previous = events.first().map_or(0, |a| a.prev_stream);
    state.sync.committed(&state.config.server_name, room, previous, events);
    state.cluster.committed();
    writer.finish(events.iter().map(|a| a.stream).max().unwrap_or(0));
    for a in events {
        state.federation.sender.wake_all(&a.destinations);
    }
}

/// The state entries `(type, state_key)` the authorization rules look at for an event, and the
/// room's create event, each once.
pub fn auth_keys(
    kind: &TimelineEventType,
    sender: &UserId,
    state_key: Option<&str>,
    content: &serde_json::value::RawValue,
    room: &Room,
) -> Result<Vec<(String, String)>, String> {
    let mut keys: Vec<(String, String)> = Vec::new();
    let needed = ruma::state_res::auth_types_for_event(kind, sender, state_key, content, &room.rules.authorization)
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|(t, k)| (t.to_string(), k))
        .chain(std::iter::once(("m.room.create".to_owned(), String::new())));
    for key in needed {
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    Ok(keys)
}

fn forbidden(reason: impl std::fmt::Display) -> Error {
    Error::forbidden(reason.to_string())
}

fn parse_user(user: &str) -> ApiResult<&UserId> {
    <&UserId>::try_from(user).map_err(|_| Error::invalid_param(format!("Invalid user ID {user}")))
}

/// Builds, signs, authorises and persists one event at the head of a room, inside the caller's
/// transaction (which must hold the room lock), and moves `head` to it. On an error the
/// transaction may hold part of the event and `head` must not be kept.
pub async fn append(
    state: &AppState,
    conn: &mut PgConnection,
    room: &Room,
    head: &mut Head,
    sender: &str,
    ev: NewEvent,
    txn: Txn<'_>,
) -> ApiResult<Appended> {
    let sender_id = parse_user(sender)?;
    let kind = TimelineEventType::from(ev.kind.as_str());
    let content_raw = serde_json::value::to_raw_value(&ev.content).map_err(|e| Error::bad_json(e.to_string()))?;
    let keys = auth_keys(&kind, sender_id, ev.state_key.as_deref(), &content_raw, room).map_err(forbidden)?;
    let entries = head.auth_state(conn, room.nid, &keys).await?;

    let mut by_key: HashMap<(StateEventType, String), Arc<Pdu>> = HashMap::new();
    let mut by_id: HashMap<OwnedEventId, Arc<Pdu>> = HashMap::new();
    let mut auth_nids = Vec::new();
    let mut auth_ids = Vec::new();
    for entry in &entries {
        let is_create = entry.event_type == "m.room.create";
        if !(is_create && room.rules.authorization.room_create_event_id_as_room_id) {
            auth_nids.push(entry.event_nid);
            auth_ids.push(entry.pdu.event_id.as_str());
        }
        by_key.insert(
            (StateEventType::from(entry.event_type.as_str()), entry.pdu.state_key.clone().unwrap_or_default()),
            entry.pdu.clone(),
        );
        by_id.insert(entry.pdu.event_id.clone(), entry.pdu.clone());
    }

    let state_before = head.state_after;
    let depth = (head.depth + 1).min(9_007_199_254_740_991);
    let mut value = json!({
        "type": ev.kind,
        "room_id": room.room_id,
        "sender": sender,
        "content": ev.content,
        "origin_server_ts": now_ms(),
        "depth": depth,
        "prev_events": head.prev_ids(),
        "auth_events": auth_ids,
    });
    if let Some(sk) = &ev.state_key {
        value["state_key"] = json!(sk);
    }
    if let Some(r) = &ev.redacts {
        // v11 moved `redacts` into the content; older versions keep it at the top level.
        if room.rules.redaction.content_field_redacts {
            value["content"]["redacts"] = json!(r);
        } else {
            value["redacts"] = json!(r);
        }
    }
    let (event_id, json_text) = sign(state, value, &room.rules)?;
    let pdu = Pdu::parse(event_id.as_str(), &json_text).map_err(|e| Error::from(anyhow::anyhow!(e)))?;

    ruma::state_res::check_state_independent_auth_rules(&room.rules.authorization, &pdu, |id: &EventId| {
        by_id.get(id).cloned()
    })
    .map_err(forbidden)?;
    ruma::state_res::check_state_dependent_auth_rules(
        &room.rules.authorization,
        &pdu,
        |t: &StateEventType, k: &str| by_key.get(&(t.clone(), k.to_owned())).cloned(),
    )
    .map_err(forbidden)?;

    let relation = ev.content.get("m.relates_to");
    let rel_type = relation.and_then(|r| r.get("rel_type")).and_then(Value::as_str);
    let relates_to = relation.and_then(|r| r.get("event_id")).and_then(Value::as_str);
    let search_config = crate::search::text_config(&state.config.search.language);
    let search = crate::search::searchable(&ev.kind, &ev.content).map(|(k, t)| (k, t, search_config.as_str()));
    let origin_server_ts = u64::from(pdu.origin_server_ts.get()) as i64;
    // One statement: the client transaction first (if it was already recorded, nothing of this
    // event is written), the event, its search row and edges, and the room's extremity.
    let written = storage::events::append(
        conn,
        &storage::events::NewEventRow {
            event_id: event_id.as_str(),
            room_nid: room.nid,
            depth,
            event_type: &ev.kind,
            state_key: ev.state_key.as_deref(),
            sender,
            origin_server_ts,
            json: &json_text,
            state_before,
            state_after: if ev.state_key.is_some() { None } else { state_before },
            redacts: ev.redacts.as_deref(),
            rel_type,
            relates_to,
            txn: txn.map(|t| (t.device, t.id)),
            search,
        },
        txn.map(|t| (sender, t.device, t.scope, t.id)),
        &head.prev_ids(),
        &auth_nids,
        &head.prev_nids(),
    )
    .await?;
    let Some((event_nid, stream)) = written else {
        return Err(Error::new(axum::http::StatusCode::CONFLICT, DUPLICATE_TXN, "duplicate transaction"));
    };
    if let Some(marker) = &state.config.testing.fail_append_containing
        && ev.content.to_string().contains(marker.as_str())
    {
        // Fault injection (tests only): a real database error after the event's row was written.
        sqlx::query("SELECT 1 / 0").execute(&mut *conn).await?;
    }
    let state_after = match &ev.state_key {
        Some(sk) => {
            Some(apply_state(conn, room.nid, event_nid, stream, state_before, &ev.kind, sk, &ev.content).await?)
        }
        None => state_before,
    };
    if let Some(target) = &ev.redacts {
        storage::events::mark_redacted(conn, target, room.nid, event_id.as_str()).await?;
    }
    // Federation: the other servers in the room get the event, from an outbox written in this
    // transaction (durable: a destination that is down gets it when it returns).
    let mut destinations: Vec<String> = head.servers(conn, room, &state.config.server_name).await?.to_vec();
    let mut servers = head.servers.take();
    if ev.kind == "m.room.member" {
        // A membership change may add or remove a server: loaded again for the next event. The
        // user it is about hears of it even when it leaves their server without a member.
        servers = None;
        let membership = ev.content.get("membership").and_then(Value::as_str);
        if let Some(target) = ev.state_key.as_deref().and_then(|k| <&UserId>::try_from(k).ok())
            && membership != Some("invite")
            && target.server_name().as_str() != state.config.server_name
            && !destinations.iter().any(|d| d == target.server_name().as_str())
        {
            destinations.push(target.server_name().to_string());
        }
    }
    destinations.retain(|d| state.federation.enabled && state.federation.is_allowed_name(d));
    if !destinations.is_empty() {
        storage::remote::enqueue(conn, &destinations, event_nid).await?;
    }
    let prev_stream = head.stream;
    *head = Head {
        event_nid,
        event_id: event_id.to_string(),
        others: Vec::new(),
        depth,
        stream,
        state_after,
        state: std::mem::take(&mut head.state),
        servers,
    };
    if let Some(sk) = &ev.state_key {
        head.state.insert(
            (ev.kind.clone(), sk.clone()),
            Some(AuthEntry { event_nid, event_type: ev.kind.clone(), pdu: Arc::new(pdu) }),
        );
    }
    let row = storage::events::EventRow {
        event_nid,
        event_id: event_id.to_string(),
        room_nid: room.nid,
        stream_ordering: stream,
        depth,
        event_type: ev.kind,
        state_key: ev.state_key,
        sender: sender.to_owned(),
        origin_server_ts,
        json: json_text,
        redacted_by: None,
        txn_device: txn.map(|t| t.device.to_owned()),
        txn_id: txn.map(|t| t.id.to_owned()),
        state_before,
        state_after,
    };
    Ok(Appended { event_id, event_nid, stream, prev_stream, row, content: ev.content, destinations })
}

/// Records a state event: a new state group (delta on the state before), current state, and the
/// membership table for member events. Returns the new group (the state after the event).
#[allow(clippy::too_many_arguments)]
async fn apply_state(
    conn: &mut PgConnection,
    room_nid: i64,
    event_nid: i64,
    stream: i64,
    state_before: Option<i64>,
    kind: &str,
    state_key: &str,
    content: &Value,
) -> ApiResult<i64> {
    let key_nid = storage::state::intern_key(conn, kind, state_key).await?;
    let group = storage::state::create_group(conn, room_nid, state_before, &[(key_nid, event_nid)]).await?;
    sqlx::query("UPDATE events SET state_after = $2 WHERE event_nid = $1")
        .bind(event_nid)
        .bind(group)
        .execute(&mut *conn)
        .await?;
    storage::state::set_current(conn, room_nid, key_nid, event_nid).await?;
    storage::rooms::set_current_group(conn, room_nid, group).await?;
    if kind == "m.room.member" {
        let membership = content.get("membership").and_then(Value::as_str).unwrap_or("leave");
        storage::rooms::set_membership(conn, room_nid, state_key, membership, event_nid, stream).await?;
    }
    Ok(group)
}

/// Hashes and signs a PDU with the server key; returns its event ID and canonical JSON text.
pub fn sign(state: &AppState, value: Value, rules: &RoomVersionRules) -> ApiResult<(OwnedEventId, String)> {
    let mut obj = to_canonical(value)?;
    ruma::signatures::hash_and_sign_event(&state.config.server_name, &state.event_signer, &mut obj, &rules.redaction)
        .map_err(|e| Error::bad_json(format!("cannot sign event: {e}")))?;
    let hash = ruma::signatures::reference_hash(&obj, rules).map_err(|e| match e {
        ruma::signatures::JsonError::PduTooLarge => Error::too_large("Event is larger than 65535 bytes"),
        e => Error::bad_json(e.to_string()),
    })?;
    let event_id = EventId::new_v2_or_v3(&hash).map_err(|_| Error::internal())?;
    let text = serde_json::to_string(&obj).map_err(|e| Error::from(anyhow::anyhow!(e)))?;
    if text.len() > 65_535 {
        return Err(Error::too_large("Event is larger than 65535 bytes"));
    }
    Ok((event_id, text))
}

/// Converts JSON into canonical JSON, refusing floats and out-of-range integers as room
/// versions 6+ require.
pub fn to_canonical(value: Value) -> ApiResult<CanonicalJsonObject> {
    match CanonicalJsonValue::try_from(value) {
        Ok(CanonicalJsonValue::Object(o)) => Ok(o),
        Ok(_) => Err(Error::bad_json("event must be an object")),
        Err(e) => Err(Error::bad_json(format!("content is not canonical JSON: {e}"))),
    }
}

/// The current state event content for `(type, state_key)`, if any.
pub async fn current_content(state: &AppState, room: &Room, kind: &str, state_key: &str) -> ApiResult<Option<Value>> {
    let rows = storage::rooms::current_state_for(&state.db, room.nid, &[(kind.into(), state_key.into())]).await?;
    Ok(rows.first().and_then(|r| serde_json::from_str::<Value>(&r.json).ok()).map(|v| v["content"].clone()))
}

/// The current power levels of a room, loaded once (one query) and asked about many users.
pub struct PowerLevels {
    content: Value,
    /// v12: the room's creators, who outrank every number.
    creators: Vec<String>,
}

impl PowerLevels {
    pub async fn load(state: &AppState, room: &Room) -> ApiResult<Self> {
        let keys = [("m.room.power_levels".to_owned(), String::new()), ("m.room.create".to_owned(), String::new())];
        let mut content = Value::Null;
        let mut creators = Vec::new();
        for row in storage::rooms::current_state_for(&state.db, room.nid, &keys).await? {
            let ev: Value = serde_json::from_str(&row.json).unwrap_or(Value::Null);
            if row.event_type == "m.room.power_levels" {
                content = ev["content"].clone();
            } else if room.rules.authorization.explicitly_privilege_room_creators {
                creators.push(row.sender.clone());
                creators.extend(
                    ev["content"]["additional_creators"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                        .map(str::to_owned),
                );
            }
        }
        Ok(Self { content, creators })
    }

    /// The power level of `user`.
    pub fn of(&self, user: &str) -> i64 {
        if self.creators.iter().any(|c| c == user) {
            return i64::MAX;
        }
        self.content["users"][user].as_i64().or_else(|| self.content["users_default"].as_i64()).unwrap_or(0)
    }

    /// The level an action (`redact`, `invite`, `kick`, ...) needs, with the spec's default.
    pub fn action(&self, name: &str, default: i64) -> i64 {
        self.content[name].as_i64().unwrap_or(default)
    }

    /// The level needed to send the state event `kind`.
    pub fn state_event(&self, kind: &str) -> i64 {
        self.content["events"][kind].as_i64().or_else(|| self.content["state_default"].as_i64()).unwrap_or(50)
    }

    /// The raw content, for building a modified copy.
    pub fn content(&self) -> &Value {
        &self.content
    }
}

/// Follows profile changes into the rooms a user is joined to, as `m.room.member` updates.
pub fn spawn_profile_propagation(state: AppState) {
    let mut rx = state.profile_changes.subscribe();
    tokio::spawn(async move {
        loop {
            let change = match rx.recv().await {
                Ok(c) => c,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "profile propagation lagged");
                    continue;
                }
                Err(_) => return,
            };
            if let Err(e) = propagate_profile(&state, &change).await {
                tracing::warn!(user_id = %change.user_id, error = %e, "profile propagation failed");
            }
        }
    });
}

async fn propagate_profile(state: &AppState, change: &crate::users::profile::ProfileChange) -> ApiResult<()> {
    for (_, room_id) in storage::rooms::joined_room_ids_and_nids(&state.db, &change.user_id).await? {
        let room = Room::load(state, &room_id).await?;
        let mut content = current_content(state, &room, "m.room.member", &change.user_id)
            .await?
            .unwrap_or_else(|| json!({ "membership": "join" }));
        if content["membership"] != "join" {
            continue;
        }
        for key in ["displayname", "avatar_url"] {
            match change.profile.get(key) {
                Some(v) => content[key] = v.clone(),
                None => {
                    if let Some(o) = content.as_object_mut() {
                        o.remove(key);
                    }
                }
            }
        }
        send(state, &room, &change.user_id, NewEvent::state("m.room.member", &change.user_id, content), None).await?;
    }
    Ok(())
}

#[cfg(test)]
mod proptests {
    use proptest::prelude::*;
    use serde_json::{Value, json};

    proptest! {
        /// Canonical JSON never panics; it refuses exactly floats and integers outside
        /// ±(2^53 - 1); what it accepts serialises to text that parses back to the same value,
        /// with object keys sorted.
        #[test]
        fn canonical_json(content in crate::http::extract::testing::json()) {
            let ev = json!({ "type": "m.room.message", "content": content });
            fn representable(v: &Value) -> bool {
                match v {
                    Value::Number(n) => n.as_i64().is_some_and(|i| i.abs() <= 9_007_199_254_740_991),
                    Value::Array(a) => a.iter().all(representable),
                    Value::Object(o) => o.values().all(representable),
                    _ => true,
                }
            }
            match super::to_canonical(ev.clone()) {
                Ok(obj) => {
                    prop_assert!(representable(&ev));
                    let text = serde_json::to_string(&obj).unwrap();
                    let back: Value = serde_json::from_str(&text).unwrap();
                    prop_assert_eq!(&back, &ev);
                    let again = serde_json::to_string(&super::to_canonical(back).unwrap()).unwrap();
                    prop_assert_eq!(again, text);
                }
                Err(e) => {
                    prop_assert!(!representable(&ev));
                    prop_assert_eq!(e.errcode, "M_BAD_JSON");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The spec's cryptographic test vectors (appendices, "Signing details") with the key seed
    //! `YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1`, key ID `ed25519:1`, server `domain`.
    use ruma::room_version_rules::RoomVersionRules;
    use ruma::signatures::Ed25519KeyPair;
    use serde_json::json;

    use super::to_canonical;

    fn key() -> Ed25519KeyPair {
        let seed = crate::keys::decode_base64_lenient("YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1").unwrap();
        let k = crate::keys::ServerKey::from_seed("ed25519:1".into(), &seed).unwrap();
        Ed25519KeyPair::from_der(&k.pkcs8_der().unwrap(), "1".into()).unwrap()
    }

    #[test]
    fn signing_json_vectors() {
        let mut empty = to_canonical(json!({})).unwrap();
        ruma::signatures::sign_json("domain", &key(), &mut empty).unwrap();
        assert_eq!(
            serde_json::to_value(&empty).unwrap()["signatures"]["domain"]["ed25519:1"],
            "K8280/U9SSy9IVtjBuVeLr+HpOB4BQFWbg+UZaADMtTdGYI7Geitb76LTrr5QV/7Xg4ahLwYGYZzuHGZKM5ZAQ"
        );
        let mut two = to_canonical(json!({ "one": 1, "two": "Two" })).unwrap();
        ruma::signatures::sign_json("domain", &key(), &mut two).unwrap();
        assert_eq!(
            serde_json::to_value(&two).unwrap()["signatures"]["domain"]["ed25519:1"],
            "KqmLSbO39/Bzb0QIYE82zqLwsA+PDzYIpIRA2sRQ4sL53+sN6/fpNSoqE7BP7vBZhG6kYdD13EIMJpvhJI+6Bw"
        );
    }

    #[test]
    fn event_hash_and_signature_vectors() {
        // Minimal event: the content hash.
        let minimal = to_canonical(json!({
            "room_id": "!x:domain", "sender": "@a:domain", "origin": "domain",
            "origin_server_ts": 1000000, "signatures": {}, "hashes": {}, "type": "X",
            "content": {}, "prev_events": [], "auth_events": [], "depth": 3,
            "unsigned": { "age_ts": 1000000 }
        }))
        .unwrap();
        let hash = ruma::signatures::content_hash(&minimal).unwrap();
        assert_eq!(hash.encode(), "5jM4wQpv6lnBo7CLIghJuHdW+s2CMBJPUOGOC89ncos");

        // Message event: hash and signature under the pre-v11 redaction algorithm (the spec's
        // example keeps `origin`, which only room versions up to 10 protect).
        let mut message = to_canonical(json!({
            "content": { "body": "Here is the message content" },
            "event_id": "$0:domain", "origin": "domain", "origin_server_ts": 1000000,
            "type": "m.room.message", "room_id": "!r:domain", "sender": "@u:domain",
            "signatures": {}, "unsigned": { "age_ts": 1000000 }
        }))
        .unwrap();
        ruma::signatures::hash_and_sign_event("domain", &key(), &mut message, &RoomVersionRules::V10.redaction)
            .unwrap();
        let v = serde_json::to_value(&message).unwrap();
        assert_eq!(v["hashes"]["sha256"], "onLKD1bGljeBWQhWZ1kaP9SorVmRQNdN5aM2JYU2n/g");
        assert_eq!(
            v["signatures"]["domain"]["ed25519:1"],
            "Wm+VzmOUOz08Ds+0NTWb1d4CZrVsJSikkeRxh6aCcUwu6pNC78FunoD7KNWzqFn241eYHYMGCA5McEiVPdhzBA"
        );
        // Under v11 redaction rules `origin` is not protected: the signature differs.
        let mut v11 = to_canonical(json!({
            "content": { "body": "Here is the message content" },
            "event_id": "$0:domain", "origin": "domain", "origin_server_ts": 1000000,
            "type": "m.room.message", "room_id": "!r:domain", "sender": "@u:domain"
        }))
        .unwrap();
        ruma::signatures::hash_and_sign_event("domain", &key(), &mut v11, &RoomVersionRules::V11.redaction).unwrap();
        assert_ne!(
            serde_json::to_value(&v11).unwrap()["signatures"]["domain"]["ed25519:1"],
            v["signatures"]["domain"]["ed25519:1"]
        );
    }

    #[test]
    fn event_ids_and_redaction_per_version() {
        let ev = json!({
            "type": "m.room.member", "state_key": "@u:domain", "sender": "@u:domain",
            "room_id": "!r:domain", "origin_server_ts": 5, "depth": 2, "prev_events": ["$a"], "auth_events": [],
            "content": { "membership": "join", "displayname": "U", "join_authorised_via_users_server": "@x:domain" }
        });
        for (rules, keeps_authorising_user) in
            [(RoomVersionRules::V6, false), (RoomVersionRules::V9, true), (RoomVersionRules::V12, true)]
        {
            let mut obj = to_canonical(ev.clone()).unwrap();
            ruma::signatures::hash_and_sign_event("domain", &key(), &mut obj, &rules.redaction).unwrap();
            let hash = ruma::signatures::reference_hash(&obj, &rules).unwrap();
            let id = ruma::EventId::new_v2_or_v3(&hash).unwrap();
            // v4+ event IDs: "$" + 43 URL-safe base64 characters.
            assert_eq!(id.as_str().len(), 44);
            assert!(!id.as_str().contains(['+', '/']));
            let redacted = ruma::canonical_json::redact(obj.clone(), &rules.redaction, None).unwrap();
            let content = serde_json::to_value(&redacted).unwrap()["content"].clone();
            assert_eq!(content["membership"], "join");
            assert!(content.get("displayname").is_none());
            assert_eq!(content.get("join_authorised_via_users_server").is_some(), keeps_authorising_user);
            // The reference hash ignores non-protected content: the redacted copy has the same ID.
            assert_eq!(ruma::signatures::reference_hash(&redacted, &rules).unwrap(), hash);
        }
    }
}
