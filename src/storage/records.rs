//! Records (issue 19): what a per-user export reads beyond the usual paths, and `user_exports`,
//! the export jobs of the admin API (migration 0018).

use serde_json::Value;
use sqlx::types::Json;
use sqlx::{PgExecutor, PgPool};

use super::events::EventRow;

const EVENT_COLUMNS: &str = "ev.event_nid, ev.event_id, ev.room_nid, COALESCE(ev.stream_ordering, 0) AS stream_ordering, ev.depth, ev.event_type, \
     ev.state_key, ev.sender, ev.origin_server_ts, ev.json, ev.redacted_by, ev.txn_device, ev.txn_id, \
     ev.state_before, ev.state_after";

/// A room a user is or was in.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UserRoom {
    pub room_nid: i64,
    pub room_id: String,
    pub membership: String,
    /// The user forgot it: hidden from their clients, still part of their records.
    pub forgotten: bool,
}

/// Every room where `user_id` has a membership (forgotten ones included), oldest first.
pub async fn rooms_of_user(db: impl PgExecutor<'_>, user_id: &str) -> sqlx::Result<Vec<UserRoom>> {
    sqlx::query_as(
        "SELECT m.room_nid, r.room_id, m.membership, m.forgotten
         FROM room_memberships m JOIN rooms r ON r.room_nid = m.room_nid
         WHERE m.user_id = $1 ORDER BY m.room_nid",
    )
    .bind(user_id)
    .fetch_all(db)
    .await
}

/// The state group after the room's last event at or before stream position `upto`.
pub async fn state_after_latest(db: impl PgExecutor<'_>, room_nid: i64, upto: i64) -> sqlx::Result<Option<i64>> {
    Ok(sqlx::query_scalar(
        "SELECT state_after FROM events WHERE room_nid = $1 AND stream_ordering <= $2
         ORDER BY stream_ordering DESC LIMIT 1",
    )
    .bind(room_nid)
    .bind(upto)
    .fetch_optional(db)
    .await?
    .flatten())
}

/// The `origin_server_ts` of the room's event at a stream position.
pub async fn origin_ts_at(db: impl PgExecutor<'_>, room_nid: i64, stream: i64) -> sqlx::Result<Option<i64>> {
    sqlx::query_scalar("SELECT origin_server_ts FROM events WHERE room_nid = $1 AND stream_ordering = $2")
        .bind(room_nid)
        .bind(stream)
        .fetch_optional(db)
        .await
}

/// The state events of a state group for the given `(type, state_key)` pairs (one recursive
/// query over the group's delta chain).
pub async fn state_in_group(db: impl PgExecutor<'_>, group: i64, keys: &[(&str, &str)]) -> sqlx::Result<Vec<EventRow>> {
    let (types, state_keys): (Vec<&str>, Vec<&str>) = keys.iter().copied().unzip();
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "WITH RECURSIVE chain(group_nid, prev_group, level) AS (
             SELECT group_nid, prev_group, 0 FROM state_groups WHERE group_nid = $1
             UNION ALL
             SELECT g.group_nid, g.prev_group, c.level + 1
             FROM state_groups g JOIN chain c ON g.group_nid = c.prev_group
         ), keys AS (
             SELECT key_nid FROM state_keys
             WHERE (event_type, state_key) IN (SELECT * FROM UNNEST($2::text[], $3::text[]))
         ), found AS (
             SELECT DISTINCT ON (e.key_nid) e.event_nid
             FROM chain c JOIN state_group_entries e ON e.group_nid = c.group_nid
             WHERE e.key_nid IN (SELECT key_nid FROM keys)
             ORDER BY e.key_nid, c.level
         )
         SELECT {EVENT_COLUMNS} FROM events ev WHERE ev.event_nid IN (SELECT event_nid FROM found)"
    )))
    .bind(group)
    .bind(&types)
    .bind(&state_keys)
    .fetch_all(db)
    .await
}

/// Up to `limit` members (joined or invited) of a state group other than `except`, by user ID:
/// `(user_id, displayname)`. Names rooms that have neither a name nor an alias.
pub async fn members_in_group(
    db: impl PgExecutor<'_>,
    group: i64,
    except: &str,
    limit: i64,
) -> sqlx::Result<Vec<(String, Option<String>)>> {
    sqlx::query_as(
        "WITH RECURSIVE chain(group_nid, prev_group, level) AS (
             SELECT group_nid, prev_group, 0 FROM state_groups WHERE group_nid = $1
             UNION ALL
             SELECT g.group_nid, g.prev_group, c.level + 1
             FROM state_groups g JOIN chain c ON g.group_nid = c.prev_group
         ), found AS (
             SELECT DISTINCT ON (e.key_nid) e.event_nid
             FROM chain c JOIN state_group_entries e ON e.group_nid = c.group_nid
             JOIN state_keys k ON k.key_nid = e.key_nid AND k.event_type = 'm.room.member'
             ORDER BY e.key_nid, c.level
         )
         SELECT ev.state_key, ev.json::jsonb -> 'content' ->> 'displayname'
         FROM found f JOIN events ev ON ev.event_nid = f.event_nid
         WHERE ev.json::jsonb -> 'content' ->> 'membership' IN ('join', 'invite') AND ev.state_key <> $2
         ORDER BY ev.state_key LIMIT $3",
    )
    .bind(group)
    .bind(except)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// A device as an export shows it: no keys, no tokens, no dehydrated device (its row holds the
