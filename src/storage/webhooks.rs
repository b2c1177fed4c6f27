//! `webhooks`: alert webhooks (migration 0025).

use sqlx::PgExecutor;

use super::now_ms;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct WebhookRow {
    pub hook_id: String,
    pub token_hash: Vec<u8>,
    pub name: String,
    pub room_id: String,
    pub bot_user_id: String,
    pub mention_severities: Vec<String>,
    pub created_by: Option<String>,
    pub created_ts: i64,
    pub revoked_ts: Option<i64>,
    pub last_used_ts: Option<i64>,
}

pub struct NewWebhook<'a> {
    pub hook_id: &'a str,
    pub token_hash: &'a [u8],
    pub name: &'a str,
    pub room_id: &'a str,
    pub bot_user_id: &'a str,
    pub mention_severities: &'a [String],
    pub created_by: Option<&'a str>,
}

pub async fn insert(db: impl PgExecutor<'_>, w: &NewWebhook<'_>) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO webhooks (hook_id, token_hash, name, room_id, bot_user_id, mention_severities, created_by, created_ts)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(w.hook_id)
    .bind(w.token_hash)
    .bind(w.name)
    .bind(w.room_id)
    .bind(w.bot_user_id)
    .bind(w.mention_severities)
    .bind(w.created_by)
    .bind(now_ms())
    .execute(db)
    .await?;
    Ok(())
}

pub async fn get(db: impl PgExecutor<'_>, hook_id: &str) -> sqlx::Result<Option<WebhookRow>> {
    sqlx::query_as("SELECT * FROM webhooks WHERE hook_id = $1").bind(hook_id).fetch_optional(db).await
}

/// Every hook, newest first (revoked ones included, marked).
pub async fn list(db: impl PgExecutor<'_>, limit: i64) -> sqlx::Result<Vec<WebhookRow>> {
    sqlx::query_as("SELECT * FROM webhooks ORDER BY created_ts DESC, hook_id LIMIT $1").bind(limit).fetch_all(db).await
}

/// Revokes a hook; false when unknown or already revoked.
pub async fn revoke(db: impl PgExecutor<'_>, hook_id: &str) -> sqlx::Result<bool> {
    Ok(sqlx::query("UPDATE webhooks SET revoked_ts = $2 WHERE hook_id = $1 AND revoked_ts IS NULL")
        .bind(hook_id)
        .bind(now_ms())
        .execute(db)
        .await?
        .rows_affected()
        == 1)
}

pub async fn touch(db: impl PgExecutor<'_>, hook_id: &str) -> sqlx::Result<()> {
    sqlx::query("UPDATE webhooks SET last_used_ts = $2 WHERE hook_id = $1")
        .bind(hook_id)
        .bind(now_ms())
        .execute(db)
        .await?;
    Ok(())
}
