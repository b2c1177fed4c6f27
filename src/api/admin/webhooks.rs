//! Alert webhooks (`POST /_parvis/webhook/{hookId}`), their admin API
//! (`/_parvis/admin/v1/webhooks`), and server notices (`/_synapse/admin/v1/send_server_notice`).

use axum::extract::{Request, State};
use serde::Deserialize;
use serde_json::{Value, json};

use super::AdminAuth;
use crate::error::{ApiResult, Error};
use crate::http::extract::{Json, Path};
use crate::state::AppState;
use crate::webhooks;

/// The public endpoint: the hook's secret authenticates; the body is the alert.
pub async fn receive(
    State(state): State<AppState>,
    Path(hook_id): Path<String>,
    req: Request,
) -> ApiResult<axum::Json<Value>> {
    let secret = webhooks::secret_of(req.headers(), req.uri());
    let body = crate::http::extract::read_body(req, state.config.webhooks.max_body_bytes).await?;
    let event_id = webhooks::receive(&state, &hook_id, secret.as_deref(), &body).await?;
    Ok(axum::Json(json!({ "event_id": event_id })))
}

pub async fn create(
    State(state): State<AppState>,
    AdminAuth(admin): AdminAuth,
    Json(body): Json<webhooks::CreateHook>,
) -> ApiResult<axum::Json<Value>> {
    Ok(axum::Json(webhooks::create(&state, &admin.user_id, body).await?))
}

pub async fn list(State(state): State<AppState>, AdminAuth(_): AdminAuth) -> ApiResult<axum::Json<Value>> {
    Ok(axum::Json(webhooks::list(&state).await?))
}

pub async fn revoke(
    State(state): State<AppState>,
    AdminAuth(_): AdminAuth,
    Path(hook_id): Path<String>,
) -> ApiResult<axum::Json<Value>> {
    webhooks::revoke(&state, &hook_id).await?;
    Ok(axum::Json(json!({})))
}

#[derive(Deserialize)]
pub struct NoticeBody {
    user_id: String,
    content: Value,
    #[serde(rename = "type", default = "message_type")]
    kind: String,
    state_key: Option<String>,
}

fn message_type() -> String {
    "m.room.message".into()
}

pub async fn send_notice(
    State(state): State<AppState>,
    AdminAuth(admin): AdminAuth,
    Json(body): Json<NoticeBody>,
) -> ApiResult<axum::Json<Value>> {
    notice(&state, &admin, body, None).await
}

pub async fn send_notice_txn(
    State(state): State<AppState>,
    AdminAuth(admin): AdminAuth,
    Path(txn_id): Path<String>,
    Json(body): Json<NoticeBody>,
) -> ApiResult<axum::Json<Value>> {
    if txn_id.is_empty() || txn_id.len() > 255 {
        return Err(Error::invalid_param("Invalid transaction ID"));
    }
    notice(&state, &admin, body, Some(txn_id)).await
}

async fn notice(
    state: &AppState,
    admin: &crate::http::extract::Auth,
    body: NoticeBody,
    txn: Option<String>,
) -> ApiResult<axum::Json<Value>> {
    if body.kind.is_empty() || body.kind.len() > 255 {
        return Err(Error::invalid_param("Invalid event type"));
    }
    let scope = crate::rooms::txn_scope(&["send_server_notice", &body.user_id]);
    let txn = txn.as_deref().map(|id| crate::rooms::ClientTxn { device: &admin.device_id, scope: &scope, id });
    let event_id =
        webhooks::notices::send(state, &body.user_id, &body.kind, body.state_key.as_deref(), body.content, txn).await?;
    Ok(axum::Json(json!({ "event_id": event_id })))
}
