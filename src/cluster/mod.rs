//! Several instances on one database (issue 20): what one instance must learn of the others.
//!
//! Every durable state is in PostgreSQL, so any instance can answer any request; what each keeps
//! in memory (sync caches and heads, stream watermarks, the token cache, typing) must follow the
//! others' writes. Two channels, both on PostgreSQL itself:
//!
//! - **The streams, read from the database.** While other instances are alive ("multi" mode), a
//!   poller ([`poll_loop`]) reads the frontier of every stream (`parvis_stream_frontier()`,
//!   migration 0028) and the rows each stream gained since it last looked (rooms with new events
//!   and their member changes, account data, receipts, presence, device lists, to-device). It
//!   raises the sync heads, then moves the watermarks, then wakes the syncs concerned. A
//!   notification lost or late costs latency, never an event: the database is the source.
//! - **Hints and ephemeral data, by `LISTEN/NOTIFY`** on the channel `parvis`: "something
//!   committed, look now" (so the poller runs at once rather than on its timer), typing, token
//!   revocation (acknowledged by every peer before the revoking request returns), one-time key
//!   count invalidation, room cache invalidation, delayed-event wake-ups, and the membership
//!   handshake (`hello`/`ack`/`bye`).
//!
//! The event stream's watermark across instances is explained in ARCHITECTURE.md ("Several
//! instances"); alone, an instance keeps the in-process watermark (no query).
//!
//! Membership: `cluster_instances` rows with a heartbeat. A starting instance inserts its row,
//! listens, says `hello` and waits (bounded) for the `ack` of every instance whose heartbeat is
//! fresh before it serves; an instance hearing `hello` switches to multi mode before it answers.
//! An instance whose heartbeat stops is dropped after [`DEAD_AFTER_MS`]; alone again for that
//! long, an instance returns to the in-process watermark.

pub mod lease;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgListener;
use tokio::sync::{Notify, mpsc, oneshot, watch};

use crate::state::AppState;
use crate::storage::{self, now_ms};

/// The `LISTEN/NOTIFY` channel (channels are per database).
pub const CHANNEL: &str = "parvis";
/// The shared advisory lock every transaction taking event stream positions holds first (see
/// `parvis_stream_frontier` in migration 0028, which reads it as classid 0x50617277, objid 0).
pub const EVENT_WRITERS_LOCK: i64 = 0x5061_7277_0000_0000;
/// An instance silent for this long is considered gone.
pub const DEAD_AFTER_MS: i64 = 10_000;
/// Longest a start waits for the `ack` of the instances already running.
const HELLO_WAIT: Duration = Duration::from_secs(3);
/// Longest a token revocation waits for every peer to confirm it evicted the tokens.
const EVICT_WAIT: Duration = Duration::from_secs(2);
/// Least time between two polls, so a busy cluster polls a bounded number of times per second.
const MIN_POLL_GAP: Duration = Duration::from_millis(2);
/// NOTIFY payloads are limited to 8000 bytes; token hashes are sent in chunks below it.
const HASHES_PER_MESSAGE: usize = 80;

/// What instances tell each other.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "k", rename_all = "snake_case")]
pub enum Message {
    /// A new instance: answer with `ack`.
    Hello,
    Ack {
        to: String,
    },
    /// A clean shutdown.
    Bye,
    /// Something was committed: look at the streams now.
    Poll,
    /// `user` started typing in `room` until `until_ms` (wall clock), or stopped (`None`).
    Typing {
        room: i64,
        user: String,
        until_ms: Option<i64>,
    },
    /// Access tokens revoked (SHA-256, hex): evict them, then confirm with `evicted`.
    Tokens {
        id: u64,
        hashes: Vec<String>,
    },
    Evicted {
        to: String,
        id: u64,
    },
    /// One-time key counts of a device (or of all the user's devices) changed.
    KeyCounts {
        user: String,
        device: Option<String>,
    },
    /// A room's cached entry is no longer trustworthy (purge, unknown commit outcome).
    RoomInvalidated {
        room: i64,
    },
    /// A delayed event was scheduled or restarted: the sender may need to wake earlier.
    DelayedWake,
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    /// The sending instance.
    i: String,
    #[serde(flatten)]
    m: Message,
}

