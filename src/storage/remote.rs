//! Storage of rooms shared with other servers (issue 13): outliers, auth chains, the state
//! resolution inputs, the federation outbox and inbound transaction IDs.

use std::collections::HashMap;

use serde_json::Value;
use sqlx::{PgConnection, PgExecutor};

use super::events::NewEventRow;
use super::now_ms;

/// Inserts an outlier (an event without a stream position: see migration 0030) with its auth
/// edges, unless an event with this ID exists. Returns its nid either way.
pub async fn insert_outlier(conn: &mut PgConnection, e: &NewEventRow<'_>, auth: &[i64]) -> sqlx::Result<i64> {
    let inserted: Option<i64> = sqlx::query_scalar(
        "WITH ev AS (
             INSERT INTO events (event_id, room_nid, stream_ordering, depth, event_type, state_key, sender,
                                 origin_server_ts, json, redacts)
             VALUES ($1, $2, NULL, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (event_id) DO NOTHING
             RETURNING event_nid),
         auth AS (
             INSERT INTO event_auth (event_nid, auth_event_nid)
             SELECT ev.event_nid, a FROM ev, UNNEST($10::bigint[]) a)
         SELECT event_nid FROM ev",
    )
    .bind(e.event_id)
    .bind(e.room_nid)
    .bind(e.depth)
    .bind(e.event_type)
    .bind(e.state_key)
    .bind(e.sender)
    .bind(e.origin_server_ts)
    .bind(e.json)
    .bind(e.redacts)
    .bind(auth)
    .fetch_optional(&mut *conn)
    .await?;
    match inserted {
        Some(nid) => Ok(nid),
        None => {
            sqlx::query_scalar("SELECT event_nid FROM events WHERE event_id = $1")
                .bind(e.event_id)
                .fetch_one(conn)
                .await
        }
    }
}

/// What the engine needs of a known event to build on it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Known {
    pub event_nid: i64,
    pub event_id: String,
    pub room_nid: i64,
    pub depth: i64,
    /// `None` for an outlier.
    pub stream_ordering: Option<i64>,
    pub state_after: Option<i64>,
}

/// The events of `ids` this server has, by ID.
pub async fn known(db: impl PgExecutor<'_>, ids: &[String]) -> sqlx::Result<HashMap<String, Known>> {
    let rows: Vec<Known> = sqlx::query_as(
        "SELECT event_nid, event_id, room_nid, depth, stream_ordering, state_after FROM events WHERE event_id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(|k| (k.event_id.clone(), k)).collect())
}

/// The full auth chain of `nids`: every event reachable through `auth_events`, the events
/// themselves excluded (unless one is in another's chain).
pub async fn auth_chain(db: impl PgExecutor<'_>, nids: &[i64]) -> sqlx::Result<Vec<i64>> {
    sqlx::query_scalar(
        "WITH RECURSIVE chain(nid) AS (
             SELECT auth_event_nid FROM event_auth WHERE event_nid = ANY($1)
             UNION
             SELECT a.auth_event_nid FROM event_auth a JOIN chain c ON a.event_nid = c.nid)
         SELECT nid FROM chain",
    )
    .bind(nids)
    .fetch_all(db)
    .await
}

/// `(type, state_key)` of interned keys.
pub async fn keys(db: impl PgExecutor<'_>, key_nids: &[i64]) -> sqlx::Result<Vec<(i64, String, String)>> {
    sqlx::query_as("SELECT key_nid, event_type, state_key FROM state_keys WHERE key_nid = ANY($1)")
        .bind(key_nids)
        .fetch_all(db)
        .await
}

/// Event IDs of event nids.
pub async fn event_ids(db: impl PgExecutor<'_>, nids: &[i64]) -> sqlx::Result<Vec<(i64, String)>> {
    sqlx::query_as("SELECT event_nid, event_id FROM events WHERE event_nid = ANY($1)").bind(nids).fetch_all(db).await
}

/// Removes current state entries (a key that state resolution left out).
pub async fn remove_current(conn: &mut PgConnection, room_nid: i64, key_nids: &[i64]) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM current_state WHERE room_nid = $1 AND key_nid = ANY($2)")
        .bind(room_nid)
        .bind(key_nids)
        .execute(conn)
        .await?;
    Ok(())
}

