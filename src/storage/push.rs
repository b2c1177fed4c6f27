//! `event_push_actions`: who each event notified, and what follows from it: unread notification
//! counts (per room, per thread), the list behind `GET /notifications`, the badge count sent to
//! push gateways. Also the one read of room state that push rule evaluation needs.
//!
//! A user's read position in a room is the highest `event_stream` of their `m.read` and
//! `m.read.private` receipts that apply to the notification's thread: an unthreaded receipt
//! (`thread_id = ''`) applies to the main timeline and every thread, a `main` receipt to the main
//! timeline only, a thread receipt to that thread only. A notification is unread when its
//! `stream_ordering` is above that position.

use std::collections::HashMap;

use serde_json::Value;
use sqlx::types::Json;
use sqlx::{PgConnection, PgExecutor};

use super::events::EventRow;

/// The receipt types that mark events as read.
const READ_TYPES: &str = "('m.read', 'm.read.private')";

/// One row to insert into `event_push_actions`.
#[derive(Debug, Clone)]
pub struct NewPushAction {
    pub user_id: String,
    pub event_nid: i64,
    pub stream_ordering: i64,
    /// `main` or the thread root's event ID.
    pub thread_id: String,
    pub notify: bool,
    pub highlight: bool,
    pub actions: Value,
}

/// Drops a user's notifications in a room from before stream position `before` (when they join).
pub async fn clear_before(conn: &mut PgConnection, room_nid: i64, user_id: &str, before: i64) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM event_push_actions WHERE user_id = $1 AND room_nid = $2 AND stream_ordering < $3")
        .bind(user_id)
        .bind(room_nid)
        .bind(before)
        .execute(conn)
        .await?;
    Ok(())
}

/// Inserts the push actions of a batch of events of one room, in one statement, which also
/// returns those of the rows' users who have an HTTP pusher (as of the statement's snapshot).
pub async fn insert_actions(
    conn: &mut PgConnection,
    room_nid: i64,
    ts: i64,
    rows: &[NewPushAction],
) -> sqlx::Result<Vec<String>> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let mut users = Vec::with_capacity(rows.len());
    let mut event_nids = Vec::with_capacity(rows.len());
    let mut streams = Vec::with_capacity(rows.len());
    let mut threads = Vec::with_capacity(rows.len());
    let mut notify = Vec::with_capacity(rows.len());
    let mut highlight = Vec::with_capacity(rows.len());
    let mut actions = Vec::with_capacity(rows.len());
    for r in rows {
        users.push(r.user_id.as_str());
        event_nids.push(r.event_nid);
        streams.push(r.stream_ordering);
        threads.push(r.thread_id.as_str());
        notify.push(r.notify);
        highlight.push(r.highlight);
        actions.push(r.actions.to_string());
    }
    // The users with HTTP pushers come back from the same statement: the delivery path then
    // needs no query for a batch that notifies no such user.
    sqlx::query_scalar(
        "WITH ins AS (
             INSERT INTO event_push_actions
                 (user_id, room_nid, event_nid, stream_ordering, thread_id, notify, highlight, actions, ts)
             SELECT u, $1, e, s, t, n, h, a::jsonb, $2
             FROM UNNEST($3::text[], $4::bigint[], $5::bigint[], $6::text[], $7::bool[], $8::bool[], $9::text[])
                  AS x(u, e, s, t, n, h, a)
             ON CONFLICT DO NOTHING)
         SELECT DISTINCT user_id FROM pushers WHERE user_id = ANY($3) AND kind = 'http'",
    )
    .bind(room_nid)
    .bind(ts)
    .bind(&users)
    .bind(&event_nids)
    .bind(&streams)
    .bind(&threads)
    .bind(&notify)
    .bind(&highlight)
    .bind(&actions)
    .fetch_all(conn)
    .await
}

/// A state event push evaluation needs (members, power levels, create, name, canonical alias).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PushStateRow {
    pub event_type: String,
    pub state_key: String,
    pub sender: String,
    /// For `m.room.member`: only `{"displayname": ...}` (the row exists only for joined members);
    /// for the others the whole content. A redacted name or alias reads as `{}`.
    pub content: Json<Value>,
}

