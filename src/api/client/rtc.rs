//! Calls (issue 18): OpenID tokens, the MatrixRTC transports (MSC4143) and delayed events
//! (MSC4140). The services are in `crate::rtc`.

use axum::extract::State;
use serde_json::{Value, json};

use crate::error::{ApiResult, Error};
use crate::http::extract::{Auth, ClientIp, Json, MaybeAuth, Path};
use crate::rtc::delayed::{self, Action};
use crate::state::AppState;
use crate::storage;

/// `POST /user/{userId}/openid/request_token`: for oneself only.
pub async fn request_openid_token(
    State(state): State<AppState>,
    auth: Auth,
    Path(user_id): Path<String>,
    Json(_body): Json<Value>,
) -> ApiResult<axum::Json<Value>> {
    if user_id != *auth.user_id {
        return Err(Error::forbidden("You can only request an OpenID token for yourself"));
    }
    let issued = crate::rtc::openid::issue(&state, &auth.user_id, auth.is_admin).await?;
    Ok(axum::Json(json!({
        "access_token": issued.token,
        "token_type": "Bearer",
        "matrix_server_name": state.config.server_name,
        "expires_in": issued.expires_in_secs,
    })))
}

/// The configured LiveKit foci, in the form of `.well-known`'s `org.matrix.msc4143.rtc_foci`.
pub fn rtc_foci(state: &AppState) -> Vec<Value> {
    state
        .config
        .matrix_rtc
        .livekit_service_urls
        .iter()
        .map(|u| json!({ "type": "livekit", "livekit_service_url": u }))
        .collect()
}

/// `GET /_matrix/client/unstable/org.matrix.msc4143/rtc/transports` (authenticated).
pub async fn rtc_transports(State(state): State<AppState>, _auth: Auth) -> ApiResult<axum::Json<Value>> {
    let foci = rtc_foci(&state);
    if foci.is_empty() {
        return Err(Error::unrecognized("No MatrixRTC transports are configured"));
    }
    Ok(axum::Json(json!({ "rtc_transports": foci })))
}

fn query_pairs(uri: &axum::http::Uri) -> Vec<(String, String)> {
    url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()).into_owned().collect()
}

/// `GET /_matrix/client/unstable/org.matrix.msc4140/delayed_events`: the user's delayed events.
/// Answers both shapes clients read: `scheduled` and `finalised` (matrix-js-sdk's
/// `DelayedEventInfo`), and `delayed_events` (the scheduled ones, or the finalised ones with
/// `status=finalised`: the MSC's list). Filters: `status`, `delay_id` (repeatable), `from`.
pub async fn list_delayed(
    State(state): State<AppState>,
    auth: Auth,
    uri: axum::http::Uri,
) -> ApiResult<axum::Json<Value>> {
    const PAGE: usize = 100;
    let mut status = None;
    let mut ids = Vec::new();
    let mut from = None;
    for (k, v) in query_pairs(&uri) {
        if v.contains('\0') {
            return Err(Error::invalid_param("Query parameters must not contain U+0000"));
        }
        match k.as_str() {
            "status" => match v.as_str() {
                "scheduled" | "finalised" => status = Some(v),
                _ => return Err(Error::invalid_param("status must be scheduled or finalised")),
            },
            "delay_id" if ids.len() < 100 => ids.push(v),
            "delay_id" => return Err(Error::invalid_param("at most 100 delay_id")),
            "from" => {
                let (ts, id) = v.split_once('_').ok_or_else(|| Error::invalid_param("invalid from token"))?;
                let ts: i64 = ts.parse().map_err(|_| Error::invalid_param("invalid from token"))?;
                from = Some((ts, id.to_owned()));
            }
            _ => {}
        }
    }
    let rows = storage::delayed_events::list(
        &state.db,
        &auth.user_id,
        status.as_deref(),
        &ids,
        from.as_ref().map(|(t, i)| (*t, i.as_str())),
        PAGE as i64 + 1,
    )
    .await?;
    let more = rows.len() > PAGE;
    let rows = &rows[..rows.len().min(PAGE)];
    let scheduled: Vec<Value> = rows.iter().filter(|r| r.status == "scheduled").map(delayed::item).collect();
    let finalised: Vec<&storage::delayed_events::DelayedRow> =
        rows.iter().filter(|r| r.status == "finalised").collect();
    let mut body = json!({});
    if status.as_deref() != Some("finalised") {
        body["scheduled"] = json!(scheduled);
        body["delayed_events"] = json!(scheduled);
    }
    if status.as_deref() != Some("scheduled") {
        body["finalised"] = json!(finalised.iter().map(|r| delayed::finalised_item(r)).collect::<Vec<_>>());
        if status.is_some() {
            body["delayed_events"] = json!(finalised.iter().map(|r| delayed::item(r)).collect::<Vec<_>>());
        }
    }
    if more && let Some(last) = rows.last() {
        body["next_batch"] = json!(format!("{}_{}", last.send_ts, last.delay_id));
    }
    Ok(axum::Json(body))
}

/// `GET .../delayed_events/{delay_id}`: one of the user's delayed events.
pub async fn get_delayed(
    State(state): State<AppState>,
    auth: Auth,
    Path(delay_id): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    match storage::delayed_events::get(&state.db, &delay_id).await? {
        Some(r) if r.user_id == *auth.user_id => Ok(axum::Json(delayed::item(&r))),
        _ => Err(Error::not_found("No delayed event with this ID")),
    }
}

fn check_manage_rate(state: &AppState, ip: &std::net::IpAddr, auth: &MaybeAuth) -> ApiResult<()> {
    let exempt = auth.0.as_ref().is_some_and(|a| a.is_admin) && state.config.rate_limits.exempt_admins;
    if state.config.rate_limits.enabled && !exempt {
        state.rtc.manage_per_ip.check(&ip.to_string()).map_err(Error::limit_exceeded)?;
    }
    Ok(())
}

#[derive(serde::Deserialize)]
pub struct ActionBody {
    action: Option<String>,
}

/// `POST .../delayed_events/{delay_id}` with `{"action": "cancel"|"restart"|"send"}` (the form
/// matrix-js-sdk falls back to and Synapse serves).
pub async fn update_delayed(
    State(state): State<AppState>,
    auth: MaybeAuth,
    ClientIp(ip): ClientIp,
    Path(delay_id): Path<String>,
    Json(body): Json<ActionBody>,
) -> ApiResult<axum::Json<Value>> {
    check_manage_rate(&state, &ip, &auth)?;
    let raw = body.action.ok_or_else(|| Error::missing_param("action is required"))?;
    let action = Action::parse(&raw).ok_or_else(|| Error::invalid_param("action must be cancel, restart or send"))?;
    delayed::manage(&state, &delay_id, action).await?;
    Ok(axum::Json(json!({})))
}

/// `POST .../delayed_events/{delay_id}/{action}` (the MSC's current form; the `delay_id` is the
/// capability, so no access token is needed).
pub async fn update_delayed_action(
    State(state): State<AppState>,
    auth: MaybeAuth,
    ClientIp(ip): ClientIp,
    Path((delay_id, action)): Path<(String, String)>,
) -> ApiResult<axum::Json<Value>> {
    check_manage_rate(&state, &ip, &auth)?;
    let action = Action::parse(&action).ok_or_else(|| Error::unrecognized("Unknown delayed event action"))?;
    delayed::manage(&state, &delay_id, action).await?;
    Ok(axum::Json(json!({})))
}