/// client's encrypted key material).
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct ExportedDevice {
    pub device_id: String,
    pub display_name: Option<String>,
    pub created_ts: i64,
    pub last_seen_ts: Option<i64>,
    pub last_seen_ip: Option<String>,
}

pub async fn devices_of_user(db: impl PgExecutor<'_>, user_id: &str) -> sqlx::Result<Vec<ExportedDevice>> {
    sqlx::query_as(
        "SELECT device_id, display_name, created_ts, last_seen_ts, last_seen_ip FROM devices
         WHERE user_id = $1 AND dehydrated_data IS NULL ORDER BY device_id",
    )
    .bind(user_id)
    .fetch_all(db)
    .await
}

/// All of a user's account data, global (`room_id` empty) and per room, deleted entries (stored
/// as `{}`) left out: `(room_id, type, content)`.
pub async fn account_data_of_user(
    db: impl PgExecutor<'_>,
    user_id: &str,
) -> sqlx::Result<Vec<(String, String, Json<Value>)>> {
    sqlx::query_as(
        "SELECT room_id, data_type, content FROM account_data
         WHERE user_id = $1 AND content <> '{}'::jsonb ORDER BY room_id, data_type",
    )
    .bind(user_id)
    .fetch_all(db)
    .await
}

// ---- Export jobs ----

/// Counters of an export under way, as the admin API reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ExportCounts {
    pub rooms_total: i64,
    pub rooms_done: i64,
    pub events: i64,
    pub media_files: i64,
    pub media_skipped: i64,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ExportRow {
    pub export_id: String,
    pub user_id: String,
    pub requested_by: String,
    pub status: String,
    pub error: Option<String>,
    pub created_ts: i64,
    pub started_ts: Option<i64>,
    pub finished_ts: Option<i64>,
    pub heartbeat_ts: i64,
    pub expires_ts: Option<i64>,
    pub file_name: Option<String>,
    pub size_bytes: Option<i64>,
    pub rooms_total: i64,
    pub rooms_done: i64,
    pub events: i64,
    pub media_files: i64,
    pub media_skipped: i64,
}

impl ExportRow {
    pub fn counts(&self) -> ExportCounts {
        ExportCounts {
            rooms_total: self.rooms_total,
            rooms_done: self.rooms_done,
            events: self.events,
            media_files: self.media_files,
            media_skipped: self.media_skipped,
        }
    }
}

