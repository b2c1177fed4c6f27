//! Encryption keys (device, one-time, fallback, cross-signing), signatures, the device-list
//! stream and to-device messages.

use std::collections::HashMap;

use serde_json::Value;
use sqlx::{PgConnection, PgExecutor};

use super::now_ms;

/// Advisory locks serialising the writers of each stream, so its highest committed position is a
/// safe sync watermark.
const DEVICE_LIST_LOCK: i64 = 0x5061_7277_0000_0010;
const TO_DEVICE_LOCK: i64 = 0x5061_7277_0000_0011;

// ---- device keys ----

pub async fn device_keys(db: impl PgExecutor<'_>, user_id: &str, device_id: &str) -> sqlx::Result<Option<Value>> {
    sqlx::query_scalar("SELECT keys FROM device_keys WHERE user_id = $1 AND device_id = $2")
        .bind(user_id)
        .bind(device_id)
        .fetch_optional(db)
        .await
}

pub async fn set_device_keys(
    conn: &mut PgConnection,
    user_id: &str,
    device_id: &str,
    keys: &Value,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO device_keys (user_id, device_id, keys) VALUES ($1, $2, $3)
         ON CONFLICT (user_id, device_id) DO UPDATE SET keys = EXCLUDED.keys",
    )
    .bind(user_id)
    .bind(device_id)
    .bind(keys)
    .execute(conn)
    .await?;
    Ok(())
}

/// A device with its keys (if uploaded) and display name.
#[derive(Debug, sqlx::FromRow)]
pub struct DeviceWithKeys {
    pub user_id: String,
    pub device_id: String,
    pub display_name: Option<String>,
    pub keys: Value,
}

/// The keys of every device of `users` that uploaded keys (one query).
pub async fn query_device_keys(db: impl PgExecutor<'_>, users: &[String]) -> sqlx::Result<Vec<DeviceWithKeys>> {
    sqlx::query_as(
        "SELECT k.user_id, k.device_id, d.display_name, k.keys FROM device_keys k
         JOIN devices d ON d.user_id = k.user_id AND d.device_id = k.device_id
         WHERE k.user_id = ANY($1)",
    )
    .bind(users)
    .fetch_all(db)
    .await
}

/// SQL for the JSONB `column` with `signatures.$3.$4 = $5` set, creating `signatures` and the
/// signer's object when missing (`jsonb_set` would silently do nothing then). `column` is
/// always a constant of this module.
fn with_signature(column: &str) -> String {
    format!(
        "{column} || jsonb_build_object('signatures',
             CASE WHEN jsonb_typeof({column} -> 'signatures') = 'object' THEN {column} -> 'signatures' ELSE '{{}}'::jsonb END
             || jsonb_build_object($3::text,
                  CASE WHEN jsonb_typeof({column} -> 'signatures' -> $3) = 'object'
                       THEN {column} -> 'signatures' -> $3 ELSE '{{}}'::jsonb END
                  || jsonb_build_object($4::text, $5::text)))"
    )
}

/// Adds a signature to a device's keys (`signatures.<signer>.<key_id>`).
pub async fn sign_device_keys(
    conn: &mut PgConnection,
    user_id: &str,
    device_id: &str,
    signer: &str,
    key_id: &str,
    signature: &str,
) -> sqlx::Result<()> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE device_keys SET keys = {} WHERE user_id = $1 AND device_id = $2",
        with_signature("keys")
    )))
    .bind(user_id)
    .bind(device_id)
    .bind(signer)
    .bind(key_id)
    .bind(signature)
    .execute(conn)
    .await?;
    Ok(())
}

// ---- one-time and fallback keys ----

