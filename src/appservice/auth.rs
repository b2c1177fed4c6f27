//! `as_token` authentication: the appservice acts as its sender, or as a user of its namespace
//! named by `?user_id=` (masquerading), on one of that user's devices named by `?device_id=`
//! (MSC4326; `org.matrix.msc3202.device_id` is the unstable name).

use std::sync::Arc;

use axum::http::StatusCode;

use super::Registration;
use crate::auth::{Session, hash_token};
use crate::error::{ApiResult, Error};
use crate::state::AppState;
use crate::storage;

/// The device ID of an appservice request that names no device: not a device of the user's
/// (device-bound endpoints such as key upload then find no device).
pub fn pseudo_device(reg: &Registration) -> String {
    format!("_appservice_{}", reg.id)
}

/// Resolves a request authenticated with `reg`'s `as_token`.
pub async fn session(
    state: &AppState,
    reg: &Arc<Registration>,
    token: &str,
    query: Option<&str>,
) -> ApiResult<Arc<Session>> {
    let mut user_id = None;
    let mut device_id = None;
    if let Some(q) = query {
        for (k, v) in url::form_urlencoded::parse(q.as_bytes()) {
            match &*k {
                "user_id" => user_id = Some(v.into_owned()),
                "device_id" => device_id = Some(v.into_owned()),
                "org.matrix.msc3202.device_id" if device_id.is_none() => device_id = Some(v.into_owned()),
                _ => {}
            }
        }
    }
    let user_id = user_id.unwrap_or_else(|| reg.sender.clone());
    if user_id.contains('\0') || user_id.len() > 255 {
        return Err(Error::invalid_param("Invalid user_id"));
    }
    if !reg.can_control(&user_id) {
        return Err(Error::forbidden("Application service cannot masquerade as this user"));
    }
    let user = storage::users::get(&state.db, &user_id).await?;
    let Some(user) = user.filter(|u| !u.deactivated) else {
        return Err(Error::forbidden("Application service has not registered this user"));
    };
    let device_id = match device_id {
        Some(d) => {
            if d.is_empty()
                || d.len() > 255
                || d.contains('\0')
                || storage::devices::get(&state.db, &user_id, &d).await?.is_none()
            {
                return Err(Error::new(
                    StatusCode::BAD_REQUEST,
                    "M_UNKNOWN_DEVICE",
                    format!("Application service trying to use a device that doesn't exist ('{d}' for {user_id})"),
                ));
            }
            d
        }
        None => pseudo_device(reg),
    };
    let is_bot = user.user_type.as_deref() == Some("bot");
    Ok(Arc::new(Session {
        rate_exempt: !reg.rate_limited || user_id == reg.sender,
        user_id: user_id.into(),
        device_id: device_id.into(),
        is_admin: user.is_admin,
        token_hash: hash_token(token),
        expires_ts: None,
        appservice: Some(reg.id.clone().into()),
        is_bot,
    }))
}
