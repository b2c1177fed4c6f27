//! Full-text search of room events (`POST /search`, `room_events`).
//!
//! PostgreSQL does the work: every message body, room name and topic gets a `tsvector` in
//! `event_search`, written by the same statement that writes the event (no extra round trip,
//! no background indexer that could lag) and deleted with its redaction. The text search
//! configuration is `parvis_<search.language>` (migration 0017): PostgreSQL's stemmer and stop
//! words for that language, after `unaccent`, so « Réunions » is found by « reunion ».
//!
//! A search term of several words finds events holding any of them, and ranks those holding
//! all of them first (then by `ts_rank_cd`), as a search box user expects; `recent` orders by
//! stream position instead. Every candidate goes through the same per-event history visibility
//! as `/messages` (`rooms::visibility::Viewer`), the request's filter and the user's ignore
//! list, reading further pages (bounded) to fill the chunk. Encrypted events have no plaintext
//! and are never indexed.

pub mod engine;

use serde_json::Value;

use crate::state::AppState;
use crate::storage;

/// The languages `search.language` may name (each has a `parvis_<language>` configuration).
pub const LANGUAGES: &[&str] = &["simple", "english", "french", "german", "spanish", "italian", "dutch", "portuguese"];

/// The search keys of the spec and the event type each belongs to.
pub const KEYS: &[(&str, &str, &str)] = &[
    ("content.body", "m.room.message", "body"),
    ("content.name", "m.room.name", "name"),
    ("content.topic", "m.room.topic", "topic"),
];

/// The PostgreSQL text search configuration for a language of [`LANGUAGES`].
pub fn text_config(language: &str) -> String {
    format!("parvis_{language}")
}

/// What of an event is searchable: its key (`content.body`...) and text, if any.
pub fn searchable<'a>(event_type: &str, content: &'a Value) -> Option<(&'static str, &'a str)> {
    let (key, _, field) = KEYS.iter().find(|(_, t, _)| *t == event_type)?;
    content.get(*field).and_then(Value::as_str).filter(|t| !t.trim().is_empty()).map(|t| (*key, t))
}

/// Re-indexes every searchable event when `search.language` changed since the index was built
/// (run in the background at start-up; searches meanwhile find what is already converted). Safe
/// with several instances: each batch is one statement, and the last writer records the language.
pub async fn reindex_if_needed(state: AppState) {
    let language = state.config.search.language.clone();
    let stored = match storage::search::indexed_language(&state.db).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "search: cannot read the indexed language");
            return;
        }
    };
    if stored.as_deref() == Some(language.as_str()) {
        return;
    }
    tracing::info!(from = ?stored, to = %language, "search: re-indexing every message for the configured language");
    let config = text_config(&language);
    let mut after = 0i64;
    let mut total = 0u64;
    loop {
        match storage::search::reindex_batch(&state.db, &config, after, 5000).await {
            Ok((n, last)) => {
                total += n;
                match last {
                    Some(l) => after = l,
                    None => break,
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "search: re-indexing failed; it starts again at the next start");
                return;
            }
        }
    }
    if let Err(e) = storage::search::set_indexed_language(&state.db, &language).await {
        tracing::error!(error = %e, "search: cannot record the indexed language");
        return;
    }
    tracing::info!(events = total, language = %language, "search: re-indexing done");
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn what_is_searchable() {
        let c = json!({ "body": "Réunion", "name": "Salle", "topic": 3 });
        assert_eq!(searchable("m.room.message", &c), Some(("content.body", "Réunion")));
        assert_eq!(searchable("m.room.name", &c), Some(("content.name", "Salle")));
        assert_eq!(searchable("m.room.topic", &c), None, "not a string");
        assert_eq!(searchable("m.room.encrypted", &json!({ "ciphertext": "x" })), None);
        assert_eq!(searchable("m.room.message", &json!({ "body": "  " })), None);
        assert_eq!(searchable("m.reaction", &c), None);
    }
}