/// Records a pending export. `false` if the user already has one pending or running (the
/// partial unique index decides, whichever instance inserted it).
pub async fn insert_export(
    db: impl PgExecutor<'_>,
    export_id: &str,
    user_id: &str,
    requested_by: &str,
    now: i64,
) -> sqlx::Result<bool> {
    let n = sqlx::query(
        "INSERT INTO user_exports (export_id, user_id, requested_by, status, created_ts, heartbeat_ts)
         VALUES ($1, $2, $3, 'pending', $4, $4)
         ON CONFLICT (user_id) WHERE status IN ('pending', 'running') DO NOTHING",
    )
    .bind(export_id)
    .bind(user_id)
    .bind(requested_by)
    .bind(now)
    .execute(db)
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// The pending or running export of a user, if any.
pub async fn active_export(db: impl PgExecutor<'_>, user_id: &str) -> sqlx::Result<Option<String>> {
    sqlx::query_scalar("SELECT export_id FROM user_exports WHERE user_id = $1 AND status IN ('pending', 'running')")
        .bind(user_id)
        .fetch_optional(db)
        .await
}

pub async fn get_export(db: impl PgExecutor<'_>, export_id: &str) -> sqlx::Result<Option<ExportRow>> {
    sqlx::query_as("SELECT * FROM user_exports WHERE export_id = $1").bind(export_id).fetch_optional(db).await
}

/// Refreshes a pending job's heartbeat. `false` if it is no longer pending (failed meanwhile).
pub async fn heartbeat_pending(db: impl PgExecutor<'_>, export_id: &str, now: i64) -> sqlx::Result<bool> {
    Ok(sqlx::query("UPDATE user_exports SET heartbeat_ts = $2 WHERE export_id = $1 AND status = 'pending'")
        .bind(export_id)
        .bind(now)
        .execute(db)
        .await?
        .rows_affected()
        == 1)
}

/// pending → running. `false` if the job is no longer pending.
pub async fn mark_running(db: impl PgExecutor<'_>, export_id: &str, now: i64) -> sqlx::Result<bool> {
    Ok(sqlx::query(
        "UPDATE user_exports SET status = 'running', started_ts = $2, heartbeat_ts = $2
         WHERE export_id = $1 AND status = 'pending'",
    )
    .bind(export_id)
    .bind(now)
    .execute(db)
    .await?
    .rows_affected()
        == 1)
}

/// Records progress (and the heartbeat) of a running job. `false` if it is no longer running.
pub async fn set_progress(db: impl PgExecutor<'_>, export_id: &str, c: &ExportCounts, now: i64) -> sqlx::Result<bool> {
    Ok(sqlx::query(
        "UPDATE user_exports SET heartbeat_ts = $2, rooms_total = $3, rooms_done = $4, events = $5,
                media_files = $6, media_skipped = $7
         WHERE export_id = $1 AND status = 'running'",
    )
    .bind(export_id)
    .bind(now)
    .bind(c.rooms_total)
    .bind(c.rooms_done)
    .bind(c.events)
    .bind(c.media_files)
    .bind(c.media_skipped)
    .execute(db)
    .await?
    .rows_affected()
        == 1)
}

/// running → done. `false` if the job is no longer running (declared interrupted meanwhile):
/// the caller then deletes the file.
#[allow(clippy::too_many_arguments)]
pub async fn mark_done(
    db: impl PgExecutor<'_>,
    export_id: &str,
    c: &ExportCounts,
    file_name: &str,
    size: i64,
    now: i64,
    expires_ts: i64,
) -> sqlx::Result<bool> {
    Ok(sqlx::query(
        "UPDATE user_exports SET status = 'done', finished_ts = $2, heartbeat_ts = $2, expires_ts = $3,
                file_name = $4, size_bytes = $5, rooms_total = $6, rooms_done = $7, events = $8,
                media_files = $9, media_skipped = $10
         WHERE export_id = $1 AND status = 'running'",
    )
    .bind(export_id)
    .bind(now)
    .bind(expires_ts)
    .bind(file_name)
    .bind(size)
    .bind(c.rooms_total)
    .bind(c.rooms_done)
    .bind(c.events)
    .bind(c.media_files)
    .bind(c.media_skipped)
    .execute(db)
    .await?
    .rows_affected()
        == 1)
}

/// pending or running → failed, with the reason.
pub async fn mark_failed(db: impl PgExecutor<'_>, export_id: &str, error: &str, now: i64) -> sqlx::Result<bool> {
    Ok(sqlx::query(
        "UPDATE user_exports SET status = 'failed', error = $2, finished_ts = $3, heartbeat_ts = $3
         WHERE export_id = $1 AND status IN ('pending', 'running')",
    )
    .bind(export_id)
    .bind(error)
    .bind(now)
    .execute(db)
    .await?
    .rows_affected()
        == 1)
}

/// Pending or running jobs whose heartbeat is older than `before` (their process died) become
/// failed; optionally only one user's. Returns their IDs (their partial files are removed by
/// the caller).
pub async fn fail_stale(
    db: &PgPool,
    before: i64,
    user_id: Option<&str>,
    now: i64,
    error: &str,
) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "UPDATE user_exports SET status = 'failed', error = $4, finished_ts = $3
         WHERE status IN ('pending', 'running') AND heartbeat_ts < $1 AND ($2::text IS NULL OR user_id = $2)
         RETURNING export_id",
    )
    .bind(before)
    .bind(user_id)
    .bind(now)
    .bind(error)
    .fetch_all(db)
    .await
}

/// Done exports whose archive expired: `(export_id, file_name)`, at most `limit`.
pub async fn expired_exports(db: impl PgExecutor<'_>, now: i64, limit: i64) -> sqlx::Result<Vec<(String, String)>> {
    sqlx::query_as(
        "SELECT export_id, COALESCE(file_name, '') FROM user_exports
         WHERE status = 'done' AND expires_ts <= $1 ORDER BY expires_ts LIMIT $2",
    )
    .bind(now)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// done → expired, once the file is gone.
pub async fn mark_expired(db: impl PgExecutor<'_>, export_id: &str) -> sqlx::Result<()> {
    sqlx::query("UPDATE user_exports SET status = 'expired' WHERE export_id = $1 AND status = 'done'")
        .bind(export_id)
        .execute(db)
        .await?;
    Ok(())
}
