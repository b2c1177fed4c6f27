//! `rooms`, current-state reads, `room_memberships` and `room_aliases`.

use sqlx::{PgConnection, PgExecutor};

use super::events::EventRow;
use super::now_ms;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RoomRow {
    pub room_nid: i64,
    pub room_id: String,
    pub room_version: String,
    pub creator: String,
    pub is_public: bool,
    pub current_state_group: Option<i64>,
}

/// Inserts a room; returns its nid.
pub async fn insert(conn: &mut PgConnection, room_id: &str, version: &str, creator: &str) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "INSERT INTO rooms (room_id, room_version, creator, created_ts) VALUES ($1, $2, $3, $4)
         RETURNING room_nid",
    )
    .bind(room_id)
    .bind(version)
    .bind(creator)
    .bind(now_ms())
    .fetch_one(conn)
    .await
}

pub async fn by_id(db: impl PgExecutor<'_>, room_id: &str) -> sqlx::Result<Option<RoomRow>> {
    sqlx::query_as(
        "SELECT room_nid, room_id, room_version, creator, is_public, current_state_group FROM rooms WHERE room_id = $1",
    )
    .bind(room_id)
    .fetch_optional(db)
    .await
}

pub async fn set_current_group(conn: &mut PgConnection, room_nid: i64, group: i64) -> sqlx::Result<()> {
    sqlx::query("UPDATE rooms SET current_state_group = $2 WHERE room_nid = $1")
        .bind(room_nid)
        .bind(group)
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn set_public(db: impl PgExecutor<'_>, room_nid: i64, public: bool) -> sqlx::Result<()> {
    sqlx::query("UPDATE rooms SET is_public = $2 WHERE room_nid = $1").bind(room_nid).bind(public).execute(db).await?;
    Ok(())
}

const EVENT_COLUMNS: &str = "e.event_nid, e.event_id, e.room_nid, COALESCE(e.stream_ordering, 0) AS stream_ordering, e.depth, e.event_type, \
     e.state_key, e.sender, e.origin_server_ts, e.json, e.redacted_by, e.txn_device, e.txn_id, e.state_before, e.state_after";

/// Current state events for the given `(type, state_key)` pairs.
pub async fn current_state_for(
    db: impl PgExecutor<'_>,
    room_nid: i64,
    keys: &[(String, String)],
) -> sqlx::Result<Vec<EventRow>> {
    let (types, state_keys): (Vec<&str>, Vec<&str>) = keys.iter().map(|(t, k)| (t.as_str(), k.as_str())).unzip();
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {EVENT_COLUMNS} FROM current_state cs
         JOIN state_keys sk ON sk.key_nid = cs.key_nid
         JOIN events e ON e.event_nid = cs.event_nid
         WHERE cs.room_nid = $1 AND (sk.event_type, sk.state_key) IN
           (SELECT * FROM UNNEST($2::text[], $3::text[]))"
    )))
    .bind(room_nid)
    .bind(&types)
    .bind(&state_keys)
    .fetch_all(db)
    .await
}

/// The current state events of one type (e.g. a space's `m.space.child` events), at most
/// `limit` of them.
pub async fn current_state_of_type(
    db: impl PgExecutor<'_>,
    room_nid: i64,
    event_type: &str,
    limit: i64,
) -> sqlx::Result<Vec<EventRow>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {EVENT_COLUMNS} FROM current_state cs
         JOIN state_keys sk ON sk.key_nid = cs.key_nid
         JOIN events e ON e.event_nid = cs.event_nid
         WHERE cs.room_nid = $1 AND sk.event_type = $2
         ORDER BY sk.state_key LIMIT $3"
    )))
    .bind(room_nid)
    .bind(event_type)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// How many users are joined to a room.
pub async fn joined_count(db: impl PgExecutor<'_>, room_nid: i64) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT COUNT(*) FROM room_memberships WHERE room_nid = $1 AND membership = 'join'")
        .bind(room_nid)
        .fetch_one(db)
        .await
}

