//! `media`, `media_thumbnails`, `media_url_previews`: metadata of the media repository. The
//! content itself is in the media store (`crate::media::store`); a row points at it through
//! `storage_key` and is written only once the content is durably there.

use serde_json::Value;
use sqlx::{PgExecutor, PgPool};

const COLUMNS: &str =
    "server_name, media_id, uploader, content_type, upload_name, size, sha256, storage_key, created_ts,
     pending_expires_ts, last_access_ts, quarantined_by, quarantined_ts, allow_unauthenticated, scan_verdict";

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct MediaRow {
    pub server_name: String,
    pub media_id: String,
    pub uploader: Option<String>,
    pub content_type: Option<String>,
    pub upload_name: Option<String>,
    pub size: Option<i64>,
    pub sha256: Option<Vec<u8>>,
    /// `None` while the row is a reservation whose content has not arrived.
    pub storage_key: Option<String>,
    pub created_ts: i64,
    pub pending_expires_ts: Option<i64>,
    pub last_access_ts: i64,
    pub quarantined_by: Option<String>,
    pub quarantined_ts: Option<i64>,
    pub allow_unauthenticated: bool,
    pub scan_verdict: Option<String>,
}

/// Stored content, as recorded when it is published.
pub struct Content<'a> {
    pub content_type: &'a str,
    pub upload_name: Option<&'a str>,
    pub size: i64,
    pub sha256: &'a [u8],
    pub storage_key: &'a str,
}

/// Why publishing new content failed.
#[derive(Debug, PartialEq, Eq)]
pub enum PublishError {
    /// The user's quota would be exceeded.
    OverQuota,
    /// The media ID exists already (a reservation already filled, or a clash).
    Exists,
    /// No such reservation, or it expired.
    NotFound,
    /// The reservation belongs to another user.
    NotOwner,
}

pub async fn get(db: impl PgExecutor<'_>, server_name: &str, media_id: &str) -> sqlx::Result<Option<MediaRow>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM media WHERE server_name = $1 AND media_id = $2")))
        .bind(server_name)
        .bind(media_id)
        .fetch_optional(db)
        .await
}

/// Takes the per-user lock under which quota checks and inserts are serialised, then checks that
/// `extra` more bytes fit in `quota` (0: no quota).
async fn check_quota(tx: &mut sqlx::PgConnection, uploader: &str, quota: i64, extra: i64) -> sqlx::Result<bool> {
    if quota <= 0 {
        return Ok(true);
    }
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('parvis media quota ' || $1, 0))")
        .bind(uploader)
        .execute(&mut *tx)
        .await?;
    let used: i64 =
        sqlx::query_scalar("SELECT COALESCE(SUM(size), 0)::BIGINT FROM media WHERE uploader = $1 AND size IS NOT NULL")
            .bind(uploader)
            .fetch_one(&mut *tx)
            .await?;
    Ok(used + extra <= quota)
}

/// Records new local content (a plain upload), within the uploader's quota.
#[allow(clippy::too_many_arguments)]
pub async fn insert_uploaded(
    db: &PgPool,
    server_name: &str,
    media_id: &str,
    uploader: &str,
    content: &Content<'_>,
    allow_unauthenticated: bool,
    quota: i64,
    now: i64,
) -> sqlx::Result<Result<(), PublishError>> {
    let mut tx = db.begin().await?;
    if !check_quota(&mut tx, uploader, quota, content.size).await? {
        return Ok(Err(PublishError::OverQuota));
    }
    let inserted = sqlx::query(
        "INSERT INTO media (server_name, media_id, uploader, content_type, upload_name, size, sha256, storage_key,
                            created_ts, last_access_ts, allow_unauthenticated)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, $10) ON CONFLICT DO NOTHING",
    )
    .bind(server_name)
    .bind(media_id)
    .bind(uploader)
    .bind(content.content_type)
    .bind(content.upload_name)
    .bind(content.size)
    .bind(content.sha256)
    .bind(content.storage_key)
    .bind(now)
    .bind(allow_unauthenticated)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if inserted == 0 {
        return Ok(Err(PublishError::Exists));
    }
    tx.commit().await?;
    Ok(Ok(()))
}

