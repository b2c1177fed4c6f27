//! `users`: local accounts.

use sqlx::{PgExecutor, PgPool};

use super::now_ms;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UserRow {
    pub user_id: String,
    pub localpart: String,
    pub password_hash: Option<String>,
    pub is_admin: bool,
    pub user_type: Option<String>,
    pub deactivated: bool,
    pub created_ts: i64,
}

pub struct NewUser<'a> {
    pub user_id: &'a str,
    pub localpart: &'a str,
    pub password_hash: Option<&'a str>,
    pub is_admin: bool,
    pub user_type: Option<&'a str>,
    pub displayname: Option<&'a str>,
}

/// Inserts the user and their profile. Returns `false` when the user ID is taken.
pub async fn insert(tx: &mut sqlx::PgConnection, u: &NewUser<'_>) -> sqlx::Result<bool> {
    let inserted = sqlx::query(
        "INSERT INTO users (user_id, localpart, password_hash, is_admin, user_type, created_ts)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
    )
    .bind(u.user_id)
    .bind(u.localpart)
    .bind(u.password_hash)
    .bind(u.is_admin)
    .bind(u.user_type)
    .bind(now_ms())
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1;
    if inserted {
        let fields = match u.displayname {
            Some(d) => serde_json::json!({ "displayname": d }),
            None => serde_json::json!({}),
        };
        sqlx::query("INSERT INTO profiles (user_id, fields) VALUES ($1, $2)")
            .bind(u.user_id)
            .bind(fields)
            .execute(&mut *tx)
            .await?;
    }
    Ok(inserted)
}

pub async fn get(db: impl PgExecutor<'_>, user_id: &str) -> sqlx::Result<Option<UserRow>> {
    sqlx::query_as("SELECT * FROM users WHERE user_id = $1").bind(user_id).fetch_optional(db).await
}

pub async fn exists(pool: &PgPool, user_id: &str) -> sqlx::Result<bool> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM users WHERE user_id = $1)").bind(user_id).fetch_one(pool).await
}

pub async fn set_password_hash(db: impl PgExecutor<'_>, user_id: &str, hash: Option<&str>) -> sqlx::Result<()> {
    sqlx::query("UPDATE users SET password_hash = $2 WHERE user_id = $1").bind(user_id).bind(hash).execute(db).await?;
    Ok(())
}

/// Marks the account deactivated; devices and tokens are removed by the caller in the same
/// transaction. The password hash is kept: login checks the password before saying that the
/// account is deactivated, so that only its owner learns it.
pub async fn deactivate(db: impl PgExecutor<'_>, user_id: &str) -> sqlx::Result<()> {
    sqlx::query("UPDATE users SET deactivated = TRUE WHERE user_id = $1").bind(user_id).execute(db).await?;
    Ok(())
}

pub async fn set_admin(db: impl PgExecutor<'_>, user_id: &str, admin: bool) -> sqlx::Result<()> {
    sqlx::query("UPDATE users SET is_admin = $2 WHERE user_id = $1").bind(user_id).bind(admin).execute(db).await?;
    Ok(())
}
