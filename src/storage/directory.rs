//! The user directory, the public room directory and reports.

use serde_json::Value;
use sqlx::PgExecutor;

use super::now_ms;

/// Upserts a user's directory entry.
pub async fn upsert_user(
    db: impl PgExecutor<'_>,
    user_id: &str,
    display_name: Option<&str>,
    avatar_url: Option<&str>,
    search_text: &str,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO user_directory (user_id, display_name, avatar_url, search_text) VALUES ($1, $2, $3, $4)
         ON CONFLICT (user_id) DO UPDATE SET display_name = EXCLUDED.display_name,
           avatar_url = EXCLUDED.avatar_url, search_text = EXCLUDED.search_text",
    )
    .bind(user_id)
    .bind(display_name)
    .bind(avatar_url)
    .bind(search_text)
    .execute(db)
    .await?;
    Ok(())
}

pub async fn remove_user(db: impl PgExecutor<'_>, user_id: &str) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM user_directory WHERE user_id = $1").bind(user_id).execute(db).await?;
    Ok(())
}

/// Users matching every term (substring of the normalised text), visible to `searcher`: all
/// local users when `all_local`, else those sharing a joined room with the searcher or joined
/// to a published room. Exact user ID and prefix matches rank first.
pub async fn search_users(
    db: impl PgExecutor<'_>,
    searcher: &str,
    terms: &[String],
    all_local: bool,
    limit: i64,
) -> sqlx::Result<Vec<(String, Option<String>, Option<String>)>> {
    let patterns: Vec<String> = terms.iter().map(|t| format!("%{}%", t.replace(['%', '_', '\\'], ""))).collect();
    let first = terms.first().cloned().unwrap_or_default();
    sqlx::query_as(
        "SELECT d.user_id, d.display_name, d.avatar_url FROM user_directory d
         WHERE d.search_text LIKE ALL($2)
           AND ($3 OR d.user_id = $1 OR EXISTS (
                SELECT 1 FROM room_memberships a JOIN room_memberships b ON a.room_nid = b.room_nid
                WHERE a.user_id = $1 AND a.membership = 'join' AND b.user_id = d.user_id AND b.membership = 'join')
             OR EXISTS (
                SELECT 1 FROM room_memberships b JOIN rooms r ON r.room_nid = b.room_nid
                WHERE b.user_id = d.user_id AND b.membership = 'join' AND r.is_public))
         ORDER BY (d.search_text LIKE $4 || '%' OR d.search_text LIKE '% ' || $4 || '%'
                   OR d.search_text LIKE '@' || $4 || '%') DESC,
                  d.display_name NULLS LAST, d.user_id
         LIMIT $5",
    )
    .bind(searcher)
    .bind(&patterns)
    .bind(all_local)
    .bind(first)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// A published room with what the directory shows of it.
#[derive(Debug, sqlx::FromRow)]
pub struct PublicRoom {
    pub room_id: String,
    pub num_joined_members: i64,
    pub state: sqlx::types::Json<Value>,
}

/// Published rooms (at most `limit`), most members first, with their directory-relevant current
/// state as `{ "<type>": content }`.
pub async fn public_rooms(db: impl PgExecutor<'_>, limit: i64) -> sqlx::Result<Vec<PublicRoom>> {
    sqlx::query_as(
        "SELECT r.room_id,
                (SELECT count(*) FROM room_memberships m WHERE m.room_nid = r.room_nid AND m.membership = 'join') AS num_joined_members,
                coalesce((SELECT jsonb_object_agg(sk.event_type, e.json::jsonb -> 'content')
                          FROM current_state cs JOIN state_keys sk ON sk.key_nid = cs.key_nid
                          JOIN events e ON e.event_nid = cs.event_nid
                          WHERE cs.room_nid = r.room_nid AND sk.state_key = ''
                            AND sk.event_type IN ('m.room.name', 'm.room.topic', 'm.room.canonical_alias',
                                'm.room.avatar', 'm.room.join_rules', 'm.room.history_visibility',
                                'm.room.guest_access', 'm.room.create')), '{}'::jsonb) AS state
         FROM rooms r WHERE r.is_public
         ORDER BY num_joined_members DESC, r.room_id
         LIMIT $1",
    )
    .bind(limit)
    .fetch_all(db)
    .await
}

pub async fn insert_report(
    db: impl PgExecutor<'_>,
    room_id: &str,
    event_id: Option<&str>,
    reporter: &str,
    reason: Option<&str>,
    score: Option<i32>,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO reports (room_id, event_id, reporter, reason, score, received_ts) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(room_id)
    .bind(event_id)
    .bind(reporter)
    .bind(reason)
    .bind(score)
    .bind(now_ms())
    .execute(db)
    .await?;
    Ok(())
}

#[derive(Debug, sqlx::FromRow)]
pub struct ReportRow {
    pub id: i64,
    pub room_id: String,
    pub event_id: Option<String>,
    pub reporter: String,
    pub reason: Option<String>,
    pub score: Option<i32>,
    pub received_ts: i64,
}

/// Reports, newest first, with optional filters; returns the page and the total count.
pub async fn list_reports(
    db: &sqlx::PgPool,
    offset: i64,
    limit: i64,
    room_id: Option<&str>,
    reporter: Option<&str>,
) -> sqlx::Result<(Vec<ReportRow>, i64)> {
    let rows = sqlx::query_as(
        "SELECT * FROM reports WHERE ($1::text IS NULL OR room_id = $1) AND ($2::text IS NULL OR reporter = $2)
         ORDER BY received_ts DESC, id DESC OFFSET $3 LIMIT $4",
    )
    .bind(room_id)
    .bind(reporter)
    .bind(offset)
    .bind(limit)
    .fetch_all(db)
    .await?;
    let total = sqlx::query_scalar(
        "SELECT count(*) FROM reports WHERE ($1::text IS NULL OR room_id = $1) AND ($2::text IS NULL OR reporter = $2)",
    )
    .bind(room_id)
    .bind(reporter)
    .fetch_one(db)
    .await?;
    Ok((rows, total))
}

pub async fn insert_user_report(
    db: impl PgExecutor<'_>,
    target_user: &str,
    reporter: &str,
    reason: &str,
) -> sqlx::Result<()> {
    sqlx::query("INSERT INTO user_reports (target_user, reporter, reason, received_ts) VALUES ($1, $2, $3, $4)")
        .bind(target_user)
        .bind(reporter)
        .bind(reason)
        .bind(now_ms())
        .execute(db)
        .await?;
    Ok(())
}