/// Records remote content fetched into the local cache (replacing an older copy).
pub async fn insert_remote(
    db: &PgPool,
    server_name: &str,
    media_id: &str,
    content: &Content<'_>,
    allow_unauthenticated: bool,
    now: i64,
) -> sqlx::Result<Option<String>> {
    // The key of a copy this one replaces, for the caller to delete.
    let old: Option<Option<String>> =
        sqlx::query_scalar("SELECT storage_key FROM media WHERE server_name = $1 AND media_id = $2")
            .bind(server_name)
            .bind(media_id)
            .fetch_optional(db)
            .await?;
    sqlx::query(
        "INSERT INTO media (server_name, media_id, content_type, upload_name, size, sha256, storage_key, created_ts,
                            last_access_ts, allow_unauthenticated)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $9)
         ON CONFLICT (server_name, media_id) DO UPDATE SET content_type = EXCLUDED.content_type,
           upload_name = EXCLUDED.upload_name, size = EXCLUDED.size, sha256 = EXCLUDED.sha256,
           storage_key = EXCLUDED.storage_key, last_access_ts = EXCLUDED.last_access_ts, scan_verdict = NULL",
    )
    .bind(server_name)
    .bind(media_id)
    .bind(content.content_type)
    .bind(content.upload_name)
    .bind(content.size)
    .bind(content.sha256)
    .bind(content.storage_key)
    .bind(now)
    .bind(allow_unauthenticated)
    .execute(db)
    .await?;
    Ok(old.flatten())
}

/// Reserves a media ID for an asynchronous upload, unless the user holds `max_pending` already.
#[allow(clippy::too_many_arguments)]
pub async fn reserve(
    db: &PgPool,
    server_name: &str,
    media_id: &str,
    uploader: &str,
    allow_unauthenticated: bool,
    now: i64,
    expires_ts: i64,
    max_pending: i64,
) -> sqlx::Result<bool> {
    let mut tx = db.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('parvis media quota ' || $1, 0))")
        .bind(uploader)
        .execute(&mut *tx)
        .await?;
    let pending: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM media WHERE uploader = $1 AND pending_expires_ts > $2")
        .bind(uploader)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
    if pending >= max_pending {
        return Ok(false);
    }
    sqlx::query(
        "INSERT INTO media (server_name, media_id, uploader, created_ts, pending_expires_ts, last_access_ts,
                            allow_unauthenticated)
         VALUES ($1, $2, $3, $4, $5, $4, $6)",
    )
    .bind(server_name)
    .bind(media_id)
    .bind(uploader)
    .bind(now)
    .bind(expires_ts)
    .bind(allow_unauthenticated)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// Fills a reservation with its content. Exactly one concurrent upload can win.
pub async fn fill_reservation(
    db: &PgPool,
    server_name: &str,
    media_id: &str,
    uploader: &str,
    content: &Content<'_>,
    quota: i64,
    now: i64,
) -> sqlx::Result<Result<(), PublishError>> {
    let mut tx = db.begin().await?;
    let row: Option<(Option<String>, Option<String>, Option<i64>)> = sqlx::query_as(
        "SELECT uploader, storage_key, pending_expires_ts FROM media
         WHERE server_name = $1 AND media_id = $2 FOR UPDATE",
    )
    .bind(server_name)
    .bind(media_id)
    .fetch_optional(&mut *tx)
    .await?;
    match row {
        None => return Ok(Err(PublishError::NotFound)),
        Some((owner, _, _)) if owner.as_deref() != Some(uploader) => return Ok(Err(PublishError::NotOwner)),
        Some((_, Some(_), _)) => return Ok(Err(PublishError::Exists)),
        Some((_, None, Some(expires))) if expires <= now => return Ok(Err(PublishError::NotFound)),
        Some(_) => {}
    }
    if !check_quota(&mut tx, uploader, quota, content.size).await? {
        return Ok(Err(PublishError::OverQuota));
    }
    sqlx::query(
        "UPDATE media SET content_type = $3, upload_name = $4, size = $5, sha256 = $6, storage_key = $7,
                          pending_expires_ts = NULL, created_ts = $8, last_access_ts = $8
         WHERE server_name = $1 AND media_id = $2",
    )
    .bind(server_name)
    .bind(media_id)
    .bind(content.content_type)
    .bind(content.upload_name)
    .bind(content.size)
    .bind(content.sha256)
    .bind(content.storage_key)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Ok(()))
}