/// Whether `user_id` is joined to at least one of `room_ids` (one query).
pub async fn joined_any(db: impl PgExecutor<'_>, user_id: &str, room_ids: &[String]) -> sqlx::Result<bool> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM room_memberships m JOIN rooms r ON r.room_nid = m.room_nid
                        WHERE m.user_id = $1 AND m.membership = 'join' AND r.room_id = ANY($2))",
    )
    .bind(user_id)
    .bind(room_ids)
    .fetch_one(db)
    .await
}

/// The whole current state of a room.
pub async fn current_state(db: impl PgExecutor<'_>, room_nid: i64) -> sqlx::Result<Vec<EventRow>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {EVENT_COLUMNS} FROM current_state cs JOIN events e ON e.event_nid = cs.event_nid
         WHERE cs.room_nid = $1 ORDER BY e.stream_ordering"
    )))
    .bind(room_nid)
    .fetch_all(db)
    .await
}

/// The events of a state group (full state at some point).
pub async fn state_events_of_group(db: &sqlx::PgPool, group: i64) -> sqlx::Result<Vec<EventRow>> {
    let map = super::state::load_group(db, group).await?;
    let nids: Vec<i64> = map.into_values().collect();
    let mut rows = super::events::by_nids(db, &nids).await?;
    rows.sort_by_key(|r| r.stream_ordering);
    Ok(rows)
}

pub async fn set_membership(
    conn: &mut PgConnection,
    room_nid: i64,
    user_id: &str,
    membership: &str,
    event_nid: i64,
    stream: i64,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO room_memberships (room_nid, user_id, membership, event_nid, stream_ordering)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (room_nid, user_id) DO UPDATE
           SET membership = EXCLUDED.membership, event_nid = EXCLUDED.event_nid,
               stream_ordering = EXCLUDED.stream_ordering, forgotten = FALSE",
    )
    .bind(room_nid)
    .bind(user_id)
    .bind(membership)
    .bind(event_nid)
    .bind(stream)
    .execute(conn)
    .await?;
    Ok(())
}

/// A user's current membership in a room: (membership, event_nid, stream_ordering).
pub async fn membership(
    db: impl PgExecutor<'_>,
    room_nid: i64,
    user_id: &str,
) -> sqlx::Result<Option<(String, i64, i64)>> {
    sqlx::query_as(
        "SELECT membership, event_nid, stream_ordering FROM room_memberships WHERE room_nid = $1 AND user_id = $2",
    )
    .bind(room_nid)
    .bind(user_id)
    .fetch_optional(db)
    .await
}

pub async fn joined_rooms(db: impl PgExecutor<'_>, user_id: &str) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT r.room_id FROM room_memberships m JOIN rooms r ON r.room_nid = m.room_nid
         WHERE m.user_id = $1 AND m.membership = 'join' ORDER BY m.stream_ordering",
    )
    .bind(user_id)
    .fetch_all(db)
    .await
}

/// Current member events of a room, optionally filtered by membership.
pub async fn member_events(
    db: impl PgExecutor<'_>,
    room_nid: i64,
    membership: Option<&str>,
    not_membership: Option<&str>,
) -> sqlx::Result<Vec<EventRow>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {EVENT_COLUMNS} FROM room_memberships m JOIN events e ON e.event_nid = m.event_nid
         WHERE m.room_nid = $1 AND ($2::text IS NULL OR m.membership = $2)
           AND ($3::text IS NULL OR m.membership <> $3)
         ORDER BY m.user_id"
    )))
    .bind(room_nid)
    .bind(membership)
    .bind(not_membership)
    .fetch_all(db)
    .await
}

/// Membership events of one user in a room, oldest first: (membership, stream_ordering).
pub async fn membership_history(
    db: impl PgExecutor<'_>,
    room_nid: i64,
    user_id: &str,
) -> sqlx::Result<Vec<(String, i64)>> {
    sqlx::query_as(
        "SELECT e.json::jsonb -> 'content' ->> 'membership', e.stream_ordering FROM events e
         WHERE e.room_nid = $1 AND e.event_type = 'm.room.member' AND e.state_key = $2
           AND e.stream_ordering IS NOT NULL
         ORDER BY e.stream_ordering",
    )
    .bind(room_nid)
    .bind(user_id)
    .fetch_all(db)
    .await
}

