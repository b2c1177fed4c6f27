//! Profiles: `displayname`, `avatar_url` and custom fields (spec v1.16 extended profiles).

use serde_json::{Map, Value};

use crate::error::{ApiResult, Error};
use crate::state::AppState;
use crate::storage;

/// Total size of one user's profile, serialised (the spec's limit for extended profiles).
pub const MAX_PROFILE_BYTES: usize = 64 * 1024;

/// A change to a user's profile, as seen by the rest of the server.
#[derive(Debug, Clone)]
pub struct ProfileChange {
    pub user_id: String,
    pub profile: Map<String, Value>,
}

/// Validates a profile field value. `displayname` and `avatar_url` are strings (or null to
/// remove); other keys take any JSON value, with namespaced names.
pub fn validate_field(key: &str, value: &Value) -> ApiResult<()> {
    if key.is_empty() || key.len() > 255 {
        return Err(Error::bad_json("Profile field names must be 1 to 255 bytes"));
    }
    match key {
        "displayname" => match value {
            Value::String(s) if s.len() <= 256 => Ok(()),
            Value::String(_) => Err(Error::bad_json("displayname is longer than 256 bytes")),
            _ => Err(Error::bad_json("displayname must be a string")),
        },
        "avatar_url" => match value {
            Value::String(s) if s.is_empty() || (s.starts_with("mxc://") && s.len() <= 1024) => Ok(()),
            _ => Err(Error::bad_json("avatar_url must be an mxc:// URI")),
        },
        _ => Ok(()),
    }
}

/// Sets or removes one profile field of a local user, then runs [`after_profile_change`].
pub async fn set_field(state: &AppState, user_id: &str, key: &str, value: Option<Value>) -> ApiResult<()> {
    if let Some(v) = &value {
        validate_field(key, v)?;
        let current = storage::profiles::get(&state.db, user_id).await?.unwrap_or_default();
        let mut next = current;
        next.insert(key.to_owned(), v.clone());
        if serde_json::to_vec(&next).map(|b| b.len()).unwrap_or(usize::MAX) > MAX_PROFILE_BYTES {
            return Err(Error::new(
                axum::http::StatusCode::BAD_REQUEST,
                "M_PROFILE_TOO_LARGE",
                "Profile would exceed 64 KiB",
            ));
        }
    }
    let profile = storage::profiles::set_field(&state.db, user_id, key, value.as_ref())
        .await?
        .ok_or_else(|| Error::not_found("Profile not found"))?;
    if key == "displayname" || key == "avatar_url" {
        super::directory::refresh(state, user_id).await?;
    }
    after_profile_change(state, ProfileChange { user_id: user_id.to_owned(), profile });
    Ok(())
}

/// The hook for everything that must follow a profile change. The room engine subscribes to
/// `state.profile_changes` to send updated `m.room.member` events into the user's joined rooms;
/// the user directory will index the new display name from the same feed.
pub fn after_profile_change(state: &AppState, change: ProfileChange) {
    tracing::debug!(user_id = %change.user_id, "profile changed");
    // No receiver yet is not an error: nothing subscribes until rooms exist.
    let _ = state.profile_changes.send(change);
}
