//! `presence`: each local user's last presence, with a stream position for sync.

use sqlx::PgExecutor;

use super::now_ms;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PresenceRow {
    pub user_id: String,
    pub state: String,
    pub status_msg: Option<String>,
    pub last_active_ts: i64,
    pub stream_ordering: i64,
}

/// Records a presence change; returns its stream position. Positions commit in order because
/// the sequence is read under a transaction-level lock held until commit.
pub async fn set(db: &sqlx::PgPool, user_id: &str, state: &str, status_msg: Option<&str>) -> sqlx::Result<i64> {
    let mut tx = db.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(7061727669730005)").execute(&mut *tx).await?;
    let pos = sqlx::query_scalar(
        "INSERT INTO presence (user_id, state, status_msg, last_active_ts, stream_ordering)
         VALUES ($1, $2, $3, $4, nextval('presence_stream_seq'))
         ON CONFLICT (user_id) DO UPDATE SET state = EXCLUDED.state, status_msg = EXCLUDED.status_msg,
           last_active_ts = EXCLUDED.last_active_ts, stream_ordering = EXCLUDED.stream_ordering
         RETURNING stream_ordering",
    )
    .bind(user_id)
    .bind(state)
    .bind(status_msg)
    .bind(now_ms())
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(pos)
}

pub async fn get(db: impl PgExecutor<'_>, user_id: &str) -> sqlx::Result<Option<PresenceRow>> {
    sqlx::query_as("SELECT * FROM presence WHERE user_id = $1").bind(user_id).fetch_optional(db).await
}

/// Changes after `since` for the given users (the ones a syncing user shares rooms with).
pub async fn changed_since(db: impl PgExecutor<'_>, users: &[String], since: i64) -> sqlx::Result<Vec<PresenceRow>> {
    sqlx::query_as("SELECT * FROM presence WHERE user_id = ANY($1) AND stream_ordering > $2 ORDER BY stream_ordering")
        .bind(users)
        .bind(since)
        .fetch_all(db)
        .await
}

/// Whether two users share a room in which both are joined.
pub async fn share_a_room(db: impl PgExecutor<'_>, a: &str, b: &str) -> sqlx::Result<bool> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM room_memberships x JOIN room_memberships y ON x.room_nid = y.room_nid
                        WHERE x.user_id = $1 AND y.user_id = $2 AND x.membership = 'join' AND y.membership = 'join')",
    )
    .bind(a)
    .bind(b)
    .fetch_one(db)
    .await
}

/// The highest committed position of the presence stream (0 when empty).
pub async fn current_stream_position(db: impl PgExecutor<'_>) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT COALESCE(MAX(stream_ordering), 0) FROM presence").fetch_one(db).await
}
