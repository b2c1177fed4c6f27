//! `profiles`: displayname, avatar_url and custom profile fields, as one JSON object per user.

use serde_json::{Map, Value};
use sqlx::PgExecutor;

/// The profile of a local user, or `None` if the user does not exist.
pub async fn get(db: impl PgExecutor<'_>, user_id: &str) -> sqlx::Result<Option<Map<String, Value>>> {
    let row: Option<(sqlx::types::Json<Map<String, Value>>,)> =
        sqlx::query_as("SELECT fields FROM profiles WHERE user_id = $1").bind(user_id).fetch_optional(db).await?;
    Ok(row.map(|(j,)| j.0))
}

/// Sets (or, with `None`, removes) one field. Returns the whole profile afterwards, or `None` if
/// the user has no profile row.
pub async fn set_field(
    db: impl PgExecutor<'_>,
    user_id: &str,
    key: &str,
    value: Option<&Value>,
) -> sqlx::Result<Option<Map<String, Value>>> {
    let row: Option<(sqlx::types::Json<Map<String, Value>>,)> = match value {
        Some(v) => {
            sqlx::query_as(
                "UPDATE profiles SET fields = jsonb_set(fields, ARRAY[$2], $3) WHERE user_id = $1 RETURNING fields",
            )
            .bind(user_id)
            .bind(key)
            .bind(sqlx::types::Json(v))
            .fetch_optional(db)
            .await?
        }
        None => {
            sqlx::query_as("UPDATE profiles SET fields = fields - $2 WHERE user_id = $1 RETURNING fields")
                .bind(user_id)
                .bind(key)
                .fetch_optional(db)
                .await?
        }
    };
    Ok(row.map(|(j,)| j.0))
}

/// Removes every field (account erasure on deactivation).
pub async fn clear(db: impl PgExecutor<'_>, user_id: &str) -> sqlx::Result<()> {
    sqlx::query("UPDATE profiles SET fields = '{}'::jsonb WHERE user_id = $1").bind(user_id).execute(db).await?;
    Ok(())
}
