//! `server_meta` and `server_signing_keys`: the server's identity.

use sqlx::PgPool;

use super::now_ms;

/// Records `server_name` on first start; afterwards returns the recorded name, which the caller
/// compares with the configured one (user IDs embed it, so it can never change).
pub async fn claim_server_name(pool: &PgPool, server_name: &str) -> sqlx::Result<String> {
    sqlx::query("INSERT INTO server_meta (key, value) VALUES ('server_name', $1) ON CONFLICT DO NOTHING")
        .bind(server_name)
        .execute(pool)
        .await?;
    sqlx::query_scalar("SELECT value FROM server_meta WHERE key = 'server_name'").fetch_one(pool).await
}

/// The active signing key as (key_id, 32-byte seed), if any.
pub async fn active_signing_key(pool: &PgPool) -> sqlx::Result<Option<(String, Vec<u8>)>> {
    sqlx::query_as(
        "SELECT key_id, secret_seed FROM server_signing_keys WHERE expired_ts IS NULL
         ORDER BY created_ts LIMIT 1",
    )
    .fetch_optional(pool)
    .await
}

/// Stores a freshly generated key unless another instance stored one first; returns the key that
/// is active afterwards, so that concurrent first starts agree on a single key.
pub async fn insert_signing_key_if_none(pool: &PgPool, key_id: &str, seed: &[u8]) -> sqlx::Result<(String, Vec<u8>)> {
    let mut tx = pool.begin().await?;
    // Serialise first starts of several instances on one database.
    sqlx::query("SELECT pg_advisory_xact_lock(7061727669730001)").execute(&mut *tx).await?;
    let existing: Option<(String, Vec<u8>)> = sqlx::query_as(
        "SELECT key_id, secret_seed FROM server_signing_keys WHERE expired_ts IS NULL
         ORDER BY created_ts LIMIT 1",
    )
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(k) = existing {
        tx.commit().await?;
        return Ok(k);
    }
    sqlx::query("INSERT INTO server_signing_keys (key_id, secret_seed, created_ts) VALUES ($1, $2, $3)")
        .bind(key_id)
        .bind(seed)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok((key_id.to_owned(), seed.to_vec()))
}