/// One-time keys already stored among `key_ids` of a device: key_id → key.
pub async fn existing_one_time_keys(
    db: impl PgExecutor<'_>,
    user_id: &str,
    device_id: &str,
    key_ids: &[String],
) -> sqlx::Result<HashMap<String, Value>> {
    let rows: Vec<(String, String, Value)> = sqlx::query_as(
        "SELECT algorithm, key_id, key_json FROM one_time_keys
         WHERE user_id = $1 AND device_id = $2 AND algorithm || ':' || key_id = ANY($3)",
    )
    .bind(user_id)
    .bind(device_id)
    .bind(key_ids)
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(|(a, k, v)| (format!("{a}:{k}"), v)).collect())
}

/// Stores one-time keys `(algorithm, key_id, key)`; already stored ones are left as they are.
pub async fn insert_one_time_keys(
    conn: &mut PgConnection,
    user_id: &str,
    device_id: &str,
    keys: &[(String, String, Value)],
) -> sqlx::Result<()> {
    if keys.is_empty() {
        return Ok(());
    }
    let algs: Vec<&str> = keys.iter().map(|k| k.0.as_str()).collect();
    let ids: Vec<&str> = keys.iter().map(|k| k.1.as_str()).collect();
    let values: Vec<&Value> = keys.iter().map(|k| &k.2).collect();
    sqlx::query(
        "INSERT INTO one_time_keys (user_id, device_id, algorithm, key_id, key_json)
         SELECT $1, $2, a, k, v FROM UNNEST($3::text[], $4::text[], $5::jsonb[]) AS t(a, k, v)
         ON CONFLICT DO NOTHING",
    )
    .bind(user_id)
    .bind(device_id)
    .bind(algs)
    .bind(ids)
    .bind(values)
    .execute(conn)
    .await?;
    Ok(())
}

/// Unclaimed one-time keys of a device per algorithm.
pub async fn one_time_key_counts(
    db: impl PgExecutor<'_>,
    user_id: &str,
    device_id: &str,
) -> sqlx::Result<HashMap<String, i64>> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT algorithm, COUNT(*) FROM one_time_keys WHERE user_id = $1 AND device_id = $2 GROUP BY algorithm",
    )
    .bind(user_id)
    .bind(device_id)
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Stores a fallback key; a new key (different ID) is unused, re-uploading the same keeps its state.
pub async fn set_fallback_key(
    conn: &mut PgConnection,
    user_id: &str,
    device_id: &str,
    algorithm: &str,
    key_id: &str,
    key: &Value,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO fallback_keys (user_id, device_id, algorithm, key_id, key_json) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (user_id, device_id, algorithm) DO UPDATE
           SET key_id = EXCLUDED.key_id, key_json = EXCLUDED.key_json,
               used = fallback_keys.used AND fallback_keys.key_id = EXCLUDED.key_id",
    )
    .bind(user_id)
    .bind(device_id)
    .bind(algorithm)
    .bind(key_id)
    .bind(key)
    .execute(conn)
    .await?;
    Ok(())
}

/// Algorithms of a device's fallback keys not handed out yet.
pub async fn unused_fallback_types(
    db: impl PgExecutor<'_>,
    user_id: &str,
    device_id: &str,
) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT algorithm FROM fallback_keys WHERE user_id = $1 AND device_id = $2 AND NOT used ORDER BY algorithm",
    )
    .bind(user_id)
    .bind(device_id)
    .fetch_all(db)
    .await
}

/// A claimed key: (user, device, algorithm, key_id, key).
pub type Claimed = (String, String, String, String, Value);

