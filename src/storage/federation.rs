//! `federation_server_keys`, `federation_key_responses`: other servers' signing keys (migration
//! 0029), and our own expired keys (`server_signing_keys.expired_ts`) for `old_verify_keys`.

use sqlx::{PgExecutor, PgPool};

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RemoteKey {
    pub key_id: String,
    pub public_key: String,
    pub valid_until_ts: i64,
    pub expired_ts: Option<i64>,
}

/// Stores a verified key response: its keys (upserted) and the response itself.
pub async fn store_response(
    pool: &PgPool,
    server_name: &str,
    keys: &[RemoteKey],
    response: &str,
    valid_until_ts: i64,
    now: i64,
) -> sqlx::Result<()> {
    let mut tx = pool.begin().await?;
    for k in keys {
        sqlx::query(
            "INSERT INTO federation_server_keys
                 (server_name, key_id, public_key, valid_until_ts, expired_ts, fetched_ts)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (server_name, key_id) DO UPDATE SET
                 public_key = EXCLUDED.public_key,
                 valid_until_ts = GREATEST(federation_server_keys.valid_until_ts, EXCLUDED.valid_until_ts),
                 expired_ts = EXCLUDED.expired_ts,
                 fetched_ts = EXCLUDED.fetched_ts",
        )
        .bind(server_name)
        .bind(&k.key_id)
        .bind(&k.public_key)
        .bind(k.valid_until_ts)
        .bind(k.expired_ts)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query(
        "INSERT INTO federation_key_responses (server_name, response, valid_until_ts, fetched_ts)
         VALUES ($1, $2, $3, $4)
         ON CONFLICT (server_name) DO UPDATE SET
             response = EXCLUDED.response, valid_until_ts = EXCLUDED.valid_until_ts,
             fetched_ts = EXCLUDED.fetched_ts
         WHERE federation_key_responses.valid_until_ts <= EXCLUDED.valid_until_ts",
    )
    .bind(server_name)
    .bind(response)
    .bind(valid_until_ts)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

pub async fn key(db: impl PgExecutor<'_>, server_name: &str, key_id: &str) -> sqlx::Result<Option<RemoteKey>> {
    sqlx::query_as(
        "SELECT key_id, public_key, valid_until_ts, expired_ts FROM federation_server_keys
         WHERE server_name = $1 AND key_id = $2",
    )
    .bind(server_name)
    .bind(key_id)
    .fetch_optional(db)
    .await
}

/// The stored response of a server: (canonical JSON, valid_until_ts).
pub async fn response(db: impl PgExecutor<'_>, server_name: &str) -> sqlx::Result<Option<(String, i64)>> {
    sqlx::query_as("SELECT response, valid_until_ts FROM federation_key_responses WHERE server_name = $1")
        .bind(server_name)
        .fetch_optional(db)
        .await
}

/// Our own keys that have expired: (key_id, seed, expired_ts).
pub async fn own_expired_keys(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<(String, Vec<u8>, i64)>> {
    sqlx::query_as(
        "SELECT key_id, secret_seed, expired_ts FROM server_signing_keys
         WHERE expired_ts IS NOT NULL ORDER BY expired_ts LIMIT 100",
    )
    .fetch_all(db)
    .await
}
