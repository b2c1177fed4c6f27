//! History from other servers (<https://spec.matrix.org/latest/server-server-api/#backfilling-and-retrieving-missing-events>):
//! when a client pages back (`/messages`) past the beginning of what this server has of a room
//! it joined over federation, the events before it are asked of the room's other servers
//! (`/backfill`), checked like any remote event, authorised against the state before them (the
//! state its server gives for the oldest, `state_ids`) and stored at backfill positions.

use std::time::Duration;

use axum::http::Method;
use ruma::ServerName;

use super::pdu;
use crate::error::ApiResult;
use crate::rooms::Room;
use crate::state::AppState;
use crate::storage;

/// Most events asked for at once.
const MAX_BACKFILL: i64 = 100;
/// A room whose servers had nothing more is not asked again for this long.
const QUIET: Duration = Duration::from_secs(30);

static TRIED: std::sync::LazyLock<moka::sync::Cache<i64, ()>> =
    std::sync::LazyLock::new(|| moka::sync::Cache::builder().max_capacity(100_000).time_to_live(QUIET).build());

/// Fetches up to `limit` events of history before the room's earliest local event from one of
/// the room's other servers. Returns how many were stored.
pub async fn backfill(state: &AppState, room: &Room, limit: i64) -> ApiResult<usize> {
    if !state.federation.enabled || TRIED.contains_key(&room.nid) {
        return Ok(0);
    }
    let Some((earliest, kind)) = storage::remote::earliest_event(&state.db, room.nid).await? else { return Ok(0) };
    if kind == "m.room.create" {
        return Ok(0);
    }
    let servers = storage::remote::joined_servers(&state.db, room.nid, &state.config.server_name).await?;
    for server in servers.iter().take(3) {
        let Ok(server) = ServerName::parse(server) else { continue };
        match from_server(state, room, &server, &earliest, limit.clamp(1, MAX_BACKFILL)).await {
            Ok(n) if n > 0 => return Ok(n),
            Ok(_) => {}
            Err(e) => tracing::info!(room_id = %room.room_id, %server, error = %e.message, "backfill failed"),
        }
    }
    TRIED.insert(room.nid, ());
    Ok(0)
}

async fn from_server(
    state: &AppState,
    room: &Room,
    server: &ServerName,
    earliest: &str,
    limit: i64,
) -> ApiResult<usize> {
    let path = format!(
        "/_matrix/federation/v1/backfill/{}?v={}&limit={limit}",
        crate::appservice::client::enc(room.room_id.as_str()),
        crate::appservice::client::enc(earliest)
    );
    let answer = state
        .federation
        .request(Method::GET, server, &path, None, true, 16 * 1024 * 1024)
        .await
        .map_err(|e| crate::error::Error::from(anyhow::anyhow!("{e}")))?;
    let mut events = Vec::new();
    for v in answer["pdus"].as_array().into_iter().flatten().take(limit as usize + 1) {
        match pdu::check(state, &room.rules, Some(room.room_id.as_str()), v).await {
            Ok(c) => events.push(c),
            Err(e) => tracing::info!(room_id = %room.room_id, %server, error = %e, "backfilled event refused"),
        }
    }
    let ids: Vec<String> = events.iter().map(|c| c.event_id.to_string()).collect();
    let known = storage::remote::known(&state.db, &ids).await?;
    // Events in the timeline already are dropped; outliers stay (they get a place in history).
    events.retain(|c| known.get(c.event_id.as_str()).is_none_or(|k| k.stream_ordering.is_none()));
    let Some(oldest) = events.iter().min_by_key(|c| c.pdu.depth).cloned() else { return Ok(0) };
    let before = super::inbound::state_before(state, room, server, &oldest).await?;
    crate::rooms::remote::store_backfilled(state, room, events, before).await
}