/// Positions of every stream the poller has applied (heads raised, watermark moved).
#[derive(Debug, Default, Clone, Copy)]
struct Known {
    events: i64,
    account_data: i64,
    receipts: i64,
    presence: i64,
    device_lists: i64,
    to_device: i64,
}

#[derive(Default)]
struct Frontier {
    /// Event stream positions waiting for the writers that were in flight when they were read:
    /// (position, those writers' virtual transaction IDs).
    candidates: Vec<(i64, Vec<String>)>,
}

impl Frontier {
    /// Records the frontier just read (`events`, with the `writers` in flight) and returns the
    /// highest position now safe: that of the newest candidate none of whose writers is still in
    /// flight (older candidates are then safe too: a writer still running now was running when
    /// they were read, so it would be among their writers as well).
    fn resolve(&mut self, events: i64, writers: &[String]) -> Option<i64> {
        self.candidates.push((events, writers.to_vec()));
        let current: HashSet<&String> = writers.iter().collect();
        let safe = self.candidates.iter().rposition(|(_, w)| w.iter().all(|x| !current.contains(x)));
        let pos = safe.map(|i| self.candidates[i].0);
        if let Some(i) = safe {
            self.candidates.drain(..=i);
        }
        // Bounded: under a continuous load the oldest unresolved candidates are superseded by
        // newer ones holding the same writers.
        if self.candidates.len() > 64 {
            let n = self.candidates.len() - 64;
            self.candidates.drain(..n);
        }
        pos
    }
}

/// A token revocation sent to the peers: those who have not confirmed it yet, and the waiter.
type PendingEviction = (HashSet<String>, Option<oneshot::Sender<()>>);
/// Token hashes to evict from this instance's cache, and who to tell when done.
pub type EvictionRequest = (Vec<Vec<u8>>, oneshot::Sender<()>);

/// This instance's view of the cluster.
pub struct Cluster {
    pub instance_id: String,
    multi: AtomicBool,
    /// Peers and when they were last heard of (heartbeat row or message), in ms.
    peers: Mutex<HashMap<String, i64>>,
    outgoing: mpsc::UnboundedSender<String>,
    outgoing_rx: Mutex<Option<mpsc::UnboundedReceiver<String>>>,
    /// Wakes the poller.
    poll: Notify,
    acks: Mutex<HashSet<String>>,
    acked: Notify,
    next_id: AtomicU64,
    evictions: Mutex<HashMap<u64, PendingEviction>>,
    known: Mutex<Known>,
    frontier: Mutex<Frontier>,
    /// Token evictions received from peers, applied by the listener through this hook.
    evict_hook: Mutex<Option<mpsc::UnboundedSender<EvictionRequest>>>,
    /// Set once the stream positions are initialised ([`ready`]): before that, switching to
    /// multi mode only sets the flag.
    ready: AtomicBool,
    /// Stops the cluster's own tasks (listener, heartbeat, poller).
    stop: watch::Sender<bool>,
}

impl Default for Cluster {
    fn default() -> Self {
        Self::new()
    }
}

impl Cluster {
    pub fn new() -> Self {
        let (outgoing, rx) = mpsc::unbounded_channel();
        let mut id = [0u8; 8];
        id.copy_from_slice(&rand::random::<[u8; 8]>());
        Self {
            instance_id: hex::encode(id),
            multi: AtomicBool::new(false),
            peers: Mutex::default(),
            outgoing,
            outgoing_rx: Mutex::new(Some(rx)),
            poll: Notify::new(),
            acks: Mutex::default(),
            acked: Notify::new(),
            next_id: AtomicU64::new(1),
            evictions: Mutex::default(),
            known: Mutex::default(),
            frontier: Mutex::default(),
            evict_hook: Mutex::default(),
            ready: AtomicBool::new(false),
            stop: watch::Sender::new(false),
        }
    }

    /// True while other instances are alive: the streams are then followed through the database.
    pub fn is_multi(&self) -> bool {
        self.multi.load(Ordering::SeqCst)
    }

    /// The other live instances.
    pub fn peers(&self) -> Vec<String> {
        self.peers.lock().keys().cloned().collect()
    }

    /// Sends a message to the other instances (after this call returns; best effort). Alone, it
    /// is dropped.
    pub fn publish(&self, m: Message) {
        if !self.is_multi() {
            return;
        }
        self.publish_always(m);
    }

