//! Dehydrated devices (MSC3814): rows of `devices` whose `dehydrated_data` is set (migration 0014),
//! at most one per user. Their keys are the ordinary key tables ([`super::e2ee`]).

use serde_json::Value;
use sqlx::{PgConnection, PgExecutor};

use super::now_ms;

/// Serialises the writers of one user's dehydrated device (replacing it is delete + insert; two
/// concurrent replacements would otherwise both insert and one would hit the unique index).
pub async fn lock_user(conn: &mut PgConnection, user_id: &str) -> sqlx::Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('parvis dehydrated device ' || $1, 0))")
        .bind(user_id)
        .execute(conn)
        .await?;
    Ok(())
}

/// The user's dehydrated device: (device ID, device data).
pub async fn get(db: impl PgExecutor<'_>, user_id: &str) -> sqlx::Result<Option<(String, Value)>> {
    sqlx::query_as("SELECT device_id, dehydrated_data FROM devices WHERE user_id = $1 AND dehydrated_data IS NOT NULL")
        .bind(user_id)
        .fetch_optional(db)
        .await
}

/// The ID of the user's dehydrated device.
pub async fn device_id(db: impl PgExecutor<'_>, user_id: &str) -> sqlx::Result<Option<String>> {
    sqlx::query_scalar("SELECT device_id FROM devices WHERE user_id = $1 AND dehydrated_data IS NOT NULL")
        .bind(user_id)
        .fetch_optional(db)
        .await
}

/// Deletes the user's dehydrated device (its keys by cascade) and the to-device messages queued
/// for it; returns its ID, `None` if the user had none.
pub async fn remove(conn: &mut PgConnection, user_id: &str) -> sqlx::Result<Option<String>> {
    sqlx::query_scalar(
        "WITH gone AS (
             DELETE FROM devices WHERE user_id = $1 AND dehydrated_data IS NOT NULL RETURNING device_id
         ), msgs AS (
             DELETE FROM to_device_messages m USING gone g
             WHERE m.recipient_user = $1 AND m.recipient_device = g.device_id
         )
         SELECT device_id FROM gone",
    )
    .bind(user_id)
    .fetch_optional(conn)
    .await
}

/// Creates the user's dehydrated device. `false` if `device_id` is already one of the user's
/// devices (nothing is written then: an existing device is never turned into the dehydrated one).
/// Messages still queued for that ID from an earlier device of the same ID are dropped.
pub async fn create(
    conn: &mut PgConnection,
    user_id: &str,
    device_id: &str,
    display_name: Option<&str>,
    device_data: &Value,
) -> sqlx::Result<bool> {
    let created = sqlx::query(
        "INSERT INTO devices (user_id, device_id, display_name, created_ts, dehydrated_data)
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (user_id, device_id) DO NOTHING",
    )
    .bind(user_id)
    .bind(device_id)
    .bind(display_name)
    .bind(now_ms())
    .bind(device_data)
    .execute(&mut *conn)
    .await?
    .rows_affected()
        == 1;
    if created {
        sqlx::query("DELETE FROM to_device_messages WHERE recipient_user = $1 AND recipient_device = $2")
            .bind(user_id)
            .bind(device_id)
            .execute(conn)
            .await?;
    }
    Ok(created)
}
