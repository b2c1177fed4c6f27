//! Connection state of simplified sliding sync: what a connection's client has received, per
//! position. Positions live in PostgreSQL (so any instance can continue a connection) with a
//! per-process cache in front: a long-poll that finds nothing new answers with the same `pos` and
//! writes nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use serde::{Deserialize, Serialize};

use crate::error::{ApiResult, Error};
use crate::state::AppState;
use crate::storage::{self, now_ms};
use crate::sync::token::SyncToken;

/// A connection unused for this long is forgotten (its positions answer `M_UNKNOWN_POS`).
pub const CONNECTION_LIFETIME_MS: i64 = 7 * 24 * 3600 * 1000;
/// A connection in use has its `last_used_ts` refreshed at most this often.
const TOUCH_EVERY_MS: i64 = 3600 * 1000;
/// Connections kept per device.
const MAX_CONNECTIONS_PER_DEVICE: i64 = 20;
/// Lazy-loaded members remembered per room (beyond it, members may be sent again).
pub const MAX_LAZY_REMEMBERED: usize = 200;

/// What the client has of one room.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RoomSent {
    /// Events up to this stream position were sent (or deliberately not: not visible).
    pub s: i64,
    /// The stream position of the user's membership when the room was sent.
    pub m: i64,
    /// The timeline limit it was sent with.
    pub t: usize,
    /// Digest of the `required_state` it was sent with.
    pub r: u64,
    /// Members sent through `$LAZY`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub z: Vec<String>,
}

/// What the client has received at one position.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConnState {
    /// The stream positions the extensions and lists were computed at.
    pub token: String,
    pub rooms: HashMap<i64, RoomSent>,
    /// Per list, a digest of its count and windows as last sent.
    pub lists: HashMap<String, u64>,
}

impl ConnState {
    pub fn sync_token(&self) -> ApiResult<SyncToken> {
        SyncToken::parse(&self.token).map_err(|_| Error::internal())
    }
}

/// A position of a connection.
#[derive(Debug)]
pub struct Position {
    pub pos_id: i64,
    pub conn_nid: i64,
    pub user_id: String,
    pub device_id: String,
    pub conn_id: String,
    pub state: ConnState,
}

/// Per-process caches of the sliding sync engine.
pub struct SlidingCaches {
    positions: moka::sync::Cache<i64, Arc<Position>>,
    /// Per connection, the first position after its latest reset in this process: older ones
    /// are unknown even if still cached.
    floors: moka::sync::Cache<i64, i64>,
    /// Per connection, when this process last recorded it as used.
    touched: moka::sync::Cache<i64, i64>,
    /// Bump stamps read from the database for rooms whose cached timeline has no bump event:
    /// room → (the room's head when read, bump stamp).
    pub bumps: moka::sync::Cache<i64, (i64, i64)>,
    /// Rooms in each user's `m.direct`: user → (account data head when read, room IDs).
    pub direct: moka::sync::Cache<String, (i64, Arc<std::collections::HashSet<String>>)>,
}

impl Default for SlidingCaches {
    fn default() -> Self {
        Self {
            positions: moka::sync::Cache::builder()
                .weigher(|_, p: &Arc<Position>| (p.state.rooms.len() as u32).saturating_mul(64).saturating_add(256))
                .max_capacity(128 * 1024 * 1024)
                .time_to_idle(Duration::from_secs(3600))
                .build(),
            floors: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(Duration::from_secs(86_400))
                .build(),
            touched: moka::sync::Cache::builder().max_capacity(100_000).build(),
            bumps: moka::sync::Cache::builder().max_capacity(100_000).build(),
            direct: moka::sync::Cache::builder().max_capacity(100_000).build(),
        }
    }
}

impl SlidingCaches {
    /// Forgets every cached position: the next request reads its position from the database
    /// (tests, to act as another instance would).
    pub fn clear(&self) {
        self.positions.invalidate_all();
        self.touched.invalidate_all();
    }
}

pub fn unknown_pos() -> Error {
    Error::new(StatusCode::BAD_REQUEST, "M_UNKNOWN_POS", "Unknown position; start a new connection")
}

