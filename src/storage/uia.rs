//! `uia_sessions`: user-interactive authentication progress.

use sqlx::PgExecutor;

use super::now_ms;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UiaSession {
    pub session_id: String,
    pub purpose: String,
    pub user_id: Option<String>,
    pub completed: sqlx::types::Json<Vec<String>>,
    pub registration_token: Option<String>,
    pub created_ts: i64,
    /// SHA-256 of the request that started the session (see `auth::uia::RequestBinding`);
    /// `None` for registration and for sessions from before migration 0012.
    pub request_hash: Option<Vec<u8>>,
}

pub async fn create(
    db: impl PgExecutor<'_>,
    session_id: &str,
    purpose: &str,
    user_id: Option<&str>,
    request_hash: Option<&[u8]>,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO uia_sessions (session_id, purpose, user_id, created_ts, request_hash) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(session_id)
    .bind(purpose)
    .bind(user_id)
    .bind(now_ms())
    .bind(request_hash)
    .execute(db)
    .await?;
    Ok(())
}

/// The session, if it exists and was created after `min_created_ts`.
pub async fn get(db: impl PgExecutor<'_>, session_id: &str, min_created_ts: i64) -> sqlx::Result<Option<UiaSession>> {
    sqlx::query_as("SELECT * FROM uia_sessions WHERE session_id = $1 AND created_ts >= $2")
        .bind(session_id)
        .bind(min_created_ts)
        .fetch_optional(db)
        .await
}

/// Records a completed stage (idempotently) and, for the token stage, the token used.
pub async fn complete_stage(
    db: impl PgExecutor<'_>,
    session_id: &str,
    stage: &str,
    registration_token: Option<&str>,
) -> sqlx::Result<Vec<String>> {
    let (completed,): (sqlx::types::Json<Vec<String>>,) = sqlx::query_as(
        "UPDATE uia_sessions
         SET completed = CASE WHEN completed ? $2 THEN completed ELSE completed || to_jsonb($2::text) END,
             registration_token = COALESCE($3, registration_token)
         WHERE session_id = $1 RETURNING completed",
    )
    .bind(session_id)
    .bind(stage)
    .bind(registration_token)
    .fetch_one(db)
    .await?;
    Ok(completed.0)
}

pub async fn delete(db: impl PgExecutor<'_>, session_id: &str) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM uia_sessions WHERE session_id = $1").bind(session_id).execute(db).await?;
    Ok(())
}

/// Housekeeping: drops sessions older than `before_ts`.
pub async fn delete_expired(db: impl PgExecutor<'_>, before_ts: i64) -> sqlx::Result<u64> {
    Ok(sqlx::query("DELETE FROM uia_sessions WHERE created_ts < $1").bind(before_ts).execute(db).await?.rows_affected())
}
