//! `appservice_state`, `appservice_txns`: the durable delivery position and the transactions not
//! yet acknowledged of each application service (migration 0024).

use serde_json::Value;
use sqlx::{PgConnection, PgExecutor};

use super::events::EventRow;
use super::now_ms;

/// A transaction waiting for the appservice's acknowledgement.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PendingTxn {
    pub txn_id: i64,
    pub body: Value,
    pub event_count: i32,
}

/// The appservice's position; created at `start` (the current stream head: an appservice
/// registered today does not receive the server's history).
pub async fn position(db: impl PgExecutor<'_>, as_id: &str, start: i64) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "INSERT INTO appservice_state (as_id, stream_position) VALUES ($1, $2)
         ON CONFLICT (as_id) DO UPDATE SET as_id = EXCLUDED.as_id
         RETURNING stream_position",
    )
    .bind(as_id)
    .bind(start)
    .fetch_one(db)
    .await
}

/// Locks the appservice's state row (one builder at a time across instances).
pub async fn lock_state(conn: &mut PgConnection, as_id: &str) -> sqlx::Result<(i64, i64)> {
    sqlx::query_as("SELECT stream_position, next_txn_id FROM appservice_state WHERE as_id = $1 FOR UPDATE")
        .bind(as_id)
        .fetch_one(conn)
        .await
}

/// Moves the position forward (never back).
pub async fn set_position(db: impl PgExecutor<'_>, as_id: &str, pos: i64) -> sqlx::Result<()> {
    sqlx::query("UPDATE appservice_state SET stream_position = GREATEST(stream_position, $2) WHERE as_id = $1")
        .bind(as_id)
        .bind(pos)
        .execute(db)
        .await?;
    Ok(())
}

/// Records a transaction and moves the position past its events, in the caller's transaction
/// (which holds the state row's lock). Returns the transaction ID.
pub async fn insert_txn(conn: &mut PgConnection, as_id: &str, pos: i64, body: &Value, count: i32) -> sqlx::Result<i64> {
    let txn_id: i64 = sqlx::query_scalar(
        "UPDATE appservice_state SET next_txn_id = next_txn_id + 1,
             stream_position = GREATEST(stream_position, $2)
         WHERE as_id = $1 RETURNING next_txn_id - 1",
    )
    .bind(as_id)
    .bind(pos)
    .fetch_one(&mut *conn)
    .await?;
    sqlx::query(
        "INSERT INTO appservice_txns (as_id, txn_id, body, event_count, created_ts) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(as_id)
    .bind(txn_id)
    .bind(body)
    .bind(count)
    .bind(now_ms())
    .execute(&mut *conn)
    .await?;
    Ok(txn_id)
}

/// The oldest unacknowledged transactions.
pub async fn pending(db: impl PgExecutor<'_>, as_id: &str, limit: i64) -> sqlx::Result<Vec<PendingTxn>> {
    sqlx::query_as("SELECT txn_id, body, event_count FROM appservice_txns WHERE as_id = $1 ORDER BY txn_id LIMIT $2")
        .bind(as_id)
        .bind(limit)
        .fetch_all(db)
        .await
}

/// Forgets an acknowledged transaction.
pub async fn complete(db: impl PgExecutor<'_>, as_id: &str, txn_id: i64) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM appservice_txns WHERE as_id = $1 AND txn_id = $2")
        .bind(as_id)
        .bind(txn_id)
        .execute(db)
        .await?;
    Ok(())
}

/// Events with `after < stream_ordering <= upto`, oldest first.
pub async fn events_after(db: impl PgExecutor<'_>, after: i64, upto: i64, limit: i64) -> sqlx::Result<Vec<EventRow>> {
    sqlx::query_as(
        "SELECT event_nid, event_id, room_nid, stream_ordering, depth, event_type, state_key, sender,
                origin_server_ts, json, redacted_by, txn_device, txn_id, state_before, state_after
         FROM events WHERE stream_ordering > $1 AND stream_ordering <= $2
         ORDER BY stream_ordering LIMIT $3",
    )
    .bind(after)
    .bind(upto)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// Local users joined to a room (the appservice's membership interest).
pub async fn joined_users(db: impl PgExecutor<'_>, room_nid: i64) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar("SELECT user_id FROM room_memberships WHERE room_nid = $1 AND membership = 'join'")
        .bind(room_nid)
        .fetch_all(db)
        .await
}

/// Rooms by number: their IDs, versions and aliases, for a batch of events.
pub async fn room_aliases(db: impl PgExecutor<'_>, room_nid: i64) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar("SELECT alias FROM room_aliases WHERE room_nid = $1").bind(room_nid).fetch_all(db).await
}