/// Sets current state entries `(key_nid, event_nid)` in one statement.
pub async fn set_current_many(conn: &mut PgConnection, room_nid: i64, entries: &[(i64, i64)]) -> sqlx::Result<()> {
    let (keys, events): (Vec<i64>, Vec<i64>) = entries.iter().copied().unzip();
    sqlx::query(
        "INSERT INTO current_state (room_nid, key_nid, event_nid)
         SELECT $1, k, e FROM UNNEST($2::bigint[], $3::bigint[]) AS t(k, e)
         ON CONFLICT (room_nid, key_nid) DO UPDATE SET event_nid = EXCLUDED.event_nid",
    )
    .bind(room_nid)
    .bind(&keys)
    .bind(&events)
    .execute(conn)
    .await?;
    Ok(())
}

/// The servers (other than `own`) with a joined member in a room.
pub async fn joined_servers(db: impl PgExecutor<'_>, room_nid: i64, own: &str) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT DISTINCT substring(user_id from position(':' in user_id) + 1) AS server
         FROM room_memberships WHERE room_nid = $1 AND membership = 'join'
         EXCEPT SELECT $2 ORDER BY 1",
    )
    .bind(room_nid)
    .bind(own)
    .fetch_all(db)
    .await
}

/// Whether a server has (or had) a member of any membership in a room.
pub async fn server_has_member(db: impl PgExecutor<'_>, room_nid: i64, server: &str) -> sqlx::Result<bool> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM room_memberships WHERE room_nid = $1
                        AND substring(user_id from position(':' in user_id) + 1) = $2)",
    )
    .bind(room_nid)
    .bind(server)
    .fetch_one(db)
    .await
}

/// Queues an event for `destinations`.
pub async fn enqueue(conn: &mut PgConnection, destinations: &[String], event_nid: i64) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO federation_outbox (destination, event_nid, created_ts) SELECT d, $2, $3 FROM UNNEST($1::text[]) d",
    )
    .bind(destinations)
    .bind(event_nid)
    .bind(now_ms())
    .execute(conn)
    .await?;
    Ok(())
}

/// Queues an EDU for `destinations`.
pub async fn enqueue_edu(db: impl PgExecutor<'_>, destinations: &[String], edu: &Value) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO federation_outbox (destination, edu, created_ts) SELECT d, $2, $3 FROM UNNEST($1::text[]) d",
    )
    .bind(destinations)
    .bind(edu)
    .bind(now_ms())
    .execute(db)
    .await?;
    Ok(())
}

/// One queued item: its sequence number and the event's canonical JSON or the EDU.
#[derive(Debug, sqlx::FromRow)]
pub struct Queued {
    pub seq: i64,
    pub json: Option<String>,
    pub edu: Option<Value>,
}

