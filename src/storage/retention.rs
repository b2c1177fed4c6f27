//! Message retention (MSC1763): the rooms' `m.room.retention` policies, the expired events of a
//! room, their deletion, and whether a piece of media is still referenced. See
//! `rooms::retention` for the rules.

use std::collections::HashSet;

use sqlx::{PgConnection, PgExecutor};

/// Namespace of the purge job's session advisory lock (one purge at a time over all instances).
const PURGE_LOCK: i64 = 0x5061_7276_5265_7430;

/// Every room's current `m.room.retention` event (state key `""`): `(room_nid, json)`.
pub async fn room_policies(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<(i64, String)>> {
    sqlx::query_as(
        "SELECT cs.room_nid, e.json FROM state_keys sk
         JOIN current_state cs ON cs.key_nid = sk.key_nid
         JOIN events e ON e.event_nid = cs.event_nid
         WHERE sk.event_type = 'm.room.retention' AND sk.state_key = ''",
    )
    .fetch_all(db)
    .await
}

/// Every room of this server.
pub async fn all_rooms(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<i64>> {
    sqlx::query_scalar("SELECT room_nid FROM rooms ORDER BY room_nid").fetch_all(db).await
}

/// Takes the purge lock on this connection if no other session holds it. The lock is a session
/// lock: the caller must release it with [`unlock_purge`] (or close the connection) before the
/// connection goes back to the pool.
pub async fn try_lock_purge(conn: &mut PgConnection) -> sqlx::Result<bool> {
    sqlx::query_scalar("SELECT pg_try_advisory_lock($1)").bind(PURGE_LOCK).fetch_one(conn).await
}

pub async fn unlock_purge(conn: &mut PgConnection) -> sqlx::Result<bool> {
    sqlx::query_scalar("SELECT pg_advisory_unlock($1)").bind(PURGE_LOCK).fetch_one(conn).await
}

/// An event the purge is about to delete.
#[derive(Debug, sqlx::FromRow)]
pub struct Expired {
    pub event_nid: i64,
    pub stream_ordering: i64,
    pub json: String,
}

/// Up to `limit` non-state events of a room sent before `cutoff_ts`, oldest first, never one of
/// the room's forward extremities (its latest event: the next event's `prev_events`).
/// Extremities only ever move to newer events, so an event that is not one now never becomes one:
/// no room lock is needed. A concurrent redaction of a purged event updates nothing, or its
/// `redacted_by` is deleted with the row.
pub async fn expired_batch(
    conn: &mut PgConnection,
    room_nid: i64,
    cutoff_ts: i64,
    limit: i64,
) -> sqlx::Result<Vec<Expired>> {
    sqlx::query_as(
        "SELECT e.event_nid, e.stream_ordering, e.json FROM events e
         WHERE e.room_nid = $1 AND e.state_key IS NULL AND e.origin_server_ts < $2
           AND e.event_nid <> ALL (COALESCE((SELECT x.event_nids FROM room_extremities x WHERE x.room_nid = $1), '{}'))
         ORDER BY e.origin_server_ts LIMIT $3",
    )
    .bind(room_nid)
    .bind(cutoff_ts)
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// Deletes events (non-state events of one room) and every row that points at them by number:
/// push actions (unread counts, `/notifications`), prev and auth edges. Rows that reference them
/// by foreign key and must not go (state groups, current state, memberships, the auth edges of
/// other events) make the statement fail, so a wrong candidate can never be deleted; tables added
/// later that hang off `events` cascade (`event_search`). Returns how many events were deleted.
pub async fn delete_events(conn: &mut PgConnection, room_nid: i64, events: &[Expired]) -> sqlx::Result<u64> {
    let nids: Vec<i64> = events.iter().map(|e| e.event_nid).collect();
    let streams: Vec<i64> = events.iter().map(|e| e.stream_ordering).collect();
    // event_push_actions is keyed by (user, room, stream): one index probe per user who ever had
    // a membership in the room (only local members get rows), rather than a scan.
    sqlx::query(
        "DELETE FROM event_push_actions
         WHERE user_id IN (SELECT user_id FROM room_memberships WHERE room_nid = $1)
           AND room_nid = $1 AND stream_ordering = ANY($2)",
    )
    .bind(room_nid)
    .bind(&streams)
    .execute(&mut *conn)
    .await?;
    sqlx::query("DELETE FROM event_edges WHERE event_nid = ANY($1)").bind(&nids).execute(&mut *conn).await?;
    sqlx::query("DELETE FROM event_auth WHERE event_nid = ANY($1)").bind(&nids).execute(&mut *conn).await?;
    let deleted = sqlx::query("DELETE FROM events WHERE event_nid = ANY($1) AND room_nid = $2 AND state_key IS NULL")
        .bind(&nids)
        .bind(room_nid)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    Ok(deleted)
}

/// Of `refs` (`server/media_id`), those still mentioned by an event, a profile or account data.
/// Events are looked up in the `events_mxc_refs` index; profiles and account data (avatars,
/// emote packs) are read once for the whole set.
pub async fn still_referenced(db: impl PgExecutor<'_>, refs: &[String]) -> sqlx::Result<HashSet<String>> {
    let rows: Vec<String> = sqlx::query_scalar(
        "SELECT r FROM unnest($1::text[]) r
         WHERE EXISTS (SELECT 1 FROM events e WHERE e.json LIKE '%mxc://%' AND parvis_mxc_refs(e.json) @> ARRAY[r])
         UNION
         SELECT x.r FROM (
             SELECT unnest(parvis_mxc_refs(p.fields::text)) AS r FROM profiles p WHERE p.fields::text LIKE '%mxc://%'
             UNION ALL
             SELECT unnest(parvis_mxc_refs(a.content::text)) FROM account_data a WHERE a.content::text LIKE '%mxc://%'
         ) x WHERE x.r = ANY($1)",
    )
    .bind(refs)
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Of `media_ids` (of this server), those that exist as local uploads (not cached remote media).
pub async fn local_uploads(
    db: impl PgExecutor<'_>,
    server_name: &str,
    media_ids: &[String],
) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT media_id FROM media WHERE server_name = $1 AND media_id = ANY($2) AND uploader IS NOT NULL",
    )
    .bind(server_name)
    .bind(media_ids)
    .fetch_all(db)
    .await
}
