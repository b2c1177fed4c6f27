//! `registration_tokens` and `registration_nonces`.

use serde::Serialize;
use sqlx::PgExecutor;

use super::now_ms;

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct RegistrationToken {
    pub token: String,
    pub uses_allowed: Option<i32>,
    pub completed: i32,
    pub expiry_ts: Option<i64>,
    pub created_ts: i64,
}

pub async fn create_token(
    db: impl PgExecutor<'_>,
    token: &str,
    uses_allowed: Option<i32>,
    expiry_ts: Option<i64>,
) -> sqlx::Result<bool> {
    Ok(sqlx::query(
        "INSERT INTO registration_tokens (token, uses_allowed, expiry_ts, created_ts) VALUES ($1, $2, $3, $4)
         ON CONFLICT DO NOTHING",
    )
    .bind(token)
    .bind(uses_allowed)
    .bind(expiry_ts)
    .bind(now_ms())
    .execute(db)
    .await?
    .rows_affected()
        == 1)
}

pub async fn list_tokens(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<RegistrationToken>> {
    sqlx::query_as("SELECT * FROM registration_tokens ORDER BY created_ts").fetch_all(db).await
}

pub async fn get_token(db: impl PgExecutor<'_>, token: &str) -> sqlx::Result<Option<RegistrationToken>> {
    sqlx::query_as("SELECT * FROM registration_tokens WHERE token = $1").bind(token).fetch_optional(db).await
}

pub async fn delete_token(db: impl PgExecutor<'_>, token: &str) -> sqlx::Result<bool> {
    Ok(sqlx::query("DELETE FROM registration_tokens WHERE token = $1").bind(token).execute(db).await?.rows_affected()
        == 1)
}

/// Whether the token exists, has uses left and has not expired.
pub async fn token_is_valid(db: impl PgExecutor<'_>, token: &str) -> sqlx::Result<bool> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM registration_tokens WHERE token = $1
           AND (uses_allowed IS NULL OR completed < uses_allowed)
           AND (expiry_ts IS NULL OR expiry_ts > $2))",
    )
    .bind(token)
    .bind(now_ms())
    .fetch_one(db)
    .await
}

/// Uses the token once, atomically with the registration it authorises. Returns `false` if it
/// is no longer valid (another registration took the last use meanwhile).
pub async fn consume_token(db: impl PgExecutor<'_>, token: &str) -> sqlx::Result<bool> {
    Ok(sqlx::query(
        "UPDATE registration_tokens SET completed = completed + 1 WHERE token = $1
           AND (uses_allowed IS NULL OR completed < uses_allowed)
           AND (expiry_ts IS NULL OR expiry_ts > $2)",
    )
    .bind(token)
    .bind(now_ms())
    .execute(db)
    .await?
    .rows_affected()
        == 1)
}

pub async fn insert_nonce(db: impl PgExecutor<'_>, nonce: &str) -> sqlx::Result<()> {
    sqlx::query("INSERT INTO registration_nonces (nonce, created_ts) VALUES ($1, $2)")
        .bind(nonce)
        .bind(now_ms())
        .execute(db)
        .await?;
    Ok(())
}

/// Consumes a nonce if it exists and was issued after `min_created_ts`; each nonce works once.
pub async fn take_nonce(db: impl PgExecutor<'_>, nonce: &str, min_created_ts: i64) -> sqlx::Result<bool> {
    Ok(sqlx::query("DELETE FROM registration_nonces WHERE nonce = $1 AND created_ts >= $2")
        .bind(nonce)
        .bind(min_created_ts)
        .execute(db)
        .await?
        .rows_affected()
        == 1)
}

pub async fn delete_expired_nonces(db: impl PgExecutor<'_>, before_ts: i64) -> sqlx::Result<u64> {
    Ok(sqlx::query("DELETE FROM registration_nonces WHERE created_ts < $1")
        .bind(before_ts)
        .execute(db)
        .await?
        .rows_affected())
}
