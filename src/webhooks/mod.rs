//! Alert webhooks: `POST /_parvis/webhook/{hookId}` with the hook's secret posts the payload,
//! formatted (`format.rs`), into the hook's room as the hook's bot user. Hooks are created,
//! listed and revoked through the admin API (`api/admin/webhooks.rs`) and `parvis webhook`.
//!
//! The secret is 256 random bits shown once at creation; only its SHA-256 is stored and the
//! comparison is constant-time (`subtle`). An unknown hook, a revoked one and a wrong secret get
//! the same answer. A payload is validated and formatted completely before anything is sent, so
//! a bad one posts nothing; the post is one event (`rooms::send`), committed before 200.

pub mod format;
pub mod notices;

use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use crate::config::WebhooksConfig;
use crate::error::{ApiResult, Error};
use crate::http::ratelimit::Limiter;
use crate::rooms::{NewEvent, Room};
use crate::state::AppState;
use crate::storage;

/// Webhook state of this process: the per-hook rate limiter.
pub struct Webhooks {
    pub limiter: Limiter,
    /// Per-recipient locks of server-notice room creation.
    notice_locks: moka::sync::Cache<String, std::sync::Arc<tokio::sync::Mutex<()>>>,
}

impl Webhooks {
    pub fn new(cfg: &WebhooksConfig) -> Self {
        Self { limiter: Limiter::new(cfg.per_hook), notice_locks: moka::sync::Cache::new(10_000) }
    }

    pub fn notice_lock(&self, user: &str) -> std::sync::Arc<tokio::sync::Mutex<()>> {
        self.notice_locks.get_with_by_ref(user, Default::default)
    }
}

/// The default bot localpart of hooks created without one.
pub const DEFAULT_BOT: &str = "alerts";

/// What an administrator asks for.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateHook {
    pub room_id: String,
    pub name: String,
    /// The bot's localpart or user ID (default `alerts`); created as a bot account if missing.
    pub bot: Option<String>,
    #[serde(default)]
    pub mention_severities: Vec<String>,
}

/// Makes sure a local bot account exists (`user_type = "bot"`); returns its user ID.
pub async fn ensure_bot_user(state: &AppState, name: &str, display_name: Option<&str>) -> ApiResult<String> {
    let server = &state.config.server_name;
    let localpart = match name.strip_prefix('@') {
        Some(rest) => match rest.split_once(':') {
            Some((l, s)) if s == server => l.to_owned(),
            _ => return Err(Error::invalid_param("The bot must be a local user")),
        },
        None => name.to_owned(),
    };
    let user_id = format!("@{localpart}:{server}");
    if storage::users::get(&state.db, &user_id).await?.is_some() {
        return Ok(user_id);
    }
    crate::users::validate_new_localpart(&localpart, server)?;
    let mut tx = state.db.begin().await?;
    storage::users::insert(
        &mut tx,
        &storage::users::NewUser {
            user_id: &user_id,
            localpart: &localpart,
            password_hash: None,
            is_admin: false,
            user_type: Some("bot"),
            displayname: Some(display_name.unwrap_or(&localpart)),
        },
    )
    .await?;
    tx.commit().await?;
    crate::users::directory::refresh(state, &user_id).await?;
    tracing::info!(user_id, "bot account created");
    Ok(user_id)
}

/// Makes `bot` a joined member of `room`: it joins (public room, or already invited), else
/// `inviter` (a member with the power to invite) invites it first.
pub async fn ensure_joined(state: &AppState, room: &Room, bot: &str, inviter: Option<&str>) -> ApiResult<()> {
    let membership = storage::rooms::membership(&state.db, room.nid, bot).await?.map(|(m, _, _)| m);
    if membership.as_deref() == Some("join") {
        return Ok(());
    }
    let profile = storage::profiles::get(&state.db, bot).await?.unwrap_or_default();
    let join = || NewEvent::state("m.room.member", bot, crate::rooms::create::member_content("join", &profile, false));
    if crate::rooms::send(state, room, bot, join(), None).await.is_ok() {
        return Ok(());
    }
    let inviter = inviter.ok_or_else(|| Error::forbidden("The bot cannot join the room: invite it first"))?;
    let invite = NewEvent::state("m.room.member", bot, crate::rooms::create::member_content("invite", &profile, false));
    crate::rooms::send(state, room, inviter, invite, None)
        .await
        .map_err(|_| Error::forbidden("The bot cannot join the room, and you cannot invite it: invite it first"))?;
    crate::rooms::send(state, room, bot, join(), None).await?;
    Ok(())
}

fn hook_json(row: &storage::webhooks::WebhookRow) -> Value {
    json!({
        "hook_id": row.hook_id,
        "name": row.name,
        "room_id": row.room_id,
        "bot_user_id": row.bot_user_id,
        "mention_severities": row.mention_severities,
        "created_by": row.created_by,
        "created_ts": row.created_ts,
        "revoked": row.revoked_ts.is_some(),
        "revoked_ts": row.revoked_ts,
        "last_used_ts": row.last_used_ts,
    })
}

