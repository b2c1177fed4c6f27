//! `delayed_events` (MSC4140): scheduled events, and what became of them.

use serde_json::Value;
use sqlx::PgExecutor;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DelayedRow {
    pub delay_id: String,
    pub user_id: String,
    pub device_id: Option<String>,
    pub room_id: String,
    pub event_type: String,
    pub state_key: Option<String>,
    pub content: Value,
    pub delay_ms: i64,
    pub running_since: i64,
    pub send_ts: i64,
    pub status: String,
    pub outcome: Option<String>,
    pub reason: Option<String>,
    pub error: Option<Value>,
    pub event_id: Option<String>,
    pub finalised_ts: Option<i64>,
}

const COLUMNS: &str = "delay_id, user_id, device_id, room_id, event_type, state_key, content, delay_ms, \
     running_since, send_ts, status, outcome, reason, error, event_id, finalised_ts";

pub struct NewDelayed<'a> {
    pub delay_id: &'a str,
    pub user_id: &'a str,
    pub device_id: &'a str,
    pub room_id: &'a str,
    pub event_type: &'a str,
    pub state_key: Option<&'a str>,
    pub content: &'a Value,
    pub delay_ms: i64,
    pub now: i64,
    pub txn: Option<(&'a str, &'a str)>,
}

/// Takes the per-user lock under which scheduling counts the user's scheduled events.
pub async fn lock_user(db: impl PgExecutor<'_>, user_id: &str) -> sqlx::Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('parvis.delayed_events:' || $1, 0))")
        .bind(user_id)
        .execute(db)
        .await?;
    Ok(())
}

pub async fn count_scheduled(db: impl PgExecutor<'_>, user_id: &str) -> sqlx::Result<(i64, Option<i64>)> {
    sqlx::query_as("SELECT count(*), min(send_ts) FROM delayed_events WHERE user_id = $1 AND status = 'scheduled'")
        .bind(user_id)
        .fetch_one(db)
        .await
}

/// The delay ID recorded for a scheduling request's transaction, if it was already made.
pub async fn by_txn(
    db: impl PgExecutor<'_>,
    user_id: &str,
    device_id: &str,
    scope: &str,
    txn_id: &str,
) -> sqlx::Result<Option<String>> {
    sqlx::query_scalar(
        "SELECT delay_id FROM delayed_events WHERE user_id = $1 AND device_id = $2 AND txn_scope = $3 AND txn_id = $4",
    )
    .bind(user_id)
    .bind(device_id)
    .bind(scope)
    .bind(txn_id)
    .fetch_optional(db)
    .await
}

/// Inserts a scheduled event; `false` if its transaction was already recorded (a concurrent retry).
pub async fn insert(db: impl PgExecutor<'_>, d: &NewDelayed<'_>) -> sqlx::Result<bool> {
    let r = sqlx::query(
        "INSERT INTO delayed_events (delay_id, user_id, device_id, room_id, event_type, state_key, content,
                                     delay_ms, running_since, send_ts, status, txn_scope, txn_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9 + $8, 'scheduled', $10, $11)
         ON CONFLICT (user_id, device_id, txn_scope, txn_id) WHERE txn_id IS NOT NULL DO NOTHING",
    )
    .bind(d.delay_id)
    .bind(d.user_id)
    .bind(d.device_id)
    .bind(d.room_id)
    .bind(d.event_type)
    .bind(d.state_key)
    .bind(d.content)
    .bind(d.delay_ms)
    .bind(d.now)
    .bind(d.txn.map(|t| t.0))
    .bind(d.txn.map(|t| t.1))
    .execute(db)
    .await?;
    Ok(r.rows_affected() == 1)
}

pub async fn get(db: impl PgExecutor<'_>, delay_id: &str) -> sqlx::Result<Option<DelayedRow>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM delayed_events WHERE delay_id = $1")))
        .bind(delay_id)
        .fetch_optional(db)
        .await
}

/// Locks a scheduled row for a transition (send, cancel); `None` if it is not scheduled (any more).
pub async fn lock_scheduled(db: impl PgExecutor<'_>, delay_id: &str) -> sqlx::Result<Option<DelayedRow>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM delayed_events WHERE delay_id = $1 AND status = 'scheduled' FOR UPDATE"
    )))
    .bind(delay_id)
    .fetch_optional(db)
    .await
}

