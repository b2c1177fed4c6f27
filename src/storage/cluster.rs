//! Several instances on one database (migration 0028): instance rows, notifications, the
//! streams' frontier and what each stream gained between two positions.

use sqlx::{PgExecutor, PgPool};

/// Records this instance (at start-up).
pub async fn register(db: &PgPool, instance: &str, now: i64) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO cluster_instances (instance_id, started_ts, heartbeat_ts) VALUES ($1, $2, $2)
         ON CONFLICT (instance_id) DO UPDATE SET heartbeat_ts = EXCLUDED.heartbeat_ts",
    )
    .bind(instance)
    .bind(now)
    .execute(db)
    .await?;
    Ok(())
}

pub async fn unregister(db: &PgPool, instance: &str) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM cluster_instances WHERE instance_id = $1").bind(instance).execute(db).await?;
    Ok(())
}

/// The other instances whose heartbeat is newer than `since`.
pub async fn alive(db: &PgPool, instance: &str, since: i64) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar("SELECT instance_id FROM cluster_instances WHERE instance_id <> $1 AND heartbeat_ts > $2")
        .bind(instance)
        .bind(since)
        .fetch_all(db)
        .await
}

/// Refreshes this instance's heartbeat (re-creating its row if it was removed as stale), drops
/// rows dead for an hour, and returns the other live instances: one statement.
pub async fn heartbeat(db: &PgPool, instance: &str, now: i64, since: i64) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "WITH me AS (
             INSERT INTO cluster_instances (instance_id, started_ts, heartbeat_ts) VALUES ($1, $2, $2)
             ON CONFLICT (instance_id) DO UPDATE SET heartbeat_ts = EXCLUDED.heartbeat_ts
         ), gone AS (
             DELETE FROM cluster_instances WHERE heartbeat_ts < $2 - 3600000 AND instance_id <> $1
         )
         SELECT instance_id FROM cluster_instances WHERE instance_id <> $1 AND heartbeat_ts > $3",
    )
    .bind(instance)
    .bind(now)
    .bind(since)
    .fetch_all(db)
    .await
}

/// Sends `payloads` on `channel`, in order, in one statement.
pub async fn notify(db: &PgPool, channel: &str, payloads: &[String]) -> sqlx::Result<()> {
    sqlx::query("SELECT pg_notify($1, p) FROM unnest($2::text[]) WITH ORDINALITY AS t(p, n) ORDER BY n")
        .bind(channel)
        .bind(payloads)
        .execute(db)
        .await?;
    Ok(())
}

/// The frontier of every stream (see `parvis_stream_frontier`, migration 0028).
#[derive(Debug, sqlx::FromRow)]
pub struct Frontier {
    pub events: i64,
    pub writers: Vec<String>,
    pub account_data: i64,
    pub receipts: i64,
    pub presence: i64,
    pub device_lists: i64,
    pub to_device: i64,
}

pub async fn frontier(db: impl PgExecutor<'_>) -> sqlx::Result<Frontier> {
    sqlx::query_as(
        "SELECT events, writers, account_data, receipts, presence, device_lists, to_device
         FROM parvis_stream_frontier()",
    )
    .fetch_one(db)
    .await
}

/// A room's events in a stream interval: its highest position, and the members whose member
/// event is among them (with that event's position).
#[derive(Debug)]
pub struct RoomChange {
    pub room_nid: i64,
    pub max_stream: i64,
    pub members: Vec<(String, i64)>,
}

/// Rooms with events in `(from, to]` (the unique index on `stream_ordering`).
pub async fn events_between(db: impl PgExecutor<'_>, from: i64, to: i64) -> sqlx::Result<Vec<RoomChange>> {
    let rows: Vec<(i64, i64, Vec<String>, Vec<i64>)> = sqlx::query_as(
        "SELECT room_nid, MAX(stream_ordering),
                COALESCE(array_agg(state_key) FILTER (WHERE event_type = 'm.room.member'), '{}'),
                COALESCE(array_agg(stream_ordering) FILTER (WHERE event_type = 'm.room.member'), '{}')
         FROM events WHERE stream_ordering > $1 AND stream_ordering <= $2
         GROUP BY room_nid",
    )
    .bind(from)
    .bind(to)
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(room_nid, max_stream, users, positions)| RoomChange {
            room_nid,
            max_stream,
            members: users.into_iter().zip(positions).collect(),
        })
        .collect())
}

/// (user, data type, position) of account data written in `(from, to]`.
pub async fn account_data_between(
    db: impl PgExecutor<'_>,
    from: i64,
    to: i64,
) -> sqlx::Result<Vec<(String, String, i64)>> {
    sqlx::query_as(
        "SELECT user_id, data_type, stream_ordering FROM account_data
         WHERE stream_ordering > $1 AND stream_ordering <= $2",
    )
    .bind(from)
    .bind(to)
    .fetch_all(db)
    .await
}

/// Rooms with receipts in `(from, to]`, with their highest position.
pub async fn receipts_between(db: impl PgExecutor<'_>, from: i64, to: i64) -> sqlx::Result<Vec<(i64, i64)>> {
    sqlx::query_as(
        "SELECT room_nid, MAX(stream_ordering) FROM receipts
         WHERE stream_ordering > $1 AND stream_ordering <= $2 GROUP BY room_nid",
    )
    .bind(from)
    .bind(to)
    .fetch_all(db)
    .await
}

/// Users whose presence changed in `(from, to]`.
pub async fn presence_between(db: impl PgExecutor<'_>, from: i64, to: i64) -> sqlx::Result<Vec<(String, i64)>> {
    sqlx::query_as("SELECT user_id, stream_ordering FROM presence WHERE stream_ordering > $1 AND stream_ordering <= $2")
        .bind(from)
        .bind(to)
        .fetch_all(db)
        .await
}

/// Users whose devices changed in `(from, to]`, with their highest position.
pub async fn device_lists_between(db: impl PgExecutor<'_>, from: i64, to: i64) -> sqlx::Result<Vec<(String, i64)>> {
    sqlx::query_as(
        "SELECT user_id, MAX(stream_ordering) FROM device_list_changes
         WHERE stream_ordering > $1 AND stream_ordering <= $2 GROUP BY user_id",
    )
    .bind(from)
    .bind(to)
    .fetch_all(db)
    .await
}

/// Users with to-device messages queued in `(from, to]`, with their highest position.
pub async fn to_device_between(db: impl PgExecutor<'_>, from: i64, to: i64) -> sqlx::Result<Vec<(String, i64)>> {
    sqlx::query_as(
        "SELECT recipient_user, MAX(stream_ordering) FROM to_device_messages
         WHERE stream_ordering > $1 AND stream_ordering <= $2 GROUP BY recipient_user",
    )
    .bind(from)
    .bind(to)
    .fetch_all(db)
    .await
}