    fn publish_always(&self, m: Message) {
        if let Ok(text) = serde_json::to_string(&Envelope { i: self.instance_id.clone(), m }) {
            let _ = self.outgoing.send(text);
        }
    }

    /// After a local commit on any stream: other instances should look now.
    pub fn committed(&self) {
        if self.is_multi() {
            self.poll.notify_one();
            self.publish(Message::Poll);
        }
    }

    /// Revoked access tokens: every peer evicts them from its token cache before this returns
    /// (or [`EVICT_WAIT`] passed: a peer that does not answer is presumably dead).
    pub async fn tokens_revoked(&self, hashes: &[Vec<u8>]) {
        if !self.is_multi() || hashes.is_empty() {
            return;
        }
        let mut waits = Vec::new();
        for chunk in hashes.chunks(HASHES_PER_MESSAGE) {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let peers: HashSet<String> = self.peers.lock().keys().cloned().collect();
            if peers.is_empty() {
                return;
            }
            let (tx, rx) = oneshot::channel();
            self.evictions.lock().insert(id, (peers, Some(tx)));
            self.publish(Message::Tokens { id, hashes: chunk.iter().map(hex::encode).collect() });
            waits.push((id, rx));
        }
        for (id, rx) in waits {
            if tokio::time::timeout(EVICT_WAIT, rx).await.is_err() {
                let left = self.evictions.lock().remove(&id).map(|(p, _)| p).unwrap_or_default();
                tracing::warn!(?left, "token revocation not confirmed by every instance in time");
            }
        }
    }

    /// The channel on which the listener hands evictions received from peers to the auth
    /// service (set once at start-up).
    pub fn set_evict_hook(&self, tx: mpsc::UnboundedSender<EvictionRequest>) {
        *self.evict_hook.lock() = Some(tx);
    }

    fn peer_seen(&self, peer: &str, at: i64) -> bool {
        let mut p = self.peers.lock();
        let new = !p.contains_key(peer);
        let e = p.entry(peer.to_owned()).or_insert(at);
        *e = (*e).max(at);
        new
    }

    fn peer_gone(&self, peer: &str) {
        self.peers.lock().remove(peer);
        // Evictions waiting for it will not be confirmed by it.
        let mut ev = self.evictions.lock();
        ev.retain(|_, (waiting, done)| {
            waiting.remove(peer);
            if waiting.is_empty() {
                if let Some(d) = done.take() {
                    let _ = d.send(());
                }
                false
            } else {
                true
            }
        });
    }
}

/// Joins the cluster before the instance serves: records this instance, starts the listener and
/// the publisher, and (when others are alive) waits for their acknowledgement and switches to
/// multi mode. Must run before anything takes stream positions (right after migrations).
pub async fn join(state: &AppState) -> anyhow::Result<()> {
    let c = &state.cluster;
    let stop = c.stop.subscribe();
    storage::cluster::register(&state.db, &c.instance_id, now_ms()).await?;
    let mut listener = PgListener::connect_with(&state.db).await?;
    listener.listen(CHANNEL).await?;
    if let Some(rx) = c.outgoing_rx.lock().take() {
        tokio::spawn(publisher(state.clone(), rx));
    }
    tokio::spawn(listen_loop(state.clone(), listener, stop.clone()));
    let alive = storage::cluster::alive(&state.db, &c.instance_id, now_ms() - DEAD_AFTER_MS).await?;
    if !alive.is_empty() {
        for p in &alive {
            c.peer_seen(p, now_ms());
        }
        c.multi.store(true, Ordering::SeqCst);
        c.publish_always(Message::Hello);
        let deadline = tokio::time::Instant::now() + HELLO_WAIT;
        loop {
            let waiting = c.acked.notified();
            let missing = {
                let acks = c.acks.lock();
                alive.iter().any(|p| !acks.contains(p))
            };
            if !missing || tokio::time::timeout_at(deadline, waiting).await.is_err() {
                break;
            }
        }
        let acks = c.acks.lock().clone();
        let silent: Vec<&String> = alive.iter().filter(|p| !acks.contains(*p)).collect();
        if !silent.is_empty() {
            tracing::warn!(?silent, "instances with a fresh heartbeat did not acknowledge this one");
        }
        tracing::info!(instance = %c.instance_id, peers = alive.len(), "joined a cluster of instances");
    } else {
        // Alone (for now): say hello anyway, so that an instance starting at the same moment
        // learns of this one.
        c.publish_always(Message::Hello);
        tracing::info!(instance = %c.instance_id, "no other instance on this database");
    }
    Ok(())
}

