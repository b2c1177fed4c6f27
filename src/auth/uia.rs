//! User-interactive authentication (spec: "User-Interactive Authentication API").
//!
//! An endpoint protected by UIA calls [`check`] with the flows it accepts and the request's
//! `auth` object. Without a completed flow, `check` answers 401 with the flows, the session and
//! the stages done so far; once a flow is complete, the session is consumed and the operation
//! proceeds. Sessions live in PostgreSQL so that successive steps may reach different instances.
//!
//! The spec requires the request to stay the same through a session: [`check_bound`] records a
//! hash of the request ([`RequestBinding`]: method, path, canonical body without `auth`) when the
//! session starts and refuses a later step made with another request (403 `M_FORBIDDEN`, as
//! Synapse answers), so that a session started for one operation cannot authorise another.

use axum::extract::{FromRequestParts, OriginalUri};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::error::{ApiResult, Error};
use crate::state::AppState;
use crate::storage::{self, now_ms};

pub const DUMMY: &str = "m.login.dummy";
pub const PASSWORD: &str = "m.login.password";
pub const REGISTRATION_TOKEN: &str = "m.login.registration_token";
/// Completed only through the fallback page (`/auth/m.login.sso/fallback/web`): a provider login
/// as the session's user (see `api::client::sso`).
pub const SSO: &str = crate::sso::UIA_STAGE;
/// Completed by approving the action on the account management page (spec v1.17: only for
/// cross-signing resets, by sessions that logged in through the OAuth 2.0 API).
pub const OAUTH: &str = "m.oauth";

/// The `params` of the stages offered.
fn stage_params(state: &AppState, flows: &[Vec<&'static str>]) -> Value {
    let mut params = serde_json::Map::new();
    if flows.iter().any(|f| f.contains(&OAUTH))
        && let Some(base) = crate::oauth::base(state)
    {
        params.insert(
            OAUTH.into(),
            json!({ "url": format!("{base}{}?action=org.matrix.cross_signing_reset", crate::oauth::ACCOUNT_PATH) }),
        );
    }
    Value::Object(params)
}

/// The flows that can re-authenticate `user_id` before a sensitive operation: their password if
/// they have one, SSO if they are linked to a configured provider (users created by SSO have no
/// password).
pub async fn user_flows(state: &AppState, user_id: &str) -> ApiResult<Vec<Vec<&'static str>>> {
    let mut flows = Vec::new();
    let user = storage::users::get(&state.db, user_id).await?;
    if user.as_ref().is_some_and(|u| u.password_hash.is_some()) {
        flows.push(vec![PASSWORD]);
    }
    if state.sso.enabled() {
        let linked = storage::sso::external_ids(&state.db, user_id).await?;
        if linked.iter().any(|e| state.sso.provider(&e.auth_provider).is_some()) {
            flows.push(vec![SSO]);
        }
    }
    if flows.is_empty() {
        // Nothing can succeed; still answer with the usual challenge.
        flows.push(vec![PASSWORD]);
    }
    Ok(flows)
}

/// What a completed UIA session established.
#[derive(Debug, Default)]
pub struct UiaOutcome {
    pub registration_token: Option<String>,
}

/// The method and path of a request, for [`RequestBinding`] (an extractor that never fails).
pub struct RequestLine {
    pub method: Method,
    pub path: String,
}

impl<S: Send + Sync> FromRequestParts<S> for RequestLine {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let uri = parts.extensions.get::<OriginalUri>().map_or(&parts.uri, |o| &o.0);
        Ok(RequestLine { method: parts.method.clone(), path: uri.path().to_owned() })
    }
}

/// What a UIA session is bound to: SHA-256 of the method, the path and the canonical JSON of the
/// body without its top-level `auth` (which changes from step to step by design).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestBinding([u8; 32]);

impl RequestBinding {
    pub fn new(line: &RequestLine, body: &Value) -> Self {
        let mut h = Sha256::new();
        h.update(line.method.as_str().as_bytes());
        h.update(b"\n");
        h.update(line.path.as_bytes());
        h.update(b"\n");
        let mut canonical = String::new();
        match body {
            Value::Object(o) => {
                let mut o = o.clone();
                o.remove("auth");
                write_canonical(&Value::Object(o), &mut canonical);
            }
            other => write_canonical(other, &mut canonical),
        }
        h.update(canonical.as_bytes());
        RequestBinding(h.finalize().into())
    }
}

