//! Single sign-on: `user_external_ids`, `user_threepids`, `sso_auth_sessions`,
//! `sso_login_tokens`, `sso_device_sessions`, `sso_logout_jtis` (migration 0020).

use sqlx::{PgConnection, PgExecutor};

use super::now_ms;

// ---------------------------------------------------------------- authorization requests

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AuthSession {
    pub browser_hash: Vec<u8>,
    pub provider: String,
    pub nonce: String,
    pub pkce_verifier: Option<String>,
    pub client_redirect_url: Option<String>,
    pub uia_session_id: Option<String>,
    pub expires_ts: i64,
}

pub struct NewAuthSession<'a> {
    pub state_hash: &'a [u8],
    pub browser_hash: &'a [u8],
    pub provider: &'a str,
    pub nonce: &'a str,
    pub pkce_verifier: Option<&'a str>,
    pub client_redirect_url: Option<&'a str>,
    pub uia_session_id: Option<&'a str>,
    pub expires_ts: i64,
}

pub async fn insert_auth_session(db: impl PgExecutor<'_>, s: &NewAuthSession<'_>) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO sso_auth_sessions (state_hash, browser_hash, provider, nonce, pkce_verifier,
             client_redirect_url, uia_session_id, created_ts, expires_ts)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(s.state_hash)
    .bind(s.browser_hash)
    .bind(s.provider)
    .bind(s.nonce)
    .bind(s.pkce_verifier)
    .bind(s.client_redirect_url)
    .bind(s.uia_session_id)
    .bind(now_ms())
    .bind(s.expires_ts)
    .execute(db)
    .await?;
    Ok(())
}

/// Takes the authorization request (once: a second callback with the same `state` finds nothing).
pub async fn take_auth_session(db: impl PgExecutor<'_>, state_hash: &[u8]) -> sqlx::Result<Option<AuthSession>> {
    sqlx::query_as(
        "DELETE FROM sso_auth_sessions WHERE state_hash = $1
         RETURNING browser_hash, provider, nonce, pkce_verifier, client_redirect_url, uia_session_id, expires_ts",
    )
    .bind(state_hash)
    .fetch_optional(db)
    .await
}

// ---------------------------------------------------------------- login tokens

pub struct NewLoginToken<'a> {
    pub token_hash: &'a [u8],
    pub user_id: &'a str,
    pub provider: &'a str,
    pub subject: &'a str,
    pub sid: Option<&'a str>,
    pub id_token: Option<&'a str>,
    pub expires_ts: i64,
}

pub async fn insert_login_token(db: impl PgExecutor<'_>, t: &NewLoginToken<'_>) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO sso_login_tokens (token_hash, user_id, provider, subject, sid, id_token, expires_ts)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(t.token_hash)
    .bind(t.user_id)
    .bind(t.provider)
    .bind(t.subject)
    .bind(t.sid)
    .bind(t.id_token)
    .bind(t.expires_ts)
    .execute(db)
    .await?;
    Ok(())
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct LoginToken {
    pub user_id: String,
    pub provider: String,
    pub subject: String,
    pub sid: Option<String>,
    pub id_token: Option<String>,
    pub expires_ts: i64,
}

/// Consumes a login token: single use, whether or not it has expired.
pub async fn take_login_token(db: &mut PgConnection, token_hash: &[u8]) -> sqlx::Result<Option<LoginToken>> {
    sqlx::query_as(
        "DELETE FROM sso_login_tokens WHERE token_hash = $1
         RETURNING user_id, provider, subject, sid, id_token, expires_ts",
    )
    .bind(token_hash)
    .fetch_optional(db)
    .await
}

// ---------------------------------------------------------------- device sessions

pub async fn insert_device_session(
    db: &mut PgConnection,
    user_id: &str,
    device_id: &str,
    t: &LoginToken,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO sso_device_sessions (user_id, device_id, provider, subject, sid, id_token, created_ts)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (user_id, device_id) DO UPDATE SET provider = EXCLUDED.provider, subject = EXCLUDED.subject,
             sid = EXCLUDED.sid, id_token = EXCLUDED.id_token, created_ts = EXCLUDED.created_ts",
    )
    .bind(user_id)
    .bind(device_id)
    .bind(&t.provider)
    .bind(&t.subject)
    .bind(&t.sid)
    .bind(&t.id_token)
    .bind(now_ms())
    .execute(db)
    .await?;
    Ok(())
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeviceSession {
    pub provider: String,
    pub id_token: Option<String>,
}

pub async fn device_session(
    db: impl PgExecutor<'_>,
    user_id: &str,
    device_id: &str,
) -> sqlx::Result<Option<DeviceSession>> {
    sqlx::query_as("SELECT provider, id_token FROM sso_device_sessions WHERE user_id = $1 AND device_id = $2")
        .bind(user_id)
        .bind(device_id)
        .fetch_optional(db)
        .await
}

/// The devices logged in through a provider session: by `sid` when the logout token names one,
/// else every session of the subject.
pub async fn devices_for_logout(
    db: impl PgExecutor<'_>,
    provider: &str,
    subject: Option<&str>,
    sid: Option<&str>,
) -> sqlx::Result<Vec<(String, String)>> {
    sqlx::query_as(
        "SELECT user_id, device_id FROM sso_device_sessions
         WHERE provider = $1
           AND (CASE WHEN $3::text IS NOT NULL THEN sid = $3 ELSE subject = $2 END)
           AND ($2::text IS NULL OR subject = $2)
         ORDER BY user_id, device_id",
    )
    .bind(provider)
    .bind(subject)
    .bind(sid)
    .fetch_all(db)
    .await
}