/// Releases expired reservations; returns how many.
pub async fn delete_expired_reservations(db: impl PgExecutor<'_>, now: i64) -> sqlx::Result<u64> {
    Ok(sqlx::query("DELETE FROM media WHERE pending_expires_ts <= $1").bind(now).execute(db).await?.rows_affected())
}

pub async fn touch(db: impl PgExecutor<'_>, server_name: &str, media_id: &str, now: i64) -> sqlx::Result<()> {
    sqlx::query("UPDATE media SET last_access_ts = $3 WHERE server_name = $1 AND media_id = $2")
        .bind(server_name)
        .bind(media_id)
        .bind(now)
        .execute(db)
        .await?;
    Ok(())
}

/// Quarantines (`by` = the admin) or releases (`None`) a media item; false if it does not exist.
pub async fn set_quarantine(
    db: impl PgExecutor<'_>,
    server_name: &str,
    media_id: &str,
    by: Option<&str>,
    now: i64,
) -> sqlx::Result<bool> {
    let n = sqlx::query(
        "UPDATE media SET quarantined_by = $3, quarantined_ts = CASE WHEN $3::TEXT IS NULL THEN NULL ELSE $4 END
         WHERE server_name = $1 AND media_id = $2",
    )
    .bind(server_name)
    .bind(media_id)
    .bind(by)
    .bind(now)
    .execute(db)
    .await?
    .rows_affected();
    Ok(n > 0)
}

pub async fn set_scan_verdict(
    db: impl PgExecutor<'_>,
    server_name: &str,
    media_id: &str,
    verdict: &str,
) -> sqlx::Result<()> {
    sqlx::query("UPDATE media SET scan_verdict = $3 WHERE server_name = $1 AND media_id = $2")
        .bind(server_name)
        .bind(media_id)
        .bind(verdict)
        .execute(db)
        .await?;
    Ok(())
}

/// Deletes a media item's rows; returns the storage keys of its content and thumbnails, for the
/// caller to delete from the store, or `None` if there was no such item.
pub async fn delete(db: &PgPool, server_name: &str, media_id: &str) -> sqlx::Result<Option<Vec<String>>> {
    let mut tx = db.begin().await?;
    let mut keys: Vec<String> = sqlx::query_scalar(
        "DELETE FROM media_thumbnails WHERE server_name = $1 AND media_id = $2 RETURNING storage_key",
    )
    .bind(server_name)
    .bind(media_id)
    .fetch_all(&mut *tx)
    .await?;
    let row: Option<Option<String>> =
        sqlx::query_scalar("DELETE FROM media WHERE server_name = $1 AND media_id = $2 RETURNING storage_key")
            .bind(server_name)
            .bind(media_id)
            .fetch_optional(&mut *tx)
            .await?;
    tx.commit().await?;
    let Some(key) = row else { return Ok(None) };
    keys.extend(key);
    Ok(Some(keys))
}

