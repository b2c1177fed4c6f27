//! State storage: interned `(type, state_key)` pairs, delta-compressed state groups, and the
//! materialised current state of each room.

use std::collections::HashMap;

use sqlx::{PgConnection, PgExecutor};

/// Longest chain of deltas before a group stores its full state again.
const MAX_CHAIN_DEPTH: i32 = 64;

/// Interns `(event_type, state_key)` and returns its numeric key.
pub async fn intern_key(conn: &mut PgConnection, event_type: &str, state_key: &str) -> sqlx::Result<i64> {
    if let Some(nid) = sqlx::query_scalar("SELECT key_nid FROM state_keys WHERE event_type = $1 AND state_key = $2")
        .bind(event_type)
        .bind(state_key)
        .fetch_optional(&mut *conn)
        .await?
    {
        return Ok(nid);
    }
    sqlx::query_scalar(
        "INSERT INTO state_keys (event_type, state_key) VALUES ($1, $2)
         ON CONFLICT (event_type, state_key) DO UPDATE SET event_type = EXCLUDED.event_type
         RETURNING key_nid",
    )
    .bind(event_type)
    .bind(state_key)
    .fetch_one(conn)
    .await
}

/// The full state of a group as `key_nid → event_nid`.
pub async fn load_group(db: impl PgExecutor<'_>, group: i64) -> sqlx::Result<HashMap<i64, i64>> {
    let rows: Vec<(i64, i64)> = sqlx::query_as(
        "WITH RECURSIVE chain(group_nid, prev_group, level) AS (
             SELECT group_nid, prev_group, 0 FROM state_groups WHERE group_nid = $1
             UNION ALL
             SELECT g.group_nid, g.prev_group, c.level + 1
             FROM state_groups g JOIN chain c ON g.group_nid = c.prev_group
         )
         SELECT DISTINCT ON (e.key_nid) e.key_nid, e.event_nid
         FROM state_group_entries e JOIN chain c ON e.group_nid = c.group_nid
         ORDER BY e.key_nid, c.level",
    )
    .bind(group)
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().collect())
}

/// For each of `groups`: the `history_visibility` and `user`'s `membership` in that state (`None`
/// when unset), in one query over the groups' delta chains.
pub async fn visibility_facts(
    db: impl PgExecutor<'_>,
    groups: &[i64],
    user: &str,
) -> sqlx::Result<HashMap<i64, (Option<String>, Option<String>)>> {
    let rows: Vec<(i64, String, Option<String>)> = sqlx::query_as(
        "WITH RECURSIVE keys AS (
             SELECT key_nid, event_type FROM state_keys
             WHERE (event_type = 'm.room.history_visibility' AND state_key = '')
                OR (event_type = 'm.room.member' AND state_key = $2)
         ), chain(start, group_nid, prev_group, level) AS (
             SELECT group_nid, group_nid, prev_group, 0 FROM state_groups WHERE group_nid = ANY($1)
             UNION ALL
             SELECT c.start, g.group_nid, g.prev_group, c.level + 1
             FROM state_groups g JOIN chain c ON g.group_nid = c.prev_group
         ), found AS (
             SELECT DISTINCT ON (c.start, k.key_nid) c.start, k.event_type, e.event_nid
             FROM chain c CROSS JOIN keys k
             JOIN state_group_entries e ON e.group_nid = c.group_nid AND e.key_nid = k.key_nid
             ORDER BY c.start, k.key_nid, c.level
         )
         SELECT f.start, f.event_type,
                CASE WHEN f.event_type = 'm.room.member' THEN ev.json::jsonb -> 'content' ->> 'membership'
                     ELSE ev.json::jsonb -> 'content' ->> 'history_visibility' END
         FROM found f JOIN events ev ON ev.event_nid = f.event_nid",
    )
    .bind(groups)
    .bind(user)
    .fetch_all(db)
    .await?;
    let mut out: HashMap<i64, (Option<String>, Option<String>)> = HashMap::new();
    for (group, kind, value) in rows {
        let e = out.entry(group).or_default();
        if kind == "m.room.member" {
            e.1 = value;
        } else {
            e.0 = value;
        }
    }
    Ok(out)
}

/// Creates a group equal to `prev` plus `delta`. Returns the new group.
pub async fn create_group(
    conn: &mut PgConnection,
    room_nid: i64,
    prev: Option<i64>,
    delta: &[(i64, i64)],
) -> sqlx::Result<i64> {
    let prev_depth: Option<i32> = match prev {
        Some(p) => {
            sqlx::query_scalar("SELECT chain_depth FROM state_groups WHERE group_nid = $1")
                .bind(p)
                .fetch_optional(&mut *conn)
                .await?
        }
        None => None,
    };
    let (parent, depth, entries): (Option<i64>, i32, Vec<(i64, i64)>) = match (prev, prev_depth) {
        (Some(p), Some(d)) if d < MAX_CHAIN_DEPTH => (Some(p), d + 1, delta.to_vec()),
        (Some(p), Some(_)) => {
            // Cut the chain: store the full state.
            let mut full = load_group(&mut *conn, p).await?;
            full.extend(delta.iter().copied());
            (None, 0, full.into_iter().collect())
        }
        _ => (None, 0, delta.to_vec()),
    };
    let group: i64 = sqlx::query_scalar(
        "INSERT INTO state_groups (room_nid, prev_group, chain_depth) VALUES ($1, $2, $3) RETURNING group_nid",
    )
    .bind(room_nid)
    .bind(parent)
    .bind(depth)
    .fetch_one(&mut *conn)
    .await?;
    let (keys, events): (Vec<i64>, Vec<i64>) = entries.into_iter().unzip();
    sqlx::query(
        "INSERT INTO state_group_entries (group_nid, key_nid, event_nid)
         SELECT $1, k, e FROM UNNEST($2::bigint[], $3::bigint[]) AS t(k, e)",
    )
    .bind(group)
    .bind(&keys)
    .bind(&events)
    .execute(conn)
    .await?;
    Ok(group)
}

pub async fn set_current(conn: &mut PgConnection, room_nid: i64, key_nid: i64, event_nid: i64) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO current_state (room_nid, key_nid, event_nid) VALUES ($1, $2, $3)
         ON CONFLICT (room_nid, key_nid) DO UPDATE SET event_nid = EXCLUDED.event_nid",
    )
    .bind(room_nid)
    .bind(key_nid)
    .bind(event_nid)
    .execute(conn)
    .await?;
    Ok(())
}
