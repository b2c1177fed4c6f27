//! `events` and their edges, forward extremities, and client transaction IDs.

use sqlx::{PgConnection, PgExecutor};

use super::now_ms;

/// An event as stored, with its canonical JSON.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct EventRow {
    pub event_nid: i64,
    pub event_id: String,
    pub room_nid: i64,
    pub stream_ordering: i64,
    pub depth: i64,
    pub event_type: String,
    pub state_key: Option<String>,
    pub sender: String,
    pub origin_server_ts: i64,
    pub json: String,
    pub redacted_by: Option<String>,
    pub txn_device: Option<String>,
    pub txn_id: Option<String>,
    pub state_before: Option<i64>,
    pub state_after: Option<i64>,
}

const COLUMNS: &str = "event_nid, event_id, room_nid, COALESCE(stream_ordering, 0) AS stream_ordering, depth, event_type, state_key, sender, \
     origin_server_ts, json, redacted_by, txn_device, txn_id, state_before, state_after";

pub struct NewEventRow<'a> {
    pub event_id: &'a str,
    pub room_nid: i64,
    pub depth: i64,
    pub event_type: &'a str,
    pub state_key: Option<&'a str>,
    pub sender: &'a str,
    pub origin_server_ts: i64,
    pub json: &'a str,
    pub state_before: Option<i64>,
    pub state_after: Option<i64>,
    pub redacts: Option<&'a str>,
    pub rel_type: Option<&'a str>,
    pub relates_to: Option<&'a str>,
    pub txn: Option<(&'a str, &'a str)>,
    /// The searchable text (`crate::search`): (key, text, text search configuration).
    pub search: Option<(&'a str, &'a str, &'a str)>,
}

/// Inserts an event with the next stream position. Returns (event_nid, stream_ordering).
/// A statement whose parameters `$1`-`$18` are an event row's columns.
pub(super) type EventQuery<'q, O> = sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>;

/// Binds `e` as `$1`-`$18`, in the order both [`insert`] and [`append`] number them.
pub(super) fn bind_row<'q, O>(q: EventQuery<'q, O>, e: &NewEventRow<'q>) -> EventQuery<'q, O> {
    q.bind(e.event_id)
        .bind(e.room_nid)
        .bind(e.depth)
        .bind(e.event_type)
        .bind(e.state_key)
        .bind(e.sender)
        .bind(e.origin_server_ts)
        .bind(e.json)
        .bind(e.state_before)
        .bind(e.state_after)
        .bind(e.redacts)
        .bind(e.rel_type)
        .bind(e.relates_to)
        .bind(e.txn.map(|t| t.0))
        .bind(e.txn.map(|t| t.1))
        .bind(e.search.map(|s| s.0))
        .bind(e.search.map(|s| s.1))
        .bind(e.search.map_or("simple", |s| s.2))
}

pub async fn insert(conn: &mut PgConnection, e: &NewEventRow<'_>) -> sqlx::Result<(i64, i64)> {
    // The full-text index row goes in with the event, in the same statement.
    let q = sqlx::query_as(
        "WITH ev AS (
             INSERT INTO events (event_id, room_nid, stream_ordering, depth, event_type, state_key, sender,
                                 origin_server_ts, json, state_before, state_after, redacts, rel_type, relates_to,
                                 txn_device, txn_id)
             VALUES ($1, $2, nextval('event_stream_seq'), $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
             RETURNING event_nid, stream_ordering),
         search AS (
             INSERT INTO event_search (event_nid, room_nid, stream_ordering, key, sender, event_type, vector)
             SELECT ev.event_nid, $2, ev.stream_ordering, $16, $6, $4, to_tsvector($18::regconfig, $17)
             FROM ev WHERE $16::text IS NOT NULL)
         SELECT event_nid, stream_ordering FROM ev",
    );
    bind_row(q, e).fetch_one(conn).await
}

