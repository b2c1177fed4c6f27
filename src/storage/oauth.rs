//! The OAuth 2.0 authorization server (migration 0023): `oauth_clients`, `oauth_grants`,
//! `oauth_codes`, `oauth_sessions`, the rotation columns of `refresh_tokens`,
//! `account_web_sessions`, `cross_signing_reset_approvals`.

use serde_json::Value;
use sqlx::{PgConnection, PgExecutor};

use super::now_ms;

// ---------------------------------------------------------------- clients

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Client {
    pub client_id: String,
    pub application_type: String,
    pub redirect_uris: Vec<String>,
    pub metadata: sqlx::types::Json<Value>,
}

pub async fn client(db: impl PgExecutor<'_>, client_id: &str) -> sqlx::Result<Option<Client>> {
    sqlx::query_as(
        "SELECT client_id, application_type, redirect_uris, metadata FROM oauth_clients WHERE client_id = $1",
    )
    .bind(client_id)
    .fetch_optional(db)
    .await
}

/// Registers a client, or returns the ID of an identical registration.
pub async fn register_client(
    db: &sqlx::PgPool,
    new_id: &str,
    application_type: &str,
    redirect_uris: &[String],
    metadata: &Value,
    metadata_hash: &[u8],
) -> sqlx::Result<String> {
    let mut tx = db.begin().await?;
    // One registration per metadata: serialise concurrent identical registrations.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended(encode($1, 'hex'), 0))")
        .bind(metadata_hash)
        .execute(&mut *tx)
        .await?;
    let existing: Option<String> =
        sqlx::query_scalar("SELECT client_id FROM oauth_clients WHERE metadata_hash = $1 LIMIT 1")
            .bind(metadata_hash)
            .fetch_optional(&mut *tx)
            .await?;
    let id = match existing {
        Some(id) => id,
        None => {
            sqlx::query(
                "INSERT INTO oauth_clients (client_id, application_type, redirect_uris, metadata, metadata_hash, created_ts)
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(new_id)
            .bind(application_type)
            .bind(redirect_uris)
            .bind(sqlx::types::Json(metadata))
            .bind(metadata_hash)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
            new_id.to_owned()
        }
    };
    tx.commit().await?;
    Ok(id)
}

// ---------------------------------------------------------------- grants

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Grant {
    pub grant_id: String,
    pub browser_hash: Vec<u8>,
    pub client_id: String,
    pub redirect_uri: String,
    pub response_mode: String,
    pub scope: String,
    pub device_id: String,
    pub state: Option<String>,
    pub code_challenge: String,
    pub prompt: Option<String>,
    pub user_id: Option<String>,
    pub upstream: Option<sqlx::types::Json<Value>>,
    pub csrf: String,
    pub expires_ts: i64,
}

pub struct NewGrant<'a> {
    pub grant_id: &'a str,
    pub browser_hash: &'a [u8],
    pub client_id: &'a str,
    pub redirect_uri: &'a str,
    pub response_mode: &'a str,
    pub scope: &'a str,
    pub device_id: &'a str,
    pub state: Option<&'a str>,
    pub code_challenge: &'a str,
    pub prompt: Option<&'a str>,
    pub csrf: &'a str,
    pub expires_ts: i64,
}

pub async fn insert_grant(db: impl PgExecutor<'_>, g: &NewGrant<'_>) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO oauth_grants (grant_id, browser_hash, client_id, redirect_uri, response_mode, scope, device_id,
             state, code_challenge, prompt, csrf, created_ts, expires_ts)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
    )
    .bind(g.grant_id)
    .bind(g.browser_hash)
    .bind(g.client_id)
    .bind(g.redirect_uri)
    .bind(g.response_mode)
    .bind(g.scope)
    .bind(g.device_id)
    .bind(g.state)
    .bind(g.code_challenge)
    .bind(g.prompt)
    .bind(g.csrf)
    .bind(now_ms())
    .bind(g.expires_ts)
    .execute(db)
    .await?;
    Ok(())
}

pub async fn grant(db: impl PgExecutor<'_>, grant_id: &str) -> sqlx::Result<Option<Grant>> {
    sqlx::query_as(
        "SELECT grant_id, browser_hash, client_id, redirect_uri, response_mode, scope, device_id, state,
                code_challenge, prompt, user_id, upstream, csrf, expires_ts
         FROM oauth_grants WHERE grant_id = $1",
    )
    .bind(grant_id)
    .fetch_optional(db)
    .await
}

/// Records who authenticated for the grant (and the upstream provider session, if any).
pub async fn authenticate_grant(
    db: impl PgExecutor<'_>,
    grant_id: &str,
    user_id: &str,
    upstream: Option<&Value>,
) -> sqlx::Result<()> {
    sqlx::query("UPDATE oauth_grants SET user_id = $2, upstream = $3 WHERE grant_id = $1")
        .bind(grant_id)
        .bind(user_id)
        .bind(upstream.map(sqlx::types::Json))
        .execute(db)
        .await?;
    Ok(())
}

