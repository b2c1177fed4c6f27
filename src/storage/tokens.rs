//! `access_tokens` and `refresh_tokens`. Only SHA-256 hashes of tokens are stored.

use sqlx::PgExecutor;

use super::now_ms;

/// What an access token resolves to.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TokenOwner {
    pub user_id: String,
    pub device_id: String,
    pub expires_ts: Option<i64>,
    pub is_admin: bool,
    pub deactivated: bool,
    pub user_type: Option<String>,
}

pub async fn lookup_access(db: impl PgExecutor<'_>, hash: &[u8]) -> sqlx::Result<Option<TokenOwner>> {
    sqlx::query_as(
        "SELECT t.user_id, t.device_id, t.expires_ts, u.is_admin, u.deactivated, u.user_type
         FROM access_tokens t JOIN users u ON u.user_id = t.user_id
         WHERE t.token_hash = $1",
    )
    .bind(hash)
    .fetch_optional(db)
    .await
}

pub async fn insert_access(
    db: impl PgExecutor<'_>,
    hash: &[u8],
    user_id: &str,
    device_id: &str,
    expires_ts: Option<i64>,
    refresh_token_id: Option<i64>,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO access_tokens (token_hash, user_id, device_id, expires_ts, refresh_token_id, created_ts)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(hash)
    .bind(user_id)
    .bind(device_id)
    .bind(expires_ts)
    .bind(refresh_token_id)
    .bind(now_ms())
    .execute(db)
    .await?;
    Ok(())
}

pub async fn insert_refresh(db: impl PgExecutor<'_>, hash: &[u8], user_id: &str, device_id: &str) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "INSERT INTO refresh_tokens (token_hash, user_id, device_id, created_ts) VALUES ($1, $2, $3, $4) RETURNING id",
    )
    .bind(hash)
    .bind(user_id)
    .bind(device_id)
    .bind(now_ms())
    .fetch_one(db)
    .await
}

/// Consumes a refresh token: deletes it (and by cascade the access token it issued) and returns
/// its owner plus the revoked access-token hashes. `None` if unknown or already used.
pub async fn take_refresh(
    tx: &mut sqlx::PgConnection,
    hash: &[u8],
) -> sqlx::Result<Option<(String, String, Vec<Vec<u8>>)>> {
    let row: Option<(i64, String, String)> =
        sqlx::query_as("SELECT id, user_id, device_id FROM refresh_tokens WHERE token_hash = $1 FOR UPDATE")
            .bind(hash)
            .fetch_optional(&mut *tx)
            .await?;
    let Some((id, user_id, device_id)) = row else { return Ok(None) };
    let revoked: Vec<Vec<u8>> =
        sqlx::query_scalar("DELETE FROM access_tokens WHERE refresh_token_id = $1 RETURNING token_hash")
            .bind(id)
            .fetch_all(&mut *tx)
            .await?;
    sqlx::query("DELETE FROM refresh_tokens WHERE id = $1").bind(id).execute(&mut *tx).await?;
    Ok(Some((user_id, device_id, revoked)))
}

/// Deletes one access token (logout keeps the device's other state until the device goes).
pub async fn delete_access(db: impl PgExecutor<'_>, hash: &[u8]) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM access_tokens WHERE token_hash = $1").bind(hash).execute(db).await?;
    Ok(())
}
