//! Durable, at-least-once delivery of transactions to application services.
//!
//! One task per appservice with a URL or the WebSocket transport ([`run`]). Its durable position (`appservice_state`) says
//! up to which event-stream position every event was looked at. A pass reads the events after it
//! up to the event-stream watermark (nothing below it can still commit), keeps those the
//! appservice is interested in, and writes them as a transaction row (`appservice_txns`) *in the
//! same database transaction* that moves the position: a crash leaves either neither (the events
//! are read again) or both (the row is sent again, with the same transaction ID). A row is
//! deleted only after the appservice answered 2xx (over WebSocket: acknowledged the transaction,
//! `websocket.rs`). Failures are retried with exponential backoff
//! (`appservices.retry_*`), forever, oldest transaction first, so order is kept.
//!
//! Ephemeral events (typing, receipts: MSC2409), to-device messages (MSC2409/MSC4203) and device
//! list changes (MSC3202) are queued in memory ([`Outbox`]) and join the next transaction; once
//! in a transaction row they are as durable as events, before that a crash loses them (they are
//! ephemeral by nature; Synapse does the same for typing).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};

use super::Registration;
use crate::rooms::Room;
use crate::state::AppState;
use crate::storage;
use crate::storage::events::EventRow;

/// Most items waiting in one in-memory queue of one appservice (the oldest are dropped).
const MAX_QUEUED: usize = 10_000;

#[derive(Default)]
struct Queued {
    ephemeral: VecDeque<Value>,
    to_device: VecDeque<Value>,
    changed: BTreeSet<String>,
    left: BTreeSet<String>,
}

/// In-memory queues and wake-ups of the delivery tasks.
#[derive(Default)]
pub struct Outbox {
    queues: Mutex<HashMap<String, Queued>>,
    wakers: Mutex<HashMap<String, Arc<Notify>>>,
}

impl Outbox {
    fn waker(&self, id: &str) -> Arc<Notify> {
        self.wakers.lock().entry(id.to_owned()).or_default().clone()
    }

    fn push(&self, id: &str, f: impl FnOnce(&mut Queued)) {
        {
            let mut q = self.queues.lock();
            let entry = q.entry(id.to_owned()).or_default();
            f(entry);
            while entry.ephemeral.len() > MAX_QUEUED {
                entry.ephemeral.pop_front();
            }
            while entry.to_device.len() > MAX_QUEUED {
                entry.to_device.pop_front();
            }
        }
        self.waker(id).notify_one();
    }

    fn take(&self, id: &str, max: usize) -> Queued {
        let mut q = self.queues.lock();
        let Some(entry) = q.get_mut(id) else { return Queued::default() };
        let n = entry.ephemeral.len().min(max);
        let m = entry.to_device.len().min(max);
        Queued {
            ephemeral: entry.ephemeral.drain(..n).collect(),
            to_device: entry.to_device.drain(..m).collect(),
            changed: std::mem::take(&mut entry.changed),
            left: std::mem::take(&mut entry.left),
        }
    }
}

/// The HTTP client for appservices: no redirects, no proxy, the configured timeout. Appservice
/// URLs come from the administrator's registration files, so loopback and private addresses are
/// allowed (bridges usually run next to the homeserver).
pub fn http_client(timeout: Duration) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .user_agent(concat!("Parvis/", env!("CARGO_PKG_VERSION")))
        .build()?)
}