/// A client transaction as `event_txns` keys it: `(user, device, scope, txn_id)`.
pub type TxnKey<'a> = (&'a str, &'a str, &'a str, &'a str);

/// Appends an event at the head of its room in one statement: the client transaction row
/// first (a duplicate writes nothing: `None`), then the event with the next stream position, its
/// full-text row, its prev and auth edges, and the room's forward extremities (`replaces` taken
/// out, the event put in). Returns (event_nid, stream_ordering).
///
/// `e.txn` must be the device and ID of `txn` when there is one.
pub async fn append(
    conn: &mut PgConnection,
    e: &NewEventRow<'_>,
    txn: Option<TxnKey<'_>>,
    prev: &[String],
    auth: &[i64],
    replaces: &[i64],
) -> sqlx::Result<Option<(i64, i64)>> {
    // Every CTE sees the same snapshot; `ev` inserts only if `t` did (or there is no
    // transaction), and everything else hangs off `ev`, so a duplicate leaves no row at all.
    let q = sqlx::query_as(
        "WITH t AS (
             INSERT INTO event_txns (user_id, device_id, scope, txn_id, event_id, created_ts)
             SELECT $6, $19, $20, $15, $1, $21 WHERE $20::text IS NOT NULL
             ON CONFLICT DO NOTHING
             RETURNING 1),
         ev AS (
             INSERT INTO events (event_id, room_nid, stream_ordering, depth, event_type, state_key, sender,
                                 origin_server_ts, json, state_before, state_after, redacts, rel_type, relates_to,
                                 txn_device, txn_id)
             SELECT $1, $2, nextval('event_stream_seq'), $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15
             WHERE $20::text IS NULL OR EXISTS (SELECT 1 FROM t)
             RETURNING event_nid, stream_ordering),
         search AS (
             INSERT INTO event_search (event_nid, room_nid, stream_ordering, key, sender, event_type, vector)
             SELECT ev.event_nid, $2, ev.stream_ordering, $16, $6, $4, to_tsvector($18::regconfig, $17)
             FROM ev WHERE $16::text IS NOT NULL),
         prev AS (
             INSERT INTO event_edges (event_nid, prev_event_id)
             SELECT ev.event_nid, p FROM ev, UNNEST($22::text[]) p),
         auth AS (
             INSERT INTO event_auth (event_nid, auth_event_nid)
             SELECT ev.event_nid, a FROM ev, UNNEST($23::bigint[]) a),
         head AS (
             UPDATE room_extremities x
             SET event_nids = ARRAY(SELECT n FROM unnest(x.event_nids) n WHERE n <> ALL($24)) || ev.event_nid
             FROM ev WHERE x.room_nid = $2)
         SELECT event_nid, stream_ordering FROM ev",
    );
    bind_row(q, e)
        .bind(txn.map(|t| t.1))
        .bind(txn.map(|t| t.2))
        .bind(now_ms())
        .bind(prev)
        .bind(auth)
        .bind(replaces)
        .fetch_optional(conn)
        .await
}

/// Takes a room's write lock, a row lock on its `room_extremities` row, and returns the
/// transaction's ID and the room's forward extremities as of the lock (the row as the previous
/// holder committed it); `RowNotFound` if the room has no such row. One statement.
/// The shared event-writers lock, for a transaction that takes event stream positions without
/// taking a room lock first (`createRoom`: its room is invisible to others until it commits).
pub async fn lock_event_writers(conn: &mut PgConnection) -> sqlx::Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock_shared($1)")
        .bind(crate::cluster::EVENT_WRITERS_LOCK)
        .execute(conn)
        .await?;
    Ok(())
}