/// The state push evaluation needs, as of state group `group` (the state before an event):
/// joined members with their display names, power levels, the create event, room name and
/// canonical alias. One query.
pub async fn room_push_state(db: impl PgExecutor<'_>, group: i64) -> sqlx::Result<Vec<PushStateRow>> {
    sqlx::query_as(
        "WITH RECURSIVE chain(group_nid, prev_group, level) AS (
             SELECT group_nid, prev_group, 0 FROM state_groups WHERE group_nid = $1
             UNION ALL
             SELECT g.group_nid, g.prev_group, c.level + 1
             FROM state_groups g JOIN chain c ON g.group_nid = c.prev_group
         ), latest AS (
             SELECT DISTINCT ON (e.key_nid) k.event_type, k.state_key, e.event_nid
             FROM state_group_entries e
             JOIN chain c ON e.group_nid = c.group_nid
             JOIN state_keys k ON k.key_nid = e.key_nid
             WHERE k.event_type IN
                 ('m.room.member', 'm.room.power_levels', 'm.room.create', 'm.room.name', 'm.room.canonical_alias')
             ORDER BY e.key_nid, c.level
         ), parsed AS (
             SELECT l.event_type, l.state_key, ev.sender, ev.redacted_by IS NOT NULL AS redacted,
                    ev.json::jsonb -> 'content' AS content
             FROM latest l JOIN events ev ON ev.event_nid = l.event_nid
         )
         SELECT event_type, state_key, sender,
                CASE
                    WHEN event_type = 'm.room.member' THEN
                        CASE WHEN redacted THEN '{}'::jsonb
                             ELSE jsonb_strip_nulls(jsonb_build_object('displayname', content -> 'displayname')) END
                    WHEN redacted AND event_type IN ('m.room.name', 'm.room.canonical_alias') THEN '{}'::jsonb
                    ELSE content
                END AS content
         FROM parsed
         WHERE event_type <> 'm.room.member' OR content ->> 'membership' = 'join'",
    )
    .bind(group)
    .fetch_all(db)
    .await
}

/// Unread notification counts of one room.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoomCounts {
    /// Notifications (and, of those, highlights) not yet read. With [`unread_counts`]: the main
    /// timeline only (threads are in `threads`); with [`unread_counts_unthreaded`]: everything.
    pub notification_count: i64,
    pub highlight_count: i64,
    /// Per thread root event ID: `(notification_count, highlight_count)`. Only threads with
    /// unread notifications appear. Empty with [`unread_counts_unthreaded`].
    pub threads: HashMap<String, (i64, i64)>,
}

impl RoomCounts {
    /// The totals over the main timeline and all threads (what /sync reports as
    /// `unread_notifications` unless the filter asks for `unread_thread_notifications`).
    pub fn total(&self) -> (i64, i64) {
        self.threads.values().fold((self.notification_count, self.highlight_count), |(n, h), (tn, th)| (n + tn, h + th))
    }

    /// These counts with the threads folded into the room's totals.
    pub fn unthreaded(self) -> Self {
        let (notification_count, highlight_count) = self.total();
        Self { notification_count, highlight_count, threads: HashMap::new() }
    }
}

/// Unread notification counts of `user_id` in each of `room_nids`, threads apart: the room's
/// own counts cover its main timeline, `threads` each thread with unread notifications. This is
/// /sync's `unread_notifications` + `unread_thread_notifications` when the filter sets
/// `unread_thread_notifications: true`. Every requested room is in the map (zeros when nothing
/// is unread). One query for all rooms.
pub async fn unread_counts(
    db: impl PgExecutor<'_>,
    user_id: &str,
    room_nids: &[i64],
) -> sqlx::Result<HashMap<i64, RoomCounts>> {
    // Rows are scanned from the unthreaded receipt (the lowest possible read position) on, with
    // the thread's own receipt checked per row: both are primary-key lookups.
    let rows: Vec<(i64, String, i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT r.room_nid, a.thread_id, COUNT(*), COUNT(*) FILTER (WHERE a.highlight)
         FROM UNNEST($2::bigint[]) AS r(room_nid)
         CROSS JOIN LATERAL (
             SELECT COALESCE(MAX(event_stream), 0) AS pos FROM receipts
             WHERE room_nid = r.room_nid AND user_id = $1 AND thread_id = '' AND receipt_type IN {READ_TYPES}
         ) u
         JOIN event_push_actions a ON a.user_id = $1 AND a.room_nid = r.room_nid AND a.stream_ordering > u.pos
         WHERE a.notify AND NOT EXISTS (
             SELECT 1 FROM receipts t
             WHERE t.room_nid = r.room_nid AND t.user_id = $1 AND t.thread_id = a.thread_id
               AND t.receipt_type IN {READ_TYPES} AND t.event_stream >= a.stream_ordering
         )
         GROUP BY r.room_nid, a.thread_id"
    )))
    .bind(user_id)
    .bind(room_nids)
    .fetch_all(db)
    .await?;
    let mut out: HashMap<i64, RoomCounts> = room_nids.iter().map(|n| (*n, RoomCounts::default())).collect();
    for (room_nid, thread_id, notifications, highlights) in rows {
        let counts = out.entry(room_nid).or_default();
        if thread_id == "main" {
            counts.notification_count += notifications;
            counts.highlight_count += highlights;
        } else {
            counts.threads.insert(thread_id, (notifications, highlights));
        }
    }
    Ok(out)
}