/// Starts one delivery task per appservice that has a URL, each under its lease
/// (`appservice:<id>`): with several instances, one delivers at a time. An appservice on a
/// WebSocket is delivered by the instance its socket is connected to: only that one competes.
pub fn spawn_all(state: &AppState, stop: &watch::Receiver<bool>) -> Vec<tokio::task::JoinHandle<anyhow::Result<()>>> {
    state
        .appservices
        .all()
        .iter()
        .filter(|r| r.delivers())
        .map(|r| {
            let gate: Option<Box<dyn Fn() -> bool + Send + Sync>> = if r.websocket {
                let (s, id) = (state.clone(), r.id.clone());
                Some(Box::new(move || s.appservice_sockets.is_connected(&id)))
            } else {
                None
            };
            let (s, reg) = (state.clone(), r.clone());
            tokio::spawn(crate::cluster::lease::run(
                state.clone(),
                format!("appservice:{}", r.id),
                stop.clone(),
                gate,
                move |stop| run(s.clone(), reg.clone(), stop),
            ))
        })
        .collect()
}

/// Sleeps `d` unless the server stops first (then `true`).
async fn sleep_or_stop(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = stop.wait_for(|s| *s) => true,
    }
}

/// The delivery loop of one appservice.
pub async fn run(state: AppState, reg: Arc<Registration>, mut stop: watch::Receiver<bool>) -> anyhow::Result<()> {
    let cfg = &state.config.appservices;
    let initial = Duration::from_millis(cfg.retry_initial_ms);
    let max = Duration::from_secs(cfg.retry_max_secs);
    let timeout = Duration::from_secs(cfg.request_timeout_secs);
    let mut backoff = initial;
    let mut events = state.event_stream.subscribe();
    let waker = state.appservice_outbox.waker(&reg.id);
    let mut pos = loop {
        let start = *state.event_stream.borrow();
        match storage::appservice::position(&state.db, &reg.id, start).await {
            Ok(p) => break p,
            Err(e) => {
                tracing::warn!(appservice = %reg.id, error = %e, "cannot read the appservice's position");
                if sleep_or_stop(backoff, &mut stop).await {
                    return Ok(());
                }
                backoff = (backoff * 2).min(max);
            }
        }
    };
    backoff = initial;
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        // 1. What earlier passes (or processes) built and the appservice has not acknowledged.
        let pending = match storage::appservice::pending(&state.db, &reg.id, 1).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(appservice = %reg.id, error = %e, "cannot read pending transactions");
                if sleep_or_stop(backoff, &mut stop).await {
                    return Ok(());
                }
                backoff = (backoff * 2).min(max);
                continue;
            }
        };
        if let Some(txn) = pending.into_iter().next() {
            let outcome = if reg.websocket {
                // Over the appservice's socket: waits (without backoff) until it is connected;
                // a socket that closes before acknowledging means "send again on the next one".
                let r = tokio::select! {
                    r = state.appservice_sockets.deliver(&reg.id, txn.txn_id, &txn.body, timeout) => r,
                    _ = stop.wait_for(|s| *s) => return Ok(()),
                };
                match r {
                    Err(super::websocket::DeliverError::Closed) => {
                        tracing::debug!(appservice = %reg.id, txn_id = txn.txn_id, "socket closed before the acknowledgement");
                        continue;
                    }
                    r => r.map_err(anyhow::Error::from),
                }
            } else {
                tokio::select! {
                    r = send_transaction(&state, &reg, txn.txn_id, &txn.body) => r,
                    _ = stop.wait_for(|s| *s) => return Ok(()),
                }
            };
            match outcome {
                Ok(()) => {
                    tracing::debug!(appservice = %reg.id, txn_id = txn.txn_id, events = txn.event_count, "transaction delivered");
                    if let Err(e) = storage::appservice::complete(&state.db, &reg.id, txn.txn_id).await {
                        tracing::warn!(appservice = %reg.id, error = %e, "cannot record a delivered transaction");
                    }
                    backoff = initial;
                }
                Err(e) => {
                    tracing::warn!(appservice = %reg.id, txn_id = txn.txn_id, error = %e, retry_in = ?backoff,
                        "transaction failed; retrying");
                    if sleep_or_stop(backoff, &mut stop).await {
                        return Ok(());
                    }
                    backoff = (backoff * 2).min(max);
                }
            }
            continue;
        }
        // 2. Build the next transaction.
        let watermark = *events.borrow_and_update();
        match build(&state, &reg, pos, watermark).await {
            Ok((new_pos, full)) => {
                pos = new_pos;
                if full {
                    continue;
                }
            }
            Err(e) => {
                tracing::warn!(appservice = %reg.id, error = %e, "cannot build a transaction");
                if sleep_or_stop(backoff, &mut stop).await {
                    return Ok(());
                }
                backoff = (backoff * 2).min(max);
                continue;
            }
        }
        // 3. Wait for news. The wake-ups are registered before the next look (a `Notify`
        // permit and the watch's version survive until then).
        tokio::select! {
            _ = events.changed() => {}
            _ = waker.notified() => {}
            _ = stop.wait_for(|s| *s) => return Ok(()),
            // A slow look costs little (ephemeral data queued by another path).
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

/// Reads events after `pos` up to `watermark`, and the queued ephemeral data; stores a
/// transaction when there is anything to send. Returns the new position and whether the page
/// was full (more to read at once).
async fn build(state: &AppState, reg: &Registration, pos: i64, watermark: i64) -> anyhow::Result<(i64, bool)> {
    let limit = state.config.appservices.max_events_per_transaction as usize;
    let rows = if watermark > pos {
        storage::appservice::events_after(&state.db, pos, watermark, limit as i64).await?
    } else {
        Vec::new()
    };
    let full = rows.len() == limit;
    let new_pos = if full { rows.last().map_or(watermark, |r| r.stream_ordering) } else { watermark.max(pos) };
    let mut interest = Interest::new(reg);
    let mut events = Vec::new();
    for row in &rows {
        if let Some(room) = interest.interesting(state, row).await? {
            events.push(crate::rooms::client::format(&room, row, None));
        }
    }
    let queued = state.appservice_outbox.take(&reg.id, limit);
    let has_queued = !queued.ephemeral.is_empty()
        || !queued.to_device.is_empty()
        || !queued.changed.is_empty()
        || !queued.left.is_empty();
    if events.is_empty() && !has_queued {
        if new_pos > pos {
            storage::appservice::set_position(&state.db, &reg.id, new_pos).await?;
        }
        return Ok((new_pos, full));
    }
    let count = events.len() + queued.ephemeral.len() + queued.to_device.len();
    let body = transaction_body(reg, events, queued);
    let mut tx = state.db.begin().await?;
    let (locked_pos, _) = storage::appservice::lock_state(&mut tx, &reg.id).await?;
    if locked_pos > pos {
        // Another process moved on meanwhile: start again from its position.
        tx.rollback().await?;
        return Ok((locked_pos, true));
    }
    let txn_id = storage::appservice::insert_txn(&mut tx, &reg.id, new_pos, &body, count as i32).await?;
    tx.commit().await?;
    tracing::debug!(appservice = %reg.id, txn_id, count, "transaction stored");
    Ok((new_pos, true))
}

fn transaction_body(reg: &Registration, events: Vec<Value>, q: Queued) -> Value {
    let mut body = json!({ "events": events });
    let ephemeral: Vec<Value> = q.ephemeral.into();
    if reg.receive_ephemeral {
        body["ephemeral"] = json!(ephemeral);
    }
    if reg.unstable_ephemeral {
        body["de.sorunome.msc2409.ephemeral"] = json!(ephemeral);
    }
    if reg.wants_ephemeral() && !q.to_device.is_empty() {
        let to_device: Vec<Value> = q.to_device.into();
        body["de.sorunome.msc2409.to_device"] = json!(to_device);
    }
    if reg.msc3202 && (!q.changed.is_empty() || !q.left.is_empty()) {
        body["org.matrix.msc3202.device_lists"] = json!({ "changed": q.changed, "left": q.left });
    }
    body
}

/// The interest of one appservice in the events of one pass, with the rooms' facts cached.
struct Interest<'a> {
    reg: &'a Registration,
    rooms: HashMap<i64, (Room, bool)>,
}

