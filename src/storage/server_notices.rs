//! `server_notice_rooms`: each user's server-notices room (migration 0026).

use sqlx::PgExecutor;

use super::now_ms;

pub async fn room_of(db: impl PgExecutor<'_>, user_id: &str) -> sqlx::Result<Option<String>> {
    sqlx::query_scalar("SELECT room_id FROM server_notice_rooms WHERE user_id = $1")
        .bind(user_id)
        .fetch_optional(db)
        .await
}

pub async fn set_room(db: impl PgExecutor<'_>, user_id: &str, room_id: &str) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO server_notice_rooms (user_id, room_id, created_ts) VALUES ($1, $2, $3)
         ON CONFLICT (user_id) DO UPDATE SET room_id = EXCLUDED.room_id, created_ts = EXCLUDED.created_ts",
    )
    .bind(user_id)
    .bind(room_id)
    .bind(now_ms())
    .execute(db)
    .await?;
    Ok(())
}
