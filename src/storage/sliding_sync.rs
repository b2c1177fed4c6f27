//! `sliding_sync_connections`, `sliding_sync_positions` (migration 0027): the state of simplified
//! sliding sync connections (MSC4186), so that any instance can answer a request carrying a
//! `pos`; and the one read the sliding sync engine needs beyond the sync cache (bump stamps of
//! rooms whose cached timeline holds no bump event).

use serde_json::Value;
use sqlx::types::Json;
use sqlx::{PgExecutor, PgPool};

/// A stored position with its connection.
#[derive(Debug, sqlx::FromRow)]
pub struct PositionRow {
    pub pos_id: i64,
    pub conn_nid: i64,
    pub user_id: String,
    pub device_id: String,
    pub conn_id: String,
    pub last_used_ts: i64,
    pub state: Json<Value>,
}

/// Starts (or restarts) the connection `(user, device, conn_id)`: its earlier positions are
/// deleted, so they are unknown from now on. At most `max_per_device` connections are kept per
/// device (the least recently used go). Returns the connection's number.
pub async fn reset_connection(
    db: &PgPool,
    user_id: &str,
    device_id: &str,
    conn_id: &str,
    now: i64,
    max_per_device: i64,
) -> sqlx::Result<i64> {
    let mut tx = db.begin().await?;
    let (conn_nid,): (i64,) = sqlx::query_as(
        "INSERT INTO sliding_sync_connections (user_id, device_id, conn_id, created_ts, last_used_ts)
         VALUES ($1, $2, $3, $4, $4)
         ON CONFLICT (user_id, device_id, conn_id) DO UPDATE SET last_used_ts = EXCLUDED.last_used_ts
         RETURNING conn_nid",
    )
    .bind(user_id)
    .bind(device_id)
    .bind(conn_id)
    .bind(now)
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM sliding_sync_positions WHERE conn_nid = $1").bind(conn_nid).execute(&mut *tx).await?;
    sqlx::query(
        "DELETE FROM sliding_sync_connections WHERE user_id = $1 AND device_id = $2 AND conn_nid IN (
             SELECT conn_nid FROM sliding_sync_connections WHERE user_id = $1 AND device_id = $2
             ORDER BY last_used_ts DESC, conn_nid DESC OFFSET $3)",
    )
    .bind(user_id)
    .bind(device_id)
    .bind(max_per_device)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(conn_nid)
}

/// Records a new position of a connection, deleting those before `acked` (the position the
/// client used: it has everything up to there). `None` if the connection is gone.
pub async fn insert_position(
    db: impl PgExecutor<'_>,
    conn_nid: i64,
    acked: i64,
    now: i64,
    state: &Value,
) -> sqlx::Result<Option<i64>> {
    let row: Option<(i64,)> = sqlx::query_as(
        "WITH gone AS (
             DELETE FROM sliding_sync_positions WHERE conn_nid = $1 AND pos_id < $2
         ), used AS (
             UPDATE sliding_sync_connections SET last_used_ts = $3 WHERE conn_nid = $1
         )
         INSERT INTO sliding_sync_positions (conn_nid, created_ts, state)
         SELECT conn_nid, $3, $4 FROM sliding_sync_connections WHERE conn_nid = $1
         RETURNING pos_id",
    )
    .bind(conn_nid)
    .bind(acked)
    .bind(now)
    .bind(Json(state))
    .fetch_optional(db)
    .await?;
    Ok(row.map(|(p,)| p))
}

/// A position with its connection, if it still exists.
pub async fn position(db: impl PgExecutor<'_>, pos_id: i64) -> sqlx::Result<Option<PositionRow>> {
    sqlx::query_as(
        "SELECT p.pos_id, p.conn_nid, c.user_id, c.device_id, c.conn_id, c.last_used_ts, p.state
         FROM sliding_sync_positions p JOIN sliding_sync_connections c USING (conn_nid)
         WHERE p.pos_id = $1",
    )
    .bind(pos_id)
    .fetch_optional(db)
    .await
}

/// Marks a connection as in use (long-polls with nothing new write nothing else).
pub async fn touch(db: impl PgExecutor<'_>, conn_nid: i64, now: i64) -> sqlx::Result<()> {
    sqlx::query("UPDATE sliding_sync_connections SET last_used_ts = $2 WHERE conn_nid = $1")
        .bind(conn_nid)
        .bind(now)
        .execute(db)
        .await?;
    Ok(())
}

/// Deletes connections (and their positions) unused since `before`.
pub async fn delete_unused(db: impl PgExecutor<'_>, before: i64) -> sqlx::Result<u64> {
    Ok(sqlx::query("DELETE FROM sliding_sync_connections WHERE last_used_ts < $1")
        .bind(before)
        .execute(db)
        .await?
        .rows_affected())
}

/// Per room, the stream position of its latest event of one of `types` at or before `upto`
/// (rooms without one are absent).
pub async fn latest_of_types(
    db: impl PgExecutor<'_>,
    room_nids: &[i64],
    types: &[&str],
    upto: i64,
) -> sqlx::Result<Vec<(i64, i64)>> {
    sqlx::query_as(
        "SELECT r.nid, l.stream_ordering FROM UNNEST($1::bigint[]) AS r(nid)
         CROSS JOIN LATERAL (
             SELECT stream_ordering FROM events e
             WHERE e.room_nid = r.nid AND e.event_type = ANY($2) AND e.stream_ordering <= $3
             ORDER BY e.stream_ordering DESC LIMIT 1
         ) l",
    )
    .bind(room_nids)
    .bind(types)
    .bind(upto)
    .fetch_all(db)
    .await
}