impl<'a> Interest<'a> {
    fn new(reg: &'a Registration) -> Self {
        Self { reg, rooms: HashMap::new() }
    }

    /// The event's room when the appservice is interested in the event (Synapse's rules: the
    /// sender or the member event's subject in the user namespace, or the room by ID, alias or a
    /// joined member in the user namespace).
    async fn interesting(&mut self, state: &AppState, row: &EventRow) -> anyhow::Result<Option<Room>> {
        let by_user = self.reg.is_interested_in_user(&row.sender)
            || (row.event_type == "m.room.member"
                && row.state_key.as_deref().is_some_and(|k| self.reg.is_interested_in_user(k)));
        if !self.rooms.contains_key(&row.room_nid) {
            let Some(room_row) = storage::rooms::by_nid(&state.db, row.room_nid).await? else { return Ok(None) };
            let room = Room::from_row(&room_row).map_err(|e| anyhow::anyhow!("room {}: {e:?}", row.room_nid))?;
            let mut interested = self.reg.is_room_in_namespace(room.room_id.as_str());
            if !interested && !self.reg.aliases.is_empty() {
                interested = storage::appservice::room_aliases(&state.db, row.room_nid)
                    .await?
                    .iter()
                    .any(|a| self.reg.is_alias_in_namespace(a));
            }
            if !interested {
                interested = storage::appservice::joined_users(&state.db, row.room_nid)
                    .await?
                    .iter()
                    .any(|u| self.reg.is_interested_in_user(u));
            }
            self.rooms.insert(row.room_nid, (room, interested));
        }
        let (room, interested) = &self.rooms[&row.room_nid];
        Ok((by_user || *interested).then(|| room.clone()))
    }
}