/// After the stream positions were read at start-up (`sync::init`): the poller continues from
/// them. Starts the heartbeat and the poller.
pub fn ready(state: &AppState) {
    let c = &state.cluster;
    c.ready.store(true, Ordering::SeqCst);
    if c.multi.swap(false, Ordering::SeqCst) {
        enter_multi(state);
    }
    state.metrics.set_cluster_instances(c.peers.lock().len() as i64 + 1);
    spawn_evictions(state);
    tokio::spawn(heartbeat_loop(state.clone(), c.stop.subscribe()));
    tokio::spawn(poll_loop(state.clone(), c.stop.subscribe()));
}

/// A clean shutdown: peers drop this instance at once.
pub async fn leave(state: &AppState) {
    let c = &state.cluster;
    if let Err(e) = storage::cluster::unregister(&state.db, &c.instance_id).await {
        tracing::debug!(error = %e, "could not remove this instance's row");
    }
    let bye = serde_json::to_string(&Envelope { i: c.instance_id.clone(), m: Message::Bye }).unwrap_or_default();
    if let Err(e) = storage::cluster::notify(&state.db, CHANNEL, &[bye]).await {
        tracing::debug!(error = %e, "could not say goodbye to the other instances");
    }
    let _ = c.stop.send(true);
}

/// Switches to following the streams through the database.
fn enter_multi(state: &AppState) {
    let c = &state.cluster;
    if !c.ready.load(Ordering::SeqCst) {
        c.multi.store(true, Ordering::SeqCst);
        return;
    }
    if c.multi.swap(true, Ordering::SeqCst) {
        return;
    }
    // From now on the in-process writers no longer move the watermarks; the poller continues
    // from where they are.
    let mut k = c.known.lock();
    k.events = *state.event_stream.borrow();
    k.account_data = *state.account_data_stream.borrow();
    k.receipts = *state.receipt_stream.borrow();
    k.presence = *state.presence_stream.borrow();
    k.device_lists = *state.device_list_stream.borrow();
    k.to_device = *state.to_device_stream.borrow();
    state.sync.set_multi(true, k.events);
    state.metrics.set_cluster_instances(c.peers.lock().len() as i64 + 1);
    tracing::info!(instance = %c.instance_id, "other instances are alive: following the streams through the database");
    c.poll.notify_one();
}

/// Back to the in-process watermark once no other instance is alive.
fn leave_multi(state: &AppState) {
    let c = &state.cluster;
    if !c.multi.load(Ordering::SeqCst) {
        return;
    }
    let known = c.known.lock().events;
    state.sync.set_multi(false, known);
    c.multi.store(false, Ordering::SeqCst);
    state.metrics.set_cluster_instances(1);
    tracing::info!(instance = %c.instance_id, "no other instance is alive any more");
}

/// Sends queued messages, several per statement.
async fn publisher(state: AppState, mut rx: mpsc::UnboundedReceiver<String>) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, 64).await > 0 {
        // Consecutive "look now" hints are one.
        batch.dedup();
        let mut backoff = Duration::from_millis(50);
        loop {
            match storage::cluster::notify(&state.db, CHANNEL, &batch).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot notify the other instances; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    if backoff >= Duration::from_secs(2) && rx.is_closed() {
                        return;
                    }
                }
            }
        }
        batch.clear();
    }
}

