//! `pushers`: where to deliver push notifications for a user.

use serde_json::Value;
use sqlx::PgExecutor;

use super::now_ms;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PusherRow {
    pub app_id: String,
    pub pushkey: String,
    pub kind: String,
    pub app_display_name: String,
    pub device_display_name: String,
    pub profile_tag: Option<String>,
    pub lang: String,
    pub data: sqlx::types::Json<Value>,
}

pub struct NewPusher<'a> {
    pub user_id: &'a str,
    pub device_id: &'a str,
    pub row: &'a PusherRow,
}

pub async fn list(db: impl PgExecutor<'_>, user_id: &str) -> sqlx::Result<Vec<PusherRow>> {
    sqlx::query_as(
        "SELECT app_id, pushkey, kind, app_display_name, device_display_name, profile_tag, lang, data
         FROM pushers WHERE user_id = $1 ORDER BY created_ts",
    )
    .bind(user_id)
    .fetch_all(db)
    .await
}

/// Creates or replaces the user's pusher for (app_id, pushkey). Unless `append`, the same
/// (app_id, pushkey) registered by other users is removed, as the spec asks.
pub async fn upsert(db: &sqlx::PgPool, p: &NewPusher<'_>, append: bool) -> sqlx::Result<()> {
    let mut tx = db.begin().await?;
    if !append {
        sqlx::query("DELETE FROM pushers WHERE app_id = $1 AND pushkey = $2 AND user_id <> $3")
            .bind(&p.row.app_id)
            .bind(&p.row.pushkey)
            .bind(p.user_id)
            .execute(&mut *tx)
            .await?;
    }
    // A new pusher delivers what notifies from now on: its position starts at the user's newest
    // notification. A replaced one keeps its position.
    sqlx::query(
        "INSERT INTO pushers (user_id, device_id, app_id, pushkey, kind, app_display_name, device_display_name,
                              profile_tag, lang, data, created_ts, last_stream_ordering)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11,
                 (SELECT COALESCE(MAX(stream_ordering), 0) FROM event_push_actions WHERE user_id = $1))
         ON CONFLICT (app_id, pushkey, user_id) DO UPDATE SET device_id = EXCLUDED.device_id, kind = EXCLUDED.kind,
           app_display_name = EXCLUDED.app_display_name, device_display_name = EXCLUDED.device_display_name,
           profile_tag = EXCLUDED.profile_tag, lang = EXCLUDED.lang, data = EXCLUDED.data",
    )
    .bind(p.user_id)
    .bind(p.device_id)
    .bind(&p.row.app_id)
    .bind(&p.row.pushkey)
    .bind(&p.row.kind)
    .bind(&p.row.app_display_name)
    .bind(&p.row.device_display_name)
    .bind(&p.row.profile_tag)
    .bind(&p.row.lang)
    .bind(&p.row.data)
    .bind(now_ms())
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

pub async fn delete(db: impl PgExecutor<'_>, user_id: &str, app_id: &str, pushkey: &str) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM pushers WHERE user_id = $1 AND app_id = $2 AND pushkey = $3")
        .bind(user_id)
        .bind(app_id)
        .bind(pushkey)
        .execute(db)
        .await?;
    Ok(())
}

/// An HTTP pusher with its owner, for delivery.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UserPusher {
    pub user_id: String,
    /// When the pusher was registered (ms since the epoch).
    pub created_ts: i64,
    /// Every notification up to this event-stream position was delivered or given up.
    pub last_stream_ordering: i64,
    #[sqlx(flatten)]
    pub row: PusherRow,
}

/// The HTTP pushers of several users, in one query.
pub async fn http_for_users(db: impl PgExecutor<'_>, user_ids: &[String]) -> sqlx::Result<Vec<UserPusher>> {
    sqlx::query_as(
        "SELECT user_id, created_ts, last_stream_ordering, app_id, pushkey, kind, app_display_name,
                device_display_name, profile_tag, lang, data
         FROM pushers WHERE user_id = ANY($1) AND kind = 'http'",
    )
    .bind(user_ids)
    .fetch_all(db)
    .await
}

/// Records that a pusher's notifications up to `position` were delivered or given up.
pub async fn advance_position(
    db: impl PgExecutor<'_>,
    user_id: &str,
    app_id: &str,
    pushkey: &str,
    position: i64,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE pushers SET last_stream_ordering = $4
         WHERE user_id = $1 AND app_id = $2 AND pushkey = $3 AND last_stream_ordering < $4",
    )
    .bind(user_id)
    .bind(app_id)
    .bind(pushkey)
    .bind(position)
    .execute(db)
    .await?;
    Ok(())
}

/// A notification an HTTP pusher has not delivered yet (above its position).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Undelivered {
    pub user_id: String,
    pub app_id: String,
    pub pushkey: String,
    pub stream_ordering: i64,
    pub event_nid: i64,
    pub highlight: bool,
    pub actions: sqlx::types::Json<Value>,
    pub ts: i64,
}

/// Notifications generated before `before` (ms) that HTTP pushers have not delivered, oldest
/// first, at most `per_pusher` for each pusher (one index range scan per pusher).
pub async fn undelivered(db: impl PgExecutor<'_>, before: i64, per_pusher: i64) -> sqlx::Result<Vec<Undelivered>> {
    sqlx::query_as(
        "SELECT p.user_id, p.app_id, p.pushkey, a.stream_ordering, a.event_nid, a.highlight, a.actions, a.ts
         FROM pushers p
         CROSS JOIN LATERAL (
             SELECT stream_ordering, event_nid, highlight, actions, ts FROM event_push_actions
             WHERE user_id = p.user_id AND stream_ordering > p.last_stream_ordering AND notify AND ts < $1
             ORDER BY stream_ordering LIMIT $2
         ) a
         WHERE p.kind = 'http'
         ORDER BY a.stream_ordering",
    )
    .bind(before)
    .bind(per_pusher)
    .fetch_all(db)
    .await
}