/// The position a request continues from: unknown, expired, malformed or someone else's (user,
/// device or connection) is `M_UNKNOWN_POS`.
pub async fn load(state: &AppState, pos: &str, user: &str, device: &str, conn_id: &str) -> ApiResult<Arc<Position>> {
    if pos.is_empty() || pos.len() > 18 || !pos.bytes().all(|b| b.is_ascii_digit()) {
        return Err(unknown_pos());
    }
    let pos_id: i64 = pos.parse().map_err(|_| unknown_pos())?;
    let c = &state.sliding;
    let p = match c.positions.get(&pos_id) {
        Some(p) => p,
        None => {
            let Some(row) = storage::sliding_sync::position(&state.db, pos_id).await? else {
                return Err(unknown_pos());
            };
            if row.last_used_ts < now_ms() - CONNECTION_LIFETIME_MS {
                return Err(unknown_pos());
            }
            let conn: ConnState = serde_json::from_value(row.state.0).map_err(|_| unknown_pos())?;
            let p = Arc::new(Position {
                pos_id,
                conn_nid: row.conn_nid,
                user_id: row.user_id,
                device_id: row.device_id,
                conn_id: row.conn_id,
                state: conn,
            });
            c.positions.insert(pos_id, p.clone());
            c.touched.insert(p.conn_nid, row.last_used_ts);
            p
        }
    };
    if p.user_id != user || p.device_id != device || p.conn_id != conn_id {
        return Err(unknown_pos());
    }
    if c.floors.get(&p.conn_nid).is_some_and(|f| pos_id < f) {
        return Err(unknown_pos());
    }
    touch(state, p.conn_nid);
    Ok(p)
}

/// Records the connection as used, at most once an hour, in the background.
fn touch(state: &AppState, conn_nid: i64) {
    let now = now_ms();
    if state.sliding.touched.get(&conn_nid).is_some_and(|t| now - t < TOUCH_EVERY_MS) {
        return;
    }
    state.sliding.touched.insert(conn_nid, now);
    let db = state.db.clone();
    tokio::spawn(async move {
        if let Err(e) = storage::sliding_sync::touch(&db, conn_nid, now).await {
            tracing::warn!(error = %e, "sliding sync connection refresh failed");
        }
    });
}

/// Stores a new position: after `prev` (deleting the positions before it), or as the first of a
/// (re)started connection. Returns the new position.
pub async fn store(
    state: &AppState,
    prev: Option<&Position>,
    user: &str,
    device: &str,
    conn_id: &str,
    conn: ConnState,
) -> ApiResult<Arc<Position>> {
    let now = now_ms();
    let json = serde_json::to_value(&conn).map_err(|_| Error::internal())?;
    let (conn_nid, acked, reset) = match prev {
        Some(p) => (p.conn_nid, p.pos_id, false),
        None => {
            let nid = storage::sliding_sync::reset_connection(
                &state.db,
                user,
                device,
                conn_id,
                now,
                MAX_CONNECTIONS_PER_DEVICE,
            )
            .await?;
            (nid, i64::MAX, true)
        }
    };
    let pos_id = storage::sliding_sync::insert_position(&state.db, conn_nid, acked, now, &json)
        .await?
        .ok_or_else(unknown_pos)?;
    if reset {
        state.sliding.floors.insert(conn_nid, pos_id);
    }
    state.sliding.touched.insert(conn_nid, now);
    let p = Arc::new(Position {
        pos_id,
        conn_nid,
        user_id: user.to_owned(),
        device_id: device.to_owned(),
        conn_id: conn_id.to_owned(),
        state: conn,
    });
    state.sliding.positions.insert(pos_id, p.clone());
    Ok(p)
}

/// Housekeeping: forgets connections unused for [`CONNECTION_LIFETIME_MS`].
pub async fn housekeeping(state: &AppState) -> ApiResult<()> {
    storage::sliding_sync::delete_unused(&state.db, now_ms() - CONNECTION_LIFETIME_MS).await?;
    Ok(())
}