/// Consumes the grant (consent given or refused): once only.
pub async fn take_grant(db: impl PgExecutor<'_>, grant_id: &str) -> sqlx::Result<bool> {
    Ok(sqlx::query("DELETE FROM oauth_grants WHERE grant_id = $1").bind(grant_id).execute(db).await?.rows_affected()
        == 1)
}

// ---------------------------------------------------------------- codes

pub struct NewCode<'a> {
    pub code_hash: &'a [u8],
    pub client_id: &'a str,
    pub redirect_uri: &'a str,
    pub scope: &'a str,
    pub device_id: &'a str,
    pub user_id: &'a str,
    pub code_challenge: &'a str,
    pub upstream: Option<&'a Value>,
    pub expires_ts: i64,
}

pub async fn insert_code(db: impl PgExecutor<'_>, c: &NewCode<'_>) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO oauth_codes (code_hash, client_id, redirect_uri, scope, device_id, user_id, code_challenge,
             upstream, expires_ts)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(c.code_hash)
    .bind(c.client_id)
    .bind(c.redirect_uri)
    .bind(c.scope)
    .bind(c.device_id)
    .bind(c.user_id)
    .bind(c.code_challenge)
    .bind(c.upstream.map(sqlx::types::Json))
    .bind(c.expires_ts)
    .execute(db)
    .await?;
    Ok(())
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Code {
    pub client_id: String,
    pub redirect_uri: String,
    pub scope: String,
    pub device_id: String,
    pub user_id: String,
    pub code_challenge: String,
    pub upstream: Option<sqlx::types::Json<Value>>,
    pub expires_ts: i64,
    pub used_ts: Option<i64>,
    pub issued_device: Option<String>,
}

/// Locks the code's row for its exchange (in the caller's transaction).
pub async fn lock_code(tx: &mut PgConnection, code_hash: &[u8]) -> sqlx::Result<Option<Code>> {
    sqlx::query_as(
        "SELECT client_id, redirect_uri, scope, device_id, user_id, code_challenge, upstream, expires_ts, used_ts,
                issued_device
         FROM oauth_codes WHERE code_hash = $1 FOR UPDATE",
    )
    .bind(code_hash)
    .fetch_optional(tx)
    .await
}

pub async fn mark_code_used(tx: &mut PgConnection, code_hash: &[u8], device_id: Option<&str>) -> sqlx::Result<()> {
    sqlx::query("UPDATE oauth_codes SET used_ts = $2, issued_device = $3 WHERE code_hash = $1")
        .bind(code_hash)
        .bind(now_ms())
        .bind(device_id)
        .execute(tx)
        .await?;
    Ok(())
}

// ---------------------------------------------------------------- sessions and refresh tokens

pub async fn insert_session(
    tx: &mut PgConnection,
    user_id: &str,
    device_id: &str,
    client_id: &str,
    scope: &str,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO oauth_sessions (user_id, device_id, client_id, scope, created_ts) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (user_id, device_id) DO UPDATE SET client_id = EXCLUDED.client_id, scope = EXCLUDED.scope,
             created_ts = EXCLUDED.created_ts",
    )
    .bind(user_id)
    .bind(device_id)
    .bind(client_id)
    .bind(scope)
    .bind(now_ms())
    .execute(tx)
    .await?;
    Ok(())
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Session {
    pub client_id: String,
    pub scope: String,
}

pub async fn session(db: impl PgExecutor<'_>, user_id: &str, device_id: &str) -> sqlx::Result<Option<Session>> {
    sqlx::query_as("SELECT client_id, scope FROM oauth_sessions WHERE user_id = $1 AND device_id = $2")
        .bind(user_id)
        .bind(device_id)
        .fetch_optional(db)
        .await
}

pub async fn insert_refresh(
    tx: &mut PgConnection,
    hash: &[u8],
    user_id: &str,
    device_id: &str,
    parent_id: Option<i64>,
    expires_ts: i64,
) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "INSERT INTO refresh_tokens (token_hash, user_id, device_id, created_ts, parent_id, expires_ts)
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
    )
    .bind(hash)
    .bind(user_id)
    .bind(device_id)
    .bind(now_ms())
    .bind(parent_id)
    .bind(expires_ts)
    .fetch_one(tx)
    .await
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Refresh {
    pub id: i64,
    pub user_id: String,
    pub device_id: String,
    pub used_ts: Option<i64>,
    pub expires_ts: Option<i64>,
}

