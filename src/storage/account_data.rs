//! `account_data`: per-user configuration, global (`room_id = ''`) or per room. Room tags live
//! here as `m.tag` and the fully-read marker as `m.fully_read`, the way sync delivers them.
//!
//! Every write takes the next `account_data_stream_seq` value under a stream-wide advisory lock,
//! so positions commit in order and `current_stream_position` never skips a row that commits
//! later.

use serde_json::Value;
use sqlx::types::Json;
use sqlx::{PgConnection, PgExecutor, PgPool};

/// Advisory lock serialising writers of the account data stream.
const STREAM_LOCK: i64 = 0x5061_7277_0000_0001;

/// One piece of account data as sync delivers it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AccountDataRow {
    /// `None` for global account data.
    pub room_id: Option<String>,
    pub data_type: String,
    pub content: Json<Value>,
    pub stream_ordering: i64,
}

async fn lock_stream(conn: &mut PgConnection) -> sqlx::Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(STREAM_LOCK).execute(conn).await?;
    Ok(())
}

/// The content stored for `(user, room, type)`; `room_id = None` for global account data.
pub async fn get(
    db: impl PgExecutor<'_>,
    user_id: &str,
    room_id: Option<&str>,
    data_type: &str,
) -> sqlx::Result<Option<Value>> {
    let row: Option<(Json<Value>,)> =
        sqlx::query_as("SELECT content FROM account_data WHERE user_id = $1 AND room_id = $2 AND data_type = $3")
            .bind(user_id)
            .bind(room_id.unwrap_or(""))
            .bind(data_type)
            .fetch_optional(db)
            .await?;
    Ok(row.map(|(j,)| j.0))
}

/// Replaces the content of `(user, room, type)`. Returns its new stream position.
pub async fn set(
    db: &PgPool,
    user_id: &str,
    room_id: Option<&str>,
    data_type: &str,
    content: &Value,
) -> sqlx::Result<i64> {
    let mut tx = db.begin().await?;
    lock_stream(&mut tx).await?;
    let pos = upsert(&mut tx, user_id, room_id, data_type, content).await?;
    tx.commit().await?;
    Ok(pos)
}

/// Sets one tag in the room's `m.tag` content (`{"tags": {tag: content}}`), keeping the others.
/// Done in one statement so concurrent tag changes cannot overwrite each other.
pub async fn set_tag(db: &PgPool, user_id: &str, room_id: &str, tag: &str, content: &Value) -> sqlx::Result<i64> {
    let mut tx = db.begin().await?;
    lock_stream(&mut tx).await?;
    let pos = sqlx::query_scalar(
        "INSERT INTO account_data (user_id, room_id, data_type, content, stream_ordering)
         VALUES ($1, $2, 'm.tag', jsonb_build_object('tags', jsonb_build_object($3::text, $4::jsonb)),
                 nextval('account_data_stream_seq'))
         ON CONFLICT (user_id, room_id, data_type) DO UPDATE
           SET content = jsonb_set(account_data.content, '{tags}',
                 CASE WHEN jsonb_typeof(account_data.content -> 'tags') = 'object'
                      THEN account_data.content -> 'tags' ELSE '{}'::jsonb END
                 || jsonb_build_object($3::text, $4::jsonb)),
               stream_ordering = EXCLUDED.stream_ordering
         RETURNING stream_ordering",
    )
    .bind(user_id)
    .bind(room_id)
    .bind(tag)
    .bind(Json(content))
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(pos)
}

