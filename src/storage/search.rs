//! `event_search`: the full-text index of room events (see `crate::search`). Rows are written by
//! `events::insert` and removed by `events::mark_redacted`; this module reads them.

use sqlx::{PgExecutor, PgPool};

/// The language the index was built in (`server_meta.search_language`).
pub async fn indexed_language(db: impl PgExecutor<'_>) -> sqlx::Result<Option<String>> {
    sqlx::query_scalar("SELECT value FROM server_meta WHERE key = 'search_language'").fetch_optional(db).await
}

pub async fn set_indexed_language(db: impl PgExecutor<'_>, language: &str) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO server_meta (key, value) VALUES ('search_language', $1)
         ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
    )
    .bind(language)
    .execute(db)
    .await?;
    Ok(())
}

/// Recomputes the vectors of up to `limit` indexed events after `after` (by event nid) with
/// `config`. Returns how many were done and the last nid (None: no more).
pub async fn reindex_batch(db: &PgPool, config: &str, after: i64, limit: i64) -> sqlx::Result<(u64, Option<i64>)> {
    let last: Option<i64> = sqlx::query_scalar(
        "WITH b AS (SELECT s.event_nid, (e.json::jsonb -> 'content') ->> split_part(s.key, '.', 2) AS text
                   FROM event_search s JOIN events e ON e.event_nid = s.event_nid
                   WHERE s.event_nid > $2 ORDER BY s.event_nid LIMIT $3),
              u AS (UPDATE event_search s SET vector = to_tsvector($1::regconfig, coalesce(b.text, ''))
                    FROM b WHERE s.event_nid = b.event_nid RETURNING s.event_nid)
         SELECT max(event_nid) FROM u",
    )
    .bind(config)
    .bind(after)
    .bind(limit)
    .fetch_one(db)
    .await?;
    Ok(match last {
        Some(l) => (limit as u64, Some(l)),
        None => (0, None),
    })
}

/// The search term as two text search queries, computed once per request: any of its words,
/// and all of them (as `tsquery` text; empty when every word is a stop word). Bound as
/// parameters afterwards, so the planner can use the GIN index.
pub async fn prepare(db: impl PgExecutor<'_>, config: &str, words: &[String]) -> sqlx::Result<(String, String)> {
    sqlx::query_as(
        "SELECT coalesce(parvis_tsquery_or(q)::text, ''), coalesce(parvis_tsquery_and(q)::text, '')
         FROM (SELECT plainto_tsquery($1::regconfig, w) AS q FROM UNNEST($2::text[]) w) x",
    )
    .bind(config)
    .bind(words)
    .fetch_one(db)
    .await
}

/// What a search looks for.
pub struct Query<'a> {
    /// The text search configuration (`parvis_<language>`).
    pub config: &'a str,
    /// Events holding any of the words match (`tsquery` text from [`prepare`]).
    pub any: &'a str,
    /// Events holding all of them rank first.
    pub all: &'a str,
    pub rooms: &'a [i64],
    pub keys: &'a [&'a str],
    pub senders: Option<&'a [String]>,
    pub not_senders: Option<&'a [String]>,
    /// Rank order (all words first, then `ts_rank_cd`), else most recent first.
    pub by_rank: bool,
}

/// One matching event, in result order.
#[derive(Debug, sqlx::FromRow)]
pub struct Hit {
    pub event_nid: i64,
    pub rank: f32,
    pub all_words: bool,
}

/// Matches ranked (and paginated) per search: the most recent ones. Ranking scores every match,
/// so without a bound a word found in a hundred thousand messages costs a second per search;
/// with it, a search over any history costs about the same. `count` has the same cap.
pub const RANKED_MATCHES: i64 = 10_000;

const MATCH: &str = "
    SELECT event_nid, ts_rank_cd(vector, $1::tsquery) AS rank, vector @@ $2::tsquery AS all_words, stream_ordering
    FROM (SELECT s.event_nid, s.vector, s.stream_ordering FROM event_search s
          WHERE s.vector @@ $1::tsquery AND s.room_nid = ANY($3) AND s.key = ANY($4)
            AND ($5::text[] IS NULL OR s.sender = ANY($5)) AND ($6::text[] IS NULL OR NOT (s.sender = ANY($6)))
          ORDER BY s.stream_ordering DESC LIMIT RANKED_MATCHES) recent";

/// A page of matches (`offset`, `limit`) in result order.
pub async fn page(db: impl PgExecutor<'_>, q: &Query<'_>, offset: i64, limit: i64) -> sqlx::Result<Vec<Hit>> {
    let order = if q.by_rank { "all_words DESC, rank DESC, stream_ordering DESC" } else { "stream_ordering DESC" };
    let matches = MATCH.replace("RANKED_MATCHES", &RANKED_MATCHES.to_string());
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT event_nid, rank, all_words FROM ({matches}) m ORDER BY {order} OFFSET $7 LIMIT $8"
    )))
    .bind(q.any)
    .bind(q.all)
    .bind(q.rooms)
    .bind(q.keys)
    .bind(q.senders)
    .bind(q.not_senders)
    .bind(offset)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// How many events match, counting at most `cap`.
pub async fn count(db: impl PgExecutor<'_>, q: &Query<'_>, cap: i64) -> sqlx::Result<i64> {
    sqlx::query_scalar(
        "SELECT COUNT(*) FROM (
             SELECT 1 FROM event_search s
             WHERE s.vector @@ $1::tsquery AND s.room_nid = ANY($2) AND s.key = ANY($3)
               AND ($4::text[] IS NULL OR s.sender = ANY($4)) AND ($5::text[] IS NULL OR NOT (s.sender = ANY($5)))
             LIMIT $6) c",
    )
    .bind(q.any)
    .bind(q.rooms)
    .bind(q.keys)
    .bind(q.senders)
    .bind(q.not_senders)
    .bind(cap)
    .fetch_one(db)
    .await
}

/// The searched text of `event_nids` with the words that matched marked by `open`/`close`
/// (PostgreSQL's `ts_headline` over the whole text).
pub async fn marked_texts(
    db: impl PgExecutor<'_>,
    config: &str,
    any: &str,
    event_nids: &[i64],
    open: &str,
    close: &str,
) -> sqlx::Result<Vec<String>> {
    let options = format!("StartSel={open}, StopSel={close}, HighlightAll=true");
    sqlx::query_scalar(
        "SELECT ts_headline($1::regconfig, coalesce((e.json::jsonb -> 'content') ->> split_part(s.key, '.', 2), ''),
                            $2::tsquery, $4)
         FROM event_search s JOIN events e ON e.event_nid = s.event_nid
         WHERE s.event_nid = ANY($3)",
    )
    .bind(config)
    .bind(any)
    .bind(event_nids)
    .bind(options)
    .fetch_all(db)
    .await
}