pub async fn lock_refresh(tx: &mut PgConnection, hash: &[u8]) -> sqlx::Result<Option<Refresh>> {
    sqlx::query_as(
        "SELECT id, user_id, device_id, used_ts, expires_ts FROM refresh_tokens WHERE token_hash = $1 FOR UPDATE",
    )
    .bind(hash)
    .fetch_optional(tx)
    .await
}

/// The refresh token issued when `id` was used: `(id, used)`.
pub async fn successor(tx: &mut PgConnection, id: i64) -> sqlx::Result<Option<(i64, bool)>> {
    sqlx::query_as("SELECT id, used_ts IS NOT NULL FROM refresh_tokens WHERE parent_id = $1 ORDER BY id DESC LIMIT 1")
        .bind(id)
        .fetch_optional(tx)
        .await
}

/// Marks a refresh token used and revokes the access tokens it issued (returned, for the cache).
pub async fn use_refresh(tx: &mut PgConnection, id: i64) -> sqlx::Result<Vec<Vec<u8>>> {
    sqlx::query("UPDATE refresh_tokens SET used_ts = $2 WHERE id = $1")
        .bind(id)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
    sqlx::query_scalar("DELETE FROM access_tokens WHERE refresh_token_id = $1 RETURNING token_hash")
        .bind(id)
        .fetch_all(tx)
        .await
}

/// Drops a refresh token that was handed out but never used (a retried refresh replaces it),
/// with the access token it issued.
pub async fn drop_refresh(tx: &mut PgConnection, id: i64) -> sqlx::Result<Vec<Vec<u8>>> {
    let revoked = sqlx::query_scalar("DELETE FROM access_tokens WHERE refresh_token_id = $1 RETURNING token_hash")
        .bind(id)
        .fetch_all(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM refresh_tokens WHERE id = $1").bind(id).execute(tx).await?;
    Ok(revoked)
}

/// The device of a refresh token (revocation).
pub async fn refresh_owner(db: impl PgExecutor<'_>, hash: &[u8]) -> sqlx::Result<Option<(String, String)>> {
    sqlx::query_as("SELECT user_id, device_id FROM refresh_tokens WHERE token_hash = $1")
        .bind(hash)
        .fetch_optional(db)
        .await
}

// ---------------------------------------------------------------- account pages

pub async fn insert_web_session(
    db: impl PgExecutor<'_>,
    hash: &[u8],
    user_id: &str,
    csrf: &str,
    expires_ts: i64,
) -> sqlx::Result<()> {
    sqlx::query("INSERT INTO account_web_sessions (token_hash, user_id, csrf, expires_ts) VALUES ($1, $2, $3, $4)")
        .bind(hash)
        .bind(user_id)
        .bind(csrf)
        .bind(expires_ts)
        .execute(db)
        .await?;
    Ok(())
}

/// `(user_id, csrf)` of a live browser session.
pub async fn web_session(db: impl PgExecutor<'_>, hash: &[u8]) -> sqlx::Result<Option<(String, String)>> {
    sqlx::query_as(
        "SELECT s.user_id, s.csrf FROM account_web_sessions s JOIN users u USING (user_id)
         WHERE s.token_hash = $1 AND s.expires_ts > $2 AND NOT u.deactivated",
    )
    .bind(hash)
    .bind(now_ms())
    .fetch_optional(db)
    .await
}

pub async fn delete_web_session(db: impl PgExecutor<'_>, hash: &[u8]) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM account_web_sessions WHERE token_hash = $1").bind(hash).execute(db).await?;
    Ok(())
}

pub async fn approve_cross_signing_reset(db: impl PgExecutor<'_>, user_id: &str, until: i64) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO cross_signing_reset_approvals (user_id, allowed_until) VALUES ($1, $2)
         ON CONFLICT (user_id) DO UPDATE SET allowed_until = EXCLUDED.allowed_until",
    )
    .bind(user_id)
    .bind(until)
    .execute(db)
    .await?;
    Ok(())
}

pub async fn cross_signing_reset_approved(db: impl PgExecutor<'_>, user_id: &str) -> sqlx::Result<bool> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM cross_signing_reset_approvals WHERE user_id = $1 AND allowed_until > $2)",
    )
    .bind(user_id)
    .bind(now_ms())
    .fetch_one(db)
    .await
}

/// Removes expired grants, codes and browser sessions.
pub async fn delete_expired(db: &sqlx::PgPool) -> sqlx::Result<u64> {
    let now = now_ms();
    let mut n = 0;
    for sql in [
        "DELETE FROM oauth_grants WHERE expires_ts < $1",
        "DELETE FROM oauth_codes WHERE expires_ts < $1",
        "DELETE FROM account_web_sessions WHERE expires_ts < $1",
        "DELETE FROM cross_signing_reset_approvals WHERE allowed_until < $1",
    ] {
        n += sqlx::query(sql).bind(now).execute(db).await?.rows_affected();
    }
    Ok(n)
}
