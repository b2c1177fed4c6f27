//! Keeping the user directory in step with accounts and profiles, and normalising search text
//! so that agents find "Hélène" by typing "helene".

use unicode_normalization::UnicodeNormalization;
use unicode_normalization::char::is_combining_mark;

use crate::state::AppState;
use crate::storage;

/// Lower-cases and strips diacritics (NFD, then drop combining marks).
pub fn normalise(text: &str) -> String {
    text.nfd().filter(|c| !is_combining_mark(*c)).collect::<String>().to_lowercase()
}

pub fn search_text(user_id: &str, display_name: Option<&str>) -> String {
    normalise(&format!("{user_id} {}", display_name.unwrap_or("")))
}

/// Refreshes one user's entry from their profile.
pub async fn refresh(state: &AppState, user_id: &str) -> sqlx::Result<()> {
    let profile = storage::profiles::get(&state.db, user_id).await?.unwrap_or_default();
    let name = profile.get("displayname").and_then(|v| v.as_str());
    let avatar = profile.get("avatar_url").and_then(|v| v.as_str());
    storage::directory::upsert_user(&state.db, user_id, name, avatar, &search_text(user_id, name)).await
}

#[cfg(test)]
mod tests {
    #[test]
    fn accents_and_case_fold() {
        assert_eq!(super::normalise("Hélène Ørsted-Çelik"), "helene ørsted-celik");
        assert!(super::search_text("@hmartin:ville.fr", Some("Hélène MARTIN")).contains("helene martin"));
    }
}