/// The oldest items queued for a destination: at most `pdus` events and `edus` EDUs, in order
/// (the batch stops before the first item past either limit).
pub async fn queued(db: impl PgExecutor<'_>, destination: &str, limit: i64) -> sqlx::Result<Vec<Queued>> {
    sqlx::query_as(
        "SELECT o.seq, e.json, o.edu FROM federation_outbox o LEFT JOIN events e ON e.event_nid = o.event_nid
         WHERE o.destination = $1 ORDER BY o.seq LIMIT $2",
    )
    .bind(destination)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// Drops what a destination acknowledged (every item up to `upto`) and records the success.
pub async fn acknowledged(db: &sqlx::PgPool, destination: &str, upto: i64) -> sqlx::Result<()> {
    let mut tx = db.begin().await?;
    sqlx::query("DELETE FROM federation_outbox WHERE destination = $1 AND seq <= $2")
        .bind(destination)
        .bind(upto)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO federation_destinations (destination, failures, retry_after_ts, last_success_ts)
         VALUES ($1, 0, 0, $2)
         ON CONFLICT (destination) DO UPDATE SET failures = 0, retry_after_ts = 0, last_success_ts = $2",
    )
    .bind(destination)
    .bind(now_ms())
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

/// Records a failed attempt; returns the number of consecutive failures.
pub async fn failed(db: impl PgExecutor<'_>, destination: &str, retry_after_ts: i64) -> sqlx::Result<i32> {
    sqlx::query_scalar(
        "INSERT INTO federation_destinations (destination, failures, retry_after_ts) VALUES ($1, 1, $2)
         ON CONFLICT (destination) DO UPDATE
           SET failures = federation_destinations.failures + 1, retry_after_ts = $2
         RETURNING failures",
    )
    .bind(destination)
    .bind(retry_after_ts)
    .fetch_one(db)
    .await
}

/// A destination's consecutive failures and when to try again.
pub async fn backoff(db: impl PgExecutor<'_>, destination: &str) -> sqlx::Result<Option<(i32, i64)>> {
    sqlx::query_as("SELECT failures, retry_after_ts FROM federation_destinations WHERE destination = $1")
        .bind(destination)
        .fetch_optional(db)
        .await
}

/// Drops everything queued for a destination.
pub async fn drop_destination(db: impl PgExecutor<'_>, destination: &str) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM federation_outbox WHERE destination = $1").bind(destination).execute(db).await?;
    Ok(())
}

/// Ends a destination's back-off.
pub async fn reset_backoff(db: impl PgExecutor<'_>, destination: &str) -> sqlx::Result<()> {
    sqlx::query("UPDATE federation_destinations SET failures = 0, retry_after_ts = 0 WHERE destination = $1")
        .bind(destination)
        .execute(db)
        .await?;
    Ok(())
}

/// The destinations with something queued.
pub async fn pending_destinations(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar("SELECT DISTINCT destination FROM federation_outbox").fetch_all(db).await
}

/// The answer already given to an inbound transaction, if any.
pub async fn inbound_txn(db: impl PgExecutor<'_>, origin: &str, txn_id: &str) -> sqlx::Result<Option<Value>> {
    sqlx::query_scalar("SELECT response FROM federation_inbound_txns WHERE origin = $1 AND txn_id = $2")
        .bind(origin)
        .bind(txn_id)
        .fetch_optional(db)
        .await
}

/// Records the answer to an inbound transaction.
pub async fn record_inbound_txn(
    db: impl PgExecutor<'_>,
    origin: &str,
    txn_id: &str,
    response: &Value,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO federation_inbound_txns (origin, txn_id, response, created_ts) VALUES ($1, $2, $3, $4)
         ON CONFLICT DO NOTHING",
    )
    .bind(origin)
    .bind(txn_id)
    .bind(response)
    .bind(now_ms())
    .execute(db)
    .await?;
    Ok(())
}

/// Events of a room in reverse topological order starting at `from` (included), following
/// `prev_events`, at most `limit`: what `/backfill` serves.
pub async fn backfill(
    db: impl PgExecutor<'_>,
    room_nid: i64,
    from: &[String],
    limit: i64,
) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "WITH RECURSIVE walk(event_id, depth, n) AS (
             SELECT e.event_id, e.depth, 0 FROM events e WHERE e.event_id = ANY($2) AND e.room_nid = $1
             UNION
             SELECT p.event_id, p.depth, w.n + 1 FROM walk w
             JOIN events c ON c.event_id = w.event_id
             JOIN event_edges g ON g.event_nid = c.event_nid
             JOIN events p ON p.event_id = g.prev_event_id AND p.room_nid = $1
             WHERE w.n < $3)
         SELECT e.json FROM (SELECT DISTINCT event_id, depth FROM walk) w JOIN events e ON e.event_id = w.event_id
         ORDER BY w.depth DESC LIMIT $3",
    )
    .bind(room_nid)
    .bind(from)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// The JSON of events by ID (in a room).
pub async fn json_of(db: impl PgExecutor<'_>, room_nid: i64, ids: &[String]) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar("SELECT json FROM events WHERE room_nid = $1 AND event_id = ANY($2)")
        .bind(room_nid)
        .bind(ids)
        .fetch_all(db)
        .await
}