/// Cached remote media not accessed since `before_ts`: `(server_name, media_id)`.
pub async fn remote_not_accessed_since(
    db: impl PgExecutor<'_>,
    before_ts: i64,
    limit: i64,
) -> sqlx::Result<Vec<(String, String)>> {
    sqlx::query_as(
        "SELECT server_name, media_id FROM media WHERE uploader IS NULL AND last_access_ts < $1
         ORDER BY last_access_ts LIMIT $2",
    )
    .bind(before_ts)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// A page of a user's uploads (Synapse's `order_by` columns), and their total count.
pub async fn list_by_uploader(
    db: &PgPool,
    uploader: &str,
    from: i64,
    limit: i64,
    order_by: &str,
    ascending: bool,
) -> sqlx::Result<(Vec<MediaRow>, i64)> {
    let column = match order_by {
        "media_id" => "media_id",
        "upload_name" => "upload_name",
        "media_length" => "size",
        "media_type" => "content_type",
        "last_access_ts" => "last_access_ts",
        "quarantined_by" => "quarantined_by",
        _ => "created_ts",
    };
    let dir = if ascending { "ASC" } else { "DESC" };
    let rows = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM media WHERE uploader = $1 AND storage_key IS NOT NULL
         ORDER BY {column} {dir} NULLS LAST, media_id {dir} OFFSET $2 LIMIT $3"
    )))
    .bind(uploader)
    .bind(from)
    .bind(limit)
    .fetch_all(db)
    .await?;
    let total = sqlx::query_scalar("SELECT COUNT(*) FROM media WHERE uploader = $1 AND storage_key IS NOT NULL")
        .bind(uploader)
        .fetch_one(db)
        .await?;
    Ok((rows, total))
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ThumbnailRow {
    pub content_type: String,
    pub size: i64,
    pub storage_key: String,
}

pub async fn get_thumbnail(
    db: impl PgExecutor<'_>,
    server_name: &str,
    media_id: &str,
    width: u32,
    height: u32,
    method: &str,
) -> sqlx::Result<Option<ThumbnailRow>> {
    sqlx::query_as(
        "SELECT content_type, size, storage_key FROM media_thumbnails
         WHERE server_name = $1 AND media_id = $2 AND width = $3 AND height = $4 AND method = $5",
    )
    .bind(server_name)
    .bind(media_id)
    .bind(width as i32)
    .bind(height as i32)
    .bind(method)
    .fetch_optional(db)
    .await
}

/// Records a generated thumbnail; false if one was recorded meanwhile (or the media is gone), in
/// which case the caller's copy is redundant.
#[allow(clippy::too_many_arguments)]
pub async fn insert_thumbnail(
    db: impl PgExecutor<'_>,
    server_name: &str,
    media_id: &str,
    width: u32,
    height: u32,
    method: &str,
    row: &ThumbnailRow,
    now: i64,
) -> sqlx::Result<bool> {
    let n = sqlx::query(
        "INSERT INTO media_thumbnails (server_name, media_id, width, height, method, content_type, size, storage_key,
                                       created_ts)
         SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9
         WHERE EXISTS (SELECT 1 FROM media WHERE server_name = $1 AND media_id = $2)
         ON CONFLICT DO NOTHING",
    )
    .bind(server_name)
    .bind(media_id)
    .bind(width as i32)
    .bind(height as i32)
    .bind(method)
    .bind(&row.content_type)
    .bind(row.size)
    .bind(&row.storage_key)
    .bind(now)
    .execute(db)
    .await?
    .rows_affected();
    Ok(n > 0)
}

/// A cached preview still fresh at `now`.
pub async fn get_preview(db: impl PgExecutor<'_>, url: &str, now: i64) -> sqlx::Result<Option<Value>> {
    let v: Option<sqlx::types::Json<Value>> =
        sqlx::query_scalar("SELECT og FROM media_url_previews WHERE url = $1 AND expires_ts > $2")
            .bind(url)
            .bind(now)
            .fetch_optional(db)
            .await?;
    Ok(v.map(|j| j.0))
}

pub async fn put_preview(
    db: impl PgExecutor<'_>,
    url: &str,
    og: &Value,
    now: i64,
    expires_ts: i64,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO media_url_previews (url, og, fetched_ts, expires_ts) VALUES ($1, $2, $3, $4)
         ON CONFLICT (url) DO UPDATE SET og = EXCLUDED.og, fetched_ts = EXCLUDED.fetched_ts,
           expires_ts = EXCLUDED.expires_ts",
    )
    .bind(url)
    .bind(sqlx::types::Json(og))
    .bind(now)
    .bind(expires_ts)
    .execute(db)
    .await?;
    Ok(())
}

pub async fn delete_expired_previews(db: impl PgExecutor<'_>, now: i64) -> sqlx::Result<u64> {
    Ok(sqlx::query("DELETE FROM media_url_previews WHERE expires_ts <= $1")
        .bind(now)
        .execute(db)
        .await?
        .rows_affected())
}
