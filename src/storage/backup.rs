//! Server-side key backup (`room_keys`): versions and the encrypted session keys in them.

use serde_json::Value;
use sqlx::{PgConnection, PgExecutor};

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct BackupVersion {
    pub version: i64,
    pub algorithm: String,
    pub auth_data: Value,
    pub etag: i64,
}

/// Creates the next version (the new current one); returns it.
pub async fn create_version(
    conn: &mut PgConnection,
    user_id: &str,
    algorithm: &str,
    auth_data: &Value,
) -> sqlx::Result<i64> {
    // Serialise version creation per user (two creations must not pick the same number).
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('room_keys:' || $1))").bind(user_id).execute(&mut *conn).await?;
    sqlx::query_scalar(
        "INSERT INTO room_key_backups (user_id, version, algorithm, auth_data)
         SELECT $1, COALESCE(MAX(version), 0) + 1, $2, $3 FROM room_key_backups WHERE user_id = $1
         RETURNING version",
    )
    .bind(user_id)
    .bind(algorithm)
    .bind(auth_data)
    .fetch_one(conn)
    .await
}

/// A version (`None`: the latest) unless deleted.
pub async fn version(
    db: impl PgExecutor<'_>,
    user_id: &str,
    version: Option<i64>,
) -> sqlx::Result<Option<BackupVersion>> {
    sqlx::query_as(
        "SELECT version, algorithm, auth_data, etag FROM room_key_backups
         WHERE user_id = $1 AND NOT deleted AND ($2::bigint IS NULL OR version = $2)
         ORDER BY version DESC LIMIT 1",
    )
    .bind(user_id)
    .bind(version)
    .fetch_optional(db)
    .await
}

pub async fn update_auth_data(
    db: impl PgExecutor<'_>,
    user_id: &str,
    version: i64,
    auth_data: &Value,
) -> sqlx::Result<bool> {
    let n =
        sqlx::query("UPDATE room_key_backups SET auth_data = $3 WHERE user_id = $1 AND version = $2 AND NOT deleted")
            .bind(user_id)
            .bind(version)
            .bind(auth_data)
            .execute(db)
            .await?
            .rows_affected();
    Ok(n == 1)
}

/// Deletes a version and its keys; `false` if there was no such version.
pub async fn delete_version(conn: &mut PgConnection, user_id: &str, version: i64) -> sqlx::Result<bool> {
    sqlx::query("DELETE FROM room_keys WHERE user_id = $1 AND version = $2")
        .bind(user_id)
        .bind(version)
        .execute(&mut *conn)
        .await?;
    let n =
        sqlx::query("UPDATE room_key_backups SET deleted = TRUE WHERE user_id = $1 AND version = $2 AND NOT deleted")
            .bind(user_id)
            .bind(version)
            .execute(conn)
            .await?
            .rows_affected();
    Ok(n == 1)
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RoomKey {
    pub room_id: String,
    pub session_id: String,
    pub first_message_index: i64,
    pub forwarded_count: i64,
    pub is_verified: bool,
    pub session_data: Value,
}

/// Keys of a version, optionally of one room and one session.
pub async fn keys(
    db: impl PgExecutor<'_>,
    user_id: &str,
    version: i64,
    room_id: Option<&str>,
    session_id: Option<&str>,
) -> sqlx::Result<Vec<RoomKey>> {
    sqlx::query_as(
        "SELECT room_id, session_id, first_message_index, forwarded_count, is_verified, session_data FROM room_keys
         WHERE user_id = $1 AND version = $2 AND ($3::text IS NULL OR room_id = $3)
           AND ($4::text IS NULL OR session_id = $4)",
    )
    .bind(user_id)
    .bind(version)
    .bind(room_id)
    .bind(session_id)
    .fetch_all(db)
    .await
}

/// Stores keys where they are better than the stored ones (the spec's rules: verified beats
/// unverified, then a lower first message index, then a lower forwarded count). Returns how many
/// were written.
pub async fn put_keys(conn: &mut PgConnection, user_id: &str, version: i64, keys: &[RoomKey]) -> sqlx::Result<u64> {
    if keys.is_empty() {
        return Ok(0);
    }
    let rooms: Vec<&str> = keys.iter().map(|k| k.room_id.as_str()).collect();
    let sessions: Vec<&str> = keys.iter().map(|k| k.session_id.as_str()).collect();
    let fmi: Vec<i64> = keys.iter().map(|k| k.first_message_index).collect();
    let fc: Vec<i64> = keys.iter().map(|k| k.forwarded_count).collect();
    let verified: Vec<bool> = keys.iter().map(|k| k.is_verified).collect();
    let data: Vec<&Value> = keys.iter().map(|k| &k.session_data).collect();
    let n = sqlx::query(
        "INSERT INTO room_keys AS k (user_id, version, room_id, session_id, first_message_index, forwarded_count,
                                     is_verified, session_data)
         SELECT $1, $2, r, s, f, c, v, d FROM UNNEST($3::text[], $4::text[], $5::bigint[], $6::bigint[],
                                                     $7::bool[], $8::jsonb[]) AS t(r, s, f, c, v, d)
         ON CONFLICT (user_id, version, room_id, session_id) DO UPDATE
           SET first_message_index = EXCLUDED.first_message_index, forwarded_count = EXCLUDED.forwarded_count,
               is_verified = EXCLUDED.is_verified, session_data = EXCLUDED.session_data
           WHERE (EXCLUDED.is_verified AND NOT k.is_verified)
              OR (EXCLUDED.is_verified = k.is_verified AND (
                    EXCLUDED.first_message_index < k.first_message_index
                    OR (EXCLUDED.first_message_index = k.first_message_index
                        AND EXCLUDED.forwarded_count < k.forwarded_count)))",
    )
    .bind(user_id)
    .bind(version)
    .bind(rooms)
    .bind(sessions)
    .bind(fmi)
    .bind(fc)
    .bind(verified)
    .bind(data)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    Ok(n)
}

pub async fn delete_keys(
    conn: &mut PgConnection,
    user_id: &str,
    version: i64,
    room_id: Option<&str>,
    session_id: Option<&str>,
) -> sqlx::Result<u64> {
    Ok(sqlx::query(
        "DELETE FROM room_keys WHERE user_id = $1 AND version = $2 AND ($3::text IS NULL OR room_id = $3)
           AND ($4::text IS NULL OR session_id = $4)",
    )
    .bind(user_id)
    .bind(version)
    .bind(room_id)
    .bind(session_id)
    .execute(conn)
    .await?
    .rows_affected())
}

/// Bumps the etag after a change of the keys; returns (etag, count).
pub async fn bump_etag(conn: &mut PgConnection, user_id: &str, version: i64) -> sqlx::Result<(i64, i64)> {
    sqlx::query_as(
        "UPDATE room_key_backups SET etag = etag + 1 WHERE user_id = $1 AND version = $2
         RETURNING etag, (SELECT COUNT(*) FROM room_keys WHERE user_id = $1 AND version = $2)",
    )
    .bind(user_id)
    .bind(version)
    .fetch_one(conn)
    .await
}

pub async fn etag_and_count(db: impl PgExecutor<'_>, user_id: &str, version: i64) -> sqlx::Result<(i64, i64)> {
    sqlx::query_as(
        "SELECT b.etag, (SELECT COUNT(*) FROM room_keys k WHERE k.user_id = $1 AND k.version = $2)
         FROM room_key_backups b WHERE b.user_id = $1 AND b.version = $2",
    )
    .bind(user_id)
    .bind(version)
    .fetch_one(db)
    .await
}