/// The JSON of events by nid, in the order of their depth.
pub async fn json_of_nids(db: impl PgExecutor<'_>, nids: &[i64]) -> sqlx::Result<Vec<(String, String)>> {
    sqlx::query_as("SELECT event_id, json FROM events WHERE event_nid = ANY($1) ORDER BY depth, event_nid")
        .bind(nids)
        .fetch_all(db)
        .await
}

/// `get_missing_events`: events of a room reachable backwards from `latest` through
/// `prev_events`, not reaching into `earliest`, with depth at least `min_depth`, at most
/// `limit`, oldest first.
pub async fn missing_events(
    db: impl PgExecutor<'_>,
    room_nid: i64,
    earliest: &[String],
    latest: &[String],
    min_depth: i64,
    limit: i64,
) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "WITH RECURSIVE walk(event_id, n) AS (
             SELECT g.prev_event_id, 1 FROM events c JOIN event_edges g ON g.event_nid = c.event_nid
             WHERE c.event_id = ANY($2) AND c.room_nid = $1
             UNION
             SELECT g.prev_event_id, w.n + 1 FROM walk w
             JOIN events c ON c.event_id = w.event_id AND c.room_nid = $1
             JOIN event_edges g ON g.event_nid = c.event_nid
             WHERE w.n < $5 AND NOT (w.event_id = ANY($3)))
         SELECT e.json FROM (SELECT DISTINCT event_id FROM walk WHERE NOT (event_id = ANY($3))) w
         JOIN events e ON e.event_id = w.event_id AND e.room_nid = $1 AND e.depth >= $4
         ORDER BY e.depth ASC LIMIT $5",
    )
    .bind(room_nid)
    .bind(latest)
    .bind(earliest)
    .bind(min_depth)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// The interned keys of `(type, state_key)` pairs that have one.
pub async fn key_nids(db: impl PgExecutor<'_>, names: &[(String, String)]) -> sqlx::Result<Vec<(i64, String, String)>> {
    let (types, keys): (Vec<&str>, Vec<&str>) = names.iter().map(|(t, k)| (t.as_str(), k.as_str())).unzip();
    sqlx::query_as(
        "SELECT key_nid, event_type, state_key FROM state_keys
         WHERE (event_type, state_key) IN (SELECT * FROM UNNEST($1::text[], $2::text[]))",
    )
    .bind(&types)
    .bind(&keys)
    .fetch_all(db)
    .await
}

/// Records the state after an event (a state event's own group).
pub async fn set_state_after(conn: &mut PgConnection, event_nid: i64, group: i64) -> sqlx::Result<()> {
    sqlx::query("UPDATE events SET state_after = $2 WHERE event_nid = $1")
        .bind(event_nid)
        .bind(group)
        .execute(conn)
        .await?;
    Ok(())
}

/// Creates a room known through federation, with an empty extremities row; returns its nid
/// (the existing one if the room is known).
pub async fn ensure_room(conn: &mut PgConnection, room_id: &str, version: &str, creator: &str) -> sqlx::Result<i64> {
    let nid: i64 = sqlx::query_scalar(
        "WITH r AS (
             INSERT INTO rooms (room_id, room_version, creator, created_ts) VALUES ($1, $2, $3, $4)
             ON CONFLICT (room_id) DO NOTHING RETURNING room_nid)
         SELECT room_nid FROM r UNION ALL SELECT room_nid FROM rooms WHERE room_id = $1",
    )
    .bind(room_id)
    .bind(version)
    .bind(creator)
    .bind(now_ms())
    .fetch_one(&mut *conn)
    .await?;
    sqlx::query("INSERT INTO room_extremities (room_nid, event_nids) VALUES ($1, '{}') ON CONFLICT DO NOTHING")
        .bind(nid)
        .execute(conn)
        .await?;
    Ok(nid)
}

/// Sets a room's forward extremities.
pub async fn set_extremities(conn: &mut PgConnection, room_nid: i64, nids: &[i64]) -> sqlx::Result<()> {
    sqlx::query("UPDATE room_extremities SET event_nids = $2 WHERE room_nid = $1")
        .bind(room_nid)
        .bind(nids)
        .execute(conn)
        .await?;
    Ok(())
}