/// Canonical JSON (object keys sorted by code point, no insignificant white space), whatever
/// serde_json's map order is.
fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(o) => {
            let mut keys: Vec<&String> = o.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(&o[k], out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(x, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// Deserialises a body already read as JSON into the endpoint's type, with the same
/// `M_BAD_JSON` (naming the field) as the `Json` extractor.
pub fn parse_body<T: DeserializeOwned>(body: &Value) -> ApiResult<T> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            Error::bad_json(e.inner().to_string())
        } else {
            Error::bad_json(format!("{path}: {}", e.inner()))
        }
    })
}

/// Runs one step of UIA for `purpose` (a stable name of the operation, e.g. `"delete_devices"`),
/// on behalf of `user_id`, bound to the request `binding`: the session remembers it, and a step
/// made with another request is refused.
pub async fn check_bound(
    state: &AppState,
    purpose: &str,
    user_id: &str,
    flows: &[Vec<&'static str>],
    auth: Option<&Value>,
    binding: RequestBinding,
) -> ApiResult<UiaOutcome> {
    run(state, purpose, Some(user_id), flows, auth, Some(binding)).await
}

/// Runs one step of UIA for `purpose` without binding the session to the request body
/// (registration: clients may send later stages with a partial body).
pub async fn check(
    state: &AppState,
    purpose: &str,
    user_id: Option<&str>,
    flows: &[Vec<&'static str>],
    auth: Option<&Value>,
) -> ApiResult<UiaOutcome> {
    run(state, purpose, user_id, flows, auth, None).await
}

async fn run(
    state: &AppState,
    purpose: &str,
    user_id: Option<&str>,
    flows: &[Vec<&'static str>],
    auth: Option<&Value>,
    binding: Option<RequestBinding>,
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
            if let Some(b) = binding
                && s.request_hash.as_deref() != Some(&b.0[..])
            {
                return Err(Error::forbidden("Requested operation has changed during the UI authentication session"));
            }
            s
        }
        None => {
            let id = crate::auth::new_token("");
            storage::uia::create(&state.db, &id, purpose, user_id, binding.as_ref().map(|b| &b.0[..])).await?;
            storage::uia::get(&state.db, &id, min_ts).await?.ok_or_else(Error::internal)?
        }
    };

    let params = stage_params(state, flows);
    // `m.oauth`: done once the user approved on the account page (for a while).
    if matches!(stage, None | Some(OAUTH))
        && flows.iter().any(|f| f.as_slice() == [OAUTH])
        && let Some(u) = user_id
        && storage::oauth::cross_signing_reset_approved(&state.db, u).await?
    {
        storage::uia::delete(&state.db, &session.session_id).await?;
        return Ok(UiaOutcome { registration_token: session.registration_token });
    }
    let flow_done = |completed: &[String]| flows.iter().any(|f| f.iter().all(|s| completed.iter().any(|c| c == s)));
    // A stage completed out of band (the SSO fallback page) finishes the flow when the client
    // comes back with the session (with no stage, or naming the fallback stage).
    if matches!(stage, None | Some(SSO)) && flow_done(&session.completed.0) {
        storage::uia::delete(&state.db, &session.session_id).await?;
        return Ok(UiaOutcome { registration_token: session.registration_token });
    }
    let Some(stage) = stage else {
        // No stage attempted: (re)state the challenge.
        return Err(challenge(flows, &params, &session.session_id, &session.completed.0, None));
    };
    if (stage == SSO && flows.iter().any(|f| f.contains(&SSO)))
        || (stage == OAUTH && flows.iter().any(|f| f.contains(&OAUTH)))
    {
        // Only the fallback page completes it.
        return Err(challenge(flows, &params, &session.session_id, &session.completed.0, None));
    }
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
                    &params,
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
                    &params,
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
    if flow_done(&completed) {
        let registration_token = token_used.or(session.registration_token);
        storage::uia::delete(&state.db, &session.session_id).await?;
        return Ok(UiaOutcome { registration_token });
    }
    Err(challenge(flows, &params, &session.session_id, &completed, None))
}

/// The 401 body that tells a client what to do next.
fn challenge(
    flows: &[Vec<&'static str>],
    params: &Value,
    session: &str,
    completed: &[String],
    error: Option<(&'static str, &str)>,
) -> Error {
    let (errcode, message) = error.unwrap_or(("", ""));
    let mut e = Error::new(StatusCode::UNAUTHORIZED, errcode, message)
        .with("flows", Value::Array(flows.iter().map(|f| json!({ "stages": f })).collect()))
        .with("params", params.clone())
        .with("session", json!(session))
        .with("completed", json!(completed));
    if error.is_none() {
        e.errcode = "";
    }
    e
}