async fn listen_loop(state: AppState, mut listener: PgListener, mut stop: watch::Receiver<bool>) {
    loop {
        let n = tokio::select! {
            n = listener.try_recv() => n,
            _ = stop.wait_for(|s| *s) => return,
        };
        match n {
            Ok(Some(n)) => handle(&state, n.payload()).await,
            // The connection was lost and is re-established by the next call: anything sent
            // meanwhile is lost, so look at the streams and the instances again.
            Ok(None) => {
                tracing::warn!("cluster listener reconnecting");
                state.cluster.poll.notify_one();
            }
            // The pool is closing (shutdown, or the end of a CLI command): let its connection go,
            // or closing the pool would wait for it forever.
            Err(sqlx::Error::PoolClosed) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cluster listener failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

async fn handle(state: &AppState, payload: &str) {
    let Ok(env) = serde_json::from_str::<Envelope>(payload) else {
        tracing::warn!(payload, "unreadable cluster message");
        return;
    };
    let c = &state.cluster;
    if env.i == c.instance_id {
        return;
    }
    if c.peer_seen(&env.i, now_ms()) && !matches!(env.m, Message::Bye) {
        enter_multi(state);
        state.metrics.set_cluster_instances(c.peers.lock().len() as i64 + 1);
    }
    match env.m {
        Message::Hello => {
            c.publish_always(Message::Ack { to: env.i });
        }
        Message::Ack { to } => {
            if to == c.instance_id {
                c.acks.lock().insert(env.i);
                c.acked.notify_waiters();
            }
        }
        Message::Bye => {
            c.peer_gone(&env.i);
            state.metrics.set_cluster_instances(c.peers.lock().len() as i64 + 1);
        }
        Message::Poll => c.poll.notify_one(),
        Message::Typing { room, user, until_ms } => {
            let until = until_ms.map(|t| Duration::from_millis((t - now_ms()).max(0) as u64));
            state.typing.apply_remote(room, &user, until);
        }
        Message::Tokens { id, hashes } => {
            let hashes: Vec<Vec<u8>> = hashes.iter().filter_map(|h| hex::decode(h).ok()).collect();
            let hook = c.evict_hook.lock().clone();
            if let Some(hook) = hook {
                let (tx, rx) = oneshot::channel();
                if hook.send((hashes, tx)).is_ok() {
                    let _ = rx.await;
                }
            }
            c.publish_always(Message::Evicted { to: env.i, id });
        }
        Message::Evicted { to, id } => {
            if to == c.instance_id {
                let mut ev = c.evictions.lock();
                if let Some((waiting, done)) = ev.get_mut(&id) {
                    waiting.remove(&env.i);
                    if waiting.is_empty() {
                        if let Some(d) = done.take() {
                            let _ = d.send(());
                        }
                        ev.remove(&id);
                    }
                }
            }
        }
        Message::KeyCounts { user, device } => state.sync.invalidate_key_counts(&user, device.as_deref()),
        Message::RoomInvalidated { room } => state.sync.invalidate_room(room),
        Message::DelayedWake => state.rtc.wake.notify_one(),
    }
}

/// Refreshes this instance's heartbeat and learns which instances are alive.
async fn heartbeat_loop(state: AppState, mut stop: watch::Receiver<bool>) {
    let period = Duration::from_millis(state.config.cluster.heartbeat_ms.max(100));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let now = now_ms();
        let c = &state.cluster;
        match storage::cluster::heartbeat(&state.db, &c.instance_id, now, now - DEAD_AFTER_MS).await {
            Ok(alive) => {
                for p in &alive {
                    if c.peer_seen(p, now) {
                        enter_multi(&state);
                    }
                }
                let gone: Vec<String> = c
                    .peers
                    .lock()
                    .iter()
                    .filter(|(p, seen)| !alive.contains(p) && now - **seen > DEAD_AFTER_MS)
                    .map(|(p, _)| p.clone())
                    .collect();
                for p in gone {
                    tracing::info!(peer = %p, "instance gone (no heartbeat)");
                    c.peer_gone(&p);
                }
                if c.peers.lock().is_empty() {
                    leave_multi(&state);
                }
                state.metrics.set_cluster_instances(c.peers.lock().len() as i64 + 1);
            }
            Err(e) => tracing::warn!(error = %e, "cluster heartbeat failed"),
        }
    }
}

/// Follows the streams through the database while other instances are alive.
async fn poll_loop(state: AppState, mut stop: watch::Receiver<bool>) {
    let fallback = Duration::from_millis(state.config.cluster.poll_interval_ms.max(10));
    let mut again = false;
    loop {
        let wait = if again { MIN_POLL_GAP } else { fallback };
        tokio::select! {
            _ = state.cluster.poll.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if !state.cluster.is_multi() {
            again = false;
            continue;
        }
        // Hints arriving while a poll runs are covered by the next one.
        tokio::time::sleep(MIN_POLL_GAP).await;
        match poll_once(&state).await {
            Ok(pending) => again = pending,
            Err(e) => {
                tracing::warn!(error = %e, "reading the streams failed");
                again = false;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One look at every stream. Returns true when event positions are still waiting for writers
/// in flight (look again soon).
pub async fn poll_once(state: &AppState) -> anyhow::Result<bool> {
    let f = storage::cluster::frontier(&state.db).await?;
    let c = &state.cluster;
    // The event stream: the highest candidate none of whose writers is still in flight.
    let safe_events = c.frontier.lock().resolve(f.events, &f.writers);
    let known = *c.known.lock();
    let mut next = known;

    if f.account_data > known.account_data {
        let rows = storage::cluster::account_data_between(&state.db, known.account_data, f.account_data).await?;
        for (user, data_type, pos) in rows {
            crate::push::eval::account_data_changed(state, &user, &data_type);
            state.sync.account_data_heads.raise(&user, pos);
            state.sync.wake_user(&user);
        }
        next.account_data = f.account_data;
        crate::state::advance(&state.account_data_stream, f.account_data);
    }
    if f.receipts > known.receipts {
        let rows = storage::cluster::receipts_between(&state.db, known.receipts, f.receipts).await?;
        crate::state::advance(&state.receipt_stream, f.receipts);
        for (room, pos) in &rows {
            state.sync.receipt_heads.raise(room, *pos);
        }
        for (room, _) in rows {
            state.sync.wake_room(room);
        }
        next.receipts = f.receipts;
    }
    if f.presence > known.presence {
        let rows = storage::cluster::presence_between(&state.db, known.presence, f.presence).await?;
        for (user, pos) in &rows {
            state.sync.presence_heads.raise(user, *pos);
        }
        crate::state::advance(&state.presence_stream, f.presence);
        for (user, _) in rows {
            crate::sync::presence_woken(state, &user);
        }
        next.presence = f.presence;
    }
    if f.device_lists > known.device_lists {
        let rows = storage::cluster::device_lists_between(&state.db, known.device_lists, f.device_lists).await?;
        for (user, pos) in &rows {
            state.sync.device_list_heads.raise(user, *pos);
            state.sync.invalidate_key_counts(user, None);
        }
        crate::state::advance(&state.device_list_stream, f.device_lists);
        for (user, _) in rows {
            crate::e2ee::device_list_woken(state, &user);
        }
        next.device_lists = f.device_lists;
    }
    // Acknowledged to-device messages are deleted, so the maximum can go down: only ever up.
    if f.to_device > known.to_device {
        let rows = storage::cluster::to_device_between(&state.db, known.to_device, f.to_device).await?;
        for (user, pos) in &rows {
            state.sync.to_device_heads.raise(user, *pos);
        }
        crate::state::advance(&state.to_device_stream, f.to_device);
        for (user, _) in rows {
            state.sync.wake_user(&user);
        }
        next.to_device = f.to_device;
    }
    if let Some(safe) = safe_events
        && safe > known.events
    {
        let rooms = storage::cluster::events_between(&state.db, known.events, safe).await?;
        let server_name = &state.config.server_name;
        let mut woken_users = Vec::new();
        for r in &rooms {
            state.sync.room_heads.raise(&r.room_nid, r.max_stream);
            for (user, pos) in &r.members {
                if crate::users::is_local(user, server_name) {
                    state.sync.user_heads.raise(user, *pos);
                    woken_users.push(user.clone());
                }
            }
        }
        // Heads first, then the watermark: a sync reading the new watermark sees the heads.
        state.sync.advance_events(&state.event_stream, safe, rooms.iter().map(|r| r.room_nid));
        for u in woken_users {
            state.sync.wake_user(&u);
        }
        next.events = safe;
    }
    *c.known.lock() = next;
    let pending = !c.frontier.lock().candidates.is_empty();
    Ok(pending)
}

/// An event stream position below which everything has committed or never will: the frontier
/// once every event writer in flight when it was read has finished (at start-up).
pub async fn settled_event_position(db: &sqlx::PgPool) -> anyhow::Result<i64> {
    let first = storage::cluster::frontier(db).await?;
    let mut writers = first.writers;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !writers.is_empty() {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "event writers in flight for 30 s: {writers:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
        let now = storage::cluster::frontier(db).await?;
        writers.retain(|w| now.writers.contains(w));
    }
    Ok(first.events)
}

/// A serialised stream (account data, receipts, presence, device lists, to-device) committed
/// `pos` here. Alone, its watermark moves at once; with other instances, the poller moves it
/// after raising the heads of every change up to there, theirs included (a watermark past a
/// change whose head is not raised yet would let a sync skip it).
pub fn advance(state: &AppState, stream: &watch::Sender<i64>, pos: i64) {
    if state.cluster.is_multi() {
        state.cluster.committed();
    } else {
        crate::state::advance(stream, pos);
    }
}

/// A local typing change, for the other instances.
pub fn typing_changed(state: &AppState, room: i64, user: &str, until: Option<Duration>) {
    state.cluster.publish(Message::Typing {
        room,
        user: user.to_owned(),
        until_ms: until.map(|d| now_ms() + d.as_millis() as i64),
    });
}

/// One-time key counts of a device (or all the user's devices) changed: here and everywhere.
pub fn key_counts_changed(state: &AppState, user: &str, device: Option<&str>) {
    state.sync.invalidate_key_counts(user, device);
    state.cluster.publish(Message::KeyCounts { user: user.to_owned(), device: device.map(str::to_owned) });
}

/// A room's cache entry must be reloaded: here and everywhere.
pub fn room_invalidated(state: &AppState, room_nid: i64) {
    state.sync.invalidate_room(room_nid);
    state.cluster.publish(Message::RoomInvalidated { room: room_nid });
}

/// A delayed event was scheduled or restarted: wake the sender, wherever it runs.
pub fn delayed_changed(state: &AppState) {
    state.rtc.wake.notify_one();
    state.cluster.publish(Message::DelayedWake);
}

/// Applies token evictions received from peers (the listener hands them over; the auth service
/// is not reachable from the cluster's construction).
pub fn spawn_evictions(state: &AppState) {
    let (tx, mut rx) = mpsc::unbounded_channel::<EvictionRequest>();
    state.cluster.set_evict_hook(tx);
    let s = state.clone();
    tokio::spawn(async move {
        while let Some((hashes, done)) = rx.recv().await {
            s.auth.evict_local(&hashes).await;
            let _ = done.send(());
        }
    });
}

/// Typing stream positions are wall-clock milliseconds (kept increasing), so that a token one
/// instance hands out is meaningful to another.
pub fn typing_clock() -> u64 {
    now_ms().max(0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(ids: &[&str]) -> Vec<String> {
        ids.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn frontier_waits_for_the_writers_in_flight_when_it_was_read() {
        let mut f = Frontier::default();
        // Nobody in flight: safe at once.
        assert_eq!(f.resolve(10, &[]), Some(10));
        // A writer in flight holds 20 back, and 30 read while it still runs.
        assert_eq!(f.resolve(20, &w(&["3/1"])), None);
        assert_eq!(f.resolve(30, &w(&["3/1", "4/7"])), None);
        // 3/1 finished, 4/7 still runs: 20 is safe, 30 is not.
        assert_eq!(f.resolve(35, &w(&["4/7"])), Some(20));
        // 4/7 finished and a new writer started: 30 and 35 are safe, 40 waits.
        assert_eq!(f.resolve(40, &w(&["5/2"])), Some(35));
        assert_eq!(f.resolve(41, &[]), Some(41));
        assert!(f.candidates.is_empty());
    }

    #[test]
    fn frontier_candidates_stay_bounded_under_a_continuous_writer() {
        let mut f = Frontier::default();
        for i in 0..1000 {
            assert_eq!(f.resolve(i, &w(&["9/9"])), None);
        }
        assert!(f.candidates.len() <= 64);
        assert_eq!(f.resolve(2000, &[]), Some(2000));
    }

    #[test]
    fn messages_round_trip_and_stay_small() {
        let m = Message::Tokens { id: 7, hashes: vec![hex::encode([0xabu8; 32]); HASHES_PER_MESSAGE] };
        let text = serde_json::to_string(&Envelope { i: "0123456789abcdef".into(), m: m.clone() }).unwrap();
        assert!(text.len() < 8000, "{} bytes", text.len());
        let back: Envelope = serde_json::from_str(&text).unwrap();
        assert_eq!(back.m, m);
        let t = serde_json::to_string(&Envelope {
            i: "x".into(),
            m: Message::Typing { room: 3, user: "@a:b".into(), until_ms: None },
        })
        .unwrap();
        assert_eq!(t, r#"{"i":"x","k":"typing","room":3,"user":"@a:b","until_ms":null}"#);
        assert!(serde_json::from_str::<Envelope>(r#"{"i":"x","k":"nope"}"#).is_err());
    }
}