/// Records a back-channel logout token's `jti`; false when it was already used.
pub async fn record_logout_jti(
    db: impl PgExecutor<'_>,
    provider: &str,
    jti: &str,
    expires_ts: i64,
) -> sqlx::Result<bool> {
    Ok(sqlx::query(
        "INSERT INTO sso_logout_jtis (provider, jti, expires_ts) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
    )
    .bind(provider)
    .bind(jti)
    .bind(expires_ts)
    .execute(db)
    .await?
    .rows_affected()
        == 1)
}

// ---------------------------------------------------------------- external IDs and e-mail

pub async fn user_by_external_id(
    db: impl PgExecutor<'_>,
    provider: &str,
    external_id: &str,
) -> sqlx::Result<Option<String>> {
    sqlx::query_scalar("SELECT user_id FROM user_external_ids WHERE auth_provider = $1 AND external_id = $2")
        .bind(provider)
        .bind(external_id)
        .fetch_optional(db)
        .await
}

/// Links a provider identity to an account. False when the identity is already linked (to
/// anyone).
pub async fn link_external_id(
    db: impl PgExecutor<'_>,
    provider: &str,
    external_id: &str,
    user_id: &str,
) -> sqlx::Result<bool> {
    Ok(sqlx::query(
        "INSERT INTO user_external_ids (auth_provider, external_id, user_id, created_ts) VALUES ($1, $2, $3, $4)
         ON CONFLICT DO NOTHING",
    )
    .bind(provider)
    .bind(external_id)
    .bind(user_id)
    .bind(now_ms())
    .execute(db)
    .await?
    .rows_affected()
        == 1)
}

#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalId {
    pub auth_provider: String,
    pub external_id: String,
}

pub async fn external_ids(db: impl PgExecutor<'_>, user_id: &str) -> sqlx::Result<Vec<ExternalId>> {
    sqlx::query_as(
        "SELECT auth_provider, external_id FROM user_external_ids WHERE user_id = $1 ORDER BY auth_provider, external_id",
    )
    .bind(user_id)
    .fetch_all(db)
    .await
}

/// Replaces a user's external IDs (admin API). Fails on an ID linked to someone else.
pub async fn set_external_ids(
    db: &mut PgConnection,
    user_id: &str,
    ids: &[ExternalId],
) -> sqlx::Result<Result<(), String>> {
    sqlx::query("DELETE FROM user_external_ids WHERE user_id = $1").bind(user_id).execute(&mut *db).await?;
    for id in ids {
        if !link_external_id(&mut *db, &id.auth_provider, &id.external_id, user_id).await? {
            return Ok(Err(format!("{}/{} is linked to another user", id.auth_provider, id.external_id)));
        }
    }
    Ok(Ok(()))
}

pub async fn has_external_id(db: impl PgExecutor<'_>, user_id: &str) -> sqlx::Result<bool> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM user_external_ids WHERE user_id = $1)")
        .bind(user_id)
        .fetch_one(db)
        .await
}

pub async fn user_by_email(db: impl PgExecutor<'_>, address: &str) -> sqlx::Result<Option<String>> {
    sqlx::query_scalar("SELECT user_id FROM user_threepids WHERE medium = 'email' AND address = $1")
        .bind(address)
        .fetch_optional(db)
        .await
}

#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct Threepid {
    pub medium: String,
    pub address: String,
    pub validated_at: i64,
    pub added_at: i64,
}

pub async fn threepids(db: impl PgExecutor<'_>, user_id: &str) -> sqlx::Result<Vec<Threepid>> {
    sqlx::query_as(
        "SELECT medium, address, validated_ts AS validated_at, added_ts AS added_at FROM user_threepids
         WHERE user_id = $1 ORDER BY medium, address",
    )
    .bind(user_id)
    .fetch_all(db)
    .await
}

/// Makes `address` the user's one provider-asserted e-mail. False when the address belongs to
/// another account (it is then left where it is).
pub async fn set_email(db: &mut PgConnection, user_id: &str, address: &str) -> sqlx::Result<bool> {
    let owner: Option<String> =
        sqlx::query_scalar("SELECT user_id FROM user_threepids WHERE medium = 'email' AND address = $1")
            .bind(address)
            .fetch_optional(&mut *db)
            .await?;
    match owner.as_deref() {
        Some(o) if o == user_id => return Ok(true),
        Some(_) => return Ok(false),
        None => {}
    }
    sqlx::query("DELETE FROM user_threepids WHERE user_id = $1 AND medium = 'email'")
        .bind(user_id)
        .execute(&mut *db)
        .await?;
    let now = now_ms();
    let inserted = sqlx::query(
        "INSERT INTO user_threepids (medium, address, user_id, validated_ts, added_ts) VALUES ('email', $1, $2, $3, $3)
         ON CONFLICT DO NOTHING",
    )
    .bind(address)
    .bind(user_id)
    .bind(now)
    .execute(&mut *db)
    .await?
    .rows_affected();
    Ok(inserted == 1)
}

pub async fn clear_email(db: impl PgExecutor<'_>, user_id: &str) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM user_threepids WHERE user_id = $1 AND medium = 'email'").bind(user_id).execute(db).await?;
    Ok(())
}

/// Removes what expired: authorization requests, login tokens, logout `jti`s.
pub async fn delete_expired(db: &sqlx::PgPool) -> sqlx::Result<u64> {
    let now = now_ms();
    let mut n = 0;
    for sql in [
        "DELETE FROM sso_auth_sessions WHERE expires_ts < $1",
        "DELETE FROM sso_login_tokens WHERE expires_ts < $1",
        "DELETE FROM sso_logout_jtis WHERE expires_ts < $1",
    ] {
        n += sqlx::query(sql).bind(now).execute(db).await?.rows_affected();
    }
    Ok(n)
}