/// Like [`unread_counts`] with each room's threads folded into its totals: /sync's
/// `unread_notifications` for clients that did not ask for thread counts.
pub async fn unread_counts_unthreaded(
    db: impl PgExecutor<'_>,
    user_id: &str,
    room_nids: &[i64],
) -> sqlx::Result<HashMap<i64, RoomCounts>> {
    Ok(unread_counts(db, user_id, room_nids).await?.into_iter().map(|(k, v)| (k, v.unthreaded())).collect())
}

/// Each user's unread notifications over all the rooms they are joined to (the push gateway's
/// `counts.unread`). Users with none are absent. One query for all users.
pub async fn unread_totals(db: impl PgExecutor<'_>, user_ids: &[String]) -> sqlx::Result<HashMap<String, i64>> {
    let rows: Vec<(String, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT m.user_id, COUNT(*)
         FROM room_memberships m
         CROSS JOIN LATERAL (
             SELECT COALESCE(MAX(event_stream), 0) AS pos FROM receipts
             WHERE room_nid = m.room_nid AND user_id = m.user_id AND thread_id = ''
               AND receipt_type IN {READ_TYPES}
         ) u
         JOIN event_push_actions a
           ON a.user_id = m.user_id AND a.room_nid = m.room_nid AND a.stream_ordering > u.pos
         WHERE m.user_id = ANY($1) AND m.membership = 'join' AND a.notify AND NOT EXISTS (
             SELECT 1 FROM receipts t
             WHERE t.room_nid = m.room_nid AND t.user_id = m.user_id AND t.thread_id = a.thread_id
               AND t.receipt_type IN {READ_TYPES} AND t.event_stream >= a.stream_ordering
         )
         GROUP BY m.user_id"
    )))
    .bind(user_ids)
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().collect())
}

/// A notification as `GET /notifications` lists it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct NotificationRow {
    pub room_id: String,
    pub room_version: String,
    pub actions: Json<Value>,
    pub ts: i64,
    /// Whether the user's applicable receipt is at or after the event.
    pub read: bool,
    #[sqlx(flatten)]
    pub event: EventRow,
}

/// The notifications of `user_id`, newest first, below stream position `before` (exclusive),
/// at most `limit`; only highlights if `only_highlight`. Only rooms the user may still see:
/// while joined, everything; after leaving (or being banned, or while invited), what came up
/// to that membership change; nothing of forgotten rooms.
pub async fn notifications(
    db: impl PgExecutor<'_>,
    user_id: &str,
    before: Option<i64>,
    limit: i64,
    only_highlight: bool,
) -> sqlx::Result<Vec<NotificationRow>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT r.room_id, r.room_version, a.actions, a.ts,
                EXISTS (
                    SELECT 1 FROM receipts rc
                    WHERE rc.room_nid = a.room_nid AND rc.user_id = a.user_id AND rc.thread_id IN ('', a.thread_id)
                      AND rc.receipt_type IN {READ_TYPES} AND rc.event_stream >= a.stream_ordering
                ) AS read,
                e.event_nid, e.event_id, e.room_nid, e.stream_ordering, e.depth, e.event_type, e.state_key, e.sender,
                e.origin_server_ts, e.json, e.redacted_by, e.txn_device, e.txn_id, e.state_before, e.state_after
         FROM event_push_actions a
         JOIN room_memberships m ON m.room_nid = a.room_nid AND m.user_id = a.user_id
         JOIN events e ON e.event_nid = a.event_nid
         JOIN rooms r ON r.room_nid = a.room_nid
         WHERE a.user_id = $1 AND a.notify
           AND ($2::bigint IS NULL OR a.stream_ordering < $2)
           AND (NOT $4 OR a.highlight)
           AND NOT m.forgotten
           AND (m.membership = 'join' OR a.stream_ordering <= m.stream_ordering)
         ORDER BY a.stream_ordering DESC
         LIMIT $3"
    )))
    .bind(user_id)
    .bind(before)
    .bind(limit)
    .bind(only_highlight)
    .fetch_all(db)
    .await
}
