//! `receipts`: the latest receipt per (room, user, receipt type, thread).
//!
//! Like account data, writes are serialised per stream (advisory lock) so that
//! `current_stream_position` is a safe watermark for sync.

use sqlx::{PgExecutor, PgPool};

use super::now_ms;

/// Advisory lock serialising writers of the receipt stream.
const STREAM_LOCK: i64 = 0x5061_7277_0000_0002;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ReceiptRow {
    pub room_nid: i64,
    pub user_id: String,
    pub receipt_type: String,
    /// `None` for an unthreaded receipt.
    pub thread_id: Option<String>,
    pub event_id: String,
    pub ts: i64,
    pub stream_ordering: i64,
}

pub struct NewReceipt<'a> {
    pub room_nid: i64,
    pub user_id: &'a str,
    pub receipt_type: &'a str,
    pub thread_id: Option<&'a str>,
    pub event_id: &'a str,
    /// The receipted event's event-stream position.
    pub event_stream: i64,
}

/// Records receipts in one transaction (one stream lock, one commit), in order: the stream
/// position of each, or `None` where it was ignored because the user's existing receipt of that
/// type and thread is for the same or a later event (receipts only move forwards, as in Synapse;
/// a later receipt of the same user, type and thread in the batch sees the earlier ones).
pub async fn upsert_batch(db: &PgPool, receipts: &[NewReceipt<'_>]) -> sqlx::Result<Vec<Option<i64>>> {
    let mut tx = db.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(STREAM_LOCK).execute(&mut *tx).await?;
    let mut out = Vec::with_capacity(receipts.len());
    for r in receipts {
        let pos = sqlx::query_scalar(
            "INSERT INTO receipts (room_nid, user_id, receipt_type, thread_id, event_id, event_stream, ts, stream_ordering)
             VALUES ($1, $2, $3, $4, $5, $6, $7, nextval('receipt_stream_seq'))
             ON CONFLICT (room_nid, user_id, receipt_type, thread_id) DO UPDATE
               SET event_id = EXCLUDED.event_id, event_stream = EXCLUDED.event_stream, ts = EXCLUDED.ts,
                   stream_ordering = EXCLUDED.stream_ordering
               WHERE receipts.event_stream < EXCLUDED.event_stream
             RETURNING stream_ordering",
        )
        .bind(r.room_nid)
        .bind(r.user_id)
        .bind(r.receipt_type)
        .bind(r.thread_id.unwrap_or(""))
        .bind(r.event_id)
        .bind(r.event_stream)
        .bind(now_ms())
        .fetch_optional(&mut *tx)
        .await?;
        out.push(pos);
    }
    tx.commit().await?;
    Ok(out)
}

/// Receipts in the given rooms written after stream position `since`, oldest first, as
/// `viewer` may see them: `m.read.private` receipts only of `viewer` themself.
pub async fn for_rooms_since(
    db: impl PgExecutor<'_>,
    room_nids: &[i64],
    viewer: &str,
    since: i64,
) -> sqlx::Result<Vec<ReceiptRow>> {
    sqlx::query_as(
        "SELECT room_nid, user_id, receipt_type, NULLIF(thread_id, '') AS thread_id, event_id, ts, stream_ordering
         FROM receipts
         WHERE room_nid = ANY($1) AND stream_ordering > $2
           AND (receipt_type <> 'm.read.private' OR user_id = $3)
         ORDER BY stream_ordering",
    )
    .bind(room_nids)
    .bind(since)
    .bind(viewer)
    .fetch_all(db)
    .await
}

/// The receipt of `user_id` of one type and thread (`None`: unthreaded) in a room.
pub async fn get(
    db: impl PgExecutor<'_>,
    room_nid: i64,
    user_id: &str,
    receipt_type: &str,
    thread_id: Option<&str>,
) -> sqlx::Result<Option<ReceiptRow>> {
    sqlx::query_as(
        "SELECT room_nid, user_id, receipt_type, NULLIF(thread_id, '') AS thread_id, event_id, ts, stream_ordering
         FROM receipts WHERE room_nid = $1 AND user_id = $2 AND receipt_type = $3 AND thread_id = $4",
    )
    .bind(room_nid)
    .bind(user_id)
    .bind(receipt_type)
    .bind(thread_id.unwrap_or(""))
    .fetch_optional(db)
    .await
}

/// The highest committed position of the receipt stream (0 when empty).
pub async fn current_stream_position(db: impl PgExecutor<'_>) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT COALESCE(MAX(stream_ordering), 0) FROM receipts").fetch_one(db).await
}

/// The relation of an event, `(rel_type, relates_to)`, to check a receipt's `thread_id`.
pub async fn relation_of(db: impl PgExecutor<'_>, event_nid: i64) -> sqlx::Result<(Option<String>, Option<String>)> {
    sqlx::query_as("SELECT rel_type, relates_to FROM events WHERE event_nid = $1").bind(event_nid).fetch_one(db).await
}