pub async fn lock_extremities(conn: &mut PgConnection, room_nid: i64) -> sqlx::Result<Vec<i64>> {
    // The cross-instance watermark (issue 20) needs every writer of event stream positions to
    // hold the shared event-writers lock before it takes one (`cluster`, migration 0028): taken
    // here, in the first statement; after the room's row
    // lock (`w` reads `x`), so that a writer queued behind another one of the same room does not
    // hold the watermark back while it waits.
    // A row lock (unlike a read in the same statement as an advisory lock, whose snapshot predates
    // the wait) returns the newest committed version of the row.
    let row: Option<(Option<Vec<i64>>,)> = sqlx::query_as(
        "WITH x AS (SELECT event_nids FROM room_extremities WHERE room_nid = $1 FOR NO KEY UPDATE),
              w AS (SELECT pg_advisory_xact_lock_shared($2) FROM x)
         SELECT (SELECT event_nids FROM x) FROM w",
    )
    .bind(room_nid)
    .bind(crate::cluster::EVENT_WRITERS_LOCK)
    .fetch_optional(conn)
    .await?;
    match row {
        Some((Some(nids),)) => Ok(nids),
        _ => Err(sqlx::Error::RowNotFound),
    }
}

pub async fn by_id(db: impl PgExecutor<'_>, event_id: &str) -> sqlx::Result<Option<EventRow>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM events WHERE event_id = $1")))
        .bind(event_id)
        .fetch_optional(db)
        .await
}

pub async fn by_nids(db: impl PgExecutor<'_>, nids: &[i64]) -> sqlx::Result<Vec<EventRow>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM events WHERE event_nid = ANY($1)")))
        .bind(nids)
        .fetch_all(db)
        .await
}

pub async fn by_ids(db: impl PgExecutor<'_>, ids: &[String]) -> sqlx::Result<Vec<EventRow>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM events WHERE event_id = ANY($1)")))
        .bind(ids)
        .fetch_all(db)
        .await
}

/// Forward extremities of a room: (event_nid, event_id, depth, state_after).
/// The room's forward extremities: (event number, ID, depth, state after, stream position).
#[allow(clippy::type_complexity)]
pub async fn extremities(
    conn: &mut PgConnection,
    room_nid: i64,
) -> sqlx::Result<Vec<(i64, String, i64, Option<i64>, i64)>> {
    sqlx::query_as(
        "SELECT e.event_nid, e.event_id, e.depth, e.state_after, e.stream_ordering
         FROM room_extremities x JOIN events e ON e.event_nid = ANY(x.event_nids)
         WHERE x.room_nid = $1 ORDER BY e.depth, e.stream_ordering",
    )
    .bind(room_nid)
    .fetch_all(conn)
    .await
}

/// The event a client transaction produced. A transaction is identified by the user, the
/// device, the request's path without the transaction ID (`scope`) and the transaction ID.
pub async fn txn_event(
    db: impl PgExecutor<'_>,
    user_id: &str,
    device_id: &str,
    scope: &str,
    txn_id: &str,
) -> sqlx::Result<Option<String>> {
    sqlx::query_scalar(
        "SELECT event_id FROM event_txns WHERE user_id = $1 AND device_id = $2 AND scope = $3 AND txn_id = $4",
    )
    .bind(user_id)
    .bind(device_id)
    .bind(scope)
    .bind(txn_id)
    .fetch_optional(db)
    .await
}

pub async fn mark_redacted(conn: &mut PgConnection, target: &str, room_nid: i64, by: &str) -> sqlx::Result<()> {
    // A redacted event leaves the full-text index in the same statement.
    sqlx::query(
        "WITH r AS (UPDATE events SET redacted_by = $3 WHERE event_id = $1 AND room_nid = $2 AND redacted_by IS NULL
                    RETURNING event_nid)
         DELETE FROM event_search WHERE event_nid IN (SELECT event_nid FROM r)",
    )
    .bind(target)
    .bind(room_nid)
    .bind(by)
    .execute(conn)
    .await?;
    Ok(())
}