/// Interns many `(type, state_key)` pairs in one statement; returns their keys in order.
pub async fn intern_keys(conn: &mut PgConnection, names: &[(String, String)]) -> sqlx::Result<Vec<i64>> {
    let (types, keys): (Vec<&str>, Vec<&str>) = names.iter().map(|(t, k)| (t.as_str(), k.as_str())).unzip();
    sqlx::query_scalar(
        "WITH input AS (
             SELECT * FROM UNNEST($1::text[], $2::text[]) WITH ORDINALITY AS t(event_type, state_key, ord)),
         ins AS (
             INSERT INTO state_keys (event_type, state_key) SELECT DISTINCT event_type, state_key FROM input
             ON CONFLICT DO NOTHING RETURNING key_nid, event_type, state_key)
         SELECT COALESCE(ins.key_nid, sk.key_nid) FROM input i
         LEFT JOIN ins ON ins.event_type = i.event_type AND ins.state_key = i.state_key
         LEFT JOIN state_keys sk ON sk.event_type = i.event_type AND sk.state_key = i.state_key
         ORDER BY i.ord",
    )
    .bind(&types)
    .bind(&keys)
    .fetch_all(conn)
    .await
}

/// Sets many memberships of a room in one statement: `(user, membership, event_nid, stream)`.
pub async fn set_memberships(
    conn: &mut PgConnection,
    room_nid: i64,
    rows: &[(String, String, i64, i64)],
) -> sqlx::Result<()> {
    let users: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    let memberships: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
    let events: Vec<i64> = rows.iter().map(|r| r.2).collect();
    let streams: Vec<i64> = rows.iter().map(|r| r.3).collect();
    sqlx::query(
        "INSERT INTO room_memberships (room_nid, user_id, membership, event_nid, stream_ordering)
         SELECT $1, u, m, e, s FROM UNNEST($2::text[], $3::text[], $4::bigint[], $5::bigint[]) AS t(u, m, e, s)
         ON CONFLICT (room_nid, user_id) DO UPDATE
           SET membership = EXCLUDED.membership, event_nid = EXCLUDED.event_nid,
               stream_ordering = EXCLUDED.stream_ordering, forgotten = FALSE",
    )
    .bind(room_nid)
    .bind(&users)
    .bind(&memberships)
    .bind(&events)
    .bind(&streams)
    .execute(conn)
    .await?;
    Ok(())
}

/// Records a local user's invite to (or knock on) a room this server is not in, with the
/// stripped state the other server sent.
pub async fn set_invite(
    conn: &mut PgConnection,
    room_nid: i64,
    user_id: &str,
    membership: &str,
    event_nid: i64,
    stream: i64,
    stripped: &Value,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO room_memberships (room_nid, user_id, membership, event_nid, stream_ordering, invite_room_state)
         VALUES ($1, $2, $6, $3, $4, $5)
         ON CONFLICT (room_nid, user_id) DO UPDATE
           SET membership = $6, event_nid = $3, stream_ordering = $4, forgotten = FALSE, invite_room_state = $5",
    )
    .bind(room_nid)
    .bind(user_id)
    .bind(event_nid)
    .bind(stream)
    .bind(stripped)
    .bind(membership)
    .execute(conn)
    .await?;
    Ok(())
}

/// The stripped state another server sent with a local user's invite (or knock answer).
pub async fn invite_room_state(db: impl PgExecutor<'_>, room_nid: i64, user_id: &str) -> sqlx::Result<Option<Value>> {
    Ok(sqlx::query_scalar::<_, Option<Value>>(
        "SELECT invite_room_state FROM room_memberships
         WHERE room_nid = $1 AND user_id = $2 AND membership IN ('invite', 'knock')",
    )
    .bind(room_nid)
    .bind(user_id)
    .fetch_optional(db)
    .await?
    .flatten())
}

/// Whether a local user (of `own`) shares a joined room with `user`.
pub async fn shares_room_with_local(db: impl PgExecutor<'_>, user: &str, own: &str) -> sqlx::Result<bool> {
    sqlx::query_scalar(
        "SELECT EXISTS (
             SELECT 1 FROM room_memberships a JOIN room_memberships b ON b.room_nid = a.room_nid
             WHERE a.user_id = $1 AND a.membership = 'join' AND b.membership = 'join'
               AND substring(b.user_id from position(':' in b.user_id) + 1) = $2)",
    )
    .bind(user)
    .bind(own)
    .fetch_one(db)
    .await
}