/// Claims one one-time key per `(user, device, algorithm)` in one statement: each key goes to
/// exactly one claimer (rows are locked, concurrent claimers skip them), oldest upload first.
pub async fn claim_one_time_keys(
    conn: &mut PgConnection,
    wanted: &[(String, String, String)],
) -> sqlx::Result<Vec<Claimed>> {
    let users: Vec<&str> = wanted.iter().map(|w| w.0.as_str()).collect();
    let devices: Vec<&str> = wanted.iter().map(|w| w.1.as_str()).collect();
    let algs: Vec<&str> = wanted.iter().map(|w| w.2.as_str()).collect();
    sqlx::query_as(
        "DELETE FROM one_time_keys o USING (
             SELECT k.user_id, k.device_id, k.algorithm, k.key_id
             FROM UNNEST($1::text[], $2::text[], $3::text[]) AS r(u, d, a)
             CROSS JOIN LATERAL (
                 SELECT user_id, device_id, algorithm, key_id FROM one_time_keys
                 WHERE user_id = r.u AND device_id = r.d AND algorithm = r.a
                 ORDER BY upload_seq, key_id LIMIT 1 FOR UPDATE SKIP LOCKED
             ) k
         ) p
         WHERE o.user_id = p.user_id AND o.device_id = p.device_id AND o.algorithm = p.algorithm AND o.key_id = p.key_id
         RETURNING o.user_id, o.device_id, o.algorithm, o.key_id, o.key_json",
    )
    .bind(users)
    .bind(devices)
    .bind(algs)
    .fetch_all(conn)
    .await
}

/// Hands out the fallback keys of `(user, device, algorithm)` (marking them used).
pub async fn claim_fallback_keys(
    conn: &mut PgConnection,
    wanted: &[(String, String, String)],
) -> sqlx::Result<Vec<Claimed>> {
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let users: Vec<&str> = wanted.iter().map(|w| w.0.as_str()).collect();
    let devices: Vec<&str> = wanted.iter().map(|w| w.1.as_str()).collect();
    let algs: Vec<&str> = wanted.iter().map(|w| w.2.as_str()).collect();
    sqlx::query_as(
        "UPDATE fallback_keys f SET used = TRUE
         FROM UNNEST($1::text[], $2::text[], $3::text[]) AS r(u, d, a)
         WHERE f.user_id = r.u AND f.device_id = r.d AND f.algorithm = r.a
         RETURNING f.user_id, f.device_id, f.algorithm, f.key_id, f.key_json",
    )
    .bind(users)
    .bind(devices)
    .bind(algs)
    .fetch_all(conn)
    .await
}

// ---- cross-signing ----

/// Cross-signing keys of `users`: (user, key type, key).
pub async fn cross_signing_keys(
    db: impl PgExecutor<'_>,
    users: &[String],
) -> sqlx::Result<Vec<(String, String, Value)>> {
    sqlx::query_as("SELECT user_id, key_type, key_json FROM cross_signing_keys WHERE user_id = ANY($1)")
        .bind(users)
        .fetch_all(db)
        .await
}

pub async fn set_cross_signing_key(
    conn: &mut PgConnection,
    user_id: &str,
    key_type: &str,
    key: &Value,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO cross_signing_keys (user_id, key_type, key_json) VALUES ($1, $2, $3)
         ON CONFLICT (user_id, key_type) DO UPDATE SET key_json = EXCLUDED.key_json",
    )
    .bind(user_id)
    .bind(key_type)
    .bind(key)
    .execute(conn)
    .await?;
    Ok(())
}

/// Adds a signature to a user's cross-signing key, creating `signatures` and the signer's
/// object when missing (`jsonb_set` would silently do nothing then).
pub async fn sign_cross_signing_key(
    conn: &mut PgConnection,
    user_id: &str,
    key_type: &str,
    signer: &str,
    key_id: &str,
    signature: &str,
) -> sqlx::Result<()> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE cross_signing_keys SET key_json = {} WHERE user_id = $1 AND key_type = $2",
        with_signature("key_json")
    )))
    .bind(user_id)
    .bind(key_type)
    .bind(signer)
    .bind(key_id)
    .bind(signature)
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn insert_cross_user_signature(
    conn: &mut PgConnection,
    signer: &str,
    signer_key_id: &str,
    target_user: &str,
    target_key_id: &str,
    signature: &str,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO cross_user_signatures (signer_user_id, signer_key_id, target_user_id, target_key_id, signature)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (signer_user_id, target_user_id, target_key_id, signer_key_id) DO UPDATE SET signature = EXCLUDED.signature",
    )
    .bind(signer)
    .bind(signer_key_id)
    .bind(target_user)
    .bind(target_key_id)
    .bind(signature)
    .execute(conn)
    .await?;
    Ok(())
}

