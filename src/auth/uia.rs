//! User-interactive authentication (spec: "User-Interactive Authentication API").
//!
//! An endpoint protected by UIA calls [`check`] with the flows it accepts and the request's
//! `auth` object. Without a completed flow, `check` answers 401 with the flows, the session and
//! the stages done so far; once a flow is complete, the session is consumed and the operation
//! proceeds. Sessions live in PostgreSQL so that successive steps may reach different instances.

use axum::http::StatusCode;
use serde_json::{Value, json};

use crate::error::{ApiResult, Error};
use crate::state::AppState;
use crate::storage::{self, now_ms};

pub const DUMMY: &str = "m.login.dummy";
pub const PASSWORD: &str = "m.login.password";
pub const REGISTRATION_TOKEN: &str = "m.login.registration_token";

/// What a completed UIA session established.
#[derive(Debug, Default)]
pub struct UiaOutcome {
    pub registration_token: Option<String>,
}

/// Runs one step of UIA for `purpose` (a stable name of the operation, e.g. `"delete_devices"`),
/// on behalf of `user_id` (`None` for registration).
pub async fn check(
    state: &AppState,
    purpose: &str,
    user_id: Option<&str>,
    flows: &[Vec<&'static str>],
    auth: Option<&Value>,
) -> ApiResult<UiaOutcome> {
    let min_ts = now_ms() - (state.config.auth.uia_session_lifetime_secs as i64) * 1000;
    let auth = auth.filter(|a| !a.is_null());
    let session_id = auth.and_then(|a| a.get("session")).and_then(Value::as_str).map(str::to_owned);
    let stage = auth.and_then(|a| a.get("type")).and_then(Value::as_str);

    let session = match &session_id {
        Some(id) => {
            let s = storage::uia::get(&state.db, id, min_ts)
                .await?
                .ok_or_else(|| Error::new(StatusCode::BAD_REQUEST, "M_UNKNOWN", "Unknown or expired UIA session"))?;
            if s.purpose != purpose || s.user_id.as_deref() != user_id {
                return Err(Error::forbidden("This UIA session was started for another operation"));
            }
            s
        }
        None => {
            let id = crate::auth::new_token("");
            storage::uia::create(&state.db, &id, purpose, user_id).await?;
            storage::uia::get(&state.db, &id, min_ts).await?.ok_or_else(Error::internal)?
        }
    };

    let Some(stage) = stage else {
        // No stage attempted: (re)state the challenge.
        return Err(challenge(flows, &session.session_id, &session.completed.0, None));
    };
    if !flows.iter().any(|f| f.contains(&stage)) {
        return Err(Error::new(
            StatusCode::BAD_REQUEST,
            "M_UNRECOGNIZED",
            format!("Stage {stage} is not offered here"),
        ));
    }
    let auth = auth.expect("stage implies auth");
    let mut token_used = None;
    match stage {
        DUMMY => {}
        PASSWORD => {
            let who =
                auth.get("identifier").and_then(|i| i.get("user")).or_else(|| auth.get("user")).and_then(Value::as_str);
            let password = auth.get("password").and_then(Value::as_str).unwrap_or("");
            let expected = user_id.ok_or_else(Error::internal)?;
            // Password guessing through UIA is limited like guessing through /login.
            state.rate_limits.check(&state.rate_limits.login_per_account, expected)?;
            let claimed = match who {
                Some(w) => crate::users::parse_login_user(w, &state.config.server_name).ok().map(|(u, _)| u),
                None => Some(expected.to_owned()),
            };
            let user = storage::users::get(&state.db, expected).await?;
            let hash = user.as_ref().and_then(|u| u.password_hash.clone());
            let ok = state.passwords.verify(password, hash.as_deref()).await && claimed.as_deref() == Some(expected);
            if !ok {
                return Err(challenge(
                    flows,
                    &session.session_id,
                    &session.completed.0,
                    Some(("M_FORBIDDEN", "Invalid password")),
                ));
            }
        }
        REGISTRATION_TOKEN => {
            let token = auth.get("token").and_then(Value::as_str).unwrap_or("");
            if token.is_empty() || token.len() > 64 || !storage::registration::token_is_valid(&state.db, token).await? {
                return Err(challenge(
                    flows,
                    &session.session_id,
                    &session.completed.0,
                    Some(("M_UNAUTHORIZED", "Invalid registration token")),
                ));
            }
            token_used = Some(token.to_owned());
        }
        other => {
            return Err(Error::new(StatusCode::BAD_REQUEST, "M_UNRECOGNIZED", format!("Unknown stage {other}")));
        }
    }
    let completed = storage::uia::complete_stage(&state.db, &session.session_id, stage, token_used.as_deref()).await?;
    if flows.iter().any(|f| f.iter().all(|s| completed.iter().any(|c| c == s))) {
        let registration_token = token_used.or(session.registration_token);
        storage::uia::delete(&state.db, &session.session_id).await?;
        return Ok(UiaOutcome { registration_token });
    }
    Err(challenge(flows, &session.session_id, &completed, None))
}

/// The 401 body that tells a client what to do next.
fn challenge(
    flows: &[Vec<&'static str>],
    session: &str,
    completed: &[String],
    error: Option<(&'static str, &str)>,
) -> Error {
    let (errcode, message) = error.unwrap_or(("", ""));
    let mut e = Error::new(StatusCode::UNAUTHORIZED, errcode, message)
        .with("flows", Value::Array(flows.iter().map(|f| json!({ "stages": f })).collect()))
        .with("params", json!({}))
        .with("session", json!(session))
        .with("completed", json!(completed));
    if error.is_none() {
        e.errcode = "";
    }
    e
}
