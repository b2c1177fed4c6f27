//! The Synapse-compatible admin API, so existing provisioning scripts keep working.

pub mod exports;
pub mod media;
pub mod register;
pub mod registration_tokens;
pub mod reports;
pub mod rooms;
pub mod users;
pub mod webhooks;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use crate::error::Error;
use crate::http::extract::Auth;
use crate::state::AppState;

/// An authenticated server administrator.
pub struct AdminAuth(pub Auth);

impl FromRequestParts<AppState> for AdminAuth {
    type Rejection = Error;
    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Error> {
        let auth = Auth::from_request_parts(parts, state).await?;
        if !auth.is_admin {
            return Err(Error::forbidden("You are not a server admin"));
        }
        Ok(AdminAuth(auth))
    }
}
