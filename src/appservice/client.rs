//! Requests Parvis makes to application services: user and alias queries, third-party lookups,
//! pings. All use `Authorization: Bearer <hs_token>`, the configured timeout, and bounded
//! answers.

use serde_json::Value;

use super::Registration;
use crate::error::{ApiResult, Error};
use crate::state::AppState;

/// Largest answer read from an appservice.
const MAX_ANSWER: usize = 1024 * 1024;

pub(crate) fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>().replace('+', "%20")
}

async fn get(
    state: &AppState,
    reg: &Registration,
    path: &str,
    query: &[(String, String)],
) -> Result<(u16, Value), String> {
    let url = reg.url.as_deref().ok_or("no URL")?;
    let mut target = format!("{url}{path}");
    if !query.is_empty() {
        target.push('?');
        target.push_str(&url::form_urlencoded::Serializer::new(String::new()).extend_pairs(query).finish());
    }
    let resp = state.appservice_http.get(target).bearer_auth(&reg.hs_token).send().await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    if resp.content_length().is_some_and(|l| l as usize > MAX_ANSWER) {
        return Err("answer too large".into());
    }
    let bytes = resp.bytes().await.map_err(|e| e.to_string())?;
    if bytes.len() > MAX_ANSWER {
        return Err("answer too large".into());
    }
    Ok((status, serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
}

/// Asks the appservices whose user namespace holds `user_id` whether it exists
/// (`GET /_matrix/app/v1/users/{userId}`); one that answers 2xx is expected to have created it.
/// Returns whether one did.
pub async fn query_user(state: &AppState, user_id: &str) -> bool {
    for reg in state.appservices.all().iter().filter(|r| r.url.is_some() && r.is_interested_in_user(user_id)) {
        match get(state, reg, &format!("/_matrix/app/v1/users/{}", enc(user_id)), &[]).await {
            Ok((s, _)) if (200..300).contains(&s) => return true,
            Ok(_) => {}
            Err(e) => tracing::info!(appservice = %reg.id, error = %e, "user query failed"),
        }
    }
    false
}

/// Asks the appservices whose alias namespace holds `alias` to create it
/// (`GET /_matrix/app/v1/rooms/{alias}`). Returns whether one said it did.
pub async fn query_alias(state: &AppState, alias: &str) -> bool {
    for reg in state.appservices.all().iter().filter(|r| r.url.is_some() && r.is_alias_in_namespace(alias)) {
        match get(state, reg, &format!("/_matrix/app/v1/rooms/{}", enc(alias)), &[]).await {
            Ok((s, _)) if (200..300).contains(&s) => return true,
            Ok(_) => {}
            Err(e) => tracing::info!(appservice = %reg.id, error = %e, "alias query failed"),
        }
    }
    false
}

/// `GET /thirdparty/protocols`: each protocol's metadata from the first appservice that
/// declares it and answers, with `instances` gathered from all of them.
pub async fn protocols(state: &AppState) -> Value {
    let mut out = serde_json::Map::new();
    for reg in state.appservices.all().iter().filter(|r| r.url.is_some()) {
        for p in &reg.protocols {
            if let Some(meta) = protocol_of(state, reg, p).await {
                match out.get_mut(p) {
                    None => {
                        out.insert(p.clone(), meta);
                    }
                    Some(existing) => {
                        if let (Some(a), Some(b)) =
                            (existing["instances"].as_array().cloned(), meta["instances"].as_array())
                        {
                            existing["instances"] = Value::Array(a.into_iter().chain(b.iter().cloned()).collect());
                        }
                    }
                }
            }
        }
    }
    Value::Object(out)
}

async fn protocol_of(state: &AppState, reg: &Registration, protocol: &str) -> Option<Value> {
    match get(state, reg, &format!("/_matrix/app/v1/thirdparty/protocol/{}", enc(protocol)), &[]).await {
        Ok((200, v)) if v.is_object() && v.get("instances").is_none_or(Value::is_array) => Some(v),
        Ok((s, _)) => {
            tracing::info!(appservice = %reg.id, protocol, status = s, "protocol query refused");
            None
        }
        Err(e) => {
            tracing::info!(appservice = %reg.id, protocol, error = %e, "protocol query failed");
            None
        }
    }
}

/// `GET /thirdparty/protocol/{protocol}`.
pub async fn protocol(state: &AppState, protocol: &str) -> ApiResult<Value> {
    let mut found = None;
    for reg in state.appservices.all().iter().filter(|r| r.url.is_some() && r.protocols.iter().any(|p| p == protocol)) {
        if let Some(meta) = protocol_of(state, reg, protocol).await {
            found = Some(meta);
            break;
        }
    }
    found.ok_or_else(|| Error::not_found("No protocol with that name"))
}

/// `GET /thirdparty/{kind}/{protocol}` (kind `user` or `location`): the results of every
/// appservice declaring the protocol, concatenated; entries without the required fields are
/// dropped (as Synapse does).
pub async fn lookup(state: &AppState, kind: &str, protocol: &str, query: &[(String, String)]) -> ApiResult<Value> {
    let regs: Vec<_> = state
        .appservices
        .all()
        .iter()
        .filter(|r| r.url.is_some() && r.protocols.iter().any(|p| p == protocol))
        .cloned()
        .collect();
    if regs.is_empty() {
        return Err(Error::not_found("No protocol with that name"));
    }
    let field = if kind == "user" { "userid" } else { "alias" };
    let mut out = Vec::new();
    for reg in regs {
        match get(state, &reg, &format!("/_matrix/app/v1/thirdparty/{kind}/{}", enc(protocol)), query).await {
            Ok((200, Value::Array(items))) => out.extend(items.into_iter().filter(|i| {
                i.get(field).is_some_and(Value::is_string)
                    && i.get("protocol").is_some_and(Value::is_string)
                    && i.get("fields").is_some_and(Value::is_object)
            })),
            Ok((s, _)) => tracing::info!(appservice = %reg.id, status = s, "third-party lookup refused"),
            Err(e) => tracing::info!(appservice = %reg.id, error = %e, "third-party lookup failed"),
        }
    }
    Ok(Value::Array(out))
}

/// `POST /_matrix/app/v1/ping` to the appservice. Returns the round trip in milliseconds, or
/// the spec's errors: 502 `M_BAD_STATUS` (with the status and body), 502
/// `M_CONNECTION_FAILED`, 504 `M_CONNECTION_TIMEOUT`.
pub async fn ping(state: &AppState, reg: &Registration, transaction_id: Option<&str>) -> ApiResult<u64> {
    let url = reg
        .url
        .as_deref()
        .ok_or_else(|| Error::new(axum::http::StatusCode::BAD_REQUEST, "M_URL_NOT_SET", "The appservice has no URL"))?;
    let mut body = serde_json::json!({});
    if let Some(t) = transaction_id {
        body["transaction_id"] = Value::String(t.to_owned());
    }
    let started = std::time::Instant::now();
    let resp = state
        .appservice_http
        .post(format!("{url}/_matrix/app/v1/ping"))
        .bearer_auth(&reg.hs_token)
        .json(&body)
        .send()
        .await;
    let elapsed = started.elapsed().as_millis() as u64;
    match resp {
        Ok(r) if r.status().is_success() => Ok(elapsed),
        Ok(r) => {
            let status = r.status().as_u16();
            let text: String = r.text().await.unwrap_or_default().chars().take(4096).collect();
            Err(Error::new(axum::http::StatusCode::BAD_GATEWAY, "M_BAD_STATUS", "The appservice answered an error")
                .with("status", Value::from(status))
                .with("body", Value::String(text)))
        }
        Err(e) if e.is_timeout() => Err(Error::new(
            axum::http::StatusCode::GATEWAY_TIMEOUT,
            "M_CONNECTION_TIMEOUT",
            "The appservice did not answer in time",
        )),
        Err(_) => {
            Err(Error::new(axum::http::StatusCode::BAD_GATEWAY, "M_CONNECTION_FAILED", "Cannot reach the appservice"))
        }
    }
}
