//! `user_filters`: filters uploaded by clients. The filter ID handed out is the row number.

use serde_json::Value;
use sqlx::PgExecutor;

pub async fn insert(db: impl PgExecutor<'_>, user_id: &str, filter: &Value) -> sqlx::Result<i64> {
    sqlx::query_scalar("INSERT INTO user_filters (user_id, filter) VALUES ($1, $2) RETURNING filter_nid")
        .bind(user_id)
        .bind(sqlx::types::Json(filter))
        .fetch_one(db)
        .await
}

/// The filter, if it exists and belongs to `user_id`.
pub async fn get(db: impl PgExecutor<'_>, user_id: &str, filter_nid: i64) -> sqlx::Result<Option<Value>> {
    let row: Option<(sqlx::types::Json<Value>,)> =
        sqlx::query_as("SELECT filter FROM user_filters WHERE filter_nid = $1 AND user_id = $2")
            .bind(filter_nid)
            .bind(user_id)
            .fetch_optional(db)
            .await?;
    Ok(row.map(|(j,)| j.0))
}