/// Signatures `signer` made on the keys of `targets`: (target user, target key ID, signer key ID, signature).
pub async fn cross_user_signatures_by(
    db: impl PgExecutor<'_>,
    signer: &str,
    targets: &[String],
) -> sqlx::Result<Vec<(String, String, String, String)>> {
    sqlx::query_as(
        "SELECT target_user_id, target_key_id, signer_key_id, signature FROM cross_user_signatures
         WHERE signer_user_id = $1 AND target_user_id = ANY($2)",
    )
    .bind(signer)
    .bind(targets)
    .fetch_all(db)
    .await
}

// ---- device-list stream ----

/// Records that `user_id`'s devices or keys changed; returns the stream position.
pub async fn record_device_list_change(conn: &mut PgConnection, user_id: &str) -> sqlx::Result<i64> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(DEVICE_LIST_LOCK).execute(&mut *conn).await?;
    sqlx::query_scalar(
        "INSERT INTO device_list_changes (stream_ordering, user_id) VALUES (nextval('device_list_stream_seq'), $1)
         RETURNING stream_ordering",
    )
    .bind(user_id)
    .fetch_one(conn)
    .await
}

/// The latest device-list position of one user (0 if their devices never changed): the
/// `stream_id` of `user/devices` over federation.
pub async fn user_device_list_position(db: impl PgExecutor<'_>, user_id: &str) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT COALESCE(MAX(stream_ordering), 0) FROM device_list_changes WHERE user_id = $1")
        .bind(user_id)
        .fetch_one(db)
        .await
}

pub async fn device_list_position(db: impl PgExecutor<'_>) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT COALESCE(MAX(stream_ordering), 0) FROM device_list_changes").fetch_one(db).await
}

/// Users whose devices changed in `(from, to]`.
pub async fn device_list_changes_between(db: impl PgExecutor<'_>, from: i64, to: i64) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT DISTINCT user_id FROM device_list_changes WHERE stream_ordering > $1 AND stream_ordering <= $2",
    )
    .bind(from)
    .bind(to)
    .fetch_all(db)
    .await
}

// ---- to-device ----

/// Records a to-device transaction; `false` if it was seen before (a retry).
pub async fn to_device_txn(
    conn: &mut PgConnection,
    user_id: &str,
    device_id: &str,
    txn_id: &str,
) -> sqlx::Result<bool> {
    let n = sqlx::query(
        "INSERT INTO to_device_txns (user_id, device_id, txn_id, created_ts) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
    )
    .bind(user_id)
    .bind(device_id)
    .bind(txn_id)
    .bind(now_ms())
    .execute(conn)
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// Queues messages `(recipient user, recipient device)`, all with the same sender, type and content
/// per row; returns the highest stream position used (0 if none).
pub async fn insert_to_device(
    conn: &mut PgConnection,
    sender: &str,
    event_type: &str,
    rows: &[(String, String, Value)],
) -> sqlx::Result<i64> {
    if rows.is_empty() {
        return Ok(0);
    }
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(TO_DEVICE_LOCK).execute(&mut *conn).await?;
    let users: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    let devices: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
    let contents: Vec<&Value> = rows.iter().map(|r| &r.2).collect();
    sqlx::query_scalar(
        "WITH ins AS (
             INSERT INTO to_device_messages
                 (stream_ordering, recipient_user, recipient_device, sender, event_type, content, created_ts)
             SELECT nextval('to_device_stream_seq'), u, d, $1, $2, c, $3
             FROM UNNEST($4::text[], $5::text[], $6::jsonb[]) AS t(u, d, c)
             RETURNING stream_ordering
         ) SELECT COALESCE(MAX(stream_ordering), 0) FROM ins",
    )
    .bind(sender)
    .bind(event_type)
    .bind(now_ms())
    .bind(users)
    .bind(devices)
    .bind(contents)
    .fetch_one(conn)
    .await
}