pub async fn forget(db: impl PgExecutor<'_>, room_nid: i64, user_id: &str) -> sqlx::Result<()> {
    sqlx::query("UPDATE room_memberships SET forgotten = TRUE WHERE room_nid = $1 AND user_id = $2")
        .bind(room_nid)
        .bind(user_id)
        .execute(db)
        .await?;
    Ok(())
}

/// Rooms where `user_id`'s profile must be refreshed: the rooms they are joined to.
pub async fn joined_room_ids_and_nids(db: impl PgExecutor<'_>, user_id: &str) -> sqlx::Result<Vec<(i64, String)>> {
    sqlx::query_as(
        "SELECT r.room_nid, r.room_id FROM room_memberships m JOIN rooms r ON r.room_nid = m.room_nid
         WHERE m.user_id = $1 AND m.membership = 'join'",
    )
    .bind(user_id)
    .fetch_all(db)
    .await
}

pub async fn insert_alias(db: impl PgExecutor<'_>, alias: &str, room_nid: i64, creator: &str) -> sqlx::Result<bool> {
    Ok(sqlx::query(
        "INSERT INTO room_aliases (alias, room_nid, creator, created_ts) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
    )
    .bind(alias)
    .bind(room_nid)
    .bind(creator)
    .bind(now_ms())
    .execute(db)
    .await?
    .rows_affected()
        == 1)
}

/// (room_id, creator) for an alias.
pub async fn resolve_alias(db: impl PgExecutor<'_>, alias: &str) -> sqlx::Result<Option<(String, i64, String)>> {
    sqlx::query_as(
        "SELECT r.room_id, r.room_nid, a.creator FROM room_aliases a JOIN rooms r ON r.room_nid = a.room_nid
         WHERE a.alias = $1",
    )
    .bind(alias)
    .fetch_optional(db)
    .await
}

pub async fn delete_alias(db: impl PgExecutor<'_>, alias: &str) -> sqlx::Result<bool> {
    Ok(sqlx::query("DELETE FROM room_aliases WHERE alias = $1").bind(alias).execute(db).await?.rows_affected() == 1)
}

pub async fn aliases_of(db: impl PgExecutor<'_>, room_nid: i64) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar("SELECT alias FROM room_aliases WHERE room_nid = $1 ORDER BY alias")
        .bind(room_nid)
        .fetch_all(db)
        .await
}

pub async fn by_nid(db: impl PgExecutor<'_>, room_nid: i64) -> sqlx::Result<Option<RoomRow>> {
    sqlx::query_as(
        "SELECT room_nid, room_id, room_version, creator, is_public, current_state_group FROM rooms WHERE room_nid = $1",
    )
    .bind(room_nid)
    .fetch_optional(db)
    .await
}

/// Several rooms by nid (one query).
pub async fn by_nids(db: impl PgExecutor<'_>, room_nids: &[i64]) -> sqlx::Result<Vec<RoomRow>> {
    sqlx::query_as(
        "SELECT room_nid, room_id, room_version, creator, is_public, current_state_group FROM rooms
         WHERE room_nid = ANY($1)",
    )
    .bind(room_nids)
    .fetch_all(db)
    .await
}

/// A user's membership in one room, as sync tracks it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UserMembership {
    pub room_nid: i64,
    pub room_id: String,
    pub membership: String,
    pub event_nid: i64,
    pub stream_ordering: i64,
}

/// Every room `user_id` has (or had, unless forgotten) a membership in.
pub async fn user_memberships(db: impl PgExecutor<'_>, user_id: &str) -> sqlx::Result<Vec<UserMembership>> {
    sqlx::query_as(
        "SELECT m.room_nid, r.room_id, m.membership, m.event_nid, m.stream_ordering
         FROM room_memberships m JOIN rooms r ON r.room_nid = m.room_nid
         WHERE m.user_id = $1 AND NOT m.forgotten",
    )
    .bind(user_id)
    .fetch_all(db)
    .await
}
