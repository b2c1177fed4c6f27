//! Application-service endpoints of the client API: `POST /appservice/{id}/ping` and the
//! third-party lookups forwarded to the appservices declaring the protocol.

use axum::extract::State;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::{ApiResult, Error};
use crate::http::extract::{Auth, Json, Path};
use crate::state::AppState;

#[derive(Deserialize)]
pub struct PingBody {
    transaction_id: Option<String>,
}

/// `POST /_matrix/client/v1/appservice/{appserviceId}/ping`: only with that appservice's own
/// `as_token`; the server pings the appservice and answers the round trip.
pub async fn ping(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    Json(body): Json<PingBody>,
) -> ApiResult<axum::Json<Value>> {
    if auth.appservice.as_deref() != Some(id.as_str()) {
        return Err(Error::forbidden("Only the application service itself may ping it"));
    }
    if body.transaction_id.as_ref().is_some_and(|t| t.len() > 255) {
        return Err(Error::invalid_param("transaction_id is too long"));
    }
    let reg = state.appservices.by_id(&id).cloned().ok_or_else(|| Error::not_found("Unknown appservice"))?;
    let ms = crate::appservice::client::ping(&state, &reg, body.transaction_id.as_deref()).await?;
    Ok(axum::Json(json!({ "duration_ms": ms })))
}

/// Query parameters, forwarded as they are (bounded).
fn forwarded(uri: &axum::http::Uri) -> ApiResult<Vec<(String, String)>> {
    let q = uri.query().unwrap_or("");
    if q.len() > 4096 || crate::http::extract::query_has_nul(q) {
        return Err(Error::invalid_param("Query string too long or invalid"));
    }
    Ok(url::form_urlencoded::parse(q.as_bytes())
        .filter(|(k, _)| k != "access_token")
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect())
}

pub async fn protocols(State(state): State<AppState>, _auth: Auth) -> axum::Json<Value> {
    axum::Json(crate::appservice::client::protocols(&state).await)
}

pub async fn protocol(
    State(state): State<AppState>,
    _auth: Auth,
    Path(protocol): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    Ok(axum::Json(crate::appservice::client::protocol(&state, &protocol).await?))
}

pub async fn user(
    State(state): State<AppState>,
    _auth: Auth,
    Path(protocol): Path<String>,
    uri: axum::http::Uri,
) -> ApiResult<axum::Json<Value>> {
    let q = forwarded(&uri)?;
    Ok(axum::Json(crate::appservice::client::lookup(&state, "user", &protocol, &q).await?))
}

pub async fn location(
    State(state): State<AppState>,
    _auth: Auth,
    Path(protocol): Path<String>,
    uri: axum::http::Uri,
) -> ApiResult<axum::Json<Value>> {
    let q = forwarded(&uri)?;
    Ok(axum::Json(crate::appservice::client::lookup(&state, "location", &protocol, &q).await?))
}