pub async fn to_device_position(db: impl PgExecutor<'_>) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT COALESCE(MAX(stream_ordering), 0) FROM to_device_messages").fetch_one(db).await
}

/// A queued to-device message: (stream, sender, type, content).
pub type ToDevice = (i64, String, String, Value);

/// Deletes the device's messages up to `acked` (the client has them) and returns the next ones in
/// `(acked, upto]`, oldest first, at most `limit`.
pub async fn take_to_device(
    db: impl PgExecutor<'_>,
    user_id: &str,
    device_id: &str,
    acked: i64,
    upto: i64,
    limit: i64,
) -> sqlx::Result<Vec<ToDevice>> {
    sqlx::query_as(
        "WITH gone AS (
             DELETE FROM to_device_messages
             WHERE recipient_user = $1 AND recipient_device = $2 AND stream_ordering <= $3
         )
         SELECT stream_ordering, sender, event_type, content FROM to_device_messages
         WHERE recipient_user = $1 AND recipient_device = $2 AND stream_ordering > $3 AND stream_ordering <= $4
         ORDER BY stream_ordering LIMIT $5",
    )
    .bind(user_id)
    .bind(device_id)
    .bind(acked)
    .bind(upto)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// The device's queued messages in `(after, upto]`, oldest first, at most `limit`, without
/// deleting anything (a dehydrated device's messages stay until the device goes).
pub async fn to_device_page(
    db: impl PgExecutor<'_>,
    user_id: &str,
    device_id: &str,
    after: i64,
    upto: i64,
    limit: i64,
) -> sqlx::Result<Vec<ToDevice>> {
    sqlx::query_as(
        "SELECT stream_ordering, sender, event_type, content FROM to_device_messages
         WHERE recipient_user = $1 AND recipient_device = $2 AND stream_ordering > $3 AND stream_ordering <= $4
         ORDER BY stream_ordering LIMIT $5",
    )
    .bind(user_id)
    .bind(device_id)
    .bind(after)
    .bind(upto)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// Keeps at most `max` queued messages per device (the oldest go) and forgets old transaction IDs.
pub async fn prune_to_device(db: impl PgExecutor<'_> + Copy, max: i64, txn_before_ts: i64) -> sqlx::Result<u64> {
    let n = sqlx::query(
        "DELETE FROM to_device_messages t USING (
             SELECT stream_ordering FROM (
                 SELECT stream_ordering, row_number() OVER (
                     PARTITION BY recipient_user, recipient_device ORDER BY stream_ordering DESC) AS rn
                 FROM to_device_messages
             ) r WHERE r.rn > $1
         ) old WHERE t.stream_ordering = old.stream_ordering",
    )
    .bind(max)
    .execute(db)
    .await?
    .rows_affected();
    sqlx::query("DELETE FROM to_device_txns WHERE created_ts < $1").bind(txn_before_ts).execute(db).await?;
    Ok(n)
}

/// The devices of a user (for `*` recipients).
pub async fn device_ids(db: impl PgExecutor<'_>, user_id: &str) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar("SELECT device_id FROM devices WHERE user_id = $1").bind(user_id).fetch_all(db).await
}

/// Users whose membership became leave or ban in `(from, to]` (event stream) in rooms `user_id`
/// is or was a member of: candidates for `keys/changes`'s `left`.
pub async fn departures_between(
    db: impl PgExecutor<'_>,
    user_id: &str,
    from: i64,
    to: i64,
) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT DISTINCT e.state_key FROM events e
         JOIN room_memberships m ON m.room_nid = e.room_nid AND m.user_id = $1
         WHERE e.event_type = 'm.room.member' AND e.stream_ordering > $2 AND e.stream_ordering <= $3
           AND e.state_key IS NOT NULL AND e.json::jsonb -> 'content' ->> 'membership' IN ('leave', 'ban')",
    )
    .bind(user_id)
    .bind(from)
    .bind(to)
    .fetch_all(db)
    .await
}