/// Restarts the timer of a scheduled event; `None` if it is not scheduled.
pub async fn restart(db: impl PgExecutor<'_>, delay_id: &str, now: i64) -> sqlx::Result<Option<i64>> {
    sqlx::query_scalar(
        "UPDATE delayed_events SET running_since = $2, send_ts = $2 + delay_ms
         WHERE delay_id = $1 AND status = 'scheduled' RETURNING send_ts",
    )
    .bind(delay_id)
    .bind(now)
    .fetch_optional(db)
    .await
}

/// Records what became of an event. Only a scheduled row changes.
pub async fn finalise(
    db: impl PgExecutor<'_>,
    delay_id: &str,
    outcome: &str,
    reason: &str,
    error: Option<&Value>,
    event_id: Option<&str>,
    now: i64,
) -> sqlx::Result<bool> {
    let r = sqlx::query(
        "UPDATE delayed_events SET status = 'finalised', outcome = $2, reason = $3, error = $4, event_id = $5,
                finalised_ts = $6
         WHERE delay_id = $1 AND status = 'scheduled'",
    )
    .bind(delay_id)
    .bind(outcome)
    .bind(reason)
    .bind(error)
    .bind(event_id)
    .bind(now)
    .execute(db)
    .await?;
    Ok(r.rows_affected() == 1)
}

/// Cancels the scheduled state events for one state entry that belong to other users than
/// `sender` (someone else changed that state: sending ours later would undo their change). Rows
/// locked by the sender task are being sent right now and are skipped (waiting for them could
/// deadlock two senders of the same entry).
pub async fn cancel_state_of_others(
    db: impl PgExecutor<'_>,
    room_id: &str,
    event_type: &str,
    state_key: &str,
    sender: &str,
    now: i64,
) -> sqlx::Result<u64> {
    let r = sqlx::query(
        "UPDATE delayed_events SET status = 'finalised', outcome = 'cancel', reason = 'overwritten',
                finalised_ts = $5
         WHERE delay_id IN (
             SELECT delay_id FROM delayed_events
             WHERE room_id = $1 AND event_type = $2 AND state_key = $3 AND status = 'scheduled' AND user_id <> $4
             FOR UPDATE SKIP LOCKED)",
    )
    .bind(room_id)
    .bind(event_type)
    .bind(state_key)
    .bind(sender)
    .bind(now)
    .execute(db)
    .await?;
    Ok(r.rows_affected())
}

/// Scheduled events due at `now`, earliest first.
pub async fn due(db: impl PgExecutor<'_>, now: i64, limit: i64) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT delay_id FROM delayed_events WHERE status = 'scheduled' AND send_ts <= $1 ORDER BY send_ts LIMIT $2",
    )
    .bind(now)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// When the next scheduled event is due.
pub async fn next_due(db: impl PgExecutor<'_>) -> sqlx::Result<Option<i64>> {
    sqlx::query_scalar("SELECT min(send_ts) FROM delayed_events WHERE status = 'scheduled'").fetch_one(db).await
}

/// A page of a user's events, by `(send_ts, delay_id)` after `after`.
pub async fn list(
    db: impl PgExecutor<'_>,
    user_id: &str,
    status: Option<&str>,
    delay_ids: &[String],
    after: Option<(i64, &str)>,
    limit: i64,
) -> sqlx::Result<Vec<DelayedRow>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM delayed_events
         WHERE user_id = $1 AND ($2::text IS NULL OR status = $2)
           AND (cardinality($3::text[]) = 0 OR delay_id = ANY($3))
           AND ($4::bigint IS NULL OR (send_ts, delay_id) > ($4, $5))
         ORDER BY send_ts, delay_id LIMIT $6"
    )))
    .bind(user_id)
    .bind(status)
    .bind(delay_ids)
    .bind(after.map(|a| a.0))
    .bind(after.map(|a| a.1).unwrap_or(""))
    .bind(limit)
    .fetch_all(db)
    .await
}

pub async fn delete_finalised_before(db: impl PgExecutor<'_>, cutoff: i64) -> sqlx::Result<u64> {
    Ok(sqlx::query("DELETE FROM delayed_events WHERE status = 'finalised' AND finalised_ts < $1")
        .bind(cutoff)
        .execute(db)
        .await?
        .rows_affected())
}