/// A page of a room's timeline in topological order from a position `(depth, stream)` between
/// events: backwards the events before it, forwards the events at or after it; limited to the
/// stream range `[min_stream, max_stream]`.
pub async fn page(
    db: impl PgExecutor<'_>,
    room_nid: i64,
    backwards: bool,
    from: (i64, i64),
    visible: (i64, i64),
    limit: i64,
) -> sqlx::Result<Vec<EventRow>> {
    let sql = if backwards {
        format!(
            "SELECT {COLUMNS} FROM events WHERE room_nid = $1 AND (depth, stream_ordering) < ($2, $3)
             AND stream_ordering BETWEEN $4 AND $5
             ORDER BY depth DESC, stream_ordering DESC LIMIT $6"
        )
    } else {
        format!(
            "SELECT {COLUMNS} FROM events WHERE room_nid = $1 AND (depth, stream_ordering) >= ($2, $3)
             AND stream_ordering BETWEEN $4 AND $5
             ORDER BY depth ASC, stream_ordering ASC LIMIT $6"
        )
    };
    sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(room_nid)
        .bind(from.0)
        .bind(from.1)
        .bind(visible.0)
        .bind(visible.1)
        .bind(limit)
        .fetch_all(db)
        .await
}

/// The state group after the event of a room at a stream position.
pub async fn state_after_at(db: impl PgExecutor<'_>, room_nid: i64, stream: i64) -> sqlx::Result<Option<i64>> {
    Ok(sqlx::query_scalar("SELECT state_after FROM events WHERE room_nid = $1 AND stream_ordering = $2")
        .bind(room_nid)
        .bind(stream)
        .fetch_optional(db)
        .await?
        .flatten())
}

/// Relations pointing at any of `targets` (excluding redacted ones), oldest first.
pub async fn relations_to(
    db: impl PgExecutor<'_>,
    room_nid: i64,
    targets: &[String],
) -> sqlx::Result<Vec<(String, String, EventRow)>> {
    #[derive(sqlx::FromRow)]
    struct Row {
        relates_to: String,
        rel_type: String,
        #[sqlx(flatten)]
        event: EventRow,
    }
    let rows: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT relates_to, rel_type, {COLUMNS} FROM events
         WHERE room_nid = $1 AND relates_to = ANY($2) AND rel_type IS NOT NULL AND redacted_by IS NULL
         ORDER BY stream_ordering"
    )))
    .bind(room_nid)
    .bind(targets)
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(|r| (r.relates_to, r.rel_type, r.event)).collect())
}

/// A page of events relating to `target`, newest first (or oldest first), with optional
/// relation type and event type, positions strictly beyond `from` (a stream position).
#[allow(clippy::too_many_arguments)]
pub async fn relations_page(
    db: impl PgExecutor<'_>,
    room_nid: i64,
    target: &str,
    rel_type: Option<&str>,
    event_type: Option<&str>,
    backwards: bool,
    from: i64,
    visible: (i64, i64),
    limit: i64,
) -> sqlx::Result<Vec<EventRow>> {
    let (cmp, order) = if backwards { ("<", "DESC") } else { (">", "ASC") };
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM events
         WHERE room_nid = $1 AND relates_to = $2 AND ($3::text IS NULL OR rel_type = $3)
           AND ($4::text IS NULL OR event_type = $4) AND stream_ordering {cmp} $5
           AND stream_ordering BETWEEN $6 AND $7
         ORDER BY stream_ordering {order} LIMIT $8"
    )))
    .bind(room_nid)
    .bind(target)
    .bind(rel_type)
    .bind(event_type)
    .bind(from)
    .bind(visible.0)
    .bind(visible.1)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// The sender's live (unredacted) `m.reaction` annotating `target` with `key`, if any, as the
/// `(txn_device, txn_id)` it was sent with (one lookup on `events_annotations`).
pub async fn own_annotation(
    db: impl PgExecutor<'_>,
    room_nid: i64,
    target: &str,
    sender: &str,
    key: &str,
) -> sqlx::Result<Option<(Option<String>, Option<String>)>> {
    sqlx::query_as(
        "SELECT txn_device, txn_id FROM events
         WHERE relates_to = $2 AND sender = $3 AND rel_type = 'm.annotation' AND room_nid = $1
           AND event_type = 'm.reaction' AND redacted_by IS NULL
           AND json::jsonb -> 'content' -> 'm.relates_to' ->> 'key' = $4
         LIMIT 1",
    )
    .bind(room_nid)
    .bind(target)
    .bind(sender)
    .bind(key)
    .fetch_optional(db)
    .await
}