/// The other servers with a joined member in a room `user` is joined to.
pub async fn servers_sharing_rooms(db: impl PgExecutor<'_>, user: &str, own: &str) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT DISTINCT substring(b.user_id from position(':' in b.user_id) + 1)
         FROM room_memberships a JOIN room_memberships b ON b.room_nid = a.room_nid
         WHERE a.user_id = $1 AND a.membership = 'join' AND b.membership = 'join'
         EXCEPT SELECT $2",
    )
    .bind(user)
    .bind(own)
    .fetch_all(db)
    .await
}

/// Inserts an event of a room's history fetched from another server, at the next backfill
/// position (negative: before every stream position), with its edges and search row. Does not
/// touch the room's extremities. Returns `(event_nid, stream_ordering)`, `None` if the event
/// exists.
pub async fn insert_backfilled(
    conn: &mut PgConnection,
    e: &NewEventRow<'_>,
    prev: &[String],
    auth: &[i64],
) -> sqlx::Result<Option<(i64, i64)>> {
    // Numbered as `events::bind_row` binds an event row ($1-$18).
    let q = sqlx::query_as(
        "WITH ev AS (
             INSERT INTO events (event_id, room_nid, stream_ordering, depth, event_type, state_key, sender,
                                 origin_server_ts, json, state_before, state_after, redacts, rel_type, relates_to,
                                 txn_device, txn_id)
             VALUES ($1, $2, -nextval('event_backfill_seq'), $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
             ON CONFLICT (event_id) DO NOTHING
             RETURNING event_nid, stream_ordering),
         search AS (
             INSERT INTO event_search (event_nid, room_nid, stream_ordering, key, sender, event_type, vector)
             SELECT ev.event_nid, $2, ev.stream_ordering, $16, $6, $4, to_tsvector($18::regconfig, $17)
             FROM ev WHERE $16::text IS NOT NULL),
         prev AS (
             INSERT INTO event_edges (event_nid, prev_event_id) SELECT ev.event_nid, p FROM ev, UNNEST($19::text[]) p),
         auth AS (
             INSERT INTO event_auth (event_nid, auth_event_nid) SELECT ev.event_nid, a FROM ev, UNNEST($20::bigint[]) a)
         SELECT event_nid, stream_ordering FROM ev",
    );
    super::events::bind_row(q, e).bind(prev).bind(auth).fetch_optional(conn).await
}

/// The earliest event of a room's timeline (stream position set), by depth: `(ID, type)`.
pub async fn earliest_event(db: impl PgExecutor<'_>, room_nid: i64) -> sqlx::Result<Option<(String, String)>> {
    sqlx::query_as(
        "SELECT event_id, event_type FROM events WHERE room_nid = $1 AND stream_ordering IS NOT NULL
         ORDER BY depth, stream_ordering LIMIT 1",
    )
    .bind(room_nid)
    .fetch_optional(db)
    .await
}

/// Gives an outlier a backfill position (it turned out to be part of the history a client pages
/// through), with its state and `prev_events` edges. `None` if it was not an outlier.
pub async fn promote_outlier(
    conn: &mut PgConnection,
    event_nid: i64,
    state_before: i64,
    state_after: i64,
    prev: &[String],
) -> sqlx::Result<Option<i64>> {
    sqlx::query_scalar(
        "WITH ev AS (
             UPDATE events SET stream_ordering = -nextval('event_backfill_seq'), state_before = $2, state_after = $3
             WHERE event_nid = $1 AND stream_ordering IS NULL RETURNING event_nid, stream_ordering),
         prev AS (
             INSERT INTO event_edges (event_nid, prev_event_id) SELECT ev.event_nid, p FROM ev, UNNEST($4::text[]) p
             ON CONFLICT DO NOTHING)
         SELECT stream_ordering FROM ev",
    )
    .bind(event_nid)
    .bind(state_before)
    .bind(state_after)
    .bind(prev)
    .fetch_optional(conn)
    .await
}