/// Whether an appservice is interested in a room (for ephemeral events).
async fn interested_in_room(state: &AppState, reg: &Registration, room_nid: i64, room_id: &str) -> sqlx::Result<bool> {
    if reg.is_room_in_namespace(room_id) {
        return Ok(true);
    }
    if !reg.aliases.is_empty()
        && storage::appservice::room_aliases(&state.db, room_nid).await?.iter().any(|a| reg.is_alias_in_namespace(a))
    {
        return Ok(true);
    }
    Ok(storage::appservice::joined_users(&state.db, room_nid).await?.iter().any(|u| reg.is_interested_in_user(u)))
}

/// Sends one transaction: `PUT {url}/_matrix/app/v1/transactions/{txnId}` with the `hs_token`
/// as bearer; an appservice answering 404 `M_UNRECOGNIZED` there gets the legacy path
/// `{url}/transactions/{txnId}?access_token=` (spec: fall back for older appservices).
async fn send_transaction(state: &AppState, reg: &Registration, txn_id: i64, body: &Value) -> anyhow::Result<()> {
    let url = reg.url.as_deref().ok_or_else(|| anyhow::anyhow!("no URL"))?;
    let http = &state.appservice_http;
    let resp = http
        .put(format!("{url}/_matrix/app/v1/transactions/{txn_id}"))
        .bearer_auth(&reg.hs_token)
        .json(body)
        .send()
        .await?;
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    let text = resp.text().await.unwrap_or_default();
    let unrecognized = status == reqwest::StatusCode::NOT_FOUND
        && serde_json::from_str::<Value>(&text).is_ok_and(|v| v["errcode"] == "M_UNRECOGNIZED");
    if unrecognized {
        let legacy = http
            .put(format!("{url}/transactions/{txn_id}?access_token={}", super::client::enc(&reg.hs_token)))
            .json(body)
            .send()
            .await?;
        if legacy.status().is_success() {
            return Ok(());
        }
        anyhow::bail!("legacy path answered {}", legacy.status());
    }
    anyhow::bail!("answered {status}: {}", text.chars().take(200).collect::<String>())
}

