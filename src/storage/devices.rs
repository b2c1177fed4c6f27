//! `devices`: a user's logged-in sessions. Deleting a device cascades to its access and refresh
//! tokens (foreign keys), so revocation is one statement.

use serde::Serialize;
use sqlx::PgExecutor;

use super::now_ms;

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct DeviceRow {
    pub device_id: String,
    pub display_name: Option<String>,
    pub last_seen_ip: Option<String>,
    pub last_seen_ts: Option<i64>,
}

/// Creates the device, or keeps an existing one (login with a known `device_id`). A display name
/// given for an existing device replaces the old one only when the old one is unset. `false`
/// (nothing written) if the device is the user's dehydrated device, which no session may use;
/// the check is on the conflicting row itself, so a concurrent `PUT /dehydrated_device` of the
/// same ID cannot slip between check and use.
pub async fn upsert(
    db: impl PgExecutor<'_>,
    user_id: &str,
    device_id: &str,
    display_name: Option<&str>,
    ip: Option<&str>,
) -> sqlx::Result<bool> {
    let n = sqlx::query(
        "INSERT INTO devices (user_id, device_id, display_name, created_ts, last_seen_ts, last_seen_ip)
         VALUES ($1, $2, $3, $4, $4, $5)
         ON CONFLICT (user_id, device_id) DO UPDATE
           SET display_name = COALESCE(devices.display_name, EXCLUDED.display_name),
               last_seen_ts = EXCLUDED.last_seen_ts, last_seen_ip = EXCLUDED.last_seen_ip
           WHERE devices.dehydrated_data IS NULL",
    )
    .bind(user_id)
    .bind(device_id)
    .bind(display_name)
    .bind(now_ms())
    .bind(ip)
    .execute(db)
    .await?
    .rows_affected();
    Ok(n == 1)
}

pub async fn list(db: impl PgExecutor<'_>, user_id: &str) -> sqlx::Result<Vec<DeviceRow>> {
    sqlx::query_as(
        "SELECT device_id, display_name, last_seen_ip, last_seen_ts FROM devices
         WHERE user_id = $1 ORDER BY device_id",
    )
    .bind(user_id)
    .fetch_all(db)
    .await
}

pub async fn get(db: impl PgExecutor<'_>, user_id: &str, device_id: &str) -> sqlx::Result<Option<DeviceRow>> {
    sqlx::query_as(
        "SELECT device_id, display_name, last_seen_ip, last_seen_ts FROM devices
         WHERE user_id = $1 AND device_id = $2",
    )
    .bind(user_id)
    .bind(device_id)
    .fetch_optional(db)
    .await
}

/// Renames a device. Returns `false` if it does not exist.
pub async fn rename(db: impl PgExecutor<'_>, user_id: &str, device_id: &str, name: Option<&str>) -> sqlx::Result<bool> {
    let n = sqlx::query("UPDATE devices SET display_name = $3 WHERE user_id = $1 AND device_id = $2")
        .bind(user_id)
        .bind(device_id)
        .bind(name)
        .execute(db)
        .await?
        .rows_affected();
    Ok(n == 1)
}

/// Which of a user's devices to delete.
pub enum Selection<'a> {
    These(&'a [String]),
    AllExcept(Option<&'a str>),
}

/// Deletes devices (and by cascade their tokens and keys; their queued to-device messages too).
/// Returns the token hashes that were revoked, so the caller can evict them from the token cache.
pub async fn delete(db: impl PgExecutor<'_>, user_id: &str, which: Selection<'_>) -> sqlx::Result<Vec<Vec<u8>>> {
    let (these, except) = match which {
        Selection::These(ids) => (Some(ids), None),
        Selection::AllExcept(keep) => (None, keep),
    };
    // The outer SELECT sees the snapshot from before the DELETE, so the tokens are still visible.
    sqlx::query_scalar(
        "WITH gone AS (DELETE FROM devices WHERE user_id = $1
                         AND ($2::text[] IS NULL OR device_id = ANY($2))
                         AND device_id IS DISTINCT FROM $3
                       RETURNING device_id),
              msgs AS (DELETE FROM to_device_messages m USING gone g
                       WHERE m.recipient_user = $1 AND m.recipient_device = g.device_id)
         SELECT t.token_hash FROM access_tokens t JOIN gone g ON t.device_id = g.device_id
         WHERE t.user_id = $1",
    )
    .bind(user_id)
    .bind(these)
    .bind(except)
    .fetch_all(db)
    .await
}

/// Records activity of a device (called at most once every few minutes per device).
pub async fn touch(
    db: impl PgExecutor<'_>,
    user_id: &str,
    device_id: &str,
    ip: &str,
    user_agent: Option<&str>,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE devices SET last_seen_ts = $3, last_seen_ip = $4, last_seen_user_agent = COALESCE($5, last_seen_user_agent)
         WHERE user_id = $1 AND device_id = $2",
    )
    .bind(user_id)
    .bind(device_id)
    .bind(now_ms())
    .bind(ip)
    .bind(user_agent)
    .execute(db)
    .await?;
    Ok(())
}
