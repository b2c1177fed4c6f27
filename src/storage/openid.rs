//! `openid_tokens`: OpenID tokens, by SHA-256 hash. Never consulted for access tokens.

use sqlx::PgExecutor;

pub async fn insert(
    db: impl PgExecutor<'_>,
    hash: &[u8],
    user_id: &str,
    now: i64,
    expires_ts: i64,
) -> sqlx::Result<()> {
    sqlx::query("INSERT INTO openid_tokens (token_hash, user_id, created_ts, expires_ts) VALUES ($1, $2, $3, $4)")
        .bind(hash)
        .bind(user_id)
        .bind(now)
        .bind(expires_ts)
        .execute(db)
        .await?;
    Ok(())
}

/// The owner of an unexpired token whose account is active.
pub async fn lookup(db: impl PgExecutor<'_>, hash: &[u8], now: i64) -> sqlx::Result<Option<String>> {
    sqlx::query_scalar(
        "SELECT t.user_id FROM openid_tokens t JOIN users u ON u.user_id = t.user_id
         WHERE t.token_hash = $1 AND t.expires_ts > $2 AND NOT u.deactivated",
    )
    .bind(hash)
    .bind(now)
    .fetch_optional(db)
    .await
}

pub async fn delete_expired(db: impl PgExecutor<'_>, now: i64) -> sqlx::Result<u64> {
    Ok(sqlx::query("DELETE FROM openid_tokens WHERE expires_ts <= $1").bind(now).execute(db).await?.rows_affected())
}