/// Removes one tag from the room's `m.tag` content. Returns the new stream position, or `None`
/// if the tag was not set (nothing changed, so sync has nothing to deliver).
pub async fn remove_tag(db: &PgPool, user_id: &str, room_id: &str, tag: &str) -> sqlx::Result<Option<i64>> {
    let mut tx = db.begin().await?;
    lock_stream(&mut tx).await?;
    let pos = sqlx::query_scalar(
        "UPDATE account_data
           SET content = jsonb_set(content, '{tags}', (content -> 'tags') - $3::text),
               stream_ordering = nextval('account_data_stream_seq')
         WHERE user_id = $1 AND room_id = $2 AND data_type = 'm.tag'
           AND jsonb_typeof(content -> 'tags') = 'object' AND (content -> 'tags') ? $3::text
         RETURNING stream_ordering",
    )
    .bind(user_id)
    .bind(room_id)
    .bind(tag)
    .fetch_optional(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(pos)
}

/// Everything (global and per room) of `user_id` written after stream position `since`, oldest
/// first. Rows may be newer than a `current_stream_position` read before: sync should advance
/// its token to the highest `stream_ordering` it delivers.
pub async fn changed_since(db: impl PgExecutor<'_>, user_id: &str, since: i64) -> sqlx::Result<Vec<AccountDataRow>> {
    sqlx::query_as(
        "SELECT NULLIF(room_id, '') AS room_id, data_type, content, stream_ordering FROM account_data
         WHERE user_id = $1 AND stream_ordering > $2 ORDER BY stream_ordering",
    )
    .bind(user_id)
    .bind(since)
    .fetch_all(db)
    .await
}

/// The highest committed position of the account data stream (0 when empty).
pub async fn current_stream_position(db: impl PgExecutor<'_>) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT COALESCE(MAX(stream_ordering), 0) FROM account_data").fetch_one(db).await
}

/// Read-modify-write of one piece of account data, safe against concurrent writers: under the
/// stream lock (taken first, so two writers racing to create the row cannot both see it absent)
/// the current content is read `FOR UPDATE` and handed to `change`. If `change` returns new
/// content it is stored with the next stream position, which is returned; `Ok(None)` from
/// `change` leaves everything as it was (no position is taken). An error from `change` rolls back.
pub async fn update<E: From<sqlx::Error>>(
    db: &PgPool,
    user_id: &str,
    room_id: Option<&str>,
    data_type: &str,
    change: impl FnOnce(Option<Value>) -> Result<Option<Value>, E>,
) -> Result<Option<i64>, E> {
    let mut tx = db.begin().await?;
    lock_stream(&mut tx).await?;
    let current: Option<(Json<Value>,)> = sqlx::query_as(
        "SELECT content FROM account_data WHERE user_id = $1 AND room_id = $2 AND data_type = $3 FOR UPDATE",
    )
    .bind(user_id)
    .bind(room_id.unwrap_or(""))
    .bind(data_type)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(content) = change(current.map(|(j,)| j.0))? else {
        return Ok(None);
    };
    let pos = upsert(&mut tx, user_id, room_id, data_type, &content).await?;
    tx.commit().await?;
    Ok(Some(pos))
}

/// Writes one entry with the next stream position (the caller holds the stream lock).
async fn upsert(
    conn: &mut sqlx::PgConnection,
    user_id: &str,
    room_id: Option<&str>,
    data_type: &str,
    content: &Value,
) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "INSERT INTO account_data (user_id, room_id, data_type, content, stream_ordering)
         VALUES ($1, $2, $3, $4, nextval('account_data_stream_seq'))
         ON CONFLICT (user_id, room_id, data_type) DO UPDATE
           SET content = EXCLUDED.content, stream_ordering = EXCLUDED.stream_ordering
         RETURNING stream_ordering",
    )
    .bind(user_id)
    .bind(room_id.unwrap_or(""))
    .bind(data_type)
    .bind(Json(content))
    .fetch_one(conn)
    .await
}

/// Global account data of several users for the given types, in one query:
/// `(user_id, data_type, content)` for the rows that exist.
pub async fn global_for_users(
    db: impl PgExecutor<'_>,
    user_ids: &[String],
    data_types: &[&str],
) -> sqlx::Result<Vec<(String, String, Json<Value>)>> {
    sqlx::query_as(
        "SELECT user_id, data_type, content FROM account_data
         WHERE user_id = ANY($1) AND room_id = '' AND data_type = ANY($2)",
    )
    .bind(user_ids)
    .bind(data_types)
    .fetch_all(db)
    .await
}

/// Every piece of account data a user keeps for one room (deleted ones, stored as empty
/// content, left out), as `(type, content)`.
pub async fn room_all(
    db: impl PgExecutor<'_>,
    user_id: &str,
    room_id: &str,
) -> sqlx::Result<Vec<(String, Json<Value>)>> {
    sqlx::query_as(
        "SELECT data_type, content FROM account_data
         WHERE user_id = $1 AND room_id = $2 AND content <> '{}'::jsonb ORDER BY data_type",
    )
    .bind(user_id)
    .bind(room_id)
    .fetch_all(db)
    .await
}