/// Thread roots of a room ordered by latest activity (newest first), before `before` (the
/// stream position of a thread's latest reply), optionally only threads `user` took part in.
pub async fn thread_roots(
    db: impl PgExecutor<'_>,
    room_nid: i64,
    participant: Option<&str>,
    before: i64,
    visible: (i64, i64),
    limit: i64,
) -> sqlx::Result<Vec<(EventRow, i64)>> {
    #[derive(sqlx::FromRow)]
    struct Row {
        latest: i64,
        #[sqlx(flatten)]
        event: EventRow,
    }
    let rows: Vec<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "WITH threads AS (
             SELECT relates_to, max(stream_ordering) AS latest FROM events
             WHERE room_nid = $1 AND rel_type = 'm.thread' AND redacted_by IS NULL
             GROUP BY relates_to
         )
         SELECT t.latest, {COLUMNS} FROM threads t JOIN events e ON e.event_id = t.relates_to
         WHERE e.room_nid = $1 AND t.latest < $3 AND e.stream_ordering BETWEEN $4 AND $5
           AND ($2::text IS NULL OR e.sender = $2 OR EXISTS (
                SELECT 1 FROM events r WHERE r.room_nid = $1 AND r.relates_to = e.event_id
                  AND r.rel_type = 'm.thread' AND r.sender = $2))
         ORDER BY t.latest DESC LIMIT $6"
    )))
    .bind(room_nid)
    .bind(participant)
    .bind(before)
    .bind(visible.0)
    .bind(visible.1)
    .bind(limit)
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(|r| (r.event, r.latest)).collect())
}

/// The first `limit` events at or after (`forward`) / at or before `ts`, closest first.
pub async fn closest_to_ts(
    db: impl PgExecutor<'_>,
    room_nid: i64,
    ts: i64,
    forward: bool,
    limit: i64,
) -> sqlx::Result<Vec<EventRow>> {
    let (cmp, order) = if forward { (">=", "ASC") } else { ("<=", "DESC") };
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM events WHERE room_nid = $1 AND origin_server_ts {cmp} $2
           AND stream_ordering IS NOT NULL
         ORDER BY origin_server_ts {order}, stream_ordering {order} LIMIT $3"
    )))
    .bind(room_nid)
    .bind(ts)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// The newest `limit` events of a room with stream positions in `(after, upto]`, newest first.
pub async fn latest_in_range(
    db: impl PgExecutor<'_>,
    room_nid: i64,
    after: i64,
    upto: i64,
    limit: i64,
) -> sqlx::Result<Vec<EventRow>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM events WHERE room_nid = $1 AND stream_ordering > $2 AND stream_ordering <= $3
         ORDER BY stream_ordering DESC LIMIT $4"
    )))
    .bind(room_nid)
    .bind(after)
    .bind(upto)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// The latest state event per `(type, state_key)` among a room's events with stream positions in
/// `(after, before)`: the state changes a gappy sync timeline skipped.
pub async fn state_changes_between(
    db: impl PgExecutor<'_>,
    room_nid: i64,
    after: i64,
    before: i64,
) -> sqlx::Result<Vec<EventRow>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT * FROM (
             SELECT DISTINCT ON (event_type, state_key) {COLUMNS} FROM events
             WHERE room_nid = $1 AND stream_ordering > $2 AND stream_ordering < $3 AND state_key IS NOT NULL
             ORDER BY event_type, state_key, stream_ordering DESC
         ) s ORDER BY stream_ordering"
    )))
    .bind(room_nid)
    .bind(after)
    .bind(before)
    .fetch_all(db)
    .await
}
