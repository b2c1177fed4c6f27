//! OpenID tokens: a user asks for one and hands it to a third party, which asks the server who the
//! token belongs to. They are 256-bit random strings kept as SHA-256 hashes in `openid_tokens`, a
//! table no access-token lookup reads: an OpenID token authenticates nothing, and an access token
//! is never accepted as an OpenID token.

use crate::auth::{hash_token, new_token};
use crate::error::{ApiResult, Error};
use crate::state::AppState;
use crate::storage::{self, now_ms};

pub struct Issued {
    pub token: String,
    pub expires_in_secs: u64,
}

/// Issues a token for `user_id` (the caller: nobody gets a token for someone else).
pub async fn issue(state: &AppState, user_id: &str, is_admin: bool) -> ApiResult<Issued> {
    if state.config.rate_limits.enabled && !(is_admin && state.config.rate_limits.exempt_admins) {
        state.rtc.openid_per_user.check(user_id).map_err(Error::limit_exceeded)?;
    }
    let lifetime = state.config.openid.token_lifetime_secs;
    let token = new_token("pvo_");
    let now = now_ms();
    storage::openid::insert(&state.db, &hash_token(&token), user_id, now, now + lifetime as i64 * 1000).await?;
    Ok(Issued { token, expires_in_secs: lifetime })
}

/// Whose token this is: the user ID, or 401 `M_UNKNOWN_TOKEN` (unknown, expired, an access token,
/// a deactivated account).
pub async fn verify(state: &AppState, token: &str) -> ApiResult<String> {
    let unknown = || Error::new(axum::http::StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN", "Invalid OpenID token");
    if token.is_empty() || token.len() > 512 {
        return Err(unknown());
    }
    storage::openid::lookup(&state.db, &hash_token(token), now_ms()).await?.ok_or_else(unknown)
}