// Hooks called by the rest of the server.

/// Typing changed in a room: a `m.typing` ephemeral event to interested appservices.
pub fn typing_changed(state: &AppState, room_nid: i64) {
    if !state.appservices.all().iter().any(|r| r.wants_ephemeral() && r.delivers()) {
        return;
    }
    let state = state.clone();
    tokio::spawn(async move {
        let Ok(Some(row)) = storage::rooms::by_nid(&state.db, room_nid).await else { return };
        let users = state.typing.typing_users(room_nid);
        let ev = json!({ "type": "m.typing", "room_id": row.room_id, "content": { "user_ids": users } });
        ephemeral(&state, room_nid, &row.room_id, ev).await;
    });
}

/// A receipt was recorded.
pub fn receipt_recorded(
    state: &AppState,
    room_nid: i64,
    user: &str,
    receipt_type: &str,
    event_id: &str,
    thread: Option<&str>,
) {
    if !state.appservices.all().iter().any(|r| r.wants_ephemeral() && r.delivers()) {
        return;
    }
    let mut data = json!({ "ts": storage::now_ms() });
    if let Some(t) = thread {
        data["thread_id"] = json!(t);
    }
    let content = json!({ event_id: { receipt_type: { user: data } } });
    let state = state.clone();
    tokio::spawn(async move {
        let Ok(Some(row)) = storage::rooms::by_nid(&state.db, room_nid).await else { return };
        let ev = json!({ "type": "m.receipt", "room_id": row.room_id, "content": content });
        ephemeral(&state, room_nid, &row.room_id, ev).await;
    });
}

async fn ephemeral(state: &AppState, room_nid: i64, room_id: &str, ev: Value) {
    for reg in state.appservices.all().iter().filter(|r| r.wants_ephemeral() && r.delivers()) {
        match interested_in_room(state, reg, room_nid, room_id).await {
            Ok(true) => state.appservice_outbox.push(&reg.id, |q| q.ephemeral.push_back(ev.clone())),
            Ok(false) => {}
            Err(e) => tracing::warn!(appservice = %reg.id, error = %e, "ephemeral event not queued"),
        }
    }
}

/// To-device messages were queued for local devices: those of users in an appservice's
/// namespace go to it too (MSC2409 / MSC4203).
pub fn to_device_sent(state: &AppState, sender: &str, event_type: &str, rows: &[(String, String, Value)]) {
    for reg in state.appservices.all().iter().filter(|r| r.wants_ephemeral() && r.delivers()) {
        let mine: Vec<Value> = rows
            .iter()
            .filter(|(user, _, _)| reg.is_interested_in_user(user))
            .map(|(user, device, content)| {
                json!({ "type": event_type, "sender": sender, "to_user_id": user, "to_device_id": device, "content": content })
            })
            .collect();
        if !mine.is_empty() {
            state.appservice_outbox.push(&reg.id, |q| q.to_device.extend(mine));
        }
    }
}

/// A user's device list changed (MSC3202): appservices with `org.matrix.msc3202` whose users
/// share a room with them, or who own them, learn it in `device_lists.changed`.
pub fn device_list_changed(state: &AppState, user: &str) {
    if !state.appservices.all().iter().any(|r| r.msc3202 && r.delivers()) {
        return;
    }
    let state = state.clone();
    let user = user.to_owned();
    tokio::spawn(async move {
        let co = match crate::e2ee::co_members(&state, &user).await {
            Ok(c) => c,
            Err(_) => return,
        };
        for reg in state.appservices.all().iter().filter(|r| r.msc3202 && r.delivers()) {
            if reg.is_interested_in_user(&user) || co.iter().any(|u| reg.is_interested_in_user(u)) {
                state.appservice_outbox.push(&reg.id, |q| {
                    q.left.remove(&user);
                    q.changed.insert(user.clone());
                });
            }
        }
    });
}