/// Creates a hook; answers its description with the secret and URL (shown once).
pub async fn create(state: &AppState, creator: &str, req: CreateHook) -> ApiResult<Value> {
    if req.name.trim().is_empty() || req.name.len() > 200 {
        return Err(Error::invalid_param("name must be 1 to 200 bytes"));
    }
    if req.mention_severities.len() > 20 || req.mention_severities.iter().any(|s| s.is_empty() || s.len() > 64) {
        return Err(Error::invalid_param("mention_severities: at most 20 names of 1 to 64 bytes"));
    }
    let room = Room::load(state, &req.room_id).await?;
    let bot = ensure_bot_user(state, req.bot.as_deref().unwrap_or(DEFAULT_BOT), None).await?;
    ensure_joined(state, &room, &bot, Some(creator)).await?;
    let hook_id = crate::auth::new_token("").chars().filter(char::is_ascii_alphanumeric).take(20).collect::<String>();
    let secret = crate::auth::new_token("pvw_");
    storage::webhooks::insert(
        &state.db,
        &storage::webhooks::NewWebhook {
            hook_id: &hook_id,
            token_hash: &crate::auth::hash_token(&secret),
            name: req.name.trim(),
            room_id: room.room_id.as_str(),
            bot_user_id: &bot,
            mention_severities: &req.mention_severities,
            created_by: Some(creator),
        },
    )
    .await?;
    tracing::info!(hook_id, room_id = %room.room_id, bot, "webhook created");
    let row = storage::webhooks::get(&state.db, &hook_id).await?.ok_or_else(Error::internal)?;
    let mut out = hook_json(&row);
    out["secret"] = json!(secret);
    out["path"] = json!(format!("/_parvis/webhook/{hook_id}"));
    if let Some(base) = state.config.client_base_url() {
        out["url"] = json!(format!("{}/_parvis/webhook/{hook_id}", base.trim_end_matches('/')));
    }
    Ok(out)
}

pub async fn list(state: &AppState) -> ApiResult<Value> {
    let rows = storage::webhooks::list(&state.db, 1000).await?;
    Ok(json!({ "webhooks": rows.iter().map(hook_json).collect::<Vec<_>>() }))
}

pub async fn revoke(state: &AppState, hook_id: &str) -> ApiResult<()> {
    if !storage::webhooks::revoke(&state.db, hook_id).await? {
        return Err(Error::not_found("No active webhook with that ID"));
    }
    tracing::info!(hook_id, "webhook revoked");
    Ok(())
}

/// A webhook request: authenticates the hook, rate-limits, formats, posts. Returns the event ID.
pub async fn receive(state: &AppState, hook_id: &str, secret: Option<&str>, body: &[u8]) -> ApiResult<String> {
    if !state.config.webhooks.enabled {
        return Err(Error::unrecognized("Webhooks are disabled"));
    }
    let denied = || Error::forbidden("Unknown webhook or wrong secret");
    let row = if hook_id.len() <= 64 { storage::webhooks::get(&state.db, hook_id).await? } else { None };
    let given = crate::auth::hash_token(secret.unwrap_or(""));
    // Always one constant-time comparison, found or not.
    let expected: Vec<u8> = row.as_ref().map_or_else(|| vec![0u8; 32], |r| r.token_hash.clone());
    let matches: bool = given.as_slice().ct_eq(expected.as_slice()).into();
    let row = match row {
        Some(r) if matches && r.revoked_ts.is_none() && secret.is_some() => r,
        _ => return Err(denied()),
    };
    // The hook's own limit (`webhooks.per_hook`), whatever `rate_limits.enabled` says.
    state.webhooks.limiter.check(&row.hook_id).map_err(Error::limit_exceeded)?;
    let payload: Value =
        serde_json::from_slice(body).map_err(|e| Error::not_json(format!("The body is not JSON: {e}")))?;
    if crate::http::extract::json_has_nul(&payload) {
        return Err(Error::bad_json(crate::http::extract::NUL_MESSAGE));
    }
    let message = format::format(&payload, &row.mention_severities, state.config.webhooks.max_alerts_per_message)
        .map_err(Error::bad_json)?;
    let room = Room::load(state, &row.room_id).await?;
    let id = crate::rooms::send(
        state,
        &room,
        &row.bot_user_id,
        NewEvent::message("m.room.message", message.content()),
        None,
    )
    .await?;
    if let Err(e) = storage::webhooks::touch(&state.db, &row.hook_id).await {
        tracing::warn!(error = %e, "cannot record webhook use");
    }
    Ok(id.to_string())
}

/// Reads the hook secret from `Authorization: Bearer` or the `token` query parameter (for
/// senders that cannot set headers, such as Grafana's legacy notifier).
pub fn secret_of(headers: &axum::http::HeaderMap, uri: &axum::http::Uri) -> Option<String> {
    if let Some(t) = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
    {
        return Some(t.trim().to_owned());
    }
    url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned())
}
